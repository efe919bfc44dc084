"""The implementations compared. Baselines come from focal_cuda.reference (the test suite's oracle) and
torchvision; focal_cuda's own op is the one under test. Every provider maps (logits, targets) to the
workload's loss: "mean" for softmax, "sum" for sigmoid (as RetinaNet uses it).

classification_flsd53 compares focal_cuda's fused FLSD-53 schedule with focal_cuda at the constant gamma 3,
with the public code's per-sample loop (one .item() per sample) and with a torch.where vectorisation.
liger_cross_entropy (classification, on a GPU where Liger-Kernel is installed) is a peer's fused kernel
moving the same bytes, at gamma = 0.

The drop-in peers, where their package is installed, compute each workload's loss with their own code (plus
the division or scaling that turns their reduction into the workload's): kornia's softmax focal_loss on
segmentation; fvcore's sigmoid_focal_loss (and the TorchScript one detectron2 calls), kornia's
binary_focal_loss_with_logits and ultralytics' FocalLoss on detection_dense; segmentation_models_pytorch's
multiclass FocalLoss on segmentation_sigmoid. Next to each, focal_cuda_<peer> is focal_cuda's adapter for it
(focal_cuda.integrations) called the same way (focal_cuda_kornia_binary_hard: with hard_targets=True)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

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
    # Index targets of this dtype (kornia takes int64 labels only), converted before the timing.
    index_dtype: Optional[torch.dtype] = None
    # Computes in float32 whatever the logits' dtype (fvcore): agrees with the others to float32's precision.
    float32_math: bool = False

    def prepare_targets(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.dense_targets and not t.is_floating_point():
            num_classes = x.shape[-1]
            return torch.nn.functional.one_hot(t, num_classes + 1)[..., :num_classes].to(x.dtype)
        if self.index_dtype is not None and not t.is_floating_point():
            return t.to(self.index_dtype)
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


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _count_valid(t: torch.Tensor) -> torch.Tensor:
    return (t != IGNORE).sum()


def _kornia_softmax() -> Provider:
    """kornia.losses.focal_loss: its "mean" counts ignored positions and the C slices of its loss map, so the
    workload's mean is its sum over the non-ignored positions."""
    from kornia.losses import focal_loss

    def fn(x, t):
        return focal_loss(x, t, alpha=None, gamma=GAMMA, reduction="sum", ignore_index=IGNORE) / _count_valid(t)

    return Provider("kornia", fn, index_dtype=torch.int64)


def _kornia_binary() -> Provider:
    """kornia.losses.binary_focal_loss_with_logits on the one-hot targets, without its ignore mask."""
    from kornia.losses import binary_focal_loss_with_logits

    def fn(x, t):
        return binary_focal_loss_with_logits(x, t, alpha=0.25, gamma=GAMMA, reduction="sum", ignore_index=None)

    return Provider("kornia_binary", fn, dense_targets=True)


def _fvcore(jit: bool) -> Provider:
    """fvcore.nn.sigmoid_focal_loss(_jit) (detectron2's RetinaNet calls the TorchScript one): float32 math."""
    from fvcore import nn as fvcore_nn

    loss = fvcore_nn.sigmoid_focal_loss_jit if jit else fvcore_nn.sigmoid_focal_loss
    name = "fvcore_jit" if jit else "fvcore"
    return Provider(name, lambda x, t: loss(x, t, 0.25, GAMMA, "sum").to(x.dtype), dense_targets=True,
                    float32_math=True)


def _ultralytics() -> Provider:
    """ultralytics.utils.loss.FocalLoss reduces with .mean(1).sum(): times C is the workload's sum."""
    import os

    os.environ.setdefault("YOLO_VERBOSE", "False")
    from ultralytics.utils.loss import FocalLoss

    loss = FocalLoss(gamma=GAMMA, alpha=0.25)
    return Provider("ultralytics", lambda x, t: loss(x, t) * x.shape[1], dense_targets=True)


def _smp() -> Provider:
    """segmentation_models_pytorch.losses.FocalLoss("multiclass"): sigmoid one-vs-rest, a loop over the classes
    with a masked copy of each class's logits; its mean is the workload's."""
    from segmentation_models_pytorch.losses import FocalLoss

    loss = FocalLoss("multiclass", alpha=0.25, gamma=GAMMA, ignore_index=IGNORE)
    return Provider("smp", lambda x, t: loss(x, t))


def _adapters() -> dict[str, Callable[[], Provider]]:
    """focal_cuda's drop-in adapters computing each workload's loss through the peer's interface (timed next to
    the peer's own code; listed where the peer is installed)."""
    from focal_cuda.integrations import fvcore as fvcore_adapter
    from focal_cuda.integrations import kornia as kornia_adapter
    from focal_cuda.integrations import smp as smp_adapter
    from focal_cuda.integrations import ultralytics as ultralytics_adapter

    def kornia_softmax(x, t):
        return kornia_adapter.focal_loss(x, t, None, GAMMA, "sum", ignore_index=IGNORE) / _count_valid(t)

    def kornia_binary(x, t):  # kornia's defaults but ignore_index: on a GPU, floating targets take the soft formula
        return kornia_adapter.binary_focal_loss_with_logits(x, t, 0.25, GAMMA, "sum", ignore_index=None)

    def kornia_binary_hard(x, t):
        return kornia_adapter.binary_focal_loss_with_logits(x, t, 0.25, GAMMA, "sum", ignore_index=None,
                                                            hard_targets=True)

    smp_loss = smp_adapter.FocalLoss("multiclass", alpha=0.25, gamma=GAMMA, ignore_index=IGNORE)
    ultralytics_loss = ultralytics_adapter.FocalLoss(gamma=GAMMA, alpha=0.25)
    return {
        "focal_cuda_kornia": lambda: Provider("focal_cuda_kornia", kornia_softmax, index_dtype=torch.int64),
        "focal_cuda_kornia_binary": lambda: Provider("focal_cuda_kornia_binary", kornia_binary, dense_targets=True),
        "focal_cuda_kornia_binary_hard": lambda: Provider("focal_cuda_kornia_binary_hard", kornia_binary_hard,
                                                          dense_targets=True),
        "focal_cuda_fvcore": lambda: Provider(
            "focal_cuda_fvcore", lambda x, t: fvcore_adapter.sigmoid_focal_loss_jit(x, t, 0.25, GAMMA, "sum"),
            dense_targets=True),
        "focal_cuda_ultralytics": lambda: Provider("focal_cuda_ultralytics",
                                                   lambda x, t: ultralytics_loss(x, t) * x.shape[1], dense_targets=True),
        "focal_cuda_smp": lambda: Provider("focal_cuda_smp", lambda x, t: smp_loss(x, t)),
    }


def _channel_first_sigmoid(fn):
    return lambda x, t: fn(x, t, alpha=0.25, gamma=GAMMA, reduction="mean", ignore_index=IGNORE, class_dim=1)


def provider_factories(workload: Workload) -> dict[str, Callable[[], Provider]]:
    """Name -> factory (compiled providers are built only when asked for; peers only where installed)."""
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
        if workload.name == "segmentation" and _installed("kornia"):
            factories["kornia"] = _kornia_softmax
            factories["focal_cuda_kornia"] = _adapters()["focal_cuda_kornia"]
        return factories
    if workload.class_dim == 1:
        factories = {
            "focal_cuda": lambda: Provider("focal_cuda", _channel_first_sigmoid(focal_cuda.sigmoid_focal_loss)),
            "reference": lambda: Provider("reference", _channel_first_sigmoid(reference.sigmoid_focal_loss)),
            "reference_compiled": lambda: Provider(
                "reference_compiled", _compiled(_channel_first_sigmoid(reference.sigmoid_focal_loss))),
        }
        if _installed("segmentation_models_pytorch"):
            factories["smp"] = _smp
            factories["focal_cuda_smp"] = _adapters()["focal_cuda_smp"]
        return factories
    import torchvision

    factories = {
        "focal_cuda": lambda: Provider("focal_cuda", _sigmoid(focal_cuda.sigmoid_focal_loss)),
        "reference": lambda: Provider("reference", _sigmoid(reference.sigmoid_focal_loss)),
        "reference_compiled": lambda: Provider("reference_compiled",
                                               _compiled(_sigmoid(reference.sigmoid_focal_loss))),
        "torchvision": lambda: Provider("torchvision", _sigmoid(torchvision.ops.sigmoid_focal_loss), True),
        "torchvision_compiled": lambda: Provider("torchvision_compiled",
                                                 _compiled(_sigmoid(torchvision.ops.sigmoid_focal_loss)), True),
    }
    if workload.targets == "dense":  # the peers take dense targets only
        adapters = _adapters()
        if _installed("fvcore"):
            factories["fvcore"] = lambda: _fvcore(jit=False)
            factories["fvcore_jit"] = lambda: _fvcore(jit=True)
            factories["focal_cuda_fvcore"] = adapters["focal_cuda_fvcore"]
        if _installed("kornia"):
            factories["kornia_binary"] = _kornia_binary
            factories["focal_cuda_kornia_binary"] = adapters["focal_cuda_kornia_binary"]
            factories["focal_cuda_kornia_binary_hard"] = adapters["focal_cuda_kornia_binary_hard"]
        if _installed("ultralytics"):
            factories["ultralytics"] = _ultralytics
            factories["focal_cuda_ultralytics"] = adapters["focal_cuda_ultralytics"]
    return factories


ALL_PROVIDERS = ["focal_cuda", "reference", "reference_compiled", "lean_cross_entropy", "torchvision",
                 "torchvision_compiled", "focal_cuda_gamma3", "flsd53_torch_where", "flsd53_torch_where_compiled",
                 "flsd53_per_sample_loop", "liger_cross_entropy", "kornia", "focal_cuda_kornia", "kornia_binary",
                 "focal_cuda_kornia_binary", "focal_cuda_kornia_binary_hard", "fvcore", "fvcore_jit",
                 "focal_cuda_fvcore", "ultralytics", "focal_cuda_ultralytics", "smp", "focal_cuda_smp"]
# The drop-in peers and their adapters run when named in --providers (smp alone takes seconds a step on a CPU).
PEER_PROVIDERS = ["kornia", "focal_cuda_kornia", "kornia_binary", "focal_cuda_kornia_binary",
                  "focal_cuda_kornia_binary_hard", "fvcore", "fvcore_jit", "focal_cuda_fvcore", "ultralytics",
                  "focal_cuda_ultralytics", "smp", "focal_cuda_smp"]
DEFAULT_PROVIDERS = [p for p in ALL_PROVIDERS if p not in PEER_PROVIDERS]
