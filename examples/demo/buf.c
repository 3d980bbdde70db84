/* m3s-demo: buffers, a host copy and, with --device=cuda, a device copy (on the CPU
 * the library works on the host copy itself and uploads/downloads do nothing). */
#include "demo.h"

/* Where the demo's tensors live, set once by demo_init (buf_set_device). */
static int g_on_device = 0;   /* tensors live on CUDA device 0 */
static int g_tdev = M3S_HOST; /* m3s_tensor.device of every tensor */

void buf_set_device(int cuda) {
  g_on_device = cuda;
  g_tdev = cuda ? 0 : M3S_HOST;
}

int buf_device(void) { return g_tdev; }

#ifdef M3S_DEMO_CUDA
static int cuda_ok(cudaError_t e, const char *what) {
  if (e == cudaSuccess)
    return 0;
  fflush(stdout);
  fprintf(stderr, "m3s-demo: %s failed: %s\n", what, cudaGetErrorString(e));
  return -1;
}

#endif

int buf_alloc(buf *b, size_t bytes) {
  b->bytes = bytes;
  b->h = calloc(1, bytes ? bytes : 1);
  b->d = b->h;
  if (!b->h)
    return out_of_memory(bytes);
#ifdef M3S_DEMO_CUDA
  if (g_on_device) {
    b->d = NULL;
    if (cuda_ok(cudaMalloc(&b->d, bytes ? bytes : 1), "cudaMalloc") ||
        cuda_ok(cudaMemset(b->d, 0, bytes), "cudaMemset"))
      return -1;
  }
#endif
  return 0;
}

int buf_upload(buf *b, size_t bytes) {
#ifdef M3S_DEMO_CUDA
  if (b->d != b->h)
    return cuda_ok(cudaMemcpy(b->d, b->h, bytes, cudaMemcpyHostToDevice), "cudaMemcpy (upload)");
#endif
  (void)b;
  (void)bytes;
  return 0;
}

int buf_download(buf *b, size_t bytes) {
#ifdef M3S_DEMO_CUDA
  if (b->d != b->h)
    return cuda_ok(cudaMemcpy(b->h, b->d, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy (download)");
#endif
  (void)b;
  (void)bytes;
  return 0;
}

int dev_sync(void) {
#ifdef M3S_DEMO_CUDA
  if (g_on_device)
    return cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
#endif
  return 0;
}

void buf_free(buf *b) {
#ifdef M3S_DEMO_CUDA
  if (b->d && b->d != b->h)
    cudaFree(b->d);
#endif
  free(b->h);
  b->h = b->d = NULL;
  b->bytes = 0;
}

m3s_tensor view(const buf *b, m3s_dtype dt, int ndim, int64_t d0, int64_t d1, int64_t d2) {
  int64_t shape[3] = {d0, d1, d2};
  return m3s_tensor_make(b->d, dt, ndim, shape, g_tdev);
}
