"""The typed run description: one precedence, validation before anything is written (issue 11)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import dask
import numpy as np
import pytest
from click.testing import CliRunner

from semdask.cli.main import main
from semdask.errors import InputError, UnsafePathError
from semdask.inference.graph import plan_inference
from semdask.inference.rescale import rescaled_probs
from semdask.inference.run import SegmentRun, resolve
from semdask.inference.settings import (
    MAX_CHUNK,
    Blend,
    Mode,
    Precision,
    check_settings,
    choices,
    resolve_settings,
)
from semdask.nets.model import load_model
from semdask.storage import arrays as sarr
from semdask.storage import io as sio
from semdask.synthetic.sem import synthetic_mosaic


@pytest.fixture
def mosaic(tmp_path: Path) -> Path:
    p = tmp_path / "m.ome.zarr"
    sio.write_synthetic(p, synthetic_mosaic((160, 192), seed=4, chunk=96))
    return p


def _tree(p: Path) -> set[str]:
    return {str(q.relative_to(p)) for q in p.rglob("*")}


# ------------------------------------------------------------------ precedence
def test_precedence_argument_run_config_dask_config_model_default(model_file: Path) -> None:
    _, cfg = load_model(model_file)  # window 64
    assert resolve_settings().window == 256  # packaged default, no model
    s = resolve_settings(model_config=cfg)
    assert (s.window, s.sources["window"]) == (64, "model file")
    with dask.config.set({"semdask.segment.window": 128}):
        s = resolve_settings(model_config=cfg)
        assert (s.window, s.sources["window"]) == (128, "dask.config")
        s = resolve_settings(model_config=cfg, run_config={"window": 192})
        assert (s.window, s.sources["window"]) == (192, "run config")
        s = resolve_settings(model_config=cfg, run_config={"window": 192}, window=32)
        assert (s.window, s.sources["window"]) == (32, "argument")


def test_a_config_value_equal_to_the_packaged_one_is_the_default(model_file: Path) -> None:
    _, cfg = load_model(model_file)
    with dask.config.set({"semdask.segment.window": 256}):
        assert resolve_settings(model_config=cfg).window == 64  # the model's


def test_run_config_file_and_spellings(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text("segment:\n  chunks: 512\n  batch-size: 8\n  mode: window\n")
    s = resolve_settings(run_config=f)
    assert (s.chunk, s.batch_size, s.mode) == (512, 8, Mode.WINDOW)
    assert s.sources["chunk"] == "run config"
    f.write_text("windw: 512\n")
    with pytest.raises(InputError, match=r"windw.*remove the key or correct its spelling"):
        resolve_settings(run_config=f)


def test_bad_environment_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    with dask.config.set({"semdask.segment.chunks": "huge"}), \
            pytest.raises(InputError, match=r"DASK_SEMDASK__SEGMENT__CHUNKS.*--chunks"):
        resolve_settings()


@pytest.mark.parametrize(("kw", "match"), [
    ({"chunk": 100_000_000}, f"16 to {MAX_CHUNK}"),
    ({"chunk": 0}, "chunks"),
    ({"batch_size": 0}, "batch-size.*1 to"),
    ({"batch_size": -3}, "batch-size"),
    ({"window": 100}, "multiple of 16.*--window 256"),
    ({"window": 100_000}, "window"),
    ({"overlap": 1.0}, r"\[0, 1\)"),
    ({"overlap": -0.1}, "overlap"),
    ({"mode": "tiles"}, "window, whole-chunk"),
    ({"blend": "linear"}, "gaussian, cosine, uniform"),
    ({"precision": "fp8"}, "fp32, bf16, fp16"),
    ({"device": "gpu"}, "--device auto"),
    ({"probs": "maybe"}, "true or false"),
])
def test_settings_out_of_range_are_refused_with_the_fix(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match=match) as e:
        resolve_settings(**kw)
    assert "Fix:" in str(e.value)


def test_choices_are_shared_with_the_cli() -> None:
    params = {p.name: p for p in main.commands["segment"].params}
    assert list(params["mode"].type.choices) == choices(Mode)  # type: ignore[attr-defined]
    assert list(params["blend"].type.choices) == choices(Blend)  # type: ignore[attr-defined]
    assert list(params["precision"].type.choices) == choices(Precision)  # type: ignore[attr-defined]
    assert choices(Mode) == ["window", "whole-chunk"]


# ------------------------------------------------------------------ resolve
def test_resolve_is_frozen_and_complete(mosaic: Path, model_file: Path) -> None:
    run = resolve(mosaic, model=model_file, mode="window", probs=True, uncertainty=True)
    assert isinstance(run, SegmentRun) and run.inside and run.factor == 1.0
    assert run.written == ["labels/phases", "probs", "entropy"]
    assert run.plan.window == 64 and run.inner is run.plan
    with pytest.raises(AttributeError):
        run.name = "other"  # type: ignore[misc]


def test_rescaling_builds_the_model_scale_plan_once(tmp_path: Path, model_file: Path) -> None:
    p = tmp_path / "coarse.ome.zarr"
    m = synthetic_mosaic((96, 128), seed=1, chunk=64)
    sio.write_image(p, m.image, pixel_size_um=2 * 0.04458)
    run = resolve(p, model=model_file, mode="window")
    assert run.factor == pytest.approx(2.0)
    assert run.inner.shape == (192, 256) and run.plan_key["model_scale_plan"] == \
        run.inner.to_dict()
    stats = sio.open_mosaic(p)
    from semdask.inference.normalise import compute_stats

    st = compute_stats(stats.image, 0.5, 99.5)
    wrong = plan_inference((100, 100), **run.settings.plan_kwargs(run.members.config
                                                                  .receptive_field))
    with pytest.raises(InputError, match="model-scale shape"):
        rescaled_probs(stats.image, str(model_file), factor=run.factor, n_classes=4,
                       stats=st, plan_kwargs={}, plan=wrong)


@pytest.mark.parametrize(("kw", "err", "match"), [
    ({"precision": "fp16", "device": "cpu"}, InputError, "--precision bf16"),
    ({"name": "../evil"}, InputError, "--name phases"),
    ({"name": ""}, InputError, "name"),
    ({"chunk": 10**9}, InputError, "--chunks 2048"),
    ({"batch_size": 0}, InputError, "--batch-size 16"),
])
def test_resolve_refuses_before_anything_is_written(mosaic: Path, model_file: Path,
                                                    tmp_path: Path, kw: dict[str, Any],
                                                    err: type[Exception], match: str) -> None:
    before = _tree(mosaic)
    out = tmp_path / "out.ome.zarr"
    from semdask.inference.segment import segment

    with pytest.raises(err, match=match):
        segment(mosaic, model=model_file, output=out, progress=False, **kw)
    assert not out.exists() and _tree(mosaic) == before


def test_cuda_device_without_cuda_is_refused_first(mosaic: Path, model_file: Path,
                                                   tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "o.ome.zarr"
    with pytest.raises(InputError, match=r"without CUDA.*--device auto"):
        resolve(mosaic, model=model_file, output=out, device="cuda:1")
    assert not out.exists()


def test_existing_output_needs_overwrite_or_resume(mosaic: Path, model_file: Path,
                                                   tmp_path: Path) -> None:
    from semdask.inference.segment import segment

    segment(mosaic, model=model_file, progress=False)
    with pytest.raises(UnsafePathError, match=r"--overwrite.*--resume"):
        resolve(mosaic, model=model_file)
    assert resolve(mosaic, model=model_file, resume=True).resume
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("mine")
    with pytest.raises(UnsafePathError, match="not a Zarr store"):
        resolve(mosaic, model=model_file, output=plain, overwrite=True)
    assert (plain / "notes.txt").read_text() == "mine"
    with pytest.raises(UnsafePathError, match="is a file"):
        resolve(mosaic, model=model_file, output=plain / "notes.txt" / "o.ome.zarr")


def test_read_only_location_is_refused(mosaic: Path, model_file: Path, tmp_path: Path) -> None:
    import os

    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(UnsafePathError, match="read-only"):
            resolve(mosaic, model=model_file, output=ro / "o.ome.zarr")
    finally:
        ro.chmod(0o700)


def test_overlap_in_whole_chunk_mode_warns(mosaic: Path, model_file: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="semdask"):
        run = resolve(mosaic, model=model_file, mode="whole-chunk", overlap=0.5)
    assert run.plan.mode == "whole-chunk"
    assert "--overlap has no effect in whole-chunk mode" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="semdask"):
        resolve(mosaic, model=model_file, mode="whole-chunk")
    assert "no effect" not in caplog.text


def test_batch_checks_settings_once_before_the_first_mosaic(mosaic: Path) -> None:
    from semdask.inference.batch import Item, run_batch

    before = _tree(mosaic)
    with pytest.raises(InputError, match="chunks"):
        run_batch([Item(mosaic)], chunk=10**8)
    assert _tree(mosaic) == before
    assert check_settings(name="x", chunk=512, interval=3).chunk == 512


def test_robustness_uses_the_same_resolution(mosaic: Path, model_file: Path) -> None:
    from semdask.analysis.robustness import robustness

    with pytest.raises(InputError, match="batch-size"):
        robustness(mosaic, model=model_file, batch_size=0)
    r = robustness(mosaic, model=model_file, blur=(), brightness=(), noise=(),
                   magnification=(), rescale_gain=False, tiles=1, tile=96, mode="window",
                   precision="bf16")
    assert r.meta["settings"]["precision"] == "bf16" and r.meta["settings"]["window"] == "64"


def test_cli_logs_the_configured_window(mosaic: Path, model_file: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """DASK_SEMDASK__SEGMENT__WINDOW=512 semdask segment --mode window logs window 512."""
    big = mosaic.with_name("big.ome.zarr")
    sio.write_synthetic(big, synthetic_mosaic((512, 544), seed=4, chunk=256))
    monkeypatch.setenv("DASK_SEMDASK__SEGMENT__WINDOW", "128")
    dask.config.refresh()
    try:
        res = CliRunner().invoke(main, ["-v", "segment", str(big), "--model", str(model_file),
                                        "--mode", "window", "--no-cluster", "--chunks", "512"])
    finally:
        monkeypatch.delenv("DASK_SEMDASK__SEGMENT__WINDOW")
        dask.config.refresh()
    assert res.exit_code == 0, res.output
    assert "window=128 (dask.config)" in caplog.text and "window 128," in caplog.text
    lab = np.asarray(sio.open_labels(big, "phases").data.compute())
    assert lab.shape == (512, 544)
    prov = sarr.read_attrs(big, "labels/phases")["semdask"]["provenance"]
    assert prov["plan"]["window"] == 128
