"""Train a segmentation network on windows of OME-Zarr mosaics (leak-free validation).

Every epoch: ``steps_per_epoch`` training windows (uniform, or class-balanced from a
low-resolution label map: :mod:`semdask.samplers`), augmented in batches on the
training device (:mod:`semdask.augment`), one optimiser step each (CE, CE + Dice or
focal loss from :mod:`semdask.losses`, optional class and per-pixel weights, bf16
autocast on CUDA); then validation on a grid over the held-out part of the split
(a band, whole stores or blocks, with a guard gap), one log line, one row of
``<out>.metrics.csv`` and TensorBoard scalars (``tensorboard``). Validation mIoU
comes from a confusion matrix pooled over all validation windows, ignoring
unlabelled pixels. The best model (validation mIoU) is written to ``out``; the last
epoch to ``<out>.last.safetensors`` with the optimizer state in
``<out>.last.optim.safetensors`` (tensors) — nothing is pickled. Pass the
``.last.safetensors`` path as ``resume`` to continue. ``patience`` stops early;
``ensemble=M`` trains M members (seed + i, validation fold + i) to
``<stem>-m<i>.safetensors``.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from semdask.analysis.metrics import scores_from_confusion
from semdask.errors import InputError, ModelError
from semdask.nets.model import ModelConfig, Normalisation, build_model, load_model, save_model
from semdask.nets.resunet import ResUNet
from semdask.training.augment import Augmenter
from semdask.training.checkpoint import (
    checkpoint_paths,
    load_optimizer,
    member_paths,
    save_optimizer,
)
from semdask.training.dataset import IGNORE_INDEX, PatchDataset
from semdask.training.losses import build_loss, class_weights_from_counts
from semdask.training.samplers import WindowSampler, make_split
from semdask.training.scale import training_scale

__all__ = ["TrainResult", "checkpoint_paths", "evaluate", "member_paths", "train"]

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """Outcome of :func:`train` (for an ensemble: member 0, with every member in ``members``)."""

    model_path: Path
    checkpoint: Path
    metrics_csv: Path
    best_epoch: int
    best_miou: float
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False
    members: list[TrainResult] = field(default_factory=list)


def _loader_workers(n: int | None, dev: torch.device) -> int:
    if n is not None:
        if n < 0:
            raise InputError("workers", expected="0 or more DataLoader processes", got=str(n))
        return n
    return 0 if dev.type != "cuda" else max(0, min(8, len(os.sched_getaffinity(0)) - 1))


def _loader_context(dev: torch.device) -> str:
    """How loader processes start: fork on the CPU (fast); forkserver once CUDA runs here.

    Forking a process that holds CUDA and pin-memory threads can deadlock the child;
    the fork server is a clean process forked before any of that.
    """
    if os.name == "nt":  # pragma: no cover - no fork on Windows
        return "spawn"
    return "forkserver" if dev.type == "cuda" else "fork"


def _autocast(dev: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    if amp and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, n_classes: int, device: torch.device, *,
             amp: bool = False) -> np.ndarray:
    """Confusion matrix (rows truth, columns prediction) pooled over a loader.

    Batches are ``(image, label[, weight])``; pixels labelled ``< 0`` (ignored) are
    not counted.
    """
    model.eval()
    cm = torch.zeros(n_classes * n_classes, dtype=torch.int64)
    for batch in loader:
        img, lab = batch[0], batch[1]
        with _autocast(device, amp):
            pred = model(img.to(device).contiguous(memory_format=torch.channels_last)).argmax(1)
        lab = lab.to(device)
        ok = lab >= 0
        idx = lab[ok] * n_classes + pred[ok]
        cm += torch.bincount(idx.cpu(), minlength=n_classes * n_classes)
    return cm.reshape(n_classes, n_classes).numpy()


def train(stores: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
          labels: str = "truth", window: int = 256, epochs: int = 20,
          steps_per_epoch: int = 100, batch_size: int = 8, lr: float = 1e-3,
          val_fraction: float = 0.2, num_workers: int | None = None, seed: int = 0,
          device: str = "cpu", resume: str | os.PathLike[str] | None = None,
          widths: Sequence[int] = (16, 32, 64, 128, 256), val_window: int | None = None,
          infer_window: int = 256, low_percentile: float = 0.5,
          high_percentile: float = 99.5, schedule: str = "cosine", arch: str = "unet",
          arch_kwargs: dict[str, Any] | None = None, loss: str = "ce+dice",
          dice_weight: float = 0.4, class_weights: str = "none", optimizer: str = "adam",
          weight_decay: float | None = None, sampling: str = "balanced", balance: float = 0.5,
          split: str = "bands", val_stores: Sequence[int] | None = None, fold: int = 0,
          block: int | None = None, guard: int | None = None, weights: str | None = None,
          augment: str = "default", amp: bool = True, patience: int | None = None,
          tensorboard: str | os.PathLike[str] | None = None, freeze_encoder_epochs: int = 0,
          encoder_weights: str | os.PathLike[str] | None = None,
          ensemble: int = 1, pixel_size_um: float | None = None,
          scale: float | None = None) -> TrainResult:
    """Train a network on ``stores`` and write the best model to ``out`` (.safetensors).

    Parameters
    ----------
    stores : sequence of path
        OME-Zarr mosaics with ``labels/<labels>`` (255 = unlabelled, ignored).
    out : path
        Output model (``.safetensors``; a ``.yaml`` sidecar is written too).
    labels : str
        Label group to learn (``"truth"`` for synthetic mosaics, ``"phases"``).
    window : int
        Training window edge (a multiple of 16); the model runs on any multiple of 16.
    epochs, steps_per_epoch, batch_size, lr : int, int, int, float
        Optimisation.
    val_fraction : float
        Share held out for validation (band height, 1/k of stores or blocks).
    num_workers : int, optional
        DataLoader worker processes (0: read in this process); persistent, each
        with its own bounded tile cache. Default: 0 on the CPU (the training step is
        the slower half there), on CUDA the cores less one, at most 8 (one process
        reads about 230 patches/s; an H200 steps through about 1400).
    seed : int
        Seed of weights, windows and augmentations.
    device : str
        Torch device.
    resume : path, optional
        A ``<out>.last.safetensors`` checkpoint to continue from (its next epoch).
    widths : sequence of int
        U-Net widths (``arch="unet"``; ignored when resuming).
    val_window : int, optional
        Validation window edge (default ``max(window, 256)``, capped by the held-out part).
    infer_window : int
        Window recorded in the config for inference.
    schedule : {"cosine", "plateau", "constant"}
        Cosine decay from ``lr`` to ``lr / 50``; halve after 2 epochs without a better
        validation mIoU; or constant ``lr`` (the paper's setting).
    arch, arch_kwargs : str, dict
        ``"unet"`` or ``"resunet"`` and constructor arguments (default: ``widths``
        for the U-Net, the ResUNet defaults).
    loss, dice_weight : str, float
        ``"ce"``, ``"ce+dice"`` (``(1 - dice_weight) CE + dice_weight Dice``), ``"focal"``.
    class_weights : {"none", "auto"}
        ``"auto"``: inverse-sqrt frequencies pooled over the training labels
        (low-resolution level).
    optimizer, weight_decay : str, float
        ``"adam"`` or ``"adamw"`` (weight decay default 0 / 0.01).
    sampling, balance : str, float
        ``"balanced"``: a share ``balance`` of windows centred on a pixel of a
        uniformly drawn class (oversamples rare phases); ``"uniform"``.
    split, val_stores, fold, block, guard : see :func:`semdask.training.samplers.make_split`
        ``"bands"``, ``"stores"`` (indices ``val_stores`` or every k-th store) or
        ``"blocks"``.
    weights : str, optional
        Sibling image group of per-pixel loss weights (``<name>-confidence`` of
        ``semdask label``).
    augment : {"none", "light", "default", "strong"}
        Augmentation preset (:mod:`semdask.augment`).
    amp : bool
        bf16 autocast on CUDA (no effect on CPU).
    patience : int, optional
        Stop after this many epochs without a better validation mIoU.
    tensorboard : path, optional
        Write TensorBoard scalars there (when tensorboard is installed).
    freeze_encoder_epochs, encoder_weights : int, path
        ResUNet transfer learning: load the encoder from a safetensors file and keep
        it frozen for the first epochs.
    ensemble : int
        Members to train (seed + i, fold + i), written to ``<stem>-m<i>.safetensors``.
    pixel_size_um, scale : float, optional
        Train at this pixel size, or at ``scale`` x each store's sampling: resampled
        copies of the stores are written to a temporary folder first
        (:mod:`semdask.trainscale`); the model records the new pixel size.
    """
    o = SimpleNamespace(**{k: v for k, v in locals().items() if k not in ("stores", "out")})
    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(str(out), expected="a .safetensors output path",
                         fix=f"use --out {out.with_suffix('.safetensors')}")
    if window % 16 or window < 16 or epochs < 1 or steps_per_epoch < 1 or batch_size < 1:
        raise InputError("training parameters", expected="window a multiple of 16, epochs, "
                         "steps and batch size >= 1", got=f"window={window}, epochs={epochs}, "
                         f"steps={steps_per_epoch}, batch={batch_size}")
    for name, value, allowed in (("schedule", schedule, ("cosine", "plateau", "constant")),
                                 ("optimizer", optimizer, ("adam", "adamw")),
                                 ("sampling", sampling, ("balanced", "uniform")),
                                 ("class_weights", class_weights, ("none", "auto")),
                                 ("arch", arch, ("unet", "resunet"))):
        if value not in allowed:
            raise InputError(name, expected=" | ".join(allowed), got=repr(value))
    if ensemble < 1 or (ensemble > 1 and resume is not None):
        raise InputError("ensemble", expected="one member or more, and no --resume with "
                         "several", got=f"ensemble={ensemble}, resume={resume}",
                         fix="resume one member: --out STEM-m<i>.safetensors --resume "
                         "STEM-m<i>.last.safetensors --seed SEED+i --fold FOLD+i")
    if (freeze_encoder_epochs or encoder_weights) and arch != "resunet" and resume is None:
        raise InputError("encoder options", expected="--arch resunet", got=f"--arch {arch}")
    with training_scale(stores, pixel_size_um=pixel_size_um, scale=scale, labels=labels,
                        weights=weights) as scaled:
        o.trained_on = [p.name for p in scaled.originals]
        o.scaling = ({"factors": scaled.factors, "pixel_size_um": pixel_size_um,
                      "scale": scale} if scaled.rescaled else None)
        members = [_member(scaled.paths, path, o, seed=seed + i, fold=fold + i)
                   for i, path in enumerate(member_paths(out, ensemble))]
    first = members[0]
    if ensemble > 1:
        log.info("ensemble val mIoU: %s", ", ".join(f"m{i} {m.best_miou:.4f}"
                                                    for i, m in enumerate(members)))
        first.members = members
    first.seconds = time.perf_counter() - t0
    return first


def _batches(loader: DataLoader[Any], dev: torch.device) -> Iterator[list[torch.Tensor]]:
    for batch in loader:
        yield [b.to(dev, non_blocking=True) for b in batch]


def _member(stores: Sequence[str | os.PathLike[str]], out: Path, o: SimpleNamespace, *,
            seed: int, fold: int) -> TrainResult:
    t0 = time.perf_counter()
    dev = torch.device(o.device)
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0))))
    ckpt, optim_path, csv_path = checkpoint_paths(out)
    norm = Normalisation(low_percentile=o.low_percentile, high_percentile=o.high_percentile)
    train_ds = PatchDataset(stores, labels=o.labels, window=o.window, weights=o.weights,
                            low_percentile=o.low_percentile, high_percentile=o.high_percentile)
    classes, n_classes = train_ds.classes, len(train_ds.classes)
    plan = make_split(train_ds.shapes, o.window, split=o.split, val_fraction=o.val_fraction,
                      fold=fold, val_stores=o.val_stores, block=o.block, guard=o.guard,
                      seed=o.seed)
    fit = max(min(y1 - y0, x1 - x0) for rects in plan.val for y0, y1, x0, x1 in rects)
    vwin = min(o.val_window or max(o.window, 256), (fit // 16) * 16)
    if vwin < 16:
        raise InputError(f"validation part of the {o.split} split", expected="a region of at "
                         "least 16 x 16 px", got=f"{fit} px", fix="raise val_fraction or "
                         "--block, or use larger mosaics")
    val_ds = PatchDataset(stores, labels=o.labels, window=vwin, stats=train_ds.stats,
                          weights=o.weights)
    maps = train_ds.class_maps() if (o.sampling == "balanced" or
                                     o.class_weights == "auto") else None
    train_sampler = WindowSampler(train_ds.shapes, o.window, split="train", plan=plan,
                                  length=o.steps_per_epoch * o.batch_size, seed=seed,
                                  class_maps=maps if o.sampling == "balanced" else None,
                                  balance=o.balance)
    val_sampler = WindowSampler(train_ds.shapes, vwin, split="val", plan=plan)
    cw = None
    if o.class_weights == "auto" and maps is not None:
        cw = class_weights_from_counts(maps.counts(plan))
        log.info("class weights %s", dict(zip(classes, (round(float(v), 3) for v in cw),
                                              strict=True)))
    torch.manual_seed(seed)
    start, best_epoch, best_miou, history, lr_scale = 1, 0, -1.0, [], 1.0
    if o.resume is not None:
        model, rconf = load_model(o.resume, device=dev)
        if rconf.n_classes != n_classes:
            raise ModelError(str(o.resume), expected=f"{n_classes} classes",
                             got=f"{rconf.n_classes}")
    else:
        kw = dict(o.arch_kwargs or ({"widths": list(o.widths)} if o.arch == "unet" else {}))
        model = build_model(ModelConfig(architecture=o.arch, classes=classes, n_classes=n_classes,
                                        kwargs={**kw, "n_classes": n_classes})).to(dev)
        if o.encoder_weights is not None and isinstance(model, ResUNet):
            model.load_encoder(o.encoder_weights)
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    wd = o.weight_decay if o.weight_decay is not None else (0.01 if o.optimizer == "adamw" else 0)
    opt_cls = torch.optim.AdamW if o.optimizer == "adamw" else torch.optim.Adam
    opt = opt_cls(model.parameters(), lr=o.lr, weight_decay=wd)
    if o.resume is not None:
        rp = Path(o.resume)
        meta = load_optimizer(opt, rp.with_name(rp.name.removesuffix(".safetensors")
                                                 + ".optim.safetensors"))
        start = int(meta["epoch"]) + 1
        best_epoch, best_miou = int(meta["best_epoch"]), float(meta["best_miou"])
        history, lr_scale = list(meta.get("history", [])), float(meta.get("lr_scale", 1.0))
        log.info("resuming from %s at epoch %d (best mIoU %.4f)", o.resume, start, best_miou)
    config = ModelConfig.for_model(
        model, classes=classes, colours=train_ds.colours, pixel_size_um=train_ds.pixel_size_um,
        normalisation=norm, window=o.infer_window,
        provenance={"trained_on": o.trained_on, "training_scale": o.scaling, "labels": o.labels,
                    "pixel_sizes_um": train_ds.pixel_sizes, "train_window": o.window,
                    "batch_size": o.batch_size, "lr": o.lr, "seed": seed,
                    "steps_per_epoch": o.steps_per_epoch, "epochs": o.epochs,
                    "schedule": o.schedule, "loss": o.loss, "dice_weight": o.dice_weight,
                    "class_weights": None if cw is None else [float(v) for v in cw],
                    "optimizer": o.optimizer, "weight_decay": wd, "sampling": o.sampling,
                    "balance": o.balance, "augment": o.augment, "weights": o.weights,
                    "split": {"kind": plan.kind, "fold": fold, "guard": plan.guard,
                              "val_fraction": o.val_fraction, "val_window": vwin},
                    "torch": torch.__version__})
    loss_fn = build_loss(o.loss, n_classes=n_classes, class_weights=cw,
                         ignore_index=IGNORE_INDEX, dice_weight=o.dice_weight).to(dev)
    aug = Augmenter(o.augment, seed=seed)
    workers = _loader_workers(o.num_workers, dev)
    kw_loader: dict[str, Any] = {"num_workers": workers, "pin_memory": dev.type == "cuda"}
    if workers > 0:
        kw_loader.update(persistent_workers=True, multiprocessing_context=_loader_context(dev))
    loader = DataLoader(train_ds, sampler=train_sampler, batch_size=o.batch_size, **kw_loader)
    vloader = DataLoader(val_ds, sampler=val_sampler, batch_size=4, **kw_loader)
    fields = ["epoch", "train_loss", "lr", "val_accuracy", "val_miou",
              *[f"iou_{c}" for c in classes], "seconds"]
    if start == 1 or not csv_path.exists():
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            csv.writer(f).writerow(fields)
    writer = _tensorboard(o.tensorboard, out, len(member_paths(out, o.ensemble)) > 1)
    stopped, total = False, o.epochs * o.steps_per_epoch
    for epoch in range(start, o.epochs + 1):
        if o.patience is not None and best_epoch and epoch - 1 - best_epoch >= o.patience:
            stopped = True
            log.info("early stop: no better validation mIoU for %d epochs", o.patience)
            break
        te = time.perf_counter()
        torch.manual_seed(seed * 100003 + epoch)
        aug.reseed(seed * 100003 + epoch)
        train_sampler.set_epoch(epoch)
        if isinstance(model, ResUNet) and o.freeze_encoder_epochs:
            _ = (model.freeze_encoder() if epoch <= o.freeze_encoder_epochs
                 else model.unfreeze_encoder())
        model.train()
        losses, lr_now = [], o.lr
        for step, batch in enumerate(_batches(loader, dev)):
            t = ((epoch - 1) * o.steps_per_epoch + step) / total
            lr_now = o.lr * lr_scale if o.schedule != "cosine" else o.lr * (
                0.02 + 0.49 * (1 + math.cos(math.pi * t)))
            for g in opt.param_groups:
                g["lr"] = lr_now
            img, lab, *wgt = aug(*batch)
            with _autocast(dev, o.amp):
                logits = model(img.contiguous(memory_format=torch.channels_last))
            value = loss_fn(logits, lab, wgt[0] if wgt else None)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            losses.append(float(value.detach()))
        scores = scores_from_confusion(evaluate(model, vloader, n_classes, dev, amp=o.amp),
                                       classes)
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": lr_now,
               "val_accuracy": scores["accuracy"], "val_miou": scores["miou"],
               **{f"iou_{c}": scores["iou"].get(c, math.nan) for c in classes},
               "seconds": round(time.perf_counter() - te, 2)}
        history.append(row)
        ious = " ".join(f"{c}={scores['iou'].get(c, math.nan):.4f}" for c in classes)
        log.info("%s epoch %d/%d loss %.4f val acc %.4f mIoU %.4f (%s) %.0fs", out.name, epoch,
                 o.epochs, row["train_loss"], row["val_accuracy"], row["val_miou"], ious,
                 row["seconds"])
        with open(csv_path, "a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in fields])
        if writer is not None:
            for k in fields[1:-1]:
                writer.add_scalar(k.replace("val_", "val/").replace("iou_", "val/iou_"),
                                  float(row[k]), epoch)
            writer.flush()
        cfg = config.model_copy(update={"provenance": {**config.provenance, "epoch": epoch,
                                                       "val": {k: row[k] for k in fields}}})
        if scores["miou"] > best_miou:
            best_epoch, best_miou = epoch, float(scores["miou"])
            save_model(model, cfg, out)
        elif o.schedule == "plateau" and (epoch - best_epoch) % 2 == 0:
            lr_scale *= 0.5
        save_model(model, cfg, ckpt)
        save_optimizer(opt, optim_path, {"epoch": epoch, "best_epoch": best_epoch,
                                          "best_miou": best_miou, "history": history,
                                          "lr_scale": lr_scale})
    if writer is not None:
        writer.close()
    if not out.exists():  # resumed after the last epoch: keep the checkpoint as the model
        save_model(load_model(ckpt)[0], config, out)
    return TrainResult(out, ckpt, csv_path, best_epoch, best_miou, history,
                       time.perf_counter() - t0, stopped)


def _tensorboard(logdir: str | os.PathLike[str] | None, out: Path, several: bool) -> Any:
    if logdir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("tensorboard is not installed: no TensorBoard scalars (pip install "
                    "tensorboard)")
        return None
    return SummaryWriter(log_dir=str(Path(logdir) / out.stem) if several else str(logdir))
