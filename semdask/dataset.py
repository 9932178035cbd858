"""Training patches read lazily from OME-Zarr mosaics (torchgeo style: sampler + dataset).

:class:`WindowSampler` yields window coordinates ``(store, y, x)`` only, inside
allowed regions: the training split excludes a held-out band of rows at the
bottom of every mosaic (``val_fraction``), the validation split uses only that
band, so training and validation windows never share a pixel.

:class:`PatchDataset` turns a coordinate into ``(image, label)`` tensors. It opens
its stores lazily once per process (DataLoader workers never receive open
handles), reads whole cache tiles (zarr reads cost ~1 ms per call, so windows are
sliced from a bounded per-process LRU of decoded tiles; small stores end up fully
in memory), normalises with each mosaic's global statistics and augments.

Examples
--------
>>> s = WindowSampler([(100, 80)], 32, split="val", val_fraction=0.4, seed=0)
>>> list(s)[:3]
[(0, 60, 0), (0, 60, 32), (0, 60, 48)]
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .errors import InputError
from .normalise import NormStats, apply, compute_stats

__all__ = ["PatchDataset", "WindowSampler", "augment", "split_rows"]

Coord = tuple[int, int, int]


def split_rows(height: int, val_fraction: float, split: str) -> tuple[int, int]:
    """Rows ``[r0, r1)`` of a mosaic allowed for ``split`` (validation = bottom band)."""
    if not 0.0 <= val_fraction < 1.0:
        raise InputError("val_fraction", expected="a fraction in [0, 1)", got=str(val_fraction))
    cut = round(height * (1.0 - val_fraction))
    if split == "train":
        return 0, cut
    if split == "val":
        return cut, height
    raise InputError("split", expected="'train' or 'val'", got=repr(split))


class WindowSampler(torch.utils.data.Sampler[Coord]):
    """Seeded window coordinates ``(store index, y, x)`` inside one split.

    Parameters
    ----------
    shapes : sequence of (int, int)
        Level-0 ``(height, width)`` of every store.
    window : int
        Window edge in pixels.
    split : {"train", "val"}
        Training rows (top) or the held-out validation band (bottom ``val_fraction``).
    val_fraction : float
        Height fraction of the validation band of every store.
    length : int, optional
        Windows per pass in ``"random"`` mode (default: enough to cover the area once).
    mode : {"random", "grid"}, optional
        Random windows (stores weighted by area) or a deterministic grid covering the
        region (windows at stride ``window``, the last one flush with the edge).
        Default: random for train, grid for val.
    seed : int
        Seed; pass ``epoch`` with :meth:`set_epoch` for a new reproducible pass.
    """

    def __init__(self, shapes: Sequence[tuple[int, int]], window: int, *,
                 split: Literal["train", "val"] = "train", val_fraction: float = 0.2,
                 length: int | None = None, mode: Literal["random", "grid"] | None = None,
                 seed: int = 0) -> None:
        self.window, self.split, self.seed, self.epoch = int(window), split, int(seed), 0
        self.mode = mode or ("random" if split == "train" else "grid")
        self.regions: list[tuple[int, int, int, int]] = []  # store, r0, r1, width
        for i, (h, w) in enumerate(shapes):
            r0, r1 = split_rows(int(h), val_fraction, split)
            if r1 - r0 >= self.window and w >= self.window:
                self.regions.append((i, r0, r1, int(w)))
        if not self.regions:
            raise InputError(f"{split} region", expected=f"at least one store whose {split} "
                             f"rows fit a {window}-px window", got=f"shapes {list(shapes)}, "
                             f"val_fraction={val_fraction}",
                             fix="use a smaller window or val_fraction, or larger mosaics")
        area = np.array([(r1 - r0 - self.window + 1) * (w - self.window + 1)
                         for _, r0, r1, w in self.regions], dtype=np.float64)
        self._p = area / area.sum()
        full = sum((r1 - r0) * w for _, r0, r1, w in self.regions) // self.window ** 2
        self.length = int(length) if length is not None else max(1, int(full))

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass the (reproducible) pass number ``epoch``."""
        self.epoch = int(epoch)

    def _grid(self) -> Iterator[Coord]:
        w = self.window
        for i, r0, r1, width in self.regions:
            ys = [*range(r0, r1 - w + 1, w)]
            xs = [*range(0, width - w + 1, w)]
            ys += [r1 - w] if ys[-1] != r1 - w else []
            xs += [width - w] if xs[-1] != width - w else []
            for y in ys:
                for x in xs:
                    yield i, y, x

    def __iter__(self) -> Iterator[Coord]:
        if self.mode == "grid":
            yield from self._grid()
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        picks = rng.choice(len(self.regions), size=self.length, p=self._p)
        w = self.window
        for k in picks:
            i, r0, r1, width = self.regions[int(k)]
            yield i, int(rng.integers(r0, r1 - w + 1)), int(rng.integers(0, width - w + 1))

    def __len__(self) -> int:
        return sum(1 for _ in self._grid()) if self.mode == "grid" else self.length


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


class PatchDataset(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """``(image (1, w, w) float32, label (w, w) int64)`` for a coordinate ``(store, y, x)``.

    Parameters
    ----------
    paths : sequence of path
        OME-Zarr mosaics with a ``labels/<labels>`` group.
    labels : str
        Label group name (``"truth"`` for synthetic mosaics, ``"phases"``).
    window : int
        Window edge in pixels.
    stats : sequence of NormStats, optional
        Mosaic-wide normalisation per store; computed here (once, in the calling
        process) from ``low_percentile``/``high_percentile`` when not given.
    augment : bool
        Apply :func:`augment` (training) or not (validation).
    tile : int
        Edge of the cached read tiles (whole tiles are read and cached).
    cache_mb : float
        Per-process LRU budget for decoded tiles (image + labels).

    Label values ``>= n_classes`` (e.g. 255 for unlabelled) become ``-100``, the
    cross-entropy ``ignore_index``.
    """

    def __init__(self, paths: Sequence[str | os.PathLike[str]], *, labels: str = "truth",
                 window: int = 256, stats: Sequence[NormStats] | None = None,
                 augment: bool = False, low_percentile: float = 0.5,
                 high_percentile: float = 99.5, tile: int = 1024,
                 cache_mb: float = 512.0) -> None:
        from .io import open_labels, open_mosaic

        self.paths = [Path(p) for p in paths]
        self.labels, self.window, self.augment = labels, int(window), bool(augment)
        self.tile = max(int(tile), self.window)
        self.cache_bytes = int(cache_mb * 2**20)
        mosaics = [open_mosaic(p) for p in self.paths]
        labs = [open_labels(p, labels) for p in self.paths]
        self.shapes: list[tuple[int, int]] = [(int(m.image.shape[0]), int(m.image.shape[1]))
                                            for m in mosaics]
        for p, m, lab in zip(self.paths, mosaics, labs, strict=True):
            if tuple(lab.data.shape) != tuple(m.image.shape):
                raise InputError(f"{p} labels/{labels}", expected=f"shape {m.image.shape}",
                                 got=f"shape {lab.data.shape}")
        self.classes = list(labs[0].classes)
        self.colours = [tuple(int(v) for v in c) for c in labs[0].colours]
        self.pixel_size_um = mosaics[0].pixel_size_um
        if stats is None:
            stats = [compute_stats(m.image, low_percentile, high_percentile) for m in mosaics]
        if len(stats) != len(self.paths):
            raise InputError("stats", expected=f"one NormStats per store ({len(self.paths)})",
                             got=f"{len(stats)}")
        self.stats = list(stats)
        self._pid = -1
        self._arrays: list[tuple[Any, Any]] = []
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
        from .io import open_labels, open_mosaic

        if self._pid != os.getpid():
            self._arrays = [(open_mosaic(p).image, open_labels(p, self.labels).data)
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
        """Raw window (``kind`` 0: image, 1: labels) assembled from cached tiles."""
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

    def _generator(self) -> np.random.Generator:
        key = (os.getpid(), torch.initial_seed())
        if self._rng is None or key != self._rng_key:
            self._rng, self._rng_key = np.random.default_rng(key[1] % 2**63), key
        return self._rng

    def __getitem__(self, index: Coord) -> tuple[torch.Tensor, torch.Tensor]:
        store, y, x = (int(v) for v in index)
        img = apply(self.read(store, y, x, 0), self.stats[store])
        lab = self.read(store, y, x, 1)
        if self.augment:
            img, lab = augment(img, lab, self._generator())
        target = lab.astype(np.int64)
        target[target >= len(self.classes)] = -100
        return torch.from_numpy(np.ascontiguousarray(img)[None]), torch.from_numpy(target)
