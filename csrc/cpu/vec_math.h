// focal_loss_math.h's elementary functions on at::vec lanes, for the kernel
// bodies compiled once per instruction set (FOCAL_CPU_NAMESPACE).
#pragma once

#include <ATen/cpu/vec/vec.h>

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
  static Vec select_positive(Vec q, Vec if_positive, Vec otherwise) {  // q > 0 ? a : b, lane by lane
    return Vec::blendv(otherwise, if_positive, q > Vec(typename Vec::value_type(0)));
  }
};

}  // namespace
}  // namespace FOCAL_CPU_NAMESPACE
}  // namespace focal_cuda
