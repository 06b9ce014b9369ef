#!/usr/bin/env bash
# Many users at once, side by side: duet serve --parallel N and llama.cpp's llama-server
# -np N on the same GGUF file and threads, driven over HTTP by the same client
# (benches/concurrency.py: N streams at once for each N, then a multi-turn prefix-cache
# case). Optional, never run in CI: builds llama-server (benches/llama-build.sh).
#
#   benches/llama-server.sh [MODEL] [THREADS] [STREAMS]
#   (defaults: qwen2.5-coder:0.5b, all cores, 1,2,4,8)
set -euo pipefail
cd "$(dirname "$0")/.."
model="${1:-qwen2.5-coder:0.5b}"
threads="${2:-$(nproc)}"
streams="${3:-1,2,4,8}"
np=$(echo "$streams" | tr ',' '\n' | sort -n | tail -1)
llama_server=$(benches/llama-build.sh llama-server)

scripts/fetch-models >/dev/null
cargo build --release --quiet
export HF_HUB_OFFLINE=1
file=$(./target/release/duet --layout cpu show "$model" | awk '$1 == "path" {print $2}')
cpu_field() { grep -m1 "^$1" /proc/cpuinfo | cut -d: -f2 | xargs; }
echo "# duet vs llama-server ($(date -u +%Y-%m-%d), $(nproc) cores, $threads threads, $model, -np $np)"
echo "# CPU: $(cpu_field vendor_id), $(cpu_field 'model name'), family $(cpu_field 'cpu family') model $(cpu_field 'model')"
echo "# file: $file"

port_duet=18434; port_llama=18080
cfg=$(mktemp -d)
cat > "$cfg/models.toml" <<TOML
[models."$model"]
path = "$file"
[[layouts.one.place]]
model = "$model"
device = "cpu:0"
tiers = ["simple", "moderate", "complex"]
TOML
wait_up() { for _ in $(seq 600); do curl -sf "$1" >/dev/null && return 0; sleep 0.5; done; return 1; }
# A server left running (a client that failed ends the script) would take the cores from
# every later measurement: stop whichever runs on any exit.
pid=
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; rm -rf "$cfg"' EXIT

echo "## duet serve --parallel $np"
# duet serve uses every core of the machine; run on a machine of THREADS cores (or use
# taskset) for a like-for-like thread count.
RUST_LOG=warn taskset -c 0-$((threads - 1)) ./target/release/duet --config "$cfg/models.toml" serve \
  --host "127.0.0.1:$port_duet" --parallel "$np" & pid=$!
wait_up "http://127.0.0.1:$port_duet/ready"
python3 benches/concurrency.py --api ollama --url "http://127.0.0.1:$port_duet" --model "$model" \
  --streams "$streams" --multi-turn
kill $pid; wait $pid 2>/dev/null || true

echo "## llama-server -np $np"
taskset -c 0-$((threads - 1)) "$llama_server" -m "$file" -t "$threads" -np "$np" -c $((4096 * np)) \
  --port "$port_llama" --log-disable >/dev/null 2>&1 & pid=$!
wait_up "http://127.0.0.1:$port_llama/health"
python3 benches/concurrency.py --api llama --url "http://127.0.0.1:$port_llama" \
  --streams "$streams" --multi-turn
kill $pid; wait $pid 2>/dev/null || true
rm -rf "$cfg"
