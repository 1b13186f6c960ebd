"""Files written all at once or not at all: a temporary name beside the file, then a rename.

An interrupted run never leaves a half-written file under the real name.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


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
