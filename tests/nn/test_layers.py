import torch

from cellvi.nn import CovariateLinear, FCLayers


def test_covariate_linear_equals_linear_on_one_hot():
    torch.manual_seed(0)
    layer = CovariateLinear(5, 4, [3, 1, 2])
    x = torch.randn(8, 5)
    c1, c2, c3 = torch.randint(0, 3, (8, 1)), torch.zeros(8, 1), torch.randint(0, 2, (8, 1))
    onehot = torch.cat([x, torch.nn.functional.one_hot(c1.view(-1), 3),
                        torch.nn.functional.one_hot(c3.view(-1).long(), 2)], dim=1).float()
    w = torch.cat([layer.linear.weight, layer.cat_weights[0].T, layer.cat_weights[1].T], dim=1)
    expected = onehot @ w.T + layer.linear.bias
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
