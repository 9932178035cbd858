"""Cluster profiles: names, merged settings and constructor keywords (no cluster is built).

A profile's settings are the packaged defaults in ``semdask.yaml`` under
``semdask.cluster.connect.profiles.<name>``, overridden by the dask config and then by keywords;
:mod:`semdask.cluster` (the only module that creates clusters and clients) turns them into
clusters and re-exports the public names.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from semdask import config
from semdask.errors import InputError

__all__ = [
    "EXTRAS",
    "PROFILES",
    "cluster_kwargs",
    "gpu_worker_args",
    "gpu_worker_threads",
    "import_backend",
    "local_cluster_kwargs",
    "profile_config",
    "profile_has_gpu_workers",
    "resolve_dashboard",
    "resolve_profile",
    "slurm_kwargs",
]

PROFILES = ("local", "local-cuda", "slurm", "slurm-runner", "kubernetes", "address",
            "scheduler-file")
# profile -> (distribution, semdask extra) of its optional package
EXTRAS = {"local-cuda": ("dask-cuda", "gpu"), "slurm": ("dask-jobqueue", "cluster"),
           "slurm-runner": ("dask-jobqueue", "cluster"), "kubernetes": ("dask-kubernetes", "k8s")}
# profile keys that are semdask's own, not keywords of the cluster class
_OWN = {"gpu-resources", "jobs", "adapt", "dashboard-address", "n-workers"}


def resolve_profile(profile: str | None = None, *, scheduler_address: str | None = None,
                    scheduler_file: str | os.PathLike[str] | None = None) -> str:
    """The profile name to use: ``profile``, else implied by an address/file, else config.

    >>> resolve_profile("local_cuda"), resolve_profile(scheduler_address="tcp://h:8786")
    ('local-cuda', 'address')
    """
    if scheduler_address and scheduler_file:
        raise InputError("cluster", expected="either --scheduler-address or --scheduler-file",
                         got="both", fix="pass only one of them")
    implied = "address" if scheduler_address else "scheduler-file" if scheduler_file else None
    name = profile if profile is not None else implied or config.get("cluster.profile", "local")
    name = str(name).strip().lower().replace("_", "-")
    if name not in PROFILES:
        raise InputError(f"cluster profile {profile!r}", expected=f"one of {', '.join(PROFILES)}",
                         got=repr(name), fix="connect(profile='local') or semdask segment ... "
                         "--profile local; define site settings under "
                         "semdask.cluster.profiles.<name> in ~/.config/dask/semdask.yaml")
    if implied and name != implied:
        raise InputError(f"cluster profile {name!r}", expected=f"profile {implied!r} with "
                         "--scheduler-address/--scheduler-file", got=f"--profile {name}",
                         fix=f"drop --profile, or use --profile {implied}")
    return name


def profile_config(profile: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The merged settings of a profile: packaged defaults < dask config < ``overrides``.

    Keys use the YAML spelling (``job-extra-directives``); None overrides are ignored.

    >>> profile_config("slurm", walltime="00:10:00")["walltime"]
    '00:10:00'
    """
    name = resolve_profile(profile)
    raw = config.get(f"cluster.profiles.{name}") or {}
    cfg = {str(k).replace("_", "-"): v for k, v in dict(raw).items()}
    cfg.update({k.replace("_", "-"): v for k, v in overrides.items() if v is not None})
    return cfg


def profile_has_gpu_workers(profile: str | None = None, *, scheduler_address: str | None = None,
                            scheduler_file: str | os.PathLike[str] | None = None) -> bool:
    """Whether the profile's workers carry ``resources={"GPU": 1}``.

    >>> profile_has_gpu_workers("local"), profile_has_gpu_workers("local-cuda")
    (False, True)
    """
    name = resolve_profile(profile, scheduler_address=scheduler_address,
                           scheduler_file=scheduler_file)
    return bool(profile_config(name).get("gpu-resources", False))


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
    cfg = profile_config("local")
    nw = n_workers if n_workers is not None else cfg.get("n-workers")
    if nw in (None, "auto"):
        nw = max(1, min(os.cpu_count() or 1, 4))
    tpw = int(threads_per_worker or cfg.get("threads-per-worker") or 1)
    if int(nw) < 1 or tpw < 1:
        raise InputError("workers", expected="at least one worker and one thread",
                         got=f"n_workers={nw}, threads_per_worker={tpw}")
    ml = memory_limit if memory_limit is not None else cfg.get("memory-limit")
    return {
        "n_workers": int(nw),
        "threads_per_worker": tpw,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": resolve_dashboard(dashboard_address, cfg),
        "memory_limit": "auto" if ml in (None, "auto") else ml,
        # one BLAS/OpenMP thread per dask thread: no oversubscription of the cores
        "env": {"OMP_NUM_THREADS": str(tpw), "MKL_NUM_THREADS": str(tpw)},
    }


def gpu_worker_threads(threads: int | str | None, *, gpus: int,
                       cpus: int | None = None) -> int:
    """Threads per GPU worker: ``threads``, or for ``auto``/None the CPU cores per GPU, <= 8.

    The GPU finishes a chunk in milliseconds; the CPU side of the chunk (Zarr decode and
    encode, normalisation, the class argmax, the label pyramid) is what the worker's
    threads must overlap to keep it fed (``benchmarks/gpu.py``).

    >>> gpu_worker_threads("auto", gpus=1, cpus=16), gpu_worker_threads(None, gpus=4, cpus=16)
    (8, 4)
    >>> gpu_worker_threads(2, gpus=1, cpus=16), gpu_worker_threads("auto", gpus=8, cpus=4)
    (2, 1)
    """
    if threads not in (None, "auto"):
        n = int(threads)
        if n < 1:
            raise InputError("threads-per-worker", expected="a positive integer or auto",
                             got=repr(threads))
        return n
    cores = cpus if cpus is not None else len(os.sched_getaffinity(0))
    return max(1, min(8, cores // max(1, gpus)))


# --- keywords of the cluster classes -------------------------------------------------------

def cluster_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """Profile keys -> constructor keywords (semdask's own and None values dropped)."""
    return {k.replace("-", "_"): v for k, v in cfg.items() if k not in _OWN and v is not None}


def resolve_dashboard(address: str | None, cfg: dict[str, Any]) -> str:
    """The dashboard address: ``address``, else the profile's, else config ``dashboard.*``."""
    if address is None:
        address = cfg.get("dashboard-address")
    if address is None:
        address = f"{config.get('dashboard.host')}:{config.get('dashboard.port')}"
    return str(address)


def import_backend(profile: str, module: str, attr: str) -> Any:
    """``module.attr`` of a profile's optional package; InputError with the install hint."""
    dist, extra = EXTRAS[profile]
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise InputError(f"cluster profile {profile!r}", expected=f"{dist} installed",
                         got=f"{type(e).__name__}: {e}",
                         fix=f"pip install 'semdask[{extra}]' (or pip install {dist})") from e


def gpu_worker_args(cfg: dict[str, Any], args: list[str]) -> list[str]:
    """Worker command-line ``args`` plus ``--resources GPU=1`` for GPU profiles."""
    if cfg.get("gpu-resources") and not any(a.startswith("--resources") for a in args):
        args = [*args, "--resources", "GPU=1"]
    return args


def slurm_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    """``SLURMCluster`` keywords of a merged slurm profile (GPU args, dashboard address)."""
    kw = cluster_kwargs(cfg)
    kw["worker_extra_args"] = gpu_worker_args(cfg, list(kw.get("worker_extra_args") or []))
    kw["scheduler_options"] = {"dashboard_address": resolve_dashboard(None, cfg),
                               **dict(kw.get("scheduler_options") or {})}
    return kw
