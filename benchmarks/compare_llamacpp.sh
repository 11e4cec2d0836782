#!/usr/bin/env bash
# m1 against its CPU peer, llama.cpp, on the same checkpoint: pp512 (prompt tokens/s) and tg64
# (generated tokens/s) at depths 0 and 4096, the peer through its bench script (LLAMACPP_BENCH). The two
# run interleaved, one sample each per round (m1, llama.cpp, m1, llama.cpp, ...) because these
# machines drift 10-20% between runs; medians over rounds are compared. Decode is also put against
# its limit: weight bytes read per token over the read bandwidth m1-bench measures in each round.
#   benchmarks/compare_llamacpp.sh MODEL_DIR [THREADS]
# Environment: ROUNDS (default 3); PRECISION, m1's (default fast: like llama.cpp's BF16 path, it
# multiplies bf16 operands); M1_BENCH, the m1-bench binary (default build/bin/m1-bench);
# LLAMACPP_BENCH (required), the peer's benchmark script: it builds llama.cpp, converts MODEL_DIR to
# GGUF and runs llama-bench with the arguments given (the project's peer kit provides one);
# DEPTHS (default 0,4096), the context depths of both.
# Quantized: M1_QUANTIZE=int8|int4 (with M1_GROUP_SIZE, M1_QUANTIZE_LM_HEAD=1) quantizes m1's weights
# at load; LLAMA_QUANT=Q8_0|Q4_0|... makes the peer's script benchmark llama-quantize's copy. Decode
# is then put against the limit of the bytes m1 reads (codes and scales) only.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
model="$(cd "${1:?usage: compare_llamacpp.sh MODEL_DIR [THREADS]}" && pwd)"
threads="${2:-2}"
rounds="${ROUNDS:-3}"
precision="${PRECISION:-fast}"
depths="${DEPTHS:-0,4096}"
quantize=()
[ -n "${M1_QUANTIZE:-}" ] && quantize+=(--quantize "$M1_QUANTIZE")
[ -n "${M1_GROUP_SIZE:-}" ] && quantize+=(--group-size "$M1_GROUP_SIZE")
[ "${M1_QUANTIZE_LM_HEAD:-0}" = 1 ] && quantize+=(--quantize-lm-head)
m1_bench="${M1_BENCH:-$repo/build/bin/m1-bench}"
peer="${LLAMACPP_BENCH:-}"
[ -x "$m1_bench" ] || { echo "compare_llamacpp: $m1_bench not found (build m1-bench, or set M1_BENCH)" >&2; exit 1; }
[ -n "$peer" ] || { echo "compare_llamacpp: LLAMACPP_BENCH is not set (the peer's bench.sh)" >&2; exit 1; }
[ -x "$peer" ] || { echo "compare_llamacpp: LLAMACPP_BENCH=$peer is not an executable script" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# Runs a command with its output in $work/log; on failure shows the end of it and stops.
logged() {
  "$@" >"$work/out" 2>"$work/log" || { echo "compare_llamacpp: failed: $*" >&2; tail -n 20 "$work/log" >&2; exit 1; }
}

for round in $(seq 1 "$rounds"); do
  echo "compare_llamacpp: round $round/$rounds: m1" >&2
  # Build a context of 0 or 4096 tokens, time 512 more; decode 64 at that depth.
  logged "$m1_bench" --model "$model" --threads "$threads" --precision "$precision" --variants hybrid --contexts "$depths" --prefill-tokens 512 \
    --decode-tokens 64 --repeats 1 --measure-bandwidth --json "$work/m1-$round.json" "${quantize[@]}"
  echo "compare_llamacpp: round $round/$rounds: llama.cpp$([ "$round" = 1 ] && echo ' (builds and converts once: minutes)')" >&2
  logged "$peer" "$model" "$threads" -p 512 -n 64 -d "$depths" -r 1 -o json
  mv "$work/out" "$work/llamacpp-$round.json"
done

/usr/bin/python3 - "$work" "$model" "$threads" "$rounds" "$depths" "${LLAMA_QUANT:-}" <<'PY'
import glob, json, statistics, sys

work, model, threads, rounds, depths, llama_quant = sys.argv[1:]
depths = [int(d) for d in depths.split(",")]
ours = [json.load(open(f)) for f in sorted(glob.glob(f"{work}/m1-*.json"))]
theirs = [json.load(open(f)) for f in sorted(glob.glob(f"{work}/llamacpp-*.json"))]

def m1_rate(test, depth):
    key = "prefill_tokens_per_s" if test == "pp" else "decode_tokens_per_s"
    return statistics.median(r[key] for run in ours for r in run["results"] if r["context"] == depth)

def llamacpp_rate(test, depth):
    def matches(e):
        return e["n_depth"] == depth and (e["n_prompt"] > 0 if test == "pp" else e["n_gen"] > 0)
    return statistics.median(e["avg_ts"] for run in theirs for e in run if matches(e))

bandwidth = statistics.median(run["read_bandwidth_bytes_per_s"] for run in ours)
bytes_per_token = ours[0]["results"][0]["weight_bytes_per_token"]
limit = bandwidth / bytes_per_token  # decode tokens/s if every weight byte streamed at that rate

print(f"# {model}: m1 vs llama.cpp, {threads} threads, medians of {rounds} interleaved rounds")
print(f"# m1: {ours[0]['machine']['backend']} | {ours[0]['model']['dtype']} | llama.cpp: {llama_quant or 'BF16'}")
same_bytes = not llama_quant and "quantized" not in ours[0]["model"]["dtype"]
print(f"# decode limit: {bytes_per_token / 1e6:.1f} MB of weights per token / {bandwidth / 1e9:.1f} GB/s read bandwidth"
      f" = {limit:.1f} tok/s")
print(f"{'test':<14} {'m1 tok/s':>10} {'llama.cpp tok/s':>16} {'ratio':>7} {'m1 % limit':>11} {'llama.cpp % limit':>18}")
for test, tokens in (("pp", 512), ("tg", 64)):
    for depth in depths:
        a, b = m1_rate(test, depth), llamacpp_rate(test, depth)
        theirs_share = f"{100 * b / limit:>17.0f}%" if same_bytes else f"{'-':>18}"
        share = f"{100 * a / limit:>10.0f}% {theirs_share}" if test == "tg" else f"{'-':>11} {'-':>18}"
        print(f"{test}{tokens} @ d{depth:<6} {a:>10.1f} {b:>16.1f} {a / b:>7.2f} {share}")
PY
