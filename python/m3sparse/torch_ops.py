"""torch integration: the operations as ``torch.library`` custom operators
(``torch.ops.m3sparse.*``, traceable by torch.compile, capturable in CUDA
graphs) and ``M3SparseLayer``, one sparse-layer step on vLLM-shaped tensors.

Operators (all run on CPU tensors through the CPU context and on CUDA tensors
through the CUDA context of the tensors' device, on torch's current stream,
with scratch from torch's caching allocator; none synchronises):

    cache_insert(k, v, slot_mapping, kv_cache!, k_scale?, v_scale?, kv_dtype=-1)
    index_cache_insert(ik, slot_mapping, index_cache!, index_dtype=-1)
    index_topk_out(iq, index_cache, seq_lens, index_block_table, query_start_loc?,
                   topk!, uniform_q_len, max_q_len, max_seq_len, init_blocks=0,
                   local_blocks=1, index_dtype=-1)
    index_topk(...same without topk..., topk=16, ...) -> topk [T, Hkv, K] i32
    sparse_attention_out(q, kv_cache, topk, seq_lens, block_table, query_start_loc?,
                         out!, lse!, k_scale?, v_scale?, uniform_q_len, max_q_len,
                         max_seq_len, softmax_scale=0.0, kv_dtype=-1)
    sparse_attention(...same without out, lse...) -> (out, lse)
    step_forward_out(q, iq, kv_cache, index_cache, query_start_loc, seq_lens,
                     block_table, index_block_table, topk!, out!, lse!, k_scale?,
                     v_scale?, num_decodes, decode_q_len, max_prefill_q_len,
                     max_seq_len, init_blocks=0, local_blocks=1, softmax_scale=0.0,
                     kv_dtype=-1, index_dtype=-1)
    step_forward(...same without topk, out, lse..., topk=16, ...) -> (out, lse, topk)

Context parallel (SPEC section 10; one rank's calls, the all-gathers are the
caller's, e.g. torch.distributed; examples/context_parallel.py runs the chain):

    index_topk_candidates_out(iq, index_cache, seq_lens, index_block_table,
                              query_start_loc?, cand_ids!, cand_scores!, uniform_q_len,
                              max_q_len, max_seq_len, cp_size, cp_rank,
                              blocks_per_interleave=1, init_blocks=0, local_blocks=1,
                              index_dtype=-1)
    index_topk_candidates(...same without cand_ids, cand_scores..., topk=16, ...)
        -> (cand_ids [T, Hkv, K] i32, cand_scores [T, Hkv, K] f32)
    merge_topk_candidates_out(cand_ids, cand_scores, seq_lens, query_start_loc?, topk!,
                              uniform_q_len, max_q_len, max_seq_len,
                              blocks_per_interleave=1, init_blocks=0, local_blocks=1)
    merge_topk_candidates(...same without topk...) -> topk [T, Hkv, K] i32
    sparse_attention_cp_out(q, kv_cache, topk, seq_lens, block_table, query_start_loc?,
                            out!, lse!, k_scale?, v_scale?, uniform_q_len, max_q_len,
                            max_seq_len, cp_size, cp_rank, blocks_per_interleave=1,
                            softmax_scale=0.0, kv_dtype=-1)
    sparse_attention_cp(...same without out, lse...) -> (out, lse)
    merge_attn_states_n_out(outs, lses, out!, lse!?)
    merge_attn_states_n(outs, lses) -> (out, lse)

Conventions: ``uniform_q_len > 0`` is a uniform decode batch (query_start_loc
unused, may be None); 0 a ragged batch (query_start_loc required).
``max_q_len <= 0`` means "use the token count" (a valid upper bound).
``max_seq_len`` is a host upper bound of seq_lens (max_model_len for a CUDA
graph). ``softmax_scale <= 0`` means 1/sqrt(128). ``kv_dtype`` /
``index_dtype``: -1 = the tensor's own dtype, or an m3s dtype code (M3S_E4M3,
M3S_E5M2) for vLLM's uint8 fp8 caches (``cache_dtype_code("fp8")``).
step_forward: the metadata tensors describe the whole step (num_reqs =
seq_lens.shape[0], query_start_loc [num_reqs + 1]); the first num_decodes
requests are the uniform decode part (decode_q_len rows each), the rest the
prefill part, as ``m3s_plan_step`` splits them.
Context parallel: (cp_size, cp_rank, blocks_per_interleave) is the rank's
m3s_cp; its block tables list only its own blocks (column
(b // (I*cp)) * I + b % I, ``m3s_cp_local_block``), while the query rows,
seq_lens and query_start_loc are the global ones. merge_topk_candidates takes
cp_size from cand_ids.shape[0] (the gathered ranks).
"""

import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _capi as C
from . import core

__all__ = ["M3SparseLayer", "StepMeta", "kv_cache_view", "cache_dtype_code", "ops"]

_DEFAULT_SCALE = 1.0 / math.sqrt(128.0)

_CACHE_DTYPE_NAMES = {
    "auto": -1, "": -1, "bfloat16": C.M3S_BF16, "bf16": C.M3S_BF16, "float16": C.M3S_F16,
    "half": C.M3S_F16, "fp16": C.M3S_F16, "fp8": C.M3S_E4M3, "fp8_e4m3": C.M3S_E4M3,
    "e4m3": C.M3S_E4M3, "fp8_e5m2": C.M3S_E5M2, "e5m2": C.M3S_E5M2,
}


def cache_dtype_code(kv_cache_dtype):
    """vLLM's cache dtype string ("auto", "fp8", "fp8_e4m3", "fp8_e5m2",
    "bfloat16", ...) or a torch dtype -> the int code the operators take
    (-1 = the tensor's own dtype)."""
    if kv_cache_dtype is None:
        return -1
    if isinstance(kv_cache_dtype, int):
        return kv_cache_dtype
    if isinstance(kv_cache_dtype, str):
        try:
            return _CACHE_DTYPE_NAMES[kv_cache_dtype.lower()]
        except KeyError:
            raise ValueError("unsupported cache dtype %r" % (kv_cache_dtype,)) from None
    return core.dtype_code(kv_cache_dtype)


def kv_cache_view(kv_cache, layout="head_major"):
    """The logical [P, Hkv, 128, 256] view of a main cache allocated
    head-major [P, Hkv, 128, 256] (returned as is) or token-major
    [P, 128, Hkv, 256] (permuted, no copy)."""
    if layout in ("head_major", C.M3S_LAYOUT_HEAD_MAJOR):
        return kv_cache
    if layout in ("token_major", C.M3S_LAYOUT_TOKEN_MAJOR):
        return kv_cache.permute(0, 2, 1, 3)
    raise ValueError("layout must be 'head_major' or 'token_major'")


# ---------------------------------------------------------------------------
# helpers shared by the operator implementations
# ---------------------------------------------------------------------------
def _ctx(t):
    if t.device.type == "cuda":
        idx = t.device.index if t.device.index is not None else torch.cuda.current_device()
        return core.get_context(idx)
    if t.device.type == "cpu":
        return core.get_context(-1)
    raise ValueError("m3sparse: tensors on %s are not supported" % (t.device,))


class _on_device:
    """Makes the tensor's CUDA device current (the library's current-device
    rule); a no-op for CPU tensors or when it already is."""

    def __init__(self, t):
        self.t = t
        self.g = None

    def __enter__(self):
        if self.t.device.type == "cuda":
            idx = self.t.device.index
            if idx is not None and idx != torch.cuda.current_device():
                self.g = torch.cuda.device(idx)
                self.g.__enter__()
        return self

    def __exit__(self, *exc):
        if self.g is not None:
            self.g.__exit__(*exc)


def _v(t, name, code=-1):
    if code is None or code < 0:
        return core.view(t, name=name)
    return core.view(t, code, name=name)


def _scales(k_scale, v_scale):
    if k_scale is None and v_scale is None:
        return None
    return (k_scale, v_scale)


def _cfg(hq, hkv, k, init_blocks, local_blocks, softmax_scale):
    return core.layer_config(hq, hkv, k, init_blocks, local_blocks,
                             softmax_scale if softmax_scale > 0 else _DEFAULT_SCALE,
                             validate=False)


def _batch(seq_lens, block_table, index_block_table, query_start_loc, uniform_q_len,
           num_tokens, max_q_len, max_seq_len, cp=None):
    num_reqs = int(seq_lens.shape[0])
    if uniform_q_len > 0:
        max_q_len = uniform_q_len
    elif max_q_len <= 0:
        max_q_len = num_tokens
    if uniform_q_len <= 0 and query_start_loc is None and num_reqs > 0:
        raise ValueError("m3sparse: a ragged batch (uniform_q_len == 0) needs query_start_loc")
    return core.Batch(seq_lens, block_table, index_block_table,
                      query_start_loc=query_start_loc if uniform_q_len <= 0 else None,
                      uniform_q_len=max(0, int(uniform_q_len)), num_tokens=int(num_tokens),
                      max_q_len=int(max_q_len), max_seq_len=int(max_seq_len),
                      num_reqs=num_reqs, cp=cp)


def _index_topk_impl(iq, index_cache, seq_lens, index_block_table, query_start_loc, topk,
                     uniform_q_len, max_q_len, max_seq_len, init_blocks, local_blocks,
                     index_dtype):
    hkv, k = int(iq.shape[1]), int(topk.shape[2])
    cfg = _cfg(hkv, hkv, k, init_blocks, local_blocks, 1.0)
    b = _batch(seq_lens, None, index_block_table, query_start_loc, uniform_q_len,
               iq.shape[0], max_q_len, max_seq_len)
    with _on_device(iq):
        _ctx(iq).index_topk(cfg, b, _v(iq, "iq"), _v(index_cache, "index_cache", index_dtype),
                            _v(topk, "topk"))


def _attention_impl(q, kv_cache, topk, seq_lens, block_table, query_start_loc, out, lse,
                    k_scale, v_scale, uniform_q_len, max_q_len, max_seq_len, softmax_scale,
                    kv_dtype, cp=None):
    hq, hkv, k = int(q.shape[1]), int(kv_cache.shape[1]), int(topk.shape[2])
    cfg = _cfg(hq, hkv, k, 0, 0, softmax_scale)
    b = _batch(seq_lens, block_table, None, query_start_loc, uniform_q_len, q.shape[0],
               max_q_len, max_seq_len, cp)
    with _on_device(q):
        _ctx(q).sparse_attention(cfg, b, _v(q, "q"), _v(kv_cache, "kv_cache", kv_dtype),
                                 _v(topk, "topk"), _v(out, "out"), _v(lse, "lse"),
                                 _scales(k_scale, v_scale))


def _candidates_impl(iq, index_cache, seq_lens, index_block_table, query_start_loc,
                     cand_ids, cand_scores, uniform_q_len, max_q_len, max_seq_len, cp_size,
                     cp_rank, blocks_per_interleave, init_blocks, local_blocks, index_dtype):
    hkv, k = int(iq.shape[1]), int(cand_ids.shape[2])
    cfg = _cfg(hkv, hkv, k, init_blocks, local_blocks, 1.0)
    b = _batch(seq_lens, None, index_block_table, query_start_loc, uniform_q_len,
               iq.shape[0], max_q_len, max_seq_len, (cp_size, cp_rank, blocks_per_interleave))
    with _on_device(iq):
        _ctx(iq).index_topk_candidates(cfg, b, _v(iq, "iq"),
                                       _v(index_cache, "index_cache", index_dtype),
                                       _v(cand_ids, "cand_ids"), _v(cand_scores, "cand_scores"))


def _merge_candidates_impl(cand_ids, cand_scores, seq_lens, query_start_loc, topk,
                           uniform_q_len, max_q_len, max_seq_len, blocks_per_interleave,
                           init_blocks, local_blocks):
    if cand_ids.dim() != 4:
        raise ValueError("m3sparse.merge_topk_candidates: cand_ids must be [cp, T, Hkv, K], "
                         "got shape %s" % (tuple(cand_ids.shape),))
    hkv, k = int(topk.shape[1]), int(topk.shape[2])
    cfg = _cfg(hkv, hkv, k, init_blocks, local_blocks, 1.0)
    # the merge reads the batch's lengths and cp (ownership), not its block tables
    b = _batch(seq_lens, None, None, query_start_loc, uniform_q_len, topk.shape[0],
               max_q_len, max_seq_len, (int(cand_ids.shape[0]), 0, blocks_per_interleave))
    with _on_device(topk):
        _ctx(topk).merge_topk_candidates(cfg, b, _v(cand_ids, "cand_ids"),
                                         _v(cand_scores, "cand_scores"), _v(topk, "topk"))


def _merge_n_impl(outs, lses, out, lse):
    with _on_device(outs):
        _ctx(outs).merge_attn_states_n(_v(outs, "outs"), _v(lses, "lses"), _v(out, "out"),
                                       _v(lse, "lse") if lse is not None else None)


def _step_impl(q, iq, kv_cache, index_cache, query_start_loc, seq_lens, block_table,
               index_block_table, topk, out, lse, k_scale, v_scale, num_decodes,
               decode_q_len, max_prefill_q_len, max_seq_len, init_blocks, local_blocks,
               softmax_scale, kv_dtype, index_dtype):
    T = int(q.shape[0])
    num_reqs = int(seq_lens.shape[0])
    nd = int(num_decodes)
    npf = num_reqs - nd
    if nd < 0 or npf < 0:
        raise ValueError("m3sparse.step_forward: num_decodes = %d but seq_lens has %d requests"
                         % (nd, num_reqs))
    td = nd * int(decode_q_len)
    if td > T:
        raise ValueError("m3sparse.step_forward: %d decode requests x q_len %d = %d rows, but "
                         "q has %d rows" % (nd, decode_q_len, td, T))
    decode = prefill = None
    if nd:
        decode = core.Batch(seq_lens[:nd], block_table[:nd], index_block_table[:nd],
                            uniform_q_len=int(decode_q_len), num_tokens=td,
                            max_q_len=int(decode_q_len), max_seq_len=int(max_seq_len),
                            num_reqs=nd)
    if npf:
        tp = T - td
        prefill = core.Batch(seq_lens[nd:], block_table[nd:], index_block_table[nd:],
                             query_start_loc=query_start_loc[nd:],
                             num_tokens=tp,
                             max_q_len=int(max_prefill_q_len) if max_prefill_q_len > 0 else tp,
                             max_seq_len=int(max_seq_len), num_reqs=npf)
    hq, hkv, k = int(q.shape[1]), int(kv_cache.shape[1]), int(topk.shape[2])
    cfg = _cfg(hq, hkv, k, init_blocks, local_blocks, softmax_scale)
    with _on_device(q):
        _ctx(q).step_forward(cfg, core.Step(decode, prefill), _v(q, "q"), _v(iq, "iq"),
                             _v(kv_cache, "kv_cache", kv_dtype),
                             _v(index_cache, "index_cache", index_dtype), _v(topk, "topk"),
                             _v(out, "out"), _v(lse, "lse"), _scales(k_scale, v_scale))


# ---------------------------------------------------------------------------
# operator registration
# ---------------------------------------------------------------------------
def _already_registered():
    try:
        torch.ops.m3sparse.step_forward_out.default  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _register():
    custom_op = torch.library.custom_op

    @custom_op("m3sparse::cache_insert", mutates_args=("kv_cache",))
    def cache_insert(k: Tensor, v: Tensor, slot_mapping: Tensor, kv_cache: Tensor,
                     k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None,
                     kv_dtype: int = -1) -> None:
        with _on_device(k):
            _ctx(k).cache_insert(_v(k, "k"), _v(v, "v"), _v(slot_mapping, "slot_mapping"),
                                 _v(kv_cache, "kv_cache", kv_dtype), _scales(k_scale, v_scale))

    @cache_insert.register_fake
    def _(k, v, slot_mapping, kv_cache, k_scale=None, v_scale=None, kv_dtype=-1):
        return None

    @custom_op("m3sparse::index_cache_insert", mutates_args=("index_cache",))
    def index_cache_insert(ik: Tensor, slot_mapping: Tensor, index_cache: Tensor,
                           index_dtype: int = -1) -> None:
        with _on_device(ik):
            _ctx(ik).index_cache_insert(_v(ik, "ik"), _v(slot_mapping, "slot_mapping"),
                                        _v(index_cache, "index_cache", index_dtype))

    @index_cache_insert.register_fake
    def _(ik, slot_mapping, index_cache, index_dtype=-1):
        return None

    @custom_op("m3sparse::index_topk_out", mutates_args=("topk",))
    def index_topk_out(iq: Tensor, index_cache: Tensor, seq_lens: Tensor,
                       index_block_table: Tensor, query_start_loc: Optional[Tensor],
                       topk: Tensor, uniform_q_len: int, max_q_len: int, max_seq_len: int,
                       init_blocks: int = 0, local_blocks: int = 1,
                       index_dtype: int = -1) -> None:
        _index_topk_impl(iq, index_cache, seq_lens, index_block_table, query_start_loc, topk,
                         uniform_q_len, max_q_len, max_seq_len, init_blocks, local_blocks,
                         index_dtype)

    @index_topk_out.register_fake
    def _(iq, index_cache, seq_lens, index_block_table, query_start_loc, topk, uniform_q_len,
          max_q_len, max_seq_len, init_blocks=0, local_blocks=1, index_dtype=-1):
        return None

    @custom_op("m3sparse::index_topk", mutates_args=())
    def index_topk(iq: Tensor, index_cache: Tensor, seq_lens: Tensor,
                   index_block_table: Tensor, query_start_loc: Optional[Tensor],
                   uniform_q_len: int, max_q_len: int, max_seq_len: int, topk: int = 16,
                   init_blocks: int = 0, local_blocks: int = 1,
                   index_dtype: int = -1) -> Tensor:
        out = torch.empty((iq.shape[0], iq.shape[1], topk), dtype=torch.int32,
                          device=iq.device)
        _index_topk_impl(iq, index_cache, seq_lens, index_block_table, query_start_loc, out,
                         uniform_q_len, max_q_len, max_seq_len, init_blocks, local_blocks,
                         index_dtype)
        return out

    @index_topk.register_fake
    def _(iq, index_cache, seq_lens, index_block_table, query_start_loc, uniform_q_len,
          max_q_len, max_seq_len, topk=16, init_blocks=0, local_blocks=1, index_dtype=-1):
        return iq.new_empty((iq.shape[0], iq.shape[1], topk), dtype=torch.int32)

    @custom_op("m3sparse::sparse_attention_out", mutates_args=("out", "lse"))
    def sparse_attention_out(q: Tensor, kv_cache: Tensor, topk: Tensor, seq_lens: Tensor,
                             block_table: Tensor, query_start_loc: Optional[Tensor],
                             out: Tensor, lse: Tensor, k_scale: Optional[Tensor],
                             v_scale: Optional[Tensor], uniform_q_len: int, max_q_len: int,
                             max_seq_len: int, softmax_scale: float = 0.0,
                             kv_dtype: int = -1) -> None:
        _attention_impl(q, kv_cache, topk, seq_lens, block_table, query_start_loc, out, lse,
                        k_scale, v_scale, uniform_q_len, max_q_len, max_seq_len, softmax_scale,
                        kv_dtype)

    @sparse_attention_out.register_fake
    def _(q, kv_cache, topk, seq_lens, block_table, query_start_loc, out, lse, k_scale,
          v_scale, uniform_q_len, max_q_len, max_seq_len, softmax_scale=0.0, kv_dtype=-1):
        return None

    @custom_op("m3sparse::sparse_attention", mutates_args=())
    def sparse_attention(q: Tensor, kv_cache: Tensor, topk: Tensor, seq_lens: Tensor,
                         block_table: Tensor, query_start_loc: Optional[Tensor],
                         k_scale: Optional[Tensor], v_scale: Optional[Tensor],
                         uniform_q_len: int, max_q_len: int, max_seq_len: int,
                         softmax_scale: float = 0.0, kv_dtype: int = -1) -> Tuple[Tensor, Tensor]:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((q.shape[0], q.shape[1]), dtype=torch.float32, device=q.device)
        _attention_impl(q, kv_cache, topk, seq_lens, block_table, query_start_loc, out, lse,
                        k_scale, v_scale, uniform_q_len, max_q_len, max_seq_len, softmax_scale,
                        kv_dtype)
        return out, lse

    @sparse_attention.register_fake
    def _(q, kv_cache, topk, seq_lens, block_table, query_start_loc, k_scale, v_scale,
          uniform_q_len, max_q_len, max_seq_len, softmax_scale=0.0, kv_dtype=-1):
        return (q.new_empty(q.shape),
                q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32))

    @custom_op("m3sparse::step_forward_out", mutates_args=("topk", "out", "lse"))
    def step_forward_out(q: Tensor, iq: Tensor, kv_cache: Tensor, index_cache: Tensor,
                         query_start_loc: Tensor, seq_lens: Tensor, block_table: Tensor,
                         index_block_table: Tensor, topk: Tensor, out: Tensor, lse: Tensor,
                         k_scale: Optional[Tensor], v_scale: Optional[Tensor],
                         num_decodes: int, decode_q_len: int, max_prefill_q_len: int,
                         max_seq_len: int, init_blocks: int = 0, local_blocks: int = 1,
                         softmax_scale: float = 0.0, kv_dtype: int = -1,
                         index_dtype: int = -1) -> None:
        _step_impl(q, iq, kv_cache, index_cache, query_start_loc, seq_lens, block_table,
                   index_block_table, topk, out, lse, k_scale, v_scale, num_decodes,
                   decode_q_len, max_prefill_q_len, max_seq_len, init_blocks, local_blocks,
                   softmax_scale, kv_dtype, index_dtype)

    @step_forward_out.register_fake
    def _(q, iq, kv_cache, index_cache, query_start_loc, seq_lens, block_table,
          index_block_table, topk, out, lse, k_scale, v_scale, num_decodes, decode_q_len,
          max_prefill_q_len, max_seq_len, init_blocks=0, local_blocks=1, softmax_scale=0.0,
          kv_dtype=-1, index_dtype=-1):
        return None

    @custom_op("m3sparse::step_forward", mutates_args=())
    def step_forward(q: Tensor, iq: Tensor, kv_cache: Tensor, index_cache: Tensor,
                     query_start_loc: Tensor, seq_lens: Tensor, block_table: Tensor,
                     index_block_table: Tensor, k_scale: Optional[Tensor],
                     v_scale: Optional[Tensor], num_decodes: int, decode_q_len: int,
                     max_prefill_q_len: int, max_seq_len: int, topk: int = 16,
                     init_blocks: int = 0, local_blocks: int = 1, softmax_scale: float = 0.0,
                     kv_dtype: int = -1, index_dtype: int = -1) -> Tuple[Tensor, Tensor, Tensor]:
        T, hq = q.shape[0], q.shape[1]
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((T, hq), dtype=torch.float32, device=q.device)
        tk = torch.empty((T, kv_cache.shape[1], topk), dtype=torch.int32, device=q.device)
        _step_impl(q, iq, kv_cache, index_cache, query_start_loc, seq_lens, block_table,
                   index_block_table, tk, out, lse, k_scale, v_scale, num_decodes,
                   decode_q_len, max_prefill_q_len, max_seq_len, init_blocks, local_blocks,
                   softmax_scale, kv_dtype, index_dtype)
        return out, lse, tk

    @step_forward.register_fake
    def _(q, iq, kv_cache, index_cache, query_start_loc, seq_lens, block_table,
          index_block_table, k_scale, v_scale, num_decodes, decode_q_len, max_prefill_q_len,
          max_seq_len, topk=16, init_blocks=0, local_blocks=1, softmax_scale=0.0, kv_dtype=-1,
          index_dtype=-1):
        T, hq = q.shape[0], q.shape[1]
        return (q.new_empty(q.shape), q.new_empty((T, hq), dtype=torch.float32),
                q.new_empty((T, kv_cache.shape[1], topk), dtype=torch.int32))

    # -- context parallel (SPEC section 10) ---------------------------------
    @custom_op("m3sparse::index_topk_candidates_out", mutates_args=("cand_ids", "cand_scores"))
    def index_topk_candidates_out(iq: Tensor, index_cache: Tensor, seq_lens: Tensor,
                                  index_block_table: Tensor, query_start_loc: Optional[Tensor],
                                  cand_ids: Tensor, cand_scores: Tensor, uniform_q_len: int,
                                  max_q_len: int, max_seq_len: int, cp_size: int, cp_rank: int,
                                  blocks_per_interleave: int = 1, init_blocks: int = 0,
                                  local_blocks: int = 1, index_dtype: int = -1) -> None:
        """Step 1 of a context-parallel layer: this rank's top-k candidates.

        iq [T, Hkv, 128] bf16/f16 (the global rows, the same on every rank);
        index_cache [P, 128, 128] bf16/e4m3 holding the rank's pages;
        index_block_table i32 [R, cols]: the rank's own blocks only (block b at
        column (b // (I*cp)) * I + b % I); seq_lens i32 [R] and query_start_loc
        i32 [R + 1] global. Writes cand_ids [T, Hkv, K] i32 and cand_scores
        [T, Hkv, K] f32 (any strides, innermost 1: e.g. two views of one
        [T, Hkv, 2, K] buffer, so one all-gather moves both): the owned forced
        blocks (score +inf), then the rank's best owned blocks with their
        scores, then -1 / -inf."""
        _candidates_impl(iq, index_cache, seq_lens, index_block_table, query_start_loc,
                         cand_ids, cand_scores, uniform_q_len, max_q_len, max_seq_len, cp_size,
                         cp_rank, blocks_per_interleave, init_blocks, local_blocks, index_dtype)

    @index_topk_candidates_out.register_fake
    def _(iq, index_cache, seq_lens, index_block_table, query_start_loc, cand_ids, cand_scores,
          uniform_q_len, max_q_len, max_seq_len, cp_size, cp_rank, blocks_per_interleave=1,
          init_blocks=0, local_blocks=1, index_dtype=-1):
        return None

    @custom_op("m3sparse::index_topk_candidates", mutates_args=())
    def index_topk_candidates(iq: Tensor, index_cache: Tensor, seq_lens: Tensor,
                              index_block_table: Tensor, query_start_loc: Optional[Tensor],
                              uniform_q_len: int, max_q_len: int, max_seq_len: int,
                              cp_size: int, cp_rank: int, blocks_per_interleave: int = 1,
                              topk: int = 16, init_blocks: int = 0, local_blocks: int = 1,
                              index_dtype: int = -1) -> Tuple[Tensor, Tensor]:
        """index_topk_candidates_out allocating its outputs: returns
        (cand_ids [T, Hkv, topk] i32, cand_scores [T, Hkv, topk] f32)."""
        shape = (iq.shape[0], iq.shape[1], topk)
        ids = torch.empty(shape, dtype=torch.int32, device=iq.device)
        scores = torch.empty(shape, dtype=torch.float32, device=iq.device)
        _candidates_impl(iq, index_cache, seq_lens, index_block_table, query_start_loc, ids,
                         scores, uniform_q_len, max_q_len, max_seq_len, cp_size, cp_rank,
                         blocks_per_interleave, init_blocks, local_blocks, index_dtype)
        return ids, scores

    @index_topk_candidates.register_fake
    def _(iq, index_cache, seq_lens, index_block_table, query_start_loc, uniform_q_len,
          max_q_len, max_seq_len, cp_size, cp_rank, blocks_per_interleave=1, topk=16,
          init_blocks=0, local_blocks=1, index_dtype=-1):
        shape = (iq.shape[0], iq.shape[1], topk)
        return (iq.new_empty(shape, dtype=torch.int32),
                iq.new_empty(shape, dtype=torch.float32))

    @custom_op("m3sparse::merge_topk_candidates_out", mutates_args=("topk",))
    def merge_topk_candidates_out(cand_ids: Tensor, cand_scores: Tensor, seq_lens: Tensor,
                                  query_start_loc: Optional[Tensor], topk: Tensor,
                                  uniform_q_len: int, max_q_len: int, max_seq_len: int,
                                  blocks_per_interleave: int = 1, init_blocks: int = 0,
                                  local_blocks: int = 1) -> None:
        """Step 3: the global top-k from the all-gathered candidates.

        cand_ids [cp, T, Hkv, K] i32 and cand_scores [cp, T, Hkv, K] f32 (rank
        n's candidates at [n]; cp is taken from shape[0]); seq_lens,
        query_start_loc: the global batch (any rank's). Writes topk [T, Hkv, K]
        i32 exactly as index_topk writes it on the whole cache (the same bits on
        every rank)."""
        _merge_candidates_impl(cand_ids, cand_scores, seq_lens, query_start_loc, topk,
                               uniform_q_len, max_q_len, max_seq_len, blocks_per_interleave,
                               init_blocks, local_blocks)

    @merge_topk_candidates_out.register_fake
    def _(cand_ids, cand_scores, seq_lens, query_start_loc, topk, uniform_q_len, max_q_len,
          max_seq_len, blocks_per_interleave=1, init_blocks=0, local_blocks=1):
        return None

    @custom_op("m3sparse::merge_topk_candidates", mutates_args=())
    def merge_topk_candidates(cand_ids: Tensor, cand_scores: Tensor, seq_lens: Tensor,
                              query_start_loc: Optional[Tensor], uniform_q_len: int,
                              max_q_len: int, max_seq_len: int, blocks_per_interleave: int = 1,
                              init_blocks: int = 0, local_blocks: int = 1) -> Tensor:
        """merge_topk_candidates_out allocating topk [T, Hkv, K] i32 (T, Hkv, K
        from cand_ids [cp, T, Hkv, K])."""
        out = torch.empty(tuple(cand_ids.shape[1:]), dtype=torch.int32,
                          device=cand_ids.device)
        _merge_candidates_impl(cand_ids, cand_scores, seq_lens, query_start_loc, out,
                               uniform_q_len, max_q_len, max_seq_len, blocks_per_interleave,
                               init_blocks, local_blocks)
        return out

    @merge_topk_candidates.register_fake
    def _(cand_ids, cand_scores, seq_lens, query_start_loc, uniform_q_len, max_q_len,
          max_seq_len, blocks_per_interleave=1, init_blocks=0, local_blocks=1):
        return cand_ids.new_empty(tuple(cand_ids.shape[1:]), dtype=torch.int32)

    @custom_op("m3sparse::sparse_attention_cp_out", mutates_args=("out", "lse"))
    def sparse_attention_cp_out(q: Tensor, kv_cache: Tensor, topk: Tensor, seq_lens: Tensor,
                                block_table: Tensor, query_start_loc: Optional[Tensor],
                                out: Tensor, lse: Tensor, k_scale: Optional[Tensor],
                                v_scale: Optional[Tensor], uniform_q_len: int, max_q_len: int,
                                max_seq_len: int, cp_size: int, cp_rank: int,
                                blocks_per_interleave: int = 1, softmax_scale: float = 0.0,
                                kv_dtype: int = -1) -> None:
        """Step 4: this rank's partial attention over the selected blocks it owns.

        q [T, Hq, 128] bf16/f16 (global rows); kv_cache [P, Hkv, 128, 256] with
        the rank's pages; topk [T, Hkv, K] i32 (the merged, global selection);
        block_table i32 [R, cols]: the rank's blocks only. Writes out [T, Hq, 128]
        (q's dtype) and lse [T, Hq] f32: the partial over the rank's keys (a row
        owning none of its blocks: out 0, lse -inf), for merge_attn_states_n."""
        _attention_impl(q, kv_cache, topk, seq_lens, block_table, query_start_loc, out, lse,
                        k_scale, v_scale, uniform_q_len, max_q_len, max_seq_len, softmax_scale,
                        kv_dtype, (cp_size, cp_rank, blocks_per_interleave))

    @sparse_attention_cp_out.register_fake
    def _(q, kv_cache, topk, seq_lens, block_table, query_start_loc, out, lse, k_scale,
          v_scale, uniform_q_len, max_q_len, max_seq_len, cp_size, cp_rank,
          blocks_per_interleave=1, softmax_scale=0.0, kv_dtype=-1):
        return None

    @custom_op("m3sparse::sparse_attention_cp", mutates_args=())
    def sparse_attention_cp(q: Tensor, kv_cache: Tensor, topk: Tensor, seq_lens: Tensor,
                            block_table: Tensor, query_start_loc: Optional[Tensor],
                            k_scale: Optional[Tensor], v_scale: Optional[Tensor],
                            uniform_q_len: int, max_q_len: int, max_seq_len: int, cp_size: int,
                            cp_rank: int, blocks_per_interleave: int = 1,
                            softmax_scale: float = 0.0,
                            kv_dtype: int = -1) -> Tuple[Tensor, Tensor]:
        """sparse_attention_cp_out allocating (out [T, Hq, 128] q's dtype,
        lse [T, Hq] f32): the rank's partial result and its lse."""
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty((q.shape[0], q.shape[1]), dtype=torch.float32, device=q.device)
        _attention_impl(q, kv_cache, topk, seq_lens, block_table, query_start_loc, out, lse,
                        k_scale, v_scale, uniform_q_len, max_q_len, max_seq_len, softmax_scale,
                        kv_dtype, (cp_size, cp_rank, blocks_per_interleave))
        return out, lse

    @sparse_attention_cp.register_fake
    def _(q, kv_cache, topk, seq_lens, block_table, query_start_loc, k_scale, v_scale,
          uniform_q_len, max_q_len, max_seq_len, cp_size, cp_rank, blocks_per_interleave=1,
          softmax_scale=0.0, kv_dtype=-1):
        return (q.new_empty(q.shape),
                q.new_empty((q.shape[0], q.shape[1]), dtype=torch.float32))

    @custom_op("m3sparse::merge_attn_states_n_out", mutates_args=("out", "lse"))
    def merge_attn_states_n_out(outs: Tensor, lses: Tensor, out: Tensor,
                                lse: Optional[Tensor]) -> None:
        """Step 5: merge N partial attention results over disjoint key sets.

        outs [N, T, H, 128] bf16/f16/f32, lses [N, T, H] f32 (e.g. the
        all-gathered partials of the cp ranks). Writes out [T, H, 128]
        (bf16/f16/f32) and lse [T, H] f32 (or None): lse = log sum_n
        exp(lses[n]), out = sum_n exp(lses[n] - lse) outs[n], in the order
        n = 0..N-1; rows with every lses[n] = -inf get out 0, lse -inf."""
        _merge_n_impl(outs, lses, out, lse)

    @merge_attn_states_n_out.register_fake
    def _(outs, lses, out, lse):
        return None

    @custom_op("m3sparse::merge_attn_states_n", mutates_args=())
    def merge_attn_states_n(outs: Tensor, lses: Tensor) -> Tuple[Tensor, Tensor]:
        """merge_attn_states_n_out allocating (out [T, H, 128] in outs' dtype,
        lse [T, H] f32)."""
        out = torch.empty(tuple(outs.shape[1:]), dtype=outs.dtype, device=outs.device)
        lse = torch.empty(tuple(lses.shape[1:]), dtype=torch.float32, device=outs.device)
        _merge_n_impl(outs, lses, out, lse)
        return out, lse

    @merge_attn_states_n.register_fake
    def _(outs, lses):
        return (outs.new_empty(tuple(outs.shape[1:])),
                lses.new_empty(tuple(lses.shape[1:]), dtype=torch.float32))


if not _already_registered():
    _register()

#: the registered operators (torch.ops.m3sparse)
ops = torch.ops.m3sparse


# ---------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StepMeta:
    """Host facts of one forward step (from ``M3SparseLayer.plan``): the
    decode/prefill split of m3s_plan_step and the host bounds. Everything in
    it is baked into a CUDA graph; device metadata (seq_lens, block tables,
    query_start_loc, slot mappings) may change between replays."""

    num_reqs: int
    num_decodes: int
    decode_q_len: int
    num_decode_tokens: int
    num_prefill_tokens: int
    max_prefill_q_len: int
    max_seq_len: int

    @property
    def num_prefills(self):
        return self.num_reqs - self.num_decodes

    @property
    def num_tokens(self):
        return self.num_decode_tokens + self.num_prefill_tokens


def _host_list(x):
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return [int(a) for a in x.tolist()]  # host copies: vLLM's *_cpu tensors
    return [int(a) for a in x]


class M3SparseLayer:
    """One MiniMax-M3 sparse-attention layer step on vLLM-shaped tensors.

    Per step:  meta = layer.plan(query_start_loc_cpu, seq_lens_cpu)  (host)
    Per layer: out, lse, topk = layer(q, iq, k, v, ik, kv_cache, index_cache,
                                      slot_mapping, query_start_loc, seq_lens,
                                      block_table, meta)

    Tensors (T rows, decode requests first, as vLLM orders a batch):
      q [T, Hq, 128] (or [T, Hq*128]), iq [T, Hkv, 128], k, v [T, Hkv, 128],
      ik [T, 128], bf16/f16;
      kv_cache: the logical [P, Hkv, 128, 256] view (``kv_cache_view(t,
      "token_major")`` for vLLM's token-major [P, 128, Hkv, 256]);
      index_cache [P, 128, 128]; slot_mapping i64/i32 [T] (-1 = padding);
      query_start_loc i32 [>= num_reqs + 1], seq_lens i32 [>= num_reqs]
      (0 = padded request), block_table i32 [>= num_reqs, max_pages] on the
      tensors' device (the leading num_reqs rows are used).
    Rows beyond meta.num_tokens (vLLM's padding of a ragged batch) get out 0,
    lse -inf and top-k -1. The K/V and index keys of all T rows are inserted
    first (slot -1 skips), so a token sees itself.

    max_model_len: when set, every step uses it as the host bound of
    seq_lens (what a CUDA-graph capture needs); else the step's own maximum.
    """

    def __init__(self, tp_size=1, *, num_q_heads=None, num_kv_heads=None, topk=16,
                 init_blocks=0, local_blocks=1, softmax_scale=None, num_spec_tokens=0,
                 kv_cache_dtype="auto", index_cache_dtype="auto", max_model_len=None):
        if num_q_heads is None:
            cfg = core.config_minimax_m3(tp_size)
            num_q_heads, num_kv_heads = cfg.num_q_heads, cfg.num_kv_heads
        self.cfg = core.layer_config(num_q_heads, num_kv_heads, topk, init_blocks,
                                     local_blocks, softmax_scale)
        self.num_q_heads = int(num_q_heads)
        self.num_kv_heads = int(num_kv_heads)
        self.topk = int(topk)
        self.init_blocks = int(init_blocks)
        self.local_blocks = int(local_blocks)
        self.softmax_scale = float(self.cfg.softmax_scale)
        self.num_spec_tokens = int(num_spec_tokens)
        self.kv_dtype = cache_dtype_code(kv_cache_dtype)
        self.index_dtype = cache_dtype_code(index_cache_dtype)
        self.max_model_len = None if max_model_len is None else int(max_model_len)

    # -- host planning --
    def plan(self, query_start_loc_cpu=None, seq_lens_cpu=None, *, query_lens=None,
             num_reqs=None, max_seq_len=None):
        """StepMeta of a step from host data: query_start_loc_cpu [num_reqs + 1]
        (or query_lens [num_reqs]) and seq_lens_cpu [num_reqs] (lists, numpy or
        CPU tensors; 0 = padded request), split by m3s_plan_step."""
        sl = _host_list(seq_lens_cpu)
        if query_lens is None:
            qsl = _host_list(query_start_loc_cpu)
            n = len(sl) if num_reqs is None else int(num_reqs)
            ql = [qsl[i + 1] - qsl[i] for i in range(n)]
        else:
            ql = _host_list(query_lens)
            n = len(ql) if num_reqs is None else int(num_reqs)
            ql = ql[:n]
        sl = sl[:n]
        p = core.get_context(-1).plan_step(self.cfg, ql, sl, self.num_spec_tokens)
        msl = max_seq_len if max_seq_len is not None else (
            self.max_model_len if self.max_model_len is not None else p.max_seq_len)
        return StepMeta(num_reqs=n, num_decodes=p.num_decodes, decode_q_len=p.decode_q_len,
                        num_decode_tokens=p.num_decode_tokens,
                        num_prefill_tokens=p.num_prefill_tokens,
                        max_prefill_q_len=p.max_prefill_q_len, max_seq_len=int(msl))

    def decode_meta(self, num_reqs, max_seq_len=None):
        """StepMeta of a pure uniform-decode step of num_reqs (padded) requests
        with q_len 1 + num_spec_tokens, without host data: what a CUDA-graph
        capture of a decode batch size uses (max_seq_len defaults to
        max_model_len)."""
        msl = max_seq_len if max_seq_len is not None else self.max_model_len
        if msl is None:
            raise ValueError("decode_meta needs max_seq_len or the layer's max_model_len")
        q = 1 + self.num_spec_tokens
        return StepMeta(num_reqs=int(num_reqs), num_decodes=int(num_reqs), decode_q_len=q,
                        num_decode_tokens=int(num_reqs) * q, num_prefill_tokens=0,
                        max_prefill_q_len=0, max_seq_len=int(msl))

    # -- the step --
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, q, iq, k, v, ik, kv_cache, index_cache, slot_mapping, query_start_loc,
                seq_lens, block_table, meta, *, index_slot_mapping=None,
                index_block_table=None, k_scale=None, v_scale=None, out=None, lse=None,
                topk=None, insert=True):
        """Cache insert, index top-k and sparse attention of one step. Returns
        (out [T, Hq, 128], lse [T, Hq] f32, topk [T, Hkv, K] i32); out, lse and
        topk may be given (e.g. vLLM's persistent buffers; views are fine)."""
        D = C.M3S_HEAD_DIM
        if q.dim() == 2:
            q = q.view(q.shape[0], -1, D)
        if iq.dim() == 2:
            iq = iq.view(iq.shape[0], -1, D)
        if k is not None and k.dim() == 2:
            k = k.view(k.shape[0], -1, D)
        if v is not None and v.dim() == 2:
            v = v.view(v.shape[0], -1, D)
        if ik is not None and ik.dim() == 3:
            ik = ik.view(ik.shape[0], -1)
        T = q.shape[0]
        n = meta.num_tokens
        if n > T:
            raise ValueError("M3SparseLayer: the step has %d tokens but q has %d rows" % (n, T))
        if out is None:
            out = torch.empty((T, self.num_q_heads, D), dtype=q.dtype, device=q.device)
        if lse is None:
            lse = torch.empty((T, self.num_q_heads), dtype=torch.float32, device=q.device)
        if topk is None:
            topk = torch.empty((T, self.num_kv_heads, self.topk), dtype=torch.int32,
                               device=q.device)
        ibt = index_block_table if index_block_table is not None else block_table
        if insert:
            if k is not None:
                ops.cache_insert(k, v, slot_mapping[: k.shape[0]], kv_cache, k_scale, v_scale,
                                 self.kv_dtype)
            if ik is not None:
                isl = index_slot_mapping if index_slot_mapping is not None else slot_mapping
                ops.index_cache_insert(ik, isl[: ik.shape[0]], index_cache, self.index_dtype)
        R = meta.num_reqs
        if n > 0:
            ops.step_forward_out(
                q[:n], iq[:n], kv_cache, index_cache, query_start_loc[: R + 1], seq_lens[:R],
                block_table[:R], ibt[:R], topk[:n], out[:n], lse[:n], k_scale, v_scale,
                meta.num_decodes, meta.decode_q_len, meta.max_prefill_q_len, meta.max_seq_len,
                self.init_blocks, self.local_blocks, self.softmax_scale, self.kv_dtype,
                self.index_dtype)
        if n < T:
            out[n:].zero_()
            lse[n:].fill_(float("-inf"))
            topk[n:].fill_(-1)
        return out, lse, topk
