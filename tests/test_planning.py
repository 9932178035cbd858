"""Training plan: budget parsing, TrainConfig, fingerprint -> plan, budget fitting, CLI."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from semdask.errors import InputError
from semdask.nets.model import load_model
from semdask.storage import io
from semdask.training.augment import PRESETS
from semdask.training.config import (
    Augment,
    ClassWeights,
    Loss,
    Split,
    TrainConfig,
    choices,
    parse_budget,
)
from semdask.training.losses import LOSSES
from semdask.training.planning import (
    MAX_WINDOW,
    MIN_WIDTH_PX,
    ClassStats,
    Fingerprint,
    fingerprint,
    fit_schedule,
    plan,
)
from semdask.training.samplers import SPLITS
from semdask.training.train import train

TINY = (4, 8, 16)
CLASSES = ["background", "layer", "crack"]
COLOURS = [(0, 0, 0, 255), (0, 255, 0, 255), (255, 0, 0, 255)]


def _store(path: Path, lab: np.ndarray, seed: int = 0, pixel_size: float | None = 0.1) -> Path:
    """A store whose image is a noisy function of the labels."""
    rng = np.random.default_rng(seed)
    img = (np.array([60.0, 140.0, 230.0])[lab] + rng.normal(0, 12, lab.shape)).clip(0, 255)
    io.write_image(path, da.from_array(img.astype(np.uint8), chunks=128),
                   pixel_size_um=pixel_size, chunk=128)
    io.write_labels(path, da.from_array(lab.astype(np.uint8), chunks=128), name="truth",
                    classes=CLASSES, colours=COLOURS, chunk=128)
    return path


def _layered(h: int, w: int, *, layer: tuple[int, int], crack_w: int, seed: int) -> np.ndarray:
    """Background, a horizontal layer (rows ``layer``), vertical cracks ``crack_w`` px wide."""
    lab = np.zeros((h, w), np.uint8)
    lab[layer[0]:layer[1]] = 1
    rng = np.random.default_rng(seed)
    for x in rng.choice(np.arange(8, w - 8, 24), size=4, replace=False):
        lab[layer[0]:layer[1], x:x + crack_w] = 2
    return lab


@pytest.fixture(scope="module")
def thin(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("thin")
    return [_store(root / f"t{i}.ome.zarr", _layered(256, 256, layer=(60, 200), crack_w=2,
                                                     seed=i), seed=i) for i in range(2)]


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Big objects only (a 400-px square on a 1024 mosaic): context, nothing thin."""
    lab = np.zeros((1024, 1024), np.uint8)
    lab[200:600, 300:700] = 1
    lab[700:900, 100:300] = 2
    return [_store(tmp_path_factory.mktemp("blobs") / "b.ome.zarr", lab)]


# ------------------------------------------------------------------ config


def test_parse_budget() -> None:
    assert parse_budget("30m") == (1800.0, None)
    assert parse_budget("1h30m") == (5400.0, None)
    assert parse_budget("90s") == (90.0, None) == parse_budget(90)
    assert parse_budget("2000 steps") == (None, 2000) == parse_budget("2000steps")
    assert parse_budget(None) == (None, None)
    for bad in ("soon", "0m", "-5", "3x"):
        with pytest.raises(InputError, match="--budget 30m"):
            parse_budget(bad)


def test_option_enums_are_the_library_registries() -> None:
    assert set(choices(Loss)) == set(LOSSES)
    assert set(choices(Augment)) == set(PRESETS)
    assert set(choices(Split)) == set(SPLITS)


def test_train_config_validates_and_round_trips(tmp_path: Path) -> None:
    cfg = TrainConfig.from_kwargs(window=192, loss="focal", budget="10m", val_stores=[2])
    assert cfg.loss is Loss.FOCAL and cfg.budget_s == 600.0 and cfg.val_stores == (2,)
    again = TrainConfig.from_yaml(Path(cfg.to_yaml(tmp_path / "c.yaml") and tmp_path / "c.yaml"))
    assert again == cfg
    assert yaml.safe_load((tmp_path / "c.yaml").read_text())["loss"] == "focal"
    with pytest.raises(InputError, match=r"window \(--window\) = 100"):
        TrainConfig.from_kwargs(window=100)
    with pytest.raises(InputError, match="loss"):
        TrainConfig.from_kwargs(loss="dice")
    with pytest.raises(InputError, match="windw"):
        TrainConfig.from_kwargs(windw=64)
    with pytest.raises(InputError, match="pixel_size_um or scale"):
        TrainConfig.from_kwargs(scale=0.5, pixel_size_um=0.1)


# ------------------------------------------------------------------ fingerprint and plan


def test_fingerprint_measures_shares_widths_and_sizes(thin: list[Path]) -> None:
    fp = fingerprint(thin)
    labs = [np.asarray(io.open_labels(p, "truth").data) for p in thin]
    counts = np.bincount(np.concatenate([v.ravel() for v in labs]), minlength=3)
    shares = {c.name: c.share for c in fp.classes}
    assert shares == pytest.approx(dict(zip(CLASSES, counts / counts.sum(), strict=True)))
    width = {c.name: c.width_px for c in fp.classes}
    assert 1.0 <= width["crack"] <= 3.0  # 2 px wide cracks
    assert 10.0 < width["layer"] < 140.0  # the layer is 140 px thick, cut by cracks
    size = {c.name: c.size_px for c in fp.classes}
    assert size["crack"] == pytest.approx(np.sqrt(2 * 140))  # 2 x 140 px cracks
    assert size["background"] > 100.0
    assert fp.labelled_px == 2 * 256 * 256 and fp.shapes == ((256, 256), (256, 256))
    assert fp.pixel_sizes_um == (pytest.approx(0.1), pytest.approx(0.1))


def test_fingerprint_samples_crops_of_large_mosaics(blobs: list[Path]) -> None:
    fp = fingerprint(blobs, max_pixels=1 << 18)
    assert fp.sampled_px <= 1 << 18 and fp.labelled_px == 1024 * 1024
    assert fingerprint(blobs, max_pixels=1 << 18).to_dict() == fp.to_dict()  # seeded


def test_plan_keeps_thin_classes_at_full_resolution(thin: list[Path]) -> None:
    fp = fingerprint(thin)
    cfg, why = plan(fp, TrainConfig.from_kwargs(split="stores"))
    assert cfg.scale == 1.0 and "thinnest" in why["scale"]
    assert cfg.window == 192  # the smallest planned window (crack objects are ~17 px)
    banded, _ = plan(fp, TrainConfig())  # a band of 20 % + a guard of one window held out
    assert banded.window == 96  # the training part must hold a window and its guard
    assert cfg.balance == pytest.approx(0.60)  # cracks: 1.7 % of the pixels
    assert cfg.augment is Augment.STRONG  # 0.13 MPix labelled
    assert cfg.batch_size is not None and cfg.batch_size >= 4
    assert (cfg.epochs, cfg.steps_per_epoch) == (20, 100)
    assert cfg.class_weights is ClassWeights.AUTO and "rarest" in why["class_weights"]


def test_plan_downscales_for_context_when_nothing_is_thin(blobs: list[Path]) -> None:
    cfg, why = plan(fingerprint(blobs), TrainConfig.from_kwargs(split="stores"))
    assert cfg.scale is not None and 0.25 <= cfg.scale < 0.8 and "context" in why["scale"]
    assert cfg.window == MAX_WINDOW["cpu"]
    assert cfg.batch_size == 4  # never fewer windows per step (batch 2 hardly learned EBC1)


def test_explicit_values_win_and_no_plan_keeps_old_defaults(thin: list[Path]) -> None:
    fp = fingerprint(thin)
    cfg, why = plan(fp, TrainConfig.from_kwargs(window=64, balance=0.1, augment="light", epochs=3))
    assert (cfg.window, cfg.balance, cfg.augment, cfg.epochs) == (64, 0.1, Augment.LIGHT, 3)
    assert why["window"] == why["balance"] == why["epochs"] == "given"
    fixed, _ = plan(fp, TrainConfig(plan=False))
    assert (fixed.window, fixed.batch_size, fixed.epochs, fixed.steps_per_epoch) == (
        256, 8, 20, 100)
    assert fixed.scale is None and fixed.warmup == 0.0
    assert fixed.class_weights is ClassWeights.NONE
    given, why = plan(fp, TrainConfig.from_kwargs(class_weights="none"))
    assert given.class_weights is ClassWeights.NONE and why["class_weights"] == "given"


def test_plan_never_scales_a_thin_class_below_min_width() -> None:
    """Big objects ask for context (downscaling); thin classes and small mosaics set floors."""
    def fp(width: float, share: float = 0.005, edge: int = 1024) -> Fingerprint:
        return Fingerprint(((edge, edge),), (None,), edge * edge, edge * edge, (
            ClassStats("background", 0.70, 260.0, 413.0),
            ClassStats("layer", 0.295 - share, 75.0, 322.0),
            ClassStats("crack", share, width, 26.0)), {})

    cfg = TrainConfig.from_kwargs(split="stores")
    # a rare thin class (< 1 %) down to MIN_WIDTH_PX; context alone: 256 / (2 x 322)
    for width, want in ((3.0, 0.5), (2.0, 0.75), (1.0, 1.0), (60.0, 0.4)):
        got, why = plan(fp(width), cfg)
        assert got.scale == pytest.approx(want, abs=0.005), (width, why["scale"])
        assert got.scale * width >= MIN_WIDTH_PX - 1e-9 or got.scale == 1.0
    # a common thin class (>= 1 %) keeps twice that
    got, _ = plan(fp(4.0, share=0.05), cfg)
    assert got.scale == pytest.approx(0.75)
    got, _ = plan(fp(3.0, share=0.05), cfg)
    assert got.scale == 1.0
    # small mosaics keep >= 1.5 windows of 192 px
    got, why = plan(fp(60.0, edge=480), cfg)
    assert got.scale == pytest.approx(0.6) and got.window is not None and got.window <= 288


def test_plan_fits_a_step_budget(thin: list[Path]) -> None:
    cfg, _ = plan(fingerprint(thin), TrainConfig.from_kwargs(budget="1000 steps"))
    assert cfg.epochs is not None and cfg.steps_per_epoch is not None
    assert 1000 <= cfg.epochs * cfg.steps_per_epoch < 1000 + cfg.epochs


@pytest.mark.parametrize(("seconds", "step_s", "val_s"),
                         [(1800, 0.75, 7.0), (600, 0.5, 5.0), (20, 0.05, 0.2), (30, 2.0, 5.0)])
def test_fit_schedule_fills_the_budget(seconds: float, step_s: float, val_s: float) -> None:
    epochs, spe = fit_schedule(seconds, step_s=step_s, val_s=val_s)
    used = epochs * (spe * step_s + val_s)
    assert 0.9 * seconds <= used <= seconds
    assert epochs <= 40 and spe >= 1


# ------------------------------------------------------------------ train with a plan


def test_train_records_the_plan_and_the_cli_prints_it(thin: list[Path], tmp_path: Path) -> None:
    from semdask.cli.main import main

    out = tmp_path / "p.safetensors"
    res = CliRunner().invoke(main, ["train", str(thin[0]), "--val-store", str(thin[1]),
                                    "--out", str(out), "--budget", "6steps", "--window", "64",
                                    "--batch-size", "2", "--epochs", "2"])
    assert res.exit_code == 0, res.output
    assert "fingerprint: 1 stores" in res.output and "plan (budget 6 steps)" in res.output
    assert "crack:" in res.output and "balance" in res.output
    _, cfg = load_model(out)
    prov = cfg.provenance
    assert prov["epochs"] == 2 and prov["steps_per_epoch"] == 3 and prov["train_window"] == 64
    assert prov["plan"]["reasons"]["window"] == "given"
    assert prov["plan"]["config"]["balance"] == pytest.approx(0.60)
    saved = TrainConfig.from_yaml(tmp_path / "p.train.yaml")
    assert saved.window == 64 and saved.augment is Augment.STRONG and saved.split == "stores"
    # the saved run config reproduces the run: every planned value is now explicit
    res2 = CliRunner().invoke(main, ["train", str(thin[0]), "--val-store", str(thin[1]),
                                     "--out", str(tmp_path / "q.safetensors"), "--config",
                                     str(tmp_path / "p.train.yaml"), "--epochs", "1"])
    assert res2.exit_code == 0, res2.output
    _, cfg2 = load_model(tmp_path / "q.safetensors")
    assert cfg2.provenance["epochs"] == 1 and cfg2.provenance["steps_per_epoch"] == 3
    bad = CliRunner().invoke(main, ["train", str(thin[0]), "--out", str(out), "--budget", "x"])
    assert bad.exit_code != 0 and "--budget 30m" in bad.output and "Traceback" not in bad.output


@pytest.mark.slow
def test_wall_time_budget_is_respected_within_10_percent(thin: list[Path],
                                                         tmp_path: Path) -> None:
    t = time.perf_counter()
    r = train(thin, tmp_path / "b.safetensors", budget=30, widths=TINY, window=64,
              batch_size=2, val_window=64)
    wall = time.perf_counter() - t
    assert 27.0 <= wall <= 33.0, (wall, len(r.history))
    assert r.history and r.plan is not None and r.plan.budget_s == 30.0
    assert r.plan.epochs is not None and 1 <= len(r.history) <= r.plan.epochs  # refitted


def test_a_slow_first_epoch_does_not_shorten_the_budget(thin: list[Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # the first epoch pays one-off costs (here 4 s more in its validation); the schedule is
    # refitted on the later epochs, so the run still fills its budget (it used to end at
    # about half of it: the first epoch alone set the number of epochs)
    import semdask.training.train as tr

    real, calls = tr.evaluate, []

    def slow_once(*a: Any, **k: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # 1: the budget's timing batch, 2: the first epoch's validation
            time.sleep(4.0)
        return real(*a, **k)

    monkeypatch.setattr(tr, "evaluate", slow_once)
    t = time.perf_counter()
    r = train(thin, tmp_path / "s.safetensors", budget=20, widths=TINY, window=64,
              batch_size=2, val_window=64)
    wall = time.perf_counter() - t
    assert 17.0 <= wall <= 23.0, (wall, [h["seconds"] for h in r.history])
    assert r.plan is not None and r.plan.epochs == len(r.history) > 3
