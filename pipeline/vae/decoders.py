"""Decoders z → the likelihood's parameters per pixel, (B, P, C, H, W): MLP, convolutional, PixelCNN.

``DECODERS`` maps ``model.decoder`` to an entry: how to build it, whether it is autoregressive (it then
also reads the image it scores, ``decoder(z, x)``, and is sampled pixel by pixel), which likelihoods it
works with and which ``model`` options it reads. Depth is set independently of the encoder's
(``model.decoder_depth``), since decoder capacity is one of the suspects for posterior collapse.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.vae.encoders import check_conv_shape, conv_block
from pipeline.vae.pixelcnn import PixelCNNDecoder


class MLPDecoder(nn.Module):
    autoregressive = False

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], hidden_dim: int, depth: int,
                 params_per_pixel: int):
        super().__init__()
        layers: list[nn.Module] = []
        width = latent_dim
        for _ in range(depth):
            layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
            width = hidden_dim
        layers.append(nn.Linear(width, params_per_pixel * math.prod(image_shape)))
        self.net = nn.Sequential(*layers)
        self.params_per_pixel = params_per_pixel
        self.image_shape = tuple(image_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, D) → (B, P, C, H, W)
        return self.net(z).view(-1, self.params_per_pixel, *self.image_shape)


class ConvDecoder(nn.Module):
    """The conv encoder mirrored, for n = conv_halvings(H, W) halvings: z → channels × H/2^n × W/2^n, then
    n transposed convolutions upsample ×2 each (`channels` wide, the last channels/2), with depth − 2
    conv blocks refining at half resolution before the last one (28×28: 7 → 14, refine, → 28). With
    depth 1 a single transposed conv upsamples ×2^n. A 1×1 conv head maps to the likelihood's parameters
    per pixel and colour channel."""

    autoregressive = False

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], depth: int, channels: int,
                 params_per_pixel: int):
        super().__init__()
        n_colors, height, width = image_shape
        n = check_conv_shape(image_shape)
        c = channels
        self.base = (height >> n, width >> n)
        self.stem = nn.Sequential(nn.Linear(latent_dim, c * self.base[0] * self.base[1]), nn.SiLU())
        blocks: list[nn.Module] = []
        if depth == 1:
            blocks += [nn.ConvTranspose2d(c, c // 2, 2**n, stride=2**n), nn.SiLU()]
        else:
            for _ in range(n - 1):
                blocks += [nn.ConvTranspose2d(c, c, 4, stride=2, padding=1), nn.SiLU()]  # ×2, up to H/2
            blocks += [conv_block(c, c) for _ in range(depth - 2)]
            blocks += [nn.ConvTranspose2d(c, c // 2, 4, stride=2, padding=1), nn.SiLU()]  # H/2 → H
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(c // 2, params_per_pixel * n_colors, 1)
        self.channels = c
        self.params_per_pixel = params_per_pixel
        self.image_shape = tuple(image_shape)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, D) → (B, P, C, H, W)
        h = self.stem(z).view(-1, self.channels, *self.base)
        out = self.head(self.blocks(h))
        return out.view(out.shape[0], self.params_per_pixel, *self.image_shape)


@dataclass(frozen=True)
class DecoderEntry:
    build: Callable[..., nn.Module]  # (model config, image shape (C, H, W), params per pixel) → decoder
    autoregressive: bool
    doc: str
    # Likelihoods it can be trained with; None = any. An autoregressive decoder needs one it can sample
    # pixel by pixel from a discrete distribution of the data's values.
    likelihoods: frozenset[str] | None = None
    options: tuple[str, ...] = ()  # `model.*` keys only this decoder reads


DECODERS: dict[str, DecoderEntry] = {
    "mlp": DecoderEntry(
        lambda m, shape, p: MLPDecoder(m.latent_dim, shape, m.hidden_dim, m.decoder_depth, p), False,
        "fully connected, model.decoder_depth hidden layers of model.hidden_dim"),
    "conv": DecoderEntry(
        lambda m, shape, p: ConvDecoder(m.latent_dim, shape, m.decoder_depth, m.channels, p), False,
        "transposed convolutions from H/2^n × W/2^n (see pipeline.vae.encoders.conv_halvings), model.channels wide"),
    "pixelcnn": DecoderEntry(
        lambda m, shape, p: PixelCNNDecoder(m.latent_dim, shape, m.channels, m.decoder_depth, m.kernel_size, p),
        True,
        "autoregressive masked convolutions conditioned on z: model.decoder_depth layers of model.kernel_size",
        frozenset({"bernoulli", "categorical", "discretized_logistic"}), ("kernel_size",)),
}
