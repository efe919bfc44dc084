// Host-side pieces shared by the CPU and CUDA implementations of
// focal_cuda::softmax_focal_loss_forward: argument checks, the (N, C, S) view
// of the logits, and output allocation.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "focal_loss.h"
#include "focal_loss_math.h"

namespace focal_cuda {

// The logits seen as (N, C, S), S the product of the spatial sizes, with one
// stride per axis. Any input whose spatial dims collapse into one stride is read
// in place (contiguous, channels_last, transposed (N, C), sliced rows, ...).
struct SoftmaxFocalGeometry {
  int64_t rows = 0;     // N
  int64_t classes = 0;  // C
  int64_t spatial = 1;  // S
  int64_t input_stride_n = 0, input_stride_c = 0, input_stride_s = 0;
  int64_t grad_stride_n = 0, grad_stride_c = 0, grad_stride_s = 0;
  int64_t positions() const { return rows * spatial; }
};

struct SoftmaxFocalForwardPlan {
  at::Tensor input;   // the logits, possibly made contiguous if their strides do not collapse
  at::Tensor target;  // contiguous, dtype as given
  // On the input's device: CPU, contiguous in the accumulation dtype; CUDA, float32 /
  // float64 as given (any stride).
  std::optional<at::Tensor> class_weight;
  SoftmaxFocalGeometry geometry;
  TargetKind target_kind = kTargetInt64;
  int64_t reduction = kReductionMean;
  bool compute_grad = false;
  // Mean reduction: fold 1/count into the forward gradient (so that the usual
  // loss.backward() needs no pass over N x C), except for float16, whose range
  // would underflow a gradient divided by a large count; float16 keeps the
  // unnormalised gradient and the backward applies 1/count with grad_output.
  bool fold_mean_into_forward = false;
  GammaSchedulePlan gamma_schedule;
  at::ScalarType loss_dtype = at::kFloat;  // the input's, or float32 for 16-bit inputs (autocast)
};

// Validates every argument (raising before anything is written) and prepares the views.
SoftmaxFocalForwardPlan plan_softmax_focal_loss_forward(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& class_weight,
    double alpha, double gamma, int64_t ignore_index, int64_t reduction, bool compute_grad,
    at::ArrayRef<double> gamma_thresholds = {}, at::ArrayRef<double> gamma_values = {},
    std::optional<at::ScalarType> loss_dtype = std::nullopt);

// Outputs of the forward op:
//   loss   reduction "none": target-shaped; else 0-dim. Input dtype.
//   grad   d loss / d input (times 1/count when fold_mean_into_forward), input dtype,
//          the input's layout; empty when no gradient is requested.
//   state  accumulation dtype, [forward gradient scale, backward gradient scale, consumed flag].
struct SoftmaxFocalForwardOutputs {
  at::Tensor loss;
  at::Tensor grad;
  at::Tensor state;
};
// Also fills the gradient strides of plan.geometry.
SoftmaxFocalForwardOutputs allocate_softmax_focal_loss_outputs(SoftmaxFocalForwardPlan& plan);

// Views `t` (N, C, d1..dk) as (N, C, S) strides, or nullopt if the spatial dims do not collapse.
std::optional<std::tuple<int64_t, int64_t, int64_t>> collapse_to_ncs_strides(const at::Tensor& t);

}  // namespace focal_cuda
