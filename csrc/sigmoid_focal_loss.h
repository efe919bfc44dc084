// Host-side pieces shared by the CPU and CUDA implementations of
// focal_cuda::sigmoid_focal_loss_forward: argument checks, the (rows, classes)
// view, the denominator of "mean", and output allocation.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "focal_loss.h"
#include "focal_loss_math.h"

namespace focal_cuda {

struct SigmoidFocalForwardPlan {
  // Dense targets: logits and targets dense with the same strides (walked in storage
  // order). Index targets, classes last (spatial == 1): contiguous rows of `classes`
  // (including channel-first inputs stored channels_last), one target per row, in the
  // targets' order. Index targets, channel-first (spatial > 1): contiguous (N, C, S).
  at::Tensor input;
  at::Tensor target;  // dense: the input's strides, its dtype or the accumulation dtype; index: contiguous, as given
  int64_t rows = 0;   // positions with a target (index), or numel / classes (dense)
  int64_t classes = 0;
  int64_t spatial = 1;  // index targets, channel-first: positions per image
  bool index_targets = false;
  TargetKind target_kind = kTargetInt64;  // index targets only
  int64_t reduction = kReductionNone;
  bool compute_grad = false;
  bool use_alpha = true;  // alpha >= 0
  // "mean" with a normalizer: on the input's device in the accumulation dtype (read
  // by the kernels), or a number known on the host (a CPU tensor, or a CPU input).
  std::optional<at::Tensor> device_normalizer;
  std::optional<double> host_normalizer;
  // One normalizer per image (inputs.shape[0]), accumulation dtype, on the input's device:
  // "mean" is the sum over images of (image b's summed loss) / normalizer[b].
  std::optional<at::Tensor> image_normalizer;
  int64_t images = 1;
  // As for softmax: 1/denominator folded into the forward gradient, but for float16.
  bool fold_mean_into_forward = false;
  GammaSchedulePlan gamma_schedule;
  at::ScalarType loss_dtype = at::kFloat;  // the input's, or float32 for 16-bit inputs (autocast)
  int64_t class_dim = -1;                  // normalised: input.dim() - 1 (classes last) or 1 (channel-first)
  int64_t numel() const { return rows * classes; }
  bool has_normalizer() const {
    return device_normalizer.has_value() || host_normalizer.has_value() || image_normalizer.has_value();
  }
};

SigmoidFocalForwardPlan plan_sigmoid_focal_loss_forward(
    const at::Tensor& input, const at::Tensor& target, double alpha, double gamma, int64_t reduction,
    const std::optional<at::Tensor>& normalizer, bool compute_grad, at::ArrayRef<double> gamma_thresholds = {},
    at::ArrayRef<double> gamma_values = {}, std::optional<at::ScalarType> loss_dtype = std::nullopt,
    int64_t class_dim = -1);

// loss: the input's shape for "none", else 0-dim; grad: contiguous, input-shaped (empty
// without compute_grad); state: [forward gradient scale, backward gradient scale, consumed].
struct SigmoidFocalForwardOutputs {
  at::Tensor loss;
  at::Tensor grad;
  at::Tensor state;
};
SigmoidFocalForwardOutputs allocate_sigmoid_focal_loss_outputs(const SigmoidFocalForwardPlan& plan);

}  // namespace focal_cuda
