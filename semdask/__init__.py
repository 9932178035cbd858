"""semdask: distributed phase segmentation of SEM mosaics on Dask.

The public functions mirror the CLI sub-commands (see ``semdask --help``).
Heavy modules are imported lazily so ``import semdask`` stays fast.
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import Any

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {
    # the data-flow arrows, one public function per CLI sub-command
    "convert": "semdask.ingest.convert",
    "label": "semdask.labelling.label",
    "train": "semdask.training.train",
    "pretrain": "semdask.training.pretrain",
    "segment": "semdask.inference.segment",
    "analyze": "semdask.analysis.quantify",
    "evaluate": "semdask.analysis.evaluate",
    "verify": "semdask.storage.ledger",
    "connect": "semdask.cluster.connect",
    # reading stores and models
    "open_mosaic": "semdask.storage.io",
    "open_labels": "semdask.storage.io",
    "open_dataarray": "semdask.storage.xarrays",
    "load_model": "semdask.nets.model",
    "phase_fractions": "semdask.analysis.metrics",
}

__all__ = ["__version__", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    """Import the public functions on first use, so ``import semdask`` stays fast."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'semdask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
