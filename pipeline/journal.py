"""Optuna's journal file, opened only once it is known to be whole.

A kill or a full disk in the middle of an append leaves a last record without its newline. Optuna
reads past it, but the next append lands on the same line, and from then on every read of the study
fails with a JSONDecodeError. So before a journal is used its tail is checked, under Optuna's own
writer lock (a worker mid-append is not mistaken for a torn tail): a partial last record is cut off
after the whole file is copied aside, and said so; a broken record before the end, which no append
can explain, is a clear error naming the file and the line, with what to do.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock, JournalStorage

from pipeline.errors import PipelineError


class JournalError(PipelineError, ValueError):
    """A journal file broken in a way that cannot be repaired safely."""


def repair_torn_tail(path: Path, log=print) -> Path | None:
    """Cut a partial last record off `path`; returns the copy of the journal as it was, or None when it
    was whole. Raises JournalError for a broken record before the last line."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        for number, line in enumerate(data[:end].splitlines(), start=1):
            try:
                json.loads(line)
            except ValueError:
                raise JournalError(
                    f"{path}, line {number}: not a valid Optuna journal record (the file was edited or damaged; a "
                    "torn last record is repaired on its own, this is not one). Restore the file from a backup, or "
                    "move it away to start the study's bookkeeping anew: finished runs stay in the study's trials/ "
                    "directory and are not trained again"
                ) from None
        if end == len(data):
            return None
        aside = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%dT%H%M%S')}")
        shutil.copyfile(path, aside)
        with open(path, "r+b") as f:
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
    finally:
        lock.release()
    log(f"[study] {path}: its last record was cut off mid-write ({len(data) - end} bytes, left by a kill or a full "
        f"disk); removed it and kept the journal as it was in {aside}. Whatever that record said is redone (a "
        "finished run is not trained again).")
    return aside


def open_journal(path: Path, log=print) -> JournalStorage:
    if path.is_dir():
        raise JournalError(f"the Optuna storage {path} is a directory: give a journal file in it (e.g. "
                           f"{path / 'optuna.journal'}) or a database URL such as postgresql+psycopg://…")
    repair_torn_tail(path, log)
    return JournalStorage(JournalFileBackend(str(path)))
