"""End to end on data that is not Fashion-MNIST: the UCI digits (8×8, labelled) from a PNG folder and an
.npz, each model family trained, evaluated, a tiny study reported; an unlabelled RGB 32×32 folder trained
with the conv family, its class-feature metrics reported as unavailable."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.config import build_config
from pipeline.stages import train_stage
from pipeline.tracking import client

from .test_datasets import export_digits

QUIET = dict(log=lambda *_: None, progress=False)
FAST = {
    "train.epochs": 1, "train.batch_size": 64, "model.latent_dim": 4, "model.hidden_dim": 64, "model.channels": 16,
    "train.grid_images": 4, "train.grid_images_autoregressive": 2, "eval.iwae_k": 4, "eval.n_samples": 64,
    "eval.test_subset": 100, "eval.mi_batch": 100, "eval.batch_size": 100, "eval.train_subset": False,
}


@pytest.fixture(scope="module")
def own_home(tmp_path_factory, empty_store):
    """A pipeline home with its own data directory (a user's dataset is prepared into it, not into the
    shared Fashion-MNIST one) and an empty MLflow store."""
    home = tmp_path_factory.mktemp("your_data")
    shutil.copyfile(empty_store, home / "mlflow.db")
    folder, npz = export_digits(home)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAE_PIPELINE_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        yield SimpleNamespace(home=home, folder=folder, npz=npz)


def _cfg(dataset: Path, **overrides):
    return build_config({}, {**FAST, "data.dataset": str(dataset), "data.val_size": 150, **overrides})


@pytest.mark.parametrize("source, family", [
    ("folder", {"model.arch": "mlp"}),
    ("npz", {"model.arch": "conv"}),
    ("npz", {"model.arch": "conv", "model.decoder": "pixelcnn", "likelihood.name": "categorical",
             "model.decoder_depth": 2, "model.kernel_size": 3}),
])
def test_each_family_trains_and_evaluates_on_the_digits(own_home, source, family):
    cfg = _cfg(own_home.folder if source == "folder" else own_home.npz, **family)
    result = train_stage(cfg, **QUIET)
    assert result.status == "finished"
    run_dir = Path(result.run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    m = metrics["metrics"]
    assert np.isfinite(m["test/iwae_nll"]) and np.isfinite(m["test/elbo"])
    assert np.isfinite(m["test/fd_classifier"]) and 0 <= m["test/precision"] <= 1  # labelled: a classifier
    assert not metrics.get("unavailable")
    assert Image.open(run_dir / "eval" / "test_samples.png").size[0] > 0
    run = client().get_run(result.run_id)
    assert run.data.tags["dataset_manifest_sha256"] and "train/loss" in run.data.metrics
    assert run.inputs.dataset_inputs[0].dataset.name == str(cfg.data.dataset)


def test_a_tiny_study_on_the_digits_and_its_report(own_home):
    from pipeline.report import report_stage
    from pipeline.study import run_study
    from pipeline.studyspec import load_study

    study = {"name": "digits_t", "dataset": str(own_home.npz), "sampler": "grid",
             "base": {**FAST, "data.val_size": 150}, "space": {"objective.beta": [0.5, 8]}, "seeds": [0],
             "objectives": [{"metric": "test/iwae_nll", "direction": "minimize"}]}
    path = own_home.home / "digits_t.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    spec = load_study(path)
    progress = run_study(spec, log=lambda *_: None)
    assert len(progress.done) == 2
    html = (report_stage(spec, log=lambda *_: None)).read_text()
    assert str(own_home.npz) in html and "Fréchet" in html
    summary = (own_home.home / "reports" / "digits_t" / "summary.csv").read_text()
    assert "test/fd_classifier.mean" in summary


def _rgb_folder(root: Path, n: int = 160) -> Path:
    """Unlabelled 32×32 colour images: a disc of a random colour on a background of another."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    root.mkdir(parents=True)
    for i in range(n):
        cy, cx, r = rng.integers(8, 24), rng.integers(8, 24), rng.integers(4, 9)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img = np.where(disc[..., None], rng.integers(0, 256, 3), rng.integers(0, 256, 3)).astype(np.uint8)
        Image.fromarray(img, "RGB").save(root / f"{i:03d}.png")
    return root


def test_an_unlabelled_rgb_folder_trains_the_conv_family_and_says_what_it_cannot_measure(own_home):
    from pipeline.report import report_stage
    from pipeline.study import run_study
    from pipeline.studyspec import load_study

    folder = _rgb_folder(own_home.home / "discs")
    study = {"name": "discs_t", "dataset": str(folder), "sampler": "grid",
             "base": {**FAST, "data.val_size": 16, "model.arch": "conv", "likelihood.name": "gaussian"},
             "space": {"objective.beta": [1.0]}, "seeds": [0],
             "objectives": [{"metric": "test/iwae_nll", "direction": "minimize"}]}
    path = own_home.home / "discs_t.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    spec = load_study(path)
    assert len(run_study(spec, log=lambda *_: None).done) == 1
    mlflow_client = client()
    experiment = mlflow_client.get_experiment_by_name("discs_t")
    (run,) = [r for r in mlflow_client.search_runs([experiment.experiment_id]) if r.data.tags.get("role") != "study"]
    run_dir = Path(run.data.tags["run_dir"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "test/fd_classifier" not in metrics["metrics"] and "test/kid" not in metrics["metrics"]
    assert "no labels" in metrics["unavailable"]["test/fd_classifier"]
    assert np.isfinite(metrics["metrics"]["test/sharpness/samples_laplacian_ratio"])
    assert Image.open(run_dir / "eval" / "test_samples.png").mode == "RGB"
    assert "no labels" in run.data.tags["class_feature_metrics"] and "test/kid" not in run.data.metrics
    md = (report_stage(spec, log=lambda *_: None).parent / "report.md").read_text()
    assert "**Fréchet distance, KID, precision and recall** of every finished run: unavailable: the dataset has no labels" in md


def test_a_class_feature_objective_on_unlabelled_data_is_refused_before_any_training(own_home):
    from pipeline.study import StudyError, run_study
    from pipeline.studyspec import load_study

    folder = _rgb_folder(own_home.home / "discs_kid", n=40)
    study = {"name": "discs_kid", "dataset": str(folder), "sampler": "grid", "base": {**FAST, "data.val_size": 8},
             "space": {"objective.beta": [1.0]}, "seeds": [0], "objectives": [{"metric": "test/kid", "direction": "minimize"}]}
    path = own_home.home / "discs_kid.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    with pytest.raises(StudyError, match="objective test/kid .* has none"):
        run_study(load_study(path), log=lambda *_: None)
    assert not list((own_home.home / "runs" / "discs_kid").glob("0000-*"))  # no trial directory, no training
