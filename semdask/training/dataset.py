"""Training patches read lazily from OME-Zarr mosaics (torchgeo style: sampler + dataset).

Samplers (:mod:`semdask.training.samplers`, re-exported here) yield window coordinates
``(store, y, x)`` only, inside the training or validation part of a leak-free
split. :class:`PatchDataset` turns a coordinate into ``(image, label)`` tensors
(``(image, label, weight)`` with per-pixel ``weights``). It opens its stores
lazily once per process (DataLoader workers never receive open handles), reads
whole cache tiles (zarr reads cost ~1 ms per call, so windows are sliced from a
bounded per-process LRU of decoded tiles; small stores end up fully in memory)
and normalises with each mosaic's global statistics. Batched augmentation on the
training device lives in :mod:`semdask.training.augment`; :func:`augment` here is the
per-patch numpy variant (flips/rot90 + intensity jitter) kept for ``augment=True``.

Label values ``>= n_classes`` (255 = unlabelled/ignore) become ``-100``, torch's
``ignore_index``.

Examples
--------
>>> s = WindowSampler([(100, 80)], 32, split="val", val_fraction=0.4, seed=0)
>>> list(s)[:3]
[(0, 60, 0), (0, 60, 32), (0, 60, 48)]
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semdask.errors import InputError, StoreError
from semdask.inference.normalise import NormStats, apply, compute_stats
from semdask.training.samplers import ClassMaps, WindowSampler, split_rows

__all__ = ["IGNORE_INDEX", "PatchDataset", "WindowSampler", "augment", "split_rows"]

log = logging.getLogger(__name__)

Coord = tuple[int, int, int]
IGNORE_INDEX = -100


def augment(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator
            ) -> tuple[np.ndarray, np.ndarray]:
    """Random flips/rot90 (image and label alike) and intensity jitter + noise (image only).

    The image is normalised float32 (about 0..1). Jitter: gamma 0.7-1.4 (sign
    preserving), contrast 0.75-1.33, brightness +-0.12, a linear ramp (drift) of up
    to +-0.08 across the window, Gaussian-Poisson noise.
    """
    k = int(rng.integers(4))
    img, lab = np.rot90(img, k), np.rot90(lab, k)
    if rng.random() < 0.5:
        img, lab = img[:, ::-1], lab[:, ::-1]
    img = img.astype(np.float32, copy=True)
    gamma = float(np.exp(rng.uniform(np.log(0.7), np.log(1.4))))
    img = np.sign(img) * np.abs(img) ** np.float32(gamma)
    mean = float(img.mean())
    img = (img - mean) * np.float32(np.exp(rng.uniform(np.log(0.75), np.log(1.33)))) + mean
    img += np.float32(rng.uniform(-0.12, 0.12))
    h, w = img.shape
    gy, gx = rng.uniform(-0.08, 0.08, size=2)
    img += (np.linspace(-0.5, 0.5, h, dtype=np.float32)[:, None] * np.float32(gy)
            + np.linspace(-0.5, 0.5, w, dtype=np.float32)[None, :] * np.float32(gx))
    sigma, shot = rng.uniform(0.0, 0.04), rng.uniform(0.0, 0.004)
    var = np.float32(sigma ** 2) + np.float32(shot) * np.clip(img, 0.0, None)
    img += np.sqrt(var) * rng.standard_normal(img.shape, dtype=np.float32)
    return np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(lab)


def _check_weights(path: Path, name: str, shape: tuple[int, ...]) -> None:
    from semdask.storage.io import open_extra_image

    try:
        got = tuple(open_extra_image(path, name).shape)
    except StoreError as e:
        raise InputError(f"weights {name!r} in {path}", expected="a (y, x) weight image group, "
                         "e.g. <labels>-confidence written by semdask label", got=str(e.got),
                         fix="run semdask label on every training store, or drop --weights"
                         ) from None
    if got != shape:
        raise InputError(f"weights {name!r} in {path}", expected=f"shape {shape}",
                         got=f"shape {got}")


class PatchDataset(torch.utils.data.Dataset[tuple[torch.Tensor, ...]]):
    """``(image (1, w, w) float32, label (w, w) int64[, weight (w, w) float32])`` per window.

    Parameters
    ----------
    paths : sequence of path
        OME-Zarr mosaics with a ``labels/<labels>`` group.
    labels : str or None
        Label group name (``"truth"`` for synthetic mosaics, ``"phases"``); ``None``:
        unlabelled mode, items are ``(image,)`` only (self-supervised pretraining,
        :mod:`semdask.training.pretrain`).
    window : int
        Window edge in pixels.
    stats : sequence of NormStats, optional
        Mosaic-wide normalisation per store; computed here (once, in the calling
        process) from ``low_percentile``/``high_percentile`` when not given.
    augment : bool
        Apply the numpy :func:`augment` per patch (training) or not.
    tile : int
        Edge of the cached read tiles (whole tiles are read and cached).
    cache_mb : float
        Per-process LRU budget for decoded tiles (image, labels and weights).
    weights : str, optional
        Sibling image group with per-pixel training weights, e.g. the
        ``<name>-confidence`` written by ``semdask label``; items gain a third
        float32 tensor (0 where the label is ignored).

    Label values ``>= n_classes`` (e.g. 255 for unlabelled) become ``-100``, the
    cross-entropy ``ignore_index``. Stores whose pixel sizes differ by more than
    10 % are accepted with a warning (``pixel_sizes`` records them all).
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]], *,
                 labels: str | None = "truth",
                 window: int = 256, stats: Sequence[NormStats] | None = None,
                 augment: bool = False, low_percentile: float = 0.5,
                 high_percentile: float = 99.5, tile: int = 1024,
                 cache_mb: float = 512.0, weights: str | None = None) -> None:
        from semdask.storage.io import open_labels, open_mosaic

        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise InputError("stores", expected="at least one OME-Zarr mosaic", got="none")
        self.labels, self.window, self.augment = labels, int(window), bool(augment)
        self.weights = weights
        if labels is None and weights is not None:
            raise InputError("weights", expected="no per-pixel weights without labels",
                             got=repr(weights), fix="drop --weights, or name a label group")
        self.tile = max(int(tile), self.window)
        self.cache_bytes = int(cache_mb * 2**20)
        mosaics = [open_mosaic(p) for p in self.paths]
        labs = [open_labels(p, labels) for p in self.paths] if labels is not None else []
        self.shapes: list[tuple[int, int]] = [(int(m.image.shape[0]), int(m.image.shape[1]))
                                            for m in mosaics]
        for p, m, lab in zip(self.paths, mosaics, labs, strict=False):
            if tuple(lab.data.shape) != tuple(m.image.shape):
                raise InputError(f"{p} labels/{labels}", expected=f"shape {m.image.shape}",
                                 got=f"shape {lab.data.shape}")
            if lab.classes != labs[0].classes:
                raise InputError(f"{p} labels/{labels} classes", expected=str(labs[0].classes),
                                 got=str(lab.classes), fix="train on stores labelled alike")
            if weights is not None:
                _check_weights(p, weights, tuple(m.image.shape))
        self.classes = list(labs[0].classes) if labs else []  # labels=None: images only
        self.colours = [tuple(int(v) for v in c) for c in labs[0].colours] if labs else []
        self.pixel_sizes = [m.pixel_size_um for m in mosaics]
        self.pixel_size_um = mosaics[0].pixel_size_um
        known = [float(p) for p in self.pixel_sizes if p]
        if known and max(known) > 1.1 * min(known):
            log.warning("training stores have different pixel sizes (%s um): the model learns "
                        "a mixture of scales; train at one with semdask train --pixel-size UM",
                        ", ".join(f"{p:g}" for p in known))
        if stats is None:
            stats = [compute_stats(m.image, low_percentile, high_percentile) for m in mosaics]
        if len(stats) != len(self.paths):
            raise InputError("stats", expected=f"one NormStats per store ({len(self.paths)})",
                             got=f"{len(stats)}")
        self.stats = list(stats)
        self._pid = -1
        self._arrays: list[tuple[Any, ...]] = []
        self._cache: OrderedDict[tuple[int, int, int, int], np.ndarray] = OrderedDict()
        self._cached = 0
        self._rng: np.random.Generator | None = None
        self._rng_key: tuple[int, int] = (-1, -1)

    def __getstate__(self) -> dict[str, Any]:  # never pickle open stores or caches
        state = self.__dict__.copy()
        state.update(_pid=-1, _arrays=[], _cache=OrderedDict(), _cached=0, _rng=None,
                     _rng_key=(-1, -1))
        return state

    def _open(self) -> None:
        from semdask.storage.io import open_extra_image, open_labels, open_mosaic

        if self._pid != os.getpid():
            self._arrays = [(open_mosaic(p).image, *([open_labels(p, self.labels).data]
                                                     if self.labels is not None else []),
                             *([open_extra_image(p, self.weights)] if self.weights else []))
                            for p in self.paths]
            self._cache, self._cached, self._pid = OrderedDict(), 0, os.getpid()

    def _tile(self, store: int, kind: int, ty: int, tx: int) -> np.ndarray:
        key = (store, kind, ty, tx)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        arr = self._arrays[store][kind]
        t = self.tile
        block = np.asarray(arr[ty * t:(ty + 1) * t, tx * t:(tx + 1) * t].compute(
            scheduler="synchronous"))
        self._cache[key] = block
        self._cached += block.nbytes
        while self._cached > self.cache_bytes and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached -= old.nbytes
        return block

    def read(self, store: int, y: int, x: int, kind: int = 0) -> np.ndarray:
        """Raw window (``kind`` 0: image, 1: labels, 2: weights) assembled from cached tiles."""
        self._open()
        w, t = self.window, self.tile
        h_img, w_img = self.shapes[store]
        if not (0 <= y <= h_img - w and 0 <= x <= w_img - w):
            raise InputError("window", expected=f"inside the {h_img}x{w_img} mosaic",
                             got=f"origin ({y}, {x}), edge {w}")
        rows = []
        for ty in range(y // t, (y + w - 1) // t + 1):
            parts = []
            for tx in range(x // t, (x + w - 1) // t + 1):
                blk = self._tile(store, kind, ty, tx)
                y0, x0 = max(y - ty * t, 0), max(x - tx * t, 0)
                parts.append(blk[y0:min(y + w - ty * t, t), x0:min(x + w - tx * t, t)])
            rows.append(np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0])
        return np.concatenate(rows, axis=0) if len(rows) > 1 else rows[0]

    def class_maps(self, *, scale: int | None = None, max_pixels: int = 1 << 24) -> ClassMaps:
        """Low-resolution label maps for balanced sampling and class frequencies.

        Reads the coarsest pyramid level not coarser than ``scale`` (default: an
        eighth of the window, at least 1 px) and strides it down to ``scale``;
        ``scale`` grows until every map has at most ``max_pixels`` pixels.
        """
        from semdask.storage.io import open_labels

        if self.labels is None:
            raise InputError("class_maps", expected="a dataset with labels", got="labels=None")
        s = 2 ** max(0, int(math.log2(max(1, scale or self.window // 8))))
        while max(h * w for h, w in self.shapes) > max_pixels * s * s:
            s *= 2
        maps = []
        for p in self.paths:
            lab = open_labels(p, self.labels)
            lvl = max(i for i in range(lab.levels) if 2 ** i <= s)
            step = s // 2 ** lvl
            arr = np.asarray(lab.level(lvl)[::step, ::step].compute(scheduler="synchronous"))
            maps.append(arr.astype(np.uint8, copy=False))
        return ClassMaps(tuple(maps), s, len(self.classes))

    def _generator(self) -> np.random.Generator:
        key = (os.getpid(), torch.initial_seed())
        if self._rng is None or key != self._rng_key:
            self._rng, self._rng_key = np.random.default_rng(key[1] % 2**63), key
        return self._rng

    def __getitem__(self, index: Coord) -> tuple[torch.Tensor, ...]:
        store, y, x = (int(v) for v in index)
        img = apply(self.read(store, y, x, 0), self.stats[store])
        if self.labels is None:  # unlabelled mode (self-supervised pretraining)
            return (torch.from_numpy(np.ascontiguousarray(img)[None]),)
        lab = self.read(store, y, x, 1)
        wgt = self.read(store, y, x, 2) if self.weights else None
        if self.augment:
            rng = self._generator()
            twin = copy.deepcopy(rng)  # replays augment's geometry draws for the weights
            img, lab = augment(img, lab, rng)
            if wgt is not None:
                wgt = np.rot90(wgt, int(twin.integers(4)))
                wgt = wgt[:, ::-1] if twin.random() < 0.5 else wgt
        target = lab.astype(np.int64)
        target[target >= len(self.classes)] = IGNORE_INDEX
        out = [torch.from_numpy(np.ascontiguousarray(img)[None]), torch.from_numpy(target)]
        if self.weights:
            w = np.nan_to_num(np.asarray(wgt, dtype=np.float32), nan=0.0)
            w[target == IGNORE_INDEX] = 0.0
            out.append(torch.from_numpy(np.ascontiguousarray(w)))
        return tuple(out)
