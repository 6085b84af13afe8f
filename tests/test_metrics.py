"""Known-answer tests for every diagnostic: a perfect and a useless representation, closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D
from torch import nn

from pipeline import metrics
from pipeline.likelihoods import LIKELIHOODS, LikelihoodOptions
from pipeline.vae import VAE, DiagonalGaussian
from pipeline.vae.priors import StandardNormal


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- collapse ------------------------------------------------------------------------------------
def test_an_encoder_that_outputs_the_prior_is_fully_collapsed():
    mu, logvar = torch.zeros(2000, 8), torch.zeros(2000, 8)
    stats = metrics.kl_dimension_stats(mu, logvar)
    assert stats["rate"] == 0.0 and stats["kl_dim_max"] == 0.0 and stats["collapsed_dims"] == 8
    assert metrics.active_units(mu)[0] == 0
    mi = metrics.mutual_information(mu, logvar, generator=_gen())
    assert abs(mi) < 1e-9  # identical posteriors: log q(z) = log q(z|x) for every sample


def test_well_separated_posteriors_use_every_unit_and_reach_the_log_b_cap():
    b, d = 500, 6
    mu = torch.randn(b, d, generator=_gen(1)) * 5  # codes far apart relative to σ = e^(−4)
    logvar = torch.full((b, d), -8.0)
    n_active, activity = metrics.active_units(mu)
    assert n_active == d and torch.all(activity > 10)
    stats = metrics.kl_dimension_stats(mu, logvar)
    assert stats["collapsed_dims"] == 0 and stats["kl_dim_max"] > 1
    mi = metrics.mutual_information(mu, logvar, generator=_gen(2))
    assert mi == pytest.approx(math.log(b), abs=1e-3)


def test_mutual_information_matches_the_exact_value_of_a_gaussian_channel():
    # x-codes μ ~ N(0, s²I), q(z|x) = N(μ, σ²I): I(x; z) = (D/2) log(1 + s²/σ²). With a large batch the
    # aggregate-posterior estimator approaches it from below (He et al.'s estimator is biased low).
    b, d, s2, sigma2 = 4000, 2, 1.0, 0.25
    mu = torch.randn(b, d, generator=_gen(3)) * math.sqrt(s2)
    logvar = torch.full((b, d), math.log(sigma2))
    exact = d / 2 * math.log(1 + s2 / sigma2)
    mi = metrics.mutual_information(mu, logvar, generator=_gen(4))
    assert exact - 0.1 < mi < exact + 0.05


def test_kl_stats_count_collapsed_dimensions():
    mu = torch.cat([torch.zeros(100, 2), torch.randn(100, 3, generator=_gen(5)) * 2], 1)
    stats = metrics.kl_dimension_stats(mu, torch.zeros(100, 5))
    assert stats["collapsed_dims"] == 2 and stats["kl_per_dim"].shape == (5,)
    assert stats["rate"] == pytest.approx(float(0.5 * (mu**2).sum(1).mean()), rel=1e-6)


# --- likelihood: a linear-Gaussian VAE (probabilistic PCA) has an exact log-likelihood -------------
class _LinearEncoder(nn.Module):
    def __init__(self, ppca):
        super().__init__()
        self.ppca = ppca

    def forward(self, x):
        # Exact posterior: precision M = WᵀW/σ² + I (diagonal here), mean M⁻¹Wᵀ(x − b)/σ².
        p = self.ppca
        m = (p.W * p.W).sum(0) / p.sigma**2 + 1
        mean = (x.flatten(1) - p.b) @ p.W / p.sigma**2 / m
        logvar = torch.log(p.var_scale / m).expand_as(mean)
        return DiagonalGaussian(mean + p.mean_shift, logvar)


class _LinearDecoder(nn.Module):
    def __init__(self, ppca):
        super().__init__()
        self.ppca = ppca

    def forward(self, z):
        return (z @ self.ppca.W.T + self.ppca.b).view(-1, 1, 1, 28, 28)


class _LinearGaussianVAE:
    """x = W z + b + ε, ε ~ N(0, σ²I), with orthogonal W so the true posterior is diagonal; `vae` is the
    pipeline's VAE with that decoder, a Gaussian likelihood and the exact (or a shifted/widened) posterior."""

    def __init__(self, latent=3, sigma=0.3, mean_shift=0.0, var_scale=1.0, seed=0):
        q, _ = torch.linalg.qr(torch.randn(784, latent, generator=_gen(seed)))
        self.W = q * torch.tensor([3.0, 2.0, 1.0][:latent])
        self.b = torch.full((784,), 0.5)
        self.sigma, self.latent = sigma, latent
        self.mean_shift, self.var_scale = mean_shift, var_scale
        self.vae = VAE(_LinearEncoder(self), _LinearDecoder(self), StandardNormal(latent), LIKELIHOODS["gaussian"],
                       LikelihoodOptions(scale=sigma))

    def exact_log_px(self, x):
        flat = x.flatten(1)
        dist = D.LowRankMultivariateNormal(self.b, self.W, torch.full((784,), self.sigma**2))
        return dist.log_prob(flat)

    def sample(self, n, seed):
        g = _gen(seed)
        z = torch.randn(n, self.latent, generator=g)
        return (z @ self.W.T + self.b + self.sigma * torch.randn(n, 784, generator=g)).view(n, 1, 28, 28)


def _iwae(model, x, k, seed):
    return metrics.iwae_log_likelihood(model.vae, x, k=k, chunk=250, generator=_gen(seed))


def test_iwae_with_the_exact_posterior_is_the_exact_log_likelihood_for_any_k():
    model = _LinearGaussianVAE()
    x = model.sample(16, seed=1)
    exact = model.exact_log_px(x)
    torch.testing.assert_close(_iwae(model, x, k=1, seed=2), exact.double(), atol=2e-2, rtol=0)


def test_iwae_converges_to_the_exact_ppca_log_likelihood_with_a_wrong_encoder():
    model = _LinearGaussianVAE(mean_shift=0.05, var_scale=3.0)
    x = model.sample(16, seed=3)
    exact = model.exact_log_px(x).double()
    elbo_gap = float((exact - _iwae(model, x, k=1, seed=4)).mean())
    iwae_gap = (exact - _iwae(model, x, k=5000, seed=5)).abs()
    assert elbo_gap > 1.0, "the encoder must be wrong enough for the test to mean something"
    assert float(iwae_gap.max()) < 0.5


def test_iwae_bound_is_at_least_the_elbo_and_grows_with_k():
    model = _LinearGaussianVAE(mean_shift=0.1, var_scale=2.0, seed=7)
    x = model.sample(32, seed=8)
    # Average over seeds: the bound is monotone in k in expectation, not per draw.
    means = [sum(float(_iwae(model, x, k, seed=s).mean()) for s in range(4)) / 4 for k in (1, 10, 100, 1000)]
    assert all(b >= a - 0.05 for a, b in zip(means, means[1:])), means
    assert means[-1] > means[0] + 0.5
    assert float(model.exact_log_px(x).mean()) >= means[-1] - 0.05  # never above log p(x) beyond noise


def test_iwae_chunks_combine_exactly_including_a_partial_last_chunk():
    # With the exact posterior every importance weight equals p(x), so any chunking must give log p(x)
    # exactly; a wrong running log-sum-exp or a miscounted last chunk would shift it by log(k'/k).
    model = _LinearGaussianVAE()
    x = model.sample(4, seed=9)
    exact = model.exact_log_px(x).double()
    for k, chunk in [(200, 7), (200, 200), (13, 5)]:
        got = metrics.iwae_log_likelihood(model.vae, x, k=k, chunk=chunk, generator=_gen(1))
        torch.testing.assert_close(got, exact, atol=2e-2, rtol=0)


def test_bits_per_dim_for_a_mass_and_for_a_dequantized_density():
    assert metrics.bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)
    # A uniform density on [0, 1) has NLL 0 and, dequantized over 256 levels, costs exactly 8 bits/dim.
    assert metrics.bits_per_dim(0.0, 784, levels=256) == pytest.approx(8.0)


def test_dequantize_stays_inside_each_8_bit_bin():
    levels = torch.arange(256, dtype=torch.float32).view(1, 1, 16, 16) / 255
    y = metrics.dequantize(levels.expand(50, -1, -1, -1), generator=_gen(0))
    assert torch.all(torch.floor(y * 256) == torch.round(levels * 255))


# --- z usage -------------------------------------------------------------------------------------
def test_z_usage_gap_is_zero_for_a_decoder_that_ignores_z_and_large_for_one_that_uses_it():
    model = _LinearGaussianVAE()
    x = model.sample(256, seed=10)
    lik, opts = LIKELIHOODS["gaussian"], LikelihoodOptions(scale=model.sigma)
    z = model.vae.posterior(x).mu
    uses_z = metrics.z_usage_gap(lambda codes: model.vae.recon_nll(x, codes), z)

    def ignores_z(codes):  # −log p(x|z) of a decoder that outputs b whatever the code
        return -lik.log_prob(model.b.expand(codes.shape[0], 784).reshape(-1, 1, 1, 28, 28), x, opts).log_px

    assert metrics.z_usage_gap(ignores_z, z) == pytest.approx(0.0, abs=1e-6)
    assert uses_z > 100


# --- sharpness -----------------------------------------------------------------------------------
def _gaussian_blur(images, sigma):
    radius = 3
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k1 = torch.exp(-(t**2) / (2 * sigma**2))
    k1 = k1 / k1.sum()
    kernel = torch.outer(k1, k1).view(1, 1, 2 * radius + 1, 2 * radius + 1)
    return torch.nn.functional.conv2d(torch.nn.functional.pad(images, [radius] * 4, mode="replicate"), kernel)


@pytest.fixture(scope="module")
def real_test_images(prepared_data_dir):
    from pipeline.data import load_splits

    return load_splits(root=prepared_data_dir).test_x[:512].float() / 255


@pytest.mark.parametrize("name", sorted(metrics.SHARPNESS_MEASURES))
def test_every_sharpness_measure_strictly_drops_under_gaussian_blur(real_test_images, name):
    fn = metrics.SHARPNESS_MEASURES[name]
    values = [fn(real_test_images)] + [fn(_gaussian_blur(real_test_images, s)) for s in (0.5, 1.0, 2.0)]
    assert all(b < a for a, b in zip(values, values[1:])), values


def test_high_frequency_ratio_ignores_brightness(real_test_images):
    dim = real_test_images * 0.5
    assert metrics.high_frequency_ratio(dim + 0.4) == pytest.approx(metrics.high_frequency_ratio(dim), rel=1e-4)


def test_sharpness_ratio_is_one_against_itself_and_below_one_when_blurred(real_test_images):
    same = metrics.sharpness(real_test_images, real_test_images)
    blurred = metrics.sharpness(_gaussian_blur(real_test_images, 1.0), real_test_images)
    for name in metrics.SHARPNESS_MEASURES:
        assert same[f"{name}_ratio"] == pytest.approx(1.0)
        assert blurred[f"{name}_ratio"] < 0.9


# --- Fréchet distance ----------------------------------------------------------------------------
def test_frechet_distance_of_one_dimensional_gaussians_is_the_closed_form():
    a = torch.randn(5000, 1, generator=_gen(20)) * 2.0 + 1.0
    b = torch.randn(7000, 1, generator=_gen(21)) * 0.5 - 3.0
    mu_a, mu_b, sd_a, sd_b = a.double().mean(), b.double().mean(), a.double().std(), b.double().std()
    expected = float((mu_a - mu_b) ** 2 + (sd_a - sd_b) ** 2)
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_zero_for_identical_sets_and_symmetric():
    a = torch.randn(3000, 16, generator=_gen(22)) @ torch.randn(16, 16, generator=_gen(23))
    b = torch.randn(3000, 16, generator=_gen(24))
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert metrics.frechet_distance(a, b) == pytest.approx(metrics.frechet_distance(b, a), rel=1e-6)
    assert metrics.frechet_distance(a, b) > 1.0
