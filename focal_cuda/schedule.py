"""Sample-dependent gamma: a piecewise-constant function of each position's own p_t.

Pure Python (no extension import), shared by the fused wrappers and the reference.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Union

import torch

__all__ = ["GammaSchedule", "MAX_THRESHOLDS", "PRESETS"]

MAX_THRESHOLDS = 7  # the kernels' GammaSchedule holds at most 8 pieces


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class GammaSchedule:
    """Gamma chosen per position (softmax) or per element (sigmoid) from its own ``p_t``.

    ``gammas`` has one more entry than ``thresholds``: ``gammas[k]`` applies where ``p_t < thresholds[k]``
    (the first such ``k``), ``gammas[-1]`` where ``p_t`` is at or above every threshold. Comparisons are
    exact: ``p_t`` (float32, or float64 for float64 logits) against each threshold as given (a Python float),
    as in the public FLSD code, which compares a float32 ``p_t.item()`` with a Python float.
    The chosen gamma is a constant of the position: the gradient does not differentiate the choice.

    >>> GammaSchedule(thresholds=(0.2, 0.5), gammas=(5.0, 3.0, 3.0))   # = GammaSchedule.flsd53()
    """

    thresholds: tuple[float, ...]
    gammas: tuple[float, ...]

    def __post_init__(self) -> None:
        thresholds, gammas = self.thresholds, self.gammas
        if not isinstance(thresholds, Sequence) or isinstance(thresholds, str) or not all(map(_is_number, thresholds)):
            raise TypeError(f"GammaSchedule: thresholds must be a sequence of numbers, got thresholds={thresholds!r}")
        if not isinstance(gammas, Sequence) or isinstance(gammas, str) or not all(map(_is_number, gammas)):
            raise TypeError(f"GammaSchedule: gammas must be a sequence of numbers, got gammas={gammas!r}")
        thresholds = tuple(float(t) for t in thresholds)
        gammas = tuple(float(g) for g in gammas)
        if len(gammas) != len(thresholds) + 1:
            raise ValueError("GammaSchedule: gammas must have one entry more than thresholds (gammas[-1] applies at or "
                             f"above the last threshold), got thresholds={thresholds!r} and gammas={gammas!r}")
        if len(thresholds) > MAX_THRESHOLDS:
            raise ValueError(f"GammaSchedule: at most {MAX_THRESHOLDS} thresholds, got thresholds={thresholds!r}")
        if not all(math.isfinite(t) and 0.0 < t <= 1.0 for t in thresholds):
            raise ValueError(f"GammaSchedule: thresholds must lie in (0, 1], got thresholds={thresholds!r}")
        if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
            raise ValueError(f"GammaSchedule: thresholds must be strictly increasing, got thresholds={thresholds!r}")
        if not all(math.isfinite(g) and g >= 0.0 for g in gammas):
            raise ValueError(f"GammaSchedule: gammas must be finite numbers >= 0, got gammas={gammas!r}")
        object.__setattr__(self, "thresholds", thresholds)
        object.__setattr__(self, "gammas", gammas)

    @classmethod
    def flsd53(cls) -> GammaSchedule:
        """FLSD-53 (Mukhoti et al. 2020): gamma 5 where ``p_t < 0.2``, else 3, with the public code's thresholds
        {0.2: 5, 0.5: 3} and ``FocalLossAdaptive(gamma=3)`` above 0.5."""
        return cls(thresholds=(0.2, 0.5), gammas=(5.0, 3.0, 3.0))

    @property
    def is_constant(self) -> bool:
        return not self.thresholds

    def gamma_of(self, p_t: torch.Tensor) -> torch.Tensor:
        """The rule, written plainly: each element's gamma, in float64. ``p_t`` is compared in float64, so
        that a float32 ``p_t`` meets each threshold as given (rounding the threshold to float32 could move
        it to either side)."""
        p = p_t.detach().to(torch.float64)
        gamma = torch.full_like(p, self.gammas[-1])
        for threshold, value in reversed(list(zip(self.thresholds, self.gammas))):
            gamma = torch.where(p < threshold, torch.full_like(p, value), gamma)
        return gamma


PRESETS: dict[str, GammaSchedule] = {"flsd53": GammaSchedule.flsd53()}
"""Named schedules accepted as ``gamma="name"``."""

Gamma = Union[float, GammaSchedule, str]


def resolve_gamma(gamma: Gamma) -> Union[float, GammaSchedule]:
    """A finite float >= 0, or a GammaSchedule (a preset name resolved); anything else raises naming gamma."""
    if isinstance(gamma, GammaSchedule):
        return gamma
    if isinstance(gamma, str):
        try:
            return PRESETS[gamma]
        except KeyError:
            raise ValueError(f"gamma must be a finite number >= 0, a GammaSchedule or one of {sorted(PRESETS)}, "
                             f"got gamma={gamma!r}") from None
    if not _is_number(gamma) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be a finite number >= 0, a GammaSchedule or one of {sorted(PRESETS)}, "
                         f"got gamma={gamma!r}")
    return float(gamma)


def op_gamma_arguments(gamma: Union[float, GammaSchedule]) -> tuple[float, list[float], list[float]]:
    """(gamma, gamma_thresholds, gamma_values) as the operators take them."""
    if isinstance(gamma, GammaSchedule):
        return gamma.gammas[-1], list(gamma.thresholds), list(gamma.gammas[:-1])
    return float(gamma), [], []
