"""torch integration on CUDA tensors (skipped without torch or CUDA):
opcheck of every operator, CUDA vs the CPU path (top-k exact, attention rel
L2 < 1e-2), a plain-torch fp64 implementation of SPEC sections 3-4, CUDA-graph
capture and replay with new contents (bit-identical to eager runs),
torch.compile tracing of the layer, and the context-parallel operators with
ranks simulated in one process (CUDA vs CPU vs the whole cache, opcheck, a
captured chain)."""
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import m3sparse as m3s  # noqa: E402
from m3s_reference import Case, check_attention, ref_attention, ref_topk  # noqa: E402
from torch_helpers import (RankCaches, TorchCase, cp_chain, rel_l2,  # noqa: E402
                           torch_reference, whole_layer)

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(not m3s.HAS_TORCH, reason="torch integration disabled: %r"
                       % (getattr(m3s, "TORCH_IMPORT_ERROR", None),)),
]
ops = torch.ops.m3sparse


@pytest.fixture(scope="module", autouse=True)
def cuda_context():
    dev = torch.cuda.current_device()
    try:
        return m3s.get_context(dev)
    except m3s.M3SError as e:
        if e.status == m3s.M3S_ERR_UNSUPPORTED:
            pytest.skip("the loaded library (%s) has no CUDA backend: %s"
                        % (m3s.library_path(), e.message))
        raise


def dev():
    return torch.device("cuda", torch.cuda.current_device())


def bits(t):
    """Bit pattern of a tensor, for exact comparisons (NaN-safe)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32,
                                8: torch.int64}[t.element_size()])


CASES = {
    "tp8_ragged_mixed": dict(hq=8, hkv=1, topk=16, init=0, local=1, qsl_base=3,
                             reqs=[(1, 2500), (0, 0), (1, 130), (60, 2300)]),
    "tp2_token_major_spec_decode": dict(hq=32, hkv=2, topk=16, init=0, local=1, uniform=True,
                                        token_major=True,
                                        reqs=[(3, 2051), (3, 0), (3, 300), (3, 3)]),
    "tp1_prefill": dict(hq=64, hkv=4, topk=16, init=0, local=1,
                        reqs=[(100, 2200), (9, 2600)]),
    "e4m3_per_slot_scales_e4m3_index": dict(hq=16, hkv=1, topk=16, init=0, local=1,
                                            kv="e4m3", scale_mode=2, idx="e4m3",
                                            reqs=[(1, 2300), (20, 1900)]),
    "k4_init1_f16": dict(hq=8, hkv=2, topk=4, init=1, local=1, act="f16", kv="f16",
                         reqs=[(1, 1000), (1, 0), (15, 800)]),
}


def _run_ops(case, tc):
    uq = case.q_len if case.uniform else 0
    qsl = None if case.uniform else tc.query_start_loc
    tk = ops.index_topk(tc.iq, tc.index_cache, tc.seq_lens, tc.index_block_table, qsl, uq, 0,
                        case.max_seq_len, case.K, case.init, case.local)
    out, lse = ops.sparse_attention(tc.q, tc.kv_cache, tk, tc.seq_lens, tc.block_table, qsl,
                                    tc.k_scale, tc.v_scale, uq, 0, case.max_seq_len, case.scale)
    return tk, out, lse


@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_matches_cpu_and_references(name):
    case = Case(seed=zlib.crc32(name.encode()) % 1000, **CASES[name])
    cpu = TorchCase(case, "cpu")
    gpu = TorchCase(case, dev())
    tk_c, out_c, lse_c = _run_ops(case, cpu)
    tk_g, out_g, lse_g = _run_ops(case, gpu)
    torch.cuda.synchronize()
    # top-k: exact against the CPU path and the numpy fp64 reference
    assert torch.equal(tk_g.cpu(), tk_c)
    want = ref_topk(case)
    assert np.array_equal(tk_g.cpu().numpy(), want)
    # attention: CUDA vs CPU, and vs the numpy reference
    assert rel_l2(out_g.cpu(), out_c) < 1e-2
    fin = torch.isfinite(lse_c)
    assert torch.equal(torch.isfinite(lse_g.cpu()), fin)
    assert (lse_g.cpu()[fin] - lse_c[fin]).abs().max() < 1e-3
    check_attention(case, out_g.cpu().float().numpy(), lse_g.cpu().numpy(),
                    *ref_attention(case, want))
    # the plain-torch reference, on the GPU, from the paged caches
    sel, rout, rlse = torch_reference(gpu.q, gpu.iq, gpu.kv_cache, gpu.index_cache,
                                      case.block_table, case.index_block_table,
                                      case.seq_lens.tolist(), gpu.rows(), case.hkv, case.K,
                                      case.init, case.local, case.scale, gpu.k_scale,
                                      gpu.v_scale)
    assert torch.equal(sel, tk_g)
    assert rel_l2(out_g, rout) < 1e-2
    rfin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse_g), rfin)
    assert (lse_g.double()[rfin] - rlse[rfin]).abs().max() < 1e-3
    assert (out_g[~rfin] == 0).all()


def test_step_forward_cuda_matches_cpu():
    reqs = [(2, 2300), (2, 140), (37, 2600), (0, 0), (5, 5)]
    case = Case(hq=16, hkv=1, topk=16, init=0, local=1, seed=51, token_major=True, reqs=reqs)
    plan = m3s.get_context(-1).plan_step(m3s.config_minimax_m3(4), [q for q, _ in reqs],
                                         case.seq_lens, num_spec_tokens=1)
    res = []
    for d in ("cpu", dev()):
        tc = TorchCase(case, d)
        res.append(ops.step_forward(tc.q, tc.iq, tc.kv_cache, tc.index_cache,
                                    tc.query_start_loc, tc.seq_lens, tc.block_table,
                                    tc.index_block_table, None, None, plan.num_decodes,
                                    plan.decode_q_len, plan.max_prefill_q_len,
                                    plan.max_seq_len, 16, 0, 1))
    (out_c, lse_c, tk_c), (out_g, lse_g, tk_g) = res
    assert torch.equal(tk_g.cpu(), tk_c)
    assert np.array_equal(tk_c.numpy(), ref_topk(case))
    assert rel_l2(out_g.cpu(), out_c) < 1e-2
    check_attention(case, out_g.cpu().float().numpy(), lse_g.cpu().numpy(),
                    *ref_attention(case, tk_c.numpy()))


def test_opcheck_cuda():
    case = Case(hq=16, hkv=2, topk=8, init=0, local=1, seed=52, uniform=True,
                reqs=[(1, 1300), (1, 0), (1, 300)])
    tc = TorchCase(case, dev())
    T, hkv, K, msl = case.T, case.hkv, case.K, case.max_seq_len
    oc = torch.library.opcheck
    tk = ops.index_topk(tc.iq, tc.index_cache, tc.seq_lens, tc.index_block_table, None, 1, 1,
                        msl, K, 0, 1)
    oc(ops.index_topk.default, (tc.iq, tc.index_cache, tc.seq_lens, tc.index_block_table,
                                None, 1, 1, msl, K, 0, 1))
    oc(ops.index_topk_out.default, (tc.iq, tc.index_cache, tc.seq_lens, tc.index_block_table,
                                    None, torch.empty_like(tk), 1, 1, msl, 0, 1))
    oc(ops.sparse_attention.default, (tc.q, tc.kv_cache, tk, tc.seq_lens, tc.block_table, None,
                                      None, None, 1, 1, msl))
    oc(ops.sparse_attention_out.default,
       (tc.q, tc.kv_cache, tk, tc.seq_lens, tc.block_table, None, torch.empty_like(tc.q),
        torch.empty((T, case.hq), device=dev()), None, None, 1, 1, msl))
    sargs = (tc.q, tc.iq, tc.kv_cache, tc.index_cache, tc.query_start_loc, tc.seq_lens,
             tc.block_table, tc.index_block_table)
    oc(ops.step_forward.default, sargs + (None, None, case.R, 1, 0, msl, K))
    oc(ops.step_forward_out.default,
       sargs + (torch.empty_like(tk), torch.empty_like(tc.q),
                torch.empty((T, case.hq), device=dev()), None, None, case.R, 1, 0, msl))
    k = torch.randn((T, hkv, 128), device=dev()).bfloat16()
    slots = torch.tensor([3, -1, 200], dtype=torch.int64, device=dev())
    kv_tm = torch.zeros((case.P, 128, hkv, 256), dtype=torch.bfloat16,
                        device=dev()).permute(0, 2, 1, 3)
    oc(ops.cache_insert.default, (k, k.clone(), slots, kv_tm))
    fp8 = torch.zeros((case.P, hkv, 128, 256), dtype=torch.uint8, device=dev())
    oc(ops.cache_insert.default, (k, k.clone(), slots, fp8,
                                  torch.tensor(0.5, device=dev()), torch.tensor(2.0, device=dev()),
                                  m3s.M3S_E4M3))
    oc(ops.index_cache_insert.default, (k[:, 0].contiguous(), slots, tc.index_cache.clone()))


# ---------------------------------------------------------------------------
# CUDA graphs
# ---------------------------------------------------------------------------
class DecodeBuffers:
    """Persistent vLLM-style buffers of a uniform decode step of R (padded)
    requests, q_len 1 + spec, token-major bf16 main cache."""

    def __init__(self, R, spec, hq, hkv, max_pages, seed=0):
        d = dev()
        g = torch.Generator().manual_seed(seed)
        self.R, self.ql, self.hq, self.hkv, self.maxp = R, 1 + spec, hq, hkv, max_pages
        self.T = T = R * self.ql
        self.P = P = R * max_pages + 3
        self.kv_phys = torch.randn((P, 128, hkv, 256), generator=g).bfloat16().to(d)
        self.kv = self.kv_phys.permute(0, 2, 1, 3)
        self.ic = (torch.randint(-4, 5, (P, 128, 128), generator=g) / 4).bfloat16().to(d)
        self.kv0, self.ic0 = self.kv_phys.clone(), self.ic.clone()
        bf = dict(dtype=torch.bfloat16, device=d)
        self.q = torch.empty((T, hq, 128), **bf)
        self.iq = torch.empty((T, hkv, 128), **bf)
        self.k = torch.empty((T, hkv, 128), **bf)
        self.v = torch.empty((T, hkv, 128), **bf)
        self.ik = torch.empty((T, 128), **bf)
        self.slots = torch.empty(T, dtype=torch.int64, device=d)
        self.qsl = torch.empty(R + 1, dtype=torch.int32, device=d)
        self.seq = torch.empty(R, dtype=torch.int32, device=d)
        self.bt = torch.empty((R, max_pages), dtype=torch.int32, device=d)
        self.out = torch.empty((T, hq, 128), **bf)
        self.lse = torch.empty((T, hq), dtype=torch.float32, device=d)
        self.topk = torch.empty((T, hkv, 16), dtype=torch.int32, device=d)

    def load(self, seed, seq_lens):
        """New contents in the same buffers (caches reset to their start)."""
        g = torch.Generator().manual_seed(seed)
        T, R, ql = self.T, self.R, self.ql
        self.q.copy_(torch.randn((T, self.hq, 128), generator=g).bfloat16())
        self.iq.copy_((torch.randint(-4, 5, (T, self.hkv, 128), generator=g) / 4).bfloat16())
        self.k.copy_(torch.randn((T, self.hkv, 128), generator=g).bfloat16())
        self.v.copy_(torch.randn((T, self.hkv, 128), generator=g).bfloat16())
        self.ik.copy_((torch.randint(-4, 5, (T, 128), generator=g) / 4).bfloat16())
        perm = torch.randperm(self.P, generator=g)[: R * self.maxp].view(R, self.maxp).int()
        self.bt.copy_(perm)
        self.seq.copy_(torch.tensor(seq_lens, dtype=torch.int32))
        self.qsl.copy_(torch.arange(R + 1, dtype=torch.int32) * ql)
        slots = []
        for r in range(R):
            for i in range(ql):
                s = seq_lens[r]
                if s == 0:
                    slots.append(-1)
                else:
                    p = s - ql + i
                    slots.append(int(perm[r, p // 128]) * 128 + p % 128)
        self.slots.copy_(torch.tensor(slots, dtype=torch.int64))
        self.kv_phys.copy_(self.kv0)
        self.ic.copy_(self.ic0)


def test_cuda_graph_capture_replay_bit_identical():
    R, spec, maxp = 4, 1, 24
    layer = m3s.M3SparseLayer(tp_size=2, num_spec_tokens=spec, max_model_len=maxp * 128)
    b = DecodeBuffers(R, spec, layer.num_q_heads, layer.num_kv_heads, maxp)
    meta = layer.decode_meta(R)

    def step():
        return layer(b.q, b.iq, b.k, b.v, b.ik, b.kv, b.ic, b.slots, b.qsl, b.seq, b.bt, meta,
                     out=b.out, lse=b.lse, topk=b.topk)

    b.load(1, [2000, 0, 130, 2])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):          # warm-up (contexts, allocator) before capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()

    for seed, seq_lens in [(2, [3000, 129, 0, 1024]), (3, [2, 2047, 2049, 0]),
                           (4, [3072, 3071, 700, 5])]:
        b.load(seed, seq_lens)
        graph.replay()
        torch.cuda.synchronize()
        g_res = [x.clone() for x in (b.out, b.lse, b.topk, b.kv_phys, b.ic)]
        b.load(seed, seq_lens)
        b.out.fill_(7)
        b.lse.fill_(7)
        b.topk.fill_(7)
        step()
        torch.cuda.synchronize()
        e_res = (b.out, b.lse, b.topk, b.kv_phys, b.ic)
        for name, g_t, e_t in zip(("out", "lse", "topk", "kv_cache", "index_cache"), g_res,
                                  e_res):
            assert torch.equal(bits(g_t), bits(e_t)), "replay differs from eager: " + name
        # padded requests: zeros, -inf, -1
        for r, s in enumerate(seq_lens):
            rows = slice(r * b.ql, (r + 1) * b.ql)
            if s == 0:
                assert (b.out[rows] == 0).all() and torch.isneginf(b.lse[rows]).all()
                assert (b.topk[rows] == -1).all()
        # and the replayed step is the SPEC's step (plain-torch reference)
        rows = [(r * b.ql, b.ql) for r in range(R)]
        sel, rout, _ = torch_reference(b.q, b.iq, b.kv, b.ic, b.bt.cpu(), b.bt.cpu(), seq_lens,
                                       rows, layer.num_kv_heads, 16, 0, 1, layer.softmax_scale)
        assert torch.equal(sel, g_res[2])
        assert rel_l2(g_res[0], rout) < 1e-2


def test_cuda_graph_of_functional_ops():
    case = Case(hq=8, hkv=1, topk=16, init=0, local=1, seed=53, uniform=True,
                reqs=[(1, 2500), (1, 0), (1, 900)])
    tc = TorchCase(case, dev())
    msl = 4096

    def f():
        tk = ops.index_topk(tc.iq, tc.index_cache, tc.seq_lens, tc.index_block_table, None, 1,
                            1, msl, 16, 0, 1)
        return (tk,) + tuple(ops.sparse_attention(tc.q, tc.kv_cache, tk, tc.seq_lens,
                                                  tc.block_table, None, None, None, 1, 1, msl))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = f()
    tc.q.copy_(torch.randn_like(tc.q, dtype=torch.float32).bfloat16())
    # new seq_lens within each request's pages (the old padded request stays padded)
    tc.seq_lens.copy_(torch.tensor([2450, 0, 1000], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    eager = f()
    for a, e in zip(static, eager):
        assert torch.equal(bits(a), bits(e))


def test_compile_layer_step_cuda():
    """torch.compile traces the layer (inserts on a token-major view, step)."""
    R, spec, maxp = 3, 0, 20
    layer = m3s.M3SparseLayer(tp_size=4, num_spec_tokens=spec, max_model_len=maxp * 128)
    b = DecodeBuffers(R, spec, layer.num_q_heads, layer.num_kv_heads, maxp, seed=5)
    meta = layer.decode_meta(R)

    def step(q, iq, k, v, ik, kv, ic, slots, qsl, seq, bt):
        out, lse, tk = layer(q, iq, k, v, ik, kv, ic, slots, qsl, seq, bt, meta)
        return out, lse, tk

    args = lambda: (b.q, b.iq, b.k, b.v, b.ik, b.kv, b.ic, b.slots, b.qsl, b.seq, b.bt)  # noqa
    b.load(9, [1500, 0, 2500])
    eager = [x.clone() for x in step(*args())] + [b.kv_phys.clone(), b.ic.clone()]
    b.load(9, [1500, 0, 2500])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = list(compiled(*args())) + [b.kv_phys, b.ic]
    for e, g in zip(eager, got):
        assert torch.equal(bits(e), bits(g))


def test_batch_invariant_option(cuda_context):
    """With ctx.batch_invariant, a decode row alone gives the bits it gets
    inside a batch with a 400-row prefill (other num_tokens, max_seq_len)."""
    case = Case(hq=16, hkv=2, topk=16, init=0, local=1, seed=61,
                reqs=[(1, 5000), (400, 7000)])
    tc = TorchCase(case, dev())
    tk = ops.index_topk(tc.iq, tc.index_cache, tc.seq_lens, tc.index_block_table,
                        tc.query_start_loc, 0, 0, case.max_seq_len, case.K, case.init,
                        case.local)
    prev = cuda_context.batch_invariant
    cuda_context.batch_invariant = True
    try:
        out, lse = ops.sparse_attention(tc.q, tc.kv_cache, tk, tc.seq_lens, tc.block_table,
                                        tc.query_start_loc, tc.k_scale, tc.v_scale, 0, 0,
                                        case.max_seq_len, case.scale)
        out1, lse1 = ops.sparse_attention(tc.q[:1], tc.kv_cache, tk[:1], tc.seq_lens[:1],
                                          tc.block_table[:1], tc.query_start_loc[:2],
                                          tc.k_scale, tc.v_scale, 0, 0, 5000, case.scale)
        torch.cuda.synchronize()
    finally:
        cuda_context.batch_invariant = prev
    assert torch.equal(bits(out1), bits(out[:1]))
    assert torch.equal(bits(lse1), bits(lse[:1]))
    assert torch.isfinite(lse1).all()


# ---------------------------------------------------------------------------
# Context parallel (SPEC section 10), ranks simulated on one GPU
# ---------------------------------------------------------------------------
CP_CASES = {
    "ragged_tp4_cp3_i2": (dict(hq=16, hkv=2, topk=6, init=1, local=1, qsl_base=2,
                               reqs=[(1, 2500), (0, 0), (9, 1300), (2, 100)]), 3, 2),
    "spec_decode_token_major_cp2": (dict(hq=8, hkv=1, topk=16, init=0, local=1, uniform=True,
                                         token_major=True,
                                         reqs=[(2, 3000), (2, 0), (2, 1100), (2, 2)]), 2, 1),
    "tp1_prefill_cp4": (dict(hq=64, hkv=4, topk=16, init=0, local=1,
                             reqs=[(100, 3200), (9, 2600)]), 4, 1),
    "e4m3_per_slot_cp2": (dict(hq=16, hkv=1, topk=16, init=0, local=1, kv="e4m3",
                               scale_mode=2, idx="e4m3", reqs=[(1, 2300), (20, 1900)]), 2, 1),
}


@pytest.mark.parametrize("name", sorted(CP_CASES))
def test_cp_ops_cuda_match_cpu_and_whole_cache(name):
    kw, cp, interleave = CP_CASES[name]
    case = Case(seed=zlib.crc32(name.encode()) % 1000, **kw)
    res = {}
    for d in ("cpu", dev()):
        tc = TorchCase(case, d)
        ranks = [RankCaches(tc, cp, n, interleave, seed=n) for n in range(cp)]
        res[str(d)] = (whole_layer(case, tc), cp_chain(case, tc, ranks, interleave))
    torch.cuda.synchronize()
    (w_tk, w_out, w_lse), (g_topks, g_out, g_lse) = res[str(dev())]
    (_, _, _), (c_topks, c_out, c_lse) = res["cpu"]
    want = ref_topk(case)
    for tk in g_topks:   # every rank: the whole-cache CUDA top-k, the CPU's, the reference
        assert torch.equal(tk, w_tk) and torch.equal(tk.cpu(), c_topks[0])
        assert np.array_equal(tk.cpu().numpy(), want)
    assert rel_l2(g_out, w_out) < 1e-2 and rel_l2(g_out.cpu(), c_out) < 1e-2
    fin = torch.isfinite(w_lse)
    assert torch.equal(torch.isfinite(g_lse), fin)
    assert (g_lse[fin] - w_lse[fin]).abs().max() < 1e-3
    check_attention(case, g_out.cpu().float().numpy(), g_lse.cpu().numpy(),
                    *ref_attention(case, want))


def test_opcheck_cp_ops_cuda():
    case = Case(hq=8, hkv=2, topk=4, init=0, local=1, seed=54, uniform=True,
                reqs=[(1, 1300), (1, 0), (1, 700)])
    tc = TorchCase(case, dev())
    cp, I, msl, K, T, hq = 2, 1, case.max_seq_len, case.K, case.T, case.hq
    ranks = [RankCaches(tc, cp, n, I) for n in range(cp)]
    c = [ops.index_topk_candidates(tc.iq, rk.index_cache, tc.seq_lens, rk.index_block_table,
                                   None, 1, 1, msl, cp, n, I, K) for n, rk in enumerate(ranks)]
    ids, scores = torch.stack([x[0] for x in c]), torch.stack([x[1] for x in c])
    tk = ops.merge_topk_candidates(ids, scores, tc.seq_lens, None, 1, 1, msl, I)
    rk = ranks[1]
    oc = torch.library.opcheck
    oc(ops.index_topk_candidates.default, (tc.iq, rk.index_cache, tc.seq_lens,
                                           rk.index_block_table, None, 1, 1, msl, cp, 1, I, K))
    oc(ops.index_topk_candidates_out.default,
       (tc.iq, rk.index_cache, tc.seq_lens, rk.index_block_table, None,
        torch.empty_like(c[1][0]), torch.empty_like(c[1][1]), 1, 1, msl, cp, 1, I))
    oc(ops.merge_topk_candidates.default, (ids, scores, tc.seq_lens, None, 1, 1, msl, I))
    oc(ops.merge_topk_candidates_out.default,
       (ids, scores, tc.seq_lens, None, torch.empty_like(tk), 1, 1, msl, I))
    oc(ops.sparse_attention_cp.default, (tc.q, rk.kv_cache, tk, tc.seq_lens, rk.block_table,
                                         None, None, None, 1, 1, msl, cp, 1, I))
    oc(ops.sparse_attention_cp_out.default,
       (tc.q, rk.kv_cache, tk, tc.seq_lens, rk.block_table, None, torch.empty_like(tc.q),
        torch.empty((T, hq), device=dev()), None, None, 1, 1, msl, cp, 1, I))
    outs = torch.randn((cp, T, hq, 128), device=dev()).bfloat16()
    lses = torch.randn((cp, T, hq), device=dev())
    oc(ops.merge_attn_states_n.default, (outs, lses))
    oc(ops.merge_attn_states_n_out.default, (outs, lses, torch.empty_like(tc.q),
                                             torch.empty((T, hq), device=dev())))


def test_cuda_graph_of_cp_chain():
    """The whole chain (torch.stack standing in for the all-gathers) captured
    once, replayed with new queries and seq_lens: bit-identical to eager."""
    kw, cp, interleave = CP_CASES["spec_decode_token_major_cp2"]
    case = Case(seed=55, **kw)
    tc = TorchCase(case, dev())
    ranks = [RankCaches(tc, cp, n, interleave, seed=n) for n in range(cp)]

    def f():
        topks, out, lse = cp_chain(case, tc, ranks, interleave)
        return topks[0], out, lse

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = f()
    tc.q.copy_(torch.randn_like(tc.q, dtype=torch.float32).bfloat16())
    tc.iq.copy_(torch.randn_like(tc.iq, dtype=torch.float32).bfloat16())
    # new seq_lens within each request's blocks (the padded request stays padded)
    tc.seq_lens.copy_(torch.tensor([2900, 0, 1030, 2], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    eager = f()
    for a, e in zip(static, eager):
        assert torch.equal(bits(a), bits(e))
    w_tk, w_out, _ = whole_layer(case, tc)   # and the replay is the whole-cache layer
    assert torch.equal(static[0], w_tk)
    assert rel_l2(static[1], w_out) < 1e-2
