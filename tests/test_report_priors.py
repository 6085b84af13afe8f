"""A study over priors, end to end: a mixture prior trains, resumes as a study trial, is evaluated with
its per-dimension KL left out, and the report judges it on the prior-free measures and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from .test_report import BASE

STUDY = {
    "name": "prior_t", "sampler": "grid", "base": {**BASE, "objective.beta": 0.5, "prior.components": 3},
    "space": {"prior.name": ["standard_normal", "mog", "vamp"]}, "seeds": [0],
    "objectives": [{"metric": "test/active_units", "direction": "maximize"}],
}


def test_a_prior_study_runs_and_reports_on_the_measures_each_prior_supports(home):
    from pipeline.report import report_stage
    from pipeline.study import run_study
    from pipeline.studyspec import load_study
    from pipeline.tracking import get_run

    path = home / "prior_t.yaml"
    path.write_text(yaml.safe_dump(STUDY, sort_keys=False))
    spec = load_study(path)
    assert run_study(spec, log=lambda *_: None) is not None
    out = report_stage(spec, log=lambda *_: None, log_to_mlflow=False).parent

    summary = pd.read_csv(out / "summary.csv").set_index("prior.name")
    assert set(summary.index) == {"standard_normal", "mog", "vamp"}
    assert summary.loc["mog", "prior"] == "mog"
    # β = 0.5 on a small MLP: every prior keeps its units; no verdict is "n/a" for lack of a per-dim KL.
    assert set(summary.verdict) <= {"healthy", "partial"}, summary.verdict
    assert summary["test/collapsed_dims.n"].to_dict() == {"standard_normal": 1, "mog": 0, "vamp": 0}

    md = (out / "report.md").read_text()
    assert "**Priors.** This study has runs with priors that do not factorize" in md
    assert "AU, MI, z-gap (prior-free)" in md and "AU, KL dims, MI, z-gap" in md
    assert "Not shown: 2 config(s) whose prior does not factorize" in md

    for run_dir in sorted((home / "runs" / "prior_t" / "trials").iterdir()):
        saved = json.loads((run_dir / "metrics.json").read_text())
        prior = yaml.safe_load((run_dir / "config.yaml").read_text())["prior"]["name"]
        run = get_run(json.loads((run_dir / "run.json").read_text())["run_id"])
        factorizes = prior == "standard_normal"
        assert ("test/collapsed_dims" in run.data.metrics) == factorizes
        assert (saved["kl_per_dim"] is not None) == factorizes
        assert Path(run_dir / "eval" / ("kl_per_dim.png" if factorizes else "activity_per_dim.png")).exists()
        assert ("val/kl_mc_sd" in run.data.metrics) == (not factorizes)  # the spread of the one-draw KL
        assert saved["metrics"]["test/kl"] > 0 and saved["metrics"]["test/iwae_nll"] <= -saved["metrics"]["test/elbo"] + 1
