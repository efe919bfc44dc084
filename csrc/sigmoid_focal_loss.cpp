#include "sigmoid_focal_loss.h"

#include "softmax_focal_loss.h"  // collapse_to_ncs_strides

#include <c10/util/accumulate.h>

#include <algorithm>
#include <string>
#include <tuple>
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
                    "class dim, got inputs.shape=", input.sizes());
  // The index targets' shape: the inputs' without the class dim.
  std::vector<int64_t> index_shape;
  for (int64_t d = 0; d < input.dim(); ++d) {
    if (d != plan.class_dim) index_shape.push_back(input.size(d));
  }
  const bool channel_first = plan.class_dim != last_dim;
  if (plan.index_targets) {
    plan.target_kind = target_kind_of(target, "sigmoid_focal_loss", "targets");
    TORCH_CHECK_VALUE(target.sizes() == at::IntArrayRef(index_shape), "sigmoid_focal_loss: integer targets are "
                      "class indices of the inputs' shape without class_dim=", class_dim, ": ",
                      at::IntArrayRef(index_shape), " (for dense targets pass a floating tensor of the inputs' shape), "
                      "got targets.shape=", target.sizes());
    plan.target = target.contiguous();
    plan.classes = input.size(plan.class_dim);
    plan.rows = c10::multiply_integers(index_shape);
    plan.input = input.contiguous();
    if (channel_first) {
      // (N, C, d1..dk): read in place when dense channels_last (every position's classes
      // contiguous, positions in the targets' order: rows with the classes last) or
      // contiguous channel-first; any other layout is made contiguous once.
      plan.spatial = plan.rows / std::max<int64_t>(input.size(0), 1);
      const auto strides = collapse_to_ncs_strides(input);
      const int64_t C = plan.classes, S = plan.spatial;
      const bool rows_layout = strides.has_value() && std::get<1>(*strides) == 1 &&
                               (S == 1 || std::get<2>(*strides) == C) && std::get<0>(*strides) == C * S;
      if (rows_layout) {
        plan.input = input;
        plan.spatial = 1;  // classes-last rows, in the targets' order
      } else {
        plan.input = input.contiguous();  // channel-first, dense (N, C, S)
      }
    }
  } else {
    TORCH_CHECK_VALUE(target.sizes() == input.sizes(), "sigmoid_focal_loss: floating targets are dense and must have "
                      "the inputs' shape ", input.sizes(), " (for class indices pass an integer tensor of shape ",
                      at::IntArrayRef(index_shape), "), got targets.shape=", target.sizes());
    // Elementwise: read in place when the logits are dense (contiguous, channels_last, ...)
    // and the targets share their strides; otherwise both are made contiguous once. Read as
    // they are in the input's or the accumulation dtype; any other dtype is converted to the
    // accumulation dtype, which loses nothing.
    const auto acc = accumulation_type(dtype);
    const bool same_dtype = target.scalar_type() == dtype || target.scalar_type() == acc;
    const bool in_place = input.is_non_overlapping_and_dense() && target.strides() == input.strides();
    plan.input = in_place ? input : input.contiguous();
    plan.target = same_dtype ? (in_place ? target : target.contiguous())
                             : (in_place ? target.to(acc) : target.to(acc).contiguous());
    plan.classes = input.dim() >= 1 ? input.size(last_dim) : 1;  // a 0-dim dense input is one element
    plan.rows = input.dim() >= 1 ? input.numel() / std::max<int64_t>(plan.classes, 1) : 1;
  }
  if (normalizer.has_value()) {
    const auto& n = *normalizer;
    TORCH_CHECK_VALUE(reduction == kReductionMean, "sigmoid_focal_loss: normalizer is only allowed with "
                      "reduction='mean' (it replaces the mean's denominator), got reduction='",
                      reduction_name(reduction), "'");
    TORCH_CHECK_TYPE(!n.is_complex() && n.scalar_type() != at::kBool, "sigmoid_focal_loss: normalizer must be a "
                     "real number, got normalizer.dtype=", n.scalar_type());
    if (n.dim() == 1) {
      // One per image: the loss is sum over images b of (image b's summed loss) / normalizer[b].
      TORCH_CHECK_VALUE(input.dim() >= 2 && n.size(0) == input.size(0), "sigmoid_focal_loss: a 1-D normalizer holds "
                        "one value per image (inputs.shape[0]", input.dim() >= 1 ? "=" : "",
                        input.dim() >= 1 ? std::to_string(input.size(0)) : std::string(), "), got normalizer.shape=",
                        n.sizes(), " for inputs.shape=", input.sizes());
      TORCH_CHECK_VALUE(n.device() == input.device(), "sigmoid_focal_loss: a per-image normalizer must be on the "
                        "inputs' device ", input.device(), ", got normalizer.device=", n.device());
      plan.image_normalizer = n.to(accumulation_type(dtype)).contiguous();
    } else {
      TORCH_CHECK_VALUE(n.dim() == 0, "sigmoid_focal_loss: normalizer must be a number, a 0-dim tensor or one value "
                        "per image, got normalizer.shape=", n.sizes());
      TORCH_CHECK_VALUE(n.device() == input.device() || n.is_cpu(), "sigmoid_focal_loss: normalizer must be on the "
                        "inputs' device ", input.device(), " or a CPU scalar, got normalizer.device=", n.device());
      if (n.is_cpu()) {
        plan.host_normalizer = n.item<double>();  // a CPU tensor: no device synchronisation
      } else {
        plan.device_normalizer = n.to(accumulation_type(dtype));
      }
    }
  }
  plan.reduction = reduction;
  plan.compute_grad = compute_grad;
  plan.use_alpha = alpha >= 0.0;
  plan.images = input.dim() >= 1 ? input.size(0) : 1;
  if (plan.image_normalizer.has_value() && plan.images > 1 &&
      plan.input.stride(0) * plan.images != plan.input.numel()) {
    // Per-image normalizers need each image's elements together (the batch dim outermost).
    plan.input = plan.input.contiguous();
    if (!plan.index_targets) plan.target = plan.target.contiguous();
    plan.spatial = plan.index_targets && plan.class_dim != last_dim ? plan.rows / plan.images : plan.spatial;
  }
  // Per-image normalizers are small (counts of positives): folded for float16 too.
  plan.fold_mean_into_forward =
      compute_grad && reduction == kReductionMean && (dtype != at::kHalf || plan.image_normalizer.has_value());
  return plan;
}

SigmoidFocalForwardOutputs allocate_sigmoid_focal_loss_outputs(const SigmoidFocalForwardPlan& plan) {
  const auto& input = plan.input;
  SigmoidFocalForwardOutputs out;
  const auto loss_options = input.options().dtype(plan.loss_dtype);
  // Per-element outputs in the layout the kernels walk: the input's (dense) strides.
  out.loss = plan.reduction == kReductionNone ? at::empty_like(input, loss_options, at::MemoryFormat::Preserve)
                                              : at::empty({}, loss_options);
  out.grad = plan.compute_grad ? empty_gradient_like(input) : at::empty({0}, input.options());
  out.state = at::empty({3}, input.options().dtype(accumulation_type(input.scalar_type())));
  return out;
}

}  // namespace focal_cuda
