"""Image grids as PNG files (PIL only; no plotting library on the training path)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """(N, C, H, W) in [0, 1], C = 1 or 3 → (rows·(H+pad)+pad, cols·(W+pad)+pad[, 3]) uint8, white gutters."""
    images = images.detach().float().clamp(0, 1).cpu()
    n, c, h, w = images.shape
    cols = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    colour = (3,) if c == 3 else ()
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, *colour), 255, dtype=np.uint8)
    channels_last = images.permute(0, 2, 3, 1) if colour else images[:, 0]
    pixels = (channels_last.numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = pixels[i]
    return canvas


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, scale: int = 2) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(grid(images, nrow))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return path


def pairs(originals: torch.Tensor, reconstructions: torch.Tensor, per_row: int = 8) -> torch.Tensor:
    """Interleave rows: originals, then their reconstructions beneath, `per_row` per row."""
    n = (originals.shape[0] // per_row) * per_row
    o = originals[:n].reshape(-1, per_row, *originals.shape[1:])
    r = reconstructions[:n].reshape(-1, per_row, *reconstructions.shape[1:])
    return torch.stack([o, r], 1).reshape(-1, *originals.shape[1:])
