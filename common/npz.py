"""Reading .npz archives so that every way a file can be unreadable is one :class:`NpzError`.

``np.load`` fails in many ways, some only when an array is first indexed (it reads lazily): an
empty file (EOFError), a plain .npy (an array, not an archive), a bad CRC (BadZipFile), damaged
compressed data (zlib.error), object arrays (ValueError without pickles). The parts that read
.npz files (cnn.data, the Hopfield demo) share this reader instead of each catching its own subset.
"""

from __future__ import annotations

import zipfile
import zlib
from pathlib import Path

import numpy as np

# What np.load and the lazy reads of an NpzFile raise for a damaged or foreign file.
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


class NpzError(ValueError):
    """An .npz file that is missing or cannot be read; the message is one line naming the file,
    ``reason`` the underlying error's first line (None for a missing file or array)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


def _reason(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


class Npz:
    """The named arrays of an .npz file, read eagerly on indexing, with one-line errors.

    ``expected`` describes the format wanted (e.g. "an .npz with train_images, ..."); it ends every
    message. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | Path, expected: str):
        self.path, self.expected = Path(path), expected
        if not self.path.exists():
            raise NpzError(f"{self.path}: no such file (expected {expected})")
        if not self.path.is_file():
            raise NpzError(f"{self.path}: not a regular file (expected {expected})")
        try:
            with open(self.path, "rb") as f:
                magic = f.read(6)
            if not (magic[:4] in (b"PK\x03\x04", b"PK\x05\x06") or magic == b"\x93NUMPY"):  # neither a zip nor an .npy
                raise ValueError("not a zip archive, as an .npz is" if magic else "an empty file")
            data = np.load(self.path, allow_pickle=False)
        except _READ_ERRORS as err:
            raise NpzError(f"{self.path}: not a readable .npz ({_reason(err)}); expected {expected}", _reason(err)) from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise NpzError(f"{self.path}: a single .npy array, not an .npz archive of named arrays; expected {expected}")
        self._data = data
        self.files: list[str] = list(data.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def __getitem__(self, name: str) -> np.ndarray:
        """The array ``name``, read now; a damaged or object array is an :class:`NpzError`."""
        if name not in self.files:
            raise NpzError(f"{self.path}: no array {name} (found: {', '.join(self.files) or 'nothing'}); "
                           f"expected {self.expected}")
        try:
            return self._data[name]
        except _READ_ERRORS as err:
            raise NpzError(f"{self.path}: the array {name} cannot be read ({_reason(err)}); "
                           f"expected {self.expected}", _reason(err)) from None

    def close(self) -> None:
        self._data.close()

    def __enter__(self) -> Npz:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
