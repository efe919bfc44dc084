"""Detection demonstration: torchvision's RetinaNet classification loss computed with focal_cuda.

torchvision.models.detection.retinanet.RetinaNetClassificationHead.compute_loss builds, per image,
dense one-hot targets for the foreground anchors, drops the anchors matched BETWEEN_THRESHOLDS (-2),
and divides torchvision.ops.sigmoid_focal_loss(..., reduction="sum") by max(1, num_foreground);
the batch loss is the mean over images. The functions below compute the same loss with
focal_cuda.sigmoid_focal_loss, with index targets (no one-hot tensor, no boolean-mask copy of the
logits: background = C, ignore_index = BETWEEN_THRESHOLDS) or with the same dense targets, and the
tests check that the loss and the gradient of every parameter of the head are the same.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randn
from torch import Tensor
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.retinanet import RetinaNetClassificationHead

import focal_cuda
from focal_cuda.integrations.torchvision import retinanet_classification_loss, use_fused_focal_loss

BETWEEN_THRESHOLDS = det_utils.Matcher.BETWEEN_THRESHOLDS  # -2: ignored anchors
BELOW_LOW_THRESHOLD = det_utils.Matcher.BELOW_LOW_THRESHOLD  # -1: background anchors


# ============================================================================ the replacement compute_loss


def anchor_class_targets(labels: Tensor, matched_idxs: Tensor, num_classes: int) -> Tensor:
    """Index targets of one image's anchors: the matched box's label for foreground anchors
    (matched_idxs >= 0), num_classes (background: every class negative) below the low threshold,
    and BETWEEN_THRESHOLDS (used as ignore_index) for the anchors torchvision leaves out of the loss."""
    foreground = matched_idxs >= 0
    targets = torch.full_like(matched_idxs, num_classes)
    targets[foreground] = labels[matched_idxs[foreground]]
    return torch.where(matched_idxs == BETWEEN_THRESHOLDS, torch.full_like(targets, BETWEEN_THRESHOLDS), targets)


def retinanet_classification_loss_batched(
    targets: list[dict[str, Tensor]],
    head_outputs: dict[str, Tensor],
    matched_idxs: list[Tensor],
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """The same loss in one call for the whole (N, HWA, C) batch: reduction="none", then the per-image
    sums divided by the per-image max(1, num_foreground)."""
    cls_logits = head_outputs["cls_logits"]
    num_classes = cls_logits.shape[-1]
    matched = torch.stack(matched_idxs)
    classes = torch.stack(
        [anchor_class_targets(t["labels"], m, num_classes) for t, m in zip(targets, matched_idxs)]
    )
    per_element = focal_cuda.sigmoid_focal_loss(
        cls_logits, classes, alpha=alpha, gamma=gamma, reduction="none", ignore_index=BETWEEN_THRESHOLDS
    )
    num_foreground = (matched >= 0).sum(dim=1).clamp(min=1)
    return (per_element.sum(dim=(1, 2)) / num_foreground).mean()


def retinanet_classification_loss_dense(
    targets: list[dict[str, Tensor]],
    head_outputs: dict[str, Tensor],
    matched_idxs: list[Tensor],
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """torchvision's compute_loss line for line, with focal_cuda.sigmoid_focal_loss on the dense one-hot
    targets in place of torchvision.ops.sigmoid_focal_loss."""
    losses = []
    cls_logits = head_outputs["cls_logits"]
    for targets_per_image, cls_logits_per_image, matched_idxs_per_image in zip(targets, cls_logits, matched_idxs):
        foreground_idxs_per_image = matched_idxs_per_image >= 0
        num_foreground = foreground_idxs_per_image.sum()
        gt_classes_target = torch.zeros_like(cls_logits_per_image)
        gt_classes_target[
            foreground_idxs_per_image,
            targets_per_image["labels"][matched_idxs_per_image[foreground_idxs_per_image]],
        ] = 1.0
        valid_idxs_per_image = matched_idxs_per_image != BETWEEN_THRESHOLDS
        losses.append(
            focal_cuda.sigmoid_focal_loss(
                cls_logits_per_image[valid_idxs_per_image],
                gt_classes_target[valid_idxs_per_image],
                alpha=alpha,
                gamma=gamma,
                reduction="sum",
            )
            / max(1, num_foreground)
        )
    return sum(losses) / len(targets)


IMPLEMENTATIONS = {
    "index": retinanet_classification_loss,  # the public drop-in, focal_cuda.integrations.torchvision
    "index_batched": retinanet_classification_loss_batched,
    "dense": retinanet_classification_loss_dense,
}


# ============================================================================ a small detection batch

IN_CHANNELS, NUM_ANCHORS, NUM_CLASSES = 32, 9, 11
LEVELS = [(8, 8), (4, 4), (2, 2)]  # feature map sizes of a small FPN
BATCH = 3


def make_head(dtype: torch.dtype, init: str) -> RetinaNetClassificationHead:
    torch.manual_seed(0)  # torchvision's own initialisation draws from the global generator
    head = RetinaNetClassificationHead(IN_CHANNELS, NUM_ANCHORS, NUM_CLASSES)
    # "perturbed": logits spread over about [-20, 6] instead of sitting at the prior -log(99);
    # "saturated": logits of a few hundred, where 1 - p_t rounds to 0 for many anchors
    noise = {"torchvision": 0.0, "perturbed": 0.1, "saturated": 0.2}[init]
    if noise:
        with torch.no_grad():
            for p in head.parameters():
                p.add_(torch.randn_like(p) * noise)
    return head.to(dtype)


def make_batch(gen: torch.Generator, dtype: torch.dtype):
    """Feature maps, ground-truth labels per image and matched_idxs per anchor, as RetinaNet.compute_loss
    gets them: image 0 and 1 with boxes (foreground, background and between-thresholds anchors), image 2
    without any box (every anchor matched -1, as torchvision does for an image without targets)."""
    features = [randn((BATCH, IN_CHANNELS, h, w), gen, dtype=dtype) for h, w in LEVELS]
    num_anchors = NUM_ANCHORS * sum(h * w for h, w in LEVELS)
    targets, matched_idxs = [], []
    for image, num_boxes in enumerate((5, 2, 0)):
        labels = torch.randint(0, NUM_CLASSES, (num_boxes,), generator=gen)
        boxes = torch.rand((num_boxes, 4), generator=gen, dtype=torch.float64).to(dtype)  # unused by the loss
        if num_boxes == 0:
            matched = torch.full((num_anchors,), BELOW_LOW_THRESHOLD, dtype=torch.int64)
        else:
            u = torch.rand(num_anchors, generator=gen)
            matched = torch.randint(0, num_boxes, (num_anchors,), generator=gen)
            matched = torch.where(u < 0.8, torch.full_like(matched, BELOW_LOW_THRESHOLD), matched)
            matched = torch.where(u > 0.9, torch.full_like(matched, BETWEEN_THRESHOLDS), matched)
            assert (matched >= 0).any() and (matched == BETWEEN_THRESHOLDS).any()
        targets.append({"boxes": boxes, "labels": labels})
        matched_idxs.append(matched)
    return features, targets, matched_idxs


def loss_and_grads(head, features, targets, matched_idxs, loss_fn):
    """The loss and the gradients of every parameter of the head and of the feature maps."""
    head.zero_grad(set_to_none=True)
    feats = [f.detach().clone().requires_grad_() for f in features]
    head_outputs = {"cls_logits": head(feats)}
    assert head_outputs["cls_logits"].shape[-1] == NUM_CLASSES
    loss = loss_fn(targets, head_outputs, matched_idxs)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in head.named_parameters()}
    grads.update({f"features[{i}]": f.grad.detach().clone() for i, f in enumerate(feats)})
    return loss.detach(), grads


def assert_grads_close(actual: dict, expected: dict, rtol: float, msg: str) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        a, e = actual[name], expected[name]
        scale = float(e.abs().max())
        assert scale > 0, f"{msg}: test setup: the gradient of {name} is zero"
        torch.testing.assert_close(a.double(), e.double(), rtol=rtol, atol=rtol * scale,
                                   msg=lambda m, name=name: f"{msg}: {name}\n{m}")


# ============================================================================ tests


@pytest.mark.parametrize("init", ["torchvision", "perturbed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_classification_loss_matches_torchvision(gen, impl, dtype, init):
    head = make_head(dtype, init)
    features, targets, matched_idxs = make_batch(gen, dtype)
    ref_loss, ref_grads = loss_and_grads(head, features, targets, matched_idxs, head.compute_loss)
    loss, grads = loss_and_grads(head, features, targets, matched_idxs, IMPLEMENTATIONS[impl])
    assert loss.dtype == dtype and math.isfinite(float(loss)) and float(loss) > 0
    # float32: the two losses differ by the rounding of a few hundred summands; the gradients by the
    # rounding of d(loss)/d(logits), carried through the same convolutions
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(loss.double(), ref_loss.double(), rtol=rtol, atol=0)
    assert_grads_close(grads, ref_grads, rtol, f"{impl} vs torchvision compute_loss")


def test_float32_is_as_accurate_as_torchvision(gen):
    """Against torchvision's compute_loss in float64 on the same (float32) weights and features, focal_cuda's
    float32 loss and gradients are no further off than torchvision's own float32 ones (with slack 2x)."""
    head32 = make_head(torch.float32, "perturbed")
    features, targets, matched_idxs = make_batch(gen, torch.float32)
    head64 = make_head(torch.float32, "perturbed").double()
    exact_loss, exact = loss_and_grads(head64, [f.double() for f in features], targets, matched_idxs,
                                       head64.compute_loss)
    tv_loss, tv = loss_and_grads(head32, features, targets, matched_idxs, head32.compute_loss)
    ours_loss, ours = loss_and_grads(head32, features, targets, matched_idxs, retinanet_classification_loss)
    eps = torch.finfo(torch.float32).eps
    assert abs(float(ours_loss) - float(exact_loss)) <= max(2 * abs(float(tv_loss) - float(exact_loss)),
                                                           16 * eps * abs(float(exact_loss)))
    for name, e in exact.items():
        err_ours = float((ours[name].double() - e).abs().max())
        err_tv = float((tv[name].double() - e).abs().max())
        assert err_ours <= max(2 * err_tv, 64 * eps * float(e.abs().max())), (name, err_ours, err_tv)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 3.0])
def test_other_gamma_alpha(gen, gamma):
    """compute_loss hard-codes alpha=0.25, gamma=2: compare with torchvision's loss at other values too."""
    head = make_head(torch.float64, "perturbed")
    features, targets, matched_idxs = make_batch(gen, torch.float64)

    def torchvision_loss(targets, head_outputs, matched_idxs):
        import torchvision

        losses = []
        for t, logits, m in zip(targets, head_outputs["cls_logits"], matched_idxs):
            fg = m >= 0
            gt = torch.zeros_like(logits)
            gt[fg, t["labels"][m[fg]]] = 1.0
            valid = m != BETWEEN_THRESHOLDS
            losses.append(torchvision.ops.sigmoid_focal_loss(logits[valid], gt[valid], alpha=-1, gamma=gamma,
                                                             reduction="sum") / max(1, fg.sum()))
        return sum(losses) / len(targets)

    ref_loss, ref_grads = loss_and_grads(head, features, targets, matched_idxs, torchvision_loss)
    for impl in IMPLEMENTATIONS.values():
        def fn(t, h, m, impl=impl):
            return impl(t, h, m, alpha=-1, gamma=gamma)

        loss, grads = loss_and_grads(head, features, targets, matched_idxs, fn)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-11, atol=0)
        assert_grads_close(grads, ref_grads, 1e-11, f"gamma={gamma}")


def test_anchor_class_targets():
    labels = torch.tensor([3, 7])
    matched = torch.tensor([0, -1, 1, -2, 1, -1])
    assert anchor_class_targets(labels, matched, NUM_CLASSES).tolist() == [3, 11, 7, -2, 7, 11]


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_saturated_head_gamma_below_one(gen, impl):
    """gamma < 1 with saturated logits: torchvision's gradient is NaN (the derivative of (1 - p_t)**gamma at
    1 - p_t == 0); focal_cuda's loss equals torchvision's and its gradients are finite."""
    head = make_head(torch.float32, "saturated")
    features, targets, matched_idxs = make_batch(gen, torch.float32)

    def torchvision_loss(targets, head_outputs, matched_idxs):
        import torchvision

        losses = []
        for t, logits, m in zip(targets, head_outputs["cls_logits"], matched_idxs):
            fg = m >= 0
            gt = torch.zeros_like(logits)
            gt[fg, t["labels"][m[fg]]] = 1.0
            valid = m != BETWEEN_THRESHOLDS
            losses.append(torchvision.ops.sigmoid_focal_loss(logits[valid], gt[valid], gamma=0.5, reduction="sum")
                          / max(1, fg.sum()))
        return sum(losses) / len(targets)

    ref_loss, ref_grads = loss_and_grads(head, features, targets, matched_idxs, torchvision_loss)
    assert any(torch.isnan(g).any() for g in ref_grads.values()), "test setup: torchvision's gradient is NaN here"

    def fn(t, h, m):
        return IMPLEMENTATIONS[impl](t, h, m, gamma=0.5)

    loss, grads = loss_and_grads(head, features, targets, matched_idxs, fn)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    for name, g in grads.items():
        assert torch.isfinite(g).all(), name
        assert g.abs().sum() > 0, name


def test_use_fused_focal_loss_on_a_whole_retinanet(gen):
    """A whole (tiny) torchvision RetinaNet in training mode: with use_fused_focal_loss, the classification
    loss and every parameter's gradient equal the stock model's."""
    import copy
    from collections import OrderedDict

    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    class TinyBackbone(torch.nn.Module):
        out_channels = 16

        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(3, 16, 3, stride=4, padding=1)
            self.c2 = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1)

        def forward(self, x):
            a = self.c1(x).relu()
            return OrderedDict([("0", a), ("1", self.c2(a).relu())])

    torch.manual_seed(0)
    anchors = AnchorGenerator(sizes=((16,), (32,)), aspect_ratios=((0.5, 1.0, 2.0),) * 2)
    stock = RetinaNet(TinyBackbone(), num_classes=7, anchor_generator=anchors, min_size=64, max_size=64).double()
    fused = use_fused_focal_loss(copy.deepcopy(stock))
    images = [torch.rand((3, 64, 64), generator=gen, dtype=torch.float64) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]], dtype=torch.float64),
                "labels": torch.tensor([1, 5])},
               {"boxes": torch.tensor([[10.0, 10.0, 50.0, 30.0]], dtype=torch.float64), "labels": torch.tensor([3])}]
    results = []
    for model in (stock, fused):
        model.train()
        losses = model(images, targets)
        losses["classification"].backward()
        results.append((losses["classification"].detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-14, msg=name)


def test_use_fused_focal_loss_rejects_other_models():
    with pytest.raises(TypeError, match="RetinaNet"):
        use_fused_focal_loss(torch.nn.Linear(2, 2))
