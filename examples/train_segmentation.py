"""Semantic segmentation with the softmax focal loss: torchvision's LR-ASPP MobileNetV3-Large (no downloaded
weights) on generated images and uint8 masks with ignore 255, trained with ``focal_cuda.softmax_focal_loss``
or the pure-PyTorch ``focal_cuda.reference.softmax_focal_loss`` (``--loss both``: one after the other from
the same seed, then the two loss curves and the time per step of each).

    python examples/train_segmentation.py --loss both --steps 5                      # CPU, 64x64, seconds
    torchrun --nproc_per_node=8 examples/train_segmentation.py --loss both --steps 50 # 8 GPUs, 512x512

The loss is ``sum / N`` over the global batch, ``N`` the number of labelled (non-255) pixels on all ranks:
each rank computes its mean ``sum_r / n_r`` (``reduction="mean"``, which cannot overflow in float16 as a
sum over a whole batch can) and multiplies it by ``world_size * n_r / N``, ``N`` from an ``all_reduce`` of a
device tensor. DDP averages the ranks' gradients, so the gradients are exactly those of one process on the
combined batch.

BatchNorm: the model's BatchNorm2d layers are replaced by ``torchvision.ops.FrozenBatchNorm2d`` (what
torchvision's detection models use): batch statistics would make each rank's gradients depend on its share
of the batch, so 2 processes would not reproduce 1 process on the combined batch (SyncBatchNorm would, on
GPUs only); GroupNorm would too but runs ~80x slower on the CPU for MobileNetV3's depthwise layers. LR-ASPP
has no dropout, so a step is deterministic.

``--compile``: forward, loss and backward of the step are one ``torch.compile(fullgraph=True)`` graph
(``torch._dynamo.config.trace_autograd_ops``); the optimizer step runs eagerly. The reference loss compiles
with graph breaks (its class-index check is a data-dependent branch), so only focal_cuda uses fullgraph.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: python examples/train_segmentation.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples import common  # noqa: E402

IGNORE_INDEX = 255
GAMMA = 2.0

CPU_DEFAULTS = dict(steps=5, batch_size=4, image_size=64, num_classes=5, lr=0.02)
CUDA_DEFAULTS = dict(steps=20, batch_size=8, image_size=512, num_classes=21, lr=0.02)


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replaces every BatchNorm2d by a FrozenBatchNorm2d with its statistics and affine parameters (kept as
    buffers: at initialisation scale 1, shift 0). The result does not depend on how the batch is split."""
    from torchvision.ops import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def build_model(num_classes: int, seed: int) -> nn.Module:
    from torchvision.models.segmentation import lraspp_mobilenet_v3_large

    torch.manual_seed(seed)  # torchvision initialises from the global generator
    model = lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=num_classes)
    return freeze_batchnorm(model)


def segmentation_loss(loss_module, logits: Tensor, masks: Tensor, world_size: int) -> Tensor:
    """This rank's share of the global focal loss ``sum / N`` (``N``: labelled pixels on all ranks), scaled
    by ``world_size`` because DDP averages the gradients. One process: exactly ``reduction="mean"``."""
    local_mean = loss_module.softmax_focal_loss(logits, masks, gamma=GAMMA, ignore_index=IGNORE_INDEX,
                                                reduction="mean")
    local_count = (masks != IGNORE_INDEX).sum()
    total = common.global_sum(local_count) if world_size > 1 else local_count
    scale = (local_count * world_size).to(torch.float32) / total.clamp(min=1).to(torch.float32)
    return local_mean * scale  # a 0-dim float32 tensor (float16 / bfloat16 mean times a float32 scale)


def make_loss_of_batch(loss_module, world_size: int):
    def loss_of_batch(model: nn.Module, batch) -> tuple[Tensor, dict[str, Tensor]]:
        images, masks = batch
        logits = model(images)["out"]  # (B, C, H, W), bfloat16 / float16 under autocast
        return segmentation_loss(loss_module, logits, masks, world_size), {}

    return loss_of_batch


def run(args: argparse.Namespace, loss_name: str, info: common.DistInfo, *, record_grads: bool = False,
        log=print) -> common.History:
    """Trains a fresh model (seeded by ``args.seed``) with one loss; returns its history."""
    model = build_model(args.num_classes, args.seed).to(info.device)
    model.train()
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr, momentum=0.9)

    def batch_of_step(step: int):
        indices = common.rank_sample_indices(step, args.batch_size, info)
        return common.segmentation_batch(indices, args.image_size, args.num_classes, args.seed, info.device)

    return common.train(loss_name, model, optimizer, batch_of_step,
                        make_loss_of_batch(common.LOSSES[loss_name], info.world_size),
                        steps=args.steps, info=info, amp=args.amp, compile=args.compile,
                        fullgraph=loss_name == "focal_cuda", record_grads=record_grads, log=log)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, CPU_DEFAULTS, CUDA_DEFAULTS)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> list[common.History]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = common.init_distributed(args.device)
    try:
        if info.is_main:
            print("segmentation: LR-ASPP MobileNetV3-Large, softmax focal loss (gamma 2, ignore 255); "
                  + common.describe(info, args))
        histories = [run(args, name, info) for name in common.loss_names(args.loss)]
        if info.is_main:
            common.print_summary(histories)
        return histories
    finally:
        common.shutdown_distributed()


if __name__ == "__main__":
    main()
