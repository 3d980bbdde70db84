/* m3s-bench: small helpers: time, hashing, notes, medians. */
#include "bench.h"

void note_add(case_result *r, const char *fmt, ...) {
  size_t len = strlen(r->note);
  if (len + 3 >= sizeof r->note)
    return;
  if (len)
    len += (size_t)snprintf(r->note + len, sizeof r->note - len, "; ");
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(r->note + len, sizeof r->note - len, fmt, ap);
  va_end(ap);
}

double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

uint64_t splitmix(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

void fmt_ctx(char *buf, size_t n, int64_t v) {
  if (v >= 1048576 && v % 1048576 == 0)
    snprintf(buf, n, "%lldM", (long long)(v / 1048576));
  else if (v >= 1024 && v % 1024 == 0)
    snprintf(buf, n, "%lldK", (long long)(v / 1024));
  else
    snprintf(buf, n, "%lld", (long long)v);
}

int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

double median_of(double *v, int n) {
  qsort(v, (size_t)n, sizeof(double), cmp_double);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}
