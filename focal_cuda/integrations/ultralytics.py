"""ultralytics' ``FocalLoss`` (``ultralytics.utils.loss``), backed by focal_cuda's fused sigmoid kernel.

Same constructor and result::

    # from ultralytics.utils.loss import FocalLoss
    from focal_cuda.integrations.ultralytics import FocalLoss

    criterion = FocalLoss(gamma=1.5, alpha=0.25)
    loss = criterion(pred, label)  # logits and float labels of one shape, at least 2-D

ultralytics reduces with ``loss.mean(1).sum()``: the sum divided by ``pred.shape[1]``, computed here as the
kernel's "mean" with that normalizer (one fused pass). Its ``alpha`` is applied only when it is positive
(``alpha <= 0``: no weighting; focal_cuda's own float alpha weights positives by 0 at ``alpha = 0``); a list of
per-class alphas (broadcast over the last dimension) is supported by weighting the unreduced loss.
ultralytics is not imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import torch
from torch import nn

from ..functional import _class_weight_tensor, sigmoid_focal_loss

__all__ = ["FocalLoss"]


class FocalLoss(nn.Module):
    """``ultralytics.utils.loss.FocalLoss(gamma=1.5, alpha=0.25)``: ``forward(pred, label)``."""

    def __init__(self, gamma: float = 1.5, alpha: Union[float, Sequence[float]] = 0.25) -> None:
        super().__init__()
        self.gamma = float(gamma)
        # ultralytics keeps torch.tensor(alpha): float32 values
        alpha = (alpha if isinstance(alpha, torch.Tensor) else torch.tensor(alpha)).float().tolist()
        if isinstance(alpha, Sequence):
            self.alpha = [float(a) for a in alpha]
            self.class_alpha = any(a > 0 for a in self.alpha)  # ultralytics: (alpha > 0).any()
        else:
            self.alpha = float(alpha)
            self.class_alpha = False

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if pred.dim() < 2:
            raise ValueError(f"pred must have at least 2 dimensions (ultralytics reduces with .mean(1)), "
                             f"got shape {tuple(pred.shape)}")
        if label.dtype != pred.dtype:
            label = label.to(pred.dtype)
        per_row = float(pred.shape[1])
        if not self.class_alpha:
            alpha = self.alpha if isinstance(self.alpha, float) and self.alpha > 0 else -1.0
            return sigmoid_focal_loss(pred, label, alpha, self.gamma, "mean", normalizer=per_row)
        # per-class alpha: the kernel weights by one scalar alpha, so weight its unweighted, unreduced loss
        alpha = _class_weight_tensor(self.alpha, pred.device, pred.dtype)  # cached: no copy per call
        loss = sigmoid_focal_loss(pred, label, -1.0, self.gamma, "none")
        return (loss * (label * alpha + (1 - label) * (1 - alpha))).sum() / per_row
