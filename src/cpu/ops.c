/* The CPU reference backend's operations table (src/core/backend.h): host
 * memory, so the core validates index values too; no state, no workspace. */
#include "common.h"

static size_t cpu_workspace(const m3s_context *ctx, const m3s_layer_config *cfg,
                            int64_t max_tokens, int64_t max_seq_len) {
  (void)ctx, (void)cfg, (void)max_tokens, (void)max_seq_len;
  return 0; /* tiles live on the stack and in thread-local storage */
}

static const char *cpu_kernel(const m3s_context *ctx, m3s_op op) {
  (void)ctx;
  switch (op) {
  case M3S_OP_CACHE_INSERT: return "cpu_cache_insert";
  case M3S_OP_INDEX_INSERT: return "cpu_index_cache_insert";
  case M3S_OP_INDEX_TOPK: return "cpu_index_topk_streaming";
  case M3S_OP_ATTENTION_DECODE: return "cpu_sparse_attention_rowwise";
  case M3S_OP_ATTENTION_PREFILL: return "cpu_sparse_attention_rowwise";
  case M3S_OP_K2Q: return "cpu_k2q_csr";
  case M3S_OP_MERGE: return "cpu_merge_attn_states";
  case M3S_OP_INDEX_TOPK_CANDIDATES: return "cpu_index_topk_candidates_streaming";
  case M3S_OP_MERGE_TOPK_CANDIDATES: return "cpu_merge_topk_candidates";
  case M3S_OP_ATTENTION_CP: return "cpu_sparse_attention_rowwise";
  case M3S_OP_MERGE_N: return "cpu_merge_attn_states_n";
  }
  return "";
}

const m3s_backend_ops m3s_cpu_ops = {
    .host_values = 1,
    .init = NULL,
    .fini = NULL,
    .check_device = NULL,
    .workspace = cpu_workspace,
    .kernel = cpu_kernel,
    .cache_insert = m3s_cpu_cache_insert,
    .index_cache_insert = m3s_cpu_index_cache_insert,
    .index_topk = m3s_cpu_index_topk,
    .sparse_attention = m3s_cpu_sparse_attention,
    .build_k2q_csr = m3s_cpu_build_k2q_csr,
    .k2q_attention = m3s_cpu_k2q_attention,
    .combine_partials = m3s_cpu_combine_partials,
    .merge_attn_states = m3s_cpu_merge_attn_states,
    .index_topk_candidates = m3s_cpu_index_topk_candidates,
    .merge_topk_candidates = m3s_cpu_merge_topk_candidates,
    .merge_attn_states_n = m3s_cpu_merge_attn_states_n,
    .cp_attention = 1,
};
