"""Segmentation losses: cross-entropy (the paper), cross-entropy + soft Dice, focal.

Every loss takes logits ``(B, C, H, W)``, integer targets ``(B, H, W)`` and
optional per-pixel weights ``(B, H, W)``, and is computed in float32 (autocast
disabled inside), so it is safe under bf16/fp16 mixed precision. Pixels whose
target is ``ignore_index`` contribute nothing (their logits get zero gradient).

The pixel terms are *weighted means*: ``sum(w_pix * w_class[t] * l) /
sum(w_pix * w_class[t])`` over valid pixels, which is exactly
:func:`torch.nn.functional.cross_entropy` with ``weight=`` and ``ignore_index=``
when no pixel weights are given. All-zero weights give a zero loss (and zero
gradient), not NaN.

Examples
--------
>>> import torch
>>> loss = build_loss("ce+dice", n_classes=3)
>>> target = torch.tensor([[[0, 1], [2, 1]]])
>>> perfect = 50.0 * torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
>>> round(float(loss(perfect, target)), 6)
0.0
>>> class_weights_from_counts(np.array([900, 90, 10]), scheme="inverse")  # ratio clipped at 10
tensor([0.1429, 1.4286, 1.4286])
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semdask.errors import InputError

__all__ = ["LOSSES", "WEIGHT_SCHEMES", "SegmentationLoss", "build_loss",
           "class_weights_from_counts"]

log = logging.getLogger(__name__)

LOSSES = ("ce", "ce+dice", "focal")
WEIGHT_SCHEMES = ("inverse", "inverse_sqrt", "median_freq")
_EPS = 1e-12


class SegmentationLoss(nn.Module):
    """One of :data:`LOSSES`; build it with :func:`build_loss`.

    Parameters
    ----------
    name : str
        ``"ce"``, ``"ce+dice"`` or ``"focal"``.
    n_classes : int
        Number of classes ``C`` (logit channels).
    class_weights : Tensor (C,), optional
        Per-class weights (e.g. :func:`class_weights_from_counts`).
    ignore_index : int
        Target value of unlabelled pixels.
    dice_weight : float
        ``"ce+dice"`` is ``(1 - dice_weight) * CE + dice_weight * Dice``.
    focal_gamma : float
        Focusing exponent of ``"focal"`` (0 gives cross-entropy).
    smooth : float
        Dice smoothing (added to numerator and denominator of every class).
    """

    class_weights: torch.Tensor | None

    def __init__(self, name: str, *, n_classes: int, class_weights: torch.Tensor | None = None,
                 ignore_index: int = -100, dice_weight: float = 0.4, focal_gamma: float = 2.0,
                 smooth: float = 1.0) -> None:
        super().__init__()
        self.name, self.n_classes, self.ignore_index = name, int(n_classes), int(ignore_index)
        self.dice_weight, self.focal_gamma, self.smooth = (float(dice_weight),
                                                           float(focal_gamma), float(smooth))
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32).detach().clone()
        self.register_buffer("class_weights", class_weights)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, n_classes={self.n_classes}, ignore_index="
                f"{self.ignore_index}, dice_weight={self.dice_weight}, "
                f"focal_gamma={self.focal_gamma}")

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
        """Scalar loss for logits ``(B, C, H, W)``, target ``(B, H, W)``, weight ``(B, H, W)``."""
        self._check(logits, target, weight)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            x = logits.float()
            valid = target != self.ignore_index
            t = torch.where(valid, target, torch.zeros_like(target)).long()
            w = valid.float() if weight is None else torch.where(valid, weight.float(), 0.0)
            cw = self.class_weights
            pix_w = w if cw is None else w * cw.to(x.device)[t]
            logp = F.log_softmax(x, dim=1)
            logp_t = logp.gather(1, t[:, None])[:, 0]
            if self.name == "focal" and self.focal_gamma != 0.0:
                p_t = logp_t.exp()
                nll = -((1.0 - p_t).clamp_min(1e-6) ** self.focal_gamma) * logp_t
            else:
                nll = -logp_t
            nll = torch.where(pix_w > 0, nll, 0.0)  # no 0 * inf = NaN from ignored pixels
            pixel = (pix_w * nll).sum() / pix_w.sum().clamp_min(_EPS)
            if self.name != "ce+dice":
                return pixel
            dice = self._dice(logp.exp(), t, w)
            return (1.0 - self.dice_weight) * pixel + self.dice_weight * dice

    def _dice(self, probs: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``1 - mean_c dice_c`` (class-weighted), sums over the whole batch, pixels weighted."""
        onehot = F.one_hot(t, self.n_classes).permute(0, 3, 1, 2).float()
        wp = w[:, None] * probs
        inter = (wp * onehot).sum(dim=(0, 2, 3))
        denom = wp.sum(dim=(0, 2, 3)) + (w[:, None] * onehot).sum(dim=(0, 2, 3))
        dice = (2.0 * inter + self.smooth) / (denom + self.smooth)
        if self.class_weights is None:
            return 1.0 - dice.mean()
        cw = self.class_weights.to(dice.device)
        return 1.0 - (cw * dice).sum() / cw.sum().clamp_min(_EPS)

    def _check(self, logits: torch.Tensor, target: torch.Tensor,
               weight: torch.Tensor | None) -> None:
        c = self.n_classes
        if logits.ndim != 4 or logits.shape[1] != c:
            raise InputError("logits", expected=f"(B, {c}, H, W)",
                             got=f"shape {tuple(logits.shape)}")
        want = (logits.shape[0], *logits.shape[2:])
        if tuple(target.shape) != want or target.is_floating_point():
            raise InputError("target", expected=f"integer class ids of shape {want}",
                             got=f"{target.dtype} of shape {tuple(target.shape)}",
                             fix="pass labels as a long tensor (B, H, W)")
        if weight is not None and tuple(weight.shape) != want:
            raise InputError("weight", expected=f"per-pixel weights of shape {want}",
                             got=f"shape {tuple(weight.shape)}")
        bad = (target != self.ignore_index) & ((target < 0) | (target >= c))
        if bool(bad.any()):
            raise InputError("target", expected=f"class ids 0..{c - 1} or ignore_index "
                             f"{self.ignore_index}", got=f"value {int(target[bad][0])}",
                             fix="map unlabelled pixels to ignore_index (or pass its value)")


def build_loss(name: str, *, n_classes: int, class_weights: torch.Tensor | None = None,
               ignore_index: int = -100, dice_weight: float = 0.4,
               focal_gamma: float = 2.0) -> nn.Module:
    """The training loss ``name`` (one of :data:`LOSSES`).

    Parameters
    ----------
    name : {"ce", "ce+dice", "focal"}
        ``"ce"``: pixel-wise cross-entropy (the paper). ``"ce+dice"``:
        ``(1 - dice_weight) * CE + dice_weight * (1 - soft multiclass Dice)``
        (0.6 / 0.4 by default). ``"focal"``: ``-(1 - p_t) ** focal_gamma * log p_t``.
    n_classes : int
        Number of classes.
    class_weights : Tensor (C,), optional
        Per-class weights: they scale each pixel's term by the weight of its
        true class, and weight the per-class Dice average.
    ignore_index : int
        Target value of pixels that contribute nothing.
    dice_weight, focal_gamma : float
        See above.

    Returns
    -------
    SegmentationLoss
        ``loss(logits, target, weight=None)`` returns a scalar.

    Raises
    ------
    InputError
        For an unknown name or inconsistent parameters.
    """
    if name not in LOSSES:
        raise InputError("loss", expected=f"one of {', '.join(LOSSES)}", got=repr(name),
                         fix="e.g. --loss ce+dice")
    if n_classes < 1 or not 0.0 <= dice_weight <= 1.0 or focal_gamma < 0:
        raise InputError("loss parameters", expected="n_classes >= 1, 0 <= dice_weight <= 1, "
                         "focal_gamma >= 0", got=f"n_classes={n_classes}, dice_weight="
                         f"{dice_weight}, focal_gamma={focal_gamma}")
    if class_weights is not None:
        cw = torch.as_tensor(class_weights)
        if cw.shape != (n_classes,) or not bool(torch.isfinite(cw).all()) or bool(
                (cw < 0).any()):
            raise InputError("class_weights", expected=f"{n_classes} finite weights >= 0",
                             got=f"{cw.tolist()}")
    return SegmentationLoss(name, n_classes=n_classes, class_weights=class_weights,
                            ignore_index=ignore_index, dice_weight=dice_weight,
                            focal_gamma=focal_gamma)


def class_weights_from_counts(counts: np.ndarray, *, scheme: str = "inverse_sqrt",
                              max_ratio: float = 10.0) -> torch.Tensor:
    """Per-class loss weights from pixel counts per class.

    With frequencies ``f = counts / counts.sum()``: ``"inverse"`` gives ``1 / f``,
    ``"inverse_sqrt"`` ``1 / sqrt(f)``, ``"median_freq"`` ``median(f) / f`` (median
    over present classes). Weights above ``max_ratio`` times the smallest are
    clipped to it (a class seen in a handful of pixels must not dominate), then
    scaled to mean 1 over the present classes. Absent classes (count 0) get
    weight 1, the mean: counts are usually measured on a sample, and a class the
    sample missed must stay learnable (a weight 0 would silence it).

    Parameters
    ----------
    counts : array (C,)
        Pixel count of each class (e.g. from a confusion matrix row sum).
    scheme : {"inverse", "inverse_sqrt", "median_freq"}
    max_ratio : float
        Largest allowed ratio of two present classes' weights (>= 1).

    Returns
    -------
    Tensor (C,) float32

    Examples
    --------
    >>> class_weights_from_counts(np.array([100, 400, 0, 1600]))
    tensor([1.7143, 0.8571, 1.0000, 0.4286])
    """
    c = np.asarray(counts, dtype=np.float64)
    if scheme not in WEIGHT_SCHEMES:
        raise InputError("class weight scheme", expected=f"one of {', '.join(WEIGHT_SCHEMES)}",
                         got=repr(scheme))
    if c.ndim != 1 or c.size < 1 or not np.isfinite(c).all() or (c < 0).any() or c.sum() <= 0:
        raise InputError("class counts", expected="a 1-D array of counts >= 0 with a positive "
                         "sum", got=f"{np.asarray(counts)!r}")
    if not max_ratio >= 1.0:
        raise InputError("max_ratio", expected="a number >= 1", got=repr(max_ratio))
    present = c > 0
    f = c[present] / c.sum()
    if scheme == "inverse":
        w = 1.0 / f
    elif scheme == "inverse_sqrt":
        w = 1.0 / np.sqrt(f)
    else:
        w = float(np.median(f)) / f
    w = np.minimum(w, w.min() * float(max_ratio))
    out = np.ones(c.size)
    out[present] = w / w.mean()
    log.debug("class weights (%s): %s", scheme, np.round(out, 4).tolist())
    return torch.as_tensor(out, dtype=torch.float32)
