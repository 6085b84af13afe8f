"""The report stage: a study's MLflow runs and Optuna trials → reports/<study>/.

    report.html   self-contained (figures embedded as base64 PNG, inline CSS, no script)
    report.md     the same text, linking figures/
    summary.csv   one row per config: mean, std and 95% t-interval over seeds of every test metric
    figures/      every figure as PNG and PDF

Layout of the package: collect (MLflow + Optuna → pandas), stats (seed intervals), verdict (the
collapse rule), analysis (per-config tables), figures, importance (Optuna's evaluators),
sections (text and tables), render (HTML, Markdown).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pandas as pd

from pipeline import paths
from pipeline.errors import masked
from pipeline.report.analysis import ReportError
from pipeline.study import pid_alive
from pipeline.studyspec import StudySpec

__all__ = ["ReportError", "report_stage", "reports_dir"]


def reports_dir() -> Path:
    return paths.home() / "reports"


def _figures():
    from pipeline.report import figures as F
    from pipeline.report import inference
    from pipeline.report.importance import param_importances

    return [
        ("kl_per_dimension", F.kl_heatmap), ("collapse_by_factor", F.collapse_by_factor),
        ("training_curves", F.training_curves), ("decoder_power", F.decoder_power),
        ("inference_gaps", inference.inference_gaps), ("capacity", inference.capacity), ("sharpness", F.sharpness),
        ("images", F.image_panel),
        ("rate_distortion", F.rate_distortion), ("main_effects", F.main_effects), ("interaction", F.interaction),
        ("importances", lambda a, out: F.importances(a, out, param_importances)), ("pareto", F.pareto),
        ("baseline_differences", F.baseline_differences),
    ]


def summary_frame(a):
    """summary.csv: identity and verdict columns first, then `<metric>.<stat>` for every test metric."""
    s = a.summary
    head = ["config", "point", *(f.key for f in a.factors), "latent_dim", "prior", "seeds", "n_runs", "verdict",
            "seed_verdicts", "rank"]
    if s.empty:
        return pd.DataFrame(columns=head)  # no finished config yet: the header still says what will come
    return s[head + [c for c in s.columns if c not in head]].sort_values("rank", kind="stable")


REPORT_FILES = ("summary.csv", "report.md", "report.html")  # replaced last, after figures/


def _recover(out: Path) -> None:
    """Undo what a killed report left in `out`: its half-written directory, and the earlier figures set
    aside for a swap that did not finish (put back when nothing replaced them). Another live report's
    work is left alone."""
    for leftover in sorted(out.glob(".figures-old-*")) + sorted(out.glob(".writing-*")):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid.isdigit() and pid_alive(int(pid)) and int(pid) != os.getpid():
            continue
        if leftover.name.startswith(".figures-old-") and not (out / "figures").exists():
            os.rename(leftover, out / "figures")
        else:
            shutil.rmtree(leftover, ignore_errors=True)


def _swap_in(work: Path, out: Path) -> None:
    """Move the report written in `work` into `out`: figures/ by two renames, then each file atomically.
    Only the report's own files are touched: `--out` may hold other files."""
    figures, old = out / "figures", out / f".figures-old-{os.getpid()}"
    if figures.exists():
        os.rename(figures, old)
    os.rename(work / "figures", figures)
    for name in REPORT_FILES:
        os.replace(work / name, out / name)
    shutil.rmtree(old, ignore_errors=True)


def report_stage(spec: StudySpec, storage: str | None = None, out_dir: str | Path | None = None, log=print,
                 interaction: tuple[str, str] | None = None, log_to_mlflow: bool = True) -> Path:
    """Write the study's report (see the module docstring) and log it to the study's parent MLflow run.

    Returns the path of report.html. Works on a study that is running, partly failed or not started."""
    from pipeline.report import render, sections
    from pipeline.report.analysis import analyze
    from pipeline.report.collect import collect
    from pipeline.tracking import log_artifact_dir, tracking_uri

    t0 = time.perf_counter()
    if interaction is not None and (len(set(interaction)) != 2 or not set(interaction) <= set(spec.factors)):
        raise ReportError(f"--interaction {' '.join(interaction)}: name two different factors of study "
                          f"{spec.name!r} ({', '.join(spec.factors)})")
    out = (Path(out_dir) if out_dir else reports_dir() / spec.name).resolve()
    # Written into a directory of its own and swapped in, so a killed report never leaves a report.md
    # that points at figures already deleted.
    out.mkdir(parents=True, exist_ok=True)
    _recover(out)
    work = out / f".writing-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    fig_dir = work / "figures"
    fig_dir.mkdir(parents=True)

    data = collect(spec, storage)
    try:
        a = analyze(data, interaction)
        log(f"[report] {spec.name}: {len(data.runs)} runs ({len(a.finished)} finished, {len(a.summary)} configs) "
            f"read in {time.perf_counter() - t0:.1f} s")
        figs: dict = {}
        for name, draw in _figures():
            if a.summary.empty:
                figs[name] = "No trial has finished yet: nothing to draw."
                continue
            try:
                figs[name] = draw(a, fig_dir)
            except Exception as e:  # one broken figure must not cost the whole report; it says so instead
                figs[name] = f"This figure could not be drawn ({type(e).__name__}: {e})."
                log(f"[report] warning: figure {name} failed: {type(e).__name__}: {e}")
        storage_desc = f"`{masked(storage)}`" if storage else f"journal `{paths.runs_dir() / spec.name / 'optuna.journal'}`"
        doc = sections.document(a, figs, storage_desc, f"`{masked(tracking_uri())}`")
        summary_frame(a).to_csv(work / "summary.csv", index=False)
        render.write(doc, work)
        _swap_in(work, out)
        html_path = out / "report.html"
    finally:
        data.close()
        shutil.rmtree(work, ignore_errors=True)
    if log_to_mlflow and data.parent_run_id:
        log_artifact_dir(data.parent_run_id, out, "report")
        log(f"[report] logged to the study's MLflow run {data.parent_run_id} (artifacts: report/report.html)")
    elif log_to_mlflow:
        log("[report] the study has no parent MLflow run yet: the report is not logged to MLflow")
    log(f"[report] {html_path} ({time.perf_counter() - t0:.1f} s)")
    return html_path
