"""Malformed input, table-driven, across every sub-command (issue 10 item 8).

Each case asserts: the exit code, a message that names the fix, no traceback, and no
output that looks complete (no new store marked complete, the shared stores untouched,
no "wrote ..." line). Almost all run in-process through click's CliRunner; a few run
as real subprocesses (the installed entry point, ``python -m semdask``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from semdask.cli.main import main
from semdask.inference.segment import segment
from semdask.storage import io as sio
from semdask.synthetic.sem import synthetic_mosaic

USAGE = 2  # click's usage errors and semdask's InputError/StoreError
DAMAGED = 3  # incomplete or damaged outputs
LOCKED = 73  # another writer holds the output (semdask.storage.lock)
ANY = -1  # any non-zero status


@dataclass(frozen=True)
class Case:
    """One malformed invocation: argv template, expected status, what the message must say."""

    id: str
    argv: str
    code: int
    says: str  #: regex (case-insensitive) naming the fix
    setup: Callable[[Path, dict[str, Path]], None] | None = None
    env: tuple[tuple[str, str], ...] = ()


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, model_file: Path) -> dict[str, Path]:
    """Shared, read-only inputs: a mosaic with truth, a segmented copy, one without px size."""
    d = tmp_path_factory.mktemp("malformed")
    m = d / "m.ome.zarr"
    sio.write_synthetic(m, synthetic_mosaic((160, 192), seed=7, chunk=96))
    seg = d / "seg.ome.zarr"
    segment(m, model=model_file, output=seg, progress=False)
    nopx = d / "nopx.ome.zarr"
    sio.write_image(nopx, sio.open_mosaic(m).image, pixel_size_um=None)
    text = d / "notes.txt"
    text.write_text("not an image\n")
    return {"m": m, "seg": seg, "nopx": nopx, "model": model_file, "txt": text}


def _snapshot(p: Path) -> dict[str, tuple[int, int]]:
    return {str(q.relative_to(p)): (q.stat().st_size, q.stat().st_mtime_ns)
            for q in p.rglob("*") if q.is_file()}


def _complete_stores(root: Path) -> set[Path]:
    out = set()
    for z in root.rglob("zarr.json"):
        try:
            attrs = json.loads(z.read_text()).get("attributes", {})
        except (OSError, ValueError):
            continue
        if (attrs.get("semdask") or {}).get("complete") is True:
            out.add(z)
    return out


# ------------------------------------------------------------------ setups
def _copy(tmp: Path, s: dict[str, Path]) -> None:
    shutil.copytree(s["m"], tmp / "copy.ome.zarr")


def _copy_segmented(tmp: Path, s: dict[str, Path]) -> None:
    shutil.copytree(s["seg"], tmp / "copy.ome.zarr")


def _damaged(tmp: Path, s: dict[str, Path]) -> None:
    """A segmented copy with one labels shard overwritten by other bytes."""
    shutil.copytree(s["seg"], tmp / "copy.ome.zarr")
    shards = sorted(p for p in (tmp / "copy.ome.zarr" / "labels" / "phases" / "0").rglob("*")
                    if p.is_file() and p.name != "zarr.json")
    data = bytearray(shards[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    shards[0].write_bytes(bytes(data))


def _plain_dir(tmp: Path, s: dict[str, Path]) -> None:
    (tmp / "plain").mkdir()
    (tmp / "plain" / "keep.txt").write_text("mine")


def _empty_dir(tmp: Path, s: dict[str, Path]) -> None:
    (tmp / "empty").mkdir()


def _files(tmp: Path, s: dict[str, Path]) -> None:
    (tmp / "bad.yaml").write_text("window: [512\n")
    (tmp / "unknown.yaml").write_text("segment:\n  windw: 512\n")
    (tmp / "list.yaml").write_text("- 1\n- 2\n")
    (tmp / "model.safetensors").write_text("this is no model")
    (tmp / "manifest.txt").write_text(f"{tmp / 'missing.ome.zarr'}\n")
    (tmp / "scribbles.csv").write_text("a,b\n1,2\n")
    (tmp / "image.tif").write_bytes(b"II*\x00garbage")
    from PIL import Image

    Image.fromarray(np.full((64, 80), 128, np.uint8)).save(tmp / "good.png")


def _locked(tmp: Path, s: dict[str, Path]) -> None:
    shutil.copytree(s["m"], tmp / "copy.ome.zarr")
    from semdask.storage.lock import lock_path

    lock_path((tmp / "copy.ome.zarr").resolve()).write_text(json.dumps({
        "output": str(tmp / "copy.ome.zarr"), "group": "labels/phases", "owner": "alice",
        "host": "another-host", "pid": 1, "started": 1.0e9, "process_start": None,
        "boot_id": None, "command": "semdask segment", "token": "t"}))


SEG = "segment {m} --model {model} --no-cluster"
CASES = [
    # segment: sizes, choices and devices (all refused before anything is written)
    Case("seg-chunks-huge", SEG + " --chunks 100000000", USAGE, r"16 to 8192.*--chunks 2048"),
    Case("seg-chunks-zero", SEG + " --chunks 0", USAGE, r"--chunks 2048"),
    Case("seg-chunks-negative", SEG + " --chunks -5", USAGE, r"--chunks 2048"),
    Case("seg-chunks-text", SEG + " --chunks big", USAGE, r"'big' is not a valid integer"),
    Case("seg-batch-zero", SEG + " --batch-size 0", USAGE, r"--batch-size 16"),
    Case("seg-batch-negative", SEG + " --batch-size -2", USAGE, r"--batch-size 16"),
    Case("seg-batch-huge", SEG + " --batch-size 100000", USAGE, r"1 to 1024"),
    Case("seg-window-odd", SEG + " --mode window --window 100", USAGE, r"--window 256"),
    Case("seg-window-zero", SEG + " --window 0", USAGE, r"--window 256"),
    Case("seg-window-huge", SEG + " --window 65536", USAGE, r"16 to 4096"),
    Case("seg-window-too-big-for-mosaic", SEG + " --mode window --window 512", USAGE,
         r"smaller --window|--mode whole-chunk"),
    Case("seg-overlap-one", SEG + " --mode window --overlap 1", USAGE, r"--overlap 0.25"),
    Case("seg-overlap-negative", SEG + " --mode window --overlap -0.2", USAGE,
         r"--overlap 0.25"),
    Case("seg-overlap-text", SEG + " --overlap lots", USAGE, r"not a valid float"),
    Case("seg-mode", SEG + " --mode tiles", USAGE, r"'window', 'whole-chunk'"),
    Case("seg-blend", SEG + " --blend linear", USAGE, r"'gaussian', 'cosine', 'uniform'"),
    Case("seg-precision", SEG + " --precision fp8", USAGE, r"'fp32', 'bf16', 'fp16'"),
    Case("seg-fp16-on-cpu", SEG + " --precision fp16 --device cpu", USAGE,
         r"--precision bf16"),
    Case("seg-device-name", SEG + " --device gpu", USAGE, r"--device auto"),
    Case("seg-name-path", SEG + " --name ../evil", USAGE, r"--name phases"),
    Case("seg-name-empty", SEG + " --name ''", USAGE, r"--name phases"),
    Case("seg-name-space", SEG + " --name 'my labels'", USAGE, r"--name phases"),
    # segment: paths
    Case("seg-mosaic-missing", "segment {tmp}/nothing.ome.zarr --no-cluster", USAGE,
         r"check the spelling"),
    Case("seg-mosaic-is-text", "segment {txt} --no-cluster", USAGE, r"fix:"),
    Case("seg-mosaic-plain-dir", "segment {tmp}/plain --no-cluster", USAGE, r"fix:",
         _plain_dir),
    Case("seg-mosaic-empty-dir", "segment {tmp}/empty --no-cluster", USAGE, r"fix:",
         _empty_dir),
    Case("seg-model-missing", "segment {m} --model {tmp}/none.safetensors --no-cluster", USAGE,
         r"check the spelling"),
    Case("seg-model-not-a-model", "segment {m} --model {tmp}/model.safetensors --no-cluster",
         USAGE, r"fix:", _files),
    Case("seg-output-is-file", SEG + " --output {txt}", USAGE, r"choose (a new|another) --output"),
    Case("seg-output-plain-dir", SEG + " --output {tmp}/plain --overwrite", USAGE,
         r"semdask never deletes it|choose another", _plain_dir),
    Case("seg-output-under-file", SEG + " --output {txt}/o.ome.zarr", USAGE,
         r"choose (a new|another) --output"),
    Case("seg-output-exists", SEG + " --output {tmp}/copy.ome.zarr", USAGE,
         r"--overwrite.*--resume", _copy_segmented),
    Case("seg-labels-exist", "segment {tmp}/copy.ome.zarr --model {model} --no-cluster",
         USAGE, r"--overwrite", _copy_segmented),
    Case("seg-rescale-unknown-px", "segment {nopx} --model {model} --rescale --no-cluster",
         USAGE, r"--pixel-size UM|--no-rescale"),
    # segment: run config and environment
    Case("seg-run-config-missing", SEG + " --run-config {tmp}/none.yaml", USAGE,
         r"check the path"),
    Case("seg-run-config-syntax", SEG + " --run-config {tmp}/bad.yaml", USAGE,
         r"YAML syntax", _files),
    Case("seg-run-config-key", SEG + " --run-config {tmp}/unknown.yaml", USAGE,
         r"correct its spelling", _files),
    Case("seg-run-config-list", SEG + " --run-config {tmp}/list.yaml", USAGE,
         r"window: 512", _files),
    Case("seg-env-chunks", SEG, USAGE, r"DASK_SEMDASK__SEGMENT__CHUNKS.*--chunks",
         env=(("DASK_SEMDASK__SEGMENT__CHUNKS", "huge"),)),
    Case("seg-env-precision", SEG, USAGE, r"DASK_SEMDASK__SEGMENT__PRECISION",
         env=(("DASK_SEMDASK__SEGMENT__PRECISION", "fp64"),)),
    # segment: cluster options (refused before a cluster starts)
    Case("seg-no-cluster-profile", SEG + " --profile slurm", USAGE, r"exclude each other"),
    Case("seg-profile-unknown", "segment {m} --model {model} --profile nope", USAGE,
         r"--profile local"),
    Case("seg-address-and-file", "segment {m} --model {model} --scheduler-address tcp://h:1 "
         "--scheduler-file {txt}", USAGE, r"only one of them"),
    # convert
    Case("convert-missing", "convert {tmp}/none.tif {tmp}/o.ome.zarr", USAGE,
         r"check the (spelling|path)"),
    Case("convert-px-zero", "convert {txt} {tmp}/o.ome.zarr --pixel-size 0", USAGE,
         r"--pixel-size 0.04458"),
    Case("convert-px-negative", "convert {txt} {tmp}/o.ome.zarr --pixel-size -1", USAGE,
         r"> 0"),
    Case("convert-databar", "convert {txt} {tmp}/o.ome.zarr --crop-databar lots", USAGE,
         r"'auto' or a number of rows"),
    Case("convert-classes-twice", "convert {txt} {tmp}/o.ome.zarr --labels {txt} "
         "--classes a,b --classes-from {txt}", USAGE, r"not both"),
    Case("convert-classes-no-labels", "convert {txt} {tmp}/o.ome.zarr --classes a,b", USAGE,
         r"pass --labels PATH"),
    Case("convert-ngff", "convert {txt} {tmp}/o.ome.zarr --ngff 0.3", USAGE, r"'0.5', '0.4'"),
    Case("convert-not-an-image", "convert {tmp}/image.tif {tmp}/o.ome.zarr", USAGE, r"fix:",
         _files),
    Case("convert-output-exists", "convert {tmp}/good.png {m}", USAGE, r"--overwrite", _files),
    # train
    Case("train-missing", "train {tmp}/none.ome.zarr --out {tmp}/m.safetensors", USAGE,
         r"check the spelling"),
    Case("train-arch", "train {m} --out {tmp}/m.safetensors --arch vit", USAGE,
         r"'unet', 'resunet'"),
    Case("train-batch-zero", "train {m} --out {tmp}/m.safetensors --batch-size 0", USAGE,
         r"--batch-size.*greater than or equal to 1"),
    Case("train-window-odd", "train {m} --out {tmp}/m.safetensors --window 100", USAGE,
         r"--window.*multiple of 16"),
    Case("train-epochs-zero", "train {m} --out {tmp}/m.safetensors --epochs 0", USAGE,
         r"--epochs"),
    Case("train-lr-negative", "train {m} --out {tmp}/m.safetensors --lr -1", USAGE, r"--lr"),
    Case("train-no-labels", "train {nopx} --out {tmp}/m.safetensors --epochs 1", USAGE,
         r"fix:|--labels"),
    # fractions
    Case("fractions-px-zero", "fractions {seg} --pixel-size 0", USAGE, r"--pixel-size 0.04458"),
    Case("fractions-px-negative", "fractions {seg} --pixel-size -0.1", USAGE, r"> 0"),
    Case("fractions-labels-missing", "fractions {seg} --labels nope", USAGE,
         r"got labels \['phases'\]\. fix:"),
    Case("fractions-missing", "fractions {tmp}/none.ome.zarr", USAGE, r"check the spelling"),
    Case("fractions-damaged-shard", "fractions {tmp}/copy.ome.zarr", DAMAGED, r"semdask verify",
         _damaged),
    Case("fractions-csv-no-folder", "fractions {seg} --csv {tmp}/no/such/f.csv", USAGE,
         r"mkdir -p"),
    Case("fractions-json-is-folder", "fractions {seg} --json {tmp}", USAGE,
         r"'--json'.*is a directory"),
    Case("fractions-csv-under-file", "fractions {seg} --csv {txt}/f.csv", USAGE,
         r"a file\)\. Fix: choose another --csv"),
    # analyze
    Case("analyze-px-zero", "analyze {seg} --pixel-size 0 --no-cluster --out {tmp}/a", USAGE,
         r"> 0"),
    Case("analyze-two-without-series", "analyze {seg} {seg} --no-cluster --out {tmp}/a", USAGE,
         r"add --series"),
    Case("analyze-connectivity", "analyze {seg} --connectivity 6 --no-cluster", USAGE,
         r"'4', '8'"),
    Case("analyze-out-is-file", "analyze {seg} --out {txt} --no-cluster", USAGE,
         r"'--out'.*is a file"),
    Case("analyze-labels-missing", "analyze {seg} --labels nope --no-cluster --out {tmp}/a",
         ANY, r"fix:"),
    # evaluate
    Case("evaluate-missing", "evaluate {tmp}/none.ome.zarr {seg} --no-cluster", USAGE,
         r"check the spelling|fix:"),
    Case("evaluate-labels-missing", "evaluate {seg} {seg} --truth-labels nope --no-cluster",
         ANY, r"fix:"),
    Case("evaluate-json-no-folder", "evaluate {seg} {seg} --truth-labels phases --json "
         "{tmp}/x/y.json --no-cluster", USAGE, r"mkdir -p"),
    # preview
    Case("preview-labels-missing", "preview {seg} {tmp}/p.png --labels nope", USAGE, r"fix:"),
    Case("preview-level", "preview {seg} {tmp}/p.png --level 99", USAGE, r"fix: use --level 0"),
    Case("preview-level-negative", "preview {seg} {tmp}/p.png --level -1", USAGE,
         r"fix: use --level 0"),
    Case("preview-png-no-folder", "preview {seg} {tmp}/none/p.png", USAGE, r"mkdir -p"),
    Case("preview-missing", "preview {tmp}/none.ome.zarr {tmp}/p.png", USAGE,
         r"check the spelling"),
    # verify / unlock
    Case("verify-missing", "verify {tmp}/none.ome.zarr", USAGE, r"check the spelling|fix:"),
    Case("verify-damaged", "verify {tmp}/copy.ome.zarr", DAMAGED, r"--resume", _damaged),
    Case("unlock-unreadable-lock", "unlock {tmp}/copy.ome.zarr", LOCKED, r"--force",
         lambda t, s: (t / "copy.ome.zarr.semdask-lock").write_text("garbage")),
    # batch / watch
    Case("batch-missing", "batch {tmp}/none.txt --no-cluster", USAGE, r"check the spelling"),
    Case("batch-chunks-huge", "batch {tmp}/manifest.txt --chunks 100000000 --no-cluster", USAGE,
         r"--chunks 2048", _files),
    Case("batch-name", "batch {tmp}/manifest.txt --name a/b --no-cluster", USAGE,
         r"--name phases", _files),
    Case("batch-missing-mosaic", "batch {tmp}/manifest.txt --no-cluster", 1,
         r"failed", _files),
    Case("watch-chunks-huge", "watch {tmp} --once --chunks 100000000 --no-cluster", USAGE,
         r"--chunks 2048"),
    # label
    Case("label-annotations-missing", "label {m} -a {tmp}/none.csv --no-cluster", USAGE, r"fix:"),
    Case("label-annotations-bad-csv", "label {m} -a {tmp}/scribbles.csv --no-cluster", USAGE,
         r"fix:|y,x,class", _files),
    # robustness
    Case("robustness-levels", "robustness {m} --blur abc", USAGE, r"--blur 0,1,2"),
    Case("robustness-mode", "robustness {m} --mode tiles", USAGE, r"'window', 'whole-chunk'"),
    Case("robustness-device", "robustness {m} --device gpu", USAGE, r"--device auto"),
    Case("robustness-out-is-file", "robustness {m} --out {txt}", USAGE, r"'--out'.*is a file"),
    Case("robustness-truth-missing", "robustness {m} --truth nope --out {tmp}/r", USAGE, r"fix:"),
    # cluster-info / demo
    Case("cluster-info-profile", "cluster-info --profile nope", USAGE, r"--profile local"),
    Case("demo-shape", "demo --out {tmp}/d --shape 10 10 --no-cluster", USAGE,
         r"--shape 4096 4096"),
    Case("demo-chunks", "demo --out {tmp}/d --chunks 0 --no-cluster", USAGE, r"--chunks 2048"),
    Case("demo-nio", "demo --out {tmp}/d --nio-fraction 2 --no-cluster", USAGE,
         r"--nio-fraction 0.15"),
    # export / export-model / pretrain
    Case("export-format", "export {seg} {tmp}/o.zarr --format png", USAGE, r"'ngff04', 'tiff'"),
    Case("export-missing", "export {tmp}/none.ome.zarr {tmp}/o.zarr", USAGE,
         r"check the spelling"),
    Case("export-group", "export {seg} {tmp}/o.zarr --group nope", USAGE, r"fix: --group"),
    Case("export-model-not-a-model", "export-model {tmp}/model.safetensors {tmp}/o.onnx",
         USAGE, r"fix: convert it once", _files),
    Case("pretrain-window", "pretrain {m} --out {tmp}/p.safetensors --window 100", USAGE,
         r"fix: --window 96"),
    Case("pretrain-budget", "pretrain {m} --out {tmp}/p.safetensors --budget soon", USAGE,
         r"--budget 30m"),
    # other engineers' safety features (ownership, integrity, lock)
    Case("seg-output-inside-input", SEG + " --output {m}/inner.ome.zarr", USAGE,
         r"fix:.*--output|outside"),
    Case("seg-resume-foreign-store", SEG + " --output {nopx} --resume", USAGE, r"fix:"),
    Case("seg-lock-held", "segment {tmp}/copy.ome.zarr --model {model} --no-cluster", LOCKED,
         r"semdask unlock", _locked),
]


def _argv(c: Case, tmp: Path, s: dict[str, Path]) -> list[str]:
    import shlex

    text = c.argv.format(tmp=tmp, **{k: str(v) for k, v in s.items()})
    return shlex.split(text)


def test_at_least_sixty_cases_over_every_command() -> None:
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    used = {c.argv.split()[0] for c in CASES}
    assert set(main.commands) - used <= {"synth"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed(case: Case, stores: dict[str, Path], tmp_path: Path,
                   monkeypatch: pytest.MonkeyPatch) -> None:
    import dask

    if case.setup is not None:
        case.setup(tmp_path, stores)
    for k, v in case.env:
        monkeypatch.setenv(k, v)
    shared = {k: _snapshot(v) for k, v in stores.items() if v.is_dir()}
    before = _complete_stores(tmp_path)
    if case.env:
        dask.config.refresh()
    try:
        res = CliRunner().invoke(main, _argv(case, tmp_path, stores))
    finally:
        for k, _ in case.env:
            monkeypatch.delenv(k)
        if case.env:
            dask.config.refresh()
    out = res.output
    assert res.exit_code != 0, out
    if case.code != ANY:
        assert res.exit_code == case.code, out
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in out
    assert re.search(case.says, out, re.I | re.S), out
    assert not re.search(r"^wrote ", out, re.M), out
    assert _complete_stores(tmp_path) <= before  # nothing new looks complete
    assert {k: _snapshot(v) for k, v in stores.items() if v.is_dir()} == shared


def test_cuda_device_absent_is_refused_before_writing(stores: dict[str, Path],
                                                      tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = CliRunner().invoke(main, ["segment", str(stores["m"]), "--model", str(stores["model"]),
                                    "--device", "cuda:0", "--output", str(tmp_path / "o"),
                                    "--no-cluster"])
    assert res.exit_code == USAGE and "--device auto" in res.output
    assert not (tmp_path / "o").exists()


def test_dashboard_on_other_interfaces_warns() -> None:
    from semdask.cli.common import _host, _warn_dashboard

    assert [_host(a) for a in ("0.0.0.0:8787", "[::1]:1", ":8787", "tcp://10.0.0.1:8787")] == [
        "0.0.0.0", "::1", "", "10.0.0.1"]
    import click

    @click.command()
    def cmd() -> None:
        _warn_dashboard("0.0.0.0:8787", False)
        _warn_dashboard("127.0.0.1:8787", False)

    res = CliRunner().invoke(cmd, [])
    assert res.output.count("warning") == 1 and "--dashboard-address 127.0.0.1:8787" in res.output


# ------------------------------------------------------------------ subprocesses
SUB = [
    (["segment", "{m}", "--chunks", "100000000", "--no-cluster"], USAGE, "--chunks 2048"),
    (["fractions", "{seg}", "--pixel-size", "0"], USAGE, "> 0"),
    (["convert", "{tmp}/none.tif", "{tmp}/o.ome.zarr"], USAGE, "Fix: check the"),
]


@pytest.mark.parametrize(("argv", "code", "says"), SUB, ids=["segment", "fractions", "convert"])
def test_malformed_in_a_subprocess(argv: list[str], code: int, says: str,
                                   stores: dict[str, Path], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = [a.format(tmp=tmp_path, **{k: str(v) for k, v in stores.items()}) for a in argv]
    p = subprocess.run([sys.executable, "-m", "semdask", *args], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr + p.stdout and says in p.stderr
    assert not (tmp_path / "o.ome.zarr").exists()


def test_unexpected_error_prints_one_line_not_a_traceback() -> None:
    import click

    from semdask.cli.common import handle_errors

    @click.command()
    @handle_errors
    def boom() -> None:
        raise RuntimeError("something odd")

    @click.command()
    @handle_errors
    def denied() -> None:
        raise PermissionError(13, "Permission denied", "/x/y")

    r1, r2 = CliRunner().invoke(boom, []), CliRunner().invoke(denied, [])
    assert r1.exit_code == 1 and "RuntimeError: something odd" in r1.output
    assert "-vv" in r1.output and "Traceback" not in r1.output
    assert r2.exit_code == 1 and "Permission denied (/x/y)" in r2.output
