/* GPU test support: a device mirror of a CPU fixture (tests/ref.h), so every
 * GPU test runs the CUDA backend and the CPU backend on the same random
 * inputs and compares. GPU test binaries exit with GPU_SKIP (77, CTest's
 * SKIP_RETURN_CODE) after printing "... skipped" only when the machine has
 * no GPU (see gpu_context_or_null). */
#ifndef M3S_TEST_GPU_UTIL_H
#define M3S_TEST_GPU_UTIL_H

#include "ref.h"

#define GPU_SKIP 77

typedef struct {
  void *kv, *ic, *q, *iq, *out, *topk;
  float *lse, *ks, *vs;
  int32_t *qsl, *seq, *bt, *ibt;
  m3s_tensor kv_t, ic_t, q_t, iq_t, out_t, lse_t, topk_t;
  m3s_kv_scales scales;
  m3s_batch batch;
  void *ws;
  size_t ws_bytes;
  m3s_exec exec;
} gpu_fx;

/* A CUDA context on device 0, or NULL when this machine has no GPU at all
 * (tests/gpu_probe.h: no NVIDIA driver, the stub library, zero devices);
 * then gpu_skip(name, "no CUDA device") prints the probe's reason. When a
 * driver with devices is present but the CUDA runtime or
 * m3s_context_create(0) fails, it counts a failed check, prints the summary
 * and exits with status 1: a broken GPU machine fails, it never skips. */
m3s_context *gpu_context_or_null(void);
/* Prints the skip line and returns GPU_SKIP. */
int gpu_skip(const char *test_name, const char *why);

/* Allocates device copies of every buffer of f (same strides), a workspace
 * of the size the context reports, and builds device tensor views. */
int gpu_fx_upload(gpu_fx *g, const fixture *f, m3s_context *ctx);
/* Re-uploads the host fixture's inputs (caches, q, iq, batch, tables). */
int gpu_fx_reupload_inputs(gpu_fx *g, const fixture *f);
/* Host poison (fx_poison) copied to the device outputs (out, lse, topk). */
int gpu_fx_poison(gpu_fx *g, fixture *f);
/* The host fixture's out, lse and topk copied to the device as they are (the
 * caller's poison, or rows an earlier run wrote): gpu_fx_upload leaves the
 * device outputs uninitialised. */
int gpu_fx_put_outputs(gpu_fx *g, const fixture *f);
/* Copies out, lse and topk back into the host fixture's buffers. */
int gpu_fx_download(gpu_fx *g, fixture *f);
/* Uploads the host fixture's topk buffer to the device. */
int gpu_fx_upload_topk(gpu_fx *g, const fixture *f);
void gpu_fx_free(gpu_fx *g);
/* f with every tensor view and the batch pointing at g's device copies, for
 * helpers that take a fixture (fx_run_chain); it shares f's host memory, so
 * it is never passed to fx_free. */
fixture gpu_fx_views(const fixture *f, const gpu_fx *g);

/* Host wall clock in milliseconds (for the tests' optional timings). */
double gpu_now_ms(void);
/* 1 when the environment variable is set to something other than "" or "0"
 * (M3S_TEST_QUICK, M3S_TEST_TIME). */
int gpu_env_flag(const char *name);

/* The current device's compute-capability major (9 on Hopper), 0 when it
 * cannot be read. */
int gpu_sm_major(void);
/* Programmatic-dependency edges of a captured CUDA graph (cudaGraph_t), -1
 * when they cannot be read: PDL launches leave them. */
struct CUgraph_st;
int gpu_programmatic_edges(struct CUgraph_st *graph);

/* cudaMalloc + cudaMemcpy of n bytes (NULL on failure); host may be NULL.
 * The buffer sits between two 4 KiB guard zones of canary bytes. */
void *gpu_dup(const void *host, size_t n);
/* Reads back the guard zones of every live gpu_dup buffer; one failed check
 * per corrupted zone. Returns 1 when all are intact. */
int gpu_guards_check(void);
int gpu_get(void *host, const void *dev, size_t n);
int gpu_put(void *dev, const void *host, size_t n);
/* Checks the buffer's guard zones (one failed check if corrupted), frees it. */
void gpu_free(void *p);
int gpu_sync(void);

#endif
