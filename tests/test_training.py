"""focal_cuda in real training: the examples in examples/ (segmentation: LR-ASPP MobileNetV3 with the softmax
focal loss; detection: RetinaNet with the sigmoid focal loss), mixed precision, torch.compile and
DistributedDataParallel.

- the examples train a few steps with focal_cuda and with the reference loss from the same seed: the same
  loss curve (float32 rounding), and the time per step of each is printed (run with -s to see it);
- autocast (bfloat16, and float16 with a GradScaler) gives the float32 losses and gradients within the
  dtype's tolerance; the logits reach the fused op in the autocast dtype and the loss makes no float32
  copy of them (the reference does: the check is shown to catch it);
- a whole training step (model, loss, backward) compiles with fullgraph=True and matches eager;
- 2 processes (gloo, CPU) with DDP and the loss normalised by an all-reduced device tensor get the
  gradients of 1 process on the combined batch, step after step.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import focal_cuda  # noqa: E402
from examples import common  # noqa: E402
from examples import train_detection as det  # noqa: E402
from examples import train_segmentation as seg  # noqa: E402

STEPS = 3
# Tensor.backward inside a compiled graph (torch._dynamo.config.trace_autograd_ops) is not in torch 2.8 and
# older; with those, the compile tests compile forward and loss, and backward runs eagerly through that graph.
TRACE_BACKWARD = hasattr(torch._dynamo.config, "trace_autograd_ops")


def trace_backward():
    return torch._dynamo.config.patch(trace_autograd_ops=True) if TRACE_BACKWARD else contextlib.nullcontext()


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """Replaces conftest's fixture of that name for this file: deterministic mode (sort-based index_put in
    torchvision's loss) and NaN-filling every empty() would distort the times per step these tests print.
    The kernels' outputs are checked for unwritten elements by the op tests."""
    yield


def seg_args(**kw) -> argparse.Namespace:
    a = dict(steps=STEPS, batch_size=2, image_size=64, num_classes=5, lr=0.02, seed=0, amp="none", compile=False)
    a.update(kw)
    return argparse.Namespace(**a)


def det_args(**kw) -> argparse.Namespace:
    a = dict(steps=STEPS, batch_size=2, image_size=128, num_classes=5, lr=0.01, seed=0, amp="none", compile=False,
             width=32, normalizer="global")
    a.update(kw)
    return argparse.Namespace(**a)


def single(device: str) -> common.DistInfo:
    return common.DistInfo(0, 1, 0, torch.device(device))


def report(title: str, histories) -> None:
    print(f"\n--- {title}")
    common.print_summary(histories)


def random_anchor_targets(shape, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """RetinaNet index targets: classes, background (num_classes) and ignored (BETWEEN_THRESHOLDS)."""
    index = torch.randint(-1, num_classes + 1, shape, generator=gen)
    return torch.where(index == -1, torch.full_like(index, det.BETWEEN_THRESHOLDS), index)


def flat_grad(grads: dict) -> torch.Tensor:
    return torch.cat([g.double().flatten() for _, g in sorted(grads.items())])


# ============================================================================ (1) the examples, focal_cuda vs reference


EXAMPLES = {
    "segmentation": (seg.run, seg_args),
    "detection-image": (det.run, lambda **kw: det_args(normalizer="image", **kw)),
    "detection-global": (det.run, det_args),
}


@pytest.mark.parametrize("example", list(EXAMPLES))
def test_example_loss_curve_matches_reference(device, example):
    run, make_args = EXAMPLES[example]
    args = make_args()
    info = single(device)
    hists = [run(args, name, info, log=None) for name in ("focal_cuda", "reference")]
    report(f"{example} on {device}, {STEPS} steps", hists)
    ours, ref = hists
    assert all(torch.isfinite(torch.tensor(h.losses)).all() for h in hists)
    # Same weights, same data: the curves differ by float32 rounding of the loss, carried through a few
    # SGD steps.
    torch.testing.assert_close(torch.tensor(ours.losses, dtype=torch.float64),
                               torch.tensor(ref.losses, dtype=torch.float64), rtol=2e-4, atol=0)
    for a, b in zip(ours.parts, ref.parts):
        for k in b:
            assert abs(a[k] - b[k]) <= 2e-4 * abs(b[k]) + 1e-7, (k, a[k], b[k])


def test_examples_command_line(capsys):
    """The scripts' entry points as the README runs them (with --steps 2): both losses, a summary."""
    for module, extra in ((seg, []), (det, ["--width", "32"])):
        histories = module.main(["--loss", "both", "--steps", "2", "--device", "cpu", *extra])
        assert [h.name for h in histories] == ["focal_cuda", "reference"]
        out = capsys.readouterr().out
        assert "ms/step" in out and "largest relative difference of the loss curves" in out
        with capsys.disabled():
            print("\n" + out)


@pytest.mark.parametrize("script", ["train_segmentation.py", "train_detection.py"])
def test_examples_device_cuda_without_gpu(script):
    """--device cuda where no GPU is visible: a message that says so, not a traceback."""
    import subprocess

    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # hides a GPU where there is one
    out = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--device", "cuda", "--steps", "1"],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode != 0
    assert "--device cuda: no GPU is visible" in out.stderr and "--device cpu" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    for bad, says in (("gpu", "--device gpu: Expected one of"), ("meta", "the examples run on cpu or cuda")):
        with pytest.raises(SystemExit, match=says):
            common.check_device(bad)


# ============================================================================ (2) mixed precision


class FocalCalls(TorchDispatchMode):
    """Records the dtype of the logits reaching the fused ops, and every floating tensor an op creates
    whose size is at least ``min_numel`` (a copy of the logits would be one)."""

    def __init__(self, min_numel: int = 0):
        super().__init__()
        self.min_numel = min_numel
        self.focal_inputs: list[torch.dtype] = []
        self.large_outputs: list[tuple[str, torch.dtype, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket._qualified_op_name) if hasattr(func, "overloadpacket") else str(func)
        if name in ("focal_cuda::softmax_focal_loss_forward", "focal_cuda::sigmoid_focal_loss_forward"):
            self.focal_inputs.append(args[0].dtype)
        out = func(*args, **kwargs)
        if self.min_numel:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() >= self.min_numel:
                    self.large_outputs.append((name, t.dtype, tuple(t.shape)))
        return out


AMP = ["bf16", "fp16"]
# |amp - float32| / |float32| of the loss and of the whole gradient vector: a network of ~60 layers in
# bfloat16 (eps 2**-8) / float16 (eps 2**-11) against float32; measured about 2e-3 / 4e-4.
AMP_RTOL = {"bf16": 3e-2, "fp16": 5e-3}


def amp_step(model, loss_of_batch, batch, device, amp):
    """One step's loss and parameter gradients (unscaled) under ``amp``, and the logits dtypes the fused op saw."""
    model.zero_grad(set_to_none=True)
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = common.make_grad_scaler(device) if amp == "fp16" else None
    opt = torch.optim.SGD(params, lr=0.0)
    calls = FocalCalls()
    with calls, common.autocast(device, amp):
        loss, _ = loss_of_batch(model, batch)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(opt)
        assert all(torch.isfinite(p.grad).all() for p in params)
    grad = torch.cat([p.grad.double().flatten() for p in params])
    return loss.detach().double(), grad, calls.focal_inputs


@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("example", ["segmentation", "detection"])
def test_autocast_step_matches_float32(device, example, amp):
    dev = torch.device(device)
    if example == "segmentation":
        model = seg.build_model(5, seed=0).to(dev).train()
        batch = common.segmentation_batch(range(2), 64, 5, 0, dev)
        loss_of_batch = seg.make_loss_of_batch(focal_cuda, 1)
    else:
        model = det.build_model(5, 128, 32, seed=0)
        model = det.prepare(model, "focal_cuda", "global", 1, False).to(dev).train()
        batch = common.detection_batch(range(2), 128, 5, 0, dev)
        loss_of_batch = det.loss_of_batch
    loss32, grad32, dtypes32 = amp_step(model, loss_of_batch, batch, dev, "none")
    loss, grad, dtypes = amp_step(model, loss_of_batch, batch, dev, amp)
    assert dtypes32 == [torch.float32]
    assert dtypes == [common.AMP_DTYPES[amp]], f"the fused op got logits of dtype {dtypes}"
    rtol = AMP_RTOL[amp]
    rel_loss = float((loss - loss32).abs() / loss32.abs())
    rel_grad = float((grad - grad32).norm() / grad32.norm())
    print(f"\n{example} {amp} on {device}: loss {float(loss):.6f} vs float32 {float(loss32):.6f} "
          f"(rel {rel_loss:.1e}), gradient rel. error {rel_grad:.1e}")
    assert rel_loss < rtol and rel_grad < rtol


@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("example", ["segmentation", "detection"])
def test_autocast_loss_makes_no_float32_copy(device, example, amp):
    """The examples' loss on the logits an autocast forward produces: the fused op gets them as they are,
    and no op of the loss or of its backward creates a float32 (or any floating) tensor of the logits'
    size except the gradient itself, in the logits' dtype. The reference loss, run the same way, does
    make the float32 copy: the check sees it."""
    dev = torch.device(device)
    dtype = common.AMP_DTYPES[amp]
    gen = torch.Generator().manual_seed(1)
    if example == "segmentation":
        masks = common.segmentation_batch(range(2), 32, 5, 0, dev)[1]
        logits = torch.randn((2, 5, 32, 32), generator=gen).to(dev, dtype)

        def loss_fn(module, x):
            return seg.segmentation_loss(module, x, masks, 1)
    else:
        num_anchors, num_classes = 900, 5
        index = random_anchor_targets((2, num_anchors), num_classes, gen).to(dev)
        logits = (torch.randn((2, num_anchors, num_classes), generator=gen) - 4).to(dev, dtype)
        normalizer = ((index >= 0) & (index < num_classes)).sum().clamp(min=1)

        def loss_fn(module, x):
            return det.global_classification_loss(module, x, index, normalizer, 1)

    for name, module in common.LOSSES.items():
        x = logits.detach().requires_grad_()
        calls = FocalCalls(min_numel=logits.numel())
        with calls, common.autocast(dev, amp):
            loss = loss_fn(module, x)
            (g,) = torch.autograd.grad(loss, x)
        assert g.dtype == dtype and torch.isfinite(g).all()
        copies = [o for o in calls.large_outputs if o[1] != dtype]
        if name == "focal_cuda":
            assert calls.focal_inputs == [dtype]
            assert not copies, f"focal_cuda made logits-sized tensors of another dtype: {copies}"
            # the gradient buffer the forward writes is the only logits-sized tensor
            assert len(calls.large_outputs) <= 2, calls.large_outputs
        else:
            assert any(o[1] == torch.float32 for o in copies), "the check should see the reference's float32 copy"


# ============================================================================ (3) torch.compile


class TinySegmenter(nn.Module):
    """A small encoder-decoder with the LR-ASPP output convention ({"out": (N, C, H, W)}), for compile time."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.classifier = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        y = self.classifier(self.body(x))
        return {"out": nn.functional.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)}


def test_compiled_training_step_matches_eager(device):
    """Forward, the example's focal loss (ignore 255, uint8 masks) and backward in one fullgraph=True graph
    (Tensor.backward traced: torch._dynamo.config.trace_autograd_ops); 2 SGD steps against eager."""
    dev = torch.device(device)
    loss_of_batch = seg.make_loss_of_batch(focal_cuda, 1)
    batches = [common.segmentation_batch(range(2 * s, 2 * s + 2), 32, 5, 0, dev) for s in range(2)]

    def train(compiled: bool):
        torch.manual_seed(0)
        model = TinySegmenter().to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def forward_loss(images, masks):
            return loss_of_batch(model, (images, masks))[0]

        def step(images, masks):
            loss = forward_loss(images, masks)
            loss.backward()
            return loss.detach()

        if compiled:
            torch._dynamo.reset()
            # any graph break (e.g. at the loss) is an error
            if TRACE_BACKWARD:
                step = torch.compile(step, fullgraph=True)
            else:
                forward_loss = torch.compile(forward_loss, fullgraph=True)
        losses, grads = [], []
        for images, masks in batches:
            opt.zero_grad(set_to_none=True)
            losses.append(step(images, masks))
            grads.append(flat_grad({n: p.grad for n, p in model.named_parameters()}))
            opt.step()
        return torch.stack(losses), grads

    with trace_backward():
        compiled_losses, compiled_grads = train(True)
    eager_losses, eager_grads = train(False)
    torch.testing.assert_close(compiled_losses, eager_losses, rtol=1e-5, atol=0)
    for a, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5 * float(e.abs().max()))


def test_compiled_detection_loss_no_graph_break(device):
    """RetinaNet's classification head and the globally normalised sigmoid focal loss (index targets, device
    normaliser) with backward: one graph (torch._dynamo.explain: no break), equal to eager."""
    from torchvision.models.detection.retinanet import RetinaNetClassificationHead

    dev = torch.device(device)
    gen = torch.Generator().manual_seed(2)
    features = [torch.randn((2, 16, s, s), generator=gen).to(dev) for s in (8, 4)]
    index = random_anchor_targets((2, 9 * (64 + 16)), 5, gen).to(dev)

    def grads(compiled: bool):
        torch.manual_seed(0)
        head = RetinaNetClassificationHead(16, 9, 5).to(dev)

        def forward_loss(feats, index):
            logits = head(feats)
            normalizer = ((index >= 0) & (index < 5)).sum().clamp(min=1)
            return det.global_classification_loss(focal_cuda, logits, index, normalizer, 1)

        def step(feats, index):
            loss = forward_loss(feats, index)
            loss.backward()
            return loss.detach()

        if compiled:
            traced = step if TRACE_BACKWARD else forward_loss
            torch._dynamo.reset()
            explanation = torch._dynamo.explain(traced)(features, index)
            assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons
            torch._dynamo.reset()
            head.zero_grad(set_to_none=True)
            if TRACE_BACKWARD:
                step = torch.compile(step, fullgraph=True)
            else:
                forward_loss = torch.compile(forward_loss, fullgraph=True)
        loss = step(features, index)
        return loss, flat_grad({n: p.grad for n, p in head.named_parameters()})

    with trace_backward():
        c_loss, c_grad = grads(True)
    e_loss, e_grad = grads(False)
    torch.testing.assert_close(c_loss, e_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(c_grad, e_grad, rtol=1e-4, atol=1e-5 * float(e_grad.abs().max()))


# ============================================================================ (4) DistributedDataParallel


DDP_STEPS = 3


@pytest.fixture(autouse=True)
def poison_uninitialized_memory():
    """Replaces conftest's fixture of that name for this file: deterministic mode (sort-based index_put in
    torchvision's loss) and NaN-filling every empty() would distort the times per step these tests print.
    The kernels' outputs are checked for unwritten elements by the op tests."""
    yield


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank: the torchrun environment, gloo, both examples with DDP and the all-reduced normalisers."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = common.init_distributed("cpu")
    try:
        results = {
            "segmentation": seg.run(seg_args(steps=DDP_STEPS), "focal_cuda", info, record_grads=True, log=None),
            "detection": det.run(det_args(steps=DDP_STEPS), "focal_cuda", info, record_grads=True, log=None),
        }
        torch.save({k: (h.losses, h.grads) for k, h in results.items()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        common.shutdown_distributed()


def test_ddp_two_processes_match_one_process_on_the_combined_batch():
    """2 ranks x 2 images (gloo, CPU): DDP, loss normalised by all-reduced counts (labelled pixels; positive
    anchors), against 1 process x 4 images. Every step's gradients (after DDP's average) and losses agree."""
    import torch.multiprocessing as mp

    world_size = 2
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_ddp_worker, args=(world_size, free_port(), out_dir), nprocs=world_size, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world_size)]

    info = single("cpu")
    expected = {
        "segmentation": seg.run(seg_args(steps=DDP_STEPS, batch_size=4), "focal_cuda", info, record_grads=True,
                                log=None),
        "detection": det.run(det_args(steps=DDP_STEPS, batch_size=4), "focal_cuda", info, record_grads=True,
                             log=None),
    }
    for example, hist in expected.items():
        losses, grads = ranks[0][example]
        print(f"\nDDP {example}: 2 processes x 2 images {[f'{x:.6f}' for x in losses]}, "
              f"1 process x 4 images {[f'{x:.6f}' for x in hist.losses]}")
        # step 1 agrees to float32 rounding; later steps also carry the rounding of the earlier updates
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(hist.losses), rtol=2e-4, atol=0)
        for step, (g_ddp, g_one) in enumerate(zip(grads, hist.grads)):
            assert g_ddp.keys() == g_one.keys()
            # DDP leaves the same averaged gradient on every rank
            other = ranks[1][example][1][step]
            for name in g_ddp:
                torch.testing.assert_close(other[name], g_ddp[name], rtol=0, atol=0)
            a, e = flat_grad(g_ddp), flat_grad(g_one)
            rel = float((a - e).norm() / e.norm())
            print(f"  step {step + 1}: gradient relative difference {rel:.1e}")
            for name in g_one:
                e_t = g_one[name].double()
                scale = float(e.abs().max())
                torch.testing.assert_close(g_ddp[name].double(), e_t, rtol=1e-4, atol=1e-5 * scale,
                                           msg=lambda m, name=name, step=step: f"{example} step {step + 1} {name}\n{m}")
