"""focal_cuda's fused kernels against the memory floor on this GPU: the verdict table of scripts/gpu_check.sh.

    python -m bench.roofline [--csv PATH] [--ncu-csv PATH] [--once] [--device cuda] [--small]

For each workload of issue 10 (the shapes a training step meets), one full training step of focal_cuda
(forward with the gradient, then backward) is timed with CUDA events over rotating input buffers, median
of --reps. Its floor is the bytes the fused kernel must move (logits and targets read once, the gradient
written once); bytes / time is set against the datasheet HBM bandwidth of the device (by name) and against
a device-to-device copy measured in the same run. The PREDICTED fraction next to it is docs/design.md's
(section 7), made without a GPU; the verdict is whether the measurement reaches the issue's target.

--once runs each workload once, nothing timed (a program for ncu). --device cpu --small checks this
script's own logic on a machine without a GPU (the timings then mean nothing).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

import focal_cuda

# Datasheet HBM bandwidth in bytes / s, by a substring of the device name.
DATASHEET = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12), ("A100-SXM4-80GB", 2.04e12),
             ("A100", 1.56e12), ("L40S", 0.864e12), ("L4", 0.3e12), ("A10", 0.6e12), ("B200", 8.0e12)]


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    loss: str  # softmax / sigmoid
    targets: str  # index / dense
    shape: tuple
    small_shape: tuple
    dtype: torch.dtype
    reduction: str
    target: float  # the target fraction of HBM bandwidth
    predicted_h100: float  # PREDICTED fraction, docs/design.md section 7
    predicted_h200: float

    def make(self, device, small: bool, seed: int):
        shape = self.small_shape if small else self.shape
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = (torch.randn(shape, generator=gen, dtype=torch.float32) * 2).to(device=device, dtype=self.dtype)
        if self.loss == "softmax":
            c = shape[1]
            t = torch.randint(0, c, (shape[0], *shape[2:]), generator=gen)
            if self.name.startswith("segmentation"):
                t[torch.rand(t.shape, generator=gen) < 0.05] = 255
                t = t.to(torch.uint8)
            return x, t.to(device)
        c = shape[-1]
        labels = torch.randint(0, c, shape[:-1], generator=gen)
        labels = torch.where(torch.rand(shape[:-1], generator=gen) > 0.01, torch.full_like(labels, c), labels)
        if self.targets == "dense":
            return x, torch.nn.functional.one_hot(labels, c + 1)[..., :c].to(device=device, dtype=self.dtype)
        return x, labels.to(device)

    def floor_bytes(self, x: torch.Tensor, t: torch.Tensor) -> int:
        """Logits and targets read once, the gradient written once."""
        return 2 * x.numel() * x.element_size() + t.numel() * t.element_size()

    def step(self, x: torch.Tensor, t: torch.Tensor) -> None:
        x.grad = None  # as zero_grad(set_to_none=True): no accumulation pass into an old gradient
        if self.loss == "softmax":
            loss = focal_cuda.softmax_focal_loss(x, t, gamma=2.0, ignore_index=255, reduction=self.reduction)
        else:
            loss = focal_cuda.sigmoid_focal_loss(x, t, alpha=0.25, gamma=2.0, reduction=self.reduction)
        loss.backward()


# PREDICTED fractions of the datasheet bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s): docs/design.md
# section 7 derives each from the bytes moved, bytes in flight per SM, instructions per element and the
# fixed cost of the step's launches.
WORKLOADS = [
    Workload("segmentation", "softmax", "index", (8, 19, 512, 1024), (2, 19, 32, 64), torch.bfloat16, "mean",
             0.80, 0.84, 0.82),
    Workload("segmentation", "softmax", "index", (8, 19, 512, 1024), (2, 19, 32, 64), torch.float32, "mean",
             0.80, 0.87, 0.86),
    Workload("detection_dense", "sigmoid", "dense", (1000000, 80), (2000, 80), torch.float16, "sum",
             0.80, 0.87, 0.82),
    Workload("detection_index", "sigmoid", "index", (1000000, 80), (2000, 80), torch.float16, "sum",
             0.80, 0.80, 0.68),
    Workload("classification", "softmax", "index", (65536, 1000), (256, 1000), torch.float32, "mean",
             0.85, 0.86, 0.85),
    Workload("vocabulary", "softmax", "index", (4096, 100000), (4, 100000), torch.bfloat16, "mean",
             0.80, 0.82, 0.81),
]


def datasheet_bandwidth(name: str) -> Optional[float]:
    return next((bw for key, bw in DATASHEET if key in name), None)


def time_ms(fn, inputs: list, reps: int, device: torch.device, inner: int = 10) -> float:
    """Median milliseconds per call of fn(*inputs[i % len]), after two warm-up calls. On CUDA each of the reps
    samples times `inner` calls back to back between two events, so the device queue stays full and the
    host's launch time between calls (a few tens of microseconds of Python per step) is not counted as
    device time, as in a training loop."""
    for i in range(2):
        fn(*inputs[i % len(inputs)])
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(inner):
                fn(*inputs[i % len(inputs)])
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / inner)
        else:
            import time

            t0 = time.perf_counter()
            fn(*inputs[0])
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, small: bool, reps: int) -> float:
    """Bytes / s of a large device-to-device copy into existing memory (read + write counted)."""
    n = (1 << 20) if small else (1 << 29)  # 2 GiB of float32 on a GPU
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda s, d: d.copy_(s), [(src, dst)], reps, device)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def ncu_dram(ncu_csv: Optional[Path]) -> list[float]:
    """DRAM throughput (% of peak) of the focal_cuda forward kernels, in launch order, from ncu --csv."""
    if ncu_csv is None or not ncu_csv.is_file():
        return []
    rows = list(csv.reader(line for line in ncu_csv.read_text().splitlines() if line.startswith('"')))
    if not rows:
        return []
    header, values = rows[0], rows[1:]
    try:
        name_col, metric_col, value_col = header.index("Kernel Name"), header.index("Metric Name"), header.index("Metric Value")
    except ValueError:
        return []
    forward = [r for r in values if r[metric_col] == "dram__throughput.avg.pct_of_peak_sustained_elapsed"
               and "focal_loss_" in r[name_col] and "backward" not in r[name_col] and "count" not in r[name_col]]
    return [float(r[value_col].replace(",", "")) for r in forward]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="small shapes (a check of the script, not a measurement)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--once", action="store_true", help="run each workload once, no timing (for ncu)")
    parser.add_argument("--csv", type=Path, help="write the table to this CSV")
    parser.add_argument("--ncu-csv", type=Path, help="an ncu --csv of this script's --once run, for the DRAM column")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench.roofline: no GPU visible (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.once:
        for w in WORKLOADS:
            x, t = w.make(device, args.small, 0)
            w.step(x.requires_grad_(), t)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return 0
    datasheet = datasheet_bandwidth(name)
    copy_bw = copy_bandwidth(device, args.small, args.reps)
    dram = ncu_dram(args.ncu_csv)
    h200 = "H200" in name
    rows = []
    for i, w in enumerate(WORKLOADS):
        # Two input sets, so that no step reads what the previous one left in L2.
        inputs = []
        for seed in range(2):
            x, t = w.make(device, args.small, seed)
            inputs.append((x.requires_grad_(), t))
        ms = time_ms(w.step, inputs, args.reps, device)
        bytes_ = w.floor_bytes(*inputs[0])
        bw = bytes_ / (ms * 1e-3)
        rows.append(dict(
            workload=w.name, dtype=str(w.dtype).replace("torch.", ""), shape="x".join(map(str, inputs[0][0].shape)),
            floor_mb=bytes_ / 1e6, ms=ms, gbps=bw / 1e9,
            frac_datasheet=bw / datasheet if datasheet else float("nan"), frac_copy=bw / copy_bw,
            predicted=w.predicted_h200 if h200 else w.predicted_h100, target=w.target,
            ncu_dram_pct=dram[i] if i < len(dram) else float("nan"),
        ))
    print(f"device: {name}; datasheet HBM {datasheet / 1e12 if datasheet else float('nan'):.2f} TB/s; "
          f"measured copy {copy_bw / 1e12:.2f} TB/s (read + write)")
    header = (f"{'workload':16} {'dtype':9} {'shape':18} {'floor MB':>9} {'ms':>8} {'GB/s':>8} {'HBM %':>6} "
              f"{'copy %':>7} {'PRED %':>7} {'ncu DRAM %':>10} {'target':>6}  verdict")
    print(header)
    failed = False
    for r in rows:
        measured = r["frac_datasheet"]
        ok = measured == measured and measured >= r["target"]
        failed |= not ok
        print(f"{r['workload']:16} {r['dtype']:9} {r['shape']:18} {r['floor_mb']:9.1f} {r['ms']:8.3f} {r['gbps']:8.0f} "
              f"{100 * measured:6.1f} {100 * r['frac_copy']:7.1f} {100 * r['predicted']:7.0f} {r['ncu_dram_pct']:10.1f} "
              f"{100 * r['target']:6.0f}  {'passed' if ok else 'below target'}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) + ["device"])
            writer.writeheader()
            for r in rows:
                writer.writerow({**r, "device": name})
    return 0


if __name__ == "__main__":
    sys.exit(main())
