r"""scANVI: single-cell annotation with variational inference (Xu et al., Mol. Syst. Biol. 2021).

The scVI model (the "M1" part) is extended with a semi-supervised mixture prior on its latent
variable (the "M2" part of Kingma et al., 2014). For cell :math:`n` with counts :math:`x_n` in
batch :math:`s_n`:

.. math::

    y_n \sim \mathrm{Cat}(\pi), \qquad u_n \sim \mathcal N(0, I), \qquad
    z_n \mid u_n, y_n \sim \mathcal N\big(\mu_\phi(u_n, y_n), \sigma^2_\phi(u_n, y_n)\big), \\
    x_n \mid z_n, s_n, \ell_n \sim \text{the scVI observation model (ZINB, NB or Poisson)}.

Here :math:`z` (called ``z1`` in the code) is the scVI latent variable and :math:`u` (``z2``) a
second latent layer that models the within-label variation. The variational family is

.. math::

    q(z_n \mid x_n)\, q(y_n \mid z_n)\, q(u_n \mid z_n, y_n)\, [q(\ell_n \mid x_n)],

where :math:`q(y \mid z)` is a classifier on the scVI latent space. For a labelled cell the ELBO is
that of :math:`\log p(x_n, y_n)`; for an unlabelled cell :math:`y` is summed out exactly (all
labels are enumerated and weighted by :math:`q(y \mid z)`), which adds
:math:`\mathrm{KL}(q(y \mid z) \,\|\, p(y))`. Training adds ``classification_ratio`` times the
cross-entropy of :math:`q(y \mid z)` on a minibatch of labelled cells, as in the M2 objective.

Label codes: ``0 .. n_labels - 1`` are the classes; any other code (conventionally
``n_labels``) marks an unlabelled cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.distributions import Normal, kl_divergence

from cellvi import keys
from cellvi.distributions import log_prob_rows
from cellvi.nn import Encoder, LabelHead

from ._base import LossOutput, one_hot
from ._config import plain_values
from .vae import VAE, Tensors, VAEConfig


@dataclass(frozen=True, kw_only=True)
class LabelOptions:
    """Options of the label part of a semi-supervised module (:class:`~cellvi.nn.LabelHead`).

    Attributes
    ----------
    y_prior
        Prior probabilities of the classes, ``(n_labels,)``; uniform when None. Normalised to
        sum to one.
    classifier_parameters
        Options of the classifier (:class:`cellvi.nn.Classifier`): ``n_hidden``, ``n_layers``
        (0 gives a linear classifier), ``dropout_rate``, ``use_batch_norm``, ``use_layer_norm``.
        By default the classifier has the module's ``n_hidden``, ``n_layers`` and
        ``dropout_rate``, and its encoder normalisation.
    classification_ratio
        Weight of the classification loss when :meth:`loss` gets ``labelled_tensors`` and no
        ``classification_ratio`` (default 50).
    """

    y_prior: Sequence[float] | None = None
    classifier_parameters: dict | None = None
    classification_ratio: float = 50.0

    def __post_init__(self):
        super().__post_init__()
        plain_values(self, y_prior=float)

    def classifier_options(self) -> dict:
        """Return the classifier's options: the module's widths and norms, then the user's."""
        options = dict(
            n_hidden=self.n_hidden,
            n_layers=self.n_layers,
            dropout_rate=self.dropout_rate,
            use_batch_norm=self.use_batch_norm in ("encoder", "both"),
            use_layer_norm=self.use_layer_norm in ("encoder", "both"),
        )
        options.update(self.classifier_parameters or {})
        return options


@dataclass(frozen=True, kw_only=True)
class SCANVAEConfig(LabelOptions, VAEConfig):
    """Options of :class:`SCANVAE`: those of :class:`~cellvi.module.vae.VAEConfig` and below.

    ``n_labels`` is the number of classes (the unlabelled category is *not* a class);
    ``n_latent`` the dimension of both latent layers, ``z1`` (the scVI latent) and ``z2``. With
    ``dispersion="gene-label"`` an unlabelled cell uses the dispersion of its most likely label.

    Attributes
    ----------
    labels_groups
        Group of each class, ``(n_labels,)`` integers ``0 .. n_groups - 1``. Used when
        ``use_labels_groups``.
    use_labels_groups
        Hierarchical classification: ``q(y | z1) = q(g(y) | z1) q(y | z1, g(y))``, a classifier
        over the groups times a softmax over the classes within the group.
    linear_classifier
        A linear classifier (no hidden layer; ``classifier_parameters["n_layers"] = 0``).
    """

    labels_groups: Sequence[int] | None = None
    use_labels_groups: bool = False
    linear_classifier: bool = False

    def classifier_options(self) -> dict:  # noqa: D102
        options = super().classifier_options()
        if self.linear_classifier:
            options["n_layers"] = 0
        return options

    def __post_init__(self):
        if self.n_labels < 1:
            raise ValueError(f"SCANVAE needs n_labels >= 1 classes, got {self.n_labels}.")
        if self.use_labels_groups and self.labels_groups is None:
            raise ValueError(
                "use_labels_groups=True needs labels_groups (the group of each class).")
        super().__post_init__()
        plain_values(self, labels_groups=None)


class SCANVAE(VAE):
    """Semi-supervised scVI: the scANVI module. Options: :class:`SCANVAEConfig`."""

    Config = SCANVAEConfig
    #: the loader gives CSR rows (with their transpose) as to the VAE: the classifier reads the
    #: latent, and the encoder and the fused step take sparse rows
    sparse_input: bool = True

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        c = self.config
        self.classification_ratio = float(c.classification_ratio)
        self.label_head = LabelHead(
            c.n_latent, c.n_labels, c.classifier_options(), y_prior=c.y_prior,
            labels_groups=c.labels_groups if c.use_labels_groups else None,
        )
        bn_enc = c.use_batch_norm in ("encoder", "both")
        bn_dec = c.use_batch_norm in ("decoder", "both")
        ln_enc = c.use_layer_norm in ("encoder", "both")
        ln_dec = c.use_layer_norm in ("decoder", "both")
        # q(z2 | z1, y) and p(z1 | z2, y): Normal heads conditioned on the label
        self.encoder_z2_z1 = Encoder(
            c.n_latent, c.n_latent, n_cat_list=[c.n_labels], n_layers=c.n_layers,
            n_hidden=c.n_hidden, dropout_rate=c.dropout_rate, use_batch_norm=bn_enc,
            use_layer_norm=ln_enc,
        )
        self.decoder_z1_z2 = Encoder(
            c.n_latent, c.n_latent, n_cat_list=[c.n_labels], n_layers=c.n_layers,
            n_hidden=c.n_hidden, dropout_rate=0.0, use_batch_norm=bn_dec, use_layer_norm=ln_dec,
        )
        # softmax temperature of classify() (saved with the weights): 1 is the classifier as
        # trained; SCANVI.train sets it from the labelled validation cells (temperature
        # scaling). A buffer, so it draws no random numbers and is not trained.
        self.register_buffer("temperature", torch.ones(()))

    # ------------------------------------------------------------------ fast path
    def fused_training_step(self, *, device: torch.device | str, sparse: bool,
                            semi_supervised: bool = False):
        """Return the written-out training step for this module, or None, and why not.

        Returns ``(step, reason)``. ``step(module, tensors, kl_weight, *, feed_labels,
        labelled_tensors, classification_ratio) -> LossOutput`` computes what :meth:`forward`
        computes and sets every parameter's gradient
        (:func:`cellvi.module._scanvae_step.training_step`: the scVI part written out, the label
        part in autograd on ``(cells, n_latent)`` tensors). It is offered to the
        semi-supervised plan (``semi_supervised=True``), which passes the labels and the
        labelled minibatch; the unsupervised plan trains SCANVAE through autograd. Dense and
        sparse minibatches are both taken (``sparse`` is not a condition). None when a subclass
        overrides a method the step reproduces
        (:data:`~cellvi.module._scanvae_step.WRITES_OUT`) or an option is not supported.
        """
        from . import _scanvae_step

        if not semi_supervised:
            return None, (f"{type(self).__name__}'s fused step is the semi-supervised plan's "
                          "(labels fed, the labelled minibatch's classification term)")
        overridden = [name for name in _scanvae_step.WRITES_OUT
                      if getattr(type(self), name) is not getattr(SCANVAE, name)]
        if overridden:
            return None, f"{type(self).__name__} overrides {', '.join(overridden)}"
        reason = _scanvae_step.unsupported(self, device=device)
        return (None, reason) if reason else (_scanvae_step.training_step, "")

    @property
    def y_prior(self) -> torch.Tensor:
        """Prior class probabilities, ``(n_labels,)``."""
        return self.label_head.y_prior

    # ------------------------------------------------------------------ classification
    def log_q_y(self, z: torch.Tensor) -> torch.Tensor:
        """Log class probabilities ``log q(y | z1)`` of latent points ``z`` ``(cells, n_latent)``.

        Returns ``(cells, n_labels)``. With ``use_labels_groups`` the classes' log probabilities
        are ``log q(group | z1) + log q(class | z1, group)``.
        """
        return self.label_head.log_q_y(z)

    def _classifier_latent(self, inference_outputs: dict, use_posterior_mean: bool):
        if use_posterior_mean:
            return self.z_encoder.transform(inference_outputs["qz"].loc)
        return inference_outputs["z"]

    def classify(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
        use_posterior_mean: bool = True,
    ) -> torch.Tensor:
        r"""Class probabilities of counts ``x`` ``(cells, genes)``, temperature-scaled.

        :math:`\mathrm{softmax}(\log q(y \mid z_1) / T)` with :math:`T` the module's
        ``temperature`` buffer (1 leaves ``q(y | z1)`` as trained; the argmax never changes).
        ``z1`` is the posterior mean of ``q(z1 | x)`` (a sample when ``use_posterior_mean`` is
        False). ``batch_index`` (default: batch 0) only matters when the encoder sees the batch.
        Returns ``(cells, n_labels)`` probabilities.
        """
        log_p = self._log_classify(x, batch_index, cont_covs, cat_covs, use_posterior_mean)
        if float(self.temperature) != 1.0:
            log_p = torch.log_softmax(log_p / self.temperature, dim=-1)
        return log_p.exp()

    def classify_log_probs(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        cont_covs: torch.Tensor | None = None,
        cat_covs: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return ``log q(y | z1)`` as trained (no temperature), ``(cells, n_labels)``.

        What the temperature is fitted on; :meth:`classify` is its temperature-scaled softmax.
        """
        return self._log_classify(x, batch_index, cont_covs, cat_covs, True)

    def _log_classify(self, x, batch_index=None, cont_covs=None, cat_covs=None,
                      use_posterior_mean=True) -> torch.Tensor:
        if batch_index is None:
            batch_index = torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
        inf = self.inference(x, batch_index, cont_covs=cont_covs, cat_covs=cat_covs)
        return self.log_q_y(self._classifier_latent(inf, use_posterior_mean))

    def classification_loss(self, labelled_tensors: Tensors) -> torch.Tensor:
        """Mean cross-entropy of ``q(y | z1)`` on labelled cells (others in the batch ignored)."""
        log_p = self._log_classify(
            labelled_tensors[keys.X],
            labelled_tensors[keys.BATCH],
            labelled_tensors.get(keys.CONT_COVS),
            labelled_tensors.get(keys.CAT_COVS),
        )
        return self.label_head.cross_entropy(log_p, labelled_tensors[keys.LABELS])

    # ------------------------------------------------------------------ plumbing
    def _labels(self, tensors: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(codes, labelled)``: label codes clamped to the classes, and a mask."""
        x = tensors[keys.X]
        return self.label_head.codes(tensors.get(keys.LABELS), x.shape[0], x.device)

    def generative_inputs(self, tensors: Tensors, inference_outputs: dict) -> dict:
        """Pick the inputs of :meth:`generative`; ``y`` is only used by ``dispersion="gene-label"``.

        For that dispersion an unlabelled cell is given its most likely class under
        ``q(y | z1)`` (a plug-in choice: the counts do not depend on ``y`` otherwise).
        """
        out = super().generative_inputs(tensors, inference_outputs)
        if self.dispersion == "gene-label":
            y, labelled = self._labels(tensors)
            with torch.no_grad():
                z = self._classifier_latent(inference_outputs, True)
                guess = self.log_q_y(z).argmax(-1)
            out["y"] = torch.where(labelled, y, guess).unsqueeze(-1)
        else:
            out["y"] = None
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
        """Run inference, generative and :meth:`loss` on a minibatch."""
        inference_outputs = self.inference(**self.inference_inputs(tensors))
        generative_outputs = self.generative(
            **self.generative_inputs(tensors, inference_outputs), transform_batch=transform_batch
        )
        loss = self.loss(
            tensors, inference_outputs, generative_outputs, feed_labels=feed_labels,
            kl_weight=kl_weight, labelled_tensors=labelled_tensors,
            classification_ratio=classification_ratio,
        )
        return inference_outputs, generative_outputs, loss

    def _label_terms(self, z: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For every cell and every class: ``log p(z1 | z2, y)`` and ``KL(q(z2|z1,y) || p(z2))``.

        ``z`` is the (transformed) ``z1`` fed to the networks, ``u`` its untransformed value whose
        density is modelled. Both results are ``(cells, n_labels)``, one ``z2`` sample each.
        """
        n, k = z.shape[0], self.n_labels
        ys = torch.arange(k, device=z.device).repeat_interleave(n).unsqueeze(-1)  # (k*n, 1)
        z_rep = z.repeat(k, 1)  # (k*n, n_latent), class-major
        qz2, z2 = self.encoder_z2_z1(z_rep, ys)
        pz1, _ = self.decoder_z1_z2(z2, ys)
        log_pz1 = pz1.log_prob(u.repeat(k, 1)).sum(-1).reshape(k, n).T  # (cells, n_labels)
        pz2 = Normal(torch.zeros_like(qz2.loc), torch.ones_like(qz2.scale), validate_args=False)
        kl_z2 = kl_divergence(qz2, pz2).sum(-1).reshape(k, n).T  # (cells, n_labels)
        return log_pz1, kl_z2

    # ------------------------------------------------------------------ loss
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

        Parameters
        ----------
        tensors
            The minibatch.
        inference_outputs, generative_outputs
            Outputs of :meth:`inference` and :meth:`generative` on it.
        feed_labels
            Use the labels of the labelled cells of ``tensors`` (codes ``0 .. n_labels - 1``);
            otherwise every cell is treated as unlabelled and ``y`` is summed out.
        kl_weight
            Warm-up weight of the KL terms of ``z1``, ``z2`` and ``y`` (not of the library).
        labelled_tensors
            A minibatch of labelled cells for the classification loss (None: no such term).
        classification_ratio
            Weight of the classification loss (None: the module's ``classification_ratio``).

        Returns
        -------
        LossOutput
            ``reconstruction_loss`` is ``-log p(x | z1)`` per cell; ``kl_local`` holds ``kl_z1``
            (``log q(z1|x) - E log p(z1|z2,y)``), ``kl_z2``, ``kl_y`` (``KL(q(y|z1) || p(y))``
            for an unlabelled cell, ``-log p(y)`` for a labelled one) and, when the library is
            modelled, ``kl_l``. Their sum with the reconstruction loss is the per-cell negative
            ELBO (of ``log p(x)``, or of ``log p(x, y)`` for a labelled cell). ``extra`` holds
            ``classification_loss`` when ``labelled_tensors`` is given.
        """
        x = tensors[keys.X]
        reconstruction = -log_prob_rows(
            generative_outputs["px"], x, tensors.get(keys.INDICES_NONZERO)
        )  # (cells,)
        z, u, qz = (inference_outputs[k] for k in ("z", "z_untransformed", "qz"))
        log_qz1 = qz.log_prob(u).sum(-1)  # (cells,)
        log_pz1, kl_z2_all = self._label_terms(z, u)  # (cells, n_labels) each

        log_qy = self.log_q_y(z)  # (cells, n_labels)
        qy = log_qy.exp()
        y, labelled = self.label_head.feed(tensors.get(keys.LABELS), x.shape[0], x.device,
                                           feed_labels)
        weights = torch.where(labelled.unsqueeze(-1), one_hot(y, self.n_labels), qy)
        kl_z1 = log_qz1 - (weights * log_pz1).sum(-1)
        kl_z2 = (weights * kl_z2_all).sum(-1)
        kl_y = self.label_head.kl_y(log_qy, y, labelled, qy)
        kl_local = {"kl_z1": kl_z1, "kl_z2": kl_z2, "kl_y": kl_y}
        weighted = kl_weight * (kl_z1 + kl_z2 + kl_y)
        if generative_outputs["pl"] is not None:
            kl_l = kl_divergence(inference_outputs["ql"], generative_outputs["pl"]).sum(-1)
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
        r"""Importance-sampling estimate of :math:`\log p(x)` per cell, shape ``(cells,)``.

        With :math:`z_1 \sim q(z_1 \mid x)` (and the library from :math:`q`), the prior density
        :math:`p(z_1) = \sum_y p(y) \int p(z_1 \mid z_2, y) p(z_2) dz_2` is estimated without
        bias by enumerating the classes and drawing one :math:`z_2 \sim q(z_2 \mid z_1, y)` per
        class. Labels in ``tensors`` are ignored (this is :math:`p(x)`, not :math:`p(x, y)`).
        """
        chunks = []
        log_prior = torch.log(self.y_prior)
        remaining = n_mc_samples
        x = tensors[keys.X]
        n = x.shape[0]
        while remaining > 0:
            k = min(n_mc_samples_per_pass, remaining)
            remaining -= k
            inf = self.inference(**self.inference_inputs(tensors), n_samples=k)
            gen = self.generative(**self.generative_inputs(tensors, inf))
            log_px = log_prob_rows(gen["px"], x).reshape(k, n)  # (k, cells)
            zu = inf["z_untransformed"].reshape(k, n, -1)
            zt = inf["z"].reshape(k * n, -1)
            log_qz1 = inf["qz"].log_prob(zu).sum(-1)  # (k, cells)
            labels = torch.arange(self.n_labels, device=x.device)
            ys = labels.repeat_interleave(k * n).unsqueeze(-1)  # (L*k*n, 1)
            qz2, z2 = self.encoder_z2_z1(zt.repeat(self.n_labels, 1), ys)
            pz1, _ = self.decoder_z1_z2(z2, ys)
            log_w_y = (
                pz1.log_prob(zu.reshape(k * n, -1).repeat(self.n_labels, 1)).sum(-1)
                + Normal(0.0, 1.0, validate_args=False).log_prob(z2).sum(-1)
                - qz2.log_prob(z2).sum(-1)
            ).reshape(self.n_labels, k, n) + log_prior[:, None, None]
            log_pz1 = torch.logsumexp(log_w_y, dim=0)  # (k, cells)
            log_w = log_px + log_pz1 - log_qz1
            if inf["ql"] is not None:
                lib = inf["library"]
                log_w = log_w + (gen["pl"].log_prob(lib) - inf["ql"].log_prob(lib)).sum(
                    -1
                ).reshape(k, n)
            chunks.append(log_w)
        log_w = torch.cat(chunks, dim=0)
        return torch.logsumexp(log_w, dim=0) - math.log(n_mc_samples)
