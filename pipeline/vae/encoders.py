"""Encoders x → q(z|x) for C×H×W images: MLP and convolutional. ``ENCODERS`` maps ``model.encoder``
to a constructor taking the model config and the image shape; each returns the posterior as a
``DiagonalGaussian``."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pipeline.vae.posterior import DiagonalGaussian

# Fashion-MNIST and MNIST; models take the dataset's shape from pipeline.data.DATASETS.
IMAGE_SHAPE = (1, 28, 28)


def downsampled(size: int) -> int:
    """A side after two stride-2, padding-1, 3×3 convolutions (28 → 14 → 7)."""
    return (((size + 1) // 2) + 1) // 2


class MLPEncoder(nn.Module):
    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], hidden_dim: int, depth: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(image_shape)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> DiagonalGaussian:  # x (B, C, H, W)
        mu, logvar = self.head(self.body(x)).chunk(2, dim=-1)
        return DiagonalGaussian(mu, logvar)


def conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.SiLU())


class ConvEncoder(nn.Module):
    """H → H/2 → H/4 with strided convs, then `depth` fully connected hidden layers."""

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], hidden_dim: int, depth: int,
                 channels: int):
        super().__init__()
        c = channels
        n_colors, height, width = image_shape
        self.features = nn.Sequential(conv_block(n_colors, c // 2, 2), conv_block(c // 2, c, 2), nn.Flatten())
        layers: list[nn.Module] = []
        width = c * downsampled(height) * downsampled(width)
        for _ in range(depth):
            layers += [nn.Linear(width, hidden_dim), nn.SiLU()]
            width = hidden_dim
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> DiagonalGaussian:
        mu, logvar = self.head(self.body(self.features(x))).chunk(2, dim=-1)
        return DiagonalGaussian(mu, logvar)


ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda m, shape: MLPEncoder(m.latent_dim, shape, m.hidden_dim, m.encoder_depth),
    "conv": lambda m, shape: ConvEncoder(m.latent_dim, shape, m.hidden_dim, m.encoder_depth, m.channels),
}
