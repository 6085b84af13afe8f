"""Encoders x → q(z|x) for C×H×W images: MLP and convolutional. ``ENCODERS`` maps ``model.encoder``
to a constructor taking the model config and the image shape; each returns the posterior as a
``DiagonalGaussian``.

Image shapes: every family takes C ∈ {1, 3} and sides of SIDE_RANGE pixels. The convolutional family
(encoder and decoder) halves the image with stride-2 convolutions and needs sides that halve cleanly;
``conv_halvings`` gives its schedule and ``check_image_shape`` says which shapes a model accepts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pipeline.data import SIDE_RANGE  # pixels a side, inclusive: what every model family is built for
from pipeline.errors import PipelineError
from pipeline.vae.posterior import DiagonalGaussian

# Fashion-MNIST and MNIST; models take the dataset's shape from pipeline.data.
IMAGE_SHAPE = (1, 28, 28)
CONV_MIN_SIDE = 4  # the conv family halves a side while it stays an integer of at least this many pixels
CONV_FAMILY = "conv"  # the model.encoder / model.decoder name of the convolutional family


class ImageShapeError(PipelineError, ValueError):
    """An image shape a model cannot take (a ValueError too, so config validators report it)."""


def _side_text(shape) -> str:
    return "×".join(str(int(s)) for s in shape)


def conv_halvings(height: int, width: int) -> int:
    """How many stride-2 halvings the conv family applies: how many times the smaller side can be halved
    while staying an integer ≥ CONV_MIN_SIDE (28 → 14 → 7: 2; 32 → 16 → 8 → 4: 3; 64: 4; 8: 1; 10: 1;
    an odd side: 0). A shape is usable only if this is ≥ 1 and both sides are divisible by 2^n
    (check_conv_shape)."""
    side, n = min(height, width), 0
    while side % 2 == 0 and side // 2 >= CONV_MIN_SIDE:
        side //= 2
        n += 1
    return n


def check_conv_shape(shape) -> int:
    """The conv family's number of halvings for a (C, H, W) shape, or ImageShapeError saying which sizes work."""
    height, width = int(shape[-2]), int(shape[-1])
    n = conv_halvings(height, width)
    if n >= 1 and height % 2**n == 0 and width % 2**n == 0:
        return n
    lo, hi = SIDE_RANGE
    raise ImageShapeError(
        f"the conv encoder/decoder cannot take {_side_text(shape)} images: it halves both sides n times with "
        f"stride-2 convolutions, n = how often the smaller side halves to an integer ≥ {CONV_MIN_SIDE}, and needs "
        f"n ≥ 1 and both sides divisible by 2^n (square images: any even side from {lo} to {hi}, e.g. 28 → 14 → 7, "
        f"32 → 16 → 8 → 4). Set data.image_size to a nearby even size, or use model.arch=mlp (model.encoder=mlp, "
        f"model.decoder=mlp or pixelcnn), which take any size.")


def check_image_shape(shape, encoder_name: str, decoder_name: str) -> None:
    """ImageShapeError (a PipelineError and ValueError) naming the shape and the keys to change, when
    model.encoder/model.decoder cannot take (C, H, W) images: C must be 1 or 3, sides in SIDE_RANGE for
    every family, and the conv family's halving rule (check_conv_shape) when either network is conv."""
    lo, hi = SIDE_RANGE
    if len(shape) != 3:
        raise ImageShapeError(f"images must be (C, H, W), got shape {tuple(shape)}")
    n_colors, height, width = (int(s) for s in shape)
    if n_colors not in (1, 3):
        raise ImageShapeError(f"images of shape {_side_text(shape)} have {n_colors} channels; models take 1 (grey) "
                              f"or 3 (colour): set data.channels to 1 or 3")
    if not (lo <= height <= hi and lo <= width <= hi):
        raise ImageShapeError(f"images of shape {_side_text(shape)} are outside the sizes models are built for "
                              f"({lo} to {hi} pixels a side): set data.image_size to a size in {lo}..{hi}")
    conv = [f"model.{key}={name}" for key, name in (("encoder", encoder_name), ("decoder", decoder_name))
            if name == CONV_FAMILY]
    if conv:
        try:
            check_conv_shape(shape)
        except ImageShapeError as e:
            raise ImageShapeError(f"{', '.join(conv)}: {e}") from None


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
    """n = conv_halvings(H, W) stride-2 convolutions (28 → 14 → 7), channels/2 wide then `channels`, then
    `depth` fully connected hidden layers."""

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], hidden_dim: int, depth: int,
                 channels: int):
        super().__init__()
        c = channels
        n_colors, height, width = image_shape
        n = check_conv_shape(image_shape)
        widths = [c // 2] + [c] * (n - 1)
        blocks = [conv_block(c_in, c_out, 2) for c_in, c_out in zip([n_colors, *widths[:-1]], widths)]
        self.features = nn.Sequential(*blocks, nn.Flatten())
        layers: list[nn.Module] = []
        size = widths[-1] * (height >> n) * (width >> n)  # features after flattening
        for _ in range(depth):
            layers += [nn.Linear(size, hidden_dim), nn.SiLU()]
            size = hidden_dim
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(size, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> DiagonalGaussian:
        mu, logvar = self.head(self.body(self.features(x))).chunk(2, dim=-1)
        return DiagonalGaussian(mu, logvar)


ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "mlp": lambda m, shape: MLPEncoder(m.latent_dim, shape, m.hidden_dim, m.encoder_depth),
    "conv": lambda m, shape: ConvEncoder(m.latent_dim, shape, m.hidden_dim, m.encoder_depth, m.channels),
}
