"""focal_cuda.integrations.mmdet.FusedFocalLoss against mmdetection's FocalLoss semantics.

mmdetection is not a dependency: its sigmoid focal loss and weight_reduce_loss are restated here
(mmdet/models/losses/focal_loss.py, utils.py) on one-hot targets in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import randn
from focal_cuda.integrations.mmdet import FusedFocalLoss

EPS = torch.finfo(torch.float32).eps


def mmdet_focal_loss(pred, labels, weight=None, gamma=2.0, alpha=0.25, reduction="mean", avg_factor=None,
                     loss_weight=1.0):
    num_classes = pred.shape[1]
    target = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(pred.dtype)
    p = pred.sigmoid()
    pt = (1 - p) * target + p * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    if weight is not None:
        loss = loss * (weight.view(-1, 1) if weight.dim() == 1 else weight)
    if avg_factor is None:
        loss = loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss
    elif reduction == "mean":
        loss = loss.sum() / (avg_factor + EPS)
    return loss_weight * loss


@pytest.mark.parametrize("weight_is_mask", [False, True])
@pytest.mark.parametrize("case", ["no_weight", "mask_weight", "avg_factor", "mask_weight_avg_factor", "none", "sum"])
def test_matches_mmdetection_focal_loss(device, gen, case, weight_is_mask):
    num_anchors, num_classes = 333, 12
    pred = randn((num_anchors, num_classes), gen, dtype=torch.float64, device=device, scale=2.0)
    labels = torch.randint(0, num_classes + 1, (num_anchors,), generator=gen).to(device)  # num_classes = background
    weight = (torch.rand(num_anchors, generator=gen) > 0.2).to(torch.float64).to(device) if "mask" in case else None
    avg_factor = 17.0 if "avg_factor" in case else None
    reduction = case if case in ("none", "sum") else "mean"
    criterion = FusedFocalLoss(gamma=2.0, alpha=0.25, loss_weight=0.7, weight_is_mask=weight_is_mask)
    x = pred.clone().requires_grad_()
    loss = criterion(x, labels, weight, avg_factor=avg_factor, reduction_override=reduction)
    x_ref = pred.clone().requires_grad_()
    expected = mmdet_focal_loss(x_ref, labels, weight, avg_factor=avg_factor, reduction=reduction, loss_weight=0.7)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    go = torch.rand_like(expected)
    (loss * go).sum().backward()
    (expected * go).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)


def test_rejects_what_it_does_not_implement():
    with pytest.raises(ValueError, match="use_sigmoid"):
        FusedFocalLoss(use_sigmoid=False)
    with pytest.raises(ValueError, match="avg_factor"):
        FusedFocalLoss()(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), avg_factor=2.0, reduction_override="sum")
