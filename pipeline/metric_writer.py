"""The metric writer process: blocks of per-step points from a trainer → the tracking store.

Its own module, importing neither MLflow nor torch on its fast path, because the process is spawned
once per trainer and imports its target's module: importing MLflow (~3 s of CPU) used to delay the
first epoch's checkpoint, which waits for the writer (bench/RESULTS.md, "Training throughput").
"""

from __future__ import annotations

import os
import queue
import signal
import sys

from pipeline.metric_store import open_fast_store, sqlite_path

_BATCH_LIMIT = 1000  # MLflow's cap on metrics per log_batch call


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when its parent dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # elsewhere the parent-pid check in the loop does the job within a second


_POINTS_PER_TRANSACTION = 50_000  # drained blocks stored together; the store's write lock held < ~0.5 s


def _api_write(c, run_id: str, ts: int, columns: list) -> None:
    from mlflow.entities import Metric

    metrics = [Metric(key, v, ts, first + i) for key, first, values in columns for i, v in enumerate(values)]
    for i in range(0, len(metrics), _BATCH_LIMIT):
        c.log_batch(run_id, metrics=metrics[i : i + _BATCH_LIMIT], synchronous=True)


def writer_main(uri: str, blocks, errors, n_errors, sent, done, parent_pid: int, fast: bool) -> None:
    """The writer process: blocks (run_id, timestamp_ms, [(key, first_step, [value, …]), …]) → the store.

    On a SQLite store whose schema pipeline.metric_store knows, blocks go in with bulk inserts, all the
    blocks waiting in the queue in one transaction (bench/RESULTS.md: ~25× log_batch); elsewhere through
    `log_batch`. At the lowest CPU priority, so the store's work fills the gaps the trainer's threads
    leave instead of preempting them.
    """
    _die_with_parent()
    # Ctrl-C reaches the whole process group; the trainer handles it and ends its run, which flushes this
    # writer first, so the writer must not die of it mid-batch (nor print a traceback). SIGTERM keeps its
    # default: multiprocessing ends this daemon with it when the trainer exits.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.nice(19)
    except OSError:
        pass
    store, why_not = open_fast_store(uri) if fast else (None, "")
    if fast and store is None and sqlite_path(uri) is not None:
        print(f"[tracking] storing metrics through MLflow's API (slower): {why_not}", file=sys.stderr, flush=True)
    if store is None:
        from mlflow.tracking import MlflowClient  # seconds to import: only where the API is used

        c = MlflowClient(uri)
    failed_runs: set[str] = set()
    received = 0

    def fail(run_id: str, message: str) -> None:
        failed_runs.add(run_id)
        errors.put((run_id, message))
        # Counted before `done`: once a flush has seen a block done, the trainer knows how many error
        # reports are on their way (a queue's put returns before the item can be read).
        with n_errors.get_lock():
            n_errors.value += 1

    while True:
        try:
            item = blocks.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != parent_pid:
                return  # orphaned: the trainer died, and a resume resends what is missing
            continue
        batch, stop, points = [], item is None, 0
        while item is not None:
            batch.append(item)
            received += 1
            points += sum(len(values) for _, _, values in item[2])
            # One transaction for every block the trainer has put so far (those still in the pipe too):
            # a commit costs as much as ~1,000 points, so a writer that fell behind catches up.
            if store is None or points >= _POINTS_PER_TRANSACTION or received >= sent.value:
                break
            try:
                item = blocks.get(timeout=1.0)
            except queue.Empty:
                break
            stop = item is None
        # Never store points after a gap: a resume resends from the first missing step.
        todo = [b for b in batch if b[0] not in failed_runs]
        try:
            if store is not None:
                for run_id, reason in (store.write(todo) if todo else {}).items():
                    fail(run_id, f"MlflowException: {reason}")
            else:
                for run_id, ts, columns in todo:
                    if run_id not in failed_runs:
                        try:
                            _api_write(c, run_id, ts, columns)
                        except Exception as e:  # reported to the trainer, which stops and can resume later
                            fail(run_id, f"{type(e).__name__}: {e}")
        except Exception as e:  # the database refused the whole transaction
            for run_id in {b[0] for b in todo}:
                fail(run_id, f"{type(e).__name__}: {e}")
        finally:
            with done.get_lock():
                done.value += len(batch)
        if stop:
            return
