"""Pure PyTorch modules: ``inference`` -> ``generative`` -> ``loss``; no AnnData here."""

from ._base import LossOutput
from .vae import VAE

__all__ = ["VAE", "LossOutput"]
