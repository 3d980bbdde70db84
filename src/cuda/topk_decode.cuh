/* Internal interface of the streaming decode score kernel (topk_decode.cu),
 * called by the CUDA top-k (topk.cu) and prepared by context.cu. */
#ifndef M3S_CUDA_TOPK_DECODE_CUH
#define M3S_CUDA_TOPK_DECODE_CUH

#include "common.cuh"
#include "sm90/topk_tc.h"

/* Host: writes the block scores S[pair][max_nb] (the layout select_kernel
 * reads, one chunk holding every pair) of a uniform decode batch into ws and
 * sets *ran = 1; sets *ran = 0 and launches nothing when the batch or the
 * device is outside what the kernel covers (the caller then runs its own
 * score kernel). The context's device must be current. */
m3s_status m3s_cuda_topk_decode_scores(m3s_context *ctx, const m3s_layer_config *cfg,
                                       const m3s_batch *batch, const m3s_tensor *iq,
                                       const m3s_tensor *index_cache, float *ws, int64_t max_nb,
                                       cudaStream_t stream, int *ran);

/* Host: 1 when the certified streaming kernel covers this uniform decode
 * batch (q_len <= 8, q_len x Hkv <= 16, bf16 index queries, bf16 or e4m3
 * index cache at a 16-byte aligned address, shared memory on the device). */
extern "C" int m3s_cuda_topk_decode_tc_covers(const m3s_layer_config *cfg, const m3s_batch *batch,
                                              const m3s_tensor *iq,
                                              const m3s_tensor *index_cache);

/* Host: launches it: (S~, E) of every candidate block of every (token, head)
 * pair at ws[(r * q_len * Hkv + pair) * max_nb + block], pair = token *
 * Hkv + head (the certified selection's layout, topk_tc.cu). An e4m3 cache
 * on sm_90 takes the kernel's TMA form unless no_tma (the tests' mma_sync
 * hook, so that they cover both forms); its CTAs count themselves in
 * stats->tma_ctas when stats (the tests' device buffer) is not NULL. */
extern "C" m3s_status m3s_cuda_topk_decode_tc_scores(m3s_context *ctx, const m3s_layer_config *cfg,
                                                     const m3s_batch *batch, const m3s_tensor *iq,
                                                     const m3s_tensor *index_cache, float2 *ws,
                                                     int64_t max_nb, int no_tma,
                                                     m3s_topk_tc_stats *stats, cudaStream_t stream);

/* Host, once per context with its device current: raises the kernels'
 * dynamic shared-memory limit where the device has enough. */
extern "C" cudaError_t m3s_cuda_topk_decode_prepare(void);

#endif
