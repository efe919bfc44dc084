// CUDA device code shared by the softmax and sigmoid kernels: types, vector
// loads, the math policies, deterministic reductions, the target count and the
// backward kernel.
//
// Like every header under csrc/cuda/*.cuh, it includes no ATen or torch headers
// and uses plain CUDA C++ (warp shuffles, shared memory, no inline PTX, no CUB),
// so it compiles on its own and runs on the CPU emulation of CUDA in
// tests/cuda_emulation.
//
// Design rules every kernel here follows (docs/design.md, section 7):
//   * several independent loads issued before the first use (register tiles or
//     unrolled batches), 16-byte accesses wherever alignment allows;
//   * per-element index arithmetic folded into compile-time offsets from a row or
//     pack base pointer, so 64-bit addressing costs per row, not per element;
//   * at most 64 registers at 256 threads (4 blocks, 32 warps per SM on sm_80 /
//     sm_90) for the memory-bound kernels, one resident wave, grid-stride loops.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "../focal_loss_math.h"

// Dynamic shared memory. The CPU emulation replaces this with its own per-block buffer.
#ifndef FOCAL_DYNAMIC_SHARED_MEMORY
#define FOCAL_DYNAMIC_SHARED_MEMORY(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace focal_cuda {
namespace device {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Threads per block of the memory-bound kernels, and the resident blocks per SM
// they are compiled for: 4 x 256 threads = 32 warps, half of an sm_80 / sm_90 SM,
// caps them at 64 registers.
constexpr int kBlock = 256;
constexpr int kMinBlocksPerSM = 4;
// float64 is for correctness, not speed: its accurate pow / log / expm1 take twice the
// registers, so its kernels get 128.
template <typename scalar_t>
constexpr int blocks_per_sm(int blocks) {
  return sizeof(scalar_t) == 8 ? 2 : blocks;
}

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
__device__ __forceinline__ float to_acc(unsigned char x) { return static_cast<float>(x); }

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

__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

// ---------------------------------------------------------------------------
// Math policies. The formulas live once, in focal_loss_math.h; what differs per
// dtype is how the elementary functions are evaluated.

// exp(x) for the softmax terms, whose sum is at least 1: __expf's flush of results
// below 2^-126 to 0 and its few-ulp error are invisible there; one FMUL + MUFU.EX2.
__device__ __forceinline__ float softmax_exp(float x) { return __expf(x); }
__device__ __forceinline__ double softmax_exp(double x) { return exp(x); }

// Elementwise sigmoid terms, for outputs rounded to 16 bits (float16 / bfloat16):
// hardware approximations (relative error ~2^-21, far below the 2^-11 of the store).
struct FastFloatMath {
  static __device__ __forceinline__ float exp(float x) { return __expf(x); }
  static __device__ __forceinline__ float expm1(float x) { return expm1f(x); }
  // log(1 + x) for x in [0, 1] (the sigmoid's exp(-|x|)): the series below 2^-7, where
  // log(1 + x) rounded would lose the digits of x; __logf above.
  static __device__ __forceinline__ float log1p(float x) {
    const float series = x * (1.0f - x * (0.5f - x * (1.0f / 3.0f)));
    return x < 0.0078125f ? series : __logf(1.0f + x);
  }
  static __device__ __forceinline__ float abs(float x) { return fabsf(x); }
  static __device__ __forceinline__ float pow(float x, float y) { return x > 0.0f ? __expf(y * __logf(x)) : (y == 0.0f ? 1.0f : 0.0f); }
  static __device__ __forceinline__ float neg(float x) { return -x; }
  static __device__ __forceinline__ float recip(float x) { return __fdividef(1.0f, x); }
  static __device__ __forceinline__ float div(float a, float b) { return __fdividef(a, b); }
  static __device__ __forceinline__ float select_positive(float q, float a, float b) { return q > 0.0f ? a : b; }
};

// float32 / float64 outputs: the accurate library functions.
template <typename T>
struct AccurateMath : ScalarMath<T> {
  static __device__ __forceinline__ T recip(T x) { return T(1) / x; }
  static __device__ __forceinline__ T div(T a, T b) { return a / b; }
};

template <typename scalar_t>
struct ElementwiseMath {
  using type = AccurateMath<typename AccumulateType<scalar_t>::type>;
};
template <>
struct ElementwiseMath<__half> {
  using type = FastFloatMath;
};
template <>
struct ElementwiseMath<__nv_bfloat16> {
  using type = FastFloatMath;
};

// ---------------------------------------------------------------------------
// Vector accesses.

// VEC consecutive elements moved as one access of VEC * sizeof(scalar_t) bytes.
template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Packed {
  scalar_t v[VEC];
};

template <typename scalar_t, int VEC>
__device__ __forceinline__ Packed<scalar_t, VEC> load_pack(const scalar_t* p) {
  return *reinterpret_cast<const Packed<scalar_t, VEC>*>(p);
}
template <typename scalar_t, int VEC>
__device__ __forceinline__ void store_pack(scalar_t* p, const Packed<scalar_t, VEC>& x) {
  *reinterpret_cast<Packed<scalar_t, VEC>*>(p) = x;
}

// Offset of p in elements from the previous VEC-element boundary.
template <typename scalar_t, int VEC>
__device__ __forceinline__ int misalignment(const scalar_t* p) {
  return static_cast<int>((reinterpret_cast<unsigned long long>(p) / sizeof(scalar_t)) & (VEC - 1));
}

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

// Max and sum over GROUP consecutive lanes (a power of two <= 32); every lane of
// the group gets the result.
template <int GROUP, typename T>
__device__ __forceinline__ T group_max(T v) {
#pragma unroll
  for (int offset = GROUP / 2; offset > 0; offset /= 2) v = max_acc(v, __shfl_xor_sync(kFullMask, v, offset, GROUP));
  return v;
}
template <int GROUP, typename T>
__device__ __forceinline__ T group_sum(T v) {
#pragma unroll
  for (int offset = GROUP / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset, GROUP);
  return v;
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

// Max and sum over the block, every thread gets the result. `shared` holds BLOCK / 32 values.
template <int BLOCK, typename T>
__device__ __forceinline__ T block_all_max(T v, T* shared) {
  constexpr int kWarps = BLOCK / kWarpSize;
  v = group_max<kWarpSize>(v);
  __syncthreads();
  if (threadIdx.x % kWarpSize == 0) shared[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  T total = shared[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total = max_acc(total, shared[w]);
  return total;
}
template <int BLOCK, typename T>
__device__ __forceinline__ T block_all_sum(T v, T* shared) {
  constexpr int kWarps = BLOCK / kWarpSize;
  v = group_sum<kWarpSize>(v);
  __syncthreads();
  if (threadIdx.x % kWarpSize == 0) shared[threadIdx.x / kWarpSize] = v;
  __syncthreads();
  T total = shared[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total += shared[w];
  return total;
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

// Where a forward writes its loss: the input's dtype, or the accumulation dtype
// (float32 for 16-bit inputs under autocast, as F.cross_entropy returns there).
template <typename scalar_t>
struct LossOut {
  void* ptr;
  bool acc_dtype;  // the loss is stored in the accumulation dtype
  template <typename acc_t>
  __device__ __forceinline__ void store(long long i, acc_t v) const {
    if (acc_dtype) {
      static_cast<acc_t*>(ptr)[i] = v;
    } else {
      static_cast<scalar_t*>(ptr)[i] = from_acc<scalar_t>(v);
    }
  }
};

// ---------------------------------------------------------------------------
// Class-index targets, read as they are (uint8, int16, int32, int64).

template <typename target_t>
struct TargetType {};
template <>
struct TargetType<unsigned char> {
  static constexpr int kind = kTargetUInt8;
  static constexpr long long lowest = 0, highest = 255;
};
template <>
struct TargetType<short> {
  static constexpr int kind = kTargetInt16;
  static constexpr long long lowest = -32768, highest = 32767;
};
template <>
struct TargetType<int> {
  static constexpr int kind = kTargetInt32;
  static constexpr long long lowest = -2147483648LL, highest = 2147483647LL;
};
template <>
struct TargetType<long long> {
  static constexpr int kind = kTargetInt64;
  static constexpr long long lowest = -9223372036854775807LL - 1, highest = 9223372036854775807LL;
};

// Mean reduction with the normalisation folded into the forward gradient: the
// count of non-ignored targets must be known before any gradient is written.
// Reads the targets only, 16 bytes per access, four accesses in flight per
// thread. Targets in [0, classes) count; state[0] = 1 / (count * items_per_target).
template <int BLOCK, typename target_t, typename acc_t>
__global__ void __launch_bounds__(BLOCK, kMinBlocksPerSM)
    count_valid_targets_kernel(const target_t* __restrict__ target, long long positions, long long classes,
                               long long ignore_index, long long items_per_target, long long* partial_count,
                               unsigned int* ticket, acc_t* state) {
  constexpr int VEC = 16 / sizeof(target_t);
  constexpr int UNROLL = VEC > 4 ? 2 : 4;
  __shared__ long long shared_count[BLOCK / kWarpSize];
  __shared__ bool is_last_block;
  // Compared in the target's own width: an ignore_index the dtype cannot hold matches
  // nothing, and classes above its range are all of it.
  using compare_t = typename std::conditional<sizeof(target_t) == 8, long long, int>::type;
  constexpr long long lowest = TargetType<target_t>::lowest, highest = TargetType<target_t>::highest;
  const bool ignore_representable = ignore_index >= lowest && ignore_index <= highest;
  const compare_t ignore = ignore_representable ? static_cast<compare_t>(ignore_index) : compare_t(-1);
  // classes <= highest + 1 keeps class_end in range (int64: classes < 2^63 always).
  const compare_t class_end = static_cast<compare_t>(classes > highest ? highest : classes) + (classes > highest ? 1 : 0);
  auto valid = [&](target_t raw) {
    const compare_t t = static_cast<compare_t>(raw);
    return ((!ignore_representable || t != ignore) && t >= 0 && t < class_end) ? 1u : 0u;
  };
  unsigned int count = 0;  // per thread: far below 2^32
  // The unaligned head, then 16-byte packs, then the tail.
  const int head_len = static_cast<int>(
      (positions < VEC ? positions : (VEC - misalignment<target_t, VEC>(target)) & (VEC - 1)));
  if (blockIdx.x == 0 && static_cast<int>(threadIdx.x) < head_len) count += valid(target[threadIdx.x]);
  const target_t* body = target + head_len;
  const long long packs = (positions - head_len) / VEC;
  const long long stride = static_cast<long long>(gridDim.x) * BLOCK * UNROLL;
  for (long long i = static_cast<long long>(blockIdx.x) * BLOCK * UNROLL + threadIdx.x; i < packs; i += stride) {
    Packed<target_t, VEC> t[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (i + u * BLOCK < packs) t[u] = load_pack<target_t, VEC>(body + (i + u * BLOCK) * VEC);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (i + u * BLOCK < packs) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) count += valid(t[u].v[k]);
      }
    }
  }
  const long long tail_begin = head_len + packs * VEC;
  for (long long p = tail_begin + static_cast<long long>(blockIdx.x) * BLOCK + threadIdx.x; p < positions;
       p += static_cast<long long>(gridDim.x) * BLOCK) {
    count += valid(target[p]);
  }
  long long block_count = block_sum<BLOCK>(static_cast<long long>(count), shared_count);
  if (threadIdx.x == 0) {
    partial_count[blockIdx.x] = block_count;
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
// state[1], written to `out` (== `grad` when the buffer is consumed in place). In
// place, with a scalar grad_output whose scale is exactly 1 (loss.backward() on
// "sum", or on "mean" with the count folded into the forward) the kernel returns
// at once: the N x C pass is skipped on the device, without a host
// synchronisation. A buffer already consumed (state[2] != 0) turns the result into
// NaN rather than a silently wrong gradient.
//
// The scalar and elementwise layouts walk the dense storage in VEC-element packs,
// UNROLL of them in flight per thread (`total` elements; VEC == 1 when the buffers
// are not 16-byte aligned). The per-position layout (softmax "none": grad_output
// of shape (N, S) broadcast over the classes) walks positions of the (N, C, S)
// geometry, one position per thread, classes in an unrolled loop.
template <typename scalar_t, int BLOCK, int VEC>
__global__ void __launch_bounds__(BLOCK, kMinBlocksPerSM)
    focal_loss_backward_kernel(const scalar_t* grad, scalar_t* out, Geometry g,
                               const scalar_t* __restrict__ grad_output, int grad_output_layout,
                               const typename AccumulateType<scalar_t>::type* __restrict__ state) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  constexpr int UNROLL = VEC > 1 ? 2 : 4;
  const acc_t consumed_factor = state[2] != acc_t(0) ? quiet_nan<acc_t>() : acc_t(1);
  if (grad_output_layout == kGradOutputPerPosition) {
    const acc_t scale = state[1] * consumed_factor;
    const long long positions = g.rows * g.spatial;
    for (long long p = static_cast<long long>(blockIdx.x) * BLOCK + threadIdx.x; p < positions;
         p += static_cast<long long>(gridDim.x) * BLOCK) {
      const long long n = p / g.spatial;
      const long long s = p - n * g.spatial;
      const long long base = n * g.grad_stride_n + s * g.grad_stride_s;
      const acc_t factor = to_acc(grad_output[p]) * scale;
      long long c = 0;
      for (; c + UNROLL <= g.classes; c += UNROLL) {
        scalar_t v[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) v[u] = grad[base + (c + u) * g.grad_stride_c];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) out[base + (c + u) * g.grad_stride_c] = from_acc<scalar_t>(to_acc(v[u]) * factor);
      }
      for (; c < g.classes; ++c) {
        const long long o = base + c * g.grad_stride_c;
        out[o] = from_acc<scalar_t>(to_acc(grad[o]) * factor);
      }
    }
    return;
  }
  const bool elementwise = grad_output_layout == kGradOutputElementwise;
  const acc_t scale =
      elementwise ? state[1] * consumed_factor : to_acc(grad_output[0]) * state[1] * consumed_factor;
  if (!elementwise && scale == acc_t(1) && grad == out) return;
  const long long total = g.rows * g.classes * g.spatial;
  const long long packs = total / VEC;
  const long long stride = static_cast<long long>(gridDim.x) * BLOCK * UNROLL;
  for (long long i = static_cast<long long>(blockIdx.x) * BLOCK * UNROLL + threadIdx.x; i < packs; i += stride) {
    Packed<scalar_t, VEC> x[UNROLL], go[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const long long j = i + u * BLOCK;
      if (j < packs) {
        x[u] = load_pack<scalar_t, VEC>(grad + j * VEC);
        if (elementwise) go[u] = load_pack<scalar_t, VEC>(grad_output + j * VEC);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const long long j = i + u * BLOCK;
      if (j < packs) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t f = elementwise ? to_acc(go[u].v[k]) * scale : scale;
          x[u].v[k] = from_acc<scalar_t>(to_acc(x[u].v[k]) * f);
        }
        store_pack<scalar_t, VEC>(out + j * VEC, x[u]);
      }
    }
  }
  for (long long e = packs * VEC + static_cast<long long>(blockIdx.x) * BLOCK + threadIdx.x; e < total;
       e += static_cast<long long>(gridDim.x) * BLOCK) {
    const acc_t f = elementwise ? to_acc(grad_output[e]) * scale : scale;
    out[e] = from_acc<scalar_t>(to_acc(grad[e]) * f);
  }
}

}  // namespace device
}  // namespace focal_cuda
