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

/* One run of a ceiling's operation (the i-th, warm-ups included) enqueued
 * on B->stream; 1 when it was. */
typedef int (*ceil_op)(bench *B, void *ctx, int i);

/* Median seconds of CEIL_REPS event-timed runs of op after 3 untimed
 * ones; 0 on any failure (reported). */
static double median_time(bench *B, ceil_op op, void *ctx, const char *what) {
  cudaEvent_t ev[2 * CEIL_REPS] = {0};
  double t[CEIL_REPS], s = 0;
  int ok = 1;
  for (int i = 0; ok && i < 2 * CEIL_REPS; i++)
    ok = cuda_ok(cudaEventCreate(&ev[i]), "cudaEventCreate");
  for (int i = 0; ok && i < 3 + CEIL_REPS; i++) {
    int timed = i >= 3, k = i - 3;
    if (timed)
      ok = cuda_ok(cudaEventRecord(ev[2 * k], B->stream), "cudaEventRecord");
    ok = ok && op(B, ctx, i);
    if (ok && timed)
      ok = cuda_ok(cudaEventRecord(ev[2 * k + 1], B->stream), "cudaEventRecord");
  }
  ok = ok && cuda_ok(cudaStreamSynchronize(B->stream), what);
  for (int i = 0; ok && i < CEIL_REPS; i++) {
    float ms = 0;
    ok = cuda_ok(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]), "cudaEventElapsedTime");
    t[i] = ms * 1e-3;
  }
  if (ok)
    s = median_of(t, CEIL_REPS);
  for (int i = 0; i < 2 * CEIL_REPS; i++)
    if (ev[i])
      cudaEventDestroy(ev[i]);
  return s;
}

/* Bytes per buffer for `count` buffers beyond L2 that leave 1 GiB free:
 * 2 GiB halved down to at least `floor`; 0 when the query fails. */
static size_t buffer_bytes(size_t count, size_t floor) {
  size_t freeb = 0, total = 0;
  if (!cuda_ok(cudaMemGetInfo(&freeb, &total), "cudaMemGetInfo"))
    return 0;
  size_t n = (size_t)2 << 30;
  while (n > floor && count * n + ((size_t)1 << 30) > freeb)
    n /= 2;
  return n;
}

typedef struct {
  void *src, *dst;
  size_t n;
} copy_ctx;

static int copy_op(bench *B, void *ctx, int i) {
  const copy_ctx *c = (const copy_ctx *)ctx;
  (void)i;
  return cuda_ok(cudaMemcpyAsync(c->dst, c->src, c->n, cudaMemcpyDeviceToDevice, B->stream),
                 "copy");
}

/* HBM copy: read + write bytes over the median time of a large D2D copy. */
double measure_copy(bench *B) {
  copy_ctx c = {NULL, NULL, buffer_bytes(2, (size_t)64 << 20)};
  double s = 0, gbps = 0;
  if (c.n && cuda_ok(cudaMalloc(&c.src, c.n), "cudaMalloc (copy src)") &&
      cuda_ok(cudaMalloc(&c.dst, c.n), "cudaMalloc (copy dst)") &&
      cuda_ok((cudaError_t)m3sb_fill_bf16(c.src, c.n / 2, 77, 1.0f, B->stream), "fill") &&
      cuda_ok((cudaError_t)m3sb_fill_bf16(c.dst, c.n / 2, 78, 1.0f, B->stream), "fill"))
    s = median_time(B, copy_op, &c, "copy sync");
  cudaFree(c.src);
  cudaFree(c.dst);
  if (s > 0) {
    gbps = 2.0 * (double)c.n / s / 1e9;
    printf("ceiling: HBM copy %.0f GB/s (cudaMemcpy D2D of %.2f GiB, read+write, median of %d)\n",
           gbps, (double)c.n / GIB, CEIL_REPS);
  }
  return gbps;
}

/* Random page reads: GATHER_PAGES pages of 64 KiB (512 MiB, the bytes of
 * decode attention at 128 requests x 4 KV heads x 16 blocks) at hashed
 * random indices of a pool beyond L2, read-only GB/s over the median time.
 * Decode attention reads this pattern, so this, not the sequential copy, is
 * what its kernels can reach. */
#define GATHER_PAGES 8192

typedef struct {
  void *pool, *sink;
  size_t n;
} gather_ctx;

static int gather_op(bench *B, void *ctx, int i) {
  const gather_ctx *g = (const gather_ctx *)ctx;
  return cuda_ok((cudaError_t)m3sb_gather_pages(g->pool, g->n >> 16, GATHER_PAGES, 1000 + i,
                                                 g->sink, B->stream),
                 "gather");
}

double measure_gather(bench *B) {
  gather_ctx g = {NULL, NULL, buffer_bytes(1, (size_t)256 << 20)};
  double s = 0, gbps = 0;
  if (g.n && cuda_ok(cudaMalloc(&g.pool, g.n), "cudaMalloc (gather pool)") &&
      cuda_ok(cudaMalloc(&g.sink, 16), "cudaMalloc (gather sink)") &&
      cuda_ok((cudaError_t)m3sb_fill_bf16(g.pool, g.n / 2, 79, 1.0f, B->stream), "fill"))
    s = median_time(B, gather_op, &g, "gather sync");
  cudaFree(g.pool);
  cudaFree(g.sink);
  if (s > 0) {
    gbps = (double)GATHER_PAGES * 65536.0 / s / 1e9;
    printf("ceiling: random 64 KiB page reads %.0f GB/s (read only, %d pages of a %.2f GiB pool, "
           "median of %d)\n",
           gbps, GATHER_PAGES, (double)g.n / GIB, CEIL_REPS);
  }
  return gbps;
}

typedef struct {
  cublasHandle_t h;
  void *a, *b, *c;
  int n;
} gemm_ctx;

static int gemm_op(bench *B, void *ctx, int i) {
  const gemm_ctx *m = (const gemm_ctx *)ctx;
  const float alpha = 1.0f, beta = 0.0f;
  (void)B, (void)i;
  return cublas_ok(cublasGemmEx(m->h, CUBLAS_OP_N, CUBLAS_OP_N, m->n, m->n, m->n, &alpha, m->a,
                                CUDA_R_16BF, m->n, m->b, CUDA_R_16BF, m->n, &beta, m->c,
                                CUDA_R_16BF, m->n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                   "cublasGemmEx");
}

/* bf16 GEMM: cublasGemmEx n^3, bf16 in/out, fp32 compute, median. */
double measure_gemm(bench *B) {
  gemm_ctx m = {NULL, NULL, NULL, NULL, B->o.gemm_n};
  size_t bytes = (size_t)m.n * m.n * 2;
  double s = 0, tf = 0;
  if (cuda_ok(cudaMalloc(&m.a, bytes), "cudaMalloc (gemm A)") &&
      cuda_ok(cudaMalloc(&m.b, bytes), "cudaMalloc (gemm B)") &&
      cuda_ok(cudaMalloc(&m.c, bytes), "cudaMalloc (gemm C)") &&
      cuda_ok((cudaError_t)m3sb_fill_bf16(m.a, bytes / 2, 91, 1.0f, B->stream), "fill") &&
      cuda_ok((cudaError_t)m3sb_fill_bf16(m.b, bytes / 2, 92, 1.0f, B->stream), "fill") &&
      cuda_ok((cudaError_t)m3sb_fill_bf16(m.c, bytes / 2, 93, 1.0f, B->stream), "fill") &&
      cublas_ok(cublasCreate(&m.h), "cublasCreate") &&
      cublas_ok(cublasSetStream(m.h, B->stream), "cublasSetStream"))
    s = median_time(B, gemm_op, &m, "gemm sync");
  if (m.h)
    cublasDestroy(m.h);
  cudaFree(m.a);
  cudaFree(m.b);
  cudaFree(m.c);
  if (s > 0) {
    tf = 2.0 * (double)m.n * m.n * m.n / s / 1e12;
    printf("ceiling: bf16 GEMM %.0f TFLOP/s (cublasGemmEx %d^3, fp32 compute, median of %d)\n", tf,
           m.n, CEIL_REPS);
  }
  return tf;
}

/* Launch floor: a CUDA graph of n empty kernels (n = 1, 2, 4), replayed
 * LAUNCH_REPS times back to back between two events (a 2 ms spin first, so
 * that the host has enqueued them all before the first event), per replay;
 * median of CEIL_REPS such batches. What a decode step of n kernels costs
 * with no work in them (issue 15: batch-1 decode within 2x of this plus its
 * bytes). */
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
