"""The only module that creates Dask clusters and clients.

By default a :class:`distributed.LocalCluster` with one single-threaded worker
process per core (at most 4) and its dashboard bound to 127.0.0.1 (the
dashboard has no authentication). ``scheduler_address`` or ``scheduler_file``
join an existing cluster instead (dask-jobqueue, dask-kubernetes, dask-cuda, ...).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import config
from .errors import InputError, UnsafePathError

__all__ = ["connect", "dashboard_link", "local_cluster_kwargs"]

log = logging.getLogger(__name__)


def local_cluster_kwargs(
    *,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
    dashboard_address: str | None = None,
) -> dict[str, Any]:
    """Keyword arguments for the default LocalCluster (keywords win over config).

    >>> kw = local_cluster_kwargs(n_workers=2, dashboard_address="127.0.0.1:0")
    >>> kw["n_workers"], kw["host"], kw["dashboard_address"]
    (2, '127.0.0.1', '127.0.0.1:0')
    """
    nw = n_workers if n_workers is not None else config.get("local.n-workers")
    if nw in (None, "auto"):
        nw = max(1, min(os.cpu_count() or 1, 4))
    tpw = int(threads_per_worker or config.get("local.threads-per-worker") or 1)
    if int(nw) < 1 or tpw < 1:
        raise InputError("workers", expected="at least one worker and one thread",
                         got=f"n_workers={nw}, threads_per_worker={tpw}")
    ml = memory_limit if memory_limit is not None else config.get("local.memory-limit")
    if dashboard_address is None:
        dashboard_address = f"{config.get('dashboard.host')}:{config.get('dashboard.port')}"
    return {
        "n_workers": int(nw),
        "threads_per_worker": tpw,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": dashboard_address,
        "memory_limit": "auto" if ml in (None, "auto") else ml,
        # one BLAS/OpenMP thread per dask thread: no oversubscription of the cores
        "env": {"OMP_NUM_THREADS": str(tpw), "MKL_NUM_THREADS": str(tpw)},
    }


@contextmanager
def connect(
    *,
    scheduler_address: str | None = None,
    scheduler_file: str | os.PathLike[str] | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
    dashboard_address: str | None = None,
) -> Iterator[Any]:
    """Yield a :class:`distributed.Client`: an existing cluster or a fresh LocalCluster.

    Parameters
    ----------
    scheduler_address : str, optional
        ``tcp://host:8786`` of a running scheduler.
    scheduler_file : path, optional
        A scheduler file written by ``dask scheduler --scheduler-file`` or dask-jobqueue.
    n_workers, threads_per_worker, memory_limit, dashboard_address
        Options of the LocalCluster (ignored when joining a cluster).
    """
    from distributed import Client, LocalCluster

    if scheduler_address and scheduler_file:
        raise InputError("cluster", expected="either --scheduler-address or --scheduler-file",
                         got="both", fix="pass only one of them")
    if scheduler_file is not None:
        sf = Path(scheduler_file)
        if not sf.is_file():
            raise UnsafePathError(str(sf), expected="a scheduler file written by the scheduler",
                                  got="no such file",
                                  fix="start the scheduler with --scheduler-file PATH first")
        with Client(scheduler_file=str(sf)) as client:
            log.info("joined cluster at %s (dashboard %s)", client.scheduler.address,
                     dashboard_link(client))
            yield client
        return
    if scheduler_address:
        with Client(scheduler_address) as client:
            log.info("joined cluster at %s (dashboard %s)", scheduler_address,
                     dashboard_link(client))
            yield client
        return
    kw = local_cluster_kwargs(n_workers=n_workers, threads_per_worker=threads_per_worker,
                              memory_limit=memory_limit, dashboard_address=dashboard_address)
    with LocalCluster(**kw) as cluster, Client(cluster) as client:
        log.info("local cluster: %d workers x %d threads, dashboard %s", kw["n_workers"],
                 kw["threads_per_worker"], dashboard_link(client))
        yield client


def dashboard_link(client: Any) -> str:
    """The dashboard URL of ``client`` (empty when the scheduler serves none)."""
    try:
        return str(client.dashboard_link)
    except Exception:  # pragma: no cover - scheduler without bokeh
        return ""
