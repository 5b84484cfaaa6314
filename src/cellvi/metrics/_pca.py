r"""A small PCA (no scikit-learn needed), and log-normalised counts to run it on."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from ._neighbors import as_embedding

__all__ = ["log_normalize", "pca"]


def pca(X, n_components: int = 2, *, seed: int = 0) -> np.ndarray:
    r"""Return the principal-component scores of the rows of ``X``, ``(cells, n_components)``.

    The centred matrix :math:`X - \bar X = U S V^\top`; the scores are :math:`U S`, components
    in decreasing variance. Exact SVD (float64) for up to 500 columns, else a randomised SVD
    (``torch.svd_lowrank``, 4 power iterations, seeded). Each component's sign is fixed so that
    its largest-magnitude loading is positive, so the result does not depend on the solver.
    """
    X = as_embedding(X)
    n, d = X.shape
    if isinstance(n_components, bool) or int(n_components) != n_components or not (
            1 <= n_components <= min(n, d)):
        raise ValueError(f"n_components must be an integer in [1, {min(n, d)}], got "
                         f"{n_components!r}.")
    k = int(n_components)
    x = torch.from_numpy(X - X.mean(0))
    if d <= 500:
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh[:k].T
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            _, s, v = torch.svd_lowrank(x, q=min(k + 10, d), niter=4)
        v = v[:, :k]
    flip = torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
    v = v * torch.where(flip == 0, torch.ones_like(flip), flip)
    return (x @ v).numpy()


def log_normalize(counts, *, target_sum: float = 1e4) -> np.ndarray:
    r"""Return :math:`\log(1 + 10^4 x_{ng} / \sum_g x_{ng})` as a dense float64 array."""
    if sp.issparse(counts):
        m = sp.csr_matrix(counts, dtype=np.float64)
        totals = np.asarray(m.sum(1)).ravel()
        m = sp.diags(target_sum / np.maximum(totals, 1e-12)) @ m
        m.data = np.log1p(m.data)
        return m.toarray()
    m = np.asarray(counts, dtype=np.float64)
    totals = m.sum(1, keepdims=True)
    return np.log1p(m * (target_sum / np.maximum(totals, 1e-12)))
