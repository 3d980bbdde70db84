/* Several host threads calling into ONE CUDA context at once.
 *
 * The header's threading rule (run operations only read the context; the
 * error text is per thread; calls in flight at once need their own outputs,
 * workspace and, on CUDA, the context's device current) held to on the CUDA
 * backend, as tests/test_threads.c holds it on the CPU backend. NTHREADS
 * threads share one CUDA context; each owns a fixture (TP1/2/4/8, bf16 and
 * e4m3 caches, both cache orders), its device buffers, its workspace and its
 * own non-blocking stream, and runs index top-k, sparse attention and the
 * k2q chain (CSR, k2q partials, combine) 4 times (2 in quick mode) on that stream, with
 * every output poisoned on the stream first. Each run's outputs must equal,
 * byte for byte, the ones the main thread computed alone beforehand; that
 * lone run is itself checked against the CPU backend (top-k exactly,
 * attention and the combined k2q output by relative L2). One more thread
 * keeps making invalid calls on the CUDA context until the others are done
 * and must always read its own error text. The guard zones of every device
 * buffer are checked after the threads are joined.
 *
 * Device memory is allocated and freed only on the main thread (the guard
 * table of gpu_util.c is not thread-safe); the workers only launch, copy
 * on their stream and synchronise it. Workers never call CHECK: each records
 * its findings in its own slot and the main thread checks them. Not covered
 * here: inserts, merge and m3s_step_forward. */
#include "gpu_util.h"

#include <cuda_runtime_api.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NTHREADS 4

static m3s_context *g_gpu, *g_cpu;
static int g_iters = 4;           /* runs per thread; 2 under M3S_TEST_QUICK (sanitizer runs) */
static atomic_int g_go;           /* all threads start together */
static atomic_int g_workers_done; /* the invalid caller keeps going until then */

/* Device outputs of one job: the fixture's top-k, out and lse (in gpu_fx),
 * then the k2q chain's CSR, partials and combined out / lse. */
enum { NOUT = 11 };

typedef struct {
  fixture f;
  gpu_fx g;
  cudaStream_t stream;
  m3s_exec exec;
  m3s_tensor rp, qi, qs, qc, po, pl, kout, klse; /* device views */
  void *dev[NOUT];
  size_t bytes[NOUT];
  char *want, *got; /* outputs concatenated: the lone run's, this run's */
  size_t all_b;
  /* written by the worker thread, read after the join */
  int runs_ok, bits_equal, error_text_empty;
} job;

typedef struct {
  fixture f; /* a valid decode fixture and its device copy; out gets a bad dtype */
  gpu_fx g;
  int calls, rejected, own_text;
} bad_job;

static m3s_tensor dev_tensor(job *j, int k, m3s_dtype dt, int nd, const int64_t *shape) {
  m3s_tensor t = m3s_tensor_make(NULL, dt, nd, shape, 0);
  j->bytes[k] = (size_t)shape_elems(nd, shape) * m3s_dtype_size(dt);
  t.data = j->dev[k] = gpu_dup(NULL, j->bytes[k]);
  return t;
}

static size_t view_bytes(const m3s_tensor *t) {
  return (size_t)shape_elems(t->ndim, t->shape) * m3s_dtype_size(t->dtype);
}

/* Device copies, the k2q buffers (slots 3..10) and the job's stream. */
static int job_alloc(job *j) {
  fixture *f = &j->f;
  k2q_shapes s;
  if (!gpu_fx_upload(&j->g, f, g_gpu) || !fx_k2q_shapes(g_cpu, f, &s))
    return 0;
  if (cudaStreamCreateWithFlags(&j->stream, cudaStreamNonBlocking) != cudaSuccess)
    return 0;
  j->exec = j->g.exec;
  j->exec.stream = j->stream;
  j->dev[0] = j->g.topk, j->bytes[0] = view_bytes(&j->g.topk_t);
  j->dev[1] = j->g.out, j->bytes[1] = view_bytes(&j->g.out_t);
  j->dev[2] = j->g.lse, j->bytes[2] = view_bytes(&j->g.lse_t);
  j->rp = dev_tensor(j, 3, M3S_I32, 2, s.row_ptr);
  j->qi = dev_tensor(j, 4, M3S_I32, 2, s.q_idx);
  j->qs = dev_tensor(j, 5, M3S_I32, 2, s.q_idx);
  j->qc = dev_tensor(j, 6, M3S_I32, 2, s.q_cnt);
  j->po = dev_tensor(j, 7, M3S_F32, 4, s.part_out);
  j->pl = dev_tensor(j, 8, M3S_F32, 3, s.part_lse);
  j->kout = dev_tensor(j, 9, f->out.dtype, f->out.ndim, f->out.shape);
  j->klse = dev_tensor(j, 10, f->lse.dtype, f->lse.ndim, f->lse.shape);
  j->all_b = 0;
  for (int k = 0; k < NOUT; k++) {
    if (!j->dev[k])
      return 0;
    j->all_b += j->bytes[k];
  }
  j->want = malloc(j->all_b);
  j->got = malloc(j->all_b);
  /* gpu_dup copies on the legacy stream, which the job's non-blocking
   * stream does not wait for: finish the uploads first */
  return j->want && j->got && gpu_sync();
}

static void job_free(job *j) {
  for (int k = 3; k < NOUT; k++)
    gpu_free(j->dev[k]);
  gpu_fx_free(&j->g);
  if (j->stream)
    cudaStreamDestroy(j->stream);
  free(j->want);
  free(j->got);
  fx_free(&j->f);
}

/* On the job's stream: poison every output, run top-k, attention and the
 * k2q chain, copy every output into dst and wait for the stream. */
static int run_once(job *j, char *dst) {
  fixture *f = &j->f;
  gpu_fx *g = &j->g;
  const m3s_exec *e = &j->exec;
  int ok = 1;
  for (int k = 0; k < NOUT; k++)
    ok &= cudaMemsetAsync(j->dev[k], 0xA5, j->bytes[k], j->stream) == cudaSuccess;
  ok = ok && m3s_index_topk(g_gpu, &f->cfg, &g->batch, &g->iq_t, &g->ic_t, &g->topk_t, e) == M3S_OK;
  ok = ok && m3s_sparse_attention(g_gpu, &f->cfg, &g->batch, &g->q_t, &g->kv_t, &g->scales,
                                  &g->topk_t, &g->out_t, &g->lse_t, e) == M3S_OK;
  ok = ok && m3s_build_k2q_csr(g_gpu, &f->cfg, &g->batch, &g->topk_t, &j->rp, &j->qi, &j->qs,
                               &j->qc, e) == M3S_OK;
  ok = ok && m3s_k2q_attention(g_gpu, &f->cfg, &g->batch, &g->q_t, &g->kv_t, &g->scales, &j->rp,
                               &j->qi, &j->qs, &j->po, &j->pl, e) == M3S_OK;
  ok = ok && m3s_combine_partials(g_gpu, &f->cfg, &j->po, &j->pl, &j->qc, &j->kout, &j->klse, e) ==
                 M3S_OK;
  for (int k = 0; ok && k < NOUT; k++) {
    ok = cudaMemcpyAsync(dst, j->dev[k], j->bytes[k], cudaMemcpyDeviceToHost, j->stream) ==
         cudaSuccess;
    dst += j->bytes[k];
  }
  return cudaStreamSynchronize(j->stream) == cudaSuccess && ok;
}

/* Largest |a - b| over n lse values; infinite when one side is infinite or
 * NaN and the other is not the same value (padded rows hold -inf). */
static double lse_diff(const float *a, const float *b, int64_t n) {
  double worst = 0;
  for (int64_t i = 0; i < n; i++) {
    if (isinf(a[i]) || isinf(b[i]) || isnan(a[i]) || isnan(b[i])) {
      if (!(a[i] == b[i]))
        return INFINITY;
      continue;
    }
    double d = fabs((double)a[i] - (double)b[i]);
    worst = d > worst ? d : worst;
  }
  return worst;
}

/* The lone run against the CPU backend on the same fixture: top-k and the
 * k2q CSR (row_ptr, q_indices, q_slots, q_counts) byte for byte; direct
 * attention and the combined k2q output within rel L2 1e-2, their lse within
 * 1e-3. Output slots in want: 0 top-k, 1 out, 2 lse, 3-6 CSR, 9 k2q out,
 * 10 k2q lse. */
static void check_lone_run_vs_cpu(job *j, int i) {
  fixture *f = &j->f;
  char what[128];
  k2q_shapes sh;
  fx_poison(f);
  int ok = m3s_index_topk(g_cpu, &f->cfg, &f->batch, &f->iq, &f->ic, &f->topk, NULL) == M3S_OK &&
           m3s_sparse_attention(g_cpu, &f->cfg, &f->batch, &f->q, &f->kv, &f->scales, &f->topk,
                                &f->out, &f->lse, NULL) == M3S_OK &&
           fx_k2q_shapes(g_cpu, f, &sh);
  snprintf(what, sizeof what, "job %d: CPU top-k and attention run", i);
  if (!CHECK(ok, what))
    return;
  size_t at[NOUT + 1] = {0};
  for (int k = 0; k < NOUT; k++)
    at[k + 1] = at[k] + j->bytes[k];
  const char *w = j->want;
  /* CSR on the CPU from the CPU's top-k (== the GPU's, checked first) */
  char *csr = malloc(at[7] - at[3] + 1);
  if (!CHECK(csr != NULL, "host CSR buffer"))
    return;
  memset(csr, 0xA5, at[7] - at[3]); /* the GPU run's poison: tails past row_ptr[g][R] stay */
  m3s_tensor t[4];
  const int64_t *shapes[4] = {sh.row_ptr, sh.q_idx, sh.q_idx, sh.q_cnt};
  for (int k = 0; k < 4; k++)
    t[k] = m3s_tensor_make(csr + (at[3 + k] - at[3]), M3S_I32, 2, shapes[k], M3S_HOST);
  int csr_ok = m3s_build_k2q_csr(g_cpu, &f->cfg, &f->batch, &f->topk, &t[0], &t[1], &t[2], &t[3],
                                 NULL) == M3S_OK;
  snprintf(what, sizeof what, "job %d: lone CUDA top-k equals the CPU's", i);
  CHECK(memcmp(w, f->topk_mem, j->bytes[0]) == 0, what);
  snprintf(what, sizeof what, "job %d: lone CUDA k2q CSR equals the CPU's", i);
  CHECK(csr_ok && memcmp(w + at[3], csr, at[7] - at[3]) == 0, what);
  free(csr);
  int64_t n_out = (int64_t)(j->bytes[1] / m3s_dtype_size(f->out.dtype));
  int64_t n_lse = (int64_t)(j->bytes[2] / sizeof(float));
  double e_out = rel_l2(w + at[1], f->out.dtype, f->out_mem, f->out.dtype, n_out);
  double e_k2q = rel_l2(w + at[9], f->out.dtype, f->out_mem, f->out.dtype, n_out);
  float *lse = malloc(2 * j->bytes[2] + 8);
  memcpy(lse, w + at[2], j->bytes[2]);
  memcpy(lse + n_lse, w + at[10], j->bytes[2]);
  double d_lse = lse_diff(lse, f->lse_mem, n_lse),
         d_klse = lse_diff(lse + n_lse, f->lse_mem, n_lse);
  free(lse);
  snprintf(what, sizeof what, "job %d: attention rel L2 %.2e, k2q %.2e; lse %.1e / %.1e vs the CPU",
           i, e_out, e_k2q, d_lse, d_klse);
  CHECK(e_out < 1e-2 && e_k2q < 1e-2 && d_lse < 1e-3 && d_klse < 1e-3, what);
  printf("  job %d  Hq %2d Hkv %d  T %3d  %s %s  vs the CPU: rel L2 attention %.2e, k2q %.2e; "
         "max |lse diff| %.1e, %.1e\n",
         i, f->cfg.num_q_heads, f->cfg.num_kv_heads, f->T,
         f->sp.kv_dtype == M3S_E4M3 ? "e4m3" : "bf16",
         f->sp.token_major ? "token-major" : "head-major", e_out, e_k2q, d_lse, d_klse);
}

static void *worker(void *arg) {
  job *j = arg;
  if (cudaSetDevice(0) != cudaSuccess)
    return NULL;
  while (!atomic_load(&g_go))
    sched_yield();
  for (int i = 0; i < g_iters; i++) {
    int ok = run_once(j, j->got);
    j->runs_ok += ok;
    j->error_text_empty += ok && m3s_last_error()[0] == '\0';
    j->bits_equal += ok && memcmp(j->got, j->want, j->all_b) == 0;
  }
  return NULL;
}

/* Attention on the CUDA context whose output has the wrong dtype (every
 * other operand a valid device view): must fail, naming 'out'. Validation
 * rejects it before any launch. */
static void *bad_worker(void *arg) {
  bad_job *b = arg;
  if (cudaSetDevice(0) != cudaSuccess)
    return NULL;
  m3s_tensor out = b->g.out_t;
  out.dtype = M3S_I32;
  while (!atomic_load(&g_go))
    sched_yield();
  for (int i = 0; i < g_iters * 50 || !atomic_load(&g_workers_done); i++) {
    m3s_status st = m3s_sparse_attention(g_gpu, &b->f.cfg, &b->g.batch, &b->g.q_t, &b->g.kv_t,
                                         &b->g.scales, &b->g.topk_t, &out, &b->g.lse_t, &b->g.exec);
    b->calls++;
    b->rejected += st != M3S_OK;
    b->own_text += st != M3S_OK && strstr(m3s_last_error(), "'out'") != NULL &&
                   strstr(m3s_last_error(), "m3s_sparse_attention") != NULL;
  }
  return NULL;
}

int main(void) {
  if (gpu_env_flag("M3S_TEST_QUICK"))
    g_iters = 2;
  g_gpu = gpu_context_or_null();
  if (!g_gpu)
    return gpu_skip("test_gpu_threads", "no CUDA device");
  if (m3s_context_create(-1, &g_cpu) != M3S_OK) {
    fprintf(stderr, "cpu context: %s\n", m3s_last_error());
    m3s_context_destroy(g_gpu);
    return 1;
  }
  static const int tp[NTHREADS] = {1, 2, 4, 8};
  static const int32_t ql[NTHREADS][3] = {{1, 40, 2}, {3, 1, 70}, {1, 1, 1}, {130, 1, 4}};
  static const int32_t sl[NTHREADS][3] = {
      {2100, 300, 900}, {500, 2600, 1000}, {3000, 129, 1700}, {1200, 4000, 700}};
  job jobs[NTHREADS];
  memset(jobs, 0, sizeof jobs);
  /* Phase 1: the lone answers, checked against the CPU */
  int ready = 1;
  for (int i = 0; i < NTHREADS; i++) {
    job *j = &jobs[i];
    fx_spec s = fx_spec_default(m3s_config_minimax_m3(tp[i]), 3, ql[i], sl[i], 5100 + i);
    s.kv_dtype = i == 2 ? M3S_E4M3 : M3S_BF16;
    s.scale_mode = i == 2 ? 2 : 0;
    s.token_major = i & 1;
    fx_init(&j->f, &s);
    ready &= CHECK(job_alloc(j), "device buffers and stream");
    ready = ready && CHECK(run_once(j, j->want), "lone run");
    if (!ready)
      fprintf(stderr, "job %d: %s\n", i, m3s_last_error());
    if (ready)
      check_lone_run_vs_cpu(j, i);
  }
  /* Phase 2: all at once (released together), plus the thread of invalid calls */
  static bad_job bad;
  int32_t bad_ql[] = {1}, bad_sl[] = {300};
  fx_spec bs = fx_spec_default(m3s_config_minimax_m3(8), 1, bad_ql, bad_sl, 77);
  fx_init(&bad.f, &bs);
  ready = ready && CHECK(gpu_fx_upload(&bad.g, &bad.f, g_gpu) && gpu_sync(),
                         "invalid caller's device buffers");
  pthread_t th[NTHREADS + 1];
  int made[NTHREADS + 1] = {0};
  for (int i = 0; ready && i < NTHREADS; i++)
    made[i] = CHECK(pthread_create(&th[i], NULL, worker, &jobs[i]) == 0, "pthread_create");
  made[NTHREADS] =
      ready && CHECK(pthread_create(&th[NTHREADS], NULL, bad_worker, &bad) == 0, "pthread_create");
  atomic_store(&g_go, 1);
  for (int i = 0; i < NTHREADS; i++)
    if (made[i])
      pthread_join(th[i], NULL);
  atomic_store(&g_workers_done, 1);
  if (made[NTHREADS])
    pthread_join(th[NTHREADS], NULL);
  /* Phase 3: what each thread saw, and the guard zones */
  for (int i = 0; ready && i < NTHREADS; i++) {
    char what[96];
    snprintf(what, sizeof what, "thread %d (TP%d): %d of %d runs", i, tp[i], jobs[i].runs_ok,
             g_iters);
    CHECK(jobs[i].runs_ok == g_iters, what);
    CHECK(jobs[i].bits_equal == g_iters, "concurrent outputs byte-identical to the lone run");
    CHECK(jobs[i].error_text_empty == g_iters, "error text empty after each valid call");
  }
  if (ready) {
    char what[96];
    printf("  %d threads x %d runs on their own streams; %d invalid calls alongside\n", NTHREADS,
           g_iters, bad.calls);
    snprintf(what, sizeof what, "%d invalid calls, %d rejected", bad.calls, bad.rejected);
    CHECK(bad.calls >= g_iters * 50 && bad.rejected == bad.calls, what);
    CHECK(bad.own_text == bad.calls, "the invalid caller always reads its own error text");
  }
  CHECK(gpu_sync() && gpu_guards_check(), "device synchronised, guard zones intact");
  for (int i = 0; i < NTHREADS; i++)
    job_free(&jobs[i]);
  gpu_fx_free(&bad.g);
  fx_free(&bad.f);
  m3s_context_destroy(g_cpu);
  m3s_context_destroy(g_gpu);
  return TEST_FINISH();
}
