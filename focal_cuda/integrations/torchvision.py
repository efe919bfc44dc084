"""torchvision RetinaNet with focal_cuda's fused sigmoid focal loss.

``RetinaNetClassificationHead.compute_loss`` builds a one-hot target per image, drops the
between-thresholds anchors with a boolean mask (a copy of the logits and a host sync) and calls
``torchvision.ops.sigmoid_focal_loss``. The replacement reads the matched class indices directly
(index targets: no one-hot, no masked copy) and divides by ``max(1, num_foreground)`` on the device.
Same loss, same gradients.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..functional import sigmoid_focal_loss

__all__ = ["retinanet_classification_loss", "use_fused_focal_loss"]

# torchvision.models.detection._utils.Matcher
_BELOW_LOW_THRESHOLD = -1
_BETWEEN_THRESHOLDS = -2


def retinanet_classification_loss(
    targets: list[dict[str, torch.Tensor]],
    head_outputs: dict[str, torch.Tensor],
    matched_idxs: list[torch.Tensor],
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """What ``RetinaNetClassificationHead.compute_loss`` returns, computed with index targets.

    Few tensor ops per image: on a CPU each op on more than a few thousand elements is an OpenMP
    parallel region, whose threads must all be scheduled before it ends, a wait that grows with the
    machine's load (data-loader workers, other jobs)."""
    cls_logits = head_outputs["cls_logits"]  # (N, anchors, C)
    num_classes = cls_logits.shape[-1]
    images = len(targets)
    total = cls_logits.new_zeros(())
    for targets_per_image, logits, matched in zip(targets, cls_logits, matched_idxs):
        # matched: a box index, _BELOW_LOW_THRESHOLD (background: class C) or _BETWEEN_THRESHOLDS
        # (ignored). One lookup in [_BETWEEN_THRESHOLDS, C, labels...] at matched + 2 maps all three
        # (index_select of a 1-D tensor runs on one thread). Filled on the device: no host-to-device copy.
        labels = targets_per_image["labels"]
        lookup = torch.cat([labels.new_full((2,), num_classes), labels])
        lookup[0] = _BETWEEN_THRESHOLDS
        index = lookup.index_select(0, matched - _BETWEEN_THRESHOLDS)
        # max(1, num_foreground) on the device, times the number of images: the mean over the
        # images is in the normalizer, so the backward's grad_output is 1 and costs no pass.
        normalizer = torch.count_nonzero(matched >= 0).clamp(min=1) * images
        total = total + sigmoid_focal_loss(logits, index, alpha, gamma, "mean", ignore_index=_BETWEEN_THRESHOLDS,
                                           normalizer=normalizer)
    return total


def use_fused_focal_loss(model: nn.Module, alpha: float = 0.25, gamma: float = 2.0) -> nn.Module:
    """Makes a torchvision ``RetinaNet`` (or its ``RetinaNetClassificationHead``) compute its classification
    loss with focal_cuda. Returns the model."""
    head = getattr(getattr(model, "head", None), "classification_head", model)
    if not hasattr(head, "compute_loss") or not hasattr(head, "cls_logits"):
        raise TypeError(f"model must be a torchvision RetinaNet or RetinaNetClassificationHead, got {type(model).__name__}")

    def compute_loss(self, targets, head_outputs, matched_idxs):
        return retinanet_classification_loss(targets, head_outputs, matched_idxs, alpha, gamma)

    head.compute_loss = types.MethodType(compute_loss, head)
    return model
