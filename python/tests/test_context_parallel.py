"""Context parallel through the binding (SPEC section 10) on a CPU context:
cp ranks simulated in one process, each with block tables that list only the
blocks it owns (the caches are shared here; tests/test_context_parallel.c
gives each rank caches of its own pages). The merged top-k equals index_topk
on the whole cache; the N-way merge of the ranks' partial attention equals the
unsplit attention within rounding."""
import numpy as np
import pytest

import m3sparse as m3s
from m3s_reference import Case, rel_l2

B = 128


def rank_tables(case, cp_size, rank, interleave):
    """The rank's block tables: column (b // (I*cp)) * I + b % I for owned b."""
    tabs = []
    for whole in (case.block_table, case.index_block_table):
        t = np.full_like(whole, -7)
        for r, s in enumerate(case.seq_lens):
            for b in range(-(-int(s) // B)):
                if (b // interleave) % cp_size == rank:
                    col = (b // (interleave * cp_size)) * interleave + b % interleave
                    t[r, col] = whole[r, b]
        tabs.append(t)
    return tabs


@pytest.mark.parametrize("cp_size,interleave", [(2, 1), (3, 2)])
def test_cp_step_equals_the_whole_cache(cp_size, interleave):
    case = Case(hq=8, hkv=2, topk=6, init=1, local=1, seed=7 + cp_size,
                reqs=[(1, 2500), (0, 0), (9, 1300), (2, 100)], qsl_base=2)
    ctx = m3s.Context(-1)
    cfg = m3s.layer_config(8, 2, 6, 1, 1)
    ctx.index_topk(cfg, case.batch(m3s), case.iq, case.index_cache, case.topk,
                   act_dtype="bf16", index_dtype="bf16")
    want_topk = np.array(case.topk)
    ctx.sparse_attention(cfg, case.batch(m3s), case.q, case.kv_cache, case.topk, case.out,
                         case.lse, **case.kw())
    want_out, want_lse = case.out_f64(), np.array(case.lse, dtype=np.float64)

    T = case.T
    ids = np.full((cp_size, T, 2, 6), 0x7FFFFFFF, dtype=np.int32)
    scores = np.full((cp_size, T, 2, 6), np.nan, dtype=np.float32)
    outs = np.full((cp_size, T, 8, 128), 0x7FC0, dtype=np.uint16)
    lses = np.full((cp_size, T, 8), np.nan, dtype=np.float32)
    batches = []
    for n in range(cp_size):
        bt, ibt = rank_tables(case, cp_size, n, interleave)
        batches.append(m3s.Batch(case.seq_lens, bt, ibt, query_start_loc=case.qsl,
                                 cp=(cp_size, n, interleave)))
        ctx.index_topk_candidates(cfg, batches[n], case.iq, case.index_cache, ids[n], scores[n],
                                  act_dtype="bf16", index_dtype="bf16")
    for n in range(cp_size):
        topk = np.full((T, 2, 6), 0x7FFFFFFF, dtype=np.int32)
        ctx.merge_topk_candidates(cfg, batches[n], ids, scores, topk)
        assert np.array_equal(topk, want_topk)
        ctx.sparse_attention(cfg, batches[n], case.q, case.kv_cache, topk, outs[n], lses[n],
                             **case.kw())
    out = case.new_out()
    lse = np.full((T, 8), np.nan, dtype=np.float32)
    ctx.merge_attn_states_n(outs, lses, out, lse, act_dtype="bf16")
    assert rel_l2(case.out_f64(out), want_out) < 1e-2
    fin = np.isfinite(want_lse)
    assert np.array_equal(fin, np.isfinite(lse))
    assert np.max(np.abs(lse[fin] - want_lse[fin])) < 1e-3


def test_cp_batch_refused_by_index_topk():
    case = Case(hq=4, hkv=1, topk=4, init=0, local=1, reqs=[(1, 700)])
    ctx = m3s.Context(-1)
    cfg = m3s.layer_config(4, 1, 4, 0, 1)
    bt, ibt = rank_tables(case, 2, 0, 1)
    b = m3s.Batch(case.seq_lens, bt, ibt, uniform_q_len=1, cp=(2, 0, 1))
    with pytest.raises(m3s.M3SError) as e:
        ctx.index_topk(cfg, b, case.iq, case.index_cache, case.topk, act_dtype="bf16",
                       index_dtype="bf16")
    assert e.value.status == m3s.M3S_ERR_INVALID and "m3s_index_topk_candidates" in str(e.value)
    info = ctx.query_support(cfg, "merge_topk_candidates")
    assert info.supported and info.kernel
