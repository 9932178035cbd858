"""bioimage.io model packages: ``rdf.yaml`` (format 0.5) + ONNX weights, validated offline.

:func:`export_bioimageio` writes the ONNX weights (:func:`semdask.nets.export.export_onnx`,
checked against PyTorch; never a pickle), test input/output ``.npy`` files (the raw
input; the softmax of the logits of the ``scale_range``-normalised input), sample
TIFFs, a cover image and a README, and validates the package with ``bioimageio.spec``
(local files only: nothing is downloaded). A ``.zip`` unless told otherwise.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from semdask import __version__
from semdask.errors import InputError, ModelError
from semdask.nets.export import (
    OnnxCheck,
    check_onnx,
    export_onnx,
    load_net,
    output_path,
    require_optional,
)
from semdask.nets.model import ModelConfig, model_hash

__all__ = ["BioimageioExport", "export_bioimageio"]

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]

@dataclass(frozen=True)
class BioimageioExport:
    """A written bioimage.io package, its ONNX check and the format validation result."""

    path: Path
    onnx: OnnxCheck
    status: str
    warnings: list[str] = field(default_factory=list)


def _sample(cfg: ModelConfig, sample: np.ndarray | None, m: int) -> np.ndarray:
    """A (1, c, h, w) raw test input, h and w multiples of the stride (>= 64 px)."""
    if sample is None:
        from scipy import ndimage

        rng = np.random.default_rng(0)
        field_ = ndimage.gaussian_filter(rng.random((256, 256)), 6)
        lo, hi = field_.min(), field_.max()
        sample = ((field_ - lo) / (hi - lo) * 255).astype(np.uint8)
    a = np.asarray(sample)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[0] != cfg.in_channels:
        raise InputError("sample", expected=f"a (y, x) or ({cfg.in_channels}, y, x) image",
                         got=f"shape {a.shape}")
    h, w = (a.shape[1] // m) * m, (a.shape[2] // m) * m
    if min(h, w) < max(64, m):
        raise InputError("sample", expected=f"an image of at least {max(64, m)} px a side",
                         got=f"shape {a.shape}")
    return np.ascontiguousarray(a[None, :, :h, :w])


def _scale_range(x: np.ndarray, lo_pct: float, hi_pct: float) -> np.ndarray:
    """bioimage.io ``scale_range`` over (y, x) per sample and channel (eps 1e-6)."""
    xf = x.astype(np.float32)
    lo = np.percentile(xf, lo_pct, axis=(2, 3), keepdims=True)
    hi = np.percentile(xf, hi_pct, axis=(2, 3), keepdims=True)
    return ((xf - lo) / (hi - lo + 1e-6)).astype(np.float32)


def _cover(raw: np.ndarray, probs: np.ndarray, colours: list[tuple[int, ...]], path: Path
           ) -> None:
    """Input (grey) beside the predicted classes (colours): a 2:1 PNG."""
    from PIL import Image

    g = raw[0, 0].astype(np.float32)
    g = ((g - g.min()) / max(float(g.max() - g.min()), 1e-6) * 255).astype(np.uint8)
    lut = np.array([c[:3] for c in colours], dtype=np.uint8)
    right = lut[probs[0].argmax(0)]
    left = np.repeat(g[..., None], 3, axis=2)
    img = Image.fromarray(np.concatenate([left, right], axis=1))
    img.resize((512, 256), Image.Resampling.NEAREST).save(path)


def _readme(cfg: ModelConfig, name: str, chk: OnnxCheck, sha: str, multiple: int) -> str:
    px = "unknown" if cfg.pixel_size_um is None else f"{cfg.pixel_size_um:g} µm"
    n = cfg.normalisation
    return f"""# {name}

Phase segmentation of scanning electron microscopy (SEM) images with a U-Net
(architecture `{cfg.architecture}`, {cfg.n_classes} classes: {", ".join(cfg.classes)}),
exported by semdask {__version__} from weights with SHA-256 `{sha}`.

## Inputs and outputs

- input `input`: one grey SEM image, axes (batch, channel, y, x), height and width
  multiples of {multiple}, pixel size {px} (the model was trained at it; resample other images
  to it first). Preprocessing: `scale_range` with the {n.low_percentile} / {n.high_percentile}
  percentiles. semdask computes these percentiles once over the whole mosaic; here they
  are computed per input tile, which can differ slightly on small tiles.
- output `probs`: class probabilities (softmax over the channel axis), same y/x size.
- receptive field {cfg.receptive_field} px: tile large images with an overlap of at
  least half of it and keep the centres, or use `semdask segment`, which does this exactly.

## Validation

The ONNX weights were run with onnxruntime on inputs of shape
{", ".join("x".join(map(str, s)) for s in chk.shapes)} and compared with PyTorch:
max |logit difference| {chk.max_abs_diff:.2e}, label agreement {100 * chk.agreement:.4f} %.
Accuracy on held-out data: see the provenance in `config.semdask` and the semdask README.

## Licence

BSD-3-Clause.
"""


def _rdf(cfg: ModelConfig, name: str, opset: int, sha: str, multiple: int) -> dict[str, Any]:
    from bioimageio.spec.model import v0_5

    space: dict[str, Any] = {}
    if cfg.pixel_size_um is not None:
        space = {"unit": "micrometer", "scale": float(cfg.pixel_size_um)}
    n = cfg.normalisation
    size = {"min": multiple, "step": multiple}  # the network's total stride
    ch_in = ["sem"] if cfg.in_channels == 1 else [f"sem{i}" for i in range(cfg.in_channels)]
    return {
        "type": "model",
        "format_version": str(v0_5.ModelDescr.implemented_format_version),
        "name": name,
        "description": f"U-Net phase segmentation of SEM images into {', '.join(cfg.classes)} "
                       "(semdask)",
        "authors": [{"name": "semdask developers"}],
        "cite": [{"text": "semdask: distributed phase segmentation of SEM mosaics",
                  "url": "https://github.com/semdask/semdask"}],
        "license": "BSD-3-Clause",
        "documentation": {"source": "README.md"},
        "covers": [{"source": "cover.png"}],
        "tags": ["2d", "sem", "electron-microscopy", "semantic-segmentation", "unet",
                 "materials-science", "onnx"],
        "version": __version__,
        "inputs": [{
            "id": "input",
            "axes": [{"type": "batch"}, {"type": "channel", "channel_names": ch_in},
                     {"type": "space", "id": "y", "size": size, **space},
                     {"type": "space", "id": "x", "size": size, **space}],
            "test_tensor": {"source": "test_input.npy"},
            "sample_tensor": {"source": "sample_input.tif"},
            "data": {"type": "float32"},
            "preprocessing": [
                {"id": "ensure_dtype", "kwargs": {"dtype": "float32"}},
                {"id": "scale_range", "kwargs": {"axes": ["y", "x"],
                                                 "min_percentile": n.low_percentile,
                                                 "max_percentile": n.high_percentile}}],
        }],
        "outputs": [{
            "id": "probs",
            "axes": [{"type": "batch"},
                     {"type": "channel", "channel_names": [_ident(c) for c in cfg.classes]},
                     {"type": "space", "id": "y",
                      "size": {"tensor_id": "input", "axis_id": "y"}, **space},
                     {"type": "space", "id": "x",
                      "size": {"tensor_id": "input", "axis_id": "x"}, **space}],
            "test_tensor": {"source": "test_output.npy"},
            "sample_tensor": {"source": "sample_output.tif"},
            "data": {"type": "float32", "range": [0.0, 1.0]},
            "postprocessing": [{"id": "softmax", "kwargs": {"axis": "channel"}}],
        }],
        "weights": {"onnx": {"source": "weights.onnx", "opset_version": opset}},
        "config": {"semdask": {"version": __version__, "weights_sha256": sha,
                               "model": cfg.model_dump(mode="json")}},
    }


def _ident(name: str) -> str:
    """A bioimage.io channel name (identifier-like)."""
    s = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)
    return s if s and not s[0].isdigit() else f"c_{s}"


def export_bioimageio(model: PathLike | None, out: PathLike, *,
                      sample: np.ndarray | None = None, name: str | None = None,
                      as_zip: bool | None = None, exporter: str = "dynamo",
                      overwrite: bool = False) -> BioimageioExport:
    """Write a bioimage.io model package (format 0.5, ONNX weights) and validate it offline.

    Parameters
    ----------
    model : path or None
        The semdask model (``.safetensors``; None: the bundled one).
    out : path
        ``*.zip`` (a zipped package) or a new folder.
    sample : array, optional
        A raw test image (y, x), e.g. a tile of a mosaic at the model's pixel size
        (at least 64 px a side); default: a smooth synthetic texture.
    name : str, optional
        The package name (default: the model file's stem).
    as_zip : bool, optional
        Zip the package; default: when ``out`` ends in ``.zip``.
    exporter : {"dynamo", "torchscript"}
        The ONNX exporter (:func:`export_onnx`).
    overwrite : bool
        Replace an existing zip or package folder.

    Raises
    ------
    ModelError
        When bioimage.io packages cannot be written (optional packages missing), the
        ONNX check fails, or ``bioimageio.spec`` finds the package invalid.
    """
    bs = require_optional("bioimageio.spec")
    require_optional("onnxruntime")
    import tifffile
    import yaml

    zipped = str(out).endswith(".zip") if as_zip is None else as_zip
    dst = output_path(out, overwrite=overwrite, suffixes=(".zip",) if zipped else ("",))
    net, cfg, mpath = load_net(model)
    sha = model_hash(mpath)
    title = name or mpath.stem
    m = int(getattr(net, "multiple", 16))
    raw = _sample(cfg, sample, m)
    with tempfile.TemporaryDirectory(prefix="semdask-bioimageio-", dir=dst.parent) as td:
        d = Path(td) / "package"
        d.mkdir()
        chk = export_onnx(mpath, d / "weights.onnx", check=True, exporter=exporter)
        assert chk is not None
        x = _scale_range(raw, cfg.normalisation.low_percentile,
                         cfg.normalisation.high_percentile)
        check = check_onnx(d / "weights.onnx", net, inputs=[x], multiple=m)
        logits = _run_onnx(d / "weights.onnx", x)
        e = np.exp(logits - logits.max(1, keepdims=True))
        probs = (e / e.sum(1, keepdims=True)).astype(np.float32)
        np.save(d / "test_input.npy", raw.astype(np.float32))
        np.save(d / "test_output.npy", probs)
        tifffile.imwrite(d / "sample_input.tif", raw[0, 0])
        tifffile.imwrite(d / "sample_output.tif", probs[0], photometric="minisblack")
        colours = [tuple(c) for c in cfg.colours] or _grey(cfg.n_classes)
        _cover(raw, probs, colours, d / "cover.png")
        summary = OnnxCheck(path=dst, opset=chk.opset, shapes=[*chk.shapes, *check.shapes],
                            max_abs_diff=max(chk.max_abs_diff, check.max_abs_diff),
                            agreement=min(chk.agreement, check.agreement))
        (d / "README.md").write_text(_readme(cfg, title, summary, sha, m), encoding="utf-8")
        (d / "rdf.yaml").write_text(yaml.safe_dump(_rdf(cfg, title, chk.opset, sha, m),
                                                   sort_keys=False, allow_unicode=True),
                                    encoding="utf-8")
        status, notes = _validate(bs, d / "rdf.yaml")
        if dst.exists():
            shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
        if zipped:
            part = dst.with_name(dst.name + ".partial")
            with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as zf:
                for f in sorted(d.iterdir()):
                    zf.write(f, f.name)
            os.replace(part, dst)
            status, notes = _validate(bs, dst)  # the zip as a consumer will load it
        else:
            shutil.move(str(d), dst)
    log.info("bioimage.io package %s: %s", dst, status)
    return BioimageioExport(path=dst, onnx=summary, status=status, warnings=notes)


def _grey(n: int) -> list[tuple[int, ...]]:
    return [(int(v), int(v), int(v), 255) for v in np.linspace(0, 255, n)]


def _run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    ort = require_optional("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def _validate(bs: Any, source: Path) -> tuple[str, list[str]]:
    """``bioimageio.spec`` format validation of a local package (no downloads)."""
    descr = bs.load_description(source, perform_io_checks=True)
    summary = descr.validation_summary
    if type(descr).__name__ == "InvalidDescr" or summary.status == "failed":
        errors = [f"{'.'.join(map(str, e.loc))}: {e.msg}" for e in summary.errors]
        raise ModelError(f"bioimage.io package {source}", expected="a valid model description",
                         got="; ".join(errors) or str(summary.status),
                         fix="report this as a semdask bug (the package is generated)")
    notes = [f"{'.'.join(map(str, w.loc))}: {w.msg}" for w in summary.warnings]
    return str(summary.status), notes
