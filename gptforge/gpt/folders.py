"""Output folders: one writer at a time, and a folder replaced whole or not at all.

    with FolderLock(out, "tokenizer training") as lock:    # a second writer gets FolderBusyError at once
        check_replaceable(out, overwrite, KNOWN_FILES, "a tokenizer")
        with staged_folder(out) as tmp:                     # write into tmp; on success tmp becomes out
            ...

The lock is a file beside the folder (``.<name>.lock``), not in it, so the folder can be
swapped while it is held and a refused writer creates nothing inside it. It is an ``flock``:
the kernel drops it when its holder dies, however it dies, so a lock left by a killed
process is taken over without guessing from pids (``lock.took_over`` names the dead holder).
The file holds the holder's pid, host and command, for the message a second writer gets.

A replaced folder is written in full as a hidden sibling, then swapped in with one
``renameat2(RENAME_EXCHANGE)`` (Linux; two renames elsewhere): a reader sees the old folder
or the new one, never a mix, and no stale file of the old one survives into the new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path


class FolderBusyError(RuntimeError):
    """Another live process writes the folder; the message names it."""


class FolderError(ValueError):
    """The folder cannot be written as asked (it holds other things, --overwrite is missing)."""


def lock_path(folder: str | Path) -> Path:
    """The lock file of ``folder``: beside it, hidden."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}.lock"


def _command_line() -> str:
    """This process's command as the user typed it: ``python -m gptforge.data prepare ...``
    rather than the path of the module's file."""
    parts = Path(sys.argv[0]).with_suffix("").parts if sys.argv and sys.argv[0] else ()
    if "gptforge" in parts:
        module = list(parts[len(parts) - 1 - parts[::-1].index("gptforge"):])
        program = "python -m " + ".".join(module[:-1] if module[-1] == "__main__" else module)
    else:
        program = sys.argv[0] if sys.argv else "python"
    return " ".join([program, *sys.argv[1:]])


def _holder_text(raw: bytes) -> str:
    try:
        holder = json.loads(raw)
        return f"pid {holder['pid']} on {holder['host']} ({holder['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process"


class FolderLock:
    """An exclusive lock on a folder, for one writer (a prepare, a tokenizer training, an export)."""

    def __init__(self, folder: str | Path, purpose: str):
        self.folder, self.purpose = Path(folder), purpose
        self.path = lock_path(folder)
        self.took_over: str | None = None  # the holder of a lock whose process died, if there was one
        self._fd: int | None = None
        self._made: list[Path] = []

    def acquire(self) -> FolderLock:
        """Take the lock, or raise FolderBusyError (nothing written) if a live process holds it."""
        self._made = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder_text(os.pread(fd, 4096, 0))
                os.close(fd)
                raise FolderBusyError(f"{self.folder} is being written by {holder}; wait for it to finish, or "
                                      f"choose another folder (lock {self.path})") from None
            # a holder that released meanwhile unlinked the file we locked: lock the one now there
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = os.pread(fd, 4096, 0)
            self.took_over = _holder_text(previous) if previous.strip() else None
            owner = dict(pid=os.getpid(), host=socket.gethostname(), started=time.strftime("%Y-%m-%dT%H:%M:%S"),
                         command=f"{self.purpose}: {_command_line()[:300]}")
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
            self._fd = fd
            return self

    def release(self) -> None:
        """Unlink, then unlock: a waiting writer re-checks that its file is still the lock."""
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self._fd)
            self._fd = None
            for made in self._made:  # the folders acquire made for the lock, if nothing else went there
                try:
                    made.rmdir()
                except OSError:
                    break

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()


def busy_holder(folder: str | Path) -> str | None:
    """Who holds ``folder``'s lock right now, or None; creates nothing (a reader's check)."""
    try:
        fd = os.open(lock_path(folder), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder_text(os.pread(fd, 4096, 0))
    finally:
        os.close(fd)  # closing drops the shared lock taken just now
    return None


def check_replaceable(folder: str | Path, overwrite: bool, known: Iterable[str], what: str) -> bool:
    """Whether ``folder`` exists with something in it; a FolderError if writing ``what`` there
    would lose anything: an earlier one without ``overwrite``, or files ``what`` never writes."""
    folder = Path(folder)
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise FolderError(f"{folder} exists and is not a folder")
    held = sorted(p.name for p in folder.iterdir())
    if not held:
        return False
    strangers = [name for name in held if name not in set(known)]
    if strangers:
        raise FolderError(f"{folder} holds {strangers[0]}, which {what} does not write; it would be replaced whole: "
                          "choose another folder, or empty it first")
    if not overwrite:
        raise FolderError(f"{folder} already holds {what} ({', '.join(held)}); pass --overwrite to replace it whole")
    return True


def _leftovers(folder: Path) -> list[Path]:
    return [*folder.parent.glob(f".{folder.name}.tmp-*"), *folder.parent.glob(f".{folder.name}.old-*")]


@contextlib.contextmanager
def staged_folder(folder: str | Path) -> Iterator[Path]:
    """A fresh hidden sibling of ``folder`` to write into; when the block ends without an error
    it replaces ``folder`` whole (``exchange``), else it is removed. Call with the lock held:
    the staging folders of killed writers are removed first."""
    folder = Path(os.path.abspath(folder))
    for leftover in _leftovers(folder):
        if leftover.name.startswith(f".{folder.name}.old-") and not folder.exists():
            os.rename(leftover, folder)  # killed between the two renames of the fallback swap: put it back
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    try:
        yield tmp
        exchange(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the staging folder, or after the swap the old folder


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux 3.15+, glibc 2.28+); False where that is unavailable."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # a filesystem without exchange
        return False
    raise OSError(err, os.strerror(err), str(b))


def exchange(new: Path, folder: Path) -> None:
    """Put ``new`` in ``folder``'s place; the old folder, if any, ends up at ``new``'s path."""
    if not folder.exists():
        os.rename(new, folder)
    elif not _renameat2_exchange(new, folder):
        old = folder.parent / f".{folder.name}.old-{os.getpid()}"
        os.rename(folder, old)
        os.rename(new, folder)
        os.rename(old, new)
    fd = os.open(folder.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a power cut
    finally:
        os.close(fd)
