"""The implementations compared. Baselines come from focal_cuda.reference (the test suite's oracle) and
torchvision; focal_cuda's own op is the one under test. Every provider maps (logits, targets) to the
workload's loss: "mean" for softmax, "sum" for sigmoid (as RetinaNet uses it)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import focal_cuda
from focal_cuda import reference

from .workloads import Workload

GAMMA = 2.0
IGNORE = 255


@dataclasses.dataclass
class Provider:
    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # torchvision takes dense targets only: index targets are one-hot encoded before the timing.
    dense_targets: bool = False

    def prepare_targets(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.dense_targets and not t.is_floating_point():
            num_classes = x.shape[-1]
            return torch.nn.functional.one_hot(t, num_classes + 1)[..., :num_classes].to(x.dtype)
        return t


def _softmax(fn):
    return lambda x, t: fn(x, t, gamma=GAMMA, ignore_index=IGNORE, reduction="mean")


def _sigmoid(fn):
    return lambda x, t: fn(x, t, alpha=0.25, gamma=GAMMA, reduction="sum")


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def provider_factories(workload: Workload) -> dict[str, Callable[[], Provider]]:
    """Name -> factory (compiled providers are built only when asked for)."""
    if workload.loss == "softmax":
        return {
            "focal_cuda": lambda: Provider("focal_cuda", _softmax(focal_cuda.softmax_focal_loss)),
            "reference": lambda: Provider("reference", _softmax(reference.softmax_focal_loss)),
            "reference_compiled": lambda: Provider("reference_compiled",
                                                   _compiled(_softmax(reference.softmax_focal_loss))),
            "lean_cross_entropy": lambda: Provider("lean_cross_entropy", _softmax(reference.softmax_focal_loss_lean)),
        }
    import torchvision

    return {
        "focal_cuda": lambda: Provider("focal_cuda", _sigmoid(focal_cuda.sigmoid_focal_loss)),
        "reference": lambda: Provider("reference", _sigmoid(reference.sigmoid_focal_loss)),
        "reference_compiled": lambda: Provider("reference_compiled",
                                               _compiled(_sigmoid(reference.sigmoid_focal_loss))),
        "torchvision": lambda: Provider("torchvision", _sigmoid(torchvision.ops.sigmoid_focal_loss), True),
        "torchvision_compiled": lambda: Provider("torchvision_compiled",
                                                 _compiled(_sigmoid(torchvision.ops.sigmoid_focal_loss)), True),
    }


ALL_PROVIDERS = ["focal_cuda", "reference", "reference_compiled", "lean_cross_entropy", "torchvision",
                 "torchvision_compiled"]
