#!/usr/bin/env bash
# Create (or update) the reference environment used by the benchmarks: .bench-venv at the repo
# root, with the CPU build of torch, scvi-tools 1.4.2 and cellvi in editable mode.
#
# Idempotent: re-running it only installs what is missing. Usage (from anywhere):
#     bash benchmarks/setup_reference.sh
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BENCH_VENV:-$REPO_ROOT/.bench-venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.13.0"
SCVI_VERSION="1.4.2"

cd "$REPO_ROOT"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

# Pin torch for every install below so no dependency can swap it for a CUDA build
# (a bare or newer torch requirement pulls GBs of nvidia-* wheels).
CONSTRAINTS="$VENV/bench-constraints.txt"
printf 'torch==%s\n' "$TORCH_VERSION" > "$CONSTRAINTS"

# 1. torch first (the CPU wheel).
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(not torch.__version__.startswith('$TORCH_VERSION'))" 2>/dev/null; then
    echo "[setup] installing torch==$TORCH_VERSION"
    "${PIP[@]}" install "torch==$TORCH_VERSION"
fi

# 2. scvi-tools (core dependencies only: no jax, no CUDA extras) and benchmark helpers.
"${PIP[@]}" install -c "$CONSTRAINTS" "scvi-tools==$SCVI_VERSION" scikit-learn psutil

# 3. cellvi itself, editable.
"${PIP[@]}" install -c "$CONSTRAINTS" -e "$REPO_ROOT"

# 4. Sanity checks: right torch, no nvidia-* packages, scvi-tools imports without a GPU.
if "${PIP[@]}" list --format=freeze 2>/dev/null | grep -i '^nvidia-'; then
    echo "[setup] ERROR: nvidia-* packages were installed into $VENV" >&2
    exit 1
fi
CUDA_VISIBLE_DEVICES="" "$VENV/bin/python" - <<'EOF'
import torch
import scvi
import cellvi

print(f"[setup] torch {torch.__version__} (cuda build: {torch.version.cuda})")
print(f"[setup] scvi-tools {scvi.__version__}")
print(f"[setup] cellvi {cellvi.__version__}")
EOF
echo "[setup] done: activate with 'source $VENV/bin/activate'"
