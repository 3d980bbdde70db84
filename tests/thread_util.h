/* The harness of the thread tests (tests/test_threads.c on the CPU backend,
 * tests/test_gpu_threads.c on CUDA): worker threads and one thread of invalid
 * calls are released together; each records what it saw in a tally of its
 * own, which the main thread checks after the joins (CHECK's counters are not
 * atomic, so threads other than main never call it). Header-only: each test
 * gets its own start flags. */
#ifndef M3S_TEST_THREAD_UTIL_H
#define M3S_TEST_THREAD_UTIL_H

#include "test_util.h"

#include "m3sparse.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

enum { THR_MAX = 15 };

/* What one worker saw over its runs. */
typedef struct {
  int runs_ok, bits_equal, error_text_empty;
} run_tally;

/* What the invalid caller saw. */
typedef struct {
  int calls, rejected, own_text;
} invalid_tally;

static atomic_int thr_go;           /* all threads start together */
static atomic_int thr_workers_done; /* the invalid caller keeps going until then */

static inline void thr_wait_go(void) {
  while (!atomic_load(&thr_go))
    sched_yield();
}

static inline int thr_workers_running(void) { return !atomic_load(&thr_workers_done); }

/* One valid run: it succeeded, left an empty error text, and its n output
 * bytes got equal the lone run's want. */
static inline void tally_run(run_tally *t, int ok, const void *got, const void *want, size_t n) {
  t->runs_ok += ok;
  t->error_text_empty += ok && m3s_last_error()[0] == '\0';
  t->bits_equal += ok && memcmp(got, want, n) == 0;
}

/* One invalid call of fn whose argument arg is broken: rejected, and the
 * calling thread's error text names both. */
static inline void tally_invalid(invalid_tally *t, m3s_status st, const char *fn,
                                 const char *quoted_arg) {
  const char *e = m3s_last_error();
  t->calls++;
  t->rejected += st != M3S_OK;
  t->own_text += st != M3S_OK && strstr(e, quoted_arg) != NULL && strstr(e, fn) != NULL;
}

/* Starts worker(jobs + i * job_size) for i < n and bad(bad_arg), releases
 * them together, joins the workers, then lets the invalid caller stop and
 * joins it. Returns 1 when every thread was created (failures are checks). */
static inline int thr_run_all(void *(*worker)(void *), void *jobs, size_t job_size, int n,
                              void *(*bad)(void *), void *bad_arg) {
  pthread_t th[THR_MAX + 1];
  int made[THR_MAX + 1] = {0}, all = CHECK(n <= THR_MAX, "at most THR_MAX workers");
  for (int i = 0; all && i < n; i++) {
    void *job = (char *)jobs + (size_t)i * job_size;
    made[i] = CHECK(pthread_create(&th[i], NULL, worker, job) == 0, "pthread_create");
    all = made[i];
  }
  if (all) {
    made[n] = CHECK(pthread_create(&th[n], NULL, bad, bad_arg) == 0, "pthread_create");
    all = made[n];
  }
  atomic_store(&thr_go, 1);
  for (int i = 0; i < n; i++)
    if (made[i])
      pthread_join(th[i], NULL);
  atomic_store(&thr_workers_done, 1);
  if (made[n])
    pthread_join(th[n], NULL);
  return all;
}

/* Worker i (label, e.g. its TP shape) made iters runs, each successful,
 * with an empty error text and the lone run's bytes. */
static inline void thr_check_run(const run_tally *t, int i, const char *label, int iters) {
  char what[96];
  snprintf(what, sizeof what, "thread %d (%s): %d of %d runs", i, label, t->runs_ok, iters);
  CHECK(t->runs_ok == iters, what);
  CHECK(t->bits_equal == iters, "concurrent outputs byte-identical to the lone run");
  CHECK(t->error_text_empty == iters, "error text empty after each valid call");
}

/* The invalid caller made at least min_calls calls, every one rejected with
 * its own error text. */
static inline void thr_check_invalid(const invalid_tally *t, int min_calls) {
  char what[96];
  snprintf(what, sizeof what, "%d invalid calls, %d rejected", t->calls, t->rejected);
  CHECK(t->calls >= min_calls && t->rejected == t->calls, what);
  CHECK(t->own_text == t->calls, "the invalid caller always reads its own error text");
}

#endif
