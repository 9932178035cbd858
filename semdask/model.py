"""The U-Net of the paper (section 3.2) in plain PyTorch, and its safe file format.

A model is one ``.safetensors`` file: the weights, plus the :class:`ModelConfig`
as JSON in the safetensors header metadata (the authoritative copy). A ``.yaml``
sidecar repeats the config for humans. Loading never unpickles anything.

Examples
--------
>>> import torch
>>> net = UNet(widths=(4, 8, 16), dropout=(0.1, 0.1, 0.2)).eval()
>>> net(torch.zeros(1, 1, 32, 32)).shape
torch.Size([1, 4, 32, 32])
>>> receptive_field(UNet()), receptive_field(UNet(), at=0)
(204, 188)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from .errors import ModelError

__all__ = [
    "DEFAULT_DROPOUT",
    "DEFAULT_WIDTHS",
    "ModelConfig",
    "Normalisation",
    "UNet",
    "bundled_model_path",
    "get_model",
    "load_model",
    "model_hash",
    "receptive_field",
    "save_model",
]

log = logging.getLogger(__name__)

DEFAULT_WIDTHS = (16, 32, 64, 128, 256)
DEFAULT_DROPOUT = (0.1, 0.1, 0.2, 0.2, 0.3)
_META_KEY = "semdask"
_CONVERT = (
    "convert it once on a trusted machine:\n"
    "    state = torch.load('model.pt', map_location='cpu', weights_only=True)\n"
    "    net = semdask.model.UNet(**kwargs); net.load_state_dict(state)\n"
    "    semdask.model.save_model(net, semdask.model.ModelConfig(...), 'model.safetensors')"
)


class _Block(nn.Module):
    """Two 3x3 convolutions (padding 1) with ReLU; dropout between them (Keras U-Net)."""

    def __init__(self, cin: int, cout: int, p: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.drop = nn.Dropout(p)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        return torch.relu(self.conv2(self.drop(x)))


class UNet(nn.Module):
    """U-Net: encoder (conv blocks + 2x2 max-pool), decoder (2x2 transposed conv + skip).

    Parameters
    ----------
    in_channels : int
        Input channels (1 for a grey SEM image).
    n_classes : int
        Output channels (logits; softmax is applied by the caller).
    widths : sequence of int
        Channels per level, shallowest first; ``len(widths)`` is the depth. Inputs
        must be multiples of ``2 ** (depth - 1)`` pixels.
    dropout : sequence of float
        Dropout per level (mirrored in the decoder).
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 4,
                 widths: Sequence[int] = DEFAULT_WIDTHS,
                 dropout: Sequence[float] | None = None) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if dropout is None:
            dropout = (DEFAULT_DROPOUT + (0.3,) * len(widths))[: len(widths)]
        dropout = tuple(float(p) for p in dropout)
        if len(widths) < 1 or len(dropout) != len(widths) or min(widths) < 1:
            raise ModelError("UNet widths/dropout", expected="one positive width and one "
                             "dropout rate per level", got=f"widths={widths}, dropout={dropout}")
        self.in_channels, self.n_classes = int(in_channels), int(n_classes)
        self.widths, self.dropout = widths, dropout
        cins = (self.in_channels, *widths[:-1])
        self.enc = nn.ModuleList(_Block(ci, w, p) for ci, w, p in zip(cins, widths, dropout,
                                                                        strict=True))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
                                for i in range(len(widths) - 1))
        self.dec = nn.ModuleList(_Block(2 * widths[i], widths[i], dropout[i])
                                 for i in range(len(widths) - 1))
        self.head = nn.Conv2d(widths[0], self.n_classes, 1)

    @property
    def depth(self) -> int:
        """Number of levels (pooling steps + 1)."""
        return len(self.widths)

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return int(2 ** (self.depth - 1))

    def kwargs(self) -> dict[str, Any]:
        """Constructor arguments (for :class:`ModelConfig`)."""
        return {"in_channels": self.in_channels, "n_classes": self.n_classes,
                "widths": list(self.widths), "dropout": list(self.dropout)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(n, n_classes, h, w)`` for ``(n, in_channels, h, w)``."""
        m = self.multiple
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[2] % m or x.shape[3] % m:
            raise ModelError("UNet input", expected=f"(n, {self.in_channels}, h, w) with h and "
                             f"w multiples of {m}", got=f"shape {tuple(x.shape)}",
                             fix=f"pad the image to a multiple of {m} px (reflect)")
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        for i in reversed(range(self.depth - 1)):
            x = self.dec[i](torch.cat([skips[i], self.up[i](x)], dim=1))
        return self.head(x)


def _conv_back(conv: nn.Module, a: int, b: int) -> tuple[int, int]:
    k, p = int(conv.kernel_size[0]), int(conv.padding[0])  # type: ignore[index]
    return a - p, b + (k - 1 - p)


def _interval(model: UNet, p: int) -> tuple[int, int]:
    """Input columns ``[lo, hi]`` that can influence output column ``p`` (exact, 1-D)."""

    def block_back(block: _Block, a: int, b: int) -> tuple[int, int]:
        return _conv_back(block.conv1, *_conv_back(block.conv2, a, b))

    def enc(level: int, a: int, b: int) -> tuple[int, int]:
        a, b = block_back(model.enc[level], a, b)  # type: ignore[arg-type]
        return (a, b) if level == 0 else enc(level - 1, 2 * a, 2 * b + 1)

    def dec(level: int, a: int, b: int) -> tuple[int, int]:
        if level == model.depth - 1:
            return enc(level, a, b)
        a, b = block_back(model.dec[level], a, b)  # type: ignore[arg-type]
        up: Any = model.up[level]
        k, s, pad = int(up.kernel_size[0]), int(up.stride[0]), int(up.padding[0])
        ua, ub = -(-(a - (k - 1) + pad) // s), (b + pad) // s
        (ea, eb), (da, db) = enc(level, a, b), dec(level + 1, ua, ub)
        return min(ea, da), max(eb, db)

    return dec(0, p, p)


def receptive_field(model: UNet, *, at: int | None = None) -> int:
    """Receptive field edge in pixels: the widest input span that reaches one output pixel.

    Computed analytically by propagating an output pixel's interval back through
    every conv, pool and transposed conv (both skip and deep paths). The span
    depends on the pixel's position modulo ``2 ** (depth - 1)`` (pooling
    alignment): for the default net it is 188 px at positions 0, 1, 14, 15 (mod 16)
    and 204 px elsewhere. ``at=None`` gives the maximum over positions (use it for
    halos); ``at=p`` the span for output column ``p``.
    """
    if at is not None:
        lo, hi = _interval(model, int(at))
        return hi - lo + 1
    return max(receptive_field(model, at=p) for p in range(model.multiple))


class Normalisation(BaseModel):
    """Percentiles of the mosaic-wide intensity normalisation used in training."""

    model_config = ConfigDict(extra="forbid")
    low_percentile: float = 0.5
    high_percentile: float = 99.5


class ModelConfig(BaseModel):
    """Everything needed to use a model on new data (stored in the weights file)."""

    model_config = ConfigDict(extra="forbid")
    architecture: Literal["unet"] = "unet"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    classes: list[str] = Field(default_factory=lambda: ["pore", "Ni", "NiO", "YSZ"])
    colours: list[tuple[int, int, int, int]] = Field(default_factory=list)
    pixel_size_um: float | None = None
    normalisation: Normalisation = Field(default_factory=Normalisation)
    window: int = 256
    receptive_field: int = 0
    in_channels: int = 1
    n_classes: int = 4
    provenance: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        self.kwargs.setdefault("in_channels", self.in_channels)
        self.kwargs.setdefault("n_classes", self.n_classes)
        if (self.kwargs["in_channels"], self.kwargs["n_classes"]) != (
                self.in_channels, self.n_classes):
            raise ValueError("kwargs in_channels/n_classes disagree with the config fields")
        if len(self.classes) != self.n_classes:
            raise ValueError(f"{len(self.classes)} class names for {self.n_classes} classes")
        if self.colours and len(self.colours) != self.n_classes:
            raise ValueError(f"{len(self.colours)} colours for {self.n_classes} classes")
        return self

    @classmethod
    def for_model(cls, model: UNet, **fields: Any) -> ModelConfig:
        """A config for ``model`` (kwargs, channels and receptive field filled in)."""
        return cls(kwargs=model.kwargs(), in_channels=model.in_channels,
                   n_classes=model.n_classes, receptive_field=receptive_field(model), **fields)


def save_model(model: UNet, config: ModelConfig, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` to a ``.safetensors`` file (config in the header) + ``.yaml`` sidecar.

    Returns the path of the weights file. Both files are written atomically.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ModelError(str(path), expected="a .safetensors file name", got=path.suffix or
                         "no suffix", fix=f"use {path.with_suffix('.safetensors')}")
    if dict(config.kwargs) != model.kwargs():
        config = config.model_copy(update={"kwargs": model.kwargs()})
    if config.receptive_field != receptive_field(model):
        config = config.model_copy(update={"receptive_field": receptive_field(model)})
    ModelConfig.model_validate(config.model_dump())
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone()
               for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_META_KEY: config.model_dump_json(),
                                           "format": "pt"})
    os.replace(tmp, path)
    side, stmp = path.with_suffix(".yaml"), path.with_suffix(".yaml.tmp")
    doc = {"weights": path.name, "sha256": model_hash(path),
           **json.loads(config.model_dump_json())}
    stmp.write_text(f"# For humans: the authoritative config is inside {path.name}.\n"
                    + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None))
    os.replace(stmp, side)
    return path


def _sniff(path: Path) -> None:
    """Raise ModelError unless ``path`` looks like a safetensors file (reads bytes only)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
            size = path.stat().st_size
    except OSError as e:
        raise ModelError(str(path), expected="a readable .safetensors model file",
                         got=f"{type(e).__name__}: {e}") from None
    what = None
    if head[:4] == b"PK\x03\x04":
        what = "a zip archive (a torch.save checkpoint, which would need unpickling)"
    elif head[:1] == b"\x80":
        what = "a Python pickle (a legacy torch.save file)"
    elif len(head) < 9:
        what = f"a {size}-byte file"
    else:
        (n,) = struct.unpack("<Q", head[:8])
        if head[8:9] != b"{" or n > size - 8:
            what = f"an unknown format (first bytes {head[:8]!r})"
    if what is not None:
        raise ModelError(str(path), expected="a safetensors file (semdask never unpickles)",
                         got=what, fix=_CONVERT)


def load_model(path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
               ) -> tuple[UNet, ModelConfig]:
    """Load a model saved by :func:`save_model`, in eval mode on ``device``.

    Raises
    ------
    ModelError
        The file is not safetensors (e.g. a pickle), has no or an invalid
        semdask config, or its tensors do not match the configured architecture.
    """
    from safetensors import safe_open

    path = Path(path)
    _sniff(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types
        raise ModelError(str(path), expected="a valid safetensors file",
                         got=f"{type(e).__name__}: {e}", fix=_CONVERT) from None
    if _META_KEY not in meta:
        raise ModelError(str(path), expected="semdask config in the safetensors metadata",
                         got=f"metadata keys {sorted(meta)}",
                         fix="save it with semdask.model.save_model(model, config, path)")
    try:
        config = ModelConfig.model_validate_json(meta[_META_KEY])
        model = UNet(**config.kwargs)
    except (ValidationError, TypeError, ValueError) as e:
        raise ModelError(f"{path} config", expected="a valid semdask ModelConfig",
                         got=str(e).splitlines()[0]) from None
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != got:
        diff = sorted(set(want) ^ set(got)) + sorted(
            k for k in set(want) & set(got) if want[k] != got[k])
        detail = ", ".join(f"{k}: {got.get(k, 'missing')} (config {want.get(k, 'none')})"
                           for k in diff[:4])
        raise ModelError(f"{path} tensors", expected=f"the {len(want)} tensors of "
                         f"UNet(**{config.kwargs})", got=f"{len(diff)} mismatches: {detail}",
                         fix="save the weights with the config of the architecture they fit")
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    return model.to(device).eval(), config


def model_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 (hex) of the weights file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def bundled_model_path() -> Path:
    """Path of the bundled model trained on synthetic SOC mosaics."""
    return Path(__file__).resolve().parent / "models" / "soc-unet.safetensors"


_CACHE: dict[tuple[str, str], tuple[UNet, ModelConfig]] = {}
_HASHES: dict[tuple[str, int, int], str] = {}
_LOCK = threading.Lock()


def get_model(path: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu"
              ) -> tuple[UNet, ModelConfig]:
    """Per-process cached :func:`load_model`, keyed by (sha256 of the file, device).

    Dask workers call this from every task; the file is read and hashed once per
    process (re-hashed only when its size or mtime changes). ``None`` is the
    bundled model. Treat the returned model as read-only (eval mode, no grad).
    """
    p = Path(path) if path is not None else bundled_model_path()
    try:
        st = p.resolve().stat()
    except OSError as e:
        raise ModelError(str(p), expected="an existing model file",
                         got=f"{type(e).__name__}: {e}") from None
    with _LOCK:
        fkey = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        digest = _HASHES.get(fkey) or _HASHES.setdefault(fkey, model_hash(p))
        key = (digest, str(torch.device(device)))
        if key not in _CACHE:
            model, config = load_model(p, device=device)
            model.requires_grad_(False)
            _CACHE[key] = (model, config)
            log.debug("loaded model %s (%s) on %s", p, digest[:12], device)
        return _CACHE[key]
