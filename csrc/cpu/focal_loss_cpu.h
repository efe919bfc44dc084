// Pieces shared by the CPU operators: instruction-set choice, the target scan,
// the fixed work chunks, and the kernel bodies compiled once per instruction set
// (focal_loss_kernels_baseline.cpp, focal_loss_kernels_avx2.cpp).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "../sigmoid_focal_loss.h"
#include "../softmax_focal_loss.h"

namespace focal_cuda {

// Elements per chunk of work: large enough to amortise scheduling, small enough
// to balance two to a few dozen threads. Chunks, not threads, fix the summation
// order, so results do not depend on the thread count.
constexpr int64_t kChunkElements = 1 << 16;

// AVX2 + FMA + F16C available at run time.
bool cpu_has_avx2();

// Counts the targets in [0, valid_end) and raises IndexError for the first one that
// is neither there nor ignore_index, before any output is written.
int64_t scan_class_targets(const void* target, int kind, int64_t count, int64_t valid_end, int64_t ignore_index,
                           const char* op, const char* what, const std::string& valid_range);

// Writes a forward's reduced loss (the chunk partials added in order; "mean" divides
// by `mean_denominator`, or gives 0 when it is <= 0 unless `denominator_as_given`)
// and its state [forward scale, backward scale, consumed = 0].
void finish_forward(const at::Tensor& loss, const at::Tensor& state, const std::vector<double>& partial,
                    int64_t reduction, double mean_denominator, bool denominator_as_given, double forward_scale,
                    double backward_scale);

#define FOCAL_DECLARE_CPU_KERNELS(NS)                                                                              \
  namespace NS {                                                                                                   \
  /* partial[k] receives chunk k's loss sum, in order. */                                                         \
  void softmax_focal_loss_forward_chunks(const SoftmaxFocalForwardPlan& plan, const SoftmaxFocalForwardOutputs& out, \
                                         double alpha, double gamma, int64_t ignore_index, double forward_scale,    \
                                         std::vector<double>& partial);                                             \
  void sigmoid_focal_loss_forward_chunks(const SigmoidFocalForwardPlan& plan, const SigmoidFocalForwardOutputs& out, \
                                         double alpha, double gamma, int64_t ignore_index, double forward_scale,    \
                                         std::vector<double>& partial);                                             \
  }
FOCAL_DECLARE_CPU_KERNELS(baseline)
FOCAL_DECLARE_CPU_KERNELS(avx2)
#undef FOCAL_DECLARE_CPU_KERNELS

}  // namespace focal_cuda
