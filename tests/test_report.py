"""The report stage on a small real study: sections, figures, verdicts, summary.csv against MLflow,
the HTML in a real headless Chromium, and a report of a study that is not finished yet.

One study runs once for the module (8 short trainings): first partly (`max_trials`), reported,
then to the end and reported again.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import yaml
from scipy import stats

from pipeline.metric_table import DERIVED, is_eval_key, is_result

from .browser import chromium as _chromium
from .browser import keep_screenshot

# A few seconds per trial on a 2-core CPU; enough data and steps that β = 100 with a deeper decoder
# reliably collapses (no active unit, no information in z) and β = 0.5 reliably does not.
BASE = {
    "data.train_subset": 1024, "train.epochs": 2, "train.batch_size": 64, "model.hidden_dim": 64,
    "model.latent_dim": 4, "train.grid_images": 4, "eval.test_subset": 500, "eval.iwae_k": 4,
    "eval.n_samples": 200, "eval.mi_batch": 250, "eval.batch_size": 250, "tracking.flush_every": 16,
}
STUDY = {
    "name": "report_t", "sampler": "grid", "base": BASE,
    "space": {"objective.beta": [0.5, 100], "model.decoder_depth": [1, 3]},
    "seeds": [0, 1],
    # Two objectives, so the Pareto figure is drawn as well.
    "objectives": [{"metric": "test/active_units", "direction": "maximize"},
                   {"metric": "test/iwae_nll", "direction": "minimize"}],
}
HEALTHY, COLLAPSED = "β=0.5, dec. depth=1", "β=100, dec. depth=3"
FIGURES = ("kl_per_dimension", "collapse_by_factor", "training_curves", "inference_gaps", "sharpness", "images", "rate_distortion",
           "main_effects", "interaction", "importances", "pareto", "baseline_differences")
SECTIONS = ("Overview", "Collapse", "Inference and capacity", "Sharpness", "Trade-offs")


def test_the_collapse_rule_onset_and_intervals_on_known_answers():
    from pipeline.report.stats import pareto_mask, t_interval, welch_difference
    from pipeline.report.verdict import collapse_onset, verdict

    assert verdict(0, 16, 0, 0.0, 0.0) == "collapsed"  # the posterior is the prior
    assert verdict(3, 16, 3, 0.05, 40.0) == "collapsed"  # units vary but carry no information
    assert verdict(16, 16, 16, 6.0, 0.3) == "collapsed"  # the decoder ignores z
    assert verdict(2, 16, 2, 2.0, 274.0) == "partial"  # the demo's β = 16 Bernoulli config
    assert verdict(13, 16, 13, 4.6, 1349.0) == "healthy"
    assert verdict(16, 16, 16, float("nan"), 500.0) == "n/a"

    steps = [0, 10, 20, 30, 40, 50]
    assert collapse_onset(steps, [0.5, 2.0, 0.5, 0.03, 0.02, 0.01], latent_dim=4) == 30  # below 0.04 from step 30 on
    assert collapse_onset(steps, [0.5, 2.0, 0.01, 0.03, 0.05, 0.01], latent_dim=4) == 50  # a late bump resets it
    assert collapse_onset(steps, [0.5, 2.0, 3.0, 3.0, 3.0, 3.0], latent_dim=4) is None
    assert collapse_onset(steps, [0.01] * 6, latent_dim=4) == 0

    mean, std, lo, hi, n = t_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 dof) · s/√n with s = 1
    assert (mean, std, n) == (2.0, 1.0, 3) and lo == pytest.approx(2 - half) and hi == pytest.approx(2 + half)
    one = t_interval([5.0])
    assert one[0] == 5.0 and all(math.isnan(v) for v in one[1:4])  # one seed: no spread, no interval
    diff, lo, hi = welch_difference([4.0, 5.0, 6.0], [1.0, 2.0, 3.0])  # 4 Welch dof, t = 2.776445
    assert diff == 3.0 and lo == pytest.approx(3 - 2.7764451051977987 * math.sqrt(2 / 3))
    assert all(math.isnan(v) for v in welch_difference([4.0], [1.0, 2.0])[1:])
    front = pareto_mask([[1, 5], [2, 2], [3, 3], [5, 1]], ["minimize", "minimize"])
    assert front.tolist() == [True, True, False, True]


@pytest.fixture(scope="module")
def study(tmp_path_factory, prepared_data_dir):
    """The study run in two steps in its own pipeline home, with a report after each."""
    from pipeline.report import report_stage
    from pipeline.study import run_study
    from pipeline.studyspec import load_study

    home = tmp_path_factory.mktemp("report_home")
    (home / "data").symlink_to(prepared_data_dir, target_is_directory=True)
    path = home / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY, allow_unicode=True, sort_keys=False))
    quiet = lambda *_: None  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAE_PIPELINE_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        spec = load_study(path)
        run_study(spec, log=quiet, max_trials=3)
        partial = report_stage(spec, out_dir=home / "partial", log=quiet, log_to_mlflow=False).parent
        run_study(spec, log=quiet)
        messages: list[str] = []
        full = report_stage(spec, log=messages.append).parent
        yield SimpleNamespace(home=home, spec=spec, partial=partial, full=full, messages=messages)


def test_the_report_has_every_section_and_figure_and_the_right_verdicts(study):
    html = (study.full / "report.html").read_text()
    md = (study.full / "report.md").read_text()
    assert study.full == study.home / "reports" / "report_t"
    for title in SECTIONS:
        assert f">{title}</h2>" in html, title
        assert f"\n## {title}\n" in md, title
    for name in FIGURES:
        png, pdf = study.full / "figures" / f"{name}.png", study.full / "figures" / f"{name}.pdf"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert pdf.read_bytes()[:5] == b"%PDF-", name
        assert f'id="fig-{name}"' in html and f"figures/{name}.png" in md, name
    assert html.count("<img ") == len(FIGURES)
    assert "This figure could not be drawn" not in html

    summary = pd.read_csv(study.full / "summary.csv")
    verdicts = dict(zip(summary.config, summary.verdict))
    assert verdicts[COLLAPSED] == "collapsed", summary[["config", "verdict", "test/active_units.mean"]]
    assert verdicts[HEALTHY] == "healthy", summary[["config", "verdict", "test/active_units.mean"]]
    assert "**collapsed** when" in md  # the rule is printed
    assert '<td class="collapsed">collapsed</td>' in html and '<td class="healthy">healthy</td>' in html

    # Collapse onset: the collapsed config's runs end with their KL at the collapsed level, the healthy ones never.
    from pipeline.report.analysis import analyze
    from pipeline.report.collect import collect

    a = analyze(collect(study.spec))
    runs = a.finished.set_index("run_id")
    onsets = {rid: a.onsets.get(rid) for rid in runs.index}
    assert all(onsets[r] is not None for r in runs.index[runs.config == COLLAPSED])
    assert all(onsets[r] is None for r in runs.index[runs.config == HEALTHY])

    from pipeline.tracking import client

    parent = json.loads((study.home / "runs" / "report_t" / "parent.json").read_text())["run_id"]
    logged = {f.path for f in client().list_artifacts(parent, "report")}
    assert {"report/report.html", "report/summary.csv", "report/figures"} <= logged
    assert any("logged to the study's MLflow run" in m for m in study.messages)


def test_summary_csv_equals_an_independent_aggregation_of_the_mlflow_runs(study):
    from pipeline.tracking import client

    c = client()
    exp = c.get_experiment_by_name("report_t")
    runs = [r for r in c.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("study") == "report_t" and r.data.tags.get("role") != "study"]
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    by_point: dict[str, list] = {}
    for r in runs:
        by_point.setdefault(r.data.tags["point"], []).append(r)
    metrics = {k for r in runs for k in r.data.metrics if is_eval_key(k) and is_result(k)}
    # The inference gaps: differences within a run, summarized like its results.
    derived = {m.key: m.of for m in DERIVED if set(m.of) <= metrics}
    assert "gap/train_test_elbo" in derived and "gap/clean_augmented_elbo" not in derived  # no augmentation

    def value(r, m):
        return r.data.metrics[derived[m][0]] - r.data.metrics[derived[m][1]] if m in derived else r.data.metrics.get(m)

    summary = pd.read_csv(study.full / "summary.csv").set_index("point")
    assert set(summary.index) == set(by_point)
    assert {c.rsplit(".", 1)[0] for c in summary.columns if c.endswith(".mean")} == metrics | set(derived)
    assert "test/eval_seconds" in {k for r in runs for k in r.data.metrics}  # logged, but timing: not summarized
    for point, group in by_point.items():
        row = summary.loc[point]
        assert row.n_runs == len(group) == 2
        assert row["objective.beta"] == float(group[0].data.params["objective.beta"])
        for m in metrics | set(derived):
            values = [v for v in (value(r, m) for r in group) if v is not None]
            n = len(values)
            mean = sum(values) / n
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
            half = stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)
            assert row[f"{m}.n"] == n
            assert row[f"{m}.mean"] == pytest.approx(mean, rel=1e-9, abs=1e-12), m
            assert row[f"{m}.std"] == pytest.approx(std, rel=1e-9, abs=1e-12), m
            assert row[f"{m}.ci95_low"] == pytest.approx(mean - half, rel=1e-9, abs=1e-9), m
            assert row[f"{m}.ci95_high"] == pytest.approx(mean + half, rel=1e-9, abs=1e-9), m


def test_a_report_killed_while_writing_leaves_the_previous_one_whole(study, monkeypatch):
    """The report is written aside and swapped in: a kill used to leave report.md pointing at figures the
    new run had already deleted."""
    from pipeline.report import render, report_stage

    def snapshot():
        return {p.relative_to(study.full): p.read_bytes() for p in study.full.rglob("*") if p.is_file()}

    before = snapshot()

    def killed_half_way(doc, out_dir):
        (out_dir / "report.md").write_text("half a report")
        raise KeyboardInterrupt

    monkeypatch.setattr(render, "write", killed_half_way)
    with pytest.raises(KeyboardInterrupt):
        report_stage(study.spec, log=lambda *_: None, log_to_mlflow=False)
    assert snapshot() == before
    assert not list(study.full.glob(".*"))  # nothing half-written left behind


def test_a_report_replaces_only_its_own_files_in_out(study, tmp_path):
    from pipeline.report import report_stage

    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    html = report_stage(study.spec, out_dir=out, log=lambda *_: None, log_to_mlflow=False)
    assert html == out.resolve() / "report.html" and (out / "thesis.tex").read_text() == "mine"
    assert (out / "figures" / "kl_per_dimension.png").exists() and not list(out.glob(".*"))


# --- the HTML in a real browser ---------------------------------------------------------------------
CHECK_SCRIPT = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const out = document.createElement('pre');
  out.id = 'img-check';
  out.textContent = JSON.stringify({n: imgs.length,
    broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)});
  document.body.appendChild(out);
});
</script>"""


def _open_in_chromium(html_file: Path, tmp: Path) -> tuple[dict, list[str]]:
    """Load `html_file` with the image check injected; return the check's result and console lines."""
    probe = tmp / f"probe-{html_file.name}"
    probe.write_text(html_file.read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    out = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    start = out.stdout.index('<pre id="img-check">') + len('<pre id="img-check">')
    check = json.loads(out.stdout[start : out.stdout.index("</pre>", start)])
    # Every console message of the page (Chromium logs them all as INFO:CONSOLE). The report has no script
    # of its own, so any message is the browser complaining: a failed resource, a blocked request, an error.
    console = [line for line in out.stderr.splitlines() if ":CONSOLE" in line]
    return check, console


def test_the_browser_check_catches_a_broken_image_and_a_console_error(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><img src="nowhere.png" alt="lost">'
                   '<script>console.error("boom")</script></body></html>')
    check, console = _open_in_chromium(bad, tmp_path)
    assert check == {"n": 1, "broken": ["lost"]}
    assert any("boom" in line for line in console)


def test_the_html_opens_in_headless_chromium_with_no_broken_image_and_no_console_error(study, tmp_path):
    report = study.full / "report.html"
    html = report.read_text()
    assert "<script" not in html and "<link" not in html and 'src="http' not in html  # self-contained, offline
    check, console = _open_in_chromium(report, tmp_path)
    assert check["n"] == len(FIGURES) and check["broken"] == [], check
    assert console == [], console

    shot = tmp_path / "report_screenshot.png"
    out = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
         f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,4000", f"--screenshot={shot}", report.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", out.stderr[-2000:]
    assert shot.stat().st_size > 50_000  # a rendered page, not a blank one
    keep_screenshot(shot)


def test_a_study_that_is_not_finished_still_reports_and_names_what_is_missing(study):
    md = (study.partial / "report.md").read_text()
    assert "This study is not complete" in md
    states = md.split("| trials | complete | pruned | failed | running | missing |")[1].splitlines()[2]
    assert [s.strip() for s in states.strip("|").split("|")] == ["8", "3", "0", "0", "0", "5"]
    missing = [line for line in md.splitlines() if "not started yet" in line]
    assert sorted(int(line.split("|")[1]) for line in missing) == [3, 4, 5, 6, 7]
    summary = pd.read_csv(study.partial / "summary.csv")
    assert sorted(summary.n_runs) == [1, 2]  # the finished runs only: configs 0 (two seeds) and 1 (one seed)
    one_seed = summary[summary.n_runs == 1].iloc[0]
    assert math.isnan(one_seed["test/active_units.std"]) and math.isnan(one_seed["test/active_units.ci95_low"])
    for name in ("kl_per_dimension", "training_curves", "rate_distortion", "images"):
        assert (study.partial / "figures" / f"{name}.png").exists(), name


# --- statistics a reviewer accepts: Holm-corrected differences, the grid's ANOVA, the importance evaluator ---
def _md_table(md: str, header_start: str) -> pd.DataFrame:
    """The Markdown table whose header line starts with `header_start`, cells as strings."""
    lines = md[md.index(header_start):].splitlines()
    lines = lines[:next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))]
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]
    return pd.DataFrame(rows[2:], columns=rows[0])


def test_differences_carry_welch_p_values_holm_corrected_over_the_family(study):
    """summary.csv's p-values against an independent computation from the MLflow runs: Welch's test per
    (config, target) against the reference (the grid's first point), Holm over all of them."""
    from statsmodels.stats.multitest import multipletests

    from pipeline.tracking import client

    c = client()
    exp = c.get_experiment_by_name("report_t")
    runs = [r for r in c.search_runs([exp.experiment_id], max_results=1000)
            if r.data.tags.get("study") == "report_t" and r.data.tags.get("role") != "study"]
    summary = pd.read_csv(study.full / "summary.csv").set_index("config")
    reference = HEALTHY  # β = 0.5, depth 1: the first grid point (the study sets no baseline)
    targets = ["test/active_units", "test/iwae_nll", "test/mutual_info"]  # objectives, then the collapse targets
    values = {}
    for r in runs:
        point = summary.index[summary.point == r.data.tags["point"]][0]
        for t in targets:
            values.setdefault((point, t), []).append(r.data.metrics[t])
    keys, raw = [], []
    for config in summary.index.drop(reference):
        for t in targets:
            a, b = values[(config, t)], values[(reference, t)]
            if pd.Series(a).var() + pd.Series(b).var() > 0:
                p = stats.ttest_ind(a, b, equal_var=False).pvalue
            else:  # every seed agrees on both sides (a count): the interval is one point, excluding 0 or not
                p = 0.0 if sum(a) / len(a) != sum(b) / len(b) else 1.0
            keys.append((config, t))
            raw.append(p)
            assert summary.loc[config, f"{t}.diff"] == pytest.approx(sum(a) / len(a) - sum(b) / len(b), rel=1e-9, abs=1e-12)
    holm = multipletests(raw, method="holm")[1]
    for (config, t), p, adjusted in zip(keys, raw, holm):
        assert summary.loc[config, f"{t}.p_raw"] == pytest.approx(p, rel=1e-9, abs=1e-15), (config, t)
        assert summary.loc[config, f"{t}.p_holm"] == pytest.approx(adjusted, rel=1e-9, abs=1e-15), (config, t)
        assert summary.loc[config, f"{t}.p_holm"] >= summary.loc[config, f"{t}.p_raw"]
    assert summary.loc[reference, [f"{t}.{s}" for t in targets for s in ("diff", "p_raw", "p_holm")]].isna().all()

    md = (study.full / "report.md").read_text()
    html = (study.full / "report.html").read_text()
    family = "over the family of all 9 tests of this comparison: 3 configs × 3 metrics, each against the reference"
    assert md.count(family) == 2 and html.count(family) == 2  # the figure's caption and the table's
    table = _md_table(md, "| config | seeds | Δ test/active_units |")
    assert len(table) == 3 and "p Holm test/iwae_nll" in table.columns
    for _, row in table.iterrows():  # the marker is the adjusted p-value's, not the interval's
        for t in targets:
            significant = summary.loc[row.config, f"{t}.p_holm"] < 0.05
            assert row[f"Δ {t}"].endswith(" *") == significant, (row.config, t)


def test_a_grid_with_two_seeds_gets_a_factorial_anova_per_objective_and_collapse_measure(study):
    from pipeline.report.analysis import analyze
    from pipeline.report.collect import collect
    from pipeline.report.stats import AnovaFit

    md = (study.full / "report.md").read_text()
    assert "**Factorial ANOVA.**" in md and "Type II sums of squares" in md
    assert ">Factorial ANOVA.</strong>" in (study.full / "report.html").read_text()
    a = analyze(collect(study.spec))
    assert list(a.anova) == ["test/active_units", "test/iwae_nll", "test/collapsed_dims", "test/mutual_info",
                             "test/z_usage_gap"]
    fits = {m: f for m, f in a.anova.items() if isinstance(f, AnovaFit)}
    assert "test/iwae_nll" in fits  # the NLL varies from seed to seed: always testable
    for metric, why in a.anova.items():  # a measure whose seeds agree exactly (a count) says so in a note
        if isinstance(why, str):
            assert f"`{metric}`: no ANOVA, {why}." in md
    table = _md_table(md, "| metric | term | df |")
    nll = table[table.metric == "test/iwae_nll"].set_index("term")
    assert list(nll.index) == ["objective.beta", "model.decoder_depth", "objective.beta × model.decoder_depth", "residual"]
    assert list(nll.df) == ["1", "1", "1", "4"]  # 8 runs − 4 cells
    assert float(nll.loc["objective.beta", "p"]) < 0.05  # β = 100 collapses: its NLL is far worse than β = 0.5's
    fit = fits["test/iwae_nll"].table.set_index("term")
    assert float(nll.loc["objective.beta", "partial η²"]) == pytest.approx(fit.loc["objective.beta", "partial_eta_sq"], rel=1e-3)


def test_the_importance_caption_names_the_evaluator_that_ran(study, monkeypatch):
    import optuna

    from pipeline.report import figures as F
    from pipeline.report.analysis import analyze
    from pipeline.report.collect import collect
    from pipeline.report.importance import param_importances

    md = (study.full / "report.md").read_text()
    assert "Optuna's fANOVA evaluator (Hutter et al. 2014" in md and "PED-ANOVA evaluator" not in md
    a = analyze(collect(study.spec))
    assert param_importances(a).evaluator == "fANOVA"

    def without_scikit_learn(*args, **kwargs):  # what Optuna's constructor raises when sklearn cannot be imported
        raise ImportError("No module named 'sklearn'")

    monkeypatch.setattr(optuna.importance, "FanovaImportanceEvaluator", without_scikit_learn)
    fallback = param_importances(a)
    assert fallback.evaluator == "PED-ANOVA" and set(fallback.by_target) <= set(a.targets) and fallback.by_target
    figure = F.importances(a, study.home / "fallback_figures", param_importances)
    assert "PED-ANOVA evaluator" in figure.caption and "scikit-learn" in figure.caption and "fANOVA evaluator" not in figure.caption


def test_the_report_cites_no_file_a_user_does_not_have(study):
    for name in ("report.md", "report.html"):
        assert "DESIGN.md" not in (study.full / name).read_text(), name
