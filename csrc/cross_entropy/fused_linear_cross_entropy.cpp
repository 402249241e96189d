// Fused linear cross-entropy, CPU: the loss of cross_entropy(hidden @ weight.T + bias, labels) computed one
// chunk of rows at a time, so at most (chunk_rows, vocab) logits exist at once. Matrix products go to ATen
// (MKL); the gradient of a chunk is formed in place in its logits buffer.
//
// For reductions sum/mean with compute_grad, the gradients are accumulated during the forward pass (the
// Liger-Kernel scheme: no second pass over the vocabulary); reduction none recomputes the logits in
// fused_linear_cross_entropy_bwd_cpu with per-row weights.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

namespace mmcore::cross_entropy {
namespace {

enum Reduction : int64_t { kNone = 0, kSum = 1, kMean = 2 };

at::ScalarType compute_type(const at::Tensor& hidden) {
  return hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                  const at::Tensor& labels, int64_t chunk_rows) {
  TORCH_CHECK_VALUE(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
                    "hidden (N, H) and weight (V, H) must share H, got ", hidden.sizes(), " and ", weight.sizes());
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == hidden.size(0), "labels must have shape (",
                    hidden.size(0), ",), got ", labels.sizes());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong, "labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == weight.size(0)),
                    "bias must have shape (", weight.size(0), ",)");
  TORCH_CHECK_VALUE(chunk_rows >= 1, "chunk_rows must be >= 1, got ", chunk_rows);
  TORCH_CHECK_VALUE(hidden.device().is_cpu() && weight.device().is_cpu() && labels.device().is_cpu(),
                    "fused_linear_cross_entropy CPU kernel needs CPU tensors");
}

// Logits of rows [start, start + n) in the compute dtype: (n, V).
at::Tensor chunk_logits(const at::Tensor& h, const at::Tensor& w, const c10::optional<at::Tensor>& b) {
  return b.has_value() ? at::addmm(*b, h, w.t()) : at::mm(h, w.t());
}

// In place: softmax probabilities -> d(loss_i)/d(logits) for each row (weighted by row_weight, zero on
// ignored rows).
void probs_to_grad(at::Tensor& probs, const at::Tensor& safe_labels, const at::Tensor& row_weight, double eps) {
  const int64_t vocab = probs.size(1);
  probs.scatter_add_(1, safe_labels.unsqueeze(1), at::full({probs.size(0), 1}, -(1.0 - eps), probs.options()));
  if (eps > 0) probs.sub_(eps / static_cast<double>(vocab));
  probs.mul_(row_weight.unsqueeze(1));
}

// In place: logits -> softmax, one exp pass; returns the rows' log-sum-exp.
at::Tensor softmax_(at::Tensor& logits) {
  const at::Tensor row_max = std::get<0>(logits.max(1, /*keepdim=*/true));
  logits.sub_(row_max).exp_();
  const at::Tensor sum = logits.sum(1, /*keepdim=*/true);
  logits.div_(sum);
  return (row_max + sum.log()).squeeze(1);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
fused_linear_cross_entropy_fwd_cpu(const at::Tensor& hidden, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
                                   int64_t ignore_index, double label_smoothing, int64_t reduction, bool compute_grad,
                                   int64_t chunk_rows) {
  check_inputs(hidden, weight, bias, labels, chunk_rows);
  // NOTE: this kernel computes its own gradients; ATen must not record these products for autograd (the op's
  // autograd is registered in Python), and out= variants refuse inputs that require grad otherwise.
  at::NoGradGuard no_grad;
  TORCH_CHECK_VALUE(reduction >= kNone && reduction <= kMean, "reduction must be 0, 1 or 2, got ", reduction);
  const auto ct = compute_type(hidden);
  const int64_t n_rows = hidden.size(0), vocab = weight.size(0);
  const double eps = label_smoothing;
  const at::Tensor w = weight.to(ct).contiguous();
  const c10::optional<at::Tensor> b = bias.has_value() ? c10::optional<at::Tensor>(bias->to(ct)) : c10::nullopt;
  const at::Tensor valid = labels.ne(ignore_index);
  const int64_t n_valid = valid.sum().item<int64_t>();
  // NOTE: mean over zero valid rows is 0/0 = NaN, as in PyTorch; the gradients are then zero, not NaN.
  const double scale = reduction == kMean ? (n_valid > 0 ? 1.0 / static_cast<double>(n_valid) : 0.0) : 1.0;
  const bool grads = compute_grad && reduction != kNone;

  auto fopt = hidden.options().dtype(ct);
  at::Tensor loss_rows = at::empty({n_rows}, fopt);
  at::Tensor lse = at::empty({n_rows}, fopt);
  at::Tensor argmax = at::empty({n_rows}, labels.options());
  at::Tensor dh = grads ? at::empty({n_rows, hidden.size(1)}, fopt) : at::empty({0}, fopt);
  at::Tensor dw = grads ? at::zeros({vocab, hidden.size(1)}, fopt) : at::empty({0}, fopt);
  at::Tensor db = grads && b.has_value() ? at::zeros({vocab}, fopt) : at::empty({0}, fopt);

  for (int64_t start = 0; start < n_rows; start += chunk_rows) {
    const int64_t n = std::min(chunk_rows, n_rows - start);
    const at::Tensor h = hidden.narrow(0, start, n).to(ct);
    at::Tensor logits = chunk_logits(h, w, b);
    const at::Tensor ok = valid.narrow(0, start, n);
    const at::Tensor safe = at::where(ok, labels.narrow(0, start, n), 0);
    // What the loss needs from the raw logits, before the buffer becomes probabilities in place.
    const at::Tensor z_label = logits.gather(1, safe.unsqueeze(1)).squeeze(1);
    const at::Tensor z_mean = eps > 0 ? logits.mean({1}) : at::Tensor();
    argmax.narrow(0, start, n).copy_(logits.argmax(1));
    const at::Tensor lse_c = softmax_(logits);
    at::Tensor loss = lse_c - z_label;
    if (eps > 0) loss = loss.mul(1.0 - eps).add_((lse_c - z_mean).mul_(eps));
    loss_rows.narrow(0, start, n).copy_(loss.mul_(ok));
    lse.narrow(0, start, n).copy_(lse_c);
    if (grads) {
      probs_to_grad(logits, safe, ok.to(ct).mul_(scale), eps);
      at::Tensor dh_rows = dh.narrow(0, start, n);
      at::mm_out(dh_rows, logits, w);
      dw.addmm_(logits.t(), h);
      if (b.has_value()) db.add_(logits.sum(0));
    }
  }
  at::Tensor total = loss_rows.sum();
  // Outputs of a custom op may not alias one another: reduction none returns a copy of loss_rows.
  at::Tensor out = reduction == kNone ? loss_rows.clone()
                   : reduction == kSum ? total
                                       : total.div(static_cast<double>(n_valid));
  return {out, loss_rows, lse, argmax, dh, dw, db};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_cross_entropy_bwd_cpu(
    const at::Tensor& grad_rows, const at::Tensor& hidden, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const at::Tensor& labels, const at::Tensor& lse, int64_t ignore_index,
    double label_smoothing, int64_t chunk_rows) {
  check_inputs(hidden, weight, bias, labels, chunk_rows);
  TORCH_CHECK_VALUE(grad_rows.dim() == 1 && grad_rows.size(0) == hidden.size(0), "grad_rows must have shape (",
                    hidden.size(0), ",)");
  at::NoGradGuard no_grad;
  const auto ct = compute_type(hidden);
  const int64_t n_rows = hidden.size(0), vocab = weight.size(0);
  const at::Tensor w = weight.to(ct).contiguous();
  const c10::optional<at::Tensor> b = bias.has_value() ? c10::optional<at::Tensor>(bias->to(ct)) : c10::nullopt;
  const at::Tensor weights = grad_rows.to(ct).mul(labels.ne(ignore_index));
  auto fopt = hidden.options().dtype(ct);
  at::Tensor dh = at::empty({n_rows, hidden.size(1)}, fopt);
  at::Tensor dw = at::zeros({vocab, hidden.size(1)}, fopt);
  at::Tensor db = b.has_value() ? at::zeros({vocab}, fopt) : at::empty({0}, fopt);
  for (int64_t start = 0; start < n_rows; start += chunk_rows) {
    const int64_t n = std::min(chunk_rows, n_rows - start);
    const at::Tensor h = hidden.narrow(0, start, n).to(ct);
    at::Tensor logits = chunk_logits(h, w, b);
    const at::Tensor safe = at::where(labels.narrow(0, start, n).ne(ignore_index), labels.narrow(0, start, n), 0);
    logits.sub_(lse.narrow(0, start, n).to(ct).unsqueeze(1)).exp_();  // softmax from the forward's lse
    probs_to_grad(logits, safe, weights.narrow(0, start, n), label_smoothing);
    at::Tensor dh_rows = dh.narrow(0, start, n);
    at::mm_out(dh_rows, logits, w);
    dw.addmm_(logits.t(), h);
    if (b.has_value()) db.add_(logits.sum(0));
  }
  return {dh, dw, db};
}

// Schemas: mmcore/ops/_library.py.
TORCH_LIBRARY_IMPL(mmcore, CPU, m) {
  m.impl("fused_linear_cross_entropy_fwd", &fused_linear_cross_entropy_fwd_cpu);
  m.impl("fused_linear_cross_entropy_bwd", &fused_linear_cross_entropy_bwd_cpu);
}

}  // namespace mmcore::cross_entropy
