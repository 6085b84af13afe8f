"""The Inference and capacity view, end to end: a tiny augmentation × latent-size study runs, its runs are
scored on training and (when augmented) augmented test images, and the report's gaps, capacity curve and
summary.csv are the numbers of the MLflow runs. Its objective, test/active_fraction, is one row of the
metric table: it shows up in status, the leaderboard and summary.csv with nothing else written for it."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import yaml

from .test_report import BASE
from .test_report_decoders import _md_table

STUDY = {
    "name": "inference_t", "sampler": "grid",
    "base": {**BASE, "train.epochs": 1, "eval.test_subset": 300, "eval.batch_size": 300, "eval.mi_batch": 150,
             "eval.n_samples": 100},
    "space": {"data.augment": ["none", "noise"], "model.latent_dim": [2, 8]},
    "seeds": [0, 1],
    "objectives": [{"metric": "test/active_fraction", "direction": "maximize"}],
}


def test_an_augmentation_and_latent_size_study_reports_its_inference_gaps_and_capacity(home):
    from pipeline.report import report_stage
    from pipeline.study import run_study, status_rows
    from pipeline.studyspec import load_study
    from pipeline.tracking import client

    path = home / "inference_t.yaml"
    path.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    spec = load_study(path)
    run_study(spec, log=lambda *_: None)
    out = report_stage(spec, log=lambda *_: None, log_to_mlflow=False).parent
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "\n## Inference and capacity\n" in md
    for name in ("inference_gaps", "capacity"):
        assert (out / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f'id="fig-{name}"' in html
    assert "This figure could not be drawn" not in html

    c = client()
    exp = c.get_experiment_by_name("inference_t")
    runs = [r for r in c.search_runs([exp.experiment_id]) if r.data.tags.get("role") != "study"]
    assert len(runs) == 8
    for r in runs:
        m, augmented = r.data.metrics, r.data.params["data.augment"] == "noise"
        assert m["test/trainset_images"] == 300 and m["test/augmented"] == int(augmented)
        assert ("test_aug/elbo" in m) == augmented  # scored on augmented images only when it trained on them
        assert m["test/active_fraction"] == m["test/active_units"] / int(r.data.params["model.latent_dim"])
        assert m["test/kl_active_fraction"] == 1 - m["test/collapsed_dims"] / int(r.data.params["model.latent_dim"])

    # Each gap in summary.csv is the seed mean of the runs' own differences.
    summary = pd.read_csv(out / "summary.csv").set_index("point")
    for point in summary.index:
        group = [r.data.metrics for r in runs if r.data.tags["point"] == point]
        for gap, (a, b) in {"gap/train_test_elbo": ("trainset/elbo", "test/elbo"),
                            "gap/sampled_z_recon": ("test/recon_nll", "test/recon_nll_mean_z"),
                            "gap/clean_augmented_elbo": ("test/elbo", "test_aug/elbo")}.items():
            diffs = [m[a] - m[b] for m in group if b in m]
            expected = sum(diffs) / len(diffs) if diffs else math.nan
            assert summary.loc[point, f"{gap}.mean"] == pytest.approx(expected, rel=1e-9, nan_ok=True), (point, gap)

    # The table in the report shows the same numbers (4 significant digits), – where there is no pair.
    table = _md_table(md, "| config | seeds | test ELBO |").set_index("config")
    by_config = summary.set_index("config")
    assert set(table.index) == set(by_config.index)
    column = "clean − augmented test ELBO (nats/image)"
    for config, row in table.iterrows():
        mean = by_config.loc[config, "gap/clean_augmented_elbo.mean"]
        if math.isnan(mean):
            assert row[column] == "–" and "augment=none" in config
        else:
            assert float(row[column].split(" [")[0]) == pytest.approx(mean, rel=5e-4)

    # The capacity sentence states the seed-averaged active units at each latent size.
    for d in (2, 8):
        per_seed = [sum(r.data.metrics["test/active_units"] for r in runs
                        if r.data.tags["seed"] == str(s) and r.data.params["model.latent_dim"] == str(d)) / 2
                    for s in (0, 1)]
        assert f"{sum(per_seed) / 2:.3g} at {d}" in md

    # A metric that is one row of the table: an objective, in status, on the leaderboard and in the CSV.
    rows = status_rows(spec)
    assert all(row["state"] == "COMPLETE" and 0 <= row["test/active_fraction"] <= 1 for row in rows)
    assert "test/active_fraction.mean" in summary and "| test/active_fraction (↑) |" in md


def test_runs_from_before_the_other_image_sets_get_a_capacity_view_and_no_gap_table():
    """Old runs have active-unit counts but neither fractions nor trainset/ keys; they still have the
    sampled-vs-mean recon pair, which alone must not bring the Inference table."""
    from types import SimpleNamespace

    from pipeline.report import inference
    from pipeline.report.render import Table

    finished = pd.DataFrame({"point": ["a", "a", "b", "b"], "seed": [0, 1, 0, 1], "latent_dim": [2, 2, 8, 8],
                             "test/active_units": [2, 2, 6, 7], "test/collapsed_dims": [0, 0, 1, 2],
                             "test/recon_nll": [250.0] * 4, "test/recon_nll_mean_z": [248.0] * 4})
    summary = pd.DataFrame({"point": ["a", "b"], "config": ["d=2", "d=8"], "n_runs": [2, 2],
                            "gap/sampled_z_recon.mean": [2.0, 2.0]})
    a = SimpleNamespace(finished=finished, summary=summary)
    assert inference.gaps_present(a) == []
    section = inference.section(a, {})
    assert section is not None and not any(isinstance(b, Table) for b in section.blocks)
    text = " ".join(getattr(b, "text", "") for b in section.blocks)
    assert "Active units go from 2 at 2 dimensions to 6.5 at 8" in text
    assert "the active fraction from 1.00 to 0.81" in text and "From 8 dimensions on" in text
    # One latent size and no other image set: no section at all.
    same = SimpleNamespace(finished=finished.assign(latent_dim=8), summary=summary)
    assert inference.section(same, {}) is None
