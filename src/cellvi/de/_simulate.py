"""Simulated two-group designs with known differentially expressed genes (tests, benchmarks)."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp


def simulate_de(
    n_cells: int = 3000,
    n_genes: int = 1000,
    *,
    n_group1: int | None = None,
    frac_de: float = 0.1,
    lfc_range: tuple[float, float] = (0.8, 2.0),
    frac_up: float = 0.5,
    n_batches: int = 2,
    batch_sd: float = 0.25,
    batch_confounding: float = 0.0,
    library_mean: float = 3000.0,
    theta_mean: float = 5.0,
    n_programs: int = 3,
    program_sd: float = 0.3,
    seed: int = 0,
):
    """Gamma-Poisson counts of two groups of cells with known DE genes.

    Each gene has a base log expression (normal, sd 1.5 on the natural log scale), a log2 fold
    change between the groups (uniform in ``lfc_range`` with a random sign on a fraction
    ``frac_de`` of genes, 0 elsewhere), a batch effect (normal, sd ``batch_sd`` in log2 units,
    per batch and gene) and loadings on ``n_programs`` within-group cell programmes (cell
    scores standard normal, loadings sd ``program_sd`` in log2 units), shared by both groups.
    A cell's expected counts are its normalised expression times a log-normal library size of
    mean ``library_mean``; counts are Poisson given a gamma rate of shape ``theta`` (per gene,
    log-normal around ``theta_mean``).

    Parameters
    ----------
    n_cells, n_genes
        Size of the design.
    n_group1
        Cells of group ``"A"`` (default: half); the rest are group ``"B"``.
    frac_de
        Fraction of DE genes.
    lfc_range
        Range of the absolute log2 fold change of the DE genes (B over A).
    frac_up
        Fraction of the DE genes that go up in B (the rest go down).
    n_batches, batch_sd
        Batches and the sd of their per-gene log2 effects (0: no batch effect).
    batch_confounding
        In ``[0, 1)``: how much the batch follows the group (0: independent; ``c``: a cell of
        group A is in batch 0 with probability ``(1 + c) / 2`` with two batches).
    library_mean
        Mean total counts per cell: about 1,000 gives sparse counts, 10,000 dense ones.
    theta_mean
        Typical inverse dispersion of the gamma-Poisson counts.
    n_programs, program_sd
        Within-group heterogeneity shared by both groups.
    seed
        Random seed.

    Returns
    -------
    adata, truth
        AnnData of CSR counts with ``obs["group"]`` (A/B) and ``obs["batch"]``; a DataFrame
        indexed by gene with ``is_de`` and ``lfc`` (the log2 fold change of B over A of the
        group mean normalised expression, computed from the simulation's parameters).
    """
    rng = np.random.default_rng(seed)
    n1 = n_cells // 2 if n_group1 is None else int(n_group1)
    if not 0 < n1 < n_cells:
        raise ValueError(f"n_group1 must be in (0, n_cells), got {n1}.")
    group = np.zeros(n_cells, dtype=int)
    group[n1:] = 1
    n_de = int(round(frac_de * n_genes))
    is_de = np.zeros(n_genes, dtype=bool)
    is_de[rng.choice(n_genes, n_de, replace=False)] = True
    lfc = np.zeros(n_genes)
    lfc[is_de] = rng.uniform(*lfc_range, n_de) * np.where(rng.random(n_de) < frac_up, 1.0, -1.0)
    log_base = rng.normal(0.0, 1.5, n_genes)
    ln2 = np.log(2.0)
    batch_eff = rng.normal(0.0, batch_sd, (n_batches, n_genes)) * ln2
    # batch membership, optionally following the group
    p = np.full((2, n_batches), 1.0 / n_batches)
    if n_batches == 2 and batch_confounding:
        c = float(batch_confounding)
        p = np.array([[(1 + c) / 2, (1 - c) / 2], [(1 - c) / 2, (1 + c) / 2]])
    batch = np.array([rng.choice(n_batches, p=p[g]) for g in group])
    scores = rng.normal(0.0, 1.0, (n_cells, n_programs))
    loadings = rng.normal(0.0, program_sd, (n_programs, n_genes)) * ln2
    log_mu = (log_base + group[:, None] * lfc * ln2 + batch_eff[batch] + scores @ loadings)
    scale = np.exp(log_mu - log_mu.max(1, keepdims=True))
    scale /= scale.sum(1, keepdims=True)
    library = rng.lognormal(np.log(library_mean) - 0.08, 0.4, n_cells)
    mu = scale * library[:, None]
    theta = np.exp(rng.normal(np.log(theta_mean), 0.5, n_genes))
    counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
    empty = counts.sum(1) == 0
    counts[empty, rng.integers(0, n_genes, int(empty.sum()))] = 1
    adata = anndata.AnnData(sp.csr_matrix(counts))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{j}" for j in range(n_genes)]
    adata.obs["group"] = pd.Categorical(np.where(group == 0, "A", "B"))
    adata.obs["batch"] = pd.Categorical([f"b{b}" for b in batch])
    # the truth on the normalised scale, from the noise-free scales of each group
    mean_a = scale[group == 0].mean(0)
    mean_b = scale[group == 1].mean(0)
    truth = pd.DataFrame({"is_de": is_de, "lfc": lfc,
                          "lfc_normalised": np.log2(mean_b) - np.log2(mean_a)},
                         index=adata.var_names)
    return adata, truth
