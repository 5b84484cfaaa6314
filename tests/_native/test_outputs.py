"""The queries' result memory: reused only once nothing refers to it, and never overwritten."""

import gc

import numpy as np
import pytest
import torch

import cellvi
from cellvi._native import _outputs
from cellvi.model import SCVI

needs_glibc = pytest.mark.skipif(_outputs._malloc_free() is None, reason="needs glibc")


@pytest.fixture(autouse=True)
def _empty_pool():  # each test starts with no kept block
    with _outputs._lock:
        block, _outputs._spare = _outputs._spare, None
    if block is not None:
        _outputs._malloc_free()[1](block[0])
    yield


@needs_glibc
def test_result_is_aligned_writable_and_reused_after_every_view_is_gone():
    t = _outputs.empty((700, 500))  # 1.4 MB
    assert t.shape == (700, 500) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % 64 == 0
    t.fill_(2.0)
    arr = t.numpy()
    assert arr.flags.writeable and arr.sum() == 2.0 * 700 * 500
    view, address = arr[10:20], t.data_ptr()
    del t, arr
    gc.collect()
    assert _outputs.held_bytes() == 0  # a view still uses the memory: not released
    other = _outputs.empty((700, 500))
    assert other.data_ptr() != address  # ... so it cannot be handed out again
    other.fill_(5.0)
    assert (view == 2.0).all()
    del view
    assert _outputs.held_bytes() >= 4 * 700 * 500  # the last view gone: kept for reuse
    again = _outputs.empty((700, 500))
    assert again.data_ptr() == address and _outputs.held_bytes() == 0
    assert (other == 5.0).all()


@needs_glibc
def test_small_large_and_system_requests(monkeypatch):
    small = _outputs.empty((10, 10))
    del small
    assert _outputs.held_bytes() == 0  # under 1 MiB: plain torch.empty
    monkeypatch.setattr(_outputs, "_KEEP_BYTES", 8 << 20)
    big = _outputs.empty((2100, 1000))  # 8.4 MB: above the limit, freed rather than kept
    big.fill_(1.0)
    del big
    assert _outputs.held_bytes() == 0
    mid = _outputs.empty((1500, 1000))
    del mid
    kept = _outputs.held_bytes()
    assert kept > 0
    quarter = _outputs.empty((300, 1000))  # far smaller than the kept block: that is freed
    assert _outputs.held_bytes() == 0 and quarter.shape == (300, 1000)
    monkeypatch.setattr(cellvi.settings, "memory_allocator", "system")
    plain = _outputs.empty((500, 1000))
    del plain
    assert _outputs.held_bytes() == 0


@needs_glibc
def test_normalized_expression_results_stay_intact_across_calls(tiny, monkeypatch):
    monkeypatch.setattr(_outputs, "_MIN_BYTES", 0)  # the tiny data's results go through it too
    SCVI.setup_anndata(tiny, batch_key="batch")
    model = SCVI(tiny, n_latent=4)
    model.train(max_epochs=2, progress_bar=False)
    torch.manual_seed(0)
    first = model.get_normalized_expression()
    kept = first.to_numpy().copy()
    torch.manual_seed(1)  # another draw of z: other values, written while ``first`` is alive
    second = model.get_normalized_expression(return_numpy=True)
    assert not np.array_equal(second, kept)
    np.testing.assert_array_equal(first.to_numpy(), kept)
    del second
    torch.manual_seed(0)  # the same draw, into the memory ``second`` freed
    third = model.get_normalized_expression(return_numpy=True)
    np.testing.assert_array_equal(third, kept)
    np.testing.assert_array_equal(first.to_numpy(), kept)
