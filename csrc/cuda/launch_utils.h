// Host-side helpers shared by the CUDA launchers (ATen allowed here, unlike the
// .cuh device headers): type mapping, grid sizing, the reduction workspace.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

namespace focal_cuda {

// ATen's 16-bit float types and the CUDA ones have the same bits.
template <typename scalar_t>
struct DeviceScalar {
  using type = scalar_t;
};
template <>
struct DeviceScalar<c10::Half> {
  using type = __half;
};
template <>
struct DeviceScalar<c10::BFloat16> {
  using type = __nv_bfloat16;
};

constexpr int kBlock = 256;     // most kernels
constexpr int kRowBlock = 512;  // softmax rows kernel with one position per block (large C)

// Enough blocks to fill the device a few times over, no more: the per-block
// partials stay few and the grid (so the summation order) depends only on the
// problem and the device.
inline int64_t grid_size(int64_t work_items, int64_t items_per_block, int block_threads) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t resident = static_cast<int64_t>(sms) * std::max(1, 2048 / block_threads);
  const int64_t needed = (work_items + items_per_block - 1) / items_per_block;
  return std::max<int64_t>(1, std::min(needed, resident * 2));
}

inline bool aligned_to(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }
inline bool aligned_16(const void* p) { return aligned_to(p, 16); }

// Per-block partial losses and counts for up to max_blocks blocks, and two zeroed
// tickets (forward, counting pre-pass), in one allocation on the current stream.
struct ReductionWorkspace {
  at::Tensor storage;
  void* partial_loss = nullptr;
  long long* partial_count = nullptr;
  unsigned int* tickets = nullptr;

  ReductionWorkspace(int64_t max_blocks, int64_t acc_size, const at::TensorOptions& options, cudaStream_t stream) {
    const int64_t loss_bytes = (max_blocks * acc_size + 15) / 16 * 16;
    const int64_t count_bytes = max_blocks * static_cast<int64_t>(sizeof(long long));
    storage = at::empty({loss_bytes + count_bytes + 16}, options.dtype(at::kByte));
    auto* base = static_cast<unsigned char*>(storage.data_ptr());
    partial_loss = base;
    partial_count = reinterpret_cast<long long*>(base + loss_bytes);
    tickets = reinterpret_cast<unsigned int*>(base + loss_bytes + count_bytes);
    C10_CUDA_CHECK(cudaMemsetAsync(tickets, 0, 2 * sizeof(unsigned int), stream));
  }
};

}  // namespace focal_cuda
