"""Training-time augmentation: batched tensor ops on the device, one registry entry per transform.

A run's `data.augment` names one transform or several joined by `+` (a list in YAML), e.g.
`shift+noise`; `none` is the default. Whatever order they are written in, they are applied in the
registry's order, geometric first, then intensity (so `noise+shift` and `shift+noise` are one config):

    shift      translate each image by up to `data.max_shift` pixels in each direction, zero fill
    hflip      mirror each image left-right with probability ½
    intensity  x ↦ a·x + b per image, a ~ U[1 − s, 1 + s] (s = `data.intensity_scale`),
               b ~ U[−o, o] (o = `data.intensity_offset`), clipped to [0, 1]
    noise      x ↦ x + σ·ε per pixel, σ = `data.noise_std`, clipped to [0, 1]

Where it sits (pipeline.data.DeviceData.batch): stored uint8 images (statically binarized, if
`data.binarize: static`) → [0, 1] → augmentation → back onto the 8-bit grid when an intensity
transform moved a value off it → dynamic binarization (`data.binarize: dynamic`). So a dynamically
binarized run draws its bits from the augmented intensities and stays binary, a run with a discrete
likelihood still sees 8-bit values, and static binarization (whose bits are fixed when the data is
loaded) accepts only the geometric transforms, which keep pixels binary; config validation refuses the
others with it.

Only training batches are augmented. Draws come from the generator passed in, or the global RNG of
the images' device when there is none (training): the checkpoint carries that RNG, so a resumed run
draws the same augmentations as an uninterrupted one. Evaluation scores clean test images as always,
and for an augmented run also one fixed augmented copy of them (`test_aug/`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def shift(x: torch.Tensor, cfg, generator: torch.Generator | None) -> torch.Tensor:
    """Random translation by (dy, dx) ∈ {−s, …, s}², zero fill: the background of the shipped data is 0."""
    s = cfg.max_shift
    b, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (s, s, s, s))
    offsets = torch.randint(0, 2 * s + 1, (2, b), generator=generator, device=x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H) rows of the padded image
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indexing on dims 0, 2, 3 around the channel slice puts the indexed dims first: (B, H, W, C).
    return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def hflip(x: torch.Tensor, cfg, generator: torch.Generator | None) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def intensity(x: torch.Tensor, cfg, generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(2, x.shape[0], 1, 1, 1, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1  # U[−1, 1]
    scale = 1 + cfg.intensity_scale * u[0]
    offset = cfg.intensity_offset * u[1]
    return (x * scale + offset).clamp_(0, 1)


def noise(x: torch.Tensor, cfg, generator: torch.Generator | None) -> torch.Tensor:
    eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + cfg.noise_std * eps).clamp_(0, 1)


@dataclass(frozen=True)
class Augmentation:
    apply: Callable[[torch.Tensor, object, torch.Generator | None], torch.Tensor]
    # Changes pixel values (not only where they are): needs re-quantizing, and cannot follow a static
    # binarization.
    changes_values: bool
    options: tuple[str, ...]  # the data.* keys it reads
    doc: str


# In the order they are applied.
AUGMENTATIONS: dict[str, Augmentation] = {
    "shift": Augmentation(shift, False, ("max_shift",), "random translation by up to data.max_shift pixels"),
    "hflip": Augmentation(hflip, False, (), "left-right mirror with probability 1/2"),
    "intensity": Augmentation(intensity, True, ("intensity_scale", "intensity_offset"),
                              "random contrast a·x + b per image"),
    "noise": Augmentation(noise, True, ("noise_std",), "additive Gaussian noise, σ = data.noise_std"),
}
NONE = "none"


def parse(value) -> tuple[str, ...]:
    """`none`, a name, `a+b` or a list of names → the names in application order (ValueError on an unknown
    or repeated name, or `none` mixed with others)."""
    if value is None:  # `augment:` left empty in YAML
        return ()
    if isinstance(value, list | tuple):
        parts = [str(v).strip() for v in value]
    else:
        parts = [p.strip() for p in str(value).split("+")]
    if parts in ([NONE], []):
        return ()
    unknown = [p for p in parts if p not in AUGMENTATIONS]
    if unknown:
        hint = " (`none` cannot be combined)" if NONE in unknown else ""
        raise ValueError(f"data.augment: {', '.join(map(repr, unknown))} is not one of: "
                         f"{', '.join([NONE, *AUGMENTATIONS])}{hint}")
    if len(set(parts)) != len(parts):
        raise ValueError(f"data.augment={value!r} names a transform twice")
    return tuple(name for name in AUGMENTATIONS if name in parts)


def canonical(value) -> str:
    """The one spelling of an augmentation list that configs store and hash: `none` or `a+b` in order."""
    return "+".join(parse(value)) or NONE


def options_read(value) -> set[str]:
    return {o for name in parse(value) for o in AUGMENTATIONS[name].options}


def augmenter(data_cfg) -> Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None:
    """The run's augmentation as one function of (batch in [0, 1], generator), or None for `none`."""
    names = parse(data_cfg.augment)
    if not names:
        return None
    quantize = any(AUGMENTATIONS[n].changes_values for n in names)

    def apply(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for name in names:
            x = AUGMENTATIONS[name].apply(x, data_cfg, generator)
        # Back onto the 8-bit grid the data lives on: a discrete likelihood scores 256 values, and an
        # augmented image is then an image the data could have held.
        return x.mul_(255).round_().div_(255) if quantize else x

    return apply
