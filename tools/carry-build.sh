#!/usr/bin/env bash
# Carries a CUDA build made on the CPU machine to the GPU machine, where
# building costs ~225 s of the device budget (H100, -j 16) against ~2.5 min
# here after a change to one kernel file.
# Usage (here):  tools/carry-build.sh pack [BUILD] [ARCHIVE]
#        (there): tools/carry-build.sh unpack [ARCHIVE]
#   BUILD defaults to build-gpu, ARCHIVE to .dev/build.tar.xz (.dev is
#   git-ignored: name it in the device call's carry list).
# pack: the build tree without object files, xz with a window larger than one
#   binary (the static test binaries share the library's device code, so a
#   ~185 MB tree packs to ~2.5 MB).
# unpack: extracts it at the repository root. CMake and CTest files hold the
#   absolute path the build was configured at and the cmake it ran with:
#   where the root is elsewhere, that path becomes a link to the root (an
#   existing other path there is an error); where that cmake is absent and
#   one is on PATH, it becomes a link to it (abi_exports runs `cmake -P`).
set -euo pipefail
cd "$(dirname "$0")/.."

cache_value() { # KEY CMakeCache.txt
  sed -n "s/^$1:[A-Z]*=//p" "$2" | sed -n 1p
}

pack() {
  local build=${1:-build-gpu} archive=${2:-.dev/build.tar.xz}
  [ -f "$build/CMakeCache.txt" ] || { echo "carry-build: $build is not a CMake build" >&2; exit 1; }
  mkdir -p "$(dirname "$archive")"
  tar cf - --exclude='*.o' --exclude='CMakeFiles/*.dir' "$build" |
    xz -T0 -6e --lzma2=dict=192MiB >"$archive"
  echo "carry-build: $build -> $archive ($(du -h "$archive" | cut -f1)), configured at" \
    "$(cache_value CMAKE_HOME_DIRECTORY "$build/CMakeCache.txt")"
}

unpack() {
  local archive=${1:-.dev/build.tar.xz} root build src cmk
  [ -f "$archive" ] || { echo "carry-build: no $archive" >&2; exit 1; }
  build=$(tar tJf "$archive" | sed -n 1p | cut -d/ -f1)
  case "$build" in '' | . | ..)
    echo "carry-build: $archive does not hold one build folder" >&2
    exit 1 ;;
  esac
  rm -rf "$build"
  tar xJf "$archive"
  root=$(pwd -P)
  src=$(cache_value CMAKE_HOME_DIRECTORY "$build/CMakeCache.txt")
  if [ "$(readlink -f "$src" 2>/dev/null)" != "$root" ]; then
    if [ -e "$src" ] || [ -L "$src" ]; then
      echo "carry-build: the build names $src, which exists and is not $root" >&2
      exit 1
    fi
    mkdir -p "$(dirname "$src")"
    ln -s "$root" "$src"
    echo "carry-build: linked $src -> $root"
  fi
  cmk=$(cache_value CMAKE_COMMAND "$build/CMakeCache.txt")
  if [ ! -x "$cmk" ] && command -v cmake >/dev/null; then
    mkdir -p "$(dirname "$cmk")"
    ln -s "$(command -v cmake)" "$cmk"
    echo "carry-build: linked $cmk -> $(command -v cmake)"
  fi
  echo "carry-build: $archive -> $build"
}

case "${1:-}" in
pack) shift; pack "$@" ;;
unpack) shift; unpack "$@" ;;
*)
  echo "usage: tools/carry-build.sh pack [BUILD] [ARCHIVE] | unpack [ARCHIVE]" >&2
  exit 2
  ;;
esac
