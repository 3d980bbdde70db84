#!/usr/bin/env python3
"""The README's table of ratios against vLLM, from a peer run's JSON.

  tools/readme-table.py [JSON]                  print the table's rows
  tools/readme-table.py --check README [JSON]   exit 1 unless the README's table
                                                and its "Commit <sha>, <date>" match

JSON defaults to docs/bench/h200.json, written only by a full run of
bench/peer/peer.py. Ratio = vLLM time / ours, two decimals as in the run's
markdown; bold where that figure is above 1.00 (ours faster); the dense column
(dense SDPA time / our layer) is never bold. A CTest test runs --check, so the
README's figures cannot drift from the committed run. ratio() repeats
bench/peer/peer.py's two-decimal format rather than importing it: peer.py
imports torch, which the CPU test machines need not have.
"""
import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = ("| case (TP1, 64/4 heads, top-16) | index top-k | attention | whole step / layer "
          "| dense SDPA / ours |")
RULE = "|---|---:|---:|---:|---:|"
# (peer case, README label), in the README's order
ROWS = [
    ("decode-b1-ctx128k", "decode, 1 request x 128K"),
    ("decode-b128-ctx32k", "decode, 128 requests x 32K"),
    ("decode-b128-ctx128k", "decode, 128 requests x 128K"),
    ("decode-b64-ctx32k-q4", "decode, 64 x 32K, 4 tokens (speculative)"),
    ("decode-b128-ctx128k-idxe4m3", "decode, 128 x 128K, e4m3 index cache"),
    ("decode-b128-ctx32k-kve4m3", "decode, 128 x 32K, e4m3 K/V cache"),
    ("decode-b128-ctx32k-tp8", "decode, 128 x 32K, TP8 shape (8/1 heads)"),
    ("decode-skew-1x128k-63x4k", "decode, 1 x 128K among 63 x 4K (skewed)"),
    ("prefill-4k", "prefill, fresh 4K prompt"),
    ("prefill-8k", "prefill, fresh 8K prompt"),
    ("prefill-16k", "prefill, fresh 16K prompt"),
    ("prefill-32k", "prefill, fresh 32K prompt"),
    ("prefill-64k", "prefill, fresh 64K prompt"),
    ("prefill-4k+60k", "prefill, 4K new tokens behind a 60K prefix"),
    ("prefill-ragged8x2k", "prefill, ragged batch of 8 x 2K behind 0-28K"),
]


def ratio(a, b, bold=True):
    if not a or not b:
        return ""
    s = "%.2f" % (a / b)
    return "**%s**" % s if bold and float(s) > 1.0 else s


def table(doc):
    lines = [HEADER, RULE]
    for name, label in ROWS:
        r = doc["cases"].get(name)
        if r is None or r.get("failed"):
            raise SystemExit("readme-table: case %s is %s in the run" %
                             (name, "missing" if r is None else "failed"))
        o, p = r["ours"], r["peer"]
        whole = "step" if "step" in o else "layer"
        cells = [label, ratio(p["idx"], o["idx"]), ratio(p["attn"], o["attn"]),
                 ratio(p[whole], o[whole]), ratio(r["dense"], o[whole], bold=False)]
        lines.append("|" + "|".join(" %s " % c if c else " " for c in cells) + "|")
    return lines


def readme_table(text):
    lines = text.splitlines()
    try:
        i = lines.index(HEADER)
    except ValueError:
        raise SystemExit("readme-table: the README has no line %r" % HEADER)
    j = i
    while j < len(lines) and lines[j].startswith("|"):
        j += 1
    return lines[i:j]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", metavar="README", default="")
    ap.add_argument("json", nargs="?", default=os.path.join(REPO, "docs", "bench", "h200.json"))
    a = ap.parse_args()
    with open(a.json) as f:
        doc = json.load(f)
    want = table(doc)
    if not a.check:
        print("\n".join(want))
        return 0
    with open(a.check) as f:
        text = f.read()
    bad = []
    stamp = "Commit %s, %s" % (doc["commit"], doc["date"])
    if stamp not in " ".join(text.split()):
        bad.append("the README does not say %r (the run's commit and date)" % stamp)
    have = readme_table(text)
    for k in range(max(len(want), len(have))):
        w = want[k] if k < len(want) else "(nothing)"
        h = have[k] if k < len(have) else "(nothing)"
        if w != h:
            bad.append("table line %d:\n  README: %s\n  run:    %s" % (k + 1, h, w))
    if bad:
        print("readme-table: %s does not match %s:\n%s" % (a.check, a.json, "\n".join(bad)))
        return 1
    print("readme-table: %s matches %s (%d cases, %s)" % (a.check, a.json, len(ROWS), stamp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
