"""The binding on a CPU context against the numpy fp64 reference of SPEC
sections 3-4 (m3s_reference.py): top-k exact on grid-valued index data,
attention within rel L2 1e-2; inserts, the step, the k2q schedule and the lse
merge."""
import zlib

import numpy as np
import pytest

import m3sparse as m3s
from m3sparse.numpy_utils import bf16_bits, bf16_to_f32, fp8_bits, fp8_table
from m3s_reference import Case, check_attention, ref_attention, ref_topk, rel_l2

CTX = None


def ctx():
    global CTX
    if CTX is None:
        CTX = m3s.Context(-1)
    return CTX


def cfg_of(case):
    return m3s.layer_config(case.hq, case.hkv, case.K, case.init, case.local, case.scale)


def run_topk(case):
    ctx().index_topk(cfg_of(case), case.batch(m3s), case.iq, case.index_cache, case.topk,
                     act_dtype=case.act, index_dtype=case.idxdt)
    return np.array(case.topk)


def run_attention(case, topk, lse=True):
    ctx().sparse_attention(cfg_of(case), case.batch(m3s), case.q, case.kv_cache, topk, case.out,
                           case.lse if lse else None, case.scales(), **case.kw())
    return case.out_f64(), np.array(case.lse, dtype=np.float64)


TOPK_CASES = {
    # M3 TP8 (8/1, K 16): ragged mixed batch, query_start_loc[0] != 0, a padded
    # request, a prefill whose rows cross block boundaries, nb > K
    "tp8_ragged_mixed": dict(hq=8, hkv=1, topk=16, init=0, local=1,
                             reqs=[(3, 2500), (0, 0), (1, 130), (45, 2300)], qsl_base=5),
    # run-time K 4 with an init block; head-major top-k buffer; e4m3 index cache
    "k4_init1_headmajor_topk_e4m3_index": dict(hq=4, hkv=2, topk=4, init=1, local=1,
                                               reqs=[(20, 900), (1, 700), (5, 5)],
                                               topk_head_major=True, idx="e4m3"),
    # M3 TP2 (32/2): uniform speculative decode (q_len 3) with a padded request
    "tp2_uniform_spec_decode": dict(hq=32, hkv=2, topk=16, init=0, local=1,
                                    reqs=[(3, 2051), (3, 0), (3, 300), (3, 3)], uniform=True),
    # index keys all equal: every block ties, the lower ids win
    "ties_lower_block_wins": dict(hq=4, hkv=1, topk=5, init=0, local=2,
                                  reqs=[(2, 1500), (1, 129)], tie_keys=True),
    # same table for both caches, f16 activations
    "f16_shared_tables": dict(hq=16, hkv=1, topk=16, init=0, local=1,
                              reqs=[(1, 2200), (7, 2500)], act="f16", same_tables=True),
}


@pytest.mark.parametrize("name", sorted(TOPK_CASES))
def test_index_topk_exact_vs_reference(name):
    case = Case(seed=zlib.crc32(name.encode()) % 1000, **TOPK_CASES[name])
    got = run_topk(case)
    want = ref_topk(case)
    bad = np.argwhere(got != want)
    assert bad.size == 0, "first mismatch at %s: got %s want %s" % (
        bad[0], got[tuple(bad[0][:2])], want[tuple(bad[0][:2])])


def test_topk_ties_select_forced_then_lowest_ids():
    case = Case(hq=4, hkv=1, topk=5, init=0, local=2, reqs=[(1, 1500)], tie_keys=True)
    case.iq[...] = bf16_bits(np.full(case.iq.shape, 0.5))
    case.iq_val[...] = 0.5
    got = run_topk(case)
    nb = 1499 // 128 + 1   # 12 blocks, local 2 -> blocks 10, 11 forced, then 0, 1, 2
    assert got[0, 0].tolist() == [0, 1, 2, nb - 2, nb - 1]


ATTN_CASES = {
    "tp8_head_major_bf16": dict(hq=8, hkv=1, topk=16, init=0, local=1,
                                reqs=[(1, 2600), (0, 0), (30, 2200)], qsl_base=2),
    "tp2_token_major_spec_decode": dict(hq=32, hkv=2, topk=16, init=0, local=1,
                                        reqs=[(2, 2100), (2, 0), (2, 129)], uniform=True,
                                        token_major=True),
    "f16_act_f16_cache": dict(hq=16, hkv=1, topk=16, init=0, local=1,
                              reqs=[(1, 2300), (12, 1000)], act="f16", kv="f16"),
    "e4m3_scalar_scales_token_major": dict(hq=8, hkv=2, topk=8, init=0, local=1,
                                           reqs=[(1, 1200), (9, 1500)], kv="e4m3",
                                           scale_mode=1, token_major=True),
    "e5m2_per_slot_scales": dict(hq=8, hkv=2, topk=8, init=1, local=1,
                                 reqs=[(2, 1100), (4, 900)], kv="e5m2", scale_mode=2),
    "nb_le_K_dense_causal": dict(hq=16, hkv=1, topk=16, init=0, local=1,
                                 reqs=[(1, 1), (1, 2048), (40, 300)]),
}


@pytest.mark.parametrize("name", sorted(ATTN_CASES))
def test_sparse_attention_vs_reference(name):
    case = Case(seed=zlib.crc32(name.encode()) % 1000, **ATTN_CASES[name])
    tk = ref_topk(case)
    out, lse = run_attention(case, tk)
    ref_out, ref_lse = ref_attention(case, tk)
    check_attention(case, out, lse, ref_out, ref_lse)


def test_attention_topk_row_forms():
    """-1 holes are skipped, id order does not matter, all -1 gives 0 / -inf."""
    case = Case(hq=8, hkv=1, topk=16, init=0, local=1, reqs=[(1, 3000), (1, 2600)], seed=3)
    tk = ref_topk(case)
    holes = tk.copy()
    holes[:, :, 1::3] = -1
    out, lse = run_attention(case, holes)
    check_attention(case, out, lse, *ref_attention(case, holes))
    rev = tk[:, :, ::-1].copy()
    out2, lse2 = run_attention(case, rev)
    check_attention(case, out2, lse2, *ref_attention(case, tk))
    none = np.full_like(tk, -1)
    out3, lse3 = run_attention(case, none)
    assert (out3 == 0).all() and np.isneginf(lse3).all()


def test_lse_optional_gives_same_bits():
    case = Case(hq=16, hkv=1, topk=16, init=0, local=1, reqs=[(1, 2800), (9, 2000)], seed=4)
    tk = ref_topk(case)
    run_attention(case, tk, lse=True)
    first = case.out.copy()
    case.out[...] = 0xFFFF
    run_attention(case, tk, lse=False)
    assert np.array_equal(first, case.out)


def test_step_forward_equals_reference_and_separate_calls():
    # decode-first step: two speculative decodes (q_len 2), then a chunked
    # prefill, a padded request (no rows) and a fresh prompt; main cache
    # token-major
    reqs = [(2, 2300), (2, 140), (37, 2600), (0, 0), (5, 5)]
    qlens = [q for q, _ in reqs]
    case = Case(hq=16, hkv=1, topk=16, init=0, local=1, seed=11, token_major=True, reqs=reqs)
    c = ctx()
    cfg = cfg_of(case)
    plan = c.plan_step(cfg, qlens, case.seq_lens, num_spec_tokens=1)
    assert (plan.num_decodes, plan.decode_q_len, plan.num_decode_tokens) == (2, 2, 4)
    assert plan.num_prefills == 3 and plan.num_tokens == case.T
    step = m3s.make_step(plan, case.qsl, case.seq_lens, case.block_table,
                         case.index_block_table)
    c.step_forward(cfg, step, case.q, case.iq, case.kv_cache, case.index_cache, case.topk,
                   case.out, case.lse, act_dtype="bf16", kv_dtype="bf16", index_dtype="bf16")
    tk = np.array(case.topk)
    assert np.array_equal(tk, ref_topk(case))
    out, lse = case.out_f64(), np.array(case.lse, dtype=np.float64)
    check_attention(case, out, lse, *ref_attention(case, tk))
    # the same through the parts, bit for bit
    out_bits = case.out.copy()
    tk2 = np.full_like(tk, 77)
    out2 = case.new_out()
    lse2 = np.zeros_like(case.lse)
    for part, rows in ((step.decode, slice(0, 4)), (step.prefill, slice(4, case.T))):
        c.index_topk(cfg, part, case.iq[rows], case.index_cache, tk2[rows], act_dtype="bf16",
                     index_dtype="bf16")
        c.sparse_attention(cfg, part, case.q[rows], case.kv_cache, tk2[rows], out2[rows],
                           lse2[rows], act_dtype="bf16", kv_dtype="bf16")
    assert np.array_equal(tk2, tk)
    assert np.array_equal(out2, out_bits)
    assert np.array_equal(lse2.view(np.uint32), case.lse.view(np.uint32))


@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize("slot_dtype", [np.int64, np.int32])
def test_cache_insert_bf16(token_major, slot_dtype):
    rng = np.random.default_rng(5)
    P, hkv, T = 5, 2, 37
    phys = (rng.integers(0, 1 << 16, size=(P, 128, hkv, 256) if token_major
                         else (P, hkv, 128, 256), dtype=np.uint16))
    before = phys.copy()
    kv = phys.transpose(0, 2, 1, 3) if token_major else phys
    k = bf16_bits(rng.standard_normal((T, hkv, 128)) * 3)
    v = bf16_bits(rng.standard_normal((T, hkv, 128)) * 3)
    slots = np.array([-1 if i % 5 == 3 else (i * 977) % (P * 128) for i in range(T)],
                     dtype=slot_dtype)
    ctx().cache_insert(k, v, slots, kv, act_dtype="bf16", kv_dtype="bf16")
    expect = before.transpose(0, 2, 1, 3).copy() if token_major else before.copy()
    for i, s in enumerate(slots):
        if s >= 0:
            expect[s // 128, :, s % 128, :128] = k[i]
            expect[s // 128, :, s % 128, 128:] = v[i]
    assert np.array_equal(np.asarray(kv), expect)


@pytest.mark.parametrize("kind", ["e4m3", "e5m2"])
def test_cache_insert_fp8_scaled(kind):
    rng = np.random.default_rng(6)
    P, hkv, T = 3, 1, 20
    kv = np.zeros((P, hkv, 128, 256), dtype=np.uint8)
    kval = rng.standard_normal((T, hkv, 128)) * 4
    kval[0, 0, :4] = [1e6, -1e6, 0.0, -0.0]      # saturation and signed zero
    vval = rng.standard_normal((T, hkv, 128)) * 4
    k, v = bf16_bits(kval), bf16_bits(vval)
    slots = np.arange(T, dtype=np.int64) * 7
    ks, vs = np.array(0.5, np.float32), np.array([2.0], np.float32)
    ctx().cache_insert(k, v, slots, kv, (ks, vs), act_dtype="bf16", kv_dtype=kind)
    kd = bf16_to_f32(k).astype(np.float64)
    vd = bf16_to_f32(v).astype(np.float64)
    for i, s in enumerate(slots):
        assert np.array_equal(kv[s // 128, :, s % 128, :128], fp8_bits(kd[i] / 0.5, kind))
        assert np.array_equal(kv[s // 128, :, s % 128, 128:], fp8_bits(vd[i] / 2.0, kind))
    maxv = 448.0 if kind == "e4m3" else 57344.0
    assert fp8_table(kind)[kv[0, 0, 0, 0]] == maxv
    assert fp8_table(kind)[kv[0, 0, 0, 1]] == -maxv
    # float scales work too (a CPU scalar made by the binding)
    kv2 = np.zeros_like(kv)
    ctx().cache_insert(k, v, slots, kv2, (0.5, 2.0), act_dtype="bf16", kv_dtype=kind)
    assert np.array_equal(kv, kv2)


@pytest.mark.parametrize("idx", ["bf16", "e4m3"])
def test_index_cache_insert(idx):
    rng = np.random.default_rng(7)
    P, T = 4, 50
    ic = np.full((P, 128, 128), 0x55, dtype=np.uint16 if idx == "bf16" else np.uint8)
    before = ic.copy()
    val = rng.standard_normal((T, 128)) * 100
    ik = bf16_bits(val)
    slots = np.array([(i * 131) % (P * 128) if i % 7 else -1 for i in range(T)], dtype=np.int32)
    ctx().index_cache_insert(ik, slots, ic, act_dtype="bf16", index_dtype=idx)
    for i, s in enumerate(slots):
        if s >= 0:
            want = ik[i] if idx == "bf16" else fp8_bits(bf16_to_f32(ik[i]), "e4m3")
            before[s // 128, s % 128] = want
    assert np.array_equal(ic, before)


def test_insert_then_topk_and_attention_through_the_caches():
    """Keys written by the inserts are the keys the indexer and attention read."""
    rng = np.random.default_rng(8)
    case = Case(hq=8, hkv=1, topk=4, init=0, local=1, reqs=[(1, 700)], seed=8)
    # rewrite request 0's last 64 positions through the inserts
    r, n = 0, 64
    pos = np.arange(700 - n, 700)
    slots = (case.block_table[r, pos // 128].astype(np.int64) * 128 + pos % 128)
    islots = (case.index_block_table[r, pos // 128].astype(np.int64) * 128 + pos % 128)
    ikv = rng.integers(-4, 5, size=(n, 128)) / 4.0
    kvv = rng.standard_normal((n, 1, 256))
    ctx().index_cache_insert(bf16_bits(ikv), islots, case.index_cache, act_dtype="bf16",
                             index_dtype="bf16")
    ctx().cache_insert(bf16_bits(kvv[..., :128]), bf16_bits(kvv[..., 128:]), slots,
                       case.kv_cache, act_dtype="bf16", kv_dtype="bf16")
    case.ik_log[0][pos] = ikv
    case.kv_log[0][pos] = bf16_to_f32(bf16_bits(kvv)).astype(np.float64)
    tk = run_topk(case)
    assert np.array_equal(tk, ref_topk(case))
    out, lse = run_attention(case, tk)
    check_attention(case, out, lse, *ref_attention(case, tk))


def test_k2q_schedule_equals_attention():
    case = Case(hq=8, hkv=2, topk=4, init=0, local=1, seed=9,
                reqs=[(20, 700), (0, 0), (9, 300)])
    c = ctx()
    cfg = cfg_of(case)
    b = case.batch(m3s)
    tk = ref_topk(case)
    T, hkv, hq, K = case.T, case.hkv, case.hq, case.K
    rows = c.k2q_csr_rows(b)
    assert rows == 6 + 0 + 3
    row_ptr = np.zeros((hkv, rows + 1), np.int32)
    qi = np.full((hkv, T * K), -5, np.int32)
    qs = np.full((hkv, T * K), -5, np.int32)
    qc = np.zeros((T, hkv), np.int32)
    c.build_k2q_csr(cfg, b, tk, row_ptr, qi, qs, qc)
    # CSR structure from the top-k rows
    valid = (tk >= 0).sum(axis=2)
    assert np.array_equal(qc, valid)
    base = [0, 6, 6]
    for g in range(hkv):
        assert row_ptr[g, 0] == 0 and (np.diff(row_ptr[g]) >= 0).all()
        for t in range(T):
            r = case.row_req[t]
            for slot, blk in enumerate(x for x in tk[t, g] if x >= 0):
                row = base[r] + blk
                seg = slice(row_ptr[g, row], row_ptr[g, row + 1])
                hit = np.nonzero(qi[g, seg] == t)[0]
                assert hit.size == 1 and qs[g, seg][hit[0]] == slot
            for row in range(rows):
                seg = qi[g, row_ptr[g, row]:row_ptr[g, row + 1]]
                assert (np.diff(seg) > 0).all()
    part_out = np.zeros((T, hq, K, 128), np.float32)
    part_lse = np.full((T, hq, K), np.nan, np.float32)
    c.k2q_attention(cfg, b, case.q, case.kv_cache, row_ptr, qi, qs, part_out, part_lse,
                    act_dtype="bf16", kv_dtype="bf16")
    out = case.new_out()
    lse = np.zeros((T, hq), np.float32)
    c.combine_partials(cfg, part_out, part_lse, qc, out, lse, act_dtype="bf16")
    check_attention(case, case.out_f64(out), lse, *ref_attention(case, tk))


def test_merge_attn_states_of_two_halves():
    case = Case(hq=8, hkv=1, topk=16, init=0, local=1, seed=10,
                reqs=[(1, 2500), (0, 0), (6, 2000)], qsl_base=1)
    tk = ref_topk(case)
    a, b = tk.copy(), tk.copy()
    a[:, :, 1::2] = -1
    b[:, :, 0::2] = -1
    outs = []
    for sel in (a, b):
        o = np.zeros((case.T, case.hq, 128), np.float32)
        lse = np.zeros((case.T, case.hq), np.float32)
        out_bf = case.new_out()
        ctx().sparse_attention(cfg_of(case), case.batch(m3s), case.q, case.kv_cache, sel,
                               out_bf, lse, act_dtype="bf16", kv_dtype="bf16")
        o[...] = bf16_to_f32(out_bf)
        outs.append((o, lse))
    out = np.zeros((case.T, case.hq, 128), np.float32)
    lse = np.zeros((case.T, case.hq), np.float32)
    ctx().merge_attn_states(outs[0][0], outs[0][1], outs[1][0], outs[1][1], out, lse)
    check_attention(case, out, lse, *ref_attention(case, tk))
    # out may alias an input
    ctx().merge_attn_states(outs[0][0], outs[0][1], outs[1][0], outs[1][1], outs[0][0])
    assert np.array_equal(outs[0][0], out)


def test_ml_dtypes_arrays_when_available():
    ml = pytest.importorskip("ml_dtypes")
    case = Case(hq=8, hkv=1, topk=16, init=0, local=1, reqs=[(3, 2300)], seed=12)
    iq = case.iq.view(ml.bfloat16)
    ic = case.index_cache.view(ml.bfloat16)
    got = np.array(case.topk)
    ctx().index_topk(cfg_of(case), case.batch(m3s), iq, ic, got)
    assert np.array_equal(got, ref_topk(case))
    assert m3s.view(np.zeros(4, ml.float8_e4m3fn)).dtype == m3s.M3S_E4M3
    assert m3s.view(np.zeros(4, ml.float8_e5m2)).dtype == m3s.M3S_E5M2


def test_rel_l2_helper():
    assert rel_l2([1.0, 0.0], [1.0, 0.0]) == 0.0
