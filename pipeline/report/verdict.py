"""The collapse verdict of a config, and when a training run collapsed.

Posterior collapse is the posterior q(z|x) falling back onto the prior, so that z carries no
information about x (Bowman et al. 2016; He et al. 2019). No single statistic shows it reliably,
so the rule combines four the evaluate stage records (pipeline/metrics.py; the README, 'Reading the
collapse measures', says why they can disagree): active units (Burda et al. 2015: Cov_x E_q[z_j] >
0.01), the mutual information I(x; z) under the aggregate posterior (He et al. 2019), the
per-dimension KL (a dimension carries information when its mean KL ≥ 0.01 nats) and z_usage_gap
(how much worse the decoder reconstructs from another image's z: ≈ 0 when it ignores z).
The per-dimension KL exists only for a prior that factorizes over dimensions; for the others (a
mixture of Gaussians, the VampPrior) the rule rests on the three measures that never look at the prior.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.metrics import ACTIVE_UNIT_THRESHOLD, COLLAPSED_KL
from pipeline.vae.priors import PRIORS

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
    "A config's verdict applies the rule to its means over seeds; the seeds' own verdicts are listed when they disagree. "
    "With a prior that does not factorize over dimensions (" + ", ".join(n for n, e in PRIORS.items() if not e.factorized)
    + ") the KL of one dimension is not defined, so the KL clauses are dropped: the verdict rests on active units, "
    "I(x; z) and the z-usage gap, which never look at the prior."
)

ONSET_RULE = (
    f"Collapse onset: the training curves are averaged in step bins (200 over the longest run); the onset is the first "
    f"bin from which the "
    f"mean train/kl stays below {COLLAPSED_KL} nats × d (every dimension at the collapsed level) until the end of "
    "training. A run whose final KL is above that has no onset. For a prior without a closed-form KL (mog, vamp) "
    "train/kl is the one-sample Monte Carlo estimate log q(z|x) − log p(z): unbiased, noisier per step, smoothed "
    "by the binning."
)


def prior_factorizes(name) -> bool:
    """Whether a run's prior has a per-dimension KL; an unknown name (a newer version's prior) counts as not."""
    entry = PRIORS.get(name if isinstance(name, str) else "standard_normal")
    return bool(entry and entry.factorized)


def verdict(active_units: float, latent_dim: int, informative_dims: float | None, mutual_info: float,
            z_usage_gap: float) -> str:
    """collapsed / partial / healthy (see RULE); 'n/a' when a needed metric is missing.

    informative_dims: dimensions with mean KL ≥ COLLAPSED_KL, or None where the prior does not
    factorize (the KL clauses are then left out)."""
    values = (active_units, mutual_info, z_usage_gap) + (() if informative_dims is None else (informative_dims,))
    if latent_dim <= 0 or any(v is None or not np.isfinite(v) for v in values):
        return "n/a"
    informative = latent_dim if informative_dims is None else informative_dims
    if active_units < 0.5 or informative < 0.5 or mutual_info < MI_FLOOR or z_usage_gap < Z_GAP_FLOOR:
        return "collapsed"
    if active_units < USED_FRACTION * latent_dim or informative < USED_FRACTION * latent_dim:
        return "partial"
    return "healthy"


def verdict_of(row, suffix: str = "") -> str:
    """The verdict of a run row (suffix '') or of a config summary row (suffix '.mean')."""
    def get(key):
        v = row.get(f"{key}{suffix}", math.nan)
        return math.nan if v is None else float(v)

    d = int(row.get("latent_dim", -1))
    informative = d - get("test/collapsed_dims") if prior_factorizes(row.get("prior")) else None
    return verdict(get("test/active_units"), d, informative, get("test/mutual_info"), get("test/z_usage_gap"))


def measures_of(prior) -> str:
    """The measures a verdict rests on, for the verdict table."""
    return "AU, KL dims, MI, z-gap" if prior_factorizes(prior) else "AU, MI, z-gap (prior-free)"


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
