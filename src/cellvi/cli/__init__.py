"""The ``cellvi`` command line: train every model, query it, map onto it, tune it, report it.

``cellvi train``, ``demo``, ``embed``, ``normalize``, ``de``, ``predict``, ``map``, ``tune``,
``report`` and ``--version``. Every bad argument or file gets one line on stderr and exit
status 2 (an internal error one line and status 1), never a traceback; the output folder is
checked before any work (not a file, not the input, writable, ``--overwrite`` for existing
outputs); outputs are written under temporary names and renamed into place; under
``--nproc`` only process 0 writes.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from ._common import (
    MODEL_CLASSES,
    CLIError,
    check_output,
    fraction,
    key_value,
    nonnegative_float,
    open_fraction,
    positive_float,
    positive_int,
)
from ._train import DEMO_DIR

__all__ = ["CLIError", "build_parser", "check_output", "main"]


def _version() -> str:
    import cellvi

    return f"cellvi {cellvi.__version__}"


# ----------------------------------------------------------------------------- flag groups
def _data_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data set-up (each model takes its own)")
    g.add_argument("--batch-key", default=None, help="obs column with the batch")
    g.add_argument("--labels-key", default=None,
                   help="obs column with cell labels (scanvi: required)")
    g.add_argument("--unlabeled-category", default=None,
                   help="scanvi: the label of unlabelled cells (default 'Unknown')")
    g.add_argument("--layer", default=None, help="layer holding raw counts (default X)")
    g.add_argument("--size-factor-key", default=None, help="obs column of size factors")
    g.add_argument("--categorical-covariate-keys", nargs="+", default=None, metavar="KEY",
                   help="obs columns of extra categorical covariates")
    g.add_argument("--continuous-covariate-keys", nargs="+", default=None, metavar="KEY",
                   help="obs columns of continuous covariates")
    g.add_argument("--protein-key", default=None,
                   help="totalvi: obsm key of the protein counts (default protein_expression)")
    g.add_argument("--protein-names-key", default=None,
                   help="totalvi: uns key of the protein names")
    g.add_argument("--spatial", default=None, metavar="SPATIAL",
                   help="gimvi: the spatial dataset (the input is the sequencing one)")
    g.add_argument("--spatial-batch-key", default=None, help="gimvi: batch column of SPATIAL")
    g.add_argument("--spatial-labels-key", default=None, help="gimvi: labels of SPATIAL")
    g.add_argument("--spatial-layer", default=None, help="gimvi: counts layer of SPATIAL")
    g.add_argument("--transpose", action="store_true", help="text input is genes x cells")


def _filter_flags(p: argparse.ArgumentParser, *, genes: bool = True) -> None:
    g = p.add_argument_group("filters before training")
    g.add_argument("--min-counts", type=nonnegative_float, default=0.0,
                   help="drop cells with fewer counts (e.g. 1: empty cells), before and "
                        "after the gene selection (default 0: keep every cell)")
    if genes:
        g.add_argument("--n-top-genes", type=positive_int(1), default=None,
                       help="keep the N most variable genes (cellvi.data."
                            "highly_variable_genes, within --batch-key's batches)")


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model options (default: the model's)")
    g.add_argument("--n-latent", type=positive_int(1), default=None)
    g.add_argument("--n-hidden", type=positive_int(1), default=None)
    g.add_argument("--n-layers", type=positive_int(1), default=None)
    g.add_argument("--dropout-rate", type=_rate, default=None)
    g.add_argument("--dispersion", default=None,
                   choices=["gene", "gene-batch", "gene-label", "gene-cell"])
    g.add_argument("--gene-likelihood", choices=["zinb", "nb", "poisson"], default=None)
    g.add_argument("--latent-distribution", choices=["normal", "ln"], default=None)
    g.add_argument("--zero-inflation", default=None,
                   choices=["gene", "gene-batch", "gene-label", "gene-cell"],
                   help="autozi: what one mixture weight covers")
    g.add_argument("--model-option", action="append", type=key_value, default=None,
                   metavar="KEY=VALUE",
                   help="any other option of the model (JSON value), e.g. "
                        "use_layer_norm=both; repeatable")


def _rate(text: str) -> float:
    value = nonnegative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _training_flags(p: argparse.ArgumentParser, *, early_stopping: bool | None,
                    nproc: bool = True) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=positive_int(1), default=None,
                   help="training epochs (default: the model's rule, e.g. "
                        "min(round(20000/n_cells*400), 400))")
    g.add_argument("--lr", type=positive_float, default=None, help="learning rate")
    g.add_argument("--batch-size", type=positive_int(2), default=None)
    g.add_argument("--train-size", type=fraction, default=None,
                   help="share of cells for training (default 0.9); the rest validate")
    g.add_argument("--seed", type=positive_int(0), default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--data-placement", choices=["auto", "device", "host"], default="auto",
                   help="gather minibatches on the device from a copy of the data made once "
                        "(device), or on the host (host); auto: device on a GPU when it fits")
    default = {True: "on", False: "off", None: "the model's"}[early_stopping]
    g.add_argument("--early-stopping", action=argparse.BooleanOptionalAction,
                   default=early_stopping,
                   help="stop when the validation ELBO has not improved for "
                        f"--early-stopping-patience epochs and keep the best epoch's model "
                        f"(default: {default})")
    g.add_argument("--early-stopping-patience", type=positive_int(1), default=None,
                   help="default 45")
    g.add_argument("--kappa", type=nonnegative_float, default=None,
                   help="gimvi: weight of the adversarial term (default 5)")
    g.add_argument("--scvi-epochs", type=positive_int(1), default=None,
                   help="scanvi: pre-train SCVI this many epochs, then start SCANVI from it")
    g.add_argument("--train-option", action="append", type=key_value, default=None,
                   metavar="KEY=VALUE",
                   help="any other option of train() or the training plan (JSON value), "
                        "e.g. reduce_lr_on_plateau=true; repeatable")
    if nproc:
        g.add_argument("--nproc", type=positive_int(1), default=1,
                       help="train with N processes (torch.distributed: gloo on the CPU, "
                            "nccl on GPUs), launched here with torchrun on 127.0.0.1")
    _output_flags(p)


def _output_flags(p: argparse.ArgumentParser, *, normalized: bool = True) -> None:
    g = p.add_argument_group("output")
    if normalized:
        g.add_argument("--normalized", action=argparse.BooleanOptionalAction, default=True,
                       help="also write the normalised expression (a dense cells x genes "
                            "layer; --no-normalized for large data)")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _query_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="a run folder (cellvi train --out) or a saved "
                                              "model folder")
    p.add_argument("data", metavar="DATA", nargs="?", default=None,
                   help="AnnData to query, with the model's genes (default: the model's own)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--spatial", default=None, help="gimvi: the spatial dataset (with DATA)")
    p.add_argument("--transpose", action="store_true", help="text input is genes x cells")
    p.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")
    p.add_argument("--seed", type=positive_int(0), default=0)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (argparse's own print the usage first)."""

    def error(self, message: str):
        """Print ``<prog>: error: <message>`` and a pointer to ``--help``; exit with 2."""
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``cellvi`` command."""
    parser = _Parser(
        prog="cellvi", description="Deep generative models of single-cell counts (scVI "
                                   "family): train, query, map, tune and report.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train a model on a count matrix and write its outputs")
    train.add_argument("input", help=".h5ad, 10x folder or .h5, .loom, .csv/.tsv")
    train.add_argument("--out", required=True, help="output folder")
    train.add_argument("--model", choices=list(MODEL_CLASSES), default="scvi",
                       help="scvi (default), scanvi, linear (LDVAE), totalvi, autozi, gimvi")
    _data_flags(train)
    _filter_flags(train)
    _model_flags(train)
    _training_flags(train, early_stopping=None)

    demo = sub.add_parser("demo", help="train scVI on the packaged Kang IFN-beta PBMC data")
    demo.add_argument("--out", default=DEMO_DIR, help=f"output folder (default {DEMO_DIR})")
    _model_flags(demo)
    _training_flags(demo, early_stopping=True)

    embed = sub.add_parser("embed", help="the latent representation into obsm")
    _query_flags(embed)
    embed.add_argument("--key", default=None, help="obsm key (default X_<model>)")
    _output_flags(embed, normalized=False)

    norm = sub.add_parser("normalize", help="denoised normalised expression into a layer")
    _query_flags(norm)
    norm.add_argument("--key", default=None, help="layer (default <model>_normalized)")
    norm.add_argument("--library-size", default="1",
                      help="scale of each cell's expression: a number (1: proportions, 1e4: "
                           "counts per 10k) or 'latent' (the cell's own)")
    norm.add_argument("--n-samples", type=positive_int(1), default=1,
                      help="posterior samples averaged")
    norm.add_argument("--transform-batch", nargs="+", default=None, metavar="BATCH",
                      help="decode every cell as these batches (averaged)")
    _output_flags(norm, normalized=False)

    de = sub.add_parser("de", help="differential expression between groups: a CSV table")
    _query_flags(de)
    de.add_argument("--groupby", required=True, help="obs column of the groups")
    de.add_argument("--group1", nargs="+", default=None,
                    help="group(s) compared in turn (default: every group)")
    de.add_argument("--group2", default=None, help="reference group (default: the rest)")
    de.add_argument("--mode", choices=["vanilla", "change"], default=None)
    de.add_argument("--delta", type=positive_float, default=None,
                    help="smallest log2 fold change that counts (change mode)")
    de.add_argument("--fdr", type=open_fraction, default=None,
                    help="target false discovery rate (default 0.05)")
    de.add_argument("--effect", choices=["group", "cell"], default=None,
                    help="group: LFC of the groups' mean expression (cellvi's default); cell: "
                         "scvi-tools' random-cell comparison")
    de.add_argument("--batch-correction", action="store_true")
    de.add_argument("--n-samples", type=positive_int(1), default=None,
                    help="posterior draws per group (default 5000)")
    de.add_argument("--table", default="de.csv",
                    help="file name under --out (default de.csv; `cellvi report` shows "
                         "de*.csv tables)")
    _output_flags(de, normalized=False)

    predict = sub.add_parser("predict", help="SCANVI's predicted labels into obs")
    _query_flags(predict)
    predict.add_argument("--key", default=None, help="obs column (default scanvi_prediction)")
    predict.add_argument("--soft", action="store_true",
                         help="also every class's probability in obsm[<key>_probabilities]")
    _output_flags(predict, normalized=False)

    mapping = sub.add_parser("map", help="map a query onto a trained reference (scArches), "
                                         "then train")
    mapping.add_argument("reference", metavar="REFERENCE",
                         help="run folder or saved model of the reference")
    mapping.add_argument("query", metavar="QUERY", help="the query's counts")
    mapping.add_argument("--out", required=True, help="output folder")
    mapping.add_argument("--transpose", action="store_true")
    mapping.add_argument("--unfrozen", action="store_true",
                         help="train every parameter (fine-tuning) instead of the new rows")
    for flag in ("dropout", "expression", "decoder-first-layer", "batchnorm-encoder",
                 "batchnorm-decoder", "classifier"):
        mapping.add_argument(f"--freeze-{flag}", action=argparse.BooleanOptionalAction,
                             default=None, help=argparse.SUPPRESS)
    _filter_flags(mapping, genes=False)
    _training_flags(mapping, early_stopping=None, nproc=False)

    tune = sub.add_parser("tune", help="search a model's options with Optuna (cellvi.tune)")
    tune.add_argument("input", help=".h5ad, 10x folder or .h5, .loom, .csv/.tsv")
    tune.add_argument("--out", required=True, help="output folder (study.db, best_model/)")
    tune.add_argument("--model", choices=list(MODEL_CLASSES), default="scvi")
    _data_flags(tune)
    _filter_flags(tune)
    _model_flags(tune)
    _training_flags(tune, early_stopping=None, nproc=False)
    from ._train import add_tune_arguments

    add_tune_arguments(tune)

    report = sub.add_parser("report", help="one self-contained HTML page of a trained model")
    report.add_argument("run", metavar="RUN_DIR",
                        help="a run folder (cellvi train --out) or a saved model folder")
    report.add_argument("--out", default=None,
                        help="folder of report.html (default: RUN_DIR)")
    report.add_argument("--color", nargs="+", default=[], metavar="KEY",
                        help="more obs columns to colour the latent by")
    report.add_argument("--embedding", choices=["auto", "umap", "pca", "tsne"], default="auto",
                        help="2-d picture of the latent (auto: UMAP with umap-learn, else PCA)")
    report.add_argument("--max-cells", type=positive_int(20), default=5000,
                        help="cells drawn and scored (a seeded subset)")
    report.add_argument("--seed", type=positive_int(0), default=0)
    report.add_argument("--title", default=None)
    report.add_argument("--overwrite", action="store_true", help="replace report.html")
    report.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


# ----------------------------------------------------------------------------- running
def _launch(argv: list[str], nproc: int) -> int:
    """Run this command again under torchrun with ``nproc`` processes on this machine."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rest, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--nproc":
            skip = True
            continue
        if item.startswith("--nproc="):
            continue
        rest.append(item)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "cellvi.cli", *rest]
    return subprocess.run(cmd, check=False).returncode


def _report(args) -> int:
    import time

    out = Path(args.out) if args.out is not None else Path(args.run)
    run = Path(args.run)
    if not run.exists():
        raise CLIError(f"RUN_DIR {run} does not exist.")
    check_output(out, overwrite=args.overwrite, inputs=[run], targets=["report.html"])
    import matplotlib

    matplotlib.use("Agg")
    from cellvi.report import write_report

    t0 = time.perf_counter()
    path = write_report(run, out / "report.html", overwrite=args.overwrite, color=args.color,
                        embedding=args.embedding, max_cells=args.max_cells, seed=args.seed,
                        progress_bar=not args.quiet, title=args.title)
    size = path.stat().st_size
    print(f"cellvi report: wrote {path} ({size / 1e6:.2f} MB, self-contained; "
          f"{time.perf_counter() - t0:.1f} s)")
    return 0


def _dispatch(args) -> int:
    from . import _query, _train

    commands = {
        "train": _train.cmd_train, "demo": _train.cmd_demo, "map": _train.cmd_map,
        "tune": _train.cmd_tune, "embed": _query.cmd_embed, "normalize": _query.cmd_normalize,
        "de": _query.cmd_de, "predict": _query.cmd_predict, "report": _report,
    }
    try:
        return commands[args.command](args)
    except ValueError as err:
        raise _query.hint(err) from None


def _check_before_launch(args) -> None:
    from . import _train

    if args.command == "demo":
        args.model = "scvi"
        check_output(Path(args.out), overwrite=args.overwrite, inputs=[],
                     targets=_train.train_targets(args))
    else:
        _train.check_train(args)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    text = " ".join(str(message).split())
    return f"warning: {text}\n"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 1 internal error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = list(argv)
    previous = warnings.formatwarning
    warnings.formatwarning = _one_line_warning
    try:
        if getattr(args, "nproc", 1) > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            _check_before_launch(args)
            return _launch(argv, args.nproc)
        return _dispatch(args)
    except (CLIError, ValueError, KeyError, TypeError, OSError, FloatingPointError,
            MemoryError, ImportError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        text = " ".join(str(message).split())
        print(f"error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line, never a traceback
        text = " ".join(str(err).split())
        print(f"internal error: {type(err).__name__}: {text} (please report it, with the "
              "command)", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = previous
