#!/usr/bin/env python3
"""Serving figures of m1-serve on one machine: single-stream decode speed, aggregate decode speed
with N concurrent streams (the batching gain), and time to first token of a long prompt while other
streams decode. Starts its own server on a free port.

  benchmarks/serve_bench.py --model DIR [--threads 2] [--streams 8] [--prompt-tokens 2000]

Python's standard library only. Prints a table; --json FILE writes the figures.
"""
import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time


def start_server(binary, model, threads, flags):
    """m1-serve on a free port with `flags`, once its model is ready: the process and its port."""
    proc = subprocess.Popen([binary, "--model", model, "--port", "0", "--threads", str(threads)] + flags,
                            stderr=subprocess.PIPE, text=True)
    port = None
    for line in proc.stderr:
        match = re.search(r"listening on http://[^:]+:(\d+)", line)
        if match:
            port = int(match.group(1))
        if "ready" in line:
            break
    if port is None:
        sys.exit("serve_bench: m1-serve did not start")
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep draining
    return proc, port


class Stream:
    """One streamed completion's timeline: when it was sent, its first and last chunks, its tokens."""

    def __init__(self, port, prompt, max_tokens):
        body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                           "stream_options": {"include_usage": True}})
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        self.sent = time.perf_counter()
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            sys.exit(f"serve_bench: HTTP {response.status}: {response.read()[:200]}")
        self.first = self.last = None
        self.tokens = 0
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("choices"):
                self.first = self.first or now
                self.last = now
            if chunk.get("usage"):
                self.tokens = chunk["usage"]["completion_tokens"]
        conn.close()


def run_streams(port, prompts, max_tokens):
    results = [None] * len(prompts)

    def one(i):
        results[i] = Stream(port, prompts[i], max_tokens)

    workers = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return results


def single_stream(port, tokens):
    s = Stream(port, "The history of the lightning attention mechanism", tokens)
    return (s.tokens - 1) / (s.last - s.first)


def concurrent_streams(port, streams, tokens):
    """Tokens of all streams over the span from the first first-token to the last last-chunk."""
    results = run_streams(port, [f"Stream {i} begins with" for i in range(streams)], tokens)
    span = max(r.last for r in results) - min(r.first for r in results)
    return sum(r.tokens for r in results) / span


def time_to_first_token_under_load(port, prompt_tokens, background_streams):
    background = threading.Thread(target=run_streams,
                                  args=(port, [f"Background {i}" for i in range(background_streams)], 600))
    background.start()
    time.sleep(2.0)  # the background streams are decoding
    prompt = [300 + (i * 7919) % 2000 for i in range(prompt_tokens)]  # valid ids in every preset
    s = Stream(port, prompt, 8)
    background.join()
    return s.first - s.sent


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--bin", default=os.path.join(os.path.dirname(__file__), "..", "build", "bin", "m1-serve"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--background", type=int, default=4)
    parser.add_argument("--json")
    args = parser.parse_args()

    proc, port = start_server(args.bin, args.model, args.threads,
                              ["--max-batch", str(max(args.streams, args.background + 1)), "--max-context", "8192"])
    try:
        single_stream(port, 16)  # warm-up: page in the weights
        single = statistics.median(single_stream(port, args.tokens) for _ in range(3))
        aggregate = concurrent_streams(port, args.streams, args.tokens)
        ttft = time_to_first_token_under_load(port, args.prompt_tokens, args.background)
    finally:
        proc.terminate()
        proc.wait()
    figures = {"single_stream_tokens_per_s": single, "streams": args.streams,
               "aggregate_tokens_per_s": aggregate, "batching_gain": aggregate / single,
               "prompt_tokens": args.prompt_tokens, "background_streams": args.background,
               "time_to_first_token_s": ttft}
    print(f"single-stream decode         {single:8.1f} tok/s")
    print(f"{args.streams} concurrent streams        {aggregate:8.1f} tok/s aggregate ({aggregate / single:.2f}x)")
    print(f"TTFT, {args.prompt_tokens}-token prompt, {args.background} streams decoding: {ttft:6.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
