"""The encoder's posterior q(z|x): a diagonal Gaussian, and the one Gaussian log-density formula.

Every ε the pipeline draws for a latent code comes from ``DiagonalGaussian.rsample``, so the
reparameterization (Kingma & Welling 2014, Sec. 2.4) is written once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_2PI = math.log(2 * math.pi)


def diag_gaussian_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; μ, diag(exp(logvar))) summed over the last dimension (broadcasting)."""
    return -0.5 * (LOG_2PI * z.shape[-1] + (logvar + (z - mu) ** 2 / torch.exp(logvar)).sum(-1))


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) per element, in nats: ½(μ² + σ² − log σ² − 1).

    Kingma & Welling 2014, Appendix B.
    """
    return 0.5 * (mu * mu + torch.exp(logvar) - logvar - 1)


@dataclass(frozen=True)
class DiagonalGaussian:
    mu: torch.Tensor  # (..., D)
    logvar: torch.Tensor  # (..., D)

    def float(self) -> DiagonalGaussian:
        """The same distribution in float32 (the encoder may have run under bf16 autocast)."""
        return DiagonalGaussian(self.mu.float(), self.logvar.float())

    def rsample(self, sample_shape: tuple[int, ...] = (), generator: torch.Generator | None = None) -> torch.Tensor:
        """z = μ + σ·ε, ε ~ N(0, I), shape sample_shape + μ.shape; differentiable in μ and log σ².

        Without a generator ε comes from the global RNG (training: its state is checkpointed)."""
        if generator is None and not sample_shape:
            eps = torch.randn_like(self.mu)
        else:
            eps = torch.randn((*sample_shape, *self.mu.shape), generator=generator, device=self.mu.device,
                              dtype=self.mu.dtype)
        return self.mu + torch.exp(0.5 * self.logvar) * eps

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) summed over dimensions: z (..., B, D) → (..., B)."""
        return diag_gaussian_log_prob(z, self.mu, self.logvar)

    def kl_per_dim(self) -> torch.Tensor:
        """Analytic KL to N(0, I) per example and dimension, (B, D)."""
        return kl_to_standard_normal(self.mu, self.logvar)
