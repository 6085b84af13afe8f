"""Hyperparameter importances with Optuna's evaluators, per target metric.

The stored Optuna study only knows each trial's objective values; the report wants importances for
the collapse measures too. So the finished runs are replayed into an in-memory study, one trial per
run (seeds are replicates, which the evaluator sees as noise), with the study's factors as params.
fANOVA (Hutter et al. 2014) is used rather than Optuna's default PED-ANOVA: PED-ANOVA compares the
top 10% of trials with the rest, which is meaningless for the handful of configs a grid has.

This module and pipeline/study.py are the two that import Optuna: study.py owns storage and
running; this one only computes importances, in memory.
"""

from __future__ import annotations

import math
import warnings

from pipeline.report.analysis import Analysis

MIN_RUNS = 4  # fewer finished runs than this: no importances (a forest on 3 points says nothing)


def why_not(a: Analysis) -> str | None:
    """The reason importances cannot be computed for this study, or None."""
    if len(a.factors) < 2:
        return "Importances rank factors against each other; this study has a single factor."
    if len(a.finished) < MIN_RUNS:
        return f"Importances need at least {MIN_RUNS} finished runs; the study has {len(a.finished)}."
    varying = [f for f in a.factors if a.finished[f.key].nunique() > 1]
    if len(varying) < 2:
        return "Fewer than two factors vary among the finished runs, so there is nothing to rank."
    return None


def param_importances(a: Analysis) -> dict[str, dict[str, float]] | str:
    """{target metric: {factor: importance}} (normalized per metric), or a sentence saying why not."""
    reason = why_not(a)
    if reason:
        return reason
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    except ImportError:  # fANOVA needs scikit-learn; fall back to Optuna's default
        evaluator = None
    distributions = {}
    for f in a.factors:
        values = a.finished[f.key]
        if f.kind == "continuous" or (f.kind == "numeric" and values.nunique() > 1):
            distributions[f.key] = FloatDistribution(float(values.min()), float(values.max()) + 1e-12, log=False)
        else:
            distributions[f.key] = CategoricalDistribution(list(f.levels) or sorted(set(values), key=str))
    out: dict[str, dict[str, float]] = {}
    for target in a.targets:
        study = optuna.create_study(direction="minimize")
        for _, run in a.finished.iterrows():
            value = run.get(target)
            if value is None or not math.isfinite(value):
                continue
            params = {f.key: (float(run[f.key]) if isinstance(distributions[f.key], FloatDistribution) else run[f.key])
                      for f in a.factors}
            study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=float(value)))
        if len(study.trials) < MIN_RUNS:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                imp = optuna.importance.get_param_importances(study, evaluator=evaluator)
            except (RuntimeError, ValueError, ZeroDivisionError):
                continue  # e.g. the metric is constant: no variance to attribute
        if imp and all(math.isfinite(v) for v in imp.values()):
            out[target] = {k: float(v) for k, v in imp.items()}
    return out or "No target metric varies across the finished runs, so no importance can be attributed."
