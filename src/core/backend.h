/* The operations every backend implements. The core has validated every
 * argument before it calls one of these (shapes, dtypes, strides, devices and,
 * on the CPU, the values of index tensors), so backends only compute.
 * Optional tensors (lse) are NULL when absent; scales are NULL for scale 1. */
#ifndef M3S_BACKEND_H
#define M3S_BACKEND_H

/* ---- CPU reference backend (src/cpu) ---- */
m3s_status m3s_cpu_cache_insert(const m3s_tensor *k, const m3s_tensor *v,
                                const m3s_tensor *slot_mapping, m3s_tensor *kv_cache,
                                const m3s_kv_scales *scales);
m3s_status m3s_cpu_index_cache_insert(const m3s_tensor *ik, const m3s_tensor *slot_mapping,
                                      m3s_tensor *index_cache);
m3s_status m3s_cpu_index_topk(const m3s_layer_config *cfg, const m3s_batch *batch,
                              const m3s_tensor *iq, const m3s_tensor *index_cache,
                              m3s_tensor *topk);
m3s_status m3s_cpu_sparse_attention(const m3s_layer_config *cfg, const m3s_batch *batch,
                                    const m3s_tensor *q, const m3s_tensor *kv_cache,
                                    const m3s_kv_scales *scales, const m3s_tensor *topk,
                                    m3s_tensor *out, m3s_tensor *lse);
m3s_status m3s_cpu_build_k2q_csr(const m3s_layer_config *cfg, const m3s_batch *batch,
                                 const m3s_tensor *topk, m3s_tensor *row_ptr,
                                 m3s_tensor *q_indices, m3s_tensor *q_slot, m3s_tensor *q_count);
m3s_status m3s_cpu_k2q_attention(const m3s_layer_config *cfg, const m3s_batch *batch,
                                 const m3s_tensor *q, const m3s_tensor *kv_cache,
                                 const m3s_kv_scales *scales, const m3s_tensor *row_ptr,
                                 const m3s_tensor *q_indices, const m3s_tensor *q_slot,
                                 m3s_tensor *part_out, m3s_tensor *part_lse);
m3s_status m3s_cpu_combine_partials(const m3s_layer_config *cfg, const m3s_tensor *part_out,
                                    const m3s_tensor *part_lse, const m3s_tensor *q_count,
                                    m3s_tensor *out, m3s_tensor *lse);
m3s_status m3s_cpu_merge_attn_states(const m3s_tensor *out_a, const m3s_tensor *lse_a,
                                     const m3s_tensor *out_b, const m3s_tensor *lse_b,
                                     m3s_tensor *out, m3s_tensor *lse);

/* ---- CUDA backend (src/cuda), only in builds with M3S_WITH_CUDA ---- */
/* Same contracts as the CPU functions, plus the context (device, state) and
 * the caller's stream and workspace (exec may be NULL: legacy default stream,
 * no workspace; otherwise its workspace is at least the size the matching
 * *_workspace function reports, 256-byte aligned). Launches
 * only on exec->stream; no allocation, no synchronisation, no host reads of
 * device data. Device data that the core could not validate is guarded
 * inside the kernels (see src/cuda/common.cuh). */
#ifdef M3S_WITH_CUDA
m3s_status m3s_cuda_context_init(m3s_context *ctx);
void m3s_cuda_context_fini(m3s_context *ctx);
int m3s_cuda_num_sms(const m3s_context *ctx);
m3s_status m3s_cuda_check_device(const m3s_context *ctx, const char *fn);
m3s_status m3s_cuda_cache_insert(m3s_context *ctx, const m3s_tensor *k, const m3s_tensor *v,
                                 const m3s_tensor *slot_mapping, m3s_tensor *kv_cache,
                                 const m3s_kv_scales *scales, const m3s_exec *exec);
m3s_status m3s_cuda_index_cache_insert(m3s_context *ctx, const m3s_tensor *ik,
                                       const m3s_tensor *slot_mapping, m3s_tensor *index_cache,
                                       const m3s_exec *exec);
size_t m3s_cuda_topk_workspace(const m3s_context *ctx, const m3s_layer_config *cfg,
                               int64_t max_tokens, int64_t max_seq_len);
m3s_status m3s_cuda_index_topk(m3s_context *ctx, const m3s_layer_config *cfg,
                               const m3s_batch *batch, const m3s_tensor *iq,
                               const m3s_tensor *index_cache, m3s_tensor *topk,
                               const m3s_exec *exec);
size_t m3s_cuda_attention_workspace(const m3s_context *ctx, const m3s_layer_config *cfg,
                                    int64_t max_tokens, int64_t max_seq_len);
m3s_status m3s_cuda_sparse_attention(m3s_context *ctx, const m3s_layer_config *cfg,
                                     const m3s_batch *batch, const m3s_tensor *q,
                                     const m3s_tensor *kv_cache, const m3s_kv_scales *scales,
                                     const m3s_tensor *topk, m3s_tensor *out, m3s_tensor *lse,
                                     const m3s_exec *exec);
m3s_status m3s_cuda_build_k2q_csr(m3s_context *ctx, const m3s_layer_config *cfg,
                                  const m3s_batch *batch, const m3s_tensor *topk,
                                  m3s_tensor *row_ptr, m3s_tensor *q_indices, m3s_tensor *q_slot,
                                  m3s_tensor *q_count, const m3s_exec *exec);
m3s_status m3s_cuda_k2q_attention(m3s_context *ctx, const m3s_layer_config *cfg,
                                  const m3s_batch *batch, const m3s_tensor *q,
                                  const m3s_tensor *kv_cache, const m3s_kv_scales *scales,
                                  const m3s_tensor *row_ptr, const m3s_tensor *q_indices,
                                  const m3s_tensor *q_slot, m3s_tensor *part_out,
                                  m3s_tensor *part_lse, const m3s_exec *exec);
m3s_status m3s_cuda_combine_partials(m3s_context *ctx, const m3s_layer_config *cfg,
                                     const m3s_tensor *part_out, const m3s_tensor *part_lse,
                                     const m3s_tensor *q_count, m3s_tensor *out, m3s_tensor *lse,
                                     const m3s_exec *exec);
m3s_status m3s_cuda_merge_attn_states(m3s_context *ctx, const m3s_tensor *out_a,
                                      const m3s_tensor *lse_a, const m3s_tensor *out_b,
                                      const m3s_tensor *lse_b, m3s_tensor *out, m3s_tensor *lse,
                                      const m3s_exec *exec);
#endif

#endif
