"""Sigmoid focal loss on channel-first logits (class_dim=1), dense targets in channels_last read in place,
and per-image normalizers, against the float64 reference, on every device.

The channel-first path has the same depth as the classes-last one where it differs from it: dtypes,
reductions, target dtypes (uint8 masks with 255), ignore_index, background, out-of-range targets, odd
spatial sizes, channels_last and non-contiguous layouts, empty inputs, normalizers, determinism, no copy of
the logits (checked with a dispatch mode), gradcheck, opcheck and torch.compile.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES, REDUCTIONS, assert_close_scaled, randn
from torch.utils._python_dispatch import TorchDispatchMode

import focal_cuda
from focal_cuda import reference

TARGET_DTYPES = [torch.int64, torch.int32, torch.int16, torch.uint8]


def index_targets(n, classes, spatial, gen, *, dtype=torch.int64, ignore_index=-100, ignore_frac=0.2,
                  background_frac=0.3):
    """Class indices (N, *spatial): positives, background (C) and ignored positions."""
    shape = (n, *spatial)
    t = torch.randint(0, classes, shape, generator=gen)
    r = torch.rand(shape, generator=gen)
    t = torch.where(r < background_frac, torch.full_like(t, classes), t)
    t = torch.where(r > 1 - ignore_frac, torch.full_like(t, ignore_index), t)
    return t.to(dtype)


def loss_and_grad(fn, x, t, go, **kwargs):
    x = x.detach().requires_grad_()
    loss = fn(x, t, **kwargs)
    (g,) = torch.autograd.grad(loss, x, go)
    return loss.detach(), g


def reference_loss_and_grad(x, t, go, **kwargs):
    xd = x.detach().double().requires_grad_()
    loss = reference.sigmoid_focal_loss(xd, t, **kwargs)
    (g,) = torch.autograd.grad(loss, xd, go.double())
    return loss.detach(), g


def grad_output_for(loss_shape, gen, dtype, device):
    return randn(loss_shape, gen, dtype=dtype, device=device) if loss_shape else torch.tensor(1.25, dtype=dtype,
                                                                                                device=device)


# ============================================================================ channel-first index targets


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_channel_first_matches_reference(device, gen, dtype, reduction, layout):
    shape = (2, 5, 7, 9)  # odd spatial size: 63 positions per image
    x = randn(shape, gen, dtype=dtype, device=device, scale=3.0)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = randn((2, 5, 7, 18), gen, dtype=dtype, device=device, scale=3.0)[..., ::2]
    t = index_targets(2, 5, (7, 9), gen, ignore_index=-1).to(device)
    kwargs = dict(alpha=0.25, gamma=2.0, reduction=reduction, ignore_index=-1, class_dim=1)
    go = grad_output_for(shape if reduction == "none" else (), gen, dtype, device)
    loss, g = loss_and_grad(focal_cuda.sigmoid_focal_loss, x, t, go, **kwargs)
    ref_loss, ref_g = reference_loss_and_grad(x, t, go, **kwargs)
    assert loss.dtype == dtype and loss.shape == ref_loss.shape
    assert_close_scaled(loss, ref_loss, dtype, "loss")
    assert_close_scaled(g, ref_g, dtype, "grad")


@pytest.mark.parametrize("target_dtype", TARGET_DTYPES, ids=str)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.7])
def test_channel_first_target_dtypes_and_gammas(device, gen, target_dtype, gamma):
    """uint8 masks with 255 as ignore_index, as segmentation datasets store them."""
    ignore = 255 if target_dtype == torch.uint8 else -100
    x = randn((3, 4, 8, 16), gen, device=device, scale=2.0)
    t = index_targets(3, 4, (8, 16), gen, dtype=target_dtype, ignore_index=ignore).to(device)
    kwargs = dict(alpha=0.25, gamma=gamma, reduction="sum", ignore_index=ignore, class_dim=1)
    go = torch.tensor(1.0, device=device)
    loss, g = loss_and_grad(focal_cuda.sigmoid_focal_loss, x, t, go, **kwargs)
    ref_loss, ref_g = reference_loss_and_grad(x, t, go, **kwargs)
    assert_close_scaled(loss, ref_loss, x.dtype, "loss")
    assert_close_scaled(g, ref_g, x.dtype, "grad")


@pytest.mark.parametrize("gamma", ["flsd53", "schedule3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channel_first_gamma_schedules_and_saturated_logits(device, gen, dtype, gamma):
    """Gamma chosen per element from its own p_t, with logits up to +-1e4 (p_t rounding to 0 or 1) and a
    gamma in (0, 1) among the pieces: as the reference, finite everywhere."""
    schedule = (focal_cuda.GammaSchedule.flsd53() if gamma == "flsd53"
                else focal_cuda.GammaSchedule(thresholds=(0.05, 0.3, 0.7), gammas=(4.0, 2.0, 0.5, 1.5)))
    x = randn((2, 6, 5, 11), gen, dtype=torch.float64, scale=4.0)
    x[0, :, 0] = 1e4 * torch.sign(x[0, :, 0])  # saturated
    x = x.to(dtype=dtype, device=device)
    t = index_targets(2, 6, (5, 11), gen, ignore_index=-1).to(device)
    kwargs = dict(alpha=0.25, gamma=schedule, reduction="sum", ignore_index=-1, class_dim=1)
    go = torch.tensor(1.0, dtype=dtype, device=device)
    loss, g = loss_and_grad(focal_cuda.sigmoid_focal_loss, x, t, go, **kwargs)
    ref_loss, ref_g = reference_loss_and_grad(x, t, go, **kwargs)
    ref_g = torch.where(torch.isnan(ref_g), torch.zeros_like(ref_g), ref_g)  # autograd's 0 * inf at m = 0
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    assert_close_scaled(loss, ref_loss, dtype, "loss")
    assert_close_scaled(g, ref_g, dtype, "grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_channel_first_autocast_gives_a_float32_loss(device, gen, dtype):
    """Under autocast, 16-bit logits give a float32 loss (as F.cross_entropy there), read as they are."""
    x = randn((2, 3, 4, 5), gen, dtype=dtype, device=device, scale=2.0)
    t = index_targets(2, 3, (4, 5), gen, ignore_index=-1).to(device)
    with torch.autocast(device_type=device, dtype=dtype):
        loss = focal_cuda.sigmoid_focal_loss(x, t, reduction="mean", ignore_index=-1, class_dim=1)
    assert loss.dtype == torch.float32
    ref = reference.sigmoid_focal_loss(x.double(), t, reduction="mean", ignore_index=-1, class_dim=1)
    assert_close_scaled(loss, ref, dtype, "loss")


def test_channel_first_equals_classes_last(device, gen):
    """The same positions with the classes moved last give the same loss and the same gradient (permuted)."""
    x = randn((2, 6, 5, 11), gen, device=device)
    t = index_targets(2, 6, (5, 11), gen).to(device)
    go = torch.tensor(1.0, device=device)
    loss, g = loss_and_grad(focal_cuda.sigmoid_focal_loss, x, t, go, reduction="mean", class_dim=1)
    last = x.movedim(1, -1).contiguous()
    loss_last, g_last = loss_and_grad(focal_cuda.sigmoid_focal_loss, last, t, go, reduction="mean")
    torch.testing.assert_close(loss, loss_last, rtol=1e-6, atol=0)
    torch.testing.assert_close(g, g_last.movedim(-1, 1), rtol=1e-6, atol=1e-9)


def test_channel_first_mean_counts_positions(device, gen):
    """"mean" divides by (non-ignored positions) x C, the dense form's count when nothing is ignored."""
    x = randn((2, 3, 4, 5), gen, device=device)
    t = index_targets(2, 3, (4, 5), gen, ignore_frac=0.0).to(device)
    dense = torch.nn.functional.one_hot(t.long(), 4)[..., :3].movedim(-1, 1).to(x.dtype)
    a = focal_cuda.sigmoid_focal_loss(x, t, reduction="mean", class_dim=1)
    b = focal_cuda.sigmoid_focal_loss(x, dense, reduction="mean")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_channel_first_all_ignored_and_empty(device, gen):
    x = randn((2, 3, 4, 5), gen, device=device).requires_grad_()
    t = torch.full((2, 4, 5), -100, device=device)
    loss = focal_cuda.sigmoid_focal_loss(x, t, reduction="mean", class_dim=1)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))
    empty = torch.empty((0, 3, 4, 5), device=device, requires_grad=True)
    for reduction in REDUCTIONS:
        out = focal_cuda.sigmoid_focal_loss(empty, torch.empty((0, 4, 5), dtype=torch.long, device=device),
                                            reduction=reduction, class_dim=1)
        assert out.shape == ((0, 3, 4, 5) if reduction == "none" else ())
        if reduction != "none":
            assert out.item() == 0.0


@pytest.mark.parametrize("bad", [5, -3, 200])
def test_channel_first_out_of_range_target(device, gen, bad):
    x = randn((1, 4, 3, 3), gen, device=device)
    t = torch.zeros((1, 3, 3), dtype=torch.int64, device=device)
    t[0, 1, 2] = bad
    if device == "cpu":
        with pytest.raises(IndexError, match=f"value {bad}"):
            focal_cuda.sigmoid_focal_loss(x, t, reduction="sum", class_dim=1)
    else:  # no synchronisation: NaN at that position, unless the opt-in check is on
        loss = focal_cuda.sigmoid_focal_loss(x, t, reduction="none", class_dim=1)
        assert torch.isnan(loss[0, :, 1, 2]).all() and not torch.isnan(loss[0, :, 0, 0]).any()


def test_channel_first_bad_shapes_name_the_argument(gen):
    x = randn((2, 3, 4, 5), gen)
    with pytest.raises(ValueError, match="class_dim"):
        focal_cuda.sigmoid_focal_loss(x, torch.zeros((2, 4, 5), dtype=torch.long), class_dim=2)
    with pytest.raises(ValueError, match=r"targets\.shape"):
        focal_cuda.sigmoid_focal_loss(x, torch.zeros((2, 3, 4), dtype=torch.long), class_dim=1)


class _CopyCounter(TorchDispatchMode):
    """Records the ops that make a copy of a tensor of the logits' size."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.copies = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if any(k in name for k in ("clone", "contiguous", "copy", "permute", "_to_copy")):
            if isinstance(out, torch.Tensor) and out.numel() == self.numel:
                self.copies.append(name)
        return out


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_channel_first_reads_the_logits_in_place(device, gen, layout):
    x = randn((2, 4, 6, 8), gen, device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    t = index_targets(2, 4, (6, 8), gen).to(device)
    with _CopyCounter(x.numel()) as mode:
        loss = focal_cuda.sigmoid_focal_loss(x, t, reduction="sum", class_dim=1)
        loss.backward()
    assert not mode.copies, mode.copies
    assert x.grad.stride() == x.stride(), "the gradient keeps the logits' layout"


def test_channel_first_deterministic(device, gen):
    x = randn((2, 5, 16, 16), gen, device=device)
    t = index_targets(2, 5, (16, 16), gen).to(device)
    runs = [loss_and_grad(focal_cuda.sigmoid_focal_loss, x, t, torch.tensor(1.0, device=device),
                          reduction="mean", class_dim=1) for _ in range(3)]
    for loss, g in runs[1:]:
        assert torch.equal(loss, runs[0][0]) and torch.equal(g, runs[0][1])


class _FreshForward(torch.autograd.Function):
    """gradcheck runs several backwards through one graph, which the fused op refuses (its gradient buffer
    is consumed in place): re-run the fused forward in every backward instead."""

    @staticmethod
    def forward(ctx, x, kwargs):
        ctx.save_for_backward(x)
        ctx.kwargs = kwargs
        return focal_cuda.sigmoid_focal_loss(x, **kwargs)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xr = x.detach().requires_grad_()
            (g,) = torch.autograd.grad(focal_cuda.sigmoid_focal_loss(xr, **ctx.kwargs), xr, grad)
        return g, None


@pytest.mark.parametrize("normalizer", [None, "per_image"])
def test_channel_first_gradcheck(device, gen, normalizer):
    x = randn((2, 3, 2, 3), gen, dtype=torch.float64, device=device).requires_grad_()
    t = index_targets(2, 3, (2, 3), gen).to(device)
    kwargs = dict(targets=t, gamma=1.5, reduction="sum", class_dim=1)
    if normalizer:
        kwargs.update(reduction="mean", normalizer=torch.tensor([2.0, 0.5], dtype=torch.float64, device=device))
    assert torch.autograd.gradcheck(lambda v: _FreshForward.apply(v, kwargs), (x,), eps=1e-6, atol=1e-7)


def test_channel_first_opcheck(device, gen):
    x = randn((2, 3, 4, 5), gen, device=device)
    t = index_targets(2, 3, (4, 5), gen).to(device)
    torch.library.opcheck(torch.ops.focal_cuda.sigmoid_focal_loss_forward.default,
                          (x, t, 0.25, 2.0, -100, 1, None, True), {"class_dim": 1})


def test_channel_first_compiles(device, gen):
    x = randn((2, 3, 4, 5), gen, device=device)
    t = index_targets(2, 3, (4, 5), gen).to(device)

    def step(v):
        return focal_cuda.sigmoid_focal_loss(v, t, reduction="mean", class_dim=1)

    xe = x.clone().requires_grad_()
    step(xe).backward()
    xc = x.clone().requires_grad_()
    torch.compile(step, fullgraph=True)(xc).backward()
    torch.testing.assert_close(xc.grad, xe.grad)


def test_module_class_dim(device, gen):
    x = randn((2, 3, 4, 5), gen, device=device)
    t = index_targets(2, 3, (4, 5), gen).to(device)
    m = focal_cuda.FusedFocalLoss(mode="sigmoid", alpha=0.25, reduction="sum", class_dim=1)
    torch.testing.assert_close(m(x, t), focal_cuda.sigmoid_focal_loss(x, t, 0.25, reduction="sum", class_dim=1))
    with pytest.raises(ValueError, match="class_dim"):
        focal_cuda.FusedFocalLoss(mode="softmax", class_dim=1)


# ============================================================================ dense targets in place


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dense_channels_last_in_place(device, gen, dtype):
    x = randn((2, 6, 5, 7), gen, dtype=dtype, device=device).to(memory_format=torch.channels_last)
    y = (torch.rand(x.shape, generator=gen) < 0.2).to(dtype).to(device).contiguous(
        memory_format=torch.channels_last)
    x.requires_grad_()
    with _CopyCounter(x.numel()) as mode:
        loss = focal_cuda.sigmoid_focal_loss(x, y, reduction="none")
        loss.backward(torch.ones_like(loss))
    assert not mode.copies, mode.copies
    assert loss.stride() == x.stride() and x.grad.stride() == x.stride()
    ref_loss, ref_g = reference_loss_and_grad(x, y, torch.ones(x.shape, dtype=dtype, device=device), reduction="none")
    assert_close_scaled(loss.detach(), ref_loss, dtype, "loss")
    assert_close_scaled(x.grad, ref_g, dtype, "grad")


# ============================================================================ per-image normalizers


@pytest.mark.parametrize("form", ["index", "dense", "channel_first", "channels_last_dense"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_per_image_normalizer(device, gen, dtype, form):
    """normalizer of shape (N,): sum over images of (image's summed loss) / normalizer[image], folded into
    the forward gradient for every dtype (float16 included)."""
    n = 3
    if form == "index":
        x = randn((n, 40, 7), gen, dtype=dtype, device=device, scale=2.0)
        t = torch.randint(0, 8, (n, 40), generator=gen).to(device)
        t[0, :5] = -100
        kwargs = {}
    elif form == "dense":
        x = randn((n, 40, 7), gen, dtype=dtype, device=device, scale=2.0)
        t = (torch.rand(x.shape, generator=gen) < 0.1).to(dtype).to(device)
        kwargs = {}
    elif form == "channel_first":
        x = randn((n, 5, 6, 7), gen, dtype=dtype, device=device, scale=2.0)
        t = index_targets(n, 5, (6, 7), gen).to(device)
        kwargs = dict(class_dim=1)
    else:
        x = randn((n, 5, 6, 7), gen, dtype=dtype, device=device, scale=2.0).to(memory_format=torch.channels_last)
        t = (torch.rand(x.shape, generator=gen) < 0.1).to(dtype).to(device).contiguous(
            memory_format=torch.channels_last)
        kwargs = {}
    normalizer = torch.tensor([3.0, 1.0, 7.5], device=device)
    go = torch.tensor(0.5, dtype=dtype, device=device)
    loss, g = loss_and_grad(focal_cuda.sigmoid_focal_loss, x, t, go, reduction="mean", normalizer=normalizer,
                            **kwargs)
    ref_loss, ref_g = reference_loss_and_grad(x, t, go, reduction="mean", normalizer=normalizer.double(), **kwargs)
    assert_close_scaled(loss, ref_loss, dtype, "loss")
    assert_close_scaled(g, ref_g, dtype, "grad")


def test_per_image_normalizer_checks(gen):
    x = randn((3, 10, 4), gen)
    t = torch.randint(0, 5, (3, 10))
    with pytest.raises(ValueError, match=r"normalizer\.shape"):
        focal_cuda.sigmoid_focal_loss(x, t, reduction="mean", normalizer=torch.ones(4))
    with pytest.raises(ValueError, match="reduction='mean'"):
        focal_cuda.sigmoid_focal_loss(x, t, reduction="sum", normalizer=torch.ones(3))


# ============================================================================ alpha without a host sync


def test_device_scalar_alpha_is_a_broadcast_weight(device, gen):
    """A 0-dim tensor alpha on the logits' device is read there (a stride-0 view of one weight per class)."""
    x = randn((6, 5), gen, device=device)
    t = torch.randint(0, 5, (6,), generator=gen).to(device)
    a = focal_cuda.softmax_focal_loss(x, t, alpha=torch.tensor(0.3, device=device))
    b = focal_cuda.softmax_focal_loss(x, t, alpha=0.3)
    torch.testing.assert_close(a, b)


def test_list_alpha_is_cached(device):
    from focal_cuda import functional

    x = torch.randn(4, 3, device=device)
    t = torch.tensor([0, 1, 2, 1], device=device)
    functional._CLASS_WEIGHT_CACHE.clear()
    focal_cuda.softmax_focal_loss(x, t, alpha=[0.1, 0.2, 0.7])
    first = next(iter(functional._CLASS_WEIGHT_CACHE.values()))
    focal_cuda.softmax_focal_loss(x, t, alpha=[0.1, 0.2, 0.7])
    assert len(functional._CLASS_WEIGHT_CACHE) == 1
    assert next(iter(functional._CLASS_WEIGHT_CACHE.values())) is first
