/* Minimal test harness shared by the C test binaries.
 *
 * Every check increments a pass or fail counter; a failing check prints where
 * it failed. Each binary ends with TEST_FINISH(), which prints the summary line
 * "N passed, N failed" (read by CTest logs and CI) and returns non-zero when
 * anything failed, or when no check ran and nothing was skipped on purpose.
 * Skips are counted separately and never count as passes. */
#ifndef M3S_TEST_UTIL_H
#define M3S_TEST_UTIL_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
  long passed;
  long failed;
  long skipped;
  long asked;    /* test_selected calls: the binary's cases honour M3S_TEST_FILTER */
  long selected; /* ... of which matched */
} test_counts;

/* One counter per program even when several files of a test include this
 * header (weak: the linker keeps a single definition). */
__attribute__((weak)) test_counts g_tc;

static inline int test_check_(int ok, const char *expr, const char *file, int line,
                              const char *what) {
  if (ok) {
    g_tc.passed++;
  } else {
    g_tc.failed++;
    fprintf(stderr, "FAIL %s:%d: %s%s%s\n", file, line, expr, what ? " -- " : "", what ? what : "");
  }
  return ok;
}

/* CHECK(cond, "context") : counts one check; returns the truth value. */
#define CHECK(cond, what) test_check_(!!(cond), #cond, __FILE__, __LINE__, (what))

/* M3S_TEST_FILTER: unset or "" runs every case; otherwise a comma-separated
 * list of substrings, and a case runs when its name contains one of them
 * (tools/gpu-check.sh splits slow sanitizer runs this way). */
static inline int test_filter_match_(const char *name, const char *f) {
  while (*f) {
    const char *end = strchr(f, ',');
    size_t n = end ? (size_t)(end - f) : strlen(f);
    for (const char *p = name; n && *p; ++p)
      if (strncmp(p, f, n) == 0)
        return 1;
    if (!end)
      break;
    f = end + 1;
  }
  return 0;
}

static inline int test_selected(const char *name) {
  const char *f = getenv("M3S_TEST_FILTER");
  const int on = !f || !f[0] || test_filter_match_(name, f);
  g_tc.asked++;
  g_tc.selected += on;
  return on;
}

/* Whether every case runs (no M3S_TEST_FILTER): a test's "some case took
 * this path" checks only hold then. */
static inline int test_unfiltered(void) {
  const char *f = getenv("M3S_TEST_FILTER");
  return !f || !f[0];
}

/* A binary that ran no check at all (a filter that matches nothing, an early
 * return) fails, unless it skipped something on purpose (g_tc.skipped > 0):
 * "0 passed, 0 failed" must never read as a pass. So does a filtered run of a
 * binary whose cases honour the filter when it selected none of them (its
 * set-up checks alone would otherwise pass: a quick-mode run filtered on a
 * full-mode case, e.g.). */
static inline int test_finish_(void) {
  if (g_tc.skipped)
    printf("%ld passed, %ld failed, %ld skipped\n", g_tc.passed, g_tc.failed, g_tc.skipped);
  else
    printf("%ld passed, %ld failed\n", g_tc.passed, g_tc.failed);
  if (g_tc.passed + g_tc.failed == 0 && g_tc.skipped == 0) {
    fprintf(stderr, "FAIL: no check ran (M3S_TEST_FILTER=\"%s\")\n",
            getenv("M3S_TEST_FILTER") ? getenv("M3S_TEST_FILTER") : "");
    return 1;
  }
  if (g_tc.asked > 0 && g_tc.selected == 0) {
    fprintf(stderr, "FAIL: M3S_TEST_FILTER=\"%s\" selected none of the %ld cases offered\n",
            getenv("M3S_TEST_FILTER"), g_tc.asked);
    return 1;
  }
  return g_tc.failed ? 1 : 0;
}
#define TEST_FINISH() test_finish_()

#endif
