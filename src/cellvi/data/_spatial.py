"""Readers for the spatial transcriptomics sets used with gimVI: osmFISH and STARmap.

Both return cells x genes raw counts as ``float32`` CSR, the cells' coordinates in
``obsm["spatial"]`` (``(cells, 2)``, in the file's units), the annotated cell type in
``obs["cell_type"]`` and the tissue section in ``obs["batch"]`` (categorical). Nothing is
downloaded: the files are read where they are.

* osmFISH (Codeluppi et al., 2018), mouse somatosensory cortex: 4,530 cells x 33 genes
  (``smfish.h5ad``, as scvi-tools distributes it, with ``x_coord``/``y_coord`` and
  ``str_labels``).
* STARmap (Wang et al., 2018), mouse medial prefrontal cortex: 3,704 cells x 158 genes
  (``mpfc-starmap.loom``: ``/matrix`` genes x cells, ``row_attrs/Gene``,
  ``col_attrs/Spatial_coordinates``, ``BatchID`` and ``Clusters``). Its gene names are lower
  case (``"gad2"``), osmFISH's capitalised (``"Gad2"``): genes are matched by exact name, so
  pass ``gene_case="title"`` to compare the two.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import anndata
import h5py
import numpy as np
import pandas as pd

from ._readers import _csr32, _to_str

__all__ = ["read_osmfish", "read_starmap"]

GeneCase = Literal["keep", "lower", "upper", "title"]


def _recase(names, case: GeneCase) -> list[str]:
    names = [str(n) for n in names]
    if case == "keep":
        return names
    if case == "lower":
        return [n.lower() for n in names]
    if case == "upper":
        return [n.upper() for n in names]
    if case == "title":
        return [n[:1].upper() + n[1:].lower() for n in names]
    raise ValueError(f"gene_case must be 'keep', 'lower', 'upper' or 'title', got {case!r}.")


def _existing(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No {what} file at {path}.")
    return path


def _finish(adata: anndata.AnnData, gene_case: GeneCase, path: Path) -> anndata.AnnData:
    names = _recase(adata.var_names, gene_case)
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: gene_case={gene_case!r} makes two gene names equal.")
    adata.var_names = pd.Index(names)
    return adata


def read_osmfish(path: str | os.PathLike, *, gene_case: GeneCase = "keep") -> anndata.AnnData:
    """Read the osmFISH mouse cortex set (``smfish.h5ad``) with its coordinates.

    Parameters
    ----------
    path
        The ``.h5ad`` file (``x_coord``, ``y_coord`` and ``str_labels`` in ``obs``).
    gene_case
        ``"keep"`` the gene names as stored, or make them ``"lower"``, ``"upper"`` or
        ``"title"`` case (to match another dataset's names).

    Returns
    -------
    anndata.AnnData
        4,530 cells x 33 genes of ``float32`` CSR counts; ``obsm["spatial"]`` the
        ``(x, y)`` coordinates, ``obs["cell_type"]`` the six annotated types,
        ``obs["batch"]`` the section (one). The file's ``obs`` columns are kept.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file lacks the coordinates, or its counts are not a cells x genes matrix.
    """
    path = _existing(path, "osmFISH")
    adata = anndata.read_h5ad(path)
    missing = [k for k in ("x_coord", "y_coord") if k not in adata.obs]
    if missing:
        raise ValueError(f"{path} has no obs {missing}: not the osmFISH set (smfish.h5ad).")
    out = anndata.AnnData(X=_csr32(adata.X), obs=adata.obs.copy(), var=adata.var.copy())
    out.obs_names = pd.Index([str(n) for n in adata.obs_names])
    out.obsm["spatial"] = np.column_stack([adata.obs["x_coord"].to_numpy(float),
                                           adata.obs["y_coord"].to_numpy(float)])
    if "str_labels" in adata.obs:
        out.obs["cell_type"] = pd.Categorical(adata.obs["str_labels"].astype(str))
    batch = adata.obs["batch"] if "batch" in adata.obs else pd.Series(0, index=adata.obs_names)
    out.obs["batch"] = pd.Categorical(np.asarray(batch).astype(str))
    return _finish(out, gene_case, path)


def read_starmap(path: str | os.PathLike, *, gene_case: GeneCase = "keep") -> anndata.AnnData:
    """Read the STARmap mouse prefrontal cortex set (``mpfc-starmap.loom``) with h5py.

    Parameters
    ----------
    path
        The ``.loom`` file.
    gene_case
        ``"keep"`` the (lower-case) gene names, or make them ``"lower"``, ``"upper"`` or
        ``"title"`` case (``"title"`` matches osmFISH's ``"Gad2"``).

    Returns
    -------
    anndata.AnnData
        3,704 cells x 158 genes of ``float32`` CSR counts; ``obsm["spatial"]`` the
        coordinates (``col_attrs/Spatial_coordinates``), ``obs["batch"]`` the section
        (``BatchID``: ``"0"``, ``"1"``, ``"2"``), ``obs["Clusters"]`` the stored cluster names
        and ``obs["cell_type"]`` the same with ``"NA"`` (unassigned) as a missing value.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        Not a loom file, or one whose attributes do not match its matrix.
    """
    path = _existing(path, "STARmap")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path} is not an HDF5 (loom) file ({err}).") from None
    with f:
        if "matrix" not in f or "row_attrs" not in f or "col_attrs" not in f:
            raise ValueError(f"{path} has no /matrix, /row_attrs and /col_attrs: not a loom file.")
        n_genes, n_cells = f["matrix"].shape
        counts = _csr32(f["matrix"][()].T)
        rows, cols = f["row_attrs"], f["col_attrs"]
        if "Gene" not in rows:
            raise ValueError(f"{path} has no row_attrs/Gene (the gene names).")
        genes = _to_str(rows["Gene"][()]).ravel()
        coords = np.asarray(cols["Spatial_coordinates"][()], dtype=float) \
            if "Spatial_coordinates" in cols else None
        batch = np.asarray(cols["BatchID"][()]).reshape(-1) if "BatchID" in cols else None
        clusters = _to_str(cols["Clusters"][()]).ravel() if "Clusters" in cols else None
    if len(genes) != n_genes:
        raise ValueError(f"{path}: {len(genes)} gene names for {n_genes} matrix rows.")
    if coords is None or coords.shape != (n_cells, 2):
        raise ValueError(f"{path}: col_attrs/Spatial_coordinates must be ({n_cells}, 2).")
    obs = pd.DataFrame(index=pd.Index([f"cell{i}" for i in range(n_cells)]))
    if batch is not None:
        if batch.shape[0] != n_cells:
            raise ValueError(f"{path}: col_attrs/BatchID has {batch.shape[0]} entries.")
        codes = batch.astype(np.int64) if np.all(np.mod(batch, 1) == 0) else batch
        obs["batch"] = pd.Categorical(np.asarray(codes).astype(str))
    else:
        obs["batch"] = pd.Categorical(["0"] * n_cells)
    if clusters is not None:
        obs["Clusters"] = pd.Categorical(clusters.astype(str))
        obs["cell_type"] = pd.Categorical(
            [None if c == "NA" else str(c) for c in clusters])
    out = anndata.AnnData(X=counts, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    out.obsm["spatial"] = coords
    return _finish(out, gene_case, path)
