#!/usr/bin/env bash
# Bounded coverage-guided fuzzing of every fuzz target (fuzz/fuzz_targets/*.rs: the header /
# descriptor / manifest / keyring / NPY parsers, the whole open path of a dataset directory,
# convert's safetensors and NPY inputs, its Parquet, Arrow IPC and JSONL inputs, and
# convert-to-loader end to end) with libFuzzer on the stable
# toolchain; scripts/fuzz-common.sh says how. The time budget is shared by the targets; seeds
# are the golden dataset and fuzz/seeds. Any finding fails the run.
# Works from any directory; honours CARGO_TARGET_DIR.
#   FUZZ_SECONDS (default 35): total fuzzing time, split evenly (at least 1 s each).
set -euo pipefail
source "$(dirname "$0")/fuzz-common.sh"
fuzz_build
lay_seeds
n=$(echo "$targets" | wc -w)
each=$(( ${FUZZ_SECONDS:-35} / n ))
[ "$each" -ge 1 ] || each=1
status=0
for t in $targets; do
    run_target "$t" -max_total_time="$each" || status=1
done
exit $status
