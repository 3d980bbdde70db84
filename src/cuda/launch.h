/* Programmatic dependent launch (PDL, sm_90) of the CUDA backend. In the
 * decode chain the certified streaming score kernel, the CTA-wide selection,
 * the persistent TMA attention kernel and its split merge may each start
 * while the kernel before it on the stream finishes; in the prefill index
 * top-k (topk_tc.cu) the first chunk's warp-specialised score kernel may
 * start behind the key-norm pass, and a chunk's deferred selection kernel
 * behind its register selection kernel. Each waits with griddepcontrol.wait before it reads
 * anything (src/cuda/common.cuh). By
 * default on sm_90 for batches of at most M3S_PDL_AUTO_REQS requests, where
 * it was measured to pay (H200, m3s-bench graph replays, step us, off / on:
 * one request TP1 32K 29.4 / 27.1, 128K 40.6 / 38.8, TP8 128K 36.2 / 34.0;
 * 16 requests TP1 32K 80.5 / 83.5, 128K 176.8 / 180.3; 128 within 0.5%;
 * docs/perf-notes.md, session 13; session 14, after the chain's kernels
 * changed: one request 32K 28.6 / 28.3, 128K 38.7 / 38.7, i.e. neutral
 * now); a context switch forces it on or off
 * for tests and m3s-bench. Plain C, included by C tests and the CUDA
 * sources. Internal (not exported): tests and m3s-bench
 * link m3sparse_internal. Defined in src/cuda/context.cu. */
#ifndef M3S_CUDA_LAUNCH_H
#define M3S_CUDA_LAUNCH_H

#include "m3sparse.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Requests per batch up to which the default uses PDL. */
#define M3S_PDL_AUTO_REQS 1

/* on > 0: the launches above on this CUDA context use PDL where
 * the device has it (sm_90); on == 0: never; on < 0: the default (batches
 * of at most M3S_PDL_AUTO_REQS requests). Not for concurrent use with calls
 * on the context. A CPU context ignores it. */
void m3s_cuda_set_pdl(m3s_context *ctx, int on);
/* Whether the context's launches for a batch of num_reqs requests use PDL
 * (the switch or the default, and an sm_90 device: the sm_90a code has the
 * grid-dependency waits). */
int m3s_cuda_pdl(const m3s_context *ctx, int64_t num_reqs);

#ifdef __cplusplus
}
#endif

#endif
