"""Seed statistics: per-config means with t-intervals, differences with Welch intervals, Pareto fronts.

A config is one design point (the `point` tag); its seeds are the replicates. Only FINISHED runs
count: a failed, pruned or running trial has no final test metrics to average.
"""

from __future__ import annotations

import math

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
