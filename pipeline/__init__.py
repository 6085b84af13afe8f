"""Staged, tracked, resumable ablation studies of variational autoencoders."""

__version__ = "0.1.0"
