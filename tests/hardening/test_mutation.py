"""A model refuses an AnnData that changed after set-up, and never changes the user's objects."""

import numpy as np
import pytest
import scipy.sparse as sp

from cellvi.model import SCVI


@pytest.fixture
def trained(sim):
    adata = sim(300, 40, 3, 2, seed=21)
    SCVI.setup_anndata(adata, batch_key="batch")
    return SCVI(adata, n_latent=3, n_hidden=16).train(max_epochs=2, progress_bar=False)


@pytest.mark.parametrize(("change", "named"), [
    (lambda a: a._inplace_subset_obs(np.arange(a.n_obs) >= 30), "its cells"),
    (lambda a: setattr(a, "X", a.X * 2), "adata.X"),
    (lambda a: np.log1p(a.X.data, out=a.X.data), "adata.X"),
    (lambda a: a.X.data.__imul__(3), "adata.X"),
    (lambda a: a.obs.__setitem__("batch", a.obs["batch"].to_numpy()[::-1]), "batch"),
    (lambda a: setattr(a, "obs_names", [f"c{i}" for i in range(a.n_obs)]), "its cells"),
    (lambda a: a._inplace_subset_var(np.arange(a.n_vars) >= 1), "genes"),
])
def test_changed_anndata_is_refused(trained, change, named):
    change(trained.adata)
    for query in (trained.get_latent_representation, trained.get_elbo,
                  lambda: trained.train(max_epochs=1, progress_bar=False)):
        with pytest.raises(ValueError, match=f"changed after the model was built: .*{named}"):
            query()


def test_unregistered_changes_are_fine(trained):
    adata = trained.adata
    z = trained.get_latent_representation()
    adata.obsm["X_scvi"] = z
    adata.obs["cluster"] = "a"
    adata.layers["other"] = adata.X.copy()
    adata.uns["note"] = "x"
    np.testing.assert_array_equal(trained.get_latent_representation(), z)


def test_a_changed_copy_can_still_be_queried_with_adata(trained):
    other = trained.adata[:50].copy()
    assert trained.get_latent_representation(other).shape == (50, 3)


def test_user_objects_are_not_changed(sim):
    adata = sim(200, 30, 2, 2, seed=22)
    X = adata.X.tocsr()
    rows = [X.indices[X.indptr[i]:X.indptr[i + 1]][::-1].copy() for i in range(X.shape[0])]
    vals = [X.data[X.indptr[i]:X.indptr[i + 1]][::-1].copy() for i in range(X.shape[0])]
    unsorted = sp.csr_matrix((np.concatenate(vals), np.concatenate(rows), X.indptr),
                             shape=X.shape)
    assert not unsorted.has_sorted_indices
    adata.X = unsorted
    indices_before = adata.X.indices.copy()
    obs_before = adata.obs.copy()
    SCVI.setup_anndata(adata, batch_key="batch")
    model = SCVI(adata, n_hidden=8).train(max_epochs=1, progress_bar=False)
    model.get_latent_representation()
    assert adata.X is unsorted and not adata.X.has_sorted_indices
    np.testing.assert_array_equal(adata.X.indices, indices_before)
    assert adata.obs.equals(obs_before)
    assert set(adata.uns) == {"_cellvi_setup"}  # the only thing setup writes


def test_duplicate_gene_names_warn(sim):
    adata = sim(100, 10, 2, 1, seed=23)
    adata.var_names = ["g"] * 2 + [f"g{i}" for i in range(8)]
    with pytest.warns(UserWarning, match="duplicates"):
        SCVI.setup_anndata(adata)
