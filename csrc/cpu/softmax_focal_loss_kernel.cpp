// CPU implementation of focal_cuda::softmax_focal_loss_forward / _backward_.
//
// One pass over the logits computes loss, reduction and gradient. Work is cut
// into fixed chunks of positions (independent of the thread count), each chunk
// yields a partial sum, and the partials are added in chunk order: the result is
// bitwise identical for any number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <vector>

#include "../focal_loss_math.h"
#include "../softmax_focal_loss.h"

namespace focal_cuda {
namespace {

// Positions handled side by side in the channel-first path; a multiple of every
// at::vec width for float and double.
constexpr int64_t kTileWidth = 16;
// Elements per chunk of work: large enough to amortise scheduling, small enough
// to balance two to a few dozen threads.
constexpr int64_t kChunkElements = 1 << 16;

template <typename acc_t>
struct FocalParams {
  const void* target;
  int target_kind;
  int64_t ignore_index;
  acc_t gamma;
  acc_t alpha;
  const acc_t* class_weight;  // nullptr: no per-class weight
  acc_t grad_scale;           // 1, or 1/count when the mean is folded into the forward
  bool compute_grad;
  bool write_per_element_loss;
};

template <typename acc_t>
inline acc_t class_alpha(const FocalParams<acc_t>& prm, int64_t t) {
  return prm.class_weight ? prm.alpha * prm.class_weight[t] : prm.alpha;
}

// One position at a time, classes along the vector lanes: for class-contiguous
// rows ((N, C) row-major, channels_last) and for very large C.
template <typename scalar_t, typename acc_t>
acc_t softmax_focal_rows(const scalar_t* input, scalar_t* grad, scalar_t* loss_out, const SoftmaxFocalGeometry& g,
                         int64_t begin, int64_t end, const FocalParams<acc_t>& prm, std::vector<acc_t>& buf) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t C = g.classes;
  buf.resize(C);
  acc_t* x = buf.data();
  acc_t loss_sum = 0;
  for (int64_t p = begin; p < end; ++p) {
    const int64_t n = p / g.spatial, s = p % g.spatial;
    const scalar_t* in_row = input + n * g.input_stride_n + s * g.input_stride_s;
    scalar_t* grad_row = grad + n * g.grad_stride_n + s * g.grad_stride_s;
    const int64_t t = load_target(prm.target, p, prm.target_kind);
    if (t == prm.ignore_index) {
      if (prm.write_per_element_loss) loss_out[p] = scalar_t(0);
      if (prm.compute_grad) {
        for (int64_t c = 0; c < C; ++c) grad_row[c * g.grad_stride_c] = scalar_t(0);
      }
      continue;
    }
    const int64_t sc = g.input_stride_c;
    for (int64_t c = 0; c < C; ++c) x[c] = static_cast<acc_t>(in_row[c * sc]);
    const acc_t row_max = at::vec::reduce_all<acc_t>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, x, C);
    at::vec::map([row_max](Vec v) { return (v - Vec(row_max)).exp(); }, x, x, C);
    const acc_t sum_exp = at::vec::reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, x, C);
    const acc_t log_p = static_cast<acc_t>(in_row[t * sc]) - row_max - math_log(sum_exp);
    const FocalTerms<acc_t> terms = focal_terms(log_p, prm.gamma, class_alpha(prm, t));
    loss_sum += terms.loss;
    if (prm.write_per_element_loss) loss_out[p] = static_cast<scalar_t>(terms.loss);
    if (!prm.compute_grad) continue;
    // p_j = exp(x_j - max) / sum, so the gradient is exp(...) * grad_coef / sum.
    const acc_t scale = terms.grad_coef * prm.grad_scale / sum_exp;
    const int64_t gc = g.grad_stride_c;
    if (gc == 1) {
      at::vec::map([scale](Vec v) { return v * Vec(scale); }, x, x, C);
      for (int64_t c = 0; c < C; ++c) grad_row[c] = static_cast<scalar_t>(x[c]);
    } else {
      for (int64_t c = 0; c < C; ++c) grad_row[c * gc] = static_cast<scalar_t>(x[c] * scale);
    }
    grad_row[t * gc] = static_cast<scalar_t>(focal_grad(terms, acc_t(0), true) * prm.grad_scale);
  }
  return loss_sum;
}

// kTileWidth positions side by side, positions along the vector lanes: for
// channel-first layouts, where consecutive positions are adjacent in memory.
template <typename scalar_t, typename acc_t>
acc_t softmax_focal_tiles(const scalar_t* input, scalar_t* grad, scalar_t* loss_out, const SoftmaxFocalGeometry& g,
                          int64_t begin, int64_t end, const FocalParams<acc_t>& prm, std::vector<acc_t>& buf) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = kTileWidth;
  constexpr int64_t VS = Vec::size();
  static_assert(W % VS == 0, "tile width must be a multiple of the vector width");
  const int64_t C = g.classes;
  buf.resize(C * W);
  acc_t* x = buf.data();
  acc_t loss_sum = 0;
  int64_t in_off[W], grad_off[W], target[W];
  alignas(64) acc_t row_max[W], sum_exp[W], scale[W];
  for (int64_t p0 = begin; p0 < end; p0 += W) {
    const int64_t count = std::min(W, end - p0);
    for (int64_t w = 0; w < count; ++w) {
      const int64_t n = (p0 + w) / g.spatial, s = (p0 + w) % g.spatial;
      in_off[w] = n * g.input_stride_n + s * g.input_stride_s;
      grad_off[w] = n * g.grad_stride_n + s * g.grad_stride_s;
      target[w] = load_target(prm.target, p0 + w, prm.target_kind);
    }
    // Positions of one image with unit spatial stride: plain strided rows.
    const bool in_unit = count == W && in_off[W - 1] - in_off[0] == W - 1;
    const bool grad_unit = count == W && grad_off[W - 1] - grad_off[0] == W - 1;
    for (int64_t c = 0; c < C; ++c) {
      acc_t* xr = x + c * W;
      if (in_unit) {
        const scalar_t* src = input + in_off[0] + c * g.input_stride_c;
        for (int64_t w = 0; w < W; ++w) xr[w] = static_cast<acc_t>(src[w]);
      } else {
        for (int64_t w = 0; w < count; ++w) xr[w] = static_cast<acc_t>(input[in_off[w] + c * g.input_stride_c]);
        for (int64_t w = count; w < W; ++w) xr[w] = acc_t(0);
      }
    }
    for (int64_t v = 0; v < W; v += VS) {
      Vec m = Vec::loadu(x + v);
      for (int64_t c = 1; c < C; ++c) m = at::vec::maximum(m, Vec::loadu(x + c * W + v));
      Vec sum(acc_t(0));
      for (int64_t c = 0; c < C; ++c) {
        const Vec e = (Vec::loadu(x + c * W + v) - m).exp();
        e.store(x + c * W + v);
        sum = sum + e;
      }
      m.store(row_max + v);
      sum.store(sum_exp + v);
    }
    FocalTerms<acc_t> terms[W];
    for (int64_t w = 0; w < W; ++w) {
      scale[w] = acc_t(0);
      if (w >= count) continue;
      const int64_t t = target[w];
      if (t == prm.ignore_index) {
        if (prm.write_per_element_loss) loss_out[p0 + w] = scalar_t(0);
        continue;
      }
      const acc_t log_p = static_cast<acc_t>(input[in_off[w] + t * g.input_stride_c]) - row_max[w] -
                          math_log(sum_exp[w]);
      terms[w] = focal_terms(log_p, prm.gamma, class_alpha(prm, t));
      loss_sum += terms[w].loss;
      if (prm.write_per_element_loss) loss_out[p0 + w] = static_cast<scalar_t>(terms[w].loss);
      scale[w] = terms[w].grad_coef * prm.grad_scale / sum_exp[w];
    }
    if (!prm.compute_grad) continue;
    for (int64_t c = 0; c < C; ++c) {
      acc_t* xr = x + c * W;
      for (int64_t v = 0; v < W; v += VS) (Vec::loadu(xr + v) * Vec::loadu(scale + v)).store(xr + v);
      if (grad_unit) {
        scalar_t* dst = grad + grad_off[0] + c * g.grad_stride_c;
        for (int64_t w = 0; w < W; ++w) dst[w] = static_cast<scalar_t>(xr[w]);
      } else {
        for (int64_t w = 0; w < count; ++w) grad[grad_off[w] + c * g.grad_stride_c] = static_cast<scalar_t>(xr[w]);
      }
    }
    for (int64_t w = 0; w < count; ++w) {
      const int64_t t = target[w];
      if (t == prm.ignore_index) {
        // Written explicitly: 0 * exp(NaN) would not be 0.
        for (int64_t c = 0; c < C; ++c) grad[grad_off[w] + c * g.grad_stride_c] = scalar_t(0);
      } else {
        grad[grad_off[w] + t * g.grad_stride_c] =
            static_cast<scalar_t>(focal_grad(terms[w], acc_t(0), true) * prm.grad_scale);
      }
    }
  }
  return loss_sum;
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
  const auto& g = plan.geometry;
  const bool mean = reduction == kReductionMean;
  const double inv_valid = valid > 0 ? 1.0 / static_cast<double>(valid) : 0.0;
  const double forward_scale = plan.fold_mean_into_forward ? inv_valid : 1.0;
  const double backward_scale = (mean && !plan.fold_mean_into_forward) ? inv_valid : 1.0;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.input.scalar_type(), "softmax_focal_loss_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FocalParams<acc_t> prm;
    prm.target = plan.target.data_ptr();
    prm.target_kind = plan.target_kind;
    prm.ignore_index = ignore_index;
    prm.gamma = static_cast<acc_t>(gamma);
    prm.alpha = static_cast<acc_t>(alpha);
    prm.class_weight = plan.class_weight.has_value() ? plan.class_weight->data_ptr<acc_t>() : nullptr;
    prm.grad_scale = static_cast<acc_t>(forward_scale);
    prm.compute_grad = compute_grad;
    prm.write_per_element_loss = reduction == kReductionNone;

    const scalar_t* in = plan.input.const_data_ptr<scalar_t>();
    scalar_t* grad = compute_grad ? out.grad.data_ptr<scalar_t>() : nullptr;
    scalar_t* loss_out = reduction == kReductionNone ? out.loss.data_ptr<scalar_t>() : nullptr;
    const int64_t positions = g.positions();
    // Class-contiguous rows, or rows too long to tile: one position at a time.
    const bool by_rows = g.input_stride_c == 1 || g.classes * kTileWidth * int64_t(sizeof(acc_t)) > (1 << 18);
    int64_t chunk = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, g.classes));
    if (!by_rows) chunk = (chunk + kTileWidth - 1) / kTileWidth * kTileWidth;
    const int64_t chunks = positions > 0 ? (positions + chunk - 1) / chunk : 0;
    std::vector<acc_t> partial(chunks, acc_t(0));
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      std::vector<acc_t> buf;
      for (int64_t k = cb; k < ce; ++k) {
        const int64_t begin = k * chunk, end = std::min(positions, begin + chunk);
        partial[k] = by_rows ? softmax_focal_rows<scalar_t, acc_t>(in, grad, loss_out, g, begin, end, prm, buf)
                             : softmax_focal_tiles<scalar_t, acc_t>(in, grad, loss_out, g, begin, end, prm, buf);
      }
    });
    if (reduction != kReductionNone) {
      acc_t total = 0;
      for (const acc_t v : partial) total += v;
      if (mean) total = valid > 0 ? total / static_cast<acc_t>(valid) : acc_t(0);
      out.loss.fill_(total);
    }
  });
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
