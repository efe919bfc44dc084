"""focal_cuda.softmax_focal_loss against the float64 reference (SPEC.md, "Softmax focal loss").

Every comparison goes through conftest.assert_close_to_reference: fused loss and gradient
(for a random upstream gradient) against focal_cuda.reference evaluated in float64 on the
very same, already rounded, input values.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CUDA,
    DEVICES,
    FLOAT_DTYPES,
    REDUCTIONS,
    assert_close_scaled,
    assert_close_to_reference,
    closed_form_grad,
    fused_loss_and_grad,
    make_alpha,
    make_target,
    randn,
    reference_loss_and_grad,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import focal_cuda
from focal_cuda import reference
from focal_cuda.functional import _FLOAT32_LOSS_DEVICES

OP = torch.ops.focal_cuda
REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}

# ============================================================================ shapes, layouts, dtypes

SHAPES = [(1, 2), (3, 5), (7, 3), (5, 4099), (1, 70000), (4, 6, 9), (2, 19, 5, 7), (2, 3, 4, 5, 6), (3, 1, 5)]


@pytest.mark.parametrize("gamma", [2.0, 0.5])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_shapes(device, gen, shape, reduction, gamma):
    x = randn(shape, gen, device=device, scale=2.0)
    t = make_target(shape, gen, device=device, ignore_frac=0.2)
    assert_close_to_reference(x, t, gen, gamma=gamma, alpha=make_alpha("tensor", shape[1], gen, device),
                              reduction=reduction)


def _layout(kind: str, gen, device, dtype=torch.float32) -> torch.Tensor:
    def r(*shape):
        return randn(shape, gen, device=device, dtype=dtype, scale=2.0)

    if kind == "transposed":  # (C, N).t()
        return r(6, 9).t()
    if kind == "sliced_classes":  # every other column: class stride 2
        return r(9, 12)[:, ::2]
    if kind == "sliced_rows":
        return r(18, 6)[::2]
    if kind == "storage_offset":
        return r(10, 6, 5)[1:]
    if kind == "channels_last":
        return r(3, 5, 4, 6).contiguous(memory_format=torch.channels_last)
    if kind == "channels_last_3d":
        return r(2, 5, 3, 4, 3).contiguous(memory_format=torch.channels_last_3d)
    if kind == "expanded_spatial":  # stride 0 along H
        return r(3, 5, 1, 6).expand(3, 5, 4, 6)
    if kind == "expanded_batch":  # stride 0 along N
        return r(1, 5, 4).expand(3, 5, 4)
    if kind == "permuted_spatial":  # (N, C, W, H) -> (N, C, H, W)
        return r(3, 5, 6, 4).permute(0, 1, 3, 2)
    if kind == "permuted_nc":  # class-major storage
        return r(5, 3, 4).permute(1, 0, 2)
    if kind == "non_collapsible":  # spatial dims that do not fold into one stride
        return r(3, 5, 8, 6)[:, :, ::2, 1:5]
    if kind == "spatial_outer":  # dense, but stored (H, N, C, W): no (N, C, S) view
        return r(4, 3, 5, 6).permute(1, 2, 0, 3)
    if kind == "unsqueezed":  # size-1 spatial dim with an arbitrary stride, transposed classes
        return r(6, 3, 4).permute(1, 0, 2)[:, :, None, :]
    raise ValueError(kind)


LAYOUTS = ["transposed", "sliced_classes", "sliced_rows", "storage_offset", "channels_last", "channels_last_3d",
           "expanded_spatial", "expanded_batch", "permuted_spatial", "permuted_nc", "non_collapsible", "spatial_outer",
           "unsqueezed"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_non_contiguous_input(device, gen, kind, reduction):
    x = _layout(kind, gen, device)
    assert not x.is_contiguous() or x.storage_offset() > 0
    t = make_target(x.shape, gen, device=device, ignore_frac=0.2)
    go = randn(t.shape if reduction == "none" else (), gen, device=device)
    loss, g = assert_close_to_reference(x, t, grad_output=go, gamma=1.5, alpha=0.5, reduction=reduction)
    # and the same values laid out contiguously give the same result
    loss_c, g_c = fused_loss_and_grad(x.contiguous(), t, go, gamma=1.5, alpha=0.5, reduction=reduction)
    assert_close_scaled(loss, loss_c.double(), x.dtype, "non-contiguous vs contiguous loss")
    assert_close_scaled(g, g_c.double(), x.dtype, "non-contiguous vs contiguous grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_non_contiguous_target(device, gen, reduction):
    x = randn((4, 6, 5, 3), gen, device=device)
    t = make_target((4, 6, 10, 6), gen, device=device, ignore_frac=0.2)[:, ::2, 1:4]
    assert not t.is_contiguous()
    assert_close_to_reference(x, t, gen, gamma=2.0, reduction=reduction)
    t_u8 = make_target((4, 6, 5, 6), gen, device=device, dtype=torch.uint8, ignore_index=255, ignore_frac=0.2)
    t_u8 = t_u8[:, :, ::2]
    assert not t_u8.is_contiguous()
    assert_close_to_reference(x, t_u8, gen, gamma=2.0, reduction=reduction, ignore_index=255)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(6, 11, 5), (37, 10), (4096, 3)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dtypes(device, gen, dtype, shape, reduction, gamma):
    # float16 / bfloat16: the reference sees the same rounded values, upcast to float64
    x = randn(shape, gen, device=device, dtype=dtype, scale=3.0)
    t = make_target(shape, gen, device=device, ignore_frac=0.1)
    assert_close_to_reference(x, t, gen, gamma=gamma, alpha=make_alpha("list", shape[1], gen), reduction=reduction)


# ============================================================================ gamma, alpha, targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha_kind", [None, "float", "list", "tensor"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.7])
def test_gamma_alpha(device, gen, gamma, alpha_kind, reduction, dtype):
    x = randn((9, 7, 4), gen, device=device, dtype=dtype, scale=2.0)
    t = make_target(x.shape, gen, device=device, ignore_frac=0.25)
    alpha = make_alpha(alpha_kind, 7, gen, device)
    if alpha_kind == "tensor":
        alpha = alpha.to(dtype)
    assert_close_to_reference(x, t, gen, gamma=gamma, alpha=alpha, reduction=reduction)


@pytest.mark.parametrize("alpha_dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_alpha_tensor_dtypes(device, gen, dtype, alpha_dtype):
    x = randn((8, 5, 3), gen, device=device, dtype=dtype)
    t = make_target(x.shape, gen, device=device, ignore_frac=0.2)
    alpha = make_alpha("tensor", 5, gen, device).to(alpha_dtype)
    assert_close_to_reference(x, t, gen, gamma=2.0, alpha=alpha, reduction="sum")
    # a 0-dim tensor alpha is a scalar weight
    a0 = torch.tensor(0.3, dtype=alpha_dtype, device=device)
    assert_close_to_reference(x, t, gen, gamma=2.0, alpha=a0, reduction="none")


def test_alpha_weights_target_class(gen):
    """alpha[y] weights by the *target* class: a one-hot alpha keeps exactly the rows of that class."""
    x = randn((50, 4), gen)
    t = make_target(x.shape, gen)
    loss = focal_cuda.softmax_focal_loss(x, t, alpha=[0.0, 0.0, 1.0, 0.0], reduction="none")
    plain = focal_cuda.softmax_focal_loss(x, t, reduction="none")
    assert (t == 2).any() and (t != 2).any()
    torch.testing.assert_close(loss, torch.where(t == 2, plain, torch.zeros_like(plain)))


TARGET_CASES = [
    (torch.uint8, 255),
    (torch.uint8, 0),
    (torch.int16, -100),
    (torch.int16, -1),
    (torch.int32, -100),
    (torch.int32, 3),
    (torch.int64, -100),
    (torch.int64, -1),
    (torch.int64, 2**40),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_dtype,ignore_index", TARGET_CASES, ids=lambda v: str(v))
def test_target_dtypes_and_ignore_index(device, gen, target_dtype, ignore_index, reduction):
    x = randn((5, 6, 7), gen, device=device, scale=2.0)
    t64 = make_target(x.shape, gen, ignore_index=ignore_index, ignore_frac=0.3)
    t = t64.to(target_dtype).to(device)
    assert torch.equal(t.long().cpu(), t64), "test setup: ignore_index representable in the target dtype"
    kw = dict(gamma=2.0, alpha=0.75, ignore_index=ignore_index, reduction=reduction)
    loss, g = assert_close_to_reference(x, t, gen, grad=False, **kw)
    # consumed as they are: bitwise the same result as int64 targets
    assert torch.equal(loss, focal_cuda.softmax_focal_loss(x, t64.to(device), **kw))
    if reduction == "none":
        ignored = t64.to(device) == ignore_index
        assert ignored.any()
        assert (loss[ignored] == 0).all()
    assert_close_to_reference(x, t, gen, **kw)


def test_uint8_target_default_ignore_index(device, gen):
    """ignore_index=-100 cannot occur in a uint8 target: every element counts."""
    x = randn((6, 4, 5), gen, device=device)
    t = make_target(x.shape, gen, device=device, dtype=torch.uint8)
    loss, _ = assert_close_to_reference(x, t, gen, gamma=2.0, reduction="mean")
    torch.testing.assert_close(loss, focal_cuda.softmax_focal_loss(x, t.long(), gamma=2.0), rtol=0, atol=0)


def test_integer_gamma(device, gen):
    x = randn((6, 4), gen, device=device)
    t = make_target(x.shape, gen, device=device)
    for gamma in (0, 1, 2, 3):
        assert torch.equal(focal_cuda.softmax_focal_loss(x, t, gamma=gamma),
                           focal_cuda.softmax_focal_loss(x, t, gamma=float(gamma)))
    assert_close_to_reference(x, t, gen, gamma=3, reduction="none")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_targets_ignored(device, gen, dtype, reduction):
    x = randn((4, 5, 3), gen, device=device, dtype=dtype).requires_grad_()
    t = torch.full((4, 3), 255, dtype=torch.uint8, device=device)
    alpha = [1.0, 2, 3, 4, 5]
    loss = focal_cuda.softmax_focal_loss(x, t, gamma=0.5, alpha=alpha, ignore_index=255, reduction=reduction)
    expected_shape = (4, 3) if reduction == "none" else ()
    assert loss.shape == expected_shape and loss.dtype == dtype
    assert torch.equal(loss, torch.zeros(expected_shape, dtype=dtype, device=device))
    go = torch.full(expected_shape, 3.0, dtype=dtype, device=device)
    (g,) = torch.autograd.grad(loss, x, go)
    assert torch.isfinite(g).all()
    assert torch.equal(g, torch.zeros_like(g))


# ============================================================================ reductions and upstream gradients


def _grad_output(kind: str, shape, gen, device, dtype):
    if kind == "ones":
        return torch.ones(shape, dtype=dtype, device=device)
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype, device=device)
    if kind == "random":
        return randn(shape, gen, device=device, dtype=dtype)
    if kind == "negative_large":
        return torch.full(shape, -1234.5, dtype=dtype, device=device)
    if kind == "expanded_scalar":  # what loss.sum().backward() sends
        return torch.tensor(1.7, dtype=dtype, device=device).expand(shape)
    if kind == "expanded_rows":
        return randn((1, *shape[1:]), gen, device=device, dtype=dtype).expand(shape)
    if kind == "transposed":
        return randn(shape[::-1], gen, device=device, dtype=dtype).permute(*reversed(range(len(shape))))
    raise ValueError(kind)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("kind", ["ones", "zeros", "random", "negative_large", "expanded_scalar", "expanded_rows",
                                  "transposed"])
def test_reduction_none_grad_output(device, gen, kind, dtype):
    x = randn((6, 5, 4, 3), gen, device=device, dtype=dtype, scale=2.0)
    t = make_target(x.shape, gen, device=device, ignore_frac=0.2)
    go = _grad_output(kind, t.shape, gen, device, dtype)
    assert_close_to_reference(x, t, grad_output=go, gamma=2.0, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", ["ones", "zeros", "random", "negative_large"])
def test_scalar_reduction_grad_output(device, gen, reduction, kind, dtype):
    x = randn((6, 5, 4), gen, device=device, dtype=dtype, scale=2.0)
    t = make_target(x.shape, gen, device=device, ignore_frac=0.2)
    go = _grad_output(kind, (), gen, device, dtype)
    assert_close_to_reference(x, t, grad_output=go, gamma=0.5, alpha=[0.5, 1, 2, 3, 4], reduction=reduction)


def test_loss_backward_convenience(device, gen):
    """loss.backward() (grad_output exactly 1) and loss.sum().backward() on "none"."""
    x = randn((7, 4, 5), gen, device=device).requires_grad_()
    t = make_target(x.shape, gen, device=device, ignore_frac=0.2)
    for reduction in REDUCTIONS:
        x.grad = None
        loss = focal_cuda.softmax_focal_loss(x, t, gamma=2.0, reduction=reduction)
        loss.sum().backward()
        _, ref_g = reference_loss_and_grad(x, t, torch.ones(loss.shape, dtype=torch.float64, device=device),
                                           gamma=2.0, reduction=reduction)
        assert_close_scaled(x.grad, ref_g, x.dtype, reduction)


def test_two_losses_share_input(device, gen):
    x = randn((6, 5, 3), gen, device=device).requires_grad_()
    t1 = make_target(x.shape, gen, device=device)
    t2 = make_target(x.shape, gen, device=device, ignore_frac=0.5)
    total = focal_cuda.softmax_focal_loss(x, t1) + 2 * focal_cuda.softmax_focal_loss(x, t2, gamma=0.5, reduction="sum")
    total = total + (x**2).sum()
    total.backward()
    xr = x.detach().double().requires_grad_()
    ref = reference.softmax_focal_loss(xr, t1) + 2 * reference.softmax_focal_loss(xr, t2, gamma=0.5, reduction="sum")
    (ref + (xr**2).sum()).backward()
    assert_close_scaled(x.grad, xr.grad, x.dtype, "two losses")


def test_mean_divides_by_non_ignored_count(gen):
    """"mean" is sum / non-ignored count, also with per-class alpha (not sum of weights)."""
    x = randn((10, 4), gen)
    t = make_target(x.shape, gen, ignore_frac=0.4)
    n_valid = int((t != -100).sum())
    assert 0 < n_valid < 10
    alpha = [0.1, 0.2, 3.0, 4.0]
    mean = focal_cuda.softmax_focal_loss(x, t, alpha=alpha, reduction="mean")
    total = focal_cuda.softmax_focal_loss(x, t, alpha=alpha, reduction="sum")
    torch.testing.assert_close(mean, total / n_valid)


# ============================================================================ gradcheck, cross entropy


class _FreshForward(torch.autograd.Function):
    """gradcheck runs several backwards through one graph, which a fused op may refuse.

    This wrapper re-runs the fused forward (with gradient) inside every backward, so
    gradcheck's numerical Jacobian (fused forward) is compared with the fused gradient.
    """

    @staticmethod
    def forward(ctx, x, kwargs):
        ctx.save_for_backward(x)
        ctx.kwargs = kwargs
        return focal_cuda.softmax_focal_loss(x, **kwargs)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            (g,) = torch.autograd.grad(focal_cuda.softmax_focal_loss(leaf, **ctx.kwargs), leaf, grad_output)
        return g, None


@pytest.mark.parametrize("alpha_kind", [None, "tensor"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(device, gen, reduction, gamma, alpha_kind):
    x = randn((3, 4, 2), gen, device=device, dtype=torch.float64).requires_grad_()
    t = make_target(x.shape, gen, device=device)
    t[0, 1] = -100
    alpha = make_alpha(alpha_kind, 4, gen, device)
    alpha = alpha.double() if alpha is not None else None
    kwargs = dict(target=t, gamma=gamma, alpha=alpha, reduction=reduction)
    assert torch.autograd.gradcheck(lambda inp: _FreshForward.apply(inp, kwargs), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("ignore_index", [-100, 2])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gamma0_equals_cross_entropy(device, gen, reduction, ignore_index, dtype):
    x = randn((6, 5, 3, 2), gen, device=device, dtype=dtype, scale=3.0).requires_grad_()
    t = make_target(x.shape, gen, device=device, ignore_index=ignore_index, ignore_frac=0.2)
    go = randn(t.shape if reduction == "none" else (), gen, device=device, dtype=dtype)
    loss = focal_cuda.softmax_focal_loss(x, t, gamma=0.0, ignore_index=ignore_index, reduction=reduction)
    (g,) = torch.autograd.grad(loss, x, go)
    ce = F.cross_entropy(x, t, ignore_index=ignore_index, reduction=reduction)
    (g_ce,) = torch.autograd.grad(ce, x, go)
    assert_close_scaled(loss, ce.double(), dtype, "loss vs cross_entropy")
    assert_close_scaled(g, g_ce.double(), dtype, "grad vs cross_entropy")


def test_closed_form_grad_matches_reference_autograd(gen):
    """The test helper used at saturated logits agrees with autograd where autograd is finite."""
    x = randn((8, 6, 3), gen, dtype=torch.float64, scale=3.0)
    t = make_target(x.shape, gen, ignore_frac=0.2)
    alpha = [0.5, 1.0, 2.0, 0.1, 3.0, 1.5]
    for gamma in (0.0, 0.25, 0.5, 2.0, 3.7):
        for reduction in REDUCTIONS:
            go = randn(t.shape if reduction == "none" else (), gen, dtype=torch.float64)
            _, ref_g = reference_loss_and_grad(x, t, go, gamma=gamma, alpha=alpha, reduction=reduction)
            cf = closed_form_grad(x, t, gamma, alpha=alpha, reduction=reduction, grad_output=go)
            torch.testing.assert_close(cf, ref_g, rtol=1e-12, atol=1e-13)


# ============================================================================ numerics


def _saturated_case(dtype, scale, gen, device):
    """Logits at +-scale: rows with p_y == 1 exactly, near-ties, p_y -> 0 and an ignored extreme row.

    Row losses stay within the dtype's range (the largest is `scale`), so the reference,
    rounded to the dtype, is finite everywhere.
    """
    N, C = 12, 7
    u = torch.rand((N, C), generator=gen, dtype=torch.float64) * 2 - 1
    x = u * (scale / 2)
    t = torch.randint(0, C, (N,), generator=gen)
    other = (t + 1) % C
    for r in range(0, 5):  # p_y == 1 in any float format
        x[r, t[r]] = scale
    x[5] = -scale  # uniform: p_y = 1/C
    for r, d in ((6, 20.0), (7, 60.0)):  # 1 - p tiny but not zero
        x[r] = -scale
        x[r, t[r]] = 100.0
        x[r, other[r]] = 100.0 - d
    for r in (8, 9):  # tie at the top: p_y = 1/2
        x[r, t[r]] = scale
        x[r, other[r]] = scale
    x[10, t[10]] = 0.0  # p_y -> 0: loss = scale
    x[10, other[10]] = scale
    x[11, t[11]] = -scale  # ignored
    x[11, other[11]] = scale
    t[11] = -100
    return x.to(dtype=dtype, device=device), t.to(device)


SATURATION = [
    (torch.float32, 1e4),
    (torch.float32, 1e38),
    (torch.float16, 6e4),
    (torch.float16, torch.finfo(torch.float16).max),
    (torch.bfloat16, 1e38),
    (torch.float64, 1e300),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma", [0.25, 0.5, 2.0])
@pytest.mark.parametrize("dtype,scale", SATURATION, ids=lambda v: str(v))
def test_saturated_logits(device, gen, dtype, scale, gamma, reduction):
    x, t = _saturated_case(dtype, scale, gen, device)
    go = randn(t.shape if reduction == "none" else (), gen, device=device, dtype=dtype)
    loss, g = fused_loss_and_grad(x, t, go, gamma=gamma, reduction=reduction)
    ref_loss, _ = reference_loss_and_grad(x, t, None, gamma=gamma, reduction=reduction)
    assert torch.isfinite(ref_loss.to(dtype)).all(), "test setup: reference representable"
    assert torch.isfinite(loss).all(), f"non-finite loss {loss}"
    assert torch.isfinite(g).all(), f"non-finite gradient {g}"
    if reduction == "none":  # moderate rows and the huge row compared at their own scale
        assert_close_scaled(loss[:10], ref_loss[:10], dtype, "loss rows 0-9")
        assert_close_scaled(loss[10:], ref_loss[10:], dtype, "loss rows 10-11")
    else:
        assert_close_scaled(loss, ref_loss, dtype, "loss")
    expected_g = closed_form_grad(x, t, gamma, reduction=reduction, grad_output=go)
    assert_close_scaled(g, expected_g, dtype, "grad")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_loss_beyond_dtype_range_is_inf(device, dtype):
    """A "sum" beyond the dtype's range rounds to inf, as a conversion does (torch < 2.8's Tensor.fill_ raised
    "value cannot be converted to type at::Half without overflow" there); "mean" of the same stays finite."""
    big = 1e4 if dtype == torch.float16 else 1e38
    n = 10 if dtype == torch.float16 else 40  # per-position loss ~ big: the sum is beyond 65504 / 3.4e38
    x = torch.zeros((n, 2), dtype=torch.float64)
    x[:, 1] = big  # target 0: log p_0 = -big
    x = x.to(dtype=dtype, device=device).requires_grad_()
    t = torch.zeros(n, dtype=torch.long, device=device)
    total = focal_cuda.softmax_focal_loss(x, t, gamma=0.0, reduction="sum")
    assert total.dtype == dtype and torch.isinf(total) and total > 0, total
    total.backward()
    assert torch.isfinite(x.grad).all()
    mean = focal_cuda.softmax_focal_loss(x.detach(), t, gamma=0.0, reduction="mean")
    assert_close_scaled(mean, reference.softmax_focal_loss(x.detach().double(), t, gamma=0.0), dtype, "mean")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nan_and_inf_propagate(device, gen, reduction):
    x = randn((6, 5), gen, device=device)
    t = make_target(x.shape, gen, device=device)
    x[1, 2] = math.nan  # counted row with a NaN logit
    x[3, 0] = math.nan  # ignored row with a NaN logit
    t[3] = -100
    x[4, t[4]] = math.inf  # +inf logit: log_softmax is NaN
    x[0, (int(t[0]) + 1) % 5] = -math.inf  # -inf at another class: a masked class, everything stays finite
    x[2, t[2]] = -math.inf  # -inf at the target: loss +inf
    go = randn(t.shape if reduction == "none" else (), gen, device=device)
    loss, g = fused_loss_and_grad(x, t, go, gamma=0.5, reduction=reduction)
    ref_loss, ref_g = reference_loss_and_grad(x, t, go, gamma=0.5, reduction=reduction)
    if reduction == "none":
        assert torch.isnan(loss[1]) and torch.isnan(loss[4])
    else:
        assert torch.isnan(loss)
    assert_close_scaled(loss, ref_loss, x.dtype, "NaN-safe loss")
    if reduction == "none":
        assert torch.isfinite(loss[0]) and loss[2] == math.inf
    clean = [0, 5]  # rows without NaN / +inf: their gradient is unaffected
    if reduction == "none":
        assert_close_scaled(g[clean], ref_g[clean], x.dtype, "grad of clean rows")
    assert g.shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deterministic(device, gen, reduction, dtype):
    x = randn((256, 19, 33), gen, device=device, dtype=dtype, scale=2.0)
    t = make_target(x.shape, gen, device=device, ignore_frac=0.1)
    runs = [fused_loss_and_grad(x, t, torch.ones((), dtype=dtype, device=device), gamma=0.5, reduction=reduction)
            for _ in range(3)]
    for loss, g in runs[1:]:
        assert torch.equal(loss, runs[0][0])
        assert torch.equal(g, runs[0][1])
    # a forward without gradient gives bitwise the same loss
    assert torch.equal(focal_cuda.softmax_focal_loss(x, t, gamma=0.5, reduction=reduction), runs[0][0])


EMPTY_SHAPES = [(0, 5), (0, 5, 3), (2, 5, 0), (2, 5, 0, 3), (2, 5, 3, 0), (0, 5, 0, 0)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_empty(device, gen, shape, reduction):
    x = randn(shape, gen, device=device).requires_grad_()
    t = torch.zeros((shape[0], *shape[2:]), dtype=torch.int64, device=device)
    loss = focal_cuda.softmax_focal_loss(x, t, reduction=reduction)
    assert loss.dtype == x.dtype
    if reduction == "none":
        assert loss.shape == t.shape and loss.numel() == 0
    else:
        assert loss.shape == () and loss.item() == 0.0
    loss.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        assert focal_cuda.softmax_focal_loss(x, t, reduction=reduction).shape == loss.shape


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_grad(device, gen, reduction):
    x = randn((5, 4, 3), gen, device=device).requires_grad_()
    t = make_target(x.shape, gen, device=device, ignore_frac=0.2)
    with_grad = focal_cuda.softmax_focal_loss(x, t, gamma=0.5, reduction=reduction)
    with torch.no_grad():
        without = focal_cuda.softmax_focal_loss(x, t, gamma=0.5, reduction=reduction)
    assert not without.requires_grad and without.grad_fn is None
    assert torch.equal(without, with_grad.detach())
    no_req = focal_cuda.softmax_focal_loss(x.detach(), t, gamma=0.5, reduction=reduction)
    assert not no_req.requires_grad
    assert torch.equal(no_req, with_grad.detach())
    with torch.inference_mode():
        inf = focal_cuda.softmax_focal_loss(x, t, gamma=0.5, reduction=reduction)
    assert torch.equal(inf, with_grad.detach())


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["contiguous", "channels_last", "transposed"])
def test_outputs_fully_written(device, gen, kind, reduction):
    """With uninitialised memory filled with NaN, every loss / gradient element must still match."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        assert torch.isnan(torch.empty(4, device=device)).all()  # the poisoning is active
        x = {"contiguous": lambda: randn((9, 7, 5, 3), gen, device=device),
             "channels_last": lambda: _layout("channels_last", gen, device),
             "transposed": lambda: _layout("transposed", gen, device)}[kind]()
        t = make_target(x.shape, gen, device=device, ignore_frac=0.5)
        assert_close_to_reference(x, t, gen, gamma=2.0, reduction=reduction)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_second_backward_is_correct_or_raises(device, gen, reduction):
    x = randn((5, 4, 3), gen, device=device).requires_grad_()
    t = make_target(x.shape, gen, device=device, ignore_frac=0.2)
    go = randn(t.shape if reduction == "none" else (), gen, device=device)
    loss = focal_cuda.softmax_focal_loss(x, t, gamma=0.5, reduction=reduction)
    loss.backward(go, retain_graph=True)
    _, ref_g = reference_loss_and_grad(x, t, go, gamma=0.5, reduction=reduction)
    assert_close_scaled(x.grad, ref_g, x.dtype, "first backward")
    try:
        loss.backward(go)
    except RuntimeError:
        assert_close_scaled(x.grad, ref_g, x.dtype, "gradient after a refused second backward")
    else:
        assert_close_scaled(x.grad, 2 * ref_g, x.dtype, "accumulated second backward")


def test_second_backward_error_is_clear(device, gen):
    """If a second backward through the same graph is refused, the message says why (SPEC: "a clear error")."""
    x = randn((5, 4), gen, device=device).requires_grad_()
    t = make_target(x.shape, gen, device=device)
    loss = focal_cuda.softmax_focal_loss(x, t)
    loss.backward(retain_graph=True)
    try:
        loss.backward()
    except RuntimeError as e:
        assert re.search(r"(?i)(retain_graph|second backward|already (been )?(consumed|used|run))", str(e)), str(e)


def test_double_backward_raises_or_is_correct(device, gen):
    """create_graph=True (gradient penalty): a clear error, or a correct second derivative; never a gradient
    that silently does not depend on the input (the penalty would drop out of training without a word)."""
    x = randn((5, 4), gen, device=device, dtype=torch.float64).requires_grad_()
    t = make_target(x.shape, gen, device=device)
    try:
        loss = focal_cuda.softmax_focal_loss(x, t, gamma=2.0)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        penalty = (g**2).sum()
        (gg,) = torch.autograd.grad(penalty, x)
    except RuntimeError:
        return
    xr = x.detach().requires_grad_()
    (gr,) = torch.autograd.grad(reference.softmax_focal_loss(xr, t, gamma=2.0), xr, create_graph=True)
    (ggr,) = torch.autograd.grad((gr**2).sum(), xr)
    torch.testing.assert_close(gg, ggr)


def test_gradient_penalty_not_silently_dropped(device, gen):
    x = randn((5, 4), gen, device=device, dtype=torch.float64).requires_grad_()
    t = make_target(x.shape, gen, device=device)
    try:
        loss = focal_cuda.softmax_focal_loss(x, t, gamma=2.0)
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        total = (x**2).sum() + (g**2).sum()
        total.backward()
    except RuntimeError:
        return
    xr = x.detach().requires_grad_()
    (gr,) = torch.autograd.grad(reference.softmax_focal_loss(xr, t, gamma=2.0), xr, create_graph=True)
    ((xr**2).sum() + (gr**2).sum()).backward()
    torch.testing.assert_close(x.grad, xr.grad)


# ============================================================================ module, compile, autocast


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha_kind", [None, "float", "list", "tensor"])
def test_module_equals_functional(device, gen, alpha_kind, reduction, dtype):
    x = randn((6, 5, 4), gen, device=device, dtype=dtype)
    t = make_target(x.shape, gen, device=device, ignore_index=1, ignore_frac=0.2)
    alpha = make_alpha(alpha_kind, 5, gen, device)
    kw = dict(gamma=1.5, alpha=alpha, ignore_index=1, reduction=reduction)
    module = focal_cuda.FusedFocalLoss(**kw).to(device)
    go = randn(t.shape if reduction == "none" else (), gen, device=device, dtype=dtype)
    xm = x.clone().requires_grad_()
    out = module(xm, t)
    (gm,) = torch.autograd.grad(out, xm, go)
    func, gf = fused_loss_and_grad(x, t, go, **kw)
    assert_close_scaled(out, func.double(), dtype, "module loss vs functional")
    assert_close_scaled(gm, gf.double(), dtype, "module grad vs functional")
    assert_close_to_reference(x, t, grad_output=go, **kw)


def test_module_defaults_and_state(gen):
    m = focal_cuda.FusedFocalLoss()
    x = randn((6, 3), gen)
    t = make_target(x.shape, gen)
    torch.testing.assert_close(m(x, t), reference.softmax_focal_loss(x, t))  # gamma 2, mean
    m = focal_cuda.FusedFocalLoss(alpha=[1.0, 2.0, 3.0])
    assert "class_weight" in m.state_dict()
    torch.testing.assert_close(m(x, t), reference.softmax_focal_loss(x, t, alpha=[1.0, 2.0, 3.0]))
    with pytest.raises((ValueError, TypeError), match=r"reduction.*avg"):
        focal_cuda.FusedFocalLoss(reduction="avg")


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(gamma=-1.0), ValueError, r"gamma.*-1\.0"),
    (dict(gamma=float("nan")), ValueError, r"gamma.*nan"),
    (dict(gamma="2"), ValueError, r"gamma.*'2'"),
    (dict(gamma=True), ValueError, r"gamma.*True"),
    (dict(reduction="avg"), ValueError, r"reduction.*avg"),
    (dict(reduction=None), ValueError, r"reduction.*None"),
    (dict(mode="sigmodi"), ValueError, r"mode.*sigmodi"),
    (dict(mode=None), ValueError, r"mode.*None"),
    (dict(alpha=float("inf")), ValueError, r"alpha.*inf"),
    (dict(alpha="0.25"), TypeError, r"alpha.*'0\.25'"),
    (dict(alpha=[]), ValueError, r"alpha.*one weight per class"),
    (dict(alpha=[[1.0, 2.0]]), ValueError, r"alpha.*shape \(1, 2\)"),
    (dict(alpha=[1.0, float("nan")]), ValueError, r"alpha.*finite.*nan"),
    (dict(alpha=["a", "b"]), TypeError, r"alpha.*'a'"),
    (dict(alpha=torch.ones(3, requires_grad=True)), ValueError, r"alpha.*requires_grad"),
    (dict(alpha=[1.0, 2.0], mode="sigmoid"), ValueError, r"sigmoid.*alpha"),
    (dict(ignore_index=1.5), TypeError, r"ignore_index.*1\.5"),
    (dict(ignore_index="255"), TypeError, r"ignore_index.*'255'"),
    (dict(ignore_index=True), TypeError, r"ignore_index.*True"),
], ids=repr)
def test_module_bad_argument_raises_at_construction(kwargs, error, pattern):
    """As with torch.nn's losses, a bad argument fails when the module is made, not at its first forward."""
    with pytest.raises(error, match=pattern):
        focal_cuda.FusedFocalLoss(**kwargs)


def test_module_argument_forms(gen):
    """Integer-valued and 0-dim tensor arguments are taken as their numbers; integer weights as floats."""
    x = randn((6, 3), gen)
    t = make_target(x.shape, gen)
    expected = focal_cuda.softmax_focal_loss(x, t, gamma=2.0, alpha=0.5, ignore_index=1)
    m = focal_cuda.FusedFocalLoss(gamma=2, alpha=torch.tensor(0.5), ignore_index=torch.tensor(1))
    assert m.alpha_scalar == 0.5 and m.ignore_index == 1 and m.class_weight is None
    torch.testing.assert_close(m(x, t), expected)
    m = focal_cuda.FusedFocalLoss(alpha=torch.tensor([1, 2, 3]))
    assert m.class_weight.dtype == torch.float64
    torch.testing.assert_close(m(x, t), focal_cuda.softmax_focal_loss(x, t, alpha=[1.0, 2.0, 3.0]))


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile(device, gen, backend, reduction):
    torch._dynamo.reset()
    x0 = randn((4, 5, 3), gen, device=device)
    t = make_target(x0.shape, gen, device=device, ignore_frac=0.2)
    alpha = make_alpha("tensor", 5, gen, device)

    def fn(x, t):
        loss = focal_cuda.softmax_focal_loss(x * 1.5, t, gamma=0.5, alpha=alpha, reduction=reduction)
        return (loss * loss.detach().new_tensor(2.0)).sum() + x.square().sum() * 0.01

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    xe, xc = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    eager = fn(xe, t)
    eager.backward()
    out = compiled(xc, t)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(xc.grad, xe.grad)
    # the compiled function, run again (cached graph), still matches
    xc.grad = None
    compiled(xc, t).backward()
    torch.testing.assert_close(xc.grad, xe.grad)


def test_autocast_bf16(device, gen):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 7).to(device)
    feat = randn((32, 16), gen, device=device)
    t = make_target((32, 7), gen, device=device, ignore_frac=0.1)
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = lin(feat)
        assert logits.dtype == torch.bfloat16
        logits.retain_grad()
        loss = focal_cuda.softmax_focal_loss(logits, t, gamma=2.0, reduction="mean")
    # float32 under autocast, as F.cross_entropy (CUDA: once its kernels take loss_dtype)
    assert loss.dtype == (torch.float32 if device in _FLOAT32_LOSS_DEVICES else torch.bfloat16)
    loss.backward()
    ref_loss, ref_g = reference_loss_and_grad(logits, t, torch.ones((), dtype=torch.float64, device=device),
                                              gamma=2.0, reduction="mean")
    assert_close_scaled(loss, ref_loss, torch.bfloat16, "autocast loss")
    assert logits.grad.dtype == torch.bfloat16
    assert_close_scaled(logits.grad, ref_g, torch.bfloat16, "autocast logits grad")
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all() and lin.weight.grad.abs().sum() > 0


# ============================================================================ errors


def _bad_call(case: str, device: str, gen):
    x = randn((4, 5, 3), gen, device=device)
    t = make_target(x.shape, gen, device=device)
    f = focal_cuda.softmax_focal_loss
    shape = r"(\[{0}\]|\({0},?\))"
    cases = {
        "input_1d": (lambda: f(x[:, 0, 0], t[:, 0]), r"input.*" + shape.format("4")),
        "input_0d": (lambda: f(x[0, 0, 0], t[0, 0]), r"input.*" + shape.format("")),
        "input_int": (lambda: f(x.long(), t), r"input.*(Long|int64)"),
        "input_bool": (lambda: f(x > 0, t), r"input.*(Bool|bool)"),
        "target_shape": (lambda: f(x, t[:, :2]), r"target.*" + shape.format("4, 2")),
        "target_extra_dim": (lambda: f(x, t.unsqueeze(-1)), r"target.*" + shape.format("4, 3, 1")),
        "target_float": (lambda: f(x, t.float()), r"target.*(Float|float32)"),
        "target_bool": (lambda: f(x, t > 0), r"target.*(Bool|bool)"),
        "alpha_length": (lambda: f(x, t, alpha=[1.0, 2.0]), r"alpha.*\b2\b"),
        "alpha_2d": (lambda: f(x, t, alpha=torch.ones(5, 1, device=device)), r"alpha.*5, 1"),
        "alpha_requires_grad": (lambda: f(x, t, alpha=torch.ones(5, device=device, requires_grad=True)),
                                r"alpha.*requires_grad"),
        "gamma_negative": (lambda: f(x, t, gamma=-1.0), r"gamma.*-1(\.0)?"),
        "gamma_nan": (lambda: f(x, t, gamma=math.nan), r"gamma.*nan"),
        "gamma_inf": (lambda: f(x, t, gamma=math.inf), r"gamma.*inf"),
        "gamma_neg_inf": (lambda: f(x, t, gamma=-math.inf), r"gamma.*-inf"),
        "reduction_avg": (lambda: f(x, t, reduction="avg"), r"reduction.*avg"),
        "reduction_none_obj": (lambda: f(x, t, reduction=None), r"reduction.*None"),
    }
    return cases[case]


BAD_CASES = ["input_1d", "input_0d", "input_int", "input_bool", "target_shape", "target_extra_dim", "target_float",
             "target_bool", "alpha_length", "alpha_2d", "alpha_requires_grad", "gamma_negative", "gamma_nan",
             "gamma_inf", "gamma_neg_inf", "reduction_avg", "reduction_none_obj"]
ERRORS = (ValueError, TypeError, IndexError, RuntimeError)


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_argument(device, gen, case):
    call, pattern = _bad_call(case, device, gen)
    with pytest.raises(ERRORS, match=pattern):
        call()


@pytest.mark.parametrize("bad_value", [5, 7, -1, -100])
def test_class_index_out_of_range(device, gen, bad_value):
    x = randn((4, 5, 3), gen, device=device)
    t = make_target(x.shape, gen, device=device)
    t[2, 1] = bad_value
    ignore_index = -7
    if device == "cpu":
        with pytest.raises(IndexError, match=rf"target.*{bad_value}"):
            focal_cuda.softmax_focal_loss(x, t, ignore_index=ignore_index)
    else:
        assert torch.isnan(focal_cuda.softmax_focal_loss(x, t, ignore_index=ignore_index, reduction="mean"))


def test_class_index_minus_one_ignored_when_ignore_index_is_minus_one(device, gen):
    x = randn((4, 5), gen, device=device)
    t = make_target(x.shape, gen, device=device)
    t[1] = -1
    assert_close_to_reference(x, t, gen, ignore_index=-1, reduction="mean")


def test_uint8_value_out_of_range(gen):
    x = randn((4, 5), gen)
    t = torch.tensor([0, 200, 1, 2], dtype=torch.uint8)
    with pytest.raises(IndexError, match=r"target.*200"):
        focal_cuda.softmax_focal_loss(x, t, ignore_index=255)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_device_mismatch(gen):
    x = randn((4, 5), gen, device="cuda")
    t = make_target(x.shape, gen)
    with pytest.raises(ERRORS, match=r"(?s)(target|input).*(cuda|cpu)"):
        focal_cuda.softmax_focal_loss(x, t)
    with pytest.raises(ERRORS, match=r"(?s)(target|input).*(cuda|cpu)"):
        focal_cuda.softmax_focal_loss(x.cpu(), t.cuda())


@pytest.mark.parametrize(
    "args,pattern",
    [
        (dict(gamma=-1.0), r"gamma.*-1"),
        (dict(gamma=math.nan), r"gamma.*nan"),
        (dict(reduction=7), r"reduction.*7"),
        (dict(class_weight=3), r"(alpha|class_weight).*\b3\b"),
    ],
    ids=["gamma", "gamma_nan", "reduction", "class_weight"],
)
def test_op_level_checks(gen, args, pattern):
    """The registered op validates on its own (it is reachable without the Python wrapper)."""
    x = randn((4, 5), gen)
    t = make_target(x.shape, gen)
    kw = dict(class_weight=None, alpha=1.0, gamma=2.0, ignore_index=-100, reduction=1, compute_grad=False)
    kw.update(args)
    if isinstance(kw["class_weight"], int):
        kw["class_weight"] = torch.ones(kw["class_weight"])
    with pytest.raises(ERRORS, match=pattern):
        OP.softmax_focal_loss_forward(x, t, kw["class_weight"], kw["alpha"], kw["gamma"], kw["ignore_index"],
                                      kw["reduction"], kw["compute_grad"])


# ============================================================================ build info, registered ops


def test_build_info():
    info = focal_cuda.build_info()
    assert set(info) >= {"cuda", "cuda_version", "cuda_arch_list", "torch_version"}
    assert isinstance(info["cuda"], bool)
    assert isinstance(info["cuda_arch_list"], list) and all(isinstance(a, str) and a for a in info["cuda_arch_list"])
    if info["cuda"]:
        assert isinstance(info["cuda_version"], str) and info["cuda_version"]
        assert info["cuda_arch_list"]
    else:
        assert info["cuda_version"] is None
    assert info["torch_version"] == torch.__version__
    # What setup.py wrote beside the library agrees with what was compiled into it; cuda_version is the
    # compiler's (nvcc --version), which may differ from torch.version.cuda in the minor.
    from focal_cuda import _build_info

    assert _build_info.TORCH_VERSION == info["torch_version"]
    assert _build_info.CUDA == info["cuda"] and _build_info.CUDA_VERSION == info["cuda_version"]
    if info["cuda"]:
        assert re.fullmatch(r"\d+\.\d+", info["cuda_version"])
        assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]


def test_import_with_another_torch_says_rebuild():
    """A build only loads into the torch it was compiled against: importing it with another torch raises an
    ImportError naming both versions and the rebuild command, before the library is loaded (which would fail
    with an undefined symbol, or load and misbehave)."""
    code = (
        "import sys, torch\n"
        "torch.__version__ = '1.0.0+other'\n"
        "try:\n"
        "    import focal_cuda\n"
        "except ImportError as e:\n"
        "    print(e)\n"
        "    print('loaded' if 'focal_cuda._C' in sys.modules else 'not loaded')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(focal_cuda.__file__).resolve().parent.parent).stdout
    assert f"built against torch {torch.__version__}" in out, out
    assert "torch 1.0.0+other is installed" in out and "pip install --no-build-isolation" in out, out
    assert out.strip().endswith("not loaded"), out


def _opcheck_samples(device, gen):
    def leaf(t):
        return t.requires_grad_()

    x3 = leaf(randn((4, 5, 3), gen, device=device))
    t3 = make_target(x3.shape, gen, device=device, ignore_frac=0.2)
    x2 = leaf(randn((6, 4), gen, device=device))
    t2u8 = make_target(x2.shape, gen, device=device, dtype=torch.uint8, ignore_index=255, ignore_frac=0.3)
    w = torch.rand(4, generator=gen).to(device) + 0.5
    xh = randn((3, 6, 2, 2), gen, device=device, dtype=torch.float16)
    th = make_target(xh.shape, gen, device=device, dtype=torch.int32)
    xcl = leaf(_layout("channels_last", gen, device))
    tcl = make_target(xcl.shape, gen, device=device, dtype=torch.int16)
    return [
        (x3, t3, None, 1.0, 2.0, -100, 1, True),
        (x2, t2u8, w, 1.0, 0.5, 255, 0, True),
        (x3, t3, None, 0.25, 0.0, -100, 2, True),
        (xh, th, None, 0.25, 3.7, -100, 2, False),
        (xcl, tcl, None, 1.0, 2.0, -100, 0, True),
    ]


def test_opcheck_forward(device, gen):
    for args in _opcheck_samples(device, gen):
        torch.library.opcheck(OP.softmax_focal_loss_forward.default, args)


def test_opcheck_backward(device, gen):
    for args in _opcheck_samples(device, gen):
        if not args[-1]:
            continue
        with torch.no_grad():
            loss, grad_buf, state = OP.softmax_focal_loss_forward(*args)
        go = torch.ones_like(loss) * 0.5
        torch.library.opcheck(OP.focal_loss_backward_.default, (grad_buf, state, go))
        if hasattr(OP, "focal_loss_backward"):  # the functional (non-mutating) variant, if registered
            torch.library.opcheck(OP.focal_loss_backward.default, (grad_buf, state, go))


def test_forward_op_outputs(gen):
    """The raw op: loss / gradient buffer / state, and the in-place backward scaling the buffer."""
    x = randn((6, 5, 3), gen, dtype=torch.float64)
    t = make_target(x.shape, gen, ignore_frac=0.2)
    for reduction in REDUCTIONS:
        loss, grad_buf, state = OP.softmax_focal_loss_forward(x, t, None, 1.0, 2.0, -100, REDUCTION_CODE[reduction],
                                                              True)
        assert grad_buf.shape == x.shape and state.dim() == 1
        go = randn(loss.shape, gen, dtype=torch.float64)
        OP.focal_loss_backward_(grad_buf, state, go)
        ref_loss, ref_g = reference_loss_and_grad(x, t, go, gamma=2.0, reduction=reduction)
        assert_close_scaled(loss, ref_loss, x.dtype, reduction)
        assert_close_scaled(grad_buf, ref_g, x.dtype, reduction)
        loss_ng, grad_ng, _ = OP.softmax_focal_loss_forward(x, t, None, 1.0, 2.0, -100, REDUCTION_CODE[reduction],
                                                            False)
        assert grad_ng.numel() == 0
        assert torch.equal(loss_ng, loss)


# ============================================================================ properties


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 5),
    c=st.integers(1, 12),
    spatial=st.lists(st.integers(0, 4), max_size=3),
    gamma=st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.7]), st.floats(0.0, 6.0)),
    alpha_kind=st.sampled_from([None, "float", "list", "tensor"]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    ignore_index=st.sampled_from([-100, -1, 0, 255]),
    reduction=st.sampled_from(REDUCTIONS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(device, n, c, spatial, gamma, alpha_kind, ignore_frac, ignore_index, reduction,
                                    dtype, scale, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, *spatial)
    x = randn(shape, g, device=device, dtype=dtype, scale=scale)
    t = make_target(shape, g, device=device, ignore_index=ignore_index, ignore_frac=ignore_frac)
    alpha = make_alpha(alpha_kind, c, g, device)
    assert_close_to_reference(x, t, g, gamma=gamma, alpha=alpha, ignore_index=ignore_index, reduction=reduction)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=25, deadline=None)
@given(
    layout=st.sampled_from(LAYOUTS),
    gamma=st.floats(0.0, 4.0),
    reduction=st.sampled_from(REDUCTIONS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_layouts(device, layout, gamma, reduction, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = _layout(layout, g, device, dtype)
    t = make_target(x.shape, g, device=device, ignore_frac=0.3)
    assert_close_to_reference(x, t, g, gamma=gamma, alpha=make_alpha("list", x.shape[1], g), reduction=reduction)


def test_output_buffers_are_poisoned_before_the_kernel_writes(device):
    """The autouse fixture's poisoning reaches the buffers the C++ operator allocates: a
    gradient buffer requested for an input with no positions is allocated but never written."""
    x = torch.empty(0, 4, 3, device=device).requires_grad_()
    assert torch.empty(5, device=device).isnan().all()
    _, grad, state = torch.ops.focal_cuda.softmax_focal_loss_forward(
        x, torch.empty(0, 3, dtype=torch.long, device=device), None, 1.0, 2.0, -100, 2, True)
    assert grad.shape == (0, 4, 3)
    assert torch.isfinite(state).all(), "the state must be written even for empty inputs"
    buf = torch.ops.focal_cuda.softmax_focal_loss_forward(
        torch.randn(2, 4, 3, device=device), torch.full((2, 3), -100, device=device), None, 1.0, 2.0, -100, 0, True)[1]
    assert not buf.isnan().any(), "every gradient element is written, ignored positions included"
