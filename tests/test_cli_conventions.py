"""CLI conventions: ``--device auto`` is the training default; ``python -m semdask``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from semdask.cli.main import main
from semdask.training.config import TrainConfig


def test_train_device_defaults_to_auto() -> None:
    assert TrainConfig().device == "auto"
    assert "auto" in CliRunner().invoke(main, ["train", "--help"]).output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only host")
def test_train_on_a_missing_gpu_is_refused_without_traceback(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["train", str(tmp_path / "a.ome.zarr"), "--out",
                                  str(tmp_path / "m.safetensors"), "--device", "cuda"])
    assert r.exit_code == 2, r.output
    assert "--device cpu" in r.output and "Traceback" not in r.output


def test_python_dash_m_semdask_lists_the_export_commands() -> None:
    r = subprocess.run([sys.executable, "-m", "semdask", "--help"], capture_output=True,
                       text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    assert "export-model" in r.stdout and "--quiet" in r.stdout
