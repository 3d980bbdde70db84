"""m3sparse.vllm_ops, the drop-in versions of vLLM's MiniMax-M3 ops (skipped
without torch): argument handling and layouts on the CPU backend (and on CUDA
when present), results against the numpy fp64 reference, and, on a GPU with
vLLM's ops fetched (tools/fetch-vllm-ops.sh), against vLLM's own kernels:
the selection equal as sets, the outputs within bf16 rounding."""
import os
import sys
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import m3sparse as m3s  # noqa: E402
from m3s_reference import Case, check_attention, ref_attention, ref_topk  # noqa: E402
from torch_helpers import TorchCase, rel_l2  # noqa: E402

pytestmark = pytest.mark.skipif(not m3s.HAS_TORCH,
                                reason="torch integration disabled: %r"
                                % (getattr(m3s, "TORCH_IMPORT_ERROR", None),))

from m3sparse import vllm_ops as V  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PEER_DIR = os.path.join(REPO, "bench", "peer", "_vllm")


def devices():
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def _cuda_backend_or_skip(device):
    if device != "cuda":
        return
    try:
        m3s.get_context(torch.cuda.current_device())
    except m3s.M3SError as e:
        if e.status == m3s.M3S_ERR_UNSUPPORTED:
            pytest.skip("the loaded library has no CUDA backend: %s" % e.message)
        raise


PREFILL = dict(hq=16, hkv=2, topk=8, init=0, local=1,
               reqs=[(200, 1300), (1, 900), (37, 37), (0, 0), (300, 2500)])
DECODE = dict(hq=16, hkv=2, topk=8, init=0, local=1, uniform=True,
              reqs=[(2, 1500), (2, 0), (2, 2), (2, 3000)])


def prefill_meta(case, tc):
    qlens = torch.tensor([q for q, _ in case.reqs], dtype=torch.int32)
    prefix = torch.from_numpy(case.seq_lens).to(torch.int32) - qlens
    return tc.query_start_loc, tc.seq_lens, prefix.to(tc.device), max(qlens.tolist())


def head_major(topk_tm):
    return np.ascontiguousarray(np.asarray(topk_tm).transpose(1, 0, 2))


@pytest.mark.parametrize("device", devices())
def test_prefill_ops_match_reference(device):
    _cuda_backend_or_skip(device)
    case = Case(seed=11, **PREFILL)
    tc = TorchCase(case, device)
    qsl, seq_lens, prefix, max_q = prefill_meta(case, tc)
    score = V.minimax_m3_index_score(tc.iq, tc.index_cache, tc.index_block_table, qsl, seq_lens,
                                     prefix, max_q, case.max_seq_len, case.hkv)
    assert isinstance(score, V.IndexScore)
    assert tuple(score.shape) == (case.hkv, case.T, 32)     # round_up(ceil(2500/128), 16)
    tk = V.minimax_m3_index_topk(score, qsl, prefix, max_q, case.K, case.init, case.local)
    assert tk.shape == (case.hkv, case.T, case.K) and tk.dtype == torch.int32
    assert tk.is_contiguous()                                # vLLM returns a fresh [Hkv, T, K]
    want = ref_topk(case)                                    # [T, Hkv, K]
    assert np.array_equal(tk.cpu().numpy(), head_major(want))
    out = torch.full_like(tc.q, float("nan"))
    V.minimax_m3_sparse_attn(tc.q, tc.kv_cache, tk, tc.block_table, qsl, seq_lens, prefix,
                             max_q, case.hkv, case.scale, out)
    check_attention(case, out.cpu().float().numpy(), None, *ref_attention(case, want))


@pytest.mark.parametrize("device", devices())
def test_decode_ops_write_into_vllm_buffers(device):
    _cuda_backend_or_skip(device)
    case = Case(seed=12, **DECODE)
    tc = TorchCase(case, device)
    # vLLM's persistent token-major buffer, more rows than the step; the ops
    # get its head-major transpose and must write rows [:T] only
    buf = torch.full((case.T + 3, case.hkv, case.K), 12345, dtype=torch.int32, device=device)
    tk = V.minimax_m3_index_decode(tc.iq, tc.index_cache, tc.index_block_table, tc.seq_lens,
                                   case.max_seq_len, case.K, case.init, case.local, case.hkv,
                                   case.q_len, 4, out=buf.transpose(0, 1))
    assert tk.shape == (case.hkv, case.T, case.K)
    assert tk.data_ptr() == buf.data_ptr()                   # a view into the buffer
    assert (buf[case.T:] == 12345).all()
    want = ref_topk(case)
    assert np.array_equal(buf[:case.T].cpu().numpy(), want)
    out = torch.full_like(tc.q, float("nan"))
    V.minimax_m3_sparse_attn_decode(tc.q, tc.kv_cache, tk, tc.block_table, tc.seq_lens,
                                    case.hkv, case.scale, out, case.q_len)
    check_attention(case, out.cpu().float().numpy(), None, *ref_attention(case, want))


def test_decode_ops_under_torch_compile_match_eager():
    """In eager code the ops call m3sparse's implementation directly; while
    torch.compile traces they go through torch.ops.m3sparse (the schema the
    compiler sees). Both routes must give the same selection and output."""
    case = Case(seed=13, **DECODE)
    tc = TorchCase(case, "cpu")

    def step(iq, q):
        tk = V.minimax_m3_index_decode(iq, tc.index_cache, tc.index_block_table, tc.seq_lens,
                                       case.max_seq_len, case.K, case.init, case.local,
                                       case.hkv, case.q_len, case.q_len)
        out = torch.empty_like(q)
        V.minimax_m3_sparse_attn_decode(q, tc.kv_cache, tk, tc.block_table, tc.seq_lens,
                                        case.hkv, case.scale, out, case.q_len)
        return tk, out

    counts = {}

    def counting_backend(gm, example_inputs):
        for node in gm.graph.nodes:
            if node.op == "call_function" and "m3sparse" in str(node.target):
                counts[str(node.target)] = counts.get(str(node.target), 0) + 1
        return gm.forward

    torch._dynamo.reset()
    tk_c, out_c = torch.compile(step, backend=counting_backend, fullgraph=True)(tc.iq, tc.q)
    tk_e, out_e = step(tc.iq, tc.q)
    assert any("index_topk_out" in k for k in counts), counts      # traced as the custom ops
    assert any("sparse_attention_out" in k for k in counts), counts
    assert torch.equal(tk_c, tk_e)
    assert np.array_equal(tk_e.cpu().numpy(), head_major(ref_topk(case)))
    assert torch.equal(out_c, out_e)


@pytest.mark.parametrize("device", devices())
def test_fp8_caches_with_vllm_scales(device):
    """e4m3 K/V cache with vLLM's scalar scales (shape [1]) and an e4m3 index
    cache, token-major physical layout."""
    _cuda_backend_or_skip(device)
    case = Case(seed=13, kv="e4m3", idx="e4m3", scale_mode=1, token_major=True, **PREFILL)
    tc = TorchCase(case, device)
    qsl, seq_lens, prefix, max_q = prefill_meta(case, tc)
    score = V.minimax_m3_index_score(tc.iq, tc.index_cache, tc.index_block_table, qsl, seq_lens,
                                     prefix, max_q, case.max_seq_len, case.hkv)
    tk = V.minimax_m3_index_topk(score, qsl, prefix, max_q, case.K, case.init, case.local)
    want = ref_topk(case)
    assert np.array_equal(tk.cpu().numpy(), head_major(want))
    out = torch.full_like(tc.q, float("nan"))
    V.minimax_m3_sparse_attn(tc.q, tc.kv_cache, tk, tc.block_table, qsl, seq_lens, prefix,
                             max_q, case.hkv, case.scale, out, k_scale=tc.k_scale.reshape(1),
                             v_scale=tc.v_scale.reshape(1))
    check_attention(case, out.cpu().float().numpy(), None, *ref_attention(case, want))


def test_bad_arguments_get_clear_errors():
    case = Case(seed=14, **DECODE)
    tc = TorchCase(case, "cpu")
    args = (tc.iq, tc.index_cache, tc.index_block_table, tc.seq_lens, case.max_seq_len, case.K,
            case.init, case.local)
    with pytest.raises(ValueError, match="one index head per KV head"):
        V.minimax_m3_index_decode(*args, case.hkv + 1, case.q_len, 4)
    with pytest.raises(ValueError, match="expected num_reqs"):
        V.minimax_m3_index_decode(*args, case.hkv, case.q_len + 1, 4)
    with pytest.raises(ValueError, match="decode_query_len <= max_decode_query_len"):
        V.minimax_m3_index_decode(*args, case.hkv, case.q_len, 1)
    with pytest.raises(NotImplementedError, match="score_out"):
        V.minimax_m3_index_decode(*args, case.hkv, case.q_len, 4,
                                  score_out=torch.empty(case.hkv, case.T, 32))
    bad = torch.empty((case.hkv, case.T - 1, case.K), dtype=torch.int32)
    with pytest.raises(ValueError, match="out must be int32"):
        V.minimax_m3_index_decode(*args, case.hkv, case.q_len, 4, out=bad)
    with pytest.raises(TypeError, match="fused"):
        V.minimax_m3_index_topk(torch.zeros(case.hkv, case.T, 32), tc.query_start_loc,
                                tc.seq_lens, 2, case.K, 0, 1)
    tk = torch.zeros((case.T, case.hkv, case.K), dtype=torch.int32)      # token-major: wrong
    out = torch.empty_like(tc.q)
    with pytest.raises(ValueError, match="head-major"):
        V.minimax_m3_sparse_attn_decode(tc.q, tc.kv_cache, tk, tc.block_table, tc.seq_lens,
                                        case.hkv, case.scale, out, case.q_len)
    # the library's own validation still runs behind the wrappers
    tk = torch.zeros((case.hkv, case.T, case.K), dtype=torch.int32)
    with pytest.raises(m3s.M3SError):
        V.minimax_m3_sparse_attn_decode(tc.q, tc.kv_cache, tk, tc.block_table, tc.seq_lens,
                                        case.hkv, -1.0, out, case.q_len)


# ---------------------------------------------------------------------------
# against vLLM's own kernels (GPU, vLLM's ops fetched)
# ---------------------------------------------------------------------------
def _vllm_ops():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not os.path.isdir(os.path.join(PEER_DIR, "vllm_m3_ops")):
        pytest.skip("vLLM's ops are not fetched (tools/fetch-vllm-ops.sh)")
    pytest.importorskip("triton")
    if PEER_DIR not in sys.path:
        sys.path.insert(0, PEER_DIR)
    import vllm_m3_ops
    return vllm_m3_ops


def _exact_block_scores(case, t):
    """fp64 block scores S [nb, Hkv] of row t (exact: the Case's index keys and
    queries are grid values whose dot products are exact in fp32 too)."""
    r = int(case.row_req[t])
    pos = int(case.row_pos[t])
    nb = pos // 128 + 1
    dots = case.ik_log[r][:pos + 1] @ case.iq_val[t].T                  # [L, Hkv]
    pad = np.full((nb * 128, case.hkv), -np.inf)
    pad[:pos + 1] = dots
    return pad.reshape(nb, 128, case.hkv).max(axis=1)


def _compare_selections(case, ours, theirs):
    """Both [Hkv, T, K]. Returns (fraction of equal sets, number of (head,
    row) pairs whose sets differ by more than tied blocks: the multiset of
    exact scores selected must be the same)."""
    ours, theirs = ours.cpu().numpy(), theirs.cpu().numpy()
    same = wrong = pairs = 0
    for t in range(case.T):
        if case.row_req[t] < 0:
            continue
        S = _exact_block_scores(case, t)
        for g in range(case.hkv):
            pairs += 1
            a, b = ours[g, t], theirs[g, t]
            a, b = a[a >= 0], b[b >= 0]
            if set(a.tolist()) == set(b.tolist()):
                same += 1
            elif len(a) != len(b) or not np.array_equal(np.sort(S[a, g]), np.sort(S[b, g])):
                wrong += 1
    return same / max(1, pairs), wrong


@pytest.mark.parametrize("kind", ["prefill", "decode"])
def test_against_vllm_kernels(kind):
    peer = _vllm_ops()
    _cuda_backend_or_skip("cuda")
    spec = dict(PREFILL) if kind == "prefill" else dict(DECODE)
    spec.update(hq=64, hkv=4, topk=16)
    spec["reqs"] = [(q, s) for q, s in spec["reqs"] if s > 0]   # vLLM: no padded prefill rows
    case = Case(seed=zlib.crc32(kind.encode()) % 1000, **spec)
    tc = TorchCase(case, "cuda")
    out_m, out_v = torch.empty_like(tc.q), torch.empty_like(tc.q)
    if kind == "prefill":
        qsl, seq_lens, prefix, max_q = prefill_meta(case, tc)
        args = (tc.iq, tc.index_cache, tc.index_block_table, qsl, seq_lens, prefix, max_q,
                case.max_seq_len, case.hkv)
        rest = (qsl, prefix, max_q, case.K, case.init, case.local)
        tk_m = V.minimax_m3_index_topk(V.minimax_m3_index_score(*args), *rest)
        tk_v = peer.minimax_m3_index_topk(peer.minimax_m3_index_score(*args), *rest)
        for f, out in ((V.minimax_m3_sparse_attn, out_m), (peer.minimax_m3_sparse_attn, out_v)):
            f(tc.q, tc.kv_cache, tk_m, tc.block_table, qsl, seq_lens, prefix, max_q, case.hkv,
              case.scale, out)
    else:
        args = (tc.iq, tc.index_cache, tc.index_block_table, tc.seq_lens, case.max_seq_len,
                case.K, case.init, case.local, case.hkv, case.q_len, case.q_len)
        tk_m = V.minimax_m3_index_decode(*args)
        tk_v = peer.minimax_m3_index_decode(*args)
        for f, out in ((V.minimax_m3_sparse_attn_decode, out_m),
                       (peer.minimax_m3_sparse_attn_decode, out_v)):
            f(tc.q, tc.kv_cache, tk_m, tc.block_table, tc.seq_lens, case.hkv, case.scale, out,
              case.q_len)
    torch.cuda.synchronize()
    assert np.array_equal(tk_m.cpu().numpy(), head_major(ref_topk(case)))
    # equal as sets, except where vLLM broke an exact tie its own way (it
    # orders by score, the lower id is not preferred): the selected scores agree
    agree, wrong = _compare_selections(case, tk_m, tk_v)
    assert wrong == 0, "%d (head, row) selections of vLLM differ beyond ties" % wrong
    print("vLLM %s: %.4f of the selections equal as sets, the rest exact ties" % (kind, agree))
    # both attentions on the same selection: within bf16 rounding of each other, per row too
    assert rel_l2(out_m, out_v) < 1e-2
    row_err = ((out_m.double() - out_v.double()).norm(dim=-1) /
               out_v.double().norm(dim=-1).clamp_min(1e-30))
    assert float(row_err.max()) < 2e-2
