#!/usr/bin/env bash
# Bounded coverage-guided fuzzing of the header / manifest / keyring / NPY parsers
# (fuzz/fuzz_targets/parse.rs) with libFuzzer on the stable toolchain: SanitizerCoverage is
# switched on through -C passes / -C llvm-args (what cargo-fuzz does, minus nightly-only ASan,
# which safe Rust does not need). Seeds: the golden shards. Any crash fails the run.
#   FUZZ_SECONDS (default 30)
set -euo pipefail
. "$(dirname "$0")/target-dir.sh"
cd "$(dirname "$0")/../fuzz"
tdir=$(cargo_target_dir)   # $CARGO_TARGET_DIR when set, else fuzz/target
target=x86_64-unknown-linux-gnu
# --target keeps these flags off build scripts and proc macros.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
cargo build -q --release --target "$target"
corpus="$tdir/corpus-parse"
mkdir -p "$corpus"
cp -n ../tests/golden/dataset/*.safetensors ../tests/golden/dataset/*.json "$corpus"/ 2>/dev/null || true
"$tdir/$target/release/parse" -max_total_time="${FUZZ_SECONDS:-30}" -rss_limit_mb=2048 \
    -artifact_prefix="$tdir/" "$corpus" 2>&1 | tail -3
