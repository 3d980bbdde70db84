#!/usr/bin/env bash
# fuzz/run.sh [seconds] -- build the libFuzzer harness with clang and fuzz the
# public API of m3sparse (CPU backend) for the given time (default 120 s).
#
#   - configures a separate build directory (build-fuzz/, or $M3S_FUZZ_BUILD)
#     with CC=clang (or $M3S_FUZZ_CC) from fuzz/CMakeLists.txt, builds m3s-fuzz;
#   - fuzzes a scratch copy of the committed seed corpus fuzz/corpus/ (the
#     committed files are never modified);
#   - prints the executions, the API calls made, the fraction rejected as
#     invalid, and the corpus size before and after;
#   - exits 0 when the time ran out without a finding, non-zero on a crash,
#     a sanitizer report, an invariant violation, a timeout or an OOM. The
#     input is kept (path printed) and the report is shown.
#
# Environment:
#   M3S_FUZZ_SEED=N          libFuzzer's -seed (0 = random; CI pins one so a run
#                            does not find a new input by luck on one day only)
#   M3S_FUZZ_AVOID_KNOWN=1   steer the decoder away from the library bugs
#                            already reported (docs/reliability.md); use it
#                            only while they are open
#   M3S_FUZZ_JOBS=N          N parallel fuzzing processes (libFuzzer -fork)
#   M3S_FUZZ_KEEP=dir        keep the grown corpus, log and statistics in dir
# Needs clang with libFuzzer (Debian/Ubuntu: apt-get install clang libclang-rt-14-dev).
set -uo pipefail

secs=${1:-120}
root=$(cd "$(dirname "$0")/.." && pwd)
build=${M3S_FUZZ_BUILD:-$root/build-fuzz}
cc=${M3S_FUZZ_CC:-clang}
jobs=${M3S_FUZZ_JOBS:-1}

if ! command -v "$cc" >/dev/null; then
  echo "fuzz/run.sh: $cc not found (Debian/Ubuntu: apt-get install clang libclang-rt-14-dev)" >&2
  exit 2
fi
mkdir -p "$build"
CC=$cc cmake -S "$root/fuzz" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$build/run-configure.log" 2>&1 ||
  { cat "$build/run-configure.log" >&2; exit 2; }
if grep -q "m3s-fuzz not built" "$build/run-configure.log"; then
  grep "m3sparse fuzz" "$build/run-configure.log" >&2
  exit 2
fi
if ! cmake --build "$build" -j "$(nproc)" --target m3s-fuzz >"$build/run-build.log" 2>&1; then
  cat "$build/run-build.log" >&2
  exit 2
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/m3s-fuzz.XXXXXX")
cp -r "$root/fuzz/corpus" "$work/corpus"
mkdir -p "$work/artifacts"
seeds=$(find "$work/corpus" -type f | wc -l)

fork=()
if [ "$jobs" -gt 1 ]; then fork=(-fork="$jobs"); fi
echo "fuzz/run.sh: fuzzing for ${secs} s ($seeds seed inputs, $jobs process(es)); log: $work/log"
M3S_FUZZ_STATS="$work/stats" "$build/m3s-fuzz" "${fork[@]}" \
  -max_total_time="$secs" -timeout=30 -rss_limit_mb=4096 -max_len=1024 \
  -seed="${M3S_FUZZ_SEED:-0}" \
  -print_final_stats=1 -artifact_prefix="$work/artifacts/" "$work/corpus" >"$work/log" 2>&1
rc=$?

execs=$(grep -E "^stat::number_of_executed_units" "$work/log" | tail -1 | awk '{print $2}')
[ -n "$execs" ] || execs=$(grep -oE "^#[0-9]+" "$work/log" | tail -1 | tr -d '#')
calls=$(awk '$1 == "api_calls" {print $2}' "$work/stats" 2>/dev/null) # (written every 4096 inputs and at exit)
rej=$(awk '$1 == "rejected" {print $2}' "$work/stats" 2>/dev/null)
after=$(find "$work/corpus" -type f | wc -l)
echo "fuzz/run.sh: ${execs:-?} executions (inputs tried), ${calls:-?} API calls," \
  "${rej:-?} rejected as invalid ($(awk -v r="${rej:-0}" -v c="${calls:-0}" \
  'BEGIN { if (c > 0) printf "%.1f%%", 100 * r / c; else printf "?" }')), corpus $seeds -> $after inputs"
if [ -f "$work/stats" ]; then sed 's/^/    /' "$work/stats" | grep "^    op "; fi

if [ "${M3S_FUZZ_KEEP:-}" != "" ]; then
  mkdir -p "$M3S_FUZZ_KEEP" && cp -r "$work/corpus" "$work/log" "$work/stats" "$work/artifacts" \
    "$M3S_FUZZ_KEEP/" 2>/dev/null
fi

crashes=$(find "$work/artifacts" -type f | wc -l)
if [ "$rc" -ne 0 ] || [ "$crashes" -gt 0 ]; then
  echo "fuzz/run.sh: FAILED (libFuzzer exit status $rc, $crashes input(s) in $work/artifacts)" >&2
  grep -E -A3 "INVARIANT VIOLATED|runtime error|ERROR: AddressSanitizer|ERROR: LeakSanitizer|ERROR: libFuzzer|==[0-9]+== ERROR" \
    "$work/log" | grep -v "^    #[0-9]* 0x.* in fuzzer::" | head -40 >&2
  grep -E -B2 -A2 "^    #[0-9]+ 0x.* in (m3s_|cpu_|check_|op_|die)" "$work/log" | head -30 >&2
  for f in "$work"/artifacts/*; do
    [ -f "$f" ] && echo "fuzz/run.sh: reproduce with: $build/m3s-fuzz $f" \
      " (M3S_FUZZ_TRACE=1 prints each call)" >&2
  done
  [ "$rc" -ne 0 ] || rc=1
  exit "$rc"
fi
echo "fuzz/run.sh: OK (no crash, no sanitizer report, no invariant violation)"
rm -rf "$work"
exit 0
