"""Model export: ONNX (checked against PyTorch with onnxruntime) and bioimage.io packages.

* :func:`export_onnx` writes the network as ONNX with dynamic batch, height and width
  (height and width multiples of the network's total stride, 16 for the default U-Net)
  through torch's ``torch.export``-based exporter (needs ``onnxscript``; the legacy
  TorchScript exporter, ``exporter="torchscript"``, needs only ``onnx``), then runs it with
  onnxruntime on several input sizes and compares the logits with PyTorch's: it raises
  :class:`~semdask.errors.ModelError` unless the labels agree on at least 99.99 % of the
  pixels. The input is the *normalised* image (float32, ``(n, 1, h, w)``: grey levels
  mapped with the mosaic-wide percentiles in the model config); the output is logits.
* :func:`semdask.nets.bioimageio.export_bioimageio` builds a bioimage.io package on it.

The optional packages come with ``pip install 'semdask[export]'``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from semdask.errors import InputError, ModelError
from semdask.nets.model import ModelConfig, Net, load_model

__all__ = ["OnnxCheck", "check_onnx", "export_onnx", "load_net", "output_path", "require_optional"]

log = logging.getLogger(__name__)
PathLike = str | os.PathLike[str]
OPSET = 18  # onnxruntime >= 1.14 runs it; torch's exporters emit it natively
MIN_AGREEMENT = 0.9999
_INSTALL = "pip install 'semdask[export]' (onnx, onnxruntime, onnxscript, bioimageio.spec)"


def require_optional(module: str) -> Any:
    """Import an optional export dependency, or raise ModelError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ModelError(f"model export needs {module}", expected=f"{module} installed",
                         got="not installed", fix=_INSTALL) from e


@dataclass(frozen=True)
class OnnxCheck:
    """ONNX vs PyTorch on test inputs: worst logit difference and label agreement."""

    path: Path
    opset: int
    shapes: list[tuple[int, ...]]
    max_abs_diff: float
    agreement: float

    def __str__(self) -> str:
        return (f"{self.path}: opset {self.opset}; onnxruntime vs PyTorch on "
                f"{', '.join('x'.join(map(str, s)) for s in self.shapes)}: max |logit diff| "
                f"{self.max_abs_diff:.2e}, label agreement {100 * self.agreement:.4f} %")


def load_net(model: PathLike | None) -> tuple[Net, ModelConfig, Path]:
    """The network (eval mode, CPU), its config and file; None: the bundled model."""
    from semdask.nets.model import bundled_model_path

    path = Path(model) if model is not None else bundled_model_path()
    net, cfg = load_model(path, device="cpu")
    return net.eval(), cfg, path


def _test_shapes(multiple: int) -> list[tuple[int, int, int, int]]:
    m = max(16, multiple)
    return [(1, 1, 4 * m, 6 * m), (2, 1, 3 * m, 2 * m), (1, 1, 8 * m, 8 * m)]


def check_onnx(onnx_path: PathLike, net: torch.nn.Module, *, in_channels: int = 1,
               multiple: int = 16, seed: int = 0,
               inputs: list[np.ndarray] | None = None) -> OnnxCheck:
    """Run ``onnx_path`` with onnxruntime and compare with ``net`` (PyTorch, CPU, fp32).

    Raises
    ------
    ModelError
        When the labels (argmax over classes) agree on fewer than 99.99 % of the pixels.
    """
    ort = require_optional("onnxruntime")
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    rng = np.random.default_rng(seed)
    if inputs is None:
        inputs = [rng.random((n, in_channels, h, w), dtype=np.float32)
                  for n, _, h, w in _test_shapes(multiple)]
    diff, same, total = 0.0, 0, 0
    for x in inputs:
        with torch.no_grad():
            ref = net(torch.from_numpy(x)).numpy()
        out = sess.run(None, {name: x})[0]
        if out.shape != ref.shape:
            raise ModelError(f"ONNX model {onnx_path}", expected=f"output shape {ref.shape}",
                             got=f"{out.shape}", fix="re-export with a newer torch/onnx")
        diff = max(diff, float(np.abs(out - ref).max()))
        same += int((out.argmax(1) == ref.argmax(1)).sum())
        total += out.shape[0] * out.shape[2] * out.shape[3]
    import onnx

    opset = max((o.version for o in onnx.load(str(onnx_path), load_external_data=False)
                 .opset_import if o.domain in ("", "ai.onnx")), default=0)
    res = OnnxCheck(path=Path(onnx_path), opset=int(opset),
                    shapes=[tuple(x.shape) for x in inputs], max_abs_diff=diff,
                    agreement=same / max(total, 1))
    if res.agreement < MIN_AGREEMENT:
        raise ModelError(f"ONNX export {onnx_path}",
                         expected=f"labels agreeing with PyTorch on >= {100 * MIN_AGREEMENT} %",
                         got=f"{100 * res.agreement:.4f} % (max |logit diff| {diff:.3g})",
                         fix="re-export with exporter='torchscript' or another opset")
    return res


def export_onnx(model: PathLike | None, out: PathLike, *, opset: int = OPSET,
                exporter: str = "dynamo", check: bool = True,
                overwrite: bool = False) -> OnnxCheck | None:
    """Export a semdask model (``.safetensors``; None: the bundled one) to ONNX.

    Parameters
    ----------
    model : path or None
        The model file.
    out : path
        The ``.onnx`` output (written beside as ``.onnx.partial`` first).
    opset : int
        ONNX opset (18 default; onnxruntime 1.14 or newer).
    exporter : {"dynamo", "torchscript"}
        torch's ``torch.export``-based exporter (needs onnxscript) or the legacy one.
    check : bool
        Compare onnxruntime with PyTorch on three input sizes (raises on disagreement).
    overwrite : bool
        Replace an existing file.

    Returns
    -------
    OnnxCheck or None
        The comparison (None when ``check`` is False).
    """
    if exporter not in ("dynamo", "torchscript"):
        raise InputError("exporter", expected="'dynamo' or 'torchscript'", got=repr(exporter),
                         fix="exporter='dynamo'")
    require_optional("onnx")
    if exporter == "dynamo":
        require_optional("onnxscript")
    dst = output_path(out, overwrite=overwrite, suffixes=(".onnx",))
    net, cfg, _ = load_net(model)
    m = int(getattr(net, "multiple", 16))
    x = torch.rand(1, cfg.in_channels, 4 * m, 4 * m)
    tmp = dst.with_name(dst.name + ".partial")
    names: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"],
                             "opset_version": opset}
    try:
        with warnings.catch_warnings(), _quiet_loggers("torch.onnx", "onnxscript", "onnx_ir"):
            warnings.simplefilter("ignore")  # tracer and deprecation chatter
            if exporter == "dynamo":
                from torch.export import Dim

                dims = {0: Dim("batch", min=1), 2: m * Dim("h", min=1),
                        3: m * Dim("w", min=1)}
                torch.onnx.export(net, (x,), str(tmp), dynamo=True, external_data=False,
                                  dynamic_shapes={"x": dims}, verbose=False, **names)
            else:
                axes = {0: "batch", 2: "height", 3: "width"}
                torch.onnx.export(net, (x,), str(tmp), dynamo=False,
                                  dynamic_axes={"input": axes, "logits": axes}, **names)
        res = check_onnx(tmp, net, in_channels=cfg.in_channels, multiple=m) if check else None
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if res is not None:
        res = OnnxCheck(path=dst, opset=res.opset, shapes=res.shapes,
                        max_abs_diff=res.max_abs_diff, agreement=res.agreement)
        log.info("%s", res)
    return res


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    """Only errors from the exporters' loggers (e.g. 'torchvision is not installed')."""
    loggers = [logging.getLogger(n) for n in names]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, lvl in zip(loggers, old, strict=True):
            lg.setLevel(lvl)


def output_path(out: PathLike, *, overwrite: bool, suffixes: tuple[str, ...]) -> Path:
    """Check a new output file (or package folder) path; create its parent directory.

    Raises
    ------
    InputError
        When the name does not end in one of ``suffixes``, it is a symlink, or it exists
        (a file or a bioimage.io package folder may be replaced with ``overwrite``).
    """
    raw = Path(out).expanduser()
    p = raw.resolve()
    if not p.name.endswith(suffixes):
        raise InputError(str(raw), expected=f"an output ending in {' or '.join(suffixes)}",
                         got=repr(p.name), fix=f"use {p.with_name(p.stem + suffixes[0])}")
    if raw.is_symlink():
        raise InputError(str(raw), expected="a new path", got="a symlink",
                         fix="choose another output path")
    if p.exists() and not (overwrite and (p.is_file() or _is_package_dir(p))):
        raise InputError(str(p), expected="a new path", got="an existing "
                         + ("directory" if p.is_dir() else "file"),
                         fix="pass --overwrite to replace it" if p.is_file()
                         or _is_package_dir(p) else "choose another output path")
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def _is_package_dir(p: Path) -> bool:
    return p.is_dir() and (p / "rdf.yaml").is_file()
