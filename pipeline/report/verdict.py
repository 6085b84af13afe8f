"""The collapse verdict of a config, and when a training run collapsed.

Posterior collapse is the posterior q(z|x) falling back onto the prior, so that z carries no
information about x (Bowman et al. 2016; He et al. 2019). No single statistic shows it reliably,
so the rule combines four the evaluate stage records (DESIGN.md §4): active units (Burda et al.
2015: Cov_x E_q[z_j] > 0.01), the mutual information I(x; z) under the aggregate posterior (He et
al. 2019), the per-dimension KL (a dimension carries information when its mean KL ≥ 0.01 nats) and
z_usage_gap (how much worse the decoder reconstructs from another image's z: ≈ 0 when it ignores z).
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.metrics import ACTIVE_UNIT_THRESHOLD, COLLAPSED_KL

MI_FLOOR = 0.1  # nats: below this, z tells almost nothing about x (a code of two equally likely values has 0.69)
Z_GAP_FLOOR = 1.0  # nats per image: decoding another image's z costs less than this ⇒ the decoder ignores z
USED_FRACTION = 0.5  # fewer than half of the latent dimensions in use ⇒ partial collapse

VERDICTS = ("collapsed", "partial", "healthy")

RULE = (
    f"**collapsed** when the code carries (almost) no information about the input: no active unit "
    f"(mean active units < 0.5; a unit is active when Cov_x(E_q[z_j]) > {ACTIVE_UNIT_THRESHOLD}, Burda et al. 2015), "
    f"or no latent dimension with mean KL ≥ {COLLAPSED_KL} nats, or I(x; z) < {MI_FLOOR} nats (He et al. 2019), "
    f"or z_usage_gap < {Z_GAP_FLOOR:g} nat per image (decoding another image's z costs almost nothing: the decoder "
    f"ignores z). **partial** when not collapsed but fewer than {USED_FRACTION:.0%} of the d latent dimensions are "
    f"in use (active units < d/2 or dimensions with KL ≥ {COLLAPSED_KL} nats < d/2). **healthy** otherwise. "
    "A config's verdict applies the rule to its means over seeds; the seeds' own verdicts are listed when they disagree."
)

ONSET_RULE = (
    f"Collapse onset: the training curves are averaged in step bins (200 over the longest run); the onset is the first "
    f"bin from which the "
    f"mean train/kl stays below {COLLAPSED_KL} nats × d (every dimension at the collapsed level) until the end of "
    "training. A run whose final KL is above that has no onset."
)


def verdict(active_units: float, latent_dim: int, informative_dims: float, mutual_info: float,
            z_usage_gap: float) -> str:
    """collapsed / partial / healthy (see RULE); 'n/a' when a needed metric is missing."""
    values = (active_units, informative_dims, mutual_info, z_usage_gap)
    if latent_dim <= 0 or any(v is None or not np.isfinite(v) for v in values):
        return "n/a"
    if active_units < 0.5 or informative_dims < 0.5 or mutual_info < MI_FLOOR or z_usage_gap < Z_GAP_FLOOR:
        return "collapsed"
    if active_units < USED_FRACTION * latent_dim or informative_dims < USED_FRACTION * latent_dim:
        return "partial"
    return "healthy"


def verdict_of(row, suffix: str = "") -> str:
    """The verdict of a run row (suffix '') or of a config summary row (suffix '.mean')."""
    def get(key):
        v = row.get(f"{key}{suffix}", math.nan)
        return math.nan if v is None else float(v)

    d = int(row.get("latent_dim", -1))
    return verdict(get("test/active_units"), d, d - get("test/collapsed_dims"), get("test/mutual_info"),
                   get("test/z_usage_gap"))


def collapse_onset(steps: np.ndarray, kl: np.ndarray, latent_dim: int) -> float | None:
    """The step from which the binned train/kl stays below COLLAPSED_KL × d to the end (see ONSET_RULE)."""
    if len(kl) == 0 or latent_dim <= 0:
        return None
    above = np.flatnonzero(np.asarray(kl) >= COLLAPSED_KL * latent_dim)
    if len(above) == 0:
        return float(steps[0])  # below from the first bin: collapsed from the start
    if above[-1] == len(kl) - 1:
        return None
    return float(steps[above[-1] + 1])
