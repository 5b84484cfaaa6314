"""Data: setting up an AnnData, readers, minibatches and the packaged datasets."""

from ._datasets import highly_variable_genes, kang_ifnb, pbmc_ifnb
from ._loader import CellData, DeviceCellData, iterate, place_data
from ._readers import read, read_mtx
from ._setup import DataSummary, get_summary, setup_anndata

__all__ = [
    "CellData",
    "DataSummary",
    "DeviceCellData",
    "get_summary",
    "highly_variable_genes",
    "iterate",
    "kang_ifnb",
    "pbmc_ifnb",
    "place_data",
    "read",
    "read_mtx",
    "setup_anndata",
]
