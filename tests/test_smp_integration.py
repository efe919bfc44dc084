"""focal_cuda.integrations.smp.FocalLoss against segmentation_models_pytorch's own losses.FocalLoss.

Runs where smp is installed (requirements-dev.txt installs it; tested with 0.6.0). The peer runs in float64 on
the same values: float64 adapters match it to 1e-10, float32 ones to float32's tolerance.
"""

from __future__ import annotations

import pytest
import torch

from conftest import randn
from dropin_utils import assert_matches_peer
from focal_cuda.integrations.smp import FocalLoss

DTYPES = [torch.float64, torch.float32]
REDUCTIONS = ["mean", "sum", "none", "batchwise_mean"]
SHAPE = (2, 4, 5, 6)  # N, C, H, W


@pytest.fixture
def smp_losses():
    return pytest.importorskip("segmentation_models_pytorch.losses")


def labels(gen, device, *, num_classes=SHAPE[1], ignore=None, dtype=torch.int64):
    t = torch.randint(0, num_classes, (SHAPE[0], *SHAPE[2:]), generator=gen)
    if ignore is not None:
        t[torch.rand(t.shape, generator=gen) < 0.2] = ignore
    return t.to(dtype=dtype, device=device)


def check(smp_losses, mode, x, target, gen, **kwargs):
    ours = FocalLoss(mode, **kwargs)
    theirs = smp_losses.FocalLoss(mode, **kwargs)
    return assert_matches_peer(lambda v: ours(v, target), lambda v: theirs(v, target), x, gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ignore_index", [None, 255])
@pytest.mark.parametrize("alpha, gamma", [(None, 2.0), (0.25, 1.5)])
def test_multiclass(smp_losses, device, gen, dtype, reduction, ignore_index, alpha, gamma):
    x = randn(SHAPE, gen, dtype=dtype, device=device, scale=2.0)
    target = labels(gen, device, ignore=ignore_index)
    check(smp_losses, "multiclass", x, target, gen, reduction=reduction, ignore_index=ignore_index, alpha=alpha,
          gamma=gamma)


@pytest.mark.parametrize("dtype", DTYPES)
def test_multiclass_reads_uint8_masks_and_channels_last_in_place(smp_losses, device, gen, dtype):
    x = randn(SHAPE, gen, dtype=dtype, device=device, scale=2.0).contiguous(memory_format=torch.channels_last)
    target = labels(gen, device, ignore=255, dtype=torch.uint8)
    check(smp_losses, "multiclass", x, target, gen, ignore_index=255)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mode, ignore_index", [("multiclass", None), ("multiclass", 255), ("multilabel", None)])
def test_class_weights(smp_losses, device, gen, dtype, reduction, mode, ignore_index):
    x = randn(SHAPE, gen, dtype=dtype, device=device, scale=2.0)
    if mode == "multiclass":
        target = labels(gen, device, ignore=ignore_index)
    else:
        target = (torch.rand(SHAPE, generator=gen) < 0.3).to(dtype=dtype, device=device)
    # eighths: smp keeps the weights and their sum in float32, exact for these
    weights = (torch.randint(1, 17, (SHAPE[1],), generator=gen) / 8).tolist()
    check(smp_losses, mode, x, target, gen, reduction=reduction, ignore_index=ignore_index, class_weights=weights)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_multilabel(smp_losses, device, gen, dtype, reduction, alpha):
    x = randn(SHAPE, gen, dtype=dtype, device=device, scale=2.0)
    target = (torch.rand(SHAPE, generator=gen) < 0.3).to(dtype=dtype, device=device)
    check(smp_losses, "multilabel", x, target, gen, reduction=reduction, alpha=alpha)


# Hard labels only: for soft labels smp's p_t is exp(-BCE) = p**t (1 - p)**(1 - t), focal_cuda's (torchvision's)
# p t + (1 - p)(1 - t); they agree at t = 0 and 1 (docs/integrations.md).
BINARY_TARGETS = ["int64", "float", "bool", "int64_ignore", "float_ignore", "uint8_255", "nhw_ignore"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", BINARY_TARGETS)
def test_binary(smp_losses, device, gen, dtype, reduction, kind):
    shape = (SHAPE[0], 1, *SHAPE[2:])
    x = randn(shape, gen, dtype=dtype, device=device, scale=2.0)
    hard = (torch.rand(shape, generator=gen) < 0.3).long()
    ignored = torch.rand(shape, generator=gen) < 0.2
    ignore_index = None
    if kind == "int64":
        target = hard
    elif kind == "float":
        target = hard.to(dtype)
    elif kind == "bool":
        target = hard.bool()
    elif kind == "uint8_255":
        target, ignore_index = torch.where(ignored, 255, hard).to(torch.uint8), 255
    else:
        target, ignore_index = torch.where(ignored, -1, hard), -1
        if kind == "float_ignore":
            target = target.to(dtype)
        elif kind == "nhw_ignore":  # (N, H, W) masks for (N, 1, H, W) logits
            target = target[:, 0]
    check(smp_losses, "binary", x, target.to(device), gen, reduction=reduction, ignore_index=ignore_index,
          alpha=0.25 if kind.endswith("ignore") else None)


@pytest.mark.parametrize("mode", ["binary", "multiclass", "multilabel"])
def test_from_probabilities(smp_losses, device, gen, mode):
    shape = (SHAPE[0], 1, *SHAPE[2:]) if mode == "binary" else SHAPE
    probs = torch.rand(shape, generator=gen, dtype=torch.float64).to(device)
    if mode == "multiclass":
        target = labels(gen, device)
    else:
        target = (torch.rand(shape, generator=gen) < 0.3).double().to(device)
    check(smp_losses, mode, probs, target, gen, from_logits=False)


def test_rejects_what_it_does_not_implement():
    with pytest.raises(ValueError, match="normalized"):
        FocalLoss("multiclass", normalized=True)
    with pytest.raises(ValueError, match="reduced_threshold"):
        FocalLoss("binary", reduced_threshold=0.5)
    with pytest.raises(ValueError, match="ignore_index"):
        FocalLoss("multilabel", ignore_index=255)
    with pytest.raises(ValueError, match="mode"):
        FocalLoss("softmax")
    with pytest.raises(ValueError, match="alpha"):
        FocalLoss("binary", alpha=1.5)
    with pytest.raises(ValueError, match="class_weights"):
        FocalLoss("binary", class_weights=[1.0])
    with pytest.raises(ValueError, match="class_weights"):
        FocalLoss("multiclass", class_weights=[1.0, 2.0])(torch.zeros(1, 3, 2), torch.zeros(1, 2, dtype=torch.long))
