#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz) with Clang + ASan + UBSan in build-fuzz, replays the
# checked-in corpora (ctest -L fuzz), then fuzzes each target for a bounded time on a scratch copy
# of its corpus (the checked-in corpus never grows). Prints one summary line per target and exits
# non-zero on any crash, leak, timeout or out-of-memory; the failing input stays under
# build-fuzz/fuzz-runs/<target>/artifacts/ and its path is printed.
# Usage: bash scripts/fuzz.sh [seconds-per-target]   (default 60; needs clang and
# libclang-rt-14-dev, installed by scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
BUILD=${MOE_FUZZ_BUILD_DIR:-build-fuzz}
TARGETS=(config topology npy manifest)
if ! [[ "$SECS" =~ ^[0-9]+$ ]] || [ "$SECS" -lt 1 ]; then
  echo "usage: bash scripts/fuzz.sh [seconds-per-target >= 1]" >&2
  exit 2
fi
if ! command -v clang++ >/dev/null; then
  echo "fuzz: clang++ not found (run scripts/setup.sh: it installs clang and libclang-rt-14-dev)" >&2
  exit 2
fi

start=$(date +%s)
CC=clang CXX=clang++ cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_FUZZ=ON >/dev/null
cmake --build "$BUILD" -j "$(nproc)" --target moe_fuzz_targets
built=$(date +%s)
echo "fuzz: built in $((built - start)) s; replaying the seed corpora"
ctest --test-dir "$BUILD" --output-on-failure -L fuzz </dev/null

export ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
# One fuzzer per core at a time (each is single-threaded): 2 cores run the 4 targets in 2 rounds.
JOBS=${MOE_FUZZ_JOBS:-$(nproc)}
fuzz_one() {
  local t=$1 work="$BUILD/fuzz-runs/$1" rc=0
  local dict=()
  if [ -f "tests/fuzz/$t.dict" ]; then dict=(-dict="tests/fuzz/$t.dict"); fi
  "$BUILD/tests/fuzz/${t}_fuzz" "$work/corpus" "${dict[@]}" -max_total_time="$SECS" -timeout=10 \
    -rss_limit_mb=2048 -max_len=4096 -print_final_stats=1 -artifact_prefix="$work/artifacts/" \
    </dev/null >"$work/fuzz.log" 2>&1 || rc=$?
  echo "$rc" >"$work/rc"
}
for t in "${TARGETS[@]}"; do
  work="$BUILD/fuzz-runs/$t"
  rm -rf "$work"
  mkdir -p "$work/corpus" "$work/artifacts"
  cp tests/fuzz/corpus/"$t"/* "$work/corpus/"
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  echo "fuzz: $t for ${SECS} s (log: $work/fuzz.log)"
  fuzz_one "$t" &
done
wait

summary=()
failed=0
for t in "${TARGETS[@]}"; do
  work="$BUILD/fuzz-runs/$t"
  rc=$(cat "$work/rc" 2>/dev/null || echo "?")
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/fuzz.log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$work/fuzz.log" | tail -1)
  found=$(find "$work/artifacts" -type f | head -1)
  if [ "$rc" != 0 ] || [ -n "$found" ]; then
    failed=1
    echo "---- $t: last lines of $work/fuzz.log"
    tail -n 40 "$work/fuzz.log"
    summary+=("$(printf 'fuzz: %-9s FAILED (exit %s) after %s executions; input kept at %s' "$t" "$rc" "${execs:-?}" "${found:-(none written)}")")
  else
    summary+=("$(printf 'fuzz: %-9s ok  %9s executions in %s s (%s exec/s), corpus %s -> %s inputs' "$t" \
      "${execs:-?}" "$SECS" "${rate:-?}" "$(ls tests/fuzz/corpus/"$t" | wc -l)" "$(ls "$work/corpus" | wc -l)")")
  fi
done
printf '%s\n' "${summary[@]}"
echo "fuzz: total $(( $(date +%s) - start )) s"
exit "$failed"
