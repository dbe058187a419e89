"""A training engine for denoising diffusion probabilistic models (Ho et al. 2020)."""

__version__ = "0.1.0"
