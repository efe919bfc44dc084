"""The benchmarked workloads: shapes, inputs, and the bytes the fused kernels must move."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    loss: str  # "softmax" or "sigmoid"
    targets: str  # "index" or "dense"
    cpu_shape: tuple[int, ...]
    gpu_shape: tuple[int, ...]
    small_shape: tuple[int, ...]
    ignore_fraction: float = 0.0
    note: str = ""
    # The focal-loss gamma every provider computes: a number, or a GammaSchedule preset's name
    # ("flsd53": the workload compares focal_cuda's fused schedule with its constant gamma and the
    # ways FLSD-53 is written in plain PyTorch; no ignored targets, which the public code lacks).
    gamma: object = 2.0
    # Where the classes are: -1 (last, detection heads) or 1 (channel-first (N, C, H, W) segmentation logits,
    # read in place by focal_cuda's sigmoid loss with class_dim=1).
    class_dim: int = -1

    def shape(self, device: torch.device, small: bool) -> tuple[int, ...]:
        if small:
            return self.small_shape
        return self.gpu_shape if device.type == "cuda" else self.cpu_shape

    def make_inputs(self, shape, device, dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets, drawn on the CPU (same values on every device) then moved."""
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(shape, generator=gen).mul_(2.0)
        if self.loss == "softmax" or self.class_dim == 1:  # label maps: a class per position, 255 ignored
            num_classes = shape[1]
            target = torch.randint(0, num_classes, (shape[0], *shape[2:]), generator=gen)
            if self.ignore_fraction:
                target[torch.rand(target.shape, generator=gen) < self.ignore_fraction] = 255
            target = target.to(torch.uint8 if num_classes < 255 else torch.int64)
        else:
            num_classes = shape[-1]
            # About 1% positive anchors, the rest background (index C).
            labels = torch.randint(0, num_classes, shape[:-1], generator=gen)
            background = torch.rand(shape[:-1], generator=gen) > 0.01
            target = torch.where(background, torch.full_like(labels, num_classes), labels)
            if self.targets == "dense":
                target = torch.nn.functional.one_hot(target, num_classes + 1)[..., :num_classes].to(dtype)
        return x.to(device=device, dtype=dtype), target.to(device)

    def fused_bytes(self, x: torch.Tensor, target: torch.Tensor) -> int:
        """What one fused forward with gradient must move: logits and targets read, gradient written."""
        return 2 * x.numel() * x.element_size() + target.numel() * target.element_size()

    def floor_bytes(self, x: torch.Tensor) -> int:
        """The copy floor: logits read once, written once."""
        return 2 * x.numel() * x.element_size()


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("detection_dense", "sigmoid", "dense", (200000, 80), (200000, 80), (20000, 80),
                 note="sigmoid, one-hot float targets (RetinaNet-style)"),
        Workload("detection_index", "sigmoid", "index", (200000, 80), (200000, 80), (20000, 80),
                 note="sigmoid, class-index targets (background = C)"),
        Workload("segmentation", "softmax", "index", (8, 19, 256, 512), (8, 19, 512, 1024), (2, 19, 64, 128),
                 ignore_fraction=0.05, note="softmax NCHW, uint8 masks, 5% ignored (255)"),
        Workload("segmentation_sigmoid", "sigmoid", "index", (8, 19, 256, 512), (8, 19, 512, 1024), (2, 19, 64, 128),
                 ignore_fraction=0.05, class_dim=1,
                 note="sigmoid one-vs-rest NCHW (smp / mmseg style), uint8 masks, 5% ignored (255)"),
        Workload("classification", "softmax", "index", (65536, 1000), (65536, 1000), (4096, 1000),
                 note="softmax (N, C), int64 targets"),
        Workload("classification_flsd53", "softmax", "index", (65536, 1000), (65536, 1000), (4096, 1000),
                 note="softmax (N, C), int64 targets, FLSD-53 gamma schedule", gamma="flsd53"),
    )
}

Provider = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
