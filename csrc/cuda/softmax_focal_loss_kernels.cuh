// CUDA device code for softmax focal loss: kernels and device helpers only.
//
// This header includes no ATen or torch headers and uses plain CUDA C++ (warp
// shuffles, shared memory, no inline PTX, no CUB), so it compiles on its own
// and can run on CPU implementations of the CUDA programming model. The
// launchers in softmax_focal_loss_kernel.cu map ATen types onto it.
#pragma once

#include "focal_loss_kernels.cuh"

namespace focal_cuda {
namespace device {

template <typename acc_t>
struct ForwardArgs {
  const void* target;
  int target_kind;
  int reduction;
  bool compute_grad;
  long long ignore_index;
  acc_t gamma;
  acc_t alpha;
  const acc_t* class_weight;  // nullptr: no per-class weight
  bool fold_mean_into_forward;
  // [forward gradient scale, backward gradient scale, consumed flag]. With
  // fold_mean_into_forward, count_valid_targets_kernel has written 1/count to
  // state[0] before the forward kernel runs; the forward's last block writes the rest.
  acc_t* state;
  acc_t* partial_loss;          // one per block
  long long* partial_count;     // one per block
  unsigned int* ticket;         // zeroed before the launch
};

// Online log-sum-exp state merged across GROUP consecutive lanes (GROUP <= 32,
// a power of two); every lane of the group gets the result.
template <int GROUP, typename acc_t>
__device__ __forceinline__ LogSumExpState<acc_t> group_lse_merge(LogSumExpState<acc_t> s) {
#pragma unroll
  for (int offset = GROUP / 2; offset > 0; offset /= 2) {
    LogSumExpState<acc_t> other;
    other.max = __shfl_xor_sync(kFullMask, s.max, offset, GROUP);
    other.sum = __shfl_xor_sync(kFullMask, s.sum, offset, GROUP);
    s = lse_merge(s, other);
  }
  return s;
}

// The same across a whole block (GROUP == BLOCK); every thread gets the result.
template <int BLOCK, typename acc_t>
__device__ __forceinline__ LogSumExpState<acc_t> block_lse_merge(LogSumExpState<acc_t> s, acc_t* shared_max,
                                                                 acc_t* shared_sum) {
  constexpr int kWarps = BLOCK / kWarpSize;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  s = group_lse_merge<kWarpSize>(s);
  __syncthreads();  // the shared slots may still be read from the previous row
  if (lane == 0) {
    shared_max[warp] = s.max;
    shared_sum[warp] = s.sum;
  }
  __syncthreads();
  LogSumExpState<acc_t> total{shared_max[0], shared_sum[0]};
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total = lse_merge(total, LogSumExpState<acc_t>{shared_max[w], shared_sum[w]});
  return total;
}

// The reduced loss and the backward state, written by the last block.
template <int BLOCK, typename scalar_t, typename acc_t>
__device__ void reduce_and_finalize(acc_t loss, long long count, const ForwardArgs<acc_t>& a, scalar_t* loss_out) {
  if (!reduce_block_partials<BLOCK>(loss, count, a.partial_loss, a.partial_count, a.ticket)) return;
  const acc_t inv_count = count > 0 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(0);
  const bool mean = a.reduction == kReductionMean;
  if (a.reduction != kReductionNone) loss_out[0] = from_acc<scalar_t>(mean ? loss * inv_count : loss);
  a.state[0] = a.fold_mean_into_forward ? inv_count : acc_t(1);
  a.state[1] = (mean && !a.fold_mean_into_forward) ? inv_count : acc_t(1);
  a.state[2] = acc_t(0);
}

// ---------------------------------------------------------------------------
// Per-position bookkeeping shared by both forward kernels.

template <typename acc_t>
struct PositionTarget {
  long long index;  // the class, valid only when `valid`
  bool ignored;
  bool valid;       // neither ignored nor out of range
};

template <typename acc_t>
__device__ __forceinline__ PositionTarget<acc_t> read_target(const ForwardArgs<acc_t>& a, long long p,
                                                            long long classes) {
  PositionTarget<acc_t> t;
  t.index = load_target(a.target, p, a.target_kind);
  t.ignored = t.index == a.ignore_index;
  t.valid = !t.ignored && t.index >= 0 && t.index < classes;
  return t;
}

// Focal terms of one position from its log-sum-exp state; an out-of-range
// target (checked on the host for CPU tensors only: no sync here) yields NaN.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ FocalTerms<acc_t> position_terms(const ForwardArgs<acc_t>& a, const PositionTarget<acc_t>& t,
                                                            const scalar_t* row, long long stride_c,
                                                            LogSumExpState<acc_t> lse) {
  if (!t.valid) {
    const acc_t nan = quiet_nan<acc_t>();
    return FocalTerms<acc_t>{nan, nan, nan};
  }
  const acc_t log_p = to_acc(row[t.index * stride_c]) - lse.max - math_log(lse.sum);
  const acc_t alpha = a.class_weight ? a.alpha * a.class_weight[t.index] : a.alpha;
  return focal_terms(log_p, a.gamma, alpha);
}

// ---------------------------------------------------------------------------
// Rows kernel: GROUP threads per position, walking the classes. For
// class-contiguous layouts ((N, C) row-major, channels_last) and for large C.
// GROUP <= 32: several positions per warp; GROUP == BLOCK: one position per
// block, any C (no shared-memory bound: two passes over the row, the second
// mostly from L2). VEC > 1 moves 16 bytes per access (unit class stride, aligned rows).
template <typename scalar_t, int BLOCK, int GROUP, int VEC>
__global__ void __launch_bounds__(BLOCK, kMinBlocksPerSM)
    softmax_focal_loss_rows_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ grad,
                                   scalar_t* __restrict__ loss_out, Geometry g,
                                   ForwardArgs<typename AccumulateType<scalar_t>::type> a) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  static_assert(GROUP == BLOCK || (GROUP <= kWarpSize && kWarpSize % GROUP == 0), "unsupported group size");
  constexpr int kGroupsPerBlock = BLOCK / GROUP;
  constexpr int kBlockWarps = BLOCK / kWarpSize > 0 ? BLOCK / kWarpSize : 1;
  __shared__ acc_t shared_max[kBlockWarps];
  __shared__ acc_t shared_sum[kBlockWarps];
  const int lane = threadIdx.x % GROUP;
  const int group = threadIdx.x / GROUP;
  const long long positions = g.rows * g.spatial;
  const long long C = g.classes;
  const acc_t forward_scale = a.fold_mean_into_forward ? a.state[0] : acc_t(1);
  acc_t thread_loss = 0;
  long long thread_count = 0;
  // Uniform trip count across the block so that shuffles and barriers see every thread.
  for (long long base = static_cast<long long>(blockIdx.x) * kGroupsPerBlock; base < positions;
       base += static_cast<long long>(gridDim.x) * kGroupsPerBlock) {
    const long long p = base + group;
    const bool active = p < positions;
    const long long n = active ? p / g.spatial : 0;
    const long long s = active ? p - n * g.spatial : 0;
    const scalar_t* row = input + n * g.input_stride_n + s * g.input_stride_s;
    scalar_t* grad_row = a.compute_grad ? grad + n * g.grad_stride_n + s * g.grad_stride_s : nullptr;
    PositionTarget<acc_t> t{0, true, false};
    if (active) t = read_target(a, p, C);
    const bool read_row = active && !t.ignored;

    LogSumExpState<acc_t> lse{negative_infinity<acc_t>(), acc_t(0)};
    if (read_row) {
      if (VEC > 1) {
        for (long long c = static_cast<long long>(lane) * VEC; c < C; c += static_cast<long long>(GROUP) * VEC) {
          const Packed<scalar_t, VEC> x = *reinterpret_cast<const Packed<scalar_t, VEC>*>(row + c);
#pragma unroll
          for (int k = 0; k < VEC; ++k) lse = lse_add(lse, to_acc(x.v[k]));
        }
      } else {
        for (long long c = lane; c < C; c += GROUP) lse = lse_add(lse, to_acc(row[c * g.input_stride_c]));
      }
    }
    if (GROUP == BLOCK) {
      lse = block_lse_merge<BLOCK>(lse, shared_max, shared_sum);
    } else {
      lse = group_lse_merge<GROUP>(lse);
    }
    if (!active) continue;

    FocalTerms<acc_t> terms{acc_t(0), acc_t(0), acc_t(0)};
    if (!t.ignored) terms = position_terms(a, t, row, g.input_stride_c, lse);
    if (lane == 0) {
      thread_loss += terms.loss;
      thread_count += t.valid ? 1 : 0;
      if (a.reduction == kReductionNone) loss_out[p] = from_acc<scalar_t>(terms.loss);
    }
    if (!a.compute_grad) continue;
    // The gradient is grad_coef * p_j off the target, -grad_coef * (1 - p_t) on it;
    // ignored positions get exact zeros (0 * exp(NaN) would not be 0).
    const acc_t scale = t.ignored ? acc_t(0) : terms.grad_coef * forward_scale / lse.sum;
    const acc_t target_grad = t.ignored ? acc_t(0) : focal_grad(terms, acc_t(0), true) * forward_scale;
    const long long target_class = t.valid ? t.index : -1;
    if (VEC > 1) {
      for (long long c = static_cast<long long>(lane) * VEC; c < C; c += static_cast<long long>(GROUP) * VEC) {
        Packed<scalar_t, VEC> out;
        if (t.ignored) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) out.v[k] = from_acc<scalar_t>(acc_t(0));
        } else {
          const Packed<scalar_t, VEC> x = *reinterpret_cast<const Packed<scalar_t, VEC>*>(row + c);
#pragma unroll
          for (int k = 0; k < VEC; ++k) {
            const acc_t gk = math_exp(to_acc(x.v[k]) - lse.max) * scale;
            out.v[k] = from_acc<scalar_t>(c + k == target_class ? target_grad : gk);
          }
        }
        *reinterpret_cast<Packed<scalar_t, VEC>*>(grad_row + c) = out;
      }
    } else {
      for (long long c = lane; c < C; c += GROUP) {
        acc_t gc = acc_t(0);
        if (!t.ignored) gc = c == target_class ? target_grad : math_exp(to_acc(row[c * g.input_stride_c]) - lse.max) * scale;
        grad_row[c * g.grad_stride_c] = from_acc<scalar_t>(gc);
      }
    }
  }
  reduce_and_finalize<BLOCK>(thread_loss, thread_count, a, loss_out);
}

// ---------------------------------------------------------------------------
// Channels kernel: one thread per position, walking the classes at stride
// stride_c. For channel-first layouts (N, C, d1, ..., dk): neighbouring threads
// read neighbouring spatial positions, so every class's load is coalesced and
// the input is read in place, never permuted.
template <typename scalar_t, int BLOCK>
__global__ void __launch_bounds__(BLOCK, kMinBlocksPerSM)
    softmax_focal_loss_channels_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ grad,
                                       scalar_t* __restrict__ loss_out, Geometry g,
                                       ForwardArgs<typename AccumulateType<scalar_t>::type> a) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  const long long positions = g.rows * g.spatial;
  const long long C = g.classes;
  const acc_t forward_scale = a.fold_mean_into_forward ? a.state[0] : acc_t(1);
  acc_t thread_loss = 0;
  long long thread_count = 0;
  for (long long p = static_cast<long long>(blockIdx.x) * BLOCK + threadIdx.x; p < positions;
       p += static_cast<long long>(gridDim.x) * BLOCK) {
    const long long n = p / g.spatial;
    const long long s = p - n * g.spatial;
    const scalar_t* row = input + n * g.input_stride_n + s * g.input_stride_s;
    scalar_t* grad_row = a.compute_grad ? grad + n * g.grad_stride_n + s * g.grad_stride_s : nullptr;
    const PositionTarget<acc_t> t = read_target(a, p, C);
    if (t.ignored) {
      if (a.reduction == kReductionNone) loss_out[p] = from_acc<scalar_t>(acc_t(0));
      if (a.compute_grad) {
        for (long long c = 0; c < C; ++c) grad_row[c * g.grad_stride_c] = from_acc<scalar_t>(acc_t(0));
      }
      continue;
    }
    LogSumExpState<acc_t> lse{negative_infinity<acc_t>(), acc_t(0)};
    for (long long c = 0; c < C; ++c) lse = lse_add(lse, to_acc(row[c * g.input_stride_c]));
    const FocalTerms<acc_t> terms = position_terms(a, t, row, g.input_stride_c, lse);
    thread_loss += terms.loss;
    thread_count += t.valid ? 1 : 0;
    if (a.reduction == kReductionNone) loss_out[p] = from_acc<scalar_t>(terms.loss);
    if (!a.compute_grad) continue;
    const acc_t scale = terms.grad_coef * forward_scale / lse.sum;
    const acc_t target_grad = focal_grad(terms, acc_t(0), true) * forward_scale;
    const long long target_class = t.valid ? t.index : -1;
    for (long long c = 0; c < C; ++c) {
      const acc_t gc = c == target_class ? target_grad : math_exp(to_acc(row[c * g.input_stride_c]) - lse.max) * scale;
      grad_row[c * g.grad_stride_c] = from_acc<scalar_t>(gc);
    }
  }
  reduce_and_finalize<BLOCK>(thread_loss, thread_count, a, loss_out);
}

}  // namespace device
}  // namespace focal_cuda
