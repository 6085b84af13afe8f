"""KID and k-NN precision / recall on known answers: closed forms on tiny sets, synthetic distributions,
and Fashion-MNIST test images (copies, blur, missing classes) in the frozen classifier's features.
Also the strict JSON of metrics.json."""

from __future__ import annotations

import itertools
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from pipeline import metrics as M

QUIET = dict(log=lambda *_: None)
N_REAL = 1000  # Fashion-MNIST test images per set: enough for stable answers, a few seconds of CPU


def _gaussian(n: int, d: int = 8, shift: float = 0.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift


def _kid(a, b, n_subsets=20, subset_size=200, seed=0):
    return M.kernel_inception_distance(a, b, n_subsets=n_subsets, subset_size=subset_size,
                                       generator=torch.Generator().manual_seed(seed))


# --- KID ------------------------------------------------------------------------------------------
def test_the_polynomial_kernel_on_a_hand_computed_pair():
    # ((1·3 + 2·4) / 2 + 1)³ = 6.5³
    assert float(M.polynomial_kernel(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]]))) == 274.625


@pytest.mark.parametrize(("m", "n"), [(6, 6), (5, 7)])
def test_the_unbiased_mmd_equals_the_direct_sum_over_pairs(m, n):
    a, b = _gaussian(m, 3, seed=1), _gaussian(n, 3, shift=0.3, seed=2)

    def k(x, y):
        return (sum(xi * yi for xi, yi in zip(x.tolist(), y.tolist())) / 3 + 1) ** 3

    within_a = sum(k(a[i], a[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    within_b = sum(k(b[i], b[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    across = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    direct = within_a + within_b - 2 * across
    got = M.mmd2_unbiased(M.polynomial_kernel(a, a), M.polynomial_kernel(b, b), M.polynomial_kernel(a, b))
    assert got == pytest.approx(direct, rel=1e-12)
    if m == n:  # subsets as large as the sets: every subset is the whole set, reordered
        mean, std = _kid(a, b, n_subsets=4, subset_size=m)
        assert mean == pytest.approx(direct, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9 * abs(direct))


def test_kid_is_zero_within_its_spread_for_one_distribution_and_clearly_positive_for_a_shifted_one():
    same = _gaussian(2000)
    halves = _kid(same[:1000], same[1000:])
    identical = _kid(same, same)
    shifted = _kid(_gaussian(1000, shift=0.5, seed=1), same[:1000])
    for mean, std in (halves, identical):
        assert std > 0 and abs(mean) < 3 * std, (mean, std)
    assert shifted[0] > 5 * shifted[1] and shifted[0] > 10 * halves[1], (shifted, halves)


def test_kid_is_reproducible_from_its_generator_and_its_subsets_depend_on_it():
    a, b = _gaussian(600, seed=3), _gaussian(600, shift=0.1, seed=4)
    assert _kid(a, b, seed=7) == _kid(a, b, seed=7)
    assert _kid(a, b, seed=7) != _kid(a, b, seed=8)


def test_kid_and_knn_manifolds_reject_sets_too_small_to_estimate():
    with pytest.raises(ValueError, match="at least 2 rows"):
        M.kernel_inception_distance(_gaussian(1), _gaussian(5))
    with pytest.raises(ValueError, match="k=3 for 3 points"):
        M.precision_recall(_gaussian(3), _gaussian(10))


# --- precision and recall -------------------------------------------------------------------------
def test_knn_radii_are_the_distance_to_the_kth_other_point():
    points = torch.tensor([[0.0], [1.0], [3.0], [7.0]])  # on a line: distances are easy to list
    assert M.knn_radii_squared(points, k=1).tolist() == [1.0, 1.0, 4.0, 16.0]
    assert M.knn_radii_squared(points, k=2).tolist() == [9.0, 4.0, 9.0, 36.0]
    # Copies count as other points at distance 0: a point with k copies has a ball of radius 0.
    copies = torch.tensor([[2.0, 5.0]] * 4 + [[3.0, 5.0]])
    assert M.knn_radii_squared(copies, k=3).tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_precision_and_recall_on_a_hand_made_layout():
    real = torch.tensor([[0.0], [1.0], [2.0], [10.0]])  # k = 1 radii: 1, 1, 1, 8
    generated = torch.tensor([[0.5], [1.5], [30.0], [31.0]])  # radii: 1, 1, 1, 1
    # Inside the real manifold: 0.5 and 1.5 (30 and 31 are beyond 10 + 8). Real points within a generated
    # ball: 0 and 1 (0.5 ± 1), 2 (1.5 ± 1); 10 is not.
    assert M.precision_recall(real, generated, k=1) == (0.5, 0.75)


def test_blocks_of_rows_give_the_same_answer_as_one_block():
    real, generated = _gaussian(300, seed=5), _gaussian(250, shift=0.4, seed=6)
    whole = M.precision_recall(real, generated, max_elements=10**9)
    assert M.precision_recall(real, generated, max_elements=1000) == whole  # blocks of 3 and 4 rows
    assert M.precision_recall(real, generated, max_elements=1) == whole  # one row at a time
    assert 0 < whole[0] < 1 and 0 < whole[1] < 1


def test_identical_sets_have_precision_and_recall_one_even_with_duplicates():
    points = torch.cat([_gaussian(200, seed=7), _gaussian(5, seed=8).repeat(10, 1)])  # 5 points 10 times each
    assert M.precision_recall(points, points.clone()) == (1.0, 1.0)


# --- on Fashion-MNIST, in the classifier's features -----------------------------------------------
def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (N, 1, H, W), truncated at 3σ, borders reflected."""
    r = math.ceil(3 * sigma)
    t = torch.arange(-r, r + 1, dtype=images.dtype)
    w = torch.exp(-(t**2) / (2 * sigma**2))
    w = w / w.sum()
    x = F.conv2d(F.pad(images, (r, r, 0, 0), mode="reflect"), w.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), w.view(1, 1, -1, 1))


@pytest.fixture(scope="module")
def fashion(tmp_path_factory, prepared_data_dir):
    """Two disjoint sets of N_REAL test images (one as "real", one as "generated") and the classifier."""
    from pipeline.classifier import ensure_classifier, predict
    from pipeline.config import DataConfig
    from pipeline.data import ensure_splits

    home = tmp_path_factory.mktemp("sample_quality_home")
    (home / "data").symlink_to(prepared_data_dir, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VAE_PIPELINE_HOME", str(home))
        splits = ensure_splits(DataConfig(), **QUIET)
        model, _ = ensure_classifier(DataConfig(), splits, torch.device("cpu"), **QUIET)
    images = splits.test_x.float() / 255
    real, other = images[:N_REAL], images[5000 : 5000 + N_REAL]
    labels = splits.test_y[5000:]

    def features(x: torch.Tensor) -> torch.Tensor:
        return predict(model, x)[0]

    return SimpleNamespace(features=features, real_images=real, real=features(real), other_images=other,
                           other=features(other), few_classes=features(images[5000:][labels < 5][:N_REAL]))


def test_real_images_against_themselves_score_one_and_a_kid_of_zero(fashion):
    assert M.precision_recall(fashion.real, fashion.real.clone()) == (1.0, 1.0)
    mean, std = _kid(fashion.real, fashion.real)
    assert abs(mean) < 3 * std, (mean, std)


def test_copies_of_one_real_image_are_precise_but_recall_nothing(fashion):
    copies = fashion.features(fashion.real_images[:1].repeat(N_REAL, 1, 1, 1))
    precision, recall = M.precision_recall(fashion.real, copies)
    # The copies sit on a real image (precision 1); only that image, if any, is within their zero radius.
    assert precision == 1.0 and recall <= 1 / N_REAL, (precision, recall)
    assert _kid(copies, fashion.real)[0] > 10 * _kid(fashion.other, fashion.real)[0]


def test_blurred_images_lose_precision_and_missing_classes_lose_recall(fashion):
    halves = M.precision_recall(fashion.real, fashion.other)
    blurred = M.precision_recall(fashion.real, fashion.features(gaussian_blur(fashion.other_images, 1.5)))
    few_classes = M.precision_recall(fashion.real, fashion.few_classes)  # classes 0–4 only: modes dropped
    assert halves[0] > 0.75 and halves[1] > 0.75, halves  # two samples of one distribution
    assert blurred[0] < 0.5 * halves[0], (blurred, halves)  # off the data manifold
    assert few_classes[0] > 0.9 * halves[0] and few_classes[1] < 0.8 * halves[1], (few_classes, halves)
    kid_halves, kid_halves_std = _kid(fashion.other, fashion.real)
    assert abs(kid_halves) < 3 * kid_halves_std
    assert _kid(fashion.features(gaussian_blur(fashion.other_images, 1.5)), fashion.real)[0] > 10 * kid_halves_std


def test_sample_quality_of_an_evaluation_uses_equally_many_points_and_its_own_generator(fashion):
    from pipeline.evaluate import sample_quality

    torch.manual_seed(0)
    before = torch.rand(1)
    metrics, params = sample_quality(fashion.other[:300], fashion.real[:400], seed=11)
    assert params == {"kid_subsets": M.KID_SUBSETS, "kid_subset_size": 300, "pr_k": 3, "pr_images": 300}
    assert (metrics["test/precision"], metrics["test/recall"]) == M.precision_recall(fashion.real[:300],
                                                                                     fashion.other[:300])
    kid = M.kernel_inception_distance(fashion.other[:300], fashion.real[:400], generator=torch.Generator().manual_seed(11))
    assert (metrics["test/kid"], metrics["test/kid_std"]) == kid
    torch.manual_seed(0)
    assert torch.equal(torch.rand(1), before)  # the global generator was not drawn from either
    too_few, _ = sample_quality(fashion.other[:3], fashion.real, seed=11)
    assert math.isnan(too_few["test/precision"]) and math.isnan(too_few["test/recall"])
    assert math.isfinite(too_few["test/kid"])


# --- strict JSON ----------------------------------------------------------------------------------
def _no_constants(name):
    raise ValueError(f"non-standard JSON constant {name}")


def test_a_metrics_file_with_nan_is_strict_json_and_reads_back_as_nan(tmp_path):
    from pipeline.evaluate import read_metrics, strict_json
    from pipeline.fileio import atomic_write_json

    saved = {"metrics": {"test/bits_per_dim": math.nan, "test/elbo": -250.5, "test/kid": math.inf,
                         "test/active_units": 12},
             "params": {"iwae_k": 8, "classifier_test_accuracy": -math.inf},
             "settings": {"k": None}, "kl_per_dim": [0.5, math.nan], "artifacts": []}
    path = tmp_path / "metrics.json"
    atomic_write_json(strict_json(saved), path)
    text = path.read_text()
    strict = json.loads(text, parse_constant=_no_constants)
    assert strict["metrics"]["test/bits_per_dim"] is None and strict["metrics"]["test/kid"] is None
    assert strict["kl_per_dim"] == [0.5, None] and strict["settings"] == {"k": None}
    back = read_metrics(path)
    assert math.isnan(back["metrics"]["test/bits_per_dim"]) and math.isnan(back["metrics"]["test/kid"])
    assert math.isnan(back["params"]["classifier_test_accuracy"]) and math.isnan(back["kl_per_dim"][1])
    assert back["metrics"]["test/elbo"] == -250.5 and back["metrics"]["test/active_units"] == 12
    assert back["settings"] == {"k": None}  # a setting left to its default is None, not NaN
    atomic_write_json(strict_json({**saved, "kl_per_dim": None}), path)
    assert read_metrics(path)["kl_per_dim"] is None  # a prior that does not factorize has no vector


def test_the_reports_kl_vectors_read_a_null_entry_as_nan(tmp_path):
    import pandas as pd

    from pipeline.evaluate import strict_json
    from pipeline.report.collect import StudyData, _kl_vectors

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "kl_per_dim.json").write_text(json.dumps(strict_json([0.25, math.nan, 3.0]), allow_nan=False))
    runs = pd.DataFrame([{"run_id": "r1", "status": "FINISHED", "run_dir": str(tmp_path)}])
    data = StudyData(None, [], runs, pd.DataFrame(), pd.DataFrame(), {}, None)
    (vector,) = _kl_vectors(data).values()
    assert vector[0] == 0.25 and math.isnan(vector[1]) and vector[2] == 3.0


# --- in the report --------------------------------------------------------------------------------
def test_the_report_table_shows_each_configs_sample_quality_and_says_how_to_read_it():
    import pandas as pd

    from pipeline.report.sections import _sample_quality_table

    def cell(mean, lo, hi):
        return {"mean": mean, "ci95_low": lo, "ci95_high": hi}

    row = {"config": "β=1", "n_runs": 2}
    for metric, values in {"test/fd_classifier": cell(12.5, 10.0, 15.0), "test/kid": cell(3.25, 1.0, 5.5),
                           "test/precision": cell(0.5, 0.25, 0.75), "test/recall": cell(0.125, 0.0, 0.25)}.items():
        row.update({f"{metric}.{stat}": v for stat, v in values.items()})
    table = _sample_quality_table(SimpleNamespace(summary=pd.DataFrame([row])))
    assert table.df.to_dict("records") == [{"config": "β=1", "seeds": 2, "Fréchet dist.": "12.5 [10, 15]",
                                               "KID": "3.25 [1, 5.5]", "precision": "0.5 [0.25, 0.75]",
                                               "recall": "0.125 [0, 0.25]"}]
    assert "Low precision = samples off the data manifold" in table.caption
    assert "low recall = parts of the data the model never produces (mode dropping)" in table.caption
    # Runs evaluated before these measures existed: no table rather than a table of dashes.
    assert _sample_quality_table(SimpleNamespace(summary=pd.DataFrame([{"config": "β=1", "n_runs": 2}]))) is None
