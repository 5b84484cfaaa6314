"""Per-model knowledge of the CLI: which flags a model takes, its set-up, build and outputs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ._common import ADATA, MODEL_CLASSES, CLIError, chunked, model_class, write_csv, write_h5ad

#: Set-up flags: argparse destination -> flag.
SETUP_FLAGS = {
    "batch_key": "--batch-key",
    "labels_key": "--labels-key",
    "unlabeled_category": "--unlabeled-category",
    "layer": "--layer",
    "size_factor_key": "--size-factor-key",
    "categorical_covariate_keys": "--categorical-covariate-keys",
    "continuous_covariate_keys": "--continuous-covariate-keys",
    "protein_key": "--protein-key",
    "protein_names_key": "--protein-names-key",
    "spatial": "--spatial",
    "spatial_batch_key": "--spatial-batch-key",
    "spatial_labels_key": "--spatial-labels-key",
    "spatial_layer": "--spatial-layer",
}
_SCVI_SETUP = {"batch_key", "labels_key", "layer", "size_factor_key",
               "categorical_covariate_keys", "continuous_covariate_keys"}
SETUP_OF = {
    "scvi": _SCVI_SETUP,
    "linear": _SCVI_SETUP,
    "autozi": _SCVI_SETUP,
    "scanvi": _SCVI_SETUP | {"unlabeled_category"},
    "totalvi": (_SCVI_SETUP - {"labels_key"}) | {"protein_key", "protein_names_key"},
    "gimvi": {"batch_key", "labels_key", "layer", "spatial", "spatial_batch_key",
              "spatial_labels_key", "spatial_layer"},
}

#: Model-option flags: argparse destination -> flag.
OPTION_FLAGS = {
    "n_latent": "--n-latent",
    "n_hidden": "--n-hidden",
    "n_layers": "--n-layers",
    "dropout_rate": "--dropout-rate",
    "dispersion": "--dispersion",
    "gene_likelihood": "--gene-likelihood",
    "latent_distribution": "--latent-distribution",
    "zero_inflation": "--zero-inflation",
}
_SCVI_OPTIONS = {k: k for k in ("n_latent", "n_hidden", "n_layers", "dropout_rate",
                                "dispersion", "gene_likelihood", "latent_distribution")}
#: Per model: flag destination -> the model's option name.
OPTIONS_OF = {
    "scvi": _SCVI_OPTIONS,
    "linear": _SCVI_OPTIONS,
    "scanvi": _SCVI_OPTIONS,
    "autozi": {**{k: v for k, v in _SCVI_OPTIONS.items() if k != "gene_likelihood"},
               "zero_inflation": "zero_inflation"},
    "totalvi": {"n_latent": "n_latent", "n_hidden": "n_hidden", "n_layers": "n_layers",
                "dispersion": "gene_dispersion", "gene_likelihood": "gene_likelihood",
                "latent_distribution": "latent_distribution"},
    "gimvi": {"n_latent": "n_latent"},
}

#: The obs key into which ``predict`` writes SCANVI's labels (and ``..._probability``).
PREDICTION_KEY = "scanvi_prediction"


def latent_key(name: str) -> str:
    """Return the ``obsm`` key of a model's latent (``X_scvi``...)."""
    return f"X_{name}"


def normalized_key(name: str) -> str:
    """Return the layer of a model's normalised expression (``scvi_normalized``...)."""
    return f"{name}_normalized"


def check_flags(name: str, args: argparse.Namespace) -> None:
    """Refuse set-up and option flags that ``--model name`` does not take; fill defaults."""
    for dest, flag in SETUP_FLAGS.items():
        if getattr(args, dest, None) is not None and dest not in SETUP_OF[name]:
            takes = sorted(SETUP_FLAGS[d] for d in SETUP_OF[name])
            raise CLIError(f"{flag} is not used by --model {name} (its set-up flags: "
                           f"{', '.join(takes)}).")
    for dest, flag in OPTION_FLAGS.items():
        if getattr(args, dest, None) is not None and dest not in OPTIONS_OF[name]:
            takes = sorted(OPTION_FLAGS[d] for d in OPTIONS_OF[name])
            raise CLIError(f"{flag} is not an option of --model {name} (its options: "
                           f"{', '.join(takes)}; others with --model-option KEY=VALUE).")
    if name == "scanvi":
        if args.labels_key is None:
            raise CLIError("--model scanvi needs --labels-key (the obs column of the cell "
                           "labels; unlabelled cells hold --unlabeled-category).")
        if args.unlabeled_category is None:
            args.unlabeled_category = "Unknown"
    elif getattr(args, "scvi_epochs", None) is not None:
        raise CLIError("--scvi-epochs is for --model scanvi (pre-train SCVI, then SCANVI).")
    if name == "totalvi" and args.protein_key is None:
        args.protein_key = "protein_expression"
    if name == "gimvi":
        if args.spatial is None:
            raise CLIError("--model gimvi needs --spatial SPATIAL (the spatial dataset; the "
                           "positional input is the sequencing one).")
    elif getattr(args, "kappa", None) is not None:
        raise CLIError("--kappa is for --model gimvi.")


def model_options(name: str, args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    """Return the model's options from the flags given (its defaults for the others)."""
    options = {option: getattr(args, dest) for dest, option in OPTIONS_OF[name].items()
               if getattr(args, dest, None) is not None}
    for key in extra:
        if key in options:
            raise CLIError(f"--model-option {key} repeats a flag; give it once.")
    options.update(extra)
    return options


def setup(name: str, adatas: list, args: argparse.Namespace) -> None:
    """Run the model's ``setup_anndata`` with the flags (``adatas``: one, or seq + spatial)."""
    cls = model_class(MODEL_CLASSES[name])
    common = dict(layer=args.layer, batch_key=args.batch_key,
                  size_factor_key=args.size_factor_key,
                  categorical_covariate_keys=args.categorical_covariate_keys,
                  continuous_covariate_keys=args.continuous_covariate_keys)
    if name in ("scvi", "linear", "autozi"):
        cls.setup_anndata(adatas[0], labels_key=args.labels_key, **common)
    elif name == "scanvi":
        _check_unlabeled(adatas[0], args.labels_key, args.unlabeled_category)
        cls.setup_anndata(adatas[0], args.labels_key, _category(adatas[0], args.labels_key,
                                                                args.unlabeled_category),
                          **common)
    elif name == "totalvi":
        cls.setup_anndata(adatas[0], protein_expression_obsm_key=args.protein_key,
                          protein_names_uns_key=args.protein_names_key, **common)
    else:
        cls.setup_anndata(adatas[0], batch_key=args.batch_key, labels_key=args.labels_key,
                          layer=args.layer)
        cls.setup_anndata(adatas[1], batch_key=args.spatial_batch_key,
                          labels_key=args.spatial_labels_key, layer=args.spatial_layer)


def _category(adata, key: str, value: str):
    """Return the unlabelled category as the column holds it (a number if numeric)."""
    column = adata.obs[key]
    cats = column.cat.categories if isinstance(column.dtype, pd.CategoricalDtype) else None
    values = cats if cats is not None else pd.unique(column)
    if value not in set(map(str, values)):
        return value
    for v in values:
        if str(v) == value:
            return v
    return value


def _check_unlabeled(adata, key: str, value: str) -> None:
    if key not in adata.obs:
        raise CLIError(f"--labels-key {key!r} is not a column of the input's obs (columns: "
                       f"{list(adata.obs.columns)[:20]}).")


def build(name: str, adatas: list, options: dict[str, Any], args: argparse.Namespace,
          train_kwargs: dict[str, Any]):
    """Build the model (SCANVI from a pre-trained SCVI when ``--scvi-epochs`` is given)."""
    cls = model_class(MODEL_CLASSES[name])
    if name == "gimvi":
        return cls(adatas[0], adatas[1], **options)
    if name == "scanvi" and args.scvi_epochs is not None:
        scvi_cls = model_class("SCVI")
        scanvi_only = {"linear_classifier", "y_prior", "classifier_parameters",
                       "classification_ratio", "labels_groups", "use_labels_groups"}
        scvi_cls.setup_anndata(adatas[0], layer=args.layer, batch_key=args.batch_key,
                               labels_key=args.labels_key, size_factor_key=args.size_factor_key,
                               categorical_covariate_keys=args.categorical_covariate_keys,
                               continuous_covariate_keys=args.continuous_covariate_keys)
        vae = scvi_cls(adatas[0], **{k: v for k, v in options.items() if k not in scanvi_only})
        pre = {k: v for k, v in train_kwargs.items()
               if k in ("seed", "device", "progress_bar", "data_placement", "batch_size",
                        "train_size")}
        vae.train(max_epochs=args.scvi_epochs, **pre)
        category = _category(adatas[0], args.labels_key, args.unlabeled_category)
        return cls.from_scvi_model(vae, category, labels_key=args.labels_key,
                                   **{k: v for k, v in options.items() if k in scanvi_only})
    return cls(adatas[0], **options)


def train_kwargs(name: str, args: argparse.Namespace, extra: dict[str, Any]) -> dict[str, Any]:
    """Return the keyword arguments of ``model.train`` from the training flags."""
    kw: dict[str, Any] = dict(seed=args.seed, device=args.device, progress_bar=not args.quiet,
                              data_placement=args.data_placement)
    for dest in ("batch_size", "train_size", "lr", "early_stopping",
                 "early_stopping_patience", "kappa"):
        value = getattr(args, dest, None)
        if value is not None:
            kw[dest] = value
    for key in extra:
        if key in kw or key == "max_epochs":
            raise CLIError(f"--train-option {key} repeats a flag; give it once.")
    kw.update(extra)
    return kw


def default_epochs(model) -> int:
    """Epochs ``train`` runs without ``max_epochs`` (each model's rule)."""
    return int(model._default_max_epochs())


# ----------------------------------------------------------------------------- outputs
def output_names(name: str) -> list[str]:
    """Return the files ``cellvi train --model name`` writes (besides run.json)."""
    if name == "gimvi":
        data = ["adata_seq.h5ad", "adata_spatial.h5ad"]
    else:
        data = [ADATA]
    tables = {"scanvi": ["predictions.csv"], "linear": ["loadings.csv"],
              "autozi": ["zero_inflation.csv"]}.get(name, [])
    return ["model", *data, "history.csv", *tables]


def annotate(name: str, model, adatas: list, *, quiet: bool, normalized: bool = True,
             adata_given: bool = False) -> dict[str, Any]:
    """Write the model's results into the AnnData(s); return what was written where.

    ``adata_given``: the AnnData are not the model's own (``adata=`` of the queries).
    """
    written: dict[str, Any] = {"latent_key": latent_key(name)}
    if name == "gimvi":
        latents = model.get_latent_representation(adatas if adata_given else None)
        for a, z in zip(adatas, latents):
            a.obsm[latent_key(name)] = z
        if normalized:
            imputed = model.get_imputed_values(adatas if adata_given else None)
            spatial = adatas[-1]
            spatial.obsm["gimvi_imputed"] = pd.DataFrame(
                imputed[-1], index=spatial.obs_names, columns=list(model.var_names))
            written["imputed_key"] = "gimvi_imputed"
        return written
    adata = adatas[0]
    target = adata if adata_given else None
    adata.obsm[latent_key(name)] = chunked(
        lambda idx: model.get_latent_representation(adata=target, indices=idx),
        adata.n_obs, desc="latent", quiet=quiet)
    if normalized:
        if name == "totalvi":
            rna, protein = chunked(
                lambda idx: model.get_normalized_expression(adata=target, indices=idx,
                                                            return_numpy=True),
                adata.n_obs, desc="normalized expression", quiet=quiet)
            adata.layers[normalized_key(name)] = np.asarray(rna, dtype=np.float32)
            adata.obsm["totalvi_protein_normalized"] = pd.DataFrame(
                np.asarray(protein, dtype=np.float32), index=adata.obs_names,
                columns=list(model.protein_names))
            written["protein_key"] = "totalvi_protein_normalized"
        else:
            adata.layers[normalized_key(name)] = np.asarray(chunked(
                lambda idx: model.get_normalized_expression(adata=target, indices=idx,
                                                            return_numpy=True),
                adata.n_obs, desc="normalized expression", quiet=quiet), dtype=np.float32)
        written["normalized_layer"] = normalized_key(name)
    if name == "scanvi":
        written.update(predict(model, adata, target, quiet=quiet))
    return written


def predict(model, adata, target, *, quiet: bool, key: str = PREDICTION_KEY) -> dict[str, Any]:
    """Write SCANVI's predicted labels and their probability into ``adata.obs``."""
    soft = chunked(lambda idx: model.predict(adata=target, indices=idx, soft=True),
                   adata.n_obs, desc="predict", quiet=quiet)
    probs = soft.to_numpy()
    names = np.asarray(soft.columns, dtype=object)
    adata.obs[key] = pd.Categorical(names[probs.argmax(1)], categories=list(soft.columns))
    adata.obs[f"{key}_probability"] = probs.max(1)
    return {"prediction_key": key}


def predictions_table(adata, key: str = PREDICTION_KEY) -> pd.DataFrame:
    """Return the predicted label and its probability per cell."""
    return pd.DataFrame({"label": adata.obs[key].astype(str),
                         "probability": adata.obs[f"{key}_probability"]},
                        index=pd.Index(adata.obs_names, name="cell"))


def write_tables(name: str, model, adatas: list, out: Path) -> list[str]:
    """Write the model's own tables (predictions, loadings, zero inflation) as CSV."""
    if name == "scanvi":
        write_csv(out / "predictions.csv", predictions_table(adatas[0]))
        return ["predictions.csv"]
    if name == "linear":
        loadings = model.get_loadings()
        loadings.index.name = "gene"
        write_csv(out / "loadings.csv", loadings)
        return ["loadings.csv"]
    if name == "autozi":
        table = model.get_zero_inflation()
        table.index.name = table.index.name or "gene"
        write_csv(out / "zero_inflation.csv", table)
        return ["zero_inflation.csv"]
    return []


def write_data(name: str, adatas: list, out: Path) -> list[str]:
    """Write the annotated AnnData(s) under ``out``; return their names."""
    names = ["adata_seq.h5ad", "adata_spatial.h5ad"] if name == "gimvi" else [ADATA]
    for a, n in zip(adatas, names):
        write_h5ad(out / n, a)
    return names
