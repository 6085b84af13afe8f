"""KL closed form, free bits gradients, β schedules at chosen steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import distributions as D

from pipeline.config import ObjectiveConfig
from pipeline.objectives import FREE_BITS_MODES, beta_at
from pipeline.vae.posterior import kl_to_standard_normal as kl_per_dim


def test_kl_per_dim_matches_torch_closed_form():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    ref = D.kl_divergence(D.Normal(mu, torch.exp(0.5 * logvar)), D.Normal(0.0, 1.0))
    torch.testing.assert_close(kl_per_dim(mu, logvar), ref, atol=1e-6, rtol=1e-6)


def test_kl_per_dim_matches_monte_carlo():
    mu = torch.tensor([[0.0, 1.5, -0.7]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, -1.0, 0.8]], dtype=torch.float64)
    q = D.Normal(mu, torch.exp(0.5 * logvar))
    torch.manual_seed(1)
    z = q.sample((400_000,))  # (S, 1, 3)
    log_ratio = q.log_prob(z) - D.Normal(0.0, 1.0).log_prob(z)
    mc, se = log_ratio.mean(0), log_ratio.std(0) / math.sqrt(z.shape[0])
    exact = kl_per_dim(mu, logvar)
    assert torch.all((mc - exact).abs() < 4 * se + 1e-9), (mc, exact, se)
    assert float(exact[0, 0]) == 0.0  # the prior itself costs nothing


@pytest.mark.parametrize("mode", ["per_dim", "total"])
def test_free_bits_pass_zero_gradient_below_lambda(mode):
    mu = torch.full((16, 4), 0.05, requires_grad=True)  # KL_j = 0.00125 nats per dim, far below λ
    logvar = torch.zeros(16, 4, requires_grad=True)
    kl = kl_per_dim(mu, logvar)
    penalized = FREE_BITS_MODES[mode](kl.sum(1), kl, 0.5)
    penalized.backward()
    assert mu.grad.abs().max() == 0 and logvar.grad.abs().max() == 0
    expected = 0.5 * 4 if mode == "per_dim" else 0.5
    assert float(penalized.detach()) == pytest.approx(expected)


@pytest.mark.parametrize("mode", ["per_dim", "total"])
def test_free_bits_pass_the_full_gradient_above_lambda(mode):
    mu = torch.full((16, 4), 2.0, requires_grad=True)  # KL_j = 2 nats per dim
    logvar = torch.zeros(16, 4)
    kl = kl_per_dim(mu, logvar)
    FREE_BITS_MODES[mode](kl.sum(1), kl, 0.5).backward()
    # d/dμ of the batch-mean KL: μ / B.
    torch.testing.assert_close(mu.grad, torch.full_like(mu, 2.0 / 16))


def test_free_bits_per_dim_only_frees_the_dimensions_below_lambda():
    mu = torch.tensor([[0.1, 2.0]] * 8, requires_grad=True)
    kl = kl_per_dim(mu, torch.zeros(8, 2))
    FREE_BITS_MODES["per_dim"](kl.sum(1), kl, 0.5).backward()
    assert mu.grad[:, 0].abs().max() == 0
    assert mu.grad[:, 1].abs().min() > 0


def test_free_bits_none_is_the_plain_batch_mean_kl():
    kl = torch.rand(5, 3)
    assert float(FREE_BITS_MODES["none"](kl.sum(1), kl, 10.0)) == pytest.approx(float(kl.sum(1).mean()))


def _obj(**kw):
    return ObjectiveConfig(**{"beta": 2.0, "warmup_steps": 100, **kw})


def test_constant_schedule():
    assert [beta_at(s, 1000, _obj()) for s in (0, 50, 999)] == [2.0, 2.0, 2.0]


def test_linear_warmup_with_delay():
    o = _obj(schedule="linear", delay_steps=10)
    assert beta_at(0, 1000, o) == 0.0
    assert beta_at(9, 1000, o) == 0.0
    assert beta_at(10, 1000, o) == 0.0
    assert beta_at(60, 1000, o) == pytest.approx(1.0)
    assert beta_at(110, 1000, o) == pytest.approx(2.0)
    assert beta_at(5000, 1000, o) == pytest.approx(2.0)


def test_sigmoid_warmup_is_half_way_at_mid_warmup_and_near_ends():
    o = _obj(schedule="sigmoid")
    assert beta_at(50, 1000, o) == pytest.approx(1.0)
    assert beta_at(0, 1000, o) == pytest.approx(2.0 / (1 + math.exp(5)))
    assert beta_at(100, 1000, o) == pytest.approx(2.0 / (1 + math.exp(-5)))
    values = [beta_at(s, 1000, o) for s in range(0, 200)]
    assert all(b >= a for a, b in zip(values, values[1:]))


def test_cyclical_follows_fu_et_al():
    # 1000 steps, 4 cycles of 250 steps; ramp over the first half (125 steps) of each, then hold.
    o = _obj(schedule="cyclical", cycles=4, ramp_ratio=0.5)
    assert beta_at(0, 1000, o) == 0.0
    assert beta_at(62, 1000, o) == pytest.approx(2.0 * 62 / 125)
    assert beta_at(125, 1000, o) == pytest.approx(2.0)
    assert beta_at(249, 1000, o) == pytest.approx(2.0)
    assert beta_at(250, 1000, o) == 0.0
    assert beta_at(250 + 25, 1000, o) == pytest.approx(2.0 * 25 / 125)
    assert beta_at(999, 1000, o) == pytest.approx(2.0)
