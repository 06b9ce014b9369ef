#!/usr/bin/env python3
"""Load and soak harness for a running `duet serve` (loopback only, bounded in time).

  benches/load.py --url http://127.0.0.1:11434 --clients 16 --duration 300 [--pid PID]

N clients send requests one after another for --duration seconds, over a mix of
streamed and non-streamed requests on the native API (/api/generate, /api/chat) and
the OpenAI-compatible one (/v1/chat/completions, /v1/completions); --cancel of the
streamed ones are cancelled mid-stream (the connection closed after a few tokens).
A client that gets 503 (queue full, the server's backpressure) waits a moment before
its next request, as a client told "try again" would.

It reports requests and their outcomes, errors by kind, 503s, time to first token and
inter-token latency (p50, p99), the server's resident memory before, after a warm-up,
and at the end (--pid, or found by the port), and checks that once the clients stop the
server's queue and in-flight gauges (/metrics) return to 0. With --check it exits 1 on
any error other than 503, gauges that stay up, or (with --max-rss-growth) more memory
growth than allowed. --json writes the report as JSON too. Standard library only.
"""
import argparse, http.client, json, os, random, statistics, sys, threading, time, urllib.parse

PROMPTS = [
    "Write a Python function that reverses a linked list.",
    "Explain what a mutex is in two sentences.",
    "Write a SQL query that finds duplicate emails in a users table.",
    "What does `git rebase -i` do?",
    "Write a Rust function that sums a slice of i64.",
    "Give three tips for naming variables.",
    "Write a bash one-liner that counts lines in all .py files.",
    "What is the difference between a process and a thread?",
    "Write a JavaScript debounce function.",
    "Explain big-O notation briefly.",
    "Write a Go function that checks whether a string is a palindrome.",
    "What is a race condition?",
]

# (name, weight): what each client draws its next request from.
KINDS = [
    ("generate-stream", 3),
    ("generate", 1),
    ("chat-stream", 3),
    ("chat", 1),
    ("v1-chat-stream", 3),
    ("v1-chat", 1),
    ("v1-completions-stream", 1),
    ("v1-completions", 1),
]


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def rss_mib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def pid_of_port(port):
    """The pid listening on 127.0.0.1:port, from /proc (Linux)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(parts[9])
        except OSError:
            pass
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    return int(pid)
        except OSError:
            continue
    return None


def metric_sum(host, port, name):
    """The sum of a /metrics series over its labels (None if unreadable)."""
    try:
        c = http.client.HTTPConnection(host, port, timeout=10)
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        c.close()
    except (OSError, http.client.HTTPException):
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}        # kind -> count
        self.outcomes = {}        # outcome -> count
        self.errors = {}          # error kind -> count
        self.error_samples = {}   # error kind -> first message
        self.ttft = []            # seconds, streamed requests
        self.itl = []             # seconds between content chunks
        self.tokens = 0

    def add(self, field, key, n=1):
        with self.lock:
            d = getattr(self, field)
            d[key] = d.get(key, 0) + n

    def error(self, kind, sample):
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1
            self.error_samples.setdefault(kind, sample[:300])


def request_for(kind, model, prompt, gen_tokens, rng):
    stream = kind.endswith("-stream")
    temp = 0.7
    if kind.startswith("generate"):
        return "/api/generate", {"model": model, "prompt": prompt, "stream": stream,
                                 "options": {"num_predict": gen_tokens, "temperature": temp}}
    if kind.startswith("chat"):
        return "/api/chat", {"model": model, "messages": [{"role": "user", "content": prompt}],
                             "stream": stream,
                             "options": {"num_predict": gen_tokens, "temperature": temp}}
    if kind.startswith("v1-chat"):
        return "/v1/chat/completions", {"model": model, "stream": stream, "max_tokens": gen_tokens,
                                        "temperature": temp,
                                        "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {"model": model, "prompt": prompt, "stream": stream,
                               "max_tokens": gen_tokens, "temperature": temp}


def piece_of(path, ev):
    """The text one streamed event carries, and whether it ends the answer."""
    if path == "/api/generate":
        return ev.get("response", ""), ev.get("done", False)
    if path == "/api/chat":
        return (ev.get("message") or {}).get("content", ""), ev.get("done", False)
    ch = (ev.get("choices") or [{}])
    ch = ch[0] if ch else {}
    if path == "/v1/chat/completions":
        text = (ch.get("delta") or {}).get("content") or ""
    else:
        text = ch.get("text") or ""
    return text, ch.get("finish_reason") is not None


def one(host, port, kind, model, prompt, gen_tokens, cancel_after, stats, rng):
    """Sends one request; returns its outcome ("ok", "cancelled", "503", "error")."""
    path, body = request_for(kind, model, prompt, gen_tokens, rng)
    stream = body["stream"]
    start = time.monotonic()
    try:
        c = http.client.HTTPConnection(host, port, timeout=300)
        c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        r = c.getresponse()
        if r.status == 503:
            r.read()
            c.close()
            return "503"
        if r.status != 200:
            text = r.read().decode(errors="replace")
            c.close()
            stats.error(f"http-{r.status}", f"{path}: {text}")
            return "error"
        if not stream:
            v = json.loads(r.read())
            c.close()
            if "error" in v:
                stats.error("error-in-body", f"{path}: {v}")
                return "error"
            return "ok"
        first = last = None
        chunks = 0
        done = False
        for raw in r:
            line = raw.strip()
            if not line:
                continue
            if line.startswith(b"data: "):
                line = line[6:]
                if line == b"[DONE]":
                    done = True
                    break
            ev = json.loads(line)
            if "error" in ev:
                stats.error("error-in-stream", f"{path}: {ev['error']}")
                c.close()
                return "error"
            text, end = piece_of(path, ev)
            now = time.monotonic()
            if text:
                if first is None:
                    first = now
                    stats.ttft.append(now - start)
                elif last is not None:
                    with stats.lock:
                        stats.itl.append(now - last)
                last = now
                chunks += 1
                if cancel_after and chunks >= cancel_after:
                    c.close()  # the client goes away mid-stream
                    return "cancelled"
            if end and path.startswith("/api/"):
                done = True
                break
            if end:
                done = True  # the usage chunk and [DONE] may follow
        c.close()
        if not done:
            stats.error("stream-cut", f"{path}: the stream ended without its last event")
            return "error"
        return "ok"
    except (OSError, http.client.HTTPException, json.JSONDecodeError, ValueError) as e:
        stats.error(type(e).__name__, f"{path}: {e}")
        return "error"


def client(i, args, host, port, deadline, stats, stop):
    rng = random.Random(args.seed * 1000 + i)
    kinds = [k for k, w in KINDS for _ in range(w)]
    models = args.model.split(",")
    sent = 0
    while time.monotonic() < deadline and not stop.is_set():
        if args.max_requests and sent >= args.max_requests:
            break
        kind = rng.choice(kinds)
        prompt = rng.choice(PROMPTS)
        cancel = rng.randint(2, 6) if kind.endswith("-stream") and rng.random() < args.cancel else 0
        stats.add("requests", kind)
        outcome = one(host, port, kind, rng.choice(models), prompt, args.gen_tokens, cancel, stats, rng)
        stats.add("outcomes", outcome)
        sent += 1
        if outcome == "503":
            time.sleep(0.5 + rng.random())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:11434")
    ap.add_argument("--model", default="auto", help="model names, comma-separated (each request picks one)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60, help="seconds of load (at most 3600)")
    ap.add_argument("--gen-tokens", type=int, default=32, help="num_predict / max_tokens of each request")
    ap.add_argument("--cancel", type=float, default=0.15, help="fraction of streamed requests cancelled mid-stream")
    ap.add_argument("--warmup", type=float, default=None, help="seconds before the warm RSS sample (default: a tenth of the run, at most 30)")
    ap.add_argument("--max-requests", type=int, default=0, help="per client (0: no limit but the time)")
    ap.add_argument("--pid", type=int, help="the server's pid (default: whoever listens on the port)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--check", action="store_true", help="exit 1 on unexpected errors or gauges that stay up")
    ap.add_argument("--max-rss-growth", type=float, default=None, help="with --check: most RSS growth allowed after the warm-up, percent")
    ap.add_argument("--json", help="also write the report to this file")
    args = ap.parse_args()

    u = urllib.parse.urlparse(args.url)
    host, port = u.hostname, u.port or 80
    if host not in ("127.0.0.1", "localhost", "::1"):
        sys.exit("load.py drives loopback servers only")
    if not (0 < args.clients <= 256) or not (0 < args.duration <= 3600):
        sys.exit("--clients must be 1..256 and --duration 0..3600 s")
    pid = args.pid or pid_of_port(port)
    warmup = args.warmup if args.warmup is not None else min(30.0, args.duration / 10)

    stats = Stats()
    rss_before = rss_mib(pid) if pid else None
    start = time.monotonic()
    deadline = start + args.duration
    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(i, args, host, port, deadline, stats, stop), daemon=True)
               for i in range(args.clients)]
    for t in threads:
        t.start()
    rss_samples = []
    rss_warm = None
    while any(t.is_alive() for t in threads):
        time.sleep(1)
        now = time.monotonic()
        r = rss_mib(pid) if pid else None
        if r is not None:
            rss_samples.append((now - start, r))
            if rss_warm is None and now - start >= warmup:
                rss_warm = r
        if now > deadline + 330:  # a request outlived its own timeout: stop waiting
            stop.set()
            break
    wall = time.monotonic() - start
    for t in threads:
        t.join(timeout=5)

    # Once the clients are gone, the server's gauges must return to 0.
    gauges = {}
    settle = time.monotonic() + 30
    while True:
        gauges = {name: metric_sum(host, port, name)
                  for name in ("duet_in_flight_requests", "duet_queue_depth", "duet_running_sequences")}
        if all(v == 0 for v in gauges.values()) or time.monotonic() > settle:
            break
        time.sleep(0.5)
    rss_after = rss_mib(pid) if pid else None
    panics = metric_sum(host, port, "duet_panics_total")

    total = sum(stats.requests.values())
    unexpected = sum(stats.errors.values())
    base = rss_warm or rss_before
    growth = (rss_after - base) / base * 100 if (base and rss_after) else None
    report = {
        "url": args.url, "model": args.model, "clients": args.clients, "duration_s": args.duration,
        "wall_s": round(wall, 1), "gen_tokens": args.gen_tokens, "cancel_fraction": args.cancel,
        "requests": total, "by_kind": stats.requests, "outcomes": stats.outcomes,
        "errors": stats.errors, "error_samples": stats.error_samples,
        "status_503": stats.outcomes.get("503", 0),
        "ttft_s": {"p50": pct(stats.ttft, 50), "p99": pct(stats.ttft, 99), "n": len(stats.ttft)},
        "itl_s": {"p50": pct(stats.itl, 50), "p99": pct(stats.itl, 99), "n": len(stats.itl)},
        "rss_mib": {"before": rss_before, "warm": rss_warm, "after": rss_after,
                    "peak": max((r for _, r in rss_samples), default=None),
                    "growth_after_warmup_pct": growth},
        "gauges_after": gauges, "panics": panics, "pid": pid,
    }

    f = lambda x, scale=1000, unit="ms": "-" if x is None else f"{x * scale:.0f} {unit}"
    print(f"{args.clients} clients, {wall:.0f} s, model {args.model}, {args.gen_tokens} tokens each, "
          f"{args.cancel:.0%} of streams cancelled")
    print(f"requests {total}: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.outcomes.items())))
    print("by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(stats.requests.items())))
    print(f"errors other than 503: {unexpected} " + (json.dumps(stats.errors) if unexpected else ""))
    for k, v in stats.error_samples.items():
        print(f"  {k}: {v}")
    print(f"TTFT p50 {f(pct(stats.ttft, 50))}, p99 {f(pct(stats.ttft, 99))} (n={len(stats.ttft)}); "
          f"inter-token p50 {f(pct(stats.itl, 50))}, p99 {f(pct(stats.itl, 99))} (n={len(stats.itl)})")
    if pid:
        g = "-" if growth is None else f"{growth:+.1f}%"
        print(f"RSS (pid {pid}): before {rss_before:.0f} MiB, after {warmup:.0f} s warm-up "
              f"{(rss_warm or 0):.0f} MiB, end {(rss_after or 0):.0f} MiB ({g} since the warm-up), "
              f"peak {report['rss_mib']['peak'] or 0:.0f} MiB")
    print(f"gauges after the run: {gauges}; panics caught: {panics}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=1)

    if args.check:
        bad = []
        if unexpected:
            bad.append(f"{unexpected} errors other than 503")
        if any(v != 0 for v in gauges.values()):
            bad.append(f"gauges did not return to 0: {gauges}")
        if total == 0 or stats.outcomes.get("ok", 0) == 0:
            bad.append("no request succeeded")
        if args.max_rss_growth is not None and growth is not None and growth > args.max_rss_growth:
            bad.append(f"RSS grew {growth:.1f}% (limit {args.max_rss_growth}%)")
        if bad:
            print("FAILED: " + "; ".join(bad))
            sys.exit(1)
        print("OK")


if __name__ == "__main__":
    main()
