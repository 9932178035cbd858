"""Self-supervised pretraining on unlabelled mosaics (inpainting + denoising reconstruction).

Users have far more unlabelled SEM area than labels. :func:`pretrain` trains the
segmentation network itself (``unet`` or ``resunet``, with a 1-channel head) to
restore clean windows from corrupted ones, Models-Genesis style for CNNs:

- random cells of a grid (``mask_cell`` px, a share ``mask_ratio``) are replaced by the
  window's mean (inpainting: the network must infer texture and phase boundaries
  from the context),
- the paper's Gaussian-Poisson noise is added everywhere (denoising: variance
  ``sigma**2 + shot * clean``, ``sigma`` and ``shot`` drawn per window),
- the loss is the mean squared error to the clean window over every pixel.

Windows are read lazily from the stores exactly as in training
(:class:`~semdask.training.samplers.WindowSampler` yields coordinates only,
uniformly over the whole mosaics; :class:`~semdask.training.dataset.PatchDataset` in
its unlabelled mode reads only those windows), normalised with each mosaic's
global statistics, and rotated/flipped per batch. No labels group is needed.

The output is a safetensors file (never a pickle) with the whole reconstruction
network (``encoder_only=True``: the encoder only) and a config in the header (key
``semdask-pretrain``: architecture and kwargs, window, normalisation, objective,
steps, the stores' identities, final loss). ``semdask train
--encoder-weights FILE`` loads its encoder and decoder with :func:`load_pretrained`,
which refuses a file of another architecture naming both; the 1-channel
reconstruction head is never loaded (the segmentation head stays random).

Examples
--------
>>> import torch
>>> clean = torch.rand(2, 1, 32, 32)
>>> noisy, mask = corrupt(clean, torch.Generator().manual_seed(0), mask_ratio=0.5, cell=8)
>>> noisy.shape, mask.dtype, 0.0 < float(mask.float().mean()) < 1.0
(torch.Size([2, 1, 32, 32]), torch.bool, True)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from semdask.errors import InputError
from semdask.nets.model import ModelConfig, Net, build_model, tensors_hash
from semdask.nets.runtime import resolve_device
from semdask.progress import Progress
from semdask.training.config import parse_budget, unet_kwargs
from semdask.training.dataset import PatchDataset
from semdask.training.engine import cpu_allocator, make_optimizer
from semdask.training.planning import lr_at
from semdask.training.samplers import SplitPlan, WindowSampler
from semdask.training.transfer import (
    PRETRAIN_KEY,
    load_pretrained,
    set_encoder_frozen,
    transfer_prefixes,
)

__all__ = ["OBJECTIVE", "PRETRAIN_KEY", "PretrainResult", "corrupt", "load_pretrained",
           "pretrain", "set_encoder_frozen"]

log = logging.getLogger(__name__)

OBJECTIVE = "inpaint+denoise"
"""The self-supervised objective of :func:`pretrain`."""
_FORMAT = 1


@dataclass
class PretrainResult:
    """Outcome of :func:`pretrain`."""

    path: Path
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)


def corrupt(clean: torch.Tensor, gen: torch.Generator, *, mask_ratio: float = 0.4,
            cell: int = 16, sigma_max: float = 0.08, shot_max: float = 0.01
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked and noisy copy of a batch ``(n, 1, h, w)`` and the boolean mask of filled pixels.

    Cells of a ``cell``-px grid are masked with probability ``mask_ratio`` and filled
    with the window's mean; then Gaussian-Poisson noise (``sigma ~ U(0, sigma_max)``,
    ``shot ~ U(0, shot_max)`` per window) is added to every pixel. Random numbers
    come from ``gen`` (a CPU generator: the same corruption on any device).
    """
    n, _, h, w = clean.shape
    cells = torch.rand(n, 1, -(-h // cell), -(-w // cell), generator=gen) < mask_ratio
    mask = cells.repeat_interleave(cell, 2).repeat_interleave(cell, 3)[..., :h, :w]
    mask = mask.to(clean.device)
    x = torch.where(mask, clean.mean(dim=(2, 3), keepdim=True), clean)
    sigma = torch.rand(n, 1, 1, 1, generator=gen).to(clean.device) * sigma_max
    shot = torch.rand(n, 1, 1, 1, generator=gen).to(clean.device) * shot_max
    var = sigma**2 + shot * clean.clamp(min=0.0)
    noise = torch.randn(clean.shape, generator=gen).to(clean.device)
    return x + var.sqrt() * noise, mask


def _geometry(batch: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One random rot90 + flip for the whole batch (SEM has no preferred orientation)."""
    k, flip = (int(v) for v in torch.randint(0, 4, (2,), generator=gen))
    batch = torch.rot90(batch, k, dims=(2, 3))
    return batch.flip(3) if flip % 2 else batch


def _store_identity(path: Path) -> dict[str, Any]:
    from semdask.storage.io import open_mosaic
    from semdask.storage.ledger import input_identity

    m = open_mosaic(path)
    return {"name": path.name, **input_identity(m), "pixel_size_um": m.pixel_size_um}


def pretrain(stores: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
             arch: str = "unet", arch_kwargs: dict[str, Any] | None = None,
             norm: str | None = "batch",
             budget: str | float | None = "500steps", window: int = 192,
             batch_size: int = 8, lr: float = 1e-3, warmup: float = 0.03, seed: int = 0,
             mask_ratio: float = 0.4, mask_cell: int = 16, sigma_max: float = 0.08,
             shot_max: float = 0.01, encoder_only: bool = False, device: str = "auto",
             num_workers: int = 0, low_percentile: float = 0.5, high_percentile: float = 99.5,
             tile: int = 1024, overwrite: bool = False,
             on_step: Callable[[int, float], None] | None = None) -> PretrainResult:
    """Pretrain a segmentation network on unlabelled ``stores``; write its weights to ``out``.

    Parameters
    ----------
    stores : sequence of path
        OME-Zarr mosaics (a labels group is neither needed nor read). Never pass the
        images you will evaluate on.
    out : path
        Output ``.safetensors`` file (+ a ``.yaml`` sidecar for humans).
    arch : {"unet", "resunet"}
        Architecture; it must match the later ``semdask train --arch``.
    arch_kwargs : dict, optional
        Constructor arguments (default: the architecture's defaults, as ``train``).
    norm : {"batch", "none"}
        U-Net normalisation when ``arch_kwargs`` does not set it (as ``train --norm``).
    budget : str or float
        ``"500steps"``, or a wall time (``"5m"``, seconds): a few steps are timed
        and the step count is fitted to it (the learning-rate schedule needs it).
    window, batch_size, lr, warmup, seed : optional
        Window edge (a multiple of the network's input multiple), windows per step,
        peak learning rate of the cosine schedule, its warm-up share, seed.
    mask_ratio, mask_cell, sigma_max, shot_max : optional
        The corruption (:func:`corrupt`).
    encoder_only : bool
        Write the encoder's tensors only (default: the whole network; ``train`` loads
        its encoder and decoder).
    device, num_workers, low_percentile, high_percentile : optional
        As in :func:`semdask.training.train.train`.
    tile : int
        Edge of the cached read tiles (:class:`~semdask.training.dataset.PatchDataset`).
    overwrite : bool
        Replace an existing ``out`` (default: refuse).
    on_step : callable, optional
        Called with ``(step, loss)`` after every step.

    Returns
    -------
    PretrainResult
    """
    t0 = time.perf_counter()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise InputError(str(out), expected="a .safetensors output path",
                         fix=f"use --out {out.with_suffix('.safetensors')}")
    if out.exists() and not overwrite:
        raise InputError(str(out), expected="a new output file", got="an existing file",
                         fix="choose another --out, or pass --overwrite to replace it")
    if not 0.0 <= mask_ratio < 1.0 or mask_cell < 1 or sigma_max < 0 or shot_max < 0:
        raise InputError("corruption", expected="0 <= mask_ratio < 1, mask_cell >= 1, "
                         "non-negative noise", got=f"mask_ratio={mask_ratio}, mask_cell="
                         f"{mask_cell}, sigma_max={sigma_max}, shot_max={shot_max}")
    if batch_size < 1:
        raise InputError("batch_size", expected="at least 1", got=str(batch_size))
    budget_s, steps = parse_budget(budget)
    paths = [Path(s) for s in stores]
    if not paths:
        raise InputError("stores", expected="at least one OME-Zarr mosaic", got="none")
    if arch not in ("unet", "resunet"):
        raise InputError("arch", expected="unet or resunet", got=repr(arch))
    dev = resolve_device(device)
    torch.manual_seed(seed)  # the initial weights too
    kw = dict(arch_kwargs or {})
    kw.pop("n_classes", None)
    if arch == "unet":  # as train: batch norms (and then no dropout) unless asked otherwise
        kw = unet_kwargs(kw, norm=norm)
    model = build_model(ModelConfig.model_validate(
        {"architecture": arch, "classes": ["intensity"], "n_classes": 1,
         "kwargs": {**kw, "n_classes": 1}}))
    if window < model.multiple or window % model.multiple:
        raise InputError("window", expected=f"a multiple of {model.multiple} px", got=str(window),
                         fix=f"--window {max(1, round(window / model.multiple)) * model.multiple}")
    ds = PatchDataset(paths, labels=None, window=window, low_percentile=low_percentile,
                      high_percentile=high_percentile, tile=tile)
    plan = SplitPlan(tuple(ds.shapes), tuple(() for _ in ds.shapes), 0, "none")
    total = steps if steps is not None else 10**9
    sampler = WindowSampler(ds.shapes, window, split="train", plan=plan, mode="random",
                            length=total * batch_size if steps is not None else batch_size * 64,
                            seed=seed)
    loader = DataLoader(ds, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                        persistent_workers=num_workers > 0, drop_last=False)
    if model.head.bias is not None:  # start at mid-grey: the loss is structure, not offset
        torch.nn.init.constant_(model.head.bias, 0.5)
    model.to(dev).train()
    opt = make_optimizer("adam", model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    deadline = None if budget_s is None else t0 + budget_s
    with cpu_allocator(dev):
        step, epoch, t_loop = 0, 0, time.perf_counter()
        bar: Progress | None = None
        while step < total:
            sampler.set_epoch(epoch)
            epoch += 1
            for (clean,) in loader:
                clean = _geometry(clean, gen).to(dev).contiguous()
                noisy, _ = corrupt(clean, gen, mask_ratio=mask_ratio, cell=mask_cell,
                                   sigma_max=sigma_max, shot_max=shot_max)
                for g in opt.param_groups:
                    g["lr"] = lr_at("cosine", lr, step / max(total, 1), warmup=warmup)
                loss = F.mse_loss(model(noisy), clean)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                step += 1
                if on_step is not None:
                    on_step(step, losses[-1])
                if deadline is not None and step == 3:  # fit the step count to the budget
                    per = (time.perf_counter() - t_loop) / 3  # the first steps: a bit slower
                    total = step + max(0, int((deadline - time.perf_counter()) / max(per, 1e-6)))
                    log.info("pretrain budget: %.2f s per step -> %d steps", per, total)
                if bar is None and (deadline is None or step >= 3):
                    bar = Progress(total, f"pretrain {out.name}", unit="step", step=10)
                if bar is not None:
                    bar.update()
                if step >= total or (deadline is not None and time.perf_counter() > deadline
                                     and step > 3):
                    total = step
                    break
        if bar is not None:
            bar.close()
    log.info("pretrain: %d steps, loss %.5f -> %.5f (mean of the first/last 10)", step,
             float(np.mean(losses[:10])), float(np.mean(losses[-10:])))
    config = {
        "format": _FORMAT, "objective": {"name": OBJECTIVE, "loss": "mse",
                                         "mask_ratio": mask_ratio, "mask_cell": mask_cell,
                                         "sigma_max": sigma_max, "shot_max": shot_max},
        "architecture": arch, "kwargs": {k: v for k, v in model.kwargs().items()
                                         if k != "n_classes"},
        "parts": ["encoder"] if encoder_only else ["encoder", "decoder", "head"],
        "window": window, "batch_size": batch_size, "steps": step, "lr": lr, "seed": seed,
        "normalisation": {"low_percentile": low_percentile, "high_percentile": high_percentile},
        "stores": [_store_identity(p) for p in paths],
        "final_loss": float(np.mean(losses[-10:])), "seconds": round(time.perf_counter() - t0, 1),
        "torch": str(torch.__version__),
    }
    _save(model, config, out, encoder_only=encoder_only)
    return PretrainResult(out, step, time.perf_counter() - t0, losses, config)


def _save(model: Net, config: dict[str, Any], out: Path, *, encoder_only: bool) -> None:
    """Write the transferable tensors + config atomically (safetensors, + ``.yaml`` sidecar)."""
    import yaml
    from safetensors.torch import save_file

    enc, dec = transfer_prefixes(model)
    keep = enc if encoder_only else (*enc, *dec, "head.")  # the head: inspection only
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone()
               for k, v in model.state_dict().items() if k.startswith(keep)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={PRETRAIN_KEY: json.dumps(config),
                                           "semdask-tensors-sha256": tensors_hash(tensors),
                                           "format": "pt"})
    os.replace(tmp, out)
    side = out.with_suffix(".yaml")
    side.write_text(f"# For humans: the authoritative config is inside {out.name}.\n"
                    + yaml.safe_dump({"weights": out.name, **config}, sort_keys=False))
    log.info("pretrain: wrote %d tensors to %s", len(tensors), out)
