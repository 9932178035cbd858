"""Operations commands: cluster-info, verify, batch, watch."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from semdask.cli.common import announce, client_for, cluster_options, handle_errors

__all__ = ["COMMANDS"]


@click.command("cluster-info")
@click.option("--profile", default=None, metavar="NAME",
              help="Profile to show [default: semdask.cluster.profile].")
@handle_errors
def cluster_info(profile: str | None) -> None:
    """Print a cluster profile's settings as YAML; slurm: also its job script (not submitted)."""
    import yaml

    from semdask.cluster.connect import job_script
    from semdask.cluster.profiles import (
        profile_config,
        profile_has_gpu_workers,
        profile_kind,
        resolve_profile,
    )

    name = resolve_profile(profile)
    kind = profile_kind(name)
    info = {"profile": name, "kind": kind, "gpu-workers": profile_has_gpu_workers(name),
            "settings": profile_config(name)}
    click.echo(yaml.safe_dump(info, sort_keys=False).rstrip())
    if kind == "slurm":
        click.echo("# job script (rendered by dask-jobqueue, not submitted):")
        click.echo(job_script(name).rstrip())


# --- verify / batch / watch (ledger.py, batch.py) ------------------------------
@click.command("verify")
@click.argument("output", type=click.Path(exists=False))
@click.option("--labels", "name", default="phases", help="Label group to audit.")
@handle_errors
def verify_cmd(output: str, name: str) -> None:
    """Audit OUTPUT: every block present, recorded, checksums matching (exit 3 if not)."""
    from semdask.errors import OutputLockedError
    from semdask.storage.ledger import verify
    from semdask.storage.lock import LockInfo, read_lock, stale_reason

    a = verify(output, labels=name)
    click.echo(a.table())
    if not a.ok:
        what = "was not written by semdask segment" if a.foreign else "is incomplete or corrupt"
        try:
            held: LockInfo | None = read_lock(a.output)
        except OutputLockedError:  # an unreadable lock file: the audit speaks for itself
            held = None
        busy = held is not None and stale_reason(held) is None
        fix = (f"wait: a semdask segment run is writing it now ({held.describe()})"
               if busy and held is not None else a.fix())
        click.echo(f"semdask: error: {a.output}/{a.group} {what}. Fix: {fix}", err=True)
        sys.exit(3)


@click.command("unlock")
@click.argument("output", type=click.Path(exists=False))
@click.option("--force", is_flag=True,
              help="Also remove a lock whose writer still looks alive (only when you know it "
              "is not writing: e.g. its host is down but answers nothing).")
@handle_errors
def unlock_cmd(output: str, force: bool) -> None:
    """Remove OUTPUT's writer lock (OUTPUT.semdask-lock) left behind by a run that died.

    Only a stale lock is removed: its process is gone on this host, or the host
    rebooted, or it is an earlier run of this SLURM job, or another host sent no
    heartbeat for semdask.lock.stale-after seconds (600). Then run verify, and segment
    --resume to finish that run's output.
    """
    from semdask.storage.lock import break_lock

    what = break_lock(output, force=force)
    if what is None:
        click.echo(f"{output}: no writer lock")
        return
    click.echo(f"removed the writer lock of {output} ({what}). Next: semdask verify {output}, "
               "then semdask segment ... --resume to finish its output")


def _scheduled(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options of batch/watch (geometry comes from semdask.segment.* config), a SIGTERM drain."""
    @wraps(fn)
    def run(target: str, **kw: Any) -> None:
        from semdask.inference.batch import summary
        from semdask.inference.runner import drain_on_sigterm
        from semdask.inference.settings import check_settings

        cl = {k: kw.pop(k) for k in ("profile", "scheduler_address", "scheduler_file",
                                     "n_workers", "dashboard_address", "no_cluster") if k in kw}
        check_settings(**kw)  # before a cluster starts
        with drain_on_sigterm(), client_for(**cl) as client:
            announce(client)
            out = fn(target, client=client, echo=click.echo, progress=False, **kw)
        click.echo(summary(out))
        if any(o.status == "failed" for o in out):
            sys.exit(1)

    for o in (click.option("--name", default="phases", help="Label group name."),
              click.option("--confidence/--no-confidence", default=None,
                           help="Also write the maximum probability [semdask.segment.confidence]."),
              click.option("--probs/--no-probs", default=None,
                           help="Also write class probabilities [semdask.segment.probs]."),
              click.option("--chunks", "chunk", default=None, type=int,
                           help="Chunk edge in px, 16..8192 [semdask.segment.chunks]."),
              click.option("--model", "-m", default=None, type=click.Path(dir_okay=False))):
        run = o(run)
    return handle_errors(cluster_options(run))


@click.command("batch")
@click.argument("target", metavar="MANIFEST", type=click.Path(dir_okay=False))
@_scheduled
def batch_cmd(target: str, **kw: Any) -> Any:
    """Segment MANIFEST's mosaics (text/CSV/YAML: mosaic [output [model]]), skip finished ones."""
    from semdask.inference.batch import read_manifest, run_batch

    return run_batch(read_manifest(target), **kw)


@click.command("watch")
@click.argument("target", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--interval", type=float, default=60.0, help="Seconds between polls.")
@click.option("--once", is_flag=True, help="One pass, then exit (cron, tests).")
@click.option("--output-dir", default=None, type=click.Path(file_okay=False),
              help="Write OUTPUT-DIR/<mosaic name> instead of into each mosaic.")
@_scheduled
def watch_cmd(target: str, **kw: Any) -> Any:
    """Poll DIR for *.ome.zarr mosaics marked complete and segment new ones (idempotent)."""
    from semdask.inference.batch import watch

    return watch(target, **kw)


COMMANDS = [cluster_info, verify_cmd, unlock_cmd, batch_cmd, watch_cmd]
