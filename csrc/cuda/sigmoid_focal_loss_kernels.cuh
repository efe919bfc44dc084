// CUDA device code for sigmoid focal loss: kernels and device helpers only.
//
// This header includes no ATen or torch headers and uses plain CUDA C++ (warp
// shuffles, shared memory, no inline PTX, no CUB), so it compiles on its own
// and runs on the CPU emulation of CUDA. The launcher in
// sigmoid_focal_loss_kernel.cu picks:
//
//   dense     floating targets of the input's layout: a flat elementwise pass, UNROLL
//             VEC-wide packs of logits and targets in flight per thread.
//   index     class-index targets, classes last ((N, C), (B, A, C)): the same flat
//             pass over the logits; each pack finds its row(s) with one multiply-high
//             division, reads their targets (L1 hits) and compares class indices.
//   channels  class-index targets, channel-first (N, C, d1, ..., dk): each thread
//             owns VEC consecutive positions, reads their targets once, and walks
//             the classes BATCH VEC-wide loads at a time.
#pragma once

#include <type_traits>

#include "focal_loss_kernels.cuh"

namespace focal_cuda {
namespace device {

// n / d by one multiply-high (Granlund and Montgomery, 1994), for 0 <= n < 2^63.
struct FastDivider {
  unsigned long long divisor;
  unsigned long long magic;  // floor(2^64 (2^shift - d) / d) + 1
  int shift;                 // ceil(log2(d))

  // Host side, for the launchers.
  static FastDivider make(long long d) {
    FastDivider f{static_cast<unsigned long long>(d), 0, 0};
    if (d <= 1) return f;
    while ((1ULL << f.shift) < f.divisor) ++f.shift;
    const unsigned __int128 numerator =
        (static_cast<unsigned __int128>(1) << 64) * ((static_cast<unsigned __int128>(1) << f.shift) - f.divisor);
    f.magic = static_cast<unsigned long long>(numerator / f.divisor) + 1;
    return f;
  }

  // n < 2^63, so the sum below cannot overflow.
  __device__ __forceinline__ long long divide(long long n) const {
    if (divisor == 1) return n;
    const unsigned long long u = static_cast<unsigned long long>(n);
    return static_cast<long long>((__umul64hi(u, magic) + u) >> shift);
  }
};

template <typename acc_t>
struct SigmoidArgs {
  int reduction;
  bool compute_grad;
  GammaSchedule<acc_t> gamma;
  acc_t alpha;
  bool use_alpha;  // alpha >= 0
  // Index targets: one per row, `classes` = background.
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
  // One normalizer per image (nullptr: none): element e belongs to image
  // e / image_elements; its loss and gradient are divided by image_normalizer[image].
  const acc_t* image_normalizer;
  FastDivider by_image_elements;
  // With fold_mean_into_forward and count_rows, count_valid_targets_kernel has
  // written 1 / denominator to state[0] before the forward kernel runs.
  bool fold_mean_into_forward;
  acc_t* state;              // [forward gradient scale, backward gradient scale, consumed flag]
  acc_t* partial_loss;       // one per block
  long long* partial_count;  // one per block
  unsigned int* ticket;      // zeroed before the launch
};

template <typename acc_t>
__device__ __forceinline__ acc_t inverse_or_zero(acc_t d) {
  return d > acc_t(0) ? acc_t(1) / d : acc_t(0);
}

template <typename acc_t>
__device__ __forceinline__ acc_t sigmoid_forward_scale(const SigmoidArgs<acc_t>& a) {
  if (!a.fold_mean_into_forward || a.image_normalizer != nullptr) return acc_t(1);
  if (a.normalizer != nullptr) return acc_t(1) / *a.normalizer;
  if (a.count_rows) return a.state[0];
  return a.host_denominator_as_given ? acc_t(1) / a.host_denominator : inverse_or_zero(a.host_denominator);
}

// The reduced loss and the backward state, written by the last block. `rows` is
// the number of non-ignored rows (index targets; unused otherwise).
template <int BLOCK, typename scalar_t, typename acc_t>
__device__ void sigmoid_reduce_and_finalize(acc_t loss, long long rows, long long classes, const SigmoidArgs<acc_t>& a,
                                            const LossOut<scalar_t>& loss_out) {
  if (!reduce_block_partials<BLOCK>(loss, rows, a.partial_loss, a.partial_count, a.ticket)) return;
  acc_t inverse, mean;
  if (a.image_normalizer != nullptr) {  // the per-image division happened per element
    inverse = acc_t(1);
    mean = loss;
  } else if (a.normalizer != nullptr || a.host_denominator_as_given) {
    const acc_t d = a.normalizer != nullptr ? *a.normalizer : a.host_denominator;
    inverse = acc_t(1) / d;
    mean = loss / d;
  } else {
    const acc_t d = a.count_rows ? static_cast<acc_t>(rows * classes) : a.host_denominator;
    inverse = inverse_or_zero(d);
    mean = d > acc_t(0) ? loss / d : acc_t(0);
  }
  const bool is_mean = a.reduction == kReductionMean;
  if (a.reduction != kReductionNone) loss_out.store(0, is_mean ? mean : loss);
  a.state[0] = a.fold_mean_into_forward ? inverse : acc_t(1);
  a.state[1] = (is_mean && !a.fold_mean_into_forward) ? inverse : acc_t(1);
  a.state[2] = acc_t(0);
}

// Per-image normalizers (a.image_normalizer set) for a pack of VEC elements starting
// at element e0: elements k >= boundary belong to the next image.
template <typename acc_t>
struct PackScale {
  acc_t first, second;
  int boundary;
};

template <int VEC, typename acc_t>
__device__ __forceinline__ PackScale<acc_t> pack_scale(const SigmoidArgs<acc_t>& a, long long e0) {
  PackScale<acc_t> s{acc_t(1), acc_t(1), VEC};
  const long long b = a.by_image_elements.divide(e0);
  const long long end = (b + 1) * static_cast<long long>(a.by_image_elements.divisor);
  s.first = acc_t(1) / a.image_normalizer[b];
  if (end - e0 < VEC) {
    s.boundary = static_cast<int>(end - e0);
    s.second = acc_t(1) / a.image_normalizer[b + 1];
  }
  return s;
}

// Per-element loss stores for reduction "none", in the loss's dtype.
template <typename scalar_t, int VEC, typename acc_t>
__device__ __forceinline__ void store_loss_pack(const LossOut<scalar_t>& out, long long first, const acc_t (&v)[VEC]) {
  if (out.acc_dtype) {
    Packed<acc_t, VEC> p;
#pragma unroll
    for (int k = 0; k < VEC; ++k) p.v[k] = v[k];
    store_pack<acc_t, VEC>(static_cast<acc_t*>(out.ptr) + first, p);
  } else {
    Packed<scalar_t, VEC> p;
#pragma unroll
    for (int k = 0; k < VEC; ++k) p.v[k] = from_acc<scalar_t>(v[k]);
    store_pack<scalar_t, VEC>(static_cast<scalar_t*>(out.ptr) + first, p);
  }
}

// The gamma of one element: the schedule's piece for its p_t, or the constant.
template <typename acc_t>
__device__ __forceinline__ acc_t image_scale(const SigmoidArgs<acc_t>& a, long long e) {
  return a.image_normalizer == nullptr ? acc_t(1) : acc_t(1) / a.image_normalizer[a.by_image_elements.divide(e)];
}

template <typename Math, typename acc_t>
__device__ __forceinline__ acc_t element_gamma(const GammaSchedule<acc_t>& schedule, acc_t x, acc_t y) {
  return schedule.pieces > 1 ? scheduled_gamma(schedule, sigmoid_p_t<acc_t, Math>(x, y)) : schedule.gammas[0];
}

// Runs body(per_image, gamma_two) with compile-time tags for the two uniform choices a
// kernel makes per element: per-image normalizers or not, and gamma a constant 2 (the
// usual focal loss: then (1 - p_t)^gamma is one multiply, the schedule and the
// gamma == 0 / 1 / 2 tests of modulating_factor fold away) or anything else.
template <typename acc_t, typename Body>
__device__ __forceinline__ void with_uniform_choices(const SigmoidArgs<acc_t>& a, Body&& body) {
  const bool two = a.gamma.pieces == 1 && a.gamma.gammas[0] == acc_t(2);
  if (a.image_normalizer == nullptr) {
    two ? body(std::false_type{}, std::true_type{}) : body(std::false_type{}, std::false_type{});
  } else {
    two ? body(std::true_type{}, std::true_type{}) : body(std::true_type{}, std::false_type{});
  }
}

// ---------------------------------------------------------------------------
// Dense targets (the input's layout, soft labels allowed): a flat elementwise
// pass over `numel` elements, UNROLL packs of VEC (16 bytes of logits) per thread
// in flight, then the tail. VEC == 1 when a base is not aligned.
template <typename scalar_t, typename target_t, int VEC>
__global__ void __launch_bounds__(kBlock, blocks_per_sm<scalar_t>(kMinBlocksPerSM))
    sigmoid_focal_loss_dense_kernel(const scalar_t* __restrict__ input, const target_t* __restrict__ target,
                                    scalar_t* __restrict__ grad, LossOut<scalar_t> loss_out, long long numel,
                                    SigmoidArgs<typename AccumulateType<scalar_t>::type> a) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  using Math = typename ElementwiseMath<scalar_t>::type;
  // Packs in flight per thread: 32 to 48 bytes of logits and targets (8 elements of 16-bit
  // logits are already 16 bytes, and a second pack would pass 64 registers).
  constexpr int UNROLL = VEC == 8 ? 1 : VEC > 1 ? 2 : 4;
  const acc_t forward_scale = sigmoid_forward_scale(a);
  const bool write_loss = a.reduction == kReductionNone;
  const long long packs = numel / VEC;
  const long long stride = static_cast<long long>(gridDim.x) * kBlock * UNROLL;
  acc_t thread_loss = 0;
  auto element = [&](acc_t x, acc_t y, acc_t& loss, acc_t& g, auto gamma_two) {
    const acc_t gamma = decltype(gamma_two)::value ? acc_t(2) : element_gamma<Math>(a.gamma, x, y);
    const SigmoidFocalTerms<acc_t> t = sigmoid_focal_terms<acc_t, acc_t, Math>(x, y, gamma, a.alpha, a.use_alpha);
    loss = t.loss;
    g = t.grad * forward_scale;
  };
  for (long long i = static_cast<long long>(blockIdx.x) * kBlock * UNROLL + threadIdx.x; i < packs; i += stride) {
    Packed<scalar_t, VEC> x[UNROLL];
    Packed<target_t, VEC> y[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const long long j = i + u * kBlock;
      if (j < packs) {
        x[u] = load_pack<scalar_t, VEC>(input + j * VEC);
        y[u] = load_pack<target_t, VEC>(target + j * VEC);
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const long long j = i + u * kBlock;
      if (j >= packs) continue;
      acc_t loss[VEC];
      Packed<scalar_t, VEC> g;
      // Four copies of the element loop (with_uniform_choices): without per-image
      // normalizers (the usual case) nothing is scaled per element.
      auto elements = [&](auto per_image, auto gamma_two) {
        PackScale<acc_t> ps{acc_t(1), acc_t(1), VEC};
        if constexpr (decltype(per_image)::value) ps = pack_scale<VEC>(a, j * VEC);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          acc_t gk;
          element(to_acc(x[u].v[k]), to_acc(y[u].v[k]), loss[k], gk, gamma_two);
          if constexpr (decltype(per_image)::value) {
            const acc_t sk = k >= ps.boundary ? ps.second : ps.first;
            loss[k] *= sk;
            gk *= sk;
          }
          thread_loss += loss[k];
          g.v[k] = from_acc<scalar_t>(gk);
        }
      };
      with_uniform_choices(a, elements);
      if (write_loss) store_loss_pack<scalar_t, VEC>(loss_out, j * VEC, loss);
      if (a.compute_grad) store_pack<scalar_t, VEC>(grad + j * VEC, g);
    }
  }
  for (long long e = packs * VEC + static_cast<long long>(blockIdx.x) * kBlock + threadIdx.x; e < numel;
       e += static_cast<long long>(gridDim.x) * kBlock) {
    acc_t loss, gk;
    element(to_acc(input[e]), to_acc(target[e]), loss, gk, std::false_type{});
    const acc_t scale = image_scale(a, e);
    loss *= scale;
    gk *= scale;
    thread_loss += loss;
    if (write_loss) loss_out.store(e, loss);
    if (a.compute_grad) grad[e] = from_acc<scalar_t>(gk);
  }
  sigmoid_reduce_and_finalize<kBlock>(thread_loss, 0LL, 1LL, a, loss_out);
}

// One row's index target, as the elements of that row see it, in one register: the
// positive class (>= 0), or kBackground, kIgnored, kOutOfRange. C < 2^31 is
// checked on the host.
struct RowTarget {
  static constexpr int kBackground = -1;
  static constexpr int kIgnored = -2;
  static constexpr int kOutOfRange = -3;
  int code;
  __device__ __forceinline__ int positive() const { return code; }  // matches no class unless >= 0
  __device__ __forceinline__ bool valid() const { return code >= kBackground; }
  __device__ __forceinline__ bool ignored() const { return code == kIgnored; }
};

template <typename acc_t>
__device__ __forceinline__ RowTarget read_row_target(const SigmoidArgs<acc_t>& a, long long r, long long classes) {
  const long long t = load_target(a.target, r, a.target_kind);
  RowTarget rt;
  rt.code = t == a.ignore_index            ? RowTarget::kIgnored
            : t < 0 || t > classes         ? RowTarget::kOutOfRange
            : t == classes                 ? RowTarget::kBackground
                                           : static_cast<int>(t);
  return rt;
}

// Terms of one element of a row with index target; an ignored row gives exact
// zeros, an out-of-range target (checked on the host for CPU tensors only: no
// sync here) NaN.
template <typename Math, bool GAMMA_TWO = false, typename acc_t>
__device__ __forceinline__ void index_element(const SigmoidArgs<acc_t>& a, acc_t x, bool positive, bool valid,
                                              bool ignored, acc_t forward_scale, acc_t& loss, acc_t& grad) {
  const acc_t alpha_t = !a.use_alpha ? acc_t(1) : positive ? a.alpha : acc_t(1) - a.alpha;
  acc_t gamma = acc_t(2);
  if (!GAMMA_TWO) {
    gamma = a.gamma.gammas[0];
    if (a.gamma.pieces > 1) {
      gamma = scheduled_gamma(a.gamma, sigmoid_p_t<acc_t, Math>(x, positive ? acc_t(1) : acc_t(0)));
    }
  }
  const SigmoidFocalTerms<acc_t> t = sigmoid_focal_terms_hard<acc_t, Math>(x, positive, gamma, alpha_t);
  if (valid) {
    loss = t.loss;
    grad = t.grad * forward_scale;
  } else {
    loss = ignored ? acc_t(0) : quiet_nan<acc_t>();
    grad = loss;
  }
}

// ---------------------------------------------------------------------------
// Index targets, classes last: rows of `classes` contiguous logits, one target per
// row (`classes` = background). A flat pass in VEC-element packs (VEC <= classes,
// so a pack touches at most two rows); the row of a pack's first element comes
// from one multiply-high. No one-hot tensor exists anywhere. Rows are counted (for
// "mean") by the pack holding their first element.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, blocks_per_sm<scalar_t>(kMinBlocksPerSM))
    sigmoid_focal_loss_index_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ grad,
                                    LossOut<scalar_t> loss_out, long long rows, long long classes, FastDivider by_classes,
                                    SigmoidArgs<typename AccumulateType<scalar_t>::type> a) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  using Math = typename ElementwiseMath<scalar_t>::type;
  // 16-bit logits: one 16-byte pack per thread in flight (1024 threads x 16 B = 16 KB per SM at
  // 4 blocks); a second pack spills past 64 registers in the gamma = 2 copy, whose shorter
  // dependency chains ptxas interleaves more.
  constexpr int UNROLL = VEC == 8 ? 1 : VEC > 1 ? 2 : 4;
  const acc_t forward_scale = sigmoid_forward_scale(a);
  const bool write_loss = a.reduction == kReductionNone;
  const long long numel = rows * classes;
  const long long packs = numel / VEC;
  const long long stride = static_cast<long long>(gridDim.x) * kBlock * UNROLL;
  acc_t thread_loss = 0;
  unsigned int thread_rows = 0;  // per thread: far below 2^32
  for (long long i = static_cast<long long>(blockIdx.x) * kBlock * UNROLL + threadIdx.x; i < packs; i += stride) {
    Packed<scalar_t, VEC> x[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (i + u * kBlock < packs) x[u] = load_pack<scalar_t, VEC>(input + (i + u * kBlock) * VEC);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const long long j = i + u * kBlock;
      if (j >= packs) continue;
      const long long e0 = j * VEC;
      const long long r0 = by_classes.divide(e0);
      const long long c0 = e0 - r0 * classes;
      // Elements k >= boundary belong to row r0 + 1.
      const int boundary = classes - c0 < VEC ? static_cast<int>(classes - c0) : VEC;
      const RowTarget t0 = read_row_target(a, r0, classes);
      RowTarget t1 = t0;
      if (boundary < VEC) t1 = read_row_target(a, r0 + 1, classes);
      thread_rows += (c0 == 0 && t0.valid() ? 1 : 0) + (boundary < VEC && t1.valid() ? 1 : 0);
      // The positive element's index in the pack, per row (-1: none here).
      const long long d0 = t0.positive() - c0;
      const int k0 = t0.positive() >= 0 && d0 >= 0 && d0 < VEC ? static_cast<int>(d0) : -1;
      const int k1 = t1.positive() >= 0 && t1.positive() + boundary < VEC ? t1.positive() + boundary : -1;
      acc_t loss[VEC];
      Packed<scalar_t, VEC> g;
      auto elements = [&](auto per_image, auto gamma_two) {
        PackScale<acc_t> ps{acc_t(1), acc_t(1), VEC};
        if constexpr (decltype(per_image)::value) ps = pack_scale<VEC>(a, e0);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          acc_t gk;
          const bool second = k >= boundary;
          const RowTarget rt{second ? t1.code : t0.code};
          index_element<Math, decltype(gamma_two)::value>(a, to_acc(x[u].v[k]), k == k0 || k == k1, rt.valid(),
                                                          rt.ignored(), forward_scale, loss[k], gk);
          if constexpr (decltype(per_image)::value) {
            const acc_t sk = k >= ps.boundary ? ps.second : ps.first;
            loss[k] *= sk;
            gk *= sk;
          }
          thread_loss += loss[k];
          g.v[k] = from_acc<scalar_t>(gk);
        }
      };
      with_uniform_choices(a, elements);
      if (write_loss) store_loss_pack<scalar_t, VEC>(loss_out, e0, loss);
      if (a.compute_grad) store_pack<scalar_t, VEC>(grad + e0, g);
    }
  }
  for (long long e = packs * VEC + static_cast<long long>(blockIdx.x) * kBlock + threadIdx.x; e < numel;
       e += static_cast<long long>(gridDim.x) * kBlock) {
    const long long r = by_classes.divide(e);
    const long long c = e - r * classes;
    const RowTarget rt = read_row_target(a, r, classes);
    if (c == 0 && rt.valid()) ++thread_rows;
    acc_t loss, gk;
    index_element<Math>(a, to_acc(input[e]), c == rt.positive(), rt.valid(), rt.ignored(), forward_scale, loss, gk);
    const acc_t scale = image_scale(a, e);
    loss *= scale;
    gk *= scale;
    thread_loss += loss;
    if (write_loss) loss_out.store(e, loss);
    if (a.compute_grad) grad[e] = from_acc<scalar_t>(gk);
  }
  sigmoid_reduce_and_finalize<kBlock>(thread_loss, thread_rows, classes, a, loss_out);
}

// Positions per thread of the channel-first kernel: 16-byte loads for 4- and 8-byte
// types; 8-byte loads (4 positions) for 16-bit ones, whose 8 positions per thread
// exceed 64 registers with bfloat16 (ptxas spills).
template <typename scalar_t>
constexpr int sigmoid_channels_vec() {
  return sizeof(scalar_t) == 2 ? 4 : 16 / static_cast<int>(sizeof(scalar_t));
}

// ---------------------------------------------------------------------------
// Index targets, channel-first (N, C, d1, ..., dk) with a unit spatial stride:
// each thread owns VEC consecutive positions (spatial % VEC == 0, VEC-aligned
// strides and bases), reads their VEC targets once, then walks the C classes,
// BATCH VEC-wide loads in flight at a time; neighbouring threads own neighbouring
// positions, so every class's loads are coalesced. Outputs keep the input's layout.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kBlock, blocks_per_sm<scalar_t>(kMinBlocksPerSM))
    sigmoid_focal_loss_channels_kernel(const scalar_t* __restrict__ input, scalar_t* __restrict__ grad,
                                       LossOut<scalar_t> loss_out, long long images, long long classes,
                                       long long spatial, long long input_stride_n, long long input_stride_c,
                                       SigmoidArgs<typename AccumulateType<scalar_t>::type> a) {
  using acc_t = typename AccumulateType<scalar_t>::type;
  using Math = typename ElementwiseMath<scalar_t>::type;
  constexpr int BATCH = 4;
  const acc_t forward_scale = sigmoid_forward_scale(a);
  const bool write_loss = a.reduction == kReductionNone;
  const long long packs_per_image = spatial / VEC;
  const long long packs = images * packs_per_image;
  // The outputs are dense channel-first: (N, C, S) contiguous.
  const long long out_stride_n = classes * spatial;
  acc_t thread_loss = 0;
  unsigned int thread_rows = 0;  // per thread: far below 2^32
  for (long long pk = static_cast<long long>(blockIdx.x) * kBlock + threadIdx.x; pk < packs;
       pk += static_cast<long long>(gridDim.x) * kBlock) {
    const long long n = pk / packs_per_image;
    const long long s = (pk - n * packs_per_image) * VEC;
    const scalar_t* base = input + n * input_stride_n + s;
    const long long out_base = n * out_stride_n + s;
    RowTarget t[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      t[v] = read_row_target(a, n * spatial + s + v, classes);
      thread_rows += t[v].valid() ? 1 : 0;
    }
    // A per-image normalizer divides the forward gradient scale (1 then) and the loss.
    const acc_t image = a.image_normalizer == nullptr ? acc_t(1) : acc_t(1) / a.image_normalizer[n];
    const acc_t element_scale = forward_scale * image;
    for (long long c0 = 0; c0 < classes; c0 += BATCH) {
      Packed<scalar_t, VEC> x[BATCH];
#pragma unroll
      for (int b = 0; b < BATCH; ++b) {
        if (c0 + b < classes) x[b] = load_pack<scalar_t, VEC>(base + (c0 + b) * input_stride_c);
      }
      auto classes_of_batch = [&](auto gamma_two) {
#pragma unroll
        for (int b = 0; b < BATCH; ++b) {
          const long long c = c0 + b;
          if (c >= classes) continue;
          acc_t loss[VEC];
          Packed<scalar_t, VEC> g;
#pragma unroll
          for (int v = 0; v < VEC; ++v) {
            acc_t gk;
            index_element<Math, decltype(gamma_two)::value>(a, to_acc(x[b].v[v]), c == t[v].positive(),
                                                            t[v].valid(), t[v].ignored(), element_scale, loss[v], gk);
            loss[v] *= image;
            thread_loss += loss[v];
            g.v[v] = from_acc<scalar_t>(gk);
          }
          if (write_loss) store_loss_pack<scalar_t, VEC>(loss_out, out_base + c * spatial, loss);
          if (a.compute_grad) store_pack<scalar_t, VEC>(grad + out_base + c * spatial, g);
        }
      };
      // One copy only: a gamma-2 copy here keeps too many elements' temporaries live.
      classes_of_batch(std::false_type{});
    }
  }
  sigmoid_reduce_and_finalize<kBlock>(thread_loss, thread_rows, classes, a, loss_out);
}

}  // namespace device
}  // namespace focal_cuda
