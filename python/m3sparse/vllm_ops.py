"""Drop-in replacements for vLLM's MiniMax-M3 sparse-layer ops
(``vllm.models.minimax_m3.common.ops``, vLLM 0.33.0), implemented on m3sparse.

The five functions below have the names, signatures and argument conventions
of vLLM's Triton ops, so a vLLM user swaps them in with one patch (see
docs/integration.md, "Swapping vLLM's ops"):

    minimax_m3_index_score        minimax_m3_index_topk       (prefill indexer)
    minimax_m3_index_decode                                   (decode indexer)
    minimax_m3_sparse_attn        minimax_m3_sparse_attn_decode

Conventions kept from vLLM: top-k buffers are head-major ``[Hkv, T, K]`` int32
(``out=`` may be a transposed view of vLLM's token-major buffer and receives
``out[:, :T, :]``); prefill metadata is ``cu_seqlens_q`` / ``seq_lens`` /
``prefix_lens`` (``seq_lens[r] == prefix_lens[r] + q_len[r]``, as vLLM's
metadata always has it: m3sparse takes positions from ``seq_lens``); decode
batches are ``decode_query_len`` rows per request; fp8 K/V caches come as
``torch.float8_e4m3fn`` / ``float8_e5m2`` tensors with ``k_scale`` /
``v_scale`` (scalar or ``[Hkv, num_blocks * 128]``); the index cache is bf16 or
``float8_e4m3fn``.

Where m3sparse differs, on purpose:
- The selection is m3sparse's exact one (SPEC section 3: the reference fp32
  scores, the lower block id wins a tie), its ids in ascending order then -1;
  vLLM's rows are ordered by score. As sets they agree except on near-ties.
- The indexer is one fused operation (scores never go through memory), so
  ``minimax_m3_index_score`` returns an ``IndexScore``: a record of its
  arguments with the shape vLLM's score tensor would have, which
  ``minimax_m3_index_topk`` consumes. It holds no score values; code that
  reads vLLM's scores directly (or passes ``score_out=`` to the decode
  indexer) is not supported and gets a clear error.
- The attention ops take no ``max_seq_len``; m3sparse needs a host upper bound
  of the sequence lengths and uses ``block_table.shape[1] * 128``.
All five run on CUDA tensors (the CUDA backend) and CPU tensors (the reference
backend), on torch's current stream, allocation-free apart from torch's caching
allocator, and capturable in CUDA graphs (decode).
"""

import torch

from . import torch_ops  # noqa: F401  (registers torch.ops.m3sparse.*)

__all__ = [
    "IndexScore",
    "minimax_m3_index_score",
    "minimax_m3_index_topk",
    "minimax_m3_index_decode",
    "minimax_m3_sparse_attn",
    "minimax_m3_sparse_attn_decode",
]

SPARSE_BLOCK_SIZE = 128

_ops = torch.ops.m3sparse


# The functions below run no differentiable torch operation (the library
# writes their outputs), so they take no no_grad context: its enter / exit
# cost ~4 us of host time per call on a 2-core development machine, and an eager
# prefill top-k of a few thousand tokens is host-bound (docs/perf-notes.md,
# session 12).


def _run(op, impl, *args):
    """``op`` (a ``torch.ops.m3sparse`` operator) while torch.compile traces
    (its schema is what the compiler sees); in eager code ``impl``, the
    operator's implementation, with the default dtype code: the custom op's
    dispatcher hops (autograd, ADInplaceOrView, a dynamo-disable wrapper) cost
    ~17 us of host time per call, and an eager prefill top-k of a few
    thousand tokens is host-bound on an H200 (docs/perf-notes.md, session
    11)."""
    if torch.compiler.is_compiling():
        op(*args)
    else:
        impl(*args, -1)


def _cdiv(a, b):
    return (a + b - 1) // b


def _check_heads(fn, idx_q, num_kv_heads):
    if idx_q.dim() != 3:
        raise ValueError("%s: idx_q must be [total_q, num_idx_heads, 128], got shape %s"
                         % (fn, tuple(idx_q.shape)))
    if idx_q.shape[1] != num_kv_heads:
        raise ValueError("%s: M3 has one index head per KV head: idx_q has %d heads, "
                         "num_kv_heads = %d" % (fn, idx_q.shape[1], num_kv_heads))


def _topk_out(fn, out, num_kv_heads, total_q, topk, device):
    """The head-major [Hkv, total_q, K] result and its token-major view."""
    if out is None:
        res = torch.empty((num_kv_heads, total_q, topk), dtype=torch.int32, device=device)
    else:
        if (out.dim() != 3 or out.shape[0] != num_kv_heads or out.shape[1] < total_q
                or out.shape[2] != topk or out.dtype != torch.int32):
            raise ValueError("%s: out must be int32 [%d, >= %d, %d], got %s %s"
                             % (fn, num_kv_heads, total_q, topk, out.dtype, tuple(out.shape)))
        res = out[:, :total_q, :]
    return res, res.transpose(0, 1)


class IndexScore:
    """What ``minimax_m3_index_score`` returns: its arguments, for
    ``minimax_m3_index_topk``, which runs m3sparse's fused score + exact
    selection. ``shape`` and ``device`` are those of vLLM's score tensor
    ``[num_kv_heads, total_q, round_up(max_block, 16)]``; there are no score
    values to read."""

    __slots__ = ("idx_q", "index_kv_cache", "block_table", "cu_seqlens_q", "seq_lens",
                 "max_query_len", "max_seq_len", "shape")

    def __init__(self, idx_q, index_kv_cache, block_table, cu_seqlens_q, seq_lens,
                 max_query_len, max_seq_len, num_kv_heads):
        self.idx_q = idx_q
        self.index_kv_cache = index_kv_cache
        self.block_table = block_table
        self.cu_seqlens_q = cu_seqlens_q
        self.seq_lens = seq_lens
        self.max_query_len = int(max_query_len)
        self.max_seq_len = int(max_seq_len)
        max_block = _cdiv(self.max_seq_len, SPARSE_BLOCK_SIZE)
        self.shape = torch.Size((num_kv_heads, idx_q.shape[0], _cdiv(max_block, 16) * 16))

    @property
    def device(self):
        return self.idx_q.device

    def __repr__(self):
        return "IndexScore(shape=%s, max_seq_len=%d)" % (tuple(self.shape), self.max_seq_len)


def minimax_m3_index_score(idx_q, index_kv_cache, block_table, cu_seqlens_q, seq_lens,
                           prefix_lens, max_query_len, max_seq_len, num_kv_heads):
    """Prefill indexer, first half: records the arguments (see ``IndexScore``).

    idx_q [total_q, Hkv, 128] bf16/f16; index_kv_cache [num_blocks, 128, 128]
    bf16 or float8_e4m3fn; block_table [batch, max_blocks] int32; cu_seqlens_q
    [batch + 1] int32 (first entry 0); seq_lens, prefix_lens [batch] int32 with
    seq_lens == prefix_lens + query lengths. Nothing runs until
    ``minimax_m3_index_topk``."""
    _check_heads("minimax_m3_index_score", idx_q, num_kv_heads)
    del prefix_lens  # positions come from seq_lens (== prefix_lens + q_len)
    return IndexScore(idx_q, index_kv_cache, block_table, cu_seqlens_q, seq_lens,
                      max_query_len, max_seq_len, num_kv_heads)


def minimax_m3_index_topk(score, cu_seqlens_q, prefix_lens, max_query_len, topk,
                          init_blocks, local_blocks, out=None):
    """Prefill indexer, second half: the top-``topk`` blocks per (token, KV
    head) as head-major [Hkv, total_q, topk] int32 (ids ascending, then -1),
    written into ``out[:, :total_q, :]`` when ``out`` is given."""
    if not isinstance(score, IndexScore):
        raise TypeError("minimax_m3_index_topk: score must come from m3sparse's "
                        "minimax_m3_index_score (got %s): m3sparse scores and selects in one "
                        "fused operation" % type(score).__name__)
    del prefix_lens  # as recorded by minimax_m3_index_score
    s = score
    hkv, total_q = int(s.shape[0]), int(s.shape[1])
    res, tm = _topk_out("minimax_m3_index_topk", out, hkv, total_q, int(topk), s.idx_q.device)
    if total_q:
        _run(_ops.index_topk_out, torch_ops._index_topk_impl, s.idx_q, s.index_kv_cache,
             s.seq_lens, s.block_table, cu_seqlens_q, tm, 0, int(max_query_len), s.max_seq_len,
             int(init_blocks), int(local_blocks))
    return res


def minimax_m3_index_decode(idx_q, index_kv_cache, block_table, seq_lens, max_seq_len, topk,
                            init_blocks, local_blocks, num_kv_heads, decode_query_len,
                            max_decode_query_len, out=None, score_out=None):
    """Decode indexer (score + top-k, CUDA-graph safe): idx_q [num_reqs *
    decode_query_len, Hkv, 128]; token i of request r sits at position
    seq_lens[r] - decode_query_len + i; seq_lens[r] == 0 marks a padded request
    (its rows are all -1). Returns head-major [Hkv, total_q, topk] int32."""
    fn = "minimax_m3_index_decode"
    _check_heads(fn, idx_q, num_kv_heads)
    if score_out is not None:
        raise NotImplementedError("%s: score_out is not supported: m3sparse never writes "
                                  "block scores to memory (fused score + exact selection)" % fn)
    if not 0 < decode_query_len <= max_decode_query_len:
        raise ValueError("%s: need 0 < decode_query_len <= max_decode_query_len, got %d and %d"
                         % (fn, decode_query_len, max_decode_query_len))
    total_q = int(idx_q.shape[0])
    if total_q != seq_lens.shape[0] * decode_query_len:
        raise ValueError("%s: idx_q has %d rows, expected num_reqs %d x decode_query_len %d"
                         % (fn, total_q, seq_lens.shape[0], decode_query_len))
    res, tm = _topk_out(fn, out, num_kv_heads, total_q, int(topk), idx_q.device)
    if total_q:
        _run(_ops.index_topk_out, torch_ops._index_topk_impl, idx_q, index_kv_cache, seq_lens,
             block_table, None, tm, int(decode_query_len), int(decode_query_len),
             int(max_seq_len), int(init_blocks), int(local_blocks))
    return res


def _attn_checks(fn, q, kv_cache, topk_idx, num_kv_heads, output):
    if q.dim() != 3 or output.shape != q.shape:
        raise ValueError("%s: q and output must both be [total_q, num_heads, 128], got %s and %s"
                         % (fn, tuple(q.shape), tuple(output.shape)))
    if kv_cache.dim() != 4 or kv_cache.shape[1] != num_kv_heads:
        raise ValueError("%s: kv_cache must be [num_blocks, num_kv_heads=%d, 128, 256], got %s"
                         % (fn, num_kv_heads, tuple(kv_cache.shape)))
    if topk_idx.dim() != 3 or topk_idx.shape[0] != num_kv_heads or \
            topk_idx.shape[1] != q.shape[0]:
        raise ValueError("%s: topk_idx must be head-major [%d, %d, K], got %s"
                         % (fn, num_kv_heads, q.shape[0], tuple(topk_idx.shape)))


def _scale(s):
    return None if s is None else (s.reshape(()) if s.numel() == 1 else s)


def minimax_m3_sparse_attn(q, kv_cache, topk_idx, block_table, cu_seqlens_q, seq_lens,
                           prefix_lens, max_query_len, num_kv_heads, sm_scale, output,
                           k_scale=None, v_scale=None):
    """Prefill block-sparse GQA attention into ``output`` [total_q, Hq, 128]:
    q [total_q, Hq, 128]; kv_cache [num_blocks, Hkv, 128, 256] (any strides,
    innermost 1; bf16/f16 or fp8 with k_scale/v_scale); topk_idx head-major
    [Hkv, total_q, K] (the first min(K, visible blocks) entries of a row are
    read)."""
    fn = "minimax_m3_sparse_attn"
    _attn_checks(fn, q, kv_cache, topk_idx, num_kv_heads, output)
    del prefix_lens  # positions come from seq_lens (== prefix_lens + q_len)
    total_q = int(q.shape[0])
    if total_q == 0:
        return
    lse = torch.empty((total_q, q.shape[1]), dtype=torch.float32, device=q.device)
    _run(_ops.sparse_attention_out, torch_ops._attention_impl, q, kv_cache,
         topk_idx.transpose(0, 1), seq_lens, block_table, cu_seqlens_q, output, lse,
         _scale(k_scale), _scale(v_scale), 0, int(max_query_len),
         int(block_table.shape[1]) * SPARSE_BLOCK_SIZE, float(sm_scale))


def minimax_m3_sparse_attn_decode(q, kv_cache, topk_idx, block_table, seq_lens, num_kv_heads,
                                  sm_scale, output, decode_query_len, k_scale=None,
                                  v_scale=None):
    """Decode block-sparse GQA attention (CUDA-graph safe) into ``output``:
    q [num_reqs * decode_query_len, Hq, 128], the rest as
    ``minimax_m3_sparse_attn``; padded requests (seq_lens 0) give zeros."""
    fn = "minimax_m3_sparse_attn_decode"
    _attn_checks(fn, q, kv_cache, topk_idx, num_kv_heads, output)
    total_q = int(q.shape[0])
    if total_q != seq_lens.shape[0] * decode_query_len:
        raise ValueError("%s: q has %d rows, expected num_reqs %d x decode_query_len %d"
                         % (fn, total_q, seq_lens.shape[0], decode_query_len))
    if total_q == 0:
        return
    lse = torch.empty((total_q, q.shape[1]), dtype=torch.float32, device=q.device)
    _run(_ops.sparse_attention_out, torch_ops._attention_impl, q, kv_cache,
         topk_idx.transpose(0, 1), seq_lens, block_table, None, output, lse, _scale(k_scale),
         _scale(v_scale), int(decode_query_len), int(decode_query_len),
         int(block_table.shape[1]) * SPARSE_BLOCK_SIZE, float(sm_scale))
