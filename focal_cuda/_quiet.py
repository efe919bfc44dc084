"""Keeps the project's own scripts (the bench suite, the examples) free of a torch notice that does not apply
on a machine without a GPU. Used by those scripts only: importing focal_cuda changes no logging."""

from __future__ import annotations

import logging

import torch

_CPP_EXTENSION_LOGGER = "torch.utils.cpp_extension"
_NO_CUDA_RUNTIME = "No CUDA runtime is found"


class _DropNoCudaRuntime(logging.Filter):
    """torch.utils.cpp_extension warns on import (torch.compile imports it) that a CUDA toolkit was found but
    no GPU: true, and nothing to act on when running on the CPU."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_NO_CUDA_RUNTIME)


def quiet_cpu_only_notices() -> None:
    if torch.cuda.is_available():
        return
    logger = logging.getLogger(_CPP_EXTENSION_LOGGER)
    if not any(isinstance(f, _DropNoCudaRuntime) for f in logger.filters):
        logger.addFilter(_DropNoCudaRuntime())
