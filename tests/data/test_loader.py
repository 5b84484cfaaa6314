"""Minibatches come straight from the sparse matrix."""

import numpy as np
import pytest
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
        x, pos = data.columns[keys.X].counts(run)
        np.testing.assert_array_equal(x, dense)


def test_only_modules_that_opt_in_get_sparse_batches_on_cpu_or_cuda():
    from cellvi.data._loader import sparse_batches
    from cellvi.module import SCANVAE, VAE, VAEC

    vae = VAE(10)
    assert sparse_batches(vae, "cpu") and sparse_batches(vae, torch.device("cuda"))
    assert not sparse_batches(vae, "mps")  # no sparse CSR kernels there: dense batches
    assert sparse_batches(SCANVAE(10, n_labels=3), "cpu")  # its classifier reads the latent
    assert not sparse_batches(VAEC(10, n_labels=3), "cpu")  # its classifier reads the counts


def _assert_same_batch(host: dict, dev: dict) -> None:
    assert host.keys() == dev.keys()
    for k, a in host.items():
        b = dev[k]
        assert b.layout == a.layout and b.dtype == a.dtype, k
        if a.layout == torch.sparse_csr:  # same entries in the same order, not only same values
            for part in ("crow_indices", "col_indices", "values"):
                assert torch.equal(getattr(a, part)(), getattr(b, part)()), (k, part)
        else:
            assert torch.equal(a, b), k


def test_device_copy_gives_the_same_batches_as_the_host(tiny):
    from cellvi.data import DeviceCellData

    SCVI.setup_anndata(tiny, batch_key="batch", labels_key="cell_type")
    tiny.X = tiny.X.tocsr()
    tiny.X.data[::7] = 0  # explicit zeros: not entries on either side
    summary = SCVI(tiny).summary
    tiny_dense = tiny.copy()
    tiny_dense.X = tiny.X.toarray()
    idx = np.array([5, 0, 199, 5, 17, 120])
    options = [dict(sparse=True), dict(sparse=True, transpose=False, nonzero=False),
               dict(nonzero=True), dict(nonzero=False)]
    for adata in (tiny, tiny_dense):
        host = CellData(adata, summary)
        dev = DeviceCellData(host, "cpu")
        assert len(dev) == host.n_obs and dev.n_vars == host.n_vars
        for kw in options:
            _assert_same_batch(host.batch(idx, **kw), dev.batch(idx, **kw))
            _assert_same_batch(host.batch(idx, **kw),
                               dev.batch(idx, idx_on_device=torch.from_numpy(idx), **kw))
    nnz = int((tiny.X.data != 0).sum())
    assert DeviceCellData.nbytes(host) >= 12 * nnz


def test_iterate_over_a_device_copy_gives_the_same_minibatches(tiny):
    from cellvi.data import DeviceCellData

    SCVI.setup_anndata(tiny, batch_key="batch")
    host = CellData(tiny, SCVI(tiny).summary)
    dev = DeviceCellData(host, "cpu")
    idx = np.arange(0, 200, 3)

    def batches(data):
        return list(iterate(data, idx, batch_size=16, shuffle=True, sparse=True,
                            rng=np.random.default_rng(4), drop_last_below=3))

    a, b = batches(host), batches(dev)
    assert len(a) == len(b) == 5
    for x, y in zip(a, b):
        _assert_same_batch(x, y)


def test_place_data_keeps_the_host_on_cpu_by_default_and_checks_its_argument(tiny):
    from cellvi.data import DeviceCellData, place_data

    SCVI.setup_anndata(tiny)
    host = CellData(tiny, SCVI(tiny).summary)
    assert place_data(host, "auto", "cpu") is host
    assert place_data(host, "host", "cpu") is host
    assert isinstance(place_data(host, "device", "cpu"), DeviceCellData)
    with pytest.raises(ValueError, match="data_placement must be 'auto', 'device' or 'host'"):
        place_data(host, "gpu", "cpu")


def test_training_from_a_device_copy_gives_the_same_model(tiny):
    SCVI.setup_anndata(tiny, batch_key="batch")
    runs = []
    for placement in ("host", "device"):
        model = SCVI(tiny, n_hidden=32, n_latent=4)
        model.train(max_epochs=3, seed=3, progress_bar=False, data_placement=placement)
        assert model.train_settings["data_placement"] == placement
        runs.append(model)
    cols = ["elbo_train", "elbo_validation", "loss_train"]
    np.testing.assert_array_equal(runs[0].history[cols].to_numpy(),
                                  runs[1].history[cols].to_numpy())
    np.testing.assert_array_equal(runs[0].get_latent_representation(),
                                  runs[1].get_latent_representation())
    model = runs[1]
    before = model.train_indices.copy()
    with pytest.raises(ValueError, match="data_placement"):
        model.train(max_epochs=1, seed=9, data_placement="cuda", progress_bar=False)
    np.testing.assert_array_equal(model.train_indices, before)  # nothing changed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_device_copy_gathers_without_waiting_and_is_chosen_by_default(tiny):
    from cellvi.data import DeviceCellData, place_data

    SCVI.setup_anndata(tiny, batch_key="batch")
    host = CellData(tiny, SCVI(tiny).summary)
    dev = place_data(host, "auto", "cuda")
    assert isinstance(dev, DeviceCellData)  # a few kB: it fits
    idx = np.array([5, 0, 199, 5, 17, 120])
    torch.cuda.set_sync_debug_mode("error")  # any host-device synchronisation raises
    try:
        batches = list(iterate(dev, idx, batch_size=4, sparse=True))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = list(iterate(host, idx, batch_size=4, sparse=True))
    for a, b in zip(want, batches):
        _assert_same_batch(a, {k: v.cpu() for k, v in b.items()})


def test_zip_loader_cycles_the_shorter_loaders(tiny):
    from cellvi.data import Loader, ZipLoader

    SCVI.setup_anndata(tiny)
    data = CellData(tiny, SCVI(tiny).summary)
    long = Loader(data, np.arange(100), batch_size=10)
    short = Loader(data, np.arange(30), batch_size=10, shuffle=True,
                   rng=np.random.default_rng(0))
    steps = list(ZipLoader([long, short]))
    assert len(steps) == 10 and all(len(s) == 2 for s in steps)
    seen = np.concatenate([s[1][keys.INDICES].numpy().ravel() for s in steps[:3]])
    assert sorted(seen) == list(range(30))  # one full pass of the short loader, then again
