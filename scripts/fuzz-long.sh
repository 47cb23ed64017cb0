#!/usr/bin/env bash
# A long fuzzing campaign: runs each named target (default: all of them) for a number of
# executions or a time, one after the other, on its corpus kept between runs, and prints per
# target the executions, coverage (libFuzzer's cov: edges and ft: features) and findings
# (files under $CARGO_TARGET_DIR/fuzz-findings/TARGET/; the log is fuzz-logs/TARGET.log).
# A target stops at its first finding; the others still run. Exit status 1 if any found one.
# Works from any directory; honours CARGO_TARGET_DIR (default fuzz/target).
#   scripts/fuzz-long.sh [TARGET...] [--runs N | --seconds S] [-- LIBFUZZER-ARGS...]
#   e.g. scripts/fuzz-long.sh parse open_path --runs 10000000
#        scripts/fuzz-long.sh --seconds 3600 -- -jobs=4 -workers=4
set -euo pipefail
source "$(dirname "$0")/fuzz-common.sh"
usage() { sed -n '2,11s/^# \{0,1\}//p' "$0" >&2; exit 2; }
chosen=() limit=() extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --runs) [ $# -ge 2 ] || usage; limit=(-runs="$2"); shift 2 ;;
        --seconds) [ $# -ge 2 ] || usage; limit=(-max_total_time="$2"); shift 2 ;;
        --) shift; extra=("$@"); break ;;
        -h|--help) usage ;;
        -*) usage ;;
        *) echo "$targets" | grep -qx "$1" || { echo "unknown target '$1' (targets: $(echo $targets))" >&2; exit 2; }
           chosen+=("$1"); shift ;;
    esac
done
[ ${#limit[@]} -gt 0 ] || { echo "give --runs N or --seconds S" >&2; usage; }
[ ${#chosen[@]} -gt 0 ] || read -r -a chosen <<<"$(echo $targets)"
fuzz_build
lay_seeds
status=0
for t in "${chosen[@]}"; do
    run_target "$t" "${limit[@]}" "${extra[@]}" || status=1
done
exit $status
