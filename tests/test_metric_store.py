"""The fast path into MLflow's SQLite tables: a contract with MLflow's private schema.

These tests fail when an MLflow upgrade changes the schema or what `log_batch` stores: then compare
pipeline/metric_store.py's rows with the new `log_batch` (the equality test below does it) before adding
the new revision to KNOWN_SCHEMAS.
"""

from __future__ import annotations

import math
import sqlite3

import pytest

NAN, INF = float("nan"), float("inf")

# Blocks as the writer gets them: (timestamp_ms, [(key, first_step, [values of consecutive steps])]).
# Non-finite values, an identical point sent twice (a resent block), the same step again with another
# value and timestamp, a column that starts below the latest step, and ties broken by timestamp.
BLOCKS = [
    (1000, [("train/loss", 0, [5.0, 4.0, NAN, 3.0]), ("train/kl", 0, [0.1, INF, -INF, 0.2])]),
    (1000, [("train/loss", 2, [NAN, 3.0])]),  # identical to points already sent
    (2000, [("train/loss", 3, [2.5]), ("val/elbo", 3, [-100.0])]),  # step 3 again, later timestamp
    (1500, [("train/kl", 1, [0.7, 0.8])]),  # earlier steps, in between timestamps
    (3000, [("train/kl", 3, [NAN])]),  # the latest point is NaN
]


def _store_rows(db, run_id):
    conn = sqlite3.connect(db)
    try:
        metrics = sorted(conn.execute("SELECT key, value, timestamp, step, is_nan FROM metrics WHERE run_uuid = ?",
                                      (run_id,)).fetchall())
        latest = sorted(conn.execute("SELECT key, value, timestamp, step, is_nan FROM latest_metrics "
                                     "WHERE run_uuid = ?", (run_id,)).fetchall())
    finally:
        conn.close()
    return metrics, latest


def _history(c, run_id, key):
    return sorted((m.step, m.timestamp, "nan" if math.isnan(m.value) else m.value) for m in c.get_metric_history(run_id, key))


def _two_runs(c):
    from pipeline.tracking import get_or_create_experiment

    exp = get_or_create_experiment("contract", c)
    return exp, c.create_run(exp).info.run_id, c.create_run(exp).info.run_id


def test_the_installed_mlflow_schema_is_one_the_fast_path_was_checked_against(bare_home):
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    from pipeline import metric_store, paths, tracking

    tracking.client()  # creates the store
    conn = sqlite3.connect(paths.mlflow_db())
    revision, metrics, latest = metric_store.schema_of(conn)
    conn.close()
    head = ScriptDirectory.from_config(_get_alembic_config(tracking.tracking_uri())).get_current_head()
    assert revision == head
    assert revision in metric_store.KNOWN_SCHEMAS, (
        f"MLflow's tracking schema is now {revision}: check that the bulk insert still stores what log_batch "
        "stores (the tests of this file) and add the revision to metric_store.KNOWN_SCHEMAS")
    assert (metrics, latest) == metric_store.KNOWN_SCHEMAS[revision]


def test_bulk_inserts_store_exactly_what_log_batch_stores(bare_home):
    from mlflow.entities import Metric

    from pipeline import paths, tracking
    from pipeline.metric_store import SqliteMetricStore

    c = tracking.client()
    exp, by_api, by_bulk = _two_runs(c)
    for ts, columns in BLOCKS:
        c.log_batch(by_api, metrics=[Metric(k, v, ts, first + i) for k, first, vals in columns for i, v in enumerate(vals)])
    store = SqliteMetricStore(paths.mlflow_db())
    assert store.write([(by_bulk, ts, columns) for ts, columns in BLOCKS[:2]]) == {}
    assert store.write([(by_bulk, ts, columns) for ts, columns in BLOCKS[2:]]) == {}  # a second transaction
    store.close()

    api_rows, bulk_rows = _store_rows(paths.mlflow_db(), by_api), _store_rows(paths.mlflow_db(), by_bulk)
    assert bulk_rows == api_rows
    assert len(api_rows[0]) == 13 and len(api_rows[1]) == 3  # the duplicate was dropped, the rest kept
    for key in ("train/loss", "train/kl", "val/elbo"):
        assert _history(c, by_bulk, key) == _history(c, by_api, key)
    api_latest, bulk_latest = c.get_run(by_api).data.metrics, c.get_run(by_bulk).data.metrics
    assert math.isnan(bulk_latest.pop("train/kl")) and math.isnan(api_latest.pop("train/kl"))
    assert bulk_latest == api_latest == {"train/loss": 2.5, "val/elbo": -100.0}
    found = c.search_runs([exp], "metrics.`train/loss` < 3")  # what the UI's search does
    assert {r.info.run_id for r in found} == {by_api, by_bulk}


def test_refused_points_are_the_ones_log_batch_refuses_and_other_runs_are_stored(bare_home):
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    from pipeline import paths, tracking
    from pipeline.metric_store import SqliteMetricStore

    c = tracking.client()
    exp, deleted, good = _two_runs(c)
    bad_name = c.create_run(exp).info.run_id
    c.delete_run(deleted)
    with pytest.raises(MlflowException) as api_error:
        c.log_batch(bad_name, metrics=[Metric("bad key!?", 1.0, 0, 0)])
    store = SqliteMetricStore(paths.mlflow_db())
    refused = store.write([
        (good, 1, [("a", 0, [1.0, 2.0])]),
        (deleted, 1, [("a", 0, [1.0])]),
        (bad_name, 1, [("a", 0, [1.0])]),
        (bad_name, 2, [("bad key!?", 1, [1.0])]),
        (bad_name, 3, [("a", 2, [3.0])]),  # after the refused block: left out, no gap is ever stored
        (good, 2, [("a", 2, [3.0])]),
        ("f" * 32, 1, [("a", 0, [1.0])]),
    ])
    assert set(refused) == {deleted, bad_name, "f" * 32}
    assert "bad key!?" in refused[bad_name] and "bad key!?" in api_error.value.message
    assert "active" in refused[deleted] and "not found" in refused["f" * 32]
    assert [(s, v) for s, _, v in _history(c, good, "a")] == [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert _history(c, bad_name, "a") == [(0, 1, 1.0)]  # what came before the refused block
    assert _history(c, deleted, "a") == []
    assert tracking.reopen_run(good).last_steps(["a", "b"]) == {"a": 2, "b": -1}


@pytest.mark.parametrize("name", ["train/loss", "val/kl_mc_sd", "a.b-c_d e", "ratio: x/y", "ünïcode", "x" * 250,
                                  "x" * 251, "bad key!?", "tab\there", "a//b", "/a", "a/", "./a", "a/./b", "..",
                                  "a/../b", "../a", ".", "", "a\\b", "new\nline", "per%cent"])
def test_metric_names_are_refused_exactly_when_mlflow_refuses_them(name):
    """The writer checks names without importing MLflow (seconds at every start): the same rule."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_metric

    from pipeline.metric_store import name_problem

    try:
        _validate_metric(name, 1.0, 0, 0)
        mlflow_refuses = False
    except MlflowException:
        mlflow_refuses = True
    assert (name_problem(name) is not None) == mlflow_refuses


def test_the_writer_process_imports_neither_mlflow_nor_torch():
    import subprocess
    import sys

    code = "import sys, pipeline.metric_writer; print(sorted(m for m in ('mlflow', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_database_error_stores_nothing_of_the_call(bare_home):
    from pipeline import paths, tracking
    from pipeline.metric_store import SqliteMetricStore

    c = tracking.client()
    _, run_id, _ = _two_runs(c)
    store = SqliteMetricStore(paths.mlflow_db(), timeout=0.2)
    blocker = sqlite3.connect(paths.mlflow_db(), isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock past our patience
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.write([(run_id, 1, [("a", 0, [1.0, 2.0])])])
    blocker.execute("ROLLBACK")
    assert not store.conn.in_transaction
    assert _history(c, run_id, "a") == []
    assert store.write([(run_id, 1, [("a", 0, [1.0, 2.0])])]) == {}  # and the next call works
    assert len(_history(c, run_id, "a")) == 2


def test_a_store_with_another_schema_goes_through_mlflows_api(bare_home, tmp_path):
    import shutil

    from pipeline import paths, tracking
    from pipeline.metric_store import open_fast_store

    tracking.client()
    assert open_fast_store(f"sqlite:///{paths.mlflow_db()}")[0] is not None
    assert open_fast_store("http://127.0.0.1:5000") == (None, "not a SQLite store")
    missing = tmp_path / "typo #1?.db"
    assert open_fast_store(f"sqlite:///{missing}")[0] is None and not missing.exists()  # no empty file left
    other = tmp_path / "other.db"
    shutil.copy(paths.mlflow_db(), other)
    conn = sqlite3.connect(other)
    conn.execute("UPDATE alembic_version SET version_num = 'abc123'")
    conn.commit()
    conn.close()
    store, why = open_fast_store(f"sqlite:///{other}")
    assert store is None and "abc123" in why
    conn = sqlite3.connect(other)
    conn.execute("UPDATE alembic_version SET version_num = 'dc11669786a5'")
    conn.execute("ALTER TABLE metrics ADD COLUMN dataset_uuid VARCHAR(36)")  # what a new MLflow might do
    conn.commit()
    conn.close()
    store, why = open_fast_store(f"sqlite:///{other}")
    assert store is None and "laid out differently" in why


@pytest.mark.parametrize("fast", [True, False])
def test_the_writer_stores_every_point_of_both_paths(home, fast, monkeypatch):
    from pipeline import tracking

    monkeypatch.setattr(tracking, "_writers", {})
    writer = tracking._writer_for(tracking.tracking_uri(), fast=fast)
    run = tracking.MlflowRun("w", run_name="columns")
    assert run._writer is writer
    for first in range(0, 3000, 100):  # 30 blocks, stored in as many transactions as the writer drains
        run.log_columns([("train/loss", first, [float(s) for s in range(first, first + 100)]),
                         ("train/kl", first, [1.0] * 100)])
    run.log_metrics([("val/elbo", -5.0, 2999)])
    run.end("FINISHED")
    history = tracking.metric_history(run.run_id, "train/loss")
    assert history == [(s, float(s)) for s in range(3000)]
    assert run.last_steps(["train/loss", "train/kl", "val/elbo", "x"]) == {
        "train/loss": 2999, "train/kl": 2999, "val/elbo": 2999, "x": -1}
    assert tracking.get_run(run.run_id).data.metrics == {"train/loss": 2999.0, "train/kl": 1.0, "val/elbo": -5.0}
    writer.close()
