"""Inference benchmark: engine efficiency, peak memory and agreement, measured side by side.

For one synthetic SOC image and the bundled model this prints, in one run:

(a) the bare model forward time over the same windows, in memory, in this process;
(b) semdask end to end (OME-Zarr -> OME-Zarr on a LocalCluster) time and peak RSS;
(c) the efficiency a / b;
(d) label agreement with the untiled whole-image prediction;

for the blended-window mode and the whole-chunk mode, plus bf16 vs fp32 agreement and,
when MONAI is installed, MONAI's ``sliding_window_inference`` on the same windows.

    python benchmarks/inference.py --shape 2048 2048
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from semdask.cluster.connect import connect
from semdask.inference.graph import plan_inference
from semdask.inference.normalise import apply as normalise
from semdask.inference.segment import mosaic_stats, segment
from semdask.inference.settings import resolve_settings
from semdask.inference.windows import blend_weights, window_origins
from semdask.nets.model import bundled_model_path, load_model
from semdask.storage import io as sio
from semdask.synthetic.sem import synthetic_mosaic


class PeakRSS:
    """Sample the summed RSS of this process tree (driver + workers) every 50 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            procs = [me, *me.children(recursive=True)]
            rss = 0
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    rss += p.memory_info().rss
            self.peak = max(self.peak, rss)
            time.sleep(0.05)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *a: object) -> None:
        self._stop.set()
        self._t.join()


def bare_windows(x: np.ndarray, model: torch.nn.Module, window: int, stride: int,
                 blend: str, precision: str) -> tuple[float, np.ndarray]:
    """Forward every window of the global grid, in memory, batch 1; blend with numpy."""
    h, w = x.shape
    halo = window
    big = np.pad(x, halo, mode="symmetric")
    oys = window_origins(0, h, window=window, stride=stride)
    oxs = window_origins(0, w, window=window, stride=stride)
    wts = blend_weights(window, blend)
    acc = None
    wsum = np.zeros((h, w), np.float32)
    ctx = torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else torch.no_grad()
    t0 = time.perf_counter()
    with torch.inference_mode(), ctx:
        for oy in oys:
            for ox in oxs:
                win = big[oy + halo: oy + halo + window, ox + halo: ox + halo + window]
                p = torch.softmax(model(torch.from_numpy(np.ascontiguousarray(win))[None, None])
                                  .float(), 1)[0].numpy()
                if acc is None:
                    acc = np.zeros((p.shape[0], h, w), np.float32)
                a0, a1, b0, b1 = max(oy, 0), min(oy + window, h), max(ox, 0), min(ox + window, w)
                ww = wts[a0 - oy: a1 - oy, b0 - ox: b1 - ox]
                acc[:, a0:a1, b0:b1] += p[:, a0 - oy: a1 - oy, b0 - ox: b1 - ox] * ww
                wsum[a0:a1, b0:b1] += ww
    secs = time.perf_counter() - t0
    assert acc is not None
    return secs, (acc / wsum).argmax(0).astype(np.uint8)


def bare_whole(x: np.ndarray, model: torch.nn.Module, precision: str,
               halo: int = 0) -> tuple[float, np.ndarray]:
    """One untiled forward of the whole image (mirror-extended by ``halo``, then to 16 px)."""
    h, w = x.shape
    big = np.pad(x, ((halo, -h % 16 + halo), (halo, -w % 16 + halo)), mode="symmetric")
    t = torch.from_numpy(big)[None, None].contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cpu", torch.bfloat16) if precision == "bf16" else torch.no_grad()
    t0 = time.perf_counter()
    with torch.inference_mode(), ctx:
        out = model(t).float().argmax(1)[0, halo:halo + h, halo:halo + w].numpy()
    out = out.astype(np.uint8)
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs=2, type=int, default=(2048, 2048))
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--chunk", type=int, default=1024,
                    help="chunk edge (>= 2 blocks per worker keeps every worker busy)")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--skip-monai", action="store_true")
    args = ap.parse_args()
    shape = tuple(args.shape)
    torch.set_num_threads(os.cpu_count() or 1)
    model, cfg = load_model(bundled_model_path())
    model = model.to(memory_format=torch.channels_last).eval()
    tmp = Path(tempfile.mkdtemp(prefix="semdask-bench-"))
    src = tmp / "bench.ome.zarr"
    sio.write_synthetic(src, synthetic_mosaic(shape, seed=args.seed), overwrite=True)
    m = sio.open_mosaic(src)
    stats = mosaic_stats(m, cfg.normalisation.low_percentile, cfg.normalisation.high_percentile)
    x = normalise(np.asarray(m.image.compute()), stats)
    mp = shape[0] * shape[1] / 1e6
    print(f"image {shape[0]} x {shape[1]} ({mp:.1f} MPix), model {bundled_model_path().name}, "
          f"{os.cpu_count()} cores, torch {torch.__version__}")

    t_untiled, untiled = bare_whole(x, model, "fp32")
    print(f"untiled whole-image forward (fp32): {t_untiled:.2f} s")
    ext_halo = plan_inference(shape, mode="whole-chunk", receptive_field=cfg.receptive_field).halo
    _, untiled_ext = bare_whole(x, model, "fp32", halo=ext_halo)
    rows = []
    with connect(n_workers=args.workers, dashboard_address="127.0.0.1:0") as client:
        for mode, precision in [("window", "fp32"), ("whole-chunk", "fp32"), ("window", "bf16"),
                                ("whole-chunk", "bf16")]:
            # the run description segment resolves (same precedence, same geometry)
            run = resolve_settings(model_config=cfg, mode=mode, chunk=args.chunk,
                                   precision=precision)
            plan = plan_inference(shape, **run.plan_kwargs(cfg.receptive_field))
            if mode == "window":
                ta, _ = bare_windows(x, model, plan.window, plan.stride, plan.blend, precision)
            else:
                ta, _ = bare_whole(x, model, precision)
            with PeakRSS() as rss:
                t0 = time.perf_counter()
                segment(src, mode=mode, precision=precision, chunk=run.chunk, client=client,
                        overwrite=True, progress=False, name=f"b-{mode}-{precision}")
                tb = time.perf_counter() - t0
            lab = np.asarray(sio.open_labels(src, f"b-{mode}-{precision}").data.compute())
            agree = float((lab == untiled).mean())
            agree_ext = float((lab == untiled_ext).mean())
            rows.append((mode, precision, ta, tb, ta / tb, rss.peak / 2**20, agree, lab,
                         agree_ext))
    print()
    print(f"{'mode':<12}{'prec':<6}{'(a) bare s':>11}{'(b) semdask s':>14}{'MPix/s':>8}"
          f"{'(c) a/b':>9}{'peak RSS MiB':>14}{'(d) agree %':>12}{'same-ext %':>11}")
    for mode, prec, ta, tb, eff, peak, agree, _, agree_ext in rows:
        print(f"{mode:<12}{prec:<6}{ta:>11.2f}{tb:>14.2f}{mp / tb:>8.2f}{eff:>9.2f}{peak:>14.0f}"
              f"{100 * agree:>12.3f}{100 * agree_ext:>11.3f}")
    print("(d): labels vs one untiled forward of the image padded to 16 px; same-ext: vs one "
          f"untiled forward of the image mirror-extended by the whole-chunk halo ({ext_halo} px) "
          "as the engine extends it")
    by = {(r[0], r[1]): r[7] for r in rows}
    for mode in ("window", "whole-chunk"):
        a = float((by[(mode, "bf16")] == by[(mode, "fp32")]).mean())
        print(f"bf16 vs fp32 label agreement ({mode}): {100 * a:.3f} %")
    fp32 = {r[0]: r for r in rows if r[1] == "fp32"}
    print(f"speed ratio whole-chunk / window (fp32 end to end): "
          f"{fp32['window'][3] / fp32['whole-chunk'][3]:.2f}x")
    if not args.skip_monai:
        try:
            from monai.inferers import sliding_window_inference
        except ImportError:
            print("MONAI not installed: pip install -e '.[bench]' for the MONAI comparison")
            return
        t = torch.from_numpy(x)[None, None]
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = sliding_window_inference(t, (cfg.window, cfg.window), 1, model, overlap=0.25,
                                           mode="gaussian")
        tm = time.perf_counter() - t0
        mon = out.argmax(1)[0].numpy().astype(np.uint8)
        agree = 100 * float((mon == by[("window", "fp32")]).mean())
        print(f"MONAI sliding_window_inference (256, overlap 0.25, gaussian, in memory): "
              f"{tm:.2f} s; semdask window mode end to end is {tm / fp32['window'][3]:.2f}x "
              f"MONAI's speed; label agreement with MONAI {agree:.3f} %")


if __name__ == "__main__":
    main()
