#!/usr/bin/env bash
# Runs every fuzz target for SECONDS, JOBS at a time (libFuzzer uses one core), starting from its
# seed corpus (corpus/NAME for fuzz_NAME), then prints a summary of libFuzzer's final statistics.
# New corpus entries, crash reproducers and logs go under OUT_DIR, never into the source tree.
# Fails if any target crashed, leaked, timed out or tripped a sanitizer.
# Usage: run_fuzzers.sh BIN_DIR OUT_DIR SECONDS [JOBS]
set -euo pipefail

bin=$1
out=$2
seconds=$3
jobs=${4:-1}
seeds=$(cd "$(dirname "$0")" && pwd)/corpus

# libFuzzer turns the first report of any sanitizer into a crash with a saved reproducer.
export ASAN_OPTIONS=detect_leaks=1:halt_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export TMPDIR=$out/tmp  # the targets' scratch files
mkdir -p "$TMPDIR"

# Runs fuzz_NAME; its log ends up in OUT_DIR/NAME/fuzz.log, its exit status in .../status.
fuzz() {
  local name=$1 work=$out/$1 status=0
  rm -rf "$work/crashes" && mkdir -p "$work/corpus" "$work/crashes"
  # The first corpus directory receives what the run finds; the seeds are only read.
  "$bin/fuzz_$name" -max_total_time="$seconds" -timeout=20 -print_final_stats=1 \
    -artifact_prefix="$work/crashes/" "$work/corpus" "$seeds/$name" >"$work/fuzz.log" 2>&1 || status=$?
  echo $status >"$work/status"
}

target_failed() { [ "$(cat "$out/$1/status")" != 0 ]; }

# The figure after `label` in the last line of the log that has one.
last_stat() { grep -o "$1 *[0-9]*" "$2" | tail -n 1 | grep -o '[0-9]*$' || echo '-'; }

names=()
for dir in "$seeds"/*/; do
  names+=("$(basename "$dir")")
  echo "fuzz_${names[-1]}: ${seconds}s"
  fuzz "${names[-1]}" &
  if [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; then wait -n; fi
done
wait

any_failed=0
for name in "${names[@]}"; do
  if target_failed "$name"; then
    any_failed=1
    tail -n 60 "$out/$name/fuzz.log"
    echo "fuzz_$name FAILED: log in $out/$name/fuzz.log, reproducer in $out/$name/crashes/"
    echo
  fi
done
printf '%-18s %7s %12s %9s %6s %7s\n' target result executions exec/s cov ft
for name in "${names[@]}"; do
  log=$out/$name/fuzz.log
  printf '%-18s %7s %12s %9s %6s %7s\n' "$name" "$(target_failed "$name" && echo FAILED || echo ok)" \
    "$(last_stat stat::number_of_executed_units: "$log")" "$(last_stat stat::average_exec_per_sec: "$log")" \
    "$(last_stat cov: "$log")" "$(last_stat ft: "$log")"
done
exit $any_failed
