#!/usr/bin/env python3
"""Context parallel (DCP) with m3sparse and torch.distributed: one sparse layer
of MiniMax-M3 over a long context split across the processes of a group.

    torchrun --nproc_per_node=2 examples/context_parallel.py          # NCCL, 1 GPU per process
    torchrun --nproc_per_node=2 examples/context_parallel.py --cpu    # gloo, CPU backend

What it shows, for engine developers (docs/SPEC.md section 10,
docs/integration.md section 10):

  * ownership: the 128-token blocks of a request are dealt round-robin to the
    ranks (groups of I = --interleave blocks; vLLM's DCP with
    cp_kv_cache_interleave_size = 128 is I = 1). Each rank's caches hold only
    its own blocks, and its block tables list them at rank-local columns;
  * cache writes: every rank computes the K/V of every new token (the
    projections are replicated) and inserts only the tokens of its blocks,
    through a slot mapping that has -1 for the others;
  * one layer step, on every rank, with the global query rows and seq_lens:
        candidates = index_topk_candidates(...)     # the rank's best K blocks per row
        all_gather(candidates)                      # [cp, T, Hkv, K] ids + scores
        topk = merge_topk_candidates(...)           # == index_topk on the whole cache
        out_r, lse_r = sparse_attention_cp(...)     # attention over the rank's blocks
        all_gather(out_r, lse_r)                    # [cp, T, Hq, 128], [cp, T, Hq]
        out, lse = merge_attn_states_n(...)         # == attention on the whole cache
  * (a) a chunked prefill of a long prompt (--context-len tokens in chunks of
    --chunk), then (b) --decode-steps decode steps of the same request.

Rank 0 also keeps the whole cache (what a single GPU would hold) and runs the
single-GPU layer (index_topk + sparse_attention) on every step: the top-k must
be bit-identical (torch.equal) and the attention output within rel L2 1e-2
(bf16 partials). Timings per step (CUDA events on GPU, wall clock on CPU) are
printed next to the single-GPU timing. Exit status 1 on any mismatch.

The library is loaded as the Python package finds it (M3SPARSE_LIB, or build/
of this checkout; python/README.md). The CUDA mode needs a library built with
the CUDA backend.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

try:
    import m3sparse as m3s
except ImportError:  # running from a checkout without `pip install ./python`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import m3sparse as m3s

ops = torch.ops.m3sparse
B = m3s.M3S_BLOCK_SIZE  # 128 tokens per block = per cache page


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true",
                   help="CPU tensors, gloo backend, the library's CPU backend")
    p.add_argument("--context-len", type=int, default=None,
                   help="prompt length in tokens (default 262144 on GPU, 4096 with --cpu)")
    p.add_argument("--chunk", type=int, default=None,
                   help="prefill chunk in tokens (default 8192 on GPU, 1024 with --cpu)")
    p.add_argument("--decode-steps", type=int, default=None,
                   help="decode steps after the prefill (default 8 on GPU, 3 with --cpu)")
    p.add_argument("--tp", type=int, default=8, choices=(1, 2, 4, 8),
                   help="the M3 layer of one tensor-parallel rank (8: 8 query heads, 1 KV head)")
    p.add_argument("--interleave", type=int, default=1,
                   help="blocks per interleave group I (vLLM: cp_kv_cache_interleave_size/128)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    gpu_defaults = dict(context_len=262144, chunk=8192, decode_steps=8)
    cpu_defaults = dict(context_len=4096, chunk=1024, decode_steps=3)
    for k, v in (cpu_defaults if a.cpu else gpu_defaults).items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    return a


# ---------------------------------------------------------------------------
# Ownership (SPEC 10): owner(b) = (b / I) % cp, column(b) = (b / (I*cp)) * I + b % I
# ---------------------------------------------------------------------------
def owner_and_column(block, cp, interleave):
    owner = (block // interleave) % cp
    column = (block // (interleave * cp)) * interleave + block % interleave
    return owner, column


def slot_mapping(positions, table_row, cp, rank, interleave):
    """Slots (page * 128 + offset) of the tokens at `positions` in this rank's
    cache, -1 for tokens of blocks another rank owns. cp = 1 gives the whole
    cache's mapping (column = block)."""
    block = positions // B
    owner, column = owner_and_column(block, cp, interleave)
    page = table_row[column.clamp(max=table_row.numel() - 1)].long()
    return torch.where(owner == rank, page * B + positions % B, torch.full_like(positions, -1))


class Caches:
    """The paged caches of one request on one rank: K/V [P, Hkv, 128, 256] and
    index keys [P, 128, 128], bf16, and the block table [1, columns] (the same
    table serves both caches here; vLLM keeps one per cache group). The pages
    are handed out in a shuffled order, as an engine's allocator would."""

    def __init__(self, max_tokens, hkv, cp, rank, interleave, device, gen):
        blocks = -(-max_tokens // B)
        self.cp, self.rank, self.interleave = cp, rank, interleave
        # a rank needs ceil(blocks / (I*cp)) * I columns (the last group may be partial)
        columns = -(-blocks // (interleave * cp)) * interleave
        self.kv = torch.zeros((columns, hkv, B, 256), dtype=torch.bfloat16, device=device)
        self.index = torch.zeros((columns, B, 128), dtype=torch.bfloat16, device=device)
        perm = torch.randperm(columns, generator=gen).to(torch.int32)
        self.block_table = perm.view(1, columns).to(device)

    def insert(self, positions, k, v, ik):
        slots = slot_mapping(positions, self.block_table[0], self.cp, self.rank, self.interleave)
        ops.cache_insert(k, v, slots, self.kv)
        ops.index_cache_insert(ik, slots, self.index)

    def nbytes(self):
        return self.kv.numel() * 2 + self.index.numel() * 2


# ---------------------------------------------------------------------------
# One step's inputs: the same on every rank (seeded by the step)
# ---------------------------------------------------------------------------
def token_data(seed, n, hq, hkv, device):
    """q [n, Hq, 128], iq [n, Hkv, 128], k, v [n, Hkv, 128], ik [n, 128] (bf16).
    Every rank draws the same values: in an engine every rank computes the
    projections of every token."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rnd(*shape):
        return torch.randn(shape, generator=g, device=device).to(torch.bfloat16)
    return rnd(n, hq, 128), rnd(n, hkv, 128), rnd(n, hkv, 128), rnd(n, hkv, 128), rnd(n, 128)


class StepBatch:
    """The global batch metadata of a step (one request here): seq_lens,
    query_start_loc (None for a uniform decode batch) and the host bounds."""

    def __init__(self, seq_len, q_len, decode, device):
        self.seq_lens = torch.tensor([seq_len], dtype=torch.int32, device=device)
        self.qsl = None if decode else torch.tensor([0, q_len], dtype=torch.int32,
                                                    device=device)
        self.uniform_q_len = q_len if decode else 0     # > 0: uniform decode batch
        self.max_q_len = q_len
        self.max_seq_len = seq_len                      # a CUDA graph would use max_model_len


# ---------------------------------------------------------------------------
# Timing: marks on the rank's stream (CUDA events) or the wall clock (CPU)
# ---------------------------------------------------------------------------
class Marks:
    def __init__(self, cuda):
        self.cuda = cuda
        self.names, self.points = [], []

    def mark(self, name=None):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.points.append(e)
        else:
            self.points.append(time.perf_counter())
        if name is not None:
            self.names.append(name)

    def ms(self):
        """{stage: ms} between consecutive marks, and the total."""
        if self.cuda:
            self.points[-1].synchronize()
            d = [a.elapsed_time(b) for a, b in zip(self.points, self.points[1:])]
        else:
            d = [(b - a) * 1e3 for a, b in zip(self.points, self.points[1:])]
        out = dict(zip(self.names, d))
        out["total"] = sum(d)
        return out


def all_gather(out, inp):
    """out[n] = rank n's inp (out: [cp, *inp.shape], contiguous). Gathered as
    the concatenation along dim 0, the form both NCCL and gloo take."""
    dist.all_gather_into_tensor(out.flatten(0, 1), inp.contiguous())


# ---------------------------------------------------------------------------
# The context-parallel layer step (what runs on every rank)
# ---------------------------------------------------------------------------
def cp_layer(cfg, caches, q, iq, sb, marks):
    """Top-k and attention of one step on this rank's share of the cache.
    Returns (topk [T, Hkv, K], out [T, Hq, 128], lse [T, Hq]), the same on
    every rank."""
    cp, rank, I = caches.cp, caches.rank, caches.interleave
    T, hkv, K = iq.shape[0], iq.shape[1], cfg.topk
    dev = q.device
    bounds = (sb.uniform_q_len, sb.max_q_len, sb.max_seq_len)
    sel = (cfg.init_blocks, cfg.local_blocks)

    marks.mark()
    # 1. candidates: this rank scores only its own blocks. ids and scores are
    #    written into one [T, Hkv, 2, K] i32 buffer (scores as f32 bits), so a
    #    single all-gather moves both: 8 * T * Hkv * K bytes per rank.
    mine = torch.empty((T, hkv, 2, K), dtype=torch.int32, device=dev)
    ops.index_topk_candidates_out(iq, caches.index, sb.seq_lens, caches.block_table, sb.qsl,
                                  mine[:, :, 0], mine.view(torch.float32)[:, :, 1], *bounds,
                                  cp, rank, I, *sel)
    marks.mark("indexer")
    # 2. all-gather the candidates: [cp, T, Hkv, 2, K]
    cand = torch.empty((cp, T, hkv, 2, K), dtype=torch.int32, device=dev)
    all_gather(cand, mine)
    marks.mark("gather cand")
    # 3. merge: the global top-k, bit-identical to index_topk on the whole cache,
    #    computed by every rank (no broadcast needed)
    topk = ops.merge_topk_candidates(cand[:, :, :, 0], cand.view(torch.float32)[:, :, :, 1],
                                     sb.seq_lens, sb.qsl, *bounds, I, *sel)
    marks.mark("merge top-k")
    # 4. partial attention over the selected blocks this rank owns (out 0 and
    #    lse -inf for rows that own none of theirs)
    part_out, part_lse = ops.sparse_attention_cp(q, caches.kv, topk, sb.seq_lens,
                                                 caches.block_table, sb.qsl, None, None,
                                                 *bounds, cp, rank, I, cfg.softmax_scale)
    marks.mark("attention")
    # 5. all-gather the partials (bf16 out, f32 lse) and merge them by their lse
    outs = torch.empty((cp,) + tuple(part_out.shape), dtype=part_out.dtype, device=dev)
    lses = torch.empty((cp,) + tuple(part_lse.shape), dtype=torch.float32, device=dev)
    all_gather(outs, part_out)
    all_gather(lses, part_lse)
    marks.mark("gather out")
    out, lse = ops.merge_attn_states_n(outs, lses)
    marks.mark("merge out")
    return topk, out, lse


def single_gpu_layer(cfg, whole, q, iq, sb, marks):
    """The same layer on the whole cache, as one GPU runs it (the reference)."""
    bounds = (sb.uniform_q_len, sb.max_q_len, sb.max_seq_len)
    marks.mark()
    topk = ops.index_topk(iq, whole.index, sb.seq_lens, whole.block_table, sb.qsl, *bounds,
                          cfg.topk, cfg.init_blocks, cfg.local_blocks)
    marks.mark("indexer")
    out, lse = ops.sparse_attention(q, whole.kv, topk, sb.seq_lens, whole.block_table, sb.qsl,
                                    None, None, *bounds, cfg.softmax_scale)
    marks.mark("attention")
    return topk, out, lse


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def main():
    args = parse_args()
    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --cpu (gloo backend, CPU tensors)")
    # -- process group: one process per GPU (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK)
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, cp = dist.get_rank(), dist.get_world_size()
    lead = rank == 0

    def say(*a):
        if lead:
            print(*a, flush=True)

    cfg = m3s.config_minimax_m3(args.tp)          # Hq, Hkv, top-16, init 0, local 1
    hq, hkv = cfg.num_q_heads, cfg.num_kv_heads
    L, I = args.context_len, args.interleave
    max_tokens = L + args.decode_steps
    gen = torch.Generator().manual_seed(args.seed + 1000 * rank)   # page shuffles

    # -- caches: each rank only its blocks; rank 0 also the whole cache (reference)
    local = Caches(max_tokens, hkv, cp, rank, I, device, gen)
    whole = Caches(max_tokens, hkv, 1, 0, 1, device, gen) if lead else None
    say("m3sparse %s, %s, cp = %d ranks (%s), M3 TP%d layer: %d query heads, %d KV head(s), "
        "top-%d" % (m3s.version(), "CUDA" if cuda else "CPU", cp, dist.get_backend(), args.tp,
                    hq, hkv, cfg.topk))
    if lead:
        say("context %d tokens (%d blocks), interleave %d block(s); K/V + index cache per rank "
            "%.1f MiB, whole cache %.1f MiB" % (L, -(-L // B), I,
                                                local.nbytes() / 2**20, whole.nbytes() / 2**20))

    failures = []
    worst = {"rel_l2": 0.0, "lse": 0.0}
    timings = {"prefill": [], "decode": []}

    def step(kind, label, p0, n, decode):
        """Insert the tokens [p0, p0 + n) (their queries attend now), run the
        cp layer on every rank, then the single-GPU layer on rank 0; compare."""
        q, iq, k, v, ik = token_data(args.seed * 1000003 + p0, n, hq, hkv, device)
        pos = torch.arange(p0, p0 + n, device=device)
        local.insert(pos, k, v, ik)                # -1 slots: tokens of other ranks' blocks
        if lead:
            whole.insert(pos, k, v, ik)
        sb = StepBatch(p0 + n, n, decode, device)
        dist.barrier()                             # start the timed step together
        cp_marks = Marks(cuda)
        topk, out, lse = cp_layer(cfg, local, q, iq, sb, cp_marks)
        t_cp = cp_marks.ms()
        if lead:
            ref_marks = Marks(cuda)
            rtopk, rout, rlse = single_gpu_layer(cfg, whole, q, iq, sb, ref_marks)
            t_ref = ref_marks.ms()
            same = torch.equal(topk, rtopk)
            err = rel_l2(out, rout)
            fin = torch.isfinite(rlse)
            lse_ok = torch.equal(torch.isfinite(lse), fin)
            dlse = float((lse[fin] - rlse[fin]).abs().max()) if fin.any() else 0.0
            worst["rel_l2"], worst["lse"] = max(worst["rel_l2"], err), max(worst["lse"], dlse)
            ok = same and err < 1e-2 and lse_ok and dlse < 1e-3
            if not ok:
                failures.append("%s: top-k %s, rel L2 %.3g, lse max diff %.3g%s"
                                % (label, "identical" if same else "DIFFERS", err, dlse,
                                   "" if lse_ok else ", -inf pattern differs"))
            timings[kind].append((t_cp, t_ref))
            parts = ", ".join("%s %.3f" % (k_, v_) for k_, v_ in t_cp.items() if k_ != "total")
            say("%-26s cp %8.3f ms (%s) | single %8.3f ms | top-k %s, rel L2 %.1e %s"
                % (label, t_cp["total"], parts, t_ref["total"],
                   "bit-identical" if same else "DIFFERS", err, "ok" if ok else "MISMATCH"))

    # (a) chunked prefill of the prompt: each chunk's K/V are inserted, then its
    #     queries attend to everything so far (causal within the chunk)
    say("\n(a) chunked prefill: %d tokens in chunks of %d" % (L, args.chunk))
    chunks = list(range(0, L, args.chunk))
    for i, p0 in enumerate(chunks):
        n = min(args.chunk, L - p0)
        step("prefill", "prefill %d/%d [%d, %d)" % (i + 1, len(chunks), p0, p0 + n), p0, n,
             decode=False)
    # (b) decode: one new token per step, inserted on the rank owning its block
    say("\n(b) decode: %d steps after the %d-token prompt" % (args.decode_steps, L))
    for s in range(args.decode_steps):
        step("decode", "decode %d (seq %d)" % (s + 1, L + s + 1), L + s, 1, decode=True)

    if lead:
        say("\nmedian ms per step   context parallel (%d ranks)   single %s" % (
            cp, "GPU" if cuda else "process"))
        for kind, rows in timings.items():
            if rows:
                say("  %-8s           %10.3f                   %10.3f" % (
                    kind, statistics.median(r[0]["total"] for r in rows),
                    statistics.median(r[1]["total"] for r in rows)))
        if failures:
            say("\nFAIL: %d step(s) differ from the single-rank result:" % len(failures))
            for f in failures:
                say("  " + f)
        else:
            say("\nPASS: top-k bit-identical on all %d steps, attention rel L2 <= %.2e "
                "(< 1e-2), lse within %.1e" % (sum(map(len, timings.values())), worst["rel_l2"],
                                               worst["lse"]))
    # every rank exits with rank 0's verdict
    flag = torch.tensor([len(failures)], dtype=torch.int32, device=device)
    dist.broadcast(flag, src=0)
    # both ranks past every collective, then out without the process group's
    # teardown: gloo's has aborted at exit ("terminate called without an
    # active exception") after every check had passed, on rank 1 (CI,
    # 2026-12-04) and, behind a barrier, on rank 0 (CI, 2026-12-06)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if int(flag) else 0)


if __name__ == "__main__":
    sys.exit(main())
