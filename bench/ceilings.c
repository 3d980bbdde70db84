/* m3s-bench: the measured ceilings: an HBM copy, random 64 KiB page reads
 * (the gather pattern of paged attention), a bf16 cuBLAS GEMM, and the
 * launch floor of a CUDA graph (empty kernels). */
#include "bench.h"

static int cublas_ok(cublasStatus_t s, const char *what) {
  if (s == CUBLAS_STATUS_SUCCESS)
    return 1;
  fprintf(stderr, "m3s-bench: %s: %s\n", what, cublasGetStatusString(s));
  return 0;
}

int cuda_ok(cudaError_t e, const char *what) {
  if (e == cudaSuccess)
    return 1;
  fprintf(stderr, "m3s-bench: %s: %s\n", what, cudaGetErrorString(e));
  return 0;
}

#define CEIL_REPS 20

/* HBM copy: read + write bytes over the median time of a large D2D copy. */
double measure_copy(bench *B) {
  size_t freeb = 0, total = 0;
  if (!cuda_ok(cudaMemGetInfo(&freeb, &total), "cudaMemGetInfo"))
    return 0;
  size_t n = (size_t)2 << 30;
  while (n > ((size_t)64 << 20) && 2 * n + ((size_t)1 << 30) > freeb)
    n /= 2;
  void *src = NULL, *dst = NULL;
  cudaEvent_t ev[2 * CEIL_REPS] = {0};
  double t[CEIL_REPS], gbps = 0;
  int ok = cuda_ok(cudaMalloc(&src, n), "cudaMalloc (copy src)") &&
           cuda_ok(cudaMalloc(&dst, n), "cudaMalloc (copy dst)") &&
           cuda_ok((cudaError_t)m3sb_fill_bf16(src, n / 2, 77, 1.0f, B->stream), "fill") &&
           cuda_ok((cudaError_t)m3sb_fill_bf16(dst, n / 2, 78, 1.0f, B->stream), "fill");
  for (int i = 0; ok && i < 2 * CEIL_REPS; i++)
    ok = cuda_ok(cudaEventCreate(&ev[i]), "cudaEventCreate");
  for (int i = 0; ok && i < 3; i++)
    ok = cuda_ok(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, B->stream), "copy");
  for (int i = 0; ok && i < CEIL_REPS; i++)
    ok = cuda_ok(cudaEventRecord(ev[2 * i], B->stream), "cudaEventRecord") &&
         cuda_ok(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, B->stream), "copy") &&
         cuda_ok(cudaEventRecord(ev[2 * i + 1], B->stream), "cudaEventRecord");
  ok = ok && cuda_ok(cudaStreamSynchronize(B->stream), "copy sync");
  for (int i = 0; ok && i < CEIL_REPS; i++) {
    float ms = 0;
    ok = cuda_ok(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]), "cudaEventElapsedTime");
    t[i] = ms * 1e-3;
  }
  if (ok)
    gbps = 2.0 * (double)n / median_of(t, CEIL_REPS) / 1e9;
  for (int i = 0; i < 2 * CEIL_REPS; i++)
    if (ev[i])
      cudaEventDestroy(ev[i]);
  cudaFree(src);
  cudaFree(dst);
  if (ok)
    printf("ceiling: HBM copy %.0f GB/s (cudaMemcpy D2D of %.2f GiB, read+write, median of %d)\n",
           gbps, (double)n / GIB, CEIL_REPS);
  return gbps;
}

/* Random page reads: GATHER_PAGES pages of 64 KiB (512 MiB, the bytes of
 * decode attention at 128 requests x 4 KV heads x 16 blocks) at hashed
 * random indices of a pool beyond L2, read-only GB/s over the median time.
 * Decode attention reads this pattern, so this, not the sequential copy, is
 * what its kernels can reach. */
#define GATHER_PAGES 8192

double measure_gather(bench *B) {
  size_t freeb = 0, total = 0;
  if (!cuda_ok(cudaMemGetInfo(&freeb, &total), "cudaMemGetInfo"))
    return 0;
  size_t n = (size_t)2 << 30;
  while (n > ((size_t)256 << 20) && n + ((size_t)1 << 30) > freeb)
    n /= 2;
  void *pool = NULL, *sink = NULL;
  cudaEvent_t ev[2 * CEIL_REPS] = {0};
  double t[CEIL_REPS], gbps = 0;
  int ok = cuda_ok(cudaMalloc(&pool, n), "cudaMalloc (gather pool)") &&
           cuda_ok(cudaMalloc(&sink, 16), "cudaMalloc (gather sink)") &&
           cuda_ok((cudaError_t)m3sb_fill_bf16(pool, n / 2, 79, 1.0f, B->stream), "fill");
  const uint64_t npages = n >> 16;
  for (int i = 0; ok && i < 2 * CEIL_REPS; i++)
    ok = cuda_ok(cudaEventCreate(&ev[i]), "cudaEventCreate");
  for (int i = 0; ok && i < 3 + CEIL_REPS; i++) {
    int timed = i >= 3, k = i - 3;
    if (timed)
      ok = cuda_ok(cudaEventRecord(ev[2 * k], B->stream), "cudaEventRecord");
    ok = ok && cuda_ok((cudaError_t)m3sb_gather_pages(pool, npages, GATHER_PAGES, 1000 + i, sink,
                                                       B->stream),
                       "gather");
    if (ok && timed)
      ok = cuda_ok(cudaEventRecord(ev[2 * k + 1], B->stream), "cudaEventRecord");
  }
  ok = ok && cuda_ok(cudaStreamSynchronize(B->stream), "gather sync");
  for (int i = 0; ok && i < CEIL_REPS; i++) {
    float ms = 0;
    ok = cuda_ok(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]), "cudaEventElapsedTime");
    t[i] = ms * 1e-3;
  }
  if (ok)
    gbps = (double)GATHER_PAGES * 65536.0 / median_of(t, CEIL_REPS) / 1e9;
  for (int i = 0; i < 2 * CEIL_REPS; i++)
    if (ev[i])
      cudaEventDestroy(ev[i]);
  cudaFree(pool);
  cudaFree(sink);
  if (ok)
    printf("ceiling: random 64 KiB page reads %.0f GB/s (read only, %d pages of a %.2f GiB pool, "
           "median of %d)\n",
           gbps, GATHER_PAGES, (double)n / GIB, CEIL_REPS);
  return gbps;
}

/* bf16 GEMM: cublasGemmEx n^3, bf16 in/out, fp32 compute, median. */
double measure_gemm(bench *B) {
  int n = B->o.gemm_n;
  size_t bytes = (size_t)n * n * 2;
  void *a = NULL, *b = NULL, *c = NULL;
  cublasHandle_t h = NULL;
  cudaEvent_t ev[2 * CEIL_REPS] = {0};
  double t[CEIL_REPS], tf = 0;
  float alpha = 1.0f, beta = 0.0f;
  int ok = cuda_ok(cudaMalloc(&a, bytes), "cudaMalloc (gemm A)") &&
           cuda_ok(cudaMalloc(&b, bytes), "cudaMalloc (gemm B)") &&
           cuda_ok(cudaMalloc(&c, bytes), "cudaMalloc (gemm C)") &&
           cuda_ok((cudaError_t)m3sb_fill_bf16(a, bytes / 2, 91, 1.0f, B->stream), "fill") &&
           cuda_ok((cudaError_t)m3sb_fill_bf16(b, bytes / 2, 92, 1.0f, B->stream), "fill") &&
           cuda_ok((cudaError_t)m3sb_fill_bf16(c, bytes / 2, 93, 1.0f, B->stream), "fill") &&
           cublas_ok(cublasCreate(&h), "cublasCreate") &&
           cublas_ok(cublasSetStream(h, B->stream), "cublasSetStream");
  for (int i = 0; ok && i < 2 * CEIL_REPS; i++)
    ok = cuda_ok(cudaEventCreate(&ev[i]), "cudaEventCreate");
  for (int i = 0; ok && i < 3 + CEIL_REPS; i++) {
    int timed = i >= 3, k = i - 3;
    if (timed)
      ok = cuda_ok(cudaEventRecord(ev[2 * k], B->stream), "cudaEventRecord");
    ok = ok && cublas_ok(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a, CUDA_R_16BF,
                                      n, b, CUDA_R_16BF, n, &beta, c, CUDA_R_16BF, n,
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                         "cublasGemmEx");
    if (ok && timed)
      ok = cuda_ok(cudaEventRecord(ev[2 * k + 1], B->stream), "cudaEventRecord");
  }
  ok = ok && cuda_ok(cudaStreamSynchronize(B->stream), "gemm sync");
  for (int i = 0; ok && i < CEIL_REPS; i++) {
    float ms = 0;
    ok = cuda_ok(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]), "cudaEventElapsedTime");
    t[i] = ms * 1e-3;
  }
  if (ok)
    tf = 2.0 * (double)n * n * n / median_of(t, CEIL_REPS) / 1e12;
  for (int i = 0; i < 2 * CEIL_REPS; i++)
    if (ev[i])
      cudaEventDestroy(ev[i]);
  if (h)
    cublasDestroy(h);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  if (ok)
    printf("ceiling: bf16 GEMM %.0f TFLOP/s (cublasGemmEx %d^3, fp32 compute, median of %d)\n", tf,
           n, CEIL_REPS);
  return tf;
}

/* Launch floor: a CUDA graph of n empty kernels (n = 1, 2, 4), replayed
 * LAUNCH_REPS times back to back between two events (a 2 ms spin first, so
 * that the host has enqueued them all before the first event), per replay;
 * median of CEIL_REPS such batches. What a decode step of n kernels costs with no work
 * in them (issue 15: batch-1 decode within 2x of this plus its bytes). */
#define LAUNCH_REPS 100

static double launch_floor_of(bench *B, int n) {
  cudaGraph_t graph = NULL;
  cudaGraphExec_t exec = NULL;
  cudaEvent_t e0 = NULL, e1 = NULL;
  double t[CEIL_REPS], us = 0;
  int ok = cuda_ok(cudaStreamBeginCapture(B->stream, cudaStreamCaptureModeThreadLocal),
                   "cudaStreamBeginCapture");
  for (int i = 0; ok && i < n; i++)
    ok = cuda_ok((cudaError_t)m3sb_empty(B->stream), "empty kernel");
  cudaError_t end = cudaStreamEndCapture(B->stream, &graph);
  ok = ok && cuda_ok(end, "cudaStreamEndCapture") &&
       cuda_ok(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate") &&
       cuda_ok(cudaEventCreate(&e0), "cudaEventCreate") &&
       cuda_ok(cudaEventCreate(&e1), "cudaEventCreate");
  for (int i = 0; ok && i < 10; i++)
    ok = cuda_ok(cudaGraphLaunch(exec, B->stream), "cudaGraphLaunch");
  for (int r = 0; ok && r < CEIL_REPS; r++) {
    ok = cuda_ok(cudaStreamSynchronize(B->stream), "sync") &&
         cuda_ok((cudaError_t)m3sb_spin(2000000, B->stream), "spin") &&
         cuda_ok(cudaEventRecord(e0, B->stream), "cudaEventRecord");
    for (int i = 0; ok && i < LAUNCH_REPS; i++)
      ok = cuda_ok(cudaGraphLaunch(exec, B->stream), "cudaGraphLaunch");
    float ms = 0;
    ok = ok && cuda_ok(cudaEventRecord(e1, B->stream), "cudaEventRecord") &&
         cuda_ok(cudaEventSynchronize(e1), "cudaEventSynchronize") &&
         cuda_ok(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
    t[r] = ms * 1e3 / LAUNCH_REPS;
  }
  if (ok)
    us = median_of(t, CEIL_REPS);
  if (e0)
    cudaEventDestroy(e0);
  if (e1)
    cudaEventDestroy(e1);
  if (exec)
    cudaGraphExecDestroy(exec);
  if (graph)
    cudaGraphDestroy(graph);
  return us;
}

int measure_launch_floor(bench *B) {
  static const int ns[3] = {1, 2, 4};
  for (int i = 0; i < 3; i++)
    if ((B->launch_us[i] = launch_floor_of(B, ns[i])) <= 0)
      return 0;
  printf("ceiling: launch floor %.2f / %.2f / %.2f us per graph replay of 1 / 2 / 4 empty "
         "kernels (%d replays back to back, median of %d)\n",
         B->launch_us[0], B->launch_us[1], B->launch_us[2], LAUNCH_REPS, CEIL_REPS);
  return 1;
}
