"""nn.Module interface."""

from __future__ import annotations

import math
import numbers
import operator
from typing import Optional, Union

import torch
from torch import nn

from .functional import Alpha, Normalizer, reduction_code, sigmoid_focal_loss, softmax_focal_loss
from .schedule import Gamma, GammaSchedule, resolve_gamma

__all__ = ["FusedFocalLoss"]

_MODES = ("softmax", "sigmoid")


class FusedFocalLoss(nn.Module):
    """Focal loss as a module: a drop-in for ``FocalLoss(gamma, alpha, reduction)`` and ``nn.CrossEntropyLoss``.

    ``mode="softmax"``: ``input`` ``(N, C, ...)`` logits, ``target`` ``(N, ...)`` class indices; ``alpha`` is
    ``None``, a float or ``C`` per-class weights (kept as a buffer, so it follows ``.to(device)``).

    ``mode="sigmoid"`` (detection, and sigmoid segmentation): ``input`` ``(..., C)`` logits (or ``(N, C, ...)``
    with ``class_dim=1``), ``target`` dense floats of the same shape or class indices of the input's shape without
    the class dim (``C`` = background); ``alpha`` is ``None`` (no weighting) or a float (torchvision's alpha).
    ``forward`` also takes ``normalizer`` (``reduction="mean"`` only).

    ``gamma``: a float, a :class:`GammaSchedule` or a preset's name (``"flsd53"``), as the functions take it.
    """

    class_weight: Optional[torch.Tensor]

    def __init__(
        self,
        gamma: Gamma = 2.0,
        alpha: Alpha = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        mode: str = "softmax",
        class_dim: int = -1,
    ) -> None:
        super().__init__()
        # Checked here, as torch.nn's losses do, rather than at the first forward.
        if not isinstance(mode, str) or mode not in _MODES:
            raise ValueError(f"mode must be 'softmax' or 'sigmoid', got mode={mode!r}")
        reduction_code(reduction)
        self.gamma: Union[float, GammaSchedule] = resolve_gamma(gamma)
        if isinstance(ignore_index, bool):
            raise TypeError(f"ignore_index must be an int, got ignore_index={ignore_index!r}")
        try:
            self.ignore_index = operator.index(ignore_index)
        except TypeError:
            raise TypeError(f"ignore_index must be an int, got ignore_index={ignore_index!r}") from None
        self.reduction = reduction
        self.mode = mode
        if mode == "softmax" and class_dim != -1:
            raise ValueError(f"class_dim is for mode='sigmoid' (softmax: classes in dim 1 always), got class_dim={class_dim!r}")
        if mode == "sigmoid" and (isinstance(class_dim, bool) or class_dim not in (-1, 1)):
            raise ValueError(f"class_dim must be -1 (classes last) or 1 (channel-first), got class_dim={class_dim!r}")
        self.class_dim = int(class_dim)
        self.alpha_scalar: Optional[float] = None
        if isinstance(alpha, torch.Tensor) and alpha.dim() == 0:
            alpha = alpha.item()
        if alpha is None:
            self.register_buffer("class_weight", None)
        elif isinstance(alpha, numbers.Real) and not isinstance(alpha, bool):
            if not math.isfinite(alpha):
                raise ValueError(f"alpha must be finite, got alpha={alpha!r}")
            self.alpha_scalar = float(alpha)
            self.register_buffer("class_weight", None)
        elif mode == "sigmoid":
            raise ValueError(f"mode='sigmoid' takes alpha=None or a float, got alpha={alpha!r}")
        else:
            self.register_buffer("class_weight", _class_weight(alpha))

    def forward(self, input: torch.Tensor, target: torch.Tensor, normalizer: Normalizer = None) -> torch.Tensor:
        if self.mode == "sigmoid":
            alpha = -1.0 if self.alpha_scalar is None else self.alpha_scalar
            return sigmoid_focal_loss(input, target, alpha, self.gamma, self.reduction,
                                      ignore_index=self.ignore_index, normalizer=normalizer, class_dim=self.class_dim)
        if normalizer is not None:
            raise ValueError(f"normalizer is for mode='sigmoid', got mode={self.mode!r} and normalizer={normalizer!r}")
        alpha = self.class_weight if self.class_weight is not None else self.alpha_scalar
        return softmax_focal_loss(input, target, self.gamma, alpha, self.ignore_index, self.reduction)

    def extra_repr(self) -> str:
        alpha = "per-class" if self.class_weight is not None else self.alpha_scalar
        return f"mode={self.mode!r}, gamma={self.gamma}, alpha={alpha}, ignore_index={self.ignore_index}, reduction={self.reduction!r}"


def _class_weight(alpha) -> torch.Tensor:
    """Per-class weights as a float64 buffer, so that float64 inputs see them as given; the kernels read
    them in their accumulation type."""
    if isinstance(alpha, torch.Tensor):
        if alpha.requires_grad:
            raise ValueError("alpha must not require grad: focal_cuda differentiates with respect to the logits "
                             "only, got alpha.requires_grad=True")
        if alpha.dtype == torch.bool or alpha.is_complex():
            raise TypeError(f"alpha must hold real per-class weights, got alpha.dtype={alpha.dtype}")
        weight = alpha.detach().to(torch.float64).clone()
    else:
        try:
            if isinstance(alpha, (str, bytes)):
                raise TypeError
            weight = torch.as_tensor(alpha, dtype=torch.float64)  # a sequence or an array of floats
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"alpha must be None, a float, a sequence of per-class floats or a 1-D tensor, "
                            f"got alpha={alpha!r}") from None
    if weight.dim() != 1 or weight.numel() == 0:
        raise ValueError(f"alpha must hold one weight per class (a non-empty 1-D sequence), "
                         f"got alpha of shape {tuple(weight.shape)}")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"alpha must hold finite weights, got alpha={weight.tolist()!r}")
    return weight
