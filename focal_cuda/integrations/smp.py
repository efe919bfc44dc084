"""segmentation_models_pytorch's ``losses.FocalLoss``, backed by focal_cuda's fused sigmoid kernel.

Swap the import, nothing else::

    # from segmentation_models_pytorch.losses import FocalLoss
    from focal_cuda.integrations.smp import FocalLoss

    criterion = FocalLoss("multiclass", ignore_index=255)
    loss = criterion(logits, masks)  # (N, C, H, W) logits, (N, H, W) masks

smp's focal loss is sigmoid-based in every mode. In "multiclass" mode it loops over the classes, building
``(y_true == c)`` and (with ``ignore_index``) a masked copy of each class's logits; here the ``(N, C, H, W)``
logits are read in place (``class_dim=1``) with the masks as index targets: one fused pass. smp is not
imported: the class has smp's constructor and semantics (checked against smp itself in the tests).

Targets are 0 / 1 labels, as smp documents them. For soft labels smp's ``p_t`` is ``exp(-BCE)`` =
``p**t (1 - p)**(1 - t)``, focal_cuda's (torchvision's) ``p t + (1 - p)(1 - t)``: equal at t = 0 and 1 only.

Not supported (a ``ValueError`` says so): ``normalized=True`` and ``reduced_threshold`` (their focal term is
not the kernel's), ``ignore_index`` in "multilabel" mode (smp's own loss raises an ``IndexError`` there), and
``class_weights`` with a reduction other than "mean" / "sum".
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..functional import _class_weight_tensor, sigmoid_focal_loss

__all__ = ["FocalLoss"]

BINARY_MODE = "binary"
MULTICLASS_MODE = "multiclass"
MULTILABEL_MODE = "multilabel"
_REDUCTIONS = ("mean", "sum", "none", "batchwise_mean")
_NO_IGNORE = -100  # focal_cuda's ignore_index when smp's is None: no smp target holds it


class FocalLoss(nn.Module):
    """``segmentation_models_pytorch.losses.FocalLoss`` with the same arguments and results.

    Reductions as smp computes them. "binary" mode: "mean" over the non-ignored elements, "sum" (and
    "batchwise_mean", smp's sum over dim 0 of the flattened loss), "none" the flattened per-element loss with
    the ignored elements left out. "multiclass" / "multilabel": smp reduces each class's loss, then averages
    the C results whatever the reduction: "mean" is the mean over the non-ignored elements, "sum" the sum / C,
    "batchwise_mean" the sum / (C x d1 x ... x dk) (sum / C with ignore_index), and "none" equals "mean".
    With ``class_weights``: sum_c w_c L_c / sum_c w_c over the per-class results L_c ("mean" or "sum").
    """

    def __init__(self, mode: str, alpha: Optional[float] = None, gamma: Optional[float] = 2.0,
                 ignore_index: Optional[int] = None, from_logits: bool = True, eps: float = 1e-7,
                 reduction: Optional[str] = "mean", normalized: bool = False,
                 reduced_threshold: Optional[float] = None, class_weights: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        if mode not in (BINARY_MODE, MULTICLASS_MODE, MULTILABEL_MODE):
            raise ValueError(f"mode must be 'binary', 'multiclass' or 'multilabel', got mode={mode!r}")
        if alpha is not None and not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"alpha must be None or a number in [0, 1], got alpha={alpha!r}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be one of {_REDUCTIONS}, got reduction={reduction!r}")
        if normalized:
            raise ValueError("normalized=True is not supported by focal_cuda's kernel (each class's loss divided by "
                             "its own sum of focal terms): use segmentation_models_pytorch's FocalLoss")
        if reduced_threshold is not None:
            raise ValueError(f"reduced_threshold is not supported by focal_cuda's kernel (the reduced focal term is "
                             f"not (1 - p_t)**gamma), got reduced_threshold={reduced_threshold!r}")
        if class_weights is not None and mode == BINARY_MODE:
            raise ValueError("class_weights are not supported with mode=binary")
        if class_weights is not None and reduction not in ("mean", "sum"):
            raise ValueError(f"class_weights need reduction 'mean' or 'sum', got reduction={reduction!r}")
        if ignore_index is not None and mode == MULTILABEL_MODE:
            raise ValueError("ignore_index is not supported with mode=multilabel (smp's FocalLoss indexes each class "
                             f"slice with the full (N, C, ...) mask and raises), got ignore_index={ignore_index!r}")
        self.mode = mode
        self.alpha = -1.0 if alpha is None else float(alpha)  # focal_cuda: alpha < 0 is no weighting
        self.gamma = float(gamma)
        self.ignore_index = ignore_index
        self.from_logits = from_logits
        self.eps = eps
        self.reduction = reduction
        self.class_weights = None if class_weights is None else [float(w) for w in class_weights]

    def forward(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        if not self.from_logits:  # smp's conversion back to logits
            y_pred = torch.clamp(y_pred, self.eps, 1 - self.eps)
            y_pred = torch.log(y_pred) if self.mode == MULTICLASS_MODE else torch.log(y_pred / (1 - y_pred))
        if self.mode == BINARY_MODE:
            return self._binary(y_pred, y_true)
        if y_pred.dim() < 2:
            raise ValueError(f"y_pred must be (N, C, ...) in mode={self.mode!r}, got shape {tuple(y_pred.shape)}")
        ignore = self.ignore_index if self.ignore_index is not None else _NO_IGNORE
        if self.mode == MULTICLASS_MODE:  # class indices, as they are (uint8 masks too)
            target = y_true.long() if y_true.is_floating_point() or y_true.dtype == torch.bool else y_true
        else:
            target = y_true if y_true.dtype == y_pred.dtype else y_true.to(y_pred.dtype)
        num_classes = y_pred.shape[1]
        if self.class_weights is not None:
            return self._class_weighted(y_pred, target, ignore)
        if self.reduction in ("sum", "batchwise_mean"):
            # smp averages its stacked per-class losses: "sum" is the mean over the classes of each class's sum;
            # "batchwise_mean" sums each class over dim 0 (a scalar once ignored positions are filtered out,
            # else a (d1, ..., dk) map) before that mean.
            spatial = 1
            if self.reduction == "batchwise_mean" and self.ignore_index is None:
                spatial = math.prod(y_pred.shape[2:])
            return sigmoid_focal_loss(y_pred, target, self.alpha, self.gamma, "mean", ignore_index=ignore,
                                      class_dim=1, normalizer=float(num_classes * spatial))
        # "mean" and "none": the mean over the classes of each class's mean over the non-ignored positions
        return sigmoid_focal_loss(y_pred, target, self.alpha, self.gamma, "mean", ignore_index=ignore, class_dim=1)

    def _binary(self, y_pred: torch.Tensor, y_true: torch.Tensor) -> torch.Tensor:
        # smp flattens both; logits (N, 1, ...) as (M, 1) rows of one class
        logits = y_pred.reshape(-1, 1)
        target = y_true.reshape(-1)
        if target.dtype == torch.bool:
            target = target.view(torch.uint8)
        reduction = "sum" if self.reduction == "batchwise_mean" else self.reduction  # smp: sum over dim 0 of 1-D
        if self.ignore_index is None:
            if target.is_floating_point():
                dense = target if target.dtype == y_pred.dtype else target.to(y_pred.dtype)
                loss = sigmoid_focal_loss(logits, dense.view(-1, 1), self.alpha, self.gamma, reduction)
            else:  # 0 / 1 labels as index targets: class 0 positive, 1 (= C) background, no float copy
                loss = sigmoid_focal_loss(logits, 1 - target, self.alpha, self.gamma, reduction)
            return loss.view(-1) if reduction == "none" else loss
        valid = target != self.ignore_index
        if target.is_floating_point():
            # floating labels stay dense: ignored elements get loss 0 and gradient 0 after the kernel
            dense = torch.where(valid, target, 0).to(y_pred.dtype).view(-1, 1)
            loss = sigmoid_focal_loss(logits, dense, self.alpha, self.gamma, "none").view(-1)
            loss = torch.where(valid, loss, 0)
            if reduction == "none":
                return loss[valid]
            return loss.sum() if reduction == "sum" else loss.sum() / valid.sum()
        index = torch.where(valid, 1 - target, target)  # ignored stay ignore_index, in the targets' dtype
        loss = sigmoid_focal_loss(logits, index, self.alpha, self.gamma, reduction, ignore_index=self.ignore_index)
        return loss.view(-1)[valid] if reduction == "none" else loss

    def _class_weighted(self, y_pred: torch.Tensor, target: torch.Tensor, ignore: int) -> torch.Tensor:
        """smp: sum_c w_c L_c / sum_c w_c over the per-class reduced losses L_c. The kernel has no per-class
        weights: its unreduced loss is weighted, then summed."""
        num_classes = y_pred.shape[1]
        if len(self.class_weights) != num_classes:
            raise ValueError(f"class_weights has {len(self.class_weights)} entries for {num_classes} classes "
                             f"(y_pred.shape[1])")
        total_weight = math.fsum(self.class_weights)
        dtype = torch.float64 if y_pred.dtype == torch.float64 else torch.float32
        # cached per device: no host-to-device copy per call
        weights = _class_weight_tensor([w / total_weight for w in self.class_weights], y_pred.device, dtype)
        loss = sigmoid_focal_loss(y_pred, target, self.alpha, self.gamma, "none", ignore_index=ignore, class_dim=1)
        total = (loss * weights.to(loss.dtype).view(num_classes, *([1] * (y_pred.dim() - 2)))).sum()
        if self.reduction == "sum":
            return total
        if self.mode == MULTICLASS_MODE and self.ignore_index is not None:
            return total / (target != self.ignore_index).sum()
        return total / (y_pred.numel() // num_classes)
