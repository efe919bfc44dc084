"""Build focal_cuda's C++/CUDA extension with torch.utils.cpp_extension.

The extension is compiled against the torch installed in this environment, and only runs with that
torch: build with `pip install --no-build-isolation .` (or `-e .`). Supported: torch 2.4 to 2.15.

CUDA kernels are built when torch has CUDA and a toolkit is found (CUDA_HOME),
or when FORCE_CUDA=1 (a GPU-less build host); the toolkit's nvcc must have torch's
CUDA major version. FORCE_CPU=1 builds the CPU kernels only. TORCH_CUDA_ARCH_LIST
is honoured; without it and without a visible GPU the default covers sm_75 to
sm_120 plus PTX, less what this torch or nvcc does not know. MAX_JOBS bounds the
parallel compile jobs (ninja).
"""

import glob
import os
import re
import subprocess
import sys

try:
    import torch
except ImportError:
    # pip's isolated build environment has no torch (pyproject.toml does not ask for one, so that
    # pip cannot fetch the newest torch there and build against it).
    sys.exit(
        "focal_cuda: cannot import torch in the build environment. focal_cuda is compiled against the torch it "
        "runs with, so it must be built in your environment: install torch, then\n"
        "    pip install --no-build-isolation .      (or: pip install --no-build-isolation -e .)\n"
        "Without --no-build-isolation, pip builds in a fresh environment that has no torch."
    )
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
# register_fake / register_autograd (torch.library) first appear in 2.4; 2.15 is the newest tested.
MIN_TORCH = (2, 4)
TORCH_VERSION = torch.__version__
TORCH_RELEASE = TORCH_VERSION.split("+")[0]


def _check_torch() -> None:
    found = tuple(int(v) for v in re.findall(r"\d+", TORCH_RELEASE)[:2])
    if found < MIN_TORCH:
        sys.exit(f"focal_cuda: needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (torch.library.register_fake / "
                 f"register_autograd), found torch {TORCH_VERSION}")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    if _env_flag("FORCE_CPU"):
        return False
    if _env_flag("FORCE_CUDA"):
        if torch.version.cuda is None:
            sys.exit("focal_cuda: FORCE_CUDA=1 but this torch has no CUDA support (torch.version.cuda is None)")
        if CUDA_HOME is None:
            sys.exit("focal_cuda: FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


def _nvcc() -> str:
    return os.path.join(CUDA_HOME, "bin", "nvcc")


def _nvcc_version() -> str:
    """The toolkit's CUDA version, "13.0", from `nvcc --version`."""
    try:
        out = subprocess.run([_nvcc(), "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"focal_cuda: cannot run {_nvcc()} --version ({e}): set CUDA_HOME to a CUDA toolkit, or FORCE_CPU=1")
    match = re.search(r"release (\d+)\.(\d+)", out)
    if match is None:
        sys.exit(f"focal_cuda: cannot read the CUDA version from `{_nvcc()} --version`:\n{out}")
    return f"{match.group(1)}.{match.group(2)}"


def _check_cuda_major(nvcc_version: str) -> None:
    # Checked before anything is compiled (and before pip's own steps), so that this is the first error shown.
    if nvcc_version.split(".")[0] != torch.version.cuda.split(".")[0]:
        sys.exit(
            f"focal_cuda: cannot build the CUDA kernels: torch {TORCH_VERSION} is built with CUDA "
            f"{torch.version.cuda}, but the CUDA toolkit at {CUDA_HOME} (nvcc) is CUDA {nvcc_version}; the major "
            f"versions must match. Install a torch built for CUDA {nvcc_version.split('.')[0]}.x, point CUDA_HOME "
            f"at a CUDA {torch.version.cuda.split('.')[0]}.x toolkit, or build the CPU kernels only with FORCE_CPU=1."
        )


def _known_arch(arch: str, nvcc_arches: set) -> bool:
    """Whether nvcc and this torch's cpp_extension both accept `arch` ("9.0", "12.0+PTX")."""
    base = arch.split("+")[0]
    if nvcc_arches and base.replace(".", "") not in nvcc_arches:
        return False
    try:  # cpp_extension's own check (private, present in every supported torch), which raises on unknown arches
        from torch.utils.cpp_extension import _get_cuda_arch_flags
    except ImportError:
        return True
    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = base
    try:
        _get_cuda_arch_flags()
        return True
    except ValueError:
        return False
    finally:
        if saved is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def _default_arch_list() -> str:
    """DEFAULT_CUDA_ARCH_LIST less the architectures this nvcc or torch does not know (sm_100 / sm_120 need
    CUDA 12.8 and torch 2.7), PTX for the newest one left."""
    try:
        out = subprocess.run([_nvcc(), "--list-gpu-arch"], capture_output=True, text=True, check=True).stdout
        nvcc_arches = set(re.findall(r"compute_(\d+)", out))
    except (OSError, subprocess.CalledProcessError):
        nvcc_arches = set()
    arches = [a.split("+")[0] for a in DEFAULT_CUDA_ARCH_LIST.split(";")]
    known = [a for a in arches if _known_arch(a, nvcc_arches)]
    if not known:
        sys.exit(f"focal_cuda: neither of {DEFAULT_CUDA_ARCH_LIST} is known to both {_nvcc()} and torch "
                 f"{TORCH_VERSION}: set TORCH_CUDA_ARCH_LIST")
    known[-1] += "+PTX"
    return ";".join(known)


def _warn_cpu_only_wheel() -> None:
    """pip shows a build's output only with -v or on failure, so a wheel built on a machine without a visible GPU
    would silently lack the CUDA kernels: say so on the terminal itself when building a wheel (pip wheel,
    pip install .), and in the build log."""
    if "bdist_wheel" not in sys.argv:
        return
    if torch.version.cuda is None:
        reason = f"this torch ({torch.__version__}) has no CUDA support"
    elif CUDA_HOME is None:
        reason = "no CUDA toolkit was found (set CUDA_HOME)"
    else:
        reason = f"no GPU is visible and FORCE_CUDA is not set (CUDA_HOME={CUDA_HOME})"
    message = (
        f"\nfocal_cuda: WARNING: this wheel has NO CUDA kernels (CPU only): {reason}. For GPU machines build with "
        "FORCE_CUDA=1 (CUDA_HOME, TORCH_CUDA_ARCH_LIST as needed); FORCE_CPU=1 says a CPU-only build is intended.\n"
    )
    print(message, file=sys.stderr)
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(message)
    except OSError:  # no terminal (CI): the build log has it
        pass


def _cuda_arch_list() -> str:
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch_list:
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            arch_list = ";".join(f"{major}.{minor}" for major, minor in caps)
        else:
            arch_list = _default_arch_list()
        # cpp_extension reads the list from the environment.
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    return arch_list


def _nvidia_wheel_include_flags() -> list[str]:
    # Torch's CUDA headers include cuBLAS/cuSPARSE headers that a minimal toolkit
    # lacks; the nvidia wheels torch depends on ship them: nvidia/cu13/include for
    # CUDA 13 and later, one nvidia/<library>/include per library for CUDA 12.
    # -isystem puts them after the toolkit's own include directory, so they only fill the gaps.
    major = torch.version.cuda.split(".")[0]
    dirs = set()
    for path in sys.path:
        found = glob.glob(os.path.join(path, "nvidia", f"cu{major}", "include"))
        if not found and int(major) < 13:
            found = glob.glob(os.path.join(path, "nvidia", "*", "include"))
        dirs.update(found)
    return [flag for d in sorted(dirs) for flag in ("-isystem", d)]


def _extension(build: dict):
    """The extension; `build` receives what it is compiled with (focal_cuda/_build_info.py)."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    defines = [("FOCAL_CUDA_TORCH_VERSION", f'"{TORCH_VERSION}"')]
    build.update(torch_version=TORCH_VERSION, cuda=False, cuda_version=None, cuda_arch_list="")
    cxx_flags = ["-O3", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas"]
    link_flags = []
    if torch.__config__.parallel_info().find("parallel backend: OpenMP") >= 0:
        # at::parallel_for is an OpenMP pragma in ATen's headers: without -fopenmp it runs on one
        # thread. Linked by soname, the runtime is the libgomp torch has already loaded.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not _want_cuda():
        print("focal_cuda: building the CPU kernels only (no CUDA: set FORCE_CUDA=1 to build them anyway)")
        if not _env_flag("FORCE_CPU"):
            _warn_cpu_only_wheel()
        defines.append(("FOCAL_CUDA_BUILT_WITH_CUDA", "0"))
        return CppExtension(
            "focal_cuda._C", sources, include_dirs=include_dirs, define_macros=defines,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
        )
    nvcc_version = _nvcc_version()
    _check_cuda_major(nvcc_version)
    arch_list = _cuda_arch_list()
    print(f"focal_cuda: building the CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST={arch_list} with {CUDA_HOME} "
          f"(nvcc {nvcc_version}, torch {TORCH_VERSION})")
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    defines += [
        ("FOCAL_CUDA_BUILT_WITH_CUDA", "1"),
        ("FOCAL_CUDA_ARCH_LIST", f'"{arch_list}"'),
        # The compiler's version, which may differ from torch.version.cuda in the minor.
        ("FOCAL_CUDA_CUDA_VERSION", f'"{nvcc_version}"'),
    ]
    build.update(cuda=True, cuda_version=nvcc_version, cuda_arch_list=arch_list)
    nvcc_flags = [
        # --ftz=true: float32 results below 2^-126 flush to zero, so that __expf is one MUFU.EX2 (without
        # it, each exp carries a denormal fix-up of three instructions); docs/design.md, numerics.
        "-O3", "--expt-relaxed-constexpr", "-lineinfo", "--ftz=true",
        # Warnings are errors for the device code: host-compiler and nvcc diagnostics alike.
        "-Werror=all-warnings", "-Xcompiler=-Wall",
        # Keep half / bfloat16 operators available; torch's flags turn them off.
        "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
    ]
    wheel_includes = _nvidia_wheel_include_flags()
    return CUDAExtension(
        "focal_cuda._C", sources, include_dirs=include_dirs, define_macros=defines,
        extra_compile_args={"cxx": cxx_flags + wheel_includes, "nvcc": nvcc_flags + wheel_includes},
        extra_link_args=link_flags,
    )


BUILD_INFO: dict = {}


class BuildExtensionWithInfo(BuildExtension):
    """Writes focal_cuda/_build_info.py beside the compiled library: what it was built with, which
    focal_cuda/__init__.py checks against the running torch before loading the library."""

    def run(self):
        super().run()
        text = (
            '"""Written by setup.py when the extension is built: what focal_cuda._C was compiled with."""\n\n'
            + "".join(f"{key.upper()} = {value!r}\n" for key, value in BUILD_INFO.items())
        )
        targets = {os.path.dirname(self.get_ext_fullpath("focal_cuda._C"))}
        if self.inplace or getattr(self, "editable_mode", False):
            targets.add(os.path.join(ROOT, "focal_cuda"))  # where the library is copied for in-place imports
        for directory in targets:
            os.makedirs(directory, exist_ok=True)
            with open(os.path.join(directory, "_build_info.py"), "w") as f:
                f.write(text)


_check_torch()
setup(
    name="focal_cuda",
    version="0.1.0",
    description="Fused focal loss (softmax and sigmoid) for PyTorch: CPU and CUDA kernels in one pass",
    packages=find_packages(include=["focal_cuda", "focal_cuda.*"]),
    ext_modules=[_extension(BUILD_INFO)],
    cmdclass={"build_ext": BuildExtensionWithInfo},
    python_requires=">=3.10",
    # The library only loads into the torch it was compiled against: pip must not replace that torch.
    install_requires=[f"torch=={TORCH_RELEASE}"],
)
