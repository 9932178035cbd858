"""The examples are programs: run them (small sizes) as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(("script", "args"), [
    ("quickstart.py", ["--shape", "768", "1024", "--workers", "1"]),
    ("convert_and_segment.py", ["--shape", "512", "768"]),
])
def test_example_runs(script: str, args: list[str], tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(EXAMPLES / script), "--out", str(tmp_path), *args],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "YSZ" in r.stdout
    if script == "quickstart.py":
        assert "mIoU" in r.stdout
        assert (tmp_path / "preview.png").stat().st_size > 1000
    else:
        assert "pixel size 0.04458" in r.stdout
