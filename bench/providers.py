"""The implementations compared. Baselines come from focal_cuda.reference (the test suite's oracle) and
torchvision; focal_cuda's own op is the one under test. Every provider maps (logits, targets) to the
workload's loss: "mean" for softmax, "sum" for sigmoid (as RetinaNet uses it).

classification_flsd53 compares focal_cuda's fused FLSD-53 schedule with focal_cuda at the constant gamma 3,
with the public code's per-sample loop (one .item() per sample) and with a torch.where vectorisation.
liger_cross_entropy (classification, on a GPU where Liger-Kernel is installed) is a peer's fused kernel
moving the same bytes, at gamma = 0."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
import torch.nn.functional as F

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
    # Another loss than the workload's, timed for comparison (focal_cuda at a constant gamma next to a schedule).
    other_loss: bool = False

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


# FLSD-53 as the public code (torrvision/focal_calibration, Losses/focal_loss_adaptive_gamma.py) sets it up:
# gamma_dic {0.2: 5.0, 0.5: 3.0} and FocalLossAdaptive(gamma=3).
FLSD53_GAMMA_DIC = {0.2: 5.0, 0.5: 3.0}
FLSD53_GAMMA = 3.0


def flsd53_per_sample_loop(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The public FocalLossAdaptive forward, restated (size_average=True): log_softmax, gather, then gamma
    chosen in a Python loop with one ``.item()`` per sample (a host synchronisation per sample on a GPU)."""
    logpt = F.log_softmax(input, dim=1).gather(1, target.view(-1, 1)).view(-1)
    pt = logpt.exp()
    gamma_list = []
    for i in range(pt.shape[0]):
        pt_sample = pt[i].item()
        if pt_sample >= 0.5:
            gamma_list.append(FLSD53_GAMMA)
            continue
        for key in sorted(FLSD53_GAMMA_DIC.keys()):
            if pt_sample < key:
                gamma_list.append(FLSD53_GAMMA_DIC[key])
                break
    gamma = torch.tensor(gamma_list).to(input.device)
    loss = -1 * (1 - pt) ** gamma * logpt
    return loss.mean()


def flsd53_torch_where(input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The same loss vectorised by hand: the per-sample gamma from ``torch.where`` on the device, no host sync."""
    logpt = F.log_softmax(input, dim=1).gather(1, target.view(-1, 1)).view(-1)
    pt = logpt.exp()
    p = pt.detach()
    gamma = torch.where(p < 0.2, 5.0, torch.where(p < 0.5, 3.0, FLSD53_GAMMA))
    return (-((1 - pt) ** gamma) * logpt).mean()


def _flsd53_factories() -> dict[str, Callable[[], Provider]]:
    def fused(gamma):
        return lambda x, t: focal_cuda.softmax_focal_loss(x, t, gamma=gamma, reduction="mean")

    return {
        "focal_cuda": lambda: Provider("focal_cuda", fused("flsd53")),
        "focal_cuda_gamma3": lambda: Provider("focal_cuda_gamma3", fused(3.0), other_loss=True),
        "reference": lambda: Provider("reference", lambda x, t: reference.softmax_focal_loss(x, t, gamma="flsd53")),
        "flsd53_torch_where": lambda: Provider("flsd53_torch_where", flsd53_torch_where),
        "flsd53_torch_where_compiled": lambda: Provider("flsd53_torch_where_compiled", _compiled(flsd53_torch_where)),
        "flsd53_per_sample_loop": lambda: Provider("flsd53_per_sample_loop", flsd53_per_sample_loop),
    }


def _liger_available() -> bool:
    """Liger-Kernel's fused cross-entropy (Triton, CUDA only), where it is installed."""
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None and torch.cuda.is_available()


def _liger_cross_entropy() -> Provider:
    """A peer's fused kernel on the same bytes: Liger-Kernel's cross-entropy (focal loss at gamma = 0) reads the
    (N, C) logits once and writes their gradient in its forward, as focal_cuda does."""
    from liger_kernel.transformers import LigerCrossEntropyLoss

    loss = LigerCrossEntropyLoss(ignore_index=IGNORE, reduction="mean")
    return Provider("liger_cross_entropy", lambda x, t: loss(x, t), other_loss=True)


def provider_factories(workload: Workload) -> dict[str, Callable[[], Provider]]:
    """Name -> factory (compiled providers are built only when asked for)."""
    if workload.gamma == "flsd53":
        return _flsd53_factories()
    if workload.loss == "softmax":
        factories = {
            "focal_cuda": lambda: Provider("focal_cuda", _softmax(focal_cuda.softmax_focal_loss)),
            "reference": lambda: Provider("reference", _softmax(reference.softmax_focal_loss)),
            "reference_compiled": lambda: Provider("reference_compiled",
                                                   _compiled(_softmax(reference.softmax_focal_loss))),
            "lean_cross_entropy": lambda: Provider("lean_cross_entropy", _softmax(reference.softmax_focal_loss_lean)),
        }
        if workload.name == "classification" and _liger_available():  # (N, C) rows only
            factories["liger_cross_entropy"] = _liger_cross_entropy
        return factories
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
                 "torchvision_compiled", "focal_cuda_gamma3", "flsd53_torch_where", "flsd53_torch_where_compiled",
                 "flsd53_per_sample_loop", "liger_cross_entropy"]
