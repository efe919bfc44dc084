"""Launches every CUDA kernel variant of focal_cuda once, at small sizes, and checks each result against
the float64 reference: the program scripts/gpu_check.sh runs under compute-sanitizer (memcheck,
racecheck, synccheck, initcheck). Exits non-zero on a mismatch.

    python scripts/gpu_kernel_tour.py [--device cuda]

The shapes are chosen so that the launcher (csrc/cuda/*_kernel.cu) picks each kernel: the rows kernel
at 1 to 256 lanes per row, long rows staged in shared memory and not, the channels kernel's two register
tiles, the positions kernel staged and not, the sigmoid dense / index / channel-first kernels with and
without 16-byte vectors, the count pre-pass and the backward kernel's three layouts.
"""

from __future__ import annotations

import argparse
import sys

import torch

import focal_cuda
from focal_cuda import reference

# (name, logits shape, layout, dtype): softmax cases. Layout "cl" = channels_last, "t" = transposed (N, C),
# "offset" = a view starting one element into its storage (misaligned rows and base).
SOFTMAX_CASES = [
    ("rows G=1 (C=5)", (300, 5), "contiguous", torch.float32),
    ("rows G=2 (C=21, misaligned rows)", (300, 21), "contiguous", torch.bfloat16),
    ("rows G=8 (C=81)", (200, 81), "contiguous", torch.float16),
    ("rows G=64 (C=1000)", (64, 1000), "contiguous", torch.float32),
    ("rows G=256 (C=4000)", (8, 4000), "contiguous", torch.bfloat16),
    ("rows, channels_last (C=19)", (2, 19, 9, 13), "cl", torch.bfloat16),
    ("rows, misaligned base", (50, 37), "offset", torch.float32),
    ("long rows staged (C=70001)", (3, 70001), "contiguous", torch.bfloat16),
    ("long rows staged float64", (2, 5000), "contiguous", torch.float64),
    ("channels small tile (C=2)", (2, 2, 33, 17), "contiguous", torch.float32),
    ("channels (C=19)", (2, 19, 31, 37), "contiguous", torch.bfloat16),
    ("channels (C=21, float16)", (2, 21, 16, 16), "contiguous", torch.float16),
    ("channels, transposed (N, C)", (257, 7), "t", torch.float32),
    ("positions staged (C=150)", (2, 150, 17, 19), "contiguous", torch.bfloat16),
    ("positions (C=3000, strided)", (2, 3000, 5), "contiguous", torch.float32),
]
# (name, logits shape, targets: "dense" / "dense32" (float32 targets) / "index" / "index_cf", dtype)
SIGMOID_CASES = [
    ("dense, 16-byte", (1000, 80), "dense", torch.float16),
    ("dense, float32 targets", (1000, 80), "dense32", torch.bfloat16),
    ("dense, scalar (odd view)", (999, 7), "dense_offset", torch.float32),
    ("index, 16-byte (C=80)", (1500, 80), "index", torch.float16),
    ("index, rows straddling packs (C=91)", (700, 91), "index", torch.bfloat16),
    ("index, C < VEC (C=3)", (900, 3), "index", torch.float16),
    ("index channel-first (C=5)", (2, 5, 24, 32), "index_cf", torch.bfloat16),
    ("index channel-first, odd spatial", (2, 7, 13, 11), "index_cf", torch.float32),
]


def make_logits(shape, layout, dtype, device, gen):
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2
    if layout == "cl":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "t":
        x = x.t().contiguous().t()
    elif layout == "offset":
        flat = torch.empty(x.numel() + 1, dtype=torch.float64)
        flat[1:] = x.flatten()
        x = flat[1:].view(shape)
    x = x.to(device=device, dtype=dtype)
    if layout == "offset":
        base = torch.empty(x.numel() + 1, dtype=dtype, device=device)
        base[1:].copy_(x.flatten())
        x = base[1:].view(shape)
    return x.requires_grad_()


def check(name, got, want, dtype) -> bool:
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    err = (got.double().cpu() - want.double().cpu()).abs().max().item() if got.numel() else 0.0
    scale = max(want.double().abs().max().item(), 1.0) if want.numel() else 1.0
    ok = err <= tol * scale
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max abs error {err:.3g} (scale {scale:.3g})")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    ok = True
    for name, shape, layout, dtype in SOFTMAX_CASES:
        x = make_logits(shape, layout, dtype, device, gen)
        target = torch.randint(0, shape[1], (shape[0], *shape[2:]), generator=gen)
        target[torch.rand(target.shape, generator=gen) < 0.1] = -100
        target = target.to(device)
        for reduction in ("mean", "none"):
            loss = focal_cuda.softmax_focal_loss(x, target, gamma=2.0, reduction=reduction)
            (grad,) = torch.autograd.grad(loss.sum(), x)
            xd = x.detach().double().requires_grad_()
            want = reference.softmax_focal_loss(xd, target, gamma=2.0, reduction=reduction)
            (want_grad,) = torch.autograd.grad(want.sum(), xd)
            ok &= check(f"softmax {name} {reduction}: loss", loss.detach(), want.detach(), dtype)
            ok &= check(f"softmax {name} {reduction}: grad", grad, want_grad, dtype)
    for name, shape, kind, dtype in SIGMOID_CASES:
        x = make_logits(shape, "offset" if kind == "dense_offset" else "contiguous", dtype, device, gen)
        if kind.startswith("dense"):
            t = (torch.rand(shape, generator=gen) < 0.1).to(torch.float32 if kind == "dense32" else dtype).to(device)
            kwargs = {}
        else:
            classes = shape[1] if kind == "index_cf" else shape[-1]
            t_shape = (shape[0], *shape[2:]) if kind == "index_cf" else shape[:-1]
            t = torch.randint(0, classes + 1, t_shape, generator=gen)
            t[torch.rand(t_shape, generator=gen) < 0.1] = -1
            t = t.to(device)
            kwargs = dict(ignore_index=-1, class_dim=1) if kind == "index_cf" else dict(ignore_index=-1)
        for reduction in ("sum", "none"):
            loss = focal_cuda.sigmoid_focal_loss(x, t, reduction=reduction, **kwargs)
            (grad,) = torch.autograd.grad(loss.sum(), x)
            xd = x.detach().double().requires_grad_()
            want = reference.sigmoid_focal_loss(xd, t, reduction=reduction, **kwargs)
            (want_grad,) = torch.autograd.grad(want.sum(), xd)
            ok &= check(f"sigmoid {name} {reduction}: loss", loss.detach(), want.detach(), dtype)
            ok &= check(f"sigmoid {name} {reduction}: grad", grad, want_grad, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize()
    print("all kernel variants match the reference" if ok else "MISMATCHES: see FAIL lines above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
