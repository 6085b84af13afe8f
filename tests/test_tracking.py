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


# --- the MLflow UI: links, the experiment's kind, the dataset input ---------------------------------
def test_ui_links_open_the_model_training_runs_and_a_runs_metrics_tab():
    from pipeline.tracking import ui_links

    local = ui_links("sqlite:////home/u/vae/mlflow.db", "7", "abc123")
    assert local.runs == "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    assert local.run_metrics == ("http://127.0.0.1:5000/#/experiments/7/runs/abc123/model-metrics"
                                 "?workflowType=machine_learning")
    assert not local.served  # the user starts it: make ui
    assert ui_links("postgresql+psycopg://vae@db/mlflow", "7", ui_port=5123).runs.startswith("http://127.0.0.1:5123/#/")
    assert ui_links("file:///tmp/mlruns", "0").run_metrics is None  # no run asked for, no run link

    # A server serves the UI itself: its address, without credentials, query or trailing slash.
    server = ui_links("https://alice:s3cr3t@mlflow.example.org/team/?x=1#frag", "12", "r9")
    assert server.served and "s3cr3t" not in server.runs and "alice" not in server.runs
    assert server.runs == "https://mlflow.example.org/team/#/experiments/12/runs?workflowType=machine_learning"
    assert server.run_metrics == ("https://mlflow.example.org/team/#/experiments/12/runs/r9/model-metrics"
                                  "?workflowType=machine_learning")
    assert ui_links("http://127.0.0.1:5000", "3").runs == (
        "http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning")


def test_experiments_are_tagged_as_model_training_when_created_and_when_an_older_one_is_opened(home):
    from pipeline.tracking import (
        EXPERIMENT_KIND_TAG,
        MODEL_DEVELOPMENT,
        client,
        experiment_links,
        get_or_create_experiment,
    )

    c = client()
    new = get_or_create_experiment("fresh")
    assert c.get_experiment(new).tags[EXPERIMENT_KIND_TAG] == "custom_model_development" == MODEL_DEVELOPMENT

    old = c.create_experiment("from-before")  # as stores made before this tag existed have them
    assert EXPERIMENT_KIND_TAG not in c.get_experiment(old).tags
    assert get_or_create_experiment("from-before") == old
    assert c.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT

    viewed = c.create_experiment("only-viewed", tags={EXPERIMENT_KIND_TAG: "genai_development_inferred"})
    links = experiment_links("only-viewed", "r1")  # a command printing links opens it too
    assert links.runs.endswith(f"/#/experiments/{viewed}/runs?workflowType=machine_learning")
    assert c.get_experiment(viewed).tags[EXPERIMENT_KIND_TAG] == MODEL_DEVELOPMENT  # a guess is replaced

    chosen = c.create_experiment("chosen", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    get_or_create_experiment("chosen")
    assert c.get_experiment(chosen).tags[EXPERIMENT_KIND_TAG] == "genai_development"  # someone's choice is kept
    assert experiment_links("no-such-experiment") is None


def test_the_dataset_input_is_logged_once_with_the_manifests_digest_and_a_reattached_run_keeps_it(home):
    import json

    from pipeline.tracking import MlflowRun, dataset_digest, get_run

    sha = "fbc46ad3cafc89cad78c8c41896690809594157a969147c2eb012e2c5a07d0de"
    assert dataset_digest(sha) == "fbc46ad3cafc"  # MLflow keeps ≤ 36 characters of a digest
    manifest = {"source": "/usr/share/datasets/fashion-mnist", "counts": {"train": 55000, "val": 5000, "test": 10000},
                "val_size": 5000, "split_seed": 0, "splits_sha256": "ab" * 32}
    run = MlflowRun("data", run_name="d")
    assert run.log_dataset_input("fashion-mnist", sha, home / "data" / "processed", manifest) is True
    run.end("KILLED")
    again = MlflowRun("data", run_id=run.run_id)  # what a resumed training does: attach, then log again
    assert again.log_dataset_input("fashion-mnist", sha, home / "data" / "processed", manifest) is False
    again.end("FINISHED")
    (only,) = get_run(run.run_id).inputs.dataset_inputs
    ds = only.dataset
    assert (ds.name, ds.digest, ds.source_type) == ("fashion-mnist", "fbc46ad3cafc", "local")
    assert json.loads(ds.source) == {"uri": str(home / "data" / "processed")}
    profile = json.loads(ds.profile)
    assert profile["manifest_sha256"] == sha and profile["original_source"] == manifest["source"]
    assert profile["counts"] == manifest["counts"]
    assert [(t.key, t.value) for t in only.tags] == [("mlflow.data.context", "train")]


def test_record_changes_writes_only_what_differs_so_a_rerun_adds_no_point(home):
    import math

    from pipeline.tracking import MlflowRun, client, record_changes

    run = MlflowRun("summary", run_name="s")
    assert sorted(record_changes(run.run_id, {"a": 1.0, "b": 2.0, "n": math.nan}, {"t": "x"}, step=1)) == ["a", "b", "t"]
    assert record_changes(run.run_id, {"a": 1.0, "b": 2.0}, {"t": "x"}, step=1) == []  # the same numbers: nothing
    assert record_changes(run.run_id, {"a": 1.0, "b": 3.0}, {"t": "y"}, step=2) == ["b", "t"]
    c = client()
    assert [(m.step, m.value) for m in c.get_metric_history(run.run_id, "a")] == [(1, 1.0)]
    assert sorted((m.step, m.value) for m in c.get_metric_history(run.run_id, "b")) == [(1, 2.0), (2, 3.0)]
    data = c.get_run(run.run_id).data
    assert data.metrics == {"a": 1.0, "b": 3.0} and data.tags["t"] == "y"  # NaN is never written


def test_the_train_command_prints_the_runs_link_and_its_runs_metrics_link(home, capsys, monkeypatch):
    from pipeline import cli
    from pipeline.tracking import client

    monkeypatch.setattr(cli, "raise_on_sigterm", lambda: None)  # keep pytest's own SIGTERM handling
    sets = ["data.train_subset=128", "train.batch_size=64", "train.epochs=1", "model.hidden_dim=16", "model.latent_dim=2",
            "train.grid_images=4", "eval.enabled=false", "tracking.experiment=cli_links"]
    assert cli.main(["train", "--no-progress", *(a for s in sets for a in ("--set", s))]) == 0
    out = capsys.readouterr().out
    exp = client().get_experiment_by_name("cli_links")
    (run,) = client().search_runs([exp.experiment_id])
    base = f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs"
    assert f"[train] MLflow runs: {base}?workflowType=machine_learning   (after `make ui`)\n" in out
    assert f"[train] this run's metrics: {base}/{run.info.run_id}/model-metrics?workflowType=machine_learning\n" in out
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_ui_print_links_lists_the_pipelines_experiments_or_the_one_asked_for(home, capsys, monkeypatch):
    from pipeline import cli
    from pipeline.tracking import MlflowRun, client

    monkeypatch.setattr(cli, "raise_on_sigterm", lambda: None)  # keep pytest's own SIGTERM handling
    ours = MlflowRun("ours", run_name="r", tags={"run_dir": "/runs/ours/x"})
    ours.end("FINISHED")
    client().create_experiment("someone-elses")  # no run of this pipeline: not listed, not tagged
    assert cli.main(["ui", "--print-links", "--port", "5123", "--host", "0.0.0.0"]) == 0
    out = capsys.readouterr().out
    exp = client().get_experiment_by_name("ours").experiment_id
    assert out == (f"[ui] experiment 'ours': http://127.0.0.1:5123/#/experiments/{exp}/runs?workflowType=machine_learning\n"
                   f"[ui]   the latest run, its metrics: http://127.0.0.1:5123/#/experiments/{exp}/runs/{ours.run_id}"
                   "/model-metrics?workflowType=machine_learning\n")
    assert "mlflow.experimentKind" not in client().get_experiment_by_name("someone-elses").tags
    assert cli.main(["ui", "--print-links", "--experiment", "someone-elses"]) == 0
    assert capsys.readouterr().out == "[ui] no experiment 'someone-elses' with runs of this pipeline in the store yet\n"
