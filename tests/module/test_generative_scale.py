"""``generative_scale`` decodes exactly ``generative(...)["px"].scale``, and nothing else."""

import numpy as np
import pytest
import torch

from cellvi import keys
from cellvi.module import LDVAE, VAE, VAEC


def _batch(n=12, g=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        keys.X: torch.poisson(torch.full((n, g), 2.0), generator=gen),
        keys.BATCH: torch.randint(0, 3, (n, 1), generator=gen),
        keys.LABELS: torch.randint(0, 4, (n, 1), generator=gen),
        keys.CONT_COVS: torch.randn(n, 2, generator=gen),
        keys.CAT_COVS: torch.randint(0, 2, (n, 1), generator=gen),
    }


MODULES = {
    "vae": lambda: VAE(20, n_batch=3, n_continuous_cov=2, n_cats_per_cov=[2], n_layers=2),
    "vae-softplus-free": lambda: VAE(20, n_batch=3, dispersion="gene-cell"),
    "ldvae": lambda: LDVAE(20, n_batch=3, library_log_means=np.zeros(3),
                           library_log_vars=np.ones(3)),
    "vaec": lambda: VAEC(20, n_batch=3, n_labels=4),
}


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("transform_batch", [None, 1])
@pytest.mark.parametrize("n_samples", [1, 3])
def test_generative_scale_is_px_scale(name, transform_batch, n_samples):
    torch.manual_seed(0)
    module = MODULES[name]().eval()
    tensors = _batch()
    with torch.no_grad():
        inf = module.inference(**module.inference_inputs(tensors), n_samples=n_samples)
        gin = module.generative_inputs(tensors, inf)
        full = module.generative(**gin, transform_batch=transform_batch)["px"].scale
        alone = module.generative_scale(**gin, transform_batch=transform_batch)
    assert alone.shape == full.shape
    torch.testing.assert_close(alone, full)


LIKELIHOOD_MODULES = {
    **MODULES,
    "vae-nb-gene-label": lambda: VAE(20, n_batch=3, n_labels=4, gene_likelihood="nb",
                                     dispersion="gene-label"),
    "vae-size-factor": lambda: VAE(20, n_batch=3, use_size_factor_key=True),
    "vae-poisson": lambda: VAE(20, n_batch=3, gene_likelihood="poisson"),
}


@pytest.mark.parametrize("name", list(LIKELIHOOD_MODULES))
@pytest.mark.parametrize("n_samples", [1, 3])
def test_log_likelihood_rows_is_log_prob_of_px(name, n_samples):
    from cellvi.distributions import log_prob_rows

    torch.manual_seed(0)
    module = LIKELIHOOD_MODULES[name]().eval()
    tensors = _batch()
    tensors[keys.SIZE_FACTOR] = torch.rand(12, 1) + 0.5
    with torch.no_grad():
        inf = module.inference(**module.inference_inputs(tensors), n_samples=n_samples)
        px = module.generative(**module.generative_inputs(tensors, inf))["px"]
        expected = log_prob_rows(px, tensors[keys.X])
        rows = module.log_likelihood_rows(tensors, inf)
    assert rows.shape == expected.shape == ((n_samples, 12) if n_samples > 1 else (12,))
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-4)
