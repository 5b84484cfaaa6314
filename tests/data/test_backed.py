"""Out of core: set-up, training and queries straight from a backed .h5ad or a zarr store."""

import anndata
import numpy as np
import pytest
import scipy.sparse as sp

from cellvi.data import CellData, get_summary
from cellvi.data._backed import ChunkedLoader, DiskCSR, read_backed, stream_stats
from cellvi.model import SCVI


@pytest.fixture
def on_disk(sim, tmp_path):
    adata = sim(1500, 50, 3, 2, seed=51)
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    return adata, path


def test_setup_in_one_streaming_pass_equals_in_memory(on_disk):
    adata, path = on_disk
    backed = anndata.read_h5ad(path, backed="r")
    SCVI.setup_anndata(adata, batch_key="batch")
    SCVI.setup_anndata(backed, batch_key="batch")
    mem, disk = get_summary(adata), get_summary(backed)
    assert disk.var_names == mem.var_names and disk.batch_categories == mem.batch_categories
    np.testing.assert_allclose(disk.library_log_means, mem.library_log_means, rtol=1e-6)
    np.testing.assert_allclose(disk.library_log_vars, mem.library_log_vars, rtol=1e-6)
    stats = stream_stats(backed.X)
    np.testing.assert_allclose(stats.totals, np.asarray(adata.X.sum(1)).ravel())


def test_bad_counts_on_disk_are_refused(sim, tmp_path):
    adata = sim(200, 20, 2, 1, seed=52)
    adata.X.data[3] = -1
    adata.write_h5ad(tmp_path / "bad.h5ad")
    with pytest.raises(ValueError, match="negative"):
        SCVI.setup_anndata(anndata.read_h5ad(tmp_path / "bad.h5ad", backed="r"))


def test_disk_rows_and_minibatches_equal_memory(on_disk):
    adata, path = on_disk
    backed = anndata.read_h5ad(path, backed="r")
    disk = DiskCSR(backed.X)
    X = adata.X.tocsr()
    assert (disk.rows(100, 400) != X[100:400]).nnz == 0
    idx = np.array([5, 900, 6, 7, 1400, 3])
    assert (disk.take(idx) != X[idx]).nnz == 0
    SCVI.setup_anndata(backed, batch_key="batch")
    data = CellData(backed, get_summary(backed))
    assert data.out_of_core
    batch = data.batch(np.arange(10, 60), sparse=True)
    np.testing.assert_array_equal(batch["X"].to_dense().numpy(), X[10:60].toarray())


def test_chunked_loader_covers_each_cell_once_and_shards_without_overlap(on_disk):
    _, path = on_disk
    backed = anndata.read_h5ad(path, backed="r")
    SCVI.setup_anndata(backed)
    data = CellData(backed, get_summary(backed))
    cells = np.sort(np.random.default_rng(0).choice(1500, 1200, replace=False))
    loader = ChunkedLoader(data, cells, batch_size=64, rng=np.random.default_rng(1),
                           chunk_cells=100, buffer_chunks=3)
    seen = np.concatenate([b["indices"].numpy().ravel() for b in loader])
    assert sorted(seen) == list(cells)
    again = np.concatenate([b["indices"].numpy().ravel() for b in loader])
    assert not np.array_equal(seen, again)  # a new order each pass
    parts = [np.concatenate([b["indices"].numpy().ravel() for b in
                             ChunkedLoader(data, cells, batch_size=64, shard=(r, 2),
                                           rng=np.random.default_rng(1), chunk_cells=100)])
             for r in (0, 1)]
    assert not set(parts[0]) & set(parts[1])
    assert len(parts[0]) == len(parts[1])  # the same number of steps on both processes


def test_train_and_query_out_of_core(on_disk, tmp_path):
    adata, path = on_disk
    backed = anndata.read_h5ad(path, backed="r")
    SCVI.setup_anndata(backed, batch_key="batch")
    model = SCVI(backed, n_latent=4, n_hidden=32)
    model.train(max_epochs=15, seed=0, progress_bar=False)
    assert model.train_settings["out_of_core"]
    SCVI.setup_anndata(adata, batch_key="batch")
    memory = SCVI(adata, n_latent=4, n_hidden=32).train(max_epochs=15, seed=0,
                                                        progress_bar=False)
    a, b = model.history["elbo_validation"].iloc[-1], memory.history["elbo_validation"].iloc[-1]
    assert abs(a - b) / abs(b) < 0.02, (a, b)
    z = model.get_latent_representation()
    np.testing.assert_allclose(z, model.get_latent_representation(adata), atol=1e-5)
    out = model.write_latent_representation(tmp_path / "latent.h5ad", chunk_cells=400)
    written = anndata.read_h5ad(out)
    np.testing.assert_allclose(written.X, z, atol=1e-6)
    assert list(written.obs_names) == list(adata.obs_names)
    norm = model.write_normalized_expression(tmp_path / "norm.h5ad", chunk_cells=700)
    np.testing.assert_allclose(anndata.read_h5ad(norm).X.sum(1), 1, rtol=1e-4)


def test_a_zarr_store(sim, tmp_path):
    pytest.importorskip("zarr")
    adata = sim(300, 20, 2, 1, seed=53)
    adata.X = sp.csr_matrix(adata.X)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_zarr(tmp_path / "cells.zarr")
        store = read_backed(tmp_path / "cells.zarr")
    SCVI.setup_anndata(store)
    model = SCVI(store, n_hidden=8).train(max_epochs=2, progress_bar=False)
    assert model.get_latent_representation().shape == (300, 10)
