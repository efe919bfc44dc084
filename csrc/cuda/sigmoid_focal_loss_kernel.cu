// CUDA entry of focal_cuda::sigmoid_focal_loss_forward: checks, outputs, then the launcher of the
// input's dtype (sigmoid_focal_loss_launch.h, compiled per dtype in sigmoid_focal_loss_<dtype>.cu).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <string>

#include "sigmoid_focal_loss_launch.h"

namespace focal_cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sigmoid_focal_loss_forward_cuda(
    const at::Tensor& input, const at::Tensor& target, double alpha, double gamma, int64_t ignore_index,
    int64_t reduction, const std::optional<at::Tensor>& normalizer, bool compute_grad, bool inplace_backward,
    at::ArrayRef<double> gamma_thresholds, at::ArrayRef<double> gamma_values, std::optional<at::ScalarType> loss_dtype,
    int64_t class_dim) {
  (void)inplace_backward;  // read by the autograd formula (focal_cuda/_ops.py) only
  const c10::cuda::CUDAGuard device_guard(input.device());
  auto plan = plan_sigmoid_focal_loss_forward(input, target, alpha, gamma, reduction, normalizer, compute_grad,
                                              gamma_thresholds, gamma_values, loss_dtype, class_dim);
  if (plan.index_targets) {
    TORCH_CHECK_VALUE(plan.classes < std::numeric_limits<int>::max(),
                      "sigmoid_focal_loss: index targets need fewer than 2^31 - 1 classes on CUDA, got inputs.shape=",
                      input.sizes());
    if (cuda_target_checks_enabled()) {
      check_targets_on_device(plan.target, plan.classes + 1, ignore_index, "sigmoid_focal_loss", "targets",
                              "0 <= targets <= " + std::to_string(plan.classes) + " (" +
                                  std::to_string(plan.classes) + " = background)");
    }
  }
  auto out = allocate_sigmoid_focal_loss_outputs(plan);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.input.scalar_type(), "sigmoid_focal_loss_forward_cuda", [&] {
    sigmoid_launch::sigmoid_focal_loss_forward_typed<typename DeviceScalar<scalar_t>::type>(
        plan, out, alpha, ignore_index, reduction, compute_grad, input);
  });
  return {out.loss, out.grad, out.state};
}

}  // namespace

TORCH_LIBRARY_IMPL(focal_cuda, CUDA, m) {
  m.impl("sigmoid_focal_loss_forward", &sigmoid_focal_loss_forward_cuda);
}

}  // namespace focal_cuda
