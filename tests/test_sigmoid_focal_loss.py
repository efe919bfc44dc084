"""focal_cuda.sigmoid_focal_loss against the float64 reference and torchvision (SPEC.md, "Sigmoid focal loss").

Every comparison is fused loss and gradient (for a random upstream gradient) against
focal_cuda.reference.sigmoid_focal_loss evaluated in float64 on the very same, already
rounded, input values, with the per-dtype tolerances of conftest.tolerances. Where the
reference's autograd gradient is NaN (saturated logits with gamma < 1: the derivative of
m**gamma at m = 0), the gradient is checked against sigmoid_closed_form_grad instead.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import CUDA, DEVICES, FLOAT_DTYPES, REDUCTIONS, assert_close_scaled, randn
from hypothesis import given, settings
from hypothesis import strategies as st

import focal_cuda
from focal_cuda import reference
from focal_cuda.functional import _FLOAT32_LOSS_DEVICES

OP = torch.ops.focal_cuda
REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}
INDEX_DTYPES = [torch.uint8, torch.int16, torch.int32, torch.int64]
ERRORS = (ValueError, TypeError, IndexError, RuntimeError)


def _ids(v: Any) -> str:
    if isinstance(v, tuple) and all(isinstance(s, int) for s in v):
        return "x".join(map(str, v))
    return str(v)


# ============================================================================ inputs


def make_dense_targets(shape, gen, *, kind: str = "binary", dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Dense targets: "binary" (0 / 1, about 30% positives), "soft" (uniform in [0, 1]) or
    "mixed" (soft, with a third of the values exactly 0 or 1)."""
    u = torch.rand(tuple(shape), generator=gen, dtype=torch.float64)
    if kind == "binary":
        y = (u < 0.3).double()
    elif kind == "soft":
        y = u
    elif kind == "mixed":
        pick = torch.rand(tuple(shape), generator=gen, dtype=torch.float64)
        y = torch.where(pick < 0.15, torch.zeros_like(u), torch.where(pick < 0.3, torch.ones_like(u), u))
    else:
        raise ValueError(kind)
    return y.to(dtype=dtype, device=device)


def make_index_targets(
    input_shape,
    gen,
    *,
    dtype=torch.int64,
    device="cpu",
    ignore_index: int = -100,
    ignore_frac: float = 0.0,
    background_frac: float = 0.4,
) -> torch.Tensor:
    """Class indices of shape input_shape[:-1]: a class in [0, C), C (background) for a fraction, ignore_index for another."""
    shape = tuple(input_shape[:-1])
    num_classes = input_shape[-1]
    t = torch.randint(0, max(num_classes, 1), shape, generator=gen, dtype=torch.int64)
    background = torch.rand(shape, generator=gen) < background_frac
    t = torch.where(background | (num_classes == 0), torch.full_like(t, num_classes), t)
    if ignore_frac > 0:
        ignored = torch.rand(shape, generator=gen) < ignore_frac
        t = torch.where(ignored, torch.full_like(t, ignore_index), t)
    return t.to(dtype=dtype, device=device)


def one_hot_targets(t: torch.Tensor, num_classes: int, ignore_index: int = -100, dtype=torch.float32) -> torch.Tensor:
    """The dense form of index targets: one-hot rows, background (C) and ignored rows all zero."""
    t = t.long()
    positive = torch.where((t >= 0) & (t < num_classes) & (t != ignore_index), t, torch.full_like(t, num_classes))
    return F.one_hot(positive, num_classes + 1)[..., :num_classes].to(dtype)


def make_targets(mode: str, x: torch.Tensor, gen, *, ignore_index: int = -100, ignore_frac: float = 0.2,
                 target_dtype=None) -> torch.Tensor:
    """mode "index" (int64 unless target_dtype), or "binary" / "soft" / "mixed" dense targets (the inputs' dtype
    unless target_dtype)."""
    if mode == "index":
        return make_index_targets(x.shape, gen, dtype=target_dtype or torch.int64, device=x.device,
                                  ignore_index=ignore_index, ignore_frac=ignore_frac)
    return make_dense_targets(x.shape, gen, kind=mode, dtype=target_dtype or x.dtype, device=x.device)


# ============================================================================ the comparison


def sig_fused(x: torch.Tensor, t: torch.Tensor, grad_output: Optional[torch.Tensor] = None, **kw):
    """Fused loss and d(loss . grad_output)/dx for a fresh leaf with ``x``'s values and strides."""
    leaf = x.detach().requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(leaf, t, **kw)
    if grad_output is None:
        return loss, None
    (g,) = torch.autograd.grad(loss, leaf, grad_output)
    return loss, g


def sig_reference(x: torch.Tensor, t: torch.Tensor, grad_output: Optional[torch.Tensor] = None, **kw):
    """The float64 reference on the same (already rounded) values, and its autograd gradient."""
    leaf = x.detach().double().requires_grad_()
    t = t.double() if t.is_floating_point() else t
    loss = reference.sigmoid_focal_loss(leaf, t, **kw)
    if grad_output is None:
        return loss, None
    (g,) = torch.autograd.grad(loss, leaf, grad_output.double())
    return loss, g


def sigmoid_closed_form_grad(
    x: torch.Tensor,
    t: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    *,
    ignore_index: int = -100,
    normalizer: Any = None,
    grad_output: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """d(loss . grad_output)/dx in float64 without autograd, finite at saturated logits for every gamma >= 0.

    dl/dx = alpha_t m**gamma ((p - y) + gamma ce r), m = 1 - p_t = p (1 - y) + (1 - p) y,
    r = (dm/dx) / m = p (1 - p) (1 - 2y) / m, which is -p for y = 1 and 1 - p for y = 0:
    no negative power of m is evaluated.
    """
    xd = x.detach().double()
    num_classes = xd.shape[-1]
    valid = None
    if t.is_floating_point():
        y = t.double()
    else:
        valid = t.long() != ignore_index
        y = one_hot_targets(t, num_classes, ignore_index, dtype=torch.float64)
    p, q = torch.sigmoid(xd), torch.sigmoid(-xd)
    ce = F.binary_cross_entropy_with_logits(xd, y, reduction="none")
    m = p * (1 - y) + q * y
    r_soft = p * q * (1 - 2 * y) / torch.where(m > 0, m, torch.ones_like(m))
    r = torch.where(y == 1, -p, torch.where(y == 0, q, r_soft))
    modulating = torch.ones_like(m) if gamma == 0 else m**gamma
    g = modulating * ((p - y) + gamma * (ce * r))  # ce r first: gamma ce overflows where r == 0
    if alpha >= 0:
        g = g * (alpha * y + (1 - alpha) * (1 - y))
    if valid is not None:
        g = torch.where(valid.unsqueeze(-1), g, torch.zeros_like(g))
    if grad_output is not None:
        g = g * grad_output.double()
    if reduction == "mean":
        if normalizer is not None:
            g = g / float(normalizer)
        elif valid is not None:
            g = g / max(1, int(valid.sum()) * num_classes)
        else:
            g = g / max(1, g.numel())
    return g


def assert_sigmoid_close_to_reference(
    x: torch.Tensor,
    t: torch.Tensor,
    gen: Optional[torch.Generator] = None,
    *,
    grad: bool = True,
    grad_output: Optional[torch.Tensor] = None,
    **kw,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Fused loss (and gradient for ``grad_output``, random from ``gen`` when not given) against the float64
    reference; every element compared, NaN where the reference has NaN. Returns the fused (loss, grad)."""
    dtype = x.dtype
    reduction = kw.get("reduction", "none")
    if grad and grad_output is None:
        shape = x.shape if reduction == "none" else ()
        grad_output = randn(shape, gen, dtype=dtype, device=x.device)
    loss, g = sig_fused(x, t, grad_output if grad else None, **kw)
    ref_loss, ref_g = sig_reference(x, t, grad_output if grad else None, **kw)
    assert loss.dtype == dtype, f"loss dtype {loss.dtype} != inputs dtype {dtype}"
    assert loss.device == x.device
    assert_close_scaled(loss, ref_loss, dtype, f"loss {kw}")
    if grad:
        assert g.dtype == dtype and g.shape == x.shape
        if torch.isnan(ref_g).any():  # (1 - p_t)**gamma at 1 - p_t == 0 with gamma < 1: use the closed form
            cf = sigmoid_closed_form_grad(x, t, grad_output=grad_output, **kw)
            ref_g = torch.where(torch.isnan(ref_g) & torch.isfinite(cf), cf, ref_g)
        assert_close_scaled(g, ref_g, dtype, f"grad {kw}")
    return loss, g


# ============================================================================ the reference itself


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [0.25, -1.0, 0.9, 0.0, 1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.7])
@pytest.mark.parametrize("kind", ["binary", "soft"])
def test_reference_matches_torchvision(gen, kind, gamma, alpha, reduction, dtype):
    x = randn((13, 7), gen, dtype=dtype, scale=3.0)
    y = make_dense_targets(x.shape, gen, kind=kind, dtype=dtype)
    go = randn(x.shape if reduction == "none" else (), gen, dtype=torch.float64)
    ref_loss, ref_g = sig_reference(x, y, go, alpha=alpha, gamma=gamma, reduction=reduction)
    xt = x.double().requires_grad_()
    tv = torchvision.ops.sigmoid_focal_loss(xt, y.double(), alpha=alpha, gamma=gamma, reduction=reduction)
    (tv_g,) = torch.autograd.grad(tv, xt, go)
    torch.testing.assert_close(ref_loss, tv, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(ref_g, tv_g, rtol=1e-10, atol=1e-12)
    # evaluated in the input's dtype: computed in float32 (float64), rounded once
    low = reference.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma, reduction=reduction)
    assert low.dtype == dtype
    assert_close_scaled(low, tv.detach(), dtype, "reference in the input dtype")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(9, 5), (2, 6, 4)], ids=_ids)
def test_reference_index_equals_one_hot(gen, shape, reduction):
    x = randn(shape, gen, dtype=torch.float64, scale=2.0)
    t = make_index_targets(shape, gen, ignore_frac=0.3)
    t.view(-1)[:2] = torch.tensor([-100, shape[-1]])  # at least one ignored and one background row
    valid = t != -100
    assert valid.any() and (~valid).any() and (t == shape[-1]).any()
    y = one_hot_targets(t, shape[-1], dtype=torch.float64)
    loss = reference.sigmoid_focal_loss(x, t, 0.25, 2.0, reduction)
    dense = reference.sigmoid_focal_loss(x[valid], y[valid], 0.25, 2.0, reduction)
    if reduction == "none":
        torch.testing.assert_close(loss[valid], dense)
        assert (loss[~valid] == 0).all()
    else:
        torch.testing.assert_close(loss, dense)


def test_reference_tails_keep_digits():
    """1 - p_t computed as p (1 - y) + sigmoid(-x) y: the loss is relatively accurate far in both tails."""
    x = torch.tensor([30.0, -30.0, 80.0, -80.0], dtype=torch.float64)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    loss = reference.sigmoid_focal_loss(x, y, alpha=-1.0, gamma=0.5)
    expected = torch.exp(-x.abs()) * torch.exp(-x.abs()) ** 0.5  # ce ~ m ~ e^-|x|
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)


def test_closed_form_grad_matches_reference_autograd(gen):
    """The test helper used at saturated logits agrees with autograd where autograd is finite."""
    x = randn((8, 6), gen, dtype=torch.float64, scale=3.0)
    t = make_index_targets(x.shape, gen, ignore_frac=0.2)
    cases = [("index", t), ("binary", make_dense_targets(x.shape, gen, dtype=torch.float64)),
             ("mixed", make_dense_targets(x.shape, gen, kind="mixed", dtype=torch.float64))]
    for _name, targets in cases:
        for gamma in (0.0, 0.25, 0.5, 2.0, 3.7):
            for alpha in (0.25, -1.0):
                for reduction in REDUCTIONS:
                    go = randn(x.shape if reduction == "none" else (), gen, dtype=torch.float64)
                    kw = dict(alpha=alpha, gamma=gamma, reduction=reduction)
                    _, ref_g = sig_reference(x, targets, go, **kw)
                    cf = sigmoid_closed_form_grad(x, targets, grad_output=go, **kw)
                    torch.testing.assert_close(cf, ref_g, rtol=1e-12, atol=1e-13)
                    if reduction == "mean":
                        _, ref_n = sig_reference(x, targets, go, normalizer=3.5, **kw)
                        cf_n = sigmoid_closed_form_grad(x, targets, grad_output=go, normalizer=3.5, **kw)
                        torch.testing.assert_close(cf_n, ref_n, rtol=1e-12, atol=1e-13)


def test_reference_errors(gen):
    x = randn((4, 3), gen)
    y = make_dense_targets(x.shape, gen)
    t = make_index_targets(x.shape, gen)
    f = reference.sigmoid_focal_loss
    with pytest.raises(TypeError, match=r"inputs.*(Long|int64)"):
        f(x.long(), y)
    with pytest.raises(ValueError, match=r"targets.*\(4, 2\)"):
        f(x, y[:, :2])
    with pytest.raises(ValueError, match=r"targets.*\(4, 3\)"):
        f(x, y.long())
    with pytest.raises(ValueError, match=r"targets.*\(4,\)"):
        f(x, t.float())
    with pytest.raises(TypeError, match=r"targets.*bool"):
        f(x, t > 0)
    with pytest.raises(ValueError, match=r"gamma.*-1"):
        f(x, y, gamma=-1.0)
    with pytest.raises(ValueError, match=r"gamma.*nan"):
        f(x, y, gamma=math.nan)
    with pytest.raises(ValueError, match=r"reduction.*avg"):
        f(x, y, reduction="avg")
    with pytest.raises(ValueError, match=r"normalizer.*reduction.*sum"):
        f(x, y, reduction="sum", normalizer=2.0)
    with pytest.raises(ValueError, match=r"targets.*requires_grad"):
        f(x, y.clone().requires_grad_())
    for bad in (-3, 4):
        tb = t.clone()
        tb[1] = bad
        with pytest.raises(IndexError, match=rf"targets.*{bad}"):
            f(x, tb)
    t[1] = 3  # == C: background, not an error
    f(x, t)


# ============================================================================ torchvision drop-in


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [0.25, -1.0, 0.9])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0, 3.7])
@pytest.mark.parametrize("kind", ["binary", "soft"])
def test_matches_torchvision(device, gen, kind, gamma, alpha, reduction, dtype):
    x = randn((37, 11), gen, device=device, dtype=dtype, scale=3.0)
    y = make_dense_targets(x.shape, gen, kind=kind, dtype=dtype, device=device)
    go = randn(x.shape if reduction == "none" else (), gen, device=device, dtype=dtype)
    loss, g = sig_fused(x, y, go, alpha=alpha, gamma=gamma, reduction=reduction)
    xt = x.detach().double().requires_grad_()
    tv = torchvision.ops.sigmoid_focal_loss(xt, y.double(), alpha=alpha, gamma=gamma, reduction=reduction)
    (tv_g,) = torch.autograd.grad(tv, xt, go.double())
    assert loss.dtype == dtype and loss.shape == tv.shape
    assert_close_scaled(loss, tv, dtype, "loss vs torchvision (float64)")
    assert_close_scaled(g, tv_g, dtype, "grad vs torchvision (float64)")
    # torchvision in the same dtype, element by element at its own precision
    xs = x.detach().requires_grad_()
    tv_same = torchvision.ops.sigmoid_focal_loss(xs, y, alpha=alpha, gamma=gamma, reduction=reduction)
    (tv_same_g,) = torch.autograd.grad(tv_same, xs, go)
    assert_close_scaled(loss, tv_same.detach().double(), dtype, "loss vs torchvision (same dtype)")
    assert_close_scaled(g, tv_same_g.double(), dtype, "grad vs torchvision (same dtype)")


@pytest.mark.parametrize("mode", ["dense", "index"])
def test_detectron_normalization_matches_torchvision(device, gen, mode):
    """RetinaNet / detectron2: sigmoid_focal_loss(..., reduction="sum") / max(1, num_foreground)."""
    x = randn((3, 200, 9), gen, device=device, scale=2.0)
    t = make_index_targets(x.shape, gen, device=device, ignore_index=-2, ignore_frac=0.1, background_frac=0.9)
    valid = t != -2
    y = one_hot_targets(t, 9, ignore_index=-2).to(device)
    num_fg = ((t >= 0) & (t < 9)).sum()
    assert int(num_fg) > 1
    xt = x.detach().requires_grad_()
    tv = torchvision.ops.sigmoid_focal_loss(xt[valid], y[valid], reduction="sum") / max(1, num_fg)
    (tv_g,) = torch.autograd.grad(tv, xt)
    targets = t if mode == "index" else y
    kw = dict(ignore_index=-2) if mode == "index" else {}
    if mode == "dense":  # the dense form has no ignore: drop the rows as torchvision does
        xs = x[valid]
        targets = y[valid]
    else:
        xs = x
    variants = {
        "sum / normalizer": lambda inp: focal_cuda.sigmoid_focal_loss(inp, targets, reduction="sum", **kw)
        / num_fg.clamp(min=1),
        "normalizer tensor": lambda inp: focal_cuda.sigmoid_focal_loss(
            inp, targets, reduction="mean", normalizer=num_fg.clamp(min=1), **kw),
        "normalizer float": lambda inp: focal_cuda.sigmoid_focal_loss(
            inp, targets, reduction="mean", normalizer=float(max(1, int(num_fg))), **kw),
    }
    for name, fn in variants.items():
        leaf = x.detach().requires_grad_()
        inp = leaf[valid] if mode == "dense" else leaf
        assert inp.shape == xs.shape
        loss = fn(inp)
        (g,) = torch.autograd.grad(loss, leaf)
        assert_close_scaled(loss, tv.detach().double(), x.dtype, f"{name} loss")
        assert_close_scaled(g, tv_g.double(), x.dtype, f"{name} grad")


# ============================================================================ shapes, dtypes, layouts

SHAPES = [(1, 1), (1, 2), (7, 1), (3, 5), (1031, 7), (3, 5, 80), (2000, 80), (1, 70001), (2, 3, 4, 5)]


@pytest.mark.parametrize("mode", ["binary", "soft", "index"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
def test_shapes(device, gen, shape, reduction, mode):
    x = randn(shape, gen, device=device, scale=2.0)
    t = make_targets(mode, x, gen, ignore_frac=0.2)
    assert_sigmoid_close_to_reference(x, t, gen, alpha=0.25, gamma=2.0, reduction=reduction)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", ["binary", "soft", "index"])
@pytest.mark.parametrize("shape", [(37, 10), (6, 11, 5), (4096, 3)], ids=_ids)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_dtypes(device, gen, dtype, shape, mode, reduction, gamma):
    # float16 / bfloat16: the reference sees the same rounded values (and targets), upcast to float64
    x = randn(shape, gen, device=device, dtype=dtype, scale=3.0)
    t = make_targets(mode, x, gen, ignore_frac=0.1)
    assert_sigmoid_close_to_reference(x, t, gen, alpha=0.25, gamma=gamma, reduction=reduction)


@pytest.mark.parametrize("target_dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dense_target_dtypes(device, gen, dtype, target_dtype):
    """Dense targets in another floating dtype than the inputs (float32 targets with autocast's half logits):
    read as given (SPEC: torchvision drop-in)."""
    x = randn((9, 7), gen, device=device, dtype=dtype, scale=2.0)
    y = make_dense_targets(x.shape, gen, kind="soft", dtype=target_dtype, device=device)
    assert_sigmoid_close_to_reference(x, y, gen, alpha=0.25, gamma=2.0, reduction="sum")
    assert_sigmoid_close_to_reference(x, y, gen, alpha=0.25, gamma=2.0, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", ["binary", "soft", "index"])
@pytest.mark.parametrize("alpha", [0.25, -1.0, 0.9])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.7])
def test_gamma_alpha(device, gen, gamma, alpha, mode, reduction, dtype):
    x = randn((9, 4, 7), gen, device=device, dtype=dtype, scale=2.0)
    t = make_targets(mode, x, gen, ignore_frac=0.25)
    assert_sigmoid_close_to_reference(x, t, gen, alpha=alpha, gamma=gamma, reduction=reduction)


def test_integer_gamma_and_alpha(device, gen):
    x = randn((6, 4), gen, device=device)
    y = make_dense_targets(x.shape, gen, device=device)
    for gamma in (0, 1, 2, 3):
        assert torch.equal(focal_cuda.sigmoid_focal_loss(x, y, gamma=gamma),
                           focal_cuda.sigmoid_focal_loss(x, y, gamma=float(gamma)))
    assert torch.equal(focal_cuda.sigmoid_focal_loss(x, y, alpha=-1), focal_cuda.sigmoid_focal_loss(x, y, alpha=-1.0))
    assert torch.equal(focal_cuda.sigmoid_focal_loss(x, y, alpha=-1.0), focal_cuda.sigmoid_focal_loss(x, y, alpha=-0.5))


def test_defaults_are_torchvisions(gen):
    x = randn((5, 6), gen, scale=2.0)
    y = make_dense_targets(x.shape, gen)
    loss = focal_cuda.sigmoid_focal_loss(x, y)
    assert loss.shape == x.shape  # reduction="none"
    assert_close_scaled(loss, torchvision.ops.sigmoid_focal_loss(x.double(), y.double()), x.dtype, "defaults")


def _layout(kind: str, gen, device, dtype=torch.float32) -> torch.Tensor:
    """Non-contiguous logits, classes last."""

    def r(*shape):
        return randn(shape, gen, device=device, dtype=dtype, scale=2.0)

    if kind == "transposed":  # (C, N).t(): class stride N
        return r(6, 9).t()
    if kind == "sliced_classes":  # class stride 2
        return r(9, 12)[:, ::2]
    if kind == "sliced_rows":
        return r(18, 6)[::2]
    if kind == "storage_offset":
        return r(10, 6, 5)[1:]
    if kind == "permuted_3d":  # (B, C, A) storage viewed as (B, A, C), as a conv head's output before reshape
        return r(3, 7, 10).permute(0, 2, 1)
    if kind == "expanded_rows":  # stride 0 along the rows
        return r(1, 7).expand(5, 7)
    if kind == "expanded_classes":  # stride 0 along the classes
        return r(5, 1).expand(5, 7)
    raise ValueError(kind)


LAYOUTS = ["transposed", "sliced_classes", "sliced_rows", "storage_offset", "permuted_3d", "expanded_rows",
           "expanded_classes"]


@pytest.mark.parametrize("mode", ["soft", "index"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_non_contiguous_inputs(device, gen, kind, reduction, mode):
    x = _layout(kind, gen, device)
    assert not x.is_contiguous() or x.storage_offset() > 0
    t = make_targets(mode, x, gen, ignore_frac=0.2)
    go = randn(x.shape if reduction == "none" else (), gen, device=device)
    loss, g = assert_sigmoid_close_to_reference(x, t, grad_output=go, alpha=0.25, gamma=1.5, reduction=reduction)
    # and the same values laid out contiguously give the same result
    loss_c, g_c = sig_fused(x.contiguous(), t, go, alpha=0.25, gamma=1.5, reduction=reduction)
    assert_close_scaled(loss, loss_c.double(), x.dtype, "non-contiguous vs contiguous loss")
    assert_close_scaled(g, g_c.double(), x.dtype, "non-contiguous vs contiguous grad")


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_non_contiguous_targets(device, gen, reduction):
    x = randn((6, 5, 7), gen, device=device)
    y = make_dense_targets((7, 5, 6), gen, kind="soft", device=device).permute(2, 1, 0)
    assert not y.is_contiguous()
    assert_sigmoid_close_to_reference(x, y, gen, reduction=reduction)
    t = make_index_targets((6, 10, 7), gen, dtype=torch.int16, device=device, ignore_frac=0.2)[:, ::2]
    assert not t.is_contiguous()
    assert_sigmoid_close_to_reference(x, t, gen, reduction=reduction)
    if reduction == "none":  # and a permuted upstream gradient
        go = randn((7, 5, 6), gen, device=device).permute(2, 1, 0)
        assert_sigmoid_close_to_reference(x, t, grad_output=go, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_none_reduction_grad_output_layouts(device, gen, reduction):
    """Upstream gradients that are not plain contiguous tensors (what loss.sum().backward() sends)."""
    x = randn((8, 6), gen, device=device, scale=2.0)
    t = make_index_targets(x.shape, gen, device=device, ignore_frac=0.2)
    if reduction == "none":
        gos = [torch.ones(8, 6, device=device), torch.tensor(1.7, device=device).expand(8, 6),
               randn((6, 8), gen, device=device).t(), randn((1, 6), gen, device=device).expand(8, 6),
               torch.zeros(8, 6, device=device), torch.full((8, 6), -1234.5, device=device)]
    else:
        gos = [torch.ones((), device=device), torch.zeros((), device=device), torch.tensor(-1234.5, device=device)]
    for go in gos:
        assert_sigmoid_close_to_reference(x, t, grad_output=go, gamma=0.5, reduction=reduction)


# ============================================================================ index targets


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(50, 7), (3, 40, 9)], ids=_ids)
@pytest.mark.parametrize("target_dtype", INDEX_DTYPES, ids=str)
def test_index_equals_dense_one_hot(device, gen, target_dtype, shape, reduction):
    ignore_index = 255 if target_dtype == torch.uint8 else -1
    x = randn(shape, gen, device=device, scale=2.0)
    t = make_index_targets(shape, gen, dtype=target_dtype, device=device, ignore_index=ignore_index, ignore_frac=0.2)
    num_classes = shape[-1]
    valid = t.long() != ignore_index
    assert valid.any() and (~valid).any() and (t.long() == num_classes).any(), "setup: background and ignored rows"
    y = one_hot_targets(t, num_classes, ignore_index).to(device)
    kw = dict(alpha=0.25, gamma=2.0, reduction=reduction)
    go = randn(x.shape if reduction == "none" else (), gen, device=device)
    loss, g = assert_sigmoid_close_to_reference(x, t, grad_output=go, ignore_index=ignore_index, **kw)
    # the fused dense form on the one-hot targets of the counted rows
    leaf = x.detach().requires_grad_()
    dense = focal_cuda.sigmoid_focal_loss(leaf[valid], y[valid], **kw)
    (g_dense,) = torch.autograd.grad(dense, leaf, go[valid] if reduction == "none" else go)
    if reduction == "none":
        assert_close_scaled(loss[valid], dense.double(), x.dtype, "index vs dense loss")
        assert torch.equal(loss[~valid], torch.zeros_like(loss[~valid]))
    else:
        assert_close_scaled(loss, dense.double(), x.dtype, "index vs dense loss")
    assert_close_scaled(g, g_dense.double(), x.dtype, "index vs dense grad")
    assert torch.equal(g[~valid], torch.zeros_like(g[~valid])), "ignored rows get no gradient"
    # consumed as they are: the same loss as int64 targets
    loss64 = focal_cuda.sigmoid_focal_loss(x, t.long(), ignore_index=ignore_index, **kw)
    assert torch.equal(loss, loss64)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_index_mean_denominator(gen, reduction):
    """"mean" = sum / (non-ignored rows x C), the dense element count when nothing is ignored."""
    x = randn((10, 4), gen)
    t = make_index_targets(x.shape, gen, ignore_frac=0.4)
    n_valid = int((t != -100).sum())
    assert 0 < n_valid < 10
    mean = focal_cuda.sigmoid_focal_loss(x, t, reduction="mean")
    total = focal_cuda.sigmoid_focal_loss(x, t, reduction="sum")
    torch.testing.assert_close(mean, total / (n_valid * 4))
    t_all = make_index_targets(x.shape, gen)
    torch.testing.assert_close(focal_cuda.sigmoid_focal_loss(x, t_all, reduction="mean"),
                               focal_cuda.sigmoid_focal_loss(x, one_hot_targets(t_all, 4), reduction="mean"))


@pytest.mark.parametrize("ignore_index", [-100, -1, 0, 3, 2**40])
def test_ignore_index_values(device, gen, ignore_index):
    """Any ignore_index, including a class id (the class is then never positive) and values outside int32."""
    x = randn((40, 5), gen, device=device, scale=2.0)
    t = make_index_targets(x.shape, gen, device=device, ignore_index=ignore_index, ignore_frac=0.3)
    assert_sigmoid_close_to_reference(x, t, gen, ignore_index=ignore_index, reduction="mean")
    assert_sigmoid_close_to_reference(x, t, gen, ignore_index=ignore_index, reduction="none")


@pytest.mark.parametrize("target_dtype,ignore_index", [(torch.uint8, 259), (torch.uint8, -253), (torch.int16, 65539),
                                                      (torch.int32, 2**32 + 3)], ids=_ids)
def test_ignore_index_not_wrapped(device, gen, target_dtype, ignore_index):
    """An ignore_index outside the targets' dtype never matches: it is not truncated to that dtype (259 is not 3)."""
    x = randn((12, 5), gen, device=device)
    t = torch.arange(12, device=device).remainder(6).to(target_dtype)  # classes 0..4 and background 5
    assert_sigmoid_close_to_reference(x, t, gen, ignore_index=ignore_index, reduction="sum")
    assert torch.equal(focal_cuda.sigmoid_focal_loss(x, t, ignore_index=ignore_index, reduction="sum"),
                       focal_cuda.sigmoid_focal_loss(x, t, ignore_index=-100, reduction="sum"))


def test_uint8_default_ignore_index(device, gen):
    """ignore_index=-100 cannot occur in uint8 targets: every row counts."""
    x = randn((30, 6), gen, device=device)
    t = make_index_targets(x.shape, gen, dtype=torch.uint8, device=device)
    loss, _ = assert_sigmoid_close_to_reference(x, t, gen, reduction="mean")
    assert torch.equal(loss, focal_cuda.sigmoid_focal_loss(x, t.long(), reduction="mean"))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_all_rows_ignored(device, gen, dtype, reduction):
    x = randn((4, 3, 5), gen, device=device, dtype=dtype, scale=2.0).requires_grad_()
    t = torch.full((4, 3), 255, dtype=torch.uint8, device=device)
    loss = focal_cuda.sigmoid_focal_loss(x, t, gamma=0.5, ignore_index=255, reduction=reduction)
    assert loss.shape == (x.shape if reduction == "none" else ()) and loss.dtype == dtype
    assert torch.equal(loss, torch.zeros_like(loss))
    go = torch.full(loss.shape, 3.0, dtype=dtype, device=device)
    (g,) = torch.autograd.grad(loss, x, go)
    assert torch.equal(g, torch.zeros_like(g))


def test_large_class_index_row(device, gen):
    """One row of 70001 classes: index form equals the dense one-hot form and the reference."""
    x = randn((2, 70001), gen, device=device, scale=3.0)
    t = torch.tensor([12345, 70001], device=device)  # a positive class, then background
    y = one_hot_targets(t, 70001).to(device)
    for reduction in REDUCTIONS:
        loss, g = assert_sigmoid_close_to_reference(x, t, gen, gamma=0.5, reduction=reduction)
        go = torch.ones(loss.shape, device=device)
        loss_i, g_i = sig_fused(x, t, go, gamma=0.5, reduction=reduction)
        loss_d, g_d = sig_fused(x, y, go, gamma=0.5, reduction=reduction)
        assert_close_scaled(loss_i, loss_d.double(), x.dtype, "index vs dense")
        assert_close_scaled(g_i, g_d.double(), x.dtype, "index vs dense grad")


@pytest.mark.parametrize("bad_value", [-3, 6, 7, -100])
def test_class_index_out_of_range(device, gen, bad_value):
    x = randn((4, 3, 5), gen, device=device).requires_grad_()
    t = make_index_targets(x.shape, gen, device=device)
    t[2, 1] = bad_value
    if device == "cpu":
        with pytest.raises(IndexError, match=rf"targets.*{bad_value}"):
            focal_cuda.sigmoid_focal_loss(x, t, ignore_index=-7, reduction="mean")
        assert x.grad is None
    else:  # asynchronous on CUDA: an error (device assert) or a NaN loss, never a silent number
        try:
            loss = focal_cuda.sigmoid_focal_loss(x, t, ignore_index=-7, reduction="mean")
            torch.cuda.synchronize()
        except RuntimeError:
            return
        assert torch.isnan(loss)


def test_background_value_is_not_an_error(device, gen):
    x = randn((4, 5), gen, device=device)
    t = torch.tensor([5, 5, 0, 4], device=device)
    assert_sigmoid_close_to_reference(x, t, gen, reduction="sum")
    t_u8 = torch.tensor([0, 200, 1, 2], dtype=torch.uint8)
    with pytest.raises(IndexError, match=r"targets.*200"):
        focal_cuda.sigmoid_focal_loss(x.cpu(), t_u8, ignore_index=255)


# ============================================================================ normalizer


def _normalizers(device):
    return {
        "float": 7.5,
        "int": 3,
        "small_float": 0.5,
        "tensor_f32": torch.tensor(7.5, device=device),
        "tensor_f64": torch.tensor(2.25, dtype=torch.float64, device=device),
        "tensor_i64": torch.tensor(3, device=device),
        "tensor_i32": torch.tensor(11, dtype=torch.int32, device=device),
        "cpu_tensor": torch.tensor(4.0),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("mode", ["binary", "index"])
@pytest.mark.parametrize("kind", list(_normalizers("cpu")))
def test_normalizer(device, gen, kind, mode, dtype):
    normalizer = _normalizers(device)[kind]
    x = randn((2, 30, 6), gen, device=device, dtype=dtype, scale=2.0)
    t = make_targets(mode, x, gen, ignore_frac=0.2)
    loss, g = assert_sigmoid_close_to_reference(x, t, gen, gamma=2.0, reduction="mean", normalizer=normalizer)
    # the same as sum / normalizer
    total, g_sum = sig_fused(x, t, torch.ones((), dtype=dtype, device=device), gamma=2.0, reduction="sum")
    n = float(normalizer)
    assert_close_scaled(loss, total.double() / n, dtype, "mean with normalizer vs sum / normalizer")


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("kind", ["float", "tensor_f32", "tensor_i64"])
def test_normalizer_requires_mean(device, gen, kind, reduction):
    x = randn((4, 5), gen, device=device).requires_grad_()
    y = make_dense_targets(x.shape, gen, device=device)
    with pytest.raises(ValueError, match=rf"(?s)normalizer.*reduction.*{reduction}"):
        focal_cuda.sigmoid_focal_loss(x, y, reduction=reduction, normalizer=_normalizers(device)[kind])
    assert x.grad is None


def test_normalizer_not_a_scalar(device, gen):
    x = randn((4, 5), gen, device=device)
    y = make_dense_targets(x.shape, gen, device=device)
    with pytest.raises(ERRORS, match=r"normalizer.*\b2\b"):
        focal_cuda.sigmoid_focal_loss(x, y, reduction="mean", normalizer=torch.ones(2, device=device))


def test_normalizer_on_device_no_sync(device, gen):
    """A device normalizer (e.g. the all-reduced positive count) used as is; the result is a device tensor."""
    x = randn((16, 9), gen, device=device)
    t = make_index_targets(x.shape, gen, device=device, background_frac=0.7)
    num_fg = ((t >= 0) & (t < 9)).sum()
    loss = focal_cuda.sigmoid_focal_loss(x, t, reduction="mean", normalizer=num_fg)
    assert loss.device == x.device
    ref, _ = sig_reference(x, t, reduction="mean", normalizer=num_fg)
    assert_close_scaled(loss, ref, x.dtype, "device normalizer")


# ============================================================================ numerics


def _saturated_case(dtype, scale: float, mode: str, gen, device):
    """Logits at +-scale where every element's loss is 0 (1 - p_t == 0: the gamma < 1 pitfall), tails at
    |x| = 30 and 100, one element whose loss is (1 - alpha) scale, and (index) an ignored row full of +scale.

    Returns (x, targets, huge) with ``huge`` the mask of the element of loss ~ scale.
    """
    N, C = 8, 6
    x = (torch.rand((N, C), generator=gen, dtype=torch.float64) * 2 - 1) * 4
    t = torch.randint(0, C, (N,), generator=gen)
    y = F.one_hot(t, C).double()
    sign = 2 * y - 1  # +1 on the positive class, -1 elsewhere
    x[0] = sign[0] * scale  # every element right and saturated: loss 0, m == 0
    x[1] = -scale  # background row, saturated: loss 0
    y[1] = 0
    t[1] = C
    x[2] = sign[2] * 30.0  # m = e^-30: tiny but representable in float32
    x[3] = sign[3] * 100.0  # m = e^-100: 0 in float32
    x[4, t[4]] = 0.0  # p = 1/2 on the positive
    other = (int(t[5]) + 1) % C
    x[5, other] = scale  # a negative at +scale: loss (1 - alpha) scale, the only huge element
    huge = torch.zeros((N, C), dtype=torch.bool)
    huge[5, other] = True
    if mode == "index":
        x[6] = scale  # ignored: would be huge
        t[6] = -100
        y[6] = 0
    else:
        x[6] = -scale
        y[6] = 0
    targets = t if mode == "index" else y
    if mode == "soft":  # one soft row at moderate logits
        x[7] = torch.linspace(-5, 5, C, dtype=torch.float64)
        y[7] = torch.linspace(0.05, 0.95, C, dtype=torch.float64)
        targets = y
    return x.to(dtype=dtype, device=device), targets.to(device=device, dtype=dtype if mode != "index" else None), huge


SATURATION = [
    (torch.float32, 1e4),
    (torch.float32, 1e38),
    (torch.float16, 6e4),
    (torch.float16, torch.finfo(torch.float16).max),
    (torch.bfloat16, 1e38),
    (torch.bfloat16, torch.finfo(torch.bfloat16).max),
    (torch.float32, torch.finfo(torch.float32).max),
    (torch.float64, 1e300),
    (torch.float64, torch.finfo(torch.float64).max),
]


@pytest.mark.parametrize("mode", ["binary", "soft", "index"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("dtype,scale", SATURATION, ids=_ids)
def test_saturated_logits(device, gen, dtype, scale, gamma, reduction, mode):
    x, t, huge = _saturated_case(dtype, scale, mode, gen, device)
    huge = huge.to(device)
    go = randn(x.shape if reduction == "none" else (), gen, device=device, dtype=dtype)
    kw = dict(alpha=0.25, gamma=gamma, reduction=reduction)
    loss, g = sig_fused(x, t, go, **kw)
    ref_loss, _ = sig_reference(x, t, **kw)
    assert torch.isfinite(ref_loss.to(dtype)).all(), "test setup: reference representable"
    assert torch.isfinite(loss).all(), f"non-finite loss {loss}"
    assert torch.isfinite(g).all(), f"non-finite gradient {g}"
    if reduction == "none":  # the huge element and the others compared at their own scale
        assert_close_scaled(loss[huge], ref_loss[huge], dtype, "huge element")
        assert_close_scaled(loss[~huge], ref_loss[~huge], dtype, "other elements")
    else:
        assert_close_scaled(loss, ref_loss, dtype, "loss")
    expected_g = sigmoid_closed_form_grad(x, t, grad_output=go, **kw)
    assert torch.isfinite(expected_g).all()
    assert_close_scaled(g, expected_g, dtype, "grad vs closed form")


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.7])
@pytest.mark.parametrize("mode", ["dense", "index"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_largest_logit_wrong_side(device, dtype, mode, gamma):
    """The largest finite logit on the wrong side: loss alpha_t |x| (finite), gradient exactly alpha_t * sign.
    A kernel that forms gamma * ce before multiplying by r = sigmoid(-|x|) = 0 overflows to inf * 0 = NaN."""
    big = torch.finfo(dtype).max
    x = torch.tensor([[big, -big, 0.0]], dtype=dtype, device=device)  # a negative at +max, the positive at -max
    t = (torch.tensor([[0.0, 1.0, 0.0]], dtype=dtype, device=device) if mode == "dense"
         else torch.tensor([1], device=device))
    go = torch.ones((1, 3), dtype=dtype, device=device)
    loss, g = sig_fused(x, t, go, alpha=0.25, gamma=gamma, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(g).all(), f"loss {loss.tolist()}, grad {g.tolist()}"
    ref_loss, _ = sig_reference(x, t, alpha=0.25, gamma=gamma, reduction="none")
    assert_close_scaled(loss[:, :2], ref_loss[:, :2], dtype, "loss at +-max")
    expected = torch.tensor([0.75, -0.25], dtype=torch.float64)
    assert torch.equal(g[0, :2].double().cpu(), expected), g.tolist()


@pytest.mark.parametrize("gamma", [0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_tails_elementwise(device, dtype, gamma):
    """Far in either tail the loss keeps its relative digits (1 - p_t from sigmoid(-x), ce from log1p):
    each element compared with the float64 reference at its own magnitude."""
    x = torch.cat([torch.linspace(-30, 30, 121, dtype=torch.float64)] * 2).to(dtype=dtype, device=device)
    y = torch.cat([torch.ones(121), torch.zeros(121)]).to(dtype=dtype, device=device)
    loss = focal_cuda.sigmoid_focal_loss(x.view(2, 121), y.view(2, 121), gamma=gamma)
    ref, _ = sig_reference(x.view(2, 121), y.view(2, 121), gamma=gamma)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(loss.double().cpu(), ref.cpu(), rtol=64 * eps,
                               atol=4 * torch.finfo(dtype).smallest_normal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_reduced_loss_and_scale_beyond_dtype_range_are_inf(device, dtype):
    """Values beyond the dtype's range round to inf, as a conversion does (torch < 2.8's Tensor.fill_ raised
    "value cannot be converted ... without overflow"): a float16 / bfloat16 "sum" that large, and a tiny
    normalizer's 1 / normalizer kept in the float32 gradient scale."""
    big = 1e4 if dtype == torch.float16 else 1e38
    x = torch.full((10, 2), big, dtype=torch.float64).to(dtype=dtype, device=device).requires_grad_()
    y = torch.zeros((10, 2), dtype=dtype, device=device)  # every logit a confident false positive: loss ~ big
    total = focal_cuda.sigmoid_focal_loss(x, y, alpha=-1.0, gamma=0.0, reduction="sum")
    assert total.dtype == dtype and torch.isinf(total) and total > 0, total
    total.backward()
    assert torch.isfinite(x.grad).all()
    z = randn((4, 3), torch.Generator().manual_seed(0), device=device, dtype=dtype).requires_grad_()
    tiny = focal_cuda.sigmoid_focal_loss(z, torch.zeros_like(z), reduction="mean", normalizer=1e-45)
    assert torch.isinf(tiny) and tiny > 0, tiny
    tiny.backward()
    assert torch.isinf(z.grad).all(), z.grad


@pytest.mark.parametrize("mode", ["binary", "index"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nan_and_inf_propagate(device, gen, mode, reduction):
    x = randn((6, 5), gen, device=device, scale=2.0)
    t = make_targets(mode, x, gen, ignore_frac=0.0)
    y = one_hot_targets(t, 5).to(device) if mode == "index" else t
    x[1, 2] = math.nan
    x[2, 0] = math.inf
    x[2, 3] = -math.inf
    x[4, 1] = math.inf
    x[4, 4] = -math.inf
    if mode == "index":
        x[3, 0] = math.nan  # an ignored row with a NaN logit contributes 0
        t[3] = -100
    nonfinite = ~torch.isfinite(x)
    go = randn(x.shape if reduction == "none" else (), gen, device=device)
    loss, g = sig_fused(x, t, go, gamma=0.5, reduction=reduction)
    ref_loss, ref_g = sig_reference(x, t, go, gamma=0.5, reduction=reduction)
    assert g.shape == x.shape
    if reduction == "none":
        ignored = torch.zeros_like(nonfinite)
        if mode == "index":
            ignored[3] = True
            assert (loss[3] == 0).all() and (g[3] == 0).all()
        finite = ~nonfinite & ~ignored
        assert_close_scaled(loss[finite], ref_loss[finite], x.dtype, "finite elements")
        assert torch.isnan(loss[1, 2]) and torch.isnan(g[1, 2]), "NaN propagates"
        # +-inf: NaN (0 * inf, as the reference and torchvision in places), or the limit (0 or +inf)
        for r, c in ((2, 0), (2, 3), (4, 1), (4, 4)):
            yy = float(y[r, c])
            limit = 0.0 if (x[r, c] > 0) == (yy == 1) else math.inf
            value = float(loss[r, c].detach())
            assert math.isnan(value) or value == limit, f"x={float(x[r, c])}, y={yy}: loss {value}"
    else:
        assert torch.isnan(loss), "the NaN logit makes the reduced loss NaN"
        assert torch.isnan(ref_loss)
    # gradients of finite logits are unaffected by the non-finite ones
    finite = ~nonfinite
    if mode == "index":
        finite[3] = False
    assert_close_scaled(g[finite], ref_g[finite], x.dtype, "grad of finite logits")
    assert torch.isnan(g[1, 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", ["soft", "index"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_deterministic(device, gen, reduction, mode, dtype):
    x = randn((2000, 80), gen, device=device, dtype=dtype, scale=2.0)
    t = make_targets(mode, x, gen, ignore_frac=0.1)
    runs = [sig_fused(x, t, torch.ones((), dtype=dtype, device=device), gamma=0.5, reduction=reduction)
            for _ in range(3)]
    for loss, g in runs[1:]:
        assert torch.equal(loss, runs[0][0])
        assert torch.equal(g, runs[0][1])
    # a forward without gradient gives bitwise the same loss
    assert torch.equal(focal_cuda.sigmoid_focal_loss(x, t, gamma=0.5, reduction=reduction), runs[0][0])


EMPTY_SHAPES = [(0, 80), (2, 0, 80), (0, 3, 5), (4, 0), (3, 4, 0)]


@pytest.mark.parametrize("mode", ["binary", "index"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=_ids)
def test_empty(device, gen, shape, reduction, mode):
    x = randn(shape, gen, device=device).requires_grad_()
    t = (torch.full(shape[:-1], shape[-1], dtype=torch.int64, device=device) if mode == "index"
         else torch.zeros(shape, device=device))
    loss = focal_cuda.sigmoid_focal_loss(x, t, reduction=reduction)
    assert loss.dtype == x.dtype
    if reduction == "none":
        assert loss.shape == x.shape and loss.numel() == 0
    else:
        assert loss.shape == () and loss.item() == 0.0, f"{reduction} of an empty input: {loss.item()}"
    loss.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    with torch.no_grad():
        assert focal_cuda.sigmoid_focal_loss(x, t, reduction=reduction).shape == loss.shape
    if reduction == "mean":
        assert float(focal_cuda.sigmoid_focal_loss(x.detach(), t, reduction="mean", normalizer=2.0)) == 0.0


def test_index_rows_with_zero_classes(device):
    """(N, 0) logits: index targets must be C = 0 (background); nothing to sum."""
    x = torch.zeros((5, 0), device=device, requires_grad=True)
    t = torch.zeros(5, dtype=torch.int64, device=device)
    for reduction in REDUCTIONS:
        loss = focal_cuda.sigmoid_focal_loss(x, t, reduction=reduction)
        assert loss.numel() == 0 if reduction == "none" else float(loss.detach()) == 0.0


# ============================================================================ autograd behaviour


class _FreshForward(torch.autograd.Function):
    """gradcheck runs several backwards through one graph, which the fused op may refuse (its gradient
    buffer is consumed in place): re-run the fused forward in every backward instead."""

    @staticmethod
    def forward(ctx, x, kwargs):
        ctx.save_for_backward(x)
        ctx.kwargs = kwargs
        return focal_cuda.sigmoid_focal_loss(x, **kwargs)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            leaf = x.detach().requires_grad_()
            (g,) = torch.autograd.grad(focal_cuda.sigmoid_focal_loss(leaf, **ctx.kwargs), leaf, grad_output)
        return g, None


@pytest.mark.parametrize("mode", ["soft", "index"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(device, gen, reduction, gamma, mode):
    x = randn((3, 2, 4), gen, device=device, dtype=torch.float64).requires_grad_()
    t = make_targets(mode, x.detach(), gen, ignore_frac=0.0)
    if mode == "index":
        t[0, 1] = -100
        t[1, 0] = 4
    kwargs = dict(targets=t, alpha=0.25, gamma=gamma, reduction=reduction)
    assert torch.autograd.gradcheck(lambda inp: _FreshForward.apply(inp, kwargs), (x,), eps=1e-6, atol=1e-7)
    if reduction == "mean":
        kwargs["normalizer"] = torch.tensor(2.5, dtype=torch.float64, device=device)
        assert torch.autograd.gradcheck(lambda inp: _FreshForward.apply(inp, kwargs), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_no_grad(device, gen, reduction):
    x = randn((5, 4, 3), gen, device=device).requires_grad_()
    t = make_index_targets(x.shape, gen, device=device, ignore_frac=0.2)
    with_grad = focal_cuda.sigmoid_focal_loss(x, t, gamma=0.5, reduction=reduction)
    assert with_grad.requires_grad
    with torch.no_grad():
        without = focal_cuda.sigmoid_focal_loss(x, t, gamma=0.5, reduction=reduction)
    assert not without.requires_grad and without.grad_fn is None
    assert torch.equal(without, with_grad.detach())
    no_req = focal_cuda.sigmoid_focal_loss(x.detach(), t, gamma=0.5, reduction=reduction)
    assert not no_req.requires_grad
    assert torch.equal(no_req, with_grad.detach())
    with torch.inference_mode():
        inf = focal_cuda.sigmoid_focal_loss(x, t, gamma=0.5, reduction=reduction)
    assert torch.equal(inf, with_grad.detach())


def test_no_grad_asks_for_no_gradient(device, gen):
    """Under no_grad (or for an input that does not require grad) the op is called with compute_grad=False:
    no gradient is computed or stored (SPEC, "For both")."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Log(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.name().startswith("focal_cuda::sigmoid_focal_loss_forward"):
                calls.append(args)
            return func(*args, **(kwargs or {}))

    x = randn((6, 5), gen, device=device).requires_grad_()
    y = make_dense_targets(x.shape, gen, device=device)
    with Log():
        with_grad = focal_cuda.sigmoid_focal_loss(x, y, reduction="mean")
        with torch.no_grad():
            without = focal_cuda.sigmoid_focal_loss(x, y, reduction="mean")
        detached = focal_cuda.sigmoid_focal_loss(x.detach(), y, reduction="mean")
    assert [bool(args[7]) for args in calls] == [True, False, False]
    assert torch.equal(without, with_grad.detach()) and torch.equal(detached, without)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_second_backward_is_correct_or_raises(device, gen, reduction):
    x = randn((5, 4, 3), gen, device=device).requires_grad_()
    t = make_index_targets(x.shape, gen, device=device, ignore_frac=0.2)
    go = randn(x.shape if reduction == "none" else (), gen, device=device)
    loss = focal_cuda.sigmoid_focal_loss(x, t, gamma=0.5, reduction=reduction)
    loss.backward(go, retain_graph=True)
    _, ref_g = sig_reference(x, t, go, gamma=0.5, reduction=reduction)
    assert_close_scaled(x.grad, ref_g, x.dtype, "first backward")
    try:
        loss.backward(go)
    except RuntimeError as e:
        assert re.search(r"(?i)(retain_graph|second backward|already (been )?(consumed|used|run))", str(e)), str(e)
        assert_close_scaled(x.grad, ref_g, x.dtype, "gradient after a refused second backward")
    else:
        assert_close_scaled(x.grad, 2 * ref_g, x.dtype, "accumulated second backward")


@pytest.mark.parametrize("mode", ["binary", "index"])
def test_double_backward_raises(device, gen, mode):
    x = randn((5, 4), gen, device=device, dtype=torch.float64).requires_grad_()
    t = make_targets(mode, x.detach(), gen)
    with pytest.raises(RuntimeError, match=r"(?i)(double backward|create_graph)"):
        loss = focal_cuda.sigmoid_focal_loss(x, t, gamma=2.0, reduction="sum")
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        torch.autograd.grad((g**2).sum(), x)


def test_loss_backward_convenience(device, gen):
    """loss.backward() (grad_output exactly 1) and loss.sum().backward() on "none"."""
    x = randn((7, 4, 5), gen, device=device).requires_grad_()
    t = make_index_targets(x.shape, gen, device=device, ignore_frac=0.2)
    for reduction in REDUCTIONS:
        x.grad = None
        loss = focal_cuda.sigmoid_focal_loss(x, t, gamma=2.0, reduction=reduction)
        loss.sum().backward()
        _, ref_g = sig_reference(x, t, torch.ones(loss.shape, dtype=torch.float64, device=device),
                                 gamma=2.0, reduction=reduction)
        assert_close_scaled(x.grad, ref_g, x.dtype, reduction)


def test_two_losses_share_input(device, gen):
    x = randn((6, 5), gen, device=device).requires_grad_()
    t = make_index_targets(x.shape, gen, device=device)
    y = make_dense_targets(x.shape, gen, kind="soft", device=device)
    total = (focal_cuda.sigmoid_focal_loss(x, t, reduction="mean")
             + 2 * focal_cuda.sigmoid_focal_loss(x, y, gamma=0.5, alpha=-1, reduction="sum") + (x**2).sum())
    total.backward()
    xr = x.detach().double().requires_grad_()
    ref = (reference.sigmoid_focal_loss(xr, t, reduction="mean")
           + 2 * reference.sigmoid_focal_loss(xr, y.double(), gamma=0.5, alpha=-1, reduction="sum") + (xr**2).sum())
    ref.backward()
    assert_close_scaled(x.grad, xr.grad, x.dtype, "two losses")


# ============================================================================ module, compile, autocast


@pytest.mark.parametrize("mode", ["soft", "index"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [None, 0.25, 0.9])
def test_module_equals_functional(device, gen, alpha, reduction, mode):
    x = randn((6, 5, 4), gen, device=device)
    t = make_targets(mode, x, gen, ignore_index=1, ignore_frac=0.2)
    module = focal_cuda.FusedFocalLoss(gamma=1.5, alpha=alpha, ignore_index=1, reduction=reduction, mode="sigmoid")
    module = module.to(device)
    go = randn(x.shape if reduction == "none" else (), gen, device=device)
    xm = x.clone().requires_grad_()
    out = module(xm, t)
    (gm,) = torch.autograd.grad(out, xm, go)
    kw = dict(alpha=-1.0 if alpha is None else alpha, gamma=1.5, ignore_index=1, reduction=reduction)
    func, gf = sig_fused(x, t, go, **kw)
    assert torch.equal(out, func)
    assert torch.equal(gm, gf)
    assert_sigmoid_close_to_reference(x, t, grad_output=go, **kw)


def test_module_normalizer_defaults_and_repr(device, gen):
    x = randn((20, 6), gen, device=device)
    t = make_index_targets(x.shape, gen, device=device)
    m = focal_cuda.FusedFocalLoss(mode="sigmoid")
    assert "sigmoid" in repr(m)
    # defaults: gamma 2, no alpha weighting, mean
    torch.testing.assert_close(m(x, t), focal_cuda.sigmoid_focal_loss(x, t, alpha=-1, gamma=2.0, reduction="mean"))
    n = torch.tensor(4.0, device=device)
    torch.testing.assert_close(m(x, t, normalizer=n),
                               focal_cuda.sigmoid_focal_loss(x, t, alpha=-1, reduction="mean", normalizer=n))
    torch.testing.assert_close(m(x, t, n), m(x, t, normalizer=n))
    m_tv = focal_cuda.FusedFocalLoss(alpha=0.25, reduction="sum", mode="sigmoid")
    assert "0.25" in repr(m_tv)
    y = one_hot_targets(t, 6).to(device)
    assert_close_scaled(m_tv(x, y), torchvision.ops.sigmoid_focal_loss(x.double(), y.double(), reduction="sum"),
                        x.dtype, "module vs torchvision")
    with pytest.raises(ValueError, match=r"normalizer.*reduction"):
        m_tv(x, t, normalizer=2.0)
    with pytest.raises((ValueError, TypeError), match=r"mode.*sigmodi"):
        focal_cuda.FusedFocalLoss(mode="sigmodi")


@pytest.mark.parametrize("mode", ["soft", "index"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile(device, gen, backend, reduction, mode):
    if backend == "inductor" and mode == "soft" and reduction == "none":
        pytest.skip("one inductor case per mode is enough (compile time)")
    torch._dynamo.reset()
    x0 = randn((4, 6, 5), gen, device=device)
    t = make_targets(mode, x0, gen, ignore_frac=0.2)
    normalizer = torch.tensor(3.0, device=device) if reduction == "mean" else None

    def fn(x, t):
        loss = focal_cuda.sigmoid_focal_loss(x * 1.5, t, alpha=0.25, gamma=0.5, reduction=reduction,
                                             normalizer=normalizer)
        return (loss * loss.detach().new_tensor(2.0)).sum() + x.square().sum() * 0.01

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    xe, xc = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    eager = fn(xe, t)
    eager.backward()
    out = compiled(xc, t)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(xc.grad, xe.grad)
    xc.grad = None
    compiled(xc, t).backward()  # cached graph
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("mode", ["binary", "index"])
def test_autocast_bf16(device, gen, mode):
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 7).to(device)
    feat = randn((32, 16), gen, device=device)
    t = make_index_targets((32, 7), gen, device=device, ignore_frac=0.1)
    if mode == "binary":
        t = one_hot_targets(t, 7).to(device)  # float32 targets, as a detection pipeline builds them
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = lin(feat)
        assert logits.dtype == torch.bfloat16
        logits.retain_grad()
        loss = focal_cuda.sigmoid_focal_loss(logits, t, gamma=2.0, reduction="sum")
    # float32 under autocast, as F.cross_entropy (CUDA: once its kernels take loss_dtype)
    assert loss.dtype == (torch.float32 if device in _FLOAT32_LOSS_DEVICES else torch.bfloat16)
    loss.backward()
    # bitwise what the op computes on the bfloat16 logits outside autocast (the loss before its rounding)
    expected_loss, expected_g = sig_fused(logits.detach(), t, torch.ones((), dtype=torch.bfloat16, device=device),
                                          gamma=2.0, reduction="sum")
    assert torch.equal(loss.detach().to(torch.bfloat16), expected_loss)
    assert logits.grad.dtype == torch.bfloat16
    assert torch.equal(logits.grad, expected_g)
    ref_loss, ref_g = sig_reference(logits, t, torch.ones((), dtype=torch.float64, device=device), gamma=2.0,
                                    reduction="sum")
    assert_close_scaled(loss, ref_loss, torch.bfloat16, "autocast loss")
    assert_close_scaled(logits.grad, ref_g, torch.bfloat16, "autocast logits grad")
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all() and lin.weight.grad.abs().sum() > 0


# ============================================================================ errors


def _bad_call(case: str, device: str, gen):
    x = randn((4, 3, 5), gen, device=device).requires_grad_()
    y = make_dense_targets(x.shape, gen, device=device)
    t = make_index_targets(x.shape, gen, device=device)
    f = focal_cuda.sigmoid_focal_loss
    shape = r"(\[{0}\]|\({0},?\))"
    cases = {
        "inputs_int": (lambda: f(x.detach().long(), y), r"inputs.*(Long|int64)"),
        "inputs_bool": (lambda: f(x.detach() > 0, y), r"inputs.*(Bool|bool)"),
        "inputs_0d_index": (lambda: f(x.detach()[0, 0, 0], t[0, 0]), r"inputs.*" + shape.format("")),
        "dense_shape": (lambda: f(x, y[:, :2]), r"targets.*" + shape.format("4, 2, 5")),
        "dense_extra_dim": (lambda: f(x, y.unsqueeze(-1)), r"targets.*" + shape.format("4, 3, 5, 1")),
        "dense_broadcastable": (lambda: f(x, y[:1]), r"targets.*" + shape.format("1, 3, 5")),
        "index_shape": (lambda: f(x, t[:, :2]), r"targets.*" + shape.format("4, 2")),
        "index_full_shape": (lambda: f(x, y.long()), r"targets.*" + shape.format("4, 3, 5")),
        "float_index_shape": (lambda: f(x, t.float()), r"targets.*" + shape.format("4, 3")),
        "targets_bool": (lambda: f(x, t > 0), r"targets.*(Bool|bool)"),
        "targets_requires_grad": (lambda: f(x, y.clone().requires_grad_()), r"targets.*requires_grad"),
        "alpha_requires_grad": (lambda: f(x, y, alpha=torch.tensor(0.25, device=device, requires_grad=True)),
                                r"alpha"),
        "alpha_nan": (lambda: f(x, y, alpha=math.nan), r"alpha.*nan"),
        "gamma_negative": (lambda: f(x, y, gamma=-1.0), r"gamma.*-1(\.0)?"),
        "gamma_nan": (lambda: f(x, y, gamma=math.nan), r"gamma.*nan"),
        "gamma_inf": (lambda: f(x, y, gamma=math.inf), r"gamma.*inf"),
        "gamma_neg_inf": (lambda: f(x, y, gamma=-math.inf), r"gamma.*-inf"),
        "reduction_avg": (lambda: f(x, y, reduction="avg"), r"reduction.*avg"),
        "reduction_none_obj": (lambda: f(x, y, reduction=None), r"reduction.*None"),
        "normalizer_none": (lambda: f(x, y, reduction="none", normalizer=2.0), r"(?s)normalizer.*reduction.*none"),
        "normalizer_sum": (lambda: f(x, t, reduction="sum", normalizer=torch.tensor(2.0, device=device)),
                           r"(?s)normalizer.*reduction.*sum"),
        "normalizer_1d": (lambda: f(x, y, reduction="mean", normalizer=torch.ones(3, device=device)),
                          r"normalizer.*\b3\b"),
        "index_negative": (lambda: f(x, t.index_fill(0, torch.tensor([1], device=device), -3)), r"targets.*-3"),
        "index_above_background": (lambda: f(x, t.index_fill(0, torch.tensor([1], device=device), 6)),
                                   r"targets.*\b6\b"),
    }
    return x, cases[case]


BAD_CASES = ["inputs_int", "inputs_bool", "inputs_0d_index", "dense_shape", "dense_extra_dim", "dense_broadcastable",
             "index_shape", "index_full_shape", "float_index_shape", "targets_bool", "targets_requires_grad",
             "alpha_requires_grad", "alpha_nan", "gamma_negative", "gamma_nan", "gamma_inf", "gamma_neg_inf",
             "reduction_avg", "reduction_none_obj", "normalizer_none", "normalizer_sum", "normalizer_1d",
             "index_negative", "index_above_background"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_argument(device, gen, case):
    if case.startswith("index_") and case != "index_shape" and case != "index_full_shape" and device != "cpu":
        pytest.skip("out-of-range indices are reported asynchronously on CUDA (test_class_index_out_of_range)")
    x, (call, pattern) = _bad_call(case, device, gen)
    with pytest.raises(ERRORS, match=pattern):
        call()
    assert x.grad is None


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_device_mismatch(gen):
    x = randn((4, 5), gen, device="cuda")
    y = make_dense_targets(x.shape, gen)
    t = make_index_targets(x.shape, gen)
    for call in (lambda: focal_cuda.sigmoid_focal_loss(x, y), lambda: focal_cuda.sigmoid_focal_loss(x, t),
                 lambda: focal_cuda.sigmoid_focal_loss(x.cpu(), y.cuda()),
                 lambda: focal_cuda.sigmoid_focal_loss(x.cpu(), t.cuda())):
        with pytest.raises(ERRORS, match=r"(?s)(targets|inputs).*(cuda|cpu)"):
            call()
    # a CPU 0-dim normalizer is allowed with CUDA inputs; a CUDA one with CPU inputs is not
    focal_cuda.sigmoid_focal_loss(x, y.cuda(), reduction="mean", normalizer=torch.tensor(2.0))
    with pytest.raises(ERRORS, match=r"(?s)normalizer.*(cuda|cpu)"):
        focal_cuda.sigmoid_focal_loss(x.cpu(), y, reduction="mean", normalizer=torch.tensor(2.0, device="cuda"))


@pytest.mark.parametrize(
    "args,pattern",
    [
        (dict(gamma=-1.0), r"gamma.*-1"),
        (dict(gamma=math.nan), r"gamma.*nan"),
        (dict(reduction=7), r"reduction.*7"),
        (dict(reduction=0, normalizer=2), r"normalizer.*reduction"),
        (dict(alpha=math.inf), r"alpha.*inf"),
    ],
    ids=["gamma", "gamma_nan", "reduction", "normalizer", "alpha"],
)
def test_op_level_checks(gen, args, pattern):
    """The registered op validates on its own (it is reachable without the Python wrapper)."""
    x = randn((4, 5), gen)
    y = make_dense_targets(x.shape, gen)
    kw = dict(alpha=0.25, gamma=2.0, ignore_index=-100, reduction=1, normalizer=None, compute_grad=False)
    kw.update(args)
    if isinstance(kw["normalizer"], int):
        kw["normalizer"] = torch.tensor(float(kw["normalizer"]))
    with pytest.raises(ERRORS, match=pattern):
        OP.sigmoid_focal_loss_forward(x, y, kw["alpha"], kw["gamma"], kw["ignore_index"], kw["reduction"],
                                      kw["normalizer"], kw["compute_grad"])


# ============================================================================ registered ops


def _opcheck_samples(device, gen):
    def leaf(t):
        return t.requires_grad_()

    x2 = leaf(randn((6, 5), gen, device=device))
    y2 = make_dense_targets(x2.shape, gen, kind="soft", device=device)
    x3 = leaf(randn((2, 7, 4), gen, device=device))
    t3 = make_index_targets(x3.shape, gen, device=device, ignore_frac=0.3)
    t3u8 = make_index_targets(x3.shape, gen, dtype=torch.uint8, device=device, ignore_index=255, ignore_frac=0.3)
    xh = randn((3, 9), gen, device=device, dtype=torch.float16)
    yh = make_dense_targets(xh.shape, gen, dtype=torch.float16, device=device)
    xt = leaf(_layout("transposed", gen, device))
    tt = make_index_targets(xt.shape, gen, dtype=torch.int32, device=device)
    return [
        (x2, y2, 0.25, 2.0, -100, 1, None),
        (x3, t3, -1.0, 0.5, -100, 0, None),
        (x3, t3u8, 0.25, 0.0, 255, 2, None),
        (xh, yh, 0.9, 3.7, -100, 1, torch.tensor(4.0, device=device)),
        (xt, tt, 0.25, 2.0, -100, 1, torch.tensor(3, device=device)),
    ]


@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck_forward(device, gen, compute_grad):
    for args in _opcheck_samples(device, gen):
        torch.library.opcheck(OP.sigmoid_focal_loss_forward.default, (*args, compute_grad, False))


def test_opcheck_backward(device, gen):
    for args in _opcheck_samples(device, gen):
        with torch.no_grad():
            loss, grad_buf, state = OP.sigmoid_focal_loss_forward(*args, True)
        go = torch.ones_like(loss) * 0.5
        torch.library.opcheck(OP.focal_loss_backward_.default, (grad_buf.clone(), state.clone(), go))
        torch.library.opcheck(OP.focal_loss_backward.default, (grad_buf, state, go))


@pytest.mark.parametrize("mode", ["soft", "index"])
def test_forward_op_outputs(gen, mode):
    """The raw op: loss / gradient buffer / state, and the in-place backward scaling the buffer."""
    x = randn((6, 5, 3), gen, dtype=torch.float64)
    t = make_targets(mode, x, gen, ignore_frac=0.2)
    for reduction in REDUCTIONS:
        code = REDUCTION_CODE[reduction]
        loss, grad_buf, state = OP.sigmoid_focal_loss_forward(x, t, 0.25, 2.0, -100, code, None, True)
        assert grad_buf.shape == x.shape and state.dim() == 1
        assert loss.shape == (x.shape if reduction == "none" else ())
        go = randn(loss.shape, gen, dtype=torch.float64)
        OP.focal_loss_backward_(grad_buf, state, go)
        ref_loss, ref_g = sig_reference(x, t, go, reduction=reduction)
        assert_close_scaled(loss, ref_loss, x.dtype, reduction)
        assert_close_scaled(grad_buf, ref_g, x.dtype, reduction)
        loss_ng, grad_ng, _ = OP.sigmoid_focal_loss_forward(x, t, 0.25, 2.0, -100, code, None, False)
        assert grad_ng.numel() == 0
        assert torch.equal(loss_ng, loss)


def test_outputs_fully_written(device, gen):
    """With uninitialised memory NaN-filled (conftest), every loss and gradient element is written,
    ignored rows included."""
    assert torch.isnan(torch.empty(4, device=device)).all()
    x = randn((9, 7, 5), gen, device=device)
    t = make_index_targets(x.shape, gen, device=device, ignore_frac=0.5)
    _, buf, state = OP.sigmoid_focal_loss_forward(x, t, 0.25, 2.0, -100, 0, None, True)
    assert not buf.isnan().any() and torch.isfinite(state).all()
    for reduction in REDUCTIONS:
        assert_sigmoid_close_to_reference(x, t, gen, reduction=reduction)
    xe = torch.empty(0, 5, device=device)
    _, _, state = OP.sigmoid_focal_loss_forward(xe, torch.empty(0, 5, device=device), 0.25, 2.0, -100, 2, None, True)
    assert torch.isfinite(state).all(), "the state must be written even for empty inputs"


# ============================================================================ properties


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(
    batch=st.lists(st.integers(0, 5), min_size=1, max_size=2),
    c=st.integers(1, 12),
    gamma=st.one_of(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.7]), st.floats(0.0, 6.0)),
    alpha=st.one_of(st.sampled_from([0.25, -1.0, 0.9, 0.0, 1.0]), st.floats(0.0, 1.0)),
    mode=st.sampled_from(["binary", "soft", "mixed", "index"]),
    ignore_frac=st.sampled_from([0.0, 0.3, 1.0]),
    reduction=st.sampled_from(REDUCTIONS),
    normalizer=st.sampled_from([None, None, 2.5, "tensor"]),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(device, batch, c, gamma, alpha, mode, ignore_frac, reduction, normalizer, dtype,
                                    scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = randn((*batch, c), g, device=device, dtype=dtype, scale=scale)
    t = make_targets(mode, x, g, ignore_frac=ignore_frac)
    if reduction != "mean":
        normalizer = None
    elif normalizer == "tensor":
        normalizer = torch.tensor(7.0, device=device)
    assert_sigmoid_close_to_reference(x, t, g, alpha=alpha, gamma=gamma, reduction=reduction, normalizer=normalizer)
