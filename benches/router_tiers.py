#!/usr/bin/env python3
"""End-to-end time of SIMPLE requests through /api/chat (issue 17, item 4).

Each task is sent three ways to a running `duet serve` (CPU layout): as `auto` (routed:
the fast model, with the SIMPLE tier's generation policy of models.toml), to the fast
model by name (no policy), and to the quality model by name. Greedy decoding, one
request at a time. Every answer is checked mechanically: the code block parses and
carries the docstring / the type hints / the new name / a comment, or the command line
starts with the expected program.

  benches/router_tiers.py [--url http://127.0.0.1:11434] [--reps 1] [--one-per-kind] [--json]
"""
import argparse
import ast
import json
import os
import re
import statistics
import time
import urllib.request

FAST, QUALITY = "qwen2.5-coder:0.5b", "qwen2.5-coder:1.5b"


def code_of(answer):
    m = re.findall(r"```[a-zA-Z]*\n(.*?)```", answer, re.S)
    if m:
        return max(m, key=len)
    m = re.search(r"```[a-zA-Z]*\n(.*)", answer, re.S)
    return m.group(1) if m else answer


def func(code, name):
    tree = ast.parse(code)
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name:
            return n
    raise AssertionError(f"no function {name}")


def has_docstring(name):
    def check(answer):
        f = func(code_of(answer), name)
        assert ast.get_docstring(f), "no docstring"
    return check


def has_hints(name):
    def check(answer):
        f = func(code_of(answer), name)
        args = f.args.args + f.args.kwonlyargs
        assert all(a.annotation is not None for a in args if a.arg != "self"), "an argument has no hint"
        assert f.returns is not None, "no return hint"
    return check


def renamed(old, new):
    def check(answer):
        code = code_of(answer)
        tree = ast.parse(code)
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
            a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments) for a in n.args
        }
        assert new in names, f"{new} missing"
        assert old not in names, f"{old} still there"
    return check


def commented(must_keep):
    def check(answer):
        code = code_of(answer)
        ast.parse(code)
        assert "#" in code or '"""' in code, "no comment"
        assert must_keep in code.replace(" ", ""), "the code changed"
    return check


def command(program):
    def check(answer):
        blocks = re.findall(r"```[a-zA-Z]*\n(.*?)```", answer, re.S) + re.findall(r"`([^`\n]+)`", answer)
        lines = [l.strip().lstrip("$ ").strip() for b in blocks for l in b.splitlines() if l.strip()]
        assert any(l.split()[0] == program for l in lines if l.split()), f"no {program} command"
    return check


TASKS = [
    ("docstring", "Write a docstring for this function:\ndef moving_average(xs, k):\n    return [sum(xs[i:i + k]) / k for i in range(len(xs) - k + 1)]", has_docstring("moving_average")),
    ("docstring", "Add a docstring to this method:\nclass Account:\n    def withdraw(self, amount):\n        if amount > self.balance:\n            raise ValueError('insufficient funds')\n        self.balance -= amount", has_docstring("withdraw")),
    ("type hints", "Add type hints to this function:\ndef count_words(text, lower):\n    words = text.lower().split() if lower else text.split()\n    return {w: words.count(w) for w in set(words)}", has_hints("count_words")),
    ("type hints", "Add Python type hints:\ndef pad(s, width, fill):\n    return s + fill * (width - len(s))", has_hints("pad")),
    ("rename", "Rename the variable `t` to `total_price` in this function:\ndef checkout(items):\n    t = 0\n    for price, qty in items:\n        t += price * qty\n    return t", renamed("t", "total_price")),
    ("rename", "Rename `lst` to `scores`:\ndef best(lst):\n    return max(lst) if lst else None", renamed("lst", "scores")),
    ("comment", "Add a comment explaining this line:\nmask = [x for x in data if x is not None and x >= 0]", commented("mask=[xforxindataifxisnotNoneandx>=0]")),
    ("comment", "Add comments to this function:\ndef gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a", commented("a,b=b,a%b")),
    ("command", "Give me the git command to delete the local branch feature-x.", command("git")),
    ("command", "What's the shell command to count the lines of every .py file under the current folder?", command("find")),
]


def chat(url, model, prompt):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "stream": False,
            "options": {"temperature": 0, "seed": 0}}
    req = urllib.request.Request(url.rstrip("/") + "/api/chat", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.time()
    with urllib.request.urlopen(req, timeout=900) as r:
        v = json.load(r)
        headers = dict(r.headers)
    return time.time() - t0, v, headers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default=os.environ.get("DUET_URL", "http://127.0.0.1:11434"))
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one-per-kind", action="store_true", help="the first task of each kind only")
    ap.add_argument("--kinds", help="comma-separated kinds to run (default: all)")
    ap.add_argument("--ways", default="auto,fast,quality", help="which of auto, fast, quality to run")
    args = ap.parse_args()
    tasks = TASKS
    if args.one_per_kind:
        seen = set()
        tasks = [t for t in TASKS if not (t[0] in seen or seen.add(t[0]))]
    if args.kinds:
        tasks = [t for t in tasks if t[0] in args.kinds.split(",")]
    rows = []
    ways = [w for w in [("auto", "auto"), ("fast", FAST), ("quality", QUALITY)] if w[0] in args.ways.split(",")]
    for kind, prompt, check in tasks:
        row = {"task": kind, "prompt": prompt.splitlines()[0]}
        for way, model in ways:
            times, tokens, ok, why = [], [], True, ""
            for _ in range(args.reps):
                dt, v, h = chat(args.url, model, prompt)
                times.append(dt)
                tokens.append(v.get("eval_count", 0))
                try:
                    check(v["message"]["content"])
                except Exception as e:  # noqa: BLE001 - any failure is a failed check
                    ok, why = False, f"{type(e).__name__}: {e}"
                if way == "auto":
                    row["routed"] = f"{h.get('X-Duet-Tier') or h.get('x-duet-tier')} → {h.get('X-Duet-Model') or h.get('x-duet-model')}"
            row[way] = {"s": statistics.median(times), "tokens": statistics.median(tokens), "ok": ok, "why": why}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.json or len(ways) < 3:
        return
    print("\n| task | routed | auto (fast + tier policy) s / tokens / check | fast by name s / tokens / check | quality s / tokens / check | quality ÷ auto |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        c = lambda w: f"{r[w]['s']:.1f} / {r[w]['tokens']:.0f} / {'pass' if r[w]['ok'] else 'FAIL'}"
        print(f"| {r['task']}: {r['prompt'][:50]} | {r.get('routed', '')} | {c('auto')} | {c('fast')} | {c('quality')} | {r['quality']['s'] / r['auto']['s']:.1f}x |")
    tot = {w: sum(r[w]["s"] for r in rows) for w, _ in ways}
    passed = {w: sum(r[w]["ok"] for r in rows) for w, _ in ways}
    print(f"| **all {len(rows)}** | | {tot['auto']:.1f} s, {passed['auto']}/{len(rows)} pass | {tot['fast']:.1f} s, {passed['fast']}/{len(rows)} pass | {tot['quality']:.1f} s, {passed['quality']}/{len(rows)} pass | **{tot['quality'] / tot['auto']:.1f}x** |")
    for r in rows:
        for w, _ in ways:
            if not r[w]["ok"]:
                print(f"  {w} failed {r['task']} ({r['prompt'][:40]}): {r[w]['why']}")


if __name__ == "__main__":
    main()
