"""Issue 10 items 4-7: readers check the ledger, every pyramid level is verified and
repaired, tiny mosaics are fast, damaged weights are refused.

One mosaic (528 x 600 px: two pyramid levels) is segmented once with a tiny model
(chunk 256: 2 x 2 blocks at level 0, 2 x 2 shards at level 1) and copied by each test,
which then damages the copy the way a user's disk or a careless ``rm`` would.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from semdask.cli.main import main
from semdask.errors import DamagedOutputError, ModelError, StoreError
from semdask.inference.graph import symmetric_pad
from semdask.inference.segment import segment
from semdask.nets import model as nm
from semdask.storage import io as sio
from semdask.storage.integrity import LEDGER, LEVELS
from semdask.storage.ledger import verify
from semdask.synthetic.sem import synthetic_mosaic

SHAPE = (528, 600)
KW = {"chunk": 256, "probs": True, "mode": "whole-chunk", "progress": False}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Segmented with the bundled model: real phases, so every shard holds varied labels."""
    p = tmp_path_factory.mktemp("clean") / "m.ome.zarr"
    sio.write_synthetic(p, synthetic_mosaic(SHAPE, seed=5, chunk=256))
    segment(p, **KW)
    return p


@pytest.fixture
def out(clean: Path, tmp_path: Path) -> Path:
    p = tmp_path / "m.ome.zarr"
    shutil.copytree(clean, p)
    return p


def _shard(p: Path, group: str = "labels/phases", level: int = 0, key: str = "0/1") -> Path:
    f = p / group / str(level) / "c" / key
    assert f.is_file(), f
    return f


def _flip(f: Path, where: float = 0.5) -> None:
    b = bytearray(f.read_bytes())
    b[int(len(b) * where)] ^= 0xFF
    f.write_bytes(bytes(b))


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, list(args))
    assert "Traceback" not in r.output, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exc_info
    return r.exit_code, r.output


def _refused(out: Path, code: int, text: str) -> None:
    assert code == 3, text
    assert "semdask: error:" in text and f"semdask verify {out}" in text, text
    assert f"semdask segment {out} --resume" in text, text


# ------------------------------------------------------------- readers (item 4)


def test_intact_output_reads_and_verifies(clean: Path) -> None:
    a = verify(clean)
    assert a.ok and a.blocks == 4 and not a.levels, a.table()
    lab = sio.open_labels(clean)
    assert lab.levels == 2 and lab.data.shape == SHAPE
    assert (lab.level(1).compute() == sio.open_array(clean, "labels/phases", 1)[:]).all()
    doc = (clean / "labels/phases" / LEDGER / LEVELS).read_text()
    assert '"labels/phases"' in doc and '"probs"' in doc


@pytest.mark.parametrize("damage", ["delete", "flip", "truncate"])
def test_damaged_label_shard_is_refused_by_every_reader(out: Path, damage: str,
                                                        tmp_path: Path) -> None:
    f = _shard(out)
    if damage == "delete":
        f.unlink()  # zarr would read the fill value: wrong fractions, exit 0
    elif damage == "flip":
        _flip(f)  # decodes, but to other data
    else:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # fails to decode
    with pytest.raises(DamagedOutputError, match=r"block 0,1 .* of labels/phases level 0"):
        sio.open_labels(out).data.compute()
    for args in (["fractions", str(out)],
                 ["evaluate", str(out), str(out), "--no-cluster"],
                 ["analyze", str(out), "--no-cluster", "--out", str(tmp_path / "an")],
                 ["preview", str(out), str(tmp_path / "p.png"), "--level", "0"]):
        code, text = _cli(*args)
        _refused(out, code, text)
    code, text = _cli("verify", str(out))
    assert code == 3 and "0,1" in text, text


def test_damaged_probs_shard_is_refused(out: Path) -> None:
    _flip(_shard(out, "probs", 0, "0/0/0"))
    with pytest.raises(DamagedOutputError, match="probs level 0"):
        sio.open_extra_image(out, "probs").compute()


def test_unrecorded_block_is_refused_at_open(out: Path) -> None:
    (out / "labels/phases" / LEDGER / "b.1.1.json").unlink()
    with pytest.raises(DamagedOutputError, match="1 of 4 blocks not recorded"):
        sio.open_labels(out)


def test_labels_without_a_ledger_read_as_they_are(out: Path) -> None:
    truth = sio.open_labels(out, "truth")
    assert truth.data.shape == SHAPE
    assert not truth.data.name.startswith("semdask-checked")  # no ledger: read as it is
    assert int(truth.data.max().compute()) <= 3


def test_repaired_output_reads_the_clean_labels(out: Path, clean: Path) -> None:
    _shard(out).unlink()
    r = segment(out, resume=True, **KW)
    assert r.blocks_computed == 1 and verify(out).ok
    np.testing.assert_array_equal(sio.open_labels(out).data.compute(),
                                  sio.open_labels(clean).data.compute())


# ------------------------------------------------------------- pyramid levels (item 5)


@pytest.mark.parametrize("damage", ["rewrite", "delete", "flip"])
def test_damaged_level_1_is_verified_refused_and_repaired(out: Path, clean: Path,
                                                          tmp_path: Path, damage: str) -> None:
    if damage == "rewrite":  # decodes fine, other values
        arr = sio.open_array(out, "labels/phases", 1, mode="r+")
        arr[10:20, 10:20] = (arr[10:20, 10:20] + 1) % 4
    elif damage == "delete":
        _shard(out, level=1, key="0/0").unlink()
    else:
        _flip(_shard(out, level=1, key="0/0"))
    a = verify(out)
    why = {"rewrite": "checksum mismatch", "delete": "missing shard",
           "flip": "unreadable (RuntimeError)"}[damage]
    assert not a.ok and not a.problems and a.levels == {"labels/phases level 1 shard 0,0": why}
    code, text = _cli("verify", str(out))
    assert code == 3 and "level 1 shard 0,0" in text and "--resume" in text, text
    code, text = _cli("preview", str(out), str(tmp_path / "p.png"), "--level", "1")
    _refused(out, code, text)
    r = segment(out, resume=True, **KW)
    assert (r.blocks_computed, r.up_to_date) == (0, False)
    assert verify(out).ok
    code, text = _cli("preview", str(out), str(tmp_path / "p.png"), "--level", "1")
    assert code == 0 and (tmp_path / "p.png").is_file(), text
    np.testing.assert_array_equal(sio.open_labels(out).level(1).compute(),
                                  sio.open_labels(clean).level(1).compute())
    r = segment(out, resume=True, **KW)
    assert r.up_to_date


def test_outputs_without_level_records_are_checked_against_level_0(out: Path) -> None:
    (out / "labels/phases" / LEDGER / LEVELS).unlink()  # as written by an older semdask
    assert verify(out).ok
    assert sio.open_labels(out).level(1).compute().shape == (264, 300)
    arr = sio.open_array(out, "labels/phases", 1, mode="r+")
    arr[5:9, 5:9] = (arr[5:9, 5:9] + 1) % 4
    a = verify(out)
    assert a.levels == {"labels/phases level 1 shard 0,0": "differs from level 0 downsampled"}


# ------------------------------------------------------------- tiny mosaics (item 6)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), pads=st.lists(st.integers(0, 40),
                                                               min_size=4, max_size=4),
       cy=st.integers(1, 4), cx=st.integers(1, 4))
def test_symmetric_pad_matches_numpy(h: int, w: int, pads: list[int], cy: int,
                                     cx: int) -> None:
    x = np.arange(h * w, dtype=np.int32).reshape(h, w)
    pad = [(pads[0], pads[1]), (pads[2], pads[3])]
    got = symmetric_pad(da.from_array(x, chunks=(cy, cx)), pad).compute()
    np.testing.assert_array_equal(got, np.pad(x, pad, mode="symmetric"))


def test_symmetric_pad_of_a_pixel_is_one_step_per_axis() -> None:
    x = symmetric_pad(da.ones((1, 1), dtype=np.uint8, chunks=1), [(112, 127), (112, 127)])
    assert x.shape == (240, 240) and len(x.dask.layers) <= 8  # was ~2 x 240 layers
    assert int(x.sum().compute()) == 240 * 240


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (2, 2), (15, 300)])
def test_tiny_mosaics_segment_in_both_modes(shape: tuple[int, int], tmp_path: Path,
                                            model_file: Path) -> None:
    p = tmp_path / "t.ome.zarr"
    img = np.random.default_rng(0).integers(0, 255, shape).astype(np.uint8)
    sio.write_image(p, da.from_array(img), pixel_size_um=0.04458)
    base = ["segment", str(p), "--model", str(model_file), "--no-cluster"]
    code, text = _cli(*base, "--mode", "whole-chunk")
    assert code == 0, text
    assert sio.open_labels(p).data.compute().shape == shape and verify(p).ok
    code, text = _cli(*base, "--mode", "window", "--overwrite")
    if min(shape) >= 64:  # the model's window
        assert code == 0, text
    else:  # smaller than one window: refused with the fix, never a hang
        assert code == 2 and "--mode whole-chunk" in text, text


# ------------------------------------------------------------- weights (item 7)


def _copy_model(src: Path, dst: Path, *, sidecar: bool = True) -> Path:
    shutil.copy(src, dst)
    if sidecar:
        shutil.copy(src.with_suffix(".yaml"), dst.with_suffix(".yaml"))
    return dst


def test_bundled_model_passes_its_recorded_hash() -> None:
    _, cfg = nm.load_model(nm.bundled_model_path())
    assert cfg.n_classes == 4


@pytest.mark.parametrize("sidecar", [True, False])
def test_bit_flipped_weights_are_refused(model_file: Path, tmp_path: Path,
                                         sidecar: bool) -> None:
    bad = _copy_model(model_file, tmp_path / "bad.safetensors", sidecar=sidecar)
    _flip(bad, 0.9)  # inside the tensor data: loads fine, predicts garbage
    with pytest.raises(ModelError, match="damaged or altered") as e:
        nm.load_model(bad)
    assert str(bad) in str(e.value) and "save_model" in str(e.value)
    if sidecar:
        assert nm.model_hash(bad) in str(e.value)


def test_bit_flipped_bundled_copy_is_refused_by_segment(tmp_path: Path) -> None:
    bad = _copy_model(nm.bundled_model_path(), tmp_path / "soc.safetensors")
    _flip(bad, 0.7)
    p = tmp_path / "m.ome.zarr"
    sio.write_image(p, da.from_array(np.zeros((40, 40), np.uint8)), pixel_size_um=0.04458)
    code, text = _cli("segment", str(p), "--model", str(bad), "--no-cluster")
    assert code != 0 and "damaged or altered" in text and "SHA-256" in text, text
    assert nm.model_hash(bad) in text
    with pytest.raises(StoreError):
        sio.open_labels(p)  # nothing looks complete


def test_model_file_is_hashed_once_per_process(model_file: Path, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    m = _copy_model(model_file, tmp_path / "m.safetensors")
    calls: list[int] = []
    real = nm.hashlib.sha256

    def counting(*a: object) -> object:
        calls.append(1)
        return real(*a)

    monkeypatch.setattr(nm.hashlib, "sha256", counting)
    nm.get_model(m)
    first = len(calls)
    assert first >= 1
    for _ in range(5):
        nm.get_model(m)
        nm.model_hash(m)
    assert len(calls) == first
