"""A VAE fed sparse CSR counts computes exactly what it computes on the dense counts."""

import numpy as np
import pytest
import torch

from cellvi import keys
from cellvi.data import CellData
from cellvi.model import SCVI
from cellvi.module import VAE

OPTIONS = [
    {},
    {"gene_likelihood": "nb", "dispersion": "gene-batch"},
    {"gene_likelihood": "poisson"},
    {"use_observed_lib_size": False, "encode_covariates": True, "n_layers": 2},
    {"log_variational": False, "dispersion": "gene-cell", "latent_distribution": "ln"},
]


@pytest.mark.parametrize("options", OPTIONS)
def test_sparse_and_dense_batches_give_the_same_loss_and_gradients(tiny, options):
    SCVI.setup_anndata(tiny, batch_key="batch", continuous_covariate_keys=None)
    data = CellData(tiny, SCVI(tiny).summary)
    idx = np.arange(0, 200, 3)
    dense, sparse = data.batch(idx), data.batch(idx, sparse=True)
    cont = torch.randn(len(idx), 2)
    dense[keys.CONT_COVS] = sparse[keys.CONT_COVS] = cont
    lib = np.log(data.library_sizes())
    torch.manual_seed(0)
    module = VAE(data.n_vars, n_batch=2, n_continuous_cov=2, library_log_means=lib[:2] * 0 +
                 lib.mean(), library_log_vars=np.ones(2), **options).double()
    results = []
    for batch in (dense, sparse):
        batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
        torch.manual_seed(1)  # the same dropout masks and posterior samples
        module.train()
        _, _, out = module(batch, kl_weight=0.3)
        grads = torch.autograd.grad(out.loss, [p for p in module.parameters()],
                                    allow_unused=True)
        results.append((out.loss, out.reconstruction_loss, grads))
    (l1, r1, g1), (l2, r2, g2) = results
    torch.testing.assert_close(l2, l1, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(r2, r1, rtol=1e-10, atol=1e-10)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10)


def test_sparse_batch_without_its_transpose_still_trains(tiny):
    SCVI.setup_anndata(tiny, batch_key="batch")
    data = CellData(tiny, SCVI(tiny).summary)
    idx = np.arange(0, 200, 3)
    full = data.batch(idx, sparse=True)
    bare = {k: v for k, v in full.items() if k != keys.X_T}
    torch.manual_seed(0)
    module = VAE(data.n_vars, n_batch=2).double()
    grads = []
    for batch in (full, bare):
        batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
        torch.manual_seed(1)
        loss = module(batch)[2].loss
        grads.append(torch.autograd.grad(loss, list(module.parameters()), allow_unused=True))
    for a, b in zip(*grads):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
