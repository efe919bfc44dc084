// CUDA device code shared by the softmax and sigmoid kernels: types, loads,
// deterministic reductions, the target count and the backward kernel.
//
// Like every header under csrc/cuda/*.cuh, it includes no ATen or torch headers
// and uses plain CUDA C++ (warp shuffles, shared memory, no inline PTX, no CUB),
// so it compiles on its own and can run on CPU implementations of the CUDA
// programming model.
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

// How grad_output meets the forward's gradient (GradOutputLayout on the host).
constexpr int kGradOutputScalar = 0;
constexpr int kGradOutputElementwise = 1;
constexpr int kGradOutputPerPosition = 2;

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


// Stores each block's partial (loss, count); the last block to finish adds them
// in block order. Returns true in thread 0 of that block, with the totals in
// `loss` and `count`.
template <int BLOCK, typename acc_t>
__device__ bool reduce_block_partials(acc_t& loss, long long& count, acc_t* partial_loss_out,
                                      long long* partial_count_out, unsigned int* ticket) {
  __shared__ acc_t shared_loss[BLOCK / kWarpSize];
  __shared__ long long shared_count[BLOCK / kWarpSize];
  __shared__ bool is_last_block;
  loss = block_sum<BLOCK>(loss, shared_loss);
  count = block_sum<BLOCK>(count, shared_count);
  if (threadIdx.x == 0) {
    partial_loss_out[blockIdx.x] = loss;
    partial_count_out[blockIdx.x] = count;
    __threadfence();  // partials visible device-wide before the ticket is taken
    is_last_block = atomicAdd(ticket, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last_block) return false;
  __threadfence();
  const volatile acc_t* partial_loss = partial_loss_out;
  const volatile long long* partial_count = partial_count_out;
  acc_t total_loss = 0;
  long long total_count = 0;
  for (unsigned int b = threadIdx.x; b < gridDim.x; b += BLOCK) {
    total_loss += partial_loss[b];
    total_count += partial_count[b];
  }
  loss = block_sum<BLOCK>(total_loss, shared_loss);
  count = block_sum<BLOCK>(total_count, shared_count);
  return threadIdx.x == 0;
}

// ---------------------------------------------------------------------------
// Mean reduction with the normalisation folded into the forward gradient: the
// count of non-ignored targets must be known before any gradient is written.
// Reads the targets only (1 to 8 bytes per position). Targets in [0, classes)
// count; state[0] = 1 / (count * items_per_target).
template <int BLOCK, typename acc_t>
__global__ void __launch_bounds__(BLOCK, kMinBlocksPerSM)
    count_valid_targets_kernel(const void* target, int target_kind, long long positions, long long classes,
                               long long ignore_index, long long items_per_target, long long* partial_count,
                               unsigned int* ticket, acc_t* state) {
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
  if (threadIdx.x == 0) state[0] = total > 0 ? acc_t(1) / static_cast<acc_t>(total * items_per_target) : acc_t(0);
}

// ---------------------------------------------------------------------------
// Backward, for either loss: the forward's gradient times grad_output times
// state[1], written to `out` (== `grad` when the buffer is consumed in place). In place, with a scalar
// grad_output whose scale is exactly 1 (loss.backward() on "sum", or on "mean"
// with the count folded into the forward) the kernel returns at once: the N x C
// pass is skipped on the device, without a host synchronisation. A buffer
// already consumed (state[2] != 0) turns the result into NaN rather than a
// silently wrong gradient.
template <typename scalar_t, int BLOCK, int VEC>
__global__ void __launch_bounds__(BLOCK, kMinBlocksPerSM)
    focal_loss_backward_kernel(const scalar_t* grad, scalar_t* out, Geometry g,
                               const scalar_t* __restrict__ grad_output, int grad_output_layout,
                               const typename AccumulateType<scalar_t>::type* __restrict__ state) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  const acc_t consumed_factor = state[2] != acc_t(0) ? quiet_nan<acc_t>() : acc_t(1);
  const long long total = g.rows * g.classes * g.spatial;
  const long long stride = static_cast<long long>(gridDim.x) * BLOCK;
  if (grad_output_layout == kGradOutputScalar) {
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
  const acc_t scale = state[1] * consumed_factor;
  if (grad_output_layout == kGradOutputElementwise) {
    // grad_output has the gradient's strides: walk the three storages together.
    for (long long i = (static_cast<long long>(blockIdx.x) * BLOCK + threadIdx.x) * VEC; i < total; i += stride * VEC) {
      Packed<scalar_t, VEC> x = *reinterpret_cast<const Packed<scalar_t, VEC>*>(grad + i);
      const Packed<scalar_t, VEC> go = *reinterpret_cast<const Packed<scalar_t, VEC>*>(grad_output + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) x.v[k] = from_acc<scalar_t>(to_acc(x.v[k]) * to_acc(go.v[k]) * scale);
      *reinterpret_cast<Packed<scalar_t, VEC>*>(out + i) = x;
    }
    return;
  }
  // kGradOutputPerPosition: grad_output is (N, S), contiguous, broadcast over the classes.
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
