// Host-side pieces shared by the softmax and sigmoid operators: dtypes, target
// kinds, and the backward ops (focal_loss_backward_ / focal_loss_backward), which
// apply grad_output to the gradient a forward op computed, whichever loss it was.
#pragma once

#include <ATen/ATen.h>

#include "focal_loss_math.h"

namespace focal_cuda {

// float32 arithmetic for every input dtype but float64.
at::ScalarType accumulation_type(at::ScalarType input_dtype);

// The kind of an integer class-index tensor, or a TypeError naming `what`.
TargetKind target_kind_of(const at::Tensor& target, const char* op, const char* what);

// How grad_output meets the forward's gradient in a backward.
enum class GradOutputLayout {
  kScalar,       // reduction "sum" / "mean": one number times the stored scale
  kElementwise,  // the gradient's shape (sigmoid, reduction "none")
  kPerPosition,  // the gradient's shape without dim 1, broadcast over the classes (softmax, "none")
};

// Checks the arguments of focal_loss_backward(_) and says how grad_output applies.
GradOutputLayout check_focal_loss_backward(const at::Tensor& grad_input, const at::Tensor& state,
                                           const at::Tensor& grad_output);

// A new tensor with `like`'s sizes, dtype, device and (dense) strides, for a forward's
// gradient. On the CPU it comes from a small pool of recently freed gradient buffers:
// a fresh allocation of that size is mapped page by page and zeroed by the kernel on
// first touch, an extra pass over memory that costs about as much as the gradient
// write itself. FOCAL_CUDA_CPU_GRAD_POOL=0 turns the pool off.
at::Tensor empty_gradient_like(const at::Tensor& like);

constexpr const char* kGradientConsumedMessage =
    "focal_cuda: this forward's gradient was already consumed by a backward; a second backward through the same "
    "graph (retain_graph=True) is not supported: run the forward again";

}  // namespace focal_cuda
