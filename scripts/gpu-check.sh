#!/usr/bin/env bash
# The CUDA backend's check on a GPU machine, in one call: build (or take a prepared bundle), run
# the CUDA tests, then bench_cuda (kernels against the measured copy bandwidth and cuBLAS rate) and
# an end-to-end m1-bench, and print a short table. Logs and JSON go to $OUT (default gpu-check-out/).
#
#   scripts/gpu-check.sh prepare   Here, without a GPU: build for sm_90 into build-gpu/ and gather
#                                  what a run needs into gpu-bundle/ (ignored by git): the binaries,
#                                  the shared libraries they use beyond glibc and the CUDA toolkit,
#                                  and the golden vectors; then pack it into gpu-bundle.tgz (~22 MB,
#                                  a third of the folder). For GPU machines that cannot install
#                                  packages; carry gpu-bundle.tgz there.
#   scripts/gpu-check.sh           On the GPU machine: runs gpu-bundle/ (unpacked from
#                                  gpu-bundle.tgz if need be) when present, else configures and
#                                  builds Release for sm_90 in build-gpu/ first.
#
# Environment: M1_GPU_E2E=0 skips m1-bench; M1_GPU_FULL=1 adds the 1M-token context to it (run
# it in a call of its own: each stage's time limit is sized for the default run); M1_GPU_LAYERS
# overrides the end-to-end depth (default: 8 layers of the real model's shape where the GPU holds
# them, else 4).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUNDLE=$ROOT/gpu-bundle
BUILD=$ROOT/build-gpu
TESTS=(test_cuda_matmul test_cuda_lightning test_cuda_attention test_cuda_moe test_cuda_sampling test_cuda_backend)
TARGETS=("${TESTS[@]}" bench_cuda m1-bench)

build() {
  cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DM1_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 >"$1/configure.log"
  cmake --build "$BUILD" -j "$(nproc)" --target "${TARGETS[@]}" >"$1/build.log"
}

if [[ "${1:-}" == prepare ]]; then
  mkdir -p "$BUILD"
  build "$BUILD"
  rm -rf "$BUNDLE"
  mkdir -p "$BUNDLE/bin" "$BUNDLE/lib" "$BUNDLE/shared"
  for t in "${TARGETS[@]}"; do cp "$BUILD/bin/$t" "$BUNDLE/bin/"; done
  strip --strip-debug "$BUNDLE"/bin/*
  # Libraries a bare GPU image may lack: everything but glibc's own, the C++ runtime and CUDA's.
  ldd "$BUNDLE"/bin/* | awk '/=> \// {print $3}' | sort -u |
    grep -Ev '/(libc|libm|libdl|librt|libpthread|libgcc_s|libstdc\+\+|ld-linux[^/]*|libcuda|libcublas[^/]*|libcudart)\.so' |
    xargs -r cp -L -t "$BUNDLE/lib/"
  cp -r "$ROOT/../shared/golden" "$BUNDLE/shared/"
  # Packed: a device call carries at most 64 MiB, and the binaries each hold every kernel.
  tar -czf "$BUNDLE.tgz" -C "$ROOT" gpu-bundle
  du -sh "$BUNDLE" "$BUNDLE.tgz"
  exit 0
fi

OUT=${OUT:-$ROOT/gpu-check-out}
mkdir -p "$OUT"
start=$(date +%s)
if ! command -v nvidia-smi >/dev/null; then
  echo "gpu-check: no NVIDIA GPU here (nvidia-smi not found): run 'scripts/gpu-check.sh prepare' here, the check on a GPU machine" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# A carried archive wins over a folder an earlier call of this lease unpacked.
if [[ -f "$BUNDLE.tgz" ]]; then rm -rf "$BUNDLE" && tar -xzf "$BUNDLE.tgz" -C "$ROOT"; fi
if [[ -d "$BUNDLE" ]]; then
  BIN=$BUNDLE/bin
  export LD_LIBRARY_PATH="$BUNDLE/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export M1_SHARED_DIR=$BUNDLE/shared
else
  echo "gpu-check: building Release for sm_90 in $BUILD"
  build "$OUT"
  BIN=$BUILD/bin
fi
echo "gpu-check: ready after $(( $(date +%s) - start )) s"

# The CUDA tests, each binary's summary kept; a failure fails the check at the end. Every stage has
# a time limit, so a hung kernel costs its stage and not the whole lease; together they fit one
# 600-second device call.
status=0
for t in "${TESTS[@]}"; do
  if timeout 60 "$BIN/$t" --gtest_output="json:$OUT/$t.json" >"$OUT/$t.log" 2>&1; then
    echo "PASS $t ($(grep -Eo '\[  PASSED  \] [0-9]+ tests?' "$OUT/$t.log" | head -1))"
  else
    echo "FAIL $t (exit $?):"; { grep -E '^\[  FAILED  \]|Failure|error' "$OUT/$t.log" || true; } | head -20
    status=1
  fi
done
echo "gpu-check: tests done after $(( $(date +%s) - start )) s"

timeout 180 "$BIN/bench_cuda" --json "$OUT/bench_cuda.json" | tee "$OUT/bench_cuda.txt" || status=1
echo "gpu-check: kernels measured after $(( $(date +%s) - start )) s"

if [[ "${M1_GPU_E2E:-1}" != 0 ]]; then
  mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
  layers=${M1_GPU_LAYERS:-$(( mib > 120000 ? 8 : 4 ))}
  contexts=8k,128k
  [[ "${M1_GPU_FULL:-0}" == 1 ]] && contexts=8k,128k,1m
  timeout 150 "$BIN/m1-bench" --device cuda --synthetic m1 --layers "$layers" --contexts "$contexts" --variants hybrid \
    --decode-tokens 8 --repeats 1 --prefill-chunk 8192 --json "$OUT/m1_bench.json" --svg "$OUT/m1_bench.svg" \
    2>"$OUT/m1_bench.log" | tee "$OUT/m1_bench.txt" || { status=1; tail -5 "$OUT/m1_bench.log"; }
fi
echo "gpu-check: done in $(( $(date +%s) - start )) s, status $status (logs and JSON in $OUT)"
exit $status
