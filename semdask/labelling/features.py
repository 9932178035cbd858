"""Kernels of the EDS-guided labelling (pure numpy/scipy: one block in, one out).

* :func:`features_block` -- Ilastik-style multiscale pixel features of a (c, h, w) block:
  raw intensity, Gaussian, Laplacian of Gaussian, Gaussian gradient magnitude, difference
  of Gaussians, structure-tensor and Hessian eigenvalues. Every filter chain reaches at most
  ``FeatureSpec.depth = ceil(4 * max(sigmas))`` px (explicit ``radius=`` on each Gaussian),
  so a block padded by ``depth`` gives exactly the global result on its core.
* :func:`predict_block` -- class probabilities of a feature block from any classifier.
* :func:`chunk_grid` -- chunk sizes with no sliver smaller than a halo.

EDS registration kernels live in :mod:`semdask.labelling.registration`, annotation parsing and
rasterising in :mod:`semdask.labelling.annotations` (their old names here still resolve, lazily).

Examples
--------
>>> spec = FeatureSpec(sigmas=(1.0, 3.5))
>>> spec.depth, spec.n_per_channel, spec.names(["sem"])[:3]
(14, 17, ['sem:raw', 'sem:gaussian-1', 'sem:log-1'])
>>> features_block(np.zeros((2, 32, 40), np.float32), spec).shape
(34, 32, 40)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from semdask.errors import InputError

__all__ = [
    "DEFAULT_SIGMAS",
    "KINDS",
    "FeatureSpec",
    "chunk_grid",
    "features_block",
    "multiscale_features",
    "predict_block",
]

log = logging.getLogger(__name__)

DEFAULT_SIGMAS: tuple[float, ...] = (0.7, 1.0, 1.6, 3.5, 5.0, 10.0)  # Ilastik's default set
#: feature kinds and the number of maps each gives per channel and sigma
KINDS: dict[str, int] = {"gaussian": 1, "log": 1, "gradient": 1, "dog": 1, "structure": 2,
                         "hessian": 2}


@dataclass(frozen=True)
class FeatureSpec:
    """Which features to compute for every channel: ``kinds`` at each of ``sigmas`` (px).

    ``raw`` adds the unfiltered intensity. DoG is ``G(sigma) - G(0.66 sigma)``; the
    structure tensor uses derivative and integration scales ``sigma / 2`` each (so its
    chain stays within ``4 sigma``); eigenvalues are sorted, largest first.

    >>> FeatureSpec(sigmas=(0.7, 10.0), kinds=("gaussian",)).depth
    40
    """

    sigmas: tuple[float, ...] = DEFAULT_SIGMAS
    kinds: tuple[str, ...] = tuple(KINDS)
    raw: bool = True

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or (not self.kinds and not self.raw):
            raise InputError("feature kinds", expected=f"some of {', '.join(KINDS)}",
                             got=repr(list(self.kinds)), fix="e.g. kinds=('gaussian', 'log')")
        if self.kinds and (not self.sigmas or min(self.sigmas) < 0.3 or max(self.sigmas) > 64):
            raise InputError("sigmas", expected="one or more scales in [0.3, 64] px",
                             got=repr(self.sigmas), fix=f"e.g. sigmas={DEFAULT_SIGMAS}")

    @property
    def depth(self) -> int:
        """Halo (px) a block needs: ``ceil(4 * max(sigmas))`` (0 for raw only)."""
        return _radius(max(self.sigmas)) if self.kinds else 0

    @property
    def n_per_channel(self) -> int:
        """Feature maps per input channel."""
        return int(self.raw) + len(self.sigmas) * sum(KINDS[k] for k in self.kinds)

    def names(self, channels: Sequence[str]) -> list[str]:
        """Feature names ``channel:kind-sigma`` in output order."""
        out = []
        for c in channels:
            out += [f"{c}:raw"] if self.raw else []
            for s in self.sigmas:
                for k in self.kinds:
                    out += ([f"{c}:{k}-{s:g}"] if KINDS[k] == 1 else
                            [f"{c}:{k}{i}-{s:g}" for i in (1, 2)])
        return out


def _radius(sigma: float) -> int:
    return math.ceil(4 * sigma - 1e-9)


def _eig2(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (largest first) of the symmetric 2 x 2 matrices [[a, b], [b, c]]."""
    m, d = (a + c) / 2, np.hypot((a - c) / 2, b)
    return m + d, m - d


def features_block(block: np.ndarray, spec: FeatureSpec) -> np.ndarray:
    """Features of a (c, h, w) or (h, w) block, float32 (c * n_per_channel, h, w).

    Channel-major, in the order of :meth:`FeatureSpec.names`. Borders use reflect mode;
    callers wanting chunk-independent results pad by ``spec.depth`` and crop.
    """
    x = np.asarray(block, np.float32)
    x = x[None] if x.ndim == 2 else x
    if x.ndim != 3:
        raise InputError("feature block", expected="a (c, h, w) or (h, w) array",
                         got=f"shape {x.shape}")
    out = np.empty((x.shape[0] * spec.n_per_channel, *x.shape[1:]), np.float32)
    i = 0
    for ch in x:
        if spec.raw:
            out[i] = ch
            i += 1
        for s in spec.sigmas:
            r = _radius(s)
            g = {"sigma": s, "radius": r, "mode": "reflect"}
            for k in spec.kinds:
                if k == "gaussian":
                    out[i] = ndi.gaussian_filter(ch, **g)
                elif k == "log":
                    out[i] = ndi.gaussian_laplace(ch, **g)
                elif k == "gradient":
                    out[i] = ndi.gaussian_gradient_magnitude(ch, **g)
                elif k == "dog":
                    out[i] = ndi.gaussian_filter(ch, **g)
                    out[i] -= ndi.gaussian_filter(ch, 0.66 * s, radius=r, mode="reflect")
                elif k == "structure":
                    ri = r // 2
                    gy = ndi.gaussian_filter(ch, s / 2, order=(1, 0), radius=ri, mode="reflect")
                    gx = ndi.gaussian_filter(ch, s / 2, order=(0, 1), radius=ri, mode="reflect")
                    so = {"sigma": s / 2, "radius": r - ri, "mode": "reflect"}
                    out[i], out[i + 1] = _eig2(ndi.gaussian_filter(gy * gy, **so),
                                               ndi.gaussian_filter(gy * gx, **so),
                                               ndi.gaussian_filter(gx * gx, **so))
                else:  # hessian
                    out[i], out[i + 1] = _eig2(ndi.gaussian_filter(ch, order=(2, 0), **g),
                                               ndi.gaussian_filter(ch, order=(1, 1), **g),
                                               ndi.gaussian_filter(ch, order=(0, 2), **g))
                i += KINDS[k]
    return out


def multiscale_features(image: np.ndarray, spec: FeatureSpec | None = None) -> np.ndarray:
    """In-memory reference: pad by ``spec.depth`` (symmetric), :func:`features_block`, crop.

    The chunked builder :func:`semdask.labelling.label.feature_stack` reproduces it for any
    chunking.
    """
    spec = spec or FeatureSpec()
    x = np.asarray(image, np.float32)
    x = x[None] if x.ndim == 2 else x
    d = spec.depth
    f = features_block(np.pad(x, ((0, 0), (d, d), (d, d)), mode="symmetric"), spec)
    return f[:, d:f.shape[1] - d, d:f.shape[2] - d]


def chunk_grid(length: int, edge: int, minimum: int) -> tuple[int, ...]:
    """Chunks of ``edge``; a last sliver smaller than ``minimum`` joins its neighbour.

    >>> chunk_grid(1100, 512, 40), chunk_grid(1100, 512, 100)
    ((512, 512, 76), (512, 588))
    """
    n, rem = divmod(length, edge)
    sizes = [edge] * n
    if rem and sizes and rem < minimum:
        sizes[-1] += rem
    elif rem:
        sizes.append(rem)
    return tuple(sizes)



def predict_block(feats: np.ndarray, clf: Any, n_classes: int) -> np.ndarray:
    """Class probabilities (K, h, w) float32 of a feature block (F, h, w); a classifier
    without predict_proba gives one-hot rows. Columns follow ``clf.classes_``."""
    X = feats.reshape(feats.shape[0], -1).T
    out = np.zeros((n_classes, X.shape[0]), np.float32)
    cols = np.asarray(getattr(clf, "classes_", np.arange(n_classes)), np.int64)
    if hasattr(clf, "predict_proba"):
        out[cols] = np.asarray(clf.predict_proba(X), np.float32).T
    else:
        out[np.asarray(clf.predict(X), np.int64), np.arange(X.shape[0])] = 1
    return out.reshape(n_classes, *feats.shape[1:])
