"""Numerical comparison helpers shared by mmcore's tests and benchmarks, and two for tests of CPU-specific kernel
paths (``run_in_subprocess``, ``cpu_has_flag``).

The tolerance rule (from FlashAttention's tests, DESIGN.md "Numerics and testing"): a kernel's error
against a float64 reference may be at most ``factor`` times the error of the same computation done by
PyTorch in the kernel's dtype -- 2x for outputs, 3x for gradients -- plus a floor for the dtype, from the
one table below.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

# Floors per dtype: about half an ulp at 1.0 for the half types (fp16 ulp 9.8e-4, bf16 ulp 7.8e-3), so an
# op PyTorch computes exactly in that dtype still leaves room for one rounding in the kernel.
FLOORS: dict[torch.dtype, float] = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 5e-4,
    torch.bfloat16: 4e-3,
}
OUTPUT_FACTOR = 2.0
GRAD_FACTOR = 3.0


def error_report(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, tuple[int, ...]]:
    """(max abs error, mean abs error, index of the max) of ``out`` against ``ref``, in float64."""
    diff = (out.detach().to(torch.float64) - ref.detach().to(torch.float64)).abs()
    if diff.numel() == 0:
        return 0.0, 0.0, ()
    flat = int(diff.reshape(-1).argmax())
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), diff.shape))
    return float(diff.reshape(-1)[flat]), float(diff.mean()), where


def assert_close_to_ref(
    out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor, *, grad: bool = False, name: str = "output"
) -> None:
    """Assert ``out`` is as close to the float64 ``ref`` as the tolerance rule allows.

    out: the kernel's result; ref: the reference in float64; baseline: the reference computed by PyTorch in
    ``out``'s dtype. Fails with max and mean error, where the max occurs, and the tolerance.
    """
    if out.shape != ref.shape or baseline.shape != ref.shape:
        raise AssertionError(
            f"{name}: shapes differ: out {tuple(out.shape)}, ref {tuple(ref.shape)}, baseline {tuple(baseline.shape)}"
        )
    if not torch.isfinite(out).all() and torch.isfinite(ref).all():
        bad = (~torch.isfinite(out)).reshape(-1).nonzero()[0, 0]
        raise AssertionError(f"{name}: non-finite value at flat index {int(bad)} where the reference is finite")
    floor = FLOORS[out.dtype]
    factor = GRAD_FACTOR if grad else OUTPUT_FACTOR
    err, mean, where = error_report(out, ref)
    base_err, _, _ = error_report(baseline, ref)
    tol = factor * base_err + floor
    if not err <= tol:
        raise AssertionError(
            f"{name} ({out.dtype}): max error {err:.3e} at {list(where)} (out {float(out[where]):.6g}, "
            f"ref {float(ref[where]):.6g}), mean error {mean:.3e}; tolerance {tol:.3e} = {factor:g} x "
            f"PyTorch's error {base_err:.3e} + floor {floor:g}"
        )


# Sentences for the small Kosmos-2-style tokenizer below: enough text for ~200 BPE pieces, so the 64 image placeholder
# ids 4 ... 67 are ordinary pieces, as in the released vocabulary.
_KOSMOS2_CORPUS = (
    "An image of a snowman warming himself by a fire.",
    "A dog is sitting on the grass next to a red ball.",
    "Two people are riding bicycles along the river at sunset.",
    "The cat sleeps on a wooden table in the kitchen.",
    "A man in a blue shirt holds an umbrella in the rain.",
    "Children play football in the park while birds fly overhead.",
)
_KOSMOS2_VOCABS: dict[int, tuple[dict[str, int], list[tuple[str, str]]]] = {}


def make_kosmos2_tokenizer(vocab_size: int = 200):
    """A fresh small tokenizer shaped like Kosmos-2's (XLM-R style): ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3,
    sentencepiece-like BPE pieces after them, ``<s> ... </s>`` added by ``add_special_tokens``. Returns a
    ``transformers.PreTrainedTokenizerFast`` without the Kosmos-2 tag and location tokens (the processor adds them).

    Every call with the same ``vocab_size`` builds an identical tokenizer (the BPE is trained once per process)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    if vocab_size not in _KOSMOS2_VOCABS:
        trained = Tokenizer(models.BPE(unk_token="<unk>"))
        trained.pre_tokenizer = pre_tokenizers.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
        trained.train_from_iterator(_KOSMOS2_CORPUS, trainer)
        state = json.loads(trained.to_str())["model"]
        merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in state["merges"]]
        _KOSMOS2_VOCABS[vocab_size] = (state["vocab"], merges)
    vocab, merges = _KOSMOS2_VOCABS[vocab_size]
    tok = Tokenizer(models.BPE(vocab=dict(vocab), merges=list(merges), unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def run_in_subprocess(code: str, inputs: dict, env: dict[str, str]):
    """Run ``code`` in a fresh Python interpreter whose environment adds ``env`` -- for settings read once per process,
    such as ``MMCORE_DISABLE_AVX512BF16=1`` that sends a kernel down its other path -- and return the ``result`` it
    leaves. The code sees the entries of ``inputs`` as variables; inputs and result travel through torch.save."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.pt", Path(tmp) / "out.pt"
        torch.save(inputs, src)
        script = (
            f"import sys, torch\nglobals().update(torch.load(sys.argv[1]))\n{code}\ntorch.save(result, sys.argv[2])\n"
        )
        subprocess.run([sys.executable, "-c", script, str(src), str(dst)], env={**os.environ, **env}, check=True)
        return torch.load(dst)


def cpu_has_flag(flag: str) -> bool:
    """Whether the CPU lists ``flag`` (as in /proc/cpuinfo, e.g. "avx512_vnni"); False where that file is missing."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and flag in cpuinfo.read_text().split()


def compile_for_sm90(fn, signature: dict, constexprs: dict, *, divisible_by_16=(), **options):
    """Compile the ``@triton.jit`` kernel ``fn`` for an H100 (sm_90) without a GPU -- Triton's compiler and ptxas
    only, nothing runs -- so that what the CPU interpreter accepts and the GPU compiler rejects (a module global that
    is not a ``tl.constexpr``, dot shapes, types, shared memory) fails on the CPU machine. signature: argument name
    -> Triton type (``"*fp16"``, ``"i32"``, ...) for the runtime arguments; constexprs: name -> value;
    divisible_by_16: arguments the JIT would specialise as multiples of 16 (pointers, strides); options: compile
    options (``num_warps``, ``num_stages``, ``enable_fp_fusion``). Returns the compiled kernel (``.asm``,
    ``.metadata``). Call it in a process without ``TRITON_INTERPRET`` (``assert_runs_without_triton_interpreter``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {**signature, **{c: "constexpr" for c in constexprs}}
    consts = {(names.index(c),): v for c, v in constexprs.items()}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible_by_16}
    return triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=options)


def assert_runs_without_triton_interpreter(code: str, env: dict[str, str] | None = None, timeout: float = 300):
    """Run ``code`` in a fresh Python interpreter with ``TRITON_INTERPRET`` unset (the test session sets it on a
    machine without a GPU) and ``env`` added; an AssertionError with its output when it exits with an error."""
    run_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run_env.update(env or {})
    run = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]


@contextlib.contextmanager
def gpu_dispatch_on_cpu():
    """Within this context, default dispatch sends CPU tensors where it would send CUDA ones -- the first backend
    that also runs on CUDA and takes the call (Triton where an op has it, under ``TRITON_INTERPRET=1``; else
    ``torch``) -- so a model's GPU composition of kernels (a decoding step's cache layout through the Triton
    attention, the Triton cross-entropy in packed training) runs on a machine without a GPU. CUDA-only backends
    (flash-attn, xformers) cannot run on CPU tensors and are passed over, as a GPU without them would. A backend
    forced with ``backend=`` or ``MMCORE_BACKEND`` is still honoured."""
    from mmcore.ops import _dispatch

    select = _dispatch.Op.select

    def as_if_cuda(self, device_type, dtype, args=(), kwargs=None, backend=None):
        if device_type != "cpu" or backend is not None or os.environ.get(_dispatch.ENV_VAR):
            return select(self, device_type, dtype, args, kwargs, backend)
        for b in self.backends.values():
            if "cuda" in b.devices and b.why_not("cpu", dtype, args, kwargs or {}) is None:
                return b
        return select(self, device_type, dtype, args, kwargs, backend)

    _dispatch.Op.select = as_if_cuda
    try:
        yield
    finally:
        _dispatch.Op.select = select


def opcheck_triton_op(op, args: tuple) -> None:
    """``torch.library.opcheck`` of a ``triton_op``: every check on CUDA tensors; on CPU tensors (the kernels run in
    the Triton interpreter) all but test_aot_dispatch_dynamic, which runs the launcher on functional tensors whose
    data the interpreter cannot read -- the GPU tests run that one."""
    on_cpu = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(op, args, **({"test_utils": utils} if on_cpu else {}))
