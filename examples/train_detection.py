"""Object detection with the sigmoid focal loss: torchvision's RetinaNet (ResNet-18 + FPN backbone, no
downloaded weights) on generated images of coloured rectangles, trained with focal_cuda's sigmoid focal loss
or the reference (``--loss both``: one after the other from the same seed, then the two loss curves and the
time per step of each).

    python examples/train_detection.py --loss both --steps 5                           # CPU, 128x128
    torchrun --nproc_per_node=8 examples/train_detection.py --loss both --steps 50 \\
        --normalizer global                                                             # 8 GPUs, 512x512

Two classification losses (``--normalizer``), each with ``focal_cuda`` or the reference:

- ``image`` (default): torchvision's own loss, per image ``sum / max(1, positives of the image)``, mean
  over the images. ``--loss focal_cuda``: ``focal_cuda.integrations.torchvision.use_fused_focal_loss(model)``
  (index targets, no one-hot, no masked copy of the logits); ``--loss reference``: torchvision unchanged
  (``torchvision.ops.sigmoid_focal_loss``, which focal_cuda equals).
- ``global``: one normaliser for the global batch, the number of positive anchors on all ranks (an
  ``all_reduce`` of a device tensor, as detectron2 does):
  ``sigmoid_focal_loss(logits, index_targets, reduction="mean", normalizer=total_pos.clamp(min=1))``,
  from ``focal_cuda`` or ``focal_cuda.reference`` (same signature), times ``world_size`` because DDP
  averages the gradients; the box regression (L1) is normalised the same way. Two processes with half
  the batch each then get exactly the gradients of one process with the whole batch.

BatchNorm: the ResNet-18 uses ``FrozenBatchNorm2d`` (torchvision's choice for detection backbones) and the
RetinaNet head has no normalisation, so nothing depends on how the batch is split across ranks; no dropout.
``conv1`` and ``layer1`` are frozen (torchvision's default of 3 trainable layers).

``--compile``: the backbone and the head are compiled with ``fullgraph=True``, and with
``--normalizer global`` the focal loss call too; anchor matching (data-dependent shapes) and the box loss
stay eager.
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn

import focal_cuda.reference

if __package__ in (None, ""):  # run as a script: python examples/train_detection.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples import common  # noqa: E402

ALPHA, GAMMA = 0.25, 2.0
BETWEEN_THRESHOLDS = -2  # torchvision Matcher: anchors left out of the classification loss
CPU_DEFAULTS = dict(steps=5, batch_size=2, image_size=128, num_classes=5, lr=0.01, width=64)
CUDA_DEFAULTS = dict(steps=20, batch_size=8, image_size=512, num_classes=80, lr=0.01, width=256)


def build_model(num_classes: int, image_size: int, width: int, seed: int) -> nn.Module:
    """RetinaNet: ResNet-18 (FrozenBatchNorm2d) + FPN P3-P7 of ``width`` channels, 9 anchors per place
    scaled to the image (P3: image/16 ... P7: image), the RetinaNet head (no norm), images kept at their size."""
    from torchvision.models import resnet18
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.retinanet import RetinaNet, RetinaNetHead
    from torchvision.ops import FrozenBatchNorm2d
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    torch.manual_seed(seed)  # torchvision initialises from the global generator
    body = resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    for name, p in body.named_parameters():
        if not name.startswith(("layer2", "layer3", "layer4")):
            p.requires_grad_(False)
    backbone = BackboneWithFPN(body, {"layer2": "0", "layer3": "1", "layer4": "2"}, [128, 256, 512], width,
                               extra_blocks=LastLevelP6P7(width, width))
    base = image_size / 16
    sizes = tuple(tuple(int(round(base * 2 ** (k + i / 3))) for i in range(3)) for k in range(5))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    head = RetinaNetHead(width, anchors.num_anchors_per_location()[0], num_classes)
    return RetinaNet(backbone, num_classes, min_size=image_size, max_size=image_size,
                     anchor_generator=anchors, head=head)


def anchor_index_targets(labels: Tensor, matched: Tensor, num_classes: int) -> Tensor:
    """Per anchor: the matched box's class, ``num_classes`` (background) below the low IoU threshold,
    BETWEEN_THRESHOLDS (ignored) in between. No one-hot tensor."""
    background = torch.full_like(matched, num_classes)
    if labels.numel() == 0:
        index = background
    else:
        index = torch.where(matched >= 0, labels[matched.clamp(min=0)], background)
    return torch.where(matched == BETWEEN_THRESHOLDS, torch.full_like(index, BETWEEN_THRESHOLDS), index)


def global_classification_loss(loss_module, cls_logits: Tensor, index: Tensor, normalizer: Tensor,
                               world_size: int) -> Tensor:
    """sum of the focal loss over this rank's anchors / (positives on all ranks), times world_size."""
    loss = loss_module.sigmoid_focal_loss(cls_logits, index, alpha=ALPHA, gamma=GAMMA, reduction="mean",
                                          ignore_index=BETWEEN_THRESHOLDS, normalizer=normalizer)
    return loss * world_size


def use_global_normalizer(model: nn.Module, loss_module, world_size: int, compile: bool = False) -> nn.Module:
    """Replaces ``model.head.compute_loss`` (classification and box regression) by the globally normalised
    losses. ``normalizer``: the positive anchors of all ranks, an all_reduce of a device tensor (no host sync
    on CUDA)."""
    from torchvision.models.detection._utils import _box_loss

    head = model.head
    # the reference's class-index check is a data-dependent branch (a graph break): fullgraph for focal_cuda only
    cls_loss = (torch.compile(global_classification_loss, fullgraph=loss_module is not focal_cuda.reference)
                if compile else global_classification_loss)

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        cls_logits = head_outputs["cls_logits"]  # (B, anchors, C)
        num_classes = cls_logits.shape[-1]
        index = torch.stack([anchor_index_targets(t["labels"], m, num_classes)
                             for t, m in zip(targets, matched_idxs)])
        num_pos = (torch.stack(matched_idxs) >= 0).sum()
        total_pos = common.global_sum(num_pos) if world_size > 1 else num_pos
        normalizer = total_pos.clamp(min=1)
        classification = cls_loss(loss_module, cls_logits, index, normalizer, world_size)
        box_sums = []
        reg = self.regression_head
        for t, bbox_regression, anchors_per_image, matched in zip(targets, head_outputs["bbox_regression"],
                                                                   anchors, matched_idxs):
            fg = torch.where(matched >= 0)[0]
            box_sums.append(_box_loss(reg._loss_type, reg.box_coder, anchors_per_image[fg],
                                      t["boxes"][matched[fg]], bbox_regression[fg]))
        bbox_regression = torch.stack(box_sums).sum() / normalizer * world_size
        return {"classification": classification, "bbox_regression": bbox_regression}

    head.compute_loss = types.MethodType(compute_loss, head)
    return model


def prepare(model: nn.Module, loss_name: str, normalizer: str, world_size: int, compile: bool) -> nn.Module:
    """Installs the classification loss ``loss_name`` with the ``normalizer`` (see the module docstring)."""
    if normalizer == "global":
        return use_global_normalizer(model, common.LOSSES[loss_name], world_size, compile)
    if loss_name == "focal_cuda":
        from focal_cuda.integrations.torchvision import use_fused_focal_loss

        return use_fused_focal_loss(model, alpha=ALPHA, gamma=GAMMA)
    return model  # reference: torchvision's own compute_loss (torchvision.ops.sigmoid_focal_loss)


def loss_of_batch(model: nn.Module, batch) -> tuple[Tensor, dict[str, Tensor]]:
    images, targets = batch
    losses = model(images, targets)  # {"classification", "bbox_regression"}
    return losses["classification"] + losses["bbox_regression"], {
        "cls": losses["classification"], "box": losses["bbox_regression"]}


def run(args: argparse.Namespace, loss_name: str, info: common.DistInfo, *, record_grads: bool = False,
        log=print) -> common.History:
    """Trains a fresh model (seeded by ``args.seed``) with one loss; returns its history."""
    model = build_model(args.num_classes, args.image_size, args.width, args.seed)
    model = prepare(model, loss_name, args.normalizer, info.world_size, args.compile).to(info.device)
    if args.compile:
        model.backbone.forward = torch.compile(model.backbone.forward, fullgraph=True)
        model.head.forward = torch.compile(model.head.forward, fullgraph=True)
    model.train()
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr, momentum=0.9)

    def batch_of_step(step: int):
        indices = common.rank_sample_indices(step, args.batch_size, info)
        return common.detection_batch(indices, args.image_size, args.num_classes, args.seed, info.device)

    return common.train(loss_name, model, optimizer, batch_of_step, loss_of_batch, steps=args.steps, info=info,
                        amp=args.amp, compile=False, record_grads=record_grads, log=log)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_common_args(parser, CPU_DEFAULTS, CUDA_DEFAULTS)
    d = CUDA_DEFAULTS if common.cuda_default() else CPU_DEFAULTS
    parser.add_argument("--width", type=int, default=d["width"], help="FPN and head channels (torchvision: 256)")
    parser.add_argument("--normalizer", choices=["image", "global"], default="image",
                        help="image: torchvision's per-image positives; global: positives of the whole "
                             "batch on all ranks (all_reduce)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> list[common.History]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = common.init_distributed(args.device)
    try:
        if info.is_main:
            print("detection: RetinaNet ResNet-18 FPN, sigmoid focal loss (alpha 0.25, gamma 2); "
                  + common.describe(info, args, f"normalizer {args.normalizer}, width {args.width}"))
        histories = [run(args, name, info) for name in common.loss_names(args.loss)]
        if info.is_main:
            common.print_summary(histories)
        return histories
    finally:
        common.shutdown_distributed()


if __name__ == "__main__":
    main()
