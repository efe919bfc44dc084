"""Runs the bench suite on the available device and prints a table; see `python -m bench --help`.

Every provider of a workload is timed in the same run, next to the copy floor of its logits, and
reported as ratios (to the floor and to focal_cuda), with focal_cuda's achieved bandwidth counting the
bytes its fused kernel must move. Results are appended to a CSV; --plot draws them.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import subprocess
import sys

import torch

import focal_cuda

from .memory import peak_step_mib, peak_step_mib_fresh_process
from .providers import ALL_PROVIDERS, provider_factories
from .timing import MODES, quantiles, time_copy_floor, time_step
from .workloads import WORKLOADS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CSV = os.path.join(ROOT, "bench", "results", "results.csv")
FIELDS = ["timestamp", "commit", "device", "device_name", "threads", "torch", "cuda", "workload", "shape", "dtype",
          "provider", "mode", "median_ms", "q20_ms", "q80_ms", "floor_ms", "x_floor", "x_focal_cuda",
          "fused_gb_per_s", "peak_mib"]


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _rotating_inputs(workload, shape, device, dtype):
    """One input set on the CPU; on a GPU enough copies to exceed twice the L2 cache."""
    x, t = workload.make_inputs(shape, device, dtype)
    if device.type != "cuda":
        return [(x, t)]
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    per_set = x.numel() * x.element_size() + t.numel() * t.element_size()
    copies = max(1, min(8, -(-2 * l2 // per_set)))
    return [(x, t)] + [(x.clone(), t.clone()) for _ in range(copies - 1)]


def _parse_list(value: str, allowed, what: str) -> list[str]:
    items = [v for v in value.split(",") if v]
    bad = [v for v in items if v not in allowed]
    if bad:
        raise SystemExit(f"unknown {what}: {bad}; choose from {list(allowed)}")
    return items


def _profile(provider, inputs, device, directory: str, tag: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(directory, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    x, t = inputs[0]
    with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
        leaf = x.detach().requires_grad_()
        provider.fn(leaf, t).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    path = os.path.join(directory, f"{tag}.json")
    prof.export_chrome_trace(path)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {list(WORKLOADS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="float32", help="comma list: float32, float16, bfloat16, float64")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {list(MODES)}")
    parser.add_argument("--providers", default=",".join(ALL_PROVIDERS),
                        help="comma list (those that do not apply to a workload are skipped)")
    parser.add_argument("--small", action="store_true", help="the small variant of every workload")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 15 CPU, 100 GPU)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--csv", default=DEFAULT_CSV, help="results are appended here ('' to skip)")
    parser.add_argument("--plot", default=None, help="write a PNG of this run's CSV rows to this path")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="write a torch.profiler trace of one full step per provider to DIR")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    workloads = _parse_list(args.workloads, WORKLOADS, "workloads")
    modes = _parse_list(args.modes, MODES, "modes")
    providers = _parse_list(args.providers, ALL_PROVIDERS, "providers")
    dtypes = [getattr(torch, d) for d in _parse_list(args.dtypes, ("float32", "float16", "bfloat16", "float64"),
                                                       "dtypes")]
    reps = args.reps or (100 if device.type == "cuda" else 15)
    from tqdm import tqdm

    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = dict(timestamp=stamp, commit=_commit(), device=device.type, device_name=_device_name(device),
                threads=torch.get_num_threads(), torch=torch.__version__, cuda=torch.version.cuda or "")
    print(f"focal_cuda bench on {meta['device_name']} ({device}, {meta['threads']} threads), torch {meta['torch']}, "
          f"build {focal_cuda.build_info()}, commit {meta['commit']}")
    plan = [(w, d, p) for w in workloads for d in dtypes for p in providers if p in provider_factories(WORKLOADS[w])]
    rows = []
    bar = tqdm(total=len(plan) * len(modes), desc="bench", unit="run", file=sys.stderr)
    for workload_name in workloads:
        w = WORKLOADS[workload_name]
        for dtype in dtypes:
            shape = w.shape(device, args.small)
            inputs = _rotating_inputs(w, shape, device, dtype)
            x0, t0 = inputs[0]
            floor = quantiles(time_copy_floor(inputs, device, args.warmup, reps))[0]
            fused_bytes = w.fused_bytes(x0, t0)
            results = {}
            for name in [p for p in providers if p in provider_factories(w)]:
                provider = provider_factories(w)[name]()
                prepared = [(x, provider.prepare_targets(x, t)) for x, t in inputs]
                peak = None
                if not args.no_memory:
                    peak = (peak_step_mib(workload_name, name, device, dtype, shape) if device.type == "cuda"
                            else peak_step_mib_fresh_process(workload_name, name, dtype, shape))
                if args.profile:
                    _profile(provider, prepared, device, args.profile, f"{workload_name}_{str(dtype)[6:]}_{name}")
                for mode in modes:
                    bar.set_postfix_str(f"{workload_name} {name} {mode}")
                    results[(name, mode)] = (quantiles(time_step(provider.fn, prepared, mode, device, args.warmup,
                                                                 reps)), peak)
                    bar.update(1)
                del prepared, provider
            for (name, mode), ((median, q20, q80), peak) in results.items():
                fused = results.get(("focal_cuda", mode))
                rows.append(dict(meta, workload=workload_name, shape="x".join(map(str, shape)),
                                 dtype=str(dtype).removeprefix("torch."), provider=name, mode=mode,
                                 median_ms=median, q20_ms=q20, q80_ms=q80, floor_ms=floor, x_floor=median / floor,
                                 x_focal_cuda=median / fused[0][0] if fused else float("nan"),
                                 fused_gb_per_s=(fused_bytes / (median * 1e6)
                                                 if name == "focal_cuda" and mode != "backward" else float("nan")),
                                 peak_mib=peak if peak is not None else float("nan")))
            del inputs
    bar.close()
    _print_table(rows, device)
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        new = not os.path.exists(args.csv)
        with open(args.csv, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        print(f"appended {len(rows)} rows to {args.csv}")
    if args.plot:
        from .plot import plot_rows

        plot_rows(rows, args.plot)
        print(f"plot: {args.plot}")


def _print_table(rows, device) -> None:
    header = (f"{'workload':<16} {'dtype':<8} {'provider':<21} {'mode':<8} {'median ms':>10} {'q20-q80 ms':>15} "
              f"{'x floor':>8} {'x fused':>8} {'fused GB/s':>10} {'peak MiB':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        gbps = "" if r["fused_gb_per_s"] != r["fused_gb_per_s"] else f"{r['fused_gb_per_s']:.1f}"
        peak = "" if r["peak_mib"] != r["peak_mib"] else f"{r['peak_mib']:.0f}"
        print(f"{r['workload']:<16} {r['dtype']:<8} {r['provider']:<21} {r['mode']:<8} {r['median_ms']:>10.2f} "
              f"{r['q20_ms']:>7.2f}-{r['q80_ms']:<7.2f} {r['x_floor']:>8.2f} {r['x_focal_cuda']:>8.2f} {gbps:>10} "
              f"{peak:>9}")
    floors = {(r["workload"], r["dtype"]): r["floor_ms"] for r in rows}
    for (w, d), ms in floors.items():
        print(f"copy floor {w} {d}: {ms:.2f} ms")
    if device.type == "cuda":
        print("GPU: compare 'fused GB/s' with the copy floor's bandwidth and with docs/design.md's PREDICTED times.")
