// CPU pieces shared by both losses: the target scan, and the backward ops
// focal_loss_backward_ / focal_loss_backward, which scale the gradient a forward
// op computed by grad_output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../focal_loss.h"
#include "focal_loss_cpu.h"

namespace focal_cuda {

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

int64_t scan_class_targets(const void* target, int kind, int64_t count, int64_t valid_end, int64_t ignore_index,
                           const char* op, const char* what, const std::string& valid_range) {
  const int64_t chunk = kChunkElements;
  const int64_t chunks = (count + chunk - 1) / chunk;
  std::vector<int64_t> counts(chunks, 0), first_bad(chunks, -1);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t k = cb; k < ce; ++k) {
      int64_t valid = 0;
      for (int64_t i = k * chunk; i < std::min(count, (k + 1) * chunk); ++i) {
        const int64_t t = load_target(target, i, kind);
        if (t == ignore_index) continue;
        if (t < 0 || t >= valid_end) {
          if (first_bad[k] < 0) first_bad[k] = i;
          continue;
        }
        ++valid;
      }
      counts[k] = valid;
    }
  });
  int64_t total = 0;
  for (int64_t k = 0; k < chunks; ++k) {
    if (first_bad[k] >= 0) {
      const int64_t i = first_bad[k];
      TORCH_CHECK_INDEX(false, op, ": ", what, " value ", load_target(target, i, kind), " at flat position ", i,
                        " is out of range: expected ", valid_range, " or ", what, " == ignore_index=", ignore_index);
    }
    total += counts[k];
  }
  return total;
}

GradientScales gradient_scales(int64_t reduction, const MeanDenominator& denominator, bool fold_mean_into_forward) {
  GradientScales scales;
  if (reduction != kReductionMean) return scales;
  (fold_mean_into_forward ? scales.forward : scales.backward) = denominator.inverse();
  return scales;
}

namespace {

// Stores a double into element `index` of a new contiguous CPU tensor, rounding as a
// conversion does: out of range gives inf. Tensor::fill_(double) raises instead on
// torch < 2.8 ("value cannot be converted to type at::Half without overflow").
void store_scalar(const at::Tensor& t, int64_t index, double value) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "focal_cuda_store_scalar", [&] {
    t.data_ptr<scalar_t>()[index] = static_cast<scalar_t>(value);
  });
}

}  // namespace

void finish_forward(const at::Tensor& loss, const at::Tensor& state, const std::vector<double>& partial,
                    int64_t reduction, const MeanDenominator& denominator, const GradientScales& scales) {
  if (reduction != kReductionNone) {
    double total = 0;
    for (const double v : partial) total += v;
    store_scalar(loss, 0, reduction == kReductionMean ? denominator.divide(total) : total);
  }
  // state is float32 for float16 / bfloat16 inputs: a tiny user normalizer gives scales beyond its range.
  store_scalar(state, 0, scales.forward);
  store_scalar(state, 1, scales.backward);
  store_scalar(state, 2, 0.0);
}

namespace {

// grad_output times the stored backward scale, shaped to broadcast against the gradient.
at::Tensor backward_multiplier(const at::Tensor& state, const at::Tensor& grad_output, GradOutputLayout layout,
                               bool* is_one) {
  const double backward_scale = state[1].item<double>();
  *is_one = false;
  switch (layout) {
    case GradOutputLayout::kScalar: {
      const double scale = grad_output.item<double>() * backward_scale;
      *is_one = scale == 1.0;
      return at::scalar_tensor(scale, grad_output.options().dtype(at::kDouble));
    }
    case GradOutputLayout::kElementwise:
      return backward_scale == 1.0 ? grad_output : grad_output * backward_scale;
    case GradOutputLayout::kPerPosition:
    default:
      return (backward_scale == 1.0 ? grad_output : grad_output * backward_scale).unsqueeze(1);
  }
}

void focal_loss_backward_inplace_cpu(at::Tensor& grad_input, at::Tensor& state, const at::Tensor& grad_output) {
  const auto layout = check_focal_loss_backward(grad_input, state, grad_output);
  TORCH_CHECK(state[2].item<double>() == 0.0, kGradientConsumedMessage);
  bool is_one = false;
  const auto multiplier = backward_multiplier(state, grad_output, layout, &is_one);
  if (!is_one) grad_input.mul_(multiplier);
  state[2] = 1;
}

at::Tensor focal_loss_backward_cpu(const at::Tensor& grad_input, const at::Tensor& state,
                                   const at::Tensor& grad_output) {
  const auto layout = check_focal_loss_backward(grad_input, state, grad_output);
  bool is_one = false;
  const auto multiplier = backward_multiplier(state, grad_output, layout, &is_one);
  return grad_input.mul(multiplier).to(grad_input.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(focal_cuda, CPU, m) {
  m.impl("focal_loss_backward_", &focal_loss_backward_inplace_cpu);
  m.impl("focal_loss_backward", &focal_loss_backward_cpu);
}

}  // namespace focal_cuda
