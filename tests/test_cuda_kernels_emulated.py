"""The softmax CUDA kernels, executed on the CPU, against the float64 reference: GPU code proven without a GPU.

tests/cuda_emulation/cuda_on_cpu.h is a small CPU implementation of the CUDA programming model
(blocks run one after the other, each with blockDim real threads; __shared__ as function statics,
dynamic shared memory as a per-block buffer of 0xff bytes, __syncthreads and warp shuffles as
barriers, atomics through std::atomic_ref). tests/cuda_emulation/emulated_kernels.cpp compiles
csrc/cuda/softmax_focal_loss_kernels.cuh with it and exposes every kernel variant to ctypes, each
behind the precondition its launcher (softmax_focal_loss_launch.h, choose_kernel) guarantees:

  rows<GROUP>        GROUP = 1 .. 256 lanes per position, the row in registers (> 32 lanes: several
                     warps per row, reduced through shared memory), any row start (edge vectors masked)
  long_rows(_staged) one position per block of 1024 threads (512 for float64), the row read twice, or
                     staged in dynamic shared memory
  channels(_small)   one position per thread, all C classes in a register tile (C <= 24 / 8; float64 8 / 4)
  positions(_staged) any strides, any C, BATCH classes in flight, read twice or staged in shared memory

plus the count pre-pass (count_valid_targets_kernel, per target dtype) and the backward kernel, for
float, double, __half and __nv_bfloat16, with an explicit grid (small grids exercise the grid-stride
loops and the last-block reduction) and a block order (the result must not depend on which block
finishes last). applicable() mirrors those preconditions and launcher_choice() mirrors choose_kernel:
the matrix runs only what a launcher could run, and test_inapplicable_calls_are_refused proves the
emulation refuses everything else (so nothing is skipped silently).

Every output buffer starts as NaN inside a NaN guard region: an element the kernel does not write,
or a write out of bounds, fails. Built with g++ once per session (tests/cuda_emulation/emulation_build.py);
skipped without g++ or without the CUDA headers (cuda_fp16.h, cuda_bf16.h). Numerics: the host's
expf/logf/powf stand in for CUDA's (also for __expf), so this checks the kernels' logic and
reductions, not the last ulp of the GPU build.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import subprocess
import sys
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
HALF_DTYPES = (torch.float16, torch.bfloat16)
DTYPE_ID = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
TARGET_DTYPES = [torch.int64, torch.uint8, torch.int32, torch.int16]
TARGET_ID = {torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}
REDUCTIONS = ["none", "sum", "mean"]

BLOCK = 256  # focal_cuda::device::kBlock
# sharedMemPerBlockOptin of H100 / H200 (sm_90): the launcher stages only what fits.
MAX_DYNAMIC_SHARED_MEMORY = 227 * 1024


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def vec_width(dtype: torch.dtype) -> int:
    return 16 // element_size(dtype)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ============================================================================ the kernel variants


@dataclass(frozen=True)
class Variant:
    name: str
    code: int  # emulated_kernels.cpp: 0..8 rows GROUP = 1 << code, 10/11 long rows, 20/21 channels, 30/31 positions
    family: str
    group: int = 0
    staged: bool = False
    small_tile: bool = False


ROWS = [Variant(f"rows{1 << k}", k, "rows", group=1 << k) for k in range(9)]
VARIANTS = ROWS + [
    Variant("long_rows", 10, "long_rows"),
    Variant("long_rows_staged", 11, "long_rows", staged=True),
    Variant("channels_small", 20, "channels", small_tile=True),
    Variant("channels", 21, "channels"),
    Variant("positions", 30, "positions"),
    Variant("positions_staged", 31, "positions", staged=True),
]
VARIANT = {v.name: v for v in VARIANTS}
ROWS_BY_GROUP = {v.group: v for v in ROWS}
# One of each code path, for the edge-case tests: warp-shuffle and shared-memory row reductions, the others.
REPRESENTATIVE = [VARIANT[n] for n in ("rows1", "rows4", "rows32", "rows64", "rows256", "long_rows",
                                       "long_rows_staged", "channels_small", "channels", "positions",
                                       "positions_staged")]


def rows_capacity(group: int, dtype: torch.dtype) -> int:
    """RowsTile: GROUP lanes x 64 bytes (16 elements, 8 for float64) hold C + VEC - 1 elements."""
    per_lane = 8 if dtype == torch.float64 else 16
    return group * per_lane - (vec_width(dtype) - 1)


def channels_tile(dtype: torch.dtype, small: bool) -> int:
    if dtype == torch.float64:
        return 4 if small else 8
    return 8 if small else 24


@dataclass(frozen=True)
class Geometry:
    """The 9 int64 of emulated_kernels.cpp: (N, C, S), the logits' and the gradient's (n, c, s) strides."""
    rows: int
    classes: int
    spatial: int
    input_stride_n: int
    input_stride_c: int
    input_stride_s: int
    grad_stride_n: int = 0
    grad_stride_c: int = 0
    grad_stride_s: int = 0

    @property
    def positions(self) -> int:
        return self.rows * self.spatial

    def as_tuple(self) -> tuple:
        return (self.rows, self.classes, self.spatial, self.input_stride_n, self.input_stride_c, self.input_stride_s,
                self.grad_stride_n, self.grad_stride_c, self.grad_stride_s)


def staging_bytes(v: Variant, g: Geometry, dtype: torch.dtype) -> int:
    if not v.staged:
        return 0
    if v.family == "long_rows":
        return ((g.classes + 2 * vec_width(dtype)) * element_size(dtype) + 15) // 16 * 16
    return BLOCK * g.classes * element_size(dtype)


def refusal(v: Variant, g: Geometry, dtype: torch.dtype, compute_grad: bool = True) -> Optional[str]:
    """The launcher's precondition for this kernel that ``g`` breaks, as emulated_kernels.cpp words its refusal;
    None where the kernel may run."""
    class_contiguous = g.input_stride_c == 1 and (not compute_grad or g.grad_stride_c == 1)
    positions_contiguous = g.spatial == 1 or (g.input_stride_s == 1 and (not compute_grad or g.grad_stride_s == 1))
    if v.family == "rows":
        if not class_contiguous:
            return "unit class strides"
        if rows_capacity(v.group, dtype) < g.classes:
            return "register tile must hold"
    elif v.family == "long_rows":
        if not class_contiguous:
            return "unit class strides"
    elif v.family == "channels":
        if not positions_contiguous:
            return "neighbouring positions adjacent"
        if g.classes > channels_tile(dtype, v.small_tile):
            return "register tile"
        max_offset = (2**32 - 1) // torch.empty((), dtype=dtype).element_size()
        if (g.classes - 1) * g.input_stride_c > max_offset or (
                compute_grad and (g.classes - 1) * g.grad_stride_c > max_offset):
            return "32-bit byte stride"
    return None


def applicable(v: Variant, g: Geometry, dtype: torch.dtype, compute_grad: bool = True) -> bool:
    """A launcher could run ``v`` here: its preconditions hold and its staging fits the shared memory."""
    return refusal(v, g, dtype, compute_grad) is None and staging_bytes(v, g, dtype) <= MAX_DYNAMIC_SHARED_MEMORY


def launcher_choice(g: Geometry, dtype: torch.dtype, compute_grad: bool = True) -> Variant:
    """choose_kernel (softmax_focal_loss_launch.h) in Python."""
    class_contiguous = g.input_stride_c == 1 and (not compute_grad or g.grad_stride_c == 1)
    if class_contiguous:
        for v in ROWS:
            if rows_capacity(v.group, dtype) >= g.classes:
                return v
        staged = VARIANT["long_rows_staged"]
        return staged if staging_bytes(staged, g, dtype) <= MAX_DYNAMIC_SHARED_MEMORY else VARIANT["long_rows"]
    positions_contiguous = g.spatial == 1 or (g.input_stride_s == 1 and (not compute_grad or g.grad_stride_s == 1))
    max_offset = (2**32 - 1) // torch.empty((), dtype=dtype).element_size()  # 32-bit byte offsets
    small_offsets = (g.classes - 1) * g.input_stride_c <= max_offset and (
        not compute_grad or (g.classes - 1) * g.grad_stride_c <= max_offset)
    if positions_contiguous and small_offsets and g.classes <= channels_tile(dtype, small=False):
        return VARIANT["channels_small"] if g.classes <= channels_tile(dtype, small=True) else VARIANT["channels"]
    staged = VARIANT["positions_staged"]
    return staged if staging_bytes(staged, g, dtype) <= MAX_DYNAMIC_SHARED_MEMORY else VARIANT["positions"]


def emulation_cost_ok(v: Variant, g: Geometry) -> bool:
    """Emulated threads are real OS threads and every shuffle / barrier a rendezvous: keep launches small."""
    p = g.positions
    if v.family == "long_rows":  # 1024 threads per position
        return p <= 4
    if v.family == "rows":
        return math.ceil(p / (BLOCK // v.group)) <= 16
    return p <= 1024 and p * g.classes <= 400_000


# ============================================================================ the emulated kernels


class Emulator:
    """ctypes front end of emulated_kernels.cpp."""

    def __init__(self, lib: ctypes.CDLL):
        ll, ull, i, d, p = ctypes.c_longlong, ctypes.c_ulonglong, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
        lib.emu_softmax_focal_loss_forward.argtypes = [i, i, ll, ll, ull, p, p, p, i, p, p, i, i, i, ll, d, p, p, i,
                                                       d, p, i, ll, i, p]
        lib.emu_count_valid_targets.argtypes = [i, ll, ull, p, i, ll, ll, ll, p]
        lib.emu_softmax_focal_loss_backward.argtypes = [i, i, ll, ull, p, p, p, p, i, p]
        lib.emu_selftest_shuffle.argtypes = [i, i, i, p]
        lib.emu_selftest_shared.argtypes = [p]
        lib.emu_selftest_misuse.argtypes = [i]
        lib.emu_set_launch_timeout.argtypes = [i]
        lib.emu_set_schedule_perturbation.argtypes = [ull]
        self.lib = lib

    def error(self) -> str:
        return self.lib.emu_last_error().decode()

    def check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"emulated launch failed: {self.error()}")

    @staticmethod
    def doubles(values) -> Optional[ctypes.Array]:
        return (ctypes.c_double * len(values))(*values) if values else None

    def forward_rc(self, *, dtype, variant: Variant, grid, count_grid, order, input_ptr, grad_ptr, loss_ptr,
                   loss_acc, geometry: Geometry, target, reduction, compute_grad, ignore_index, gamma: "Gamma",
                   alpha, weight: Optional["ClassWeight"], fold, state) -> int:
        return self.lib.emu_softmax_focal_loss_forward(
            DTYPE_CODE[dtype], variant.code, grid, count_grid, order, input_ptr, grad_ptr, loss_ptr, int(loss_acc),
            (ctypes.c_longlong * 9)(*geometry.as_tuple()), target.data_ptr() if target.numel() else None,
            TARGET_KIND[target.dtype], REDUCTION_CODE[reduction], int(compute_grad), ignore_index, gamma.gamma,
            self.doubles(gamma.thresholds), self.doubles(gamma.values), len(gamma.thresholds), alpha,
            weight.tensor.data_ptr() if weight is not None else None, int(weight is not None and weight.double),
            weight.stride if weight is not None else 0, int(fold), state.data_ptr())

    def count(self, *, acc, grid, order, target_ptr, target_dtype, positions, classes, ignore_index, state) -> None:
        self.check(self.lib.emu_count_valid_targets(DTYPE_CODE[acc], grid, order, target_ptr, TARGET_KIND[target_dtype],
                                                    positions, classes, ignore_index, state.data_ptr()))

    def backward(self, *, dtype, vec, grid, order, grad, out, geometry: Geometry, grad_output, scalar, state) -> None:
        self.check(self.lib.emu_softmax_focal_loss_backward(
            DTYPE_CODE[dtype], int(vec), grid, order, grad.data_ptr(), out.data_ptr(),
            (ctypes.c_longlong * 9)(*geometry.as_tuple()), grad_output.data_ptr(), int(scalar), state.data_ptr()))


@pytest.fixture(scope="session")
def emu(tmp_path_factory) -> Emulator:
    return Emulator(load_library(tmp_path_factory))


# ============================================================================ gamma and alpha


@dataclass(frozen=True)
class Gamma:
    """A constant gamma, or a schedule: the first k with p_t < thresholds[k] takes values[k], else gamma."""
    name: str
    gamma: float
    thresholds: tuple = ()
    values: tuple = ()

    @property
    def largest(self) -> float:
        return max((self.gamma, *self.values))


GAMMAS = [Gamma("0", 0.0), Gamma("0.5", 0.5), Gamma("2", 2.0), Gamma("3.7", 3.7),
          Gamma("flsd53", 3.0, (0.2, 0.5), (5.0, 3.0)),                 # FLSD-53 (Mukhoti et al. 2020)
          Gamma("sched3", 0.5, (0.05, 0.3, 0.7), (4.0, 2.0, 1.0))]      # three thresholds, gamma < 1 above them
GAMMA = {g.name: g for g in GAMMAS}


def per_position_gamma(xd: torch.Tensor, t_ok: torch.Tensor, ignore_index: int, gamma: Gamma) -> torch.Tensor:
    """The schedule's rule on the float64 p_t (the kernel decides on its float32 p_t: random inputs tie with a
    threshold with probability ~1e-7; test_gamma_schedule_at_a_threshold checks ties on the kernel's own p_t)."""
    safe = torch.where(t_ok != ignore_index, t_ok, torch.zeros_like(t_ok))
    p_t = torch.log_softmax(xd, dim=1).gather(1, safe.unsqueeze(1)).squeeze(1).exp()
    g = torch.full(p_t.shape, gamma.gamma, dtype=torch.float64)
    for threshold, value in reversed(list(zip(gamma.thresholds, gamma.values))):
        g = torch.where(p_t < threshold, torch.full_like(g, value), g)
    return g


@dataclass
class ClassWeight:
    tensor: torch.Tensor  # the buffer the kernel reads (float32 or float64), any stride
    double: bool
    stride: int


ALPHAS = [None, "0.25", "w32", "w64*0.5", "w32s2*1.5", "scalar0", "w64s3"]


def alpha_args(kind, classes, gen, dtype) -> tuple[float, Optional[ClassWeight], object]:
    """(alpha passed to the kernel, class weights as the kernel reads them, alpha for the reference: the weights
    converted to the accumulation dtype as the kernel converts them, times alpha)."""
    acc = acc_dtype(dtype)
    if kind is None:
        return 1.0, None, None
    if kind == "0.25":
        return 0.25, None, 0.25
    if kind == "scalar0":  # a 0-dim alpha: one weight read with stride 0
        value = torch.tensor([0.3], dtype=torch.float32)
        return 1.0, ClassWeight(value, False, 0), float(value.to(acc).double())
    stride = {"w32": 1, "w64*0.5": 1, "w32s2*1.5": 2, "w64s3": 3}[kind]
    scale = {"w32": 1.0, "w64*0.5": 0.5, "w32s2*1.5": 1.5, "w64s3": 1.0}[kind]
    wdtype = torch.float64 if "w64" in kind else torch.float32
    values = torch.rand(classes, generator=gen, dtype=torch.float64) * 2 + 0.1
    buffer = torch.full((classes * stride,), float("nan"), dtype=wdtype)  # the gaps are NaN: must not be read
    buffer[::stride] = values.to(wdtype)
    read = buffer[::stride].to(acc)
    alpha_ref = (read * torch.tensor(scale, dtype=acc)).double()  # alpha * weight in the accumulation dtype
    return scale, ClassWeight(buffer, wdtype == torch.float64, stride), alpha_ref


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


@dataclass(frozen=True)
class Shape:
    name: str
    shape: tuple
    layout: str


def layout_strides(shape: tuple, layout: str) -> tuple[tuple, int]:
    """(strides, element offset of the first logit from a 16-byte boundary)."""
    n, c, *spatial = shape
    s = math.prod(spatial)
    if layout in ("contiguous", "offset1"):
        return torch.empty(shape).stride(), int(layout == "offset1")
    if layout == "channels_last":  # classes innermost, any number of spatial dims
        strides, step = [], c
        for size in reversed(spatial):
            strides.append(step)
            step *= size
        return (step, 1, *reversed(strides)), 0
    if layout == "sliced":  # (N, C) rows of a wider, 16-element-aligned buffer
        assert not spatial
        return ((c + 15) // 16 * 16 + 16, 1), 0
    if layout == "sliced_odd":  # (N, C) rows of a buffer C + 5 wide: rows start anywhere
        assert not spatial
        return (c + 5, 1), 0
    if layout == "transposed":  # (C, N).t()
        assert not spatial
        return (1, n), 0
    if layout == "cf_padded":  # channel-first, unit spatial stride, padded class and image strides
        assert len(spatial) == 1
        return (c * (s + 3) + 1, s + 3, 1), 0
    if layout == "cf_strided":  # channel-first, every other position: spatial stride 2
        assert len(spatial) == 1
        return (2 * c * s, 2 * s, 2), 0
    raise ValueError(layout)


def make_input(shape, layout, dtype, gen, scale=1.0) -> Guarded:
    values = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)
    strides, offset = layout_strides(shape, layout)
    x = Guarded(shape, strides, dtype, offset=offset)
    x.view.copy_(values)
    return x


def grad_strides(x: torch.Tensor) -> tuple:
    """The forward's gradient: empty_like(input, preserve_format), a fresh (16-byte aligned) allocation."""
    return torch.empty_like(x, memory_format=torch.preserve_format).stride()


def geometry_of(x: torch.Tensor, compute_grad: bool = True) -> Geometry:
    n, c = x.shape[:2]
    grad = (0, 0, 0)
    if compute_grad:
        grad = ncs_strides(torch.empty_strided(tuple(x.shape), grad_strides(x)))
    return Geometry(n, c, math.prod(x.shape[2:]), *ncs_strides(x), *grad)


def shape_geometry(s: Shape, compute_grad: bool = True) -> Geometry:
    strides, _ = layout_strides(s.shape, s.layout)
    return geometry_of(torch.empty_strided(s.shape, strides, device="meta"), compute_grad)


def make_target(shape, classes, dtype, gen, ignore_index, ignore_frac) -> torch.Tensor:
    """Class indices (uint8: below 255, its ignore value); a fraction set to ignore_index (wrapped to the dtype
    when it cannot hold it: then a class the kernel must not ignore)."""
    target_shape = (shape[0], *shape[2:])
    high = min(classes, 255) if dtype == torch.uint8 else classes
    t = torch.randint(0, max(high, 1), target_shape, generator=gen)
    if ignore_frac:
        t = torch.where(torch.rand(target_shape, generator=gen) < ignore_frac, torch.full_like(t, ignore_index), t)
    return t.to(dtype)


# ============================================================================ running the kernels like the launcher


@dataclass
class Forward:
    loss: Guarded
    grad: Optional[Guarded]
    state: torch.Tensor
    geometry: Geometry
    fold: bool
    raw_grad: Optional[torch.Tensor] = None  # the forward's gradient as written (an in-place backward overwrites it)


def run_forward(emu: Emulator, x: Guarded, target: torch.Tensor, variant: Variant, *, grid: int,
                gamma: Gamma = GAMMA["2"], alpha: float = 1.0, weight: Optional[ClassWeight] = None,
                ignore_index: int = -100, reduction: str = "mean", compute_grad: bool = True, count_grid: int = 2,
                order: int = 0, fold: Optional[bool] = None, loss_acc: bool = False) -> Forward:
    """The forward op as softmax_focal_loss_launch.h runs it: the count pre-pass first when the mean is
    folded into the gradient (mean, gradient wanted, not float16), then the chosen kernel."""
    dtype = x.view.dtype
    acc = acc_dtype(dtype)
    if fold is None:
        fold = compute_grad and reduction == "mean" and dtype != torch.float16
    loss_shape = tuple(target.shape) if reduction == "none" else ()
    loss = Guarded(loss_shape, torch.empty(loss_shape).stride(), acc if loss_acc else dtype)
    grad = Guarded(tuple(x.view.shape), grad_strides(x.view), dtype) if compute_grad else None
    geometry = geometry_of(x.view, compute_grad)
    assert refusal(variant, geometry, dtype, compute_grad) is None, "the test asked for an inapplicable kernel"
    state = torch.full((3,), float("nan"), dtype=acc)
    emu.check(emu.forward_rc(dtype=dtype, variant=variant, grid=grid, count_grid=count_grid, order=order,
                             input_ptr=x.view.data_ptr(), grad_ptr=grad.view.data_ptr() if grad else None,
                             loss_ptr=loss.view.data_ptr(), loss_acc=loss_acc, geometry=geometry,
                             target=target.contiguous(), reduction=reduction, compute_grad=compute_grad,
                             ignore_index=ignore_index, gamma=gamma, alpha=alpha, weight=weight, fold=fold,
                             state=state))
    assert loss.untouched(), "loss written out of bounds"
    assert grad is None or grad.untouched(), "gradient written out of bounds"
    assert x.untouched(), "the logits' guard region was written"
    return Forward(loss, grad, state, geometry, fold, grad.view.clone() if grad else None)


def run_backward(emu: Emulator, fwd: Forward, grad_output: torch.Tensor, *, in_place: bool, vec: bool, grid: int,
                 order: int = 0) -> torch.Tensor:
    """softmax_focal_loss_backward(_): out = grad * grad_output * state[1], in place or into a fresh buffer.
    A scalar grad_output walks the flat storage (16-byte packs when vec); one per position (reduction "none")
    the (N, C, S) geometry."""
    grad = fwd.grad.view
    scalar = grad_output.dim() == 0
    assert not vec or scalar
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


def _reference_piece(x, xd, t_ok, *, gamma, alpha, ignore_index, reduction, grad_output):
    """focal_cuda.reference with one gamma in float64 with autograd: (loss, grad for grad_output, grad of the sum)."""
    kwargs = dict(gamma=gamma, alpha=alpha, ignore_index=ignore_index)
    xv = xd.clone().requires_grad_()
    loss = reference.softmax_focal_loss(xv, t_ok, reduction=reduction, **kwargs)
    grad = None
    if grad_output is not None:
        (grad,) = torch.autograd.grad(loss, xv, grad_output.double())
    loss_sum = reference.softmax_focal_loss(xv, t_ok, reduction="sum", **kwargs)
    (grad_sum,) = torch.autograd.grad(loss_sum, xv)

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
    return loss.detach(), grad, grad_sum


def expected(x: torch.Tensor, target: torch.Tensor, *, gamma: Gamma, alpha, ignore_index, reduction,
             grad_output: Optional[torch.Tensor]) -> Expected:
    """focal_cuda.reference in float64 with autograd. Out-of-range targets (the reference raises on them)
    are evaluated as ignored and then made NaN: their loss, their gradient row, any reduced loss. A gamma
    schedule: each position's gamma from its p_t, the reference evaluated per gamma and the pieces combined
    (a position's loss and gradient row depend on its own logits only)."""
    c = x.shape[1]
    t = target.long()
    bad = (t != ignore_index) & ((t < 0) | (t >= c))
    t_ok = torch.where(bad, torch.full_like(t, ignore_index), t)
    count = int(((t != ignore_index) & ~bad).sum())
    xd = x.detach().double()
    position_gamma = per_position_gamma(xd, t_ok, ignore_index, gamma)
    pieces = sorted(set(position_gamma.flatten().tolist())) or [gamma.gamma]
    kwargs = dict(alpha=alpha, ignore_index=ignore_index)
    if len(pieces) == 1:
        loss, grad, grad_sum = _reference_piece(x, xd, t_ok, gamma=pieces[0], reduction=reduction,
                                                grad_output=grad_output, **kwargs)
    else:
        loss_none = torch.zeros(t.shape, dtype=torch.float64)
        grad_sum = torch.zeros_like(xd)
        for value in pieces:
            piece_loss, _, piece_grad_sum = _reference_piece(x, xd, t_ok, gamma=value, reduction="none",
                                                             grad_output=None, **kwargs)
            here = position_gamma == value
            loss_none = torch.where(here, piece_loss, loss_none)
            grad_sum = torch.where(here.unsqueeze(1).expand_as(xd), piece_grad_sum, grad_sum)
        denominator = max(count, 1) if reduction == "mean" else 1
        loss = loss_none if reduction == "none" else loss_none.sum() / denominator
        grad = None
        if grad_output is not None:
            go = grad_output.double()
            grad = grad_sum * (go.unsqueeze(1) if reduction == "none" else go / denominator)
    if bad.any():
        nan = float("nan")
        loss = loss.masked_fill(bad, nan) if reduction == "none" else torch.full_like(loss, nan)
        row_mask = bad.unsqueeze(1).expand(x.shape[0], c, *x.shape[2:])
        grad_sum = grad_sum.masked_fill(row_mask, nan)
        if grad is not None:
            grad = grad.masked_fill(row_mask, nan)
    return Expected(loss, grad, grad_sum, count, t_ok)


def expected_state(count: int, reduction: str, fold: bool, acc: torch.dtype) -> torch.Tensor:
    inv = (torch.tensor(1.0, dtype=acc) / count) if count > 0 else torch.tensor(0.0, dtype=acc)
    one = torch.tensor(1.0, dtype=acc)
    return torch.stack([inv if fold else one, inv if (reduction == "mean" and not fold) else one,
                        torch.tensor(0.0, dtype=acc)])


def check_against_reference(x: Guarded, target, fwd: Forward, exp: Expected, *, alpha_ref, ignore_index, reduction,
                            gamma: Gamma, grad_output, final_grad: Optional[torch.Tensor], label: str) -> None:
    dtype = x.view.dtype
    acc = acc_dtype(dtype)
    floor_args = (x.view, exp.target_for_floor, alpha_ref, ignore_index)
    # A loss stored in the accumulation dtype is compared at that precision.
    assert_close_scaled(fwd.loss.view, exp.loss, fwd.loss.view.dtype, f"{label}: loss",
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
                                                      gamma=gamma.largest))
    if final_grad is not None:
        assert_close_scaled(final_grad, exp.grad, dtype, f"{label}: gradient after backward",
                            atol_floor=conditioning_floor(*floor_args, reduction, grad_output=grad_output,
                                                          gamma=gamma.largest))


def seeded(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


# ============================================================================ the matrix


SHAPES = [
    Shape("5x7", (5, 7), "contiguous"),
    Shape("9x1", (9, 1), "contiguous"),                 # one class: p = 1, loss 0, the log(p)/(1-p) limit
    Shape("6x2off1", (6, 2), "offset1"),                # a base one element past a 16-byte boundary
    Shape("7x3T", (7, 3), "transposed"),                # class stride N
    Shape("600x2T", (600, 2), "transposed"),            # 600 positions: grid-stride loops
    Shape("4x19", (4, 19), "contiguous"),
    Shape("3x21", (3, 21), "contiguous"),               # rows start anywhere (gradient rows congruent)
    Shape("3x21sliced", (3, 21), "sliced_odd"),         # row stride 26: misaligned rows, dense gradient not congruent
    Shape("3x40sliced", (3, 40), "sliced"),             # row stride 64: rows of a wider buffer
    Shape("5x81off1", (5, 81), "offset1"),
    Shape("2x19x5x7", (2, 19, 5, 7), "contiguous"),     # channel-first, 35 positions per image
    Shape("2x19x3x5cl", (2, 19, 3, 5), "channels_last"),
    Shape("2x3x4x5cl", (2, 3, 4, 5), "channels_last"),
    Shape("2x21x37pad", (2, 21, 37), "cf_padded"),      # class stride 40, image stride 841; dense gradient
    Shape("2x5x300", (2, 5, 300), "contiguous"),        # 600 positions: grid-stride loops of the channels kernel
    Shape("3x1x50", (3, 1, 50), "contiguous"),          # channel-first with one class: p = 1
    Shape("3x8x10", (3, 8, 10), "contiguous"),
    Shape("3x24x10", (3, 24, 10), "contiguous"),
    Shape("3x81x11", (3, 81, 11), "contiguous"),
    Shape("2x81x13str", (2, 81, 13), "cf_strided"),     # spatial stride 2: the positions kernel only
    Shape("2x300x3", (2, 300, 3), "contiguous"),
    Shape("3x300sliced", (3, 300), "sliced_odd"),       # rows GROUP 32 (float32, 16-bit), 64 (float64)
    Shape("2x1000", (2, 1000), "contiguous"),           # rows GROUP 64 (float32, 16-bit), 128 (float64)
    Shape("2x2000off1", (2, 2000), "offset1"),          # GROUP 128 / 256
    Shape("2x4000", (2, 4000), "contiguous"),           # GROUP 256 / long rows
    Shape("2x4097", (2, 4097), "contiguous"),           # long rows, staged
    Shape("2x4097off1", (2, 4097), "offset1"),
    Shape("1x70001", (1, 70001), "contiguous"),         # long rows: staged for 16-bit only (227 KB)
    Shape("2x4097x3", (2, 4097, 3), "contiguous"),      # positions, read twice
    Shape("1x70001x2", (1, 70001, 2), "contiguous"),
]

SIBLING = {"long_rows": "long_rows_staged", "long_rows_staged": "long_rows", "channels_small": "channels",
           "channels": "channels_small", "positions": "positions_staged", "positions_staged": "positions"}


def sibling(v: Variant) -> Variant:
    """The same kernel with the other staging / tile, or the rows kernel with twice the lanes."""
    if v.family == "rows":
        return ROWS_BY_GROUP[min(v.group * 2, 256)]
    return VARIANT[SIBLING[v.name]]


def matrix_variants(s: Shape, dtype: torch.dtype, j: int) -> list[Variant]:
    """The launcher's choice, its sibling, and one kernel of another family (rotating), where applicable. Long
    rows (1024 threads per position) only where the launcher picks them, their sibling for every other dtype."""
    g = shape_geometry(s)
    choice = launcher_choice(g, dtype)
    assert applicable(choice, g, dtype) and launcher_choice(shape_geometry(s, False), dtype, False) == choice
    chosen = [choice]
    if (applicable(sibling(choice), g, dtype) and emulation_cost_ok(sibling(choice), g) and
            (choice.family != "long_rows" or (DTYPES.index(dtype) + SHAPES.index(s)) % 2 == 0)):
        chosen.append(sibling(choice))
    others = [v for v in VARIANTS if v.family not in (choice.family, "long_rows") and applicable(v, g, dtype)
              and emulation_cost_ok(v, g)]
    if others:
        chosen.append(others[j % len(others)])
    return list(dict.fromkeys(chosen))


def ignore_for(target_dtype, classes, kind) -> int:
    """default: 255 for uint8, else -100; class: a class index (1); alias: a value the target dtype cannot hold,
    which wraps to a valid class (C // 2): it must match nothing."""
    if kind == "alias" and target_dtype != torch.int64:
        return {torch.uint8: 256, torch.int16: 65536, torch.int32: 2**32}[target_dtype] + min(classes // 2, 254)
    if target_dtype == torch.uint8:
        return 255
    return 1 if kind == "class" and classes >= 3 else -100


def _matrix():
    params = []
    j = 0
    for s in SHAPES:
        for dtype in DTYPES:
            for variant in matrix_variants(s, dtype, j):
                case = dict(
                    variant=variant.name,
                    dtype=dtype,
                    shape=s,
                    reduction=REDUCTIONS[j % 3],
                    gamma=GAMMAS[(j // 3) % len(GAMMAS)].name,
                    alpha=ALPHAS[(j + j // 5) % len(ALPHAS)],
                    target_dtype=TARGET_DTYPES[(j + j // 12) % 4],
                    ignore=("default", "class", "alias")[(j // 4) % 3],
                    ignore_frac=(0.0, 0.3)[(j // 2) % 2],
                    grid=1 + (j + j // 3) % 3,
                    order=(0, 1, 7)[(j // 5) % 3],
                    scale=30.0 if j % 7 == 3 else 1.0,     # saturated softmax: p_y rounds to 1 or 0
                    compute_grad=j % 11 != 5,
                    in_place=j % 2 == 0,
                    unit_grad_output=j % 5 == 1,           # scalar 1.0: the in-place backward returns at once
                    loss_acc=dtype in HALF_DTYPES and (j // 2) % 3 != 1,
                )
                # The launcher vectorises the backward for a scalar grad_output over aligned buffers (always here);
                # some such cases take the scalar kernel instead.
                case["backward_vec"] = case["compute_grad"] and case["reduction"] != "none" and j % 4 != 1
                params.append(pytest.param(case, id="-".join([
                    variant.name, DTYPE_ID[dtype], s.name, case["reduction"], f"g{case['gamma']}",
                    f"a{case['alpha']}", TARGET_ID[case["target_dtype"]], f"ign{case['ignore']}{case['ignore_frac']}",
                    f"grid{case['grid']}", f"order{case['order']}", f"x{case['scale']:g}",
                    "nograd" if not case["compute_grad"] else "inplace" if case["in_place"] else "outofplace",
                    "bwdvec" if case["backward_vec"] else "bwd1", "lossacc" if case["loss_acc"] else "loss"])))
                j += 1
    return params


MATRIX = _matrix()


def test_matrix_covers_every_variant_and_dtype():
    """Every kernel variant runs for every dtype somewhere in the matrix, and each case's kernel is one a
    launcher could run there (the launcher's own choice included for every shape)."""
    seen = {(c.values[0]["variant"], c.values[0]["dtype"]) for c in MATRIX}
    missing = [(v.name, DTYPE_ID[d]) for v in VARIANTS for d in DTYPES if (v.name, d) not in seen]
    assert not missing, missing
    for c in MATRIX:
        case = c.values[0]
        assert applicable(VARIANT[case["variant"]], shape_geometry(case["shape"]), case["dtype"])


@pytest.mark.parametrize("case", MATRIX)
def test_forward_and_backward_match_reference(emu, case, request):
    """One kernel variant on one shape and layout, the other parameters rotating over the matrix: loss, state,
    the forward's gradient, and the gradient after the backward kernel applied grad_output."""
    gen = seeded(request)
    variant, dtype, s = VARIANT[case["variant"]], case["dtype"], case["shape"]
    classes = s.shape[1]
    target_dtype = case["target_dtype"]
    ignore_index = ignore_for(target_dtype, classes, case["ignore"])
    x = make_input(s.shape, s.layout, dtype, gen, scale=case["scale"])
    target = make_target(s.shape, classes, target_dtype, gen, ignore_index, case["ignore_frac"])
    alpha, weight, alpha_ref = alpha_args(case["alpha"], classes, gen, dtype)
    reduction, gamma = case["reduction"], GAMMA[case["gamma"]]
    fwd = run_forward(emu, x, target, variant, grid=case["grid"], gamma=gamma, alpha=alpha, weight=weight,
                      ignore_index=ignore_index, reduction=reduction, compute_grad=case["compute_grad"],
                      count_grid=1 + case["grid"] % 2, order=case["order"], loss_acc=case["loss_acc"])
    grad_output, final = None, None
    if case["compute_grad"]:
        if reduction == "none":
            grad_output = torch.randn(target.shape, generator=gen, dtype=torch.float64).to(dtype)
        else:
            grad_output = torch.tensor(1.0 if case["unit_grad_output"] else 0.75 + torch.rand((), generator=gen).item(),
                                       dtype=torch.float64).to(dtype)
        final = run_backward(emu, fwd, grad_output, in_place=case["in_place"], vec=case["backward_vec"],
                             grid=case["grid"], order=case["order"])
    exp = expected(x.view, target, gamma=gamma, alpha=alpha_ref, ignore_index=ignore_index, reduction=reduction,
                   grad_output=grad_output)
    check_against_reference(x, target, fwd, exp, alpha_ref=alpha_ref, ignore_index=ignore_index, reduction=reduction,
                            gamma=gamma, grad_output=grad_output, final_grad=final, label=request.node.name)


# ============================================================================ preconditions


REFUSAL_SHAPES = SHAPES + [Shape("2x0", (2, 0), "transposed"), Shape("2x5x0", (2, 5, 0), "contiguous")]


def test_inapplicable_calls_are_refused(emu):
    """Where applicable() says a kernel's precondition fails, the emulation refuses the call with that
    precondition (so a matrix filtered by applicable() leaves nothing out silently); where it holds, the
    emulation accepts it (checked on every shape that is cheap to run, no gradient)."""
    refused = accepted = 0
    for s in REFUSAL_SHAPES:
        for dtype in DTYPES:
            for compute_grad in (True, False):
                g = shape_geometry(s, compute_grad)
                for v in VARIANTS:
                    why = refusal(v, g, dtype, compute_grad)
                    # (Empty shapes run in a child process: test_empty_inputs.)
                    cheap = 0 < math.prod(s.shape) <= 200 and dtype == torch.float32 and v.family != "long_rows"
                    if why is None and (compute_grad or not cheap):
                        continue
                    x = torch.zeros(max(1, 1 + sum((n - 1) * st for n, st in zip(s.shape, layout_strides(
                        s.shape, s.layout)[0]))), dtype=dtype)
                    grad = torch.full_like(x, float("nan"))
                    loss = torch.full((max(1, g.positions),), float("nan"), dtype=dtype)
                    state = torch.full((3,), float("nan"), dtype=acc_dtype(dtype))
                    rc = emu.forward_rc(dtype=dtype, variant=v, grid=1, count_grid=1, order=0,
                                        input_ptr=x.data_ptr(), grad_ptr=grad.data_ptr() if compute_grad else None,
                                        loss_ptr=loss.data_ptr(), loss_acc=False, geometry=g,
                                        target=torch.zeros(max(1, g.positions), dtype=torch.int64), reduction="sum",
                                        compute_grad=compute_grad, ignore_index=-100, gamma=GAMMA["2"], alpha=1.0,
                                        weight=None, fold=False, state=state)
                    label = (v.name, s.name, DTYPE_ID[dtype], compute_grad)
                    if why is None:
                        assert rc == 0, (label, emu.error())
                        accepted += 1
                    else:
                        assert rc == 1 and why in emu.error(), (label, why, emu.error())
                        refused += 1
    assert refused > 100 and accepted > 10, (refused, accepted)


def test_launcher_choice_follows_choose_kernel():
    """Spot checks of launcher_choice against the rules of choose_kernel, at each boundary."""
    def choice(shape, layout, dtype=torch.float32):
        return launcher_choice(shape_geometry(Shape("s", shape, layout)), dtype).name

    f32, f64, bf16 = torch.float32, torch.float64, torch.bfloat16
    assert choice((4, 13), "contiguous") == "rows1" and choice((4, 14), "contiguous") == "rows2"
    assert choice((4, 9), "contiguous", bf16) == "rows1" and choice((4, 10), "contiguous", bf16) == "rows2"
    assert choice((4, 7), "contiguous", f64) == "rows1" and choice((4, 8), "contiguous", f64) == "rows2"
    assert choice((2, 4093), "contiguous") == "rows256" and choice((2, 4094), "contiguous") == "long_rows_staged"
    assert choice((2, 2047), "contiguous", f64) == "rows256"
    assert choice((2, 2048), "contiguous", f64) == "long_rows_staged"
    assert choice((1, 70001), "contiguous") == "long_rows"  # 280 KB: too large to stage
    assert choice((1, 70001), "contiguous", bf16) == "long_rows_staged"
    assert choice((2, 8, 5), "contiguous") == "channels_small" and choice((2, 9, 5), "contiguous") == "channels"
    assert choice((2, 24, 5), "contiguous") == "channels" and choice((2, 25, 5), "contiguous") == "positions_staged"
    assert choice((2, 5, 5), "contiguous", f64) == "channels"
    assert choice((2, 9, 5), "contiguous", f64) == "positions_staged"
    assert choice((2, 227, 5), "contiguous") == "positions_staged" and choice((2, 228, 5), "contiguous") == "positions"
    assert choice((7, 3), "transposed") == "channels_small"
    assert choice((2, 5, 13), "cf_strided") == "positions_staged"


# ============================================================================ features


@pytest.mark.parametrize("variant", REPRESENTATIVE, ids=lambda v: v.name)
@pytest.mark.parametrize("threshold", ["equal", "above", "below"])
def test_gamma_schedule_at_a_threshold(emu, variant, threshold, request):
    """A p_t exactly at a threshold: p < t is false, the next piece applies; a float64 threshold between the
    kernel's float32 p_t and the next float32 is rounded up, so p < t holds as it does in float64. The rule is
    restated in float64 on the kernel's own float32 p_t: equal logits over k classes give p_t = expf(-logf(k))
    (the host functions the emulation maps the kernel's to), whatever the summation order."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.expf.restype = libm.logf.restype = ctypes.c_float
    libm.expf.argtypes = libm.logf.argtypes = [ctypes.c_float]
    s = variant_shape(variant, torch.float32)
    classes = s.shape[1]
    k = 5 if classes >= 5 else 2
    # k equal logits (one of them the target's), the other classes -inf: the sum of exps is k exactly.
    x = make_input(s.shape, s.layout, torch.float32, seeded(request))
    x.view.fill_(float("-inf"))
    x.view[:, :k] = 0.0
    target = torch.zeros((s.shape[0], *s.shape[2:]), dtype=torch.int64)
    target.view(-1)[1::2] = k - 1
    p32 = float(libm.expf(-libm.logf(float(k))))
    t = {"equal": p32, "above": math.nextafter(p32, 1.0), "below": math.nextafter(p32, 0.0)}[threshold]
    schedule = Gamma("at", 3.0, (t,), (5.0,))
    fwd = run_forward(emu, x, target, variant, grid=1, gamma=schedule, reduction="none", compute_grad=False)
    g = 5.0 if p32 < t else 3.0  # the rule in float64, on the kernel's float32 p_t
    assert (g == 5.0) == (threshold == "above")
    want = -((1 - p32) ** g) * math.log(p32)
    assert torch.allclose(fwd.loss.view.double(), torch.full(target.shape, want, dtype=torch.float64), rtol=1e-6), (
        fwd.loss.view, want)


@pytest.mark.parametrize("variant", [VARIANT[n] for n in ("rows1", "rows64", "long_rows", "channels", "positions")],
                         ids=lambda v: v.name)
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=DTYPE_ID.get)
def test_loss_in_the_accumulation_dtype_does_not_overflow(emu, variant, dtype, request):
    """A 16-bit "sum" beyond the 16-bit range (float16: 65504): stored in float32 (loss_acc_dtype, as under
    autocast) it is finite and matches the float64 reference at float32 precision; stored in the input
    dtype (float16) it overflows to inf, which is why the accumulation dtype exists."""
    gen = seeded(request)
    s = variant_shape(variant, dtype, n=2)
    x = make_input(s.shape, s.layout, dtype, gen, scale=1.0)
    target = make_target(s.shape, s.shape[1], torch.int64, gen, -100, 0.0)
    flat_target = target.view(-1)
    # Confidently wrong: the target's logit 40000 below the others.
    x.view.copy_(torch.where(torch.arange(s.shape[1]).view(1, -1, *([1] * (len(s.shape) - 2))) ==
                             target.unsqueeze(1), -40000.0, x.view.double()).to(dtype))
    assert flat_target.numel() * 40000 > 65504
    fwd = run_forward(emu, x, target, variant, grid=2, gamma=GAMMA["0"], reduction="sum", compute_grad=False,
                      loss_acc=True)
    exp = expected(x.view, target, gamma=GAMMA["0"], alpha=None, ignore_index=-100, reduction="sum", grad_output=None)
    assert fwd.loss.view.dtype == torch.float32 and torch.isfinite(fwd.loss.view)
    assert_close_scaled(fwd.loss.view, exp.loss, torch.float32, request.node.name)
    if dtype == torch.float16:
        narrow = run_forward(emu, x, target, variant, grid=2, gamma=GAMMA["0"], reduction="sum", compute_grad=False)
        assert torch.isinf(narrow.loss.view)


# ============================================================================ edge cases


def variant_shape(v: Variant, dtype: torch.dtype, n: int = 4) -> Shape:
    """A shape the launcher would give ``v`` (C in the middle of its rows group's range, odd), n images."""
    if v.family == "rows":
        lo = rows_capacity(v.group // 2, dtype) + 1 if v.group > 1 else 1
        hi = rows_capacity(v.group, dtype)
        c = min(((lo + hi) // 2) | 1, hi)
        return Shape(f"{n}x{c}", (n, c), "contiguous")
    if v.family == "long_rows":  # 1024 threads per position: few positions
        return Shape(f"{min(n, 2)}x4097", (min(n, 2), 4097), "contiguous")
    if v.family == "channels":
        c = channels_tile(dtype, v.small_tile) - 1
        return Shape(f"2x{c}x37", (2, c, 37), "contiguous")
    return Shape("2x81x37", (2, 81, 37), "contiguous")


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant,dtype", [(v, d) for v in REPRESENTATIVE for d in (torch.float32, torch.float16)
                                           if v.family != "long_rows" or d == torch.float32],  # 1024 threads
                         ids=lambda p: p.name if isinstance(p, Variant) else DTYPE_ID[p])
def test_all_ignored(emu, variant, dtype, reduction, request):
    """No valid target: loss 0 (not NaN), zero gradient, 1/count read as 0 in the state."""
    gen = seeded(request)
    s = variant_shape(variant, dtype)
    assert applicable(variant, shape_geometry(s), dtype)
    x = make_input(s.shape, s.layout, dtype, gen)
    target = torch.full((s.shape[0], *s.shape[2:]), -100, dtype=torch.int64)
    fwd = run_forward(emu, x, target, variant, grid=2, reduction=reduction)
    go = torch.randn(target.shape, generator=gen).to(dtype) if reduction == "none" else torch.tensor(1.5).to(dtype)
    final = run_backward(emu, fwd, go, in_place=False, vec=reduction != "none", grid=1)
    exp = expected(x.view, target, gamma=GAMMA["2"], alpha=None, ignore_index=-100, reduction=reduction,
                   grad_output=go)
    assert torch.equal(fwd.loss.view, torch.zeros_like(fwd.loss.view)), fwd.loss.view
    assert torch.equal(fwd.raw_grad, torch.zeros_like(fwd.raw_grad))
    assert torch.equal(final, torch.zeros_like(final))
    check_against_reference(x, target, fwd, exp, alpha_ref=None, ignore_index=-100, reduction=reduction,
                            gamma=GAMMA["2"], grad_output=go, final_grad=final, label=request.node.name)


# An empty tensor's data pointer is null on CUDA: a kernel that reads a logit there crashes, here too (SIGSEGV).
# Each case runs in a child process so that a crash fails one test instead of the session.
_EMPTY_CHILD = r"""
import ctypes, json, math, sys
a = json.loads(sys.argv[2])
lib = ctypes.CDLL(sys.argv[1])
lib.emu_last_error.restype = ctypes.c_char_p
ll, ull, i, d, p = ctypes.c_longlong, ctypes.c_ulonglong, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
lib.emu_softmax_focal_loss_forward.argtypes = [i, i, ll, ll, ull, p, p, p, i, p, p, i, i, i, ll, d, p, p, i, d, p, i,
                                               ll, i, p]
lib.emu_softmax_focal_loss_backward.argtypes = [i, i, ll, ull, p, p, p, p, i, p]
acc = ctypes.c_double if a["dtype"] == 1 else ctypes.c_float
positions = a["positions"]
target = (ctypes.c_longlong * positions)(*([a["target"]] * positions)) if positions else None
geometry = (ll * 9)(*a["geometry"])
results = []
for reduction in (0, 1, 2):  # none, mean, sum
    fold = int(reduction == 1)
    loss_n = positions if reduction == 0 else 1
    loss = (acc * loss_n)(*([math.nan] * loss_n)) if loss_n else None
    state = (acc * 3)(math.nan, math.nan, math.nan)
    # Logits and gradient: null pointers. The loss in the accumulation dtype (float32 / float64 here anyway).
    rc = lib.emu_softmax_focal_loss_forward(a["dtype"], a["variant"], 1, 1, 0, None, None, loss, 1, geometry, target,
                                            3, reduction, 1, -100, 2.0, None, None, 0, 1.0, None, 0, 0, fold, state)
    if rc == 0:
        go = (acc * max(positions, 1))(*([2.0] * max(positions, 1)))
        scalar = int(reduction != 0)
        rc = lib.emu_softmax_focal_loss_backward(a["dtype"], scalar, 1, 0, None, None, geometry, go, scalar, state)
    results.append({"reduction": reduction, "fold": fold, "rc": rc, "error": lib.emu_last_error().decode(),
                    "loss": [loss[k] for k in range(loss_n)], "state": [state[k] for k in range(3)]})
print(json.dumps(results))
"""

EMPTY_SHAPES = [Shape("N0", (0, 5), "contiguous"), Shape("S0", (2, 5, 0), "contiguous"),
                Shape("C0", (2, 0), "contiguous"), Shape("C0T", (2, 0), "transposed")]


EMPTY_VARIANTS = [VARIANT[n] for n in ("rows1", "rows64", "long_rows", "channels_small", "channels", "positions",
                                        "positions_staged")]


def _empty_cases():
    params = []
    for s in EMPTY_SHAPES:
        for dtype in (torch.float32,):
            g = shape_geometry(s)
            for v in EMPTY_VARIANTS:
                if not applicable(v, g, dtype):
                    continue
                # With positions but no class, a target is ignored or out of range.
                for target_kind in ("ignored", "out_of_range") if g.positions else ("none",):
                    params.append(pytest.param(v, s, dtype, target_kind,
                                               id=f"{v.name}-{s.name}-{DTYPE_ID[dtype]}-{target_kind}"))
    return params


@pytest.mark.parametrize("variant,s,dtype,target_kind", _empty_cases())
def test_empty_inputs(emu, variant, s, dtype, target_kind):
    """No logit (one block is still launched), with null logit and gradient pointers as CUDA's allocator
    gives for 0 bytes: nothing is read or written there. "none" writes its (N, S) losses, "sum" and "mean"
    a 0, the state says count 0; the backward writes nothing. With C = 0 but positions (numel 0, N > 0):
    each loss 0 if ignored, NaN if out of range (every class index is), and NaN reduced."""
    g = shape_geometry(s)
    args = dict(dtype=DTYPE_CODE[dtype], variant=variant.code, geometry=list(g.as_tuple()), positions=g.positions,
                target=0 if target_kind == "out_of_range" else -100)
    child = subprocess.run([sys.executable, "-c", _EMPTY_CHILD, emu.lib._name, json.dumps(args)],
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, (f"the emulated kernel crashed (exit {child.returncode}): it dereferenced "
                                   f"a null logit or gradient pointer\n{child.stderr[-2000:]}")
    value = float("nan") if target_kind == "out_of_range" else 0.0
    for out in json.loads(child.stdout):
        assert out["rc"] == 0, out["error"]
        if out["reduction"] == 0:
            assert len(out["loss"]) == g.positions
        for v in out["loss"]:
            assert math.isnan(v) if math.isnan(value) else v == value, out
        reduction = {0: "none", 1: "mean", 2: "sum"}[out["reduction"]]
        want = expected_state(0, reduction, bool(out["fold"]), acc_dtype(dtype)).tolist()
        assert out["state"] == want, (out, want)


OUT_OF_RANGE_FORMS = {"f32-i64": (torch.float32, torch.int64), "bf16-u8": (torch.bfloat16, torch.uint8),
                      "f16-i16": (torch.float16, torch.int16)}


def _out_of_range_cases():
    params = []
    for v in REPRESENTATIVE:
        for form, (dtype, target_dtype) in OUT_OF_RANGE_FORMS.items():
            if target_dtype == torch.uint8 and variant_shape(v, dtype).shape[1] >= 200:
                continue  # every uint8 value other than 255 is a class there: nothing out of range to test
            if v.family == "long_rows" and form != "f32-i64":
                continue  # 1024 threads per position: one form
            params.append(pytest.param(v, dtype, target_dtype, id=f"{v.name}-{form}"))
    return params


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant,dtype,target_dtype", _out_of_range_cases())
def test_out_of_range_target_gives_nan(emu, variant, dtype, target_dtype, reduction, request):
    """A class index outside [0, C) (not checked on the device): NaN loss and gradient row for that element,
    NaN reduced loss; the other elements and the count (which excludes it) unaffected."""
    gen = seeded(request)
    s = variant_shape(variant, dtype, n=6)
    if variant.family == "long_rows":
        s = Shape("4x4097", (4, 4097), "contiguous")
    classes = s.shape[1]
    ignore_index = 255 if target_dtype == torch.uint8 else -100
    x = make_input(s.shape, s.layout, dtype, gen)
    target = make_target(s.shape, classes, torch.int64, gen, ignore_index, 0.0)
    flat = target.view(-1)
    flat[1] = classes if target_dtype != torch.uint8 else 200
    flat[2] = ignore_index
    if target_dtype != torch.uint8:
        flat[3] = -3
    target = target.to(target_dtype)
    fwd = run_forward(emu, x, target, variant, grid=2, ignore_index=ignore_index, reduction=reduction)
    go = torch.randn(target.shape, generator=gen).to(dtype) if reduction == "none" else torch.tensor(0.5).to(dtype)
    final = run_backward(emu, fwd, go, in_place=True, vec=False, grid=2)
    exp = expected(x.view, target, gamma=GAMMA["2"], alpha=None, ignore_index=ignore_index, reduction=reduction,
                   grad_output=go)
    assert exp.count == flat.numel() - (2 if target_dtype == torch.uint8 else 3)
    check_against_reference(x, target, fwd, exp, alpha_ref=None, ignore_index=ignore_index, reduction=reduction,
                            gamma=GAMMA["2"], grad_output=go, final_grad=final, label=request.node.name)


NON_FINITE = {
    "neg_inf_other": ("other", float("-inf")),    # -inf at another class (a masked class): finite loss
    "neg_inf_target": ("target", float("-inf")),  # -inf at the target: loss +inf
    "pos_inf_other": ("other", float("inf")),     # +inf elsewhere: NaN (log_softmax gives inf - inf)
    "pos_inf_target": ("target", float("inf")),
    "nan_other": ("other", float("nan")),
    "nan_target": ("target", float("nan")),
    "all_neg_inf": ("all", float("-inf")),         # NaN
}


@pytest.mark.parametrize("variant,kind", [
    (v, k) for v in REPRESENTATIVE for k in NON_FINITE
    if v.name != "long_rows_staged" or k in ("nan_other", "pos_inf_target")],  # 1024 threads: its staging only
    ids=lambda p: p.name if isinstance(p, Variant) else p)
def test_non_finite_logits_propagate_as_in_the_reference(emu, variant, kind, request):
    """SPEC: NaN or inf in the input propagates as in the reference. Position 1 holds the non-finite
    logit(s) (at its target, at the last class, or everywhere); the other positions must be unaffected."""
    gen = seeded(request)
    s = variant_shape(variant, torch.float32)
    classes = s.shape[1]
    x = make_input(s.shape, s.layout, torch.float32, gen)
    target = make_target(s.shape, classes, torch.int64, gen, -100, 0.0)
    flat_target = target.view(-1)
    flat_target[1] = 0
    where, value = NON_FINITE[kind]
    # Position 1: image 0, position 1 (channel-first) or row 1.
    n, p = (0, 1) if len(s.shape) > 2 else (1, None)
    row = x.view[n] if p is None else x.view[n, :, p]
    if where == "all":
        row.fill_(value)
    else:
        row[0 if where == "target" else classes - 1] = value
    fwd = run_forward(emu, x, target, variant, grid=1, reduction="none")
    exp = expected(x.view, target, gamma=GAMMA["2"], alpha=None, ignore_index=-100, reduction="none", grad_output=None)
    check_against_reference(x, target, fwd, exp, alpha_ref=None, ignore_index=-100, reduction="none",
                            gamma=GAMMA["2"], grad_output=None, final_grad=None, label=request.node.name)
    others = torch.ones(target.numel(), dtype=torch.bool)
    others[1] = False
    assert torch.isfinite(fwd.loss.view.reshape(-1)[others]).all(), "other positions affected"


def determinism_shape(v: Variant, dtype) -> Shape:
    """Enough positions that a grid of 3 blocks each get work."""
    if v.family == "rows":
        s = variant_shape(v, dtype)
        return Shape(s.name, (min(3 * (BLOCK // v.group) + 5, 600), s.shape[1]), "contiguous")
    if v.family == "long_rows":
        return Shape("3x1500off1", (3, 1500), "offset1")
    c = variant_shape(v, dtype).shape[1] if v.family == "channels" else 30
    return Shape(f"2x{c}x260", (2, c, 260), "contiguous")


@pytest.mark.parametrize("variant,dtype,reduction", [
    (v, d, r) for v in VARIANTS for d in (torch.float32, torch.float16) for r in ("sum", "mean")
    if v.family != "long_rows" or (d, r) == (torch.float32, "mean")],  # 1024 threads per position: one case
    ids=lambda p: p.name if isinstance(p, Variant) else DTYPE_ID[p] if isinstance(p, torch.dtype) else p)
def test_same_grid_gives_the_same_bits(emu, variant, dtype, reduction, request):
    """The reduction is a fixed tree over the grid: whichever block finishes last, the bits are the same."""
    gen = seeded(request)
    s = determinism_shape(variant, dtype)
    x = make_input(s.shape, s.layout, dtype, gen)
    target = make_target(s.shape, s.shape[1], torch.int64, gen, -100, 0.2)
    runs = [run_forward(emu, x, target, variant, grid=3, gamma=GAMMA["0.5"], reduction=reduction, count_grid=2,
                        order=order) for order in (0, 1, 12345)]
    for other in runs[1:]:
        assert torch.equal(bits(runs[0].loss.view), bits(other.loss.view))
        assert torch.equal(bits(runs[0].raw_grad), bits(other.raw_grad))
        assert torch.equal(bits(runs[0].state), bits(other.state))
    exp = expected(x.view, target, gamma=GAMMA["0.5"], alpha=None, ignore_index=-100, reduction=reduction,
                   grad_output=None)
    check_against_reference(x, target, runs[0], exp, alpha_ref=None, ignore_index=-100, reduction=reduction,
                            gamma=GAMMA["0.5"], grad_output=None, final_grad=None, label=request.node.name)


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_perturbed_schedules_give_the_same_bits(emu, variant, request):
    """Warps held back at random after a __syncthreads until the others have reached the next one (as far
    ahead as a GPU lets them run) change nothing: no shared-memory slot is rewritten while a slower warp
    may still read it."""
    gen = seeded(request)
    s = variant_shape(variant, torch.float32, n=max(4, 2 * BLOCK // max(variant.group, 1)) if variant.family == "rows"
                      else 4)
    if variant.family == "long_rows":
        s = Shape("3x1500off1", (3, 1500), "offset1")
    x = make_input(s.shape, s.layout, torch.float32, gen)
    target = make_target(s.shape, s.shape[1], torch.int64, gen, -100, 0.2)

    def run():
        return run_forward(emu, x, target, variant, grid=1, reduction="mean", count_grid=1)

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


def count_reference(t: torch.Tensor, classes: int, ignore_index: int) -> int:
    tl = t.long()
    return int(((tl != ignore_index) & (tl >= 0) & (tl < classes)).sum())


@pytest.mark.parametrize("grid", [1, 2, 3])
@pytest.mark.parametrize("target_dtype", TARGET_DTYPES, ids=TARGET_ID.get)
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=DTYPE_ID.get)
def test_count_valid_targets(emu, acc, target_dtype, grid, request):
    """state[0] = 1 / (targets neither ignored nor out of range), 0 when there is none; over 1000 positions
    so that every grid walks its grid-stride loop; the target pointer misaligned by 0..3 elements (a scalar
    head before the 16-byte body) and lengths not a multiple of 16 (a scalar tail)."""
    gen = seeded(request)
    classes = 20
    ignore_index = 255 if target_dtype == torch.uint8 else -100
    for offset, positions in [(0, 1000), (1, 1003), (3, 997), (2, 5), (0, 0)]:
        storage = torch.randint(0, classes, (offset + positions + 16,), generator=gen)
        r = torch.rand(storage.shape, generator=gen)
        storage = torch.where(r < 0.2, torch.full_like(storage, ignore_index), storage)
        storage = torch.where((r > 0.9) & (r < 0.93), torch.full_like(storage, classes + 3), storage)
        if target_dtype != torch.uint8:
            storage = torch.where(r > 0.97, torch.full_like(storage, -7), storage)
        storage = storage.to(target_dtype)
        assert storage.data_ptr() % 16 == 0
        t = storage[offset:offset + positions]
        for values, n in [(t, count_reference(t, classes, ignore_index)), (None, 0)]:
            if values is None:  # all ignored
                storage[offset:offset + positions] = ignore_index
                values = t
            state = torch.full((3,), float("nan"), dtype=acc)
            emu.count(acc=acc, grid=grid, order=grid - 1, target_ptr=values.data_ptr(), target_dtype=target_dtype,
                      positions=positions, classes=classes, ignore_index=ignore_index, state=state)
            want = torch.tensor(1.0, dtype=acc) / n if n else torch.tensor(0.0, dtype=acc)
            assert torch.equal(bits(state[0]), bits(want)), (offset, positions, state[0].item(), n)
            assert torch.isnan(state[1:]).all(), "the count pre-pass writes state[0] only"


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int16, torch.int32], ids=TARGET_ID.get)
def test_count_compares_in_the_targets_width(emu, target_dtype, request):
    """An ignore_index the target dtype cannot hold matches nothing (a narrowing compare would alias it to a
    class); classes beyond the dtype's range (up to the launchers' 2^31 - 1) make every non-negative value a
    class."""
    gen = seeded(request)
    width = {torch.uint8: 256, torch.int16: 65536, torch.int32: 2**32}[target_dtype]
    t = torch.randint(0, 20, (777,), generator=gen).to(target_dtype)
    for classes, ignore_index in [(20, width + 5), (20, -width + 5), (20, 5), (1000, width - 1), (2**31 - 1, -1)]:
        n = count_reference(t, classes, ignore_index)
        if ignore_index != 5:
            assert n == count_reference(t, classes, 2**62)  # nothing is ignored
        state = torch.full((3,), float("nan"), dtype=torch.float32)
        emu.count(acc=torch.float32, grid=2, order=0, target_ptr=t.data_ptr(), target_dtype=target_dtype,
                  positions=t.numel(), classes=classes, ignore_index=ignore_index, state=state)
        assert torch.equal(bits(state[0]), bits(torch.tensor(1.0) / n)), (classes, ignore_index, state[0].item(), n)


# ============================================================================ the backward kernel


BACKWARD_SHAPES = [Shape("6x64", (6, 64), "contiguous"), Shape("3x37x11", (3, 37, 11), "contiguous"),
                   Shape("2x19x3x5cl", (2, 19, 3, 5), "channels_last"), Shape("7x3T", (7, 3), "transposed"),
                   Shape("5x21", (5, 21), "contiguous")]


def _backward_matrix():
    params = []
    j = 0
    for dtype in DTYPES:
        for s in BACKWARD_SHAPES:
            for kind in ("scalar", "scalar_vec", "per_position"):
                for in_place in (True, False):
                    params.append(pytest.param(dtype, s, kind, in_place, 1 + j % 3, id="-".join([
                        DTYPE_ID[dtype], s.name, kind, "inplace" if in_place else "outofplace", f"grid{1 + j % 3}"])))
                    j += 1
    return params


@pytest.mark.parametrize("dtype,s,kind,in_place,grid", _backward_matrix())
def test_backward_kernel_is_exact(emu, dtype, s, kind, in_place, grid, request):
    """out = grad * (grad_output * state[1]) evaluated in the accumulation type and rounded once: bitwise. A
    scalar grad_output walks the flat storage (scalar_vec: 16-byte packs and a scalar tail, any numel); one
    grad_output per position (reduction "none") the (N, C, S) geometry with the gradient's strides."""
    gen = seeded(request)
    acc = acc_dtype(dtype)
    n, c = s.shape[:2]
    strides, _ = layout_strides(s.shape, s.layout)
    grad_buffer = Guarded(s.shape, strides, dtype)  # dense, as the forward allocates it
    grad_buffer.view.copy_(torch.randn(s.shape, generator=gen, dtype=torch.float64).to(dtype))
    original = grad_buffer.view.clone()
    g = Geometry(n, c, math.prod(s.shape[2:]), 0, 0, 0, *ncs_strides(grad_buffer.view))
    state_1 = (1.0, 1 / 7)[grid % 2]
    state = torch.tensor([float("nan"), state_1, 0.0], dtype=acc)
    if kind == "per_position":
        go = torch.randn((n, *s.shape[2:]), generator=gen, dtype=torch.float64).to(dtype)
        shape_go = go.reshape(n, 1, *s.shape[2:])
        want = (original.to(acc) * (shape_go.to(acc) * state[1])).to(dtype)
    else:
        go = torch.tensor(1.0 if grid == 1 else 1.25, dtype=dtype)
        scale = go.to(acc) * state[1]
        want = (original.to(acc) * scale).to(dtype)
    fwd = Forward(loss=None, grad=grad_buffer, state=state, geometry=g, fold=False)
    out = run_backward(emu, fwd, go, in_place=in_place, vec=kind == "scalar_vec", grid=grid, order=grid - 1)
    assert out.stride() == grad_buffer.view.stride()
    assert torch.equal(bits(out), bits(want)), (out - want).abs().max()
    if not in_place:
        assert torch.equal(bits(grad_buffer.view), bits(original)), "the out-of-place backward modified its input"


@pytest.mark.parametrize("in_place", [True, False], ids=["inplace", "outofplace"])
@pytest.mark.parametrize("kind", ["scalar", "scalar_vec", "per_position"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_ID.get)
def test_backward_of_a_consumed_buffer_is_nan(emu, dtype, kind, in_place, request):
    """state[2] != 0 (set with 0xff bytes after an in-place backward): NaN everywhere, never a stale gradient,
    even where a unit scale would otherwise skip the pass."""
    gen = seeded(request)
    acc = acc_dtype(dtype)
    shape = (4, 33)
    grad_buffer = Guarded(shape, (33, 1), dtype)
    grad_buffer.view.copy_(torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype))
    state = torch.tensor([1.0, 1.0, 0.0], dtype=acc)
    state.view(torch.uint8)[2 * state.element_size():] = 0xFF
    go = torch.randn((4,), generator=gen).to(dtype) if kind == "per_position" else torch.tensor(1.0, dtype=dtype)
    fwd = Forward(loss=None, grad=grad_buffer, state=state, geometry=Geometry(4, 33, 1, 0, 0, 0, 33, 1, 0), fold=False)
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
