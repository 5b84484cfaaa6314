"""The direct path of get_normalized_expression (decoded into the output) equals the general one."""

import numpy as np
import torch

from cellvi.model import SCVI, LinearSCVI


def _both(model, **kwargs):
    torch.manual_seed(3)
    direct = model.get_normalized_expression(return_numpy=True, **kwargs)
    torch.manual_seed(3)  # a gene list takes the general path: decode, select, copy
    general = model.get_normalized_expression(
        return_numpy=True, gene_list=list(model.summary.var_names), **kwargs)
    return direct, general


def test_direct_path_equals_general_path(tiny):
    SCVI.setup_anndata(tiny, batch_key="batch")
    for model in (SCVI(tiny, n_latent=4), LinearSCVI(tiny, n_latent=4)):
        model.train(max_epochs=2, progress_bar=False)
        for kwargs in ({}, {"library_size": 1e4}, {"transform_batch": "batch1"},
                       {"indices": np.arange(5, 150, 2), "batch_size": 16}):
            direct, general = _both(model, **kwargs)
            np.testing.assert_allclose(direct, general, rtol=1e-6, atol=1e-9)
        direct, _ = _both(model)
        np.testing.assert_allclose(direct.sum(1), 1.0, rtol=1e-5)
