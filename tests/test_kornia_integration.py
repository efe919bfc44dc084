"""focal_cuda.integrations.kornia against kornia's own focal losses (kornia.losses.focal_loss / FocalLoss,
binary_focal_loss_with_logits / BinaryFocalLossWithLogits).

Runs where kornia is installed (requirements-dev.txt installs it; tested with 0.9.0). The peer runs in float64
on the same values: float64 adapters match it to 1e-10, float32 ones to float32's tolerance.
"""

from __future__ import annotations

import pytest
import torch

from conftest import randn
from dropin_utils import assert_matches_peer
from focal_cuda.integrations import kornia as fused

DTYPES = [torch.float64, torch.float32]
REDUCTIONS = ["none", "mean", "sum"]
SHAPE = (2, 4, 5, 6)  # N, C, H, W


@pytest.fixture
def kornia_losses():
    return pytest.importorskip("kornia.losses")


def class_weight(gen, device):
    return (torch.rand(SHAPE[1], generator=gen, dtype=torch.float64) + 0.5).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("ignore_index", [None, 255])
@pytest.mark.parametrize("weighted", [False, True])
def test_focal_loss(kornia_losses, device, gen, dtype, reduction, alpha, ignore_index, weighted):
    x = randn(SHAPE, gen, dtype=dtype, device=device, scale=2.0)
    target = torch.randint(0, SHAPE[1], (SHAPE[0], *SHAPE[2:]), generator=gen)
    if ignore_index is not None:
        target[torch.rand(target.shape, generator=gen) < 0.2] = ignore_index
    target = target.to(device)
    weight = class_weight(gen, device) if weighted else None
    kwargs = dict(alpha=alpha, gamma=2.0, reduction=reduction, ignore_index=ignore_index)
    assert_matches_peer(lambda v: fused.focal_loss(v, target, weight=None if weight is None else weight.to(v.dtype),
                                                   **kwargs),
                        lambda v: kornia_losses.focal_loss(v, target, weight=None if weight is None else
                                                           weight.to(v.dtype), **kwargs), x, gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_loss_module(kornia_losses, device, gen, dtype, gamma):
    """The module with kornia's defaults (reduction "none", ignore_index -100), 2-D (N, C) logits."""
    x = randn((16, 5), gen, dtype=dtype, device=device, scale=3.0)
    target = torch.randint(0, 5, (16,), generator=gen).to(device)
    target[:3] = -100
    ours, theirs = fused.FocalLoss(alpha=0.5, gamma=gamma), kornia_losses.FocalLoss(alpha=0.5, gamma=gamma)
    assert_matches_peer(lambda v: ours(v, target), lambda v: theirs(v, target), x, gen)


TARGETS = ["hard_float", "hard_int", "hard_float_promised", "soft", "soft_declared", "ignored"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [None, 0.25])
@pytest.mark.parametrize("kind", TARGETS)
@pytest.mark.parametrize("weighted", [False, True])
def test_binary_focal_loss(kornia_losses, device, gen, dtype, reduction, alpha, kind, weighted):
    x = randn(SHAPE, gen, dtype=dtype, device=device, scale=2.0)
    hard = (torch.rand(SHAPE, generator=gen) < 0.3).to(torch.float64)
    ignore_index = None if kind.startswith("hard") else -100
    if kind == "hard_int":
        target = hard.long()
    elif kind.startswith("soft"):
        target = torch.rand(SHAPE, generator=gen, dtype=torch.float64)
    elif kind == "ignored":
        target = torch.where(torch.rand(SHAPE, generator=gen) < 0.2, -100.0, hard)
    else:
        target = hard
    target = target.to(device)
    weight = class_weight(gen, device) if weighted else None

    def cast(t, v):
        return t.to(v.dtype) if t.is_floating_point() else t

    def run(fn, v, **extra):
        return fn(v, cast(target, v), alpha=alpha, gamma=2.0, reduction=reduction,
                  weight=None if weight is None else weight.to(v.dtype), ignore_index=ignore_index, **extra)

    hard_targets = {"hard_float_promised": True, "soft_declared": False}.get(kind)
    assert_matches_peer(lambda v: run(fused.binary_focal_loss_with_logits, v, hard_targets=hard_targets),
                        lambda v: run(kornia_losses.binary_focal_loss_with_logits, v), x, gen)


@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_module_defaults(kornia_losses, device, gen, dtype):
    """BinaryFocalLossWithLogits with kornia's defaults (reduction "none", ignore_index -100), (N, C) logits."""
    x = randn((32, 3), gen, dtype=dtype, device=device, scale=3.0)
    target = (torch.rand((32, 3), generator=gen) < 0.5).to(dtype=dtype, device=device)
    ours, theirs = fused.BinaryFocalLossWithLogits(alpha=0.25), kornia_losses.BinaryFocalLossWithLogits(alpha=0.25)
    assert_matches_peer(lambda v: ours(v, target.to(v.dtype)), lambda v: theirs(v, target.to(v.dtype)), x, gen)


def test_soft_targets_need_kornias_formula(gen, monkeypatch):
    """Why the adapter does not pass soft targets to the dense kernel: torchvision's p_t is another loss. And
    which targets take the single fused pass: hard ones, known as such (integer, CPU 0 / 1, or promised)."""
    kornia_losses = pytest.importorskip("kornia.losses")
    x = randn(SHAPE, gen, dtype=torch.float64, scale=2.0)
    soft = torch.rand(SHAPE, generator=gen, dtype=torch.float64)
    expected = kornia_losses.binary_focal_loss_with_logits(x, soft, alpha=0.25, reduction="sum")
    torch.testing.assert_close(fused.binary_focal_loss_with_logits(x, soft, reduction="sum"), expected)
    promised = fused.binary_focal_loss_with_logits(x, soft, reduction="sum", hard_targets=True)
    assert (promised - expected).abs() > 1e-3 * expected.abs()

    calls = []
    original = fused.sigmoid_focal_loss
    monkeypatch.setattr(fused, "sigmoid_focal_loss", lambda *a, **k: calls.append(a[4]) or original(*a, **k))
    hard = (soft < 0.3).double()
    for target, hard_targets, passes in [(hard, None, ["sum"]), (hard.long(), None, ["sum"]), (soft, None, ["none"] * 2),
                                         (soft, True, ["sum"]), (hard, False, ["none"] * 2)]:
        calls.clear()
        fused.binary_focal_loss_with_logits(x, target, reduction="sum", ignore_index=None, hard_targets=hard_targets)
        assert calls == passes, (target.dtype, hard_targets, calls)


def test_rejects_what_it_does_not_implement():
    x, t = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="pos_weight"):
        fused.binary_focal_loss_with_logits(x, t, pos_weight=torch.ones(3))
    with pytest.raises(ValueError, match="pos_weight"):
        fused.BinaryFocalLossWithLogits(alpha=0.25, pos_weight=torch.ones(3))
    with pytest.raises(ValueError, match="weight"):
        fused.focal_loss(x, torch.zeros(2, 4, dtype=torch.long), 0.25, weight=torch.ones(3, requires_grad=True))
    with pytest.raises(ValueError, match="weight"):
        fused.focal_loss(x, torch.zeros(2, 4, dtype=torch.long), 0.25, weight=torch.ones(2))
    with pytest.raises(ValueError, match="reduction"):
        fused.focal_loss(x, torch.zeros(2, 4, dtype=torch.long), 0.25, reduction="batchmean")
    with pytest.raises(ValueError, match="gamma"):
        fused.focal_loss(x, torch.zeros(2, 4, dtype=torch.long), 0.25, gamma=-1.0, reduction="sum")
