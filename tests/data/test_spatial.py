"""Readers of the shared spatial sets: counts as stored, coordinates, annotations, errors."""

import anndata
import h5py
import numpy as np
import pytest
from conftest import shared_data

from cellvi.data import read_osmfish, read_starmap


def test_osmfish_counts_coordinates_and_types():
    path = shared_data("osmfish", "smfish.h5ad")
    adata = read_osmfish(path)
    raw = anndata.read_h5ad(path)
    assert adata.shape == (4530, 33)
    assert adata.X.dtype == np.float32 and adata.X.format == "csr"
    np.testing.assert_array_equal(adata.X.toarray(), np.asarray(raw.X, dtype=np.float32))
    np.testing.assert_array_equal(adata.obsm["spatial"][:, 0], raw.obs["x_coord"].to_numpy())
    np.testing.assert_array_equal(adata.obsm["spatial"][:, 1], raw.obs["y_coord"].to_numpy())
    assert set(adata.obs["cell_type"].cat.categories) == set(raw.obs["str_labels"])
    assert list(adata.obs["batch"].cat.categories) == ["0"]
    assert list(adata.var_names) == list(raw.var_names)
    assert "Gad2" in adata.var_names
    assert "gad2" in read_osmfish(path, gene_case="lower").var_names


def test_starmap_read_with_h5py():
    path = shared_data("starmap", "mpfc-starmap.loom")
    adata = read_starmap(path)
    with h5py.File(path, "r") as f:
        matrix = f["matrix"][()]
        coords = f["col_attrs/Spatial_coordinates"][()]
        batch = f["col_attrs/BatchID"][()].ravel()
        clusters = [c.decode() for c in f["col_attrs/Clusters"][()]]
    assert adata.shape == (3704, 158)
    np.testing.assert_array_equal(adata.X.toarray(), matrix.T.astype(np.float32))
    np.testing.assert_array_equal(adata.obsm["spatial"], coords)
    assert list(adata.obs["batch"]) == [str(int(b)) for b in batch]
    assert list(adata.obs["Clusters"]) == clusters
    na = np.array(clusters) == "NA"
    assert adata.obs["cell_type"].isna().to_numpy().tolist() == na.tolist()
    assert adata.obs["cell_type"].cat.categories.size == 15
    assert "gad2" in adata.var_names
    titled = read_starmap(path, gene_case="title")
    shared = set(titled.var_names) & set(read_osmfish(shared_data("osmfish", "smfish.h5ad"))
                                         .var_names)
    assert len(shared) > 5


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="No osmFISH file"):
        read_osmfish(tmp_path / "missing.h5ad")
    with pytest.raises(FileNotFoundError, match="No STARmap file"):
        read_starmap(tmp_path / "missing.loom")
    plain = anndata.AnnData(np.ones((3, 2), dtype=np.float32))
    plain.write_h5ad(tmp_path / "plain.h5ad")
    with pytest.raises(ValueError, match="x_coord"):
        read_osmfish(tmp_path / "plain.h5ad")
    (tmp_path / "text.loom").write_text("not hdf5")
    with pytest.raises(ValueError, match="not an HDF5"):
        read_starmap(tmp_path / "text.loom")
    with h5py.File(tmp_path / "bad.loom", "w") as f:
        f["matrix"] = np.ones((2, 3))
        f.create_group("row_attrs")["Gene"] = np.array([b"a", b"b"])
        f.create_group("col_attrs")["Spatial_coordinates"] = np.ones((2, 2))
    with pytest.raises(ValueError, match="Spatial_coordinates"):
        read_starmap(tmp_path / "bad.loom")
    with pytest.raises(ValueError, match="gene_case"):
        read_starmap(shared_data("starmap", "mpfc-starmap.loom"), gene_case="camel")
