"""Synthetic Ni/YSZ generator: global determinism, realism, learnability, EDS, validation."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from scipy import ndimage as ndi

from semdask.errors import InputError
from semdask.synthetic.sem import (
    COLOURS,
    PHASES,
    SynthParams,
    render_eds,
    render_region,
    synthetic_mosaic,
)

PORE, NI, NIO, YSZ = range(4)


@pytest.fixture(scope="module")
def big() -> tuple[np.ndarray, np.ndarray]:
    return render_region(512, 1024, 1024, 1024, seed=11)


def test_public_constants() -> None:
    assert PHASES == ("pore", "Ni", "NiO", "YSZ")
    assert len(COLOURS) == 4
    assert all(len(c) == 4 and all(0 <= v <= 255 for v in c)
                                     for c in COLOURS)
    assert SynthParams().pixel_size_um == pytest.approx(0.04458)


def test_region_is_identical_whole_or_in_pieces() -> None:
    y0, x0, h, w = 2000, 4000, 300, 260  # crosses a 2048-px tile edge and noise blocks
    img, truth = render_region(y0, x0, h, w, seed=4)
    for ys, xs in [(slice(0, 137), slice(0, 101)), (slice(0, 137), slice(101, w)),
                   (slice(137, h), slice(0, 101)), (slice(137, h), slice(101, w))]:
        i, t = render_region(y0 + ys.start, x0 + xs.start, ys.stop - ys.start,
                             xs.stop - xs.start, seed=4)
        np.testing.assert_array_equal(i, img[ys, xs])
        np.testing.assert_array_equal(t, truth[ys, xs])
    eds = render_eds(10, 20, 40, 50, seed=4)
    np.testing.assert_array_equal(render_eds(10, 45, 40, 25, seed=4), eds[:, :, 25:])
    np.testing.assert_array_equal(render_eds(33, 20, 17, 50, seed=4), eds[:, 23:])


def test_mosaic_is_chunk_invariant_and_matches_render_region() -> None:
    import dask

    a = synthetic_mosaic((200, 264), seed=2, chunk=64)
    b = synthetic_mosaic((200, 264), seed=2, chunk=128)
    assert a.image.chunks == ((64, 64, 64, 8), (64, 64, 64, 64, 8))
    assert a.eds.shape == (3, 50, 66)
    assert a.eds.dtype == np.float32
    assert a.image.dtype == a.truth.dtype == np.uint8
    ia, ta, ea = dask.compute(a.image, a.truth, a.eds)
    ib, tb, eb = dask.compute(b.image, b.truth, b.eds)
    img, truth = render_region(0, 0, 200, 264, seed=2)
    for x, y in [(ia, ib), (ta, tb), (ea, eb), (ia, img), (ta, truth),
                 (ea, render_eds(0, 0, 50, 66, seed=2))]:
        np.testing.assert_array_equal(x, y)
    assert a.pixel_size_um == pytest.approx(0.04458)
    assert a.seed == 2
    assert not np.array_equal(render_region(0, 0, 64, 64, seed=3)[0], img[:64, :64])


def test_phase_fractions_are_realistic(big: tuple[np.ndarray, np.ndarray]) -> None:
    frac = np.bincount(big[1].ravel(), minlength=4) / big[1].size
    assert 0.25 <= frac[PORE] <= 0.36
    assert 0.27 <= frac[NI] + frac[NIO] <= 0.38
    assert 0.15 <= frac[NI] <= 0.30
    assert 0.03 <= frac[NIO] <= 0.12
    assert 0.32 <= frac[YSZ] <= 0.46
    # YSZ forms a network: one connected cluster holds most of it (2-D section)
    lab, _n = ndi.label(big[1] == YSZ)
    assert np.bincount(lab.ravel())[1:].max() > 0.6 * (big[1] == YSZ).sum()


def test_nio_fraction_controls_nio_share() -> None:
    shares = []
    for f in (0.0, 0.1, 0.3, 0.6, 1.0):
        _, t = render_region(0, 0, 384, 384, seed=5, params=SynthParams(nio_fraction=f))
        shares.append((t == NIO).sum() / max(1, np.isin(t, (NI, NIO)).sum()))
    assert shares[0] == 0
    assert all(b > a for a, b in itertools.pairwise(shares))
    assert shares[-1] > 0.95
    assert 0.15 < shares[2] < 0.45


def test_ni_and_ysz_overlap_in_grey_but_differ_in_texture(
        big: tuple[np.ndarray, np.ndarray]) -> None:
    img, truth = big
    # interiors only (away from phase boundaries), so the blur does not mix the phases
    inner = {k: ndi.binary_erosion(truth == k, iterations=3) for k in (NI, YSZ)}
    lo_n, hi_n = np.percentile(img[inner[NI]], [10, 90])
    lo_y, hi_y = np.percentile(img[inner[YSZ]], [10, 90])
    overlap = min(hi_n, hi_y) - max(lo_n, lo_y)
    assert overlap > 0.5 * min(hi_n - lo_n, hi_y - lo_y)
    # no grey threshold separates Ni from YSZ well (balanced accuracy of the best one)
    ni, ysz = img[inner[NI]].astype(int), img[inner[YSZ]].astype(int)
    cn, cy = np.bincount(ni, minlength=256).cumsum() / ni.size, \
        np.bincount(ysz, minlength=256).cumsum() / ysz.size
    best = np.max(np.maximum(cy - cn, cn - cy) / 2 + 0.5)
    assert best < 0.85
    # ... but local texture (std in 5x5 windows of a lightly smoothed image) tells them apart
    f = ndi.gaussian_filter(img.astype(np.float32), 1.0)
    sd = np.sqrt(np.maximum(ndi.uniform_filter(f * f, 5) - ndi.uniform_filter(f, 5) ** 2, 0))
    assert np.median(sd[inner[YSZ]]) > 1.5 * np.median(sd[inner[NI]])


def test_noise_follows_eq2() -> None:
    quiet = dict(drift=0.0, tile_step=0.0, blur=0.0)
    clean, _ = render_region(0, 0, 256, 256, seed=1,
                             params=SynthParams(noise=0.0, photons=0.0, **quiet))
    p = SynthParams(noise=0.03, photons=100.0, **quiet)
    noisy, _ = render_region(0, 0, 256, 256, seed=1, params=p)
    i = clean.astype(float) / 255
    resid = (noisy.astype(float) - clean) / 255
    sel = (i > 0.2) & (i < 0.8)  # away from clipping
    expected = np.sqrt(np.mean(i[sel] / p.photons + p.noise**2))
    assert np.std(resid[sel]) == pytest.approx(expected, rel=0.1)
    assert abs(np.mean(resid[sel])) < 0.005


def test_tiles_have_brightness_steps() -> None:
    kw = dict(noise=0.0, photons=0.0, drift=0.0, blur=0.0)
    flat, _ = render_region(0, 96, 64, 64, seed=3, params=SynthParams(tile_step=0.0, **kw))
    step, _ = render_region(0, 96, 64, 64, seed=3,
                            params=SynthParams(tile_size=128, tile_step=0.2, **kw))
    d = step.astype(float) - flat
    assert abs(d[:, :32].mean() - d[:, 32:].mean()) > 1.0  # tile edge at x = 128


def test_eds_maps_follow_the_phases() -> None:
    p = SynthParams(eds_shift=(0, 0))
    eds = render_eds(0, 0, 96, 96, seed=7, params=p)
    assert eds.shape == (3, 96, 96)
    assert eds.dtype == np.float32
    assert eds.min() >= 0
    _, truth = render_region(0, 0, 384, 384, seed=7, params=p)

    def frac(*ks: int) -> np.ndarray:
        return np.isin(truth, ks).reshape(96, 4, 96, 4).mean(axis=(1, 3)).ravel()

    for ch, ks in [(0, (NI, NIO)), (1, (NIO, YSZ)), (2, (YSZ,))]:
        assert np.corrcoef(eds[ch].ravel(), frac(*ks))[0, 1] > 0.6, PHASES
    assert np.corrcoef(eds[2].ravel(), frac(PORE))[0, 1] < 0  # little Zr in pores


def test_eds_is_shifted_by_the_true_shift() -> None:
    p = SynthParams(eds_shift=(8, -4), eds_blur=2.0)
    zr = render_eds(4, 4, 64, 64, seed=8, params=p)[2]
    _, truth = render_region(0, 0, 320, 320, seed=8, params=p)
    ysz = (truth == YSZ).astype(float)

    def corr(dy: int, dx: int) -> float:
        y = ysz[16 - dy:16 - dy + 256, 16 - dx:16 - dx + 256].reshape(64, 4, 64, 4).mean((1, 3))
        return float(np.corrcoef(zr.ravel(), y.ravel())[0, 1])

    assert corr(8, -4) > corr(0, 0) + 0.05
    assert synthetic_mosaic((64, 64), params=p).eds_shift_px == (2.0, -1.0)


@pytest.mark.parametrize("kw", [
    {"nio_fraction": 1.5}, {"nio_fraction": -0.1}, {"porosity": 0.0}, {"noise": -1.0},
    {"blur": -1.0}, {"ni_radius": (20.0, 5.0)}, {"ysz_grain": 2}, {"tile_size": 0},
    {"grey": (0.1, 0.5, 0.4)}, {"eds_shift": (0.5, 0)}, {"pixel_size_um": 0.0},
])
def test_bad_params_raise_input_error(kw: dict) -> None:
    with pytest.raises(InputError, match=next(iter(kw))):
        SynthParams(**kw)


@pytest.mark.parametrize("call", [
    lambda: render_region(0, 0, 0, 10),
    lambda: render_region(0, 0, 10, 10, seed=-1),
    lambda: synthetic_mosaic((10,)),  # type: ignore[arg-type]
    lambda: synthetic_mosaic((64, 64), chunk=30),
    lambda: render_eds(0, 0, 5, -1),
])
def test_bad_arguments_raise_input_error(call) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError):
        call()


def test_params_round_trip_as_dict() -> None:
    p = SynthParams(nio_fraction=0.4)
    d = p.as_dict()
    assert d["nio_fraction"] == 0.4
    assert isinstance(d["grey"], list)
    assert SynthParams(**{k: tuple(v) if isinstance(v, list) else v
                          for k, v in d.items()}) == p
    assert dataclasses.is_dataclass(p)
