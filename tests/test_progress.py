"""Progress reports: log lines off a terminal, a bar on one, nothing with ``semdask -q``."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import pytest
from click.testing import CliRunner

from semdask import progress
from semdask.cli.main import main
from semdask.progress import DaskProgress, Progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _loud() -> None:
    progress.configure(quiet=False)


def test_log_lines_without_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    stream = io.StringIO()
    with caplog.at_level(logging.INFO, logger="semdask.progress"), \
            Progress(64, "segment", unit="block", pixels_per_unit=1e6, stream=stream,
                     interval=3600, step=25) as p:
        for _ in range(64):
            p.update()
    lines = [r.getMessage() for r in caplog.records]
    # every 25 % (the interval is an hour), then the final line; no carriage returns
    assert [ln.split(" (")[0] for ln in lines] == ["segment: 16/64 blocks",
                                                   "segment: 32/64 blocks",
                                                   "segment: 48/64 blocks",
                                                   "segment: 64/64 blocks"]
    assert "MPix/s" in lines[0] and "ETA" in lines[0] and "done in" in lines[-1]
    assert stream.getvalue() == "" and not any("\r" in ln for ln in lines)


def test_a_bar_on_a_terminal_and_nothing_when_quiet(caplog: pytest.LogCaptureFixture) -> None:
    tty = _Tty()
    with caplog.at_level(logging.INFO, logger="semdask.progress"):
        with Progress(10, "convert", unit="task", stream=tty, interval=0) as p:
            assert p.mode == "bar"
            p.update(10)
        assert "convert" in tty.getvalue() and "10/10" in tty.getvalue()
        assert not caplog.records
        progress.configure(quiet=True)
        with Progress(10, "convert", stream=io.StringIO(), interval=0) as p:
            assert p.mode == "off"
            p.update(10)
        assert Progress(5, "x", enabled=False).mode == "off"
    assert not caplog.records


def test_dask_progress_counts_the_tasks(caplog: pytest.LogCaptureFixture) -> None:
    x = da.ones((64, 64), chunks=8).sum()
    with caplog.at_level(logging.INFO, logger="semdask.progress"), \
            DaskProgress("label", minimum=0, interval=0, stream=io.StringIO()):
        assert int(dask.compute(x, scheduler="sync")[0]) == 64 * 64
    lines = [r.getMessage() for r in caplog.records]
    assert lines and lines[-1].startswith("label: ") and "(100 %)" in lines[-1]


def _synth(tmp_path: Path, *flags: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, [*flags, "synth", str(tmp_path / "s.ome.zarr"), "--shape",
                                  "64", "64", "--chunk", "32"])
    return r.exit_code, r.output


def test_cli_quiet_flag_silences_info_and_progress(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        code, out = _synth(tmp_path, "-q")
    assert code == 0, out
    assert not [r for r in caplog.records if r.name.startswith("semdask")
                and r.levelno < logging.WARNING]
    assert progress.is_quiet()
    assert logging.getLogger("semdask").level == logging.WARNING
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        code, out = _synth(tmp_path / "b")
    assert code == 0, out
    assert [r for r in caplog.records if r.name.startswith("semdask")
            and r.levelno == logging.INFO]  # the same command without -q logs its steps
    assert not progress.is_quiet()  # a later invocation without -q reports again
    assert logging.getLogger("semdask").level == logging.INFO
    np.testing.assert_equal(CliRunner().invoke(main, ["--help"]).output.count("--quiet"), 1)
