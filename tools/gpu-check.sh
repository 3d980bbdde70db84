#!/usr/bin/env bash
# GPU check: on a machine with a CUDA GPU, build for sm_90a (+ sm_80), run the
# whole test suite (CPU and GPU tests), compute-sanitizer (memcheck and
# racecheck, initcheck and synccheck on every GPU test's quick mode, run
# M3S_SAN_JOBS (default 4) at a time), the demo, the Python tests and the
# benchmark. Writes under $OUT (default ./gpu-out):
#   summary.md   the short table (also printed last)
#   ctest.log    full test output      sanitizers.log  every sanitizer run
#   build.log    configure + build     bench.log       benchmark output
#   demo.log     m3s-demo --device cuda  python.log    the Python binding's tests
# Usage: M3S_COMMIT=$(git rev-parse --short HEAD) tools/gpu-check.sh [PHASES]
#   PHASES: any of tests, sanitize, bench, demo, python (default: all five)
#   M3S_SAN_TIMEOUT (s, default 240) caps each sanitizer run; M3S_SAN_JOBS
#   (default 4) runs in parallel (racecheck runs split into case groups, see
#   race_groups); M3S_SAN_TOOLS (default
#   "memcheck racecheck initcheck synccheck") picks the tools;
#   M3S_BENCH_ARGS (default "--all --budget 300") are the benchmark's flags.
#   M3S_SAN_LONG=1 also runs the long racecheck groups (see race_groups);
#   M3S_SAN_ONLY="tool test [filter [flags]];..." replaces the sanitizer run list
#   (e.g. one long racecheck case alone); M3S_NO_BUILD=1 uses $BUILD as it is
#   (a build carried from elsewhere: tools/carry-build.sh unpack first, so
#   that the paths its CMake and CTest files name resolve);
#   M3S_CTEST_JOBS (default 4) tests run at a time.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
BUILD=${BUILD:-build-gpu}
JOBS=$(nproc 2>/dev/null || echo 8)
commit=${M3S_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)

if [ "${M3S_NO_BUILD:-0}" = 1 ] && [ ! -d "$BUILD/tests" ]; then
  echo "gpu-check: M3S_NO_BUILD=1 but $BUILD/tests does not exist"
  exit 1
fi
if [ "${M3S_NO_BUILD:-0}" != 1 ] &&
   ! { cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DM3S_CUDA=ON &&
       cmake --build "$BUILD" -j "$JOBS"; } >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "gpu-check: BUILD FAILED"
  exit 1
fi

phases=${*:-tests sanitize bench demo python}
has() { case " $phases " in *" $1 "*) return 0 ;; esac; return 1; }

ctest_rc=0
san_rc=0 # any sanitizer run that is not clean or skipped (errors, timeout, crash)
if has tests; then
  ctest --test-dir "$BUILD" -V -j "${M3S_CTEST_JOBS:-4}" --timeout 900 >"$OUT/ctest.log" 2>&1
  ctest_rc=$?
  # on a machine with a card, a skipped GPU test is a failure (the tests skip
  # only when they find no GPU; test_gpu_offsets64 also without 14 GiB free)
  if [ -n "$card" ] && grep -E 'Test +#[0-9]+: test_gpu_.*(Skipped|Not Run)' "$OUT/ctest.log"; then
    echo "gpu-check: GPU tests skipped on a machine with a GPU ($card)" | tee -a "$OUT/ctest.log"
    [ "$ctest_rc" -eq 0 ] && ctest_rc=1
  fi
fi

: >"$OUT/sanitizers.log"
san_rows=""
# Each sanitizer run is one line "tool test [filter [extra sanitizer flags]]";
# they run M3S_SAN_JOBS at a time (compute-sanitizer is mostly CPU-bound),
# each with its own log, and are reported in list order with their time.
# racecheck of a whole quick run of attention, ops or invariance takes longer
# than a device call: those are split into case groups (M3S_TEST_FILTER takes
# comma-separated substrings), one process each, together covering every case.
# Two test_gpu_ops groups need a device call each (H100, 2026-11-27, 251de48):
# racecheck of k2q_tp2_prefill_bf16 took 229 s with 7 other runs on the card
# (438 s before the k2q row split); k2q_tp8_sink_rows_of_3000_and_5000 took
# 557 s alone (M3S_SAN_JOBS=1 M3S_SAN_TIMEOUT=580
# M3S_SAN_ONLY="racecheck test_gpu_ops k2q_tp8_sink"). The sink case also runs
# with k2q_attention_kernel excluded (29 s), so a run with the default timeout
# still racechecks the CSR sorter's multi-chunk path, which the case is for.
# test_gpu_offsets64 (up to 12 GiB of caches per process) runs one variant per
# racecheck process: bf16_head_major 570 s, e4m3_token_major 554 s, the two side
# by side (H100, 2026-11-27, fc55509; M3S_SAN_JOBS=2 M3S_SAN_TIMEOUT=575
# M3S_SAN_ONLY="racecheck test_gpu_offsets64 bf16_head_major;racecheck
# test_gpu_offsets64 e4m3_token_major"). Those long groups are marked with a
# leading '+': they run only with M3S_SAN_LONG=1 (give them M3S_SAN_TIMEOUT=580
# and few jobs); otherwise their rows say "not run (long group)", which does
# not fail the run but is never reported as clean.
race_groups() { # test -> one "filter [flags]" per line
  case $1 in
    test_gpu_attention) printf '%s\n' decode_tp decode_q1_ qlen4_ uniform_,ragged_ g32,g12,g1_mha k64,k8 \
      topk_,guard_ mixed_prefill,prefill_257 large_logits ;;
    test_gpu_ops) printf '%s\n' insert k2q_tp1,k2q_tp2_e4m3 k2q_tp8_700,k2q_tp8_csr \
      k2q_tp8_e4m3,k2q_tp8_tiny k2q_tp2_prefill_bf16 merge k2q_large_logits \
      "k2q_tp8_sink_rows_of_3000 --kernel-name-exclude kns=k2q_" \
      +k2q_tp8_sink_rows_of_3000 ;;
    test_gpu_invariance) printf '%s\n' head_major,shuffled decode_equals,spec_decode \
      chunked repeatable request_alone ;;
    test_gpu_offsets64) printf '%s\n' +bf16_head_major +e4m3_token_major ;;
    test_gpu_context_parallel) printf '%s\n' m3_tp8_mixed_cp2,m3_tp8_mixed_cp3 \
      m3_tp8_mixed_cp4,m3_tp8_mixed_cp8 hkv2_k6 m3_tp2_spec nan_scores,equal_scores \
      e4m3_caches,e5m2_scalar ;;
    test_gpu_topk_certified) printf '%s\n' last_bit_permuted_multiset_hkv1,equal_maxima_tp1 \
      last_bit_permuted_multiset_k64 cancel_wide_exponents_tp2,subnormal_keys_large \
      overflowing_products_tp4,nan_inf_keys_and,nan_keys_e4m3,guard_page_ids \
      queries_wide,queries_tiny \
      decode_q,decode_last,decode_equal \
      decode_cancel,decode_subnormal,decode_overflow,decode_nan,decode_guard k64_,k16_ \
      ragged_padded,short_requests,e4m3_index,graph_capture \
      e4pre_ragged,e4pre_chunk e4pre_local0,e4pre_top64,e4pre_bad,e4pre_subnormal \
      e4pre_wide,e4pre_tiny ;;
    *) echo "" ;;
  esac
}
san_list() {
  local t tool f
  if [ -n "${M3S_SAN_ONLY:-}" ]; then
    tr ';' '\n' <<<"$M3S_SAN_ONLY" | sed '/^ *$/d'
    return
  fi
  for tool in ${M3S_SAN_TOOLS:-memcheck racecheck initcheck synccheck}; do
    for t in test_gpu_topk test_gpu_topk_decode test_gpu_topk_certified test_gpu_attention \
      test_gpu_ops test_gpu_graph test_gpu_invariance test_gpu_offsets64 test_gpu_threads \
      test_gpu_context_parallel; do
      [ -x "$BUILD/tests/$t" ] || continue
      if [ "$tool" = racecheck ]; then
        race_groups "$t" | while read -r f; do echo "$tool $t $f"; done
      else
        echo "$tool $t"
      fi
    done
  done
}
san_key() { # tool test [filter [flags]] -> a file name
  local k="$1-$2${3:+-${3//,/+}}"
  [ -n "${4:-}" ] && k+="-$(printf '%s' "$4" | tr -c 'A-Za-z0-9_+\n' '_')"
  echo "$k"
}
san_one() { # tool test [filter [flags]] -> $BUILD/san/KEY.log, .rc
  local tool=$1 t=$2 filter=${3:-} flags=${4:-} log start
  log="$BUILD/san/$(san_key "$@")"
  start=$SECONDS
  if [ "${filter#+}" != "$filter" ]; then # a long group (race_groups)
    if [ "${M3S_SAN_LONG:-0}" != 1 ]; then
      echo "=== $tool $t $filter: not run (long group; M3S_SAN_LONG=1 runs it)" >"$log.log"
      echo long >"$log.rc"
      echo 0 >"$log.time"
      return
    fi
    filter=${filter#+}
  fi
  {
    echo "=== compute-sanitizer --tool $tool $flags $t (M3S_TEST_QUICK=1${filter:+ M3S_TEST_FILTER=$filter})"
    # shellcheck disable=SC2086
    M3S_TEST_QUICK=1 M3S_TEST_FILTER=$filter timeout "${M3S_SAN_TIMEOUT:-240}" \
      compute-sanitizer --tool "$tool" --error-exitcode 9 $flags "$BUILD/tests/$t" 2>&1
  } >"$log.log"
  echo $? >"$log.rc"
  echo $((SECONDS - start)) >"$log.time"
}
if has sanitize; then
  rm -rf "$BUILD/san"
  mkdir -p "$BUILD/san"
  jobs_max=${M3S_SAN_JOBS:-4}
  while read -r tool t filter flags; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do sleep 1; done
    san_one "$tool" "$t" "$filter" "$flags" &
  done < <(san_list)
  wait
  while read -r tool t filter flags; do
    key=$BUILD/san/$(san_key "$tool" "$t" "$filter" "$flags")
    rc=$(cat "$key.rc" 2>/dev/null || echo missing)
    cat "$key.log" >>"$OUT/sanitizers.log"
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$key.log" | tail -1)
    case $rc in
      0) verdict="clean" ;;
      9) verdict="ERRORS" ;;
      # a GPU test skips only on a machine without a GPU: here that hides a
      # failure (no driver seen, no card), unless nvidia-smi saw no card either
      77) if [ -n "$card" ]; then verdict="SKIPPED ON A GPU MACHINE"; else verdict="skipped (no GPU)"; fi ;;
      long) verdict="not run (long group; M3S_SAN_LONG=1)" ;;
      124) verdict="timed out (${M3S_SAN_TIMEOUT:-240} s)" ;;
      *) verdict="rc=$rc" ;;
    esac
    # a filter that matches no case runs nothing (the test binary then exits 1)
    grep -qE '^0 passed, 0 failed$' "$key.log" && verdict="NO CASE RAN (filter matches nothing)"
    case $verdict in clean | "skipped (no GPU)" | "not run (long"*) ;; *) san_rc=1 ;; esac
    secs=$(cat "$key.time" 2>/dev/null || echo "?")
    san_rows+="| $tool | $t${filter:+ (filter $filter)}${flags:+ $flags} | $verdict | $secs | ${summary:-} |"$'\n'
  done < <(san_list)
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
  # ctest -V prefixes each test's output with its number: print each test's
  # name and result (from its "Test #N: name" line) and its own
  # "N passed, N failed" line
  [ -f "$OUT/ctest.log" ] && awk '
    /^[0-9]+: [0-9]+ passed, [0-9]+ failed/ { n = $1; sub(":", "", n); $1 = ""; counts[n] = $0 }
    /Test +#[0-9]+: / { match($0, /#[0-9]+: /); n = substr($0, RSTART + 1, RLENGTH - 3);
                        name[n] = substr($0, RSTART + RLENGTH); sub(/ .*/, "", name[n]);
                        res[n] = ($0 ~ /Passed/) ? "Passed" : (($0 ~ /Skipped|Not Run/) ? "Skipped" : "FAILED");
                        t[n] = $(NF - 1) }
    END { for (i = 1; i <= 64; i++) if (i in res) printf "| %s | %s (%s s) | %s |\n", name[i], res[i], t[i], counts[i] }
  ' "$OUT/ctest.log"
  echo
  echo "| sanitizer | test (M3S_TEST_QUICK=1) | result | s | summary line |"
  echo "|---|---|---|---|---|"
  printf "%s" "$san_rows"
  echo
  [ -f "$OUT/ctest.log" ] && grep -E 'tests passed|tests failed' "$OUT/ctest.log" | tail -1
  [ -f "$OUT/demo.log" ] && { echo; echo '```'; tail -8 "$OUT/demo.log"; echo '```'; }
  [ -f "$OUT/python.log" ] && { echo; echo '```'; tail -12 "$OUT/python.log"; echo '```'; }
  [ -f "$OUT/bench.log" ] && { echo; echo '```'; tail -30 "$OUT/bench.log"; echo '```'; }
} >"$OUT/summary.md"
cat "$OUT/summary.md"
# non-zero when a test failed or a sanitizer run was not clean (or timed out)
[ "$ctest_rc" -ne 0 ] && exit "$ctest_rc"
exit "$san_rc"
