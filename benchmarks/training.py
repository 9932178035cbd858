"""Training benchmark: does the data loader keep up with the training step? Side by side.

On one synthetic SOC mosaic (written to a temporary OME-Zarr store) this prints, in one run:

(a) the data-loader rate in patches/s: PatchDataset + balanced WindowSampler through a
    DataLoader, plus the batched augmentation (``--augment`` preset) on the training device,
    for each ``--workers`` count (default 0 and 2);
(b) the training-step rate in patches/s: forward + backward + Adam step of the default
    U-Net (16-32-64-128-256) on the same batch size and window, data already in memory,
    before (the old step: torch dropout, out-of-place ReLU, default Adam, glibc's
    default malloc) and after (the new defaults, :class:`semdask.training.engine.TrainStep`),
    in alternating rounds so that both see the same load; ``--sizes`` adds other
    windows and batches (patches/s and pixels/s);
(c) the ratio a / b (after) per worker count: > 1 means the loader never starves the model.

    python benchmarks/training.py --shape 2048 2048 --window 256 --batch-size 8
    python benchmarks/training.py --window 192 --batch-size 16 --sizes 128x32 256x8
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
import types
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from semdask.nets.unet import UNet
from semdask.storage import io as sio
from semdask.synthetic.sem import synthetic_mosaic
from semdask.training.augment import Augmenter
from semdask.training.dataset import PatchDataset
from semdask.training.engine import TrainStep, cpu_allocator, make_optimizer
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


def _legacy(net: UNet) -> UNet:
    """The U-Net as trained before the step engine: torch's dropout, out-of-place ReLU."""
    def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        return torch.relu(self.conv2(self.drop(x)))

    for blk in net.modules():
        drop: Any = getattr(blk, "drop", None)
        if hasattr(blk, "conv1") and drop is not None:
            blk.drop = torch.nn.Dropout(drop.p)
            blk.forward = types.MethodType(forward, blk)
    return net


def make_step(setting: str, n_classes: int, device: torch.device, *, amp: bool) -> TrainStep:
    """The training step of ``setting``: ``"before"`` (old) or ``"after"`` (new defaults).

    before: torch dropout, out-of-place ReLU, default Adam (and, on the CPU, glibc's
    default malloc, see :func:`step_rates`); after: :class:`TrainStep` as ``semdask
    train`` runs it. Both in channels-last layout, weights seeded alike.
    """
    torch.manual_seed(0)
    net = UNet(n_classes=n_classes).to(device)
    if setting == "before":
        opt: torch.optim.Optimizer = torch.optim.Adam(_legacy(net).parameters(), lr=1e-3)
    else:
        opt = make_optimizer("adam", net.parameters(), lr=1e-3)
    loss_fn = build_loss("ce+dice", n_classes=n_classes)
    return TrainStep(net, opt, lambda lo, la, w: loss_fn(lo.float(), la, w),
                     lambda *b: b, device, amp=amp)


def step_rates(n_classes: int, *, batch_size: int, window: int, steps: int, rounds: int,
               device: torch.device, amp: bool = False,
               settings: tuple[str, ...] = ("before", "after"),
               ) -> dict[str, list[tuple[float, float]]]:
    """(patches/s, CPU s/patch) of forward + backward + Adam (data in memory) per round.

    Settings alternate per round, so both see the same load from other processes; the
    CPU seconds of this process per patch depend less on that load than the rate.
    ``amp``: bf16 autocast on CUDA, as ``semdask train`` does there (weights stay fp32).
    """
    x = torch.rand(batch_size, 1, window, window, device=device)
    y = torch.randint(0, n_classes, (batch_size, window, window), device=device)
    steps_of = {s: make_step(s, n_classes, device, amp=amp) for s in settings}
    rates: dict[str, list[tuple[float, float]]] = {s: [] for s in settings}
    for _ in range(rounds):
        for s, step in steps_of.items():
            with cpu_allocator(device) if s == "after" else contextlib.nullcontext():
                step([x, y])  # warm-up (and first touch of the pages)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(steps):
                    loss = step([x, y])
                float(loss)
                n = steps * batch_size
                rates[s].append((n / (time.perf_counter() - t0), (time.process_time() - c0) / n))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs=2, type=int, default=(2048, 2048), metavar=("H", "W"))
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--batches", type=int, default=20, help="Loader batches timed.")
    ap.add_argument("--steps", type=int, default=3, help="Training steps timed per round.")
    ap.add_argument("--rounds", type=int, default=3,
                    help="Rounds of the step timing (before and after alternate).")
    ap.add_argument("--sizes", nargs="*", default=[], metavar="WINDOWxBATCH",
                    help="Also time the new step at these sizes, e.g. 128x32 192x16 256x8.")
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
        rates = step_rates(len(ds.classes), batch_size=a.batch_size, window=a.window,
                           steps=a.steps, rounds=a.rounds, device=dev, amp=amp)
        sizes = {}
        for size in a.sizes:
            w, b = (int(v) for v in size.lower().split("x"))
            sizes[(w, b)] = step_rates(len(ds.classes), batch_size=b, window=w,
                                       steps=a.steps, rounds=1, device=dev, amp=amp,
                                       settings=("after",))["after"][0]
    med = {s: statistics.median(v for v, _ in r) for s, r in rates.items()}
    cpu = {s: statistics.median(c for _, c in r) for s, r in rates.items()}
    steps = med["after"]
    px = a.window * a.window / 1e6
    for s, what in (("before", "old: torch dropout, out-of-place ReLU, default Adam, "
                               "default malloc"),
                    ("after", "new defaults: semdask.training.engine.TrainStep")):
        print(f"(b) training step (default U-Net fwd+bwd+Adam), {s:6s}: {med[s]:8.2f} patches/s "
              f"= {med[s] * px:6.2f} Mpx/s, {cpu[s]:6.3f} CPU s/patch  (rounds: "
              f"{', '.join(f'{v:.2f}' for v, _ in rates[s])}; {what})")
    print(f"    after / before = {med['after'] / med['before']:.2f}x in patches/s, "
          f"{cpu['before'] / cpu['after']:.2f}x in CPU s/patch")
    for (w, b), (rate, c) in sizes.items():
        print(f"    window {w:4d}, batch {b:3d}: {rate:8.2f} patches/s = "
              f"{rate * w * w / 1e6:6.2f} Mpx/s, {c / (w * w) * 1e6:6.3f} CPU s/Mpx (new step)")
    print(f"load average now {os.getloadavg()[0]:.1f} (other processes slow both rates)")
    for w, rate in loaders.items():
        print(f"(a) loader + augment, {w} workers:             {rate:8.1f} patches/s   "
              f"(c) loader/step = {rate / steps:6.2f}")
    print(f"    of which reading alone (0 workers, to {dev.type}): {reading:8.1f} patches/s; "
          f"augmentation alone ({a.augment!r} on {dev.type}): {augmenting:8.1f} patches/s")


if __name__ == "__main__":
    main()
