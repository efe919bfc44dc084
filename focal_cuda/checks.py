"""Opt-in checks that cost a host synchronisation, off by default."""

from __future__ import annotations

import contextlib
from typing import Iterator

from . import _C

__all__ = ["cuda_target_checks", "set_cuda_target_checks", "cuda_target_checks_enabled"]


def set_cuda_target_checks(enabled: bool) -> None:
    """Turn the check of class-index targets on CUDA on or off, for every thread of the process.

    Off (the default), the CUDA kernels read targets without a host synchronisation and an out-of-range
    class index (neither a class, nor background for the sigmoid loss, nor ``ignore_index``) gives a NaN
    loss and gradient for its position. On, each call first checks its targets on the device and waits
    for the answer, raising ``IndexError`` that names the bad value and its flat position before any
    output is written: a debugging mode, like ``CUDA_LAUNCH_BLOCKING=1``. CPU tensors are always checked.
    """
    _C.set_cuda_target_checks(bool(enabled))


def cuda_target_checks_enabled() -> bool:
    """Whether the CUDA target check is on (:func:`set_cuda_target_checks`)."""
    return bool(_C.cuda_target_checks_enabled())


@contextlib.contextmanager
def cuda_target_checks(enabled: bool = True) -> Iterator[None]:
    """The CUDA target check on (or off) inside a ``with`` block, restored after it::

        with focal_cuda.cuda_target_checks():
            loss = focal_cuda.softmax_focal_loss(logits, target)  # IndexError on a bad class index
    """
    previous = cuda_target_checks_enabled()
    set_cuda_target_checks(enabled)
    try:
        yield
    finally:
        set_cuda_target_checks(previous)
