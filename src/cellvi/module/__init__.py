"""Pure PyTorch modules: ``inference`` -> ``generative`` -> ``loss``; no AnnData here."""

from cellvi.nn import Classifier

from ._base import LossOutput
from .ldvae import LDVAE
from .scanvae import SCANVAE
from .vae import VAE
from .vaec import VAEC

__all__ = ["Classifier", "SCANVAE", "VAEC", "LDVAE", "VAE", "LossOutput"]
