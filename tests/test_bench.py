"""The bench suite runs end to end (small workloads, few repetitions), and its baselines compute the same loss.

Timings are not asserted here: speed and memory are measured by the bench suite itself, side by side. What is
asserted is what the numbers mean: the table's layout, one copy floor per shape and dtype, ratios to focal_cuda
only where they compare like with like, and a clean output on a machine without a GPU.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.providers import ALL_PROVIDERS, provider_factories
from bench.run import TABLE_HEADER, X_FUSED_NOTE, build_parser
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
        results[name] = (loss.detach(), leaf.grad, p.float32_math)
    assert "focal_cuda" in results and "reference" in results  # compared with each other at least
    for name, (loss, grad, float32_math) in results.items():
        # torchvision's BCE formula loses relative digits in the far tails (see reference.sigmoid_focal_loss)
        rtol = 1e-6 if name == "torchvision" else 1e-9
        atol = 1e-12
        if float32_math:  # float32 rounding, relative to the largest gradient
            rtol, atol = 1e-5, 1e-5 * float(results["reference"][1].abs().max())
        torch.testing.assert_close(loss, results["reference"][0], rtol=rtol, atol=0, msg=name)
        torch.testing.assert_close(grad, results["reference"][1], rtol=rtol, atol=atol, msg=name)


def _run_bench(*args, env=None, timeout=900):
    cmd = [sys.executable, "-m", "bench", "--small", "--device", "cpu", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, **(env or {})),
                         timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_default_is_a_quick_run():
    """No options: full steps only, no compiled provider, the small shapes on a CPU; --full: everything."""
    from bench.run import build_parser, quick_defaults

    quick = quick_defaults(build_parser().parse_args([]), torch.device("cpu"))
    assert quick.modes == "full" and quick.small and "compiled" not in quick.providers
    assert "focal_cuda" in quick.providers.split(",") and "reference" in quick.providers.split(",")
    full = quick_defaults(build_parser().parse_args(["--full"]), torch.device("cpu"))
    assert full.modes == "forward,backward,full" and not full.small and "reference_compiled" in full.providers
    explicit = quick_defaults(build_parser().parse_args(["--modes", "forward", "--providers", "reference_compiled"]),
                              torch.device("cpu"))
    assert explicit.modes == "forward" and explicit.providers == "reference_compiled"


def _header_index(lines: list[str]) -> int:
    """The table's header: TABLE_HEADER, its workload and provider columns widened to the run's longest names."""
    pattern = re.compile(r"^workload +shape {10}dtype {4}provider +mode {6}median ms")
    return next(i for i, line in enumerate(lines) if pattern.match(line)
                and line.replace(" ", "") == TABLE_HEADER.replace(" ", ""))


def _table_lines(stdout: str) -> list[str]:
    lines = stdout.splitlines()
    start = _header_index(lines) + 2  # header, rule
    end = next(i for i in range(start, len(lines)) if lines[i] == X_FUSED_NOTE)
    return lines[start:end]


def test_suite_runs_and_writes_csv_and_plot(tmp_path):
    csv_path, png_path = tmp_path / "results.csv", tmp_path / "results.png"
    # detection_dense and detection_index share a shape: one copy floor for both
    out = _run_bench("--reps", "2", "--warmup", "1", "--workloads", "detection_dense,detection_index,segmentation",
                     "--providers", "focal_cuda,reference,torchvision", "--modes", "forward,backward,full",
                     "--csv", str(csv_path), "--plot", str(png_path))
    print(out.stdout)
    rows = list(csv.DictReader(csv_path.open()))
    # detection_*: focal_cuda, reference, torchvision; segmentation: focal_cuda, reference; 3 modes each
    assert len(rows) == (3 + 3 + 2) * 3
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["floor_ms"]) > 0 and float(r["alloc_copy_ms"]) > 0
        assert r["commit"] and r["torch"] == torch.__version__ and r["isa"] and r["device_name"]
    fused = [r for r in rows if r["provider"] == "focal_cuda" and r["mode"] == "full"]
    assert all(float(r["x_focal_cuda"]) == 1.0 and float(r["fused_gb_per_s"]) > 0 for r in fused)
    # peak memory of focal_cuda's full step: about one gradient buffer (the logits' size), not several
    for r in fused:
        logits_mib = torch.Size(map(int, r["shape"].split("x"))).numel() * 4 / 2**20
        assert float(r["peak_mib"]) <= 1.5 * logits_mib + 4, r
    assert png_path.stat().st_size > 10_000

    # The floor: one measurement per shape and dtype, shared by every workload of that shape.
    floors = {(r["shape"], r["dtype"]): set() for r in rows}
    for r in rows:
        floors[(r["shape"], r["dtype"])].add((r["floor_ms"], r["alloc_copy_ms"]))
    assert all(len(v) == 1 for v in floors.values()), floors
    assert set(floors) == {("20000x80", "float32"), ("2x19x64x128", "float32")}
    floor_lines = [line for line in out.stdout.splitlines() if line.startswith("copy floor ")]
    assert [line.split(":")[0] for line in floor_lines] == ["copy floor 20000x80 float32",
                                                            "copy floor 2x19x64x128 float32"]
    assert all("into preallocated memory" in line and "allocating copy" in line for line in floor_lines)

    # Ratios to focal_cuda only where they compare like with like: full steps.
    for r in rows:
        x_fused = float(r["x_focal_cuda"])
        assert (x_fused == x_fused) == (r["mode"] == "full"), r
        assert float(r["x_floor"]) == pytest.approx(float(r["median_ms"]) / float(r["floor_ms"]), rel=1e-9)

    # The printed table: one line per CSV row, in order, with the shape; '-' where a ratio is not given.
    lines = _table_lines(out.stdout)
    assert len(lines) == len(rows)
    for line, r in zip(lines, rows):
        cells = line.split()
        assert cells[:5] == [r["workload"], r["shape"], r["dtype"], r["provider"], r["mode"]], (line, r)
        assert float(cells[5]) == pytest.approx(float(r["median_ms"]), abs=0.005)
        assert cells[8] == ("-" if r["mode"] != "full" else f"{float(r['x_focal_cuda']):.2f}"), line
    # the header names the CPU (model, ISA level), the threads, the load and the command
    head = out.stdout.splitlines()[:3]
    assert head[0].startswith("focal_cuda bench: python -m bench --small --device cpu --reps 2")
    assert "threads" in head[1] and "load average" in head[1] and ("x86-64" in head[1] or "ATen" in head[1])


def test_help_lists_every_option_and_provider():
    parser = build_parser()
    help_text = parser.format_help()
    assert "python -m bench --help" not in help_text
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
    providers = next(a for a in parser._actions if "--providers" in a.option_strings)
    for name in ALL_PROVIDERS:
        assert name in providers.help


def test_readme_table_has_the_suites_layout():
    """docs/bench.md (linked from the README) quotes the suite's table as printed: same header, same columns."""
    readme = (ROOT / "docs" / "bench.md").read_text()
    doc_lines = readme.splitlines()
    header = doc_lines[_header_index(doc_lines)]
    quoted = readme[readme.index(header):].split("```")[0].splitlines()
    rows = [line for line in quoted[2:] if line.strip() and not line.startswith(("x fused", "copy floor"))]
    assert rows, "no rows under the README's table header"
    for line in rows:
        cells = line.split()
        assert cells[0] in WORKLOADS and cells[3] in ALL_PROVIDERS and cells[4] in ("forward", "backward", "full"), line
        assert len(line) <= len(header), line


def test_profile_output_has_no_kineto_noise(tmp_path):
    out = _run_bench("--reps", "1", "--warmup", "0", "--workloads", "segmentation", "--providers", "focal_cuda",
                     "--modes", "full", "--no-memory", "--csv", "", "--profile", str(tmp_path))
    assert (tmp_path / "segmentation_float32_focal_cuda.json").stat().st_size > 0
    if not torch.cuda.is_available():
        assert "gpuGetDeviceCount" not in out.stderr, out.stderr
    assert "USDT:" not in out.stderr and "STAGE:" not in out.stderr, out.stderr


@pytest.mark.skipif(torch.cuda.is_available() or torch.version.cuda is None,
                    reason="the notice appears with a CUDA build of torch and no GPU")
def test_no_cuda_runtime_notice_is_dropped():
    """torch.utils.cpp_extension (imported by torch.compile) warns that no GPU is there: the bench and the
    examples drop that one notice and nothing else."""
    code = ("import sys, logging; from focal_cuda._quiet import quiet_cpu_only_notices\n"
            "if sys.argv[1] == 'quiet': quiet_cpu_only_notices()\n"
            "import torch.utils.cpp_extension\n"
            "logging.getLogger('torch.utils.cpp_extension').warning('another warning')\n")
    env = dict(os.environ, CUDA_HOME=str(ROOT))
    for mode in ("loud", "quiet"):
        out = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, cwd=ROOT, env=env,
                             timeout=300)
        assert out.returncode == 0, out.stderr
        assert ("No CUDA runtime is found" in out.stderr) == (mode == "loud"), out.stderr
        assert "another warning" in out.stderr


def test_cuda_device_without_gpu_is_a_clear_error():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "bench", "--device", "cuda", "--csv", ""], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 2 and "no GPU is visible" in out.stderr and "Traceback" not in out.stderr, out.stderr
