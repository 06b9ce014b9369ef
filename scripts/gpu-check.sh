#!/usr/bin/env bash
# Everything duet checks on a machine with an NVIDIA GPU, in one run (under 8 minutes on
# an H100): nvidia-smi, the CUDA operation checks against the CPU (`duet device-check`),
# then `duet bench --dummy-weights` for the 1.5B Q4_K_M and 7B Q8_0 shapes, each alone and
# both at once on the one GPU (two workers), then both at once as two processes. Results
# go to $OUT (default target/gpu-check).
#
#   scripts/gpu-check.sh [BINARY]     default: dist/duet-cuda-sm90, unpacked from its .xz
#
# The binary is scripts/build-cuda's; it needs the NVIDIA driver (CUDA 13.0+) and the CUDA
# 13 libraries (cublas, cublasLt, cudart, curand), which are looked for on the machine.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-target/gpu-check}
mkdir -p "$out"
status=0

bin=${1:-dist/duet-cuda-sm${CUDA_COMPUTE_CAP:-90}}
if [ ! -x "$bin" ] && [ -f "$bin.xz" ]; then
  xz -dc "$bin.xz" > /tmp/duet-cuda && chmod +x /tmp/duet-cuda && bin=/tmp/duet-cuda
fi
[ -x "$bin" ] || { echo "gpu-check: no binary at $bin (build it with scripts/build-cuda)" >&2; exit 2; }

# The CUDA libraries the binary links, wherever this machine keeps them (system CUDA or
# a Python environment's nvidia packages).
dirs=
for lib in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10; do
  if ! ldconfig -p 2>/dev/null | grep -q "$lib"; then
    found=$(find / -xdev \( -path /proc -o -path /sys \) -prune -o -name "$lib" -print 2>/dev/null | head -1)
    [ -n "$found" ] && dirs="$dirs:$(dirname "$found")"
  fi
done
export LD_LIBRARY_PATH="${dirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
if ldd "$bin" | grep 'not found'; then
  echo "gpu-check: libraries missing (above)" >&2
  status=1
fi

run() { # name timeout command...
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2> "$out/$name.log" | tee "$out/$name.md"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || { status=1; tail -20 "$out/$name.log"; }
}

nvidia-smi | tee "$out/nvidia-smi.txt"
run device-check 120 "$bin" device-check --device cuda:0
run bench 300 "$bin" bench --dummy-weights 1.5b-q4_k_m,7b-q8_0 --device cuda:0 \
  --prompt-sizes 128,512 --gen-tokens 128 --reps 3 --json-out "$out/bench.json"
# The same two models as two processes sharing the GPU: set beside the in-process
# "together" table above, it shows what generating from two threads of one process
# costs over two processes.
echo "== processes: each shape in its own process, both at once"
# The 7B takes ~7 s longer to load: the 1.5B starts later so that both generate at once.
for shape in 7b-q8_0 1.5b-q4_k_m; do
  timeout 200 "$bin" bench --dummy-weights "$shape" --device cuda:0 --prompt-sizes 128 \
    --gen-tokens 256 --reps 3 > "$out/process-$shape.md" 2> "$out/process-$shape.log" &
  sleep 6
done
wait
for shape in 1.5b-q4_k_m 7b-q8_0; do
  grep "dummy:$shape" "$out/process-$shape.md" | head -1 || { status=1; tail -5 "$out/process-$shape.log"; }
done
find "$out" -type f -empty -delete # (what comes back from a device machine is counted)
echo "gpu-check: exit $status; results in $out"
exit $status
