"""The model is resident on every worker process before the first block."""

from __future__ import annotations

import pytest

from semdask.cluster.plugins import ModelPlugin, preload_model
from semdask.nets.model import ModelConfig, model_hash, save_model
from semdask.nets.unet import UNet


def _cached_digests() -> list[str]:
    from semdask.nets import model

    return sorted(k[0] for k in model._CACHE)


@pytest.fixture
def model_file(tmp_path):
    net = UNet(1, 3, widths=(4, 8))
    cfg = ModelConfig.for_model(net, classes=["a", "b", "c"])
    p = tmp_path / "m.safetensors"
    save_model(net, cfg, p)
    return p


def test_model_plugin_loads_the_model_on_every_worker(model_file):
    from distributed import Client, LocalCluster

    sha = model_hash(model_file)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address=None, host="127.0.0.1") as cluster, \
            Client(cluster) as client:
        before = client.run(_cached_digests)
        assert all(sha not in v for v in before.values())
        assert preload_model(client, model_file, sha=sha, device="cpu")
        assert preload_model(client, model_file, sha=sha, device="cpu")  # idempotent
        after = client.run(_cached_digests)
        assert len(after) == 2 and all(v == [sha] for v in after.values())
        cluster.scale(3)  # a worker joining later gets the model too
        client.wait_for_workers(3)
        late = client.run(_cached_digests)
        assert all(v == [sha] for v in late.values())


def test_bad_model_file_keeps_workers_alive(tmp_path):
    from distributed import Client, LocalCluster

    bad = tmp_path / "missing.safetensors"
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        assert preload_model(client, bad, sha="feedfacecafe", device="cpu")
        assert client.submit(lambda: 1 + 1).result() == 2
    assert ModelPlugin(bad, sha="feedfacecafe").name == "semdask-model-feedfacecafe-auto"
    assert not preload_model(None, bad, sha="x")
