"""Fully connected layers with categorical covariates injected as one-hot inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class CovariateLinear(nn.Module):
    r"""Affine map of ``x`` concatenated with the one-hot codes of categorical covariates.

    Computes :math:`W [x; \mathrm{onehot}(c_1); \dots; \mathrm{onehot}(c_K)] + b` without ever
    building the one-hot matrix: the covariate block of :math:`W` is stored as one
    ``(n_cat, n_out)`` table per covariate, and a row lookup replaces the product with a one-hot
    vector. The function computed is exactly that of the concatenated layer.

    Parameters
    ----------
    n_in
        Width of ``x``.
    n_out
        Width of the output.
    n_cat_list
        Number of categories of each covariate; covariates with one category or fewer are ignored.
    bias
        Whether to add a bias.
    """

    def __init__(
        self, n_in: int, n_out: int, n_cat_list: Sequence[int] = (), *, bias: bool = True
    ):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out, bias=bias)
        self.n_cat_list = [int(n) if n > 1 else 0 for n in n_cat_list]
        bound = 1.0 / (n_in + sum(self.n_cat_list)) ** 0.5
        self.cat_weights = nn.ParameterList(
            nn.Parameter(torch.empty(n, n_out).uniform_(-bound, bound))
            for n in self.n_cat_list
            if n > 0
        )

    def forward(self, x: torch.Tensor, *cats: torch.Tensor) -> torch.Tensor:
        """Apply the layer; ``cats`` are integer codes of shape ``(cells, 1)`` or ``(cells,)``."""
        out = self.linear(x)  # (..., cells, n_out)
        weights = iter(self.cat_weights)
        for n_cat, cat in zip(self.n_cat_list, cats):
            if n_cat == 0:
                continue
            out = out + next(weights)[cat.reshape(-1).long()]  # broadcast over leading sample dim
        return out


class FCLayers(nn.Module):
    """A stack of fully connected layers: linear -> norm -> ReLU -> dropout.

    Categorical covariates enter the first layer as one-hot codes, and every later layer too when
    ``inject_covariates`` is true.

    Parameters
    ----------
    n_in
        Input width.
    n_out
        Output width.
    n_cat_list
        Number of categories of each categorical covariate, in the order they are passed.
    n_layers
        Number of layers.
    n_hidden
        Width of the hidden layers.
    dropout_rate
        Dropout probability after each layer.
    use_batch_norm
        Batch normalisation after each linear map (momentum 0.01, eps 1e-3).
    use_layer_norm
        Layer normalisation (without affine parameters) after each linear map.
    use_activation
        Whether to apply the activation.
    bias
        Whether the linear maps have a bias.
    inject_covariates
        Inject covariates into every layer, not only the first.
    activation_fn
        Activation module class.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_cat_list: Sequence[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        use_activation: bool = True,
        bias: bool = True,
        inject_covariates: bool = True,
        activation_fn: type[nn.Module] = nn.ReLU,
    ):
        super().__init__()
        n_cat_list = list(n_cat_list or [])
        widths = [n_in] + [n_hidden] * (n_layers - 1) + [n_out]
        self.linears = nn.ModuleList()
        self.posts = nn.ModuleList()
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            cats = n_cat_list if (i == 0 or inject_covariates) else []
            self.linears.append(CovariateLinear(a, b, cats, bias=bias))
            post = []
            if use_batch_norm:
                post.append(nn.BatchNorm1d(b, momentum=0.01, eps=1e-3))
            if use_layer_norm:
                post.append(nn.LayerNorm(b, elementwise_affine=False))
            if use_activation:
                post.append(activation_fn())
            if dropout_rate > 0:
                post.append(nn.Dropout(p=dropout_rate))
            self.posts.append(nn.Sequential(*post))

    def forward(self, x: torch.Tensor, *cats: torch.Tensor) -> torch.Tensor:
        """Map ``x`` of shape ``(..., cells, n_in)`` to ``(..., cells, n_out)``."""
        for linear, post in zip(self.linears, self.posts):
            x = linear(x, *cats)
            if x.dim() == 3 and any(isinstance(m, nn.BatchNorm1d) for m in post):
                # batch norm over the cells of each Monte Carlo sample
                s, n, h = x.shape
                x = post(x.reshape(s * n, h)).reshape(s, n, h)
            else:
                x = post(x)
        return x
