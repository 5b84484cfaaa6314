"""scvi-tools' ``scvi.data`` names: simulated data, Poisson gene selection, readers.

So that ``import cellvi as scvi`` runs code written for scvi-tools: ``scvi.data.synthetic_iid()``,
``scvi.data.poisson_gene_selection(adata, n_top_genes=...)``, ``scvi.data.read_h5ad(...)``,
``read_10x_h5``, ``read_10x_mtx``, ``read_loom``, ``read_csv``. The readers are
:func:`cellvi.data.read` under scvi-tools' names.
"""

from __future__ import annotations

import os

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellvi._checks import check_int
from cellvi._settings import current as current_settings

from ._readers import read

__all__ = [
    "poisson_gene_selection",
    "read_10x_h5",
    "read_10x_mtx",
    "read_csv",
    "read_h5ad",
    "read_loom",
    "synthetic_iid",
]


def synthetic_iid(
    batch_size: int = 200,
    n_genes: int = 100,
    n_proteins: int = 100,
    n_regions: int = 100,
    n_batches: int = 2,
    n_labels: int = 3,
    dropout_ratio: float = 0.7,
    sparse_format: str | None = None,
    generate_coordinates: bool = False,
    return_mudata: bool = False,
    seed: int | None = None,
) -> anndata.AnnData:
    r"""Simulate a small dataset of counts with batches, labels, proteins and regions (offline).

    For each of ``n_batches`` batches, ``batch_size`` cells with a label drawn uniformly among
    ``n_labels``. Gene counts are negative binomial (inverse dispersion 2) with a label-specific
    mean :math:`\mu_{lg} \sim \mathrm{Gamma}(2, 1)` times 5 and a batch factor; each count is then
    set to zero with probability ``dropout_ratio / 2`` (so that the matrix is sparse, as
    scvi-tools' ``synthetic_iid``). Proteins are Poisson with a label-specific mean (a
    background near 5 and a foreground near 50), regions Bernoulli.

    Parameters
    ----------
    batch_size
        Cells per batch.
    n_genes, n_proteins, n_regions
        Genes (``X``), proteins (``obsm["protein_expression"]``, names in
        ``uns["protein_names"]``) and accessibility regions (``obsm["accessibility"]``); 0
        leaves a modality out.
    n_batches, n_labels
        Batches (``obs["batch"]``: ``"batch_0"``...) and labels (``obs["labels"]``:
        ``"label_0"``...).
    dropout_ratio
        Twice the probability that a count is set to zero, in [0, 1].
    sparse_format
        ``None`` (dense ``X``), ``"csr_matrix"`` or ``"csc_matrix"``.
    generate_coordinates
        Add random spatial coordinates in ``obsm["coordinates"]``.
    return_mudata
        Not available (MuData is not a dependency); must be False.
    seed
        Seed (default: ``cellvi.settings.seed``).

    Returns
    -------
    anndata.AnnData
        ``n_batches * batch_size`` cells x ``n_genes`` genes of integer counts.
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    n_genes = check_int("n_genes", n_genes, minimum=1)
    n_batches = check_int("n_batches", n_batches, minimum=1)
    n_labels = check_int("n_labels", n_labels, minimum=1)
    for name, value in (("n_proteins", n_proteins), ("n_regions", n_regions)):
        check_int(name, value, minimum=0)
    if not 0 <= dropout_ratio <= 1:
        raise ValueError(f"dropout_ratio must be in [0, 1], got {dropout_ratio}.")
    if sparse_format not in (None, "csr_matrix", "csc_matrix"):
        raise ValueError(f"sparse_format must be None, 'csr_matrix' or 'csc_matrix', got "
                         f"{sparse_format!r}.")
    if return_mudata:
        raise ValueError("return_mudata=True needs the mudata package, which cellvi does not "
                         "depend on; use the AnnData (proteins are in obsm).")
    rng = np.random.default_rng(current_settings().seed if seed is None else seed)
    n = batch_size * n_batches
    batches = np.repeat(np.arange(n_batches), batch_size)
    labels = rng.integers(0, n_labels, n)
    mu = rng.gamma(2.0, 1.0, (n_labels, n_genes)) * 5
    batch_factor = rng.lognormal(0, 0.3, (n_batches, n_genes))
    mean = mu[labels] * batch_factor[batches]
    counts = rng.poisson(rng.gamma(2.0, mean / 2.0))
    counts[rng.random(counts.shape) < dropout_ratio / 2] = 0
    X = counts.astype(np.float32)
    if sparse_format is not None:
        X = getattr(sp, sparse_format)(X)
    obs = pd.DataFrame({
        "batch": pd.Categorical([f"batch_{b}" for b in batches]),
        "labels": pd.Categorical([f"label_{k}" for k in labels]),
    }, index=[f"cell_{i}" for i in range(n)])
    adata = anndata.AnnData(X=X, obs=obs,
                            var=pd.DataFrame(index=[f"gene_{g}" for g in range(n_genes)]))
    if n_proteins:
        fore = rng.random((n_labels, n_proteins)) < 0.3
        rate = np.where(fore, 50.0, 5.0)[labels] * rng.lognormal(0, 0.2, (n, 1))
        adata.obsm["protein_expression"] = rng.poisson(rate).astype(np.float32)
        adata.uns["protein_names"] = np.array([f"protein_{p}" for p in range(n_proteins)])
    if n_regions:
        p_open = rng.beta(1, 4, (n_labels, n_regions))[labels]
        adata.obsm["accessibility"] = (rng.random((n, n_regions)) < p_open).astype(np.float32)
    if generate_coordinates:
        adata.obsm["coordinates"] = rng.random((n, 2))
    return adata


def poisson_gene_selection(
    adata: anndata.AnnData,
    layer: str | None = None,
    n_top_genes: int = 4000,
    n_samples: int = 10000,
    batch_key: str | None = None,
    subset: bool = False,
    inplace: bool = True,
    seed: int | None = None,
) -> pd.DataFrame | None:
    r"""Select genes whose zeros are more frequent than a Poisson model of the counts expects.

    Within each batch, with :math:`n_c` the total counts of cell :math:`c` and
    :math:`p_g = \sum_c x_{cg} / \sum_c n_c`, a Poisson model expects a fraction of zeros
    :math:`e_g = \frac1C \sum_c \exp(-n_c p_g)`. The number of zeros the model would give is
    drawn ``n_samples`` times from :math:`\mathrm{Binomial}(C, e_g)`; ``prob_zero_enrichment``
    is the fraction of draws below the observed number of zeros. Genes are ranked by that
    probability (averaged over batches, ties by its rank), and the ``n_top_genes`` first are
    marked ``highly_variable``. (The rule of scvi-tools' function of this name.)

    Parameters
    ----------
    adata
        Cells x genes AnnData of raw counts.
    layer
        Layer with the counts (None: ``X``).
    n_top_genes
        Genes to select.
    n_samples
        Binomial draws per gene (in chunks; memory stays small).
    batch_key
        ``obs`` column of the batch, or None.
    subset
        Keep only the selected genes (in place, when ``inplace``).
    inplace
        Write the columns into ``adata.var`` (and subset it, with ``subset``); otherwise
        return them as a DataFrame and leave ``adata`` untouched.
    seed
        Seed of the draws (default: ``cellvi.settings.seed``).

    Returns
    -------
    None when ``inplace``, else a DataFrame indexed like ``adata.var`` with
    ``observed_fraction_zeros``, ``expected_fraction_zeros``, ``prob_zero_enriched_nbatches``,
    ``prob_zero_enrichment``, ``prob_zero_enrichment_rank`` and ``highly_variable``.
    """
    from .fields import check_counts, get_counts

    n_genes = adata.n_vars
    n_top_genes = check_int("n_top_genes", n_top_genes, minimum=1)
    if n_top_genes > n_genes:
        raise ValueError(f"n_top_genes={n_top_genes} is more than the {n_genes} genes.")
    n_samples = check_int("n_samples", n_samples, minimum=1)
    X = get_counts(adata, layer)
    check_counts(X, where="adata.X" if layer is None else f"adata.layers[{layer!r}]")
    X = sp.csr_matrix(X, dtype=np.float64)
    if batch_key is None:
        groups = [np.arange(adata.n_obs)]
    else:
        if batch_key not in adata.obs:
            raise KeyError(f"batch_key {batch_key!r} is not a column of adata.obs.")
        codes = pd.Categorical(adata.obs[batch_key]).codes
        groups = [np.flatnonzero(codes == c) for c in np.unique(codes)]
    rng = np.random.default_rng(current_settings().seed if seed is None else seed)
    observed, expected, prob, enriched = [], [], [], []
    for rows in groups:
        x = X[rows]
        totals = np.asarray(x.sum(axis=1)).ravel()
        p = np.asarray(x.sum(axis=0)).ravel() / max(totals.sum(), 1.0)
        n_cells = len(rows)
        e = np.zeros(n_genes)
        for c0 in range(0, n_cells, 4096):  # sum over cells of exp(-n_c p_g), in blocks
            cells = totals[c0:c0 + 4096]
            for g0 in range(0, n_genes, 512):
                e[g0:g0 + 512] += np.exp(-np.outer(cells, p[g0:g0 + 512])).sum(axis=0)
        e /= max(n_cells, 1)
        obs_zeros = n_cells - np.asarray((x != 0).sum(axis=0)).ravel()
        draws_below = np.zeros(n_genes)
        for start in range(0, n_samples, 1000):
            k = min(1000, n_samples - start)
            draws = rng.binomial(n_cells, np.clip(e, 0, 1), size=(k, n_genes))
            draws_below += (draws < obs_zeros).sum(axis=0)
        pr = draws_below / n_samples
        observed.append(obs_zeros / n_cells)
        expected.append(e)
        prob.append(pr)
        enriched.append(pr > 0.95)
    prob_mean = np.mean(prob, axis=0)
    rank = pd.Series(-prob_mean).rank(method="first").to_numpy() - 1
    order = np.lexsort((rank, -prob_mean))
    selected = np.zeros(n_genes, dtype=bool)
    selected[order[:n_top_genes]] = True
    table = pd.DataFrame({
        "observed_fraction_zeros": np.mean(observed, axis=0),
        "expected_fraction_zeros": np.mean(expected, axis=0),
        "prob_zero_enriched_nbatches": np.sum(enriched, axis=0).astype(int),
        "prob_zero_enrichment": prob_mean,
        "prob_zero_enrichment_rank": rank.astype(int),
        "highly_variable": selected,
    }, index=adata.var_names)
    if not inplace:
        return table
    for column in table:
        adata.var[column] = table[column].to_numpy()
    if subset:
        adata._inplace_subset_var(selected)
    return None


def read_h5ad(filename: str | os.PathLike, **kwargs) -> anndata.AnnData:
    """Read an ``.h5ad`` file (``anndata.read_h5ad``)."""
    return read(filename, **kwargs)


def read_10x_h5(filename: str | os.PathLike, **kwargs) -> anndata.AnnData:
    """Read a 10x Genomics ``.h5`` file of counts (:func:`cellvi.data.read`)."""
    return read(filename, **kwargs)


def read_10x_mtx(path: str | os.PathLike, **kwargs) -> anndata.AnnData:
    """Read a 10x Genomics folder (``matrix.mtx``, ``features.tsv``, ``barcodes.tsv``)."""
    return read(path, **kwargs)


def read_loom(filename: str | os.PathLike, **kwargs) -> anndata.AnnData:
    """Read a ``.loom`` file (:func:`cellvi.data.read`)."""
    return read(filename, **kwargs)


def read_csv(filename: str | os.PathLike, **kwargs) -> anndata.AnnData:
    """Read a cells x genes ``.csv``/``.tsv`` of counts (``transpose=True``: genes x cells)."""
    return read(filename, **kwargs)
