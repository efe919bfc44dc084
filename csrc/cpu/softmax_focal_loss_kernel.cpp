// CPU implementation of focal_cuda::softmax_focal_loss_forward / _backward_.
//
// One pass over the logits computes loss, reduction and gradient. Work is cut
// into fixed chunks of positions (independent of the thread count), each chunk
// yields a partial sum, and the partials are added in chunk order: the result is
// bitwise identical for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../focal_loss_math.h"
#include "../softmax_focal_loss.h"
#include "softmax_focal_loss_cpu.h"

namespace focal_cuda {
namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  return has;
#else
  return false;
#endif
}

// Counts the non-ignored targets and finds the first out-of-range one, before
// any output is written.
int64_t scan_targets(const SoftmaxFocalForwardPlan& plan, int64_t ignore_index) {
  const int64_t positions = plan.geometry.positions();
  const int64_t classes = plan.geometry.classes;
  const void* target = plan.target.data_ptr();
  const int kind = plan.target_kind;
  const int64_t chunk = kChunkElements;
  const int64_t chunks = (positions + chunk - 1) / chunk;
  std::vector<int64_t> counts(chunks, 0), first_bad(chunks, -1);
  at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
    for (int64_t k = cb; k < ce; ++k) {
      int64_t count = 0;
      for (int64_t p = k * chunk; p < std::min(positions, (k + 1) * chunk); ++p) {
        const int64_t t = load_target(target, p, kind);
        if (t == ignore_index) continue;
        if (t < 0 || t >= classes) {
          if (first_bad[k] < 0) first_bad[k] = p;
          continue;
        }
        ++count;
      }
      counts[k] = count;
    }
  });
  int64_t total = 0;
  for (int64_t k = 0; k < chunks; ++k) {
    if (first_bad[k] >= 0) {
      const int64_t p = first_bad[k];
      TORCH_CHECK_INDEX(false, "softmax_focal_loss: target value ", load_target(target, p, kind),
                        " at flat position ", p, " is out of range: expected 0 <= target < ", classes,
                        " (the number of classes) or target == ignore_index=", ignore_index);
    }
    total += counts[k];
  }
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_focal_loss_forward_cpu(
    const at::Tensor& input, const at::Tensor& target, const std::optional<at::Tensor>& class_weight, double alpha,
    double gamma, int64_t ignore_index, int64_t reduction, bool compute_grad, bool inplace_backward) {
  (void)inplace_backward;  // read by the autograd formula (focal_cuda/_ops.py) only
  auto plan = plan_softmax_focal_loss_forward(input, target, class_weight, alpha, gamma, ignore_index, reduction,
                                              compute_grad);
  const int64_t valid = scan_targets(plan, ignore_index);
  auto out = allocate_softmax_focal_loss_outputs(plan);
  const bool mean = reduction == kReductionMean;
  const double inv_valid = valid > 0 ? 1.0 / static_cast<double>(valid) : 0.0;
  const double forward_scale = plan.fold_mean_into_forward ? inv_valid : 1.0;
  const double backward_scale = (mean && !plan.fold_mean_into_forward) ? inv_valid : 1.0;

  std::vector<double> partial;
  if (cpu_has_avx2()) {
    avx2::softmax_focal_loss_forward_chunks(plan, out, alpha, gamma, ignore_index, forward_scale, partial);
  } else {
    baseline::softmax_focal_loss_forward_chunks(plan, out, alpha, gamma, ignore_index, forward_scale, partial);
  }
  if (reduction != kReductionNone) {
    double total = 0;
    for (const double v : partial) total += v;
    if (mean) total = valid > 0 ? total / static_cast<double>(valid) : 0.0;
    out.loss.fill_(total);
  }
  out.state[0] = forward_scale;
  out.state[1] = backward_scale;
  out.state[2] = 0;
  return {out.loss, out.grad, out.state};
}

// grad_output times the stored backward scale: a scalar, or (N, d1..dk) broadcast over C.
at::Tensor backward_multiplier(const at::Tensor& grad_input, const at::Tensor& state, const at::Tensor& grad_output,
                               bool scalar_grad_output, bool* is_one) {
  const auto state_values = state.to(at::kDouble);
  const double* sv = state_values.const_data_ptr<double>();
  if (scalar_grad_output) {
    const double scale = grad_output.item<double>() * sv[1];
    *is_one = scale == 1.0;
    return at::scalar_tensor(scale, grad_input.options().dtype(at::kDouble));
  }
  *is_one = false;
  return grad_output.unsqueeze(1);
}

void softmax_focal_loss_backward_inplace_cpu(at::Tensor& grad_input, at::Tensor& state, const at::Tensor& grad_output) {
  const bool scalar_grad_output = check_softmax_focal_loss_backward(grad_input, state, grad_output);
  TORCH_CHECK(state[2].item<double>() == 0.0,
              "softmax_focal_loss: this forward's gradient was already consumed by a backward; a second backward "
              "through the same graph (retain_graph=True) is not supported: run the forward again");
  bool is_one = false;
  const auto multiplier = backward_multiplier(grad_input, state, grad_output, scalar_grad_output, &is_one);
  if (!is_one) grad_input.mul_(multiplier);
  state[2] = 1;
}

at::Tensor softmax_focal_loss_backward_cpu(const at::Tensor& grad_input, const at::Tensor& state,
                                           const at::Tensor& grad_output) {
  const bool scalar_grad_output = check_softmax_focal_loss_backward(grad_input, state, grad_output);
  bool is_one = false;
  const auto multiplier = backward_multiplier(grad_input, state, grad_output, scalar_grad_output, &is_one);
  return grad_input.mul(multiplier).to(grad_input.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(focal_cuda, CPU, m) {
  m.impl("softmax_focal_loss_forward", &softmax_focal_loss_forward_cpu);
  m.impl("softmax_focal_loss_backward_", &softmax_focal_loss_backward_inplace_cpu);
  m.impl("softmax_focal_loss_backward", &softmax_focal_loss_backward_cpu);
}

}  // namespace focal_cuda
