#!/usr/bin/env python3
"""Table and chart of scripts/bench-s3.sh's runs: the CPU loader's GB/s over a store URL against
CIPHERSHARD_STORE_IN_FLIGHT at each added first-byte latency, beside the same dataset from
local page-cache files (median of the local runs of the same latency's rounds).

    scripts/plot_bench_s3.py RUNS.jsonl OUT.svg     (matplotlib; the table is printed)
"""
import json
import statistics
import sys
from collections import defaultdict

runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
out = sys.argv[2]

local = defaultdict(list)  # (latency, threads) -> GB/s
remote = defaultdict(list)  # (latency, threads, in_flight) -> runs
for r in runs:
    if r["source"] == "local":
        local[(r["latency_ms"], r["threads"])].append(r["gb_per_s"])
    else:
        remote[(r["latency_ms"], r["threads"], r["in_flight"])].append(r)

print("| added latency | threads | in flight | GB/s median (range) | local GB/s median "
      "| ratio to local | TTFB p50 / p99 ms | bytes fetched / dataset |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for (lat, th, fl), rs in sorted(remote.items()):
    g = sorted(r["gb_per_s"] for r in rs)
    loc = statistics.median(local[(lat, th)]) if local[(lat, th)] else float("nan")
    p50 = statistics.median(r["ttfb_p50_ms"] for r in rs)
    p99 = statistics.median(r["ttfb_p99_ms"] for r in rs)
    amp = statistics.median(r["amplification"] for r in rs)
    print(f"| {lat} ms | {th} | {fl} | {statistics.median(g):.3f} ({g[0]:.3f}–{g[-1]:.3f}) "
          f"| {loc:.3f} | {statistics.median(g) / loc:.2f} | {p50:.1f} / {p99:.1f} | {amp:.3f} |")

import matplotlib  # noqa: E402

matplotlib.use("svg")
import matplotlib.pyplot as plt  # noqa: E402

fig, ax = plt.subplots(figsize=(7, 4.2))
threads = min(th for (_, th, _) in remote)
server = next(iter(remote.values()))[0]["source"]  # s3s-fs or nginx (scripts/bench-s3.sh SERVER)
lats = sorted({lat for (lat, th, _) in remote if th == threads})
colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
for i, lat in enumerate(lats):
    pts = sorted((fl, statistics.median(r["gb_per_s"] for r in rs))
                 for (l, th, fl), rs in remote.items() if l == lat and th == threads)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=colors[i % len(colors)],
            label=f"{server} + {lat} ms first byte")
    if local[(lat, threads)]:
        ax.axhline(statistics.median(local[(lat, threads)]), color=colors[i % len(colors)],
                   ls=":", lw=1)
ax.axhline(float("nan"), color="grey", ls=":", lw=1, label="local page-cache files (same round)")
ax.set_xscale("log", base=2)
ax.set_xlabel("CIPHERSHARD_STORE_IN_FLIGHT")
ax.set_ylabel("delivered GB/s (CPU loader, encrypted)")
ax.set_title(f"ciphershard bench over {server} + latency proxy, {threads} threads")
ax.set_ylim(bottom=0)
ax.legend(fontsize=8)
ax.grid(alpha=0.3)
fig.tight_layout()
fig.savefig(out, metadata={"Date": None})
print(f"chart: {out}")
