"""Times focal_cuda against the other providers of each workload (PyTorch and torchvision baselines, eager and
compiled) in three modes (forward, backward, full training step), next to the copy floor of the same logits,
and prints one table row per workload, dtype, provider and mode. Results are appended to a CSV; --plot draws
them. Without options: every workload, provider and mode at the default sizes, float32, on the GPU when one
is visible, else on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import os
import platform
import shlex
import subprocess
import sys
import tempfile

import torch

import focal_cuda
from focal_cuda._quiet import quiet_cpu_only_notices

from .memory import peak_step_mib, peak_step_mib_fresh_process
from .providers import ALL_PROVIDERS, DEFAULT_PROVIDERS, PEER_PROVIDERS, provider_factories
from .timing import MODES, quantiles, time_copy_floor, time_step
from .workloads import WORKLOADS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CSV = os.path.join(ROOT, "bench", "results", "results.csv")
FIELDS = ["timestamp", "commit", "device", "device_name", "isa", "threads", "load_avg", "torch", "cuda", "workload",
          "shape", "dtype", "provider", "mode", "median_ms", "q20_ms", "q80_ms", "floor_ms", "alloc_copy_ms",
          "x_floor", "x_focal_cuda", "fused_gb_per_s", "peak_mib"]
NAN = float("nan")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty elsewhere)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def _x86_level(flags: set[str]) -> str:
    """The x86-64 micro-architecture level (psABI) the CPU flags reach."""
    levels = [("x86-64-v2", {"cx16", "popcnt", "sse4_1", "sse4_2", "ssse3"}),
              ("x86-64-v3", {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}),
              ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})]
    reached = "x86-64"
    for name, needs in levels:
        if not needs <= flags:
            break
        reached = name
    return reached


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:  # a VM often hides the exact model name
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def _isa(device: torch.device) -> str:
    """What the kernels can use: the GPU's compute capability, or the CPU's x86-64 level, ATen's CPU kernel
    level and the path focal_cuda's CPU kernels take (AVX2 + FMA + F16C when present, else the baseline)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"sm_{major}{minor}"
    flags = set(_cpuinfo().get("flags", "").split())
    ours = "AVX2+FMA+F16C" if {"avx2", "fma", "f16c"} <= flags else "baseline"
    return f"{_x86_level(flags)}, ATen {torch.backends.cpu.get_cpu_capability()}, focal_cuda {ours}"


def _load_avg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


def _warn_if_busy(device: torch.device) -> None:
    """On a CPU shared with more runnable threads than cores, every parallel region waits for the scheduler to run
    its other threads (about 20 ms a region seen on 2 cores at a load of 40): CPU times then measure that."""
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    if device.type == "cpu" and load > cores:
        print(f"WARNING: the machine is busy (load average {load:.1f} on {cores} cores): with "
              f"{torch.get_num_threads()} threads each parallel region waits for the scheduler, so times and ratios "
              "are not those of an idle machine (OMP_NUM_THREADS=1 avoids the waits, not the sharing)")


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


# Kineto's lines that are not errors, and the one error every CPU-only machine gets: the trace export asks
# the CUDA runtime for the devices' properties (code 35: no driver).
_KINETO_CPU_NOISE = ("USDT:", "STAGE:")
_KINETO_NO_GPU = "gpuGetDeviceCount failed with code"


@contextlib.contextmanager
def _filtered_stderr(drop):
    """Captures what C++ code writes to file descriptor 2 and writes back every line but those ``drop`` selects."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not drop(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


def _profile(provider, inputs, device, directory: str, tag: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    os.makedirs(directory, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    x, t = inputs[0]
    no_gpu = not torch.cuda.is_available()

    def drop(line: str) -> bool:
        return line.startswith(_KINETO_CPU_NOISE) or (no_gpu and _KINETO_NO_GPU in line)

    path = os.path.join(directory, f"{tag}.json")
    with _filtered_stderr(drop):
        with profile(activities=activities, record_shapes=True, profile_memory=True) as prof:
            leaf = x.detach().requires_grad_()
            provider.fn(leaf, t).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
        prof.export_chrome_trace(path)
    return path


def _providers_help() -> str:
    where: dict[str, list[str]] = {}
    for workload in WORKLOADS.values():
        for name in provider_factories(workload):
            where.setdefault(name, []).append(workload.name)
    parts = [f"{name} ({'every workload' if len(where.get(name, [])) == len(WORKLOADS) else ', '.join(where.get(name, [])) or 'not installed here'})"
             for name in ALL_PROVIDERS]
    return ("comma list of: " + "; ".join(parts) + ". A provider is skipped for workloads it does not apply to. "
            f"Default: all but the drop-in peers and focal_cuda's adapters for them ({', '.join(PEER_PROVIDERS)}), "
            "which run when named")


EPILOG = """\
the table:
  median ms, q20-q80 ms   wall clock on the CPU, CUDA events on a GPU, over --reps repetitions after --warmup
  x floor                 median / the copy floor of the workload's logits
  x fused                 median / focal_cuda's, for full steps only: focal_cuda computes the gradient in its
                          forward, so a forward or backward alone does not compare like with like
  fused GB/s              focal_cuda only: the bytes its fused forward must move (logits and targets read,
                          gradient written) / median
  peak MiB                the memory a full step adds (GPU: max_memory_allocated; CPU: resident set, one
                          fresh process per provider)
  copy floor              the logits copied into memory allocated before the timing (read once, written
                          once), measured once per shape and dtype in a run; printed next to it, not used in
                          the ratios: the allocating copy torch.empty_like(x).copy_(x)
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma list of {list(WORKLOADS)}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:N (default: cuda when a GPU is visible, else cpu)")
    parser.add_argument("--dtypes", default="float32", help="comma list: float32, float16, bfloat16, float64")
    parser.add_argument("--modes", default=None,
                        help="comma list of forward (the loss of a training step), backward (loss.backward() "
                             "alone), full (both); default: full (quick run), all three with --full")
    parser.add_argument("--providers", default=None,
                        help=_providers_help() + "; default: the eager ones (quick run), all with --full")
    parser.add_argument("--small", action="store_true",
                        help="the small variant of every workload (the default of a quick run on the CPU)")
    parser.add_argument("--full", action="store_true",
                        help="the whole suite: every mode and provider (compiled baselines included) at the default "
                             "sizes; without it a quick run: full steps only, eager providers, small shapes on a CPU")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions (default 15 CPU, 100 GPU)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed repetitions first (compilation, lazy initialisation, caches; default 3)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--csv", default=DEFAULT_CSV, help="results are appended here ('' to skip)")
    parser.add_argument("--plot", default=None, help="write a PNG of this run's CSV rows to this path")
    parser.add_argument("--profile", default=None, metavar="DIR",
                        help="write a torch.profiler trace of one full step per provider to DIR")
    return parser


def _rounds(reps: int, rounds: int = 3) -> list[int]:
    """reps split into up to `rounds` interleaved rounds (at least one repetition each)."""
    rounds = max(1, min(rounds, reps))
    return [reps // rounds + (1 if r < reps % rounds else 0) for r in range(rounds)]


def quick_defaults(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    """A quick run unless --full (minutes on 2 CPU cores, where torch.compile of the compiled baselines alone takes
    minutes per shape): full steps, eager providers, small shapes on a CPU. Options given explicitly win."""
    if args.modes is None:
        args.modes = ",".join(MODES) if args.full else "full"
    if args.providers is None:
        args.providers = ",".join(p for p in DEFAULT_PROVIDERS if args.full or not p.endswith("_compiled"))
    if not args.full and device.type == "cpu":
        args.small = True
    return args


def main(argv=None) -> None:
    quiet_cpu_only_notices()
    parser = build_parser()
    args = parser.parse_args(argv)

    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        parser.error(f"--device {args.device}: {e}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no GPU is visible to torch {torch.__version__} "
                     "(torch.cuda.is_available() is False); run on the CPU with --device cpu")
    workloads = _parse_list(args.workloads, WORKLOADS, "workloads")
    args = quick_defaults(args, device)
    modes = _parse_list(args.modes, MODES, "modes")
    providers = _parse_list(args.providers, ALL_PROVIDERS, "providers")
    dtypes = [getattr(torch, d) for d in _parse_list(args.dtypes, ("float32", "float16", "bfloat16", "float64"),
                                                       "dtypes")]
    reps = args.reps or (100 if device.type == "cuda" else 15)
    from tqdm import tqdm

    command = " ".join(["python -m bench", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta = dict(timestamp=stamp, commit=_commit(), device=device.type, device_name=_device_name(device),
                isa=_isa(device), threads=torch.get_num_threads(), load_avg=_load_avg(), torch=torch.__version__,
                cuda=torch.version.cuda or "")
    print(f"focal_cuda bench: {command}")
    print(f"{meta['device_name']} ({device}; {meta['isa']}), {meta['threads']} threads, "
          f"load average {meta['load_avg'] or '?'} at the start")
    print(f"torch {meta['torch']}, focal_cuda build {focal_cuda.build_info()}, commit {meta['commit']}, "
          f"{reps} reps after {args.warmup} warm-up")
    _warn_if_busy(device)
    plan = [(w, d, p) for w in workloads for d in dtypes for p in providers if p in provider_factories(WORKLOADS[w])]
    rows = []
    floors = {}  # (shape, dtype) -> (copy floor quantiles, allocating copy quantiles), measured once per run
    bar = tqdm(total=len(plan) * len(modes), desc="bench", unit="run", file=sys.stderr)
    for workload_name in workloads:
        w = WORKLOADS[workload_name]
        for dtype in dtypes:
            shape = w.shape(device, args.small)
            inputs = _rotating_inputs(w, shape, device, dtype)
            x0, t0 = inputs[0]
            if (shape, dtype) not in floors:
                bar.set_postfix_str(f"copy floor {'x'.join(map(str, shape))} {str(dtype)[6:]}")
                floors[(shape, dtype)] = (quantiles(time_copy_floor(inputs, device, args.warmup, reps)),
                                          quantiles(time_copy_floor(inputs, device, args.warmup, reps,
                                                                    allocate=True)))
            floor, alloc_copy = floors[(shape, dtype)][0][0], floors[(shape, dtype)][1][0]
            fused_bytes = w.fused_bytes(x0, t0)
            # Providers are timed in interleaved rounds (each round: every provider and mode, a third of the
            # repetitions), so that a drift during the run (CPU frequency, caches, the allocator's state, other
            # jobs) falls on every provider alike instead of on whichever happens to run first or last: timed in
            # one block each, the same kernel measured up to 1.5x apart depending on its place in the order.
            entries = []
            for name in [p for p in providers if p in provider_factories(w)]:
                provider = provider_factories(w)[name]()
                prepared = [(x, provider.prepare_targets(x, t)) for x, t in inputs]
                peak = None
                if not args.no_memory:
                    peak = (peak_step_mib(workload_name, name, device, dtype, shape) if device.type == "cuda"
                            else peak_step_mib_fresh_process(workload_name, name, dtype, shape))
                if args.profile:
                    _profile(provider, prepared, device, args.profile, f"{workload_name}_{str(dtype)[6:]}_{name}")
                entries.append((name, provider, prepared, peak))
            samples: dict = {}
            for r, round_reps in enumerate(_rounds(reps)):
                for name, provider, prepared, peak in entries:
                    for mode in modes:
                        bar.set_postfix_str(f"{workload_name} {name} {mode} (round {r + 1})")
                        samples.setdefault((name, mode), []).extend(
                            time_step(provider.fn, prepared, mode, device, args.warmup if r == 0 else 1, round_reps))
                        if r == 0:
                            bar.update(1)
            results = {(name, mode): (quantiles(samples[(name, mode)]), peak)
                       for name, _, _, peak in entries for mode in modes}
            del entries
            for (name, mode), ((median, q20, q80), peak) in results.items():
                fused = results.get(("focal_cuda", mode))
                rows.append(dict(meta, workload=workload_name, shape="x".join(map(str, shape)),
                                 dtype=str(dtype).removeprefix("torch."), provider=name, mode=mode,
                                 median_ms=median, q20_ms=q20, q80_ms=q80, floor_ms=floor, alloc_copy_ms=alloc_copy,
                                 x_floor=median / floor,
                                 # like with like only: focal_cuda's forward also computes the gradient
                                 x_focal_cuda=median / fused[0][0] if fused and mode == "full" else NAN,
                                 fused_gb_per_s=(fused_bytes / (median * 1e6)
                                                 if name == "focal_cuda" and mode != "backward" else NAN),
                                 peak_mib=peak if peak is not None else NAN))
            del inputs
    bar.close()
    print_table(rows, floors, device)
    print(f"load average {_load_avg() or '?'} at the end")
    _warn_if_busy(device)
    if args.csv:
        _append_csv(args.csv, rows)
    if args.plot:
        from .plot import plot_rows

        plot_rows(rows, args.plot)
        print(f"plot: {args.plot}")


def _append_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    exists = os.path.exists(path) and os.path.getsize(path) > 0
    fields = FIELDS
    if exists:
        with open(path, newline="") as f:
            fields = next(csv.reader(f))
        if fields != FIELDS:
            print(f"{path} has an older header: columns it lacks are left out "
                  f"({', '.join(c for c in FIELDS if c not in fields) or 'none'})")
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", restval="")
        if not exists:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {path}")


def _fmt(value: float, spec: str) -> str:
    return "-" if value != value else format(value, spec)


def table_header(workload_width: int = 16, provider_width: int = 21) -> str:
    return (f"{'workload':<{workload_width}} {'shape':<14} {'dtype':<8} {'provider':<{provider_width}} {'mode':<8} "
            f"{'median ms':>10} {'q20-q80 ms':>15} {'x floor':>8} {'x fused':>8} {'fused GB/s':>10} {'peak MiB':>9}")


TABLE_HEADER = table_header()  # the widths of the default workloads and providers
X_FUSED_NOTE = ("x fused: full steps only (focal_cuda computes the gradient in its forward, so a forward or backward "
                "alone does not compare like with like)")


def print_table(rows, floors, device) -> None:
    # Columns as wide as the longest workload and provider names of this run (classification_flsd53,
    # focal_cuda_kornia_binary_hard), so that every row lines up under the header.
    ww = max([16] + [len(r["workload"]) for r in rows])
    pw = max([21] + [len(r["provider"]) for r in rows])
    header = table_header(ww, pw)
    print(header)
    print("-" * len(header))
    for r in rows:
        gbps = "" if r["fused_gb_per_s"] != r["fused_gb_per_s"] else f"{r['fused_gb_per_s']:.1f}"
        peak = "" if r["peak_mib"] != r["peak_mib"] else f"{r['peak_mib']:.0f}"
        print(f"{r['workload']:<{ww}} {r['shape']:<14} {r['dtype']:<8} {r['provider']:<{pw}} {r['mode']:<8} "
              f"{r['median_ms']:>10.2f} {r['q20_ms']:>7.2f}-{r['q80_ms']:<7.2f} {r['x_floor']:>8.2f} "
              f"{_fmt(r['x_focal_cuda'], '.2f'):>8} {gbps:>10} {peak:>9}")
    print(X_FUSED_NOTE)
    for (shape, dtype), ((median, q20, q80), (alloc, _, _)) in floors.items():
        gbps = 2 * torch.Size(shape).numel() * dtype.itemsize / (median * 1e6)
        print(f"copy floor {'x'.join(map(str, shape))} {str(dtype).removeprefix('torch.')}: {median:.2f} ms "
              f"(q20-q80 {q20:.2f}-{q80:.2f}, {gbps:.1f} GB/s) into preallocated memory; "
              f"allocating copy {alloc:.2f} ms")
    if device.type == "cuda":
        print("GPU: compare 'fused GB/s' with the copy floor's bandwidth and with docs/design.md's PREDICTED times.")
