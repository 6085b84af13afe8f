"""Encoder/decoder families for 28×28×1 images: MLP and convolutional.

The decoder's depth is set independently of the encoder's (``model.decoder_depth``, 1–6 hidden
layers or blocks), since decoder capacity is one of the suspects for posterior collapse. The
posterior is a diagonal Gaussian, the prior N(0, I).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

IMAGE_SHAPE = (1, 28, 28)
N_PIXELS = 28 * 28


@dataclass(frozen=True)
class Posterior:
    mu: torch.Tensor  # (B, D)
    logvar: torch.Tensor  # (B, D)

    def rsample(self) -> torch.Tensor:
        return self.mu + torch.exp(0.5 * self.logvar) * torch.randn_like(self.mu)


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

    def forward(self, x: torch.Tensor) -> Posterior:  # x (B, 1, 28, 28)
        mu, logvar = self.head(self.body(x)).chunk(2, dim=-1)
        return Posterior(mu, logvar)


class MLPDecoder(nn.Module):
    def __init__(self, latent_dim: int, hidden_dim: int, depth: int, params_per_pixel: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = latent_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        layers.append(nn.Linear(width, params_per_pixel * N_PIXELS))
        self.net = nn.Sequential(*layers)
        self.params_per_pixel = params_per_pixel

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, D) → (B, P, 1, 28, 28)
        return self.net(z).view(-1, self.params_per_pixel, *IMAGE_SHAPE)


def _conv_block(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.SiLU())


class ConvEncoder(nn.Module):
    """28 → 14 → 7 with strided convs, then `depth` fully connected hidden layers."""

    def __init__(self, latent_dim: int, hidden_dim: int, depth: int, channels: int):
        super().__init__()
        c = channels
        self.features = nn.Sequential(_conv_block(1, c // 2, 2), _conv_block(c // 2, c, 2), nn.Flatten())
        layers: list[nn.Module] = []
        width = c * 7 * 7
        for _ in range(depth):
            layers += [nn.Linear(width, hidden_dim), nn.SiLU()]
            width = hidden_dim
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> Posterior:
        mu, logvar = self.head(self.body(self.features(x))).chunk(2, dim=-1)
        return Posterior(mu, logvar)


class ConvDecoder(nn.Module):
    """z → C×7×7, then `depth` conv blocks: two of them upsample (7→14→28), the rest refine at 14×14.

    With depth 1 a single transposed conv goes 7→28 directly. A 1×1 conv head maps to the
    likelihood's parameters per pixel.
    """

    def __init__(self, latent_dim: int, depth: int, channels: int, params_per_pixel: int):
        super().__init__()
        c = channels
        self.stem = nn.Sequential(nn.Linear(latent_dim, c * 7 * 7), nn.SiLU())
        blocks: list[nn.Module] = []
        if depth == 1:
            blocks += [nn.ConvTranspose2d(c, c // 2, 4, stride=4), nn.SiLU()]
        else:
            blocks += [nn.ConvTranspose2d(c, c, 4, stride=2, padding=1), nn.SiLU()]  # 7 → 14
            blocks += [_conv_block(c, c) for _ in range(depth - 2)]
            blocks += [nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1), nn.SiLU()]  # 14 → 28
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(c // 2, params_per_pixel, 1)
        self.channels = c
        self.params_per_pixel = params_per_pixel

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, D) → (B, P, 1, 28, 28)
        h = self.stem(z).view(-1, self.channels, 7, 7)
        return self.head(self.blocks(h)).unsqueeze(2)


class VAE(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.latent_dim = latent_dim

    def forward(self, x: torch.Tensor) -> tuple[Posterior, torch.Tensor, torch.Tensor]:
        q = self.encoder(x)
        z = q.rsample()
        return q, z, self.decoder(z)

    def sample_prior(self, n: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, device=device, generator=generator)


def build_model(model_cfg, params_per_pixel: int) -> VAE:
    m = model_cfg
    if m.arch == "mlp":
        enc = MLPEncoder(m.latent_dim, m.hidden_dim, m.encoder_depth)
        dec = MLPDecoder(m.latent_dim, m.hidden_dim, m.decoder_depth, params_per_pixel)
    elif m.arch == "conv":
        enc = ConvEncoder(m.latent_dim, m.hidden_dim, m.encoder_depth, m.channels)
        dec = ConvDecoder(m.latent_dim, m.decoder_depth, m.channels, params_per_pixel)
    else:  # the config validator makes this unreachable from user input
        raise ValueError(f"unknown model.arch {m.arch!r}")
    return VAE(enc, dec, m.latent_dim)
