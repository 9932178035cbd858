"""Training checkpoints: file names next to the model, and optimizer state as safetensors.

``semdask train --out MODEL.safetensors`` keeps, beside the best model, the last epoch's
model (``MODEL.last.safetensors``), its optimizer state (``MODEL.last.optim.safetensors``,
tensors plus JSON metadata: never pickled) and the metrics CSV; ``--resume`` reads them.
Ensemble members are ``MODEL-m<i>.safetensors``.

>>> [p.name for p in checkpoint_paths("run/unet.safetensors")]
['unet.last.safetensors', 'unet.last.optim.safetensors', 'unet.metrics.csv']
>>> [p.name for p in member_paths("unet.safetensors", 2)]
['unet-m0.safetensors', 'unet-m1.safetensors']
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from semdask.errors import ModelError

__all__ = ["checkpoint_paths", "load_optimizer", "member_paths", "save_optimizer"]


def checkpoint_paths(out: str | os.PathLike[str]) -> tuple[Path, Path, Path]:
    """(last-epoch model, its optimizer state, metrics CSV) next to ``out``."""
    out = Path(out)
    stem = out.with_suffix("")
    return (stem.with_name(stem.name + ".last.safetensors"),
            stem.with_name(stem.name + ".last.optim.safetensors"),
            stem.with_name(stem.name + ".metrics.csv"))


def member_paths(out: str | os.PathLike[str], members: int) -> list[Path]:
    """Model paths of an ensemble: ``<stem>-m0.safetensors`` ... (``[out]`` for one)."""
    out = Path(out)
    if members <= 1:
        return [out]
    return [out.with_name(f"{out.stem}-m{i}{out.suffix}") for i in range(members)]


def save_optimizer(opt: torch.optim.Optimizer, path: Path, meta: dict[str, Any]) -> None:
    """Write the optimizer state and ``meta`` (JSON) atomically as safetensors."""
    from safetensors.torch import save_file

    sd = opt.state_dict()
    tensors = {f"state.{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach()
               .cpu().contiguous().clone()
               for i, st in sd["state"].items() for k, v in st.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"param_groups": json.dumps(sd["param_groups"]),
                                           "semdask_train": json.dumps(meta)})
    os.replace(tmp, path)


def load_optimizer(opt: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    """Load :func:`save_optimizer`'s state into ``opt`` and return its ``meta``."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        state: dict[int, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
        opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        return dict(json.loads(meta["semdask_train"]))
    except Exception as e:  # any failure: not our optimizer file
        raise ModelError(f"optimizer state {path}", expected="the .last.optim.safetensors "
                         "written by semdask train (same optimizer)",
                         got=f"{type(e).__name__}: {e}",
                         fix="resume from the .last.safetensors of the same run") from None
