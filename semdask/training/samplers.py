"""Leak-free train/validation splits and seeded window samplers (coordinates only).

A :class:`SplitPlan` holds, for every store, the rectangles held out for
validation. Validation windows lie inside one of them; training windows keep a
guard gap (default: one window) away from every one of them, so no training
patch touches or neighbours a validation pixel:

- ``"bands"``: a horizontal band of rows of every mosaic (fold 0: the bottom
  ``val_fraction`` of the rows, as before; fold ``f`` the ``f``-th band above it).
- ``"stores"``: whole stores held out (``val_stores``, or every k-th store,
  ``k = round(1 / val_fraction)``, starting at the fold).
- ``"blocks"``: square blocks of a grid over every mosaic; a seeded shuffle deals
  them to ``k`` folds, fold ``f`` is validation (a different held-out set per
  ensemble member).

:class:`WindowSampler` yields ``(store, y, x)`` only. In random mode it draws
uniformly over the allowed origins (rejection) or, with ``balance > 0``, a share
of the windows is centred on a pixel of a class drawn uniformly from the classes
present (from a low-resolution label map, :class:`ClassMaps`), which
oversamples rare phases.

Examples
--------
>>> plan = make_split([(400, 300)], 32, split="blocks", val_fraction=0.25, block=100)
>>> len(plan.val[0]), plan.guard
(3, 32)
>>> s = WindowSampler([(100, 80)], 32, split="val", val_fraction=0.4, seed=0)
>>> list(s)[:3]
[(0, 60, 0), (0, 60, 32), (0, 60, 48)]
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from semdask.errors import InputError

__all__ = ["SPLITS", "ClassMaps", "SplitPlan", "WindowSampler", "make_split", "split_rows"]

log = logging.getLogger(__name__)

Coord = tuple[int, int, int]
Rect = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)
SPLITS = ("bands", "stores", "blocks")


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


@dataclass(frozen=True)
class SplitPlan:
    """Validation rectangles per store; training is the rest minus a ``guard`` ring."""

    shapes: tuple[tuple[int, int], ...]
    val: tuple[tuple[Rect, ...], ...]
    guard: int
    kind: str = "bands"
    fold: int = 0

    def allowed(self, store: int, ys: np.ndarray, xs: np.ndarray, window: int,
                part: str) -> np.ndarray:
        """Which window origins ``(ys, xs)`` of edge ``window`` belong to ``part``."""
        h, w = self.shapes[store]
        ys, xs = np.asarray(ys)[:, None], np.asarray(xs)[:, None]
        ok = ((ys >= 0) & (xs >= 0) & (ys + window <= h) & (xs + window <= w))[:, 0]
        rects = np.asarray(self.val[store], dtype=np.int64).reshape(-1, 4)
        y0, y1, x0, x1 = (rects[:, i][None, :] for i in range(4))
        if part == "val":
            inside = (ys >= y0) & (ys + window <= y1) & (xs >= x0) & (xs + window <= x1)
            return ok & inside.any(axis=1)
        g = self.guard
        near = (ys < y1 + g) & (ys + window > y0 - g) & (xs < x1 + g) & (xs + window > x0 - g)
        return ok & ~near.any(axis=1)

    def train_mask(self, store: int, shape: tuple[int, int], scale: int) -> np.ndarray:
        """Low-resolution pixels (``scale`` px each) a training window may contain."""
        keep = np.ones(shape, dtype=bool)
        g = self.guard
        for y0, y1, x0, x1 in self.val[store]:
            keep[max(0, (y0 - g) // scale):-(-(y1 + g) // scale),
                 max(0, (x0 - g) // scale):-(-(x1 + g) // scale)] = False
        return keep


def make_split(shapes: Sequence[tuple[int, int]], window: int, *,
               split: str = "bands", val_fraction: float = 0.2, fold: int = 0,
               val_stores: Sequence[int] | None = None, block: int | None = None,
               guard: int | None = None, seed: int = 0) -> SplitPlan:
    """A leak-free split of ``shapes`` (see the module docstring).

    Parameters
    ----------
    shapes : sequence of (int, int)
        Level-0 ``(height, width)`` per store.
    window : int
        Training window edge (the default guard and the minimum block edge).
    split : {"bands", "stores", "blocks"}
        How to hold out validation pixels.
    val_fraction : float
        Share held out (band height, 1/k of the stores or blocks).
    fold : int
        Which band / store group / block fold is validation (ensemble members differ).
    val_stores : sequence of int, optional
        Explicit held-out store indices (``"stores"`` only).
    block : int, optional
        Block edge for ``"blocks"`` (default ``max(4 * window, 128)``, halved down to
        ``2 window`` until there are at least ``2 k`` blocks).
    guard : int, optional
        Gap in px between training windows and validation pixels (default: one
        ``window`` for bands and blocks, 0 for stores).
    seed : int
        Seed of the block shuffle.
    """
    shapes = tuple((int(h), int(w)) for h, w in shapes)
    if not 0.0 < val_fraction < 1.0:
        raise InputError("val_fraction", expected="a fraction in (0, 1)", got=str(val_fraction))
    k = max(2, round(1.0 / val_fraction))
    val: list[list[Rect]] = [[] for _ in shapes]
    if split == "bands":
        for i, (h, w) in enumerate(shapes):
            cut = split_rows(h, val_fraction, "train")[1]
            bh, nb = h - cut, max(1, h // max(h - cut, 1))
            r1 = h - (fold % nb) * bh
            val[i].append((r1 - bh, r1, 0, w))
    elif split == "stores":
        held = sorted({int(s) for s in val_stores}) if val_stores else [
            i for i in range(len(shapes)) if i % k == fold % k]
        if not held or len(held) >= len(shapes) or min(held) < 0 or max(held) >= len(shapes):
            raise InputError("split 'stores'", expected="at least one held-out and one training "
                             "store", got=f"{len(shapes)} stores, held out {held}",
                             fix="pass more stores, or --val-store for one of them")
        for i in held:
            val[i].append((0, shapes[i][0], 0, shapes[i][1]))
    elif split == "blocks":
        b = int(block) if block else max(4 * window, 128)
        while not block and b >= 4 * window and sum(-(-h // b) * -(-w // b)
                                                     for h, w in shapes) < 2 * k:
            b //= 2  # default edge: enough blocks for every fold, at least 2 windows
        if b < window:
            raise InputError("block", expected=f"at least the window ({window} px)", got=str(b))
        cells = [(i, y, x) for i, (h, w) in enumerate(shapes)
                 for y in range(0, h, b) for x in range(0, w, b)]
        order = np.random.default_rng([seed, 7919]).permutation(len(cells))
        for rank, c in enumerate(order):
            if rank % k == fold % k:
                i, y, x = cells[int(c)]
                val[i].append((y, min(y + b, shapes[i][0]), x, min(x + b, shapes[i][1])))
    else:
        raise InputError("split", expected=" or ".join(SPLITS), got=repr(split))
    g = int(guard) if guard is not None else (0 if split == "stores" else int(window))
    return SplitPlan(shapes, tuple(tuple(v) for v in val), g, split, int(fold))


@dataclass(frozen=True)
class ClassMaps:
    """Low-resolution label maps (``scale`` px per pixel), values >= n_classes ignored."""

    maps: tuple[np.ndarray, ...]
    scale: int
    n_classes: int

    def counts(self, plan: SplitPlan | None = None) -> np.ndarray:
        """Pooled pixels per class over the training area (all pixels without a plan)."""
        total = np.zeros(self.n_classes, dtype=np.int64)
        for i, m in enumerate(self.maps):
            v = m if plan is None else m[plan.train_mask(i, m.shape, self.scale)]
            v = v[v < self.n_classes]
            total += np.bincount(v.ravel().astype(np.intp), minlength=self.n_classes)
        return total

    def index(self, plan: SplitPlan | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per class: (store ids, flat low-res indices) of its training pixels."""
        out = []
        for c in range(self.n_classes):
            st, ix = [], []
            for i, m in enumerate(self.maps):
                hit = m == c
                if plan is not None:
                    hit &= plan.train_mask(i, m.shape, self.scale)
                flat = np.flatnonzero(hit)
                st.append(np.full(flat.size, i, dtype=np.int32))
                ix.append(flat)
            out.append((np.concatenate(st), np.concatenate(ix)))
        return out


class WindowSampler(torch.utils.data.Sampler[Coord]):
    """Seeded window coordinates ``(store index, y, x)`` inside one part of a split.

    Parameters
    ----------
    shapes : sequence of (int, int)
        Level-0 ``(height, width)`` of every store.
    window : int
        Window edge in pixels.
    split : {"train", "val"}
        Which part of the split to sample.
    val_fraction : float
        Used only without ``plan``: the bottom band of every store is validation
        (no guard, as in earlier versions).
    length : int, optional
        Windows per pass in ``"random"`` mode (default: cover the area once).
    mode : {"random", "grid"}, optional
        Random windows or a deterministic grid covering every validation rectangle
        (stride ``window``, the last window flush with the edge). Default: random
        for train, grid for val.
    seed : int
        Seed; pass ``epoch`` with :meth:`set_epoch` for a new reproducible pass.
    plan : SplitPlan, optional
        The split (see :func:`make_split`).
    class_maps : ClassMaps, optional
        Low-resolution labels for class-balanced sampling.
    balance : float
        Share of random windows centred on a pixel of a uniformly drawn class
        (0: uniform sampling; needs ``class_maps``).
    """

    def __init__(self, shapes: Sequence[tuple[int, int]], window: int, *,
                 split: Literal["train", "val"] = "train", val_fraction: float = 0.2,
                 length: int | None = None, mode: Literal["random", "grid"] | None = None,
                 seed: int = 0, plan: SplitPlan | None = None,
                 class_maps: ClassMaps | None = None, balance: float = 0.0) -> None:
        self.window, self.split, self.seed, self.epoch = int(window), split, int(seed), 0
        self.mode = mode or ("random" if split == "train" else "grid")
        if split not in ("train", "val"):
            raise InputError("split", expected="'train' or 'val'", got=repr(split))
        if plan is None:
            plan = SplitPlan(tuple((int(h), int(w)) for h, w in shapes), tuple(
                ((split_rows(int(h), val_fraction, "val")[0], int(h), 0, int(w)),)
                for h, w in shapes), 0)
        if not 0.0 <= balance <= 1.0:
            raise InputError("balance", expected="a share in [0, 1]", got=str(balance))
        self.plan, self.balance = plan, float(balance) if class_maps is not None else 0.0
        grid = self.split == "val" or self.mode == "grid"
        self._cells = [(i, int(y), int(x)) for i, ys, xs in self._origins(self.window)
                       for y, x in zip(ys, xs, strict=True)] if grid else []
        fine = [(i, ys.size) for i, ys, _ in self._origins(
            self.window if self.split == "val" else max(1, self.window // 4))]
        if not fine:
            raise InputError(f"{split} region", expected=f"at least one store whose {split} "
                             f"part fits a {window}-px window", got=f"shapes {list(shapes)}, "
                             f"{plan.kind} split (guard {plan.guard} px)",
                             fix="use a smaller window, guard or val_fraction, or larger "
                             "mosaics (or --split bands)")
        stores = sorted({i for i, _ in fine})
        area = np.array([(plan.shapes[i][0] - window + 1) * (plan.shapes[i][1] - window + 1)
                         for i in stores], dtype=np.float64)
        self._stores, self._p = stores, area / area.sum()
        n_fine = sum(n for _, n in fine) // (1 if self.split == "val" else 16)
        self.length = int(length) if length is not None else max(1, n_fine)
        self._classes: list[tuple[np.ndarray, np.ndarray]] = []
        self._scale, self._mapw = 1, [1] * len(plan.shapes)
        if class_maps is not None and self.balance > 0:
            self._classes = [c for c in class_maps.index(plan) if c[1].size]
            self._scale = class_maps.scale
            self._mapw = [m.shape[1] for m in class_maps.maps]

    def set_epoch(self, epoch: int) -> None:
        """Make the next pass the (reproducible) pass number ``epoch``."""
        self.epoch = int(epoch)

    def _origins(self, stride: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Allowed window origins on a grid of ``stride`` (plus flush last rows/columns)."""
        w, plan = self.window, self.plan
        for i, (h, wd) in enumerate(plan.shapes):
            rects = plan.val[i] if self.split == "val" else ((0, h, 0, wd),)
            for y0, y1, x0, x1 in rects:
                if y1 - y0 < w or x1 - x0 < w:
                    continue
                ys = [*range(y0, y1 - w + 1, stride)]
                xs = np.array([*range(x0, x1 - w + 1, stride)])
                ys += [y1 - w] if ys[-1] != y1 - w else []
                xs = np.append(xs, x1 - w) if xs[-1] != x1 - w else xs
                rows = max(1, (1 << 14) // xs.size)
                for k in range(0, len(ys), rows):  # bounded memory on huge mosaics
                    yy, xx = (a.ravel() for a in np.meshgrid(ys[k:k + rows], xs,
                                                             indexing="ij"))
                    ok = plan.allowed(i, yy, xx, w, self.split)
                    if ok.any():
                        yield i, yy[ok], xx[ok]

    def _uniform(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
        st = np.asarray(self._stores)[rng.choice(len(self._stores), size=n, p=self._p)]
        hw = np.asarray(self.plan.shapes)[st] - self.window + 1
        return st, rng.integers(0, hw[:, 0]), rng.integers(0, hw[:, 1])

    def _balanced(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
        cls = rng.integers(0, len(self._classes), size=n)
        st, ys, xs = (np.zeros(n, dtype=np.int64) for _ in range(3))
        w, s = self.window, self._scale
        for c in np.unique(cls):
            sel = np.flatnonzero(cls == c)
            stores, flat = self._classes[int(c)]
            pick = rng.integers(0, flat.size, size=sel.size)
            st[sel] = stores[pick]
            mapw = np.asarray(self._mapw)[st[sel]]
            py, px = np.divmod(flat[pick], mapw)
            ys[sel] = py * s + rng.integers(0, s, size=sel.size) - rng.integers(0, w, sel.size)
            xs[sel] = px * s + rng.integers(0, s, size=sel.size) - rng.integers(0, w, sel.size)
        hw = np.asarray(self.plan.shapes)[st] - w
        return st, np.clip(ys, 0, hw[:, 0]), np.clip(xs, 0, hw[:, 1])

    def __iter__(self) -> Iterator[Coord]:
        if self.mode == "grid":
            yield from self._cells
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        out: list[Coord] = []
        for _ in range(1000):
            n = 2 * (self.length - len(out)) + 16
            st, ys, xs = self._uniform(rng, n)
            if self._classes:
                bal = rng.random(n) < self.balance
                bs, by, bx = self._balanced(rng, int(bal.sum()))
                st[bal], ys[bal], xs[bal] = bs, by, bx
            keep = np.zeros(n, dtype=bool)
            for i in np.unique(st):
                sel = st == i
                keep[sel] = self.plan.allowed(int(i), ys[sel], xs[sel], self.window, self.split)
            out += [(int(a), int(b), int(c)) for a, b, c in zip(st[keep], ys[keep], xs[keep],
                                                                 strict=True)]
            if len(out) >= self.length:
                break
        else:  # pragma: no cover - guarded by the grid check in __init__
            raise InputError(f"{self.split} windows", expected="allowed origins",
                             got="almost none after 1000 rejection rounds")
        yield from out[:self.length]

    def __len__(self) -> int:
        return len(self._cells) if self.mode == "grid" else self.length
