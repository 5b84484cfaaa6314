"""The saved-model format: tensors and JSON only, safe replacement, clear errors."""

import json
import os
import pickle

import numpy as np
import pytest

from cellvi.model import SCVI, _io


@pytest.fixture
def trained(tiny):
    SCVI.setup_anndata(tiny, batch_key="batch")
    return SCVI(tiny, n_latent=3).train(max_epochs=2, progress_bar=False, seed=0)


def test_folder_holds_json_and_safetensors_only(trained, tmp_path):
    trained.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["model.json",
                                                                   "model.safetensors"]
    state = json.loads((tmp_path / "m" / "model.json").read_text())
    assert state["format"] == "cellvi-model" and state["model_class"] == "SCVI"
    loaded = SCVI.load(tmp_path / "m", adata=trained.adata)
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  trained.get_latent_representation())
    np.testing.assert_array_equal(loaded.history.to_numpy(), trained.history.to_numpy())


def test_a_pickle_model_file_is_never_unpickled(trained, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "model.pt").write_bytes(pickle.dumps({"model_class": "SCVI", "x": Payload()}))
    with pytest.raises(ValueError, match="pickle-based.*no longer reads"):
        SCVI.load(folder, adata=trained.adata)
    assert not marker.exists()


def test_damaged_files_get_errors_naming_them(trained, tmp_path):
    trained.save(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors is damaged or truncated"):
        SCVI.load(tmp_path / "m", adata=trained.adata)
    trained.save(tmp_path / "m", overwrite=True)
    (tmp_path / "m" / "model.json").write_text('{"format": "cellvi-model", "form')
    with pytest.raises(ValueError, match="model.json is damaged or truncated"):
        SCVI.load(tmp_path / "m", adata=trained.adata)
    (tmp_path / "m" / "model.json").write_text('{"format": "cellvi-model", "format_version": 99}')
    with pytest.raises(ValueError, match="format version 99"):
        SCVI.load(tmp_path / "m", adata=trained.adata)
    (tmp_path / "m" / "model.safetensors").unlink()
    (tmp_path / "m" / "model.json").write_text('{"format": "cellvi-model", "format_version": 1}')
    with pytest.raises(FileNotFoundError, match="incomplete"):
        SCVI.load(tmp_path / "m", adata=trained.adata)
    with pytest.raises(FileNotFoundError, match="No saved cellvi model"):
        SCVI.load(tmp_path / "nowhere", adata=trained.adata)


def test_overwrite_touches_only_what_cellvi_wrote(trained, tmp_path):
    target = tmp_path / "m"
    trained.save(target)
    (target / "notes.txt").write_text("mine")
    trained.save(target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"  # the user's file is kept
    assert (target / "model.json").exists()
    # a file of that name, or a folder cellvi did not write: refused, untouched
    a_file = tmp_path / "f"
    a_file.write_text("data")
    with pytest.raises(FileExistsError, match="is a file"):
        trained.save(a_file, overwrite=True)
    assert a_file.read_text() == "data"
    foreign = tmp_path / "results"
    foreign.mkdir()
    (foreign / "table.csv").write_text("1,2")
    with pytest.raises(FileExistsError, match="not written by cellvi"):
        trained.save(foreign, overwrite=True)
    assert (foreign / "table.csv").read_text() == "1,2"
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trained.save(target)


def test_leftovers_of_a_killed_save_are_removed(trained, tmp_path):
    dead = tmp_path / f".m{_io._TMP_TAG}999999999-abcd"
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"x" * 1000)
    trained.save(tmp_path / "m")
    assert not dead.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_exchange_is_atomic_and_keeps_both(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("new")
    (b / "x").write_text("old")
    _io._exchange(a, b)
    assert (b / "x").read_text() == "new" and (a / "x").read_text() == "old"


def test_prefixes_let_several_models_share_a_folder(trained, tmp_path):
    other = SCVI(trained.adata, n_latent=2)
    trained.save(tmp_path / "m", prefix="a_", save_anndata=True)
    other.save(tmp_path / "m", prefix="b_")  # nothing of b_ there yet: no overwrite needed
    names = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert names == ["a_adata.h5ad", "a_model.json", "a_model.safetensors", "b_model.json",
                     "b_model.safetensors"]
    a = SCVI.load(tmp_path / "m", prefix="a_")
    b = SCVI.load(tmp_path / "m", adata=trained.adata, prefix="b_")
    assert a.module.n_latent == 3 and b.module.n_latent == 2
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trained.save(tmp_path / "m", prefix="a_")
    trained.save(tmp_path / "m", prefix="a_", overwrite=True)
    assert (tmp_path / "m" / "b_model.json").exists()  # the other model is kept
    with pytest.raises(ValueError, match="prefix"):
        trained.save(tmp_path / "m", prefix="../x")
