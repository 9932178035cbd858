"""Transfer learning: load pretrained encoder (and decoder) tensors, freeze the encoder.

:func:`load_pretrained` is what ``semdask train --encoder-weights FILE`` calls, for
both architectures. It accepts

- a file written by :func:`semdask.training.pretrain.pretrain` (config under the
  header key ``semdask-pretrain``): its architecture and constructor arguments must
  equal the model's (otherwise a :class:`~semdask.errors.ModelError` names both);
  every tensor it holds (encoder, and decoder unless it was written encoder-only) is
  loaded, after checking the SHA-256 of the tensors the header records;
- a semdask model file (:func:`semdask.nets.model.save_model`) of the same
  architecture, or a :meth:`ResUNet.save_encoder <semdask.nets.resunet.ResUNet.save_encoder>`
  file: the encoder tensors are loaded (fine-tuning a trained model on new classes).

The segmentation head is never loaded (it stays randomly initialised), and the
encoder must be complete: a file that misses an encoder tensor or has one of another
shape is refused, never silently half-loaded.

Examples
--------
>>> from semdask.nets.unet import UNet
>>> transfer_prefixes(UNet(widths=(4, 8)))
(('enc.',), ('up.', 'dec.'))
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

from semdask.errors import ModelError
from semdask.nets.model import Net, tensors_hash
from semdask.nets.resunet import ResUNet
from semdask.nets.unet import UNet

__all__ = ["PRETRAIN_KEY", "load_pretrained", "set_encoder_frozen", "transfer_prefixes"]

log = logging.getLogger(__name__)

PRETRAIN_KEY = "semdask-pretrain"
"""Header key of a pretraining file's config (JSON)."""


def transfer_prefixes(model: Net) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """State-dict name prefixes of the encoder and of the decoder (the head is neither)."""
    if isinstance(model, ResUNet):
        return ("encoder.",), ("decoder.",)
    if isinstance(model, UNet):
        return ("enc.",), ("up.", "dec.")
    raise ModelError(f"model of type {type(model).__name__}", expected="a UNet or a ResUNet")


def _describe(arch: str, kwargs: dict[str, Any]) -> str:
    return f"{arch} " + ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items()))


def set_encoder_frozen(model: Net, frozen: bool) -> None:
    """Freeze (no gradients, batch-norm statistics kept) or unfreeze the encoder."""
    if isinstance(model, ResUNet):
        _ = model.freeze_encoder() if frozen else model.unfreeze_encoder()
        return
    enc, _ = transfer_prefixes(model)
    for name, p in model.named_parameters():
        if name.startswith(enc):
            p.requires_grad_(not frozen)
    for name, m in model.named_modules():  # momentum 0: running statistics stay as loaded
        if name.startswith(enc) and isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.0 if frozen else 0.1


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types; never unpickles
        raise ModelError(str(path), expected="a safetensors file written by semdask pretrain",
                         got=f"{type(e).__name__}: {e}",
                         fix="semdask pretrain STORES... --out encoder.safetensors") from None
    return tensors, meta


def load_pretrained(model: Net, path: str | os.PathLike[str]) -> list[str]:
    """Load the pretrained tensors of ``path`` into ``model``; return the names loaded.

    Raises
    ------
    ModelError
        Not a safetensors file, another architecture or other constructor
        arguments (both are named), altered tensors, or an incomplete encoder.
    """
    from semdask.nets.model import _arch_of

    tensors, meta = _read(path)
    arch = _arch_of(model)
    free = ("n_classes", "dropout")  # the head is not loaded; dropout has no weights
    mine = {k: v for k, v in model.kwargs().items() if k not in free}
    if PRETRAIN_KEY in meta:
        cfg = json.loads(meta[PRETRAIN_KEY])
        theirs = {k: v for k, v in cfg.get("kwargs", {}).items() if k not in free}
        their_arch = str(cfg.get("architecture", "?"))
        if their_arch != arch or theirs != mine:
            raise ModelError(f"{path} (pretrained weights)",
                             expected=f"weights for the model being trained: "
                             f"{_describe(arch, mine)}",
                             got=f"weights pretrained for {_describe(their_arch, theirs)}",
                             fix=f"train with --arch {their_arch} (and its "
                             f"settings), or pretrain again with --arch {arch}")
        recorded = meta.get("semdask-tensors-sha256")
        if recorded is not None and recorded != tensors_hash(tensors):
            raise ModelError(f"{path} tensors", expected=f"SHA-256 {recorded[:12]}... as "
                             "recorded in its header", got="different content (damaged or "
                             "altered)", fix="pretrain again, or copy the file again")
    elif "semdask" in meta:  # a trained model: same architecture, its encoder only
        cfg = json.loads(meta["semdask"])
        their_arch = cfg.get("architecture", cfg.get("arch", "unet"))
        if their_arch != arch:
            raise ModelError(f"{path} (model file)", expected=f"a {arch} model like the one "
                             "being trained", got=f"a {their_arch} model",
                             fix=f"train with --arch {their_arch}")
        enc, _ = transfer_prefixes(model)
        tensors = _with_norms({k: v for k, v in tensors.items() if k.startswith(enc)},
                              model.state_dict())
    elif isinstance(model, ResUNet):  # ResUNet.save_encoder files, bare encoder states
        n = model.load_encoder(path)
        return [f"encoder.{k}" for k in list(model.encoder.state_dict())[:n]]
    elif "semdask-encoder" in meta:
        raise ModelError(f"{path} (encoder file)", expected=f"weights for a {arch} model",
                         got=f"a {meta['semdask-encoder']} encoder", fix="train with --arch "
                         f"{meta['semdask-encoder'].lower()}, or pretrain a {arch}: semdask "
                         f"pretrain STORES... --arch {arch} --out encoder.safetensors")
    else:
        raise ModelError(str(path), expected="a file written by semdask pretrain (or a semdask "
                         "model)", got="a safetensors file without a semdask config",
                         fix="semdask pretrain STORES... --arch unet --out encoder.safetensors")
    return _load(model, tensors, path)


def _with_norms(tensors: dict[str, torch.Tensor], want: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
    """Tensors of a plain U-Net (a saved, folded model) for a U-Net with batch norms.

    A conv bias the model lacks becomes the shift of the norm after it, whose other
    tensors keep their initial values (scale 1, mean 0, variance 1): in eval mode the
    function is unchanged up to ``1 / sqrt(1 + eps)``. Other tensors pass unchanged.
    """
    out = {}
    for k, v in tensors.items():
        norm = k.replace(".conv", ".norm")
        if k.endswith(".bias") and k not in want and norm in want:
            out[norm] = v
        else:
            out[k] = v
    for k in {n.rsplit(".", 1)[0] for n in out if ".norm" in n}:
        for leaf in ("weight", "running_mean", "running_var", "num_batches_tracked"):
            out.setdefault(f"{k}.{leaf}", want[f"{k}.{leaf}"])
    return out


def _load(model: Net, tensors: dict[str, torch.Tensor], path: str | os.PathLike[str]
          ) -> list[str]:
    enc, dec = transfer_prefixes(model)
    want = model.state_dict()
    got = {k: v for k, v in tensors.items() if k.startswith(enc + dec)}
    need = {k for k in want if k.startswith(enc) and not k.endswith("num_batches_tracked")}
    missing = sorted(need - set(got))
    extra = sorted(set(got) - set(want))
    shapes = sorted(k for k in set(got) & set(want) if got[k].shape != want[k].shape)
    if missing or extra or shapes:
        detail = [f"missing {k}" for k in missing[:3]] + [f"unexpected {k}" for k in extra[:3]]
        detail += [f"{k}: {tuple(got[k].shape)} (model {tuple(want[k].shape)})"
                   for k in shapes[:3]]
        raise ModelError(f"{path} tensors", expected="every encoder tensor of the model, with "
                         "its shape", got="; ".join(detail),
                         fix="pretrain with the architecture settings used for training")
    model.load_state_dict(got, strict=False)
    parts = "encoder and decoder" if any(k.startswith(dec) for k in got) else "encoder"
    log.info("loaded %d pretrained tensors (%s) from %s; the head stays random", len(got),
             parts, path)
    return sorted(got)
