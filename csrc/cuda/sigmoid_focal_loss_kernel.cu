// CUDA launcher for focal_cuda::sigmoid_focal_loss_forward.
// Device code lives in sigmoid_focal_loss_kernels.cuh; this file picks the
// kernel and its vector width, allocates the workspace and launches on the
// current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>

#include "../sigmoid_focal_loss.h"
#include "launch_utils.h"
#include "sigmoid_focal_loss_kernels.cuh"

namespace focal_cuda {
namespace {

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
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto acc_type = accumulation_type(plan.input.scalar_type());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.input.scalar_type(), "sigmoid_focal_loss_forward_cuda", [&] {
    using dev_t = typename DeviceScalar<scalar_t>::type;
    using acc_t = typename device::AccumulateType<dev_t>::type;
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
    ReductionWorkspace workspace(std::max(grid, counting_grid), static_cast<int64_t>(c10::elementSize(acc_type)),
                                 input.options(), stream);
    args.partial_loss = static_cast<acc_t*>(workspace.partial_loss);
    args.partial_count = workspace.partial_count;
    args.ticket = workspace.tickets;
    if (counting) count_targets<acc_t>(plan, ignore_index, &workspace, args.state, stream);
    forward(false);
  });
  return {out.loss, out.grad, out.state};
}

}  // namespace

TORCH_LIBRARY_IMPL(focal_cuda, CUDA, m) {
  m.impl("sigmoid_focal_loss_forward", &sigmoid_focal_loss_forward_cuda);
}

}  // namespace focal_cuda
