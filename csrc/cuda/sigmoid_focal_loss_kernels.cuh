// CUDA device code for sigmoid focal loss: kernels and device helpers only.
//
// This header includes no ATen or torch headers and uses plain CUDA C++ (warp
// shuffles, shared memory, no inline PTX, no CUB), so it compiles on its own
// and can run on CPU implementations of the CUDA programming model. The
// launchers in sigmoid_focal_loss_kernel.cu map ATen types onto it.
#pragma once

#include "focal_loss_kernels.cuh"

namespace focal_cuda {
namespace device {

template <typename acc_t>
struct SigmoidForwardArgs {
  int reduction;
  bool compute_grad;
  acc_t gamma;
  acc_t alpha;
  bool use_alpha;  // alpha >= 0
  // Index targets (the index kernel only): one per row, `classes` = background.
  const void* target;
  int target_kind;
  long long ignore_index;
  // Denominator of "mean": *normalizer when set (a device tensor, used as given);
  // else (non-ignored rows) x classes when count_rows; else host_denominator
  // (used as given when host_denominator_as_given: a CPU-scalar normalizer).
  const acc_t* normalizer;
  bool count_rows;
  acc_t host_denominator;
  bool host_denominator_as_given;
  // With fold_mean_into_forward and count_rows, count_valid_targets_kernel has
  // written 1 / denominator to state[0] before the forward kernel runs.
  bool fold_mean_into_forward;
  acc_t* state;  // [forward gradient scale, backward gradient scale, consumed flag]
  acc_t* partial_loss;       // one per block
  long long* partial_count;  // one per block
  unsigned int* ticket;      // zeroed before the launch
};

template <typename acc_t>
__device__ __forceinline__ acc_t inverse_or_zero(acc_t d) {
  return d > acc_t(0) ? acc_t(1) / d : acc_t(0);
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_forward_scale(const SigmoidForwardArgs<acc_t>& a) {
  if (!a.fold_mean_into_forward) return acc_t(1);
  if (a.normalizer != nullptr) return acc_t(1) / *a.normalizer;
  if (a.count_rows) return a.state[0];
  return a.host_denominator_as_given ? acc_t(1) / a.host_denominator : inverse_or_zero(a.host_denominator);
}

// The reduced loss and the backward state, written by the last block. `rows` is
// the number of non-ignored rows (index targets; unused otherwise).
template <int BLOCK, typename scalar_t, typename acc_t>
__device__ void sigmoid_reduce_and_finalize(acc_t loss, long long rows, long long classes,
                                            const SigmoidForwardArgs<acc_t>& a, scalar_t* loss_out) {
  if (!reduce_block_partials<BLOCK>(loss, rows, a.partial_loss, a.partial_count, a.ticket)) return;
  acc_t inverse, mean;
  if (a.normalizer != nullptr || a.host_denominator_as_given) {
    const acc_t d = a.normalizer != nullptr ? *a.normalizer : a.host_denominator;
    inverse = acc_t(1) / d;
    mean = loss / d;
  } else {
    const acc_t d = a.count_rows ? static_cast<acc_t>(rows * classes) : a.host_denominator;
    inverse = inverse_or_zero(d);
    mean = d > acc_t(0) ? loss / d : acc_t(0);
  }
  const bool is_mean = a.reduction == kReductionMean;
  if (a.reduction != kReductionNone) loss_out[0] = from_acc<scalar_t>(is_mean ? mean : loss);
  a.state[0] = a.fold_mean_into_forward ? inverse : acc_t(1);
  a.state[1] = (is_mean && !a.fold_mean_into_forward) ? inverse : acc_t(1);
  a.state[2] = acc_t(0);
}

// ---------------------------------------------------------------------------
// Dense targets (the input's shape, soft labels allowed): a flat elementwise
// pass, VEC elements (16 bytes of logits) per access, then the tail.
template <typename scalar_t, typename target_t, int BLOCK, int VEC>
__global__ void __launch_bounds__(BLOCK, kMinBlocksPerSM)
    sigmoid_focal_loss_dense_kernel(const scalar_t* __restrict__ input, const target_t* __restrict__ target,
                                    scalar_t* __restrict__ grad, scalar_t* __restrict__ loss_out, long long numel,
                                    SigmoidForwardArgs<typename AccumulateType<scalar_t>::type> a) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  const acc_t forward_scale = sigmoid_forward_scale(a);
  const bool write_loss = a.reduction == kReductionNone;
  const long long stride = static_cast<long long>(gridDim.x) * BLOCK;
  const long long first = static_cast<long long>(blockIdx.x) * BLOCK + threadIdx.x;
  const long long packs = numel / VEC;
  acc_t thread_loss = 0;
  for (long long i = first; i < packs; i += stride) {
    const Packed<scalar_t, VEC> x = *reinterpret_cast<const Packed<scalar_t, VEC>*>(input + i * VEC);
    const Packed<target_t, VEC> y = *reinterpret_cast<const Packed<target_t, VEC>*>(target + i * VEC);
    Packed<scalar_t, VEC> loss, g;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const SigmoidFocalTerms<acc_t> t =
          sigmoid_focal_terms(to_acc(x.v[k]), to_acc(y.v[k]), a.gamma, a.alpha, a.use_alpha);
      thread_loss += t.loss;
      loss.v[k] = from_acc<scalar_t>(t.loss);
      g.v[k] = from_acc<scalar_t>(t.grad * forward_scale);
    }
    if (write_loss) *reinterpret_cast<Packed<scalar_t, VEC>*>(loss_out + i * VEC) = loss;
    if (a.compute_grad) *reinterpret_cast<Packed<scalar_t, VEC>*>(grad + i * VEC) = g;
  }
  for (long long e = packs * VEC + first; e < numel; e += stride) {
    const SigmoidFocalTerms<acc_t> t = sigmoid_focal_terms(to_acc(input[e]), to_acc(target[e]), a.gamma, a.alpha,
                                                           a.use_alpha);
    thread_loss += t.loss;
    if (write_loss) loss_out[e] = from_acc<scalar_t>(t.loss);
    if (a.compute_grad) grad[e] = from_acc<scalar_t>(t.grad * forward_scale);
  }
  sigmoid_reduce_and_finalize<BLOCK>(thread_loss, 0LL, 1LL, a, loss_out);
}

// ---------------------------------------------------------------------------
// Index targets (one class per row, `classes` = background): GROUP threads per
// row. The row's target is read once, by the group's first lane, and shuffled to
// the others; no one-hot tensor exists anywhere. An ignored row gets exact zeros;
// an out-of-range target (checked on the host for CPU tensors only: no sync
// here) makes its row NaN.
template <typename scalar_t, int BLOCK, int GROUP, int VEC>
__global__ void __launch_bounds__(BLOCK, kMinBlocksPerSM)
    sigmoid_focal_loss_index_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ grad,
                                    scalar_t* __restrict__ loss_out, long long rows, long long classes,
                                    SigmoidForwardArgs<typename AccumulateType<scalar_t>::type> a) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  static_assert(GROUP <= kWarpSize && kWarpSize % GROUP == 0, "unsupported group size");
  constexpr int kGroupsPerBlock = BLOCK / GROUP;
  const int lane = threadIdx.x % GROUP;
  const int group = threadIdx.x / GROUP;
  const acc_t forward_scale = sigmoid_forward_scale(a);
  const bool write_loss = a.reduction == kReductionNone;
  acc_t thread_loss = 0;
  long long thread_rows = 0;
  // Uniform trip count across the block so that the shuffle sees every lane.
  for (long long base = static_cast<long long>(blockIdx.x) * kGroupsPerBlock; base < rows;
       base += static_cast<long long>(gridDim.x) * kGroupsPerBlock) {
    const long long r = base + group;
    const bool active = r < rows;
    long long t = 0;
    if (active && lane == 0) t = load_target(a.target, r, a.target_kind);
    t = __shfl_sync(kFullMask, t, 0, GROUP);
    if (!active) continue;
    const bool ignored = t == a.ignore_index;
    const bool valid = !ignored && t >= 0 && t <= classes;
    if (lane == 0 && valid) ++thread_rows;
    const acc_t nan_or_one = valid || ignored ? acc_t(1) : quiet_nan<acc_t>();
    const scalar_t* row = input + r * classes;
    scalar_t* grad_row = a.compute_grad ? grad + r * classes : nullptr;
    scalar_t* loss_row = write_loss ? loss_out + r * classes : nullptr;
    for (long long c0 = static_cast<long long>(lane) * VEC; c0 < classes; c0 += static_cast<long long>(GROUP) * VEC) {
      Packed<scalar_t, VEC> loss, g;
      if (ignored) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          loss.v[k] = from_acc<scalar_t>(acc_t(0));
          g.v[k] = from_acc<scalar_t>(acc_t(0));
        }
      } else {
        const Packed<scalar_t, VEC> x = *reinterpret_cast<const Packed<scalar_t, VEC>*>(row + c0);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t y = c0 + k == t ? acc_t(1) : acc_t(0);
          const SigmoidFocalTerms<acc_t> terms = sigmoid_focal_terms(to_acc(x.v[k]), y, a.gamma, a.alpha, a.use_alpha);
          thread_loss += terms.loss * nan_or_one;
          loss.v[k] = from_acc<scalar_t>(terms.loss * nan_or_one);
          g.v[k] = from_acc<scalar_t>(terms.grad * forward_scale * nan_or_one);
        }
      }
      if (write_loss) *reinterpret_cast<Packed<scalar_t, VEC>*>(loss_row + c0) = loss;
      if (a.compute_grad) *reinterpret_cast<Packed<scalar_t, VEC>*>(grad_row + c0) = g;
    }
  }
  sigmoid_reduce_and_finalize<BLOCK>(thread_loss, thread_rows, classes, a, loss_out);
}

}  // namespace device
}  // namespace focal_cuda
