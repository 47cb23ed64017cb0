#!/usr/bin/env bash
# Builds the Python binding (python/, PyO3 + maturin) into a virtual environment and runs its
# pytest suite. Idempotent: the venv (py-venv in cargo's target directory, $CARGO_TARGET_DIR when
# set) and what is installed in it are reused.
#
# Installs from PyPI: maturin, pytest, mypy (stubtest), cryptography (the independent
# golden-format reader), numpy (required: NumPy's DLPack import is the zero-copy path every run
# checks), pyarrow + datasets (convert from Arrow tables, Parquet and Hugging Face datasets;
# about 15 s), torch + torchdata (the PyTorch tests: from_dlpack, DataLoader, StatefulDataLoader)
# and jax (CPU, about 80 MB). PyPI's Linux torch wheel pulls the
# CUDA libraries (about 2.8 GB download, 5.4 GB installed, about a minute here) and runs on
# machines without a GPU. CIPHERSHARD_PY_TORCH=0 / CIPHERSHARD_PY_JAX=0 skip them: those tests
# are then skipped and everything else still runs. Extra arguments go to pytest.
set -euo pipefail
. "$(dirname "$0")/target-dir.sh"
cd "$(dirname "$0")/.."
venv="$(cargo_target_dir)/py-venv"
py="$venv/bin/python"

step() { printf '\n==> %s\n' "$*"; }

step "python venv ($venv)"
if [ ! -x "$py" ]; then
  python3 -m venv "$venv"
fi
if ! "$py" -c 'import maturin, pytest, numpy, mypy, cryptography' 2>/dev/null; then
  "$py" -m pip install -q --upgrade pip
  "$py" -m pip install -q 'maturin>=1.9.4,<2' pytest 'numpy>=1.23' 'mypy==2.4.*' cryptography
fi
if ! "$py" -c 'import pyarrow, datasets' 2>/dev/null; then
  "$py" -m pip install -q pyarrow datasets
fi
if [ "${CIPHERSHARD_PY_TORCH:-1}" != "0" ] && ! "$py" -c 'import torch' 2>/dev/null; then
  step "torch from PyPI (CIPHERSHARD_PY_TORCH=0 skips it)"
  "$py" -m pip install -q torch
fi
if [ "${CIPHERSHARD_PY_TORCH:-1}" != "0" ] && ! "$py" -c 'import torchdata' 2>/dev/null; then
  "$py" -m pip install -q torchdata   # StatefulDataLoader (small, pure Python)
fi

if [ "${CIPHERSHARD_PY_JAX:-1}" != "0" ] && ! "$py" -c 'import jax' 2>/dev/null; then
  step "jax from PyPI (CIPHERSHARD_PY_JAX=0 skips it)"
  "$py" -m pip install -q jax
fi

step "build the extension (maturin develop --release)"
VIRTUAL_ENV="$venv" "$venv/bin/maturin" develop --release --manifest-path python/Cargo.toml 2>&1

step "type stubs match the extension (mypy stubtest)"
cd python
"$py" -m mypy.stubtest ciphershard._ciphershard

step "pytest python/tests"
"$py" -m pytest -q -p no:cacheprovider tests "$@"
