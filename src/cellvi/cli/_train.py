"""The commands that train: ``train``, ``demo``, ``map`` (reference mapping) and ``tune``."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from . import _models as m
from ._common import (
    MODEL_CLASSES,
    MODEL_DIR,
    RUN_FILE,
    CLIError,
    check_output,
    cli_name,
    describe_filters,
    existing,
    filter_data,
    find_model_dir,
    model_class,
    options_dict,
    rank,
    read_data,
    saved_state,
    write_csv,
    write_json,
)

DEMO_DIR = "cellvi-demo"


def _inputs(args) -> list[Path]:
    paths = [existing(args.input)]
    if getattr(args, "spatial", None) is not None:
        paths.append(existing(args.spatial, "--spatial"))
    return paths


def train_targets(args) -> list[str]:
    """Return the names ``train`` / ``demo`` write under ``--out``."""
    return [*m.output_names(args.model), RUN_FILE]


def check_train(args) -> list[Path]:
    """Check a ``train`` command's flags, inputs and outputs before any work."""
    m.check_flags(args.model, args)
    if args.nproc > 1 and args.model == "gimvi":
        raise CLIError("--nproc > 1 is not available for --model gimvi (one process).")
    inputs = _inputs(args)
    check_output(Path(args.out), overwrite=args.overwrite, inputs=inputs,
                 targets=train_targets(args))
    return inputs


def read_filtered(args, inputs: list[Path]) -> tuple[list, dict[str, Any]]:
    """Read the input(s) and apply ``--min-counts`` / ``--n-top-genes``."""
    adata = read_data(inputs[0], transpose=args.transpose)
    adatas, filters = [adata], {}
    spatial = None
    if len(inputs) > 1:
        spatial = read_data(inputs[1], transpose=args.transpose)
    keep = list(spatial.var_names) if spatial is not None else []
    adata, filters["input"] = filter_data(adata, min_counts=args.min_counts,
                                          n_top_genes=args.n_top_genes,
                                          batch_key=args.batch_key, layer=args.layer,
                                          keep_genes=keep)
    adatas = [adata]
    if spatial is not None:
        spatial, filters["spatial"] = filter_data(spatial, min_counts=args.min_counts,
                                                  n_top_genes=None,
                                                  batch_key=args.spatial_batch_key,
                                                  layer=args.spatial_layer, what="spatial input")
        adatas.append(spatial)
    return adatas, filters


def cmd_train(args, *, label: str | None = None, adatas=None) -> int:
    """``cellvi train`` (and ``demo``): fit a model, write it and the annotated data."""
    name = args.model
    out = Path(args.out)
    t0 = time.perf_counter()
    if adatas is None:
        inputs = check_train(args)
        adatas, filters = read_filtered(args, inputs)
    else:
        inputs, filters = [], {}
    model_opts = m.model_options(name, args, options_dict(args.model_option, "--model-option"))
    train_kw = m.train_kwargs(name, args, options_dict(args.train_option, "--train-option"))
    try:
        m.setup(name, adatas, args)
        model = m.build(name, adatas, model_opts, args, train_kw)
    except ValueError as err:
        raise _hint(err) from None
    epochs = args.epochs if args.epochs is not None else m.default_epochs(model)
    model.train(max_epochs=epochs, **train_kw)
    written = _write_run(name, model, adatas, out, args, quiet=args.quiet)
    elapsed = time.perf_counter() - t0
    if rank() != 0:  # data-parallel training: process 0 writes and reports
        return 0
    record = _run_record(args, "train" if label is None else "demo", name, model, inputs,
                         filters, written, elapsed, epochs)
    write_json(out / RUN_FILE, record)
    label = label or f"cellvi train {args.input}"
    print(_summary(label, name, model, adatas, args, filters, epochs, elapsed, written, out))
    return 0


def _hint(err: ValueError) -> Exception:
    """Point a model's error at the flag that fixes it, when there is one."""
    text = str(err)
    if "have no counts" in text:
        return CLIError(f"{text.split('; ')[0]}; pass --min-counts 1 to drop them.")
    return err


def _write_run(name: str, model, adatas: list, out: Path, args, *, quiet: bool,
               adata_given: bool = False) -> dict[str, Any]:
    """Save the model (with its counts), annotate and write the data, history and tables."""
    # the model folder carries the counts it was trained on, so that Model.load(folder) works
    model.save(out / MODEL_DIR, overwrite=args.overwrite, save_anndata=True)  # process 0 only
    written = m.annotate(name, model, adatas, quiet=quiet, adata_given=adata_given,
                         normalized=getattr(args, "normalized", True))
    written["tables"] = m.write_tables(name, model, adatas, out)
    history = model.history.copy()
    write_csv(out / "history.csv", history)
    written["data"] = m.write_data(name, adatas, out)
    return written


def _run_record(args, command: str, name: str, model, inputs, filters, written, elapsed,
                epochs) -> dict[str, Any]:
    import cellvi

    setup = {dest: getattr(args, dest, None) for dest in m.SETUP_FLAGS
             if getattr(args, dest, None) is not None}
    return {
        "format": "cellvi-run", "format_version": 1, "cellvi_version": cellvi.__version__,
        "command": command, "argv": list(sys.argv[1:]) if args.argv is None else args.argv,
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "model": name, "model_class": type(model).__name__,
        "inputs": [str(p) for p in inputs], "filters": filters, "setup": setup,
        "model_options": dict(getattr(model, "init_kwargs", {})), "max_epochs": epochs,
        "outputs": {"model": MODEL_DIR, **written}, "seconds": round(elapsed, 2),
        "device": str(getattr(model, "device", "")),
    }


def _summary(label, name, model, adatas, args, filters, epochs, elapsed, written, out) -> str:
    cls = type(model).__name__
    if name == "gimvi":
        first = (f"{label}: trained {cls} on {adatas[0].n_obs:,} sequenced cells x "
                 f"{adatas[0].n_vars:,} genes and {adatas[1].n_obs:,} spatial cells x "
                 f"{adatas[1].n_vars:,} genes")
    else:
        s = model.summary
        first = (f"{label}: trained {cls} on {adatas[0].n_obs:,} cells x {s.n_vars:,} genes"
                 + (f" and {model.n_proteins:,} proteins" if name == "totalvi" else "")
                 + (f", {s.n_batch} batches from obs[{s.batch_key!r}]" if s.batch_key else ""))
    lines = [first]
    for key, record in filters.items():
        text = describe_filters(record)
        if text:
            lines.append(f"  filters ({key}): {text}")
    history = model.history
    column = "elbo_validation" if "elbo_validation" in history else "elbo_train"
    kept = model.train_settings.get("kept_epoch")
    if column in history and len(history):
        if kept is not None and kept in history.index:
            stopped = len(history) < epochs
            patience = args.early_stopping_patience or 45
            lines.append(
                f"  epochs: {len(history)}"
                + (f" (stopped early: no better validation ELBO for {patience} epochs)"
                   if stopped else "")
                + f"; kept the best, epoch {kept}: validation ELBO "
                  f"{history[column].loc[kept]:.2f} per cell")
        else:
            which = "validation" if column == "elbo_validation" else "training"
            lines.append(f"  epochs: {len(history)}; final {which} ELBO "
                         f"{history[column].dropna().iloc[-1]:.2f} per cell")
    else:
        lines.append(f"  epochs: {len(history)}")
    lines.append(f"  time: {elapsed:.1f} s on {model.device}")
    model_dir = out / MODEL_DIR
    data = " and ".join(str(out / d) for d in written["data"])
    what = [f"obsm[{written['latent_key']!r}]"]
    if written.get("normalized_layer"):
        what.append(f"layers[{written['normalized_layer']!r}]")
    if written.get("prediction_key"):
        what.append(f"obs[{written['prediction_key']!r}]")
    if written.get("imputed_key"):
        what.append(f"obsm[{written['imputed_key']!r}]")
    tables = "".join(f", {out / t}" for t in written.get("tables", []))
    lines.append(f"  wrote {model_dir}/ (load it with cellvi.model.{cls}.load("
                 f"{str(model_dir)!r})), {data} ({', '.join(what)}), {out / 'history.csv'}"
                 f"{tables}; `cellvi report {out}` makes its report")
    return "\n".join(lines)


def cmd_demo(args) -> int:
    """``cellvi demo``: SCVI on the packaged Kang et al. PBMCs."""
    import cellvi

    args.model, args.batch_key = "scvi", "batch"
    for dest in m.SETUP_FLAGS:
        if not hasattr(args, dest):
            setattr(args, dest, None)
    args.batch_key = "batch"
    args.input = None
    check_output(Path(args.out), overwrite=args.overwrite, inputs=[],
                 targets=train_targets(args))
    adata = cellvi.data.pbmc_ifnb()
    return cmd_train(args, label="cellvi demo (Kang et al. 2018 IFN-beta PBMCs)",
                     adatas=[adata])


# ----------------------------------------------------------------------------- map
def check_map(args) -> tuple[Path, Path, type]:
    """Check a ``map`` command before any work; return the reference folder, query, class."""
    reference = existing(args.reference, "reference")
    model_dir = find_model_dir(reference)
    state = saved_state(model_dir)
    cls = model_class(state["model_class"])
    if not hasattr(cls, "load_query_data") or cls.__name__ == "GIMVI":
        raise CLIError(f"reference mapping is not available for {cls.__name__} models.")
    query = existing(args.query, "query")
    name = cli_name(cls.__name__)
    targets = [MODEL_DIR, "adata.h5ad", "history.csv", RUN_FILE]
    if name == "scanvi":
        targets.append("predictions.csv")
    check_output(Path(args.out), overwrite=args.overwrite, inputs=[query, model_dir],
                 targets=targets)
    return model_dir, query, cls


def cmd_map(args) -> int:
    """``cellvi map REFERENCE QUERY``: scArches surgery onto a trained reference, then train."""
    model_dir, query_path, cls = check_map(args)
    name = cli_name(cls.__name__)
    out = Path(args.out)
    t0 = time.perf_counter()
    query = read_data(query_path, transpose=args.transpose)
    query, record = filter_data(query, min_counts=args.min_counts, n_top_genes=None,
                                batch_key=None, layer=None, what="query")
    cls.prepare_query_anndata(query, str(model_dir))
    freeze = {k: getattr(args, k) for k in ("freeze_dropout", "freeze_expression",
                                           "freeze_decoder_first_layer",
                                           "freeze_batchnorm_encoder",
                                           "freeze_batchnorm_decoder", "freeze_classifier")
              if getattr(args, k) is not None}
    model = cls.load_query_data(query, str(model_dir), unfrozen=args.unfrozen,
                                device=args.device, **freeze)
    train_kw = m.train_kwargs(name, args, options_dict(args.train_option, "--train-option"))
    epochs = args.epochs if args.epochs is not None else m.default_epochs(model)
    model.train(max_epochs=epochs, **train_kw)
    model.save(out / MODEL_DIR, overwrite=args.overwrite, save_anndata=True)
    written = m.annotate(name, model, [query], quiet=args.quiet, normalized=args.normalized)
    written["tables"] = []
    if name == "scanvi":
        write_csv(out / "predictions.csv", m.predictions_table(query))
        written["tables"] = ["predictions.csv"]
    write_csv(out / "history.csv", model.history)
    written["data"] = m.write_data(name, [query], out)
    elapsed = time.perf_counter() - t0
    args.model = name
    rec = _run_record(args, "map", name, model, [query_path], {"query": record}, written,
                      elapsed, epochs)
    rec["reference"] = str(model_dir)
    rec["reference_mapping"] = model.train_settings.get("reference_mapping")
    write_json(out / RUN_FILE, rec)
    new = (model.train_settings.get("reference_mapping") or {}).get("new_batches") or []
    print(_summary(f"cellvi map {args.query} onto {model_dir}", name, model, [query], args,
                   {"query": record}, epochs, elapsed, written, out)
          + (f"\n  new batches: {new}" if new else ""))
    return 0


# ----------------------------------------------------------------------------- tune
TUNE_FILES = ["study.db", "best_model", "trials.csv", RUN_FILE]


def check_tune(args) -> list[Path]:
    """Check a ``tune`` command before any work."""
    m.check_flags(args.model, args)
    inputs = _inputs(args)
    out = Path(args.out)
    if args.resume and args.overwrite:
        raise CLIError("--resume continues the study in --out; --overwrite starts it again: "
                       "give one.")
    check_output(out, overwrite=args.overwrite or args.resume, inputs=inputs,
                 targets=TUNE_FILES)
    if args.resume and args.storage is None and not (out / "study.db").exists():
        raise CLIError(f"--resume: there is no study to continue in {out} (no study.db).")
    return inputs


def parse_space(text: str | None) -> dict[str, Any] | None:
    """Read ``--search-space`` (JSON text or @file): lists are choices, ranges are objects.

    ``{"n_latent": [5, 10, 20], "lr": {"loguniform": [1e-4, 1e-2]}, "n_hidden": {"integer":
    [32, 256]}, "dropout_rate": {"uniform": [0.0, 0.3]}}``; a plain value is fixed.
    """
    import json

    from cellvi import tune

    if text is None:
        return None
    if text.startswith("@"):
        path = existing(text[1:], "--search-space file")
        text = path.read_text()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise CLIError(f"--search-space is not JSON: {err}.") from None
    if not isinstance(raw, dict) or not raw:
        raise CLIError("--search-space must be a JSON object of option names.")
    kinds = {"choice": tune.choice, "uniform": tune.uniform, "loguniform": tune.loguniform,
             "integer": tune.integer}
    space: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            if len(value) != 1 or next(iter(value)) not in kinds:
                raise CLIError(f"--search-space {key}: give one of {sorted(kinds)} "
                               f"(e.g. {{\"loguniform\": [1e-4, 1e-2]}}), got {value}.")
            kind, params = next(iter(value.items()))
            params = params if isinstance(params, list) else [params]
            space[key] = kinds[kind](params) if kind == "choice" else kinds[kind](*params)
        else:
            space[key] = value
    return space


def cmd_tune(args) -> int:
    """``cellvi tune``: an Optuna study over the model's options (cellvi.tune)."""
    from cellvi.tune import run_study

    inputs = check_tune(args)
    out = Path(args.out)
    name = args.model
    space = parse_space(args.search_space)
    t0 = time.perf_counter()
    adatas, filters = read_filtered(args, inputs)
    model_opts = m.model_options(name, args, options_dict(args.model_option, "--model-option"))
    train_kw = m.train_kwargs(name, args, options_dict(args.train_option, "--train-option"))
    for k in ("seed", "progress_bar"):
        train_kw.pop(k, None)
    m.setup(name, adatas, args)
    if args.overwrite:
        for target in ("study.db", "best_model"):
            path = out / target
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    result = run_study(
        model_class(MODEL_CLASSES[name]), tuple(adatas) if len(adatas) > 1 else adatas[0],
        n_trials=args.n_trials, search_space=space,
        objectives=args.objective or "elbo_validation",
        max_epochs=args.epochs if args.epochs is not None else 100,
        model_kwargs=model_opts, train_kwargs=train_kw, study_name=args.study_name,
        storage=args.storage, output_dir=out, seed=args.seed, sampler=args.sampler,
        pruner=args.pruner, timeout=args.timeout, progress_bar=not args.quiet,
    )
    write_csv(out / "trials.csv", result.trials, index=False)
    record = {
        "format": "cellvi-tune", "format_version": 1, "command": "tune",
        "argv": args.argv, "model": name, "model_class": MODEL_CLASSES[name],
        "inputs": [str(p) for p in inputs], "filters": filters,
        "objectives": result.objectives, "directions": result.directions,
        "best_params": result.best_params, "best_value": result.best_value,
        "baseline_value": result.baseline_value,
        "best_model": None if result.best_model_path is None else "best_model",
        "n_trials": int(len(result.trials)), "seconds": round(time.perf_counter() - t0, 2),
    }
    write_json(out / RUN_FILE, record)
    print(repr(result))
    print(f"  wrote {out / 'trials.csv'}"
          + (f", {out / 'study.db'}" if args.storage is None else "")
          + (f" and {out / 'best_model'}/" if result.best_model_path is not None else ""))
    return 0


def add_tune_arguments(p: argparse.ArgumentParser) -> None:
    """Add the study's own flags to the ``tune`` parser."""
    from ._common import positive_float, positive_int

    g = p.add_argument_group("study")
    g.add_argument("--n-trials", type=positive_int(1), default=20,
                   help="trials the study holds in the end (default 20)")
    g.add_argument("--objective", action="append", default=None,
                   help="elbo_validation (default), a validation metric of the history, or an "
                        "integration score (ilisi, knn_purity, silhouette_label, nmi, ari...); "
                        "repeat for a multi-objective study")
    g.add_argument("--search-space", default=None,
                   help="JSON (or @file.json): {\"n_latent\": [5, 10, 20], \"lr\": "
                        "{\"loguniform\": [1e-4, 1e-2]}}; default: the model's default space")
    g.add_argument("--study-name", default=None, help="default: the model class")
    g.add_argument("--storage", default=None,
                   help="an RDB URL shared by several machines (default: --out/study.db)")
    g.add_argument("--sampler", choices=["tpe", "random"], default="tpe")
    g.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median")
    g.add_argument("--timeout", type=positive_float, default=None,
                   help="stop starting trials after this many seconds")
    g.add_argument("--resume", action="store_true",
                   help="continue the study in --out (its trials are kept)")
