"""Cluster profiles: names, merged settings and constructor keywords (no cluster is built).

A profile is a named set of settings under ``semdask.cluster.profiles.<name>`` with a
``kind`` (the backend: one of :data:`KINDS`). semdask ships one profile per kind, named after
it; a site defines any number more in YAML, e.g. ``slurm-gpu: {kind: slurm, queue: gpu}`` and
``slurm-cpu: {kind: slurm, queue: cpu, gpu-resources: false}``, each starting from the
packaged defaults of its kind. Settings are the packaged defaults, overridden by the dask
config and then by keywords;
for ``slurm``, a site's ``jobqueue.slurm.*`` wins over semdask's packaged defaults;
:mod:`semdask.cluster` (the only module that creates clusters and clients) turns them into
clusters and re-exports the public names.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import dask.config
import yaml

from semdask import config
from semdask.errors import InputError

__all__ = [
    "EXTRAS",
    "KINDS",
    "PROFILES",
    "cluster_kwargs",
    "gpu_worker_args",
    "gpu_worker_threads",
    "import_backend",
    "local_cluster_kwargs",
    "profile_config",
    "profile_has_gpu_workers",
    "profile_kind",
    "profile_names",
    "resolve_dashboard",
    "resolve_profile",
    "slurm_kwargs",
]

#: the backends a profile can be of (its ``kind``)
KINDS = ("local", "local-cuda", "slurm", "slurm-runner", "kubernetes", "address",
         "scheduler-file")
#: the packaged profiles: one per kind, named after it
PROFILES = KINDS
# kind -> (distribution, semdask extra) of its optional package
EXTRAS = {"local-cuda": ("dask-cuda", "gpu"), "slurm": ("dask-jobqueue", "cluster"),
           "slurm-runner": ("dask-jobqueue", "cluster"), "kubernetes": ("dask-kubernetes", "k8s")}
# profile keys that are semdask's own, not keywords of the cluster class
_OWN = {"kind", "gpu-resources", "jobs", "adapt", "dashboard-address", "n-workers"}
log = logging.getLogger(__name__)


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
    names = profile_names()
    if name not in names:
        raise InputError(f"cluster profile {profile!r}", expected=f"one of {', '.join(names)}",
                         got=repr(name), fix="connect(profile='local') or semdask segment ... "
                         "--profile local; define site settings under "
                         "semdask.cluster.profiles.<name> in ~/.config/dask/semdask.yaml")
    if implied and profile_kind(name) != implied:
        raise InputError(f"cluster profile {name!r}", expected=f"profile {implied!r} with "
                         "--scheduler-address/--scheduler-file", got=f"--profile {name}",
                         fix=f"drop --profile, or use --profile {implied}")
    return name


def profile_names() -> tuple[str, ...]:
    """The packaged profiles, then every other name under ``semdask.cluster.profiles``.

    >>> profile_names()[:3]
    ('local', 'local-cuda', 'slurm')
    """
    site = _canon(config.get("cluster.profiles") or {})
    return (*PROFILES, *sorted(n.lower() for n in site if n.lower() not in PROFILES))


def profile_kind(profile: str) -> str:
    """The backend of a profile: its ``kind`` key, else its name (the packaged profiles).

    >>> import dask
    >>> with dask.config.set({"semdask.cluster.profiles.slurm-gpu": {"kind": "slurm"}}):
    ...     profile_kind("slurm-gpu"), profile_kind("local")
    ('slurm', 'local')
    """
    raw = _canon(config.get(f"cluster.profiles.{profile}") or {})
    kind = str(raw.get("kind") or profile).strip().lower().replace("_", "-")
    if kind not in KINDS:
        raise InputError(f"cluster profile {profile!r}",
                         expected=f"kind: one of {', '.join(KINDS)}",
                         got=f"kind: {raw.get('kind', profile)!r}",
                         fix=f"set semdask.cluster.profiles.{profile}.kind to one of them "
                         "(e.g. kind: slurm)")
    return kind


def profile_config(profile: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The merged settings of a profile: packaged defaults < dask config < ``overrides``.

    A profile of another name starts from the packaged profile of its kind. Keys use the
    YAML spelling (``job-extra-directives``); None overrides are ignored.

    >>> profile_config("slurm", walltime="00:10:00")["walltime"]
    '00:10:00'
    """
    name = resolve_profile(profile)
    kind = profile_kind(name)
    cfg = _canon(config.get(f"cluster.profiles.{kind}") or {}) if name != kind else {}
    cfg.update(_canon(config.get(f"cluster.profiles.{name}") or {}))
    cfg["kind"] = kind
    if kind == "slurm":
        cfg = _honour_site_jobqueue(cfg, name)
    cfg.update({k.replace("_", "-"): v for k, v in overrides.items() if v is not None})
    return cfg


def _canon(d: Any) -> dict[str, Any]:
    """A mapping with YAML-spelled keys (``job_extra`` -> ``job-extra``); {} for non-mappings."""
    return {str(k).replace("_", "-"): v for k, v in dict(d).items()} if isinstance(d, dict) else {}


@functools.cache
def _packaged_defaults(dist: str) -> dict[str, Any]:
    """The slurm section of a package's own defaults: semdask's or dask-jobqueue's YAML."""
    keys: tuple[str, ...]
    if dist == "semdask":
        path: Path | None = Path(config.__file__).with_name("semdask.yaml")
        keys = ("semdask", "cluster", "profiles", "slurm")
    else:  # read the file without importing dask_jobqueue
        spec = importlib.util.find_spec("dask_jobqueue")
        path = Path(spec.origin).with_name("jobqueue.yaml") if spec and spec.origin else None
        keys = ("jobqueue", "slurm")
    node: Any = yaml.safe_load(path.read_text()) if path is not None and path.exists() else {}
    for k in keys:
        node = _canon(node).get(k, {})
    return _canon(node)


def _set_by_user(key: str, value: Any, name: str = "slurm") -> bool:
    """Whether ``semdask.cluster.profiles.<name>.<key>`` differs from or overrides the package."""
    if value != _packaged_defaults("semdask").get(key):
        return True
    node: Any = dask.config.collect()  # the YAML files and DASK_* variables only
    for k in ("semdask", "cluster", "profiles", name):
        node = _canon(node).get(k, {})
    return key in _canon(node)


def _honour_site_jobqueue(cfg: dict[str, Any], name: str = "slurm") -> dict[str, Any]:
    """Let a site's ``jobqueue.slurm.*`` win over semdask's packaged slurm defaults.

    A ``jobqueue.slurm`` value counts as the site's when it is set and differs from
    dask-jobqueue's own default (dask-jobqueue copies its defaults into
    ``~/.config/dask/jobqueue.yaml``, so a value equal to them cannot be told apart).
    A key that the user also set under ``semdask.cluster.profiles.slurm`` keeps the
    user's value, with a warning naming both. ``scheduler-options`` merge key by key.
    """
    site = _canon(dask.config.get("jobqueue.slurm", default={}))
    theirs = _packaged_defaults("dask-jobqueue")
    cfg = dict(cfg)
    for key in sorted((set(cfg) | {"scheduler-options"}) - _OWN):
        value = site.get(key)
        if value is None or value == theirs.get(key) or value == cfg.get(key):
            continue
        if key == "scheduler-options":
            cfg[key] = {**dict(value), **dict(cfg.get(key) or {})}
        elif cfg.get(key) is not None and _set_by_user(key, cfg[key], name):
            log.warning("semdask.cluster.profiles.%s.%s = %r overrides jobqueue.slurm.%s = %r "
                        "of your Dask configuration; remove one of them to silence this",
                        name, key, cfg[key], key, value)
        else:
            cfg[key] = value
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
    profile: str = "local",
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
    cfg = profile_config(profile)
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
    dist, extra = EXTRAS[profile_kind(profile)]
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
    """``SLURMCluster`` keywords of a merged slurm profile (GPU args, dashboard address).

    The scheduler options are the site's (``jobqueue.slurm.scheduler-options``, merged
    into ``cfg`` by :func:`profile_config`) plus a loopback dashboard where they name none;
    the profile's own ``dashboard-address``, when set, wins.
    """
    kw = cluster_kwargs(cfg)
    kw["worker_extra_args"] = gpu_worker_args(cfg, list(kw.get("worker_extra_args") or []))
    sched = {"dashboard_address": resolve_dashboard(None, cfg),
             **dict(kw.get("scheduler_options") or {})}
    if cfg.get("dashboard-address") is not None:
        sched["dashboard_address"] = str(cfg["dashboard-address"])
    host = str(sched["dashboard_address"]).rpartition(":")[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        log.warning("the Dask dashboard will listen on %r, reachable from the network without "
                    "authentication; prefer 127.0.0.1:8787 and an SSH tunnel",
                    sched["dashboard_address"])
    kw["scheduler_options"] = sched
    return kw
