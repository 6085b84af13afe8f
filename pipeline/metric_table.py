"""Every metric key the pipeline records after training, in one table: label, unit, direction, kind.

The study validator (which keys an objective may name), the report (which test keys are results, in
what order, under which axis label) and the tests read this table, so a new metric is one row here
plus the code that computes it. Kinds:

    result   a measurement of the model: summarized over seeds, rankable, allowed as an objective
    derived  a difference of two results of the same run, computed by the report (the inference gaps):
             summarized over seeds like a result, but not recorded in MLflow, so not an objective
    setting  how an evaluation was run (k, sample counts, the classifier's accuracy): recorded, never averaged
    timing   wall-clock seconds: machine-dependent, never summarized as a result

Direction says which way is better when one is (``minimize`` / ``maximize``), or ``none`` for quantities
whose better value depends on the question (the KL rate, a sharpness ratio that should be near 1).

Evaluation also scores two more image sets under their own prefixes, with the same names (issue 12):
``trainset/`` (training images, as many as the test set) and ``test_aug/`` (test images through the
run's augmentation, for augmented runs only). Only the single-sample and encoder measures are computed
there (``SET_METRICS``); IWAE, sharpness and Fréchet distances stay test-only, as they dominate the
evaluation's time and answer no train-vs-test question.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("result", "derived", "setting", "timing")
DIRECTIONS = ("minimize", "maximize", "none")


@dataclass(frozen=True)
class Metric:
    key: str
    label: str  # axis label, without the unit
    unit: str  # "nats/image", "count", "fraction", "× data", …; "" for a pure number
    direction: str = "none"
    kind: str = "result"
    of: tuple[str, str] | None = None  # derived: the value is run[of[0]] − run[of[1]]

    @property
    def axis_label(self) -> str:
        return f"{self.label} ({self.unit})" if self.unit else self.label


def _m(key, label, unit, direction="none", kind="result") -> Metric:
    return Metric(key, label, unit, direction, kind)


# Measures of one image set; under test/ and, for the keys in SET_METRICS, trainset/ and test_aug/ too.
_PER_SET = (
    _m("elbo", "ELBO", "nats/image", "maximize"),
    _m("elbo_image_sd", "s.d. of the per-image ELBO", "nats/image"),
    _m("recon_nll", "recon. NLL", "nats/image", "minimize"),
    _m("recon_nll_mean_z", "recon. NLL at E[z]", "nats/image", "minimize"),
    _m("kl", "KL rate", "nats/image"),
    _m("active_units", "active units", "count", "maximize"),
    _m("active_fraction", "active units / latent dim", "fraction", "maximize"),
    _m("mutual_info", "I(x; z)", "nats", "maximize"),
    _m("z_usage_gap", "z-usage gap", "nats/image"),
)
SET_METRICS = tuple(m.key for m in _PER_SET)
SET_PREFIXES = {"test": "test", "trainset": "train-set", "test_aug": "augmented test"}

_SHARPNESS = (("laplacian", "variance of the Laplacian"), ("tenengrad", "Tenengrad"),
              ("hf_energy", "high-frequency energy"))


def _sharpness_rows() -> tuple[Metric, ...]:
    rows = []
    for what in ("recon", "samples"):
        for measure, name in _SHARPNESS:
            rows.append(_m(f"test/sharpness/{what}_{measure}", f"{what} {name}", "a.u."))
            rows.append(_m(f"test/sharpness/{what}_{measure}_ratio", f"{what} {name}", "× data"))
    return tuple(rows)


def _set_rows(prefix: str) -> tuple[Metric, ...]:
    who = SET_PREFIXES[prefix]
    label = (lambda m: m.label) if prefix == "test" else (lambda m: f"{who} {m.label}")
    return tuple(Metric(f"{prefix}/{m.key}", label(m), m.unit, m.direction, m.kind) for m in _PER_SET)


# The reading order of reports and summary.csv: likelihood, collapse, sharpness, the other image sets.
TABLE: tuple[Metric, ...] = (
    _m("test/iwae_nll", "IWAE NLL", "nats/image", "minimize"),
    _m("test/bits_per_dim", "bits per dimension", "bits", "minimize"),
    *_set_rows("test")[:8],  # ELBO … I(x; z)
    # Factorized priors only (pipeline.evaluate): a mixture prior's KL has no per-dimension split.
    _m("test/collapsed_dims", "collapsed dims", "count", "minimize"),
    _m("test/kl_active_fraction", "dims with KL ≥ 0.01 nats / latent dim", "fraction", "maximize"),
    _m("test/kl_dim_max", "largest KL of a dim", "nats"),
    _set_rows("test")[8],  # z-usage gap
    _m("test/fd_classifier", "sample Fréchet dist. (classifier feat.)", "", "minimize"),
    _m("test/recon_fd_classifier", "recon. Fréchet dist. (classifier feat.)", "", "minimize"),
    _m("test/recon_class_acc", "class acc. on recon.", "fraction", "maximize"),
    *_sharpness_rows(),
    *_set_rows("trainset"),
    *_set_rows("test_aug"),
    # The inference gaps (report, Inference section), each a difference within one run.
    Metric("gap/train_test_elbo", "train-set − test ELBO", "nats/image", kind="derived",
           of=("trainset/elbo", "test/elbo")),
    Metric("gap/sampled_z_recon", "recon. NLL at sampled z − at E[z]", "nats/image", kind="derived",
           of=("test/recon_nll", "test/recon_nll_mean_z")),
    Metric("gap/clean_augmented_elbo", "clean − augmented test ELBO", "nats/image", kind="derived",
           of=("test/elbo", "test_aug/elbo")),
    # Blur against mode dropping (pipeline.evaluate.sample_quality), after the rows above so that the columns
    # summary.csv already had keep their places.
    _m("test/kid", "sample KID (classifier feat.)", "", "minimize"),
    _m("test/kid_std", "s.d. of the sample KID over subsets", ""),
    _m("test/precision", "sample precision (k-NN, classifier feat.)", "fraction", "maximize"),
    _m("test/recall", "sample recall (k-NN, classifier feat.)", "fraction", "maximize"),
    _m("val/elbo", "validation ELBO", "nats/image", "maximize"),
    _m("val/recon_nll", "validation recon. NLL", "nats/image", "minimize"),
    _m("val/kl", "validation KL rate", "nats/image"),
    # How an evaluation was run: logged as test/ points so a re-evaluation replaces them.
    *(_m(f"test/{name}", name.replace("_", " "), "", kind="setting") for name in (
        "iwae_k", "mi_batch", "n_samples", "hf_cutoff", "test_images", "recon_images", "dequantized",
        "pixel_by_pixel", "classifier_test_accuracy", "trainset_images", "augmented", "kid_subsets",
        "kid_subset_size", "pr_k", "pr_images")),
    _m("test/eval_seconds", "evaluation time", "s", kind="timing"),
)
METRICS: dict[str, Metric] = {m.key: m for m in TABLE}
assert len(METRICS) == len(TABLE), "a metric key is listed twice"
assert all(m.kind in KINDS and m.direction in DIRECTIONS for m in TABLE)

# Keys an objective may name: every result, in table order.
OBJECTIVE_METRICS = tuple(m.key for m in TABLE if m.kind == "result")
# Recorded by evaluation but not measurements of the model.
NOT_RESULTS = frozenset(m.key for m in TABLE if m.kind != "result")


DERIVED = tuple(m for m in TABLE if m.kind == "derived")


# Prefixes of the keys evaluation writes (test/ settings and timing included).
EVAL_PREFIXES = tuple(f"{p}/" for p in SET_PREFIXES)


def is_eval_key(key: str) -> bool:
    return key.startswith(EVAL_PREFIXES)


def with_derived(runs):
    """A runs table (pandas, one row per run) with a column for each derived metric both of whose
    results it has."""
    cols = {m.key: runs[m.of[0]] - runs[m.of[1]] for m in DERIVED if m.of[0] in runs and m.of[1] in runs}
    return runs.assign(**cols) if cols else runs


def is_result(key: str) -> bool:
    """A key evaluation records that describes the model. A key the table does not know (written by
    another version) counts as a result, so an older run's numbers are still shown."""
    return key not in NOT_RESULTS


def label(key: str) -> str:
    """The axis label of a key, with its unit; the key itself when the table does not know it."""
    m = METRICS.get(key)
    return m.axis_label if m else key


def ordered(keys) -> list[str]:
    """Keys in the table's reading order; keys it does not know come last, sorted."""
    keys = set(keys)
    known = [m.key for m in TABLE if m.key in keys]
    return known + sorted(keys - set(known))
