"""Inference settings: the options of ``segment``, one precedence, validated ranges.

:func:`resolve_settings` turns arguments, a run config, the model file and
``dask.config["semdask.segment"]`` into frozen :class:`Settings` (pure: no mosaic,
no files written). ``segment`` (through :func:`semdask.inference.run.resolve`),
``robustness``, ``demo``, ``batch``/``watch`` and the benchmarks all use it; the CLI
takes its choices from the same enums (:func:`choices`).

Precedence, one for every parameter (the source of each is kept in
``Settings.sources``, logged and recorded in the provenance):

1. an explicit argument (a keyword, a command-line flag);
2. the run config (``run_config=``: a mapping or a YAML file with the keys of the
   ``segment`` section of ``semdask.yaml``; ``semdask segment --run-config FILE``);
3. ``dask.config`` values you set (``~/.config/dask/*.yaml``,
   ``DASK_SEMDASK__SEGMENT__WINDOW=512``, ``dask.config.set``);
4. the model file (its inference ``window``);
5. the packaged default (``semdask/semdask.yaml``).

``dask.config`` ranks above the model file on purpose: a value you set in your
environment is a deliberate choice, whereas the packaged default is only a fallback
(a value equal to the packaged one counts as the default).

Sizes are refused with the limit named, never clamped silently: chunk edges
16..:data:`MAX_CHUNK`, windows 16..:data:`MAX_WINDOW` (multiples of 16), batch sizes
1..:data:`MAX_BATCH`. ``"auto"`` (device, batch size) stays ``"auto"`` here and is
decided on each worker (:func:`semdask.inference.graph._chunk_task`).

Examples
--------
>>> s = resolve_settings(mode="window", window=512, run_config={"overlap": 0.5})
>>> s.mode.value, s.window, s.overlap, s.sources["overlap"], s.sources["window"]
('window', 512, 0.5, 'run config', 'argument')
>>> resolve_settings(chunk=100_000_000)
Traceback (most recent call last):
...
semdask.errors.InputError: chunks: expected a chunk edge (px) of 16 to 8192, got 100000000...
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any, Literal

from semdask import config
from semdask.errors import InputError

__all__ = [
    "FLAGS",
    "MAX_BATCH",
    "MAX_CHUNK",
    "MAX_WINDOW",
    "Blend",
    "Mode",
    "Precision",
    "Settings",
    "check_name",
    "check_settings",
    "choices",
    "resolve_settings",
]

log = logging.getLogger(__name__)

MAX_CHUNK = 8192  #: largest chunk edge (px): a whole-chunk block of 8192² needs ~10 GiB
MAX_WINDOW = 4096  #: largest window edge (px)
MAX_BATCH = 1024  #: largest number of windows per forward pass
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_TRUE, _FALSE = {"true", "yes", "1", "on"}, {"false", "no", "0", "off"}


class Mode(StrEnum):
    """Inference mode: blended sliding windows, or the whole chunk at once."""

    WINDOW = "window"
    WHOLE_CHUNK = "whole-chunk"


class Blend(StrEnum):
    """Blend weights of overlapping windows."""

    GAUSSIAN = "gaussian"
    COSINE = "cosine"
    UNIFORM = "uniform"


class Precision(StrEnum):
    """Autocast precision (fp16 on CUDA only)."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


def choices(enum: type[Enum]) -> list[str]:
    """The values of an option enum, for ``click.Choice`` and messages."""
    return [str(e.value) for e in enum]


@dataclass(frozen=True)
class Settings:
    """Resolved, validated inference settings (no mosaic, no files)."""

    mode: Mode
    window: int
    overlap: float
    blend: Blend
    chunk: int
    precision: Precision
    batch_size: int | Literal["auto"]
    device: str
    probs: bool
    confidence: bool
    sources: Mapping[str, str] = field(default_factory=dict)

    def plan_kwargs(self, receptive_field: int, multiple: int = 16) -> dict[str, Any]:
        """Keywords of :func:`semdask.inference.graph.plan_inference`."""
        return {"mode": self.mode.value, "window": self.window, "overlap": self.overlap,
                "chunk": self.chunk, "receptive_field": int(receptive_field),
                "blend": self.blend.value, "multiple": int(multiple)}

    def infer_kwargs(self) -> dict[str, Any]:
        """Keywords of :func:`semdask.inference.graph.blended_probs` (auto: on the worker)."""
        return {"precision": self.precision.value, "batch_size": self.batch_size,
                "device": self.device}

    def describe(self) -> str:
        """``key=value (source)`` for the log."""
        vals = {k: getattr(self, k) for k in _FIELDS}
        return ", ".join(f"{k}={getattr(v, 'value', v)} ({self.sources.get(k, '?')})"
                         for k, v in vals.items())


#: parameter -> key of the ``segment`` section of semdask.yaml
_FIELDS = {"mode": "mode", "window": "window", "overlap": "overlap", "blend": "blend",
           "chunk": "chunks", "precision": "precision", "batch_size": "batch-size",
           "device": "device", "probs": "probs", "confidence": "confidence"}
#: the command-line flag of each setting (for messages)
FLAGS = {"mode": "--mode", "window": "--window", "overlap": "--overlap", "blend": "--blend",
         "chunk": "--chunks", "precision": "--precision", "batch_size": "--batch-size",
         "device": "--device", "probs": "--probs", "confidence": "--confidence"}
_ALIASES = {"chunks": "chunk", "batch-size": "batch_size"}


def _enum(enum: type[Enum], what: str, value: Any, example: str) -> Any:
    try:
        return enum(str(getattr(value, "value", value)).strip().lower())
    except ValueError:
        raise InputError(what, expected=f"one of {', '.join(choices(enum))}", got=repr(value),
                         fix=f"use {FLAGS.get(what, what)} {example}") from None


def _int(what: str, value: Any, lo: int, hi: int, fix: str, desc: str,
         multiple: int = 1) -> int:
    try:
        v = int(value)
        ok = float(value) == v and lo <= v <= hi and v % multiple == 0
    except (TypeError, ValueError, OverflowError):
        v, ok = 0, False
    if not ok or isinstance(value, bool):
        step = f", a multiple of {multiple}" if multiple > 1 else ""
        raise InputError(what, expected=f"{desc} of {lo} to {hi}{step}", got=repr(value),
                         fix=fix)
    return v


def _bool(what: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in _TRUE | _FALSE:
        return s in _TRUE
    raise InputError(what, expected="true or false", got=repr(value),
                     fix=f"use {FLAGS[what]} or set semdask.segment.{_FIELDS[what]}: true")


def _check(name: str, value: Any) -> Any:
    """Validate and normalise one parameter (whatever its source)."""
    if name == "mode":
        return _enum(Mode, "mode", value, "whole-chunk")
    if name == "blend":
        return _enum(Blend, "blend", value, "gaussian")
    if name == "precision":
        return _enum(Precision, "precision", value, "fp32")
    if name == "window":
        return _int("window", value, 16, MAX_WINDOW, "use --window 256 (a multiple of 16)",
                    "a window edge (px)", 16)
    if name == "chunk":
        return _int("chunks", value, 16, MAX_CHUNK,
                    f"use --chunks 2048 (at most {MAX_CHUNK}; the mosaic is cut into chunks)",
                    "a chunk edge (px)")
    if name == "batch_size":
        if str(value).strip().lower() == "auto":
            return "auto"
        return _int("batch-size", value, 1, MAX_BATCH,
                    "use --batch-size 16, or leave it out (auto: 1 on CPU, 16 on CUDA)",
                    "a number of windows per forward pass")
    if name == "overlap":
        try:
            v = float(value)
        except (TypeError, ValueError):
            v = -1.0
        if not 0.0 <= v < 1.0 or isinstance(value, bool):
            raise InputError("overlap", expected="a fraction in [0, 1) of the window",
                             got=repr(value), fix="use --overlap 0.25 (or 0.5)")
        return v
    if name == "device":
        s = str(value).strip().lower()
        if not _DEVICE.match(s):
            raise InputError("device", expected="auto, cpu, cuda, cuda:N or mps",
                             got=repr(value), fix="use --device auto (or cpu, cuda:0)")
        return s
    return _bool(name, value)


def _run_config(run_config: Mapping[str, Any] | str | os.PathLike[str] | None) -> dict[str, Any]:
    if run_config is None:
        return {}
    if not isinstance(run_config, Mapping):
        import yaml

        p = Path(run_config)
        try:
            data = yaml.safe_load(p.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise InputError(f"run config {p}", expected="a readable YAML file",
                             got=f"{type(e).__name__}: {e}".splitlines()[0],
                             fix="check the path and the YAML syntax") from None
        run_config = data.get("segment", data) if isinstance(data, dict) else data
    if not isinstance(run_config, Mapping):
        raise InputError("run config", expected="a mapping of segment settings",
                         got=type(run_config).__name__, fix="write e.g. 'window: 512'")
    out = {}
    for k, v in run_config.items():
        name = _ALIASES.get(str(k), str(k).replace("-", "_"))
        if name not in _FIELDS:
            raise InputError(f"run config key {k!r}", expected=", ".join(_FIELDS.values()),
                             got=repr(k), fix="remove the key or correct its spelling")
        out[name] = v
    return out


def _from_config(name: str) -> tuple[Any, str] | None:
    """The ``dask.config`` value and whether you set it (else it is the packaged default)."""
    key = f"segment.{_FIELDS[name]}"
    value = config.get(key)
    if value is None:
        return None
    return value, "dask.config" if value != config.packaged(key) else "default"


def resolve_settings(*, model_config: Any = None,
                     run_config: Mapping[str, Any] | str | os.PathLike[str] | None = None,
                     **explicit: Any) -> Settings:
    """Resolve and validate the inference settings (see the module's precedence).

    Parameters
    ----------
    model_config : semdask.nets.model.ModelConfig, optional
        Supplies the model file's ``window``.
    run_config : mapping or path, optional
        Keys of the ``segment`` section of ``semdask.yaml`` (``chunks`` or ``chunk``).
    **explicit
        ``mode``, ``window``, ``overlap``, ``blend``, ``chunk``, ``precision``,
        ``batch_size``, ``device``, ``probs``, ``confidence``; ``None``: not given.

    Raises
    ------
    InputError
        For an unknown parameter or a value out of range, naming its source and the fix.
    """
    unknown = set(explicit) - set(_FIELDS)
    if unknown:
        raise InputError("segment settings", expected=", ".join(_FIELDS),
                         got=", ".join(sorted(unknown)), fix="remove or rename them")
    run = _run_config(run_config)
    model = {"window": int(model_config.window)} if getattr(model_config, "window",
                                                             None) else {}
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for name in _FIELDS:
        cands: list[tuple[Any, str]] = []
        if explicit.get(name) is not None:
            cands.append((explicit[name], "argument"))
        if run.get(name) is not None:
            cands.append((run[name], "run config"))
        cfg = _from_config(name)
        if cfg is not None and cfg[1] == "dask.config":
            cands.append(cfg)
        if name in model:
            cands.append((model[name], "model file"))
        if cfg is not None:
            cands.append((cfg[0], "default"))
        value, src = cands[0] if cands else (
            {"device": "auto", "probs": False, "confidence": False}.get(name), "default")
        try:
            values[name] = _check(name, value)
        except InputError as e:
            if src in ("argument", "default"):
                raise
            where = {"run config": "the run config",
                     "dask.config": f"dask.config semdask.segment.{_FIELDS[name]} (an "
                     "environment variable DASK_SEMDASK__SEGMENT__"
                     f"{_FIELDS[name].upper().replace('-', '_')} or a dask YAML file)",
                     "model file": "the model file"}[src]
            raise InputError(f"{e.what} from {where}", expected=e.expected, got=e.got,
                             fix=f"correct or remove it there, or pass {FLAGS[name]}") from None
        sources[name] = src
    return Settings(**values, sources=sources)


def check_settings(**segment_kwargs: Any) -> Settings:
    """Check the settings and label name among ``segment`` keyword arguments (others ignored).

    For callers that run many segmentations (``batch``, ``watch``): a bad setting
    fails once, before the first mosaic, instead of once per mosaic.
    """
    check_name(segment_kwargs.get("name", "phases"))
    return resolve_settings(run_config=segment_kwargs.get("run_config"),
                            **{k: v for k, v in segment_kwargs.items() if k in _FIELDS})


def check_name(name: Any) -> str:
    """A label group name (``labels/<name>``): letters, digits, ``_ . -``, no path."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError("name", expected="a label group name of letters, digits, _ . -",
                         got=repr(name), fix="use --name phases")
    return name
