#!/usr/bin/env bash
# Fetch the peer: vLLM's Triton kernels for the MiniMax-M3 sparse layer
# (vllm/models/minimax_m3/common/ops of the released wheel), unchanged except
# for their three vLLM imports, which point at bench/peer/vllm_standin.py.
# Run on a machine that reaches PyPI (the GPU machine has no network); the
# result, bench/peer/_vllm/ (git-ignored, never committed), travels with the
# working tree when the device call names it in `carry`.
# Usage: tools/fetch-vllm-ops.sh [VERSION]   (default 0.33.0)
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-0.33.0}
dest=bench/peer/_vllm
pkg=$dest/vllm_m3_ops
src=vllm/models/minimax_m3/common/ops
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

python3 -m pip download -q --no-deps -d "$tmp" "vllm==$version"
wheel=$(ls "$tmp"/vllm-"$version"-*.whl)
python3 - "$wheel" "$tmp/x" "$src" <<'PY'
import sys, zipfile
wheel, out, src = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in ("__init__", "index_topk", "sparse_attn"):
        z.extract("%s/%s.py" % (src, name), out)
PY

rm -rf "$dest"
mkdir -p "$pkg"
for f in __init__ index_topk sparse_attn; do
  # the three vLLM imports -> the stand-in; nothing else changes
  sed -e 's/^from vllm\.platforms import current_platform$/from ._vllm_standin import current_platform/' \
      -e 's/^from vllm\.triton_utils import tl, triton$/from ._vllm_standin import tl, triton/' \
      -e 's/^from vllm\.utils\.math_utils import round_up$/from ._vllm_standin import round_up/' \
      "$tmp/x/$src/$f.py" >"$pkg/$f.py"
done
cp bench/peer/vllm_standin.py "$pkg/_vllm_standin.py"
if grep -n '^from vllm\|^import vllm' "$pkg"/*.py; then
  echo "fetch-vllm-ops: an import of vllm is left (the wheel changed): update the rewrite" >&2
  exit 1
fi
echo "vllm==$version $(sha256sum "$wheel" | cut -c1-16)" >"$dest/VERSION"
echo "fetch-vllm-ops: vllm $version ops in $pkg ($(cat "$pkg"/*.py | wc -l) lines)"
