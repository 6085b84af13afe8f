"""The PixelCNN decoder against known answers: causal masks, teacher forcing equal to the sampling
conditionals, samples drawn from a decoder whose conditionals are set by hand, IWAE ≥ ELBO, exact
resume, an evaluation end to end, and the combinations config validation rejects."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from pipeline import metrics
from pipeline.config import ConfigError, build_config
from pipeline.vae import build_vae
from pipeline.vae.pixelcnn import PixelCNNDecoder

from .test_train import QUIET, _cfg, straight_and_resumed_weights

PIXELCNN = ["model.decoder=pixelcnn", "model.channels=6", "model.decoder_depth=2", "model.kernel_size=3",
            "model.latent_dim=4", "model.hidden_dim=32"]
LIKELIHOOD_SETTINGS = {
    "bernoulli": ["likelihood.name=bernoulli", "data.binarize=static"],
    "categorical": ["likelihood.name=categorical"],
    "discretized_logistic": ["likelihood.name=discretized_logistic"],
}


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _model(likelihood="bernoulli", *extra):
    torch.manual_seed(0)
    return build_vae(build_config(overrides=[*PIXELCNN, *LIKELIHOOD_SETTINGS[likelihood], *extra])).eval()


def _images(likelihood, n=3, seed=1):
    x = torch.rand(n, 1, 28, 28, generator=_gen(seed))
    return (x > 0.5).float() if likelihood == "bernoulli" else (x * 255).round() / 255


@pytest.mark.parametrize("n_colors", [1, 3])
@pytest.mark.parametrize("kernel_size", [3, 5, 7])
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_each_output_sees_only_earlier_pixels_and_earlier_colours(depth, kernel_size, n_colors):
    _assert_causal(depth, kernel_size, n_colors, size=10, positions=[(0, 0), (3, 4), (9, 9), (5, 0), (0, 9)])


@pytest.mark.parametrize("size, depth, kernel_size", [(8, 2, 5), (32, 3, 3)])
def test_a_colour_decoder_at_8_and_32_pixels_sees_only_earlier_pixels_and_colours(size, depth, kernel_size):
    last = size - 1
    _assert_causal(depth, kernel_size, 3, size, [(0, 0), (size // 2, size // 2 - 1), (last, last), (last, 0), (0, last)],
                   n_images=16)


def _assert_causal(depth, kernel_size, n_colors, size, positions, n_images=32):
    torch.manual_seed(depth * 10 + kernel_size)
    dec = PixelCNNDecoder(3, (n_colors, size, size), channels=12, depth=depth, kernel_size=kernel_size,
                          params_per_pixel=2).double()
    z = torch.randn(n_images, 3, dtype=torch.float64)
    order = torch.arange(size * size).view(size, size)  # raster position of each pixel
    for r, c in positions:
        for colour in range(n_colors):
            # Several images and codes, so that a path a ReLU closes for one is open for another.
            x = torch.rand(n_images, n_colors, size, size, dtype=torch.float64, requires_grad=True)
            dec(z, x)[:, :, colour, r, c].sum().backward()
            seen = (x.grad != 0).any(0)  # (C, H, W)
            later = (order > order[r, c]).expand(n_colors, size, size).clone()
            later[colour:, r, c] = True  # the pixel itself: only the colours before this one
            assert not seen[later].any(), f"output ({colour}, {r}, {c}) depends on a later value"
            # Nor on rows further up than the receptive field.
            assert not seen[:, : max(0, r - dec.rows_above)].any()
            # And it does see what it should: the pixel to its left, the earlier colours, the top of its reach.
            if c > 0:
                assert seen[:, r, c - 1].all()
            assert seen[:colour, r, c].all()
            if r - dec.rows_above >= 0:
                assert seen[:, r - dec.rows_above, c].any()


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOOD_SETTINGS))
def test_teacher_forced_log_likelihood_is_the_sum_of_the_conditionals_sampling_draws_from(likelihood):
    model = _model(likelihood)
    z = torch.randn(3, 4, generator=_gen(2))
    x, log_px_sampled = model.sample_pixels(z, _gen(3))
    assert set(torch.unique(x * 255).round().tolist()) <= set(range(256))
    torch.testing.assert_close(-model.recon_nll(x, z), log_px_sampled, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOOD_SETTINGS))
def test_the_windowed_sampler_draws_exactly_what_the_whole_image_loop_draws(likelihood):
    model = _model(likelihood, "model.decoder_depth=1")
    z = torch.randn(2, 4, generator=_gen(4))
    windowed, log_w = model.sample_pixels(z, _gen(5))
    whole, log_a = model.sample_pixels(z, _gen(5), window=False)
    assert torch.equal(windowed, whole)
    torch.testing.assert_close(log_w, log_a, rtol=1e-6, atol=1e-4)


def test_samples_follow_the_conditionals_of_a_decoder_set_by_hand():
    """One masked 3×3 layer that sees only the left neighbour: logit = relu(2(2·left − 1) + z₀) − 1, so
    rows are Markov chains with P(1 | left 1) = σ(1), P(1 | left 0) = σ(−1) at z₀ = 0 (the first column
    sees zero padding: σ(−1)), and nearly always 1 at z₀ = 10."""
    model = _model("bernoulli", "model.decoder_depth=1", "model.channels=4")
    dec = model.decoder
    with torch.no_grad():
        for p in dec.parameters():
            p.zero_()
        dec.first.weight[0, 0, 1, 0] = 2.0  # centre row, left column
        dec.z_proj.weight[0, 0] = 1.0
        dec.head.weight.fill_(1.0)
        dec.head.bias.fill_(-1.0)
    z = torch.zeros(200, 4)
    z[100:, 0] = 10.0
    x, _ = model.sample_pixels(z, _gen(6))
    chain = x[:100, 0]
    left, here = chain[:, :, :-1].flatten(), chain[:, :, 1:].flatten()
    for left_value, p in [(1.0, torch.sigmoid(torch.tensor(1.0))), (0.0, torch.sigmoid(torch.tensor(-1.0)))]:
        draws = here[left == left_value]
        se = math.sqrt(p * (1 - p) / draws.numel())
        assert abs(draws.mean() - p) < 5 * se, (left_value, draws.mean(), p)
    first_column = chain[:, :, 0].flatten()
    assert abs(first_column.mean() - torch.sigmoid(torch.tensor(-1.0))) < 5 * math.sqrt(0.2 / first_column.numel())
    assert x[100:].mean() > 0.99  # z moves every conditional


def test_iwae_bound_is_above_the_elbo_with_a_pixelcnn_decoder():
    model = _model("bernoulli")
    x = _images("bernoulli", n=4)
    gen = _gen(7)
    elbo = torch.stack([-(t.recon_nll + t.kl) for t in (model.terms(x, generator=gen) for _ in range(200))]).mean(0)
    iwae = metrics.iwae_log_likelihood(model, x, k=200, chunk=50, generator=gen)
    assert (iwae > elbo.double()).all(), (iwae, elbo)
    # One importance sample is the ELBO's own estimator: same draws, same value.
    lw = next(model.log_weights(x, k=1, generator=_gen(8)))[0]
    q = model.posterior(x)
    z = q.rsample((1,), generator=_gen(8))[0]
    by_hand = -model.recon_nll(x, z) + model.prior.log_prob(z) - q.log_prob(z)
    torch.testing.assert_close(lw.float(), by_hand, rtol=1e-5, atol=1e-3)


def test_resume_with_a_pixelcnn_decoder_is_bitwise_exact(home, monkeypatch):
    cfg = _cfg(*PIXELCNN, "data.binarize=dynamic", "tracking.enabled=false", "train.grid_images_autoregressive=2")
    a, b = straight_and_resumed_weights(home, monkeypatch, cfg)
    assert any(k.startswith("decoder.layers.") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOOD_SETTINGS))
def test_a_pixelcnn_run_trains_and_evaluates_with_pixel_by_pixel_images(home, likelihood):
    from pipeline.stages import train_stage

    cfg = build_config(overrides=[
        *PIXELCNN, *LIKELIHOOD_SETTINGS[likelihood], "data.train_subset=128", "train.batch_size=64", "train.epochs=1",
        "tracking.enabled=false", "train.grid_images_autoregressive=2", "eval.test_subset=64", "eval.iwae_k=3",
        "eval.n_samples=6", "eval.mi_batch=64",
    ])
    result = train_stage(cfg, **QUIET)
    assert result.status == "finished"
    run_dir = Path(result.run_dir)
    evaluated = json.loads((run_dir / "metrics.json").read_text())
    m, params = evaluated["metrics"], evaluated["params"]
    assert all(math.isfinite(v) for v in m.values()), m
    assert m["test/iwae_nll"] <= -m["test/elbo"] + 1e-3  # k = 3 importance samples bound at least as tight
    assert params["pixel_by_pixel"] == 1 and params["recon_images"] == 6 and params["n_samples"] == 6
    assert {p.name for p in (run_dir / "images").iterdir()} == {"epoch_001_reconstructions.png", "epoch_001_samples.png"}
    assert (run_dir / "eval" / "latent_traversals.png").is_file()


def test_evaluation_defaults_keep_a_pixelcnn_evaluation_small_on_cpu():
    from pipeline.evaluate import default_iwae_k, default_n_samples

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (default_iwae_k(cpu), default_n_samples(cpu)) == (100, 10_000)  # feed-forward: unchanged
    assert (default_iwae_k(cpu, True), default_n_samples(cpu, True)) == (10, 256)
    assert (default_iwae_k(cuda, True), default_n_samples(cuda, True)) == (100, 10_000)
    # Pixel by pixel on a CPU, other sizes get as many drawn values in all (bounded to 64 … 10,000).
    assert [default_n_samples(cpu, True, c * s * s) for c, s in ((1, 28), (3, 64), (3, 32), (1, 8), (1, 4))] \
        == [256, 64, 65, 3136, 10_000]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.decoder=pixelcnn", "likelihood.name=gaussian"],
         ["model.decoder='pixelcnn'", "bernoulli, categorical, discretized_logistic", "'gaussian'"]),
        (["model.decoder=pixelcnn", "likelihood.name=continuous_bernoulli"], ["continuous_bernoulli"]),
        (["model.decoder=pixelcnn"], ["data.binarize=static", "likelihood.name=categorical"]),
        (["model.decoder=pixelcnn", "data.binarize=static", "model.kernel_size=4"], ["model.kernel_size=4", "odd"]),
        (["model.decoder=lstm"], ["model.decoder='lstm'", "conv", "mlp", "pixelcnn"]),
        (["model.encoder=pixelcnn"], ["model.encoder='pixelcnn'", "conv", "mlp"]),
        (["model.decoder=pixelcnn", "data.binarize=static", "model.decoder_depth=13"], ["model.decoder_depth"]),
    ],
)
def test_combinations_that_cannot_work_are_rejected_naming_the_allowed_ones(overrides, expected):
    with pytest.raises(ConfigError) as e:
        build_config(overrides=overrides)
    assert all(s in str(e.value) for s in expected), str(e.value)
    assert "Traceback" not in str(e.value) and "(got {" not in str(e.value)
