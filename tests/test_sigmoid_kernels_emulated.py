"""The sigmoid focal-loss CUDA kernels, executed on the CPU, against the float64 reference.

tests/cuda_emulation/emulated_kernels.cpp runs csrc/cuda/sigmoid_focal_loss_kernels.cuh on the CPU
emulation of the CUDA programming model (tests/cuda_emulation/cuda_on_cpu.h) and exposes it to ctypes
as sigmoid_focal_loss_launch.h launches it, each kernel behind the launcher's precondition:

  dense      sigmoid_focal_loss_dense_kernel<scalar, target, VEC>: floating targets of the input's dtype or
             of the accumulation dtype (float targets for half / bfloat16 input); a flat pass, VEC = 16 /
             sizeof(scalar) with aligned buffers (any numel: a scalar tail), else 1.
  index      sigmoid_focal_loss_index_kernel<scalar, VEC>: class-index targets, classes last; a flat pass in
             VEC-element packs, a pack straddling two rows when C % VEC != 0, each pack's row found by the
             FastDivider's multiply-high (VEC needs C >= VEC and aligned buffers).
  channels   sigmoid_focal_loss_channels_kernel<scalar, VEC>: class-index targets, channel-first (N, C, S) with
             a unit spatial stride and any image / class strides; VEC = sigmoid_channels_vec positions per
             thread (S and the strides multiples of VEC, aligned bases), else 1; dense (N, C, S) outputs.

with the count_valid_targets_kernel pre-pass (classes + 1 classes, items_per_target = classes) for a folded
mean over index targets, the normalizer as a device value, as a host value "as given" or the default
denominators, gamma schedules, and the loss in the accumulation dtype; and focal_loss_backward_kernel over
the flat storage (scalar and elementwise grad_output). Each run has an explicit grid and block order (the
reduced result must not depend on which block finishes last).

The build is shared with tests/test_cuda_kernels_emulated.py (tests/cuda_emulation/emulation_build.py).
Every output buffer starts as NaN inside a NaN guard region: an element the kernel does not write, or a
write out of bounds, fails. The oracle is focal_cuda.reference.sigmoid_focal_loss in float64 (autograd
for the gradient, its limit 0 where autograd gives NaN: m**gamma at m = 0 with gamma < 1). The 16-bit
kernels' fast intrinsics (__expf, __logf, __fdividef) run as the host's accurate functions here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import zlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
from conftest import assert_close_scaled

from cuda_emulation.emulation_build import DTYPE_CODE, REDUCTION_CODE, TARGET_KIND, Guarded, bits, load_library
from focal_cuda import GammaSchedule, reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF_DTYPES = (torch.float16, torch.bfloat16)
DTYPE_ID = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
TARGET_DTYPES = [torch.int64, torch.uint8, torch.int32, torch.int16]
TARGET_ID = {torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}
ALPHAS = [0.25, -1.0]
REDUCTIONS = ["none", "sum", "mean"]
# "mean" denominators: the default (dense: numel; index: non-ignored rows x C, with the count pre-pass when
# the mean is folded into the forward gradient), a device normalizer, a host normalizer used as given.
MEAN_MODES = ["default", "device", "host"]

DENSE_SAME, DENSE_ACC, INDEX, INDEX_CHANNELS = 0, 1, 2, 3  # emulated_kernels.cpp SigmoidVariant
KIND_ID = {DENSE_SAME: "dense", DENSE_ACC: "dense_acc", INDEX: "index", INDEX_CHANNELS: "channels"}


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def vec_width(dtype: torch.dtype) -> int:
    return 16 // element_size(dtype)


def channels_vec(dtype: torch.dtype) -> int:
    """sigmoid_channels_vec: positions per thread of the channel-first kernel (4 for 16-bit: 8-byte loads)."""
    return 4 if element_size(dtype) == 2 else vec_width(dtype)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def seeded(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@dataclass(frozen=True)
class Gamma:
    """A constant gamma, or a schedule: the first k with p_t < thresholds[k] takes values[k], else gamma."""
    name: str
    gamma: float
    thresholds: tuple = ()
    values: tuple = ()


GAMMAS = [Gamma("0", 0.0), Gamma("0.5", 0.5), Gamma("2", 2.0), Gamma("3.7", 3.7),
          Gamma("flsd53", 3.0, (0.2, 0.5), (5.0, 3.0)),                 # FLSD-53 (Mukhoti et al. 2020)
          Gamma("sched3", 0.5, (0.05, 0.3, 0.7), (4.0, 2.0, 1.0))]
GAMMA = {g.name: g for g in GAMMAS}


# ============================================================================ the emulated kernels


class SigmoidEmulator:
    """ctypes front end of the emu_sigmoid_* / flat backward entry points of emulated_kernels.cpp."""

    def __init__(self, lib: ctypes.CDLL):
        ll, ull, i, d, p = ctypes.c_longlong, ctypes.c_ulonglong, ctypes.c_int, ctypes.c_double, ctypes.c_void_p
        lib.emu_sigmoid_focal_loss_forward.argtypes = [i, i, i, ll, ll, ull, p, p, i, p, p, i, ll, ll, ll, ll, ll, i,
                                                       i, ll, d, p, p, i, d, p, i, d, i, p, p, ll]
        lib.emu_count_valid_targets_items.argtypes = [i, ll, ull, p, i, ll, ll, ll, ll, p]
        lib.emu_focal_loss_backward_flat.argtypes = [i, i, ll, ull, p, p, ll, p, i, p]
        lib.emu_fast_divide.argtypes = [ll, p, ll, p]
        lib.emu_selftest_shuffle.argtypes = [i, i, i, p]
        lib.emu_set_schedule_perturbation.argtypes = [ull]
        self.lib = lib

    def error(self) -> str:
        return self.lib.emu_last_error().decode()

    def check(self, rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"emulated launch failed: {self.error()}")


@pytest.fixture(scope="session")
def emu(tmp_path_factory) -> SigmoidEmulator:
    return SigmoidEmulator(load_library(tmp_path_factory))


def doubles(values) -> Optional[ctypes.Array]:
    return (ctypes.c_double * len(values))(*values) if values else None


# ============================================================================ logits and their layouts


@dataclass
class Logits:
    """The logits as the kernel reads them: classes last ((rows, C), contiguous, possibly a misaligned base), or
    channel-first ((N, C, S), unit spatial stride, any image / class strides)."""
    buffer: Guarded
    channel_first: bool

    @property
    def view(self) -> torch.Tensor:
        return self.buffer.view

    @property
    def classes(self) -> int:
        return self.view.shape[1] if self.channel_first else self.view.shape[-1]

    @property
    def rows(self) -> int:
        """Index targets: positions (N x S), or rows."""
        return self.view.numel() // max(self.classes, 1) if self.view.numel() else (
            self.view.shape[0] * (self.view.shape[2] if self.channel_first else 1))

    def launch_geometry(self) -> tuple:
        """(images, classes, spatial, input_stride_n, input_stride_c)."""
        if self.channel_first:
            n, c, s = self.view.shape
            return n, c, s, self.view.stride(0), self.view.stride(1)
        rows, c = self.view.shape
        return rows, c, 1, 0, 0


def cf_strides(shape: tuple, layout: str, dtype: torch.dtype) -> tuple[tuple, int]:
    """(strides, element offset) of a channel-first (N, C, S) layout."""
    n, c, s = shape
    v = channels_vec(dtype)
    if layout == "contiguous":
        return (c * s, s, 1), 0
    if layout == "padded":  # class stride S + 3, image stride odd: scalar kernel only
        return (c * (s + 3) + 1, s + 3, 1), 0
    if layout == "padded_vec":  # strides padded by multiples of VEC: the vector kernel still applies
        return (c * (s + v) + v, s + v, 1), 0
    if layout == "offset1":
        return (c * s, s, 1), 1
    if layout == "offset_vec":  # a base VEC elements past a 16-byte boundary (8 bytes for 16-bit: aligned to VEC)
        return (c * s, s, 1), v
    raise ValueError(layout)


def make_logits(shape, dtype, gen, scale=2.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def classes_last(values: torch.Tensor, offset: int = 0) -> Logits:
    g = Guarded(tuple(values.shape), torch.empty(values.shape).stride(), values.dtype, offset=offset)
    g.view.copy_(values)
    return Logits(g, False)


def channel_first(values: torch.Tensor, layout: str = "contiguous") -> Logits:
    strides, offset = cf_strides(tuple(values.shape), layout, values.dtype)
    g = Guarded(tuple(values.shape), strides, values.dtype, offset=offset)
    g.view.copy_(values)
    return Logits(g, True)


def guarded_like(values: torch.Tensor, offset: int = 0) -> Guarded:
    g = Guarded(tuple(values.shape), torch.empty(values.shape).stride(), values.dtype, offset=offset)
    g.view.copy_(values)
    return g


# ============================================================================ preconditions


def aligned(t: torch.Tensor, nbytes: int) -> bool:
    return t.data_ptr() % nbytes == 0


def refusal(kind: int, vec: bool, x: Logits, target: torch.Tensor, *, loss_aligned: bool = True,
            compute_grad: bool = True) -> Optional[str]:
    """The launcher's precondition that a call breaks, as emulated_kernels.cpp words its refusal; None: it runs.
    Outputs (gradient, loss) are fresh allocations, 16-byte aligned, unless ``loss_aligned`` says otherwise."""
    dtype = x.view.dtype
    images, classes, spatial, stride_n, stride_c = x.launch_geometry()
    if kind != INDEX_CHANNELS and spatial != 1:
        return "spatial > 1 is for the channel-first kernel"
    if not vec:
        return None
    outputs_aligned = aligned(x.view, 16) and loss_aligned
    if kind in (DENSE_SAME, DENSE_ACC):
        if not (outputs_aligned and aligned(target, vec_width(dtype) * target.element_size())):
            return "the dense vector variant needs"
    elif kind == INDEX:
        if not (classes >= vec_width(dtype) and outputs_aligned):
            return "the index vector variant needs"
    else:
        v = channels_vec(dtype)
        if not (spatial % v == 0 and stride_n % v == 0 and stride_c % v == 0 and
                aligned(x.view, v * element_size(dtype))):
            return "the channel-first vector variant needs"
    return None


def launcher_vec(kind: int, x: Logits, target: torch.Tensor) -> bool:
    """sigmoid_focal_loss_launch.h's `vectorizable` (for the channel-first kernel, which no launcher runs yet:
    the vector kernel wherever its conditions hold)."""
    return refusal(kind, True, x, target) is None


# ============================================================================ running the kernels like the launcher


@dataclass
class Forward:
    loss: Guarded
    grad: Optional[Guarded]
    state: torch.Tensor
    fold: bool
    raw_grad: Optional[torch.Tensor]  # the forward's gradient as written (an in-place backward overwrites it)


def forward_rc(emu: SigmoidEmulator, *, kind, vec, grid, count_grid, order, x: Logits, target_ptr, target_kind,
               grad_ptr, loss_ptr, loss_acc, reduction, compute_grad, ignore_index, gamma: Gamma, alpha,
               normalizer_ptr, host, normalizer, fold, state, image_normalizer=None) -> int:
    images, classes, spatial, stride_n, stride_c = x.launch_geometry()
    return emu.lib.emu_sigmoid_focal_loss_forward(
        DTYPE_CODE[x.view.dtype], kind, int(vec), grid, count_grid, order, x.view.data_ptr(), target_ptr, target_kind,
        grad_ptr, loss_ptr, int(loss_acc), images, classes, spatial, stride_n, stride_c, REDUCTION_CODE[reduction],
        int(compute_grad), ignore_index, gamma.gamma, doubles(gamma.thresholds), doubles(gamma.values),
        len(gamma.thresholds), alpha, normalizer_ptr, int(host), normalizer if host else 0.0, int(fold),
        state.data_ptr(), image_normalizer.data_ptr() if image_normalizer is not None else None,
        image_normalizer.numel() if image_normalizer is not None else 0)


def run_forward(emu: SigmoidEmulator, x: Logits, target: torch.Tensor, *, vec: bool = False, grid: int = 1,
                count_grid: int = 2, order: int = 0, gamma: Gamma = GAMMA["2"], alpha: float = 0.25,
                reduction: str = "mean", compute_grad: bool = True, ignore_index: int = -100,
                mean_mode: str = "default", normalizer: float = 7.5, fold: Optional[bool] = None,
                loss_acc: bool = False, target_offset: int = 0,
                image_normalizer: Optional[torch.Tensor] = None) -> Forward:
    """The forward op as sigmoid_focal_loss_forward_cuda runs it: dense targets (floating, x's shape; the
    input's or the accumulation dtype) or index targets (integer, one per row / position). The mean is folded
    into the forward gradient when the launcher would fold it (mean, gradient wanted, not float16) unless
    ``fold`` says otherwise. Outputs are dense in x's logical shape ((N, C, S) for channel-first)."""
    dtype = x.view.dtype
    acc = acc_dtype(dtype)
    index = not target.dtype.is_floating_point
    if fold is None:
        fold = compute_grad and reduction == "mean" and dtype != torch.float16
    if index:
        kind = INDEX_CHANNELS if x.channel_first else INDEX
        target_buffer = target.contiguous()
        target_ptr = target_buffer.data_ptr()
        assert target_buffer.numel() == x.rows
    else:
        assert target.dtype in (dtype, acc) and not x.channel_first and target.shape == x.view.shape
        kind = DENSE_SAME if target.dtype == dtype else DENSE_ACC
        target_buffer = guarded_like(target, target_offset)
        target_ptr = target_buffer.view.data_ptr()
    assert refusal(kind, vec, x, target_buffer if index else target_buffer.view) is None, "an inapplicable kernel"
    shape = tuple(x.view.shape)
    loss_shape = shape if reduction == "none" else ()
    loss = Guarded(loss_shape, torch.empty(loss_shape).stride(), acc if loss_acc else dtype)
    grad = Guarded(shape, torch.empty(shape).stride(), dtype) if compute_grad else None
    state = torch.full((3,), float("nan"), dtype=acc)
    device_normalizer = None
    if reduction == "mean" and mean_mode == "device":
        device_normalizer = torch.tensor(normalizer, dtype=acc)
    host = reduction == "mean" and mean_mode == "host"
    emu.check(forward_rc(emu, kind=kind, vec=vec, grid=grid, count_grid=count_grid, order=order, x=x,
                         target_ptr=target_ptr, target_kind=TARGET_KIND.get(target.dtype, 3),
                         grad_ptr=grad.view.data_ptr() if grad else None, loss_ptr=loss.view.data_ptr(),
                         loss_acc=loss_acc, reduction=reduction, compute_grad=compute_grad, ignore_index=ignore_index,
                         gamma=gamma, alpha=alpha,
                         normalizer_ptr=device_normalizer.data_ptr() if device_normalizer is not None else None,
                         host=host, normalizer=normalizer, fold=fold, state=state,
                         image_normalizer=image_normalizer))
    assert loss.untouched(), "loss written out of bounds"
    assert grad is None or grad.untouched(), "gradient written out of bounds"
    assert x.buffer.untouched(), "the logits' guard region was written"
    if not index:
        assert target_buffer.untouched() and torch.equal(bits(target_buffer.view), bits(target)), "targets modified"
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
    loss: torch.Tensor          # as reduced, float64, in x's logical shape for "none"
    grad_sum: torch.Tensor      # d(sum of the per-element losses)/dx, float64, x's logical shape
    denominator: torch.Tensor   # of "mean", in the accumulation dtype, as the kernel sees it
    as_given: bool              # a normalizer: 1 / d even for d <= 0
    count: int                  # index targets: valid rows (in [0, C], not ignored)


def _sigmoid_piece(xd, t_ref, *, gamma, alpha, ignore_index, reduction, normalizer=None):
    """The reference with one gamma, and its gradient of the summed losses (limit 0 where autograd is NaN)."""
    kwargs = dict(alpha=alpha, gamma=gamma, ignore_index=ignore_index)
    xv = xd.clone().requires_grad_()
    elementwise = reference.sigmoid_focal_loss(xv, t_ref, reduction="none", **kwargs)
    (grad_sum,) = torch.autograd.grad(elementwise.sum(), xv)
    # Autograd of m**gamma at m = 0 (gamma < 1, saturated logits) is inf * 0; the derivative's limit is 0.
    grad_sum = torch.where(torch.isnan(grad_sum) & torch.isfinite(xd), torch.zeros_like(grad_sum), grad_sum)
    if reduction == "none":
        loss = elementwise
    else:
        loss = reference.sigmoid_focal_loss(xv, t_ref, reduction=reduction, normalizer=normalizer, **kwargs)
    return loss.detach(), elementwise.detach(), grad_sum


def expected(x: torch.Tensor, target: torch.Tensor, *, gamma: Gamma = GAMMA["2"], alpha, reduction,
             ignore_index=-100, mean_mode="default", normalizer=7.5, channel_first: bool = False) -> Expected:
    """focal_cuda.reference.sigmoid_focal_loss in float64 on the kernel's (rounded) values, classes last (a
    channel-first x is moved there and the results back). Out-of-range index targets (the reference raises on
    them) are evaluated as ignored, then their rows made NaN, and any reduced loss; they are not counted. A
    gamma schedule: each element's gamma from its p_t, the reference per gamma, the pieces combined."""
    acc = acc_dtype(x.dtype)
    xl = x.detach().movedim(1, -1) if channel_first else x.detach()
    classes = xl.shape[-1]
    rows = xl.numel() // max(classes, 1)
    index = not target.dtype.is_floating_point
    bad = torch.zeros(target.shape if index else xl.shape[:-1], dtype=torch.bool)
    count = 0
    if index:
        t = target.long()
        bad = (t != ignore_index) & ((t < 0) | (t > classes))
        t_ref = torch.where(bad, torch.full_like(t, ignore_index), t)
        count = int((t_ref != ignore_index).sum())
        y = torch.nn.functional.one_hot(torch.where(t_ref == ignore_index, classes, t_ref), classes + 1)[..., :classes]
    else:
        t_ref = target.double()
        y = t_ref
    xd = xl.double()
    use_normalizer = reduction == "mean" and mean_mode != "default"
    if use_normalizer:
        denominator = torch.tensor(normalizer, dtype=acc)
    else:
        denominator = torch.tensor(float(count * classes if index else rows * classes), dtype=acc)
    # As a float64 tensor: the reference turns a Python float into a float32 tensor first (3.3 -> 3.2999999523),
    # even for float64 inputs, where the kernel reads the normalizer in float64.
    ref_normalizer = denominator.double() if use_normalizer else None
    p = torch.sigmoid(xd)
    p_t = p * y + (1 - p) * (1 - y)
    element_gamma = torch.full(xd.shape, gamma.gamma, dtype=torch.float64)
    for threshold, value in reversed(list(zip(gamma.thresholds, gamma.values))):
        element_gamma = torch.where(p_t < threshold, torch.full_like(element_gamma, value), element_gamma)
    pieces = sorted(set(element_gamma.flatten().tolist())) or [gamma.gamma]
    kwargs = dict(alpha=alpha, ignore_index=ignore_index)
    if len(pieces) == 1:
        loss, _, grad_sum = _sigmoid_piece(xd, t_ref, gamma=pieces[0], reduction=reduction,
                                           normalizer=ref_normalizer, **kwargs)
    else:
        elementwise = torch.zeros_like(xd)
        grad_sum = torch.zeros_like(xd)
        for value in pieces:
            _, piece, piece_grad = _sigmoid_piece(xd, t_ref, gamma=value, reduction="none", **kwargs)
            here = element_gamma == value
            elementwise = torch.where(here, piece, elementwise)
            grad_sum = torch.where(here, piece_grad, grad_sum)
        if reduction == "none":
            loss = elementwise
        elif reduction == "sum":
            loss = elementwise.sum()
        else:
            d = float(ref_normalizer) if use_normalizer else max(float(denominator), 1.0)
            loss = elementwise.sum() / d
    if bad.any():
        nan = float("nan")
        loss = loss.masked_fill(bad.unsqueeze(-1), nan) if reduction == "none" else torch.full_like(loss, nan)
        grad_sum = grad_sum.masked_fill(bad.unsqueeze(-1), nan)
    if channel_first:
        grad_sum = grad_sum.movedim(-1, 1)
        if reduction == "none":
            loss = loss.movedim(-1, 1)
    return Expected(loss, grad_sum, denominator, use_normalizer, count)


def expected_state(exp: Expected, reduction: str, fold: bool) -> torch.Tensor:
    d = exp.denominator
    one = torch.ones((), dtype=d.dtype)
    inverse = one / d if exp.as_given or d > 0 else torch.zeros((), dtype=d.dtype)
    return torch.stack([inverse if fold else one, inverse if (reduction == "mean" and not fold) else one,
                        torch.zeros((), dtype=d.dtype)])


def check(fwd: Forward, exp: Expected, dtype: torch.dtype, reduction: str, label: str,
          grad_output: Optional[torch.Tensor] = None, final: Optional[torch.Tensor] = None) -> None:
    """Loss (at its own dtype's precision: the accumulation dtype when stored there), state (bitwise), the
    forward's gradient and, after a backward, the final gradient."""
    assert_close_scaled(fwd.loss.view, exp.loss, fwd.loss.view.dtype, f"{label}: loss")
    want_state = expected_state(exp, reduction, fwd.fold)
    assert torch.equal(bits(fwd.state), bits(want_state)), (
        f"{label}: state {fwd.state.tolist()} != {want_state.tolist()}")
    if fwd.grad is None:
        return
    forward_scale = float(want_state[0])
    assert_close_scaled(fwd.raw_grad, exp.grad_sum * forward_scale, dtype, f"{label}: forward gradient")
    if final is not None:
        go = grad_output.to(dtype).double()  # the backward reads grad_output in the gradient's dtype
        want = exp.grad_sum * go * (float(want_state[0]) * float(want_state[1]))
        assert_close_scaled(final, want, dtype, f"{label}: gradient after backward")


# ============================================================================ inputs


def make_dense_target(shape, dtype, gen) -> torch.Tensor:
    """Mostly hard 0 / 1 labels, a third soft."""
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    pick = torch.rand(shape, generator=gen, dtype=torch.float64)
    y = torch.where(pick < 0.33, u, (u < 0.3).double())
    return y.to(dtype)


def make_index_target(shape, classes, dtype, gen, *, ignore_index, ignore_frac=0.0, background_frac=0.0):
    """Class indices in [0, C), some background (C; not for uint8 with C >= 255) and some ignored."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    high = min(classes, 255) if dtype == torch.uint8 else classes
    if dtype == torch.uint8 and classes >= 255:
        background_frac = 0.0
    t = torch.randint(0, max(high, 1), shape, generator=gen)
    r = torch.rand(shape, generator=gen)
    t = torch.where(r < background_frac, torch.full_like(t, classes), t)
    t = torch.where((r >= background_frac) & (r < background_frac + ignore_frac), torch.full_like(t, ignore_index), t)
    return t.to(dtype)


def default_ignore_index(target_dtype) -> int:
    return 255 if target_dtype == torch.uint8 else -100


# ============================================================================ the matrix: dense targets

DENSE_SHAPES = [((1, 1), 0), ((5, 3), 0), ((4, 80), 0), ((7, 81), 0), ((3, 1000), 0), ((7, 81), 1), ((1, 4097), 1)]
DENSE_FORMS = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.float16, torch.float16),
               (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]


def _dense_matrix():
    params, j = [], 0
    for dtype, target_dtype in DENSE_FORMS:
        for shape, offset in DENSE_SHAPES:
            for vec in (True, False):
                if vec and offset:
                    continue  # a misaligned base: the launcher takes the scalar kernel (see test_refusals)
                case = dict(dtype=dtype, target_dtype=target_dtype, shape=shape, offset=offset, vec=vec,
                            reduction=REDUCTIONS[j % 3], gamma=GAMMAS[(j // 3) % len(GAMMAS)].name,
                            alpha=ALPHAS[(j // 2) % 2], mean_mode=MEAN_MODES[(j // 3) % 3],
                            grid=(1, 2, 3)[(j + j // 3) % 3], order=(0, 1, 7)[(j // 5) % 3],
                            compute_grad=j % 7 != 4, in_place=j % 2 == 0, backward_vec=j % 4 != 1,
                            loss_acc=dtype in HALF_DTYPES and j % 3 != 1)
                params.append(pytest.param(case, id="-".join([
                    DTYPE_ID[dtype], "t" + DTYPE_ID[target_dtype], "x".join(map(str, shape)) + (f"off{offset}"
                                                                                               if offset else ""),
                    "vec" if vec else "scalar", case["reduction"], f"g{case['gamma']}", f"a{case['alpha']}",
                    case["mean_mode"] if case["reduction"] == "mean" else "-", f"grid{case['grid']}",
                    f"order{case['order']}", "nograd" if not case["compute_grad"] else
                    "inplace" if case["in_place"] else "outofplace", "lossacc" if case["loss_acc"] else "loss"])))
                j += 1
    return params


def backward_for(emu, fwd: Forward, case, dtype, gen, shape):
    """The backward the autograd formula would run: elementwise grad_output for "none", else a scalar. The
    launcher vectorises it over aligned buffers (always here, any numel); some cases take the scalar kernel."""
    if not case["compute_grad"]:
        return None, None
    if case["reduction"] == "none":
        go = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    else:
        go = torch.tensor(0.75 + torch.rand((), generator=gen).item(), dtype=torch.float64).to(dtype)
    final = run_backward(emu, fwd.grad, fwd.state, go, in_place=case["in_place"], vec=case["backward_vec"],
                         grid=case["grid"], order=case["order"])
    return go, final


@pytest.mark.parametrize("case", _dense_matrix())
def test_dense_matches_reference(emu, case, request):
    """The dense kernel (targets of the input's dtype or float), VEC and scalar accesses, on sizes with and
    without a VEC tail and misaligned bases, then the backward kernel on its gradient."""
    gen = seeded(request)
    dtype, shape = case["dtype"], case["shape"]
    values = make_logits(shape, dtype, gen)
    y = make_dense_target(shape, case["target_dtype"], gen)
    x = classes_last(values, case["offset"])
    gamma = GAMMA[case["gamma"]]
    kw = dict(alpha=case["alpha"], reduction=case["reduction"], mean_mode=case["mean_mode"])
    fwd = run_forward(emu, x, y, vec=case["vec"], grid=case["grid"], order=case["order"], gamma=gamma,
                      compute_grad=case["compute_grad"], loss_acc=case["loss_acc"], target_offset=case["offset"],
                      **kw)
    go, final = backward_for(emu, fwd, case, dtype, gen, shape)
    exp = expected(values, y, gamma=gamma, **kw)
    check(fwd, exp, dtype, case["reduction"], request.node.name, go, final)


# ============================================================================ the matrix: index targets


@dataclass(frozen=True)
class IndexShape:
    name: str
    shape: tuple          # (rows, C) classes last, or (N, C, S) channel-first
    layout: str           # classes last: "contiguous" / "offset1"; channel-first: see cf_strides

    @property
    def channel_first(self) -> bool:
        return len(self.shape) == 3


INDEX_SHAPES = [
    IndexShape("70x1", (70, 1), "contiguous"),        # C = 1: the FastDivider's divisor 1
    IndexShape("41x2", (41, 2), "contiguous"),
    IndexShape("41x3", (41, 3), "contiguous"),        # C < VEC: scalar kernel only
    IndexShape("30x5off1", (30, 5), "offset1"),       # a misaligned base: scalar kernel only
    IndexShape("19x8", (19, 8), "contiguous"),
    IndexShape("11x21", (11, 21), "contiguous"),      # C % VEC != 0: packs straddle two rows
    IndexShape("19x80", (19, 80), "contiguous"),
    IndexShape("9x81", (9, 81), "contiguous"),
    IndexShape("9x81off1", (9, 81), "offset1"),
    IndexShape("5x91", (5, 91), "contiguous"),
    IndexShape("3x1000", (3, 1000), "contiguous"),
    IndexShape("2x4097", (2, 4097), "contiguous"),
    IndexShape("1x70001", (1, 70001), "contiguous"),
    IndexShape("2x3x37", (2, 3, 37), "contiguous"),   # channel-first, odd spatial size: scalar kernel only
    IndexShape("2x19x35pad", (2, 19, 35), "padded"),
    IndexShape("1x81x13", (1, 81, 13), "contiguous"),
    IndexShape("1x1x17", (1, 1, 17), "contiguous"),
    IndexShape("2x19x64", (2, 19, 64), "contiguous"),  # spatial a multiple of VEC: vector kernel
    IndexShape("3x5x40padv", (3, 5, 40), "padded_vec"),
    IndexShape("2x21x12offv", (2, 21, 12), "offset_vec"),
    IndexShape("2x2x8off1", (2, 2, 8), "offset1"),
]


def make_index_logits(s: IndexShape, dtype, gen, scale=2.0) -> tuple[torch.Tensor, Logits]:
    values = make_logits(s.shape, dtype, gen, scale)
    if s.channel_first:
        return values, channel_first(values, s.layout)
    return values, classes_last(values, int(s.layout == "offset1"))


def index_target_shape(s: IndexShape) -> tuple:
    return (s.shape[0], s.shape[2]) if s.channel_first else (s.shape[0],)


def _index_matrix():
    params, j = [], 0
    for dtype in DTYPES:
        for s in INDEX_SHAPES:
            _, x = make_index_logits(s, dtype, torch.Generator().manual_seed(0))
            probe = torch.zeros(index_target_shape(s), dtype=torch.int64)
            kind = INDEX_CHANNELS if s.channel_first else INDEX
            for vec in (True, False):
                if vec and not launcher_vec(kind, x, probe):
                    continue  # test_refusals: the emulation refuses it, as the launcher never runs it
                target_dtype = TARGET_DTYPES[(j + j // 4) % 4]
                case = dict(dtype=dtype, shape=s, vec=vec, reduction=REDUCTIONS[j % 3],
                            gamma=GAMMAS[(j // 3) % len(GAMMAS)].name, alpha=ALPHAS[(j // 2) % 2],
                            mean_mode=MEAN_MODES[(j // 3 + j // 9) % 3], target_dtype=target_dtype,
                            grid=(1, 2, 3)[(j + j // 3) % 3], count_grid=1 + j % 2, order=(0, 1, 7)[(j // 5) % 3],
                            compute_grad=j % 7 != 4, in_place=j % 2 == 0, backward_vec=j % 4 != 1,
                            ignore_frac=(0.0, 0.25)[(j // 2) % 2], background_frac=(0.2, 0.0)[(j // 4) % 2],
                            loss_acc=dtype in HALF_DTYPES and j % 3 != 1)
                params.append(pytest.param(case, id="-".join([
                    DTYPE_ID[dtype], s.name, "vec" if vec else "scalar", TARGET_ID[target_dtype], case["reduction"],
                    f"g{case['gamma']}", f"a{case['alpha']}",
                    case["mean_mode"] if case["reduction"] == "mean" else "-", f"grid{case['grid']}",
                    f"count{case['count_grid']}", f"order{case['order']}", f"ign{case['ignore_frac']}",
                    f"bg{case['background_frac']}", "nograd" if not case["compute_grad"] else
                    "inplace" if case["in_place"] else "outofplace", "lossacc" if case["loss_acc"] else "loss"])))
                j += 1
    return params


INDEX_MATRIX = _index_matrix()


def test_index_matrix_covers_both_kernels_and_widths():
    """Both index kernels run with vectors and without for every dtype, and packs straddling rows
    (C % VEC != 0 with vectors) and C < VEC (scalar) are among the cases."""
    seen = {(c.values[0]["shape"].channel_first, c.values[0]["vec"], c.values[0]["dtype"]) for c in INDEX_MATRIX}
    assert seen == {(cf, vec, d) for cf in (False, True) for vec in (False, True) for d in DTYPES}, seen
    for dtype in DTYPES:
        cases = [c.values[0] for c in INDEX_MATRIX if c.values[0]["dtype"] == dtype]
        v = vec_width(dtype)
        assert any(c["vec"] and not c["shape"].channel_first and c["shape"].shape[1] % v for c in cases)
        assert any(not c["shape"].channel_first and c["shape"].shape[1] < v for c in cases)
        assert any(c["shape"].channel_first and c["shape"].shape[2] % channels_vec(dtype) for c in cases)


@pytest.mark.parametrize("case", INDEX_MATRIX)
def test_index_matches_reference(emu, case, request):
    """The index kernels (classes last: flat packs, straddling rows; channel-first: VEC positions per thread),
    vectors where the launcher allows them, scalar always, each integer target kind, ignored and background
    rows, the count pre-pass for a folded mean, then the backward kernel."""
    gen = seeded(request)
    dtype, s = case["dtype"], case["shape"]
    classes = s.shape[1]
    ignore_index = default_ignore_index(case["target_dtype"])
    values, x = make_index_logits(s, dtype, gen)
    t = make_index_target(index_target_shape(s), classes, case["target_dtype"], gen, ignore_index=ignore_index,
                          ignore_frac=case["ignore_frac"], background_frac=case["background_frac"])
    gamma = GAMMA[case["gamma"]]
    kw = dict(alpha=case["alpha"], reduction=case["reduction"], mean_mode=case["mean_mode"], ignore_index=ignore_index)
    fwd = run_forward(emu, x, t, vec=case["vec"], grid=case["grid"], count_grid=case["count_grid"],
                      order=case["order"], gamma=gamma, compute_grad=case["compute_grad"], loss_acc=case["loss_acc"],
                      **kw)
    go, final = backward_for(emu, fwd, case, dtype, gen, s.shape)
    exp = expected(values, t, gamma=gamma, channel_first=s.channel_first, **kw)
    check(fwd, exp, dtype, case["reduction"], request.node.name, go, final)
    ignored = (t.long() == ignore_index).unsqueeze(1 if s.channel_first else -1).expand(s.shape)
    if case["reduction"] == "none":
        assert torch.equal(fwd.loss.view[ignored], torch.zeros_like(fwd.loss.view[ignored])), "ignored rows: loss 0"
    if fwd.grad is not None:
        assert torch.equal(fwd.raw_grad[ignored], torch.zeros_like(fwd.raw_grad[ignored])), "ignored rows: grad 0"


# ============================================================================ preconditions


def test_refusals(emu):
    """Every call the launcher would not make is refused with its precondition (so the matrices, which only
    generate what refusal() allows, leave nothing out silently): vectors over misaligned bases, C < VEC for
    the index kernel, spatial or strides not multiples of VEC for the channel-first kernel, spatial > 1 for
    the classes-last kernels, two normalizers at once."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for dtype in DTYPES:
        v, cv = vec_width(dtype), channels_vec(dtype)
        cases += [
            (INDEX, classes_last(make_logits((5, v - 1), dtype, gen)), torch.zeros(5, dtype=torch.int64)),
            (INDEX, classes_last(make_logits((5, v), dtype, gen), 1), torch.zeros(5, dtype=torch.int64)),
            (DENSE_SAME, classes_last(make_logits((5, v), dtype, gen), 1), torch.zeros(5, v, dtype=dtype)),
            (DENSE_SAME, classes_last(make_logits((5, v), dtype, gen)), torch.zeros(5 * v + 1, dtype=dtype)[1:]),
            (INDEX_CHANNELS, channel_first(make_logits((2, 3, cv + 1), dtype, gen)), torch.zeros(2 * (cv + 1))),
            (INDEX_CHANNELS, channel_first(make_logits((2, 3, cv), dtype, gen), "padded"), torch.zeros(2 * cv)),
            (INDEX_CHANNELS, channel_first(make_logits((2, 3, cv), dtype, gen), "offset1"), torch.zeros(2 * cv)),
        ]
    refused = 0
    for kind, x, target in cases:
        for vec in (True, False):
            why = refusal(kind, vec, x, target)
            index = not target.dtype.is_floating_point
            target = target.long() if kind in (INDEX, INDEX_CHANNELS) else target
            shape = tuple(x.view.shape)
            loss = torch.full((1,), float("nan"), dtype=x.view.dtype)
            grad = torch.full(shape, float("nan"), dtype=x.view.dtype)
            state = torch.full((3,), float("nan"), dtype=acc_dtype(x.view.dtype))
            rc = forward_rc(emu, kind=kind, vec=vec, grid=1, count_grid=1, order=0, x=x, target_ptr=target.data_ptr(),
                            target_kind=3, grad_ptr=grad.data_ptr(), loss_ptr=loss.data_ptr(), loss_acc=False,
                            reduction="sum", compute_grad=True, ignore_index=-100, gamma=GAMMA["2"], alpha=0.25,
                            normalizer_ptr=None, host=False, normalizer=0.0, fold=False, state=state)
            label = (KIND_ID[kind], DTYPE_ID[x.view.dtype], shape, x.view.stride(), vec, index)
            if why is None:
                assert rc == 0, (label, emu.error())
                assert vec is False, label  # every vector case above breaks a precondition
            else:
                assert rc == 1 and why in emu.error(), (label, why, emu.error())
                refused += 1
    assert refused == len(cases)
    # spatial > 1 with a classes-last kernel; a device and a host normalizer at once.
    x = channel_first(make_logits((2, 3, 8), torch.float32, gen))
    state = torch.full((3,), float("nan"))
    for kind, normalizer, host, why in [(INDEX, None, False, "spatial > 1"),
                                        (INDEX_CHANNELS, torch.ones(()), True, "either on the device or on the host")]:
        rc = forward_rc(emu, kind=kind, vec=False, grid=1, count_grid=1, order=0, x=x,
                        target_ptr=torch.zeros(16, dtype=torch.int64).data_ptr(), target_kind=3, grad_ptr=None,
                        loss_ptr=torch.zeros(1).data_ptr(), loss_acc=False, reduction="mean", compute_grad=False,
                        ignore_index=-100, gamma=GAMMA["2"], alpha=0.25,
                        normalizer_ptr=normalizer.data_ptr() if normalizer is not None else None, host=host,
                        normalizer=1.0, fold=False, state=state)
        assert rc == 1 and why in emu.error(), (why, emu.error())


# ============================================================================ FastDivider


FAST_DIVIDER_CLASSES = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 255, 256,
                        257, 1000, 1023, 1024, 1025, 4096, 4097]


@pytest.mark.parametrize("classes,vec", [(c, v) for c in FAST_DIVIDER_CLASSES for v in (False, True)
                                         if not v or c >= vec_width(torch.float32)],  # C < VEC: test_refusals
                         ids=lambda p: p if isinstance(p, int) else ("vec" if p else "scalar"))
def test_index_kernel_finds_each_row(emu, classes, vec, request):
    """The index kernel finds each element's row with FastDivider (made on the host, divided on the device):
    over C = 1, powers of two and their neighbours, rows with different kinds of target (positive at varying
    classes, ignored, background), every element's loss and gradient at its place."""
    dtype = torch.float32
    gen = seeded(request)
    rows = 5
    values = make_logits((rows, classes), dtype, gen)
    x = classes_last(values)
    t = torch.tensor([(7 * r + 1) % classes for r in range(rows)], dtype=torch.int64)
    t[1], t[3] = -100, classes
    fwd = run_forward(emu, x, t, vec=vec, grid=2, reduction="none", gamma=GAMMA["2"])
    exp = expected(values, t, alpha=0.25, reduction="none")
    check(fwd, exp, dtype, "none", request.node.name)


def test_fast_divider_divides_every_dividend(emu):
    """FastDivider::make (host) and divide (device code) against exact integer division, for divisors up to
    2^31 - 1 (C on CUDA) and dividends up to 2^63 - 1, at the boundaries k d - 1, k d where rounding errs first."""
    gen = torch.Generator().manual_seed(1234)
    divisors = sorted({1, 2, 3, 5, 7, 10, 19, 21, 80, 81, 91, 255, 1000, 4097, 70001, 2**31 - 1, 2**30, 2**30 + 1,
                       *[2**k for k in range(31)], *[2**k - 1 for k in range(2, 31)], *[2**k + 1 for k in range(1, 31)],
                       *torch.randint(2, 2**31 - 1, (40,), generator=gen).tolist()})
    top = 2**63 - 1
    for d in divisors:
        quotients = torch.randint(0, top // d, (200,), generator=gen, dtype=torch.int64).tolist()
        n = {0, 1, d - 1, d, d + 1, top, top - 1, (top // d) * d, (top // d) * d - 1, 2**62, 2**31, 2**32}
        n |= {q * d for q in quotients} | {q * d - 1 for q in quotients if q}
        n = sorted(n | {q * d + d - 1 for q in quotients if q * d + d - 1 <= top})
        dividends = torch.tensor(n, dtype=torch.int64)
        out = torch.full_like(dividends, -1)
        emu.check(emu.lib.emu_fast_divide(d, dividends.data_ptr(), dividends.numel(), out.data_ptr()))
        want = [v // d for v in n]
        assert out.tolist() == want, (d, [(v, o, w) for v, o, w in zip(n, out.tolist(), want) if o != w][:5])


# ============================================================================ features


@pytest.mark.parametrize("threshold", ["equal", "above", "below"])
@pytest.mark.parametrize("mode", ["dense", "index", "index_vec", "channels", "channels_vec"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DTYPE_ID.get)
def test_gamma_schedule_at_a_threshold(emu, dtype, mode, threshold, request):
    """An element whose p_t equals a threshold takes the next piece (p < t is false); a float64 threshold
    between the kernel's float32 p_t and the next float32 is rounded up, so p < t holds as in float64. The rule
    is restated in float64 on the kernel's own float32 p_t: for hard labels p_t = 1 / (1 + expf(-|x|)) or
    expf(-|x|) times that, evaluated here with the host's expf (which the emulation maps __expf to) and float32
    rounding. x = 0 gives p_t = 1/2 exactly; x = +-ln 3 a p_t that is not a short binary fraction."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.expf.restype = ctypes.c_float
    libm.expf.argtypes = [ctypes.c_float]
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    for x0 in (0.0, f32(math.log(3.0)), -f32(math.log(3.0))):
        x0 = float(torch.tensor(x0, dtype=dtype))
        e = float(libm.expf(-abs(x0)))
        inv = f32(1.0 / f32(1.0 + e))
        p = inv if x0 > 0 else f32(e * inv)  # sigmoid(x0), the kernel's float32 steps
        q = f32(e * inv) if x0 > 0 else inv
        # Positives (y = 1): p_t = p; negatives: p_t = q. The threshold sits at the positives' p_t.
        p_t = p
        t = {"equal": p_t, "above": math.nextafter(p_t, 1.0), "below": math.nextafter(p_t, 0.0)}[threshold]
        schedule = Gamma("at", 3.0, (t,), (5.0,))
        rows, classes = (4, 8)
        if mode.startswith("channels"):
            values = torch.full((1, classes, 8), x0, dtype=dtype)
            x = channel_first(values)
            target = torch.tensor([[0, 3, 8, -100, 7, 0, 1, 2]], dtype=torch.int64)
        else:
            values = torch.full((rows, classes), x0, dtype=dtype)
            x = classes_last(values)
            target = torch.tensor([0, 3, 8, 5], dtype=torch.int64)
            if mode == "dense":
                target = torch.nn.functional.one_hot(target, classes + 1)[:, :classes].to(dtype)
        fwd = run_forward(emu, x, target, vec=mode.endswith("vec") or mode == "dense", grid=1, reduction="none",
                          gamma=schedule, alpha=-1.0, compute_grad=False, loss_acc=dtype in HALF_DTYPES)
        loss = fwd.loss.view.double()
        if mode.startswith("channels"):
            loss = loss.movedim(1, -1).reshape(-1, classes)
            y = torch.nn.functional.one_hot(torch.where(target.view(-1) < 0, classes, target.view(-1)),
                                            classes + 1)[:, :classes]
            y = y.masked_fill((target.view(-1) < 0).unsqueeze(1), -1)  # ignored: loss 0
        else:
            y = target.double() if mode == "dense" else torch.nn.functional.one_hot(target, classes + 1)[:, :classes]
        for (r, c), yv in zip(torch.cartesian_prod(torch.arange(loss.shape[0]), torch.arange(classes)).tolist(),
                              y.reshape(-1).tolist()):
            if yv < 0:
                assert loss[r, c] == 0.0
                continue
            element_p_t = p if yv == 1 else q
            g = 5.0 if element_p_t < t else 3.0  # the rule in float64, on the kernel's float32 p_t
            ce = math.log1p(math.exp(-abs(x0))) + max(x0 if yv == 0 else -x0, 0.0)
            want = ce * (1 - element_p_t) ** g
            assert math.isclose(loss[r, c].item(), want, rel_tol=1e-5), (x0, r, c, yv, g, loss[r, c].item(), want)
        if x0 == 0.0:
            assert p == 0.5 and q == 0.5


@pytest.mark.parametrize("mode", ["dense", "index", "channels"])
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=DTYPE_ID.get)
def test_loss_in_the_accumulation_dtype_does_not_overflow(emu, dtype, mode, request):
    """A 16-bit "sum" beyond the 16-bit range: stored in float32 (loss_acc_dtype, as under autocast) it is
    finite and matches the float64 reference at float32 precision; float16 in the input dtype overflows."""
    gen = seeded(request)
    sign = torch.where(torch.rand((8, 16), generator=gen) < 0.5, -1.0, 1.0)
    values = (sign * 3000.0).to(dtype)
    if mode == "dense":
        x, t = classes_last(values), (values < 0).to(dtype)  # every element confidently wrong
    elif mode == "index":
        x, t = classes_last(values), torch.full((8,), 16, dtype=torch.int64)
    else:
        values = values.reshape(2, 16, 4)
        x, t = channel_first(values), torch.full((2, 4), 16, dtype=torch.int64)
    kw = dict(gamma=GAMMA["0"], alpha=-1.0, reduction="sum")
    fwd = run_forward(emu, x, t, vec=True, grid=2, compute_grad=False, loss_acc=True, **kw)
    exp = expected(values, t, channel_first=mode == "channels", **kw)
    assert float(exp.loss) > 65504 and torch.isfinite(fwd.loss.view)
    assert_close_scaled(fwd.loss.view, exp.loss, torch.float32, request.node.name)
    if dtype == torch.float16:
        assert torch.isinf(run_forward(emu, x, t, vec=True, grid=2, compute_grad=False, **kw).loss.view)


# ============================================================================ edge cases


OUT_OF_RANGE_FORMS = [(torch.float32, torch.int64, "index", True), (torch.float16, torch.uint8, "index", False),
                      (torch.bfloat16, torch.int16, "index", False), (torch.float64, torch.int32, "index", True),
                      (torch.float32, torch.int32, "channels", True), (torch.float16, torch.uint8, "channels", False),
                      (torch.bfloat16, torch.int64, "channels", True)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype,target_dtype,mode,vec", OUT_OF_RANGE_FORMS,
                         ids=[f"{DTYPE_ID[d]}-{TARGET_ID[t]}-{m}-{'vec' if v else 'scalar'}"
                              for d, t, m, v in OUT_OF_RANGE_FORMS])
def test_out_of_range_targets_give_nan_rows(emu, dtype, target_dtype, mode, vec, reduction, request):
    """A target outside [0, C] (not checked on the device): its row's losses and gradient NaN, the reduced loss
    NaN; the other rows (ignored, background, positive) and the count (which excludes it) unaffected."""
    gen = seeded(request)
    rows, classes = 12, 17  # C % VEC != 0: packs straddle rows
    ignore_index = default_ignore_index(target_dtype)
    t = make_index_target(rows, classes, torch.int64, gen, ignore_index=ignore_index)
    t[1] = classes + 1 if target_dtype != torch.uint8 else 200
    t[3] = ignore_index
    t[5] = classes  # background: valid
    if target_dtype != torch.uint8:
        t[8] = -3
    t = t.to(target_dtype)
    if mode == "channels":
        values = make_logits((3, classes, 4), dtype, gen)
        x, t = channel_first(values), t.reshape(3, 4)
    else:
        values = make_logits((rows, classes), dtype, gen)
        x = classes_last(values)
    kw = dict(alpha=0.25, reduction=reduction, ignore_index=ignore_index)
    fwd = run_forward(emu, x, t, vec=vec, grid=2, **kw)
    exp = expected(values, t, channel_first=mode == "channels", **kw)
    assert exp.count == (rows - 3 if target_dtype != torch.uint8 else rows - 2)
    check(fwd, exp, dtype, reduction, request.node.name)
    bad = torch.zeros(rows, dtype=torch.bool)
    bad[1] = True
    if target_dtype != torch.uint8:
        bad[8] = True
    grad = fwd.raw_grad.movedim(1, -1).reshape(rows, classes) if mode == "channels" else fwd.raw_grad
    assert torch.isnan(grad[bad]).all() and not torch.isnan(grad[~bad]).any()
    if reduction == "none":
        loss = fwd.loss.view.movedim(1, -1).reshape(rows, classes) if mode == "channels" else fwd.loss.view
        assert torch.isnan(loss[bad]).all() and not torch.isnan(loss[~bad]).any()
    else:
        assert torch.isnan(fwd.loss.view).all()


@pytest.mark.parametrize("mode", ["index", "channels", "channels_mask"])
@pytest.mark.parametrize("fill", ["ignored", "background"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_ID.get)
def test_all_rows_ignored_or_background(emu, dtype, reduction, fill, mode, request):
    """Every row ignored: loss 0, gradient 0, the mean's inverse read as 0 (not NaN) through the count
    pre-pass. Every row background: each class a negative, all rows counted. channels_mask: a uint8 mask
    (255 ignored) over channel-first logits."""
    gen = seeded(request)
    classes = 5
    target_dtype = torch.uint8 if mode == "channels_mask" else torch.int64
    ignore_index = default_ignore_index(target_dtype)
    if mode == "index":
        values = make_logits((10, classes), dtype, gen)
        x, shape = classes_last(values), (10,)
    else:
        values = make_logits((2, classes, 12), dtype, gen)
        x, shape = channel_first(values), (2, 12)
    t = torch.full(shape, ignore_index if fill == "ignored" else classes, dtype=target_dtype)
    kw = dict(alpha=0.25, reduction=reduction, ignore_index=ignore_index)
    fwd = run_forward(emu, x, t, vec=mode != "index", grid=2, count_grid=2, **kw)
    exp = expected(values, t, channel_first=mode != "index", **kw)
    check(fwd, exp, dtype, reduction, request.node.name)
    if fill == "ignored":
        assert torch.equal(fwd.loss.view, torch.zeros_like(fwd.loss.view))
        assert torch.equal(fwd.raw_grad, torch.zeros_like(fwd.raw_grad))
    else:
        assert exp.count == t.numel()


def mode_inputs(mode: str, dtype, gen, *, rows=70, classes=12):
    """(logits values, Logits, target, vec) for a mode: dense, index (scalar), index_vec, channels (scalar:
    odd spatial size), channels_vec."""
    if mode == "dense":
        values = make_logits((9, 81), dtype, gen)
        return values, classes_last(values), make_dense_target((9, 81), dtype, gen), True
    if mode.startswith("index"):
        values = make_logits((rows, classes), dtype, gen)
        t = make_index_target(rows, classes, torch.int64, gen, ignore_index=-100, ignore_frac=0.2, background_frac=0.2)
        return values, classes_last(values), t, mode == "index_vec"
    spatial = 37 if mode == "channels" else 36
    values = make_logits((2, classes, spatial), dtype, gen)
    t = make_index_target((2, spatial), classes, torch.int64, gen, ignore_index=-100, ignore_frac=0.2,
                          background_frac=0.2)
    return values, channel_first(values), t, mode == "channels_vec"


MODES = ["dense", "index", "index_vec", "channels", "channels_vec"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=DTYPE_ID.get)
def test_block_order_gives_the_same_bits(emu, dtype, reduction, mode, request):
    """Grids of 1, 2 and 5 blocks: for each grid, whichever block finishes last, the reduced loss, the state
    and the gradient are bitwise the same (a fixed tree over the grid); every grid matches the reference."""
    gen = seeded(request)
    values, x, t, vec = mode_inputs(mode, dtype, gen, rows=300)
    for grid in (1, 2, 5):
        runs = [run_forward(emu, x, t, vec=vec, grid=grid, count_grid=grid, order=order, gamma=GAMMA["0.5"],
                            reduction=reduction) for order in (0, 1, 12345)]
        for other in runs[1:]:
            assert torch.equal(bits(runs[0].loss.view), bits(other.loss.view)), grid
            assert torch.equal(bits(runs[0].raw_grad), bits(other.raw_grad)), grid
            assert torch.equal(bits(runs[0].state), bits(other.state)), grid
        exp = expected(values, t, gamma=GAMMA["0.5"], alpha=0.25, reduction=reduction,
                       channel_first=mode.startswith("channels"))
        check(runs[0], exp, dtype, reduction, f"{request.node.name} grid {grid}")


@pytest.mark.parametrize("gamma", ["0", "0.5", "2", "3.7", "flsd53"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,magnitude", [(torch.float32, 1e4), (torch.float16, 60000.0),
                                             (torch.bfloat16, 1e4), (torch.float64, 1e4)],
                         ids=["f32-1e4", "f16-60000", "bf16-1e4", "f64-1e4"])
def test_saturated_logits_stay_finite(emu, dtype, magnitude, mode, gamma, request):
    """Logits of +-magnitude on either side of their label (and moderate ones): finite losses and gradients,
    equal to the reference (the loss reaches |x| where the prediction is confidently wrong)."""
    gen = seeded(request)
    rows, classes = 8, 8
    signs = torch.where(torch.rand((rows, classes), generator=gen) < 0.5, -1.0, 1.0).double()
    values = (signs * magnitude).to(dtype)
    values[0] = make_logits((classes,), dtype, gen)
    if mode == "dense":
        t = make_dense_target((rows, classes), dtype, gen)
        t[1] = (values[1] > 0).to(dtype)   # confidently right
        t[2] = (values[2] < 0).to(dtype)   # confidently wrong
    else:
        t = make_index_target(rows, classes, torch.int64, gen, ignore_index=-100)
        t[3] = classes
    vec = mode in ("dense", "index_vec", "channels_vec")
    if mode.startswith("channels"):  # (rows, C) as 2 images of 4 positions (a multiple of VEC), or 8 x 1 (odd)
        spatial = 4 if vec else 1
        values = values.reshape(rows // spatial, spatial, classes).movedim(-1, 1).contiguous()
        t = t.reshape(rows // spatial, spatial)
        x = channel_first(values)
    else:
        x = classes_last(values)
    for reduction in ("none", "mean"):  # a float16 sum of such losses overflows: the mean does not
        kw = dict(gamma=GAMMA[gamma], alpha=0.25, reduction=reduction)
        fwd = run_forward(emu, x, t, grid=2, vec=vec, **kw)
        assert torch.isfinite(fwd.loss.view).all(), fwd.loss.view
        assert torch.isfinite(fwd.raw_grad).all(), fwd.raw_grad
        exp = expected(values, t, channel_first=mode.startswith("channels"), **kw)
        check(fwd, exp, dtype, reduction, f"{request.node.name} {reduction}")


@pytest.mark.parametrize("mode", ["dense", "index", "channels"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_ID.get)
def test_mean_denominators(emu, dtype, mode, request):
    """Every "mean" denominator, folded into the forward gradient and not: the default (dense numel; index:
    counted rows x C, by the count pre-pass when folded), a device normalizer, a host normalizer used as
    given (also where it is not positive: 1 / d in the state, not the default's 0)."""
    gen = seeded(request)
    rows, classes = 6, 7
    if mode == "dense":
        values = make_logits((rows, classes), dtype, gen)
        x, t = classes_last(values), make_dense_target((rows, classes), dtype, gen)
    elif mode == "index":
        values = make_logits((rows, classes), dtype, gen)
        x = classes_last(values)
        t = make_index_target(rows, classes, torch.int16, gen, ignore_index=-100, ignore_frac=0.3, background_frac=0.2)
    else:
        values = make_logits((2, classes, 3), dtype, gen)
        x = channel_first(values)
        t = make_index_target((2, 3), classes, torch.int16, gen, ignore_index=-100, ignore_frac=0.3,
                              background_frac=0.2)
    for mean_mode, normalizer in [("default", 0.0), ("device", 3.3), ("host", 3.3), ("host", -2.0)]:
        for fold in (True, False):
            kw = dict(alpha=0.25, reduction="mean", mean_mode=mean_mode, normalizer=normalizer)
            fwd = run_forward(emu, x, t, fold=fold, grid=2, count_grid=2, **kw)
            exp = expected(values, t, channel_first=mode == "channels", **kw)
            check(fwd, exp, dtype, "mean", f"{request.node.name} {mean_mode} {normalizer} fold={fold}")


# ============================================================================ the count pre-pass


@pytest.mark.parametrize("grid", [1, 2, 3])
@pytest.mark.parametrize("target_dtype", TARGET_DTYPES, ids=TARGET_ID.get)
@pytest.mark.parametrize("acc", [torch.float32, torch.float64], ids=DTYPE_ID.get)
def test_count_valid_targets_with_items_per_target(emu, acc, target_dtype, grid, request):
    """As the sigmoid launcher runs it: classes + 1 (C = background counts), items_per_target = C:
    state[0] = 1 / (count x C), 0 when nothing counts; over 700 positions (grid-stride loops), from a target
    pointer 0 or 3 elements past a 16-byte boundary, 700 or 701 of them (scalar head and tail)."""
    gen = seeded(request)
    classes = 80
    ignore_index = 255 if target_dtype == torch.uint8 else -100
    for offset, positions in [(0, 700), (3, 701)]:
        t = torch.randint(0, classes + 1, (offset + positions,), generator=gen)
        r = torch.rand(t.shape, generator=gen)
        t = torch.where(r < 0.2, torch.full_like(t, ignore_index), t)
        t = torch.where((r > 0.9) & (r < 0.93), torch.full_like(t, classes + 1), t)
        if target_dtype != torch.uint8:
            t = torch.where(r > 0.97, torch.full_like(t, -7), t)
        storage = t.to(target_dtype)
        t = storage[offset:]
        tl = t.long()
        count = int(((tl != ignore_index) & (tl >= 0) & (tl <= classes)).sum())
        for target, n in [(t, count), (torch.full_like(storage, ignore_index)[offset:], 0)]:
            state = torch.full((3,), float("nan"), dtype=acc)
            emu.check(emu.lib.emu_count_valid_targets_items(DTYPE_CODE[acc], grid, grid - 1, target.data_ptr(),
                                                            TARGET_KIND[target_dtype], positions, classes + 1,
                                                            ignore_index, classes, state.data_ptr()))
            want = torch.tensor(1.0, dtype=acc) / (n * classes) if n else torch.tensor(0.0, dtype=acc)
            assert torch.equal(bits(state[0]), bits(want)), (offset, state[0].item(), n)
            assert torch.isnan(state[1:]).all(), "the count pre-pass writes state[0] only"


# ============================================================================ the backward kernel


def _backward_matrix():
    params, j = [], 0
    for dtype in DTYPES:
        for numel in (1, 37, 64, 600):
            for vec in (False, True):  # vectors need aligned buffers only: any numel (a scalar tail)
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
    out = grad * (grad_output * state[1]) in the accumulation type, rounded once: bitwise."""
    gen = seeded(request)
    acc = acc_dtype(dtype)
    grad = guarded_like(torch.randn((numel,), generator=gen, dtype=torch.float64).to(dtype))
    original = grad.view.clone()
    go = torch.randn((numel,), generator=gen, dtype=torch.float64).to(dtype)
    state = torch.tensor([float("nan"), (1.0, 1 / 7)[grid % 2], 0.0], dtype=acc)
    want = (original.to(acc) * (go.to(acc) * state[1])).to(dtype)
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
    grad = guarded_like(torch.randn((41,), generator=gen, dtype=torch.float64).to(dtype))
    state = torch.tensor([1.0, 1.0, 0.0], dtype=acc)
    state.view(torch.uint8)[2 * state.element_size():] = 0xFF
    go = torch.ones((41,), dtype=dtype) if layout == "elementwise" else torch.tensor(1.0, dtype=dtype)
    for in_place in (False, True):
        for vec in (False, True):
            out = run_backward(emu, grad, state, go, in_place=in_place, vec=vec, grid=2)
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
    numel = 67  # a vector tail
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


@pytest.mark.parametrize("mode", MODES)
def test_perturbed_schedules_give_the_same_bits(emu, mode, request):
    """Warps held back after a __syncthreads while the others run ahead change nothing."""
    gen = seeded(request)
    _, x, t, vec = mode_inputs(mode, torch.float32, gen, rows=12, classes=40)

    def run():
        return run_forward(emu, x, t, vec=vec, grid=1, count_grid=1, gamma=GAMMA["2"], reduction="mean")

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
    """__shfl_sync(mask, v, src, width): lane src % width of the caller's width-segment."""
    out = torch.zeros(256, dtype=torch.int64)
    for src in (0, 1, 3, 7, 9, 31, 40):
        emu.check(emu.lib.emu_selftest_shuffle(3, src, width, out.data_ptr()))
        want = [1000 * b + (t - t % 32) + (t % 32) // width * width + src % width for b in range(2) for t in range(128)]
        assert out.tolist() == want, (width, src)


# ============================================================================ per-image normalizers


PER_IMAGE_CASES = [
    # (kind, logits shape as the kernel reads it, images, layout): packs straddle image boundaries where the
    # elements per image are not a multiple of VEC (7 x 5 = 35; 3 x 13 = 39).
    ("dense", (21, 5), 3, None),
    ("index", (21, 5), 3, None),
    ("index", (12, 13), 4, None),
    ("channels", (3, 5, 40), 3, "contiguous"),
    ("channels", (2, 19, 35), 2, "padded"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", PER_IMAGE_CASES, ids=lambda c: f"{c[0]}-{'x'.join(map(str, c[1]))}-img{c[2]}")
@pytest.mark.parametrize("gamma", ["2", "3.7", "flsd53"])
@pytest.mark.parametrize("vec", [False, True], ids=["scalar", "vec"])
def test_per_image_normalizers(emu, dtype, case, gamma, vec, request):
    """One normalizer per image (torchvision RetinaNet's per-image sum / max(1, num_fg) in one call): each
    image's summed loss divided by its own value, then added; the gradient scaled per image in the forward
    (folded for every dtype: reduction "mean", backward scale 1). Both compiled copies (gamma 2 and general),
    and a schedule."""
    kind_name, shape, images, layout = case
    gen = seeded(request)
    values = make_logits(shape, dtype, gen)
    if kind_name == "channels":
        x = channel_first(values, layout)
        target = torch.randint(0, shape[1] + 1, (shape[0], shape[2]), generator=gen)
        target[torch.rand(target.shape, generator=gen) < 0.2] = -1
        kind = INDEX_CHANNELS
    elif kind_name == "index":
        x = classes_last(values)
        target = torch.randint(0, shape[1] + 1, (shape[0],), generator=gen)
        target[torch.rand(target.shape, generator=gen) < 0.2] = -1
        kind = INDEX
    else:
        x = classes_last(values)
        target = make_dense_target(shape, dtype, gen)
        kind = DENSE_SAME
    if vec and refusal(kind, True, x, target) is not None:
        pytest.skip("the vector kernel does not apply to this layout")
    acc = acc_dtype(dtype)
    norms = (torch.rand(images, generator=gen, dtype=torch.float64) * 20 + 0.5).to(acc)
    fwd = run_forward(emu, x, target, vec=vec, grid=3, gamma=GAMMA[gamma], reduction="mean", ignore_index=-1,
                      fold=True, image_normalizer=norms)
    # The oracle: the reference in float64 on the kernel's values, with the 1-D normalizer over the images.
    xd = values.double()
    if kind_name == "channels":
        batched, t_ref = xd, target
        class_dim = 1
    else:
        batched = xd.reshape(images, shape[0] // images, shape[1])
        t_ref = target.reshape(images, -1) if kind_name == "index" else target.double().reshape(batched.shape)
        class_dim = -1
    xv = batched.clone().requires_grad_()
    g = GAMMA[gamma]
    ref_gamma = GammaSchedule(thresholds=g.thresholds, gammas=g.values + (g.gamma,)) if g.thresholds else g.gamma
    want = reference.sigmoid_focal_loss(xv, t_ref, alpha=0.25, gamma=ref_gamma, reduction="mean", ignore_index=-1,
                                        normalizer=norms.double(), class_dim=class_dim)
    (want_grad,) = torch.autograd.grad(want, xv)
    label = f"{request.node.name}"
    assert_close_scaled(fwd.loss.view, want.detach(), fwd.loss.view.dtype, f"{label}: loss")
    assert fwd.state[1].item() == 1.0, f"{label}: backward scale {fwd.state.tolist()}"
    assert_close_scaled(fwd.raw_grad, want_grad.reshape(fwd.raw_grad.shape), dtype, f"{label}: gradient")
