"""Running studies with Optuna (the only Optuna importer): storage, claims, heartbeats, resume.

Fixed designs (grid, ofat) are run as an explicit list of logical trials (studyspec.expand_trials).
Each Optuna trial carries its logical index as a user attribute; a worker claims the first index
that is neither done nor held by a live worker, under a file lock, by enqueuing that point and
asking for it. Optuna's GridSampler is not used: it counts failed points as visited and reruns a
finished grid once more on resume.

A logical trial's identity on disk is its run directory (index + config hash). A trial whose worker
died is marked FAIL (`failure_reason=worker_died`) and its index is claimed again; the new attempt
finds the same run directory, so training resumes from the last checkpoint **into the same MLflow
run**. Liveness comes from heartbeat files (Optuna's own heartbeat exists for RDB storages only):
the pid and host of the worker, touched every few seconds.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from pipeline import paths
from pipeline.errors import PipelineError
from pipeline.fileio import atomic_write_json
from pipeline.studyspec import StudySpec, TrialSpec, expand_trials, point_key
from pipeline.train import train_stage

HEARTBEAT_EVERY_S = 5.0
STALE_AFTER_S = 60.0
# Failed trials that are results, not accidents: rerunning cannot change them, so they count as done.
DONE_FAILURES = ("diverged", "objective_missing")


class StudyError(PipelineError, RuntimeError):
    """A study cannot be run as asked; the message says why and what to do."""


def study_dir(spec: StudySpec) -> Path:
    return paths.runs_dir() / spec.name


def open_storage(spec: StudySpec, storage: str | None):
    """The given storage URL, else a journal file in the study's directory (safe for several
    processes on one machine, unlike SQLite)."""
    if storage is None:
        d = study_dir(spec)
        d.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(d / "optuna.journal")))
    if "://" in storage:
        return optuna.storages.RDBStorage(storage)
    return JournalStorage(JournalFileBackend(storage))


def open_study(spec: StudySpec, storage=None) -> optuna.Study:
    directions = [o.direction for o in spec.objectives]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=spec.name, storage=storage or open_storage(spec, None),
                                directions=directions, load_if_exists=True)
    stored = [d.name.lower() for d in study.directions]
    if stored != directions:
        raise StudyError(
            f"study {spec.name!r} already exists in this storage with directions {stored}, the file now says "
            f"{directions}; rename the study or delete {study_dir(spec)} to start over"
        )
    return study


# --- liveness ------------------------------------------------------------------------------------
def _heartbeat_path(spec: StudySpec, trial_number: int) -> Path:
    return study_dir(spec) / "heartbeats" / f"{trial_number}.json"


class Heartbeat(threading.Thread):
    """Touches a file naming this worker (host, pid) until stopped."""

    def __init__(self, path: Path, every: float = HEARTBEAT_EVERY_S):
        super().__init__(daemon=True, name=f"heartbeat-{path.stem}")
        self.path, self.every = path, every
        self._halt = threading.Event()
        self.beat()

    def beat(self) -> None:
        atomic_write_json({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, self.path)

    def run(self) -> None:
        while not self._halt.wait(self.every):
            self.beat()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_alive(path: Path, stale_after: float = STALE_AFTER_S) -> bool:
    """A heartbeat from this host is alive iff its process is; from another host, iff it is fresh."""
    try:
        beat = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if beat.get("host") == socket.gethostname():
        return _pid_alive(int(beat["pid"]))
    return time.time() - path.stat().st_mtime < stale_after


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- claiming trials -----------------------------------------------------------------------------
@dataclass
class Progress:
    total: int
    done: set[int]
    running: set[int]
    failed: dict[int, str]


def scan(study: optuna.Study, spec: StudySpec, total: int, reap: bool = True) -> Progress:
    """Which logical trials are done, running (live worker) or failed; dead workers' trials are reaped."""
    done, running, failed = set(), set(), {}
    for t in study.get_trials(deepcopy=False):
        idx = t.user_attrs.get("trial_index")
        if idx is None:
            continue
        reason = t.user_attrs.get("failure_reason")
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            done.add(idx)
        elif t.state == TrialState.FAIL and reason in DONE_FAILURES:
            done.add(idx)
            failed[idx] = reason
        elif t.state == TrialState.RUNNING:
            if worker_alive(_heartbeat_path(spec, t.number)):
                running.add(idx)
            elif reap:
                study._storage.set_trial_user_attr(t._trial_id, "failure_reason", "worker_died")
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
                _heartbeat_path(spec, t.number).unlink(missing_ok=True)
        elif t.state == TrialState.WAITING and reap:
            # Enqueued by a worker that died before asking for it: retire it, its index stays open.
            study._storage.set_trial_user_attr(t._trial_id, "failure_reason", "abandoned")
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    return Progress(total, done, running - done, failed)


def claim(study: optuna.Study, spec: StudySpec, trials: list[TrialSpec],
          skip: set[int] = frozenset()) -> tuple[optuna.Trial, TrialSpec] | None:
    """Atomically (on this machine) take the first open logical trial; None when none is left.

    `skip`: indices this worker already attempted in this session (an error is not retried in a loop).
    """
    with _locked(study_dir(spec) / "claim.lock"):
        progress = scan(study, spec, len(trials))
        for ts in trials:
            if ts.index in progress.done or ts.index in progress.running or ts.index in skip:
                continue
            params = {**ts.point, "seed": ts.seed}
            study.enqueue_trial(params, user_attrs={"trial_index": ts.index, "config_hash": ts.config_hash,
                                                    "seed": ts.seed})
            trial = study.ask()
            Heartbeat(_heartbeat_path(spec, trial.number))  # writes the file: claimed before the lock is released
            for key in ts.point:  # records the enqueued levels as the trial's params (dashboard, status)
                trial.suggest_categorical(key, _choices(spec, key))
            trial.suggest_categorical("seed", spec.seeds)
            return trial, ts
    return None


def _choices(spec: StudySpec, key: str) -> list:
    levels = spec.space[key]
    return list(dict.fromkeys([*levels, spec.baseline[key]] if key in spec.baseline else levels))


# --- running -------------------------------------------------------------------------------------
def _parent_run(spec: StudySpec, trials_total: int) -> str | None:
    """The study's parent MLflow run, created once (its id kept in the study directory)."""
    info_path = study_dir(spec) / "parent.json"
    with _locked(study_dir(spec) / "parent.lock"):
        try:
            return json.loads(info_path.read_text())["run_id"]
        except (OSError, ValueError, KeyError):
            pass
        from pipeline.tracking import MlflowRun

        run = MlflowRun(spec.name, run_name=f"study {spec.name}", tags={"study": spec.name, "role": "study"})
        run.log_params({"study.sampler": spec.sampler, "study.trials": trials_total, "study.seeds": spec.seeds,
                        "study.factors": ", ".join(spec.factors),
                        "study.objectives": ", ".join(f"{o.direction} {o.metric}" for o in spec.objectives)})
        atomic_write_json({"run_id": run.run_id}, info_path)
        return run.run_id


def run_trial(study: optuna.Study, spec: StudySpec, trial: optuna.Trial, ts: TrialSpec, parent_run_id: str | None,
              log=print) -> str:
    """Train and evaluate one logical trial; tell Optuna how it ended. Returns the outcome."""
    cfg = ts.config()
    run_dir = study_dir(spec) / "trials" / f"{ts.index:04d}-{cfg.result_hash()}"
    heartbeat = Heartbeat(_heartbeat_path(spec, trial.number))
    heartbeat.start()
    point = ", ".join(f"{k}={v}" for k, v in ts.point.items())
    log(f"[study {spec.name}] trial #{ts.index} (seed {ts.seed}): {point}")
    try:
        result = train_stage(
            cfg, run_dir, log=log, progress=False, parent_run_id=parent_run_id,
            extra_tags={"study": spec.name, "trial": str(ts.index), "optuna_trial": str(trial.number),
                        "seed": str(ts.seed), "point": point_key(ts.point)},
        )
        trial.set_user_attr("run_dir", str(run_dir))
        if result.run_id:
            trial.set_user_attr("mlflow_run_id", result.run_id)
        if result.status == "diverged":
            trial.set_user_attr("failure_reason", "diverged")
            study.tell(trial, state=TrialState.FAIL)
            return "diverged"
        metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
        values = [metrics.get(o.metric, math.nan) for o in spec.objectives]
        if any(v is None or math.isnan(v) for v in values):
            trial.set_user_attr("failure_reason", "objective_missing")
            study.tell(trial, state=TrialState.FAIL)
            return "objective_missing"
        study.tell(trial, values)
        return "complete"
    except Exception as e:  # the study goes on; the trial's MLflow run already says FAILED and why
        trial.set_user_attr("failure_reason", f"error: {type(e).__name__}: {e}"[:500])
        study.tell(trial, state=TrialState.FAIL)
        log(f"[study {spec.name}] trial #{ts.index} failed: {type(e).__name__}: {e}")
        return "error"
    finally:
        heartbeat.stop()


def run_study(spec: StudySpec, storage: str | None = None, log=print, max_trials: int | None = None) -> Progress:
    """Run (or resume) a fixed-design study until no open trial is left for this worker."""
    if spec.sampler not in ("grid", "ofat"):
        raise StudyError(f"sampler {spec.sampler}: running searches is not implemented yet; grid and ofat are")
    trials = expand_trials(spec)
    study = open_study(spec, open_storage(spec, storage))
    before = scan(study, spec, len(trials), reap=False)
    if len(before.done) == len(trials):
        log(f"[study {spec.name}] complete: {len(trials)}/{len(trials)} trials done; nothing to do")
        return before
    log(f"[study {spec.name}] {len(before.done)}/{len(trials)} trials done; running the rest")
    parent = _parent_run(spec, len(trials))
    attempted: set[int] = set()
    while max_trials is None or len(attempted) < max_trials:
        claimed = claim(study, spec, trials, skip=attempted)
        if claimed is None:
            break
        attempted.add(claimed[1].index)
        run_trial(study, spec, *claimed, parent_run_id=parent, log=log)
    after = scan(study, spec, len(trials), reap=False)
    waiting = f", {len(after.running)} still running in other workers" if after.running else ""
    open_ = len(trials) - len(after.done) - len(after.running)
    retry = f", {open_} failed and will be retried by the same command" if open_ else ""
    log(f"[study {spec.name}] {len(after.done)}/{len(trials)} trials done{waiting}{retry}")
    if parent and len(after.done) == len(trials):
        from pipeline.tracking import client

        client().set_terminated(parent, status="FINISHED")
    return after


def status_rows(spec: StudySpec, storage: str | None = None) -> list[dict]:
    """One row per logical trial, from its latest Optuna attempt."""
    trials = expand_trials(spec) if spec.sampler in ("grid", "ofat") else []
    study = open_study(spec, open_storage(spec, storage))
    latest: dict[int, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False):
        idx = t.user_attrs.get("trial_index")
        if idx is not None and (idx not in latest or t.number > latest[idx].number):
            latest[idx] = t
    rows = []
    for ts in trials:
        t = latest.get(ts.index)
        state = t.state.name if t else "OPEN"
        if t and t.state == TrialState.FAIL:
            state += f" ({t.user_attrs.get('failure_reason', '?')})"
        if t and t.state == TrialState.RUNNING and not worker_alive(_heartbeat_path(spec, t.number)):
            state = "RUNNING (worker dead; rerun to resume)"
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t and t.datetime_complete else None
        values = dict(zip([o.metric for o in spec.objectives], t.values)) if t and t.values else {}
        rows.append({"trial": ts.index, "seed": ts.seed, "state": state, **ts.point, **values,
                     "seconds": round(duration, 1) if duration else None,
                     "mlflow_run": (t.user_attrs.get("mlflow_run_id") if t else None)})
    return rows


def launch_workers(study_file: str, n: int, storage: str | None = None, per_gpu: int = 1, log=print) -> int:
    """Run `n` worker processes on one study and wait for them; returns the number that failed.

    With several visible GPUs each worker is pinned to one (`per_gpu` workers per GPU); on CPU the
    cores are split between the workers so they do not oversubscribe each other.
    """
    import subprocess
    import sys

    import torch

    gpus = torch.cuda.device_count()
    threads = max(1, (os.cpu_count() or 1) // n)
    procs = []
    for i in range(n):
        env = dict(os.environ)
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str((i // per_gpu) % gpus)
        elif gpus == 0:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, "-m", "pipeline", "study", study_file] + (["--storage", storage] if storage else [])
        procs.append(subprocess.Popen(cmd, env=env))
        where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus > 1 else ("GPU 0" if gpus else f"{threads} CPU threads")
        log(f"[workers] worker {i + 1}/{n} started (pid {procs[-1].pid}, {where})")
        time.sleep(1.0)  # staggered: the first worker creates the study and the MLflow store
    return sum(p.wait() != 0 for p in procs)
