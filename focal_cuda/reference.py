"""Pure-PyTorch focal loss: the oracle the fused kernels are tested against.

Plain autograd-differentiable code (log_softmax + gather; sigmoid + one-hot targets),
written for clarity, not speed. Same signatures and semantics as
:func:`focal_cuda.softmax_focal_loss` and :func:`focal_cuda.sigmoid_focal_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .schedule import Gamma, GammaSchedule, resolve_gamma

__all__ = ["loss_dtype", "scheduled_gamma", "sigmoid_focal_loss", "softmax_focal_loss", "softmax_focal_loss_lean"]

Alpha = Union[None, float, Sequence[float], torch.Tensor]

_TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def loss_dtype(input: torch.Tensor) -> torch.dtype:
    """The loss's dtype: the input's, but float32 for float16 / bfloat16 logits under autocast on their device
    (as F.cross_entropy returns there)."""
    if input.dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(input.device.type):
        return torch.float32
    return input.dtype


def scheduled_gamma(p_t: torch.Tensor, gamma: Gamma) -> torch.Tensor:
    """Each element's gamma (float64): the first ``gammas[k]`` with ``p_t < thresholds[k]``, compared in float64
    against the thresholds as given; ``gammas[-1]`` at or above every threshold. A number: that gamma everywhere."""
    gamma = resolve_gamma(gamma)
    if isinstance(gamma, GammaSchedule):
        return gamma.gamma_of(p_t)
    return torch.full(p_t.shape, gamma, dtype=torch.float64, device=p_t.device)


def _modulated(loss: torch.Tensor, one_minus_p_t: torch.Tensor, p_t: torch.Tensor, gamma) -> torch.Tensor:
    """loss * (1 - p_t)**gamma, gamma a number or a schedule evaluated on p_t (a constant of each element)."""
    if isinstance(gamma, GammaSchedule):
        return loss * one_minus_p_t ** gamma.gamma_of(p_t).to(loss.dtype)
    return loss * one_minus_p_t**gamma if gamma != 0 else loss


def softmax_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    gamma: Gamma = 2.0,
    alpha: Alpha = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Softmax focal loss ``-alpha_y (1 - p_y)**gamma log p_y`` with ``p = softmax(input, dim=1)``.

    Args:
        input: logits ``(N, C)`` or ``(N, C, d1, ..., dk)``; float16, bfloat16, float32 or float64.
        target: class indices ``(N)`` or ``(N, d1, ..., dk)``; int64, int32, int16 or uint8.
        gamma: focusing parameter, a finite number ``>= 0``; or a GammaSchedule (or preset name): each
            position's gamma from its own ``p_y = exp(log_softmax(input)[y])`` by :func:`scheduled_gamma`.
        alpha: ``None``, a float weighting every class, or ``C`` per-class weights (``alpha[y]``).
        ignore_index: targets equal to it contribute 0 and are not counted by ``"mean"``.
        reduction: ``"none"`` (target-shaped, 0 where ignored), ``"sum"``, or ``"mean"``
            (sum / number of non-ignored elements; 0 when every element is ignored).

    Math runs in float32 (float64 for float64 input); the result has the input's dtype (float32 for 16-bit
    input under autocast: :func:`loss_dtype`).
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
    gamma = resolve_gamma(gamma)
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
    loss = _modulated(-logp_t, -torch.expm1(logp_t), logp_t.exp(), gamma)

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
    return loss.to(loss_dtype(input))


Normalizer = Union[None, float, torch.Tensor]


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
    """Sigmoid focal loss ``alpha_t (1 - p_t)**gamma BCE(x, y)`` per element, ``p = sigmoid(inputs)``.

    Args:
        inputs: logits of any shape, classes on the last dim; float16, bfloat16, float32 or float64.
        targets: either dense: floating, the inputs' shape, values in [0, 1] (soft labels allowed);
            or class indices: int64, int32, int16 or uint8 of shape ``inputs.shape[:-1]``, where
            ``c`` in ``[0, C)`` is the row's positive class, ``C`` is background (every class
            negative) and ``ignore_index`` drops the whole row.
        alpha: weight of the positives (``1 - alpha`` for the negatives); ``alpha < 0``: no weighting.
        gamma: focusing parameter, a finite number ``>= 0``; or a GammaSchedule (or preset name): each
            element's gamma from its own ``p_t = p y + (1 - p)(1 - y)`` by :func:`scheduled_gamma`.
        reduction: ``"none"`` (the inputs' shape, 0 on ignored rows), ``"sum"``, or ``"mean"``:
            sum / number of elements (index targets: non-ignored rows x C; 0 when that is 0).
        ignore_index: index targets only.
        class_dim: ``-1`` (classes last) or ``1`` (channel-first ``(N, C, d1, ..., dk)``; index targets then
            have the inputs' shape without dim 1).
        normalizer: ``reduction="mean"`` only: the denominator, a number or a 0-dim tensor, used as given; or
            one value per image (1-D, ``inputs.shape[0]``): each image's summed loss divided by its own.

    Dense targets: equals ``torchvision.ops.sigmoid_focal_loss(inputs, targets, alpha, gamma, reduction)``.
    Index targets: equals the dense form on the one-hot targets, ignored rows contributing 0.
    Math runs in float32 (float64 for float64 inputs); the result has the inputs' dtype (float32 for 16-bit
    inputs under autocast: :func:`loss_dtype`).
    """
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a tensor, got inputs={type(inputs).__name__}")
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a tensor, got targets={type(targets).__name__}")
    if isinstance(class_dim, bool) or class_dim not in (-1, 1) and class_dim != inputs.dim() - 1:
        raise ValueError(f"class_dim must be -1 (classes last) or 1 (channel-first), got class_dim={class_dim!r}")
    if class_dim == 1 and inputs.dim() > 2:
        # Channel-first: the same loss with the classes moved last (dense targets with them).
        dense = targets.dtype.is_floating_point and targets.shape == inputs.shape
        loss = sigmoid_focal_loss(inputs.movedim(1, -1), targets.movedim(1, -1) if dense else targets, alpha, gamma,
                                  reduction, ignore_index=ignore_index, normalizer=normalizer)
        return loss.movedim(-1, 1) if reduction == "none" else loss
    if inputs.dtype not in _INPUT_DTYPES:
        raise TypeError(f"inputs must be float16, bfloat16, float32 or float64, got inputs.dtype={inputs.dtype}")
    if targets.requires_grad:
        raise ValueError("targets must not require grad: the gradient is taken with respect to the logits only, "
                         "got targets.requires_grad=True")
    index_targets = not targets.dtype.is_floating_point
    if index_targets:
        if targets.dtype not in _TARGET_DTYPES:
            raise TypeError("targets must be floating (dense) or int64, int32, int16 or uint8 class indices, "
                            f"got targets.dtype={targets.dtype}")
        if inputs.dim() < 1:
            raise ValueError(f"inputs must have a class dimension (last) for index targets, "
                             f"got inputs.shape={tuple(inputs.shape)}")
        expected = inputs.shape[:-1]
        if targets.shape != expected:
            raise ValueError(f"integer targets are class indices of shape inputs.shape[:-1]={tuple(expected)}, "
                             f"got targets.shape={tuple(targets.shape)}")
    elif targets.shape != inputs.shape:
        raise ValueError(f"floating targets are dense and must have the inputs' shape {tuple(inputs.shape)}, "
                         f"got targets.shape={tuple(targets.shape)}")
    if isinstance(alpha, torch.Tensor):
        if alpha.requires_grad:
            raise ValueError("alpha must not require grad, got alpha.requires_grad=True")
        if alpha.dim() != 0:
            raise ValueError(f"alpha must be a number, got alpha.shape={tuple(alpha.shape)}")
        alpha = float(alpha)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number (< 0: no weighting), got alpha={alpha!r}")
    gamma = resolve_gamma(gamma)
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got reduction={reduction!r}")
    if normalizer is not None:
        if reduction != "mean":
            raise ValueError(f"normalizer is only allowed with reduction='mean', got reduction={reduction!r}")
        if isinstance(normalizer, torch.Tensor):
            per_image = normalizer.dim() == 1 and inputs.dim() >= 2 and normalizer.shape[0] == inputs.shape[0]
            if normalizer.dim() != 0 and not per_image:
                raise ValueError(f"normalizer must be a number, a 0-dim tensor or one value per image "
                                 f"(inputs.shape[0]), got normalizer.shape={tuple(normalizer.shape)}")
            if normalizer.dtype == torch.bool or normalizer.is_complex():
                raise TypeError(f"normalizer must be a real number, got normalizer.dtype={normalizer.dtype}")
            if normalizer.requires_grad:
                raise ValueError("normalizer must not require grad, got normalizer.requires_grad=True")
        elif isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)):
            raise TypeError(f"normalizer must be None, a number or a 0-dim tensor, got normalizer={normalizer!r}")

    acc = torch.float64 if inputs.dtype == torch.float64 else torch.float32
    x = inputs.to(acc)
    num_classes = inputs.shape[-1] if inputs.dim() > 0 else 1
    valid: Optional[torch.Tensor] = None  # per row, index targets only
    if index_targets:
        t = targets.long()
        valid = t != ignore_index
        bad = valid & ((t < 0) | (t > num_classes))
        if bad.any():
            value = int(t[bad][0])
            raise IndexError(f"targets values must be in [0, {num_classes}] ({num_classes} = background) or "
                             f"ignore_index={ignore_index}, got targets value {value}")
        positive = torch.where(valid, t, torch.full_like(t, num_classes))  # ignored rows: all negative, masked below
        y = F.one_hot(positive, num_classes + 1)[..., :num_classes].to(acc)
    else:
        y = targets.to(acc)

    p = torch.sigmoid(x)
    # = F.binary_cross_entropy_with_logits(x, y), whose formula (1 - y) x - log_sigmoid(x) cancels for
    # y = 0 and x << 0 (ce = log1p(e^x) is then lost below eps |x|): as a sum of two softplus terms,
    # each computed as max(z, 0) + log1p(exp(-|z|)) by logaddexp, the loss keeps its relative digits
    # in both tails (and autograd's derivative is sigmoid, 1/2 at 0).
    zero = torch.zeros_like(x)
    ce = (1 - y) * torch.logaddexp(x, zero) + y * torch.logaddexp(-x, zero)
    q = torch.sigmoid(-x)
    # 1 - p_t and p_t, each without cancellation in either tail
    loss = _modulated(ce, p * (1 - y) + q * y, p * y + q * (1 - y), gamma)
    if alpha >= 0:
        loss = loss * (alpha * y + (1 - alpha) * (1 - y))
    if valid is not None:
        loss = torch.where(valid.unsqueeze(-1), loss, torch.zeros_like(loss))

    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        if normalizer is not None:
            as_float64 = None if isinstance(normalizer, torch.Tensor) else torch.float64  # a Python float exactly
            denominator = torch.as_tensor(normalizer, dtype=as_float64).to(dtype=acc, device=x.device)
        elif valid is not None:
            denominator = (valid.sum() * num_classes).to(acc)
        else:
            denominator = torch.tensor(float(loss.numel()), dtype=acc, device=x.device)
        if normalizer is None:
            denominator = denominator.clamp(min=1)  # nothing counted: the sum is 0, and so is the mean
        if denominator.dim() == 1:  # one per image: each image's sum divided by its own, then added
            loss = (loss.reshape(loss.shape[0], -1).sum(dim=1) / denominator).sum()
        else:
            loss = loss.sum() / denominator
    return loss.to(loss_dtype(inputs))


def softmax_focal_loss_lean(
    input: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: Alpha = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """The same loss as :func:`softmax_focal_loss`, composed the way a careful user writes it by hand: one
    ``F.cross_entropy`` gives ``-log p_t`` (0 at ignored places), then a few per-position ops.

    A baseline for the bench suite, not an oracle: no argument checks beyond what the ops do, and the
    gradient of ``(1 - p_t)**gamma`` is autograd's (NaN for ``gamma < 1`` at ``p_t = 1``).
    """
    nll = F.cross_entropy(input, target.long(), ignore_index=ignore_index, reduction="none")
    loss = nll * (-torch.expm1(-nll)) ** gamma if gamma != 0 else nll
    if alpha is not None:
        if isinstance(alpha, (int, float)):
            loss = loss * float(alpha)
        else:
            weight = torch.as_tensor(alpha, dtype=loss.dtype, device=input.device)
            loss = loss * weight[target.long().clamp(0, input.shape[1] - 1)]
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / (target != ignore_index).sum().clamp(min=1)
