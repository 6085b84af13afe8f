"""Known answers for the report's statistics: Holm's correction, the Welch test behind the intervals,
and the factorial ANOVA of a grid (sums of squares against the closed form of a balanced design,
and what it says when it cannot be fitted)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipeline.report.stats import AnovaFit, factorial_anova, holm_adjust, welch_difference, welch_p_value


def test_holm_adjusts_a_hand_worked_family_and_leaves_untested_entries_out():
    # Sorted 0.01, 0.03, 0.04 times 3, 2, 1: 0.03, 0.06, 0.04 → running maximum 0.03, 0.06, 0.06.
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    # NaN is no test: the family is the two others (0.02·2 = 0.04, then max(0.04, 0.5) = 0.5).
    adjusted = holm_adjust([0.5, math.nan, 0.02])
    assert adjusted[[0, 2]] == pytest.approx([0.5, 0.04]) and math.isnan(adjusted[1])
    assert holm_adjust([0.6, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm_adjust([]).shape == (0,) and np.isnan(holm_adjust([math.nan])).all()


def test_the_welch_test_is_the_one_the_interval_inverts():
    # Hand-worked: means 5 and 2, variances 1 and 1, n = 3 each: t = 3 / √(2/3) = 3.674, 4 Welch dof.
    assert welch_p_value([4.0, 5.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(0.021312, abs=1e-6)
    rng = np.random.default_rng(0)
    for _ in range(200):
        a = rng.normal(rng.uniform(-1, 1), rng.uniform(0.1, 2), rng.integers(2, 6))
        b = rng.normal(0, rng.uniform(0.1, 2), rng.integers(2, 6))
        _, lo, hi = welch_difference(a, b)
        assert (welch_p_value(a, b) < 0.05) == (lo > 0 or hi < 0)
    assert math.isnan(welch_p_value([1.0], [1.0, 2.0]))  # one seed: no test, as no interval
    assert welch_p_value([3.0, 3.0], [2.0, 2.0]) == 0.0  # no spread: the interval is the point 1, excluding 0
    assert welch_p_value([2.0, 2.0], [2.0, 2.0]) == 1.0


def _balanced(effect_a, effect_b, effect_ab, replicates=3, spread=0.1, noise=0.0, seed=0) -> pd.DataFrame:
    """A 2 × 3 design with `replicates` runs per cell; the factor names carry dots, as grid keys do.

    Within a cell the replicates sit at cell mean ± `spread` symmetrically, so cell means are exactly the
    effects set (a null effect has a sum of squares of exactly 0); `noise` adds Gaussian noise on top."""
    rng = np.random.default_rng(seed)
    offsets = spread * (np.linspace(-1, 1, replicates) if replicates > 1 else np.zeros(1))
    rows = []
    for i, j in itertools.product(range(2), range(3)):
        for offset in offsets:
            y = effect_a[i] + effect_b[j] + effect_ab[i][j] + offset + rng.normal(0, noise)
            rows.append({"objective.beta": [0.5, 4.0][i], "model.decoder": ["mlp", "conv", "pixelcnn"][j], "test/kl": y})
    return pd.DataFrame(rows)


def _closed_form(df: pd.DataFrame, a: str, b: str, y: str) -> dict[str, float]:
    """Sums of squares of a balanced two-way design (e.g. Montgomery, Design and Analysis of Experiments, ch. 5)."""
    grand = df[y].mean()
    ma, mb, mab = df.groupby(a)[y].transform("mean"), df.groupby(b)[y].transform("mean"), df.groupby([a, b])[y].transform("mean")
    return {a: float(((ma - grand) ** 2).sum()), b: float(((mb - grand) ** 2).sum()),
            f"{a} × {b}": float(((mab - ma - mb + grand) ** 2).sum()), "residual": float(((df[y] - mab) ** 2).sum())}


def test_anova_of_a_pure_main_effect_finds_it_and_only_it():
    # β moves the metric by 2, nothing else does: SS_β = b·r·Σ_i(ȳ_i − ȳ)² = 3·3·(1² + 1²) = 18, SS_decoder =
    # SS_interaction = 0, SS_residual = 6 cells · (0.1² + 0 + 0.1²) = 0.12 on ab(r − 1) = 12 dof.
    df = _balanced(effect_a=[0.0, 2.0], effect_b=[0.0, 0.0, 0.0], effect_ab=[[0, 0, 0], [0, 0, 0]])
    fit = factorial_anova(df, "test/kl", ["objective.beta", "model.decoder"])
    assert isinstance(fit, AnovaFit) and fit.n == 18 and fit.left_out == []
    table = fit.table.set_index("term")
    assert list(table.index) == ["objective.beta", "model.decoder", "objective.beta × model.decoder", "residual"]
    assert list(table.df) == [1, 2, 2, 12]  # (a−1), (b−1), (a−1)(b−1), ab(r−1)
    assert table.sum_sq.tolist() == pytest.approx([18.0, 0.0, 0.0, 0.12], abs=1e-9)
    assert table.loc["objective.beta", "F"] == pytest.approx(18.0 / (0.12 / 12))
    assert table.loc["objective.beta", "p"] < 1e-12
    assert table.loc["objective.beta", "partial_eta_sq"] == pytest.approx(18.0 / 18.12)
    assert table.loc["model.decoder", "p"] > 0.99 and table.loc["objective.beta × model.decoder", "p"] > 0.99
    assert table.loc["model.decoder", "partial_eta_sq"] == pytest.approx(0.0, abs=1e-9)


def test_anova_sums_of_squares_match_the_closed_form_of_a_balanced_design():
    df = _balanced(effect_a=[0.0, 0.7], effect_b=[0.0, 0.3, -0.2], effect_ab=[[0, 0.2, 0], [0, 0, 0.1]], noise=0.3)
    table = factorial_anova(df, "test/kl", ["objective.beta", "model.decoder"]).table.set_index("term")
    closed = _closed_form(df, "objective.beta", "model.decoder", "test/kl")
    for term, ss in closed.items():
        assert table.loc[term, "sum_sq"] == pytest.approx(ss, rel=1e-9), term
    assert table.sum_sq.sum() == pytest.approx(float(((df["test/kl"] - df["test/kl"].mean()) ** 2).sum()), rel=1e-9)
    residual = table.loc["residual", "sum_sq"]
    for term in closed:
        if term == "residual":
            continue
        ss, dof = table.loc[term, "sum_sq"], table.loc[term, "df"]
        f = (ss / dof) / (residual / 12)
        assert table.loc[term, "F"] == pytest.approx(f, rel=1e-9)
        assert table.loc[term, "p"] == pytest.approx(stats.f.sf(f, dof, 12), rel=1e-9)
        assert table.loc[term, "partial_eta_sq"] == pytest.approx(ss / (ss + residual), rel=1e-12)


def test_anova_of_a_pure_interaction_finds_the_interaction():
    # A crossover: the decoder's effect flips sign with β, so neither main effect exists on average;
    # SS_interaction = r·Σ_ij (effect_ij)² = 3·4 = 12.
    df = _balanced(effect_a=[0.0, 0.0], effect_b=[0.0, 0.0, 0.0], effect_ab=[[1, -1, 0], [-1, 1, 0]])
    table = factorial_anova(df, "test/kl", ["objective.beta", "model.decoder"]).table.set_index("term")
    assert table.loc["objective.beta × model.decoder", "sum_sq"] == pytest.approx(12.0)
    assert table.loc["objective.beta × model.decoder", "p"] < 1e-10
    assert table.loc["objective.beta", "p"] > 0.99 and table.loc["model.decoder", "p"] > 0.99


def test_anova_of_an_unbalanced_design_drops_what_it_cannot_estimate_and_says_why():
    df = _balanced(effect_a=[0.0, 2.0], effect_b=[0.0, 1.0, 0.0], effect_ab=[[0, 0, 0], [0, 0, 0]])
    df.loc[0, "test/kl"] = math.nan  # a failed run: one replicate fewer in a cell
    df.loc[1, "test/kl"] = math.inf
    fit = factorial_anova(df, "test/kl", ["objective.beta", "model.decoder"])
    assert fit.n == 16 and fit.table.set_index("term").loc["residual", "df"] == 10  # 16 runs − 6 cell means
    assert fit.table.set_index("term").loc["objective.beta", "p"] < 1e-10

    empty_cell = df[~((df["objective.beta"] == 4.0) & (df["model.decoder"] == "pixelcnn"))]  # every seed failed
    fit = factorial_anova(empty_cell, "test/kl", ["objective.beta", "model.decoder"])
    assert [t for t in fit.table.term] == ["objective.beta", "model.decoder", "residual"]
    assert fit.left_out == ["objective.beta × model.decoder (a combination of levels has no run with a value)"]
    assert fit.table.set_index("term").loc["model.decoder", "p"] < 1e-6

    one_level = df.assign(**{"train.lr": 0.001})
    fit = factorial_anova(one_level, "test/kl", ["objective.beta", "train.lr", "model.decoder"])
    assert "train.lr (one level)" in fit.left_out and "train.lr" not in set(fit.table.term)


def test_anova_says_why_it_is_absent_instead_of_failing():
    one_seed = _balanced([0.0, 2.0], [0.0, 0.0, 0.0], [[0, 0, 0], [0, 0, 0]], replicates=1)
    reason = factorial_anova(one_seed, "test/kl", ["objective.beta", "model.decoder"])
    assert isinstance(reason, str) and "no residual degree of freedom" in reason
    constant = one_seed.assign(**{"test/kl": 3.0})
    assert "same value" in factorial_anova(constant, "test/kl", ["objective.beta", "model.decoder"])
    exact = _balanced([0.0, 2.0], [0.0, 1.0, 0.0], [[0, 0, 0], [0, 0, 0]], spread=0.0)
    assert "agree exactly" in factorial_anova(exact, "test/kl", ["objective.beta", "model.decoder"])
    single = one_seed.assign(**{"objective.beta": 1.0, "model.decoder": "mlp"})
    assert "no factor has two levels" in factorial_anova(single, "test/kl", ["objective.beta", "model.decoder"])


def test_only_a_grid_with_two_seeds_gets_an_anova():
    from pipeline.report.analysis import grid_anova
    from pipeline.report.collect import factors_of
    from pipeline.studyspec import StudySpec

    study = {"name": "s", "space": {"objective.beta": [1, 4]}, "objectives": [{"metric": "test/iwae_nll", "direction": "minimize"}]}
    runs = _balanced([0.0, 2.0], [0.0, 0.0, 0.0], [[0, 0, 0], [0, 0, 0]])
    grid = StudySpec(**study, sampler="grid", seeds=[0, 1])
    fits = grid_anova(grid, runs.rename(columns={"test/kl": "test/iwae_nll"}), factors_of(grid), ["test/iwae_nll"])
    assert fits["test/iwae_nll"].table.term.tolist() == ["objective.beta", "residual"]
    one_seed = StudySpec(**study, sampler="grid", seeds=[0])
    assert "at least two seeds" in grid_anova(one_seed, runs, factors_of(one_seed), ["test/iwae_nll"])
    ofat = StudySpec(**study, sampler="ofat", baseline={"objective.beta": 1}, seeds=[0, 1])
    search = StudySpec(**{**study, "space": {"objective.beta": {"low": 1, "high": 4}}}, sampler="tpe", n_trials=4, seeds=[0, 1])
    assert grid_anova(ofat, runs, factors_of(ofat), ["test/iwae_nll"]) is None
    assert grid_anova(search, runs, factors_of(search), ["test/iwae_nll"]) is None
