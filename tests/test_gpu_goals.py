#!/usr/bin/env python3
"""scripts/gpu_goals.py against runs made up here: the table a GPU run ends with must read every
row it names, judge each against its goal, and say MISSING (never met) for what the run lacks.

    test_gpu_goals.py PATH_TO_gpu_goals.py
"""
import json
import os
import re
import subprocess
import sys
import tempfile
import unittest

SCRIPT = None


def table(logs):
    """The script's rows: what -> (now, verdict, source), and its exit status."""
    done = subprocess.run([sys.executable, SCRIPT, logs], capture_output=True, text=True, timeout=60)
    rows = {}
    row = re.compile(r"^  (.+?) +(missing|\S+)(?: [a-z]+)? +(?:>=|<=) \S+(?: [a-z]+)?  (met|NOT met|MISSING) +(.*)$")
    for line in done.stdout.splitlines()[2:]:
        match = row.match(line)
        if match:
            rows[match.group(1)] = (match.group(2), match.group(3), match.group(4))
    return rows, done.returncode, done.stdout


def write(logs, name, value):
    with open(os.path.join(logs, name), "w") as f:
        json.dump(value, f)


def bench_row(name, ms, fraction=None):
    row = {"name": name, "ms": ms}
    if fraction is not None:
        row["fraction_of_limit"] = fraction
    return row


class GpuGoals(unittest.TestCase):
    def test_an_empty_run_misses_every_row(self):
        with tempfile.TemporaryDirectory() as logs:
            rows, status, out = table(logs)
        self.assertEqual(status, 0, out)
        self.assertGreaterEqual(len(rows), 13, out)
        for what, (_, verdict, _) in rows.items():
            self.assertEqual(verdict, "MISSING", what)

    def test_a_run_is_judged_row_by_row(self):
        with tempfile.TemporaryDirectory() as logs:
            write(logs, "bench_cuda.json", {"limits": {"copy_gb_s": 4000.0, "cublas_tflops": 700.0}, "results": [
                bench_row("flash prefill 64q/8kv x128 bf16, 65536 tokens", 300.0, 0.55),
                bench_row("flash prefill 64q/8kv x128 bf16, 65536 tokens, 2 stages", 290.0, 0.57),
                bench_row("flash prefill 8q/1kv x128 bf16, 512 tokens at depth 32768, narrow CTAs", 1.0, 0.1),
                bench_row("flash prefill 8q/1kv x128 bf16, 512 tokens at depth 32768, wide CTAs", 2.5, 0.04),
                bench_row("flash prefill 8q/1kv x128 bf16, 512 tokens at depth 32768, split chunks", 0.6, 0.17),
                bench_row("lightning prefill 64x128 bf16, 65536 tokens", 5.0, 0.2),
                bench_row("matmul fast m=8192 n=8192 k=8192", 3.1, 0.41),
                bench_row("sampling, vocab 200064, batch 1, top-p 0.95, temperature 1.0 (80.0 us)", 0.08),
            ]})
            # 11.6 GB a token at batch 1 in 4 ms (73% of 4,000 GB/s); 82 GB a step at batch 32 in 25 ms.
            write(logs, "m1_bench_batch1.json", {"results": [{"decode_ms_per_token": 4.0, "decode_tokens_per_s": 250.0,
                                                              "weight_bytes_per_token": 11.6e9,
                                                              "weight_bytes_per_step": 11.6e9}]})
            write(logs, "m1_bench_batch32.json", {"results": [{"decode_ms_per_token": 25.0, "decode_tokens_per_s": 1280.0,
                                                               "weight_bytes_per_token": 11.6e9,
                                                               "weight_bytes_per_step": 82e9}]})
            rows, status, out = table(logs)
        self.assertEqual(status, 0, out)
        self.assertEqual(rows["flash prefill 64q/8kv x128, 64K tokens"][:2], ("55.0%", "met"), out)
        self.assertEqual(rows["lightning prefill bf16, 64K tokens"][:2], ("20.0%", "NOT met"), out)
        self.assertEqual(rows["prefill product (fast, 8192^3)"][:2], ("41.0%", "met"), out)
        self.assertEqual(rows["flash prefill, 8q/1kv, 512 tokens at 32K: wide / narrow"][:2], ("2.50", "met"), out)
        self.assertEqual(rows["flash prefill, 8q/1kv, 512 tokens at 32K: narrow / split"][:2], ("1.67", "met"), out)
        # 3 stages slower than 2: the planner's choice is to go back.
        self.assertEqual(rows["flash prefill 64q/8kv, 64K tokens: 2 / 3 K/V stages"][:2], ("0.97", "NOT met"), out)
        self.assertEqual(rows["top-p 0.95 draw, vocab 200,064, batch 1"][:2], ("80.00", "met"), out)
        self.assertEqual(rows["top-k 50 + top-p 0.95 draw, vocab 200,064, batch 1"][1], "MISSING", out)
        self.assertEqual(rows["lightning prefill, 8 heads, 8K tokens: whole / split"][1], "MISSING", out)
        self.assertEqual(rows["decode, real shape, batch 1"][:2], ("72.5%", "NOT met"), out)
        now, verdict, source = rows["decode, real shape, batch 32 / batch 1 tokens/s"]
        self.assertEqual((now, verdict), ("5.12", "NOT met"), out)
        # 32 x 11.6 / 82 = 4.5: the bound at equal shares; 82 GB in 25 ms is 82% of the copy rate.
        self.assertIn("bound at equal shares of the copy rate 4.5x", source)
        self.assertIn("shares 82% at batch 32, 72% at 1", source)


if __name__ == "__main__":
    SCRIPT = sys.argv.pop(1)
    unittest.main()
