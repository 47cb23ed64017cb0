# Sourced by scripts/fuzz-smoke.sh and scripts/fuzz-long.sh: builds every fuzz target with
# libFuzzer on the stable toolchain (SanitizerCoverage switched on through -C passes /
# -C llvm-args: what cargo-fuzz does, minus nightly-only ASan, which safe Rust does not need),
# lays out the seed corpora, and defines run_target. Works from any directory and honours
# CARGO_TARGET_DIR (relative to the caller's directory, as cargo reads it): the fuzz crate's
# binaries, corpora, logs and findings all live under it (default: fuzz/target).
#   After sourcing: $root, $tdir, $targets (every fuzz target), fuzz_build, run_target.

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
    case "$CARGO_TARGET_DIR" in
        /*) tdir=$CARGO_TARGET_DIR ;;
        *) tdir=$PWD/$CARGO_TARGET_DIR ;;
    esac
else
    tdir=$root/fuzz/target
fi
export CARGO_TARGET_DIR=$tdir
triple=$(rustc -vV | sed -n 's/^host: //p')
bindir=$tdir/$triple/release
# Every [[bin]] of fuzz/Cargo.toml, in file order.
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' "$root/fuzz/Cargo.toml" | grep -v '^ciphershard-fuzz$')

fuzz_build() {
    # --target keeps these flags off build scripts and proc macros.
    (cd "$root/fuzz" && RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks" \
        cargo build -q --release --target "$triple")
}

# Seeds, rebuilt on every run (small: a few KiB per target).
#   parse:     one input per parser, prefixed by its selector byte (fuzz_targets/parse.rs);
#   open_path: the golden dataset's files joined by the target's separator;
#   others:    the files in fuzz/seeds/TARGET/ (a few hundred bytes each, up to 1.5 KiB for
#              records' Parquet and Arrow files; their targets say what they hold).
lay_seeds() {
    local g=$root/tests/golden/dataset s=$tdir/fuzz-seeds t
    rm -rf "$s" && mkdir -p "$s/parse" "$s/open_path"
    for t in $targets; do
        if [ -d "$root/fuzz/seeds/$t" ]; then
            mkdir -p "$s/$t" && cp "$root/fuzz/seeds/$t"/* "$s/$t/"
        fi
    done
    { printf '\000'; cat "$g/shard-00000.safetensors"; } >"$s/parse/header"
    { printf '\001'; cat "$g/manifest.json"; } >"$s/parse/manifest"
    { printf '\002'; cat "$g/keyring.json"; } >"$s/parse/keyring"
    # The golden descriptor string, as docs/FORMAT.md's worked example prints it.
    { printf '\004'; sed -n 's/^   \({"format":"ciphershard",.*}\)$/\1/p' "$root/docs/FORMAT.md" | head -1 | tr -d '\n'; } >"$s/parse/descriptor"
    local sep=$'\n--ciphershard-fuzz--\n'
    { cat "$g/manifest.json"; printf '%s' "$sep"; cat "$g/keyring.json"; printf '%s' "$sep"
      cat "$g/shard-00000.safetensors"; printf '%s' "$sep"; cat "$g/shard-00001.safetensors"; } \
        >"$s/open_path/golden"
}

# run_target NAME LIBFUZZER-ARGS...: runs one target on its corpus (kept between runs under
# $tdir/fuzz-corpus/NAME, seeded from $tdir/fuzz-seeds/NAME), findings under
# $tdir/fuzz-findings/NAME/, log in $tdir/fuzz-logs/NAME.log; prints one summary line
# (executions, coverage, findings) and returns non-zero if the target found something.
run_target() {
    local name=$1
    shift
    local corpus=$tdir/fuzz-corpus/$name seeds=$tdir/fuzz-seeds/$name
    local findings=$tdir/fuzz-findings/$name log=$tdir/fuzz-logs/$name.log
    mkdir -p "$corpus" "$seeds" "$findings" "$(dirname "$log")"
    # Scratch space for targets that write files (open_path): in memory where possible.
    local scratch
    scratch=$(mktemp -d /dev/shm/ciphershard-fuzz.XXXXXX 2>/dev/null || mktemp -d)
    local rc=0
    CIPHERSHARD_FUZZ_DIR=$scratch "$bindir/$name" "$@" -rss_limit_mb=2048 -timeout=10 \
        -print_final_stats=1 -artifact_prefix="$findings/" "$corpus" "$seeds" >"$log" 2>&1 || rc=$?
    rm -rf "$scratch"
    local execs cov ft found
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
    found=$(find "$findings" -type f | wc -l)
    printf '%-10s %12s execs  cov %6s  ft %6s  findings %s%s\n' "$name" "${execs:-?}" \
        "${cov:-?}" "${ft:-?}" "$found" "$([ "$rc" = 0 ] || echo "  (exit $rc, see $log)")"
    if [ "$rc" != 0 ]; then
        grep -m1 -A12 -E 'panicked|==ERROR|deadly signal|Timeout|out-of-memory' "$log" || tail -20 "$log"
        return 1
    fi
}
