"""Self-supervised pretraining: objective, lazy reads, the weights file, transfer into train."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from semdask.cli.main import main
from semdask.errors import InputError, ModelError
from semdask.nets.model import load_model
from semdask.nets.resunet import ResUNet
from semdask.nets.unet import UNet
from semdask.storage import io
from semdask.synthetic.sem import COLOURS, PHASES, synthetic_mosaic
from semdask.training.dataset import PatchDataset
from semdask.training.pretrain import corrupt, pretrain
from semdask.training.train import train
from semdask.training.transfer import PRETRAIN_KEY, load_pretrained, set_encoder_frozen

TINY = {"widths": [8, 16]}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """An unlabelled mosaic (image only) and a labelled one."""
    root = tmp_path_factory.mktemp("pretrain")
    m = synthetic_mosaic((192, 192), seed=3, chunk=64)
    unlabelled = root / "unlabelled.ome.zarr"
    io.write_image(unlabelled, m.image, pixel_size_um=m.pixel_size_um, chunk=64)
    m = synthetic_mosaic((192, 160), seed=4, chunk=64)
    labelled = root / "labelled.ome.zarr"
    io.write_image(labelled, m.image, pixel_size_um=m.pixel_size_um, chunk=64)
    io.write_labels(labelled, m.truth, name="truth", classes=PHASES, colours=COLOURS, chunk=64)
    return unlabelled, labelled


@pytest.fixture(scope="module")
def encoder(stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "encoder.safetensors"
    return pretrain([stores[0]], out, arch_kwargs=TINY, budget="16steps", window=32,
                    batch_size=4, lr=1e-2, seed=1)


def _file(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def test_corruption_masks_cells_and_adds_noise() -> None:
    clean = torch.rand(3, 1, 64, 64)
    noisy, mask = corrupt(clean, torch.Generator().manual_seed(0), mask_ratio=0.5, cell=16,
                          sigma_max=0.0, shot_max=0.0)
    cells = mask[:, :, ::16, ::16]  # whole 16-px cells, about half of them
    assert torch.equal(mask, cells.repeat_interleave(16, 2).repeat_interleave(16, 3))
    assert 0.2 < float(cells.float().mean()) < 0.8
    mean = clean.mean(dim=(2, 3), keepdim=True).expand_as(clean)
    assert torch.equal(noisy[mask], mean[mask]) and torch.equal(noisy[~mask], clean[~mask])
    noisy2, _ = corrupt(clean, torch.Generator().manual_seed(0), mask_ratio=0.0,
                        sigma_max=0.1, shot_max=0.01)
    assert 0.0 < float((noisy2 - clean).std()) < 0.1  # noise only, no masking


def _objective(net, batch):
    noisy, _ = corrupt(batch, torch.Generator().manual_seed(7))
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(net.eval()(noisy), batch))


def test_objective_decreases_on_unlabelled_store(encoder, stores) -> None:
    assert encoder.steps == len(encoder.losses) == 16
    tensors, meta = _file(encoder.path)
    ds = PatchDataset([stores[0]], labels=None, window=32)  # unlabelled mode
    batch = torch.stack([ds[(0, y, x)][0] for y in (0, 80, 160) for x in (0, 96, 160)])
    torch.manual_seed(1)  # pretrain's initial weights (same seed)
    before = UNet(n_classes=1, norm="batch", **TINY)  # batch norms: pretrain's default
    torch.nn.init.constant_(before.head.bias, 0.5)
    after = UNet(n_classes=1, norm="batch", **TINY)
    after.load_state_dict(tensors)  # the file holds the whole reconstruction network
    assert _objective(after, batch) < 0.5 * _objective(before, batch)
    cfg = json.loads(meta[PRETRAIN_KEY])
    assert cfg["architecture"] == "unet" and cfg["kwargs"]["widths"] == TINY["widths"]
    assert cfg["kwargs"]["norm"] == "batch"
    assert cfg["objective"]["name"] == "inpaint+denoise" and cfg["steps"] == 16
    assert cfg["window"] == 32 and cfg["normalisation"]["high_percentile"] == 99.5
    assert [s["name"] for s in cfg["stores"]] == [stores[0].name]
    assert cfg["stores"][0]["shape"] == [192, 192] and cfg["stores"][0]["shards"]
    assert {k.split(".")[0] for k in tensors} == {"enc", "up", "dec", "head"}
    assert encoder.path.with_suffix(".yaml").is_file()
    with pytest.raises(ModelError):  # not a segmentation model: segment cannot use it
        load_model(encoder.path)


def test_windows_are_read_lazily(tmp_path, monkeypatch) -> None:
    rng = np.random.default_rng(0)
    big = tmp_path / "big.ome.zarr"
    io.write_image(big, rng.integers(0, 255, (512, 512), dtype=np.uint8), pixel_size_um=0.05,
                   chunk=64)
    seen: set[tuple[int, ...]] = set()
    orig = PatchDataset._tile

    def spy(self, store, kind, ty, tx):
        seen.add((store, kind, ty, tx))
        return orig(self, store, kind, ty, tx)

    monkeypatch.setattr(PatchDataset, "_tile", spy)
    pretrain([big], tmp_path / "e.safetensors", arch_kwargs=TINY, budget="2steps", window=32,
             batch_size=2, tile=64)
    assert seen and all(kind == 0 for _, kind, _, _ in seen)  # image only, no labels
    assert len(seen) <= 2 * 2 * 4 < 64  # at most 4 tiles per window, of 64 in the mosaic


def test_encoder_round_trips_into_train(encoder, stores, tmp_path) -> None:
    file, _ = _file(encoder.path)
    net = UNet(widths=TINY["widths"], n_classes=4, norm="batch")  # as pretrain and train
    head = net.head.weight.detach().clone()
    names = load_pretrained(net, encoder.path)
    assert names == sorted(k for k in file if not k.startswith("head."))  # 1-channel head
    state = net.state_dict()
    assert all(torch.equal(state[k], file[k]) for k in names)
    assert torch.equal(net.head.weight, head)  # the head stays as initialised
    # dropout has no weights: a net with other dropout rates takes the same encoder
    other_dropout = UNet(widths=TINY["widths"], n_classes=4, norm="batch", dropout=(0.3, 0.3))
    assert load_pretrained(other_dropout, encoder.path) == names
    # through train: the encoder is frozen in epoch 1, so it must equal the file exactly
    r = train([stores[1]], tmp_path / "m.safetensors", widths=tuple(TINY["widths"]), window=32,
              epochs=1, steps_per_epoch=2, batch_size=2, plan=False,
              encoder_weights=encoder.path, freeze_encoder_epochs=1)
    trained, _ = load_model(r.checkpoint)  # unfolded (the model file has the norms folded)
    got = trained.state_dict()
    enc = [k for k in file if k.startswith("enc.") and not k.endswith("num_batches_tracked")]
    assert any(".norm" in k for k in enc)  # frozen: norm statistics kept as well
    assert enc and all(torch.equal(got[k], file[k]) for k in enc)
    assert any(not torch.equal(got[k], file[k]) for k in file if k.startswith("dec."))
    scratch = train([stores[1]], tmp_path / "s.safetensors", widths=tuple(TINY["widths"]),
                    window=32, epochs=1, steps_per_epoch=2, batch_size=2, plan=False)
    other = load_model(scratch.checkpoint)[0].state_dict()
    assert not any(torch.equal(other[k], file[k]) for k in enc if k.endswith("weight"))


def test_mismatched_architecture_is_refused(encoder, stores, tmp_path) -> None:
    with pytest.raises(ModelError, match=r"widths=\[8, 16, 32\].*widths=\[8, 16\]"):
        load_pretrained(UNet(widths=(8, 16, 32)), encoder.path)
    with pytest.raises(ModelError, match=r"resunet.*unet.*--arch unet"):
        load_pretrained(ResUNet(layers=(1, 1), widths=(8, 16), stem_width=4), encoder.path)
    res = runner_invoke(["train", str(stores[1]), "--out", str(tmp_path / "r.safetensors"),
                         "--arch", "resunet", "--encoder-weights", str(encoder.path),
                         "--no-plan", "--window", "32", "--epochs", "1"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "pretrained for unet" in res.output and "resunet" in res.output


def test_resunet_pretrains_and_loads(stores, tmp_path) -> None:
    kw = {"layers": [1, 1], "widths": [8, 16], "stem_width": 4}
    r = pretrain([stores[0]], tmp_path / "r.safetensors", arch="resunet", arch_kwargs=kw,
                 budget="2steps", window=32, batch_size=2, encoder_only=True)
    file, _ = _file(r.path)
    assert file and all(k.startswith("encoder.") for k in file)
    net = ResUNet(n_classes=3, **kw)
    assert load_pretrained(net, r.path) == sorted(file)
    assert all(torch.equal(net.state_dict()[k], file[k]) for k in file)
    set_encoder_frozen(net, True)
    assert not any(p.requires_grad for p in net.encoder_parameters())
    unet = UNet(widths=(4, 8))
    set_encoder_frozen(unet, True)
    assert not any(p.requires_grad for p in unet.enc.parameters())
    assert all(p.requires_grad for p in unet.dec.parameters())
    set_encoder_frozen(unet, False)
    assert all(p.requires_grad for p in unet.parameters())


def test_bad_inputs(stores, encoder, tmp_path) -> None:
    with pytest.raises(InputError, match="multiple of 2"):
        pretrain([stores[0]], tmp_path / "x.safetensors", arch_kwargs=TINY, window=31)
    with pytest.raises(InputError, match="--overwrite"):
        pretrain([stores[0]], encoder.path, arch_kwargs=TINY, window=32)
    with pytest.raises(InputError, match=r"\.safetensors"):
        pretrain([stores[0]], tmp_path / "x.pt", arch_kwargs=TINY)


def runner_invoke(args):
    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_cli_smoke(stores, tmp_path) -> None:
    out = tmp_path / "cli.safetensors"
    args = ["pretrain", str(stores[0]), "--out", str(out), "--budget", "2steps", "--window",
            "32", "--batch-size", "2"]
    res = runner_invoke(args)
    assert res.exit_code == 0, res.output
    assert out.is_file() and "--encoder-weights" in res.output and "2 steps" in res.output
    again = runner_invoke(args)  # never overwrites silently
    assert again.exit_code == 2 and "--overwrite" in again.output
    res = runner_invoke(["pretrain", str(tmp_path / "missing.ome.zarr"), "--out",
                         str(tmp_path / "m.safetensors")])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "missing.ome.zarr" in res.output


def test_trained_model_encoder_loads_into_a_normed_unet(tmp_path) -> None:
    from semdask.nets.model import ModelConfig, save_model

    torch.manual_seed(7)
    src = UNet(widths=(4, 8), n_classes=3).eval()  # a plain model file, e.g. a folded one
    path = save_model(src, ModelConfig.for_model(src, classes=["a", "b", "c"]),
                      tmp_path / "m.safetensors")
    net = UNet(widths=(4, 8), n_classes=4, norm="batch")
    names = load_pretrained(net, path)
    assert "enc.0.norm1.bias" in names and "enc.0.conv1.bias" not in names
    net.eval()
    x = torch.rand(1, 1, 16, 16)
    with torch.no_grad():  # conv biases became the norms' shifts: same encoder features
        torch.testing.assert_close(net.enc[0](x), src.enc[0](x), rtol=1e-4, atol=1e-4)
    set_encoder_frozen(net, True)
    assert net.enc[0].norm1.momentum == 0.0 and net.dec[0].norm1.momentum == 0.1
    set_encoder_frozen(net, False)
    assert net.enc[0].norm1.momentum == 0.1
