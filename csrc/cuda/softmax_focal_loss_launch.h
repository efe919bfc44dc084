// The CUDA launcher of focal_cuda::softmax_focal_loss_forward for one dtype: kernel choice, grid,
// workspace, launches on the current stream. Included by softmax_focal_loss_kernel.cu (the op, which
// dispatches on the dtype) and by one softmax_focal_loss_<dtype>.cu per dtype, which instantiates it:
// the kernels of each dtype compile in their own translation unit, in parallel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <limits>
#include <string>
#include <type_traits>

#include "../softmax_focal_loss.h"
#include "launch_utils.h"
#include "softmax_focal_loss_kernels.cuh"

namespace focal_cuda {
namespace softmax_launch {

inline device::Geometry device_geometry(const SoftmaxFocalGeometry& g) {
  return device::Geometry{g.rows,           g.classes,        g.spatial,       g.input_stride_n, g.input_stride_c,
                          g.input_stride_s, g.grad_stride_n,  g.grad_stride_c, g.grad_stride_s};
}

// The mapping of threads to the logits, from the layout and C (docs/design.md, section 7).
enum class SoftmaxKernel { kRows, kLongRows, kChannels, kPositions };

struct SoftmaxLaunch {
  SoftmaxKernel kernel;
  int group = 1;        // rows: lanes per position
  bool staged = false;  // long rows / positions: logits kept in shared memory
  bool small_tile = false;  // channels: the small register tile
  size_t dynamic_smem = 0;
};

template <typename scalar_t>
SoftmaxLaunch choose_kernel(const SoftmaxFocalForwardPlan& plan) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const auto& g = plan.geometry;
  const int64_t C = g.classes;
  const bool grad = plan.compute_grad;
  SoftmaxLaunch l{SoftmaxKernel::kPositions};
  const bool class_contiguous = g.input_stride_c == 1 && (!grad || g.grad_stride_c == 1);
  if (class_contiguous) {
    for (int group = 1; group <= device::kBlock; group *= 2) {
      if (int64_t(group) * device::RowsTile<scalar_t>::SLOTS * kVec - (kVec - 1) >= C) {
        l.kernel = SoftmaxKernel::kRows;
        l.group = group;
        return l;
      }
    }
    l.kernel = SoftmaxKernel::kLongRows;
    const size_t staging = static_cast<size_t>((C + 2 * kVec) * sizeof(scalar_t) + 15) / 16 * 16;
    l.staged = staging <= max_dynamic_shared_memory();
    l.dynamic_smem = l.staged ? staging : 0;
    return l;
  }
  // Neighbouring positions adjacent in memory (channel-first, or a transposed (N, C)),
  // 32-bit class offsets.
  const bool positions_contiguous = (g.spatial == 1 || (g.input_stride_s == 1 && (!grad || g.grad_stride_s == 1)));
  // The channels kernel addresses classes with a 32-bit byte stride.
  const int64_t max_offset = std::numeric_limits<unsigned>::max() / sizeof(scalar_t);
  const bool small_offsets =
      (C - 1) * g.input_stride_c <= max_offset && (!grad || (C - 1) * g.grad_stride_c <= max_offset);
  if (positions_contiguous && small_offsets && C <= device::channels_max_classes<scalar_t>()) {
    l.kernel = SoftmaxKernel::kChannels;
    l.small_tile = C <= device::channels_small_classes<scalar_t>();
    return l;
  }
  const size_t staging = static_cast<size_t>(device::kBlock) * C * sizeof(scalar_t);
  l.staged = staging <= max_dynamic_shared_memory();
  l.dynamic_smem = l.staged ? staging : 0;
  return l;
}

template <typename scalar_t>
int64_t launch_forward(const SoftmaxFocalForwardPlan& plan, const SoftmaxFocalForwardOutputs& out,
                       const device::SoftmaxArgs<typename device::AccumulateType<scalar_t>::type>& args,
                       const SoftmaxLaunch& l, cudaStream_t stream, bool dry_run) {
  const auto& g = plan.geometry;
  const device::Geometry dg = device_geometry(g);
  const auto* input = reinterpret_cast<const scalar_t*>(plan.input.const_data_ptr());
  auto* grad = plan.compute_grad ? reinterpret_cast<scalar_t*>(out.grad.data_ptr()) : nullptr;
  const device::LossOut<scalar_t> loss{out.loss.data_ptr(), out.loss.scalar_type() != plan.input.scalar_type()};
  const int64_t positions = g.positions();
  // Grid of kernel with `threads` per block for `blocks_needed`; launched unless dry_run.
  auto run = [&](auto kernel, int threads, int64_t blocks_needed) {
    const int64_t grid = resident_grid(kernel, threads, l.dynamic_smem, blocks_needed);
    if (!dry_run) {
      kernel<<<grid, threads, l.dynamic_smem, stream>>>(input, grad, loss, dg, args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return grid;
  };
  constexpr int kBlock = device::kBlock;
  switch (l.kernel) {
    case SoftmaxKernel::kRows: {
      const int64_t per_block = kBlock / l.group;
      const int64_t blocks = (positions + per_block - 1) / per_block;
      switch (l.group) {
        case 1: return run(device::softmax_focal_loss_rows_kernel<scalar_t, 1>, kBlock, blocks);
        case 2: return run(device::softmax_focal_loss_rows_kernel<scalar_t, 2>, kBlock, blocks);
        case 4: return run(device::softmax_focal_loss_rows_kernel<scalar_t, 4>, kBlock, blocks);
        case 8: return run(device::softmax_focal_loss_rows_kernel<scalar_t, 8>, kBlock, blocks);
        case 16: return run(device::softmax_focal_loss_rows_kernel<scalar_t, 16>, kBlock, blocks);
        case 32: return run(device::softmax_focal_loss_rows_kernel<scalar_t, 32>, kBlock, blocks);
        case 64: return run(device::softmax_focal_loss_rows_kernel<scalar_t, 64>, kBlock, blocks);
        case 128: return run(device::softmax_focal_loss_rows_kernel<scalar_t, 128>, kBlock, blocks);
        default: return run(device::softmax_focal_loss_rows_kernel<scalar_t, 256>, kBlock, blocks);
      }
    }
    case SoftmaxKernel::kLongRows: {
      constexpr int kThreads = device::long_rows_block<scalar_t>();
      return l.staged ? run(device::softmax_focal_loss_long_rows_kernel<scalar_t, kThreads, true>, kThreads, positions)
                      : run(device::softmax_focal_loss_long_rows_kernel<scalar_t, kThreads, false>, kThreads, positions);
    }
    case SoftmaxKernel::kChannels: {
      const int64_t blocks = (positions + kBlock - 1) / kBlock;
      return l.small_tile
                 ? run(device::softmax_focal_loss_channels_kernel<scalar_t, device::channels_small_classes<scalar_t>()>,
                       kBlock, blocks)
                 : run(device::softmax_focal_loss_channels_kernel<scalar_t, device::channels_max_classes<scalar_t>()>,
                       kBlock, blocks);
    }
    case SoftmaxKernel::kPositions:
    default: {
      constexpr int kBatch = device::positions_batch<scalar_t>();
      const int64_t blocks = (positions + kBlock - 1) / kBlock;
      return l.staged ? run(device::softmax_focal_loss_positions_kernel<scalar_t, kBatch, true>, kBlock, blocks)
                      : run(device::softmax_focal_loss_positions_kernel<scalar_t, kBatch, false>, kBlock, blocks);
    }
  }
}

template <typename target_t, typename acc_t>
void launch_count(const SoftmaxFocalForwardPlan& plan, int64_t ignore_index, ReductionWorkspace& workspace,
                  acc_t* state, int64_t grid, cudaStream_t stream) {
  device::count_valid_targets_kernel<device::kBlock, target_t, acc_t><<<grid, device::kBlock, 0, stream>>>(
      reinterpret_cast<const target_t*>(plan.target.const_data_ptr()), plan.geometry.positions(), plan.geometry.classes,
      ignore_index, 1LL, workspace.partial_count, workspace.tickets + 1, state);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t>
int64_t count_grid(const SoftmaxFocalForwardPlan& plan) {
  const int64_t positions = plan.geometry.positions();
  auto grid = [&](auto kernel) { return resident_grid(kernel, device::kBlock, 0, (positions + 4095) / 4096); };
  switch (plan.target_kind) {
    case kTargetUInt8: return grid(device::count_valid_targets_kernel<device::kBlock, unsigned char, acc_t>);
    case kTargetInt16: return grid(device::count_valid_targets_kernel<device::kBlock, short, acc_t>);
    case kTargetInt32: return grid(device::count_valid_targets_kernel<device::kBlock, int, acc_t>);
    default: return grid(device::count_valid_targets_kernel<device::kBlock, long long, acc_t>);
  }
}

// One forward call for the device scalar type dev_t (float, double, __half, __nv_bfloat16).
template <typename dev_t>
void softmax_focal_loss_forward_typed(const SoftmaxFocalForwardPlan& plan, const SoftmaxFocalForwardOutputs& out,
                                      double alpha, int64_t ignore_index, int64_t reduction, bool compute_grad,
                                      const at::Tensor& input) {
  using acc_t = typename device::AccumulateType<dev_t>::type;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t acc_size = static_cast<int64_t>(sizeof(acc_t));
  device::SoftmaxArgs<acc_t> args{};
  args.target = plan.target.const_data_ptr();
  args.target_kind = plan.target_kind;
  args.ignore_index = ignore_index;
  args.reduction = static_cast<int>(reduction);
  args.compute_grad = compute_grad;
  args.alpha = static_cast<acc_t>(alpha);
  args.class_weight = nullptr;
  if (plan.class_weight.has_value()) {
    args.class_weight = plan.class_weight->const_data_ptr();
    args.class_weight_double = plan.class_weight->scalar_type() == at::kDouble;
    args.class_weight_stride = plan.class_weight->stride(0);
  }
  args.gamma = kernel_gamma_schedule<acc_t>(plan.gamma_schedule);
  args.fold_mean_into_forward = plan.fold_mean_into_forward;
  args.state = out.state.data_ptr<acc_t>();
  const SoftmaxLaunch l = choose_kernel<dev_t>(plan);
  const int64_t grid = launch_forward<dev_t>(plan, out, args, l, stream, /*dry_run=*/true);
  const int64_t counting_grid = plan.fold_mean_into_forward ? count_grid<acc_t>(plan) : 1;
  ReductionWorkspace workspace(std::max(grid, counting_grid), acc_size, input.options(), stream);
  args.partial_loss = static_cast<acc_t*>(workspace.partial_loss);
  args.partial_count = workspace.partial_count;
  args.ticket = workspace.tickets;
  if (plan.fold_mean_into_forward) {
    switch (plan.target_kind) {
      case kTargetUInt8: launch_count<unsigned char>(plan, ignore_index, workspace, args.state, counting_grid, stream); break;
      case kTargetInt16: launch_count<short>(plan, ignore_index, workspace, args.state, counting_grid, stream); break;
      case kTargetInt32: launch_count<int>(plan, ignore_index, workspace, args.state, counting_grid, stream); break;
      default: launch_count<long long>(plan, ignore_index, workspace, args.state, counting_grid, stream); break;
    }
  }
  launch_forward<dev_t>(plan, out, args, l, stream, /*dry_run=*/false);
}

}  // namespace softmax_launch

#define FOCAL_SOFTMAX_FORWARD_TYPED(T)                                                                               \
  void softmax_launch::softmax_focal_loss_forward_typed<T>(const SoftmaxFocalForwardPlan&,                           \
                                                           const SoftmaxFocalForwardOutputs&, double, int64_t, int64_t, \
                                                           bool, const at::Tensor&)

// Compiled in softmax_focal_loss_<dtype>.cu only.
extern template FOCAL_SOFTMAX_FORWARD_TYPED(float);
extern template FOCAL_SOFTMAX_FORWARD_TYPED(double);
extern template FOCAL_SOFTMAX_FORWARD_TYPED(__half);
extern template FOCAL_SOFTMAX_FORWARD_TYPED(__nv_bfloat16);

}  // namespace focal_cuda
