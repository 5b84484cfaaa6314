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
