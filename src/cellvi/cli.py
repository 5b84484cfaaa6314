"""The ``cellvi`` command line: ``cellvi train`` and ``cellvi demo``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

DEMO_DIR = "cellvi-demo"


def _train_and_write(adata, args, out: Path, *, label: str) -> None:
    """Train SCVI on ``adata`` and write the model and an annotated .h5ad into ``out``."""
    from cellvi.model import SCVI

    t0 = time.perf_counter()
    SCVI.setup_anndata(adata, layer=args.layer, batch_key=args.batch_key,
                       labels_key=getattr(args, "labels_key", None))
    model = SCVI(adata, n_latent=args.n_latent, n_hidden=args.n_hidden, n_layers=args.n_layers,
                 gene_likelihood=args.gene_likelihood)
    model.train(max_epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                device=args.device, progress_bar=not args.quiet,
                data_placement=args.data_placement, early_stopping=args.early_stopping,
                early_stopping_patience=args.early_stopping_patience)
    out.parent.mkdir(parents=True, exist_ok=True)
    # the model folder carries the counts it was trained on, so that SCVI.load(folder) works
    model.save(out / "model", overwrite=args.overwrite, save_anndata=True)  # process 0 only
    adata.obsm["X_scvi"] = model.get_latent_representation()
    adata.layers["scvi_normalized"] = model.get_normalized_expression(return_numpy=True)
    elapsed = time.perf_counter() - t0
    h5ad = out / "adata.h5ad"
    if _rank() != 0:  # data-parallel training: process 0 writes and reports
        return
    tmp = out / f".adata.h5ad.tmp-{os.getpid()}"
    try:
        adata.write_h5ad(tmp)
        tmp.replace(h5ad)
    finally:
        tmp.unlink(missing_ok=True)
    history = model.history
    column = "elbo_validation" if "elbo_validation" in history else "elbo_train"
    lines = [f"{label}: trained SCVI on {adata.n_obs:,} cells x {adata.n_vars:,} genes"
             + (f", {model.summary.n_batch} batches from obs[{args.batch_key!r}]"
                if args.batch_key else "")]
    if args.early_stopping:
        best = int(history[column].idxmax())
        stopped = len(history) < _epochs_asked(args, adata)
        lines.append(
            f"  epochs: {len(history)}"
            + (f" (stopped early: no better validation ELBO for {args.early_stopping_patience}"
               " epochs)" if stopped else "")
            + f"; kept the best, epoch {best}: validation ELBO {history[column].max():.2f} per cell"
        )
    else:
        lines.append(f"  epochs: {len(history)}; final validation ELBO "
                     f"{history[column].iloc[-1]:.2f} per cell")
    model_dir = out / "model"
    lines.append(f"  time: {elapsed:.1f} s on {model.device}")
    lines.append(f"  wrote {model_dir}/ (load it with cellvi.model.SCVI.load({str(model_dir)!r}))"
                 f" and {h5ad} (obsm['X_scvi'], layers['scvi_normalized'])")
    print("\n".join(lines))


def _epochs_asked(args, adata) -> int:
    """Epochs asked for: ``--epochs`` or the default rule of :meth:`cellvi.model.SCVI.train`."""
    if args.epochs is not None:
        return args.epochs
    return int(min(round(20000 / adata.n_obs * 400), 400))


def _add_training_options(
    p: argparse.ArgumentParser, epochs_default, *, early_stopping: bool
) -> None:
    p.add_argument("--epochs", type=_positive_int(1), default=epochs_default,
                   help="training epochs (default: min(round(20000/n_cells*400), 400))")
    p.add_argument("--n-latent", type=_positive_int(1), default=10)
    p.add_argument("--n-hidden", type=_positive_int(1), default=128)
    p.add_argument("--n-layers", type=_positive_int(1), default=1)
    p.add_argument("--gene-likelihood", choices=["zinb", "nb", "poisson"], default="zinb")
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--batch-size", type=_positive_int(2), default=128)
    p.add_argument("--seed", type=_positive_int(0), default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--data-placement", choices=["auto", "device", "host"], default="auto",
                   help="gather minibatches on the device from a copy of the data made once "
                        "(device), or on the host (host); auto: device on a GPU when it fits")
    p.add_argument("--early-stopping", action=argparse.BooleanOptionalAction,
                   default=early_stopping,
                   help="stop when the validation ELBO has not improved for "
                        "--early-stopping-patience epochs and keep the best epoch's model "
                        f"(default: {'on' if early_stopping else 'off'})")
    p.add_argument("--early-stopping-patience", type=_positive_int(1), default=45)
    p.add_argument("--nproc", type=_positive_int(1), default=1,
                   help="train with N processes (torch.distributed: gloo on the CPU, nccl on "
                        "GPUs), launched here with torchrun on 127.0.0.1")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of the ``cellvi`` command."""
    parser = argparse.ArgumentParser(
        prog="cellvi", description="Deep generative models of single-cell counts (scVI family)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train SCVI on a count matrix and write its outputs")
    train.add_argument("input", help=".h5ad, 10x folder or .h5, .loom, .csv/.tsv")
    train.add_argument("--out", required=True, help="output folder")
    train.add_argument("--batch-key", default=None, help="obs column with the batch")
    train.add_argument("--labels-key", default=None, help="obs column with labels")
    train.add_argument("--layer", default=None, help="layer holding raw counts (default X)")
    train.add_argument("--transpose", action="store_true", help="text input is genes x cells")
    _add_training_options(train, None, early_stopping=False)

    demo = sub.add_parser("demo", help="train on the packaged Kang IFN-beta PBMC data")
    demo.add_argument("--out", default=DEMO_DIR, help=f"output folder (default {DEMO_DIR})")
    _add_training_options(demo, None, early_stopping=True)
    return parser


class CLIError(Exception):
    """A problem with the command's arguments or files: printed as one line, exit status 2."""


def _positive_int(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def check_output(out: Path, *, overwrite: bool, inputs: list[Path]) -> None:
    """Check, before any training, that ``out`` can receive ``model/`` and ``adata.h5ad``.

    Refuses a file of that name, outputs that exist (without ``overwrite``), an output that
    is one of the inputs (even with ``overwrite``), and a folder it cannot write to.
    """
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a folder (cellvi writes model/ and "
                       "adata.h5ad into it).")
    targets = [out / "model", out / "adata.h5ad"]
    for target in targets:
        for source in inputs:
            if source.exists() and target.exists() and source.resolve() == target.resolve():
                raise CLIError(f"{target} is the input: cellvi never writes over its input; "
                               "choose another --out.")
    if not overwrite:
        existing = [str(t) for t in targets if t.exists()]
        if existing:
            raise CLIError(f"{existing[0]} exists; pass --overwrite to replace it.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".cellvi-write-test-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as err:
        raise CLIError(f"cannot write to --out {out}: {err.strerror or err}.") from None


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


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 bad input, 1 internal error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if getattr(args, "nproc", 1) > 1 and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        try:
            check_output(Path(args.out), overwrite=args.overwrite,
                         inputs=[] if args.command == "demo" else [Path(args.input)])
        except CLIError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return _launch(argv, args.nproc)
    out = Path(args.out)
    try:
        inputs = [] if args.command == "demo" else [Path(args.input)]
        if inputs and not inputs[0].exists():
            raise CLIError(f"input {inputs[0]} does not exist.")
        check_output(out, overwrite=args.overwrite, inputs=inputs)
        import cellvi

        if args.command == "demo":
            adata = cellvi.data.pbmc_ifnb()
            args.batch_key, args.layer = "batch", None
            _train_and_write(adata, args, out,
                             label="cellvi demo (Kang et al. 2018 IFN-beta PBMCs)")
        else:
            adata = cellvi.data.read(args.input, transpose=args.transpose)
            _train_and_write(adata, args, out, label=f"cellvi train {args.input}")
    except (CLIError, ValueError, KeyError, TypeError, OSError, FloatingPointError,
            MemoryError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line, never a traceback
        print(f"internal error: {type(err).__name__}: {err} (please report it, with the "
              "command)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
