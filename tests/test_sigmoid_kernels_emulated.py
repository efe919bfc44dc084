"""The sigmoid focal-loss CUDA kernels, executed on the CPU, against the float64 reference.

tests/cuda_emulation/emulated_kernels.cpp runs csrc/cuda/sigmoid_focal_loss_kernels.cuh on the CPU
emulation of the CUDA programming model (tests/cuda_emulation/cuda_on_cpu.h) and exposes it to ctypes
as sigmoid_focal_loss_kernel.cu launches it: sigmoid_focal_loss_dense_kernel<scalar, target, 256, VEC>
(targets of the input's dtype, or float targets for half / bfloat16 input), sigmoid_focal_loss_index_kernel
<scalar, 256, GROUP, VEC> for GROUP 8 and 32, with VEC = 16 / sizeof(scalar) or 1, the
count_valid_targets_kernel pre-pass (classes + 1 classes, items_per_target = classes) for a folded mean
over index targets, the normalizer as a device value, as a host value "as given" or the default
denominators; and focal_loss_backward_kernel over the flat storage (scalar and elementwise grad_output).
Each run has an explicit grid and block order (the reduced result must not depend on which block
finishes last).

The build is shared with tests/test_cuda_kernels_emulated.py (tests/cuda_emulation/emulation_build.py).
Every output buffer starts as NaN inside a NaN guard region: an element the kernel does not write, or a
write out of bounds, fails. The oracle is focal_cuda.reference.sigmoid_focal_loss in float64 (autograd
for the gradient, its limit 0 where autograd gives NaN: m**gamma at m = 0 with gamma < 1).
"""

from __future__ import annotations

import ctypes
import math
import zlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from conftest import assert_close_scaled

from cuda_emulation.emulation_build import DTYPE_CODE, REDUCTION_CODE, TARGET_KIND, Guarded, bits, load_library
from focal_cuda import reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_ID = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
TARGET_DTYPES = [torch.int64, torch.uint8, torch.int32, torch.int16]
TARGET_ID = {torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}
GAMMAS = [0.0, 0.5, 2.0, 3.7]
ALPHAS = [0.25, -1.0]
REDUCTIONS = ["none", "sum", "mean"]
# "mean" denominators: the default (dense: numel; index: non-ignored rows x C, with the count pre-pass when
# the mean is folded into the forward gradient), a device normalizer, a host normalizer used as given.
MEAN_MODES = ["default", "device", "host"]

DENSE_SAME, DENSE_ACC, INDEX_GROUP8, INDEX_GROUP32 = 0, 1, 2, 3  # emulated_kernels.cpp SigmoidVariant


def vec_width(dtype: torch.dtype) -> int:
    return 16 // torch.empty((), dtype=dtype).element_size()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def seeded(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ============================================================================ the emulated kernels


class SigmoidEmulator:
    """ctypes front end of the emu_sigmoid_* / flat backward entry points of emulated_kernels.cpp."""

    def __init__(self, lib: ctypes.CDLL):
        ll, ull, i, d, p = ctypes.c_longlong, ctypes.c_ulonglong, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
        lib.emu_sigmoid_focal_loss_forward.argtypes = [i, i, i, ll, ll, ull, p, p, i, p, p, ll, ll, i, i, ll, d, d,
                                                       p, i, d, i, p]
        lib.emu_count_valid_targets_items.argtypes = [i, ll, ull, p, i, ll, ll, ll, ll, p]
        lib.emu_focal_loss_backward_flat.argtypes = [i, i, ll, ull, p, p, ll, p, i, p]
        lib.emu_selftest_shuffle.argtypes = [i, i, i, p]
        lib.emu_set_schedule_perturbation.argtypes = [ull]
        self.lib = lib

    def check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"emulated launch failed: {self.lib.emu_last_error().decode()}")


@pytest.fixture(scope="session")
def emu(tmp_path_factory) -> SigmoidEmulator:
    return SigmoidEmulator(load_library(tmp_path_factory))


# ============================================================================ running the kernels like the launcher


@dataclass
class Forward:
    loss: Guarded
    grad: Optional[Guarded]
    state: torch.Tensor
    fold: bool
    raw_grad: Optional[torch.Tensor]  # the forward's gradient as written (an in-place backward overwrites it)


def guarded_like(values: torch.Tensor) -> Guarded:
    g = Guarded(tuple(values.shape), torch.empty(values.shape).stride(), values.dtype)
    g.view.copy_(values)
    return g


def run_forward(emu: SigmoidEmulator, x: torch.Tensor, target: torch.Tensor, *, group: int = 8, vec: bool = False,
                grid: int = 1, count_grid: int = 2, order: int = 0, gamma: float = 2.0, alpha: float = 0.25,
                reduction: str = "mean", compute_grad: bool = True, ignore_index: int = -100,
                mean_mode: str = "default", normalizer: float = 7.5, fold: Optional[bool] = None) -> Forward:
    """The forward op as sigmoid_focal_loss_forward_cuda runs it on the contiguous (rows, C) logits ``x``:
    dense targets (floating, x's shape; the input's or the accumulation dtype) or index targets (integer,
    (rows,)); GROUP 8 or 32 for index targets. The mean is folded into the forward gradient when the launcher
    would fold it (mean, gradient wanted, not float16) unless ``fold`` says otherwise."""
    dtype = x.dtype
    acc = acc_dtype(dtype)
    rows, classes = x.shape
    index = not target.dtype.is_floating_point
    if fold is None:
        fold = compute_grad and reduction == "mean" and dtype != torch.float16
    if index:
        variant = INDEX_GROUP8 if group == 8 else INDEX_GROUP32
        target_buffer = target.contiguous()
        target_ptr = target_buffer.data_ptr()
    else:
        assert target.dtype in (dtype, acc)
        variant = DENSE_SAME if target.dtype == dtype else DENSE_ACC
        target_buffer = guarded_like(target)
        target_ptr = target_buffer.view.data_ptr()
    x_buffer = guarded_like(x)
    loss_shape = (rows, classes) if reduction == "none" else ()
    loss = Guarded(loss_shape, torch.empty(loss_shape).stride(), dtype)
    grad = Guarded((rows, classes), (classes, 1), dtype) if compute_grad else None
    state = torch.full((3,), float("nan"), dtype=acc)
    device_normalizer = None
    if reduction == "mean" and mean_mode == "device":
        device_normalizer = torch.tensor(normalizer, dtype=acc)
    host = reduction == "mean" and mean_mode == "host"
    emu.check(emu.lib.emu_sigmoid_focal_loss_forward(
        DTYPE_CODE[dtype], variant, int(vec), grid, count_grid, order, x_buffer.view.data_ptr(), target_ptr,
        TARGET_KIND.get(target.dtype, 3), grad.view.data_ptr() if grad else None, loss.view.data_ptr(), rows, classes,
        REDUCTION_CODE[reduction], int(compute_grad), ignore_index, gamma, alpha,
        device_normalizer.data_ptr() if device_normalizer is not None else None, int(host), normalizer if host else 0.0,
        int(fold), state.data_ptr()))
    assert loss.untouched(), "loss written out of bounds"
    assert grad is None or grad.untouched(), "gradient written out of bounds"
    assert x_buffer.untouched() and torch.equal(bits(x_buffer.view), bits(x)), "the logits were modified"
    if not index:
        assert torch.equal(bits(target_buffer.view), bits(target)), "the targets were modified"
    return Forward(loss, grad, state, fold, grad.view.clone() if grad else None)


def run_backward(emu: SigmoidEmulator, grad: Guarded, state: torch.Tensor, grad_output: torch.Tensor, *,
                 in_place: bool, vec: bool, grid: int, order: int = 0) -> torch.Tensor:
    """focal_loss_backward(_) as focal_loss_kernel.cu launches it for a scalar grad_output or one of the
    gradient's shape (elementwise: given the gradient's strides): out = grad * grad_output * state[1]."""
    g = grad.view
    if grad_output.dim() == 0:
        layout, go = 0, grad_output.to(g.dtype).reshape(1).clone()
        go_ptr = go.data_ptr()
    else:
        assert grad_output.shape == g.shape
        layout, go = 1, guarded_like(grad_output.to(g.dtype))
        go_ptr = go.view.data_ptr()
    out = grad if in_place else Guarded(tuple(g.shape), g.stride(), g.dtype)
    emu.check(emu.lib.emu_focal_loss_backward_flat(DTYPE_CODE[g.dtype], int(vec), grid, order, g.data_ptr(),
                                                   out.view.data_ptr(), g.numel(), go_ptr, layout, state.data_ptr()))
    assert out.untouched(), "backward wrote out of bounds"
    return out.view


# ============================================================================ the oracle


@dataclass
class Expected:
    loss: torch.Tensor          # as reduced, float64
    grad_sum: torch.Tensor      # d(sum of the per-element losses)/dx, float64
    denominator: torch.Tensor   # of "mean", in the accumulation dtype, as the kernel sees it
    as_given: bool              # a normalizer: 1 / d even for d <= 0
    count: int                  # index targets: valid rows (in [0, C], not ignored)


def expected(x: torch.Tensor, target: torch.Tensor, *, gamma, alpha, reduction, ignore_index=-100,
             mean_mode="default", normalizer=7.5) -> Expected:
    """focal_cuda.reference.sigmoid_focal_loss in float64 on the kernel's (rounded) values. Out-of-range index
    targets (the reference raises on them) are evaluated as ignored, then their rows made NaN, and any
    reduced loss; they are not counted."""
    acc = acc_dtype(x.dtype)
    rows, classes = x.shape
    index = not target.dtype.is_floating_point
    bad = torch.zeros(rows, dtype=torch.bool)
    count = 0
    if index:
        t = target.long()
        bad = (t != ignore_index) & ((t < 0) | (t > classes))
        t_ref = torch.where(bad, torch.full_like(t, ignore_index), t)
        count = int((t_ref != ignore_index).sum())
    else:
        t_ref = target.double()
    xd = x.detach().double().requires_grad_()
    kwargs = dict(alpha=alpha, gamma=gamma, ignore_index=ignore_index)
    elementwise = reference.sigmoid_focal_loss(xd, t_ref, reduction="none", **kwargs)
    (grad_sum,) = torch.autograd.grad(elementwise.sum(), xd)
    # Autograd of m**gamma at m = 0 (gamma < 1, saturated logits) is inf * 0; the derivative's limit is 0.
    grad_sum = torch.where(torch.isnan(grad_sum) & torch.isfinite(xd.detach()), torch.zeros_like(grad_sum), grad_sum)
    use_normalizer = reduction == "mean" and mean_mode != "default"
    if use_normalizer:
        denominator = torch.tensor(normalizer, dtype=acc)
        # As a float64 tensor: the reference turns a Python float into a float32 tensor first (3.3 -> 3.2999999523),
        # even for float64 inputs, where the kernel reads the normalizer in float64.
        loss = reference.sigmoid_focal_loss(xd, t_ref, reduction="mean", normalizer=denominator.double(), **kwargs)
    else:
        denominator = torch.tensor(float(count * classes if index else rows * classes), dtype=acc)
        loss = reference.sigmoid_focal_loss(xd, t_ref, reduction=reduction, **kwargs)
    loss = loss.detach()
    if bad.any():
        nan = float("nan")
        loss = loss.masked_fill(bad.unsqueeze(1), nan) if reduction == "none" else torch.full_like(loss, nan)
        grad_sum = grad_sum.masked_fill(bad.unsqueeze(1), nan)
    return Expected(loss, grad_sum, denominator, use_normalizer, count)


def expected_state(exp: Expected, reduction: str, fold: bool) -> torch.Tensor:
    d = exp.denominator
    one = torch.ones((), dtype=d.dtype)
    inverse = one / d if exp.as_given or d > 0 else torch.zeros((), dtype=d.dtype)
    return torch.stack([inverse if fold else one, inverse if (reduction == "mean" and not fold) else one,
                        torch.zeros((), dtype=d.dtype)])


def check(fwd: Forward, exp: Expected, dtype: torch.dtype, reduction: str, label: str,
          grad_output: Optional[torch.Tensor] = None, final: Optional[torch.Tensor] = None) -> None:
    """Loss, state (bitwise), the forward's gradient and, after a backward, the final gradient."""
    assert_close_scaled(fwd.loss.view, exp.loss, dtype, f"{label}: loss")
    want_state = expected_state(exp, reduction, fwd.fold)
    assert torch.equal(bits(fwd.state), bits(want_state)), f"{label}: state {fwd.state.tolist()} != {want_state.tolist()}"
    if fwd.grad is None:
        return
    forward_scale = float(want_state[0])
    assert_close_scaled(fwd.raw_grad, exp.grad_sum * forward_scale, dtype, f"{label}: forward gradient")
    if final is not None:
        go = grad_output.to(dtype).double()  # the backward reads grad_output in the gradient's dtype
        want = exp.grad_sum * go * (float(want_state[0]) * float(want_state[1]))
        assert_close_scaled(final, want, dtype, f"{label}: gradient after backward")


# ============================================================================ inputs


def make_logits(shape, dtype, gen, scale=2.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def make_dense_target(shape, dtype, gen) -> torch.Tensor:
    """Mostly hard 0 / 1 labels, a third soft."""
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    pick = torch.rand(shape, generator=gen, dtype=torch.float64)
    y = torch.where(pick < 0.33, u, (u < 0.3).double())
    return y.to(dtype)


def make_index_target(rows, classes, dtype, gen, *, ignore_index, ignore_frac=0.0, background_frac=0.0):
    """Class indices in [0, C), some rows background (C; not for uint8 with C >= 255) and some ignored."""
    high = min(classes, 255) if dtype == torch.uint8 else classes
    if dtype == torch.uint8 and classes >= 255:
        background_frac = 0.0
    t = torch.randint(0, high, (rows,), generator=gen)
    r = torch.rand(rows, generator=gen)
    t = torch.where(r < background_frac, torch.full_like(t, classes), t)
    t = torch.where((r >= background_frac) & (r < background_frac + ignore_frac), torch.full_like(t, ignore_index), t)
    return t.to(dtype)


def default_ignore_index(target_dtype, classes) -> int:
    return 255 if target_dtype == torch.uint8 else -100


# ============================================================================ the matrix: dense targets

DENSE_SHAPES = [(1, 1), (5, 3), (4, 80), (7, 81), (3, 1000)]  # numel 1, 15, 320, 567, 3000
DENSE_FORMS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float16),
               (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


def _dense_matrix():
    params, j = [], 0
    for dtype, target_dtype in DENSE_FORMS:
        for shape in DENSE_SHAPES:
            for vec in (True, False):
                case = dict(dtype=dtype, target_dtype=target_dtype, shape=shape, vec=vec,
                            reduction=REDUCTIONS[j % 3], gamma=GAMMAS[(j // 3) % 4], alpha=ALPHAS[(j // 2) % 2],
                            mean_mode=MEAN_MODES[(j // 3) % 3], grid=(1, 2, 3)[(j + j // 3) % 3],
                            order=(0, 1, 7)[(j // 5) % 3], compute_grad=j % 7 != 4, in_place=j % 2 == 0,
                            backward_vec=j % 4 != 1)
                params.append(pytest.param(case, id="-".join([
                    DTYPE_ID[dtype], "t" + DTYPE_ID[target_dtype], "x".join(map(str, shape)),
                    "vec" if vec else "scalar", case["reduction"], f"g{case['gamma']}", f"a{case['alpha']}",
                    case["mean_mode"] if case["reduction"] == "mean" else "-", f"grid{case['grid']}",
                    f"order{case['order']}", "nograd" if not case["compute_grad"] else
                    "inplace" if case["in_place"] else "outofplace"])))
                j += 1
    return params


def backward_for(emu, fwd: Forward, case, dtype, gen, shape):
    """The backward the autograd formula would run: elementwise grad_output for "none", else a scalar."""
    if not case["compute_grad"]:
        return None, None
    if case["reduction"] == "none":
        go = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    else:
        go = torch.tensor(0.75 + torch.rand((), generator=gen).item(), dtype=torch.float64).to(dtype)
    vec = case["backward_vec"] and math.prod(shape) % vec_width(dtype) == 0
    final = run_backward(emu, fwd.grad, fwd.state, go, in_place=case["in_place"], vec=vec, grid=case["grid"],
                         order=case["order"])
    return go, final


@pytest.mark.parametrize("case", _dense_matrix())
def test_dense_matches_reference(emu, case, request):
    """The dense kernel (targets of the input's dtype or float), VEC and scalar accesses, on sizes with and
    without a VEC tail, then the backward kernel on its gradient."""
    gen = seeded(request)
    dtype, shape = case["dtype"], case["shape"]
    x = make_logits(shape, dtype, gen)
    y = make_dense_target(shape, case["target_dtype"], gen)
    kw = dict(gamma=case["gamma"], alpha=case["alpha"], reduction=case["reduction"], mean_mode=case["mean_mode"])
    fwd = run_forward(emu, x, y, vec=case["vec"], grid=case["grid"], order=case["order"],
                      compute_grad=case["compute_grad"], **kw)
    go, final = backward_for(emu, fwd, case, dtype, gen, shape)
    exp = expected(x, y, **kw)
    check(fwd, exp, dtype, case["reduction"], request.node.name, go, final)


# ============================================================================ the matrix: index targets

INDEX_SHAPES = [(70, 1), (41, 3), (19, 80), (9, 81), (3, 1000)]


def _index_matrix():
    params, j = [], 0
    for dtype in DTYPES:
        for group in (8, 32):
            for shape in INDEX_SHAPES:
                for vec in (True, False):
                    if vec and shape[1] % vec_width(dtype):
                        continue
                    case = dict(dtype=dtype, group=group, shape=shape, vec=vec, reduction=REDUCTIONS[j % 3],
                                gamma=GAMMAS[(j // 3) % 4], alpha=ALPHAS[(j // 2) % 2],
                                mean_mode=MEAN_MODES[(j // 3 + j // 9) % 3], target_dtype=TARGET_DTYPES[(j + j // 4) % 4],
                                grid=(1, 2, 3)[(j + j // 3) % 3], count_grid=1 + j % 2, order=(0, 1, 7)[(j // 5) % 3],
                                compute_grad=j % 7 != 4, in_place=j % 2 == 0, backward_vec=j % 4 != 1,
                                ignore_frac=(0.0, 0.25)[(j // 2) % 2], background_frac=(0.2, 0.0)[(j // 4) % 2])
                    params.append(pytest.param(case, id="-".join([
                        DTYPE_ID[dtype], f"group{group}", "x".join(map(str, shape)), "vec" if vec else "scalar",
                        TARGET_ID[case["target_dtype"]], case["reduction"], f"g{case['gamma']}", f"a{case['alpha']}",
                        case["mean_mode"] if case["reduction"] == "mean" else "-", f"grid{case['grid']}",
                        f"count{case['count_grid']}", f"order{case['order']}", f"ign{case['ignore_frac']}",
                        f"bg{case['background_frac']}", "nograd" if not case["compute_grad"] else
                        "inplace" if case["in_place"] else "outofplace"])))
                    j += 1
    return params


@pytest.mark.parametrize("case", _index_matrix())
def test_index_matches_reference(emu, case, request):
    """The index kernel (GROUP 8 and 32, VEC where C % VEC == 0, scalar always), each integer target kind,
    ignored and background rows, the count pre-pass for a folded mean, then the backward kernel."""
    gen = seeded(request)
    dtype, (rows, classes) = case["dtype"], case["shape"]
    ignore_index = default_ignore_index(case["target_dtype"], classes)
    x = make_logits((rows, classes), dtype, gen)
    t = make_index_target(rows, classes, case["target_dtype"], gen, ignore_index=ignore_index,
                          ignore_frac=case["ignore_frac"], background_frac=case["background_frac"])
    kw = dict(gamma=case["gamma"], alpha=case["alpha"], reduction=case["reduction"], mean_mode=case["mean_mode"],
              ignore_index=ignore_index)
    fwd = run_forward(emu, x, t, group=case["group"], vec=case["vec"], grid=case["grid"],
                      count_grid=case["count_grid"], order=case["order"], compute_grad=case["compute_grad"], **kw)
    go, final = backward_for(emu, fwd, case, dtype, gen, (rows, classes))
    exp = expected(x, t, **kw)
    check(fwd, exp, dtype, case["reduction"], request.node.name, go, final)
    if case["reduction"] == "none":
        ignored = t.long() == ignore_index
        assert torch.equal(fwd.loss.view[ignored], torch.zeros_like(fwd.loss.view[ignored])), "ignored rows: loss 0"
    if fwd.grad is not None:
        ignored = t.long() == ignore_index
        assert torch.equal(fwd.raw_grad[ignored], torch.zeros_like(fwd.raw_grad[ignored])), "ignored rows: grad 0"


# ============================================================================ edge cases


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype,target_dtype,group,vec", [
    (torch.float32, torch.int64, 8, True), (torch.float16, torch.uint8, 32, False),
    (torch.bfloat16, torch.int16, 8, False), (torch.float64, torch.int32, 32, True)],
    ids=["f32-i64-g8-vec", "f16-u8-g32", "bf16-i16-g8", "f64-i32-g32-vec"])
def test_out_of_range_targets_give_nan_rows(emu, dtype, target_dtype, group, vec, reduction, request):
    """A target outside [0, C] (not checked on the device): its row's losses and gradient NaN, the reduced loss
    NaN; the other rows (ignored, background, positive) and the count (which excludes it) unaffected."""
    gen = seeded(request)
    rows, classes = 12, 16
    ignore_index = default_ignore_index(target_dtype, classes)
    x = make_logits((rows, classes), dtype, gen)
    t = make_index_target(rows, classes, torch.int64, gen, ignore_index=ignore_index)
    t[1] = classes + 1 if target_dtype != torch.uint8 else 200
    t[3] = ignore_index
    t[5] = classes  # background: valid
    if target_dtype != torch.uint8:
        t[8] = -3
    t = t.to(target_dtype)
    kw = dict(gamma=2.0, alpha=0.25, reduction=reduction, ignore_index=ignore_index)
    fwd = run_forward(emu, x, t, group=group, vec=vec, grid=2, **kw)
    exp = expected(x, t, **kw)
    assert exp.count == (rows - 3 if target_dtype != torch.uint8 else rows - 2)
    check(fwd, exp, dtype, reduction, request.node.name)
    bad = torch.zeros(rows, dtype=torch.bool)
    bad[1] = True
    if target_dtype != torch.uint8:
        bad[8] = True
    assert torch.isnan(fwd.raw_grad[bad]).all() and not torch.isnan(fwd.raw_grad[~bad]).any()
    if reduction == "none":
        assert torch.isnan(fwd.loss.view[bad]).all() and not torch.isnan(fwd.loss.view[~bad]).any()
    else:
        assert torch.isnan(fwd.loss.view).all()


@pytest.mark.parametrize("fill", ["ignored", "background"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_ID.get)
def test_all_rows_ignored_or_background(emu, dtype, reduction, fill, request):
    """Every row ignored: loss 0, gradient 0, the mean's inverse read as 0 (not NaN) through the count
    pre-pass. Every row background: each class a negative, all rows counted."""
    gen = seeded(request)
    rows, classes = 10, 5
    x = make_logits((rows, classes), dtype, gen)
    t = torch.full((rows,), -100 if fill == "ignored" else classes, dtype=torch.int64)
    kw = dict(gamma=2.0, alpha=0.25, reduction=reduction)
    fwd = run_forward(emu, x, t, grid=2, count_grid=2, **kw)
    exp = expected(x, t, **kw)
    check(fwd, exp, dtype, reduction, request.node.name)
    if fill == "ignored":
        assert torch.equal(fwd.loss.view, torch.zeros_like(fwd.loss.view))
        assert torch.equal(fwd.raw_grad, torch.zeros_like(fwd.raw_grad))
    else:
        assert exp.count == rows


@pytest.mark.parametrize("mode", ["dense", "index8", "index32"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_ID.get)
def test_block_order_gives_the_same_bits(emu, dtype, reduction, mode, request):
    """Grids of 1, 2 and 5 blocks: for each grid, whichever block finishes last, the reduced loss, the state
    and the gradient are bitwise the same (a fixed tree over the grid); every grid matches the reference."""
    gen = seeded(request)
    if mode == "dense":
        shape = (9, 81)
        x = make_logits(shape, dtype, gen)
        t = make_dense_target(shape, dtype, gen)
        kw = dict(vec=True)
    else:
        shape = (70, 12)
        x = make_logits(shape, dtype, gen)
        t = make_index_target(70, 12, torch.int64, gen, ignore_index=-100, ignore_frac=0.2, background_frac=0.2)
        kw = dict(group=8 if mode == "index8" else 32, vec=False)
    for grid in (1, 2, 5):
        runs = [run_forward(emu, x, t, grid=grid, count_grid=grid, order=order, gamma=0.5, reduction=reduction, **kw)
                for order in (0, 1, 12345)]
        for other in runs[1:]:
            assert torch.equal(bits(runs[0].loss.view), bits(other.loss.view)), grid
            assert torch.equal(bits(runs[0].raw_grad), bits(other.raw_grad)), grid
            assert torch.equal(bits(runs[0].state), bits(other.state)), grid
        exp = expected(x, t, gamma=0.5, alpha=0.25, reduction=reduction)
        check(runs[0], exp, dtype, reduction, f"{request.node.name} grid {grid}")


@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("mode", ["dense", "index8", "index32"])
@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 1e4), (torch.float16, 60000.0),
                                             (torch.bfloat16, 1e4), (torch.float64, 1e4)],
                         ids=["f32-1e4", "f16-60000", "bf16-1e4", "f64-1e4"])
def test_saturated_logits_stay_finite(emu, dtype, magnitude, mode, gamma, request):
    """Logits of +-magnitude on either side of their label (and moderate ones): finite losses and gradients,
    equal to the reference (the loss reaches |x| where the prediction is confidently wrong)."""
    gen = seeded(request)
    rows, classes = 8, 8
    signs = torch.where(torch.rand((rows, classes), generator=gen) < 0.5, -1.0, 1.0).double()
    x = (signs * magnitude).to(dtype)
    x[0] = make_logits((classes,), dtype, gen)
    if mode == "dense":
        t = make_dense_target((rows, classes), dtype, gen)
        t[1] = (x[1] > 0).to(dtype)   # confidently right
        t[2] = (x[2] < 0).to(dtype)   # confidently wrong
        kw = dict(vec=True)
    else:
        t = make_index_target(rows, classes, torch.int64, gen, ignore_index=-100)
        t[3] = classes
        kw = dict(group=8 if mode == "index8" else 32, vec=True)
    for reduction in ("none", "mean"):  # a float16 sum of such losses overflows: the mean does not
        fwd = run_forward(emu, x, t, gamma=gamma, alpha=0.25, reduction=reduction, grid=2, **kw)
        assert torch.isfinite(fwd.loss.view).all(), fwd.loss.view
        assert torch.isfinite(fwd.raw_grad).all(), fwd.raw_grad
        exp = expected(x, t, gamma=gamma, alpha=0.25, reduction=reduction)
        check(fwd, exp, dtype, reduction, f"{request.node.name} {reduction}")


@pytest.mark.parametrize("mode", ["dense", "index"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_ID.get)
def test_mean_denominators(emu, dtype, mode, request):
    """Every "mean" denominator, folded into the forward gradient and not: the default (dense numel; index:
    counted rows x C, by the count pre-pass when folded), a device normalizer, a host normalizer used as
    given (also where it is not positive: 1 / d in the state, not the default's 0)."""
    gen = seeded(request)
    rows, classes = 6, 7
    x = make_logits((rows, classes), dtype, gen)
    if mode == "dense":
        t = make_dense_target((rows, classes), dtype, gen)
    else:
        t = make_index_target(rows, classes, torch.int16, gen, ignore_index=-100, ignore_frac=0.3,
                              background_frac=0.2)
    for mean_mode, normalizer in [("default", 0.0), ("device", 3.3), ("host", 3.3), ("host", -2.0)]:
        for fold in (True, False):
            kw = dict(gamma=2.0, alpha=0.25, reduction="mean", mean_mode=mean_mode, normalizer=normalizer)
            fwd = run_forward(emu, x, t, fold=fold, grid=2, count_grid=2, **kw)
            exp = expected(x, t, **kw)
            check(fwd, exp, dtype, "mean", f"{request.node.name} {mean_mode} {normalizer} fold={fold}")


# ============================================================================ the count pre-pass


@pytest.mark.parametrize("grid", [1, 2, 3])
@pytest.mark.parametrize("target_dtype", TARGET_DTYPES, ids=TARGET_ID.get)
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=DTYPE_ID.get)
def test_count_valid_targets_with_items_per_target(emu, acc, target_dtype, grid, request):
    """As the sigmoid launcher runs it: classes + 1 (C = background counts), items_per_target = C:
    state[0] = 1 / (count x C), 0 when nothing counts; over 700 positions (grid-stride loops)."""
    gen = seeded(request)
    classes, positions = 80, 700
    ignore_index = 255 if target_dtype == torch.uint8 else -100
    t = torch.randint(0, classes + 1, (positions,), generator=gen)
    r = torch.rand(positions, generator=gen)
    t = torch.where(r < 0.2, torch.full_like(t, ignore_index), t)
    t = torch.where((r > 0.9) & (r < 0.93), torch.full_like(t, classes + 1), t)
    if target_dtype != torch.uint8:
        t = torch.where(r > 0.97, torch.full_like(t, -7), t)
    t = t.to(target_dtype)
    tl = t.long()
    count = int(((tl != ignore_index) & (tl >= 0) & (tl <= classes)).sum())
    for target, n in [(t, count), (torch.full_like(t, ignore_index), 0)]:
        state = torch.full((3,), float("nan"), dtype=acc)
        emu.check(emu.lib.emu_count_valid_targets_items(DTYPE_CODE[acc], grid, grid - 1, target.data_ptr(),
                                                        TARGET_KIND[target_dtype], positions, classes + 1,
                                                        ignore_index, classes, state.data_ptr()))
        want = torch.tensor(1.0, dtype=acc) / (n * classes) if n else torch.tensor(0.0, dtype=acc)
        assert torch.equal(bits(state[0]), bits(want)), (state[0].item(), n)
        assert torch.isnan(state[1:]).all(), "the count pre-pass writes state[0] only"


# ============================================================================ the backward kernel


def _backward_matrix():
    params, j = [], 0
    for dtype in DTYPES:
        for numel in (1, 37, 64, 600):
            for vec in (False, True):
                if vec and numel % vec_width(dtype):
                    continue
                for in_place in (True, False):
                    grid = 1 + j % 3
                    params.append(pytest.param(dtype, numel, vec, in_place, grid, id="-".join([
                        DTYPE_ID[dtype], f"n{numel}", "vec" if vec else "scalar",
                        "inplace" if in_place else "outofplace", f"grid{grid}"])))
                    j += 1
    return params


@pytest.mark.parametrize("dtype,numel,vec,in_place,grid", _backward_matrix())
def test_backward_elementwise_is_exact(emu, dtype, numel, vec, in_place, grid, request):
    """The elementwise layout (grad_output of the gradient's shape, e.g. after reduction "none"):
    out = grad * grad_output * state[1] in the accumulation type, rounded once: bitwise."""
    gen = seeded(request)
    acc = acc_dtype(dtype)
    grad = guarded_like(torch.randn((numel,), generator=gen, dtype=torch.float64).to(dtype))
    original = grad.view.clone()
    go = torch.randn((numel,), generator=gen, dtype=torch.float64).to(dtype)
    state = torch.tensor([float("nan"), (1.0, 1 / 7)[grid % 2], 0.0], dtype=acc)
    want = ((original.to(acc) * go.to(acc)) * state[1]).to(dtype)
    out = run_backward(emu, grad, state, go, in_place=in_place, vec=vec, grid=grid, order=grid - 1)
    assert torch.equal(bits(out), bits(want)), (out.double() - want.double()).abs().max()
    if not in_place:
        assert torch.equal(bits(grad.view), bits(original)), "the out-of-place backward modified its input"


@pytest.mark.parametrize("layout", ["scalar", "elementwise"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_ID.get)
def test_backward_of_a_consumed_buffer_is_nan(emu, dtype, layout, request):
    """state[2] != 0 (0xff bytes after an in-place backward): NaN everywhere, even with a unit scale."""
    gen = seeded(request)
    acc = acc_dtype(dtype)
    grad = guarded_like(torch.randn((40,), generator=gen, dtype=torch.float64).to(dtype))
    state = torch.tensor([1.0, 1.0, 0.0], dtype=acc)
    state.view(torch.uint8)[2 * state.element_size():] = 0xFF
    go = torch.ones((40,), dtype=dtype) if layout == "elementwise" else torch.tensor(1.0, dtype=dtype)
    for in_place in (False, True):
        out = run_backward(emu, grad, state, go, in_place=in_place, vec=False, grid=2)
        assert torch.isnan(out).all()


@pytest.mark.parametrize("vec", [False, True], ids=["scalar", "vec"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_ID.get)
def test_backward_unit_scale_in_place_is_skipped(emu, dtype, vec):
    """In place with a scalar grad_output whose scale (grad_output x state[1]) is exactly 1, the kernel returns
    without touching the buffer; out of place, or with another scale, or an elementwise grad_output, it runs.
    Seen through signalling NaNs in the gradient: any multiplication quiets them (x86 SSE), a skip keeps them."""
    acc = acc_dtype(dtype)
    integer = torch.int32 if dtype == torch.float32 else torch.int64
    snan = 0x7F800001 if dtype == torch.float32 else 0x7FF0000000000001
    quiet_bit = 1 << (22 if dtype == torch.float32 else 51)
    numel = 64
    values = torch.linspace(-3, 3, numel, dtype=dtype)
    values.view(integer)[::5] = snan

    def fresh() -> Guarded:
        g = guarded_like(values)
        assert torch.equal(bits(g.view), bits(values))
        return g

    one = torch.tensor(1.0, dtype=dtype)
    unit_state = torch.tensor([1.0, 1.0, 0.0], dtype=acc)
    # The skip: in place, scale 1.
    grad = fresh()
    out = run_backward(emu, grad, unit_state, one, in_place=True, vec=vec, grid=2)
    assert torch.equal(bits(out), bits(values)), "in place with a unit scale: the buffer must be left as it is"
    # Out of place, scale 1: every element written, the signalling NaNs quieted by the multiplication.
    grad = fresh()
    out = run_backward(emu, grad, unit_state, one, in_place=False, vec=vec, grid=2)
    want = values.view(integer).clone()
    want[::5] |= quiet_bit
    assert torch.equal(bits(out), want), "out of place: the multiplication runs (and quiets signalling NaNs)"
    assert torch.equal(bits(grad.view), bits(values))
    # In place, scale != 1: runs.
    grad = fresh()
    half_state = torch.tensor([1.0, 0.5, 0.0], dtype=acc)
    out = run_backward(emu, grad, half_state, one, in_place=True, vec=vec, grid=2)
    finite = ~torch.isnan(values)
    assert torch.equal(bits(out[finite]), bits(values[finite] * 0.5))
    assert torch.equal(bits(out[~finite]), want[::5])
    # In place, elementwise grad_output of ones and state[1] = 1: no skip for that layout.
    grad = fresh()
    out = run_backward(emu, grad, unit_state, torch.ones(numel, dtype=dtype), in_place=True, vec=vec, grid=2)
    assert torch.equal(bits(out), want)


# ============================================================================ schedules and the emulator


@pytest.mark.parametrize("mode", ["dense", "index8", "index32"])
def test_perturbed_schedules_give_the_same_bits(emu, mode, request):
    """Warps held back after a __syncthreads while the others run ahead change nothing."""
    gen = seeded(request)
    shape = (12, 40)
    x = make_logits(shape, torch.float32, gen)
    if mode == "dense":
        t, kw = make_dense_target(shape, torch.float32, gen), dict(vec=True)
    else:
        t = make_index_target(12, 40, torch.int64, gen, ignore_index=-100, ignore_frac=0.2, background_frac=0.2)
        kw = dict(group=8 if mode == "index8" else 32, vec=True)

    def run():
        return run_forward(emu, x, t, grid=1, count_grid=1, gamma=2.0, reduction="mean", **kw)

    plain = run()
    try:
        for seed in (1, 2):
            emu.lib.emu_set_schedule_perturbation(seed)
            jittered = run()
            assert torch.equal(bits(plain.loss.view), bits(jittered.loss.view)), f"seed {seed}"
            assert torch.equal(bits(plain.raw_grad), bits(jittered.raw_grad)), f"seed {seed}"
            assert torch.equal(bits(plain.state), bits(jittered.state)), f"seed {seed}"
    finally:
        emu.lib.emu_set_schedule_perturbation(0)


@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
def test_emulated_shfl_sync_follows_cuda(emu, width):
    """__shfl_sync(mask, v, src, width) (the index kernel broadcasts each row's target with it): lane
    src % width of the caller's width-segment."""
    out = torch.zeros(256, dtype=torch.int64)
    for src in (0, 1, 3, 7, 9, 31, 40):
        emu.check(emu.lib.emu_selftest_shuffle(3, src, width, out.data_ptr()))
        want = [1000 * b + (t - t % 32) + (t % 32) // width * width + src % width for b in range(2) for t in range(128)]
        assert out.tolist() == want, (width, src)
