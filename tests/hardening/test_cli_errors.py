"""The CLI: one line per error, exit 2, never a traceback; outputs checked before training."""

import numpy as np
import pytest

from cellvi.cli import main


@pytest.fixture
def h5ad(tiny, tmp_path):
    path = tmp_path / "in.h5ad"
    tiny.write_h5ad(path)
    return path


def _run(capsys, argv):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize(("extra", "match"), [
    (["--epochs", "0"], "--epochs: must be >= 1"),
    (["--epochs", "abc"], "--epochs: 'abc' is not an integer"),
    (["--batch-size", "1"], "--batch-size: must be >= 2"),
    (["--lr", "-1"], "--lr: must be a positive"),
    (["--lr", "nan"], "--lr: must be a positive"),
    (["--n-latent", "0"], "--n-latent: must be >= 1"),
    (["--gene-likelihood", "gaussian"], "invalid choice"),
    (["--seed", "-3"], "--seed: must be >= 0"),
])
def test_bad_arguments_exit_2_with_one_line(h5ad, tmp_path, capsys, extra, match):
    with pytest.raises(SystemExit) as info:
        main(["train", str(h5ad), "--out", str(tmp_path / "o"), *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err  # argparse's usage is not printed
    assert not (tmp_path / "o").exists()


def test_bad_device_is_a_clean_error(h5ad, tmp_path, capsys):
    code, err = _run(capsys, ["train", str(h5ad), "--out", str(tmp_path / "o"), "--epochs",
                              "1", "--quiet", "--device", "tpu"])
    assert code == 2 and "device='tpu' is not a device" in err
    assert len(err.strip().splitlines()) == 1


def test_more_top_genes_than_genes_warns(h5ad, tmp_path, capsys):
    with pytest.warns(UserWarning, match="every gene is kept"):
        code, _ = _run(capsys, ["train", str(h5ad), "--out", str(tmp_path / "o"), "--epochs",
                                "1", "--quiet", "--n-top-genes", "100000"])
    assert code == 0


@pytest.mark.parametrize("case", ["missing_input", "out_is_file", "bad_key", "not_counts",
                                  "unwritable", "input_is_output"])
def test_bad_files_and_keys_exit_2_before_training(h5ad, tmp_path, capsys, tiny, case):
    out = tmp_path / "o"
    argv = ["train", str(h5ad), "--out", str(out), "--epochs", "1", "--quiet"]
    if case == "missing_input":
        argv[1] = str(tmp_path / "nope.h5ad")
        match = "does not exist"
    elif case == "out_is_file":
        out.write_text("mine")
        match = "is a file"
    elif case == "bad_key":
        argv += ["--batch-key", "donor"]
        match = "'donor' is not a column"
    elif case == "not_counts":
        logged = tiny.copy()
        logged.X = np.log1p(logged.X.toarray())
        logged.write_h5ad(h5ad)
        match = "log-transformed"
    elif case == "unwritable":
        argv[3] = "/proc/cellvi-out"
        match = "cannot write to --out"
    else:
        out.mkdir()
        (out / "adata.h5ad").write_bytes(h5ad.read_bytes())
        argv[1] = str(out / "adata.h5ad")
        argv.append("--overwrite")
        match = "is the input"
    code, err = _run(capsys, argv)
    assert code == 2, err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    if case == "out_is_file":
        assert out.read_text() == "mine"


def test_existing_outputs_need_overwrite(h5ad, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["train", str(h5ad), "--out", str(out), "--epochs", "1", "--quiet"]
    assert main(argv) == 0
    (out / "notes.txt").write_text("mine")
    code, err = _run(capsys, argv)
    assert code == 2 and "--overwrite" in err
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "mine"
