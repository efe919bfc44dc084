"""A PNG from bench results: time (full step) and peak memory by provider, one panel per workload.
`python -m bench.plot results.csv out.png` plots the newest run in the CSV."""

from __future__ import annotations

import csv
import sys


def plot_rows(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = [r for r in rows if r["mode"] == "full"]
    workloads = list(dict.fromkeys((r["workload"], r["dtype"]) for r in full))
    if not workloads:
        raise ValueError("no 'full' mode rows to plot")
    fig, axes = plt.subplots(2, len(workloads), figsize=(4.5 * len(workloads), 7), squeeze=False)
    for col, (workload, dtype) in enumerate(workloads):
        sel = [r for r in full if r["workload"] == workload and r["dtype"] == dtype]
        names = [r["provider"] for r in sel]
        colors = ["tab:green" if n == "focal_cuda" else "tab:gray" for n in names]
        ax = axes[0][col]
        ax.barh(names, [float(r["median_ms"]) for r in sel], color=colors)
        ax.axvline(float(sel[0]["floor_ms"]), color="tab:red", linestyle="--", label="copy floor")
        ax.set_title(f"{workload} {sel[0]['shape']} {dtype}", fontsize=9)
        ax.set_xlabel("full step (forward + backward), median ms")
        ax.legend(fontsize=7)
        ax = axes[1][col]
        ax.barh(names, [float(r["peak_mib"]) for r in sel], color=colors)
        ax.set_xlabel("peak memory of a full step, MiB")
    device = full[0]["device_name"]
    fig.suptitle(f"focal_cuda bench: {device}, torch {full[0]['torch']}, commit {full[0]['commit']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.plot results.csv out.png")
    with open(sys.argv[1]) as f:
        rows = list(csv.DictReader(f))
    newest = rows[-1]["timestamp"]
    plot_rows([r for r in rows if r["timestamp"] == newest], sys.argv[2])


if __name__ == "__main__":
    main()
