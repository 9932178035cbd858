"""GPU benchmark: bare forward, semdask end to end on a CUDA worker, GPU utilisation, batch size.

On one synthetic SOC mosaic and the bundled model this prints, in one run:

(a) the bare forward rate of the model on the GPU (data already on the device), per batch
    size for 256² windows and for whole-chunk tiles, fp32 (TF32 convolutions, PyTorch's
    default) and bf16;
(b) ``segment`` end to end (OME-Zarr -> OME-Zarr) on a ``local-cuda`` cluster (one
    dask-cuda worker, ``--threads`` threads each), per mode, precision and batch size,
    with the mean GPU utilisation sampled every 50 ms through NVML while it runs;
(c) the same on a CPU ``local`` cluster of all the machine's cores, and the ratio b / c;
(d) the time of one paper-sized image (2856 x 4096) end to end;
(e) label agreement: bf16 vs fp32, window vs whole-chunk, GPU vs CPU.

    python benchmarks/gpu.py --shape 8192 8192

Without CUDA it runs the same rows on the CPU (``--device cpu``, for a smoke test only).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semdask.cluster.connect import connect
from semdask.inference.graph import plan_inference
from semdask.inference.segment import segment
from semdask.inference.settings import resolve_settings
from semdask.nets.model import bundled_model_path, load_model
from semdask.storage import io as sio
from semdask.synthetic.sem import synthetic_mosaic

PAPER_SHAPE = (2856, 4096)


class GpuUtil:
    """Mean and peak GPU utilisation (NVML) over a ``with`` block, sampled every 50 ms."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._handle: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML (CPU run): report n/a
            self._handle = None
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            time.sleep(0.05)

    @property
    def mean(self) -> float:
        return float(np.mean(self.samples)) if self.samples else float("nan")

    def __enter__(self) -> GpuUtil:
        if self._handle is not None:
            self._t.start()
        return self

    def __exit__(self, *a: object) -> None:
        self._stop.set()
        if self._handle is not None:
            self._t.join()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bare_rate(model: torch.nn.Module, dev: torch.device, *, edge: int, batch: int,
              precision: str, reps: int = 5) -> float:
    """MPix/s of the forward (+ softmax + argmax) of ``batch`` x ``edge``² inputs on ``dev``."""
    x = torch.rand(batch, 1, edge, edge, device=dev).contiguous(memory_format=torch.channels_last)
    ctx = (torch.autocast(dev.type, torch.bfloat16) if precision == "bf16"
           else contextlib.nullcontext())
    with torch.inference_mode(), ctx:
        model(x).float().softmax(1).argmax(1)  # warm-up (cuDNN algorithm choice)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x).float().softmax(1).argmax(1)
        _sync(dev)
    return reps * batch * edge * edge / 1e6 / (time.perf_counter() - t0)


@contextlib.contextmanager
def _cluster(kind: str, threads: int) -> Iterator[Any]:
    profile = "local-cuda" if kind == "cuda" else "local"  # one worker either way
    with connect(profile=profile, n_workers=None if kind == "cuda" else 1,
                 threads_per_worker=threads, dashboard_address="127.0.0.1:0") as client:
        yield client


def run_segment(src: Path, client: Any, *, name: str, device: str, **kw: Any
                ) -> tuple[float, float, np.ndarray]:
    """Seconds, mean GPU utilisation and labels of one ``segment`` call."""
    with GpuUtil() as util:
        t0 = time.perf_counter()
        segment(src, client=client, device=device, name=name, overwrite=True, progress=False,
                **kw)
        secs = time.perf_counter() - t0
    return secs, util.mean, np.asarray(sio.open_labels(src, name).data.compute())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs=2, type=int, default=(8192, 8192), metavar=("H", "W"))
    ap.add_argument("--chunk", type=int, default=2048)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 4],
                    help="Threads per GPU worker to compare.")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-cpu", action="store_true", help="Skip the CPU cluster rows.")
    ap.add_argument("--paper-shape", nargs=2, type=int, default=PAPER_SHAPE, metavar=("H", "W"),
                    help="The single-image row (d) [the paper's 2856 x 4096].")
    a = ap.parse_args()
    dev = torch.device(a.device)
    cores = len(os.sched_getaffinity(0))
    model, cfg = load_model(bundled_model_path())
    model = model.to(dev).to(memory_format=torch.channels_last).eval()  # type: ignore[call-overload]
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, {cores} CPU cores, model "
          f"{bundled_model_path().name} (window {cfg.window}, receptive field "
          f"{cfg.receptive_field})", flush=True)

    print("\n(a) bare forward + softmax + argmax on the device, MPix/s of input")
    run = resolve_settings(model_config=cfg, mode="whole-chunk", chunk=a.chunk)
    tile = plan_inference(tuple(a.shape), **run.plan_kwargs(cfg.receptive_field))
    tile_edge = a.chunk + 2 * tile.halo
    tile_edge += -tile_edge % 16
    for precision in ("fp32", "bf16"):
        rates = [f"batch {b}: "
                 f"{bare_rate(model, dev, edge=cfg.window, batch=b, precision=precision):7.1f}"
                 for b in a.batch_sizes]
        whole = bare_rate(model, dev, edge=tile_edge, batch=1, precision=precision, reps=3)
        print(f"  {precision}  {cfg.window}² windows  " + "  ".join(rates)
              + f"   | one {tile_edge}² tile: {whole:7.1f}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="semdask-gpu-"))
    src, paper = tmp / "bench.ome.zarr", tmp / "paper.ome.zarr"
    t0 = time.perf_counter()
    sio.write_synthetic(src, synthetic_mosaic(tuple(a.shape), seed=7), overwrite=True)
    paper_shape = tuple(a.paper_shape)
    sio.write_synthetic(paper, synthetic_mosaic(paper_shape, seed=8), overwrite=True)
    mp = a.shape[0] * a.shape[1] / 1e6
    print(f"\nsynthetic mosaics written in {time.perf_counter() - t0:.1f} s "
          f"({a.shape[0]} x {a.shape[1]} = {mp:.1f} MPix, chunk {a.chunk})", flush=True)

    kind = "cuda" if dev.type == "cuda" else "cpu"
    labels: dict[str, np.ndarray] = {}
    best = (0.0, a.threads[0])
    print(f"\n(b) segment end to end on a local-{kind} cluster (1 worker)")
    for threads in a.threads:
        with _cluster(kind, threads) as client:
            runs: list[tuple[str, dict[str, Any]]] = [
                ("whole-chunk fp32", {"mode": "whole-chunk", "precision": "fp32"}),
                ("whole-chunk bf16", {"mode": "whole-chunk", "precision": "bf16"}),
            ]
            runs += [(f"window bf16 batch {b}", {"mode": "window", "precision": "bf16",
                                                 "batch_size": b}) for b in a.batch_sizes]
            runs.append(("window fp32 batch 16", {"mode": "window", "precision": "fp32",
                                                  "batch_size": 16}))
            for label, kw in runs:
                secs, util, lab = run_segment(src, client, name="g", device=a.device,
                                              chunk=a.chunk, **kw)
                key = f"{threads} thr, {label}"
                labels.setdefault(label, lab)
                if label == "whole-chunk bf16" and mp / secs > best[0]:
                    best = (mp / secs, threads)
                print(f"  {key:<34}{secs:8.2f} s {mp / secs:8.2f} MPix/s   GPU busy "
                      f"{util:5.1f} %", flush=True)
    print(f"\n(d) paper-sized image {paper_shape[0]} x {paper_shape[1]} end to end "
          f"(local-{kind}, {best[1]} threads)")
    paper_secs: dict[str, float] = {}
    with _cluster(kind, best[1]) as client:
        run_segment(paper, client, name="warm", device=a.device, chunk=a.chunk)  # model load
        for precision in ("fp32", "bf16"):
            secs, util, lab = run_segment(paper, client, name=f"p-{precision}",
                                          device=a.device, chunk=a.chunk, precision=precision)
            labels[f"paper {precision}"] = lab
            paper_secs[precision] = secs
            print(f"  whole-chunk {precision}: {secs:6.2f} s  GPU busy {util:5.1f} %", flush=True)
    if dev.type == "cuda" and not a.skip_cpu:
        print(f"\n(c) the same machine's CPU: local cluster, 1 worker x {cores} threads")
        with _cluster("cpu", cores) as client:
            secs_cpu, _, lab = run_segment(paper, client, name="p-cpu", device="cpu",
                                           chunk=a.chunk, precision="fp32")
        print(f"  paper image, whole-chunk fp32 on {cores} CPU threads: {secs_cpu:6.2f} s "
              f"({paper_shape[0] * paper_shape[1] / 1e6 / secs_cpu:.2f} MPix/s); the GPU run "
              f"of the same image (d) is {secs_cpu / paper_secs['fp32']:.1f}x faster")
        print(f"  GPU (TF32) vs CPU fp32 labels: "
              f"{100 * float((labels['paper fp32'] == lab).mean()):.3f} %")
    print("\n(e) label agreement")
    ref = labels["whole-chunk fp32"]
    for label, lab in labels.items():
        if not label.startswith("paper") and label != "whole-chunk fp32":
            print(f"  {label:<24} vs whole-chunk fp32: {100 * float((lab == ref).mean()):.3f} %")
    print(f"  paper bf16 vs fp32: "
          f"{100 * float((labels['paper bf16'] == labels['paper fp32']).mean()):.3f} %")


if __name__ == "__main__":
    main()
