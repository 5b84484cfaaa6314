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

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import kl_divergence

from cellvi import keys
from cellvi.nn import DecoderSCVI, LabelHead

from ._base import LossOutput, one_hot
from .scanvae import LabelOptions
from .vae import VAE, Tensors, VAEConfig


@dataclass(frozen=True, kw_only=True)
class VAECConfig(LabelOptions, VAEConfig):
    """Options of :class:`VAEC`: those of the VAE and of the label part.

    See :class:`~cellvi.module.VAEConfig` and :class:`~cellvi.module.scanvae.LabelOptions`.

    ``n_labels`` is the number of classes (the unlabelled category is *not* a class).
    ``log_variational`` also applies to the classifier's input.
    """

    def __post_init__(self):
        if self.n_labels < 1:
            raise ValueError(f"VAEC needs n_labels >= 1 classes, got {self.n_labels}.")
        super().__post_init__()


class VAEC(VAE):
    """Label-conditional variational autoencoder with a classifier (semi-supervised M2).

    Options: :class:`VAECConfig`. The ``z`` encoder and the decoder take the label as their last
    categorical input (:meth:`_encoder_cat_list`, :meth:`_make_decoder`); the classifier reads
    the (log) counts.
    """

    Config = VAECConfig
    #: classifiers read the counts densely
    sparse_input: bool = False

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        c = self.config
        self.classification_ratio = float(c.classification_ratio)
        self.label_head = LabelHead(c.n_input, c.n_labels, c.classifier_options(),
                                    y_prior=c.y_prior)

    @property
    def y_prior(self) -> torch.Tensor:
        """Prior class probabilities, ``(n_labels,)``."""
        return self.label_head.y_prior

    def _encoder_cat_list(self) -> list[int]:
        # q(z | x, y): the label is the last categorical input of the z encoder
        return [*(super()._encoder_cat_list() or []), self.config.n_labels]

    def _make_decoder(self, n_in: int, n_out: int, **kwargs) -> nn.Module:
        # p(x | z, s, y): the label is the last categorical input of the decoder
        kwargs["n_cat_list"] = [*kwargs["n_cat_list"], self.config.n_labels]
        return DecoderSCVI(n_in, n_out, **kwargs)

    # ------------------------------------------------------------------ classification
    def log_q_y(self, x: torch.Tensor) -> torch.Tensor:
        """Log class probabilities ``log q(y | x)``, ``(cells, n_labels)``."""
        x_ = torch.log1p(x) if self.log_variational else x
        return self.label_head.log_q_y(x_)

    def classify(self, x: torch.Tensor, batch_index: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities ``q(y | x)`` of counts ``x`` ``(cells, genes)``.

        The classifier reads the counts only; ``batch_index`` is accepted for a uniform
        interface and ignored. Returns ``(cells, n_labels)``.
        """
        return self.log_q_y(x).exp()

    def classification_loss(self, labelled_tensors: Tensors) -> torch.Tensor:
        """Mean cross-entropy of ``q(y | x)`` on the labelled cells of a minibatch."""
        log_p = self.log_q_y(labelled_tensors[keys.X])
        return self.label_head.cross_entropy(log_p, labelled_tensors[keys.LABELS])

    def _labels(self, tensors: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        x = tensors[keys.X]
        return self.label_head.codes(tensors.get(keys.LABELS), x.shape[0], x.device)

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
        y, labelled = self.label_head.feed(tensors.get(keys.LABELS), n, x.device, feed_labels)
        weights = torch.where(labelled.unsqueeze(-1), one_hot(y, k), qy)
        reconstruction = (weights * rec_all).sum(-1)
        kl_z = (weights * kl_z_all).sum(-1)
        kl_y = self.label_head.kl_y(log_qy, y, labelled, qy)
        kl_local = {"kl_z": kl_z, "kl_y": kl_y}
        weighted = kl_weight * (kl_z + kl_y)
        if generative_outputs["pl"] is not None:
            # the library posterior does not depend on y: take the first class's copy
            ql = inference_outputs["ql"]
            kl_l = kl_divergence(ql, generative_outputs["pl"]).sum(-1).reshape(k, n)[0]
            kl_local["kl_l"] = kl_l
            weighted = weighted + kl_l
        out = LossOutput(loss=torch.mean(reconstruction + weighted),
                         reconstruction_loss=reconstruction, kl_local=kl_local)
        if labelled_tensors is not None:
            ratio = self.classification_ratio if classification_ratio is None else (
                classification_ratio)
            self.label_head.add_classification(out, self.classification_loss(labelled_tensors),
                                               ratio)
        return out

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
