"""focal_cuda.integrations.mmseg.FusedFocalLoss against mmsegmentation's FocalLoss semantics.

mmsegmentation cannot be installed here (its FocalLoss imports mmcv's compiled ops, and mmcv has no wheel for
this torch), so its CPU path is restated below in float64 from its source: FocalLoss.forward and
py_sigmoid_focal_loss from mmseg/models/losses/focal_loss.py (open-mmlab/mmsegmentation at commit
b732fae265cdc5b56083ed4c39c6373c573db171) and weight_reduce_loss from mmseg/models/losses/utils.py (commit
8e0354608dc17f1f203594caa0b980b817f6c225). Its CUDA path (mmcv's kernel) computes the same loss for label
maps; for dense targets it takes their argmax, the CPU path (and the adapter) uses them as they are.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import randn
from dropin_utils import assert_matches_peer
from focal_cuda.integrations.mmseg import FusedFocalLoss

DTYPES = [torch.float64, torch.float32]
SHAPE = (2, 4, 5, 6)  # N, C, H, W
EPS = torch.finfo(torch.float32).eps


def weight_reduce_loss(loss, weight=None, reduction="mean", avg_factor=None):
    if weight is not None:
        loss = loss * weight
    if avg_factor is None:
        return loss.mean() if reduction == "mean" else loss.sum() if reduction == "sum" else loss
    if reduction == "mean":
        return loss.sum() / (avg_factor + EPS)
    if reduction != "none":
        raise ValueError('avg_factor can not be used with reduction="sum"')
    return loss


def py_sigmoid_focal_loss(pred, target, weight=None, gamma=2.0, alpha=0.5, class_weight=None, valid_mask=None,
                          reduction="mean", avg_factor=None):
    if isinstance(alpha, list):
        alpha = pred.new_tensor(alpha)
    pred_sigmoid = pred.sigmoid()
    target = target.type_as(pred)
    one_minus_pt = (1 - pred_sigmoid) * target + pred_sigmoid * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * one_minus_pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    final_weight = torch.ones(1, pred.size(1)).type_as(loss)
    if weight is not None:
        if weight.shape != loss.shape and weight.size(0) == loss.size(0):
            weight = weight.view(-1, 1)
        assert weight.dim() == loss.dim()
        final_weight = final_weight * weight
    if class_weight is not None:
        final_weight = final_weight * pred.new_tensor(class_weight)
    if valid_mask is not None:
        final_weight = final_weight * valid_mask
    return weight_reduce_loss(loss, final_weight, reduction, avg_factor)


def mmseg_focal_loss(pred, target, weight=None, avg_factor=None, reduction_override=None, ignore_index=255,
                     reduction="mean", gamma=2.0, alpha=0.5, class_weight=None, loss_weight=1.0):
    """mmseg's FocalLoss(use_sigmoid=True, gamma, alpha, reduction, class_weight, loss_weight).forward(pred, target,
    weight, avg_factor, reduction_override, ignore_index) on the CPU."""
    reduction = reduction_override or reduction
    original_shape = pred.shape
    pred = pred.transpose(0, 1).reshape(pred.size(1), -1).transpose(0, 1).contiguous()
    valid_mask = None
    if original_shape == target.shape:
        target = target.transpose(0, 1).reshape(target.size(1), -1).transpose(0, 1).contiguous()
        valid_mask = (target.argmax(dim=1) != ignore_index).view(-1, 1)
    else:
        target = target.view(-1).contiguous()
        valid_mask = (target != ignore_index).view(-1, 1)
        target = torch.where(target == ignore_index, target.new_tensor(0), target)
        target = F.one_hot(target.long(), num_classes=pred.size(1))
    loss = loss_weight * py_sigmoid_focal_loss(pred, target, weight, gamma=gamma, alpha=alpha,
                                               class_weight=class_weight, valid_mask=valid_mask,
                                               reduction=reduction, avg_factor=avg_factor)
    if reduction == "none":
        loss = loss.transpose(0, 1).reshape(original_shape[1], original_shape[0], *original_shape[2:])
        loss = loss.transpose(0, 1).contiguous()
    return loss


def label_map(gen, device, shape=SHAPE, dtype=torch.int64):
    t = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
    t[torch.rand(t.shape, generator=gen) < 0.2] = 255
    return t.to(dtype=dtype, device=device)


def check(x, target, gen, *, kwargs=None, forward=None):
    kwargs, forward = kwargs or {}, forward or {}
    criterion = FusedFocalLoss(**kwargs)
    return assert_matches_peer(lambda v: criterion(v, target, **forward),
                               lambda v: mmseg_focal_loss(v, target, **forward, **kwargs), x, gen)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("alpha", [0.5, 0.25, [0.25, 0.5, 0.75, 0.125]], ids=str)
@pytest.mark.parametrize("class_weight", [None, [1.0, 2.0, 0.5, 1.5]], ids=["", "class_weight"])
@pytest.mark.parametrize("target_dtype", [torch.int64, torch.uint8], ids=["int64", "uint8"])
def test_label_maps(device, gen, dtype, reduction, alpha, class_weight, target_dtype):
    x = randn(SHAPE, gen, dtype=dtype, device=device, scale=2.0)
    target = label_map(gen, device, dtype=target_dtype)
    check(x, target, gen, kwargs=dict(reduction=reduction, alpha=alpha, class_weight=class_weight, loss_weight=0.7,
                                      gamma=2.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["avg_factor", "pixel_weight", "element_weight", "weight_avg_factor", "ignore_0",
                                  "rows", "gamma_1_5", "reduction_override"])
def test_forward_arguments(device, gen, dtype, case):
    x = randn(SHAPE, gen, dtype=dtype, device=device, scale=2.0)
    target = label_map(gen, device)
    pixels = SHAPE[0] * SHAPE[2] * SHAPE[3]
    kwargs, forward = dict(loss_weight=1.5), {}
    if "avg_factor" in case:
        forward["avg_factor"] = 37.0
    if case in ("pixel_weight", "weight_avg_factor"):
        forward["weight"] = torch.rand(pixels, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    if case == "element_weight":
        forward["weight"] = torch.rand(pixels, SHAPE[1], generator=gen, dtype=torch.float64).to(dtype=dtype,
                                                                                               device=device)
    if case == "ignore_0":  # decode heads pass their own ignore_index
        forward["ignore_index"] = 0
        target = torch.where(target == 255, 0, target)
    if case == "gamma_1_5":
        kwargs["gamma"] = 1.5
    if case == "reduction_override":
        forward["reduction_override"] = "sum"
    if case == "rows":  # (N, C) logits, (N,) labels
        x, target = x[:, :, 0, 0].contiguous(), target[:, 0, 0].contiguous()
    check(x, target, gen, kwargs=kwargs, forward=forward)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dense_targets(device, gen, dtype, reduction):
    x = randn(SHAPE, gen, dtype=dtype, device=device, scale=2.0)
    target = torch.rand(SHAPE, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    check(x, target, gen, kwargs=dict(reduction=reduction, alpha=0.25))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_avg_non_ignore(device, gen, dtype, weighted):
    """Not in mmseg's FocalLoss (its CrossEntropyLoss has it): "mean" over the non-ignored elements."""
    x = randn(SHAPE, gen, dtype=dtype, device=device, scale=2.0)
    target = label_map(gen, device)
    kwargs = dict(alpha=0.25, class_weight=[1.0, 2.0, 0.5, 1.5] if weighted else None)
    valid = int((target != 255).sum()) * SHAPE[1]
    criterion = FusedFocalLoss(avg_non_ignore=True, **kwargs)
    assert_matches_peer(lambda v: criterion(v, target),
                        lambda v: mmseg_focal_loss(v, target, reduction="sum", **kwargs) / valid, x, gen)


def test_loss_name_and_rejections():
    assert FusedFocalLoss().loss_name == "loss_focal"
    assert FusedFocalLoss(loss_name="loss_fused").loss_name == "loss_fused"
    with pytest.raises(ValueError, match="use_sigmoid"):
        FusedFocalLoss(use_sigmoid=False)
    with pytest.raises(ValueError, match="reduction"):
        FusedFocalLoss(reduction="batchmean")
    x, t = torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="avg_factor"):
        FusedFocalLoss()(x, t, avg_factor=2.0, reduction_override="sum")
    with pytest.raises(ValueError, match="target"):
        FusedFocalLoss()(x, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="weight"):
        FusedFocalLoss()(x, t, weight=torch.ones(3))
    with pytest.raises(ValueError, match="class_weight"):
        FusedFocalLoss(class_weight=[1.0, 2.0])(x, t)
