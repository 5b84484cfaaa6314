"""Shared fixtures: small simulated count data with known cell types and batches."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(1)  # tiny networks: extra threads only contend

#: Printed at the top of every run, so that a report says what pip resolved.
REPORTED = ("torch", "numpy", "scipy", "pandas", "anndata", "h5py", "tqdm", "scikit-learn")


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in REPORTED:
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return "cellvi dependencies: " + ", ".join(found)


def pytest_terminal_summary(terminalreporter):
    """Print the resolved versions even under ``-q`` (next to pytest's closing line)."""
    terminalreporter.write_line(_versions())


def simulate(
    n_cells: int = 1200,
    n_genes: int = 300,
    n_types: int = 4,
    n_batches: int = 2,
    *,
    batch_effect: float = 0.8,
    batch_genes: float = 1.0,
    seed: int = 0,
) -> anndata.AnnData:
    """NB counts with type-specific means and multiplicative per-gene batch effects.

    A fraction ``batch_genes`` of genes get a log-normal batch factor with sd ``batch_effect``.

    ``obs["cell_type"]`` and ``obs["batch"]`` hold the truth; X is CSR float32 counts.
    """
    rng = np.random.default_rng(seed)
    base = rng.gamma(0.6, 1.0, n_genes) + 0.05
    log_fc = rng.normal(0, 1.2, (n_types, n_genes))
    type_fc = np.exp(log_fc * (rng.random((n_types, n_genes)) < 0.3))
    affected = rng.random((n_batches, n_genes)) < batch_genes
    batch_fc = np.exp(rng.normal(0, batch_effect, (n_batches, n_genes)) * affected)
    types = rng.integers(0, n_types, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
    mean = base * type_fc[types] * batch_fc[batches]
    mean = mean / mean.sum(1, keepdims=True)
    library = rng.lognormal(np.log(1500), 0.3, n_cells)
    mu = mean * library[:, None]
    theta = 5.0
    counts = rng.poisson(rng.gamma(theta, mu / theta))
    counts[counts.sum(1) == 0, 0] = 1
    adata = anndata.AnnData(sp.csr_matrix(counts.astype(np.float32)))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{j}" for j in range(n_genes)]
    adata.obs["cell_type"] = pd.Categorical([f"type{t}" for t in types])
    adata.obs["batch"] = pd.Categorical([f"batch{b}" for b in batches])
    return adata


@pytest.fixture
def sim():
    """A factory: ``sim(n_cells=..., ...)`` returns a fresh simulated AnnData."""
    return simulate


@pytest.fixture
def tiny():
    """A tiny simulated AnnData (200 cells x 50 genes, 2 batches, 3 types)."""
    return simulate(200, 50, 3, 2, seed=1)


def shared_data(*parts: str) -> Path:
    """Path under ../shared/data, skipping the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available (needs ../shared/data beside the project)")
    return path
