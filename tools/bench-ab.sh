#!/usr/bin/env bash
# A/B timing of two builds of the library with one benchmark binary: runs
# m3s-bench ROUNDS times with the old library and the new one alternately (same
# process order each round, same machine), then prints per case both medians of
# each side and new/old of the best of each. Use it to record a change's gain
# in docs/perf-notes.md.
# Usage: OLD_LIB=dir-with-old-libm3sparse.so.0 [NEW_LIB=build] [BENCH=build/bench/m3s-bench]
#        [ROUNDS=2] [OUT=dir] tools/bench-ab.sh BENCH-ARGS...
# Example: OLD_LIB=oldlib tools/bench-ab.sh --ops topk --tp 1,8 --bs 1,32,128 --ctx 32K,128K
set -euo pipefail
: "${OLD_LIB:?OLD_LIB must name a directory holding the old libm3sparse.so.0}"
NEW_LIB=${NEW_LIB:-build}
BENCH=${BENCH:-build/bench/m3s-bench}
ROUNDS=${ROUNDS:-2}
OUT=${OUT:-ab-out}
mkdir -p "$OUT"
for r in $(seq "$ROUNDS"); do
  LD_LIBRARY_PATH=$OLD_LIB "$BENCH" "$@" >"$OUT/bench_old_$r.log" 2>&1
  LD_LIBRARY_PATH=$NEW_LIB "$BENCH" "$@" >"$OUT/bench_new_$r.log" 2>&1
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
