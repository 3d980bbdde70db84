#!/usr/bin/env bash
# GPU check: on a machine with a CUDA GPU, build for sm_90a (+ sm_80), run the
# whole test suite (CPU and GPU tests), compute-sanitizer (memcheck and
# racecheck on the GPU tests' quick mode, initcheck/synccheck on one), and the
# benchmark if it exists. Writes under $OUT (default ./gpu-out):
#   summary.md   the short table (also printed last)
#   ctest.log    full test output      sanitizers.log  every sanitizer run
#   build.log    configure + build     bench.log       benchmark output
#   demo.log     m3s-demo --device cuda  python.log    the Python binding's tests
# Usage: M3S_COMMIT=$(git rev-parse --short HEAD) tools/gpu-check.sh [PHASES]
#   PHASES: any of tests, sanitize, bench, demo, python (default: all five)
#   M3S_SAN_TIMEOUT (s, default 240) caps each sanitizer run;
#   M3S_BENCH_ARGS (default "--all --budget 300") are the benchmark's flags.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
BUILD=${BUILD:-build-gpu}
JOBS=$(nproc 2>/dev/null || echo 8)
commit=${M3S_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)

if ! { cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DM3S_CUDA=ON &&
       cmake --build "$BUILD" -j "$JOBS"; } >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "gpu-check: BUILD FAILED"
  exit 1
fi

phases=${*:-tests sanitize bench demo python}
has() { case " $phases " in *" $1 "*) return 0 ;; esac; return 1; }

ctest_rc=0
if has tests; then
  ctest --test-dir "$BUILD" -V -j 4 --timeout 900 >"$OUT/ctest.log" 2>&1
  ctest_rc=$?
fi

: >"$OUT/sanitizers.log"
san_rows=""
run_san() { # tool test
  local tool=$1 t=$2 rc
  echo "=== compute-sanitizer --tool $tool $t (M3S_TEST_QUICK=1)" >>"$OUT/sanitizers.log"
  M3S_TEST_QUICK=1 timeout "${M3S_SAN_TIMEOUT:-240}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
    "$BUILD/tests/$t" >>"$OUT/sanitizers.log" 2>&1
  rc=$?
  local verdict="clean"
  [ $rc -eq 9 ] && verdict="ERRORS"
  [ $rc -ne 0 ] && [ $rc -ne 9 ] && verdict="rc=$rc"
  [ $rc -eq 77 ] && verdict="skipped"
  [ $rc -eq 124 ] && verdict="timed out (${M3S_SAN_TIMEOUT:-240} s)"
  san_rows+="| $tool | $t | $verdict |"$'\n'
}
if has sanitize; then
  for t in test_gpu_topk test_gpu_attention test_gpu_ops test_gpu_graph; do
    [ -x "$BUILD/tests/$t" ] && run_san memcheck "$t"
  done
  for t in test_gpu_topk test_gpu_graph; do
    [ -x "$BUILD/tests/$t" ] && run_san racecheck "$t"
  done
  # racecheck of the k2q kernels is slow: the racecheck-sized cases only
  [ -x "$BUILD/tests/test_gpu_ops" ] && M3S_TEST_FILTER=tiny run_san racecheck test_gpu_ops
  # attention's full quick set is too slow under racecheck: one group per path
  [ -x "$BUILD/tests/test_gpu_attention" ] &&
    M3S_TEST_FILTER=${M3S_RACE_FILTER:-tp8} run_san racecheck test_gpu_attention
  for tool in initcheck synccheck; do
    [ -x "$BUILD/tests/test_gpu_attention" ] && run_san "$tool" test_gpu_attention
  done
fi

if has bench && [ -x "$BUILD/bench/m3s-bench" ]; then
  # shellcheck disable=SC2086
  timeout 500 "$BUILD/bench/m3s-bench" ${M3S_BENCH_ARGS:---all --budget 300} \
    >"$OUT/bench.log" 2>&1 || echo "bench rc=$?" >>"$OUT/bench.log"
fi

if has demo && [ -x "$BUILD/examples/m3s-demo" ]; then
  timeout 300 "$BUILD/examples/m3s-demo" --device cuda >"$OUT/demo.log" 2>&1
  echo "demo rc=$?" >>"$OUT/demo.log"
fi

if has python && [ -d python/tests ]; then
  M3SPARSE_LIB="$PWD/$BUILD/libm3sparse.so" PYTHONUNBUFFERED=1 timeout 400 \
    python3 -m pytest -q -rs python/tests >"$OUT/python.log" 2>&1
  echo "pytest rc=$?" >>"$OUT/python.log"
fi

{
  echo "# GPU check"
  echo
  echo "date: $(date -u +%Y-%m-%d), card: ${card:-none}, driver: ${driver:-?}, commit: $commit, nvcc: $(nvcc --version | tail -1)"
  echo
  echo "| test | result | checks |"
  echo "|---|---|---|"
  # ctest -V prefixes each test's output with its number: map numbers to
  # names, then print each test's result and its own "N passed, N failed" line
  [ -f "$OUT/ctest.log" ] && awk '
    /^[0-9]+: Test command: / { n = $1; sub(":", "", n); name[n] = $NF; sub(".*/", "", name[n]) }
    /^[0-9]+: [0-9]+ passed, [0-9]+ failed/ { n = $1; sub(":", "", n); $1 = ""; counts[n] = $0 }
    /Test +#[0-9]+: / { match($0, /#[0-9]+/); n = substr($0, RSTART + 1, RLENGTH - 1);
                        res[n] = ($0 ~ /Passed/) ? "Passed" : (($0 ~ /Skipped|Not Run/) ? "Skipped" : "FAILED");
                        t[n] = $(NF - 1) }
    END { for (i = 1; i <= 64; i++) if (i in res) printf "| %s | %s (%s s) | %s |\n", name[i], res[i], t[i], counts[i] }
  ' "$OUT/ctest.log"
  echo
  echo "| sanitizer | test | result |"
  echo "|---|---|---|"
  printf "%s" "$san_rows"
  echo
  [ -f "$OUT/ctest.log" ] && grep -E 'tests passed|tests failed' "$OUT/ctest.log" | tail -1
  [ -f "$OUT/demo.log" ] && { echo; echo '```'; tail -8 "$OUT/demo.log"; echo '```'; }
  [ -f "$OUT/python.log" ] && { echo; echo '```'; tail -12 "$OUT/python.log"; echo '```'; }
  [ -f "$OUT/bench.log" ] && { echo; echo '```'; tail -30 "$OUT/bench.log"; echo '```'; }
} >"$OUT/summary.md"
cat "$OUT/summary.md"
exit $ctest_rc
