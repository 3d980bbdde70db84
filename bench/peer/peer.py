#!/usr/bin/env python3
"""Side by side with vLLM: m3sparse against vLLM's Triton kernels for the
MiniMax-M3 sparse layer, in one process, on identical inputs, on one GPU.

Both sides run behind the same call sites (bench/peer/sides.py): vLLM's five
ops from the released wheel (tools/fetch-vllm-ops.sh puts them in
bench/peer/_vllm/) and m3sparse's drop-in versions (m3sparse.vllm_ops).
Timing: triton.testing.do_bench medians of at least 20 runs (L2 flushed
before each run); decode as CUDA-graph replays (each side's idx, attn and the
whole step captured), prefill eager. Every case is checked before it is timed
(selections compared as sets, ours against fp64 on sampled rows); a case that
fails its check is reported as failed and not timed.

    tools/fetch-vllm-ops.sh                        # once, on a machine with PyPI
    python3 bench/peer/peer.py --out docs/bench    # docs/bench/<card>.{json,md,png}

Options: --cases a,b (names or prefixes; default: all), --list, --card NAME,
--commit SHA, --lib PATH (default $M3SPARSE_LIB or build-gpu/libm3sparse.so),
--no-plot, --rows N (fp64-checked rows per case)."""
import argparse
import datetime
import gc
import json
import zlib
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)

import cases as C  # noqa: E402


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(REPO, "docs", "bench"))
    ap.add_argument("--cases", default="")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--card", default="")
    ap.add_argument("--commit", default=os.environ.get("M3S_COMMIT", ""))
    ap.add_argument("--lib", default="")
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--plot-only", metavar="JSON", default="",
                    help="redraw the figure of a finished run's JSON next to it")
    return ap.parse_args()


def pick(names):
    if not names:
        return list(C.CASES)
    want = [n.strip() for n in names.split(",") if n.strip()]
    out = [c for c in C.CASES if any(c.name == w or c.name.startswith(w) for w in want)]
    unknown = [w for w in want if not any(c.name == w or c.name.startswith(w) for c in C.CASES)]
    if unknown:
        sys.exit("peer: unknown case(s) %s; --list shows them" % ", ".join(unknown))
    return out


def load_sides(lib):
    os.environ.setdefault("M3SPARSE_LIB", lib)
    sys.path.insert(0, os.path.join(REPO, "python"))
    peer_dir = os.path.join(HERE, "_vllm")
    if not os.path.isdir(os.path.join(peer_dir, "vllm_m3_ops")):
        sys.exit("peer: vLLM's ops are missing: run tools/fetch-vllm-ops.sh (and carry "
                 "bench/peer/_vllm to the GPU machine)")
    sys.path.insert(0, peer_dir)
    import vllm_m3_ops
    import m3sparse
    from m3sparse import vllm_ops
    from sides import Side
    version = open(os.path.join(peer_dir, "VERSION")).read().split()[0]
    return m3sparse, Side("ours", vllm_ops), Side("peer", vllm_m3_ops), version


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------
MIN_SAMPLES = 20


def bench(fn):
    """Median of at least MIN_SAMPLES timed runs. do_bench(rep=100) alone takes
    100 ms of samples: two for a 45 ms prefill layer, whose median is then the
    mean of two and carries any clock dip whole."""
    import triton
    ms = float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    if ms * MIN_SAMPLES > 100:
        ms = float(triton.testing.do_bench(fn, warmup=2 * ms, rep=MIN_SAMPLES * ms,
                                           return_mode="median"))
    return ms


def graph_of(fn):
    """fn captured in a CUDA graph, after two eager runs on a side stream
    (autotuning and lazy initialisation stay out of the capture)."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def ceilings():
    import torch
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    a.random_()
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    copy = 2 * n / (ms * 1e-3) / 1e9
    m = 8192
    x = torch.randn((m, m), dtype=torch.bfloat16, device="cuda")
    y = torch.randn((m, m), dtype=torch.bfloat16, device="cuda")
    ms = bench(lambda: x @ y)
    gemm = 2 * m ** 3 / (ms * 1e-3) / 1e12
    return {"copy_gbps": round(copy, 1), "gemm_tflops": round(gemm, 1)}


# ---------------------------------------------------------------------------
# one case
# ---------------------------------------------------------------------------
def kernels(m3s, spec):
    ctx = m3s.get_context(0)
    cfg = m3s.layer_config(spec.hq, spec.hkv, spec.topk)
    kv = spec.kv_dtype
    idx = ctx.query_support(cfg, "index_topk", index_dtype=spec.idx_dtype)
    att = ctx.query_support(cfg, "attention_" + spec.kind, kv_dtype=kv)
    return "idx=%s attn=%s" % (idx.kernel, att.kernel)


def run_decode(x, ours, peer):
    import torch
    s = x.spec
    out = {}
    for side in (ours, peer):
        buf = torch.full((x.T, s.hkv, s.topk), -7, dtype=torch.int32, device=x.q.device)
        o = torch.empty_like(x.q)
        topk = side.decode_idx(x, buf.transpose(0, 1))
        side.decode_attn(x, topk, o)
        out[side.name] = (topk, o, buf)
    if x.q.is_cuda:
        torch.cuda.synchronize()
    return out


def time_decode(x, side, topk_buf):
    import torch
    o = torch.empty_like(x.q)
    tk = topk_buf.transpose(0, 1)
    g_idx = graph_of(lambda: side.decode_idx(x, tk))
    g_attn = graph_of(lambda: side.decode_attn(x, tk, o))
    g_step = graph_of(lambda: side.decode_attn(x, side.decode_idx(x, tk), o))
    t = {"idx": bench(g_idx.replay), "attn": bench(g_attn.replay), "step": bench(g_step.replay)}
    del g_idx, g_attn, g_step
    return t


def run_prefill(x, ours, peer):
    import torch
    out = {}
    for side in (ours, peer):
        o = torch.empty_like(x.q)
        topk = side.prefill_idx(x)
        side.prefill_attn(x, topk, o)
        out[side.name] = (topk, o, None)
    if x.q.is_cuda:
        torch.cuda.synchronize()
    return out


def time_prefill(x, side, topk):
    import torch
    o = torch.empty_like(x.q)

    def layer():
        side.prefill_attn(x, side.prefill_idx(x), o)

    return {"idx": bench(lambda: side.prefill_idx(x)),
            "attn": bench(lambda: side.prefill_attn(x, topk, o)),
            "layer": bench(layer)}


def run_case(m3s, spec, ours, peer, n_rows):
    import torch
    import refcheck
    from sides import Dense
    x = C.build(spec, seed=zlib.crc32(spec.name.encode()) % 1000)
    res = {"ours": None, "peer": None, "dense": None, "topk_agree": None,
           "ours_kernels": kernels(m3s, spec), "required": spec.required}
    run = run_decode(x, ours, peer) if spec.kind == "decode" else run_prefill(x, ours, peer)
    (tk_o, out_o, buf_o), (tk_p, out_p, buf_p) = run["ours"], run["peer"]
    res["topk_agree"] = round(refcheck.set_agreement(tk_o, tk_p), 6)
    if spec.kind == "prefill":
        res["union8"] = refcheck.union_per_group(tk_o, 8)
    chk = refcheck.check_ours(x, tk_o.cpu(), out_o, n_rows)
    res["check"] = chk
    if not chk["ok"]:
        res["failed"] = "ours does not match the fp64 reference (%s)" % chk
        return res
    if spec.kind == "decode":
        res["ours"] = time_decode(x, ours, buf_o)
        res["peer"] = time_decode(x, peer, buf_p)
    else:
        res["ours"] = time_prefill(x, ours, tk_o)
        res["peer"] = time_prefill(x, peer, tk_p)
        d = Dense(x)
        d.prepare()
        res["dense"] = bench(d.run)
        res["dense_kernel"] = d.kernel
        del d
    del x, run, tk_o, out_o, tk_p, out_p, buf_o, buf_p
    gc.collect()
    torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------
def fmt(v):
    return "-" if v is None else ("%.3f" % v if v < 10 else "%.1f" % v)


def ratio(a, b):
    return "-" if not a or not b else "%.2f" % (a / b)


def markdown(doc):
    lines = ["# %s: m3sparse against vLLM %s (Triton)" % (doc["card"], doc["peer"]), "",
             "Commit %s, %s; torch %s, triton %s. Ceilings measured in the same run: copy "
             "%.0f GB/s, bf16 GEMM %.0f TFLOP/s. Times in ms (do_bench medians of >= 20 runs; "
             "decode: CUDA-graph replays; prefill: eager). ratio = vLLM / ours (> 1: ours faster); "
             "dense = torch SDPA (flash/cuDNN/efficient), causal, same tokens."
             % (doc["commit"], doc["date"], doc["torch"], doc["triton"],
                doc["ceilings"]["copy_gbps"], doc["ceilings"]["gemm_tflops"]), "",
             "| case | idx ours | idx vLLM | ratio | attn ours | attn vLLM | ratio | "
             "step/layer ours | vLLM | ratio | dense | dense/ours | top-k agree | fp64 check |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in doc["cases"].items():
        if r.get("failed"):
            lines.append("| %s | FAILED: %s ||||||||||||" % (name, r["failed"]))
            continue
        o, p = r["ours"], r["peer"]
        whole = "step" if "step" in o else "layer"
        chk = r["check"]
        lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %.4f | %s |" % (
            name, fmt(o["idx"]), fmt(p["idx"]), ratio(p["idx"], o["idx"]), fmt(o["attn"]),
            fmt(p["attn"]), ratio(p["attn"], o["attn"]), fmt(o[whole]), fmt(p[whole]),
            ratio(p[whole], o[whole]), fmt(r["dense"]),
            ratio(r["dense"], o[whole]) if r["dense"] else "-", r["topk_agree"],
            "%d rows, %d near-ties, rel L2 %.1e" % (chk["rows"], chk["pairs_near_tie"],
                                                    chk["attn_rel_l2"])))
    u = ["%s %.1f" % (n, r["union8"]) for n, r in doc["cases"].items() if r.get("union8")]
    if u:
        lines += ["", "Locality of the selections (distinct blocks chosen by 8 consecutive "
                  "tokens of one KV head; 16 = all the same, 128 = nothing shared): "
                  + ", ".join(u) + "."]
    lines += ["", "top-k agree: fraction of (KV head, token) selections equal as sets (ours "
              "vs vLLM, all rows). fp64 check: ours against an fp64 reference on sampled rows "
              "(selection exact up to near-ties, attention rel L2 < 1e-2).", "",
              "Kernels (ours): " + "; ".join(
        sorted({r["ours_kernels"] for r in doc["cases"].values()})), ""]
    return "\n".join(lines)


def plot(doc, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cs = doc["cases"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    # the bf16 fresh prompts alone (prefill-8k, not prefill-8k-idxe4m3 of the same length)
    pre = [(C.BY_NAME[n].reqs[0][1], r) for n, r in cs.items()
           if re.fullmatch(r"prefill-[0-9]+k", n) and not r.get("failed")]
    pre.sort(key=lambda x: x[0])
    if pre:
        xs = [n // 1024 for n, _ in pre]
        a.plot(xs, [r["ours"]["layer"] for _, r in pre], "o-", label="m3sparse")
        a.plot(xs, [r["peer"]["layer"] for _, r in pre], "s-", label="vLLM (Triton)")
        a.plot(xs, [r["dense"] for _, r in pre], "^--", label="dense SDPA")
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xticks(xs, ["%dK" % v for v in xs])
        a.set_xlabel("prompt length (fresh prompt)")
        a.set_ylabel("layer time, ms (index top-k + attention)")
        a.set_title("Prefill, one sparse layer, TP1")
        a.legend()
    dec = [(C.BY_NAME[n].bs, r) for n, r in cs.items()
           if n.startswith("decode-") and n.endswith("-ctx32k") and not r.get("failed")]
    dec.sort(key=lambda x: x[0])
    if dec:
        xs = [bs for bs, _ in dec]
        b.plot(xs, [r["ours"]["step"] * 1e3 for _, r in dec], "o-", label="m3sparse")
        b.plot(xs, [r["peer"]["step"] * 1e3 for _, r in dec], "s-", label="vLLM (Triton)")
        b.set_xscale("log", base=2)
        b.set_xticks(xs, [str(v) for v in xs])
        b.set_xlabel("decode batch (requests, 32K context each)")
        b.set_ylabel("step time, us (CUDA-graph replay)")
        b.set_title("Decode step, one sparse layer, TP1")
        b.legend()
    fig.suptitle("%s, commit %s (%s)" % (doc["card"], doc["commit"], doc["date"]))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    args = parse()
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f), os.path.splitext(args.plot_only)[0] + ".png")
        return 0
    specs = pick(args.cases)
    if args.list:
        for c in specs:
            print("%-30s %s%s" % (c.name, c.kind, "" if c.required else "  (extra)"))
        return 0
    import torch
    import triton
    if not torch.cuda.is_available():
        sys.exit("peer: no CUDA device")
    lib = args.lib or os.environ.get("M3SPARSE_LIB") or os.path.join(REPO, "build-gpu",
                                                                      "libm3sparse.so")
    m3s, ours, peer, version = load_sides(lib)
    card = torch.cuda.get_device_name()
    stem = args.card or card.split()[-1].lower()
    doc = {"card": card, "commit": args.commit or "unknown",
           "date": datetime.date.today().isoformat(), "peer": version,
           "torch": torch.__version__, "triton": triton.__version__,
           "library": m3s.library_path(), "ceilings": ceilings(), "cases": {}}
    print("peer: %s, ceilings %s" % (card, doc["ceilings"]), flush=True)
    failed = 0
    for spec in specs:
        t0 = time.time()
        try:
            r = run_case(m3s, spec, ours, peer, args.rows)
        except Exception as e:  # reported as a failed case, the run goes on
            r = {"failed": "%s: %s" % (type(e).__name__, e), "required": spec.required}
            gc.collect()
            torch.cuda.empty_cache()
        doc["cases"][spec.name] = r
        failed += bool(r.get("failed"))
        print("%-28s %5.1fs %s" % (spec.name, time.time() - t0,
                                   r.get("failed") or {k: r[k] for k in ("ours", "peer", "dense",
                                                                         "topk_agree")}),
              flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(doc, f, indent=1)
    md = markdown(doc)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(md)
    if not args.no_plot:
        try:
            plot(doc, os.path.join(args.out, stem + ".png"))
        except ImportError as e:
            print("peer: no figure (%s); redraw with --plot-only" % e)
    print(md)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
