"""Train a segmentation network on windows of OME-Zarr mosaics (leak-free validation).

Every epoch: ``steps_per_epoch`` training windows (uniform, or class-balanced from a
low-resolution label map: :mod:`semdask.training.samplers`), augmented in batches on the
training device (:mod:`semdask.training.augment`), one optimiser step each (CE, CE + Dice or
focal loss from :mod:`semdask.training.losses`, optional class and per-pixel weights, bf16
autocast on CUDA); then validation on a grid over the held-out part of the split
(a band, whole stores or blocks, with a guard gap), one log line, one row of
``<out>.metrics.csv`` and TensorBoard scalars (``tensorboard``). Validation mIoU
comes from a confusion matrix pooled over all validation windows, ignoring unlabelled
pixels. The best model (validation mIoU) is written to ``out``; the last epoch to
``<out>.last.safetensors``, optimizer state in ``<out>.last.optim.safetensors`` (tensors,
nothing pickled; pass the ``.last.safetensors`` path as ``resume`` to continue).
``patience`` stops early; ``ensemble=M`` trains M members (seed + i, fold + i).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
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
from semdask.nets.runtime import resolve_device
from semdask.progress import Progress
from semdask.training.augment import Augmenter
from semdask.training.checkpoint import (
    checkpoint_paths,
    load_optimizer,
    member_paths,
    save_optimizer,
)
from semdask.training.config import PLANNED, TrainConfig, unet_kwargs
from semdask.training.dataset import IGNORE_INDEX, PatchDataset
from semdask.training.engine import TrainStep, cpu_allocator, keep_update_kernel, make_optimizer
from semdask.training.losses import build_loss, class_weights_from_counts
from semdask.training.planning import (
    calibrate,
    fingerprint,
    fit_schedule,
    lr_at,
    plan,
    plan_table,
)
from semdask.training.samplers import WindowSampler, make_split
from semdask.training.scale import training_scale
from semdask.training.transfer import load_pretrained, set_encoder_frozen

__all__ = ["TrainConfig", "TrainResult", "checkpoint_paths", "evaluate", "member_paths",
           "train"]

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
    plan: TrainConfig | None = None


def _loader_workers(n: int | None, dev: torch.device) -> int:
    if n is not None:
        if n < 0:
            raise InputError("workers", expected="0 or more DataLoader processes", got=str(n))
        return n
    return 0 if dev.type != "cuda" else max(0, min(8, len(os.sched_getaffinity(0)) - 1))


def _loader_context(dev: torch.device) -> str:
    """How loader processes start: fork on the CPU (fast); forkserver once CUDA runs here
    (forking a process that holds CUDA and pin-memory threads can deadlock the child)."""
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


def train(stores: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
          config: TrainConfig | None = None, *,
          on_plan: Callable[[str], None] | None = None, **overrides: Any) -> TrainResult:
    """Train a network on ``stores`` and write the best model to ``out`` (.safetensors).

    The recipe is planned from a fingerprint of the training data
    (:mod:`semdask.training.planning`): input scale, window, batch, class-balanced
    share, augmentation strength, warm-up, and with a ``budget`` the number of epochs
    and steps (timed first, so that training ends within the budget). Every planned
    value given explicitly wins. The plan is logged, written to ``<stem>.train.yaml``
    and recorded in the model's provenance.

    Parameters
    ----------
    stores : sequence of path
        OME-Zarr mosaics with ``labels/<labels>`` (255 = unlabelled, ignored).
    out : path
        Output model (``.safetensors``; ``.yaml`` and ``.train.yaml`` sidecars too).
    config : TrainConfig, optional
        A validated configuration (:class:`semdask.training.config.TrainConfig`).
    on_plan : callable, optional
        Called with the printable plan (and with the fitted schedule of a budget).
    **overrides
        Any :class:`~semdask.training.config.TrainConfig` field (``window``,
        ``budget="30m"``, ``loss``, ``split``, ...), applied on top of ``config``.

    Returns
    -------
    TrainResult
        Member 0 (with every member in ``members``); ``plan`` holds the resolved config.
    """
    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(str(out), expected="a .safetensors output path",
                         fix=f"use --out {out.with_suffix('.safetensors')}")
    base = config.model_dump() if config is not None else {}
    if "budget" in overrides:  # a new budget replaces the config's, of either kind
        base.pop("budget_s", None), base.pop("budget_steps", None)
    cfg = TrainConfig.from_kwargs(**{**base, **overrides})
    cfg = cfg.model_copy(update={"device": str(resolve_device(cfg.device))})  # "auto": once
    paths = [Path(s) for s in stores]
    if not paths:
        raise InputError("stores", expected="at least one OME-Zarr mosaic", got="none")
    fp = None
    if cfg.plan and any(getattr(cfg, k) is None for k in PLANNED):
        held = set(cfg.val_stores or ()) if cfg.split == "stores" else set()
        fp = fingerprint([s for i, s in enumerate(paths) if i not in held] or paths,
                         labels=cfg.labels, seed=cfg.seed)
    cfg, why = plan(fp, cfg)
    (on_plan or log.info)(plan_table(cfg, why, fp))
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg.to_yaml(out.with_name(out.stem + ".train.yaml"))
    o = SimpleNamespace(**cfg.model_dump(), deadline=None, val_s=0.0, on_plan=on_plan,
                        plan_record={"config": cfg.model_dump(mode="json"), "reasons": why,
                                     "fingerprint": None if fp is None else fp.to_dict()})
    with training_scale(paths, pixel_size_um=cfg.pixel_size_um,
                        scale=None if cfg.scale == 1.0 else cfg.scale, labels=cfg.labels,
                        weights=cfg.weights) as scaled:
        o.trained_on = [p.name for p in scaled.originals]
        o.scaling = ({"factors": scaled.factors, "pixel_size_um": cfg.pixel_size_um,
                      "scale": cfg.scale} if scaled.rescaled else None)
        members = []
        for i, path in enumerate(member_paths(out, cfg.ensemble)):
            if cfg.budget_s is not None:  # share what is left between the members left
                left = cfg.budget_s - (time.perf_counter() - t0)
                o.deadline = time.perf_counter() + max(left, 0.0) / (cfg.ensemble - i)
            members.append(_member(scaled.paths, path, o, seed=cfg.seed + i,
                                   fold=cfg.fold + i))
    first = members[0]
    if cfg.ensemble > 1:
        log.info("ensemble val mIoU: %s", ", ".join(f"m{i} {m.best_miou:.4f}"
                                                    for i, m in enumerate(members)))
        first.members = members
    first.seconds = time.perf_counter() - t0
    first.plan = cfg.model_copy(update={"epochs": o.epochs, "steps_per_epoch": o.steps_per_epoch})
    first.plan.to_yaml(out.with_name(out.stem + ".train.yaml"))
    return first


def _member(stores: Sequence[str | os.PathLike[str]], out: Path, o: SimpleNamespace, *,
            seed: int, fold: int) -> TrainResult:
    with cpu_allocator(o.device):  # activations reuse heap pages (engine docstring)
        return _train_member(stores, out, o, seed=seed, fold=fold)


def _train_member(stores: Sequence[str | os.PathLike[str]], out: Path, o: SimpleNamespace, *,
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
        if o.arch == "unet":  # batch norms and no dropout unless asked otherwise
            kw = unet_kwargs(kw, norm=str(o.norm), dropout=o.dropout)
        model = build_model(ModelConfig(architecture=o.arch, classes=classes, n_classes=n_classes,
                                        kwargs={**kw, "n_classes": n_classes})).to(dev)
        if o.encoder_weights is not None:  # pretrained encoder (+ decoder); head stays random
            load_pretrained(model, o.encoder_weights)
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    wd = o.weight_decay if o.weight_decay is not None else (0.01 if o.optimizer == "adamw" else 0)
    opt = make_optimizer(o.optimizer, model.parameters(), lr=o.lr, weight_decay=wd)
    if o.resume is not None:
        rp = Path(o.resume)
        meta = keep_update_kernel(opt, lambda: load_optimizer(
            opt, rp.with_name(rp.name.removesuffix(".safetensors") + ".optim.safetensors")))
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
                    "warmup": o.warmup, "plan": o.plan_record, "torch": torch.__version__})
    loss_fn = build_loss(o.loss, n_classes=n_classes, class_weights=cw,
                         ignore_index=IGNORE_INDEX, dice_weight=o.dice_weight).to(dev)
    aug = Augmenter(o.augment, seed=seed)
    train_step = TrainStep(model, opt, loss_fn, aug, dev, amp=o.amp)
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
    if o.deadline is not None and start == 1:
        _fit_budget(o, model, loss_fn, aug, loader, vloader, n_classes, dev)
        train_sampler.length = o.steps_per_epoch * o.batch_size
        config = config.model_copy(update={"provenance": {
            **config.provenance, "epochs": o.epochs, "steps_per_epoch": o.steps_per_epoch}})
    writer = _tensorboard(o.tensorboard, out, len(member_paths(out, o.ensemble)) > 1)
    stopped, total, epoch_s = False, o.epochs * o.steps_per_epoch, 0.0
    times: list[float] = []  # epoch wall times
    for epoch in itertools.count(start):
        if epoch > o.epochs:  # o.epochs is refitted to a budget after every epoch
            break
        if o.patience is not None and best_epoch and epoch - 1 - best_epoch >= o.patience:
            stopped = True
            log.info("early stop: no better validation mIoU for %d epochs", o.patience)
            break
        if o.deadline is not None and epoch > start and (
                time.perf_counter() + epoch_s > o.deadline + 0.05 * epoch_s):
            log.info("budget: stopping before epoch %d (%.0f s left, an epoch takes %.0f s)",
                     epoch, o.deadline - time.perf_counter(), epoch_s)
            break
        te = time.perf_counter()
        torch.manual_seed(seed * 100003 + epoch)
        aug.reseed(seed * 100003 + epoch)
        train_sampler.set_epoch(epoch)
        if o.freeze_encoder_epochs:
            set_encoder_frozen(model, epoch <= o.freeze_encoder_epochs)
        model.train()
        losses, lr_now = [], o.lr
        bar = Progress(o.steps_per_epoch, f"{out.name} epoch {epoch}", unit="step", step=100)
        for step, batch in enumerate(loader):
            if step and o.deadline is not None and time.perf_counter() + o.val_s > o.deadline:
                break  # over budget (a slower machine than timed): validate and stop
            t = ((epoch - 1) * o.steps_per_epoch + step) / total
            lr_now = lr_at(o.schedule, o.lr, t, warmup=o.warmup, lr_scale=lr_scale)
            losses.append(train_step(batch, lr_now))  # detached: no device sync per step
            bar.update()
        bar.close()
        scores = scores_from_confusion(evaluate(model, vloader, n_classes, dev, amp=o.amp),
                                       classes)
        row = {"epoch": epoch, "train_loss": float(torch.stack(losses).double().mean()),
               "lr": lr_now, "val_accuracy": scores["accuracy"], "val_miou": scores["miou"],
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
        save_model(model, cfg, ckpt, fold=False)
        save_optimizer(opt, optim_path, {"epoch": epoch, "best_epoch": best_epoch,
                                          "best_miou": best_miou, "history": history,
                                          "lr_scale": lr_scale})
        epoch_s = time.perf_counter() - te
        times.append(epoch_s)  # the first epoch pays warm-ups: refit on the later ones
        if o.deadline is not None:
            total = _refit(o, epoch, float(np.median(times[1:] or times)))
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


def _refit(o: SimpleNamespace, epoch: int, epoch_s: float) -> int:
    """Epochs that fit the deadline at a typical epoch time; the new total of steps."""
    fit = epoch + max(0, int((o.deadline - time.perf_counter()) // max(epoch_s, 1e-6)))
    given = o.plan_record["reasons"].get("epochs") == "given"
    o.epochs = min(fit, o.epochs) if given else fit
    o.plan_record["config"]["epochs"] = o.epochs
    return int(o.epochs * o.steps_per_epoch)


def _fit_budget(o: SimpleNamespace, model: torch.nn.Module, loss_fn: torch.nn.Module,
                aug: Augmenter, loader: DataLoader[Any], vloader: DataLoader[Any],
                n_classes: int, dev: torch.device) -> None:
    """Time a few steps and one validation batch, then size epochs x steps to the deadline."""
    net = copy.deepcopy(model)  # the timed steps leave the model as it is
    step = TrainStep(net, make_optimizer(o.optimizer, net.parameters(), lr=o.lr * 0.01,
                                         weight_decay=0.0), loss_fn, aug, dev, amp=o.amp)
    step_s = calibrate(step, loader, steps=2)
    tv = time.perf_counter()
    evaluate(model, [next(iter(vloader))], n_classes, dev, amp=o.amp)
    val_s = (time.perf_counter() - tv) * len(vloader)
    left = o.deadline - time.perf_counter() - step_s - 1.0  # margin: saves, stragglers
    given = o.plan_record["reasons"]
    spe = o.steps_per_epoch if given.get("steps_per_epoch") == "given" else None
    epochs, spe = fit_schedule(left, step_s=step_s, val_s=val_s, steps_per_epoch=spe)
    if given.get("epochs") == "given":
        epochs = min(epochs, o.epochs)
    o.epochs, o.steps_per_epoch, o.val_s = epochs, spe, val_s
    o.plan_record["config"].update(epochs=epochs, steps_per_epoch=spe)
    msg = (f"budget: {step_s:.2f} s per step, validation {val_s:.1f} s: {epochs} epochs x "
           f"{spe} steps in {left:.0f} s")
    (o.on_plan or log.info)(msg)

