"""Shared fixtures and helpers for the focal_cuda tests.

Every test gets a ``device`` ("cpu" always, "cuda" skipped without a GPU) and a
``gen``: a CPU generator seeded from the test's id, so inputs are fresh per test
yet reproducible, and identical on CPU and CUDA (values are drawn on the CPU in
float64 and then moved / rounded).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any, Optional

import pytest
import torch

import focal_cuda
from focal_cuda import reference

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device"))]
FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
REDUCTIONS = ["none", "mean", "sum"]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def gen(request) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(autouse=True)
def ieee_subnormals():
    """Subnormal numbers as IEEE 754 says, in every test. Older torch (seen on 2.4.1) compiles inductor's CPU
    kernels with -ffast-math, and gcc < 13 then links them with crtfastmath.o, whose constructor turns on
    flush-to-zero / denormals-are-zero in the thread that loads them, for the rest of the process. After any
    inductor test, later tests would see subnormal results flushed to 0, and hypothesis refuses to draw floats
    ("we can't represent subnormal floats right now"). torch.set_flush_denormal(False) turns both modes off."""
    torch.set_flush_denormal(False)
    yield


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """Every tensor allocated with empty() starts as NaN (integers: their max), including the
    kernels' output buffers: torch's deterministic mode fills uninitialized memory. An element a
    kernel forgets to write then fails the comparison with the reference. warn_only keeps the
    reference's nondeterministic CUDA backward ops (scatter_add) usable."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.utils.deterministic.fill_uninitialized_memory = fill


# ----------------------------------------------------------------------------- inputs


def randn(shape: Sequence[int], gen: torch.Generator, *, dtype=torch.float32, device="cpu", scale=1.0) -> torch.Tensor:
    """Standard normal values drawn on the CPU in float64, then rounded to ``dtype`` on ``device``."""
    return (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def make_target(
    input_shape: Sequence[int],
    gen: torch.Generator,
    *,
    device="cpu",
    dtype=torch.int64,
    ignore_index: int = -100,
    ignore_frac: float = 0.0,
) -> torch.Tensor:
    """Random class indices of shape (N, d1..dk) for logits (N, C, d1..dk), a fraction set to ``ignore_index``."""
    shape = (input_shape[0], *input_shape[2:])
    t = torch.randint(0, input_shape[1], shape, generator=gen, dtype=torch.int64)
    if ignore_frac > 0:
        mask = torch.rand(shape, generator=gen) < ignore_frac
        t = torch.where(mask, torch.full_like(t, ignore_index), t)
    return t.to(dtype=dtype, device=device)


def make_alpha(kind: Optional[str], num_classes: int, gen: torch.Generator, device="cpu") -> Any:
    """alpha of the given kind: None, "float", "list" (python floats) or "tensor" (1-D float32 tensor)."""
    if kind is None:
        return None
    if kind == "float":
        return 0.25
    weights = torch.rand(num_classes, generator=gen, dtype=torch.float64) * 2 + 0.1
    if kind == "list":
        return weights.tolist()
    if kind == "tensor":
        return weights.to(dtype=torch.float32, device=device)
    raise ValueError(kind)


def alpha_as_float64(alpha: Any) -> Any:
    """The same alpha for the float64 reference (a float32 tensor upcast, values unchanged)."""
    if isinstance(alpha, torch.Tensor):
        return alpha.detach().double()
    return alpha


# ----------------------------------------------------------------------------- tolerances

# Multiples of the dtype's eps. float16 / bfloat16 results are an accurate float32
# value rounded once (twice for a gradient scaled in backward): about one eps.
_EPS_MULT = {torch.float64: 256.0, torch.float32: 64.0, torch.bfloat16: 2.0, torch.float16: 2.0}


def tolerances(dtype: torch.dtype, scale: float) -> dict:
    """rtol / atol for comparing a ``dtype`` result with a float64 reference whose magnitude is ``scale``."""
    eps = torch.finfo(dtype).eps
    tol = _EPS_MULT[dtype] * eps
    # float16 gradients may land in the subnormal range, spaced 2**-24 apart.
    floor = 4.0 * 2.0**-24 if dtype == torch.float16 else 4.0 * torch.finfo(dtype).smallest_normal
    return dict(rtol=tol, atol=max(tol * scale, floor))


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "", atol_floor: float = 0.0
) -> None:
    """Compares ``actual`` (a ``dtype`` result) with a float64 ``expected``, NaN-safe, tolerance from the dtype.

    ``atol_floor``: an absolute error the computation's own conditioning allows (see loss_atol_floor).
    """
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.detach().abs().max()) if finite.numel() else 1.0
    tol = tolerances(dtype, scale)
    tol["atol"] = max(tol["atol"], atol_floor)
    torch.testing.assert_close(
        actual.detach().cpu().double(),
        expected.detach().cpu().double(),
        equal_nan=True,
        msg=lambda m: f"{msg}\n{m}",
        **tol,
    )


def conditioning_floor(
    input: torch.Tensor,
    target: torch.Tensor,
    alpha: Any,
    ignore_index: int,
    reduction: str,
    *,
    grad_output: Optional[torch.Tensor] = None,
    gamma: float = 2.0,
) -> float:
    """Absolute error inherent to log-softmax in the compute precision.

    log p_y = x_y - logsumexp(x) loses about eps * max|x| in absolute terms (PyTorch's own
    log_softmax does too), so a loss much smaller than that (p_y ~ 1), and 1 - p_y in the
    gradient, are only known to that absolute accuracy. For the loss (grad_output None): scaled
    by the largest weight and, for "sum", by the number of terms. For the gradient: by the
    largest weight, |grad_output|, the focal factor's bound 1 + gamma, and 1 / count for "mean".
    """
    acc = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.detach()
    finite = x[torch.isfinite(x)]
    x_max = float(finite.abs().max().double()) if finite.numel() else 0.0
    if alpha is None:
        alpha_max = 1.0
    elif isinstance(alpha, (int, float)):
        alpha_max = abs(float(alpha))
    else:
        a = torch.as_tensor(alpha, dtype=torch.float64)
        alpha_max = float(a.abs().max()) if a.numel() else 1.0
    floor = _EPS_MULT[acc] * torch.finfo(acc).eps * (x_max + 1.0) * alpha_max
    count = max(1, int((target != ignore_index).sum()))
    if grad_output is None:
        return floor * count if reduction == "sum" else floor
    go = grad_output.detach()
    go_max = float(go.abs().max().double()) if go.numel() else 0.0
    floor *= go_max * (1.0 + gamma)
    return floor / count if reduction == "mean" else floor


# ----------------------------------------------------------------------------- the comparison


def fused_loss_and_grad(input: torch.Tensor, target: torch.Tensor, grad_output: Optional[torch.Tensor], **kwargs):
    """Fused loss and d(loss . grad_output)/d(input) for a fresh leaf with ``input``'s values and strides."""
    x = input.detach().requires_grad_()
    loss = focal_cuda.softmax_focal_loss(x, target, **kwargs)
    if grad_output is None:
        return loss, None
    (grad,) = torch.autograd.grad(loss, x, grad_output)
    return loss, grad


def reference_loss_and_grad(input: torch.Tensor, target: torch.Tensor, grad_output: Optional[torch.Tensor], **kwargs):
    """The float64 reference on the same (already rounded) values, with its autograd gradient."""
    kwargs = dict(kwargs)
    kwargs["alpha"] = alpha_as_float64(kwargs.get("alpha"))
    x = input.detach().double().requires_grad_()
    loss = reference.softmax_focal_loss(x, target, **kwargs)
    if grad_output is None:
        return loss, None
    (grad,) = torch.autograd.grad(loss, x, grad_output.double())
    return loss, grad


def random_grad_output(loss_shape: Sequence[int], gen: torch.Generator, dtype, device) -> torch.Tensor:
    """A random upstream gradient: per element for "none", a scalar for "sum" / "mean"."""
    return randn(loss_shape, gen, dtype=dtype, device=device)


def assert_close_to_reference(
    input: torch.Tensor,
    target: torch.Tensor,
    gen: Optional[torch.Generator] = None,
    *,
    grad: bool = True,
    grad_output: Optional[torch.Tensor] = None,
    **kwargs,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The one comparison of the suite: fused loss (and gradient) against the float64 reference.

    ``kwargs`` are softmax_focal_loss's (gamma, alpha, ignore_index, reduction). With ``grad``
    the gradient is taken for ``grad_output`` (random from ``gen`` when not given). Every element
    is compared (NaN where the reference has NaN), so an element the kernel never wrote fails.
    Returns the fused (loss, grad).
    """
    dtype = input.dtype
    reduction = kwargs.get("reduction", "mean")
    if grad and grad_output is None:
        shape = target.shape if reduction == "none" else ()
        grad_output = random_grad_output(shape, gen, dtype, input.device)
    loss, g = fused_loss_and_grad(input, target, grad_output if grad else None, **kwargs)
    ref_loss, ref_g = reference_loss_and_grad(input, target, grad_output if grad else None, **kwargs)
    assert loss.dtype == dtype, f"loss dtype {loss.dtype} != input dtype {dtype}"
    assert loss.device == input.device
    floor_args = (input, target, kwargs.get("alpha"), kwargs.get("ignore_index", -100), reduction)
    assert_close_scaled(loss, ref_loss, dtype, f"loss {kwargs}", atol_floor=conditioning_floor(*floor_args))
    if grad:
        assert g.dtype == dtype and g.shape == input.shape
        if torch.isnan(ref_g).any():
            # autograd through (1-p)**gamma is NaN where p == 1 exactly and gamma < 1: use the closed form there
            cf = closed_form_grad(input, target, grad_output=grad_output, **kwargs)
            ref_g = torch.where(torch.isnan(ref_g) & torch.isfinite(cf), cf, ref_g)
        floor = conditioning_floor(*floor_args, grad_output=grad_output, gamma=kwargs.get("gamma", 2.0))
        assert_close_scaled(g, ref_g, dtype, f"grad {kwargs}", atol_floor=floor)
    return loss, g


def closed_form_grad(
    input: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: Any = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    grad_output: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """d (loss . grad_output) / d input in float64 without autograd, finite at saturated logits for every gamma >= 0.

    dL/dx_j = alpha_y F (p_j - [j == y]), F = (1-p)^gamma (1 - gamma p log(p) / (1-p)), p = p_y,
    with log(p)/(1-p) -> -1 as p -> 1 (no negative power is evaluated).
    """
    x = input.detach().double()
    t = target.long()
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    logp = torch.log_softmax(x, dim=1)
    p_all = logp.exp()
    logp_t = logp.gather(1, safe.unsqueeze(1)).squeeze(1)
    q = -torch.expm1(logp_t)
    p = logp_t.exp()
    ratio = torch.where(q > 0, logp_t / torch.where(q > 0, q, torch.ones_like(q)), -torch.ones_like(q))
    modulating = torch.ones_like(q) if gamma == 0 else q**gamma
    coef = modulating * (1 - gamma * p * ratio)
    if isinstance(alpha, torch.Tensor) and alpha.dim() == 0:
        alpha = float(alpha)
    if isinstance(alpha, (int, float)):
        coef = coef * float(alpha)
    elif alpha is not None:
        coef = coef * torch.as_tensor(alpha, dtype=torch.float64, device=x.device)[safe]
    coef = torch.where(valid, coef, torch.zeros_like(coef))
    if grad_output is not None:
        coef = coef * grad_output.double()
    if reduction == "mean":
        coef = coef / valid.sum().clamp(min=1)
    onehot = torch.zeros_like(x).scatter_(1, safe.unsqueeze(1), 1.0)
    return coef.unsqueeze(1) * (p_all - onehot)
