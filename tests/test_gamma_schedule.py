"""Gamma schedules (FLSD, sample-dependent gamma) for both losses, and the float32 loss under autocast.

The fused ops with a GammaSchedule are compared, loss and gradient, with focal_cuda.reference in float64
on the same (rounded) inputs, as the constant-gamma suites do. The reference picks each position's gamma
from its float64 p_t, the kernels from their float32 one: random inputs are therefore moved away from the
thresholds (``away_from_thresholds``) before a float64 comparison, and the thresholds themselves are tested
separately in float32, against a float64 restatement of the public FLSD code's per-sample rule
(torrvision/focal_calibration, FocalLossAdaptive.get_gamma_list: a float32 p_t's ``.item()`` compared with
Python floats).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CUDA,
    DEVICES,
    FLOAT_DTYPES,
    REDUCTIONS,
    alpha_as_float64,
    assert_close_scaled,
    conditioning_floor,
    make_alpha,
    make_target,
    randn,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from test_sigmoid_focal_loss import SATURATION as SIGMOID_SATURATION
from test_sigmoid_focal_loss import _FreshForward as SigmoidFreshForward
from test_sigmoid_focal_loss import _saturated_case as sigmoid_saturated_case
from test_sigmoid_focal_loss import make_dense_targets, make_index_targets, one_hot_targets
from test_softmax_focal_loss import SATURATION as SOFTMAX_SATURATION
from test_softmax_focal_loss import _FreshForward as SoftmaxFreshForward
from test_softmax_focal_loss import _saturated_case as softmax_saturated_case

import focal_cuda
from focal_cuda import GammaSchedule, reference
from focal_cuda.functional import _FLOAT32_LOSS_DEVICES

OP = torch.ops.focal_cuda
REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}

SCHEDULES = {
    "flsd53": GammaSchedule.flsd53(),
    "fractional": GammaSchedule(thresholds=(0.1, 0.3, 0.7), gammas=(0.5, 1.5, 2.0, 0.0)),
    "one": GammaSchedule(thresholds=(0.45,), gammas=(3.7, 1.0)),
    "seven": GammaSchedule(thresholds=(0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9), gammas=(8.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.25)),
}
SCHEDULE_IDS = list(SCHEDULES)


def _ids(v: Any) -> str:
    if isinstance(v, tuple) and all(isinstance(s, int) for s in v):
        return "x".join(map(str, v))
    return str(v)


def _near(p: torch.Tensor, schedule: GammaSchedule, margin: float = 1e-4) -> torch.Tensor:
    near = torch.zeros_like(p, dtype=torch.bool)
    for threshold in schedule.thresholds:
        near |= (p - threshold).abs() <= margin * threshold
    return near


# ============================================================================ inputs away from the thresholds


def softmax_p_t(x: torch.Tensor, t: torch.Tensor, ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 p_t (N, d...) and the valid mask, on the CPU."""
    x = x.detach().cpu().double()
    t = t.cpu().long()
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t)).clamp(0, max(x.shape[1] - 1, 0))
    return torch.log_softmax(x, 1).gather(1, safe.unsqueeze(1)).squeeze(1).exp(), valid


def away_from_thresholds(x: torch.Tensor, t: torch.Tensor, schedule, ignore_index: int = -100) -> torch.Tensor:
    """``x`` with the target logit of every position whose p_t lies within 1e-4 (relative) of a threshold
    raised until none does (in place: x keeps its dtype and layout): float32 and float64 then pick the same
    piece."""
    if not isinstance(schedule, GammaSchedule) or x.numel() == 0:
        return x
    out = x.detach()
    for _ in range(50):
        p, valid = softmax_p_t(out, t, ignore_index)
        near = _near(p, schedule) & valid
        if not near.any():
            return out
        safe = torch.where(valid, t.cpu().long(), torch.zeros_like(t.cpu().long()))
        bump = torch.zeros(out.shape, dtype=torch.float64)
        step = 0.3 + out.detach().cpu().double().abs() * 4 * torch.finfo(out.dtype).eps
        bump.scatter_(1, safe.unsqueeze(1), near.unsqueeze(1).double())
        out.copy_((out.detach().cpu().double() + bump * step).to(out.dtype))
    raise AssertionError("could not move the inputs away from the thresholds")


def sigmoid_p_t(x: torch.Tensor, t: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    xd = x.detach().cpu().double()
    y = t.cpu().double() if t.is_floating_point() else one_hot_targets(t.cpu(), x.shape[-1], ignore_index,
                                                                         dtype=torch.float64)
    return torch.sigmoid(xd) * y + torch.sigmoid(-xd) * (1 - y)


def away_from_thresholds_sigmoid(x: torch.Tensor, t: torch.Tensor, schedule, ignore_index: int = -100):
    """(x, t) with every element's p_t moved out of 1e-4 (relative) of the thresholds: the logit raised, and a
    soft target (whose p_t may not depend on x: y = 1/2 gives p_t = 1/2) shifted."""
    if not isinstance(schedule, GammaSchedule) or x.numel() == 0:
        return x, t
    x, t = x.detach(), t.clone()  # x in place, keeping its layout
    for _ in range(50):
        near = _near(sigmoid_p_t(x, t, ignore_index), schedule)
        if not t.is_floating_point():
            near &= (t.cpu().long() != ignore_index).unsqueeze(-1)
        if not near.any():
            return x, t
        step = 0.3 + x.detach().cpu().double().abs() * 4 * torch.finfo(x.dtype).eps
        x.copy_((x.detach().cpu().double() + near.double() * step).to(x.dtype))
        if t.is_floating_point():
            shifted = torch.where(near, (t.cpu().double() + 0.37) % 1.0, t.cpu().double())
            t.copy_(shifted.to(t.dtype))
    raise AssertionError("could not move the inputs away from the thresholds")


# ============================================================================ closed forms (float64, no autograd)


def softmax_closed_form_grad(x, t, gamma, alpha=None, ignore_index=-100, reduction="mean", grad_output=None):
    """d(loss . grad_output)/dx with each position's gamma from the schedule on its float64 p_t:
    alpha_y F (p_j - [j == y]), F = (1-p)^g (1 - g p log(p) / (1-p)), finite for every g >= 0."""
    xd = x.detach().double()
    tl = t.long()
    valid = tl != ignore_index
    safe = torch.where(valid, tl, torch.zeros_like(tl))
    logp = torch.log_softmax(xd, 1)
    logp_t = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    q = -torch.expm1(logp_t)
    p = logp_t.exp()
    g = reference.scheduled_gamma(p, gamma)
    ratio = torch.where(q > 0, logp_t / torch.where(q > 0, q, torch.ones_like(q)), -torch.ones_like(q))
    modulating = torch.where(g == 0, torch.ones_like(q), q**g)
    coef = modulating * (1 - g * p * ratio)
    if isinstance(alpha, (int, float)):
        coef = coef * float(alpha)
    elif alpha is not None:
        coef = coef * torch.as_tensor(alpha, dtype=torch.float64, device=xd.device)[safe]
    coef = torch.where(valid, coef, torch.zeros_like(coef))
    if grad_output is not None:
        coef = coef * grad_output.double()
    if reduction == "mean":
        coef = coef / valid.sum().clamp(min=1)
    onehot = torch.zeros_like(xd).scatter_(1, safe.unsqueeze(1), 1.0)
    return coef.unsqueeze(1) * (logp.exp() - onehot)


def sigmoid_closed_form_grad(x, t, alpha=0.25, gamma=2.0, reduction="none", *, ignore_index=-100, normalizer=None,
                             grad_output=None):
    """dl/dx = alpha_t m^g ((p - y) + g ce r) per element, g from the schedule on the element's p_t."""
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
    g_t = reference.scheduled_gamma(p * y + q * (1 - y), gamma)
    r_soft = p * q * (1 - 2 * y) / torch.where(m > 0, m, torch.ones_like(m))
    r = torch.where(y == 1, -p, torch.where(y == 0, q, r_soft))
    modulating = torch.where(g_t == 0, torch.ones_like(m), m**g_t)
    g = modulating * ((p - y) + g_t * (ce * r))
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


# ============================================================================ the comparisons


def _gamma_bound(gamma) -> float:
    return max(gamma.gammas) if isinstance(gamma, GammaSchedule) else float(gamma)


def assert_softmax_matches_reference(x, t, gen, *, grad: bool = True, grad_output=None, **kw):
    """Fused softmax loss and gradient (random grad_output) against the float64 reference, every element."""
    dtype = x.dtype
    reduction = kw.get("reduction", "mean")
    gamma = kw.get("gamma", 2.0)
    if grad and grad_output is None:
        grad_output = randn(t.shape if reduction == "none" else (), gen, dtype=dtype, device=x.device)
    leaf = x.detach().requires_grad_(grad)
    loss = focal_cuda.softmax_focal_loss(leaf, t, **kw)
    ref_kw = dict(kw, alpha=alpha_as_float64(kw.get("alpha")))
    xd = x.detach().double().requires_grad_(grad)
    ref = reference.softmax_focal_loss(xd, t, **ref_kw)
    assert loss.dtype == dtype and loss.shape == ref.shape and loss.device == x.device
    floor_args = (x, t, kw.get("alpha"), kw.get("ignore_index", -100), reduction)
    assert_close_scaled(loss, ref, dtype, f"loss {kw}", atol_floor=conditioning_floor(*floor_args))
    if not grad:
        return loss, None
    (g,) = torch.autograd.grad(loss, leaf, grad_output)
    (ref_g,) = torch.autograd.grad(ref, xd, grad_output.double())
    if torch.isnan(ref_g).any():  # autograd of q**g at q == 0 with g < 1: the closed form there
        cf = softmax_closed_form_grad(x, t, gamma, ref_kw.get("alpha"), kw.get("ignore_index", -100), reduction,
                                      grad_output)
        ref_g = torch.where(torch.isnan(ref_g) & torch.isfinite(cf), cf, ref_g)
    assert g.dtype == dtype and g.shape == x.shape
    floor = conditioning_floor(*floor_args, grad_output=grad_output, gamma=_gamma_bound(gamma))
    assert_close_scaled(g, ref_g, dtype, f"grad {kw}", atol_floor=floor)
    return loss, g


def assert_sigmoid_matches_reference(x, t, gen, *, grad: bool = True, grad_output=None, **kw):
    dtype = x.dtype
    reduction = kw.get("reduction", "none")
    if grad and grad_output is None:
        grad_output = randn(x.shape if reduction == "none" else (), gen, dtype=dtype, device=x.device)
    leaf = x.detach().requires_grad_(grad)
    loss = focal_cuda.sigmoid_focal_loss(leaf, t, **kw)
    xd = x.detach().double().requires_grad_(grad)
    ref = reference.sigmoid_focal_loss(xd, t.double() if t.is_floating_point() else t, **kw)
    assert loss.dtype == dtype and loss.shape == ref.shape and loss.device == x.device
    assert_close_scaled(loss, ref, dtype, f"loss {kw}")
    if not grad:
        return loss, None
    (g,) = torch.autograd.grad(loss, leaf, grad_output)
    (ref_g,) = torch.autograd.grad(ref, xd, grad_output.double())
    if torch.isnan(ref_g).any():
        cf = sigmoid_closed_form_grad(x, t, grad_output=grad_output, **kw)
        ref_g = torch.where(torch.isnan(ref_g) & torch.isfinite(cf), cf, ref_g)
    assert g.dtype == dtype and g.shape == x.shape
    assert_close_scaled(g, ref_g, dtype, f"grad {kw}")
    return loss, g


# ============================================================================ the schedule object


def test_schedule_spellings():
    flsd = GammaSchedule.flsd53()
    assert flsd == GammaSchedule(thresholds=(0.2, 0.5), gammas=(5, 3, 3))
    assert flsd.thresholds == (0.2, 0.5) and flsd.gammas == (5.0, 3.0, 3.0)
    assert all(type(v) is float for v in flsd.thresholds + flsd.gammas)
    assert GammaSchedule([0.3], [1, 2]) == GammaSchedule((0.3,), (1.0, 2.0))
    assert hash(flsd) == hash(GammaSchedule.flsd53())
    assert "thresholds=(0.2, 0.5)" in repr(flsd) and "gammas=(5.0, 3.0, 3.0)" in repr(flsd)
    assert GammaSchedule((), (2.0,)).is_constant and not flsd.is_constant
    m = focal_cuda.FusedFocalLoss(gamma="flsd53")
    assert m.gamma == flsd and "GammaSchedule" in repr(m)
    assert focal_cuda.FusedFocalLoss(gamma=2).gamma == 2.0


def test_schedule_rule_plainly():
    s = GammaSchedule((0.2, 0.5), (5.0, 3.0, 1.0))
    p = torch.tensor([0.0, 0.1, 0.19999, 0.2, 0.3, 0.49999, 0.5, 0.9, 1.0, math.nan], dtype=torch.float64)
    assert s.gamma_of(p).tolist()[:-1] == [5.0, 5.0, 5.0, 3.0, 3.0, 3.0, 1.0, 1.0, 1.0]
    assert s.gamma_of(p)[-1] == 1.0  # NaN: no p_t < t holds
    # float32 p_t meets the thresholds as given, not rounded to float32: float32(0.7) < 0.7
    s7 = GammaSchedule((0.7,), (2.0, 0.0))
    p32 = torch.tensor([0.7], dtype=torch.float32)
    assert float(p32) < 0.7 and s7.gamma_of(p32).item() == 2.0
    assert reference.scheduled_gamma(p32, s7).item() == 2.0
    assert reference.scheduled_gamma(p32, 1.5).item() == 1.5


BAD_SCHEDULES = [
    (((0.5, 0.2), (1.0, 2.0, 3.0)), ValueError, r"strictly increasing.*thresholds=\(0\.5, 0\.2\)"),
    (((0.2, 0.2), (1.0, 2.0, 3.0)), ValueError, r"strictly increasing.*thresholds=\(0\.2, 0\.2\)"),
    (((0.0,), (1.0, 2.0)), ValueError, r"\(0, 1\].*thresholds=\(0\.0,\)"),
    (((1.5,), (1.0, 2.0)), ValueError, r"\(0, 1\].*thresholds=\(1\.5,\)"),
    (((math.nan,), (1.0, 2.0)), ValueError, r"thresholds=\(nan,\)"),
    (((0.2,), (1.0,)), ValueError, r"one entry more.*thresholds=\(0\.2,\).*gammas=\(1\.0,\)"),
    (((0.2,), (1.0, 2.0, 3.0)), ValueError, r"one entry more.*gammas=\(1\.0, 2\.0, 3\.0\)"),
    (((0.2,), (-1.0, 2.0)), ValueError, r"gammas.*>= 0.*gammas=\(-1\.0, 2\.0\)"),
    (((0.2,), (math.inf, 2.0)), ValueError, r"gammas=\(inf, 2\.0\)"),
    ((tuple(i / 10 for i in range(1, 9)), (1.0,) * 9), ValueError, r"at most 7 thresholds"),
    (("0.2", (1.0, 2.0)), TypeError, r"thresholds must be a sequence of numbers.*thresholds='0\.2'"),
    (((0.2,), (True, 2.0)), TypeError, r"gammas.*gammas=\(True, 2\.0\)"),
    ((0.2, (1.0, 2.0)), TypeError, r"thresholds=0\.2"),
]


@pytest.mark.parametrize("args,error,pattern", BAD_SCHEDULES, ids=range(len(BAD_SCHEDULES)))
def test_bad_schedule(args, error, pattern):
    with pytest.raises(error, match=pattern):
        GammaSchedule(*args)


BAD_GAMMAS = [("flsd", r"gamma='flsd'"), (-1.0, r"gamma=-1\.0"), (math.nan, r"gamma=nan"), (True, r"gamma=True"),
              ([5.0, 3.0], r"gamma=\[5\.0, 3\.0\]"), (None, r"gamma=None"), (math.inf, r"gamma=inf")]


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bad,pattern", BAD_GAMMAS, ids=[str(b) for b, _ in BAD_GAMMAS])
def test_bad_gamma_named_before_anything_runs(device, gen, bad, pattern):
    x = randn((4, 3), gen, device=device).requires_grad_()
    t = make_target(x.shape, gen, device=device)
    y = x.detach().sigmoid()
    with _RecordOps() as record:
        for fn, args in ((focal_cuda.softmax_focal_loss, (x, t)), (focal_cuda.sigmoid_focal_loss, (x, y)),
                         (reference.softmax_focal_loss, (x, t)), (reference.sigmoid_focal_loss, (x, y))):
            with pytest.raises(ValueError, match=r"gamma must be a finite number >= 0, a GammaSchedule.*" + pattern):
                fn(*args, gamma=bad)
        with pytest.raises(ValueError, match=pattern):
            focal_cuda.FusedFocalLoss(gamma=bad)
    assert not any("focal_cuda" in op for op in record.ops), record.ops


OP_ERRORS = [
    (dict(gamma_thresholds=[0.2, 0.5], gamma_values=[5.0]), r"gamma_thresholds.*same length.*gamma_values"),
    (dict(gamma_thresholds=[0.5, 0.2], gamma_values=[5.0, 3.0]), r"strictly increasing.*gamma_thresholds"),
    (dict(gamma_thresholds=[1.5], gamma_values=[5.0]), r"\(0, 1\].*gamma_thresholds"),
    (dict(gamma_thresholds=[0.5], gamma_values=[-5.0]), r"gamma_values.*-5"),
    (dict(gamma_thresholds=[0.1 * k for k in range(1, 9)], gamma_values=[1.0] * 8), r"at most 7"),
    (dict(loss_dtype=torch.float64), r"loss_dtype.*Double"),
]


@pytest.mark.parametrize("kw,pattern", OP_ERRORS, ids=range(len(OP_ERRORS)))
@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_op_level_checks(device, gen, loss, kw, pattern):
    """The ops validate the schedule and loss_dtype themselves (a direct op call), naming the argument."""
    x = randn((4, 3), gen, device=device)
    with pytest.raises(ValueError, match=pattern):
        if loss == "softmax":
            OP.softmax_focal_loss_forward(x, make_target(x.shape, gen, device=device), None, 1.0, 2.0, -100, 0,
                                          False, **kw)
        else:
            OP.sigmoid_focal_loss_forward(x, x.sigmoid(), 0.25, 2.0, -100, 0, None, False, **kw)


# ============================================================================ the reference vs the public FLSD rule


def public_flsd_gammas(pt: torch.Tensor, gamma_dic: dict, gamma: float) -> list:
    """FocalLossAdaptive.get_gamma_list restated: one .item() per sample (a Python float, i.e. float64);
    p_t at or above the largest key (the public code hard-codes 0.5) takes the module's gamma; else the
    value of the first sorted key above p_t."""
    out = []
    for i in range(pt.shape[0]):
        pt_sample = pt[i].item()
        if pt_sample >= max(gamma_dic):
            out.append(gamma)
            continue
        for key in sorted(gamma_dic):
            if pt_sample < key:
                out.append(gamma_dic[key])
                break
    return out


def public_flsd_loss(input: torch.Tensor, target: torch.Tensor, gamma_dic: dict, gamma: float) -> torch.Tensor:
    """The public forward with gammas chosen from the float32 p_t of its float32 forward (its own ops:
    log_softmax, gather, exp) and the loss evaluated in float64."""
    logpt = F.log_softmax(input, dim=1).gather(1, target.view(-1, 1)).view(-1)
    gammas = torch.tensor(public_flsd_gammas(logpt.exp(), gamma_dic, gamma), dtype=torch.float64)
    logpt64 = F.log_softmax(input.double(), dim=1).gather(1, target.view(-1, 1)).view(-1)
    return -((1 - logpt64.exp()) ** gammas) * logpt64


def _as_public(schedule: GammaSchedule) -> tuple[dict, float]:
    return dict(zip(schedule.thresholds, schedule.gammas)), schedule.gammas[-1]


def threshold_rows(schedule: GammaSchedule, per_side: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 logits (M, 2), target 0, whose float32 p_t (log_softmax, gather, exp, as the public code) are,
    for every threshold: the largest reachable values below it, the smallest at or above it, and the
    threshold's own float32 value where some logits reach it (exp of a float32 misses some floats: float32(0.2)
    is not reachable, float32(0.5) and float32(0.7) are). Found by scanning consecutive float32 logits."""
    rows, found = [], []
    for threshold in schedule.thresholds:
        if threshold >= 1.0:
            continue
        shift = torch.linspace(-0.05, 0.05, 41, dtype=torch.float32)
        centre = (math.log(threshold / (1 - threshold)) + shift).to(torch.float32)
        ks = torch.arange(-150, 150, dtype=torch.int32)
        a = (centre.view(torch.int32)[:, None] + ks[None, :]).view(torch.float32).reshape(-1)
        b = shift[:, None].expand(-1, len(ks)).reshape(-1)
        cand = torch.stack([a + b, b], 1)  # p_t = sigmoid(a) in exact arithmetic
        pt = F.log_softmax(cand, 1)[:, 0].exp().double()
        below = torch.unique(pt[pt < threshold])[-per_side:]
        above = torch.unique(pt[pt >= threshold])[:per_side]
        t32 = float(torch.tensor(threshold, dtype=torch.float32))
        for v in torch.cat([below, above]).tolist() + [t32]:
            hit = (pt == v).nonzero()
            if len(hit):
                rows.append(cand[hit[0, 0]])
                found.append(v)
        assert len(below) == per_side and len(above) == per_side
    return torch.stack(rows), torch.tensor(found, dtype=torch.float64)


@pytest.mark.parametrize("schedule_id", ["flsd53", "fractional", "seven"])
def test_reference_equals_public_rule_at_thresholds(schedule_id):
    schedule = SCHEDULES[schedule_id]
    x, expected_pt = threshold_rows(schedule)
    t = torch.zeros(x.shape[0], dtype=torch.long)
    pt = F.log_softmax(x, 1)[:, 0].exp()
    assert pt.double().tolist() == expected_pt.tolist()
    # values exactly at a threshold's float32, below it (0.7: float32(0.7) < 0.7) and above it (0.5)
    reached = set(expected_pt.tolist())
    assert float(torch.tensor(0.5, dtype=torch.float32)) in reached or 0.5 not in schedule.thresholds
    gamma_dic, default = _as_public(schedule)
    public = public_flsd_gammas(pt, gamma_dic, default)
    assert reference.scheduled_gamma(pt, schedule).tolist() == public
    assert len(set(public)) > 1
    ref = reference.softmax_focal_loss(x, t, gamma=schedule, reduction="none")
    torch.testing.assert_close(ref.double(), public_flsd_loss(x, t, gamma_dic, default), rtol=1e-5, atol=1e-7)


def test_flsd53_is_the_public_default():
    """FLSD-53 as the paper's code runs it: FocalLossAdaptive(gamma=3) with gamma_dic {0.2: 5.0, 0.5: 3.0}."""
    schedule = GammaSchedule.flsd53()
    assert _as_public(schedule) == ({0.2: 5.0, 0.5: 3.0}, 3.0)
    assert focal_cuda.schedule.PRESETS["flsd53"] == schedule


@pytest.mark.parametrize("seed", range(4))
def test_reference_equals_public_rule_random(seed):
    gen = torch.Generator().manual_seed(seed)
    schedule = list(SCHEDULES.values())[seed]
    x = (torch.randn(3000, 7, generator=gen) * (0.5 + seed)).to(torch.float32)
    t = torch.randint(0, 7, (3000,), generator=gen)
    xt, _ = threshold_rows(schedule)
    x = torch.cat([x, F.pad(xt, (0, 5), value=-30.0)])  # the constructed rows, five far-away classes added
    t = torch.cat([t, torch.zeros(len(xt), dtype=torch.long)])
    gamma_dic, default = _as_public(schedule)
    logpt = F.log_softmax(x, 1).gather(1, t.view(-1, 1)).view(-1)
    assert reference.scheduled_gamma(logpt.exp(), schedule).tolist() == public_flsd_gammas(logpt.exp(), gamma_dic,
                                                                                           default)
    ref = reference.softmax_focal_loss(x, t, gamma=schedule, reduction="none")
    torch.testing.assert_close(ref.double(), public_flsd_loss(x, t, gamma_dic, default), rtol=1e-5, atol=1e-7)
    # the float64 reference on float64 logits: the same rule on float64 p_t
    ref64 = reference.softmax_focal_loss(x.double(), t, gamma=schedule, reduction="none")
    logpt64 = F.log_softmax(x.double(), 1).gather(1, t.view(-1, 1)).view(-1)
    g64 = torch.tensor(public_flsd_gammas(logpt64.exp(), gamma_dic, default), dtype=torch.float64)
    torch.testing.assert_close(ref64, -((1 - logpt64.exp()) ** g64) * logpt64, rtol=1e-12, atol=1e-14)


# ============================================================================ the kernels at the thresholds


def _ulp_shift(p: torch.Tensor, k: int) -> torch.Tensor:
    """float32 p moved by k ulps."""
    return (p.to(torch.float32).view(torch.int32) + k).view(torch.float32)


@pytest.mark.parametrize("layout", ["rows", "channels"])
@pytest.mark.parametrize("schedule_id", ["flsd53", "fractional", "seven"])
def test_softmax_kernel_at_thresholds(device, schedule_id, layout):
    """Next to and exactly at each threshold (float32 p_t), the fused op picks the piece the public rule picks
    from torch's float32 p_t, or, where torch's p_t is within one ulp of the threshold, possibly its neighbour:
    the kernel applies the same exact rule to its own p_t = exp(log p_t), and exp implementations (torch's,
    glibc's, the vectorised Sleef one of the channel-first path) round a few values differently in the last
    bit. Rows two or more ulps away must match exactly."""
    schedule = SCHEDULES[schedule_id]
    x, _ = threshold_rows(schedule)
    t = torch.zeros(x.shape[0], dtype=torch.long)
    gamma_dic, default = _as_public(schedule)
    pt = F.log_softmax(x, 1)[:, 0].exp()
    options = [torch.tensor(public_flsd_gammas(_ulp_shift(pt, k), gamma_dic, default), dtype=torch.float64)
               for k in (-1, 0, 1)]
    logp = torch.log_softmax(x.double(), 1)
    q, p = -torch.expm1(logp[:, 0]), logp[:, 0].exp()
    go = torch.linspace(-1, 1, len(t), dtype=torch.float32)
    if layout == "channels":  # (1, C, S): the tile path
        xin, tin, go_in = x.t().contiguous().unsqueeze(0), t.unsqueeze(0), go.unsqueeze(0)
    else:
        xin, tin, go_in = x, t, go
    leaf = xin.to(device).requires_grad_()
    loss = focal_cuda.softmax_focal_loss(leaf, tin.to(device), gamma=schedule, reduction="none")
    (g,) = torch.autograd.grad(loss, leaf, go_in.to(device))
    loss = loss.reshape(-1).double().cpu()
    g = g.detach().cpu().double()
    g = g.squeeze(0).t() if layout == "channels" else g
    matched = torch.zeros(len(t), dtype=torch.bool)
    for gammas in options:
        expected = -(q**gammas) * logp[:, 0]
        hit = (loss - expected).abs() <= 1e-5 * expected.abs() + 1e-7
        # the gradient of the piece taken (gamma a constant of the position)
        coef = q**gammas * (1 - gammas * p * logp[:, 0] / q) * go.double()
        expected_g = coef.unsqueeze(1) * (logp.exp() - F.one_hot(t, 2).double())
        torch.testing.assert_close(g[hit], expected_g[hit], rtol=1e-4, atol=1e-7)
        matched |= hit
    assert matched.all(), f"rows {matched.logical_not().nonzero().flatten().tolist()} match no piece"
    unambiguous = (options[0] == options[1]) & (options[1] == options[2])
    exact = -(q ** options[1]) * logp[:, 0]
    torch.testing.assert_close(loss[unambiguous], exact[unambiguous], rtol=1e-5, atol=1e-7)
    assert unambiguous.sum() >= len(t) // 2 and (~unambiguous).any()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("loss", ["softmax", "sigmoid", "sigmoid_index"])
def test_p_t_exactly_one_half(device, loss, dtype):
    """p_t = 1/2 exactly (sigmoid(0); softmax of two equal logits: exp(-log 2) is within 1e-9 of 1/2, far
    inside half an ulp). A threshold of exactly 0.5 puts it in the upper piece; 0.5 + 1e-12 in the lower one
    (the float32 threshold is rounded up, not to the nearest float, which would be 0.5); 0.5 - 1e-12 upper."""
    for threshold, expected_gamma in ((0.5, 1.0), (0.5 + 1e-12, 4.0), (0.5 - 1e-12, 1.0)):
        schedule = GammaSchedule((threshold,), (4.0, 1.0))
        if loss == "softmax":
            x = torch.zeros(3, 2, dtype=dtype, device=device)
            out = focal_cuda.softmax_focal_loss(x, torch.tensor([0, 1, 0], device=device), gamma=schedule,
                                                reduction="none")
            expected = math.log(2) * 0.5**expected_gamma
        else:
            x = torch.zeros(3, 4, dtype=dtype, device=device)
            t = (torch.tensor([0, 4, 2], device=device) if loss == "sigmoid_index"
                 else torch.tensor([[1.0, 0, 0, 0.5]] * 3, dtype=dtype, device=device))
            out = focal_cuda.sigmoid_focal_loss(x, t, alpha=-1.0, gamma=schedule, reduction="none")
            expected = math.log(2) * 0.5**expected_gamma
        torch.testing.assert_close(out.double().cpu(), torch.full(out.shape, expected, dtype=torch.float64),
                                   rtol=2 * torch.finfo(dtype).eps, atol=0, msg=f"threshold {threshold!r}")


def test_threshold_one_follows_the_compute_precision(device):
    """Logits (20, 0): p_t = 1 - 2e-9 is exactly 1 in float32 (at the threshold 1.0: the last piece, gamma 2,
    whose gradient vanishes at p_t = 1) and below 1 in float64 (the first piece, gamma 0: cross-entropy's
    gradient p - onehot), for the kernels and the reference alike: the rule applies to the computed p_t."""
    schedule = GammaSchedule((1.0,), (0.0, 2.0))
    t = torch.tensor([0], device=device)
    e = math.exp(-20.0) / (1 + math.exp(-20.0))
    for dtype in (torch.float32, torch.float64):
        for fn in (focal_cuda.softmax_focal_loss, reference.softmax_focal_loss):
            x = torch.tensor([[20.0, 0.0]], dtype=dtype, device=device, requires_grad=True)
            fn(x, t, gamma=schedule, reduction="sum").backward()
            expected = [[0.0, 0.0]] if dtype == torch.float32 else [[-e, e]]
            torch.testing.assert_close(x.grad.cpu().double(), torch.tensor(expected, dtype=torch.float64),
                                       rtol=1e-6, atol=0, msg=f"{fn.__module__} {dtype}")


def test_sigmoid_kernel_near_thresholds(device):
    """Near each threshold the sigmoid kernel's p_t (p = 1/(1+e) or e/(1+e), e = exp(-|x|)) may round
    differently from torch.sigmoid by an ulp: within 2 ulps of a threshold either piece is accepted; beyond,
    the kernel matches the reference's piece exactly (float32 p_t, as torch computes it)."""
    schedule = GammaSchedule((0.1, 0.2, 0.35, 0.5, 0.7), (6.0, 5.0, 4.0, 3.0, 2.0, 1.0))
    xs = []
    for threshold in schedule.thresholds:
        centre = torch.tensor(math.log(threshold / (1 - threshold)), dtype=torch.float32)
        if centre == 0:  # consecutive floats around 0 are not consecutive integers
            xs.append(torch.linspace(-2e-6, 2e-6, 801, dtype=torch.float32))
        else:
            xs.append((centre.view(torch.int32) + torch.arange(-400, 400, dtype=torch.int32)).view(torch.float32))
    x = torch.cat(xs)
    x = torch.stack([x, -x], 1)  # y = 1 on column 0, y = 0 on column 1: p_t = sigmoid(x) on both
    y = torch.tensor([[1.0, 0.0]]).expand_as(x).contiguous()
    out = focal_cuda.sigmoid_focal_loss(x.to(device), y.to(device), alpha=-1.0, gamma=schedule).cpu().double()
    pt32 = torch.where(y == 1, torch.sigmoid(x), torch.sigmoid(-x))  # torch's float32 p_t, as the reference's
    ce = F.binary_cross_entropy_with_logits(x.double(), y.double(), reduction="none")
    m = torch.sigmoid(-x.double())
    m = torch.stack([m[:, 0], m[:, 0]], 1)
    options = []
    for shift in (-2, 0, 2):  # the piece at p_t moved by up to 2 ulps either way
        p_shifted = (pt32.view(torch.int32) + shift).view(torch.float32)
        g = reference.scheduled_gamma(p_shifted, schedule)
        options.append(ce * m**g)
    exact = (options[0] == options[2])
    torch.testing.assert_close(out[exact], options[1][exact], rtol=1e-5, atol=0)
    either = torch.stack([(out - o).abs() <= 1e-5 * o.abs() for o in options]).any(0)
    assert either.all()
    assert (~exact).sum() > 0 and exact.sum() > 1000


# ============================================================================ softmax: the fused op vs the reference

SHAPES = [(1, 1), (3, 1), (37, 10), (129, 70), (5, 3000), (7, 3, 5), (2, 5, 3, 4), (2, 19, 9, 11), (1, 4, 2, 3, 5)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("schedule_id", SCHEDULE_IDS)
def test_softmax_shapes(device, gen, schedule_id, shape, reduction):
    schedule = SCHEDULES[schedule_id]
    x = randn(shape, gen, device=device, scale=2.5)
    t = make_target(shape, gen, device=device, ignore_frac=0.2)
    x = away_from_thresholds(x, t, schedule)
    assert_softmax_matches_reference(x, t, gen, gamma=schedule, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(6, 11, 5), (37, 10), (4096, 3)], ids=_ids)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("schedule_id", ["flsd53", "fractional"])
def test_softmax_dtypes(device, gen, schedule_id, dtype, shape, reduction):
    schedule = SCHEDULES[schedule_id]
    x = randn(shape, gen, device=device, dtype=dtype, scale=2.5)
    t = make_target(shape, gen, device=device, ignore_frac=0.1)
    x = away_from_thresholds(x, t, schedule)
    assert_softmax_matches_reference(x, t, gen, gamma=schedule, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha_kind", [None, "float", "list", "tensor"])
@pytest.mark.parametrize("schedule_id", SCHEDULE_IDS)
def test_softmax_alpha(device, gen, schedule_id, alpha_kind, reduction):
    schedule = SCHEDULES[schedule_id]
    x = randn((9, 6, 7), gen, device=device, scale=2.0)
    t = make_target(x.shape, gen, device=device, ignore_frac=0.2)
    x = away_from_thresholds(x, t, schedule)
    alpha = make_alpha(alpha_kind, 6, gen, device)
    assert_softmax_matches_reference(x, t, gen, gamma=schedule, alpha=alpha, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("target_dtype,ignore_index", [(torch.uint8, 255), (torch.int16, -1), (torch.int32, 0),
                                                        (torch.int64, -100)], ids=_ids)
def test_softmax_ignore_index_and_target_dtypes(device, gen, target_dtype, ignore_index, reduction):
    schedule = SCHEDULES["flsd53"]
    x = randn((4, 5, 6, 3), gen, device=device, scale=2.0)
    t = make_target(x.shape, gen, device=device, ignore_index=ignore_index, ignore_frac=0.3)
    t = torch.where(t == ignore_index, t, t.clamp(min=1)) if ignore_index == 0 else t
    x = away_from_thresholds(x, t, schedule, ignore_index)
    assert_softmax_matches_reference(x, t.to(target_dtype), gen, gamma=schedule, ignore_index=ignore_index,
                                     reduction=reduction)


def _layout(kind: str, gen, device, dtype=torch.float32) -> torch.Tensor:
    if kind == "channels_last":
        return randn((2, 5, 4, 6), gen, device=device, dtype=dtype, scale=2.0).to(memory_format=torch.channels_last)
    if kind == "transposed":
        return randn((7, 33), gen, device=device, dtype=dtype, scale=2.0).t()
    if kind == "sliced_rows":
        return randn((40, 9), gen, device=device, dtype=dtype, scale=2.0)[::3]
    if kind == "sliced_classes":
        return randn((6, 16, 5), gen, device=device, dtype=dtype, scale=2.0)[:, ::2]
    if kind == "permuted_spatial":  # spatial dims that do not collapse: made contiguous once
        return randn((2, 3, 5, 4), gen, device=device, dtype=dtype, scale=2.0).permute(0, 1, 3, 2)
    raise ValueError(kind)


LAYOUTS = ["channels_last", "transposed", "sliced_rows", "sliced_classes", "permuted_spatial"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_softmax_non_contiguous(device, gen, kind, reduction):
    schedule = SCHEDULES["fractional"]
    x = _layout(kind, gen, device)
    t = make_target(x.shape, gen, device=device, ignore_frac=0.2)
    x = away_from_thresholds(x, t, schedule)
    assert not x.is_contiguous()
    assert_softmax_matches_reference(x, t, gen, gamma=schedule, reduction=reduction)
    # a non-contiguous target too
    t2 = make_target((x.shape[0], x.shape[1], *x.shape[2:], 2), gen, device=device)[..., 0] if x.dim() > 2 else None
    if t2 is not None:
        assert_softmax_matches_reference(x, t2, gen, gamma=schedule, reduction=reduction, grad=False)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0, 3), (0, 4, 5), (3, 4, 0), (2, 0, 3)], ids=_ids)
def test_softmax_empty(device, gen, shape, reduction):
    x = torch.zeros(shape, device=device).requires_grad_()
    t = torch.zeros((shape[0], *shape[2:]), dtype=torch.long, device=device)
    if shape[1] == 0 and t.numel():
        return
    loss = focal_cuda.softmax_focal_loss(x, t, gamma="flsd53", reduction=reduction)
    assert loss.shape == (t.shape if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0
    loss.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softmax_all_ignored(device, gen, dtype, reduction):
    x = randn((5, 4, 3), gen, device=device, dtype=dtype).requires_grad_()
    t = torch.full((5, 3), -100, device=device)
    loss = focal_cuda.softmax_focal_loss(x, t, gamma="flsd53", reduction=reduction)
    assert (loss == 0).all()
    loss.sum().backward()
    assert (x.grad == 0).all()


# Thresholds away from the saturated cases' p_t (0, 1, 1/2, 1/7), pieces with gamma < 1 included.
SATURATION_SCHEDULES = [SCHEDULES["fractional"], GammaSchedule((0.05, 0.2, 0.9), (0.25, 3.0, 0.5, 2.0))]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("schedule", SATURATION_SCHEDULES, ids=["fractional", "low"])
@pytest.mark.parametrize("dtype,scale", SOFTMAX_SATURATION, ids=_ids)
def test_softmax_saturated(device, gen, dtype, scale, schedule, reduction):
    """The constant-gamma suite's saturated logits (p_y == 1 exactly, 1 - p tiny, ties, p_y -> 0, up to the
    dtype's range) with a schedule: finite, and equal to the reference / the closed-form gradient."""
    x, t = softmax_saturated_case(dtype, scale, gen, device)
    go = randn(t.shape if reduction == "none" else (), gen, device=device, dtype=dtype)
    leaf = x.detach().requires_grad_()
    loss = focal_cuda.softmax_focal_loss(leaf, t, gamma=schedule, reduction=reduction)
    (g,) = torch.autograd.grad(loss, leaf, go)
    ref = reference.softmax_focal_loss(x.double(), t, gamma=schedule, reduction=reduction)
    assert torch.isfinite(ref.to(dtype)).all(), "test setup: reference representable"
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    if reduction == "none":
        assert_close_scaled(loss[:10], ref[:10], dtype, "loss rows 0-9")
        assert_close_scaled(loss[10:], ref[10:], dtype, "loss rows 10-11")
    else:
        assert_close_scaled(loss, ref, dtype, "loss")
    assert_close_scaled(g, softmax_closed_form_grad(x, t, schedule, reduction=reduction, grad_output=go), dtype,
                        "grad")


def test_softmax_nan_propagates(device, gen):
    x = randn((4, 3), gen, device=device)
    x[1, 2] = math.nan
    loss = focal_cuda.softmax_focal_loss(x, torch.tensor([0, 0, 1, 2], device=device), gamma="flsd53",
                                         reduction="none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("schedule_id", ["flsd53", "fractional"])
def test_softmax_gradcheck(device, gen, schedule_id, reduction):
    schedule = SCHEDULES[schedule_id]
    x = randn((5, 4, 3), gen, device=device, dtype=torch.float64, scale=2.0)
    t = make_target(x.shape, gen, device=device, ignore_frac=0.2)
    x = away_from_thresholds(x, t, schedule).requires_grad_()
    alpha = make_alpha("tensor", 4, gen, device).double()
    kwargs = dict(target=t, gamma=schedule, alpha=alpha, reduction=reduction)
    # the wrapper re-runs the fused forward in every backward (gradcheck runs several through one graph)
    assert torch.autograd.gradcheck(lambda inp: SoftmaxFreshForward.apply(inp, kwargs), (x,), eps=1e-6, atol=1e-7)


# ============================================================================ sigmoid: the fused op vs the reference

SIGMOID_SHAPES = [(1, 1), (37, 10), (3, 7, 5), (2, 513), (4097, 3), (2, 3, 4, 5)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", ["binary", "soft", "mixed", "index"])
@pytest.mark.parametrize("shape", SIGMOID_SHAPES, ids=_ids)
@pytest.mark.parametrize("schedule_id", SCHEDULE_IDS)
def test_sigmoid_shapes_and_targets(device, gen, schedule_id, shape, mode, reduction):
    schedule = SCHEDULES[schedule_id]
    x = randn(shape, gen, device=device, scale=2.5)
    if mode == "index":
        t = make_index_targets(shape, gen, device=device, ignore_frac=0.2)
    else:
        t = make_dense_targets(shape, gen, kind=mode, device=device)
    x, t = away_from_thresholds_sigmoid(x, t, schedule)
    assert_sigmoid_matches_reference(x, t, gen, gamma=schedule, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", ["binary", "index"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("schedule_id", ["flsd53", "fractional"])
def test_sigmoid_dtypes(device, gen, schedule_id, dtype, mode, reduction):
    schedule = SCHEDULES[schedule_id]
    x = randn((129, 7), gen, device=device, dtype=dtype, scale=2.5)
    t = (make_index_targets(x.shape, gen, device=device, ignore_frac=0.1) if mode == "index"
         else make_dense_targets(x.shape, gen, dtype=torch.float32, device=device))  # float32 targets, 16-bit logits
    x, t = away_from_thresholds_sigmoid(x, t, schedule)
    assert_sigmoid_matches_reference(x, t, gen, gamma=schedule, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("alpha", [0.25, -1.0, 0.9])
@pytest.mark.parametrize("schedule_id", SCHEDULE_IDS)
def test_sigmoid_alpha(device, gen, schedule_id, alpha, reduction):
    schedule = SCHEDULES[schedule_id]
    x = randn((33, 6), gen, device=device, scale=2.5)
    t = make_index_targets(x.shape, gen, device=device, ignore_frac=0.2, ignore_index=-1)
    x, t = away_from_thresholds_sigmoid(x, t, schedule, ignore_index=-1)
    assert_sigmoid_matches_reference(x, t, gen, gamma=schedule, alpha=alpha, reduction=reduction, ignore_index=-1)


@pytest.mark.parametrize("normalizer", [3.5, "tensor"])
def test_sigmoid_normalizer(device, gen, normalizer):
    schedule = SCHEDULES["flsd53"]
    x = randn((20, 2, 5), gen, device=device, scale=2.5)
    t = make_index_targets(x.shape, gen, device=device, ignore_frac=0.2)
    x, t = away_from_thresholds_sigmoid(x, t, schedule)
    n = torch.tensor(7.0, device=device) if normalizer == "tensor" else normalizer
    assert_sigmoid_matches_reference(x, t, gen, gamma=schedule, reduction="mean", normalizer=n)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sigmoid_non_contiguous(device, gen, reduction):
    schedule = SCHEDULES["fractional"]
    x = randn((6, 22), gen, device=device, scale=2.0)[:, ::2]
    t = make_dense_targets((6, 11), gen, kind="soft", device=device)
    x, t = away_from_thresholds_sigmoid(x, t, schedule)
    x = torch.empty((6, 22), device=device)[:, ::2].copy_(x)
    assert not x.is_contiguous()
    assert_sigmoid_matches_reference(x, t, gen, gamma=schedule, reduction=reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", ["dense", "index"])
def test_sigmoid_empty(device, mode, reduction):
    x = torch.zeros((0, 5), device=device).requires_grad_()
    t = torch.zeros((0,), dtype=torch.long, device=device) if mode == "index" else torch.zeros((0, 5), device=device)
    loss = focal_cuda.sigmoid_focal_loss(x, t, gamma="flsd53", reduction=reduction)
    assert loss.shape == (x.shape if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0
    loss.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("mode", ["binary", "soft", "index"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("schedule", SATURATION_SCHEDULES, ids=["fractional", "low"])
@pytest.mark.parametrize("dtype,scale", SIGMOID_SATURATION, ids=_ids)
def test_sigmoid_saturated(device, gen, dtype, scale, schedule, reduction, mode):
    x, t, huge = sigmoid_saturated_case(dtype, scale, mode, gen, device)
    huge = huge.to(device)
    go = randn(x.shape if reduction == "none" else (), gen, device=device, dtype=dtype)
    kw = dict(alpha=0.25, gamma=schedule, reduction=reduction)
    leaf = x.detach().requires_grad_()
    loss = focal_cuda.sigmoid_focal_loss(leaf, t, **kw)
    (g,) = torch.autograd.grad(loss, leaf, go)
    ref = reference.sigmoid_focal_loss(x.double(), t.double() if t.is_floating_point() else t, **kw)
    assert torch.isfinite(ref.to(dtype)).all(), "test setup: reference representable"
    assert torch.isfinite(loss).all() and torch.isfinite(g).all()
    if reduction == "none":
        assert_close_scaled(loss[huge], ref[huge], dtype, "huge element")
        assert_close_scaled(loss[~huge], ref[~huge], dtype, "other elements")
    else:
        assert_close_scaled(loss, ref, dtype, "loss")
    expected_g = sigmoid_closed_form_grad(x, t, grad_output=go, **kw)
    assert torch.isfinite(expected_g).all()
    assert_close_scaled(g, expected_g, dtype, "grad vs closed form")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", ["soft", "index"])
def test_sigmoid_gradcheck(device, gen, mode, reduction):
    schedule = SCHEDULES["fractional"]
    x = randn((6, 5), gen, device=device, dtype=torch.float64, scale=2.0)
    t = (make_index_targets(x.shape, gen, device=device, ignore_frac=0.2) if mode == "index"
         else make_dense_targets(x.shape, gen, kind="soft", dtype=torch.float64, device=device))
    x, t = away_from_thresholds_sigmoid(x, t, schedule)
    x.requires_grad_()
    kwargs = dict(targets=t, alpha=0.25, gamma=schedule, reduction=reduction)
    assert torch.autograd.gradcheck(lambda inp: SigmoidFreshForward.apply(inp, kwargs), (x,), eps=1e-6, atol=1e-7)


# ============================================================================ the schedule as constant gammas


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_single_piece_and_equal_pieces_are_constant_gamma(device, gen, loss, dtype):
    """A schedule without thresholds is the constant gamma, bitwise; one whose pieces all hold gamma 2 takes
    the products path (q * q) and is bitwise the constant gamma 2 too."""
    x = randn((50, 9), gen, device=device, dtype=dtype, scale=2.0)
    if loss == "softmax":
        t = make_target(x.shape, gen, device=device, ignore_frac=0.1)
        fn = focal_cuda.softmax_focal_loss
    else:
        t = make_index_targets(x.shape, gen, device=device, ignore_frac=0.1)
        fn = focal_cuda.sigmoid_focal_loss
    for reduction in REDUCTIONS:
        for schedule, gamma in ((GammaSchedule((), (2.5,)), 2.5), (GammaSchedule((0.2, 0.5), (2.0, 2.0, 2.0)), 2.0)):
            a, b = x.detach().requires_grad_(), x.detach().requires_grad_()
            la = fn(a, t, gamma=schedule, reduction=reduction)
            lb = fn(b, t, gamma=gamma, reduction=reduction)
            assert torch.equal(la, lb), (schedule, reduction)
            la.sum().backward()
            lb.sum().backward()
            assert torch.equal(a.grad, b.grad), (schedule, reduction)


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
@pytest.mark.parametrize("schedule_id", SCHEDULE_IDS)
def test_each_piece_is_its_constant_gamma(device, gen, loss, schedule_id):
    """Kernel against kernel: per position / element, the scheduled loss and gradient equal the constant-gamma
    op's with that position's gamma (the gradient treats the chosen gamma as a constant)."""
    schedule = SCHEDULES[schedule_id]
    if loss == "softmax":
        x = randn((300, 6), gen, device=device, scale=2.0)
        t = make_target(x.shape, gen, device=device)
        x = away_from_thresholds(x, t, schedule)
        fn = focal_cuda.softmax_focal_loss
        piece = reference.scheduled_gamma(softmax_p_t(x, t)[0], schedule)
        per_position = piece
    else:
        x = randn((60, 5), gen, device=device, scale=2.0)
        t = make_dense_targets(x.shape, gen, kind="mixed", device=device)
        x, t = away_from_thresholds_sigmoid(x, t, schedule)
        fn = focal_cuda.sigmoid_focal_loss
        piece = reference.scheduled_gamma(sigmoid_p_t(x, t), schedule)
        per_position = piece
    leaf = x.detach().requires_grad_()
    scheduled = fn(leaf, t, gamma=schedule, reduction="none")
    (g_scheduled,) = torch.autograd.grad(scheduled.sum(), leaf)
    seen = 0
    for gamma in set(schedule.gammas):
        mask = (per_position == gamma).to(device)
        if not mask.any():
            continue
        seen += 1
        leaf_c = x.detach().requires_grad_()
        constant = fn(leaf_c, t, gamma=gamma, reduction="none")
        (g_constant,) = torch.autograd.grad(constant.sum(), leaf_c)
        torch.testing.assert_close(scheduled[mask], constant[mask], rtol=1e-5, atol=1e-7)
        gmask = mask.unsqueeze(1).expand_as(x) if loss == "softmax" else mask
        torch.testing.assert_close(g_scheduled[gmask], g_constant[gmask], rtol=1e-5, atol=1e-7)
    assert seen >= 2


# ============================================================================ loss_dtype and autocast


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", ["softmax", "softmax_channels", "sigmoid", "sigmoid_index"])
def test_float32_loss_of_16bit_logits(device, gen, loss, dtype, reduction):
    """loss_dtype=float32: the per-element (or reduced) loss in float32, the float32 value before the 16-bit
    rounding; the gradient is unchanged, bitwise, in the logits' dtype."""
    if device == "cuda":
        pytest.skip("the CUDA kernels do not support loss_dtype yet")
    code = REDUCTION_CODE[reduction]
    shape = (40, 6, 5) if loss == "softmax_channels" else (40, 6)
    x = randn(shape, gen, device=device, dtype=dtype, scale=2.0)
    for gamma, thresholds, values in ((2.0, [], []), (3.0, [0.2, 0.5], [5.0, 3.0])):
        if loss.startswith("softmax"):
            t = make_target(shape, gen, device=device, ignore_frac=0.2)
            call = lambda ld: OP.softmax_focal_loss_forward(x, t, None, 1.0, gamma, -100, code, True, False,  # noqa: E731
                                                           thresholds, values, ld)
            ref = reference.softmax_focal_loss(x.float(), t, gamma=_sched(gamma, thresholds, values),
                                               reduction=reduction)
        else:
            t = (make_index_targets(shape, gen, device=device, ignore_frac=0.2) if loss == "sigmoid_index"
                 else make_dense_targets(shape, gen, dtype=dtype, device=device))
            call = lambda ld: OP.sigmoid_focal_loss_forward(x, t, 0.25, gamma, -100, code, None, True, False,  # noqa: E731
                                                           thresholds, values, ld)
            ref = reference.sigmoid_focal_loss(x.float(), t.float() if t.is_floating_point() else t,
                                               gamma=_sched(gamma, thresholds, values), reduction=reduction)
        loss32, grad32, state32 = call(torch.float32)
        loss16, grad16, state16 = call(None)
        assert loss32.dtype == torch.float32 and loss16.dtype == dtype and grad32.dtype == dtype
        assert loss32.shape == loss16.shape
        assert torch.equal(grad32, grad16) and torch.equal(state32, state16)
        assert torch.equal(loss32.to(dtype), loss16)
        assert_close_scaled(loss32, ref.double(), torch.float32, f"{loss} {reduction}",
                            atol_floor=1e-6 * float(ref.abs().max()) if ref.numel() else 0.0)


def _sched(gamma, thresholds, values):
    return GammaSchedule(tuple(thresholds), (*values, gamma)) if thresholds else gamma


def _expected_autocast_dtype(device: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if device in _FLOAT32_LOSS_DEVICES else dtype


@pytest.mark.parametrize("gamma", [2.0, "flsd53"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_gives_a_float32_loss(device, gen, amp_dtype, loss, reduction, gamma):
    """Under autocast the 16-bit logits reach the op as they are and the loss is float32, as F.cross_entropy
    returns there; outside autocast the same 16-bit logits give a 16-bit loss."""
    lin = torch.nn.Linear(8, 5).to(device)
    feat = randn((30, 8), gen, device=device)
    t = (make_target((30, 5), gen, device=device, ignore_frac=0.2) if loss == "softmax"
         else make_index_targets((30, 5), gen, device=device, ignore_frac=0.2))
    fn = focal_cuda.softmax_focal_loss if loss == "softmax" else focal_cuda.sigmoid_focal_loss
    ref_fn = reference.softmax_focal_loss if loss == "softmax" else reference.sigmoid_focal_loss
    with torch.autocast(device, dtype=amp_dtype):
        logits = lin(feat)
        assert logits.dtype == amp_dtype
        logits.retain_grad()
        out = fn(logits, t, gamma=gamma, reduction=reduction)
        ref = ref_fn(logits.detach(), t, gamma=gamma, reduction=reduction)
        ce = F.cross_entropy(logits, t.clamp(0, 4))
    assert ce.dtype == torch.float32 and ref.dtype == torch.float32
    assert out.dtype == _expected_autocast_dtype(device, amp_dtype)
    out.sum().backward()
    assert logits.grad.dtype == amp_dtype and torch.isfinite(logits.grad).all()
    outside = fn(logits.detach(), t, gamma=gamma, reduction=reduction)
    assert outside.dtype == amp_dtype
    assert torch.equal(out.to(amp_dtype), outside)
    assert_close_scaled(out, ref.double(), out.dtype, "autocast vs reference")


def test_autocast_for_another_device_does_not_apply(gen):
    """Autocast enabled for CUDA only leaves a CPU op's loss in the logits' dtype."""
    x = randn((6, 4), gen, dtype=torch.bfloat16)
    t = make_target(x.shape, gen)
    with torch.autocast("cuda", dtype=torch.float16, enabled=CUDA):
        assert focal_cuda.softmax_focal_loss(x, t).dtype == torch.bfloat16


# ============================================================================ autograd, compile, opcheck, module


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_no_grad_and_deterministic(device, gen, loss):
    x = randn((300, 7, 3), gen, device=device, scale=2.0)
    if loss == "softmax":
        t = make_target(x.shape, gen, device=device, ignore_frac=0.2)
        fn = focal_cuda.softmax_focal_loss
    else:
        t = make_index_targets(x.shape, gen, device=device, ignore_frac=0.2)
        fn = focal_cuda.sigmoid_focal_loss
    leaf = x.requires_grad_()
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads), 1):
            torch.set_num_threads(n)
            results.append(fn(leaf, t, gamma="flsd53", reduction="sum"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)
    with torch.no_grad():
        assert torch.equal(fn(leaf, t, gamma="flsd53", reduction="sum"), results[0])


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
def test_torch_compile(device, gen, loss, backend, reduction):
    torch._dynamo.reset()
    x0 = randn((6, 5, 3), gen, device=device)
    schedule = SCHEDULES["fractional"]
    if loss == "softmax":
        t = make_target(x0.shape, gen, device=device, ignore_frac=0.2)
        x0 = away_from_thresholds(x0 * 1.5, t, schedule) / 1.5

        def fn(x, t):
            a = focal_cuda.softmax_focal_loss(x * 1.5, t, gamma=schedule, reduction=reduction)
            b = focal_cuda.softmax_focal_loss(x * 1.5, t, gamma="flsd53", reduction=reduction)
            return (a + b).sum() + x.square().sum() * 0.01
    else:
        t = make_index_targets(x0.shape, gen, device=device, ignore_frac=0.2)
        x0, t = away_from_thresholds_sigmoid(x0, t, schedule)

        def fn(x, t):
            a = focal_cuda.sigmoid_focal_loss(x, t, gamma=GammaSchedule((0.3,), (2.0, 0.5)), reduction=reduction)
            b = focal_cuda.sigmoid_focal_loss(x, t, gamma=schedule, reduction=reduction)
            return (a * 2 + b).sum()

    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    xe, xc = x0.clone().requires_grad_(), x0.clone().requires_grad_()
    eager = fn(xe, t)
    eager.backward()
    out = compiled(xc, t)
    out.backward()
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(xc.grad, xe.grad)


def test_torch_compile_autocast(device, gen):
    torch._dynamo.reset()
    lin = torch.nn.Linear(8, 5).to(device)
    feat = randn((30, 8), gen, device=device)
    t = make_target((30, 5), gen, device=device)

    def step(feat, t):
        with torch.autocast(device, dtype=torch.bfloat16):
            return focal_cuda.softmax_focal_loss(lin(feat), t, gamma="flsd53", reduction="none")

    eager = step(feat, t)
    out = torch.compile(step, backend="aot_eager", fullgraph=True)(feat, t)
    assert out.dtype == eager.dtype == _expected_autocast_dtype(device, torch.bfloat16)
    torch.testing.assert_close(out, eager)


def _opcheck_samples(device, gen):
    x3 = randn((4, 5, 3), gen, device=device).requires_grad_()
    t3 = make_target(x3.shape, gen, device=device, ignore_frac=0.2)
    x2 = randn((6, 4), gen, device=device).requires_grad_()
    t2 = make_target(x2.shape, gen, device=device, dtype=torch.uint8, ignore_index=255, ignore_frac=0.3)
    xh = randn((3, 6, 2), gen, device=device, dtype=torch.bfloat16)
    th = make_target(xh.shape, gen, device=device, dtype=torch.int32)
    softmax = [
        (x3, t3, None, 1.0, 3.0, -100, 1, True, False, [0.2, 0.5], [5.0, 3.0]),
        (x2, t2, None, 0.5, 0.0, 255, 0, True, False, [0.1, 0.3, 0.7], [0.5, 1.5, 2.0]),
        (xh, th, None, 1.0, 3.0, -100, 0, False, False, [0.2, 0.5], [5.0, 3.0], torch.float32),
        (xh, th, None, 1.0, 3.0, -100, 2, False, False, [0.2, 0.5], [5.0, 3.0], torch.float32),
    ]
    xs = randn((5, 7), gen, device=device).requires_grad_()
    ys = make_dense_targets(xs.shape, gen, kind="soft", device=device)
    ti = make_index_targets(xs.shape, gen, device=device, ignore_frac=0.3)
    xsh = randn((3, 4), gen, device=device, dtype=torch.float16)
    sigmoid = [
        (xs, ys, 0.25, 3.0, -100, 0, None, True, False, [0.2, 0.5], [5.0, 3.0]),
        (xs, ti, -1.0, 1.0, -100, 1, None, True, False, [0.3], [0.5]),
        (xsh, make_index_targets(xsh.shape, gen, device=device), 0.25, 2.0, -100, 0, None, False, False, [0.4], [4.0], torch.float32),
    ]
    return softmax, sigmoid


def test_opcheck(device, gen):
    softmax, sigmoid = _opcheck_samples(device, gen)
    for args in softmax:
        torch.library.opcheck(OP.softmax_focal_loss_forward.default, args)
    for args in sigmoid:
        torch.library.opcheck(OP.sigmoid_focal_loss_forward.default, args)
    for op, args in [(OP.softmax_focal_loss_forward, softmax[0]), (OP.sigmoid_focal_loss_forward, sigmoid[0])]:
        with torch.no_grad():
            loss, grad_buf, state = op(*args)
        go = torch.ones_like(loss) * 0.5
        torch.library.opcheck(OP.focal_loss_backward_.default, (grad_buf.clone(), state.clone(), go))
        torch.library.opcheck(OP.focal_loss_backward.default, (grad_buf, state, go))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("mode", ["softmax", "sigmoid"])
def test_module_equals_functional(device, gen, mode, reduction):
    x = randn((12, 5), gen, device=device, scale=2.0)
    if mode == "softmax":
        t = make_target(x.shape, gen, device=device, ignore_frac=0.2)
        alpha = make_alpha("list", 5, gen)
        expected = focal_cuda.softmax_focal_loss(x, t, gamma=GammaSchedule.flsd53(), alpha=alpha, reduction=reduction)
        module = focal_cuda.FusedFocalLoss(gamma="flsd53", alpha=alpha, reduction=reduction).to(device)
    else:
        t = make_index_targets(x.shape, gen, device=device, ignore_frac=0.2)
        expected = focal_cuda.sigmoid_focal_loss(x, t, alpha=0.25, gamma=GammaSchedule.flsd53(), reduction=reduction)
        module = focal_cuda.FusedFocalLoss(gamma=GammaSchedule.flsd53(), alpha=0.25, reduction=reduction,
                                           mode="sigmoid")
    torch.testing.assert_close(module(x, t), expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=40, deadline=None)
@given(
    loss=st.sampled_from(["softmax", "sigmoid"]),
    n=st.integers(0, 6),
    c=st.integers(1, 9),
    spatial=st.lists(st.integers(1, 4), max_size=2),
    thresholds=st.lists(st.floats(0.01, 0.99), min_size=0, max_size=7, unique=True),
    gammas=st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 2.7]), min_size=8, max_size=8),
    reduction=st.sampled_from(REDUCTIONS),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    scale=st.sampled_from([0.5, 2.0, 10.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_reference(device, loss, n, c, spatial, thresholds, gammas, reduction, dtype, scale, seed):
    thresholds = sorted(thresholds)
    if any(b - a < 1e-3 for a, b in zip(thresholds, thresholds[1:])):
        return
    schedule = GammaSchedule(tuple(thresholds), tuple(gammas[: len(thresholds) + 1]))
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, *spatial)
    x = randn(shape, g, device=device, dtype=dtype, scale=scale)
    if loss == "softmax":
        t = make_target(shape, g, device=device, ignore_frac=0.2)
        x = away_from_thresholds(x, t, schedule)
        assert_softmax_matches_reference(x, t, g, gamma=schedule, reduction=reduction)
    else:
        t = make_index_targets(shape, g, device=device, ignore_frac=0.2)
        x, t = away_from_thresholds_sigmoid(x, t, schedule)
        assert_sigmoid_matches_reference(x, t, g, gamma=schedule, reduction=reduction)
