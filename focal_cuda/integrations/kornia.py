"""kornia's focal losses (``kornia.losses.focal_loss`` / ``FocalLoss``, softmax, and
``binary_focal_loss_with_logits`` / ``BinaryFocalLossWithLogits``), backed by focal_cuda's fused kernels.

Swap the import, nothing else::

    # from kornia.losses import FocalLoss, BinaryFocalLossWithLogits
    from focal_cuda.integrations.kornia import FocalLoss, BinaryFocalLossWithLogits

    criterion = FocalLoss(alpha=0.25, gamma=2.0, reduction="mean", ignore_index=255)
    loss = criterion(logits, masks)  # (N, C, H, W) logits, (N, H, W) class indices

kornia's semantics, which are not focal_cuda's own, are reproduced here (kornia is not imported):

- ``alpha`` (softmax): class 0 is weighted by ``1 - alpha`` and every other class by ``alpha`` (a background
  class 0); focal_cuda's float ``alpha`` weights every class alike. The adapter passes the per-class weights
  ``[1 - alpha, alpha, ..., alpha]`` (times ``weight``, when given).
- ``"mean"`` divides by every element of kornia's ``(N, C, *)`` loss map: C times the positions, ignored
  positions included (focal_cuda's softmax "mean" divides by the non-ignored positions). The adapter sums in
  the kernel and divides by ``pred.numel()``.
- ``reduction="none"`` (kornia's default) is a ``(N, C, *)`` map holding each position's loss in its target
  class's slice, 0 elsewhere: the adapter scatters focal_cuda's ``(N, *)`` loss into it.
- Binary: a fractional target ``t`` weights kornia's two terms by ``t`` and ``1 - t``; focal_cuda's dense
  form (like torchvision) takes ``p_t`` and ``alpha_t`` at the soft target. They agree for targets 0 and 1
  only. Integer or bool targets are hard: one fused pass. Floating targets may be soft: kornia's formula is
  then computed as ``t FL(x | 1) + (1 - t) FL(x | 0)`` (two fused passes, exact for any ``t``).
  ``hard_targets=None`` (the default) checks CPU targets for values other than 0 and 1 (a read of the
  targets, no synchronisation on a CPU) and assumes GPU ones may be soft; ``True`` promises 0 / 1 values
  (one pass), ``False`` always takes kornia's soft formula.
- Binary ``ignore_index`` (default -100) masks single elements, which the dense kernel cannot: the adapter
  masks the unreduced loss (exact, a few more passes). ``ignore_index=None`` with hard targets: one pass.

Not supported (a ``ValueError`` says so): ``pos_weight``, a ``weight`` that requires grad, ``gamma < 0``
(kornia does not check it; focal_cuda rejects it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..functional import _class_weight_tensor, sigmoid_focal_loss, softmax_focal_loss

__all__ = ["BinaryFocalLossWithLogits", "FocalLoss", "binary_focal_loss_with_logits", "focal_loss"]

_NO_IGNORE = -100  # focal_cuda's ignore_index when kornia's is None


def _check_weight(weight: Optional[torch.Tensor], pred: torch.Tensor, name: str) -> None:
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor) or weight.numel() != pred.shape[1]:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else weight
        raise ValueError(f"{name} must be a tensor with one value per class of pred ({pred.shape[1]}), got {shape}")
    if weight.requires_grad:
        raise ValueError(f"{name} must not require grad: focal_cuda differentiates with respect to the logits only")


def _class_alpha(alpha: Optional[float], weight: Optional[torch.Tensor], pred: torch.Tensor):
    """kornia's per-class factor: (1 - alpha for class 0, alpha for the others) x weight[c]."""
    if alpha is None:
        return None if weight is None else weight.reshape(-1)
    num_classes = pred.shape[1]
    dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
    factor = _class_weight_tensor([1.0 - alpha] + [float(alpha)] * (num_classes - 1), pred.device, dtype)
    return factor if weight is None else factor * weight.reshape(-1)


def _all_zero_or_one(target: torch.Tensor) -> bool:
    """True only when the targets are known to be hard without a device synchronisation: CPU tensors, eager."""
    if target.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return bool(((target == 0) | (target == 1)).all())


def focal_loss(pred: torch.Tensor, target: torch.Tensor, alpha: Optional[float], gamma: float = 2.0,
               reduction: str = "none", weight: Optional[torch.Tensor] = None,
               ignore_index: Optional[int] = -100) -> torch.Tensor:
    """``kornia.losses.focal_loss``: softmax focal loss over dim 1 of ``(N, C, *)`` logits, kornia's semantics
    (see the module's docstring)."""
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got reduction={reduction!r}")
    if pred.dim() < 2:
        raise ValueError(f"pred must be (N, C, *) logits, got shape {tuple(pred.shape)}")
    _check_weight(weight, pred, "weight")
    ignore = _NO_IGNORE if ignore_index is None else int(ignore_index)
    class_alpha = _class_alpha(alpha, weight, pred)
    if reduction != "none":
        loss = softmax_focal_loss(pred, target, gamma, class_alpha, ignore, "sum")
        return loss if reduction == "sum" else loss / pred.numel()
    loss = softmax_focal_loss(pred, target, gamma, class_alpha, ignore, "none")  # (N, *), 0 where ignored
    index = target.long() if ignore_index is None else torch.where(target == ignore_index, 0, target.long())
    return torch.zeros_like(pred, memory_format=torch.contiguous_format).scatter(1, index.unsqueeze(1),
                                                                                   loss.unsqueeze(1))


def binary_focal_loss_with_logits(pred: torch.Tensor, target: torch.Tensor, alpha: Optional[float] = 0.25,
                                  gamma: float = 2.0, reduction: str = "none",
                                  pos_weight: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                                  ignore_index: Optional[int] = -100, *, hard_targets: Optional[bool] = None) -> torch.Tensor:
    """``kornia.losses.binary_focal_loss_with_logits``: every element of ``(N, C, *)`` logits an independent
    binary logit, ``target`` of the same shape, kornia's semantics (see the module's docstring)."""
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got reduction={reduction!r}")
    if pos_weight is not None:
        raise ValueError("pos_weight is not supported by focal_cuda's kernel: use kornia's "
                         "binary_focal_loss_with_logits")
    if pred.dim() < 2 or target.shape != pred.shape:
        raise ValueError(f"pred must be (N, C, *) and target of its shape, got pred {tuple(pred.shape)} and "
                         f"target {tuple(target.shape)}")
    _check_weight(weight, pred, "weight")
    a = -1.0 if alpha is None else float(alpha)  # focal_cuda: alpha < 0 is no weighting
    valid = None if ignore_index is None else target != ignore_index
    if valid is not None:
        target = torch.where(valid, target, 0)
    soft = target.is_floating_point() and not hard_targets
    if soft and hard_targets is None:
        soft = not _all_zero_or_one(target)
    if target.dtype != pred.dtype:
        target = target.to(pred.dtype)
    fused_reduction = reduction if valid is None and weight is None and not soft else "none"
    if soft:
        # kornia: t * FL(x | positive) + (1 - t) * FL(x | negative); each term is focal_cuda's with a constant target
        # (stride-0 constant targets: nothing is allocated for them)
        ones = pred.new_ones(()).expand_as(pred)
        zeros = pred.new_zeros(()).expand_as(pred)
        loss = (target * sigmoid_focal_loss(pred, ones, a, gamma, "none")
                + (1 - target) * sigmoid_focal_loss(pred, zeros, a, gamma, "none"))
    else:
        loss = sigmoid_focal_loss(pred, target, a, gamma, fused_reduction)
    if fused_reduction != "none":
        return loss
    if valid is not None:
        loss = torch.where(valid, loss, 0)
    if weight is not None:
        loss = loss * weight.to(loss.dtype).view(-1, *([1] * (pred.dim() - 2)))
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


class FocalLoss(nn.Module):
    """``kornia.losses.FocalLoss``: the module form of :func:`focal_loss`."""

    def __init__(self, alpha: Optional[float], gamma: float = 2.0, reduction: str = "none",
                 weight: Optional[torch.Tensor] = None, ignore_index: Optional[int] = -100) -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction
        self.register_buffer("weight", weight, persistent=False)
        self.ignore_index = ignore_index

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return focal_loss(pred, target, self.alpha, self.gamma, self.reduction, self.weight, self.ignore_index)


class BinaryFocalLossWithLogits(nn.Module):
    """``kornia.losses.BinaryFocalLossWithLogits``: the module form of :func:`binary_focal_loss_with_logits`."""

    def __init__(self, alpha: Optional[float], gamma: float = 2.0, reduction: str = "none",
                 pos_weight: Optional[torch.Tensor] = None, weight: Optional[torch.Tensor] = None,
                 ignore_index: Optional[int] = -100, *, hard_targets: Optional[bool] = None) -> None:
        super().__init__()
        if pos_weight is not None:
            raise ValueError("pos_weight is not supported by focal_cuda's kernel: use kornia's "
                             "BinaryFocalLossWithLogits")
        self.alpha = alpha
        self.gamma = gamma
        self.reduction = reduction
        self.register_buffer("weight", weight, persistent=False)
        self.ignore_index = ignore_index
        self.hard_targets = hard_targets

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return binary_focal_loss_with_logits(pred, target, self.alpha, self.gamma, self.reduction, None, self.weight,
                                             self.ignore_index, hard_targets=self.hard_targets)
