/* The key-centric k2q attention of the CUDA backend (src/cuda/k2q.cu): a
 * switch for tests and m3s-bench that keeps every call on the SIMT fp32
 * kernel, where the tensor-core one would take it. Plain C, included by C
 * tests and the CUDA sources. Internal (not exported): tests and m3s-bench
 * link m3sparse_internal. Defined in src/cuda/context.cu. */
#ifndef M3S_CUDA_K2Q_H
#define M3S_CUDA_K2Q_H

#include "m3sparse.h"

#ifdef __cplusplus
extern "C" {
#endif

/* simt != 0: m3s_k2q_attention on this CUDA context runs the SIMT kernel
 * for every call; 0 (the default): the tensor-core kernel where it applies
 * (q and a 16-bit cache of the same dtype). Not for concurrent use with
 * calls on the context. A CPU context ignores it. */
void m3s_k2q_set_simt(m3s_context *ctx, int simt);
int m3s_cuda_k2q_simt(const m3s_context *ctx);
/* 1 when m3s_k2q_attention on this context runs these operands (device
 * tensors) on the tensor-core kernel; defined in src/cuda/k2q.cu. */
int m3s_k2q_tc_takes(const m3s_context *ctx, const m3s_tensor *q, const m3s_tensor *kv,
                     const m3s_tensor *part_out, const m3s_tensor *part_lse);

#ifdef __cplusplus
}
#endif

#endif
