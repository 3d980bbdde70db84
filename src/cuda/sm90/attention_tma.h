/* The Hopper sparse-attention path of the CUDA backend
 * (src/cuda/sm90/attention_tma.cu, sm90/attention_union.cu): which kernel
 * runs a call, and switches for tests and the benchmark that send every call
 * to the generic kernel (src/cuda/attention.cu) or every batch it can run to
 * the union kernel. Plain C, included by C tests and the
 * CUDA sources. */
#ifndef M3S_CUDA_ATTENTION_TMA_H
#define M3S_CUDA_ATTENTION_TMA_H

#include "m3sparse.h"

#ifdef __cplusplus
extern "C" {
#endif

/* generic != 0: every m3s_sparse_attention call on this CUDA context runs
 * the generic kernel (a context option for tests and m3s-bench; not for
 * concurrent use with calls on the context). A CPU context ignores it.
 * Internal (not exported): tests and m3s-bench link m3sparse_internal.
 * Defined in src/cuda/context.cu. */
void m3s_attention_set_generic(m3s_context *ctx, int generic);
int m3s_cuda_attention_generic(const m3s_context *ctx);

/* any != 0: the union kernel takes every batch it can run, however few
 * work items it has (the default rule, m3s_attention_union_pays, leaves
 * small batches to the generic kernel); for tests and m3s-bench, like the
 * switch above. */
void m3s_attention_set_union_any(m3s_context *ctx, int any);
int m3s_cuda_attention_union_any(const m3s_context *ctx);

/* The union kernel's consumers: on > 0 warpgroups (wgmma;
 * sm90/attention_union.cu, au_consume_wg) for every batch, 0 one mma.sync
 * warp per row, < 0 (the default) the rule of m3s_attention_union_wg; for
 * tests and m3s-bench, like the switches above. */
void m3s_attention_set_union_wgmma(m3s_context *ctx, int on);
int m3s_cuda_attention_union_wgmma(const m3s_context *ctx);

/* on == 0: the persistent kernel's splits are merged by the merge kernel
 * (src/cuda/attention.cu) even where they could merge inside a cluster; on
 * != 0 (the default): clusters where the batch allows and the device
 * co-schedules them (sm90/attention_tma.cu); for tests and m3s-bench, like
 * the switches above. m3s_cuda_attention_clusters: how many clusters of c
 * (2, 4 or 8) CTAs of the persistent kernel the context's device runs at
 * once (measured at context creation), 0 for other c or when switched
 * off. */
void m3s_attention_set_cluster_merge(m3s_context *ctx, int on);
int m3s_cuda_attention_clusters(const m3s_context *ctx, int c);
/* The splits per item the persistent kernel merges in a cluster for a batch
 * of this shape (host bounds: num_tokens, max_seq_len), 1 when it does not
 * (then splits, if any, go through the merge kernel). Defined in
 * src/cuda/attention.cu. */
int m3s_attention_cluster_splits(const m3s_context *ctx, const m3s_layer_config *cfg,
                                 const m3s_batch *batch);
/* Which kernel runs a call (m3s_attention_tma_eligible). */
enum {
  M3S_ATTN_GENERIC = 0,    /* src/cuda/attention.cu, cp.async, any device */
  M3S_ATTN_PERSISTENT = 1, /* sm90/attention_tma.cu: one query row per request */
  M3S_ATTN_UNION = 2       /* sm90/attention_union.cu: rows that share blocks */
};

/* The kernel that runs this call (host facts only): M3S_ATTN_PERSISTENT
 * for decode with one query row per request (batch->max_q_len == 1) and a
 * cache of q's dtype (bf16 or f16) or an e4m3 / e5m2 cache;
 * M3S_ATTN_UNION for batches with max_q_len > 1, a cache of q's dtype or
 * an e4m3 / e5m2 cache, and the shape of m3s_attention_union_pays; both
 * need
 * M3S_OPT_BATCH_INVARIANT off, an sm_90 device with the driver's
 * tensor-map encoder, 16-byte aligned bases and strides, per-slot scales
 * with contiguous slots and a 16-byte aligned base and head stride, int32
 * coordinates, tensor maps the driver accepts, and the generic switch off.
 * M3S_ATTN_GENERIC otherwise. */
int m3s_attention_tma_eligible(const m3s_context *ctx, const m3s_batch *batch, const m3s_tensor *q,
                               const m3s_tensor *kv, const m3s_kv_scales *scales);

/* 1 when the union kernel pays for a batch of batch->num_tokens rows with
 * `group` query heads per KV head and hkv KV heads: work items for at least
 * half the SMs and contexts up to 32K (batch->max_seq_len; 16K for an fp8
 * cache, kv_dtype e4m3 / e5m2); or the switch above is on. Defined in
 * sm90/attention_union.cu. */
int m3s_attention_union_pays(const m3s_context *ctx, const m3s_batch *batch, int64_t group,
                             int64_t hkv, m3s_dtype kv_dtype);
/* 1 when the union kernel runs a batch on its warpgroup consumers: the
 * switch above, else prefill chunks (max_q_len > 8) with contexts up to 12K
 * (16-bit caches) or 16K (fp8). */
int m3s_attention_union_wg(const m3s_context *ctx, const m3s_batch *batch, m3s_dtype kv_dtype);

#ifdef __CUDACC__
cudaError_t m3s_attention_tma_prepare(void);
/* How many clusters of c CTAs of the persistent kernel the current device
 * runs at once, the fewer of its two shared-memory sizes; 0 for none or on
 * error. Host only, at context creation (context.cu). */
int m3s_attention_tma_clusters(int c);
cudaError_t m3s_attention_union_prepare(void);
#endif

#ifdef __cplusplus
}
#endif

#endif
