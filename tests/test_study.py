"""Running studies: a tiny grid end to end, a SIGKILL mid-trial and resume, a diverged trial, two workers."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pipeline.likelihoods import LIKELIHOODS, Likelihood, LogProb, bernoulli_log_prob, bernoulli_mean
from pipeline.train import PER_STEP_KEYS

from .conftest import subprocess_env

TINY_BASE = {
    "data.train_subset": 256, "train.epochs": 1, "train.batch_size": 64, "model.hidden_dim": 32,
    "model.latent_dim": 4, "train.grid_images": 4, "eval.test_subset": 200, "eval.iwae_k": 4,
    "eval.n_samples": 100, "eval.mi_batch": 200, "eval.batch_size": 100, "tracking.flush_every": 3,
}


def _write_study(home: Path, name: str, space: dict, seeds=(0,), **base) -> Path:
    path = home / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "sampler": "grid", "base": {**TINY_BASE, **base}, "space": space, "seeds": list(seeds),
        "objectives": [{"metric": "test/active_units", "direction": "maximize"}],
    }))
    return path


def _optuna_trials(home: Path, name: str):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(home / "runs" / name / "optuna.journal")))
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def _mlflow_runs(name: str):
    from pipeline.tracking import client

    c = client()
    exp = c.get_experiment_by_name(name)
    return c.search_runs([exp.experiment_id], max_results=1000)


def _check_study_integrity(home: Path, name: str, n_trials: int, steps_per_trial: int):
    """Every logical trial complete exactly once, nothing RUNNING, one terminal MLflow run each,
    and no (metric, step) stored twice."""
    from pipeline.tracking import client

    trials = _optuna_trials(home, name)
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    complete = Counter(t.user_attrs["trial_index"] for t in trials if t.state.name == "COMPLETE")
    assert complete == Counter(range(n_trials)), complete
    runs = [r for r in _mlflow_runs(name) if r.data.tags.get("role") != "study"]
    per_trial = Counter(r.data.tags["trial"] for r in runs)
    assert per_trial == Counter(str(i) for i in range(n_trials)), per_trial
    assert all(r.info.status == "FINISHED" for r in runs)
    c = client()
    for r in runs:
        for key in PER_STEP_KEYS:
            steps = [m.step for m in c.get_metric_history(r.info.run_id, key)]
            assert sorted(steps) == list(range(steps_per_trial)), (r.data.tags["trial"], key, steps)
    return runs


def test_a_tiny_grid_runs_every_trial_once_and_a_rerun_does_nothing(home):
    from pipeline.study import run_study
    from pipeline.studyspec import load_study

    spec = load_study(_write_study(home, "tiny", {"objective.beta": [1, 8]}, seeds=(0, 1)))
    progress = run_study(spec, log=lambda *_: None)
    assert progress.done == {0, 1, 2, 3}
    runs = _check_study_integrity(home, "tiny", 4, steps_per_trial=4)
    parent = [r for r in _mlflow_runs("tiny") if r.data.tags.get("role") == "study"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in runs)
    assert {(r.data.tags["trial"], r.data.tags["seed"]) for r in runs} == {("0", "0"), ("1", "1"), ("2", "0"), ("3", "1")}
    assert all(r.data.tags["config_hash"] and r.data.tags["study"] == "tiny" for r in runs)
    before = len(_optuna_trials(home, "tiny"))
    messages = []
    run_study(spec, log=messages.append)
    assert "complete" in messages[0] and len(_optuna_trials(home, "tiny")) == before


def test_sigkill_mid_trial_then_the_same_command_finishes_with_nothing_lost_or_duplicated(home):
    path = _write_study(home, "killed", {"objective.beta": [1, 2, 4]}, **{"data.train_subset": 2048, "train.epochs": 2})
    cmd = [sys.executable, "-m", "pipeline", "study", str(path)]
    env = subprocess_env(home)
    proc = subprocess.Popen(cmd, env=env, cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    trial_dirs = home / "runs" / "killed" / "trials"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(trial_dirs.glob("0001-*/checkpoint.pt")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the study finished before it could be killed"
    killed_dir = next(trial_dirs.glob("0001-*"))
    killed_run = json.loads((killed_dir / "run.json").read_text())["run_id"]
    assert not (killed_dir / "result.json").exists()  # really interrupted mid-trial

    out = subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    runs = _check_study_integrity(home, "killed", 3, steps_per_trial=2 * 2048 // 64)
    resumed = [r for r in runs if r.data.tags["trial"] == "1"]
    assert [r.info.run_id for r in resumed] == [killed_run]  # the same MLflow run, continued
    died = [t for t in _optuna_trials(home, "killed") if t.user_attrs.get("failure_reason") == "worker_died"]
    assert [t.user_attrs["trial_index"] for t in died] == [1]


def test_two_workers_share_one_study_without_losing_or_repeating_a_point(home):
    path = _write_study(home, "pair", {"objective.beta": [0.5, 1, 2, 4]}, seeds=(0, 1))
    env = subprocess_env(home)
    env["OMP_NUM_THREADS"] = "1"
    workers = [subprocess.Popen([sys.executable, "-m", "pipeline", "study", str(path)], env=env, cwd=home,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    assert not any("database is locked" in o for o in outputs)
    _check_study_integrity(home, "pair", 8, steps_per_trial=4)
    # Both workers did part of the work.
    assert all("trial #" in o for o in outputs), outputs


@pytest.fixture
def nan_likelihood(monkeypatch):
    def log_prob(params, x, opts):
        lp = bernoulli_log_prob(params, x, opts)
        return LogProb(lp.log_px * float("nan"))

    monkeypatch.setitem(LIKELIHOODS, "always_nan", Likelihood(1, log_prob, bernoulli_mean, True, "test"))
    return "always_nan"


def test_a_diverged_trial_is_failed_with_its_reason_not_retried_and_the_study_goes_on(home, nan_likelihood):
    from pipeline.study import run_study
    from pipeline.studyspec import load_study

    spec = load_study(_write_study(home, "nan", {"likelihood.name": [nan_likelihood, "bernoulli"]}))
    progress = run_study(spec, log=lambda *_: None)
    assert progress.done == {0, 1} and progress.failed == {0: "diverged"}
    states = {t.user_attrs["trial_index"]: (t.state.name, t.user_attrs.get("failure_reason"))
              for t in _optuna_trials(home, "nan")}
    assert states == {0: ("FAIL", "diverged"), 1: ("COMPLETE", None)}
    runs = {r.data.tags["trial"]: r for r in _mlflow_runs("nan") if r.data.tags.get("role") != "study"}
    assert runs["0"].info.status == "FAILED" and runs["0"].data.tags["failure_reason"] == "diverged"
    n = len(_optuna_trials(home, "nan"))
    run_study(spec, log=lambda *_: None)
    assert len(_optuna_trials(home, "nan")) == n  # not retried


def test_an_objective_the_run_cannot_produce_fails_once_and_is_not_retried(home):
    from pipeline.study import run_study
    from pipeline.studyspec import load_study

    path = home / "nobpd.yaml"
    path.write_text(yaml.safe_dump({
        "name": "nobpd", "sampler": "grid", "base": TINY_BASE, "space": {"objective.beta": [1]},
        # Bernoulli on grey levels has no bits/dim (not a likelihood of 8-bit data).
        "objectives": [{"metric": "test/bits_per_dim", "direction": "minimize"}],
    }))
    spec = load_study(path)
    assert run_study(spec, log=lambda *_: None).failed == {0: "objective_missing"}
    n = len(_optuna_trials(home, "nobpd"))
    messages = []
    run_study(spec, log=messages.append)
    assert "complete" in messages[0] and len(_optuna_trials(home, "nobpd")) == n
