#!/usr/bin/env python3
"""Floors of the peer benchmark's cases: the least time any kernel can take on
the card of a peer run, from the bytes a case must read (decode, at the run's
measured copy ceiling) or the useful FLOPs it must do (prefill, at the run's
bf16 GEMM ceiling), and so the largest ratio (vLLM / ours) any kernel of ours
can reach against the vLLM times of that run. CPU only; reads the peer's JSON.

Bytes (decode, bs requests x ctx tokens, q_len rows each): the index cache
once per request (bf16 256 B or e4m3 128 B per token: keys shared by the KV
heads and the q_len tokens); the main cache per (request, KV head) for the
union of the request's rows' selected blocks (bf16 512 B or e4m3 256 B per
token per KV head). The union for q_len > 1 is simulated: each row selects
its local block and K - 1 others; on the peer's random inputs those are
uniform draws (bench/peer/cases.py), which the locality line of the peer's
report confirms for prefill (the U8 column below is that line's measure).

FLOPs (prefill): attention 4 x 128 per (row, head, visible selected key);
index scoring 2 x 128 per (row, index head, causal key). Tiles: a tensor-core
tile of m64 rows is 4 tokens x 16 heads (TP1), so a token-tiled kernel does
the work of the union of 4 neighbours' blocks (U4) for every token of them:
its useful fraction is (selected blocks per token) / U4. U4 and U8 are
simulated for the request that ends last (ragged batches: the longest).

usage: tools/target-floors.py [docs/bench/h200.json]
"""
import json
import random
import sys

B = 128           # tokens per block
TOPK = 16
CASES = {         # the peer's cases (bench/peer/cases.py)
    "decode-b1-ctx128k": dict(bs=1, ctx=131072),
    "decode-b128-ctx32k": dict(bs=128, ctx=32768),
    "decode-b128-ctx128k": dict(bs=128, ctx=131072),
    "decode-b64-ctx32k-q4": dict(bs=64, ctx=32768, q=4),
    "decode-b128-ctx128k-idxe4m3": dict(bs=128, ctx=131072, idx_b=128),
    "decode-b128-ctx32k-kve4m3": dict(bs=128, ctx=32768, kv_b=256),
    "decode-b128-ctx32k-tp8": dict(bs=128, ctx=32768, hkv=1),
}
PREFILL = {
    "prefill-4k": ((0, 4096),),
    "prefill-8k": ((0, 8192),),
    "prefill-16k": ((0, 16384),),
    "prefill-32k": ((0, 32768),),
    "prefill-64k": ((0, 65536),),
    "prefill-4k+60k": ((61440, 4096),),
    "prefill-ragged8x2k": tuple((4096 * i, 2048) for i in range(8)),
}


def union(nb_of, rows, draws, rng):
    """Mean number of distinct blocks selected by `rows` consecutive rows."""
    total = 0
    for _ in range(draws):
        s = set()
        for nb in nb_of():
            if nb <= TOPK:
                s.update(range(nb))
            else:
                s.add(nb - 1)
                s.update(rng.sample(range(nb - 1), TOPK - 1))
        total += len(s)
    return total / draws


def decode_floor(c, gbps, rng):
    bs, ctx, q = c["bs"], c["ctx"], c.get("q", 1)
    hkv, idx_b, kv_b = c.get("hkv", 4), c.get("idx_b", 256), c.get("kv_b", 512)
    nb = ctx // B
    u = TOPK if q == 1 else union(lambda: [nb] * q, q, 4000, rng)
    idx = bs * ctx * idx_b / (gbps * 1e9) * 1e3
    attn = bs * hkv * u * B * kv_b / (gbps * 1e9) * 1e3
    return idx, attn, u


def prefill_work(reqs, rng):
    attn = idx = 0
    for prefix, new in reqs:
        for p in range(prefix, prefix + new):
            nb = p // B + 1
            attn += p + 1 if nb <= TOPK else (TOPK - 1) * B + p % B + 1
            idx += p + 1
    prefix, new = max(reqs, key=lambda r: r[0] + r[1])

    def rows(g):
        def f():
            t0 = rng.randrange(prefix, prefix + new - g + 1)
            t0 -= t0 % g
            return [p // B + 1 for p in range(t0, t0 + g)]
        return f
    sel = sum(min(p // B + 1, TOPK) for p in range(prefix, prefix + new)) / new
    return attn * 64 * 128 * 4, idx * 4 * 128 * 2, union(rows(4), 4, 1500, rng), \
        union(rows(8), 8, 1500, rng), sel


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "docs/bench/h200.json"
    run = json.load(open(path))
    gbps, tflops = run["ceilings"]["copy_gbps"], run["ceilings"]["gemm_tflops"]
    cases = run["cases"]
    rng = random.Random(2026)
    print(f"# {run['card']}, peer run at {run['commit']} ({run['date']}): copy {gbps:.0f} GB/s, "
          f"bf16 GEMM {tflops:.0f} TFLOP/s")
    print("\n## decode: byte floors (ms) and the largest ratio they allow\n")
    print("| case | union blocks | floor idx | attn | step | vLLM idx | attn | step "
          "| max ratio idx | attn | step | ours at floor idx | attn |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, c in CASES.items():
        if name not in cases:
            continue
        i, a, u = decode_floor(c, gbps, rng)
        v, o = cases[name]["peer"], cases[name]["ours"]
        print(f"| {name} | {u:.1f} | {i:.4f} | {a:.4f} | {i + a:.4f} | {v['idx']:.4f} | "
              f"{v['attn']:.4f} | {v['step']:.4f} | {v['idx'] / i:.2f} | {v['attn'] / a:.2f} | "
              f"{v['step'] / (i + a):.2f} | {i / o['idx']:.0%} | {a / o['attn']:.0%} |")
    print("\n## prefill: useful work, rates (TFLOP/s) and the largest ratio at the GEMM ceiling\n")
    print("| case | attn TFLOP | vLLM | ours | max ratio | U4 | U8 | m64 token tiles useful "
          "| idx TFLOP | vLLM | ours | max ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, reqs in PREFILL.items():
        if name not in cases:
            continue
        fa, fi, u4, u8, sel = prefill_work(reqs, rng)
        v, o = cases[name]["peer"], cases[name]["ours"]
        ceil_a, ceil_i = fa / (tflops * 1e12) * 1e3, fi / (tflops * 1e12) * 1e3
        print(f"| {name} | {fa / 1e12:.3f} | {fa / v['attn'] / 1e9:.0f} | "
              f"{fa / o['attn'] / 1e9:.0f} | {v['attn'] / ceil_a:.1f} | {u4:.1f} | {u8:.1f} | "
              f"{sel / u4:.0%} | {fi / 1e12:.3f} | {fi / v['idx'] / 1e9:.0f} | "
              f"{fi / o['idx'] / 1e9:.0f} | {v['idx'] / ceil_i:.1f} |")


if __name__ == "__main__":
    main()
