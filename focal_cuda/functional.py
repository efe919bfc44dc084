"""Functional interface: thin, typed wrappers over torch.ops.focal_cuda.*."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Optional, Union

import torch

from . import _ops
from .schedule import Gamma, GammaSchedule, op_gamma_arguments, resolve_gamma

__all__ = ["GammaSchedule", "sigmoid_focal_loss", "softmax_focal_loss"]

Alpha = Union[None, float, Sequence[float], torch.Tensor]
Normalizer = Union[None, float, torch.Tensor]


def reduction_code(reduction: str) -> int:
    try:
        return _ops._REDUCTIONS[reduction]
    except (KeyError, TypeError):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got reduction={reduction!r}") from None


# Devices whose kernels write a float32 loss for 16-bit logits (loss_dtype).
_FLOAT32_LOSS_DEVICES = ("cpu", "cuda")


def autocast_loss_dtype(input: torch.Tensor) -> Optional[torch.dtype]:
    """float32 for float16 / bfloat16 logits under autocast on their device (F.cross_entropy's result dtype
    there), else None (the input's dtype). The logits are read as they are either way."""
    if not isinstance(input, torch.Tensor) or input.dtype not in (torch.float16, torch.bfloat16):
        return None
    if input.device.type not in _FLOAT32_LOSS_DEVICES:
        return None
    return torch.float32 if torch.is_autocast_enabled(input.device.type) else None


# Per-class weights given as sequences, already on a device: (values, device, dtype) -> tensor. A
# training loop passes the same list every step; copying it host-to-device each time would wait
# for the copy (a pageable transfer) on every call.
_CLASS_WEIGHT_CACHE: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
_CLASS_WEIGHT_CACHE_SIZE = 16


def _class_weight_tensor(values: Sequence[float], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    if torch.compiler.is_compiling():  # traced: a constant of the graph
        return torch.tensor(list(values), dtype=dtype, device=device)
    key = (tuple(float(v) for v in values), device, dtype)
    weight = _CLASS_WEIGHT_CACHE.get(key)
    if weight is None:
        weight = torch.tensor(list(key[0]), dtype=dtype, device=device)
        _CLASS_WEIGHT_CACHE[key] = weight
        if len(_CLASS_WEIGHT_CACHE) > _CLASS_WEIGHT_CACHE_SIZE:
            _CLASS_WEIGHT_CACHE.popitem(last=False)
    else:
        _CLASS_WEIGHT_CACHE.move_to_end(key)
    return weight


def _split_alpha(alpha: Alpha, input: torch.Tensor) -> tuple[Optional[torch.Tensor], float]:
    """Returns (per-class weight tensor or None, scalar weight), without a host synchronisation."""
    if alpha is None:
        return None, 1.0
    if isinstance(alpha, torch.Tensor):
        if alpha.requires_grad:
            raise ValueError("alpha must not require grad: focal_cuda differentiates with respect to the logits only, "
                             "got alpha.requires_grad=True")
        if alpha.dim() == 0:
            if alpha.device.type == "cpu":
                return None, float(alpha)  # a CPU number: reading it costs nothing
            if alpha.device != input.device:
                raise ValueError(f"alpha must be on the input's device {input.device} or a CPU scalar, "
                                 f"got alpha.device={alpha.device}")
            # A device scalar: read on the device as a stride-0 view of one weight per class
            # (float() would wait for the device).
            return alpha.expand(input.shape[1] if input.dim() >= 2 else 0), 1.0
        return alpha, 1.0
    if isinstance(alpha, (int, float)):
        return None, float(alpha)
    if isinstance(alpha, Sequence):
        dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        return _class_weight_tensor(alpha, input.device, dtype), 1.0
    raise TypeError(f"alpha must be None, a float, a sequence of per-class floats or a 1-D tensor, got alpha={alpha!r}")


def softmax_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    gamma: Gamma = 2.0,
    alpha: Alpha = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Softmax focal loss, ``-alpha_y (1 - p_y)**gamma log p_y`` with ``p = softmax(input, dim=1)``.

    Args:
        input: logits ``(N, C)`` or ``(N, C, d1, ..., dk)``; float16, bfloat16, float32 or float64.
        target: class indices ``(N)`` or ``(N, d1, ..., dk)``; int64, int32, int16 or uint8.
        gamma: focusing parameter, a finite float ``>= 0``; or a :class:`GammaSchedule` (gamma per position
            from its own ``p_y``), or a preset's name: ``"flsd53"`` (= ``GammaSchedule.flsd53()``).
        alpha: ``None``, a float weighting every class, or ``C`` per-class weights (``alpha[y]``).
        ignore_index: targets equal to it contribute 0 and are not counted by ``"mean"``.
        reduction: ``"none"`` (target-shaped), ``"sum"``, or ``"mean"`` (sum / non-ignored count; 0 if none).

    The loss has the input's dtype, except float32 for float16 / bfloat16 logits under autocast.
    One fused kernel computes loss, reduction and (when ``input`` requires grad) the gradient.
    """
    gamma, thresholds, values = op_gamma_arguments(resolve_gamma(gamma))
    code = reduction_code(reduction)
    class_weight, alpha_scalar = _split_alpha(alpha, input)
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    loss, _, _ = torch.ops.focal_cuda.softmax_focal_loss_forward(
        input, target, class_weight, alpha_scalar, gamma, int(ignore_index), code, compute_grad, True,
        thresholds, values, autocast_loss_dtype(input),
    )
    return loss


def sigmoid_focal_loss(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    alpha: float = 0.25,
    gamma: Gamma = 2.0,
    reduction: str = "none",
    *,
    ignore_index: int = -100,
    normalizer: Normalizer = None,
    class_dim: int = -1,
) -> torch.Tensor:
    """Sigmoid focal loss, a drop-in for ``torchvision.ops.sigmoid_focal_loss``.

    Args:
        inputs: logits with the classes in ``class_dim``: last (``(N, C)``, ``(B, A, C)``, detection heads)
            or 1 (``(N, C, H, W)``, segmentation heads); float16, bfloat16, float32 or float64. Read in
            place in contiguous and channels_last layouts.
        targets: either dense floating targets of the inputs' shape, values in [0, 1] (soft labels
            allowed), or integer class indices (int64, int32, int16, uint8) of the inputs' shape without
            ``class_dim``: ``c`` in ``[0, C)`` is the position's positive class, ``C`` is background,
            ``ignore_index`` drops the position (uint8 masks with 255 work as they are). No one-hot tensor
            is built.
        alpha: weight of the positives, ``1 - alpha`` of the negatives; ``alpha < 0``: no weighting.
        gamma: focusing parameter, a finite float ``>= 0``; or a :class:`GammaSchedule` (gamma per element
            from its own ``p_t = p y + (1 - p)(1 - y)``), or a preset's name (``"flsd53"``).
        reduction: ``"none"`` (the inputs' shape), ``"sum"``, or ``"mean"``: sum / number of elements
            (dense) or / (non-ignored rows x C) (index), 0 when that is 0.
        ignore_index: index targets only.
        class_dim: ``-1`` (classes last, the default) or ``1`` (channel-first ``(N, C, d1, ..., dk)``).
            Dense targets are elementwise, so it only decides the shape of index targets.
        normalizer: ``reduction="mean"`` only: the denominator instead, e.g. the number of positive
            anchors; a float or a 0-dim tensor, read on the device (no host synchronisation); or one
            value per image (a 1-D tensor of length ``inputs.shape[0]`` on the inputs' device): the loss
            is then the sum over images of (the image's summed loss) / normalizer[image].

    The loss has the inputs' dtype, except float32 for float16 / bfloat16 logits under autocast.
    One fused kernel computes loss, reduction and (when ``inputs`` requires grad) the gradient.
    """
    gamma, thresholds, values = op_gamma_arguments(resolve_gamma(gamma))
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number (< 0 for no weighting), got alpha={alpha!r}")
    code = reduction_code(reduction)
    if isinstance(targets, torch.Tensor) and targets.requires_grad:
        raise ValueError("targets must not require grad: focal_cuda differentiates with respect to the logits only, "
                         "got targets.requires_grad=True")
    if normalizer is not None and not isinstance(normalizer, torch.Tensor):
        if isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
            raise TypeError(f"normalizer must be None, a number or a tensor (0-dim, or one value per image), "
                            f"got normalizer={normalizer!r}")
        normalizer = torch.tensor(float(normalizer), dtype=torch.float64)
    compute_grad = inputs.requires_grad and torch.is_grad_enabled()
    loss, _, _ = torch.ops.focal_cuda.sigmoid_focal_loss_forward(
        inputs, targets, float(alpha), gamma, int(ignore_index), code, normalizer, compute_grad, True,
        thresholds, values, autocast_loss_dtype(inputs), class_dim=int(class_dim),
    )
    return loss
