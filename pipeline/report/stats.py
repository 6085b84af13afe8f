"""Seed statistics: per-config means with t-intervals, differences with Welch intervals and Holm-corrected
tests, the factorial ANOVA of a grid, Pareto fronts.

A config is one design point (the `point` tag); its seeds are the replicates. Only FINISHED runs
count: a failed, pruned or running trial has no final test metrics to average.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats as sps

from pipeline.metric_table import DERIVED, is_eval_key, is_result, ordered

LEVEL = 0.95  # every interval in a report is a 95% interval
STAT_SUFFIXES = ("mean", "std", "ci95_low", "ci95_high", "n")
INTERVAL_NOTE = ("95% intervals are Student-t intervals on the mean over seeds, mean ± t(0.975, n−1)·s/√n with "
                 "s the sample standard deviation (n−1 in the denominator); with one seed the standard deviation "
                 "and the interval are undefined (NaN, shown as –), never zero.")


def t_interval(values) -> tuple[float, float, float, float, int]:
    """(mean, sample std, low, high, n) of the finite values; std and interval NaN when n < 2."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return math.nan, math.nan, math.nan, math.nan, 0
    mean = float(x.mean())
    if n < 2:
        return mean, math.nan, math.nan, math.nan, 1
    std = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + LEVEL / 2, n - 1)) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half, n


def welch_difference(a, b) -> tuple[float, float, float]:
    """mean(a) − mean(b) with a 95% Welch interval (unequal variances, Welch–Satterthwaite dof).

    Unpaired on purpose: it assumes nothing about seeds being shared between the two configs.
    NaN interval when either side has fewer than two values."""
    a = np.asarray([v for v in a if np.isfinite(v)], dtype=float)
    b = np.asarray([v for v in b if np.isfinite(v)], dtype=float)
    if len(a) == 0 or len(b) == 0:
        return math.nan, math.nan, math.nan
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return diff, math.nan, math.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return diff, diff, diff  # every seed agrees exactly (e.g. a count): no spread to widen it
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(sps.t.ppf(0.5 + LEVEL / 2, dof)) * se
    return diff, diff - half, diff + half


def config_summary(runs: pd.DataFrame, factor_keys: list[str], metrics: list[str]) -> pd.DataFrame:
    """One row per config (FINISHED runs grouped by `point`): its levels, seeds, and for every metric
    `<metric>.mean/.std/.ci95_low/.ci95_high/.n`. Rows in the order configs first appear (trial order)."""
    finished = runs[runs.status == "FINISHED"] if len(runs) else runs
    rows = []
    for point, group in finished.groupby("point", sort=False):
        first = group.iloc[0]
        row = {"config": first["config"], "point": point, **{k: first[k] for k in factor_keys},
               "latent_dim": int(first["latent_dim"]), "prior": first["prior"], "seeds": " ".join(str(s) for s in sorted(group.seed)),
               "n_runs": len(group)}
        for m in metrics:
            values = group[m].tolist() if m in group else []
            row.update(zip((f"{m}.{s}" for s in STAT_SUFFIXES), t_interval(values)))
        rows.append(row)
    return pd.DataFrame(rows)


def result_metric_names(runs: pd.DataFrame) -> list[str]:
    """The evaluation's results present in the runs (not its settings or timing), in the metric table's
    reading order: likelihood, collapse, sharpness, the other image sets."""
    derived = {m.key for m in DERIVED}
    return ordered(c for c in runs.columns if (is_eval_key(c) and is_result(c)) or c in derived)


def mean_ci(row: pd.Series, metric: str) -> str:
    """`mean [low, high]` of a summary row's metric; the mean alone without an interval, – without a value."""
    mean = row.get(f"{metric}.mean", math.nan)
    if mean is None or not np.isfinite(mean):
        return "–"
    lo, hi = row.get(f"{metric}.ci95_low", math.nan), row.get(f"{metric}.ci95_high", math.nan)
    if not np.isfinite(lo):
        return f"{mean:.4g}"
    return f"{mean:.4g} [{lo:.4g}, {hi:.4g}]"


def pareto_mask(values: np.ndarray, directions: list[str]) -> np.ndarray:
    """True for the rows no other row dominates (at least as good in every objective, better in one)."""
    signed = np.asarray(values, dtype=float) * np.array([1.0 if d == "minimize" else -1.0 for d in directions])
    ok = np.isfinite(signed).all(axis=1)
    mask = np.zeros(len(signed), dtype=bool)
    for i in np.flatnonzero(ok):
        others = signed[ok]
        dominated = ((others <= signed[i]).all(axis=1) & (others < signed[i]).any(axis=1)).any()
        mask[i] = not dominated
    return mask


def pareto_ranks(values: np.ndarray, directions: list[str]) -> np.ndarray:
    """Non-dominated sorting: 1 for the front, 2 for the front once it is removed, …; NaN rows last."""
    values = np.asarray(values, dtype=float)
    ranks = np.full(len(values), np.inf)
    left = np.isfinite(values).all(axis=1)
    rank = 1
    while left.any():
        idx = np.flatnonzero(left)
        front = idx[pareto_mask(values[idx], directions)]
        ranks[front] = rank
        left[front] = False
        rank += 1
    return ranks


# --- Tests against the reference config, and their family-wise correction ---------------------------
def welch_p_value(a, b) -> float:
    """Two-sided p-value of Welch's unequal-variances t-test of mean(a) = mean(b) (Welch 1947).

    The test that welch_difference's interval inverts (same standard error, same Welch–Satterthwaite
    dof), so p < 1 − LEVEL exactly when that interval excludes 0. NaN when either side has fewer than
    two values; with no spread on either side, 0 when the means differ and 1 when they agree (the
    interval is then the single point diff)."""
    a = np.asarray([v for v in a if np.isfinite(v)], dtype=float)
    b = np.asarray([v for v in b if np.isfinite(v)], dtype=float)
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if a.var(ddof=1) == 0 and b.var(ddof=1) == 0:
        return 1.0 if a.mean() == b.mean() else 0.0
    return float(sps.ttest_ind(a, b, equal_var=False).pvalue)


def holm_adjust(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (Holm 1979, statsmodels' multipletests), controlling the
    family-wise error rate over the finite entries, which are the family; NaN entries (no test) stay NaN."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, math.nan)
    tested = np.isfinite(p)
    if tested.any():
        adjusted[tested] = multipletests(p[tested], alpha=1 - LEVEL, method="holm")[1]
    return adjusted


# --- Factorial ANOVA of a grid ------------------------------------------------------------------------
ANOVA_TYPE = 2
ANOVA_NOTE = ("Type II sums of squares (each main effect adjusted for the other main effects, each interaction for "
              "the main effects; the choice that respects marginality when failed trials leave the design "
              "unbalanced, Langsrud 2003), from an ordinary least-squares fit with every factor categorical "
              "(statsmodels `ols` + `anova_lm`); partial η² = SS_term / (SS_term + SS_residual) (Cohen 1973). "
              "Interactions of three or more factors are pooled into the residual.")
ANOVA_COLUMNS = ("term", "df", "sum_sq", "F", "p", "partial_eta_sq")


@dataclass
class AnovaFit:
    table: pd.DataFrame  # ANOVA_COLUMNS; one row per term (factor keys, "A × B"), the residual last
    n: int  # observations fitted (runs with a finite value)
    left_out: list[str]  # terms not in the model, each with why (one level; an empty cell)


def _full_rank(model) -> bool:
    exog = model.model.exog
    return int(np.linalg.matrix_rank(exog)) == exog.shape[1]


def factorial_anova(df: pd.DataFrame, response: str, factors: list[str]) -> AnovaFit | str:
    """Main effects and two-way interactions of the categorical `factors` (columns of df, one row per
    observation) on `response`: an AnovaFit, or a sentence saying why there is none.

    A factor with a single level among the usable rows is left out, and so is an interaction with an
    empty cell (a combination with no finite observation, e.g. all its seeds failed): its effect is
    not estimable. Rows whose response is not finite are dropped first."""
    from statsmodels.formula.api import ols
    from statsmodels.stats.anova import anova_lm

    data = pd.DataFrame({"y": pd.to_numeric(df[response], errors="coerce")})
    # Grid keys hold dots (objective.beta), which a formula reads as operators: safe aliases f0, f1, …
    alias = {key: f"f{i}" for i, key in enumerate(factors)}
    for key, name in alias.items():
        data[name] = df[key].astype(str).to_numpy()
    data = data[np.isfinite(data.y.to_numpy(float))]
    left_out = [f"{key} (one level)" for key in factors if data[alias[key]].nunique() < 2]
    kept = [key for key in factors if data[alias[key]].nunique() >= 2]
    if not kept:
        return "no factor has two levels among the runs with a value"
    pairs = []
    for i, a_key in enumerate(kept):
        for b_key in kept[i + 1:]:
            a, b = alias[a_key], alias[b_key]
            if data.groupby([a, b]).size().size == data[a].nunique() * data[b].nunique():
                pairs.append((a_key, b_key))
            else:
                left_out.append(f"{a_key} × {b_key} (a combination of levels has no run with a value)")
    terms = {f"C({alias[k]})": k for k in kept} | {f"C({alias[a]}):C({alias[b]})": f"{a} × {b}" for a, b in pairs}
    if data.y.nunique() < 2:
        return f"every one of the {len(data)} runs has the same value: there is no variance to attribute"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank-deficiency and division warnings: checked below, said in words
        model = ols("y ~ " + " + ".join(terms), data).fit()
        if not _full_rank(model) and pairs:  # interactions aliased with each other (a fractional design)
            left_out += [f"{a} × {b} (aliased with other terms of this design)" for a, b in pairs]
            terms = {t: k for t, k in terms.items() if ":" not in t}
            model = ols("y ~ " + " + ".join(terms), data).fit()
        if not _full_rank(model):
            return "the levels of the factors are confounded among the runs with a value, so their effects are not separable"
        if model.df_resid < 1:
            return (f"{len(data)} runs for {int(model.df_model) + 1} parameters leave no residual degree of freedom: "
                    "an effect can only be tested against seed-to-seed variation, which needs more than one seed "
                    "of some config")
        total = float(((data.y - data.y.mean()) ** 2).sum())
        if model.ssr <= 1e-12 * total:
            return "the seeds of each config agree exactly, so there is no error variance to test the effects against"
        table = anova_lm(model, typ=ANOVA_TYPE)
    residual = float(table.loc["Residual", "sum_sq"])
    rows = [{"term": terms[t], "df": float(r.df), "sum_sq": float(r.sum_sq), "F": float(r.F), "p": float(r["PR(>F)"]),
             "partial_eta_sq": float(r.sum_sq) / (float(r.sum_sq) + residual)}
            for t, r in table.drop(index="Residual").iterrows()]
    rows.append({"term": "residual", "df": float(table.loc["Residual", "df"]), "sum_sq": residual,
                 "F": math.nan, "p": math.nan, "partial_eta_sq": math.nan})
    return AnovaFit(pd.DataFrame(rows, columns=list(ANOVA_COLUMNS)), len(data), left_out)
