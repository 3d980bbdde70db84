/* m3s-demo: small utilities: random numbers, time, error reports, bf16. */
#include "demo.h"

static uint64_t splitmix(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t hash3(uint64_t a, uint64_t b, uint64_t c) {
  uint64_t s = a ^ (b * 0xD1B54A32D192ED03ull) ^ (c * 0x8CB92BA72F3D8DD7ull);
  return splitmix(&s);
}

static uint64_t rng_draw(rng *r) { return splitmix(&r->s); }
int rng_int(rng *r, int n) { return (int)(rng_draw(r) % (uint64_t)n); }

/* Approximately N(0,1): sum of four 16-bit uniforms (Irwin-Hall), one draw. */
float rng_gauss(rng *r) {
  uint64_t x = rng_draw(r);
  float s = (float)(x & 0xFFFF) + (float)((x >> 16) & 0xFFFF) + (float)((x >> 32) & 0xFFFF) +
            (float)(x >> 48);
  return (s * (1.0f / 65536.0f) - 2.0f) * 1.7320508f;
}

void rng_unit(rng *r, float *v, int n) {
  double ss = 0;
  for (int i = 0; i < n; i++) {
    v[i] = rng_gauss(r);
    ss += (double)v[i] * v[i];
  }
  float inv = (float)(1.0 / sqrt(ss));
  for (int i = 0; i < n; i++)
    v[i] *= inv;
}

double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int lib_error(const char *what, m3s_status st) {
  fflush(stdout);
  fprintf(stderr, "m3s-demo: %s failed: %s\n  %s\n", what, m3s_status_string(st), m3s_last_error());
  return -1;
}

int out_of_memory(size_t bytes) {
  fflush(stdout);
  fprintf(stderr, "m3s-demo: out of memory (%zu bytes)\n", bytes);
  return -1;
}

void *xcalloc(size_t n, size_t size) {
  void *p = calloc(n ? n : 1, size ? size : 1);
  if (!p)
    out_of_memory(n * size);
  return p;
}

/* bf16 is the upper half of an fp32: widening is exact, narrowing rounds to
 * nearest even (NaN kept quiet). The demo needs no more than the public header. */
float bf(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u)
    return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
