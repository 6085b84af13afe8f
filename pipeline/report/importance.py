"""Hyperparameter importances with Optuna's evaluators, per target metric.

The stored Optuna study only knows each trial's objective values; the report wants importances for
the collapse measures too. So the finished runs are replayed into an in-memory study, one trial per
run (seeds are replicates, which the evaluator sees as noise), with the study's factors as params.
fANOVA (Hutter et al. 2014) is used rather than Optuna's default PED-ANOVA: PED-ANOVA compares the
top 10% of trials with the rest, which is meaningless for the handful of configs a grid has. fANOVA
needs scikit-learn; without it PED-ANOVA runs instead, and the result names the evaluator that ran,
so the figure's caption says which one it shows.

This module and pipeline/study.py are the two that import Optuna: study.py owns storage and
running; this one only computes importances, in memory.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from pipeline.report.analysis import Analysis

MIN_RUNS = 4  # fewer finished runs than this: no importances (a forest on 3 points says nothing)
FANOVA, PED_ANOVA = "fANOVA", "PED-ANOVA"


@dataclass
class Importances:
    by_target: dict[str, dict[str, float]]  # {target metric: {factor: importance}}, normalized per metric
    evaluator: str  # FANOVA, or PED_ANOVA when scikit-learn (which fANOVA needs) is not installed


def evaluator():
    """(Optuna importance evaluator, its name): fANOVA, else PED-ANOVA when scikit-learn is missing."""
    import optuna

    try:
        return optuna.importance.FanovaImportanceEvaluator(seed=0), FANOVA
    except ImportError:  # raised by the constructor when scikit-learn cannot be imported
        return optuna.importance.PedAnovaImportanceEvaluator(), PED_ANOVA


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


def param_importances(a: Analysis) -> Importances | str:
    """The importances per target metric and the evaluator that computed them, or a sentence saying why not."""
    reason = why_not(a)
    if reason:
        return reason
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    importance_evaluator, evaluator_name = evaluator()
    distributions = {}
    for f in a.factors:
        values = a.finished[f.key]
        if f.kind == "continuous" or (f.kind == "numeric" and values.nunique() > 1):
            distributions[f.key] = FloatDistribution(float(values.min()), float(values.max()) + 1e-12, log=False)
        else:
            distributions[f.key] = CategoricalDistribution(list(f.levels) or sorted(set(values), key=str))
    out: dict[str, dict[str, float]] = {}
    directions = dict(a.objectives)
    for target in a.targets:
        # fANOVA ignores the direction; PED-ANOVA ranks by it (its top 10% are the best runs). The collapse
        # measures among the targets (active units, I(x; z)) are better high: more of the code in use.
        study = optuna.create_study(direction=directions.get(target, "maximize"))
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
                imp = optuna.importance.get_param_importances(study, evaluator=importance_evaluator)
            except (RuntimeError, ValueError, ZeroDivisionError):
                continue  # e.g. the metric is constant: no variance to attribute
        if imp and all(math.isfinite(v) for v in imp.values()):
            out[target] = {k: float(v) for k, v in imp.items()}
    if not out:
        return "No target metric varies across the finished runs, so no importance can be attributed."
    return Importances(out, evaluator_name)
