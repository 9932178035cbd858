"""The only module that creates Dask clusters and clients.

Clusters come from named *profiles* whose defaults live in the packaged
``semdask.yaml`` under ``semdask.cluster.connect.profiles.<name>`` (override them in
``~/.config/dask/semdask.yaml`` or with environment variables such as
``DASK_SEMDASK__CLUSTER__PROFILES__SLURM__QUEUE=gpu``; keyword arguments win):

``local``           CPU :class:`distributed.LocalCluster` (default), dashboard on 127.0.0.1
``local-cuda``      ``dask_cuda.LocalCUDACluster``, one worker per GPU (``semdask[gpu]``)
``slurm``           ``dask_jobqueue.SLURMCluster`` for interactive use (``semdask[cluster]``)
``slurm-runner``    ``dask_jobqueue.slurm.SLURMRunner`` inside an sbatch allocation
``kubernetes``      ``dask_kubernetes.operator.KubeCluster`` with a GPU worker group
``address``         join a running scheduler (``tcp://host:8786``)
``scheduler-file``  join the scheduler described by a scheduler file

GPU profiles start their workers with ``resources={"GPU": 1}``;
:func:`profile_has_gpu_workers` tells callers to annotate only the inference
layers with that resource, so CPU work (I/O, pyramids, statistics) can run anywhere.
Profile resolution and settings (pure, no cluster is built) live in :mod:`semdask.cluster.profiles`;
its public names are re-exported here.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from semdask.cluster import monitor
from semdask.cluster.profiles import (
    PROFILES,
    cluster_kwargs,
    gpu_worker_args,
    gpu_worker_threads,
    import_backend,
    local_cluster_kwargs,
    profile_config,
    profile_has_gpu_workers,
    profile_kind,
    resolve_dashboard,
    resolve_profile,
    slurm_kwargs,
)
from semdask.errors import InputError, UnsafePathError

__all__ = [
    "PROFILES",
    "connect",
    "dashboard_link",
    "job_script",
    "local_cluster_kwargs",
    "performance_report_path",
    "profile_config",
    "profile_has_gpu_workers",
    "report",
    "resolve_profile",
]

log = logging.getLogger(__name__)

@contextmanager
def connect(
    *,
    profile: str | None = None,
    scheduler_address: str | None = None,
    scheduler_file: str | os.PathLike[str] | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
    dashboard_address: str | None = None,
    **overrides: Any,
) -> Iterator[Any]:
    """Yield a :class:`distributed.Client` on the cluster of a profile; close it on exit.

    Parameters
    ----------
    profile : str, optional
        A profile name: a packaged one (:data:`PROFILES`, one per kind) or any profile a
        site defines under ``semdask.cluster.profiles`` (with a ``kind``); default
        ``semdask.cluster.profile`` (``local``), or ``address`` / ``scheduler-file`` when
        those are given.
    scheduler_address : str, optional
        ``tcp://host:8786`` of a running scheduler.
    scheduler_file : path, optional
        A scheduler file written by ``dask scheduler --scheduler-file`` or dask-jobqueue.
    n_workers : int, optional
        Workers (``local``, ``local-cuda``, ``slurm``) or GPU workers (``kubernetes``).
    threads_per_worker, memory_limit, dashboard_address
        Worker and dashboard options of the local profiles.
    **overrides
        Any key of the profile (``queue="gpu"``, ``walltime="04:00:00"``, ``image=...``),
        spelled with underscores; they win over the configuration.

    Examples
    --------
    GPU workers on SLURM; ``queue`` and ``walltime`` win over the configuration::

        with connect(profile="slurm", queue="gpu", walltime="04:00:00") as client:
            segment("mosaic.ome.zarr", client=client, gpu_resources=True)
    """
    from distributed import Client

    name = resolve_profile(profile, scheduler_address=scheduler_address,
                           scheduler_file=scheduler_file)
    kind = profile_kind(name)
    if kind == "local":
        from distributed import LocalCluster

        kw = local_cluster_kwargs(profile=name, n_workers=n_workers,
                                  threads_per_worker=threads_per_worker,
                                  memory_limit=memory_limit, dashboard_address=dashboard_address)
        kw.update({k: v for k, v in overrides.items() if v is not None})
        with LocalCluster(**kw) as cluster, Client(cluster) as client:
            log.info("local cluster: %d workers x %d threads, dashboard %s", kw["n_workers"],
                     kw["threads_per_worker"], dashboard_link(client))
            monitor.attach(client)  # worker logs -> driver (semdask logger)
            yield client
        return
    if kind in ("address", "scheduler-file"):
        with _join(name, scheduler_address, scheduler_file, overrides) as client:
            yield client
        return
    extra: dict[str, Any] = {"n_workers": n_workers, "dashboard_address": dashboard_address}
    if kind == "local-cuda":
        extra.update(threads_per_worker=threads_per_worker, memory_limit=memory_limit)
    elif kind == "slurm-runner":
        extra.update(nthreads=threads_per_worker, memory_limit=memory_limit)
    cfg = profile_config(name, **extra, **overrides)
    if kind == "slurm-runner":
        with _slurm_runner(cfg) as client:
            yield client
        return
    cluster = _build(name, cfg)
    with cluster, Client(cluster) as client:
        log.info("%s cluster %s, dashboard %s", name, cluster, dashboard_link(client))
        monitor.attach(client)  # worker logs -> driver (semdask logger)
        yield client


def job_script(profile: str = "slurm", **overrides: Any) -> str:
    """The SLURM job script of a profile, rendered by dask-jobqueue without submitting.

    The scheduler of the preview binds 127.0.0.1 on a free port, so the address in
    the script is a placeholder for the one a real run prints.
    """
    name = resolve_profile(profile)
    if profile_kind(name) != "slurm":
        raise InputError(f"job script of profile {name!r}", expected="a profile of kind slurm",
                         got=f"kind {profile_kind(name)}",
                         fix="semdask cluster-info --profile slurm")
    cfg = profile_config(name, **overrides)
    kw = slurm_kwargs(cfg)
    kw["scheduler_options"] = {**kw["scheduler_options"], "host": "127.0.0.1", "port": 0,
                               "dashboard_address": "127.0.0.1:0"}
    cls = import_backend("slurm", "dask_jobqueue", "SLURMCluster")
    with _jobqueue_errors(cfg), cls(silence_logs="error", **kw) as cluster:
        return str(cluster.job_script())


def performance_report_path(output: str | os.PathLike[str]) -> Path:
    """Where the performance report of a run writing ``output`` goes: beside the store.

    >>> performance_report_path("runs/a.ome.zarr/").as_posix()
    'runs/a.ome.zarr.performance.html'
    """
    p = Path(output)
    return p.with_name(p.name + ".performance.html")


@contextmanager
def report(client: Any, path: str | os.PathLike[str] | None) -> Iterator[Path | None]:
    """Record a :func:`distributed.performance_report` HTML to ``path`` while inside.

    Yields the path, or None (doing nothing) when ``client`` or ``path`` is None. A
    report that cannot be written is logged, never raised: it must not fail a run.
    """
    if client is None or path is None:
        yield None
        return
    from distributed import performance_report

    out = Path(path)
    pr = performance_report(filename=str(out))
    pr.__enter__()
    try:
        yield out
    finally:
        try:
            pr.__exit__(*sys.exc_info())
            log.info("performance report: %s", out)
        except Exception as e:
            log.warning("could not write the performance report %s: %s", out, e)


def dashboard_link(client: Any) -> str:
    """The dashboard URL of ``client`` (empty when the scheduler serves none)."""
    try:
        return str(client.dashboard_link)
    except Exception:  # pragma: no cover - scheduler without bokeh
        return ""


# --- builders --------------------------------------------------------------------------------

@contextmanager
def _jobqueue_errors(cfg: dict[str, Any]) -> Iterator[None]:
    try:
        yield
    except (ValueError, TypeError) as e:
        raise InputError("cluster profile 'slurm'", expected="valid dask-jobqueue settings "
                         "(cores and memory per job at least)", got=str(e).splitlines()[0],
                         fix="connect(profile='slurm', cores=8, memory='64GB', queue='gpu') "
                         "or set semdask.cluster.profiles.slurm.* (or jobqueue.slurm.*, see "
                         "deploy/slurm/jobqueue.yaml) in ~/.config/dask/") from e


def _visible_gpus(devices: str | None) -> int:
    """GPUs a LocalCUDACluster will use: the listed devices, else all that torch sees."""
    if devices:
        return len(str(devices).split(","))
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env:
        return len(env.split(","))
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except ImportError:  # pragma: no cover - torch is a dependency
        return 1


def _build(name: str, cfg: dict[str, Any]) -> Any:
    """Create (not yet scale) the cluster of a GPU/HPC profile."""
    kind = profile_kind(name)
    if kind == "local-cuda":
        cls = import_backend(name, "dask_cuda", "LocalCUDACluster")
        kw = {"host": "127.0.0.1", **cluster_kwargs(cfg),
              "dashboard_address": resolve_dashboard(None, cfg)}
        dev = kw.pop("cuda_visible_devices", None)  # DASK_... env vars turn "0,1" into (0, 1)
        if dev is not None:
            kw["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, dev if isinstance(dev, list | tuple)
                                                      else [dev]))
        if cfg.get("n-workers") not in (None, "auto"):
            kw["n_workers"] = int(cfg["n-workers"])
        gpus = kw.get("n_workers") or _visible_gpus(kw.get("CUDA_VISIBLE_DEVICES"))
        kw["threads_per_worker"] = gpu_worker_threads(cfg.get("threads-per-worker"), gpus=gpus)
        return cls(**kw, **({"resources": {"GPU": 1}} if cfg.get("gpu-resources") else {}))
    if kind == "slurm":
        cls = import_backend(name, "dask_jobqueue", "SLURMCluster")
        with _jobqueue_errors(cfg):
            cluster = cls(**slurm_kwargs(cfg))
        _scale(cluster, cfg, jobs=True)
        return cluster
    if kind == "kubernetes":
        cls = import_backend(name, "dask_kubernetes.operator", "KubeCluster")
        group = cfg.get("gpu-worker-group") or {}
        gpu = {str(k).replace("_", "-"): v for k, v in group.items()}
        kw = cluster_kwargs({k: v for k, v in cfg.items()
                             if k not in ("gpu-worker-group", "cpu-workers")})
        cluster = cls(n_workers=int(cfg.get("cpu-workers") or 0), **kw)
        n = int(cfg.get("n-workers") or gpu.get("n-workers") or 0)
        gpu.pop("n-workers", None)
        if n:  # only these workers carry GPU=1: the inference layers run there
            command = gpu_worker_args(cfg, list(gpu.pop("worker-command", None) or ["dask-worker"]))
            cluster.add_worker_group(name=str(gpu.pop("name", "gpu")), n_workers=n,
                                     worker_command=command, **cluster_kwargs(gpu))
        _scale(cluster, cfg, jobs=False)
        return cluster
    raise AssertionError(name)  # pragma: no cover - resolve_profile checked the name


def _scale(cluster: Any, cfg: dict[str, Any], *, jobs: bool) -> None:
    if cfg.get("adapt"):
        cluster.adapt(**{str(k).replace("-", "_"): v for k, v in dict(cfg["adapt"]).items()})
    elif jobs and cfg.get("n-workers"):
        cluster.scale(int(cfg["n-workers"]))
    elif jobs and cfg.get("jobs"):
        cluster.scale(jobs=int(cfg["jobs"]))


@contextmanager
def _slurm_runner(cfg: dict[str, Any]) -> Iterator[Any]:
    """Scheduler on rank 0, this script on rank 1, workers on the others (srun -n N)."""
    from distributed import Client

    missing = [v for v in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_JOB_ID") if v not in os.environ]
    if missing:
        raise InputError("cluster profile 'slurm-runner'", expected="a run inside an sbatch "
                         "allocation, started by srun with at least 3 tasks",
                         got=f"{', '.join(missing)} not set",
                         fix="sbatch deploy/slurm/segment.sbatch (srun semdask segment ... "
                         "--profile slurm-runner), or use --profile slurm interactively")
    cls = import_backend("slurm-runner", "dask_jobqueue.slurm", "SLURMRunner")
    worker = dict(cfg.get("worker-options") or {})
    if cfg.get("gpu-resources"):
        worker.setdefault("resources", {"GPU": 1})
    for k in ("nthreads", "local-directory", "memory-limit"):
        if cfg.get(k) is not None:
            worker.setdefault(k.replace("-", "_"), cfg[k])
    sched = {"dashboard_address": resolve_dashboard(None, cfg),
             **dict(cfg.get("scheduler-options") or {})}
    sf = str(cfg.get("scheduler-file") or "scheduler-{job_id}.json")
    try:  # scheduler and worker ranks block in here and SIGINT themselves when the run ends
        runner = cls(scheduler_file=sf, scheduler_options=sched, worker_options=worker)
    except KeyboardInterrupt:
        if int(os.environ["SLURM_PROCID"]) != 1:  # rank 1 is the client: a real interrupt
            raise SystemExit(0) from None
        raise
    with runner, Client(runner) as client:
        client.wait_for_workers(runner.n_workers)
        log.info("SLURMRunner: %d workers, dashboard %s", runner.n_workers,
                 dashboard_link(client))
        monitor.attach(client)  # worker logs -> driver (semdask logger)
        yield client


@contextmanager
def _join(name: str, address: str | None, scheduler_file: str | os.PathLike[str] | None,
          overrides: dict[str, Any]) -> Iterator[Any]:
    from distributed import Client

    cfg = profile_config(name, **overrides)
    if profile_kind(name) == "scheduler-file":
        sf = scheduler_file or cfg.get("scheduler-file")
        if sf is None or not Path(sf).is_file():
            raise UnsafePathError(str(sf), expected="a scheduler file written by the scheduler",
                                  got="no such file" if sf else "none given",
                                  fix="start the scheduler with --scheduler-file PATH first")
        with Client(scheduler_file=str(sf)) as client:
            log.info("joined cluster at %s (dashboard %s)", client.scheduler.address,
                     dashboard_link(client))
            monitor.attach(client)  # worker logs -> driver (semdask logger)
            yield client
        return
    import dask.config

    addr = address or cfg.get("address") or dask.config.get("scheduler-address", None)
    if not addr:
        raise InputError("cluster profile 'address'", expected="a scheduler address",
                         got="none", fix="semdask segment ... --scheduler-address "
                         "tcp://host:8786 (or set DASK_SCHEDULER_ADDRESS)")
    with Client(addr) as client:
        log.info("joined cluster at %s (dashboard %s)", addr, dashboard_link(client))
        monitor.attach(client)  # worker logs -> driver (semdask logger)
        yield client
