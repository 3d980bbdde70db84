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

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NTHREADS 4
#define ITERS 3

static m3s_context *g_ctx;
static atomic_int g_go;           /* all threads start together */
static atomic_int g_workers_done; /* the invalid caller keeps going until then */

/* The outputs one job writes: the fixture's top-k, out and lse, and the k2q
 * chain's CSR, partials and combined out / lse (its own buffers). */
enum { NBUF = 11 };

typedef struct {
  fixture f;
  m3s_tensor rp, qi, qs, qc, po, pl, kout, klse;
  void *mem[NBUF];
  size_t bytes[NBUF];
  char *want, *got; /* outputs concatenated: the lone run's, this run's */
  size_t all_b;
  /* written by the worker thread, read after the join */
  int runs_ok, bits_equal, error_text_empty;
} job;

typedef struct {
  int calls, rejected, own_text;
} bad_job;

static size_t tensor_bytes(const m3s_tensor *t) {
  size_t n = m3s_dtype_size(t->dtype);
  for (int i = 0; i < t->ndim; i++)
    n *= (size_t)t->shape[i];
  return n;
}

static m3s_tensor host_tensor(job *j, int k, m3s_dtype dt, int nd, const int64_t *shape) {
  m3s_tensor t = m3s_tensor_make(NULL, dt, nd, shape, M3S_HOST);
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
  j->rp = host_tensor(j, 3, M3S_I32, 2, s.row_ptr);
  j->qi = host_tensor(j, 4, M3S_I32, 2, s.q_idx);
  j->qs = host_tensor(j, 5, M3S_I32, 2, s.q_idx);
  j->qc = host_tensor(j, 6, M3S_I32, 2, s.q_cnt);
  j->po = host_tensor(j, 7, M3S_F32, 4, s.part_out);
  j->pl = host_tensor(j, 8, M3S_F32, 3, s.part_lse);
  j->kout = host_tensor(j, 9, f->out.dtype, f->out.ndim, f->out.shape);
  j->klse = host_tensor(j, 10, f->lse.dtype, f->lse.ndim, f->lse.shape);
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
  return m3s_index_topk(g_ctx, &f->cfg, &f->batch, &f->iq, &f->ic, &f->topk, NULL) == M3S_OK &&
         m3s_sparse_attention(g_ctx, &f->cfg, &f->batch, &f->q, &f->kv, &f->scales, &f->topk,
                              &f->out, &f->lse, NULL) == M3S_OK &&
         m3s_build_k2q_csr(g_ctx, &f->cfg, &f->batch, &f->topk, &j->rp, &j->qi, &j->qs, &j->qc,
                           NULL) == M3S_OK &&
         m3s_k2q_attention(g_ctx, &f->cfg, &f->batch, &f->q, &f->kv, &f->scales, &j->rp, &j->qi,
                           &j->qs, &j->po, &j->pl, NULL) == M3S_OK &&
         m3s_combine_partials(g_ctx, &f->cfg, &j->po, &j->pl, &j->qc, &j->kout, &j->klse, NULL) ==
             M3S_OK;
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
  while (!atomic_load(&g_go))
    sched_yield();
  for (int i = 0; i < ITERS; i++) {
    int ok = run_once(j);
    j->runs_ok += ok;
    j->error_text_empty += ok && m3s_last_error()[0] == '\0';
    if (ok)
      snapshot(j, j->got);
    j->bits_equal += ok && memcmp(j->got, j->want, j->all_b) == 0;
  }
  return NULL;
}

/* Attention whose output has the wrong dtype: must fail, naming 'out'. */
static void *bad_worker(void *arg) {
  bad_job *b = arg;
  int32_t ql[] = {1}, sl[] = {300};
  fixture f;
  fx_spec s = fx_spec_default(m3s_config_minimax_m3(8), 1, ql, sl, 77);
  fx_init(&f, &s);
  while (!atomic_load(&g_go))
    sched_yield();
  m3s_tensor out = f.out;
  out.dtype = M3S_I32;
  for (int i = 0; i < ITERS * 20 || !atomic_load(&g_workers_done); i++) {
    m3s_status st = m3s_sparse_attention(g_ctx, &f.cfg, &f.batch, &f.q, &f.kv, &f.scales, &f.topk,
                                         &out, &f.lse, NULL);
    b->calls++;
    b->rejected += st != M3S_OK;
    b->own_text += st != M3S_OK && strstr(m3s_last_error(), "out") != NULL &&
                   strstr(m3s_last_error(), "m3s_sparse_attention") != NULL;
  }
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
  bad_job bad = {0, 0, 0};
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
  /* Phase 3: what each thread saw */
  for (int i = 0; ready && i < NTHREADS; i++) {
    char what[96];
    snprintf(what, sizeof what, "thread %d (TP%d): %d of %d runs", i, tp[i], jobs[i].runs_ok,
             ITERS);
    CHECK(jobs[i].runs_ok == ITERS, what);
    CHECK(jobs[i].bits_equal == ITERS, "concurrent outputs bit-identical to the lone run");
    CHECK(jobs[i].error_text_empty == ITERS, "error text empty after each valid call");
  }
  if (ready) {
    char what[96];
    snprintf(what, sizeof what, "%d invalid calls, %d rejected", bad.calls, bad.rejected);
    CHECK(bad.calls >= ITERS * 20 && bad.rejected == bad.calls, what);
    CHECK(bad.own_text == bad.calls, "the invalid caller always reads its own error text");
  }
  for (int i = 0; i < NTHREADS; i++)
    job_free(&jobs[i]);
  m3s_context_destroy(g_ctx);
  return TEST_FINISH();
}
