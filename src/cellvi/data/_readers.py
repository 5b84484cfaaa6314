"""Readers for the common single-cell count formats, returning :class:`anndata.AnnData`.

Everything here reads local files only. Count matrices come back as cells x genes
:class:`scipy.sparse.csr_matrix` of ``float32`` (except ``.h5ad``, which is returned as stored).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse as sp

from ._sparse import check_compressed

__all__ = ["UnreadableFileError", "read", "read_citeseq_csv", "read_mtx"]

PathLike = str | os.PathLike

_SUPPORTED = (
    "a 10x Genomics folder (matrix.mtx[.gz] + features.tsv[.gz] or genes.tsv + barcodes.tsv[.gz]), "
    "'.h5ad', '.h5' (10x Genomics CellRanger v2 or v3), '.loom', '.mtx[.gz]', "
    "'.csv[.gz]', '.tsv[.gz]', '.txt[.gz]'"
)
_VAR_NAMES = ("gene_symbols", "gene_ids")


# --------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------
def _to_str(values) -> np.ndarray:
    """Decode an array of bytes or objects into an array of Python ``str``."""
    arr = np.asarray(values)
    if arr.dtype.kind == "S":
        return np.array([v.decode("utf-8") for v in arr.ravel()], dtype=object).reshape(arr.shape)
    if arr.dtype.kind == "O":
        return np.array(
            [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr.ravel()],
            dtype=object,
        ).reshape(arr.shape)
    return arr.astype(str).astype(object)


def _csr32(x) -> sp.csr_matrix:
    """Return ``x`` as a canonical ``float32`` CSR matrix."""
    if sp.issparse(x):
        out = sp.csr_matrix(x, dtype=np.float32)
    else:
        out = sp.csr_matrix(np.asarray(x, dtype=np.float32))
    out.sum_duplicates()
    out.sort_indices()
    return out


def _check_finite(x: sp.csr_matrix, where: str) -> sp.csr_matrix:
    """Raise if a matrix just read holds NaN or infinite values (naming the first one)."""
    bad = ~np.isfinite(x.data)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(x.indptr, k, side="right") - 1)
        raise ValueError(
            f"{where}: {int(bad.sum())} value(s) are NaN or infinite (first at cell {row}, gene "
            f"{int(x.indices[k])}: {x.data[k]}); counts must be finite numbers below "
            f"{np.finfo(np.float32).max:.3g} (float32). Fix or drop those entries in the file."
        )
    return x


class UnreadableFileError(ValueError):
    """A file that exists but cannot be parsed; the message names the file and the cause."""


@contextlib.contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn the decoders' low-level errors into one message that names the file and a fix.

    Missing files and permissions keep their own (already named) errors; messages of ours
    that name the file pass through unchanged.
    """
    name = str(path)
    try:
        yield
    except (FileNotFoundError, PermissionError, IsADirectoryError, UnreadableFileError):
        raise
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise UnreadableFileError(
            f"Cannot read {name!r}: it is not a complete gzip file ({e}). It may be truncated "
            "(an interrupted download or copy) or not compressed at all despite its '.gz' "
            f"name; `gzip -t {path.name}` checks it."
        ) from e
    except UnicodeDecodeError as e:
        raise UnreadableFileError(
            f"Cannot read {name!r} as {what}: byte {e.start} is not UTF-8 ({e.reason}). "
            f"Convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path.name}`)."
        ) from e
    except pd.errors.EmptyDataError as e:
        raise UnreadableFileError(f"Cannot read {name!r} as {what}: the file is empty.") from e
    except pd.errors.ParserError as e:
        raise UnreadableFileError(
            f"Cannot read {name!r} as {what}: {e}. Check the delimiter and that every row has "
            "as many fields as the header."
        ) from e
    except KeyError as e:  # h5py: a dataset the layout needs is missing
        raise UnreadableFileError(
            f"Cannot read {name!r} as {what}: a dataset is missing ({e}). The file is "
            "incomplete or not in this layout."
        ) from e
    except OSError as e:  # h5py: not HDF5, truncated, locked
        raise UnreadableFileError(
            f"Cannot read {name!r} as {what}: {e}. It may be truncated (an interrupted download "
            "or copy), still being written, or not an HDF5 file despite its extension."
        ) from e
    except ValueError as e:
        if name in str(e) or path.name in str(e):
            raise
        raise UnreadableFileError(f"Cannot read {name!r} as {what}: {e}") from e


def _suffixes(path: Path) -> str:
    """Return the lower-cased extension of ``path``, folding a trailing ``.gz`` in."""
    name = path.name.lower()
    for ext in (".mtx.gz", ".csv.gz", ".tsv.gz", ".txt.gz"):
        if name.endswith(ext):
            return ext
    return path.suffix.lower()


def _check_var_names(var_names: str) -> None:
    if var_names not in _VAR_NAMES:
        raise ValueError(f"var_names must be one of {_VAR_NAMES}, got {var_names!r}.")


def _unique(names) -> pd.Index:
    """Return ``names`` as a string index made unique by appending ``-1``, ``-2``, ...

    Same rule as :meth:`anndata.AnnData.var_names_make_unique`: the first occurrence keeps its
    name, later ones get the smallest suffix that does not collide with another name.
    """
    index = pd.Index(np.asarray(names, dtype=str).astype(object))
    return index if index.is_unique else anndata.utils.make_index_unique(index, join="-")


def _read_lines(path: Path) -> list[str]:
    """Read a text file (optionally gzipped) into a list of non-empty, stripped lines."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        return [line.rstrip("\r\n") for line in fh if line.strip()]


def _read_table(path: Path) -> list[list[str]]:
    """Read a headerless tab-separated file (optionally gzipped) into rows of fields."""
    return [line.split("\t") for line in _read_lines(path)]


def _names(names, what: str) -> list[str] | None:
    """Turn a path to a one-name-per-line file or a list of names into a list of ``str``."""
    if names is None:
        return None
    if isinstance(names, str | os.PathLike):
        p = Path(names)
        if not p.exists():
            raise FileNotFoundError(f"The {what} file {str(p)!r} does not exist.")
        return [line.strip() for line in _read_lines(p)]
    return [str(n) for n in names]


def _read_mm(path: Path) -> sp.csr_matrix:
    """Read a Matrix Market file (optionally gzipped) as stored, as CSR ``float32``."""
    if path.name.lower().endswith(".gz"):
        with gzip.open(path, "rb") as fh:
            m = scipy.io.mmread(fh)
    else:
        m = scipy.io.mmread(str(path))
    return _csr32(m)


# --------------------------------------------------------------------------------------------
# Matrix Market
# --------------------------------------------------------------------------------------------
def read_mtx(
    matrix: PathLike,
    *,
    var_names: PathLike | Sequence[str] | None = None,
    obs_names: PathLike | Sequence[str] | None = None,
    transpose: bool = False,
) -> anndata.AnnData:
    """Read a Matrix Market file into an AnnData.

    Parameters
    ----------
    matrix
        Path to a ``.mtx`` or ``.mtx.gz`` file.
    var_names
        Gene names: a path to a text file (optionally gzipped) with one name per line, or a
        sequence of names. Defaults to ``"0", "1", ...``.
    obs_names
        Cell names, given like ``var_names``.
    transpose
        Set to ``True`` when the file stores genes x cells (as 10x Genomics and most public
        ``.mtx`` files do); the result is always cells x genes.

    Returns
    -------
    anndata.AnnData
        Cells x genes, with ``X`` a ``float32`` :class:`scipy.sparse.csr_matrix`.

    Raises
    ------
    FileNotFoundError
        If ``matrix`` or a names file does not exist.
    ValueError
        If the number of names does not match the matrix.
    """
    path = Path(matrix)
    if not path.exists():
        raise FileNotFoundError(f"The Matrix Market file {str(path)!r} does not exist.")
    with _reading(path, "a Matrix Market file"):
        x = _check_finite(_read_mm(path), str(path))
    if transpose:
        x = _csr32(x.T)
    obs = _names(obs_names, "obs_names")
    var = _names(var_names, "var_names")
    orient = "genes x cells, transposed" if transpose else "cells x genes"
    hint = " (set transpose=True if the file is genes x cells)" if not transpose else ""
    for names, axis, arg, unit in ((obs, 0, "obs_names", "cells"), (var, 1, "var_names", "genes")):
        if names is not None and len(names) != x.shape[axis]:
            raise ValueError(
                f"{path.name}: the matrix has {x.shape[axis]} {unit} ({x.shape[0]} cells x "
                f"{x.shape[1]} genes, read as {orient}) but {len(names)} {arg} were given{hint}."
            )
    obs_df = pd.DataFrame(index=pd.Index(obs if obs is not None else map(str, range(x.shape[0]))))
    var_df = pd.DataFrame(index=pd.Index(var if var is not None else map(str, range(x.shape[1]))))
    return anndata.AnnData(X=x, obs=obs_df, var=var_df)


# --------------------------------------------------------------------------------------------
# 10x Genomics folder
# --------------------------------------------------------------------------------------------
def _find(folder: Path, *names: str) -> Path | None:
    for name in names:
        p = folder / name
        if p.exists():
            return p
    return None


def _read_10x_folder(folder: Path, var_names: str) -> anndata.AnnData:
    mtx = _find(folder, "matrix.mtx.gz", "matrix.mtx")
    if mtx is None:
        sub = sorted(
            p.relative_to(folder).parent.as_posix()
            for pat in ("*/matrix.mtx*", "*/*/matrix.mtx*")
            for p in folder.glob(pat)
        )
        hint = f" It was found in sub-folder(s) {sub}: pass one of those instead." if sub else ""
        raise FileNotFoundError(
            f"The folder {str(folder)!r} has no 'matrix.mtx' or 'matrix.mtx.gz', so it is not a "
            f"10x Genomics matrix folder.{hint} Supported inputs: {_SUPPORTED}."
        )
    genes = _find(folder, "features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
    barcodes = _find(folder, "barcodes.tsv.gz", "barcodes.tsv")
    if genes is None or barcodes is None:
        missing = []
        if genes is None:
            missing.append("'features.tsv[.gz]' (v3) or 'genes.tsv' (v2)")
        if barcodes is None:
            missing.append("'barcodes.tsv[.gz]'")
        raise FileNotFoundError(
            f"The 10x folder {str(folder)!r} has {mtx.name} but lacks {' and '.join(missing)}."
        )
    with _reading(mtx, "a Matrix Market file"):
        x = _check_finite(_read_mm(mtx), str(mtx))  # genes x cells
    with _reading(genes, "a 10x features table"):
        feat = _read_table(genes)
    with _reading(barcodes, "a 10x barcodes table"):
        cells = [row[0] for row in _read_table(barcodes)]
    if x.shape != (len(feat), len(cells)):
        raise ValueError(
            f"The 10x folder {str(folder)!r} is inconsistent: {mtx.name} is {x.shape[0]} genes x "
            f"{x.shape[1]} cells but {genes.name} lists {len(feat)} genes and {barcodes.name} "
            f"lists {len(cells)} barcodes. Check that the three files come from the same run."
        )
    ids = [row[0] for row in feat]
    symbols = [row[1] if len(row) > 1 else row[0] for row in feat]
    if var_names == "gene_symbols":
        var = pd.DataFrame({"gene_ids": ids}, index=_unique(symbols))
    else:
        var = pd.DataFrame({"gene_symbols": symbols}, index=_unique(ids))
    if all(len(row) > 2 for row in feat):
        var["feature_types"] = [row[2] for row in feat]
    adata = anndata.AnnData(X=_csr32(x.T), obs=pd.DataFrame(index=pd.Index(cells)), var=var)
    return adata


# --------------------------------------------------------------------------------------------
# 10x Genomics HDF5
# --------------------------------------------------------------------------------------------
def _csc_group(grp: h5py.Group) -> sp.csr_matrix:
    """Read a CellRanger CSC (genes x cells) group as a CSR cells x genes matrix."""
    n_genes, n_cells = (int(v) for v in grp["shape"][:])
    data, indices, indptr = grp["data"][:], grp["indices"][:], grp["indptr"][:]
    # stored genes x cells CSC = cells x genes CSR; checked before scipy indexes anything
    check_compressed(len(data), indices, indptr, (n_cells, n_genes),
                     where=f"{grp.file.filename}:{grp.name}")
    return _csr32(sp.csr_matrix((data, indices, indptr), shape=(n_cells, n_genes)))


def _read_10x_h5(path: Path, var_names: str) -> anndata.AnnData:
    with h5py.File(path, "r") as f:
        if "matrix" in f and isinstance(f["matrix"], h5py.Group) and "features" in f["matrix"]:
            grp = f["matrix"]
            x = _csc_group(grp)
            feat = grp["features"]
            var = pd.DataFrame(
                {"gene_ids": _to_str(feat["id"][:]), "gene_symbols": _to_str(feat["name"][:])}
            )
            for key, col in (("feature_type", "feature_types"), ("genome", "genome")):
                if key in feat:
                    var[col] = _to_str(feat[key][:])
            barcodes = _to_str(grp["barcodes"][:])
        else:
            v2 = [
                k
                for k, g in f.items()
                if isinstance(g, h5py.Group)
                and {"data", "indices", "indptr", "shape"} <= set(g)
                and "barcodes" in g
                and "genes" in g
            ]
            if not v2:
                raise ValueError(
                    f"{str(path)!r} is an HDF5 file but not a 10x Genomics matrix: expected either "
                    "the CellRanger v3 layout '/matrix/{data,indices,indptr,shape,barcodes,"
                    "features/...}' or the v2 layout '/<genome>/{data,indices,indptr,shape,"
                    f"barcodes,genes,gene_names}}'; top-level keys are {sorted(f.keys())}. "
                    "For an AnnData file use the '.h5ad' extension."
                )
            mats, vars_ = [], []
            barcodes = _to_str(f[v2[0]]["barcodes"][:])
            for genome in v2:
                grp = f[genome]
                if not np.array_equal(_to_str(grp["barcodes"][:]), barcodes):
                    raise ValueError(
                        f"{str(path)!r}: genomes {v2[0]!r} and {genome!r} have different "
                        "barcodes, so they cannot be read into one AnnData."
                    )
                mats.append(_csc_group(grp))
                ids = _to_str(grp["genes"][:])
                names = _to_str(grp["gene_names"][:]) if "gene_names" in grp else ids
                vars_.append(pd.DataFrame({"gene_ids": ids, "gene_symbols": names}))
                if len(v2) > 1:
                    vars_[-1]["genome"] = genome
            x = _csr32(sp.hstack(mats)) if len(mats) > 1 else mats[0]
            var = pd.concat(vars_, ignore_index=True)
    if x.shape != (len(barcodes), len(var)):
        raise ValueError(
            f"{str(path)!r} is inconsistent: the matrix is {x.shape[1]} genes x {x.shape[0]} cells "
            f"but there are {len(var)} gene names and {len(barcodes)} barcodes."
        )
    key = "gene_symbols" if var_names == "gene_symbols" else "gene_ids"
    var.index = _unique(var.pop(key).astype(str).to_numpy())
    adata = anndata.AnnData(X=x, obs=pd.DataFrame(index=pd.Index(barcodes.astype(str))), var=var)
    return adata


# --------------------------------------------------------------------------------------------
# loom
# --------------------------------------------------------------------------------------------
def _attrs_frame(grp: h5py.Group, n: int, name_keys: tuple[str, ...], what: str):
    """Split loom ``row_attrs``/``col_attrs`` into (names, frame of 1-D attrs, dict of 2-D)."""
    cols: dict[str, np.ndarray] = {}
    multi: dict[str, np.ndarray] = {}
    for key, ds in grp.items():
        if not isinstance(ds, h5py.Dataset):
            continue
        vals = ds[()]
        if vals.shape[:1] != (n,):
            raise ValueError(
                f"loom {what} attribute {key!r} has shape {vals.shape}, expected {n} entries."
            )
        if vals.dtype.kind in "SO":
            vals = _to_str(vals)
        if vals.ndim == 2 and vals.shape[1] == 1:
            vals = vals[:, 0]
        if vals.ndim == 1:
            cols[key] = vals
        else:
            multi[key] = vals
    names = None
    for key in name_keys:
        if key in cols:
            names = [str(v) for v in cols.pop(key)]
            break
    index = pd.Index(names if names is not None else [str(i) for i in range(n)])
    return pd.DataFrame(cols, index=index), multi


def _read_loom(path: Path) -> anndata.AnnData:
    with h5py.File(path, "r") as f:
        if "matrix" not in f:
            raise ValueError(f"{str(path)!r} has no '/matrix' dataset; is it really a loom file?")
        n_genes, n_cells = f["matrix"].shape
        x = _check_finite(_csr32(f["matrix"][()].T), f"{path}:/matrix")
        var, varm = _attrs_frame(f.get("row_attrs", {}), n_genes, ("Gene", "var_names"), "row")
        obs, obsm = _attrs_frame(f.get("col_attrs", {}), n_cells, ("CellID", "obs_names"), "column")
        layers = {}
        for key, ds in f.get("layers", {}).items():
            layers[key] = _csr32(ds[()].T)
        uns = {}
        for key, val in f.attrs.items():
            if isinstance(val, bytes | np.bytes_):
                val = val.decode("utf-8")
            elif isinstance(val, np.ndarray) and val.dtype.kind in "SO":
                val = np.asarray(_to_str(val), dtype=str)
            uns[key] = val
    var.index = _unique(var.index)
    adata = anndata.AnnData(X=x, obs=obs, var=var, obsm=obsm, varm=varm, layers=layers)
    if uns:
        adata.uns["loom_attrs"] = uns
    return adata


# --------------------------------------------------------------------------------------------
# delimited text
# --------------------------------------------------------------------------------------------
def _sniff_delimiter(path: Path) -> str:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        first = fh.readline()
    if "\t" in first:
        return "\t"
    if "," in first:
        return ","
    return r"\s+"


def _read_text(
    path: Path, *, transpose: bool, delimiter: str | None, first_column_names: bool
) -> anndata.AnnData:
    ext = _suffixes(path)
    if delimiter is None:
        delimiter = {".csv": ",", ".csv.gz": ",", ".tsv": "\t", ".tsv.gz": "\t"}.get(ext)
        if delimiter is None:
            delimiter = _sniff_delimiter(path)
    df = pd.read_csv(path, sep=delimiter, header=0, index_col=0 if first_column_names else False)
    if df.shape[1] == 0:
        raise ValueError(
            f"{str(path)!r}: no column of counts after the "
            f"{'name column' if first_column_names else 'header'} when split on {delimiter!r}; "
            "the delimiter is probably wrong (pass delimiter='\\t' for a tab-separated file, "
            "',' for commas)."
        )
    if df.shape[0] == 0:
        raise ValueError(f"{str(path)!r}: a header row but no row of counts.")
    bad = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if bad:
        raise ValueError(
            f"{str(path)!r}: {len(bad)} column(s) are not numeric (first: {str(bad[0])!r}). "
            "Expected a header row, then one row per "
            f"{'gene' if transpose else 'cell'} with its name in the first column "
            "(set first_column_names=False if there is no name column) and counts elsewhere; "
            f"check the delimiter (used {delimiter!r})."
        )
    values64 = df.to_numpy(dtype=np.float64)
    finite = np.isfinite(values64)
    if not finite.all():
        r, c = (int(v[0]) for v in np.nonzero(~finite))
        v = values64[r, c]
        what = ("empty, or the row is shorter than the header" if np.isnan(v)
                else "infinite")
        raise ValueError(
            f"{str(path)!r}: {int((~finite).sum())} value(s) are NaN or infinite; the first, "
            f"row {df.index[r]!r} column {df.columns[c]!r}, is {what}. Counts must be finite "
            "numbers: fill or drop those fields."
        )
    if values64.size and np.abs(values64).max() > np.finfo(np.float32).max:
        r, c = (int(v[0]) for v in np.nonzero(np.abs(values64) > np.finfo(np.float32).max))
        raise ValueError(
            f"{str(path)!r}: row {df.index[r]!r} column {df.columns[c]!r} is {values64[r, c]:g}, "
            f"beyond float32's range ({np.finfo(np.float32).max:.3g}); counts are stored as "
            "float32. Fix that value in the file."
        )
    values = values64.astype(np.float32)
    rows = pd.Index(df.index.astype(str))
    cols = pd.Index(df.columns.astype(str))
    if transpose:
        values, rows, cols = values.T, cols, rows
    return anndata.AnnData(
        X=_csr32(values), obs=pd.DataFrame(index=rows), var=pd.DataFrame(index=cols)
    )


# --------------------------------------------------------------------------------------------
# dispatcher
# --------------------------------------------------------------------------------------------
def read(
    path: PathLike,
    *,
    transpose: bool = False,
    delimiter: str | None = None,
    first_column_names: bool = True,
    var_names: str = "gene_symbols",
    protein_expression: bool = True,
) -> anndata.AnnData:
    """Read single-cell counts from a local file or folder, choosing the reader by its type.

    Supported inputs:

    * ``.h5ad``: read with :func:`anndata.read_h5ad` and returned as stored; a ``.zarr``
      folder likewise with :func:`anndata.read_zarr`.
    * a **10x Genomics folder** with ``matrix.mtx[.gz]``, ``barcodes.tsv[.gz]`` and either
      ``features.tsv[.gz]`` (CellRanger v3: id, name, feature type) or ``genes.tsv[.gz]``
      (v2: id, name). The genes x cells matrix is transposed to cells x genes.
    * a **10x Genomics** ``.h5`` file, CellRanger v3 (``/matrix/...``) or v2 (``/<genome>/...``;
      several genomes are concatenated along genes with ``var["genome"]``).
    * ``.loom``: ``/matrix`` (genes x cells) is transposed; ``/row_attrs`` become ``var`` (names
      from ``Gene`` or ``var_names``), ``/col_attrs`` become ``obs`` (names from ``CellID`` or
      ``obs_names``), multi-column attributes go to ``varm``/``obsm``, ``/layers`` to
      ``layers`` and the file attributes to ``uns["loom_attrs"]``.
    * ``.mtx[.gz]``: a bare Matrix Market file, see :func:`read_mtx`.
    * ``.csv``, ``.tsv``, ``.txt`` (each optionally ``.gz``): a header row of names and one row
      per cell, the first column holding the cell names.

    For 10x inputs, ``var["gene_ids"]`` (or ``var["gene_symbols"]``) holds the other identifier
    and ``var["feature_types"]`` the feature type when the file has it. For 10x and loom inputs,
    repeated gene names are made unique as :meth:`anndata.AnnData.var_names_make_unique` does:
    the first occurrence is kept and later ones get ``-1``, ``-2``, ... appended.

    Parameters
    ----------
    path
        File or folder to read.
    transpose
        For delimited text and ``.mtx``: set to ``True`` when the file is genes x cells (genes
        as rows). Ignored for the self-describing formats.
    delimiter
        For delimited text: the field separator. By default ``,`` for ``.csv``, tab for
        ``.tsv``, and guessed from the first line (tab, comma, else whitespace) for ``.txt``.
    first_column_names
        For delimited text: whether the first column holds row names. If ``False``, rows are
        named ``"0", "1", ...``.
    var_names
        For 10x inputs: ``"gene_symbols"`` (default) or ``"gene_ids"`` to name genes by their
        Ensembl-style ids instead.
    protein_expression
        For 10x inputs with ``"Antibody Capture"`` features (CITE-seq): move them out of ``X``
        into ``obsm["protein_expression"]`` (a dense ``(cells, proteins)`` float32 array),
        with their names in ``uns["protein_names"]``, as totalVI reads them (see
        :meth:`cellvi.model.TOTALVI.setup_anndata`). False keeps them as columns of ``X``.

    Returns
    -------
    anndata.AnnData
        Cells x genes with string ``obs_names``/``var_names``. ``X`` is a ``float32``
        :class:`scipy.sparse.csr_matrix` for every format but ``.h5ad``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist, or a folder is not a complete 10x folder.
    ValueError
        For an unsupported extension, a ``.h5`` file in neither 10x layout, names that do not
        match the matrix shape, NaN or infinite counts, or a damaged sparse matrix.
    UnreadableFileError
        (a ``ValueError``) A file that exists but cannot be parsed: empty, truncated, not
        gzip or HDF5 despite its name, not UTF-8; the message names the file and a fix.
    """
    _check_var_names(var_names)
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"No such file or folder: {str(p)!r}.")
    if p.is_dir():
        if p.name.lower().endswith(".zarr"):
            try:
                return anndata.read_zarr(p)
            except ImportError as e:
                raise ImportError(
                    f"Reading the zarr store {str(p)!r} needs the zarr package ({e}): "
                    "`pip install zarr`."
                ) from e
            except Exception as e:  # zarr's own errors (no group, bad metadata) are many
                raise UnreadableFileError(
                    f"Cannot read {str(p)!r} as a zarr AnnData store: {type(e).__name__}: {e}. "
                    "It may be incomplete (an interrupted write or copy) or not an AnnData store."
                ) from e
        adata = _read_10x_folder(p, var_names)
        return _antibody_capture_to_obsm(adata) if protein_expression else adata
    ext = _suffixes(p)
    if ext == ".h5ad":
        with _reading(p, "an AnnData .h5ad file"):
            return anndata.read_h5ad(p)
    if ext in (".h5", ".hdf5"):
        with _reading(p, "a 10x Genomics .h5 file"):
            adata = _read_10x_h5(p, var_names)
        return _antibody_capture_to_obsm(adata) if protein_expression else adata
    if ext == ".loom":
        with _reading(p, "a loom file"):
            return _read_loom(p)
    if ext in (".mtx", ".mtx.gz"):
        return read_mtx(p, transpose=transpose)
    if ext in (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".txt.gz"):
        with _reading(p, "a delimited text table"):
            return _read_text(
                p, transpose=transpose, delimiter=delimiter, first_column_names=first_column_names
            )
    raise ValueError(
        f"Cannot read {str(p)!r}: unsupported extension {ext or '(none)'!r}. "
        f"Supported inputs: {_SUPPORTED}."
    )


# --------------------------------------------------------------------------------------------
# CITE-seq: antibody-derived tags (proteins) next to the RNA
# --------------------------------------------------------------------------------------------
PROTEIN_OBSM_KEY = "protein_expression"
PROTEIN_NAMES_UNS_KEY = "protein_names"
ANTIBODY_CAPTURE = "Antibody Capture"


def _antibody_capture_to_obsm(adata: anndata.AnnData) -> anndata.AnnData:
    """Move 10x ``"Antibody Capture"`` features from ``X`` to ``obsm["protein_expression"]``.

    The protein names (the features' names) go to ``uns["protein_names"]``; the other
    features stay in ``X`` with their ``var`` rows. An AnnData without such features is
    returned unchanged.
    """
    if "feature_types" not in adata.var:
        return adata
    is_protein = (adata.var["feature_types"].astype(str) == ANTIBODY_CAPTURE).to_numpy()
    if not is_protein.any():
        return adata
    proteins = np.asarray(adata.X[:, is_protein].toarray(), dtype=np.float32)
    out = adata[:, ~is_protein].copy()
    out.obsm[PROTEIN_OBSM_KEY] = proteins
    out.uns[PROTEIN_NAMES_UNS_KEY] = np.asarray(adata.var_names[is_protein], dtype=str)
    return out


def read_citeseq_csv(
    rna: PathLike,
    adt: PathLike,
    *,
    transpose: bool = True,
    delimiter: str | None = None,
) -> anndata.AnnData:
    """Read a CITE-seq experiment given as two count tables: RNA and ADT (proteins).

    Both tables are delimited text (``.csv``, ``.tsv``, ``.txt``, optionally gzipped) with a
    header row of names and the row names in the first column, as GEO's CITE-seq series give
    them (e.g. GSE100866's ``*-RNA_umi.csv.gz`` and ``*-ADT_umi.csv.gz``).

    Parameters
    ----------
    rna, adt
        Paths of the RNA and the ADT tables.
    transpose
        Whether the tables are features x cells (genes or proteins as rows, the GEO layout;
        default); False for cells x features.
    delimiter
        Field separator (default: from the extension, else guessed).

    Returns
    -------
    anndata.AnnData
        Cells x genes float32 CSR counts, with the proteins in ``obsm["protein_expression"]``
        (dense float32) and their names in ``uns["protein_names"]``, for
        ``TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
        protein_names_uns_key="protein_names")``. Cells are those of the RNA table, in its
        order.

    Raises
    ------
    FileNotFoundError
        A table does not exist.
    ValueError
        The two tables share no cell name, or the ADT table lacks some of the RNA table's
        cells (the message names a few).
    """
    paths = [Path(rna).expanduser(), Path(adt).expanduser()]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"No such file: {str(p)!r}.")
    tables = []
    for p in paths:
        with _reading(p, "a delimited text table"):
            tables.append(_read_text(p, transpose=transpose, delimiter=delimiter,
                                     first_column_names=True))
    adata, prot = tables
    common = adata.obs_names.intersection(prot.obs_names)
    if common.empty:
        raise ValueError(
            f"{paths[0].name} and {paths[1].name} share no cell name (e.g. "
            f"{list(adata.obs_names[:2])} vs {list(prot.obs_names[:2])}); check that both are "
            f"{'features x cells' if transpose else 'cells x features'} (transpose=)."
        )
    missing = adata.obs_names.difference(prot.obs_names)
    if len(missing):
        raise ValueError(
            f"{len(missing)} cell(s) of {paths[0].name} are not in {paths[1].name} (e.g. "
            f"{list(missing[:3])}); give both tables the same cells."
        )
    proteins = prot[adata.obs_names].X.toarray().astype(np.float32)
    adata.obsm[PROTEIN_OBSM_KEY] = proteins
    adata.uns[PROTEIN_NAMES_UNS_KEY] = np.asarray(prot.var_names, dtype=str)
    return adata
