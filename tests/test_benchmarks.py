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

import pytest

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
               "--threads", "1", "--rounds", "1", "--sizes", "32x2")
    assert "amp False" in out
    for setting in ("before", "after "):  # old and new step, side by side
        assert re.search(rf"\(b\) training step .*, {setting}: +[\d.]+ patches/s", out)
    assert re.search(r"after / before = +[\d.]+x", out)
    assert re.search(r"window +32, batch +2: +[\d.]+ patches/s", out)
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


def test_inference_benchmark_prints_every_mode_and_agreement() -> None:
    out = _run("inference.py", "--shape", "512", "512", "--chunk", "256", "--workers", "1",
               "--skip-monai")
    for mode, prec in [("window", "fp32"), ("whole-chunk", "fp32"), ("window", "bf16"),
                       ("whole-chunk", "bf16")]:
        row = re.search(rf"^{mode} +{prec} +([\d.]+) +([\d.]+) +[\d.]+ +([\d.]+) +\d+ "
                        r"+([\d.]+) +([\d.]+)$", out, re.M)
        assert row, out
        assert 90.0 <= float(row.group(4)) <= 100.0  # agreement with the untiled forward
    # whole-chunk fp32 equals one untiled forward of the same extended image (up to float
    # reassociation across thread counts, which may flip a near-tie pixel)
    same_ext = re.search(r"^whole-chunk fp32 .* ([\d.]+)$", out, re.M)
    assert same_ext and float(same_ext.group(1)) >= 99.99, out
    assert "bf16 vs fp32 label agreement (whole-chunk)" in out


def test_scaling_benchmark_reports_memory_ratio() -> None:
    out = _run("scaling.py", "--sizes", "256", "512", "--model", "tiny", "--workers", "1",
               "--threads", "1")
    assert re.search(r"peak worker RSS +[\d.]+x", out), out
    assert re.search(r"throughput +[\d.]+x", out)


@pytest.mark.slow  # three Python processes (synth, semdask, MONAI): ~20 s on 2 idle cores
def test_monai_comparison_prints_both_sides_and_the_ratio() -> None:
    pytest.importorskip("monai")
    out = _run("monai_compare.py", "--shape", "256", "--repeats", "1", "--monai-threads", "1")
    assert re.search(r"256² run 1: semdask +[\d.]+ s \(cpu [\d.]+ s\) +MONAI \(1 thr\) +[\d.]+ s "
                     r"\(cpu [\d.]+ s\) = [\d.]+x", out), out
    ratio = re.search(r"256² speed ratio \(fastest MONAI, 1 thr, s / semdask s\): ([\d.]+)x",
                      out)
    assert ratio and float(ratio.group(1)) > 0, out
    agree = re.search(r"labels agree ([\d.]+) %", out)
    assert agree and 90.0 <= float(agree.group(1)) <= 100.0, out  # same model, two engines


def test_subtile_benchmark_is_exact_and_prints_throughput() -> None:
    out = _run("subtiles.py", "--core", "64", "--tiles", "0", "32", "--repeats", "1")
    agree = [float(v) for v in re.findall(r"labels ([\d.]+) % equal to the untiled", out)]
    assert len(agree) == 2 and min(agree) >= 99.99, out
    diffs = [float(v) for v in re.findall(r"max \|logit diff\| ([\d.e+-]+)", out)]
    assert diffs and max(diffs) < 1e-4, out
    assert re.search(r"^ +32: +[\d.]+ CPU-s .* [\d.]+ core MPix per CPU-s$", out, re.M), out


def test_before_after_benchmark_times_both_trees_and_compares_labels() -> None:
    out = _run("segment_ab.py", "--before", str(ROOT), "--shape", "256", "--repeats", "1")
    assert re.search(r"256² pair 1: before +[\d.]+ s +after +[\d.]+ s", out), out
    row = re.search(r"256² median before ([\d.]+) s, after ([\d.]+) s: ([\d.]+)x; "
                    r"labels identical: (True|False)", out)
    assert row and float(row.group(3)) > 0, out
    assert row.group(4) == "True", out  # the same tree on both sides: the same labels
