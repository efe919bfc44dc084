// CUDA launcher for focal_cuda::softmax_focal_loss_forward.
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
#include "launch_utils.h"
#include "softmax_focal_loss_kernels.cuh"

namespace focal_cuda {
namespace {

device::Geometry device_geometry(const SoftmaxFocalGeometry& g) {
  return device::Geometry{g.rows,           g.classes,        g.spatial,       g.input_stride_n, g.input_stride_c,
                          g.input_stride_s, g.grad_stride_n,  g.grad_stride_c, g.grad_stride_s};
}

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
    double gamma, int64_t ignore_index, int64_t reduction, bool compute_grad, bool inplace_backward,
    at::ArrayRef<double> gamma_thresholds, at::ArrayRef<double> gamma_values, std::optional<at::ScalarType> loss_dtype) {
  (void)inplace_backward;  // read by the autograd formula (focal_cuda/_ops.py) only
  auto plan = plan_softmax_focal_loss_forward(input, target, class_weight, alpha, gamma, ignore_index, reduction,
                                              compute_grad, gamma_thresholds, gamma_values, loss_dtype);
  TORCH_CHECK_NOT_IMPLEMENTED(plan.gamma_schedule.constant() && plan.loss_dtype == input.scalar_type(),
                              "softmax_focal_loss: gamma schedules and loss_dtype are not implemented yet on CUDA");
  const c10::cuda::CUDAGuard device_guard(input.device());
  auto out = allocate_softmax_focal_loss_outputs(plan);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto& g = plan.geometry;
  const int64_t positions = g.positions();
  const auto acc_type = accumulation_type(plan.input.scalar_type());
  const int64_t acc_size = static_cast<int64_t>(c10::elementSize(acc_type));

  const int64_t max_blocks = std::max<int64_t>(grid_size(positions, 1, kBlock), grid_size(positions, 1, kRowBlock));
  ReductionWorkspace workspace(max_blocks, acc_size, input.options(), stream);
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
    args.partial_loss = static_cast<acc_t*>(workspace.partial_loss);
    args.partial_count = workspace.partial_count;
    args.ticket = workspace.tickets;
    if (plan.fold_mean_into_forward) {
      const int64_t grid = grid_size(positions, kBlock, kBlock);
      device::count_valid_targets_kernel<kBlock, acc_t><<<grid, kBlock, 0, stream>>>(
          args.target, args.target_kind, positions, g.classes, ignore_index, 1LL, args.partial_count,
          workspace.tickets + 1, args.state);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    launch_forward<dev_t>(plan, out, args, stream);
  });
  return {out.loss, out.grad, out.state};
}

}  // namespace

TORCH_LIBRARY_IMPL(focal_cuda, CUDA, m) {
  m.impl("softmax_focal_loss_forward", &softmax_focal_loss_forward_cuda);
}

}  // namespace focal_cuda
