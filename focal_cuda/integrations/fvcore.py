"""fvcore's ``sigmoid_focal_loss`` / ``sigmoid_focal_loss_jit`` (what detectron2's RetinaNet and FCOS call),
backed by focal_cuda's fused sigmoid kernel.

Same signature and defaults as fvcore's (``alpha=-1``: no weighting, unlike torchvision's 0.25)::

    # from fvcore.nn import sigmoid_focal_loss_jit
    from focal_cuda.integrations.fvcore import sigmoid_focal_loss_jit

detectron2 imports the name into its modules, so there it is swapped where it is looked up::

    import detectron2.modeling.meta_arch.retinanet as retinanet
    from focal_cuda.integrations import fvcore as fused
    retinanet.sigmoid_focal_loss_jit = fused.sigmoid_focal_loss_jit

or, without the one-hot targets and the masked copy of the logits that detectron2 builds,
:func:`retinanet_classification_loss` computes ``RetinaNet.losses``' classification term from the anchors'
labels directly. fvcore is not imported.

Differences: fvcore computes in float32 (``inputs.float()``) and returns float32 for every input dtype;
here the math is float32 for 16-bit inputs and float64 for float64 ones, and the loss has the inputs'
dtype (float32 for 16-bit inputs under autocast, as detectron2's AMP training runs it). The ``_jit`` name is
the same Python function, not a TorchScript function: it cannot be called from scripted code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import functional

__all__ = ["retinanet_classification_loss", "sigmoid_focal_loss", "sigmoid_focal_loss_jit"]


def sigmoid_focal_loss(inputs: torch.Tensor, targets: torch.Tensor, alpha: float = -1, gamma: float = 2,
                       reduction: str = "none") -> torch.Tensor:
    """``fvcore.nn.sigmoid_focal_loss``: ``targets`` of the inputs' shape, 0 / 1 (or soft) labels of any dtype;
    ``alpha < 0``: no weighting; ``"mean"`` over every element."""
    if not isinstance(targets, torch.Tensor) or targets.shape != inputs.shape:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be a tensor of the inputs' shape {tuple(inputs.shape)}, got {shape}")
    if targets.dtype != inputs.dtype:  # fvcore: targets.float()
        targets = targets.to(inputs.dtype)
    return functional.sigmoid_focal_loss(inputs, targets, float(alpha), float(gamma), reduction)


sigmoid_focal_loss_jit = sigmoid_focal_loss


def retinanet_classification_loss(pred_logits: Sequence[torch.Tensor] | torch.Tensor, gt_labels: torch.Tensor,
                                  alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """detectron2 ``RetinaNet.losses``' ``loss_cls`` before its division by ``loss_normalizer``:

        valid = gt_labels >= 0
        target = one_hot(gt_labels[valid], K + 1)[:, :-1]
        sigmoid_focal_loss_jit(cat(pred_logits, 1)[valid], target, alpha, gamma, reduction="sum")

    ``pred_logits``: the per-level ``(N, Hi*Wi*A, K)`` logits (or already concatenated); ``gt_labels``:
    ``(N, R)`` labels from ``RetinaNet.label_anchors``, ``-1`` ignored, ``K`` background. One fused pass over
    index targets: no one-hot tensor, no masked copy of the logits, no host synchronisation.
    """
    logits = pred_logits if isinstance(pred_logits, torch.Tensor) else torch.cat(list(pred_logits), dim=1)
    return functional.sigmoid_focal_loss(logits, gt_labels, float(alpha), float(gamma), "sum", ignore_index=-1)
