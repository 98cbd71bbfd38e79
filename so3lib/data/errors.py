"""The error types for bad input data: `DataError` and its special case `UndeterminedReferenceError`."""

from __future__ import annotations


class DataError(ValueError):
    """Bad input data. The message names the file, the key and the frame where known."""

    def __init__(self, path: object, message: str, key: str | None = None, frame: int | None = None):
        where = [str(path)]
        if key is not None:
            where.append(f"key '{key}'")
        if frame is not None:
            where.append(f"frame {frame}")
        super().__init__(f"{', '.join(where)}: {message}")
        self.path, self.key, self.frame = str(path), key, frame


class UndeterminedReferenceError(DataError):
    """The training set's compositions do not determine the per-element energy reference (least squares with
    fewer independent compositions than unknowns, e.g. a single molecule)."""


class MissingFileError(DataError, FileNotFoundError):
    """A data file that does not exist: a `DataError` (as every bad input) and a `FileNotFoundError`."""
