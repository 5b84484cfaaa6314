"""What the commands share: argument types, output checks, atomic writes, inputs, filters."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: ``cellvi train --model`` names and the model classes they build.
MODEL_CLASSES = {
    "scvi": "SCVI",
    "scanvi": "SCANVI",
    "linear": "LinearSCVI",
    "totalvi": "TOTALVI",
    "autozi": "AUTOZI",
    "gimvi": "GIMVI",
}
CLASS_NAMES = {v: k for k, v in MODEL_CLASSES.items()}
RUN_FILE = "run.json"
MODEL_DIR = "model"
ADATA = "adata.h5ad"
#: Cells per query call (each a step of the progress bar).
CHUNK = 20_000


class CLIError(Exception):
    """A problem with the command's arguments or files: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------- argument types
def positive_int(minimum: int) -> Callable[[str], int]:
    """Return a parser of integers ``>= minimum`` for argparse."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def positive_float(text: str) -> float:
    """Parse a positive finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """Parse a finite number ``>= 0``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (value >= 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """Parse a number in ``(0, 1]``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def open_fraction(text: str) -> float:
    """Parse a number in ``(0, 1)``."""
    value = fraction(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def key_value(text: str) -> tuple[str, Any]:
    """Parse ``KEY=VALUE``; the value is read as JSON when it is JSON, else kept as text."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. use_batch_norm=none)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def options_dict(pairs: Sequence[tuple[str, Any]] | None, flag: str) -> dict[str, Any]:
    """Return the ``KEY=VALUE`` pairs of a repeated flag as a dict (a key given twice fails)."""
    out: dict[str, Any] = {}
    for key, value in pairs or ():
        if key in out:
            raise CLIError(f"{flag} {key} is given twice.")
        out[key] = value
    return out


# ----------------------------------------------------------------------------- outputs
def check_output(out: Path, *, overwrite: bool, inputs: Sequence[Path],
                 targets: Sequence[str] = (MODEL_DIR, ADATA)) -> None:
    """Check, before any work, that ``out`` can receive the ``targets`` (names under it).

    Refuses a file of that name, outputs that exist (without ``overwrite``), an output that
    is one of the inputs (even with ``overwrite``), and a folder it cannot write to.
    """
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out {out} is a file; give a folder (cellvi writes "
                       f"{', '.join(targets[:3])} into it).")
    paths = [out / t for t in targets]
    for target in paths:
        for source in inputs:
            if source.exists() and target.exists() and _same_or_inside(source, target):
                raise CLIError(f"{target} is the input: cellvi never writes over its input; "
                               "choose another --out.")
    if not overwrite:
        existing = [str(t) for t in paths if t.exists()]
        if existing:
            raise CLIError(f"{existing[0]} exists; pass --overwrite to replace it.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".cellvi-write-test-{os.getpid()}"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as err:
        raise CLIError(f"cannot write to --out {out}: {err.strerror or err}.") from None


def _same_or_inside(source: Path, target: Path) -> bool:
    """Whether writing ``target`` would replace ``source`` (the same path, or a folder of it)."""
    s, t = source.resolve(), target.resolve()
    return s == t or t in s.parents


def rank() -> int:
    """Return this process's rank under torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through ``write(tmp)`` under a temporary name, then rename it into place.

    Only process 0 writes under ``--nproc``.
    """
    if rank() != 0:
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_h5ad(path: Path, adata) -> None:
    """Write an AnnData atomically (process 0 only)."""
    write_atomic(path, lambda tmp: adata.write_h5ad(tmp))


def write_csv(path: Path, frame, **kwargs) -> None:
    """Write a DataFrame as CSV atomically (process 0 only)."""
    write_atomic(path, lambda tmp: frame.to_csv(tmp, **kwargs))


def write_json(path: Path, value: dict) -> None:
    """Write a JSON file atomically (process 0 only)."""
    text = json.dumps(value, indent=1, default=_plain)
    write_atomic(path, lambda tmp: tmp.write_text(text + "\n"))


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


# ----------------------------------------------------------------------------- inputs
def existing(path: str | os.PathLike, what: str = "input") -> Path:
    """Return ``path`` as a Path, or raise if it does not exist."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"{what} {p} does not exist.")
    return p


def read_data(path: Path, *, transpose: bool = False):
    """Read a count matrix with :func:`cellvi.data.read`."""
    import cellvi

    return cellvi.data.read(path, transpose=transpose)


def find_model_dir(path: Path) -> Path:
    """Return the saved-model folder of a run folder (``run/model``) or of a model folder."""
    if (path / MODEL_DIR / "model.json").is_file():
        return path / MODEL_DIR
    if (path / "model.json").is_file():
        return path
    raise CLIError(f"{path} is neither a cellvi run folder (with {MODEL_DIR}/model.json) nor a "
                   "saved model (with model.json).")


def saved_state(model_dir: Path) -> dict[str, Any]:
    """Return the JSON part of a saved model (never runs code from it)."""
    try:
        state = json.loads((model_dir / "model.json").read_text())
    except (OSError, ValueError) as err:
        raise CLIError(f"{model_dir / 'model.json'} is not readable: {err}.") from None
    if not isinstance(state, dict) or "model_class" not in state:
        raise CLIError(f"{model_dir / 'model.json'} is not a cellvi model file.")
    return state


def model_class(name: str):
    """Return the class of ``cellvi.model`` named ``name``."""
    import cellvi.model

    cls = getattr(cellvi.model, str(name), None)
    if not isinstance(cls, type):
        raise CLIError(f"model class {name!r} is not a cellvi model.")
    return cls


def read_run(run_dir: Path) -> dict[str, Any]:
    """Return the ``run.json`` of a run folder ({} if there is none)."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CLIError(f"{path} is not readable: {err}.") from None
    return value if isinstance(value, dict) else {}


def cli_name(class_name: str) -> str:
    """Return the ``--model`` name of a model class (``SCVI`` -> ``scvi``)."""
    return CLASS_NAMES.get(class_name, class_name.lower())


# ----------------------------------------------------------------------------- filters
def _totals(adata, layer: str | None) -> np.ndarray:
    if layer is not None and layer not in adata.layers:
        raise CLIError(f"--layer {layer!r} is not a layer of the input (layers: "
                       f"{list(adata.layers)}).")
    X = adata.layers[layer] if layer is not None else adata.X
    return np.asarray(X.sum(axis=1), dtype=np.float64).reshape(-1)


def filter_data(adata, *, min_counts: float, n_top_genes: int | None, batch_key: str | None,
                layer: str | None, keep_genes: Sequence[str] = (), what: str = "input"):
    """Drop near-empty cells and keep the most variable genes; return ``(adata, record)``.

    ``min_counts``: cells with fewer counts are dropped, before the gene selection and again
    in the genes kept. ``n_top_genes``: :func:`cellvi.data.highly_variable_genes` (within
    ``batch_key``'s batches), plus ``keep_genes`` (genes another dataset needs).
    """
    from cellvi.data import highly_variable_genes

    record: dict[str, Any] = {"cells_in": int(adata.n_obs), "genes_in": int(adata.n_vars)}
    if min_counts > 0:
        keep = _totals(adata, layer) >= min_counts
        record["min_counts"] = min_counts
        record["cells_below_min_counts"] = int((~keep).sum())
        if not keep.any():
            raise CLIError(f"no cell of the {what} has --min-counts {min_counts:g} counts.")
        if not keep.all():
            adata = adata[keep].copy()
    if n_top_genes is not None:
        record["n_top_genes"] = n_top_genes
        if n_top_genes >= adata.n_vars:
            warnings.warn(f"--n-top-genes {n_top_genes} is not fewer than the {what}'s "
                          f"{adata.n_vars} genes: every gene is kept.", UserWarning,
                          stacklevel=2)
        else:
            if batch_key is not None and batch_key not in adata.obs:
                raise CLIError(f"--batch-key {batch_key!r} is not a column of the {what}'s obs "
                               f"(columns: {list(adata.obs.columns)[:20]}).")
            mask = np.asarray(highly_variable_genes(adata, n_top_genes=n_top_genes,
                                                    batch_key=batch_key, layer=layer))
            if keep_genes:
                mask |= adata.var_names.isin(list(keep_genes))
            adata = adata[:, mask].copy()
        if min_counts > 0:
            keep = _totals(adata, layer) >= min_counts
            record["cells_below_min_counts_in_kept_genes"] = int((~keep).sum())
            if not keep.any():
                raise CLIError(f"no cell of the {what} has --min-counts {min_counts:g} counts "
                               "in the selected genes.")
            if not keep.all():
                adata = adata[keep].copy()
    record["cells"], record["genes"] = int(adata.n_obs), int(adata.n_vars)
    return adata, record


def describe_filters(record: dict[str, Any]) -> str | None:
    """One line saying what the filters did (None when none was asked)."""
    parts = []
    if "min_counts" in record:
        dropped = record["cells_in"] - record["cells"]
        parts.append(f"{dropped:,} of {record['cells_in']:,} cells dropped (fewer than "
                     f"{record['min_counts']:g} counts)")
    if "n_top_genes" in record:
        parts.append(f"{record['genes']:,} of {record['genes_in']:,} genes kept (highly "
                     "variable)")
    return "; ".join(parts) if parts else None


# ----------------------------------------------------------------------------- progress
def chunked(fn: Callable[[np.ndarray | None], Any], n: int, *, desc: str, quiet: bool,
            chunk: int = CHUNK):
    """Call ``fn(indices)`` over chunks of ``n`` cells with a progress bar; join the results.

    Results are arrays (stacked by rows), DataFrames (concatenated) or tuples of them.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    starts = range(0, max(n, 1), chunk)
    parts = []
    for start in tqdm(starts, desc=desc, unit="chunk", disable=quiet or rank() != 0,
                      file=sys.stderr):
        idx = None if n <= chunk else np.arange(start, min(start + chunk, n))
        parts.append(fn(idx))

    def join(items):
        if len(items) == 1:
            return items[0]
        if isinstance(items[0], pd.DataFrame):
            return pd.concat(items)
        return np.concatenate([np.asarray(i) for i in items], axis=0)

    if isinstance(parts[0], tuple):
        return tuple(join([p[k] for p in parts]) for k in range(len(parts[0])))
    return join(parts)
