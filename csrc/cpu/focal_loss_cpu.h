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

// The denominator of "mean": a count, where 0 gives a zero loss and gradient, or a
// user's normalizer, used as given.
struct MeanDenominator {
  double value;
  bool as_given;
  double inverse() const { return (as_given || value > 0) ? 1.0 / value : 0.0; }
  double divide(double total) const { return (as_given || value > 0) ? total / value : 0.0; }
};

// Where 1/denominator goes: into the forward's gradient (folded), or into the scale
// the backward applies with grad_output.
struct GradientScales {
  double forward = 1.0;
  double backward = 1.0;
};
GradientScales gradient_scales(int64_t reduction, const MeanDenominator& denominator, bool fold_mean_into_forward);

// Writes a forward's reduced loss (the chunk partials added in order) and its state
// [forward scale, backward scale, consumed = 0].
void finish_forward(const at::Tensor& loss, const at::Tensor& state, const std::vector<double>& partial,
                    int64_t reduction, const MeanDenominator& denominator, const GradientScales& scales);

// Where a forward writes its per-element loss (reduction "none"): in the input's dtype, or in
// acc_t (float32) for a 16-bit input with loss_dtype float32. Both null: no per-element loss.
template <typename scalar_t, typename acc_t>
struct PerElementLoss {
  scalar_t* as_input = nullptr;
  acc_t* as_acc = nullptr;

  static PerElementLoss of(const at::Tensor& loss, bool per_element) {
    PerElementLoss out;
    if (!per_element) return out;
    if (loss.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value) {
      out.as_input = loss.data_ptr<scalar_t>();
    } else {
      TORCH_INTERNAL_ASSERT(loss.scalar_type() == c10::CppTypeToScalarType<acc_t>::value);
      out.as_acc = loss.data_ptr<acc_t>();
    }
    return out;
  }
  void store(int64_t i, acc_t v) const {
    if (as_acc != nullptr) {
      as_acc[i] = v;
    } else {
      as_input[i] = static_cast<scalar_t>(v);
    }
  }
};

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
