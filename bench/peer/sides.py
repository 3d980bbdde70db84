"""The two sides of the peer benchmark behind the same call sites: vLLM's
five MiniMax-M3 ops (``ops`` = vLLM's Triton module or m3sparse.vllm_ops),
called exactly as vLLM's indexer and sparse-attention layers call them. Plus
the dense baseline (torch SDPA restricted to flash / cuDNN / efficient)."""
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

DENSE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                  SDPBackend.EFFICIENT_ATTENTION]


class Side:
    def __init__(self, name, ops):
        self.name = name
        self.ops = ops

    # -- decode (CUDA-graph capturable; out= buffers at stable addresses) --
    def decode_idx(self, x, topk_buf):
        s = x.spec
        return self.ops.minimax_m3_index_decode(
            x.iq, x.index_cache, x.block_table, x.seq_lens, x.max_seq_len, s.topk, 0, 1, s.hkv,
            s.q_len, s.q_len, out=topk_buf)

    def decode_attn(self, x, topk, out):
        s = x.spec
        self.ops.minimax_m3_sparse_attn_decode(
            x.q, x.kv_cache, topk, x.block_table, x.seq_lens, s.hkv, x.softmax_scale, out,
            s.q_len, k_scale=x.k_scale, v_scale=x.v_scale)

    # -- prefill (eager) --
    def prefill_idx(self, x, topk_buf=None):
        s = x.spec
        score = self.ops.minimax_m3_index_score(
            x.iq, x.index_cache, x.block_table, x.cu_seqlens_q, x.seq_lens, x.prefix_lens,
            x.max_query_len, x.max_seq_len, s.hkv)
        return self.ops.minimax_m3_index_topk(
            score, x.cu_seqlens_q, x.prefix_lens, x.max_query_len, s.topk, 0, 1, out=topk_buf)

    def prefill_attn(self, x, topk, out):
        s = x.spec
        self.ops.minimax_m3_sparse_attn(
            x.q, x.kv_cache, topk, x.block_table, x.cu_seqlens_q, x.seq_lens, x.prefix_lens,
            x.max_query_len, s.hkv, x.softmax_scale, out, k_scale=x.k_scale, v_scale=x.v_scale)


class Dense:
    """Dense causal GQA attention over the same tokens (K/V contiguous, as a
    dense layer keeps them): one SDPA call per request, lower-right causal
    when the request has a prefix. Uses SDPA's GQA when the backends take it,
    else K/V repeated to Hq heads beforehand (outside the timing)."""

    def __init__(self, x):
        s = x.spec
        self.calls = []
        self.kernel = None
        g = s.hq // s.hkv
        for (row, n, seq) in x.rows:
            q = torch.randn((1, s.hq, n, 128), dtype=torch.bfloat16, device=x.q.device)
            k = torch.randn((1, s.hkv, seq, 128), dtype=torch.bfloat16, device=x.q.device)
            v = torch.randn_like(k)
            self.calls.append((q, k, v, n, seq, g))

    def _one(self, q, k, v, n, seq, g, gqa):
        mask = None if n == seq else causal_lower_right(n, seq)
        if not gqa:
            k = k.repeat_interleave(g, dim=1) if k.shape[1] != q.shape[1] else k
            v = v.repeat_interleave(g, dim=1) if v.shape[1] != q.shape[1] else v
        return (q, k, v, mask, gqa)

    def prepare(self):
        """Pick GQA or repeated heads once (whichever the restricted backends
        accept) and keep the prepared arguments."""
        for gqa in (True, False):
            try:
                args = [self._one(*c, gqa) for c in self.calls]
                self.args = args
                self.run()
                torch.cuda.synchronize()
                self.kernel = "sdpa(%s)" % ("gqa" if gqa else "heads repeated")
                return
            except (RuntimeError, NotImplementedError, ValueError):
                continue
        raise RuntimeError("no restricted SDPA backend accepts these shapes")

    def run(self):
        with sdpa_kernel(DENSE_BACKENDS):
            for q, k, v, mask, gqa in self.args:
                if mask is None:
                    torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, is_causal=True, enable_gqa=gqa)
                else:
                    torch.nn.functional.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask, enable_gqa=gqa)
