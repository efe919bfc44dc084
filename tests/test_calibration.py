"""focal_cuda.calibration: the metrics against torchmetrics and plain restatements, properties that hold on any
data (calibrated predictions, closed-form miscalibration, temperature scaling), the reliability diagram,
and the calibration study (examples/calibration.py) end to end at a tiny size."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CUDA, randn

import focal_cuda
from focal_cuda import calibration

try:  # a test dependency (requirements-dev.txt); the comparisons with it skip where it is absent
    import torchmetrics
    from torchmetrics.functional.classification import multiclass_calibration_error
except ImportError:
    torchmetrics = None
needs_torchmetrics = pytest.mark.skipif(torchmetrics is None, reason="needs torchmetrics")

ROOT = Path(__file__).resolve().parents[1]


def random_predictions(n: int, c: int, gen: torch.Generator, device="cpu", scale: float = 3.0):
    """Logits whose labels follow a sharper softmax than the logits say (so the confidences are neither
    calibrated nor trivial), with some saturated rows (confidence exactly 1 in float32)."""
    logits = randn((n, c), gen, scale=scale)
    labels = torch.multinomial(torch.softmax(logits * 1.7, 1), 1, generator=gen).squeeze(1)
    logits[: n // 20] *= 40.0  # saturated: float32 softmax rounds the top class to exactly 1
    return logits.to(device), labels.to(device)


# ============================================================================ equal to torchmetrics


@pytest.mark.parametrize("n_bins", [1, 5, 15, 100])
@pytest.mark.parametrize("kind", ["logits", "probabilities"])
@needs_torchmetrics
def test_ece_and_mce_equal_torchmetrics(device, gen, kind, n_bins):
    logits, labels = random_predictions(3000, 10, gen, device)
    preds = logits if kind == "logits" else torch.softmax(logits, 1)
    assert (torch.softmax(logits, 1).max(1).values == 1).any(), "test setup: some confidences exactly 1"
    from_logits = kind == "logits"
    for ours, norm in ((calibration.expected_calibration_error, "l1"), (calibration.maximum_calibration_error, "max")):
        value = ours(preds, labels, n_bins, from_logits=from_logits)
        expected = multiclass_calibration_error(preds, labels, num_classes=10, n_bins=n_bins, norm=norm)
        assert value.device == preds.device and value.dim() == 0
        torch.testing.assert_close(value, expected.to(value.dtype), rtol=1e-6, atol=1e-7, msg=f"{norm}")
        metric = torchmetrics.classification.MulticlassCalibrationError(num_classes=10, n_bins=n_bins, norm=norm)
        metric = metric.to(device)
        for chunk in range(3):  # the stateful metric, fed in batches
            metric.update(preds[chunk * 1000:(chunk + 1) * 1000], labels[chunk * 1000:(chunk + 1) * 1000])
        torch.testing.assert_close(value, metric.compute().to(value.dtype), rtol=1e-6, atol=1e-7)


@needs_torchmetrics
def test_ece_equals_torchmetrics_at_bin_edges(device):
    """Confidences exactly on the bin edges k / n_bins and exactly 1: both put an edge in the bin above it."""
    n_bins = 10
    conf = torch.tensor([0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.55, 0.75, 0.95, 1.0], dtype=torch.float32)
    probs = torch.stack([conf, 1 - conf], 1).to(device)
    labels = torch.tensor([0, 1, 0, 0, 1, 0, 0, 1, 0, 1], device=device)
    for ours, norm in ((calibration.expected_calibration_error, "l1"), (calibration.maximum_calibration_error, "max")):
        value = ours(probs, labels, n_bins, from_logits=False)
        expected = multiclass_calibration_error(probs, labels, num_classes=2, n_bins=n_bins, norm=norm)
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    bins = calibration.calibration_bins(probs, labels, n_bins, from_logits=False)
    assert bins.count.tolist() == [0, 0, 0, 0, 0, 2, 1, 2, 1, 2, 2]


# ============================================================================ plain restatements


def test_adaptive_ece_equal_mass(gen):
    logits, labels = random_predictions(1003, 7, gen)
    n_bins = 15
    value = calibration.adaptive_calibration_error(logits, labels, n_bins)
    probs = torch.softmax(logits.double(), 1)
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    order = torch.argsort(conf, stable=True)
    total = 0.0
    counts = []
    for b in range(n_bins):  # the i-th smallest of N in bin floor(i * B / N)
        members = [int(order[i]) for i in range(len(order)) if (i * n_bins) // len(order) == b]
        counts.append(len(members))
        total += abs(float(correct[members].mean() - conf[members].mean())) * len(members) / len(order)
    assert max(counts) - min(counts) <= 1
    torch.testing.assert_close(value.double(), torch.tensor(total, dtype=torch.float64), rtol=1e-5, atol=1e-7)
    bins = calibration.calibration_bins(logits, labels, n_bins, binning="mass")
    assert bins.count.tolist() == counts
    assert (bins.lower[1:] >= bins.upper[:-1]).all()


@needs_torchmetrics
def test_classwise_ece_plain(gen):
    logits, labels = random_predictions(800, 5, gen)
    n_bins = 10
    value = calibration.classwise_calibration_error(logits, labels, n_bins)
    probs = torch.softmax(logits.float(), 1)
    per_class = []
    for k in range(5):
        p, y = probs[:, k], (labels == k).float()
        sce = 0.0
        for b in range(n_bins + 1):  # torchmetrics' bins: [b/B, (b+1)/B), and {1}
            lo, hi = b / n_bins, (b + 1) / n_bins
            members = (p >= lo) & (p < hi) if b < n_bins else p >= 1.0
            if members.any():
                sce += abs(float(y[members].mean() - p[members].mean())) * int(members.sum()) / len(p)
        per_class.append(sce)
    torch.testing.assert_close(value.double(), torch.tensor(sum(per_class) / 5, dtype=torch.float64), rtol=1e-5,
                               atol=1e-7)


def test_from_logits_or_probabilities(gen):
    logits, labels = random_predictions(500, 6, gen)
    probs = torch.softmax(logits, 1)
    for fn in (calibration.expected_calibration_error, calibration.adaptive_calibration_error,
               calibration.classwise_calibration_error, calibration.maximum_calibration_error):
        assert torch.equal(fn(logits, labels), fn(probs, labels, from_logits=False)), fn.__name__


# ============================================================================ properties that hold on any data


def calibrated_predictions(n: int, c: int, gen: torch.Generator):
    """Top-label calibrated by construction: confidence q ~ U(1/c, 1) on the predicted class (the rest spread
    evenly), and the label is the predicted class with probability q, else another class."""
    q = 1.0 / c + (1 - 1.0 / c) * torch.rand(n, generator=gen, dtype=torch.float64)
    pred = torch.randint(0, c, (n,), generator=gen)
    probs = ((1 - q) / (c - 1)).unsqueeze(1).repeat(1, c)
    probs[torch.arange(n), pred] = q
    right = torch.rand(n, generator=gen, dtype=torch.float64) < q
    other = (pred + torch.randint(1, c, (n,), generator=gen)) % c
    return probs, torch.where(right, pred, other)


def test_calibrated_predictions_have_ece_near_zero(gen):
    probs, labels = calibrated_predictions(400_000, 10, gen)
    ece = float(calibration.expected_calibration_error(probs, labels, from_logits=False))
    ada = float(calibration.adaptive_calibration_error(probs, labels, from_logits=False))
    # sampling noise only: about sqrt(q (1 - q) / n_bin) per bin, 1.4e-3 here
    assert ece < 4e-3 and ada < 4e-3, (ece, ada)
    # the same predictions with the confidence sharpened are miscalibrated: the metric sees it
    sharpened = torch.softmax(probs.log() * 2.0, 1)
    assert float(calibration.expected_calibration_error(sharpened, labels, from_logits=False)) > 0.05


def test_known_miscalibration_closed_form(device):
    """Two groups of predictions with fixed confidences and exactly known accuracies: ECE = sum of
    |accuracy - confidence| weighted by the group sizes; MCE the larger gap; adaptive ECE with two equal-mass
    bins the same (each group fills one bin)."""
    n, c = 1000, 4
    conf = torch.tensor([0.95] * n + [0.55] * n, dtype=torch.float64)
    probs = torch.stack([conf] + [(1 - conf) / (c - 1)] * (c - 1), 1)
    labels = torch.zeros(2 * n, dtype=torch.long)
    labels[: n // 4] = 1  # group 1: accuracy 0.75 (over-confident by 0.20)
    labels[n: n + n // 10] = 2  # group 2: accuracy 0.90 (under-confident by 0.35)
    probs, labels = probs.to(device), labels.to(device)
    expected_ece = 0.5 * 0.20 + 0.5 * 0.35
    ece = calibration.expected_calibration_error(probs, labels, from_logits=False)
    torch.testing.assert_close(ece.item(), expected_ece, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(calibration.maximum_calibration_error(probs, labels, from_logits=False).item(), 0.35,
                               rtol=1e-12, atol=1e-12)
    ada = calibration.adaptive_calibration_error(probs, labels, 2, from_logits=False)
    torch.testing.assert_close(ada.item(), expected_ece, rtol=1e-12, atol=1e-12)
    # classwise: class 0 has p = 0.95 / 0.55 with frequencies 0.75 / 0.90, classes 1-3 their own closed forms
    p_other = [(1 - 0.95) / 3, (1 - 0.55) / 3]
    freq = {1: (0.25, 0.0), 2: (0.0, 0.10), 3: (0.0, 0.0)}
    cw = 0.5 * (0.20 + 0.35)
    for k in (1, 2, 3):
        cw += 0.5 * abs(freq[k][0] - p_other[0]) + 0.5 * abs(freq[k][1] - p_other[1])
    cw /= c
    torch.testing.assert_close(calibration.classwise_calibration_error(probs, labels, from_logits=False).item(), cw,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5, 8.0])
def test_temperature_scaling_minimises_validation_nll(gen, scale):
    """Labels drawn from softmax(z), logits given as scale * z: the fitted T is the global minimiser of the
    validation NLL (no grid value does better, T = 1 included) and recovers the scale."""
    z = randn((20_000, 8), gen, scale=2.0)
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=gen).squeeze(1)
    logits = (z * scale).float()
    t = calibration.fit_temperature(logits, labels)
    nll = calibration.negative_log_likelihood
    fitted = float(nll(logits.double(), labels, t))
    assert fitted <= float(nll(logits.double(), labels, 1.0)) + 1e-12
    for candidate in torch.logspace(-1.5, 1.5, 61, dtype=torch.float64):
        assert fitted <= float(nll(logits.double(), labels, candidate)) + 1e-12, float(candidate)
    assert abs(float(t) / scale - 1) < 0.05, (float(t), scale)
    # the fused NLL is cross-entropy
    torch.testing.assert_close(nll(logits, labels), torch.nn.functional.cross_entropy(logits, labels))


def test_temperature_scaling_on_held_out_split(gen):
    """Fitted on a validation split of over-confident predictions, T > 1 lowers the held-out test NLL too."""
    z = randn((40_000, 5), gen, scale=1.5)
    labels = torch.multinomial(torch.softmax(z, 1), 1, generator=gen).squeeze(1)
    logits = z * 3.0
    t = calibration.fit_temperature(logits[:20_000], labels[:20_000])
    nll = calibration.negative_log_likelihood
    assert float(t) > 2.5
    assert float(nll(logits[20_000:], labels[20_000:], t)) < float(nll(logits[20_000:], labels[20_000:]))
    ece_before = calibration.expected_calibration_error(logits[20_000:], labels[20_000:])
    ece_after = calibration.expected_calibration_error(logits[20_000:] / t, labels[20_000:])
    assert float(ece_after) < 0.2 * float(ece_before)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_no_host_sync_in_the_binning(gen):
    logits, labels = random_predictions(5000, 10, gen, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for fn in (calibration.expected_calibration_error, calibration.maximum_calibration_error,
                   calibration.adaptive_calibration_error, calibration.classwise_calibration_error):
            fn(logits, labels)
    finally:
        torch.cuda.set_sync_debug_mode(0)


# ============================================================================ errors


def test_bad_arguments(gen):
    logits, labels = random_predictions(10, 3, gen)
    f = calibration.expected_calibration_error
    with pytest.raises(ValueError, match=r"n_bins.*n_bins=0"):
        f(logits, labels, 0)
    with pytest.raises(ValueError, match=r"n_bins.*n_bins=2\.5"):
        f(logits, labels, 2.5)
    with pytest.raises(ValueError, match=r"input.*\(10,\)"):
        f(logits[:, 0], labels)
    with pytest.raises(ValueError, match=r"input.*torch.int64"):
        f(labels.view(10, 1), labels)
    with pytest.raises(TypeError, match=r"target.*torch.float32"):
        f(logits, labels.float())
    with pytest.raises(ValueError, match=r"target.*\(10,\).*target.shape=\(9,\)"):
        f(logits, labels[:9])
    bad = labels.clone()
    bad[3] = 3
    with pytest.raises(IndexError, match=r"target.*\[0, 3\).*3"):
        f(logits, bad)
    with pytest.raises(ValueError, match=r"binning.*'quantile'"):
        calibration.calibration_bins(logits, labels, binning="quantile")
    with pytest.raises(ValueError, match=r"logits.*\(10,\)"):
        calibration.fit_temperature(logits[:, 0], labels)


# ============================================================================ the reliability diagram


def test_reliability_diagram_png(tmp_path, gen):
    logits, labels = random_predictions(2000, 10, gen)
    path = tmp_path / "reliability.png"
    fig = calibration.reliability_diagram(logits, labels, str(path), n_bins=10, title="test")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    width, height = struct.unpack(">II", data[16:24])
    assert width > 300 and height > 300
    top, bottom = fig.axes
    bins = calibration.calibration_bins(logits, labels, 10)
    count = bins.count.clone()
    count[-2] += count[-1]  # the exactly-1 bin is drawn with the last one
    drawn_counts = [p.get_height() for p in bottom.patches]
    assert drawn_counts == count[:-1].tolist()
    nonempty = count[:-1] > 0
    accuracy_bars = [p.get_height() for p in top.patches[: int(nonempty.sum())]]
    acc = (bins.accuracy * bins.count)
    acc[-2] += acc[-1]
    expected = (acc[:-1][nonempty] / count[:-1][nonempty]).tolist()
    assert accuracy_bars == pytest.approx(expected, abs=1e-6)
    assert "ECE" in top.get_title()
    import matplotlib.pyplot as plt

    plt.close(fig)


# ============================================================================ the study, end to end


def test_calibration_study_smoke(tmp_path):
    """examples/calibration.py at a tiny size: every loss trains, is temperature scaled, evaluated, tabulated,
    and the diagrams are drawn."""
    pytest.importorskip("sklearn")  # the digits data set (requirements-dev.txt)
    png = tmp_path / "study.png"
    cmd = [sys.executable, str(ROOT / "examples" / "calibration.py"), "--seeds", "2", "--epochs", "1,2",
           "--limit", "400", "--out", str(png), "--threads", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    table = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 2 * 5 * 2  # header + (2 lengths x 5 losses x with / without temperature scaling)
    for name in ("cross-entropy", "focal gamma=3", "FLSD-53"):
        assert sum(name in line for line in table) == 4
    for line in table[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        accuracy = float(cells[4].split(" ± ")[0])
        ece = float(cells[6].split(" ± ")[0])
        assert 0 < accuracy <= 100 and 0 <= ece <= 100 and " ± " in cells[6]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 50_000


def test_study_training_uses_the_fused_losses(monkeypatch):
    """The study's losses are focal_cuda's, FLSD-53 through the schedule (one call per step, no Python loop)."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(ROOT))
    from examples import calibration as study

    calls = []
    original = focal_cuda.softmax_focal_loss

    def spy(*args, **kwargs):
        calls.append(kwargs.get("gamma"))
        return original(*args, **kwargs)

    monkeypatch.setattr(focal_cuda, "softmax_focal_loss", spy)
    data = study.load_digits_split(0, torch.device("cpu"), limit=200)
    out = study.train("flsd53", data, 0, [1], torch.device("cpu"))
    assert set(calls) == {"flsd53"} and len(calls) == math.ceil(len(data[0][1]) / 64)
    assert out[1][1].shape == (len(data[2][1]), 10)
