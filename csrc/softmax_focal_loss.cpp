#include "softmax_focal_loss.h"

#include <cmath>

namespace focal_cuda {

std::optional<std::tuple<int64_t, int64_t, int64_t>> collapse_to_ncs_strides(const at::Tensor& t) {
  const int64_t dims = t.dim();
  const int64_t stride_n = t.stride(0);
  const int64_t stride_c = t.stride(1);
  if (t.numel() == 0) return std::make_tuple(stride_n, stride_c, int64_t(0));  // nothing is read
  // Spatial dims d2..dk collapse when each stride equals the next one times its size
  // (size-1 dims are free). The collapsed stride is the innermost non-trivial one;
  // with no spatial extent it is never used, and 0 keeps alignment checks simple.
  int64_t inner_stride = 0;
  bool have_inner = false;
  int64_t expected = 0;
  for (int64_t d = dims - 1; d >= 2; --d) {
    if (t.size(d) == 1) continue;
    if (!have_inner) {
      inner_stride = t.stride(d);
      expected = inner_stride * t.size(d);
      have_inner = true;
    } else {
      if (t.stride(d) != expected) return std::nullopt;
      expected *= t.size(d);
    }
  }
  return std::make_tuple(stride_n, stride_c, inner_stride);
}

SoftmaxFocalForwardPlan plan_softmax_focal_loss_forward(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
    double alpha, double gamma, int64_t ignore_index, int64_t reduction, bool compute_grad,
    at::ArrayRef<double> gamma_thresholds, at::ArrayRef<double> gamma_values,
    std::optional<at::ScalarType> loss_dtype) {
  const auto dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "softmax_focal_loss: input must be float16, bfloat16, float32 or float64 logits, got input.dtype=",
                   dtype);
  TORCH_CHECK_VALUE(input.dim() >= 2, "softmax_focal_loss: input must have shape (N, C) or (N, C, d1, ..., dk), got input.shape=",
                    input.sizes());
  TORCH_CHECK_VALUE(input.size(1) >= 1 || input.numel() == 0,
                    "softmax_focal_loss: input must have at least one class, got input.shape=", input.sizes());
  SoftmaxFocalForwardPlan plan;
  plan.target_kind = target_kind_of(target, "softmax_focal_loss", "target");
  std::vector<int64_t> expected_target_shape{input.size(0)};
  for (int64_t d = 2; d < input.dim(); ++d) expected_target_shape.push_back(input.size(d));
  TORCH_CHECK_VALUE(target.sizes() == at::IntArrayRef(expected_target_shape),
                    "softmax_focal_loss: target must have shape ", at::IntArrayRef(expected_target_shape),
                    " for input.shape=", input.sizes(), ", got target.shape=", target.sizes());
  TORCH_CHECK_VALUE(target.device() == input.device(), "softmax_focal_loss: target must be on the input's device ",
                    input.device(), ", got target.device=", target.device());
  plan.gamma_schedule = plan_gamma_schedule(gamma, gamma_thresholds, gamma_values, "softmax_focal_loss");
  plan.loss_dtype = plan_loss_dtype(dtype, loss_dtype, "softmax_focal_loss");
  TORCH_CHECK_VALUE(std::isfinite(alpha), "softmax_focal_loss: alpha must be finite, got alpha=", alpha);
  TORCH_CHECK_VALUE(reduction == kReductionNone || reduction == kReductionMean || reduction == kReductionSum,
                    "softmax_focal_loss: reduction must be 0 (none), 1 (mean) or 2 (sum), got reduction=", reduction);
  const int64_t classes = input.size(1);
  if (class_weight.has_value()) {
    const auto& w = *class_weight;
    TORCH_CHECK_VALUE(w.dim() == 1 && w.size(0) == classes,
                      "softmax_focal_loss: alpha must hold one weight per class (", classes,
                      "), got alpha.shape=", w.sizes());
    TORCH_CHECK_VALUE(w.device() == input.device(), "softmax_focal_loss: alpha must be on the input's device ",
                      input.device(), ", got alpha.device=", w.device());
    TORCH_CHECK_TYPE(at::isFloatingType(w.scalar_type()),
                     "softmax_focal_loss: alpha must be a floating-point tensor, got alpha.dtype=", w.scalar_type());
    // CUDA reads float32 / float64 weights as they are, any stride (no per-call copy or
    // host synchronisation); the CPU kernels take a contiguous copy in their own dtype.
    const bool as_is = w.is_cuda() && (w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble);
    plan.class_weight = as_is ? w : w.to(accumulation_type(dtype)).contiguous();
  }

  auto strides = collapse_to_ncs_strides(input);
  plan.input = strides.has_value() ? input : input.contiguous();
  if (!strides.has_value()) strides = collapse_to_ncs_strides(plan.input);
  plan.target = target.contiguous();

  auto& g = plan.geometry;
  g.rows = input.size(0);
  g.classes = classes;
  g.spatial = 1;
  for (int64_t d = 2; d < input.dim(); ++d) g.spatial *= input.size(d);
  std::tie(g.input_stride_n, g.input_stride_c, g.input_stride_s) = *strides;
  plan.reduction = reduction;
  plan.compute_grad = compute_grad;
  plan.fold_mean_into_forward = compute_grad && reduction == kReductionMean && dtype != at::kHalf;
  return plan;
}

SoftmaxFocalForwardOutputs allocate_softmax_focal_loss_outputs(SoftmaxFocalForwardPlan& plan) {
  const auto& input = plan.input;
  SoftmaxFocalForwardOutputs out;
  if (plan.reduction == kReductionNone) {
    out.loss = at::empty(plan.target.sizes(), input.options().dtype(plan.loss_dtype));
  } else {
    out.loss = at::empty({}, input.options().dtype(plan.loss_dtype));
  }
  if (plan.compute_grad) {
    // Same layout as the logits (dense strides are preserved), so the gradient pass
    // writes in the order it reads.
    out.grad = empty_gradient_like(input);
    auto strides = collapse_to_ncs_strides(out.grad);
    TORCH_INTERNAL_ASSERT(strides.has_value());
    auto& g = plan.geometry;
    std::tie(g.grad_stride_n, g.grad_stride_c, g.grad_stride_s) = *strides;
  } else {
    out.grad = at::empty({0}, input.options());
  }
  out.state = at::empty({3}, input.options().dtype(accumulation_type(input.scalar_type())));
  return out;
}

}  // namespace focal_cuda
