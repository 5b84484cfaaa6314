"""cellvi: deep generative models of single-cell omics counts."""

__version__ = "0.1.0"
