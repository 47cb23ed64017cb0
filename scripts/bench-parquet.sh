#!/usr/bin/env bash
# Issue 14's Parquet conversion goal: `convert` of a Parquet file against arrow-rs's Parquet
# reader only decoding the same file, in the same run, alternating (decode, convert, decode,
# convert, ...) so that load from other processes falls on both alike; each measurement is its
# own process (examples/parquet_convert.rs), so each reports its own peak RSS. Prints every
# measurement as JSON, then the median and range of each mode's MB/s and peak RSS, and the
# ratio of the medians. docs/BENCHMARKS.md ("Issue 14: variable-length data") has the figures.
# Works from any directory; honours CARGO_TARGET_DIR.
#   scripts/bench-parquet.sh [DIR]    (default DIR: $TMPDIR or /tmp, ciphershard-i14-bench)
#   ROUNDS (default 5): pairs of measurements; TOTAL_MB (default 400) and GROUP_MB (default
#   128): the generated file's uncompressed size and row-group size (written once, kept in DIR;
#   delete it to change them); OUT (default /dev/shm/ciphershard-i14-convert): convert's
#   output directory, in memory so the figure is the converter's, not the disk's.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-${TMPDIR:-/tmp}/ciphershard-i14-bench}
out=${OUT:-/dev/shm/ciphershard-i14-convert}
rounds=${ROUNDS:-5}
(cd "$root" && cargo build -q --release --example parquet_convert)
bin=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')/release/examples/parquet_convert
mkdir -p "$dir"
file=$dir/tokens.parquet
[ -f "$file" ] || "$bin" gen "$file" "${TOTAL_MB:-400}" "${GROUP_MB:-128}"
cat "$file" >/dev/null # page cache hot
log=$dir/parquet-bench.jsonl
: >"$log"
for _ in $(seq "$rounds"); do
    "$bin" decode "$file" | tee -a "$log"
    "$bin" convert "$file" "$out" | tee -a "$log"
done
rm -rf "$out"
python3 - "$log" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1])]
med = {}
for mode in ("decode", "convert"):
    r = [x for x in runs if x["mode"] == mode]
    mbs = sorted(x["mb_per_s"] for x in r)
    rss = sorted(x["peak_rss_mb"] for x in r)
    med[mode] = statistics.median(mbs)
    print(f"{mode:8} MB/s median {med[mode]:7.1f}  range {mbs[0]:.1f}-{mbs[-1]:.1f}   "
          f"peak RSS MB median {statistics.median(rss):.0f}  range {rss[0]:.0f}-{rss[-1]:.0f}  "
          f"({len(r)} runs, {r[0]['arrow_bytes'] / 1e6:.0f} MB of Arrow data)")
ratios = sorted(c["mb_per_s"] / d["mb_per_s"] for d, c in
                zip([x for x in runs if x["mode"] == "decode"], [x for x in runs if x["mode"] == "convert"]))
print(f"convert / decode: ratio of medians {med['convert'] / med['decode']:.2f}; "
      f"per round median {statistics.median(ratios):.2f}, range {ratios[0]:.2f}-{ratios[-1]:.2f}")
EOF
