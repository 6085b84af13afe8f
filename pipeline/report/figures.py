"""The report's figures: each function draws one from an Analysis and returns it with its caption,
or returns a sentence saying why the study cannot show it. Saved as PNG (embedded in the HTML) and
PDF (for a paper). Intervals are the 95% t-intervals of stats.py; every axis names its unit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

from pipeline import metric_table  # noqa: E402
from pipeline.metrics import COLLAPSED_KL  # noqa: E402
from pipeline.report.analysis import POWER_METRICS, Analysis, holm_note, power_cells, remedy_order  # noqa: E402
from pipeline.report.collect import CURVE_BINS, DECODER_NAMES, Factor, fmt_level  # noqa: E402
from pipeline.report.importance import FANOVA, PED_ANOVA, Importances  # noqa: E402
from pipeline.report.stats import LEVEL, t_interval  # noqa: E402
from pipeline.report.verdict import prior_factorizes  # noqa: E402

VERDICT_COLORS = {"collapsed": "#c44e52", "partial": "#dd8452", "healthy": "#55a868", "n/a": "#8c8c8c"}
SHARPNESS = (("laplacian", "variance of the Laplacian"), ("tenengrad", "Tenengrad"), ("hf_energy", "high-frequency energy"))
DPI = 150
# Wherever images of an autoregressive decoder are shown or measured.
PIXEL_BY_PIXEL = ("Images of an autoregressive decoder (its reconstructions, prior samples and traversals) are drawn "
                  "pixel by pixel: they are samples of p(x|z), not the likelihood's mean, so binary or discrete "
                  "pixels look sharp and their sharpness and Fréchet distances are not comparable with those of "
                  "feed-forward decoders, whose images are means.")

metric_label = metric_table.label


@dataclass
class Figure:
    name: str
    caption: str
    png: Path
    pdf: Path


@contextmanager
def _style():
    with sns.axes_style("whitegrid"), sns.plotting_context("paper", font_scale=1.0), \
            plt.rc_context({"axes.titlesize": 9, "axes.labelsize": 8.5, "xtick.labelsize": 7.5, "ytick.labelsize": 7.5,
                            "legend.fontsize": 7.5, "figure.dpi": DPI, "savefig.dpi": DPI, "pdf.fonttype": 42}):
        yield


def save(fig, name: str, out_dir: Path, caption: str) -> Figure:
    out_dir.mkdir(parents=True, exist_ok=True)
    png, pdf = out_dir / f"{name}.png", out_dir / f"{name}.pdf"
    # The tight bounding box once for both files (savefig's "tight" lays the figure out again per file).
    fig.draw_without_rendering()
    bbox = fig.get_tightbbox(fig.canvas.get_renderer()).padded(plt.rcParams["savefig.pad_inches"])
    fig.savefig(png, bbox_inches=bbox, metadata={"Software": None})
    fig.savefig(pdf, bbox_inches=bbox, metadata={"CreationDate": None, "Creator": None, "Producer": None})
    plt.close(fig)
    return Figure(name, caption, png, pdf)


# --- helpers ---------------------------------------------------------------------------------------
def _levels_present(f: Factor, values: pd.Series) -> list:
    present = set(values.dropna())
    return [lv for lv in f.levels if lv in present] or sorted(present, key=str)


def _cells(df: pd.DataFrame, by: list[str], metric: str) -> pd.DataFrame:
    """Per group of `by`: each seed's mean over the group's runs (i.e. over the levels of the factors not
    in `by`), then the mean and 95% t-interval of those per-seed means. So an interval is always seed
    to seed variation, never the spread between levels of another factor; one seed ⇒ no interval."""
    cols = [*by, "mean", "lo", "hi", "n"]
    if df.empty or metric not in df:
        return pd.DataFrame(columns=cols)
    per_seed = df.groupby([*by, "seed"], sort=False, dropna=False)[metric].mean().reset_index()
    rows = []
    for keys, g in per_seed.groupby(by, sort=False, dropna=False):
        keys = keys if isinstance(keys, tuple) else (keys,)
        mean, _, lo, hi, n = t_interval(g[metric].to_numpy(float))
        rows.append({**dict(zip(by, keys)), "mean": mean, "lo": lo, "hi": hi, "n": n})
    return pd.DataFrame(rows, columns=cols)


def _set_cat_xticks(ax, labels: list[str], title: str) -> None:
    ax.set_xticks(range(len(labels)), labels)
    if sum(len(s) for s in labels) > 28 or max((len(s) for s in labels), default=0) > 12:
        plt.setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_xlabel(title)


def _log_axis(ax, axis: str = "y") -> None:
    """Log scale with plain numbers (0.2, 1, 10), labelling 2× and 5× ticks when under ~1.5 decades are shown."""
    getattr(ax, f"set_{axis}scale")("log")
    target = ax.yaxis if axis == "y" else ax.xaxis
    limits = ax.get_ylim if axis == "y" else ax.get_xlim
    target.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))

    def minor(v, _):
        lo, hi = limits()
        if v <= 0 or hi / max(lo, 1e-300) > 30:
            return ""
        mantissa = v / 10 ** np.floor(np.log10(v))
        return f"{v:g}" if min(abs(mantissa - 2), abs(mantissa - 5)) < 1e-6 else ""

    target.set_minor_formatter(FuncFormatter(minor))


def _palette(n: int, ordered: bool):
    return sns.color_palette("viridis" if ordered else "tab10", n_colors=max(n, 1)) if n else []


def _dot_whisker(ax, f: Factor, df: pd.DataFrame, metric: str, hue: Factor | None, connect: bool = True):
    """Mean ± 95% interval of `metric` per level of `f` (x), one series per level of `hue`."""
    levels = _levels_present(f, df[f.key])
    hue_levels = _levels_present(hue, df[hue.key]) if hue is not None else [None]
    colors = _palette(len(hue_levels), hue is not None and hue.numeric) if hue is not None else ["#4c72b0"]
    width = 0.5
    handles = []
    for i, (h, color) in enumerate(zip(hue_levels, colors)):
        sub = df if hue is None else df[df[hue.key] == h]
        cells = _cells(sub, [f.key], metric)
        if cells.empty:
            continue
        offset = (i - (len(hue_levels) - 1) / 2) * (width / max(len(hue_levels), 1)) if len(hue_levels) > 1 else 0
        cells = cells[cells[f.key].isin(levels)]
        cells["x"] = [levels.index(v) + offset for v in cells[f.key]]
        cells = cells.sort_values("x")
        err = np.vstack([cells["mean"] - cells["lo"], cells["hi"] - cells["mean"]])
        label = f"{hue.short}={fmt_level(h)}" if hue is not None else None
        line = ax.errorbar(cells.x, cells["mean"], yerr=np.nan_to_num(err), fmt="o-" if connect and f.numeric else "o",
                           color=color, ms=4, lw=1, capsize=2, label=label)
        handles.append(line)
    _set_cat_xticks(ax, [fmt_level(v) for v in levels], f.label)
    return handles


def _continuous_x(ax, f: Factor) -> None:
    if f.log:
        _log_axis(ax, "x")
    elif f.integer:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f.label)


def _continuous_scatter(ax, f: Factor, df: pd.DataFrame, metric: str):
    """A search range: one point per run (no two runs share a level, so there is nothing to average)."""
    ax.scatter(df[f.key], df[metric], s=12, color="#4c72b0", alpha=0.8)
    _continuous_x(ax, f)
    return []


def _factor_panel(ax, f: Factor, df: pd.DataFrame, metric: str, hue: Factor | None):
    if f.kind == "continuous":
        return _continuous_scatter(ax, f, df, metric)
    return _dot_whisker(ax, f, df, metric, hue if hue is not None and hue.kind != "continuous" else None)


def _partner(a: Analysis, f: Factor) -> Factor | None:
    """The factor that colours the series of `f`'s panels: its interaction partner, else the next factor."""
    if a.interaction and f in a.interaction:
        return a.interaction[1] if a.interaction[0] is f else a.interaction[0]
    others = [g for g in a.factors if g is not f]
    return others[0] if others else None


def _ofat_slice(a: Analysis, f: Factor, df: pd.DataFrame) -> pd.DataFrame:
    """OFAT varies one factor at a time: a factor's effect is read with the others at their baseline."""
    if a.data.spec.sampler != "ofat":
        return df
    base = a.data.spec.baseline
    mask = np.ones(len(df), dtype=bool)
    for g in a.factors:
        if g is not f:
            mask &= (df[g.key] == base[g.key]).to_numpy()
    return df[mask]


def _legend_right(fig, handles, title: str | None = None) -> None:
    handles = [h for h in handles if h.get_label() and not h.get_label().startswith("_")]
    if handles:
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, title=title,
                   fontsize=7.5, title_fontsize=8)


def _wrap(label: str, width: int = 38) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(label, width)) or label


def _seeds_note(a: Analysis) -> str:
    if a.finished.empty or a.finished.seed.nunique() < 2:
        return "One seed per config: no interval can be drawn, so no difference here should be read as real."
    return (f"Bars: {LEVEL:.0%} t-intervals over seeds (each seed's value averaged over the levels of the factors "
            "not shown first).")


# --- Collapse --------------------------------------------------------------------------------------
def kl_heatmap(a: Analysis, out: Path) -> Figure | str:
    shown = a.summary[a.summary.point.isin(a.shown)]
    rows, labels = [], []
    for _, cfg in shown.iterrows():
        runs = a.finished[(a.finished.point == cfg.point) & a.finished.run_id.isin(list(a.data.kl_per_dim))]
        vectors = [np.sort(a.data.kl_per_dim[r])[::-1] for r in runs.run_id]
        if not vectors:
            continue
        width = max(len(v) for v in vectors)
        padded = np.full((len(vectors), width), np.nan)
        for i, v in enumerate(vectors):
            padded[i, : len(v)] = v
        rows.append(np.nanmean(padded, axis=0))
        labels.append(f"{cfg.config}  [{cfg.verdict}]")
    no_kl = sorted({c for c, p in zip(shown.config, shown.prior) if not prior_factorizes(p)})
    if not rows:
        if no_kl:
            return ("No config shown has a per-dimension KL: their priors do not factorize over dimensions, so the KL "
                    "of one dimension is not defined. Active units and I(x; z) below are the prior-free view.")
        return "No finished run has a KL-per-dimension vector (eval/kl_per_dim.json) yet."
    width = max(len(r) for r in rows)
    mat = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        mat[i, : len(r)] = r
    floor = COLLAPSED_KL / 10
    with _style():
        fig, ax = plt.subplots(figsize=(min(2.5 + 0.28 * width, 12), 0.9 + 0.28 * len(rows)))
        vmax = max(float(np.nanmax(mat)), COLLAPSED_KL * 10)
        img = ax.imshow(np.clip(mat, floor, None), aspect="auto", cmap="magma", interpolation="nearest",
                        norm=LogNorm(vmin=floor, vmax=vmax))
        ax.grid(False)
        ax.set_yticks(range(len(labels)), labels)
        step = max(1, width // 16)
        ax.set_xticks(range(0, width, step), [str(i + 1) for i in range(0, width, step)])
        ax.set_xlabel("latent dimension, ranked by its KL (1 = most informative)")
        for tick, lab in zip(ax.get_yticklabels(), labels):
            tick.set_color(VERDICT_COLORS.get(lab.rsplit("[", 1)[-1].rstrip("]"), "black"))
        bar = fig.colorbar(img, ax=ax, pad=0.02, fraction=0.05)
        bar.set_label("mean KL per dimension (nats)")
        bar.ax.axhline(COLLAPSED_KL, color="white", lw=1.5)
        nan_note = " Grey cells: the config has fewer dimensions." if np.isnan(mat).any() else ""
    caption = (f"KL per latent dimension (nats, mean over the test set, log colour scale): one row per config, "
               f"dimensions ranked by their KL within each seed, then averaged over seeds. Dimensions below "
               f"{COLLAPSED_KL} nats (white line on the colour bar; darker) carry no information. Row labels are "
               f"coloured by verdict.{nan_note}")
    if no_kl:
        caption += (f" Not shown: {len(no_kl)} config(s) whose prior does not factorize over dimensions (no "
                    "per-dimension KL is defined for it).")
    return save(fig, "kl_per_dimension", out, caption)


def _collapse_guides(ax, a: Analysis, metric: str) -> None:
    """The ceilings a collapse measure is read against: d for active units, log B for I(x; z)."""
    if metric == "test/active_units":
        dims = sorted(set(a.finished.latent_dim))
        if len(dims) == 1:
            ax.axhline(dims[0], color="grey", ls="--", lw=0.8)
            ax.text(0.99, dims[0], f"d = {dims[0]} ", transform=ax.get_yaxis_transform(), va="top",
                    ha="right", fontsize=7, color="grey")
            ax.set_ylim(top=dims[0] * 1.08)
        ax.set_ylim(bottom=-0.5)
    if metric == "test/mutual_info" and "test/mi_batch" in a.finished:
        cap = float(np.log(a.finished["test/mi_batch"].max()))
        ax.axhline(cap, color="grey", ls=":", lw=0.8)
        ax.text(0.99, cap, "log B (estimator cap) ", transform=ax.get_yaxis_transform(), va="top",
                ha="right", fontsize=7, color="grey")
        ax.set_ylim(top=max(ax.get_ylim()[1], cap * 1.08))
        ax.set_ylim(bottom=min(0, ax.get_ylim()[0]))


def collapse_by_factor(a: Analysis, out: Path) -> Figure | str:
    metrics = [m for m in ("test/active_units", "test/mutual_info") if m in a.finished]
    if a.finished.empty or not metrics:
        return "No finished run has active units or mutual information yet."
    n = len(a.factors)
    with _style():
        fig, axes = plt.subplots(len(metrics), n, figsize=(max(3.2 * n, 4.5), 2.6 * len(metrics)), squeeze=False)
        for j, f in enumerate(a.factors):
            partner = _partner(a, f)
            df = _ofat_slice(a, f, a.finished)
            for i, m in enumerate(metrics):
                ax = axes[i, j]
                handles = _factor_panel(ax, f, df, m, partner)
                if j == 0:
                    ax.set_ylabel(metric_label(m))
                _collapse_guides(ax, a, m)
                if i < len(metrics) - 1:
                    ax.set_xlabel("")
                    ax.tick_params(labelbottom=False)
                if i == 0 and handles:  # each column has its own series: its legend sits above it
                    ax.legend(handles=handles, fontsize=7, frameon=False, loc="lower center", bbox_to_anchor=(0.5, 1.0),
                              ncol=min(3, len(handles)), handletextpad=0.3, columnspacing=0.8)
        fig.tight_layout()
    ofat = " OFAT: each factor is shown with the others at their baseline." if a.data.spec.sampler == "ofat" else ""
    caption = ("Active units (Burda et al. 2015; dashed: the number of latent dimensions d) and mutual information "
               "I(x; z) (He et al. 2019; dotted: the estimator's ceiling log B for batches of B test images) against "
               f"each factor; points are means over seeds and the levels of factors not shown. {_seeds_note(a)}{ofat}")
    return save(fig, "collapse_by_factor", out, caption)


def training_curves(a: Analysis, out: Path) -> Figure | str:
    curves = a.data.curves
    shown = a.summary[a.summary.point.isin(a.shown)]
    runs = a.data.runs
    if curves.empty or shown.empty:
        return "No training curves (train/kl, train/recon_nll) are stored for finished runs yet."
    n = len(shown)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    seed_colors = dict(zip(sorted(set(runs.seed)), sns.color_palette("tab10", n_colors=max(len(set(runs.seed)), 1))))
    any_onset = False
    by_run = {key: g for key, g in curves.groupby(["run_id", "key"])}
    empty = curves.iloc[:0]
    with _style():
        fig = plt.figure(figsize=(3.0 * ncols + 0.6, 3.6 * nrows + 0.4))
        # One block per config (KL above, recon. NLL below, close together); room between blocks for titles.
        outer = fig.add_gridspec(nrows, ncols, hspace=0.36, wspace=0.38, top=1 - 0.8 / (3.6 * nrows + 0.4))
        legend = {}
        for k, (_, cfg) in enumerate(shown.iterrows()):
            r, c = divmod(k, ncols)
            inner = outer[r, c].subgridspec(2, 1, hspace=0.08, height_ratios=[1.0, 0.8])
            ax_kl = fig.add_subplot(inner[0])
            ax_rec = fig.add_subplot(inner[1], sharex=ax_kl)
            d = int(cfg.latent_dim)
            threshold = COLLAPSED_KL * d
            for _, run in runs[runs.point == cfg.point].iterrows():
                color = seed_colors[run.seed]
                kl = by_run.get((run.run_id, "train/kl"), empty)
                rec = by_run.get((run.run_id, "train/recon_nll"), empty)
                label = f"seed {run.seed}"
                if not kl.empty:
                    (h,) = ax_kl.plot(kl.step, np.clip(kl.value, threshold / 100, None), color=color, lw=1)
                    legend.setdefault(label, h)
                if not rec.empty:
                    ax_rec.plot(rec.step, rec.value, color=color, lw=1)
                onset = a.onsets.get(run.run_id)
                if onset is not None:
                    any_onset = True
                    for ax in (ax_kl, ax_rec):
                        h = ax.axvline(onset, color=VERDICT_COLORS["collapsed"], ls="--", lw=1)
                    legend.setdefault("collapse onset", h)
            h = ax_kl.axhline(threshold, color="grey", ls=":", lw=0.9)
            legend.setdefault(f"{COLLAPSED_KL} nats × d", h)
            _log_axis(ax_kl)
            ax_kl.set_title(_wrap(f"{cfg.config} [{cfg.verdict}]", 40), fontsize=7.5,
                            color=VERDICT_COLORS.get(cfg.verdict, "black"))
            plt.setp(ax_kl.get_xticklabels(), visible=False)
            if c == 0:
                ax_kl.set_ylabel("train KL\n(nats/image)")
                ax_rec.set_ylabel("train recon. NLL\n(nats/image)")
            if r == nrows - 1:
                ax_rec.set_xlabel("optimizer step")
            ax_rec.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
        fig.legend(handles=list(legend.values()), labels=list(legend), loc="upper center", ncol=min(len(legend), 7),
                   bbox_to_anchor=(0.5, 1.0), frameon=False)
    more = f" Showing {n} of {len(a.summary)} configs, spread over the leaderboard." if n < len(a.summary) else ""
    onset = "" if any_onset else " No run collapsed for good (no onset to mark)."
    caption = (f"Training curves per config (small multiples): KL (top, log scale) and reconstruction NLL (bottom), "
               f"both per image and averaged in step bins ({CURVE_BINS} bins over the longest run); one line per seed. Dotted: {COLLAPSED_KL} nats × d, every dimension at the collapsed "
               f"level; dashed red: the collapse onset, the first step from which the binned KL stays below that line "
               f"to the end.{onset}{more}")
    return save(fig, "training_curves", out, caption)


# --- Decoder power ---------------------------------------------------------------------------------
FEED_FORWARD_MARKERS = "sDv^P"  # one per feed-forward family at x = 0; autoregressive points are circles


def decoder_power(a: Analysis, out: Path) -> Figure | str:
    if not a.autoregressive:
        return "The study has no autoregressive decoder."
    metrics = [m for m in POWER_METRICS if m in a.finished]
    finished = a.finished.dropna(subset=["rows_above"])
    if not metrics or not finished.autoregressive.astype(bool).any():
        return "No run of an autoregressive decoder has finished with KL, active units and I(x; z) yet."
    remedies = remedy_order(finished)
    colors = dict(zip(remedies, _palette(len(remedies), ordered=False)))
    ar_rows = sorted(set(finished.rows_above[finished.autoregressive.astype(bool)]))
    feed_forward = list(dict.fromkeys(finished.decoder[~finished.autoregressive.astype(bool)]))
    span = max(ar_rows + [1])
    dodge = 0.025 * span  # series side by side, so that equal means do not hide each other's bars
    several = False
    with _style():
        fig, axes = plt.subplots(1, len(metrics), figsize=(3.3 * len(metrics) + 0.4, 2.9), squeeze=False)
        handles: dict[str, object] = {}
        for ax, m in zip(axes[0], metrics):
            cells = power_cells(finished, m)
            several |= bool((cells.configs > 1).any())
            for i, remedy in enumerate(remedies):
                shift = (i - (len(remedies) - 1) / 2) * dodge
                mine = cells[cells.remedy == remedy]
                ar = mine[mine.autoregressive.astype(bool)].sort_values("rows_above")
                if len(ar):
                    err = np.nan_to_num(np.vstack([ar["mean"] - ar.lo, ar.hi - ar["mean"]]))
                    line = ax.errorbar(ar.rows_above + shift, ar["mean"], yerr=err, fmt="o-", color=colors[remedy],
                                       ms=4, lw=1, capsize=2)
                    handles.setdefault(remedy, line)
                for _, ff in mine[~mine.autoregressive.astype(bool)].iterrows():
                    marker = FEED_FORWARD_MARKERS[feed_forward.index(ff.decoder) % len(FEED_FORWARD_MARKERS)]
                    err = np.nan_to_num([[ff["mean"] - ff.lo], [ff.hi - ff["mean"]]])
                    ax.errorbar([shift], [ff["mean"]], yerr=err, fmt=marker, color=colors[remedy], ms=5, capsize=2,
                                mfc="white", mew=1.2)
                    handles.setdefault(remedy, plt.Line2D([], [], color=colors[remedy], marker="o", ms=4, lw=1))
            _collapse_guides(ax, a, m)
            ticks = ([0] if feed_forward else []) + ar_rows
            names = ", ".join(DECODER_NAMES.get(d, d) for d in feed_forward)
            ax.set_xticks(ticks, [f"0\n{names}" if t == 0 and feed_forward else f"{t:g}" for t in ticks])
            ax.set_xlim(-0.08 * span - dodge * len(remedies), span * 1.08 + dodge * len(remedies))
            ax.set_xlabel("rows above the pixel the decoder sees")
            ax.set_ylabel(metric_label(m))
        for name in feed_forward:
            marker = FEED_FORWARD_MARKERS[feed_forward.index(name) % len(FEED_FORWARD_MARKERS)]
            handles[f"{DECODER_NAMES.get(name, name)} (feed-forward, x = 0)"] = plt.Line2D(
                [], [], ls="", marker=marker, color="grey", mfc="white", mew=1.2, ms=5)
        fig.tight_layout()
        fig.legend(handles=list(handles.values()), labels=list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   frameon=False, title="remedy", title_fontsize=8)
    averaged = (" Where a point holds several configs (factors other than decoder and remedy varied too), each seed "
                "is first averaged over them.") if several else ""
    one_seed = finished.groupby("point").seed.nunique().max() < 2
    bars = ("One seed per config: no interval can be drawn, so no difference here should be read as real."
            if one_seed else f"Bars: {LEVEL:.0%} t-intervals over seeds.")
    caption = ("Decoder power: test KL rate, active units and I(x; z) against the rows above a pixel the "
               "autoregressive decoder sees, depth × (kernel size // 2) for the PixelCNN's masked stack (its "
               "receptive field); one line per remedy against collapse. Hollow markers at 0: feed-forward decoders, "
               f"which see no pixel of the image and model it only through z. Means over seeds. {bars}{averaged}")
    return save(fig, "decoder_power", out, caption)


# --- Sharpness -------------------------------------------------------------------------------------
def _sharpness_long(df: pd.DataFrame, keys: list[str], measure: str) -> pd.DataFrame:
    """One row per (run, reconstructions | prior samples) with that measure's ratio."""
    cols = {w: f"test/sharpness/{w}_{measure}_ratio" for w in ("recon", "samples")}
    parts = []
    for w, col in cols.items():
        if col in df:
            part = df[[*keys, "seed", col]].rename(columns={col: "ratio"})
            part["what"] = "reconstructions" if w == "recon" else "prior samples"
            parts.append(part)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*keys, "seed", "ratio", "what"])


WHAT = Factor("what", "", "", "categorical", ("reconstructions", "prior samples"))


def sharpness(a: Analysis, out: Path) -> Figure | str:
    measures = [m for m, _ in SHARPNESS if any(f"test/sharpness/{w}_{m}_ratio" in a.finished for w in ("recon", "samples"))]
    if a.finished.empty or not measures:
        return "No finished run has sharpness ratios yet."
    keys = [f.key for f in a.factors]
    lik = next((f for f in a.factors if f.key == "likelihood.name" and f.kind != "continuous"), None)
    beta = next((f for f in a.factors if f.key == "objective.beta"), None)
    handles: list = []
    with _style():
        if lik or beta:
            # Likelihood and/or β are factors: x = likelihood (else β), series = β (else the next factor),
            # one column for reconstructions and one for prior samples.
            x = lik or beta
            hue = beta if (lik and beta) else _partner(a, x)
            df = _ofat_slice(a, x, a.finished)
            fig, axes = plt.subplots(len(measures), 2, figsize=(8.2, 2.4 * len(measures)), squeeze=False, sharey="row")
            for i, m in enumerate(measures):
                long = _sharpness_long(df, keys, m)
                for j, what in enumerate(WHAT.levels):
                    ax = axes[i, j]
                    sub = long[long.what == what]
                    hs = _factor_panel(ax, x, sub, "ratio", hue)
                    handles += [h for h in hs if h.get_label() not in {x.get_label() for x in handles}]
                    ax.axhline(1.0, color="grey", ls="--", lw=0.8)
                    _log_axis(ax)
                    if i == 0:
                        ax.set_title(what, fontsize=9)
                    if j == 0:
                        ax.set_ylabel(f"{dict(SHARPNESS)[m]}\n(× data)")
                    if i < len(measures) - 1:
                        ax.set_xlabel("")
                        ax.tick_params(labelbottom=False)
            which = f"{x.label}" + (f", one series per {hue.label}" if hue is not None else "")
        else:
            fig, axes = plt.subplots(len(measures), len(a.factors), figsize=(max(3.4 * len(a.factors), 4.6),
                                     2.3 * len(measures)), squeeze=False, sharey="row")
            for j, f in enumerate(a.factors):
                df = _ofat_slice(a, f, a.finished)
                for i, m in enumerate(measures):
                    ax = axes[i, j]
                    long = _sharpness_long(df, keys, m)
                    if f.kind == "continuous":
                        for w, color in zip(WHAT.levels, ("#4c72b0", "#dd8452")):
                            sub = long[long.what == w]
                            ax.scatter(sub[f.key], sub.ratio, s=12, color=color, label=w)
                        _continuous_x(ax, f)
                    else:
                        hs = _dot_whisker(ax, f, long, "ratio", WHAT)
                        for h, w in zip(hs, WHAT.levels):
                            h.set_label(w)
                        handles = handles or hs
                    ax.axhline(1.0, color="grey", ls="--", lw=0.8)
                    _log_axis(ax)
                    if j == 0:
                        ax.set_ylabel(f"{dict(SHARPNESS)[m]}\n(× data)")
                    if i < len(measures) - 1:
                        ax.set_xlabel("")
                        ax.tick_params(labelbottom=False)
            which = "each factor (series: reconstructions and prior samples)"
        handles.append(plt.Line2D([], [], color="grey", ls="--", lw=0.8, label="test images (1.0)"))
        fig.tight_layout()
        _legend_right(fig, handles)
    caption = (f"Sharpness of reconstructions and prior samples relative to the real test images (1.0 = as sharp as "
               f"the data, below = blurrier; log scale) against {which}: variance of the Laplacian, Tenengrad "
               f"(Sobel gradient energy) and the share of spectral energy above 0.25 cycles/pixel. {_seeds_note(a)}")
    if a.autoregressive:
        caption += f" {PIXEL_BY_PIXEL}"
    return save(fig, "sharpness", out, caption)


GRID_PAD = 2  # pixels of white gutter around each tile in pipeline.images.grid
# save_grid's nearest-neighbour upscaling; training and evaluation write ×2, the others are tried next.
GRID_SCALES = (2, 1, 3, 4)


def _grid_geometry(img: np.ndarray, ncol: int) -> tuple[int, int, int] | None:
    """(scale, tile height, rows) of a grid written by pipeline.images.save_grid with `ncol` columns, or
    None if it is not one. At each candidate scale the width fixes the tile width; the scale is accepted
    when the image is that upscaling of a smaller one, the height holds whole rows of tiles and every
    gutter is white. Square tiles (any image prepared with data.image_size) are looked for first, at
    every scale; then other tile heights from 1 px up (a source kept at its own H×W)."""
    height, width = img.shape[:2]
    for square in (True, False):
        for s in GRID_SCALES:
            if height % s or width % s or (width // s - GRID_PAD) % ncol:
                continue
            pitch_w = (width // s - GRID_PAD) // ncol
            tile_w, inner = pitch_w - GRID_PAD, height // s - GRID_PAD  # inner = rows · (tile height + gutter)
            heights = [tile_w] if square else [t for t in range(1, inner) if t != tile_w]
            heights = [t for t in heights if t >= 1 and inner % (t + GRID_PAD) == 0]
            if tile_w < 1 or not heights:
                continue
            small = img[::s, ::s]
            if not np.array_equal(np.repeat(np.repeat(small, s, axis=0), s, axis=1), img):
                continue
            if not (small[:, np.arange(small.shape[1]) % pitch_w < GRID_PAD] == 1.0).all():
                continue
            for tile_h in heights:
                if (small[np.arange(small.shape[0]) % (tile_h + GRID_PAD) < GRID_PAD] == 1.0).all():
                    return s, tile_h, inner // (tile_h + GRID_PAD)
    return None


def _grid_rows(path: Path, rows: list[int], ncol: int = 8) -> np.ndarray | None:
    """Rows of an image grid written by pipeline.images.save_grid (tiles of any size, white gutters,
    upscaled), each with half a gutter above and below: (H, W) grey or (H, W, 3) colour in
    [0, 1], or None if the file is not such a grid or lacks a row."""
    img = plt.imread(path)
    if img.ndim == 3:
        img = img[..., :3]  # colour as written; an alpha channel, if any, is dropped
    geometry = _grid_geometry(img, ncol)
    if geometry is None:
        return None
    s, tile, n_rows = geometry
    if max(rows) >= n_rows:
        return None
    pitch, margin = tile + GRID_PAD, GRID_PAD // 2
    parts = [img[s * (GRID_PAD + r * pitch - margin) : s * (GRID_PAD + r * pitch + tile + margin)] for r in rows]
    return np.concatenate(parts, axis=0)


def _drawn_pixel_by_pixel(a: Analysis, point: str) -> bool:
    runs = a.finished[a.finished.point == point]
    return bool(len(runs) and runs.autoregressive.astype(bool).any())


def image_panel(a: Analysis, out: Path) -> Figure | str:
    shown = a.summary[a.summary.point.isin(a.shown)]
    rows = []
    for _, cfg in shown.iterrows():
        runs = a.finished[a.finished.point == cfg.point].sort_values("seed")
        for _, run in runs.iterrows():
            recon, samples = a.data.artifact(run.run_id, "test_reconstructions.png"), a.data.artifact(run.run_id, "test_samples.png")
            if recon is None or samples is None:
                continue
            data = _grid_rows(recon, [0, 2])  # the grid interleaves rows: originals, their reconstructions, …
            rec = _grid_rows(recon, [1, 3])
            smp = _grid_rows(samples, [0, 1])
            if data is None or rec is None or smp is None:
                continue
            rows.append((cfg, run.seed, (data, rec, smp)))
            break
    if not rows:
        return "No finished run has its evaluation images (eval/test_reconstructions.png, eval/test_samples.png) yet."
    titles = ("test images", "reconstructions", "prior samples")
    with _style():
        fig, axes = plt.subplots(len(rows), 3, figsize=(10.5, 0.95 * len(rows) + 0.5), squeeze=False,
                                 gridspec_kw={"wspace": 0.04, "hspace": 0.12})
        for i, (cfg, seed, panels) in enumerate(rows):
            for j, img in enumerate(panels):
                ax = axes[i, j]
                if img.ndim == 2:
                    ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                else:  # RGB in [0, 1], shown as it is
                    ax.imshow(img, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                ax.grid(False)
                for s in ax.spines.values():
                    s.set_visible(False)
                if i == 0:
                    ax.set_title(titles[j], fontsize=9)
            drawn = ["drawn pixel by pixel"] if _drawn_pixel_by_pixel(a, cfg.point) else []
            label = "\n".join([*cfg.config.split(", "), *drawn, f"[{cfg.verdict}] seed {seed}"])
            axes[i, 0].set_ylabel(label, fontsize=7, rotation=0, ha="right", va="center", labelpad=6,
                                  color=VERDICT_COLORS.get(cfg.verdict, "black"))
    more = f" Showing {len(rows)} of {len(a.summary)} configs." if len(rows) < len(a.summary) else ""
    drawn = [cfg.point for cfg, _, _ in rows if _drawn_pixel_by_pixel(a, cfg.point)]
    if not drawn:
        how = ("reconstructions (the likelihood's mean at the posterior mean), and 16 samples decoded from the prior, "
               "from the evaluation's image grids. Rendered as the likelihood's mean, so blur here is the decoder's, "
               "not noise.")
    else:
        means = (" Rows of feed-forward decoders are rendered as the likelihood's mean, so blur there is the decoder's, "
                 "not noise." if len(drawn) < len(rows) else "")
        how = ("reconstructions (from the posterior mean), and 16 samples decoded from the prior, from the "
               f"evaluation's image grids. Rows marked \"drawn pixel by pixel\": {PIXEL_BY_PIXEL}{means}")
    caption = f"Per config (rows; the lowest finished seed): the first 16 test images, their {how}{more}"
    return save(fig, "images", out, caption)


# --- Trade-offs --------------------------------------------------------------------------------------
def _style_keys(a: Analysis, exclude: Factor | None) -> tuple[Factor | None, Factor | None]:
    rest = [f for f in a.factors if f is not exclude and f.kind != "continuous"]
    beta = next((f for f in rest if f.key == "objective.beta"), None)
    color = beta or (rest[0] if rest else None)
    marker = next((f for f in rest if f is not color), None)
    return color, marker


def rate_distortion(a: Analysis, out: Path) -> Figure | str:
    df = a.finished.dropna(subset=[c for c in ("test/kl", "test/recon_nll") if c in a.finished])
    if df.empty or "test/kl" not in df or "test/recon_nll" not in df:
        return "No finished run has a rate (test/kl) and distortion (test/recon_nll) yet."
    lik = next((f for f in a.factors if f.key == "likelihood.name"), None)
    facets = _levels_present(lik, df[lik.key]) if lik is not None and lik.kind != "continuous" else [None]
    color_f, marker_f = _style_keys(a, lik)
    color_levels = _levels_present(color_f, df[color_f.key]) if color_f else [None]
    colors = dict(zip(color_levels, _palette(len(color_levels), bool(color_f and color_f.numeric))))
    markers = dict(zip(_levels_present(marker_f, df[marker_f.key]) if marker_f else [None], "osD^vP*Xhp<>" * 4))
    with _style():
        fig, axes = plt.subplots(1, len(facets), figsize=(3.6 * len(facets) + 0.4, 3.3), squeeze=False)
        handles = {}
        for ax, facet in zip(axes[0], facets):
            sub = df if facet is None else df[df[lik.key] == facet]
            for _, run in sub.iterrows():
                c = colors.get(run[color_f.key]) if color_f else "#4c72b0"
                mk = markers.get(run[marker_f.key], "o") if marker_f else "o"
                ax.scatter(run["test/kl"], run["test/recon_nll"], color=c, marker=mk, s=26, edgecolor="white",
                           linewidth=0.4, zorder=3)
            rate, dist = sub["test/kl"].to_numpy(float), sub["test/recon_nll"].to_numpy(float)
            span_r = max(np.ptp(rate), 1e-9)
            span_d = max(np.ptp(dist), 1e-9)
            xlim = (rate.min() - 0.12 * span_r - 0.5, rate.max() + 0.12 * span_r + 0.5)
            ylim = (dist.min() - 0.12 * span_d - 0.5, dist.max() + 0.12 * span_d + 0.5)
            # Lines of constant ELBO: R + D = −ELBO, slope −1 (Alemi et al. 2018), at round levels.
            lo_t, hi_t = xlim[0] + ylim[0], xlim[1] + ylim[1]
            for level in MaxNLocator(nbins=5).tick_values(lo_t, hi_t):
                if not lo_t < level < hi_t:
                    continue
                ax.plot(xlim, [level - xlim[0], level - xlim[1]], color="grey", lw=0.7, ls="--", zorder=1)
                # Label where the line leaves the panel on the right or at the bottom (not too far left).
                x_text = min(xlim[1], level - ylim[0])
                if x_text < xlim[0] + 0.3 * (xlim[1] - xlim[0]) or level - x_text > ylim[1] - 0.08 * (ylim[1] - ylim[0]):
                    continue  # the line only clips a corner: a label there would sit on the axes' edge
                ax.annotate(f"ELBO = {-level:g}", (x_text, level - x_text), xytext=(-3, 3), textcoords="offset points",
                            ha="right", va="bottom", fontsize=6, color="dimgrey", zorder=2,
                            bbox={"fc": "white", "ec": "none", "pad": 0.6, "alpha": 0.85})
            ax.set_xlim(*xlim)
            ax.set_ylim(*ylim)
            ax.set_xlabel("rate R = KL (nats/image)")
            ax.set_ylabel("distortion D = recon. NLL (nats/image)")
            if facet is not None:
                ax.set_title(f"{lik.short} = {facet}")
        for lv, c in colors.items():
            if color_f is not None:
                handles[f"{color_f.short}={fmt_level(lv)}"] = plt.Line2D([], [], ls="", marker="o", color=c, ms=5)
        for lv, mk in markers.items():
            if marker_f is not None:
                handles[f"{marker_f.short}={fmt_level(lv)}"] = plt.Line2D([], [], ls="", marker=mk, color="grey", ms=5)
        handles["constant ELBO"] = plt.Line2D([], [], color="grey", ls="--", lw=0.7)
        fig.tight_layout()
        fig.legend(handles=list(handles.values()), labels=list(handles), loc="center left", bbox_to_anchor=(1.0, 0.5),
                   frameon=False)
    split = (" One panel per likelihood: their distortions are on different scales (densities on dequantized data vs "
             "probability masses), so only points within a panel compare.") if facets != [None] else ""
    caption = ("Rate–distortion plane (Alemi et al. 2018): one point per config and seed, distortion D = test "
               "reconstruction NLL against rate R = test KL, both in nats per image. Dashed lines have constant "
               f"ELBO (R + D = −ELBO): moving along one trades rate for distortion at equal likelihood bound.{split}")
    return save(fig, "rate_distortion", out, caption)


def main_effects(a: Analysis, out: Path) -> Figure | str:
    if a.finished.empty or not a.targets:
        return "No finished run yet."
    n, m = len(a.factors), len(a.targets)
    with _style():
        fig, axes = plt.subplots(m, n, figsize=(max(3.0 * n, 4.0), 2.3 * m), squeeze=False)
        for j, f in enumerate(a.factors):
            df = _ofat_slice(a, f, a.finished)
            for i, t in enumerate(a.targets):
                ax = axes[i, j]
                _factor_panel(ax, f, df, t, None)
                if j == 0:
                    ax.set_ylabel(_wrap(metric_label(t), 22))
                if i < m - 1:
                    ax.set_xlabel("")
                    ax.tick_params(labelbottom=False)
        fig.tight_layout()
    ofat = (" OFAT: each factor with the others at their baseline." if a.data.spec.sampler == "ofat" else
            " Each point averages over the levels of the other factors (a balanced grid makes that a main effect).")
    caption = (f"Main effects: the objective(s) and the collapse measures against each factor. {_seeds_note(a)}{ofat}")
    return save(fig, "main_effects", out, caption)


def _binned(f: Factor, values: pd.Series) -> tuple[pd.Series, list]:
    if f.kind != "continuous":
        levels = _levels_present(f, values)
        return values, levels
    bins = pd.qcut(values, q=min(4, values.nunique()), duplicates="drop")
    labels = [f"{iv.left:.3g}–{iv.right:.3g}" for iv in bins.cat.categories]
    return bins.cat.rename_categories(labels).astype(str), labels


def interaction(a: Analysis, out: Path) -> Figure | str:
    if a.interaction is None:
        return "An interaction needs two factors; this study has one."
    if a.data.spec.sampler == "ofat":
        return ("OFAT designs never vary two factors together, so an interaction cannot be estimated; "
                "run a grid over the two factors to see one.")
    if a.finished.empty:
        return "No finished run yet."
    fa, fb = a.interaction
    obj = a.objectives[0][0]
    panels = [obj] + [t for t in ("test/active_units", "test/mutual_info") if t != obj and t in a.finished][:1]
    df = a.finished.copy()
    df["_a"], la = _binned(fa, df[fa.key])
    df["_b"], lb = _binned(fb, df[fb.key])
    with _style():
        fig, axes = plt.subplots(1, len(panels), figsize=(0.9 + (1.1 + 0.85 * len(lb)) * len(panels), 1.4 + 0.5 * len(la)),
                                 squeeze=False)
        for ax, t in zip(axes[0], panels):
            cells = _cells(df, ["_a", "_b"], t)
            mean = cells.pivot(index="_a", columns="_b", values="mean").reindex(index=la, columns=lb)
            half = (cells.assign(h=(cells.hi - cells.lo) / 2).pivot(index="_a", columns="_b", values="h")
                    .reindex(index=la, columns=lb))
            annot = mean.map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
            annot = annot.where(half.isna(), annot + "\n±" + half.map(lambda v: f"{v:.2g}" if pd.notna(v) else ""))
            cmap = "viridis_r" if dict(a.objectives).get(t) == "minimize" else "viridis"
            sns.heatmap(mean.astype(float), annot=annot.to_numpy(), fmt="", cmap=cmap, ax=ax, linewidths=0.5,
                        cbar_kws={"label": metric_label(t), "shrink": 0.9}, annot_kws={"fontsize": 7})
            ax.set_xticks(np.arange(len(lb)) + 0.5, [fmt_level(v) for v in lb], rotation=30 if len(lb) > 3 else 0,
                          ha="right" if len(lb) > 3 else "center")
            ax.set_yticks(np.arange(len(la)) + 0.5, [fmt_level(v) for v in la], rotation=0)
            ax.set_xlabel(fb.label)
            ax.set_ylabel(fa.label)
            ax.set_title(metric_label(t), fontsize=8.5)
        fig.tight_layout()
    caption = (f"Interaction of {fa.label} × {fb.label}: mean over runs per cell (± half-width of the 95% t-interval when "
               "a cell has several seeds; each seed averaged over the other factors first). For the objective the colour "
               "scale runs from worse (dark) to better (bright). Likelihood-type metrics of different decoder likelihoods "
               "are on different scales. Choose the two factors with `--interaction A B`.")
    return save(fig, "interaction", out, caption)


# How the importance caption describes each evaluator.
EVALUATOR_TEXT = {
    FANOVA: "Optuna's fANOVA evaluator (Hutter et al. 2014; a random forest fitted to every finished run, seeds as "
            "replicates)",
    PED_ANOVA: "Optuna's PED-ANOVA evaluator (Watanabe et al. 2023), used because scikit-learn, which fANOVA needs, "
               "is not installed (installing it gives fANOVA); PED-ANOVA asks which levels the best 10% of the "
               "finished runs (by the metric's direction; active units and I(x; z): higher) favour over all of them, "
               "which says little on the few configs of a small grid",
}


def importances(a: Analysis, out: Path, compute: Callable[[Analysis], Importances | str]) -> Figure | str:
    computed = compute(a)
    if isinstance(computed, str):
        return computed
    result = computed.by_target
    targets = list(result)
    with _style():
        fig, axes = plt.subplots(1, len(targets), figsize=(0.6 + 2.8 * len(targets), 0.8 + 0.35 * len(a.factors)),
                                 squeeze=False, sharey=True)
        for ax, t in zip(axes[0], targets):
            imp = result[t]
            names = [f.short for f in a.factors]
            values = [imp.get(f.key, 0.0) for f in a.factors]
            ax.barh(names, values, color="#4c72b0")
            for y, v in enumerate(values):
                ax.text(v + 0.01, y, f"{v:.2f}", va="center", fontsize=7)
            ax.set_xlim(0, 1.15)
            ax.invert_yaxis()
            ax.set_xlabel("importance (share of variance)")
            ax.set_title(_wrap(metric_label(t), 30), fontsize=8.5)
        fig.tight_layout()
    caption = (f"Hyperparameter importances per target metric: {EVALUATOR_TEXT[computed.evaluator]}, normalized to "
               "sum to 1 per metric. They rank factors by how much of the metric's variance each explains on its "
               "own; a small study gives rough numbers.")
    return save(fig, "importances", out, caption)


def pareto(a: Analysis, out: Path) -> Figure | str:
    if len(a.objectives) < 2:
        return "The study has one objective, so there is no Pareto front."
    s = a.summary
    cols = [f"{m}.mean" for m, _ in a.objectives]
    if s.empty or any(c not in s for c in cols):
        return "No finished config has every objective yet."
    from pipeline.report.stats import pareto_mask

    front = pareto_mask(s[cols].to_numpy(float), [d for _, d in a.objectives])
    pairs = [(i, j) for i in range(len(a.objectives)) for j in range(i + 1, len(a.objectives))][:3]
    with _style():
        fig, axes = plt.subplots(1, len(pairs), figsize=(3.6 * len(pairs) + 0.4, 3.3), squeeze=False)
        for ax, (i, j) in zip(axes[0], pairs):
            (mi, di), (mj, dj) = a.objectives[i], a.objectives[j]
            for on, color, label in ((False, "#8c8c8c", "dominated"), (True, "#c44e52", "Pareto front (all objectives)")):
                sub = s[front == on]
                xerr = np.nan_to_num(np.vstack([sub[f"{mi}.mean"] - sub[f"{mi}.ci95_low"], sub[f"{mi}.ci95_high"] - sub[f"{mi}.mean"]]))
                yerr = np.nan_to_num(np.vstack([sub[f"{mj}.mean"] - sub[f"{mj}.ci95_low"], sub[f"{mj}.ci95_high"] - sub[f"{mj}.mean"]]))
                ax.errorbar(sub[f"{mi}.mean"], sub[f"{mj}.mean"], xerr=xerr, yerr=yerr, fmt="o", color=color, ms=4,
                            lw=0.8, capsize=1.5, label=label)
            for _, cfg in s[front].head(12).iterrows():  # name the front's configs (the ones worth reading)
                ax.annotate(cfg.config, (cfg[f"{mi}.mean"], cfg[f"{mj}.mean"]), xytext=(4, 3), textcoords="offset points",
                            fontsize=6, color="#c44e52")
            ax.set_xlabel(f"{metric_label(mi)} ({'↓' if di == 'minimize' else '↑'} better)")
            ax.set_ylabel(f"{metric_label(mj)} ({'↓' if dj == 'minimize' else '↑'} better)")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.tight_layout()
        fig.legend(handles, labels, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    caption = ("Objectives against each other, one point per config (mean over seeds, bars: 95% t-intervals). Red: "
               "configs no other config beats in every objective at once (the Pareto front over all objectives).")
    return save(fig, "pareto", out, caption)


def baseline_differences(a: Analysis, out: Path) -> Figure | str:
    if a.baseline is None:
        return f"No differences against a reference config: {a.baseline_note}."
    others = a.summary[a.summary.point != a.baseline]
    if others.empty:
        return "Only the reference config has finished runs."
    targets = a.targets
    alpha = 1 - LEVEL
    with _style():
        fig, axes = plt.subplots(1, len(targets), figsize=(0.8 + 2.6 * len(targets), 0.9 + 0.3 * len(others)),
                                 squeeze=False, sharey=True)
        labels = list(others.config)
        for ax, t in zip(axes[0], targets):
            mine = a.differences[a.differences.metric == t].set_index("point")
            for y, point in enumerate(others.point):
                d = mine.loc[point]
                # The marker says what survives the correction; the bar is the unadjusted interval.
                holm, raw = d.p_holm < alpha, d.p_raw < alpha
                color = "#4c72b0" if raw else "#8c8c8c"
                err = [[d["diff"] - d.ci95_low], [d.ci95_high - d["diff"]]] if np.isfinite(d.ci95_low) else None
                ax.errorbar([d["diff"]], [y], xerr=err, fmt="o", color=color, mfc="white" if raw and not holm else color,
                            ms=4, capsize=2, lw=1)
            ax.axvline(0, color="black", lw=0.8)
            ax.set_yticks(range(len(labels)), labels)
            ax.set_ylim(len(labels) - 0.5, -0.5)
            ax.set_xlabel(_wrap(f"Δ {metric_label(t)}", 30))
        fig.tight_layout()
    caption = (f"Differences against the reference config ({a.baseline_note}): mean over seeds of each config minus "
               "that of the reference, with 95% Welch intervals (unequal variances, Welch–Satterthwaite degrees of "
               f"freedom). Filled blue: significant after Holm's correction (adjusted p < {alpha:.2g}); open blue: the "
               "interval excludes 0 but the difference does not survive the correction; grey: neither, or too few "
               "seeds for a test (fewer than 2 on either side), in which case no difference should be claimed. "
               + holm_note(a.differences))
    return save(fig, "baseline_differences", out, caption)
