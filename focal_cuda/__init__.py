"""focal_cuda: fused focal loss for PyTorch, one kernel pass on CPU and CUDA."""

from __future__ import annotations

from typing import Any

import torch  # noqa: F401  (loads libtorch before the extension)


def _check_build_torch() -> None:
    """The compiled library works with the torch it was built against only (C++ ABI): say so plainly
    instead of an undefined-symbol error, or silent misbehaviour, when another torch is installed."""
    try:
        from . import _build_info
    except ImportError:  # built by an older setup.py, or not built: loading _C says which
        return
    if _build_info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"focal_cuda was built against torch {_build_info.TORCH_VERSION}, but torch {torch.__version__} is "
            "installed: rebuild it with this torch, from the focal_cuda source directory: "
            "`pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`), "
            f"or install torch {_build_info.TORCH_VERSION}"
        )


_check_build_torch()

from . import _C, _ops  # noqa: E402, F401  (registers the operators)
from . import calibration, reference  # noqa: E402
from .checks import cuda_target_checks, set_cuda_target_checks  # noqa: E402
from .functional import sigmoid_focal_loss, softmax_focal_loss  # noqa: E402
from .modules import FusedFocalLoss  # noqa: E402
from .schedule import GammaSchedule  # noqa: E402

__all__ = [
    "FusedFocalLoss",
    "GammaSchedule",
    "build_info",
    "calibration",
    "cuda_target_checks",
    "reference",
    "set_cuda_target_checks",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
]
__version__ = "0.1.0"


def build_info() -> dict[str, Any]:
    """What this build was compiled with: ``cuda`` (bool), ``cuda_version`` (of the nvcc that compiled the CUDA
    kernels; None without them), ``cuda_arch_list``, ``torch_version``."""
    info = dict(_C.build_info())
    info["cuda_arch_list"] = [a for a in info["cuda_arch_list"].replace(" ", ";").split(";") if a]
    info["cuda_version"] = info["cuda_version"] or None
    return info
