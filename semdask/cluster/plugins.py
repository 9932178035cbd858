"""Worker-side set-up: keep the model resident on every worker before blocks arrive.

:class:`ModelPlugin` is a :class:`distributed.WorkerPlugin` that loads a model file
into the per-process cache of :func:`semdask.nets.model.get_model` when a worker starts
(and on every worker that joins later), on the device the inference tasks will use,
and tunes the allocator for large activations (:func:`semdask.nets.runtime.tune_allocator`).
Inference tasks then find the model in the cache: the file is read and hashed once per
worker process, never pickled into tasks, and the first block does not pay the load.

Examples
--------
>>> p = ModelPlugin("model.safetensors", sha="0123456789abcdef", device="auto")
>>> p.name
'semdask-model-0123456789ab-auto'
"""

from __future__ import annotations

import logging
import os
from typing import Any

try:  # distributed is a core dependency; keep this module importable without it anyway
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError:  # pragma: no cover
    WorkerPlugin = object  # type: ignore[misc,assignment]

__all__ = ["ModelPlugin", "preload_model"]

log = logging.getLogger(__name__)


class ModelPlugin(WorkerPlugin):
    """Load ``path`` into every worker's model cache on ``device`` at start-up.

    Parameters
    ----------
    path : path
        A safetensors model file readable by the workers (same path on every node).
    sha : str
        The file's sha256 (names the plugin, so registering twice is a no-op).
    device : str
        ``"auto"`` (CUDA when the worker has it), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    """

    idempotent = True

    def __init__(self, path: str | os.PathLike[str], *, sha: str, device: str = "auto") -> None:
        self.path = str(path)
        self.device = device
        self.name = f"semdask-model-{sha[:12]}-{device}"

    def setup(self, worker: Any) -> None:
        from semdask.nets.model import get_model
        from semdask.nets.runtime import resolve_device, tune_allocator

        tune_allocator()
        dev = resolve_device(self.device)
        try:
            get_model(self.path, dev)
        except Exception as e:  # the tasks will raise the full error; keep the worker alive
            log.warning("worker %s could not preload %s: %s", getattr(worker, "address", "?"),
                        self.path, e)
            return
        log.debug("worker %s: model %s resident on %s", getattr(worker, "address", "?"),
                  self.path, dev)


def preload_model(client: Any, path: str | os.PathLike[str], *, sha: str,
                  device: str = "auto") -> bool:
    """Register :class:`ModelPlugin` on ``client``'s workers; False when not possible.

    Workers running inside this process (``processes=False``) share this process's
    cache already; remote workers get the model before the first block.
    """
    if client is None or not hasattr(client, "register_plugin"):
        return False
    try:
        client.register_plugin(ModelPlugin(path, sha=sha, device=device))
    except Exception as e:  # e.g. a scheduler without the workers' file system
        log.warning("could not preload the model on the workers: %s", e)
        return False
    return True
