"""One self-contained HTML page of a trained model: what it is, its data, training, latent.

A *run folder* is what ``cellvi train`` (or ``map``) writes: ``model/`` (the saved model with
its counts), the annotated AnnData (``adata.h5ad``, with the latent in ``obsm``),
``history.csv``, ``run.json`` (the command, the filters, what was written where) and any
table a later command added (``de.csv`` from ``cellvi de --out RUN``). A plain saved model
folder (``model.save(folder, save_anndata=True)``) works too: its latent is then computed.

The page has no external resource: its pictures are PNG images embedded as base64 ``data:``
URIs and its style is inline, so it can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import inspect
import io
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["build_report", "write_report"]

REPORT_FILE = "report.html"

#: Module options that follow from the data (not shown among the model's options).
_DATA_FIELDS = {
    "n_input", "n_batch", "n_labels", "n_continuous_cov", "n_cats_per_cov",
    "use_size_factor_key", "library_log_means", "library_log_vars", "n_input_genes",
    "n_input_proteins", "protein_batch_mask", "protein_background_prior_mean",
    "protein_background_prior_scale", "dim_input_list", "total_genes", "indices_mappings",
    "gene_likelihoods", "model_library_bools", "n_batch_list", "label_maps",
}


class ReportError(ValueError):
    """The folder cannot be reported on (named problem)."""


# ----------------------------------------------------------------------------- collecting
@dataclasses.dataclass
class _Run:
    folder: Path
    model_dir: Path
    state: dict[str, Any]
    run: dict[str, Any]
    history: pd.DataFrame

    @property
    def model_class(self) -> str:
        return str(self.state.get("model_class"))

    @property
    def settings(self) -> dict[str, Any]:
        return self.state.get("train_settings") or {}


def _locate(folder: Path) -> _Run:
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"{folder} is not a folder (give a cellvi run folder or a saved "
                          "model folder).")
    if (folder / "model" / "model.json").is_file():
        model_dir = folder / "model"
    elif (folder / "model.json").is_file():
        model_dir = folder
    else:
        raise ReportError(f"{folder} is neither a cellvi run folder (with model/model.json) "
                          "nor a saved model (with model.json).")
    try:
        state = json.loads((model_dir / "model.json").read_text())
    except (OSError, ValueError) as err:
        raise ReportError(f"{model_dir / 'model.json'} is not readable: {err}.") from None
    if not isinstance(state, dict) or "model_class" not in state:
        raise ReportError(f"{model_dir / 'model.json'} is not a cellvi model file.")
    run: dict[str, Any] = {}
    if (folder / "run.json").is_file():
        try:
            run = json.loads((folder / "run.json").read_text())
        except (OSError, ValueError) as err:
            raise ReportError(f"{folder / 'run.json'} is not readable: {err}.") from None
    hist = state.get("history") or {}
    history = pd.DataFrame()
    if hist.get("columns"):
        history = pd.DataFrame(hist["data"], columns=hist["columns"])
        if "epoch" in history:
            history = history.set_index("epoch")
        history = history.apply(pd.to_numeric, errors="coerce")
    return _Run(folder, model_dir, state, run, history)


def _summaries(state: dict[str, Any]):
    from cellvi.data import DataSummary

    raw = state.get("summaries") or [state.get("summary")]
    return [DataSummary.from_json(json.dumps(s)) for s in raw if s is not None]


def _read_h5ad(path: Path):
    import anndata

    try:
        return anndata.read_h5ad(path, backed="r")
    except Exception:  # noqa: BLE001 - a file that cannot be opened backed
        return anndata.read_h5ad(path)


def _data_files(r: _Run) -> list[Path]:
    """Return the run's annotated AnnData files (the CLI's), else the model's saved ones."""
    names = (r.run.get("outputs") or {}).get("data") or []
    files = [r.folder / n for n in names if (r.folder / n).is_file()]
    if files:
        return files
    saved = r.state.get("adata_files") or ["adata.h5ad"]
    return [r.model_dir / n for n in saved if (r.model_dir / n).is_file()]


def _load_model(r: _Run):
    import cellvi.model

    cls = getattr(cellvi.model, r.model_class, None)
    if cls is None:
        raise ReportError(f"unknown model class {r.model_class!r}.")
    return cls.load(r.model_dir)


# ----------------------------------------------------------------------------- figures
def _png(fig) -> str:
    from cellvi.pl._utils import pyplot

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", facecolor="white")
    pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str) -> str:
    return (f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'
            f"<figcaption>{html.escape(alt)}</figcaption></figure>")


# ----------------------------------------------------------------------------- HTML pieces
def _esc(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}"
    elif isinstance(value, dict) and all(not isinstance(v, dict | list) for v in value.values()):
        text = ", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
                         for k, v in value.items())
    elif isinstance(value, dict | list | tuple):
        text = json.dumps(value, default=str)
        if len(text) > 300:
            text = text[:300] + " ..."
    else:
        text = str(value)
    return html.escape(text)


def _kv(rows: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows
                   if v is not None)
    return f'<table class="kv">{body}</table>'


def _frame(df: pd.DataFrame, *, index: bool = True, digits: int = 4) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in
                   ([df.index.name or ""] if index else []) + list(df.columns))
    rows = []
    for idx, row in df.iterrows():
        cells = [f"<th>{html.escape(str(idx))}</th>"] if index else []
        for v in row:
            if isinstance(v, float | np.floating):
                text = "" if not np.isfinite(v) else f"{v:.{digits}g}"
                cells.append(f'<td class="num">{text}</td>')
            elif isinstance(v, int | np.integer) and not isinstance(v, bool | np.bool_):
                cells.append(f'<td class="num">{int(v):,}</td>')
            else:
                cells.append(f"<td>{html.escape(str(v))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}' \
           "</tbody></table>"


def _section(title: str, body: str, anchor: str) -> str:
    return f'<section id="{anchor}"><h2>{html.escape(title)}</h2>{body}</section>'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


_CSS = """
body{font:14px/1.45 -apple-system,Segoe UI,Helvetica,Arial,sans-serif;color:#222;margin:0;
background:#f5f6f8}
main{max-width:1100px;margin:0 auto;padding:24px 28px 60px;background:#fff;min-height:100vh}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;border-bottom:2px solid #e3e6ea;
padding-bottom:4px;margin-top:32px}h3{font-size:15px;margin:18px 0 6px}
.sub{color:#666;margin:0 0 12px}code{background:#f1f3f5;padding:1px 4px;border-radius:3px}
nav a{margin-right:14px;color:#1f5fa8;text-decoration:none}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
table.kv th{text-align:left;color:#555;font-weight:600;padding:3px 14px 3px 0;vertical-align:top;
white-space:nowrap}table.kv td{padding:3px 0;word-break:break-word}
table.grid th,table.grid td{border:1px solid #e3e6ea;padding:3px 8px}
table.grid thead th{background:#f1f3f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:10px 0 18px}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#666;font-size:12px}.note{color:#666;font-style:italic}
.cols{display:flex;flex-wrap:wrap;gap:28px}.cols>div{flex:1 1 320px}
"""


# ----------------------------------------------------------------------------- sections
def _options_table(r: _Run) -> list[tuple[str, Any]]:
    """Every option of the model: the given ones and the defaults of the others."""
    import cellvi.model

    given = dict(r.state.get("init_kwargs") or {})
    cls = getattr(cellvi.model, r.model_class, None)
    values: dict[str, Any] = {}
    if cls is not None:
        try:
            for name, p in inspect.signature(cls).parameters.items():
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and \
                        p.default is not p.empty and not name.startswith("adata"):
                    values[name] = p.default
        except (TypeError, ValueError):
            pass
        module = getattr(cls, "_module_cls", None)
        config = getattr(module, "Config", None)
        if config is not None and dataclasses.is_dataclass(config):
            for f in dataclasses.fields(config):
                if f.name in _DATA_FIELDS or f.name in values:
                    continue
                if f.default is not dataclasses.MISSING:
                    values[f.name] = f.default
                elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                    values[f.name] = f.default_factory()  # type: ignore[misc]
    values.update(given)
    return [(k + (" (given)" if k in given else ""), v) for k, v in values.items()
            if not callable(v)]


def _model_section(r: _Run) -> str:
    s = r.settings
    run = r.run
    hist = r.history
    rows: list[tuple[str, Any]] = [
        ("class", f"cellvi.model.{r.model_class}"),
        ("saved by", f"cellvi {r.state.get('cellvi_version')}"),
        ("command", " ".join(["cellvi", *run["argv"]]) if run.get("argv") else None),
        ("created", run.get("created")),
        ("training step", s.get("training_step")),
        ("epochs trained", len(hist) if len(hist) else None),
        ("epochs asked", s.get("max_epochs")),
        ("kept epoch", s.get("kept_epoch")),
        ("early stopping", s.get("early_stopping")),
        ("device", s.get("device")),
        ("processes", s.get("processes")),
        ("batch size", s.get("batch_size")),
        ("learning rate", s.get("lr")),
        ("train size", s.get("train_size")),
        ("seed", s.get("seed")),
        ("data placement", s.get("data_placement")),
        ("training time", f"{run['seconds']:.1f} s" if run.get("seconds") else None),
    ]
    for key in ("calibration", "reference_mapping", "kappa", "interrupted"):
        if s.get(key) is not None:
            rows.append((key.replace("_", " "), s.get(key)))
    if run.get("reference"):
        rows.append(("reference model", run.get("reference")))
    settings = s.get("settings")
    body = '<div class="cols"><div>' + _kv(rows) + "</div><div><h3>Options</h3>" + \
        _kv(_options_table(r)) + ("<h3>cellvi.settings in force</h3>" + _kv(list(
            settings.items())) if isinstance(settings, dict) else "") + "</div></div>"
    return _section("The model", body, "model")


def _counts_table(obs: pd.DataFrame, key: str, limit: int = 30) -> str:
    counts = obs[key].astype(str).value_counts()
    df = counts.head(limit).rename("cells").to_frame()
    df.index.name = key
    more = f"<p class='note'>... and {len(counts) - limit} more</p>" if len(counts) > limit \
        else ""
    return _frame(df) + more


def _data_section(r: _Run, summaries, obs_list: list[pd.DataFrame], roles: list[str]) -> str:
    parts = []
    for s, obs, role in zip(summaries, obs_list, roles):
        rows: list[tuple[str, Any]] = [
            ("cells", f"{len(obs):,}" if obs is not None else f"{s.n_cells:,}"),
            ("genes", f"{s.n_vars:,}"),
            ("counts read from", f"layers[{s.layer!r}]" if s.layer else "X"),
            ("batches", f"{s.n_batch} from obs[{s.batch_key!r}]" if s.batch_key else "one"),
            ("labels", f"{s.n_labels} from obs[{s.labels_key!r}]" if s.labels_key else None),
        ]
        if s.categorical_covariate_keys:
            rows.append(("categorical covariates", list(s.categorical_covariate_keys)))
        if s.continuous_covariate_keys:
            rows.append(("continuous covariates", list(s.continuous_covariate_keys)))
        if s.size_factor_key:
            rows.append(("size factors", f"obs[{s.size_factor_key!r}]"))
        for f in s.fields:
            names = getattr(f, "column_names", None)
            if f.kind not in ("counts",) and names and getattr(f, "obsm_key", None):
                rows.append((f"obsm[{f.obsm_key!r}]", f"{len(names)} features: "
                             f"{', '.join(map(str, names[:12]))}"
                             + (" ..." if len(names) > 12 else "")))
        tables = ""
        if obs is not None:
            for key in (s.batch_key, s.labels_key):
                if key and key in obs:
                    tables += f"<div><h3>obs[{html.escape(repr(key))}]</h3>" \
                              f"{_counts_table(obs, key)}</div>"
        title = f"<h3>{html.escape(role)}</h3>" if len(summaries) > 1 else ""
        parts.append(title + '<div class="cols"><div>' + _kv(rows) + "</div>" + tables +
                     "</div>")
    filters = r.run.get("filters") or {}
    lines = []
    for what, rec in filters.items():
        if not isinstance(rec, dict):
            continue
        bits = [f"{rec.get('cells_in', '?'):,} cells x {rec.get('genes_in', '?'):,} genes read"]
        if "min_counts" in rec:
            bits.append(f"cells with fewer than {rec['min_counts']:g} counts dropped "
                        f"({rec.get('cells_in', 0) - rec.get('cells', 0):,})")
        if "n_top_genes" in rec:
            bits.append(f"{rec.get('genes', '?'):,} highly variable genes kept "
                        f"(--n-top-genes {rec['n_top_genes']})")
        lines.append(f"<li>{html.escape(what)}: {html.escape('; '.join(bits))}</li>")
    inputs = r.run.get("inputs") or []
    extra = ""
    if inputs:
        extra += _kv([("input" + ("s" if len(inputs) > 1 else ""), ", ".join(inputs))])
    if lines:
        extra += "<h3>Filters before training</h3><ul>" + "".join(lines) + "</ul>"
    return _section("The data", "".join(parts) + extra, "data")


def _metrics_rows(r: _Run) -> pd.DataFrame | None:
    hist = r.history
    if hist.empty:
        return None
    kept = r.settings.get("kept_epoch")
    rows = {}
    last = hist.index[-1]
    rows[f"last epoch ({last})"] = hist.loc[last]
    if kept is not None and kept in hist.index and kept != last:
        rows[f"kept epoch ({kept})"] = hist.loc[kept]
    df = pd.DataFrame(rows)
    keep = [c for c in df.index if c not in ("time",) and not str(c).endswith("_epoch")
            or str(c) == "train_loss_epoch"]
    df = df.loc[keep]
    df.index.name = "metric"
    return df


def _training_section(r: _Run, progress) -> str:
    import cellvi.pl

    hist = r.history
    if hist.empty:
        return _section("Training", _note("The model has no training history (not trained)."),
                        "training")
    parts = []
    metrics = [m for m in ("elbo", "reconstruction_loss", "kl_local", "loss", "accuracy",
                           "calibration_error", "classification_loss")
               if any(f"{m}_{s}" in hist for s in ("train", "validation"))]
    holder = type("History", (), {})()
    holder.history, holder.train_settings = hist, r.settings
    progress("training curves")
    fig = cellvi.pl.training_curves(holder, metrics=metrics[:6], ncols=3)
    parts.append(_img(_png(fig), "Per-epoch training and validation metrics"
                      + (f" (dashed: the kept epoch, {r.settings['kept_epoch']})"
                         if r.settings.get("kept_epoch") is not None else "")))
    table = _metrics_rows(r)
    if table is not None:
        parts.append("<h3>Final metrics</h3>" + _frame(table))
    return _section("Training", "".join(parts), "training")


def _latent_section(r: _Run, latent: np.ndarray | None, obs: pd.DataFrame | None,
                    colors: list[str], method: str, max_cells: int, seed: int,
                    labels_key: str | None, batch_key: str | None, unlabeled: str | None,
                    progress) -> str:
    import cellvi.pl
    from cellvi.pl._latent import _method

    if latent is None or obs is None:
        return _section("Latent space", _note("No latent representation was found or could be "
                                              "computed."), "latent")
    n = latent.shape[0]
    rng = np.random.default_rng(seed)
    cells = np.sort(rng.choice(n, max_cells, replace=False)) if n > max_cells else np.arange(n)
    z, sub = latent[cells], obs.iloc[cells]
    progress("latent picture")
    used = "given" if z.shape[1] == 2 else _method(method)
    frame = _consistent_colours(sub[[c for c in colors if c in sub]].copy(), labels_key,
                                unlabeled)
    frame.index = [str(i) for i in range(len(frame))]
    import anndata

    light = anndata.AnnData(obs=frame, obsm={"X_latent": z})
    fig = cellvi.pl.latent(light, color=list(frame.columns) or None, use_rep="X_latent",
                           method=used if used != "given" else "pca", seed=seed, ncols=3)
    axis = {"umap": "UMAP", "pca": "first two principal components", "tsne": "t-SNE",
            "given": "the 2-d latent"}[used]
    parts = [_img(_png(fig), f"The {latent.shape[1]}-d latent space ({axis}) of "
                             f"{len(cells):,} cells" + (f" (a random {len(cells):,} of {n:,})"
                                                        if n > len(cells) else "")
                  + (", coloured by " + ", ".join(frame.columns) if len(frame.columns) else ""))]
    progress("integration scores")
    scores = _scores(z, sub, batch_key, labels_key, unlabeled, seed)
    if scores is not None:
        parts.append("<h3>Integration scores of the latent (higher is better)</h3>"
                     + _frame(scores) + _note(
                         "Batch mixing: entropy of batches among neighbours, iLISI, batch "
                         "silhouette; label conservation: kNN purity, cLISI, label silhouette, "
                         "NMI/ARI of k-means clusters, graph connectivity (cellvi.metrics), on "
                         "the cells drawn above" + (f", label scores on the cells not "
                                                    f"{unlabeled!r}" if unlabeled else "")
                         + "."))
    return _section("Latent space", "".join(parts), "latent")


def _consistent_colours(frame: pd.DataFrame, labels_key: str | None,
                        unlabeled: str | None) -> pd.DataFrame:
    """Give label-like columns the same category order (so a class has one colour).

    The unlabelled category goes last; columns whose categories are among the labels' (the
    predictions) take the labels' order.
    """
    if not labels_key or labels_key not in frame:
        return frame
    labels = frame[labels_key].astype(str)
    cats = sorted(pd.unique(labels))
    if unlabeled is not None and str(unlabeled) in cats:
        cats = [c for c in cats if c != str(unlabeled)] + [str(unlabeled)]
    frame[labels_key] = pd.Categorical(labels, categories=cats)
    for col in frame.columns:
        if col == labels_key or pd.api.types.is_numeric_dtype(frame[col]):
            continue
        values = frame[col].astype(str)
        present = set(pd.unique(values))
        if present <= set(cats):
            frame[col] = pd.Categorical(values, categories=[c for c in cats if c in present
                                                            or c != str(unlabeled)])
    return frame


def _scores(z, obs, batch_key, labels_key, unlabeled, seed) -> pd.DataFrame | None:
    from cellvi.metrics import score_embedding

    out: dict[str, float] = {}
    if len(z) < 20:
        return None
    if batch_key and batch_key in obs and obs[batch_key].nunique() > 1:
        try:
            out.update(score_embedding(z, batch=obs[batch_key].astype(str).to_numpy(),
                                       metrics=["entropy_batch_mixing", "ilisi"], seed=seed))
        except (ValueError, KeyError):
            pass
        if labels_key and labels_key in obs:
            try:
                out.update(score_embedding(z, batch=obs[batch_key].astype(str).to_numpy(),
                                           labels=obs[labels_key].astype(str).to_numpy(),
                                           metrics=["silhouette_batch"], seed=seed))
            except (ValueError, KeyError):
                pass
    if labels_key and labels_key in obs:
        labels = obs[labels_key].astype(str).to_numpy()
        keep = labels != str(unlabeled) if unlabeled is not None else np.ones(len(z), bool)
        if keep.sum() >= 20 and len(set(labels[keep])) > 1:
            try:
                out.update(score_embedding(z[keep], labels=labels[keep], seed=seed,
                                           metrics=["knn_purity", "clisi", "silhouette_label",
                                                    "nmi", "ari", "graph_connectivity"]))
            except (ValueError, KeyError):
                pass
    if not out:
        return None
    df = pd.Series(out, name="score").to_frame()
    df.index.name = "metric"
    return df


def _prediction_section(obs: pd.DataFrame | None, key: str, labels_key: str | None,
                        unlabeled: str | None, calibration) -> str:
    if obs is None or key not in obs:
        return ""
    parts = []
    pred = obs[key].astype(str)
    if labels_key and labels_key in obs:
        truth = obs[labels_key].astype(str)
        labelled = truth != str(unlabeled) if unlabeled is not None else truth == truth
        if labelled.any():
            acc = float((pred[labelled] == truth[labelled]).mean())
            parts.append(_kv([("agreement with the given labels",
                               f"{acc:.3f} over the {int(labelled.sum()):,} labelled cells "
                               "(most of them trained on)")]))
        table = pd.crosstab(truth.rename(f"given {labels_key}"),
                            pred.rename("predicted"))
        parts.append("<h3>Given labels (rows) against predicted (columns)</h3>" + _frame(table))
    prob = f"{key}_probability"
    if prob in obs:
        p = obs[prob].to_numpy(dtype=float)
        parts.append(_kv([("mean top probability", f"{np.nanmean(p):.3f}"),
                          ("cells with top probability < 0.5", f"{int((p < 0.5).sum()):,}")]))
    if calibration:
        parts.append(_kv([("calibration (temperature scaling)", calibration)]))
    return _section("Label predictions (SCANVI)", "".join(parts), "predictions")


def _model_specific(r: _Run, progress) -> str:
    import cellvi.pl

    parts = []
    folder = r.folder
    if (folder / "loadings.csv").is_file():
        progress("loadings")
        loadings = pd.read_csv(folder / "loadings.csv", index_col=0)
        parts.append("<h3>LDVAE loadings</h3>" + _img(_png(cellvi.pl.loadings(loadings)),
                                                       "Top genes of each latent factor"))
    if (folder / "zero_inflation.csv").is_file():
        progress("zero inflation")
        table = pd.read_csv(folder / "zero_inflation.csv", index_col=0)
        try:
            parts.append("<h3>AutoZI: zero-inflated genes</h3>"
                         + _img(_png(cellvi.pl.zero_inflation(table)),
                                "Posterior probability that each gene is zero-inflated"))
        except (KeyError, ValueError, TypeError) as err:
            parts.append(_note(f"zero-inflation plot skipped: {err}"))
        if "is_zero_inflated" in table:
            parts.append(_kv([("genes called zero-inflated",
                               f"{int(table['is_zero_inflated'].astype(bool).sum()):,} of "
                               f"{len(table):,}")]))
    if r.model_class == "TOTALVI":
        progress("foreground probability")
        try:
            model = _load_model(r)
            proteins = list(model.protein_names)[:4]
            fig = cellvi.pl.foreground_probability(model, proteins=proteins)
            parts.append("<h3>totalVI: protein foreground</h3>" + _img(
                _png(fig), "Foreground probability against counts, first proteins"))
        except Exception as err:  # noqa: BLE001 - an optional picture
            parts.append(_note(f"foreground plot skipped: {type(err).__name__}: {err}"))
    if not parts:
        return ""
    return _section(f"{r.model_class}'s own results", "".join(parts), "own")


def _de_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("de*.csv") if p.is_file())


def _de_section(r: _Run, progress, n_top: int = 10) -> str:
    import cellvi.pl

    files = _de_files(r.folder)
    if not files:
        return ""
    parts = []
    for path in files:
        progress(f"DE {path.name}")
        de = pd.read_csv(path, index_col=0)
        parts.append(f"<h3>{html.escape(path.name)}</h3>")
        try:
            comparisons = list(pd.unique(de["comparison"])) if "comparison" in de else [""]
            fig = cellvi.pl.volcano(de, comparisons=comparisons[:6] if comparisons != [""]
                                    else None)
            parts.append(_img(_png(fig), f"Volcano of {path.name}"
                              + (f" (first 6 of {len(comparisons)} comparisons)"
                                 if len(comparisons) > 6 else "")))
        except (KeyError, ValueError, TypeError) as err:
            parts.append(_note(f"volcano skipped: {err}"))
        fdr = [c for c in de.columns if str(c).startswith("is_de_fdr")]
        lfc = next((c for c in ("lfc_mean", "lfc_estimate", "lfc_median") if c in de), None)
        groups = [(g, de[de["comparison"] == g]) for g in pd.unique(de["comparison"])] \
            if "comparison" in de else [("", de)]
        for name, part in groups[:6]:
            order = part
            if lfc is not None:
                called = part[fdr[0]].astype(bool) if fdr else pd.Series(True, part.index)
                rank = np.where(called, part[lfc].abs(), -np.inf)
                order = part.iloc[np.argsort(-rank, kind="stable")]
            cols = [c for c in (lfc, "lfc_std", "proba_de", "bayes_factor", *fdr[:1],
                                "raw_normalized_mean1", "raw_normalized_mean2")
                    if c is not None and c in part]
            top = order[cols].head(n_top).copy()
            n_called = int(part[fdr[0]].astype(bool).sum()) if fdr else None
            parts.append(f"<h3>{html.escape(str(name) or 'comparison')}: top genes</h3>"
                         + (_kv([("genes called DE", f"{n_called:,} of {len(part):,} "
                                  f"({fdr[0]})")]) if fdr else "") + _frame(top))
    return _section("Differential expression", "".join(parts), "de")


def _files_section(folder: Path, report_name: str) -> str:
    rows = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or p.name == report_name:
            continue
        if p.is_dir():
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            name = p.name + "/"
        else:
            size, name = p.stat().st_size, p.name
        rows.append((name, f"{size / 1e6:.2f} MB" if size >= 1e5 else f"{size / 1e3:.1f} kB"))
    return _section("Files in the folder", _kv(rows), "files")


# ----------------------------------------------------------------------------- the page
def build_report(
    folder: str | os.PathLike,
    *,
    color: Sequence[str] = (),
    embedding: str = "auto",
    max_cells: int = 5000,
    seed: int = 0,
    progress_bar: bool = False,
    title: str | None = None,
) -> str:
    """Return the HTML report of a run folder (``cellvi train --out``) or saved model folder.

    Parameters
    ----------
    folder
        The run folder, or a folder saved with ``model.save(..., save_anndata=True)``.
    color
        Extra ``obs`` columns to colour the latent picture by (the batch, the labels and
        SCANVI's predictions are always drawn when present).
    embedding
        How the latent is drawn in 2-D: ``"auto"`` (UMAP with the ``umap`` extra, else PCA),
        ``"umap"``, ``"pca"``, ``"tsne"``.
    max_cells
        Cells drawn and scored (a seeded random subset of larger data).
    seed
        Seed of the subset, the embedding and the scores.
    progress_bar
        Show a progress bar over the report's steps.
    title
        Title of the page (default: the model class and the folder's name).

    Returns
    -------
    str
        The page: one HTML document with every picture embedded (base64 PNG).
    """
    from tqdm.auto import tqdm

    r = _locate(Path(folder))
    steps = tqdm(total=8, desc="report", disable=not progress_bar, file=sys.stderr)

    def progress(what: str) -> None:
        steps.set_postfix_str(what, refresh=False)
        steps.update(1)

    try:
        summaries = _summaries(r.state)
        roles = (["sequencing"] * int(r.state.get("n_seq", 1))
                 + ["spatial"] * (len(summaries) - int(r.state.get("n_seq", 1))))
        files = _data_files(r)
        outputs = r.run.get("outputs") or {}
        latent_key = outputs.get("latent_key")
        progress("data")
        adatas = [_read_h5ad(f) for f in files]
        obs_list = [a.obs.copy() for a in adatas] if adatas else [None] * len(summaries)
        latents = [np.asarray(a.obsm[latent_key]) for a in adatas
                   if latent_key and latent_key in a.obsm]
        if not adatas or len(latents) != len(adatas):
            latents, computed_obs = _compute_latent(r)
            if computed_obs:
                obs_list = computed_obs
        obs = None
        latent = None
        if latents and obs_list and obs_list[0] is not None:
            if len(latents) > 1:
                frames = []
                for o, role in zip(obs_list, roles):
                    o = o.copy()
                    o["dataset"] = role
                    frames.append(o)
                obs = pd.concat(frames, axis=0, ignore_index=True)
                latent = np.concatenate(latents, axis=0)
            else:
                obs, latent = obs_list[0].reset_index(drop=True), latents[0]
        s0 = summaries[0]
        batch_key, labels_key = s0.batch_key, s0.labels_key
        labels_field = s0.get("labels")
        unlabeled = (getattr(labels_field, "unlabeled_category", None)
                     if getattr(labels_field, "kind", None) == "labels" else None)
        pred_key = outputs.get("prediction_key")
        colors = []
        if len(latents) > 1:
            colors.append("dataset")
        for c in (batch_key, labels_key, pred_key, *color):
            if c and c not in colors:
                colors.append(c)
        if obs is not None:
            missing = [c for c in color if c not in obs]
            if missing:
                raise ReportError(f"--color {missing} not in the data's obs (columns: "
                                  f"{list(obs.columns)[:20]}).")
        sections = [
            _model_section(r),
            _data_section(r, summaries, obs_list, roles),
            _training_section(r, progress),
            _latent_section(r, latent, obs, colors, embedding, max_cells, seed, labels_key,
                            "dataset" if len(latents) > 1 else batch_key, unlabeled,
                            progress),
        ]
        if pred_key:
            sections.append(_prediction_section(obs, pred_key, labels_key, unlabeled,
                                                r.settings.get("calibration")))
        sections.append(_model_specific(r, progress))
        sections.append(_de_section(r, progress))
        sections.append(_files_section(r.folder, REPORT_FILE))
        progress("page")
    finally:
        steps.close()
    sections = [s for s in sections if s]
    import cellvi

    name = title or f"{r.model_class} — {r.folder.resolve().name}"
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (
        ("model", "Model"), ("data", "Data"), ("training", "Training"), ("latent", "Latent"),
        ("predictions", "Predictions"), ("own", "Model results"),
        ("de", "Differential expression"), ("files", "Files"))
        if f'id="{a}"' in "".join(sections))
    sub = (f"cellvi report of {html.escape(str(r.folder))} · made "
           f"{time.strftime('%Y-%m-%d %H:%M')} with cellvi {cellvi.__version__}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(name)}</title><style>{_CSS}</style></head><body><main>"
            f"<h1>{html.escape(name)}</h1><p class=\"sub\">{sub}</p><nav>{nav}</nav>"
            + "".join(sections) + "</main></body></html>\n")


def _compute_latent(r: _Run) -> tuple[list[np.ndarray], list[pd.DataFrame]]:
    """Return the latent and ``obs`` of the model's own cells (no annotated AnnData)."""
    try:
        model = _load_model(r)
    except (FileNotFoundError, ValueError, ReportError):
        return [], []
    z = model.get_latent_representation()
    adatas = list(getattr(model, "adatas", None) or [model.adata])
    latents = list(z) if isinstance(z, list) else [np.asarray(z)]
    return latents, [a.obs.copy() for a in adatas]


def write_report(
    folder: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    **options: Any,
) -> Path:
    """Write :func:`build_report`'s page to ``out`` (default ``folder/report.html``).

    The page is written under a temporary name and renamed into place. An existing file is
    replaced only with ``overwrite``. ``options``: those of :func:`build_report`.

    Returns
    -------
    pathlib.Path
        The page's path.
    """
    path = Path(out) if out is not None else Path(folder) / REPORT_FILE
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    page = build_report(folder, **options)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path

