/* Several threads calling into ONE context at once (CPU backend).
 *
 * The header promises that run operations and queries only read the context,
 * and that the error text is per thread. This test holds the library to it:
 * NTHREADS threads share one CPU context; each runs index top-k, sparse
 * attention and the k2q chain (CSR, k2q partials, combine) on its own fixture
 * (different TP shapes, batches, cache dtypes and orders, seeds), ITERS times,
 * and must reproduce, bit for bit, every output the main thread computed
 * alone beforehand. One more thread keeps making invalid calls until the
 * others are done and must always see its own error text, while every valid
 * call on the other threads must end with an empty error text (with a
 * process-wide error buffer instead of a thread-local one this test fails).
 * Each calling thread starts its own OpenMP team inside the CPU backend, so
 * the backend's parallel regions run concurrently too. Not covered here:
 * inserts, merge and m3s_step_forward (the same read-only context; no
 * per-call state beyond the thread-local error text and conversion tiles).
 *
 * Threads never call CHECK (its counters are not atomic): each records its
 * findings in its own slot, and the main thread checks them after joining.
 * Built into the ThreadSanitizer build as well (docs/reliability.md). */
#include "ref.h"
#include "thread_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NTHREADS 4
#define ITERS 3

static m3s_context *g_ctx;

/* The outputs one job writes: the fixture's top-k, out and lse, and the k2q
 * chain's CSR, partials and combined out / lse (its own buffers). */
enum { NBUF = 11 };

typedef struct {
  fixture f;
  m3s_tensor k2q[K2Q_NBUF], kout, klse;
  void *mem[NBUF];
  size_t bytes[NBUF];
  char *want, *got; /* outputs concatenated: the lone run's, this run's */
  size_t all_b;
  run_tally tally; /* written by the worker thread, read after the join */
} job;

/* Host buffer k of the job for view t (its data pointer set). */
static m3s_tensor host_buffer(job *j, int k, m3s_tensor t) {
  j->bytes[k] = tensor_bytes(&t);
  t.data = j->mem[k] = malloc(j->bytes[k] ? j->bytes[k] : 1);
  return t;
}

/* Buffers 3..10: the k2q chain's outputs ([0..2] are the fixture's). */
static int job_alloc(job *j) {
  fixture *f = &j->f;
  k2q_shapes s;
  if (!fx_k2q_shapes(g_ctx, f, &s))
    return 0;
  j->mem[0] = f->topk_mem, j->bytes[0] = tensor_bytes(&f->topk);
  j->mem[1] = f->out_mem, j->bytes[1] = tensor_bytes(&f->out);
  j->mem[2] = f->lse_mem, j->bytes[2] = tensor_bytes(&f->lse);
  for (int i = 0; i < K2Q_NBUF; i++)
    j->k2q[i] = host_buffer(j, 3 + i, fx_k2q_view(&s, i, NULL, M3S_HOST));
  j->kout = host_buffer(j, 9, f->out);
  j->klse = host_buffer(j, 10, f->lse);
  j->all_b = 0;
  for (int k = 0; k < NBUF; k++)
    j->all_b += j->bytes[k];
  j->want = malloc(j->all_b);
  j->got = malloc(j->all_b);
  return j->want && j->got;
}

static void job_free(job *j) {
  for (int k = 3; k < NBUF; k++)
    free(j->mem[k]);
  free(j->want);
  free(j->got);
  fx_free(&j->f);
}

/* Poison every output, then top-k, attention and the k2q chain. */
static int run_once(job *j) {
  fixture *f = &j->f;
  fx_poison(f);
  for (int k = 3; k < NBUF; k++)
    memset(j->mem[k], 0xA5, j->bytes[k]);
  return fx_run_chain(g_ctx, f, j->k2q, &j->kout, &j->klse, NULL);
}

/* Every output of the job, concatenated into dst (all_b bytes). */
static void snapshot(const job *j, char *dst) {
  for (int k = 0; k < NBUF; k++) {
    memcpy(dst, j->mem[k], j->bytes[k]);
    dst += j->bytes[k];
  }
}

static void *worker(void *arg) {
  job *j = arg;
  thr_wait_go();
  for (int i = 0; i < ITERS; i++) {
    int ok = run_once(j);
    if (ok)
      snapshot(j, j->got);
    tally_run(&j->tally, ok, j->got, j->want, j->all_b);
  }
  return NULL;
}

/* Attention whose output has the wrong dtype: must fail, naming 'out'. */
static void *bad_worker(void *arg) {
  invalid_tally *b = arg;
  int32_t ql[] = {1}, sl[] = {300};
  fixture f;
  fx_spec s = fx_spec_default(m3s_config_minimax_m3(8), 1, ql, sl, 77);
  fx_init(&f, &s);
  m3s_tensor out = f.out;
  out.dtype = M3S_I32;
  thr_wait_go();
  for (int i = 0; i < ITERS * 20 || thr_workers_running(); i++)
    tally_invalid(b,
                  m3s_sparse_attention(g_ctx, &f.cfg, &f.batch, &f.q, &f.kv, &f.scales, &f.topk,
                                       &out, &f.lse, NULL),
                  "m3s_sparse_attention", "'out'");
  fx_free(&f);
  return NULL;
}

int main(void) {
  if (m3s_context_create(-1, &g_ctx) != M3S_OK) {
    fprintf(stderr, "cpu context: %s\n", m3s_last_error());
    return 1;
  }
  static const int tp[NTHREADS] = {1, 2, 4, 8};
  static const int32_t ql[NTHREADS][3] = {{1, 40, 2}, {3, 1, 70}, {1, 1, 1}, {130, 1, 4}};
  static const int32_t sl[NTHREADS][3] = {
      {2100, 300, 900}, {500, 2600, 1000}, {3000, 129, 1700}, {1200, 4000, 700}};
  job jobs[NTHREADS];
  memset(jobs, 0, sizeof jobs);
  /* Phase 1: the single-threaded answers */
  int ready = 1;
  for (int i = 0; i < NTHREADS; i++) {
    job *j = &jobs[i];
    fx_spec s = fx_spec_default(m3s_config_minimax_m3(tp[i]), 3, ql[i], sl[i], 4100 + i);
    s.kv_dtype = i == 2 ? M3S_E4M3 : M3S_BF16;
    s.scale_mode = i == 2 ? 2 : 0;
    s.token_major = i & 1;
    fx_init(&j->f, &s);
    ready &= CHECK(job_alloc(j), "k2q buffers");
    ready = ready && CHECK(run_once(j), "single-threaded run");
    if (ready)
      snapshot(j, j->want);
  }
  /* Phase 2: all at once (released together), plus the thread of invalid calls */
  invalid_tally bad = {0, 0, 0};
  ready = ready && thr_run_all(worker, jobs, sizeof jobs[0], NTHREADS, bad_worker, &bad);
  /* Phase 3: what each thread saw */
  for (int i = 0; ready && i < NTHREADS; i++) {
    char label[16];
    snprintf(label, sizeof label, "TP%d", tp[i]);
    thr_check_run(&jobs[i].tally, i, label, ITERS);
  }
  if (ready)
    thr_check_invalid(&bad, ITERS * 20);
  for (int i = 0; i < NTHREADS; i++)
    job_free(&jobs[i]);
  m3s_context_destroy(g_ctx);
  return TEST_FINISH();
}
