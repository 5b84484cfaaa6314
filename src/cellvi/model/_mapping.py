r"""Reference mapping (scArches): a trained model takes cells of new batches.

``Model.prepare_query_anndata(adata, reference)`` gives a query AnnData the reference's genes
(reordered; missing ones as zeros; extra ones dropped) and reports what it did.
``Model.load_query_data(adata, reference)`` builds a model for the query: the same options, the
reference's weights, and new rows in every table of a categorical covariate (batches, extra
covariates) for the query's new categories. Only some parameters then train (architectural
surgery, Lotfollahi et al. 2022): by default the new covariate rows of the first layers and the
decoder's batch normalisation; everything the reference learned stays as it is, to the last bit
(the reference rows are masked out of the gradients and restored after every optimizer step,
so that neither Adam's moments nor weight decay can move them).

The freezing options follow scvi-tools' ``load_query_data``:

* ``freeze_expression`` (default True): the decoder and the dispersion stay frozen;
* ``freeze_decoder_first_layer`` (True): the decoder's first layer stays frozen but for its new
  covariate rows;
* ``freeze_batchnorm_encoder`` (True) / ``freeze_batchnorm_decoder`` (False): batch
  normalisation keeps its affine parameters and running statistics;
* ``freeze_dropout`` (False): dropout off while mapping;
* ``freeze_classifier`` (True): the classifier of a semi-supervised model stays frozen;
* ``unfrozen`` (False): train every parameter (fine-tuning).

Without surgery: a model whose encoder does not read the batch (``encode_covariates=False``,
the default) embeds cells of unknown batches directly (``get_latent_representation`` warns and
computes the latent, which does not depend on the batch), and decodes them as a known batch
with ``transform_batch``.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from torch import nn

from cellvi import keys
from cellvi.data._setup import UNS_KEY, DataSummary
from cellvi.data.fields import (
    CategoricalJointObsField,
    CategoricalObsField,
    LabelsField,
    LibrarySizeField,
    categories_of,
)
from cellvi.nn import CovariateLinear

if TYPE_CHECKING:
    from ._base import BaseModel

__all__ = ["load_query_data", "prepare_query_anndata"]


def _reference_parts(reference) -> tuple[str, DataSummary, dict[str, Any], dict[str, torch.Tensor]]:
    """``(model class name, summary, options, weights)`` of a model or a saved model folder."""
    if isinstance(reference, str | os.PathLike):
        from . import _io

        state, tensors = _io.read_model_folder(reference)
        summary = DataSummary.from_json(json.dumps(state["summary"]))
        return state["model_class"], summary, dict(state["init_kwargs"]), tensors
    state = {k: v.detach().cpu().clone() for k, v in reference.module.state_dict().items()}
    return type(reference).__name__, reference.summary, dict(reference.init_kwargs), state


def prepare_query_anndata(
    adata: AnnData,
    reference,
    return_reference_var_names: bool = False,
    inplace: bool = True,
) -> AnnData | pd.Index | None:
    """Give a query AnnData the reference model's genes, in its order.

    Genes of the reference that the query lacks are added as zero counts (in ``X`` and in every
    layer); query genes the reference does not know are dropped. What was done is printed.

    Parameters
    ----------
    adata
        The query (cells x genes, raw counts).
    reference
        A trained model, or the folder of a saved one.
    return_reference_var_names
        Return only the reference's genes (a :class:`pandas.Index`), changing nothing.
    inplace
        Change ``adata`` itself (scvi-tools' default; it is the purpose of the call); False
        returns a new AnnData and leaves ``adata`` as it is.

    Returns
    -------
    None (in place), the new AnnData, or the reference's genes.
    """
    _, summary, _, _ = _reference_parts(reference)
    ref_genes = pd.Index(summary.var_names)
    if return_reference_var_names:
        return ref_genes
    query_genes = pd.Index([str(g) for g in adata.var_names])
    if not query_genes.is_unique:
        raise ValueError("The query's var_names have duplicates; call "
                         "adata.var_names_make_unique() first.")
    present = ref_genes.isin(query_genes)
    missing = ref_genes[~present]
    extra = query_genes[~query_genes.isin(ref_genes)]
    print(f"prepare_query_anndata: {int(present.sum()):,} of {len(ref_genes):,} reference genes "
          f"found; {len(missing):,} padded with zeros"
          + (f" (e.g. {list(missing[:5])})" if len(missing) else "")
          + f"; {len(extra):,} query genes not in the reference dropped.")
    if not len(missing) and not len(extra) and query_genes.equals(ref_genes):
        return None if inplace else adata.copy()
    order = query_genes.get_indexer(ref_genes)  # -1 for missing genes

    def reorder(m):
        if m is None:
            return None
        dense_in = not sp.issparse(m)
        m = sp.csr_matrix(m)
        rows = m.shape[0]
        take = np.where(order >= 0, order, 0)
        out = m[:, take].tocsc()
        if len(missing):
            keep = sp.diags((order >= 0).astype(m.dtype))
            out = (out @ keep).tocsr()
            out.eliminate_zeros()
        out = sp.csr_matrix(out, shape=(rows, len(ref_genes)))
        return out.toarray() if dense_in else out

    var = pd.DataFrame(index=ref_genes)
    for column in adata.var.columns:
        values = adata.var[column].reindex(pd.Index(query_genes)).to_numpy()
        var[column] = pd.Series(values, index=query_genes).reindex(ref_genes).to_numpy()
    new = dict(X=reorder(adata.X), obs=adata.obs.copy(), var=var, uns=dict(adata.uns),
               obsm=dict(adata.obsm), obsp=dict(adata.obsp),
               layers={k: reorder(v) for k, v in adata.layers.items()})
    if not inplace:
        return AnnData(**new)
    adata._init_as_actual(new.pop("X"), **new)
    return None


def _extend_categories(adata: AnnData, summary: DataSummary) -> tuple[DataSummary, dict]:
    """Build the query's summary: the reference's fields, new categories appended.

    Returns the summary and, per categorical key, the number of reference categories.
    """
    n_ref: dict[str, list[int]] = {}
    fitted: dict[str, Any] = {}
    for f in summary.fields:
        if isinstance(f, LabelsField):
            new = f  # classes are the reference's; unknown labels are the user's to fix
        elif isinstance(f, CategoricalObsField):
            query = categories_of(adata, f.obs_key)
            added = [c for c in query if c not in f.categories]
            new = replace(f, categories=[*f.categories, *added])
            n_ref[f.key] = [len(f.categories)]
        elif isinstance(f, CategoricalJointObsField):
            cats = []
            for key, ref_cats in zip(f.obs_keys, f.categories):
                query = categories_of(adata, key)
                cats.append([*ref_cats, *[c for c in query if c not in ref_cats]])
            new = replace(f, categories=cats)
            n_ref[f.key] = [len(c) for c in f.categories]
        elif isinstance(f, LibrarySizeField):
            batch = fitted.get(f.batch_key)
            query_stats = f.fit(adata, fitted) if batch is not None else f
            n_ref_batches = len(f.log_means)
            new = replace(f, log_means=[*f.log_means, *query_stats.log_means[n_ref_batches:]],
                          log_vars=[*f.log_vars, *query_stats.log_vars[n_ref_batches:]])
        else:
            new = f
        new.check(adata)
        fitted[new.key] = new
    out = DataSummary(tuple(fitted.values()), n_cells=int(adata.n_obs),
                      extra={**summary.extra, "query_of_reference": True})
    return out, n_ref


def _transfer(module: nn.Module, weights: dict[str, torch.Tensor], ref_counts: list[int]
              ) -> dict[str, torch.Tensor]:
    """Copy the reference's weights into ``module``; return the masks of the trainable rows.

    Tensors of the same shape are copied; a tensor that grew along one dimension (a covariate
    table, a gene-batch dispersion, the per-batch library prior) gets the reference's values
    in its first entries. A covariate table the reference did not have (it had one category,
    which needs none) gets zeros for the reference's categories, so that those decode exactly
    as before. Masks: 1 for rows/columns that belong to new categories.
    """
    own = module.state_dict()
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, target in own.items():
            source = weights.get(name)
            if source is None:
                continue
            if source.shape == target.shape:
                target.copy_(source)
                continue
            grown = [d for d in range(target.dim()) if source.shape[d] != target.shape[d]]
            if (source.dim() != target.dim() or len(grown) != 1
                    or source.shape[grown[0]] > target.shape[grown[0]]):
                raise ValueError(
                    f"The reference's {name} {tuple(source.shape)} cannot be mapped onto the "
                    f"query model's {tuple(target.shape)}: build the query with the reference's "
                    "options."
                )
            d = grown[0]
            target.narrow(d, 0, source.shape[d]).copy_(source)
            mask = torch.zeros_like(target)
            mask.narrow(d, source.shape[d], target.shape[d] - source.shape[d]).fill_(1)
            masks[name] = mask
        # covariate tables created for the query (the reference had a single category)
        for mod_name, mod in module.named_modules():
            if not isinstance(mod, CovariateLinear):
                continue
            tables = iter(enumerate(mod.cat_weights))
            for cov, n_cat in enumerate(mod.n_cat_list):
                if not n_cat:
                    continue
                i, table = next(tables)
                name = f"{mod_name}.cat_weights.{i}" if mod_name else f"cat_weights.{i}"
                if name in weights:
                    continue
                n_old = ref_counts[cov] if cov < len(ref_counts) else n_cat
                table[:n_old].zero_()
                mask = torch.zeros_like(table)
                mask[n_old:] = 1
                masks[name] = mask
    return masks


def _freeze(module: nn.Module, masks: dict[str, torch.Tensor], *, freeze_dropout: bool,
            freeze_expression: bool, freeze_decoder_first_layer: bool,
            freeze_batchnorm_encoder: bool, freeze_batchnorm_decoder: bool,
            freeze_classifier: bool, unfrozen: bool) -> list[str]:
    """Set which parameters train; return the names of those that do (all or in part)."""
    params = dict(module.named_parameters())
    if unfrozen:
        for p in params.values():
            p.requires_grad_(True)
        return list(params)
    trainable: set[str] = set()
    for name in masks:
        if name not in params:
            continue  # a buffer (the per-batch library prior): new entries come from the data
        is_decoder = name.startswith("decoder.")
        first_layer = ".linears.0." in name
        if is_decoder and freeze_expression and not first_layer:
            continue
        trainable.add(name)
    if not freeze_expression:
        trainable |= {n for n in params if n.startswith("decoder.") or n == "px_r"}
        if freeze_decoder_first_layer:
            trainable -= {n for n in params if n.startswith("decoder.") and ".linears.0." in n
                          and n not in masks}
    for mod_name, mod in module.named_modules():
        if not isinstance(mod, nn.BatchNorm1d):
            continue
        in_decoder = mod_name.startswith(("decoder", "decoder_z1_z2"))
        frozen = freeze_batchnorm_decoder if in_decoder else freeze_batchnorm_encoder
        if frozen:
            mod.momentum = 0.0  # running statistics stay the reference's
        else:
            trainable |= {f"{mod_name}.weight", f"{mod_name}.bias"} & set(params)
    if not freeze_classifier:
        trainable |= {n for n in params if "classifier" in n}
    if freeze_dropout:
        for mod in module.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
    for name, p in params.items():
        p.requires_grad_(name in trainable)
    return sorted(trainable)


def load_query_data(
    cls: type[BaseModel],
    adata: AnnData,
    reference,
    *,
    inplace_subset_query_vars: bool = False,
    device: str = "cpu",
    freeze_dropout: bool = False,
    freeze_expression: bool = True,
    freeze_decoder_first_layer: bool = True,
    freeze_batchnorm_encoder: bool = True,
    freeze_batchnorm_decoder: bool = False,
    freeze_classifier: bool = True,
    unfrozen: bool = False,
) -> BaseModel:
    """Build a model of the query cells from a trained reference (see the module docstring).

    Parameters
    ----------
    cls
        The model class (the reference's).
    adata
        The query, with the reference's genes in its order (see :func:`prepare_query_anndata`)
        and the reference's set-up keys (batch, covariates; the labels column of a
        semi-supervised model may be absent: every query cell is then unlabelled). It is set up
        in place (``adata.uns["_cellvi_setup"]``).
    reference
        A trained model of class ``cls``, or the folder of a saved one.
    inplace_subset_query_vars
        Subset the query to the reference's genes first, in place (when it has extra genes).
    device
        Where to put the query model.
    freeze_dropout, freeze_expression, freeze_decoder_first_layer, freeze_batchnorm_encoder, \
freeze_batchnorm_decoder, freeze_classifier, unfrozen
        What stays as the reference learned it (see the module docstring).

    Returns
    -------
    A model of the query, not trained yet: call ``train`` (weight decay is off by default for
    it, as scvi-tools' tutorials set it).
    """
    name, summary, options, weights = _reference_parts(reference)
    if name != cls.__name__:
        raise ValueError(f"The reference is a {name} model; map the query with "
                         f"cellvi.model.{name}.load_query_data.")
    genes = [str(g) for g in adata.var_names]
    if genes != summary.var_names:
        if inplace_subset_query_vars and set(summary.var_names) <= set(genes):
            adata._inplace_subset_var(pd.Index(genes).get_indexer(summary.var_names))
        else:
            raise ValueError(
                "The query's genes are not the reference's (in its order): call "
                f"`cellvi.model.{cls.__name__}.prepare_query_anndata(adata, reference)` first."
            )
    query_summary, n_ref = _extend_categories(adata, summary)
    adata.uns[UNS_KEY] = query_summary.to_json()
    model = cls(adata, **options)
    ref_counts = [*n_ref.get(keys.BATCH, [1]), *n_ref.get(keys.CAT_COVS, [])]
    masks = _transfer(model.module, weights, ref_counts)
    trainable = _freeze(
        model.module, masks, freeze_dropout=freeze_dropout,
        freeze_expression=freeze_expression,
        freeze_decoder_first_layer=freeze_decoder_first_layer,
        freeze_batchnorm_encoder=freeze_batchnorm_encoder,
        freeze_batchnorm_decoder=freeze_batchnorm_decoder,
        freeze_classifier=freeze_classifier, unfrozen=unfrozen,
    )
    if not unfrozen:
        _keep_reference_rows(model.module, masks)
    model.module.to(device)
    model.device = torch.device(device)
    new_batches = query_summary.batch_categories[n_ref.get(keys.BATCH, [1])[0]:]
    model._query_plan_defaults = {"weight_decay": 0.0}
    model.train_settings = {"reference_mapping": {
        "new_batches": list(new_batches), "trainable": trainable, "unfrozen": unfrozen}}
    if not any(p.requires_grad for p in model.module.parameters()):
        warnings.warn("load_query_data: no parameter trains with these freeze options.",
                      UserWarning, stacklevel=3)
    return model


def _keep_reference_rows(module: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Mask the reference's rows out of the gradients, and restore them after every step."""
    params = dict(module.named_parameters())
    kept = {}
    for name, mask in masks.items():
        p = params.get(name)
        if p is None or not p.requires_grad:
            continue
        m = mask.to(p.device)
        p.register_hook(lambda g, m=m: g * m)
        kept[name] = (p, p.detach().clone(), m.bool())

    @torch.no_grad()
    def restore() -> None:
        for p, original, new_rows in kept.values():
            p.copy_(torch.where(new_rows.to(p.device), p, original.to(p.device)))

    module.after_optimizer_step = restore
