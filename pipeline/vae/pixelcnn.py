"""A PixelCNN decoder conditioned on z: the autoregressive decoder behind the best-known posterior collapse.

A plain stack of masked convolutions (van den Oord et al. 2016, "Pixel Recurrent Neural Networks",
Sec. 3.4 and Fig. 4) with residual connections, conditioned on z by a learned projection of z added in
every layer, as the conditional PixelCNN does with a location-independent h (van den Oord et al. 2016,
"Conditional Image Generation with PixelCNN Decoders", Eq. 4). We chose the plain stack over the gated
two-stack variant because its receptive field is the simplest to state and to vary: each layer sees
``kernel_size // 2`` more rows above and columns to the left, so the network conditions on
``depth · (kernel_size // 2)`` rows above the pixel it predicts (``rows_above``). Like every plain
masked stack it has a blind spot (part of the region up and to the right is never seen); that only
weakens the decoder, and the study varies its reach, not its exact shape.

Pixels are ordered in raster order (row by row, left to right) and, within a pixel, channel by channel
(R before G before B). Every hidden channel belongs to a colour group (channel index mod C): mask ``A``
(the first layer) lets group g see groups < g at the centre pixel, mask ``B`` (later layers) groups ≤ g,
so output (p, c) at a pixel depends only on pixels before it and channels < c of the pixel itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def causal_mask(c_out: int, c_in: int, kernel_size: int, mask_type: str, n_colors: int) -> torch.Tensor:
    """The (c_out, c_in, k, k) 0/1 mask of a masked convolution (mask_type "A" or "B")."""
    k = kernel_size
    mask = torch.zeros(c_out, c_in, k, k)
    centre = k // 2
    mask[:, :, :centre, :] = 1  # every row above
    mask[:, :, centre, :centre] = 1  # the centre row, left of the centre
    out_group = torch.arange(c_out) % n_colors
    in_group = torch.arange(c_in) % n_colors
    allowed = in_group[None, :] < out_group[:, None] if mask_type == "A" else in_group[None, :] <= out_group[:, None]
    mask[:, :, centre, centre] = allowed.float()
    return mask


class MaskedConv2d(nn.Conv2d):
    """A same-size convolution whose kernel never sees the current or later pixels (see causal_mask)."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, mask_type: str, n_colors: int):
        if mask_type not in ("A", "B") or kernel_size % 2 == 0:
            raise ValueError(f"mask_type must be 'A' or 'B' and kernel_size odd, got {mask_type!r}, {kernel_size}")
        super().__init__(c_in, c_out, kernel_size, padding=kernel_size // 2)
        self.register_buffer("mask", causal_mask(c_out, c_in, kernel_size, mask_type, n_colors), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The mask's rows below the centre are zero: convolving with the top k//2 + 1 rows of the kernel
        # over an input padded above only is the same sum at (k//2 + 1)/k of the cost.
        k = self.kernel_size[0]
        rows = k // 2 + 1
        padded = F.pad(x, (k // 2, k // 2, k // 2, 0))
        return F.conv2d(padded, (self.weight * self.mask)[:, :, :rows], self.bias)


class PixelCNNDecoder(nn.Module):
    """(z, x) → the likelihood's parameters per pixel, (B, P, C, H, W), each pixel's conditioned on z and
    the pixels before it in x (teacher forcing: one pass gives every conditional of log p(x|z)).

    Fully convolutional: a crop of rows [r − rows_above, r] of x gives row r's parameters exactly, which
    is what pixel-by-pixel sampling uses to avoid recomputing the whole image for every pixel.
    """

    autoregressive = True

    def __init__(self, latent_dim: int, image_shape: tuple[int, int, int], channels: int, depth: int,
                 kernel_size: int, params_per_pixel: int):
        super().__init__()
        n_colors = image_shape[0]
        c = max(channels - channels % n_colors, n_colors)  # whole colour groups
        self.first = MaskedConv2d(n_colors, c, kernel_size, "A", n_colors)
        self.layers = nn.ModuleList(MaskedConv2d(c, c, kernel_size, "B", n_colors) for _ in range(depth - 1))
        # One projection of z per layer, added at every position (a location-independent bias).
        self.z_proj = nn.Linear(latent_dim, c * depth)
        self.head = MaskedConv2d(c, params_per_pixel * n_colors, 1, "B", n_colors)
        self.image_shape = tuple(image_shape)
        self.params_per_pixel = params_per_pixel
        self.hidden = c
        self.rows_above = depth * (kernel_size // 2)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """z (B, D), x (B, C, H', W) in [0, 1] (H' = H, or a crop of rows) → (B, P, C, H', W)."""
        bias = self.z_proj(z).view(z.shape[0], -1, self.hidden, 1, 1).unbind(1)  # depth × (B, c, 1, 1)
        h = self.first(x * 2 - 1) + bias[0]
        for layer, b in zip(self.layers, bias[1:]):
            h = h + layer(F.relu(h)) + b
        out = self.head(F.relu(h))  # (B, P·C, H', W): channel p·C + c is parameter p of colour c
        return out.view(out.shape[0], self.params_per_pixel, self.image_shape[0], *out.shape[2:])
