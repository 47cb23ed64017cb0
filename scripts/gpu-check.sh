#!/usr/bin/env bash
# CUDA check for a lent GPU machine (no cargo, no network there): runs prebuilt binaries only,
# finishes in under 6 minutes, and prints a markdown table last. A failing step still lets the
# others run.
#
# Here (with cargo and NVRTC), assemble the binaries:   scripts/gpu-check.sh --prepare [DIR]
#   builds release binaries with --features cuda and copies into DIR (default .gpu/):
#   cuda_bench, cuda_conformance, kernels_sm90.ptx (used only where NVRTC is missing).
# On the GPU machine:                                    scripts/gpu-check.sh [DIR]
#   DIR defaults to $CIPHERSHARD_GPU_BIN, else .gpu
set -u
if [ "${1:-}" = "--prepare" ]; then
    set -e
    dir=${2:-.gpu}
    root=$(cd "$(dirname "$0")/.." && pwd)
    cd "$root"
    nvrtc_lib=$(ls -d .venv/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -1 || true)
    if [ -n "$nvrtc_lib" ]; then export LD_LIBRARY_PATH="$root/$nvrtc_lib:${LD_LIBRARY_PATH:-}"; fi
    cargo build --release --no-default-features --features cuda --example cuda_bench
    test_bin=$(cargo test --release --no-default-features --features cuda --test cuda_conformance --no-run \
        --message-format=json 2>/dev/null | sed -n 's/.*"executable":"\([^"]*cuda_conformance[^"]*\)".*/\1/p' | tail -1)
    mkdir -p "$dir"
    cp target/release/examples/cuda_bench "$dir/cuda_bench"
    cp "$test_bin" "$dir/cuda_conformance"
    # PTX from NVRTC 13.0 (PTX ISA the 580 driver accepts), for a machine without libnvrtc.
    "$dir/cuda_bench" --emit-ptx sm_90 "$dir/kernels_sm90.ptx"
    strip --strip-debug "$dir/cuda_bench" "$dir/cuda_conformance" 2>/dev/null || true
    du -sh "$dir"/*
    exit 0
fi

BIN=${1:-${CIPHERSHARD_GPU_BIN:-.gpu}}
declare -a rows
row() { rows+=("| $1 | $2 |"); }

# The driver may live outside the loader's default path (e.g. /usr/local/nvidia).
export PATH="$PATH:/usr/local/nvidia/bin"
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so'; then
    for d in /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib/x86_64-linux-gnu /usr/lib64; do
        if ls "$d"/libcuda.so* >/dev/null 2>&1; then export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; break; fi
    done
fi

echo "== nvidia-smi"
smi=$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.max,pcie.link.width.max \
    --format=csv,noheader 2>&1) && row "nvidia-smi" "$smi" || row "nvidia-smi" "FAILED: $smi"
echo "$smi"

# Kernel source: the prebuilt PTX (NVRTC 13.0 output, PTX ISA 9.0, which driver 580 loads) by
# default, since a newer NVRTC on the machine could emit PTX the driver rejects; set
# GPU_CHECK_USE_NVRTC=1 to compile at run time with the machine's NVRTC instead.
for d in /usr/local/cuda/lib64 /usr/local/cuda-13*/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
    if ls "$d"/libnvrtc.so* >/dev/null 2>&1; then export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"; break; fi
done
has_nvrtc=no
if ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so' || ls $(echo "${LD_LIBRARY_PATH:-}" | tr ":" " ") 2>/dev/null | grep -q '^libnvrtc\.so'; then
    has_nvrtc=yes
fi
if [ "${GPU_CHECK_USE_NVRTC:-0}" != 1 ] && [ -f "$BIN/kernels_sm90.ptx" ]; then
    export CIPHERSHARD_CUDA_PTX="$BIN/kernels_sm90.ptx"
    row "kernel source" "prebuilt PTX $CIPHERSHARD_CUDA_PTX (NVRTC on this machine: $has_nvrtc)"
elif [ $has_nvrtc = yes ]; then
    row "kernel source" "NVRTC at run time"
else
    row "kernel source" "MISSING: no NVRTC and no $BIN/kernels_sm90.ptx"
fi

echo "== CUDA conformance + batch tests (every CTR kernel variant)"
if [ -x "$BIN/cuda_conformance" ]; then
    out=$(timeout 100 "$BIN/cuda_conformance" --test-threads=1 --nocapture 2>&1); rc=$?
    echo "$out" | tail -20
    if [ $rc -eq 0 ] && ! echo "$out" | grep -q SKIPPED; then
        row "CUDA conformance suite + batch tests (all CTR variants, staged batches)" "PASS"
    else
        row "CUDA conformance suite + batch tests (all CTR variants, staged batches)" "FAIL (rc $rc): $(echo "$out" | grep -E 'SKIPPED|panicked|FAIL' | head -2 | tr '|\n' '/ ')"
    fi
else
    row "CUDA conformance suite + batch tests (all CTR variants, staged batches)" "MISSING $BIN/cuda_conformance"
fi

echo "== kernel / H2D / end-to-end benchmark"
bench_table=""
if [ -x "$BIN/cuda_bench" ]; then
    # Conformance once per AES-CTR kernel variant, then every variant's figures (each checked
    # against the CPU on its own output), then end to end with the fastest verified variant:
    # old path (pageable -> pinned staging) and new path (file pread -> pinned staging).
    out=$(timeout 230 "$BIN/cuda_bench" 4 2 2>&1); rc=$?
    echo "$out"
    bench_table=$(echo "$out" | grep '^|')
    while IFS= read -r l; do row "conformance per CTR variant" "$l"; done < <(echo "$out" | grep '^conformance (' | tr '|' '/')
    [ $rc -eq 0 ] && row "cuda_bench (conformance + figures)" "PASS" \
        || row "cuda_bench (conformance + figures)" "FAIL (rc $rc): $(echo "$out" | grep -iE 'fail|error|panicked|not available' | head -2 | tr '|\n' '/ ')"
else
    row "cuda_bench" "MISSING $BIN/cuda_bench"
fi
# The lead adds here: "$BIN/ciphershard" bench --backend cuda ...

echo
echo "## GPU check $(date -u +%Y-%m-%dT%H:%MZ)"
echo
echo "| step | result |"
echo "|---|---|"
printf '%s\n' "${rows[@]}"
if [ -n "$bench_table" ]; then
    echo
    echo "$bench_table"
fi
