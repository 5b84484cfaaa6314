import gzip
import io
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp

from cellvi.data._readers import read, read_mtx

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"

N_CELLS, N_GENES = 7, 5
IDS = [f"ENSG{i:05d}" for i in range(N_GENES)]
SYMBOLS = ["CD3E", "LYZ", "MS4A1", "LYZ", "NKG7"]  # one duplicate on purpose
UNIQUE = ["CD3E", "LYZ", "MS4A1", "LYZ-1", "NKG7"]
BARCODES = [f"AAAC{i:02d}-1" for i in range(N_CELLS)]


@pytest.fixture(scope="module")
def counts():
    rng = np.random.default_rng(0)
    x = rng.poisson(1.0, size=(N_CELLS, N_GENES)).astype(np.int64)
    x[0] = 0  # an empty cell
    x[:, 2] = 0  # an empty gene
    x[1, 4] = 1234
    return x


def _check_x(adata, counts):
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert adata.X.dtype == np.float32
    np.testing.assert_array_equal(adata.X.toarray(), counts)


def _write_text(path: Path, lines, gz: bool):
    data = "".join(f"{line}\n" for line in lines).encode()
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def _write_mtx(path: Path, genes_x_cells, gz: bool):
    buf = io.BytesIO()
    scipy.io.mmwrite(buf, sp.coo_matrix(genes_x_cells), field="integer")
    if gz:
        with gzip.open(path, "wb") as fh:
            fh.write(buf.getvalue())
    else:
        path.write_bytes(buf.getvalue())


def _tenx_folder(folder: Path, counts, version: int):
    folder.mkdir()
    gz = version == 3
    sfx = ".gz" if gz else ""
    _write_mtx(folder / f"matrix.mtx{sfx}", counts.T, gz)
    if version == 3:
        feats = [f"{i}\t{s}\tGene Expression" for i, s in zip(IDS, SYMBOLS)]
        _write_text(folder / "features.tsv.gz", feats, gz)
    else:
        _write_text(folder / "genes.tsv", [f"{i}\t{s}" for i, s in zip(IDS, SYMBOLS)], gz)
    _write_text(folder / f"barcodes.tsv{sfx}", BARCODES, gz)
    return folder


def _csc_fields(grp, counts):
    csc = sp.csc_matrix(counts.T)  # genes x cells, CSC: one column per cell
    grp.create_dataset("data", data=csc.data.astype(np.int32))
    grp.create_dataset("indices", data=csc.indices.astype(np.int64))
    grp.create_dataset("indptr", data=csc.indptr.astype(np.int64))
    grp.create_dataset("shape", data=np.array(csc.shape, dtype=np.int32))
    grp.create_dataset("barcodes", data=np.array(BARCODES, dtype="S"))


def _tenx_h5_v3(path: Path, counts):
    with h5py.File(path, "w") as f:
        grp = f.create_group("matrix")
        _csc_fields(grp, counts)
        feat = grp.create_group("features")
        feat.create_dataset("id", data=np.array(IDS, dtype="S"))
        feat.create_dataset("name", data=np.array(SYMBOLS, dtype="S"))
        feat.create_dataset("feature_type", data=np.array(["Gene Expression"] * N_GENES, "S"))
        feat.create_dataset("genome", data=np.array(["GRCh38"] * N_GENES, dtype="S"))
    return path


def _tenx_h5_v2(path: Path, counts):
    with h5py.File(path, "w") as f:
        grp = f.create_group("hg19")
        _csc_fields(grp, counts)
        grp.create_dataset("genes", data=np.array(IDS, dtype="S"))
        grp.create_dataset("gene_names", data=np.array(SYMBOLS, dtype="S"))
    return path


# ------------------------------------------------------------------------------ 10x folders
@pytest.mark.parametrize("version", [3, 2])
def test_10x_folder(tmp_path, counts, version):
    folder = _tenx_folder(tmp_path / f"v{version}", counts, version)
    adata = read(folder)
    _check_x(adata, counts)
    assert list(adata.obs_names) == BARCODES
    assert list(adata.var_names) == UNIQUE
    assert list(adata.var["gene_ids"]) == IDS
    if version == 3:
        assert list(adata.var["feature_types"]) == ["Gene Expression"] * N_GENES
    else:
        assert "feature_types" not in adata.var
    by_id = read(folder, var_names="gene_ids")
    assert list(by_id.var_names) == IDS
    assert list(by_id.var["gene_symbols"]) == SYMBOLS
    _check_x(by_id, counts)


def test_10x_folder_errors(tmp_path, counts):
    empty = tmp_path / "empty"
    (empty / "filtered_feature_bc_matrix").mkdir(parents=True)
    (empty / "filtered_feature_bc_matrix" / "matrix.mtx.gz").touch()
    with pytest.raises(FileNotFoundError, match="no 'matrix.mtx'.*filtered_feature_bc_matrix"):
        read(empty)

    folder = _tenx_folder(tmp_path / "bad", counts, 2)
    _write_text(folder / "barcodes.tsv", BARCODES[:-1], gz=False)
    with pytest.raises(ValueError, match=r"5 genes x 7 cells.*lists 6 barcodes"):
        read(folder)

    (folder / "genes.tsv").unlink()
    with pytest.raises(FileNotFoundError, match="features.tsv"):
        read(folder)


# ------------------------------------------------------------------------------ 10x h5
@pytest.mark.parametrize("writer", [_tenx_h5_v3, _tenx_h5_v2], ids=["v3", "v2"])
def test_10x_h5(tmp_path, counts, writer):
    adata = read(writer(tmp_path / "filtered.h5", counts))
    _check_x(adata, counts)
    assert list(adata.obs_names) == BARCODES
    assert list(adata.var_names) == UNIQUE
    assert list(adata.var["gene_ids"]) == IDS
    if writer is _tenx_h5_v3:
        assert list(adata.var["feature_types"]) == ["Gene Expression"] * N_GENES
        assert list(adata.var["genome"]) == ["GRCh38"] * N_GENES
    by_id = read(tmp_path / "filtered.h5", var_names="gene_ids")
    assert list(by_id.var_names) == IDS
    assert list(by_id.var["gene_symbols"]) == SYMBOLS


def test_10x_h5_wrong_layout(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"not a 10x Genomics matrix.*v3 layout.*v2 layout"):
        read(path)


# ------------------------------------------------------------------------------ loom
def test_loom(tmp_path, counts):
    path = tmp_path / "x.loom"
    coords = np.arange(N_CELLS * 2, dtype=np.float64).reshape(N_CELLS, 2)
    with h5py.File(path, "w") as f:
        f.create_dataset("matrix", data=counts.T.astype(np.float64))
        f.create_group("layers").create_dataset("spliced", data=2 * counts.T)
        ra = f.create_group("row_attrs")
        ra.create_dataset("Gene", data=np.array(SYMBOLS, dtype="S"))
        ra.create_dataset("Accession", data=np.array(IDS, dtype="S"))
        ca = f.create_group("col_attrs")
        ca.create_dataset("CellID", data=np.array(BARCODES, dtype="S"))
        ca.create_dataset("BatchID", data=np.arange(N_CELLS, dtype=np.float64)[:, None])
        ca.create_dataset("Clusters", data=np.array(["a", "b"] * 3 + ["a"], dtype="S"))
        ca.create_dataset("Spatial_coordinates", data=coords)
        f.attrs["LOOM_SPEC_VERSION"] = np.bytes_(b"2.0.1")
    adata = read(path)
    _check_x(adata, counts)
    assert list(adata.obs_names) == BARCODES
    assert list(adata.var_names) == UNIQUE
    assert list(adata.var["Accession"]) == IDS
    np.testing.assert_array_equal(adata.obs["BatchID"], np.arange(N_CELLS))
    assert list(adata.obs["Clusters"]) == ["a", "b"] * 3 + ["a"]
    np.testing.assert_array_equal(adata.obsm["Spatial_coordinates"], coords)
    np.testing.assert_array_equal(adata.layers["spliced"].toarray(), 2 * counts)
    assert adata.uns["loom_attrs"]["LOOM_SPEC_VERSION"] == "2.0.1"


# ------------------------------------------------------------------------------ text
def _frame(counts):
    return pd.DataFrame(counts, index=BARCODES, columns=UNIQUE)


def test_csv(tmp_path, counts):
    _frame(counts).to_csv(tmp_path / "x.csv")
    adata = read(tmp_path / "x.csv")
    _check_x(adata, counts)
    assert list(adata.obs_names) == BARCODES
    assert list(adata.var_names) == UNIQUE


def test_tsv_gz_transposed(tmp_path, counts):
    _frame(counts).T.to_csv(tmp_path / "x.tsv.gz", sep="\t")
    adata = read(tmp_path / "x.tsv.gz", transpose=True)
    _check_x(adata, counts)
    assert list(adata.obs_names) == BARCODES
    assert list(adata.var_names) == UNIQUE


def test_txt_sniffed_and_no_names(tmp_path, counts):
    _frame(counts).to_csv(tmp_path / "x.txt", sep="\t")
    adata = read(tmp_path / "x.txt")
    _check_x(adata, counts)
    assert list(adata.obs_names) == BARCODES
    pd.DataFrame(counts, columns=UNIQUE).to_csv(tmp_path / "y.txt", sep=" ", index=False)
    adata = read(tmp_path / "y.txt", delimiter=" ", first_column_names=False)
    _check_x(adata, counts)
    assert list(adata.obs_names) == [str(i) for i in range(N_CELLS)]


def test_csv_not_numeric(tmp_path, counts):
    df = _frame(counts)
    df["label"] = "x"
    df.to_csv(tmp_path / "x.csv")
    with pytest.raises(ValueError, match="not numeric.*'label'"):
        read(tmp_path / "x.csv")


# ------------------------------------------------------------------------------ mtx
def test_mtx_with_names(tmp_path, counts):
    _write_mtx(tmp_path / "m.mtx.gz", counts.T, gz=True)
    _write_text(tmp_path / "genes.txt", UNIQUE, gz=False)
    _write_text(tmp_path / "cells.txt", BARCODES, gz=False)
    adata = read_mtx(
        tmp_path / "m.mtx.gz",
        var_names=tmp_path / "genes.txt",
        obs_names=str(tmp_path / "cells.txt"),
        transpose=True,
    )
    _check_x(adata, counts)
    assert list(adata.obs_names) == BARCODES
    assert list(adata.var_names) == UNIQUE

    _write_mtx(tmp_path / "c.mtx", counts, gz=False)
    adata = read_mtx(tmp_path / "c.mtx", var_names=UNIQUE, obs_names=BARCODES)
    _check_x(adata, counts)
    assert list(adata.var_names) == UNIQUE

    adata = read(tmp_path / "m.mtx.gz", transpose=True)
    _check_x(adata, counts)
    assert list(adata.obs_names) == [str(i) for i in range(N_CELLS)]


def test_mtx_errors(tmp_path, counts):
    _write_mtx(tmp_path / "m.mtx", counts.T, gz=False)
    with pytest.raises(ValueError, match=r"has 5 cells.*7 obs_names were given.*transpose=True"):
        read_mtx(tmp_path / "m.mtx", obs_names=BARCODES, var_names=IDS)
    with pytest.raises(ValueError, match=r"has 5 genes.*4 var_names"):
        read_mtx(tmp_path / "m.mtx", var_names=IDS[:4], transpose=True)
    with pytest.raises(FileNotFoundError, match="genes.txt"):
        read_mtx(tmp_path / "m.mtx", var_names=tmp_path / "genes.txt", transpose=True)
    with pytest.raises(FileNotFoundError, match="nope.mtx"):
        read_mtx(tmp_path / "nope.mtx")


# ------------------------------------------------------------------------------ h5ad + dispatch
@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_h5ad(tmp_path, counts):
    adata = anndata.AnnData(
        X=sp.csr_matrix(counts, dtype=np.float32),
        obs=pd.DataFrame({"batch": pd.Categorical(["a"] * 4 + ["b"] * 3)}, index=BARCODES),
        var=pd.DataFrame({"gene_ids": IDS}, index=SYMBOLS),
    )
    adata.write_h5ad(tmp_path / "x.h5ad")
    back = read(tmp_path / "x.h5ad")
    _check_x(back, counts)
    assert list(back.var_names) == SYMBOLS  # returned as stored: no renaming
    assert list(back.obs["batch"]) == list(adata.obs["batch"])


def test_dispatch_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.h5ad"):
        read(tmp_path / "missing.h5ad")
    (tmp_path / "x.xlsx").touch()
    with pytest.raises(ValueError, match=r"unsupported extension '\.xlsx'.*\.h5ad.*\.loom"):
        read(tmp_path / "x.xlsx")
    with pytest.raises(ValueError, match="var_names must be one of"):
        read(tmp_path / "x.xlsx", var_names="symbols")


# ------------------------------------------------------------------------------ real files
def _shared(rel: str) -> Path:
    path = SHARED / rel
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def test_real_starmap_loom():
    adata = read(_shared("starmap/mpfc-starmap.loom"))
    assert adata.shape == (3704, 158)
    assert adata.X.format == "csr" and adata.X.dtype == np.float32
    assert {"BatchID", "Clusters"} <= set(adata.obs)
    assert adata.obsm["Spatial_coordinates"].shape == (3704, 2)
    assert adata.var_names.is_unique
    assert np.array_equal(adata.X.data, np.round(adata.X.data))


def test_real_cellbench_csv():
    adata = read(_shared("cellbench/sc_celseq2.count.csv.gz"), transpose=True)
    assert adata.shape == (274, 28204)
    assert adata.var_names[0].startswith("ENSG")
    assert adata.X.format == "csr" and adata.X.nnz > 0


def test_real_osmfish_h5ad():
    adata = read(_shared("osmfish/smfish.h5ad"))
    assert adata.shape == (4530, 33)
    assert "str_labels" in adata.obs


def test_real_kang_ifnb():
    _shared("kang_ifnb")
    from cellvi.data._datasets import kang_ifnb

    adata = kang_ifnb(SHARED / "kang_ifnb")
    assert adata.shape == (2000, 9015)
    assert adata.obs["batch"].value_counts().to_dict() == {"ctrl": 1000, "stim": 1000}
    assert adata.X.format == "csr" and adata.X.dtype == np.float32
    assert np.array_equal(adata.X.data, np.round(adata.X.data))
