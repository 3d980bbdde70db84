/* The Hopper sparse-attention path of the CUDA backend
 * (src/cuda/sm90/attention_tma.cu): when it applies, and a switch for tests
 * and the benchmark that sends every call to the generic kernel
 * (src/cuda/attention.cu) instead. Plain C, included by C tests and the
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

/* 1 when the TMA kernel runs this call: decode with one query row per
 * request (batch->max_q_len == 1), M3S_OPT_BATCH_INVARIANT off, an sm_90
 * device with the driver's tensor-map encoder, a cache of q's dtype (bf16 or
 * f16) or an e4m3 / e5m2 cache, 16-byte aligned bases and strides, per-slot
 * scales with contiguous slots and a 16-byte aligned base and head stride,
 * int32 coordinates, tensor maps the driver accepts, and the switch above
 * off (host facts only). */
int m3s_attention_tma_eligible(const m3s_context *ctx, const m3s_batch *batch, const m3s_tensor *q,
                               const m3s_tensor *kv, const m3s_kv_scales *scales);

#ifdef __CUDACC__
cudaError_t m3s_attention_tma_prepare(void);
#endif

#ifdef __cplusplus
}
#endif

#endif
