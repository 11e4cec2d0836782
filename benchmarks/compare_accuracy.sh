#!/usr/bin/env bash
# Accuracy of quantized weights, m1 beside llama.cpp, on one checkpoint: for every position of a
# prompt, the relative error of all logits and the greedy agreement (the share of positions whose
# largest logit is the reference's). The reference is the float64 golden logits when MODEL_DIR
# holds golden.json and golden_logits.f32 (tests/data/golden), else m1's exact unquantized logits.
#   benchmarks/compare_accuracy.sh MODEL_DIR [TOKENS]
# m1: int8 and int4 (groups of 32), fast and exact precision, the LM head kept and quantized.
# llama.cpp: its BF16, Q8_0 and Q4_0 (quantized by its own llama-quantize through the peer's
# bench script), logits from benchmarks/llamacpp_logits.cpp built against the peer's llama.cpp.
# Environment: LLAMACPP_BENCH (required), the peer's bench.sh (its setup.sh, beside it, builds
# llama.cpp); M1_BIN (default build/bin); THREADS (default 2). TOKENS: prompt length for a model
# without golden tokens (default 128, pseudo-random ids).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
model="$(cd "${1:?usage: compare_accuracy.sh MODEL_DIR [TOKENS]}" && pwd)"
count="${2:-128}"
threads="${THREADS:-2}"
bin="${M1_BIN:-$repo/build/bin}"
peer="${LLAMACPP_BENCH:-}"
[ -x "$bin/m1-generate" ] || { echo "compare_accuracy: $bin/m1-generate not found (build it, or set M1_BIN)" >&2; exit 1; }
[ -x "$peer" ] || { echo "compare_accuracy: LLAMACPP_BENCH is not the peer's bench.sh" >&2; exit 1; }
/usr/bin/python3 -c 'import numpy' 2>/dev/null || { echo "compare_accuracy: needs python3-numpy" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
logged() {
  "$@" >"$work/out" 2>"$work/log" || { echo "compare_accuracy: failed: $*" >&2; tail -n 20 "$work/log" >&2; exit 1; }
}

# The peer writes its GGUF files beside the checkpoint: a golden model is copied first.
if [ -f "$model/golden.json" ]; then
  cp -r "$model" "$work/model"
  model="$work/model"
  ids="$(/usr/bin/python3 -c 'import json,sys; print(",".join(map(str, json.load(open(sys.argv[1]))["tokens"])))' "$model/golden.json")"
else
  ids="$(/usr/bin/python3 -c 'import json,random,sys
vocab = json.load(open(sys.argv[1]))["vocab_size"]
r = random.Random(7)
print(",".join(str(r.randrange(vocab)) for _ in range(int(sys.argv[2]))))' "$model/config.json" "$count")"
fi

llama_bin="$("$(dirname "$peer")/setup.sh")"
llama_src="$llama_bin/../.."
g++ -std=c++17 -O2 "$repo/benchmarks/llamacpp_logits.cpp" -I"$llama_src/include" -I"$llama_src/ggml/include" \
  -L"$llama_bin" -Wl,-rpath,"$llama_bin" -lllama -o "$work/llamacpp_logits"

m1_logits() {  # NAME FLAGS...
  local name=$1; shift
  echo "compare_accuracy: m1 $name" >&2
  logged "$bin/m1-generate" --model "$model" --prompt-ids "$ids" --max-tokens 1 --threads "$threads" --logits-out "$work/$name.f32" "$@"
}
m1_logits m1-reference --precision exact
for type in int8 int4; do
  m1_logits "m1-$type-fast" --quantize "$type"
  m1_logits "m1-$type-exact" --quantize "$type" --precision exact
  m1_logits "m1-$type-fast-lm-head" --quantize "$type" --quantize-lm-head
done
m1_logits m1-bf16-fast
for quant in BF16 Q8_0 Q4_0; do
  echo "compare_accuracy: llama.cpp $quant (converts and quantizes once: minutes)" >&2
  q=""; [ "$quant" = BF16 ] || q="$quant"
  LLAMA_QUANT="$q" logged "$peer" "$model" "$threads" -p 0 -n 1 -r 1
  gguf="$model/llamacpp.gguf"; [ -z "$q" ] || gguf="$model/llamacpp-$q.gguf"
  logged "$work/llamacpp_logits" "$gguf" "$ids" "$work/llamacpp-$quant.f32" "$threads"
done

/usr/bin/python3 - "$work" "$model" <<'PY'
import json, os, sys
import numpy as np
work, model = sys.argv[1:]
vocab = json.load(open(f"{model}/config.json"))["vocab_size"]
golden = os.path.exists(f"{model}/golden_logits.f32")
ref = np.fromfile(f"{model}/golden_logits.f32" if golden else f"{work}/m1-reference.f32", dtype=np.float32).astype(np.float64)
ref = ref.reshape(-1, vocab)
print(f"# {model}: {ref.shape[0]} positions, reference: {'float64 golden logits' if golden else 'm1 exact, unquantized'}")
print(f"{'configuration':<28} {'relative error':>15} {'greedy agreement':>17}")
names = ["m1-reference"] if golden else []
names += ["m1-bf16-fast"] + [f"m1-{t}-{v}" for t in ("int8", "int4") for v in ("fast", "exact", "fast-lm-head")]
names += ["llamacpp-BF16", "llamacpp-Q8_0", "llamacpp-Q4_0"]
for name in names:
    got = np.fromfile(f"{work}/{name}.f32", dtype=np.float32).astype(np.float64)
    got = got.reshape(-1, vocab)[: ref.shape[0]]
    error = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    agree = np.mean(np.argmax(got, axis=1) == np.argmax(ref, axis=1))
    print(f"{name:<28} {error:>15.3g} {agree:>17.3f}")
PY
