r"""gimVI's joint variational autoencoder (Lopez et al., 2019): several datasets, one latent space.

Datasets :math:`d = 1..D` (scRNA-seq and spatial) measure gene sets :math:`S_d` out of the union
:math:`G` of all their genes. For cell :math:`n` of dataset :math:`d`, in batch :math:`s_n` (the
batches of the datasets are numbered one after the other, so no two datasets share one):

.. math::

    z_n \sim \mathcal N(0, I), \qquad
    \ell_n \sim \mathrm{LogNormal}(\mu_{d, s_n}, \sigma^2_{d, s_n}) \text{ (or observed)}, \\
    h_{ng} = f_w(z_n, s_n)_g \quad (g \in G), \qquad
    \rho^{(d)}_{ng} = \frac{e^{h_{ng}}}{\sum_{k \in S_d} e^{h_{nk}}}, \qquad
    x_{ng} \sim p_d(\ell_n \rho^{(d)}_{ng}, \theta_{g s_n}, \pi_{ng}) \quad (g \in S_d),

with :math:`p_d` the dataset's likelihood (ZINB for sequencing, NB or Poisson for spatial
counts). The decoder :math:`f_w` is shared: optional layers conditioned on the batch (so
dataset-specific), optional shared layers, then one linear map to every gene of :math:`G`.
Each dataset's likelihood runs over the genes it measures only, with the expression
renormalised over them (the softmax over :math:`S_d`): a gene a dataset lacks is neither
penalised nor rewarded, and its expression in that dataset's cells is imputed as
:math:`\rho^{(d')}_{ng}` for any decoding set :math:`S_{d'}`.

Inference: :math:`q(z_n \mid x_n)` is a diagonal Normal from a per-dataset head (fully
connected layers over :math:`S_d`) followed by shared layers; a modelled library has its own
per-dataset encoder. The loss of a dataset's minibatch is the per-cell negative ELBO with both
KL terms scaled by the warm-up weight (as gimVI does); the training plan
(:class:`cellvi.model.gimvi.GIMVITrainingPlan`) averages it over the cells of all datasets'
minibatches and adds the adversarial term on :math:`z` that mixes the datasets.

Training decodes only the logits of :math:`S_d` for dataset :math:`d` (rows of the output
layer): the same function as decoding all of :math:`G` and renormalising, at the cost of the
measured genes only (33 instead of thousands for an osmFISH minibatch). The training step's
loss (:meth:`JVAE.training_loss`) scores a dataset with one inverse dispersion per gene in one
compiled pass that also forms the gradients of the likelihood and its softmax (about 20 % off
the step on the benchmark simulations, 2 cores, same loss and gradients as :meth:`JVAE.forward`
to float rounding).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.distributions import Distribution, Normal, kl_divergence

from cellvi import _native, keys
from cellvi.distributions import StandardNormal, log_prob_rows
from cellvi.distributions._rowsum import _csr, nb_log_prob_rows_softmax_grad
from cellvi.nn import Encoder, FCLayers
from cellvi.nn._rate import softmax_rate

from ._base import RATE_FLOOR, LossOutput, row_sums
from ._config import ConfiguredModule, ModuleConfig, check_choice
from .vae import count_distribution

Tensors = dict[str, torch.Tensor]
LIKELIHOODS = ("zinb", "nb", "poisson")
DISPERSIONS = ("gene", "gene-batch", "gene-label", "gene-cell")


@dataclass(frozen=True, kw_only=True)
class JVAEConfig(ModuleConfig):
    """Options of :class:`JVAE` (gimVI's module).

    The first group follows from the datasets (:class:`cellvi.model.GIMVI` sets it); the rest
    are the network's options, with scvi-tools 1.4.2's defaults.

    Attributes
    ----------
    dim_input_list
        Number of genes of each dataset.
    total_genes
        Number of genes of the union of the datasets (the decoder's outputs).
    indices_mappings
        For each dataset, the positions of its genes among the ``total_genes``, in its own gene
        order.
    gene_likelihoods
        Likelihood of each dataset: ``"zinb"``, ``"nb"`` or ``"poisson"``.
    model_library_bools
        For each dataset, whether its library size is a latent variable (True) or the observed
        total counts (False).
    library_log_means, library_log_vars
        For each dataset, the per-batch mean and variance of the log library size (the prior of
        a modelled library; ignored for an observed one).
    n_batch_list
        Number of batches of each dataset (at least 1); the decoder's batch codes run over all
        of them, dataset after dataset.
    n_labels
        Number of label categories (used only by ``dispersion="gene-label"``).
    label_maps
        For each dataset, the global label code of each of its own label codes (for
        ``dispersion="gene-label"``); None: the codes are already global.
    n_latent
        Dimension of the latent space.
    n_layers_encoder_individual
        Layers of each dataset's encoder head (at least 1).
    n_layers_encoder_shared
        Shared encoder layers after the heads (0: the heads feed the latent mean and variance).
    dim_hidden_encoder
        Width of the encoder layers.
    n_layers_decoder_individual
        Decoder layers conditioned on the batch (and so on the dataset).
    n_layers_decoder_shared
        Shared decoder layers (after the conditioned ones).
    dim_hidden_decoder_individual, dim_hidden_decoder_shared
        Widths of those layers.
    dropout_rate_encoder, dropout_rate_decoder
        Dropout rates.
    dispersion
        ``"gene"``, ``"gene-batch"`` (one inverse dispersion per gene and batch, over all the
        datasets' batches), ``"gene-label"`` or ``"gene-cell"``.
    log_variational
        Encode ``log(1 + x)`` rather than ``x``.
    dataset_gene_offsets
        Give each dataset a learned offset on the logit of each gene it measures (zero at the
        start): its platform's per-gene capture efficiency, so that the latent space need not
        bend to absorb it. A gene a dataset does not measure has no offset there and is imputed
        from the shared decoder.
    """

    dim_input_list: Sequence[int]
    total_genes: int
    indices_mappings: Sequence[Sequence[int]]
    gene_likelihoods: Sequence[str]
    model_library_bools: Sequence[bool]
    library_log_means: Sequence[Sequence[float] | None] | None = None
    library_log_vars: Sequence[Sequence[float] | None] | None = None
    n_batch_list: Sequence[int] | None = None
    n_labels: int = 0
    label_maps: Sequence[Sequence[int]] | None = None
    n_latent: int = 10
    n_layers_encoder_individual: int = 1
    n_layers_encoder_shared: int = 1
    dim_hidden_encoder: int = 64
    n_layers_decoder_individual: int = 0
    n_layers_decoder_shared: int = 0
    dim_hidden_decoder_individual: int = 64
    dim_hidden_decoder_shared: int = 64
    dropout_rate_encoder: float = 0.2
    dropout_rate_decoder: float = 0.2
    dispersion: Literal["gene", "gene-batch", "gene-label", "gene-cell"] = "gene-batch"
    log_variational: bool = True
    dataset_gene_offsets: bool = False

    def __post_init__(self):
        def tuples(name, kind):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(
                    None if v is None else tuple(kind(u) for u in np.asarray(v).ravel().tolist())
                    for v in value))

        n = len(self.dim_input_list)
        object.__setattr__(self, "dim_input_list", tuple(int(v) for v in self.dim_input_list))
        object.__setattr__(self, "gene_likelihoods", tuple(str(v) for v in self.gene_likelihoods))
        object.__setattr__(self, "model_library_bools",
                           tuple(bool(v) for v in self.model_library_bools))
        tuples("indices_mappings", int)
        tuples("library_log_means", float)
        tuples("library_log_vars", float)
        tuples("label_maps", int)
        if self.n_batch_list is None:
            object.__setattr__(self, "n_batch_list", (1,) * n)
        object.__setattr__(self, "n_batch_list", tuple(int(v) for v in self.n_batch_list))
        if n < 1:
            raise ValueError("JVAE needs at least one dataset (dim_input_list is empty).")
        for name in ("indices_mappings", "gene_likelihoods", "model_library_bools",
                     "n_batch_list"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} entries for {n} datasets; give one "
                    "per dataset.")
        for d, kind in enumerate(self.gene_likelihoods):
            check_choice(f"gene_likelihoods[{d}]", kind, LIKELIHOODS)
        check_choice("dispersion", self.dispersion, DISPERSIONS)
        for d, (n_in, genes) in enumerate(zip(self.dim_input_list, self.indices_mappings)):
            if len(genes) != n_in or n_in < 1:
                raise ValueError(
                    f"Dataset {d} has dim_input_list[{d}] = {n_in} genes but "
                    f"{len(genes)} positions in indices_mappings[{d}].")
            if genes and (min(genes) < 0 or max(genes) >= self.total_genes
                          or len(set(genes)) != len(genes)):
                raise ValueError(
                    f"indices_mappings[{d}] must be distinct positions in [0, total_genes = "
                    f"{self.total_genes}).")
        if any(b < 1 for b in self.n_batch_list):
            raise ValueError(f"Every dataset has at least one batch; got {self.n_batch_list}.")
        for d, modelled in enumerate(self.model_library_bools):
            if not modelled:
                continue
            means = (self.library_log_means or [None] * n)[d]
            var = (self.library_log_vars or [None] * n)[d]
            if means is None or var is None or len(means) != self.n_batch_list[d] \
                    or len(var) != self.n_batch_list[d]:
                raise ValueError(
                    f"Dataset {d} models its library size: it needs library_log_means[{d}] and "
                    f"library_log_vars[{d}], one value per batch ({self.n_batch_list[d]}).")
        if self.dispersion == "gene-label" and self.n_labels < 1:
            raise ValueError("dispersion='gene-label' needs n_labels >= 1 (set a labels_key).")
        if self.n_layers_encoder_individual < 1:
            raise ValueError("n_layers_encoder_individual must be >= 1 (each dataset's head).")
        for name in ("n_layers_encoder_shared", "n_layers_decoder_individual",
                     "n_layers_decoder_shared"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        for name in ("dropout_rate_encoder", "dropout_rate_decoder"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}.")

    @property
    def n_datasets(self) -> int:
        """Number of datasets."""
        return len(self.dim_input_list)

    @property
    def n_batch(self) -> int:
        """Number of batches over all the datasets."""
        return int(sum(self.n_batch_list))


class JVAE(ConfiguredModule):
    """Joint variational autoencoder of several datasets with different genes (gimVI).

    Built from :class:`JVAEConfig`. Each minibatch belongs to one dataset, named by ``mode``
    (its position among the datasets): :meth:`inference` encodes it with that dataset's head,
    :meth:`generative` decodes the genes of ``decode_mode`` (default: the same dataset) and
    :meth:`loss` scores the counts under that dataset's likelihood.

    Attributes
    ----------
    n_latent
        Dimension of the latent space.
    n_input_list
        Genes of each dataset.
    """

    Config = JVAEConfig

    def __init__(self, *args, **options):
        super().__init__(*args, **options)
        c = self.config
        self.n_latent = c.n_latent
        self.n_input_list = list(c.dim_input_list)
        self.total_genes = c.total_genes
        self.gene_likelihoods = list(c.gene_likelihoods)
        self.model_library_bools = list(c.model_library_bools)
        self.dispersion = c.dispersion
        self.log_variational = c.log_variational
        self.n_batch = c.n_batch
        self.n_labels = c.n_labels
        offsets = np.concatenate([[0], np.cumsum(c.n_batch_list)[:-1]]).astype(np.int64)
        self.batch_offsets = [int(o) for o in offsets]
        # which rows of the output layer each dataset reads: a slice when contiguous
        self._genes: list[slice | torch.Tensor] = []
        for d, genes in enumerate(c.indices_mappings):
            g = np.asarray(genes, dtype=np.int64)
            if np.array_equal(g, np.arange(g[0], g[0] + len(g))):
                self._genes.append(slice(int(g[0]), int(g[0]) + len(g)))
            else:
                self.register_buffer(f"genes_{d}", torch.from_numpy(g), persistent=False)
                self._genes.append(torch.from_numpy(g))
        for d, modelled in enumerate(c.model_library_bools):
            if modelled:
                self.register_buffer(f"library_log_means_{d}", torch.tensor(
                    c.library_log_means[d], dtype=torch.float32), persistent=False)
                self.register_buffer(f"library_log_vars_{d}", torch.tensor(
                    c.library_log_vars[d], dtype=torch.float32), persistent=False)
        if c.label_maps is not None:
            for d, m in enumerate(c.label_maps):
                self.register_buffer(f"label_map_{d}", torch.tensor(m, dtype=torch.int64),
                                     persistent=False)

        h = c.dim_hidden_encoder
        self.encoder_heads = nn.ModuleList(
            FCLayers(n_in, h, n_layers=c.n_layers_encoder_individual, n_hidden=h,
                     dropout_rate=c.dropout_rate_encoder, use_batch_norm=True)
            for n_in in c.dim_input_list)
        self.encoder_shared = (
            FCLayers(h, h, n_layers=c.n_layers_encoder_shared, n_hidden=h,
                     dropout_rate=c.dropout_rate_encoder, use_batch_norm=True)
            if c.n_layers_encoder_shared else None)
        self.z_mean_var = nn.Linear(h, 2 * c.n_latent)  # mean and log variance heads, fused
        self.l_encoders = nn.ModuleList(
            Encoder(n_in, 1, n_layers=1, n_hidden=128, dropout_rate=c.dropout_rate_encoder)
            if modelled else nn.Identity()
            for n_in, modelled in zip(c.dim_input_list, c.model_library_bools))

        n_in = c.n_latent
        self.decoder_individual = None
        if c.n_layers_decoder_individual:
            n_out = (c.dim_hidden_decoder_individual if c.n_layers_decoder_shared
                     else c.dim_hidden_decoder_shared)
            self.decoder_individual = FCLayers(
                n_in, n_out, n_cat_list=[c.n_batch], n_layers=c.n_layers_decoder_individual,
                n_hidden=c.dim_hidden_decoder_individual, dropout_rate=c.dropout_rate_decoder,
                use_batch_norm=True)
            n_in = n_out
        self.decoder_shared = None
        if c.n_layers_decoder_shared:
            self.decoder_shared = FCLayers(
                n_in, c.dim_hidden_decoder_shared, n_layers=c.n_layers_decoder_shared,
                n_hidden=c.dim_hidden_decoder_shared, dropout_rate=c.dropout_rate_decoder,
                use_batch_norm=True)
            n_in = c.dim_hidden_decoder_shared
        self.px_scale_decoder = nn.Linear(n_in, c.total_genes)
        self.gene_offsets = (nn.ParameterList(nn.Parameter(torch.zeros(n))
                                              for n in c.dim_input_list)
                             if c.dataset_gene_offsets else None)
        self.px_dropout_decoder = nn.Linear(n_in, c.total_genes)
        if c.dispersion == "gene-cell":
            self.px_r_decoder = nn.Linear(n_in, c.total_genes)
        elif c.dispersion == "gene":
            self.px_r = nn.Parameter(torch.randn(c.total_genes))
        elif c.dispersion == "gene-batch":
            self.px_r = nn.Parameter(torch.randn(c.total_genes, c.n_batch))
        else:
            self.px_r = nn.Parameter(torch.randn(c.total_genes, c.n_labels))

    # ------------------------------------------------------------------ helpers
    def _check_mode(self, mode: int) -> int:
        if not isinstance(mode, int | np.integer) or not 0 <= mode < self.config.n_datasets:
            raise ValueError(
                f"mode must be a dataset index in [0, {self.config.n_datasets}), got {mode!r}.")
        return int(mode)

    def gene_positions(self, mode: int) -> slice | torch.Tensor:
        """Positions of dataset ``mode``'s genes among all the genes (a slice when in a run)."""
        g = self._genes[self._check_mode(mode)]
        if isinstance(g, torch.Tensor):
            return getattr(self, f"genes_{mode}")
        return g

    def _rows(self, t: torch.Tensor, genes: slice | torch.Tensor | None) -> torch.Tensor:
        """Rows ``genes`` of a ``(total_genes, ...)`` parameter (all of them for None)."""
        if genes is None:
            return t
        if isinstance(genes, slice):
            return t[genes]
        return t.index_select(0, genes)

    def global_batch(self, batch_index: torch.Tensor | None, mode: int) -> torch.Tensor | None:
        """Batch codes of dataset ``mode`` among all the datasets' batches."""
        if batch_index is None:
            return None
        return batch_index.long() + self.batch_offsets[mode]

    def adversarial_shape(self) -> tuple[int, int]:
        """Return ``(n_latent, n_datasets)``: the discriminator's input width and classes."""
        return self.n_latent, self.config.n_datasets

    # ------------------------------------------------------------------ inference
    def inference(
        self, x: torch.Tensor, mode: int = 0, n_samples: int = 1
    ) -> dict[str, torch.Tensor | Distribution | None]:
        """Encode counts ``x`` ``(cells, genes of dataset mode)`` of dataset ``mode``.

        Returns ``qz`` (Normal over ``z``), ``z`` (a sample, ``(n_samples, cells, n_latent)``
        when ``n_samples > 1``), ``ql`` (Normal over the log library, None when observed) and
        ``library`` (the log library size, sampled when modelled).
        """
        mode = self._check_mode(mode)
        if x.shape[-1] != self.n_input_list[mode]:
            raise ValueError(
                f"Dataset {mode} has {self.n_input_list[mode]} genes; got counts with "
                f"{x.shape[-1]} columns.")
        x_ = torch.log1p(x) if self.log_variational else x
        h = self.encoder_heads[mode](x_)
        if self.encoder_shared is not None:
            h = self.encoder_shared(h)
        mean, raw_var = self.z_mean_var(h).chunk(2, dim=-1)
        qz = Normal(mean, (raw_var.exp() + 1e-4).sqrt(), validate_args=False)
        ql = None
        if self.model_library_bools[mode]:
            ql, library = self.l_encoders[mode](x_)
        else:
            library = torch.log(row_sums(x)).unsqueeze(-1)  # (cells, 1)
        if n_samples > 1:
            z = qz.rsample((n_samples,))
            library = (ql.rsample((n_samples,)) if ql is not None
                       else library.expand(n_samples, *library.shape))
        else:
            z = qz.rsample()
        return {"qz": qz, "z": z, "ql": ql, "library": library}

    # ------------------------------------------------------------------ generative
    def _hidden(self, z: torch.Tensor, batch_index: torch.Tensor | None, mode: int):
        h = z
        if self.decoder_individual is not None:
            if batch_index is None:
                raise ValueError("This decoder is conditioned on the batch: pass batch_index.")
            h = self.decoder_individual(h, self.global_batch(batch_index, mode))
        if self.decoder_shared is not None:
            h = self.decoder_shared(h)
        return h

    def decoder_logits(
        self, z: torch.Tensor, batch_index: torch.Tensor | None = None, mode: int = 0,
        genes: slice | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the decoder's hidden output and the expression logits of ``genes``.

        ``genes``: positions among all the genes (None: all); ``batch_index`` and ``mode`` say
        which batch, of which dataset, conditions the decoder.
        """
        h = self._hidden(z, batch_index, mode)
        w = self._rows(self.px_scale_decoder.weight, genes)
        b = self._rows(self.px_scale_decoder.bias, genes)
        return h, nn.functional.linear(h, w, b)

    def _theta(self, h, batch_index, y, genes, mode) -> torch.Tensor:
        if self.dispersion == "gene-cell":
            w = self._rows(self.px_r_decoder.weight, genes)
            b = self._rows(self.px_r_decoder.bias, genes)
            return nn.functional.linear(h, w, b).exp()
        px_r = self._rows(self.px_r, genes)  # (genes,) or (genes, categories)
        if self.dispersion == "gene":
            return px_r.exp()
        if self.dispersion == "gene-batch":
            codes = self.global_batch(batch_index, mode)
        else:
            if y is None:
                raise ValueError("dispersion='gene-label' needs the labels (y).")
            codes = y.long()
            if self.config.label_maps is not None:
                codes = getattr(self, f"label_map_{mode}")[codes]
        return px_r.t()[codes.reshape(-1)].exp()  # (cells, genes)

    def generative(
        self,
        z: torch.Tensor,
        library: torch.Tensor,
        batch_index: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        mode: int = 0,
        decode_mode: int | None = None,
    ) -> dict[str, torch.Tensor | Distribution]:
        """Decode ``z`` into dataset ``decode_mode``'s genes with its likelihood.

        ``decode_mode`` (default ``mode``) picks the genes and the likelihood; ``mode`` the
        batch codes' dataset. Returns ``px`` (over the decoded genes, its ``scale`` the
        expression renormalised over them), ``px_scale``, ``px_rate``, ``pz`` and ``pl`` (the
        library prior, None when observed).
        """
        mode = self._check_mode(mode)
        decode_mode = mode if decode_mode is None else self._check_mode(decode_mode)
        genes = self.gene_positions(decode_mode)
        h, logits = self.decoder_logits(z, batch_index, mode, genes)
        if self.gene_offsets is not None:
            logits = logits + self.gene_offsets[decode_mode]
        scale, rate = softmax_rate(logits, library, RATE_FLOOR)
        kind = self.gene_likelihoods[decode_mode]
        theta = zi = None
        if kind != "poisson":
            theta = self._theta(h, batch_index, y, genes, mode)
        if kind == "zinb":
            zi = nn.functional.linear(h, self._rows(self.px_dropout_decoder.weight, genes),
                                      self._rows(self.px_dropout_decoder.bias, genes))
        px = count_distribution(kind, mu=rate, theta=theta, zi_logits=zi, scale=scale)
        return {"px": px, "px_scale": scale, "px_rate": rate, "pz": StandardNormal(z),
                "pl": self._library_prior(batch_index, mode)}

    def _library_prior(self, batch_index: torch.Tensor | None, mode: int) -> Normal | None:
        if not self.model_library_bools[mode]:
            return None
        means = getattr(self, f"library_log_means_{mode}")
        var = getattr(self, f"library_log_vars_{mode}")
        idx = (torch.zeros(1, dtype=torch.long, device=means.device) if batch_index is None
               else batch_index.reshape(-1).long())
        return Normal(means[idx].unsqueeze(-1), var[idx].sqrt().unsqueeze(-1),
                      validate_args=False)

    @torch.inference_mode()
    def impute(
        self,
        x: torch.Tensor,
        mode: int,
        batch_index: torch.Tensor | None = None,
        deterministic: bool = True,
        decode_mode: int | None = None,
        normalized: bool = True,
        genes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""Return the expression of every gene (or of ``genes``) in dataset ``mode``'s cells.

        The decoder's output over all the genes, renormalised over the genes of ``decode_mode``
        (default: ``mode``, the cells' own dataset): :math:`\rho^{(d')}_{ng}`, ``(cells,
        genes)``; with ``normalized=False``, times the cell's library size (the expected
        counts). ``deterministic`` uses the posterior means of ``z`` and of a modelled library.
        """
        mode = self._check_mode(mode)
        decode_mode = mode if decode_mode is None else self._check_mode(decode_mode)
        inf = self.inference(x, mode)
        z, library = inf["z"], inf["library"]
        if deterministic:
            z = inf["qz"].loc
            if inf["ql"] is not None:
                library = inf["ql"].loc
        _, logits = self.decoder_logits(z, batch_index, mode)  # (cells, total_genes)
        positions = self.gene_positions(decode_mode)
        if self.gene_offsets is not None:  # the decoding dataset's own genes get its offsets
            offsets = torch.zeros(self.total_genes, dtype=logits.dtype, device=logits.device)
            offsets[positions] = self.gene_offsets[decode_mode]
            logits = logits + offsets
        own = _columns(logits, positions)
        log_norm = torch.logsumexp(own, dim=-1, keepdim=True)
        if genes is not None:
            logits = _columns(logits, genes)
        out = (logits - log_norm).exp_()
        if not normalized:
            out.mul_(library.exp())
        return out

    # ------------------------------------------------------------------ loss
    def forward(
        self, tensors: Tensors, *, mode: int = 0, kl_weight: float = 1.0
    ) -> tuple[dict, dict, LossOutput]:
        """Run inference, generative and loss on a minibatch of dataset ``mode``."""
        inference_outputs = self.inference(tensors[keys.X], mode)
        generative_outputs = self.generative(
            inference_outputs["z"], inference_outputs["library"], tensors.get(keys.BATCH),
            tensors.get(keys.LABELS), mode)
        loss = self.loss(tensors, inference_outputs, generative_outputs, kl_weight=kl_weight)
        return inference_outputs, generative_outputs, loss

    def loss(
        self, tensors: Tensors, inference_outputs: dict, generative_outputs: dict,
        kl_weight: float = 1.0,
    ) -> LossOutput:
        """Negative ELBO of a minibatch of one dataset, both KL terms scaled by ``kl_weight``.

        ``reconstruction_loss`` is ``-log p(x | z, l)`` per cell over the dataset's genes;
        ``kl_local`` holds ``kl_z`` and ``kl_l`` (zero when the library is observed).
        """
        x = tensors[keys.X]
        reconstruction = -log_prob_rows(generative_outputs["px"], x,
                                        tensors.get(keys.INDICES_NONZERO))  # (cells,)
        kl_z = kl_divergence(inference_outputs["qz"], generative_outputs["pz"]).sum(-1)
        if generative_outputs["pl"] is not None:
            kl_l = kl_divergence(inference_outputs["ql"], generative_outputs["pl"]).sum(-1)
        else:
            kl_l = torch.zeros_like(kl_z)
        loss = torch.mean(reconstruction + kl_weight * (kl_z + kl_l))
        return LossOutput(loss=loss, reconstruction_loss=reconstruction,
                          kl_local={"kl_z": kl_z, "kl_l": kl_l})

    def _fused_theta(self, mode: int, decode_mode: int) -> torch.Tensor | None:
        """Return the ``(genes,)`` log inverse dispersion of dataset ``mode``, if one per gene.

        ``"gene"``, or ``"gene-batch"`` for a dataset of one batch; None otherwise (the
        dispersion then varies between the minibatch's cells).
        """
        genes = self.gene_positions(decode_mode)
        if self.dispersion == "gene":
            return self._rows(self.px_r, genes)
        if self.dispersion == "gene-batch" and self.config.n_batch_list[mode] == 1:
            return self._rows(self.px_r, genes)[:, self.batch_offsets[mode]]
        return None

    def training_loss(
        self, tensors: Tensors, mode: int = 0, kl_weight: float = 1.0
    ) -> tuple[torch.Tensor, LossOutput]:
        r"""Return ``(z, loss)`` of a minibatch of dataset ``mode``: :meth:`forward`'s, cheaper.

        The same function of the parameters, with the same random draws, as
        ``forward(tensors, mode=mode, kl_weight=kl_weight)`` (its ``inference_outputs["z"]``
        and its :class:`LossOutput`), for the training step. When the dataset's likelihood is
        the NB or ZINB with one inverse dispersion per gene, on float32 CPU tensors with the
        compiled kernels, the likelihood, its softmax and their gradients are one kernel pass
        (:func:`cellvi.distributions._rowsum.nb_log_prob_rows_softmax_grad`, through
        :class:`_RowsFromLogits`): neither the normalised expression nor the expected counts
        are written out, and autograd records 1 node instead of about 12. The KL of
        :math:`z` is written out, :math:`\tfrac12(\sigma^2 + \mu^2 - 1) - \log\sigma`.
        Anything else goes through :meth:`forward`.
        """
        mode = self._check_mode(mode)
        kind = self.gene_likelihoods[mode]
        x = tensors[keys.X]
        log_theta = self._fused_theta(mode, mode) if kind != "poisson" else None
        if log_theta is None or x.layout != torch.strided or not _native.usable(x):
            inference, _, out = self.forward(tensors, mode=mode, kl_weight=kl_weight)
            return inference["z"], out
        inference = self.inference(x, mode)
        z, library = inference["z"], inference["library"]
        batch_index = tensors.get(keys.BATCH)
        genes = self.gene_positions(mode)
        h, logits = self.decoder_logits(z, batch_index, mode, genes)
        if self.gene_offsets is not None:
            logits = logits + self.gene_offsets[mode]
        zi = None
        if kind == "zinb":
            zi = nn.functional.linear(h, self._rows(self.px_dropout_decoder.weight, genes),
                                      self._rows(self.px_dropout_decoder.bias, genes))
        nonzero = tensors.get(keys.INDICES_NONZERO)
        if nonzero is not None:  # the loader's positions of the non-zero counts: no search
            x = torch.sparse_csr_tensor(*_csr(x, nonzero), x.shape, check_invariants=False)
        reconstruction = -_RowsFromLogits.apply(logits, library, log_theta.exp(), zi, x)
        qz = inference["qz"]
        mean, std = qz.loc, qz.scale
        kl_z = (0.5 * (std.square() + mean.square() - 1) - std.log()).sum(-1)
        if inference["ql"] is not None:
            pl = self._library_prior(batch_index, mode)
            kl_l = kl_divergence(inference["ql"], pl).sum(-1)
        else:
            kl_l = torch.zeros_like(kl_z)
        loss = torch.mean(reconstruction + kl_weight * (kl_z + kl_l))
        return z, LossOutput(loss=loss, reconstruction_loss=reconstruction,
                             kl_local={"kl_z": kl_z, "kl_l": kl_l})

    # ------------------------------------------------------------------ seed API
    def sample_from_posterior_z(
        self, x: torch.Tensor, mode: int = 0, deterministic: bool = False
    ) -> torch.Tensor:
        """Return ``z`` of dataset ``mode``'s cells: a posterior sample or the mean."""
        inf = self.inference(x, mode)
        return inf["qz"].loc if deterministic else inf["z"]

    def sample_from_posterior_l(
        self, x: torch.Tensor, mode: int = 0, deterministic: bool = False
    ) -> torch.Tensor:
        """Return the log library size: a sample (or mean) when modelled, else observed."""
        inf = self.inference(x, mode)
        if deterministic and inf["ql"] is not None:
            return inf["ql"].loc
        return inf["library"]

    def sample_scale(
        self, x: torch.Tensor, mode: int, batch_index: torch.Tensor | None = None,
        y: torch.Tensor | None = None, deterministic: bool = False,
        decode_mode: int | None = None,
    ) -> torch.Tensor:
        """Return the expression of all genes, renormalised over ``decode_mode``'s genes."""
        return self.impute(x, mode, batch_index, deterministic=deterministic,
                           decode_mode=decode_mode, normalized=True)

    def sample_rate(
        self, x: torch.Tensor, mode: int, batch_index: torch.Tensor | None = None,
        y: torch.Tensor | None = None, deterministic: bool = False,
        decode_mode: int | None = None,
    ) -> torch.Tensor:
        """Return the expected counts of all genes (:meth:`sample_scale` times the library)."""
        return self.impute(x, mode, batch_index, deterministic=deterministic,
                           decode_mode=decode_mode, normalized=False)


class _RowsFromLogits(torch.autograd.Function):
    r"""Per-cell NB / ZINB log-likelihood from the decoder's logits, gradients in the same pass.

    ``forward(logits, log_library, theta, zi_logits, x)`` is
    ``nb_log_prob_rows(x, softmax_rate(logits, log_library, RATE_FLOOR)[1], theta, zi_logits)``
    (``theta`` one per gene, ``zi_logits`` None for the NB). The kernel forms each row's
    gradient for a unit upstream weight while it computes the row; since each row's gradient is
    linear in its weight, the backward scales them by the upstream gradient ``g``. The
    ``theta`` gradient is a sum over the rows: it is ``g_1`` times the unit one when ``g`` is
    the same for every cell (a training loss that averages cells), and otherwise the kernel
    runs again with the weights ``g``.
    """

    @staticmethod
    def forward(ctx, logits, log_library, theta, zi, x):  # noqa: D102
        n = logits.shape[0]
        want_lib = ctx.needs_input_grad[1]
        d_lib = torch.empty(n) if want_lib else None
        with torch.no_grad():
            out, d_logits, d_zi, d_theta = nb_log_prob_rows_softmax_grad(
                x, logits.detach(), log_library.detach(), RATE_FLOOR, theta.detach(),
                None if zi is None else zi.detach(), torch.ones(n), d_log_library=d_lib)
        ctx.save_for_backward(d_logits, d_zi, d_theta, d_lib, logits, log_library, theta, zi, x)
        ctx.has_zi, ctx.want_lib = zi is not None, want_lib
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):  # noqa: D102
        d_logits, d_zi, d_theta, d_lib, logits, log_library, theta, zi, x = ctx.saved_tensors
        g = g.reshape(-1)
        if bool((g == g[0]).all()):
            d_theta = d_theta * g[0]
        else:  # the per-gene sum needs the weights themselves
            d_theta = nb_log_prob_rows_softmax_grad(
                x, logits, log_library, RATE_FLOOR, theta, zi if ctx.has_zi else None,
                g.contiguous())[3]
        col = g.unsqueeze(-1)
        return (d_logits.mul_(col),
                d_lib.mul_(g).reshape(log_library.shape) if ctx.want_lib else None,
                d_theta,
                d_zi.mul_(col) if ctx.has_zi else None,
                None)


def _columns(t: torch.Tensor, genes: slice | torch.Tensor) -> torch.Tensor:
    """Columns ``genes`` of a ``(..., total_genes)`` tensor."""
    if isinstance(genes, slice):
        return t[..., genes]
    return t.index_select(-1, genes)
