#!/usr/bin/env bash
# Runs every test suite. On a fresh machine it first installs what the tests need:
#   - Mesa's lavapipe (CPU Vulkan driver) so the wgpu backend runs for real;
#   - NVRTC from PyPI so the CUDA kernels are compiled (no GPU needed) and a kernel that does
#     not compile fails the run;
#   - a Python venv with maturin, pytest, numpy, torch and jax for the binding's tests
#     (scripts/test-python.sh; CIPHERSHARD_PY_TORCH=0 / CIPHERSHARD_PY_JAX=0 skip those two);
#   - s3s-fs, an S3-compatible server from crates.io, for tests/store_s3.rs and store_write.rs;
#   - moto's S3 server (PyPI, in the same venv as NVRTC) for tests/store_write.rs's conditional
#     rekey (s3s-fs ignores If-Match on PUT; moto honours it).
# Idempotent: what is already there is not installed again.
set -euo pipefail
. "$(dirname "$0")/target-dir.sh"
cd "$(dirname "$0")/.."
tdir=$(cargo_target_dir)   # $CARGO_TARGET_DIR when set, else target/

step() { printf '\n==> %s\n' "$*"; }

step "system packages (lavapipe)"
bash scripts/install-lavapipe.sh

step "NVRTC for the CUDA kernel compile test"
venv="$tdir/ci-venv"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import nvidia.cu13' 2>/dev/null; then
  # 13.0 matches the CUDA 13.0 driver of the GPU machines (a newer NVRTC emits PTX they reject).
  "$venv/bin/pip" install -q 'nvidia-cuda-nvrtc==13.0.*'
fi
nvrtc_lib=$("$venv/bin/python" -c 'import nvidia.cu13, os; print(os.path.join(list(nvidia.cu13.__path__)[0], "lib"))')
export LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CIPHERSHARD_REQUIRE_NVRTC=1
export CIPHERSHARD_REQUIRE_WGPU=1
# lavapipe complains on every test without a runtime dir; give it a private one.
if [ -z "${XDG_RUNTIME_DIR:-}" ] || [ ! -d "${XDG_RUNTIME_DIR}" ]; then
  export XDG_RUNTIME_DIR="$tdir/xdg-runtime"
  mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"
fi

step "S3-compatible server for the object-store tests (s3s-fs)"
# Built from crates.io once, in its own target directory (not the project's: its lock file and
# features are its own), and found by tests/store_s3.rs at TARGET/s3s-fs/bin/s3s-fs.
# 0.14.1: the newest release that builds with the toolchain here (0.17 needs Rust 1.96).
if [ ! -x "$tdir/s3s-fs/bin/s3s-fs" ]; then
  CARGO_TARGET_DIR="$tdir/s3s-fs-build" cargo install -q s3s-fs@0.14.1 --features binary \
    --locked --root "$tdir/s3s-fs"
  rm -rf "$tdir/s3s-fs-build"
fi
export CIPHERSHARD_S3S_FS="$tdir/s3s-fs/bin/s3s-fs"

step "moto's S3 server for the conditional-write test"
if ! "$venv/bin/python" -c 'import moto.server, boto3' 2>/dev/null; then
  "$venv/bin/pip" install -q 'moto[server]>=5,<6'
fi
export CIPHERSHARD_MOTO_PYTHON="$venv/bin/python"

step "cargo test (all features)"
cargo test --all-features --release --no-fail-fast 2>&1

step "cargo test (no default features: CPU only, stub GPU modules)"
cargo test --no-default-features --release --lib 2>&1

step "fuzz smoke: header/manifest/keyring/NPY and Parquet/Arrow/JSONL parsers, 30 s of libFuzzer"
FUZZ_SECONDS=${FUZZ_SECONDS:-30} bash scripts/fuzz-smoke.sh

step "Python binding: build with maturin, pytest (numpy, torch, jax)"
bash scripts/test-python.sh
