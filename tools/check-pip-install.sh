#!/usr/bin/env bash
# Packaging check (CI step): `pip install ./python` into a fresh virtual
# environment, with the built library shipped inside the package, then import
# it from outside the checkout and run one op; the same without the library in
# the package, found through $M3SPARSE_LIB. Exits non-zero on any failure.
# Usage: tools/check-pip-install.sh [path/to/libm3sparse.so] (default build/)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
lib=${1:-$root/build/libm3sparse.so}
[ -f "$lib" ] || { echo "check-pip-install: $lib not found (build first)" >&2; exit 2; }
lib=$(cd "$(dirname "$lib")" && pwd)/$(basename "$lib") # the checks run from another directory
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

python3 -m venv "$tmp/venv"
py=$tmp/venv/bin/python
"$py" -m pip install -q --upgrade pip >/dev/null
"$py" -m pip install -q numpy

# a private copy of the package source, so the checkout is never modified
cp -r "$root/python" "$tmp/src"
rm -rf "$tmp/src/build" "$tmp/src"/*.egg-info
cp "$lib" "$tmp/src/m3sparse/libm3sparse.so"

smoke='
import os, sys
import numpy as np
import m3sparse as m3s
where = os.path.realpath(m3s.library_path())
want = sys.argv[1]
assert want in where, (want, where)
assert "site-packages" in os.path.realpath(m3s.__file__), m3s.__file__
with m3s.Context(-1) as ctx:
    cfg = m3s.config_minimax_m3(8)
    assert ctx.workspace_size(cfg, 4, 4096) >= 0
print("ok:", m3s.version(), "from", where)
'
# 1. the library shipped inside the package
"$py" -m pip install -q "$tmp/src"
(cd "$tmp" && env -u M3SPARSE_LIB "$py" -c "$smoke" site-packages/m3sparse/libm3sparse.so)
"$py" -m pip uninstall -q -y m3sparse

# 2. the package alone, the library through M3SPARSE_LIB
rm "$tmp/src/m3sparse/libm3sparse.so"
"$py" -m pip install -q "$tmp/src"
(cd "$tmp" && M3SPARSE_LIB="$lib" "$py" -c "$smoke" "$(realpath "$lib")")
echo "check-pip-install: both ways pass"
