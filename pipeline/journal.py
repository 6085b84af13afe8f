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
import time
from pathlib import Path

from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock, JournalStorage

from pipeline.errors import PipelineError


class JournalError(PipelineError, ValueError):
    """A journal file broken in a way that cannot be repaired safely."""


def _check_records(path: Path, data: bytes, end: int) -> None:
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


def _cut_torn_tail(path: Path) -> tuple[int, Path] | None:
    """With the writer lock held: cut a partial last record off, keeping the bytes cut in a file beside
    the journal. (bytes cut, that file) or None when the tail is whole."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return None
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return None
        # The torn record is short: find the last newline from the end, a block at a time.
        end, block = size, 1 << 16
        while end > 0:
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            i = chunk.rfind(b"\n")
            if i >= 0:
                end = start + i + 1
                break
            end = start
        f.seek(end)
        torn = f.read()
        aside = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%dT%H%M%S')}-{time.time_ns() % 10**9}")
        aside.write_bytes(torn)
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
    return len(torn), aside


def repair_torn_tail(path: Path, log=print) -> Path | None:
    """Cut a partial last record off `path`; returns where the cut bytes were kept, or None when the journal
    was whole. Raises JournalError for a broken record before the last line. Reads without the lock (a
    read-only study directory can still be inspected); locks only to repair."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    _check_records(path, data, end)
    if end == len(data):
        return None
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        cut = _cut_torn_tail(path)  # again under the lock: a live writer's append may have completed it
    finally:
        lock.release()
    if cut is None:
        return None
    log(f"[study] {path}: its last record was cut off mid-write ({cut[0]} bytes, left by a kill or a full disk); "
        f"removed it and kept those bytes in {cut[1]}. Whatever that record said is redone (a finished run is not "
        "trained again).")
    return cut[1]


class RepairingJournalBackend(JournalFileBackend):
    """Optuna's journal file, whose every append first cuts a torn last record off (under the same lock):
    a full disk often lets part of a record through, and the next append (this process's heartbeat, another
    worker) would otherwise land on the same line and break the journal for every reader."""

    def append_logs(self, logs: list[dict]) -> None:
        self._lock.acquire()
        try:
            _cut_torn_tail(Path(self._file_path))
            text = "\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n"
            with open(self._file_path, "ab") as f:
                f.write(text.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
        finally:
            self._lock.release()


def open_journal(path: Path, log=print) -> JournalStorage:
    if path.is_dir():
        raise JournalError(f"the Optuna storage {path} is a directory: give a journal file in it (e.g. "
                           f"{path / 'optuna.journal'}) or a database URL such as postgresql+psycopg://…")
    repair_torn_tail(path, log)
    return JournalStorage(RepairingJournalBackend(str(path)))
