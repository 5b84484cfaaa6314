"""A save killed half-way leaves the previous model intact, and its leftovers are removed."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from cellvi.model import SCVI

SCRIPT = textwrap.dedent("""
    import sys, time
    import anndata
    from cellvi.model import SCVI

    adata = anndata.read_h5ad(sys.argv[1])
    SCVI.setup_anndata(adata)
    model = SCVI(adata, n_hidden=8)

    def slow_write(self, path, *args, **kwargs):
        open(sys.argv[3], "w").close()  # tell the test the save has started
        time.sleep(60)

    anndata.AnnData.write_h5ad = slow_write
    model.save(sys.argv[2], overwrite=True, save_anndata=True)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_kill_during_save_keeps_the_old_model(tiny, tmp_path):
    data = tmp_path / "in.h5ad"
    tiny.write_h5ad(data)
    SCVI.setup_anndata(tiny)
    old = SCVI(tiny, n_hidden=8)
    target = tmp_path / "model"
    old.save(target)
    started = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(data), str(target),
                             str(started)])
    try:
        deadline = time.time() + 300  # a fresh interpreter importing torch, on a busy machine
        while not started.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert started.exists(), "the save did not start"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".model.cellvi-save-")]
    assert leftovers  # the killed save's temporary folder
    SCVI.load(target, adata=tiny)  # the old model is intact
    old.save(target, overwrite=True)
    assert not any(p.name.startswith(".model.cellvi-save-") for p in tmp_path.iterdir())
