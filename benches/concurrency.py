#!/usr/bin/env python3
"""N concurrent streaming requests against an HTTP server, the same for duet and llama.cpp.

  benches/concurrency.py --api ollama --url http://127.0.0.1:11434 --model NAME --streams 1,2,4,8
  benches/concurrency.py --api llama --url http://127.0.0.1:8080 --streams 1,2,4,8

Each level sends N different prompts at the same moment (greedy, --gen-tokens each) and
reports, as one JSON line per level: aggregate generated tok/s (all tokens over the wall
time from sending to the last token), per-stream tok/s (median, first to last token) and
time to first token (p50, p99, mean). --multi-turn also sends a long conversation, then
the same conversation with one more short turn, and a fresh prompt as long: the extra
turn's time to first token with a prompt cache against without. --clients N --duration S
instead runs a soak: N clients chatting (/api/chat, streamed) one request after another,
with the TTFT percentiles, the errors and (--pid) the server's resident memory over time.
Standard library only.
"""
import argparse, http.client, json, statistics, threading, time, urllib.parse

TOPICS = ["binary search trees", "HTTP caching", "Rust ownership", "SQL indexes",
          "garbage collection", "TCP congestion control", "Python decorators", "git rebase",
          "unit testing", "hash maps", "CPU caches", "regular expressions", "Docker layers",
          "async IO", "B-trees", "the actor model"]


def prompt(i):
    t = TOPICS[i % len(TOPICS)]
    return (f"<|im_start|>user\nWrite a long, detailed tutorial about {t}, with code examples "
            f"and many sections.<|im_end|>\n<|im_start|>assistant\n")


def stream(api, url, model, text, n):
    """Sends one request; returns (ttft s, tokens, seconds from first to last token)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    if api == "ollama":
        path = "/api/generate"
        body = {"model": model, "prompt": text, "raw": True, "stream": True,
                "options": {"temperature": 0, "num_predict": n}}
    else:
        path = "/completion"
        body = {"prompt": text, "stream": True, "n_predict": n, "temperature": 0,
                "cache_prompt": True}
    start = time.monotonic()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    first = last = None
    tokens = 0
    for line in r:
        line = line.strip()
        if not line:
            continue
        if line.startswith(b"data: "):
            line = line[6:]
        ev = json.loads(line)
        piece = ev.get("response") if api == "ollama" else ev.get("content")
        if piece and first is None:
            first = time.monotonic()
        if api == "ollama" and ev.get("done"):
            tokens = ev.get("eval_count", 0)
            last = time.monotonic()
        if api == "llama" and ev.get("stop"):
            tokens = ev.get("tokens_predicted", ev.get("timings", {}).get("predicted_n", 0))
            last = time.monotonic()
    conn.close()
    first = first or last
    return first - start, tokens, last - first, last


def pct(xs, q):
    xs = sorted(xs)
    return xs[max(0, min(len(xs) - 1, int(-(-q * len(xs) // 1)) - 1))]


def level(args, n, base):
    out = [None] * n
    start = time.monotonic()

    def go(i):
        out[i] = stream(args.api, args.url, args.model, prompt(base + i), args.gen_tokens)

    ts = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    end = max(o[3] for o in out)
    ttft = [o[0] * 1e3 for o in out]
    return {"streams": n,
            "aggregate_tps": sum(o[1] for o in out) / (end - start),
            "per_stream_tps": statistics.median((o[1] - 1) / max(o[2], 1e-9) for o in out),
            "ttft_p50_ms": statistics.median(ttft), "ttft_p99_ms": pct(ttft, 0.99),
            "ttft_mean_ms": statistics.mean(ttft), "tokens": sum(o[1] for o in out)}


def multi_turn(args):
    try:
        return multi_turn_measured(args)
    except Exception as e:  # a server's bad answer is a result to report, not a crash
        return {"multi_turn": True, "error": f"{type(e).__name__}: {e}"[:300]}


def multi_turn_measured(args):
    words = " ".join(f"{TOPICS[i % 16].split()[0]}{i}" for i in range(900))
    hist = f"<|im_start|>user\nSummarise these notes: {words}<|im_end|>\n<|im_start|>assistant\n"
    stream(args.api, args.url, args.model, hist, 16)
    more = hist + "Done.<|im_end|>\n<|im_start|>user\nAnd in one word?<|im_end|>\n<|im_start|>assistant\n"
    cached = stream(args.api, args.url, args.model, more, 4)
    fresh = stream(args.api, args.url, args.model, more.replace("Summarise", "Condense"), 4)
    return {"multi_turn": True, "ttft_cached_ms": cached[0] * 1e3,
            "ttft_uncached_ms": fresh[0] * 1e3, "ratio": cached[0] / fresh[0]}


CHATS = ["Write a docstring for: def add(a, b): return a + b",
         "What does `git stash pop` do?",
         "Add type hints: def greet(name): return 'hi ' + name",
         "Write a commit message for: fixed off-by-one in the pager",
         "Explain what a Python generator is, briefly.",
         "Rename the variable x to count in: x = 0\nfor i in items: x += 1",
         "Write a bash one-liner that counts lines in all .py files.",
         "Design a rate limiter for a REST API: explain the trade-offs."]


def soak(args):
    """--clients N streaming /api/chat to --model for --duration seconds, one request
    after another each; TTFT percentiles, errors and the server's resident memory."""
    u = urllib.parse.urlparse(args.url)
    stop = time.monotonic() + args.duration
    ttft, errors, lock = [], [0], threading.Lock()

    def client(i):
        n = i
        while time.monotonic() < stop:
            n += 1
            body = {"model": args.model, "stream": True,
                    "messages": [{"role": "user", "content": CHATS[n % len(CHATS)]}],
                    "options": {"num_predict": args.gen_tokens}}
            try:
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
                start = time.monotonic()
                conn.request("POST", "/api/chat", json.dumps(body), {"Content-Type": "application/json"})
                r = conn.getresponse()
                if r.status != 200:
                    raise RuntimeError(r.status)
                first = None
                for line in r:
                    ev = json.loads(line)
                    if first is None and ev.get("message", {}).get("content"):
                        first = time.monotonic() - start
                conn.close()
                with lock:
                    ttft.append(first if first is not None else time.monotonic() - start)
            except Exception:
                with lock:
                    errors[0] += 1

    rss = []

    def sample():
        while time.monotonic() < stop:
            if args.pid:
                with open(f"/proc/{args.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmRSS:"):
                            rss.append(int(line.split()[1]) // 1024)
            time.sleep(1)

    ts = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    ts.append(threading.Thread(target=sample))
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    out = {"soak": True, "clients": args.clients, "seconds": args.duration,
           "requests": len(ttft), "errors": errors[0]}
    if ttft:
        out.update(ttft_p50_s=statistics.median(ttft), ttft_p99_s=pct(ttft, 0.99))
    if rss:
        third = max(1, len(rss) // 3)
        out.update(rss_mib_first_third_max=max(rss[:third]), rss_mib_last_third_max=max(rss[-third:]),
                   rss_mib_max=max(rss))
    print(json.dumps(out), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--api", choices=["ollama", "llama"], required=True)
    p.add_argument("--url", required=True)
    p.add_argument("--model", default="")
    p.add_argument("--streams", default="1,2,4,8")
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--multi-turn", action="store_true")
    p.add_argument("--clients", type=int, default=0, help="soak: clients chatting at once")
    p.add_argument("--duration", type=float, default=60, help="soak: seconds")
    p.add_argument("--pid", type=int, default=0, help="soak: the server's pid, for its memory")
    args = p.parse_args()
    if args.clients:
        soak(args)
        return
    stream(args.api, args.url, args.model, prompt(99), 4)  # warm
    for i, n in enumerate(int(x) for x in args.streams.split(",")):
        print(json.dumps(level(args, n, 16 * i)), flush=True)
    if args.multi_turn:
        print(json.dumps(multi_turn(args)), flush=True)


if __name__ == "__main__":
    main()
