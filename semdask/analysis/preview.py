"""Overlay previews of image and labels (pure kernel + a thin reader/writer).

Examples
--------
>>> import numpy as np
>>> img = np.full((2, 2), 100, np.uint8); lab = np.array([[0, 1], [1, 255]], np.uint8)
>>> rgb = overlay(img, lab, [(0, 0, 0, 255), (255, 0, 0, 255)], alpha=1.0)
>>> rgb[0, 1].tolist(), rgb[1, 1].tolist()
([255, 0, 0], [100, 100, 100])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from semdask.errors import InputError

__all__ = ["overlay", "preview"]

log = logging.getLogger(__name__)


def _to_grey8(image: np.ndarray) -> np.ndarray:
    x = image.astype(np.float64)
    lo, hi = np.percentile(x, [0.5, 99.5]) if x.size else (0.0, 1.0)
    if image.dtype == np.uint8:
        return image
    return np.clip((x - lo) / max(hi - lo, 1e-12) * 255.0, 0, 255).astype(np.uint8)


def overlay(
    image: np.ndarray,
    labels: np.ndarray,
    colours: Sequence[Sequence[int]],
    *,
    alpha: float = 0.45,
) -> np.ndarray:
    """Blend class colours over a grey image: RGB uint8 ``(y, x, 3)``.

    Labels outside the colour table (e.g. 255, unlabelled) show the image only.
    """
    if image.shape != labels.shape:
        raise InputError("labels", expected=f"the image's shape {image.shape}",
                         got=str(labels.shape), fix="use the same pyramid level for both")
    grey = _to_grey8(image).astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    table = np.zeros((256, 3), np.float32)
    valid = np.zeros(256, bool)
    for i, c in enumerate(colours):
        table[i] = c[:3]
        valid[i] = True
    m = valid[labels]
    rgb[m] = (1 - alpha) * rgb[m] + alpha * table[labels[m]]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def preview(
    mosaic: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    labels: str = "phases",
    level: int | None = None,
    alpha: float = 0.45,
    max_side: int = 2048,
) -> Path:
    """Write a PNG with the image, the labels overlay and a legend at one pyramid level.

    ``level=None`` picks the finest level whose longer side is at most ``max_side``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from semdask.storage import io as sio

    m = sio.open_mosaic(Path(mosaic))
    lab = sio.open_labels(m.path, labels)
    if level is None:
        level = 0
        while level + 1 < min(m.levels, lab.levels) and max(m.level(level).shape) > max_side:
            level += 1
    if level >= min(m.levels, lab.levels) or level < 0:
        top = min(m.levels, lab.levels) - 1
        raise InputError("level", expected=f"a pyramid level 0..{top}", got=str(level),
                         fix=f"use --level {top}, or leave it out (finest level <= --max-side)")
    img = np.asarray(m.level(level).compute())
    lb = np.asarray(lab.level(level).compute())
    rgb = overlay(img, lb, lab.colours, alpha=alpha)
    h, w = img.shape
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.4 * h / max(w, 1) + 0.6), dpi=150)
    axes[0].imshow(_to_grey8(img), cmap="gray", interpolation="nearest")
    axes[0].set_title(f"{m.path.name} (level {level})")
    axes[1].imshow(rgb, interpolation="nearest")
    axes[1].set_title(f"labels/{labels}")
    for ax in axes:
        ax.set_axis_off()
    handles: list[Any] = [Patch(color=(c[0] / 255.0, c[1] / 255.0, c[2] / 255.0), label=n)
               for n, c in zip(lab.classes, lab.colours, strict=False)]
    fig.legend(handles=handles, loc="lower center", ncol=max(len(handles), 1), frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    log.info("wrote preview %s (level %d, %d x %d px)", out, level, h, w)
    return out
