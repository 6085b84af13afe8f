"""Scale-out on real engines: PostgreSQL-backed Optuna, an MLflow tracking server, three workers, a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from pipeline.train import PER_STEP_KEYS

from .conftest import free_port, subprocess_env

BASE = {
    # What is under test is the engines, not the model: short runs, ranked by val/elbo, no test-set pass.
    "data.train_subset": 1024, "train.epochs": 2, "train.batch_size": 64, "model.hidden_dim": 32,
    "model.latent_dim": 4, "train.grid_images": 4, "eval.enabled": False, "tracking.flush_every": 5,
}
STEPS = 2 * 1024 // 64


def _postgres_available() -> bool:
    from pipeline.services import ServiceError, pg_bindir

    try:
        pg_bindir()
        return True
    except ServiceError:
        return False


@pytest.fixture(scope="module")
def servers(tmp_path_factory, prepared_data_dir):
    """A fresh home with a real PostgreSQL cluster and MLflow server on loopback, stopped at the end
    whatever happened."""
    if not _postgres_available():
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL must be installed in CI (make test installs Debian's postgresql as root)")
        pytest.skip("PostgreSQL is not installed")
    from pipeline import services

    home = tmp_path_factory.mktemp("scaleout")
    (home / "data").symlink_to(prepared_data_dir, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAE_PIPELINE_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("PGPASSFILE", raising=False)
        pg_port, mlflow_port = free_port(), free_port()
        log = []
        try:
            pg = services.start_postgres(pg_port, log=log.append)
            url = services.start_server(mlflow_port, pg_port=pg_port, log=log.append)
            yield {"home": home, "storage": pg.url("optuna"), "tracking": url, "pgpass": services.pgpass_path(),
                   "pg": pg}
        finally:
            services.stop_server(log=log.append)
            services.stop_postgres(pg_port, log=log.append)


def _worker_env(servers) -> dict:
    env = subprocess_env(servers["home"])
    env.update({"MLFLOW_TRACKING_URI": servers["tracking"], "VAE_STUDY_STORAGE": servers["storage"],
                "PGPASSFILE": str(servers["pgpass"]), "OMP_NUM_THREADS": "1"})
    return env


@pytest.mark.slow
def test_three_workers_on_postgres_and_a_tracking_server_survive_a_killed_worker(servers, monkeypatch):
    import optuna

    home = servers["home"]
    path = home / "scale.yaml"
    path.write_text(yaml.safe_dump({
        "name": "scale", "sampler": "grid", "base": BASE, "seeds": [0],
        "space": {"objective.beta": [0.5, 1, 2, 4], "model.decoder_depth": [1, 2, 3]},
        "objectives": [{"metric": "val/elbo", "direction": "maximize"}],
    }))
    env = _worker_env(servers)
    workers = [subprocess.Popen([sys.executable, "-m", "pipeline", "study", str(path)], env=env, cwd=home,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    try:
        # Kill the worker of the first trial caught between its checkpoint and its end.
        monkeypatch.setenv("PGPASSFILE", str(servers["pgpass"]))
        trial_dirs = home / "runs" / "scale" / "trials"
        victim = killed_dir = None
        deadline = time.time() + 300
        while victim is None and time.time() < deadline:
            for d in trial_dirs.glob("*-*"):
                if (d / "checkpoint.pt").exists() and not (d / "result.json").exists():
                    killed_dir = d
                    break
            if killed_dir is None:
                time.sleep(0.02)
                continue
            index = int(killed_dir.name.split("-")[0])
            study = optuna.load_study(study_name="scale", storage=servers["storage"])
            holders = [t.system_attrs["worker"]["pid"] for t in study.get_trials(deepcopy=False)
                       if t.state.name == "RUNNING" and t.user_attrs.get("trial_index") == index]
            victim = next((w for w in workers if w.pid in holders), None)
            if victim is None or (killed_dir / "result.json").exists():
                victim = killed_dir = None
        assert victim is not None, "no trial was caught mid-run"
        killed_run = json.loads((killed_dir / "run.json").read_text())["run_id"]
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        others = [w for w in workers if w is not victim]
        outputs = [w.communicate(timeout=600)[0] for w in others]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    assert all(w.returncode == 0 for w in others), outputs
    assert not any("database is locked" in o for o in outputs)
    assert not any(servers["pgpass"].read_text().split(":")[-1].strip() in o for o in outputs)  # no password shown

    study = optuna.load_study(study_name="scale", storage=servers["storage"])
    trials = study.get_trials(deepcopy=False)
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert Counter(t.user_attrs["trial_index"] for t in trials if t.state.name == "COMPLETE") == Counter(range(12))
    died = [t.user_attrs["trial_index"] for t in trials if t.user_attrs.get("failure_reason") == "worker_died"]
    assert died == [int(killed_dir.name.split("-")[0])]

    from mlflow.tracking import MlflowClient

    c = MlflowClient(servers["tracking"])
    exp = c.get_experiment_by_name("scale")
    runs = [r for r in c.search_runs([exp.experiment_id], max_results=1000) if r.data.tags.get("role") != "study"]
    assert Counter(r.data.tags["trial"] for r in runs) == Counter(str(i) for i in range(12))
    assert all(r.info.status == "FINISHED" for r in runs)
    assert killed_run in {r.info.run_id for r in runs}  # the killed trial went on in its own run
    for r in runs:
        for key in PER_STEP_KEYS:
            steps = [m.step for m in c.get_metric_history(r.info.run_id, key)]
            assert sorted(steps) == list(range(STEPS)), (r.data.tags["trial"], key, steps)
        assert len(c.get_metric_history(r.info.run_id, "val/elbo")) == 2
    # Artifacts went through the server into its artifact store, not into the workers' mlruns/.
    assert not (home / "mlruns").exists()
    assert any((home / "services" / "mlflow-artifacts").rglob("config.yaml"))


def test_an_unreachable_database_is_one_clear_error_with_the_password_masked(bare_home):
    from pipeline.study import StudyError, open_storage
    from pipeline.studyspec import parse_study

    spec = parse_study({"name": "x", "space": {"objective.beta": [1]},
                        "objectives": [{"metric": "test/iwae_nll", "direction": "minimize"}]})
    with pytest.raises(StudyError) as err:
        open_storage(spec, f"postgresql+psycopg://vae:s3cret@127.0.0.1:{free_port()}/optuna")
    message = str(err.value)
    assert "s3cret" not in message and "vae:***@127.0.0.1" in message and "make postgres" in message


@pytest.mark.parametrize("command", [
    ["study", str(Path(__file__).parents[1] / "studies" / "demo.yaml")],
    ["train", "--set", "data.train_subset=64"],  # `train` used to retry for minutes before saying so
    ["evaluate", "--run", "0123456789abcdef"],
], ids=lambda c: c[0])
def test_an_unreachable_tracking_server_is_one_clear_error_before_any_training(bare_home, monkeypatch, command):
    port = free_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:hunter2@127.0.0.1:{port}")
    out = subprocess.run([sys.executable, "-m", "pipeline", *command],
                         env={**subprocess_env(bare_home), "MLFLOW_TRACKING_URI": f"http://alice:hunter2@127.0.0.1:{port}"},
                         cwd=bare_home, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "cannot reach the MLflow tracking server" in out.stderr and f"127.0.0.1:{port}" in out.stderr
    assert "hunter2" not in out.stdout + out.stderr
    assert not (bare_home / "runs" / "demo" / "trials").exists()  # nothing trained


def test_claims_on_postgres_hold_an_advisory_lock_that_other_machines_see(servers, monkeypatch):
    import psycopg

    from pipeline.study import _claim_lock, open_storage, open_study
    from pipeline.studyspec import parse_study

    monkeypatch.setenv("VAE_PIPELINE_HOME", str(servers["home"]))
    monkeypatch.setenv("PGPASSFILE", str(servers["pgpass"]))
    spec = parse_study({"name": "locking", "space": {"objective.beta": [1]},
                        "objectives": [{"metric": "test/iwae_nll", "direction": "minimize"}]})
    study = open_study(spec, open_storage(spec, servers["storage"]))

    def advisory_locks() -> int:
        with psycopg.connect(host="127.0.0.1", port=servers["pg"].port, user="vae", dbname="optuna") as conn:
            return conn.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted").fetchone()[0]

    assert advisory_locks() == 0
    with _claim_lock(spec, study):
        assert advisory_locks() == 1  # held in the database, not in a file of this machine
    assert advisory_locks() == 0


def test_masking_hides_passwords_in_urls_and_query_strings():
    from pipeline.errors import masked

    assert masked("postgresql+psycopg://vae:pa55@db:5432/optuna") == "postgresql+psycopg://vae:***@db:5432/optuna"
    assert masked("host=db password=pa55 user=vae") == "host=db password=*** user=vae"
    assert masked("postgresql://db/optuna?user=vae&password=pa55&sslmode=require").endswith("password=***&sslmode=require")
