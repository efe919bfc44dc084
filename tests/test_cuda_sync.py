"""No hidden host synchronisation on CUDA, and the opt-in check of class-index targets.

The CUDA tests run on a GPU only (skipped here); the switch itself is tested everywhere.
"""

from __future__ import annotations

import pytest
import torch

import focal_cuda
from conftest import CUDA, DEVICES, make_target, randn

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def test_target_check_switch_is_restored():
    assert not focal_cuda.checks.cuda_target_checks_enabled()  # off by default
    with focal_cuda.cuda_target_checks():
        assert focal_cuda.checks.cuda_target_checks_enabled()
        with focal_cuda.cuda_target_checks(False):
            assert not focal_cuda.checks.cuda_target_checks_enabled()
        assert focal_cuda.checks.cuda_target_checks_enabled()
    assert not focal_cuda.checks.cuda_target_checks_enabled()
    with pytest.raises(RuntimeError, match="inside"):
        with focal_cuda.cuda_target_checks():
            raise RuntimeError("inside")
    assert not focal_cuda.checks.cuda_target_checks_enabled()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("checks", [False, True])
def test_out_of_range_targets_raise_when_checked(device, checks, gen):
    """CPU targets are always checked; CUDA ones when the check is on. The error names the value and where."""
    logits = randn((6, 5, 3), gen, device=device)
    target = make_target((6, 5, 3), gen, device=device)
    target[2, 1] = 7
    if device == "cpu" or checks:
        with focal_cuda.cuda_target_checks(checks), pytest.raises(IndexError, match="7"):
            focal_cuda.softmax_focal_loss(logits, target, reduction="sum")
    else:  # the sync-free default: NaN where the target is out of range, the other positions as usual
        loss = focal_cuda.softmax_focal_loss(logits, target, reduction="none")
        assert torch.isnan(loss[2, 1]).item()
        assert torch.isfinite(loss[0]).all().item()

    rows = randn((9, 4), gen, device=device)
    index = torch.full((9,), 4, dtype=torch.int64, device=device)  # 4 = background
    index[5] = 9
    if device == "cpu" or checks:
        with focal_cuda.cuda_target_checks(checks), pytest.raises(IndexError, match="9"):
            focal_cuda.sigmoid_focal_loss(rows, index, reduction="sum")
    else:
        loss = focal_cuda.sigmoid_focal_loss(rows, index, reduction="none")
        assert torch.isnan(loss[5]).all().item()
        assert torch.isfinite(loss[:5]).all().item()


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_no_host_sync_on_cuda(dtype, gen):
    """Forward and backward of the usual calls under torch's sync-debug mode "error": device alpha and
    normalizers, per-class weights as a list (cached after the first call) and as a module buffer,
    "mean" with ignored targets (the count pre-pass), per-image normalizers, channel-first sigmoid."""
    device = "cuda"
    seg = randn((2, 19, 9, 11), gen, dtype=dtype, device=device).requires_grad_()
    seg_target = make_target((2, 19, 9, 11), gen, device=device, ignore_index=255, ignore_frac=0.2)
    det = randn((2, 50, 7), gen, dtype=dtype, device=device).requires_grad_()
    det_index = torch.randint(0, 8, (2, 50), generator=gen).to(device)  # class 7 = background
    det_dense = torch.rand((2, 50, 7), generator=gen).round().to(device=device, dtype=dtype)
    weights = [0.5 + 0.05 * c for c in range(19)]
    module = focal_cuda.FusedFocalLoss(gamma=2.0, alpha=weights, ignore_index=255).to(device)
    alpha = torch.tensor(0.25, device=device)
    normalizer = torch.tensor(37.0, device=device)
    per_image = torch.tensor([11.0, 13.0], device=device)

    def step():
        losses = [
            focal_cuda.softmax_focal_loss(seg, seg_target, alpha=weights, ignore_index=255),
            focal_cuda.softmax_focal_loss(seg, seg_target, gamma="flsd53", ignore_index=255, reduction="sum"),
            module(seg, seg_target),
            focal_cuda.sigmoid_focal_loss(det, det_index, alpha, 2.0, "mean", normalizer=normalizer),
            focal_cuda.sigmoid_focal_loss(det, det_index, 0.25, 2.0, "mean", normalizer=per_image),
            focal_cuda.sigmoid_focal_loss(det, det_dense, 0.25, 2.0, "sum"),
            focal_cuda.sigmoid_focal_loss(seg, seg_target, 0.25, 2.0, "mean", ignore_index=255, class_dim=1),
        ]
        torch.stack([loss.float() for loss in losses]).sum().backward()

    step()  # first call: the list's weights are copied to the device once, then cached
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert torch.isfinite(seg.grad).all() and torch.isfinite(det.grad).all()
