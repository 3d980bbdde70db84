"""Context parallel through the torch operators (SPEC section 10) on CPU
tensors (skipped without torch): cp ranks simulated in one process, each with
caches holding only its own pages and block tables listing only its blocks
(torch_helpers.RankCaches), torch.stack standing in for the all-gathers.

Checked: the merged top-k is bit-identical to index_topk on the whole cache
(and to the numpy fp64 reference), the N-way merge of the ranks' partial
attention matches the unsplit sparse_attention (rel L2 < 1e-2, lse within
1e-3); out-variants and allocating variants agree; opcheck and fake-tensor
shapes; torch.compile traces the chain; and examples/context_parallel.py runs
under torchrun on 2 processes with the gloo backend."""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import m3sparse as m3s  # noqa: E402
from m3s_reference import Case, check_attention, ref_attention, ref_topk  # noqa: E402
from torch_helpers import RankCaches, TorchCase, cp_chain, rel_l2, whole_layer  # noqa: E402,E501

pytestmark = pytest.mark.skipif(not m3s.HAS_TORCH,
                                reason="torch integration disabled: %r"
                                % (getattr(m3s, "TORCH_IMPORT_ERROR", None),))
ops = torch.ops.m3sparse

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
EXAMPLE = os.path.join(REPO_ROOT, "examples", "context_parallel.py")

CASES = {
    # ragged: a decode row, a padded request, a chunked prefill, a short prefill (nb <= K)
    "ragged_tp4": dict(hq=16, hkv=2, topk=6, init=1, local=1, qsl_base=2,
                       reqs=[(1, 2500), (0, 0), (9, 1300), (2, 100)]),
    # uniform speculative decode, token-major cache
    "decode_spec_token_major": dict(hq=8, hkv=1, topk=8, init=0, local=1, uniform=True,
                                    token_major=True, reqs=[(2, 3000), (2, 0), (2, 1100)]),
    # fp8 K/V with per-slot scales, e4m3 index cache, f16 activations elsewhere
    "e4m3_per_slot": dict(hq=8, hkv=1, topk=16, init=0, local=2, kv="e4m3", scale_mode=2,
                          idx="e4m3", reqs=[(1, 2600), (5, 2200)]),
    "f16": dict(hq=8, hkv=2, topk=4, init=1, local=1, act="f16", kv="f16",
                reqs=[(1, 1000), (12, 900)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("cp_size,interleave", [(2, 1), (3, 2), (4, 1)])
def test_cp_ops_equal_the_whole_cache(name, cp_size, interleave):
    case = Case(seed=11 + cp_size + 7 * interleave + len(name), **CASES[name])
    tc = TorchCase(case, "cpu")
    want_tk, want_out, want_lse = whole_layer(case, tc)
    assert np.array_equal(want_tk.numpy(), ref_topk(case))
    ranks = [RankCaches(tc, cp_size, n, interleave, seed=n) for n in range(cp_size)]
    topks, out, lse = cp_chain(case, tc, ranks, interleave)
    for tk in topks:                       # every rank: the whole-cache top-k, bit for bit
        assert tk.dtype == torch.int32 and torch.equal(tk, want_tk)
    assert out.dtype == tc.q.dtype and tuple(out.shape) == tuple(tc.q.shape)
    assert lse.dtype == torch.float32 and tuple(lse.shape) == (case.T, case.hq)
    assert rel_l2(out, want_out) < 1e-2
    fin = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (lse[fin] - want_lse[fin]).abs().max() < 1e-3
    assert (out[~fin] == 0).all()
    check_attention(case, out.float().numpy(), lse.numpy(),
                    *ref_attention(case, want_tk.numpy()))


def test_out_variants_and_one_buffer_gather():
    """The out-variants write into views of one [T, Hkv, 2, K] i32 buffer per
    rank (ids, then scores as f32 bits), so one all-gather moves both; results
    equal the allocating variants bit for bit."""
    case = Case(seed=5, **CASES["ragged_tp4"])
    tc = TorchCase(case, "cpu")
    qsl, msl, K, cp, I = tc.query_start_loc, case.max_seq_len, case.K, 2, 1
    ranks = [RankCaches(tc, cp, n, I) for n in range(cp)]
    T, hkv = case.T, case.hkv
    gathered = torch.full((cp, T, hkv, 2, K), 0x7FFFFFFF, dtype=torch.int32)
    for n, rk in enumerate(ranks):
        buf = gathered[n]                                   # the rank's slot of the gather
        ops.index_topk_candidates_out(tc.iq, rk.index_cache, tc.seq_lens, rk.index_block_table,
                                      qsl, buf[:, :, 0], buf.view(torch.float32)[:, :, 1], 0, 0,
                                      msl, cp, n, I, case.init, case.local)
        ids, scores = ops.index_topk_candidates(tc.iq, rk.index_cache, tc.seq_lens,
                                                rk.index_block_table, qsl, 0, 0, msl, cp, n, I,
                                                K, case.init, case.local)
        assert torch.equal(buf[:, :, 0], ids)
        assert torch.equal(buf[:, :, 1], scores.view(torch.int32))   # same bits, NaN-safe
    all_ids = gathered[:, :, :, 0]
    all_scores = gathered.view(torch.float32)[:, :, :, 1]
    tk = torch.full((T, hkv, K), 7, dtype=torch.int32)
    ops.merge_topk_candidates_out(all_ids, all_scores, tc.seq_lens, qsl, tk, 0, 0, msl, I,
                                  case.init, case.local)
    want_tk, want_out, want_lse = whole_layer(case, tc)
    assert torch.equal(tk, want_tk)
    outs = torch.full((cp, T, case.hq, 128), float("nan"), dtype=torch.bfloat16)
    lses = torch.full((cp, T, case.hq), float("nan"))
    for n, rk in enumerate(ranks):
        ops.sparse_attention_cp_out(tc.q, rk.kv_cache, tk, tc.seq_lens, rk.block_table, qsl,
                                    outs[n], lses[n], None, None, 0, 0, msl, cp, n, I)
        o, lse = ops.sparse_attention_cp(tc.q, rk.kv_cache, tk, tc.seq_lens, rk.block_table,
                                         qsl, None, None, 0, 0, msl, cp, n, I)
        assert torch.equal(o, outs[n]) and torch.equal(lse, lses[n])
    out = torch.full_like(tc.q, float("nan"))
    lse = torch.full((T, case.hq), float("nan"))
    ops.merge_attn_states_n_out(outs, lses, out, lse)
    out2, lse2 = ops.merge_attn_states_n(outs, lses)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    out3 = torch.full_like(tc.q, float("nan"))
    ops.merge_attn_states_n_out(outs, lses, out3, None)        # lse optional
    assert torch.equal(out3, out)
    assert rel_l2(out, want_out) < 1e-2


def test_merge_attn_states_n_values():
    """lse = log sum exp, out weighted by exp(lse_n - lse); all -inf: 0 / -inf;
    f32 partials give f32 outputs."""
    g = torch.Generator().manual_seed(3)
    N, T, H = 3, 5, 4
    outs = torch.randn((N, T, H, 128), generator=g)
    lses = torch.randn((N, T, H), generator=g) * 3
    lses[1, 0] = float("-inf")
    lses[:, 2, 1] = float("-inf")
    out, lse = ops.merge_attn_states_n(outs, lses)
    assert out.dtype == torch.float32
    want_lse = torch.logsumexp(lses.double(), dim=0)
    w = torch.exp(lses.double() - want_lse)
    w[:, 2, 1] = 0
    want_out = (w[..., None] * outs.double()).sum(0)
    fin = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), fin) and not fin[2, 1]
    assert (lse.double()[fin] - want_lse[fin]).abs().max() < 1e-5
    assert (out.double() - want_out).abs().max() < 1e-5
    assert (out[2, 1] == 0).all()


def test_cp_errors():
    case = Case(seed=6, **CASES["ragged_tp4"])
    tc = TorchCase(case, "cpu")
    qsl, msl = tc.query_start_loc, case.max_seq_len
    rk = RankCaches(tc, 2, 1, 1)
    ids, scores = ops.index_topk_candidates(tc.iq, rk.index_cache, tc.seq_lens,
                                            rk.index_block_table, qsl, 0, 0, msl, 2, 1, 1,
                                            case.K, case.init, case.local)
    # rank 1's candidates placed at index 0 of the gather: not owned by rank 0
    with pytest.raises(m3s.M3SError) as e:
        ops.merge_topk_candidates(torch.stack([ids, ids]), torch.stack([scores, scores]),
                                  tc.seq_lens, qsl, 0, 0, msl, 1, case.init, case.local)
    assert e.value.status == m3s.M3S_ERR_RANGE
    with pytest.raises(ValueError, match="cp, T, Hkv, K"):
        ops.merge_topk_candidates(ids, scores, tc.seq_lens, qsl, 0, 0, msl)
    with pytest.raises(m3s.M3SError) as e:          # cp_rank out of range
        ops.index_topk_candidates(tc.iq, rk.index_cache, tc.seq_lens, rk.index_block_table,
                                  qsl, 0, 0, msl, 2, 2, 1, case.K, case.init, case.local)
    assert e.value.status == m3s.M3S_ERR_INVALID and "cp_rank" in str(e.value)
    # the whole-cache top-k op refuses a context-parallel batch (not expressible: no cp
    # argument), while the cp attention of a one-rank "cp" equals plain attention
    tk, out, lse = whole_layer(case, tc)
    o1, l1 = ops.sparse_attention_cp(tc.q, tc.kv_cache, tk, tc.seq_lens, tc.block_table, qsl,
                                     None, None, 0, 0, msl, 1, 0, 1)
    assert torch.equal(o1, out) and torch.equal(l1, lse)


def _opcheck_args():
    case = Case(seed=8, hq=8, hkv=2, topk=4, init=0, local=1, uniform=True,
                reqs=[(1, 1300), (1, 0), (1, 700)])
    tc = TorchCase(case, "cpu")
    cp, n, I, msl, K = 2, 1, 1, case.max_seq_len, case.K
    rk = RankCaches(tc, cp, n, I)
    ids, scores = ops.index_topk_candidates(tc.iq, rk.index_cache, tc.seq_lens,
                                            rk.index_block_table, None, 1, 1, msl, cp, n, I, K)
    rk0 = RankCaches(tc, cp, 0, I)
    ids0, scores0 = ops.index_topk_candidates(tc.iq, rk0.index_cache, tc.seq_lens,
                                              rk0.index_block_table, None, 1, 1, msl, cp, 0, I,
                                              K)
    all_ids, all_scores = torch.stack([ids0, ids]), torch.stack([scores0, scores])
    tk = ops.merge_topk_candidates(all_ids, all_scores, tc.seq_lens, None, 1, 1, msl, I)
    T, hq = case.T, case.hq
    return {
        "index_topk_candidates": (tc.iq, rk.index_cache, tc.seq_lens, rk.index_block_table,
                                  None, 1, 1, msl, cp, n, I, K),
        "index_topk_candidates_out": (tc.iq, rk.index_cache, tc.seq_lens,
                                      rk.index_block_table, None, torch.empty_like(ids),
                                      torch.empty_like(scores), 1, 1, msl, cp, n, I),
        "merge_topk_candidates": (all_ids, all_scores, tc.seq_lens, None, 1, 1, msl, I),
        "merge_topk_candidates_out": (all_ids, all_scores, tc.seq_lens, None,
                                      torch.empty_like(tk), 1, 1, msl, I),
        "sparse_attention_cp": (tc.q, rk.kv_cache, tk, tc.seq_lens, rk.block_table, None, None,
                                None, 1, 1, msl, cp, n, I),
        "sparse_attention_cp_out": (tc.q, rk.kv_cache, tk, tc.seq_lens, rk.block_table, None,
                                    torch.empty_like(tc.q), torch.empty((T, hq)), None, None,
                                    1, 1, msl, cp, n, I),
        "merge_attn_states_n": (torch.randn((cp, T, hq, 128)).bfloat16(),
                                torch.randn((cp, T, hq))),
        "merge_attn_states_n_out": (torch.randn((cp, T, hq, 128)).bfloat16(),
                                    torch.randn((cp, T, hq)), torch.empty_like(tc.q),
                                    torch.empty((T, hq))),
    }


CP_OPS = ["index_topk_candidates", "index_topk_candidates_out", "merge_topk_candidates",
          "merge_topk_candidates_out", "sparse_attention_cp", "sparse_attention_cp_out",
          "merge_attn_states_n", "merge_attn_states_n_out"]


@pytest.mark.parametrize("name", CP_OPS)
def test_opcheck_cp_ops(name):
    torch.library.opcheck(getattr(ops, name).default, _opcheck_args()[name])


def test_fake_tensor_shapes():
    """The fake implementations give the real outputs' shapes and dtypes
    (what torch.compile and meta tracing see)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    T, hq, hkv, K, cp = 7, 16, 2, 16, 4
    with FakeTensorMode():
        iq = torch.empty((T, hkv, 128), dtype=torch.bfloat16)
        q = torch.empty((T, hq, 128), dtype=torch.bfloat16)
        ic = torch.empty((5, 128, 128), dtype=torch.bfloat16)
        kv = torch.empty((5, hkv, 128, 256), dtype=torch.bfloat16)
        sl = torch.empty((3,), dtype=torch.int32)
        bt = torch.empty((3, 2), dtype=torch.int32)
        qsl = torch.empty((4,), dtype=torch.int32)
        ids, scores = ops.index_topk_candidates(iq, ic, sl, bt, qsl, 0, 0, 1 << 18, cp, 1, 1, K)
        assert ids.shape == (T, hkv, K) and ids.dtype == torch.int32
        assert scores.shape == (T, hkv, K) and scores.dtype == torch.float32
        all_ids = torch.empty((cp, T, hkv, K), dtype=torch.int32)
        all_sc = torch.empty((cp, T, hkv, K), dtype=torch.float32)
        tk = ops.merge_topk_candidates(all_ids, all_sc, sl, qsl, 0, 0, 1 << 18, 1)
        assert tk.shape == (T, hkv, K) and tk.dtype == torch.int32
        out, lse = ops.sparse_attention_cp(q, kv, tk, sl, bt, qsl, None, None, 0, 0, 1 << 18,
                                           cp, 1, 1)
        assert out.shape == (T, hq, 128) and out.dtype == torch.bfloat16
        assert lse.shape == (T, hq) and lse.dtype == torch.float32
        outs = torch.empty((cp, T, hq, 128), dtype=torch.float16)
        lses = torch.empty((cp, T, hq), dtype=torch.float32)
        mo, ml = ops.merge_attn_states_n(outs, lses)
        assert mo.shape == (T, hq, 128) and mo.dtype == torch.float16
        assert ml.shape == (T, hq) and ml.dtype == torch.float32


def test_compile_traces_thecp_chain():
    case = Case(seed=9, **CASES["decode_spec_token_major"])
    tc = TorchCase(case, "cpu")
    cp, I, msl, K = 2, 1, case.max_seq_len, case.K
    ranks = [RankCaches(tc, cp, n, I) for n in range(cp)]

    def f(iq, q):
        c = [ops.index_topk_candidates(iq, rk.index_cache, tc.seq_lens, rk.index_block_table,
                                       None, 2, 2, msl, cp, n, I, K)
             for n, rk in enumerate(ranks)]
        tk = ops.merge_topk_candidates(torch.stack([x[0] for x in c]),
                                       torch.stack([x[1] for x in c]), tc.seq_lens, None, 2, 2,
                                       msl, I)
        parts = [ops.sparse_attention_cp(q, rk.kv_cache, tk, tc.seq_lens, rk.block_table, None,
                                         None, None, 2, 2, msl, cp, n, I)
                 for n, rk in enumerate(ranks)]
        out, lse = ops.merge_attn_states_n(torch.stack([p[0] for p in parts]),
                                           torch.stack([p[1] for p in parts]))
        return out * 2, lse, tk

    eager = f(tc.iq, tc.q)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(tc.iq, tc.q)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# the example, under torchrun with gloo
# ---------------------------------------------------------------------------
def test_example_runs_under_torchrun_gloo():
    """examples/context_parallel.py --cpu on 2 processes (torch.distributed
    with gloo, launched by torchrun): decode steps and a chunked prefill, each
    checked against the single-rank result on rank 0 by the example itself
    (it exits non-zero on a mismatch)."""
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available in this torch build")
    if not dist.is_gloo_available():
        pytest.skip("torch.distributed has no gloo backend in this torch build")
    try:
        import torch.distributed.run  # noqa: F401  (torchrun's module)
    except ImportError as e:
        pytest.skip("torchrun (torch.distributed.run) cannot be imported: %s" % (e,))
    assert os.path.exists(EXAMPLE), EXAMPLE
    env = dict(os.environ)
    pkg = os.path.join(REPO_ROOT, "python")
    env["PYTHONPATH"] = pkg + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    lib = m3s.library_path()                # the library these tests loaded
    if lib:
        env["M3SPARSE_LIB"] = lib
    env.setdefault("OMP_NUM_THREADS", "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           EXAMPLE, "--cpu", "--context-len", "3000", "--chunk", "1024", "--decode-steps", "3"]
    try:
        r = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                           timeout=600)
    except subprocess.TimeoutExpired as e:
        pytest.fail("the example did not finish in 600 s:\n%s" % (e.stdout,))
    log = r.stdout + r.stderr
    if r.returncode != 0 and ("errno: 97" in log or "Address family not supported" in log
                              or "Cannot assign requested address" in log):
        pytest.skip("gloo cannot open a local socket here:\n" + log[-2000:])
    assert r.returncode == 0, "exit %d\n%s" % (r.returncode, log[-6000:])
    assert "top-k bit-identical" in r.stdout and "PASS" in r.stdout, log[-6000:]
    assert "prefill" in r.stdout and "decode" in r.stdout

