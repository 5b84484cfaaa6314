"""Fully connected layers with categorical covariates injected as one-hot inputs."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from cellvi import _native

# torch flags its whole CSR API as beta; the few operations used here are long-standing
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


class SparseRows(NamedTuple):
    r"""Sparse input rows for a first layer, with what the weight gradient needs.

    Attributes
    ----------
    x
        ``(cells, n_sparse)`` sparse CSR tensor.
    xt
        Its transpose, ``(n_sparse, cells)`` CSR with the same values, so that the weight
        gradient :math:`X^\top G` is one sparse-dense product; None when no gradient is needed.
    dense
        Optional ``(cells, n_dense)`` columns that follow the sparse ones (continuous
        covariates), or None.
    """

    x: torch.Tensor
    xt: torch.Tensor | None
    dense: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        n_dense = 0 if self.dense is None else self.dense.shape[-1]
        return torch.Size([self.x.shape[0], self.x.shape[1] + n_dense])

    def to_dense(self) -> torch.Tensor:
        """Return the rows as one dense ``(cells, n_sparse + n_dense)`` tensor."""
        x = self.x.to_dense()
        return x if self.dense is None else torch.cat([x, self.dense], dim=-1)


def csr_with_values(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Return a CSR tensor with the sparsity pattern of ``x`` and new ``values``."""
    return torch.sparse_csr_tensor(
        x.crow_indices(), x.col_indices(), values, x.shape, check_invariants=False
    )


class _SparseMatmul(torch.autograd.Function):
    r"""``X @ W`` for sparse CSR ``X`` (cells, n) and dense ``W`` (n, out), gradient for ``W`` only.

    Forward is a weighted row sum of ``W`` (``embedding_bag``: only the non-zero entries are
    touched); the gradient :math:`X^\top G` uses the transposed CSR, kept next to ``X``.
    """

    @staticmethod
    def forward(ctx, weight, x, xt):  # noqa: D102
        ctx.xt = xt
        return sparse_dense_mm(x, weight)  # (cells, out)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        if _native.usable(grad, ctx.xt.values()):
            xt = ctx.xt  # each weight row written once: no zero-fill and no copy
            return _native.csr_matmul(xt.crow_indices(), xt.col_indices(), xt.values(),
                                      grad), None, None
        return torch.sparse.mm(ctx.xt, grad), None, None  # (n, out)


def sparse_dense_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Return ``x @ weight`` for a sparse CSR ``x`` (cells, n) and a dense ``weight`` (n, out).

    ``embedding_bag`` over the non-zero entries (differentiable in ``weight``).
    """
    return nn.functional.embedding_bag(
        x.col_indices(), weight, x.crow_indices()[:-1], mode="sum",
        per_sample_weights=x.values())


class CovariateLinear(nn.Module):
    r"""Affine map of ``x`` concatenated with the one-hot codes of categorical covariates.

    Computes :math:`W [x; \mathrm{onehot}(c_1); \dots; \mathrm{onehot}(c_K)] + b` without ever
    building the one-hot matrix: the covariate block of :math:`W` is stored as one
    ``(n_cat, n_out)`` table per covariate, and a row lookup replaces the product with a one-hot
    vector. The function computed is exactly that of the concatenated layer. ``x`` may also be
    :class:`SparseRows` (a first layer on sparse counts), in which case only its non-zero entries
    are touched, forward and backward.

    The weight is stored as ``(n_in, n_out)``, so that the rows of one input feature are
    contiguous (what the sparse product reads); it is initialised as the concatenated
    ``torch.nn.Linear(n_in + sum(n_cat_list), n_out)`` would be, then split.

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
        self.n_cat_list = [int(n) if n > 1 else 0 for n in n_cat_list]
        # the concatenated layer's own initialisation (fan-in n_in + all categories), split
        init = nn.Linear(n_in + sum(self.n_cat_list), n_out, bias=bias)
        full = init.weight.detach()  # (n_out, n_in + n_cat)
        self.weight = nn.Parameter(full[:, :n_in].t().contiguous())  # (n_in, n_out)
        self.bias = None if init.bias is None else nn.Parameter(init.bias.detach().clone())
        starts = n_in + np.cumsum([0, *self.n_cat_list[:-1]]).astype(int)
        self.cat_weights = nn.ParameterList(
            nn.Parameter(full[:, a : a + n].t().contiguous())  # (n_cat, n_out)
            for a, n in zip(starts, self.n_cat_list)
            if n > 0
        )

    def forward(self, x: torch.Tensor | SparseRows, *cats: torch.Tensor) -> torch.Tensor:
        """Apply the layer; ``cats`` are integer codes of shape ``(cells, 1)`` or ``(cells,)``."""
        if isinstance(x, SparseRows):
            n_sparse = x.x.shape[1]
            # the whole weight when there are no dense columns: a slice would cost a zero-filled
            # copy of the weight's gradient in the backward pass
            w = self.weight if n_sparse == self.weight.shape[0] else self.weight[:n_sparse]
            if x.xt is None:  # no transpose: embedding_bag's own (slower) weight gradient
                out = sparse_dense_mm(x.x, w)
            else:
                out = _SparseMatmul.apply(w, x.x, x.xt)  # (cells, n_out)
            if x.dense is not None:
                out = out + x.dense @ self.weight[n_sparse:]
            if self.bias is not None:
                out = out + self.bias
        elif x.dim() == 2 and self.bias is not None:
            out = torch.addmm(self.bias, x, self.weight)  # (cells, n_out)
        else:
            out = x @ self.weight  # (..., cells, n_out)
            if self.bias is not None:
                out = out + self.bias
        return self.add_covariates(out, cats)

    def add_covariates(self, out: torch.Tensor, cats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Return ``out`` plus the covariate tables' rows of ``cats`` (the one-hot products)."""
        weights = iter(self.cat_weights)
        for n_cat, cat in zip(self.n_cat_list, cats):
            if n_cat == 0:
                continue
            out = out + next(weights)[cat.reshape(-1).long()]  # broadcast over leading sample dim
        return out


class Dropout(nn.Dropout):
    """:class:`torch.nn.Dropout` with the keep-mask drawn as ``uniform >= p``.

    The same distribution as ``torch.nn.Dropout`` (each entry kept with probability ``1 - p``
    and scaled by ``1 / (1 - p)``); on the CPU, a uniform draw and a comparison cost about a
    third less than the ``bernoulli_`` draw it replaces (forward and backward together).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if self.p == 1:
            return x * 0.0
        return x * self.keep_mask(x)

    def keep_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Draw the mask that training multiplies ``x`` by: 0 or ``1 / (1 - p)`` per entry."""
        return torch.empty_like(x).uniform_().ge_(self.p).mul_(1.0 / (1.0 - self.p))


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
                post.append(Dropout(p=dropout_rate))
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
