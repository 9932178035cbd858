"""Robustness study: perturbations (eq. 2), the sweep, its files, the CLI and the example."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from semdask.analysis.robustness import perturb, robustness, write_robustness
from semdask.cli.main import main
from semdask.errors import InputError
from semdask.storage import io as sio
from semdask.synthetic.sem import synthetic_mosaic

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = {"blur": (0, 2), "brightness": (1, 1.5), "noise": (0.05,), "magnification": (0.5, 1, 2)}


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("heldout") / "h.ome.zarr"
    sio.write_synthetic(p, synthetic_mosaic((256, 256), seed=303, chunk=128))
    return p


def test_perturbations() -> None:
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (64, 64)).astype(np.uint8)
    assert np.array_equal(perturb(img, "blur", 0), img)
    assert perturb(img, "blur", 2).std() < 0.5 * img.std()
    bright = perturb(img, "brightness", 1.5)
    assert bright.dtype == np.uint8 and bright.max() == 255
    assert np.array_equal(perturb(img, "brightness", 1), img)
    assert np.array_equal(perturb(img, "magnification", 1), img)
    assert perturb(img, "magnification", 2).shape == (128, 128)
    flat = np.full((256, 256), 128, np.uint8)  # I = 0.502: var = I / C + sigma^2 (eq. 2)
    for sigma in (0.0, 0.05):
        noisy = perturb(flat, "noise", sigma, rng=rng).astype(np.float64) / 255
        assert abs(noisy.mean() - 128 / 255) < 0.003
        assert noisy.var() == pytest.approx(128 / 255 / 255 + sigma**2 + 1 / 12 / 255**2,
                                            rel=0.1)
    with pytest.raises(InputError):
        perturb(img, "rotation", 1)


def test_robustness_sweep_and_files(heldout: Path, model_file: Path, tmp_path: Path) -> None:
    r = robustness(heldout, model=model_file, tiles=2, tile=128, seed=1, **SMALL)
    assert len(r.rows) == 2 + 2 + 1 + 3 + 3 and r.baseline.tiles == 2
    for kind, level in (("blur", 0), ("brightness", 1), ("magnification", 1)):
        row = next(x for x in r.select(kind) if x.level == level)
        assert row.accuracy == r.baseline.accuracy  # the identity level is the baseline
    assert all(0 <= x.accuracy <= 1 and 0 <= x.miou <= 1 for x in r.rows)
    assert r.gain(1.0) == 0.0 and r.gain(0.5) is not None and r.gain(3.0) is None
    files = write_robustness(r, tmp_path / "out")
    with open(files[0]) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 + len(r.rows)
    assert {"perturbation", "level", "rescale", "accuracy", "accuracy_std", "miou",
            "miou_std"} <= set(rows[0])
    assert (tmp_path / "out" / "robustness.png").stat().st_size > 10_000
    assert "magnification (rescaled)" in r.table()


def test_cli_robustness(heldout: Path, model_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    res = CliRunner().invoke(main, [
        "robustness", str(heldout), "--model", str(model_file), "--out", str(out),
        "--tile", "128", "--quick", "--blur", "0,1", "--brightness", "1", "--noise", "0",
        "--magnification", "0.5,1"])
    assert res.exit_code == 0, res.output
    assert "pixel-size awareness at 0.5x" in res.output
    assert (out / "robustness.csv").exists()
    bad = CliRunner().invoke(main, ["robustness", str(heldout), "--model", str(model_file),
                                    "--truth", "nope", "--out", str(out)])
    assert bad.exit_code != 0 and "nope" in bad.output


def test_example_runs(model_file: Path, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(EXAMPLES / "robustness_study.py"), "--out",
                        str(tmp_path), "--shape", "256", "256", "--tile", "128",
                        "--model", str(model_file)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})  # as conftest: 1 thread
    assert r.returncode == 0, r.stdout + r.stderr
    assert "magnification (rescaled)" in r.stdout and "pixel-size awareness" in r.stdout
    assert (tmp_path / "robustness.png").exists()
