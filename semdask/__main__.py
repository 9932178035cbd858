"""``python -m semdask``: the command-line interface."""

from semdask.cli.main import main

if __name__ == "__main__":  # pragma: no cover
    main()
