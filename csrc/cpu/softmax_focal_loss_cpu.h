// Interface between the CPU operator (softmax_focal_loss_kernel.cpp) and the
// kernel bodies, which are compiled once per instruction set.
#pragma once

#include <cstdint>
#include <vector>

#include "../softmax_focal_loss.h"

namespace focal_cuda {

// Positions handled side by side in the channel-first path; a multiple of every
// at::vec width for float and double.
constexpr int64_t kTileWidth = 64;
// Elements per chunk of work: large enough to amortise scheduling, small enough
// to balance two to a few dozen threads. Chunks, not threads, fix the summation
// order, so results do not depend on the thread count.
constexpr int64_t kChunkElements = 1 << 16;

// Class-contiguous rows, or rows too long to tile: one position at a time.
inline bool rows_layout(const SoftmaxFocalGeometry& g, size_t acc_size) {
  return g.input_stride_c == 1 || g.classes * kTileWidth * static_cast<int64_t>(acc_size) > (1 << 18);
}

inline int64_t chunk_positions(const SoftmaxFocalGeometry& g, bool by_rows) {
  int64_t chunk = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, g.classes));
  if (!by_rows) chunk = (chunk + kTileWidth - 1) / kTileWidth * kTileWidth;
  return chunk;
}

// Runs the fused pass; partial[k] receives chunk k's loss sum (in order).
#define FOCAL_DECLARE_CPU_KERNEL(NS)                                                                             \
  namespace NS {                                                                                                 \
  void softmax_focal_loss_forward_chunks(const SoftmaxFocalForwardPlan& plan, const SoftmaxFocalForwardOutputs& out, \
                                         double alpha, double gamma, int64_t ignore_index, double forward_scale,  \
                                         std::vector<double>& partial);                                           \
  }
FOCAL_DECLARE_CPU_KERNEL(baseline)
FOCAL_DECLARE_CPU_KERNEL(avx2)
#undef FOCAL_DECLARE_CPU_KERNEL

}  // namespace focal_cuda
