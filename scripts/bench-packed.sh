#!/usr/bin/env bash
# Issue 14's packed-batch goal: `ciphershard bench --pack` (encrypted, and its plaintext twin
# through the same loader, CPU backend) against scripts/peer_packed.py (pyarrow + NumPy on the
# plaintext Parquet file), alternating (bench, peer, bench, peer, ...) so that load from other
# processes falls on both alike. The data: the Parquet file scripts/bench-parquet.sh writes
# (written here the same way if absent), converted once with the CLI. Prints every run's
# tokens/s, then the median and range of encrypted, twin and peer tokens/s and of the ratios.
# docs/BENCHMARKS.md ("Issue 14: variable-length data") has the figures.
# Works from any directory; honours CARGO_TARGET_DIR.
#   scripts/bench-packed.sh [DIR]    (default DIR: $TMPDIR or /tmp, ciphershard-i14-bench)
#   ROUNDS (default 5); THREADS (default 2): loader worker threads and peer prefetch threads;
#   SEQ_LEN (2048), BATCH (8), EPOCHS (2); PYTHON (default python3): one with pyarrow and numpy.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-${TMPDIR:-/tmp}/ciphershard-i14-bench}
rounds=${ROUNDS:-5} threads=${THREADS:-2} seq=${SEQ_LEN:-2048} batch=${BATCH:-8}
epochs=${EPOCHS:-2} py=${PYTHON:-python3}
(cd "$root" && cargo build -q --release --bin ciphershard --example parquet_convert)
tdir=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release
mkdir -p "$dir"
file=$dir/tokens.parquet ds=$dir/tokens-ds key=$dir/tokens.key
[ -f "$file" ] || "$tdir/examples/parquet_convert" gen "$file" "${TOTAL_MB:-400}" "${GROUP_MB:-128}"
[ -f "$key" ] || "$tdir/ciphershard" keygen --out "$key"
[ -f "$ds/manifest.json" ] || { rm -rf "$ds"; "$tdir/ciphershard" convert --key "$key" "$file" --out "$ds"; }
cat "$file" "$ds"/* >/dev/null # page cache hot
log=$dir/packed-bench.jsonl
: >"$log"
for _ in $(seq "$rounds"); do
    "$tdir/ciphershard" bench "$ds" --key "$key" --backend cpu --threads "$threads" \
        --pack input_ids --seq-len "$seq" --batch-size "$batch" --epochs "$epochs" --json |
        python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)))' |
        tee -a "$log" | cut -c1-160
    "$py" "$root/scripts/peer_packed.py" "$file" --seq-len "$seq" --batch-size "$batch" \
        --threads "$threads" --epochs "$epochs" --json | tee -a "$log" | cut -c1-160
done
python3 - "$log" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
bench = [r for r in runs if "encrypted" in r]
peer = [r for r in runs if r.get("schema") == "peer_packed/1"]
tok = lambda run, r: run["batches_per_s"] * r["tokens_per_batch"]
series = {
    "encrypted": [tok(r["encrypted"], r) for r in bench],
    "twin": [tok(r["plaintext_twin"], r) for r in bench],
    "peer": [r["tokens_per_s"] for r in peer],
    "peer incl. load": [r["tokens_per_s_with_load"] for r in peer],
}
def show(name, xs, scale=1e6, unit="M tokens/s"):
    s = sorted(xs)
    print(f"{name:22} median {statistics.median(s) / scale:8.2f}  range "
          f"{s[0] / scale:.2f}-{s[-1] / scale:.2f} {unit} ({len(s)} runs)")
for k, v in series.items():
    show(k, v)
for name, a, b in [("encrypted / twin", "encrypted", "twin"), ("encrypted / peer", "encrypted", "peer"),
                   ("encrypted / peer+load", "encrypted", "peer incl. load")]:
    show(name, [x / y for x, y in zip(series[a], series[b])], 1, "(per round)")
EOF
