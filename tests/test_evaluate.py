"""semdask evaluate: pooled metrics against sklearn, boundary F1, chunk invariance, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn import metrics as skm

from semdask.analysis.boundary import boundary_block_counts, boundary_counts
from semdask.analysis.evaluate import evaluate
from semdask.analysis.metrics import confusion_matrix
from semdask.errors import InputError, UnsafePathError
from semdask.storage import io

DATA = Path(__file__).parent / "data" / "nasa_super"
IDS = ("spot2_0d_0", "spot3_0d_3", "spot4_0d_3")
NAMES = ["matrix (gamma)", "secondary gamma-prime", "tertiary gamma-prime"]


def _truth(stem: str = IDS[0]) -> np.ndarray:
    return np.asarray(Image.open(DATA / "labels" / f"{stem}.png"))


def _perturb(t: np.ndarray, seed: int = 0) -> np.ndarray:
    """A plausible wrong prediction: shifted, flipped and overwritten regions."""
    rng = np.random.default_rng(seed)
    p = t.copy()
    p[40:200, 30:230] = t[43:203, 28:228]  # region shifted by (3, -2) px
    p[300:380, 300:420] = t[300:380, 300:420][::-1]  # flipped region
    p[450:500, 20:90] = rng.integers(0, 3)  # one block relabelled
    p[::97, ::89] = (p[::97, ::89] + 1) % 3  # scattered single-pixel errors
    return p


def _with_ignore(t: np.ndarray) -> np.ndarray:
    t = t.copy()
    t[100:130, 250:512] = 255  # an unlabelled band
    return t


def _png(path: Path, a: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a.astype(np.uint8), mode="L").save(path)
    return path


def test_matches_sklearn_on_real_labels(tmp_path):
    t = _with_ignore(_truth())
    p = _perturb(_truth())
    ev = evaluate(_png(tmp_path / "p.png", p), _png(tmp_path / "t.png", t), classes=NAMES,
                  overlay=False)
    keep = t.ravel() != 255
    yt, yp = t.ravel()[keep], p.ravel()[keep]
    lab = [0, 1, 2]
    np.testing.assert_array_equal(ev.pooled.confusion, skm.confusion_matrix(yt, yp, labels=lab))
    d = ev.to_dict()["pooled"]
    assert d["pixels"] == keep.sum() and d["accuracy"] == pytest.approx(
        skm.accuracy_score(yt, yp), abs=1e-12)
    for key, fn in (("iou", skm.jaccard_score), ("dice", skm.f1_score),
                    ("precision", skm.precision_score), ("recall", skm.recall_score)):
        ref = fn(yt, yp, labels=lab, average=None)
        got = [c[key] for c in d["classes"]]
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12, err_msg=key)
    assert d["miou"] == pytest.approx(skm.jaccard_score(yt, yp, average="macro"), abs=1e-12)
    norm = skm.confusion_matrix(yt, yp, labels=lab, normalize="true")
    np.testing.assert_allclose(d["confusion_normalised"], norm, atol=1e-12)
    freq = np.bincount(yt, minlength=3) / yt.size
    np.testing.assert_allclose([c["truth_frequency"] for c in d["classes"]], freq)
    assert 0.5 < d["accuracy"] < 0.99  # the perturbation is visible, not total


def _naive_boundary(p: np.ndarray, t: np.ndarray, n: int, tol: float) -> np.ndarray:
    """Brute-force reference: all pairwise distances between boundary pixels."""
    valid = (t != 255) & (t < n)

    def bnd(lab: np.ndarray) -> np.ndarray:
        b = np.zeros(lab.shape, bool)
        h, w = lab.shape
        for y in range(h):
            for x in range(w):
                for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                    yy, xx = y + dy, x + dx
                    if (0 <= yy < h and 0 <= xx < w and valid[y, x] and valid[yy, xx]
                            and lab[y, x] != lab[yy, xx]):
                        b[y, x] = True
        return b

    bp, bt = bnd(p), bnd(t)
    out = np.zeros((4, n + 1), np.int64)
    for k in range(n + 1):
        mp, mt = (bp, bt) if k == n else (bp & (p == k), bt & (t == k))
        a, b = np.argwhere(mp), np.argwhere(mt)
        out[0, k], out[2, k] = len(a), len(b)
        if len(a) and len(b):
            dist = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
            out[1, k] = (dist.min(1) <= tol).sum()
            out[3, k] = (dist.min(0) <= tol).sum()
    return out


@pytest.mark.parametrize("tol", [0, 1, 1.5, 3, 7.5])
def test_boundary_counts_match_brute_force(tol):
    t = _with_ignore(_truth())[90:122, 240:272]  # real labels with part of the ignore band
    p = _perturb(_truth())[90:122, 240:272]
    p[5:9, 3:12] = 2
    ref = _naive_boundary(p, t, 3, tol)
    assert ref[0, -1] > 20 and ref[2, -1] > 20
    np.testing.assert_array_equal(boundary_block_counts(p, t, 3, tol), ref)
    got = boundary_counts(da.from_array(p, chunks=7), da.from_array(t, chunks=11), 3,
                          tolerance=tol).compute()
    np.testing.assert_array_equal(got, ref)


def test_boundary_f1_identical_and_shifted():
    t = _truth()
    same = evaluate(t, t, classes=NAMES, tolerance=0, overlay=False).pooled
    assert same.boundary_f1 == 1.0 and same.boundary_f1_all == 1.0 and same.miou == 1.0
    p = t.copy()
    p[:, 1:] = t[:, :-1]  # 1 px shift to the right
    f = {tol: evaluate(p, t, classes=NAMES, tolerance=tol, overlay=False).pooled
         for tol in (0, 1, 2)}
    assert f[0].boundary_f1 < 0.8
    assert f[0].boundary_f1 < f[1].boundary_f1 <= f[2].boundary_f1
    assert f[2].boundary_f1 > 0.99 and f[2].boundary_f1_all > 0.99
    assert f[0].miou == f[2].miou  # the pixel scores do not depend on the tolerance


def test_chunk_invariance_including_boundary_f1():
    t = _with_ignore(_truth())
    p = _perturb(_truth())
    dicts = []
    for cp, ct in ((512, 512), (37, 100), (100, 41)):
        ev = evaluate(da.from_array(p, chunks=cp), da.from_array(t, chunks=ct), classes=NAMES,
                      tolerance=2, overlay=False)
        dicts.append(ev.to_dict())
    assert all(d == dicts[0] for d in dicts[1:])
    assert evaluate(p, t, classes=NAMES, chunk=64, overlay=False).to_dict() == dicts[0]
    assert 0 < dicts[0]["pooled"]["boundary_f1"] < 1
    # chunks smaller than the halo (tolerance 2 -> 3 px) are merged, same numbers
    tc, pc = t[90:122, 240:272], p[90:122, 240:272]
    small = [evaluate(da.from_array(pc, chunks=c), da.from_array(tc, chunks=c + 1),
                      classes=NAMES, tolerance=2, overlay=False).to_dict() for c in (31, 2, 6)]
    assert small[0] == small[1] == small[2]


def test_ignore_is_skipped_everywhere():
    t = _with_ignore(_truth())
    p = _perturb(_truth())
    p2 = p.copy()
    p2[t == 255] = (p2[t == 255] + 1) % 3  # change the prediction only where truth ignores
    a = evaluate(p, t, classes=NAMES, overlay=False).to_dict()
    b = evaluate(p2, t, classes=NAMES, overlay=False).to_dict()
    assert a == b


def test_stores_folders_and_overlay(tmp_path):
    img = np.asarray(Image.open(DATA / "images" / f"{IDS[0]}.png"))
    t, p = _with_ignore(_truth()), _perturb(_truth())
    store = tmp_path / "m.ome.zarr"
    io.write_image(store, da.from_array(img, chunks=256), pixel_size_um=0.01)
    io.write_labels(store, da.from_array(p, chunks=256), name="phases", classes=NAMES)
    io.write_labels(store, da.from_array(t, chunks=256), name="truth", classes=NAMES)
    ev = evaluate(store, store, tolerance=2, max_side=256)
    assert ev.classes == NAMES
    ref = evaluate(p, t, classes=NAMES, tolerance=2, overlay=False)
    assert ev.to_dict()["pooled"] == ref.to_dict()["pooled"]
    (ov,) = ev.overlays
    assert ov.level == 1 and ov.error.shape == (256, 256) and ov.background_is_image
    wrong = ((p != t) & (t != 255)).mean()
    assert float(ov.error.mean()) == pytest.approx(wrong, rel=1e-5)
    np.testing.assert_allclose(ov.background, img.reshape(256, 2, 256, 2).mean((1, 3)),
                               atol=0.51)  # the store's level 1
    io.write_labels(store, da.from_array(p % 2, chunks=256), name="two", classes=["a", "b"])
    with pytest.raises(InputError, match="3 classes"):
        evaluate(store, store, pred_labels="two", overlay=False)


def test_folders_pool_counts(tmp_path):
    truths = {s: _truth(s) for s in IDS}
    for i, (s, t) in enumerate(truths.items()):
        _png(tmp_path / "pred" / f"{s}.png", _perturb(t, seed=i))
        _png(tmp_path / "truth" / f"{s}.png", t)
    _png(tmp_path / "truth" / "extra.png", truths[IDS[0]])  # no prediction: skipped
    ev = evaluate(tmp_path / "pred", tmp_path / "truth", classes=NAMES, overlay=False)
    assert [r.name for r in ev.images] == list(IDS)
    np.testing.assert_array_equal(ev.pooled.confusion,
                                  sum(r.scores.confusion for r in ev.images))
    yt = np.concatenate([truths[s].ravel() for s in IDS])
    yp = np.concatenate([_perturb(truths[s], seed=i).ravel() for i, s in enumerate(IDS)])
    np.testing.assert_array_equal(ev.pooled.confusion, skm.confusion_matrix(yt, yp))
    assert len(ev.to_dict()["images"]) == 3


def test_bad_inputs(tmp_path):
    t = _truth()
    with pytest.raises(UnsafePathError, match="nothing there"):
        evaluate(tmp_path / "missing.png", _png(tmp_path / "t.png", t))
    with pytest.raises(InputError, match="shape"):
        evaluate(_png(tmp_path / "p.png", t[:500]), tmp_path / "t.png")
    with pytest.raises(InputError, match="class ids < 2"):
        evaluate(t, t, classes=["a", "b"], overlay=False)
    with pytest.raises(InputError, match="class ids < 3"):
        confusion_matrix(np.full((2, 2), 3), np.zeros((2, 2), int), 3).compute()


def test_cli_writes_json_and_plots(tmp_path):
    from semdask.cli.main import main

    for i, s in enumerate(IDS[:2]):
        _png(tmp_path / "pred" / f"{s}.png", _perturb(_truth(s), seed=i))
        _png(tmp_path / "truth" / f"{s}.png", _with_ignore(_truth(s)))
    out, plots = tmp_path / "eval.json", tmp_path / "plots"
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "pred"), str(tmp_path / "truth"),
                                  "--classes", ",".join(NAMES), "--tolerance", "2",
                                  "--image", str(DATA / "images"), "--json", str(out),
                                  "--plots", str(plots), "--no-cluster"])
    assert r.exit_code == 0, r.output
    assert "mIoU" in r.output and "spot3_0d_3" in r.output
    d = json.loads(out.read_text())
    assert d["classes"] == NAMES and len(d["images"]) == 2 and d["tolerance_px"] == 2
    assert 0.5 < d["pooled"]["miou"] < 1 and d["confusion_rows"] == "truth"
    for name in ("confusion", "iou", "errors", "frequency_iou"):
        with Image.open(plots / f"{name}.png") as im:
            assert im.size[0] > 200 and im.size[1] > 200


def test_cli_bad_inputs_exit_nonzero(tmp_path):
    from semdask.cli.main import main

    t = _png(tmp_path / "t.png", _truth())
    small = _png(tmp_path / "small.png", _truth()[:256])
    r = CliRunner().invoke(main, ["evaluate", str(tmp_path / "nope.png"), str(t), "--no-cluster"])
    assert r.exit_code == 2 and "nothing there" in r.output
    r = CliRunner().invoke(main, ["evaluate", str(small), str(t), "--no-cluster"])
    assert r.exit_code == 2 and "expected the truth's shape (512, 512)" in r.output


def test_overlay_without_image_and_wrong_image(tmp_path):
    t, p = _truth(), _perturb(_truth())
    ev = evaluate(p, t, classes=NAMES, max_side=128)
    (ov,) = ev.overlays
    assert ov.level == 2 and ov.error.shape == (128, 128) and not ov.background_is_image
    with pytest.raises(InputError, match="image of array"):
        evaluate(p, t, classes=NAMES, image=np.zeros((10, 10), np.uint8))
    ev = evaluate(_png(tmp_path / "p.png", p), _png(tmp_path / "t.png", t), overlay=False)
    assert ev.classes == ["0", "1", "2"]  # no names: the ids found
