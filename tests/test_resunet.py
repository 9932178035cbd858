"""Residual-encoder U-Net: shapes, receptive field, safe files, encoder transfer, engine."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from semdask.errors import ModelError
from semdask.nets.model import ModelConfig, build_model, load_model, receptive_field, save_model
from semdask.nets.resunet import ResUNet
from semdask.storage import io as sio
from semdask.synthetic.sem import COLOURS, PHASES

TINY = {"layers": (1, 1, 1, 1), "widths": (8, 8, 8, 8), "stem_width": 8}


def _tiny(seed: int = 0, **kw) -> ResUNet:
    torch.manual_seed(seed)
    net = ResUNet(**{**TINY, **kw})
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode is tested for real
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, 0.1)
            elif name.endswith("running_var"):
                buf.uniform_(0.5, 2.0)
    return net.eval()


@pytest.mark.parametrize(("in_ch", "n_cls", "size"), [(1, 4, 64), (2, 3, 96), (1, 5, 48)])
def test_resunet_shapes(in_ch: int, n_cls: int, size: int) -> None:
    net = _tiny(in_channels=in_ch, n_classes=n_cls)
    x = torch.randn(2, in_ch, size, size + 16)
    with torch.no_grad():
        y = net(x)
        y_cl = net(x.contiguous(memory_format=torch.channels_last))
    assert y.shape == (2, n_cls, size, size + 16)
    torch.testing.assert_close(y, y_cl, rtol=1e-4, atol=1e-5)
    assert net.multiple == 16


def test_default_layout_is_resnet34_like_and_errors() -> None:
    net = ResUNet()
    assert [len(s) for s in net.encoder.stages] == [3, 4, 6, 3]
    assert net.decoder_widths == (256, 128, 64, 32) and net.multiple == 16
    assert net.encoder.stages[0][0].conv1.stride == (2, 2)
    n_enc = sum(p.numel() for p in net.encoder_parameters())
    n_all = sum(p.numel() for p in net.parameters())
    assert 21e6 < n_enc < 21.5e6 and n_all - n_enc == sum(
        p.numel() for p in net.decoder_parameters())
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 4, 32, 32)
    with pytest.raises(ModelError, match="multiples of 16"):
        net(torch.zeros(1, 1, 40, 48))
    with pytest.raises(ModelError, match="16-px grid"):
        ResUNet(layers=(1,) * 5, widths=(4,) * 5)
    with pytest.raises(ModelError, match="decoder_widths"):
        ResUNet(layers=(1, 1), widths=(4, 4), decoder_widths=(4,))


def _measure(net: ResUNet, row: int = 8, width: int = 224) -> dict[int, tuple[int, int]]:
    """Impulse method (positive weights, zero biases, zero input): exact reachability."""
    net = net.double().eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.uniform_(0.5, 1.0) if "weight" in name else p.zero_()
        for name, b in net.named_buffers():
            if name.endswith("running_mean"):
                b.zero_()
            elif name.endswith("running_var"):
                b.fill_(1.0)
    x = torch.zeros(width, 1, 2 * row, width, dtype=torch.float64)
    x[torch.arange(width), 0, row, torch.arange(width)] = 1.0
    with torch.no_grad():
        hit = net(x)[:, :, row, :].sum(1) > 0
    m = net.multiple
    out = {}
    for p in range(width // 2 - m, width // 2):  # far from the image edges
        cols = torch.nonzero(hit[:, p]).ravel()
        out[p] = (int(cols.min()) - p, int(cols.max()) - p)
    return out


@pytest.mark.parametrize("kw", [{"layers": (1, 2), "widths": (2, 2), "stem_width": 2},
                                {"layers": (2, 1, 1), "widths": (2, 2, 2), "stem_width": 2,
                                 "decoder_widths": (3, 2, 2)}])
def test_receptive_field_analytic_equals_measured(kw: dict) -> None:
    net = ResUNet(**kw)
    measured = _measure(net)
    for p, (lo, hi) in measured.items():
        alo, ahi = net._interval(p)
        assert (lo, hi) == (alo - p, ahi - p), p
        assert receptive_field(net, at=p) == hi - lo + 1
    assert net.receptive_field() == max(hi - lo + 1 for lo, hi in measured.values())


def test_receptive_field_bounds_the_influence() -> None:
    net = _tiny(3)
    rf = net.receptive_field()
    assert rf == 159 and ResUNet().receptive_field() == 511
    size, c = 192, 96
    x = torch.randn(1, 1, size, size)
    with torch.no_grad():
        base = net(x)[0, :, c, c]
        far = x.clone()
        far[0, 0, c, c + rf // 2 + 1] += 10.0  # just outside the field: no change at all
        far[0, 0, c - rf // 2 - 1, c] += 10.0
        torch.testing.assert_close(net(far)[0, :, c, c], base, rtol=0, atol=0)
        near = x.clone()
        near[0, 0, c, c + 20] += 10.0  # well inside
        assert not torch.equal(net(near)[0, :, c, c], base)


def test_save_load_round_trip_and_config(tmp_path: Path) -> None:
    net = _tiny(1)
    cfg = ModelConfig.for_model(net, classes=list(PHASES), colours=list(COLOURS), window=64)
    assert (cfg.architecture, cfg.arch) == ("resunet", "resunet")
    assert cfg.arch_params["layers"] == [1, 1, 1, 1] and cfg.receptive_field == 159
    path = save_model(net, cfg, tmp_path / "r.safetensors")
    net2, cfg2 = load_model(path)
    assert isinstance(net2, ResUNet) and not net2.training and cfg2 == cfg
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        assert torch.equal(net(x), net2(x))
    side = yaml.safe_load(path.with_suffix(".yaml").read_text())
    assert side["architecture"] == "resunet" and side["kwargs"]["stem_width"] == 8
    # the aliases build the same architecture; a UNet config is rebuilt as a UNet
    again = ModelConfig(arch="resunet", arch_params=net.kwargs())
    assert again.kwargs == net.kwargs() and type(build_model(again)) is ResUNet
    # a config for a UNet saved with a ResUNet model is corrected to the model's
    wrong = ModelConfig(kwargs={"widths": [4, 8]}, classes=list(PHASES))
    _, cfg3 = load_model(save_model(net, wrong, tmp_path / "w.safetensors"))
    assert cfg3.architecture == "resunet" and cfg3.receptive_field == 159
    with pytest.raises(ModelError, match="constructor arguments"):
        build_model(ModelConfig(arch="resunet", arch_params={"depth": 3}))


def test_freeze_and_unfreeze_encoder() -> None:
    net = _tiny().train()
    net.freeze_encoder()
    assert all(not p.requires_grad for p in net.encoder_parameters())
    assert all(p.requires_grad for p in net.decoder_parameters())
    net.train()  # the frozen encoder keeps its BatchNorm statistics
    assert net.training and not net.encoder.training and net.decoder.training
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    loss = net(torch.randn(2, 1, 32, 32)).square().mean()
    loss.backward()
    assert all(p.grad is None for p in net.encoder_parameters())
    for k, v in net.encoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    net.unfreeze_encoder()
    assert all(p.requires_grad for p in net.encoder_parameters()) and net.encoder.training


def test_load_encoder_from_another_model(tmp_path: Path) -> None:
    src, dst = _tiny(1), _tiny(2, n_classes=3)
    x = torch.randn(1, 1, 48, 48)
    head_before = dst.head.weight.clone()
    n = dst.load_encoder(src.save_encoder(tmp_path / "enc.safetensors"))
    assert n == len(src.encoder.state_dict())
    with torch.no_grad():
        for a, b in zip(src.encoder(x), dst.encoder(x), strict=True):
            assert torch.equal(a, b)
    assert torch.equal(dst.head.weight, head_before)  # only the encoder changed
    # a whole model file works too (its decoder and head are ignored)
    other = _tiny(4)
    full = save_model(other, ModelConfig.for_model(other), tmp_path / "full.safetensors")
    dst.load_encoder(full)
    with torch.no_grad():
        assert torch.equal(other.encoder(x)[-1], dst.encoder(x)[-1])


def test_load_encoder_rejects_bad_files(tmp_path: Path) -> None:
    net = _tiny()
    wide = _tiny(widths=(8, 8, 16, 8)).save_encoder(tmp_path / "wide.safetensors")
    with pytest.raises(ModelError, match=r"wrong shapes: stages\.2\.0\.bn1\.bias: \(16,\) "
                       r"\(model \(8,\)\)"):
        net.load_encoder(wide)
    deep = _tiny(layers=(1, 2, 1, 1)).save_encoder(tmp_path / "deep.safetensors")
    with pytest.raises(ModelError, match=r"12 unexpected, 0 wrong shapes: "
                       r"unexpected stages\.1\.1\.bn1\.bias"):
        net.load_encoder(deep)
    shallow = ResUNet(layers=(1, 1), widths=(8, 8), stem_width=8)
    with pytest.raises(ModelError, match=r"missing stages\.2\.0"):
        net.load_encoder(shallow.save_encoder(tmp_path / "shallow.safetensors"))
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.safetensors"
    evil.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelError, match="safetensors"):
        net.load_encoder(evil)
    with pytest.raises(ModelError, match="safetensors"):
        net.load_encoder(tmp_path / "missing.safetensors")
    assert not marker.exists()


def test_segment_engine_runs_a_resunet_end_to_end(tmp_path: Path) -> None:
    from semdask.cli.main import main
    from semdask.inference.segment import segment

    net = _tiny(5)
    model = save_model(net, ModelConfig.for_model(net, classes=list(PHASES),
                                                  colours=list(COLOURS), pixel_size_um=0.04458,
                                                  window=64), tmp_path / "tiny.safetensors")
    mosaic = tmp_path / "m.ome.zarr"
    res = CliRunner().invoke(main, ["synth", str(mosaic), "--shape", "512", "512", "--seed",
                                    "2", "--chunk", "256"])
    assert res.exit_code == 0, res.output
    r = segment(mosaic, model=model, chunk=128, name="a", progress=False)
    assert r.plan.window == 64
    segment(mosaic, model=model, chunk=256, name="b", progress=False)
    a = np.asarray(sio.open_labels(mosaic, "a").data.compute())
    b = np.asarray(sio.open_labels(mosaic, "b").data.compute())
    assert a.shape == (512, 512) and a.max() < 4
    np.testing.assert_array_equal(a, b)  # chunk-invariant with the residual net too
    w = segment(mosaic, model=model, mode="whole-chunk", chunk=256, name="w", progress=False)
    assert w.plan.halo >= net.receptive_field() // 2
    wl = np.asarray(sio.open_labels(mosaic, "w").data.compute())
    x = sio.open_mosaic(mosaic).image.compute()
    assert wl.shape == x.shape and len(np.unique(wl)) > 1


def test_whole_chunk_halo_covers_the_receptive_field() -> None:
    import dask
    import dask.array as da

    from semdask.inference.graph import blended_probs, plan_inference
    from semdask.inference.normalise import NormStats

    net = _tiny(6)
    img = np.random.default_rng(1).integers(0, 256, (150, 170)).astype(np.uint8)
    out = []
    for chunk in (32, 96):
        plan = plan_inference(img.shape, mode="whole-chunk", window=32, chunk=chunk,
                              receptive_field=receptive_field(net))
        with dask.config.set(scheduler="synchronous"):
            out.append(blended_probs(da.from_array(img, chunks=64), net, n_classes=4,
                                     stats=NormStats(0, 255), plan=plan,
                                     batch_size=1).compute())
    assert plan.halo == 80  # ceil(159 / 2) rounded up to the 16-px grid
    hp, wp = plan.padded_shape
    h, w, r = *img.shape, plan.halo
    big = np.pad(img, ((r, hp - h + r), (r, wp - w + r)), mode="symmetric").astype(np.float32)
    with torch.inference_mode():
        ref = torch.softmax(net(torch.from_numpy(big / 255)[None, None]), 1)[0].numpy()
    ref = ref[:, r: r + h, r: r + w]
    assert float(ref.std(axis=(1, 2)).min()) > 1e-3  # the probabilities vary over the image
    np.testing.assert_allclose(out[0], ref, atol=1e-5)
    np.testing.assert_allclose(out[1], ref, atol=1e-5)
