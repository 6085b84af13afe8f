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

from .conftest import free_port, subprocess_env

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


def _run_study_and_kill_it_when(home: Path, path: Path, ready: str) -> list[str]:
    """Start `python -m pipeline study` and SIGKILL it as soon as `ready` (a glob under the study's
    trials/) exists; fails if the study ended first. Returns the command, to run it again."""
    cmd = [sys.executable, "-m", "pipeline", "study", str(path)]
    proc = subprocess.Popen(cmd, env=subprocess_env(home), cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    trial_dirs = home / "runs" / yaml.safe_load(path.read_text())["name"] / "trials"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(trial_dirs.glob(ready)):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the study finished before it could be killed"
    return cmd


def test_a_tiny_grid_runs_every_trial_once_and_a_rerun_does_nothing(home, capsys, monkeypatch):
    from pipeline.study import run_study
    from pipeline.studyspec import load_study

    path = _write_study(home, "tiny", {"objective.beta": [1, 8]}, seeds=(0, 1))
    spec = load_study(path)
    progress = run_study(spec, log=lambda *_: None)
    assert progress.done == {0, 1, 2, 3}
    runs = _check_study_integrity(home, "tiny", 4, steps_per_trial=4)
    parent = [r for r in _mlflow_runs("tiny") if r.data.tags.get("role") == "study"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    assert all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in runs)
    assert {(r.data.tags["trial"], r.data.tags["seed"]) for r in runs} == {("0", "0"), ("1", "1"), ("2", "0"), ("3", "1")}
    assert all(r.data.tags["config_hash"] and r.data.tags["study"] == "tiny" for r in runs)
    summary = _check_what_the_mlflow_ui_and_the_dashboard_show(home, spec, runs, parent[0].info.run_id)
    before = len(_optuna_trials(home, "tiny"))
    messages = []
    run_study(spec, log=messages.append)
    assert "complete" in messages[0] and len(_optuna_trials(home, "tiny")) == before
    assert _parent_points(parent[0].info.run_id) == summary  # the summary again: not one point added

    from pipeline import cli
    from pipeline.cli import main

    monkeypatch.setattr(cli, "raise_on_sigterm", lambda: None)  # keep pytest's own SIGTERM handling
    capsys.readouterr()
    assert main(["study", str(path)]) == 0
    printed = capsys.readouterr().out
    best = _mlflow_runs("tiny")[0].info.experiment_id, _parent_tags(parent[0].info.run_id)["best_run_id"]
    assert (f"[study] MLflow runs: http://127.0.0.1:5000/#/experiments/{best[0]}/runs?workflowType=machine_learning"
            "   (after `make ui`)") in printed
    assert (f"http://127.0.0.1:5000/#/experiments/{best[0]}/runs/{best[1]}/model-metrics"
            "?workflowType=machine_learning") in printed
    assert main(["ui", "--print-links", "--port", "5123"]) == 0
    printed = capsys.readouterr().out
    assert f"[ui] experiment 'tiny': http://127.0.0.1:5123/#/experiments/{best[0]}/runs?" in printed
    assert f"[ui]   the best config's run, its metrics: http://127.0.0.1:5123/#/experiments/{best[0]}/runs/{best[1]}/" in printed


def _parent_points(run_id: str) -> dict[str, list]:
    from pipeline.tracking import client

    c = client()
    return {k: [(m.step, m.value) for m in c.get_metric_history(run_id, k)] for k in c.get_run(run_id).data.metrics}


def _parent_tags(run_id: str) -> dict[str, str]:
    from pipeline.tracking import client

    return client().get_run(run_id).data.tags


def _check_what_the_mlflow_ui_and_the_dashboard_show(home: Path, spec, runs: list, parent_id: str) -> dict:
    """A finished grid in the tools users open (issue 15): the experiment is tagged model training; every run
    has the dataset as its input once, digest from the manifest; the parent run carries the counts and the
    best config's results, equal to an independent aggregation of the child runs; each Optuna trial links
    to its run's metrics and the objectives have their metrics' names. Returns the parent's points."""
    import hashlib

    from pipeline.tracking import EXPERIMENT_KIND_TAG, client, tracking_uri, ui_links

    c = client()
    exp = c.get_experiment_by_name(spec.name)
    assert exp.tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    manifest = home / "data" / "processed" / "fashion-mnist" / "val5000-seed0" / "manifest.json"
    sha = hashlib.sha256(manifest.read_bytes()).hexdigest()
    for r in runs:
        (ds,) = c.get_run(r.info.run_id).inputs.dataset_inputs
        assert (ds.dataset.name, ds.dataset.digest) == ("fashion-mnist", sha[:12])
        assert json.loads(ds.dataset.source) == {"uri": str(manifest.parent)}

    by_beta: dict[float, list] = {}
    for r in runs:
        by_beta.setdefault(float(r.data.params["objective.beta"]), []).append(r.data.metrics)
    means = {b: sum(m["test/active_units"] for m in ms) / len(ms) for b, ms in by_beta.items()}
    top = max(means.values())
    tags = _parent_tags(parent_id)
    best_beta = float(tags["best_config"].removeprefix("objective.beta="))
    assert means[best_beta] == top, (tags, means)
    metrics = c.get_run(parent_id).data.metrics
    assert metrics["best/test/active_units"] == pytest.approx(top)
    best_runs = by_beta[best_beta]
    assert metrics["best/test/iwae_nll"] == pytest.approx(sum(m["test/iwae_nll"] for m in best_runs) / 2)
    assert {k: v for k, v in metrics.items() if k.startswith("study/")} == {
        "study/n_complete": 4, "study/n_pruned": 0, "study/n_failed": 0, "study/n_running": 0, "study/n_open": 0}
    assert tags["best_run_id"] in {r.info.run_id for r in runs if float(r.data.params["objective.beta"]) == best_beta}
    points = _parent_points(parent_id)
    assert [s for s, _ in points["study/n_complete"]] == [1, 2, 3, 4]  # one point per finished trial

    trials = _optuna_trials(home, spec.name)
    for t in trials:
        assert t.user_attrs["mlflow_run_url"] == ui_links(tracking_uri(), exp.experiment_id,
                                                          t.user_attrs["mlflow_run_id"]).run_metrics
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(home / "runs" / spec.name / "optuna.journal")))
    assert optuna.load_study(study_name=spec.name, storage=storage).metric_names == ["test/active_units"]
    return points


@pytest.mark.slow
def test_sigkill_mid_trial_then_the_same_command_finishes_with_nothing_lost_or_duplicated(home):
    path = _write_study(home, "killed", {"objective.beta": [1, 2, 4]}, **{"data.train_subset": 2048, "train.epochs": 2})
    cmd = _run_study_and_kill_it_when(home, path, "0001-*/checkpoint.pt")
    env = subprocess_env(home)
    trial_dirs = home / "runs" / "killed" / "trials"
    killed_dir = next(trial_dirs.glob("0001-*"))
    killed_run = json.loads((killed_dir / "run.json").read_text())["run_id"]
    assert not (killed_dir / "result.json").exists()  # really interrupted mid-trial

    out = subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    runs = _check_study_integrity(home, "killed", 3, steps_per_trial=2 * 2048 // 64)
    resumed = [r for r in runs if r.data.tags["trial"] == "1"]
    assert [r.info.run_id for r in resumed] == [killed_run]  # the same MLflow run, continued
    from pipeline.tracking import get_run

    assert len(get_run(killed_run).inputs.dataset_inputs) == 1  # attached twice, its dataset logged once
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
    (parent,) = [r for r in _mlflow_runs("nan") if r.data.tags.get("role") == "study"]
    assert {k: v for k, v in parent.data.metrics.items() if k.startswith("study/")} == {
        "study/n_complete": 1, "study/n_pruned": 0, "study/n_failed": 1, "study/n_running": 0, "study/n_open": 0}
    assert parent.data.tags["best_config"] == "likelihood.name=bernoulli"
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


# --- searches ------------------------------------------------------------------------------------
def _write_search(home: Path, name: str, space: dict, sampler="random", n_trials=3, seeds=(0,), pruner="none",
                  objectives=(("test/active_units", "maximize"),), **base) -> Path:
    path = home / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "sampler": sampler, "n_trials": n_trials, "pruner": pruner, "base": {**TINY_BASE, **base},
        "space": space, "seeds": list(seeds),
        "objectives": [{"metric": m, "direction": d} for m, d in objectives],
    }))
    return path


def _search_integrity(home: Path, name: str, n_trials: int, seeds: tuple, steps_per_run: int,
                      metric: str = "test/active_units"):
    """Every search trial COMPLETE once, its value the mean over its seeds' metrics.json, one FINISHED
    MLflow run per (trial, seed) with the trial's point, no duplicated (metric, step)."""
    from pipeline.tracking import client

    trials = _optuna_trials(home, name)
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    complete = {t.user_attrs["trial_index"]: t for t in trials if t.state.name == "COMPLETE"}
    assert sorted(complete) == list(range(n_trials))
    runs = [r for r in _mlflow_runs(name) if r.data.tags.get("role") != "study"]
    per_run = Counter((r.data.tags["trial"], r.data.tags["seed"]) for r in runs)
    assert per_run == Counter((str(i), str(s)) for i in range(n_trials) for s in seeds), per_run
    assert all(r.info.status == "FINISHED" for r in runs)
    for t in complete.values():
        seed_values = []
        for run_dir in t.user_attrs["run_dirs"]:
            source = ("metrics.json", "metrics") if metric.startswith("test/") else ("result.json", "val")
            seed_values.append(json.loads((Path(run_dir) / source[0]).read_text())[source[1]][metric])
            cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
            for key, value in t.params.items():
                section, field = key.split(".")
                assert cfg[section][field] == value, (key, value, cfg[section])
        assert t.values[0] == pytest.approx(sum(seed_values) / len(seed_values))
        assert set(t.user_attrs["mlflow_run_ids"]) == {str(s) for s in seeds}
    c = client()
    for r in runs:
        steps = [m.step for m in c.get_metric_history(r.info.run_id, "train/loss")]
        assert sorted(steps) == list(range(steps_per_run)), (r.data.tags["trial"], steps)
    return complete, runs


def test_a_random_search_averages_its_seeds_and_a_rerun_does_nothing(home):
    from pipeline.study import run_study, status_rows
    from pipeline.studyspec import load_study

    path = _write_search(home, "rand", {"objective.beta": {"low": 0.5, "high": 50.0, "log": True},
                                        "model.decoder_depth": {"low": 1, "high": 3, "step": 1}}, seeds=(0, 1))
    spec = load_study(path)
    assert run_study(spec, log=lambda *_: None).done == {0, 1, 2}
    complete, _ = _search_integrity(home, "rand", 3, (0, 1), steps_per_run=4)
    depths = [t.params["model.decoder_depth"] for t in complete.values()]
    assert all(isinstance(d, int) and 1 <= d <= 3 for d in depths)
    assert all(0.5 <= t.params["objective.beta"] <= 50 for t in complete.values())
    assert len({t.params["objective.beta"] for t in complete.values()}) == 3  # drawn, not repeated
    rows = status_rows(spec)
    assert [r["state"] for r in rows] == ["COMPLETE"] * 3 and all(r["test/active_units"] is not None for r in rows)
    n = len(_optuna_trials(home, "rand"))
    messages = []
    run_study(spec, log=messages.append)
    assert "complete" in messages[0] and len(_optuna_trials(home, "rand")) == n


def test_a_search_worker_killed_between_seeds_resumes_the_same_point_into_the_same_runs(home):
    path = _write_search(home, "killsearch", {"objective.beta": {"low": 0.5, "high": 8.0}}, sampler="tpe",
                         n_trials=1, seeds=(0, 1), objectives=(("val/elbo", "maximize"),),
                         **{"data.train_subset": 2048, "train.epochs": 2, "eval.enabled": False})
    # Killed in trial 0's second seed, after its first epoch: seed 0 finished, seed 1 half trained.
    cmd = _run_study_and_kill_it_when(home, path, "0000-seed1-*/checkpoint.pt")
    env = subprocess_env(home)
    trial_dirs = home / "runs" / "killsearch" / "trials"
    seed0_dir, seed1_dir = next(trial_dirs.glob("0000-seed0-*")), next(trial_dirs.glob("0000-seed1-*"))
    finished_before = (seed0_dir / "result.json").read_text()
    killed_runs = {json.loads((d / "run.json").read_text())["run_id"] for d in (seed0_dir, seed1_dir)}
    assert not (seed1_dir / "result.json").exists()
    point_before = [t.params for t in _optuna_trials(home, "killsearch") if t.user_attrs["trial_index"] == 0]

    out = subprocess.run(cmd, env=env, cwd=home, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    complete, runs = _search_integrity(home, "killsearch", 1, (0, 1), steps_per_run=2 * 2048 // 64, metric="val/elbo")
    assert complete[0].params == point_before[0]  # the same point, not a new draw
    assert {r.info.run_id for r in runs if r.data.tags["trial"] == "0"} == killed_runs
    assert (seed0_dir / "result.json").read_text() == finished_before  # the finished seed was not retrained
    died = [t for t in _optuna_trials(home, "killsearch") if t.user_attrs.get("failure_reason") == "worker_died"]
    assert [t.user_attrs["trial_index"] for t in died] == [0]


def test_the_median_pruner_stops_a_hopeless_trial_and_its_run_says_so(home):
    from pipeline.study import run_study
    from pipeline.studyspec import load_study

    # A learning rate of 1e-7 leaves the ELBO where it started; 3e-3 does not. One seed, CPU: identical
    # configs give identical curves, so only the slow ones can fall below the median.
    # The objective is val/elbo itself, so the runs need no test-set evaluation.
    spec = load_study(_write_search(home, "prune", {"train.lr": [0.003, 1e-7]}, n_trials=6, pruner="median",
                                    objectives=(("val/elbo", "maximize"),), **{"train.epochs": 3, "eval.enabled": False}))
    progress = run_study(spec, log=lambda *_: None)
    assert len(progress.done) == 6
    trials = _optuna_trials(home, "prune")
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert pruned, [(t.state.name, t.params) for t in trials]
    assert all(t.params["train.lr"] == 1e-7 for t in pruned)
    runs = {r.info.run_id: r for r in _mlflow_runs("prune")}
    for t in pruned:
        run = runs[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "KILLED" and run.data.tags["pruned"] == "true"
        assert int(run.data.tags["pruned_at_epoch"]) < 3
        assert set(t.intermediate_values) == set(range(1, int(run.data.tags["pruned_at_epoch"]) + 1))
        assert json.loads((Path(t.user_attrs["run_dirs"][0]) / "result.json").read_text())["status"] == "pruned"
    (parent,) = [r for r in _mlflow_runs("prune") if r.data.tags.get("role") == "study"]
    assert parent.data.metrics["study/n_pruned"] == len(pruned)
    assert parent.data.metrics["study/n_complete"] == 6 - len(pruned)
    # Pruned trials are done: the same command runs nothing again.
    n = len(trials)
    run_study(spec, log=lambda *_: None)
    assert len(_optuna_trials(home, "prune")) == n


def test_nsga2_runs_a_multi_objective_search_with_a_pareto_front(home):
    from pipeline.study import open_storage, open_study, run_study
    from pipeline.studyspec import load_study

    spec = load_study(_write_search(home, "front", {"objective.beta": {"low": 0.1, "high": 100.0, "log": True}},
                                    sampler="nsga2", n_trials=4,
                                    objectives=(("test/iwae_nll", "minimize"), ("test/active_units", "maximize"))))
    assert len(run_study(spec, log=lambda *_: None).done) == 4
    study = open_study(spec, open_storage(spec, None))
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    assert all(len(t.values) == 2 for t in study.get_trials(deepcopy=False))
    assert 1 <= len(study.best_trials) <= 4


def test_pruners_see_val_elbo_oriented_like_the_objective():
    import optuna

    from pipeline.study import _pruning_callback, make_pruner
    from pipeline.studyspec import parse_study
    from pipeline.train import StopEarly

    def spec(direction, pruner="median"):
        return parse_study({"name": "p", "sampler": "tpe", "n_trials": 10, "pruner": pruner, "base": TINY_BASE,
                            "space": {"objective.beta": {"low": 0.5, "high": 4.0}},
                            "objectives": [{"metric": "test/iwae_nll", "direction": direction}]})

    assert isinstance(make_pruner(spec("minimize")), optuna.pruners.MedianPruner)
    assert isinstance(make_pruner(spec("minimize", "hyperband")), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner(spec("minimize", "none")), optuna.pruners.NopPruner)
    # A minimized objective: the pruner gets the NELBO, so a worse ELBO is a larger value, and a run far
    # below the others' median is stopped; steps continue across seeds.
    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.MedianPruner(n_startup_trials=2))
    for elbo in (-100.0, -110.0):
        t = study.ask()
        for seed_index in (0, 1):
            on_epoch = _pruning_callback(study, spec("minimize"), t, seed_index, epochs=3)
            for epoch in (1, 2, 3):
                on_epoch({"epoch": epoch, "val/elbo": elbo})
        assert t.storage.get_trial(t._trial_id).intermediate_values == {s: -elbo for s in range(1, 7)}
        study.tell(t, -elbo)
    bad = study.ask()
    on_epoch = _pruning_callback(study, spec("minimize"), bad, 0, epochs=3)
    with pytest.raises(StopEarly) as stopped:
        on_epoch({"epoch": 1, "val/elbo": -500.0})
    assert stopped.value.epoch == 1
    good = study.ask()
    _pruning_callback(study, spec("minimize"), good, 0, epochs=3)({"epoch": 1, "val/elbo": -90.0})  # not stopped


def test_the_dashboard_serves_the_study_on_loopback(home):
    import urllib.request

    from pipeline.study import open_storage, open_study
    from pipeline.studyspec import load_study

    path = _write_study(home, "dash", {"objective.beta": [1, 2]})
    study = open_study(load_study(path), open_storage(load_study(path), None))
    study.tell(study.ask(), 3.0)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "dashboard", str(path), "--port", str(port)],
                            env=subprocess_env(home), cwd=home, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline, body = time.time() + 60, None
        while time.time() < deadline and body is None and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.3)
        assert body is not None, proc.stdout.read1().decode() if proc.poll() is not None else "no answer"
        names = [s["study_name"] for s in body["study_summaries"]]
        assert names == ["dash"]
    finally:
        proc.kill()
        proc.wait()


def test_a_dead_or_zombie_worker_is_dead_and_a_reused_pid_is_not_its_worker():
    import optuna

    from pipeline.study import _host_key, _proc_start, _worker_id, worker_alive

    def trial_held_by(worker: dict):
        return optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, system_attrs={"worker": worker})

    assert worker_alive(trial_held_by(_worker_id()))  # this very process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while _proc_start(child.pid) is not None and time.time() < deadline:  # exited, not yet reaped: a zombie
        time.sleep(0.05)
    zombie = {"host": _host_key(), "pid": child.pid, "start": 1}
    assert not worker_alive(trial_held_by(zombie))
    child.wait()
    assert not worker_alive(trial_held_by(zombie))  # reaped: gone
    me = _worker_id()
    assert not worker_alive(trial_held_by({**me, "start": me["start"] - 1}))  # same pid, another process
    remote = {"host": "elsewhere/x/1", "pid": 1, "start": 1}
    fresh = optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING,
                                      system_attrs={"worker": remote, "heartbeat": time.time()})
    stale = optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING,
                                      system_attrs={"worker": remote, "heartbeat": time.time() - 120})
    assert worker_alive(fresh) and not worker_alive(stale)


def test_a_journal_outside_the_study_directory_is_locked_next_to_itself(home, tmp_path):
    from pipeline.study import _claim_lock, open_storage, open_study, study_dir
    from pipeline.studyspec import load_study

    spec = load_study(_write_study(home, "shared", {"objective.beta": [1]}))
    shared = tmp_path / "shared_fs" / "study.journal"
    shared.parent.mkdir()
    with _claim_lock(spec, open_study(spec, open_storage(spec, str(shared)))):
        pass
    # Every machine that mounts the journal sees this lock; a lock in the local runs/ would not be shared.
    assert (shared.parent / "study.journal.claim.lock").exists()
    assert not (shared.parent / "study.journal.lock").exists()  # Optuna's writer lock, released
    assert not (study_dir(spec) / "claim.lock").exists()


def test_a_takeover_without_the_run_directory_retires_the_dead_attempts_mlflow_run(home):
    """Another machine died holding trial 0 and its run directory is not here (no shared filesystem):
    its MLflow run must not stay RUNNING forever next to the new attempt's run."""
    import optuna

    from pipeline.study import open_storage, open_study, run_study
    from pipeline.studyspec import load_study
    from pipeline.tracking import MlflowRun, client

    spec = load_study(_write_study(home, "orphan", {"objective.beta": [1]}))
    study = open_study(spec, open_storage(spec, None))
    orphan = MlflowRun("orphan", run_name="from another machine", tags={"study": "orphan", "trial": "0"})
    study.enqueue_trial({"objective.beta": 1, "seed": 0}, user_attrs={"trial_index": 0})
    dead = study.ask()
    dead.set_user_attr("mlflow_run_ids", {"0": orphan.run_id})
    study._storage.set_trial_system_attr(dead._trial_id, "worker", {"host": "elsewhere/x/1", "pid": 1, "start": 1})
    study._storage.set_trial_system_attr(dead._trial_id, "heartbeat", time.time() - 600)

    assert run_study(spec, log=lambda *_: None).done == {0}
    old = client().get_run(orphan.run_id)
    assert old.info.status == "KILLED" and old.data.tags["failure_reason"] == "worker_died"
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]
    new_run = trials[1].user_attrs["mlflow_run_id"]
    assert new_run != orphan.run_id and client().get_run(new_run).info.status == "FINISHED"


def test_a_rerun_of_a_complete_study_closes_a_parent_run_left_running(home):
    """The process died after the last trial, before it closed the study's MLflow run."""
    from pipeline.study import run_study
    from pipeline.studyspec import load_study
    from pipeline.tracking import client

    spec = load_study(_write_study(home, "closing", {"objective.beta": [1]}))
    run_study(spec, log=lambda *_: None)
    (parent,) = [r for r in _mlflow_runs("closing") if r.data.tags.get("role") == "study"]
    client().update_run(parent.info.run_id, status="RUNNING")
    messages: list[str] = []
    run_study(spec, log=messages.append)
    assert "complete" in messages[0] and any("closed the study's MLflow run" in m for m in messages)
    assert client().get_run(parent.info.run_id).info.status == "FINISHED"


def test_a_lost_journal_does_not_create_a_second_parent_run(home):
    from pipeline.study import run_study
    from pipeline.studyspec import load_study

    spec = load_study(_write_study(home, "lost", {"objective.beta": [1, 8]}))
    run_study(spec, log=lambda *_: None, max_trials=1)
    (first,) = [r.info.run_id for r in _mlflow_runs("lost") if r.data.tags.get("role") == "study"]
    (home / "runs" / "lost" / "optuna.journal").unlink()
    run_study(spec, log=lambda *_: None)
    parents = [r for r in _mlflow_runs("lost") if r.data.tags.get("role") == "study"]
    assert [p.info.run_id for p in parents] == [first] and parents[0].info.status == "FINISHED"
    trials = [r for r in _mlflow_runs("lost") if r.data.tags.get("role") != "study"]
    assert len(trials) == 2 and all(r.data.tags["mlflow.parentRunId"] == first for r in trials)


def test_a_torn_last_journal_record_is_set_aside_and_the_study_resumes(home):
    """A kill or ENOSPC mid-append leaves a record without its newline; appending after it used to make
    every later read fail with a JSONDecodeError."""
    from pipeline.study import run_study, status_rows
    from pipeline.studyspec import load_study

    spec = load_study(_write_study(home, "torn", {"objective.beta": [1, 8]}))
    run_study(spec, log=lambda *_: None, max_trials=1)
    journal = home / "runs" / "torn" / "optuna.journal"
    whole = journal.read_bytes()
    torn = whole + b'{"op_code": 6, "worker_id": "dead", "trial_id": 1, "sta'
    journal.write_bytes(torn)
    messages: list[str] = []
    progress = run_study(spec, log=messages.append)
    assert progress.done == {0, 1}
    copies = list(journal.parent.glob("optuna.journal.torn-*"))
    assert len(copies) == 1 and whole + copies[0].read_bytes() == torn  # the bytes cut, kept
    assert journal.read_bytes().startswith(whole) and journal.read_bytes().endswith(b"\n")
    assert [row["state"] for row in status_rows(spec)] == ["COMPLETE", "COMPLETE"]
    _check_study_integrity(home, "torn", 2, steps_per_trial=4)


def test_an_append_after_a_torn_record_cuts_it_first(tmp_path):
    """A full disk often lets part of a record through while the process lives on: its heartbeat thread (or
    another worker) appends next, and that must not land on the torn line."""
    import json as json_

    from pipeline.journal import RepairingJournalBackend

    path = tmp_path / "x.journal"
    backend = RepairingJournalBackend(str(path))
    backend.append_logs([{"op_code": 0, "worker_id": "a", "study_name": "s", "directions": [1]}])
    with open(path, "ab") as f:
        f.write(b'{"op_code": 5, "worker_id": "a", "trial_id": 0, "dat')  # the disk filled up here
    backend.append_logs([{"op_code": 1, "worker_id": "a", "study_id": 0, "user_attr": {"k": 1}}])
    lines = path.read_bytes().splitlines()
    assert len(lines) == 2 and all(json_.loads(line) for line in lines)
    assert list(tmp_path.glob("x.journal.torn-*"))


def test_a_journal_broken_before_its_end_or_a_directory_is_one_clear_error(home, tmp_path):
    from pipeline.journal import JournalError
    from pipeline.study import open_storage, run_study
    from pipeline.studyspec import load_study

    spec = load_study(_write_study(home, "broken", {"objective.beta": [1]}))
    run_study(spec, log=lambda *_: None)
    journal = home / "runs" / "broken" / "optuna.journal"
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(lines[0] + b"garbage\n" + b"".join(lines[1:]))
    with pytest.raises(JournalError, match=r"optuna.journal, line 2: not a valid Optuna journal record"):
        run_study(spec, log=lambda *_: None)
    with pytest.raises(JournalError, match="is a directory"):
        open_storage(spec, str(tmp_path))


def test_a_full_disk_stops_the_study_after_one_trial_instead_of_failing_them_all(home, monkeypatch):
    import errno

    from pipeline import study as study_mod
    from pipeline.studyspec import load_study

    calls = []

    def no_space(*a, **kw):
        calls.append(1)
        raise OSError(errno.ENOSPC, "No space left on device", str(home / "runs" / "x" / "checkpoint.pt"))

    monkeypatch.setattr(study_mod, "train_stage", no_space)
    spec = load_study(_write_study(home, "full", {"objective.beta": [1, 2, 4]}))
    with pytest.raises(OSError) as e:
        study_mod.run_study(spec, log=lambda *_: None)
    assert e.value.errno == errno.ENOSPC and calls == [1]
    states = [t.state.name for t in _optuna_trials(home, "full")]
    assert states == ["FAIL"]  # retried by the rerun, like any failed trial


# --- what the study shows in the MLflow UI and optuna-dashboard ------------------------------------------
def _frozen(number: int, index: int, state: str = "COMPLETE", values=None, **params):
    import optuna
    from optuna.distributions import CategoricalDistribution

    t = optuna.trial.create_trial(
        state=optuna.trial.TrialState[state], values=values if state == "COMPLETE" else None, params=params,
        distributions={k: CategoricalDistribution([v]) for k, v in params.items()},
        user_attrs={"trial_index": index, "mlflow_run_ids": {"0": f"run{number}"}})
    t.number = number
    return t


def test_the_best_config_is_the_leaderboards_first_and_counts_follow_each_trials_latest_attempt():
    from pipeline.study import best_config, trial_counts

    # A grid of β × seed, maximized: β = 1 has the better mean (3.0 vs 2.5) though β = 8 has the best seed.
    grid = [_frozen(0, 0, values=[2.0], **{"objective.beta": 1, "seed": 0}),
            _frozen(1, 1, values=[4.0], **{"objective.beta": 1, "seed": 1}),
            _frozen(2, 2, values=[5.0], **{"objective.beta": 8, "seed": 0}),
            _frozen(3, 3, values=[0.0], **{"objective.beta": 8, "seed": 1}),
            _frozen(4, 4, "FAIL", **{"objective.beta": 16, "seed": 0}),
            _frozen(5, 4, values=[9.0], **{"objective.beta": 16, "seed": 0}),  # the retry of index 4
            _frozen(6, 5, "PRUNED", **{"objective.beta": 16, "seed": 1}),
            _frozen(7, 6, "RUNNING", **{"objective.beta": 32, "seed": 0})]
    assert trial_counts(grid, total=8) == {"complete": 5, "pruned": 1, "failed": 0, "running": 1, "open": 1}
    point, best = best_config(grid, ["maximize"])
    assert point == {"objective.beta": 16} and [t.number for t in best] == [5]
    point, best = best_config(grid[:4], ["maximize"])
    assert point == {"objective.beta": 1} and [t.user_attrs["trial_index"] for t in best] == [0, 1]
    assert best_config(grid[:4], ["minimize"])[0] == {"objective.beta": 8}  # mean 2.5 < 3.0
    assert trial_counts(grid[:5], total=5)["failed"] == 1 and best_config([], ["maximize"]) == ({}, [])

    # Two objectives (minimize NLL, maximize units): the best first objective, ties broken by the second;
    # it is on the Pareto front, as the report's rank 1 is. A non-finite value leaves a config out.
    two = [_frozen(0, 0, values=[90.0, 3.0], b=1), _frozen(1, 1, values=[90.0, 5.0], b=2),
           _frozen(2, 2, values=[95.0, 9.0], b=3), _frozen(3, 3, values=[-float("inf"), 16.0], b=4)]
    assert best_config(two, ["minimize", "maximize"])[0] == {"b": 2}


def test_summary_metrics_hold_the_counts_the_objectives_and_the_best_configs_headline_results():
    from pipeline.study import summary_metrics
    from pipeline.studyspec import parse_study

    spec = parse_study({"name": "s", "sampler": "grid", "base": TINY_BASE, "space": {"objective.beta": [1, 8]},
                        "seeds": [0, 1], "objectives": [{"metric": "test/active_units", "direction": "maximize"}]})
    best = [_frozen(0, 0, values=[2.0], b=1), _frozen(1, 1, values=[4.0], b=1)]
    runs = [{"test/active_units": 2.0, "test/iwae_nll": 100.0, "test/elbo": -101.0, "train/kl": 5.0},
            {"test/active_units": 4.0, "test/iwae_nll": 110.0, "test/elbo": float("nan")}]
    counts = {"complete": 2, "pruned": 0, "failed": 1, "running": 0, "open": 1}
    assert summary_metrics(spec, counts, best, runs) == {
        "study/n_complete": 2.0, "study/n_pruned": 0.0, "study/n_failed": 1.0, "study/n_running": 0.0,
        "study/n_open": 1.0, "best/test/active_units": 3.0, "best/test/iwae_nll": 105.0, "best/test/elbo": -101.0}
    assert summary_metrics(spec, counts, [], []) == {f"study/n_{k}": float(v) for k, v in counts.items()}


def test_objectives_are_named_after_their_metrics_in_new_and_existing_studies_of_every_storage(home, tmp_path):
    import optuna

    from pipeline.study import open_storage, open_study
    from pipeline.studyspec import load_study

    spec = load_study(_write_search(home, "named", {"objective.beta": [1, 2]}, sampler="nsga2",
                                    objectives=(("test/iwae_nll", "minimize"), ("test/active_units", "maximize"))))
    journal = open_storage(spec, None)
    assert open_study(spec, journal).metric_names == ["test/iwae_nll", "test/active_units"]
    for storage in (open_storage(spec, str(tmp_path / "old.journal")), f"sqlite:///{tmp_path / 'old.db'}"):
        # A study made before the names were set (by an older version of this pipeline).
        old = optuna.create_study(study_name="named", storage=storage, directions=["minimize", "maximize"])
        assert old.metric_names is None
        opened = open_study(spec, open_storage(spec, storage) if isinstance(storage, str) else storage)
        assert optuna.load_study(study_name="named", storage=opened._storage).metric_names == [
            "test/iwae_nll", "test/active_units"]


def test_a_store_failing_during_the_summary_update_is_a_warning_not_a_stopped_study(home, monkeypatch):
    import optuna

    from pipeline import tracking
    from pipeline.study import update_parent_summary
    from pipeline.studyspec import load_study

    spec = load_study(_write_study(home, "blip", {"objective.beta": [1]}))
    study = optuna.create_study(directions=["maximize"])
    study.add_trial(_frozen(0, 0, values=[2.0], **{"objective.beta": 1, "seed": 0}))

    def store_down(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracking, "record_changes", store_down)
    messages: list[str] = []
    update_parent_summary(study, spec, "0" * 32, total=1, log=messages.append)
    assert len(messages) == 1 and "could not update the summary" in messages[0] and "No space left" in messages[0]
