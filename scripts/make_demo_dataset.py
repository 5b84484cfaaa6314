"""Build ``src/cellvi/data/_datasets/pbmc_ifnb.h5ad``, the demo dataset behind ``pbmc_ifnb()``.

Reads the two-condition Kang et al. (2018) IFN-beta PBMC counts from a local folder with
``cellvi.data._datasets.kang_ifnb`` (both conditions concatenated, ``obs["batch"]`` = ctrl/stim,
shared genes only), keeps the ``--n-top-genes`` most variable genes chosen on both batches by
``highly_variable_genes`` (the same rule ``kang_ifnb(n_top_genes=...)`` uses, so the file equals
``kang_ifnb(n_top_genes=2000)`` with the defaults), stores the counts as integers and writes a
gzip-compressed h5ad, refusing to leave a file of ``--max-bytes`` or more.

Usage, from the repository root::

    python scripts/make_demo_dataset.py [--source ../shared/data/kang_ifnb] [--n-top-genes 2000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cellvi.data._datasets import kang_ifnb  # noqa: E402

OUT = ROOT / "src" / "cellvi" / "data" / "_datasets" / "pbmc_ifnb.h5ad"


def main(argv: list[str] | None = None) -> int:
    """Build the demo file and print its shape and size."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", default=str(ROOT.parent / "shared" / "data" / "kang_ifnb"))
    ap.add_argument("--n-top-genes", type=int, default=2000)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--max-bytes", type=int, default=2_000_000)
    args = ap.parse_args(argv)

    adata = kang_ifnb(args.source, n_top_genes=args.n_top_genes)
    x = sp.csr_matrix(adata.X)
    if not np.array_equal(x.data, np.round(x.data)) or (x.data < 0).any():
        raise SystemExit("the source counts are not non-negative integers")
    adata.X = sp.csr_matrix(x, dtype=np.int32)
    adata.uns["source"] = (
        "Kang et al. 2018 (Nat Biotechnol 36:89-94), human PBMCs, control vs IFN-beta; "
        f"1,000 cells per condition, {adata.n_vars} most variable genes "
        "(cellvi.data._datasets.highly_variable_genes, batch_key='batch'); raw UMI counts."
    )

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(out, compression="gzip")
    size = out.stat().st_size
    print(f"wrote {out}: {adata.n_obs} cells x {adata.n_vars} genes, nnz={x.nnz}, {size:,} bytes")
    print(adata.obs["batch"].value_counts().to_dict())
    if size >= args.max_bytes:
        out.unlink()
        raise SystemExit(f"{size:,} bytes >= {args.max_bytes:,}: lower --n-top-genes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
