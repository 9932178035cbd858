"""Ensembles, test-time augmentation and uncertainty maps (semdask.ensemble via segment)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from ome_zarr_models.v05.image import ImageAttrs

from semdask.cli.main import main
from semdask.errors import InputError, ModelError
from semdask.inference.ensemble import (
    d4,
    d4_inverse,
    entropy_from_probs,
    predict_members,
    resolve_members,
)
from semdask.inference.graph import blended_probs, plan_inference
from semdask.inference.normalise import NormStats
from semdask.inference.segment import segment
from semdask.nets.model import ModelConfig, receptive_field, save_model
from semdask.nets.unet import UNet
from semdask.storage import arrays as sarr
from semdask.storage import io as sio
from semdask.storage.ledger import verify
from semdask.synthetic.sem import COLOURS, PHASES, synthetic_mosaic

GEOM: dict[str, Any] = {"mode": "window", "window": 64, "overlap": 0.25,
                        "progress": False}  # stride 48, halo 48


def _save(net: UNet, path: Path, classes: list[str] | None = None) -> Path:
    classes = classes or list(PHASES)
    cfg = ModelConfig(kwargs=net.kwargs(), classes=classes,
                      colours=list(COLOURS)[: len(classes)], n_classes=len(classes),
                      pixel_size_um=0.04458, window=64, receptive_field=receptive_field(net))
    return save_model(net, cfg, path)


def _net(seed: int, n_classes: int = 4, gain: float = 30.0) -> UNet:
    """A tiny random U-Net; ``gain`` sharpens its logits (random nets are nearly flat)."""
    torch.manual_seed(seed)
    net = UNet(n_classes=n_classes, widths=(4, 8), dropout=(0, 0)).eval()
    with torch.no_grad():
        net.head.weight.mul_(gain)
    return net


def _equivariant(seed: int) -> UNet:
    """D4-equivariant by construction: 3x3 kernels keep only their centre tap (1x1 convs),
    transposed-conv kernels are constant over their 2x2 taps (max-pool cells align)."""
    net = _net(seed)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.Conv2d) and mod.kernel_size == (3, 3):
                centre = mod.weight[:, :, 1, 1].clone()
                mod.weight.zero_()
                mod.weight[:, :, 1, 1] = centre * 3
            elif isinstance(mod, torch.nn.ConvTranspose2d):
                mod.weight.copy_(mod.weight.mean(dim=(2, 3), keepdim=True).expand_as(mod.weight))
    return net


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("models")
    a, b = _save(_net(1), d / "a.safetensors"), _save(_net(2), d / "b.safetensors")
    shutil.copy(a, d / "a-copy.safetensors")
    return {"a": a, "b": b, "a2": d / "a-copy.safetensors",
            "eq": _save(_equivariant(4), d / "eq.safetensors"),
            "three": _save(_net(5, 3), d / "c3.safetensors", ["pore", "Ni", "YSZ"])}


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("mosaic") / "m.ome.zarr"
    sio.write_synthetic(p, synthetic_mosaic((192, 240), seed=7, chunk=96))
    return p


def _run(mosaic: Path, out: Path, model: Any, **kw: Any) -> dict[str, np.ndarray]:
    """Segment into ``out``; return every output as float32 / uint8 arrays."""
    r = segment(mosaic, model=model, output=out, chunk=kw.pop("chunk", 96), **GEOM, **kw)
    res = {"labels": np.asarray(sio.open_labels(out).data.compute())}
    for g in r.extras:
        res[g] = np.asarray(sio.open_extra_image(out, g).compute()).astype(np.float32)
    return res


def test_d4_views_round_trip_and_are_distinct() -> None:
    x = np.arange(12.0).reshape(3, 4)
    views = [d4(x, g) for g in range(8)]
    assert len({v.tobytes() + bytes(v.shape) for v in views}) == 8
    for g, v in enumerate(views):
        np.testing.assert_array_equal(d4_inverse(v, g), x)


def test_entropy_is_normalised() -> None:
    p = np.zeros((4, 2, 3), np.float32)
    p[:, 0] = 0.25  # uniform: maximal entropy
    p[2, 1] = 1.0  # one-hot: zero entropy
    h = entropy_from_probs(da.from_array(p, chunks=(4, 1, 2))).compute()
    assert h.dtype == np.float16
    np.testing.assert_allclose(h[0], 1.0, atol=1e-3)
    np.testing.assert_array_equal(h[1], 0.0)


def test_ensemble_mean_is_average_of_members(mosaic: Path, models: dict[str, Path],
                                             tmp_path: Path) -> None:
    a = _run(mosaic, tmp_path / "a.ome.zarr", models["a"], probs=True)
    b = _run(mosaic, tmp_path / "b.ome.zarr", models["b"], probs=True)
    e = _run(mosaic, tmp_path / "e.ome.zarr", [models["a"], models["b"]], probs=True,
             confidence=True, uncertainty=True)
    assert not np.allclose(a["probs"], b["probs"], atol=1e-2)  # really two different models
    mean = (a["probs"] + b["probs"]) / 2
    np.testing.assert_allclose(e["probs"], mean, atol=1e-3)  # float16 storage
    assert (e["labels"] == mean.argmax(0)).mean() > 0.99  # near-ties may flip in float16
    # std of two values = half their distance, for the class the ensemble predicts
    top = e["probs"].argmax(0)[None]
    half = np.abs(np.take_along_axis(a["probs"] - b["probs"], top, 0)[0]) / 2
    np.testing.assert_allclose(e["uncertainty"], half, atol=2e-3)
    assert e["uncertainty"].max() > 0.01
    p = np.clip(e["probs"], 1e-12, 1)
    ref = -(p * np.log(p)).sum(0) / np.log(4)
    np.testing.assert_allclose(e["entropy"], ref, atol=5e-3)
    assert e["entropy"].min() >= 0.0 and e["entropy"].max() <= 1.0
    prov = sarr.read_attrs(tmp_path / "e.ome.zarr", "labels/phases")["semdask"]["provenance"]
    assert [m["path"] for m in prov["ensemble"]["members"]] == [str(models["a"]),
                                                                 str(models["b"])]
    assert "predicted class" in prov["ensemble"]["uncertainty"]
    assert verify(tmp_path / "e.ome.zarr").ok


def test_identical_members_have_zero_uncertainty(mosaic: Path, models: dict[str, Path],
                                                 tmp_path: Path) -> None:
    one = _run(mosaic, tmp_path / "one.ome.zarr", models["a"], probs=True, uncertainty=True)
    assert set(one) == {"labels", "probs", "entropy"}  # one model, no TTA: entropy only
    two = _run(mosaic, tmp_path / "two.ome.zarr", [models["a"], models["a2"]], probs=True,
               uncertainty=True)
    np.testing.assert_array_equal(two["uncertainty"], 0.0)
    np.testing.assert_array_equal(two["labels"], one["labels"])
    np.testing.assert_array_equal(two["probs"], one["probs"])
    np.testing.assert_array_equal(two["entropy"], one["entropy"])


def test_tta_of_an_equivariant_model_changes_nothing(mosaic: Path, models: dict[str, Path],
                                                     tmp_path: Path) -> None:
    plain = _run(mosaic, tmp_path / "p.ome.zarr", models["eq"], probs=True)
    tta = _run(mosaic, tmp_path / "t.ome.zarr", models["eq"], probs=True, tta=True,
               uncertainty=True)
    np.testing.assert_allclose(tta["probs"], plain["probs"], atol=1e-3)
    assert tta["uncertainty"].max() < 1e-4  # the 8 views agree
    assert (tta["labels"] == plain["labels"]).mean() > 0.999


def test_tta_is_chunk_invariant_and_changes_a_plain_model(
        mosaic: Path, models: dict[str, Path], tmp_path: Path) -> None:
    plain = _run(mosaic, tmp_path / "p.ome.zarr", models["a"], probs=True)
    t96 = _run(mosaic, tmp_path / "t96.ome.zarr", models["a"], probs=True, tta=True,
               uncertainty=True, chunk=96)
    t144 = _run(mosaic, tmp_path / "t144.ome.zarr", models["a"], probs=True, tta=True,
                uncertainty=True, chunk=144)
    for k in ("labels", "probs", "uncertainty", "entropy"):
        np.testing.assert_array_equal(t96[k], t144[k])  # bitwise, window mode on CPU
    assert np.abs(t96["probs"] - plain["probs"]).max() > 1e-2
    assert t96["uncertainty"].max() > 1e-3


def test_whole_chunk_tta_ensemble_is_chunk_invariant(models: dict[str, Path]) -> None:
    img = synthetic_mosaic((160, 208), seed=3, chunk=160).image.compute()
    nets = [str(models["a"]), str(models["b"])]
    out = []
    for chunk in (48, 96):  # edge blocks are not square: two view shapes per block
        plan = plan_inference(img.shape, mode="whole-chunk", window=64, chunk=chunk,
                              receptive_field=receptive_field(_net(1)))
        out.append(blended_probs(da.from_array(img, chunks=80), nets, n_classes=4,
                                 stats=NormStats(0, 255), plan=plan, tta=True,
                                 spread=True).compute(scheduler="synchronous"))
    assert out[0].shape == (5, 160, 208)
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)


def test_predict_members_of_one_model_is_predict_windows() -> None:
    from semdask.inference.predict import predict_windows
    from semdask.inference.windows import blend_weights

    block = np.random.default_rng(0).random((160, 160), dtype=np.float32)
    kw: dict[str, Any] = {"origin": (0, 0), "core": (48, 112, 48, 112), "window": 64, "stride": 48,
          "weights": blend_weights(64)}
    net = _net(1)
    np.testing.assert_array_equal(predict_members(block, [net], mode="window", **kw),
                                  predict_windows(block, net, **kw))


def test_new_arrays_have_valid_ome_metadata(mosaic: Path, models: dict[str, Path],
                                            tmp_path: Path) -> None:
    out = tmp_path / "o.ome.zarr"
    segment(mosaic, model=[models["a"], models["b"]], output=out, chunk=96, confidence=True,
            uncertainty=True, **GEOM)
    conf = sarr.read_attrs(out, "confidence")
    for g in ("uncertainty", "entropy"):
        attrs = sarr.read_attrs(out, g)
        parsed = ImageAttrs.model_validate(attrs["ome"])
        assert [a.name for a in parsed.multiscales[0].axes] == ["y", "x"]
        assert attrs["ome"]["multiscales"][0]["axes"] == conf["ome"]["multiscales"][0]["axes"]
        assert attrs["semdask"]["complete"] is True
        assert sio.open_extra_image(out, g).dtype == np.float16


def test_resume_recomputes_after_adding_tta_or_a_member(mosaic: Path, models: dict[str, Path],
                                                        tmp_path: Path) -> None:
    out = tmp_path / "r.ome.zarr"
    kw: dict[str, Any] = {"output": out, "chunk": 96, "uncertainty": True, "resume": True, **GEOM}
    r = segment(mosaic, model=[models["a"], models["b"]], **kw)
    assert r.blocks_computed == r.blocks_total
    assert segment(mosaic, model=[models["a"], models["b"]], **kw).up_to_date
    r = segment(mosaic, model=[models["a"], models["b"]], tta=True, **kw)
    assert not r.up_to_date and r.blocks_computed == r.blocks_total
    r = segment(mosaic, model=[models["a"], models["b"], models["a2"]], tta=True, **kw)
    assert not r.up_to_date and r.blocks_computed == r.blocks_total
    assert verify(out).ok


def test_member_resolution(models: dict[str, Path], tmp_path: Path) -> None:
    for i in (0, 1, 10):
        shutil.copy(models["a"], tmp_path / f"run-m{i}.safetensors")
    names = [p.name for p in resolve_members(prefix=tmp_path / "run.safetensors")]
    assert names == ["run-m0.safetensors", "run-m1.safetensors", "run-m10.safetensors"]
    assert [p.name for p in resolve_members(str(tmp_path / "run-m*.safetensors"))] == names
    with pytest.raises(InputError, match="semdask train --ensemble"):
        resolve_members(prefix=tmp_path / "nothing")
    with pytest.raises(InputError, match="no match"):
        resolve_members([str(tmp_path / "zz-*.safetensors")])


def test_class_mismatch_is_a_clear_error(mosaic: Path, models: dict[str, Path]) -> None:
    with pytest.raises(ModelError, match="the same classes"):
        segment(mosaic, model=[models["a"], models["three"]], **GEOM)
    r = CliRunner().invoke(main, ["segment", str(mosaic), "--model", str(models["a"]),
                                  "--model", str(models["three"]), "--no-cluster"])
    assert r.exit_code == 2, r.output
    assert "ensemble member" in r.output and "classes" in r.output
    assert not (mosaic / "labels" / "phases").exists()


def test_cli_ensemble_prefix_with_tta(mosaic: Path, models: dict[str, Path],
                                      tmp_path: Path) -> None:
    for i, k in enumerate(("a", "b")):
        shutil.copy(models[k], tmp_path / f"ens-m{i}.safetensors")
    out = tmp_path / "cli.ome.zarr"
    r = CliRunner().invoke(main, ["segment", str(mosaic), "--ensemble", str(tmp_path / "ens"),
                                  "--tta", "--uncertainty", "--window", "64", "--chunks", "96",
                                  "-o", str(out), "--no-cluster"])
    assert r.exit_code == 0, r.output
    assert "ensemble of 2 model(s) x 8 TTA views" in r.output
    prov = sarr.read_attrs(out, "labels/phases")["semdask"]["provenance"]["ensemble"]
    assert prov["tta"] is True and prov["views"] == 8 and len(prov["members"]) == 2
    assert float(np.asarray(sio.open_extra_image(out, "uncertainty").max())) > 0


def test_ensemble_through_pixel_size_rescaling(models: dict[str, Path], tmp_path: Path) -> None:
    img = synthetic_mosaic((96, 112), seed=9, chunk=96).image
    p = tmp_path / "coarse.ome.zarr"
    sio.write_image(p, img, pixel_size_um=0.04458 * 1.5)  # inferred at 144 x 168, back
    r = segment(p, model=[models["a"], models["b"]], chunk=96, uncertainty=True, probs=True,
                rescale=True, **GEOM)
    assert r.rescale == pytest.approx(1.5) and r.extras == ["probs", "uncertainty", "entropy"]
    unc = np.asarray(sio.open_extra_image(p, "uncertainty").compute()).astype(np.float32)
    assert unc.shape == (96, 112) and unc.min() >= 0 and unc.max() <= 0.5 and unc.max() > 0
    probs = np.asarray(sio.open_extra_image(p, "probs").compute()).astype(np.float32)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=4e-3)
