"""focal_cuda: fused focal loss for PyTorch, one kernel pass on CPU and CUDA."""

from __future__ import annotations

from typing import Any

import torch  # noqa: F401  (loads libtorch before the extension)

from . import _C, _ops  # noqa: F401  (registers the operators)
from . import calibration, reference
from .functional import sigmoid_focal_loss, softmax_focal_loss
from .modules import FusedFocalLoss
from .schedule import GammaSchedule

__all__ = [
    "FusedFocalLoss",
    "GammaSchedule",
    "build_info",
    "calibration",
    "reference",
    "sigmoid_focal_loss",
    "softmax_focal_loss",
]
__version__ = "0.1.0"


def build_info() -> dict[str, Any]:
    """What this build was compiled with: ``cuda`` (bool), ``cuda_version``, ``cuda_arch_list``, ``torch_version``."""
    info = dict(_C.build_info())
    info["cuda_arch_list"] = [a for a in info["cuda_arch_list"].replace(" ", ";").split(";") if a]
    info["cuda_version"] = info["cuda_version"] or None
    return info
