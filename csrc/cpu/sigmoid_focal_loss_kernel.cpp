// CPU implementation of focal_cuda::sigmoid_focal_loss_forward.
//
// One pass over the logits computes loss, reduction and gradient, in fixed
// chunks of whole rows whose partial sums are added in chunk order: the result
// is bitwise identical for any number of threads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "../sigmoid_focal_loss.h"
#include "focal_loss_cpu.h"

namespace focal_cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sigmoid_focal_loss_forward_cpu(
    const at::Tensor& input, const at::Tensor& target, double alpha, double gamma, int64_t ignore_index,
    int64_t reduction, const std::optional<at::Tensor>& normalizer, bool compute_grad, bool inplace_backward) {
  (void)inplace_backward;  // read by the autograd formula (focal_cuda/_ops.py) only
  auto plan = plan_sigmoid_focal_loss_forward(input, target, alpha, gamma, ignore_index, reduction, normalizer,
                                              compute_grad);
  TORCH_INTERNAL_ASSERT(!plan.device_normalizer.has_value());  // a CPU input takes CPU normalizers only
  int64_t valid_rows = plan.rows;
  if (plan.index_targets) {
    valid_rows = scan_class_targets(plan.target.const_data_ptr(), plan.target_kind, plan.target.numel(),
                                    plan.classes + 1, ignore_index, "sigmoid_focal_loss", "targets",
                                    "0 <= targets <= " + std::to_string(plan.classes) + " (" +
                                        std::to_string(plan.classes) + " = background)");
  }
  auto out = allocate_sigmoid_focal_loss_outputs(plan);
  // The denominator of "mean": the normalizer as given, else the element count
  // (dense) or non-ignored rows x classes (index), with 0 giving a zero loss.
  const bool mean = reduction == kReductionMean;
  const bool as_given = plan.host_normalizer.has_value();
  const double denominator = as_given ? *plan.host_normalizer
                                      : static_cast<double>(plan.index_targets ? valid_rows * plan.classes
                                                                               : plan.numel());
  const double inverse = as_given ? 1.0 / denominator : (denominator > 0 ? 1.0 / denominator : 0.0);
  const double forward_scale = plan.fold_mean_into_forward ? inverse : 1.0;
  const double backward_scale = (mean && !plan.fold_mean_into_forward) ? inverse : 1.0;

  std::vector<double> partial;
  if (cpu_has_avx2()) {
    avx2::sigmoid_focal_loss_forward_chunks(plan, out, alpha, gamma, ignore_index, forward_scale, partial);
  } else {
    baseline::sigmoid_focal_loss_forward_chunks(plan, out, alpha, gamma, ignore_index, forward_scale, partial);
  }
  finish_forward(out.loss, out.state, partial, reduction, denominator, as_given, forward_scale, backward_scale);
  return {out.loss, out.grad, out.state};
}

}  // namespace

TORCH_LIBRARY_IMPL(focal_cuda, CPU, m) {
  m.impl("sigmoid_focal_loss_forward", &sigmoid_focal_loss_forward_cpu);
}

}  // namespace focal_cuda
