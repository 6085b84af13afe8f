"""The VAE: encoder, prior, decoder and likelihood in one object that owns the model's math.

Training, validation, evaluation and image grids all go through these methods: ε is drawn by the
posterior, p(z) is evaluated and sampled by the prior, and the decoder is called only here. Shapes:
x (B, C, H, W) in [0, 1], z (B, D), per-example quantities (B,) in nats.

An autoregressive decoder (PixelCNN) reads the image it scores: log p(x|z) is one teacher-forced pass
that gives every pixel's conditional at once, and images are drawn from it pixel by pixel (samples of
the likelihood, not its mean).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
from torch import nn

from pipeline.data import image_shape as data_image_shape
from pipeline.likelihoods import Likelihood, LikelihoodOptions, get_likelihood
from pipeline.vae.custom import build_decoder, build_encoder, check_custom_modules
from pipeline.vae.encoders import IMAGE_SHAPE, check_image_shape
from pipeline.vae.posterior import DiagonalGaussian
from pipeline.vae.priors import PRIORS, Prior

# Samples behind a Monte Carlo KL where a prior has no closed form (val/kl, test/kl): the estimate of a
# split's mean KL then has a fraction 1/√32 of a single sample's spread per image.
MC_KL_SAMPLES = 32


@dataclass(frozen=True)
class Terms:
    """What one batch contributes to the objective, per example (no reduction)."""

    q: DiagonalGaussian  # posterior parameters, float32, (B, D)
    z: torch.Tensor  # the sample the reconstruction was scored at, (B, D)
    recon_nll: torch.Tensor  # −log p(x|z), (B,)
    kl: torch.Tensor  # KL(q(z|x) ‖ p(z)): analytic, or the one-sample estimate at z, (B,)
    kl_per_dim: torch.Tensor | None  # (B, D) when the prior factorizes, else None
    sigma: torch.Tensor | None  # the σ a σ-VAE likelihood fitted to the batch, else None


class VAE(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: Prior, likelihood: Likelihood,
                 likelihood_opts: LikelihoodOptions = LikelihoodOptions(), image_shape: tuple[int, ...] = IMAGE_SHAPE):
        super().__init__()
        # Registration order fixes the order of parameters(): encoder, decoder, then the prior's own.
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior
        self.likelihood = likelihood
        self.likelihood_opts = likelihood_opts
        self.image_shape = tuple(image_shape)
        # bf16 autocast around the networks (train.precision=bf16); densities are always float32.
        self.compute_dtype: torch.dtype | None = None

    @property
    def latent_dim(self) -> int:
        return self.prior.latent_dim

    @property
    def data_dims(self) -> int:
        return math.prod(self.image_shape)

    @property
    def autoregressive(self) -> bool:
        """Whether the decoder reads the image it scores and is sampled one pixel at a time."""
        return getattr(self.decoder, "autoregressive", False)

    def _autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.compute_dtype) if self.compute_dtype else nullcontext()

    def _encode(self, x: torch.Tensor) -> DiagonalGaussian:
        with self._autocast(x.device):
            return self.encoder(x)

    def _decode(self, z: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """(N, D) → (N, P, *image_shape), float32. An autoregressive decoder is teacher-forced on x."""
        with self._autocast(z.device):
            return (self.decoder(z, x) if self.autoregressive else self.decoder(z)).float()

    @contextmanager
    def scoring_sigma(self, sigma: float | None):
        """Score with a fixed σ (σ-VAE: the σ training learned) instead of one fitted to the batch."""
        saved = self.likelihood_opts
        self.likelihood_opts = replace(saved, fixed_sigma=sigma)
        try:
            yield self
        finally:
            self.likelihood_opts = saved

    # --- densities -------------------------------------------------------------------------------
    def posterior(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) in float32, (B, D)."""
        return self._encode(x).float()

    def recon_nll(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """−log p(x|z) per example, (B,)."""
        return -self.likelihood.log_prob(self._decode(z, x), x, self.likelihood_opts).log_px

    def terms(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Terms:
        """One batch's reconstruction and KL terms at one reparameterized z ~ q(z|x) per image."""
        q = self._encode(x)
        z = q.rsample(generator=generator)
        lp = self.likelihood.log_prob(self._decode(z, x), x, self.likelihood_opts)
        qf = q.float()
        if self.prior.factorized:
            kl_per_dim = self.prior.kl_per_dim(qf)
            kl = kl_per_dim.sum(-1)
        else:
            kl_per_dim, kl = None, self.prior.kl(qf, z.float())
        return Terms(qf, z, -lp.log_px, kl, kl_per_dim, lp.sigma)

    def kl_estimate(self, t: Terms, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The KL of a batch's terms as validation and evaluation report it, (B,): the analytic value when
        the prior has one (and no spread), else the MC_KL_SAMPLES-draw estimate and the one-draw spread."""
        if self.prior.analytic_kl:
            return t.kl, None
        return self.kl_monte_carlo(t.q, MC_KL_SAMPLES, generator=generator)

    def kl_monte_carlo(self, q: DiagonalGaussian, n: int = MC_KL_SAMPLES,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, sd) over n draws z ~ q of log q(z|x) − log p(z), per example (B,): the n-sample KL
        estimate, and the spread of the one-sample estimate that training logs as train/kl."""
        z = q.rsample((n,), generator=generator)  # (n, B, D)
        log_ratio = q.log_prob(z) - self.prior.log_prob(z)  # (n, B)
        return log_ratio.mean(0), (log_ratio.std(0) if n > 1 else torch.zeros_like(log_ratio[0]))

    @torch.no_grad()
    def log_weights(self, x: torch.Tensor, k: int, chunk: int = 100,
                    generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """Importance log-weights log p(x|z_i) + log p(z_i) − log q(z_i|x), z_i ~ q(z|x), for i < k,
        yielded `chunk` samples at a time as (m, B) float64 (Burda et al. 2015, Eq. 8)."""
        q = self.posterior(x)
        b, d = q.mu.shape
        done = 0
        while done < k:
            m = min(chunk, k - done)
            z = q.rsample((m,), generator=generator)  # (m, B, D)
            x_rep = x.unsqueeze(0).expand(m, *x.shape).reshape(m * b, *x.shape[1:])
            log_px_z = -self.recon_nll(x_rep, z.reshape(m * b, d)).view(m, b)
            yield (log_px_z + self.prior.log_prob(z) - q.log_prob(z)).double()
            done += m

    # --- images ----------------------------------------------------------------------------------
    @torch.no_grad()
    def render(self, z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The image decoded from z, in [0, 1], (N, *image_shape): the likelihood's mean, or for an
        autoregressive decoder a draw from p(x|z), pixel by pixel."""
        if self.autoregressive:
            return self.sample_pixels(z, generator)[0]
        return self.likelihood.mean(self._decode(z), self.likelihood_opts).clamp(0, 1)

    @torch.no_grad()
    def sample_pixels(self, z: torch.Tensor, generator: torch.Generator | None = None, window: bool = True,
                      cpu_threads: int | None = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """x ~ p(x|z) from an autoregressive decoder, one pixel and colour at a time in raster order, and
        log p(x|z) summed from the conditionals each value was drawn from: (N, *image_shape), (N,).

        Pixel (r, c) depends only on rows r − reach … r and columns c − reach … c + reach (reach = the
        decoder's rows_above), so with `window` each step runs the decoder on that window instead of the
        whole image: the same conditionals (the decoder is fully convolutional and causal) at a fraction
        of the cost. `window=False` is the plain whole-image loop, kept as its reference.

        On a CPU the loop runs on `cpu_threads` threads (None: torch's setting): its thousands of small
        decoder calls gain little from a second thread and stall for seconds each when another process
        is busy (`make bench` measures both).
        """
        if z.device.type != "cpu" or cpu_threads is None:
            return self._sample_pixels(z, generator, window)
        saved = torch.get_num_threads()
        torch.set_num_threads(cpu_threads)
        try:
            return self._sample_pixels(z, generator, window)
        finally:
            torch.set_num_threads(saved)

    def _sample_pixels(self, z, generator, window):
        lik, opts = self.likelihood, self.likelihood_opts
        if lik.sample is None or lik.pixel_log_prob is None:
            raise ValueError("this likelihood cannot be sampled pixel by pixel")
        n_colors, height, width = self.image_shape
        x = torch.zeros(z.shape[0], *self.image_shape, device=z.device)
        log_px = torch.zeros(z.shape[0], device=z.device)
        reach = self.decoder.rows_above if window else max(height, width)
        for r in range(height):
            top = max(0, r - reach)
            for c in range(width):
                left = max(0, c - reach)
                crop = x[:, :, top : r + 1, left : c + reach + 1]
                for ch in range(n_colors):
                    params = self._decode(z, crop)[:, :, ch, -1, c - left, None, None, None]  # (N, P, 1, 1, 1)
                    value = lik.sample(params, opts, generator)  # (N, 1, 1, 1)
                    log_px += lik.pixel_log_prob(params, value, opts).view(-1)
                    x[:, ch, r, c] = value.view(-1)  # also writes into `crop`, a view of x
        return x, log_px

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstructions decoded from the posterior mean."""
        return self.render(self._encode(x).mu, generator)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images decoded from z ~ p(z)."""
        return self.render(self.prior.sample(n, generator=generator), generator)


def build_vae(cfg, *, init_images: torch.Tensor | None = None, fixed_sigma: float | None = None,
              image_shape: tuple[int, int, int] | None = None) -> VAE:
    """The VAE of a RunConfig. `init_images` (N, C, H, W), uint8 or in [0, 1]: training images a prior
    may start from (VampPrior pseudo-inputs); `fixed_sigma`: the σ a σ-VAE scores held-out data with;
    `image_shape` (C, H, W): the data's, when known (training passes its splits', a checkpoint its own);
    None asks the data config (pipeline.data.image_shape)."""
    m = cfg.model
    shape = tuple(image_shape) if image_shape is not None else data_image_shape(cfg.data)
    check_image_shape(shape, m.encoder_name, m.decoder_name)  # ImageShapeError naming the keys to change
    likelihood = get_likelihood(cfg.likelihood.name)
    encoder = build_encoder(m, shape)  # a family, or the user's class by import path (pipeline.vae.custom)
    decoder = build_decoder(m, shape, likelihood.params_per_pixel)
    check_custom_modules(m, encoder, decoder, shape, likelihood)  # a dummy batch through custom ones only
    entry = PRIORS[cfg.prior.name]
    images = _pick_init_images(cfg, init_images) if entry.needs_images else None
    prior = entry.build(m.latent_dim, cfg.prior.components, encoder, shape, images)
    opts = LikelihoodOptions(scale=cfg.likelihood.scale, min_log_sigma=cfg.likelihood.min_log_sigma,
                             fixed_sigma=fixed_sigma)
    return VAE(encoder, decoder, prior, likelihood, opts, shape)


def _pick_init_images(cfg, images: torch.Tensor | None) -> torch.Tensor | None:
    """prior.components training images drawn with the run's seed (its own generator: the global RNG,
    and so every other initialization, is untouched), or None for noise."""
    if images is None or cfg.prior.init != "data":
        return None
    k = cfg.prior.components
    if images.shape[0] < k:
        raise ValueError(f"prior.components={k} pseudo-inputs need at least {k} training images, "
                         f"got {images.shape[0]}; lower prior.components or use prior.init=noise")
    idx = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(cfg.train.seed))[:k]
    return images[idx].float() / 255 if images.dtype == torch.uint8 else images[idx].float()
