"""Each likelihood against torch.distributions (where one exists) or a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from pipeline.likelihoods import LIKELIHOODS, LikelihoodOptions, _cb_log_normalizer

OPTS = LikelihoodOptions(scale=0.2, min_log_sigma=-6.0)


@pytest.fixture(autouse=True)
def float64_by_default():
    # Compare in double precision so a 1e-5 tolerance tests the formulas, not float32 rounding.
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _batch(p: int = 1, seed: int = 0, binary: bool = False):
    g = torch.Generator().manual_seed(seed)
    params = torch.randn(4, p, 1, 28, 28, generator=g) * 3
    x = torch.rand(4, 1, 28, 28, generator=g)
    if binary:
        x = (x > 0.5).double()
    return params, x


def _sum(t):
    return t.flatten(1).sum(1)


@pytest.mark.parametrize("binary", [True, False])
def test_bernoulli_matches_torch(binary):
    params, x = _batch(binary=binary)
    ours = LIKELIHOODS["bernoulli"].log_prob(params, x, OPTS).log_px
    ref = _sum(D.Bernoulli(logits=params[:, 0], validate_args=False).log_prob(x))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-7)
    torch.testing.assert_close(LIKELIHOODS["bernoulli"].mean(params, OPTS), torch.sigmoid(params[:, 0]))


def test_continuous_bernoulli_matches_torch_including_near_half():
    params, x = _batch()
    # Put some logits right at, and just around, λ = ½ where the naive normalizer is 0/0.
    params[0, 0, 0, 0, :6] = torch.tensor([0.0, 1e-7, -1e-7, 1e-3, -5e-3, 2e-2])
    ours = LIKELIHOODS["continuous_bernoulli"].log_prob(params, x, OPTS).log_px
    ref = _sum(D.ContinuousBernoulli(logits=params[:, 0]).log_prob(x))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-7)
    mean = LIKELIHOODS["continuous_bernoulli"].mean(params, OPTS)
    torch.testing.assert_close(mean, D.ContinuousBernoulli(logits=params[:, 0]).mean, atol=1e-5, rtol=1e-6)
    assert not torch.allclose(mean, torch.sigmoid(params[:, 0]), atol=1e-3), "CB mean must differ from λ"


def test_continuous_bernoulli_normalizer_is_smooth_and_finite_at_half_in_float32():
    logits = torch.linspace(-0.05, 0.05, 2001, dtype=torch.float32, requires_grad=True)
    log_c = _cb_log_normalizer(logits)
    log_c.sum().backward()
    assert torch.isfinite(log_c).all() and torch.isfinite(logits.grad).all()
    assert abs(float(log_c[1000].detach()) - math.log(2)) < 1e-6
    # Continuity across the switch between the Taylor series and the exact form.
    steps = log_c.detach().diff().abs()
    assert float(steps.max()) < 1e-6  # neighbours differ by ~4e-7: no jump at the series/exact switch


def test_gaussian_fixed_sigma_matches_torch():
    params, x = _batch()
    ours = LIKELIHOODS["gaussian"].log_prob(params, x, OPTS).log_px
    ref = _sum(D.Normal(params[:, 0], OPTS.scale).log_prob(x))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-7)


def test_sigma_vae_uses_the_optimal_shared_sigma():
    params, x = _batch()
    params = params * 0.05 + 0.5
    sigma_star = ((x - params[:, 0]) ** 2).mean().sqrt()
    # With the floor far below σ*, the soft clip is the identity to double precision.
    unclipped = LikelihoodOptions(min_log_sigma=-60.0)
    out = LIKELIHOODS["gaussian_learned"].log_prob(params, x, unclipped)
    torch.testing.assert_close(out.sigma, sigma_star, atol=1e-9, rtol=1e-9)
    ref = _sum(D.Normal(params[:, 0], sigma_star).log_prob(x))
    torch.testing.assert_close(out.log_px, ref, atol=1e-5, rtol=1e-7)
    # σ* maximizes the likelihood: any other shared σ scores lower.
    for s in (sigma_star * 0.9, sigma_star * 1.1):
        assert _sum(D.Normal(params[:, 0], s).log_prob(x)).sum() < out.log_px.sum()
    # With the default floor, log σ = floor + softplus(log σ* − floor) (Rybkin et al.'s soft clip).
    clipped = LIKELIHOODS["gaussian_learned"].log_prob(params, x, OPTS).sigma
    expected = math.exp(OPTS.min_log_sigma + math.log1p(math.exp(math.log(sigma_star) - OPTS.min_log_sigma)))
    assert float(clipped) == pytest.approx(expected, rel=1e-9)


def test_sigma_vae_scores_held_out_data_with_a_given_sigma():
    params, x = _batch()
    out = LIKELIHOODS["gaussian_learned"].log_prob(params, x, LikelihoodOptions(fixed_sigma=0.3))
    torch.testing.assert_close(out.log_px, _sum(D.Normal(params[:, 0], 0.3).log_prob(x)), atol=1e-5, rtol=1e-7)


def test_sigma_vae_soft_clip_keeps_sigma_above_the_floor():
    x = torch.rand(2, 1, 28, 28)
    params = x.unsqueeze(1).clone()  # a perfect reconstruction: σ* = 0
    out = LIKELIHOODS["gaussian_learned"].log_prob(params, x, OPTS)
    assert float(out.sigma) >= math.exp(OPTS.min_log_sigma)
    assert torch.isfinite(out.log_px).all()


def test_laplace_matches_torch():
    params, x = _batch()
    ours = LIKELIHOODS["laplace"].log_prob(params, x, OPTS).log_px
    ref = _sum(D.Laplace(params[:, 0], OPTS.scale).log_prob(x))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-7)


def _dl_reference_probs(mean, log_scale):
    """P(bin k) for all 256 bins from CDF differences, edges at ±∞: (…, 256) in float64."""
    levels = torch.linspace(-1, 1, 256)
    edges = torch.cat([torch.tensor([-math.inf]), (levels[:-1] + levels[1:]) / 2, torch.tensor([math.inf])])
    u = (edges - mean.unsqueeze(-1)) / torch.exp(log_scale).unsqueeze(-1)
    lower, upper = u[..., :-1], u[..., 1:]
    # Difference of sigmoids on the side of the mean where both are small: no cancellation.
    below = torch.sigmoid(upper) - torch.sigmoid(lower)
    above = torch.sigmoid(-lower) - torch.sigmoid(-upper)
    return torch.where(lower + upper < 0, below, above)


def test_discretized_logistic_is_a_normalized_pmf_matching_cdf_differences():
    g = torch.Generator().manual_seed(1)
    params = torch.stack([torch.rand(2, 1, 28, 28, generator=g) * 2 - 1, torch.rand(2, 1, 28, 28, generator=g) * 3 - 4], 1)
    lik = LIKELIHOODS["discretized_logistic"]
    ref = _dl_reference_probs(params[:, 0], params[:, 1])  # (2, 1, 28, 28, 256)
    torch.testing.assert_close(ref.sum(-1), torch.ones_like(ref[..., 0]))
    # Score every pixel at a few bins, including both edge bins.
    for k in (0, 1, 77, 128, 254, 255):
        x = torch.full((2, 1, 28, 28), k / 255.0)
        ours = lik.log_prob(params, x, OPTS).log_px
        expected = _sum(torch.log(ref[..., k]))
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-6)
    mean = lik.mean(params, OPTS)
    torch.testing.assert_close(mean, (ref * torch.linspace(0, 1, 256)).sum(-1), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_every_likelihood_returns_per_example_finite_values_and_gradients(name):
    lik = LIKELIHOODS[name]
    params, x = _batch(p=lik.params_per_pixel, seed=3)
    params = (params * 0.3).requires_grad_()
    out = lik.log_prob(params, x, OPTS)
    assert out.log_px.shape == (4,)
    out.log_px.sum().backward()
    assert torch.isfinite(out.log_px).all() and torch.isfinite(params.grad).all()
    assert lik.mean(params.detach(), OPTS).shape == (4, 1, 28, 28)
    assert (out.sigma is not None) == lik.fits_scale
