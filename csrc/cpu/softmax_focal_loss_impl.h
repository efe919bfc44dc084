// The softmax CPU kernel bodies, compiled once per instruction set: included by
// focal_loss_kernels_baseline.cpp and focal_loss_kernels_avx2.cpp, each
// defining FOCAL_CPU_NAMESPACE (and, for AVX2, the at::vec capability).
// at::vec then maps Vectorized<float> onto that instruction set, exp included.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "../focal_loss_math.h"
#include "softmax_focal_loss_cpu.h"
#include "vec_math.h"

#ifndef FOCAL_CPU_NAMESPACE
#error "define FOCAL_CPU_NAMESPACE before including softmax_focal_loss_impl.h"
#endif

namespace focal_cuda {
namespace FOCAL_CPU_NAMESPACE {
namespace {

template <typename acc_t>
struct FocalParams {
  const void* target;
  int target_kind;
  int64_t ignore_index;
  acc_t gamma;
  GammaSchedule<acc_t> schedule;
  bool scheduled;  // gamma from `schedule` per position, else the constant `gamma`
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

// The focal terms of a position (T = acc_t) or of vector lanes of positions.
template <typename T, typename acc_t, typename Math>
inline FocalTerms<T> position_terms(const FocalParams<acc_t>& prm, T log_p, T alpha) {
  return prm.scheduled ? scheduled_focal_terms<T, acc_t, Math>(log_p, prm.schedule, alpha)
                       : focal_terms<T, acc_t, Math>(log_p, prm.gamma, alpha);
}

// One position at a time, classes along the vector lanes: for class-contiguous
// rows ((N, C) row-major, channels_last) and for very large C.
template <typename scalar_t, typename acc_t>
double softmax_focal_rows(const scalar_t* input, scalar_t* grad, const PerElementLoss<scalar_t, acc_t>& loss_out,
                          const SoftmaxFocalGeometry& g, int64_t begin, int64_t end, const FocalParams<acc_t>& prm,
                          std::vector<acc_t>& buf) {
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t C = g.classes;
  buf.resize(C);
  acc_t* x = buf.data();
  double loss_sum = 0;  // thousands of positions per chunk: summed in double, as the chunks are
  int64_t n = begin / std::max<int64_t>(1, g.spatial), s = begin - n * g.spatial;
  for (int64_t p = begin; p < end; ++p, ++s) {
    if (s == g.spatial) {  // the next image
      s = 0;
      ++n;
    }
    const scalar_t* in_row = input + n * g.input_stride_n + s * g.input_stride_s;
    scalar_t* grad_row = grad + n * g.grad_stride_n + s * g.grad_stride_s;
    const int64_t t = load_target(prm.target, p, prm.target_kind);
    if (t == prm.ignore_index) {
      if (prm.write_per_element_loss) loss_out.store(p, acc_t(0));
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
    const FocalTerms<acc_t> terms = position_terms<acc_t, acc_t, ScalarMath<acc_t>>(prm, log_p, class_alpha(prm, t));
    loss_sum += terms.loss;
    if (prm.write_per_element_loss) loss_out.store(p, terms.loss);
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
double softmax_focal_tiles(const scalar_t* input, scalar_t* grad, const PerElementLoss<scalar_t, acc_t>& loss_out,
                           const SoftmaxFocalGeometry& g, int64_t begin, int64_t end, const FocalParams<acc_t>& prm,
                           std::vector<acc_t>& buf) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = kTileWidth;
  constexpr int64_t VS = Vec::size();
  static_assert(W % VS == 0, "tile width must be a multiple of the vector width");
  const int64_t C = g.classes;
  buf.resize(C * W);
  acc_t* x = buf.data();
  double loss_sum = 0;  // thousands of positions per chunk: summed in double, as the chunks are
  int64_t in_off[W], grad_off[W], target[W];
  alignas(64) acc_t row_max[W], sum_exp[W], scale[W], logit_t[W], alpha[W], loss[W], target_grad[W];
  for (int64_t p0 = begin; p0 < end; p0 += W) {
    const int64_t count = std::min(W, end - p0);
    // One division per tile, not per position (a 64-bit divide costs tens of cycles).
    int64_t n = p0 / g.spatial, s = p0 - n * g.spatial;
    for (int64_t w = 0; w < count; ++w, ++s) {
      if (s == g.spatial) {
        s = 0;
        ++n;
      }
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
    // Focal terms for the W positions at once, on vector lanes. Ignored lanes and
    // the padding of a partial tile compute on placeholders and are zeroed below.
    for (int64_t w = 0; w < W; ++w) {
      const bool valid = w < count && target[w] != prm.ignore_index;
      logit_t[w] = valid ? static_cast<acc_t>(input[in_off[w] + target[w] * g.input_stride_c]) : row_max[w];
      alpha[w] = valid ? class_alpha(prm, target[w]) : acc_t(0);
    }
    for (int64_t v = 0; v < W; v += VS) {
      const Vec sum = Vec::loadu(sum_exp + v);
      const Vec log_p = Vec::loadu(logit_t + v) - Vec::loadu(row_max + v) - sum.log();
      const FocalTerms<Vec> terms = position_terms<Vec, acc_t, VecMath<Vec>>(prm, log_p, Vec::loadu(alpha + v));
      const Vec grad_scale(prm.grad_scale);
      terms.loss.store(loss + v);
      (terms.grad_coef * grad_scale / sum).store(scale + v);
      (Vec(acc_t(0)) - terms.grad_coef * terms.one_minus_p * grad_scale).store(target_grad + v);
    }
    for (int64_t w = 0; w < count; ++w) {
      if (target[w] == prm.ignore_index) {
        loss[w] = acc_t(0);
        scale[w] = acc_t(0);
      }
      loss_sum += loss[w];
      if (prm.write_per_element_loss) loss_out.store(p0 + w, loss[w]);
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
        grad[grad_off[w] + t * g.grad_stride_c] = static_cast<scalar_t>(target_grad[w]);
      }
    }
  }
  return loss_sum;
}

}  // namespace

void softmax_focal_loss_forward_chunks(const SoftmaxFocalForwardPlan& plan, const SoftmaxFocalForwardOutputs& out,
                                       double alpha, double gamma, int64_t ignore_index, double forward_scale,
                                       std::vector<double>& partial) {
  const auto& g = plan.geometry;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.input.scalar_type(), "softmax_focal_loss_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    FocalParams<acc_t> prm;
    prm.target = plan.target.const_data_ptr();
    prm.target_kind = plan.target_kind;
    prm.ignore_index = ignore_index;
    prm.gamma = static_cast<acc_t>(gamma);
    prm.schedule = kernel_gamma_schedule<acc_t>(plan.gamma_schedule);
    prm.scheduled = !plan.gamma_schedule.constant();
    prm.alpha = static_cast<acc_t>(alpha);
    prm.class_weight = plan.class_weight.has_value() ? plan.class_weight->const_data_ptr<acc_t>() : nullptr;
    prm.grad_scale = static_cast<acc_t>(forward_scale);
    prm.compute_grad = plan.compute_grad;
    prm.write_per_element_loss = plan.reduction == kReductionNone;

    const scalar_t* in = plan.input.const_data_ptr<scalar_t>();
    scalar_t* grad = plan.compute_grad ? out.grad.data_ptr<scalar_t>() : nullptr;
    const auto loss_out = PerElementLoss<scalar_t, acc_t>::of(out.loss, prm.write_per_element_loss);
    const int64_t positions = g.positions();
    const bool by_rows = rows_layout(g, sizeof(acc_t));
    const int64_t chunk = chunk_positions(g, by_rows);
    const int64_t chunks = positions > 0 ? (positions + chunk - 1) / chunk : 0;
    partial.assign(chunks, 0.0);
    at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
      std::vector<acc_t> buf;
      for (int64_t k = cb; k < ce; ++k) {
        const int64_t begin = k * chunk, end = std::min(positions, begin + chunk);
        partial[k] = by_rows ? softmax_focal_rows<scalar_t, acc_t>(in, grad, loss_out, g, begin, end, prm, buf)
                             : softmax_focal_tiles<scalar_t, acc_t>(in, grad, loss_out, g, begin, end, prm, buf);
      }
    });
  });
}

}  // namespace FOCAL_CPU_NAMESPACE
}  // namespace focal_cuda
