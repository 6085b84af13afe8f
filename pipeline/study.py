"""Running studies with Optuna (the only Optuna importer): storage, claims, heartbeats, resume.

Fixed designs (grid, ofat) are run as an explicit list of logical trials (studyspec.expand_trials).
Each Optuna trial carries its logical index as a user attribute; a worker claims the first index
that is neither done nor held by a live worker, under a file lock, by enqueuing that point and
asking for it. Optuna's GridSampler is not used: it counts failed points as visited and reruns a
finished grid once more on resume.

Searches (tpe, random, nsga2) number their logical trials 0 … n_trials−1 as they are drawn; one
logical trial is one config trained under every listed seed, and its objective is the mean over the
seeds (the sampler then models the config, not seed noise). A search trial whose worker died is
retried at the same point (enqueued again), so its runs resume like a grid trial's. Pruners see the
per-epoch val/elbo of searches only.

A logical trial's identity on disk is its run directory (index + config hash). A trial whose worker
died is marked FAIL (`failure_reason=worker_died`) and its index is claimed again; the new attempt
finds the same run directory, so training resumes from the last checkpoint **into the same MLflow
run**. Liveness comes from heartbeat files (Optuna's own heartbeat exists for RDB storages only):
the pid and host of the worker, touched every few seconds.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import socket
import threading
import time
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from pipeline import paths
from pipeline.checkpoint import epoch_history
from pipeline.errors import PipelineError, masked
from pipeline.fileio import atomic_write_json
from pipeline.journal import open_journal
from pipeline.stages import train_stage
from pipeline.studyspec import FIXED_DESIGNS, Range, StudySpec, TrialSpec, base_overrides, expand_trials, point_key
from pipeline.train import StopEarly

HEARTBEAT_EVERY_S = 5.0
STALE_AFTER_S = 60.0
WAIT_POLL_S = 5.0
# Failed trials that are results, not accidents: rerunning cannot change them, so they count as done.
DONE_FAILURES = ("diverged", "objective_missing")


class StudyError(PipelineError, RuntimeError):
    """A study cannot be run as asked; the message says why and what to do."""


def study_dir(spec: StudySpec) -> Path:
    return paths.runs_dir() / spec.name


def open_storage(spec: StudySpec, storage: str | None):
    """The given storage URL, else a journal file in the study's directory (safe for several
    processes on one machine, unlike SQLite). An unreachable database fails here, before any work,
    with the URL (password masked) and what to check."""
    if storage is None:
        d = study_dir(spec)
        d.mkdir(parents=True, exist_ok=True)
        return open_journal(d / "optuna.journal")
    if "://" not in storage:
        return open_journal(Path(storage))
    from pipeline.services import use_pgpass

    use_pgpass()  # the password of `make postgres`'s cluster, never in the URL
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(storage, engine_kwargs=_engine_kwargs(storage))
        except Exception as e:  # SQLAlchemy/driver errors name the URL with its password: say it ourselves
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            # Workers starting together on a new database race to create Optuna's tables: the
            # losers see a unique violation; the tables exist a moment later.
            if "UniqueViolation" not in reason and "already exists" not in reason:
                break
            time.sleep(0.5 * (attempt + 1))
    raise StudyError(
        f"cannot open the Optuna storage {masked(storage)}: {masked(reason)}\n"
        "  check that the database server is running and reachable (make postgres starts a local one), "
        "that the database exists, and the user and password (PGPASSFILE or ~/.pgpass)"
    )


def _engine_kwargs(url: str) -> dict:
    if url.startswith("postgresql"):
        # Fail fast on an unreachable server; recycle connections a worker held through a long trial.
        return {"connect_args": {"connect_timeout": 10}, "pool_pre_ping": True}
    return {}


def open_study(spec: StudySpec, storage=None) -> optuna.Study:
    directions = [o.direction for o in spec.objectives]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Pruners are not stored with the study: every worker passes its own.
    study = optuna.create_study(study_name=spec.name, storage=storage or open_storage(spec, None),
                                directions=directions, load_if_exists=True, pruner=make_pruner(spec))
    stored = [d.name.lower() for d in study.directions]
    if stored != directions:
        raise StudyError(
            f"study {spec.name!r} already exists in this storage with directions {stored}, the file now says "
            f"{directions}; rename the study or delete {study_dir(spec)} to start over"
        )
    names = [o.metric for o in spec.objectives]
    if study.metric_names != names:  # optuna-dashboard then says test/active_units, not "Objective 0"
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2, and what optuna-dashboard reads
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    return study


# --- liveness ------------------------------------------------------------------------------------
# A claimed trial carries its worker (host, pid) and a heartbeat time as system attributes, in the
# study's own storage: a journal file on a shared filesystem or a database both reach every machine.
# On the worker's own host the pid answers at once; elsewhere the heartbeat must be recent.
def _host_key() -> str:
    """This host as pids are meaningful on it: host name, boot and pid namespace (containers that
    share a host name, or a container restarted under the same name, do not share pids)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
        pidns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, pidns = "?", 0
    return f"{socket.gethostname()}/{boot}/{pidns}"


def _proc_start(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the pid, an identity that is not reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[19])  # a zombie has exited


def _worker_id() -> dict:
    return {"host": _host_key(), "pid": os.getpid(), "start": _proc_start(os.getpid())}


class Heartbeat(threading.Thread):
    """Stamps the trial's `heartbeat` system attribute every few seconds until stopped."""

    def __init__(self, study: optuna.Study, trial_id: int, every: float = HEARTBEAT_EVERY_S):
        super().__init__(daemon=True, name=f"heartbeat-{trial_id}")
        self.storage, self.trial_id, self.every = study._storage, trial_id, every
        self._halt = threading.Event()

    def beat(self) -> None:
        self.storage.set_trial_system_attr(self.trial_id, "heartbeat", time.time())

    def run(self) -> None:
        while not self._halt.wait(self.every):
            try:
                self.beat()
            except Exception:  # the trial was finished meanwhile, or the storage blinked: try again later
                pass

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_alive(trial: optuna.trial.FrozenTrial, stale_after: float = STALE_AFTER_S) -> bool:
    """Is the worker holding this RUNNING trial alive? Same host: that very process (pid and start
    time) still runs; other hosts: its heartbeat is fresh (clocks are assumed within a few seconds)."""
    worker = trial.system_attrs.get("worker")
    if not worker:
        return False
    if worker.get("host") == _host_key():
        pid = int(worker["pid"])
        if not pid_alive(pid):
            return False
        if not Path("/proc").is_dir():  # no procfs: the pid alone
            return True
        started = _proc_start(pid)
        return started is not None and started == worker.get("start", started)
    return time.time() - float(trial.system_attrs.get("heartbeat", 0)) < stale_after


@contextmanager
def _claim_lock(spec: StudySpec, study: optuna.Study):
    """Claims are serialized: across machines by a PostgreSQL advisory lock when the storage is
    PostgreSQL, else by a file lock in the study directory (one machine, or a shared filesystem)."""
    storage = study._storage
    storage = getattr(storage, "_backend", storage)  # RDB storages come wrapped in Optuna's cache
    engine = getattr(storage, "engine", None)
    if engine is not None and engine.dialect.name == "postgresql":
        import sqlalchemy

        key = zlib.crc32(f"vae-pipeline/{spec.name}".encode())
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
        return
    # A journal elsewhere (--storage /shared/x.journal) is locked next to itself, for every machine.
    journal = getattr(storage, "_file_path", None)  # storage is the journal backend here
    # Not `<journal>.lock`: that name is Optuna's own writer lock (a symlink it force-deletes after 30 s).
    lock = Path(journal + ".claim.lock") if journal and not Path(journal).is_relative_to(study_dir(spec)) else None
    with _locked(lock or study_dir(spec) / "claim.lock"):
        yield


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- samplers and pruners ------------------------------------------------------------------------
def make_sampler(spec: StudySpec, index: int) -> optuna.samplers.BaseSampler:
    """The sampler that draws logical trial `index`, seeded by (study name, index).

    Samplers keep no state of their own beyond the RNG (TPE and NSGA-II read the history from the
    storage), so a fresh one per claim is exact: one worker replays a search exactly, and several
    workers do not draw the same random start-up points.
    """
    seed = (zlib.crc32(spec.name.encode()) + index) % 2**31
    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, spec.n_trials // 5)),
                                          constant_liar=True)
    if spec.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=min(50, max(4, spec.n_trials // 4)))
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """Pruners judge the per-epoch `val/elbo` (see `run_trial`); never used by fixed designs."""
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=min(5, max(2, spec.n_trials // 5)), n_warmup_steps=1)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto", reduction_factor=3)
    return optuna.pruners.NopPruner()


def _suggest(trial: optuna.Trial, key: str, levels: list | Range):
    if isinstance(levels, list):
        return trial.suggest_categorical(key, levels)
    if levels.is_int:
        return trial.suggest_int(key, int(levels.low), int(levels.high), step=int(levels.step), log=levels.log)
    return trial.suggest_float(key, levels.low, levels.high, log=levels.log, step=levels.step)


def trial_seeds(spec: StudySpec, index: int, point: dict) -> list[TrialSpec]:
    """A search trial's runs: its point under each listed seed (the objective is their mean)."""
    return [TrialSpec(index, point, seed, {**base_overrides(spec), **point, "train.seed": seed}) for seed in spec.seeds]


# --- claiming trials -----------------------------------------------------------------------------
@dataclass
class Progress:
    total: int
    done: set[int]
    running: set[int]
    failed: dict[int, str]
    retry_params: dict[int, dict] = field(default_factory=dict)  # searches: the point a failed index was at
    seen: set[int] = field(default_factory=set)  # every logical index any attempt has claimed


def scan(study: optuna.Study, spec: StudySpec, total: int, reap: bool = True) -> Progress:
    """Which logical trials are done, running (live worker) or failed; dead workers' trials are reaped."""
    done, running, failed, retry, seen = set(), set(), {}, {}, set()
    for t in study.get_trials(deepcopy=False):
        idx = t.user_attrs.get("trial_index")
        alive = t.state == TrialState.RUNNING and worker_alive(t)
        if reap and t.state == TrialState.RUNNING and not alive:
            # A dead worker's trial (also one asked for but never labelled with its index): its index,
            # if any, is open again, and the next attempt resumes from its run directory.
            study._storage.set_trial_user_attr(t._trial_id, "failure_reason", "worker_died")
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        if idx is None:
            continue
        seen.add(idx)
        reason = t.user_attrs.get("failure_reason")
        params = t.params or t.system_attrs.get("fixed_params") or {}
        if set(params) >= set(spec.space) and t.state != TrialState.COMPLETE:
            retry[idx] = {k: params[k] for k in spec.space}
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            done.add(idx)
        elif t.state == TrialState.FAIL and reason in DONE_FAILURES:
            done.add(idx)
            failed[idx] = reason
        elif alive:
            running.add(idx)
        elif t.state == TrialState.WAITING and reap:
            # Enqueued by a worker that died before asking for it: retire it, its index stays open.
            study._storage.set_trial_user_attr(t._trial_id, "failure_reason", "abandoned")
            study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
    running -= done
    retry = {i: p for i, p in retry.items() if i not in done and i not in running}
    return Progress(total, done, running, failed, retry, seen)


def claim(study: optuna.Study, spec: StudySpec, trials: list[TrialSpec] | None,
          skip: set[int] = frozenset()) -> tuple[optuna.Trial, list[TrialSpec]] | None:
    """Atomically (under the claim lock) take the next open logical trial; None when none is left.

    Fixed designs (`trials` given): the first index neither done nor held by a live worker. Searches:
    first an index whose attempt failed (its point enqueued again, so its run directories and MLflow
    runs are resumed), else a new index drawn by the sampler while fewer than `n_trials` exist.
    `skip`: indices this worker already attempted in this session (an error is not retried in a loop).
    """
    with _claim_lock(spec, study):
        total = len(trials) if trials is not None else spec.n_trials
        progress = scan(study, spec, total)
        if trials is not None:
            for ts in trials:
                if ts.index in progress.done or ts.index in progress.running or ts.index in skip:
                    continue
                study.enqueue_trial({**ts.point, "seed": ts.seed},
                                    user_attrs={"trial_index": ts.index, "config_hash": ts.config_hash, "seed": ts.seed})
                trial = _ask_claimed(study)
                for key in ts.point:  # records the enqueued levels as the trial's params (dashboard, status)
                    trial.suggest_categorical(key, _choices(spec, key))
                trial.suggest_categorical("seed", spec.seeds)
                return trial, [ts]
            return None
        open_failed = sorted(i for i in progress.seen - progress.done - progress.running - set(skip) if i < total)
        if open_failed:
            index = open_failed[0]
            if index in progress.retry_params:
                study.enqueue_trial(progress.retry_params[index], user_attrs={"trial_index": index})
        elif len(progress.seen) < total:
            index = len(progress.seen)
        else:
            return None
        study.sampler = make_sampler(spec, index)
        trial = _ask_claimed(study)
        trial.set_user_attr("trial_index", index)
        point = {key: _suggest(trial, key, levels) for key, levels in spec.space.items()}
        return trial, trial_seeds(spec, index, point)


def _ask_claimed(study: optuna.Study) -> optuna.Trial:
    """Ask for a trial and mark it as this worker's before the claim lock is released."""
    trial = study.ask()
    study._storage.set_trial_system_attr(trial._trial_id, "worker", _worker_id())
    study._storage.set_trial_system_attr(trial._trial_id, "heartbeat", time.time())
    return trial


def _choices(spec: StudySpec, key: str) -> list:
    levels = spec.space[key]
    return list(dict.fromkeys([*levels, spec.baseline[key]] if key in spec.baseline else levels))


# --- running -------------------------------------------------------------------------------------
def _parent_run(spec: StudySpec, study: optuna.Study, trials_total: int) -> str | None:
    """The study's parent MLflow run, created once: its id is kept in the Optuna study (so workers on
    other machines find it) and in runs/<study>/parent.json."""
    info_path = study_dir(spec) / "parent.json"
    with _claim_lock(spec, study):
        run_id = study.user_attrs.get("mlflow_parent_run_id")
        kept = _kept_parent_id(spec) if run_id is None else None
        if kept is not None and _is_parent_of(spec, kept):
            # The Optuna storage was lost or replaced (a deleted journal): the parent kept on disk is still
            # this study's, so its trials go on under it instead of under a second parent.
            run_id = kept
            study.set_user_attr("mlflow_parent_run_id", run_id)
        if run_id is None:
            from pipeline.tracking import MlflowRun

            run = MlflowRun(spec.name, run_name=f"study {spec.name}", tags={"study": spec.name, "role": "study"})
            run.log_params({"study.sampler": spec.sampler, "study.trials": trials_total, "study.seeds": spec.seeds,
                            "study.factors": ", ".join(spec.factors), "study.pruner": spec.pruner,
                            "study.objectives": ", ".join(f"{o.direction} {o.metric}" for o in spec.objectives)})
            run_id = run.run_id
            study.set_user_attr("mlflow_parent_run_id", run_id)
        atomic_write_json({"run_id": run_id}, info_path)
        return run_id


def _kept_parent_id(spec: StudySpec) -> str | None:
    try:
        return json.loads((study_dir(spec) / "parent.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def _is_parent_of(spec: StudySpec, run_id: str | None) -> bool:
    """Whether `run_id` is this study's parent run in the current tracking store."""
    if not run_id:
        return False
    from pipeline.tracking import client

    try:
        run = client().get_run(run_id)
    except Exception:  # not in this store (another MLFLOW_TRACKING_URI), or deleted
        return False
    tags = run.data.tags
    return run.info.lifecycle_stage == "active" and tags.get("role") == "study" and tags.get("study") == spec.name


def _close_parent(spec: StudySpec, study: optuna.Study, log=print) -> None:
    """End the parent run of a complete study if it is still RUNNING (its process died after the last
    trial, before closing it). Quietly does nothing when the tracking store cannot be reached."""
    from pipeline.tracking import check_reachable, client

    run_id = study.user_attrs.get("mlflow_parent_run_id") or _kept_parent_id(spec)
    if not run_id:
        return
    try:
        check_reachable()
        run = client().get_run(run_id)
    except Exception:
        return
    # A study that finished before its parent run carried the summary (or its experiment the kind tag)
    # gets them now.
    from pipeline.tracking import get_or_create_experiment

    get_or_create_experiment(spec.name)
    update_parent_summary(study, spec, run_id, len(expand_trials(spec)) if spec.sampler in FIXED_DESIGNS
                          else spec.n_trials, log)
    if run.info.status == "RUNNING":
        client().set_terminated(run_id, status="FINISHED")
        log(f"[study {spec.name}] closed the study's MLflow run {run_id}, left running by an earlier command")


# --- the study's summary on its parent run ---------------------------------------------------------
# Besides the objectives, the parent shows these results of the best config, where its runs have them.
HEADLINE_METRICS = ("test/iwae_nll", "test/elbo", "test/active_units", "test/mutual_info", "test/fd_classifier",
                    "test/kid", "test/precision", "test/recall")


def latest_attempts(trials: list[optuna.trial.FrozenTrial]) -> dict[int, optuna.trial.FrozenTrial]:
    """The latest Optuna attempt of each logical trial (attempts without an index are left out)."""
    latest: dict[int, optuna.trial.FrozenTrial] = {}
    for t in trials:
        idx = t.user_attrs.get("trial_index")
        if idx is not None and (idx not in latest or t.number > latest[idx].number):
            latest[idx] = t
    return latest


def trial_counts(trials: list[optuna.trial.FrozenTrial], total: int) -> dict[str, int]:
    """Logical trials by the state of their latest attempt; `open` = never claimed (or enqueued, not yet asked)."""
    states = [t.state for t in latest_attempts(trials).values()]
    counts = {name: sum(s == state for s in states) for name, state in
              (("complete", TrialState.COMPLETE), ("pruned", TrialState.PRUNED), ("failed", TrialState.FAIL),
               ("running", TrialState.RUNNING))}
    counts["open"] = total - sum(counts.values())
    return counts


def best_config(trials: list[optuna.trial.FrozenTrial], directions: list[str]) -> tuple[dict, list]:
    """The leaderboard's first config and its complete trials, ranked as the report ranks configs: the
    objectives averaged over a config's trials (its seeds, in a grid); the best by the first objective,
    ties broken by the next. With several objectives that config is on the Pareto front, as the
    report's rank 1 is (nothing can beat it on the first objective). ({}, []) when none is complete."""
    configs: dict[str, tuple[dict, list]] = {}
    for t in latest_attempts(trials).values():
        if t.state != TrialState.COMPLETE or not t.values or not all(math.isfinite(v) for v in t.values):
            continue
        point = {k: v for k, v in t.params.items() if k != "seed"}
        configs.setdefault(json.dumps(point, sort_keys=True, default=str), (point, []))[1].append(t)
    if not configs:
        return {}, []

    def oriented_means(group: list) -> tuple[float, ...]:
        means = [sum(t.values[i] for t in group) / len(group) for i in range(len(directions))]
        return tuple(m if d == "minimize" else -m for m, d in zip(means, directions))

    point, group = min(configs.values(), key=lambda pg: oriented_means(pg[1]))
    return point, sorted(group, key=lambda t: t.user_attrs["trial_index"])


def summary_metrics(spec: StudySpec, counts: dict[str, int], best: list,
                    run_metrics: list[dict[str, float]]) -> dict[str, float]:
    """The parent run's numbers: `study/n_<state>` counts, and `best/<metric>` for the best config: its
    objectives (the mean over its trials, as Optuna has them) and the headline results of its runs (mean
    over the runs that have each)."""
    out = {f"study/n_{state}": float(n) for state, n in counts.items()}
    objectives = [o.metric for o in spec.objectives]
    for i, key in enumerate(objectives):
        if best:
            out[f"best/{key}"] = sum(t.values[i] for t in best) / len(best)
    for key in HEADLINE_METRICS:
        values = [m[key] for m in run_metrics if key in m and math.isfinite(m[key])]
        if key not in objectives and values:
            out[f"best/{key}"] = sum(values) / len(values)
    return out


def update_parent_summary(study: optuna.Study, spec: StudySpec, parent_run_id: str | None, total: int,
                          log=print) -> None:
    """Bring the parent run's summary up to date (see `summary_metrics`; tags best_config, best_trials and
    best_run_id name the config). Only what changed is written, at step = logical trials done, so a rerun
    adds nothing and the run's charts show the study filling up. A store that fails here costs a warning,
    not the study: the next trial's update, or a rerun, writes it."""
    if not parent_run_id:
        return
    try:
        _write_parent_summary(study, spec, parent_run_id, total)
    except Exception as e:
        log(f"[study {spec.name}] warning: could not update the summary on the study's MLflow run "
            f"{parent_run_id}: {masked(f'{type(e).__name__}: {e}')[:300]}")


def _write_parent_summary(study: optuna.Study, spec: StudySpec, parent_run_id: str, total: int) -> None:
    from pipeline.tracking import client, record_changes

    trials = study.get_trials(deepcopy=False)
    counts = trial_counts(trials, total)
    point, best = best_config(trials, [o.direction for o in spec.objectives])
    run_ids = [rid for t in best for rid in (t.user_attrs.get("mlflow_run_ids") or {}).values()]
    c = client()
    run_metrics = []
    for rid in dict.fromkeys(run_ids):
        try:
            run_metrics.append(c.get_run(rid).data.metrics)
        except Exception:  # a run in another store, or deleted: the others still count
            continue
    tags = {"best_config": ", ".join(f"{k}={_short(v)}" for k, v in point.items()),
            "best_trials": ", ".join(str(t.user_attrs["trial_index"]) for t in best),
            "best_run_id": run_ids[0]} if best and run_ids else {}
    # Done trials never become undone (a failure that is retried is not done), so steps only grow.
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.user_attrs.get("failure_reason") in DONE_FAILURES)
               for t in latest_attempts(trials).values())
    record_changes(parent_run_id, summary_metrics(spec, counts, best, run_metrics), tags, step=done)


def mlflow_links(spec: StudySpec):
    """The study's links into the MLflow UI (tracking.UiLinks): its runs, and the metrics of the best
    config's first run (of the parent run while no trial is complete); None before the study has runs."""
    from pipeline.tracking import experiment_links, get_run, study_parent_run

    parent = _kept_parent_id(spec) if _is_parent_of(spec, _kept_parent_id(spec)) else study_parent_run(spec.name)
    shown = parent
    if parent:
        shown = get_run(parent).data.tags.get("best_run_id") or parent
    return experiment_links(spec.name, shown)


def trial_run_dir(spec: StudySpec, ts: TrialSpec) -> Path:
    """A run's identity on disk: fixed designs index (config, seed) pairs; searches index configs,
    so the seed is part of the name."""
    name = f"{ts.index:04d}-{ts.config_hash}"
    if spec.sampler not in FIXED_DESIGNS:
        name = f"{ts.index:04d}-seed{ts.seed}-{ts.config_hash}"
    return study_dir(spec) / "trials" / name


def _pruning_callback(study: optuna.Study, spec: StudySpec, trial: optuna.Trial, seed_index: int, epochs: int):
    """Report each epoch's val/elbo, oriented like the objective, and stop the run if the pruner says so.

    The pruner compares trials at equal steps: step = seed position × epochs + epoch, so the
    curves of a trial's seeds follow each other. ELBO is reported as is for a maximized objective
    and negated (the NELBO) for a minimized one, since the pruner ranks by the study direction.
    """
    sign = 1.0 if spec.objectives[0].direction == "maximize" else -1.0

    def on_epoch(row: dict) -> None:
        value = row.get("val/elbo")
        if value is None or not math.isfinite(value):
            return
        trial.report(sign * value, seed_index * epochs + int(row["epoch"]))
        if trial.should_prune():
            raise StopEarly(int(row["epoch"]), f"pruned by the {spec.pruner} pruner")

    return on_epoch


def run_trial(study: optuna.Study, spec: StudySpec, trial: optuna.Trial, runs: list[TrialSpec],
              parent_run_id: str | None, log=print, experiment_id: str | None = None) -> str:
    """Train and evaluate one logical trial (one run per seed in searches); tell Optuna how it ended.

    Returns the outcome: complete | pruned | diverged | objective_missing | error. With the MLflow
    `experiment_id`, the trial also carries `mlflow_run_url`, its first run's metrics in the MLflow UI.
    """
    index, point = runs[0].index, runs[0].point
    heartbeat = Heartbeat(study, trial._trial_id)
    heartbeat.start()
    shown = ", ".join(f"{k}={_short(v)}" for k, v in point.items())
    seeds = ", ".join(str(ts.seed) for ts in runs)
    log(f"[study {spec.name}] trial #{index} (seed{'s' if len(runs) > 1 else ''} {seeds}): {shown}")
    prune = spec.pruner != "none"
    run_ids, per_seed = {}, []
    try:
        for seed_index, ts in enumerate(runs):
            cfg = ts.config()
            run_dir = trial_run_dir(spec, ts)
            on_epoch = _pruning_callback(study, spec, trial, seed_index, cfg.train.epochs) if prune else None
            if on_epoch and (run_dir / "result.json").exists():
                for row in epoch_history(run_dir):  # a finished seed of a resumed trial: the pruner sees it again
                    on_epoch(row)
            if not (run_dir / "run.json").exists():
                _retire_orphan_runs(study, index, ts.seed, log)

            def on_run(run_id: str, seed: int = ts.seed) -> None:
                # Recorded as soon as the run exists, so a takeover elsewhere can find it.
                run_ids[str(seed)] = run_id
                trial.set_user_attr("mlflow_run_ids", dict(run_ids))
                first = run_ids.get(str(runs[0].seed), run_id)
                trial.set_user_attr("mlflow_run_id", first)
                if experiment_id is not None:
                    from pipeline.tracking import tracking_uri, ui_links

                    trial.set_user_attr("mlflow_run_url", ui_links(tracking_uri(), experiment_id, first).run_metrics)

            result = train_stage(
                cfg, run_dir, log=log, progress=False, parent_run_id=parent_run_id, on_epoch=on_epoch, on_run=on_run,
                extra_tags={"study": spec.name, "trial": str(index), "optuna_trial": str(trial.number),
                            "seed": str(ts.seed), "point": point_key(point)},
            )
            if result.run_id:  # also a finished run that train_stage skipped without attaching to it
                on_run(result.run_id)
            trial.set_user_attr("run_dirs", [str(trial_run_dir(spec, r)) for r in runs])
            if result.status == "pruned":
                raise StopEarly(result.epochs_done)
            if result.status == "diverged":
                trial.set_user_attr("failure_reason", "diverged")
                trial.set_user_attr("diverged_seed", ts.seed)
                study.tell(trial, state=TrialState.FAIL)
                return "diverged"
            metrics = dict(result.val or {})  # val/* from training, test/* from evaluation (when enabled)
            if (run_dir / "metrics.json").exists():
                metrics.update(json.loads((run_dir / "metrics.json").read_text())["metrics"])
            values = [metrics.get(o.metric, math.nan) for o in spec.objectives]
            if any(v is None or math.isnan(v) for v in values):
                trial.set_user_attr("failure_reason", "objective_missing")
                study.tell(trial, state=TrialState.FAIL)
                return "objective_missing"
            per_seed.append(values)
        if len(runs) > 1:
            trial.set_user_attr("values_by_seed", {str(ts.seed): v for ts, v in zip(runs, per_seed)})
        study.tell(trial, [sum(col) / len(col) for col in zip(*per_seed)])
        return "complete"
    except StopEarly as e:
        log(f"[study {spec.name}] trial #{index} pruned after epoch {e.epoch}")
        study.tell(trial, state=TrialState.PRUNED)
        return "pruned"
    except UpdateFinishedTrialError:
        # Another worker declared this one dead (no heartbeat reached the storage for too long) and
        # took the trial over; what this worker did is in the run directory the new attempt resumes.
        log(f"[study {spec.name}] trial #{index} was taken over by another worker; leaving it")
        return "taken_over"
    except Exception as e:  # the study goes on; the trial's MLflow run already says FAILED and why
        reason = masked(f"error: {type(e).__name__}: {e}")[:500]
        log(f"[study {spec.name}] trial #{index} failed: {masked(f'{type(e).__name__}: {e}')}")
        try:
            trial.set_user_attr("failure_reason", reason)
            study.tell(trial, state=TrialState.FAIL)
        except UpdateFinishedTrialError:
            pass
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise  # every next trial would fail the same way: stop, say so; a rerun retries this one
        return "error"
    finally:
        heartbeat.stop()


def _retire_orphan_runs(study: optuna.Study, index: int, seed: int, log=print) -> None:
    """End the MLflow runs of earlier attempts of (index, seed) that a dead worker left RUNNING where
    this worker cannot see their run directory (another machine, no shared filesystem): this attempt
    starts over in a new run, and the old one says why it stopped."""
    old = {t.user_attrs.get("mlflow_run_ids", {}).get(str(seed)) for t in study.get_trials(deepcopy=False)
           if t.user_attrs.get("trial_index") == index and t.state == TrialState.FAIL}
    old.discard(None)
    if not old:
        return
    from pipeline.tracking import client

    c = client()
    for run_id in old:
        try:
            if c.get_run(run_id).info.status != "RUNNING":
                continue
            c.set_tag(run_id, "failure_reason", "worker_died")
            c.set_tag(run_id, "superseded", "true")
            c.set_terminated(run_id, status="KILLED")
            log(f"[study] MLflow run {run_id} of trial #{index} (seed {seed}) was left RUNNING by a dead worker and "
                "its checkpoint is not here: marked KILLED; this attempt starts a new run")
        except Exception as e:  # a run in another store, or gone: nothing to retire
            log(f"[study] could not retire MLflow run {run_id}: {type(e).__name__}")


def _short(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _check_objectives_measurable(spec: StudySpec, log) -> None:
    """A class-feature objective (Fréchet distance, KID, precision/recall) on a dataset without labels would
    fail every trial after its training: say so before the first one (preparing the data, which the first
    trial would do anyway)."""
    from pipeline.config import ConfigError, build_config
    from pipeline.data import DATASETS, ensure_splits
    from pipeline.evaluate import CLASS_FEATURE_METRICS

    needs_labels = [o.metric for o in spec.objectives if o.metric in CLASS_FEATURE_METRICS]
    if not needs_labels or (spec.dataset in DATASETS and spec.dataset != "celeba"):  # named ones have labels
        return
    try:
        data_cfg = build_config({}, base_overrides(spec)).data
    except ConfigError:  # a base valid only with the space's values: each trial's config is checked anyway
        return
    if not ensure_splits(data_cfg, log=log).has_labels:
        raise StudyError(f"objective {needs_labels[0]} is measured in the features of a classifier trained on the "
                         f"dataset's labels, and {spec.dataset} has none: choose another objective (test/iwae_nll, "
                         "test/active_units, test/sharpness/…) or give the images labels (one subfolder per class, or "
                         "labels in the .npz)")


def run_study(spec: StudySpec, storage: str | None = None, log=print, max_trials: int | None = None,
              wait: bool = True) -> Progress:
    """Run (or resume) a study until no open trial is left for this worker.

    With `wait`, a worker that finds nothing to claim while other workers still hold trials polls
    until they end, and takes over any whose worker dies: the study then finishes as long as one
    worker is left.
    """
    fixed = spec.sampler in FIXED_DESIGNS
    trials = expand_trials(spec) if fixed else None
    total = len(trials) if fixed else spec.n_trials
    study = open_study(spec, open_storage(spec, storage))
    before = scan(study, spec, total, reap=False)
    if len(before.done) >= total:
        log(f"[study {spec.name}] complete: {total}/{total} trials done; nothing to do")
        _close_parent(spec, study, log)
        return before
    log(f"[study {spec.name}] {len(before.done)}/{total} trials done; running the rest")
    _check_objectives_measurable(spec, log)
    from pipeline.tracking import check_reachable

    check_reachable()  # an unreachable tracking server stops the worker here, not mid-trial
    from pipeline.tracking import get_or_create_experiment

    experiment_id = get_or_create_experiment(spec.name)  # also tags an existing one as model training
    parent = _parent_run(spec, study, total)
    attempted: set[int] = set()
    announced = False
    while max_trials is None or len(attempted) < max_trials:
        claimed = claim(study, spec, trials, skip=attempted)
        if claimed is None:
            others = scan(study, spec, total, reap=False).running
            if not (wait and others):
                break
            if not announced:
                log(f"[study {spec.name}] nothing left to claim; waiting for {len(others)} trial(s) running in other "
                    "workers (one whose worker dies is taken over; Ctrl-C leaves them to their workers)")
                announced = True
            time.sleep(WAIT_POLL_S)
            continue
        attempted.add(claimed[1][0].index)
        run_trial(study, spec, *claimed, parent_run_id=parent, log=log, experiment_id=experiment_id)
        update_parent_summary(study, spec, parent, total, log)
    after = scan(study, spec, total, reap=False)
    waiting = f", {len(after.running)} still running in other workers" if after.running else ""
    open_ = total - len(after.done) - len(after.running)
    retry = f", {open_} failed or not started and will be run by the same command" if open_ else ""
    log(f"[study {spec.name}] {len(after.done)}/{total} trials done{waiting}{retry}")
    update_parent_summary(study, spec, parent, total, log)
    if parent and len(after.done) >= total:
        from pipeline.tracking import client

        client().set_terminated(parent, status="FINISHED")
    return after


def status_rows(spec: StudySpec, storage: str | None = None) -> list[dict]:
    """One row per logical trial, from its latest Optuna attempt."""
    study = open_study(spec, open_storage(spec, storage))
    latest = latest_attempts(study.get_trials(deepcopy=False))
    if spec.sampler in FIXED_DESIGNS:
        planned = [(ts.index, ts.point, {"seed": ts.seed}) for ts in expand_trials(spec)]
    else:
        planned = [(i, {k: latest[i].params.get(k) for k in spec.space} if i in latest else {}, {})
                   for i in range(spec.n_trials)]
    rows = []
    for index, point, extra in planned:
        t = latest.get(index)
        state = t.state.name if t else "OPEN"
        if t and t.state == TrialState.FAIL:
            state += f" ({t.user_attrs.get('failure_reason', '?')})"
        if t and t.state == TrialState.RUNNING and not worker_alive(t):
            state = "RUNNING (worker dead; rerun to resume)"
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t and t.datetime_complete else None
        # A pruned trial's value is its last intermediate (oriented val/elbo), not the objective.
        complete = t is not None and t.state == TrialState.COMPLETE
        values = dict(zip([o.metric for o in spec.objectives], t.values)) if complete else {}
        runs = t.user_attrs.get("mlflow_run_ids") if t else None
        rows.append({"trial": index, **extra, "state": state, **point, **values,
                     "seconds": round(duration, 1) if duration else None,
                     "mlflow_run": (", ".join(runs.values()) if runs and len(runs) > 1
                                    else (t.user_attrs.get("mlflow_run_id") if t else None))})
    return rows


def serve_dashboard(spec: StudySpec, storage: str | None, port: int) -> None:
    """optuna-dashboard on 127.0.0.1, in this process and on the storage object opened here, so a
    storage URL (and any password in it) never lands on a command line. The study is opened first, so
    one made before its objectives were named gets their names."""
    from optuna_dashboard import run_server

    opened = open_storage(spec, storage)
    open_study(spec, opened)
    run_server(opened, host="127.0.0.1", port=port)


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
        if storage:  # in the environment, not on the command line (ps shows command lines)
            env["VAE_STUDY_STORAGE"] = storage
        cmd = [sys.executable, "-m", "pipeline", "study", study_file]
        procs.append(subprocess.Popen(cmd, env=env))
        where = f"GPU {env['CUDA_VISIBLE_DEVICES']}" if gpus > 1 else ("GPU 0" if gpus else f"{threads} CPU threads")
        log(f"[workers] worker {i + 1}/{n} started (pid {procs[-1].pid}, {where})")
        time.sleep(1.0)  # staggered: the first worker creates the study and the MLflow store
    # Reap each worker as it exits, not in order: an unreaped dead worker is a zombie whose pid
    # still answers, and the others would wait for its trial forever.
    while any(p.poll() is None for p in procs):
        time.sleep(0.5)
    return sum(p.returncode != 0 for p in procs)
