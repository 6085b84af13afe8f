"""A run directory's checkpoint: its name, loading it, and rebuilding the VAE it holds."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import RunConfig, build_config
from pipeline.errors import PipelineError
from pipeline.vae import VAE, build_vae

CHECKPOINT = "checkpoint.pt"


class CheckpointError(PipelineError, RuntimeError):
    """A checkpoint file that cannot be read."""


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu") -> dict:
    # weights_only=False: the checkpoint holds numpy/python RNG states; it is our own file.
    try:
        return torch.load(path, map_location=device, weights_only=False)
    except (OSError, MemoryError):
        raise  # the disk or the machine, not the file's content: the CLI names those
    except Exception as e:  # truncated zip, bad pickle, I/O error: torch says each differently
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: this checkpoint cannot be read ({reason}). Checkpoints are written atomically, so it was "
            "damaged afterwards (disk, copy, edit). Train the run again with `train --restart` (for a study, delete "
            "its trial directory and rerun the study), or restore the file from a backup"
        ) from None


def epoch_history(run_dir: str | Path) -> list[dict]:
    """The per-epoch validation rows of a run directory's checkpoint ([] when there is none)."""
    path = Path(run_dir) / CHECKPOINT
    return load_checkpoint(path)["history"] if path.exists() else []


def load_run(path: str | Path, device: torch.device | str = "cpu") -> tuple[RunConfig, VAE, dict]:
    """(config, trained VAE on `device` in eval mode, the checkpoint dict) of a checkpoint file.

    A σ-VAE scores with the σ its training learned (``sigma_star``), never one fitted to new data."""
    ck = load_checkpoint(path, "cpu")
    cfg = build_config(ck["config"])
    # Checkpoints written before the image shape was stored are all 1×28×28 named datasets.
    shape = ck.get("image_shape")
    model = build_vae(cfg, fixed_sigma=ck.get("sigma_star"), image_shape=tuple(shape) if shape else None).to(device)
    model.load_state_dict(ck["model"])
    model.eval()
    return cfg, model, ck
