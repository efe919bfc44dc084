// Host-side pieces shared by the softmax and sigmoid operators: dtypes, target
// kinds, and the backward ops (focal_loss_backward_ / focal_loss_backward), which
// apply grad_output to the gradient a forward op computed, whichever loss it was.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "focal_loss_math.h"

namespace focal_cuda {

// float32 arithmetic for every input dtype but float64.
at::ScalarType accumulation_type(at::ScalarType input_dtype);

// The kind of an integer class-index tensor, or a TypeError naming `what`.
TargetKind target_kind_of(const at::Tensor& target, const char* op, const char* what);

// Gamma as a piecewise-constant function of p_t (the schema's gamma_thresholds /
// gamma_values / gamma). thresholds[k] pairs with values[k]: the first threshold above
// p_t gives its value; `gamma` holds above every threshold. No thresholds: constant gamma.
struct GammaSchedulePlan {
  std::vector<double> thresholds;  // strictly increasing, in (0, 1]
  std::vector<double> values;      // one per threshold, finite, >= 0
  double gamma = 2.0;              // p_t >= every threshold
  bool constant() const { return thresholds.empty(); }
};

// Validates the schedule (raising ValueError naming the argument and value) for `op`.
GammaSchedulePlan plan_gamma_schedule(double gamma, at::ArrayRef<double> thresholds, at::ArrayRef<double> values,
                                      const char* op);

// The plan as the kernels read it, in their arithmetic type T. Float thresholds are rounded
// up: no float lies in [t, float t), so p < (float t) in float is (double)p < t as given, the
// rule of the public FLSD code (a float32 p_t's .item() against a Python float).
template <typename T>
GammaSchedule<T> kernel_gamma_schedule(const GammaSchedulePlan& plan) {
  GammaSchedule<T> s{};
  s.pieces = static_cast<int>(plan.thresholds.size()) + 1;
  for (size_t k = 0; k < plan.thresholds.size(); ++k) {
    T t = static_cast<T>(plan.thresholds[k]);
    if (static_cast<double>(t) < plan.thresholds[k]) t = std::nextafter(t, T(2));
    s.thresholds[k] = t;
    s.gammas[k] = static_cast<T>(plan.values[k]);
  }
  s.gammas[s.pieces - 1] = static_cast<T>(plan.gamma);
  return s;
}

// The loss's dtype: the input's, or float32 for a float16 / bfloat16 input (autocast's
// rule for losses); anything else raises naming loss_dtype.
at::ScalarType plan_loss_dtype(at::ScalarType input_dtype, std::optional<at::ScalarType> loss_dtype, const char* op);

// How grad_output meets the forward's gradient in a backward.
enum class GradOutputLayout {
  kScalar,       // reduction "sum" / "mean": one number times the stored scale
  kElementwise,  // the gradient's shape (sigmoid, reduction "none")
  kPerPosition,  // the gradient's shape without dim 1, broadcast over the classes (softmax, "none")
};

// Checks the arguments of focal_loss_backward(_) and says how grad_output applies.
GradOutputLayout check_focal_loss_backward(const at::Tensor& grad_input, const at::Tensor& state,
                                           const at::Tensor& grad_output);

// A new tensor with `like`'s sizes, dtype, device and (dense) strides, for a forward's
// gradient. On the CPU it comes from a small pool of recently freed gradient buffers:
// a fresh allocation of that size is mapped page by page and zeroed by the kernel on
// first touch, an extra pass over memory that costs about as much as the gradient
// write itself. FOCAL_CUDA_CPU_GRAD_POOL=0 turns the pool off.
at::Tensor empty_gradient_like(const at::Tensor& like);

// Opt-in check of class-index targets on CUDA (focal_cuda.cuda_target_checks): an
// index outside [0, valid_end) other than ignore_index raises IndexError naming the
// first one, as on the CPU, before anything is written. It synchronises with the
// device, so it is off by default; off, such a target gives NaN at its place.
void set_cuda_target_checks(bool enabled);
bool cuda_target_checks_enabled();
void check_targets_on_device(const at::Tensor& target, int64_t valid_end, int64_t ignore_index, const char* op,
                             const char* what, const std::string& valid_range);

constexpr const char* kGradientConsumedMessage =
    "focal_cuda: this forward's gradient was already consumed by a backward; a second backward through the same "
    "graph (retain_graph=True) is not supported: run the forward again";

}  // namespace focal_cuda
