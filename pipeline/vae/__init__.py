"""The VAE's math in one place: posterior, priors, encoders, decoders and the model that joins them."""

from pipeline.vae.model import MC_KL_SAMPLES, VAE, Terms, build_vae
from pipeline.vae.posterior import DiagonalGaussian
from pipeline.vae.priors import PRIORS, Prior

__all__ = ["MC_KL_SAMPLES", "PRIORS", "VAE", "DiagonalGaussian", "Prior", "Terms", "build_vae"]
