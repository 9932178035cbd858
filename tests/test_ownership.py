"""An output is owned: ``--resume``/``--overwrite`` never touch data segment did not write.

Each test checks the refusal and that every byte of the other store (or of the
input) is unchanged afterwards.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from semdask.cli.main import main
from semdask.errors import ForeignOutputError, UnsafePathError
from semdask.inference.segment import segment
from semdask.storage import arrays as sarr
from semdask.storage import io as sio
from semdask.storage.ledger import verify, written_by_segment
from semdask.storage.lock import lock_path
from semdask.storage.ownership import check_output, foreign_nodes
from semdask.synthetic.sem import synthetic_mosaic


def _synth(p: Path, shape: tuple[int, int], seed: int) -> Path:
    sio.write_synthetic(p, synthetic_mosaic(shape, seed=seed, chunk=256))
    return p


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("stores")
    return {"a": _synth(d / "a.ome.zarr", (300, 420), 5),
            "same": _synth(d / "same.ome.zarr", (300, 420), 6),
            "other": _synth(d / "other.ome.zarr", (256, 320), 7)}


@pytest.fixture
def work(stores: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    out = {}
    for k, p in stores.items():
        out[k] = tmp_path / p.name
        shutil.copytree(p, out[k])
    return out


def _digest(store: Path) -> dict[str, str]:
    """Every file of a store and its SHA-256 (the whole store, byte for byte)."""
    return {str(f.relative_to(store)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(store.rglob("*")) if f.is_file()}


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["segment", *args, "--chunks", "128", "--no-cluster"])
    return r.exit_code, r.output


# ------------------------------------------------------------------ item 1: foreign stores


@pytest.mark.parametrize("target", ["other", "same"])  # another shape / the same shape
@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_resume_or_overwrite_into_another_mosaic_is_refused(work: dict[str, Path],
                                                            model_file: Path, target: str,
                                                            flag: str) -> None:
    a, b = work["a"], work[target]
    before = _digest(b)
    code, out = _cli(str(a), "--output", str(b), "--model", str(model_file), flag)
    assert code == 2, out
    assert f"output {b}" in out and "did not create" in out and "Traceback" not in out
    assert f"semdask segment {b}" in out  # how to segment that mosaic into its own labels
    assert _digest(b) == before  # image, truth labels and EDS maps untouched
    assert not lock_path(b).exists()
    with pytest.raises(ForeignOutputError):
        segment(a, output=b, model=model_file, chunk=128, progress=False, resume=True)
    assert _digest(b) == before


def test_a_mosaic_segmented_in_place_is_still_not_anothers_output(work: dict[str, Path],
                                                                  model_file: Path) -> None:
    a, b = work["a"], work["same"]
    segment(b, model=model_file, chunk=128, progress=False)  # b/labels/phases is segment's
    before = _digest(b)
    for flag in ("resume", "overwrite"):
        with pytest.raises(ForeignOutputError, match="did not create"):
            segment(a, output=b, model=model_file, chunk=128, progress=False, **{flag: True})
    assert _digest(b) == before and verify(b).ok


def test_batch_with_a_wrong_manifest_line_leaves_the_other_mosaic_alone(
        work: dict[str, Path], model_file: Path) -> None:
    a, b = work["a"], work["other"]
    before = _digest(b)
    (a.parent / "list.txt").write_text(f"{a.name} {b.name}\n{a.name}\n")
    r = CliRunner().invoke(main, ["batch", str(a.parent / "list.txt"), "--model",
                                  str(model_file), "--chunks", "128", "--no-cluster"])
    assert r.exit_code == 1, r.output
    assert f"{a}: failed" in r.output and "did not create" in r.output
    assert f"{a}: done" in r.output  # the good line still ran
    assert _digest(b) == before


def test_own_copy_resumes_and_a_copy_of_another_input_is_replaced_only_whole(
        work: dict[str, Path], model_file: Path) -> None:
    a, same = work["a"], work["same"]
    c = a.parent / "c.ome.zarr"
    segment(a, output=c, model=model_file, chunk=128, progress=False)
    assert check_output(sio.open_mosaic(a), c, groups=["labels/phases"]).kind == "copy"
    r = segment(a, output=c, model=model_file, chunk=128, progress=False, resume=True)
    assert r.up_to_date
    # the same store as output of another input (same shape): never resumed ...
    before = _digest(c)
    with pytest.raises(ForeignOutputError, match="another input") as e:
        segment(same, output=c, model=model_file, chunk=128, progress=False, resume=True)
    assert "--overwrite" in str(e.value)
    assert _digest(c) == before
    # ... replaced whole with --overwrite, but not while it holds data segment did not write
    sio.write_labels(c, np.ones((300, 420), np.uint8), name="manual", classes=["x", "y"])
    assert foreign_nodes(c) == ["labels/manual"]
    before = _digest(c)
    with pytest.raises(ForeignOutputError, match="labels/manual"):
        segment(same, output=c, model=model_file, chunk=128, progress=False, overwrite=True)
    assert _digest(c) == before
    shutil.rmtree(c / "labels" / "manual")
    r = segment(same, output=c, model=model_file, chunk=128, progress=False, overwrite=True)
    assert r.blocks_computed == r.blocks_total and verify(c).ok
    np.testing.assert_array_equal(sio.open_mosaic(c).image.compute(),
                                  sio.open_mosaic(same).image.compute())


# ------------------------------------------------------------------ item 2: inside the input


@pytest.mark.parametrize("sub", ["labels", "0", "labels/truth", "eds", "new/x.ome.zarr"])
def test_output_inside_the_input_is_refused(work: dict[str, Path], model_file: Path,
                                            sub: str) -> None:
    a = work["a"]
    before = _digest(a)
    code, out = _cli(str(a), "--output", str(a / sub), "--model", str(model_file),
                     "--overwrite")
    assert code == 2, out
    assert "a path inside it" in out and "Traceback" not in out
    assert _digest(a) == before  # level 0 and labels/truth intact
    np.testing.assert_array_equal(sio.open_labels(a, "truth").data.compute(),
                                  sio.open_labels(work["a"], "truth").data.compute())


def test_output_around_the_input_relative_or_through_a_symlink_is_refused(
        work: dict[str, Path], model_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = work["a"]
    before = _digest(a)
    monkeypatch.chdir(a.parent)
    (a.parent / "link").symlink_to(a / "labels")
    for out, why in (("a.ome.zarr/labels", "a path inside it"),
                     ("link", "a path inside it"),
                     (".", "a directory holding the input"),
                     ("./x/../a.ome.zarr/0", "a path inside it")):
        with pytest.raises(ForeignOutputError, match=why):
            segment("a.ome.zarr", output=out, model=model_file, chunk=128, progress=False,
                    overwrite=True)
    b = work["other"]
    with pytest.raises(ForeignOutputError, match=f"inside the Zarr store {b}"):
        segment(a, output=b / "labels", model=model_file, chunk=128, progress=False,
                overwrite=True)
    assert _digest(a) == before
    # the input itself, spelled relatively: its own labels (the default) still work
    r = segment("a.ome.zarr", output="./a.ome.zarr", model=model_file, chunk=128,
                progress=False)
    assert r.blocks_computed == r.blocks_total and verify(a).ok
    assert {k: v for k, v in _digest(a).items() if k.startswith("labels/truth")} == \
        {k: v for k, v in before.items() if k.startswith("labels/truth")}


def test_labels_segment_did_not_write_are_never_replaced(work: dict[str, Path],
                                                         model_file: Path) -> None:
    a = work["a"]
    assert not written_by_segment(a, "labels/truth")
    before = _digest(a)
    for flags in (["--overwrite"], ["--resume"], []):
        code, out = _cli(str(a), "--name", "truth", "--model", str(model_file), *flags)
        assert code == 2, out
        assert "labels/truth" in out and "never replace" in out and "--name truth-seg" in out
    assert _digest(a) == before
    r = segment(a, model=model_file, chunk=128, progress=False, probs=True)
    assert written_by_segment(a, "labels/phases") and written_by_segment(a, "probs")
    r = segment(a, model=model_file, chunk=128, progress=False, probs=True, overwrite=True)
    assert r.blocks_computed == r.blocks_total  # its own labels: replaced on request


def test_an_image_group_of_another_tool_is_never_replaced(work: dict[str, Path],
                                                          model_file: Path) -> None:
    a = work["a"]
    sio.write_extra_image(a, "confidence", np.ones((300, 420), np.float32) / 2)
    before = _digest(a)
    with pytest.raises(ForeignOutputError, match="confidence"):
        segment(a, model=model_file, chunk=128, progress=False, confidence=True,
                overwrite=True)
    assert _digest(a) == before


# ------------------------------------------------------------------ verify's suggested fix


def test_verify_never_suggests_overwriting_foreign_labels(work: dict[str, Path],
                                                          model_file: Path) -> None:
    a = work["a"]
    before = _digest(a)
    r = CliRunner().invoke(main, ["verify", str(a), "--labels", "truth"])
    assert r.exit_code == 3 and "no ledger" in r.output, r.output
    assert "was not written by semdask segment" in r.output
    assert f"semdask segment {a}" not in r.output  # no command that writes labels/truth
    a_fix = verify(a, "truth").fix()
    assert "--name truth" not in a_fix and "--resume" not in a_fix
    # the fix it used to print is refused too, and truth stays as it is
    code, out = _cli(str(a), "--name", "truth", "--resume", "--model", str(model_file))
    assert code == 2, out
    assert _digest(a) == before
    # segment's own labels: the fix is a resume of this very output
    segment(a, model=model_file, chunk=128, progress=False)
    (a / "labels/phases/.semdask-ledger/b.0.0.json").unlink()
    fix = verify(a).fix()
    assert fix == f"semdask segment {a} --resume"
    code, out = _cli(*fix.split()[2:], "--model", str(model_file))
    assert code == 0, out
    assert verify(a).ok


def test_verify_fix_of_a_copy_names_its_source_not_a_converted_file(
        work: dict[str, Path], model_file: Path) -> None:
    a = work["a"]
    sarr.update_attrs(a, "", {"source": "/data/scan.tif"})  # as semdask convert records it
    c = a.parent / "c.ome.zarr"
    segment(a, model=model_file, chunk=128, progress=False)
    segment(a, output=c, model=model_file, chunk=128, progress=False)
    for store in (a, c):
        (store / "labels/phases/.semdask-ledger/b.0.0.json").unlink()
    assert verify(a).fix() == f"semdask segment {a} --resume"
    assert verify(c).fix() == f"semdask segment {a} --output {c} --resume"


def test_unfinished_copy_needs_a_flag_and_is_rewritten(work: dict[str, Path],
                                                      model_file: Path) -> None:
    a = work["a"]
    c = a.parent / "c.ome.zarr"
    segment(a, output=c, model=model_file, chunk=128, progress=False)
    sarr.set_complete(c, "", False)  # its image copy was interrupted
    m = sio.open_mosaic(a)
    with pytest.raises(UnsafePathError, match="unfinished copy"):
        check_output(m, c, groups=["labels/phases"])
    assert check_output(m, c, groups=["labels/phases"], resume=True).kind == "replace"
    r = segment(a, output=c, model=model_file, chunk=128, progress=False, resume=True)
    assert r.blocks_computed == r.blocks_total and verify(c).ok
