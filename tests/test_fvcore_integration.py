"""focal_cuda.integrations.fvcore against fvcore's own sigmoid_focal_loss and sigmoid_focal_loss_jit (what
detectron2's RetinaNet and FCOS call), and detectron2 RetinaNet's classification term built as detectron2 builds it
(detectron2/modeling/meta_arch/retinanet.py, RetinaNet.losses, facebookresearch/detectron2 at commit
02c1c3558df3d4aab05d4370e9009a840155c034: one-hot of the valid anchors' labels, masked logits, reduction "sum")
with fvcore's function. detectron2 itself has no wheel; its loss is fvcore's.

Runs where fvcore is installed (requirements-dev.txt installs it; tested with 0.1.5.post20221221). fvcore
computes in float32 whatever the inputs' dtype (``inputs.float()``), so results are compared at float32's
precision.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import randn
from dropin_utils import assert_matches_peer
from focal_cuda.integrations import fvcore as fused

DTYPES = [torch.float64, torch.float32]
FLOAT32_TOL = dict(rtol=2e-5, atol=1e-6)  # fvcore's own float32 rounding


@pytest.fixture
def fvcore_nn():
    return pytest.importorskip("fvcore.nn")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("alpha, gamma", [(-1.0, 2.0), (0.25, 2.0), (0.0, 1.5), (0.75, 0.0)])
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("shape", [(64, 7), (2, 30, 5), (50,)])
def test_sigmoid_focal_loss(fvcore_nn, device, gen, dtype, reduction, alpha, gamma, jit, shape):
    x = randn(shape, gen, dtype=dtype, device=device, scale=2.0)
    targets = (torch.rand(shape, generator=gen) < 0.2).to(device)
    ours = fused.sigmoid_focal_loss_jit if jit else fused.sigmoid_focal_loss
    theirs = fvcore_nn.sigmoid_focal_loss_jit if jit else fvcore_nn.sigmoid_focal_loss
    dense = targets.to(dtype)
    assert_matches_peer(lambda v: ours(v, dense, alpha, gamma, reduction),
                        lambda v: theirs(v, dense, alpha, gamma, reduction).to(v.dtype), x, gen, tol=FLOAT32_TOL)


def test_defaults_and_integer_targets(fvcore_nn, device, gen):
    """fvcore's defaults (alpha=-1: no weighting, reduction "none") and its targets.float() of integer labels."""
    x = randn((40, 6), gen, dtype=torch.float32, device=device, scale=2.0)
    targets = (torch.rand((40, 6), generator=gen) < 0.2).long().to(device)
    assert_matches_peer(lambda v: fused.sigmoid_focal_loss(v, targets),
                        lambda v: fvcore_nn.sigmoid_focal_loss(v, targets), x, gen, tol=FLOAT32_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
def test_detectron2_retinanet_classification_loss(fvcore_nn, device, gen, dtype):
    num_images, num_classes, anchors = 2, 6, [48, 12, 3]  # three feature levels
    x = randn((num_images, sum(anchors), num_classes), gen, dtype=dtype, device=device, scale=2.0)  # split per level
    # RetinaNet.label_anchors: -1 ignored, num_classes background, else the matched box's class
    gt_labels = torch.randint(0, num_classes, (num_images, sum(anchors)), generator=gen)
    u = torch.rand(gt_labels.shape, generator=gen)
    gt_labels = torch.where(u < 0.7, num_classes, torch.where(u < 0.8, -1, gt_labels)).to(device)

    def detectron2_loss(levels):
        valid_mask = gt_labels >= 0
        gt_labels_target = F.one_hot(gt_labels[valid_mask], num_classes=num_classes + 1)[:, :-1]
        return fvcore_nn.sigmoid_focal_loss_jit(torch.cat(levels, dim=1)[valid_mask],
                                                gt_labels_target.to(levels[0].dtype), alpha=0.25, gamma=2.0,
                                                reduction="sum")

    assert_matches_peer(lambda v: fused.retinanet_classification_loss(list(v.split(anchors, dim=1)), gt_labels),
                        lambda v: detectron2_loss(list(v.split(anchors, dim=1))).to(v.dtype), x, gen, tol=FLOAT32_TOL)


def test_rejects_targets_of_another_shape():
    with pytest.raises(ValueError, match="targets"):
        fused.sigmoid_focal_loss(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
