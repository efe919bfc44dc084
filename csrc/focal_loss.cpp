#include "focal_loss.h"

#include <c10/core/impl/alloc_cpu.h>

#include <atomic>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

namespace focal_cuda {

namespace {

// Freed gradient buffers kept for reuse: the two most recent (a training loop has
// one or two loss shapes), so that idle memory stays bounded by two gradients.
class GradientBufferPool {
 public:
  static GradientBufferPool& instance() {
    static GradientBufferPool* pool = new GradientBufferPool();  // never destroyed: deleters may run at exit
    return *pool;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].bytes == bytes) {
          void* p = free_[i].ptr;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          return p;
        }
      }
    }
    return c10::alloc_cpu(bytes);
  }

  void give_back(void* p, size_t bytes) {
    void* evicted = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back({p, bytes});
      if (free_.size() > kKept) {
        evicted = free_.front().ptr;
        free_.erase(free_.begin());
      }
    }
    if (evicted != nullptr) c10::free_cpu(evicted);
  }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };
  static constexpr size_t kKept = 2;
  std::mutex mutex_;
  std::vector<Block> free_;
};

struct PooledBlock {
  void* ptr;
  size_t bytes;
};

void return_pooled_block(void* context) {
  auto* block = static_cast<PooledBlock*>(context);
  GradientBufferPool::instance().give_back(block->ptr, block->bytes);
  delete block;
}

bool pool_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("FOCAL_CUDA_CPU_GRAD_POOL");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

// Small buffers are cheap to allocate: pooling is for those that are mapped fresh.
constexpr size_t kPoolMinBytes = size_t(1) << 20;

}  // namespace

at::Tensor empty_gradient_like(const at::Tensor& like) {
  if (!like.is_cpu() || !pool_enabled()) return at::empty_like(like, at::MemoryFormat::Preserve);
  // The layout empty_like would give, computed without allocating.
  const auto layout = at::empty_like(like, like.options().device(at::kMeta), at::MemoryFormat::Preserve);
  const size_t bytes = static_cast<size_t>(layout.storage().nbytes());
  if (bytes < kPoolMinBytes) return at::empty_like(like, at::MemoryFormat::Preserve);
  void* p = GradientBufferPool::instance().take(bytes);
  auto* block = new PooledBlock{p, bytes};
  at::DataPtr data(p, block, &return_pooled_block, at::Device(at::kCPU));
  at::Storage storage(at::Storage::use_byte_size_t(), bytes, std::move(data), /*allocator=*/nullptr,
                      /*resizable=*/false);
  auto grad = at::empty({0}, like.options()).set_(storage, 0, layout.sizes(), layout.strides());
  // Torch's deterministic mode fills new memory with NaN so that unwritten elements show; do the same.
  if (at::globalContext().deterministicAlgorithms() && at::globalContext().deterministicFillUninitializedMemory()) {
    grad.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return grad;
}

GammaSchedulePlan plan_gamma_schedule(double gamma, at::ArrayRef<double> thresholds, at::ArrayRef<double> values,
                                      const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(gamma) && gamma >= 0.0, op, ": gamma must be a finite number >= 0, got gamma=",
                    gamma);
  TORCH_CHECK_VALUE(thresholds.size() == values.size(), op, ": gamma_thresholds and gamma_values must have the same "
                    "length (one gamma per threshold), got gamma_thresholds=", thresholds, " and gamma_values=",
                    values);
  TORCH_CHECK_VALUE(static_cast<int>(thresholds.size()) < kMaxGammaPieces, op, ": a gamma schedule has at most ",
                    kMaxGammaPieces - 1, " thresholds, got gamma_thresholds=", thresholds);
  for (size_t k = 0; k < thresholds.size(); ++k) {
    TORCH_CHECK_VALUE(std::isfinite(thresholds[k]) && thresholds[k] > 0.0 && thresholds[k] <= 1.0, op,
                      ": gamma thresholds must lie in (0, 1], got gamma_thresholds=", thresholds);
    TORCH_CHECK_VALUE(k == 0 || thresholds[k] > thresholds[k - 1], op,
                      ": gamma thresholds must be strictly increasing, got gamma_thresholds=", thresholds);
    TORCH_CHECK_VALUE(std::isfinite(values[k]) && values[k] >= 0.0, op,
                      ": gamma values must be finite numbers >= 0, got gamma_values=", values);
  }
  GammaSchedulePlan plan;
  plan.thresholds.assign(thresholds.begin(), thresholds.end());
  plan.values.assign(values.begin(), values.end());
  plan.gamma = gamma;
  return plan;
}

at::ScalarType plan_loss_dtype(at::ScalarType input_dtype, std::optional<at::ScalarType> loss_dtype, const char* op) {
  if (!loss_dtype.has_value() || *loss_dtype == input_dtype) return input_dtype;
  const bool half_input = input_dtype == at::kHalf || input_dtype == at::kBFloat16;
  TORCH_CHECK_VALUE(half_input && *loss_dtype == at::kFloat, op, ": loss_dtype must be None, the input's dtype (",
                    input_dtype, ") or float32 for a float16 / bfloat16 input, got loss_dtype=", *loss_dtype);
  return *loss_dtype;
}

namespace {
std::atomic<bool> cuda_target_checks{false};
}  // namespace

void set_cuda_target_checks(bool enabled) { cuda_target_checks.store(enabled); }
bool cuda_target_checks_enabled() { return cuda_target_checks.load(); }

void check_targets_on_device(const at::Tensor& target, int64_t valid_end, int64_t ignore_index, const char* op,
                             const char* what, const std::string& valid_range) {
  if (target.numel() == 0) return;
  const auto t = target.to(at::kLong);
  const auto bad = t.ne(ignore_index).logical_and_(t.lt(0).logical_or_(t.ge(valid_end)));
  if (!bad.any().item<bool>()) return;  // the synchronisation this mode is for
  const int64_t i = bad.flatten().nonzero().select(0, 0).item<int64_t>();
  TORCH_CHECK_INDEX(false, op, ": ", what, " value ", t.flatten()[i].item<int64_t>(), " at flat position ", i,
                    " is out of range: expected ", valid_range, " or ", what, " == ignore_index=", ignore_index);
}

at::ScalarType accumulation_type(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

TargetKind target_kind_of(const at::Tensor& target, const char* op, const char* what) {
  switch (target.scalar_type()) {
    case at::kByte:
      return kTargetUInt8;
    case at::kShort:
      return kTargetInt16;
    case at::kInt:
      return kTargetInt32;
    case at::kLong:
      return kTargetInt64;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", what, " must be an integer tensor of class indices (int64, int32, int16 or "
                       "uint8), got ", what, ".dtype=", target.scalar_type());
  }
  return kTargetInt64;
}

GradOutputLayout check_focal_loss_backward(const at::Tensor& grad_input, const at::Tensor& state,
                                           const at::Tensor& grad_output) {
  TORCH_CHECK_VALUE(state.dim() == 1 && state.size(0) == 3,
                    "focal_loss_backward: state must be the (3,) tensor returned by the forward, got state.shape=",
                    state.sizes());
  TORCH_CHECK_VALUE(grad_input.dim() >= 1,
                    "focal_loss_backward: grad_input must be the gradient buffer returned by a forward with "
                    "compute_grad=True, got grad_input.shape=", grad_input.sizes());
  TORCH_CHECK_VALUE(state.device() == grad_input.device(), "focal_loss_backward: state must be on ",
                    grad_input.device(), ", got state.device=", state.device());
  TORCH_CHECK_VALUE(grad_output.device() == grad_input.device(), "focal_loss_backward: grad_output must be on ",
                    grad_input.device(), ", got grad_output.device=", grad_output.device());
  TORCH_CHECK_TYPE(at::isFloatingType(grad_output.scalar_type()),
                   "focal_loss_backward: grad_output must be floating point, got grad_output.dtype=",
                   grad_output.scalar_type());
  if (grad_output.dim() == 0) return GradOutputLayout::kScalar;
  if (grad_output.sizes() == grad_input.sizes()) return GradOutputLayout::kElementwise;
  std::vector<int64_t> per_position;
  if (grad_input.dim() >= 2) {
    per_position.push_back(grad_input.size(0));
    for (int64_t d = 2; d < grad_input.dim(); ++d) per_position.push_back(grad_input.size(d));
  }
  TORCH_CHECK_VALUE(grad_input.dim() >= 2 && grad_output.sizes() == at::IntArrayRef(per_position),
                    "focal_loss_backward: grad_output must be a scalar, have grad_input's shape ", grad_input.sizes(),
                    " or that shape without dim 1 ", at::IntArrayRef(per_position), ", got grad_output.shape=",
                    grad_output.sizes());
  return GradOutputLayout::kPerPosition;
}

}  // namespace focal_cuda
