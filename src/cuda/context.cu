/* CUDA backend: context setup. A CUDA context records its device ordinal,
 * compute capability and SM count (the launchers size grids from it), and
 * raises the dynamic shared-memory limit of the kernels that need more than
 * 48 KB once, here: cudaFuncSetAttribute allocates host memory inside the
 * CUDA runtime, and run calls promise to allocate nothing. The operations
 * live in cache.cu, topk.cu (with topk_decode.cu), attention.cu, k2q.cu and
 * merge.cu. */
#include "common.cuh"
#include "k2q.h"
#include "launch.h"
#include "sm90/attention_tma.h"
#include "sm90/topk_tc.h"
#include "topk_decode.cuh"

#include <stdlib.h>
#include <string.h>

typedef struct {
  int sm_major;
  int sm_minor;
  int num_sms;
  void *tmap_encode; /* cuTensorMapEncodeTiled, or NULL */
  m3s_topk_tc_hooks topk_hooks; /* test switches of the certified top-k */
  int attn_generic;              /* test switch: attention on the generic kernel */
  int attn_union_any;            /* test switch: the union kernel without its size rule */
  int attn_union_wgmma;          /* the union kernel's warpgroup consumers: -1 rule, 0 off, 1 on */
  int pdl;                       /* programmatic dependent launch: < 0 default, 0 off, > 0 on (launch.h) */
  int attn_clusters[4];          /* co-resident clusters of 2^i CTAs of the persistent attention
                                  * kernel (i = 1..3) */
  int attn_cluster_off;          /* test switch: its splits through the merge kernel */
  int k2q_simt;                  /* test switch: k2q attention on the SIMT kernel (k2q.h) */
  int score_ws;                  /* m3s_topk_tc_ws_fits on this device (sm_90) */
} cuda_state;

/* Kernel attributes belong to the device that is current when they are set:
 * make the context's device current for the call, then restore the caller's.
 * On sm_90 also how many clusters of 2, 4 and 8 CTAs of the persistent
 * attention kernel the device runs at once (clusters[1..3]; 0 elsewhere) and
 * whether the prefill score kernel's register hand-off fits (*score_ws). */
static m3s_status prepare_kernels(const m3s_context *ctx, int sm_major, const char *fn,
                                  int clusters[4], int *score_ws) {
  int prev = 0;
  cudaError_t err = cudaGetDevice(&prev);
  if (err == cudaSuccess && prev != ctx->device)
    err = cudaSetDevice(ctx->device);
  if (err == cudaSuccess)
    err = m3s_cuda_attention_prepare();
  if (err == cudaSuccess)
    err = m3s_cuda_k2q_prepare();
  if (err == cudaSuccess)
    err = m3s_cuda_topk_decode_prepare();
  if (err == cudaSuccess)
    err = m3s_topk_tc_prepare();
  if (err == cudaSuccess)
    err = m3s_attention_tma_prepare();
  if (err == cudaSuccess)
    err = m3s_attention_union_prepare();
  clusters[0] = 0;
  for (int i = 1; i < 4; i++)
    clusters[i] = err == cudaSuccess && sm_major == 9 ? m3s_attention_tma_clusters(1 << i) : 0;
  *score_ws = err == cudaSuccess && sm_major == 9 && m3s_topk_tc_ws_fits();
  if (prev != ctx->device)
    cudaSetDevice(prev); /* best effort: the caller's device was valid before */
  if (err == cudaSuccess)
    return M3S_OK;
  return m3s_fail(err == cudaErrorMemoryAllocation ? M3S_ERR_NO_MEMORY : M3S_ERR_CUDA, fn,
                  "could not raise the shared-memory limit of the attention and top-k kernels "
                  "on device %d: %s",
                  ctx->device, cudaGetErrorString(err));
}

/* The driver's tensor-map encoder for the TMA kernels, or NULL when the
 * driver lacks it (those kernels are then not used). */
static void *tmap_encoder(void) {
  void *fn = NULL;
  cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
  if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                       &q) != cudaSuccess ||
      q != cudaDriverEntryPointSuccess) {
    cudaGetLastError();
    return NULL;
  }
  return fn;
}

extern "C" m3s_status m3s_cuda_context_init(m3s_context *ctx) {
  const char *fn = "m3s_context_create";
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  /* Without a GPU the runtime answers "no device" or, with no driver at all,
   * "driver version is insufficient": both mean there is nothing to run on. */
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver)
    return m3s_fail(M3S_ERR_CUDA, fn,
                    "no CUDA device: device %d requested but this machine has no usable NVIDIA "
                    "GPU or driver (CUDA runtime: %s)",
                    ctx->device, cudaGetErrorString(err));
  if (err != cudaSuccess)
    return m3s_fail(M3S_ERR_CUDA, fn, "cudaGetDeviceCount failed: %s", cudaGetErrorString(err));
  if (ctx->device >= count)
    return m3s_fail(M3S_ERR_INVALID, fn, "device %d requested but %d CUDA device(s) exist",
                    ctx->device, count);
  cudaDeviceProp prop;
  err = cudaGetDeviceProperties(&prop, ctx->device);
  if (err != cudaSuccess)
    return m3s_fail(M3S_ERR_CUDA, fn, "cudaGetDeviceProperties(%d) failed: %s", ctx->device,
                    cudaGetErrorString(err));
  int clusters[4], score_ws = 0;
  m3s_status prep = prepare_kernels(ctx, prop.major, fn, clusters, &score_ws);
  if (prep)
    return prep;
  cuda_state *st = (cuda_state *)calloc(1, sizeof *st);
  if (!st)
    return m3s_fail(M3S_ERR_NO_MEMORY, fn, "could not allocate the CUDA context state");
  st->sm_major = prop.major;
  st->sm_minor = prop.minor;
  st->num_sms = prop.multiProcessorCount;
  st->tmap_encode = tmap_encoder();
  st->pdl = -1; /* the default rule (launch.h) */
  st->attn_union_wgmma = -1; /* m3s_attention_union_wg */
  memcpy(st->attn_clusters, clusters, sizeof clusters);
  st->score_ws = score_ws;
  ctx->backend_state = st;
  m3s_log(ctx, 2, "CUDA context on device %d (%s, sm_%d%d, %d SMs)", ctx->device, prop.name,
          prop.major, prop.minor, prop.multiProcessorCount);
  return M3S_OK;
}

extern "C" void m3s_cuda_context_fini(m3s_context *ctx) {
  free(ctx->backend_state);
  ctx->backend_state = NULL;
}

/* The state a test / bench switch writes: NULL for a CPU or NULL context
 * (the switches ignore those). */
static cuda_state *switch_state(m3s_context *ctx) {
  return ctx && ctx->device >= 0 ? (cuda_state *)ctx->backend_state : NULL;
}

extern "C" void m3s_topk_tc_set_hooks(m3s_context *ctx, const m3s_topk_tc_hooks *hooks) {
  cuda_state *st = switch_state(ctx);
  if (!st)
    return;
  if (hooks)
    st->topk_hooks = *hooks;
  else
    memset(&st->topk_hooks, 0, sizeof st->topk_hooks);
}

extern "C" m3s_topk_tc_hooks m3s_cuda_topk_hooks(const m3s_context *ctx) {
  const cuda_state *st = (const cuda_state *)ctx->backend_state;
  m3s_topk_tc_hooks h;
  memset(&h, 0, sizeof h);
  return st ? st->topk_hooks : h;
}

extern "C" void m3s_attention_set_generic(m3s_context *ctx, int generic) {
  cuda_state *st = switch_state(ctx);
  if (st)
    st->attn_generic = generic != 0;
}

extern "C" int m3s_cuda_attention_generic(const m3s_context *ctx) {
  const cuda_state *st = (const cuda_state *)ctx->backend_state;
  return st ? st->attn_generic : 0;
}

extern "C" void m3s_attention_set_union_any(m3s_context *ctx, int any) {
  cuda_state *st = switch_state(ctx);
  if (st)
    st->attn_union_any = any != 0;
}

extern "C" int m3s_cuda_attention_union_any(const m3s_context *ctx) {
  const cuda_state *st = (const cuda_state *)ctx->backend_state;
  return st ? st->attn_union_any : 0;
}

extern "C" void m3s_attention_set_union_wgmma(m3s_context *ctx, int on) {
  cuda_state *st = switch_state(ctx);
  if (st)
    st->attn_union_wgmma = on < 0 ? -1 : on != 0;
}

extern "C" int m3s_cuda_attention_union_wgmma(const m3s_context *ctx) {
  const cuda_state *st = (const cuda_state *)ctx->backend_state;
  return st ? st->attn_union_wgmma : -1;
}

extern "C" void m3s_attention_set_cluster_merge(m3s_context *ctx, int on) {
  cuda_state *st = switch_state(ctx);
  if (st)
    st->attn_cluster_off = on == 0;
}

extern "C" int m3s_cuda_attention_clusters(const m3s_context *ctx, int c) {
  const cuda_state *st = (const cuda_state *)ctx->backend_state;
  for (int i = 1; st && !st->attn_cluster_off && i < 4; i++)
    if (c == 1 << i)
      return st->attn_clusters[i];
  return 0;
}

extern "C" void m3s_k2q_set_simt(m3s_context *ctx, int simt) {
  cuda_state *st = switch_state(ctx);
  if (st)
    st->k2q_simt = simt != 0;
}

extern "C" int m3s_cuda_k2q_simt(const m3s_context *ctx) {
  const cuda_state *st = (const cuda_state *)ctx->backend_state;
  return st ? st->k2q_simt : 0;
}

extern "C" void m3s_cuda_set_pdl(m3s_context *ctx, int on) {
  cuda_state *st = switch_state(ctx);
  if (st)
    st->pdl = on < 0 ? -1 : on != 0;
}

extern "C" int m3s_cuda_pdl(const m3s_context *ctx, int64_t num_reqs) {
  const cuda_state *st = (const cuda_state *)ctx->backend_state;
  if (!st || st->sm_major != 9) /* the sm_90a code has the waits */
    return 0;
  return st->pdl < 0 ? num_reqs <= M3S_PDL_AUTO_REQS : st->pdl;
}

extern "C" int m3s_cuda_num_sms(const m3s_context *ctx) {
  const cuda_state *st = (const cuda_state *)ctx->backend_state;
  return st ? st->num_sms : 132;
}

extern "C" int m3s_cuda_sm_major(const m3s_context *ctx) {
  const cuda_state *st = (const cuda_state *)ctx->backend_state;
  return st ? st->sm_major : 0;
}

extern "C" int m3s_cuda_score_ws(const m3s_context *ctx) {
  const cuda_state *st = (const cuda_state *)ctx->backend_state;
  return st ? st->score_ws : 0;
}

extern "C" void *m3s_cuda_tmap_encoder(const m3s_context *ctx) {
  const cuda_state *st = (const cuda_state *)ctx->backend_state;
  return st ? st->tmap_encode : NULL;
}

/* Kernels launch on the calling thread's current device; a context bound to
 * another device would read foreign pointers, so refuse instead (host-only
 * query, safe during graph capture). */
extern "C" m3s_status m3s_cuda_check_device(const m3s_context *ctx, const char *fn) {
  int cur = -1;
  cudaError_t err = cudaGetDevice(&cur);
  if (err != cudaSuccess)
    return m3s_fail(M3S_ERR_CUDA, fn, "cudaGetDevice failed: %s", cudaGetErrorString(err));
  if (cur != ctx->device)
    return m3s_fail(M3S_ERR_DEVICE, fn,
                    "the context is bound to CUDA device %d but the current device is %d "
                    "(call cudaSetDevice(%d) first)",
                    ctx->device, cur, ctx->device);
  return M3S_OK;
}
