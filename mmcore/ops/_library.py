"""Every mmcore custom op's schema, in one place.

The C++ extension supplies kernels for these names (``TORCH_LIBRARY_IMPL(mmcore, CPU/CUDA, ...)``) and the
ops modules register fake (meta) implementations and autograd next to their dispatch code. The schemas
are defined even when the extension is missing, so fake registrations and ``torch.compile`` tracing of the
reference paths never depend on a build.
"""

import torch

NAMESPACE = "mmcore"

SCHEMAS: dict[str, str] = {
    # grounding codec: (..., 4) float boxes -> (..., 2) int64 cell indices, and back to float64 boxes
    "boxes_to_loc_indices": "(Tensor boxes, int num_bins, str rounding) -> Tensor",
    "loc_indices_to_boxes": "(Tensor indices, int num_bins) -> Tensor",
    # fused decoding step (mmcore/ops/decoding.py): logits (batch, vocab) -> next tokens (batch,) int64, advancing
    # the per-row state in place. special_tokens: GroundingTokens fields in order (phrase_open, phrase_close,
    # object_open, object_close, delimiter, first_loc, num_bins, eos, pad). scores: optional (batch, vocab)
    # float32 output of the processed logits.
    "grounded_decode_step": (
        "(Tensor logits, Tensor(a!) sequences, Tensor(b!) lengths, Tensor starts, Tensor(c!) box_state, "
        "Tensor(d!) top_left, Tensor(e!) steps, Tensor(f!) finished, Tensor(g!)? scores, int[] special_tokens, "
        "int no_repeat_ngram_size, int min_new_tokens, bool do_sample, float temperature, int top_k, float top_p, "
        "int seed, bool constrain_boxes) -> Tensor"
    ),
    # decoding-step logits (mmcore/ops/logits.py): hidden (B, D) @ weight[row_start:row_end].T (+ bias[rows]) ->
    # (B, row_end - row_start), float32 (float64 for float64 inputs). Inference only.
    "decode_logits": "(Tensor hidden, Tensor weight, Tensor? bias, int row_start, int row_end) -> Tensor",
    # int8 screening logits (csrc/decoding/logits_int8.cpp; ScreenedHead kind "int8"): hidden (B, D) uint8 (q + 128),
    # weight int8 packed (V_pad / 16, D / 4, 16, 4), offsets (V_pad,) int32 (128 x row sums), weight_scale (V_pad,)
    # and hidden_scale (B,) float32 -> (B, vocab) float32 (sum - offset) * weight_scale * hidden_scale (in float64).
    "screen_logits_int8": (
        "(Tensor hidden, Tensor weight, Tensor offsets, Tensor weight_scale, Tensor hidden_scale, int vocab) -> Tensor"
    ),
    # the hidden states' codes for screen_logits_int8: hidden (B, D) float32 -> (codes (B, padded_dim) uint8 = q + 128,
    # scale (B,) float32, norms (B, 2) float64 = ||h||, ||h - scale q||); mmcore/ops/logits.py _quantize_rows's rules.
    "quantize_rows_int8": "(Tensor hidden, int padded_dim) -> (Tensor, Tensor, Tensor)",
    # screened greedy step (mmcore/models/kosmos2/generation.py): sorted int64 ids c with approx[r, c] + coef[r] .
    # table[:, c] >= floor[r] and scores[r, c] > -inf for some row r; approx, scores (B, V), floor (B,), table
    # (3, V), coef (B, 3), all float32.
    "screen_candidates": "(Tensor approx, Tensor scores, Tensor floor, Tensor table, Tensor coef) -> Tensor",
    # Kosmos-2's text decoder for one generation step, every layer (csrc/decoding/decoder_step.cpp; the Python entry
    # point and parameter order: mmcore/models/kosmos2/modeling.py TextDecoder.step). x (T, D) float32 embedded
    # tokens; params 16 per layer + the final LayerNorm's 2; the caches (layers, slots, heads, head_dim) get this
    # step's keys and values at write_index (T,) int64. Returns (T, D). Inference only, CPU only.
    "kosmos2_decode_step": (
        "(Tensor x, Tensor[] params, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor write_index, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, int heads, float eps, "
        "str activation) -> Tensor"
    ),
    # packed (varlen) attention, flash-attn layout. q (total_q, H, D), k/v (total_k, H_kv, D), cu_seqlens int32.
    # mode: 0 full, 1 causal (bottom-right aligned), 2 prefix. Returns out (total_q, H, D) in q's dtype and
    # lse (H, total_q) float32, +inf for rows with no visible key (their output is 0).
    # NOTE: max_seqlen_q/k are SymInt so that torch.compile(dynamic=True) keeps them symbolic (an `int` argument is
    # specialised, which recompiles the caller for every new longest segment), and the dropout seed is SymInt so a
    # seed drawn inside a compiled graph (an unbacked value) can be passed without a graph break. C++ kernels still
    # take int64_t.
    "packed_attention_fwd": (
        "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, SymInt max_seqlen_q, "
        "SymInt max_seqlen_k, int mode, Tensor? prefix_lens, float softmax_scale, float dropout_p, SymInt seed, "
        "int offset) -> (Tensor, Tensor)"
    ),
    # Gradients (dq, dk, dv) in the dtypes of q, k, v.
    "packed_attention_bwd": (
        "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens_q, "
        "Tensor cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, int mode, Tensor? prefix_lens, "
        "float softmax_scale, float dropout_p, SymInt seed, int offset) -> (Tensor, Tensor, Tensor)"
    ),
    # Host-side tile schedule for the Triton kernels (kernels/packed_attention.py): int32 (segments + total //
    # block_size, 2) rows (segment, tile start in the segment), unused rows (-1, -1).
    "packed_attention_schedule": "(Tensor cu_seqlens, int total, int block_size) -> Tensor",
    # fused linear cross-entropy: loss of cross_entropy(hidden @ weight.T + bias, labels) one chunk of rows of
    # logits at a time. reduction: 0 none, 1 sum, 2 mean. Returns (loss: scalar or (N,), loss_rows (N,), lse (N,),
    # argmax (N,) int64, dhidden, dweight, dbias) -- the gradients of `loss` (reduction 1/2, when compute_grad;
    # empty tensors otherwise), float32 (float64 for float64 inputs).
    "fused_linear_cross_entropy_fwd": (
        "(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, int ignore_index, float label_smoothing, "
        "int reduction, bool compute_grad, int chunk_rows) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    # Gradients for reduction none: grad_rows (N,) weights each row's gradient; recomputes the logits chunk by chunk.
    "fused_linear_cross_entropy_bwd": (
        "(Tensor grad_rows, Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor lse, int ignore_index, "
        "float label_smoothing, int chunk_rows) -> (Tensor, Tensor, Tensor)"
    ),
}

_lib = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _lib.define(_name + _schema)


def op(name: str) -> torch._ops.OpOverload:
    """The default overload of ``mmcore::<name>``."""
    return getattr(getattr(torch.ops, NAMESPACE), name).default


# Ops whose only kernels are Triton kernels are defined with torch.library.triton_op beside their dispatch
# code (so torch.compile can see into the kernels); their schemas are inferred from the launchers' type
# annotations, which the launchers in kernels/ keep exact.


def triton_kernels(module: str):
    """``mmcore.kernels.<module>``, or None where Triton (or that module) is not installed."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("triton") is None or importlib.util.find_spec(f"mmcore.kernels.{module}") is None:
        return None
    return importlib.import_module(f"mmcore.kernels.{module}")


def triton_op_with_backward(name: str, fwd, fwd_fake, bwd, bwd_fake, autograd_for):
    """Define ``mmcore::<name>_fwd_triton`` and ``mmcore::<name>_bwd_triton`` from two launchers with
    torch.library.triton_op, give both explicit fakes and register the forward's autograd from
    ``autograd_for(bwd_op) -> (setup_context, backward)``. Returns the forward op.

    NOTE: explicit fakes because under TRITON_INTERPRET=1 wrap_triton hands back the interpreter, which cannot
    run on fake tensors, so the traced launchers cannot serve as meta kernels there."""
    bwd_op = torch.library.triton_op(f"{NAMESPACE}::{name}_bwd_triton", bwd, mutates_args=())
    bwd_op.register_fake(bwd_fake)
    fwd_op = torch.library.triton_op(f"{NAMESPACE}::{name}_fwd_triton", fwd, mutates_args=())
    fwd_op.register_fake(fwd_fake)
    setup, backward = autograd_for(bwd_op)
    fwd_op.register_autograd(backward, setup_context=setup)
    return fwd_op
