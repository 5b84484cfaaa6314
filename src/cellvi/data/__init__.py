"""Data: fields and set-up, sources of minibatches, readers and the packaged datasets."""

from . import fields
from ._backed import read_backed
from ._compat import (
    poisson_gene_selection,
    read_10x_h5,
    read_10x_mtx,
    read_csv,
    read_h5ad,
    read_loom,
    synthetic_iid,
)
from ._datasets import highly_variable_genes, kang_ifnb, pbmc_ifnb
from ._loader import CellData, DeviceCellData, Loader, ZipLoader, iterate, place_data
from ._readers import UnreadableFileError, read, read_citeseq_csv, read_mtx
from ._setup import DataSummary, get_summary, setup_anndata, standard_fields
from ._spatial import read_osmfish, read_starmap

__all__ = [
    "CellData",
    "DataSummary",
    "DeviceCellData",
    "Loader",
    "UnreadableFileError",
    "ZipLoader",
    "fields",
    "get_summary",
    "highly_variable_genes",
    "iterate",
    "kang_ifnb",
    "pbmc_ifnb",
    "place_data",
    "poisson_gene_selection",
    "read",
    "read_10x_h5",
    "read_10x_mtx",
    "read_citeseq_csv",
    "read_csv",
    "read_h5ad",
    "read_loom",
    "read_backed",
    "read_mtx",
    "read_osmfish",
    "read_starmap",
    "setup_anndata",
    "standard_fields",
    "synthetic_iid",
]
