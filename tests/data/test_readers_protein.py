"""CITE-seq readers: 10x antibody capture into obsm, CSV ADT tables, and MuData input."""

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
from conftest import shared_data

from cellvi.data import read, read_citeseq_csv
from cellvi.model import TOTALVI

N_CELLS = 40
GENES = [f"G{i}" for i in range(12)]
PROTEINS = ["CD3_TotalSeqB", "CD4_TotalSeqB", "CD19_TotalSeqB"]
BARCODES = [f"AAAC{i:03d}-1" for i in range(N_CELLS)]


@pytest.fixture(scope="module")
def counts():
    rng = np.random.default_rng(0)
    rna = rng.poisson(2.0, (N_CELLS, len(GENES))).astype(np.int64)
    rna[:, 0] += 1
    adt = rng.poisson(30.0, (N_CELLS, len(PROTEINS))).astype(np.int64)
    return rna, adt


def _features():
    rows = [(f"ENSG{i}", g, "Gene Expression") for i, g in enumerate(GENES)]
    return rows + [(p, p, "Antibody Capture") for p in PROTEINS]


def _write_gz(path: Path, data: bytes):
    with gzip.open(path, "wb") as fh:
        fh.write(data)


def _tenx_folder(folder: Path, rna, adt):
    folder.mkdir()
    joint = np.hstack([rna, adt])  # cells x features
    buf = io.BytesIO()
    scipy.io.mmwrite(buf, sp.coo_matrix(joint.T), field="integer")
    _write_gz(folder / "matrix.mtx.gz", buf.getvalue())
    _write_gz(folder / "features.tsv.gz",
              "".join(f"{a}\t{b}\t{c}\n" for a, b, c in _features()).encode())
    _write_gz(folder / "barcodes.tsv.gz", "".join(f"{b}\n" for b in BARCODES).encode())
    return folder


def _tenx_h5(path: Path, rna, adt):
    joint = sp.csc_matrix(np.hstack([rna, adt]).T)  # features x cells
    feats = _features()
    with h5py.File(path, "w") as f:
        grp = f.create_group("matrix")
        grp.create_dataset("data", data=joint.data.astype(np.int32))
        grp.create_dataset("indices", data=joint.indices.astype(np.int64))
        grp.create_dataset("indptr", data=joint.indptr.astype(np.int64))
        grp.create_dataset("shape", data=np.array(joint.shape, dtype=np.int32))
        grp.create_dataset("barcodes", data=np.array(BARCODES, dtype="S"))
        fg = grp.create_group("features")
        fg.create_dataset("id", data=np.array([r[0] for r in feats], dtype="S"))
        fg.create_dataset("name", data=np.array([r[1] for r in feats], dtype="S"))
        fg.create_dataset("feature_type", data=np.array([r[2] for r in feats], dtype="S"))
    return path


def _check(adata, rna, adt):
    assert list(adata.var_names) == GENES
    np.testing.assert_array_equal(adata.X.toarray(), rna)
    y = adata.obsm["protein_expression"]
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    np.testing.assert_array_equal(y, adt)
    assert list(adata.uns["protein_names"]) == PROTEINS
    assert set(adata.var["feature_types"]) == {"Gene Expression"}


def test_10x_folder_antibody_capture_goes_to_obsm(tmp_path, counts):
    rna, adt = counts
    folder = _tenx_folder(tmp_path / "filtered_feature_bc_matrix", rna, adt)
    _check(read(folder), rna, adt)
    kept = read(folder, protein_expression=False)  # the features as they are in the file
    assert kept.n_vars == len(GENES) + len(PROTEINS) and "protein_expression" not in kept.obsm


def test_10x_h5_antibody_capture_goes_to_obsm_and_trains(tmp_path, counts):
    rna, adt = counts
    adata = read(_tenx_h5(tmp_path / "pbmc.h5", rna, adt))
    _check(adata, rna, adt)
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
                          protein_names_uns_key="protein_names")
    model = TOTALVI(adata, n_hidden=16, n_latent=4)
    model.train(max_epochs=2, seed=0, progress_bar=False, batch_size=20)
    assert list(model.get_protein_foreground_probability().columns) == PROTEINS


def _table(path: Path, frame: pd.DataFrame):
    frame.to_csv(path, compression="gzip" if path.suffix == ".gz" else None)


@pytest.mark.parametrize("transpose", [True, False])
def test_citeseq_csv_tables(tmp_path, counts, transpose):
    rna, adt = counts
    rna_df = pd.DataFrame(rna, index=BARCODES, columns=GENES)
    adt_df = pd.DataFrame(adt, index=BARCODES, columns=PROTEINS).iloc[::-1]  # other order
    if transpose:  # GEO's layout: features x cells
        rna_df, adt_df = rna_df.T, adt_df.T
    _table(tmp_path / "rna.csv.gz", rna_df)
    _table(tmp_path / "adt.csv", adt_df)
    adata = read_citeseq_csv(tmp_path / "rna.csv.gz", tmp_path / "adt.csv", transpose=transpose)
    assert list(adata.obs_names) == BARCODES
    np.testing.assert_array_equal(adata.X.toarray(), rna)
    np.testing.assert_array_equal(adata.obsm["protein_expression"], adt)  # aligned by name
    assert list(adata.uns["protein_names"]) == PROTEINS


def test_citeseq_csv_bad_tables(tmp_path, counts):
    rna, adt = counts
    _table(tmp_path / "rna.csv", pd.DataFrame(rna, index=BARCODES, columns=GENES).T)
    _table(tmp_path / "adt.csv", pd.DataFrame(adt, index=BARCODES, columns=PROTEINS))
    with pytest.raises(ValueError, match="share no cell name"):
        read_citeseq_csv(tmp_path / "rna.csv", tmp_path / "adt.csv")  # ADT is cells x proteins
    _table(tmp_path / "adt.csv", pd.DataFrame(adt[:30], index=BARCODES[:30], columns=PROTEINS).T)
    with pytest.raises(ValueError, match="10 cell"):
        read_citeseq_csv(tmp_path / "rna.csv", tmp_path / "adt.csv")
    with pytest.raises(FileNotFoundError):
        read_citeseq_csv(tmp_path / "rna.csv", tmp_path / "none.csv")


def test_real_cd8_adt_table():
    folder = shared_data("cd8_citeseq")
    adata = read_citeseq_csv(folder / "GSE100866_CD8_merged-RNA_umi.csv.gz",
                             folder / "GSE100866_CD8_merged-ADT_umi.csv.gz")
    assert adata.shape == (1774, 11757)
    assert list(adata.uns["protein_names"]) == ["CD8", "CD56", "CD57", "CD3", "CD2"]
    raw = pd.read_csv(folder / "GSE100866_CD8_merged-ADT_umi.csv.gz", index_col=0)
    np.testing.assert_array_equal(adata.obsm["protein_expression"],
                                  raw[adata.obs_names].T.to_numpy())


# ------------------------------------------------------------------------------ MuData
class FakeMuData:
    """What TOTALVI reads of a MuData: ``.mod``, ``.obs`` and ``.uns``."""

    def __init__(self, mod):
        self.mod = mod
        self.obs = pd.DataFrame(index=next(iter(mod.values())).obs_names)
        self.uns = {}


def _mudata(counts, cls):
    rna, adt = counts
    r = anndata.AnnData(sp.csr_matrix(rna.astype(np.float32)))
    r.obs_names, r.var_names = BARCODES, GENES
    p = anndata.AnnData(adt.astype(np.float32))
    p.obs_names, p.var_names = BARCODES, PROTEINS
    m = cls({"rna": r, "prot": p})
    m.obs["batch"] = pd.Categorical(["a", "b"] * (N_CELLS // 2), categories=["a", "b"])
    return m


def _train_on(mdata):
    r, p = mdata.mod["rna"], mdata.mod["prot"]
    before = (r.X.copy(), p.X.copy(), dict(r.obsm), dict(r.uns))
    TOTALVI.setup_mudata(mdata, batch_key="batch",
                         modalities={"rna_layer": "rna", "protein_layer": "prot"})
    assert "_cellvi_setup" in mdata.uns
    model = TOTALVI(mdata, n_hidden=16, n_latent=4)
    model.train(max_epochs=2, seed=0, progress_bar=False, batch_size=20)
    rna, pro = model.get_normalized_expression(mdata)
    assert list(pro.columns) == PROTEINS and list(rna.columns) == GENES
    assert model.get_latent_representation(mdata).shape == (N_CELLS, 4)
    # nothing of the user's modalities changed
    np.testing.assert_array_equal(r.X.toarray(), before[0].toarray())
    np.testing.assert_array_equal(p.X, before[1])
    assert dict(r.obsm).keys() == before[2].keys() and "_cellvi_setup" not in r.uns


def test_setup_mudata_duck_typed(counts):
    _train_on(_mudata(counts, FakeMuData))


def test_setup_mudata_with_mudata(counts):
    mudata = pytest.importorskip("mudata")
    _train_on(_mudata(counts, mudata.MuData))


def test_setup_mudata_bad_input(counts):
    mdata = _mudata(counts, FakeMuData)
    with pytest.raises(ValueError, match="modalities="):
        TOTALVI.setup_mudata(mdata)
    with pytest.raises(ValueError, match="no modality 'adt'"):
        TOTALVI.setup_mudata(mdata, modalities={"rna_layer": "rna", "protein_layer": "adt"})
    mdata.mod["prot"] = mdata.mod["prot"][::-1].copy()
    with pytest.raises(ValueError, match="different cells"):
        TOTALVI.setup_mudata(mdata, modalities={"rna_layer": "rna", "protein_layer": "prot"})
    with pytest.raises(TypeError, match="needs a MuData"):
        TOTALVI.setup_mudata(mdata.mod["rna"], modalities={"rna_layer": "rna",
                                                           "protein_layer": "prot"})
