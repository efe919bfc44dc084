"""setup.py's checks, run as a user would (a subprocess in the source tree) but stopping before any compile:
`setup.py --name` and `egg_info` evaluate the extension's configuration and build nothing. A fake nvcc
(a shell script answering --version and --list-gpu-arch) stands in for a CUDA toolkit."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
needs_cuda_torch = pytest.mark.skipif(torch.version.cuda is None, reason="needs a torch built with CUDA")


def run_setup(args: list[str], env: dict[str, str], code: str = "") -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("FORCE_CUDA", "FORCE_CPU", "TORCH_CUDA_ARCH_LIST")}
    full_env.update(env)
    argv = [sys.executable, "-c", code + "import sys; sys.argv = ['setup.py', *sys.argv[1:]]; "
            "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__file__': 'setup.py', '__name__': '__main__'})",
            *args]
    return subprocess.run(argv, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def fake_toolkit(tmp_path: Path, release: str, arches: list[str]) -> str:
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    listing = "\\n".join(f"compute_{a.replace('.', '')}" for a in arches)
    nvcc.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f'  --version) echo "Cuda compilation tools, release {release}, V{release}.1";;\n'
        f'  --list-gpu-arch) printf "{listing}\\n";;\n'
        "esac\n"
    )
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return str(tmp_path)


@needs_cuda_torch
def test_cuda_major_mismatch_stops_the_build_first(tmp_path):
    major = int(torch.version.cuda.split(".")[0])
    home = fake_toolkit(tmp_path, f"{major + 1}.0", ["7.5", "9.0"])
    out = run_setup(["--name"], {"FORCE_CUDA": "1", "CUDA_HOME": home})
    assert out.returncode != 0
    message = f"torch {torch.__version__} is built with CUDA {torch.version.cuda}, but the CUDA toolkit at {home}"
    assert message in out.stderr and f"is CUDA {major + 1}.0" in out.stderr, out.stderr
    assert "FORCE_CPU=1" in out.stderr
    assert "focal_cuda" not in out.stdout  # nothing else came first


@needs_cuda_torch
def test_default_arch_list_keeps_what_nvcc_knows(tmp_path):
    home = fake_toolkit(tmp_path, torch.version.cuda, ["7.5", "8.0", "8.6", "8.9", "9.0"])
    out = run_setup(["--name"], {"FORCE_CUDA": "1", "CUDA_HOME": home})
    assert out.returncode == 0, out.stderr
    assert f"TORCH_CUDA_ARCH_LIST=7.5;8.0;8.6;8.9;9.0+PTX with {home} (nvcc {torch.version.cuda}," in out.stdout


def test_build_without_torch_says_no_build_isolation():
    """What pip's isolated build environment (no torch in it) gets when --no-build-isolation is forgotten."""
    out = run_setup(["--name"], {}, code="import sys; sys.modules['torch'] = None; ")
    assert out.returncode != 0
    assert "cannot import torch" in out.stderr and "pip install --no-build-isolation" in out.stderr, out.stderr


def test_package_requires_the_torch_it_is_built_with(tmp_path):
    out = run_setup(["egg_info", "--egg-base", str(tmp_path)], {"FORCE_CPU": "1"})
    assert out.returncode == 0, out.stderr
    (requires,) = tmp_path.glob("*.egg-info/requires.txt")
    assert requires.read_text().split() == [f"torch=={torch.__version__.split('+')[0]}"]


def test_pyproject_build_requirements_have_no_torch():
    """An isolated build must not fetch a torch to build against (the newest, not the user's)."""
    (requires,) = re.findall(r"^requires = (\[.*\])$", (ROOT / "pyproject.toml").read_text(), flags=re.M)
    assert "setuptools" in requires and not re.search(r"\btorch\b", requires), requires
