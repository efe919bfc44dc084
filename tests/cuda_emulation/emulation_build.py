"""Building and loading emulated_kernels.cpp, shared by the emulation tests.

tests/test_cuda_kernels_emulated.py (softmax) and tests/test_sigmoid_kernels_emulated.py (sigmoid) both load
the one shared library built from emulated_kernels.cpp with the host compiler; it is built once per pytest
session, whichever file asks first. Also the NaN-guarded output buffers both files use.
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
EMULATION_DIR = ROOT / "tests" / "cuda_emulation"
# The device code under test; another checkout's csrc (e.g. a deliberately broken copy) can be named here.
CSRC = Path(os.environ.get("FOCAL_CUDA_EMULATION_CSRC", ROOT / "csrc"))

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
TARGET_KIND = {torch.uint8: 0, torch.int16: 1, torch.int32: 2, torch.int64: 3}
REDUCTION_CODE = {"none": 0, "mean": 1, "sum": 2}


def cuda_include() -> Optional[Path]:
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "include")
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parents[1] / "include")
    candidates += [Path(p) for p in sorted(glob.glob("/usr/local/cuda*/include"), reverse=True)]
    needed = ("cuda_fp16.h", "cuda_bf16.h", "vector_types.h")
    return next((c for c in candidates if all((c / h).is_file() for h in needed)), None)


_built: dict = {}


def load_library(tmp_path_factory) -> ctypes.CDLL:
    """emulated_kernels.cpp built with g++ (once per session) and loaded; skips without g++ or CUDA headers."""
    if "lib" in _built:
        return _built["lib"]
    compiler = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    if compiler is None:
        pytest.skip("no g++ to build the CUDA emulation")
    include = cuda_include()
    if include is None:
        pytest.skip("CUDA headers (cuda_fp16.h, cuda_bf16.h) not found")
    out = tmp_path_factory.mktemp("cuda_emulation") / "emulated_kernels.so"
    cmd = [compiler, "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-fno-strict-aliasing", "-Wall", "-Wextra",
           "-Wno-unknown-pragmas", "-I", str(CSRC), "-I", str(EMULATION_DIR), "-I", str(include),
           str(EMULATION_DIR / "emulated_kernels.cpp"), "-o", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, f"building the emulation failed:\n{' '.join(cmd)}\n{result.stderr}"
    lib = ctypes.CDLL(str(out))
    lib.emu_last_error.restype = ctypes.c_char_p
    _built["lib"] = lib
    return lib


# ============================================================================ buffers


PAD = 64  # guard elements on each side (keeps 16-byte alignment for every dtype)


class Guarded:
    """A strided view inside a storage filled with ``fill``; ``untouched()``: nothing outside the view was written.

    ``offset``: the view starts that many elements past a 16-byte boundary (a misaligned base, as a slice of a
    larger tensor has)."""

    def __init__(self, shape, strides, dtype, fill=float("nan"), offset: int = 0):
        extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides)) if all(n > 0 for n in shape) else 0
        self.storage = torch.full((2 * PAD + offset + extent,), fill, dtype=dtype)
        self.view = self.storage.as_strided(tuple(shape), tuple(strides), PAD + offset)
        inside = torch.zeros(self.storage.shape, dtype=torch.bool)
        inside.as_strided(tuple(shape), tuple(strides), PAD + offset).fill_(True)
        self.outside = ~inside
        assert (self.view.data_ptr() - offset * self.storage.element_size()) % 16 == 0

    def untouched(self) -> bool:
        return bool(torch.isnan(self.storage[self.outside].double()).all())


def bits(t: torch.Tensor) -> torch.Tensor:
    integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(integer)
