"""Window grid, halo and blend-weight arithmetic (pure numpy, no dask/torch/zarr).

Windows sit on a grid aligned to global mosaic coordinates: window origins are
the multiples of the stride (negative origins included, so the first pixels get
the same coverage as the interior). A chunk evaluates every window that
intersects its core; with chunk edges on multiples of the stride and a halo of
:func:`window_halo` every such window lies inside chunk + halo, so each pixel
receives exactly the windows of a single global sliding window.

Examples
--------
>>> stride_for(256, 0.25)
192
>>> window_halo(256, 192)
192
>>> window_origins(0, 384, window=256, stride=192).tolist()
[-192, 0, 192]
>>> w = blend_weights(8, "uniform")
>>> float(w.min()), float(w.max())
(1.0, 1.0)
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from semdask.errors import InputError

__all__ = [
    "BLEND_MODES",
    "BlendMode",
    "align_up",
    "blend_weights",
    "chunk_edge",
    "coverage",
    "receptive_field_halo",
    "stride_for",
    "window_halo",
    "window_origins",
]

BlendMode = Literal["gaussian", "cosine", "uniform"]
BLEND_MODES: tuple[str, ...] = ("gaussian", "cosine", "uniform")


def align_up(n: int, multiple: int) -> int:
    """Round ``n`` up to a multiple of ``multiple``.

    >>> align_up(1000, 192)
    1152
    """
    return int(math.ceil(n / multiple) * multiple)


def stride_for(window: int, overlap: float) -> int:
    """Stride between windows for a fractional ``overlap`` in [0, 1).

    Raises
    ------
    InputError
        If the window is not positive or the overlap is outside [0, 1).
    """
    if window <= 0:
        raise InputError("window", expected="a positive size in pixels", got=repr(window))
    if not 0.0 <= overlap < 1.0:
        raise InputError(
            "overlap",
            expected="a fraction in [0, 1) of the window shared by neighbouring windows",
            got=repr(overlap),
            fix="use e.g. --overlap 0.25 (stride = 0.75 x window) or 0.5",
        )
    return max(1, round(window * (1.0 - overlap)))


def window_halo(window: int, stride: int) -> int:
    """Halo (``map_overlap`` depth) so that every window touching a stride-aligned core fits.

    The earliest window touching a core starting at ``c0`` (a multiple of the
    stride) starts at ``c0 - stride * (ceil(window / stride) - 1)``; the latest
    ends at ``c1 - stride + window``. Both fit within this halo.

    >>> window_halo(256, 128), window_halo(256, 256), window_halo(256, 100)
    (128, 0, 200)
    """
    return max(stride * (math.ceil(window / stride) - 1), window - stride, 0)


def window_origins(start: int, stop: int, *, window: int, stride: int) -> np.ndarray:
    """Global grid origins (multiples of ``stride``) of windows intersecting ``[start, stop)``.

    >>> window_origins(10, 20, window=8, stride=4).tolist()
    [4, 8, 12, 16]
    """
    first = math.floor((start - window) / stride) + 1
    last = math.ceil(stop / stride) - 1
    return np.arange(first, last + 1, dtype=np.int64) * stride


def blend_weights(
    window: int,
    mode: str = "gaussian",
    *,
    sigma_scale: float = 0.125,
    min_weight: float = 1e-3,
) -> np.ndarray:
    """Per-pixel weight of a window's prediction, shape ``(window, window)``, float32.

    Parameters
    ----------
    window : int
        Window edge in pixels.
    mode : {"gaussian", "cosine", "uniform"}
        ``gaussian`` (MONAI/nnU-Net style, ``sigma = sigma_scale * window``),
        ``cosine`` (a raised-cosine / Hann taper), ``uniform`` (plain averaging, as
        in the paper's sliding window).
    sigma_scale : float
        Gaussian sigma as a fraction of the window.
    min_weight : float
        Weights are clamped to at least this (relative to a peak of 1) so that every
        covered pixel has a strictly positive total weight.

    Examples
    --------
    >>> w = blend_weights(64, "gaussian")
    >>> w.shape, w.dtype, float(w.max()) == 1.0, bool((w > 0).all())
    ((64, 64), dtype('float32'), True, True)
    """
    if mode not in BLEND_MODES:
        raise InputError(
            "blend", expected=f"one of {', '.join(BLEND_MODES)}", got=repr(mode),
            fix="use --blend gaussian (default), cosine or uniform",
        )
    if window <= 0:
        raise InputError("window", expected="a positive size in pixels", got=repr(window))
    centre = (window - 1) / 2.0
    x = np.arange(window, dtype=np.float64) - centre
    if mode == "uniform":
        prof = np.ones(window)
    elif mode == "gaussian":
        sigma = max(sigma_scale * window, 1e-6)
        prof = np.exp(-0.5 * (x / sigma) ** 2)
    else:  # cosine (Hann without zero ends)
        prof = 0.5 * (1.0 + np.cos(np.pi * x / (window / 2.0)))
    w2 = np.outer(prof, prof)
    w2 /= w2.max()
    return np.clip(w2, min_weight, None).astype(np.float32)


def coverage(length: int, *, window: int, stride: int, mode: str = "uniform") -> np.ndarray:
    """Summed 1-D blend weight received by each of ``length`` pixels (for tests and docs).

    >>> bool((coverage(50, window=16, stride=8) == 2).all())
    True
    """
    prof = blend_weights(window, mode)[window // 2].astype(np.float64)
    prof = prof / prof.max() if mode != "uniform" else np.ones(window)
    out = np.zeros(length, dtype=np.float64)
    for o in window_origins(0, length, window=window, stride=stride):
        a, b = max(o, 0), min(o + window, length)
        out[a:b] += prof[a - o : b - o]
    return out


def receptive_field_halo(receptive_field: int, multiple: int = 16) -> int:
    """Halo for whole-chunk mode: the receptive-field radius rounded up to ``multiple``.

    >>> receptive_field_halo(188)
    96
    """
    return align_up(math.ceil(receptive_field / 2), multiple)


def chunk_edge(requested: int, *, multiple: int, minimum: int = 0) -> int:
    """Core chunk edge: ``requested`` rounded up to ``multiple`` and at least ``minimum``.

    >>> chunk_edge(1000, multiple=192, minimum=192)
    1152
    """
    if requested <= 0:
        raise InputError("chunks", expected="a positive chunk edge in pixels", got=repr(requested))
    return align_up(max(requested, minimum, 1), multiple)
