"""PNG plots of an :class:`~semdask.analysis.evaluate.Evaluation` (matplotlib, Agg backend).

Four figures: the normalised confusion matrix (rows = truth) with numbers, per-class IoU and
Dice bars, the error overlay (grey image, wrongly classified pixels in red) and class
frequency against IoU (log x).

Examples
--------
>>> import tempfile, numpy as np
>>> from semdask.analysis.evaluate import evaluate
>>> t = np.kron(np.array([[0, 1], [2, 0]], np.uint8), np.ones((8, 8), np.uint8))
>>> ev = evaluate(t, t, classes=["a", "b", "c"])
>>> [p.name for p in plot_evaluation(ev, tempfile.mkdtemp())]
['confusion.png', 'iou.png', 'errors.png', 'frequency_iou.png']
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from semdask.analysis.evaluate import Evaluation

__all__ = ["error_rgb", "plot_evaluation"]

log = logging.getLogger(__name__)
ERROR_RGB = (228, 26, 28)


def error_rgb(background: np.ndarray, error: np.ndarray, *,
              colour: tuple[int, int, int] = ERROR_RGB) -> np.ndarray:
    """Grey background (8-bit, else stretched), errors blended in ``colour``: RGB uint8.

    ``error`` is the share of wrong pixels per output pixel (0..1); its square root is the
    blend weight, so that sparse errors at coarse levels stay visible.

    >>> error_rgb(np.full((1, 2), 100.0), np.array([[0.0, 1.0]])).tolist()
    [[[100, 100, 100], [228, 26, 28]]]
    """
    grey = np.asarray(background, np.float64)
    if grey.size and (grey.min() < 0 or grey.max() > 255):  # not 8-bit: stretch
        lo, hi = np.percentile(grey, [0.5, 99.5])
        grey = np.clip((grey - lo) / max(hi - lo, 1e-12) * 255.0, 0, 255)
    a = np.sqrt(np.clip(np.asarray(error, np.float64), 0, 1))[..., None]  # sparse errors show
    rgb = (1 - a) * grey[..., None] + a * np.asarray(colour, np.float64)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _colour(c: tuple[int, ...]) -> tuple[float, float, float]:
    return (c[0] / 255.0, c[1] / 255.0, c[2] / 255.0)


def _confusion(ev: Evaluation, plt: Any) -> Any:
    cm = ev.pooled.normalised_confusion()
    n = len(ev.classes)
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * n, 1.8 + 0.8 * n), dpi=120)
    im = ax.imshow(np.nan_to_num(cm), cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            v = cm[i, j]
            ax.text(j, i, "-" if np.isnan(v) else f"{100 * v:.1f}", ha="center", va="center",
                    color="white" if v > 0.5 else "black", fontsize=9)
    ax.set_xticks(range(n), ev.classes, rotation=30, ha="right")
    ax.set_yticks(range(n), ev.classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("truth")
    ax.set_title(f"confusion (% of truth row), accuracy {100 * ev.pooled.accuracy:.2f} %")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return fig


def _bars(ev: Evaluation, plt: Any) -> Any:
    pc = ev.pooled.per_class()
    n = len(ev.classes)
    x = np.arange(n)
    fig, ax = plt.subplots(figsize=(2.5 + 1.1 * n, 4), dpi=120)
    cols = [_colour(c) for c in ev.colours]
    ax.bar(x - 0.2, np.nan_to_num(pc["iou"]), 0.4, color=cols, edgecolor="black", label="IoU")
    ax.bar(x + 0.2, np.nan_to_num(pc["dice"]), 0.4, color=cols, edgecolor="black",
           hatch="//", alpha=0.6, label="Dice")
    for i in range(n):
        for dx, k in ((-0.2, "iou"), (0.2, "dice")):
            if np.isfinite(pc[k][i]):
                ax.text(i + dx, pc[k][i] + 0.01, f"{pc[k][i]:.3f}", ha="center", fontsize=8)
    ax.set_xticks(x, ev.classes, rotation=30, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("score")
    ax.set_title(f"mIoU {ev.pooled.miou:.4f}, mean Dice {ev.pooled.mean_dice:.4f}")
    ax.legend(loc="lower right")
    return fig


def _errors(ev: Evaluation, plt: Any) -> Any:
    ovs = ev.overlays
    if not ovs:
        fig, ax = plt.subplots(figsize=(4, 2), dpi=120)
        ax.text(0.5, 0.5, "no overlay computed", ha="center", va="center")
        ax.set_axis_off()
        return fig
    k = len(ovs)
    h, w = ovs[0].error.shape
    fig, axes = plt.subplots(1, k, figsize=(5.5 * k, 5.5 * h / max(w, 1) + 0.8), dpi=150,
                             squeeze=False)
    for ax, o in zip(axes[0], ovs, strict=True):
        ax.imshow(error_rgb(o.background, o.error), interpolation="nearest")
        bg = "" if o.background_is_image else ", truth as background"
        share = 100 * float(o.error.mean()) if o.error.size else 0.0
        ax.set_title(f"{o.name} (level {o.level}{bg})\nwrong: {share:.2f} % (red, sqrt of the "
                     "share per pixel)", fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def _scatter(ev: Evaluation, plt: Any) -> Any:
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    pc = ev.pooled.per_class()
    f, iou = pc["truth_frequency"], pc["iou"]
    ok = (f > 0) & np.isfinite(iou)
    fig, ax = plt.subplots(figsize=(5.5, 4), dpi=120)
    for i in np.flatnonzero(ok):
        ax.scatter(f[i], iou[i], s=60, color=_colour(ev.colours[i]), edgecolor="black")
        ax.annotate(ev.classes[i], (f[i], iou[i]), textcoords="offset points", xytext=(6, 4),
                    fontsize=9)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:g} %"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if ok.any():
        ax.set_xlim(f[ok].min() / 2, min(1.0, f[ok].max() * 2))
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("class frequency in the truth (share of labelled pixels)")
    ax.set_ylabel("IoU")
    ax.set_title("class frequency vs IoU")
    ax.grid(alpha=0.3, which="both")
    return fig


def plot_evaluation(ev: Evaluation, out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write confusion.png, iou.png, errors.png and frequency_iou.png into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, draw in (("confusion", _confusion), ("iou", _bars), ("errors", _errors),
                       ("frequency_iou", _scatter)):
        fig = draw(ev, plt)
        if name != "errors":
            fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        files.append(path)
    log.info("evaluate: wrote %d plots to %s", len(files), out)
    return files
