"""End-to-end segmentation: zarr -> zarr through the CLI and the public function, bad input."""

from __future__ import annotations

import pickle
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from semdask.cli.main import main
from semdask.errors import IncompleteOutputError, InputError, ModelError, UnsafePathError
from semdask.inference.segment import segment
from semdask.nets.model import ModelConfig, receptive_field, save_model
from semdask.nets.unet import UNet
from semdask.storage import arrays as sarr
from semdask.storage import io as sio
from semdask.synthetic.sem import COLOURS, PHASES, synthetic_mosaic


@pytest.fixture
def mosaic(tmp_path: Path) -> Path:
    p = tmp_path / "m.ome.zarr"
    sio.write_synthetic(p, synthetic_mosaic((300, 420), seed=5, chunk=256))
    return p


def test_segment_writes_labels_probs_confidence(mosaic: Path, model_file: Path) -> None:
    r = segment(mosaic, model=model_file, chunk=128, probs=True, confidence=True, progress=False)
    lab = sio.open_labels(mosaic, "phases")
    assert lab.data.shape == (300, 420) and lab.data.dtype == np.uint8
    assert lab.classes == list(PHASES)
    probs = np.asarray(sio.open_extra_image(mosaic, "probs").compute()).astype(np.float32)
    conf = np.asarray(sio.open_extra_image(mosaic, "confidence").compute()).astype(np.float32)
    assert probs.shape == (4, 300, 420)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=4e-3)  # float16 storage
    np.testing.assert_array_equal(conf, probs.max(0))
    labels = np.asarray(lab.data.compute())
    agree = (labels == probs.argmax(0)).mean()
    assert agree > 0.99  # argmax of float16-rounded probs may flip near-ties
    prov = sarr.read_attrs(mosaic, "labels/phases")["semdask"]["provenance"]
    assert prov["model"]["sha256"] == r.model_sha256
    assert prov["plan"]["halo"] == r.plan.halo
    # chunk shards: every write was shard-aligned (the shard edge is the chunk edge)
    assert r.plan.chunk % r.plan.stride == 0


def test_labels_only_run_equals_run_with_probs(mosaic: Path, model_file: Path) -> None:
    """Without --probs/--confidence the argmax is fused into inference: same labels."""
    segment(mosaic, model=model_file, chunk=128, name="fused", progress=False)
    segment(mosaic, model=model_file, chunk=128, name="twostep", probs=True, progress=False,
            output=None)
    a = np.asarray(sio.open_labels(mosaic, "fused").data.compute())
    b = np.asarray(sio.open_labels(mosaic, "twostep").data.compute())
    np.testing.assert_array_equal(a, b)


def test_segment_is_chunk_invariant_end_to_end(mosaic: Path, model_file: Path,
                                               tmp_path: Path) -> None:
    segment(mosaic, model=model_file, chunk=64, name="a", progress=False)
    segment(mosaic, model=model_file, chunk=300, name="b", progress=False)
    a = sio.open_labels(mosaic, "a").data.compute()
    b = sio.open_labels(mosaic, "b").data.compute()
    np.testing.assert_array_equal(a, b)


def test_segment_output_elsewhere_is_self_contained(mosaic: Path, model_file: Path,
                                                    tmp_path: Path) -> None:
    out = tmp_path / "out.ome.zarr"
    segment(mosaic, model=model_file, output=out, chunk=128, progress=False)
    m = sio.open_mosaic(out)
    np.testing.assert_array_equal(m.image.compute(), sio.open_mosaic(mosaic).image.compute())
    assert sio.open_labels(out).data.shape == (300, 420)
    with pytest.raises(UnsafePathError, match="overwrite"):
        segment(mosaic, model=model_file, output=out, chunk=128, progress=False)


def test_cli_segment_fractions_preview(mosaic: Path, model_file: Path, tmp_path: Path) -> None:
    run = CliRunner().invoke
    r = run(main, ["segment", str(mosaic), "--model", str(model_file), "--chunks", "128",
                   "--no-cluster"])
    assert r.exit_code == 0, r.output
    assert "labels/phases" in r.output
    csv = tmp_path / "f.csv"
    r = run(main, ["fractions", str(mosaic), "--truth", "truth", "--csv", str(csv)])
    assert r.exit_code == 0, r.output
    assert "YSZ" in r.output and "truth %" in r.output
    rows = csv.read_text().splitlines()
    assert rows[0] == "label,name,pixels,fraction,area_um2" and len(rows) == 5
    fr = sum(float(line.split(",")[3]) for line in rows[1:])
    assert abs(fr - 1.0) < 1e-5
    png = tmp_path / "p.png"
    r = run(main, ["preview", str(mosaic), str(png)])
    assert r.exit_code == 0, r.output
    assert png.stat().st_size > 1000


def test_failed_run_leaves_incomplete_output(mosaic: Path, model_file: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import semdask.inference.graph as infer

    def boom(*a, **k):
        raise RuntimeError("worker died")

    monkeypatch.setattr(infer, "_chunk_task", boom)
    with pytest.raises(RuntimeError):
        segment(mosaic, model=model_file, chunk=128, progress=False)
    with pytest.raises(IncompleteOutputError, match="re-run"):
        sio.open_labels(mosaic, "phases")


def test_image_copy_beside_the_blocks_never_outlives_the_run(
        mosaic: Path, model_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--output: the copy's pixels are written beside the blocks; a failed copy fails the
    run (labels incomplete), and a failed run waits for the copy before its lock goes."""
    import threading
    import time

    import semdask.inference.graph as infer
    from semdask.inference import segment as seg
    from semdask.storage.lock import lock_path

    real = sio.begin_image
    threads: list[str] = []

    def failing(*a, **k):
        real(*a, **k)

        def fill():
            threads.append(threading.current_thread().name)
            raise OSError(28, "No space left on device")
        return fill

    monkeypatch.setattr(seg.sio, "begin_image", failing)
    out = tmp_path / "o1.ome.zarr"
    with pytest.raises(OSError, match="No space"):
        segment(mosaic, model=model_file, output=out, chunk=128, progress=False)
    assert threads and threads[0].startswith("semdask-copy")
    with pytest.raises(IncompleteOutputError):
        sio.open_labels(out, "phases")
    assert not lock_path(out).exists()

    def slow(*a, **k):
        fill = real(*a, **k)

        def later():
            time.sleep(0.5)  # still writing when the blocks fail
            return fill()
        return later

    def boom(*a, **k):
        raise RuntimeError("worker died")

    monkeypatch.setattr(seg.sio, "begin_image", slow)
    monkeypatch.setattr(infer, "_chunk_task", boom)
    out = tmp_path / "o2.ome.zarr"
    with pytest.raises(RuntimeError, match="worker died"):
        segment(mosaic, model=model_file, output=out, chunk=128, progress=False)
    assert not lock_path(out).exists()
    np.testing.assert_array_equal(sio.open_mosaic(out).image.compute(),  # finished first
                                  sio.open_mosaic(mosaic).image.compute())


def test_cli_bad_inputs_exit_nonzero(tmp_path: Path, mosaic: Path, model_file: Path) -> None:
    run = CliRunner().invoke
    r = run(main, ["segment", str(tmp_path / "missing.ome.zarr"), "--no-cluster"])
    assert r.exit_code != 0 and "missing.ome.zarr" in r.output
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    r = run(main, ["segment", str(mosaic), "--model", str(bad), "--no-cluster"])
    assert r.exit_code != 0 and "pickle" in r.output
    assert not (mosaic / "labels" / "phases").exists()


def test_image_smaller_than_window(tmp_path: Path, model_file: Path) -> None:
    p = tmp_path / "small.ome.zarr"
    sio.write_image(p, da.zeros((40, 500), dtype=np.uint8, chunks=40), pixel_size_um=0.05)
    with pytest.raises(InputError, match=r"at least one window.*--mode whole-chunk"):
        segment(p, model=model_file, progress=False, mode="window", window=64)
    assert not (p / "labels" / "phases").exists()
    # whole-chunk mode needs no window: the image is mirror-extended to the net's grid
    r = segment(p, model=model_file, progress=False, mode="whole-chunk")
    assert r.labels.endswith("phases") and r.shape == (40, 500)
    assert sio.open_labels(p, "phases").data.shape == (40, 500)


def test_nan_in_float_input(tmp_path: Path, model_file: Path) -> None:
    x = np.random.default_rng(0).random((200, 200)).astype(np.float32)
    x[10, 10] = np.nan
    p = tmp_path / "nan.ome.zarr"
    sio.write_image(p, da.from_array(x, chunks=100), pixel_size_um=0.05)
    with pytest.raises(InputError, match="NaN"):
        segment(p, model=model_file, progress=False)
    assert not (p / "labels" / "phases").exists()


def test_model_with_a_different_class_count(tmp_path: Path, mosaic: Path) -> None:
    torch.manual_seed(0)
    m = UNet(n_classes=3, widths=(4, 4, 8, 8, 8), dropout=(0, 0, 0, 0, 0))
    cfg = ModelConfig(kwargs=m.kwargs(), classes=["a", "b", "c"], colours=list(COLOURS[:3]),
                      n_classes=3, window=64, receptive_field=receptive_field(m))
    path = save_model(m, cfg, tmp_path / "three.safetensors")
    # tamper: the config claims four classes while the weights have three
    from safetensors.torch import load_file, save_file

    bad = cfg.model_copy(update={"classes": list(PHASES), "n_classes": 4,
                                 "kwargs": {**cfg.kwargs, "n_classes": 4}})
    save_file(load_file(str(path)), str(tmp_path / "bad.safetensors"),
              metadata={"semdask": bad.model_dump_json(), "format": "pt"})
    with pytest.raises(ModelError):
        segment(mosaic, model=tmp_path / "bad.safetensors", progress=False)
    assert not (mosaic / "labels" / "phases").exists()


def test_cli_segment_on_local_cluster_prints_dashboard(mosaic: Path, model_file: Path) -> None:
    r = CliRunner().invoke(main, ["segment", str(mosaic), "--model", str(model_file),
                                  "--chunks", "192", "--workers", "2",
                                  "--dashboard-address", "127.0.0.1:0", "--overwrite"])
    assert r.exit_code == 0, r.output
    assert "Dask dashboard: http://127.0.0.1:" in r.output
    a = np.asarray(sio.open_labels(mosaic).data.compute())
    segment(mosaic, model=model_file, chunk=64, name="threads", progress=False)
    np.testing.assert_array_equal(a, sio.open_labels(mosaic, "threads").data.compute())


def test_gpu_resources_annotate_only_the_inference_layer(mosaic: Path, model_file: Path) -> None:
    import dask

    from semdask.inference.graph import blended_probs, plan_inference
    from semdask.inference.normalise import NormStats

    img = sio.open_mosaic(mosaic).image
    plan = plan_inference(img.shape, window=64, chunk=128)
    with dask.annotate(resources={"GPU": 1}):
        p = blended_probs(img, str(model_file), n_classes=4, stats=NormStats(0, 255), plan=plan)
    layers = p.__dask_graph__().layers
    annotated = [k for k, v in layers.items() if (v.annotations or {}).get("resources")]
    assert any(k.startswith("semdask-infer") for k in annotated)


@pytest.mark.gpu
def test_segment_on_cuda_bf16_agrees_with_cpu(mosaic: Path, model_file: Path) -> None:
    segment(mosaic, model=model_file, chunk=128, name="cpu", device="cpu", progress=False)
    segment(mosaic, model=model_file, chunk=128, name="gpu", device="cuda", precision="bf16",
            batch_size=16, progress=False)
    a = np.asarray(sio.open_labels(mosaic, "cpu").data.compute())
    b = np.asarray(sio.open_labels(mosaic, "gpu").data.compute())
    assert (a == b).mean() > 0.99
