"""The tracking layer: background writer failures, masking, run re-attachment."""

from __future__ import annotations

import pytest


def test_a_failed_block_stops_the_run_and_nothing_after_the_gap_is_stored(home):
    from pipeline.tracking import MlflowRun, TrackingError, metric_history

    run = MlflowRun("w", run_name="writer-failure")
    run.log_metrics([("train/loss", 1.0, s) for s in range(3)])
    run.log_metrics([("bad key!?", 1.0, 3)])  # MLflow rejects the name: this block fails
    run.log_metrics([("train/loss", 1.0, s) for s in range(4, 7)])
    with pytest.raises(TrackingError, match="rerun the same command"):
        run.flush()
    # Steps after the failed block were dropped, so last_steps points at the gap, not beyond it.
    assert [s for s, _ in metric_history(run.run_id, "train/loss")] == [0, 1, 2]
    assert run.last_steps(["train/loss"]) == {"train/loss": 2}
    with pytest.raises(TrackingError):
        run.log_metrics([("train/loss", 1.0, 7)])
    with pytest.raises(TrackingError):
        run.end("FINISHED")
    from pipeline.tracking import get_run

    r = get_run(run.run_id)
    assert r.info.status == "FAILED" and r.data.tags["failure_reason"] == "tracking_error"


def test_credentials_aremasked():
    from pipeline.errors import masked

    assert masked("postgresql+psycopg://alice:s3cr3t@db:5432/mlflow") == "postgresql+psycopg://alice:***@db:5432/mlflow"
    assert masked("http://127.0.0.1:5000") == "http://127.0.0.1:5000"


def test_reattaching_keeps_the_run_and_its_status_when_asked(home):
    from pipeline.tracking import MlflowRun, get_run, reopen_run

    run = MlflowRun("w", run_name="x")
    run.log_metrics([("a", 1.0, 0)])
    run.end("FINISHED")
    again = reopen_run(run.run_id)
    again.log_metrics([("a", 2.0, 1)])
    again.flush()
    r = get_run(run.run_id)
    assert r.info.status == "FINISHED" and r.data.metrics["a"] == 2.0
    assert reopen_run("0" * 32) is None


def test_a_crash_while_the_store_is_created_leaves_no_store_and_the_next_command_works(bare_home, monkeypatch):
    """MLflow migrates a new SQLite store in place; dying half-way used to leave a store every later command
    failed on (`table datasets already exists`)."""
    import mlflow.store.db.utils as db_utils
    import sqlalchemy

    from pipeline import paths, tracking

    real = db_utils._initialize_tables

    def dies_half_way(engine):
        with engine.begin() as conn:  # some of the schema exists, the rest never will
            conn.execute(sqlalchemy.text("CREATE TABLE datasets (id INTEGER)"))
        raise KeyboardInterrupt

    monkeypatch.setattr(db_utils, "_initialize_tables", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        tracking.client()
    db = paths.mlflow_db()
    assert not db.exists() or db.stat().st_size == 0  # no store, not half of one
    monkeypatch.setattr(db_utils, "_initialize_tables", real)
    tracking.client().search_experiments()
    assert db.stat().st_size > 0 and not list(db.parent.glob(db.name + ".creating-*"))  # the leftover is gone
    exp = tracking.get_or_create_experiment("after")
    assert tracking.client().get_experiment(exp).name == "after"


def test_two_commands_starting_on_a_fresh_home_both_get_the_store(bare_home):
    import subprocess
    import sys

    from .conftest import subprocess_env

    code = "from pipeline.tracking import client; client().search_experiments(); print('ok')"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(bare_home), cwd=bare_home,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs


def test_binned_histories_from_sqlite_match_the_points_with_and_without_the_run_key_step_index(home, monkeypatch):
    import math
    import sqlite3

    from pipeline import tracking
    from pipeline.tracking import MlflowRun, binned_metric_histories

    runs = []
    for i, steps in enumerate((95, 250, 7)):  # unequal lengths: one bin width for all, from the longest
        run = MlflowRun("binned", run_name=f"r{i}")
        run.log_columns([("train/kl", 0, [math.nan if s % 13 == 5 else (s * 0.37 + i) % 3.1 for s in range(steps)]),
                         ("train/recon_nll", 0, [200.0 - s / (i + 1) for s in range(steps)]),
                         ("train/other", 0, [1.0] * steps)])
        run.end("FINISHED")
        runs.append(run.run_id)
    keys = ["train/kl", "train/recon_nll"]
    from_db = binned_metric_histories(runs, keys, 20)
    with monkeypatch.context() as m:  # the tracking-server path: every point fetched and averaged in Python
        m.setattr(tracking, "_sql_engine", lambda c: None)
        from_points = binned_metric_histories(runs, keys, 20)
    assert len(from_db) == len(from_points) == 2 * (8 + 20 + 1)  # bins of ⌈250 / 20⌉ = 13 steps
    for a, b in zip(from_db, from_points):
        assert a[:2] == b[:2] and a[2:] == pytest.approx(b[2:], rel=1e-12)
    tracking._sql_engine(tracking.client()).dispose()
    with sqlite3.connect(home / "mlflow.db") as conn:  # a store from before that index: the plain query
        conn.execute("DROP INDEX index_metrics_run_uuid_key_step")
    assert binned_metric_histories(runs, keys, 20) == from_db
