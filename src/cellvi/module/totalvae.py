r"""totalVI: RNA and surface proteins of the same cells (CITE-seq) in one latent space.

Gayoso, Steier et al., Nature Methods 2021. For cell :math:`n` in batch :math:`s_n` with RNA
counts :math:`x_n` (genes :math:`g`) and protein counts :math:`y_n` (proteins :math:`t`):

.. math::

    z_n \sim \mathcal N(0, I), \qquad
    \ell_n \text{ observed (the RNA total) or } \sim \mathrm{LogNormal}(\mu_{s_n}, \sigma^2_{s_n}),
    \\
    \rho_n = f_\rho(z_n, s_n) \in \Delta^{G-1}, \qquad
    x_{ng} \sim \mathrm{NB}(\ell_n \rho_{ng}, \theta_g) \text{ (or ZINB)}, \\
    \log \beta_{nt} \sim \mathcal N(c_{t s_n}, d^2_{t s_n}), \qquad
    \alpha_{nt} = 1 + \mathrm{relu}(f_\alpha(z_n, s_n))_t > 1, \qquad
    \pi_{nt} = \sigma(f_\pi(z_n, s_n))_t, \\
    y_{nt} \sim \pi_{nt}\, \mathrm{NB}(e_{t s_n} \beta_{nt}, \phi_t)
        + (1 - \pi_{nt})\, \mathrm{NB}(e_{t s_n} \alpha_{nt} \beta_{nt}, \phi_t).

:math:`\beta` is the protein *background* (ambient antibodies, unspecific binding), with a
prior per protein and batch (:math:`c, d`, learned; started from an empirical fit by the
model), :math:`\alpha\beta` the *foreground* (the antibody on its epitope), :math:`\pi` the
probability that a count is background, and :math:`e_{ts} > 0` a per-batch capture efficiency
of each protein (scvi-tools 1.x's ``log_per_batch_efficiency``, with a LogNormal(0, 1)
penalty). :math:`\mathrm{NB}(\mu, \theta)` has mean :math:`\mu` and inverse dispersion
:math:`\theta`; the mixture's density is :func:`cellvi.distributions.log_mixture_nb`.

Inference: one encoder reads :math:`\log(1 + x / (1 + \bar x))` and
:math:`\log(1 + y / (1 + \bar y))` (each cell's counts over its own mean count, then logged;
``log_variational``) with the batch, and gives a diagonal Normal :math:`q(z \mid x, y)`; a
second one :math:`q(\ell \mid x, y)` when the library is modelled; the decoder gives
:math:`q(\log\beta \mid z) = \mathcal N(a(z), b(z)^2)`. The loss is the negative ELBO,

.. math::

    -\log p(x \mid z, \ell) - w \log p(y \mid z, \beta)
    + w\,\mathrm{KL}(q(z) \| p(z)) + \mathrm{KL}(q(\ell) \| p(\ell))
    + w \big[\mathrm{KL}(q(\log\beta) \| p(\log\beta))
    - \textstyle\sum_t \log \mathrm{LogNormal}(e_{t s_n} \mid 0, 1)
    - 10^{-3} \sum_t \log \pi_{nt}\big],

with :math:`w` the KL warm-up weight (which, as in scvi-tools 1.4.2, also scales the protein
likelihood). The last two terms are the regularisers scvi-tools adds (the efficiency prior and
a slight pull towards background); they are reported inside the KL so that the ELBO here is
the number scvi-tools reports. Proteins that are missing from a batch (all zero in it) leave
that batch's protein likelihood and background KL (``protein_batch_mask``).

The gene side is the scVI VAE's (:mod:`cellvi.module.vae`): sparse counts enter the first
encoder layer without being densified, and the gene likelihood sums the Gamma-function terms
over the non-zero counts only (:func:`cellvi.distributions.log_prob_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.distributions import Distribution, Normal, kl_divergence

from cellvi import _native, keys
from cellvi.distributions import (
    NegativeBinomialMixture,
    StandardNormal,
    log_mixture_nb,
    log_prob_rows,
    nb_log_prob_rows_softmax,
)
from cellvi.distributions._rowsum import nb_log_prob_rows_softmax_grad
from cellvi.nn import CovariateLinear, Encoder, FCLayers, SparseRows, csr_with_values
from cellvi.nn._layers import sparse_dense_mm
from cellvi.nn._rate import softmax_rate

from ._base import RATE_FLOOR, LossOutput, covariate_codes, row_sums
from ._config import (
    ConfiguredModule,
    ModuleConfig,
    check_choice,
    check_library_prior,
    plain_values,
)
from .vae import count_distribution

__all__ = ["PROTEIN_KEY", "DecoderTOTALVI", "TOTALVAE", "TOTALVAEConfig"]

Tensors = dict[str, torch.Tensor]
NormOption = Literal["encoder", "decoder", "none", "both"]

#: Key of the protein counts in a minibatch (and of their field in the data set-up).
PROTEIN_KEY = "protein_expression"
#: ``log(sqrt(2 pi))``: the constant of ``-log LogNormal(e | 0, 1)``.
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
#: Upper bound of the log background rate: exp(20) is 5e8 counts, far beyond any real
#: background, and keeps exp() finite if an optimiser step overshoots.
_MAX_LOG_BACKGROUND = 20.0


@dataclass(frozen=True, kw_only=True)
class TOTALVAEConfig(ModuleConfig):
    """Options of :class:`TOTALVAE` (totalVI).

    Attributes
    ----------
    n_input_genes
        Number of genes.
    n_input_proteins
        Number of proteins.
    n_batch
        Number of batches (0 or 1: no batch).
    n_labels
        Number of labels (used by the ``"*-label"`` dispersions).
    n_hidden
        Width of every hidden layer.
    n_latent
        Dimension of the latent space.
    n_layers_encoder, n_layers_decoder
        Hidden layers of the encoder (2, as in scvi-tools 1.x) and of each decoder stack (1).
    n_layers
        Seed 002's single option: when given, the hidden layers of both the encoder and the
        decoder.
    n_continuous_cov
        Number of continuous covariates (fed to the decoder, and to the encoder when
        ``encode_covariates``).
    n_cats_per_cov
        Number of categories of each extra categorical covariate.
    dropout_rate_decoder, dropout_rate_encoder
        Dropout rates.
    gene_dispersion
        ``"gene"`` (one inverse dispersion per gene), ``"gene-batch"`` or ``"gene-label"``.
    protein_dispersion
        ``"protein"``, ``"protein-batch"`` or ``"protein-label"``.
    log_variational
        Encode ``log(1 + x / (1 + mean))`` rather than ``x / (1 + mean)``.
    gene_likelihood
        ``"nb"`` or ``"zinb"``.
    latent_distribution
        ``"normal"`` or ``"ln"`` (logistic normal).
    protein_batch_mask
        ``(n_batch, n_proteins)`` booleans: whether each protein was measured in each batch.
        None: every protein everywhere. Unmeasured proteins leave the likelihood of that batch.
    encode_covariates
        Whether the encoders also see the batch and the covariates (True, as in scvi-tools).
    protein_background_prior_mean, protein_background_prior_scale
        ``(n_proteins, n_batch)`` start of the background prior's mean and scale (log counts).
        None: mean 3 and scale 1 (scvi-tools' random start). Both are learned.
    use_size_factor_key
        Scale the expected RNA counts by a user size factor (``tensors["size_factor"]``) instead
        of the library size; the gene scale is then a softplus (as in scvi-tools).
    use_observed_lib_size
        Use the observed RNA totals as the library size; otherwise it is a latent variable with
        a per-batch log-normal prior.
    library_log_means, library_log_vars
        ``(n_batch,)`` prior of the log library size, needed when it is modelled.
    use_batch_norm, use_layer_norm
        Where to normalise: ``"encoder"``, ``"decoder"``, ``"none"`` or ``"both"``.
    """

    n_input_genes: int
    n_input_proteins: int
    n_batch: int = 0
    n_labels: int = 0
    n_hidden: int = 256
    n_latent: int = 20
    n_layers_encoder: int = 2
    n_layers_decoder: int = 1
    n_layers: int | None = None
    n_continuous_cov: int = 0
    n_cats_per_cov: Sequence[int] | None = None
    dropout_rate_decoder: float = 0.2
    dropout_rate_encoder: float = 0.2
    gene_dispersion: Literal["gene", "gene-batch", "gene-label"] = "gene"
    protein_dispersion: Literal["protein", "protein-batch", "protein-label"] = "protein"
    log_variational: bool = True
    gene_likelihood: Literal["nb", "zinb"] = "nb"
    latent_distribution: Literal["normal", "ln"] = "normal"
    protein_batch_mask: Sequence[Sequence[bool]] | None = None
    encode_covariates: bool = True
    protein_background_prior_mean: Sequence[Sequence[float]] | None = None
    protein_background_prior_scale: Sequence[Sequence[float]] | None = None
    use_size_factor_key: bool = False
    use_observed_lib_size: bool = True
    library_log_means: Sequence[float] | None = None
    library_log_vars: Sequence[float] | None = None
    use_batch_norm: NormOption = "both"
    use_layer_norm: NormOption = "none"

    def __post_init__(self):
        check_choice("gene_dispersion", self.gene_dispersion, ("gene", "gene-batch", "gene-label"))
        check_choice("protein_dispersion", self.protein_dispersion,
                     ("protein", "protein-batch", "protein-label"))
        check_choice("gene_likelihood", self.gene_likelihood, ("nb", "zinb"))
        check_choice("latent_distribution", self.latent_distribution, ("normal", "ln"))
        for name in ("use_batch_norm", "use_layer_norm"):
            check_choice(name, getattr(self, name), ("encoder", "decoder", "none", "both"))
        if self.n_input_genes < 1 or self.n_input_proteins < 1:
            raise ValueError(
                f"totalVI needs genes and proteins, got n_input_genes={self.n_input_genes} and "
                f"n_input_proteins={self.n_input_proteins}."
            )
        if self.n_layers is not None:
            if self.n_layers < 1:
                raise ValueError(f"n_layers must be >= 1, got {self.n_layers}.")
            object.__setattr__(self, "n_layers_encoder", int(self.n_layers))
            object.__setattr__(self, "n_layers_decoder", int(self.n_layers))
        for name in ("gene-batch", "protein-batch"):
            if name in (self.gene_dispersion, self.protein_dispersion) and self.n_batch < 1:
                raise ValueError(f"dispersion {name!r} needs n_batch >= 1.")
        for name in ("gene-label", "protein-label"):
            if name in (self.gene_dispersion, self.protein_dispersion) and self.n_labels < 1:
                raise ValueError(f"dispersion {name!r} needs n_labels >= 1.")
        plain_values(self, n_cats_per_cov=int, library_log_means=float, library_log_vars=float)
        n_b, n_p = max(self.n_batch, 1), self.n_input_proteins
        _matrix_option(self, "protein_batch_mask", (n_b, n_p), bool)
        _matrix_option(self, "protein_background_prior_mean", (n_p, n_b), float)
        _matrix_option(self, "protein_background_prior_scale", (n_p, n_b), float)
        if (self.protein_background_prior_mean is None) != (
                self.protein_background_prior_scale is None):
            raise ValueError(
                "Give both protein_background_prior_mean and protein_background_prior_scale, "
                "or neither.")
        if self.protein_background_prior_scale is not None:
            scale = np.asarray(self.protein_background_prior_scale)
            if not np.all(np.isfinite(scale) & (scale > 0)):
                raise ValueError("protein_background_prior_scale must be finite and positive.")
            if not np.all(np.isfinite(self.protein_background_prior_mean)):
                raise ValueError("protein_background_prior_mean must be finite.")
        check_library_prior(self)

    @property
    def observed_library(self) -> bool:
        """Whether the RNA library size is observed (a size factor counts as observed)."""
        return self.use_size_factor_key or self.use_observed_lib_size


def _matrix_option(config: ModuleConfig, name: str, shape: tuple[int, int], kind) -> None:
    """Store a matrix option as a tuple of tuples of ``kind``, checking its shape."""
    value = getattr(config, name)
    if value is None:
        return
    arr = np.asarray(value, dtype=object if kind is bool else float)
    if arr.ndim == 1 and shape[1] == 1 and arr.shape[0] == shape[0]:
        arr = arr.reshape(shape)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}.")
    rows = tuple(tuple(kind(v) for v in row) for row in arr.tolist())
    object.__setattr__(config, name, rows)


class _SparseDenseMatmul(torch.autograd.Function):
    r"""``[X | D] @ W`` for CSR ``X`` (cells, n) and dense ``D`` (cells, k), gradient for ``W``.

    The forward is a weighted row sum of ``W[:n]`` over the non-zero entries plus ``D W[n:]``;
    the backward writes :math:`\bar W = [X^\top G; D^\top G]` into one ``(n + k, out)`` tensor,
    each row once (slicing the weight instead would zero-fill a full-size copy of its gradient
    twice per step).
    """

    @staticmethod
    def forward(ctx, weight, x, xt, dense):  # noqa: D102
        n = x.shape[1]
        out = sparse_dense_mm(x, weight[:n])  # (cells, out)
        out.addmm_(dense, weight[n:])
        ctx.xt, ctx.n = xt, n
        ctx.save_for_backward(dense)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        (dense,) = ctx.saved_tensors
        xt, n = ctx.xt, ctx.n
        grad = grad.contiguous()
        d_w = torch.empty(n + dense.shape[1], grad.shape[1], dtype=grad.dtype,
                          device=grad.device)
        if _native.usable(grad, xt.values()):
            crow = xt.crow_indices().to(torch.int64).contiguous()
            cols = xt.col_indices().to(torch.int64).contiguous()
            _native.library().cellvi_csr_matmul(
                n, grad.shape[1], _native.ptr(crow), _native.ptr(cols),
                _native.ptr(xt.values().contiguous()), _native.ptr(grad), _native.ptr(d_w),
                torch.get_num_threads())
        else:
            d_w[:n] = torch.sparse.mm(xt, grad)
        torch.mm(dense.t(), grad, out=d_w[n:])
        return d_w, None, None, None


class _OneHotCovariates(CovariateLinear):
    """:class:`~cellvi.nn.CovariateLinear` adding its covariate rows by one-hot products.

    The same parameters and function (``out + T[c]`` is ``out + onehot(c) T``, exactly); the
    gradient of a table is then one small product instead of an accumulating scatter, which
    on the CPU costs more than the layer's own matrix product for wide outputs (the genes).
    The layers of the totalVI module are switched to this class once built.
    """

    def add_covariates(self, out: torch.Tensor, cats) -> torch.Tensor:  # noqa: D102
        weights = iter(self.cat_weights)
        for n_cat, cat in zip(self.n_cat_list, cats):
            if n_cat == 0:
                continue
            table = next(weights)
            onehot = F.one_hot(cat.reshape(-1).long(), n_cat).to(table.dtype)  # (cells, n_cat)
            if out.dim() == 2:
                out = torch.addmm(out, onehot, table)
            else:
                out = out + onehot @ table  # broadcast over a leading sample dimension
        return out


class _JointInputLinear(_OneHotCovariates):
    """The encoders' first layer: sparse RNA and dense protein columns through one weight.

    The same parameters and function as :class:`~cellvi.nn.CovariateLinear` (the class of the
    layer is switched after the encoder is built); with gradients, :class:`SparseRows` input
    with dense columns goes through :class:`_SparseDenseMatmul`.
    """

    def forward(self, x, *cats):  # noqa: D102
        if (isinstance(x, SparseRows) and x.xt is not None and x.dense is not None
                and torch.is_grad_enabled()
                and x.x.shape[1] + x.dense.shape[1] == self.weight.shape[0]):
            out = _SparseDenseMatmul.apply(self.weight, x.x, x.xt, x.dense)
            if self.bias is not None:
                out = out + self.bias
            return self.add_covariates(out, cats)
        return super().forward(x, *cats)


def _joint_first_layer(encoder: Encoder) -> Encoder:
    """Give ``encoder`` the first layer :class:`_JointInputLinear` (same parameters)."""
    encoder.encoder.linears[0].__class__ = _JointInputLinear
    return encoder


def _one_hot_covariates(module: nn.Module) -> None:
    """Switch every plain :class:`~cellvi.nn.CovariateLinear` of ``module`` to one-hot adds."""
    for layer in module.modules():
        if type(layer) is CovariateLinear:
            layer.__class__ = _OneHotCovariates


class _GeneLogLikelihood(torch.autograd.Function):
    r"""Per-cell NB (ZINB) log-likelihood of the genes from the decoder's logits, one kernel.

    :math:`\mu = e^{\ell}\,\mathrm{softmax}(h) + \epsilon`; the compiled kernel
    (:func:`cellvi.distributions._rowsum.nb_log_prob_rows_softmax_grad`) gives the rows'
    log-likelihoods and their gradients in one pass per row, so the expected counts are never
    written out. A row's gradient depends on that row only, so the backward scales them by the
    upstream gradient (the same for every cell when the loss is a mean; otherwise the kernel
    runs again with those weights for the dispersion's gradient).
    """

    @staticmethod
    def forward(ctx, logits, theta, zi_logits, x, log_library):  # noqa: D102
        ones = torch.ones(logits.shape[0], dtype=logits.dtype)
        r, d_logits, d_zi, d_theta = nb_log_prob_rows_softmax_grad(
            x, logits, log_library, RATE_FLOOR, theta, zi_logits, ones)
        ctx.save_for_backward(d_logits, d_zi, d_theta)
        ctx.inputs = (logits, theta, zi_logits, x, log_library)
        return r

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: D102
        d_logits, d_zi, d_theta = ctx.saved_tensors
        if bool((grad == grad[0]).all()):
            w = grad[0]
            d_theta = d_theta * w
        else:
            logits, theta, zi_logits, x, log_library = ctx.inputs
            d_theta = nb_log_prob_rows_softmax_grad(
                x, logits, log_library, RATE_FLOOR, theta, zi_logits, grad)[3]
            w = grad.unsqueeze(-1)
        d_logits = d_logits.mul_(w)
        d_zi = None if d_zi is None else d_zi.mul_(w)
        return d_logits, d_theta, d_zi, None, None


class DecoderTOTALVI(nn.Module):
    r"""The totalVI decoder: ``z`` to the gene parameters and the protein mixture's.

    Four hidden stacks read ``z`` (with the covariates): one for the genes' scale, one for the
    protein background, one for the foreground and one for the mixing (and, for ZINB, the
    genes' zero inflation). Each head reads its stack's output next to ``z`` itself, as in
    scvi-tools. With one layer and no layer norm the four stacks are one layer four times as
    wide (the same function: batch norm, ReLU and dropout act on each unit alone), so a step
    makes one matrix product where it would make four.

    Parameters
    ----------
    n_input
        Latent width (plus continuous covariates).
    n_output_genes, n_output_proteins
        Numbers of genes and proteins.
    n_cat_list
        Categories of each categorical covariate (batch first).
    n_layers, n_hidden, dropout_rate, use_batch_norm, use_layer_norm
        Of each hidden stack (see :class:`~cellvi.nn.FCLayers`).
    scale_activation
        ``"softmax"`` (the genes' scale on the simplex) or ``"softplus"`` (with size factors).
    zero_inflation
        Make the genes' zero-inflation head (ZINB only).
    """

    STACKS = ("px", "back", "fore", "mixing")

    def __init__(
        self,
        n_input: int,
        n_output_genes: int,
        n_output_proteins: int,
        n_cat_list: Sequence[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 256,
        dropout_rate: float = 0.2,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        scale_activation: Literal["softmax", "softplus"] = "softmax",
        zero_inflation: bool = False,
    ):
        super().__init__()
        cats = list(n_cat_list or [])
        self.n_hidden = n_hidden
        self.n_output_proteins = n_output_proteins
        self.scale_activation = scale_activation
        layer_options = dict(n_cat_list=cats, n_layers=n_layers, n_hidden=n_hidden,
                             dropout_rate=dropout_rate, use_batch_norm=use_batch_norm,
                             use_layer_norm=use_layer_norm)
        self.fused = n_layers == 1 and not use_layer_norm
        if self.fused:
            self.hidden = FCLayers(n_input, len(self.STACKS) * n_hidden, **layer_options)
        else:
            self.stacks = nn.ModuleDict(
                {name: FCLayers(n_input, n_hidden, **layer_options) for name in self.STACKS})
        head_in = n_hidden + n_input
        self.px_scale_decoder = CovariateLinear(head_in, n_output_genes, cats)
        self.px_dropout_decoder = (CovariateLinear(head_in, n_output_genes, cats)
                                   if zero_inflation else None)
        # background mean and (raw) scale of the log background, one product
        self.py_back_decoder = CovariateLinear(head_in, 2 * n_output_proteins, cats)
        self.py_fore_scale_decoder = CovariateLinear(head_in, n_output_proteins, cats)
        self.py_mixing_decoder = CovariateLinear(head_in, n_output_proteins, cats)

    # ------------------------------------------------------------------ hidden stacks
    def hidden_states(self, z: torch.Tensor, *cats: torch.Tensor,
                      which: Sequence[str] = STACKS) -> dict[str, torch.Tensor]:
        """Return the stacks' outputs joined to ``z``: ``{name: (..., cells, n_hidden + n_in)}``.

        ``which`` limits the work to the stacks a query needs (with the fused layer all four
        are computed in one product; only the requested ones are joined to ``z``).
        """
        if self.fused:
            h = self.hidden(z, *cats)  # (..., cells, 4 * n_hidden)
            parts = h.split(self.n_hidden, dim=-1)
            out = {name: parts[self.STACKS.index(name)] for name in which}
        else:
            out = {name: self.stacks[name](z, *cats) for name in which}
        return {name: torch.cat([h, z], dim=-1) for name, h in out.items()}

    # ------------------------------------------------------------------ heads
    def gene_logits(self, h_px: torch.Tensor, *cats: torch.Tensor) -> torch.Tensor:
        """Return the logits of the genes' scale ``(..., cells, genes)``."""
        return self.px_scale_decoder(h_px, *cats)

    def gene_scale(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the scale activation (softmax or softplus) to :meth:`gene_logits`."""
        if self.scale_activation == "softmax":
            return logits.softmax(-1)
        return F.softplus(logits)

    def background(self, h_back: torch.Tensor, *cats: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Return ``(a, b)``: the mean and scale of :math:`q(\log\beta \mid z)` per protein."""
        alpha, raw_beta = self.py_back_decoder(h_back, *cats).chunk(2, dim=-1)
        return alpha, F.softplus(raw_beta) + 1e-8

    def fore_scale(self, h_fore: torch.Tensor, *cats: torch.Tensor) -> torch.Tensor:
        r"""Return :math:`\alpha = 1 + \mathrm{relu}(\cdot) > 1`, foreground over background."""
        return F.relu(self.py_fore_scale_decoder(h_fore, *cats)) + (1 + 1e-8)

    def mixing(self, h_mix: torch.Tensor, *cats: torch.Tensor) -> torch.Tensor:
        r"""Return the logits of :math:`\pi`, the probability that a count is background."""
        return self.py_mixing_decoder(h_mix, *cats)

    def gene_dropout(self, h_mix: torch.Tensor, *cats: torch.Tensor) -> torch.Tensor | None:
        """Return the genes' zero-inflation logits (None without zero inflation)."""
        if self.px_dropout_decoder is None:
            return None
        return self.px_dropout_decoder(h_mix, *cats)


class TOTALVAE(ConfiguredModule):
    """The totalVI variational autoencoder of RNA and protein counts (:class:`TOTALVAEConfig`).

    A minibatch holds the RNA counts (``keys.X``, dense or sparse CSR with its transpose
    ``keys.X_T``), the protein counts (``"protein_expression"``, dense ``(cells, proteins)``),
    the batch codes and the covariates. :meth:`inference` encodes, :meth:`generative` decodes,
    :meth:`loss` is the negative ELBO (see the module documentation); the model's queries use
    the narrower :meth:`decode`.
    """

    Config = TOTALVAEConfig
    #: The training loop and the queries may pass the RNA counts as sparse CSR tensors.
    sparse_input: bool = True

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        c = self.config
        self.n_input_genes = c.n_input_genes
        self.n_input_proteins = c.n_input_proteins
        self.n_batch = max(c.n_batch, 1)
        self.n_labels = c.n_labels
        self.n_latent = c.n_latent
        self.gene_dispersion = c.gene_dispersion
        self.protein_dispersion = c.protein_dispersion
        self.gene_likelihood = c.gene_likelihood
        self.latent_distribution = c.latent_distribution
        self.log_variational = c.log_variational
        self.encode_covariates = c.encode_covariates
        self.use_size_factor_key = c.use_size_factor_key
        self.use_observed_lib_size = c.observed_library
        self.n_continuous_cov = c.n_continuous_cov
        self.n_cats_per_cov = list(c.n_cats_per_cov or [])
        n_p, n_b = c.n_input_proteins, self.n_batch

        if not self.use_observed_lib_size:
            self.register_buffer("library_log_means",
                                 torch.tensor(c.library_log_means, dtype=torch.float32))
            self.register_buffer("library_log_vars",
                                 torch.tensor(c.library_log_vars, dtype=torch.float32))
        # the protein mask follows from the config (the data set-up): not saved as a weight
        mask = None
        if c.protein_batch_mask is not None:
            mask = torch.tensor(c.protein_batch_mask, dtype=torch.float32)  # (n_batch, P)
        self.register_buffer("protein_batch_mask", mask, persistent=False)

        # prior of the log background per protein and batch (learned)
        if c.protein_background_prior_mean is None:
            mean = torch.full((n_p, n_b), 3.0)
            log_scale = torch.zeros(n_p, n_b)
        else:
            mean = torch.tensor(c.protein_background_prior_mean, dtype=torch.float32)
            log_scale = torch.tensor(c.protein_background_prior_scale, dtype=torch.float32).log()
        self.background_pro_alpha = nn.Parameter(mean)
        self.background_pro_log_beta = nn.Parameter(log_scale)
        self.log_per_batch_efficiency = nn.Parameter(torch.zeros(n_p, n_b))

        # inverse dispersions, as logs
        gene_cols = {"gene": (), "gene-batch": (n_b,), "gene-label": (c.n_labels,)}
        self.px_r = nn.Parameter(torch.randn(c.n_input_genes, *gene_cols[c.gene_dispersion]))
        pro_cols = {"protein": (), "protein-batch": (n_b,), "protein-label": (c.n_labels,)}
        self.py_r = nn.Parameter(2 * torch.rand(n_p, *pro_cols[c.protein_dispersion]))

        enc_bn = c.use_batch_norm in ("encoder", "both")
        enc_ln = c.use_layer_norm in ("encoder", "both")
        cat_list = [c.n_batch, *self.n_cats_per_cov]
        n_in = c.n_input_genes + n_p + c.n_continuous_cov * c.encode_covariates
        enc_cats = cat_list if c.encode_covariates else None
        self.z_encoder = _joint_first_layer(Encoder(
            n_in, c.n_latent, n_cat_list=enc_cats, n_layers=c.n_layers_encoder,
            n_hidden=c.n_hidden, dropout_rate=c.dropout_rate_encoder,
            distribution=c.latent_distribution, use_batch_norm=enc_bn, use_layer_norm=enc_ln,
        ))
        self.l_encoder = None if self.use_observed_lib_size else _joint_first_layer(Encoder(
            n_in, 1, n_cat_list=enc_cats, n_layers=1, n_hidden=c.n_hidden,
            dropout_rate=c.dropout_rate_encoder, use_batch_norm=enc_bn, use_layer_norm=enc_ln,
        ))
        self.decoder = DecoderTOTALVI(
            c.n_latent + c.n_continuous_cov, c.n_input_genes, n_p, n_cat_list=cat_list,
            n_layers=c.n_layers_decoder, n_hidden=c.n_hidden,
            dropout_rate=c.dropout_rate_decoder,
            use_batch_norm=c.use_batch_norm in ("decoder", "both"),
            use_layer_norm=c.use_layer_norm in ("decoder", "both"),
            scale_activation="softplus" if c.use_size_factor_key else "softmax",
            zero_inflation=c.gene_likelihood == "zinb",
        )
        _one_hot_covariates(self)

    # ------------------------------------------------------------------ inference
    def inference_inputs(self, tensors: Tensors) -> dict:
        """Pick the inputs of :meth:`inference` from a minibatch."""
        out = {
            "x": tensors[keys.X],
            "y": tensors[PROTEIN_KEY],
            "batch_index": tensors[keys.BATCH],
            "cont_covs": tensors.get(keys.CONT_COVS),
            "cat_covs": tensors.get(keys.CAT_COVS),
        }
        if keys.X_T in tensors:
            out["x_t"] = tensors[keys.X_T]
        return out

    def _encoder_input(self, x: torch.Tensor, x_t: torch.Tensor | None, y: torch.Tensor,
                       cont_covs: torch.Tensor | None, totals: torch.Tensor):
        """Return ``log(1 + x / (1 + mean))`` and the same of ``y``, joined (sparse stays so)."""
        y_ = y / (1 + y.mean(-1, keepdim=True))
        if self.log_variational:
            y_ = torch.log1p(y_)
        dense = [y_]
        if cont_covs is not None and self.encode_covariates:
            dense.append(cont_covs)
        dense = torch.cat(dense, dim=-1) if len(dense) > 1 else y_
        denom = 1 + totals / self.n_input_genes  # (cells,): one plus the mean count

        def f(v):
            return torch.log1p(v) if self.log_variational else v

        if x.layout == torch.sparse_csr:
            per_row = x.crow_indices().diff()
            values = x.values()
            x_ = csr_with_values(x, f(values / torch.repeat_interleave(
                denom, per_row, output_size=values.shape[0])))
            if x_t is None and torch.is_grad_enabled():
                x_t = x.t().to_sparse_csr()
            xt_ = None
            if x_t is not None:  # (genes, cells): an entry's column is its cell
                xt_ = csr_with_values(x_t, f(x_t.values() / denom[x_t.col_indices()]))
            return SparseRows(x_, xt_, dense)
        return torch.cat([f(x / denom.unsqueeze(-1)), dense], dim=-1)

    def _cats(self, batch_index: torch.Tensor, cat_covs: torch.Tensor | None) -> list:
        return covariate_codes(batch_index, cat_covs)

    def inference(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_index: torch.Tensor,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        n_samples: int = 1,
        x_t: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | Distribution | None]:
        """Encode RNA ``x`` ``(cells, genes)`` and proteins ``y`` ``(cells, proteins)``.

        Returns ``qz`` (Normal over the untransformed latent), ``z`` (its sample, softmax-ed for
        ``"ln"``), ``z_untransformed``, ``ql`` (None when the library is observed) and
        ``library`` (the log library size). With ``n_samples > 1`` the samples get a leading
        ``(n_samples, ...)`` dimension.
        """
        totals = row_sums(x)  # (cells,)
        enc_in = self._encoder_input(x, x_t, y, cont_covs, totals)
        cats = self._cats(batch_index, cat_covs) if self.encode_covariates else []
        qz, z_untransformed = self.z_encoder(enc_in, *cats)
        ql = None
        if self.use_observed_lib_size:
            library = torch.log(totals).unsqueeze(-1)  # (cells, 1)
        else:
            ql, library = self.l_encoder(enc_in, *cats)
            library = library.clamp(max=15.0)
        if n_samples > 1:
            z_untransformed = qz.rsample((n_samples,))
            if ql is None:
                library = library.expand(n_samples, *library.shape)
            else:
                library = ql.rsample((n_samples,)).clamp(max=15.0)
        return {
            "z": self.z_encoder.transform(z_untransformed),
            "z_untransformed": z_untransformed,
            "qz": qz,
            "ql": ql,
            "library": library,
        }

    # ------------------------------------------------------------------ generative
    def generative_inputs(self, tensors: Tensors, inference_outputs: dict) -> dict:
        """Pick the inputs of :meth:`generative` from a minibatch and the inference outputs."""
        return {
            "z": inference_outputs["z"],
            "library": inference_outputs["library"],
            "batch_index": tensors[keys.BATCH],
            "cont_covs": tensors.get(keys.CONT_COVS),
            "cat_covs": tensors.get(keys.CAT_COVS),
            "size_factor": tensors.get(keys.SIZE_FACTOR),
            "label": tensors.get(keys.LABELS),
        }

    def _decoder_input(self, z: torch.Tensor, cont_covs: torch.Tensor | None) -> torch.Tensor:
        if cont_covs is None or self.n_continuous_cov == 0:
            return z
        if z.dim() != cont_covs.dim():
            cont_covs = cont_covs.expand(*z.shape[:-1], cont_covs.shape[-1])
        return torch.cat([z, cont_covs], dim=-1)

    def _per(self, param: torch.Tensor, kind: str, batch_index, label) -> torch.Tensor:
        """Return the column of each cell of a ``(features, categories)`` parameter."""
        if param.dim() == 1:
            return param
        codes = batch_index if kind == "batch" else label
        if codes is None:
            raise ValueError(f"A per-{kind} dispersion needs the cells' {kind} codes.")
        return param.t()[codes.reshape(-1).long()]

    def gene_theta(self, batch_index: torch.Tensor, label: torch.Tensor | None) -> torch.Tensor:
        """Inverse dispersion of the genes: ``(genes,)`` or ``(cells, genes)``."""
        kind = "batch" if self.gene_dispersion == "gene-batch" else "label"
        return self._per(self.px_r, kind, batch_index, label).exp()

    def protein_theta(self, batch_index: torch.Tensor, label: torch.Tensor | None
                      ) -> torch.Tensor:
        """Inverse dispersion of the proteins: ``(proteins,)`` or ``(cells, proteins)``."""
        kind = "batch" if self.protein_dispersion == "protein-batch" else "label"
        return self._per(self.py_r, kind, batch_index, label).exp()

    def log_efficiency(self, batch_index: torch.Tensor) -> torch.Tensor:
        """Log capture efficiency of each protein in each cell's batch, ``(cells, proteins)``."""
        return self.log_per_batch_efficiency.t()[batch_index.reshape(-1).long()]

    def background_prior(self, batch_index: torch.Tensor) -> Normal:
        """Prior of the log background of each cell and protein (its batch's)."""
        idx = batch_index.reshape(-1).long()
        return Normal(self.background_pro_alpha.t()[idx],
                      self.background_pro_log_beta.t()[idx].exp(), validate_args=False)

    def mask_of(self, batch_index: torch.Tensor) -> torch.Tensor | None:
        """Measured proteins of each cell's batch, ``(cells, proteins)`` floats, or None."""
        if self.protein_batch_mask is None:
            return None
        return self.protein_batch_mask[batch_index.reshape(-1).long()]

    def decode(
        self,
        z: torch.Tensor,
        batch_index: torch.Tensor,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        transform_batch: int | None = None,
        *,
        genes: bool = True,
        proteins: bool = True,
        sample_background: bool = True,
    ) -> dict[str, torch.Tensor]:
        r"""Decode ``z`` ``(..., cells, n_latent)`` into what the queries need.

        Returns ``gene_logits`` (when ``genes``) and, when ``proteins``, ``back_alpha``,
        ``back_beta`` (the Normal :math:`q(\log\beta \mid z)`), ``log_rate_back`` (a sample
        of it, or its mean when not ``sample_background``), ``rate_back``, ``fore_scale``,
        ``rate_fore`` and ``mixing`` (logits of the background probability), each
        ``(..., cells, features)``; also ``dropout`` for ZINB genes. Without the efficiency.
        """
        if transform_batch is not None:
            batch_index = torch.full_like(batch_index, int(transform_batch))
        zin = self._decoder_input(z, cont_covs)
        cats = self._cats(batch_index, cat_covs)
        which = (["px"] if genes else []) + (["back", "fore", "mixing"] if proteins else [])
        if genes and self.gene_likelihood == "zinb" and "mixing" not in which:
            which.append("mixing")
        h = self.decoder.hidden_states(zin, *cats, which=which)
        out: dict[str, torch.Tensor] = {}
        if genes:
            out["gene_logits"] = self.decoder.gene_logits(h["px"], *cats)
            dropout = self.decoder.gene_dropout(h["mixing"], *cats) if "mixing" in h else None
            if dropout is not None:
                out["dropout"] = dropout
        if proteins:
            alpha, beta = self.decoder.background(h["back"], *cats)
            log_back = alpha + beta * torch.randn_like(alpha) if sample_background else alpha
            log_back = log_back.clamp(max=_MAX_LOG_BACKGROUND)
            rate_back = log_back.exp()
            fore = self.decoder.fore_scale(h["fore"], *cats)
            out.update(back_alpha=alpha, back_beta=beta, log_rate_back=log_back,
                       rate_back=rate_back, fore_scale=fore, rate_fore=rate_back * fore,
                       mixing=self.decoder.mixing(h["mixing"], *cats))
        return out

    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        batch_index: torch.Tensor,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        size_factor: torch.Tensor | None = None,
        label: torch.Tensor | None = None,
        transform_batch: int | None = None,
        gene_distribution: bool = True,
    ) -> dict:
        r"""Decode ``z`` into the RNA distribution, the protein mixture and the priors.

        Returns ``px`` (NB or ZINB over the genes, the normalised expression in ``px.scale``),
        ``py`` (a dict: ``rate_back``, ``rate_fore``, ``mixing``, ``r`` (inverse dispersion),
        ``back_alpha``, ``back_beta``, ``log_rate_back``, ``fore_scale``, ``efficiency``
        (log), ``scale``), ``pz``, ``pl`` (the library prior, None when observed),
        ``background_prior`` and ``genes`` (the decoder's gene ``logits``, the log
        ``library``, ``theta`` and the zero-inflation ``dropout``). ``transform_batch``
        decodes every cell as if from that batch. With ``gene_distribution=False``, ``px`` is
        None when :meth:`loss` can read the genes' likelihood from the logits in one compiled
        pass (softmax scale, observed library, one dispersion per gene, float32 CPU).
        """
        if transform_batch is not None:
            batch_index = torch.full_like(batch_index, int(transform_batch))
        dec = self.decode(z, batch_index, cont_covs, cat_covs)
        logits = dec["gene_logits"]
        theta = self.gene_theta(batch_index, label)
        genes = {"logits": logits, "library": library, "theta": theta,
                 "dropout": dec.get("dropout")}
        px = None
        if gene_distribution or not self._fused_genes(logits, library, theta):
            if self.use_size_factor_key:
                scale = self.decoder.gene_scale(logits)
                rate = size_factor * scale + RATE_FLOOR
            elif self.decoder.scale_activation == "softmax":
                scale, rate = softmax_rate(logits, library, RATE_FLOOR)
            else:
                scale = self.decoder.gene_scale(logits)
                rate = library.exp() * scale + RATE_FLOOR
            px = count_distribution(self.gene_likelihood, mu=rate, theta=theta,
                                    zi_logits=dec.get("dropout"), scale=scale)
        foreground = torch.sigmoid(-dec["mixing"]) * dec["rate_fore"]
        py = {k: dec[k] for k in ("rate_back", "rate_fore", "mixing", "back_alpha",
                                  "back_beta", "log_rate_back", "fore_scale")}
        py["r"] = self.protein_theta(batch_index, label)
        py["efficiency"] = self.log_efficiency(batch_index)
        py["scale"] = foreground / foreground.sum(-1, keepdim=True).clamp(min=1e-12)
        return {
            "px": px,
            "py": py,
            "pz": StandardNormal(z),
            "pl": self._library_prior(batch_index),
            "background_prior": self.background_prior(batch_index),
            "genes": genes,
        }

    def _fused_genes(self, logits: torch.Tensor, library: torch.Tensor,
                     theta: torch.Tensor) -> bool:
        """Whether the genes' likelihood can be read from the logits by the compiled kernel."""
        return (self.decoder.scale_activation == "softmax" and not self.use_size_factor_key
                and logits.dim() == 2 and theta.dim() == 1 and not library.requires_grad
                and _native.usable(logits, theta, library))

    def gene_log_likelihood(self, x: torch.Tensor, generative_outputs: dict,
                            nonzero: torch.Tensor | None = None) -> torch.Tensor:
        """Return ``log p(x | z, l)`` per cell, ``(..., cells)``, from :meth:`generative`."""
        px = generative_outputs["px"]
        if px is not None:
            return log_prob_rows(px, x, nonzero)
        g = generative_outputs["genes"]
        logits, theta, dropout = g["logits"], g["theta"], g["dropout"]
        log_library = g["library"].reshape(-1)
        if torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (logits, theta, dropout)):
            return _GeneLogLikelihood.apply(logits, theta, dropout, x, log_library)
        return nb_log_prob_rows_softmax(x, logits, log_library.unsqueeze(-1), RATE_FLOOR,
                                        theta, dropout, nonzero)

    def _library_prior(self, batch_index: torch.Tensor) -> Normal | None:
        if self.use_observed_lib_size:
            return None
        idx = batch_index.reshape(-1).long()
        return Normal(self.library_log_means[idx].unsqueeze(-1),
                      self.library_log_vars[idx].sqrt().unsqueeze(-1), validate_args=False)

    def protein_mixture(self, py: dict) -> NegativeBinomialMixture:
        """Return the protein likelihood of :meth:`generative`'s ``py`` (efficiency included)."""
        eff = py["efficiency"].exp()
        return NegativeBinomialMixture(mu1=eff * py["rate_back"], mu2=eff * py["rate_fore"],
                                       theta1=py["r"], mixture_logits=py["mixing"],
                                       validate_args=False)

    def protein_log_likelihood(self, y: torch.Tensor, py: dict) -> torch.Tensor:
        """Elementwise ``log p(y | z, beta)``, ``(..., cells, proteins)``."""
        eff = py["efficiency"].exp()
        return log_mixture_nb(y, eff * py["rate_back"], eff * py["rate_fore"], py["r"], None,
                              py["mixing"])

    # ------------------------------------------------------------------ loss
    def forward(
        self, tensors: Tensors, *, kl_weight: float = 1.0, transform_batch: int | None = None,
        pro_recons_weight: float = 1.0,
    ) -> tuple[dict, dict, LossOutput]:
        """Run inference, generative and loss on a minibatch."""
        inference_outputs = self.inference(**self.inference_inputs(tensors))
        generative_outputs = self.generative(
            **self.generative_inputs(tensors, inference_outputs), transform_batch=transform_batch,
            gene_distribution=False)
        loss = self.loss(tensors, inference_outputs, generative_outputs, kl_weight=kl_weight,
                         pro_recons_weight=pro_recons_weight)
        return inference_outputs, generative_outputs, loss

    def loss(
        self,
        tensors: Tensors,
        inference_outputs: dict,
        generative_outputs: dict,
        kl_weight: float = 1.0,
        pro_recons_weight: float = 1.0,
    ) -> LossOutput:
        """Negative ELBO of a minibatch (see the module documentation for the terms).

        ``reconstruction_loss`` is ``-log p(x | z, l) - log p(y | z, beta)`` per cell (measured
        proteins only); ``kl_local`` holds ``kl_z``, ``kl_background`` (the background KL of the
        measured proteins), ``background_penalty`` (the efficiency prior and the pull towards
        background) and, when the library is modelled, ``kl_l``; ``extra`` the mean gene and
        protein reconstruction losses. ``pro_recons_weight`` weights the protein likelihood in
        the loss (not in the ELBO).
        """
        x, y = tensors[keys.X], tensors[PROTEIN_KEY]
        batch_index = tensors[keys.BATCH]
        py = generative_outputs["py"]
        rec_gene = -self.gene_log_likelihood(x, generative_outputs,
                                             tensors.get(keys.INDICES_NONZERO))  # (cells,)
        mask = self.mask_of(batch_index)
        lp = self.protein_log_likelihood(y, py)  # (cells, proteins)
        rec_protein = -(lp if mask is None else lp * mask).sum(-1)

        kl_z = kl_divergence(inference_outputs["qz"], generative_outputs["pz"]).sum(-1)
        q_back = Normal(py["back_alpha"], py["back_beta"], validate_args=False)
        kl_back = kl_divergence(q_back, generative_outputs["background_prior"])
        kl_back = (kl_back if mask is None else kl_back * mask).sum(-1)
        log_eff = py["efficiency"]  # -log LogNormal(e | 0, 1) = log e + log(2 pi)/2 + log^2 e/2
        penalty = (log_eff + _HALF_LOG_2PI + 0.5 * log_eff.square()).sum(-1) \
            + 1e-3 * F.softplus(-py["mixing"]).sum(-1)
        kl_local = {"kl_z": kl_z, "kl_background": kl_back, "background_penalty": penalty}
        loss = (rec_gene + (kl_weight * pro_recons_weight) * rec_protein
                + kl_weight * (kl_z + kl_back + penalty))
        if generative_outputs["pl"] is not None:
            kl_l = kl_divergence(inference_outputs["ql"], generative_outputs["pl"]).sum(-1)
            kl_local["kl_l"] = kl_l
            loss = loss + kl_l
        return LossOutput(
            loss=loss.mean(), reconstruction_loss=rec_gene + rec_protein, kl_local=kl_local,
            extra={"reconstruction_loss_gene": rec_gene.detach().mean(),
                   "reconstruction_loss_protein": rec_protein.detach().mean()},
        )

    # ------------------------------------------------------------------ adversarial plan
    def adversarial_shape(self) -> tuple[int, int]:
        """``(n_latent, n_batch)``: what the adversarial classifier reads and predicts."""
        return self.n_latent, self.n_batch

    def adversarial_inputs(self, tensors: Tensors, inference_outputs: dict):
        """Return the latent sample and the batch codes for the adversarial classifier."""
        return inference_outputs["z"], tensors[keys.BATCH], self.n_batch

    # ------------------------------------------------------------------ evaluation
    @torch.inference_mode()
    def marginal_ll(self, tensors: Tensors, n_mc_samples: int,
                    n_mc_samples_per_pass: int = 100) -> torch.Tensor:
        r"""Importance-sampling estimate of :math:`\log p(x, y)` per cell, shape ``(cells,)``.

        Samples :math:`z` (and the library, when modelled) from :math:`q` and the log
        background :math:`\log\beta` from :math:`q(\log\beta \mid z)`; the weights are
        :math:`p(x, y \mid z, \ell, \beta) p(z) p(\ell) p(\log\beta) / q(\cdot)`. Unmeasured
        proteins leave the weights (their background integrates out exactly); the
        regularisers of the loss are not part of :math:`p`.
        """
        x, y, b = tensors[keys.X], tensors[PROTEIN_KEY], tensors[keys.BATCH]
        mask = self.mask_of(b)
        chunks = []
        remaining = n_mc_samples
        while remaining > 0:
            k = min(n_mc_samples_per_pass, remaining)
            remaining -= k
            inf = self.inference(**self.inference_inputs(tensors), n_samples=k)
            gen = self.generative(**self.generative_inputs(tensors, inf))
            px, py = gen["px"], gen["py"]
            log_px = log_prob_rows(px, x, tensors.get(keys.INDICES_NONZERO))  # (k, cells)
            log_back = py["log_rate_back"]
            q_back = Normal(py["back_alpha"], py["back_beta"], validate_args=False)
            per_protein = (self.protein_log_likelihood(y, py)
                           + gen["background_prior"].log_prob(log_back)
                           - q_back.log_prob(log_back))  # (k, cells, proteins)
            if mask is not None:
                per_protein = per_protein * mask
            zu = inf["z_untransformed"]
            log_w = (log_px + per_protein.sum(-1) + StandardNormal(zu).log_prob(zu).sum(-1)
                     - inf["qz"].log_prob(zu).sum(-1))
            if inf["ql"] is not None:
                lib = inf["library"]
                log_w = log_w + (gen["pl"].log_prob(lib) - inf["ql"].log_prob(lib)).sum(-1)
            chunks.append(log_w.reshape(k, -1))
        log_w = torch.cat(chunks, dim=0)
        return torch.logsumexp(log_w, dim=0) - math.log(n_mc_samples)

    @torch.inference_mode()
    def sample(self, tensors: Tensors, n_samples: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Draw RNA and protein counts from the posterior predictive distribution.

        Returns ``(rna, protein)``, each ``(cells, features)`` for one sample, else
        ``(cells, features, n_samples)``. The proteins are drawn from the likelihood the model
        was trained with (per-batch efficiency included).
        """
        inf = self.inference(**self.inference_inputs(tensors), n_samples=n_samples)
        gen = self.generative(**self.generative_inputs(tensors, inf))
        rna = gen["px"].sample()
        protein = self.protein_mixture(gen["py"]).sample()
        if n_samples > 1:
            return rna.permute(1, 2, 0), protein.permute(1, 2, 0)
        return rna, protein
