"""A short run of the fused softmax focal loss against the reference on the available device.

Prints the agreement (loss and gradient, against the float64 reference) and the
forward+backward time of each. The bench suite (bench/) is the place for real measurements.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import focal_cuda
from focal_cuda import reference


def _time_full_step(fn, x: torch.Tensor, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first run warms up
        x.grad = None
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x).backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", type=int, nargs="+", default=None, help="N C [d1 ...] (default: by device)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = args.shape or ([8, 19, 512, 1024] if device.type == "cuda" else [8, 19, 256, 512])
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(shape, generator=gen) * 3).to(device)
    target = torch.randint(0, shape[1], [shape[0], *shape[2:]], generator=gen).to(device)
    target[torch.rand(target.shape, generator=gen).to(device) < 0.05] = 255  # 5% ignored
    kwargs = dict(gamma=2.0, ignore_index=255, reduction="mean")
    print(f"focal_cuda {focal_cuda.__version__} on {device}: build {focal_cuda.build_info()}")
    print(f"softmax focal loss, input {tuple(shape)} float32, gamma=2, 5% ignored, mean")

    x = logits.clone().requires_grad_()
    loss = focal_cuda.softmax_focal_loss(x, target, **kwargs)
    loss.backward()
    x64 = logits.double().requires_grad_()
    loss64 = reference.softmax_focal_loss(x64, target, **kwargs)
    loss64.backward()
    loss_err = abs(loss.double().item() - loss64.item()) / max(abs(loss64.item()), 1e-30)
    grad_err = ((x.grad.double() - x64.grad).abs().max() / x64.grad.abs().max().clamp_min(1e-30)).item()
    print(f"agreement with the float64 reference: loss rel. error {loss_err:.2e}, gradient max rel. error {grad_err:.2e}")

    fused = _time_full_step(lambda t: focal_cuda.softmax_focal_loss(t, target, **kwargs), logits.clone().requires_grad_(), args.repeats)
    eager = _time_full_step(lambda t: reference.softmax_focal_loss(t, target, **kwargs), logits.clone().requires_grad_(), args.repeats)
    print(f"forward+backward, median of {args.repeats}: focal_cuda {fused * 1e3:.1f} ms, "
          f"reference eager {eager * 1e3:.1f} ms ({eager / fused:.2f}x)")


if __name__ == "__main__":
    main()
