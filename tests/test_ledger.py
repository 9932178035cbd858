"""Per-block ledger: records, run keys, resume of missing/stale blocks, verify, batch, watch."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from semdask.cli.main import main
from semdask.errors import InputError
from semdask.inference.batch import Item, read_manifest
from semdask.inference.segment import segment
from semdask.nets.model import ModelConfig, receptive_field, save_model
from semdask.nets.unet import UNet
from semdask.storage import arrays as sarr
from semdask.storage import io as sio
from semdask.storage.integrity import block_slices, checksum
from semdask.storage.ledger import Ledger, run_key, verify
from semdask.synthetic.sem import COLOURS, PHASES, synthetic_mosaic


def _model(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    m = UNet(widths=(4, 4, 8, 8, 8), dropout=(0, 0, 0, 0, 0))
    cfg = ModelConfig(kwargs=m.kwargs(), classes=list(PHASES), colours=list(COLOURS),
                      pixel_size_um=0.04458, window=64, receptive_field=receptive_field(m))
    return save_model(m, cfg, path)



@pytest.fixture(scope="module", autouse=True)
def _window(window_mode: None) -> None:
    """These tests count blocks of the blended-window geometry (chunk 64 on the stride grid)."""


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model(tmp_path_factory.mktemp("model") / "tiny.safetensors", 3)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> Path:
    """A mosaic segmented once (chunk 64: 4 x 5 = 20 blocks), copied by the tests."""
    p = tmp_path_factory.mktemp("clean") / "m.ome.zarr"
    sio.write_synthetic(p, synthetic_mosaic((300, 420), seed=5, chunk=256))
    segment(p, model=model_file, chunk=64, probs=True, progress=False)
    return p


@pytest.fixture
def done(clean: Path, tmp_path: Path) -> Path:
    p = tmp_path / "m.ome.zarr"
    shutil.copytree(clean, p)
    return p


def _labels(p: Path, name: str = "phases") -> np.ndarray:
    return np.asarray(sio.open_labels(p, name).data.compute())


def _kw(model_file: Path) -> dict:
    return {"model": model_file, "chunk": 64, "probs": True, "progress": False}


def test_every_block_is_recorded_with_its_checksums(clean: Path) -> None:
    led = Ledger(clean, "labels/phases")
    head, recs = led.header(), led.records()
    assert head is not None and head["outputs"] == ["labels/phases", "probs"]
    blocks = block_slices(head["chunks"])
    assert len(blocks) == 20 and set(recs) == set(blocks)
    lab = sio.open_array(clean, "labels/phases")
    for idx, rec in recs.items():
        (y0, y1), (x0, x1) = rec["slice"]
        assert rec["key"] == head["key"] and rec["status"] == "done"
        assert rec["checksums"]["labels/phases"] == checksum(lab[y0:y1, x0:x1])
        assert tuple(map(tuple, rec["slice"])) == blocks[idx]
    a = verify(clean)
    assert a.ok and a.blocks == 20, a.table()
    # the ledger group does not disturb OME readers
    assert _labels(clean).shape == (300, 420)


def test_run_key_changes_with_each_ingredient() -> None:
    base = {"identity": {"path": "a", "shape": [3, 4]}, "model_sha": "m", "plan": {"w": 64},
            "precision": "fp32", "stats": {"low": 0}, "outputs": ["labels/phases"]}
    k0 = run_key(base["identity"], model_sha="m", plan={"w": 64}, precision="fp32",
                 stats={"low": 0}, outputs=["labels/phases"])
    assert k0 == run_key({"shape": [3, 4], "path": "a"}, model_sha="m", plan={"w": 64},
                         precision="fp32", stats={"low": 0}, outputs=["labels/phases"])
    moved = run_key({"path": "b", "shape": [3, 4]}, model_sha="m", plan={"w": 64},
                    precision="fp32", stats={"low": 0}, outputs=["labels/phases"])
    assert moved == k0  # content, not location, identifies the input
    variants = [
        run_key({"path": "a", "shape": [3, 5]}, model_sha="m", plan={"w": 64}, precision="fp32",
                stats={"low": 0}, outputs=["labels/phases"]),
        run_key(base["identity"], model_sha="n", plan={"w": 64}, precision="fp32",
                stats={"low": 0}, outputs=["labels/phases"]),
        run_key(base["identity"], model_sha="m", plan={"w": 128}, precision="fp32",
                stats={"low": 0}, outputs=["labels/phases"]),
        run_key(base["identity"], model_sha="m", plan={"w": 64}, precision="bf16",
                stats={"low": 0}, outputs=["labels/phases"]),
        run_key(base["identity"], model_sha="m", plan={"w": 64}, precision="fp32",
                stats={"low": 1}, outputs=["labels/phases"]),
        run_key(base["identity"], model_sha="m", plan={"w": 64}, precision="fp32",
                stats={"low": 0}, outputs=["labels/phases", "probs"]),
        run_key(base["identity"], model_sha="m", plan={"w": 64}, precision="fp32",
                stats={"low": 0}, outputs=["labels/phases"], version="9.9"),
    ]
    assert len({k0, *variants}) == 8


def test_resume_recomputes_only_missing_blocks(done: Path, clean: Path,
                                               model_file: Path) -> None:
    led = Ledger(done, "labels/phases")
    for f in sorted(led.dir.glob("b.*.json"))[:3]:
        f.unlink()
    sarr.set_complete(done, "labels/phases", False)
    a = verify(done)
    assert not a.ok and len(a.problems) == 3 and "labels/phases" in a.incomplete
    assert set(a.problems.values()) == {"not recorded"}
    r = segment(done, resume=True, **_kw(model_file))
    assert (r.blocks_total, r.blocks_computed, r.up_to_date) == (20, 3, False)
    assert verify(done).ok
    np.testing.assert_array_equal(_labels(done), _labels(clean))
    np.testing.assert_array_equal(sio.open_extra_image(done, "probs").compute(),
                                  sio.open_extra_image(clean, "probs").compute())


def test_resume_of_a_finished_output_does_nothing(done: Path, model_file: Path) -> None:
    shard = next((done / "labels/phases/0/c").rglob("*"))
    before = {f: f.stat().st_mtime_ns for f in (done / "labels").rglob("*") if f.is_file()}
    r = segment(done, resume=True, **_kw(model_file))
    assert r.up_to_date and r.blocks_computed == 0 and shard.exists()
    after = {f: f.stat().st_mtime_ns for f in (done / "labels").rglob("*") if f.is_file()}
    assert after == before  # nothing rewritten


def test_changed_model_or_geometry_invalidates_every_block(done: Path, model_file: Path,
                                                           tmp_path: Path) -> None:
    r = segment(done, resume=True, **{**_kw(model_file), "chunk": 128})
    assert r.blocks_computed == r.blocks_total == 9
    other = _model(tmp_path / "other.safetensors", 4)
    r = segment(done, resume=True, **{**_kw(model_file), "chunk": 128, "model": other})
    assert r.blocks_computed == r.blocks_total == 9
    assert Ledger(done, "labels/phases").header()["model"] == r.model_sha256
    assert verify(done).ok


def test_corrupt_block_is_found_and_recomputed(done: Path, clean: Path,
                                               model_file: Path) -> None:
    lab = sio.open_array(done, "labels/phases", mode="r+")
    lab[100:110, 200:210] = (lab[100:110, 200:210] + 1) % 4  # inside block (1, 2)
    a = verify(done)
    assert a.problems == {(1, 2): "checksum mismatch labels/phases"}, a.table()
    assert "semdask segment" in a.fix() and "--resume" in a.fix()
    r = segment(done, resume=True, **_kw(model_file))
    assert r.blocks_computed == 1
    np.testing.assert_array_equal(_labels(done), _labels(clean))


def test_cli_verify_exit_codes(done: Path) -> None:
    run = CliRunner().invoke
    r = run(main, ["verify", str(done)])
    assert r.exit_code == 0, r.output
    assert "OK, 20 blocks" in r.output
    (done / "labels/phases/.semdask-ledger/b.0.0.json").unlink()
    r = run(main, ["verify", str(done)])
    assert r.exit_code == 3
    assert "not recorded" in r.output and f"semdask segment {done} --resume" in r.output
    r = run(main, ["verify", str(done), "--labels", "truth"])
    assert r.exit_code == 3 and "no ledger" in r.output
    r = run(main, ["verify", str(done), "--labels", "nope"])
    assert r.exit_code != 0 and "nope" in r.output


def test_manifest_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a.ome.zarr\n\n# skip\nb.ome.zarr out/b.ome.zarr m.st\n")
    (tmp_path / "a.csv").write_text("mosaic,output,model\na.ome.zarr,,\nb.ome.zarr,o.ome.zarr,\n")
    (tmp_path / "a.yaml").write_text("- a.ome.zarr\n- {mosaic: b.ome.zarr, model: m.st}\n")
    t = read_manifest(tmp_path / "a.txt")
    assert t == [Item(tmp_path / "a.ome.zarr"),
                 Item(tmp_path / "b.ome.zarr", tmp_path / "out/b.ome.zarr", tmp_path / "m.st")]
    c = read_manifest(tmp_path / "a.csv")
    assert c[1] == Item(tmp_path / "b.ome.zarr", tmp_path / "o.ome.zarr")
    y = read_manifest(tmp_path / "a.yaml")
    assert y[1] == Item(tmp_path / "b.ome.zarr", None, tmp_path / "m.st")
    (tmp_path / "bad.csv").write_text("path\nx\n")
    with pytest.raises(InputError, match="mosaic"):
        read_manifest(tmp_path / "bad.csv")


def test_batch_is_idempotent(tmp_path: Path, clean: Path, model_file: Path) -> None:
    a, b = tmp_path / "a.ome.zarr", tmp_path / "b.ome.zarr"
    shutil.copytree(clean, a)
    sio.write_synthetic(b, synthetic_mosaic((300, 420), seed=6, chunk=256))
    (tmp_path / "list.txt").write_text("a.ome.zarr\nb.ome.zarr out/b.ome.zarr\n"
                                       "missing.ome.zarr\n")
    args = ["batch", str(tmp_path / "list.txt"), "--model", str(model_file), "--chunks", "64",
            "--probs", "--no-cluster"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1, r.output  # missing.ome.zarr failed, loudly
    assert f"{a}: skipped, up to date" in r.output
    assert f"{b}: done (20 of 20 blocks" in r.output and "missing.ome.zarr: failed" in r.output
    assert verify(tmp_path / "out/b.ome.zarr").ok
    (tmp_path / "list.txt").write_text("a.ome.zarr\nb.ome.zarr out/b.ome.zarr\n")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert r.output.count("skipped, up to date") == 2 + 1  # two lines + the summary


def test_watch_once_segments_complete_mosaics_only(tmp_path: Path, clean: Path,
                                                   model_file: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    sio.write_synthetic(inbox / "new.ome.zarr", synthetic_mosaic((300, 420), seed=7, chunk=256))
    shutil.copytree(clean, inbox / "copying.ome.zarr")
    sarr.set_complete(inbox / "copying.ome.zarr", "", False)  # a writer still busy
    args = ["watch", str(inbox), "--once", "--model", str(model_file), "--chunks", "128",
            "--no-cluster", "--output-dir", str(tmp_path / "out")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert "new.ome.zarr: done (9 of 9 blocks" in r.output and "copying" not in r.output
    assert verify(tmp_path / "out/new.ome.zarr").ok
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "new.ome.zarr: skipped, up to date" in r.output, r.output


def test_ledger_header_is_a_zarr_group(clean: Path) -> None:
    meta = json.loads((clean / "labels/phases/.semdask-ledger/zarr.json").read_text())
    assert meta["node_type"] == "group" and meta["zarr_format"] == 3
    assert len(meta["attributes"]["semdask-ledger"]["key"]) == 64
