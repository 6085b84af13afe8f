"""Priors p(z): a registry from ``prior.name`` to a module that evaluates, samples and scores the KL.

Every prior has ``log_prob(z)``, ``sample(n, generator)`` and ``kl(q, z)``: the analytic KL(q ‖ p)
when one exists, else the single-sample Monte Carlo estimate log q(z|x) − log p(z) at the z the loss
already drew (unbiased; its variance is what ``val/kl_mc_sd`` reports). ``factorized`` says whether
p(z) = Π_j p(z_j), the condition for a per-dimension KL (free bits per dimension, collapsed-dimension
counts); only then does ``kl_per_dim`` exist. Learnable parameters are the VAE's: trained by the same
optimizer, saved in the same state dict. Adding a prior is one class plus one ``PRIORS`` entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.vae.posterior import LOG_2PI, DiagonalGaussian, diag_gaussian_log_prob

# Elements of the (N, K, D) tensor a mixture's log-density builds at once: 2²² floats = 16 MiB. Larger
# inputs are scored in slices, so a K-component prior never multiplies a caller's memory by K.
MIXTURE_SLICE_ELEMENTS = 1 << 22


class Prior(nn.Module):
    factorized: bool = False
    analytic_kl: bool = False
    components: int = 1

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        # Where samples are drawn; not in the state dict, so checkpoints are unchanged by it.
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:  # (..., D) → (...)
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:  # → (n, D)
        raise NotImplementedError

    def kl(self, q: DiagonalGaussian, z: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) ‖ p(z)) per example, (B,): here the one-sample estimate at z ~ q (B, D)."""
        return q.log_prob(z) - self.log_prob(z)

    def kl_per_dim(self, q: DiagonalGaussian) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} does not factorize over dimensions: it has no per-dimension KL")

    def marginal_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation of each coordinate z_j under p, (D,) each (latent traversals)."""
        raise NotImplementedError


class StandardNormal(Prior):
    """N(0, I): the VAE of Kingma & Welling 2014. Analytic KL, factorizes."""

    factorized = True
    analytic_kl = True

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (z.shape[-1] * LOG_2PI + (z * z).sum(-1))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, generator=generator, device=self._anchor.device)

    def kl(self, q: DiagonalGaussian, z: torch.Tensor) -> torch.Tensor:
        return self.kl_per_dim(q).sum(-1)

    def kl_per_dim(self, q: DiagonalGaussian) -> torch.Tensor:
        return q.kl_per_dim()

    def marginal_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = torch.zeros(self.latent_dim, device=self._anchor.device)
        return zeros, zeros + 1


def mixture_log_prob(z: torch.Tensor, log_weights: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log Σ_k w_k N(z; μ_k, diag σ_k²) for z (..., D), components (K, D), log w (K,) → (...).

    Evaluated in slices of at most MIXTURE_SLICE_ELEMENTS (N, K, D) elements (autograd flows through)."""
    flat = z.reshape(-1, z.shape[-1])  # (N, D)
    k, d = mu.shape
    rows = max(1, MIXTURE_SLICE_ELEMENTS // (k * d))
    parts = [torch.logsumexp(log_weights + diag_gaussian_log_prob(s.unsqueeze(1), mu, logvar), dim=-1)  # (n, K) → (n,)
             for s in flat.split(rows)]
    return torch.cat(parts).reshape(z.shape[:-1])


def mixture_moments(weights: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-coordinate mean and std of a diagonal Gaussian mixture: E = Σ w μ, Var = Σ w (σ² + μ²) − E²."""
    w = weights.unsqueeze(-1)  # (K, 1)
    mean = (w * mu).sum(0)
    var = (w * (torch.exp(logvar) + mu * mu)).sum(0) - mean * mean
    return mean, var.clamp(min=0).sqrt()


class MixtureOfGaussians(Prior):
    """A mixture of K diagonal Gaussians with learnable weights, means and variances.

    Initialization: equal weights, unit variances, means drawn from N(0, I), so p(z) starts as a smooth
    bump of spread ≈ √2 around 0 (close to N(0, I): the KL of an untrained encoder is moderate) with
    the symmetry between components already broken.
    """

    def __init__(self, latent_dim: int, components: int):
        super().__init__(latent_dim)
        self.components = components
        self.logits = nn.Parameter(torch.zeros(components))
        self.means = nn.Parameter(torch.randn(components, latent_dim))
        self.logvars = nn.Parameter(torch.zeros(components, latent_dim))

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return mixture_log_prob(z, torch.log_softmax(self.logits, 0), self.means, self.logvars)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.multinomial(torch.softmax(self.logits.detach(), 0), n, replacement=True, generator=generator)
        return DiagonalGaussian(self.means[idx], self.logvars[idx]).rsample(generator=generator)

    def marginal_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        return mixture_moments(torch.softmax(self.logits, 0), self.means, self.logvars)


class VampPrior(Prior):
    """VampPrior (Tomczak & Welling 2018, Eq. 9): p(z) = (1/K) Σ_k q(z | u_k) at K learnable pseudo-inputs.

    The pseudo-inputs are images, u_k = sigmoid(a_k) so they stay in [0, 1] like the data; a_k is
    initialized from K training images drawn with the run's seed (clamped to [0.01, 0.99] before the
    logit, so no pixel starts saturated), or from noise u ~ U(0.25, 0.75) (``prior.init: noise``, or
    when no images are at hand, e.g. before a checkpoint's weights are loaded). The encoder is the
    VAE's own, shared, not a copy: its gradient gets the prior's term too, as in the paper.
    """

    def __init__(self, latent_dim: int, components: int, encoder: nn.Module, image_shape: tuple[int, ...],
                 init_images: torch.Tensor | None = None):
        super().__init__(latent_dim)
        self.components = components
        if init_images is None:
            init_images = 0.25 + 0.5 * torch.rand(components, *image_shape)
        if init_images.shape != (components, *image_shape):
            raise ValueError(f"VampPrior needs {components} images of shape {image_shape}, got {tuple(init_images.shape)}")
        self.pseudo_logits = nn.Parameter(torch.logit(init_images.float().clamp(0.01, 0.99)))
        self._encoder = (encoder,)  # a tuple, so the encoder is not registered (and saved) twice

    def pseudo_inputs(self) -> torch.Tensor:  # (K, C, H, W) in [0, 1]
        return torch.sigmoid(self.pseudo_logits)

    def components_posterior(self) -> DiagonalGaussian:  # (K, D)
        return self._encoder[0](self.pseudo_inputs()).float()

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        q_k = self.components_posterior()
        uniform = torch.full((self.components,), -math.log(self.components), device=z.device)
        return mixture_log_prob(z, uniform, q_k.mu, q_k.logvar)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        q_k = self.components_posterior()
        idx = torch.randint(self.components, (n,), generator=generator, device=self._anchor.device)
        return DiagonalGaussian(q_k.mu[idx], q_k.logvar[idx]).rsample(generator=generator)

    def marginal_moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        q_k = self.components_posterior()
        weights = torch.full((self.components,), 1 / self.components, device=q_k.mu.device)
        return mixture_moments(weights, q_k.mu, q_k.logvar)


@dataclass(frozen=True)
class PriorEntry:
    build: Callable[..., Prior]  # (latent_dim, components, encoder, image_shape, init_images) → Prior
    factorized: bool  # known without building one: config validation reads it
    doc: str
    options: tuple[str, ...] = ()  # the prior.* keys it reads besides the name (the others leave the hash alone)
    needs_images: bool = False  # starts from training images (build_vae passes them)


PRIORS: dict[str, PriorEntry] = {
    "standard_normal": PriorEntry(lambda d, k, enc, shape, images: StandardNormal(d), True,
                                  "N(0, I): analytic KL, factorizes"),
    "mog": PriorEntry(lambda d, k, enc, shape, images: MixtureOfGaussians(d, k), False,
                      "mixture of prior.components diagonal Gaussians, all learnable", options=("components",)),
    "vamp": PriorEntry(lambda d, k, enc, shape, images: VampPrior(d, k, enc, shape, images), False,
                       "VampPrior: the encoder's posteriors at prior.components learnable pseudo-inputs",
                       options=("components", "init"), needs_images=True),
}
