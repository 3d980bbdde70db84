/* Several threads calling into ONE context at once (CPU backend).
 *
 * The header promises that run operations and queries only read the context,
 * and that the error text is per thread. This test holds the library to it:
 * NTHREADS threads share one CPU context; each runs index top-k and sparse
 * attention on its own fixture (different TP shapes, batches and seeds),
 * ITERS times, and must reproduce, bit for bit, the outputs the main thread
 * computed alone beforehand. One more thread keeps making invalid calls until
 * the others are done and must always see its own error text, while every
 * valid call on the other threads must end with an empty error text (with a
 * process-wide error buffer instead of a thread-local one this test fails). The library's OpenMP
 * teams are nested under the callers' threads, so the CPU backend's parallel regions run
 * concurrently too.
 *
 * Threads never call CHECK (its counters are not atomic): each records its
 * findings in its own slot, and the main thread checks them after joining.
 * Built into the ThreadSanitizer build as well (docs/reliability.md). */
#include "ref.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NTHREADS 4
#define ITERS 3

static m3s_context *g_ctx;
static atomic_int g_workers_done; /* the invalid caller keeps going until then */

typedef struct {
  fixture f;
  void *want_out, *want_lse, *want_topk;
  size_t out_b, lse_b, topk_b;
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

static int run_once(fixture *f) {
  return m3s_index_topk(g_ctx, &f->cfg, &f->batch, &f->iq, &f->ic, &f->topk, NULL) == M3S_OK &&
         m3s_sparse_attention(g_ctx, &f->cfg, &f->batch, &f->q, &f->kv, &f->scales, &f->topk,
                              &f->out, &f->lse, NULL) == M3S_OK;
}

static void *worker(void *arg) {
  job *j = arg;
  for (int i = 0; i < ITERS; i++) {
    fx_poison(&j->f);
    int ok = run_once(&j->f);
    j->runs_ok += ok;
    j->error_text_empty += ok && m3s_last_error()[0] == '\0';
    j->bits_equal += ok && memcmp(j->f.out_mem, j->want_out, j->out_b) == 0 &&
                     memcmp(j->f.lse_mem, j->want_lse, j->lse_b) == 0 &&
                     memcmp(j->f.topk_mem, j->want_topk, j->topk_b) == 0;
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
    fx_poison(&j->f);
    j->out_b = tensor_bytes(&j->f.out);
    j->lse_b = tensor_bytes(&j->f.lse);
    j->topk_b = tensor_bytes(&j->f.topk);
    ready &= CHECK(run_once(&j->f), "single-threaded run");
    j->want_out = malloc(j->out_b);
    j->want_lse = malloc(j->lse_b);
    j->want_topk = malloc(j->topk_b);
    memcpy(j->want_out, j->f.out_mem, j->out_b);
    memcpy(j->want_lse, j->f.lse_mem, j->lse_b);
    memcpy(j->want_topk, j->f.topk_mem, j->topk_b);
  }
  /* Phase 2: all at once, plus the thread of invalid calls */
  bad_job bad = {0, 0, 0};
  pthread_t th[NTHREADS + 1];
  int started = 0;
  for (int i = 0; ready && i < NTHREADS; i++)
    started += CHECK(pthread_create(&th[i], NULL, worker, &jobs[i]) == 0, "pthread_create");
  int bad_started =
      ready && CHECK(pthread_create(&th[NTHREADS], NULL, bad_worker, &bad) == 0, "pthread_create");
  for (int i = 0; i < started; i++)
    pthread_join(th[i], NULL);
  atomic_store(&g_workers_done, 1);
  if (bad_started)
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
  for (int i = 0; i < NTHREADS; i++) {
    free(jobs[i].want_out);
    free(jobs[i].want_lse);
    free(jobs[i].want_topk);
    fx_free(&jobs[i].f);
  }
  m3s_context_destroy(g_ctx);
  return TEST_FINISH();
}
