"""Decoders z → the likelihood's parameters per pixel, (B, P, 1, 28, 28): MLP and convolutional.
``DECODERS`` maps ``model.arch`` to a constructor. Depth is set independently of the encoder's
(``model.decoder_depth``, 1–6), since decoder capacity is one of the suspects for posterior collapse."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pipeline.vae.encoders import IMAGE_SHAPE, N_PIXELS, conv_block


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
            blocks += [conv_block(c, c) for _ in range(depth - 2)]
            blocks += [nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1), nn.SiLU()]  # 14 → 28
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(c // 2, params_per_pixel, 1)
        self.channels = c
        self.params_per_pixel = params_per_pixel

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, D) → (B, P, 1, 28, 28)
        h = self.stem(z).view(-1, self.channels, 7, 7)
        return self.head(self.blocks(h)).unsqueeze(2)


DECODERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda m, params_per_pixel: MLPDecoder(m.latent_dim, m.hidden_dim, m.decoder_depth, params_per_pixel),
    "conv": lambda m, params_per_pixel: ConvDecoder(m.latent_dim, m.decoder_depth, m.channels, params_per_pixel),
}
