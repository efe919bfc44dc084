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
struct ScalarMath;

// The rule on any value type: T a scalar, or a vector of lanes with a Math policy whose
// select_less(a, b, x, y) is a < b ? x : y lane by lane. NaN p_t takes the last piece.
template <typename T, typename S, typename Math = ScalarMath<T>>
FOCAL_HOST_DEVICE T scheduled_gamma_of(const GammaSchedule<S>& s, T p_t) {
  T gamma = T(s.gammas[s.pieces - 1]);
  for (int k = s.pieces - 2; k >= 0; --k) gamma = Math::select_less(p_t, T(s.thresholds[k]), T(s.gammas[k]), gamma);
  return gamma;
}

template <typename T>
FOCAL_HOST_DEVICE T scheduled_gamma(const GammaSchedule<T>& s, T p_t) {
  return scheduled_gamma_of<T, T, ScalarMath<T>>(s, p_t);
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
  static FOCAL_HOST_DEVICE T select_less(T a, T b, T if_less, T otherwise) {  // a < b ? x : y
    return a < b ? if_less : otherwise;
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

// x^n for a whole n >= 0 by square-and-multiply (x^0 = 1, as modulating_factor's 0^0).
template <typename T, typename S>
FOCAL_HOST_DEVICE T whole_power(T x, int n) {
  T result = T(S(1));
  for (; n > 0; n >>= 1) {
    if (n & 1) result = result * x;
    x = x * x;
  }
  return result;
}

// Gammas a schedule raises to by products instead of pow: whole numbers up to 8.
template <typename S>
FOCAL_HOST_DEVICE bool product_gamma(S gamma) {
  return gamma >= S(0) && gamma <= S(8) && gamma == S(static_cast<int>(gamma));
}

// An element's (or lanes') gamma and modulating factor (1 - p_t)^gamma.
template <typename T>
struct ModulatingFactor {
  T gamma;
  T modulating;
};

// With every gamma of the schedule whole and small (FLSD-53: 5, 3, 3), each piece's power
// is a few products, selected per lane like the gamma: cheaper than one pow. Otherwise one
// pow with the lanes' gammas.
template <typename T, typename S, typename Math = ScalarMath<T>>
FOCAL_HOST_DEVICE ModulatingFactor<T> scheduled_modulating_factor(const GammaSchedule<S>& s, T p_t, T one_minus_p) {
  bool products = true;
  for (int k = 0; k < s.pieces; ++k) products = products && product_gamma(s.gammas[k]);
  ModulatingFactor<T> out;
  out.gamma = scheduled_gamma_of<T, S, Math>(s, p_t);
  if (!products) {
    out.modulating = Math::pow(one_minus_p, out.gamma);
    return out;
  }
  out.modulating = whole_power<T, S>(one_minus_p, static_cast<int>(s.gammas[s.pieces - 1]));
  for (int k = s.pieces - 2; k >= 0; --k) {
    out.modulating = Math::select_less(p_t, T(s.thresholds[k]),
                                       whole_power<T, S>(one_minus_p, static_cast<int>(s.gammas[k])), out.modulating);
  }
  return out;
}

// The focal terms given 1 - p, p, the modulating factor (1 - p)^gamma and gamma (per lane):
// one definition for constant gamma (focal_terms) and schedules (scheduled_focal_terms).
template <typename T, typename S, typename Math = ScalarMath<T>>
FOCAL_HOST_DEVICE FocalTerms<T> focal_terms_given_factor(T log_p, T one_minus_p, T p, T modulating, T gamma, T alpha) {
  // log(p) / (1 - p), with its limit -1 where p rounds to 1.
  const T log_p_over_q = Math::select_positive(one_minus_p, log_p / one_minus_p, T(S(-1)));
  FocalTerms<T> t;
  t.loss = Math::neg(alpha * modulating * log_p);
  t.grad_coef = alpha * modulating * (T(S(1)) - gamma * p * log_p_over_q);
  t.one_minus_p = one_minus_p;
  return t;
}

// T: the value type (a scalar, or a vector of lanes); S: the scalar type of gamma.
template <typename T, typename S, typename Math = ScalarMath<T>>
FOCAL_HOST_DEVICE FocalTerms<T> focal_terms(T log_p, S gamma, T alpha) {
  const T one_minus_p = Math::neg(Math::expm1(log_p));
  const T p = Math::exp(log_p);
  const T modulating = modulating_factor<T, S, Math>(one_minus_p, gamma);
  return focal_terms_given_factor<T, S, Math>(log_p, one_minus_p, p, modulating, T(gamma), alpha);
}

// focal_terms with gamma chosen per position from its own p_t by a schedule. The chosen
// gamma is a constant of the position: the gradient does not differentiate the choice.
template <typename T, typename S, typename Math = ScalarMath<T>>
FOCAL_HOST_DEVICE FocalTerms<T> scheduled_focal_terms(T log_p, const GammaSchedule<S>& schedule, T alpha) {
  const T one_minus_p = Math::neg(Math::expm1(log_p));
  const T p = Math::exp(log_p);
  const ModulatingFactor<T> f = scheduled_modulating_factor<T, S, Math>(schedule, p, one_minus_p);
  return focal_terms_given_factor<T, S, Math>(log_p, one_minus_p, p, f.modulating, f.gamma, alpha);
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

// The factor (1 - p_t)^gamma of an element and its gamma, from m = 1 - p_t (constant gamma) or from
// p_t = p y + (1 - p)(1 - y) (a schedule); p, q = 1 - p, y and 1 - y are given.
template <typename T, typename S, typename Math>
struct ConstantGammaFactor {
  S gamma;
  FOCAL_HOST_DEVICE ModulatingFactor<T> operator()(T m, T, T, T, T) const {
    ModulatingFactor<T> f;
    f.gamma = T(gamma);
    f.modulating = modulating_factor<T, S, Math>(m, gamma);
    return f;
  }
};

template <typename T, typename S, typename Math>
struct ScheduleGammaFactor {
  const GammaSchedule<S>& schedule;
  FOCAL_HOST_DEVICE ModulatingFactor<T> operator()(T m, T p, T q, T y, T not_y) const {
    return scheduled_modulating_factor<T, S, Math>(schedule, p * y + q * not_y, m);
  }
};

// use_alpha false: alpha_t = 1 (torchvision's alpha < 0). Factor: one of the two above.
template <typename T, typename S, typename Math, typename Factor>
FOCAL_HOST_DEVICE SigmoidFocalTerms<T> sigmoid_focal_terms_with(T x, T y, S alpha, bool use_alpha, Factor factor) {
  const T zero = T(S(0)), one = T(S(1));
  const T e = Math::exp(Math::neg(Math::abs(x)));
  const T inv = Math::recip(one + e);
  const T p = Math::select_positive(x, inv, e * inv);  // sigmoid(x)
  const T q = Math::select_positive(x, e * inv, inv);  // sigmoid(-x) = 1 - p
  const T ce = Math::select_positive(x, x, zero) - x * y + Math::log1p(e);
  const T not_y = one - y;
  const T m = p * not_y + q * y;
  const ModulatingFactor<T> f = factor(m, p, q, y, not_y);
  const T one_minus_2y = not_y - y;
  const T r = Math::select_positive(m, Math::div(p * q * one_minus_2y, m), one_minus_2y);
  const T p_minus_y = p * not_y - q * y;
  const T alpha_t = use_alpha ? T(alpha) * y + T(S(1) - alpha) * not_y : one;
  SigmoidFocalTerms<T> out;
  out.loss = alpha_t * ce * f.modulating;
  // ce r first: ce reaches |x| (up to the dtype's max) only where r underflows to 0,
  // so gamma ce would overflow to inf and make inf * 0 = NaN.
  out.grad = alpha_t * f.modulating * (p_minus_y + f.gamma * (ce * r));
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

template <typename T, typename S, typename Math = ScalarMath<T>>
FOCAL_HOST_DEVICE SigmoidFocalTerms<T> sigmoid_focal_terms(T x, T y, S gamma, S alpha, bool use_alpha) {
  return sigmoid_focal_terms_with<T, S, Math>(x, y, alpha, use_alpha, ConstantGammaFactor<T, S, Math>{gamma});
}

// sigmoid_focal_terms with gamma chosen per element from its own p_t by a schedule, a
// constant of the element for the gradient (as for softmax).
template <typename T, typename S, typename Math = ScalarMath<T>>
FOCAL_HOST_DEVICE SigmoidFocalTerms<T> scheduled_sigmoid_focal_terms(T x, T y, const GammaSchedule<S>& schedule,
                                                                     S alpha, bool use_alpha) {
  return sigmoid_focal_terms_with<T, S, Math>(x, y, alpha, use_alpha, ScheduleGammaFactor<T, S, Math>{schedule});
}

}  // namespace focal_cuda
