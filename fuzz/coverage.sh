#!/usr/bin/env bash
# fuzz/coverage.sh [corpus-dir ...] -- which lines of the library (src/core,
# src/cpu) the fuzzer's inputs reach. Builds m3s-fuzz-cov (clang source-based
# coverage, no sanitizers) in build-fuzz/ (or $M3S_FUZZ_BUILD), replays every
# input of the given corpora once (default: the committed fuzz/corpus/; pass a
# grown corpus kept by `M3S_FUZZ_KEEP=dir fuzz/run.sh N`, i.e. dir/corpus),
# and writes under $OUT (default ./fuzz-cov):
#   report.txt     llvm-cov report: per file, regions / functions / lines / branches
#   uncovered.txt  the library functions no input entered
#   show.txt       every library line with its execution count
# Needs clang, llvm-profdata and llvm-cov of the same LLVM version.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${M3S_FUZZ_BUILD:-$root/build-fuzz}
out=${OUT:-$PWD/fuzz-cov}
cc=${M3S_FUZZ_CC:-clang}
ver=$("$cc" --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -1)
profdata=$(command -v "llvm-profdata-$ver" || command -v llvm-profdata || true)
cov=$(command -v "llvm-cov-$ver" || command -v llvm-cov || true)
if [ -z "$profdata" ] || [ -z "$cov" ]; then
  echo "fuzz/coverage.sh: llvm-profdata / llvm-cov (LLVM $ver) not found" >&2
  exit 2
fi
corpora=("$@")
[ ${#corpora[@]} -gt 0 ] || corpora=("$root/fuzz/corpus")
mkdir -p "$build" "$out"
CC=$cc cmake -S "$root/fuzz" -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo >"$out/configure.log" 2>&1
cmake --build "$build" -j "$(nproc)" --target m3s-fuzz-cov >"$out/build.log" 2>&1 ||
  { tail -30 "$out/build.log" >&2; exit 2; }
rm -f "$out"/*.profraw
n=0
for c in "${corpora[@]}"; do n=$((n + $(find "$c" -type f | wc -l))); done
echo "fuzz/coverage.sh: replaying $n inputs"
# -runs=0 executes each input once; the harness's own checks still run
LLVM_PROFILE_FILE="$out/cov-%p.profraw" "$build/m3s-fuzz-cov" -runs=0 "${corpora[@]}" \
  >"$out/replay.log" 2>&1 || { tail -20 "$out/replay.log" >&2; exit 1; }
"$profdata" merge -sparse "$out"/*.profraw -o "$out/cov.profdata"
srcs=("$root/src/core" "$root/src/cpu")
"$cov" report "$build/m3s-fuzz-cov" -instr-profile="$out/cov.profdata" "${srcs[@]}" \
  >"$out/report.txt"
"$cov" show "$build/m3s-fuzz-cov" -instr-profile="$out/cov.profdata" "${srcs[@]}" \
  >"$out/show.txt"
# a function counts as never entered when none of its copies ran (static
# inline helpers of a header appear once per file, as file.c:name)
"$cov" report "$build/m3s-fuzz-cov" -instr-profile="$out/cov.profdata" -show-functions \
  "${srcs[@]}" | awk '$1 !~ /^(Name|-+|File|TOTAL)/ && NF > 3 {
    n = $1; sub(/^[^:]*:/, "", n); seen[n] = 1; if ($3 != $2) entered[n] = 1 }
    END { for (n in seen) if (!(n in entered)) print n }' | sort >"$out/uncovered.txt"
rm -f "$out"/*.profraw
tail -1 "$out/report.txt" | sed 's/^/fuzz\/coverage.sh: /'
echo "fuzz/coverage.sh: $(wc -l <"$out/uncovered.txt") library functions never entered ($out/uncovered.txt)"
