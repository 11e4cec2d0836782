#!/usr/bin/env bash
# The CUDA backend's check on a GPU machine, in one call: build (or take a prepared bundle), run
# the CUDA tests, then bench_cuda (kernels against the measured copy bandwidth and cuBLAS rate) and
# an end-to-end m1-bench, and print a short table. Logs and JSON go to $OUT (default gpu-check-out/).
#
#   scripts/gpu-check.sh prepare   Here, without a GPU: build for sm_90a into build-gpu/ and gather
#                                  what a run needs into gpu-bundle/ (ignored by git): the binaries,
#                                  the shared libraries they use beyond glibc and the CUDA toolkit,
#                                  and the golden vectors; then pack it into gpu-bundle.tar.xz
#                                  (~17 MB of a ~180 MB folder; it fails if the archive would pass
#                                  the 64 MiB a device call carries). For GPU machines that cannot
#                                  install packages; carry gpu-bundle.tar.xz there.
#   scripts/gpu-check.sh           On the GPU machine: runs gpu-bundle/ (unpacked from
#                                  gpu-bundle.tar.xz if need be) when present, else configures and
#                                  builds Release for sm_90a in build-gpu/ first.
#   scripts/gpu-check.sh tp        The tensor-parallel checks alone (one short call): the TP tests
#                                  (ranks sharing the GPU through the peer kernels, NCCL with one
#                                  rank), then decode ms/token of today's path against one rank
#                                  through NCCL (target: at most 1.05x) and two ranks sharing the
#                                  GPU, and the share of a decode step in collectives.
#
# Stages, in order of worth, each under a time limit cut to what is left of M1_GPU_DEADLINE seconds
# (default 420, so a 600-second device call leaves room for the machine's start and a rerun): the
# CUDA tests (a failing test is rerun with CUDA graphs off and under compute-sanitizer), bench_cuda,
# int4 against BF16 decode (m1-bench at 8 layers of the real model's shape, with and without
# --quantize int4, and the ratio of their ms/token), m1-bench at 8K and 128K, a per-kernel profile
# of decode steps and the stall reasons of one lightning prefill, flash prefill and tiled product
# kernel (ncu), the tensor-parallel checks, then, while time is left, m1-bench at 1M and
# compute-sanitizer over the quick tests. A device call returns at most 8 files: the logs travel packed in one archive.
# Environment: M1_GPU_E2E=0 skips m1-bench, M1_GPU_FULL=0 its 1M context, M1_GPU_QUANT=0 the int4
# comparison; M1_GPU_LAYERS overrides the end-to-end depth (default: 8 layers of the real model's
# shape where the GPU holds them, else 4). The end-to-end runs include 32 sequences decoded
# together (issue 16's batch row), and the summary ends with issue 16's goals, each against the
# limits measured in the run (scripts/gpu_goals.py).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUNDLE=$ROOT/gpu-bundle
BUILD=$ROOT/build-gpu
TESTS=(test_cuda_matmul test_cuda_quantized test_cuda_lightning test_cuda_attention test_cuda_moe test_cuda_sampling
       test_cuda_backend test_cuda_tensor_parallel)
TARGETS=("${TESTS[@]}" bench_cuda m1-bench)

build() {
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DM1_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90a >"$1/configure.log"
  cmake --build "$BUILD" -j "$(nproc)" --target "${TARGETS[@]}" >"$1/build.log"
}

if [[ "${1:-}" == prepare ]]; then
  mkdir -p "$BUILD"
  build "$BUILD"
  rm -rf "$BUNDLE"
  mkdir -p "$BUNDLE/bin" "$BUNDLE/lib"
  for t in "${TARGETS[@]}"; do cp "$BUILD/bin/$t" "$BUNDLE/bin/"; done
  strip --strip-debug "$BUNDLE"/bin/*
  # Libraries a bare GPU image may lack: everything but glibc's own, the C++ runtime and CUDA's.
  ldd "$BUNDLE"/bin/* | awk '/=> \// {print $3}' | sort -u |
    grep -Ev '/(libc|libm|libdl|librt|libpthread|libgcc_s|libstdc\+\+|ld-linux[^/]*|libcuda|libcublas[^/]*|libcudart)\.so' |
    xargs -r cp -L -t "$BUNDLE/lib/"
  cp -r "$ROOT/tests/data/golden" "$BUNDLE/golden"
  # Packed: a device call carries at most 64 MiB, and the binaries each hold every kernel (about
  # 20 MB of them each). gzip's 32 KB window sees each copy anew (84 MB packed on 2026-12-06);
  # one xz stream with a dictionary larger than the folder stores the kernels about once.
  tar -cf - -C "$ROOT" gpu-bundle | xz -T1 --lzma2=preset=6,dict=256MiB >"$BUNDLE.tar.xz"
  du -sh "$BUNDLE" "$BUNDLE.tar.xz"
  packed=$(stat -c %s "$BUNDLE.tar.xz")
  if (( packed > 64 * 1024 * 1024 )); then
    echo "gpu-check: $BUNDLE.tar.xz is $packed bytes, more than the 64 MiB a device call carries" >&2
    exit 1
  fi
  exit 0
fi

MODE=${1:-all}
[[ "$MODE" == all || "$MODE" == tp ]] || { echo "gpu-check: unknown mode '$MODE' (prepare, tp, or none)" >&2; exit 2; }
[[ "$MODE" == tp ]] && TESTS=(test_cuda_tensor_parallel)
OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
start=$(date +%s)
deadline=$(( start + ${M1_GPU_DEADLINE:-420} ))
status=0
pack() {
  python3 "$ROOT/scripts/gpu_goals.py" "$LOGS" 2>&1 | tee -a "$LOGS/summary.txt" || true
  cp "$LOGS"/summary.txt "$LOGS"/bench_cuda.json "$LOGS"/m1_bench*.json "$OUT/" 2>/dev/null || true
  tar -czf "$OUT/gpu-check-logs.tgz" -C "$LOGS" .
}
trap 'pack; exit $status' EXIT
trap 'echo "gpu-check: stopped from outside"; status=1; exit' TERM INT
say() { echo "$*" | tee -a "$LOGS/summary.txt"; }
elapsed() { echo $(( $(date +%s) - start )); }
# A stage's limit: its own, cut to what is left before the deadline; 0 when under `floor` is left.
limit() {
  local left=$(( deadline - $(date +%s) ))
  (( left >= ${2:-10} )) && echo $(( left < $1 ? left : $1 )) || echo 0
}
# `within SECONDS COMMAND...`: the command under that limit, or skipped (status 124) at 0, which
# timeout(1) would take for no limit at all.
within() {
  local s=$1
  shift
  (( s > 0 )) || { echo "gpu-check: no time left for $(basename "$1")"; return 124; }
  timeout "$s" "$@"
}

if ! command -v nvidia-smi >/dev/null; then
  echo "gpu-check: no NVIDIA GPU here (nvidia-smi not found): run 'scripts/gpu-check.sh prepare' here, the check on a GPU machine" >&2
  status=2
  exit
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv | tee -a "$LOGS/summary.txt" || true

# A carried archive wins over a folder an earlier call of this lease unpacked. Python's lzma
# unpacks it where the image has no xz.
if [[ -f "$BUNDLE.tar.xz" ]]; then
  rm -rf "$BUNDLE"
  if command -v xz >/dev/null; then
    xz -dc "$BUNDLE.tar.xz" | tar -xf - -C "$ROOT"
  else
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' "$BUNDLE.tar.xz" "$ROOT"
  fi
fi
if [[ -d "$BUNDLE" ]]; then
  BIN=$BUNDLE/bin
  export LD_LIBRARY_PATH="$BUNDLE/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export M1_GOLDEN_DIR=$BUNDLE/golden
  if ldd "$BIN/bench_cuda" | grep -q 'not found'; then
    # cuBLAS from wherever this image keeps it (a Python wheel, say).
    lib=$(find / -xdev -name 'libcublas.so.13*' 2>/dev/null | head -1)
    [[ -n "$lib" ]] && export LD_LIBRARY_PATH="$(dirname "$lib"):$LD_LIBRARY_PATH"
    ldd "$BIN/bench_cuda" | grep 'not found' && say "gpu-check: libraries missing (above)"
  fi
else
  say "gpu-check: building Release for sm_90 in $BUILD"
  build "$LOGS"
  BIN=$BUILD/bin
fi
# NCCL is loaded at run time (--collectives nccl): from wherever this image keeps it.
if ! ldconfig -p 2>/dev/null | grep -q libnccl.so.2; then
  lib=$(find / -xdev -name 'libnccl.so.2' 2>/dev/null | head -1)
  [[ -n "$lib" ]] && export LD_LIBRARY_PATH="$(dirname "$lib"):${LD_LIBRARY_PATH:-}" && say "gpu-check: NCCL from $lib"
fi
say "gpu-check: ready after $(elapsed) s"

# The CUDA tests, each binary's summary kept; a failure fails the check at the end.
failed=()
hung=()
for t in "${TESTS[@]}"; do
  if within "$(limit 60)" "$BIN/$t" --gtest_output="json:$LOGS/$t.json" >"$LOGS/$t.log" 2>&1; then
    say "PASS $t: $(grep -Eo '\[  (PASSED|SKIPPED) \] [0-9]+' "$LOGS/$t.log" | tr -s ' []' ' ' | paste -sd, -) in $(grep -Eo 'ran\. \([0-9]+ ms' "$LOGS/$t.log" | grep -Eo '[0-9]+ ms')"
  else
    code=$?
    say "FAIL $t (exit $code$( (( code == 124 )) && echo ': it hung' )):"
    (( code == 124 )) && hung+=("$t")
    { grep -E '^\[  FAILED  \]|Failure|rror|Which is|Expected|actual' "$LOGS/$t.log" || tail -5 "$LOGS/$t.log"; } | head -30 | tee -a "$LOGS/summary.txt"
    failed+=("$t")
    status=1
  fi
done
say "gpu-check: tests done after $(elapsed) s"

# A failing test again, with CUDA graphs off (graph capture and replay isolated) and under
# compute-sanitizer's memcheck (out-of-bounds and misaligned accesses) and racecheck (shared memory).
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for t in "${failed[@]}"; do
  if [[ " ${hung[*]} " == *" $t "* ]]; then say "  $t hung: no reruns (each would hang to its limit)"; continue; fi
  filter=$(grep -E '^\[  FAILED  \] [A-Za-z0-9_]+\.[A-Za-z0-9_/]+' "$LOGS/$t.log" | awk '{print $4}' | sort -u | paste -sd: -)
  [[ -z "$filter" ]] && filter='*'
  M1_CUDA_GRAPHS=0 within "$(limit 30)" "$BIN/$t" --gtest_filter="$filter" >"$LOGS/$t.nographs.log" 2>&1 &&
    say "  $t passes with M1_CUDA_GRAPHS=0 ($filter)" || say "  $t fails with M1_CUDA_GRAPHS=0 too ($filter)"
  for tool in memcheck racecheck; do
    within "$(limit 45)" "$sanitizer" --tool "$tool" --print-limit 20 "$BIN/$t" --gtest_filter="$filter" >"$LOGS/$t.$tool.log" 2>&1 || true
    say "  $tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$LOGS/$t.$tool.log" | tail -1)"
    grep -m 8 -E '^========= (Invalid|Race|Error|  at )' "$LOGS/$t.$tool.log" | tee -a "$LOGS/summary.txt" || true
  done
done

# Tensor parallelism: decode ms/token of today's path (one rank, no collectives) against one rank
# through NCCL and two ranks sharing the GPU (peer kernels), on the bench preset and on 2 layers of
# the real model's shape; then, with graphs off (collectives are timed with events on eager steps),
# the share of a decode step spent in collectives.
tp_bench() {  # label, preset args, extra flags (both word-split on purpose), M1_CUDA_GRAPHS
  local t
  t=$(limit 120 30)
  (( t > 0 )) || { say "gpu-check: no time left for m1-bench $1"; return; }
  # shellcheck disable=SC2086
  within "$t" env M1_CUDA_GRAPHS="${4:-1}" "$BIN/m1-bench" --device cuda --synthetic $2 --contexts 4k --variants hybrid --decode-tokens 32 \
    --repeats 3 --prefill-chunk 4096 $3 --json "$LOGS/tp_$1.json" >"$LOGS/tp_$1.log" 2>&1 ||
    { status=1; tail -3 "$LOGS/tp_$1.log" | tee -a "$LOGS/summary.txt"; }
}
tp_stage() {
  for shape in bench m1; do
    preset=$shape
    [[ $shape == m1 ]] && preset="m1 --layers 2"
    tp_bench "${shape}_today" "$preset" ""
    tp_bench "${shape}_nccl1" "$preset" "--collectives nccl"
    tp_bench "${shape}_peer2" "$preset" "--tensor-parallel 2 --gpus 0,0"
  done
  tp_bench bench_nccl1_eager bench "--collectives nccl" 0
  tp_bench bench_peer2_eager bench "--tensor-parallel 2 --gpus 0,0" 0
  python3 - "$LOGS" <<'PY' 2>&1 | tee -a "$LOGS/summary.txt"
import json, os, sys
logs = sys.argv[1]
def result(label):
    path = os.path.join(logs, f"tp_{label}.json")
    return json.load(open(path))["results"][0] if os.path.exists(path) else None
print("tensor parallel, decode at depth 4k (median ms/token; share of the step in collectives):")
for shape in ("bench", "m1"):
    today = result(f"{shape}_today")
    for label in ("today", "nccl1", "peer2"):
        r = result(f"{shape}_{label}")
        if not r: print(f"  {shape:5} {label:6} missing"); continue
        ratio = f" ({r['decode_ms_per_token'] / today['decode_ms_per_token']:.3f}x today's)" if today and label != "today" else ""
        print(f"  {shape:5} {label:6} {r['decode_ms_per_token']:8.3f} ms/token{ratio}")
for label in ("bench_nccl1_eager", "bench_peer2_eager"):
    r = result(label)
    if r: print(f"  {label}: decode {r['decode_ms_per_token']:.3f} ms/token, {100 * r['decode_collective_share']:.1f}% in collectives; prefill {100 * r['prefill_collective_share']:.1f}%")
PY
}
if [[ "$MODE" == tp ]]; then
  tp_stage
  say "gpu-check: done in $(elapsed) s, status $status (logs in $OUT/gpu-check-logs.tgz)"
  exit
fi

# A lightning prefill that fails its tests (the tensor-core kernel's warp roles hand tiles over by
# named barriers: a GPU may hang where the emulator did not) is left out of the benchmarks and the
# end-to-end runs, which prefill through it, so that the rest is still measured.
bench_skip=()
if [[ " ${failed[*]} " == *" test_cuda_lightning "* ]]; then
  bench_skip=(--skip "lightning prefill")
  M1_GPU_E2E=0
  say "gpu-check: test_cuda_lightning failed: no lightning prefill benchmarks, no end-to-end runs"
fi
# The warpgroup kernels (wgmma, sm_90a) are opt-in (M1_WGMMA) until a GPU has matched them to the
# mma.sync kernels bit for bit: the products (CudaMatmulWarpgroup in test_cuda_matmul, for BF16
# weights; CudaQuantized.WarpgroupTilesMatchTheMmaTiles in test_cuda_quantized, int8 / int4) and
# the flash prefill (CudaAttention.WarpgroupPrefillGivesTheMmaBits in test_cuda_attention). Each
# family that passed is turned on for the benchmarks and end-to-end runs (M1_WGMMA=1, products or
# attention), and bench_cuda times the mma.sync kernels beside it.
passed() { grep -q "^\[       OK \] $2" "$LOGS/$1.log" 2>/dev/null; }
products=0
attention=0
passed test_cuda_matmul CudaMatmulWarpgroup.MatchesTheMmaTilesBitForBit &&
  passed test_cuda_quantized CudaQuantized.WarpgroupTilesMatchTheMmaTiles && products=1
passed test_cuda_attention CudaAttention.WarpgroupPrefillGivesTheMmaBits && attention=1
case "$products$attention" in
  11) export M1_WGMMA=1 ;;
  10) export M1_WGMMA=products ;;
  01) export M1_WGMMA=attention ;;
  *) unset M1_WGMMA ;;
esac
say "gpu-check: warpgroup kernels that match the mma.sync ones bit for bit: products $products, flash prefill $attention" \
  "(M1_WGMMA=${M1_WGMMA:-0} for the benchmarks and end-to-end runs; logs: test_cuda_matmul, test_cuda_quantized, test_cuda_attention)"
within "$(limit 180)" "$BIN/bench_cuda" --json "$LOGS/bench_cuda.json" "${bench_skip[@]}" 2>&1 | tee -a "$LOGS/summary.txt" || status=1
say "gpu-check: kernels measured after $(elapsed) s"

# The end-to-end depth: 8 layers of the real model's shape (96 GB in BF16) where the GPU holds them.
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
layers=${M1_GPU_LAYERS:-$(( mib > 120000 ? 8 : 4 ))}

# Quantized weights' goal (issue 14): int4 decodes in at most 0.4x the BF16 ms/token, at 8 layers
# of the real model's shape, both in this run. m1-bench's --quantize comes with the loader of
# quantized weights; a build without it says so and skips.
quantized_e2e() {
  if ! "$BIN/m1-bench" --help 2>&1 | grep -q -- '--quantize'; then
    say "gpu-check: this m1-bench has no --quantize: int4 against BF16 decode skipped"
    return
  fi
  local q t json
  for q in bf16 int4; do
    t=$(limit 200 60)
    (( t > 0 )) || { say "gpu-check: no time left for m1-bench $q"; return; }
    json=$LOGS/m1_bench_quantized_$q.json
    local quantize=()
    [[ $q != bf16 ]] && quantize=(--quantize "$q")
    within "$t" "$BIN/m1-bench" --device cuda --synthetic m1 --layers "$layers" "${quantize[@]}" --contexts 512 \
      --variants hybrid --decode-tokens 16 --repeats 1 --json "$json" 2>"$LOGS/m1_bench_quantized_$q.log" |
      tee -a "$LOGS/summary.txt" || { status=1; tail -5 "$LOGS/m1_bench_quantized_$q.log" | tee -a "$LOGS/summary.txt"; return; }
  done
  local files=("$LOGS/m1_bench_quantized_bf16.json" "$LOGS/m1_bench_quantized_int4.json")
  python3 - "${files[@]}" "$layers" <<'PY' | tee -a "$LOGS/summary.txt"
import json, sys
bf16, int4 = (json.load(open(p))["results"][0]["decode_ms_per_token"] for p in sys.argv[1:3])
ratio = int4 / bf16
print(f"{sys.argv[3]} layers: int4 decode {int4:.2f} ms/token, BF16 {bf16:.2f}: {ratio:.2f}x "
      f"(goal <= 0.40x: {'met' if ratio <= 0.4 else 'NOT met'})")
PY
}
[[ "${M1_GPU_E2E:-1}" != 0 && "${M1_GPU_QUANT:-1}" != 0 ]] && quantized_e2e
say "gpu-check: int4 against BF16 decode after $(elapsed) s"

# Issue 16's batch goal: 32 sequences decoded together at the real model's shape give at least 12x
# the tokens/s of one. Batch 1 is the BF16 run above (same settings) when it ran.
batch_e2e() {
  local b t
  for b in 1 32; do
    [[ $b == 1 && -f "$LOGS/m1_bench_quantized_bf16.json" ]] && continue
    t=$(limit 200 60)
    (( t > 0 )) || { say "gpu-check: no time left for m1-bench at batch $b"; return; }
    within "$t" "$BIN/m1-bench" --device cuda --synthetic m1 --layers "$layers" --contexts 512 --variants hybrid \
      --decode-tokens 16 --decode-batch "$b" --repeats 1 --json "$LOGS/m1_bench_batch$b.json" 2>"$LOGS/m1_bench_batch$b.log" |
      tee -a "$LOGS/summary.txt" || { status=1; tail -5 "$LOGS/m1_bench_batch$b.log" | tee -a "$LOGS/summary.txt"; return; }
  done
}
[[ "${M1_GPU_E2E:-1}" != 0 ]] && batch_e2e
say "gpu-check: decode at batch 32 after $(elapsed) s"

e2e() {  # contexts, time limit, floor
  local t
  t=$(limit "$2" "$3")
  (( t > 0 )) || { say "gpu-check: no time left for m1-bench at $1"; return; }
  within "$t" "$BIN/m1-bench" --device cuda --synthetic m1 --layers "$layers" --contexts "$1" --variants hybrid \
    --decode-tokens 8 --repeats 1 --prefill-chunk 8192 --json "$LOGS/m1_bench_${1//,/-}.json" 2>"$LOGS/m1_bench_${1//,/-}.log" |
    tee -a "$LOGS/summary.txt" || { status=1; tail -5 "$LOGS/m1_bench_${1//,/-}.log" | tee -a "$LOGS/summary.txt"; }
}
if [[ "${M1_GPU_E2E:-1}" != 0 ]]; then
  e2e 8k,128k 150 30
  say "gpu-check: end to end at 8K and 128K after $(elapsed) s"
fi

# Where a decode step's device time goes, kernel by kernel: the two steps bench_cuda brackets with
# cudaProfilerStart/Stop, of the bench preset's eager decode at batch 1 and 32.
ncu_bin=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
for batch in 1 32; do
  s=$(limit 90 40)
  (( s > 0 )) || break
  csv=$LOGS/ncu_decode_batch$batch.csv
  within "$s" "$ncu_bin" --profile-from-start off --metrics gpu__time_duration.sum --csv --page raw \
    "$BIN/bench_cuda" --only "decode step, bench preset, batch $batch at depth 512, eager" >"$csv" 2>"$csv.log" || true
  say "kernels of one decode step, bench preset, batch $batch (ncu):"
  python3 "$ROOT/scripts/kernel_times.py" "$csv" 2 2>&1 | tee -a "$LOGS/summary.txt" || true
done

# Why the two prefill kernels furthest from their goals run where they do: one launch of each at 8K
# tokens of the whole model's heads (bench_cuda's first row of its group), with ncu's warp states
# (the stall reasons), scheduler, memory and compute sections and the stall-sampled source lines.
# Then the prefill products' tiled kernel: its first launch in the matmul group is the 8192^3 one
# in fast precision (fewer rows stream or take the skinny kernels). Where M1_WGMMA turned the
# warpgroup kernels on, the flash prefill's and the product's first launches are theirs.
for kernel in "lightning prefill:lightning_prefill_bf16_kernel" "flash prefill:prefill_kernel" \
  "matmul:matmul_bf16_(tiled|warpgroup)"; do
  s=$(limit 75 40)
  (( s > 0 )) || break
  group=${kernel%%:*}
  name=${kernel##*:}
  log=$LOGS/ncu_${name%%_(*}.txt
  within "$s" "$ncu_bin" --kernel-name "regex:$name" --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
    --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --section SourceCounters --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
    "$BIN/bench_cuda" --only "$group" >"$log" 2>&1 || true
  say "$group, one $name launch (ncu; whole report in the logs):"
  grep -E 'Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Issued Ipc|No Eligible|stalled_.*ratio +[a-z]* +[0-9.]*[1-9]|OPT|Est\. Speedup' "$log" |
    sed -E 's/ +/ /g' | head -40 | tee -a "$LOGS/summary.txt" || true
done

tp_stage
say "gpu-check: tensor parallel measured after $(elapsed) s"

[[ "${M1_GPU_E2E:-1}" != 0 && "${M1_GPU_FULL:-1}" != 0 ]] && e2e 1m 240 150

# What is left: the quick tests under memcheck, for accesses the results did not show.
for t in test_cuda_lightning test_cuda_attention test_cuda_sampling; do
  s=$(limit 60 30)
  (( s > 0 )) || break
  within "$s" "$sanitizer" --tool memcheck --print-limit 20 "$BIN/$t" --gtest_filter='-*NearOneMillion*:*Large*' >"$LOGS/$t.memcheck.log" 2>&1 || true
  say "memcheck $t: $(grep -E 'ERROR SUMMARY' "$LOGS/$t.memcheck.log" || echo "no summary (cut at $s s)")"
done
say "gpu-check: done in $(elapsed) s, status $status (logs in $OUT/gpu-check-logs.tgz)"
