#include "focal_loss.h"

#include <vector>

namespace focal_cuda {

at::ScalarType accumulation_type(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

TargetKind target_kind_of(const at::Tensor& target, const char* op, const char* what) {
  switch (target.scalar_type()) {
    case at::kByte:
      return kTargetUInt8;
    case at::kShort:
      return kTargetInt16;
    case at::kInt:
      return kTargetInt32;
    case at::kLong:
      return kTargetInt64;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", what, " must be an integer tensor of class indices (int64, int32, int16 or "
                       "uint8), got ", what, ".dtype=", target.scalar_type());
  }
  return kTargetInt64;
}

GradOutputLayout check_focal_loss_backward(const at::Tensor& grad_input, const at::Tensor& state,
                                           const at::Tensor& grad_output) {
  TORCH_CHECK_VALUE(state.dim() == 1 && state.size(0) == 3,
                    "focal_loss_backward: state must be the (3,) tensor returned by the forward, got state.shape=",
                    state.sizes());
  TORCH_CHECK_VALUE(grad_input.dim() >= 1,
                    "focal_loss_backward: grad_input must be the gradient buffer returned by a forward with "
                    "compute_grad=True, got grad_input.shape=", grad_input.sizes());
  TORCH_CHECK_VALUE(state.device() == grad_input.device(), "focal_loss_backward: state must be on ",
                    grad_input.device(), ", got state.device=", state.device());
  TORCH_CHECK_VALUE(grad_output.device() == grad_input.device(), "focal_loss_backward: grad_output must be on ",
                    grad_input.device(), ", got grad_output.device=", grad_output.device());
  TORCH_CHECK_TYPE(at::isFloatingType(grad_output.scalar_type()),
                   "focal_loss_backward: grad_output must be floating point, got grad_output.dtype=",
                   grad_output.scalar_type());
  if (grad_output.dim() == 0) return GradOutputLayout::kScalar;
  if (grad_output.sizes() == grad_input.sizes()) return GradOutputLayout::kElementwise;
  std::vector<int64_t> per_position;
  if (grad_input.dim() >= 2) {
    per_position.push_back(grad_input.size(0));
    for (int64_t d = 2; d < grad_input.dim(); ++d) per_position.push_back(grad_input.size(d));
  }
  TORCH_CHECK_VALUE(grad_input.dim() >= 2 && grad_output.sizes() == at::IntArrayRef(per_position),
                    "focal_loss_backward: grad_output must be a scalar, have grad_input's shape ", grad_input.sizes(),
                    " or that shape without dim 1 ", at::IntArrayRef(per_position), ", got grad_output.shape=",
                    grad_output.sizes());
  return GradOutputLayout::kPerPosition;
}

}  // namespace focal_cuda
