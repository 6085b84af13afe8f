"""From the collected tables to what the report states: per-config statistics, verdicts, ranks,
collapse onsets, the baseline, and which configs the small multiples show."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.metric_table import with_derived
from pipeline.report.collect import REMEDY_KINDS, Factor, StudyData, baseline_point, config_label
from pipeline.report.stats import (
    LEVEL,
    AnovaFit,
    config_summary,
    factorial_anova,
    holm_adjust,
    pareto_ranks,
    result_metric_names,
    t_interval,
    welch_difference,
    welch_p_value,
)
from pipeline.report.verdict import collapse_onset, verdict_of
from pipeline.studyspec import StudySpec, point_key
from pipeline.vae.custom import decoder_entry

MAX_PANELS = 16  # configs in a small-multiple figure; larger studies show a spread of the leaderboard
COLLAPSE_TARGETS = ("test/active_units", "test/mutual_info")
# The measures the collapse verdict rests on (verdict.RULE): with the objectives, what the ANOVA of a grid explains.
VERDICT_MEASURES = ("test/active_units", "test/collapsed_dims", "test/mutual_info", "test/z_usage_gap")
# Per config and target, in summary.csv: the difference against the reference and its two p-values.
DIFFERENCE_SUFFIXES = ("diff", "p_raw", "p_holm")
# What a more powerful decoder takes from the code, in the decoder-power view.
POWER_METRICS = ("test/kl", "test/active_units", "test/mutual_info")
# Per run, how its decoder and remedy are described (collect.decoder_of, collect.remedy_of).
POWER_COLUMNS = ("decoder", "autoregressive", "rows_above", "decoder_label", "remedy", "remedy_kind")


class ReportError(PipelineError, ValueError):
    """The report cannot be made as asked (e.g. an interaction factor that is not in the study)."""


@dataclass
class Analysis:
    data: StudyData
    factors: list[Factor]
    finished: pd.DataFrame  # FINISHED runs, with their own verdict
    summary: pd.DataFrame  # one row per config: levels, stats per metric, verdict, rank
    metrics: list[str]  # test metrics summarized
    objectives: list[tuple[str, str]]  # (metric, direction)
    targets: list[str]  # objectives, then active units and MI: what main effects, importances, diffs show
    interaction: tuple[Factor, Factor] | None
    baseline: str | None  # point key of the reference config
    baseline_note: str
    onsets: dict[str, float | None]  # run_id → collapse onset step
    shown: list[str]  # point keys of the configs the small multiples show, in summary order
    # Whether any trial, finished or not, has an autoregressive decoder: the decoder-power view and the
    # pixel-by-pixel notes on images are shown only then.
    autoregressive: bool = False
    power: pd.DataFrame | None = None  # summary rows with their decoder and remedy, in decoder-power order
    # One row per (config, target) against the reference: see DIFFERENCE_COLUMNS. Empty without a reference.
    differences: pd.DataFrame | None = None
    # Grids only (None otherwise): {metric: AnovaFit or why not}, or one sentence why no metric has one.
    anova: dict[str, AnovaFit | str] | str | None = None

    def factor(self, key: str) -> Factor:
        return next(f for f in self.factors if f.key == key)

    def config_of(self, point: str) -> pd.Series:
        return self.summary.loc[self.summary.point == point].iloc[0]


def _rank(summary: pd.DataFrame, objectives: list[tuple[str, str]]) -> np.ndarray:
    """Leaderboard rank: by the objective; with several, by Pareto front, then the first objective."""
    if summary.empty:
        return np.array([], dtype=int)
    values = np.column_stack([summary.get(f"{m}.mean", pd.Series(np.nan, index=summary.index)).to_numpy(float)
                              for m, _ in objectives])
    first = values[:, 0] * (1 if objectives[0][1] == "minimize" else -1)
    first = np.where(np.isfinite(first), first, np.inf)
    fronts = pareto_ranks(values, [d for _, d in objectives]) if len(objectives) > 1 else np.zeros(len(values))
    order = np.lexsort((first, fronts))
    ranks = np.empty(len(order), dtype=int)
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks


def _seed_verdicts(group: pd.DataFrame) -> str:
    counts = group.verdict.value_counts()
    if len(counts) <= 1:
        return ""
    return ", ".join(f"{v} in {n}/{len(group)} seeds" for v, n in counts.items())


def _shown(summary: pd.DataFrame, limit: int = MAX_PANELS) -> list[str]:
    if len(summary) <= limit:
        return list(summary.point)
    by_rank = summary.sort_values("rank")
    picks = sorted(set(np.linspace(0, len(by_rank) - 1, limit).round().astype(int)))
    chosen = set(by_rank.point.iloc[picks])
    return [p for p in summary.point if p in chosen]


def _interaction(factors: list[Factor], chosen: tuple[str, str] | None) -> tuple[Factor, Factor] | None:
    by_key = {f.key: f for f in factors}
    if chosen:
        missing = [k for k in chosen if k not in by_key]
        if missing or chosen[0] == chosen[1]:
            raise ReportError(f"interaction factors {list(chosen)}: give two different factors of the study "
                              f"({', '.join(by_key)})")
        return by_key[chosen[0]], by_key[chosen[1]]
    return (factors[0], factors[1]) if len(factors) >= 2 else None


def _baseline(data: StudyData, summary: pd.DataFrame) -> tuple[str | None, str]:
    spec = data.spec
    point = baseline_point(spec)
    if point is not None:
        key = point_key(point)
        label = config_label(point, data.factors)
        why = ("the OFAT baseline" if spec.sampler == "ofat" else
               "the grid's `baseline`" if spec.baseline else "the first point of the grid (the study sets no baseline)")
        if summary.empty or key not in set(summary.point):
            return None, f"the reference config {label} ({why}) has no finished run yet, so no differences are shown"
        return key, f"{label}, {why}"
    if summary.empty:
        return None, "no finished config yet"
    best = summary.sort_values("rank").iloc[0]
    return best.point, f"{best.config}, the best config by the objective (searches have no design baseline)"


def names_autoregressive_decoder(spec: StudySpec) -> bool:
    """Whether the study file puts an autoregressive decoder in any trial (its base or its levels)."""
    names = []
    for key in ("model.decoder", "model.arch"):
        names.append(spec.base.get(key))
        levels = spec.space.get(key)
        names += levels if isinstance(levels, list) else []
    return any(isinstance(n, str) and _draws_pixel_by_pixel(n) for n in names)


def _draws_pixel_by_pixel(name: str) -> bool:
    """Whether a decoder family, or a custom decoder class (by import path), is autoregressive; False for a
    name this version does not know or a module that does not import where the report is written."""
    try:
        return decoder_entry(name).autoregressive
    except (KeyError, PipelineError):
        return False


def remedy_order(power: pd.DataFrame) -> list[str]:
    """Remedies as the report lists them: no remedy first, then free bits, annealing, both."""
    pairs = power[["remedy_kind", "remedy"]].drop_duplicates()
    ranked = sorted(zip(pairs.remedy_kind, pairs.remedy), key=lambda kr: (REMEDY_KINDS.index(kr[0]), kr[1] != "none", kr[1]))
    return [remedy for _, remedy in ranked]


def power_table(summary: pd.DataFrame, finished: pd.DataFrame) -> pd.DataFrame:
    """Each config's summary row with its decoder and remedy, ordered by remedy, then feed-forward
    decoders (the baselines) before autoregressive ones by rows seen above."""
    if summary.empty:
        return summary.assign(**{c: [] for c in POWER_COLUMNS})
    per_point = finished.drop_duplicates("point").set_index("point")[list(POWER_COLUMNS)]
    power = summary.join(per_point, on="point")
    order = {r: i for i, r in enumerate(remedy_order(power))}
    keys = pd.DataFrame({"remedy": power.remedy.map(order), "ar": power.autoregressive.astype(bool),
                         "rows": power.rows_above.astype(float), "decoder": power.decoder})
    return power.loc[keys.sort_values(["remedy", "ar", "rows", "decoder"], kind="stable").index].reset_index(drop=True)


def power_cells(finished: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean and 95% seed interval of `metric` per (remedy, decoder, rows seen above). A cell holding
    several configs (other factors varied too) averages each seed over them first, so its interval is
    still seed-to-seed variation. Columns: remedy, decoder, autoregressive, rows_above, mean, lo, hi, n, configs."""
    cols = ["remedy", "decoder", "autoregressive", "rows_above", "mean", "lo", "hi", "n", "configs"]
    runs = finished.dropna(subset=[metric, "rows_above"]) if metric in finished else finished.iloc[:0]
    if runs.empty:
        return pd.DataFrame(columns=cols)
    by = ["remedy", "decoder", "autoregressive", "rows_above"]
    rows = []
    for keys, cell in runs.groupby(by, sort=False):
        per_seed = cell.groupby("seed")[metric].mean().to_numpy(float)
        mean, _, lo, hi, n = t_interval(per_seed)
        rows.append({**dict(zip(by, keys)), "mean": mean, "lo": lo, "hi": hi, "n": n, "configs": cell.point.nunique()})
    return pd.DataFrame(rows, columns=cols)


DIFFERENCE_COLUMNS = ["point", "config", "metric", "n", "n_reference", "diff", "ci95_low", "ci95_high", "p_raw", "p_holm"]


def reference_differences(summary: pd.DataFrame, finished: pd.DataFrame, baseline: str | None,
                          targets: list[str]) -> pd.DataFrame:
    """Every other config minus the reference, per target: mean difference, 95% Welch interval, the raw
    p-value of the Welch test that interval inverts, and Holm's adjustment over the family of every
    (config, target) pair with a test (DIFFERENCE_COLUMNS). Configs in summary order, targets in order."""
    if baseline is None:
        return pd.DataFrame(columns=DIFFERENCE_COLUMNS)
    base = finished[finished.point == baseline]
    rows = []
    for _, cfg in summary[summary.point != baseline].iterrows():
        runs = finished[finished.point == cfg.point]
        for t in targets:
            mine, ref = runs[t].to_numpy(float), base[t].to_numpy(float)
            rows.append({"point": cfg.point, "config": cfg.config, "metric": t, "n": len(runs), "n_reference": len(base),
                         **dict(zip(("diff", "ci95_low", "ci95_high"), welch_difference(mine, ref))),
                         "p_raw": welch_p_value(mine, ref)})
    out = pd.DataFrame(rows, columns=DIFFERENCE_COLUMNS[:-1])
    out["p_holm"] = holm_adjust(out.p_raw.to_numpy(float)) if len(out) else []
    return out


def holm_note(differences: pd.DataFrame) -> str:
    """The sentence that says which p-values are corrected, how, and over which family."""
    tested = differences[np.isfinite(differences.p_raw.to_numpy(float))] if len(differences) else differences
    if tested.empty:
        return ("No difference has two seeds on both sides, so none is tested and no p-value is given; no "
                "difference should be claimed.")
    return (f"p-values: Welch's t-test (the test the interval inverts), two-sided, corrected with Holm's step-down "
            f"method (Holm 1979) over the family of all {len(tested)} tests of this comparison: "
            f"{tested.point.nunique()} configs × {tested.metric.nunique()} metrics, each against the reference "
            f"(a difference is significant when its Holm-adjusted p < {1 - LEVEL:.2g}). The intervals are not "
            "adjusted: one can exclude 0 while its difference does not survive the correction.")


def _with_differences(summary: pd.DataFrame, differences: pd.DataFrame, targets: list[str]) -> pd.DataFrame:
    """summary with `<target>.diff/.p_raw/.p_holm` appended (NaN for the reference and where no test ran)."""
    wide = {f"{t}.{s}": summary.point.map(differences[differences.metric == t].set_index("point")[s]).astype(float)
            for t in targets for s in DIFFERENCE_SUFFIXES}
    return summary.assign(**wide)


def anova_targets(objectives: list[tuple[str, str]], metrics: list[str]) -> list[str]:
    """The objectives, then the measures the collapse verdict rests on, those the runs recorded."""
    return [m for m in dict.fromkeys([m for m, _ in objectives] + list(VERDICT_MEASURES)) if m in metrics]


def grid_anova(spec: StudySpec, finished: pd.DataFrame, factors: list[Factor],
               targets: list[str]) -> dict[str, AnovaFit | str] | str | None:
    """The factorial ANOVA of each target over the grid's factors, seeds as replicates: None for a
    study that is not a grid (OFAT moves one factor at a time; searches have no design), else
    {target: fit or why not}, or one sentence when no target can have one."""
    if spec.sampler != "grid":
        return None
    if len(spec.seeds) < 2:
        return ("The study runs one seed per config, so no effect can be told from seed-to-seed variation: "
                "a factorial ANOVA needs at least two seeds.")
    if finished.empty or not targets:
        return "No finished run has an objective or collapse measure yet."
    keys = [f.key for f in factors]
    return {t: factorial_anova(finished, t, keys) for t in targets}


def analyze(data: StudyData, interaction: tuple[str, str] | None = None) -> Analysis:
    spec = data.spec
    runs = data.runs
    finished = runs[runs.status == "FINISHED"].copy() if len(runs) else runs.copy()
    if len(finished):
        # A search may draw the same categorical point twice: its (point, seed) runs are replicates of
        # one training, not extra seeds, and counting both would shrink the interval. Keep the latest.
        finished = finished.drop_duplicates(["point", "seed"], keep="last")
    finished = with_derived(finished)  # the inference gaps of each run
    finished["verdict"] = [verdict_of(r) for _, r in finished.iterrows()] if len(finished) else []
    metrics = result_metric_names(finished) if len(finished) else []
    objectives = [(o.metric, o.direction) for o in spec.objectives]
    summary = config_summary(finished, [f.key for f in data.factors], metrics)
    if not summary.empty:
        summary["verdict"] = [verdict_of(r, ".mean") for _, r in summary.iterrows()]
        per_seed = {p: _seed_verdicts(g) for p, g in finished.groupby("point", sort=False)}
        summary["seed_verdicts"] = summary.point.map(per_seed)
        summary["rank"] = _rank(summary, objectives)
    targets = list(dict.fromkeys([m for m, _ in objectives] + list(COLLAPSE_TARGETS)))
    targets = [t for t in targets if t in metrics]
    onsets = {}
    curves = data.curves[data.curves.key == "train/kl"]
    d_of = dict(zip(runs.run_id, runs.latent_dim)) if len(runs) else {}
    for run_id, c in curves.groupby("run_id"):
        onsets[run_id] = collapse_onset(c.step.to_numpy(), c.value.to_numpy(), int(d_of.get(run_id, -1)))
    analysis = Analysis(data, data.factors, finished, summary, metrics, objectives, targets,
                        _interaction(data.factors, interaction), None, "", onsets,
                        _shown(summary) if not summary.empty else [])
    analysis.baseline, analysis.baseline_note = _baseline(data, summary)
    analysis.differences = reference_differences(summary, finished, analysis.baseline, targets)
    if not summary.empty:
        analysis.summary = _with_differences(summary, analysis.differences, targets)
    analysis.anova = grid_anova(spec, finished, data.factors, anova_targets(objectives, metrics))
    analysis.autoregressive = bool(len(runs) and runs.autoregressive.any()) or names_autoregressive_decoder(spec)
    if analysis.autoregressive:
        analysis.power = power_table(summary, finished)
    return analysis
