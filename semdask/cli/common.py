"""Shared pieces of the command-line modules: error handling and cluster options.

The CLI is spread over ``cli`` (the data-flow arrows), ``cli_ops`` (operations:
verify, batch, watch, cluster-info) and ``cli_analysis`` (label, analyze); no library
module imports any of them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import click

from semdask.errors import SemdaskError

__all__ = ["announce", "client_for", "cluster_options", "handle_errors"]


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
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

    return wrapper


def cluster_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--profile", default=None, metavar="NAME",
                     help="Cluster profile: local, local-cuda, slurm, slurm-runner, kubernetes, "
                     "address, scheduler-file [default: semdask.cluster.profile, i.e. local]; "
                     "settings in semdask.cluster.profiles.NAME (see semdask cluster-info)."),
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
    return nullcontext(None) if no_cluster else connect(**kw)


def announce(client: Any) -> None:
    if client is not None:
        from semdask.cluster.connect import dashboard_link

        click.echo(f"Dask dashboard: {dashboard_link(client)}")
