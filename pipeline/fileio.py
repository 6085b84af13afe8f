"""Crash-safe file writes: temp file in the same directory, fsync, rename over the target.

A crash at any moment leaves either the old file or the new one, never a torn one. Every
checkpoint, manifest, cache and result file of the pipeline goes through `atomic_write`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(f)` on a temp file next to `path`, then atomically replace `path` with it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        full = _disk_full(e, path.parent)  # before the partial file gives its space back
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
        raise


def _disk_full(e: BaseException, directory: Path) -> bool:
    """torch.save reports a full disk as RuntimeError('unexpected pos …'); name it for what it is."""
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT) and e.filename is None
    if not isinstance(e, RuntimeError):
        return False
    try:
        return shutil.disk_usage(directory).free < 64 * 2**20
    except OSError:
        return False


def remove_leftovers(directory: Path) -> list[Path]:
    """Delete the temp files of atomic writes a SIGKILL or power loss interrupted (an exception removes its
    own): up to a whole checkpoint each. Call only where no other process is writing (a run directory its
    stage owns)."""
    gone = []
    for tmp in Path(directory).glob(".*.tmp"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone


def atomic_write_bytes(path: Path, blob: bytes) -> None:
    atomic_write(path, lambda f: f.write(blob))


def atomic_write_json(obj, path: Path) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def atomic_torch_save(obj, path: Path) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))
