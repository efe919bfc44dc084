// CUDA launchers for focal_cuda::softmax_focal_loss_forward / _backward_.
// Device code lives in softmax_focal_loss_kernels.cuh; this file picks the
// thread mapping, allocates the workspace and launches on the current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../softmax_focal_loss.h"
#include "softmax_focal_loss_kernels.cuh"

namespace focal_cuda {
namespace {

// ATen's 16-bit float types and the CUDA ones have the same bits.
template <typename scalar_t>
struct DeviceScalar {
  using type = scalar_t;
};
template <>
struct DeviceScalar<c10::Half> {
  using type = __half;
};
template <>
struct DeviceScalar<c10::BFloat16> {
  using type = __nv_bfloat16;
};

constexpr int kBlock = 256;       // channels kernel, rows kernel with GROUP <= 32, backward, counting
constexpr int kRowBlock = 512;    // rows kernel with one position per block (large C)

device::Geometry device_geometry(const SoftmaxFocalGeometry& g) {
  return device::Geometry{g.rows,           g.classes,        g.spatial,       g.input_stride_n, g.input_stride_c,
                          g.input_stride_s, g.grad_stride_n,  g.grad_stride_c, g.grad_stride_s};
}

// Enough blocks to fill the device a few times over, no more: the per-block
// partials stay few and the grid (so the summation order) depends only on the
// problem and the device.
int64_t grid_size(int64_t work_items, int64_t items_per_block, int block_threads) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t resident = static_cast<int64_t>(sms) * std::max(1, 2048 / block_threads);
  const int64_t needed = (work_items + items_per_block - 1) / items_per_block;
  return std::max<int64_t>(1, std::min(needed, resident * 2));
}

bool aligned_16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename scalar_t>
void launch_forward(const SoftmaxFocalForwardPlan& plan, const SoftmaxFocalForwardOutputs& out,
                    device::ForwardArgs<typename device::AccumulateType<scalar_t>::type> args, cudaStream_t stream) {
  const auto& g = plan.geometry;
  const device::Geometry dg = device_geometry(g);
  const auto* input = reinterpret_cast<const scalar_t*>(plan.input.const_data_ptr());
  auto* grad = plan.compute_grad ? reinterpret_cast<scalar_t*>(out.grad.data_ptr()) : nullptr;
  auto* loss = reinterpret_cast<scalar_t*>(out.loss.data_ptr());
  const int64_t positions = g.positions();
  const int64_t C = g.classes;

  constexpr int kVec = 16 / sizeof(scalar_t);
  const bool class_contiguous = g.input_stride_c == 1 && (!plan.compute_grad || g.grad_stride_c == 1);
  const bool vectorizable = class_contiguous && C % kVec == 0 && g.input_stride_n % kVec == 0 &&
                            g.input_stride_s % kVec == 0 && aligned_16(input) &&
                            (!plan.compute_grad || (g.grad_stride_n % kVec == 0 && g.grad_stride_s % kVec == 0 &&
                                                    aligned_16(grad)));
  // Few positions with many classes each: spread every row over threads even when
  // the class stride is not 1, or a thread per position would leave the GPU idle.
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const bool few_long_rows = C > 256 && positions < static_cast<int64_t>(sms) * kBlock;
  auto launch_rows = [&](auto group_tag, auto vec_tag, auto block_tag) {
    constexpr int kGroup = decltype(group_tag)::value;
    constexpr int kV = decltype(vec_tag)::value;
    constexpr int kThreads = decltype(block_tag)::value;
    const int64_t grid = grid_size(positions, kThreads / kGroup, kThreads);
    device::softmax_focal_loss_rows_kernel<scalar_t, kThreads, kGroup, kV>
        <<<grid, kThreads, 0, stream>>>(input, grad, loss, dg, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  using Block = std::integral_constant<int, kBlock>;
  using RowBlock = std::integral_constant<int, kRowBlock>;
  using Vec = std::integral_constant<int, kVec>;
  using Scalar = std::integral_constant<int, 1>;
  if ((class_contiguous && C > 8) || few_long_rows) {
    if (C <= 128) {
      vectorizable ? launch_rows(std::integral_constant<int, 8>{}, Vec{}, Block{})
                   : launch_rows(std::integral_constant<int, 8>{}, Scalar{}, Block{});
    } else if (C <= 4096) {
      vectorizable ? launch_rows(std::integral_constant<int, 32>{}, Vec{}, Block{})
                   : launch_rows(std::integral_constant<int, 32>{}, Scalar{}, Block{});
    } else {
      vectorizable ? launch_rows(RowBlock{}, Vec{}, RowBlock{}) : launch_rows(RowBlock{}, Scalar{}, RowBlock{});
    }
  } else {
    const int64_t grid = grid_size(positions, kBlock, kBlock);
    device::softmax_focal_loss_channels_kernel<scalar_t, kBlock><<<grid, kBlock, 0, stream>>>(input, grad, loss, dg, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_focal_loss_forward_cuda(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& class_weight, double alpha,
    double gamma, int64_t ignore_index, int64_t reduction, bool compute_grad, bool inplace_backward) {
  (void)inplace_backward;  // read by the autograd formula (focal_cuda/_ops.py) only
  auto plan = plan_softmax_focal_loss_forward(input, target, class_weight, alpha, gamma, ignore_index, reduction,
                                              compute_grad);
  const c10::cuda::CUDAGuard device_guard(input.device());
  auto out = allocate_softmax_focal_loss_outputs(plan);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto& g = plan.geometry;
  const int64_t positions = g.positions();
  const auto acc_type = accumulation_type(plan.input.scalar_type());
  const int64_t acc_size = static_cast<int64_t>(c10::elementSize(acc_type));

  // Workspace: per-block partial losses and counts, then two tickets (forward, counting).
  const int64_t max_blocks = std::max<int64_t>(grid_size(positions, 1, kBlock), grid_size(positions, 1, kRowBlock));
  const int64_t loss_bytes = (max_blocks * acc_size + 15) / 16 * 16;
  const int64_t count_bytes = max_blocks * static_cast<int64_t>(sizeof(long long));
  auto workspace = at::empty({loss_bytes + count_bytes + 16}, input.options().dtype(at::kByte));
  auto* base = static_cast<unsigned char*>(workspace.data_ptr());
  auto* tickets = reinterpret_cast<unsigned int*>(base + loss_bytes + count_bytes);
  C10_CUDA_CHECK(cudaMemsetAsync(tickets, 0, 2 * sizeof(unsigned int), stream));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.input.scalar_type(), "softmax_focal_loss_forward_cuda", [&] {
    using dev_t = typename DeviceScalar<scalar_t>::type;
    using acc_t = typename device::AccumulateType<dev_t>::type;
    device::ForwardArgs<acc_t> args;
    args.target = plan.target.const_data_ptr();
    args.target_kind = plan.target_kind;
    args.reduction = static_cast<int>(reduction);
    args.compute_grad = compute_grad;
    args.ignore_index = ignore_index;
    args.gamma = static_cast<acc_t>(gamma);
    args.alpha = static_cast<acc_t>(alpha);
    args.class_weight = plan.class_weight.has_value() ? plan.class_weight->const_data_ptr<acc_t>() : nullptr;
    args.fold_mean_into_forward = plan.fold_mean_into_forward;
    args.state = out.state.data_ptr<acc_t>();
    args.partial_loss = reinterpret_cast<acc_t*>(base);
    args.partial_count = reinterpret_cast<long long*>(base + loss_bytes);
    args.ticket = tickets;
    if (plan.fold_mean_into_forward) {
      const int64_t grid = grid_size(positions, kBlock, kBlock);
      device::count_valid_targets_kernel<kBlock, acc_t><<<grid, kBlock, 0, stream>>>(
          args.target, args.target_kind, positions, g.classes, ignore_index, args.partial_count, tickets + 1,
          args.state);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    launch_forward<dev_t>(plan, out, args, stream);
  });
  return {out.loss, out.grad, out.state};
}

// out = grad_input * grad_output * state[1]; out may be grad_input itself.
void launch_backward(const at::Tensor& grad_input, at::Tensor& out, const at::Tensor& state,
                     const at::Tensor& grad_output, bool scalar_grad_output) {
  const auto strides = collapse_to_ncs_strides(grad_input);
  TORCH_CHECK(strides.has_value() && grad_input.is_non_overlapping_and_dense() && out.strides() == grad_input.strides(),
              "softmax_focal_loss_backward: grad_input must be the dense gradient buffer returned by the forward");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  SoftmaxFocalGeometry g;
  g.rows = grad_input.size(0);
  g.classes = grad_input.size(1);
  for (int64_t d = 2; d < grad_input.dim(); ++d) g.spatial *= grad_input.size(d);
  std::tie(g.grad_stride_n, g.grad_stride_c, g.grad_stride_s) = *strides;
  const auto go = grad_output.to(grad_input.scalar_type()).contiguous();
  const int64_t total = grad_input.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_input.scalar_type(), "softmax_focal_loss_backward_cuda", [&] {
    using dev_t = typename DeviceScalar<scalar_t>::type;
    using acc_t = typename device::AccumulateType<dev_t>::type;
    constexpr int kVec = 16 / sizeof(dev_t);
    const auto* in_ptr = reinterpret_cast<const dev_t*>(grad_input.const_data_ptr());
    auto* out_ptr = reinterpret_cast<dev_t*>(out.data_ptr());
    const auto* go_ptr = reinterpret_cast<const dev_t*>(go.const_data_ptr());
    const auto* state_ptr = state.const_data_ptr<acc_t>();
    const device::Geometry dg = device_geometry(g);
    if (scalar_grad_output && total % kVec == 0 && aligned_16(in_ptr) && aligned_16(out_ptr)) {
      const int64_t grid = grid_size(total / kVec, kBlock, kBlock);
      device::softmax_focal_loss_backward_kernel<dev_t, kBlock, kVec>
          <<<grid, kBlock, 0, stream>>>(in_ptr, out_ptr, dg, go_ptr, true, state_ptr);
    } else {
      const int64_t grid = grid_size(total, kBlock, kBlock);
      device::softmax_focal_loss_backward_kernel<dev_t, kBlock, 1>
          <<<grid, kBlock, 0, stream>>>(in_ptr, out_ptr, dg, go_ptr, scalar_grad_output, state_ptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void softmax_focal_loss_backward_inplace_cuda(at::Tensor& grad_input, at::Tensor& state, const at::Tensor& grad_output) {
  const bool scalar_grad_output = check_softmax_focal_loss_backward(grad_input, state, grad_output);
  const c10::cuda::CUDAGuard device_guard(grad_input.device());
  launch_backward(grad_input, grad_input, state, grad_output, scalar_grad_output);
  // Mark the buffer consumed (all-ones bytes: a NaN, so != 0) after the kernel has read the flag.
  C10_CUDA_CHECK(cudaMemsetAsync(static_cast<unsigned char*>(state.data_ptr()) + 2 * state.element_size(), 0xff,
                                 state.element_size(), at::cuda::getCurrentCUDAStream()));
}

at::Tensor softmax_focal_loss_backward_cuda(const at::Tensor& grad_input, const at::Tensor& state,
                                            const at::Tensor& grad_output) {
  const bool scalar_grad_output = check_softmax_focal_loss_backward(grad_input, state, grad_output);
  const c10::cuda::CUDAGuard device_guard(grad_input.device());
  auto out = at::empty_like(grad_input, at::MemoryFormat::Preserve);
  launch_backward(grad_input, out, state, grad_output, scalar_grad_output);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(focal_cuda, CUDA, m) {
  m.impl("softmax_focal_loss_forward", &softmax_focal_loss_forward_cuda);
  m.impl("softmax_focal_loss_backward_", &softmax_focal_loss_backward_inplace_cuda);
  m.impl("softmax_focal_loss_backward", &softmax_focal_loss_backward_cuda);
}

}  // namespace focal_cuda
