"""Minibatches come straight from the sparse matrix."""

import numpy as np
import scipy.sparse as sp
import torch

from cellvi import keys
from cellvi.data import CellData, iterate
from cellvi.model import SCVI


def test_batches_gather_rows_without_densifying(tiny):
    SCVI.setup_anndata(tiny, batch_key="batch", labels_key="cell_type")
    data = CellData(tiny, SCVI(tiny).summary)
    assert sp.issparse(data.X)
    idx = np.array([5, 0, 199, 5])
    b = data.batch(idx)
    np.testing.assert_array_equal(b[keys.X].numpy(), tiny.X[idx].toarray())
    rows, cols = b[keys.INDICES_NONZERO].numpy()
    dense = tiny.X[idx].toarray()
    assert set(zip(rows, cols)) == set(zip(*np.nonzero(dense)))
    assert b[keys.BATCH].shape == (4, 1) and b[keys.BATCH].dtype == torch.int64
    codes = tiny.obs["batch"].cat.codes.to_numpy()[idx]
    np.testing.assert_array_equal(b[keys.BATCH].numpy().ravel(), codes)
    assert keys.INDICES_NONZERO not in data.batch(idx, nonzero=False)


def test_iterate_covers_each_cell_once(tiny):
    SCVI.setup_anndata(tiny)
    data = CellData(tiny, SCVI(tiny).summary)
    idx = np.arange(0, 200, 2)
    seen = np.concatenate([
        b[keys.INDICES].numpy().ravel()
        for b in iterate(data, idx, batch_size=32, shuffle=True, rng=np.random.default_rng(0))
    ])
    np.testing.assert_array_equal(np.sort(seen), idx)
    sizes = [len(b[keys.X]) for b in iterate(data, np.arange(66), batch_size=32,
                                             drop_last_below=3)]
    assert sizes == [32, 32]  # the final 2-cell minibatch is dropped for batch norm


def test_prefetching_thread_gives_the_same_batches(tiny):
    SCVI.setup_anndata(tiny)
    data = CellData(tiny, SCVI(tiny).summary)
    idx = np.arange(0, 200, 3)

    def batches(prefetch):
        return list(iterate(data, idx, batch_size=16, shuffle=True, sparse=True,
                            rng=np.random.default_rng(1), prefetch=prefetch))

    plain, threaded = batches(False), batches(True)
    assert len(plain) == len(threaded) == 5
    for a, b in zip(plain, threaded):
        np.testing.assert_array_equal(a[keys.INDICES].numpy(), b[keys.INDICES].numpy())
        np.testing.assert_array_equal(a[keys.X].to_dense().numpy(), b[keys.X].to_dense().numpy())


def test_sparse_batches_are_the_rows_and_their_transpose(tiny):
    SCVI.setup_anndata(tiny, batch_key="batch")
    tiny.X = tiny.X.tocsr()
    tiny.X.data[::7] = 0  # explicit zeros stored in the matrix are not entries
    data = CellData(tiny, SCVI(tiny).summary)
    idx = np.array([5, 0, 199, 5, 17])
    b = data.batch(idx, sparse=True)
    dense = tiny.X[idx].toarray()
    x, xt = b[keys.X], b[keys.X_T]
    assert x.layout == torch.sparse_csr and xt.layout == torch.sparse_csr
    np.testing.assert_array_equal(x.to_dense().numpy(), dense)
    np.testing.assert_array_equal(xt.to_dense().numpy(), dense.T)
    assert (x.values() != 0).all() and x.values().numel() == np.count_nonzero(dense)
    rows, cols = b[keys.INDICES_NONZERO].numpy()
    np.testing.assert_array_equal(cols, x.col_indices().numpy())
    np.testing.assert_array_equal(dense[rows, cols], x.values().numpy())
    # dense storage gives the same batch
    tiny_dense = tiny.copy()
    tiny_dense.X = dense_all = tiny.X.toarray()
    b2 = CellData(tiny_dense, SCVI(tiny).summary).batch(idx, sparse=True)
    np.testing.assert_array_equal(b2[keys.X].to_dense().numpy(), dense_all[idx])
    np.testing.assert_array_equal(b2[keys.X_T].to_dense().numpy(), dense_all[idx].T)


def test_a_run_of_rows_is_sliced_with_the_same_result(tiny):
    SCVI.setup_anndata(tiny)
    tiny.X = tiny.X.tocsr()
    data = CellData(tiny, SCVI(tiny).summary)
    run = np.arange(10, 40)
    for explicit_zeros in (False, True):
        if explicit_zeros:
            data.X.data[::5] = 0
        b = data.batch(run, sparse=True)
        dense = data.X[run].toarray()
        np.testing.assert_array_equal(b[keys.X].to_dense().numpy(), dense)
        assert (b[keys.X].values() != 0).all()
        rows, cols = b[keys.INDICES_NONZERO].numpy()
        np.testing.assert_array_equal(dense[rows, cols], b[keys.X].values().numpy())
        np.testing.assert_array_equal(b[keys.X_T].to_dense().numpy(), dense.T)
        x, pos = data.counts(run)
        np.testing.assert_array_equal(x, dense)


def test_only_modules_that_opt_in_get_sparse_batches_on_cpu_or_cuda():
    from cellvi.data._loader import sparse_batches
    from cellvi.module import SCANVAE, VAE

    vae = VAE(10)
    assert sparse_batches(vae, "cpu") and sparse_batches(vae, torch.device("cuda"))
    assert not sparse_batches(vae, "mps")  # no sparse CSR kernels there: dense batches
    assert not sparse_batches(SCANVAE(10, n_labels=3), "cpu")  # its classifier reads counts
