// The CUDA launcher of focal_cuda::sigmoid_focal_loss_forward for one dtype: kernel choice (dense, index,
// channel-first index), vector width, workspace, launches on the current stream. Included by
// sigmoid_focal_loss_kernel.cu (the op, which dispatches on the dtype) and by one sigmoid_focal_loss_<dtype>.cu
// per dtype, which instantiates it: the kernels of each dtype compile in their own translation unit.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "../sigmoid_focal_loss.h"
#include "launch_utils.h"
#include "sigmoid_focal_loss_kernels.cuh"

namespace focal_cuda {
namespace sigmoid_launch {

template <typename scalar_t, typename target_t>
int64_t launch_dense(const SigmoidFocalForwardPlan& plan, const SigmoidFocalForwardOutputs& out,
                     const device::SigmoidArgs<typename device::AccumulateType<scalar_t>::type>& args,
                     cudaStream_t stream, bool dry_run) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const auto* input = reinterpret_cast<const scalar_t*>(plan.input.const_data_ptr());
  const auto* target = reinterpret_cast<const target_t*>(plan.target.const_data_ptr());
  auto* grad = plan.compute_grad ? reinterpret_cast<scalar_t*>(out.grad.data_ptr()) : nullptr;
  const device::LossOut<scalar_t> loss{out.loss.data_ptr(), out.loss.scalar_type() != plan.input.scalar_type()};
  const int64_t numel = plan.numel();
  const bool vectorizable = aligned_16(input) && aligned_to(target, kVec * sizeof(target_t)) &&
                            (!plan.compute_grad || aligned_16(grad)) &&
                            (plan.reduction != kReductionNone || aligned_to(loss.ptr, out.loss.element_size() * kVec));
  auto run = [&](auto kernel, int64_t per_block) {
    const int64_t grid = resident_grid(kernel, device::kBlock, 0, (numel + per_block - 1) / per_block);
    if (!dry_run) {
      kernel<<<grid, device::kBlock, 0, stream>>>(input, target, grad, loss, numel, args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return grid;
  };
  return vectorizable ? run(device::sigmoid_focal_loss_dense_kernel<scalar_t, target_t, kVec>, device::kBlock * kVec)
                      : run(device::sigmoid_focal_loss_dense_kernel<scalar_t, target_t, 1>, device::kBlock * 4);
}

template <typename scalar_t>
int64_t launch_index(const SigmoidFocalForwardPlan& plan, const SigmoidFocalForwardOutputs& out,
                     const device::SigmoidArgs<typename device::AccumulateType<scalar_t>::type>& args,
                     cudaStream_t stream, bool dry_run) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const auto* input = reinterpret_cast<const scalar_t*>(plan.input.const_data_ptr());
  auto* grad = plan.compute_grad ? reinterpret_cast<scalar_t*>(out.grad.data_ptr()) : nullptr;
  const device::LossOut<scalar_t> loss{out.loss.data_ptr(), out.loss.scalar_type() != plan.input.scalar_type()};
  const int64_t rows = plan.rows, C = plan.classes;
  // A pack touches at most two rows when C >= VEC.
  const bool vectorizable = C >= kVec && aligned_16(input) && (!plan.compute_grad || aligned_16(grad)) &&
                            (plan.reduction != kReductionNone || aligned_to(loss.ptr, out.loss.element_size() * kVec));
  const device::FastDivider by_classes = device::FastDivider::make(C);
  auto run = [&](auto kernel, int64_t per_block) {
    const int64_t grid = resident_grid(kernel, device::kBlock, 0, (rows * C + per_block - 1) / per_block);
    if (!dry_run) {
      kernel<<<grid, device::kBlock, 0, stream>>>(input, grad, loss, rows, C, by_classes, args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return grid;
  };
  return vectorizable ? run(device::sigmoid_focal_loss_index_kernel<scalar_t, kVec>, device::kBlock * kVec * 2)
                      : run(device::sigmoid_focal_loss_index_kernel<scalar_t, 1>, device::kBlock * 4);
}

template <typename scalar_t>
int64_t launch_channels(const SigmoidFocalForwardPlan& plan, const SigmoidFocalForwardOutputs& out,
                        const device::SigmoidArgs<typename device::AccumulateType<scalar_t>::type>& args,
                        cudaStream_t stream, bool dry_run) {
  constexpr int kVec = device::sigmoid_channels_vec<scalar_t>();
  const auto* input = reinterpret_cast<const scalar_t*>(plan.input.const_data_ptr());
  auto* grad = plan.compute_grad ? reinterpret_cast<scalar_t*>(out.grad.data_ptr()) : nullptr;
  const device::LossOut<scalar_t> loss{out.loss.data_ptr(), out.loss.scalar_type() != plan.input.scalar_type()};
  const int64_t images = plan.images, C = plan.classes, S = plan.spatial;
  // Contiguous (N, C, S): VEC positions per thread when S is a multiple of VEC and the bases are aligned.
  const int64_t width = kVec * sizeof(scalar_t);
  const bool vectorizable = S % kVec == 0 && aligned_to(input, width) && (!plan.compute_grad || aligned_to(grad, width)) &&
                            (plan.reduction != kReductionNone || aligned_to(loss.ptr, out.loss.element_size() * kVec));
  auto run = [&](auto kernel, int64_t vec) {
    const int64_t grid = resident_grid(kernel, device::kBlock, 0, (images * S / vec + device::kBlock - 1) / device::kBlock);
    if (!dry_run) {
      kernel<<<grid, device::kBlock, 0, stream>>>(input, grad, loss, images, C, S, C * S, S, args);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return grid;
  };
  return vectorizable ? run(device::sigmoid_focal_loss_channels_kernel<scalar_t, kVec>, kVec)
                      : run(device::sigmoid_focal_loss_channels_kernel<scalar_t, 1>, 1);
}

template <typename target_t, typename acc_t>
int64_t launch_count(const SigmoidFocalForwardPlan& plan, int64_t ignore_index, ReductionWorkspace* workspace,
                     acc_t* state, cudaStream_t stream) {
  auto* kernel = device::count_valid_targets_kernel<device::kBlock, target_t, acc_t>;
  const int64_t grid = resident_grid(kernel, device::kBlock, 0, (plan.rows + 4095) / 4096);
  if (workspace != nullptr) {
    // Rows with a target in [0, C] count; state[0] = 1 / (rows x C).
    kernel<<<grid, device::kBlock, 0, stream>>>(reinterpret_cast<const target_t*>(plan.target.const_data_ptr()),
                                                plan.rows, plan.classes + 1, ignore_index, plan.classes,
                                                workspace->partial_count, workspace->tickets + 1, state);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return grid;
}

template <typename acc_t>
int64_t count_targets(const SigmoidFocalForwardPlan& plan, int64_t ignore_index, ReductionWorkspace* workspace,
                      acc_t* state, cudaStream_t stream) {
  switch (plan.target_kind) {
    case kTargetUInt8: return launch_count<unsigned char>(plan, ignore_index, workspace, state, stream);
    case kTargetInt16: return launch_count<short>(plan, ignore_index, workspace, state, stream);
    case kTargetInt32: return launch_count<int>(plan, ignore_index, workspace, state, stream);
    default: return launch_count<long long>(plan, ignore_index, workspace, state, stream);
  }
}

// One forward call for the device scalar type dev_t (float, double, __half, __nv_bfloat16).
template <typename dev_t>
void sigmoid_focal_loss_forward_typed(const SigmoidFocalForwardPlan& plan, const SigmoidFocalForwardOutputs& out,
                                      double alpha, int64_t ignore_index, int64_t reduction, bool compute_grad,
                                      const at::Tensor& input) {
  using acc_t = typename device::AccumulateType<dev_t>::type;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  device::SigmoidArgs<acc_t> args{};
  args.reduction = static_cast<int>(reduction);
  args.compute_grad = compute_grad;
  args.gamma = kernel_gamma_schedule<acc_t>(plan.gamma_schedule);
  args.alpha = static_cast<acc_t>(alpha);
  args.use_alpha = plan.use_alpha;
  args.target = plan.index_targets ? plan.target.const_data_ptr() : nullptr;
  args.target_kind = plan.target_kind;
  args.ignore_index = ignore_index;
  args.normalizer = plan.device_normalizer.has_value() ? plan.device_normalizer->const_data_ptr<acc_t>() : nullptr;
  args.count_rows = plan.index_targets && !plan.has_normalizer();
  args.host_denominator_as_given = plan.host_normalizer.has_value();
  args.host_denominator = static_cast<acc_t>(plan.host_normalizer.value_or(static_cast<double>(plan.numel())));
  if (plan.image_normalizer.has_value()) {
    args.image_normalizer = plan.image_normalizer->const_data_ptr<acc_t>();
    args.by_image_elements = device::FastDivider::make(std::max<int64_t>(plan.numel() / plan.images, 1));
  }
  args.fold_mean_into_forward = plan.fold_mean_into_forward;
  args.state = out.state.data_ptr<acc_t>();
  // Which kernel, and its grid (a dry run sizes the workspace first).
  auto forward = [&](bool dry_run) -> int64_t {
    if (plan.index_targets && plan.spatial > 1) return launch_channels<dev_t>(plan, out, args, stream, dry_run);
    if (plan.index_targets) return launch_index<dev_t>(plan, out, args, stream, dry_run);
    if (plan.target.scalar_type() == plan.input.scalar_type()) return launch_dense<dev_t, dev_t>(plan, out, args, stream, dry_run);
    return launch_dense<dev_t, acc_t>(plan, out, args, stream, dry_run);
  };
  const bool counting = plan.index_targets && plan.fold_mean_into_forward && args.count_rows;
  const int64_t grid = forward(true);
  const int64_t counting_grid = counting ? count_targets<acc_t>(plan, ignore_index, nullptr, args.state, stream) : 1;
  ReductionWorkspace workspace(std::max(grid, counting_grid), static_cast<int64_t>(sizeof(acc_t)),
                               input.options(), stream);
  args.partial_loss = static_cast<acc_t*>(workspace.partial_loss);
  args.partial_count = workspace.partial_count;
  args.ticket = workspace.tickets;
  if (counting) count_targets<acc_t>(plan, ignore_index, &workspace, args.state, stream);
  forward(false);
}

}  // namespace sigmoid_launch

#define FOCAL_SIGMOID_FORWARD_TYPED(T)                                                                               \
  void sigmoid_launch::sigmoid_focal_loss_forward_typed<T>(const SigmoidFocalForwardPlan&,                           \
                                                           const SigmoidFocalForwardOutputs&, double, int64_t, int64_t, \
                                                           bool, const at::Tensor&)

// Compiled in sigmoid_focal_loss_<dtype>.cu only.
extern template FOCAL_SIGMOID_FORWARD_TYPED(float);
extern template FOCAL_SIGMOID_FORWARD_TYPED(double);
extern template FOCAL_SIGMOID_FORWARD_TYPED(__half);
extern template FOCAL_SIGMOID_FORWARD_TYPED(__nv_bfloat16);

}  // namespace focal_cuda
