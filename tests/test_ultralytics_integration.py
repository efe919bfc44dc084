"""focal_cuda.integrations.ultralytics.FocalLoss against ultralytics' FocalLoss (ultralytics/utils/loss.py).

Two oracles: ultralytics' own class where the package is installed (tested with 8.4.190; it pulls OpenCV and
polars, so requirements-dev.txt leaves it out), and, always, its forward restated below in float64 from the
source (ultralytics/ultralytics at commit e4e61103361afa229d84d4ecb392fbd874e55922, the same code as 8.4.190).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import randn
from dropin_utils import assert_matches_peer
from focal_cuda.integrations.ultralytics import FocalLoss

DTYPES = [torch.float64, torch.float32]
ALPHAS = [0.25, 0.3, 0.0, -1.0, [0.2, 0.0, 0.7, 0.5, 0.9]]  # ultralytics rounds them to float32, so does the adapter


def ultralytics_focal_loss(pred, label, gamma=1.5, alpha=0.25):
    """ultralytics' FocalLoss.forward, restated."""
    alpha = torch.tensor(alpha)
    loss = F.binary_cross_entropy_with_logits(pred, label, reduction="none")
    pred_prob = pred.sigmoid()
    p_t = label * pred_prob + (1 - label) * (1 - pred_prob)
    loss = loss * (1.0 - p_t) ** gamma
    if (alpha > 0).any():
        alpha = alpha.to(device=pred.device, dtype=pred.dtype)
        loss = loss * (label * alpha + (1 - label) * (1 - alpha))
    return loss.mean(1).sum()


@pytest.fixture(scope="module")
def ultralytics_loss(tmp_path_factory):
    os.environ.setdefault("YOLO_CONFIG_DIR", str(tmp_path_factory.mktemp("ultralytics")))  # its settings file
    return pytest.importorskip("ultralytics.utils.loss")


def inputs(gen, device, dtype, shape, soft=False):
    x = randn(shape, gen, dtype=dtype, device=device, scale=2.0)
    label = torch.rand(shape, generator=gen, dtype=torch.float64)
    label = label if soft else (label < 0.2).double()
    return x, label.to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", ALPHAS, ids=str)
@pytest.mark.parametrize("gamma", [1.5, 2.0, 0.0])
@pytest.mark.parametrize("shape", [(64, 5), (2, 30, 5)])
@pytest.mark.parametrize("soft", [False, True])
def test_matches_restated_ultralytics(device, gen, dtype, alpha, gamma, shape, soft):
    x, label = inputs(gen, device, dtype, shape, soft)
    ours = FocalLoss(gamma=gamma, alpha=alpha)
    assert_matches_peer(lambda v: ours(v, label.to(v.dtype)),
                        lambda v: ultralytics_focal_loss(v, label.to(v.dtype), gamma, alpha), x, gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", ALPHAS, ids=str)
@pytest.mark.parametrize("shape", [(64, 5), (2, 30, 5)])
def test_matches_ultralytics(ultralytics_loss, device, gen, dtype, alpha, shape):
    x, label = inputs(gen, device, dtype, shape)
    ours, theirs = FocalLoss(gamma=1.5, alpha=alpha), ultralytics_loss.FocalLoss(gamma=1.5, alpha=alpha)
    assert_matches_peer(lambda v: ours(v, label.to(v.dtype)), lambda v: theirs(v, label.to(v.dtype)), x, gen)


def test_defaults_match(ultralytics_loss):
    theirs = ultralytics_loss.FocalLoss()
    ours = FocalLoss()
    assert ours.gamma == theirs.gamma and ours.alpha == float(theirs.alpha)


def test_rejects_1d_logits():
    with pytest.raises(ValueError, match="pred"):
        FocalLoss()(torch.zeros(5), torch.zeros(5))
