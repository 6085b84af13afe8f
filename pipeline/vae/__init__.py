"""The VAE's math in one place: posterior, priors, encoders, decoders and the model that joins them."""

from pipeline.vae.model import VAE, Terms, build_vae
from pipeline.vae.posterior import DiagonalGaussian
from pipeline.vae.priors import PRIORS, Prior

__all__ = ["PRIORS", "VAE", "DiagonalGaussian", "Prior", "Terms", "build_vae"]
