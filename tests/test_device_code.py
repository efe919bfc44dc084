"""The device code stands on its own: plain CUDA C++ with no ATen/torch, no inline PTX, no CUB.

Compiles csrc/cuda/*.cuh with nothing but nvcc (warnings as errors) and checks ptxas's
report: no stack frame, no spills. Skipped when no CUDA toolkit is found.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICE_HEADERS = sorted((ROOT / "csrc" / "cuda").glob("*.cuh")) + [ROOT / "csrc" / "focal_loss_math.h"]


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME")
    if cuda_home and os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


@pytest.mark.parametrize("header", DEVICE_HEADERS, ids=lambda p: p.name)
def test_device_headers_are_portable_cuda(header: Path):
    text = header.read_text()
    includes = re.findall(r"#include\s*[<\"]([^>\"]+)[>\"]", text)
    assert includes, f"{header.name} includes nothing?"
    forbidden = [i for i in includes if i.split("/")[0] in ("ATen", "torch", "c10", "cub", "thrust", "cuda")]
    assert not forbidden, f"{header.name} includes {forbidden}"
    assert not re.search(r"\basm\b|__asm__", text), f"{header.name} has inline assembly"


def test_no_negative_power_in_the_math():
    text = (ROOT / "csrc" / "focal_loss_math.h").read_text()
    assert not re.search(r"gamma\s*-\s*1", re.sub(r"//.*", "", text)), "pow(x, gamma - 1) must not be evaluated"


@pytest.mark.parametrize("arch", ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "sm_120"])
def test_device_code_compiles_alone(arch: str, tmp_path: Path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("no CUDA toolkit (nvcc) found")
    result = subprocess.run(
        [nvcc, "-std=c++17", f"-arch={arch}", "--ftz=true", "-I", str(ROOT / "csrc"), "-Werror", "all-warnings",
         "-Xcompiler=-Wall,-Wextra", "--resource-usage", "-c", str(ROOT / "tests" / "cuda" / "standalone_kernels.cu"),
         "-o", str(tmp_path / "kernels.o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = result.stdout + result.stderr
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert len(frames) >= 20, f"expected a ptxas report per kernel, got {len(frames)}:\n{report[-2000:]}"
    assert all(f == ("0", "0", "0") for f in frames), f"stack frame or spills:\n{report}"
