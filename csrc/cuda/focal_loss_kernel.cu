// CUDA implementations of the backward ops shared by both losses:
// focal_loss_backward_ (in place) and focal_loss_backward (a new tensor).
// Device code lives in focal_loss_kernels.cuh.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../focal_loss.h"
#include "../softmax_focal_loss.h"
#include "focal_loss_kernels.cuh"
#include "launch_utils.h"

namespace focal_cuda {
namespace {

int device_layout(GradOutputLayout layout) {
  switch (layout) {
    case GradOutputLayout::kScalar:
      return device::kGradOutputScalar;
    case GradOutputLayout::kElementwise:
      return device::kGradOutputElementwise;
    case GradOutputLayout::kPerPosition:
    default:
      return device::kGradOutputPerPosition;
  }
}

// out = grad_input * grad_output * state[1]; out may be grad_input itself.
void launch_backward(const at::Tensor& grad_input, at::Tensor& out, const at::Tensor& state,
                     const at::Tensor& grad_output, GradOutputLayout layout) {
  TORCH_CHECK(grad_input.is_non_overlapping_and_dense() && out.strides() == grad_input.strides(),
              "focal_loss_backward: grad_input must be the dense gradient buffer returned by the forward");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // Scalar and elementwise layouts walk the storage: (numel, 1, 1). Per position: (N, C, S).
  device::Geometry g{};
  g.rows = grad_input.numel();
  g.classes = 1;
  g.spatial = 1;
  if (layout == GradOutputLayout::kPerPosition) {
    const auto strides = collapse_to_ncs_strides(grad_input);
    TORCH_CHECK(strides.has_value(), "focal_loss_backward: grad_input must be the gradient buffer returned by the forward");
    g.rows = grad_input.size(0);
    g.classes = grad_input.size(1);
    for (int64_t d = 2; d < grad_input.dim(); ++d) g.spatial *= grad_input.size(d);
    std::tie(g.grad_stride_n, g.grad_stride_c, g.grad_stride_s) = *strides;
  }
  auto go = grad_output.to(grad_input.scalar_type());
  if (layout == GradOutputLayout::kElementwise) {
    // Walked together with the gradient's storage: give it the gradient's strides.
    if (go.strides() != grad_input.strides()) go = at::empty_like(grad_input).copy_(go);
  } else {
    go = go.contiguous();
  }
  const int64_t total = grad_input.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_input.scalar_type(), "focal_loss_backward_cuda", [&] {
    using dev_t = typename DeviceScalar<scalar_t>::type;
    using acc_t = typename device::AccumulateType<dev_t>::type;
    constexpr int kVec = 16 / sizeof(dev_t);
    const auto* in_ptr = reinterpret_cast<const dev_t*>(grad_input.const_data_ptr());
    auto* out_ptr = reinterpret_cast<dev_t*>(out.data_ptr());
    const auto* go_ptr = reinterpret_cast<const dev_t*>(go.const_data_ptr());
    const auto* state_ptr = state.const_data_ptr<acc_t>();
    const int mode = device_layout(layout);
    const bool vectorizable = layout != GradOutputLayout::kPerPosition && aligned_16(in_ptr) && aligned_16(out_ptr) &&
                              (layout == GradOutputLayout::kScalar || aligned_16(go_ptr));
    auto launch = [&](auto kernel, int64_t work_per_block) {
      const int64_t grid = resident_grid(kernel, device::kBlock, 0, (total + work_per_block - 1) / work_per_block);
      kernel<<<grid, device::kBlock, 0, stream>>>(in_ptr, out_ptr, g, go_ptr, mode, state_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (vectorizable) {
      launch(device::focal_loss_backward_kernel<dev_t, device::kBlock, kVec>, int64_t(device::kBlock) * kVec * 2);
    } else {
      launch(device::focal_loss_backward_kernel<dev_t, device::kBlock, 1>, int64_t(device::kBlock) * 4);
    }
  });
}

void focal_loss_backward_inplace_cuda(at::Tensor& grad_input, at::Tensor& state, const at::Tensor& grad_output) {
  const auto layout = check_focal_loss_backward(grad_input, state, grad_output);
  const c10::cuda::CUDAGuard device_guard(grad_input.device());
  launch_backward(grad_input, grad_input, state, grad_output, layout);
  // Mark the buffer consumed (all-ones bytes: a NaN, so != 0) after the kernel has read the flag.
  C10_CUDA_CHECK(cudaMemsetAsync(static_cast<unsigned char*>(state.data_ptr()) + 2 * state.element_size(), 0xff,
                                 state.element_size(), at::cuda::getCurrentCUDAStream()));
}

at::Tensor focal_loss_backward_cuda(const at::Tensor& grad_input, const at::Tensor& state,
                                    const at::Tensor& grad_output) {
  const auto layout = check_focal_loss_backward(grad_input, state, grad_output);
  const c10::cuda::CUDAGuard device_guard(grad_input.device());
  auto out = at::empty_like(grad_input, at::MemoryFormat::Preserve);
  launch_backward(grad_input, out, state, grad_output, layout);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(focal_cuda, CUDA, m) {
  m.impl("focal_loss_backward_", &focal_loss_backward_inplace_cuda);
  m.impl("focal_loss_backward", &focal_loss_backward_cuda);
}

}  // namespace focal_cuda
