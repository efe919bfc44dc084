"""Autograd and fake (meta) registrations for the C++ operators.

The schemas live in csrc/ops.cpp (TORCH_LIBRARY); the CPU and CUDA kernels
register themselves per dispatch key. What is registered here makes the ops
differentiable and traceable by torch.compile.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library: runs the C++ registrations)

_LIB = "focal_cuda"
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


@torch.library.register_fake(f"{_LIB}::softmax_focal_loss_forward")
def _softmax_focal_loss_forward_fake(input, target, class_weight, alpha, gamma, ignore_index, reduction, compute_grad):
    loss = input.new_empty(target.shape) if reduction == _REDUCTIONS["none"] else input.new_empty(())
    grad = torch.empty_like(input) if compute_grad else input.new_empty((0,))
    state = input.new_empty((3,), dtype=torch.float64 if input.dtype == torch.float64 else torch.float32)
    return loss, grad, state


@torch.library.register_fake(f"{_LIB}::softmax_focal_loss_backward_")
def _softmax_focal_loss_backward_fake(grad_input, state, grad_output):
    return None


def _softmax_focal_loss_setup_context(ctx, inputs, output):
    _, grad_input, state = output
    ctx.mark_non_differentiable(grad_input, state)
    ctx.save_for_backward(grad_input, state)
    ctx.backward_done = False


def _softmax_focal_loss_backward(ctx, grad_loss, _grad_grad_input, _grad_state):
    if ctx.backward_done:
        raise RuntimeError(
            "softmax_focal_loss: this forward's gradient was already consumed by a backward; a second backward "
            "through the same graph (retain_graph=True) is not supported: run the forward again"
        )
    ctx.backward_done = True
    grad_input, state = ctx.saved_tensors
    if grad_input.dim() < 2:
        raise RuntimeError(
            "softmax_focal_loss: the forward ran without a gradient (no_grad, or an input that did not require "
            "grad), so there is nothing to backpropagate"
        )
    # The forward's gradient buffer is consumed in place: no N x C allocation in backward,
    # and no pass at all when grad_output times the stored scale is exactly 1.
    torch.ops.focal_cuda.softmax_focal_loss_backward_(grad_input, state, grad_loss)
    return grad_input, None, None, None, None, None, None, None


torch.library.register_autograd(
    f"{_LIB}::softmax_focal_loss_forward",
    _softmax_focal_loss_backward,
    setup_context=_softmax_focal_loss_setup_context,
)
