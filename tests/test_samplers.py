"""Leak-free splits (bands, stores, blocks with a guard gap) and class-balanced sampling."""

from __future__ import annotations

import numpy as np
import pytest

from semdask.errors import InputError
from semdask.training.samplers import ClassMaps, WindowSampler, make_split, split_rows

SHAPES = [(600, 500), (400, 700)]


def _cover(windows, shape, store, w):
    m = np.zeros(shape, bool)
    for s, y, x in windows:
        if s == store:
            m[y:y + w, x:x + w] = True
    return m


def _dilate(mask: np.ndarray, g: int) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    out = np.zeros_like(mask)
    if ys.size:
        out[max(0, ys.min() - g):ys.max() + g + 1, max(0, xs.min() - g):xs.max() + g + 1] = True
    return out


@pytest.mark.parametrize("kind", ["bands", "blocks"])
def test_spatial_splits_keep_a_guard_gap(kind) -> None:
    w = 32
    plan = make_split(SHAPES, w, split=kind, val_fraction=0.25, block=96, seed=1)
    assert plan.guard == w
    tr = list(WindowSampler(SHAPES, w, split="train", plan=plan, length=3000, seed=0))
    va = list(WindowSampler(SHAPES, w, split="val", plan=plan))
    assert tr and va
    for s, shape in enumerate(SHAPES):
        val_px = np.zeros(shape, bool)
        for y0, y1, x0, x1 in plan.val[s]:
            val_px[y0:y1, x0:x1] = True
            guard = _dilate(np.pad(np.ones((y1 - y0, x1 - x0), bool),
                                   ((y0, shape[0] - y1), (x0, shape[1] - x1))), w)
            assert not (_cover(tr, shape, s, w) & guard).any()  # >= one window away
        cv = _cover(va, shape, s, w)
        assert not (cv & ~val_px).any()  # validation windows stay inside
        rects_fit = [r for r in plan.val[s] if r[1] - r[0] >= w and r[3] - r[2] >= w]
        for y0, y1, x0, x1 in rects_fit:
            assert cv[y0:y1, x0:x1].all()  # and cover every held-out block


def test_bands_fold0_is_the_bottom_band_and_folds_move_it() -> None:
    p0 = make_split(SHAPES, 32, split="bands", val_fraction=0.2)
    for s, (h, w) in enumerate(SHAPES):
        assert p0.val[s] == ((split_rows(h, 0.2, "val")[0], h, 0, w),)
    p1 = make_split(SHAPES, 32, split="bands", val_fraction=0.2, fold=1)
    assert p1.val[0] == ((360, 480, 0, 500),)


def test_block_folds_partition_the_blocks() -> None:
    k = 4
    plans = [make_split(SHAPES, 32, split="blocks", val_fraction=1 / k, block=100, fold=f,
                        seed=3) for f in range(k)]
    for s, (h, w) in enumerate(SHAPES):
        count = np.zeros((h, w), int)
        for p in plans:
            for y0, y1, x0, x1 in p.val[s]:
                count[y0:y1, x0:x1] += 1
        assert (count == 1).all()  # every pixel is validation in exactly one fold
    assert plans[0].val != plans[1].val
    assert make_split(SHAPES, 32, split="blocks", val_fraction=0.25, block=100, seed=3).val == \
        plans[0].val  # seeded


def test_store_split() -> None:
    shapes = [(200, 200)] * 5
    plan = make_split(shapes, 32, split="stores", val_stores=[3])
    assert plan.guard == 0 and [bool(v) for v in plan.val] == [False] * 3 + [True, False]
    tr = list(WindowSampler(shapes, 32, split="train", plan=plan, length=500, seed=0))
    va = list(WindowSampler(shapes, 32, split="val", plan=plan))
    assert {s for s, _, _ in tr} == {0, 1, 2, 4} and {s for s, _, _ in va} == {3}
    every = make_split(shapes, 32, split="stores", val_fraction=0.5, fold=1)
    assert [bool(v) for v in every.val] == [False, True, False, True, False]
    with pytest.raises(InputError, match="held-out"):
        make_split([(200, 200)], 32, split="stores")
    with pytest.raises(InputError, match="split"):
        make_split(shapes, 32, split="random")


def _rare_maps() -> ClassMaps:
    m = np.zeros((100, 100), np.uint8)  # scale 4: a 400 x 400 px store
    m[:, 50:] = 1
    m[10:14, 10:14] = 3  # a rare phase: 16 of 10000 low-res pixels
    m[90:, 90:] = 255  # unlabelled
    return ClassMaps((m,), 4, 4)


def test_class_maps_counts_skip_ignore_and_validation() -> None:
    maps = _rare_maps()
    counts = maps.counts()
    assert counts.tolist() == [5000 - 16, 5000 - 100, 0, 16]
    plan = make_split([(400, 400)], 32, split="bands", val_fraction=0.2, guard=0)
    assert maps.counts(plan).sum() == 80 * 100  # the bottom 20 rows are validation


def test_balanced_sampling_oversamples_rare_classes() -> None:
    maps, shapes, w = _rare_maps(), [(400, 400)], 32
    plan = make_split(shapes, w, split="bands", val_fraction=0.2)

    def share_with_rare(balance: float, seed: int = 0) -> float:
        s = WindowSampler(shapes, w, plan=plan, class_maps=maps, balance=balance, length=2000,
                          seed=seed)
        wins = list(s)
        assert all(plan.allowed(0, np.array([y]), np.array([x]), w, "train")[0]
                   for _, y, x in wins)
        return float(np.mean([(y < 56 and y + w > 40 and x < 56 and x + w > 40)
                              for _, y, x in wins]))

    uniform, balanced = share_with_rare(0.0), share_with_rare(1.0)
    assert uniform < 0.03  # the rare blob is in ~1 % of uniform windows
    assert 0.25 < balanced < 0.45  # one class in three present (NiO absent) is the rare one
    assert 0.1 < share_with_rare(0.5) < balanced
    a = WindowSampler(shapes, w, plan=plan, class_maps=maps, balance=0.5, length=50, seed=4)
    b = WindowSampler(shapes, w, plan=plan, class_maps=maps, balance=0.5, length=50, seed=4)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b)


def test_sampler_rejects_bad_parameters() -> None:
    with pytest.raises(InputError, match="balance"):
        WindowSampler(SHAPES, 32, class_maps=_rare_maps(), balance=1.5)
    with pytest.raises(InputError, match="train region"):
        WindowSampler([(64, 64)], 32, plan=make_split([(64, 64)], 32, split="bands",
                                                      val_fraction=0.5))
