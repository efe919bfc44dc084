"""The CUDA kernels, executed on the CPU, against the float64 reference: GPU code proven without a GPU.

tests/cuda_emulation/cuda_on_cpu.h is a small CPU implementation of the CUDA programming model
(blocks run one after the other, each with blockDim real threads; __shared__ as function statics,
__syncthreads and warp shuffles as barriers, atomics through std::atomic_ref).
tests/cuda_emulation/emulated_kernels.cpp compiles csrc/cuda/softmax_focal_loss_kernels.cuh with it
and exposes every kernel variant to ctypes: the rows kernel <scalar, BLOCK, GROUP, VEC> for GROUP 8,
32 and 512 (one position per 512-thread block) with scalar and 16-byte accesses, the channels
kernel, the count pre-pass and the backward kernel, for float, double, __half and __nv_bfloat16,
with an explicit grid (small grids exercise the grid-stride loops and the last-block reduction)
and a block order (the result must not depend on which block finishes last).

Every output buffer starts as NaN inside a NaN guard region: an element the kernel does not write,
or a write out of bounds, fails. Built with g++ once per session (tests/cuda_emulation/emulation_build.py);
skipped without g++ or without the CUDA headers (cuda_fp16.h, cuda_bf16.h). Numerics: the host's
expf/logf/powf stand in for CUDA's, so this checks the kernels' logic and reductions, not the last ulp
of the GPU build.
"""

from __future__ import annotations

import ctypes
import math
import zlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from conftest import assert_close_scaled, closed_form_grad, conditioning_floor

from focal_cuda import reference

# The build (once per session, shared with tests/test_sigmoid_kernels_emulated.py) and the guarded buffers.
from cuda_emulation.emulation_build import DTYPE_CODE, REDUCTION_CODE, TARGET_KIND, Guarded, bits, load_library

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPE_ID = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
TARGET_ID = {torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}


@dataclass(frozen=True)
class Variant:
    name: str
    code: int  # emulated_kernels.cpp: 0 channels, 1 rows GROUP=8, 2 rows GROUP=32, 3 rows GROUP=BLOCK=512
    vec: bool  # 16-byte accesses (VEC = 16 / sizeof(scalar))
    positions_per_block: int


VARIANTS = [
    Variant("channels", 0, False, 256),
    Variant("rows8", 1, False, 32),
    Variant("rows8_vec", 1, True, 32),
    Variant("rows32", 2, False, 8),
    Variant("rows32_vec", 2, True, 8),
    Variant("rows512", 3, False, 1),
    Variant("rows512_vec", 3, True, 1),
]
VARIANT = {v.name: v for v in VARIANTS}


def vec_width(dtype: torch.dtype) -> int:
    return 16 // torch.empty((), dtype=dtype).element_size()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ============================================================================ the emulated kernels


class Emulator:
    """ctypes front end of emulated_kernels.cpp."""

    def __init__(self, lib: ctypes.CDLL):
        ll, ull, i, d, p = ctypes.c_longlong, ctypes.c_ulonglong, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
        lib.emu_softmax_focal_loss_forward.argtypes = [i, i, i, ll, ll, ull, p, p, p, p, p, i, i, i, ll, d, d, p, i, p]
        lib.emu_count_valid_targets.argtypes = [i, ll, ull, p, i, ll, ll, ll, p]
        lib.emu_softmax_focal_loss_backward.argtypes = [i, i, ll, ull, p, p, p, p, i, p]
        lib.emu_selftest_shuffle.argtypes = [i, i, i, p]
        lib.emu_selftest_shared.argtypes = [p]
        lib.emu_selftest_misuse.argtypes = [i]
        lib.emu_set_launch_timeout.argtypes = [i]
        lib.emu_set_schedule_perturbation.argtypes = [ull]
        self.lib = lib

    def check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"emulated launch failed: {self.lib.emu_last_error().decode()}")

    @staticmethod
    def geometry(g: tuple) -> ctypes.Array:
        return (ctypes.c_longlong * 9)(*g)

    def forward(self, *, dtype, variant: Variant, grid, count_grid, order, input, grad, loss, geometry, target,
                reduction, compute_grad, ignore_index, gamma, alpha, class_weight, fold, state) -> None:
        self.check(self.lib.emu_softmax_focal_loss_forward(
            DTYPE_CODE[dtype], variant.code, int(variant.vec), grid, count_grid, order, input.data_ptr(),
            grad.data_ptr() if grad is not None else None, loss.data_ptr(), self.geometry(geometry),
            target.data_ptr(), TARGET_KIND[target.dtype], REDUCTION_CODE[reduction], int(compute_grad), ignore_index,
            gamma, alpha, class_weight.data_ptr() if class_weight is not None else None, int(fold), state.data_ptr()))

    def count(self, *, acc, grid, order, target, positions, classes, ignore_index, state) -> None:
        self.check(self.lib.emu_count_valid_targets(DTYPE_CODE[acc], grid, order, target.data_ptr(),
                                                    TARGET_KIND[target.dtype], positions, classes, ignore_index,
                                                    state.data_ptr()))

    def backward(self, *, dtype, vec, grid, order, grad, out, geometry, grad_output, scalar, state) -> None:
        self.check(self.lib.emu_softmax_focal_loss_backward(DTYPE_CODE[dtype], int(vec), grid, order, grad.data_ptr(),
                                                            out.data_ptr(), self.geometry(geometry),
                                                            grad_output.data_ptr(), int(scalar), state.data_ptr()))


@pytest.fixture(scope="session")
def emu(tmp_path_factory) -> Emulator:
    return Emulator(load_library(tmp_path_factory))


# ============================================================================ buffers


def ncs_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """collapse_to_ncs_strides (csrc/softmax_focal_loss.cpp) in Python."""
    stride_n, stride_c = t.stride(0), t.stride(1)
    if t.numel() == 0:
        return stride_n, stride_c, 0
    inner, expected = None, 0
    for d in range(t.dim() - 1, 1, -1):
        if t.size(d) == 1:
            continue
        if inner is None:
            inner, expected = t.stride(d), t.stride(d) * t.size(d)
        else:
            assert t.stride(d) == expected, "spatial dims do not collapse"
            expected *= t.size(d)
    return stride_n, stride_c, inner or 0


def layout_strides(shape: tuple, layout: str) -> tuple:
    n, c, *spatial = shape
    if layout == "contiguous":
        return torch.empty(shape).stride()
    if layout == "channels_last":  # classes innermost, any number of spatial dims
        strides, step = [], c
        for size in reversed(spatial):
            strides.append(step)
            step *= size
        return (step, 1, *reversed(strides))
    if layout == "sliced":  # (N, C) rows of a wider, 16-element-aligned buffer
        assert not spatial
        return ((c + 15) // 16 * 16 + 16, 1)
    if layout == "transposed":  # (C, N).t()
        assert not spatial
        return (1, n)
    raise ValueError(layout)


def make_input(shape, layout, dtype, gen, scale=1.0) -> Guarded:
    values = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    x = Guarded(shape, layout_strides(shape, layout), dtype)
    x.view.copy_(values)
    return x


def make_target(shape, classes, dtype, gen, ignore_index, ignore_frac) -> torch.Tensor:
    target_shape = (shape[0], *shape[2:])
    high = min(classes, 255) if dtype == torch.uint8 else classes  # 255: uint8's ignore value
    t = torch.randint(0, high, target_shape, generator=gen)
    if ignore_frac:
        t = torch.where(torch.rand(target_shape, generator=gen) < ignore_frac, torch.full_like(t, ignore_index), t)
    return t.to(dtype)


# ============================================================================ running the kernels like the launcher


@dataclass
class Forward:
    loss: Guarded
    grad: Optional[Guarded]
    state: torch.Tensor
    geometry: tuple
    fold: bool
    raw_grad: Optional[torch.Tensor] = None  # the forward's gradient as written (an in-place backward overwrites it)


def run_forward(emu: Emulator, x: Guarded, target: torch.Tensor, variant: Variant, *, grid: int, gamma: float,
                alpha: float = 1.0, class_weight: Optional[torch.Tensor] = None, ignore_index: int = -100,
                reduction: str = "mean", compute_grad: bool = True, count_grid: int = 2, order: int = 0,
                fold: Optional[bool] = None) -> Forward:
    """The forward op as softmax_focal_loss_kernel.cu runs it: the count pre-pass first when the mean is
    folded into the gradient (mean, gradient wanted, not float16), then the chosen kernel."""
    dtype = x.view.dtype
    acc = acc_dtype(dtype)
    if fold is None:
        fold = compute_grad and reduction == "mean" and dtype != torch.float16
    loss_shape = tuple(target.shape) if reduction == "none" else ()
    loss = Guarded(loss_shape, torch.empty(loss_shape).stride(), dtype)
    grad = None
    geometry_grad = (0, 0, 0)
    if compute_grad:
        grad_strides = torch.empty_like(x.view, memory_format=torch.preserve_format).stride()
        grad = Guarded(tuple(x.view.shape), grad_strides, dtype)
        geometry_grad = ncs_strides(grad.view)
    n, c = x.view.shape[:2]
    spatial = math.prod(x.view.shape[2:])
    geometry = (n, c, spatial, *ncs_strides(x.view), *geometry_grad)
    state = torch.full((3,), float("nan"), dtype=acc)
    weight = class_weight.to(acc).contiguous() if class_weight is not None else None
    emu.forward(dtype=dtype, variant=variant, grid=grid, count_grid=count_grid, order=order, input=x.view,
                grad=grad.view if grad else None, loss=loss.view, geometry=geometry, target=target.contiguous(),
                reduction=reduction, compute_grad=compute_grad, ignore_index=ignore_index, gamma=gamma, alpha=alpha,
                class_weight=weight, fold=fold, state=state)
    assert loss.untouched(), "loss written out of bounds"
    assert grad is None or grad.untouched(), "gradient written out of bounds"
    return Forward(loss, grad, state, geometry, fold, grad.view.clone() if grad else None)


def run_backward(emu: Emulator, fwd: Forward, grad_output: torch.Tensor, *, in_place: bool, vec: bool, grid: int,
                 order: int = 0) -> torch.Tensor:
    """softmax_focal_loss_backward(_): out = grad * grad_output * state[1], in place or into a fresh buffer."""
    grad = fwd.grad.view
    scalar = grad_output.dim() == 0
    out = fwd.grad if in_place else Guarded(tuple(grad.shape), grad.stride(), grad.dtype)
    emu.backward(dtype=grad.dtype, vec=vec, grid=grid, order=order, grad=grad, out=out.view, geometry=fwd.geometry,
                 grad_output=grad_output.to(grad.dtype).contiguous(), scalar=scalar, state=fwd.state)
    assert out.untouched(), "backward wrote out of bounds"
    return out.view


# ============================================================================ the oracle


@dataclass
class Expected:
    loss: torch.Tensor
    grad: Optional[torch.Tensor]       # d(loss . grad_output)/dx
    grad_sum: torch.Tensor             # d(sum of the per-element losses)/dx: the forward's unscaled gradient
    count: int                         # valid (non-ignored, in-range) targets
    target_for_floor: torch.Tensor


def expected(x: torch.Tensor, target: torch.Tensor, *, gamma, alpha, ignore_index, reduction,
             grad_output: Optional[torch.Tensor]) -> Expected:
    """focal_cuda.reference in float64 with autograd. Out-of-range targets (the reference raises on them)
    are evaluated as ignored and then made NaN: their loss, their gradient row, any reduced loss."""
    c = x.shape[1]
    t = target.long()
    bad = (t != ignore_index) & ((t < 0) | (t >= c))
    t_ok = torch.where(bad, torch.full_like(t, ignore_index), t)
    xd = x.detach().double().requires_grad_()
    kwargs = dict(gamma=gamma, alpha=alpha, ignore_index=ignore_index)
    loss = reference.softmax_focal_loss(xd, t_ok, reduction=reduction, **kwargs)
    grad = None
    if grad_output is not None:
        (grad,) = torch.autograd.grad(loss, xd, grad_output.double())
    loss_sum = reference.softmax_focal_loss(xd, t_ok, reduction="sum", **kwargs)
    (grad_sum,) = torch.autograd.grad(loss_sum, xd)
    loss = loss.detach()

    # autograd through (1-p)**gamma is NaN where p == 1 exactly and gamma < 1: the closed form there.
    def patched(g, red, go):
        if not torch.isnan(g).any():
            return g
        closed = closed_form_grad(x, t_ok, gamma=gamma, alpha=alpha, ignore_index=ignore_index, reduction=red,
                                  grad_output=go)
        return torch.where(torch.isnan(g) & torch.isfinite(closed), closed, g)

    grad_sum = patched(grad_sum, "sum", None)
    if grad is not None:
        grad = patched(grad, reduction, grad_output)
    if bad.any():
        nan = float("nan")
        loss = loss.masked_fill(bad, nan) if reduction == "none" else torch.full_like(loss, nan)
        row_mask = bad.unsqueeze(1).expand(x.shape[0], c, *x.shape[2:])
        grad_sum = grad_sum.masked_fill(row_mask, nan)
        if grad is not None:
            grad = grad.masked_fill(row_mask, nan)
    count = int(((t != ignore_index) & ~bad).sum())
    return Expected(loss, grad, grad_sum, count, t_ok)


def expected_state(count: int, reduction: str, fold: bool, acc: torch.dtype) -> torch.Tensor:
    inv = (torch.tensor(1.0, dtype=acc) / count) if count > 0 else torch.tensor(0.0, dtype=acc)
    one = torch.tensor(1.0, dtype=acc)
    return torch.stack([inv if fold else one, inv if (reduction == "mean" and not fold) else one,
                        torch.tensor(0.0, dtype=acc)])


def check_against_reference(x: Guarded, target, fwd: Forward, exp: Expected, *, alpha_ref, ignore_index, reduction,
                            gamma, grad_output, final_grad: Optional[torch.Tensor], label: str) -> None:
    dtype = x.view.dtype
    acc = acc_dtype(dtype)
    floor_args = (x.view, exp.target_for_floor, alpha_ref, ignore_index)
    assert_close_scaled(fwd.loss.view, exp.loss, dtype, f"{label}: loss",
                        atol_floor=conditioning_floor(*floor_args, reduction))
    assert torch.equal(bits(fwd.state), bits(expected_state(exp.count, reduction, fwd.fold, acc))), (
        f"{label}: state {fwd.state.tolist()} != {expected_state(exp.count, reduction, fwd.fold, acc).tolist()} "
        f"(count {exp.count})")
    if fwd.grad is None:
        return
    # The forward's own gradient: of the summed loss, times 1/count when the mean is folded in.
    raw_expected = exp.grad_sum / max(exp.count, 1) if fwd.fold else exp.grad_sum
    one = torch.ones((), dtype=torch.float64)
    assert_close_scaled(fwd.raw_grad, raw_expected, dtype, f"{label}: forward gradient",
                        atol_floor=conditioning_floor(*floor_args, "mean" if fwd.fold else "sum", grad_output=one,
                                                      gamma=gamma))
    if final_grad is not None:
        assert_close_scaled(final_grad, exp.grad, dtype, f"{label}: gradient after backward",
                            atol_floor=conditioning_floor(*floor_args, reduction, grad_output=grad_output,
                                                          gamma=gamma))


# ============================================================================ the matrix


@dataclass(frozen=True)
class Shape:
    name: str
    shape: tuple
    layout: str


SHAPES = [
    Shape("5x7", (5, 7), "contiguous"),
    Shape("9x1", (9, 1), "contiguous"),                 # one class: p = 1, loss 0, the log(p)/(1-p) limit
    Shape("7x3T", (7, 3), "transposed"),                # class stride N
    Shape("4x130", (4, 130), "contiguous"),
    Shape("6x64", (6, 64), "contiguous"),
    Shape("3x40sliced", (3, 40), "sliced"),             # row stride 64: rows of a wider buffer
    Shape("3x37x11", (3, 37, 11), "contiguous"),        # channel-first
    Shape("2x16x3x5cl", (2, 16, 3, 5), "channels_last"),
    Shape("2x24x7cl", (2, 24, 7), "channels_last"),
    Shape("2x5x300", (2, 5, 300), "contiguous"),        # 600 positions: grid-stride loops of the channels kernel
    Shape("2x300x3", (2, 300, 3), "contiguous"),        # few long channel-first rows: the launcher's rows kernel
    Shape("2x4099", (2, 4099), "contiguous"),
    Shape("1x5000", (1, 5000), "contiguous"),
]


def applicable(variant: Variant, s: Shape, dtype: torch.dtype) -> bool:
    positions = s.shape[0] * math.prod(s.shape[2:])
    # Emulated threads are real threads: keep the number of barrier rounds small.
    if positions / variant.positions_per_block > {0: 1e9, 1: 20, 3: 10}.get(variant.code, 5):
        return False
    if variant.vec:  # the launcher's `vectorizable` condition
        v = vec_width(dtype)
        strides = layout_strides(s.shape, s.layout)
        n_stride, c_stride, s_stride = strides[0], strides[1], (strides[-1] if len(strides) > 2 else 0)
        return c_stride == 1 and s.shape[1] % v == 0 and n_stride % v == 0 and s_stride % v == 0
    return True


GAMMAS = [0.0, 0.5, 2.0, 3.7]
ALPHAS = [None, "0.25", "class", "class*0.5"]
REDUCTIONS = ["none", "sum", "mean"]
TARGET_DTYPES = [torch.int64, torch.uint8, torch.int32, torch.int16]


def _matrix():
    params = []
    for variant in VARIANTS:
        j = 0
        for dtype in DTYPES:
            for s in SHAPES:
                if not applicable(variant, s, dtype):
                    continue
                case = dict(
                    variant=variant.name,
                    dtype=dtype,
                    shape=s,
                    reduction=REDUCTIONS[j % 3],
                    gamma=GAMMAS[(j // 3) % 4],
                    alpha=ALPHAS[(j + j // 4) % 4],
                    target_dtype=TARGET_DTYPES[(j + j // 12) % 4],
                    ignore_frac=(0.0, 0.3)[(j // 2) % 2],
                    grid=1 + (j + j // 3) % 3,
                    order=(0, 1, 7)[(j // 5) % 3],
                    scale=30.0 if j % 7 == 3 else 1.0,     # saturated softmax: p_y rounds to 1 or 0
                    compute_grad=j % 11 != 5,
                    in_place=j % 2 == 0,
                    unit_grad_output=j % 5 == 1,           # scalar 1.0: the in-place backward returns at once
                )
                # The launcher's choice for the backward: 16-byte accesses for a scalar grad_output when
                # numel % VEC == 0 (buffers here are aligned); some such cases take the scalar kernel instead.
                case["backward_vec"] = (case["compute_grad"] and case["reduction"] != "none" and case["grid"] != 3
                                        and math.prod(s.shape) % vec_width(dtype) == 0)
                params.append(pytest.param(case, id="-".join([
                    variant.name, DTYPE_ID[dtype], s.name, case["reduction"], f"g{case['gamma']}",
                    f"a{case['alpha']}", TARGET_ID[case["target_dtype"]], f"ign{case['ignore_frac']}",
                    f"grid{case['grid']}", f"order{case['order']}", f"x{case['scale']:g}",
                    "nograd" if not case["compute_grad"] else "inplace" if case["in_place"] else "outofplace",
                    "bwdvec" if case["backward_vec"] else "bwd1",
                ])))
                j += 1
    return params


def alpha_args(kind, classes, gen, dtype) -> tuple[float, Optional[torch.Tensor], object]:
    """(alpha passed to the kernel, class weights, alpha for the reference: the weights as the kernel reads them,
    in the accumulation dtype, times alpha)."""
    if kind is None:
        return 1.0, None, None
    if kind == "0.25":
        return 0.25, None, 0.25
    weights = torch.rand(classes, generator=gen, dtype=torch.float64) * 2 + 0.1
    scale = 0.5 if kind == "class*0.5" else 1.0
    return scale, weights, weights.to(acc_dtype(dtype)).double() * scale


def seeded(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.mark.parametrize("case", _matrix())
def test_forward_and_backward_match_reference(emu, case, request):
    """One kernel variant on one shape and layout, the other parameters rotating over the matrix: loss, state,
    the forward's gradient, and the gradient after the backward kernel applied grad_output."""
    gen = seeded(request)
    variant, dtype, s = VARIANT[case["variant"]], case["dtype"], case["shape"]
    classes = s.shape[1]
    target_dtype = case["target_dtype"]
    ignore_index = 255 if target_dtype == torch.uint8 else (-100 if classes < 3 or case["grid"] != 2 else 1)
    x = make_input(s.shape, s.layout, dtype, gen, scale=case["scale"])
    target = make_target(s.shape, classes, target_dtype, gen, ignore_index, case["ignore_frac"])
    alpha, weights, alpha_ref = alpha_args(case["alpha"], classes, gen, dtype)
    reduction = case["reduction"]
    fwd = run_forward(emu, x, target, variant, grid=case["grid"], gamma=case["gamma"], alpha=alpha,
                      class_weight=weights, ignore_index=ignore_index, reduction=reduction,
                      compute_grad=case["compute_grad"], count_grid=1 + case["grid"] % 2, order=case["order"])
    grad_output, final = None, None
    if case["compute_grad"]:
        if reduction == "none":
            grad_output = torch.randn(target.shape, generator=gen, dtype=torch.float64).to(dtype)
        else:
            grad_output = torch.tensor(1.0 if case["unit_grad_output"] else 0.75 + torch.rand((), generator=gen).item(),
                                       dtype=torch.float64).to(dtype)
        final = run_backward(emu, fwd, grad_output, in_place=case["in_place"], vec=case["backward_vec"],
                             grid=case["grid"], order=case["order"])
    exp = expected(x.view, target, gamma=case["gamma"], alpha=alpha_ref, ignore_index=ignore_index,
                   reduction=reduction, grad_output=grad_output)
    check_against_reference(x, target, fwd, exp, alpha_ref=alpha_ref, ignore_index=ignore_index, reduction=reduction,
                            gamma=case["gamma"], grad_output=grad_output, final_grad=final, label=request.node.name)


# ============================================================================ edge cases


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_all_ignored(emu, variant, dtype, reduction, request):
    """No valid target: loss 0 (not NaN), zero gradient, 1/count read as 0 in the state."""
    gen = seeded(request)
    shape = (4, 16)
    x = make_input(shape, "contiguous", dtype, gen)
    target = torch.full((4,), -100, dtype=torch.int64)
    fwd = run_forward(emu, x, target, variant, grid=2, gamma=2.0, reduction=reduction)
    go = torch.randn((4,), generator=gen).to(dtype) if reduction == "none" else torch.tensor(1.5).to(dtype)
    final = run_backward(emu, fwd, go, in_place=False, vec=False, grid=1)
    exp = expected(x.view, target, gamma=2.0, alpha=None, ignore_index=-100, reduction=reduction, grad_output=go)
    assert torch.equal(fwd.loss.view, torch.zeros_like(fwd.loss.view)), fwd.loss.view
    assert torch.equal(fwd.raw_grad, torch.zeros_like(fwd.raw_grad))
    assert torch.equal(final, torch.zeros_like(final))
    check_against_reference(x, target, fwd, exp, alpha_ref=None, ignore_index=-100, reduction=reduction, gamma=2.0,
                            grad_output=go, final_grad=final, label=request.node.name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(0, 5), (2, 5, 0), (2, 0)], ids=["N0", "S0", "C0"])
@pytest.mark.parametrize("variant", [v for v in VARIANTS if not v.vec], ids=lambda v: v.name)  # strides not VEC-able
def test_empty_inputs(emu, variant, shape, reduction, request):
    """No element (one block is still launched): "none" writes nothing, "sum" and "mean" write 0, the
    state says count 0. With C = 0 (numel 0 but N > 0) the targets are all ignored, each loss 0."""
    gen = seeded(request)
    dtype = torch.float32
    x = make_input(shape, "contiguous", dtype, gen)
    target = torch.full((shape[0], *shape[2:]), -100, dtype=torch.int64)
    fwd = run_forward(emu, x, target, variant, grid=1, gamma=2.0, reduction=reduction)
    assert torch.equal(fwd.loss.view, torch.zeros_like(fwd.loss.view))
    assert fwd.raw_grad.numel() == 0
    assert torch.equal(bits(fwd.state), bits(expected_state(0, reduction, fwd.fold, torch.float32)))
    go = torch.ones(target.shape, dtype=dtype) if reduction == "none" else torch.tensor(2.0, dtype=dtype)
    run_backward(emu, fwd, go, in_place=False, vec=False, grid=1)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("dtype,target_dtype", [(torch.float32, torch.int64), (torch.bfloat16, torch.uint8),
                                                (torch.float16, torch.int16)], ids=["f32-i64", "bf16-u8", "f16-i16"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_out_of_range_target_gives_nan(emu, variant, dtype, target_dtype, reduction, request):
    """A class index outside [0, C) (not checked on the device): NaN loss and gradient row for that element,
    NaN reduced loss; the other elements and the count (which excludes it) unaffected."""
    gen = seeded(request)
    shape, classes = (6, 16), 16
    ignore_index = 255 if target_dtype == torch.uint8 else -100
    x = make_input(shape, "contiguous", dtype, gen)
    target = make_target(shape, classes, torch.int64, gen, ignore_index, 0.0)
    target[1] = classes if target_dtype != torch.uint8 else 200
    target[3] = ignore_index
    if target_dtype != torch.uint8:
        target[4] = -3
    target = target.to(target_dtype)
    fwd = run_forward(emu, x, target, variant, grid=2, gamma=2.0, ignore_index=ignore_index, reduction=reduction)
    go = torch.randn((6,), generator=gen).to(dtype) if reduction == "none" else torch.tensor(0.5).to(dtype)
    final = run_backward(emu, fwd, go, in_place=True, vec=False, grid=2)
    exp = expected(x.view, target, gamma=2.0, alpha=None, ignore_index=ignore_index, reduction=reduction,
                   grad_output=go)
    assert exp.count == (3 if target_dtype != torch.uint8 else 4)
    check_against_reference(x, target, fwd, exp, alpha_ref=None, ignore_index=ignore_index, reduction=reduction,
                            gamma=2.0, grad_output=go, final_grad=final, label=request.node.name)


NON_FINITE = {
    "neg_inf_first": (0, float("-inf")),     # -inf at class 0 (a masked class), target elsewhere: finite loss
    "neg_inf_target": (3, float("-inf")),    # -inf at the target: loss +inf
    "pos_inf_other": (0, float("inf")),      # +inf elsewhere: NaN (log_softmax gives inf - inf)
    "pos_inf_target": (3, float("inf")),
    "nan": (5, float("nan")),
    "all_neg_inf": (None, float("-inf")),    # NaN
}


@pytest.mark.parametrize("kind", NON_FINITE)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_non_finite_logits_propagate_as_in_the_reference(emu, variant, kind, request):
    """SPEC: NaN or inf in the input propagates as in the reference. Row 1 of four holds the non-finite
    logit(s) (target class 3); the other rows must be unaffected."""
    gen = seeded(request)
    shape = (4, 40)
    x = make_input(shape, "contiguous", torch.float32, gen)
    column, value = NON_FINITE[kind]
    if column is None:
        x.view[1, :] = value
    else:
        x.view[1, column] = value
    target = torch.tensor([5, 3, 0, 39])
    fwd = run_forward(emu, x, target, variant, grid=1, gamma=2.0, reduction="none")
    exp = expected(x.view, target, gamma=2.0, alpha=None, ignore_index=-100, reduction="none", grad_output=None)
    check_against_reference(x, target, fwd, exp, alpha_ref=None, ignore_index=-100, reduction="none", gamma=2.0,
                            grad_output=None, final_grad=None, label=request.node.name)


DETERMINISM_SHAPES = {"channels": (2, 5, 300), "rows8": (70, 16), "rows8_vec": (70, 16), "rows32": (20, 40),
                      "rows32_vec": (20, 40), "rows512": (3, 700), "rows512_vec": (3, 704)}


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_ID.get)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_same_grid_gives_the_same_bits(emu, variant, dtype, reduction, request):
    """The reduction is a fixed tree over the grid: whichever block finishes last, the bits are the same."""
    gen = seeded(request)
    shape = DETERMINISM_SHAPES[variant.name]
    x = make_input(shape, "contiguous", dtype, gen)
    target = make_target(shape, shape[1], torch.int64, gen, -100, 0.2)
    runs = [run_forward(emu, x, target, variant, grid=3, gamma=0.5, reduction=reduction, count_grid=2, order=order)
            for order in (0, 1, 12345)]
    for other in runs[1:]:
        assert torch.equal(bits(runs[0].loss.view), bits(other.loss.view))
        assert torch.equal(bits(runs[0].raw_grad), bits(other.raw_grad))
        assert torch.equal(bits(runs[0].state), bits(other.state))
    exp = expected(x.view, target, gamma=0.5, alpha=None, ignore_index=-100, reduction=reduction, grad_output=None)
    check_against_reference(x, target, runs[0], exp, alpha_ref=None, ignore_index=-100, reduction=reduction,
                            gamma=0.5, grad_output=None, final_grad=None, label=request.node.name)


JITTER_SHAPES = {"channels": (3, 7, 100), "rows8": (40, 16), "rows8_vec": (40, 16), "rows32": (12, 40),
                 "rows32_vec": (12, 40), "rows512": (5, 600), "rows512_vec": (5, 600)}


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_perturbed_schedules_give_the_same_bits(emu, variant, request):
    """Warps held back at random after a __syncthreads until the others have reached the next one (as far
    ahead as a GPU lets them run) change nothing: no shared-memory slot is rewritten while a slower warp
    may still read it."""
    gen = seeded(request)
    shape = JITTER_SHAPES[variant.name]
    x = make_input(shape, "contiguous", torch.float32, gen)
    target = make_target(shape, shape[1], torch.int64, gen, -100, 0.2)

    def run():
        return run_forward(emu, x, target, variant, grid=1, gamma=2.0, reduction="mean", count_grid=1)

    plain = run()
    try:
        for seed in (1, 2, 3):
            emu.lib.emu_set_schedule_perturbation(seed)
            jittered = run()
            assert torch.equal(bits(plain.loss.view), bits(jittered.loss.view)), f"seed {seed}"
            assert torch.equal(bits(plain.raw_grad), bits(jittered.raw_grad)), f"seed {seed}"
            assert torch.equal(bits(plain.state), bits(jittered.state)), f"seed {seed}"
    finally:
        emu.lib.emu_set_schedule_perturbation(0)


# ============================================================================ the count pre-pass


@pytest.mark.parametrize("grid", [1, 2, 3])
@pytest.mark.parametrize("target_dtype", TARGET_DTYPES, ids=TARGET_ID.get)
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=DTYPE_ID.get)
def test_count_valid_targets(emu, acc, target_dtype, grid, request):
    """state[0] = 1 / (targets neither ignored nor out of range), 0 when there is none; over 1000 positions
    so that every grid walks its grid-stride loop."""
    gen = seeded(request)
    classes, positions = 20, 1000
    ignore_index = 255 if target_dtype == torch.uint8 else -100
    t = torch.randint(0, classes, (positions,), generator=gen)
    r = torch.rand(positions, generator=gen)
    t = torch.where(r < 0.2, torch.full_like(t, ignore_index), t)
    t = torch.where((r > 0.9) & (r < 0.93), torch.full_like(t, classes + 3), t)
    if target_dtype != torch.uint8:
        t = torch.where(r > 0.97, torch.full_like(t, -7), t)
    t = t.to(target_dtype)
    tl = t.long()
    count = int(((tl != ignore_index) & (tl >= 0) & (tl < classes)).sum())
    for target, n in [(t, count), (torch.full_like(t, ignore_index), 0)]:
        state = torch.full((3,), float("nan"), dtype=acc)
        emu.count(acc=acc, grid=grid, order=grid - 1, target=target, positions=positions, classes=classes,
                  ignore_index=ignore_index, state=state)
        want = torch.tensor(1.0, dtype=acc) / n if n else torch.tensor(0.0, dtype=acc)
        assert torch.equal(bits(state[0]), bits(want)), (state[0].item(), n)
        assert torch.isnan(state[1:]).all(), "the count pre-pass writes state[0] only"


# ============================================================================ the backward kernel


BACKWARD_SHAPES = [Shape("6x64", (6, 64), "contiguous"), Shape("3x37x16", (3, 37, 16), "contiguous"),
                   Shape("2x16x3x5cl", (2, 16, 3, 5), "channels_last"), Shape("7x3T", (7, 3), "transposed")]


def _backward_matrix():
    params = []
    j = 0
    for dtype in DTYPES:
        for s in BACKWARD_SHAPES:
            for kind in ("scalar", "scalar_vec", "elementwise"):
                numel = math.prod(s.shape)
                if kind == "scalar_vec" and numel % vec_width(dtype):
                    continue
                for in_place in (True, False):
                    params.append(pytest.param(dtype, s, kind, in_place, 1 + j % 3, id="-".join([
                        DTYPE_ID[dtype], s.name, kind, "inplace" if in_place else "outofplace", f"grid{1 + j % 3}"])))
                    j += 1
    return params


@pytest.mark.parametrize("dtype,s,kind,in_place,grid", _backward_matrix())
def test_backward_kernel_is_exact(emu, dtype, s, kind, in_place, grid, request):
    """out = grad * grad_output * state[1] evaluated in the accumulation type and rounded once: bitwise."""
    gen = seeded(request)
    acc = acc_dtype(dtype)
    n, c = s.shape[:2]
    grad_buffer = Guarded(s.shape, layout_strides(s.shape, s.layout), dtype)  # dense, as the forward allocates it
    grad_buffer.view.copy_(torch.randn(s.shape, generator=gen, dtype=torch.float64).to(dtype))
    original = grad_buffer.view.clone()
    geometry = (n, c, math.prod(s.shape[2:]), 0, 0, 0, *ncs_strides(grad_buffer.view))
    state_1 = (1.0, 1 / 7)[grid % 2]
    state = torch.tensor([float("nan"), state_1, 0.0], dtype=acc)
    if kind == "elementwise":
        go = torch.randn((n, *s.shape[2:]), generator=gen, dtype=torch.float64).to(dtype)
        shape_go = go.reshape(n, 1, *s.shape[2:])
        want = ((original.to(acc) * shape_go.to(acc)) * state[1]).to(dtype)
    else:
        go = torch.tensor(1.0 if grid == 1 else 1.25, dtype=dtype)
        scale = go.to(acc) * state[1]
        want = (original.to(acc) * scale).to(dtype)
    fwd = Forward(loss=None, grad=grad_buffer, state=state, geometry=geometry, fold=False)
    out = run_backward(emu, fwd, go, in_place=in_place, vec=kind == "scalar_vec", grid=grid, order=grid - 1)
    assert out.stride() == grad_buffer.view.stride()
    assert torch.equal(bits(out), bits(want)), (out - want).abs().max()
    if not in_place:
        assert torch.equal(bits(grad_buffer.view), bits(original)), "the out-of-place backward modified its input"


@pytest.mark.parametrize("in_place", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize("kind", ["scalar", "scalar_vec", "elementwise"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_ID.get)
def test_backward_of_a_consumed_buffer_is_nan(emu, dtype, kind, in_place, request):
    """state[2] != 0 (set with 0xff bytes after an in-place backward): NaN everywhere, never a stale gradient,
    even where a unit scale would otherwise skip the pass."""
    gen = seeded(request)
    acc = acc_dtype(dtype)
    shape = (4, 32)
    grad_buffer = Guarded(shape, (32, 1), dtype)
    grad_buffer.view.copy_(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
    state = torch.tensor([1.0, 1.0, 0.0], dtype=acc)
    state.view(torch.uint8)[2 * state.element_size():] = 0xFF
    go = torch.randn((4,), generator=gen).to(dtype) if kind == "elementwise" else torch.tensor(1.0, dtype=dtype)
    fwd = Forward(loss=None, grad=grad_buffer, state=state, geometry=(4, 32, 1, 0, 0, 0, 32, 1, 0), fold=False)
    out = run_backward(emu, fwd, go, in_place=in_place, vec=kind == "scalar_vec", grid=2)
    assert torch.isnan(out).all()


# ============================================================================ the emulator itself


@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("mode", ["xor", "down"])
def test_emulated_shuffles_follow_cuda(emu, mode, width):
    """__shfl_xor_sync / __shfl_down_sync with a width, as the CUDA programming guide describes them: a lane
    may read from its own or an earlier width-segment (xor), never past the end of its segment (down);
    otherwise it keeps its own value."""
    out = torch.zeros(256, dtype=torch.int64)
    params = [1, 2, 3, 4, 8, 16, 31] if mode == "xor" else [0, 1, 2, 3, 5, 8, 16, 31]
    for param in params:
        emu.check(emu.lib.emu_selftest_shuffle(2 if mode == "xor" else 1, param, width, out.data_ptr()))
        want = []
        for block in range(2):
            for t in range(128):
                lane, warp_base = t % 32, t - t % 32
                if mode == "xor":
                    src = lane ^ param
                    src = src if src // width <= lane // width else lane
                else:
                    src = lane + param if lane % width + param < width else lane
                want.append(1000 * block + warp_base + src)
        assert out.tolist() == want, (mode, width, param)


def test_emulated_shared_memory_is_per_block(emu):
    out = torch.zeros(256, dtype=torch.int64)
    emu.check(emu.lib.emu_selftest_shared(out.data_ptr()))
    assert out.tolist() == [1000 * b + 127 - t for b in range(2) for t in range(128)]


@pytest.mark.parametrize("which,message", [(0, "returned from the kernel"), (1, "different shuffles"),
                                           (2, "returned from the kernel")],
                         ids=["divergent-syncthreads", "divergent-shuffle", "missing-lane"])
def test_emulator_reports_misuse_instead_of_hanging(emu, which, message):
    assert emu.lib.emu_selftest_misuse(which) != 0
    assert message in emu.lib.emu_last_error().decode()
