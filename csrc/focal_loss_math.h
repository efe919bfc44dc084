// Focal-loss math shared by the CPU and CUDA kernels.
//
// Plain C++ with __host__ __device__ annotations: no ATen, no torch, no CUDA
// runtime headers. The CPU kernel compiles it with the host compiler and the
// CUDA kernels with nvcc, so the CPU tests prove the very formulas the GPU runs.
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FOCAL_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Inlined on the host too: the CPU kernels call these on packs of vectors, which
// the compiler otherwise passes through memory.
#define FOCAL_HOST_DEVICE inline __attribute__((always_inline))
#else
#define FOCAL_HOST_DEVICE inline
#endif

namespace focal_cuda {

// Reduction codes: the same numbering as at::Reduction.
enum ReductionMode : int { kReductionNone = 0, kReductionMean = 1, kReductionSum = 2 };

// Target dtypes read as they are (no conversion copy); see load_target.
enum TargetKind : int { kTargetUInt8 = 0, kTargetInt16 = 1, kTargetInt32 = 2, kTargetInt64 = 3 };

FOCAL_HOST_DEVICE long long load_target(const void* target, long long index, int kind) {
  switch (kind) {
    case kTargetUInt8:
      return static_cast<const unsigned char*>(target)[index];
    case kTargetInt16:
      return static_cast<const short*>(target)[index];
    case kTargetInt32:
      return static_cast<const int*>(target)[index];
    default:
      return static_cast<const long long*>(target)[index];
  }
}

// Gamma as a piecewise-constant function of p_t (FLSD, Mukhoti et al. 2020): the first
// k with p_t < thresholds[k] gives gammas[k]; above every threshold, gammas[pieces - 1].
// pieces == 1 is a constant gamma. The kernels treat the chosen gamma as a constant of
// the position (the gradient does not differentiate the choice), as the paper's code does.
constexpr int kMaxGammaPieces = 8;

template <typename T>
struct GammaSchedule {
  int pieces;                         // 1 .. kMaxGammaPieces
  T thresholds[kMaxGammaPieces - 1];  // strictly increasing; float copies are rounded up, so
                                      // that p < t in float means (double)p < t as given
  T gammas[kMaxGammaPieces];
};

template <typename T>
FOCAL_HOST_DEVICE T scheduled_gamma(const GammaSchedule<T>& s, T p_t) {
  T gamma = s.gammas[s.pieces - 1];
  for (int k = s.pieces - 2; k >= 0; --k) gamma = p_t < s.thresholds[k] ? s.gammas[k] : gamma;
  return gamma;
}

// Overloads so templates can call exp/log/... for float and double alike
// without picking up the double versions for float.
FOCAL_HOST_DEVICE float math_exp(float x) { return expf(x); }
FOCAL_HOST_DEVICE double math_exp(double x) { return exp(x); }
FOCAL_HOST_DEVICE float math_log(float x) { return logf(x); }
FOCAL_HOST_DEVICE double math_log(double x) { return log(x); }
FOCAL_HOST_DEVICE float math_expm1(float x) { return expm1f(x); }
FOCAL_HOST_DEVICE double math_expm1(double x) { return expm1(x); }
FOCAL_HOST_DEVICE float math_log1p(float x) { return log1pf(x); }
FOCAL_HOST_DEVICE double math_log1p(double x) { return log1p(x); }
FOCAL_HOST_DEVICE float math_abs(float x) { return fabsf(x); }
FOCAL_HOST_DEVICE double math_abs(double x) { return fabs(x); }
FOCAL_HOST_DEVICE float math_pow(float x, float y) { return powf(x, y); }
FOCAL_HOST_DEVICE double math_pow(double x, double y) { return pow(x, y); }

// A running (max, sum of exp(x - max)) pair: the online-softmax state.
template <typename acc_t>
struct LogSumExpState {
  acc_t max;
  acc_t sum;
};

// exp(from - to) * sum, with an empty state (sum == 0, max == -inf) staying
// empty instead of producing exp(-inf + inf) = NaN.
template <typename acc_t>
FOCAL_HOST_DEVICE acc_t rescale_sum(acc_t sum, acc_t from, acc_t to) {
  return sum == acc_t(0) ? acc_t(0) : sum * math_exp(from - to);
}

template <typename acc_t>
FOCAL_HOST_DEVICE LogSumExpState<acc_t> lse_add(LogSumExpState<acc_t> s, acc_t x) {
  if (x > s.max) {
    // x - x is NaN for x = +inf: a +inf logit makes the row NaN, as
    // log_softmax does (inf - inf), whether or not states are merged later.
    s.sum = rescale_sum(s.sum, s.max, x) + (acc_t(1) + (x - x));
    s.max = x;
  } else if (x != s.max || s.sum != acc_t(0)) {
    // NaN in x lands here and poisons the sum, as log_softmax would. The
    // skipped case is -inf into an empty state: exp(-inf + inf) would be NaN.
    s.sum += math_exp(x - s.max);
  }
  return s;
}

template <typename acc_t>
FOCAL_HOST_DEVICE LogSumExpState<acc_t> lse_merge(LogSumExpState<acc_t> a, LogSumExpState<acc_t> b) {
  const acc_t m = a.max > b.max ? a.max : b.max;
  LogSumExpState<acc_t> out;
  out.max = m;
  out.sum = rescale_sum(a.sum, a.max, m) + rescale_sum(b.sum, b.max, m);
  return out;
}

// Per-element focal terms from log p_t.
//
//   loss      = -alpha (1 - p)^gamma log p
//   dloss/dx_j = alpha F (p_j - [j == t]),
//   F         = (1 - p)^gamma - gamma p (1 - p)^(gamma - 1) log p
//             = (1 - p)^gamma (1 - gamma p log(p) / (1 - p)).
//
// The second form evaluates no negative power, so gamma in (0, 1) with
// p -> 1 stays finite (log(p) / (1 - p) -> -1). 1 - p comes from
// -expm1(log p), which keeps its digits when p is close to 1.
template <typename acc_t>
struct FocalTerms {
  acc_t loss;            // -alpha (1-p)^gamma log p
  acc_t grad_coef;       // alpha F: the gradient is grad_coef * (p_j - [j == t])
  acc_t one_minus_p;     // 1 - p_t, for the j == t gradient: -grad_coef (1 - p_t)
};

// The elementary functions the formulas use, for scalars. The CPU kernel runs
// the same formulas on at::vec::Vectorized lanes through a policy of its own
// with these member names, so there is still one definition of the math.
template <typename T>
struct ScalarMath {
  static FOCAL_HOST_DEVICE T exp(T x) { return math_exp(x); }
  static FOCAL_HOST_DEVICE T expm1(T x) { return math_expm1(x); }
  static FOCAL_HOST_DEVICE T log1p(T x) { return math_log1p(x); }
  static FOCAL_HOST_DEVICE T abs(T x) { return math_abs(x); }
  static FOCAL_HOST_DEVICE T pow(T x, T y) { return math_pow(x, y); }
  static FOCAL_HOST_DEVICE T neg(T x) { return -x; }
  static FOCAL_HOST_DEVICE T recip(T x) { return T(1) / x; }
  static FOCAL_HOST_DEVICE T div(T a, T b) { return a / b; }
  static FOCAL_HOST_DEVICE T select_positive(T q, T if_positive, T otherwise) {  // q > 0 ? a : b
    return q > T(0) ? if_positive : otherwise;
  }
};

// (1 - p)^gamma, with the usual gammas as products (also 0^0 = 1).
template <typename T, typename S, typename Math>
FOCAL_HOST_DEVICE T modulating_factor(T one_minus_p, S gamma) {
  if (gamma == S(0)) return T(S(1));
  if (gamma == S(1)) return one_minus_p;
  if (gamma == S(2)) return one_minus_p * one_minus_p;
  return Math::pow(one_minus_p, T(gamma));
}

// T: the value type (a scalar, or a vector of lanes); S: the scalar type of gamma.
template <typename T, typename S, typename Math = ScalarMath<T>>
FOCAL_HOST_DEVICE FocalTerms<T> focal_terms(T log_p, S gamma, T alpha) {
  const T one_minus_p = Math::neg(Math::expm1(log_p));
  const T p = Math::exp(log_p);
  const T modulating = modulating_factor<T, S, Math>(one_minus_p, gamma);
  // log(p) / (1 - p), with its limit -1 where p rounds to 1.
  const T log_p_over_q = Math::select_positive(one_minus_p, log_p / one_minus_p, T(S(-1)));
  FocalTerms<T> t;
  t.loss = Math::neg(alpha * modulating * log_p);
  t.grad_coef = alpha * modulating * (T(S(1)) - T(gamma) * p * log_p_over_q);
  t.one_minus_p = one_minus_p;
  return t;
}

// Gradient of one logit given its softmax probability p_j.
template <typename acc_t>
FOCAL_HOST_DEVICE acc_t focal_grad(const FocalTerms<acc_t>& t, acc_t p_j, bool is_target) {
  return is_target ? -t.grad_coef * t.one_minus_p : t.grad_coef * p_j;
}

// Sigmoid focal loss of one logit x with target y in [0, 1] (soft labels allowed),
// torchvision's formulation:
//
//   ce   = softplus(x) - x y                 (binary cross entropy with logits)
//   m    = 1 - p_t = p (1 - y) + (1 - p) y,  p = sigmoid(x)
//   loss = alpha_t ce m^gamma,               alpha_t = alpha y + (1 - alpha)(1 - y), or 1
//   dloss/dx = alpha_t (m^gamma (p - y) + gamma ce m^(gamma-1) p (1 - p)(1 - 2y))
//            = alpha_t m^gamma ((p - y) + gamma ce r),  r = p (1 - p)(1 - 2y) / m.
//
// r is bounded (|r| <= 2) and is evaluated without a negative power; where m
// rounds to 0 (hard targets, saturated logits) it takes its limit 1 - 2y. p and
// 1 - p both come from exp(-|x|), so neither tail loses digits, and
// softplus(x) = max(x, 0) + log1p(exp(-|x|)) is finite for every finite x.
template <typename T>
struct SigmoidFocalTerms {
  T loss;
  T grad;
};

// use_alpha false: alpha_t = 1 (torchvision's alpha < 0).
template <typename T, typename S, typename Math = ScalarMath<T>>
FOCAL_HOST_DEVICE SigmoidFocalTerms<T> sigmoid_focal_terms(T x, T y, S gamma, S alpha, bool use_alpha) {
  const T zero = T(S(0)), one = T(S(1));
  const T e = Math::exp(Math::neg(Math::abs(x)));
  const T inv = Math::recip(one + e);
  const T p = Math::select_positive(x, inv, e * inv);  // sigmoid(x)
  const T q = Math::select_positive(x, e * inv, inv);  // sigmoid(-x) = 1 - p
  const T ce = Math::select_positive(x, x, zero) - x * y + Math::log1p(e);
  const T not_y = one - y;
  const T m = p * not_y + q * y;
  const T modulating = modulating_factor<T, S, Math>(m, gamma);
  const T one_minus_2y = not_y - y;
  const T r = Math::select_positive(m, Math::div(p * q * one_minus_2y, m), one_minus_2y);
  const T p_minus_y = p * not_y - q * y;
  const T alpha_t = use_alpha ? T(alpha) * y + T(S(1) - alpha) * not_y : one;
  SigmoidFocalTerms<T> out;
  out.loss = alpha_t * ce * modulating;
  // ce r first: ce reaches |x| (up to the dtype's max) only where r underflows to 0,
  // so gamma ce would overflow to inf and make inf * 0 = NaN.
  out.grad = alpha_t * modulating * (p_minus_y + T(gamma) * (ce * r));
  return out;
}

// The same terms for a hard label (positive: y = 1, else y = 0), as index targets
// have, without the soft-label algebra and its division. With z = x for a negative
// and -x for a positive: 1 - p_t = m = sigmoid(z), p_t = q = sigmoid(-z),
// ce = softplus(z), loss = alpha_t ce m^gamma and
//   dloss/dz = alpha_t m^gamma (m + gamma ce q),  dloss/dx = +-dloss/dz
// (sigmoid_focal_terms with r = q or -p). ce q is bounded, formed before gamma
// multiplies it, as above.
template <typename T, typename Math = ScalarMath<T>>
FOCAL_HOST_DEVICE SigmoidFocalTerms<T> sigmoid_focal_terms_hard(T x, bool positive, T gamma, T alpha_t) {
  const T zero = T(0), one = T(1);
  const T z = positive ? Math::neg(x) : x;
  const T e = Math::exp(Math::neg(Math::abs(z)));
  const T inv = Math::recip(one + e);
  const T m = Math::select_positive(z, inv, e * inv);
  const T q = Math::select_positive(z, e * inv, inv);
  const T ce = Math::select_positive(z, z, zero) + Math::log1p(e);
  const T modulating = modulating_factor<T, T, Math>(m, gamma);
  const T dz = alpha_t * modulating * (m + gamma * (ce * q));
  SigmoidFocalTerms<T> out;
  out.loss = alpha_t * ce * modulating;
  out.grad = positive ? Math::neg(dz) : dz;
  return out;
}

// p_t of a sigmoid element with target y in [0, 1]: p y + (1 - p)(1 - y), for a
// gamma schedule (exact for hard labels).
template <typename T, typename Math = ScalarMath<T>>
FOCAL_HOST_DEVICE T sigmoid_p_t(T x, T y) {
  const T e = Math::exp(Math::neg(Math::abs(x)));
  const T inv = Math::recip(T(1) + e);
  const T p = Math::select_positive(x, inv, e * inv);
  const T q = Math::select_positive(x, e * inv, inv);
  return p * y + q * (T(1) - y);
}

}  // namespace focal_cuda
