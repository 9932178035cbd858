"""Before / after: two source trees' ``semdask segment``, interleaved in one run (issue 13).

For each mosaic size this writes one synthetic SOC mosaic (OME-Zarr), then alternates
before / after ... : the whole ``semdask segment SRC --output OUT`` command (a fresh Python
process: imports, start-up, inference, labels + pyramid + ledger written, exit) with the
``semdask`` package of the *before* tree (``--before DIR``, or ``--before-rev REV``: a
temporary ``git worktree`` of this repository at REV) and of this tree. Prints every run,
both medians, the speed ratio (before median / after median: > 1 means the change is
faster) and whether the two label maps are identical (a change of speed only must keep
every label).

    python benchmarks/segment_ab.py --before-rev HEAD~1 --shape 1536 4096 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def _package_of(tree: Path, cwd: Path) -> Path:
    """The semdask package a child process with ``tree`` on its path imports."""
    res = subprocess.run([sys.executable, "-c", "import semdask; print(semdask.__file__)"],
                         env=_env(tree), cwd=cwd, capture_output=True, text=True, check=True)
    return Path(res.stdout.strip()).resolve().parent


def _segment(tree: Path, src: Path, out: Path, extra: list[str]) -> float:
    """Wall seconds of one ``python -m semdask segment`` with ``tree``'s package.

    Runs in ``out``'s folder: ``python -m`` puts the working directory first on the path,
    so a run from a checkout would import that checkout whatever PYTHONPATH says.
    """
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "semdask", "segment", str(src), "--output",
                          str(out), *extra], env=_env(tree), cwd=out.parent,
                         capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"semdask segment ({tree}) failed ({res.returncode}):\n"
                         f"{res.stderr[-3000:]}")
    return secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--before", type=Path, help="a checkout whose semdask/ is 'before'")
    who.add_argument("--before-rev", help="a git revision of this repository (a temporary "
                     "worktree)")
    ap.add_argument("--shape", nargs="+", type=int, default=[1536, 4096],
                    help="square mosaic edges (px)")
    ap.add_argument("--repeats", type=int, default=3, help="before/after pairs per size")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--semdask-args", default="", help="extra arguments for both commands")
    args = ap.parse_args()

    from semdask.storage import io as sio
    from semdask.synthetic.sem import synthetic_mosaic

    tmp = Path(tempfile.mkdtemp(prefix="semdask-ab-"))
    before = args.before
    try:
        if before is None:
            before = tmp / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                            str(before), args.before_rev], check=True)
        if not (before / "semdask" / "__init__.py").exists():
            raise SystemExit(f"--before: expected a checkout with semdask/__init__.py, got "
                             f"{before}")
        for name, tree in (("before", before), ("after", ROOT)):
            pkg = _package_of(tree, tmp)
            if pkg != (tree / "semdask").resolve():
                raise SystemExit(f"{name}: expected the semdask of {tree}, a child imports "
                                 f"{pkg}")
        extra = args.semdask_args.split()
        print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; "
              f"before: {args.before_rev or before}, after: {ROOT}; semdask segment "
              f"{' '.join(extra) or '(defaults)'}")
        rows = []
        for edge in args.shape:
            src = tmp / f"m{edge}.ome.zarr"
            sio.write_synthetic(src, synthetic_mosaic((edge, edge), seed=args.seed))
            times: dict[str, list[float]] = {"before": [], "after": []}
            outs = {k: tmp / f"{k}{edge}.ome.zarr" for k in times}
            for i in range(args.repeats):
                for k, tree in (("before", before), ("after", ROOT)):
                    times[k].append(_segment(tree, src, outs[k], extra))
                print(f"{edge}² pair {i + 1}: before {times['before'][-1]:7.2f} s  after "
                      f"{times['after'][-1]:7.2f} s  (load {os.getloadavg()[0]:.1f})", flush=True)
            a, b = (np.asarray(sio.open_labels(outs[k]).data.compute()) for k in times)
            same = bool(np.array_equal(a, b))
            med = {k: statistics.median(v) for k, v in times.items()}
            ratio = med["before"] / med["after"]
            print(f"{edge}² median before {med['before']:.2f} s, after {med['after']:.2f} s: "
                  f"{ratio:.2f}x; labels identical: {same}")
            rows.append((edge, med["before"], med["after"], ratio, same))
            shutil.rmtree(src, ignore_errors=True)
    finally:
        if args.before is None and before is not None and before.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                            str(before)], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"{'mosaic':>8}{'before s':>10}{'after s':>9}{'ratio':>8}  labels identical")
    for edge, bs, as_, ratio, same in rows:
        print(f"{str(edge) + '²':>8}{bs:>10.2f}{as_:>9.2f}{ratio:>7.2f}x  {same}")


if __name__ == "__main__":
    main()
