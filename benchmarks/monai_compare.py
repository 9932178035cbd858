"""semdask segment vs MONAI sliding_window_inference, side by side in one run (issue 13).

For each mosaic size this writes one synthetic SOC mosaic (OME-Zarr), then alternates
A/B/A/B...:

(A) ``semdask segment SRC --output OUT`` with its defaults (whole-chunk, fp32), timed as
    the whole command: a fresh Python process, imports, start-up, reading, inference,
    writing the labels and their pyramid, OME-Zarr -> OME-Zarr;
(B) MONAI ``sliding_window_inference`` (window 256, overlap 0.25, gaussian,
    sw_batch_size 1, fp32, torch threads = cores, or each of ``--monai-threads``) on the
    same mosaic with the same weights and the same normalisation, in memory, timed from
    reading the image to the label map (its imports and model loading are *not*
    counted: the comparison favours MONAI);

and prints each run, the median and spread of both, the speed ratio (fastest MONAI
median seconds / semdask median seconds: > 1 means semdask is faster), the peak RSS of
each process and the label agreement between the two. The machine's load average is
printed too: on a shared machine, read the ratio of interleaved runs, not the seconds.

    python benchmarks/monai_compare.py --shape 4096 8192 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _monai_child(src: str, out: str, threads: str) -> None:
    """Run MONAI in this (child) process and write its timing and labels."""
    import torch
    from monai.inferers import sliding_window_inference

    from semdask.inference.normalise import apply as normalise
    from semdask.inference.segment import mosaic_stats
    from semdask.nets.model import bundled_model_path, load_model
    from semdask.storage import io as sio

    torch.set_num_threads(int(threads))
    model, cfg = load_model(bundled_model_path())
    model = model.eval()
    t0, c0 = time.perf_counter(), _cpu(resource.RUSAGE_SELF)
    m = sio.open_mosaic(src)
    stats = mosaic_stats(m, cfg.normalisation.low_percentile,
                         cfg.normalisation.high_percentile)
    x = normalise(np.asarray(m.image.compute()), stats)
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(x)[None, None], (cfg.window,) * 2,
                                          1, model, overlap=0.25, mode="gaussian")
        assert isinstance(logits, torch.Tensor)
        labels = logits.argmax(1)[0].to(torch.uint8).numpy()
    secs, cpu = time.perf_counter() - t0, _cpu(resource.RUSAGE_SELF) - c0
    np.save(out + ".npy", labels)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out + ".json").write_text(json.dumps({"seconds": secs, "cpu": cpu, "peak_mib": peak}))


def _cpu(who: int) -> float:
    u = resource.getrusage(who)
    return u.ru_utime + u.ru_stime


def _semdask(src: Path, out: Path, extra: list[str]) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MiB) of one ``semdask segment`` process."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "semdask", "segment", str(src), "--output", str(out), *extra]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        secs = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"semdask segment failed ({proc.returncode}):\n"
                             f"{err.read().decode(errors='replace')[-3000:]}")
    # the command's own process (all of the in-process fast path; a cluster's workers not)
    return secs, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def _monai(src: Path, tmp: Path, threads: int) -> tuple[float, float, float, np.ndarray]:
    out = str(tmp / "monai")
    res = subprocess.run([sys.executable, __file__, "--monai-child", str(src), out,
                          str(threads)],
                         capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"MONAI run failed:\n{res.stderr[-3000:]}")
    info = json.loads(Path(out + ".json").read_text())
    return (float(info["seconds"]), float(info["cpu"]), float(info["peak_mib"]),
            np.load(out + ".npy"))


def _spread(v: list[float]) -> str:
    return f"median {statistics.median(v):7.2f} s (min {min(v):.2f}, max {max(v):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", nargs="+", type=int, default=[4096, 8192],
                    help="square mosaic edges to compare (px)")
    ap.add_argument("--repeats", type=int, default=3, help="A/B pairs per size")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--semdask-args", default="",
                    help="extra arguments for semdask segment (default: none, its defaults)")
    ap.add_argument("--monai-threads", nargs="+", type=int, default=[os.cpu_count() or 1],
                    help="torch threads of MONAI runs; several: one MONAI run each per pair "
                    "(the ratio uses the fastest MONAI median) [default: cores]")
    ap.add_argument("--monai-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.monai_child:
        _monai_child(*args.monai_child)
        return
    try:
        import monai  # noqa: F401
    except ImportError:
        print("MONAI is not installed: pip install -e '.[bench]' (check with --dry-run that "
              "it keeps your torch)")
        raise SystemExit(2) from None
    import torch

    from semdask.storage import io as sio
    from semdask.synthetic.sem import synthetic_mosaic

    extra = args.semdask_args.split()
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f} at start; semdask segment {' '.join(extra) or '(defaults)'}"
          f" vs MONAI sliding_window_inference (256, overlap 0.25, gaussian, sw_batch_size 1)")
    tmp = Path(tempfile.mkdtemp(prefix="semdask-monai-"))
    summary = []
    try:
        for edge in args.shape:
            src = tmp / f"m{edge}.ome.zarr"
            sio.write_synthetic(src, synthetic_mosaic((edge, edge), seed=args.seed),
                                overwrite=True)
            out = tmp / f"out{edge}.ome.zarr"
            ts: list[float] = []
            cs: list[float] = []
            cm: dict[int, list[float]] = {n: [] for n in args.monai_threads}
            ps: list[float] = []
            tm: dict[int, list[float]] = {n: [] for n in args.monai_threads}
            pm: list[float] = []
            agree = float("nan")
            for i in range(args.repeats):
                a, ca, pa = _semdask(src, out, extra)
                ts.append(a)
                cs.append(ca)
                ps.append(pa)
                line = f"{edge}² run {i + 1}: semdask {a:7.2f} s (cpu {ca:.1f} s)"
                for n in args.monai_threads:
                    b, cb, pb, mon = _monai(src, tmp, n)
                    tm[n].append(b)
                    cm[n].append(cb)
                    pm.append(pb)
                    line += f"  MONAI ({n} thr) {b:7.2f} s (cpu {cb:.1f} s) = {b / a:.2f}x"
                    if i == 0 and n == args.monai_threads[0]:
                        lab = np.asarray(sio.open_labels(out).data.compute())
                        agree = 100 * float((lab == mon).mean())
                print(f"{line}  (load {os.getloadavg()[0]:.1f})", flush=True)
            mp = edge * edge / 1e6
            print(f"{edge}² semdask:        {_spread(ts)}  "
                  f"{mp / statistics.median(ts):.2f} MPix/s, peak RSS {max(ps):.0f} MiB")
            for n, v in tm.items():
                print(f"{edge}² MONAI {n} thr:    {_spread(v)}  "
                      f"{mp / statistics.median(v):.2f} MPix/s")
            print(f"{edge}² MONAI peak RSS {max(pm):.0f} MiB; labels agree {agree:.3f} % "
                  "(whole-chunk vs blended windows)")
            best = min(tm, key=lambda n: statistics.median(tm[n]))
            ratio = statistics.median(tm[best]) / statistics.median(ts)
            pair = [b / a for a, b in zip(ts, tm[best], strict=True)]
            print(f"{edge}² speed ratio (fastest MONAI, {best} thr, s / semdask s): {ratio:.2f}x "
                  f"(per pair {min(pair):.2f}-{max(pair):.2f})")
            for n, v in cm.items():
                print(f"{edge}² CPU-time ratio (MONAI {n} thr cpu s / semdask cpu s, whole "
                      f"command): {statistics.median(v) / statistics.median(cs):.2f}x "
                      f"(semdask median {statistics.median(cs):.1f} cpu s)")
            summary.append((edge, ratio, min(pair), max(pair), agree))
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"{'mosaic':>8}{'ratio':>8}{'min':>7}{'max':>7}{'agree %':>10}")
    for edge, ratio, lo, hi, agree in summary:
        print(f"{str(edge) + '²':>8}{ratio:>7.2f}x{lo:>7.2f}{hi:>7.2f}{agree:>10.3f}")


if __name__ == "__main__":
    main()
