"""The bench suite runs end to end (small workloads, few repetitions), and its baselines compute the same loss.

Timings are not asserted here: speed and memory are measured by the bench suite itself, side by side.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.providers import provider_factories
from bench.workloads import WORKLOADS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_providers_agree(workload):
    """Every provider (eager ones; compiled ones are the same functions) gives the workload's loss and gradient."""
    w = WORKLOADS[workload]
    x, t = w.make_inputs(w.small_shape, torch.device("cpu"), torch.float64)
    results = {}
    for name, factory in provider_factories(w).items():
        if name.endswith("_compiled"):
            continue
        p = factory()
        if p.other_loss:  # timed for comparison only (focal_cuda at a constant gamma next to a schedule)
            continue
        leaf = x.detach().requires_grad_()
        loss = p.fn(leaf, p.prepare_targets(leaf, t))
        loss.backward()
        results[name] = (loss.detach(), leaf.grad)
    assert "focal_cuda" in results and len(results) >= 3
    for name, (loss, grad) in results.items():
        # torchvision's BCE formula loses relative digits in the far tails (see reference.sigmoid_focal_loss)
        rtol = 1e-6 if name == "torchvision" else 1e-9
        torch.testing.assert_close(loss, results["reference"][0], rtol=rtol, atol=0, msg=name)
        torch.testing.assert_close(grad, results["reference"][1], rtol=rtol, atol=1e-12, msg=name)


def test_suite_runs_and_writes_csv_and_plot(tmp_path):
    csv_path, png_path = tmp_path / "results.csv", tmp_path / "results.png"
    cmd = [sys.executable, "-m", "bench", "--small", "--reps", "2", "--warmup", "1", "--device", "cpu",
           "--workloads", "detection_index,segmentation", "--providers", "focal_cuda,reference,torchvision",
           "--csv", str(csv_path), "--plot", str(png_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    print(out.stdout)
    assert "copy floor detection_index" in out.stdout
    rows = list(csv.DictReader(csv_path.open()))
    # detection_index: focal_cuda, reference, torchvision; segmentation: focal_cuda, reference; 3 modes each
    assert len(rows) == 5 * 3
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["floor_ms"]) > 0
        assert r["commit"] and r["torch"] == torch.__version__
    fused = [r for r in rows if r["provider"] == "focal_cuda" and r["mode"] == "full"]
    assert all(float(r["x_focal_cuda"]) == 1.0 and float(r["fused_gb_per_s"]) > 0 for r in fused)
    # peak memory of focal_cuda's full step: about one gradient buffer (the logits' size), not several
    for r in fused:
        logits_mib = torch.Size(map(int, r["shape"].split("x"))).numel() * 4 / 2**20
        assert float(r["peak_mib"]) <= 1.5 * logits_mib + 4, r
    assert png_path.stat().st_size > 10_000
