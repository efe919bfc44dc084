// CUDA entry of focal_cuda::softmax_focal_loss_forward: checks, outputs, then the launcher of the
// input's dtype (softmax_focal_loss_launch.h, compiled per dtype in softmax_focal_loss_<dtype>.cu).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <string>

#include "softmax_focal_loss_launch.h"

namespace focal_cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_focal_loss_forward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& class_weight, double alpha,
    double gamma, int64_t ignore_index, int64_t reduction, bool compute_grad, bool inplace_backward,
    at::ArrayRef<double> gamma_thresholds, at::ArrayRef<double> gamma_values, std::optional<at::ScalarType> loss_dtype) {
  (void)inplace_backward;  // read by the autograd formula (focal_cuda/_ops.py) only
  auto plan = plan_softmax_focal_loss_forward(input, target, class_weight, alpha, gamma, ignore_index, reduction,
                                              compute_grad, gamma_thresholds, gamma_values, loss_dtype);
  const c10::cuda::CUDAGuard device_guard(input.device());
  TORCH_CHECK_VALUE(plan.geometry.classes <= std::numeric_limits<int>::max(),
                    "softmax_focal_loss: at most 2^31 - 1 classes on CUDA, got input.shape=", input.sizes());
  if (cuda_target_checks_enabled()) {
    check_targets_on_device(plan.target, plan.geometry.classes, ignore_index, "softmax_focal_loss", "target",
                            "0 <= target < " + std::to_string(plan.geometry.classes) + " (the number of classes)");
  }
  auto out = allocate_softmax_focal_loss_outputs(plan);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.input.scalar_type(), "softmax_focal_loss_forward_cuda", [&] {
    softmax_launch::softmax_focal_loss_forward_typed<typename DeviceScalar<scalar_t>::type>(
        plan, out, alpha, ignore_index, reduction, compute_grad, input);
  });
  return {out.loss, out.grad, out.state};
}

}  // namespace

TORCH_LIBRARY_IMPL(focal_cuda, CUDA, m) {
  m.impl("softmax_focal_loss_forward", &softmax_focal_loss_forward_cuda);
}

}  // namespace focal_cuda
