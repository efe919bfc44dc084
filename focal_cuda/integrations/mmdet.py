"""A loss module with mmdetection's ``FocalLoss`` interface, backed by focal_cuda's fused kernel.

Importing this module registers ``FusedFocalLoss`` in mmdetection's ``MODELS`` registry when mmdet
is installed, so a config can say::

    custom_imports = dict(imports=["focal_cuda.integrations.mmdet"], allow_failed_imports=False)
    model = dict(bbox_head=dict(loss_cls=dict(type="FusedFocalLoss", use_sigmoid=True, gamma=2.0, alpha=0.25,
                                              loss_weight=1.0, weight_is_mask=True)))

mmdetection's labels are already index targets (``num_classes`` = background), so no one-hot tensor is
built. Its heads pass per-anchor ``label_weights``: with ``weight_is_mask=True`` (weights that are 0 or 1,
as RetinaNet / FCOS / ATSS heads produce with the default ``pos_weight``) zero-weight anchors become
ignored rows and the loss stays one fused pass; otherwise the weights are applied to an unreduced loss,
exactly as mmdetection's ``weight_reduce_loss`` does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..functional import sigmoid_focal_loss

__all__ = ["FusedFocalLoss"]

_IGNORE = -100
_EPS = torch.finfo(torch.float32).eps  # mmdetection divides by avg_factor + eps


class FusedFocalLoss(nn.Module):
    def __init__(self, use_sigmoid: bool = True, gamma: float = 2.0, alpha: float = 0.25, reduction: str = "mean",
                 loss_weight: float = 1.0, activated: bool = False, weight_is_mask: bool = False) -> None:
        super().__init__()
        if not use_sigmoid or activated:
            raise ValueError(f"FusedFocalLoss supports use_sigmoid=True on logits (activated=False), got "
                             f"use_sigmoid={use_sigmoid!r}, activated={activated!r}")
        self.gamma = float(gamma)
        self.alpha = float(alpha)
        self.reduction = reduction
        self.loss_weight = float(loss_weight)
        self.weight_is_mask = weight_is_mask

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                avg_factor: Optional[float] = None, reduction_override: Optional[str] = None) -> torch.Tensor:
        reduction = reduction_override or self.reduction
        if avg_factor is not None and reduction == "sum":
            raise ValueError('avg_factor can not be used with reduction="sum"')
        if weight is not None and self.weight_is_mask and target.dim() == pred.dim() - 1 and weight.dim() == 1:
            target = torch.where(weight > 0, target, torch.full_like(target, _IGNORE))
            weight = None
        if weight is None:
            normalizer = None if avg_factor is None or reduction != "mean" else avg_factor + _EPS
            if reduction == "mean" and avg_factor is None and target.dim() == pred.dim() - 1:
                # mmdetection's mean is over every element, ignored rows included.
                loss = sigmoid_focal_loss(pred, target, self.alpha, self.gamma, "mean",
                                          ignore_index=_IGNORE, normalizer=float(pred.numel()))
            else:
                loss = sigmoid_focal_loss(pred, target, self.alpha, self.gamma, reduction, ignore_index=_IGNORE,
                                          normalizer=normalizer)
            return self.loss_weight * loss
        loss = sigmoid_focal_loss(pred, target, self.alpha, self.gamma, "none", ignore_index=_IGNORE)
        loss = loss * (weight.view(-1, 1) if weight.dim() == 1 and loss.dim() == 2 else weight)
        if avg_factor is None:
            loss = loss.sum() if reduction == "sum" else loss.mean() if reduction == "mean" else loss
        elif reduction == "mean":
            loss = loss.sum() / (avg_factor + _EPS)
        return self.loss_weight * loss


try:  # registered only when mmdetection is installed
    from mmdet.registry import MODELS
except ImportError:  # pragma: no cover - mmdet is optional
    MODELS = None
if MODELS is not None:  # pragma: no cover
    MODELS.register_module(name="FusedFocalLoss", module=FusedFocalLoss, force=True)
