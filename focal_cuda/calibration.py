"""Calibration metrics, temperature scaling and reliability diagrams for classifiers.

Every metric takes ``input`` of shape ``(N, C)``, logits (``from_logits=True``, the default) or
probabilities, and integer class indices ``target`` of shape ``(N,)``, and returns a 0-dim tensor on the
input's device. The binning runs on that device with no host synchronisation (bucketize, sort and
scatter-add; no ``.item()``, no data-dependent shapes).

Bins follow torchmetrics' ``MulticlassCalibrationError`` exactly, so that ``expected_calibration_error``
equals its ``norm="l1"`` and ``maximum_calibration_error`` its ``norm="max"`` on the same inputs:
``n_bins`` equal-width bins ``[k / n_bins, (k + 1) / n_bins)`` plus one bin holding the confidences that
are exactly 1 (frequent in float32 for an over-confident network). Probabilities are computed in float32
(float64 for float64 input), as torchmetrics does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

__all__ = [
    "CalibrationBins",
    "adaptive_calibration_error",
    "calibration_bins",
    "classwise_calibration_error",
    "expected_calibration_error",
    "fit_temperature",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "reliability_diagram",
]


def _probabilities(input: torch.Tensor, target: torch.Tensor, from_logits: bool) -> torch.Tensor:
    if not isinstance(input, torch.Tensor) or not input.is_floating_point() or input.dim() != 2:
        raise ValueError("input must be a floating (N, C) tensor of logits or probabilities, got input="
                         f"{type(input).__name__ if not isinstance(input, torch.Tensor) else tuple(input.shape)}"
                         + (f" of dtype {input.dtype}" if isinstance(input, torch.Tensor) else ""))
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got target="
                        f"{target.dtype if isinstance(target, torch.Tensor) else type(target).__name__}")
    if target.shape != input.shape[:1]:
        raise ValueError(f"target must have shape ({input.shape[0]},) for input.shape={tuple(input.shape)}, "
                         f"got target.shape={tuple(target.shape)}")
    if target.device != input.device:
        raise ValueError(f"target must be on the input's device {input.device}, got target.device={target.device}")
    if target.is_cpu and target.numel() and (int(target.min()) < 0 or int(target.max()) >= input.shape[1]):
        bad = int(target[(target < 0) | (target >= input.shape[1])][0])
        raise IndexError(f"target values must be in [0, {input.shape[1]}), got target value {bad}")
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.detach().to(dtype)
    return torch.softmax(x, dim=1) if from_logits else x


def _check_bins(n_bins: int) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got n_bins={n_bins!r}")


@dataclasses.dataclass
class CalibrationBins:
    """Per-bin statistics: mean ``accuracy`` and ``confidence`` (0 in an empty bin), ``count``, and the
    bins' ``lower`` / ``upper`` edges. Equal-width bins have ``n_bins + 1`` entries (the last one holds the
    confidences equal to 1); equal-mass bins have ``n_bins``."""

    accuracy: torch.Tensor
    confidence: torch.Tensor
    count: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor

    @property
    def gap(self) -> torch.Tensor:
        return (self.accuracy - self.confidence).abs()

    @property
    def proportion(self) -> torch.Tensor:
        return self.count / self.count.sum().clamp(min=1)


def _bin_means(values: torch.Tensor, correct: torch.Tensor, index: torch.Tensor, slots: int):
    count = torch.zeros(slots, dtype=values.dtype, device=values.device).scatter_add_(0, index,
                                                                                      torch.ones_like(values))
    conf = torch.zeros_like(count).scatter_add_(0, index, values)
    acc = torch.zeros_like(count).scatter_add_(0, index, correct.to(values.dtype))
    return torch.nan_to_num(acc / count), torch.nan_to_num(conf / count), count


def _top_label(probs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    confidence, prediction = probs.max(dim=1)
    return confidence, prediction.eq(target)


def calibration_bins(input: torch.Tensor, target: torch.Tensor, n_bins: int = 15, *, from_logits: bool = True,
                     binning: str = "width") -> CalibrationBins:
    """The top-label reliability bins: ``binning="width"`` (equal width, torchmetrics' bins) or ``"mass"``
    (equal mass: the ``i``-th smallest of ``N`` confidences in bin ``floor(i * n_bins / N)``)."""
    _check_bins(n_bins)
    probs = _probabilities(input, target, from_logits)
    confidence, correct = _top_label(probs, target)
    if binning == "width":
        edges = torch.linspace(0, 1, n_bins + 1, dtype=confidence.dtype, device=confidence.device)
        index = torch.bucketize(confidence, edges, right=True) - 1
        acc, conf, count = _bin_means(confidence, correct, index, n_bins + 1)
        lower = edges
        upper = torch.cat([edges[1:], edges[-1:]])
    elif binning == "mass":
        sorted_conf, order = torch.sort(confidence, stable=True)
        n = confidence.shape[0]
        index = torch.div(torch.arange(n, device=confidence.device) * n_bins, max(n, 1), rounding_mode="floor")
        acc, conf, count = _bin_means(sorted_conf, correct[order], index, n_bins)
        first = torch.full((n_bins,), math.inf, dtype=confidence.dtype, device=confidence.device)
        last = torch.full_like(first, -math.inf)
        lower = first.scatter_reduce(0, index, sorted_conf, "amin")
        upper = last.scatter_reduce(0, index, sorted_conf, "amax")
    else:
        raise ValueError(f"binning must be 'width' or 'mass', got binning={binning!r}")
    return CalibrationBins(acc, conf, count, lower, upper)


def expected_calibration_error(input: torch.Tensor, target: torch.Tensor, n_bins: int = 15, *,
                               from_logits: bool = True) -> torch.Tensor:
    """ECE: ``sum_b |accuracy_b - confidence_b| n_b / N`` over ``n_bins`` equal-width bins of the top-label
    confidence (Guo et al. 2017; 15 bins as Mukhoti et al. 2020). Equals torchmetrics'
    ``multiclass_calibration_error(..., norm="l1")``."""
    bins = calibration_bins(input, target, n_bins, from_logits=from_logits)
    return (bins.gap * bins.proportion).sum()


def maximum_calibration_error(input: torch.Tensor, target: torch.Tensor, n_bins: int = 15, *,
                              from_logits: bool = True) -> torch.Tensor:
    """MCE: the largest ``|accuracy_b - confidence_b|`` over the non-empty equal-width bins. Equals torchmetrics'
    ``multiclass_calibration_error(..., norm="max")``."""
    return calibration_bins(input, target, n_bins, from_logits=from_logits).gap.max()


def adaptive_calibration_error(input: torch.Tensor, target: torch.Tensor, n_bins: int = 15, *,
                               from_logits: bool = True) -> torch.Tensor:
    """Adaptive ECE (AdaECE, Nguyen & O'Connor 2015; Mukhoti et al. 2020): the ECE over ``n_bins`` equal-mass
    bins of the sorted top-label confidences, so that every bin holds ``N / n_bins`` samples (up to one)."""
    bins = calibration_bins(input, target, n_bins, from_logits=from_logits, binning="mass")
    return (bins.gap * bins.proportion).sum()


def classwise_calibration_error(input: torch.Tensor, target: torch.Tensor, n_bins: int = 15, *,
                                from_logits: bool = True) -> torch.Tensor:
    """Classwise ECE (SCE, Nixon et al. 2019; Kull et al. 2019): for every class ``k`` the ECE of the
    probabilities ``p_k`` of all samples against the indicator ``target == k`` (equal-width bins as above),
    averaged over the classes."""
    _check_bins(n_bins)
    probs = _probabilities(input, target, from_logits)
    n, c = probs.shape
    edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype, device=probs.device)
    index = torch.bucketize(probs, edges, right=True) - 1  # (N, C)
    slot = index + torch.arange(c, device=probs.device) * (n_bins + 1)
    is_class = target.unsqueeze(1).eq(torch.arange(c, device=probs.device))
    acc, conf, count = _bin_means(probs.reshape(-1), is_class.reshape(-1), slot.reshape(-1), c * (n_bins + 1))
    gap = (acc - conf).abs().view(c, n_bins + 1)
    return (gap * count.view(c, n_bins + 1)).sum() / max(n * c, 1)


def negative_log_likelihood(logits: torch.Tensor, target: torch.Tensor, temperature=1.0) -> torch.Tensor:
    """Mean NLL of ``softmax(logits / temperature)``: ``focal_cuda.softmax_focal_loss`` with ``gamma=0``
    (cross-entropy in one fused pass; differentiable with respect to the logits and the temperature)."""
    from .functional import softmax_focal_loss

    return softmax_focal_loss(logits / temperature, target, gamma=0.0, reduction="mean")


def fit_temperature(logits: torch.Tensor, target: torch.Tensor, *, max_iter: int = 100) -> torch.Tensor:
    """Post-hoc temperature scaling (Guo et al. 2017): the scalar ``T > 0`` that minimises the validation NLL
    of ``softmax(logits / T)``, fitted on held-out logits (float32 or float64) by L-BFGS on ``log T`` from
    ``T = 1``. Returns ``T`` as a 0-dim float64 tensor; divide test logits by it."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 2:
        raise ValueError(f"logits must be a floating (N, C) tensor, got logits="
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    x = logits.detach().to(torch.float64)
    log_t = torch.zeros((), dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, tolerance_grad=1e-12,
                                  tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = negative_log_likelihood(x, target, log_t.exp())
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return log_t.detach().exp()


def reliability_diagram(input: torch.Tensor, target: torch.Tensor, path: Optional[str] = None, *, n_bins: int = 15,
                        from_logits: bool = True, title: Optional[str] = None, axes=None, legend: bool = True):
    """A reliability diagram: each equal-width bin's accuracy (bars) against its confidence, the gap between
    them shaded, each bin's mean confidence (a black line), the diagonal of perfect calibration, and the
    bins' sample counts below. The bin of
    confidences exactly 1 is drawn with the last bin. Writes a PNG to ``path`` when given; returns the
    figure. ``axes``: two matplotlib axes to draw into (accuracy, counts) instead of a new figure."""
    import matplotlib.pyplot as plt

    bins = calibration_bins(input, target, n_bins, from_logits=from_logits)
    count = bins.count.double().cpu()
    acc_sum = (bins.accuracy.double().cpu() * count)
    conf_sum = (bins.confidence.double().cpu() * count)
    count = torch.cat([count[:-2], count[-2:].sum(0, keepdim=True)])  # exactly-1 into the last bin
    acc_sum = torch.cat([acc_sum[:-2], acc_sum[-2:].sum(0, keepdim=True)])
    conf_sum = torch.cat([conf_sum[:-2], conf_sum[-2:].sum(0, keepdim=True)])
    nonempty = count > 0
    acc = torch.where(nonempty, acc_sum / count.clamp(min=1), torch.zeros_like(count))
    conf = torch.where(nonempty, conf_sum / count.clamp(min=1), torch.zeros_like(count))
    width = 1.0 / n_bins
    centres = (torch.arange(n_bins, dtype=torch.float64) + 0.5) * width
    if axes is None:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(4.2, 5.2), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 1]})
    else:
        top, bottom = axes
        fig = top.figure
    m = nonempty.numpy()
    low, high = torch.minimum(acc, conf).numpy(), torch.maximum(acc, conf).numpy()
    acc, conf, count, centres = acc.numpy(), conf.numpy(), count.numpy(), centres.numpy()
    top.bar(centres[m], acc[m], width=width, color="#4477aa", edgecolor="black", linewidth=0.5, label="accuracy")
    top.bar(centres[m], (high - low)[m], bottom=low[m], width=width, color="#ee6677", alpha=0.5, edgecolor="#cc3311",
            hatch="//", linewidth=0.5, label="gap to confidence")
    top.hlines(conf[m], (centres - width / 2)[m], (centres + width / 2)[m], color="black", linewidth=1.2,
               label="mean confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    ece = float(expected_calibration_error(input, target, n_bins, from_logits=from_logits))
    top.set_title(f"{title or 'reliability diagram'}\nECE {100 * ece:.2f}%, {int(count.sum())} samples", fontsize=8)
    if legend:
        top.legend(loc="upper left", fontsize=7)
    bottom.bar(centres, count, width=width, color="#999999", edgecolor="black", linewidth=0.5)
    bottom.set_yscale("symlog", linthresh=1)
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("count")
    if path is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    return fig
