"""MLflow runs, background metric logging, artifacts, reading a study back.

Per-step metrics arrive in blocks (the trainer buffers them on the device) and are written by a
background process (pipeline.metric_writer), so the training loop never waits on the store: into a
local SQLite store with bulk inserts (pipeline.metric_store), elsewhere with ``log_batch``. The trainer
flushes before each checkpoint; a SIGKILL loses only points after it (the writer dies with its
trainer), which a resume recomputes, and ``last_steps`` tells it which points the store already
holds, so no (metric, step) is ever written twice. MLflow is imported here and, on its API path
only, by the writer process."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipeline import paths
from pipeline.errors import PipelineError, masked
from pipeline.metric_writer import writer_main

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# With a tracking server MLflow prints a "View run" URL at every run end: noise in worker logs, and
# the URL is the server's as configured (it could carry credentials).
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import mlflow  # noqa: E402
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402


class TrackingError(PipelineError, RuntimeError):
    """The tracking store cannot be used; the message names it (credentials masked) and what to do."""


_PARAM_LIMIT = 100

# The experiment tag MLflow 3's UI reads for an experiment's kind, and the value its own kind selector
# writes for model training (mlflow/server/js: "mlflow.experimentKind", "custom_model_development").
# Without it the UI infers the kind and offers a new experiment as GenAI work (traces, token usage).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"
# Kinds that are the UI's guesses, not anyone's choice: replaced. A kind someone chose is kept.
_GUESSED_KINDS = ("", "no_inferred_type", "genai_development_inferred", "custom_model_development_inferred")
# `make ui` / `python -m pipeline ui` serve here unless told another port.
DEFAULT_UI_PORT = 5000
# MLflow keeps at most 36 characters of a dataset digest (mlflow/utils/validation.py,
# MAX_DATASET_DIGEST_SIZE): the manifest's SHA-256 is shown by its first 12 hex digits, as a short git
# commit is; the whole hash is in the dataset's profile and the run's dataset_manifest_sha256 tag.
DATASET_DIGEST_CHARS = 12


@dataclass(frozen=True)
class UiLinks:
    """Where the MLflow UI shows an experiment's runs and one run's metric charts."""

    runs: str
    run_metrics: str | None
    served: bool  # the tracking server serves this UI itself; False: it is `make ui`'s, open it first


def ui_links(tracking_uri: str, experiment_id: str, run_id: str | None = None,
             ui_port: int = DEFAULT_UI_PORT) -> UiLinks:
    """Links into the MLflow UI, in its model-training workflow: MLflow 3 opens an experiment in its
    GenAI workflow unless the URL says `workflowType=machine_learning` (the UI then keeps that choice).

    An http(s) tracking URI is a server that serves the UI itself (credentials, query and fragment
    dropped); any other store is seen through `make ui` on 127.0.0.1:`ui_port`. The run link opens its
    "Model metrics" tab (route `#/experiments/<id>/runs/<run>/model-metrics` of MLflow 3.17's UI).
    """
    parts = urlsplit(tracking_uri)
    served = parts.scheme in ("http", "https")
    if served:
        base = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path.rstrip("/"), "", ""))
    else:
        base = f"http://127.0.0.1:{ui_port}"
    workflow = "workflowType=machine_learning"
    runs = f"{base}/#/experiments/{experiment_id}/runs?{workflow}"
    metrics = f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{workflow}" if run_id else None
    return UiLinks(runs, metrics, served)


def dataset_digest(manifest_sha256: str) -> str:
    """The digest MLflow shows next to the dataset's name: the manifest's SHA-256, shortened to fit."""
    return manifest_sha256[:DATASET_DIGEST_CHARS]


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else the project's SQLite store (absolute, so every stage agrees)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{paths.mlflow_db()}"


def artifact_root() -> str:
    return paths.mlflow_artifacts().as_uri()


def client() -> MlflowClient:
    uri = tracking_uri()
    ensure_store(uri)
    return MlflowClient(uri)


def ensure_store(uri: str) -> None:
    """Create a new SQLite store crash-safely. MLflow builds its schema with a few dozen migrations in
    place; a kill, Ctrl-C or full disk in the middle left a store every later command failed on (alembic:
    `table datasets already exists`), and two commands starting on a fresh home raced the same
    migrations. Here the store is built in a temporary file next to it and renamed into place, under a
    lock: a kill at any moment leaves no store or a whole one. Other stores (a server, PostgreSQL) are
    the server's or the operator's to create."""
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if not _store_complete(db):  # one stat on the common path
        import fcntl

        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(db.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not _store_complete(db):
                for leftover in db.parent.glob(db.name + ".creating-*"):  # a dead attempt's: we hold the lock
                    leftover.unlink(missing_ok=True)
                # A name of its own per attempt: MLflow caches engines by URI, and one still open on an
                # earlier attempt's file (deleted above) would see its database "moved".
                tmp = db.with_name(f"{db.name}.creating-{os.getpid()}-{time.time_ns()}")
                from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

                store = SqlAlchemyStore(f"sqlite:///{tmp}", artifact_root())
                store.engine.dispose()
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, db)
                fd = os.open(db.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)


def _store_complete(db: Path) -> bool:
    # SQLite creates an empty file on connect: only a non-empty file is a store someone finished.
    try:
        return db.stat().st_size > 0
    except OSError:
        return False


def check_reachable(timeout: float = 5.0) -> None:
    """Fail before any training, with one clear message, when the tracking store cannot be reached."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(uri)  # credentials go in MLFLOW_TRACKING_USERNAME/PASSWORD, not the URL
        health = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])).rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout) as r:
                if r.status == 200:
                    return
                reason = f"HTTP {r.status}"
        except urllib.error.HTTPError as e:
            reason = f"HTTP {e.code} {e.reason}"
        except OSError as e:
            reason = str(getattr(e, "reason", e))
        raise TrackingError(
            f"cannot reach the MLflow tracking server {masked(uri)}: {masked(reason)}\n"
            "  check that it is running (make server starts one on 127.0.0.1), the host and port in "
            "MLFLOW_TRACKING_URI, and any proxy or firewall between here and there"
        )
    if uri.startswith("postgresql"):
        from pipeline.services import use_pgpass

        use_pgpass()
        try:
            client().search_experiments(max_results=1)
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TrackingError(
                f"cannot open the MLflow store {masked(uri)}: {masked(first)}\n"
                "  check that the database server runs, the database exists, and the credentials (PGPASSFILE)"
            ) from None


def get_or_create_experiment(name: str, c: MlflowClient | None = None) -> str:
    """The experiment's id, created if needed; either way tagged as model training (see EXPERIMENT_KIND_TAG)."""
    c = c or client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        mark_model_development(exp, c)
        return exp.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:"):
        # Without this, artifacts land in ./mlruns of whichever directory created the experiment.
        location = f"{artifact_root()}/{name}"
    try:
        return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_DEVELOPMENT})
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and create.
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        mark_model_development(exp, c)
        return exp.experiment_id


def mark_model_development(exp, c: MlflowClient) -> None:
    """Tag an experiment as model training unless it says so, or someone chose another kind for it:
    experiments created before the tag existed get it the next time a command opens them."""
    if exp.tags.get(EXPERIMENT_KIND_TAG, "") in _GUESSED_KINDS:
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_DEVELOPMENT)


def experiment_links(experiment: str, run_id: str | None = None, ui_port: int = DEFAULT_UI_PORT) -> UiLinks | None:
    """The UI links of an existing experiment (and one of its runs), tagging it as model training on the
    way; None when the store has no such experiment."""
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage != "active":
        return None
    mark_model_development(exp, c)
    return ui_links(tracking_uri(), exp.experiment_id, run_id, ui_port)


def pipeline_experiments(limit: int = 20, name: str | None = None) -> list[tuple[str, str, str, str]]:
    """(name, id, run to show, what that run is) of the store's experiments that hold this pipeline's runs
    (they carry a run_dir tag), most recently updated first (or only the one called `name`), each tagged
    as model training. The run to show is a study's best run (its parent run's best_run_id tag), else the
    latest run."""
    c = client()
    if name is not None:
        exp = c.get_experiment_by_name(name)
        candidates = [exp] if exp is not None and exp.lifecycle_stage == "active" else []
    else:
        candidates = c.search_experiments(order_by=["last_update_time DESC"], max_results=200)
    found = []
    for exp in candidates:
        if len(found) == limit:
            break
        latest = c.search_runs([exp.experiment_id], "tags.run_dir LIKE '%'", max_results=1,
                               order_by=["attributes.start_time DESC"])
        if not latest:
            continue
        mark_model_development(exp, c)
        parent = c.search_runs([exp.experiment_id], "tags.`role` = 'study'", max_results=1)
        best = parent[0].data.tags.get("best_run_id") if parent else None
        found.append((exp.name, exp.experiment_id, *((best, "the best config's run") if best
                                                     else (latest[0].info.run_id, "the latest run"))))
    return found


class _MetricWriter:
    """A writer process for one tracking store, shared by the runs of this process.

    A process, not a thread: in a thread, the store's Python work holds the GIL against the
    training loop's own Python (measured: the whole writer cost then lands on the loop).
    """

    def __init__(self, uri: str, fast: bool = True):
        ctx = mp.get_context("spawn")  # fork would clone the trainer's threads and DB connections
        self.uri, self.fast = uri, fast
        self.blocks = ctx.Queue(maxsize=10_000)  # bounded: a trainer far ahead of the store waits
        self.errors = ctx.Queue()
        self.n_errors = ctx.Value("q", 0)  # error reports put so far; self.received of them read
        self.received = 0
        self.done = ctx.Value("q", 0)
        self.sent = ctx.Value("q", 0)  # blocks put so far: the writer drains all of them per transaction
        self.failed: dict[str, str] = {}
        self.proc = ctx.Process(
            target=writer_main,
            args=(uri, self.blocks, self.errors, self.n_errors, self.sent, self.done, os.getpid(), fast),
            name="mlflow-metric-writer",
            daemon=True,
        )
        self.proc.start()

    def put(self, run_id: str, ts: int, columns: list) -> None:
        self.blocks.put((run_id, ts, columns))
        with self.sent.get_lock():
            self.sent.value += 1

    def error_for(self, run_id: str) -> str | None:
        while self.received < self.n_errors.value:
            try:  # counted, so in transit: wait for it (a dead writer's last report may never come)
                rid, msg = self.errors.get(timeout=5.0 if self.proc.is_alive() else 0.5)
            except queue.Empty:
                break
            self.received += 1
            self.failed.setdefault(rid, msg)
        return self.failed.get(run_id)

    def flush(self) -> None:
        """Wait until every block sent so far is stored (or has failed)."""
        while self.done.value < self.sent.value:
            if not self.proc.is_alive():
                raise TrackingError(
                    "the MLflow writer process died, so recent metric points were not stored; "
                    "rerun the same command to resume from the last checkpoint"
                )
            time.sleep(0.005)

    def close(self) -> None:
        if self.proc.is_alive():
            self.blocks.put(None)
            self.proc.join(timeout=60)
        if self.proc.is_alive():
            self.proc.kill()


_writers: dict[str, _MetricWriter] = {}


def _writer_for(uri: str, fast: bool | None = None) -> _MetricWriter:
    """The writer of `uri`, started if needed; `fast` False forces MLflow's API (benchmarks, tests)."""
    w = _writers.get(uri)
    if w is None or not w.proc.is_alive() or (fast is not None and w.fast != fast):
        for other in list(_writers.values()):  # one store at a time; don't leave idle writers around
            other.flush()
            other.close()
        _writers.clear()
        w = _writers[uri] = _MetricWriter(uri, fast=fast is not False)
    return w


class MlflowRun:
    """One MLflow run, created or re-attached; the trainer's tracking sink."""

    def __init__(
        self,
        experiment: str,
        run_name: str | None = None,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        parent_run_id: str | None = None,
        mark_running: bool = True,
    ):
        self.client = client()
        self.resumed = False
        self.store_wait_s = 0.0  # time the trainer spent waiting for the store: queue full, or flushing
        if run_id is not None:
            try:
                run = self.client.get_run(run_id)
                self.resumed = True
            except mlflow.exceptions.MlflowException as e:
                if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise TrackingError(f"cannot reach the MLflow store {masked(tracking_uri())}: {masked(str(e))}") from None
                run = None  # the store answered: no such run
            if run is not None:
                self.run_id = run.info.run_id
                if mark_running:
                    self.client.update_run(self.run_id, status="RUNNING")
        if not self.resumed:
            all_tags = dict(tags or {})
            if parent_run_id:
                all_tags["mlflow.parentRunId"] = parent_run_id
            try:
                exp_id = get_or_create_experiment(experiment, self.client)
                self.run_id = self.client.create_run(exp_id, run_name=run_name, tags=all_tags).info.run_id
            except mlflow.exceptions.MlflowException as e:
                raise TrackingError(
                    f"cannot create a run in the MLflow store {masked(tracking_uri())}: {masked(str(e))}\n"
                    "check that the tracking server is up and the URI is right, or unset MLFLOW_TRACKING_URI "
                    "to use the local store"
                ) from None
        elif tags:
            self.set_tags(tags)
        self._writer = _writer_for(tracking_uri())

    def log_params(self, params: dict) -> None:
        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), _PARAM_LIMIT):
            self.client.log_batch(self.run_id, params=items[i : i + _PARAM_LIMIT])

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def _raise_if_failed(self) -> None:
        msg = self._writer.error_for(self.run_id)
        if msg is not None:
            raise TrackingError(
                f"storing metrics in {masked(tracking_uri())} failed: {msg}; "
                "rerun the same command to resume from the last checkpoint"
            )

    def log_metrics(self, rows: Iterable[tuple[str, float, int]]) -> None:
        """Queue (key, value, step) points; returns at once unless storing earlier ones failed."""
        self._raise_if_failed()  # stop now: a resume resends from the last checkpoint
        columns = [(k, int(s), [float(v)]) for k, v, s in rows]
        if columns:
            self._put(columns)

    def log_columns(self, columns: list[tuple[str, int, list[float]]]) -> None:
        """Queue (key, first_step, [value, …]) columns of consecutive steps: the trainer's per-step blocks."""
        self._raise_if_failed()
        columns = [(k, int(first), values) for k, first, values in columns if values]
        if columns:
            self._put(columns)

    def _put(self, columns: list) -> None:
        t0 = time.perf_counter()
        self._writer.put(self.run_id, int(time.time() * 1000), columns)  # waits only when the queue is full
        self.store_wait_s += time.perf_counter() - t0

    def flush(self) -> None:
        t0 = time.perf_counter()
        self._writer.flush()
        self.store_wait_s += time.perf_counter() - t0
        self._raise_if_failed()

    def last_steps(self, keys: Iterable[str]) -> dict[str, int]:
        """Largest step already stored per key (−1 where none): what a resumed run must not resend."""
        keys = list(keys)
        engine = _sql_engine(self.client)
        if engine is None:  # a tracking server
            return {k: max((m.step for m in self.client.get_metric_history(self.run_id, k)), default=-1)
                    for k in keys}
        from sqlalchemy import bindparam, text

        query = text("SELECT key, MAX(step) FROM metrics WHERE run_uuid = :run AND key IN :keys GROUP BY key")
        with engine.connect() as conn:
            found = dict(conn.execute(query.bindparams(bindparam("keys", expanding=True)),
                                      {"run": self.run_id, "keys": keys}).all())
        return {k: int(found[k]) if found.get(k) is not None else -1 for k in keys}

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dataset_input(self, name: str, manifest_sha256: str, prepared_dir: str | Path, manifest: dict) -> bool:
        """Record the prepared dataset as the run's input (the UI's Dataset column), once: a resumed run
        that has it already is left alone. Returns whether it was logged now."""
        digest = dataset_digest(manifest_sha256)
        have = self.client.get_run(self.run_id).inputs.dataset_inputs
        if any(d.dataset.name == name and d.dataset.digest == digest for d in have):
            return False
        # source_type "local" with {"uri": …} is how MLflow's own local dataset source records a path.
        profile = {"manifest_sha256": manifest_sha256, "original_source": manifest.get("source"),
                   "counts": manifest.get("counts"), "val_size": manifest.get("val_size"),
                   "split_seed": manifest.get("split_seed"), "splits_sha256": manifest.get("splits_sha256")}
        dataset = Dataset(name=name, digest=digest, source_type="local",
                          source=json.dumps({"uri": str(prepared_dir)}), profile=json.dumps(profile))
        self.client.log_inputs(self.run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "train")])])
        return True

    def end(self, status: str = "FINISHED", tags: dict[str, str] | None = None) -> None:
        """Store every queued point, then close the run with `status` (FAILED if points were lost)."""
        error = None
        try:
            self.flush()
        except TrackingError as e:
            error = e
        lost_points = error is not None and status == "FINISHED"
        if lost_points:
            status, tags = "FAILED", {**(tags or {}), "failure_reason": "tracking_error"}
        if tags:
            self.set_tags(tags)
        if status == "FINISHED":
            # A resumed run that finishes is no longer failed: drop what an earlier attempt recorded.
            stale = {"failure_reason", "diverged_at_step"} & set(self.client.get_run(self.run_id).data.tags)
            for key in stale:
                self.client.delete_tag(self.run_id, key)
        self.client.set_terminated(self.run_id, status=RunStatus.to_string(RunStatus.from_string(status)))
        if lost_points:
            raise error


def end_orphans(experiment: str, run_dir: str, keep: str) -> list[str]:
    """End the RUNNING runs of `run_dir` other than `keep`: attempts killed between creating their MLflow
    run and recording it in run.json, which nothing would ever re-attach."""
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    quoted = f'"{run_dir}"' if "'" in run_dir else f"'{run_dir}'"  # MLflow's filter has no escapes
    found = c.search_runs([exp.experiment_id], f"tags.run_dir = {quoted} and attributes.status = 'RUNNING'")
    ended = []
    for run in found:
        if run.info.run_id != keep:
            c.set_tag(run.info.run_id, "failure_reason", "orphaned")
            c.set_terminated(run.info.run_id, status="KILLED")
            ended.append(run.info.run_id)
    return ended


def reopen_run(run_id: str) -> MlflowRun | None:
    """Attach to an existing run to add results without changing its status; None if it is gone."""
    try:
        client().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    return MlflowRun("", run_id=run_id, mark_running=False)


class NullRun:
    """Tracking turned off: same interface, records nothing."""

    run_id = None
    resumed = False
    store_wait_s = 0.0

    def log_params(self, params): ...
    def set_tags(self, tags): ...
    def log_metrics(self, rows): ...
    def log_columns(self, columns): ...
    def flush(self): ...
    def last_steps(self, keys):
        return {k: -1 for k in keys}

    def log_artifact(self, path, artifact_path=None): ...
    def log_dataset_input(self, name, manifest_sha256, prepared_dir, manifest):
        return False

    def end(self, status="FINISHED", tags=None): ...


def record_changes(run_id: str, metrics: dict[str, float], tags: dict[str, str], step: int) -> list[str]:
    """Log the metrics whose latest value differs (at `step`) and set the tags that differ: rerunning
    with the same numbers writes nothing. Returns the keys written."""
    c = client()
    data = c.get_run(run_id).data
    now = int(time.time() * 1000)
    points = [Metric(k, float(v), now, step) for k, v in metrics.items()
              if v == v and data.metrics.get(k) != float(v)]  # v == v: NaN is never written
    changed = [RunTag(k, str(v)) for k, v in tags.items() if data.tags.get(k) != str(v)]
    if points or changed:
        c.log_batch(run_id, metrics=points, tags=changed)
    return [m.key for m in points] + [t.key for t in changed]


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) points of one metric, in step order: for tests and reports."""
    return sorted((m.step, m.value) for m in client().get_metric_history(run_id, key))


def get_run(run_id: str):
    return client().get_run(run_id)


# --- reading a study back (the report stage) ---------------------------------------------------
def study_runs(experiment: str, study: str | None = None) -> list[dict]:
    """Every run of an experiment (with the tag `study` = `study` when given), as plain records:
    {run_id, status, start_ms, end_ms, tags, params, metrics} with each metric's latest value."""
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    where = f"tags.`study` = '{study}'" if study else ""
    records, token = [], None
    while True:
        page = c.search_runs([exp.experiment_id], filter_string=where, max_results=1000, page_token=token)
        for r in page:
            records.append({"run_id": r.info.run_id, "status": r.info.status, "start_ms": r.info.start_time,
                            "end_ms": r.info.end_time, "tags": dict(r.data.tags), "params": dict(r.data.params),
                            "metrics": dict(r.data.metrics)})
        token = page.token
        if not token:
            return records


def _sql_engine(c: MlflowClient):
    """The SQLAlchemy engine of a SQL store opened directly; None for a tracking server."""
    return getattr(getattr(getattr(c, "_tracking_client", None), "store", None), "engine", None)


def binned_metric_histories(run_ids: list[str], keys: list[str], bins: int) -> list[tuple[str, str, float, float]]:
    """(run_id, key, mean step, mean value) per step bin, NaN points left out. The bins have one width
    for all runs, ⌈(longest run's last step + 1) / bins⌉, so curves of one study share their x grid.

    For plotting thousands of steps per run. On a SQL store the averaging happens in the database, so
    a study's 10⁷ points never cross into Python (that, more than the query, is what costs seconds):
    on SQLite one query per run, in a few threads (SQLite sorts a GROUP BY on an expression, and one
    sort of a 1,000-run study's 2·10⁷ points cost 3× the per-run sorts: bench/RESULTS.md, "Report at
    scale"), on a server database one query per 500 runs. Elsewhere (a tracking server) each run's
    history is fetched.
    """
    if not run_ids or not keys:
        return []
    c = client()
    engine = _sql_engine(c)
    if engine is None:  # a tracking server: one call per (run, key), several in flight (they wait on the network)
        from concurrent.futures import ThreadPoolExecutor

        pairs = [(rid, key) for rid in run_ids for key in keys]
        with ThreadPoolExecutor(max_workers=8) as pool:
            histories = pool.map(lambda p: c.get_metric_history(*p), pairs)
            points = [(rid, key, m.step, m.value) for (rid, key), hist in zip(pairs, histories)
                      for m in hist if m.value == m.value]
        if not points:
            return []
        width = -(-(max(p[2] for p in points) + 1) // bins)
        sums: dict[tuple, list[float]] = {}
        for rid, key, step, value in points:
            acc = sums.setdefault((rid, key, step // width), [0.0, 0.0, 0])
            acc[0], acc[1], acc[2] = acc[0] + step, acc[1] + value, acc[2] + 1
        return [(rid, key, a[0] / a[2], a[1] / a[2]) for (rid, key, _), a in sorted(sums.items())]
    from sqlalchemy import bindparam, exc, text

    def run(sql: str, params: dict) -> list:
        # SQLite otherwise scans the (key, …) primary key, i.e. every study's points of that key.
        hinted = sql.replace("FROM metrics", "FROM metrics INDEXED BY index_metrics_run_uuid_key_step")
        query = text(hinted if engine.dialect.name == "sqlite" else sql)
        query = query.bindparams(bindparam("keys", expanding=True), bindparam("runs", expanding=True))
        with engine.connect() as conn:
            try:
                return list(conn.execute(query, params))
            except exc.OperationalError:  # an older schema without that index
                plain = text(sql).bindparams(bindparam("keys", expanding=True), bindparam("runs", expanding=True))
                return list(conn.execute(plain, params))

    chunks = [list(run_ids[i : i + 500]) for i in range(0, len(run_ids), 500)]
    last = max((r[0] for ch in chunks for r in run("SELECT MAX(step) FROM metrics WHERE run_uuid IN :runs AND "
                                                 "key IN :keys", {"runs": ch, "keys": list(keys)})
                if r[0] is not None), default=None)
    if last is None:
        return []
    width = -(-(int(last) + 1) // bins)
    rows = []
    if engine.dialect.name == "sqlite":
        from concurrent.futures import ThreadPoolExecutor

        sql = ("SELECT run_uuid, key, AVG(step), AVG(value) FROM metrics WHERE run_uuid = :run AND key IN :keys "
               "AND is_nan = :false GROUP BY key, step / :width")
        hinted = text(sql.replace("FROM metrics", "FROM metrics INDEXED BY index_metrics_run_uuid_key_step"))
        plain = text(sql)

        def runs_of(share: list[str]) -> list:  # one connection per thread; SQLite releases the GIL while it works
            out: list = []
            with engine.connect() as conn:
                query = hinted
                for rid in share:
                    params = {"run": rid, "keys": list(keys), "false": False, "width": width}
                    try:
                        out += conn.execute(query.bindparams(bindparam("keys", expanding=True)), params).all()
                    except exc.OperationalError:  # an older schema without that index
                        if query is plain:
                            raise
                        query = plain
                        out += conn.execute(query.bindparams(bindparam("keys", expanding=True)), params).all()
            return out

        n = max(1, min(4, os.cpu_count() or 1, len(run_ids)))
        with ThreadPoolExecutor(max_workers=n) as pool:
            for part in pool.map(runs_of, [list(run_ids[i::n]) for i in range(n)]):
                rows += part
    else:
        for ch in chunks:
            rows += run("SELECT run_uuid, key, AVG(step), AVG(value) FROM metrics WHERE key IN :keys AND run_uuid IN :runs "
                        "AND is_nan = :false GROUP BY run_uuid, key, step / :width",
                        {"keys": list(keys), "runs": ch, "false": False, "width": width})
    return sorted((r, k, float(st), float(v)) for r, k, st, v in rows)


def study_parent_run(experiment: str) -> str | None:
    """The id of the study's parent run (tag role=study), if the experiment has one."""
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], filter_string="tags.`role` = 'study'", max_results=1)
    return runs[0].info.run_id if runs else None


def download_artifact(run_id: str, path: str, dst_dir: str | Path) -> Path | None:
    """One artifact of a run copied into `dst_dir`; None when the run does not have it."""
    try:
        return Path(client().download_artifacts(run_id, path, str(dst_dir)))
    except (mlflow.exceptions.MlflowException, OSError):
        return None


def log_artifact_dir(run_id: str, local_dir: str | Path, artifact_path: str | None = None) -> None:
    """Upload a directory's files into an existing run (its status is left alone)."""
    client().log_artifacts(run_id, str(local_dir), artifact_path)
