"""Posterior queries shared by the models built on the scVI module (SCVI, LinearSCVI, SCANVI)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from anndata import AnnData

from cellvi import keys
from cellvi._checks import check_int, check_positive
from cellvi._native._outputs import empty as empty_result
from cellvi._settings import current as current_settings
from cellvi._settings import snapshot_settings
from cellvi.de import differential_expression, feature_correlation_matrix
from cellvi.de._sampling import posterior_scale_draws
from cellvi.train._distributed import gather_rows, rank_world

from ._base import BaseModel


class VAEModel(BaseModel):
    """A :class:`BaseModel` whose module follows :class:`cellvi.module.VAE`'s interface."""

    def _describe_module(self) -> str:
        m = self.module
        return (
            f"{type(m).__name__}: n_latent={m.n_latent}, gene_likelihood={m.gene_likelihood!r}, "
            f"dispersion={m.dispersion!r}, latent_distribution={m.latent_distribution!r}, "
            f"library size {'observed' if m.use_observed_lib_size else 'modelled'}"
        )

    # ------------------------------------------------------------------ latent space
    @snapshot_settings
    @torch.inference_mode()
    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        give_mean: bool = True,
        mc_samples: int = 5000,
        batch_size: int | None = None,
        return_dist: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Return the latent representation of each cell, ``(cells, n_latent)``.

        Parameters
        ----------
        adata
            AnnData with the model's genes (default: the model's own).
        indices
            Cells to use (default: all).
        give_mean
            The posterior mean (for the logistic normal, estimated from ``mc_samples`` draws);
            otherwise one posterior sample.
        mc_samples
            Draws used for the logistic-normal mean.
        batch_size
            Cells per forward pass (default: about 2^22 / genes, e.g. 2,048 for 2,000 genes).
        return_dist
            Return the mean and the variance of the Normal posterior, ``(mean, variance)``
            (of the untransformed latent for ``"ln"``), as scvi-tools does.
        """
        rank, world = rank_world()
        if world > 1:  # data-parallel: each process embeds a contiguous share, in order
            share = np.array_split(self._indices(adata, indices), world)[rank]
            if share.size:
                mine = self._latent(adata, share, give_mean, mc_samples, batch_size,
                                    return_dist)
            else:  # more processes than cells
                empty = np.zeros((0, self.module.n_latent), dtype=np.float32)
                mine = (empty, empty) if return_dist else empty
            if return_dist:
                return gather_rows(mine[0]), gather_rows(mine[1])
            return gather_rows(mine)
        return self._latent(adata, indices, give_mean, mc_samples, batch_size, return_dist)

    @torch.inference_mode()
    def _latent(self, adata, indices, give_mean, mc_samples, batch_size, return_dist):
        self.module.eval()
        out, variances = [], []
        free = not getattr(self.module, "encode_covariates", True)  # the batch is not read
        for batch in self._batches(adata, indices, batch_size, unknown_batches=free):
            inf = self.module.inference(**self.module.inference_inputs(batch))
            qz = inf["qz"]
            if return_dist:
                out.append(qz.loc.cpu().numpy())
                variances.append(qz.scale.square().cpu().numpy())
                continue
            if not give_mean:
                z = inf["z"]
            elif self.module.latent_distribution == "ln":
                z = torch.zeros_like(qz.loc)
                for start in range(0, mc_samples, 500):
                    k = min(500, mc_samples - start)
                    z += self.module.z_encoder.transform(qz.sample((k,))).sum(0)
                z /= mc_samples
            else:
                z = qz.loc
            out.append(z.cpu().numpy())
        if return_dist:
            return np.concatenate(out), np.concatenate(variances)
        return np.concatenate(out)

    # ------------------------------------------------------------------ streamed outputs
    def write_latent_representation(self, path, adata: AnnData | None = None, *,
                                    chunk_cells: int = 65536, **options) -> str:
        """Write the latent representation to an ``.h5ad`` (cells x latent), chunk by chunk.

        For atlases whose results do not fit in memory, next to a backed AnnData: the cells
        are embedded ``chunk_cells`` at a time (in order) and each block goes to the file as
        it comes; memory stays one chunk. ``options`` go to :meth:`get_latent_representation`.
        Returns the path (``anndata.read_h5ad`` reads it: ``X`` is the latent, ``obs_names``
        the cells).
        """
        from cellvi.data._backed import write_rows_h5ad

        target = adata if adata is not None else self.adata
        n = target.n_obs

        def blocks():
            for start in range(0, n, chunk_cells):
                idx = np.arange(start, min(n, start + chunk_cells))
                yield start, self.get_latent_representation(adata, indices=idx, **options)

        names = [f"latent_{i}" for i in range(self.module.n_latent)]
        return str(write_rows_h5ad(path, n, self.module.n_latent, blocks(),
                                   target.obs_names, names))

    def write_normalized_expression(self, path, adata: AnnData | None = None, *,
                                    chunk_cells: int = 8192, **options) -> str:
        """Write the normalised expression to an ``.h5ad`` (cells x genes), chunk by chunk.

        As :meth:`write_latent_representation`; ``options`` (``library_size``,
        ``transform_batch``, ...) go to :meth:`get_normalized_expression`.
        """
        from cellvi.data._backed import write_rows_h5ad

        target = adata if adata is not None else self.adata
        n = target.n_obs

        def blocks():
            for start in range(0, n, chunk_cells):
                idx = np.arange(start, min(n, start + chunk_cells))
                yield start, self.get_normalized_expression(adata, indices=idx,
                                                            return_numpy=True, **options)

        return str(write_rows_h5ad(path, n, self.summary.n_vars, blocks(), target.obs_names,
                                   self.summary.var_names))

    # ------------------------------------------------------------------ expression
    def batch_codes(self, transform_batch) -> list[int | None]:
        """Codes of ``transform_batch`` (a batch name or names; None: ``[None]``), checked."""
        if transform_batch is None:
            return [None]
        names = [transform_batch] if isinstance(transform_batch, str | int) else transform_batch
        cats = self.summary.batch_categories
        codes = []
        for name in names:
            if str(name) in cats:
                codes.append(cats.index(str(name)))
            else:
                raise ValueError(f"transform_batch {name!r} is not a batch of the model: {cats}.")
        return codes

    def gene_indices(self, gene_list) -> np.ndarray:
        """Positions of ``gene_list`` among the model's genes (all when None), checked."""
        if gene_list is None:
            return np.arange(self.summary.n_vars)
        lookup = {g: i for i, g in enumerate(self.summary.var_names)}
        missing = [g for g in gene_list if g not in lookup]
        if missing:
            raise ValueError(f"Genes not in the model: {missing[:10]}.")
        return np.array([lookup[g] for g in gene_list], dtype=np.int64)

    @snapshot_settings
    @torch.inference_mode()
    def get_normalized_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        transform_batch: str | Sequence[str] | None = None,
        gene_list: Sequence[str] | None = None,
        library_size: float | str = 1,
        n_samples: int = 1,
        return_mean: bool = True,
        return_numpy: bool = False,
        batch_size: int | None = None,
        n_samples_overall: int | None = None,
        weights: str | None = None,
        silent: bool = True,
    ) -> pd.DataFrame | np.ndarray:
        r"""Return denoised, normalised expression: the decoder's scale times ``library_size``.

        Parameters
        ----------
        adata, indices
            Cells to use (default: all of the model's).
        transform_batch
            Decode every cell as if from this batch (or the average over these batches); None
            uses each cell's own batch.
        gene_list
            Genes to return (default: all).
        library_size
            Multiplier of the normalised expression (1: proportions); ``"latent"`` gives the
            expected counts at each cell's own library size.
        n_samples
            Posterior samples of ``z`` per cell.
        return_mean
            Average over the samples.
        return_numpy
            Return an array instead of a cells x genes DataFrame (always an array of shape
            ``(n_samples, cells, genes)`` when ``n_samples > 1`` and not ``return_mean``).
        batch_size
            Cells per forward pass (default: about 2^22 / genes, e.g. 2,048 for 2,000 genes).
        n_samples_overall
            Draw this many cells (with replacement, seeded by ``cellvi.settings.seed``) from
            ``indices`` and return one posterior sample for each: rows are the drawn cells.
        weights
            ``None`` or ``"uniform"``: every posterior sample weighs the same.
            ``"importance"``: each cell's ``n_samples`` draws are weighted by
            :math:`p(x \mid z)\,p(z) / q(z \mid x)`, self-normalised within the cell and
            truncated at :math:`\sqrt{n}` times their mean (Boyeau et al., 2023; see
            :mod:`cellvi.de._sampling`), correcting the variational posterior: the mean is the
            weighted mean; with ``return_mean=False`` the draws are resampled by weight. One
            ``transform_batch`` at most; ``library_size`` a number.
        silent
            scvi-tools' switch of its progress bar; these queries show none.
        """
        self.module.eval()
        if weights not in (None, "uniform", "importance"):
            raise ValueError(
                f"weights must be None, 'uniform' or 'importance', got {weights!r}.")
        if n_samples_overall is not None:
            n_samples_overall = check_int("n_samples_overall", n_samples_overall, minimum=1)
            pool = self._indices(adata, indices)
            rng = np.random.default_rng(current_settings().seed)
            indices = np.sort(rng.choice(pool, size=n_samples_overall, replace=True))
            n_samples = 1
        n_samples = check_int("n_samples", n_samples, minimum=1)
        if library_size != "latent":
            library_size = check_positive("library_size", library_size)
        genes = self.gene_indices(gene_list)
        codes = self.batch_codes(transform_batch)
        if weights == "importance":
            return self._importance_expression(
                adata, indices, transform_batch, codes, genes, gene_list, library_size,
                n_samples, return_mean, return_numpy, batch_size)
        n_cells = len(self._indices(adata, indices))
        keep_samples = n_samples > 1 and not return_mean
        shape = (n_samples, n_cells, len(genes)) if keep_samples else (n_cells, len(genes))
        # filled batch by batch: no list of chunks and no concatenation (one copy of the output);
        # its memory is reused from the previous call's freed result (see cellvi._native._outputs)
        result = empty_result(shape)
        # the common case: each batch's scale goes straight into its rows of the result
        direct = (
            library_size != "latent" and len(codes) == 1 and gene_list is None
            and n_samples == 1 and result.device == self.device
        )
        start = 0
        # cells of unknown batches can be decoded as a known one (the encoder not reading it)
        free = (transform_batch is not None and library_size != "latent"
                and not getattr(self.module, "encode_covariates", True))
        for batch in self._batches(adata, indices, batch_size, unknown_batches=free):
            inf = self.module.inference(**self.module.inference_inputs(batch), n_samples=n_samples)
            gen_inputs = self.module.generative_inputs(batch, inf)
            if direct:
                stop = start + batch[keys.BATCH].shape[0]
                rows = result[start:stop]
                self.module.generative_scale(**gen_inputs, transform_batch=codes[0], out=rows)
                if library_size != 1:
                    rows.mul_(float(library_size))
                start = stop
                continue
            acc = None
            for code in codes:
                if library_size == "latent":
                    gen = self.module.generative(**gen_inputs, transform_batch=code)
                    value = gen["px"].mean
                else:  # the decoder's scale head only
                    value = self.module.generative_scale(**gen_inputs, transform_batch=code)
                    if library_size != 1:
                        value = value * float(library_size)
                if gene_list is not None:
                    value = value[..., genes]
                acc = value if acc is None else acc + value
            if len(codes) > 1:
                acc = acc / len(codes)
            if n_samples > 1 and return_mean:
                acc = acc.mean(0)
            stop = start + acc.shape[-2]
            result[..., start:stop, :].copy_(acc)
            start = stop
        result = result.numpy()
        if keep_samples or return_numpy:
            return result
        return pd.DataFrame(
            result,
            index=self._obs_names(adata, indices),
            columns=self._gene_index() if gene_list is None else self._gene_index()[genes],
            copy=False,
        )

    def _importance_expression(self, adata, indices, transform_batch, codes, genes, gene_list,
                               library_size, n_samples, return_mean, return_numpy, batch_size):
        """``get_normalized_expression(weights="importance")``: see there."""
        if len(codes) > 1:
            raise ValueError(
                "weights='importance' decodes in one batch: give one transform_batch (or None "
                "for each cell's own), or use weights='uniform' to average over batches.")
        if isinstance(library_size, str):
            raise ValueError(
                "weights='importance' needs a numeric library_size (the weighted normalised "
                f"expression times it), got {library_size!r}.")
        cells = self._indices(adata, indices)
        draws, log_w = posterior_scale_draws(
            self, adata, cells, n_samples, transform_batch, weights="importance",
            batch_size=batch_size)  # (k, cells, genes), weights summing to 1 over all draws
        w = np.exp(log_w + np.log(len(cells)))  # per cell, summing to 1 over its k draws
        draws = draws[..., genes] * float(library_size)
        if return_mean or n_samples == 1:
            result = np.einsum("kc,kcg->cg", w, draws, dtype=np.float64).astype(np.float32)
        else:  # resample each cell's draws by weight
            rng = np.random.default_rng(current_settings().seed)
            cum = np.cumsum(w, axis=0)
            pick = (rng.random((n_samples, len(cells)))[:, None, :] > cum[None]).sum(1)
            pick = np.minimum(pick, n_samples - 1)
            result = np.take_along_axis(draws, pick[..., None], axis=0)
            return result
        if return_numpy:
            return result
        return pd.DataFrame(
            result, index=self._obs_names(adata, indices),
            columns=self._gene_index() if gene_list is None else self._gene_index()[genes],
            copy=False)

    @snapshot_settings
    @torch.inference_mode()
    def get_likelihood_parameters(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        give_mean: bool = False,
        batch_size: int | None = None,
    ) -> dict[str, np.ndarray]:
        """Return the parameters of ``p(x | z)`` per cell and gene.

        Returns a dict of ``(cells, genes)`` arrays (``(n_samples, cells, genes)`` when
        ``n_samples > 1`` and not ``give_mean``): ``"mean"``, ``"dispersions"`` (inverse
        dispersion theta, NB/ZINB) and ``"dropout"`` (zero-inflation probability, ZINB).
        """
        self.module.eval()
        parts: dict[str, list[np.ndarray]] = {}
        for batch in self._batches(adata, indices, batch_size):
            inf = self.module.inference(**self.module.inference_inputs(batch), n_samples=n_samples)
            px = self.module.generative(**self.module.generative_inputs(batch, inf))["px"]
            mean = px.mean if self.module.gene_likelihood != "zinb" else px.mu
            values = {"mean": mean}
            if hasattr(px, "theta"):
                values["dispersions"] = px.theta.expand_as(mean)
            if hasattr(px, "zi_logits"):
                values["dropout"] = torch.sigmoid(px.zi_logits)
            for k, v in values.items():
                if n_samples > 1 and give_mean:
                    v = v.mean(0)
                parts.setdefault(k, []).append(v.cpu().numpy())
        return {k: np.concatenate(v, axis=-2) for k, v in parts.items()}

    # ------------------------------------------------------------------ likelihoods
    @torch.inference_mode()
    def _loss_terms(self, adata, indices, batch_size) -> tuple[np.ndarray, np.ndarray]:
        self.module.eval()
        rec, kl = [], []
        for batch in self._batches(adata, indices, batch_size, nonzero=True):
            out = self.module(batch, kl_weight=1.0, **self._loss_options())[2]
            rec.append(out.reconstruction_loss.cpu().numpy())
            kl.append(out.kl_local_sum.cpu().numpy())
        return np.concatenate(rec), np.concatenate(kl)

    @snapshot_settings
    def get_elbo(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """Return the evidence lower bound per cell, averaged over cells.

        The ELBO is a lower bound on ``log p(x)``, so it is negative for counts; higher is
        better (as scvi-tools' ``get_elbo``). It is estimated with one posterior sample per
        cell. ``return_mean=False`` gives the per-cell values, ``(cells,)``.
        """
        rec, kl = self._loss_terms(adata, indices, batch_size)
        elbo = -(rec + kl)
        return float(elbo.mean()) if return_mean else elbo

    @snapshot_settings
    def get_reconstruction_error(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> dict[str, float | np.ndarray]:
        """Return the reconstruction error ``-E_q log p(x | z)`` per cell (positive).

        A dict, as in scvi-tools: ``{"reconstruction_loss": mean over cells}`` (per-cell values
        with ``return_mean=False``).
        """
        rec, _ = self._loss_terms(adata, indices, batch_size)
        return {"reconstruction_loss": float(rec.mean()) if return_mean else rec}

    @snapshot_settings
    @torch.inference_mode()
    def get_marginal_ll(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_mc_samples: int = 1000,
        batch_size: int | None = None,
        return_mean: bool = True,
    ) -> float | np.ndarray:
        """Return the importance-sampling estimate of ``log p(x)`` per cell, averaged.

        Negative for counts, like the ELBO, and at least the ELBO up to Monte Carlo noise.
        With ``return_mean=False`` the per-cell values are returned.
        """
        n_mc_samples = check_int("n_mc_samples", n_mc_samples, minimum=1)
        self.module.eval()
        # A pass holds about 2^22 (samples x cells x genes) values: large enough that the
        # matrix products run at full speed, small enough (the decoder head, twice that, stays
        # under glibc's 32 MiB mmap threshold, see cellvi._native.tune_allocator) that its
        # buffers are reused between passes instead of being mapped and faulted in again.
        genes = self.summary.n_vars
        cells = batch_size or int(np.clip(2**23 // (100 * genes), 1, 1024))
        per_pass = int(np.clip(2**22 // (cells * genes), 1, min(100, n_mc_samples)))
        values = [
            self.module.marginal_ll(
                batch, n_mc_samples=n_mc_samples, n_mc_samples_per_pass=per_pass
            ).cpu().numpy()
            for batch in self._batches(adata, indices, cells, nonzero=True)
        ]
        values = np.concatenate(values)
        return float(values.mean()) if return_mean else values

    @snapshot_settings
    @torch.inference_mode()
    def posterior_predictive_sample(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 1,
        gene_list: Sequence[str] | None = None,
        batch_size: int | None = None,
        transform_batch: str | None = None,
    ) -> np.ndarray:
        """Draw counts from the posterior predictive distribution ``p(x_new | x)``.

        Returns ``(cells, genes)`` for one sample, else ``(cells, genes, n_samples)``.
        ``transform_batch`` draws every cell's counts as if it came from that batch.
        """
        self.module.eval()
        n_samples = check_int("n_samples", n_samples, minimum=1)
        genes = self.gene_indices(gene_list)
        codes = self.batch_codes(transform_batch)
        if len(codes) != 1:
            raise ValueError("posterior_predictive_sample takes one transform_batch.")
        out = [
            self.module.sample(batch, n_samples=n_samples, transform_batch=codes[0])[:, genes]
            .cpu().numpy()
            for batch in self._batches(adata, indices, batch_size)
        ]
        return np.concatenate(out, axis=0)

    # ------------------------------------------------------------------ DE and correlation
    @snapshot_settings
    def differential_expression(
        self,
        adata: AnnData | None = None,
        groupby: str | None = None,
        group1: str | Sequence[str] | None = None,
        group2: str | None = None,
        idx1: Sequence[int] | np.ndarray | None = None,
        idx2: Sequence[int] | np.ndarray | None = None,
        mode: str = "vanilla",
        delta: float | None = 0.25,
        batch_correction: bool = False,
        batchid1: Sequence[str] | None = None,
        batchid2: Sequence[str] | None = None,
        fdr_target: float = 0.05,
        n_samples: int = 5000,
        silent: bool = False,
        **kwargs,
    ) -> pd.DataFrame:
        """Bayesian differential expression between groups of cells (Boyeau et al., 2019).

        See :func:`cellvi.de.differential_expression` for the parameters (``kwargs``:
        ``gene_list``, ``pseudocount``, ``eps``, ``seed``, ``batch_size``) and the columns of
        the returned DataFrame.
        """
        return differential_expression(
            self, adata=adata, groupby=groupby, group1=group1, group2=group2, idx1=idx1,
            idx2=idx2, mode=mode, delta=delta, batch_correction=batch_correction,
            batchid1=batchid1, batchid2=batchid2, fdr_target=fdr_target, n_samples=n_samples,
            silent=silent, **kwargs,
        )

    @snapshot_settings
    def get_feature_correlation_matrix(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        n_samples: int = 10,
        transform_batch: str | Sequence[str] | None = None,
        correlation_type: str = "spearman",
        rna_size_factor: float = 1000,
        **kwargs,
    ) -> pd.DataFrame:
        """Gene-gene correlation (``"spearman"`` or ``"pearson"``) of the denoised expression.

        See :func:`cellvi.de.feature_correlation_matrix` (``kwargs``: ``gene_list``,
        ``batch_size``). ``rna_size_factor`` (scvi-tools' scale of the expression before the
        correlation) is accepted and changes nothing: both correlations are scale-free.
        """
        check_positive("rna_size_factor", rna_size_factor)
        return feature_correlation_matrix(
            self, adata=adata, indices=indices, n_samples=n_samples,
            transform_batch=transform_batch, correlation_type=correlation_type, **kwargs,
        )

    # ------------------------------------------------------------------ misc
    @property
    def var_names(self) -> list[str]:
        """The model's genes, in order."""
        return list(self.summary.var_names)

