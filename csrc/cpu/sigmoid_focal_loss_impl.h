// The sigmoid CPU kernel bodies, compiled once per instruction set: included by
// focal_loss_kernels_baseline.cpp and focal_loss_kernels_avx2.cpp (see
// softmax_focal_loss_impl.h). The logits are read as a flat (rows x classes)
// array, a block of elements at a time converted to the accumulation type, and
// sigmoid_focal_terms runs on at::vec lanes.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <vector>

#include "../focal_loss_math.h"
#include "focal_loss_cpu.h"
#include "vec_math.h"

#ifndef FOCAL_CPU_NAMESPACE
#error "define FOCAL_CPU_NAMESPACE before including sigmoid_focal_loss_impl.h"
#endif

namespace focal_cuda {
namespace FOCAL_CPU_NAMESPACE {
namespace {

// Elements converted and computed at a time: a few kilobytes per buffer, in L1.
constexpr int64_t kSigmoidBlock = 512;

template <typename acc_t>
struct SigmoidParams {
  acc_t gamma;
  GammaSchedule<acc_t> schedule;
  bool scheduled;  // gamma from `schedule` per element, else the constant `gamma`
  acc_t alpha;
  bool use_alpha;
  acc_t grad_scale;  // 1, or 1/denominator when the mean is folded into the forward
  bool compute_grad;
  bool write_per_element_loss;
  int64_t classes;
  int64_t spatial;           // index targets: 1 (classes last), else channel-first (N, C, S)
  const void* index_target;  // nullptr: dense targets
  int target_kind;
  int64_t ignore_index;
};

// Elements [begin, end) of the flat logits; returns their loss sum. kScheduled: gamma from prm.schedule
// (a template parameter: the compiler would otherwise share the terms' common part between the two
// branches and compute the schedule's p_t for a constant gamma too).
template <bool kScheduled, typename scalar_t, typename target_t, typename acc_t>
double sigmoid_focal_span(const scalar_t* input, const target_t* dense_target, scalar_t* grad,
                          const PerElementLoss<scalar_t, acc_t>& loss_out, int64_t begin, int64_t end,
                          const SigmoidParams<acc_t>& prm) {
  using Vec = at::vec::Vectorized<acc_t>;
  using Pack = VecPack<Vec, 4>;
  constexpr int64_t VS = Pack::size();
  static_assert(kSigmoidBlock % VS == 0, "block must be a multiple of the vector width");
  alignas(64) acc_t x[kSigmoidBlock], y[kSigmoidBlock], keep[kSigmoidBlock], loss[kSigmoidBlock], g[kSigmoidBlock];
  const int64_t C = prm.classes;
  double total = 0;
  for (int64_t b = begin; b < end; b += kSigmoidBlock) {
    const int64_t n = std::min(kSigmoidBlock, end - b);
    const int64_t padded = (n + VS - 1) / VS * VS;
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<acc_t>(input[b + i]);
    if (prm.index_target == nullptr) {
      for (int64_t i = 0; i < n; ++i) y[i] = static_cast<acc_t>(dense_target[b + i]);
      std::fill(keep, keep + n, acc_t(1));
    } else if (prm.spatial > 1) {
      // Channel-first (N, C, S): element e is class (e / S) % C of position (e / (C S)) S + e % S. The
      // divisions once per run of elements within one (image, class) plane, not per element.
      const int64_t S = prm.spatial;
      for (int64_t i = 0; i < n;) {
        const int64_t e = b + i, plane = e / S, s0 = e - plane * S, c = plane % C, image = plane / C;
        const int64_t run = std::min(n - i, S - s0), position = image * S + s0;
        // The target dtype chosen once per run (a switch per element costs a third of the time).
        auto fill = [&](auto tag) {
          const auto* targets = static_cast<const decltype(tag)*>(prm.index_target) + position;
          for (int64_t j = 0; j < run; ++j) {
            const int64_t t = static_cast<int64_t>(targets[j]);
            keep[i + j] = t == prm.ignore_index ? acc_t(0) : acc_t(1);
            y[i + j] = t == c ? acc_t(1) : acc_t(0);
          }
        };
        switch (prm.target_kind) {
          case kTargetUInt8: fill(static_cast<unsigned char>(0)); break;
          case kTargetInt16: fill(static_cast<short>(0)); break;
          case kTargetInt32: fill(0); break;
          default: fill(0LL); break;
        }
        i += run;
      }
    } else {
      // One target read per row: y is 1 at the row's class (none for background).
      std::fill(y, y + n, acc_t(0));
      for (int64_t row = b / C, i = 0; i < n; ++row) {
        const int64_t first = row * C - b;  // the row's class 0, relative to the block (may be < 0)
        const int64_t end = std::min(n, first + C);
        const int64_t t = load_target(prm.index_target, row, prm.target_kind);
        std::fill(keep + i, keep + end, t == prm.ignore_index ? acc_t(0) : acc_t(1));
        if (t >= 0 && first + t >= i && first + t < end) y[first + t] = acc_t(1);
        i = end;
      }
    }
    for (int64_t i = n; i < padded; ++i) x[i] = y[i] = keep[i] = acc_t(0);  // padding lanes: computed, dropped
    Pack sum(acc_t(0));
    const Pack zero(acc_t(0)), grad_scale(prm.grad_scale);
    for (int64_t v = 0; v < padded; v += VS) {
      const Pack xv = Pack::loadu(x + v), yv = Pack::loadu(y + v);
      SigmoidFocalTerms<Pack> terms;
      if constexpr (kScheduled) {
        terms = scheduled_sigmoid_focal_terms<Pack, acc_t, VecMath<Pack>>(xv, yv, prm.schedule, prm.alpha,
                                                                          prm.use_alpha);
      } else {
        terms = sigmoid_focal_terms<Pack, acc_t, VecMath<Pack>>(xv, yv, prm.gamma, prm.alpha, prm.use_alpha);
      }
      // Ignored elements and padding get exact zeros (0 * NaN would not be 0).
      const Pack kept = Pack::loadu(keep + v) > zero;
      const Pack l = Pack::blendv(zero, terms.loss, kept);
      sum = sum + l;
      l.store(loss + v);
      Pack::blendv(zero, terms.grad * grad_scale, kept).store(g + v);
    }
    alignas(64) acc_t lanes[VS];
    sum.store(lanes);
    for (int64_t k = 0; k < VS; ++k) total += lanes[k];
    if (loss_out.as_acc != nullptr) {
      std::copy(loss, loss + n, loss_out.as_acc + b);
    } else if (loss_out.as_input != nullptr) {
      for (int64_t i = 0; i < n; ++i) loss_out.as_input[b + i] = static_cast<scalar_t>(loss[i]);
    }
    if (prm.compute_grad) {
      for (int64_t i = 0; i < n; ++i) grad[b + i] = static_cast<scalar_t>(g[i]);
    }
  }
  return total;
}

}  // namespace

void sigmoid_focal_loss_forward_chunks(const SigmoidFocalForwardPlan& plan, const SigmoidFocalForwardOutputs& out,
                                       double alpha, double gamma, int64_t ignore_index, double forward_scale,
                                       std::vector<double>& partial) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, plan.input.scalar_type(), "sigmoid_focal_loss_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    SigmoidParams<acc_t> prm;
    prm.gamma = static_cast<acc_t>(gamma);
    prm.schedule = kernel_gamma_schedule<acc_t>(plan.gamma_schedule);
    prm.scheduled = !plan.gamma_schedule.constant();
    prm.alpha = static_cast<acc_t>(alpha);
    prm.use_alpha = plan.use_alpha;
    prm.grad_scale = static_cast<acc_t>(forward_scale);
    prm.compute_grad = plan.compute_grad;
    prm.write_per_element_loss = plan.reduction == kReductionNone;
    prm.classes = plan.classes;
    prm.spatial = plan.index_targets ? plan.spatial : 1;
    prm.index_target = plan.index_targets ? plan.target.const_data_ptr() : nullptr;
    prm.target_kind = plan.target_kind;
    prm.ignore_index = ignore_index;

    const scalar_t* in = plan.input.const_data_ptr<scalar_t>();
    scalar_t* grad = plan.compute_grad ? out.grad.data_ptr<scalar_t>() : nullptr;
    const auto loss_out = PerElementLoss<scalar_t, acc_t>::of(out.loss, prm.write_per_element_loss);
    const int64_t numel = plan.numel();
    // Whole rows per chunk (classes last), so that chunks depend only on the shape.
    const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, plan.classes));
    const int64_t chunk = prm.spatial > 1 ? kChunkElements : rows_per_chunk * plan.classes;
    const int64_t chunks = numel > 0 ? (numel + chunk - 1) / chunk : 0;
    partial.assign(chunks, 0.0);
    auto run = [&](auto target_tag) {
      using target_t = decltype(target_tag);
      const target_t* dense = plan.index_targets ? nullptr : plan.target.const_data_ptr<target_t>();
      at::parallel_for(0, chunks, 1, [&](int64_t cb, int64_t ce) {
        for (int64_t k = cb; k < ce; ++k) {
          const int64_t begin = k * chunk, end = std::min(numel, begin + chunk);
          partial[k] = prm.scheduled
                           ? sigmoid_focal_span<true, scalar_t, target_t, acc_t>(in, dense, grad, loss_out, begin,
                                                                                 end, prm)
                           : sigmoid_focal_span<false, scalar_t, target_t, acc_t>(in, dense, grad, loss_out, begin,
                                                                                  end, prm);
        }
      });
    };
    if (plan.index_targets || plan.target.scalar_type() == plan.input.scalar_type()) {
      run(scalar_t{});
    } else {
      run(acc_t{});
    }
  });
}

}  // namespace FOCAL_CPU_NAMESPACE
}  // namespace focal_cuda
