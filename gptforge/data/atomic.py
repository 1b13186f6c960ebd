"""Files written all at once or not at all (a temporary name beside the file, then a rename),
and dataset folders written by one process at a time.

An interrupted run never leaves a half-written file under the real name, and two prepares of
the same dataset never mix their files: the second one stops at once, naming the first.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from gptforge.data.errors import DataError
from gptforge.gpt.folders import FolderBusyError, FolderLock


@contextlib.contextmanager
def dataset_lock(folder: Path, log=None) -> Iterator[FolderLock]:
    """Hold ``folder``'s writer lock (gptforge/gpt/folders.py: a file beside it, released by the
    kernel if this process dies); a DataError, with nothing written, if another prepare holds it."""
    try:
        lock = FolderLock(folder, "prepare").acquire()
    except FolderBusyError as err:
        raise DataError(str(err)) from None
    except OSError as err:
        raise DataError(f"cannot write into {folder.parent}: {err.strerror or err}") from None
    try:
        if lock.took_over and log is not None:
            log(f"{folder}: taking over the lock of {lock.took_over}, which is no longer running")
        yield lock
    finally:
        lock.release()


def temp_name(path: Path) -> Path:
    """A temporary name for ``path``, in its folder and unique to this writer."""
    # in the destination's folder, so os.replace is an atomic rename; unique, so parallel writers never clash
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` all at once or not at all."""
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
