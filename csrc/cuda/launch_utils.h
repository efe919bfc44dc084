// Host-side helpers shared by the CUDA launchers (ATen allowed here, unlike the
// .cuh device headers): type mapping, grid sizing from the occupancy API, the
// reduction workspace, the opt-in target check.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <tuple>

#include "../focal_loss.h"

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

inline bool aligned_to(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }
inline bool aligned_16(const void* p) { return aligned_to(p, 16); }

// Resident blocks per SM of `kernel` at this block size and dynamic shared memory,
// from the occupancy API; cached per (kernel, device, shared memory). Raises the
// kernel's dynamic shared-memory limit first when it needs more than 48 KB.
template <typename Kernel>
int blocks_per_sm(Kernel* kernel, int block_threads, size_t dynamic_smem) {
  static std::mutex mutex;
  static std::map<std::tuple<const void*, int, size_t, int>, int> cache;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, dynamic_smem, block_threads);
  std::lock_guard<std::mutex> lock(mutex);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (dynamic_smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(dynamic_smem)));
  }
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, block_threads, dynamic_smem));
  TORCH_CHECK(blocks > 0, "focal_cuda: a kernel cannot be resident with ", block_threads, " threads and ",
              dynamic_smem, " bytes of shared memory on this device");
  cache.emplace(key, blocks);
  return blocks;
}

// One resident wave, the kernels' loops stride over the rest: the grid (so the
// summation order) depends only on the problem, the kernel and the device.
template <typename Kernel>
int64_t resident_grid(Kernel* kernel, int block_threads, size_t dynamic_smem, int64_t blocks_needed) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t resident = static_cast<int64_t>(blocks_per_sm(kernel, block_threads, dynamic_smem)) * sms;
  return std::max<int64_t>(1, std::min(blocks_needed, resident));
}

// The most dynamic shared memory one block may use on the current device (opt-in).
inline size_t max_dynamic_shared_memory() {
  return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}

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
