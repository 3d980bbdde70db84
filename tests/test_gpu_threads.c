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
 * on their stream and synchronise it (tests/thread_util.h starts, joins and
 * checks the threads). Not covered here: inserts, merge and
 * m3s_step_forward. */
#include "gpu_util.h"
#include "thread_util.h"

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NTHREADS 4

static m3s_context *g_gpu, *g_cpu;
static int g_iters = 4; /* runs per thread; 2 under M3S_TEST_QUICK (sanitizer runs) */

/* Device outputs of one job: the fixture's top-k, out and lse (in gpu_fx),
 * then the k2q chain's CSR, partials and combined out / lse. */
enum { NOUT = 11 };

typedef struct {
  fixture f;
  gpu_fx g;
  fixture d; /* f's views on g's device copies */
  cudaStream_t stream;
  m3s_exec exec;
  m3s_tensor k2q[K2Q_NBUF], kout, klse; /* device views */
  void *dev[NOUT];
  size_t bytes[NOUT];
  char *want, *got; /* outputs concatenated: the lone run's, this run's */
  size_t all_b;
  run_tally tally; /* written by the worker thread, read after the join */
} job;

typedef struct {
  fixture f; /* a valid decode fixture and its device copy; out gets a bad dtype */
  gpu_fx g;
  invalid_tally tally;
} bad_job;

/* Device buffer k of the job for view t (its data pointer set). */
static m3s_tensor dev_buffer(job *j, int k, m3s_tensor t) {
  j->bytes[k] = tensor_bytes(&t);
  t.device = 0;
  t.data = j->dev[k] = gpu_dup(NULL, j->bytes[k]);
  return t;
}

/* Device copies, the k2q buffers (slots 3..10) and the job's stream. */
static int job_alloc(job *j) {
  fixture *f = &j->f;
  k2q_shapes s;
  if (!gpu_fx_upload(&j->g, f, g_gpu) || !fx_k2q_shapes(g_cpu, f, &s))
    return 0;
  if (cudaStreamCreateWithFlags(&j->stream, cudaStreamNonBlocking) != cudaSuccess)
    return 0;
  j->d = gpu_fx_views(f, &j->g);
  j->exec = j->g.exec;
  j->exec.stream = j->stream;
  j->dev[0] = j->g.topk, j->bytes[0] = tensor_bytes(&j->g.topk_t);
  j->dev[1] = j->g.out, j->bytes[1] = tensor_bytes(&j->g.out_t);
  j->dev[2] = j->g.lse, j->bytes[2] = tensor_bytes(&j->g.lse_t);
  for (int i = 0; i < K2Q_NBUF; i++)
    j->k2q[i] = dev_buffer(j, 3 + i, fx_k2q_view(&s, i, NULL, 0));
  j->kout = dev_buffer(j, 9, f->out);
  j->klse = dev_buffer(j, 10, f->lse);
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
  int ok = 1;
  for (int k = 0; k < NOUT; k++)
    ok &= cudaMemsetAsync(j->dev[k], 0xA5, j->bytes[k], j->stream) == cudaSuccess;
  ok = ok && fx_run_chain(g_gpu, &j->d, j->k2q, &j->kout, &j->klse, &j->exec);
  for (int k = 0; ok && k < NOUT; k++) {
    ok = cudaMemcpyAsync(dst, j->dev[k], j->bytes[k], cudaMemcpyDeviceToHost, j->stream) ==
         cudaSuccess;
    dst += j->bytes[k];
  }
  return cudaStreamSynchronize(j->stream) == cudaSuccess && ok;
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
  /* steps 0 and 1 of the chain: top-k, then attention into f's out / lse */
  int ok = fx_chain_step(g_cpu, f, NULL, NULL, NULL, NULL, 0) == M3S_OK &&
           fx_chain_step(g_cpu, f, NULL, NULL, NULL, NULL, 1) == M3S_OK &&
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
  m3s_tensor t[K2Q_NBUF];
  for (int k = 0; k < 4; k++)
    t[k] = fx_k2q_view(&sh, k, csr + (at[3 + k] - at[3]), M3S_HOST);
  int csr_ok = fx_chain_step(g_cpu, f, t, NULL, NULL, NULL, 2) == M3S_OK; /* the CSR step */
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
  double d_lse = lse_max_diff(lse, f->lse_mem, n_lse),
         d_klse = lse_max_diff(lse + n_lse, f->lse_mem, n_lse);
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
  thr_wait_go();
  for (int i = 0; i < g_iters; i++)
    tally_run(&j->tally, run_once(j, j->got), j->got, j->want, j->all_b);
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
  thr_wait_go();
  for (int i = 0; i < g_iters * 50 || thr_workers_running(); i++)
    tally_invalid(&b->tally,
                  m3s_sparse_attention(g_gpu, &b->f.cfg, &b->g.batch, &b->g.q_t, &b->g.kv_t,
                                       &b->g.scales, &b->g.topk_t, &out, &b->g.lse_t, &b->g.exec),
                  "m3s_sparse_attention", "'out'");
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
  ready = ready && thr_run_all(worker, jobs, sizeof jobs[0], NTHREADS, bad_worker, &bad);
  /* Phase 3: what each thread saw, and the guard zones */
  for (int i = 0; ready && i < NTHREADS; i++) {
    char label[16];
    snprintf(label, sizeof label, "TP%d", tp[i]);
    thr_check_run(&jobs[i].tally, i, label, g_iters);
  }
  if (ready) {
    printf("  %d threads x %d runs on their own streams; %d invalid calls alongside\n", NTHREADS,
           g_iters, bad.tally.calls);
    thr_check_invalid(&bad.tally, g_iters * 50);
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
