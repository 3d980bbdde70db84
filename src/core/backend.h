/* The operations table every backend implements. m3s_context_create picks a
 * table once (ctx->ops); the core validates every argument before it calls an
 * entry (shapes, dtypes, strides, devices and, when the backend reads host
 * memory, the values of index tensors), so backends only compute.
 * Optional tensors (lse) are NULL when absent; scales are NULL for scale 1.
 *
 * exec may be NULL (legacy default stream, no workspace); otherwise its
 * workspace is at least the size the table's workspace entry reports, 256-byte
 * aligned. The CPU backend runs on the calling thread and ignores the stream.
 * The CUDA backend launches only on exec->stream: no allocation, no
 * synchronisation, no host reads of device data; device data that the core
 * could not validate is guarded inside the kernels (src/cuda/common.cuh). */
#ifndef M3S_BACKEND_H
#define M3S_BACKEND_H

typedef struct m3s_backend_ops {
  /* Nonzero when tensors live in host memory: the core then also validates
   * the values of index tensors (slots, top-k ids, CSR entries, counts). */
  int host_values;
  /* Sets up ctx->backend_state (NULL: nothing to set up; fini then NULL). */
  m3s_status (*init)(m3s_context *ctx);
  void (*fini)(m3s_context *ctx);
  /* Refuses a call that would run elsewhere than the context's device
   * (NULL: nothing to check). */
  m3s_status (*check_device)(const m3s_context *ctx, const char *fn);
  /* Scratch bytes of one step: the operations of a step run one after the
   * other on one stream and share it. */
  size_t (*workspace)(const m3s_context *ctx, const m3s_layer_config *cfg, int64_t max_tokens,
                      int64_t max_seq_len);
  /* What runs for an operation, for m3s_query_support ("" for none). */
  const char *(*kernel)(const m3s_context *ctx, m3s_op op);

  m3s_status (*cache_insert)(m3s_context *ctx, const m3s_tensor *k, const m3s_tensor *v,
                             const m3s_tensor *slot_mapping, m3s_tensor *kv_cache,
                             const m3s_kv_scales *scales, const m3s_exec *exec);
  m3s_status (*index_cache_insert)(m3s_context *ctx, const m3s_tensor *ik,
                                   const m3s_tensor *slot_mapping, m3s_tensor *index_cache,
                                   const m3s_exec *exec);
  m3s_status (*index_topk)(m3s_context *ctx, const m3s_layer_config *cfg, const m3s_batch *batch,
                           const m3s_tensor *iq, const m3s_tensor *index_cache, m3s_tensor *topk,
                           const m3s_exec *exec);
  m3s_status (*sparse_attention)(m3s_context *ctx, const m3s_layer_config *cfg,
                                 const m3s_batch *batch, const m3s_tensor *q,
                                 const m3s_tensor *kv_cache, const m3s_kv_scales *scales,
                                 const m3s_tensor *topk, m3s_tensor *out, m3s_tensor *lse,
                                 const m3s_exec *exec);
  m3s_status (*build_k2q_csr)(m3s_context *ctx, const m3s_layer_config *cfg,
                              const m3s_batch *batch, const m3s_tensor *topk, m3s_tensor *row_ptr,
                              m3s_tensor *q_indices, m3s_tensor *q_slot, m3s_tensor *q_count,
                              const m3s_exec *exec);
  m3s_status (*k2q_attention)(m3s_context *ctx, const m3s_layer_config *cfg,
                              const m3s_batch *batch, const m3s_tensor *q,
                              const m3s_tensor *kv_cache, const m3s_kv_scales *scales,
                              const m3s_tensor *row_ptr, const m3s_tensor *q_indices,
                              const m3s_tensor *q_slot, m3s_tensor *part_out,
                              m3s_tensor *part_lse, const m3s_exec *exec);
  m3s_status (*combine_partials)(m3s_context *ctx, const m3s_layer_config *cfg,
                                 const m3s_tensor *part_out, const m3s_tensor *part_lse,
                                 const m3s_tensor *q_count, m3s_tensor *out, m3s_tensor *lse,
                                 const m3s_exec *exec);
  m3s_status (*merge_attn_states)(m3s_context *ctx, const m3s_tensor *out_a,
                                  const m3s_tensor *lse_a, const m3s_tensor *out_b,
                                  const m3s_tensor *lse_b, m3s_tensor *out, m3s_tensor *lse,
                                  const m3s_exec *exec);
  /* Context parallel (SPEC section 10). A NULL entry is an operation the
   * backend does not implement: the core answers M3S_ERR_UNSUPPORTED and
   * m3s_query_support reports it. sparse_attention is given batches with
   * cp_size > 1 only when cp_attention is nonzero. */
  m3s_status (*index_topk_candidates)(m3s_context *ctx, const m3s_layer_config *cfg,
                                      const m3s_batch *batch, const m3s_tensor *iq,
                                      const m3s_tensor *index_cache, m3s_tensor *cand_ids,
                                      m3s_tensor *cand_scores, const m3s_exec *exec);
  m3s_status (*merge_topk_candidates)(m3s_context *ctx, const m3s_layer_config *cfg,
                                      const m3s_batch *batch, const m3s_tensor *cand_ids,
                                      const m3s_tensor *cand_scores, m3s_tensor *topk,
                                      const m3s_exec *exec);
  m3s_status (*merge_attn_states_n)(m3s_context *ctx, const m3s_tensor *outs,
                                    const m3s_tensor *lses, m3s_tensor *out, m3s_tensor *lse,
                                    const m3s_exec *exec);
  int cp_attention;
} m3s_backend_ops;

/* src/cpu/ops.c */
extern const m3s_backend_ops m3s_cpu_ops;
#ifdef M3S_WITH_CUDA
/* src/cuda/ops.cu */
extern const m3s_backend_ops m3s_cuda_ops;
#endif

#endif
