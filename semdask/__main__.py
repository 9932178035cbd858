"""``python -m semdask``: the command-line interface."""

from semdask.cli.main import run

if __name__ == "__main__":  # pragma: no cover
    run()
