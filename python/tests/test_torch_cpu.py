"""torch integration on CPU tensors (skipped without torch): tensor views of
torch tensors, the torch.library operators (opcheck, results against the numpy
fp64 reference and the plain-torch reference) and M3SparseLayer."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import m3sparse as m3s  # noqa: E402
from m3s_reference import Case, check_attention, ref_attention, ref_topk  # noqa: E402
from torch_helpers import TorchCase, rel_l2, torch_reference  # noqa: E402

pytestmark = pytest.mark.skipif(not m3s.HAS_TORCH,
                                reason="torch integration disabled: %r"
                                % (getattr(m3s, "TORCH_IMPORT_ERROR", None),))
ops = torch.ops.m3sparse


def test_view_of_torch_tensors():
    cases = [(torch.bfloat16, m3s.M3S_BF16), (torch.float16, m3s.M3S_F16),
             (torch.float32, m3s.M3S_F32), (torch.int32, m3s.M3S_I32),
             (torch.int64, m3s.M3S_I64), (torch.float8_e4m3fn, m3s.M3S_E4M3),
             (torch.float8_e5m2, m3s.M3S_E5M2)]
    for dt, code in cases:
        t = torch.zeros((3, 5), dtype=dt)
        v = m3s.view(t)
        assert v.dtype == code and v.device == m3s.M3S_HOST
        assert v.shape == (3, 5) and v.stride == (5, 1) and v.c.data == t.data_ptr()
    phys = torch.zeros((4, 128, 2, 256), dtype=torch.bfloat16)    # token-major
    v = m3s.view(phys.permute(0, 2, 1, 3))
    assert v.shape == (4, 2, 128, 256) and v.stride == (128 * 2 * 256, 256, 2 * 256, 1)
    sl = torch.zeros((10, 4), dtype=torch.int32)[3:]
    assert m3s.view(sl).c.data == sl.data_ptr()     # storage offset included
    u8 = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(TypeError):
        m3s.view(u8)
    assert m3s.view(u8, "e4m3").dtype == m3s.M3S_E4M3
    assert m3s.torch_ops.cache_dtype_code("fp8") == m3s.M3S_E4M3
    assert m3s.torch_ops.cache_dtype_code("fp8_e5m2") == m3s.M3S_E5M2
    assert m3s.torch_ops.cache_dtype_code("auto") == -1


def test_view_cache_of_torch_tensors():
    """view() keeps the descriptors of tensors it has seen (core._TORCH_VIEWS);
    a hit must equal a fresh build, follow every field of its key and hand out
    a copy."""
    from m3sparse import core
    t = torch.arange(24, dtype=torch.int32).reshape(4, 6)
    a, b = m3s.view(t), m3s.view(t)
    assert bytes(a.c) == bytes(b.c) and a.c is not b.c and b.obj is t
    b.c.shape[0] = 99                      # a copy: the next view is unaffected
    assert m3s.view(t).shape == (4, 6)
    assert bytes(m3s.view(t).c) == bytes(core._view_new(t, None, "t").c)
    for other in (t[1:], t.t(), t.view(6, 4), t.to(torch.int64), t[:, :3]):
        v = m3s.view(other)
        assert bytes(v.c) == bytes(core._view_new(other, None, "o").c)
        assert bytes(v.c) != bytes(a.c)
    u8 = torch.zeros(8, dtype=torch.uint8)
    assert m3s.view(u8, "e4m3").dtype == m3s.M3S_E4M3
    assert m3s.view(u8, "e5m2").dtype == m3s.M3S_E5M2   # the asked dtype is part of the key
    with pytest.raises(TypeError):
        m3s.view(u8)                       # errors are never cached
    with pytest.raises(TypeError):
        m3s.view(u8)
    core._TORCH_VIEWS.clear()
    for i in range(core._TORCH_VIEWS_MAX + 5):  # bounded
        m3s.view(torch.zeros(i + 1))
    assert len(core._TORCH_VIEWS) <= core._TORCH_VIEWS_MAX


def _case(**kw):
    base = dict(hq=16, hkv=2, topk=8, init=0, local=1, seed=31,
                reqs=[(2, 1500), (2, 0), (2, 700)], uniform=True)
    base.update(kw)
    return Case(**base)


def test_functional_ops_vs_numpy_reference():
    case = _case(token_major=True)
    tc = TorchCase(case, "cpu")
    tk = ops.index_topk(tc.iq, tc.index_cache, tc.seq_lens, tc.index_block_table, None,
                        case.q_len, 0, case.max_seq_len, case.K, case.init, case.local)
    assert tk.dtype == torch.int32 and tuple(tk.shape) == (case.T, case.hkv, case.K)
    assert np.array_equal(tk.numpy(), ref_topk(case))
    out, lse = ops.sparse_attention(tc.q, tc.kv_cache, tk, tc.seq_lens, tc.block_table, None,
                                    None, None, case.q_len, 0, case.max_seq_len, case.scale)
    check_attention(case, out.float().numpy(), lse.numpy(), *ref_attention(case, tk.numpy()))


def test_ragged_ops_vs_plain_torch_reference():
    case = Case(hq=8, hkv=1, topk=16, init=0, local=1, seed=32, qsl_base=3,
                reqs=[(1, 2400), (0, 0), (20, 2100)])
    tc = TorchCase(case, "cpu")
    tk = ops.index_topk(tc.iq, tc.index_cache, tc.seq_lens, tc.index_block_table,
                        tc.query_start_loc, 0, 0, case.max_seq_len, 16, 0, 1)
    out, lse = ops.sparse_attention(tc.q, tc.kv_cache, tk, tc.seq_lens, tc.block_table,
                                    tc.query_start_loc, None, None, 0, 0, case.max_seq_len)
    sel, rout, rlse = torch_reference(tc.q, tc.iq, tc.kv_cache, tc.index_cache,
                                      case.block_table, case.index_block_table,
                                      case.seq_lens.tolist(), tc.rows(), case.hkv, case.K,
                                      case.init, case.local, case.scale)
    assert torch.equal(tk, sel)
    assert rel_l2(out, rout) < 1e-2
    fin = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (lse.double()[fin] - rlse[fin]).abs().max() < 1e-3


def test_step_forward_ops_and_out_variants_agree():
    reqs = [(1, 2300), (1, 140), (37, 2600), (5, 5)]
    case = Case(hq=8, hkv=1, topk=16, init=0, local=1, seed=33, reqs=reqs)
    tc = TorchCase(case, "cpu")
    plan = m3s.get_context(-1).plan_step(m3s.config_minimax_m3(8), [q for q, _ in reqs],
                                         case.seq_lens)
    args = (tc.q, tc.iq, tc.kv_cache, tc.index_cache, tc.query_start_loc, tc.seq_lens,
            tc.block_table, tc.index_block_table)
    out, lse, tk = ops.step_forward(*args, None, None, plan.num_decodes, plan.decode_q_len,
                                    plan.max_prefill_q_len, plan.max_seq_len, 16, 0, 1)
    assert np.array_equal(tk.numpy(), ref_topk(case))
    check_attention(case, out.float().numpy(), lse.numpy(), *ref_attention(case, tk.numpy()))
    tk2 = torch.full_like(tk, 5)
    out2, lse2 = torch.zeros_like(out), torch.zeros_like(lse)
    ops.step_forward_out(*args, tk2, out2, lse2, None, None, plan.num_decodes,
                         plan.decode_q_len, plan.max_prefill_q_len, plan.max_seq_len)
    assert torch.equal(tk, tk2) and torch.equal(out, out2) and torch.equal(lse, lse2)
    # separate out-variant ops over the whole batch (ragged), same bits
    tk3 = torch.empty_like(tk)
    ops.index_topk_out(tc.iq, tc.index_cache, tc.seq_lens, tc.index_block_table,
                       tc.query_start_loc, tk3, 0, 0, case.max_seq_len)
    out3, lse3 = torch.empty_like(out), torch.empty_like(lse)
    ops.sparse_attention_out(tc.q, tc.kv_cache, tk3, tc.seq_lens, tc.block_table,
                             tc.query_start_loc, out3, lse3, None, None, 0, 0,
                             case.max_seq_len)
    assert torch.equal(tk, tk3) and torch.equal(out, out3)


def test_insert_ops():
    P, hkv, T = 3, 2, 11
    phys = torch.zeros((P, 128, hkv, 256), dtype=torch.bfloat16)
    kv = phys.permute(0, 2, 1, 3)
    k = torch.randn((T, hkv, 128)).bfloat16()
    v = torch.randn((T, hkv, 128)).bfloat16()
    slots = torch.tensor([5, -1, 130, 300, 7, 8, -1, 9, 10, 11, 383], dtype=torch.int64)
    ops.cache_insert(k, v, slots, kv)
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(phys[s // 128, s % 128, :, :128], k[i])
            assert torch.equal(phys[s // 128, s % 128, :, 128:], v[i])
    fp8 = torch.zeros((P, hkv, 128, 256), dtype=torch.uint8)
    ks = torch.tensor(0.5)
    ops.cache_insert(k, v, slots, fp8, ks, torch.tensor([2.0]), m3s.M3S_E4M3)
    got = fp8.view(torch.float8_e4m3fn).float()[0, :, 5, :128]
    want = (k[0].float() / 0.5).to(torch.float8_e4m3fn).float()
    assert torch.equal(got, want)
    ic = torch.zeros((P, 128, 128), dtype=torch.bfloat16)
    ik = torch.randn((T, 128)).bfloat16()
    ops.index_cache_insert(ik, slots.int(), ic)
    assert torch.equal(ic[1, 2], ik[2]) and torch.equal(ic[2, 127], ik[10])


def _opcheck(op, args):
    torch.library.opcheck(op, args)


def test_opcheck_cpu():
    case = _case(reqs=[(1, 1300), (1, 0), (1, 300)])
    tc = TorchCase(case, "cpu")
    T, hkv, K = case.T, case.hkv, case.K
    msl = case.max_seq_len
    tk = ops.index_topk(tc.iq, tc.index_cache, tc.seq_lens, tc.index_block_table, None, 1, 1,
                        msl, K, 0, 1)
    _opcheck(ops.index_topk.default, (tc.iq, tc.index_cache, tc.seq_lens,
                                      tc.index_block_table, None, 1, 1, msl, K, 0, 1))
    _opcheck(ops.index_topk_out.default, (tc.iq, tc.index_cache, tc.seq_lens,
                                          tc.index_block_table, None, torch.empty_like(tk), 1,
                                          1, msl, 0, 1))
    _opcheck(ops.sparse_attention.default, (tc.q, tc.kv_cache, tk, tc.seq_lens,
                                            tc.block_table, None, None, None, 1, 1, msl))
    _opcheck(ops.sparse_attention_out.default,
             (tc.q, tc.kv_cache, tk, tc.seq_lens, tc.block_table, None, torch.empty_like(tc.q),
              torch.empty((T, case.hq)), None, None, 1, 1, msl))
    sargs = (tc.q, tc.iq, tc.kv_cache, tc.index_cache, tc.query_start_loc, tc.seq_lens,
             tc.block_table, tc.index_block_table)
    _opcheck(ops.step_forward.default, sargs + (None, None, case.R, 1, 0, msl, K))
    _opcheck(ops.step_forward_out.default,
             sargs + (torch.empty_like(tk), torch.empty_like(tc.q), torch.empty((T, case.hq)),
                      None, None, case.R, 1, 0, msl))
    k = torch.randn((T, hkv, 128)).bfloat16()
    slots = torch.tensor([3, -1, 200], dtype=torch.int64)
    _opcheck(ops.cache_insert.default, (k, k.clone(), slots, tc.kv_cache.clone()))
    _opcheck(ops.index_cache_insert.default, (k[:, 0].contiguous(), slots,
                                              tc.index_cache.clone()))


@pytest.mark.parametrize("token_major", [False, True])
def test_layer_mixed_step_on_cpu(token_major):
    """Decode-first step (speculative decodes, a chunked prefill), inserting
    the step's own K/V and index keys, with padded rows after the step."""
    rng = np.random.default_rng(40)
    layer = m3s.M3SparseLayer(tp_size=4, num_spec_tokens=1)
    hq, hkv = 16, 1
    reqs = [(2, 1800), (2, 300), (30, 2100)]
    case = Case(hq=hq, hkv=hkv, topk=16, init=0, local=1, seed=41, reqs=reqs,
                token_major=token_major)
    tc = TorchCase(case, "cpu")
    T = case.T
    pad = 3
    # new keys for every row, at the rows' positions, inserted by the layer
    kvals = rng.standard_normal((T, hkv, 256))
    ikvals = rng.integers(-4, 5, size=(T, 128)) / 4.0
    slots, islots = np.full(T + pad, -1, np.int64), np.full(T + pad, -1, np.int64)
    for t in range(T):
        r, p = case.row_req[t], case.row_pos[t]
        slots[t] = case.block_table[r, p // 128] * 128 + p % 128
        islots[t] = case.index_block_table[r, p // 128] * 128 + p % 128
        case.kv_log[r][p] = kvals[t]
        case.ik_log[r][p] = ikvals[t]
    kv_t = torch.from_numpy(kvals).bfloat16()
    # the reference sees the bf16-rounded values the cache holds
    case.kv_log = [torch.from_numpy(x).bfloat16().double().numpy() for x in case.kv_log]
    q = torch.cat([tc.q, torch.zeros((pad, hq, 128), dtype=torch.bfloat16)])
    iq = torch.cat([tc.iq, torch.zeros((pad, hkv, 128), dtype=torch.bfloat16)])
    k = torch.cat([kv_t[..., :128], torch.zeros((pad, hkv, 128), dtype=torch.bfloat16)])
    v = torch.cat([kv_t[..., 128:], torch.zeros((pad, hkv, 128), dtype=torch.bfloat16)])
    ik = torch.cat([torch.from_numpy(ikvals).bfloat16(),
                    torch.zeros((pad, 128), dtype=torch.bfloat16)])
    meta = layer.plan(case.qsl, case.seq_lens)
    assert (meta.num_decodes, meta.decode_q_len, meta.num_tokens) == (2, 2, T)
    out, lse, tk = layer(q, iq, k, v, ik, tc.kv_cache, tc.index_cache,
                         torch.from_numpy(slots), tc.query_start_loc, tc.seq_lens,
                         tc.block_table, meta, index_slot_mapping=torch.from_numpy(islots),
                         index_block_table=tc.index_block_table)
    assert tuple(out.shape) == (T + pad, hq, 128)
    assert (out[T:] == 0).all() and torch.isneginf(lse[T:]).all() and (tk[T:] == -1).all()
    want = ref_topk(case)
    assert np.array_equal(tk[:T].numpy(), want)
    check_attention(case, out[:T].float().numpy(), lse[:T].numpy(), *ref_attention(case, want))


def test_layer_fp8_cache_uint8_storage():
    """vLLM stores fp8 caches as uint8 with kv_cache_dtype "fp8"."""
    case = Case(hq=8, hkv=1, topk=16, init=0, local=1, seed=42, kv="e4m3", scale_mode=1,
                reqs=[(1, 2200), (1, 900)], uniform=True)
    tc = TorchCase(case, "cpu")
    layer = m3s.M3SparseLayer(tp_size=8, kv_cache_dtype="fp8")
    meta = layer.plan(query_lens=[1, 1], seq_lens_cpu=case.seq_lens)
    kv_u8 = tc.kv_cache.view(torch.uint8)
    out, lse, tk = layer(tc.q, tc.iq, None, None, None, kv_u8, tc.index_cache,
                         None, tc.query_start_loc, tc.seq_lens, tc.block_table, meta,
                         index_block_table=tc.index_block_table, k_scale=tc.k_scale,
                         v_scale=tc.v_scale, insert=False)
    want = ref_topk(case)
    assert np.array_equal(tk.numpy(), want)
    check_attention(case, out.float().numpy(), lse.numpy(), *ref_attention(case, want))


def test_compile_traces_the_ops():
    case = _case()
    tc = TorchCase(case, "cpu")

    def f(iq, q):
        tk = ops.index_topk(iq, tc.index_cache, tc.seq_lens, tc.index_block_table, None,
                            case.q_len, 0, case.max_seq_len, case.K, 0, 1)
        out, lse = ops.sparse_attention(q, tc.kv_cache, tk, tc.seq_lens, tc.block_table, None,
                                        None, None, case.q_len, 0, case.max_seq_len)
        return out * 2, lse, tk

    eager = f(tc.iq, tc.q)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(tc.iq, tc.q)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_default_softmax_scale():
    assert math.isclose(m3s.M3SparseLayer(1).softmax_scale, 1 / math.sqrt(128), rel_tol=1e-6)
