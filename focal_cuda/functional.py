"""Functional interface: thin, typed wrappers over torch.ops.focal_cuda.*."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch

from . import _ops

__all__ = ["sigmoid_focal_loss", "softmax_focal_loss"]

Alpha = Union[None, float, Sequence[float], torch.Tensor]
Normalizer = Union[None, float, torch.Tensor]


def reduction_code(reduction: str) -> int:
    try:
        return _ops._REDUCTIONS[reduction]
    except (KeyError, TypeError):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got reduction={reduction!r}") from None


def _check_gamma(gamma: float) -> None:
    if not isinstance(gamma, (int, float)) or isinstance(gamma, bool) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, got gamma={gamma!r}")


def _split_alpha(alpha: Alpha, input: torch.Tensor) -> tuple[Optional[torch.Tensor], float]:
    """Returns (per-class weight tensor or None, scalar weight)."""
    if alpha is None:
        return None, 1.0
    if isinstance(alpha, torch.Tensor):
        if alpha.requires_grad:
            raise ValueError("alpha must not require grad: focal_cuda differentiates with respect to the logits only, "
                             "got alpha.requires_grad=True")
        if alpha.dim() == 0:
            # Read on the host: a CPU scalar, or one on the input's device (a meta one holds no value).
            if alpha.device.type == "meta" or alpha.device not in (input.device, torch.device("cpu")):
                raise ValueError(f"alpha must be on the input's device {input.device} or a CPU scalar, "
                                 f"got alpha.device={alpha.device}")
            return None, float(alpha)
        return alpha, 1.0
    if isinstance(alpha, (int, float)):
        return None, float(alpha)
    if isinstance(alpha, Sequence):
        dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        return torch.tensor(list(alpha), dtype=dtype, device=input.device), 1.0
    raise TypeError(f"alpha must be None, a float, a sequence of per-class floats or a 1-D tensor, got alpha={alpha!r}")


def softmax_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: Alpha = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Softmax focal loss, ``-alpha_y (1 - p_y)**gamma log p_y`` with ``p = softmax(input, dim=1)``.

    Args:
        input: logits ``(N, C)`` or ``(N, C, d1, ..., dk)``; float16, bfloat16, float32 or float64.
        target: class indices ``(N)`` or ``(N, d1, ..., dk)``; int64, int32, int16 or uint8.
        gamma: focusing parameter, a finite float ``>= 0``.
        alpha: ``None``, a float weighting every class, or ``C`` per-class weights (``alpha[y]``).
        ignore_index: targets equal to it contribute 0 and are not counted by ``"mean"``.
        reduction: ``"none"`` (target-shaped), ``"sum"``, or ``"mean"`` (sum / non-ignored count; 0 if none).

    One fused kernel computes loss, reduction and (when ``input`` requires grad) the gradient.
    """
    _check_gamma(gamma)
    code = reduction_code(reduction)
    class_weight, alpha_scalar = _split_alpha(alpha, input)
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    loss, _, _ = torch.ops.focal_cuda.softmax_focal_loss_forward(
        input, target, class_weight, alpha_scalar, float(gamma), int(ignore_index), code, compute_grad, True
    )
    return loss


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    ignore_index: int = -100,
    normalizer: Normalizer = None,
) -> torch.Tensor:
    """Sigmoid focal loss over the last dim, a drop-in for ``torchvision.ops.sigmoid_focal_loss``.

    Args:
        inputs: logits of any shape with the classes last, e.g. ``(N, C)`` or ``(B, A, C)``;
            float16, bfloat16, float32 or float64.
        targets: either dense floating targets of the inputs' shape, values in [0, 1] (soft labels
            allowed), or integer class indices (int64, int32, int16, uint8) of shape ``inputs.shape[:-1]``:
            ``c`` in ``[0, C)`` is the row's positive class, ``C`` is background, ``ignore_index`` drops
            the row. No one-hot tensor is built.
        alpha: weight of the positives, ``1 - alpha`` of the negatives; ``alpha < 0``: no weighting.
        gamma: focusing parameter, a finite float ``>= 0``.
        reduction: ``"none"`` (the inputs' shape), ``"sum"``, or ``"mean"``: sum / number of elements
            (dense) or / (non-ignored rows x C) (index), 0 when that is 0.
        ignore_index: index targets only.
        normalizer: ``reduction="mean"`` only: the denominator instead, e.g. the number of positive
            anchors; a float or a 0-dim tensor, read on the device (no host synchronisation).

    One fused kernel computes loss, reduction and (when ``inputs`` requires grad) the gradient.
    """
    _check_gamma(gamma)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number (< 0 for no weighting), got alpha={alpha!r}")
    code = reduction_code(reduction)
    if isinstance(targets, torch.Tensor) and targets.requires_grad:
        raise ValueError("targets must not require grad: focal_cuda differentiates with respect to the logits only, "
                         "got targets.requires_grad=True")
    if normalizer is not None and not isinstance(normalizer, torch.Tensor):
        if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
            raise TypeError(f"normalizer must be None, a number or a 0-dim tensor, got normalizer={normalizer!r}")
        normalizer = torch.tensor(float(normalizer), dtype=torch.float64)
    compute_grad = inputs.requires_grad and torch.is_grad_enabled()
    loss, _, _ = torch.ops.focal_cuda.sigmoid_focal_loss_forward(
        inputs, targets, float(alpha), float(gamma), int(ignore_index), code, normalizer, compute_grad, True
    )
    return loss
