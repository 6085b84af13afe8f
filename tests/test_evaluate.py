"""The evaluate stage on real trained checkpoints, into the run's own MLflow run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.checkpoint import CHECKPOINT, load_checkpoint
from pipeline.config import build_config
from pipeline.evaluate import METRICS_FILE, evaluate_stage
from pipeline.fileio import atomic_torch_save
from pipeline.stages import train_stage

from .conftest import subprocess_env

QUIET = dict(log=lambda *_: None)
EVAL_SMALL = ["eval.test_subset=400", "eval.iwae_k=8", "eval.n_samples=200", "eval.mi_batch=400", "eval.batch_size=200"]
TRAIN_SMALL = ["data.train_subset=1024", "train.batch_size=128", "train.epochs=1", "model.hidden_dim=64",
               "model.latent_dim=6", "train.grid_images=8", "tracking.experiment=ev"]

EXPECTED_KEYS = {
    "test/elbo", "test/recon_nll", "test/recon_nll_mean_z", "test/kl", "test/iwae_nll",
    "test/kl_dim_max", "test/collapsed_dims", "test/active_units", "test/mutual_info", "test/z_usage_gap",
    "test/iwae_k", "test/mi_batch", "test/fd_classifier", "test/recon_fd_classifier", "test/recon_class_acc",
    "test/kid", "test/kid_std", "test/precision", "test/recall", "test/pr_k", "test/pr_images",
} | {f"test/sharpness/{w}_{m}{r}" for w in ("recon", "samples") for m in ("laplacian", "tenengrad", "hf_energy")
     for r in ("", "_ratio")}


@pytest.fixture
def trained(home):
    cfg = build_config(overrides=[*TRAIN_SMALL, *EVAL_SMALL])
    return train_stage(cfg, progress=False, **QUIET)


def _runs(experiment):
    from pipeline.tracking import client

    c = client()
    return c.search_runs([c.get_experiment_by_name(experiment).experiment_id])


def test_training_ends_with_an_evaluation_in_the_same_run(trained):
    from pipeline.tracking import get_run

    run = get_run(trained.run_id)
    assert run.info.status == "FINISHED"
    assert EXPECTED_KEYS <= set(run.data.metrics)
    # Every key evaluation records is a row of the metric table (a key written anywhere else is drift), and
    # the table's test/ rows are all recorded here (a factorized prior, labels, a clean run: no test_aug/).
    from pipeline.metric_table import METRICS

    recorded = {k for k in run.data.metrics if not k.startswith(("train/", "val/"))}
    assert recorded <= set(METRICS), recorded - set(METRICS)
    expected = {k for k in METRICS if k.startswith(("test/", "trainset/"))} - {"test/bits_per_dim"}  # NaN: grey levels
    assert expected <= recorded, expected - recorded
    assert run.data.metrics["test/trainset_images"] == 400 and run.data.metrics["test/augmented"] == 0
    assert run.data.params["eval.iwae_k"] == "8"
    run_dir = Path(trained.run_dir)
    saved = json.loads((run_dir / METRICS_FILE).read_text())
    assert saved["metrics"]["test/iwae_nll"] == pytest.approx(run.data.metrics["test/iwae_nll"])
    assert len(saved["kl_per_dim"]) == 6
    # The IWAE bound is at least as tight as the single-sample ELBO (up to Monte Carlo noise).
    assert saved["metrics"]["test/iwae_nll"] <= -saved["metrics"]["test/elbo"] + 0.5
    # Prior samples against the test images: 200 samples and the first 200 test images for precision/recall.
    assert saved["params"]["pr_images"] == 200 and saved["params"]["kid_subset_size"] == 200
    for key in ("test/kid", "test/kid_std", "test/precision", "test/recall"):
        assert saved["metrics"][key] == pytest.approx(run.data.metrics[key]), key
    assert 0 <= saved["metrics"]["test/precision"] <= 1 and 0 <= saved["metrics"]["test/recall"] <= 1
    assert saved["metrics"]["test/kid_std"] > 0
    assert (run_dir / "eval" / "latent_traversals.png").exists()
    assert len(_runs("ev")) == 1


def test_reevaluating_from_the_cli_replaces_values_and_never_adds_a_run(trained, home):
    before = json.loads((Path(trained.run_dir) / METRICS_FILE).read_text())
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "evaluate", "--run", trained.run_id, "--k", "3", "--test-subset", "200",
         "--n-samples", "50", "--mi-batch", "200"],
        env=subprocess_env(home), cwd=home, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    after = json.loads((Path(trained.run_dir) / METRICS_FILE).read_text())
    assert after["params"]["iwae_k"] == 3 and before["params"]["iwae_k"] == 8
    runs = _runs("ev")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["test/iwae_k"] == 3  # the newest evaluation is the run's value


def test_an_encoder_that_outputs_the_prior_is_diagnosed_as_collapsed(trained, home):
    # Zero the encoder's output layer: μ = 0 and log σ² = 0 for every image, i.e. q(z|x) = p(z).
    ck = load_checkpoint(Path(trained.run_dir) / CHECKPOINT)
    for name in ("encoder.head.weight", "encoder.head.bias"):
        ck["model"][name] = torch.zeros_like(ck["model"][name])
    ck["run_id"] = None  # evaluate without touching the original run
    collapsed = home / "collapsed" / CHECKPOINT
    atomic_torch_save(ck, collapsed)
    m = evaluate_stage(collapsed, k=8, test_subset=400, n_samples=200, mi_batch=400, batch_size=200, **QUIET)["metrics"]
    assert m["test/active_units"] == 0 and m["test/collapsed_dims"] == 6
    assert m["test/kl"] == pytest.approx(0.0, abs=1e-9) and m["test/kl_dim_max"] == pytest.approx(0.0, abs=1e-9)
    assert abs(m["test/mutual_info"]) < 1e-9
    # Every image is decoded from prior noise alone: swapping codes across images changes nothing on average.
    assert abs(m["test/z_usage_gap"]) < 0.05 * m["test/recon_nll"]


def test_missing_checkpoint_is_a_clear_error(home):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        evaluate_stage(home / "nowhere", **QUIET)


def test_the_feature_classifier_is_accurate_and_its_frechet_distance_separates_data_from_noise(home):
    from pipeline.classifier import ensure_classifier, predict
    from pipeline.config import DataConfig
    from pipeline.data import ensure_splits
    from pipeline.metrics import frechet_distance

    splits = ensure_splits(DataConfig(), **QUIET)
    model, info = ensure_classifier(DataConfig(), splits, torch.device("cpu"), **QUIET)
    assert info["test_accuracy"] >= 0.90
    test = splits.test_x.float() / 255
    features, pred = predict(model, test)
    assert float((pred == splits.test_y).float().mean()) == pytest.approx(info["test_accuracy"], abs=1e-6)
    halves = frechet_distance(features[:5000], features[5000:])
    noise = frechet_distance(predict(model, torch.rand(5000, 1, 28, 28, generator=torch.Generator().manual_seed(0)))[0], features)
    blurred = frechet_distance(predict(model, torch.nn.functional.avg_pool2d(test, 3, 1, 1))[0], features)
    assert halves < 0.02 * noise, (halves, noise)
    assert halves < blurred < noise, (halves, blurred, noise)


@pytest.mark.parametrize(("likelihood", "extra", "dequantized"), [
    ("bernoulli", ["data.binarize=static"], False),
    ("discretized_logistic", [], False),
    ("gaussian_learned", [], True),
])
def test_bits_per_dim_is_reported_on_a_comparable_scale(home, likelihood, extra, dequantized):
    cfg = build_config(overrides=[*TRAIN_SMALL, *EVAL_SMALL, f"likelihood.name={likelihood}", *extra,
                                  "tracking.enabled=false"])
    result = train_stage(cfg, progress=False, **QUIET)
    saved = json.loads((Path(result.run_dir) / METRICS_FILE).read_text())
    m = saved["metrics"]
    assert saved["params"]["dequantized"] == int(dequantized)
    offset = 784 * math.log(256) if dequantized else 0.0
    assert m["test/bits_per_dim"] == pytest.approx((m["test/iwae_nll"] + offset) / (784 * math.log(2)))
    assert m["test/bits_per_dim"] > 0


def test_bernoulli_on_grey_levels_reports_no_bits_per_dim_as_null_in_strict_json(trained):
    from pipeline.evaluate import read_metrics

    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    path = Path(trained.run_dir) / METRICS_FILE
    strict = json.loads(path.read_text(), parse_constant=no_constants)  # no NaN token anywhere in the file
    assert strict["metrics"]["test/bits_per_dim"] is None  # not a likelihood of 8-bit data
    assert math.isnan(read_metrics(path)["metrics"]["test/bits_per_dim"])


def test_a_kill_after_the_evaluation_was_recorded_never_stores_a_test_point_twice(home, monkeypatch):
    """Killed after evaluation logged its results but before result.json: the rerun must not evaluate and
    log again (a second point per test/ key at the same step)."""
    from pipeline import evaluate as ev
    from pipeline.tracking import client, get_run

    real_record = ev._record

    def record_then_die(*a, **kw):
        real_record(*a, **kw)
        raise KeyboardInterrupt

    cfg = build_config(overrides=[*TRAIN_SMALL, *EVAL_SMALL])
    monkeypatch.setattr(ev, "_record", record_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_stage(cfg, progress=False, **QUIET)
    monkeypatch.setattr(ev, "_record", real_record)

    def no_second_evaluation(*a, **kw):
        raise AssertionError("evaluated twice")

    monkeypatch.setattr(ev, "evaluate_model", no_second_evaluation)
    result = train_stage(cfg, progress=False, **QUIET)
    run = get_run(result.run_id)
    assert result.status == "finished" and run.info.status == "FINISHED"
    for key in ("test/elbo", "test/iwae_nll", "trainset/elbo", "test/iwae_k"):
        assert len(client().get_metric_history(result.run_id, key)) == 1, key


def test_a_users_own_reevaluation_is_not_taken_for_the_runs_evaluation(home, monkeypatch):
    """Evaluation inside training failed; the user evaluated the checkpoint with other settings; the rerun of
    the training must evaluate with the run's own settings, not adopt the user's metrics.json."""
    from pipeline import evaluate as ev
    from pipeline.stages import train_stage as stage

    cfg = build_config(overrides=[*TRAIN_SMALL, *EVAL_SMALL])
    real = ev.evaluate_model

    def fails(*a, **kw):
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(ev, "evaluate_model", fails)
    with pytest.raises(RuntimeError):
        stage(cfg, progress=False, **QUIET)
    monkeypatch.setattr(ev, "evaluate_model", real)
    run_dir = next((home / "runs").rglob(CHECKPOINT)).parent
    evaluate_stage(run_dir, k=2, test_subset=100, n_samples=50, **QUIET)  # the user's look, same MLflow run
    calls = []
    monkeypatch.setattr(ev, "evaluate_model", lambda *a, **kw: calls.append(kw["k"]) or real(*a, **kw))
    stage(cfg, progress=False, **QUIET)
    assert calls == [8]  # the run's own eval.iwae_k, evaluated again
    assert json.loads((run_dir / METRICS_FILE).read_text())["params"]["test_images"] == 400
