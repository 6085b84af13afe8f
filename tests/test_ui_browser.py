"""The MLflow UI and optuna-dashboard as a new user meets them after a study, in a real headless Chromium
driven by Playwright (issue 15): the links the study command prints land on the runs in MLflow's
model-training view, not its GenAI overview; the trial runs are there with their dataset; the study's
run carries its summary; a run's metrics page draws train/kl; optuna-dashboard names the objective after
its metric and links each trial to its MLflow run. Screenshots are kept in reports/test-artifacts/.

One tiny study (2 trainings) runs once for the module, while the two servers start.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import pytest
import yaml

from .browser import CHROMIUM_ARGS, chromium, keep_screenshot
from .conftest import free_port, subprocess_env

STUDY = {
    "name": "ui_t", "sampler": "grid",
    "base": {"data.train_subset": 256, "train.epochs": 1, "train.batch_size": 64, "model.hidden_dim": 32,
             "model.latent_dim": 4, "train.grid_images": 4, "eval.test_subset": 200, "eval.iwae_k": 4,
             "eval.n_samples": 100, "eval.mi_batch": 200, "eval.batch_size": 100, "tracking.flush_every": 3},
    "space": {"objective.beta": [1, 8]}, "seeds": [0],
    "objectives": [{"metric": "test/active_units", "direction": "maximize"}],
}
DEFAULT_BASE = "http://127.0.0.1:5000"  # what the study prints: `make ui`'s address
MANIFEST = "data/processed/fashion-mnist/val5000-seed0/manifest.json"


def _wait_until_serving(proc: subprocess.Popen, url: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}): {proc.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"nothing served {url} within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory, prepared_data_dir, empty_store):
    """The study run by `python -m pipeline study` (in this process, its output kept), with `python -m
    pipeline ui` and `python -m pipeline dashboard` serving it, and a headless Chromium."""
    chromium_path = chromium()  # skip (locally) before spending a minute on a study nobody can look at
    from playwright.sync_api import sync_playwright

    from pipeline import cli

    home = tmp_path_factory.mktemp("ui_home")
    (home / "data").symlink_to(prepared_data_dir, target_is_directory=True)
    shutil.copyfile(empty_store, home / "mlflow.db")
    path = home / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY, allow_unicode=True, sort_keys=False))
    env = subprocess_env(home)
    ui_port, dash_port = free_port(), free_port()
    # Started first: the servers come up while the study trains. One UI worker is plenty for one browser.
    servers = [subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env, cwd=home, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
               for args in (["ui", "--port", str(ui_port), "--workers", "1"],
                            ["dashboard", str(path), "--port", str(dash_port)])]
    try:
        printed = io.StringIO()
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
            mp.setenv("VAE_PIPELINE_HOME", str(home))
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            mp.setattr(cli, "raise_on_sigterm", lambda: None)  # keep pytest's own SIGTERM handling
            assert cli.main(["study", str(path)]) == 0, printed.getvalue()[-3000:]
            from pipeline.tracking import client, study_parent_run

            c = client()
            experiment = c.get_experiment_by_name("ui_t")
            runs = c.search_runs([experiment.experiment_id])
            parent = study_parent_run("ui_t")
        lines = printed.getvalue().splitlines()
        _wait_until_serving(servers[0], f"http://127.0.0.1:{ui_port}/health")
        _wait_until_serving(servers[1], f"http://127.0.0.1:{dash_port}/api/studies")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(60_000)
            yield SimpleNamespace(
                home=home, lines=lines, page=page, ui=f"http://127.0.0.1:{ui_port}", dashboard=f"http://127.0.0.1:{dash_port}",
                experiment_id=experiment.experiment_id, parent=parent,
                trials={r.info.run_id: r for r in runs if r.data.tags.get("role") != "study"},
                digest=hashlib.sha256((home / MANIFEST).read_bytes()).hexdigest()[:12])
            browser.close()
    finally:
        for proc in servers:
            _stop(proc)


def _printed_link(served, label: str) -> str:
    """The link the study command printed after `label`, on the test's UI instead of port 5000."""
    (line,) = [line for line in served.lines if line.startswith(f"[study] {label}")]
    link = line.split(": ", 1)[1].split()[0]
    assert link.startswith(DEFAULT_BASE + "/#/experiments/"), line
    return served.ui + link.removeprefix(DEFAULT_BASE)


def _shot(page, tmp_path, name: str) -> None:
    shot = tmp_path / name
    page.screenshot(path=str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000  # drawn, not blank
    keep_screenshot(shot)


def _close_assistant(page) -> None:
    """MLflow 3.17 opens its assistant panel on a first visit; a user closes it to see the page."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def test_the_printed_runs_link_lists_the_trial_runs_with_their_dataset_in_the_model_training_view(served, tmp_path):
    page = served.page
    link = _printed_link(served, "MLflow runs")
    assert link.endswith(f"/#/experiments/{served.experiment_id}/runs?workflowType=machine_learning")
    page.goto(link)
    parent_row = page.locator("[role=row]", has_text="study ui_t")
    parent_row.first.wait_for()
    _close_assistant(page)
    assert "/runs" in page.url and "/overview" not in page.url
    assert page.get_by_role("heading", name="Runs", exact=True).is_visible()  # "Training runs" in the GenAI view
    body = page.inner_text("body")
    assert "Token Usage" not in body and "Token usage" not in body and "Traces\n0" not in body, body[:2000]

    parent_row.first.get_by_role("button").first.click()  # the study's run is a parent: unfold its trials
    for run in served.trials.values():
        page.get_by_text(run.info.run_name, exact=True).first.wait_for()
    dataset = page.get_by_text(f"fashion-mnist ({served.digest})")
    dataset.first.wait_for()
    assert dataset.count() == len(served.trials)  # the Dataset column, one per trial run
    _shot(page, tmp_path, "mlflow_runs.png")

    # The study's own run (a click on its name) carries the summary: counts and the best config's results.
    page.goto(f"{served.ui}/#/experiments/{served.experiment_id}/runs/{served.parent}?workflowType=machine_learning")
    page.get_by_text("study/n_complete", exact=True).wait_for()
    metrics = page.inner_text("body")
    for key in ("best/test/active_units", "best/test/iwae_nll", "study/n_failed"):
        assert key in metrics, key
    assert "best_config" in metrics and "best_run_id" in metrics
    _shot(page, tmp_path, "mlflow_study_run.png")


def test_the_printed_run_link_opens_its_metric_charts_with_train_kl(served, tmp_path):
    page = served.page
    link = _printed_link(served, "the best config's run")
    run_id = link.split("/runs/")[1].split("/")[0]
    assert run_id in served.trials and link.endswith("/model-metrics?workflowType=machine_learning")
    page.goto(link)
    _close_assistant(page)
    page.get_by_placeholder("Search metric charts").fill("train/kl")
    legend = page.get_by_text(f"{served.trials[run_id].info.run_name} (train/kl)", exact=True)
    chart = page.locator("[data-testid=experiment-view-compare-runs-card]").filter(has=legend)
    chart.locator(".js-plotly-plot .scatterlayer .trace").first.wait_for()  # the curve drawn, not a spinner
    assert chart.count() == 1 and "Token Usage" not in page.inner_text("body")
    _shot(page, tmp_path, "mlflow_run_metrics.png")


def test_optuna_dashboard_names_the_objective_and_links_each_trial_to_its_mlflow_run(served, tmp_path):
    page = served.page
    with urllib.request.urlopen(f"{served.dashboard}/api/studies", timeout=10) as r:
        (summary,) = json.loads(r.read())["study_summaries"]
    page.goto(f"{served.dashboard}/dashboard/studies/{summary['study_id']}")
    page.get_by_text("test/active_units").first.wait_for()
    assert "Objective 0" not in page.inner_text("body")
    _shot(page, tmp_path, "optuna_study.png")

    page.goto(f"{served.dashboard}/dashboard/studies/{summary['study_id']}/trials")
    page.get_by_text("mlflow_run_url").first.wait_for()
    shown = page.inner_text("body")
    urls = [line.split(None, 1)[1] for line in shown.splitlines() if line.startswith("mlflow_run_url")]
    assert urls and all(u.startswith(f"{DEFAULT_BASE}/#/experiments/{served.experiment_id}/runs/") for u in urls), urls
    assert any(run_id in urls[0] for run_id in served.trials)
    _shot(page, tmp_path, "optuna_trials.png")
