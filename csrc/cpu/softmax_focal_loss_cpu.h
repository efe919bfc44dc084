// Layout choices of the softmax CPU kernel, shared by the operator
// (softmax_focal_loss_kernel.cpp) and the kernel bodies (softmax_focal_loss_impl.h).
#pragma once

#include <cstdint>
#include <vector>

#include "../softmax_focal_loss.h"
#include "focal_loss_cpu.h"

namespace focal_cuda {

// Positions handled side by side in the channel-first path; a multiple of every
// at::vec width for float and double.
constexpr int64_t kTileWidth = 64;
// Class-contiguous rows, or rows too long to tile: one position at a time.
inline bool rows_layout(const SoftmaxFocalGeometry& g, size_t acc_size) {
  return g.input_stride_c == 1 || g.classes * kTileWidth * static_cast<int64_t>(acc_size) > (1 << 18);
}

inline int64_t chunk_positions(const SoftmaxFocalGeometry& g, bool by_rows) {
  int64_t chunk = std::max<int64_t>(1, kChunkElements / std::max<int64_t>(1, g.classes));
  if (!by_rows) chunk = (chunk + kTileWidth - 1) / kTileWidth * kTileWidth;
  return chunk;
}

}  // namespace focal_cuda
