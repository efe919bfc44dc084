"""Autograd and fake (meta) registrations for the C++ operators.

The schemas live in csrc/ops.cpp (TORCH_LIBRARY); the CPU and CUDA kernels
register themselves per dispatch key. What is registered here makes the ops
differentiable and traceable by torch.compile. Both forward ops return
(loss, grad_input, state) and share one backward: focal_loss_backward(_).
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loads the library: runs the C++ registrations)

_LIB = "focal_cuda"
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _check_device(op: str, tensor, name: str, like: torch.Tensor, like_name: str, cpu_scalar_ok: bool = False) -> None:
    """The kernels' device check, in the fake kernels too: a tensor argument on another device (the meta device
    included) routes the call here instead of to a kernel, and torch.compile traces through here."""
    if tensor is None or tensor.device == like.device or (cpu_scalar_ok and tensor.device.type == "cpu"):
        return
    also = " or a CPU scalar" if cpu_scalar_ok else ""
    raise ValueError(f"{op}: {name} must be on the {like_name} device {like.device}{also}, got {name}.device={tensor.device}")


def _state_like(input: torch.Tensor) -> torch.Tensor:
    return input.new_empty((3,), dtype=torch.float64 if input.dtype == torch.float64 else torch.float32)


@torch.library.register_fake(f"{_LIB}::softmax_focal_loss_forward")
def _softmax_focal_loss_forward_fake(
    input, target, class_weight, alpha, gamma, ignore_index, reduction, compute_grad, inplace_backward=False,
    gamma_thresholds=(), gamma_values=(), loss_dtype=None,
):
    _check_device("softmax_focal_loss", target, "target", input, "input's")
    _check_device("softmax_focal_loss", class_weight, "alpha", input, "input's")
    dtype = loss_dtype or input.dtype
    loss = input.new_empty(target.shape, dtype=dtype) if reduction == _REDUCTIONS["none"] else input.new_empty((), dtype=dtype)
    grad = torch.empty_like(input) if compute_grad else input.new_empty((0,))
    return loss, grad, _state_like(input)


@torch.library.register_fake(f"{_LIB}::sigmoid_focal_loss_forward")
def _sigmoid_focal_loss_forward_fake(
    input, target, alpha, gamma, ignore_index, reduction, normalizer, compute_grad, inplace_backward=False,
    gamma_thresholds=(), gamma_values=(), loss_dtype=None, class_dim=-1,
):
    _check_device("sigmoid_focal_loss", target, "targets", input, "inputs'")
    _check_device("sigmoid_focal_loss", normalizer, "normalizer", input, "inputs'", cpu_scalar_ok=True)
    # The kernels write contiguous outputs.
    dtype = loss_dtype or input.dtype
    loss = input.new_empty(input.shape, dtype=dtype) if reduction == _REDUCTIONS["none"] else input.new_empty((), dtype=dtype)
    grad = input.new_empty(input.shape) if compute_grad else input.new_empty((0,))
    return loss, grad, _state_like(input)


def _check_backward_devices(grad_input, state, grad_output) -> None:
    _check_device("focal_loss_backward", state, "state", grad_input, "grad_input's")
    _check_device("focal_loss_backward", grad_output, "grad_output", grad_input, "grad_input's")


@torch.library.register_fake(f"{_LIB}::focal_loss_backward_")
def _focal_loss_backward_inplace_fake(grad_input, state, grad_output):
    _check_backward_devices(grad_input, state, grad_output)
    return None


@torch.library.register_fake(f"{_LIB}::focal_loss_backward")
def _focal_loss_backward_fake(grad_input, state, grad_output):
    _check_backward_devices(grad_input, state, grad_output)
    return torch.empty_like(grad_input)


class _Autograd:
    """The autograd formula of one forward op. ``input`` is argument 0; ``compute_grad`` and
    ``inplace_backward`` are found by name in the schema. The forward's gradient buffer is applied
    by the shared backward."""

    def __init__(self, op_name: str, schema) -> None:
        self.op_name = op_name
        self.arguments = [a.name for a in schema.arguments]
        self.defaults = [a.default_value if a.has_default_value() else None for a in schema.arguments]
        self.compute_grad_index = self.arguments.index("compute_grad")
        self.inplace_backward_index = self.arguments.index("inplace_backward")

    def _argument(self, inputs, index):
        return inputs[index] if index < len(inputs) else self.defaults[index]

    def setup_context(self, ctx, inputs, output) -> None:
        compute_grad = self._argument(inputs, self.compute_grad_index)
        inplace_backward = self._argument(inputs, self.inplace_backward_index)
        _, grad_input, state = output
        ctx.mark_non_differentiable(grad_input, state)
        # Otherwise autograd hands the backward a zero tensor the size of the logits for
        # the non-differentiable grad_input output: a full extra write per step.
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad_input, state)
        ctx.inplace_backward = bool(inplace_backward)
        ctx.backward_done = False
        # Called directly with compute_grad=False on an input that requires grad: keep
        # what a recomputation needs (the Python wrappers never take this path).
        ctx.recompute_args = None
        if not compute_grad:
            args = [self._argument(inputs, i) for i in range(len(self.arguments))]
            args[0] = args[0].detach()
            args[self.compute_grad_index] = True
            args[self.inplace_backward_index] = False
            ctx.recompute_args = tuple(args)

    def backward(self, ctx, grad_loss, _grad_grad_input, _grad_state):
        nones = [None] * (len(self.arguments) - 1)
        if grad_loss is None:  # the loss was not used (grads are not materialized)
            return None, *nones
        eager = type(grad_loss) is torch.Tensor
        if eager and torch.is_grad_enabled():
            raise RuntimeError(
                f"{self.op_name}: double backward (create_graph=True) is not supported: the gradient is computed "
                "by the forward kernel and is not itself differentiable"
            )
        in_place = ctx.inplace_backward and eager and ctx.recompute_args is None
        if in_place and ctx.backward_done:
            # Checked before the saved tensors are unpacked, whose version check would
            # raise a less helpful error.
            raise RuntimeError(
                f"{self.op_name}: this forward's gradient was already consumed by a backward; a second backward "
                "through the same graph (retain_graph=True) is not supported: run the forward again"
            )
        grad_input, state = ctx.saved_tensors
        if ctx.recompute_args is not None:
            with torch.no_grad():
                forward = getattr(torch.ops.focal_cuda, f"{self.op_name}_forward")
                _, grad_input, state = forward(*ctx.recompute_args)
        if not in_place:
            # The caller may still hold grad_input, or the backward is being traced
            # (torch.compile, export, fake tensors: a graph may not mutate a saved
            # activation): the gradient is a new tensor.
            return torch.ops.focal_cuda.focal_loss_backward(grad_input, state, grad_loss), *nones
        ctx.backward_done = True
        # Eager: the forward's gradient buffer is consumed in place. No N x C allocation in
        # backward, and no pass at all when grad_output times the stored scale is exactly 1.
        torch.ops.focal_cuda.focal_loss_backward_(grad_input, state, grad_loss)
        return grad_input, *nones


for _name in ("softmax_focal_loss", "sigmoid_focal_loss"):
    _formula = _Autograd(_name, getattr(torch.ops.focal_cuda, f"{_name}_forward").default._schema)
    torch.library.register_autograd(
        f"{_LIB}::{_name}_forward", _formula.backward, setup_context=_formula.setup_context
    )
