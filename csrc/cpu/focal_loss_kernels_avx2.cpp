// The CPU kernels with AVX2 + FMA + F16C (at::vec's 256-bit Vectorized, Sleef exp).
// Chosen at run time only on CPUs that have all three (cpu_has_avx2).
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c")
// The pragma enables the instructions but not the feature macros that sleef.h
// and at::vec test; this translation unit is AVX2 + FMA + F16C throughout.
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define FOCAL_CPU_NAMESPACE avx2
#include "sigmoid_focal_loss_impl.h"
#include "softmax_focal_loss_impl.h"
#else
#include <ATen/ATen.h>

#include "focal_loss_cpu.h"
namespace focal_cuda {
namespace avx2 {
void softmax_focal_loss_forward_chunks(const SoftmaxFocalForwardPlan&, const SoftmaxFocalForwardOutputs&, double,
                                       double, int64_t, double, std::vector<double>&) {
  TORCH_INTERNAL_ASSERT(false, "focal_cuda: AVX2 kernels are not built for this CPU architecture");
}
void sigmoid_focal_loss_forward_chunks(const SigmoidFocalForwardPlan&, const SigmoidFocalForwardOutputs&, double,
                                       double, int64_t, double, std::vector<double>&) {
  TORCH_INTERNAL_ASSERT(false, "focal_cuda: AVX2 kernels are not built for this CPU architecture");
}
}  // namespace avx2
}  // namespace focal_cuda
#endif
