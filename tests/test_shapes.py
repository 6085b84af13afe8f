"""Images of any size from 8×8 to 64×64, grey or colour: the conv family's stride schedule (and the
same modules and numbers as before at 28×28), the shapes models reject and why, every family through
the VAE forward and backward, the feature classifier, per-channel sharpness and colour image grids.

The "before" references below are the code as it was when only 1×28×28 existed, kept here so that the
new general code is checked to reproduce it bit for bit where the two overlap."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import metrics
from pipeline.config import build_config
from pipeline.data import Splits
from pipeline.errors import PipelineError
from pipeline.images import pairs, save_grid
from pipeline.vae import build_vae
from pipeline.vae.decoders import ConvDecoder
from pipeline.vae.encoders import (
    SIDE_RANGE,
    ConvEncoder,
    ImageShapeError,
    check_conv_shape,
    check_image_shape,
    conv_block,
    conv_halvings,
)
from pipeline.vae.posterior import DiagonalGaussian


# --- references: the 1×28×28-era code --------------------------------------------------------------
def _downsampled(size):
    return (((size + 1) // 2) + 1) // 2


class _ConvEncoderBefore(nn.Module):
    def __init__(self, latent_dim, image_shape, hidden_dim, depth, channels):
        super().__init__()
        c = channels
        n_colors, height, width = image_shape
        self.features = nn.Sequential(conv_block(n_colors, c // 2, 2), conv_block(c // 2, c, 2), nn.Flatten())
        layers = []
        width = c * _downsampled(height) * _downsampled(width)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden_dim), nn.SiLU()]
            width = hidden_dim
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2 * latent_dim)

    def forward(self, x):
        mu, logvar = self.head(self.body(self.features(x))).chunk(2, dim=-1)
        return DiagonalGaussian(mu, logvar)


class _ConvDecoderBefore(nn.Module):
    def __init__(self, latent_dim, image_shape, depth, channels, params_per_pixel):
        super().__init__()
        n_colors, height, width = image_shape
        c = channels
        self.base = (_downsampled(height), _downsampled(width))
        self.stem = nn.Sequential(nn.Linear(latent_dim, c * self.base[0] * self.base[1]), nn.SiLU())
        blocks = []
        if depth == 1:
            blocks += [nn.ConvTranspose2d(c, c // 2, 4, stride=4), nn.SiLU()]
        else:
            blocks += [nn.ConvTranspose2d(c, c, 4, stride=2, padding=1), nn.SiLU()]
            blocks += [conv_block(c, c) for _ in range(depth - 2)]
            blocks += [nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1), nn.SiLU()]
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(c // 2, params_per_pixel * n_colors, 1)
        self.channels = c
        self.params_per_pixel = params_per_pixel
        self.image_shape = tuple(image_shape)

    def forward(self, z):
        h = self.stem(z).view(-1, self.channels, *self.base)
        out = self.head(self.blocks(h))
        return out.view(out.shape[0], self.params_per_pixel, *self.image_shape)


class _FeatureClassifierBefore(nn.Module):
    def __init__(self, n_classes=10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, n_classes)


_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def _conv_before(images, kernel):
    return F.conv2d(images, kernel.to(images.device, images.dtype).view(1, 1, 3, 3))


def _laplacian_before(images):
    return float(_conv_before(images.float(), _LAPLACIAN).flatten(1).var(1).mean())


def _tenengrad_before(images):
    x = images.float()
    gx, gy = _conv_before(x, _SOBEL_X), _conv_before(x, _SOBEL_X.T)
    return float((gx * gx + gy * gy).mean())


def _hf_before(images, cutoff=0.25):
    x = images.float()[:, 0]
    h, w = x.shape[-2:]
    window = torch.outer(torch.hann_window(h, periodic=False), torch.hann_window(w, periodic=False))
    xw = x * window
    xw = xw - (xw.sum(dim=(-2, -1), keepdim=True) / window.sum()) * window
    power = torch.fft.fft2(xw).abs() ** 2
    fy = torch.fft.fftfreq(h).abs().view(-1, 1)
    fx = torch.fft.fftfreq(w).abs().view(1, -1)
    high = (torch.sqrt(fx * fx + fy * fy) > cutoff).float()
    total = power.flatten(1).sum(1).clamp(min=1e-12)
    return float(((power * high).flatten(1).sum(1) / total).mean())


def _grid_rows_before(path, rows, ncol=8):
    import matplotlib.pyplot as plt

    img = plt.imread(path)
    if img.ndim == 3:
        img = img[..., :3].mean(axis=2)
    scale = img.shape[1] / (ncol * 30 + 2)
    if abs(scale - round(scale)) > 1e-6:
        return None
    s = int(round(scale))
    parts = [img[s * (2 + r * 30) - s : s * (2 + r * 30 + 28) + s] for r in rows]
    if any(p.shape[0] != s * 30 for p in parts):
        return None
    return np.concatenate(parts, axis=0)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --- the conv family's stride schedule ---------------------------------------------------------------
@pytest.mark.parametrize("side, halvings", [(28, 2), (32, 3), (64, 4), (8, 1), (16, 2), (24, 2), (10, 1), (12, 1),
                                            (20, 2), (40, 3), (48, 3), (56, 3), (9, 0), (27, 0), (63, 0)])
def test_conv_halvings_halve_the_smaller_side_while_it_stays_an_integer_of_at_least_4(side, halvings):
    assert conv_halvings(side, side) == halvings
    assert conv_halvings(side, 64) == halvings  # the smaller side decides


def test_every_even_square_side_in_range_is_a_valid_conv_shape_and_every_odd_one_is_not():
    lo, hi = SIDE_RANGE
    assert (lo, hi) == (8, 64)
    for side in range(lo, hi + 1):
        if side % 2:
            with pytest.raises(ImageShapeError):
                check_conv_shape((1, side, side))
        else:
            n = check_conv_shape((3, side, side))
            base = side // 2**n  # the side the encoder ends at: one more halving would be odd or below 4
            assert n >= 1 and base * 2**n == side and base >= 4 and (base % 2 == 1 or base // 2 < 4)


def test_non_square_shapes_need_both_sides_divisible_by_the_halvings_of_the_smaller():
    assert check_conv_shape((1, 28, 32)) == 2  # 28 halves twice; 32 divisible by 4
    assert check_conv_shape((1, 64, 32)) == 3
    with pytest.raises(ImageShapeError, match="1×32×36"):
        check_conv_shape((1, 32, 36))  # 32 halves three times, 36 is not divisible by 8


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 28, 28), (1, 16, 16), (3, 24, 24), (1, 20, 28)])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_conv_modules_where_the_image_halves_twice_are_exactly_the_ones_before(shape, depth):
    """28×28 (and every shape with two halvings): the same parameters, in the same order, drawn from the
    same seed, and the same outputs bit for bit, so runs trained before keep their numbers."""
    assert conv_halvings(*shape[1:]) == 2
    built = {}
    for name, enc_cls, dec_cls in [("before", _ConvEncoderBefore, _ConvDecoderBefore), ("now", ConvEncoder, ConvDecoder)]:
        torch.manual_seed(7)
        enc = enc_cls(5, shape, 24, depth, 8)
        dec = dec_cls(5, shape, depth, 8, 2)
        built[name] = (enc, dec)
    for before, now in zip(built["before"], built["now"]):
        a, b = before.state_dict(), now.state_dict()
        assert list(a) == list(b) and [v.shape for v in a.values()] == [v.shape for v in b.values()]
        assert all(torch.equal(a[k], b[k]) for k in a)
    x = torch.rand(4, *shape, generator=_gen(1))
    z = torch.randn(4, 5, generator=_gen(2))
    (enc_a, dec_a), (enc_b, dec_b) = built["before"], built["now"]
    assert torch.equal(enc_a(x).mu, enc_b(x).mu) and torch.equal(enc_a(x).logvar, enc_b(x).logvar)
    assert torch.equal(dec_a(z), dec_b(z))


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 10, 10), (3, 32, 32), (1, 48, 48), (3, 64, 64), (1, 32, 64)])
@pytest.mark.parametrize("depth", [1, 3])
def test_conv_networks_halve_n_times_and_mirror_back_to_the_image(shape, depth):
    n = check_conv_shape(shape)
    enc = ConvEncoder(4, shape, 16, depth, 8)
    strided = [m for m in enc.features.modules() if isinstance(m, nn.Conv2d)]
    assert [m.stride for m in strided] == [(2, 2)] * n
    assert [m.out_channels for m in strided] == [4] + [8] * (n - 1)
    dec = ConvDecoder(4, shape, depth, 8, 3)
    ups = [m for m in dec.blocks.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.stride[0] for m in ups] == ([2**n] if depth == 1 else [2] * n)
    refine = [m for m in dec.blocks.modules() if type(m) is nn.Conv2d]
    assert len(refine) == (0 if depth == 1 else depth - 2)
    assert dec.base == (shape[1] >> n, shape[2] >> n)
    x = torch.rand(2, *shape, generator=_gen(3))
    assert enc(x).mu.shape == (2, 4)
    assert dec(torch.randn(2, 4, generator=_gen(4))).shape == (2, 3, *shape)


# --- shapes models reject ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["mlp", "conv", "pixelcnn"])
@pytest.mark.parametrize("shape", [(1, 6, 6), (3, 70, 70), (1, 8, 66), (1, 128, 128)])
def test_sides_outside_8_to_64_are_rejected_for_every_family(family, shape):
    encoder = "conv" if family == "conv" else "mlp"
    with pytest.raises(ImageShapeError, match="data.image_size") as e:
        check_image_shape(shape, encoder, family)
    assert "×".join(map(str, shape)) in str(e.value) and "8 to 64" in str(e.value)


def test_channel_counts_other_than_1_or_3_are_rejected():
    with pytest.raises(ImageShapeError, match="data.channels"):
        check_image_shape((2, 28, 28), "mlp", "mlp")


def test_odd_sides_are_rejected_for_the_conv_family_only_naming_the_conv_keys():
    for encoder, decoder in [("mlp", "mlp"), ("mlp", "pixelcnn")]:
        check_image_shape((3, 9, 9), encoder, decoder)  # any size
        check_image_shape((1, 9, 64), encoder, decoder)
    for encoder, decoder, keys in [("conv", "mlp", "model.encoder=conv"), ("mlp", "conv", "model.decoder=conv"),
                                   ("conv", "conv", "model.encoder=conv, model.decoder=conv"),
                                   ("conv", "pixelcnn", "model.encoder=conv")]:
        with pytest.raises(ImageShapeError) as e:
            check_image_shape((3, 9, 9), encoder, decoder)
        msg = str(e.value)
        assert msg.startswith(keys) and "3×9×9" in msg and "data.image_size" in msg and "model.arch=mlp" in msg
        assert isinstance(e.value, PipelineError) and isinstance(e.value, ValueError)


def test_build_vae_rejects_a_shape_its_networks_cannot_take_with_a_pipeline_error():
    with pytest.raises(PipelineError, match="model.encoder=conv, model.decoder=conv: .* 1×30×31 images"):
        build_vae(build_config(overrides=["model.arch=conv"]), image_shape=(1, 30, 31))
    with pytest.raises(PipelineError, match="3×72×72"):
        build_vae(build_config(), image_shape=(3, 72, 72))


# --- every family through the VAE, forward and backward ----------------------------------------------
FAMILIES = {
    "mlp": ["model.arch=mlp", "model.hidden_dim=32"],
    "conv": ["model.arch=conv", "model.channels=8", "model.hidden_dim=32"],
    "pixelcnn": ["model.arch=mlp", "model.decoder=pixelcnn", "model.channels=6", "model.decoder_depth=2",
                 "model.kernel_size=3", "model.hidden_dim=32", "data.binarize=static"],
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 32, 32), (3, 64, 64)])
def test_every_family_trains_a_step_at_any_size_and_colour(family, shape):
    torch.manual_seed(0)
    model = build_vae(build_config(overrides=[*FAMILIES[family], "model.latent_dim=4"]), image_shape=shape)
    assert model.image_shape == shape and model.data_dims == math.prod(shape)
    x = (torch.rand(3, *shape, generator=_gen(5)) > 0.5).float()
    t = model.terms(x, generator=_gen(6))
    assert t.recon_nll.shape == (3,) and torch.isfinite(t.recon_nll).all() and (t.recon_nll > 0).all()
    (t.recon_nll + t.kl).mean().backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(g.abs().sum() > 0 for name, g in grads.items() if name.startswith("encoder."))
    assert any(g.abs().sum() > 0 for name, g in grads.items() if name.startswith("decoder."))
    model.eval()
    if family != "pixelcnn" or shape == (1, 8, 8):  # pixel by pixel: 64 steps here, 12,288 at 3×64×64
        assert model.reconstruct(x[:2], generator=_gen(7)).shape == (2, *shape)
        sample = model.sample(2, generator=_gen(8))
        assert sample.shape == (2, *shape) and 0 <= sample.min() and sample.max() <= 1


# --- the feature classifier ----------------------------------------------------------------------------
def test_the_classifier_at_1x28x28_is_the_one_before():
    from pipeline.classifier import FeatureClassifier

    torch.manual_seed(3)
    before = _FeatureClassifierBefore().state_dict()
    for now in (lambda: FeatureClassifier(), lambda: FeatureClassifier((1, 28, 28), 10)):
        torch.manual_seed(3)
        after = now().state_dict()
        assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def _splits(shape, n_classes, n=384, labelled=True, seed=0):
    """Images whose class sets the brightness of one colour channel's upper half, plus noise."""
    g = _gen(seed)
    c, h, w = shape

    def part(m):
        y = torch.randint(0, n_classes, (m,), generator=g)
        x = torch.rand(m, c, h, w, generator=g) * 100
        x[torch.arange(m), y % c, : h // 2] += 150 * (y // c + 1).float()[:, None, None] / (n_classes // c + 1)
        return x.clamp(0, 255).to(torch.uint8), y

    (tx, ty), (vx, vy), (sx, sy) = part(n), part(64), part(128)
    manifest = {"dataset": "generated", "splits_sha256": f"s{seed}", "n_classes": n_classes if labelled else 0,
                "has_labels": labelled, "image_shape": list(shape)}
    ys = (ty, vy, sy) if labelled else (None, None, None)
    return Splits(tx, ys[0], vx, ys[1], sx, ys[2], manifest, "")


@pytest.mark.parametrize("shape, n_classes", [((3, 32, 32), 6), ((1, 8, 8), 4), ((3, 12, 20), 3)])
def test_the_classifier_takes_the_shape_and_class_count_of_its_splits(shape, n_classes):
    from pipeline.classifier import FEATURE_DIM, predict, train_classifier

    learns = shape == (1, 8, 8)  # trained long enough to learn only where that is cheap
    splits = _splits(shape, n_classes, n=384 if learns else 64)
    model, accuracy = train_classifier(splits, torch.device("cpu"), epochs=3 if learns else 1, batch_size=32,
                                       log=lambda *_: None)
    assert model.body[0].in_channels == shape[0] and model.head.out_features == n_classes
    assert model.body[-2].in_features == 64 * (shape[1] // 4) * (shape[2] // 4)  # floor pooling
    feats, pred = predict(model, splits.test_x.float() / 255)
    assert feats.shape == (128, FEATURE_DIM) and pred.max() < n_classes
    assert 0 <= accuracy <= 1
    if learns:
        assert accuracy > 2 / n_classes  # the class is visible in the images: well above chance


def test_ensure_classifier_caches_by_shape_and_class_count_and_refuses_unlabelled_splits(monkeypatch, tmp_path):
    from pipeline import classifier as C
    from pipeline.config import DataConfig

    monkeypatch.setattr(C, "classifier_dir", lambda data_cfg: tmp_path)  # the real cache lives in the home
    messages = []
    model, info = C.ensure_classifier(DataConfig(), _splits((3, 16, 16), 4, n=128), torch.device("cpu"), log=messages.append)
    stored = json.loads((tmp_path / C.CLASSIFIER_INFO).read_text())
    assert stored["image_shape"] == [3, 16, 16] and stored["n_classes"] == 4 and info == stored
    assert model.head.out_features == 4 and any("training" in m for m in messages)
    messages.clear()
    C.ensure_classifier(DataConfig(), _splits((3, 16, 16), 4, n=128), torch.device("cpu"), log=messages.append)
    assert not any("training" in m for m in messages)  # cached
    # The same split digest with another shape or class count is stale, never loaded into the wrong network.
    for shape, n_classes in [((1, 16, 16), 4), ((3, 16, 16), 5)]:
        messages.clear()
        model, info = C.ensure_classifier(DataConfig(), _splits(shape, n_classes, n=128), torch.device("cpu"),
                                          log=messages.append)
        assert any("training" in m for m in messages) and info["image_shape"] == list(shape)
        assert model.body[0].in_channels == shape[0] and model.head.out_features == n_classes
    with pytest.raises(C.ClassifierUnavailable, match="'generated' has no labels"):
        C.ensure_classifier(DataConfig(), _splits((3, 16, 16), 4, labelled=False), torch.device("cpu"))


def test_a_single_class_gets_no_classifier_since_its_loss_is_zero_at_any_weights():
    from pipeline import classifier as C

    model = C.FeatureClassifier((1, 8, 8), n_classes=1)
    x = torch.rand(16, 1, 8, 8, generator=_gen(17))
    loss = F.cross_entropy(model(x), torch.zeros(16, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and all(not p.grad.any() for p in model.parameters())  # training could never move it
    with pytest.raises(C.ClassifierUnavailable, match="'generated' has 1 class"):
        C.train_classifier(_splits((1, 8, 8), 1, n=32), torch.device("cpu"), epochs=1, log=lambda *_: None)


def test_a_classifier_cached_before_shapes_were_recorded_counts_as_1x28x28_with_10_classes(monkeypatch, tmp_path):
    from pipeline import classifier as C
    from pipeline.config import DataConfig
    from pipeline.fileio import atomic_torch_save

    splits = _splits((1, 28, 28), 10, n=8)
    torch.manual_seed(0)
    old = C.FeatureClassifier()
    atomic_torch_save(old.state_dict(), tmp_path / C.CLASSIFIER_FILE)
    (tmp_path / C.CLASSIFIER_INFO).write_text(json.dumps({"test_accuracy": 0.9, "recipe": C.RECIPE, "feature_dim": 128,
                                                          "splits_sha256": "s0"}))
    monkeypatch.setattr(C, "classifier_dir", lambda data_cfg: tmp_path)
    messages = []
    model, info = C.ensure_classifier(DataConfig(), splits, torch.device("cpu"), log=messages.append)
    assert messages == [] and info["test_accuracy"] == 0.9
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), old.state_dict().values()))


# --- sharpness per colour channel ------------------------------------------------------------------------
GREY_INPUTS = [((6, 1, 28, 28), 0), ((5, 1, 8, 8), 1), ((3, 1, 16, 24), 2), ((2, 1, 64, 64), 3)]


@pytest.mark.parametrize("shape, seed", GREY_INPUTS)
def test_grey_sharpness_is_bitwise_what_it_was(shape, seed):
    x = torch.rand(*shape, generator=_gen(seed))
    x[:, :, ::3] *= 0.2  # some structure besides noise
    assert metrics.laplacian_variance(x) == _laplacian_before(x)
    assert metrics.tenengrad(x) == _tenengrad_before(x)
    assert metrics.high_frequency_ratio(x) == _hf_before(x)
    assert metrics.high_frequency_ratio(x, cutoff=0.1) == _hf_before(x, cutoff=0.1)


def _blur(x):
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


@pytest.mark.parametrize("name", sorted(metrics.SHARPNESS_MEASURES))
def test_colour_sharpness_is_the_mean_over_channels_of_each_channels_grey_value(name):
    fn = metrics.SHARPNESS_MEASURES[name]
    grey = torch.rand(4, 1, 32, 32, generator=_gen(10))
    assert fn(grey.expand(-1, 3, -1, -1)) == pytest.approx(fn(grey), rel=1e-6)  # equal channels: the grey value
    channels = [grey, _blur(grey), _blur(_blur(_blur(grey)))]
    values = [fn(c) for c in channels]
    assert values[0] > 1.2 * values[1] > 1.2 * values[2]  # three distinct sharpnesses
    rgb = torch.cat(channels, dim=1)
    assert fn(rgb) == pytest.approx(sum(values) / 3, rel=1e-6)
    # Channel order does not matter, and the images' order within a channel is not mixed across channels.
    assert fn(rgb[:, [2, 0, 1]]) == pytest.approx(fn(rgb), rel=1e-6)
    ratio = metrics.sharpness(rgb, grey.expand(-1, 3, -1, -1))[f"{name}_ratio"]
    assert ratio == pytest.approx(sum(values) / 3 / values[0], rel=1e-5) and ratio < 1


# --- image grids in colour, any tile size ---------------------------------------------------------------
def test_grid_rows_of_a_grey_28_pixel_grid_are_what_they_were(tmp_path):
    from pipeline.report.figures import _grid_rows

    x = torch.rand(32, 1, 28, 28, generator=_gen(11))
    path = save_grid(pairs(x, 1 - x), tmp_path / "recon.png", nrow=8)
    for rows in ([0, 2], [1, 3], [0, 1]):
        now, before = _grid_rows(path, rows), _grid_rows_before(path, rows)
        assert now.ndim == 2 and np.array_equal(now, before)


@pytest.mark.parametrize("side, scale", [(32, 2), (8, 2), (64, 2), (12, 1), (10, 3)])
def test_grid_rows_of_a_colour_grid_keep_each_tiles_rgb_pixels(tmp_path, side, scale):
    from pipeline.report.figures import _grid_rows

    originals = torch.rand(32, 3, side, side, generator=_gen(12))
    originals[:, :, 0, 0] = 1.0  # a white corner next to the gutter must not confuse the geometry
    recon = torch.rand(32, 3, side, side, generator=_gen(13))
    path = save_grid(pairs(originals, recon), tmp_path / "recon.png", nrow=8, scale=scale)
    got = _grid_rows(path, [0, 2])
    pitch = side + 2
    assert got.shape == (2 * scale * pitch, scale * (8 * pitch + 2), 3)
    for row, first in enumerate([0, 8]):  # grid rows 0 and 2 hold originals 0–7 and 8–15
        for col in range(8):
            y, x0 = scale * (row * pitch + 1), scale * (2 + col * pitch)
            tile = got[y : y + scale * side : scale, x0 : x0 + scale * side : scale]
            expected = (originals[first + col].permute(1, 2, 0).numpy() * 255).round() / 255
            np.testing.assert_allclose(tile, expected, atol=1e-6)
    rec = _grid_rows(path, [1])
    tile = rec[scale : scale + scale * side : scale, 2 * scale : 2 * scale + scale * side : scale]
    np.testing.assert_allclose(tile, (recon[0].permute(1, 2, 0).numpy() * 255).round() / 255, atol=1e-6)
    assert _grid_rows(path, [8]) is None  # 8 rows: 0–7


def test_grid_rows_refuses_what_is_not_a_grid(tmp_path):
    from PIL import Image

    from pipeline.report.figures import _grid_rows

    noise = (np.random.default_rng(0).random((136, 548, 3)) * 255).astype(np.uint8)  # a 32-px grid's size
    Image.fromarray(noise).save(tmp_path / "noise.png")
    assert _grid_rows(tmp_path / "noise.png", [0]) is None
    samples = save_grid(torch.rand(16, 1, 20, 20, generator=_gen(14)), tmp_path / "samples.png", nrow=4)
    assert _grid_rows(samples, [0], ncol=4) is not None and _grid_rows(samples, [0], ncol=8) is None


@pytest.mark.parametrize("shape, scale", [((3, 12, 20), 2), ((1, 20, 12), 2), ((3, 8, 64), 1)])
def test_grid_rows_of_non_square_tiles_find_the_tile_height(tmp_path, shape, scale):
    # A source without data.image_size keeps its own H×W: its grids must not drop out of the report's panel.
    from pipeline.report.figures import _grid_rows

    c, h, w = shape
    originals = torch.rand(16, *shape, generator=_gen(15))
    originals[:, :, 0] = 1.0  # a white first row in every tile is content, not a gutter
    recon = torch.rand(16, *shape, generator=_gen(16))
    path = save_grid(pairs(originals, recon), tmp_path / "recon.png", nrow=8, scale=scale)
    got = _grid_rows(path, [0, 2])
    assert got is not None and got.shape[:2] == (2 * scale * (h + 2), scale * (8 * (w + 2) + 2))

    def tile(rows, row, col):
        y, x = scale * (row * (h + 2) + 1), scale * (2 + col * (w + 2))
        return rows[y : y + scale * h : scale, x : x + scale * w : scale]

    def expected(image):
        pixels = (image.permute(1, 2, 0).numpy() * 255).round() / 255
        return pixels if c == 3 else pixels[..., 0]

    for row, first in enumerate([0, 8]):  # grid rows 0 and 2 hold originals 0–7 and 8–15
        for col in range(8):
            np.testing.assert_allclose(tile(got, row, col), expected(originals[first + col]), atol=1e-6)
    np.testing.assert_allclose(tile(_grid_rows(path, [3]), 0, 7), expected(recon[15]), atol=1e-6)
    assert _grid_rows(path, [4]) is None  # 4 rows: 0–3
