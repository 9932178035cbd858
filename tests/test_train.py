"""Window sampler, patch dataset, training loop, resume and the ``semdask train`` CLI."""

from __future__ import annotations

import csv
import pickle
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader

from semdask.errors import InputError, ModelError
from semdask.inference.normalise import apply, compute_stats
from semdask.nets.model import load_model
from semdask.nets.unet import UNet
from semdask.storage import io
from semdask.synthetic.sem import COLOURS, PHASES, SynthParams, synthetic_mosaic
from semdask.training.dataset import PatchDataset, augment
from semdask.training.samplers import WindowSampler, split_rows
from semdask.training.train import train

TINY = (4, 8, 16)  # widths of a fast test U-Net


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two small synthetic mosaics with truth labels (different sizes and NiO)."""
    root = tmp_path_factory.mktemp("stores")
    paths = []
    for seed, shape, nio in ((5, (256, 320), 0.3), (6, (192, 256), 0.1)):
        m = synthetic_mosaic(shape, seed=seed, chunk=64, params=SynthParams(nio_fraction=nio))
        p = root / f"s{seed}.ome.zarr"
        io.write_image(p, m.image, pixel_size_um=m.pixel_size_um, chunk=64)
        io.write_labels(p, m.truth, name="truth", classes=PHASES, colours=COLOURS, chunk=64)
        paths.append(p)
    return paths


def _windows(sampler):
    return [(s, y, x) for s, y, x in sampler]


def test_sampler_seeded_and_leak_free() -> None:
    shapes = [(1000, 700), (600, 900)]
    a = WindowSampler(shapes, 96, split="train", length=300, seed=3)
    b = WindowSampler(shapes, 96, split="train", length=300, seed=3)
    assert _windows(a) == _windows(b)
    assert _windows(a) == _windows(a)  # re-iterable, same pass
    a.set_epoch(1)
    assert _windows(a) != _windows(b)
    assert _windows(WindowSampler(shapes, 96, length=300, seed=4)) != _windows(b)
    val = WindowSampler(shapes, 96, split="val", val_fraction=0.2)
    assert len(val) == len(_windows(val))
    for s, (h, w) in enumerate(shapes):
        cut = split_rows(h, 0.2, "train")[1]
        assert split_rows(h, 0.2, "val") == (cut, h)
        tr = [(y, x) for si, y, x in _windows(a) + _windows(b) if si == s]
        va = [(y, x) for si, y, x in _windows(val) if si == s]
        assert tr and va
        assert all(y + 96 <= cut and 0 <= x <= w - 96 for y, x in tr)  # never touch val rows
        assert all(cut <= y <= h - 96 and 0 <= x <= w - 96 for y, x in va)
        cover = np.zeros((h, w), bool)  # the val grid covers the whole band
        for y, x in va:
            cover[y:y + 96, x:x + 96] = True
        assert cover[cut:].all()
        assert not cover[:cut].any()
    with pytest.raises(InputError, match="val region"):
        WindowSampler([(100, 100)], 64, split="val", val_fraction=0.2)


def test_dataset_reads_exact_window(stores) -> None:
    m, lab = io.open_mosaic(stores[0]), io.open_labels(stores[0], "truth")
    img, truth = m.image.compute(), lab.data.compute()
    stats = [compute_stats(io.open_mosaic(p).image) for p in stores]
    ds = PatchDataset(stores, labels="truth", window=48, stats=stats, tile=64, cache_mb=0.01)
    assert ds.classes == list(PHASES)
    assert ds.shapes == [(256, 320), (192, 256)]
    for y, x in [(0, 0), (37, 101), (208, 272), (60, 64)]:
        x_t, y_t = ds[(0, y, x)]
        assert x_t.dtype == torch.float32 and x_t.shape == (1, 48, 48)
        assert y_t.dtype == torch.int64 and y_t.shape == (48, 48)
        np.testing.assert_array_equal(x_t[0].numpy(), apply(img[y:y + 48, x:x + 48], stats[0]))
        np.testing.assert_array_equal(y_t.numpy(), truth[y:y + 48, x:x + 48])
    # bounded per-process tile cache (0.01 MiB: a few 64x64 tiles)
    assert ds._cached <= 0.01 * 2**20 + 64 * 64
    with pytest.raises(InputError, match="inside"):
        ds[(0, 250, 0)]


@pytest.mark.parametrize("context", ["fork", "forkserver"])
def test_dataset_pickles_without_handles_and_works_with_workers(stores, context) -> None:
    ds = PatchDataset(stores, window=32, augment=True)
    ds[(1, 0, 0)]  # opens the stores and fills the cache in this process
    state = pickle.loads(pickle.dumps(ds))
    assert state._arrays == [] and len(state._cache) == 0
    sampler = WindowSampler(ds.shapes, 32, length=12, seed=0)
    torch.manual_seed(0)
    loader = DataLoader(ds, sampler=sampler, batch_size=4, num_workers=2,
                        multiprocessing_context=context)  # forkserver: train's CUDA choice
    batches = list(loader)
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == (4, 1, 32, 32) and y.shape == (4, 32, 32)
    assert int(y.min()) >= 0 and int(y.max()) <= 3
    assert torch.isfinite(x).all()


def test_augment_moves_image_and_label_together() -> None:
    rng = np.random.default_rng(0)
    lab = rng.integers(0, 4, size=(40, 40)).astype(np.uint8)
    img = lab.astype(np.float32) / 3
    for seed in range(12):
        a_img, a_lab = augment(img, lab, np.random.default_rng(seed))
        assert a_img.dtype == np.float32 and a_img.shape == (40, 40)
        assert np.corrcoef(a_img.ravel(), a_lab.ravel())[0, 1] > 0.8  # same geometry
        assert np.bincount(a_lab.ravel(), minlength=4).tolist() == np.bincount(
            lab.ravel(), minlength=4).tolist()
    seen = {augment(img, lab, np.random.default_rng(s))[1].tobytes() for s in range(100)}
    assert len(seen) == 8  # the 8 flips/rotations of the dihedral group


def test_few_steps_lower_the_loss(stores) -> None:
    ds = PatchDataset(stores, window=64)
    batch = [ds[(0, y, x)] for y, x in ((0, 0), (64, 64), (128, 200))]
    img = torch.stack([b[0] for b in batch])
    lab = torch.stack([b[1] for b in batch])
    torch.manual_seed(0)
    net = UNet(widths=TINY, dropout=(0.0, 0.0, 0.0))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(net(img), lab)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_train_writes_outputs_and_resumes(stores, tmp_path) -> None:
    out = tmp_path / "m.safetensors"
    r = train(stores, out, window=32, epochs=1, steps_per_epoch=3, batch_size=2, seed=1,
              widths=TINY, val_window=32)
    assert r.model_path == out and out.exists() and out.with_suffix(".yaml").exists()
    assert r.checkpoint.exists() and r.best_epoch == 1 and [h["epoch"] for h in r.history] == [1]
    _net, cfg = load_model(out)
    assert cfg.classes == list(PHASES) and cfg.provenance["epoch"] == 1
    assert "norm" not in cfg.kwargs  # batch norms (the default) folded into the model file
    assert load_model(r.checkpoint)[1].kwargs["norm"] == "batch"  # kept for resuming
    assert cfg.kwargs["dropout"] == [0.0] * len(TINY)  # no dropout with batch norms
    assert cfg.window == 256 and cfg.pixel_size_um == pytest.approx(0.04458)
    r2 = train(stores, out, window=32, epochs=3, steps_per_epoch=3, batch_size=2, seed=1,
               widths=(8, 8), val_window=32, resume=r.checkpoint)
    assert [h["epoch"] for h in r2.history] == [1, 2, 3]  # continued at epoch 2
    _, cfg2 = load_model(r2.checkpoint)
    assert cfg2.kwargs["widths"] == list(TINY)  # the checkpoint's architecture, not widths=
    assert cfg2.provenance["epoch"] == 3
    with open(r2.metrics_csv) as f:
        rows = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3]
    assert 0.0 <= float(rows[-1]["val_miou"]) <= 1.0
    assert set(rows[0]) >= {"val_accuracy", "iou_pore", "iou_Ni", "iou_NiO", "iou_YSZ"}


def test_train_cli(stores, tmp_path) -> None:
    from semdask.cli.main import main

    out = tmp_path / "cli.safetensors"
    res = CliRunner().invoke(main, ["train", *map(str, stores), "--out", str(out),
                                    "--epochs", "1", "--steps-per-epoch", "1",
                                    "--batch-size", "1", "--window", "32", "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert "best val mIoU" in res.output
    assert out.exists()
    bad = CliRunner().invoke(main, ["train", str(stores[0]), "--out", str(tmp_path / "x.pt")])
    assert bad.exit_code == 2
    assert ".safetensors" in bad.output


# --------------------------------------------------------------- research training path
@pytest.fixture(scope="module")
def weighted_store(tmp_path_factory):
    """A synthetic store whose labels have an unlabelled (255) patch, plus a weight group."""
    import dask.array as da

    p = tmp_path_factory.mktemp("weighted") / "w.ome.zarr"
    m = synthetic_mosaic((192, 192), seed=9, chunk=64, params=SynthParams(nio_fraction=0.2))
    truth = np.asarray(m.truth.compute())
    truth[:40, :40] = 255
    wgt = np.linspace(0.2, 1.0, 192 * 192, dtype=np.float32).reshape(192, 192)
    io.write_image(p, m.image, pixel_size_um=m.pixel_size_um, chunk=64)
    io.write_labels(p, da.from_array(truth, chunks=64), name="truth", classes=PHASES,
                    colours=COLOURS, chunk=64)
    io.write_extra_image(p, "rf-confidence", da.from_array(wgt, chunks=64), chunk=64,
                         dtype=np.float16)
    return p, truth, wgt


def test_dataset_ignore_label_and_weights(weighted_store) -> None:
    p, truth, wgt = weighted_store
    ds = PatchDataset([p], window=48, weights="rf-confidence", tile=64)
    img, lab, w = ds[(0, 16, 24)]
    assert img.shape == (1, 48, 48) and w.dtype == torch.float32
    ign = truth[16:64, 24:72] == 255
    assert ign.any() and (~ign).any()
    assert (lab.numpy()[ign] == -100).all() and (lab.numpy()[~ign] < 4).all()
    assert (w.numpy()[ign] == 0).all()
    np.testing.assert_allclose(w.numpy()[~ign], wgt[16:64, 24:72][~ign], rtol=1e-3)
    aug = PatchDataset([p], window=48, weights="rf-confidence", tile=64, augment=True)
    torch.manual_seed(3)
    plain = ds[(0, 0, 0)][1]
    moved = 0
    for _ in range(4):
        _, a_lab, a_w = aug[(0, 0, 0)]
        assert ((a_lab == -100) == (a_w == 0)).all()  # weights moved with the labels
        moved += int(not torch.equal(a_lab, plain))
    assert moved >= 2
    maps = ds.class_maps(scale=4)
    assert maps.scale == 4 and maps.maps[0].shape == (48, 48)
    assert (maps.maps[0][:10, :10] == 255).all() and maps.counts().sum() == 48 * 48 - 100


def test_evaluate_pools_counts_and_skips_ignored_pixels() -> None:
    from semdask.training.train import evaluate

    class Fixed(torch.nn.Module):
        def forward(self, x):  # predicts class 1 everywhere
            return torch.stack([torch.zeros_like(x[:, 0]), torch.ones_like(x[:, 0])], 1)

    lab = torch.tensor([[[0, 1], [1, -100]]])
    loader = [(torch.zeros(1, 1, 2, 2), lab), (torch.zeros(1, 1, 2, 2), torch.ones_like(lab))]
    cm = evaluate(Fixed(), loader, 2, torch.device("cpu"))
    assert cm.tolist() == [[0, 1], [0, 6]]  # the -100 pixel is not counted


def test_train_research_options(stores, weighted_store, tmp_path) -> None:
    out = tmp_path / "r.safetensors"
    tb = tmp_path / "tb"
    r = train([*stores, weighted_store[0]], out, window=32, epochs=2, steps_per_epoch=2,
              batch_size=2, widths=TINY, val_window=32, split="blocks", block=64,
              loss="ce+dice", class_weights="auto", optimizer="adamw", schedule="plateau",
              sampling="balanced", augment="strong", tensorboard=tb, seed=3)
    assert [h["epoch"] for h in r.history] == [1, 2]
    _, cfg = load_model(out)
    prov = cfg.provenance
    assert prov["split"]["kind"] == "blocks" and prov["split"]["guard"] == 32
    assert prov["loss"] == "ce+dice" and prov["optimizer"] == "adamw"
    assert len(prov["class_weights"]) == 4 and prov["sampling"] == "balanced"
    assert prov["pixel_sizes_um"] == [pytest.approx(0.04458)] * 3
    assert list(tb.glob("events.out.tfevents.*"))
    with pytest.raises(InputError, match="weights"):  # the other stores lack the group
        train([*stores, weighted_store[0]], tmp_path / "x.safetensors", window=32,
              weights="rf-confidence")
    r_w = train([weighted_store[0]], tmp_path / "w.safetensors", window=32, epochs=1,
                steps_per_epoch=2, batch_size=2, widths=TINY, val_window=32, loss="focal",
                weights="rf-confidence", sampling="uniform", augment="light")
    assert 0.0 <= r_w.best_miou <= 1.0


def test_train_early_stopping(stores, tmp_path) -> None:
    r = train(stores, tmp_path / "p.safetensors", window=32, epochs=5, steps_per_epoch=1,
              batch_size=1, widths=TINY, val_window=32, lr=0.0, patience=1, augment="none",
              loss="ce", norm="none")
    # lr 0 and no batch-norm statistics to update: the validation mIoU never improves
    assert r.stopped_early and [h["epoch"] for h in r.history] == [1, 2]
    # without norms the paper's net: its dropout rates by level; --dropout sets every block
    assert load_model(r.checkpoint)[1].kwargs["dropout"] == [0.1, 0.1, 0.2]
    r = train(stores, tmp_path / "d.safetensors", window=32, epochs=1, steps_per_epoch=1,
              batch_size=1, widths=TINY, val_window=32, dropout=0.25)
    assert load_model(r.model_path)[1].kwargs["dropout"] == [0.25] * len(TINY)


def test_train_ensemble_members(stores, tmp_path) -> None:
    out = tmp_path / "ens.safetensors"
    r = train(stores, out, window=32, epochs=1, steps_per_epoch=1, batch_size=1, widths=TINY,
              val_window=32, ensemble=2, split="blocks", block=64, seed=4)
    assert [m.model_path.name for m in r.members] == ["ens-m0.safetensors",
                                                     "ens-m1.safetensors"]
    assert not out.exists()
    provs = [load_model(m.model_path)[1].provenance for m in r.members]
    assert [p["seed"] for p in provs] == [4, 5]
    assert [p["split"]["fold"] for p in provs] == [0, 1]
    with pytest.raises(InputError, match="ensemble"):
        train(stores, out, ensemble=2, resume=r.members[0].checkpoint)


def test_train_resunet_frozen_encoder(stores, tmp_path) -> None:
    from safetensors.torch import load_file

    from semdask.nets.resunet import ResUNet

    kw: dict[str, Any] = {"layers": [1, 1], "widths": [8, 16], "stem_width": 4}
    enc = tmp_path / "enc.safetensors"
    torch.manual_seed(11)
    ResUNet(**kw).save_encoder(enc)
    out = tmp_path / "res.safetensors"
    r = train(stores, out, window=32, epochs=1, steps_per_epoch=2, batch_size=2,
              val_window=32, arch="resunet", arch_kwargs=kw, encoder_weights=enc,
              freeze_encoder_epochs=1)
    net, cfg = load_model(r.checkpoint)
    assert cfg.architecture == "resunet"
    saved = load_file(str(enc))
    state = net.state_dict()
    for k, v in saved.items():  # frozen: weights and BatchNorm statistics unchanged
        torch.testing.assert_close(state[k], v)
    assert not torch.equal(state["head.weight"], ResUNet(**kw).state_dict()["head.weight"])
    with pytest.raises(ModelError, match=r"ResUNet encoder.*--arch resunet"):  # unet: refused
        train(stores, tmp_path / "u.safetensors", encoder_weights=enc)


def test_train_cli_research_flags(stores, tmp_path) -> None:
    from semdask.cli.main import main

    out = tmp_path / "c.safetensors"
    res = CliRunner().invoke(main, ["train", str(stores[0]), "--val-store", str(stores[1]),
                                    "--out", str(out), "--epochs", "1", "--steps-per-epoch",
                                    "1", "--batch-size", "1", "--window", "32", "--loss", "ce",
                                    "--augment", "none", "--sampling", "uniform",
                                    "--ensemble", "2"])
    assert res.exit_code == 0, res.output
    assert res.output.count("best val mIoU") == 2
    _, cfg = load_model(tmp_path / "c-m1.safetensors")
    assert cfg.provenance["split"]["kind"] == "stores"
    assert cfg.provenance["trained_on"] == ["s5.ome.zarr", "s6.ome.zarr"]


@pytest.mark.gpu
def test_train_on_cuda_with_bf16_autocast(stores, tmp_path) -> None:
    r = train(stores, tmp_path / "g.safetensors", window=32, epochs=1, steps_per_epoch=2,
              batch_size=2, widths=TINY, val_window=32, device="cuda", amp=True,
              augment="strong")
    assert np.isfinite(r.history[0]["train_loss"]) and 0.0 <= r.best_miou <= 1.0
    net, _ = load_model(r.model_path)
    assert next(net.parameters()).dtype == torch.float32  # weights stay fp32


def test_loader_processes_never_fork_a_cuda_process() -> None:
    from semdask.training.train import _loader_context

    assert _loader_context(torch.device("cuda")) == "forkserver"
    assert _loader_context(torch.device("cpu")) == "fork"
