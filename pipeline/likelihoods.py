"""Decoder likelihoods p(x|z): a registry from name to log-density and render mean.

Every entry takes the decoder's raw output ``params`` of shape (B, P, C, H, W) — P parameters
per pixel and colour channel, declared by the entry — and images ``x`` in [0, 1] of shape (B, C, H, W).
It returns per-example log p(x|z) in nats summed over pixels, shape (B,), and the distribution's mean
(what a reconstruction or sample of a feed-forward decoder is drawn as). Entries an autoregressive
decoder can use also give the log-probability of each value (``pixel_log_prob``, same shape as x) and
a draw from it (``sample``), since such a decoder is sampled one pixel at a time. Adding a likelihood is
one function pair (or four) plus one ``LIKELIHOODS`` entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class LikelihoodOptions:
    scale: float = 0.1  # σ (gaussian) or b (laplace)
    min_log_sigma: float = -6.0  # σ-VAE soft clip
    # σ-VAE at evaluation: the σ learned in training, so held-out data is not scored with a σ fitted
    # to itself (which would flatter the likelihood).
    fixed_sigma: float | None = None


@dataclass(frozen=True)
class LogProb:
    log_px: torch.Tensor  # (B,) nats, summed over pixels
    sigma: torch.Tensor | None = None  # scalar, for likelihoods that fit a scale


@dataclass(frozen=True)
class Likelihood:
    params_per_pixel: int
    log_prob: Callable[[torch.Tensor, torch.Tensor, LikelihoodOptions], LogProb]
    mean: Callable[[torch.Tensor, LikelihoodOptions], torch.Tensor]
    discrete: bool  # a probability mass over 8-bit or binary values, not a density
    doc: str
    fits_scale: bool = False  # returns LogProb.sigma (logged as train/sigma)
    # Per-value log-probability (params, x, opts) → x's shape, and a draw (params, opts, generator) → values
    # in [0, 1] of x's shape: what pixel-by-pixel sampling needs. None for likelihoods it cannot use.
    pixel_log_prob: Callable[[torch.Tensor, torch.Tensor, LikelihoodOptions], torch.Tensor] | None = None
    sample: Callable[[torch.Tensor, LikelihoodOptions, torch.Generator | None], torch.Tensor] | None = None


def _sum_pixels(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).sum(1)


def _summed(pixel_log_prob: Callable) -> Callable[[torch.Tensor, torch.Tensor, LikelihoodOptions], LogProb]:
    """The per-example log p(x|z) of a likelihood given per value: the sum over pixels and channels."""
    def log_prob(params, x, opts) -> LogProb:
        return LogProb(_sum_pixels(pixel_log_prob(params, x, opts)))

    return log_prob


# --- Bernoulli -----------------------------------------------------------------------------------
def bernoulli_pixel_log_prob(params, x, opts) -> torch.Tensor:
    # x log σ(l) + (1−x) log σ(−l); for x ∈ (0, 1) this is the cross-entropy used on intensities.
    return -F.binary_cross_entropy_with_logits(params[:, 0], x, reduction="none")


bernoulli_log_prob = _summed(bernoulli_pixel_log_prob)


def bernoulli_mean(params, opts):
    return torch.sigmoid(params[:, 0])


def bernoulli_sample(params, opts, generator=None):
    return torch.bernoulli(torch.sigmoid(params[:, 0]), generator=generator)


# --- Categorical over the 256 intensity levels (van den Oord et al. 2016, PixelRNN Sec. 5.3) -----
_LEVELS = 255


def _level_index(x: torch.Tensor) -> torch.Tensor:
    return (x * _LEVELS).round().long().clamp_(0, _LEVELS)


def categorical_pixel_log_prob(params, x, opts) -> torch.Tensor:
    log_p = torch.log_softmax(params, dim=1)  # (B, 256, C, H, W)
    return log_p.gather(1, _level_index(x).unsqueeze(1)).squeeze(1)


categorical_log_prob = _summed(categorical_pixel_log_prob)


def categorical_mean(params, opts):
    levels = torch.arange(_LEVELS + 1, device=params.device, dtype=params.dtype) / _LEVELS
    return torch.einsum("bk...,k->b...", torch.softmax(params, dim=1), levels)


def categorical_sample(params, opts, generator=None):
    probs = torch.softmax(params.float(), dim=1).movedim(1, -1)  # (B, C, H, W, 256)
    draws = torch.multinomial(probs.reshape(-1, _LEVELS + 1), 1, generator=generator)
    return draws.view(probs.shape[:-1]).float() / _LEVELS


# --- Continuous Bernoulli (Loaiza-Ganem & Cunningham 2019) ---------------------------------------
# With λ = σ(l): 1 − 2λ = −tanh(l/2) and artanh(1 − 2λ) = −l/2, so the normalizer
# C(λ) = 2 artanh(1−2λ)/(1−2λ) = l / tanh(l/2), which is 2 at l = 0 and smooth through it.
_CB_TAYLOR_BELOW = 1e-2


def _cb_log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    small = logits.abs() < _CB_TAYLOR_BELOW
    safe = torch.where(small, torch.ones_like(logits), logits)
    exact = torch.log(safe / torch.tanh(safe / 2))
    l2 = logits * logits
    # log(l / tanh(l/2)) = log 2 + l²/12 − 7l⁴/1440 + O(l⁶)
    taylor = math.log(2.0) + l2 / 12 - 7 * l2 * l2 / 1440
    return torch.where(small, taylor, exact)


def continuous_bernoulli_log_prob(params, x, opts) -> LogProb:
    logits = params[:, 0]
    bern = -F.binary_cross_entropy_with_logits(logits, x, reduction="none")
    return LogProb(_sum_pixels(bern + _cb_log_normalizer(logits)))


def continuous_bernoulli_mean(params, opts):
    # E[x] = λ/(2λ−1) + 1/(2 artanh(1−2λ)) = σ(l)/tanh(l/2) − 1/l; ½ + l/12 − l³/720 near 0.
    logits = params[:, 0]
    small = logits.abs() < _CB_TAYLOR_BELOW
    safe = torch.where(small, torch.ones_like(logits), logits)
    exact = torch.sigmoid(safe) / torch.tanh(safe / 2) - 1 / safe
    taylor = 0.5 + logits / 12 - logits**3 / 720
    return torch.where(small, taylor, exact)


# --- Gaussian, fixed σ ---------------------------------------------------------------------------
def gaussian_log_prob(params, x, opts) -> LogProb:
    mu = params[:, 0]
    log_sigma = math.log(opts.scale)
    z = (x - mu) / opts.scale
    return LogProb(_sum_pixels(-0.5 * z * z - log_sigma - 0.5 * LOG_2PI))


def identity_mean(params, opts):
    return params[:, 0]


# --- σ-VAE: Gaussian with one shared, analytically optimal σ (Rybkin et al. 2021) ----------------
def _soft_clip_min(t: torch.Tensor, lo: float) -> torch.Tensor:
    return lo + F.softplus(t - lo)


def gaussian_learned_log_prob(params, x, opts) -> LogProb:
    mu = params[:, 0]
    sq = (x - mu) ** 2
    if opts.fixed_sigma is not None:
        log_sigma = torch.tensor(math.log(opts.fixed_sigma), device=x.device, dtype=sq.dtype)
    else:
        # σ*² = MSE over the batch and pixels maximises the likelihood for a shared σ (Eq. 7 of the
        # paper); it is a statistic of the batch, not a parameter, so no gradient flows through it.
        log_sigma = _soft_clip_min(0.5 * torch.log(sq.detach().mean()), opts.min_log_sigma)
    inv_var = torch.exp(-2 * log_sigma)
    return LogProb(_sum_pixels(-0.5 * sq * inv_var - log_sigma - 0.5 * LOG_2PI), torch.exp(log_sigma))


# --- Laplace, fixed b ----------------------------------------------------------------------------
def laplace_log_prob(params, x, opts) -> LogProb:
    mu = params[:, 0]
    b = opts.scale
    return LogProb(_sum_pixels(-(x - mu).abs() / b - math.log(2 * b)))


# --- Discretized logistic over 256 bins (Salimans et al. 2017, PixelCNN++ Eq. 2) -----------------
_DL_MIN_LOG_SCALE = -7.0
_HALF_BIN = 1.0 / 255.0  # half a bin on the [−1, 1] scale


def _dl_parts(params):
    mean = params[:, 0]
    log_scale = params[:, 1].clamp(min=_DL_MIN_LOG_SCALE)
    return mean, log_scale


def discretized_logistic_pixel_log_prob(params, x, opts) -> torch.Tensor:
    mean, log_scale = _dl_parts(params)
    xc = x * 2 - 1  # bins centred on k/255 ∈ [0, 1] → [−1, 1]
    inv_s = torch.exp(-log_scale)
    plus = inv_s * (xc - mean + _HALF_BIN)
    minus = inv_s * (xc - mean - _HALF_BIN)
    # log(σ(a) − σ(b)) = a + log(1 − e^(b−a)) − softplus(a) − softplus(b): exact for a > b and free of
    # the cancellation that the difference of two sigmoids suffers far out in either tail.
    log_interior = plus + torch.log(-torch.expm1(minus - plus)) - F.softplus(plus) - F.softplus(minus)
    log_lowest = plus - F.softplus(plus)  # log σ(plus): the lowest bin takes all mass below it
    log_highest = -F.softplus(minus)  # log(1 − σ(minus)): the highest takes all mass above it
    return torch.where(xc < -0.999, log_lowest, torch.where(xc > 0.999, log_highest, log_interior))


discretized_logistic_log_prob = _summed(discretized_logistic_pixel_log_prob)


def discretized_logistic_sample(params, opts, generator=None):
    """A logistic draw rounded to the nearest of the 256 levels, the end levels taking the tails: exactly
    the discretized distribution whose mass the log-probability integrates."""
    mean, log_scale = _dl_parts(params)
    u = torch.rand(mean.shape, generator=generator, device=mean.device).clamp_(1e-6, 1 - 1e-6)
    xc = mean + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))
    return _level_index(((xc + 1) / 2).clamp(0, 1)).float() / _LEVELS


def discretized_logistic_mean(params, opts, chunk: int = 64):
    """Exact mean Σ_k p(k)·k/255 over the 256 bins (the location alone ignores edge mass)."""
    mean, log_scale = _dl_parts(params)
    levels = torch.linspace(-1, 1, 256, device=params.device, dtype=mean.dtype)
    edges = torch.cat([levels[:1] - 1e9, (levels[:-1] + levels[1:]) / 2, levels[-1:] + 1e9])  # (257,)
    out = []
    for m, ls in zip(mean.split(chunk), log_scale.split(chunk)):
        cdf = torch.sigmoid((edges - m.unsqueeze(-1)) * torch.exp(-ls).unsqueeze(-1))  # (b, 1, H, W, 257)
        probs = cdf[..., 1:] - cdf[..., :-1]
        out.append((probs * (levels + 1) / 2).sum(-1))
    return torch.cat(out)


LIKELIHOODS: dict[str, Likelihood] = {
    "bernoulli": Likelihood(1, bernoulli_log_prob, bernoulli_mean, True, "Bernoulli on intensities or binarized pixels",
                            pixel_log_prob=bernoulli_pixel_log_prob, sample=bernoulli_sample),
    "categorical": Likelihood(256, categorical_log_prob, categorical_mean, True, "Categorical, 256-way softmax per pixel",
                              pixel_log_prob=categorical_pixel_log_prob, sample=categorical_sample),
    "continuous_bernoulli": Likelihood(
        1, continuous_bernoulli_log_prob, continuous_bernoulli_mean, False, "Continuous Bernoulli on [0, 1]"
    ),
    "gaussian": Likelihood(1, gaussian_log_prob, identity_mean, False, "Gaussian, fixed σ = likelihood.scale"),
    "gaussian_learned": Likelihood(
        1, gaussian_learned_log_prob, identity_mean, False, "σ-VAE: shared optimal σ, soft-clipped", fits_scale=True
    ),
    "laplace": Likelihood(1, laplace_log_prob, identity_mean, False, "Laplace, fixed b = likelihood.scale"),
    "discretized_logistic": Likelihood(
        2, discretized_logistic_log_prob, discretized_logistic_mean, True, "Discretized logistic, 256 bins",
        pixel_log_prob=discretized_logistic_pixel_log_prob, sample=discretized_logistic_sample),
}


def get_likelihood(name: str) -> Likelihood:
    try:
        return LIKELIHOODS[name]
    except KeyError:
        raise ValueError(f"unknown likelihood {name!r}; allowed: {', '.join(sorted(LIKELIHOODS))}") from None
