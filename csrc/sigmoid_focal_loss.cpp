#include "sigmoid_focal_loss.h"

#include <c10/util/accumulate.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace focal_cuda {

namespace {
const char* reduction_name(int64_t reduction) {
  return reduction == kReductionNone ? "none" : reduction == kReductionMean ? "mean" : "sum";
}
}  // namespace

SigmoidFocalForwardPlan plan_sigmoid_focal_loss_forward(
    const at::Tensor& input, const at::Tensor& target, double alpha, double gamma, int64_t reduction,
    const std::optional<at::Tensor>& normalizer, bool compute_grad, at::ArrayRef<double> gamma_thresholds,
    at::ArrayRef<double> gamma_values, std::optional<at::ScalarType> loss_dtype, int64_t class_dim) {
  const auto dtype = input.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                   "sigmoid_focal_loss: inputs must be float16, bfloat16, float32 or float64 logits, got inputs.dtype=",
                   dtype);
  TORCH_CHECK_VALUE(target.device() == input.device(), "sigmoid_focal_loss: targets must be on the inputs' device ",
                    input.device(), ", got targets.device=", target.device());
  TORCH_CHECK_VALUE(std::isfinite(alpha), "sigmoid_focal_loss: alpha must be finite, got alpha=", alpha);
  TORCH_CHECK_VALUE(reduction == kReductionNone || reduction == kReductionMean || reduction == kReductionSum,
                    "sigmoid_focal_loss: reduction must be 0 (none), 1 (mean) or 2 (sum), got reduction=", reduction);

  SigmoidFocalForwardPlan plan;
  plan.gamma_schedule = plan_gamma_schedule(gamma, gamma_thresholds, gamma_values, "sigmoid_focal_loss");
  plan.loss_dtype = plan_loss_dtype(dtype, loss_dtype, "sigmoid_focal_loss");
  const int64_t last_dim = std::max<int64_t>(input.dim() - 1, 0);
  TORCH_CHECK_VALUE(class_dim == -1 || class_dim == last_dim || (class_dim == 1 && input.dim() >= 2),
                    "sigmoid_focal_loss: class_dim must be -1 (classes last) or 1 (channel-first (N, C, d1, ..., dk)), "
                    "got class_dim=", class_dim, " for inputs.shape=", input.sizes());
  plan.class_dim = class_dim == -1 ? last_dim : class_dim;
  plan.index_targets = !at::isFloatingType(target.scalar_type());
  TORCH_CHECK_VALUE(input.dim() >= 1 || !plan.index_targets, "sigmoid_focal_loss: index targets need inputs with a "
                    "class dim (classes last), got inputs.shape=", input.sizes());
  const auto index_shape = input.sizes().slice(0, std::max<int64_t>(input.dim() - 1, 0));
  if (plan.index_targets) {
    plan.target_kind = target_kind_of(target, "sigmoid_focal_loss", "targets");
    TORCH_CHECK_VALUE(target.sizes() == index_shape, "sigmoid_focal_loss: integer targets are class indices of shape "
                      "inputs.shape[:-1]=", index_shape, " (for dense targets pass a floating tensor of the inputs' "
                      "shape), got targets.shape=", target.sizes());
    plan.target = target.contiguous();
  } else {
    TORCH_CHECK_VALUE(target.sizes() == input.sizes(), "sigmoid_focal_loss: floating targets are dense and must have "
                      "the inputs' shape ", input.sizes(), " (for class indices pass an integer tensor of shape ",
                      index_shape, "), got targets.shape=", target.sizes());
    // Read as they are in the input's or the accumulation dtype; any other dtype is
    // converted to the accumulation dtype, which loses nothing.
    const auto acc = accumulation_type(dtype);
    plan.target = (target.scalar_type() == dtype || target.scalar_type() == acc) ? target.contiguous()
                                                                                 : target.to(acc).contiguous();
  }
  if (normalizer.has_value()) {
    const auto& n = *normalizer;
    TORCH_CHECK_VALUE(reduction == kReductionMean, "sigmoid_focal_loss: normalizer is only allowed with "
                      "reduction='mean' (it replaces the mean's denominator), got reduction='",
                      reduction_name(reduction), "'");
    TORCH_CHECK_VALUE(n.dim() == 0, "sigmoid_focal_loss: normalizer must be a number or a 0-dim tensor, got "
                      "normalizer.shape=", n.sizes());
    TORCH_CHECK_TYPE(!n.is_complex() && n.scalar_type() != at::kBool, "sigmoid_focal_loss: normalizer must be a "
                     "real number, got normalizer.dtype=", n.scalar_type());
    TORCH_CHECK_VALUE(n.device() == input.device() || n.is_cpu(), "sigmoid_focal_loss: normalizer must be on the "
                      "inputs' device ", input.device(), " or a CPU scalar, got normalizer.device=", n.device());
    if (n.is_cpu()) {
      plan.host_normalizer = n.item<double>();  // a CPU tensor: no device synchronisation
    } else {
      plan.device_normalizer = n.to(accumulation_type(dtype));
    }
  }
  TORCH_CHECK_NOT_IMPLEMENTED(plan.class_dim == last_dim || !plan.index_targets,
                              "sigmoid_focal_loss: index targets with class_dim=1 are not implemented yet");
  plan.input = input.contiguous();
  plan.classes = input.dim() >= 1 ? input.size(-1) : 1;  // a 0-dim dense input is one element
  plan.rows = c10::multiply_integers(index_shape);
  plan.reduction = reduction;
  plan.compute_grad = compute_grad;
  plan.use_alpha = alpha >= 0.0;
  plan.fold_mean_into_forward = compute_grad && reduction == kReductionMean && dtype != at::kHalf;
  return plan;
}

SigmoidFocalForwardOutputs allocate_sigmoid_focal_loss_outputs(const SigmoidFocalForwardPlan& plan) {
  const auto& input = plan.input;
  SigmoidFocalForwardOutputs out;
  const auto loss_options = input.options().dtype(plan.loss_dtype);
  out.loss = plan.reduction == kReductionNone ? at::empty(input.sizes(), loss_options) : at::empty({}, loss_options);
  out.grad = plan.compute_grad ? empty_gradient_like(input) : at::empty({0}, input.options());
  out.state = at::empty({3}, input.options().dtype(accumulation_type(input.scalar_type())));
  return out;
}

}  // namespace focal_cuda
