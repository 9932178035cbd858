"""Shared pieces of the command-line modules: error handling and cluster options.

The CLI is spread over ``cli`` (the data-flow arrows), ``cli_ops`` (operations:
verify, batch, watch, cluster-info) and ``cli_analysis`` (label, analyze); no library
module imports any of them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from semdask.errors import SemdaskError

__all__ = ["announce", "client_for", "cluster_options", "handle_errors", "positive",
           "skip_teardown", "teardown_skipped", "writable_dir", "writable_file"]

log = logging.getLogger("semdask")
_LOOPBACK = ("127.", "localhost", "::1")
_SKIP_TEARDOWN = False


def skip_teardown() -> None:
    """Let :func:`semdask.cli.main.run` end the process without the interpreter's teardown.

    Call it only when the command's outputs are written, closed and their locks released,
    and it started no process or thread that outlives it (e.g. ``segment`` in-process).
    """
    global _SKIP_TEARDOWN
    _SKIP_TEARDOWN = True


def teardown_skipped() -> bool:
    """Whether the command that ran asked for :func:`skip_teardown`."""
    return _SKIP_TEARDOWN


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print any failure as one ``semdask: error:`` line and exit non-zero (no traceback).

    semdask errors keep their exit code (2 for input, 3 for incomplete or damaged
    outputs); an operating-system error (permissions, a full disk, a vanished file)
    exits 1 with its path; anything else exits 1 and says how to see the traceback
    (``-vv``, which also prints it).
    """
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except SemdaskError as e:
            click.echo(f"semdask: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("semdask: interrupted; outputs of this run are marked incomplete", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except OSError as e:
            log.debug("traceback", exc_info=True)
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            click.echo(f"semdask: error: {e.strerror or e}{where}. Fix: check that the path "
                       "exists, is readable/writable by you and that the disk has space",
                       err=True)
            sys.exit(1)
        except Exception as e:
            log.debug("traceback", exc_info=True)
            click.echo(f"semdask: error: {type(e).__name__}: {e}. Fix: check the inputs; "
                       "rerun with -vv for the traceback and report it if the inputs are "
                       "valid", err=True)
            sys.exit(1)

    return wrapper


def _writable(ctx: click.Context, param: click.Parameter, value: str | None,
              want_dir: bool) -> str | None:
    import os
    from pathlib import Path

    if value is None:
        return value
    flag = param.opts[0] if param.opts else (param.name or "the path").upper()
    p = Path(value).expanduser().absolute()
    if p.exists() and p.is_dir() != want_dir:
        kind = "a folder" if want_dir else "a file"
        raise click.BadParameter(f"expected {kind} path, got an existing "
                                 f"{'file' if want_dir else 'folder'} {p}. Fix: choose "
                                 f"another {flag}", ctx=ctx, param=param)
    q = p if want_dir else p.parent
    while not q.exists() and q != q.parent:
        q = q.parent
    if not q.is_dir() or not os.access(q, os.W_OK | os.X_OK):
        raise click.BadParameter(f"expected a writable location, got {q} "
                                 f"({'a file' if not q.is_dir() else 'read-only'}). Fix: "
                                 f"choose another {flag}", ctx=ctx, param=param)
    if not want_dir and not p.parent.is_dir():
        raise click.BadParameter(f"expected an existing folder for {p.name}, got no folder "
                                 f"{p.parent}. Fix: create it first (mkdir -p {p.parent}) or "
                                 f"choose another {flag}", ctx=ctx, param=param)
    return value


def writable_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback: an output file whose folder exists and is writable (checked first)."""
    return _writable(ctx, param, value, want_dir=False)


def writable_dir(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Click callback: an output folder that is, or can be created, writable (checked first)."""
    return _writable(ctx, param, value, want_dir=True)


def positive(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Click callback: a value that must be > 0 (e.g. a pixel size in µm), or None."""
    if value is not None and not value > 0:
        flag = f"--{param.name.replace('_', '-')}" if param.name else "the option"
        raise click.BadParameter(f"expected a number > 0, got {value:g}. Fix: e.g. {flag} "
                                 "0.04458, or leave it out to use the store's pixel size",
                                 ctx=ctx, param=param)
    return value


def cluster_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--profile", default=None, metavar="NAME",
                     help="Cluster profile: local, local-cuda, slurm, slurm-runner, kubernetes, "
                     "address, scheduler-file, or one your site defines under "
                     "semdask.cluster.profiles.NAME with a kind: key [default: "
                     "semdask.cluster.profile, i.e. local] (see semdask cluster-info)."),
        click.option("--scheduler-address", default=None, metavar="ADDR",
                     help="Join a running Dask scheduler (tcp://host:8786) instead of a "
                     "LocalCluster."),
        click.option("--scheduler-file", default=None, type=click.Path(dir_okay=False),
                     help="Join the scheduler described by this file."),
        click.option("--workers", "n_workers", default=None, type=int,
                     help="LocalCluster worker processes [default: one per core, max 4]."),
        click.option("--dashboard-address", default=None, metavar="HOST:PORT",
                     help="Dashboard bind address [default: 127.0.0.1:8787; it has no "
                     "authentication, so keep it on 127.0.0.1 and tunnel]."),
        click.option("--no-cluster", is_flag=True,
                     help="Use the threaded scheduler in this process (no dashboard)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def client_for(no_cluster: bool, **kw: Any) -> Any:
    from contextlib import nullcontext

    from semdask.cluster.connect import connect

    if no_cluster and kw.get("profile"):
        raise click.UsageError("--no-cluster and --profile exclude each other")
    _warn_dashboard(kw.get("dashboard_address"), no_cluster)
    return nullcontext(None) if no_cluster else connect(**kw)


def announce(client: Any) -> None:
    if client is not None:
        from semdask.cluster.connect import dashboard_link

        click.echo(f"Dask dashboard: {dashboard_link(client)}")


def _host(address: str) -> str:
    """The host part of ``HOST:PORT``, ``[::1]:PORT``, ``tcp://HOST:PORT`` or ``:PORT``."""
    a = address.strip().split("://", 1)[-1]
    if a.startswith("["):
        return a[1 : a.index("]")] if "]" in a else a
    return a.rsplit(":", 1)[0] if a.count(":") == 1 else a


def _warn_dashboard(address: str | None, no_cluster: bool) -> None:
    """Warn when the dashboard (no authentication) would listen beyond this machine."""
    from semdask import config

    if no_cluster:
        return
    host = _host(address) if address else str(config.get("dashboard.host") or "127.0.0.1")
    if not host.startswith(_LOOPBACK):
        where = host or "every interface"
        click.echo(f"semdask: warning: the Dask dashboard will listen on {where}, reachable "
                   "from other machines without authentication (it shows a thumbnail of the "
                   "mosaic). Fix: --dashboard-address 127.0.0.1:8787 and an SSH tunnel.",
                   err=True)
