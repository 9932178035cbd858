"""Exception hierarchy with actionable messages.

Every error semdask raises for bad input or a broken store derives from
:class:`SemdaskError`. Messages say what was expected, what arrived and how to
fix it, so the CLI can print them as they are and exit non-zero.

Examples
--------
>>> err = InputError("image", expected="a 2-D (y, x) array", got="shape (3, 5, 5)",
...                  fix="pass one plane, e.g. image[0]")
>>> print(err)
image: expected a 2-D (y, x) array, got shape (3, 5, 5). Fix: pass one plane, e.g. image[0]
"""

from __future__ import annotations

__all__ = [
    "DamagedOutputError",
    "ForeignOutputError",
    "IncompleteOutputError",
    "InputError",
    "ModelError",
    "OutputLockedError",
    "SemdaskError",
    "StoreError",
    "UnsafePathError",
]


class SemdaskError(Exception):
    """Base class for all semdask errors.

    Parameters
    ----------
    what : str
        The thing that is wrong (a path, an argument, an array).
    expected : str, optional
        What semdask expected.
    got : str, optional
        What actually arrived.
    fix : str, optional
        How to fix it (ideally the corrected call).
    """

    exit_code: int = 2

    def __init__(
        self,
        what: str,
        *,
        expected: str | None = None,
        got: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.what = what
        self.expected = expected
        self.got = got
        self.fix = fix
        super().__init__(self._format())

    def _format(self) -> str:
        detail = []
        if self.expected is not None:
            detail.append(f"expected {self.expected}")
        if self.got is not None:
            detail.append(f"got {self.got}")
        msg = self.what + (": " + ", ".join(detail) if detail else "")
        if self.fix is not None:
            msg += f". Fix: {self.fix}"
        return msg

    def __reduce__(self):  # keep errors picklable across dask workers
        return (
            _rebuild,
            (type(self), self.what, self.expected, self.got, self.fix),
        )


def _rebuild(cls, what, expected, got, fix):
    return cls(what, expected=expected, got=got, fix=fix)


class InputError(SemdaskError, ValueError):
    """User input (an argument, an image, a file) is not what semdask can use."""


class UnsafePathError(InputError):
    """A user path is missing, of the wrong kind, or would overwrite something."""


class StoreError(SemdaskError):
    """An OME-Zarr store is missing, malformed or not a semdask store."""


class IncompleteOutputError(StoreError):
    """An output store exists but a run did not finish writing it."""

    exit_code = 3


class DamagedOutputError(StoreError):
    """An output marked complete no longer matches its ledger (a shard deleted or altered)."""

    exit_code = 3


class ModelError(SemdaskError):
    """A model file or config is invalid, unsafe or incompatible with the data."""


class ForeignOutputError(UnsafePathError):
    """An output holds data ``semdask segment`` did not write, or overlaps the input.

    Another mosaic, its image, labels of another tool, a path inside the input: semdask
    never replaces or writes into them, whatever the flags.
    """


class OutputLockedError(StoreError):
    """Another writer holds the output's writer lock (``<store>.semdask-lock``), or held it.

    Exit status 73 (EX_CANTCREAT): the output cannot be written now; not 75, which
    job scripts treat as "requeue and resume".
    """

    exit_code = 73
