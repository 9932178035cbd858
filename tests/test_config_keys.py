"""Every key of the packaged semdask.yaml has an effect: one test per key (issue 11).

Segment and store keys are proven on real runs/writes; dashboard and cluster-profile keys
by their consumer (the dashboard address, the profile's constructor keywords). A key added
to semdask.yaml without an entry here fails :func:`test_every_key_has_a_test`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import pytest
import yaml

import semdask
from semdask.cluster import profiles
from semdask.errors import InputError
from semdask.inference.run import resolve
from semdask.inference.segment import segment
from semdask.storage import arrays as sarr
from semdask.storage import io as sio
from semdask.synthetic.sem import synthetic_mosaic

YAML = Path(semdask.__file__).parent / "semdask.yaml"
PACKAGED = yaml.safe_load(YAML.read_text())["semdask"]


def _leaves(d: dict[str, Any], prefix: str = "") -> Iterator[str]:
    """Dotted keys of the leaves; a cluster profile's keys count whole (nested values too)."""
    for k, v in d.items():
        key = f"{prefix}{k}"
        whole = key.startswith("cluster.profiles.") and key.count(".") == 3
        if isinstance(v, dict) and v and not whole:
            yield from _leaves(v, key + ".")
        else:
            yield key


@pytest.fixture
def mosaic(tmp_path: Path) -> Path:
    p = tmp_path / "m.ome.zarr"
    sio.write_synthetic(p, synthetic_mosaic((160, 192), seed=2, chunk=96))
    return p


def _set(key: str, value: Any) -> Any:
    return dask.config.set({f"semdask.{key}": value})


def _run(mosaic: Path, model: Path, **kw: Any) -> Any:
    return segment(mosaic, model=model, progress=False, overwrite=True, **kw)


# ---------------------------------------------------------------- segment.*
def _segment_mode(mosaic: Path, model: Path) -> None:
    assert _run(mosaic, model).plan.mode == "whole-chunk"  # packaged default
    with _set("segment.mode", "window"):
        assert _run(mosaic, model).plan.mode == "window"


def _segment_window(mosaic: Path, model: Path) -> None:
    with _set("segment.mode", "window"):
        assert _run(mosaic, model).plan.window == 64  # the model file's window
        with _set("segment.window", 128):  # a value you set wins over the model file
            r = _run(mosaic, model)
    assert r.plan.window == 128
    prov = sarr.read_attrs(mosaic, "labels/phases")["semdask"]["provenance"]
    assert prov["plan"]["window"] == 128 and prov["settings_sources"]["window"] == "dask.config"


def _segment_overlap(mosaic: Path, model: Path) -> None:
    with _set("segment.mode", "window"), _set("segment.overlap", 0.5):
        assert _run(mosaic, model).plan.stride == 32  # window 64, half shared


def _segment_blend(mosaic: Path, model: Path) -> None:
    g, u = mosaic.with_name("g.ome.zarr"), mosaic.with_name("u.ome.zarr")
    with _set("segment.mode", "window"):
        _run(mosaic, model, probs=True, output=g)
        with _set("segment.blend", "uniform"):
            r = _run(mosaic, model, probs=True, output=u)
    pg = np.asarray(sio.open_extra_image(g, "probs").compute())
    pu = np.asarray(sio.open_extra_image(u, "probs").compute())
    assert r.plan.blend == "uniform" and not np.array_equal(pg, pu)


def _segment_chunks(mosaic: Path, model: Path) -> None:
    with _set("segment.mode", "window"), _set("segment.overlap", 0.5):
        assert _run(mosaic, model).blocks_total == 1  # packaged 1536 px: one chunk
        with _set("segment.chunks", 64):
            r = _run(mosaic, model)
    assert r.plan.chunk == 64 and r.blocks_total == 3 * 3
    assert sio.open_array(mosaic, "labels/phases").shards == (64, 64)


def _segment_precision(mosaic: Path, model: Path) -> None:
    with _set("segment.precision", "bf16"):
        _run(mosaic, model)
    prov = sarr.read_attrs(mosaic, "labels/phases")["semdask"]["provenance"]
    assert prov["precision"] == "bf16"
    with _set("segment.precision", "fp16"), pytest.raises(InputError, match="fp16"):
        _run(mosaic, model, device="cpu")  # refused before anything is written


def _segment_batch_size(mosaic: Path, model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from semdask.inference import predict

    seen: list[int] = []
    real = predict.predict_windows

    def spy(*a: Any, **kw: Any) -> Any:
        seen.append(kw["batch_size"])
        return real(*a, **kw)

    monkeypatch.setattr(predict, "predict_windows", spy)
    with _set("segment.mode", "window"):
        _run(mosaic, model, chunk=256)
        import torch

        auto = 16 if torch.cuda.is_available() else 1
        assert seen and set(seen) == {auto}  # auto, decided on the worker (its device)
        seen.clear()
        with _set("segment.batch-size", 4):
            _run(mosaic, model, chunk=256)
    assert seen and set(seen) == {4}


def _segment_device(mosaic: Path, model: Path) -> None:
    import torch

    with _set("segment.device", "cpu"):
        assert resolve(mosaic, model=model).settings.device == "cpu"
    with _set("segment.device", "cuda:0"):
        if torch.cuda.is_available():
            assert resolve(mosaic, model=model).settings.device == "cuda:0"
        else:
            with pytest.raises(InputError, match="without CUDA"):
                _run(mosaic, model)


def _segment_probs(mosaic: Path, model: Path) -> None:
    with _set("segment.probs", True):
        r = _run(mosaic, model)
    assert r.extras == ["probs"]
    assert sio.open_extra_image(mosaic, "probs").shape == (4, 160, 192)


def _segment_confidence(mosaic: Path, model: Path) -> None:
    with _set("segment.confidence", True):
        r = _run(mosaic, model)
    assert r.extras == ["confidence"]


# ---------------------------------------------------------------- store.*
def _image(tmp: Path, name: str) -> Any:
    x = da.from_array(np.arange(300 * 260, dtype=np.uint16).reshape(300, 260), chunks=200)
    return sio.write_image(tmp / name, x, pixel_size_um=0.1)


def _store_shard(tmp: Path) -> None:
    assert sio.open_array(_image(tmp, "a").path, "").shards == (200, 200)  # dask chunks
    with _set("store.shard", 128):
        m = _image(tmp, "b")
    assert sio.open_array(m.path, "").shards == (128, 128)


def _store_inner_chunk(tmp: Path) -> None:
    with _set("store.shard", 128), _set("store.inner-chunk", 32):
        m = _image(tmp, "c")
    assert sio.open_array(m.path, "").chunks == (32, 32)


def _clevel(node: Any) -> list[int]:
    if isinstance(node, dict):
        return ([node["clevel"]] if "clevel" in node else []) + [
            c for v in node.values() for c in _clevel(v)]
    return [c for v in node for c in _clevel(v)] if isinstance(node, list) else []


def _store_compressor_level(tmp: Path) -> None:
    import json

    levels = {}
    for lv in (1, 9):
        with _set("store.compressor-level", lv):
            m = _image(tmp, f"d{lv}")
        levels[lv] = set(_clevel(json.loads((m.path / "0" / "zarr.json").read_text())))
    assert levels == {1: {1}, 9: {9}}


# ---------------------------------------------------------------- dashboard.*
def _dashboard_host() -> None:
    assert profiles.resolve_dashboard(None, {}).startswith("127.0.0.1:")
    with _set("dashboard.host", "10.1.2.3"):
        assert profiles.resolve_dashboard(None, {}).startswith("10.1.2.3:")


def _dashboard_port() -> None:
    with _set("dashboard.port", 8999):
        assert profiles.resolve_dashboard(None, {}).endswith(":8999")


# ---------------------------------------------------------------- lock.* (storage/lock.py)
def _lock_heartbeat(tmp: Path) -> None:
    import time

    from semdask.storage.lock import lock_path, writer_lock

    with _set("lock.heartbeat", 0.05), writer_lock(tmp / "o.ome.zarr"):
        path = lock_path((tmp / "o.ome.zarr").resolve())
        os.utime(path, (0, 0))  # pretend the last beat was long ago
        deadline = time.time() + 5
        while path.stat().st_mtime == 0 and time.time() < deadline:
            time.sleep(0.02)
        assert path.stat().st_mtime > 0  # beaten within 0.05 s, not the packaged 30 s


def _lock_stale_after(tmp: Path) -> None:
    import dataclasses
    import time

    from semdask.storage.lock import read_lock, stale_reason, writer_lock

    with writer_lock(tmp / "o.ome.zarr"):
        info = read_lock(tmp / "o.ome.zarr")
    assert info is not None
    other = dataclasses.replace(info, host="another-host", heartbeat=time.time() - 100)
    assert stale_reason(other) is None  # packaged: 600 s
    with _set("lock.stale-after", 50):
        assert "stale-after" in (stale_reason(other) or "")


# ---------------------------------------------------------------- cluster.*
def _cluster_profile() -> None:
    assert profiles.resolve_profile() == "local"
    with _set("cluster.profile", "slurm"):
        assert profiles.resolve_profile() == "slurm"


def _cluster_in_process_max_mpix() -> None:
    from semdask.cluster.inprocess import in_process

    px = 4096 * 4096  # 16.8 MPix
    assert in_process(px)
    with _set("cluster.in-process-max-mpix", 16):
        assert not in_process(px)
    with _set("cluster.in-process-max-mpix", 0):
        assert not in_process(1)


def _segment_tile() -> None:
    from semdask.inference.graph import _subtile

    assert _subtile() == -1  # packaged "auto": the kernel chooses (512 px on the CPU)
    with _set("segment.tile", 0):
        assert _subtile() == 0
    with _set("segment.tile", 256):
        assert _subtile() == 256
    with _set("segment.tile", 100), pytest.raises(InputError, match="multiple of"):
        _subtile()


_SENTINEL: dict[str, Any] = {"gpu-resources": None, "adapt": {"minimum-jobs": 0,
                                                              "maximum-jobs": 3}}


def _cluster_profile_key(key: str) -> Callable[[], None]:
    """A profile key reaches its consumer: the merged profile and, for keys passed through,
    the cluster constructor's keywords (cluster_kwargs / slurm_kwargs)."""
    _, _, name, field = key.split(".", 3)

    def check() -> None:
        old = PACKAGED["cluster"]["profiles"][name][field]
        if field == "gpu-resources":
            with _set(key, not old):
                assert profiles.profile_has_gpu_workers(name) is (not old)
            return
        value = _SENTINEL.get(field, f"sentinel-{field}")
        with _set(key, value):
            cfg = profiles.profile_config(name)
            assert cfg[field] == value
            if field == "dashboard-address":
                assert profiles.resolve_dashboard(None, cfg) == value
            elif field not in profiles._OWN:
                assert profiles.cluster_kwargs(cfg)[field.replace("-", "_")] == value

    return check


SEGMENT = {f"segment.{k}": f for k, f in {
    "mode": _segment_mode, "window": _segment_window, "overlap": _segment_overlap,
    "blend": _segment_blend, "chunks": _segment_chunks, "precision": _segment_precision,
    "batch-size": _segment_batch_size, "device": _segment_device, "probs": _segment_probs,
    "confidence": _segment_confidence}.items()}
STORE = {"store.shard": _store_shard, "store.inner-chunk": _store_inner_chunk,
         "store.compressor-level": _store_compressor_level,
         "lock.heartbeat": _lock_heartbeat, "lock.stale-after": _lock_stale_after}
OTHER: dict[str, Callable[[], None]] = {
    "dashboard.host": _dashboard_host, "dashboard.port": _dashboard_port,
    "cluster.profile": _cluster_profile,
    "cluster.in-process-max-mpix": _cluster_in_process_max_mpix,
    "segment.tile": _segment_tile,
    **{k: _cluster_profile_key(k) for k in _leaves(PACKAGED) if
       k.startswith("cluster.profiles.")}}


def test_every_key_has_a_test() -> None:
    keys = set(_leaves(PACKAGED))
    covered = set(SEGMENT) | set(STORE) | set(OTHER)
    assert keys - covered == set(), "add a test for these semdask.yaml keys"
    assert covered - keys == set(), "these tested keys are gone from semdask.yaml"


@pytest.mark.parametrize("key", sorted(SEGMENT))
def test_segment_key(key: str, mosaic: Path, model_file: Path,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    fn = SEGMENT[key]
    if key == "segment.batch-size":
        _segment_batch_size(mosaic, model_file, monkeypatch)
    else:
        fn(mosaic, model_file)  # type: ignore[call-arg]


@pytest.mark.parametrize("key", sorted(STORE))
def test_store_key(key: str, tmp_path: Path) -> None:
    STORE[key](tmp_path)


@pytest.mark.parametrize("key", sorted(OTHER))
def test_consumer_reads_key(key: str) -> None:
    OTHER[key]()

