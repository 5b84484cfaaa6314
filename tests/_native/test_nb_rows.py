"""The compiled NB/ZINB kernel equals the plain float64 formula, and cellvi works without it."""

import ctypes

import numpy as np
import pytest
import torch

import cellvi
from cellvi import _native
from cellvi.distributions import _rowsum, log_nb_positive, log_zinb_positive, nb_log_prob_rows

needs_kernel = pytest.mark.skipif(
    _native.library() is None, reason=f"native kernels: {_native.status()}"
)


def _inputs(seed, n=40, g=203, samples=None, theta_kind="gene"):
    """float64 inputs spanning the hard cases; g is not a multiple of the vector width."""
    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    lead = (samples, n) if samples else (n,)
    mu = torch.exp(torch.randn(*lead, g, generator=gen, dtype=dt) * 3)  # ~1e-4 .. 1e4
    base = mu if not samples else mu[0]
    x = torch.poisson(base, generator=gen) * (torch.rand(n, g, generator=gen, dtype=dt) < 0.5)
    x[0, :6] = torch.tensor([0.0, 1.0, 20000.0, 50000.0, 3.0, 16.0], dtype=dt)
    x[1, :5] = torch.tensor([2.5, 0.25, 17.0, 64.0, 65.0], dtype=dt)  # non-integer, the sums' edges
    shape = {"gene": (g,), "cell": (n, g), "sample": (*lead, g)}[theta_kind]
    theta = torch.exp(torch.empty(shape, dtype=dt).uniform_(-9.2, 13.8, generator=gen))
    zi = torch.randn(*lead, g, generator=gen, dtype=dt) * 4
    return x, mu, theta, zi


def _reference(x, mu, theta, zi):
    if zi is None:
        return log_nb_positive(x, mu, theta).sum(-1)
    return log_zinb_positive(x, mu, theta, zi).sum(-1)


def _check(x, mu, theta, zi, weights=None):
    params64 = [t.clone().requires_grad_() for t in (mu, theta)]
    params64 += [] if zi is None else [zi.clone().requires_grad_()]
    ref = _reference(x, *params64[:2], None if zi is None else params64[2])
    params32 = [t.detach().float().requires_grad_() for t in params64]
    fast = nb_log_prob_rows(x.float(), *params32[:2], None if zi is None else params32[2])
    assert fast.dtype == torch.float32 and fast.shape == ref.shape
    # each row sum is accurate to float32 rounding of its largest terms
    scale = (_reference(x, mu, theta, None if zi is None else zi).abs() + 1).detach()
    assert ((fast.double() - ref.detach()).abs() / scale).max() < 2e-6
    w = torch.ones_like(ref) if weights is None else weights
    g_ref = torch.autograd.grad((ref * w).sum(), params64)
    g_fast = torch.autograd.grad((fast * w.float()).sum(), params32)
    for a, b in zip(g_fast, g_ref):
        assert torch.isfinite(a).all()
        err = (a.double() - b).abs() / (b.abs() + 1e-3 * b.abs().max() + 1e-12)
        assert err.max() < 1e-3, err.max()
    return fast


@needs_kernel
@pytest.mark.parametrize("zero_inflated", [False, True])
@pytest.mark.parametrize("theta_kind", ["gene", "cell"])
def test_kernel_matches_float64_formula(zero_inflated, theta_kind):
    x, mu, theta, zi = _inputs(0, theta_kind=theta_kind)
    _check(x, mu, theta, zi if zero_inflated else None)


@needs_kernel
@pytest.mark.parametrize("theta_kind", ["gene", "cell", "sample"])
def test_kernel_with_monte_carlo_samples(theta_kind):
    x, mu, theta, zi = _inputs(1, n=12, g=37, samples=3, theta_kind=theta_kind)
    weights = torch.rand(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    out = _check(x, mu, theta, zi, weights)
    assert out.shape == (3, 12)


@needs_kernel
def test_kernel_stable_where_zero_probability_underflows():
    x, mu, theta, zi = _inputs(3, n=6, g=40)
    theta = theta.clamp(1e-2, 1e3)
    mu[2, :3], theta[:3], zi[2, :3], x[2, :3] = 1e6, 10.0, -120.0, 0.0  # log p0 ~ -110
    zi[3, :2], x[3, :2] = 200.0, 0.0  # sigmoid(zi) = 1 in float32
    _check(x, mu, theta, zi)


@needs_kernel
def test_kernel_reads_strided_rows_and_given_nonzero_out_of_order():
    x, mu, theta, zi = _inputs(4, n=16, g=50)
    x32, mu32, th32 = x.float(), mu.float(), theta.float()
    head = torch.cat([torch.randn(16, 50), zi.float()], dim=1)  # zi as the second half of a head
    zi_view = head[:, 50:]
    assert not zi_view.is_contiguous()
    expected = nb_log_prob_rows(x32, mu32, th32, zi_view.contiguous())
    torch.testing.assert_close(nb_log_prob_rows(x32, mu32, th32, zi_view), expected)
    nonzero = torch.stack(torch.nonzero(x32, as_tuple=True))
    shuffled = nonzero[:, torch.randperm(nonzero.shape[1])]
    torch.testing.assert_close(nb_log_prob_rows(x32, mu32, th32, zi_view, shuffled), expected)
    torch.testing.assert_close(
        nb_log_prob_rows(x32.to_sparse_csr(), mu32, th32, zi_view), expected)


@needs_kernel
def test_kernel_no_gradient_path_and_torch_path_agree():
    x, mu, theta, zi = _inputs(5, n=64, g=300)
    args = (x.float(), mu.float(), theta.float(), zi.float())
    with_grad = nb_log_prob_rows(*args[:1], args[1].requires_grad_(), *args[2:])
    with torch.no_grad():
        without = nb_log_prob_rows(*args)
    torch.testing.assert_close(without, with_grad.detach())
    old = cellvi.settings.kernels
    try:
        cellvi.settings.kernels = "torch"
        torch_path = nb_log_prob_rows(*args)
    finally:
        cellvi.settings.kernels = old
    ref = _reference(x, mu, theta, zi)
    # the kernel is at least as close to the float64 formula as the torch float32 path
    err_native = (without.double() - ref).abs().max()
    err_torch = (torch_path.double() - ref).abs().max()
    assert err_native <= err_torch + 1e-3


@needs_kernel
def test_model_loss_is_the_same_with_and_without_the_kernel(tiny):
    from cellvi.data import CellData
    from cellvi.model import SCVI

    SCVI.setup_anndata(tiny, batch_key="batch")
    model = SCVI(tiny)
    batch = CellData(tiny, model.summary).batch(np.arange(128), sparse=True)
    module = model.module
    module.train()
    results = {}
    old = cellvi.settings.kernels
    try:
        for mode in ("torch", "auto"):
            cellvi.settings.kernels = mode
            torch.manual_seed(0)  # the same dropout masks and posterior samples
            _, _, out = module(batch, kl_weight=0.5)
            grads = torch.autograd.grad(out.loss, list(module.parameters()), allow_unused=True)
            results[mode] = (out.reconstruction_loss.detach(), grads)
    finally:
        cellvi.settings.kernels = old
    (r_torch, g_torch), (r_native, g_native) = results["torch"], results["auto"]
    torch.testing.assert_close(r_native, r_torch, rtol=1e-5, atol=1e-3)
    for a, b in zip(g_native, g_torch):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()) + 1e-6)


def test_without_a_compiler_the_torch_code_is_used(monkeypatch, tmp_path):
    monkeypatch.setattr(_native, "_compilers", lambda: [])
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setenv("CELLVI_CACHE_DIR", str(tmp_path))
    assert _native.library() is None
    assert "no C compiler" in _native.status()
    x, mu, theta, zi = _inputs(6, n=8, g=30)
    out = nb_log_prob_rows(x.float(), mu.float(), theta.float(), zi.float())
    ref = _reference(x, mu, theta, zi)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=0.5)
    assert not _rowsum._native_ok(mu.float(), theta.float(), zi.float())


@pytest.mark.parametrize("openmp", [True, False])
def test_compiles_into_the_cache_directory(monkeypatch, tmp_path, openmp):
    if not _native._compilers():
        pytest.skip("no C compiler")
    x, mu, theta, zi = _inputs(8, n=30, g=70)
    args = (x.float(), mu.float(), theta.float(), zi.float())
    expected = nb_log_prob_rows(*args)
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_lib", None)
    monkeypatch.setattr(_native, "_torch_uses_libgomp", lambda: openmp)
    monkeypatch.setenv("CELLVI_CACHE_DIR", str(tmp_path))
    lib = _native.library()
    assert lib is not None
    built = list(tmp_path.glob("cellvi_native_*.so"))
    assert len(built) == 1 and list(tmp_path.iterdir()) == built  # no half-written file left
    assert str(built[0]) in _native.status()
    torch.testing.assert_close(nb_log_prob_rows(*args), expected)  # single-threaded build too


def test_allocator_tuning_applies_once_and_can_be_switched_off(monkeypatch):
    monkeypatch.setattr(_native, "_allocator_tuned", False)
    monkeypatch.setattr(cellvi.settings, "memory_allocator", "system")
    assert _native.tune_allocator() is False
    monkeypatch.setattr(cellvi.settings, "memory_allocator", "tuned")
    import sys

    applied = _native.tune_allocator()
    if sys.platform.startswith("linux"):
        import platform

        assert applied == (platform.libc_ver()[0] == "glibc")
    assert _native.tune_allocator() is applied


@needs_kernel
def test_csr_matmul_equals_dense_product():
    gen = torch.Generator().manual_seed(9)
    a = torch.rand(50, 70, generator=gen) * (torch.rand(50, 70, generator=gen) < 0.1)
    a[3] = 0.0  # an empty row
    b = torch.randn(70, 33, generator=gen)
    csr = a.to_sparse_csr()
    out = _native.csr_matmul(csr.crow_indices(), csr.col_indices(), csr.values(), b)
    torch.testing.assert_close(out, a @ b, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_kernel_propagates_nan():
    x, mu, theta, zi = _inputs(7, n=4, g=40)
    mu = mu.float()
    mu[1, 5] = float("nan")
    out = nb_log_prob_rows(x.float(), mu, theta.float(), zi.float())
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2, 3]]).all()


@needs_kernel
@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_gather_rows_matches_scipy(index_dtype):
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    dense = rng.poisson(0.3, (60, 45)).astype(np.float32)
    dense[5] = 0.0  # an empty row
    X = sp.csr_matrix(dense)
    X.data[::7] = 0.0  # explicit zeros stored in the matrix are not entries
    X.indptr, X.indices = X.indptr.astype(index_dtype), X.indices.astype(index_dtype)
    idx = np.array([5, 0, 17, 17, 59, 3])  # any order, repeats allowed
    out = _native.gather_rows(X, idx, rows=True, transpose=True)
    sub = X[idx]
    sub.eliminate_zeros()
    np.testing.assert_array_equal(out["crow"], sub.indptr)
    np.testing.assert_array_equal(out["cols"], sub.indices)
    np.testing.assert_array_equal(out["vals"], sub.data)
    expected_rows = np.repeat(np.arange(len(idx)), np.diff(sub.indptr))
    np.testing.assert_array_equal(out["rows"], expected_rows)
    t = sub.tocsc()
    np.testing.assert_array_equal(out["tcrow"], t.indptr)
    np.testing.assert_array_equal(out["tcols"], t.indices)
    np.testing.assert_array_equal(out["tvals"], t.data)
    assert _native.gather_rows(X.astype(np.float64), idx, rows=False, transpose=False) is None


def test_batches_are_the_same_with_and_without_the_kernels(tiny, monkeypatch):
    from cellvi import keys
    from cellvi.data import CellData
    from cellvi.model import SCVI

    SCVI.setup_anndata(tiny, batch_key="batch")
    data = CellData(tiny, SCVI(tiny).summary)
    idx = np.array([7, 3, 150, 4, 99])
    batches = {}
    for mode in ("torch", "auto"):
        monkeypatch.setattr(cellvi.settings, "kernels", mode)
        batches[mode] = data.batch(idx, sparse=True)
    for key in (keys.X, keys.X_T):
        torch.testing.assert_close(
            batches["auto"][key].to_dense(), batches["torch"][key].to_dense())
    torch.testing.assert_close(batches["auto"][keys.INDICES_NONZERO],
                               batches["torch"][keys.INDICES_NONZERO])


@needs_kernel
@pytest.mark.parametrize("zero_inflated", [False, True])
@pytest.mark.parametrize("theta_kind", ["gene", "cell", "sample"])
@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_likelihood_from_logits_equals_softmax_rate_then_rows(zero_inflated, theta_kind, layout):
    from cellvi.distributions import nb_log_prob_rows_softmax
    from cellvi.nn._rate import softmax_rate

    x, _, theta, zi = _inputs(7, n=33, g=203, samples=3, theta_kind=theta_kind)
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(3, 33, 203, generator=gen) * 3  # float32
    logits[0, 0, :] = -120.0  # a row whose softmax is flat
    logits[1, 2, 5] = 60.0  # one gene takes nearly everything: others fall to the floor
    library = torch.randn(3, 33, 1, generator=gen) + 7
    x32, theta32 = x.float(), theta.float()
    zi32 = zi.float() if zero_inflated else None
    if layout == "csr":
        x32 = x32.to_sparse_csr()
    floor = 1e-8
    fused = nb_log_prob_rows_softmax(x32, logits, library, floor, theta32, zi32)
    rate = softmax_rate(logits, library, floor)[1]
    composed = nb_log_prob_rows(x32, rate, theta32, zi32)
    assert fused.shape == (3, 33)
    torch.testing.assert_close(fused, composed, rtol=1e-6, atol=1e-4)
    # and the float64 formula at the same expected counts
    rate64 = library.double().exp() * logits.double().softmax(-1) + floor
    ref = _reference(x, rate64, theta, None if zi32 is None else zi)
    scale = ref.abs() + 1
    assert ((fused.double() - ref).abs() / scale).max() < 1e-5


@needs_kernel
def test_marginal_ll_is_the_same_with_and_without_the_kernels(tiny):
    from cellvi.model import SCVI

    SCVI.setup_anndata(tiny, batch_key="batch")
    results = {}
    for gene_likelihood in ("zinb", "nb"):
        model = SCVI(tiny, gene_likelihood=gene_likelihood, dispersion="gene-batch",
                     use_observed_lib_size=False)
        old = cellvi.settings.kernels
        try:
            for mode in ("torch", "auto"):
                cellvi.settings.kernels = mode
                torch.manual_seed(0)  # the same posterior samples
                results[mode] = model.get_marginal_ll(n_mc_samples=30, return_mean=False)
        finally:
            cellvi.settings.kernels = old
        np.testing.assert_allclose(results["auto"], results["torch"], rtol=2e-5)


@needs_kernel
@pytest.mark.parametrize("zero_inflated", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])  # 2: rows split, per-thread theta sums
def test_training_kernel_equals_softmax_rate_rows_and_autograd(zero_inflated, n_threads,
                                                               monkeypatch):
    from cellvi.distributions._rowsum import nb_log_prob_rows_softmax_grad
    from cellvi.nn._rate import softmax_rate

    n = 37 if n_threads == 1 else 400  # the kernels use threads from 65,536 entries
    monkeypatch.setattr(torch, "get_num_threads", lambda: n_threads)
    x, _, theta, zi = _inputs(11, n=n, g=203)  # hard counts, theta 1e-4 .. 1e6 per gene
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(n, 203, generator=gen) * 3
    logits[0, :] = -120.0  # a flat row
    logits[2, 5] = 60.0  # one gene takes nearly everything: the others fall to the floor
    library = torch.randn(n, 1, generator=gen) + 7
    weights = torch.rand(n, generator=gen) - 0.5
    x32 = x.float().to_sparse_csr()
    params = [logits.clone().requires_grad_(), theta.float().requires_grad_()]
    if zero_inflated:
        params.append(zi.float().requires_grad_())
    rate = softmax_rate(params[0], library, 1e-8)[1]
    composed = nb_log_prob_rows(x32, rate, params[1], params[2] if zero_inflated else None)
    grads = torch.autograd.grad((composed * weights).sum(), params)

    out, d_logits, d_zi, d_theta = nb_log_prob_rows_softmax_grad(
        x32, logits, library, 1e-8, theta.float(), zi.float() if zero_inflated else None,
        weights)
    torch.testing.assert_close(out, composed.detach(), rtol=1e-6, atol=1e-4)
    assert (d_zi is None) == (not zero_inflated)
    for got, ref in zip([d_logits, d_theta] + ([d_zi] if zero_inflated else []), grads):
        assert torch.isfinite(got).all()
        err = (got - ref).abs() / (ref.abs() + 1e-3 * ref.abs().max() + 1e-12)
        assert err.max() < 1e-4, err.max()


def test_the_c_interface_is_declared_once_in_the_c_source():
    """Every kernel called from Python has its ctypes signature read from its C definition."""
    import re
    from pathlib import Path

    import cellvi
    from cellvi import _native

    root = Path(cellvi.__file__).parent
    source = (root / "_native" / "nb_rows.c").read_text()
    sigs = _native.signatures(source)
    called = set()
    for path in root.rglob("*.py"):
        called |= set(re.findall(r"\.(cellvi_\w+)\(", path.read_text()))
    assert called and called <= set(sigs)
    restype, argtypes = sigs["cellvi_gather_rows"]
    assert restype is ctypes.c_int64 and argtypes[4] is ctypes.c_int and len(argtypes) == 14
    lib = _native.library()
    if lib is not None:
        assert lib.cellvi_softmax.argtypes == sigs["cellvi_softmax"][1]
