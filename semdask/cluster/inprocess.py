"""The in-process fast path: small mosaics on this machine run on threads, not a LocalCluster.

Starting a :class:`distributed.LocalCluster` (worker processes, nannies, each importing
torch and loading the model) costs about 6 s on 2 cores, more than segmenting a 4096²
mosaic's worth of blocks takes once the model is loaded. When nobody asked for a
cluster (no ``--profile``, ``--scheduler-address``, ``--scheduler-file``, ``--workers``
or ``--dashboard-address``), no GPU is visible and the mosaic has at most
``semdask.cluster.in-process-max-mpix`` megapixels (default 256, 16384²), ``semdask
segment`` runs the same block tasks (same ledger, same drain, same outputs) on the
threaded scheduler in this process: one block per core at a time, each with one torch
thread (:func:`threaded`), which also measured faster per block than one block with
all cores' torch threads (no OpenMP barriers in the small layers). The sub-tiles of the
blocks in flight share one pool of as many threads
(:func:`semdask.inference.tiled.subtile_pool`), so a block alone still uses every core.
``--profile local`` keeps the LocalCluster and its dashboard.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import dask

from semdask import config

__all__ = ["DEFAULT_MAX_MPIX", "in_process", "threaded"]

log = logging.getLogger(__name__)

DEFAULT_MAX_MPIX = 256.0  #: largest mosaic (megapixels) that skips the LocalCluster


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def in_process(pixels: int, *, profile: str | None = None, scheduler_address: str | None = None,
               scheduler_file: str | None = None, n_workers: int | None = None,
               dashboard_address: str | None = None, gpu: bool = False) -> bool:
    """Whether a segmentation of ``pixels`` should skip the cluster and run on threads.

    True only when no cluster option was given, the default profile is ``local``, no GPU
    is requested or visible, and the mosaic is at most
    ``semdask.cluster.in-process-max-mpix`` megapixels (``0`` switches the fast path off).

    >>> in_process(4096 * 4096, gpu=True), in_process(4096 * 4096, profile="local")
    (False, False)
    """
    if gpu or any(v is not None for v in (profile, scheduler_address, scheduler_file,
                                           n_workers, dashboard_address)):
        return False
    if str(config.get("cluster.profile", "local") or "local") != "local":
        return False
    limit = float(config.get("cluster.in-process-max-mpix", DEFAULT_MAX_MPIX) or 0)
    if pixels > limit * 1e6:
        return False
    import torch

    return not torch.cuda.is_available()


@contextmanager
def threaded(threads: int | None = None) -> Iterator[int]:
    """Threaded scheduler with ``threads`` blocks at a time (default: Dask's
    ``num_workers`` if set, e.g. ``DASK_NUM_WORKERS=1``, else one per core).

    :func:`semdask.inference.runner.run_blocks` gives each block ``cores // threads``
    torch threads. Restores the scheduler settings afterwards; yields the thread count.
    """
    n = int(threads or dask.config.get("num_workers", None) or _cores())
    with dask.config.set(scheduler="threads", num_workers=n):
        log.info("in-process: %d blocks at a time, %d torch thread(s) each (no cluster, no "
                 "dashboard; --profile local starts a LocalCluster)", n, max(1, _cores() // n))
        yield n
