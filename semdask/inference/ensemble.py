"""Ensembles, test-time augmentation (TTA) and uncertainty maps at inference.

Three parts, one per layer:

* Members (entry-point helpers): :func:`resolve_members` turns ``--model`` paths,
  globs and an ``--ensemble PREFIX`` (``PREFIX-m0.safetensors``, ``-m1``, ... as
  written by ``semdask train --ensemble``) into model files; :func:`load_members`
  checks that they agree on classes, normalisation, window and pixel size;
  :func:`ensemble_key` is the model part of the ledger run key (every member hash
  and the TTA flag).
* Kernel: :func:`predict_members` runs every member on the same block (chunk +
  halo), each on every view of the D4 group when ``tta`` is on (8 flips/rotations,
  batched into one forward per window, inverse-transformed before blending). Each
  (member, view) pair ``k = 1..K`` gives one blended probability map ``P_k``; the
  result is their mean (labels are its argmax), and optionally the spread.
* Graph builders: :func:`entropy_from_probs`.

Uncertainty, exactly: ``uncertainty = sqrt(mean_k (P_k[c*] - mean_k P_k[c*])**2)``, the
population standard deviation (ddof 0) across the K member/view maps of the
probability of the predicted class ``c* = argmax_c mean_k P_k[c]`` (K = members x
views; with one model and TTA, across the 8 views). It lies in [0, 0.5] and is 0
where all agree. ``entropy = -sum_c p_c log p_c / log C`` of the mean probabilities,
in [0, 1]. Mean and spread are accumulated with Welford's update in a fixed order
(member, then view), so identical members give exactly zero spread and the mean
of identical maps is bitwise the single map.

Chunk invariance holds as for one model: every window is square and its 8 views
go through one forward whatever the chunking (bitwise on CPU with batch size 1);
in whole-chunk mode block sides and origins sit on the 16-px grid, so flipped or
rotated blocks keep the network's pooling grid aligned to the mosaic.

Examples
--------
>>> import numpy as np
>>> x = np.arange(6.0).reshape(2, 3)
>>> all((d4_inverse(d4(x, g), g) == x).all() for g in range(VIEWS))
True
>>> [d4(x, g).shape for g in (0, 1)]
[(2, 3), (3, 2)]
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from semdask.errors import InputError, ModelError

__all__ = [
    "UNCERTAINTY",
    "VIEWS",
    "Members",
    "d4",
    "d4_inverse",
    "ensemble_key",
    "entropy_from_probs",
    "load_members",
    "members_for",
    "predict_members",
    "resolve_members",
]

log = logging.getLogger(__name__)

VIEWS = 8  #: order of the dihedral group D4 (4 rotations x optional flip)
_GLOB = re.compile(r"[*?\[]")
_MEMBER = re.compile(r"-m(\d+)\.safetensors$")
_SHARED = ("classes", "n_classes", "in_channels", "normalisation", "window", "pixel_size_um")
UNCERTAINTY = ("population std (ddof 0) across members x TTA views of the blended probability "
               "of the predicted class (argmax of the mean)")


# ------------------------------------------------------------------ members
def resolve_members(models: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None
                    = None, *, prefix: str | os.PathLike[str] | None = None) -> list[Path]:
    """Model files of an ensemble, in order (default: the bundled model alone).

    Parameters
    ----------
    models : path or sequence of paths, optional
        Model files; an entry with ``*``, ``?`` or ``[`` is a glob (sorted naturally,
        so ``m10`` follows ``m9``).
    prefix : path, optional
        Adds ``PREFIX-m<i>.safetensors`` for every ``i`` (``semdask train --ensemble``
        naming; ``PREFIX`` may end in ``.safetensors``: the train ``--out``).

    Raises
    ------
    InputError
        A glob or prefix that matches nothing; a missing file.
    """
    from semdask.nets.model import bundled_model_path
    from semdask.paths import validate_input_path

    entries = [models] if isinstance(models, (str, os.PathLike)) else list(models or [])
    paths: list[Path] = []
    for e in entries:
        s = os.fspath(e)
        if _GLOB.search(s):
            hits = sorted(glob.glob(s), key=_natural)
            if not hits:
                raise InputError(f"--model {s}", expected="a glob matching model files",
                                 got="no match", fix="check the pattern (quote it in the shell)")
            paths += [Path(h) for h in hits]
        else:
            paths.append(Path(s))
    if prefix is not None:
        p = Path(prefix)
        stem = p.with_suffix("") if p.suffix == ".safetensors" else p
        found = sorted((h for h in stem.parent.glob(f"{glob.escape(stem.name)}-m*.safetensors")
                        if _MEMBER.search(h.name)), key=_member_index)
        if not found:
            raise InputError(f"--ensemble {prefix}",
                             expected=f"members {stem}-m0.safetensors, {stem}-m1.safetensors, ...",
                             got="no such file",
                             fix="train them with semdask train --ensemble N --out "
                             f"{stem}.safetensors, or pass --model for each member")
        paths += found
    if not paths:
        paths = [bundled_model_path()]
    return [validate_input_path(p, kind="file") for p in paths]


def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _member_index(p: Path) -> int:
    m = _MEMBER.search(p.name)
    return int(m.group(1)) if m else -1


def load_members(paths: Sequence[Path]) -> tuple[Any, list[str]]:
    """Config for the run and SHA-256 of every member; members must agree.

    Returns the first member's :class:`~semdask.nets.model.ModelConfig` with the largest
    receptive field of all members (the whole-chunk halo must cover every one).

    Raises
    ------
    ModelError
        Members differ in classes, class count, input channels, normalisation,
        window or training pixel size.
    """
    from semdask.nets.model import load_model, model_hash

    configs = [load_model(p, device="cpu")[1] for p in paths]
    ref = configs[0]
    for p, c in zip(paths[1:], configs[1:], strict=True):
        for f in _SHARED:
            a, b = getattr(ref, f), getattr(c, f)
            if a != b:
                raise ModelError(f"ensemble member {p}",
                                 expected=f"the same {f} as {paths[0]} ({_show(a)})",
                                 got=_show(b),
                                 fix="ensemble only models trained for the same classes, "
                                 "normalisation and window (e.g. semdask train --ensemble N), "
                                 "or segment with each model separately")
    rf = max(int(c.receptive_field) for c in configs)
    return ref.model_copy(update={"receptive_field": rf}), [model_hash(p) for p in paths]


def _show(v: Any) -> str:
    return json.dumps(v.model_dump() if hasattr(v, "model_dump") else v, default=str)


def ensemble_key(shas: Sequence[str], *, tta: bool) -> str:
    """The model part of the run key: SHA-256 over every member hash (in order) and TTA.

    >>> ensemble_key(["a"], tta=True) != ensemble_key(["a"], tta=False)
    True
    """
    doc = json.dumps({"members": list(shas), "tta": bool(tta)}, sort_keys=True)
    return hashlib.sha256(doc.encode()).hexdigest()


@dataclass(frozen=True)
class Members:
    """The models of one segmentation run (one, or an ensemble) and the TTA flag."""

    paths: tuple[Path, ...]
    shas: tuple[str, ...]
    config: Any  #: the shared ModelConfig (largest receptive field of all members)
    tta: bool = False

    @property
    def multi(self) -> bool:
        """More than one prediction per pixel (members x views > 1): a spread exists."""
        return len(self.paths) > 1 or self.tta

    @property
    def key(self) -> str:
        """The model part of the run key (the weights hash of a single model, as before)."""
        return ensemble_key(self.shas, tta=self.tta) if self.multi else self.shas[0]

    @property
    def task_model(self) -> str | list[str]:
        """What travels to the workers: paths only, never pickled modules."""
        return [str(p) for p in self.paths] if len(self.paths) > 1 else str(self.paths[0])

    def provenance(self, spread: bool) -> dict[str, Any]:
        return {"members": [{"path": str(p), "sha256": s}
                            for p, s in zip(self.paths, self.shas, strict=True)],
                "tta": self.tta, "views": VIEWS if self.tta else 1,
                "uncertainty": UNCERTAINTY if spread else None,
                "entropy": "-sum_c p_c log p_c / log C of the mean probabilities"}


def members_for(models: Any = None, *, prefix: str | os.PathLike[str] | None = None,
                tta: bool = False) -> Members:
    """:func:`resolve_members` + :func:`load_members` in one :class:`Members`."""
    paths = resolve_members(models, prefix=prefix)
    config, shas = load_members(paths)
    if len(paths) > 1:
        log.info("ensemble of %d members%s: %s", len(paths), " with TTA" if tta else "",
                 ", ".join(p.name for p in paths))
    return Members(tuple(paths), tuple(shas), config, bool(tta))


# ------------------------------------------------------------------ kernel
def d4(x: np.ndarray, g: int) -> np.ndarray:
    """View ``g`` (0..7) of the last two axes: ``g % 4`` quarter turns, after an x-flip
    when ``g >= 4`` (a view of ``x``, not a copy)."""
    y = x[..., ::-1] if g >= 4 else x
    return np.rot90(y, g % 4, axes=(-2, -1))


def d4_inverse(y: np.ndarray, g: int) -> np.ndarray:
    """Undo :func:`d4` view ``g``: ``d4_inverse(d4(x, g), g) == x``."""
    x = np.rot90(y, -(g % 4), axes=(-2, -1))
    return x[..., ::-1] if g >= 4 else x


class _Spread:
    """Welford's running mean and sum of squared deviations over maps ``(C, h, w)``."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None

    def add(self, p: np.ndarray) -> None:
        self.n += 1
        if self.mean is None or self.m2 is None:
            self.mean = np.array(p, np.float32)
            self.m2 = np.zeros_like(self.mean)
            return
        d = p - self.mean
        self.mean += d / np.float32(self.n)
        self.m2 += d * (p - self.mean)

    def result(self, spread: bool) -> np.ndarray:
        assert self.mean is not None and self.m2 is not None
        if not spread:
            return self.mean
        top = self.mean.argmax(axis=0)[None]
        std = np.sqrt(np.take_along_axis(self.m2, top, axis=0) / np.float32(self.n))
        return np.concatenate([self.mean, std.astype(np.float32)])


def _view_forward(model: Any, dev: Any, precision: str, channels_last: bool, activation: str,
                  views: int) -> Any:
    """``(b, h, w)`` -> ``(b, V, C, h, w)``: every view of each item in one forward pass."""
    from semdask.inference.predict import _forward

    def forward(x: np.ndarray) -> np.ndarray:
        if views == 1:
            return _forward(model, x, dev, precision, channels_last, activation)[:, None]
        b, h, w = x.shape
        stack = np.stack([d4(x, g) for g in range(views)], axis=1).reshape(b * views, h, w)
        p = _forward(model, stack, dev, precision, channels_last, activation)
        p = p.reshape(b, views, *p.shape[1:])
        return np.stack([d4_inverse(p[:, g], g) for g in range(views)], axis=1)

    return forward


def _whole_views(block: np.ndarray, model: Any, *, core: tuple[int, int, int, int],
                 views: int, batch: int, dev: Any, precision: str, channels_last: bool,
                 activation: str) -> list[np.ndarray]:
    """Core probabilities ``(C, h, w)`` of every view of the whole block (batched by shape)."""
    from semdask.inference.predict import _forward

    y0, y1, x0, x1 = core
    out: list[np.ndarray | None] = [None] * views
    for shape in sorted({d4(block, g).shape for g in range(views)}):
        todo = [g for g in range(views) if d4(block, g).shape == shape]
        for i in range(0, len(todo), batch):
            gs = todo[i : i + batch]
            p = _forward(model, np.stack([d4(block, g) for g in gs]), dev, precision,
                         channels_last, activation)
            for g, q in zip(gs, p, strict=True):
                out[g] = np.ascontiguousarray(d4_inverse(q, g)[:, y0:y1, x0:x1])
    return [o for o in out if o is not None]


def predict_members(
    block: np.ndarray,
    models: Sequence[Any],
    *,
    mode: str,
    core: tuple[int, int, int, int],
    origin: tuple[int, int] = (0, 0),
    window: int = 256,
    stride: int = 192,
    weights: np.ndarray | None = None,
    tta: bool = False,
    spread: bool = False,
    batch_size: int = 1,
    device: Any = "cpu",
    precision: str = "fp32",
    channels_last: bool = False,
    activation: str = "softmax",
) -> np.ndarray:
    """Mean probabilities of every member (and TTA view) on one block, + the spread.

    Parameters
    ----------
    block : ndarray, (h, w) float32
        Normalised chunk + halo.
    models : sequence of torch.nn.Module
        The members (loaded once per worker process by the caller).
    mode : {"window", "whole-chunk"}
        ``"window"``: ``origin``/``core`` in global coordinates, as in
        :func:`semdask.inference.predict.predict_windows`; ``"whole-chunk"``: ``core`` in
        block coordinates, as in :func:`semdask.inference.predict.predict_whole`.
    tta : bool
        Average over the 8 D4 views too. Window mode: each forward holds
        ``batch_size`` windows x 8 views; whole-chunk mode: up to ``batch_size`` views
        of the block per forward (square blocks: all 8 share one shape).
    spread : bool
        Append the uncertainty channel (see the module docstring).

    Returns
    -------
    ndarray, (C + spread, core_h, core_w) float32
        Extra memory: ``8 * C * core_h * core_w * 4`` bytes with TTA in window mode
        (one blended map per view).
    """
    import torch

    from semdask.inference.predict import _eval, blend_windows

    dev = torch.device(device) if isinstance(device, str) else device
    views = VIEWS if tta else 1
    acc = _Spread()
    maps: np.ndarray | list[np.ndarray]
    for model in models:
        with _eval(model):
            if mode == "window":
                if weights is None:
                    raise InputError("weights", expected="blend weights in window mode",
                                     got="None")
                maps = blend_windows(
                    block, _view_forward(model, dev, precision, channels_last, activation,
                                         views),
                    origin=origin, core=core, window=window, stride=stride, weights=weights,
                    batch_size=batch_size)
            else:
                mult = max(16, int(getattr(model, "multiple", 16)))
                if block.shape[0] % mult or block.shape[1] % mult:
                    raise InputError("block", expected=f"sides that are multiples of {mult}",
                                     got=str(block.shape),
                                     fix=f"align chunk edges and the halo to the {mult}-px grid")
                maps = _whole_views(block, model, core=core, views=views,
                                    batch=max(1, batch_size), dev=dev, precision=precision,
                                    channels_last=channels_last, activation=activation)
        for v in maps:
            acc.add(v)
    return acc.result(spread)


# ------------------------------------------------------------------ graph builders
def entropy_from_probs(probs: Any) -> Any:
    """Entropy of the (mean) probabilities ``(C, y, x)``, normalised by ``log C`` to [0, 1].

    ``0 * log 0`` counts as 0; float16 ``(y, x)``, one task per chunk.
    """
    import dask.array as da

    n = int(probs.shape[0])

    def kernel(p: np.ndarray) -> np.ndarray:
        if n < 2:
            return np.zeros(p.shape[1:], np.float16)
        p = p.astype(np.float32, copy=False)
        t = np.where(p > 0, p * np.log(np.maximum(p, np.float32(1e-30))), np.float32(0))
        h = -t.sum(axis=0) / np.float32(np.log(n))
        return np.clip(h, 0.0, 1.0).astype(np.float16)

    return da.map_blocks(kernel, probs, drop_axis=0, dtype=np.float16,
                         meta=np.empty((0, 0), np.float16))
