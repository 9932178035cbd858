"""semdask.analysis / semdask.morphology: chunk-invariant quantification of label maps."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from click.testing import CliRunner
from scipy import ndimage as ndi

from semdask.analysis import morphology as mo
from semdask.analysis.quantify import analyze, analyze_labels, analyze_series, label_components
from semdask.analysis.report import write_analysis, write_series
from semdask.cli.main import main
from semdask.errors import InputError, StoreError
from semdask.storage import io as sio
from semdask.synthetic.sem import PHASES, SynthParams, render_region, synthetic_mosaic

PORE, NI, NIO, YSZ = range(4)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def micro() -> np.ndarray:
    """A realistic 4-phase label map (synthetic truth) with a few unlabelled pixels."""
    lab = render_region(0, 0, 150, 190, seed=3, params=SynthParams(nio_fraction=0.3))[1]
    lab = lab.copy()
    lab[70:74, 20:30] = 255
    return lab


def _tables(a):
    return {k: getattr(a, k) for k in ("fractions", "connectivity", "sizes", "histogram",
                                      "interfaces", "tpb")}


@pytest.mark.parametrize("chunks", [(150, 190), (64, 64), (37, 53), (1000, 17)])
def test_every_figure_is_chunk_invariant(micro, chunks):
    ref = analyze_labels(micro, classes=PHASES, pixel_size_um=0.1, tile=40, min_area_px=1)
    got = analyze_labels(da.from_array(micro, chunks=chunks), classes=PHASES,
                         pixel_size_um=0.1, tile=40, min_area_px=1)
    assert json.dumps(_tables(got), sort_keys=True) == json.dumps(_tables(ref), sort_keys=True)


def test_fraction_ci_is_the_t_interval_of_equal_tiles():
    rng = np.random.default_rng(0)
    lab = (rng.random((80, 120)) < np.linspace(0.2, 0.6, 120)).astype(np.uint8)
    a = analyze_labels(da.from_array(lab, chunks=33), classes=["a", "b"], tile=40,
                       components=False)
    tiles = lab.reshape(2, 40, 3, 40).mean(axis=(1, 3)).ravel()
    r = a.fractions[1]
    assert r["fraction"] == pytest.approx(lab.mean())
    assert r["tile_std"] == pytest.approx(tiles.std(ddof=1))
    from scipy import stats

    half = stats.t.ppf(0.975, 5) * tiles.std(ddof=1) / math.sqrt(6)
    assert (r["ci_low"], r["ci_high"]) == pytest.approx((lab.mean() - half, lab.mean() + half))
    assert r["n_tiles"] == 6


def test_stripe_percolates_and_discs_are_isolated():
    lab = np.full((60, 80), YSZ, np.uint8)
    lab[:, 30:36] = NI  # a vertical Ni stripe crosses the mosaic top to bottom
    yy, xx = np.mgrid[:60, :80]
    for cy, cx in ((15, 12), (45, 12), (30, 60)):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= 36] = PORE  # isolated pore discs
    a = analyze_labels(da.from_array(lab, chunks=(16, 24)), classes=PHASES, tile=20)
    ni, pore, ysz = a.connectivity[NI], a.connectivity[PORE], a.connectivity[YSZ]
    assert (ni["percolating_y"], ni["percolating_x"], ni["largest"]) == (1.0, 0.0, 1.0)
    assert (pore["percolating"], pore["isolated"], pore["components"]) == (0.0, 1.0, 3)
    assert pore["largest"] == pytest.approx(1 / 3)
    assert (ysz["percolating_x"], ysz["percolating_y"], ysz["components"]) == (0.0, 1.0, 2)


@pytest.mark.parametrize("connectivity", [1, 2])
@pytest.mark.parametrize("chunks", [(13, 17), (32, 50)])
def test_merged_components_equal_scipy_label(connectivity, chunks):
    rng = np.random.default_rng(1)
    lab = ndi.zoom(rng.integers(0, 3, (12, 16)), 5, order=0)[:57, :77].astype(np.uint8)
    lab[rng.random(lab.shape) < 0.03] = 2  # specks and diagonal contacts
    lab[0:3, 40:44] = 255
    ours = label_components(da.from_array(lab, chunks=chunks), 3, connectivity).compute()
    assert (ours[lab == 255] == 0).all()
    st = ndi.generate_binary_structure(2, connectivity)
    for c in range(3):
        ref, n = ndi.label(lab == c, structure=st)
        pairs = np.unique(np.stack([ours[lab == c], ref[lab == c]]), axis=1)
        assert pairs.shape[1] == n == len(np.unique(ours[lab == c]))  # a bijection


def test_sizes_of_known_discs_exclude_border_components():
    lab = np.full((100, 140), YSZ, np.uint8)
    yy, xx = np.mgrid[:100, :140]
    areas = []
    for cy, cx, r in ((30, 30, 8), (60, 80, 15), (30, 110, 12)):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        lab[disc] = NI
        areas.append(int(disc.sum()))
    lab[90:, :10] = NI  # touches the border: flagged, not in the statistics
    a = analyze_labels(da.from_array(lab, chunks=(40, 45)), classes=PHASES, pixel_size_um=0.5,
                       tile=50, min_area_px=1)
    s = a.sizes[NI]
    d = np.sort(2 * np.sqrt(np.array(areas) / np.pi) * 0.5)
    assert (s["n"], s["n_border"]) == (3, 1)
    assert s["d50_um"] == pytest.approx(d[1])
    assert s["d10_um"] == pytest.approx(np.percentile(d, 10))
    assert s["d90_um"] == pytest.approx(np.percentile(d, 90))
    assert d == pytest.approx([8, 12, 15], rel=0.02)  # digitised discs: ECD ~ 2 r * 0.5 um
    assert sum(h["count"] for h in a.histogram if h["phase"] == "Ni") == 3


def test_tpb_count_on_a_hand_made_pattern():
    cell = np.full((12, 12), YSZ, np.uint8)
    cell[:6, :6], cell[:6, 6:] = NI, PORE  # one Ni/pore/YSZ corner per cell
    lab = np.tile(cell, (3, 4))
    ny, nx = 3, 4  # + junctions with the right, lower and diagonal neighbour cells
    expected = ny * nx + ny * (nx - 1) + (ny - 1) * nx + (ny - 1) * (nx - 1)
    for chunks in ((36, 48), (6, 6), (5, 7)):
        a = analyze_labels(da.from_array(lab, chunks=chunks), classes=PHASES,
                           pixel_size_um=0.25, tile=12, components=False)
        assert a.tpb["points"] == expected == 35
        assert a.tpb["P_A_per_um2"] == pytest.approx(35 / (36 * 48 * 0.25**2))
    diag = np.array([[NI, YSZ], [YSZ, PORE]], np.uint8)  # pore meets Ni only at the corner
    assert analyze_labels(diag, classes=PHASES, components=False).tpb["points"] == 1


def test_tpb_matches_brute_force(micro):
    t = mo.tpb_triple(PHASES)
    want = sum(set(map(int, micro[y:y + 2, x:x + 2].ravel())) >= set(t)
               for y in range(micro.shape[0] - 1) for x in range(micro.shape[1] - 1))
    a = analyze_labels(da.from_array(micro, chunks=29), classes=PHASES, components=False)
    assert a.tpb["points"] == want > 0


def test_interface_length_of_a_straight_boundary_and_a_circle():
    lab = np.full((40, 50), YSZ, np.uint8)
    lab[:, :20] = NI
    a = analyze_labels(da.from_array(lab, chunks=16), classes=PHASES, pixel_size_um=0.5,
                       tile=20, components=False)
    r = next(r for r in a.interfaces if {r["phase_a"], r["phase_b"]} == {"Ni", "YSZ"})
    assert r["edges"] == 40
    assert r["length_um"] == pytest.approx(math.pi / 4 * 40 * 0.5)  # isotropic correction
    assert r["L_A_per_um"] == pytest.approx(r["length_um"] / (40 * 50 * 0.25))
    yy, xx = np.mgrid[:200, :200]
    disc = np.where((yy - 100) ** 2 + (xx - 100) ** 2 <= 60**2, NI, YSZ).astype(np.uint8)
    c = analyze_labels(da.from_array(disc, chunks=64), classes=PHASES, components=False)
    length = next(r for r in c.interfaces if r["phase_a"] == "Ni" and r["phase_b"] == "YSZ")
    assert length["length_px"] == pytest.approx(2 * math.pi * 60, rel=0.02)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[tuple[Path, float]]:
    """Three tiny synthetic mosaics; labels/phases = truth with a known share of NiO -> Ni."""
    d = tmp_path_factory.mktemp("series")
    out = []
    for k, (t, f) in enumerate(((0, 0.0), (5, 0.2), (20, 0.5))):
        p = d / f"s{t}.ome.zarr"
        m = synthetic_mosaic((96, 128), seed=10 + k, chunk=64, params=SynthParams(nio_fraction=f))
        sio.write_synthetic(p, m)
        truth = sio.open_labels(p, "truth").data
        pred = da.where((truth == NIO) & (da.arange(128)[None, :] < 64), NI, truth)
        sio.write_labels(p, pred.astype(np.uint8), name="phases", classes=PHASES)
        out.append((p, float(t)))
    return out


def test_time_series_table_errors_and_plot(stores, tmp_path):
    s = analyze_series([f"{p}:{t}" for p, t in reversed(stores)], labels="phases",
                       truth="truth", time_unit="min", tile=32)
    nio = [r for r in s.rows if r["phase"] == "NiO"]
    assert [r["time"] for r in nio] == [0, 5, 20]
    errs = []
    for (p, _), r in zip(stores, nio, strict=True):
        truth = np.asarray(sio.open_labels(p, "truth").data)
        moved = ((truth == NIO) & (np.arange(128)[None, :] < 64)).sum()
        errs.append(-100 * moved / truth.size)
        assert r["error_pp"] == pytest.approx(errs[-1])
        assert r["ci_low"] <= r["fraction"] <= r["ci_high"]
    assert s.errors["NiO"]["mae_pp"] == pytest.approx(np.abs(errs).mean())
    assert s.errors["NiO"]["rmse_pp"] == pytest.approx(np.sqrt(np.square(errs).mean()))
    assert "MAE" in s.table("NiO")
    files = write_series(s, tmp_path)
    assert (tmp_path / "series.png").stat().st_size > 5000
    assert (tmp_path / "series.csv").read_text().startswith("time,mosaic,phase")
    assert all(f.exists() for f in files)


def test_analyze_store_with_rois_writes_tables_and_plots(stores, tmp_path):
    res = analyze(stores[1][0], labels="truth", rois=["0:64,0:64", "10:90,20:100"], tile=32)
    assert [a.region for a in res] == ["mosaic", "0:64,0:64", "10:90,20:100"]
    assert res[1].shape == (64, 64) and res[0].pixel_size_um == pytest.approx(0.04458)
    files = {f.name for f in write_analysis(res, tmp_path)}
    assert {"fractions.csv", "connectivity.csv", "sizes.csv", "interfaces.csv", "tpb.csv",
            "summary.json", "fractions.png", "sizes.png", "boundaries.png"} <= files
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary[0]["unit"] == "um" and len(summary) == 3


def test_cli_analyze_and_series(stores, tmp_path):
    r = CliRunner().invoke(main, ["analyze", str(stores[2][0]), "--labels", "truth", "--roi",
                                  "0:48,0:48", "--tile", "32", "--out", str(tmp_path / "a"),
                                  "--no-cluster"])
    assert r.exit_code == 0, r.output
    assert "TPB" in r.output and "[0:48,0:48]" in r.output
    assert (tmp_path / "a" / "fractions.png").is_file()
    items = [f"{p}:{t:g}" for p, t in stores]
    r = CliRunner().invoke(main, ["analyze", "--series", *items, "--truth", "truth",
                                  "--tile", "32", "--out", str(tmp_path / "s"), "--no-cluster"])
    assert r.exit_code == 0, r.output
    assert "NiO: MAE" in r.output and (tmp_path / "s" / "series.png").is_file()


def test_bad_inputs_have_clear_messages(stores, tmp_path):
    store = stores[0][0]
    r = CliRunner().invoke(main, ["analyze", str(store), "--labels", "nope", "--out",
                                  str(tmp_path), "--no-cluster"])
    assert r.exit_code != 0 and "labels 'nope'" in r.output and "truth" in r.output
    with pytest.raises(StoreError, match="labels 'nope'"):
        analyze(store, labels="nope")
    with pytest.raises(InputError, match=r"outside the image.*96 x 128 px"):
        analyze(store, labels="truth", rois=["0:50,100:200"])
    with pytest.raises(InputError, match="y0:y1,x0:x1"):
        analyze(store, labels="truth", rois=["0-50"])
    r = CliRunner().invoke(main, ["analyze", str(store), str(store), "--no-cluster"])
    assert r.exit_code != 0 and "--series" in r.output
    with pytest.raises(InputError, match="MOSAIC:TIME"):
        analyze_series([str(store)])


def test_no_pixel_size_gives_results_in_px(tmp_path, caplog):
    p = tmp_path / "nopx.ome.zarr"
    img = da.zeros((64, 64), np.uint8, chunks=32)
    sio.write_image(p, img, pixel_size_um=None)
    lab = np.full((64, 64), YSZ, np.uint8)
    lab[:, :32] = NI
    sio.write_labels(p, da.from_array(lab, chunks=32), classes=PHASES)
    with caplog.at_level("WARNING"):
        (a,) = analyze(p, tile=32)
    assert "no pixel size" in caplog.text and a.unit == "px"
    assert a.fractions[NI]["area_px2"] == 64 * 32
    r = CliRunner().invoke(main, ["analyze", str(p), "--out", str(tmp_path / "o"),
                                  "--no-cluster"])
    assert r.exit_code == 0 and "no pixel size" in r.output


def test_oxidation_series_example_runs(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "oxidation_series.py"),
                        "--shape", "256", "256", "--out", str(tmp_path), "--no-model"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "NiO" in r.stdout and "TPB" in r.stdout
    assert (tmp_path / "series-truth" / "series.png").is_file()
