"""Reads the built extension's CUDA machine code: one cubin per architecture, no spills, no local memory.

Needs no GPU, only a CUDA build of the extension (FORCE_CUDA=1) and cuobjdump (from the CUDA
toolkit, the `nvidia-cuda-cuobjdump` wheel, or the copy that triton ships).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import focal_cuda

INFO = focal_cuda.build_info()
pytestmark = pytest.mark.skipif(not INFO["cuda"], reason="extension built without CUDA kernels")


def _find_cuobjdump() -> str | None:
    candidates = [shutil.which("cuobjdump")]
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidates.append(os.path.join(cuda_home, "bin", "cuobjdump"))
    for path in sys.path:
        candidates.append(os.path.join(path, "nvidia", "cu13", "bin", "cuobjdump"))
        candidates.append(os.path.join(path, "nvidia", "cuda_cuobjdump", "bin", "cuobjdump"))
        candidates.append(os.path.join(path, "triton", "backends", "nvidia", "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


CUOBJDUMP = _find_cuobjdump()
LIBRARY = Path(focal_cuda._C.__file__)


def _run(*args: str) -> str:
    if CUOBJDUMP is None:
        pytest.fail("cuobjdump not found: install nvidia-cuda-cuobjdump or put the CUDA toolkit's bin on PATH")
    return subprocess.run([CUOBJDUMP, *args, str(LIBRARY)], check=True, capture_output=True, text=True).stdout


def _expected_sm_archs() -> set[str]:
    archs = set()
    for entry in INFO["cuda_arch_list"]:
        major, minor = entry.replace("+PTX", "").split(".")
        archs.add(f"sm_{major}{minor}")
    return archs


def test_machine_code_for_every_architecture():
    listed = set(re.findall(r"\.(sm_\d+a?)\.cubin", _run("--list-elf")))
    expected = _expected_sm_archs()
    assert expected, "build_info() lists no CUDA architecture"
    assert expected <= listed, f"cubins missing for {sorted(expected - listed)}; found {sorted(listed)}"


def test_ptx_for_forward_compatibility():
    if not any("+PTX" in a for a in INFO["cuda_arch_list"]):
        pytest.skip("built without +PTX")
    assert re.search(r"\.sm_\d+a?\.ptx", _run("--list-ptx")), "no PTX embedded for newer GPUs"


def _resource_usage() -> list[tuple[str, str, dict[str, int]]]:
    """(architecture, kernel, {REG, STACK, SHARED, LOCAL, ...}) for every focal_cuda kernel."""
    from focal_cuda import kernel_report

    return kernel_report.resource_usage(_run("--dump-resource-usage"))


def test_no_spills_and_no_local_memory():
    usage = _resource_usage()
    archs = {arch for arch, _, _ in usage}
    assert _expected_sm_archs() <= archs, f"resource usage missing for {sorted(_expected_sm_archs() - archs)}"
    kernels = {name for _, name, _ in usage}
    for needed in ("softmax_focal_loss_rows_kernel", "softmax_focal_loss_long_rows_kernel",
                   "softmax_focal_loss_channels_kernel", "softmax_focal_loss_positions_kernel",
                   "sigmoid_focal_loss_dense_kernel", "sigmoid_focal_loss_index_kernel",
                   "sigmoid_focal_loss_channels_kernel", "focal_loss_backward_kernel", "count_valid_targets_kernel"):
        assert any(needed in k for k in kernels), f"{needed} not found in the binary"
    offenders = [(arch, name, f) for arch, name, f in usage if f.get("STACK", 0) or f.get("LOCAL", 0)]
    assert not offenders, "kernels using stack or local memory (spills):\n" + "\n".join(
        f"{arch} {name} {f}" for arch, name, f in offenders)
    for arch, name, f in usage:
        assert "REG" in f, f"no register count parsed for {arch} {name}: {f}"
        assert f["REG"] <= 255


# ----------------------------------------------------------------------------- the static kernel report


@pytest.fixture(scope="module")
def report():
    from focal_cuda import kernel_report

    if CUOBJDUMP is None:
        pytest.fail("cuobjdump not found: install nvidia-cuda-cuobjdump or put the CUDA toolkit's bin on PATH")
    return kernel_report.collect(LIBRARY, CUOBJDUMP)


def test_kernel_report_runs(capsys):
    from focal_cuda import kernel_report

    assert kernel_report.main(["--arch", "sm_90"]) == 0
    out = capsys.readouterr().out
    assert "softmax_focal_loss_rows_kernel" in out and "warps/SM" in out


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_memory_bound_kernels_keep_half_the_warps_resident(report, arch):
    """At least 50% theoretical occupancy (32 of 64 warps) for every memory-bound kernel: 64 registers at
    256 threads (float64 kernels, a correctness dtype, take 128 and are exempt)."""
    from focal_cuda.kernel_report import memory_bound

    if arch not in _expected_sm_archs():
        pytest.skip(f"built without {arch}")
    rows = [k for k in report if k.arch == arch and memory_bound(k)]
    assert rows, f"no kernel found for {arch}"
    low = [f"{k.name}: {k.registers} registers, {k.resident_warps()} warps" for k in rows if k.occupancy() < 0.5]
    assert not low, "kernels below 50% theoretical occupancy:\n" + "\n".join(low)


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_streaming_kernels_move_16_bytes_per_access(report, arch):
    """The vector variants load and store 16 bytes per access (LDG.E.128 / STG.E.128 in the machine code)."""
    if arch not in _expected_sm_archs():
        pytest.skip(f"built without {arch}")
    vector_kernels = [k for k in report if k.arch == arch and (
        "rows_kernel" in k.name  # rows and long rows: always 16-byte vectors
        or re.search(r"(dense|index)_kernel<[^,]+(, [^,]+)?, (8|4|2)>", k.name)
        or re.search(r"backward_kernel<[^,]+, 256, (8|4|2)>", k.name))]
    assert len(vector_kernels) >= 20, [k.name for k in vector_kernels]
    narrow = [f"{k.name}: load {k.widest_load} B, store {k.widest_store} B" for k in vector_kernels
              if k.widest_load < 16 or k.widest_store < 16]
    assert not narrow, "vector kernels without 16-byte accesses:\n" + "\n".join(narrow)
