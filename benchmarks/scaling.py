"""Scaling benchmark: peak worker memory and throughput of ``segment`` as the mosaic grows.

For each square mosaic size this synthesises an SOC mosaic (OME-Zarr, once, in this
process), starts a fresh LocalCluster, samples the RSS of every worker process with
psutil (20 Hz, in a thread of this process) while :func:`semdask.inference.segment.segment`
runs, and prints a table plus the ratios largest / smallest. Memory must stay flat:
each block task holds one chunk + halo, whatever the mosaic size.

    python benchmarks/scaling.py --model tiny                   # 2k, 4k, 8k; tiny U-Net
    python benchmarks/scaling.py --sizes 2048 8192 16384 32768  # bundled model (slow on CPU)

``--model tiny`` saves a random two-level U-Net (widths 4, 8) so the memory scaling
is measured in minutes on a CPU; ``--model PATH`` takes any safetensors model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from semdask.cluster.connect import connect
from semdask.inference.segment import segment
from semdask.inference.settings import Mode, Precision, choices
from semdask.nets.model import ModelConfig, bundled_model_path, receptive_field, save_model
from semdask.nets.unet import UNet
from semdask.storage import io as sio
from semdask.synthetic.sem import COLOURS, PHASES, synthetic_mosaic

MiB = 2**20


@dataclass
class Row:
    size: int
    mpix: float
    blocks: int
    seconds: float
    mpix_per_s: float
    baseline_mib: float  #: largest worker RSS before the run (model not loaded yet)
    peak_worker_mib: float  #: largest RSS any one worker reached during the run
    peak_sum_mib: float  #: largest summed RSS of all workers


class WorkerRSS:
    """Sample the RSS of the given worker processes every ``interval`` seconds."""

    def __init__(self, pids: list[int], interval: float = 0.05) -> None:
        self.procs = [psutil.Process(p) for p in pids]
        self.interval = interval
        self.peak_one = self.peak_sum = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> list[int]:
        out = []
        for p in self.procs:
            with contextlib.suppress(psutil.Error):  # a restarted worker: skip it
                out.append(p.memory_info().rss)
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = self.sample()
            if rss:
                self.peak_one = max(self.peak_one, max(rss))
                self.peak_sum = max(self.peak_sum, sum(rss))
            time.sleep(self.interval)

    def __enter__(self) -> WorkerRSS:
        self._t.start()
        return self

    def __exit__(self, *a: object) -> None:
        self._stop.set()
        self._t.join()


def tiny_model(path: Path, window: int) -> Path:
    """A random two-level U-Net (widths 4, 8) with the SOC classes."""
    torch.manual_seed(0)
    m = UNet(widths=(4, 8), dropout=(0.0, 0.0))
    cfg = ModelConfig(kwargs=m.kwargs(), classes=list(PHASES), colours=list(COLOURS),
                      pixel_size_um=0.04458, window=window, receptive_field=receptive_field(m))
    return save_model(m, cfg, path)


def make_mosaic(path: Path, size: int, chunk: int) -> Path:
    """Synthesise a size x size mosaic at ``path`` unless a complete one is there."""
    with contextlib.suppress(Exception):
        if sio.open_mosaic(path).image.shape == (size, size):
            return path
    t0 = time.perf_counter()
    sio.write_synthetic(path, synthetic_mosaic((size, size), seed=1, chunk=chunk),
                        overwrite=True)
    print(f"  synthesised {path.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def measure(mosaic: Path, model: Path, args: argparse.Namespace) -> Row:
    """Segment ``mosaic`` on a fresh LocalCluster while sampling worker memory."""
    kw: dict[str, Any] = {"mode": args.mode, "precision": args.precision, "chunk": args.chunk,
                          "window": args.window}
    with connect(n_workers=args.workers, threads_per_worker=args.threads,
                 memory_limit=args.memory_limit, dashboard_address="127.0.0.1:0",
                 silence_logs=logging.ERROR) as client:
        pids = list(client.run(os.getpid).values())
        sampler = WorkerRSS(pids)
        base = max(sampler.sample())
        with sampler:
            r = segment(mosaic, model=model, client=client, progress=False, overwrite=True,
                        **{k: v for k, v in kw.items() if v is not None})
    size = r.shape[0]
    return Row(size, r.shape[0] * r.shape[1] / 1e6, r.blocks_total, r.seconds, r.mpix_per_s,
               base / MiB, sampler.peak_one / MiB, sampler.peak_sum / MiB)


def report(rows: list[Row]) -> str:
    head = (f"{'size':>7} {'MPix':>7} {'blocks':>6} {'seconds':>8} {'MPix/s':>7} "
            f"{'base MiB':>9} {'peak/worker MiB':>16} {'peak sum MiB':>13}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.size:>7} {r.mpix:>7.1f} {r.blocks:>6} {r.seconds:>8.1f} "
                     f"{r.mpix_per_s:>7.3f} {r.baseline_mib:>9.0f} {r.peak_worker_mib:>16.0f} "
                     f"{r.peak_sum_mib:>13.0f}")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        lines += ["", f"largest / smallest ({b.size} / {a.size} px, "
                      f"{b.mpix / a.mpix:.0f}x the pixels):",
                  f"  peak worker RSS  {b.peak_worker_mib / a.peak_worker_mib:.2f}x",
                  f"  peak summed RSS  {b.peak_sum_mib / a.peak_sum_mib:.2f}x",
                  f"  throughput       {b.mpix_per_s / a.mpix_per_s:.2f}x"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192],
                    help="Square mosaic edges in pixels (e.g. 2048 ... 32768).")
    ap.add_argument("--model", default="bundled",
                    help="'bundled' (the SOC U-Net), 'tiny' (random widths (4, 8)) or a path.")
    ap.add_argument("--mode", choices=choices(Mode), default=None)
    ap.add_argument("--chunk", type=int, default=None, help="Chunk edge [semdask config].")
    ap.add_argument("--window", type=int, default=None, help="Window edge [model's].")
    ap.add_argument("--precision", choices=choices(Precision), default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="Threads per worker.")
    ap.add_argument("--memory-limit", default="auto")
    ap.add_argument("--synth-chunk", type=int, default=2048)
    ap.add_argument("--workdir", type=Path, default=None,
                    help="Keep mosaics here and reuse them [default: a temporary folder].")
    ap.add_argument("--json", type=Path, default=None, help="Also write the rows as JSON.")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.WARNING)

    with contextlib.ExitStack() as stack:
        work = args.workdir or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="semdask-scaling-")))
        work.mkdir(parents=True, exist_ok=True)
        if args.model == "tiny":
            model = tiny_model(work / "tiny.safetensors", args.window or 256)
        else:
            model = bundled_model_path() if args.model == "bundled" else Path(args.model)
        sizes = sorted(args.sizes)
        # all mosaics first, with the threaded scheduler: no cluster is active yet
        mosaics = [make_mosaic(work / f"scaling-{s}.ome.zarr", s, args.synth_chunk)
                   for s in sizes]
        rows = []
        for s, p in zip(sizes, mosaics, strict=True):
            rows.append(measure(p, model, args))
            r = rows[-1]
            print(f"  {s} px: {r.seconds:.1f} s, {r.mpix_per_s:.3f} MPix/s, peak worker "
                  f"{r.peak_worker_mib:.0f} MiB", flush=True)
        print(f"\nmodel {model.name}, {args.workers} workers x {args.threads} threads\n")
        print(report(rows))
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))


if __name__ == "__main__":
    main()
