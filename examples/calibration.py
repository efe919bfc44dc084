"""Calibration study: cross-entropy, focal loss (gamma 1, 2, 3) and FLSD-53, each with and without post-hoc
temperature scaling, on a real data set that ships with scikit-learn (the 8x8 handwritten digits, 1797 images,
10 classes: no download), several seeds, two training lengths.

    python examples/calibration.py                  # the README's table and docs/calibration_reliability.png
    python examples/calibration.py --seeds 2 --epochs 5,20 --out ''   # a quicker look, no plot

Every run trains the same MLP (64-256-256-10, ReLU; SGD, momentum 0.9, lr 0.05, batch 64, no weight decay)
from the same seed with each loss, all computed by ``focal_cuda.softmax_focal_loss`` (cross-entropy is
``gamma=0``, FLSD-53 ``gamma="flsd53"``). The seed fixes the data split (900 train / 300 validation / 597 test),
the initialisation and the batch order. The model is evaluated at two epochs of the same run (constant learning
rate, so the earlier one is exactly a shorter training): a short one, where cross-entropy is not yet
over-confident, and a long one, where it has fitted the training set (training NLL near 0) and its test NLL
grows. Temperature scaling fits one scalar T on the validation logits (``focal_cuda.calibration.fit_temperature``,
NLL by ``softmax_focal_loss(gamma=0)``) and divides the test logits by it. Metrics on the test split, in %
but NLL: accuracy, NLL, ECE (15 equal-width bins), adaptive ECE (15 equal-mass bins), classwise ECE; mean and
standard deviation over the seeds. The reliability diagrams pool the test predictions of all seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

if __package__ in (None, ""):  # run as a script: python examples/calibration.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import focal_cuda  # noqa: E402
from focal_cuda import calibration  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LOSSES = {"cross-entropy": 0.0, "focal gamma=1": 1.0, "focal gamma=2": 2.0, "focal gamma=3": 3.0,
          "FLSD-53": "flsd53"}
METRICS = ["accuracy", "nll", "ece", "adaptive_ece", "classwise_ece"]
HEADERS = {"accuracy": "accuracy %", "nll": "NLL", "ece": "ECE %", "adaptive_ece": "adaptive ECE %",
           "classwise_ece": "classwise ECE %"}


def load_digits_split(seed: int, device: torch.device, limit: Optional[int] = None):
    """(train, validation, test) pairs of (features, labels): the seed's random split, standardised with the
    training split's statistics."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    if limit is not None:
        order = order[:limit]
    n_train, n_val = int(len(order) * 0.5), int(len(order) * 0.167)
    parts = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    mean, std = x[parts[0]].mean(0), x[parts[0]].std(0) + 0.1  # + 0.1: constant border pixels
    x = (x - mean) / std
    return [(x[p].to(device), y[p].to(device)) for p in parts]


def build_model(seed: int, device: torch.device) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)


def train(gamma, data, seed: int, epochs: list[int], device: torch.device, batch_size: int = 64, lr: float = 0.05):
    """Trains with ``softmax_focal_loss(gamma=gamma)`` and returns {epoch: (validation logits, test logits)} at
    the given epochs."""
    (x_train, y_train), (x_val, _), (x_test, _) = data
    model = build_model(seed, device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    order_gen = torch.Generator().manual_seed(seed + 1)
    out = {}
    for epoch in range(1, max(epochs) + 1):
        model.train()
        order = torch.randperm(len(y_train), generator=order_gen).to(device)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            loss = focal_cuda.softmax_focal_loss(model(x_train[batch]), y_train[batch], gamma=gamma)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if epoch in epochs:
            model.eval()
            with torch.no_grad():
                out[epoch] = (model(x_val), model(x_test))
    return out


def evaluate(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    return {
        "accuracy": 100 * float((logits.argmax(1) == target).double().mean()),
        "nll": float(calibration.negative_log_likelihood(logits, target)),
        "ece": 100 * float(calibration.expected_calibration_error(logits, target)),
        "adaptive_ece": 100 * float(calibration.adaptive_calibration_error(logits, target)),
        "classwise_ece": 100 * float(calibration.classwise_calibration_error(logits, target)),
    }


def _mean_std(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def format_table(results, epochs: list[int]) -> str:
    """Markdown: one row per (epochs, loss, temperature scaling), metrics as mean ± std over seeds."""
    lines = ["| epochs | loss | temp. scaling | T | " + " | ".join(HEADERS[m] for m in METRICS) + " |",
             "|---|---|---|---|" + "---|" * len(METRICS)]
    for epoch in epochs:
        for name in LOSSES:
            for scaled in (False, True):
                runs = results[(epoch, name, scaled)]
                t = _mean_std([r["temperature"] for r in runs], 2) if scaled else ""
                cells = [_mean_std([r[m] for r in runs], 3 if m == "nll" else 2) for m in METRICS]
                lines.append(f"| {epoch} | {name} | {'yes' if scaled else 'no'} | {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(pooled, epochs: list[int], path: str) -> None:
    """Reliability diagrams, one column per loss; rows: each training length, then the longest after
    temperature scaling. Test predictions of all seeds pooled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.gridspec import GridSpec, GridSpecFromSubplotSpec

    rows = [(e, False) for e in epochs] + [(epochs[-1], True)]
    fig = plt.figure(figsize=(3.0 * len(LOSSES), 3.9 * len(rows)))
    outer = GridSpec(len(rows), len(LOSSES), figure=fig, hspace=0.32, wspace=0.22, left=0.04, right=0.99, top=0.95,
                     bottom=0.04)
    for r, (epoch, scaled) in enumerate(rows):
        for c, name in enumerate(LOSSES):
            inner = GridSpecFromSubplotSpec(2, 1, subplot_spec=outer[r, c], height_ratios=[3, 1], hspace=0.06)
            top = fig.add_subplot(inner[0])
            bottom = fig.add_subplot(inner[1], sharex=top)
            logits, target = pooled[(epoch, name, scaled)]
            title = f"{name}, {epoch} epochs" + (", temp. scaled" if scaled else "")
            calibration.reliability_diagram(logits, target, axes=(top, bottom), title=title, legend=(r, c) == (0, 0))
            top.tick_params(labelbottom=False)
            top.set_xlabel("")
            if c:
                top.set_ylabel("")
                bottom.set_ylabel("")
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="runs per loss (seeds 0 .. n-1)")
    parser.add_argument("--epochs", default="10,300", help="the training lengths evaluated, comma list")
    parser.add_argument("--out", default=str(ROOT / "docs" / "calibration_reliability.png"),
                        help="reliability diagrams PNG ('' for none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (0: leave it); the model is tiny, one thread is fastest")
    parser.add_argument("--limit", type=int, default=None, help="use only this many images (smoke tests)")
    args = parser.parse_args(argv)
    epochs = sorted(int(e) for e in args.epochs.split(",") if e)
    if not epochs or epochs[0] < 1:
        parser.error(f"--epochs must list positive integers, got {args.epochs!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    results = {(e, n, s): [] for e in epochs for n in LOSSES for s in (False, True)}
    pooled_parts = {key: [] for key in results}
    start = time.perf_counter()
    for seed in range(args.seeds):
        data = load_digits_split(seed, device, args.limit)
        (_, y_val), (_, y_test) = data[1], data[2]
        for name, gamma in LOSSES.items():
            for epoch, (val_logits, test_logits) in train(gamma, data, seed, epochs, device).items():
                temperature = calibration.fit_temperature(val_logits, y_val)
                for scaled, logits in ((False, test_logits), (True, test_logits / temperature)):
                    row = evaluate(logits, y_test)
                    row["temperature"] = float(temperature)
                    results[(epoch, name, scaled)].append(row)
                    pooled_parts[(epoch, name, scaled)].append((logits.double().cpu(), y_test.cpu()))
        print(f"seed {seed} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    print(f"digits (scikit-learn), MLP, {args.seeds} seeds, epochs {epochs}, test split; mean ± std over seeds")
    print(format_table(results, epochs))
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.out:
        pooled = {k: (torch.cat([p[0] for p in v]), torch.cat([p[1] for p in v])) for k, v in pooled_parts.items()}
        plot(pooled, epochs, args.out)
        print(f"reliability diagrams: {args.out}")
    return results


if __name__ == "__main__":
    main()
