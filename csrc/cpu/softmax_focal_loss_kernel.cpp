// CPU implementation of focal_cuda::softmax_focal_loss_forward.
//
// One pass over the logits computes loss, reduction and gradient. Work is cut
// into fixed chunks of positions (independent of the thread count), each chunk
// yields a partial sum, and the partials are added in chunk order: the result is
// bitwise identical for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "../focal_loss_math.h"
#include "../softmax_focal_loss.h"
#include "softmax_focal_loss_cpu.h"

namespace focal_cuda {
namespace {

// Counts the non-ignored targets; raises for an out-of-range one before any output is written.
int64_t scan_targets(const SoftmaxFocalForwardPlan& plan, int64_t ignore_index) {
  return scan_class_targets(plan.target.const_data_ptr(), plan.target_kind, plan.geometry.positions(),
                            plan.geometry.classes, ignore_index, "softmax_focal_loss", "target",
                            "0 <= target < " + std::to_string(plan.geometry.classes) + " (the number of classes)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_focal_loss_forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& class_weight, double alpha,
    double gamma, int64_t ignore_index, int64_t reduction, bool compute_grad, bool inplace_backward,
    at::ArrayRef<double> gamma_thresholds, at::ArrayRef<double> gamma_values, std::optional<at::ScalarType> loss_dtype) {
  (void)inplace_backward;  // read by the autograd formula (focal_cuda/_ops.py) only
  auto plan = plan_softmax_focal_loss_forward(input, target, class_weight, alpha, gamma, ignore_index, reduction,
                                              compute_grad, gamma_thresholds, gamma_values, loss_dtype);
  const int64_t valid = scan_targets(plan, ignore_index);
  auto out = allocate_softmax_focal_loss_outputs(plan);
  const MeanDenominator denominator{static_cast<double>(valid), false};
  const GradientScales scales = gradient_scales(reduction, denominator, plan.fold_mean_into_forward);

  std::vector<double> partial;
  if (cpu_has_avx2()) {
    avx2::softmax_focal_loss_forward_chunks(plan, out, alpha, gamma, ignore_index, scales.forward, partial);
  } else {
    baseline::softmax_focal_loss_forward_chunks(plan, out, alpha, gamma, ignore_index, scales.forward, partial);
  }
  finish_forward(out.loss, out.state, partial, reduction, denominator, scales);
  return {out.loss, out.grad, out.state};
}

}  // namespace

TORCH_LIBRARY_IMPL(focal_cuda, CPU, m) {
  m.impl("softmax_focal_loss_forward", &softmax_focal_loss_forward_cpu);
}

}  // namespace focal_cuda
