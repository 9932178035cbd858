"""Fingerprint the training data, then plan the recipe (nnU-Net's idea, for 2-D SEM).

:func:`fingerprint` measures the training stores once: image sizes, pixel sizes, class
pixel shares, per-class *width* (twice the distance to the class edge along its medial
axis, so a 2-px crack has width ~2) and *object size* (the square root of the component
area a typical pixel of the class belongs to), and intensity statistics. It reads every
pixel of small mosaics and seeded crops of large ones, so it costs seconds on any size.

:func:`plan` turns that into the values of :data:`semdask.training.config.PLANNED` that
the user did not give:

- input scale: 1, unless the largest objects need more context than the biggest window
  holds; then as small as that context asks, but never so small that a rare thin class
  (0.05-1 % of the pixels, e.g. cracks) gets under :data:`MIN_WIDTH_PX` (1.5 px) wide, a
  more common one under 3 px, the smallest mosaic under 1.5 windows of 192 px, nor 1/4;
- window: twice the typical object size of the classes under 40 % of the pixels (the
  matrix-like ones span the mosaic), between 192 px and :data:`MAX_WINDOW` (CPU 256,
  CUDA 512), within the mosaics;
- batch: a fixed number of pixels per step (CPU ``8 x 192^2``, CUDA ``16 x 256^2``), at
  least 4 windows;
- class-balanced share of windows: from 1/3 (the rarest class has >= 15 % of the pixels)
  to 2/3 (<= 1 %), linear in the logarithm of its share;
- class weights: ``auto`` (inverse square root of the pixel shares, ratio <= 10), so
  rare classes stay in the gradient of the cross-entropy;
- augmentation: ``strong`` below 1 MPix of labelled training pixels, else ``default``;
- warm-up: 3 % of the steps (cosine and poly schedules);
- epochs x steps: 20 x 100 without a budget, or fitted to ``budget_steps``; a wall-time
  budget is fitted by :func:`fit_schedule` from timed steps (:func:`calibrate`).

Examples
--------
>>> fit_schedule(600.0, step_s=0.5, val_s=5.0)  # 10 min; validation 5 s of every 25 s
(24, 40)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semdask.training.config import PLANNED, Augment, ClassWeights, Schedule, TrainConfig

__all__ = ["MAX_WINDOW", "MIN_WIDTH_PX", "ClassStats", "Fingerprint", "calibrate",
           "fingerprint", "fit_schedule", "lr_at", "plan", "plan_table"]

log = logging.getLogger(__name__)

MIN_WIDTH_PX = 1.5
MAX_WINDOW = {"cpu": 256, "cuda": 512}
_MIN_WINDOW = 192
_MIN_BATCH = 4
_PIXELS_PER_STEP = {"cpu": 8 * 192 * 192, "cuda": 16 * 256 * 256}
_CROP, _MIN_CROP = 1024, 256
_MATRIX_SHARE = 0.4
_RARE_SHARE = 0.01


@dataclass(frozen=True)
class ClassStats:
    """Measured properties of one class (px at the stores' own sampling)."""

    name: str
    share: float
    width_px: float
    size_px: float


@dataclass(frozen=True)
class Fingerprint:
    """What :func:`fingerprint` measured (see the module docstring)."""

    shapes: tuple[tuple[int, int], ...]
    pixel_sizes_um: tuple[float | None, ...]
    labelled_px: int  # estimated over whole mosaics
    sampled_px: int  # pixels measured
    classes: tuple[ClassStats, ...]
    intensity: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        """Plain types (for YAML and the model's provenance)."""
        d = asdict(self)
        d["shapes"] = [list(s) for s in self.shapes]
        d["pixel_sizes_um"] = list(self.pixel_sizes_um)
        d["classes"] = [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in c.items()}
                        for c in d["classes"]]
        return d


def _crops(shape: tuple[int, int], max_px: int, rng: np.random.Generator
           ) -> list[tuple[slice, slice]]:
    """The whole mosaic when it holds at most ``max_px`` pixels, else seeded square crops."""
    h, w = shape
    if h * w <= max_px:
        return [(slice(0, h), slice(0, w))]
    edge = int(np.clip(math.isqrt(max_px), _MIN_CROP, _CROP))
    n = max(1, max_px // (edge * edge))
    return [(slice(y, y + min(h, edge)), slice(x, x + min(w, edge)))
            for y, x in zip(rng.integers(0, max(1, h - edge + 1), n),
                            rng.integers(0, max(1, w - edge + 1), n), strict=True)]


def _class_geometry(lab: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
    """Medial-axis widths and connected-component areas of class ``c`` in ``lab``."""
    from scipy import ndimage
    from skimage.morphology import medial_axis

    mask = lab == c
    if not mask.any():
        return np.zeros(0), np.zeros(0)
    skel, dist = medial_axis(mask, return_distance=True)
    widths = 2.0 * dist[skel] - 1.0
    comp, n = ndimage.label(mask)
    areas = np.bincount(comp.ravel(), minlength=n + 1)[1:].astype(np.float64)
    return widths, areas


def fingerprint(stores: Sequence[str | Path], *, labels: str = "truth",
                max_pixels: int = 1 << 22, seed: int = 0) -> Fingerprint:
    """Measure the training stores (labels and image) for :func:`plan`.

    Parameters
    ----------
    stores : sequence of path
        OME-Zarr mosaics with ``labels/<labels>`` (values ``>= n_classes`` are unlabelled).
    labels : str
        Label group.
    max_pixels : int
        Pixels to measure in all (4 Mi): each store gets an equal share, read whole
        when it fits, else as seeded square crops (256 to 1024 px) adding up to it.
    seed : int
        Seed of the crop positions.
    """
    from semdask.storage.io import open_labels, open_mosaic

    rng = np.random.default_rng([seed, 4242])
    shapes, sizes = [], []
    names: list[str] = []
    counts: np.ndarray | None = None
    widths: list[list[np.ndarray]] = []
    areas: list[list[np.ndarray]] = []
    hist = np.zeros(256, dtype=np.int64)
    lo_hi: list[tuple[float, float]] = []
    sampled, labelled = 0, 0.0
    for p in stores:
        mosaic, lab = open_mosaic(p), open_labels(p, labels)
        if counts is None:
            names = list(lab.classes)
            counts = np.zeros(len(names), dtype=np.int64)
            widths, areas = [[] for _ in names], [[] for _ in names]
        shape = (int(mosaic.image.shape[0]), int(mosaic.image.shape[1]))
        shapes.append(shape)
        sizes.append(mosaic.pixel_size_um)
        seen, valid = 0, 0
        for ys, xs in _crops(shape, max(1, max_pixels // len(stores)), rng):
            lb = np.asarray(lab.data[ys, xs].compute(scheduler="synchronous"))
            img = np.asarray(mosaic.image[ys, xs].compute(scheduler="synchronous"),
                             dtype=np.float64)
            sampled, seen, valid = sampled + lb.size, seen + lb.size, valid + int(
                (lb < len(names)).sum())
            counts += np.bincount(lb[lb < len(names)].ravel().astype(np.intp),
                                  minlength=len(names))[:len(names)]
            lo, hi = float(img.min()), float(img.max())
            lo_hi.append((lo, hi))
            scaled = np.clip((img - lo) / max(hi - lo, 1e-12) * 255.0, 0, 255).astype(np.intp)
            hist += np.bincount(scaled.ravel(), minlength=256)
            for c in range(len(names)):
                w, a = _class_geometry(lb, c)
                widths[c].append(w)
                areas[c].append(a)
        labelled += shape[0] * shape[1] * valid / max(seen, 1)
    assert counts is not None  # stores is non-empty (checked by the caller)
    total = max(int(counts.sum()), 1)
    classes = []
    for c, name in enumerate(names):
        w = np.concatenate(widths[c]) if widths[c] else np.zeros(0)
        a = np.concatenate(areas[c]) if areas[c] else np.zeros(0)
        size = 0.0
        if a.size:  # area-weighted median component area: the object a pixel belongs to
            order = np.argsort(a)
            cum = np.cumsum(a[order])
            size = float(np.sqrt(a[order][np.searchsorted(cum, cum[-1] / 2.0)]))
        classes.append(ClassStats(name, float(counts[c] / total),
                                  float(np.median(w)) if w.size else 0.0, size))
    cdf = np.cumsum(hist) / max(hist.sum(), 1)
    intensity = {"p01": float(np.searchsorted(cdf, 0.01)) / 255.0,
                 "p50": float(np.searchsorted(cdf, 0.5)) / 255.0,
                 "p99": float(np.searchsorted(cdf, 0.99)) / 255.0,
                 "min": min(v[0] for v in lo_hi), "max": max(v[1] for v in lo_hi)}
    return Fingerprint(tuple(shapes), tuple(sizes), int(labelled), sampled, tuple(classes),
                       intensity)


def _round_window(px: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, 32 * math.ceil(px / 32))))


def plan(fp: Fingerprint | None, cfg: TrainConfig) -> tuple[TrainConfig, dict[str, str]]:
    """Fill the planned fields ``cfg`` left ``None``; returns the config and the reasons.

    Explicit values always win. With ``cfg.plan`` false (or no fingerprint), the fixed
    defaults of earlier versions fill them (window 256, batch 8, 20 x 100 steps, balance
    0.5, default augmentation, scale 1, no warm-up, no class weights).
    """
    given = {k for k in PLANNED if getattr(cfg, k) is not None}
    why: dict[str, str] = {k: "given" for k in given}
    if not cfg.plan or fp is None:
        fixed = {"window": 256, "batch_size": 8, "epochs": 20, "steps_per_epoch": 100,
                 "balance": 0.5, "augment": Augment.DEFAULT, "warmup": 0.0, "scale": None,
                 "class_weights": ClassWeights.NONE}
        out = cfg.model_copy(update={k: v for k, v in fixed.items() if k not in given})
        return out, {**{k: "fixed default (no planning)" for k in fixed if k not in given},
                     **why}
    kind = "cuda" if str(cfg.device).startswith("cuda") else "cpu"
    cap = MAX_WINDOW[kind]
    present = [c for c in fp.classes if c.share > 0]
    share = {c.name: c.share for c in present}
    # matrix-like classes (>= 40 % of the pixels) span the mosaic: their extent is no
    # object that a window must hold
    objects = [c for c in present if c.share < _MATRIX_SHARE] or sorted(
        present, key=lambda c: c.share)[:1]
    size = max((c.size_px for c in objects), default=64.0)
    relevant = [c for c in present if c.share >= 5e-4 and c.width_px > 0]
    thin = min((c.width_px for c in relevant), default=64.0)
    # the scale each class allows: a rare thin class (< 1 %, a crack) down to MIN_WIDTH_PX,
    # a common one (it weighs on every score) down to twice that
    s_thin = max((MIN_WIDTH_PX * (1.0 if c.share < _RARE_SHARE else 2.0) / c.width_px
                  for c in relevant), default=0.0)
    # and the smallest mosaic keeps >= 1.5 smallest windows (small images stay sharp)
    s_img = 1.5 * _MIN_WINDOW / max(min(min(h, w) for h, w in fp.shapes), 1)
    upd: dict[str, Any] = {}
    # input scale: downscale only for context, never a relevant class under MIN_WIDTH_PX
    # (measured on NASA EBC1: half resolution with the 3-px cracks at 1.5 px reached 0.70
    # mIoU, crack 0.27; full resolution with 384-px windows learned nothing in 10 min)
    fixed_geometry = cfg.scale is not None or cfg.pixel_size_um is not None or "window" in given
    if not fixed_geometry:
        s_ctx = cap / (2.0 * max(size, 1.0))
        s = max(s_ctx, s_thin, s_img, 0.25)
        if s < 0.8:
            upd["scale"] = round(s, 3)
            why["scale"] = (f"objects ~{size:.0f} px need more context than a {cap}-px window; "
                            f"the thinnest class ({thin:.1f} px) stays >= {MIN_WIDTH_PX:g} px")
        else:
            upd["scale"] = 1.0
            why["scale"] = (f"thinnest class {thin:.1f} px wide" if s_thin >= 0.8 else
                            "small mosaics" if s_img >= 0.8 else
                            f"objects ~{size:.0f} px fit the window") + ": full resolution"
    elif "scale" not in given:
        why["scale"] = "window or pixel size given: the stores' own sampling"
    s_eff = upd.get("scale") or cfg.scale or 1.0
    smallest = min(min(h, w) for h, w in fp.shapes) * s_eff
    if cfg.split != "stores":  # a band or block is held out, with a guard gap around it
        held = smallest * (1.0 - cfg.val_fraction)
        smallest = held - cfg.guard if cfg.guard is not None else held / 2.0
    fit = max(16, int(smallest // 16) * 16)
    if "window" not in given:
        upd["window"] = min(_round_window(2.0 * size * s_eff, _MIN_WINDOW, cap), fit)
        why["window"] = (f"2 x object size {size * s_eff:.0f} px "
                         f"({', '.join(c.name for c in objects)}), in [{_MIN_WINDOW}, {cap}], "
                         f"<= {fit} (the training part of the split)")
    window = upd.get("window") or cfg.window or 256
    if "batch_size" not in given:
        upd["batch_size"] = int(min(32, max(_MIN_BATCH,
                                            round(_PIXELS_PER_STEP[kind] / window ** 2))))
        why["batch_size"] = f"{_PIXELS_PER_STEP[kind] / 1e6:.2f} MPix per step on {kind}"
    rarest = min(share.values(), default=1.0)
    if "balance" not in given:
        rare = min(1.0, max(0.0, math.log(0.15 / max(rarest, 1e-9)) / math.log(15.0)))
        upd["balance"] = round(1 / 3 + rare / 3, 2)  # 1/3 at >= 15 %, 2/3 at <= 1 %
        why["balance"] = f"rarest class {rarest:.2%} of the pixels"
    if "class_weights" not in given:  # rare classes stay in the gradient (ratio <= 10)
        upd["class_weights"] = ClassWeights.AUTO
        why["class_weights"] = (f"inverse-sqrt pixel shares (rarest {rarest:.2%}), "
                                "ratio <= 10")
    if "augment" not in given:
        upd["augment"] = Augment.STRONG if fp.labelled_px < 1_000_000 else Augment.DEFAULT
        why["augment"] = f"{fp.labelled_px / 1e6:.2f} MPix labelled"
    if "warmup" not in given:
        upd["warmup"] = 0.03 if cfg.schedule in (Schedule.COSINE, Schedule.POLY) else 0.0
        why["warmup"] = "3 % of the steps (linear)"
    epochs, spe = cfg.epochs, cfg.steps_per_epoch
    if cfg.budget_steps is not None:
        epochs = epochs or min(20, cfg.budget_steps)
        spe = spe or max(1, math.ceil(cfg.budget_steps / epochs))
        why.setdefault("epochs", f"budget {cfg.budget_steps} steps")
        why.setdefault("steps_per_epoch", f"budget {cfg.budget_steps} steps")
    elif cfg.budget_s is not None:
        why.setdefault("epochs", f"fitted to {cfg.budget_s:.0f} s after timing steps")
        why.setdefault("steps_per_epoch", "validation <= ~20 % of the time")
    upd["epochs"], upd["steps_per_epoch"] = epochs or 20, spe or 100
    for k in ("epochs", "steps_per_epoch"):
        why.setdefault(k, "default")
    return cfg.model_copy(update={k: v for k, v in upd.items() if k not in given}), why


def plan_table(cfg: TrainConfig, why: dict[str, str], fp: Fingerprint | None) -> str:
    """The plan as printable lines (fingerprint, then every planned value and its reason)."""
    lines = []
    if fp is not None:
        px = sorted({f"{p:g}" for p in fp.pixel_sizes_um if p})
        lines.append(f"fingerprint: {len(fp.shapes)} stores, {fp.labelled_px / 1e6:.2f} MPix "
                     f"labelled, pixel size {', '.join(px) + ' um' if px else 'unknown'}")
        for c in fp.classes:
            lines.append(f"  {c.name}: {c.share:.2%} of pixels, width {c.width_px:.1f} px, "
                         f"object size {c.size_px:.0f} px")
    budget = (f"{cfg.budget_s:.0f} s" if cfg.budget_s else
              f"{cfg.budget_steps} steps" if cfg.budget_steps else "none")
    lines.append(f"plan (budget {budget}):")
    for k in PLANNED:
        v = getattr(cfg, k)
        if isinstance(v, Augment | ClassWeights):
            v = v.value
        elif isinstance(v, float):
            v = round(v, 3)
        lines.append(f"  {k:<16}{v!s:<10} {why.get(k, '')}")
    return "\n".join(lines)


def fit_schedule(seconds: float, *, step_s: float, val_s: float,
                 steps_per_epoch: int | None = None, max_epochs: int = 40) -> tuple[int, int]:
    """``(epochs, steps_per_epoch)`` whose training and validation fill ``seconds``.

    Validation takes at most about a fifth of the time (at least 25 steps per epoch);
    beyond ``max_epochs`` the epochs get longer instead of more numerous.
    """
    step_s, val_s = max(step_s, 1e-6), max(val_s, 0.0)
    spe = steps_per_epoch or max(25, math.ceil(4.0 * val_s / step_s))
    epochs = int(seconds // (spe * step_s + val_s))
    if epochs < 1:
        return 1, max(1, int((seconds - val_s) // step_s))
    epochs = min(epochs, max_epochs) if steps_per_epoch is None else epochs
    if steps_per_epoch is None:  # stretch the epochs to fill the time
        spe = max(spe, int((seconds / epochs - val_s) // step_s))
    return epochs, spe


def lr_at(schedule: str, lr: float, t: float, *, warmup: float | None = 0.0,
          lr_scale: float = 1.0) -> float:
    """Learning rate at training progress ``t`` in [0, 1).

    A linear warm-up over the first ``warmup`` share of the steps, then cosine or poly
    (power 0.9) decay from ``lr`` to ``lr / 50``; ``plateau`` and ``constant`` give
    ``lr * lr_scale`` (the plateau halvings).

    >>> [round(lr_at("cosine", 1.0, t, warmup=0.1), 3) for t in (0.0, 0.05, 0.1, 0.55, 1.0)]
    [0.01, 0.51, 1.0, 0.51, 0.02]
    """
    if schedule in ("plateau", "constant"):
        return float(lr * lr_scale)
    warm = float(warmup or 0.0)
    if t < warm:
        return float(lr * (t + 1e-3) / warm)
    u = min(1.0, (t - warm) / max(1.0 - warm, 1e-9))
    decay = 0.5 * (1 + math.cos(math.pi * u)) if schedule == "cosine" else (1 - u) ** 0.9
    return float(lr * (0.02 + 0.98 * decay))


def calibrate(step: Callable[[Sequence[torch.Tensor]], torch.Tensor],
              batches: Iterable[Sequence[torch.Tensor]], *, steps: int = 3) -> float:
    """Median seconds per training step (read a batch, then ``step(batch)``), after one
    untimed warm-up step; pass a step on a copy of the model to leave the model unchanged.
    """
    it = iter(batches)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        float(step(batch))  # the value waits for the device
        times.append(time.perf_counter() - t)
    if not times:
        return 1.0
    return float(np.median(times[1:] or times))
