"""Encoders and decoders of the scVI family."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn
from torch.distributions import Normal

from cellvi import _native

from ._layers import CovariateLinear, FCLayers
from ._rate import softmax_rate


def softmax(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the last dimension, written straight into ``out`` when given."""
    if out is None:
        return x.softmax(-1)
    if out.dtype == x.dtype and out.device == x.device and out.is_contiguous():
        return torch.ops.aten._softmax.out(x, -1, False, out=out)
    return out.copy_(x.softmax(-1))


def _into(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    return x if out is None else out.copy_(x)


class Encoder(nn.Module):
    """Encode ``x`` into a diagonal Normal, optionally pushed through a softmax.

    Parameters
    ----------
    n_input
        Input width.
    n_output
        Latent width.
    n_cat_list
        Number of categories of each categorical covariate.
    n_layers, n_hidden, dropout_rate, use_batch_norm, use_layer_norm, inject_covariates
        See :class:`FCLayers`.
    distribution
        ``"normal"``: the latent variable is the Normal sample. ``"ln"``: logistic normal, the
        latent variable is the softmax of the Normal sample.
    var_eps
        Added to the variance for numerical stability.
    var_activation
        Maps the raw variance output to a positive variance; ``torch.exp`` when None.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat_list: Sequence[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        distribution: Literal["normal", "ln"] = "normal",
        var_eps: float = 1e-4,
        var_activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
    ):
        super().__init__()
        if distribution not in ("normal", "ln"):
            raise ValueError(f"distribution must be 'normal' or 'ln', got {distribution!r}.")
        self.distribution = distribution
        self.var_eps = var_eps
        self.var_activation = torch.exp if var_activation is None else var_activation
        self.encoder = FCLayers(
            n_input,
            n_hidden,
            n_cat_list=n_cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            inject_covariates=inject_covariates,
        )
        self.mean_var = nn.Linear(n_hidden, 2 * n_output)  # fused mean and variance heads

    def transform(self, untransformed: torch.Tensor) -> torch.Tensor:
        """Map a Normal sample to the latent variable (identity or softmax)."""
        return untransformed.softmax(-1) if self.distribution == "ln" else untransformed

    def forward(self, x: torch.Tensor, *cats: torch.Tensor) -> tuple[Normal, torch.Tensor]:
        """Return ``(q, u)``: the Normal posterior and a reparameterised sample from it.

        ``x`` is ``(cells, n_input)``; ``u`` is ``(cells, n_output)``, untransformed: the latent
        variable itself is ``transform(u)`` (the softmax of ``u`` for ``"ln"``).
        """
        h = self.encoder(x, *cats)  # (cells, n_hidden)
        mean, raw_var = self.mean_var(h).chunk(2, dim=-1)  # 2 x (cells, n_output)
        var = self.var_activation(raw_var) + self.var_eps
        q = Normal(mean, var.sqrt(), validate_args=False)  # checked by the NaN guard instead
        return q, q.rsample()


class DecoderSCVI(nn.Module):
    """The scVI decoder: ``z`` -> normalised expression, dispersion and zero-inflation logits.

    Parameters
    ----------
    n_input
        Latent width (plus continuous covariates).
    n_output
        Number of genes.
    n_cat_list
        Number of categories of each categorical covariate (batch first).
    n_layers, n_hidden, dropout_rate, use_batch_norm, use_layer_norm, inject_covariates
        See :class:`FCLayers` (dropout is 0 in the decoder, as in scVI).
    scale_activation
        ``"softmax"`` (expression on the simplex) or ``"softplus"``.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat_list: Sequence[int] | None = None,
        n_layers: int = 1,
        n_hidden: int = 128,
        inject_covariates: bool = True,
        use_batch_norm: bool = False,
        use_layer_norm: bool = False,
        scale_activation: Literal["softmax", "softplus"] = "softmax",
    ):
        super().__init__()
        self.n_output = n_output
        self.scale_activation = scale_activation
        self.px_decoder = FCLayers(
            n_input,
            n_hidden,
            n_cat_list=n_cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=0,
            inject_covariates=inject_covariates,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
        )
        # two heads, as in scVI; separate products are faster than one fused (2 * genes) head
        # whose gradient has to be concatenated from the two halves (measured in BENCHMARKS.md)
        self.px_scale_decoder = nn.Linear(n_hidden, n_output)
        self.px_dropout_decoder = nn.Linear(n_hidden, n_output)
        self.px_r_decoder = nn.Linear(n_hidden, n_output)  # used by dispersion="gene-cell"
        self._register_load_state_dict_pre_hook(_split_fused_head)

    def forward(
        self,
        dispersion: str,
        z: torch.Tensor,
        library: torch.Tensor,
        *cats: torch.Tensor,
        rate_floor: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Return ``(scale, r, rate, dropout_logits)``, each ``(..., cells, genes)``.

        ``library`` is the log library size, ``(..., cells, 1)``;
        ``rate = exp(library) * scale + rate_floor``; ``r`` (log inverse dispersion) is
        returned only when ``dispersion == "gene-cell"``.
        """
        h = self.px_decoder(z, *cats)  # (..., cells, n_hidden)
        raw_scale = self.px_scale_decoder(h)  # (..., cells, genes)
        px_dropout = self.px_dropout_decoder(h)  # (..., cells, genes)
        px_r = self.px_r_decoder(h) if dispersion == "gene-cell" else None
        if self.scale_activation == "softmax":
            px_scale, px_rate = softmax_rate(raw_scale, library, rate_floor)  # one pass
        else:
            px_scale = nn.functional.softplus(raw_scale)
            px_rate = library.exp() * px_scale
            px_rate = px_rate + rate_floor if rate_floor else px_rate
        return px_scale, px_r, px_rate, px_dropout

    def logits(self, z: torch.Tensor, *cats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the logits of the normalised expression and the zero-inflation logits.

        Both ``(..., cells, genes)``: what :meth:`forward` computes before the softmax.
        """
        h = self.px_decoder(z, *cats)  # (..., cells, n_hidden)
        return self.px_scale_decoder(h), self.px_dropout_decoder(h)

    def scale(
        self, z: torch.Tensor, *cats: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return only the normalised expression ``(..., cells, genes)`` of :meth:`forward`.

        ``out``, when given, receives the result (no gradient flows through it).
        """
        h = self.px_decoder(z, *cats)  # (..., cells, n_hidden)
        weight, bias = self.px_scale_decoder.weight, self.px_scale_decoder.bias
        if (self.scale_activation == "softmax" and out is not None and h.dim() == 2
                and out.is_contiguous() and _native.usable(h, out, weight)):
            # logits straight into ``out``, then the softmax in place: no temporary to fault in
            torch.addmm(bias, h, weight.t(), out=out)  # (cells, genes)
            _native.library().cellvi_softmax(
                out.shape[0], out.shape[1], out.data_ptr(), out.stride(0), out.data_ptr(),
                out.stride(0), torch.get_num_threads())
            return out
        raw = nn.functional.linear(h, weight, bias)
        if self.scale_activation == "softmax":
            return softmax(raw, out)
        return _into(nn.functional.softplus(raw), out)


def _split_fused_head(state_dict, prefix, *args) -> None:
    """Read a state dict saved with one fused ``scale_dropout`` head into the two heads."""
    for name in ("weight", "bias"):
        fused = state_dict.pop(f"{prefix}scale_dropout.{name}", None)
        if fused is not None:
            scale, dropout = fused.chunk(2, dim=0)
            state_dict[f"{prefix}px_scale_decoder.{name}"] = scale
            state_dict[f"{prefix}px_dropout_decoder.{name}"] = dropout


class LinearDecoderSCVI(nn.Module):
    """A linear decoder (LDVAE): ``scale = softmax(norm(W z + b))``.

    Parameters
    ----------
    n_input
        Latent width.
    n_output
        Number of genes.
    n_cat_list
        Number of categories of each categorical covariate (batch first).
    use_batch_norm
        Batch normalisation of the linear output (folded into the loadings by ``get_loadings``).
    use_layer_norm
        Layer normalisation of the linear output.
    bias
        Whether the linear map has a bias.
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_cat_list: Sequence[int] | None = None,
        use_batch_norm: bool = False,
        use_layer_norm: bool = False,
        bias: bool = False,
    ):
        super().__init__()
        self.factor_regressor = FCLayers(
            n_input, n_output, n_cat_list=n_cat_list, n_layers=1, use_activation=False,
            use_batch_norm=use_batch_norm, use_layer_norm=use_layer_norm, bias=bias,
            dropout_rate=0,
        )
        self.px_dropout_decoder = FCLayers(
            n_input, n_output, n_cat_list=n_cat_list, n_layers=1, use_activation=False,
            use_batch_norm=use_batch_norm, use_layer_norm=use_layer_norm, bias=bias,
            dropout_rate=0,
        )

    def forward(
        self,
        dispersion: str,
        z: torch.Tensor,
        library: torch.Tensor,
        *cats: torch.Tensor,
        rate_floor: float = 0.0,
    ) -> tuple[torch.Tensor, None, torch.Tensor, torch.Tensor]:
        """Return ``(scale, None, rate, dropout_logits)``, each ``(..., cells, genes)``.

        ``rate = exp(library) * scale + rate_floor``.
        """
        raw_px_scale = self.factor_regressor(z, *cats)
        px_scale, px_rate = softmax_rate(raw_px_scale, library, rate_floor)
        px_dropout = self.px_dropout_decoder(z, *cats)
        return px_scale, None, px_rate, px_dropout

    def scale(
        self, z: torch.Tensor, *cats: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Return only the normalised expression ``(..., cells, genes)`` of :meth:`forward`."""
        return softmax(self.factor_regressor(z, *cats), out)

    def loadings(self) -> torch.Tensor:
        """Return the ``(genes, latent)`` loadings, with the batch norm folded in."""
        w = self.factor_regressor.linears[0].weight.detach().t()  # (genes, latent)
        post = self.factor_regressor.posts[0]
        bn = next((m for m in post if isinstance(m, nn.BatchNorm1d)), None)
        if bn is not None:
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)  # (genes,)
            w = w * scale[:, None]
        return w


class Classifier(nn.Module):
    """A fully connected classifier returning class probabilities (or logits).

    Parameters
    ----------
    n_input
        Input width.
    n_hidden
        Hidden width.
    n_labels
        Number of classes.
    n_layers
        Number of hidden layers (0 gives a linear classifier).
    dropout_rate
        Dropout probability.
    logits
        Return logits instead of probabilities.
    use_batch_norm, use_layer_norm
        Normalisation in the hidden layers.
    """

    def __init__(
        self,
        n_input: int,
        n_hidden: int = 128,
        n_labels: int = 5,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        logits: bool = False,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
    ):
        super().__init__()
        self.logits = logits
        layers: list[nn.Module] = []
        if n_layers > 0:
            layers.append(
                FCLayers(
                    n_input, n_hidden, n_layers=n_layers, n_hidden=n_hidden,
                    dropout_rate=dropout_rate, use_batch_norm=use_batch_norm,
                    use_layer_norm=use_layer_norm,
                )
            )
            n_input = n_hidden
        layers.append(nn.Linear(n_input, n_labels))
        self.classifier = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``(cells, n_labels)`` probabilities, or logits when ``logits=True``."""
        out = self.classifier(x)
        return out if self.logits else out.softmax(-1)


__all__ = ["Classifier", "CovariateLinear", "DecoderSCVI", "Encoder", "LinearDecoderSCVI"]
