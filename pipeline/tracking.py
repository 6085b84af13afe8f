"""MLflow, and nothing else imports it: runs, buffered background metric logging, artifacts.

Per-step metrics arrive in blocks (the trainer buffers them on the device) and are written by a
background thread with ``log_batch``, so the training loop never waits on the store. A SIGKILL
loses what is still queued; on resume the trainer recomputes those steps and ``last_steps`` tells
it which points the store already holds, so no (metric, step) is ever written twice.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from pathlib import Path
from typing import Iterable

from pipeline import paths

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
from mlflow.entities import Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

_BATCH_LIMIT = 1000  # MLflow's cap on metrics per log_batch call
_PARAM_LIMIT = 100


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the project's SQLite store (absolute, so every stage agrees)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.mlflow_db()}"


def artifact_root() -> str:
    return paths.mlflow_artifacts().as_uri()


def client() -> MlflowClient:
    return MlflowClient(tracking_uri())


def get_or_create_experiment(name: str, c: MlflowClient | None = None) -> str:
    c = c or client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        # Without this, artifacts land in ./mlruns of whichever directory created the experiment.
        location = f"{artifact_root()}/{name}"
    try:
        return c.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and create.
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


class _MetricWriter(threading.Thread):
    """Drains blocks of Metric rows into log_batch calls off the training thread."""

    def __init__(self, c: MlflowClient, run_id: str):
        super().__init__(daemon=True, name=f"mlflow-writer-{run_id[:8]}")
        self.client, self.run_id = c, run_id
        self.q: queue.Queue[list[Metric] | None] = queue.Queue()
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            block = self.q.get()
            try:
                if block is None:
                    return
                if self.error is None:
                    for i in range(0, len(block), _BATCH_LIMIT):
                        self.client.log_batch(self.run_id, metrics=block[i : i + _BATCH_LIMIT], synchronous=True)
            except BaseException as e:  # surfaced to the trainer at the next flush()
                self.error = e
            finally:
                self.q.task_done()


class MlflowRun:
    """One MLflow run, created or re-attached; the trainer's tracking sink."""

    def __init__(
        self,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
    ):
        self.client = client()
        self.resumed = False
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
                self.resumed = True
            except mlflow.exceptions.MlflowException:
                run = None
            if run is not None:
                self.run_id = run.info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
        if not self.resumed:
            exp_id = get_or_create_experiment(experiment, self.client)
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
        elif tags:
            self.set_tags(tags)
        self._writer = _MetricWriter(self.client, self.run_id)
        self._writer.start()

    @property
    def url_hint(self) -> str:
        run = self.client.get_run(self.run_id)
        return f"experiment {run.info.experiment_id}, run {self.run_id}"

    def log_params(self, params: dict) -> None:
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), _PARAM_LIMIT):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAM_LIMIT])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, rows: Iterable[tuple[str, float, int]]) -> None:
        """Queue (key, value, step) points; returns at once."""
        now = int(time.time() * 1000)
        block = [Metric(k, float(v), now, int(s)) for k, v, s in rows]
        if block:
            self._writer.q.put(block)

    def flush(self) -> None:
        self._writer.q.join()
        if self._writer.error is not None:
            raise RuntimeError(f"logging metrics to MLflow failed: {self._writer.error}") from self._writer.error

    def last_steps(self, keys: Iterable[str]) -> dict[str, int]:
        """Largest step already stored per key (−1 where none): what a resumed run must not resend."""
        out = {}
        for k in keys:
            hist = self.client.get_metric_history(self.run_id, k)
            out[k] = max((m.step for m in hist), default=-1)
        return out

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
        try:
            self.flush()
        finally:
            self._writer.q.put(None)
            self._writer.join(timeout=60)
            if tags:
                self.set_tags(tags)
            self.client.set_terminated(self.run_id, status=RunStatus.to_string(RunStatus.from_string(status)))


class NullRun:
    """Tracking turned off: same interface, records nothing."""

    run_id = None
    resumed = False
    url_hint = "tracking disabled"

    def log_params(self, params): ...
    def set_tags(self, tags): ...
    def log_metrics(self, rows): ...
    def flush(self): ...
    def last_steps(self, keys):
        return {k: -1 for k in keys}

    def log_artifact(self, path, artifact_path=None): ...
    def end(self, status="FINISHED", tags=None): ...


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) points of one metric, in step order: for tests and reports."""
    return sorted((m.step, m.value) for m in client().get_metric_history(run_id, key))


def get_run(run_id: str):
    return client().get_run(run_id)
