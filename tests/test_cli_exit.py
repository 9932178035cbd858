"""The console entry point's fast exit (issue 13): only after a finished in-process segment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from semdask.cli import common
from semdask.cli.main import run
from semdask.storage import arrays as sarr
from semdask.storage import io as sio
from semdask.synthetic.sem import synthetic_mosaic


class _Exited(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


@pytest.fixture
def mosaic(tmp_path: Path) -> Path:
    p = tmp_path / "m.ome.zarr"
    sio.write_synthetic(p, synthetic_mosaic((160, 192), seed=2, chunk=96))
    return p


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record os._exit instead of ending pytest; the flag starts unset."""
    calls: list[int] = []

    def fake(code: int) -> None:
        calls.append(code)
        raise _Exited(code)

    monkeypatch.setattr("os._exit", fake)
    monkeypatch.setattr(common, "_SKIP_TEARDOWN", False)
    return calls


def test_in_process_segment_exits_fast_after_its_outputs_are_complete(
        mosaic: Path, model_file: Path, tmp_path: Path, exits: list[int],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.ome.zarr"
    monkeypatch.setattr(sys, "argv", ["semdask", "-q", "segment", str(mosaic), "--model",
                                      str(model_file), "--output", str(out), "--no-cluster"])
    with pytest.raises(_Exited):
        run()
    assert exits == [0]
    assert "wrote" in capsys.readouterr().out
    lab = sio.open_labels(out, "phases")
    assert lab.data.shape == (160, 192)
    assert sarr.read_attrs(out, "labels/phases")["semdask"]["complete"] is True
    assert sarr.read_attrs(out)["semdask"]["complete"] is True  # the image copy too


def test_failures_and_other_commands_exit_the_usual_way(
        mosaic: Path, model_file: Path, tmp_path: Path, exits: list[int],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["semdask", "segment", str(tmp_path / "missing.ome.zarr"),
                                      "--model", str(model_file), "--no-cluster"])
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code not in (0, None) and exits == []
    monkeypatch.setattr(sys, "argv", ["semdask", "--version"])
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code in (0, None) and exits == []


def test_python_m_semdask_flushes_its_report_before_the_fast_exit(
        mosaic: Path, model_file: Path, tmp_path: Path) -> None:
    """Piped stdout is block-buffered: the summary line must still arrive."""
    out = tmp_path / "o.ome.zarr"
    p = subprocess.run([sys.executable, "-m", "semdask", "segment", str(mosaic), "--model",
                        str(model_file), "--output", str(out), "--no-cluster"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("wrote ") and "MPix/s" in p.stdout
    assert sarr.read_attrs(out, "labels/phases")["semdask"]["complete"] is True
