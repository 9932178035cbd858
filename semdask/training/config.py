"""Typed training configuration: one validated :class:`TrainConfig` instead of loose keywords.

Every option of ``semdask train`` is a field here; option sets are enums shared by the
library and the CLI (``click.Choice(choices(Loss))``). Fields left ``None`` that the
planner owns (:data:`PLANNED`: window, batch size, epochs, steps per epoch, input scale,
balance, augmentation, warm-up) are filled by :func:`semdask.training.planning.plan` from a
fingerprint of the training data and the ``budget``; any value given explicitly wins.
The resolved configuration is written next to the model (``<stem>.train.yaml``) and into
its provenance.

Examples
--------
>>> cfg = TrainConfig(window=192, loss="ce", budget="30m")
>>> cfg.loss is Loss.CE, cfg.budget_s, cfg.budget_steps
(True, 1800.0, None)
>>> parse_budget("500 steps"), parse_budget("1h30m"), parse_budget(90)
((None, 500), (5400.0, None), (90.0, None))
"""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from semdask.errors import InputError

__all__ = ["PLANNED", "Arch", "Augment", "ClassWeights", "Loss", "Norm", "Optimizer",
           "Sampling", "Schedule", "Split", "TrainConfig", "choices", "config_error",
           "parse_budget", "unet_kwargs"]


class Arch(enum.StrEnum):
    """Network architectures (:func:`semdask.nets.model.build_model`)."""

    UNET = "unet"
    RESUNET = "resunet"


class Norm(enum.StrEnum):
    """U-Net normalisation: batch norm after every 3x3 convolution, or none (the paper's)."""

    BATCH = "batch"
    NONE = "none"


class Loss(enum.StrEnum):
    """Training losses (:data:`semdask.training.losses.LOSSES`)."""

    CE = "ce"
    CE_DICE = "ce+dice"
    FOCAL = "focal"


class Schedule(enum.StrEnum):
    """Learning-rate schedules (cosine and poly decay to ``lr / 50`` after a warm-up)."""

    COSINE = "cosine"
    POLY = "poly"
    PLATEAU = "plateau"
    CONSTANT = "constant"


class Optimizer(enum.StrEnum):
    """Optimisers."""

    ADAM = "adam"
    ADAMW = "adamw"


class Sampling(enum.StrEnum):
    """Window sampling: class-balanced share ``balance`` or uniform."""

    BALANCED = "balanced"
    UNIFORM = "uniform"


class ClassWeights(enum.StrEnum):
    """Loss class weights: none, or inverse-sqrt pixel frequencies."""

    NONE = "none"
    AUTO = "auto"


class Split(enum.StrEnum):
    """Validation split kinds (:func:`semdask.training.samplers.make_split`)."""

    BANDS = "bands"
    STORES = "stores"
    BLOCKS = "blocks"


class Augment(enum.StrEnum):
    """Augmentation presets (:data:`semdask.training.augment.PRESETS`)."""

    NONE = "none"
    FLIPS = "flips"
    LIGHT = "light"
    DEFAULT = "default"
    STRONG = "strong"


#: Fields the planner fills when they are ``None``.
PLANNED = ("window", "batch_size", "epochs", "steps_per_epoch", "scale", "balance", "augment",
           "warmup", "class_weights")

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def choices(option: type[enum.StrEnum]) -> list[str]:
    """The values of an option enum (for ``click.Choice``)."""
    return [m.value for m in option]


def parse_budget(budget: str | float | None) -> tuple[float | None, int | None]:
    """``(seconds, steps)`` of a budget: ``"30m"``, ``"1h30m"``, ``"90s"``, ``1800`` (seconds)
    or ``"2000 steps"``; ``None``: no budget.
    """
    if budget is None:
        return None, None
    if isinstance(budget, bool):
        raise InputError("budget", expected="a wall time or a step count", got=repr(budget))
    if isinstance(budget, int | float):
        if budget <= 0:
            raise InputError("budget", expected="a positive number of seconds", got=str(budget))
        return float(budget), None
    text = str(budget).strip().lower().replace(" ", "")
    m = re.fullmatch(r"(\d+)steps?", text)
    if m and int(m.group(1)) > 0:
        return None, int(m.group(1))
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|min|m|sec|s)?", text)
    if parts and "".join(a + b for a, b in parts) == text:
        seconds = sum(float(a) * _UNITS[b or "s"] for a, b in parts)
        if seconds > 0:
            return seconds, None
    raise InputError("budget", expected="a wall time such as 30m, 1h30m, 90s or 1800 (seconds), "
                     "or a step count such as '2000steps'", got=repr(budget),
                     fix="e.g. semdask train ... --budget 30m")


class TrainConfig(BaseModel):
    """Every parameter of :func:`semdask.training.train.train`.

    ``None`` in a :data:`PLANNED` field means "let the planner decide". ``budget`` (a wall
    time or step count, :func:`parse_budget`) is stored as ``budget_s`` / ``budget_steps``.

    Notes
    -----
    - ``labels`` (``"truth"``, ``"phases"``); ``window`` (multiple of 16), ``epochs``,
      ``steps_per_epoch``, ``batch_size``, ``lr``;
    - ``schedule`` (cosine / poly decay to ``lr / 50`` after a linear ``warmup`` share of
      the steps; plateau halves after 2 epochs without a better validation mIoU;
      constant), ``optimizer`` (adam, adamw), ``weight_decay`` (0 / 0.01);
    - ``arch`` (unet, resunet), ``arch_kwargs``, ``widths`` and ``norm`` (U-Net: batch norms
      train in fewer steps and are folded into the convolutions of the saved model; none
      is the paper's net), ``dropout`` (U-Net, every block: default 0 with batch norms,
      the paper's 0.1-0.3 by level without; :func:`unet_kwargs`), ``encoder_weights``
      and ``freeze_encoder_epochs`` (transfer learning, e.g. from ``semdask pretrain``);
    - ``loss`` (ce; ce+dice = ``(1 - dice_weight) CE + dice_weight (1 - Dice)``, Dice
      pooled over the whole batch and averaged over all classes; focal),
      ``class_weights`` (planned: auto, inverse-sqrt frequencies of the training labels;
      none);
    - ``sampling`` (balanced: a share ``balance`` of windows centred on a pixel of a
      uniformly drawn class, from a low-resolution label map; uniform), ``augment``
      (none, flips, light, default, strong), ``weights`` (group of per-pixel loss weights);
    - ``split`` (bands, stores, blocks), ``val_stores``, ``val_fraction``, ``fold``,
      ``block``, ``guard``, ``val_window``: :func:`semdask.training.samplers.make_split`;
    - ``pixel_size_um`` / ``scale``: train at that pixel size / share of each store's
      sampling (resampled copies, :mod:`semdask.training.scale`);
    - ``ensemble`` (M members, seed + i, fold + i, ``<stem>-m<i>.safetensors``; a budget
      is shared between them), ``patience``, ``resume`` (``<out>.last.safetensors``),
      ``tensorboard``, ``device``, ``amp`` (bf16 on CUDA), ``num_workers``, ``seed``,
      ``infer_window``, ``low_percentile`` / ``high_percentile`` (normalisation);
    - ``plan``: False keeps the fixed defaults of earlier versions (no fingerprint).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True,
                              arbitrary_types_allowed=True)

    labels: str = "truth"
    window: int | None = Field(default=None, ge=16, multiple_of=16)
    epochs: int | None = Field(default=None, ge=1)
    steps_per_epoch: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    lr: float = Field(default=1e-3, ge=0)
    val_fraction: float = Field(default=0.2, gt=0, lt=1)
    num_workers: int | None = Field(default=None, ge=0)
    seed: int = 0
    device: str = "auto"
    resume: Path | None = None
    widths: tuple[int, ...] = (16, 32, 64, 128, 256)
    norm: Norm = Norm.BATCH
    dropout: float | None = Field(default=None, ge=0, lt=1)
    val_window: int | None = Field(default=None, ge=16, multiple_of=16)
    infer_window: int = Field(default=256, ge=16, multiple_of=16)
    low_percentile: float = Field(default=0.5, ge=0, le=100)
    high_percentile: float = Field(default=99.5, ge=0, le=100)
    schedule: Schedule = Schedule.COSINE
    warmup: float | None = Field(default=None, ge=0, lt=1)
    arch: Arch = Arch.UNET
    arch_kwargs: dict[str, Any] | None = None
    loss: Loss = Loss.CE_DICE
    dice_weight: float = Field(default=0.4, ge=0, le=1)
    class_weights: ClassWeights | None = None
    optimizer: Optimizer = Optimizer.ADAM
    weight_decay: float | None = Field(default=None, ge=0)
    sampling: Sampling = Sampling.BALANCED
    balance: float | None = Field(default=None, ge=0, le=1)
    split: Split = Split.BANDS
    val_stores: tuple[int, ...] | None = None
    fold: int = Field(default=0, ge=0)
    block: int | None = Field(default=None, ge=16)
    guard: int | None = Field(default=None, ge=0)
    weights: str | None = None
    augment: Augment | None = None
    amp: bool = True
    patience: int | None = Field(default=None, ge=1)
    tensorboard: Path | None = None
    freeze_encoder_epochs: int = Field(default=0, ge=0)
    encoder_weights: Path | None = None
    ensemble: int = Field(default=1, ge=1)
    pixel_size_um: float | None = Field(default=None, gt=0)
    scale: float | None = Field(default=None, gt=0, le=8)
    budget_s: float | None = Field(default=None, gt=0)
    budget_steps: int | None = Field(default=None, ge=1)
    plan: bool = True

    @model_validator(mode="before")
    @classmethod
    def _budget(cls, data: Any) -> Any:
        if isinstance(data, dict) and "budget" in data:
            data = dict(data)
            data["budget_s"], data["budget_steps"] = parse_budget(data.pop("budget"))
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.low_percentile >= self.high_percentile:
            raise ValueError("low_percentile must be below high_percentile")
        if self.pixel_size_um is not None and self.scale is not None:
            raise ValueError("give pixel_size_um or scale, not both")
        if self.budget_s is not None and self.budget_steps is not None:
            raise ValueError("give a wall-time or a step budget, not both")
        if self.ensemble > 1 and self.resume is not None:
            raise ValueError("ensemble: no resume with several members; resume one member: "
                             "--out STEM-m<i>.safetensors --resume STEM-m<i>.last.safetensors "
                             "--seed SEED+i --fold FOLD+i")
        return self

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> TrainConfig:
        """Validate keyword arguments; errors become :class:`~semdask.errors.InputError`."""
        unknown = sorted(set(kwargs) - set(cls.model_fields) - {"budget"})
        if unknown:
            raise InputError("training parameters", expected="names among "
                             + ", ".join(sorted(cls.model_fields)), got=", ".join(unknown))
        try:
            return cls(**kwargs)
        except ValidationError as e:
            raise config_error(e) from None

    def to_yaml(self, path: str | Path | None = None) -> str:
        """YAML of every field (written to ``path`` when given)."""
        text = yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Read a configuration written by :meth:`to_yaml` (validated)."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise InputError(str(path), expected="a YAML mapping of training parameters",
                             got=type(data).__name__)
        return cls.from_kwargs(**data)


def unet_kwargs(kw: dict[str, Any], *, norm: str | None,
                dropout: float | None = None) -> dict[str, Any]:
    """U-Net constructor arguments ``kw`` with ``norm`` and the dropout rates filled in.

    Values already in ``kw`` (e.g. ``arch_kwargs``) win. Dropout: ``dropout`` in every
    level when given; else none with batch norms (they regularise; with them the paper's
    dropout cost mIoU on NASA data within a 10-minute budget, docs/RESULTS.md) and the
    paper's rates (:data:`semdask.nets.unet.DEFAULT_DROPOUT`) without norms. Train and
    pretrain build their U-Nets through this, so encoders fit.

    >>> unet_kwargs({"widths": [8, 16, 32]}, norm="batch")
    {'widths': [8, 16, 32], 'norm': 'batch', 'dropout': [0.0, 0.0, 0.0]}
    >>> unet_kwargs({"widths": [8, 16, 32]}, norm="batch", dropout=0.1)["dropout"]
    [0.1, 0.1, 0.1]
    >>> unet_kwargs({"widths": [8] * 6}, norm="none")["dropout"]
    [0.1, 0.1, 0.2, 0.2, 0.3, 0.3]
    >>> unet_kwargs({"dropout": [0.5] * 5}, norm=None)  # given values win
    {'dropout': [0.5, 0.5, 0.5, 0.5, 0.5], 'norm': None}
    """
    from semdask.nets.unet import DEFAULT_DROPOUT, DEFAULT_WIDTHS  # torch: when needed

    out = dict(kw)
    out.setdefault("norm", norm)
    depth = len(out.get("widths", DEFAULT_WIDTHS))
    if dropout is not None:
        rates = (float(dropout),) * depth
    elif Norm(out["norm"] or "none") == Norm.NONE:
        rates = (DEFAULT_DROPOUT + (DEFAULT_DROPOUT[-1],) * depth)[:depth]
    else:
        rates = (0.0,) * depth
    out.setdefault("dropout", list(rates))
    return out


def config_error(err: ValidationError) -> InputError:
    """An actionable :class:`InputError` from a pydantic validation error."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "training parameters"
        flag = "--" + where.replace("_", "-") if e["loc"] else where
        parts.append(f"{where} ({flag}) = {e.get('input')!r}: {e['msg']}")
    return InputError("training parameters", expected="valid values", got="; ".join(parts),
                      fix="correct the values named above (semdask train --help lists them)")
