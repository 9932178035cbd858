"""U-Net shapes, receptive field, safe model files and the per-process cache."""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile

import pytest
import torch
import yaml

from semdask.errors import ModelError
from semdask.nets.model import (
    ModelConfig,
    bundled_model_path,
    get_model,
    load_model,
    model_hash,
    receptive_field,
    save_model,
)
from semdask.nets.unet import UNet, _interval


@pytest.mark.parametrize(
    ("in_ch", "n_cls", "widths", "size"),
    [(1, 4, (16, 32, 64, 128, 256), 64), (3, 2, (4, 8, 16), 24), (1, 5, (8,), 7),
     (2, 4, (4, 8, 16, 32), 40)],
)
def test_unet_shapes(in_ch: int, n_cls: int, widths: tuple[int, ...], size: int) -> None:
    net = UNet(in_channels=in_ch, n_classes=n_cls, widths=widths).eval()
    x = torch.randn(2, in_ch, size, 2 * size)
    with torch.no_grad():
        y = net(x)
        y_cl = net(x.contiguous(memory_format=torch.channels_last))
    assert y.shape == (2, n_cls, size, 2 * size)
    torch.testing.assert_close(y, y_cl, rtol=1e-4, atol=1e-5)
    assert net.multiple == 2 ** (len(widths) - 1)


def test_unet_default_layout_and_errors() -> None:
    net = UNet()
    assert net.widths == (16, 32, 64, 128, 256)
    assert net.dropout == (0.1, 0.1, 0.2, 0.2, 0.3)
    assert [d.drop.p for d in net.dec] == [0.1, 0.1, 0.2, 0.2]  # decoder mirrors the encoder
    assert isinstance(net.up[0], torch.nn.ConvTranspose2d)
    assert net.up[0].stride == (2, 2)
    with pytest.raises(ModelError, match="multiples of 16"):
        net(torch.zeros(1, 1, 40, 48))
    with pytest.raises(ModelError, match="one dropout rate per level"):
        UNet(widths=(4, 8), dropout=(0.1,))


def _measure(net: UNet, row: int = 8, width: int = 288) -> dict[int, tuple[int, int]]:
    """Impulse method: which input columns change each output column (real max-pooling).

    All weights positive, biases zero and a zero input: every activation is zero
    except where an impulse reaches, so reachability is exact (no cancellation,
    no dead ReLU, max-pool passes any positive value against zeros).
    """
    net = net.double().eval()
    for name, p in net.named_parameters():
        with torch.no_grad():
            p.uniform_(0.5, 1.0) if "weight" in name else p.zero_()
    x = torch.zeros(width, 1, 2 * row, width, dtype=torch.float64)
    x[torch.arange(width), 0, row, torch.arange(width)] = 1.0  # one impulse per sample
    with torch.no_grad():
        hit = net(x)[:, :, row, :].sum(1) > 0  # (impulse column, output column)
    out = {}
    for p in range(net.multiple * 8, net.multiple * 9 + net.multiple):
        cols = torch.nonzero(hit[:, p]).ravel()
        out[p] = (int(cols.min()) - p, int(cols.max()) - p)
    return out


@pytest.mark.parametrize("widths", [(2, 2, 2, 2, 2), (2, 2, 2)])
def test_receptive_field_analytic_equals_measured(widths: tuple[int, ...]) -> None:
    net = UNet(widths=widths)
    measured = _measure(net)
    for p, (lo, hi) in measured.items():
        alo, ahi = _interval(net, p)
        assert (lo, hi) == (alo - p, ahi - p), p
        assert receptive_field(net, at=p) == hi - lo + 1
    assert receptive_field(net) == max(hi - lo + 1 for lo, hi in measured.values())


def test_receptive_field_default_net() -> None:
    net = UNet()
    # 188 px at pooling-aligned pixels (the earlier measurement), 204 px at worst
    assert receptive_field(net, at=0) == receptive_field(net, at=128) == 188
    assert receptive_field(net) == 204
    assert receptive_field(UNet(widths=(4, 8, 16, 32, 64, 128))) > 204


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    net = UNet(widths=(4, 8, 16)).eval()
    cfg = ModelConfig.for_model(net, pixel_size_um=0.05, colours=[(0, 0, 0, 255)] * 4,
                                provenance={"note": "test"})
    return net, cfg, save_model(net, cfg, tmp_path / "m.safetensors")


def test_save_load_round_trip(saved) -> None:
    net, cfg, path = saved
    net2, cfg2 = load_model(path)
    assert not net2.training
    assert cfg2 == cfg
    assert cfg2.receptive_field == receptive_field(net)
    x = torch.randn(2, 1, 32, 48)
    with torch.no_grad():
        assert torch.equal(net(x), net2(x))
    side = yaml.safe_load(path.with_suffix(".yaml").read_text())
    assert side["sha256"] == model_hash(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert side["kwargs"]["widths"] == [4, 8, 16]


def test_get_model_caches_per_process(saved) -> None:
    _, _, path = saved
    a, _ = get_model(path, "cpu")
    b, _ = get_model(str(path), torch.device("cpu"))
    assert a is b
    assert not a.training


def _evil_pickle(marker):
    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Evil(), protocol=2)


@pytest.mark.parametrize("kind", ["pickle", "pickle0", "torch.save", "zip", "empty", "text"])
def test_load_rejects_non_safetensors_without_unpickling(tmp_path, kind: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    if kind == "pickle":
        path.write_bytes(_evil_pickle(marker))
    elif kind == "pickle0":
        path.write_bytes(pickle.dumps({"a": 1}, protocol=0))
    elif kind == "torch.save":
        torch.save({"evil": _EvilHolder(marker)}, path)
    elif kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("data.pkl", _evil_pickle(marker))
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("weights: none\n" * 10)
    with pytest.raises(ModelError) as e:
        load_model(path)
    assert not marker.exists()
    msg = str(e.value)
    assert "safetensors" in msg
    if kind in ("pickle", "torch.save", "zip"):
        assert "torch.load" in msg
        assert "save_model" in msg


class _EvilHolder:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_load_rejects_wrong_shapes_and_missing_config(tmp_path, saved) -> None:
    from safetensors.torch import save_file

    net, cfg, _ = saved
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    wrong = cfg.model_copy(update={"kwargs": {**cfg.kwargs, "widths": [4, 8, 32]}})
    save_file(tensors, str(tmp_path / "w.safetensors"),
              metadata={"semdask": wrong.model_dump_json()})
    with pytest.raises(ModelError, match="mismatches"):
        load_model(tmp_path / "w.safetensors")
    tensors["head.weight"] = torch.zeros(3, 4, 1, 1)
    save_file(tensors, str(tmp_path / "s.safetensors"), metadata={"semdask": cfg.model_dump_json()})
    with pytest.raises(ModelError, match=r"head\.weight"):
        load_model(tmp_path / "s.safetensors")
    save_file(tensors, str(tmp_path / "n.safetensors"))
    with pytest.raises(ModelError, match="metadata"):
        load_model(tmp_path / "n.safetensors")
    bad = json.loads(cfg.model_dump_json())
    bad["classes"] = ["a"]
    save_file(tensors, str(tmp_path / "c.safetensors"), metadata={"semdask": json.dumps(bad)})
    with pytest.raises(ModelError, match="ModelConfig"):
        load_model(tmp_path / "c.safetensors")
    with pytest.raises(ModelError, match="existing model file"):
        get_model(tmp_path / "missing.safetensors")


def test_bundled_model() -> None:
    path = bundled_model_path()
    if not path.exists():
        pytest.skip("bundled model not built yet (examples/train_bundled_model.sh)")
    net, cfg = load_model(path)
    assert cfg.classes == ["pore", "Ni", "NiO", "YSZ"]
    assert len(cfg.colours) == 4
    assert cfg.window == 256
    assert cfg.receptive_field == receptive_field(net)
    assert path.stat().st_size < 16 * 2**20
    with torch.no_grad():
        assert net(torch.zeros(1, 1, 64, 64)).shape == (1, 4, 64, 64)


def test_architecture_dispatch_and_aliases(tmp_path) -> None:
    from safetensors.torch import save_file

    from semdask.nets.model import ARCHITECTURES, build_model
    from semdask.nets.resunet import ResUNet

    assert set(ARCHITECTURES) == {"unet", "resunet"}
    net = UNet(widths=(4, 8, 16))
    cfg = ModelConfig.for_model(net)
    assert (cfg.architecture, cfg.arch, cfg.arch_params) == ("unet", "unet", net.kwargs())
    assert type(build_model(cfg)) is UNet
    assert ModelConfig().architecture == "unet"  # old files without the field stay U-Nets
    res = ModelConfig(arch="resunet", arch_params={"layers": [1, 1], "widths": [4, 4],
                                                   "stem_width": 4})
    rnet = build_model(res)
    assert isinstance(rnet, ResUNet) and receptive_field(rnet) == rnet.receptive_field()
    assert json.loads(res.model_dump_json())["architecture"] == "resunet"  # stored by name
    with pytest.raises(ValueError, match="architecture"):
        ModelConfig(architecture="segformer")
    # a stored config naming an unknown architecture is a clear ModelError
    bad = json.loads(cfg.model_dump_json())
    bad["architecture"] = "segformer"
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"semdask": json.dumps(bad)})
    with pytest.raises(ModelError, match="ModelConfig"):
        load_model(tmp_path / "a.safetensors")
    # U-Net weights under a ResUNet config: the tensor check names the class
    res_cfg = ModelConfig.for_model(rnet)
    save_file(tensors, str(tmp_path / "b.safetensors"),
              metadata={"semdask": res_cfg.model_dump_json()})
    with pytest.raises(ModelError, match=r"ResUNet\(\*\*"):
        load_model(tmp_path / "b.safetensors")


def test_bundled_config_is_unchanged_by_the_dispatch() -> None:
    side = bundled_model_path().with_suffix(".yaml")
    if not side.exists():
        pytest.skip("bundled model not built yet")
    doc = yaml.safe_load(side.read_text())
    cfg = ModelConfig.model_validate({k: v for k, v in doc.items()
                                      if k not in ("weights", "sha256")})
    assert cfg.architecture == "unet" and cfg.receptive_field == 204
    assert json.loads(cfg.model_dump_json()) == {
        k: v for k, v in doc.items() if k not in ("weights", "sha256")}


def _normed_unet(seed: int = 0) -> UNet:
    """A U-Net with batch norms whose running statistics are far from the identity."""
    torch.manual_seed(seed)
    net = UNet(widths=(4, 8, 16), norm="batch").train()
    with torch.no_grad():
        for _ in range(5):
            net(3.0 * torch.rand(4, 1, 32, 32) + 1.0)
    return net.eval()


def test_batch_norms_fold_into_a_plain_unet(tmp_path) -> None:
    net = _normed_unet()
    assert net.enc[0].norm1.running_mean.abs().max() > 0.1  # not the initial statistics
    plain = net.folded()
    assert plain.norm is None and "norm" not in plain.kwargs() and net.kwargs()["norm"] == "batch"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert receptive_field(plain) == receptive_field(net)
    x = 3.0 * torch.rand(2, 1, 32, 48) + 1.0
    with torch.no_grad():
        ref = net(x)
        torch.testing.assert_close(plain(x), ref, rtol=1e-4, atol=1e-5)
        cfg = ModelConfig.for_model(net)
        assert cfg.kwargs["norm"] == "batch"
        loaded, lcfg = load_model(save_model(net, cfg, tmp_path / "m.safetensors"))
        assert loaded.norm is None and "norm" not in lcfg.kwargs  # model files are plain
        torch.testing.assert_close(loaded(x), ref, rtol=1e-4, atol=1e-5)
        ckpt, ccfg = load_model(save_model(net, cfg, tmp_path / "c.safetensors", fold=False))
        assert ccfg.kwargs["norm"] == "batch"  # a training checkpoint keeps them
        assert torch.equal(ckpt(x), ref)
    assert UNet(widths=(4,)).folded().norm is None
    with pytest.raises(ModelError, match="norm"):
        UNet(norm="group")
