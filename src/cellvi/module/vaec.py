r"""VAEC: the conditional ("M2", Kingma et al. 2014) variational autoencoder for counts.

For cell :math:`n` with counts :math:`x_n` in batch :math:`s_n`:

.. math::

    y_n \sim \mathrm{Cat}(\pi), \qquad z_n \sim \mathcal N(0, I), \qquad
    x_n \mid z_n, y_n, s_n, \ell_n \sim \text{ZINB / NB / Poisson with }
    \rho_n = f_w(z_n, s_n, y_n).

The decoder sees the batch and the label; the encoder :math:`q(z \mid x, y)` sees the label
(and the batch when ``encode_covariates``). A classifier :math:`q(y \mid x)` on the (log) counts
completes the variational family. Labelled cells use their label; for unlabelled cells every
label is enumerated and the ELBO terms are weighted by :math:`q(y \mid x)`, which adds
:math:`\mathrm{KL}(q(y \mid x) \,\|\, p(y))`. Training adds ``classification_ratio`` times the
cross-entropy of the classifier on labelled cells.

Label codes: ``0 .. n_labels - 1`` are the classes; any other code (conventionally
``n_labels``) marks an unlabelled cell.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.distributions import kl_divergence

from cellvi import keys
from cellvi.nn import Classifier, DecoderSCVI, Encoder

from ._base import LossOutput, one_hot
from .scanvae import _prior
from .vae import VAE, NormOption, Tensors


class VAEC(VAE):
    """Label-conditional variational autoencoder with a classifier (semi-supervised M2).

    Parameters
    ----------
    n_input
        Number of genes.
    n_batch
        Number of batches; 0 means no batch correction.
    n_labels
        Number of classes (the unlabelled category is *not* a class).
    n_hidden
        Width of every hidden layer.
    n_latent
        Dimension of the latent space.
    n_layers
        Hidden layers of the encoders, the decoder and the classifier.
    n_continuous_cov
        Number of continuous covariates.
    n_cats_per_cov
        Number of categories of each extra categorical covariate.
    dropout_rate
        Dropout rate of the encoders and the classifier.
    y_prior
        Prior class probabilities, ``(n_labels,)``; uniform when None.
    dispersion
        ``"gene"``, ``"gene-batch"``, ``"gene-label"`` or ``"gene-cell"``.
    log_variational
        Encode (and classify) ``log(1 + x)`` rather than ``x``.
    gene_likelihood
        ``"zinb"``, ``"nb"`` or ``"poisson"``.
    classifier_parameters
        Options of the classifier (:class:`cellvi.nn.Classifier`): ``n_hidden``, ``n_layers``,
        ``dropout_rate``, ``use_batch_norm``, ``use_layer_norm``.
    use_batch_norm, use_layer_norm
        Where to use batch / layer normalisation.
    classification_ratio
        Weight of the classification loss when :meth:`loss` gets ``labelled_tensors`` and no
        ``classification_ratio``.
    **vae_kwargs
        Other options of :class:`cellvi.module.VAE`.
    """

    #: classifiers read the counts densely
    sparse_input: bool = False

    def __init__(
        self,
        n_input: int,
        n_batch: int = 0,
        n_labels: int = 0,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        n_continuous_cov: int = 0,
        n_cats_per_cov: Iterable[int] | None = None,
        dropout_rate: float = 0.1,
        y_prior: torch.Tensor | np.ndarray | Sequence[float] | None = None,
        dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene",
        log_variational: bool = True,
        gene_likelihood: Literal["zinb", "nb", "poisson"] = "zinb",
        classifier_parameters: dict | None = None,
        use_batch_norm: NormOption = "both",
        use_layer_norm: NormOption = "none",
        classification_ratio: float = 50.0,
        **vae_kwargs,
    ):
        if n_labels < 1:
            raise ValueError(f"VAEC needs n_labels >= 1 classes, got {n_labels}.")
        super().__init__(
            n_input,
            n_batch=n_batch,
            n_labels=n_labels,
            n_hidden=n_hidden,
            n_latent=n_latent,
            n_layers=n_layers,
            n_continuous_cov=n_continuous_cov,
            n_cats_per_cov=n_cats_per_cov,
            dropout_rate=dropout_rate,
            dispersion=dispersion,
            log_variational=log_variational,
            gene_likelihood=gene_likelihood,
            use_batch_norm=use_batch_norm,
            use_layer_norm=use_layer_norm,
            **vae_kwargs,
        )
        self.classification_ratio = float(classification_ratio)
        self.register_buffer("y_prior", _prior(y_prior, n_labels))
        bn_enc = use_batch_norm in ("encoder", "both")
        ln_enc = use_layer_norm in ("encoder", "both")
        # q(z | x, y): the scVI encoder with the label as one more categorical input
        enc_cats = [n_batch, *self.n_cats_per_cov] if self.encode_covariates else []
        self.z_encoder = Encoder(
            n_input + n_continuous_cov * self.encode_covariates,
            n_latent,
            n_cat_list=[*enc_cats, n_labels],
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            distribution=self.latent_distribution,
            inject_covariates=vae_kwargs.get("deeply_inject_covariates", True),
            use_batch_norm=bn_enc,
            use_layer_norm=ln_enc,
            var_activation=vae_kwargs.get("var_activation"),
        )
        cls_options = dict(
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            use_batch_norm=bn_enc,
            use_layer_norm=ln_enc,
        )
        cls_options.update(classifier_parameters or {})
        cls_options.pop("logits", None)
        cls_options.pop("n_labels", None)
        self.classifier = Classifier(n_input, n_labels=n_labels, logits=True, **cls_options)

    def _make_decoder(self, n_in: int, n_out: int, **kwargs) -> nn.Module:
        # p(x | z, s, y): the label is the last categorical input of the decoder
        kwargs["n_cat_list"] = [*kwargs["n_cat_list"], self.n_labels]
        return DecoderSCVI(n_in, n_out, **kwargs)

    # ------------------------------------------------------------------ classification
    def log_q_y(self, x: torch.Tensor) -> torch.Tensor:
        """Log class probabilities ``log q(y | x)``, ``(cells, n_labels)``."""
        x_ = torch.log1p(x) if self.log_variational else x
        return torch.log_softmax(self.classifier(x_), dim=-1)

    def classify(self, x: torch.Tensor, batch_index: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities ``q(y | x)`` of counts ``x`` ``(cells, genes)``.

        The classifier reads the counts only; ``batch_index`` is accepted for a uniform
        interface and ignored. Returns ``(cells, n_labels)``.
        """
        return self.log_q_y(x).exp()

    def classification_loss(self, labelled_tensors: Tensors) -> torch.Tensor:
        """Mean cross-entropy of ``q(y | x)`` on the labelled cells of a minibatch."""
        y = labelled_tensors[keys.LABELS].reshape(-1).long()
        keep = (y >= 0) & (y < self.n_labels)
        log_p = self.log_q_y(labelled_tensors[keys.X])
        if not bool(keep.any()):
            return log_p.sum() * 0.0
        return nn.functional.nll_loss(log_p[keep], y[keep])

    def _labels(self, tensors: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        y = tensors.get(keys.LABELS)
        x = tensors[keys.X]
        if y is None:
            y = torch.full((x.shape[0],), self.n_labels, dtype=torch.long, device=x.device)
        y = y.reshape(-1).long()
        labelled = (y >= 0) & (y < self.n_labels)
        return y.clamp(0, self.n_labels - 1), labelled

    # ------------------------------------------------------------------ inference / generative
    def inference_inputs(self, tensors: Tensors) -> dict:
        """Pick the inputs of :meth:`inference`, with the label codes ``y``.

        An unlabelled cell gets its most likely class under ``q(y | x)`` (used by the queries;
        the loss enumerates the labels instead).
        """
        out = super().inference_inputs(tensors)
        y, labelled = self._labels(tensors)
        if not bool(labelled.all()):
            with torch.no_grad():
                guess = self.log_q_y(tensors[keys.X]).argmax(-1)
            y = torch.where(labelled, y, guess)
        out["y"] = y.unsqueeze(-1)
        return out

    def inference(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        y: torch.Tensor,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        n_samples: int = 1,
    ) -> dict:
        """Encode ``x`` given the label codes ``y`` ``(cells, 1)``; outputs as in ``VAE``."""
        x_ = torch.log1p(x) if self.log_variational else x
        if cont_covs is not None and self.encode_covariates:
            x_ = torch.cat([x_, cont_covs], dim=-1)
        cats = self._cats(batch_index, cat_covs) if self.encode_covariates else []
        qz, z_untransformed = self.z_encoder(x_, *cats, y)
        ql = None
        if self.use_observed_lib_size:
            library = torch.log(x.sum(dim=1, keepdim=True))
        else:
            ql, library = self.l_encoder(x_, *cats)
        if n_samples > 1:
            z_untransformed = qz.rsample((n_samples,))
            if ql is None:
                library = library.expand(n_samples, *library.shape)
            else:
                library = ql.rsample((n_samples,))
        z = self.z_encoder.transform(z_untransformed)
        return {"z": z, "z_untransformed": z_untransformed, "qz": qz, "ql": ql,
                "library": library, "y": y}

    def generative_inputs(self, tensors: Tensors, inference_outputs: dict) -> dict:
        """Pick the inputs of :meth:`generative`, with the label the encoder used."""
        out = super().generative_inputs(tensors, inference_outputs)
        out["y"] = inference_outputs["y"]
        return out

    def _decoder_cats(
        self, batch_index: torch.Tensor, cat_covs: torch.Tensor | None, y: torch.Tensor | None
    ) -> list:
        """Return the decoder's categorical inputs, the label codes ``y`` ``(cells, 1)`` last."""
        if y is None:
            raise ValueError("VAEC decodes given the labels: pass y (cells, 1).")
        y = y.reshape(-1, 1).long()
        return [*self._cats(batch_index, cat_covs), y]

    # ------------------------------------------------------------------ loss
    def _enumerated(self, tensors: Tensors) -> Tensors:
        """Repeat the minibatch once per class, with labels ``0 .. n_labels-1`` (class-major)."""
        n, k = tensors[keys.X].shape[0], self.n_labels
        out = {
            key: v.repeat(k, *([1] * (v.dim() - 1)))
            for key, v in tensors.items()
            if key != keys.INDICES_NONZERO  # positions of the original rows only
        }
        labels = torch.arange(k, device=tensors[keys.X].device).repeat_interleave(n)
        out[keys.LABELS] = labels.unsqueeze(-1)
        return out

    def forward(
        self,
        tensors: Tensors,
        *,
        kl_weight: float = 1.0,
        transform_batch: int | None = None,
        feed_labels: bool = False,
        labelled_tensors: Tensors | None = None,
        classification_ratio: float | None = None,
    ) -> tuple[dict, dict, LossOutput]:
        """Run inference and generative for every class, then :meth:`loss`.

        The returned inference and generative outputs are over the class-enumerated minibatch,
        ``(n_labels * cells, ...)``, class-major.
        """
        rep = self._enumerated(tensors)
        inference_outputs = self.inference(**self.inference_inputs(rep))
        generative_outputs = self.generative(
            **self.generative_inputs(rep, inference_outputs), transform_batch=transform_batch
        )
        loss = self.loss(
            tensors, inference_outputs, generative_outputs, feed_labels=feed_labels,
            kl_weight=kl_weight, labelled_tensors=labelled_tensors,
            classification_ratio=classification_ratio,
        )
        return inference_outputs, generative_outputs, loss

    def loss(
        self,
        tensors: Tensors,
        inference_outputs: dict,
        generative_outputs: dict,
        feed_labels: bool = False,
        kl_weight: float = 1.0,
        labelled_tensors: Tensors | None = None,
        classification_ratio: float | None = None,
    ) -> LossOutput:
        """Negative ELBO of a minibatch plus the weighted classification loss.

        ``inference_outputs`` and ``generative_outputs`` must come from the class-enumerated
        minibatch (as :meth:`forward` produces them). Labelled cells (with ``feed_labels``) use
        their class; the others are summed over classes with weights ``q(y | x)``.
        ``reconstruction_loss`` is the (expected) ``-log p(x | z, y)``; ``kl_local`` holds
        ``kl_z``, ``kl_y`` (``KL(q(y|x) || p(y))``, or ``-log p(y)`` for a labelled cell) and
        ``kl_l`` when the library is modelled; ``extra`` holds ``classification_loss`` when
        ``labelled_tensors`` is given. ``kl_weight`` scales ``kl_z`` and ``kl_y``.
        """
        x = tensors[keys.X]
        n, k = x.shape[0], self.n_labels
        x_rep = x.repeat(k, 1)
        rec_all = -generative_outputs["px"].log_prob(x_rep).sum(-1).reshape(k, n).T  # (n, k)
        kl_z_all = kl_divergence(inference_outputs["qz"], generative_outputs["pz"]).sum(-1)
        kl_z_all = kl_z_all.reshape(k, n).T  # (cells, n_labels)
        log_qy = self.log_q_y(x)
        qy = log_qy.exp()
        log_prior = torch.log(self.y_prior)
        if feed_labels:
            y, labelled = self._labels(tensors)
        else:
            y = torch.zeros(n, dtype=torch.long, device=x.device)
            labelled = torch.zeros(n, dtype=torch.bool, device=x.device)
        weights = torch.where(labelled.unsqueeze(-1), one_hot(y, k), qy)
        reconstruction = (weights * rec_all).sum(-1)
        kl_z = (weights * kl_z_all).sum(-1)
        kl_y = torch.where(labelled, -log_prior[y], (qy * (log_qy - log_prior)).sum(-1))
        kl_local = {"kl_z": kl_z, "kl_y": kl_y}
        weighted = kl_weight * (kl_z + kl_y)
        if generative_outputs["pl"] is not None:
            # the library posterior does not depend on y: take the first class's copy
            ql = inference_outputs["ql"]
            kl_l = kl_divergence(ql, generative_outputs["pl"]).sum(-1).reshape(k, n)[0]
            kl_local["kl_l"] = kl_l
            weighted = weighted + kl_l
        loss = torch.mean(reconstruction + weighted)
        extra = {}
        if labelled_tensors is not None:
            ratio = self.classification_ratio if classification_ratio is None else (
                classification_ratio
            )
            ce = self.classification_loss(labelled_tensors)
            loss = loss + ratio * ce
            extra["classification_loss"] = ce.detach()
        return LossOutput(
            loss=loss, reconstruction_loss=reconstruction, kl_local=kl_local, extra=extra
        )

    # ------------------------------------------------------------------ evaluation
    @torch.inference_mode()
    def marginal_ll(
        self, tensors: Tensors, n_mc_samples: int, n_mc_samples_per_pass: int = 100
    ) -> torch.Tensor:
        r"""Importance-sampling estimate of :math:`\log p(x) = \log \sum_y p(y) p(x \mid y)`.

        Each :math:`\log p(x \mid y)` is estimated as in :meth:`VAE.marginal_ll` with
        :math:`q(z \mid x, y)`; labels in ``tensors`` are ignored. Shape ``(cells,)``.
        """
        n = tensors[keys.X].shape[0]
        per_class = []
        for c in range(self.n_labels):
            t = dict(tensors)
            t[keys.LABELS] = torch.full((n, 1), c, dtype=torch.long, device=tensors[keys.X].device)
            per_class.append(super().marginal_ll(t, n_mc_samples, n_mc_samples_per_pass))
        log_px_y = torch.stack(per_class, dim=0)  # (n_labels, cells)
        return torch.logsumexp(log_px_y + torch.log(self.y_prior)[:, None], dim=0)


__all__ = ["VAEC"]
