"""Train the U-Net on windows of OME-Zarr mosaics (cross-entropy, Adam, leak-free validation).

Every epoch: ``steps_per_epoch`` random training windows (top rows of every
mosaic), then validation on a grid over the held-out bottom band
(``val_fraction``), one log line and one row of ``<out>.metrics.csv``. The best
model (validation mIoU) is written to ``out``; the last epoch to
``<out>.last.safetensors`` with the optimizer state in
``<out>.last.optim.safetensors`` (tensors) — nothing is pickled. Pass the
``.last.safetensors`` path as ``resume`` to continue.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .dataset import PatchDataset, WindowSampler
from .errors import InputError, ModelError
from .metrics import scores_from_confusion
from .model import ModelConfig, Normalisation, UNet, load_model, save_model

__all__ = ["TrainResult", "checkpoint_paths", "evaluate", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Outcome of :func:`train`."""

    model_path: Path
    checkpoint: Path
    metrics_csv: Path
    best_epoch: int
    best_miou: float
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def checkpoint_paths(out: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """(last-epoch model, its optimizer state, metrics CSV) next to ``out``."""
    out = Path(out)
    stem = out.with_suffix("")
    return (stem.with_name(stem.name + ".last.safetensors"),
            stem.with_name(stem.name + ".last.optim.safetensors"),
            stem.with_name(stem.name + ".metrics.csv"))


def _save_optimizer(opt: torch.optim.Optimizer, path: Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach()
               .cpu().contiguous().clone()
               for i, st in sd["state"].items() for k, v in st.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"param_groups": json.dumps(sd["param_groups"]),
                                           "semdask_train": json.dumps(meta)})
    os.replace(tmp, path)


def _load_optimizer(opt: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        return dict(json.loads(meta["semdask_train"]))
    except Exception as e:  # any failure: not our optimizer file
        raise ModelError(f"optimizer state {path}", expected="the .last.optim.safetensors "
                         "written by semdask train", got=f"{type(e).__name__}: {e}",
                         fix="resume from the .last.safetensors of the same run") from None


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, n_classes: int,
             device: torch.device) -> np.ndarray:
    """Confusion matrix (rows truth, columns prediction) over a loader of (image, label)."""
    model.eval()
    cm = torch.zeros(n_classes * n_classes, dtype=torch.int64)
    for img, lab in loader:
        pred = model(img.to(device).contiguous(memory_format=torch.channels_last)).argmax(1)
        lab = lab.to(device)
        ok = lab >= 0
        idx = lab[ok] * n_classes + pred[ok]
        cm += torch.bincount(idx.cpu(), minlength=n_classes * n_classes)
    return cm.reshape(n_classes, n_classes).numpy()


def train(stores: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
          labels: str = "truth", window: int = 256, epochs: int = 20,
          steps_per_epoch: int = 100, batch_size: int = 8, lr: float = 1e-3,
          val_fraction: float = 0.2, num_workers: int = 0, seed: int = 0,
          device: str = "cpu", resume: str | os.PathLike[str] | None = None,
          widths: Sequence[int] = (16, 32, 64, 128, 256), val_window: int | None = None,
          infer_window: int = 256, low_percentile: float = 0.5,
          high_percentile: float = 99.5, schedule: str = "cosine") -> TrainResult:
    """Train a U-Net on ``stores`` and write the best model to ``out`` (.safetensors).

    Parameters
    ----------
    stores : sequence of path
        OME-Zarr mosaics with ``labels/<labels>``.
    out : path
        Output model (``.safetensors``; a ``.yaml`` sidecar is written too).
    labels : str
        Label group to learn (``"truth"`` for synthetic mosaics, ``"phases"``).
    window : int
        Training window edge (multiple of 16); the model runs on any multiple of 16.
    epochs, steps_per_epoch, batch_size, lr : int, int, int, float
        Optimisation (Adam, cross-entropy).
    val_fraction : float
        Bottom band of every mosaic held out for validation.
    num_workers : int
        DataLoader worker processes (0: read in this process).
    seed : int
        Seed of weights, windows and augmentations.
    device : str
        Torch device.
    resume : path, optional
        A ``<out>.last.safetensors`` checkpoint to continue from (its next epoch).
    widths : sequence of int
        U-Net widths (ignored when resuming: the checkpoint's architecture is used).
    val_window : int, optional
        Validation window edge (default ``max(window, 256)``, capped by the band).
    infer_window : int
        Window recorded in the config for inference.
    schedule : {"cosine", "constant"}
        Learning rate per step: cosine decay from ``lr`` to ``lr / 50`` over all
        epochs, or constant ``lr`` (the paper's setting).
    """
    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(str(out), expected="a .safetensors output path",
                         fix=f"use --out {out.with_suffix('.safetensors')}")
    if window % 16 or window < 16 or epochs < 1 or steps_per_epoch < 1 or batch_size < 1:
        raise InputError("training parameters", expected="window a multiple of 16, epochs, "
                         "steps and batch size >= 1", got=f"window={window}, epochs={epochs}, "
                         f"steps={steps_per_epoch}, batch={batch_size}")
    if schedule not in ("cosine", "constant"):
        raise InputError("schedule", expected="'cosine' or 'constant'", got=repr(schedule))
    dev = torch.device(device)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    ckpt, optim_path, csv_path = checkpoint_paths(out)
    norm = Normalisation(low_percentile=low_percentile, high_percentile=high_percentile)
    train_ds = PatchDataset(stores, labels=labels, window=window, augment=True,
                            low_percentile=low_percentile, high_percentile=high_percentile)
    n_classes = len(train_ds.classes)
    heights = [h for h, _ in train_ds.shapes]
    band = min(h - split for h, split in ((h, round(h * (1 - val_fraction))) for h in heights))
    vwin = min(val_window or max(window, 256), (band // 16) * 16)
    if vwin < 16:
        raise InputError("val_fraction", expected="a validation band of at least 16 rows",
                         got=f"{band} rows", fix="raise val_fraction or use larger mosaics")
    val_ds = PatchDataset(stores, labels=labels, window=vwin, stats=train_ds.stats)
    train_sampler = WindowSampler(train_ds.shapes, window, split="train",
                                  val_fraction=val_fraction, length=steps_per_epoch * batch_size,
                                  seed=seed)
    val_sampler = WindowSampler(train_ds.shapes, vwin, split="val", val_fraction=val_fraction)
    torch.manual_seed(seed)
    start, best_epoch, best_miou, history = 1, 0, -1.0, []
    if resume is not None:
        model, rconf = load_model(resume, device=dev)
        if rconf.n_classes != n_classes:
            raise ModelError(str(resume), expected=f"{n_classes} classes",
                             got=f"{rconf.n_classes}")
    else:
        model = UNet(in_channels=1, n_classes=n_classes, widths=widths).to(dev)
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if resume is not None:
        rp = Path(resume)
        meta = _load_optimizer(opt, rp.with_name(rp.name.removesuffix(".safetensors")
                                                 + ".optim.safetensors"))
        start = int(meta["epoch"]) + 1
        best_epoch, best_miou = int(meta["best_epoch"]), float(meta["best_miou"])
        history = list(meta.get("history", []))
        log.info("resuming from %s at epoch %d (best mIoU %.4f)", resume, start, best_miou)
    config = ModelConfig.for_model(
        model, classes=train_ds.classes, colours=train_ds.colours,
        pixel_size_um=train_ds.pixel_size_um, normalisation=norm, window=infer_window,
        provenance={"trained_on": [str(Path(s).name) for s in stores], "labels": labels,
                    "train_window": window, "batch_size": batch_size, "lr": lr, "seed": seed,
                    "val_fraction": val_fraction, "steps_per_epoch": steps_per_epoch,
                    "epochs": epochs, "schedule": schedule,
                    "torch": torch.__version__})
    loader_kw: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers,
                                 "persistent_workers": False}
    if num_workers > 0:
        loader_kw["multiprocessing_context"] = "spawn" if os.name == "nt" else "fork"
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
    fields = ["epoch", "train_loss", "val_accuracy", "val_miou",
              *[f"iou_{c}" for c in train_ds.classes], "seconds"]
    if start == 1 or not csv_path.exists():
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerow(fields)
    for epoch in range(start, epochs + 1):
        te = time.perf_counter()
        torch.manual_seed(seed * 100003 + epoch)
        train_sampler.set_epoch(epoch)
        model.train()
        losses = []
        loader = DataLoader(train_ds, sampler=train_sampler, drop_last=False, **loader_kw)
        for step, (img, lab) in enumerate(loader):
            t = ((epoch - 1) * steps_per_epoch + step) / (epochs * steps_per_epoch)
            for g in opt.param_groups:
                g["lr"] = lr if schedule == "constant" else lr * (
                    0.02 + 0.49 * (1 + math.cos(math.pi * t)))
            img = img.to(dev).contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(img), lab.to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        vloader = DataLoader(val_ds, sampler=val_sampler, **{**loader_kw, "batch_size": 4})
        scores = scores_from_confusion(evaluate(model, vloader, n_classes, dev),
                                       train_ds.classes)
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)),
               "val_accuracy": scores["accuracy"], "val_miou": scores["miou"],
               **{f"iou_{c}": scores["iou"].get(c, math.nan) for c in train_ds.classes},
               "seconds": round(time.perf_counter() - te, 2)}
        history.append(row)
        ious = " ".join(f"{c}={scores['iou'].get(c, math.nan):.4f}" for c in train_ds.classes)
        log.info("epoch %d/%d loss %.4f val acc %.4f mIoU %.4f (%s) %.0fs", epoch, epochs,
                 row["train_loss"], row["val_accuracy"], row["val_miou"], ious, row["seconds"])
        with open(csv_path, "a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in fields])
        cfg = config.model_copy(update={"provenance": {**config.provenance, "epoch": epoch,
                                                       "val": {k: row[k] for k in fields}}})
        if scores["miou"] > best_miou:
            best_epoch, best_miou = epoch, float(scores["miou"])
            save_model(model, cfg, out)
        save_model(model, cfg, ckpt)
        _save_optimizer(opt, optim_path, {"epoch": epoch, "best_epoch": best_epoch,
                                          "best_miou": best_miou, "history": history})
    if not out.exists():  # resumed after the last epoch: keep the checkpoint as the model
        save_model(load_model(ckpt)[0], config, out)
    return TrainResult(out, ckpt, csv_path, best_epoch, best_miou, history,
                       time.perf_counter() - t0)
