#!/usr/bin/env python3
"""Host time against GPU time of one eager call, per layer of the call stack.

The peer times prefill eagerly (do_bench), so a call whose host side takes
longer than its kernels is timed at its host time. This tool splits that
time for the prefill index top-k of peer cases, on the peer's own inputs:

  vllm     vLLM's Triton ops (the peer's other side)
  ours     m3sparse.vllm_ops, as the peer calls it
  core     m3sparse.core.Context.index_topk with the views, batch and config
           built once (the Python glue of vllm_ops / torch_ops left out)
  c        m3s_index_topk through ctypes with every struct and the workspace
           built once: the C library's own host time (validation, planning,
           tensor-map encoding, launches)

host = wall-clock time per call of N calls enqueued back to back (no
synchronisation inside); gpu = CUDA-event time per call of N calls queued
behind a long sleep kernel, so the host never starves the GPU.

    python3 bench/peer/host_time.py [--cases prefill-4k,prefill-8k] [--n 50]
    python3 bench/peer/host_time.py --device cpu --cases prefill-4k   # smoke test
    python3 bench/peer/host_time.py --cases prefill-4k --profile ours  # + cProfile

--device cpu runs the m3sparse layers on the CPU backend (host time includes
the computation; vLLM and gpu columns are skipped): a check of the tool
itself, not a measurement."""
import argparse
import ctypes
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="prefill-4k,prefill-8k")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--lib", default="")
    ap.add_argument("--profile", default="",
                    help="a layer (vllm, ours, core, c): also print its cProfile, top 30 "
                         "functions by own time over --n calls")
    return ap.parse_args()


def host_us(fn, n):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def gpu_us(torch, fn, n):
    e0 = torch.cuda.Event(enable_timing=True)
    e1 = torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(2e8))  # ~0.1 s: longer than n host calls
    e0.record()
    for _ in range(n):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n * 1e3


def layers(x, ours_side, peer_side):
    """(name, callable) per layer, all on the same inputs and output buffer."""
    import torch
    from m3sparse import core, torch_ops
    from m3sparse import _capi as C

    s = x.spec
    out = []
    if peer_side is not None:
        out.append(("vllm", lambda: peer_side.prefill_idx(x)))
    out.append(("ours", lambda: ours_side.prefill_idx(x)))

    topk = torch.empty((s.hkv, x.iq.shape[0], s.topk), dtype=torch.int32,
                       device=x.iq.device).transpose(0, 1)
    ctx = torch_ops._ctx(x.iq)
    cfg = torch_ops._cfg(s.hkv, s.hkv, s.topk, 0, 1, 1.0)
    batch = core.Batch(x.seq_lens, None, x.block_table, query_start_loc=x.cu_seqlens_q,
                       num_tokens=int(x.iq.shape[0]), max_q_len=int(x.max_query_len),
                       max_seq_len=int(x.max_seq_len), num_reqs=int(x.seq_lens.shape[0]))
    views = [core.view(x.iq, name="iq"), core.view(x.index_cache, name="index_cache"),
             core.view(topk, name="topk")]
    need = ctx.workspace_size(cfg, batch.num_tokens, batch.max_seq_len)
    ws = ctx.alloc_workspace(need)
    out.append(("core", lambda: ctx.index_topk(cfg, batch, *views, workspace=ws)))

    keep = []
    cb = batch._c(keep)
    ex = ctx._exec(ws, None, keep)
    lib, handle = core.lib(), ctx.handle
    args = (handle, ctypes.byref(cfg), ctypes.byref(cb)) + tuple(
        ctypes.byref(v.c) for v in views) + (ctypes.byref(ex),)

    def c_call():
        st = lib.m3s_index_topk(*args)
        if st != C.M3S_OK:
            raise RuntimeError("m3s_index_topk: %s" % core.last_error())

    out.append(("c", c_call))
    return out


def profile(fn, n):
    import cProfile
    import pstats
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    pstats.Stats(pr, stream=sys.stdout).sort_stats("tottime").print_stats(30)


def main():
    args = parse()
    import peer
    lib = args.lib or os.environ.get("M3SPARSE_LIB") or os.path.join(REPO, "build-gpu",
                                                                      "libm3sparse.so")
    if args.device == "cpu":
        os.environ.setdefault("M3SPARSE_LIB", lib)
        sys.path.insert(0, os.path.join(REPO, "python"))
        from m3sparse import vllm_ops
        from sides import Side
        ours, other = Side("ours", vllm_ops), None
    else:
        _, ours, other, _ = peer.load_sides(lib)
    import torch
    import cases as Cs
    for name in [c for c in args.cases.split(",") if c]:
        x = Cs.build(Cs.BY_NAME[name], device=args.device)
        for layer, fn in layers(x, ours, other):
            for _ in range(5):
                fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
                h = host_us(fn, args.n)
                g = gpu_us(torch, fn, args.n)
                print("%-16s %-5s host %8.1f us/call   gpu %8.1f us/call" % (name, layer, h, g),
                      flush=True)
                if layer == args.profile:
                    profile(fn, args.n)
            else:
                h = host_us(fn, max(1, args.n // 10))
                print("%-16s %-5s host %8.1f us/call (cpu backend: includes the computation)"
                      % (name, layer, h), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
