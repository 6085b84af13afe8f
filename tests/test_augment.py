"""Training-time augmentation: each transform against a plain reference, deterministic given the RNG,
on training batches only, binarization-safe, resumable exactly; and the other image sets evaluation scores."""

from __future__ import annotations

import pytest
import torch

from pipeline import augment as A
from pipeline.config import ConfigError, build_config
from pipeline.data import DeviceData

from .test_train import QUIET, _cfg, _weights, straight_and_resumed_weights


def _images(n=6, seed=0) -> torch.Tensor:
    """8-bit images on the [0, 1] grid, with a distinct value per pixel so moves are visible."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, 1, 7, 9), generator=g).float() / 255


def _data_cfg(*overrides):
    return build_config(overrides=list(overrides)).data


def test_shift_moves_each_image_by_its_own_offset_with_zero_fill():
    cfg = _data_cfg("data.max_shift=2")
    x = _images()
    out = A.shift(x, cfg, torch.Generator().manual_seed(3))
    # The same draws, replayed: offsets in {0, …, 2s} on the padded image, i.e. a move of s − offset.
    offsets = torch.randint(0, 5, (2, x.shape[0]), generator=torch.Generator().manual_seed(3))
    for i in range(x.shape[0]):
        dy, dx = 2 - int(offsets[0, i]), 2 - int(offsets[1, i])
        expected = torch.zeros_like(x[i])
        h, w = x.shape[-2:]
        src = x[i, :, max(0, -dy): h - max(0, dy), max(0, -dx): w - max(0, dx)]
        expected[:, max(0, dy): max(0, dy) + src.shape[1], max(0, dx): max(0, dx) + src.shape[2]] = src
        assert torch.equal(out[i], expected), (i, dy, dx)
    assert {tuple(o) for o in offsets.T.tolist()} != {(2, 2)}  # some image did move


def test_hflip_mirrors_about_half_the_images_and_leaves_the_rest():
    x = _images(n=400)
    out = A.hflip(x, _data_cfg(), torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, x)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, x)])
    assert bool((flipped | kept).all()) and 150 < int(flipped.sum()) < 250


def test_intensity_is_one_affine_map_per_image_within_its_ranges():
    cfg = _data_cfg("data.intensity_scale=0.3", "data.intensity_offset=0.05")
    x = _images(n=50) * 0.5 + 0.25  # away from the clip at 0 and 1
    out = A.intensity(x, cfg, torch.Generator().manual_seed(1))
    for xi, oi in zip(x, out):
        a, b = torch.linalg.lstsq(torch.stack([xi.flatten(), torch.ones(xi.numel())], 1), oi.flatten()[:, None]).solution
        assert 0.7 - 1e-5 <= float(a) <= 1.3 + 1e-5 and abs(float(b)) <= 0.05 + 1e-5
        assert torch.allclose(oi, (a * xi + b).clamp(0, 1), atol=1e-5)


def test_noise_has_the_configured_std_and_stays_in_range():
    x = torch.full((64, 1, 28, 28), 0.5)
    out = A.noise(x, _data_cfg("data.noise_std=0.05"), torch.Generator().manual_seed(0))
    assert float((out - x).std()) == pytest.approx(0.05, rel=0.02) and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", list(A.AUGMENTATIONS))
def test_each_augmentation_is_deterministic_given_the_rng_state(name):
    aug = A.augmenter(_data_cfg(f"data.augment={name}"))
    x = _images(n=32)
    a = aug(x.clone(), torch.Generator().manual_seed(5))
    b = aug(x.clone(), torch.Generator().manual_seed(5))
    c = aug(x.clone(), torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(9)
    g1 = aug(x.clone())  # no generator: the global RNG, which a checkpoint carries
    torch.manual_seed(9)
    assert torch.equal(g1, aug(x.clone()))
    # Back on the 8-bit grid the data lives on, in [0, 1].
    assert torch.equal(a, (a * 255).round() / 255) and a.min() >= 0 and a.max() <= 1


def test_geometric_transforms_keep_binary_images_binary_and_value_changes_are_refused_with_static_bits():
    x = (_images(n=16) > 0.5).float()
    out = A.augmenter(_data_cfg("data.augment=[shift, hflip]", "data.binarize=static"))(x, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ConfigError, match=r"data.augment='noise'.*data.binarize=static.*dynamic"):
        build_config(overrides=["data.augment=noise", "data.binarize=static"])
    # Dynamic bits are drawn after augmentation, from the augmented intensities: still binary.
    cfg = _data_cfg("data.augment=intensity+noise", "data.binarize=dynamic")
    data = DeviceData((_images(n=16) * 255).to(torch.uint8), torch.device("cpu"), "dynamic", augment=A.augmenter(cfg))
    assert set(data.batch(torch.arange(16), torch.Generator().manual_seed(0)).unique().tolist()) <= {0.0, 1.0}


def test_augment_lists_are_one_config_whatever_their_order_and_bad_names_are_refused():
    a = build_config(overrides=["data.augment=noise+shift"])
    b = build_config(overrides={"data.augment": ["shift", "noise"]})
    assert a.data.augment == b.data.augment == "shift+noise" and a.result_hash() == b.result_hash()
    assert build_config(overrides=["data.augment=none"]).result_hash() == build_config().result_hash()
    # An option of a transform the run does not use cannot change the weights, nor the hash.
    assert build_config(overrides=["data.noise_std=0.3"]).result_hash() == build_config().result_hash()
    assert build_config(overrides=["data.augment=noise", "data.noise_std=0.3"]).result_hash() != \
        build_config(overrides=["data.augment=noise"]).result_hash()
    for bad, match in (("blur", r"'blur' is not one of: none, shift, hflip, intensity, noise"),
                       ("none+noise", "cannot be combined"), ("[noise, noise]", "twice")):
        with pytest.raises(ConfigError, match=match):
            build_config(overrides=[f"data.augment={bad}"])


def test_only_training_batches_are_augmented(home, monkeypatch):
    from pipeline.stages import train_stage

    calls = []
    real = A.AUGMENTATIONS["noise"]
    monkeypatch.setitem(A.AUGMENTATIONS, "noise", A.Augmentation(
        lambda x, cfg, gen: (calls.append(x.shape[0]), real.apply(x, cfg, gen))[1], True, real.options, real.doc))
    train_stage(_cfg("data.augment=noise", "tracking.enabled=false"), run_dir=home / "run", **QUIET)
    # 512 images in batches of 64 for 2 epochs: 16 training batches, and nothing else (validation, image grids).
    assert calls == [64] * 16


def test_resume_is_bitwise_exact_with_augmentation(home, monkeypatch):
    cfg = _cfg("data.augment=shift+hflip+intensity+noise", "data.binarize=dynamic", "tracking.enabled=false")
    straight, resumed = straight_and_resumed_weights(home, monkeypatch, cfg)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    from pipeline.stages import train_stage

    train_stage(_cfg("data.binarize=dynamic", "tracking.enabled=false"), run_dir=home / "clean", **QUIET)
    assert any(not torch.equal(straight[k], v) for k, v in _weights(home / "clean").items())  # it did augment


def test_trainset_metrics_equal_test_metrics_on_the_same_images(home):
    """The other image sets go through the very code of the test set: the same images (one batch, so the
    common random numbers line up) give the same numbers under every prefix."""
    from pipeline.data import ensure_splits
    from pipeline.evaluate import evaluate_model
    from pipeline.metric_table import SET_METRICS
    from pipeline.vae import build_vae

    cfg = _cfg("likelihood.name=gaussian_learned")  # dequantized: a draw before the ELBO's draw
    torch.manual_seed(0)
    model = build_vae(cfg)
    test_x = ensure_splits(cfg.data, log=lambda *_: None).test_x[:200]
    test = DeviceData(test_x, torch.device("cpu"))
    result = evaluate_model(model, cfg, test, test_x.float() / 255, k=3, batch_size=200, mi_batch=100, n_samples=8,
                            seed=1, other_sets={"trainset": test, "test_aug": test})
    m = result["metrics"]
    for key in SET_METRICS:
        assert m[f"trainset/{key}"] == m[f"test/{key}"] == m[f"test_aug/{key}"], key
    assert result["params"]["trainset_images"] == 200
    # The per-image spread, replayed with the same draws: dequantization, then z ~ q(z|x).
    from pipeline import metrics as M

    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x = M.dequantize(test.batch(torch.arange(200)), generator=gen)
        t = model.terms(x, generator=gen)
    per_image = -(t.recon_nll + t.kl).double()
    assert m["test/elbo"] == pytest.approx(float(per_image.mean()), rel=1e-6)
    assert m["test/elbo_image_sd"] == pytest.approx(float(per_image.std(unbiased=False)), rel=1e-4)


def test_the_other_image_sets_are_the_training_images_and_an_augmented_copy_of_the_test_images(home):
    from pipeline.data import ensure_splits
    from pipeline.evaluate import other_image_sets

    dev = torch.device("cpu")
    cfg = _cfg("data.augment=shift", "data.binarize=static")
    splits = ensure_splits(cfg.data, log=lambda *_: None)
    test_x = splits.test_x[:300]
    sets = other_image_sets(cfg, splits, test_x, dev, True)
    assert set(sets) == {"trainset", "test_aug"} and sets["trainset"].n == sets["test_aug"].n == 300
    # The training images exactly as training saw them: the same static draw.
    trained = DeviceData(splits.train_x[:512], dev, "static", static_seed=cfg.data.split_seed)
    assert torch.equal(sets["trainset"].images, trained.images[:300])
    assert sets["trainset"].augment is None and sets["test_aug"].augment is None  # a fixed copy, never redrawn
    again = other_image_sets(cfg, splits, test_x, dev, 50)
    assert torch.equal(again["test_aug"].images, sets["test_aug"].images) and again["trainset"].n == 50
    assert not torch.equal(sets["test_aug"].images, DeviceData(test_x, dev, "static", static_seed=2).images)
    assert set(other_image_sets(_cfg(), splits, test_x, dev, False)) == set()
