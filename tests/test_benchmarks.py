"""The benchmarks run (tiny sizes, CPU): a benchmark that breaks is found here, not on a GPU.

These check that every row is produced and the ratios are printed; the numbers themselves
belong to real runs (``docs/GPU.md``, ``README.md``), not to tests.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                         capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_training_benchmark_prints_both_halves_and_ratios() -> None:
    out = _run("training.py", "--shape", "256", "256", "--window", "64", "--batch-size", "2",
               "--batches", "2", "--steps", "1", "--workers", "0", "--device", "cpu",
               "--threads", "1")
    assert "amp False" in out
    assert re.search(r"\(b\) training step .*: +[\d.]+ patches/s", out)
    assert re.search(r"\(a\) loader \+ augment, 0 workers: +[\d.]+ patches/s +\(c\) "
                     r"loader/step = +[\d.]+", out)
    assert re.search(r"reading alone .*: +[\d.]+ patches/s; augmentation alone", out)


def test_gpu_benchmark_runs_every_row_on_the_cpu() -> None:
    out = _run("gpu.py", "--device", "cpu", "--shape", "256", "256", "--chunk", "128",
               "--threads", "1", "--batch-sizes", "2", "--paper-shape", "192", "256")
    for row in ("(a) bare forward", "1 thr, whole-chunk fp32", "1 thr, window bf16 batch 2",
                "(d) paper-sized image 192 x 256", "(e) label agreement",
                "paper bf16 vs fp32"):
        assert row in out, out
    agree = [float(v) for v in re.findall(r"vs whole-chunk fp32: +([\d.]+) %", out)]
    assert agree and all(90.0 <= a <= 100.0 for a in agree)
