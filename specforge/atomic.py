"""Files written whole or not at all: the one routine every writer in specforge uses.

A file is written under a temporary name in its own folder (a rename is atomic only within
one filesystem), flushed to disk, then renamed over the target; an exception removes the
temporary file and leaves the target as it was. The temporary name ends with the target's
whole name, so that libraries that insist on a suffix (Keras's ``save_weights`` wants
``.weights.h5``; ``np.savez`` appends ``.npz`` to a path without it) write where they are
told. It starts with ``.tmp-``: a crash between writing and renaming leaves a hidden file
that says what it is.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Every temporary name starts with this.
TEMP_PREFIX = ".tmp-"
#: The longest file name most filesystems allow.
_NAME_MAX = 255


def temporary_name(path: Path) -> Path:
    """A fresh, unused-looking temporary path next to ``path``, ending as ``path`` ends."""
    token = secrets.token_hex(4)
    name = f"{TEMP_PREFIX}{token}.{path.name}"
    if len(name) > _NAME_MAX:  # keep the suffixes, which are what libraries look at
        name = f"{TEMP_PREFIX}{token}{''.join(path.suffixes)[-(_NAME_MAX - 20):]}"
    return path.with_name(name)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder to write (by name: ``torch.save``,
    ``savefig``, ``save_weights``, ``open``); when the block ends without an exception it is
    synced and renamed over ``path``, when the block raises it is removed. The file exists
    (empty, created with the usual permissions) when the block starts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = temporary_name(path)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:  # pragma: no cover - 32 random bits
            continue
    try:
        yield tmp
        with open(tmp, "r+b") as f:  # what the writer wrote is on disk before the rename
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomically(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` whole or not at all."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
