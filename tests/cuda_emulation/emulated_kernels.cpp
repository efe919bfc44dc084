// The CUDA kernels of csrc/cuda/softmax_focal_loss_kernels.cuh and
// csrc/cuda/sigmoid_focal_loss_kernels.cuh run on the CPU through cuda_on_cpu.h,
// behind an extern "C" interface for ctypes (tests/test_cuda_kernels_emulated.py
// and tests/test_sigmoid_kernels_emulated.py build and load this file, see
// tests/cuda_emulation/emulation_build.py).
//
// Every entry point takes raw pointers, the (N, C, S) geometry as 9 int64
// [rows, classes, spatial, input_stride_n, _c, _s, grad_stride_n, _c, _s], an
// explicit grid size and a block order (0 ascending, 1 descending, other values
// a seeded permutation). They return 0, or 1 with a message in emu_last_error().
// Each entry point checks the preconditions the launcher guarantees before it
// picks that kernel (alignment, strides, C within a register tile), so a test
// cannot pass by running a kernel where the launcher never would.
// The workspace mirrors softmax_focal_loss_launch.h: per-block partial losses
// (padded to 16 bytes), per-block partial counts, then two zeroed tickets
// (forward, counting); the partials start as 0xff bytes (NaN, -1) so that a
// kernel reading a partial nobody wrote is caught. The sigmoid entry points
// (emu_sigmoid_*) take (rows, classes) instead, as sigmoid_focal_loss_launch.h
// views its contiguous input.
#include "cuda_on_cpu.h"
// The device code under test.
#include "cuda/sigmoid_focal_loss_kernels.cuh"
#include "cuda/softmax_focal_loss_kernels.cuh"

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <new>
#include <string>

namespace fd = focal_cuda::device;
namespace emu = cuda_on_cpu;

namespace {

constexpr int kBlock = fd::kBlock;

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
// Softmax kernels: rows with GROUP = 1 << code (codes 0..8), long rows, channels
// (the small or the largest register tile), positions.
enum Variant : int {
  kRowsGroupMax = 8,
  kLongRows = 10,
  kLongRowsStaged = 11,
  kChannelsSmall = 20,
  kChannels = 21,
  kPositions = 30,
  kPositionsStaged = 31,
};

std::string last_error;

fd::Geometry to_geometry(const long long* g) {
  return fd::Geometry{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8]};
}

bool aligned_16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

void require(bool ok, const char* what) {
  if (!ok) throw emu::EmulationError(what);
}

// 16-byte aligned bytes, filled with `fill`.
struct Bytes {
  explicit Bytes(std::size_t n, unsigned char fill)
      : data(static_cast<unsigned char*>(::operator new(n, std::align_val_t(16)))) {
    std::memset(data, fill, n);
  }
  ~Bytes() { ::operator delete(data, std::align_val_t(16)); }
  Bytes(const Bytes&) = delete;
  Bytes& operator=(const Bytes&) = delete;
  unsigned char* data;
};

// The launcher's workspace for `max_blocks` blocks.
template <typename acc_t>
struct Workspace {
  explicit Workspace(long long max_blocks)
      : loss_bytes((max_blocks * static_cast<long long>(sizeof(acc_t)) + 15) / 16 * 16),
        count_bytes(max_blocks * static_cast<long long>(sizeof(long long))),
        bytes(static_cast<std::size_t>(loss_bytes + count_bytes + 16), 0xff) {
    std::memset(tickets(), 0, 2 * sizeof(unsigned int));  // cudaMemsetAsync(tickets, 0, 8)
  }
  acc_t* partial_loss() { return reinterpret_cast<acc_t*>(bytes.data); }
  long long* partial_count() { return reinterpret_cast<long long*>(bytes.data + loss_bytes); }
  unsigned int* tickets() { return reinterpret_cast<unsigned int*>(bytes.data + loss_bytes + count_bytes); }
  long long loss_bytes, count_bytes;
  Bytes bytes;
};

template <typename F>
int guarded(F&& body) {
  try {
    body();
    last_error.clear();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown exception";
  }
  return 1;
}

template <typename acc_t>
void run_count(long long grid, unsigned long long order, const void* target, int target_kind, long long positions,
               long long classes, long long ignore_index, long long items_per_target, long long* partial_count,
               unsigned int* ticket, acc_t* state) {
  require(grid >= 1, "grid must be >= 1");
  auto go = [&](auto tag) {
    using target_t = decltype(tag);
    emu::launch_in_order(emu::block_order(static_cast<unsigned>(grid), order),
                         &fd::count_valid_targets_kernel<kBlock, target_t, acc_t>, dim3(static_cast<unsigned>(grid)),
                         dim3(kBlock), static_cast<const target_t*>(target), positions, classes, ignore_index,
                         items_per_target, partial_count, ticket, state);
  };
  switch (target_kind) {
    case focal_cuda::kTargetUInt8: return go((unsigned char)0);
    case focal_cuda::kTargetInt16: return go(short(0));
    case focal_cuda::kTargetInt32: return go(int(0));
    default: return go(0LL);
  }
}

template <typename acc_t>
focal_cuda::GammaSchedule<acc_t> schedule(double gamma, const double* thresholds, const double* values, int n) {
  require(n >= 0 && n < focal_cuda::kMaxGammaPieces, "at most kMaxGammaPieces - 1 thresholds");
  focal_cuda::GammaSchedule<acc_t> s{};
  s.pieces = n + 1;
  for (int k = 0; k < n; ++k) {
    acc_t t = static_cast<acc_t>(thresholds[k]);  // rounded up, as the launcher does
    if (static_cast<double>(t) < thresholds[k]) t = std::nextafter(t, std::numeric_limits<acc_t>::infinity());
    s.thresholds[k] = t;
    s.gammas[k] = static_cast<acc_t>(values[k]);
  }
  s.gammas[n] = static_cast<acc_t>(gamma);
  return s;
}

template <typename scalar_t>
void run_forward(int variant, long long grid, long long count_grid, unsigned long long order, const void* input_ptr,
                 void* grad_ptr, void* loss_ptr, int loss_acc_dtype, const long long* geometry, const void* target,
                 int target_kind, int reduction, int compute_grad, long long ignore_index, double gamma,
                 const double* thresholds, const double* values, int n_thresholds, double alpha,
                 const void* class_weight, int class_weight_double, long long class_weight_stride,
                 int fold_mean_into_forward, void* state) {
  using acc_t = typename fd::AccumulateType<scalar_t>::type;
  constexpr int kVec = 16 / sizeof(scalar_t);
  require(grid >= 1, "grid must be >= 1");
  const fd::Geometry g = to_geometry(geometry);
  const auto* input = static_cast<const scalar_t*>(input_ptr);
  auto* grad = compute_grad ? static_cast<scalar_t*>(grad_ptr) : nullptr;
  const fd::LossOut<scalar_t> loss{loss_ptr, loss_acc_dtype != 0};

  Workspace<acc_t> ws(std::max(grid, fold_mean_into_forward ? count_grid : 1LL));
  fd::SoftmaxArgs<acc_t> args{};
  args.target = target;
  args.target_kind = target_kind;
  args.ignore_index = ignore_index;
  args.reduction = reduction;
  args.compute_grad = compute_grad != 0;
  args.alpha = static_cast<acc_t>(alpha);
  args.class_weight = class_weight;
  args.class_weight_double = class_weight_double != 0;
  args.class_weight_stride = class_weight_stride;
  args.gamma = schedule<acc_t>(gamma, thresholds, values, n_thresholds);
  args.fold_mean_into_forward = fold_mean_into_forward != 0;
  args.state = static_cast<acc_t*>(state);
  args.partial_loss = ws.partial_loss();
  args.partial_count = ws.partial_count();
  args.ticket = ws.tickets();
  if (fold_mean_into_forward) {
    run_count<acc_t>(count_grid, order, target, target_kind, g.rows * g.spatial, g.classes, ignore_index, 1LL,
                     args.partial_count, ws.tickets() + 1, args.state);
  }

  // The launcher's preconditions for each kernel (softmax_focal_loss_launch.h, choose_kernel).
  const bool class_contiguous = g.input_stride_c == 1 && (!compute_grad || g.grad_stride_c == 1);
  const bool positions_contiguous =
      g.spatial == 1 || (g.input_stride_s == 1 && (!compute_grad || g.grad_stride_s == 1));
  const auto blocks = emu::block_order(static_cast<unsigned>(grid), order);
  auto go = [&](auto kernel, int threads, size_t smem) {
    emu::launch_in_order_smem(blocks, smem, kernel, dim3(static_cast<unsigned>(grid)), dim3(threads), input, grad,
                              loss, g, args);
  };
  if (variant >= 0 && variant <= kRowsGroupMax) {
    const int group = 1 << variant;
    require(class_contiguous, "the rows kernel needs unit class strides");
    require(group * fd::RowsTile<scalar_t>::SLOTS * kVec - (kVec - 1) >= g.classes,
            "the rows kernel's register tile must hold C + VEC - 1 elements");
    switch (group) {
      case 1: return go(&fd::softmax_focal_loss_rows_kernel<scalar_t, 1>, kBlock, 0);
      case 2: return go(&fd::softmax_focal_loss_rows_kernel<scalar_t, 2>, kBlock, 0);
      case 4: return go(&fd::softmax_focal_loss_rows_kernel<scalar_t, 4>, kBlock, 0);
      case 8: return go(&fd::softmax_focal_loss_rows_kernel<scalar_t, 8>, kBlock, 0);
      case 16: return go(&fd::softmax_focal_loss_rows_kernel<scalar_t, 16>, kBlock, 0);
      case 32: return go(&fd::softmax_focal_loss_rows_kernel<scalar_t, 32>, kBlock, 0);
      case 64: return go(&fd::softmax_focal_loss_rows_kernel<scalar_t, 64>, kBlock, 0);
      case 128: return go(&fd::softmax_focal_loss_rows_kernel<scalar_t, 128>, kBlock, 0);
      default: return go(&fd::softmax_focal_loss_rows_kernel<scalar_t, 256>, kBlock, 0);
    }
  }
  constexpr int kLongThreads = fd::long_rows_block<scalar_t>();
  constexpr int kBatch = fd::positions_batch<scalar_t>();
  switch (variant) {
    case kLongRows:
      require(class_contiguous, "the long-rows kernel needs unit class strides");
      return go(&fd::softmax_focal_loss_long_rows_kernel<scalar_t, kLongThreads, false>, kLongThreads, 0);
    case kLongRowsStaged:
      require(class_contiguous, "the long-rows kernel needs unit class strides");
      return go(&fd::softmax_focal_loss_long_rows_kernel<scalar_t, kLongThreads, true>, kLongThreads,
                static_cast<size_t>((g.classes + 2 * kVec) * sizeof(scalar_t) + 15) / 16 * 16);
    case kChannelsSmall:
    case kChannels: {
      require(positions_contiguous, "the channels kernel needs neighbouring positions adjacent in memory");
      const bool small = variant == kChannelsSmall;
      require(g.classes <= (small ? fd::channels_small_classes<scalar_t>() : fd::channels_max_classes<scalar_t>()),
              "C must fit the channels kernel's register tile");
      const long long max_offset = static_cast<long long>(0xffffffffu / sizeof(scalar_t));
      require((g.classes - 1) * g.input_stride_c <= max_offset &&
                  (!compute_grad || (g.classes - 1) * g.grad_stride_c <= max_offset),
              "the channels kernel addresses classes with a 32-bit byte stride");
      return small ? go(&fd::softmax_focal_loss_channels_kernel<scalar_t, fd::channels_small_classes<scalar_t>()>,
                        kBlock, 0)
                   : go(&fd::softmax_focal_loss_channels_kernel<scalar_t, fd::channels_max_classes<scalar_t>()>,
                        kBlock, 0);
    }
    case kPositions:
      return go(&fd::softmax_focal_loss_positions_kernel<scalar_t, kBatch, false>, kBlock, 0);
    case kPositionsStaged:
      return go(&fd::softmax_focal_loss_positions_kernel<scalar_t, kBatch, true>, kBlock,
                static_cast<size_t>(kBlock) * g.classes * sizeof(scalar_t));
    default:
      throw emu::EmulationError("unknown variant");
  }
}

template <typename scalar_t>
void run_backward(int vec, long long grid, unsigned long long order, const void* grad, void* out,
                  const long long* geometry, const void* grad_output, int scalar_grad_output, const void* state) {
  using acc_t = typename fd::AccumulateType<scalar_t>::type;
  constexpr int kVec = 16 / sizeof(scalar_t);
  require(grid >= 1, "grid must be >= 1");
  const fd::Geometry g = to_geometry(geometry);
  const auto blocks = emu::block_order(static_cast<unsigned>(grid), order);
  const auto* in_ptr = static_cast<const scalar_t*>(grad);
  auto* out_ptr = static_cast<scalar_t*>(out);
  const auto* go_ptr = static_cast<const scalar_t*>(grad_output);
  const auto* state_ptr = static_cast<const acc_t*>(state);
  if (vec) {
    // As the launcher: a scalar grad_output over 16-byte aligned dense buffers, walked as (numel, 1, 1).
    require(scalar_grad_output != 0, "the VEC backward is for a scalar grad_output here");
    require(aligned_16(in_ptr) && aligned_16(out_ptr), "the VEC backward needs aligned buffers");
    fd::Geometry flat{};
    flat.rows = g.rows * g.classes * g.spatial;
    flat.classes = 1;
    flat.spatial = 1;
    emu::launch_in_order(blocks, &fd::focal_loss_backward_kernel<scalar_t, kBlock, kVec>,
                         dim3(static_cast<unsigned>(grid)), dim3(kBlock), in_ptr, out_ptr, flat, go_ptr,
                         fd::kGradOutputScalar, state_ptr);
  } else {
    emu::launch_in_order(blocks, &fd::focal_loss_backward_kernel<scalar_t, kBlock, 1>,
                         dim3(static_cast<unsigned>(grid)), dim3(kBlock), in_ptr, out_ptr, g, go_ptr,
                         scalar_grad_output != 0 ? fd::kGradOutputScalar : fd::kGradOutputPerPosition, state_ptr);
  }
}

// ----------------------------------------------------------------------------- sigmoid

// Which sigmoid kernel: dense targets in the input's dtype, dense targets in the
// accumulation dtype (float targets for half / bfloat16 input; for float and
// double the same instantiation as kDenseSame), index targets with the classes
// last (flat packs), index targets channel-first.
enum SigmoidVariant : int { kDenseSame = 0, kDenseAcc = 1, kIndex = 2, kIndexChannels = 3 };

bool aligned_to(const void* p, std::size_t bytes) { return reinterpret_cast<std::uintptr_t>(p) % bytes == 0; }

// images x classes x spatial logits: classes last (spatial == 1, images = rows), or
// channel-first with the given image and class strides (unit spatial stride).
template <typename scalar_t>
void run_sigmoid_forward(int variant, int vec, long long grid, long long count_grid, unsigned long long order,
                         const void* input_ptr, const void* target, int target_kind, void* grad_ptr, void* loss_ptr,
                         int loss_acc_dtype, long long images, long long classes, long long spatial,
                         long long input_stride_n, long long input_stride_c, int reduction, int compute_grad,
                         long long ignore_index, double gamma, const double* thresholds, const double* values,
                         int n_thresholds, double alpha, const void* normalizer, int has_host_normalizer,
                         double host_normalizer, int fold_mean_into_forward, void* state,
                         const void* image_normalizer, long long image_count) {
  using acc_t = typename fd::AccumulateType<scalar_t>::type;
  constexpr int kVec = 16 / sizeof(scalar_t);
  constexpr int kChannelsVec = fd::sigmoid_channels_vec<scalar_t>();
  require(grid >= 1, "grid must be >= 1");
  require(vec == 0 || vec == 1, "vec must be 0 (scalar accesses) or 1 (vector accesses)");
  require(normalizer == nullptr || !has_host_normalizer, "a normalizer is either on the device or on the host");
  const bool index_targets = variant == kIndex || variant == kIndexChannels;
  require(variant == kIndexChannels || spatial == 1, "spatial > 1 is for the channel-first kernel");
  const auto* input = static_cast<const scalar_t*>(input_ptr);
  auto* grad = compute_grad ? static_cast<scalar_t*>(grad_ptr) : nullptr;
  const fd::LossOut<scalar_t> loss{loss_ptr, loss_acc_dtype != 0};
  const long long rows = images * spatial;  // targets, for index targets
  const long long numel = images * classes * spatial;

  // As sigmoid_focal_loss_forward_cuda fills the arguments.
  fd::SigmoidArgs<acc_t> args{};
  args.reduction = reduction;
  args.compute_grad = compute_grad != 0;
  args.gamma = schedule<acc_t>(gamma, thresholds, values, n_thresholds);
  args.alpha = static_cast<acc_t>(alpha);
  args.use_alpha = alpha >= 0.0;
  args.target = index_targets ? target : nullptr;
  args.target_kind = target_kind;
  args.ignore_index = ignore_index;
  args.normalizer = static_cast<const acc_t*>(normalizer);
  args.count_rows = index_targets && normalizer == nullptr && !has_host_normalizer;
  args.host_denominator_as_given = has_host_normalizer != 0;
  args.host_denominator = static_cast<acc_t>(has_host_normalizer ? host_normalizer : static_cast<double>(numel));
  if (image_normalizer != nullptr) {  // as the launcher: numel / images elements per image
    require(image_count >= 1 && numel % image_count == 0, "image_count must divide the elements");
    args.image_normalizer = static_cast<const acc_t*>(image_normalizer);
    args.by_image_elements = fd::FastDivider::make(std::max<long long>(numel / image_count, 1));
  }
  args.fold_mean_into_forward = fold_mean_into_forward != 0;
  args.state = static_cast<acc_t*>(state);
  const bool counting = index_targets && args.fold_mean_into_forward && args.count_rows;
  Workspace<acc_t> ws(std::max(grid, counting ? count_grid : 1LL));
  args.partial_loss = ws.partial_loss();
  args.partial_count = ws.partial_count();
  args.ticket = ws.tickets();
  if (counting) {
    // Rows with a target in [0, C] count; state[0] = 1 / (rows x C).
    require(count_grid >= 1, "count_grid must be >= 1");
    run_count<acc_t>(count_grid, order, target, target_kind, rows, classes + 1, ignore_index, classes,
                     args.partial_count, ws.tickets() + 1, args.state);
  }

  // The launcher's `vectorizable` conditions; an entry point asked for vectors checks them.
  const bool outputs_aligned = aligned_16(input) && (!compute_grad || aligned_16(grad)) &&
                               (reduction != focal_cuda::kReductionNone ||
                                aligned_to(loss_ptr, (loss_acc_dtype ? sizeof(acc_t) : sizeof(scalar_t)) * kVec));
  const auto blocks = emu::block_order(static_cast<unsigned>(grid), order);
  const dim3 grid_dim(static_cast<unsigned>(grid));
  auto dense = [&](auto target_tag) {
    using target_t = decltype(target_tag);
    const auto* t = static_cast<const target_t*>(target);
    if (vec) {
      require(outputs_aligned && aligned_to(t, kVec * sizeof(target_t)),
              "the dense vector variant needs 16-byte aligned logits, outputs and VEC-aligned targets");
      emu::launch_in_order(blocks, &fd::sigmoid_focal_loss_dense_kernel<scalar_t, target_t, kVec>, grid_dim,
                           dim3(kBlock), input, t, grad, loss, numel, args);
    } else {
      emu::launch_in_order(blocks, &fd::sigmoid_focal_loss_dense_kernel<scalar_t, target_t, 1>, grid_dim,
                           dim3(kBlock), input, t, grad, loss, numel, args);
    }
  };
  const fd::FastDivider by_classes = fd::FastDivider::make(classes);
  switch (variant) {
    case kDenseSame:
      return dense(scalar_t{});
    case kDenseAcc:
      return dense(acc_t{});
    case kIndex:
      if (vec) {
        require(classes >= kVec && outputs_aligned,
                "the index vector variant needs C >= VEC and 16-byte aligned logits and outputs");
        return emu::launch_in_order(blocks, &fd::sigmoid_focal_loss_index_kernel<scalar_t, kVec>, grid_dim,
                                    dim3(kBlock), input, grad, loss, images, classes, by_classes, args);
      }
      return emu::launch_in_order(blocks, &fd::sigmoid_focal_loss_index_kernel<scalar_t, 1>, grid_dim, dim3(kBlock),
                                  input, grad, loss, images, classes, by_classes, args);
    case kIndexChannels:
      if (vec) {
        constexpr long long v = kChannelsVec;
        require(spatial % v == 0 && input_stride_n % v == 0 && input_stride_c % v == 0 &&
                    aligned_to(input, v * sizeof(scalar_t)) && (!compute_grad || aligned_to(grad, v * sizeof(scalar_t))),
                "the channel-first vector variant needs spatial and strides multiples of VEC and aligned bases");
        return emu::launch_in_order(blocks, &fd::sigmoid_focal_loss_channels_kernel<scalar_t, kChannelsVec>, grid_dim,
                                    dim3(kBlock), input, grad, loss, images, classes, spatial, input_stride_n,
                                    input_stride_c, args);
      }
      return emu::launch_in_order(blocks, &fd::sigmoid_focal_loss_channels_kernel<scalar_t, 1>, grid_dim,
                                  dim3(kBlock), input, grad, loss, images, classes, spatial, input_stride_n,
                                  input_stride_c, args);
    default:
      throw emu::EmulationError("unknown sigmoid variant");
  }
}

// focal_loss_backward_kernel as focal_loss_kernel.cu launches it for the scalar and
// elementwise layouts: the storage walked as (numel, 1, 1).
template <typename scalar_t>
void run_flat_backward(int vec, long long grid, unsigned long long order, const void* grad, void* out,
                       long long numel, const void* grad_output, int layout, const void* state) {
  using acc_t = typename fd::AccumulateType<scalar_t>::type;
  constexpr int kVec = 16 / sizeof(scalar_t);
  require(grid >= 1, "grid must be >= 1");
  require(layout == fd::kGradOutputScalar || layout == fd::kGradOutputElementwise,
          "the flat backward is for the scalar and elementwise layouts");
  fd::Geometry g{};
  g.rows = numel;
  g.classes = 1;
  g.spatial = 1;
  const auto blocks = emu::block_order(static_cast<unsigned>(grid), order);
  const auto* in_ptr = static_cast<const scalar_t*>(grad);
  auto* out_ptr = static_cast<scalar_t*>(out);
  const auto* go_ptr = static_cast<const scalar_t*>(grad_output);
  const auto* state_ptr = static_cast<const acc_t*>(state);
  if (vec) {
    require(aligned_16(in_ptr) && aligned_16(out_ptr) && (layout == fd::kGradOutputScalar || aligned_16(go_ptr)),
            "the VEC backward needs aligned buffers");
    emu::launch_in_order(blocks, &fd::focal_loss_backward_kernel<scalar_t, kBlock, kVec>,
                         dim3(static_cast<unsigned>(grid)), dim3(kBlock), in_ptr, out_ptr, g, go_ptr, layout,
                         state_ptr);
  } else {
    emu::launch_in_order(blocks, &fd::focal_loss_backward_kernel<scalar_t, kBlock, 1>,
                         dim3(static_cast<unsigned>(grid)), dim3(kBlock), in_ptr, out_ptr, g, go_ptr, layout,
                         state_ptr);
  }
}

template <typename F>
void dispatch(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32:
      return f(float{});
    case kFloat64:
      return f(double{});
    case kFloat16:
      return f(__half{});
    case kBFloat16:
      return f(__nv_bfloat16{});
    default:
      throw emu::EmulationError("unknown dtype code");
  }
}

// ----------------------------------------------------------------------------- emulator self-tests
// Tiny kernels checking cuda_on_cpu.h itself (tests/test_cuda_kernels_emulated.py).

__global__ void shuffle_probe_kernel(int mode, int param, int width, long long* out) {
  const long long value = 1000LL * blockIdx.x + threadIdx.x;
  out[blockIdx.x * blockDim.x + threadIdx.x] =
      mode == emu::kShuffleXor   ? __shfl_xor_sync(0xffffffffu, value, param, width)
      : mode == emu::kShuffleIdx ? __shfl_sync(0xffffffffu, value, param, width)
                                 : __shfl_down_sync(0xffffffffu, value, static_cast<unsigned>(param), width);
}

// Shared memory is shared by the block and written before it is read.
__global__ void shared_probe_kernel(long long* out) {
  __shared__ long long buffer[128];
  buffer[threadIdx.x] = 1000LL * blockIdx.x + threadIdx.x;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = buffer[blockDim.x - 1 - threadIdx.x];
}

// Misuse the emulator must report instead of hanging.
__global__ void divergent_barrier_kernel(int) {
  if (threadIdx.x < 32) __syncthreads();
}
__global__ void divergent_shuffle_kernel(int) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_down_sync(0xffffffffu, v, 1u);
  }
  (void)v;
}
__global__ void partial_warp_shuffle_kernel(int) {
  float v = static_cast<float>(threadIdx.x);
  if (threadIdx.x % 32 != 5) v = __shfl_xor_sync(0xffffffffu, v, 1);
  (void)v;
}

}  // namespace

extern "C" {

const char* emu_last_error() { return last_error.c_str(); }

// Schedule perturbation after every __syncthreads (seed 0: off); see cuda_on_cpu.h.
void emu_set_schedule_perturbation(unsigned long long seed) { emu::perturb_seed = seed; }

// How long a block may run before the launch counts as hung (a test hook).
void emu_set_launch_timeout(int seconds) { emu::launch_timeout = std::chrono::seconds(seconds); }

// The forward op: with fold_mean_into_forward, count_valid_targets_kernel on
// `count_grid` blocks first (sharing the workspace, second ticket), then the
// chosen forward kernel on `grid` blocks. class_weight is float32 or float64
// (class_weight_double) with a stride; state is in the accumulation dtype (float64
// for float64 input, float32 otherwise); the loss in it too when loss_acc_dtype.
int emu_softmax_focal_loss_forward(int dtype, int variant, long long grid, long long count_grid,
                                   unsigned long long order, const void* input, void* grad, void* loss,
                                   int loss_acc_dtype, const long long* geometry, const void* target, int target_kind,
                                   int reduction, int compute_grad, long long ignore_index, double gamma,
                                   const double* thresholds, const double* values, int n_thresholds, double alpha,
                                   const void* class_weight, int class_weight_double, long long class_weight_stride,
                                   int fold_mean_into_forward, void* state) {
  return guarded([&] {
    dispatch(dtype, [&](auto tag) {
      run_forward<decltype(tag)>(variant, grid, count_grid, order, input, grad, loss, loss_acc_dtype, geometry, target,
                                 target_kind, reduction, compute_grad, ignore_index, gamma, thresholds, values,
                                 n_thresholds, alpha, class_weight, class_weight_double, class_weight_stride,
                                 fold_mean_into_forward, state);
    });
  });
}

// count_valid_targets_kernel alone, with a fresh workspace: writes state[0] = 1/count (0 if none).
int emu_count_valid_targets(int acc_dtype, long long grid, unsigned long long order, const void* target,
                            int target_kind, long long positions, long long classes, long long ignore_index,
                            void* state) {
  return guarded([&] {
    auto body = [&](auto tag) {
      using acc_t = decltype(tag);
      Workspace<acc_t> ws(grid);
      run_count<acc_t>(grid, order, target, target_kind, positions, classes, ignore_index, 1LL, ws.partial_count(),
                       ws.tickets() + 1, static_cast<acc_t*>(state));
    };
    if (acc_dtype == kFloat64) {
      body(double{});
    } else {
      require(acc_dtype == kFloat32, "the accumulation dtype is float32 or float64");
      body(float{});
    }
  });
}

// focal_loss_backward_kernel (softmax layouts): out = grad * grad_output * state[1] (NaN if
// state[2] != 0); `out` may be `grad` (in place). vec: the 16-byte variant.
int emu_softmax_focal_loss_backward(int dtype, int vec, long long grid, unsigned long long order, const void* grad,
                                    void* out, const long long* geometry, const void* grad_output,
                                    int scalar_grad_output, const void* state) {
  return guarded([&] {
    dispatch(dtype, [&](auto tag) {
      run_backward<decltype(tag)>(vec, grid, order, grad, out, geometry, grad_output, scalar_grad_output, state);
    });
  });
}

// The sigmoid forward op as sigmoid_focal_loss_forward_cuda runs it (see run_sigmoid_forward).
// variant: 0 dense targets of the input's dtype, 1 dense targets of the accumulation dtype,
// 2 index targets with the classes last, 3 index targets channel-first. With index targets,
// fold_mean_into_forward and no normalizer, count_valid_targets_kernel runs first on
// `count_grid` blocks (classes + 1 classes, items_per_target = classes). Normalizer:
// `normalizer` a device value (accumulation dtype) or, with has_host_normalizer,
// host_normalizer "as given"; neither: the default denominators. image_normalizer (optional):
// one value per image (accumulation dtype), image_count images of numel / image_count elements.
int emu_sigmoid_focal_loss_forward(int dtype, int variant, int vec, long long grid, long long count_grid,
                                   unsigned long long order, const void* input, const void* target, int target_kind,
                                   void* grad, void* loss, int loss_acc_dtype, long long images, long long classes,
                                   long long spatial, long long input_stride_n, long long input_stride_c,
                                   int reduction, int compute_grad, long long ignore_index, double gamma,
                                   const double* thresholds, const double* values, int n_thresholds, double alpha,
                                   const void* normalizer, int has_host_normalizer, double host_normalizer,
                                   int fold_mean_into_forward, void* state, const void* image_normalizer,
                                   long long image_count) {
  return guarded([&] {
    dispatch(dtype, [&](auto tag) {
      run_sigmoid_forward<decltype(tag)>(variant, vec, grid, count_grid, order, input, target, target_kind, grad, loss,
                                         loss_acc_dtype, images, classes, spatial, input_stride_n, input_stride_c,
                                         reduction, compute_grad, ignore_index, gamma, thresholds, values,
                                         n_thresholds, alpha, normalizer, has_host_normalizer, host_normalizer,
                                         fold_mean_into_forward, state, image_normalizer, image_count);
    });
  });
}

// count_valid_targets_kernel with an items_per_target, with a fresh workspace:
// state[0] = 1 / (count * items_per_target), 0 if none.
int emu_count_valid_targets_items(int acc_dtype, long long grid, unsigned long long order, const void* target,
                                  int target_kind, long long positions, long long classes, long long ignore_index,
                                  long long items_per_target, void* state) {
  return guarded([&] {
    auto body = [&](auto tag) {
      using acc_t = decltype(tag);
      Workspace<acc_t> ws(grid);
      run_count<acc_t>(grid, order, target, target_kind, positions, classes, ignore_index, items_per_target,
                       ws.partial_count(), ws.tickets() + 1, static_cast<acc_t*>(state));
    };
    if (acc_dtype == kFloat64) {
      body(double{});
    } else {
      require(acc_dtype == kFloat32, "the accumulation dtype is float32 or float64");
      body(float{});
    }
  });
}

// focal_loss_backward_kernel over a flat (numel, 1, 1) geometry, layout 0 (scalar
// grad_output) or 1 (elementwise: grad_output with the gradient's storage);
// `out` may be `grad` (in place). vec: the 16-byte variant.
int emu_focal_loss_backward_flat(int dtype, int vec, long long grid, unsigned long long order, const void* grad,
                                 void* out, long long numel, const void* grad_output, int layout,
                                 const void* state) {
  return guarded([&] {
    dispatch(dtype, [&](auto tag) {
      run_flat_backward<decltype(tag)>(vec, grid, order, grad, out, numel, grad_output, layout, state);
    });
  });
}

// FastDivider as the sigmoid launcher makes it (host) and the index kernel divides with
// it (device code, run here on the host): out[k] = n[k] / d, for d >= 1, 0 <= n[k] < 2^63.
int emu_fast_divide(long long d, const long long* n, long long count, long long* out) {
  return guarded([&] {
    require(d >= 1, "the divisor must be >= 1");
    const fd::FastDivider f = fd::FastDivider::make(d);
    for (long long k = 0; k < count; ++k) {
      require(n[k] >= 0, "the dividend must be >= 0");
      out[k] = f.divide(n[k]);
    }
  });
}

// Emulator self-tests: 2 blocks of 128 threads; out holds 256 values.
int emu_selftest_shuffle(int mode, int param, int width, long long* out) {
  return guarded([&] { emu::launch(&shuffle_probe_kernel, dim3(2), dim3(128), mode, param, width, out); });
}
int emu_selftest_shared(long long* out) {
  return guarded([&] { emu::launch(&shared_probe_kernel, dim3(2), dim3(128), out); });
}
// which: 0 divergent __syncthreads, 1 lanes at different shuffles, 2 a lane missing at a shuffle.
int emu_selftest_misuse(int which) {
  return guarded([&] {
    auto* kernel = which == 0   ? &divergent_barrier_kernel
                   : which == 1 ? &divergent_shuffle_kernel
                                : &partial_warp_shuffle_kernel;
    emu::launch(kernel, dim3(2), dim3(128), 0);
  });
}

}  // extern "C"
