"""Encoders and decoders of a user's own, loaded by import path (`model.encoder: tests.custom_nets:TinyEncoder`).

The first three follow the protocol of pipeline/vae/custom.py (TinyEncoder and TinyDecoder are the
README's worked example); the ones under "Broken on purpose" each break one rule, for the checks to name.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.vae.pixelcnn import PixelCNNDecoder


class TinyEncoder(nn.Module):
    """Two stride-2 convolutions (H → H/2 → H/4), then a linear head to (mu, logvar)."""

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], width: int = 32):
        super().__init__()
        channels, height, width_px = image_shape
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(2 * width * (height // 4) * (width_px // 4), 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B, C, H, W) → 2 × (B, D)
        mu, logvar = self.head(self.features(x)).chunk(2, dim=1)
        return mu, logvar


class TinyDecoder(nn.Module):
    """z → 2·width × H/4 × W/4, then two stride-2 transposed convolutions up to the likelihood's parameters."""

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], params_per_pixel: int, width: int = 32):
        super().__init__()
        channels, height, width_px = image_shape
        self.base = (2 * width, height // 4, width_px // 4)
        self.out_shape = (params_per_pixel, channels, height, width_px)
        self.stem = nn.Linear(latent_dim, math.prod(self.base))
        self.up = nn.Sequential(
            nn.ReLU(), nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1),
            nn.ReLU(), nn.ConvTranspose2d(width, params_per_pixel * channels, 4, stride=2, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, D) → (B, P, C, H, W)
        return self.up(self.stem(z).view(-1, *self.base)).view(-1, *self.out_shape)


class MaskedConv(nn.Conv2d):
    """A k×k convolution that sees only the rows above and the pixels to the left (grey images)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, include_centre: bool):
        super().__init__(c_in, c_out, kernel_size, padding=kernel_size // 2)
        mask = torch.zeros(kernel_size, kernel_size)
        mask[: kernel_size // 2] = 1
        mask[kernel_size // 2, : kernel_size // 2 + int(include_centre)] = 1
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.mask, self.bias, padding=self.padding)


class TinyPixelDecoder(nn.Module):
    """An autoregressive decoder for grey images: one 5×5 masked convolution, z added everywhere, a 1×1 head.
    Without `rows_above` it is sampled on the whole image at every pixel."""

    autoregressive = True

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], params_per_pixel: int, width: int = 16):
        super().__init__()
        if image_shape[0] != 1:
            raise ValueError(f"TinyPixelDecoder models grey images, got {image_shape[0]} channels")
        self.first = MaskedConv(1, width, 5, include_centre=False)
        self.z_proj = nn.Linear(latent_dim, width)
        self.head = nn.Conv2d(width, params_per_pixel, 1)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # (B, D), (B, 1, H, W) → (B, P, 1, H, W)
        h = F.relu(self.first(x * 2 - 1) + self.z_proj(z)[:, :, None, None])
        return self.head(h).unsqueeze(2)


class WindowedPixelDecoder(TinyPixelDecoder):
    """TinyPixelDecoder declaring its reach: a 5×5 mask sees 2 rows above and 2 columns either side."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows_above = 2


class PipelinePixelCNN(PixelCNNDecoder):
    """The pipeline's own PixelCNN under the custom protocol: known to be causal, in colour too."""

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], params_per_pixel: int,
                 channels: int = 12, depth: int = 2, kernel_size: int = 3):
        super().__init__(latent_dim, image_shape, channels, depth, kernel_size, params_per_pixel)


# --- Broken on purpose -----------------------------------------------------------------------------
class WrongMuEncoder(TinyEncoder):
    """mu has one latent dimension too many."""

    def forward(self, x):
        mu, logvar = super().forward(x)
        return torch.cat([mu, mu[:, :1]], dim=1), logvar


class TensorEncoder(TinyEncoder):
    """Returns the head's output as one tensor instead of (mu, logvar)."""

    def forward(self, x):
        return self.head(self.features(x))


class NaNEncoder(TinyEncoder):
    def forward(self, x):
        mu, logvar = super().forward(x)
        return mu, logvar * float("nan")


class WrongShapeDecoder(TinyDecoder):
    """Forgets the parameter axis: (B, C, H, W) instead of (B, P, C, H, W)."""

    def forward(self, z):
        return super().forward(z)[:, 0]


class RaisingDecoder(TinyDecoder):
    def forward(self, z):
        return self.up(self.stem(z))  # a (B, N) tensor into ConvTranspose2d: torch raises


class NonCausalPixelDecoder(TinyPixelDecoder):
    """An autoregressive decoder whose convolution sees the whole neighbourhood, the current pixel included."""

    def __init__(self, latent_dim, image_shape, params_per_pixel):
        super().__init__(latent_dim, image_shape, params_per_pixel)
        self.first.mask.fill_(1)


class OverclaimingPixelDecoder(TinyPixelDecoder):
    """Declares a reach of one row where its 5×5 mask sees two."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows_above = 1


class NotAModule:
    def __init__(self, latent_dim, image_shape):
        self.latent_dim = latent_dim


def not_a_class(latent_dim, image_shape):
    return TinyEncoder(latent_dim, image_shape)
