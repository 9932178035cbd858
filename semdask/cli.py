"""Command-line interface: thin wrappers that parse, call one public function, report.

Every failure exits non-zero with the error's message (what was expected, what
arrived, how to fix it).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path  # noqa: F401  (used by sub-commands)
from typing import Any

import click

from . import __version__
from .errors import SemdaskError

__all__ = ["main"]

log = logging.getLogger("semdask")


def _handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
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


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(__version__, prog_name="semdask")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """Segment the phases of SEM mosaics (OME-Zarr) with a U-Net on Dask."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("semdask").setLevel(min(level, logging.INFO))


# --- synth (synthetic.py) ----------------------------------------------------
# --- end synth ---------------------------------------------------------------

# --- convert (io.py / ome.py) -------------------------------------------------
# --- end convert --------------------------------------------------------------

# --- train (train.py) ---------------------------------------------------------
# --- end train ----------------------------------------------------------------

# --- segment / fractions / preview / demo (infer.py, metrics.py) -------------
# --- end segment --------------------------------------------------------------


if __name__ == "__main__":  # pragma: no cover
    main()
