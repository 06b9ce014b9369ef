#!/usr/bin/env python3
"""Decode rate with and without constrained decoding, same prompt and model, against a
running `duet serve`: no format, format "json", and a JSON schema; 4 rounds, the three
taking turns; each rate is the server's own eval_count / eval_duration.

    benches/structured-output.py http://127.0.0.1:11434 qwen2.5-coder:0.5b [MODEL...]
"""
import json, urllib.request, statistics, sys
URL = sys.argv[1]
schema = {"type": "object", "properties": {"languages": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}, "year": {"type": "integer"}}, "required": ["name", "year"]}}}, "required": ["languages"]}
prompt = "List 40 programming languages with the year each appeared, as JSON: {\"languages\": [{\"name\": ..., \"year\": ...}, ...]}. Output only the JSON."
def run(fmt, model):
    body = {"model": model, "prompt": prompt, "stream": False, "options": {"temperature": 0, "num_predict": 128}}
    if fmt is not None: body["format"] = fmt
    r = json.load(urllib.request.urlopen(urllib.request.Request(URL + "/api/generate", json.dumps(body).encode())))
    return r["eval_count"] / (r["eval_duration"] / 1e9), r["eval_count"]
for model in sys.argv[2:]:
    res = {"none": [], "json": [], "schema": []}
    for _ in range(4):
        for k, f in [("none", None), ("json", "json"), ("schema", schema)]:
            res[k].append(run(f, model))
    base = statistics.median(r[0] for r in res["none"])
    for k, v in res.items():
        m = statistics.median(r[0] for r in v)
        print(f"{model} {k:7s} median {m:6.1f} tok/s (min {min(r[0] for r in v):.1f}, max {max(r[0] for r in v):.1f}), tokens {[r[1] for r in v]}, vs none {m/base:.3f}")
