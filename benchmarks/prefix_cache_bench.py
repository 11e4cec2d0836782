#!/usr/bin/env python3
"""Time to first token of a conversation's next turn, with m1-serve's prefix cache on (warm) and
off (cold): a conversation of N tokens has been sent, and the next turn adds 64 new tokens.

  benchmarks/prefix_cache_bench.py --model DIR [--threads 2] [--contexts 1000,16000] [--repeats 3]
  benchmarks/prefix_cache_bench.py --warm-url http://127.0.0.1:8080 --cold-url http://127.0.0.1:8081

With --model it starts two servers on the model: one with the cache (--cache-every 0, so that a
conversation holds one snapshot and its size is the bytes per snapshot) and one with --cache-mb 0;
with the URLs it measures servers already running (the cold one must run with --cache-mb 0).
Requests go to one server at a time, each next turn to the cold server and then the warm one, so
that both meet the machine as it is then. Prompts are token ids through /v1/completions, so their
lengths are exact. Each figure is the median of --repeats runs (the cold turn of a conversation of
32,000 tokens or more once: it takes minutes on a small CPU); the machine may be shared, so
medians, and the load average is reported.

Python's standard library only. Prints a table; --json FILE writes the figures.
"""
import argparse
import http.client
import json
import os
import re
import statistics
import sys
import time
import urllib.parse

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from serve_bench import start_server  # noqa: E402


def request(url, method, path, body=None):
    parts = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=3600)
    conn.request(method, path, json.dumps(body) if body is not None else None, {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    if response.status != 200:
        sys.exit(f"prefix_cache_bench: HTTP {response.status}: {data[:300]}")
    return data


def first_token(url, prompt, salt):
    """Seconds from sending a streamed one-token completion to its first token, and the usage."""
    parts = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=3600)
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "cache_salt": salt}
    sent = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        sys.exit(f"prefix_cache_bench: HTTP {response.status}: {response.read()[:300]}")
    first, usage = None, None
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("choices") and first is None:
            first = time.perf_counter() - sent
        if chunk.get("usage"):
            usage = chunk["usage"]
    conn.close()
    return first, usage


def metrics(url):
    text = request(url, "GET", "/metrics").decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(m1_prefix_cache_\w+) (\S+)$", text, re.M)}


def conversation(length, seed):
    """`length` valid token ids of the full vocabulary (no special tokens), different per seed."""
    return [1000 + (seed * 104729 + i * 7919) % 150000 for i in range(length)]


def next_turn(history, repeat):
    return history + conversation(64, 1000 + repeat)


def measure(warm_url, cold_url, length, repeats):
    """The history sent once to the warm server (a cold prefill that leaves a snapshot), then
    `repeats` next turns of 64 new tokens, each to the cold server and then the warm one, so that
    both see the machine as it is then."""
    salt = f"conversation-{length}"
    history = conversation(length, length)
    before = metrics(warm_url)
    first_token(warm_url, history, salt)
    snapshot = metrics(warm_url)["m1_prefix_cache_bytes"] - before.get("m1_prefix_cache_bytes", 0)
    cold, warm, cached, load = [], [], None, []
    for r in range(repeats):
        turn = next_turn(history, r)
        if r < (1 if length >= 32000 else repeats):
            cold.append(first_token(cold_url, turn, "cold")[0])
        ttft, usage = first_token(warm_url, turn, salt)
        warm.append(ttft)
        cached = usage["prompt_tokens_details"]["cached_tokens"]
        load.append(os.getloadavg()[0])
    row = {"context_tokens": length, "cold_ttft_s": statistics.median(cold), "warm_ttft_s": statistics.median(warm),
           "cold_runs": cold, "warm_runs": warm, "cached_tokens": cached, "snapshot_bytes": snapshot,
           "load_average": load}
    row["speedup"] = row["cold_ttft_s"] / row["warm_ttft_s"]
    print(f"  {length:>6} tokens: cold {row['cold_ttft_s']:8.3f} s (runs {', '.join(f'{t:.2f}' for t in cold)}), "
          f"warm {row['warm_ttft_s']:6.3f} s (runs {', '.join(f'{t:.3f}' for t in warm)}), {cached} cached, "
          f"load average {min(load):.1f}-{max(load):.1f}", flush=True)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--bin", default=os.path.join(os.path.dirname(__file__), "..", "build", "bin", "m1-serve"))
    parser.add_argument("--warm-url")
    parser.add_argument("--cold-url")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contexts", default="1000,16000,64000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if not args.model and not (args.warm_url and args.cold_url):
        sys.exit("prefix_cache_bench: give --model, or both --warm-url and --cold-url")

    servers = []
    try:
        if args.model:  # both up at once; requests go to one at a time
            for flags in (["--cache-every", "0"], ["--cache-mb", "0"]):
                servers.append(start_server(args.bin, args.model, args.threads, flags + ["--max-context", "70000"]))
            warm_url, cold_url = (f"http://127.0.0.1:{port}" for _, port in servers)
        else:
            warm_url, cold_url = args.warm_url, args.cold_url
        rows = [measure(warm_url, cold_url, length, args.repeats) for length in contexts]
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait()

    print("\n| conversation | cold TTFT | warm TTFT | speed-up | tokens prefilled warm | snapshot |")
    print("|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        length = row["context_tokens"]
        print(f"| {length:,} + 64 | {row['cold_ttft_s']:.3f} s | {row['warm_ttft_s']:.3f} s | {row['speedup']:.1f}x "
              f"| {length + 64 - row['cached_tokens']} | {row['snapshot_bytes'] / 2**20:.1f} MiB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "repeats": args.repeats, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
