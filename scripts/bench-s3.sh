#!/usr/bin/env bash
# Issue 15's object-storage goal: the CPU host loader (`ciphershard bench`, release build) over
# a dataset served by a real S3-compatible server (s3s-fs) behind the latency proxy
# (examples/s3_latency_proxy.rs: a fixed added first-byte latency on every answer, simulating
# a cloud store), at each added latency and CIPHERSHARD_STORE_IN_FLIGHT, against the same
# dataset from local page-cache files. Alternates local and URL runs within each round so load
# from other processes falls on both alike. Writes every run as a JSON line, prints the table
# (median and range of GB/s, ratio of medians to local, bytes fetched per epoch / dataset
# bytes) and draws the chart (scripts/plot_bench_s3.py). docs/BENCHMARKS.md ("Issue 15:
# object storage") has the figures.
#   scripts/bench-s3.sh [DIR]          (default DIR: $TMPDIR or /tmp, ciphershard-i15-s3-bench)
#   ROUNDS (default 2), DATASET_MB (default 192: written once, kept in DIR), LATENCIES
#   (default "0 20 50" ms), IN_FLIGHT (default "1 4 16 64"), THREADS (default 2), EXTRA_THREADS
#   (default "8": extra URL runs at the highest latency and default in-flight with that many
#   loader threads, to show what bounds the requests outstanding), SVG (default
#   docs/bench-s3.svg), SERVER (s3s-fs or nginx, below), EPOCHS (default 3: a 192 MB epoch is
#   short, and opening costs a round trip per shard), READAHEAD and IO_THREADS (the host
#   loader's --readahead-windows and --io-threads; default: unset, the loader's defaults for
#   each store), SPLIT (1: the server and the proxy on CPU 1, the loader on CPU 0, as if the
#   store were another machine; use THREADS=1 with it). Needs s3s-fs ($CIPHERSHARD_S3S_FS,
#   or TARGET/s3s-fs/bin/s3s-fs) or nginx.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-${TMPDIR:-/tmp}/ciphershard-i15-s3-bench}
rounds=${ROUNDS:-2}
latencies=${LATENCIES:-0 20 50}
flights=${IN_FLIGHT:-1 4 16 64}
threads=${THREADS:-2}
extra_threads=${EXTRA_THREADS:-8}
svg=${SVG:-$root/docs/bench-s3.svg}
# SPLIT=1: pin the store's side and the loader's to different CPUs.
if [ "${SPLIT:-0}" = 1 ]; then
    server_cpu=(taskset -c 1)
    loader_cpu=(taskset -c 0)
else
    server_cpu=()
    loader_cpu=()
fi
depth=()
[ -n "${READAHEAD:-}" ] && depth+=(--readahead-windows "$READAHEAD")
[ -n "${IO_THREADS:-}" ] && depth+=(--io-threads "$IO_THREADS")
# The CPU loader only: no CUDA or wgpu to build.
(cd "$root" && cargo build -q --release --no-default-features --bin ciphershard --example s3_latency_proxy)
target=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
cs=$target/release/ciphershard
proxy_bin=$target/release/examples/s3_latency_proxy
s3s=${CIPHERSHARD_S3S_FS:-$target/s3s-fs/bin/s3s-fs}
[ -x "$s3s" ] || { echo "no s3s-fs at $s3s (scripts/test.sh installs it)" >&2; exit 1; }
mkdir -p "$dir"

# The dataset: random U8 rows (1 KiB each) as safetensors, converted with 2 MiB chunks.
if [ ! -f "$dir/ds/manifest.json" ]; then
    python3 - "$dir/data.safetensors" "${DATASET_MB:-192}" <<'EOF'
import json, os, struct, sys
path, mb = sys.argv[1], int(sys.argv[2])
rows, width = mb * 1024, 1024
header = json.dumps({"x": {"dtype": "U8", "shape": [rows, width],
                           "data_offsets": [0, rows * width]}}).encode()
header += b" " * (-len(header) % 8)
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header)) + header)
    for _ in range(mb):
        f.write(os.urandom(1 << 20))
EOF
    rm -f "$dir/k.key"
    "$cs" keygen --out "$dir/k.key"
    "$cs" convert --key "$dir/k.key" "$dir/data.safetensors" --out "$dir/ds"
    rm -f "$dir/data.safetensors"
fi

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_port() { for _ in $(seq 200); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return; sleep 0.05; done; echo "port $1 never listened" >&2; exit 1; }

# The server. SERVER=s3s-fs (default): the real S3 server, holding the dataset as bucket "data",
# prefix "ds/" (s3s-fs keeps objects as files), signed requests. SERVER=nginx: nginx serving the
# dataset folder over plain HTTP (object_store's HTTP store: HEAD, ranged GET with If-Match).
# s3s-fs 0.14 hashes the whole object (MD5, for its ETag) on every GET and HEAD, so each request
# to a large shard costs it seconds of CPU on this box: it checks correctness, but measures its
# own hashing, not the loader. nginx answers from the page cache, as a cloud store's front end
# would, so the added latency is the only delay the proxy adds.
server=${SERVER:-s3s-fs}
upstream_port=$(free_port)
if [ "$server" = nginx ]; then
    mkdir -p "$dir/nginx"
    cat >"$dir/nginx/nginx.conf" <<CONF
worker_processes 1;
pid $dir/nginx/nginx.pid;
error_log $dir/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  sendfile on;
  keepalive_requests 1000000;
  client_body_temp_path $dir/nginx/body;
  proxy_temp_path $dir/nginx/proxy;
  fastcgi_temp_path $dir/nginx/fastcgi;
  uwsgi_temp_path $dir/nginx/uwsgi;
  scgi_temp_path $dir/nginx/scgi;
  server { listen 127.0.0.1:$upstream_port; root $dir; }
}
CONF
    "${server_cpu[@]}" nginx -c "$dir/nginx/nginx.conf" -g 'daemon off;' &
    pids+=($!)
    url_of() { echo "http://127.0.0.1:$1/ds/"; }
    s3env=(CIPHERSHARD_BENCH_SERVER=nginx)
else
    rm -rf "$dir/s3" && mkdir -p "$dir/s3/data/ds"
    cp "$dir"/ds/* "$dir/s3/data/ds/"
    "${server_cpu[@]}" "$s3s" --host 127.0.0.1 --port "$upstream_port" --access-key bench --secret-key bench-secret-key \
        "$dir/s3" >/dev/null 2>&1 &
    pids+=($!)
    url_of() { echo "s3://data/ds/"; }
    s3env=(AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret-key AWS_REGION=us-east-1
        AWS_ALLOW_HTTP=true)
fi
wait_port "$upstream_port"
cat "$dir"/ds/* >/dev/null # page cache hot
if [ -d "$dir/s3" ]; then cat "$dir"/s3/data/ds/* >/dev/null; fi

log=$dir/bench-s3.jsonl
: >"$log"
bench() { # SOURCE LATENCY IN_FLIGHT THREADS PATH [ENV...]
    local source=$1 latency=$2 flight=$3 th=$4 path=$5
    shift 5
    env "$@" "${loader_cpu[@]}" "$cs" bench --key "$dir/k.key" --backend cpu --threads "$th" \
        --epochs "${EPOCHS:-3}" "${depth[@]}" --json "$path" |
        python3 -c '
import json, sys
r = json.load(sys.stdin)
e = r["encrypted"]
n = e.get("network") or {}
print(json.dumps({"source": sys.argv[1], "latency_ms": int(sys.argv[2]), "in_flight": int(sys.argv[3]),
    "threads": int(sys.argv[4]), "gb_per_s": e["gb_per_s"], "steady_gb_per_s": e["steady_gb_per_s"],
    "get_requests": n.get("get_requests"), "ttfb_p50_ms": n.get("ttfb_p50_ms"),
    "ttfb_p99_ms": n.get("ttfb_p99_ms"), "retries": n.get("retries"),
    "read_ahead": e.get("read_ahead"),
    "amplification": n.get("amplification")}))' "$source" "$latency" "$flight" "$th" | tee -a "$log"
}
for latency in $latencies; do
    proxy_port=$(free_port)
    "${server_cpu[@]}" "$proxy_bin" --listen "$proxy_port" --upstream "127.0.0.1:$upstream_port" --latency-ms "$latency" >/dev/null &
    proxy_pid=$!
    pids+=($proxy_pid)
    wait_port "$proxy_port"
    for _ in $(seq "$rounds"); do
        bench local "$latency" 0 "$threads" "$dir/ds"
        for flight in $flights; do
            bench "$server" "$latency" "$flight" "$threads" "$(url_of "$proxy_port")" "${s3env[@]}" \
                AWS_ENDPOINT_URL="http://127.0.0.1:$proxy_port" CIPHERSHARD_STORE_IN_FLIGHT="$flight"
        done
    done
    kill "$proxy_pid"
done
last=${latencies##* }
if [ -n "$extra_threads" ]; then
    proxy_port=$(free_port)
    "${server_cpu[@]}" "$proxy_bin" --listen "$proxy_port" --upstream "127.0.0.1:$upstream_port" --latency-ms "$last" >/dev/null &
    pids+=($!)
    wait_port "$proxy_port"
    for _ in $(seq "$rounds"); do
        for th in $extra_threads; do
            bench local "$last" 0 "$th" "$dir/ds"
            bench "$server" "$last" 16 "$th" "$(url_of "$proxy_port")" "${s3env[@]}" \
                AWS_ENDPOINT_URL="http://127.0.0.1:$proxy_port"
        done
    done
fi
python3 "$root/scripts/plot_bench_s3.py" "$log" "$svg"
