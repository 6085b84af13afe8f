"""Priors against known answers: torch.distributions log-densities, an unbiased Monte Carlo KL, IWAE
bounds per prior, and exact resume with a learnable prior."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from pipeline import metrics
from pipeline.config import ConfigError, build_config
from pipeline.vae import PRIORS, DiagonalGaussian, build_vae
from pipeline.vae import priors as P

from .test_train import QUIET, _cfg, straight_and_resumed_weights


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _vae(prior, latent=4, **extra):
    cfg = build_config(overrides=[f"prior.name={prior}", "model.hidden_dim=32", f"model.latent_dim={latent}",
                                  "prior.components=5", "objective.free_bits=total", *extra])
    torch.manual_seed(0)
    images = torch.rand(50, 1, 28, 28, generator=_gen(1))
    return build_vae(cfg, init_images=images)


def test_mixture_of_gaussians_log_prob_is_torch_s_mixture_same_family():
    prior = P.MixtureOfGaussians(latent_dim=3, components=4)
    with torch.no_grad():  # give every parameter a non-trivial value
        prior.logits.copy_(torch.tensor([0.3, -1.0, 2.0, 0.0]))
        prior.logvars.copy_(torch.randn(4, 3, generator=_gen(2)) * 0.5)
    reference = D.MixtureSameFamily(D.Categorical(logits=prior.logits),
                                    D.Independent(D.Normal(prior.means, torch.exp(0.5 * prior.logvars)), 1))
    z = torch.randn(7, 5, 3, generator=_gen(3)) * 2
    torch.testing.assert_close(prior.log_prob(z), reference.log_prob(z), atol=1e-5, rtol=1e-5)


def test_vamp_prior_is_the_uniform_mixture_of_the_encoder_s_posteriors_at_the_pseudo_inputs():
    model = _vae("vamp")
    prior = model.prior
    q_k = model.encoder(prior.pseudo_inputs())  # the VAE's own encoder at the K pseudo-inputs
    reference = D.MixtureSameFamily(D.Categorical(logits=torch.zeros(5)),
                                    D.Independent(D.Normal(q_k.mu, torch.exp(0.5 * q_k.logvar)), 1))
    z = torch.randn(6, 4, generator=_gen(4))
    torch.testing.assert_close(prior.log_prob(z), reference.log_prob(z), atol=1e-5, rtol=1e-5)
    # Pseudo-inputs start from training images: each is one of them (clamped away from 0 and 1).
    images = torch.rand(50, 1, 28, 28, generator=_gen(1)).clamp(0.01, 0.99)
    first = prior.pseudo_inputs()[0]
    assert any(torch.allclose(first, img, atol=1e-5) for img in images)


def test_mixture_log_prob_in_slices_equals_one_pass_gradients_included(monkeypatch):
    prior = P.MixtureOfGaussians(latent_dim=3, components=4)
    z = torch.randn(50, 3, generator=_gen(5), requires_grad=True)
    whole = prior.log_prob(z)
    (grad_whole,) = torch.autograd.grad(whole.sum(), z)
    monkeypatch.setattr(P, "MIXTURE_SLICE_ELEMENTS", 4 * 3 * 7)  # 7 rows per slice: 8 slices, the last partial
    sliced = prior.log_prob(z)
    (grad_sliced,) = torch.autograd.grad(sliced.sum(), z)
    torch.testing.assert_close(sliced, whole)
    torch.testing.assert_close(grad_sliced, grad_whole)


def test_the_monte_carlo_kl_is_unbiased_for_the_standard_normal():
    q = DiagonalGaussian(torch.tensor([[0.0, 1.5, -0.7]], dtype=torch.float64),
                         torch.tensor([[0.0, -1.0, 0.8]], dtype=torch.float64))
    prior = P.StandardNormal(3)
    z = q.rsample((200_000,), generator=_gen(6))  # (S, 1, 3)
    one_sample = P.Prior.kl(prior, q, z)  # the generic estimator log q(z|x) − log p(z), not the closed form
    mean, se = float(one_sample.mean()), float(one_sample.std()) / math.sqrt(z.shape[0])
    exact = float(prior.kl(q, z[0]))
    assert exact == pytest.approx(float(q.kl_per_dim().sum()))
    assert abs(mean - exact) < 4 * se, (mean, exact, se)


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_samples_follow_the_prior_s_marginal_moments(name):
    model = _vae(name)
    with torch.no_grad():
        z = model.prior.sample(20_000, generator=_gen(7))
        mean, std = model.prior.marginal_moments()
    assert z.shape == (20_000, 4)
    torch.testing.assert_close(z.mean(0), mean, atol=4 * float(std.max()) / math.sqrt(20_000), rtol=0)
    torch.testing.assert_close(z.std(0), std, atol=0.03 * float(std.max()), rtol=0)


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_iwae_uses_the_prior_is_at_least_the_elbo_and_grows_with_k(name):
    model = _vae(name, latent=4).eval()
    x = torch.bernoulli(torch.rand(16, 1, 28, 28, generator=_gen(8)) * 0.6, generator=_gen(9))
    # k = 1 is the single-sample ELBO at the same z: log p(x|z) + log p(z) − log q(z|x) = −(recon + MC KL).
    iwae_1 = metrics.iwae_log_likelihood(model, x, k=1, generator=_gen(10))
    with torch.no_grad():
        t = model.terms(x, generator=_gen(10))
        elbo = -(t.recon_nll + P.Prior.kl(model.prior, t.q, t.z))
    torch.testing.assert_close(iwae_1, elbo.double(), atol=1e-3, rtol=0)
    # The bound tightens with k in expectation: average over seeds (untrained nets: a poor posterior).
    means = [sum(float(metrics.iwae_log_likelihood(model, x, k=k, chunk=7, generator=_gen(s)).mean())
                 for s in range(4)) / 4 for k in (1, 10, 100)]
    assert means[0] < means[1] < means[2], means


def test_free_bits_per_dim_with_a_mixture_prior_is_refused_with_the_reason_and_the_fix():
    for prior in ("mog", "vamp"):
        with pytest.raises(ConfigError, match="does not") as err:
            build_config(overrides=[f"prior.name={prior}", "objective.free_bits=per_dim"])
        assert "objective.free_bits=total" in str(err.value)
    build_config(overrides=["prior.name=mog", "objective.free_bits=total"])  # the fix it names is accepted


def test_vamp_from_data_needs_as_many_training_images_as_pseudo_inputs():
    with pytest.raises(ConfigError, match="prior.init=noise"):
        build_config(overrides=["prior.name=vamp", "prior.components=600", "data.train_subset=500"])
    build_config(overrides=["prior.name=vamp", "prior.components=600", "data.train_subset=500", "prior.init=noise"])


@pytest.mark.parametrize("name", ["mog", "vamp"])
def test_resume_with_a_learnable_prior_is_bitwise_exact(home, monkeypatch, name):
    cfg = _cfg(f"prior.name={name}", "prior.components=4", "tracking.enabled=false")
    a, b = straight_and_resumed_weights(home, monkeypatch, cfg)
    prior_keys = [k for k in a if k.startswith("prior.")]
    assert prior_keys, "the prior's parameters are in the checkpoint"
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The prior is trained with the model: every one of its parameters moved from where fit() started it.
    from pipeline.data import ensure_splits
    from pipeline.runtime import seed_all

    seed_all(cfg.train.seed)
    init = build_vae(cfg, init_images=ensure_splits(cfg.data, log=QUIET["log"]).train_x[:512]).state_dict()
    assert all(a[k].shape == init[k].shape and not torch.equal(a[k], init[k]) for k in prior_keys)
