// CUDA device code for softmax focal loss: kernels and device helpers only.
//
// This header includes no ATen or torch headers and uses plain CUDA C++ (warp
// shuffles, shared memory, no inline PTX, no CUB), so it compiles on its own
// and runs on the CPU emulation of CUDA. The launcher in
// softmax_focal_loss_kernel.cu picks one of four kernels:
//
//   rows      class-contiguous rows ((N, C), channels_last) with C up to 1024
//             (float32) / 2048 (16-bit): a group of GROUP lanes holds the row in
//             registers, SLOTS 16-byte vectors per lane, all loaded before first use;
//             the logits are read once.
//   long_rows class-contiguous rows beyond that: one row per block, staged in
//             shared memory when it fits (read once), else read twice.
//   channels  channel-first (N, C, d1, ..., dk) with C up to C_MAX: each thread
//             holds VEC consecutive positions x C classes in registers.
//   positions any strides, any C: one position per thread, BATCH classes in flight,
//             the row staged in shared memory when it fits, else read twice.
#pragma once

#include "focal_loss_kernels.cuh"

namespace focal_cuda {
namespace device {

template <typename acc_t>
struct SoftmaxArgs {
  const void* target;
  int target_kind;
  long long ignore_index;
  int reduction;
  bool compute_grad;
  acc_t alpha;
  // Per-class weights as given (float32 or float64, any stride: a 0-dim alpha is a
  // stride-0 view), read without a conversion copy; nullptr: none.
  const void* class_weight;
  bool class_weight_double;
  long long class_weight_stride;
  GammaSchedule<acc_t> gamma;
  bool fold_mean_into_forward;
  // [forward gradient scale, backward gradient scale, consumed flag]. With
  // fold_mean_into_forward, count_valid_targets_kernel has written 1/count to
  // state[0] before the forward kernel runs; the forward's last block writes the rest.
  acc_t* state;
  acc_t* partial_loss;       // one per block
  long long* partial_count;  // one per block
  unsigned int* ticket;      // zeroed before the launch
};

// The reduced loss and the backward state, written by the last block.
template <int BLOCK, typename scalar_t, typename acc_t>
__device__ void softmax_reduce_and_finalize(acc_t loss, long long count, const SoftmaxArgs<acc_t>& a,
                                            const LossOut<scalar_t>& loss_out) {
  if (!reduce_block_partials<BLOCK>(loss, count, a.partial_loss, a.partial_count, a.ticket)) return;
  const acc_t inv_count = count > 0 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(0);
  const bool mean = a.reduction == kReductionMean;
  if (a.reduction != kReductionNone) loss_out.store(0, mean ? loss * inv_count : loss);
  a.state[0] = a.fold_mean_into_forward ? inv_count : acc_t(1);
  a.state[1] = (mean && !a.fold_mean_into_forward) ? inv_count : acc_t(1);
  a.state[2] = acc_t(0);
}

// One position's target: its class (when valid; C < 2^31 is checked on the host),
// ignored, or out of range.
struct PositionTarget {
  int index;
  bool ignored;
  bool valid;  // neither ignored nor out of range
};

template <typename acc_t>
__device__ __forceinline__ PositionTarget read_target(const SoftmaxArgs<acc_t>& a, long long p, long long classes) {
  const long long t = load_target(a.target, p, a.target_kind);
  PositionTarget pt;
  pt.ignored = t == a.ignore_index;
  pt.valid = !pt.ignored && t >= 0 && t < classes;
  pt.index = pt.valid ? static_cast<int>(t) : 0;
  return pt;
}

// What a position contributes, from its log-sum-exp (max m, sum s of exp(x - m))
// and its target logit x_t. loss; grad_scale: the gradient of class j is
// exp(x_j - m) * grad_scale off the target; target_grad: the target's gradient.
// Ignored: all zero. Out of range (checked on the host for CPU tensors only, no sync
// here): NaN loss and gradient.
template <typename acc_t>
struct PositionResult {
  acc_t loss;
  acc_t grad_scale;
  acc_t target_grad;
};

template <typename acc_t>
__device__ __forceinline__ PositionResult<acc_t> position_result(const SoftmaxArgs<acc_t>& a, const PositionTarget& t,
                                                                acc_t x_t, acc_t m, acc_t s) {
  // Read where it is used: a value held in a register across the whole loop is what
  // ptxas spills first.
  const acc_t forward_scale = a.fold_mean_into_forward ? a.state[0] : acc_t(1);
  if (t.ignored) return PositionResult<acc_t>{acc_t(0), acc_t(0), acc_t(0)};
  if (!t.valid) {
    const acc_t nan = quiet_nan<acc_t>();
    return PositionResult<acc_t>{nan, nan, nan};
  }
  const acc_t log_p = x_t - m - math_log(s);
  acc_t alpha = a.alpha;
  if (a.class_weight != nullptr) {
    const long long w = t.index * a.class_weight_stride;
    alpha *= a.class_weight_double ? static_cast<acc_t>(static_cast<const double*>(a.class_weight)[w])
                                   : static_cast<acc_t>(static_cast<const float*>(a.class_weight)[w]);
  }
  const acc_t gamma = a.gamma.pieces > 1 ? scheduled_gamma(a.gamma, math_exp(log_p)) : a.gamma.gammas[0];
  const FocalTerms<acc_t> terms = focal_terms(log_p, gamma, alpha);
  PositionResult<acc_t> r;
  r.loss = terms.loss;
  r.grad_scale = terms.grad_coef * forward_scale / s;
  r.target_grad = focal_grad(terms, acc_t(0), true) * forward_scale;
  return r;
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t storage_negative_infinity() {
  return from_acc<scalar_t>(negative_infinity<typename AccumulateType<scalar_t>::type>());
}

// ---------------------------------------------------------------------------
// Rows kernel: GROUP lanes per position, the row in registers.
//
// The row [row, row + C) is covered by 16-byte vectors on the aligned grid that
// starts at row - misalignment(row); vector q belongs to lane q % GROUP, slot
// q / GROUP, so a group's loads of one slot are consecutive (coalesced). Elements
// outside the row, in the first and last vectors, are set to -inf at load (they
// lie in the same 16-byte line as row elements, never outside the allocation).
// Each lane holds SLOTS vectors = 64 bytes (16 elements, 8 for float64); the host
// picks GROUP with GROUP * SLOTS * VEC >= C + VEC - 1. GROUP <= 32 reduces with
// warp shuffles, GROUP of 64 to 256 (several warps per row) through shared memory.
template <typename scalar_t>
struct RowsTile {
  static constexpr int VEC = 16 / static_cast<int>(sizeof(scalar_t));
  static constexpr int SLOTS = sizeof(scalar_t) == 2 ? 2 : 4;
};

// Max or sum over the GROUP lanes of a row, every lane gets the result.
template <int GROUP, bool MAX, typename T>
__device__ __forceinline__ T row_reduce(T v, T* shared) {
  constexpr int kLanes = GROUP < kWarpSize ? GROUP : kWarpSize;
  if (GROUP <= kWarpSize) return MAX ? group_max<kLanes>(v) : group_sum<kLanes>(v);
  constexpr int kWarpsPerGroup = GROUP > kWarpSize ? GROUP / kWarpSize : 1;
  v = MAX ? group_max<kWarpSize>(v) : group_sum<kWarpSize>(v);
  const int warp = threadIdx.x / kWarpSize;
  __syncthreads();  // the slots may still be read from the previous reduction
  if (threadIdx.x % kWarpSize == 0) shared[warp] = v;
  __syncthreads();
  const int first = warp / kWarpsPerGroup * kWarpsPerGroup;
  T total = shared[first];
#pragma unroll
  for (int w = 1; w < kWarpsPerGroup; ++w) total = MAX ? max_acc(total, shared[first + w]) : total + shared[first + w];
  return total;
}

template <typename scalar_t, int GROUP>
__global__ void __launch_bounds__(kBlock, blocks_per_sm<scalar_t>(kMinBlocksPerSM))
    softmax_focal_loss_rows_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ grad,
                                   LossOut<scalar_t> loss_out, Geometry g,
                                   SoftmaxArgs<typename AccumulateType<scalar_t>::type> a) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  constexpr int VEC = RowsTile<scalar_t>::VEC;
  constexpr int SLOTS = RowsTile<scalar_t>::SLOTS;
  static_assert(kBlock % GROUP == 0 && (GROUP <= kWarpSize ? kWarpSize % GROUP == 0 : GROUP % kWarpSize == 0),
                "unsupported group size");
  constexpr int kGroupsPerBlock = kBlock / GROUP;
  __shared__ acc_t shared[kBlock / kWarpSize];
  const int lane = threadIdx.x % GROUP;
  const int group = threadIdx.x / GROUP;
  const long long positions = g.rows * g.spatial;
  const int C = static_cast<int>(g.classes);
  const scalar_t neg_inf = storage_negative_infinity<scalar_t>();
  acc_t thread_loss = 0;
  unsigned int thread_count = 0;  // per thread: far below 2^32
  // Uniform trip count across the block so that every lane reaches the shuffles and barriers.
  for (long long base = static_cast<long long>(blockIdx.x) * kGroupsPerBlock; base < positions;
       base += static_cast<long long>(gridDim.x) * kGroupsPerBlock) {
    const long long p = base + group;
    const bool active = p < positions;
    long long n = p, s = 0;
    if (g.spatial != 1) {
      n = p / g.spatial;
      s = p - n * g.spatial;
    }
    const scalar_t* row = input + (active ? n * g.input_stride_n + s * g.input_stride_s : 0);
    PositionTarget t{0, true, false};
    if (active) t = read_target(a, p, g.classes);
    const bool read = !t.ignored;
    // Issued first: the target's logit (a hit in the lines the row loads bring) ...
    const acc_t x_t = t.valid ? to_acc(row[t.index]) : acc_t(0);
    // ... and every vector of the row.
    const int mis = misalignment<scalar_t, VEC>(row);
    const scalar_t* aligned_row = row - mis;
    // C == 0 (numel 0 with positions; the logits' pointer may be null): no vector, none read.
    const int vectors = C > 0 ? (mis + C + VEC - 1) / VEC : 0;
    Packed<scalar_t, VEC> x[SLOTS];
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) {
      const int q = j * GROUP + lane;
      if (read && q < vectors) {
        x[j] = load_pack<scalar_t, VEC>(aligned_row + q * VEC);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) x[j].v[k] = neg_inf;
      }
    }
    // Elements of the neighbouring rows in the edge vectors.
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) {
      const int q = j * GROUP + lane;
      if (read && (q == 0 || q == vectors - 1)) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const int c = q * VEC + k - mis;
          if (c < 0 || c >= C) x[j].v[k] = neg_inf;
        }
      }
    }
    acc_t m = negative_infinity<acc_t>();
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) m = max_acc(m, to_acc(x[j].v[k]));
    }
    m = row_reduce<GROUP, true>(m, shared);
    acc_t sum = 0;
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum += softmax_exp(to_acc(x[j].v[k]) - m);
    }
    sum = row_reduce<GROUP, false>(sum, shared);
    if (!active) continue;

    const PositionResult<acc_t> r = position_result(a, t, x_t, m, sum);
    if (lane == 0) {
      thread_loss += r.loss;
      thread_count += t.valid ? 1 : 0;
      if (a.reduction == kReductionNone) loss_out.store(p, r.loss);
    }
    if (!a.compute_grad) continue;
    scalar_t* grad_row = grad + n * g.grad_stride_n + s * g.grad_stride_s;
    // The same vector grid when the gradient row is as misaligned as the input row
    // (always, for the dense layouts); else element by element.
    const bool congruent = misalignment<scalar_t, VEC>(grad_row) == mis;
    scalar_t* aligned_grad_row = grad_row - mis;
    auto store_vector = [&](int q, const Packed<scalar_t, VEC>& out) {
      if (congruent && q != 0 && q != vectors - 1) {
        store_pack<scalar_t, VEC>(aligned_grad_row + q * VEC, out);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const int c = q * VEC + k - mis;
          if (c >= 0 && c < C) grad_row[c] = out.v[k];
        }
      }
    };
    if (t.ignored) {
      // Exact zeros (0 * exp(NaN) would not be 0).
      Packed<scalar_t, VEC> zeros;
#pragma unroll
      for (int k = 0; k < VEC; ++k) zeros.v[k] = from_acc<scalar_t>(acc_t(0));
#pragma unroll
      for (int j = 0; j < SLOTS; ++j) {
        if (j * GROUP + lane < vectors) store_vector(j * GROUP + lane, zeros);
      }
      continue;
    }
#pragma unroll
    for (int j = 0; j < SLOTS; ++j) {
      const int q = j * GROUP + lane;
      if (q >= vectors) continue;
      Packed<scalar_t, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) out.v[k] = from_acc<scalar_t>(softmax_exp(to_acc(x[j].v[k]) - m) * r.grad_scale);
      store_vector(q, out);
    }
    // The target's gradient replaces what its lane just stored (same thread: ordered).
    if (t.valid && ((t.index + mis) / VEC) % GROUP == lane) grad_row[t.index] = from_acc<scalar_t>(r.target_grad);
  }
  softmax_reduce_and_finalize<kBlock>(thread_loss, thread_count, a, loss_out);
}

// ---------------------------------------------------------------------------
// Block-wide online log-sum-exp: (max, sum of exp(x - max)) merged across the block.
template <int BLOCK, typename acc_t>
__device__ __forceinline__ LogSumExpState<acc_t> block_lse_merge(LogSumExpState<acc_t> s, acc_t* shared_max,
                                                                 acc_t* shared_sum) {
  constexpr int kWarps = BLOCK / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    LogSumExpState<acc_t> other;
    other.max = __shfl_xor_sync(kFullMask, s.max, offset);
    other.sum = __shfl_xor_sync(kFullMask, s.sum, offset);
    s = lse_merge(s, other);
  }
  __syncthreads();  // the shared slots may still be read from the previous row
  if (threadIdx.x % kWarpSize == 0) {
    shared_max[threadIdx.x / kWarpSize] = s.max;
    shared_sum[threadIdx.x / kWarpSize] = s.sum;
  }
  __syncthreads();
  LogSumExpState<acc_t> total{shared_max[0], shared_sum[0]};
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total = lse_merge(total, LogSumExpState<acc_t>{shared_max[w], shared_sum[w]});
  return total;
}

// Folds a batch of values, already loaded, into an online log-sum-exp state: one
// max over the batch, one rescale of the running sum, then the batch's exps. A
// batch of -inf only (edges, padding) leaves an empty state empty.
template <int BATCH, typename acc_t>
__device__ __forceinline__ LogSumExpState<acc_t> lse_add_batch(LogSumExpState<acc_t> st, const acc_t (&v)[BATCH]) {
  acc_t batch_max = v[0];
#pragma unroll
  for (int i = 1; i < BATCH; ++i) batch_max = max_acc(batch_max, v[i]);
  const acc_t m = max_acc(st.max, batch_max);
  if (m == negative_infinity<acc_t>()) {
    // Nothing but -inf so far (edges, padding); a NaN, which fmax skipped, still counts.
#pragma unroll
    for (int i = 0; i < BATCH; ++i) {
      if (v[i] != v[i]) st.sum = v[i];
    }
    return st;
  }
  acc_t sum = rescale_sum(st.sum, st.max, m);
#pragma unroll
  for (int i = 0; i < BATCH; ++i) sum += softmax_exp(v[i] - m);
  // NaN in the batch: fmax skips it, the sum above does not.
  return LogSumExpState<acc_t>{m, sum};
}

// ---------------------------------------------------------------------------
// Long rows: one position per block (C beyond the rows kernel's registers). Pass 1
// reads UNROLL vectors per thread at a time into registers, folds them into an
// online log-sum-exp and, when STAGED, keeps them in shared memory (dynamic, the
// whole row: C * sizeof(scalar_t) + 32 bytes); pass 2 takes them from there (or
// reads them again) and writes the gradient. Each thread handles the vectors
// q = threadIdx.x + i * BLOCK in both passes, so the staging needs no barrier.
template <typename scalar_t>
constexpr int long_rows_block() {
  return sizeof(scalar_t) == 8 ? 512 : 1024;  // 64 registers at 1024 threads, 128 for float64
}

template <typename scalar_t, int BLOCK, bool STAGED>
__global__ void __launch_bounds__(BLOCK, 1)
    softmax_focal_loss_long_rows_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ grad,
                                        LossOut<scalar_t> loss_out, Geometry g,
                                        SoftmaxArgs<typename AccumulateType<scalar_t>::type> a) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  constexpr int VEC = 16 / sizeof(scalar_t);
  constexpr int UNROLL = 2;
  __shared__ acc_t shared_max[BLOCK / kWarpSize];
  __shared__ acc_t shared_sum[BLOCK / kWarpSize];
  FOCAL_DYNAMIC_SHARED_MEMORY(staging_bytes);
  auto* staging = reinterpret_cast<Packed<scalar_t, VEC>*>(staging_bytes);
  const long long positions = g.rows * g.spatial;
  const long long C = g.classes;
  const scalar_t neg_inf = storage_negative_infinity<scalar_t>();
  acc_t thread_loss = 0;
  unsigned int thread_count = 0;  // per thread: far below 2^32
  for (long long p = blockIdx.x; p < positions; p += gridDim.x) {
    long long n = p, s = 0;
    if (g.spatial != 1) {
      n = p / g.spatial;
      s = p - n * g.spatial;
    }
    const scalar_t* row = input + n * g.input_stride_n + s * g.input_stride_s;
    const PositionTarget t = read_target(a, p, C);
    const acc_t x_t = t.valid ? to_acc(row[t.index]) : acc_t(0);
    const int mis = misalignment<scalar_t, VEC>(row);
    const scalar_t* aligned_row = row - mis;
    const long long vectors = C > 0 ? (mis + C + VEC - 1) / VEC : 0;  // C == 0: none (see the rows kernel)
    // A vector as loaded, with the neighbouring rows' elements set to -inf.
    auto load_vector = [&](long long q) {
      Packed<scalar_t, VEC> v = load_pack<scalar_t, VEC>(aligned_row + q * VEC);
      if (q == 0 || q == vectors - 1) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const long long c = q * VEC + k - mis;
          if (c < 0 || c >= C) v.v[k] = neg_inf;
        }
      }
      return v;
    };
    LogSumExpState<acc_t> lse{negative_infinity<acc_t>(), acc_t(0)};
    if (!t.ignored) {
      for (long long q0 = threadIdx.x; q0 < vectors; q0 += static_cast<long long>(BLOCK) * UNROLL) {
        Packed<scalar_t, VEC> x[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          const long long q = q0 + u * BLOCK;
          if (q < vectors) {
            x[u] = load_vector(q);
          } else {
#pragma unroll
            for (int k = 0; k < VEC; ++k) x[u].v[k] = neg_inf;
          }
        }
        acc_t v[UNROLL * VEC];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
          if (STAGED && q0 + u * BLOCK < vectors) staging[q0 + u * BLOCK] = x[u];
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[u * VEC + k] = to_acc(x[u].v[k]);
        }
        lse = lse_add_batch<UNROLL * VEC>(lse, v);
      }
    }
    // Uniform across the block: ignored rows still take part in the barriers.
    lse = block_lse_merge<BLOCK>(lse, shared_max, shared_sum);
    const PositionResult<acc_t> r = position_result(a, t, x_t, lse.max, lse.sum);
    if (threadIdx.x == 0) {
      thread_loss += r.loss;
      thread_count += t.valid ? 1 : 0;
      if (a.reduction == kReductionNone) loss_out.store(p, r.loss);
    }
    if (!a.compute_grad) continue;
    scalar_t* grad_row = grad + n * g.grad_stride_n + s * g.grad_stride_s;
    const bool congruent = misalignment<scalar_t, VEC>(grad_row) == mis;
    scalar_t* aligned_grad_row = grad_row - mis;
    auto store_vector = [&](long long q, const Packed<scalar_t, VEC>& out) {
      if (congruent && q != 0 && q != vectors - 1) {
        store_pack<scalar_t, VEC>(aligned_grad_row + q * VEC, out);
      } else {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const long long c = q * VEC + k - mis;
          if (c >= 0 && c < C) grad_row[c] = out.v[k];
        }
      }
    };
    if (t.ignored) {
      Packed<scalar_t, VEC> zeros;
#pragma unroll
      for (int k = 0; k < VEC; ++k) zeros.v[k] = from_acc<scalar_t>(acc_t(0));
      for (long long q = threadIdx.x; q < vectors; q += BLOCK) store_vector(q, zeros);
      continue;
    }
    for (long long q0 = threadIdx.x; q0 < vectors; q0 += static_cast<long long>(BLOCK) * UNROLL) {
      Packed<scalar_t, VEC> x[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const long long q = q0 + u * BLOCK;
        if (q < vectors) {
          x[u] = STAGED ? staging[q] : load_vector(q);
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) x[u].v[k] = neg_inf;
        }
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const long long q = q0 + u * BLOCK;
        if (q >= vectors) continue;
        Packed<scalar_t, VEC> out;
#pragma unroll
        for (int k = 0; k < VEC; ++k) out.v[k] = from_acc<scalar_t>(softmax_exp(to_acc(x[u].v[k]) - lse.max) * r.grad_scale);
        store_vector(q, out);
      }
    }
    if (t.valid && ((t.index + mis) / VEC) % BLOCK == static_cast<long long>(threadIdx.x)) {
      grad_row[t.index] = from_acc<scalar_t>(r.target_grad);
    }
  }
  softmax_reduce_and_finalize<BLOCK>(thread_loss, thread_count, a, loss_out);
}

// The channels kernel's register tiles: up to 24 classes (Cityscapes' 19, VOC's 21),
// and a small one for binary / few-class segmentation (no idle predicated slots);
// 8 and 4 for float64.
template <typename scalar_t>
constexpr int channels_max_classes() {
  return sizeof(scalar_t) == 8 ? 8 : 24;
}
template <typename scalar_t>
constexpr int channels_small_classes() {
  return sizeof(scalar_t) == 8 ? 4 : 8;
}

// ---------------------------------------------------------------------------
// Channels kernel: channel-first (N, C, d1, ..., dk) with a unit spatial stride
// and C <= C_MAX. Each thread holds one position's C logits in registers: C
// independent loads in flight before the first use (19 for Cityscapes: 38 bytes
// per thread in bfloat16, 76 in float32), the logits read once. Neighbouring
// threads hold neighbouring positions, so every class's loads are coalesced into
// whole 64- or 128-byte segments. Several positions per thread (16-byte loads
// along the spatial axis) would multiply the per-position state past 64 registers
// (ptxas spills at 2 to 8 positions per thread; docs/design.md, section 7).
template <typename scalar_t, int C_MAX>
__global__ void __launch_bounds__(kBlock, blocks_per_sm<scalar_t>(kMinBlocksPerSM))
    softmax_focal_loss_channels_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ grad,
                                       LossOut<scalar_t> loss_out, Geometry g,
                                       SoftmaxArgs<typename AccumulateType<scalar_t>::type> a) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  const long long positions = g.rows * g.spatial;
  const int C = static_cast<int>(g.classes);
  // The running sums live in this thread's shared-memory slots (volatile: read and
  // written once per position) rather than in two registers held across the loop,
  // the values ptxas would otherwise spill to local memory at 80 registers.
  __shared__ acc_t loss_slots[kBlock];
  __shared__ unsigned int count_slots[kBlock];
  volatile acc_t* thread_loss = loss_slots + threadIdx.x;
  volatile unsigned int* thread_count = count_slots + threadIdx.x;
  *thread_loss = acc_t(0);
  *thread_count = 0;
  for (long long p = static_cast<long long>(blockIdx.x) * kBlock + threadIdx.x; p < positions;
       p += static_cast<long long>(gridDim.x) * kBlock) {
    const long long n = p / g.spatial;
    const long long s = p - n * g.spatial;
    const scalar_t* row = input + n * g.input_stride_n + s;
    const PositionTarget t = read_target(a, p, g.classes);
    // 32-bit byte offsets (the host checks (C - 1) * stride_c * sizeof < 2^32 for this
    // kernel): one IMAD.WIDE per address.
    const unsigned stride_bytes = static_cast<unsigned>(g.input_stride_c * sizeof(scalar_t));
    // c unsigned: a zero-extended 32 x 32 -> 64-bit IMAD.WIDE.U32 (a signed int costs a
    // sign-extension and a second IMAD per address).
    auto at = [&](unsigned c) {
      return *reinterpret_cast<const scalar_t*>(reinterpret_cast<const char*>(row) +
                                                static_cast<unsigned long long>(stride_bytes) * c);
    };
    // Every slot is loaded (classes past C read class C - 1 again, an L1 hit) and
    // those are then set to -inf: no per-class predicates to keep for the passes below.
    // C == 0 (numel 0 with positions; the pointer may be null) reads nothing.
    scalar_t x[C_MAX];
#pragma unroll
    for (int c = 0; c < C_MAX; ++c) {
      x[c] = C > 0 ? at(static_cast<unsigned>(c < C ? c : C - 1)) : storage_negative_infinity<scalar_t>();
    }
#pragma unroll
    for (int c = 1; c < C_MAX; ++c) {
      if (c >= C) x[c] = storage_negative_infinity<scalar_t>();
    }
    const acc_t x_t = t.valid ? to_acc(at(static_cast<unsigned>(t.index))) : acc_t(0);
    acc_t m = to_acc(x[0]);
#pragma unroll
    for (int c = 1; c < C_MAX; ++c) m = max_acc(m, to_acc(x[c]));
    acc_t sum = 0;
#pragma unroll
    for (int c = 0; c < C_MAX; ++c) sum += softmax_exp(to_acc(x[c]) - m);
    const PositionResult<acc_t> r = position_result(a, t, x_t, m, sum);
    *thread_loss = *thread_loss + r.loss;
    *thread_count = *thread_count + (t.valid ? 1u : 0u);
    if (a.reduction == kReductionNone) loss_out.store(p, r.loss);
    if (!a.compute_grad) continue;
    scalar_t* grad_row = grad + n * g.grad_stride_n + s;
    // Byte offsets: one IMAD.WIDE per address.
    const unsigned grad_stride_bytes = static_cast<unsigned>(g.grad_stride_c * sizeof(scalar_t));
    auto grad_at = [&](unsigned c) {
      return reinterpret_cast<scalar_t*>(reinterpret_cast<char*>(grad_row) +
                                         static_cast<unsigned long long>(grad_stride_bytes) * c);
    };
    if (t.ignored) {
      // Exact zeros (0 * exp(NaN) would not be 0).
#pragma unroll
      for (int c = 0; c < C_MAX; ++c) {
        if (c < C) *grad_at(c) = from_acc<scalar_t>(acc_t(0));
      }
      continue;
    }
#pragma unroll
    for (int c = 0; c < C_MAX; ++c) {
      if (c < C) *grad_at(c) = from_acc<scalar_t>(softmax_exp(to_acc(x[c]) - m) * r.grad_scale);
    }
    // The target's gradient replaces what was just stored (same thread: ordered).
    if (t.valid) *grad_at(static_cast<unsigned>(t.index)) = from_acc<scalar_t>(r.target_grad);
  }
  softmax_reduce_and_finalize<kBlock>(*thread_loss, *thread_count, a, loss_out);
}

// ---------------------------------------------------------------------------
// Positions kernel: any strides, any C. One position per thread; the classes in
// batches of BATCH loads in flight, folded into an online log-sum-exp. STAGED keeps
// the position's logits in shared memory (dynamic: BLOCK * C * sizeof(scalar_t),
// class-major so that a warp's accesses are consecutive) for the gradient pass;
// otherwise that pass reads them again (from L1 / L2 when the row is recent).
template <typename scalar_t>
constexpr int positions_batch() {
  return sizeof(scalar_t) == 8 ? 4 : 8;
}

template <typename scalar_t, int BATCH, bool STAGED>
__global__ void __launch_bounds__(kBlock, blocks_per_sm<scalar_t>(kMinBlocksPerSM))
    softmax_focal_loss_positions_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ grad,
                                        LossOut<scalar_t> loss_out, Geometry g,
                                        SoftmaxArgs<typename AccumulateType<scalar_t>::type> a) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  FOCAL_DYNAMIC_SHARED_MEMORY(staging_bytes);
  auto* staging = reinterpret_cast<scalar_t*>(staging_bytes);
  const long long positions = g.rows * g.spatial;
  const long long C = g.classes;
  acc_t thread_loss = 0;
  unsigned int thread_count = 0;  // per thread: far below 2^32
  for (long long p = static_cast<long long>(blockIdx.x) * kBlock + threadIdx.x; p < positions;
       p += static_cast<long long>(gridDim.x) * kBlock) {
    long long n = p, s = 0;
    if (g.spatial != 1) {
      n = p / g.spatial;
      s = p - n * g.spatial;
    }
    const scalar_t* row = input + n * g.input_stride_n + s * g.input_stride_s;
    const PositionTarget t = read_target(a, p, C);
    if (t.ignored) {
      if (a.reduction == kReductionNone) loss_out.store(p, acc_t(0));
      if (a.compute_grad) {
        scalar_t* grad_row = grad + n * g.grad_stride_n + s * g.grad_stride_s;
        for (long long c = 0; c < C; ++c) grad_row[c * g.grad_stride_c] = from_acc<scalar_t>(acc_t(0));
      }
      continue;
    }
    const acc_t x_t = t.valid ? to_acc(row[t.index * g.input_stride_c]) : acc_t(0);
    LogSumExpState<acc_t> lse{negative_infinity<acc_t>(), acc_t(0)};
    for (long long c0 = 0; c0 < C; c0 += BATCH) {
      acc_t v[BATCH];
#pragma unroll
      for (int i = 0; i < BATCH; ++i) {
        scalar_t x = storage_negative_infinity<scalar_t>();
        if (c0 + i < C) x = row[(c0 + i) * g.input_stride_c];
        if (STAGED && c0 + i < C) staging[(c0 + i) * kBlock + threadIdx.x] = x;
        v[i] = to_acc(x);
      }
      lse = lse_add_batch<BATCH>(lse, v);
    }
    const PositionResult<acc_t> r = position_result(a, t, x_t, lse.max, lse.sum);
    thread_loss += r.loss;
    thread_count += t.valid ? 1 : 0;
    if (a.reduction == kReductionNone) loss_out.store(p, r.loss);
    if (!a.compute_grad) continue;
    scalar_t* grad_row = grad + n * g.grad_stride_n + s * g.grad_stride_s;
    for (long long c0 = 0; c0 < C; c0 += BATCH) {
      scalar_t x[BATCH];
#pragma unroll
      for (int i = 0; i < BATCH; ++i) {
        if (c0 + i < C) x[i] = STAGED ? staging[(c0 + i) * kBlock + threadIdx.x] : row[(c0 + i) * g.input_stride_c];
      }
#pragma unroll
      for (int i = 0; i < BATCH; ++i) {
        if (c0 + i < C) {
          grad_row[(c0 + i) * g.grad_stride_c] =
              from_acc<scalar_t>(softmax_exp(to_acc(x[i]) - lse.max) * r.grad_scale);
        }
      }
    }
    if (t.valid) grad_row[t.index * g.grad_stride_c] = from_acc<scalar_t>(r.target_grad);
  }
  softmax_reduce_and_finalize<kBlock>(thread_loss, thread_count, a, loss_out);
}

}  // namespace device
}  // namespace focal_cuda
