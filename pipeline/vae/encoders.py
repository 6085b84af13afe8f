"""Encoders x → q(z|x): MLP and convolutional, for 1×28×28 images. ``ENCODERS`` maps ``model.arch``
to a constructor; each returns the posterior as a ``DiagonalGaussian``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.vae.posterior import DiagonalGaussian

IMAGE_SHAPE = (1, 28, 28)
N_PIXELS = 28 * 28


class MLPEncoder(nn.Module):
    def __init__(self, latent_dim: int, hidden_dim: int, depth: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = N_PIXELS
        for _ in range(depth):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> DiagonalGaussian:  # x (B, 1, 28, 28)
        mu, logvar = self.head(self.body(x)).chunk(2, dim=-1)
        return DiagonalGaussian(mu, logvar)


def conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.SiLU())


class ConvEncoder(nn.Module):
    """28 → 14 → 7 with strided convs, then `depth` fully connected hidden layers."""

    def __init__(self, latent_dim: int, hidden_dim: int, depth: int, channels: int):
        super().__init__()
        c = channels
        self.features = nn.Sequential(conv_block(1, c // 2, 2), conv_block(c // 2, c, 2), nn.Flatten())
        layers: list[nn.Module] = []
        width = c * 7 * 7
        for _ in range(depth):
            layers += [nn.Linear(width, hidden_dim), nn.SiLU()]
            width = hidden_dim
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> DiagonalGaussian:
        mu, logvar = self.head(self.body(self.features(x))).chunk(2, dim=-1)
        return DiagonalGaussian(mu, logvar)


ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda m: MLPEncoder(m.latent_dim, m.hidden_dim, m.encoder_depth),
    "conv": lambda m: ConvEncoder(m.latent_dim, m.hidden_dim, m.encoder_depth, m.channels),
}
