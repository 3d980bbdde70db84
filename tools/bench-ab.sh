#!/usr/bin/env bash
# A/B timing of two builds of the library with one benchmark binary: runs
# m3s-bench ROUNDS times with the old library and the new one alternately
# (order old-new, new-old, old-new, ... so drift favours neither side), then
# prints per case each side's medians and new/old of the best of each. Use it
# to record a change's gain in docs/perf-notes.md.
# Usage: OLD_LIB=dir-with-old-libm3sparse.so.0 [NEW_LIB=build] [BENCH=build/bench/m3s-bench]
#        [ROUNDS=2] [OUT=dir] tools/bench-ab.sh BENCH-ARGS...
# Example: OLD_LIB=oldlib tools/bench-ab.sh --ops topk --tp 1,8 --bs 1,32,128 --ctx 32K,128K
set -euo pipefail
: "${OLD_LIB:?OLD_LIB must name a directory holding the old libm3sparse.so.0}"
NEW_LIB=${NEW_LIB:-build}
BENCH=${BENCH:-build/bench/m3s-bench}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-ab-out}
for lib in "$OLD_LIB" "$NEW_LIB"; do
  # a missing library would silently load the bench's own (RUNPATH) instead
  [ -e "$lib/libm3sparse.so.0" ] || { echo "bench-ab: no $lib/libm3sparse.so.0"; exit 1; }
done
mkdir -p "$OUT"
run_side() { # old|new round BENCH-ARGS...
  local side=$1 round=$2 lib=$OLD_LIB log="$OUT/bench_$1_$2.log"
  shift 2
  [ "$side" = new ] && lib=$NEW_LIB
  if ! LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$BENCH" "$@" >"$log" 2>&1; then
    tail -20 "$log"
    echo "bench-ab: the $side run of round $round failed (log: $log)"
    exit 1
  fi
}
for r in $(seq "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then first=old second=new; else first=new second=old; fi
  run_side "$first" "$r" "$@"
  run_side "$second" "$r" "$@"
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import re, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def rows(path):
    d = {}
    for line in open(path):
        m = re.match(r'\| ([a-z]+ [a-z]+) \| (.*?) \| ([0-9.]+) \|', line)
        if m:
            d[m.group(1) + ' ' + m.group(2)] = float(m.group(3))
    return d
old = [rows(f'{out}/bench_old_{r}.log') for r in range(1, rounds + 1)]
new = [rows(f'{out}/bench_new_{r}.log') for r in range(1, rounds + 1)]
print('| case | old us (each round) | new us (each round) | new/old (best of each) |')
print('|---|---|---|---:|')
for k in old[0]:
    o = [d[k] for d in old if k in d]
    n = [d[k] for d in new if k in d]
    if not n:
        continue
    fmt = lambda v: ' / '.join(f'{x:.1f}' for x in v)
    print(f'| {k} | {fmt(o)} | {fmt(n)} | {min(n) / min(o):.3f} |')
PY
