"""The Inference and Capacity views: does the model fail on its own training images, on a sampled code,
on clean images after augmented training, or for want of latent dimensions?

The gaps are the metric table's derived metrics (pipeline.metric_table.DERIVED), computed per run and
summarized over seeds like any result, so their intervals are seed-to-seed variation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.metric_table import DERIVED
from pipeline.report import figures as F
from pipeline.report.analysis import Analysis
from pipeline.report.render import Section, Table, Text, figure_block
from pipeline.report.stats import LEVEL, mean_ci, t_interval

GAPS = tuple(m.key for m in DERIVED)
# What a positive gap means, for the findings.
GAP_MEANING = {
    "gap/train_test_elbo": ("training images score better than test images", "test images score better than training images"),
    "gap/sampled_z_recon": ("a sampled z reconstructs worse than the posterior mean",
                            "a sampled z reconstructs better than the posterior mean"),
    # Not a pure measure of fit: an augmented copy can be easier or harder to code than the original
    # (a shifted image loses border pixels; noise adds entropy), so the sentence states the sign only.
    "gap/clean_augmented_elbo": ("clean test images score better than their augmented copies",
                                 "augmented copies score better than the clean test images (a copy can be simpler "
                                 "to code, e.g. a shift drops border pixels: compare with the unaugmented config's "
                                 "test ELBO before reading it as a mismatch)"),
}
CAPACITY = ("test/active_units", "test/active_fraction", "test/kl_active_fraction")


def scored_other_sets(a: Analysis) -> bool:
    """Whether some finished run was scored on training or augmented test images (runs from before that
    existed were not: they get no Inference view, though they have a sampled-vs-mean recon gap)."""
    return any(c.startswith(("trainset/", "test_aug/")) and a.finished[c].notna().any() for c in a.finished.columns)


def gaps_present(a: Analysis) -> list[str]:
    if a.summary.empty or not scored_other_sets(a):
        return []
    return [g for g in GAPS if f"{g}.mean" in a.summary and a.summary[f"{g}.mean"].notna().any()]


def image_se(a: Analysis) -> pd.Series:
    """Per config (point), the image-sampling standard error of the train-set − test ELBO gap,
    √(s_train²/n_train + s_test²/n_test) from each run's per-image ELBO spread, averaged over its runs.
    Every seed scores the same fixed images, so the seed interval does not contain this error: two
    subsets of a few thousand images can differ by more than a model's overfitting. NaN where the runs
    predate the per-image spread."""
    cols = ("trainset/elbo_image_sd", "test/elbo_image_sd", "test/trainset_images", "test/test_images")
    f = a.finished
    if f.empty or not all(c in f for c in cols):
        return pd.Series(dtype=float)
    se = np.sqrt(f[cols[0]] ** 2 / f[cols[2]] + f[cols[1]] ** 2 / f[cols[3]])
    return se.groupby(f.point).mean()


def _table(a: Analysis, gaps: list[str]) -> Table:
    rows = []
    se = image_se(a)
    for _, r in a.summary.iterrows():
        row = {"config": r.config, "seeds": int(r.n_runs), "test ELBO": mean_ci(r, "test/elbo")}
        for g in gaps:
            row[F.metric_label(g)] = mean_ci(r, g)
            if g == "gap/train_test_elbo":
                value = se.get(r.point, np.nan)
                row["its image s.e."] = f"{value:.3g}" if np.isfinite(value) else "–"
        rows.append(row)
    return Table(pd.DataFrame(rows), "Inference gaps per config, each a difference within a run, as means over seeds "
                                     "[95% t-interval]; – where a run has no such pair (no augmentation, or no "
                                     "training-set evaluation). The train-set and test images are fixed subsets that "
                                     "every seed scores, so the seed interval of their gap leaves out which images were "
                                     "drawn: its image s.e. (from the spread of the per-image ELBO) says how far two "
                                     "such subsets differ by chance. The other two gaps compare the same images.")


def _findings(a: Analysis, gaps: list[str]) -> list[str]:
    out = []
    s = a.summary
    for g in gaps:
        mean, lo, hi = (s.get(f"{g}.{k}", pd.Series(np.nan, index=s.index)).to_numpy(float)
                        for k in ("mean", "ci95_low", "ci95_high"))
        have = np.isfinite(mean)
        if not have.any():
            continue
        label = F.metric_label(g)
        positive, negative = GAP_MEANING[g]
        above, below = have & (lo > 0), have & (hi < 0)
        i = int(np.nanargmax(np.abs(np.where(have, mean, np.nan))))
        largest = f"largest in {s.config.iloc[i]}: {mean_ci(s.iloc[i], g)}"
        if not np.isfinite(lo[have]).any():
            out.append(f"**{label}**: {largest}; one seed per config, so no interval says whether it differs from 0.")
            continue
        parts = []
        if above.any():
            parts.append(f"{positive} in {above.sum()} of {have.sum()} configs (interval above 0)")
        if below.any():
            parts.append(f"{negative} in {below.sum()} of {have.sum()} configs (interval below 0)")
        if not parts:
            parts.append(f"no config's interval excludes 0 ({have.sum()} configs)")
        sentence = f"**{label}**: " + "; ".join(parts) + f"; {largest}."
        if g == "gap/train_test_elbo":
            se = image_se(a).reindex(s.point).to_numpy(float)
            judged = have & np.isfinite(se)
            if judged.any():
                within = int((judged & (np.abs(mean) < 2 * se)).sum())
                sentence += (f" In {within} of {judged.sum()} configs the gap is within two image-sampling standard "
                             "errors, which the seed interval does not contain: there, it says as much about which "
                             "images the two subsets hold as about overfitting (score more images, `eval.test_subset`, "
                             "to tell).")
        out.append(sentence)
    return out


def inference_gaps(a: Analysis, out: Path) -> F.Figure | str:
    gaps = gaps_present(a)
    if not gaps:
        return ("No finished run has a training-set or augmented-test evaluation (eval.train_subset off, or runs "
                "from before it existed): there is no inference gap to draw.")
    s = a.summary
    n = len(s)
    with F._style():
        fig, axes = F.plt.subplots(1, len(gaps), figsize=(3.1 * len(gaps) + 2.2, 0.9 + 0.26 * n), sharey=True,
                                   squeeze=False)
        y = np.arange(n)[::-1]
        se = image_se(a).reindex(s.point).to_numpy(float)
        for ax, g in zip(axes[0], gaps):
            mean, lo, hi = (s[f"{g}.{k}"].to_numpy(float) for k in ("mean", "ci95_low", "ci95_high"))
            if g == "gap/train_test_elbo" and np.isfinite(se).any():
                ax.barh(y, 4 * np.nan_to_num(se), left=-2 * np.nan_to_num(se), height=0.5, color="#d9d9d9", zorder=0,
                        label="±2 image s.e.")
                ax.legend(fontsize=7, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0))
            err = np.nan_to_num(np.vstack([mean - lo, hi - mean]))
            ok = np.isfinite(mean)
            ax.errorbar(mean[ok], y[ok], xerr=err[:, ok], fmt="o", ms=4, color="#4c72b0", capsize=2, lw=1)
            ax.axvline(0, color="grey", lw=0.8, ls="--")
            ax.set_xlabel(F._wrap(F.metric_label(g), 34))
        axes[0][0].set_yticks(y, [F._wrap(c, 40) for c in s.config])
        fig.tight_layout()
    one_seed = a.finished.empty or a.finished.groupby("point").seed.nunique().max() < 2
    bars = ("One seed per config: no interval." if one_seed else f"Bars: {LEVEL:.0%} t-intervals over seeds.")
    caption = ("Inference gaps per config, each a difference within one run: training-set minus test ELBO (the "
               "same number of images; grey: ±2 image-sampling standard errors around 0, the chance difference of two "
               "such image subsets, which the seed bars do not contain), recon. NLL at a sampled z minus at the "
               f"posterior mean E[z], and clean minus augmented test ELBO (augmented runs only). Dashed: no gap. {bars}")
    return F.save(fig, "inference_gaps", out, caption)


def _with_fractions(finished: pd.DataFrame) -> pd.DataFrame:
    """The runs with their active fractions, derived from the counts where a run predates those keys."""
    d = finished.latent_dim.astype(float)
    derived = {"test/active_fraction": ("test/active_units", lambda n: n / d),
               "test/kl_active_fraction": ("test/collapsed_dims", lambda n: 1 - n / d)}
    out = finished.copy()
    for key, (count, fraction) in derived.items():
        if count in out:
            recorded = out[key] if key in out else pd.Series(np.nan, index=out.index)
            out[key] = recorded.fillna(fraction(out[count]))
    return out


def _capacity_cells(finished: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean and seed interval of `metric` per latent size; each seed is first averaged over the configs
    sharing that size (other factors), so the interval is seed-to-seed variation."""
    rows = []
    runs = finished.dropna(subset=[metric]) if metric in finished else finished.iloc[:0]
    for d, cell in runs.groupby("latent_dim"):
        mean, _, lo, hi, n = t_interval(cell.groupby("seed")[metric].mean().to_numpy(float))
        rows.append({"latent_dim": int(d), "mean": mean, "lo": lo, "hi": hi, "n": n})
    return pd.DataFrame(rows, columns=["latent_dim", "mean", "lo", "hi", "n"])


def varies_latent_size(a: Analysis) -> bool:
    return not a.finished.empty and a.finished.latent_dim.nunique() > 1


def capacity(a: Analysis, out: Path) -> F.Figure | str:
    if not varies_latent_size(a):
        return "Every finished run has the same latent size: there is no capacity curve to draw."
    runs = _with_fractions(a.finished)
    cells = {m: _capacity_cells(runs, m) for m in CAPACITY}
    with F._style():
        fig, (left, right) = F.plt.subplots(1, 2, figsize=(8.4, 3.2))
        units = cells["test/active_units"]
        sizes = units.latent_dim.to_numpy()
        left.plot(sizes, sizes, color="grey", lw=0.8, ls="--", label="every dimension active")
        for ax, metric, color in ((left, "test/active_units", "#4c72b0"), (right, "test/active_fraction", "#4c72b0"),
                                  (right, "test/kl_active_fraction", "#dd8452")):
            c = cells[metric]
            if c.empty:
                continue
            err = np.nan_to_num(np.vstack([c["mean"] - c.lo, c.hi - c["mean"]]))
            ax.errorbar(c.latent_dim, c["mean"], yerr=err, fmt="o-", ms=4, lw=1, capsize=2, color=color,
                        label=F.metric_label(metric))
        left.set_yscale("log", base=2)  # with the log x axis, "every dimension active" is the diagonal
        left.set_yticks(sizes, [str(d) for d in sizes])
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(d) for d in sizes])
            ax.minorticks_off()
            ax.set_xlabel("latent dimensions")
            ax.legend(fontsize=7, frameon=False)
        left.set_ylabel("active units (count)")
        right.set_ylabel("fraction of the latent dimensions")
        right.set_ylim(-0.03, 1.05)
        fig.tight_layout()
    several = a.finished.groupby("latent_dim").point.nunique().max() > 1
    averaged = (" Where several configs share a latent size, each seed is first averaged over them." if several else "")
    caption = ("Capacity: active units (Burda et al. 2015: Cov_x(E_q[z_j]) > 0.01) against the latent size, and as "
               "fractions of it, with the fraction of dimensions whose mean KL is at least 0.01 nats (factorized "
               f"priors only). Means over seeds; bars: {LEVEL:.0%} t-intervals.{averaged}")
    return F.save(fig, "capacity", out, caption)


def _capacity_finding(a: Analysis) -> str | None:
    runs = _with_fractions(a.finished)
    cells = _capacity_cells(runs, "test/active_units").merge(
        _capacity_cells(runs, "test/active_fraction"), on="latent_dim", suffixes=("", "_fraction"))
    if len(cells) < 2:
        return None
    units = cells[["latent_dim", "mean"]]
    frac = cells[["latent_dim", "mean_fraction"]].rename(columns={"mean_fraction": "mean"})
    first, last = units.iloc[0], units.iloc[-1]
    peak = units.loc[units["mean"].idxmax()]
    text = (f"Active units go from {first['mean']:.3g} at {int(first.latent_dim)} dimensions to {last['mean']:.3g} at "
            f"{int(last.latent_dim)} (most: {peak['mean']:.3g} at {int(peak.latent_dim)}); the active fraction from "
            f"{frac.iloc[0]['mean']:.2f} to {frac.iloc[-1]['mean']:.2f}.")
    short = frac[frac["mean"] < 0.95]
    if len(short):
        first_short, last_short = short.iloc[0], frac.iloc[-1]
        text += (f" From {int(first_short.latent_dim)} dimensions on, more than 5% of them stay inactive "
                 f"({1 - first_short['mean']:.0%} there, {1 - last_short['mean']:.0%} at {int(last_short.latent_dim)}): "
                 "the KL term switches off what the data does not pay for, so latent size beyond that buys no more "
                 "used capacity.")
    else:
        text += " At every size nearly all dimensions (≥ 95%) are active."
    return text


def section(a: Analysis, figs: dict) -> Section | None:
    """Shown when some finished run was scored on training or augmented images, or the latent size varies."""
    gaps = gaps_present(a)
    if not gaps and not varies_latent_size(a):
        return None
    blocks: list = []
    if gaps:
        blocks.append(Text(
            "Where does inference fail? Each run is scored on its test images, on as many of its own training "
            "images (clean, as inference sees them) and, when it trained on augmented batches, on augmented test "
            "images. A train-minus-test gap beyond its image-sampling error is overfitting; an augmented run's clean "
            "test ELBO against the unaugmented config's says what the augmentation costs where inference happens; "
            "a sampled z reconstructing much worse than the posterior mean E[z] means decoding a sample (not the "
            "mean) at inference costs quality."))
        blocks += [_table(a, gaps), figure_block(figs, "inference_gaps", "Inference gaps")]
        blocks += [Text(t) for t in _findings(a, gaps)]
    if varies_latent_size(a):
        blocks.append(figure_block(figs, "capacity", "Capacity: active units against the latent size"))
        finding = _capacity_finding(a)
        if finding:
            blocks.append(Text(finding))
    return Section("Inference and capacity", blocks)
