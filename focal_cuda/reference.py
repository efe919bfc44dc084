"""Pure-PyTorch focal loss: the oracle the fused kernels are tested against.

Plain autograd-differentiable code (log_softmax + gather), written for clarity,
not speed. Same signature and semantics as :func:`focal_cuda.softmax_focal_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F

__all__ = ["softmax_focal_loss"]

Alpha = Union[None, float, Sequence[float], torch.Tensor]

_TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def softmax_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: Alpha = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Softmax focal loss ``-alpha_y (1 - p_y)**gamma log p_y`` with ``p = softmax(input, dim=1)``.

    Args:
        input: logits ``(N, C)`` or ``(N, C, d1, ..., dk)``; float16, bfloat16, float32 or float64.
        target: class indices ``(N)`` or ``(N, d1, ..., dk)``; int64, int32, int16 or uint8.
        gamma: focusing parameter, a finite number ``>= 0``.
        alpha: ``None``, a float weighting every class, or ``C`` per-class weights (``alpha[y]``).
        ignore_index: targets equal to it contribute 0 and are not counted by ``"mean"``.
        reduction: ``"none"`` (target-shaped, 0 where ignored), ``"sum"``, or ``"mean"``
            (sum / number of non-ignored elements; 0 when every element is ignored).

    Math runs in float32 (float64 for float64 input); the result has the input's dtype.
    """
    if input.dtype not in _INPUT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got input.dtype={input.dtype}")
    if input.dim() < 2:
        raise ValueError(f"input must have shape (N, C, d1, ..., dk), got input.shape={tuple(input.shape)}")
    if target.dtype not in _TARGET_DTYPES:
        raise TypeError(f"target must be int64, int32, int16 or uint8, got target.dtype={target.dtype}")
    expected = input.shape[:1] + input.shape[2:]
    if target.shape != expected:
        raise ValueError(f"target must have shape {tuple(expected)}, got target.shape={tuple(target.shape)}")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, got gamma={gamma!r}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got reduction={reduction!r}")

    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    num_classes = input.shape[1]
    target = target.long()
    valid = target != ignore_index
    bad = valid & ((target < 0) | (target >= num_classes))
    if bad.any():
        value = int(target[bad][0])
        raise IndexError(f"target values must be in [0, {num_classes}) or ignore_index, got target value {value}")
    safe_target = torch.where(valid, target, torch.zeros_like(target))

    logp = F.log_softmax(input.to(acc), dim=1)
    logp_t = logp.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    loss = -logp_t
    if gamma != 0:
        loss = loss * (-torch.expm1(logp_t)) ** gamma

    if isinstance(alpha, torch.Tensor) and alpha.dim() == 0:
        alpha = float(alpha)
    if isinstance(alpha, (int, float)):
        loss = loss * float(alpha)
    elif alpha is not None:
        if isinstance(alpha, torch.Tensor) and alpha.requires_grad:
            raise ValueError("alpha must not require grad, got alpha.requires_grad=True")
        weight = torch.as_tensor(alpha, dtype=acc, device=input.device)
        if weight.shape != (num_classes,):
            raise ValueError(f"alpha must have {num_classes} per-class weights, got alpha.shape={tuple(weight.shape)}")
        loss = loss * weight[safe_target]

    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        loss = loss.sum() / valid.sum().clamp(min=1).to(acc)
    return loss.to(input.dtype)
