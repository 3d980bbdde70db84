/* Programmatic dependent launch (PDL, sm_90) of the decode chain of the CUDA
 * backend: the certified streaming score kernel, the CTA-wide selection, the
 * persistent TMA attention kernel and its split merge may each start while
 * the kernel before it on the stream finishes (each waits with
 * griddepcontrol.wait before it reads anything, src/cuda/common.cuh). A
 * context switch for tests and m3s-bench until it is measured on a GPU
 * (docs/perf-notes.md, session 12); off by default. Plain C, included by C
 * tests and the CUDA sources. Internal (not exported): tests and m3s-bench
 * link m3sparse_internal. Defined in src/cuda/context.cu. */
#ifndef M3S_CUDA_LAUNCH_H
#define M3S_CUDA_LAUNCH_H

#include "m3sparse.h"

#ifdef __cplusplus
extern "C" {
#endif

/* on != 0: launches of the decode chain on this CUDA context use PDL where
 * the device has it (sm_90); not for concurrent use with calls on the
 * context. A CPU context ignores it. */
void m3s_cuda_set_pdl(m3s_context *ctx, int on);
/* Whether the context's launches use PDL (the switch and an sm_90 device:
 * the sm_90a code has the grid-dependency waits). */
int m3s_cuda_pdl(const m3s_context *ctx);

#ifdef __cplusplus
}
#endif

#endif
