/* Internal interface of the streaming decode score kernel (topk_decode.cu),
 * called by the CUDA top-k (topk.cu) and prepared by context.cu. */
#ifndef M3S_CUDA_TOPK_DECODE_CUH
#define M3S_CUDA_TOPK_DECODE_CUH

#include "common.cuh"

/* Host: writes the block scores S[pair][max_nb] (the layout select_kernel
 * reads, one chunk holding every pair) of a uniform decode batch into ws and
 * sets *ran = 1; sets *ran = 0 and launches nothing when the batch or the
 * device is outside what the kernel covers (the caller then runs its own
 * score kernel). The context's device must be current. */
m3s_status m3s_cuda_topk_decode_scores(m3s_context *ctx, const m3s_layer_config *cfg,
                                       const m3s_batch *batch, const m3s_tensor *iq,
                                       const m3s_tensor *index_cache, float *ws, int64_t max_nb,
                                       cudaStream_t stream, int *ran);

/* Host, once per context with its device current: raises the kernels'
 * dynamic shared-memory limit where the device has enough. */
extern "C" cudaError_t m3s_cuda_topk_decode_prepare(void);

#endif
