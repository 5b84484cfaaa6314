"""The commands that query a trained model: ``embed``, ``normalize``, ``de``, ``predict``."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import _models as m
from ._common import (
    ADATA,
    CLIError,
    check_output,
    chunked,
    cli_name,
    existing,
    find_model_dir,
    model_class,
    read_data,
    saved_state,
    write_csv,
    write_h5ad,
)


@dataclass
class Query:
    """A loaded model and the AnnData(s) a command asks it about."""

    name: str
    model: Any
    adatas: list
    given: bool  # the AnnData are the user's (queries get adata=), not the model's own
    model_dir: Path


def query_inputs(args) -> tuple[Path, type, list[Path]]:
    """Resolve the model folder and class and the data paths; checks only, no loading."""
    model_dir = find_model_dir(existing(args.run, "run folder"))
    cls = model_class(saved_state(model_dir)["model_class"])
    paths = []
    if args.data is not None:
        paths.append(existing(args.data))
    if getattr(args, "spatial", None) is not None:
        if cls.__name__ != "GIMVI":
            raise CLIError("--spatial is for gimVI models.")
        if args.data is None:
            raise CLIError("--spatial needs the sequencing data too (DATA).")
        paths.append(existing(args.spatial, "--spatial"))
    elif cls.__name__ == "GIMVI" and args.data is not None:
        raise CLIError("a gimVI model needs --spatial SPATIAL with DATA (one AnnData per "
                       "dataset).")
    if args.data is None and not _saved_data(model_dir, cls):
        raise CLIError(f"{model_dir} holds no saved AnnData: give DATA (an AnnData with the "
                       "model's genes).")
    return model_dir, cls, paths


def _saved_data(model_dir: Path, cls) -> bool:
    if cls.__name__ == "GIMVI":
        return bool(saved_state(model_dir).get("adata_files"))
    return (model_dir / ADATA).is_file()


def data_targets(cls) -> list[str]:
    """Return the AnnData files a query command writes under ``--out``."""
    return ["adata_seq.h5ad", "adata_spatial.h5ad"] if cls.__name__ == "GIMVI" else [ADATA]


def check_query(args, extra_targets=(), data=True) -> tuple[Path, type, list[Path]]:
    """Check a query command's inputs and outputs before loading anything."""
    model_dir, cls, paths = query_inputs(args)
    inputs = [*paths, model_dir]
    targets = [*(data_targets(cls) if data else []), *extra_targets]
    check_output(Path(args.out), overwrite=args.overwrite, inputs=inputs, targets=targets)
    return model_dir, cls, paths


def _match_genes(adata, genes: list[str], what: str):
    """Subset/reorder ``adata`` to the model's genes when it has them all."""
    names = [str(g) for g in adata.var_names]
    if names == list(genes):
        return adata
    missing = sorted(set(genes) - set(names))
    if missing:
        raise CLIError(f"{what} lacks {len(missing)} of the model's {len(genes)} genes (e.g. "
                       f"{missing[:3]}); map it with `cellvi map` (which pads them).")
    print(f"{what}: the model's {len(genes):,} genes taken from its {len(names):,}, in the "
          "model's order")
    return adata[:, pd.Index(names).get_indexer(genes)].copy()


def load_query(args, model_dir: Path, cls, paths: list[Path]) -> Query:
    """Load the model and the AnnData(s) to query."""
    name = cli_name(cls.__name__)
    device = getattr(args, "device", "cpu")
    if cls.__name__ == "GIMVI":
        if paths:
            seq = read_data(paths[0], transpose=args.transpose)
            spatial = read_data(paths[1], transpose=args.transpose)
            state = saved_state(model_dir)
            genes = [s["var_names"] for s in _summaries(state)]
            seq = _match_genes(seq, genes[0], "DATA")
            spatial = _match_genes(spatial, genes[1], "--spatial")
            model = cls.load(model_dir, adata_seq=seq, adata_spatial=spatial, device=device)
        else:
            model = cls.load(model_dir, device=device)
        return Query(name, model, list(model.adatas), False, model_dir)
    if paths:
        data = read_data(paths[0], transpose=args.transpose)
        if _saved_data(model_dir, cls):
            model = cls.load(model_dir, device=device)
            data = _match_genes(data, list(model.summary.var_names), "DATA")
            return Query(name, model, [data], True, model_dir)
        genes = _summaries(saved_state(model_dir))[0]["var_names"]
        data = _match_genes(data, genes, "DATA")
        model = cls.load(model_dir, adata=data, device=device)
        return Query(name, model, [data], False, model_dir)
    model = cls.load(model_dir, device=device)
    return Query(name, model, [model.adata], False, model_dir)


def _summaries(state: dict) -> list[dict]:
    """Return the saved summaries' JSON (one, or one per dataset)."""
    import json

    raw = state.get("summaries") or [state["summary"]]
    out = []
    for s in raw:
        s = json.loads(s) if isinstance(s, str) else s
        names = s.get("var_names")
        if names is None:
            from cellvi.data import DataSummary

            names = DataSummary.from_json(json.dumps(s)).var_names
        out.append({**s, "var_names": [str(g) for g in names]})
    return out


def hint(err: ValueError) -> Exception:
    """Point a query's error at ``cellvi map`` when the data hold batches the model lacks."""
    text = str(err)
    if "categories the model was not set up with" in text:
        return CLIError(f"{text} Cells of new batches: map them onto the model first with "
                        "`cellvi map RUN DATA --out FOLDER`, then query FOLDER.")
    return err


def _finish(q: Query, args, what: str, t0: float) -> None:
    names = data_targets(type(q.model))
    out = Path(args.out)
    for a, n in zip(q.adatas, names):
        write_h5ad(out / n, a)
    print(f"cellvi {args.command}: {what}; wrote "
          + " and ".join(str(out / n) for n in names) + f" ({time.perf_counter() - t0:.1f} s)")


# ----------------------------------------------------------------------------- commands
def cmd_embed(args) -> int:
    """``cellvi embed``: the latent representation into ``obsm``."""
    model_dir, cls, paths = check_query(args)
    t0 = time.perf_counter()
    q = load_query(args, model_dir, cls, paths)
    key = args.key or m.latent_key(q.name)
    if q.name == "gimvi":
        latents = q.model.get_latent_representation(q.adatas if q.given else None)
        for a, z in zip(q.adatas, latents):
            a.obsm[key] = z
        dims = latents[0].shape[1]
    else:
        adata = q.adatas[0]
        target = adata if q.given else None
        adata.obsm[key] = chunked(
            lambda idx: q.model.get_latent_representation(adata=target, indices=idx),
            adata.n_obs, desc="latent", quiet=args.quiet)
        dims = adata.obsm[key].shape[1]
    cells = sum(a.n_obs for a in q.adatas)
    _finish(q, args, f"{cells:,} cells' {dims}-d latent into obsm[{key!r}]", t0)
    return 0


def _library_size(text: str):
    if text == "latent":
        return "latent"
    try:
        value = float(text)
    except ValueError:
        raise CLIError(f"--library-size must be a positive number or 'latent', got "
                       f"{text!r}.") from None
    if not (value > 0 and np.isfinite(value)):
        raise CLIError(f"--library-size must be a positive number or 'latent', got {text!r}.")
    return value


def cmd_normalize(args) -> int:
    """``cellvi normalize``: denoised, normalised expression into ``layers``."""
    model_dir, cls, paths = check_query(args)
    library = _library_size(args.library_size)
    t0 = time.perf_counter()
    q = load_query(args, model_dir, cls, paths)
    key = args.key or m.normalized_key(q.name)
    if q.name == "gimvi":
        imputed = q.model.get_imputed_values(q.adatas if q.given else None,
                                             normalized=library != "latent")
        for a, v in zip(q.adatas, imputed):
            a.obsm[key] = pd.DataFrame(v, index=a.obs_names, columns=list(q.model.var_names))
        _finish(q, args, f"imputed expression of {len(q.model.var_names):,} genes into "
                         f"obsm[{key!r}]", t0)
        return 0
    adata = q.adatas[0]
    target = adata if q.given else None
    kw: dict[str, Any] = dict(library_size=library, n_samples=args.n_samples,
                              return_numpy=True)
    if args.transform_batch is not None:
        kw["transform_batch"] = args.transform_batch
    result = chunked(lambda idx: q.model.get_normalized_expression(adata=target, indices=idx,
                                                                   **kw),
                     adata.n_obs, desc="normalized expression", quiet=args.quiet)
    what = f"normalised expression into layers[{key!r}]"
    if q.name == "totalvi":
        rna, protein = result
        adata.obsm[f"{q.name}_protein_normalized"] = pd.DataFrame(
            np.asarray(protein, dtype=np.float32), index=adata.obs_names,
            columns=list(q.model.protein_names))
        what += f" and proteins into obsm['{q.name}_protein_normalized']"
        result = rna
    adata.layers[key] = np.asarray(result, dtype=np.float32)
    _finish(q, args, what, t0)
    return 0


def cmd_de(args) -> int:
    """``cellvi de``: a differential-expression table (CSV)."""
    model_dir, cls, paths = check_query(args, extra_targets=[args.table], data=False)
    if cls.__name__ == "GIMVI":
        raise CLIError("gimVI models have no differential expression; use scVI or totalVI.")
    t0 = time.perf_counter()
    q = load_query(args, model_dir, cls, paths)
    adata = q.adatas[0]
    if args.groupby not in adata.obs:
        raise CLIError(f"--groupby {args.groupby!r} is not a column of the data's obs "
                       f"(columns: {list(adata.obs.columns)[:20]}).")
    kw: dict[str, Any] = dict(groupby=args.groupby, silent=args.quiet)
    if q.given:
        kw["adata"] = adata
    if args.group1 is not None:
        kw["group1"] = args.group1 if len(args.group1) > 1 else args.group1[0]
    for dest, name in (("group2", "group2"), ("mode", "mode"), ("delta", "delta"),
                       ("fdr", "fdr_target"), ("n_samples", "n_samples"),
                       ("effect", "effect")):
        value = getattr(args, dest)
        if value is not None:
            kw[name] = value
    if args.batch_correction:
        kw["batch_correction"] = True
    params = inspect.signature(q.model.differential_expression).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if "effect" in kw and "effect" not in params and not takes_any:
        raise CLIError(f"--effect is not an option of {cls.__name__}'s differential "
                       "expression.")
    if "seed" in params or takes_any:
        kw["seed"] = args.seed
    table = q.model.differential_expression(**kw)
    table.index.name = "gene"
    write_csv(Path(args.out) / args.table, table)
    n_de = 0
    fdr = [c for c in table.columns if str(c).startswith("is_de_fdr")]
    if fdr:
        n_de = int(table[fdr[0]].astype(bool).sum())
    comparisons = table["comparison"].nunique() if "comparison" in table else 1
    print(f"cellvi de: {comparisons} comparison(s) of obs[{args.groupby!r}], {n_de:,} rows "
          f"called DE ({fdr[0] if fdr else 'no FDR column'}); wrote "
          f"{Path(args.out) / args.table} ({time.perf_counter() - t0:.1f} s)")
    return 0


def cmd_predict(args) -> int:
    """``cellvi predict``: SCANVI's labels into ``obs`` (and a CSV)."""
    model_dir, cls, paths = check_query(args, extra_targets=["predictions.csv"])
    if cls.__name__ != "SCANVI":
        raise CLIError(f"cellvi predict needs a SCANVI model; {model_dir} holds a "
                       f"{cls.__name__}.")
    t0 = time.perf_counter()
    q = load_query(args, model_dir, cls, paths)
    adata = q.adatas[0]
    target = adata if q.given else None
    key = args.key or m.PREDICTION_KEY
    m.predict(q.model, adata, target, quiet=args.quiet, key=key)
    if args.soft:
        soft = chunked(lambda idx: q.model.predict(adata=target, indices=idx, soft=True),
                       adata.n_obs, desc="probabilities", quiet=args.quiet)
        adata.obsm[f"{key}_probabilities"] = soft.set_axis(adata.obs_names, axis=0)
    write_csv(Path(args.out) / "predictions.csv", m.predictions_table(adata, key))
    counts = adata.obs[key].value_counts()
    top = ", ".join(f"{k} {v:,}" for k, v in counts.head(5).items())
    _finish(q, args, f"labels of {adata.n_obs:,} cells into obs[{key!r}] ({top}); "
                     f"{Path(args.out) / 'predictions.csv'}", t0)
    return 0
