// focal_loss_math.h's elementary functions on at::vec lanes, for the kernel
// bodies compiled once per instruction set (FOCAL_CPU_NAMESPACE).
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <limits>

#ifndef FOCAL_CPU_NAMESPACE
#error "define FOCAL_CPU_NAMESPACE before including vec_math.h"
#endif

namespace focal_cuda {
namespace FOCAL_CPU_NAMESPACE {
namespace {

template <typename Vec>
struct VecMath {
  static Vec exp(Vec x) { return x.exp(); }
  static Vec expm1(Vec x) { return x.expm1(); }
  static Vec log1p(Vec x) { return x.log1p(); }
  static Vec abs(Vec x) { return x.abs(); }
  static Vec pow(Vec x, Vec y) { return x.pow(y); }
  static Vec neg(Vec x) { return x.neg(); }
  static Vec recip(Vec x) { return Vec(typename Vec::value_type(1)) / x; }
  static Vec div(Vec a, Vec b) { return a / b; }
  static Vec select_positive(Vec q, Vec if_positive, Vec otherwise) {  // q > 0 ? a : b, lane by lane
    return Vec::blendv(otherwise, if_positive, q > Vec(typename Vec::value_type(0)));
  }
  static Vec select_less(Vec a, Vec b, Vec if_less, Vec otherwise) {  // a < b ? x : y, lane by lane
    return Vec::blendv(otherwise, if_less, a < b);
  }
};

// K independent vectors handled as one value. The focal formulas are long
// chains of dependent operations (exp, divide, log, ...); on one vector they
// run at the latency of the chain, on K side by side at the throughput of the
// units. Arithmetic is lane by lane; comparisons give lane masks, as at::vec's.
template <typename Vec, int K>
struct VecPack {
  using value_type = typename Vec::value_type;
  Vec v[K];

  VecPack() = default;
  explicit VecPack(value_type s) {
    for (int k = 0; k < K; ++k) v[k] = Vec(s);
  }
  static constexpr int size() { return K * Vec::size(); }
  static VecPack loadu(const value_type* p) {
    VecPack r;
    for (int k = 0; k < K; ++k) r.v[k] = Vec::loadu(p + k * Vec::size());
    return r;
  }
  void store(value_type* p) const {
    for (int k = 0; k < K; ++k) v[k].store(p + k * Vec::size());
  }
  template <typename F>
  static VecPack map(F f, const VecPack& a) {
    VecPack r;
    for (int k = 0; k < K; ++k) r.v[k] = f(a.v[k]);
    return r;
  }
  template <typename F>
  static VecPack map(F f, const VecPack& a, const VecPack& b) {
    VecPack r;
    for (int k = 0; k < K; ++k) r.v[k] = f(a.v[k], b.v[k]);
    return r;
  }
  static VecPack blendv(const VecPack& a, const VecPack& b, const VecPack& mask) {
    VecPack r;
    for (int k = 0; k < K; ++k) r.v[k] = Vec::blendv(a.v[k], b.v[k], mask.v[k]);
    return r;
  }
};

#define FOCAL_VEC_PACK_OPERATOR(OP)                                                   \
  template <typename Vec, int K>                                                       \
  VecPack<Vec, K> operator OP(const VecPack<Vec, K>& a, const VecPack<Vec, K>& b) {    \
    return VecPack<Vec, K>::map([](const Vec& x, const Vec& y) { return x OP y; }, a, b); \
  }
FOCAL_VEC_PACK_OPERATOR(+)
FOCAL_VEC_PACK_OPERATOR(-)
FOCAL_VEC_PACK_OPERATOR(*)
FOCAL_VEC_PACK_OPERATOR(/)
FOCAL_VEC_PACK_OPERATOR(>)
FOCAL_VEC_PACK_OPERATOR(<)
FOCAL_VEC_PACK_OPERATOR(==)
#undef FOCAL_VEC_PACK_OPERATOR

template <typename Vec, int K>
struct VecMath<VecPack<Vec, K>> {
  using Pack = VecPack<Vec, K>;
  static Pack exp(const Pack& x) { return Pack::map(VecMath<Vec>::exp, x); }
  static Pack expm1(const Pack& x) { return Pack::map(VecMath<Vec>::expm1, x); }
  static Pack log1p(const Pack& x) { return Pack::map(VecMath<Vec>::log1p, x); }
  static Pack abs(const Pack& x) { return Pack::map(VecMath<Vec>::abs, x); }
  static Pack pow(const Pack& x, const Pack& y) { return Pack::map(VecMath<Vec>::pow, x, y); }
  static Pack neg(const Pack& x) { return Pack::map(VecMath<Vec>::neg, x); }
  static Pack recip(const Pack& x) { return Pack::map(VecMath<Vec>::recip, x); }
  static Pack div(const Pack& a, const Pack& b) { return Pack::map(VecMath<Vec>::div, a, b); }
  static Pack select_positive(const Pack& q, const Pack& if_positive, const Pack& otherwise) {
    Pack r;
    for (int k = 0; k < K; ++k) r.v[k] = VecMath<Vec>::select_positive(q.v[k], if_positive.v[k], otherwise.v[k]);
    return r;
  }
  static Pack select_less(const Pack& a, const Pack& b, const Pack& if_less, const Pack& otherwise) {
    Pack r;
    for (int k = 0; k < K; ++k) r.v[k] = VecMath<Vec>::select_less(a.v[k], b.v[k], if_less.v[k], otherwise.v[k]);
    return r;
  }
};

}  // namespace
}  // namespace FOCAL_CPU_NAMESPACE
}  // namespace focal_cuda
