"""Peak memory of one full training step of one provider.

CUDA: torch.cuda.max_memory_allocated in this process. CPU: run as `python -m bench.memory ...` in a fresh
process per provider; the peak resident set (VmHWM, reset through /proc/self/clear_refs after the inputs
exist and one warm-up step has run) minus the resident set before the step: the memory a step adds on top
of its inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Optional

import torch

from .providers import provider_factories
from .workloads import WORKLOADS


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _full_step(fn, x, t) -> None:
    leaf = x.detach().requires_grad_()
    fn(leaf, t).backward()


def peak_step_mib(workload: str, provider: str, device: torch.device, dtype: torch.dtype, shape) -> Optional[float]:
    w = WORKLOADS[workload]
    p = provider_factories(w)[provider]()
    x, t = w.make_inputs(shape, device, dtype)
    t = p.prepare_targets(x, t)
    _full_step(p.fn, x, t)  # warm-up (compilation, lazy initialisation)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        _full_step(p.fn, x, t)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    _full_step(p.fn, x, t)
    return (_status_kib("VmHWM") - before) / 1024


def peak_step_mib_fresh_process(workload: str, provider: str, dtype: torch.dtype, shape) -> Optional[float]:
    """The CPU measurement, in a child process so that no other provider's memory is counted."""
    cmd = [sys.executable, "-m", "bench.memory", "--workload", workload, "--provider", provider,
           "--dtype", str(dtype).removeprefix("torch."), "--shape", *map(str, shape)]
    # A fixed mmap threshold: every allocation above 128 KiB gets fresh pages and returns them when freed, so
    # the resident set follows what is live (glibc would otherwise recycle the warm-up step's buffers).
    # focal_cuda's CPU gradient pool would keep the warm-up step's buffer mapped, so that the measured step
    # adds nothing: without it the step's gradient buffer is counted, which is what the step needs.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", FOCAL_CUDA_CPU_GRAD_POOL="0")
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=_repo_root(), env=env)
    if out.returncode != 0:
        print(f"memory measurement failed for {workload}/{provider}: {out.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", required=True)
    parser.add_argument("--provider", required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--shape", type=int, nargs="+", required=True)
    args = parser.parse_args()
    torch.manual_seed(0)
    peak = peak_step_mib(args.workload, args.provider, torch.device("cpu"), getattr(torch, args.dtype),
                         tuple(args.shape))
    print(json.dumps({"peak_mib": peak}))


if __name__ == "__main__":
    main()
