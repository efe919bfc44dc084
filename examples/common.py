"""Pieces shared by the training examples (and imported by tests/test_training.py).

- the per-process setup: ``torchrun`` / ``torch.multiprocessing`` environment (``WORLD_SIZE``, ``RANK``,
  ``LOCAL_RANK``), ``init_process_group`` with NCCL on CUDA and gloo on the CPU, one GPU per process;
- generated data: every sample is drawn from its own generator seeded by (seed, sample index), so a
  rank generates only its own share of the global batch and the shares of all ranks together are
  exactly the batch one process would draw (a ``DistributedSampler`` over contiguous blocks);
- ``global_sum``: a device tensor summed over the ranks (``all_reduce``), the loss normaliser;
- ``train``: the timing loop (autocast, ``GradScaler`` for float16, optional ``torch.compile`` of the
  whole step), which prints the loss and the time of every step and returns them;
- ``print_summary``: the loss curves and the median time per step of each loss side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

import focal_cuda
import focal_cuda.reference
from focal_cuda._quiet import quiet_cpu_only_notices

# torch.compile (--compile) would print torch's "No CUDA runtime is found" notice on a machine without a GPU.
quiet_cpu_only_notices()

# The two implementations have the same signatures and semantics: the examples take either module.
LOSSES = {"focal_cuda": focal_cuda, "reference": focal_cuda.reference}


# ============================================================================ arguments


def cuda_default() -> bool:
    return torch.cuda.is_available()


def add_common_args(parser: argparse.ArgumentParser, cpu: dict[str, Any], cuda: dict[str, Any]) -> None:
    """The options every example takes; ``cpu`` / ``cuda``: the defaults without / with a GPU."""
    d = cuda if cuda_default() else cpu
    parser.add_argument("--loss", choices=["focal_cuda", "reference", "both"], default="both",
                        help="which focal loss trains the model; 'both' trains twice from the same seed")
    parser.add_argument("--steps", type=int, default=d["steps"])
    parser.add_argument("--batch-size", type=int, default=d["batch_size"], help="images per process")
    parser.add_argument("--image-size", type=int, default=d["image_size"])
    parser.add_argument("--num-classes", type=int, default=d["num_classes"])
    parser.add_argument("--lr", type=float, default=d["lr"])
    parser.add_argument("--device", default="cuda" if cuda_default() else "cpu",
                        help="cpu or cuda (under torchrun each process takes cuda:LOCAL_RANK)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                        help="torch.autocast dtype; fp16 adds a GradScaler")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the training step (see the example's docstring for what is compiled)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads on the CPU (0: leave it)")


# ============================================================================ processes


@dataclasses.dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def check_device(device: str) -> torch.device:
    """``--device`` as a torch.device, or an exit with a message that says what is wrong (no traceback)."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise SystemExit(f"error: --device {device}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"error: --device {device}: no GPU is visible to torch {torch.__version__} "
                             f"(torch.cuda.is_available() is False; CUDA_VISIBLE_DEVICES="
                             f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}); run on the CPU with --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SystemExit(f"error: --device {device}: only {torch.cuda.device_count()} GPU(s) are visible")
    elif dev.type != "cpu":
        raise SystemExit(f"error: --device {device}: the examples run on cpu or cuda")
    return dev


def init_distributed(device: str) -> DistInfo:
    """Reads the launcher's environment (``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) and joins the process group: NCCL for CUDA, gloo for the CPU.
    A single process (no ``WORLD_SIZE``) needs no process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = check_device(device)
    if dev.type == "cuda":
        index = local_rank if world_size > 1 else (dev.index or 0)
        dev = torch.device("cuda", index)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return DistInfo(rank, world_size, local_rank, dev)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def global_sum(t: Tensor) -> Tensor:
    """``t`` summed over all ranks, on ``t``'s device (no host synchronisation with NCCL); ``t`` itself
    with one process. Used for the loss normalisers: the number of positive anchors, of labelled pixels."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank_sample_indices(step: int, batch_size: int, info: DistInfo) -> list[int]:
    """The global sample indices of this rank at ``step``: the global batch of step ``s`` is samples
    ``s * B * W ... (s + 1) * B * W - 1`` (``B`` images per process, ``W`` processes); rank ``r`` takes
    the ``r``-th contiguous block of ``B``. One process with batch ``B * W`` sees the same images."""
    start = (step * info.world_size + info.rank) * batch_size
    return list(range(start, start + batch_size))


def sample_generator(seed: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


# ============================================================================ generated data


def _palette(num_classes: int, seed: int) -> Tensor:
    """One RGB colour per class (class 0 is background)."""
    return torch.rand((num_classes, 3), generator=torch.Generator().manual_seed(seed + 7919))


def segmentation_sample(index: int, image_size: int, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """A noisy image with 1-3 coloured ellipses and its mask (uint8, 0 = background, ``1..C-1`` the
    ellipses' classes, 255 = ignore on a band along every ellipse boundary, as in Pascal VOC)."""
    g = sample_generator(seed, index)
    s = image_size
    palette = _palette(num_classes, seed)
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32),
                            indexing="ij")
    mask = torch.zeros((s, s), dtype=torch.uint8)
    image = palette[0].view(3, 1, 1).expand(3, s, s).clone()
    for _ in range(int(torch.randint(1, 4, (), generator=g))):
        cls = int(torch.randint(1, num_classes, (), generator=g))
        cx, cy = (torch.rand(2, generator=g) * s).tolist()
        ax, ay = ((0.1 + 0.25 * torch.rand(2, generator=g)) * s).tolist()
        r = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2
        inside = r <= 1.0
        band = (r > 0.8) & (r < 1.25)
        mask[inside] = cls
        image[:, inside] = palette[cls].view(3, 1)
        mask[band] = 255
    image = (image + 0.15 * torch.randn((3, s, s), generator=g)).clamp(0, 1)
    return image, mask


def segmentation_batch(indices: Sequence[int], image_size: int, num_classes: int, seed: int,
                       device: torch.device) -> tuple[Tensor, Tensor]:
    """Images ``(B, 3, S, S)`` float32 and masks ``(B, S, S)`` uint8 (255 = ignore) on ``device``."""
    samples = [segmentation_sample(i, image_size, num_classes, seed) for i in indices]
    images = torch.stack([im for im, _ in samples]).to(device)
    masks = torch.stack([m for _, m in samples]).to(device)
    return images, masks


def detection_sample(index: int, image_size: int, num_classes: int, seed: int) -> tuple[Tensor, dict[str, Tensor]]:
    """A noisy image with 1-4 coloured rectangles and their boxes (xyxy, pixels) and labels in ``[0, C)``."""
    g = sample_generator(seed, index)
    s = image_size
    palette = _palette(num_classes + 1, seed)  # colour 0: background
    image = palette[0].view(3, 1, 1).expand(3, s, s).clone()
    boxes, labels = [], []
    for _ in range(int(torch.randint(1, 5, (), generator=g))):
        cls = int(torch.randint(0, num_classes, (), generator=g))
        w, h = ((0.15 + 0.35 * torch.rand(2, generator=g)) * s).tolist()
        x0 = float(torch.rand((), generator=g)) * (s - w)
        y0 = float(torch.rand((), generator=g)) * (s - h)
        x1, y1 = x0 + w, y0 + h
        image[:, int(y0):int(y1), int(x0):int(x1)] = palette[cls + 1].view(3, 1, 1)
        boxes.append([x0, y0, x1, y1])
        labels.append(cls)
    image = (image + 0.15 * torch.randn((3, s, s), generator=g)).clamp(0, 1)
    return image, {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64)}


def detection_batch(indices: Sequence[int], image_size: int, num_classes: int, seed: int,
                    device: torch.device) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """A list of images ``(3, S, S)`` and a list of targets ``{"boxes", "labels"}``, as RetinaNet takes them."""
    samples = [detection_sample(i, image_size, num_classes, seed) for i in indices]
    images = [im.to(device) for im, _ in samples]
    targets = [{k: v.to(device) for k, v in t.items()} for _, t in samples]
    return images, targets


# ============================================================================ the training loop


AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# The focal loss of float16 logits is float16 (its output dtype is the input's), so the gradient reaching it
# is GradScaler's scale itself: the default initial scale 2**16 is above float16's largest value (65504),
# the first steps would overflow and be skipped until the scale came down. Start lower.
GRAD_SCALER_INIT_SCALE = 2.0**12


def make_grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(device.type, init_scale=GRAD_SCALER_INIT_SCALE)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass
class History:
    """What one training run returns (on every rank; the losses are the global ones)."""
    name: str
    losses: list[float]
    times: list[float]  # seconds per step
    parts: list[dict[str, float]]
    grads: list[dict[str, Tensor]]  # per step, when recorded: parameter name -> gradient (CPU, after DDP)

    def median_time(self) -> float:
        """Median seconds per step, the first (warm-up / compilation) step left out when there are others."""
        times = self.times[1:] if len(self.times) > 1 else self.times
        return statistics.median(times)


def train(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_of_step: Callable[[int], Any],
    loss_of_batch: Callable[[nn.Module, Any], tuple[Tensor, dict[str, Tensor]]],
    *,
    steps: int,
    info: DistInfo,
    amp: str = "none",
    compile: bool = False,
    fullgraph: bool = True,
    record_grads: bool = False,
    log: Optional[Callable[[str], None]] = print,
) -> History:
    """Runs ``steps`` optimizer steps. ``loss_of_batch(model, batch)`` returns this rank's loss (already
    scaled so that DDP's gradient average is the gradient of the global loss) and its parts.

    Per step: the batch is made first (not timed), then forward, loss, backward and the optimizer step
    are timed (with a device synchronisation). The printed loss is the global loss (``all_reduce`` of
    the ranks' losses / world size, after the timed part). ``compile``: the whole step (forward, loss,
    backward) is one ``torch.compile(fullgraph=True)`` graph when this torch can trace
    ``Tensor.backward`` (``torch._dynamo.config.trace_autograd_ops``) and ``fullgraph`` is set, else forward and loss are, and
    AOTAutograd compiles the backward. ``fullgraph=False`` for the reference loss: its check of the class
    indices (``if bad.any(): raise``) is a data-dependent branch, a graph break.
    """
    device = info.device
    scaler = make_grad_scaler(device) if amp == "fp16" else None
    plain = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    params = [(n, p) for n, p in plain.named_parameters() if p.requires_grad]

    def forward_loss(batch):
        with autocast(device, amp):
            loss, parts = loss_of_batch(model, batch)
        return loss, parts

    def forward_backward(batch):
        loss, parts = forward_loss(batch)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss.detach(), {k: v.detach() for k, v in parts.items()}

    step_fn = forward_backward
    backward_inside = True
    if compile:
        # Tensor.backward inside a graph with breaks (the reference) trains wrongly with this torch: there
        # the backward stays outside, compiled by AOTAutograd.
        if fullgraph and hasattr(torch._dynamo.config, "trace_autograd_ops"):
            torch._dynamo.config.trace_autograd_ops = True
            step_fn = torch.compile(forward_backward, fullgraph=fullgraph)
        else:
            backward_inside = False
            step_fn = torch.compile(forward_loss, fullgraph=fullgraph)

    hist = History(name, [], [], [], [])
    for step in range(steps):
        batch = batch_of_step(step)
        synchronize(device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        if backward_inside:
            loss, parts = step_fn(batch)
        else:
            loss, parts = step_fn(batch)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            loss = loss.detach()
        if scaler is not None:
            scaler.unscale_(optimizer)
        if record_grads:
            hist.grads.append({n: p.grad.detach().float().cpu().clone() for n, p in params if p.grad is not None})
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        synchronize(device)
        dt = time.perf_counter() - t0
        values = torch.stack([loss.float(), *[v.float() for v in parts.values()]])
        values = (global_sum(values) / info.world_size).tolist()
        hist.losses.append(values[0])
        hist.parts.append(dict(zip(parts, values[1:])))
        hist.times.append(dt)
        if log is not None and info.is_main:
            detail = "".join(f"  {k} {v:.6f}" for k, v in hist.parts[-1].items())
            log(f"[{name:10s}] step {step + 1:3d}/{steps}  loss {values[0]:.6f}{detail}  {dt * 1e3:8.1f} ms")
    return hist


def print_summary(histories: Sequence[History], log: Callable[[str], None] = print) -> None:
    """The loss curves side by side, their largest relative difference, and the time per step of each."""
    if not histories:
        return
    names = [h.name for h in histories]
    log("")
    log("step  " + "".join(f"{n:>14s}" for n in names))
    for i in range(len(histories[0].losses)):
        log(f"{i + 1:4d}  " + "".join(f"{h.losses[i]:14.6f}" for h in histories))
    if len(histories) == 2:
        a, b = histories
        diff = max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a.losses, b.losses))
        log(f"largest relative difference of the loss curves: {diff:.2e}")
    for h in histories:
        n = len(h.times) - 1 if len(h.times) > 1 else len(h.times)
        log(f"{h.name:10s}: {h.median_time() * 1e3:8.1f} ms/step (median of {n} steps, first step excluded)")
    if len(histories) == 2 and histories[0].median_time() > 0:
        log(f"{histories[1].name} / {histories[0].name} time per step: "
            f"{histories[1].median_time() / histories[0].median_time():.2f}x")


def loss_names(choice: str) -> list[str]:
    return ["focal_cuda", "reference"] if choice == "both" else [choice]


def describe(info: DistInfo, args: argparse.Namespace, extra: str = "") -> str:
    return (f"device {info.device}, {info.world_size} process(es), {args.batch_size} image(s) per process, "
            f"{args.image_size}x{args.image_size}, {args.num_classes} classes, amp {args.amp}, "
            f"compile {args.compile}, torch {torch.__version__}, focal_cuda cuda build {focal_cuda.build_info()['cuda']}"
            + (f", {extra}" if extra else ""))
