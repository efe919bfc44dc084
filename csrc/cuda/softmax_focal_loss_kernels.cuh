// CUDA device code for softmax focal loss: kernels and device helpers only.
//
// This header includes no ATen or torch headers and uses plain CUDA C++ (warp
// shuffles, shared memory, no inline PTX, no CUB), so it compiles on its own
// and can run on CPU implementations of the CUDA programming model. The
// launchers in softmax_focal_loss_kernel.cu map ATen types onto it.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../focal_loss_math.h"

namespace focal_cuda {
namespace device {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Every kernel asks only for one resident block per SM. Left to its own
// heuristics, ptxas squeezes some variants (float channels kernel on sm_80/sm_90,
// double rows kernels on sm_120) into 32 to 64 registers and spills.
constexpr int kMinBlocksPerSM = 1;

template <typename scalar_t>
struct AccumulateType {
  using type = float;
};
template <>
struct AccumulateType<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename scalar_t>
__device__ __forceinline__ scalar_t from_acc(double x) { return x; }

template <typename acc_t>
__device__ __forceinline__ acc_t negative_infinity();
template <>
__device__ __forceinline__ float negative_infinity<float>() { return __int_as_float(0xff800000); }
template <>
__device__ __forceinline__ double negative_infinity<double>() { return __longlong_as_double(0xfff0000000000000ULL); }

template <typename acc_t>
__device__ __forceinline__ acc_t quiet_nan();
template <>
__device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <>
__device__ __forceinline__ double quiet_nan<double>() { return __longlong_as_double(0x7ff8000000000000ULL); }

// VEC consecutive elements moved as one 16-byte (or narrower) access.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Packed {
  scalar_t v[VEC];
};

// The logits as (N, C, S) with one stride per axis, and the gradient's strides.
struct Geometry {
  long long rows, classes, spatial;
  long long input_stride_n, input_stride_c, input_stride_s;
  long long grad_stride_n, grad_stride_c, grad_stride_s;
};

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

// ---------------------------------------------------------------------------
// Reductions. Fixed trees over fixed thread assignments: the same inputs and
// launch shape give bitwise the same result (no floating-point atomics).

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_down_sync(kFullMask, v, offset);
  return v;  // valid in lane 0
}

// Sum over the block; the result is valid in thread 0. `shared` holds BLOCK / 32 values.
template <int BLOCK, typename T>
__device__ __forceinline__ T block_sum(T v, T* shared) {
  static_assert(BLOCK % kWarpSize == 0, "block size must be a multiple of the warp size");
  constexpr int kWarps = BLOCK / kWarpSize;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  v = warp_sum(v);
  __syncthreads();  // `shared` may still be read from a previous call
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? shared[lane] : T(0);
    v = warp_sum(v);
  }
  return v;
}

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

// Each block's partial (loss, count) is stored; the last block to finish adds
// them in block order and writes the reduced loss and the backward state.
template <int BLOCK, typename scalar_t, typename acc_t>
__device__ void reduce_and_finalize(acc_t loss, long long count, const ForwardArgs<acc_t>& a, scalar_t* loss_out) {
  __shared__ acc_t shared_loss[BLOCK / kWarpSize];
  __shared__ long long shared_count[BLOCK / kWarpSize];
  __shared__ bool is_last_block;
  loss = block_sum<BLOCK>(loss, shared_loss);
  count = block_sum<BLOCK>(count, shared_count);
  if (threadIdx.x == 0) {
    a.partial_loss[blockIdx.x] = loss;
    a.partial_count[blockIdx.x] = count;
    __threadfence();  // partials visible device-wide before the ticket is taken
    is_last_block = atomicAdd(a.ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last_block) return;
  __threadfence();
  const volatile acc_t* partial_loss = a.partial_loss;
  const volatile long long* partial_count = a.partial_count;
  acc_t total_loss = 0;
  long long total_count = 0;
  for (unsigned int b = threadIdx.x; b < gridDim.x; b += BLOCK) {
    total_loss += partial_loss[b];
    total_count += partial_count[b];
  }
  total_loss = block_sum<BLOCK>(total_loss, shared_loss);
  total_count = block_sum<BLOCK>(total_count, shared_count);
  if (threadIdx.x == 0) {
    const acc_t inv_count = total_count > 0 ? acc_t(1) / static_cast<acc_t>(total_count) : acc_t(0);
    const bool mean = a.reduction == kReductionMean;
    if (a.reduction != kReductionNone) loss_out[0] = from_acc<scalar_t>(mean ? total_loss * inv_count : total_loss);
    a.state[0] = a.fold_mean_into_forward ? inv_count : acc_t(1);
    a.state[1] = (mean && !a.fold_mean_into_forward) ? inv_count : acc_t(1);
    a.state[2] = acc_t(0);
  }
}

// ---------------------------------------------------------------------------
// Mean reduction with the normalisation folded into the forward gradient: the
// count of non-ignored targets must be known before any gradient is written.
// Reads the targets only (1 to 8 bytes per position).
template <int BLOCK, typename acc_t>
__global__ void __launch_bounds__(BLOCK, kMinBlocksPerSM)
    count_valid_targets_kernel(const void* target, int target_kind, long long positions, long long classes,
                               long long ignore_index, long long* partial_count, unsigned int* ticket, acc_t* state) {
  __shared__ long long shared_count[BLOCK / kWarpSize];
  __shared__ bool is_last_block;
  long long count = 0;
  for (long long p = static_cast<long long>(blockIdx.x) * BLOCK + threadIdx.x; p < positions;
       p += static_cast<long long>(gridDim.x) * BLOCK) {
    const long long t = load_target(target, p, target_kind);
    count += (t != ignore_index && t >= 0 && t < classes) ? 1 : 0;
  }
  count = block_sum<BLOCK>(count, shared_count);
  if (threadIdx.x == 0) {
    partial_count[blockIdx.x] = count;
    __threadfence();
    is_last_block = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last_block) return;
  __threadfence();
  const volatile long long* partials = partial_count;
  long long total = 0;
  for (unsigned int b = threadIdx.x; b < gridDim.x; b += BLOCK) total += partials[b];
  total = block_sum<BLOCK>(total, shared_count);
  if (threadIdx.x == 0) state[0] = total > 0 ? acc_t(1) / static_cast<acc_t>(total) : acc_t(0);
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

// ---------------------------------------------------------------------------
// Backward: the forward's gradient times grad_output times state[1], written to
// `out` (== `grad` when the buffer is consumed in place). In place, with a scalar
// grad_output whose scale is exactly 1 (loss.backward() on "sum", or on "mean"
// with the count folded into the forward) the kernel returns at once: the N x C
// pass is skipped on the device, without a host synchronisation. A buffer
// already consumed (state[2] != 0) turns the result into NaN rather than a
// silently wrong gradient.
template <typename scalar_t, int BLOCK, int VEC>
__global__ void __launch_bounds__(BLOCK, kMinBlocksPerSM)
    softmax_focal_loss_backward_kernel(const scalar_t* grad, scalar_t* out, Geometry g,
                                       const scalar_t* __restrict__ grad_output, bool scalar_grad_output,
                                       const typename AccumulateType<scalar_t>::type* __restrict__ state) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  const acc_t consumed_factor = state[2] != acc_t(0) ? quiet_nan<acc_t>() : acc_t(1);
  const long long total = g.rows * g.classes * g.spatial;
  const long long stride = static_cast<long long>(gridDim.x) * BLOCK;
  if (scalar_grad_output) {
    const acc_t scale = to_acc(grad_output[0]) * state[1] * consumed_factor;
    if (scale == acc_t(1) && grad == out) return;
    // Both buffers are dense with the same strides: walk their storage.
    for (long long i = (static_cast<long long>(blockIdx.x) * BLOCK + threadIdx.x) * VEC; i < total; i += stride * VEC) {
      Packed<scalar_t, VEC> x = *reinterpret_cast<const Packed<scalar_t, VEC>*>(grad + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) x.v[k] = from_acc<scalar_t>(to_acc(x.v[k]) * scale);
      *reinterpret_cast<Packed<scalar_t, VEC>*>(out + i) = x;
    }
    return;
  }
  // reduction="none": grad_output is (N, S), contiguous.
  const acc_t scale = state[1] * consumed_factor;
  for (long long i = static_cast<long long>(blockIdx.x) * BLOCK + threadIdx.x; i < total; i += stride) {
    const long long s = i % g.spatial;
    const long long c = (i / g.spatial) % g.classes;
    const long long n = i / (g.spatial * g.classes);
    const long long offset = n * g.grad_stride_n + c * g.grad_stride_c + s * g.grad_stride_s;
    out[offset] = from_acc<scalar_t>(to_acc(grad[offset]) * to_acc(grad_output[n * g.spatial + s]) * scale);
  }
}

}  // namespace device
}  // namespace focal_cuda
