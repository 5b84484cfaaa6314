import pytest
import torch

from cellvi.nn import CovariateLinear, DecoderSCVI, FCLayers, SparseRows
from cellvi.nn._layers import Dropout


def test_covariate_linear_equals_linear_on_one_hot():
    torch.manual_seed(0)
    layer = CovariateLinear(5, 4, [3, 1, 2])
    x = torch.randn(8, 5)
    c1, c2, c3 = torch.randint(0, 3, (8, 1)), torch.zeros(8, 1), torch.randint(0, 2, (8, 1))
    onehot = torch.cat([x, torch.nn.functional.one_hot(c1.view(-1), 3),
                        torch.nn.functional.one_hot(c3.view(-1).long(), 2)], dim=1).float()
    w = torch.cat([layer.weight, layer.cat_weights[0], layer.cat_weights[1]], dim=0)
    expected = onehot @ w + layer.bias
    torch.testing.assert_close(layer(x, c1, c2, c3), expected)


def test_fclayers_injects_covariates_deeply_or_not():
    deep = FCLayers(5, 4, n_cat_list=[3], n_layers=3, n_hidden=6, inject_covariates=True)
    shallow = FCLayers(5, 4, n_cat_list=[3], n_layers=3, n_hidden=6, inject_covariates=False)
    assert sum(len(lin.cat_weights) for lin in deep.linears) == 3
    assert sum(len(lin.cat_weights) for lin in shallow.linears) == 1
    out = deep.eval()(torch.randn(7, 5), torch.randint(0, 3, (7, 1)))
    assert out.shape == (7, 4)
    out3 = deep(torch.randn(2, 7, 5), torch.randint(0, 3, (7, 1)))  # Monte Carlo samples
    assert out3.shape == (2, 7, 4)


def _csr(dense):
    return dense.to_sparse_csr()


@pytest.mark.parametrize("n_dense", [0, 2])
def test_sparse_rows_give_the_dense_layer_and_its_gradients(n_dense):
    torch.manual_seed(0)
    layer = CovariateLinear(30 + n_dense, 6, [3]).double()
    x = torch.poisson(torch.full((9, 30), 0.3, dtype=torch.float64))
    x[4] = 0  # a cell with no counts is an empty row
    cont = torch.randn(9, n_dense, dtype=torch.float64) if n_dense else None
    cats = torch.randint(0, 3, (9, 1))
    rows = SparseRows(_csr(x), _csr(x.t().contiguous()), cont)
    assert rows.shape == (9, 30 + n_dense)
    dense_in = rows.to_dense()
    out_sparse = layer(rows, cats)
    g = torch.randn_like(out_sparse)
    grads_sparse = torch.autograd.grad(out_sparse, [layer.weight, layer.bias], g)
    out_dense = layer(dense_in, cats)
    grads_dense = torch.autograd.grad(out_dense, [layer.weight, layer.bias], g)
    torch.testing.assert_close(out_sparse, out_dense)
    for a, b in zip(grads_sparse, grads_dense):
        torch.testing.assert_close(a, b)


def test_covariate_linear_starts_as_the_concatenated_linear_layer():
    torch.manual_seed(3)
    layer = CovariateLinear(7, 5, [3, 1, 2])  # the one-category covariate is ignored
    torch.manual_seed(3)
    ref = torch.nn.Linear(7 + 3 + 2, 5)
    torch.testing.assert_close(layer.weight, ref.weight[:, :7].t())
    torch.testing.assert_close(layer.cat_weights[0], ref.weight[:, 7:10].t())
    torch.testing.assert_close(layer.cat_weights[1], ref.weight[:, 10:12].t())
    torch.testing.assert_close(layer.bias, ref.bias)


def test_dropout_keeps_entries_with_probability_one_minus_p_and_rescales():
    torch.manual_seed(0)
    layer = Dropout(p=0.25)
    x = torch.ones(400, 500, requires_grad=True)
    y = layer(x)
    kept = y != 0
    # kept entries are scaled by 1 / (1 - p); the kept fraction is 0.75 within 4 sd
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.75))
    assert abs(kept.float().mean().item() - 0.75) < 4 * (0.75 * 0.25 / x.numel()) ** 0.5
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient is the same mask
    layer.eval()
    assert torch.equal(layer(x), x)
    assert torch.equal(Dropout(p=1.0)(x), torch.zeros_like(x))


def test_decoder_reads_a_state_dict_with_the_former_fused_head():
    decoder = DecoderSCVI(4, 7, n_hidden=5)
    state = decoder.state_dict()
    fused = {k: v for k, v in state.items() if "px_scale_decoder" not in k
             and "px_dropout_decoder" not in k}
    for name in ("weight", "bias"):
        fused[f"scale_dropout.{name}"] = torch.cat(
            [state[f"px_scale_decoder.{name}"], state[f"px_dropout_decoder.{name}"]])
    other = DecoderSCVI(4, 7, n_hidden=5)
    other.load_state_dict(fused)
    for k, v in state.items():
        assert torch.equal(other.state_dict()[k], v), k
