"""Pure PyTorch modules: ``inference`` -> ``generative`` -> ``loss``; no AnnData here."""

from cellvi.nn import Classifier

from ._base import LossOutput
from ._config import ConfiguredModule, ModuleConfig
from .autozivae import AutoZIVAE, AutoZIVAEConfig
from .jvae import JVAE, JVAEConfig
from .ldvae import LDVAE, LDVAEConfig
from .scanvae import SCANVAE, SCANVAEConfig
from .totalvae import TOTALVAE, TOTALVAEConfig
from .vae import VAE, VAEConfig
from .vaec import VAEC, VAECConfig

__all__ = [
    "AutoZIVAE",
    "AutoZIVAEConfig",
    "Classifier",
    "ConfiguredModule",
    "JVAE",
    "JVAEConfig",
    "LDVAE",
    "LDVAEConfig",
    "LossOutput",
    "ModuleConfig",
    "SCANVAE",
    "SCANVAEConfig",
    "TOTALVAE",
    "TOTALVAEConfig",
    "VAE",
    "VAEC",
    "VAECConfig",
    "VAEConfig",
]
