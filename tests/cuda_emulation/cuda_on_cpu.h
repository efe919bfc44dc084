// A minimal CPU implementation of the CUDA programming model, enough to run the
// kernels of csrc/cuda/softmax_focal_loss_kernels.cuh and
// csrc/cuda/sigmoid_focal_loss_kernels.cuh with a host compiler:
//
//   #include "cuda_on_cpu.h"
//   #include "cuda/softmax_focal_loss_kernels.cuh"
//   cuda_on_cpu::launch(kernel<...>, grid, block, args...);
//
// Execution model
//   * Blocks run one at a time (in an order the caller may permute, see
//     block_order), each on blockDim.x real threads (from a pool reused across
//     launches). Only 1-D grids and blocks whose size is a multiple of 32.
//   * __shared__ expands to `static`: a function-local static is shared by every
//     thread that runs the function, and because blocks run one after the other,
//     that is exactly per-block shared memory (each template instantiation has its
//     own). Unlike a GPU, shared memory keeps the previous block's values instead
//     of being undefined at block start.
//   * __syncthreads is a barrier over the block's threads; a warp shuffle is a
//     barrier over the warp's 32 threads around a (double-buffered) exchange buffer.
//     Threads of a warp run independently (no implicit warp synchrony), so code
//     that relies on lock-step execution without shuffles or barriers is exposed.
//   * Optionally (perturb_seed) some warps are held back after each __syncthreads
//     while the others run ahead to the next one, to expose shared-memory races.
//   * Misuse that would hang or be undefined on a GPU is reported instead: a thread
//     returning while others of its block (or warp) wait at a barrier, lanes at
//     different shuffles, a partial shuffle mask, a block still running after
//     launch_timeout. The launch then throws cuda_on_cpu::EmulationError.
//   * Global-memory atomics use std::atomic_ref, __threadfence a seq_cst fence.
//
// Only what the focal-loss kernels use is implemented. crt/host_defines.h (pulled
// in by vector_types.h) already gives a host compiler empty __global__, __device__,
// __host__ and an always-inline __forceinline__; this file adds the rest.
#pragma once

#include <vector_types.h>  // uint3, dim3 (and crt/host_defines.h)

#include <algorithm>
#include <atomic>
#include <cmath>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

// ----------------------------------------------------------------------------- qualifiers

#undef __shared__
#define __shared__ static  // see above: blocks run sequentially
// extern __shared__: the launch's per-block buffer (launch_in_order_smem).
#define FOCAL_DYNAMIC_SHARED_MEMORY(name) \
  unsigned char* name = reinterpret_cast<unsigned char*>(cuda_on_cpu::current.block->dynamic_shared.data())
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#ifndef __global__
#define __global__
#endif
#ifndef __device__
#define __device__
#endif
#ifndef __host__
#define __host__
#endif
#ifndef __forceinline__
#define __forceinline__ inline
#endif

inline constexpr int warpSize = 32;

namespace cuda_on_cpu {

struct EmulationError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Thrown in the threads still waiting when a barrier is abandoned; not an error by itself.
struct BarrierBroken {};

// How long a block may run before the launch is declared hung (threads missing
// at a barrier that never arrive); the waiting threads are then released.
inline std::chrono::seconds launch_timeout{60};

// Schedule perturbation (0: off). Otherwise, after every __syncthreads about one
// warp in four, chosen from the seed, the block, the warp and the barrier count, is
// held back until every other thread of the block has reached the next __syncthreads
// (or returned): the others run as far ahead as a GPU lets them. A shared-memory
// slot rewritten without a barrier while a slower warp may still read it then
// changes the result, instead of going unnoticed under a fair schedule.
inline unsigned long long perturb_seed = 0;

// The first error of the current launch.
inline std::mutex error_mutex;
inline std::string first_error;
inline void record_error(const std::string& message) {
  std::lock_guard<std::mutex> lock(error_mutex);
  if (first_error.empty()) first_error = message;
}

// A reusable barrier over `expected` threads (std::atomic wait / notify) that
// detects divergence: a member thread that returns from the kernel while others
// wait, or before another arrives, breaks it, and every waiter throws.
class Barrier {
 public:
  Barrier(int expected, const char* what) : expected_(expected), what_(what) {}

  void arrive_and_wait() {
    if (broken_.load()) throw BarrierBroken{};
    // This phase cannot complete before this thread arrives, so `phase` is current.
    const unsigned phase = generation_.load();
    const bool last = arrived_.fetch_add(1) + 1 == expected_;
    announce_progress();
    if (last) {
      arrived_.store(0);
      generation_.fetch_add(1);
      generation_.notify_all();
      return;
    }
    if (exited_.load() > 0) fail("a thread returned from the kernel while another waits at a barrier");
    while (generation_.load() == phase) generation_.wait(phase);
    if (broken_.load()) throw BarrierBroken{};
  }

  // Waits until `others` member threads have arrived at the pending phase or returned.
  void wait_until_arrived(int others) {
    for (;;) {
      const unsigned seen = progress_.load();
      if (broken_.load()) throw BarrierBroken{};
      if (arrived_.load() + exited_.load() >= others) return;
      progress_.wait(seen);
    }
  }

  // A member thread has finished the kernel (normally or not).
  void leave() {
    exited_.fetch_add(1);
    announce_progress();
    if (arrived_.load() > 0 && !broken_.load())
      fail_quietly("a thread returned from the kernel while others wait at a barrier");
  }

  // Releases every waiter (they throw BarrierBroken).
  void fail_quietly(const std::string& why) {
    record_error(std::string(what_) + ": " + why);
    broken_.store(true);
    generation_.fetch_add(1);
    generation_.notify_all();
    progress_.fetch_add(1);
    progress_.notify_all();
  }

 private:
  [[noreturn]] void fail(const std::string& why) {
    fail_quietly(why);
    throw BarrierBroken{};
  }

  // For wait_until_arrived (schedule perturbation only: free otherwise).
  void announce_progress() {
    if (perturb_seed == 0) return;
    progress_.fetch_add(1);
    progress_.notify_all();
  }

  const int expected_;
  const char* what_;
  std::atomic<unsigned> progress_{0};  // bumped on every arrival and return
  std::atomic<int> arrived_{0};
  std::atomic<int> exited_{0};
  std::atomic<unsigned> generation_{0};
  std::atomic<bool> broken_{false};
};

// One warp: its barrier and the shuffle exchange buffer, one slot per lane, double
// buffered: shuffle k uses buffer k % 2, so one barrier phase per shuffle suffices
// (a lane cannot write buffer k % 2 again before every lane has passed the barrier
// of shuffle k + 1, that is, finished reading shuffle k).
struct Warp {
  struct Slot {
    unsigned char bits[8];
    unsigned long long sequence;   // the lane's shuffle count: lanes must meet at the same shuffle
    int mode, param, width, size;  // and agree on what it is
  };
  Barrier barrier{32, "warp shuffle"};
  Slot slots[2][32];
};

struct Block {
  Block(int threads, size_t dynamic_smem)
      : barrier(threads, "__syncthreads"), warps(threads / 32), dynamic_shared((dynamic_smem + 15) / 16) {}
  Barrier barrier;
  std::vector<Warp> warps;
  // extern __shared__ memory (FOCAL_DYNAMIC_SHARED_MEMORY), 16-byte aligned, filled with
  // 0xff bytes (NaN) at block start: a kernel reading a slot it did not write sees NaN.
  struct alignas(16) Chunk {
    unsigned char bytes[16];
  };
  std::vector<Chunk> dynamic_shared;
};

struct ThreadContext {
  Block* block = nullptr;
  unsigned lane = 0, warp = 0;
  unsigned long long shuffles = 0;  // shuffles this thread has done
  unsigned long long syncs = 0;     // __syncthreads this thread has passed
};

inline thread_local ThreadContext current;

// splitmix64, to pick the held-back warps.
inline unsigned long long mix(unsigned long long x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

}  // namespace cuda_on_cpu

// ----------------------------------------------------------------------------- built-in variables

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

// ----------------------------------------------------------------------------- intrinsics

inline void __syncthreads() {
  using namespace cuda_on_cpu;
  Barrier& barrier = current.block->barrier;
  barrier.arrive_and_wait();
  const unsigned long long sync = current.syncs++;
  if (perturb_seed != 0) {
    auto held = [&](unsigned warp) { return mix(perturb_seed ^ mix(blockIdx.x ^ mix(warp ^ mix(sync)))) % 4 == 0; };
    if (held(current.warp)) {
      int held_threads = 0;
      for (unsigned w = 0; w < blockDim.x / 32; ++w) held_threads += held(w) ? 32 : 0;
      barrier.wait_until_arrived(static_cast<int>(blockDim.x) - held_threads);
    }
  }
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  return std::atomic_ref<unsigned int>(*address).fetch_add(value, std::memory_order_seq_cst);
}

// Fast-math intrinsics: their host equivalents (the emulation checks the kernels'
// logic, not the last ulp of the GPU's approximations).
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(a) * b) >> 64);
}

inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, sizeof f);
  return f;
}
inline double __longlong_as_double(long long x) {
  double d;
  std::memcpy(&d, &x, sizeof d);
  return d;
}

namespace cuda_on_cpu {

enum ShuffleMode : int { kShuffleDown = 1, kShuffleXor = 2, kShuffleIdx = 3 };

// shfl.sync as PTX defines it, with c = ((32 - width) << 8) | 31 as CUDA's
// __shfl_*_sync pass it: the source lane must lie at or below the last lane of
// the caller's width-segment, else the caller gets its own value. The idx mode
// (__shfl_sync) reads lane srcLane % width of the caller's segment.
template <typename T>
T shuffle(unsigned mask, T value, int mode, int param, int width) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "unsupported shuffle type");
  if (mask != 0xffffffffu) throw EmulationError("shuffle with a partial mask is not emulated");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    throw EmulationError("shuffle width must be a power of two <= 32");
  ThreadContext& ctx = current;
  Warp& warp = ctx.block->warps[ctx.warp];
  const unsigned lane = ctx.lane;
  const unsigned long long sequence = ctx.shuffles++;
  Warp::Slot* slots = warp.slots[sequence % 2];
  Warp::Slot& mine = slots[lane];
  std::memcpy(mine.bits, &value, sizeof(T));
  mine.sequence = sequence;
  mine.mode = mode;
  mine.param = param;
  mine.width = width;
  mine.size = sizeof(T);
  warp.barrier.arrive_and_wait();  // every lane has written its slot
  const unsigned segment_bits = 32u - static_cast<unsigned>(width);
  const unsigned max_lane = (lane & segment_bits) | (31u & ~segment_bits);
  const unsigned min_lane = lane & segment_bits;
  unsigned source = mode == kShuffleDown  ? lane + static_cast<unsigned>(param)
                    : mode == kShuffleXor ? lane ^ static_cast<unsigned>(param)
                                          : min_lane | (static_cast<unsigned>(param) & 31u & ~segment_bits);
  if (source > max_lane) source = lane;
  const Warp::Slot& theirs = slots[source];
  const Warp::Slot& first = slots[0];  // every lane equal to lane 0: all lanes are at the same shuffle
  if (first.sequence != sequence || first.mode != mode || first.param != param || first.width != width ||
      first.size != mine.size) {
    record_error("warp shuffle: lanes of one warp are at different shuffles (divergent shuffle)");
    throw BarrierBroken{};
  }
  T result;
  std::memcpy(&result, theirs.bits, sizeof(T));
  return result;
}

}  // namespace cuda_on_cpu

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = warpSize) {
  return cuda_on_cpu::shuffle(mask, value, cuda_on_cpu::kShuffleXor, lane_mask, width);
}
template <typename T>
T __shfl_sync(unsigned mask, T value, int src_lane, int width = warpSize) {
  return cuda_on_cpu::shuffle(mask, value, cuda_on_cpu::kShuffleIdx, src_lane, width);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned int delta, int width = warpSize) {
  return cuda_on_cpu::shuffle(mask, value, cuda_on_cpu::kShuffleDown, static_cast<int>(delta), width);
}

// ----------------------------------------------------------------------------- launch

namespace cuda_on_cpu {

// The order in which the blocks of a grid run: 0 ascending, 1 descending, any other
// value a permutation drawn from that seed. Kernels must not care.
inline std::vector<unsigned> block_order(unsigned blocks, unsigned long long seed) {
  std::vector<unsigned> order(blocks);
  std::iota(order.begin(), order.end(), 0u);
  if (seed == 1) std::reverse(order.begin(), order.end());
  if (seed > 1) std::shuffle(order.begin(), order.end(), std::mt19937_64(seed));
  return order;
}

// Worker threads shared by every launch: creating hundreds of threads per block
// would cost more than running the block. run(n, body) runs body(0..n-1) on n
// distinct threads and returns when all have returned. Each worker waits on its
// own slot, so a launch wakes only the n threads it uses (not every thread a
// 1024-thread launch once created).
class ThreadPool {
 public:
  static ThreadPool& instance() {
    static ThreadPool pool;
    return pool;
  }

  // on_timeout is called once if the job is still running after launch_timeout.
  void run(unsigned n, const std::function<void(unsigned)>& body, const std::function<void()>& on_timeout) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (workers_.size() < n) {
      const unsigned index = static_cast<unsigned>(workers_.size());
      slots_.push_back(std::make_unique<Slot>());
      Slot* slot = slots_.back().get();
      workers_.emplace_back([this, index, slot] { work(index, *slot); });
    }
    job_ = &body;
    remaining_ = n;
    ++job_number_;
    for (unsigned k = 0; k < n; ++k) {
      slots_[k]->job.store(job_number_);  // publishes job_ to worker k
      slots_[k]->job.notify_one();
    }
    if (!done_.wait_for(lock, launch_timeout, [&] { return remaining_ == 0; })) {
      lock.unlock();
      on_timeout();
      lock.lock();
      done_.wait(lock, [&] { return remaining_ == 0; });
    }
    job_ = nullptr;
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& slot : slots_) {
        slot->job.store(kStop);
        slot->job.notify_one();
      }
    }
    for (auto& w : workers_) w.join();
  }

 private:
  static constexpr unsigned kStop = ~0u;
  struct Slot {
    std::atomic<unsigned> job{0};  // the job number this worker is to run (32 bits: a plain futex)
  };

  void work(unsigned index, Slot& slot) {
    unsigned seen = 0;
    for (;;) {
      slot.job.wait(seen);
      const unsigned job = slot.job.load();
      if (job == kStop) return;
      seen = job;
      (*job_)(index);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--remaining_ == 0) done_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable done_;
  std::vector<std::thread> workers_;
  std::vector<std::unique_ptr<Slot>> slots_;
  const std::function<void(unsigned)>* job_ = nullptr;
  unsigned remaining_ = 0;
  unsigned job_number_ = 0;
};

// kernel<<<grid, block>>>(args...), blocks in the given order. Returns when every
// thread has finished; throws EmulationError if the kernel misused a barrier or a
// shuffle, or if a block did not finish within launch_timeout. Not reentrant: one
// launch at a time per process.
template <typename... Params, typename... Args>
void launch_in_order_smem(const std::vector<unsigned>& order, size_t dynamic_smem, void (*kernel)(Params...),
                          dim3 grid, dim3 block, Args&&... args) {
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1)
    throw EmulationError("only 1-D launches are emulated");
  if (block.x == 0 || block.x % 32 != 0) throw EmulationError("block size must be a positive multiple of 32");
  if (order.size() != grid.x) throw EmulationError("block order does not match the grid");
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);  // kernel arguments, by value
  first_error.clear();
  for (const unsigned b : order) {
    Block blk(static_cast<int>(block.x), dynamic_smem);
    std::memset(blk.dynamic_shared.data(), 0xff, blk.dynamic_shared.size() * sizeof(Block::Chunk));
    const std::function<void(unsigned)> thread_body = [&](unsigned t) {
      threadIdx = uint3{t, 0, 0};
      blockIdx = uint3{b, 0, 0};
      blockDim = block;
      gridDim = grid;
      current = ThreadContext{&blk, t % 32, t / 32};
      try {
        std::apply(kernel, params);  // each thread gets its own copy of the arguments
      } catch (const BarrierBroken&) {
      } catch (const std::exception& e) {
        record_error(std::string("exception in a kernel thread: ") + e.what());
      }
      blk.warps[t / 32].barrier.leave();
      blk.barrier.leave();
    };
    // Watchdog: a block whose threads wait for each other forever is released.
    ThreadPool::instance().run(block.x, thread_body, [&] {
      blk.barrier.fail_quietly("timed out: threads missing at a barrier (deadlock)");
      for (Warp& w : blk.warps) w.barrier.fail_quietly("timed out: lanes missing at a shuffle (deadlock)");
    });
    if (!first_error.empty()) throw EmulationError("block " + std::to_string(b) + ": " + first_error);
  }
}

template <typename... Params, typename... Args>
void launch_in_order(const std::vector<unsigned>& order, void (*kernel)(Params...), dim3 grid, dim3 block,
                     Args&&... args) {
  launch_in_order_smem(order, 0, kernel, grid, block, std::forward<Args>(args)...);
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
  launch_in_order(block_order(grid.x, 0), kernel, grid, block, std::forward<Args>(args)...);
}

}  // namespace cuda_on_cpu
