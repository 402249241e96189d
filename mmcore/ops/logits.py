"""Decoding-step logits: ``hidden @ weight[rows].T (+ bias[rows])`` for the few rows being generated.

During generation each step multiplies a small batch of hidden states ``(B, D)`` by the tied output head
``(V, D)`` (Kosmos-2: V = 65,037, D = 2048, 533 MB of float32). At B = 1 ... 64 that product is bound by
reading the weight, and ATen's GEMV/GEMM reads it at a fraction of the memory bandwidth on a CPU; the C++
kernel (csrc/decoding/logits.cpp) streams each weight row once and dots it with all B hidden states. ``rows``
restricts the product to a contiguous range of vocabulary ids -- the 1,024 location tokens, when the box
grammar allows nothing else -- and returns only those columns. ``ScreenedHead`` (below) serves greedy decoding
from 8-bit or bfloat16 copies with exact bounds, computing in float32 only the rows that can still be chosen.

Inference only: the C++ kernel has no gradient (backpropagating through it raises), and default dispatch
leaves calls that need gradients to the PyTorch backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcore.ops import _library
from mmcore.ops._dispatch import ArgumentTypeError, Backend, Op, extension_kernel

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def decode_logits_ref(hidden, weight, bias=None, *, rows=None, upcast=True):
    """Reference: ``F.linear`` on the selected rows. upcast: in float64 (True) or in the op's output dtype --
    float32, float64 for float64 inputs -- (False, the tolerance rule's baseline and the ``torch`` backend).

    NOTE: half-precision weights are upcast here, one copy of the selected rows per call."""
    start, end = (0, weight.shape[0]) if rows is None else rows
    dtype = torch.float64 if upcast or hidden.dtype == torch.float64 else torch.float32
    b = None if bias is None else bias[start:end].to(dtype)
    return F.linear(hidden.to(dtype), weight[start:end].to(dtype), b)


# ------------------------------------------------------------------------------------ custom-op plumbing


@torch.library.register_fake("mmcore::decode_logits")
def _fake(hidden, weight, bias, row_start, row_end):
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return hidden.new_empty((hidden.shape[0], row_end - row_start), dtype=dtype)


@torch.library.register_fake("mmcore::screen_logits_int8")
def _fake_int8(hidden, weight, offsets, weight_scale, hidden_scale, vocab):
    return hidden.new_empty((hidden.shape[0], vocab), dtype=torch.float32)


@torch.library.register_fake("mmcore::screen_candidates")
def _fake_candidates(approx, scores, floor, table, coef):
    return approx.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


@torch.library.register_fake("mmcore::quantize_rows_int8")
def _fake_quantize(hidden, padded_dim):
    b = hidden.shape[0]
    return (hidden.new_empty((b, padded_dim), dtype=torch.uint8), hidden.new_empty((b,)),
            hidden.new_empty((b, 2), dtype=torch.float64))  # fmt: skip


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad):
    raise RuntimeError(
        "mmcore::decode_logits is inference-only and has no backward; compute logits that need gradients with "
        "F.linear (or train with mmcore.ops.fused_linear_cross_entropy)"
    )


torch.library.register_autograd("mmcore::decode_logits", _backward, setup_context=_setup_context)


def _run_cpp(hidden, weight, bias, start, end):
    return _library.op("decode_logits")(hidden, weight, bias, start, end)


def _run_torch(hidden, weight, bias, start, end):
    return decode_logits_ref(hidden, weight, bias, rows=(start, end), upcast=False)


def _cpp_supports(hidden, weight, bias, start, end):
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias)):
        return "an input requires grad (the C++ kernel is inference-only: call it under torch.no_grad())"
    return None


DECODE_LOGITS = Op(
    "decode_logits",
    [
        Backend(
            "cpp",
            _run_cpp,
            ("cpu",),
            (torch.float32, torch.float64, torch.bfloat16),
            check=_cpp_supports,
            needs=extension_kernel("decode_logits"),
        ),
        Backend("torch", _run_torch, ("cpu", "cuda"), _DTYPES),
    ],
)


# --------------------------------------------------------------------------------------------- public


def _check(hidden, weight, bias, rows) -> tuple[int, int]:
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(
                f"{name} must be a 2-D tensor, got "
                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
            )
        if t.dtype not in _DTYPES:
            raise ArgumentTypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden (B, D) and weight (V, D) must share D, got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ArgumentTypeError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    vocab = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (vocab,):
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must have shape ({vocab},), got {got}")
        if bias.dtype != weight.dtype:
            raise ArgumentTypeError(f"bias must share weight's dtype {weight.dtype}, got {bias.dtype}")
    devices = {t.device for t in (hidden, weight) + ((bias,) if bias is not None else ())}
    if len(devices) != 1:
        raise ValueError(f"hidden, weight and bias must be on one device, got {sorted(map(str, devices))}")
    if rows is None:
        return 0, vocab
    ok = isinstance(rows, (tuple, list)) and len(rows) == 2
    ok = ok and all(isinstance(r, int) and not isinstance(r, bool) for r in rows)
    if not (ok and 0 <= rows[0] <= rows[1] <= vocab):
        raise ValueError(f"rows must be None or (start, end) ints with 0 <= start <= end <= {vocab}, got {rows!r}")
    return int(rows[0]), int(rows[1])


def decode_logits(hidden, weight, bias=None, *, rows=None, backend=None):
    """Logits of one decoding step: ``hidden @ weight[start:end].T + bias[start:end]``.

    hidden: (B, D); weight: (V, D), the output head (its rows need unit stride along D to be read in place by
    the C++ kernel; otherwise the selected rows are copied per call); bias: (V,) or None; rows: None for the whole
    vocabulary, or ``(start, end)`` for vocabulary ids ``start <= v < end`` (e.g. the location tokens,
    ``(tokens.first_loc, tokens.loc_end)``). hidden, weight and bias share a dtype and a device.

    Returns (B, end - start): float32, float64 for float64 inputs. Backends: ``"cpp"`` (CPU, float32/float64,
    and bfloat16 -- float32 sums, with AVX512-BF16 dot products where the CPU has them, else both operands widened;
    no gradients) and ``"torch"`` (``F.linear`` in the output dtype, CPU or GPU; float16 goes there). For
    inference: the ``cpp`` kernel is not differentiable, so a call with grad mode on and an input that requires grad
    goes to ``"torch"`` (forcing ``"cpp"`` then raises); the summation order differs from BLAS's, by a few float32
    ulps of the dot products' magnitudes.
    """
    start, end = _check(hidden, weight, bias, rows)
    return DECODE_LOGITS(hidden.device.type, hidden.dtype, hidden, weight, bias, start, end, backend=backend)


# Inference on at most this many rows goes to the streaming kernel in ``linear``: the decoding steps of a batch.
# Measured (benchmarks/bench_decode_logits.py, one thread): 1.5-3.5x F.linear at 1-8 rows; Kosmos-2's 50M
# configuration generated 6-10 % faster end to end with its decoder's linears on the kernel.
LINEAR_SMALL_ROWS = 16
_CPP_ON_CPU = "cpp" in DECODE_LOGITS.available("cpu")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, except that float32 inference on the CPU over at most ``LINEAR_SMALL_ROWS``
    rows (one decoding step of a batch) runs the ``decode_logits`` C++ kernel, which streams the weight once at
    memory speed where BLAS is slower on so few rows. Differentiable calls, other dtypes and devices, larger inputs
    and compiled graphs take ``F.linear``. x: (..., in); weight: (out, in); bias: (out,) or None."""
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    if (
        0 < rows <= LINEAR_SMALL_ROWS
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and not torch.compiler.is_compiling()
        and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)))
        and _CPP_ON_CPU
        and weight.dim() == 2
        and x.shape[-1] == weight.shape[1]
        and (bias is None or bias.shape == (weight.shape[0],))
    ):
        # the kernel directly: the conditions above are what decode_logits' checks and dispatch would establish, and
        # their ~15 us per call is 16 calls per decoding step of a 4-layer decoder
        out = _library.op("decode_logits")(x.reshape(rows, x.shape[-1]), weight, bias, 0, weight.shape[0])
        return out.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


# ------------------------------------------------------------------------------------ screened greedy head

# float32's unit roundoff; the smallest normal float32 and bfloat16.
_U32 = 2.0**-24
_SMALLEST_NORMAL = 2.0**-126
# bounds() gives up above this magnitude (float32 max ~3.4e38): sums of logits and errors stay finite.
_SCREEN_LIMIT = 1e37
# Rows compared on every reuse, to notice weights rewritten through ``.data`` (which the version counter misses).
_SCREEN_SAMPLE_ROWS = 16
# Weight rows per chunk when the error constants are computed at construction (bounds the temporaries).
_SCREEN_CHUNK_ROWS = 8192


# int8 screen: the relative rounding allowance of its approximate logits (float64 products rounded once to float32)
# and of the bounds' own arithmetic; the largest D whose int32 sums cannot wrap (255 * 127 * D < 2**31).
_INT8_U2 = 8 * _U32
_INT8_MAX_DIM = 66000


def _int8_fast() -> bool:
    """Whether ``screen_logits_int8`` has its AVX512-VNNI kernel on this CPU (else a scalar loop)."""
    from mmcore import _extension

    ext = _extension.extension()
    return ext is not None and hasattr(ext, "int8_dot_fast") and bool(ext.int8_dot_fast())


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit codes of each row of float64 ``x`` (holding float32 values): (scale (rows,) float32 =
    max|x| / 127 rounded, codes (rows, D) float64 integers in [-127, 127], residual x - scale * codes). The residual
    is computed in float64 from the rounded scale (scale * code is exact there: 24 + 7 bits), so it is the residual
    of these codes to within float64 rounding, whatever the scale's own rounding; an all-zero row (or one whose
    scale underflows) gets codes 0 and keeps x as its residual."""
    scale = (x.abs().amax(1) / 127).float()
    s = scale.double()[:, None]
    codes = torch.where(s > 0, (x / s.clamp_min(1e-300)).round().clamp(-127, 127), 0.0)
    return scale, codes, x - s * codes


def _bfloat16_flushed(x: torch.Tensor) -> torch.Tensor:
    """x in bfloat16 (round to nearest even), with bfloat16 subnormals set to zero, as vdpbf16ps reads them."""
    low = x.to(torch.bfloat16)
    return low.masked_fill_(low.abs() < _SMALLEST_NORMAL, 0)


class ScreenedHead:
    """The float32 output head of greedy decoding, screened from low-precision copies: for each hidden state, bounds
    on every logit from 8-bit (``kind="int8"``) or bfloat16 (``kind="bfloat16"``) copies of the weight and of the
    hidden state -- a quarter or half of the weight's bytes to read, and integer or bfloat16 dot products at four or
    two times the float32 rate where the CPU has AVX512-VNNI or AVX512-BF16 -- so that only the few rows that can
    still be the largest need the float32 product, and the token chosen is the one the float32 head chooses.

    The bounds. L = fl(h.w) is the float32 logit the kernel computes for weight row w and hidden state h (D entries),
    within g ||h|| ||w|| of h.w (any summation order, g = D u / (1 - D u), u = 2**-24; Higham, *Accuracy and
    Stability of Numerical Algorithms*, section 3.1); the screening value L' comes from copies w' = w - e, h' = h - f,
    and h.w - h'.w' = h.e + f.w' (Cauchy-Schwarz for each term).

    - ``"int8"``: w' = s_w q_w with q_w = round(w / s_w) in [-127, 127], s_w = max|w| / 127 in float32, per row; h'
      the same per hidden state. L' = (q_h.q_w, exact in int32) * s_w * s_h in float64, rounded to float32 (within
      u |h'.w'| and the subnormal term). So |L - L'| <= ||h|| (||e|| + g ||w|| + u2 ||w'||) + ||f|| (1 + u2) ||w'||
      with u2 = 8 u (the roundings of L' and of the bounds' own arithmetic). The norms are computed in float64 from
      the float64 residuals and rounded up. Kernel: ``screen_logits_int8`` (csrc/decoding/logits_int8.cpp),
      AVX512-VNNI or a scalar loop with identical results; the hidden states' codes by
      ``quantize_rows_int8``. D up to 66,000 (int32 sums); the default where the CPU has AVX512-VNNI.
    - ``"bfloat16"``: w', h' the bfloat16 roundings (subnormals flushed to zero, as vdpbf16ps reads them), L' their
      float32-accumulated product (AVX512-BF16 ``decode_logits``), so |L - L'| <= (||h|| + ||f||)(||e|| + g (||w|| +
      ||w'||)) + ||f|| ||w'||, norms in float32 inflated for their own rounding and by sqrt(D) 2**-63 for entries
      whose squares underflow, with a slack of 16 u max ||w|| for the float32 arithmetic of the bounds themselves.

    Both add an absolute 2 D 2**-126 for results flushed or rounded in the subnormal range. Each kind keeps a (3, V)
    table, so that the error bound of every logit is one (B, 3) x (3, V) product. A row whose upper bound is below the
    largest lower bound among the tokens the step allows cannot be chosen; the rest (a handful: the interval is
    ~1 % of ||h|| ||w|| for int8, ~0.5 % for bfloat16) are computed exactly with the float32 kernel, whose value for a
    row does not depend on which other rows it computes. mmcore.models.kosmos2.generation uses it.

    weight: (V, D) float32 on the CPU; kind: None picks ``"int8"`` where the CPU has AVX512-VNNI, else
    ``"bfloat16"``. Holds the low-precision copy and its tables. ``matches(weight)`` tells whether it was built from
    this tensor in its current state. Needs the C++ kernels (``available()``): the exact rows must be computed the
    way the whole head is.
    """

    KINDS = ("int8", "bfloat16")

    def __init__(self, weight: torch.Tensor, kind: str | None = None):
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype != torch.float32:
            raise ArgumentTypeError("ScreenedHead needs a (V, D) float32 weight")
        if weight.device.type != "cpu":
            raise ValueError(f"ScreenedHead runs on the CPU (its kernels are C++), got {weight.device}")
        if kind is None:
            kind = "int8" if _int8_fast() and weight.shape[1] <= _INT8_MAX_DIM else "bfloat16"
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS} or None, got {kind!r}")
        if kind == "int8" and weight.shape[1] > _INT8_MAX_DIM:
            raise ValueError(f"kind 'int8' takes D <= {_INT8_MAX_DIM} (int32 sums), got D = {weight.shape[1]}")
        self.kind = kind
        dim = weight.shape[1]
        self._g = dim * _U32 / (1 - dim * _U32)
        self._underflow = 2 * dim * 2.0**-126  # products and sums flushed or rounded in the subnormal range
        with torch.no_grad():
            self.weight = weight.detach()
            if kind == "int8":
                self._build_int8()
            else:
                self._build_bfloat16()
            # the largest entries, for the overflow test of ``bounds``: |L'| + error <= coef[:, :2] @ _table_max
            self._table_max = (
                self._table_max.nan_to_num(torch.inf) if weight.shape[0] else torch.zeros(2, dtype=torch.float32)
            )
        self._key = (weight.data_ptr(), weight._version, tuple(weight.shape), tuple(weight.stride()))
        self._sample_rows = torch.linspace(0, weight.shape[0] - 1, min(_SCREEN_SAMPLE_ROWS, weight.shape[0])).long()
        self._sample = self.weight[self._sample_rows].clone()

    def _build_bfloat16(self) -> None:
        weight, g = self.weight, self._g
        dim = weight.shape[1]
        self.low = _bfloat16_flushed(weight)
        err, low_norm = torch.empty(weight.shape[0]), torch.empty(weight.shape[0])
        top = 0.0
        # A float32 norm is within g of the norm of the entries whose squares are normal (|x| >= 2**-63); the others
        # add at most sqrt(D) 2**-63 (triangle inequality): ``tiny``.
        tiny = dim**0.5 * _SMALLEST_NORMAL**0.5
        for r in range(0, weight.shape[0], _SCREEN_CHUNK_ROWS):
            w = weight[r : r + _SCREEN_CHUNK_ROWS]
            low = self.low[r : r + _SCREEN_CHUNK_ROWS].float()
            norm = w.norm(dim=1) + tiny
            low_norm[r : r + w.shape[0]] = low.norm(dim=1) + tiny
            # w - low is exact in float32 (the bits bfloat16 dropped)
            err[r : r + w.shape[0]] = (w - low).norm(dim=1) + tiny + g * (norm + low_norm[r : r + w.shape[0]])
            top = max(top, float(norm.max()) if norm.numel() else 0.0)
        # The norms' own rounding (within g each) and the sums': a relative 4 g and 2**-20 on top.
        inflate = (1 + 4 * g) * (1 + 2**-20)
        row_error, low_norm = (err + 16 * _U32 * top) * inflate, low_norm * inflate
        self._table = torch.stack([row_error, low_norm, torch.ones_like(err)])
        self._table_max = torch.stack([(row_error + low_norm).max(), low_norm.max()]) if err.numel() else None
        self._norm_factor = 1 + 4 * g  # ||h|| and ||f|| computed in float32 (a sum of D squares, a square root)
        self._tiny = tiny

    def _build_int8(self) -> None:
        weight, g = self.weight, self._g
        vocab, dim = weight.shape
        padded_v, padded_d = -(-vocab // 16) * 16, -(-dim // 4) * 4
        q = torch.zeros(padded_v, padded_d, dtype=torch.int8)
        scale = torch.zeros(padded_v, dtype=torch.float32)
        table = torch.zeros(3, vocab, dtype=torch.float64)
        for r in range(0, vocab, _SCREEN_CHUNK_ROWS):
            w = weight[r : r + _SCREEN_CHUNK_ROWS].double()
            s, qw, e = _quantize_rows(w)
            scale[r : r + w.shape[0]] = s
            q[r : r + w.shape[0], :dim] = qw.to(torch.int8)
            norm, err, low_norm = w.norm(dim=1), e.norm(dim=1), (qw * s.double()[:, None]).norm(dim=1)
            table[0, r : r + w.shape[0]] = err + g * norm + _INT8_U2 * low_norm
            table[1, r : r + w.shape[0]] = (1 + _INT8_U2) * low_norm
        table[:2] *= 1 + 2**-18  # float64 norms rounded, then float32 rounding of the tables and of the bounds' sums
        table[2] = 1.0
        self._table = table.float()
        self._table_max = (
            torch.stack([(self._table[0] + self._table[1]).max(), 2 * self._table[1].max()]) if vocab else None
        )
        self._offsets = q.sum(1, dtype=torch.int32) * 128
        # (V_pad / 16, D_pad / 4, 16, 4): 4 columns of 16 rows per 64 bytes (the kernel's vpdpbusd operand)
        self._packed = q.view(padded_v // 16, 16, padded_d // 4, 4).permute(0, 2, 1, 3).contiguous()
        self._scale = scale
        self._padded_d = padded_d

    @staticmethod
    def available() -> bool:
        """Whether the C++ kernel is built (the head is then computed by it, screened or whole)."""
        return _CPP_ON_CPU

    def matches(self, weight: torch.Tensor) -> bool:
        """Same tensor, same version counter, same sampled rows. NOTE: writes through ``weight.data`` bypass the
        version counter; the sampled rows catch a reload of the weights, not an edit of a few other rows -- after
        such an edit, build a new ScreenedHead (or generate with ``screen_head=False``)."""
        if self._key != (weight.data_ptr(), weight._version, tuple(weight.shape), tuple(weight.stride())):
            return False
        return torch.equal(weight.detach()[self._sample_rows], self._sample)

    def approximate(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(L', coef): the screening logits (B, V) float32 of ``hidden`` (B, D) float32 and the (B, 3) float32
        factors of their error bounds, |L - L'| <= coef @ ``table`` (the bound of every logit is coef[b] .
        table[:, v], rounding of that product included); None when ``hidden`` is not finite or a logit or bound
        could overflow float32 (then nothing can be screened)."""
        if self.kind == "int8":
            if not bool(torch.isfinite(hidden).all()):  # the codes' conversion needs finite values
                return None
            # _quantize_rows' codes and the norms of h and of its residual, in one C++ pass
            codes, scale, norms = _library.op("quantize_rows_int8")(hidden, self._padded_d)
            coef = (norms * (1 + 2**-18)).float()  # rounded up (float64 -> float32 rounds within 2**-24)
            approx = _library.op("screen_logits_int8")(
                codes, self._packed, self._offsets, self._scale, scale, self.weight.shape[0]
            )
        else:
            low = _bfloat16_flushed(hidden)
            gap = (hidden - low.float()).norm(dim=1) + self._tiny
            coef = torch.stack([hidden.norm(dim=1) + self._tiny + gap, gap], dim=1) * self._norm_factor  # (B, 2)
            approx = decode_logits(low, self.low, backend="cpp")
        if not bool(torch.isfinite(coef).all()) or float((coef @ self._table_max).max()) > _SCREEN_LIMIT:
            return None
        return approx, torch.cat([coef, coef.new_full((coef.shape[0], 1), self._underflow)], dim=1)

    @property
    def table(self) -> torch.Tensor:
        """(3, V) float32: the per-row factors of the error bounds (``approximate``)."""
        return self._table

    def bounds(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(lower, upper), each (B, V) float32, around the float32 logits of ``hidden`` (B, D) float32: L' -/+ its
        error bound (``approximate``); None where ``approximate`` gives None."""
        found = self.approximate(hidden)
        if found is None:
            return None
        approx, coef = found
        return torch.addmm(approx, coef, self._table, alpha=-1), approx.addmm_(coef, self._table)

    def exact(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """(B, len(rows)) float32: the float32 logits of vocabulary ids ``rows``, bit for bit what ``decode_logits``
        gives for them over the whole head."""
        return decode_logits(hidden, self.weight.index_select(0, rows), backend="cpp")
