"""Timing of one provider in one mode: warm-up, then repetitions; median and 20/80 quantiles (ms)."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

MODES = ("forward", "backward", "full")


def quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    s = sorted(samples)
    pick = lambda q: s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]  # noqa: E731
    return statistics.median(s), pick(0.2), pick(0.8)


class _Clock:
    """Wall clock on the CPU; CUDA events (no host sync inside the timed region) on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, begin) -> float:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            end.synchronize()
            return begin.elapsed_time(end)
        return (time.perf_counter() - begin) * 1e3


def _repeat(run_once: Callable, inputs, device: torch.device, warmup: int, reps: int) -> list[float]:
    """run_once(x, t, clock) -> ms, over the rotating inputs; the warm-up runs are dropped."""
    clock = _Clock(device)
    samples = []
    for i in range(warmup + reps):
        x, t = inputs[i % len(inputs)]
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = run_once(x, t, clock)
        if i >= warmup:
            samples.append(elapsed)
    return samples


def time_step(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], inputs: Sequence[tuple[torch.Tensor, torch.Tensor]],
              mode: str, device: torch.device, warmup: int, reps: int) -> list[float]:
    """fn(logits, targets) -> loss. forward: the loss of a training step (logits require grad: focal_cuda
    computes its gradient here); backward: loss.backward() alone; full: both. `inputs` rotate, so that on a
    GPU the L2 cache does not hold the previous repetition's data."""

    def run_once(x, t, clock) -> float:
        leaf = x.detach().requires_grad_()
        if mode == "backward":
            loss = fn(leaf, t)
            if device.type == "cuda":
                torch.cuda.synchronize()
            begin = clock.start()
            loss.backward()
            return clock.stop(begin)
        begin = clock.start()
        loss = fn(leaf, t)
        if mode == "full":
            loss.backward()
        return clock.stop(begin)

    return _repeat(run_once, inputs, device, warmup, reps)


def time_copy_floor(inputs, device: torch.device, warmup: int, reps: int, allocate: bool = False) -> list[float]:
    """The memory floor: the logits read once and written once, by a copy into memory allocated (and written)
    before the timing, so the same shape always measures the same work. ``allocate``: the copy into
    a new tensor, ``torch.empty_like(x).copy_(x)``, which on the CPU also pays for mapping and zeroing fresh
    pages whenever the allocator returns them (glibc maps allocations above its mmap threshold afresh)."""
    destinations = {} if allocate else {id(x): x.clone() for x, _ in inputs}  # allocated and touched

    def run_once(x, _t, clock) -> float:
        begin = clock.start()
        copy = torch.empty_like(x).copy_(x) if allocate else destinations[id(x)].copy_(x)
        elapsed = clock.stop(begin)
        del copy  # freed outside the timed region
        return elapsed

    return _repeat(run_once, inputs, device, warmup, reps)
