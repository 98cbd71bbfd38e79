"""The one error type for bad input data."""

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
