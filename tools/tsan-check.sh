#!/usr/bin/env bash
# ThreadSanitizer run of CPU tests: builds the library and the CPU tests with
# clang -fsanitize=thread against LLVM's libomp, and runs them with archer
# (LLVM's OMPT tool that tells TSan about OpenMP barriers, tasks and locks;
# without it every OpenMP region reads as a race). Any TSan report fails the
# run (exit code 66 from the test). CPU backend only.
# Usage: tools/tsan-check.sh [TEST ...]   (default: test_threads test_batch test_topk)
#   BUILD (default build-tsan), OMP_NUM_THREADS (default 4: real teams on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build-tsan}
tests=("$@")
((${#tests[@]})) || tests=(test_threads test_batch test_topk)

# archer of the clang that builds (Debian: /usr/lib/llvm-MAJOR/lib)
clang_major=$(clang -dumpversion | cut -d. -f1)
archer=/usr/lib/llvm-$clang_major/lib/libarcher.so
if [ ! -f "$archer" ]; then
  echo "tsan-check: $archer not found (Debian: apt-get install libomp-$clang_major-dev)" >&2
  exit 1
fi
CC=clang cmake -S . -B "$BUILD" -DM3S_TSAN=ON -DM3S_CUDA=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$BUILD" -j "$(nproc)" >/dev/null
# without OpenMP the library would run serially and the check would prove little
# (ldd's output is read whole: grep -q stops at the first match, and under
# pipefail ldd's SIGPIPE then failed the check at random)
if ! grep -q 'libomp' <<<"$(ldd "$BUILD/libm3sparse.so")"; then
  echo "tsan-check: $BUILD/libm3sparse.so is not linked against LLVM libomp (OpenMP not found?)" >&2
  exit 1
fi

export OMP_TOOL_LIBRARIES=$archer OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export TSAN_OPTIONS="ignore_noninstrumented_modules=1 halt_on_error=1 exitcode=66"
rc=0
for t in "${tests[@]}"; do
  start=$SECONDS
  if out=$("$BUILD/tests/$t" 2>&1); then
    echo "tsan-check: $t clean ($((SECONDS - start)) s): $(tail -1 <<<"$out")"
  else
    code=$?
    rc=1
    echo "$out" | tail -60
    echo "tsan-check: $t FAILED (rc $code; 66 = ThreadSanitizer report)"
  fi
done
exit $rc
