// CPU implementation of focal_cuda::sigmoid_focal_loss_forward.
//
// One pass over the logits computes loss, reduction and gradient, in fixed
// chunks of whole rows whose partial sums are added in chunk order: the result
// is bitwise identical for any number of threads.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "../sigmoid_focal_loss.h"
#include "focal_loss_cpu.h"

namespace focal_cuda {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> sigmoid_focal_loss_forward_cpu(
    const at::Tensor& input, const at::Tensor& target, double alpha, double gamma, int64_t ignore_index,
    int64_t reduction, const std::optional<at::Tensor>& normalizer, bool compute_grad, bool inplace_backward,
    at::ArrayRef<double> gamma_thresholds, at::ArrayRef<double> gamma_values, std::optional<at::ScalarType> loss_dtype,
    int64_t class_dim) {
  (void)inplace_backward;  // read by the autograd formula (focal_cuda/_ops.py) only
  auto plan = plan_sigmoid_focal_loss_forward(input, target, alpha, gamma, reduction, normalizer, compute_grad,
                                              gamma_thresholds, gamma_values, loss_dtype, class_dim);
  TORCH_INTERNAL_ASSERT(!plan.device_normalizer.has_value());  // a CPU input takes CPU normalizers only
  int64_t valid_rows = plan.rows;
  if (plan.index_targets) {
    valid_rows = scan_class_targets(plan.target.const_data_ptr(), plan.target_kind, plan.target.numel(),
                                    plan.classes + 1, ignore_index, "sigmoid_focal_loss", "targets",
                                    "0 <= targets <= " + std::to_string(plan.classes) + " (" +
                                        std::to_string(plan.classes) + " = background)");
  }
  auto out = allocate_sigmoid_focal_loss_outputs(plan);
  // The denominator of "mean": the normalizer as given, else the element count
  // (dense) or non-ignored rows x classes (index), with 0 giving a zero loss.
  const MeanDenominator denominator =
      plan.host_normalizer.has_value()
          ? MeanDenominator{*plan.host_normalizer, true}
          : MeanDenominator{static_cast<double>(plan.index_targets ? valid_rows * plan.classes : plan.numel()), false};
  const GradientScales scales = gradient_scales(reduction, denominator, plan.fold_mean_into_forward);

  auto run_chunks = [&](const SigmoidFocalForwardPlan& p, const SigmoidFocalForwardOutputs& o, double forward_scale,
                        std::vector<double>& partial) {
    if (cpu_has_avx2()) {
      avx2::sigmoid_focal_loss_forward_chunks(p, o, alpha, gamma, ignore_index, forward_scale, partial);
    } else {
      baseline::sigmoid_focal_loss_forward_chunks(p, o, alpha, gamma, ignore_index, forward_scale, partial);
    }
  };
  if (plan.image_normalizer.has_value()) {
    // One normalizer per image: each image's elements in turn, its gradient scaled by
    // 1 / normalizer[b], its summed loss divided by it (the gradient always folded).
    const auto norms = plan.image_normalizer->to(at::kDouble).contiguous();
    const double* norm = norms.const_data_ptr<double>();
    double total = 0;
    for (int64_t b = 0; b < plan.images; ++b) {
      SigmoidFocalForwardPlan image = plan;
      image.input = plan.input.select(0, b);
      image.target = plan.target.select(0, b);
      image.rows = plan.rows / plan.images;
      SigmoidFocalForwardOutputs image_out = out;
      if (plan.compute_grad) image_out.grad = out.grad.select(0, b);
      std::vector<double> partial;
      run_chunks(image, image_out, plan.compute_grad ? 1.0 / norm[b] : 1.0, partial);
      double sum = 0;
      for (const double v : partial) sum += v;
      total += sum / norm[b];
    }
    out.loss.copy_(at::scalar_tensor(total, at::kDouble));
    out.state.copy_(at::tensor({1.0, 1.0, 0.0}, at::kDouble));
    return {out.loss, out.grad, out.state};
  }
  std::vector<double> partial;
  run_chunks(plan, out, scales.forward, partial);
  finish_forward(out.loss, out.state, partial, reduction, denominator, scales);
  return {out.loss, out.grad, out.state};
}

}  // namespace

TORCH_LIBRARY_IMPL(focal_cuda, CPU, m) {
  m.impl("sigmoid_focal_loss_forward", &sigmoid_focal_loss_forward_cpu);
}

}  // namespace focal_cuda
