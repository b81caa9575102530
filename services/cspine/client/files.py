"""The files a client uploads, found without reading them as DICOM: every file under the paths given, in sorted
order, and whether one is DICOM Part-10 (its 132-byte prefix). The server parses them; the client sends bytes."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from cspine.errors import InvalidInputError

PREAMBLE_BYTES = 128
MAGIC = b"DICM"


def iter_files(paths: Iterable[Path | str]) -> Iterator[Path]:
    """Every regular file named, or inside a named folder (recursively, in sorted order). InvalidInputError
    names a path that is neither."""
    for given in paths:
        path = Path(given)
        if path.is_dir():
            for folder, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(folder) / name
        elif path.is_file():
            yield path
        else:
            raise InvalidInputError(f"{path}: no such file or folder")


def is_part10(path: Path) -> bool:
    """Whether a file is DICOM Part-10: "DICM" after the 128-byte preamble. Reads 132 bytes."""
    with path.open("rb") as f:
        return f.read(PREAMBLE_BYTES + len(MAGIC))[PREAMBLE_BYTES:] == MAGIC
