"""The report's text and tables, section by section, around the figures."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd

from pipeline.report import figures as F
from pipeline.report import inference
from pipeline.report.analysis import Analysis, holm_note, power_cells, remedy_order
from pipeline.report.collect import DECODER_NAMES, STATES, fmt_level
from pipeline.report.render import Bullets, Document, FigureBlock, Section, Table, Text, figure_block
from pipeline.report.stats import ANOVA_NOTE, INTERVAL_NOTE, LEVEL, mean_ci
from pipeline.report.verdict import ONSET_RULE, RULE, measures_of, prior_factorizes


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "–"
    h, rem = divmod(int(round(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


def _factor_table(a: Analysis) -> Table:
    spec = a.data.spec
    rows = []
    for f in a.factors:
        levels = spec.space[f.key]
        shown = ", ".join(fmt_level(v) for v in f.levels) if f.kind != "continuous" else (
            f"{levels.low:g} … {levels.high:g}" + (" (log)" if levels.log else "") + (f", step {levels.step:g}" if levels.step else ""))
        rows.append({"factor": f.key, "label": f.label, "kind": f.kind, "levels": shown,
                     **({"baseline": fmt_level(spec.baseline.get(f.key, "–"))} if spec.baseline else {})})
    return Table(pd.DataFrame(rows), "The study's factors and their levels (numeric levels ascending).")


def _state_table(a: Analysis) -> Table:
    trials = a.data.trials
    counts = {s: int((trials.state == s).sum()) if len(trials) else 0 for s in STATES}
    expected = len(trials)
    row = {"trials": expected, **counts}
    return Table(pd.DataFrame([row]), "Logical trials (a config and a seed for grid/OFAT; a drawn config for "
                                      "searches) by state, from the Optuna storage (else MLflow).")


def _missing_table(a: Analysis) -> Table | None:
    trials = a.data.trials
    if trials.empty:
        return None
    todo = trials[trials.state != "complete"].copy()
    if todo.empty:
        return None
    explain = {"missing": "not started yet", "running": "running (or its worker died: rerunning the study resumes it)",
               "failed": "failed", "pruned": "pruned by the search"}
    from pipeline.study import DONE_FAILURES

    def what(state: str, reason) -> str:
        if not (isinstance(reason, str) and reason):
            return explain[state]
        retried = state == "failed" and reason not in DONE_FAILURES
        return f"{explain[state]}: {reason}" + ("; the same study command retries it" if retried else "")

    todo["what"] = [what(s, r) for s, r in zip(todo.state, todo.reason)]
    todo = todo[["trial", "seed", "config", "state", "what"]]
    return Table(todo.reset_index(drop=True), "Trials without final results: what the report is missing and why.")


def _leaderboard(a: Analysis) -> Table:
    s = a.summary.sort_values("rank")
    cols = {"rank": s["rank"], "config": s.config, "verdict": s.verdict}
    for m, d in a.objectives:
        cols[f"{m} ({'↓' if d == 'minimize' else '↑'})"] = [mean_ci(r, m) for _, r in s.iterrows()]
    cols["seeds"] = s.n_runs
    df = pd.DataFrame(cols)
    multi = " Several objectives: ranked by Pareto front, then by the first." if len(a.objectives) > 1 else ""
    return Table(df.reset_index(drop=True), f"Leaderboard: each config's objective(s), mean over seeds [95% t-interval]."
                                            f"{multi} Only finished runs count.")


def overview(a: Analysis, figs: dict) -> Section:
    spec = a.data.spec
    runs = a.data.runs
    blocks: list = []
    if spec.description.strip():
        blocks.append(Text(spec.description.strip()))
    blocks.append(Text(f"Sampler **{spec.sampler}** on **{spec.dataset}**; seeds {', '.join(map(str, spec.seeds))}; "
                       "objective(s): " + ", ".join(f"{d} `{m}`" for m, d in a.objectives) + "."))
    blocks.append(_factor_table(a))
    blocks.append(_state_table(a))
    if np.isfinite(a.data.compute_seconds):
        total = (f"**{_duration(a.data.compute_seconds)}**, summed over every Optuna trial attempt from its start to its "
                 "end (training and evaluation; failed and resumed attempts count; a running one until now)")
    else:
        total = (f"**{_duration(float(runs.duration_s.sum()) if len(runs) else math.nan)}**, summed over the MLflow "
                 "runs' start-to-end times")
    blocks.append(Text("No trial has started yet." if runs.empty and not a.data.compute_seconds else
                       f"Total compute time: {total}."))
    missing = _missing_table(a)
    if missing is not None:
        blocks.append(Text("**This study is not complete**: the figures and tables below use finished runs only."))
        blocks.append(missing)
    if a.data.notes:
        blocks.append(Bullets(a.data.notes))
    if a.summary.empty:
        blocks.append(Text("No trial has finished yet, so there is nothing to rank or plot."))
    else:
        blocks.append(_leaderboard(a))
    return Section("Overview", blocks)


def _verdict_table(a: Analysis) -> Table:
    rows = []
    for _, r in a.summary.iterrows():
        runs = a.finished[a.finished.point == r.point].sort_values("seed")
        onsets = [a.onsets.get(rid) for rid in runs.run_id]
        onset = ", ".join("–" if o is None else f"{o:.0f}" for o in onsets) if any(o is not None for o in onsets) else "–"
        d = int(r.latent_dim)
        informative = d - r.get("test/collapsed_dims.mean", math.nan)
        kl_dims = (f"{informative:.3g}" if np.isfinite(informative) else "–") if prior_factorizes(r.prior) else "n/a"
        rows.append({"config": r.config, "verdict": r.verdict, "rests on": measures_of(r.prior),
                     "seeds disagree": r.seed_verdicts or "–",
                     "d": d, "active units": mean_ci(r, "test/active_units"),
                     "dims with KL ≥ 0.01": kl_dims,
                     "I(x;z) (nats)": mean_ci(r, "test/mutual_info"),
                     "z-usage gap (nats)": mean_ci(r, "test/z_usage_gap"),
                     "onset (step, per seed)": onset})
    return Table(pd.DataFrame(rows), "Collapse verdict per config with the measures it rests on (means over seeds "
                                     "[95% t-interval]) and the collapse onset of each seed's run. AU: active units; "
                                     "KL dims: dimensions with mean KL ≥ 0.01 nats, n/a where the prior does not "
                                     "factorize; MI: I(x; z); z-gap: the z-usage gap.")


def _figure(figs: dict, name: str, title: str) -> FigureBlock:
    return figure_block(figs, name, title)


def collapse(a: Analysis, figs: dict) -> Section:
    blocks: list = [Text("**The rule.** " + RULE), Text(ONSET_RULE)]
    mixed = sorted({p for p in a.finished.get("prior", []) if not prior_factorizes(p)})
    if mixed:
        blocks.append(Text(f"**Priors.** This study has runs with priors that do not factorize over dimensions "
                           f"({', '.join(f'`{p}`' for p in mixed)}): their verdicts rest on active units, I(x; z) and "
                           "the z-usage gap, they have no row in the KL-per-dimension figure, and their `test/kl` "
                           "(rate) is a Monte Carlo estimate."))
    if not a.summary.empty:
        blocks.append(_verdict_table(a))
    blocks += [_figure(figs, "kl_per_dimension", "KL per dimension"),
               _figure(figs, "collapse_by_factor", "Active units and mutual information by factor"),
               _figure(figs, "training_curves", "Training curves and collapse onset")]
    return Section("Collapse", blocks)


# --- Decoder power ---------------------------------------------------------------------------------
# metric → (name, unit, whether the name is plural: "active units rise", "KL rises")
POWER_WORDS = {"test/kl": ("KL", " nats", False), "test/active_units": ("active units", "", True),
               "test/mutual_info": ("I(x; z)", " nats", False)}


def _num(v: float) -> str:
    return f"{v:.3g}"


def _change(metric: str, start: pd.Series, end: pd.Series) -> str:
    """'KL falls from 12 to 0.4 nats', or says the change is within the seed intervals."""
    name, unit, plural = POWER_WORDS[metric]
    a, b = start["mean"], end["mean"]
    s = "" if plural else "s"
    if a == b:
        return f"{name} stay{s} at {_num(a)}{unit}"
    overlap = all(np.isfinite(v) for v in (start.lo, start.hi, end.lo, end.hi)) and start.lo <= end.hi and end.lo <= start.hi
    verb = f"change{s} within the seed intervals" if overlap else f"fall{s}" if b < a else f"rise{s}"
    return f"{name} {verb} from {_num(a)} to {_num(b)}{unit}"


def _rows(n: float) -> str:
    return f"{n:g} row{'' if n == 1 else 's'} above"


def _restored(metric: str, reference: pd.DataFrame, remedy: pd.DataFrame, ref_name: str) -> str | None:
    """The remedy's value at the largest receptive field it shares with the reference, against the
    reference's there, and which share of the reference's loss from its smallest receptive field it
    makes up (only where the reference lost something)."""
    shared = sorted(set(reference.rows_above) & set(remedy.rows_above))
    if not shared:
        return None
    at = shared[-1]
    ref_end = float(reference.loc[reference.rows_above == at, "mean"].iloc[0])
    mine = float(remedy.loc[remedy.rows_above == at, "mean"].iloc[0])
    ref_start = float(reference.sort_values("rows_above")["mean"].iloc[0])
    name, unit, _ = POWER_WORDS[metric]
    text = f"{name} {_num(mine)}{unit} against {_num(ref_end)}"
    lost = ref_start - ref_end
    if at > reference.rows_above.min() and lost > 0:
        text += (f" (making up {(mine - ref_end) / lost:.0%} of what {ref_name} loses from "
                 f"{_rows(reference.rows_above.min())} to {at:g})")
    return text


def power_findings(finished: pd.DataFrame) -> list[str]:
    """What the runs say, in sentences: how KL, active units and I(x; z) change from the smallest to the
    largest receptive field without a remedy (the first remedy listed, when no config goes without), and
    what each remedy gives back at the largest receptive field it shares with that reference."""
    metrics = [m for m in POWER_WORDS if m in finished]
    if finished.empty or not metrics:
        return []
    cells = {m: power_cells(finished, m) for m in metrics}
    ar = {m: c[c.autoregressive.astype(bool)] for m, c in cells.items()}
    if all(c.empty for c in ar.values()):
        return ["No run of an autoregressive decoder has finished yet: nothing to compare."]
    remedies = remedy_order(finished)
    reference = "none" if "none" in remedies else remedies[0]
    ref_name = "no remedy" if reference == "none" else f"remedy {reference}"
    out = []
    ref = {m: c[c.remedy == reference] for m, c in ar.items()}
    levels = sorted(set().union(*(set(c.rows_above) for c in ref.values())))
    if len(levels) >= 2:
        changes = []
        for m in metrics:
            r = ref[m].sort_values("rows_above")
            if len(r) >= 2:
                changes.append(_change(m, r.iloc[0], r.iloc[-1]))
        text = (f"**{ref_name.capitalize()}.** From the smallest receptive field of the autoregressive decoder "
                f"({_rows(levels[0])}) to the largest ({_rows(levels[-1])}), " + _join(changes) + ".")
    elif levels:
        text = (f"**{ref_name.capitalize()}.** Only one receptive field ({_rows(levels[0])}) has finished "
                "autoregressive runs: no trend to state yet.")
    else:
        text = f"**{ref_name.capitalize()}.** No autoregressive run has finished with it yet."
    feed_forward = {m: c[(c.remedy == reference) & ~c.autoregressive.astype(bool)] for m, c in cells.items()}
    for family in dict.fromkeys(feed_forward[metrics[0]].decoder):
        values = [(m, c.loc[c.decoder == family, "mean"]) for m, c in feed_forward.items()]
        text += (f" The feed-forward baseline ({DECODER_NAMES.get(family, family)}, no pixel seen) has "
                 + _join([f"{POWER_WORDS[m][0]} {_num(v.iloc[0])}{POWER_WORDS[m][1]}" for m, v in values if len(v)]) + ".")
    out.append(text)
    for remedy in remedies:
        if remedy == reference:
            continue
        parts = [_restored(m, ref[m], ar[m][ar[m].remedy == remedy], ref_name) for m in metrics]
        mine = ar[metrics[0]][ar[metrics[0]].remedy == remedy]
        shared = sorted(set(ref[metrics[0]].rows_above) & set(mine.rows_above))
        if not shared or not any(parts):
            out.append(f"**With {remedy}**, no autoregressive run shares a receptive field with {ref_name} yet.")
            continue
        out.append(f"**With {remedy}**, at {_rows(shared[-1])}, against {ref_name}: " + _join([p for p in parts if p]) + ".")
    if finished.groupby("point").seed.nunique().max() < 2:
        out.append("One seed per config: these are single runs, with no interval to tell a difference from noise.")
    return out


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _power_table(a: Analysis) -> Table:
    rows = []
    for _, r in a.power.iterrows():
        rows.append({"remedy": r.remedy, "decoder": r.decoder_label,
                     "rows above": "–" if not np.isfinite(r.rows_above) else int(r.rows_above),
                     "config": r.config, "seeds": int(r.n_runs), "verdict": r.verdict,
                     "KL (nats)": mean_ci(r, "test/kl"), "active units": mean_ci(r, "test/active_units"),
                     "I(x;z) (nats)": mean_ci(r, "test/mutual_info"), "z-usage gap (nats)": mean_ci(r, "test/z_usage_gap")})
    return Table(pd.DataFrame(rows), "Decoder power per config, by remedy, then by the rows above a pixel the decoder "
                                     "sees (feed-forward decoders, which see none, first): test KL rate, active units, "
                                     "I(x; z) and z-usage gap, means over seeds [95% t-interval].")


def decoder_power(a: Analysis, figs: dict) -> Section | None:
    """Shown only for a study with an autoregressive decoder in some trial."""
    if not a.autoregressive:
        return None
    blocks: list = [Text(
        "An autoregressive decoder predicts each pixel from the pixels before it as well as from z. The more rows "
        "above a pixel it sees (its receptive field: depth × (kernel size // 2) for the PixelCNN's masked stack), "
        "the more of the image it can model on its own, and the less the ELBO rewards putting information into z, "
        "so KL, active units and I(x; z) are expected to fall (Bowman et al. 2016; Chen et al. 2017); below, the "
        "runs say whether they do, and what each remedy the study ran (free bits, Kingma et al. 2016; KL "
        "annealing, Bowman et al. 2016) gives back. Feed-forward decoders see no pixel of the image (0 rows).")]
    if a.power is None or a.power.empty:
        blocks.append(Text("No config has a finished run yet."))
    else:
        blocks.append(_power_table(a))
    blocks.append(_figure(figs, "decoder_power", "KL, active units and I(x; z) against the decoder's receptive field"))
    blocks += [Text(t) for t in power_findings(a.finished)]
    return Section("Decoder power", blocks)


# Prior samples against the test images in the classifier's feature space (pipeline.evaluate.sample_quality).
SAMPLE_QUALITY = {"test/fd_classifier": "Fréchet dist.", "test/kid": "KID", "test/precision": "precision",
                  "test/recall": "recall"}


def _sample_quality_table(a: Analysis) -> Table | None:
    """None when no config has any of the measures (runs evaluated before they existed, or no classifier)."""
    if a.summary.empty or not any(f"{m}.mean" in a.summary for m in SAMPLE_QUALITY):
        return None
    rows = [{"config": r.config, "seeds": int(r.n_runs), **{name: mean_ci(r, m) for m, name in SAMPLE_QUALITY.items()}}
            for _, r in a.summary.iterrows()]
    return Table(pd.DataFrame(rows), "Prior samples against the test images, in the features of the dataset's frozen "
                                     "classifier, means over seeds [95% t-interval]: Fréchet distance, KID (unbiased "
                                     "MMD², Bińkowski et al. 2018: ≈ 0 when the samples follow the data's distribution) "
                                     "and k-NN precision and recall (Kynkäänniemi et al. 2019, k = 3). Low precision = "
                                     "samples off the data manifold (blur, artefacts); low recall = parts of the data "
                                     "the model never produces (mode dropping).")


def sharpness(a: Analysis, figs: dict) -> Section:
    blocks: list = [
        Text("Blur is measured on reconstructions and on prior samples, each relative to the real test images, so "
             "1.0 means as sharp as the data (Pech-Pacheco et al. 2000, Krotkov 1987; the README, 'Evaluation')."),
    ]
    if a.autoregressive:
        blocks.append(Text(f"**Pixel by pixel.** {F.PIXEL_BY_PIXEL}"))
    blocks += [_figure(figs, "sharpness", "Sharpness ratios"), _figure(figs, "images", "Data, reconstructions and samples")]
    quality = _sample_quality_table(a)
    if quality is not None:
        blocks.append(quality)
    reasons = a.finished.class_features.dropna().unique() if "class_features" in a.finished else []
    if len(reasons):
        blocks.append(Text(f"**Fréchet distance, KID, precision and recall** of {_runs_count(a, 'class_features')}: "
                           f"{reasons[0]}."))
    return Section("Sharpness", blocks)


def _runs_count(a: Analysis, column: str) -> str:
    n, total = int(a.finished[column].notna().sum()), len(a.finished)
    return "every finished run" if n == total else f"{n} of {total} finished runs"


def _baseline_table(a: Analysis) -> Table | None:
    if a.baseline is None or a.differences is None or a.differences.empty:
        return None
    alpha = 1 - LEVEL
    tested = bool(np.isfinite(a.differences.p_holm.to_numpy(float)).any())  # else the p column would be all –
    rows = []
    for _, tests in a.differences.groupby("point", sort=False):
        first = tests.iloc[0]
        row = {"config": first.config, "seeds": f"{first.n} vs {first.n_reference}"}
        for _, d in tests.iterrows():
            diff, lo, hi = d["diff"], d.ci95_low, d.ci95_high
            cell = "–" if not np.isfinite(diff) else (f"{diff:+.4g}" if not np.isfinite(lo) else
                                                     f"{diff:+.4g} [{lo:+.4g}, {hi:+.4g}]")
            row[f"Δ {d.metric}"] = cell + (" *" if d.p_holm < alpha else "")
            if tested:
                row[f"p Holm {d.metric}"] = d.p_holm
        rows.append(row)
    return Table(pd.DataFrame(rows), f"Config minus reference ({a.baseline_note}), mean over seeds [95% Welch "
                                     "interval]; no interval when either side has fewer than two seeds. * marks a "
                                     f"difference with Holm-adjusted p < {alpha:.2g}. " + holm_note(a.differences)
                                     + " Raw and adjusted p-values of every difference are in `summary.csv`.")


def _anova_blocks(a: Analysis) -> list:
    """The factorial ANOVA of a grid: a table of every target's terms, or why there is none."""
    if a.anova is None:
        return []
    intro = Text("**Factorial ANOVA.** Which factors and two-way interactions move each objective and collapse "
                 "measure by more than seed-to-seed noise: read the terms with a small p, and rank them by partial η², "
                 "the share of the variance not explained by the other terms that a term explains.")
    if isinstance(a.anova, str):
        return [intro, Text(a.anova)]
    rows, notes = [], []
    for metric, fit in a.anova.items():
        if isinstance(fit, str):
            notes.append(f"`{metric}`: no ANOVA, {fit}.")
            continue
        for _, r in fit.table.iterrows():
            rows.append({"metric": metric, "term": r.term, "df": int(r.df), "sum of squares": r.sum_sq, "F": r.F,
                         "p": r.p, "partial η²": r.partial_eta_sq})
        if fit.left_out:
            notes.append(f"`{metric}` ({fit.n} runs): left out of the model: {'; '.join(fit.left_out)}.")
    blocks: list = [intro]
    if rows:
        blocks.append(Table(pd.DataFrame(rows), "Factorial ANOVA per metric: main effects and two-way interactions of "
                                                "the grid's factors, one observation per finished run (seeds are "
                                                "replicates). " + ANOVA_NOTE + " The p-values are per test, not "
                                                "corrected across metrics."))
    if notes:
        blocks.append(Bullets(notes))
    return blocks


def tradeoffs(a: Analysis, figs: dict) -> Section:
    blocks: list = [
        _figure(figs, "rate_distortion", "Rate–distortion plane"),
        _figure(figs, "main_effects", "Main effects"),
        _figure(figs, "interaction", "Interaction"),
        _figure(figs, "importances", "Hyperparameter importances"),
        _figure(figs, "pareto", "Pareto front"),
        _figure(figs, "baseline_differences", "Differences against the reference config"),
    ]
    table = _baseline_table(a)
    if table is not None:
        blocks.append(table)
    blocks += _anova_blocks(a)
    return Section("Trade-offs", blocks)


def about(a: Analysis, storage_desc: str, tracking_desc: str, seconds: float | None = None) -> Section:
    return Section("About this report", [
        Text(INTERVAL_NOTE),
        Bullets([
            "`summary.csv`: one row per config (finished runs grouped by the `point` tag): its levels, verdict and "
            "rank, and for every test metric `<metric>.mean`, `.std` (sample, n−1), `.ci95_low`, `.ci95_high` "
            "(Student-t, n−1 dof) and `.n` (seeds with a value). Evaluation settings (k, batch sizes) are left out.",
            "`summary.csv`, for each metric compared with the reference config: `<metric>.diff` (config minus "
            "reference), `<metric>.p_raw` (Welch's t-test, two-sided) and `<metric>.p_holm` (Holm-adjusted over "
            "every difference the report tests); empty for the reference itself and where a side has fewer than "
            "two seeds.",
            "`figures/`: every figure as PNG (embedded here) and PDF.",
            f"Data: MLflow {tracking_desc} (experiment `{a.data.spec.name}`), Optuna {storage_desc}.",
            "Regenerate: `make report STUDY=<study file>` or `python -m pipeline report <study file>`.",
        ]),
        Text(f"Generated {dt.datetime.fromtimestamp(a.data.collected_at, dt.UTC):%Y-%m-%d %H:%M} UTC"
             + (f" in {seconds:.1f} s." if seconds else ".")),
    ])


def document(a: Analysis, figs: dict, storage_desc: str, tracking_desc: str) -> Document:
    spec = a.data.spec
    n_done = int((a.data.trials.state == "complete").sum()) if len(a.data.trials) else 0
    subtitle = (f"Ablation report of study `{spec.name}`: {len(a.summary)} configs with finished runs, "
                f"{n_done}/{len(a.data.trials)} trials complete.")
    sections = [overview(a, figs), collapse(a, figs), decoder_power(a, figs), inference.section(a, figs),
                sharpness(a, figs), tradeoffs(a, figs), about(a, storage_desc, tracking_desc)]
    return Document(f"Study report: {spec.name}", subtitle, [s for s in sections if s is not None])
