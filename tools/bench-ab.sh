#!/usr/bin/env bash
# A/B timing of two builds: runs each build's own m3s-bench ROUNDS times,
# alternately (order old-new, new-old, old-new, ... so drift favours neither
# side), then prints per case each side's medians and new/old of the best of
# each. Use it to record a change's gain in docs/perf-notes.md.
# m3s-bench links the library statically (m3sparse_internal, for its test
# hooks), so the two sides must be two benchmark binaries: swapping
# libm3sparse.so under one binary (LD_LIBRARY_PATH) would time one build twice.
# Usage: OLD_BENCH=old-build/bench/m3s-bench [NEW_BENCH=build/bench/m3s-bench]
#        [ROUNDS=2] [OUT=dir] [OLD_ARGS=...] [NEW_ARGS=...] tools/bench-ab.sh BENCH-ARGS...
# OLD_ARGS / NEW_ARGS are added to one side's arguments (word-split): with them
# the two sides may be one binary, e.g. a test hook against the default:
#   OLD_BENCH=build/bench/m3s-bench NEW_ARGS="--topk-path rounds" tools/bench-ab.sh --ops ptopk
# Example (old = the commit before, built beside the new tree):
#   git worktree add /tmp/old HEAD~1 && cmake -S /tmp/old -B /tmp/old/build -DM3S_CUDA=ON &&
#   cmake --build /tmp/old/build -j --target m3s-bench &&
#   OLD_BENCH=/tmp/old/build/bench/m3s-bench tools/bench-ab.sh --ops topk --tp 1,8 --ctx 32K,128K
set -euo pipefail
: "${OLD_BENCH:?OLD_BENCH must name the m3s-bench of the old build}"
NEW_BENCH=${NEW_BENCH:-build/bench/m3s-bench}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-ab-out}
for b in "$OLD_BENCH" "$NEW_BENCH"; do
  [ -x "$b" ] || { echo "bench-ab: no executable $b"; exit 1; }
done
OLD_ARGS=${OLD_ARGS:-}
NEW_ARGS=${NEW_ARGS:-}
if [ "$OLD_ARGS" = "$NEW_ARGS" ] && cmp -s "$OLD_BENCH" "$NEW_BENCH"; then
  echo "bench-ab: $OLD_BENCH and $NEW_BENCH are the same binary with the same arguments"
  exit 1
fi
mkdir -p "$OUT"
run_side() { # old|new round BENCH-ARGS...
  local side=$1 round=$2 bench=$OLD_BENCH extra=$OLD_ARGS log="$OUT/bench_$1_$2.log"
  shift 2
  [ "$side" = new ] && bench=$NEW_BENCH extra=$NEW_ARGS
  # shellcheck disable=SC2086 # extra is a word list on purpose
  if ! "$bench" "$@" $extra >"$log" 2>&1; then
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
