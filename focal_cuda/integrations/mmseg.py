"""A loss module with mmsegmentation's ``FocalLoss`` interface, backed by focal_cuda's fused sigmoid kernel.

Importing this module registers ``FusedFocalLoss`` in mmsegmentation's ``MODELS`` registry when mmseg is
installed, so a config can say::

    custom_imports = dict(imports=["focal_cuda.integrations.mmseg"], allow_failed_imports=False)
    model = dict(decode_head=dict(loss_decode=dict(type="FusedFocalLoss", use_sigmoid=True, gamma=2.0,
                                                   alpha=0.5, loss_weight=1.0)))

mmseg's ``FocalLoss`` transposes the ``(N, C, H, W)`` logits into an ``(N*H*W, C)`` copy and, on the CPU,
builds one-hot targets; here the logits are read in place (``class_dim=1``) with the label map as index
targets (``ignore_index`` dropped, uint8 maps with 255 as they are): one fused pass when ``alpha`` is a float
and there is no ``class_weight`` or ``weight`` (those weight the unreduced loss, as mmseg does).

Semantics are mmseg's (restated from its source in the tests; mmseg needs mmcv's compiled ops): "mean"
divides by every element, ignored pixels included (N*H*W*C). ``avg_non_ignore=True`` (not an argument of
mmseg's ``FocalLoss``; its ``CrossEntropyLoss`` has it) divides by the non-ignored elements instead.
Dense targets of the logits' shape are used as they are (mmseg's CPU path; its CUDA path takes their
argmax).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import nn

from ..functional import _class_weight_tensor, sigmoid_focal_loss

__all__ = ["FusedFocalLoss"]

_EPS = torch.finfo(torch.float32).eps  # mmseg divides by avg_factor + eps


class FusedFocalLoss(nn.Module):
    def __init__(self, use_sigmoid: bool = True, gamma: float = 2.0, alpha: Union[float, Sequence[float]] = 0.5,
                 reduction: str = "mean", class_weight: Optional[Sequence[float]] = None, loss_weight: float = 1.0,
                 loss_name: str = "loss_focal", avg_non_ignore: bool = False) -> None:
        super().__init__()
        if use_sigmoid is not True:
            raise ValueError(f"FusedFocalLoss supports use_sigmoid=True only (as mmseg's FocalLoss), "
                             f"got use_sigmoid={use_sigmoid!r}")
        if reduction not in ("none", "mean", "sum"):
            raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got reduction={reduction!r}")
        self.use_sigmoid = use_sigmoid
        self.gamma = float(gamma)
        self.alpha = [float(a) for a in alpha] if isinstance(alpha, Sequence) else float(alpha)
        self.reduction = reduction
        self.class_weight = None if class_weight is None else [float(w) for w in class_weight]
        self.loss_weight = float(loss_weight)
        self._loss_name = loss_name
        self.avg_non_ignore = avg_non_ignore

    @property
    def loss_name(self) -> str:
        return self._loss_name

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None,
                avg_factor: Optional[float] = None, reduction_override: Optional[str] = None,
                ignore_index: int = 255, **kwargs) -> torch.Tensor:
        if reduction_override not in (None, "none", "mean", "sum"):
            raise ValueError(f"reduction_override must be None, 'none', 'mean' or 'sum', "
                             f"got reduction_override={reduction_override!r}")
        reduction = reduction_override or self.reduction
        if avg_factor is not None and reduction == "sum":
            raise ValueError('avg_factor can not be used with reduction="sum"')
        dense = target.shape == pred.shape
        if not dense and (target.shape[:1] != pred.shape[:1] or target.shape[1:] != pred.shape[2:]):
            raise ValueError(f"target must be (N, d1, ..., dk) labels or dense of pred's shape {tuple(pred.shape)}, "
                             f"got {tuple(target.shape)}")
        if dense and target.dtype != pred.dtype:
            target = target.to(pred.dtype)
        ignore = int(ignore_index)
        # "mean": mmseg divides by every element; avg_non_ignore: by the non-ignored ones (focal_cuda's own mean)
        normalizer = None if self.avg_non_ignore and not dense else float(pred.numel())
        if avg_factor is not None:
            normalizer = avg_factor + _EPS
        if isinstance(normalizer, torch.Tensor) and normalizer.dim() != 0:
            raise ValueError(f"avg_factor must be a number or a 0-dim tensor, got shape {tuple(normalizer.shape)}")
        if isinstance(self.alpha, float) and self.class_weight is None and weight is None:  # one fused pass
            loss = sigmoid_focal_loss(pred, target, self.alpha, self.gamma, reduction, ignore_index=ignore,
                                      class_dim=1, normalizer=normalizer if reduction == "mean" else None)
            return self.loss_weight * loss
        loss = self._weighted_loss(pred, target, weight, ignore, dense)
        if reduction == "none":
            return self.loss_weight * loss
        if reduction == "sum":
            return self.loss_weight * loss.sum()
        if normalizer is None:
            normalizer = ((target != ignore).sum() * pred.shape[1]).clamp(min=1)
        return self.loss_weight * (loss.sum() / normalizer)

    def _weighted_loss(self, pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor],
                       ignore: int, dense: bool) -> torch.Tensor:
        """The unreduced ``(N, C, d1, ..., dk)`` loss times mmseg's per-element weight: a per-class alpha
        (as mmseg's CUDA path: alpha 0.5 doubled, then alpha_c or 1 - alpha_c), class_weight, weight."""
        num_classes = pred.shape[1]
        class_shape = (num_classes, *([1] * (pred.dim() - 2)))
        dtype = torch.float64 if pred.dtype == torch.float64 else torch.float32
        if isinstance(self.alpha, float):
            loss = sigmoid_focal_loss(pred, target, self.alpha, self.gamma, "none", ignore_index=ignore, class_dim=1)
        else:
            if len(self.alpha) != num_classes:
                raise ValueError(f"alpha has {len(self.alpha)} entries for {num_classes} classes (pred.shape[1])")
            loss = 2 * sigmoid_focal_loss(pred, target, 0.5, self.gamma, "none", ignore_index=ignore, class_dim=1)
            alpha = _class_weight_tensor(self.alpha, pred.device, dtype).view(class_shape)
            if dense:
                positive = target
            else:
                classes = torch.arange(num_classes, device=pred.device).view(class_shape)
                positive = (target.unsqueeze(1) == classes).to(dtype)
            loss = loss * (alpha * positive + (1 - alpha) * (1 - positive))
        if self.class_weight is not None:
            if len(self.class_weight) != num_classes:
                raise ValueError(f"class_weight has {len(self.class_weight)} entries for {num_classes} classes "
                                 f"(pred.shape[1])")
            loss = loss * _class_weight_tensor(self.class_weight, pred.device, dtype).view(class_shape)
        if weight is not None:
            loss = loss * _weight_like(weight, pred)
        return loss.to(pred.dtype) if loss.dtype != pred.dtype else loss


def _weight_like(weight: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """mmseg's ``weight``, given for its flattened ``(N*d1*...*dk, C)`` rows: one per pixel (``(P,)`` or the
    label map's shape) or one per element (``(P, C)``), as a tensor broadcasting against ``pred``'s layout."""
    n, c, spatial = pred.shape[0], pred.shape[1], pred.shape[2:]
    pixels = n * math.prod(spatial)
    if weight.numel() == pixels:
        return weight.reshape(n, 1, *spatial)
    if weight.shape == (pixels, c):
        return weight.reshape(n, -1, c).transpose(1, 2).reshape(n, c, *spatial)
    raise ValueError(f"weight must have one value per pixel ({pixels}) or be ({pixels}, {c}) as mmseg's flattened "
                     f"rows, got shape {tuple(weight.shape)}")


try:  # registered only when mmsegmentation is installed
    from mmseg.registry import MODELS
except ImportError:  # pragma: no cover - mmseg is optional
    MODELS = None
if MODELS is not None:  # pragma: no cover
    MODELS.register_module(name="FusedFocalLoss", module=FusedFocalLoss, force=True)
