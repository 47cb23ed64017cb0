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
    . "$(dirname "$0")/target-dir.sh"
    root=$(cd "$(dirname "$0")/.." && pwd)
    dir=$(realpath -m -- "${2:-$root/.gpu}")   # a relative DIR: relative to where we started
    cd "$root"
    tdir=$(cargo_target_dir)   # $CARGO_TARGET_DIR when set, else target/
    nvrtc_lib=$(ls -d "$root"/.venv/lib/python3*/site-packages/nvidia/cu13/lib "$tdir"/ci-venv/lib/python3*/site-packages/nvidia/cu13/lib 2>/dev/null | head -1 || true)
    if [ -n "$nvrtc_lib" ]; then export LD_LIBRARY_PATH="$nvrtc_lib:${LD_LIBRARY_PATH:-}"; fi
    # One feature set for everything, so nothing is built twice.
    feats=(--release --all-features)
    cargo build "${feats[@]}" --example cuda_bench --bin ciphershard
    test_exe() {  # path of a test binary, built
        cargo test "${feats[@]}" --test "$1" --no-run --message-format=json 2>/dev/null \
            | sed -n 's/.*"executable":"\([^"]*\/'"$1"'-[^"]*\)".*/\1/p' | tail -1
    }
    mkdir -p "$dir"
    cp "$tdir/release/examples/cuda_bench" "$dir/cuda_bench"
    cp "$tdir/release/ciphershard" "$dir/ciphershard"
    for t in cuda_conformance wgpu_backend loader_cuda loader_wgpu; do
        if [ -f "tests/$t.rs" ]; then cp "$(test_exe "$t")" "$dir/$t"; fi
    done
    # PTX from NVRTC 13.0 (PTX ISA the 580 driver accepts), for a machine without libnvrtc.
    "$dir/cuda_bench" --emit-ptx sm_90 "$dir/kernels_sm90.ptx"
    strip --strip-debug "$dir"/* 2>/dev/null || true
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
    out=$(timeout 230 "$BIN/cuda_bench" 2 1 2>&1); rc=$?
    echo "$out"
    bench_table=$(echo "$out" | grep '^|')
    while IFS= read -r l; do row "conformance per CTR variant" "$l"; done < <(echo "$out" | grep '^conformance (' | tr '|' '/')
    [ $rc -eq 0 ] && row "cuda_bench (conformance + figures)" "PASS" \
        || row "cuda_bench (conformance + figures)" "FAIL (rc $rc): $(echo "$out" | grep -iE 'fail|error|panicked|not available' | head -2 | tr '|\n' '/ ')"
else
    row "cuda_bench" "MISSING $BIN/cuda_bench"
fi

echo "== loader into device memory (CUDA)"
if [ -x "$BIN/loader_cuda" ]; then
    out=$(timeout 60 "$BIN/loader_cuda" --test-threads=1 --nocapture 2>&1); rc=$?
    echo "$out" | tail -15
    if [ $rc -eq 0 ] && ! echo "$out" | grep -q SKIPPED; then row "loader device batches vs CPU loader, tamper" "PASS"
    else row "loader device batches vs CPU loader, tamper" "FAIL (rc $rc): $(echo "$out" | grep -E 'SKIPPED|panicked|FAIL' | head -2 | tr '|\n' '/ ')"; fi
fi
if [ -x "$BIN/ciphershard" ]; then
    out=$(timeout 150 "$BIN/ciphershard" bench --backend cuda --threads 8 --epochs 20 --batch-size 1024 --json 2>&1); rc=$?
    echo "$out" > "${OUT:-/tmp}/bench-cuda.json"
    echo "$out" | grep -E '"(backend|gb_per_s|ratio|steady_gb_per_s|steady_ratio|setup_seconds|first_batch_seconds|windows|read_ns|gpu_wait_ns|window_wait_ns|gather_ns|batch_sync_ns|send_wait_ns|ctr_gbps|ctr_ghash_gbps|e2e_[a-z_]*gbps)"' | head -40
    [ $rc -eq 0 ] && row "ciphershard bench --backend cuda" "$(echo "$out" | tr -d ' \n' | grep -oE '"(steady_gb_per_s|ratio|steady_ratio)":[0-9.]+' | head -4 | tr '\n' ' ')(full JSON in bench-cuda.json)" \
        || row "ciphershard bench --backend cuda" "FAIL (rc $rc): $(echo "$out" | tail -2 | tr '|\n' '/ ')"
fi

echo "== CPU backend loader on this machine (the baseline the GPU loaders are compared with)"
if [ -x "$BIN/ciphershard" ]; then
    out=$(timeout 90 "$BIN/ciphershard" bench --backend cpu --threads 8 --epochs 20 --batch-size 1024 --json 2>&1); rc=$?
    echo "$out" > "${OUT:-/tmp}/bench-cpu.json"
    [ $rc -eq 0 ] && row "ciphershard bench --backend cpu (8 threads)" "$(echo "$out" | tr -d ' \n' | grep -oE '"(gb_per_s|steady_gb_per_s|ratio)":[0-9.]+' | head -4 | tr '\n' ' ')" \
        || row "ciphershard bench --backend cpu" "FAIL (rc $rc): $(echo "$out" | tail -2 | tr '|\n' '/ ')"
fi
# The host loader with a GPU backend (batches in host memory, a GPU round trip per chunk):
# `auto` uses CUDA or wgpu for it only where a verified open through it beats one CPU thread
# (`ciphershard backends` says what it picked and why).
# The device tool allows 10 minutes per command: the host-batch benches (the least needed
# figures) are skipped once the run is past 7, so the table always gets printed.
host_bench() {
    [ -x "$BIN/ciphershard" ] || return
    if [ "$SECONDS" -gt 420 ]; then row "ciphershard bench --backend $1 --host-batches" "SKIPPED: ${SECONDS}s into the run"; return; fi
    local out rc
    out=$(timeout 90 "$BIN/ciphershard" bench --backend "$1" --host-batches --threads 8 --epochs 3 --batch-size 1024 --json 2>&1); rc=$?
    echo "$out" > "${OUT:-/tmp}/bench-$1-host.json"
    [ $rc -eq 0 ] && row "ciphershard bench --backend $1 --host-batches" "$(echo "$out" | tr -d ' \n' | grep -oE '"(gb_per_s|steady_gb_per_s|ratio)":[0-9.]+' | head -4 | tr '\n' ' ')" \
        || row "ciphershard bench --backend $1 --host-batches" "FAIL (rc $rc): $(echo "$out" | tail -2 | tr '|\n' '/ ')"
}
host_bench cuda

echo "== wgpu on Vulkan"
# The image may lack the Vulkan loader: unpack carried Debian packages (see the device README).
if ! ldconfig -p 2>/dev/null | grep -q libvulkan.so.1 && [ -d .gl ]; then
    for f in .gl/*.deb; do dpkg -x "$f" / 2>/dev/null; done; ldconfig 2>/dev/null
fi
icd=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
[ -f "$icd" ] && [ -z "${VK_DRIVER_FILES:-}" ] && export VK_DRIVER_FILES=$icd
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-/tmp/xdg-gpu-check}; mkdir -p "$XDG_RUNTIME_DIR"; chmod 700 "$XDG_RUNTIME_DIR"
if [ -x "$BIN/ciphershard" ]; then
    b=$(timeout 30 "$BIN/ciphershard" backends 2>&1); echo "$b"
    row "ciphershard backends" "$(echo "$b" | tr '|\n' '/;')"
fi
if [ -x "$BIN/wgpu_backend" ]; then
    out=$(CIPHERSHARD_REQUIRE_WGPU=1 timeout 90 "$BIN/wgpu_backend" --test-threads=1 2>&1); rc=$?
    echo "$out" | grep -E '^test |test result' | tail -12
    [ $rc -eq 0 ] && row "wgpu conformance + cross-backend tests" "PASS" \
        || row "wgpu conformance + cross-backend tests" "FAIL (rc $rc): $(echo "$out" | grep -E 'panicked|No adapter|not available' | head -2 | tr '|\n' '/ ')"
    # What `auto` weighs before using wgpu for host-memory work (verify, decrypt, host loader).
    hp=$(CIPHERSHARD_REQUIRE_WGPU=1 timeout 60 "$BIN/wgpu_backend" host_path_check --nocapture 2>&1 | grep -m1 'verified open of')
    row "auto's wgpu host-path check" "${hp:-FAIL (no figure)}"
fi
if [ -x "$BIN/loader_wgpu" ]; then
    out=$(CIPHERSHARD_REQUIRE_WGPU=1 timeout 90 "$BIN/loader_wgpu" --test-threads=1 2>&1); rc=$?
    echo "$out" | grep -E '^test |test result|wgpu device loader:' | tail -10
    [ $rc -eq 0 ] && row "wgpu device loader = host loader, tamper, resume" "PASS" \
        || row "wgpu device loader tests" "FAIL (rc $rc): $(echo "$out" | grep -E 'panicked' | head -2 | tr '|\n' '/ ')"
fi
if [ -x "$BIN/ciphershard" ]; then
    # The wgpu device loader (batches in wgpu::Buffers) over the bench dataset, plus kernel figures.
    # Same batch size and epochs as the CPU loader's bench above, so the steady figures compare.
    out=$(timeout 150 "$BIN/ciphershard" bench --backend wgpu --threads 8 --epochs 20 --batch-size 1024 --json 2>&1); rc=$?
    echo "$out" > "${OUT:-/tmp}/bench-wgpu.json"
    [ $rc -eq 0 ] && row "ciphershard bench --backend wgpu" "$(echo "$out" | tr -d ' \n' | grep -oE '"(gb_per_s|steady_gb_per_s|ratio|kernel_gbps|window_ctr_gbps|gather_gbps|upload_gbps|best_variant|gpu_ghash_gbps|cpu_ghash_gbps|open_gpu_ghash_gbps|open_cpu_ghash_gbps|open_gbps|adapter)":("[^"]*"|[0-9.]+)' | tr '\n' ' ')" \
        || row "ciphershard bench --backend wgpu" "FAIL (rc $rc): $(echo "$out" | tail -2 | tr '|\n' '/ ')"
    # The device loader again with the fastest kernel variant (its batch kernel takes the
    # variant's shape and unrolling; it always keeps the runtime checks). Every variant's figure
    # is in the goals table.
    best=$(echo "$out" | tr -d ' \n' | grep -oE '"best_variant":"[^"]*"' | head -1 | cut -d'"' -f4)
    if [ -n "$best" ]; then
        out=$(CIPHERSHARD_WGPU_KERNEL=$best timeout 90 "$BIN/ciphershard" bench --backend wgpu --threads 8 --epochs 20 --batch-size 1024 --no-kernel-figures --json 2>&1); rc=$?
        echo "$out" > "${OUT:-/tmp}/bench-wgpu-best.json"
        [ $rc -eq 0 ] && row "ciphershard bench --backend wgpu, kernel $best" "$(echo "$out" | tr -d ' \n' | grep -oE '"(gb_per_s|steady_gb_per_s|ratio)":[0-9.]+' | head -4 | tr '\n' ' ')" \
            || row "ciphershard bench --backend wgpu, kernel $best" "FAIL (rc $rc): $(echo "$out" | tail -2 | tr '|\n' '/ ')"
    fi
fi
host_bench wgpu

# The wgpu issue's goals and open defaults, computed from the JSON the benches wrote (python3 is
# on the usual GPU images; skipped without it).
goals=""
if command -v python3 >/dev/null && [ -d "${OUT:-/tmp}" ]; then
    goals=$(python3 - "${OUT:-/tmp}" <<'PY' 2>&1
import json, os, sys
d = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(d, name)) as f:
            return json.load(f)
    except Exception:
        return None
cuda, cpu, wg, wgb, wgh, cuh = (load(f"bench-{n}.json") for n in
                                ("cuda", "cpu", "wgpu", "wgpu-best", "wgpu-host", "cuda-host"))
steady = lambda r: r["encrypted"]["steady_gb_per_s"] if r else None
rows = []
if cuda and wg and "kernels" in cuda and "kernels" in wg:
    c, w = cuda["kernels"]["ctr_gbps"], wg["kernels"]["kernel_gbps"]
    rows.append(("wgpu kernel / CUDA kernel (goal >= 0.5)",
                 f"{w:.1f} / {c:.1f} GB/s = {w / c:.2f} ({wg['kernels']['best_variant']})"))
if wg and "kernels" in wg:
    rows.append(("wgpu kernel variants, fastest first (GB/s)",
                 ", ".join(f"{v['variant']} {v['gbps']:.3g}" for v in
                           sorted(wg["kernels"]["variants"], key=lambda v: -v["gbps"]))))
if wg and "kernels" in wg:
    k = wg["kernels"]
    rows.append(("wgpu open: CPU vs GPU tag check (the backend's setting here, GPU: "
                 f"{k['gpu_ghash_default']})",
                 f"{k['open_cpu_ghash_gbps']:.2f} vs {k['open_gpu_ghash_gbps']:.2f} GB/s"))
if wg and cpu:
    rows.append(("wgpu device loader / CPU loader, steady (goal >= 1)",
                 f"{steady(wg):.2f} / {steady(cpu):.2f} GB/s = {steady(wg) / steady(cpu):.2f}"))
if wgb and cpu and wg and "kernels" in wg:
    rows.append((f"wgpu device loader, kernel {wg['kernels']['best_variant']} / CPU loader, steady",
                 f"{steady(wgb):.2f} / {steady(cpu):.2f} GB/s = {steady(wgb) / steady(cpu):.2f}"))
if wgh and cpu:
    rows.append(("wgpu host loader / CPU loader, steady (auto's host path)",
                 f"{steady(wgh):.2f} / {steady(cpu):.2f} GB/s = {steady(wgh) / steady(cpu):.2f}"))
if cuh and cpu:
    rows.append(("CUDA host loader / CPU loader, steady (auto times CUDA's host path too)",
                 f"{steady(cuh):.2f} / {steady(cpu):.2f} GB/s = {steady(cuh) / steady(cpu):.2f}"))
for name, value in rows:
    print(f"| {name} | {value} |")
PY
)
fi

echo
echo "## GPU check $(date -u +%Y-%m-%dT%H:%MZ) (${SECONDS}s)"
echo
echo "| step | result |"
echo "|---|---|"
printf '%s\n' "${rows[@]}"
if [ -n "$goals" ]; then
    echo
    echo "| goal / default | measured |"
    echo "|---|---|"
    echo "$goals"
fi
if [ -n "$bench_table" ]; then
    echo
    echo "$bench_table"
fi
