/* CUDA backend: context setup. A CUDA context records its device ordinal,
 * compute capability and SM count (the launchers size grids from it); the
 * operations live in cache.cu, topk.cu, attention.cu, k2q.cu and merge.cu. */
#include "../core/internal.h"

#include <cuda_runtime.h>
#include <stdlib.h>

typedef struct {
  int sm_major;
  int sm_minor;
  int num_sms;
} cuda_state;

extern "C" m3s_status m3s_cuda_context_init(m3s_context *ctx) {
  const char *fn = "m3s_context_create";
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
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
  cuda_state *st = (cuda_state *)calloc(1, sizeof *st);
  if (!st)
    return m3s_fail(M3S_ERR_NO_MEMORY, fn, "could not allocate the CUDA context state");
  st->sm_major = prop.major;
  st->sm_minor = prop.minor;
  st->num_sms = prop.multiProcessorCount;
  ctx->backend_state = st;
  m3s_log(ctx, 2, "CUDA context on device %d (%s, sm_%d%d, %d SMs)", ctx->device, prop.name,
          prop.major, prop.minor, prop.multiProcessorCount);
  return M3S_OK;
}

extern "C" void m3s_cuda_context_fini(m3s_context *ctx) {
  free(ctx->backend_state);
  ctx->backend_state = NULL;
}

extern "C" int m3s_cuda_num_sms(const m3s_context *ctx) {
  const cuda_state *st = (const cuda_state *)ctx->backend_state;
  return st ? st->num_sms : 132;
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
