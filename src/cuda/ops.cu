/* The CUDA backend's operations table (src/core/backend.h): device memory,
 * so index values are guarded inside the kernels instead of validated by the
 * core; the context holds the device's properties (context.cu). */
#include "common.cuh"

/* The operations of a step run one after the other on one stream: one
 * workspace serves both. */
static size_t cuda_workspace(const m3s_context *ctx, const m3s_layer_config *cfg,
                             int64_t max_tokens, int64_t max_seq_len) {
  size_t a = m3s_cuda_topk_workspace(ctx, cfg, max_tokens, max_seq_len);
  size_t b = m3s_cuda_attention_workspace(ctx, cfg, max_tokens, max_seq_len);
  return a > b ? a : b;
}

/* What runs, as m3s_support_info.kernel reports it (at most 63 characters:
 * checked below, so that nothing is cut off). Index top-k: prefill scores
 * with TMA + wgmma on sm_90 (bf16 or e4m3 index cache), else mma.sync, then the
 * certified selection (sm90/topk_tc.cu); decode through the certified
 * streaming kernel where its rule (tc_decode_pays) sends a batch, else the
 * exact one (topk_decode.cu). Attention on sm_90: the persistent TMA kernel
 * for one query row per request (sm90/attention_tma.cu), the union kernel
 * for rows that share blocks (sm90/attention_union.cu), else the generic
 * one. */
#define M3S_CUDA_KERNEL_NAME(name, text)                                                      \
  static const char name[] = text;                                                           \
  static_assert(sizeof(name) <= sizeof(((m3s_support_info *)0)->kernel), #name " fits")
M3S_CUDA_KERNEL_NAME(k_topk_sm90, "prefill:tc_tma_wgmma|tc_mma+select;decode:tc_stream|stream");
M3S_CUDA_KERNEL_NAME(k_topk, "prefill:tc_mma+select;decode:tc_stream|stream");
M3S_CUDA_KERNEL_NAME(k_attn_sm90, "attn_tma_persistent(q_len 1)|attn_tma_union(q_len>1)|mma_splitk");
M3S_CUDA_KERNEL_NAME(k_attn, "cuda_attention_mma_sync_splitk");

static const char *cuda_kernel(const m3s_context *ctx, m3s_op op) {
  const int sm90 = m3s_cuda_sm_major(ctx) == 9;
  switch (op) {
  case M3S_OP_CACHE_INSERT: return "cuda_insert_kv_kernel";
  case M3S_OP_INDEX_INSERT: return "cuda_insert_index_kernel";
  case M3S_OP_INDEX_TOPK: return sm90 ? k_topk_sm90 : k_topk;
  case M3S_OP_ATTENTION_DECODE:
  case M3S_OP_ATTENTION_PREFILL:
  case M3S_OP_ATTENTION_CP: return sm90 ? k_attn_sm90 : k_attn;
  case M3S_OP_K2Q: return "cuda_k2q_csr+k2q_tc(16-bit cache of q's dtype)|k2q_simt";
  case M3S_OP_MERGE: return "cuda_merge_attn_states";
  case M3S_OP_INDEX_TOPK_CANDIDATES: return "score_kernel+candidate_kernel (exact)";
  case M3S_OP_MERGE_TOPK_CANDIDATES: return "merge_cand_kernel";
  case M3S_OP_MERGE_N: return "cuda_merge_attn_states_n";
  }
  return "";
}

/* Designated initialisers are C++20; positional, in the order of
 * m3s_backend_ops. */
extern "C" const m3s_backend_ops m3s_cuda_ops = {
    0,                            /* host_values */
    m3s_cuda_context_init,        /* init */
    m3s_cuda_context_fini,        /* fini */
    m3s_cuda_check_device,        /* check_device */
    cuda_workspace,               /* workspace */
    cuda_kernel,                  /* kernel */
    m3s_cuda_cache_insert,        /* cache_insert */
    m3s_cuda_index_cache_insert,  /* index_cache_insert */
    m3s_cuda_index_topk,          /* index_topk */
    m3s_cuda_sparse_attention,    /* sparse_attention */
    m3s_cuda_build_k2q_csr,       /* build_k2q_csr */
    m3s_cuda_k2q_attention,       /* k2q_attention */
    m3s_cuda_combine_partials,    /* combine_partials */
    m3s_cuda_merge_attn_states,   /* merge_attn_states */
    m3s_cuda_index_topk_candidates, /* index_topk_candidates */
    m3s_cuda_merge_topk_candidates, /* merge_topk_candidates */
    m3s_cuda_merge_attn_states_n,   /* merge_attn_states_n */
    1,                              /* cp_attention */
};
