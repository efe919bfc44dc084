"""torchvision RetinaNet with focal_cuda's fused sigmoid focal loss.

``RetinaNetClassificationHead.compute_loss`` builds a one-hot target per image, drops the
between-thresholds anchors with a boolean mask (a copy of the logits and a host sync) and calls
``torchvision.ops.sigmoid_focal_loss`` once per image. The replacement reads the matched class indices
directly (index targets: no one-hot, no masked copy) in one fused call for the batch, each image divided
by its ``max(1, num_foreground)`` on the device. Same loss, same gradients.
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
    """What ``RetinaNetClassificationHead.compute_loss`` returns, computed with index targets in one fused
    call for the whole batch: torchvision's per-image ``sum / max(1, num_foreground)``, averaged over the
    images, is a per-image normalizer ``max(1, num_foreground) * num_images`` read on the device (the
    backward's grad_output is then 1 and costs no pass). Few tensor ops per image: on a CPU each op on more
    than a few thousand elements is an OpenMP parallel region, a wait that grows with the machine's load."""
    cls_logits = head_outputs["cls_logits"]  # (N, anchors, C)
    num_classes = cls_logits.shape[-1]
    indices = []
    for targets_per_image, matched in zip(targets, matched_idxs):
        # matched: a box index, _BELOW_LOW_THRESHOLD (background: class C) or _BETWEEN_THRESHOLDS
        # (ignored). One lookup in [_BETWEEN_THRESHOLDS, C, labels...] at matched + 2 maps all three
        # (index_select of a 1-D tensor runs on one thread). Filled on the device: no host-to-device copy.
        labels = targets_per_image["labels"]
        lookup = torch.cat([labels.new_full((2,), num_classes), labels])
        lookup[0] = _BETWEEN_THRESHOLDS
        indices.append(lookup.index_select(0, matched - _BETWEEN_THRESHOLDS))
    index = torch.stack(indices)  # (N, anchors): small integer work, the logits are read once below
    num_foreground = torch.count_nonzero(torch.stack(matched_idxs) >= 0, dim=1)
    normalizer = num_foreground.clamp(min=1) * len(targets)  # on the device
    return sigmoid_focal_loss(cls_logits, index, alpha, gamma, "mean", ignore_index=_BETWEEN_THRESHOLDS,
                              normalizer=normalizer)


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
