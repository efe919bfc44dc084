"""Build focal_cuda's C++/CUDA extension with torch.utils.cpp_extension.

CUDA kernels are built when torch has CUDA and a toolkit is found (CUDA_HOME),
or when FORCE_CUDA=1 (a GPU-less build host). FORCE_CPU=1 builds the CPU
kernels only. TORCH_CUDA_ARCH_LIST is honoured; without it and without a
visible GPU the default covers sm_75 to sm_120 plus PTX. MAX_JOBS bounds the
parallel compile jobs (ninja).
"""

import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"


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
            arch_list = DEFAULT_CUDA_ARCH_LIST
        # cpp_extension reads the list from the environment.
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
    return arch_list


def _nvidia_wheel_include_flags() -> list[str]:
    # Torch's CUDA headers include cuBLAS/cuSPARSE headers that a minimal toolkit
    # lacks; the nvidia wheels torch depends on ship them. -isystem puts them after
    # the toolkit's own include directory, so they only fill the gaps.
    dirs = sorted({d for path in sys.path for d in glob.glob(os.path.join(path, "nvidia", "cu[0-9]*", "include"))})
    return [flag for d in dirs for flag in ("-isystem", d)]


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    defines = [("FOCAL_CUDA_TORCH_VERSION", f'"{torch.__version__}"')]
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
    arch_list = _cuda_arch_list()
    print(f"focal_cuda: building the CPU and CUDA kernels for TORCH_CUDA_ARCH_LIST={arch_list} with {CUDA_HOME}")
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    defines += [
        ("FOCAL_CUDA_BUILT_WITH_CUDA", "1"),
        ("FOCAL_CUDA_ARCH_LIST", f'"{arch_list}"'),
        ("FOCAL_CUDA_CUDA_VERSION", f'"{torch.version.cuda}"'),
    ]
    nvcc_flags = [
        "-O3", "--expt-relaxed-constexpr", "-lineinfo",
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


setup(
    name="focal_cuda",
    version="0.1.0",
    description="Fused focal loss (softmax and sigmoid) for PyTorch: CPU and CUDA kernels in one pass",
    packages=find_packages(include=["focal_cuda", "focal_cuda.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.6"],
)
