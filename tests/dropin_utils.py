"""The one comparison of the drop-in tests: an adapter's loss and gradient against the peer's own code."""

from __future__ import annotations

from typing import Callable

import torch

from conftest import assert_close_scaled, randn

# float64 against float64: the same formula, summed in another order.
FLOAT64_TOL = dict(rtol=1e-10, atol=1e-12)


def assert_matches_peer(fused: Callable[[torch.Tensor], torch.Tensor], peer: Callable[[torch.Tensor], torch.Tensor],
                        x: torch.Tensor, gen: torch.Generator, *, peer_dtype: torch.dtype = torch.float64,
                        tol: dict | None = None) -> torch.Tensor:
    """``fused(logits)`` against ``peer(logits)``: the loss, then the gradient for a random upstream gradient.

    The peer runs on a ``peer_dtype`` copy of the same values (float64 unless it computes in float32 itself),
    so a float32 adapter is compared with the peer's exact result at float32's own tolerance. Returns the
    adapter's loss.
    """
    x_fused = x.detach().clone().requires_grad_()
    loss = fused(x_fused)
    x_peer = x.detach().to(peer_dtype).requires_grad_()
    expected = peer(x_peer)
    assert loss.shape == expected.shape, f"loss shape {tuple(loss.shape)} != peer's {tuple(expected.shape)}"
    assert loss.dtype == x.dtype, f"loss dtype {loss.dtype} != logits dtype {x.dtype}"
    grad_output = randn(expected.shape, gen, dtype=torch.float64, device=x.device)
    (grad,) = torch.autograd.grad(loss, x_fused, grad_output.to(loss.dtype))
    (expected_grad,) = torch.autograd.grad(expected, x_peer, grad_output.to(expected.dtype))
    for name, actual, want in (("loss", loss, expected), ("grad", grad, expected_grad)):
        if tol is not None:
            torch.testing.assert_close(actual.detach().double(), want.detach().double(),
                                       msg=lambda m, name=name: f"{name}: {m}", **tol)
        elif x.dtype == torch.float64 and peer_dtype == torch.float64:
            torch.testing.assert_close(actual.detach(), want.detach(), msg=lambda m, name=name: f"{name}: {m}",
                                       **FLOAT64_TOL)
        else:
            assert_close_scaled(actual, want, x.dtype, name)
    return loss
