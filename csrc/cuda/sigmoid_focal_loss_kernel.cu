// CUDA launcher for focal_cuda::sigmoid_focal_loss_forward.
// Device code lives in sigmoid_focal_loss_kernels.cuh; this file picks the
// kernel and its thread mapping, allocates the workspace and launches on the
// current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <type_traits>

#include "../sigmoid_focal_loss.h"
#include "launch_utils.h"
#include "sigmoid_focal_loss_kernels.cuh"

namespace focal_cuda {
namespace {

template <typename scalar_t, typename target_t>
void launch_dense(const SigmoidFocalForwardPlan& plan, const SigmoidFocalForwardOutputs& out,
                  const device::SigmoidForwardArgs<typename device::AccumulateType<scalar_t>::type>& args,
                  cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const auto* input = reinterpret_cast<const scalar_t*>(plan.input.const_data_ptr());
  const auto* target = reinterpret_cast<const target_t*>(plan.target.const_data_ptr());
  auto* grad = plan.compute_grad ? reinterpret_cast<scalar_t*>(out.grad.data_ptr()) : nullptr;
  auto* loss = reinterpret_cast<scalar_t*>(out.loss.data_ptr());
  const int64_t numel = plan.numel();
  const bool vectorizable = aligned_16(input) && aligned_to(target, kVec * sizeof(target_t)) &&
                            (!plan.compute_grad || aligned_16(grad)) &&
                            (plan.reduction != kReductionNone || aligned_16(loss));
  if (vectorizable) {
    const int64_t grid = grid_size(numel / kVec, kBlock, kBlock);
    device::sigmoid_focal_loss_dense_kernel<scalar_t, target_t, kBlock, kVec>
        <<<grid, kBlock, 0, stream>>>(input, target, grad, loss, numel, args);
  } else {
    const int64_t grid = grid_size(numel, kBlock, kBlock);
    device::sigmoid_focal_loss_dense_kernel<scalar_t, target_t, kBlock, 1>
        <<<grid, kBlock, 0, stream>>>(input, target, grad, loss, numel, args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_index(const SigmoidFocalForwardPlan& plan, const SigmoidFocalForwardOutputs& out,
                  const device::SigmoidForwardArgs<typename device::AccumulateType<scalar_t>::type>& args,
                  cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const auto* input = reinterpret_cast<const scalar_t*>(plan.input.const_data_ptr());
  auto* grad = plan.compute_grad ? reinterpret_cast<scalar_t*>(out.grad.data_ptr()) : nullptr;
  auto* loss = reinterpret_cast<scalar_t*>(out.loss.data_ptr());
  const int64_t rows = plan.rows, C = plan.classes;
  const bool vectorizable = C % kVec == 0 && aligned_16(input) && (!plan.compute_grad || aligned_16(grad)) &&
                            (plan.reduction != kReductionNone || aligned_16(loss));
  // Detection heads have 1 to a few hundred classes: 8 lanes per row while a row
  // is at most two passes of 8 accesses, else a warp per row.
  const int64_t accesses = (C + (vectorizable ? kVec : 1) - 1) / (vectorizable ? kVec : 1);
  auto go = [&](auto group_tag, auto vec_tag) {
    constexpr int kGroup = decltype(group_tag)::value;
    constexpr int kV = decltype(vec_tag)::value;
    const int64_t grid = grid_size(rows, kBlock / kGroup, kBlock);
    device::sigmoid_focal_loss_index_kernel<scalar_t, kBlock, kGroup, kV>
        <<<grid, kBlock, 0, stream>>>(input, grad, loss, rows, C, args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  using G8 = std::integral_constant<int, 8>;
  using G32 = std::integral_constant<int, 32>;
  using Vec = std::integral_constant<int, kVec>;
  using Scalar = std::integral_constant<int, 1>;
  if (accesses <= 16) {
    vectorizable ? go(G8{}, Vec{}) : go(G8{}, Scalar{});
  } else {
    vectorizable ? go(G32{}, Vec{}) : go(G32{}, Scalar{});
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
  TORCH_CHECK_NOT_IMPLEMENTED(plan.gamma_schedule.constant() && plan.loss_dtype == input.scalar_type(),
                              "sigmoid_focal_loss: gamma schedules and loss_dtype are not implemented yet on CUDA");
  auto out = allocate_sigmoid_focal_loss_outputs(plan);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto acc_type = accumulation_type(plan.input.scalar_type());
  const int64_t work = plan.index_targets ? plan.rows : plan.numel();
  ReductionWorkspace workspace(grid_size(work, 1, kBlock), static_cast<int64_t>(c10::elementSize(acc_type)),
                               input.options(), stream);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.input.scalar_type(), "sigmoid_focal_loss_forward_cuda", [&] {
    using dev_t = typename DeviceScalar<scalar_t>::type;
    using acc_t = typename device::AccumulateType<dev_t>::type;
    device::SigmoidForwardArgs<acc_t> args{};
    args.reduction = static_cast<int>(reduction);
    args.compute_grad = compute_grad;
    args.gamma = static_cast<acc_t>(gamma);
    args.alpha = static_cast<acc_t>(alpha);
    args.use_alpha = plan.use_alpha;
    args.target = plan.index_targets ? plan.target.const_data_ptr() : nullptr;
    args.target_kind = plan.target_kind;
    args.ignore_index = ignore_index;
    args.normalizer = plan.device_normalizer.has_value() ? plan.device_normalizer->const_data_ptr<acc_t>() : nullptr;
    args.count_rows = plan.index_targets && !plan.has_normalizer();
    args.host_denominator_as_given = plan.host_normalizer.has_value();
    args.host_denominator = static_cast<acc_t>(plan.host_normalizer.value_or(static_cast<double>(plan.numel())));
    args.fold_mean_into_forward = plan.fold_mean_into_forward;
    args.state = out.state.data_ptr<acc_t>();
    args.partial_loss = static_cast<acc_t*>(workspace.partial_loss);
    args.partial_count = workspace.partial_count;
    args.ticket = workspace.tickets;
    if (plan.index_targets) {
      if (plan.fold_mean_into_forward && args.count_rows) {
        // Rows with a target in [0, C] count; state[0] = 1 / (rows x C).
        const int64_t grid = grid_size(plan.rows, kBlock, kBlock);
        device::count_valid_targets_kernel<kBlock, acc_t><<<grid, kBlock, 0, stream>>>(
            args.target, args.target_kind, plan.rows, plan.classes + 1, ignore_index, plan.classes,
            args.partial_count, workspace.tickets + 1, args.state);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      launch_index<dev_t>(plan, out, args, stream);
    } else if (plan.target.scalar_type() == plan.input.scalar_type()) {
      launch_dense<dev_t, dev_t>(plan, out, args, stream);
    } else {
      launch_dense<dev_t, acc_t>(plan, out, args, stream);
    }
  });
  return {out.loss, out.grad, out.state};
}

}  // namespace

TORCH_LIBRARY_IMPL(focal_cuda, CUDA, m) {
  m.impl("sigmoid_focal_loss_forward", &sigmoid_focal_loss_forward_cuda);
}

}  // namespace focal_cuda
