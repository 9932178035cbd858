"""Training benchmark: does the data loader keep up with the training step? Side by side.

On one synthetic SOC mosaic (written to a temporary OME-Zarr store) this prints, in one run:

(a) the data-loader rate in patches/s: PatchDataset + balanced WindowSampler through a
    DataLoader, plus the batched augmentation (``--augment`` preset) on the training device,
    for each ``--workers`` count (default 0 and 2);
(b) the training-step rate in patches/s: forward + backward + Adam step of the default
    U-Net (16-32-64-128-256) on the same batch size and window, data already in memory;
(c) the ratio a / b per worker count: > 1 means the loader never starves the model.

    python benchmarks/training.py --shape 2048 2048 --window 256 --batch-size 8
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from semdask.nets.model import UNet
from semdask.storage import io as sio
from semdask.synthetic.sem import synthetic_mosaic
from semdask.training.augment import Augmenter
from semdask.training.dataset import PatchDataset
from semdask.training.losses import build_loss
from semdask.training.samplers import WindowSampler, make_split


def loader_rate(ds: PatchDataset, sampler: WindowSampler, *, batch_size: int, workers: int,
                batches: int, augment: str, device: torch.device) -> float:
    """Patches/s delivered by the loader + on-device augmentation (after one warm-up batch)."""
    kw: dict[str, Any] = {"num_workers": workers, "batch_size": batch_size,
                          "pin_memory": device.type == "cuda"}  # as semdask train does
    if workers:
        kw.update(persistent_workers=True,  # as semdask train: no fork of a CUDA process
                  multiprocessing_context="forkserver" if device.type == "cuda" else "fork")
    loader = DataLoader(ds, sampler=sampler, **kw)
    aug = Augmenter("none" if augment == "off" else augment, seed=0)
    it = iter(loader)
    next(it)  # start workers, open stores
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        img, lab = (b.to(device, non_blocking=True) for b in next(it))
        if augment != "off":
            img, lab = aug(img, lab)
        n += img.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def augment_rate(batch: tuple[torch.Tensor, torch.Tensor], *, augment: str, reps: int,
                 device: torch.device) -> float:
    """Patches/s of the augmentation alone, on a batch already on the device."""
    img, lab = (b.to(device) for b in batch)
    aug = Augmenter(augment, seed=0)
    aug(img, lab)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        aug(img, lab)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return reps * img.shape[0] / (time.perf_counter() - t0)


def step_rate(n_classes: int, *, batch_size: int, window: int, steps: int,
              device: torch.device, amp: bool = False) -> float:
    """Patches/s through forward + backward + Adam of the default U-Net (data in memory).

    ``amp``: bf16 autocast on CUDA, as ``semdask train`` does there (weights stay fp32).
    """
    torch.manual_seed(0)
    net = UNet(n_classes=n_classes).to(device)
    net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = build_loss("ce+dice", n_classes=n_classes)
    x = torch.rand(batch_size, 1, window, window, device=device).contiguous(
        memory_format=torch.channels_last)
    y = torch.randint(0, n_classes, (batch_size, window, window), device=device)

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = net(x)
        loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs=2, type=int, default=(2048, 2048), metavar=("H", "W"))
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=20, help="Loader batches timed.")
    ap.add_argument("--steps", type=int, default=5, help="Training steps timed.")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--augment", default="default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                    help="bf16 autocast in the training step [default: on for CUDA].")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    amp = dev.type == "cuda" if a.amp is None else a.amp
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "bench.ome.zarr"
        m = synthetic_mosaic(tuple(a.shape), seed=1, chunk=1024)
        sio.write_synthetic(store, m)
        ds = PatchDataset([store], window=a.window)
        plan = make_split(ds.shapes, a.window, split="bands", val_fraction=0.2)
        n = (a.batches + 1) * a.batch_size
        sampler = WindowSampler(ds.shapes, a.window, plan=plan, class_maps=ds.class_maps(),
                                balance=0.5, length=n, seed=0)
        print(f"mosaic {a.shape[0]} x {a.shape[1]}, window {a.window}, batch {a.batch_size}, "
              f"augment {a.augment!r}, device {dev}, amp {amp}, torch threads {a.threads}, "
              f"{len(os.sched_getaffinity(0))} CPU cores, load average "
              f"{os.getloadavg()[0]:.1f}")
        loaders = {w: loader_rate(ds, sampler, batch_size=a.batch_size, workers=w,
                                  batches=a.batches, augment=a.augment, device=dev)
                   for w in a.workers}
        # the two halves of the 0-worker loader, to see which one limits it
        reading = loader_rate(ds, sampler, batch_size=a.batch_size, workers=0,
                              batches=a.batches, augment="off", device=dev)
        batch = next(iter(DataLoader(ds, sampler=sampler, batch_size=a.batch_size)))
        augmenting = augment_rate(batch, augment=a.augment, reps=a.batches, device=dev)
        steps = step_rate(len(ds.classes), batch_size=a.batch_size, window=a.window,
                          steps=a.steps, device=dev, amp=amp)
    print(f"(b) training step (default U-Net fwd+bwd+Adam): {steps:8.1f} patches/s")
    print(f"load average now {os.getloadavg()[0]:.1f} (other processes slow both rates)")
    for w, rate in loaders.items():
        print(f"(a) loader + augment, {w} workers:             {rate:8.1f} patches/s   "
              f"(c) loader/step = {rate / steps:6.2f}")
    print(f"    of which reading alone (0 workers, to {dev.type}): {reading:8.1f} patches/s; "
          f"augmentation alone ({a.augment!r} on {dev.type}): {augmenting:8.1f} patches/s")


if __name__ == "__main__":
    main()
