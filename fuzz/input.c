/* input.c -- the input reader (bytes past the end read as 0), the PRNG for
 * bulk data, and the number formats (an fp64 codec independent of
 * src/cpu/convert.c). */
#include "fuzz.h"

/* ======================================================================== */
/* input reader and PRNG                                                    */
/* ======================================================================== */
const uint8_t *g_in;
size_t g_in_n, g_in_i;

unsigned rb(void) { return g_in_i < g_in_n ? g_in[g_in_i++] : 0u; }
unsigned rb16(void) {
  unsigned a = rb();
  return a | rb() << 8;
}
uint32_t rb32(void) {
  uint32_t a = rb16();
  return a | (uint32_t)rb16() << 16;
}
uint64_t rb64(void) {
  uint64_t a = rb32();
  return a | (uint64_t)rb32() << 32;
}
/* 0 .. n-1 (n <= 65536) */
int rpick(int n) {
  if (n <= 1)
    return 0;
  return n <= 256 ? (int)(rb() % (unsigned)n) : (int)(rb16() % (unsigned)n);
}
/* true with probability ~pct%; a zero byte is always false */
int rchance(int pct) { return (int)rb() >= 256 - (pct * 256) / 100; }

uint64_t g_rng;
uint64_t rnd(void) {
  uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
int rndn(int n) { return n <= 1 ? 0 : (int)(rnd() % (uint64_t)n); }

/* ======================================================================== */
/* number formats (independent of src/cpu/convert.c)                        */
/* ======================================================================== */
double dec_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
double dec_f16(uint16_t h) {
  int e = (h >> 10) & 31, m = h & 1023;
  double v = e == 31 ? (m ? NAN : INFINITY) : e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
  return (h & 0x8000) ? -v : v;
}
double dec_e4m3(uint8_t b) {
  int e = (b >> 3) & 15, m = b & 7;
  double v = (e == 15 && m == 7) ? NAN : e == 0 ? ldexp(m, -9) : ldexp(8 + m, e - 10);
  return (b & 0x80) ? -v : v;
}
double dec_e5m2(uint8_t b) {
  int e = (b >> 2) & 31, m = b & 3;
  double v = e == 31 ? (m ? NAN : INFINITY) : e == 0 ? ldexp(m, -16) : ldexp(4 + m, e - 17);
  return (b & 0x80) ? -v : v;
}
/* Element size; an invalid dtype (the harness makes some) sizes as 1 byte. */
size_t esz(m3s_dtype dt) {
  size_t z = m3s_dtype_size(dt);
  return z ? z : 1;
}
double dec(const void *p, m3s_dtype dt) {
  uint16_t h;
  float f;
  switch (dt) {
  case M3S_BF16: memcpy(&h, p, 2); return dec_bf16(h);
  case M3S_F16: memcpy(&h, p, 2); return dec_f16(h);
  case M3S_F32: memcpy(&f, p, 4); return f;
  case M3S_E4M3: return dec_e4m3(*(const uint8_t *)p);
  case M3S_E5M2: return dec_e5m2(*(const uint8_t *)p);
  default: return 0;
  }
}
/* Exact encoding of a value known to be representable (the "nice" grid). */
void enc(void *p, m3s_dtype dt, double v) {
  switch (dt) {
  case M3S_BF16: {
    float f = (float)v;
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t h = (uint16_t)(u >> 16);
    if (isnan(v))
      h = 0x7FC0;
    memcpy(p, &h, 2);
    break;
  }
  case M3S_F16: {
    uint16_t h, s = signbit(v) ? 0x8000 : 0;
    double a = fabs(v);
    if (isnan(v))
      h = 0x7E00;
    else if (isinf(v))
      h = s | 0x7C00;
    else if (a == 0)
      h = s;
    else {
      int e;
      double f = frexp(a, &e); /* a = f 2^e, f in [0.5, 1) */
      int E = e + 14;
      if (E >= 1)
        h = (uint16_t)(s | E << 10 | ((int)(f * 2048) - 1024));
      else
        h = (uint16_t)(s | (int)(a * 16777216.0));
    }
    memcpy(p, &h, 2);
    break;
  }
  case M3S_F32: {
    float f = (float)v;
    memcpy(p, &f, 4);
    break;
  }
  case M3S_E4M3:
  case M3S_E5M2: {
    int mb = dt == M3S_E4M3 ? 3 : 2, bias = dt == M3S_E4M3 ? 7 : 15;
    uint8_t s = signbit(v) ? 0x80 : 0, code = 0x7F;
    double a = fabs(v);
    if (!isnan(v) && !isinf(v)) {
      int e;
      double f = frexp(a, &e); /* a = f 2^e, f in [0.5, 1) */
      int E = e - 1 + bias;
      if (a == 0)
        code = s;
      else if (E >= 1)
        code = (uint8_t)(s | E << mb | (int)((2 * f - 1) * (1 << mb)));
      else
        code = (uint8_t)(s | (int)ldexp(a, bias - 1 + mb));
    }
    *(uint8_t *)p = code;
    break;
  }
  default: break;
  }
  if (!isnan(v) && dec(p, dt) != v)
    die("harness: value %g is not exact in dtype %d", v, (int)dt);
}
void put_nan(void *p, m3s_dtype dt) {
  static const uint16_t bf = 0x7FC0, hf = 0x7E00;
  static const uint32_t ff = 0x7FC00000u;
  switch (dt) {
  case M3S_BF16: memcpy(p, &bf, 2); break;
  case M3S_F16: memcpy(p, &hf, 2); break;
  case M3S_F32: memcpy(p, &ff, 4); break;
  case M3S_E4M3:
  case M3S_E5M2: *(uint8_t *)p = 0x7F; break;
  default: break;
  }
}
/* nice values: k/4, |k| <= 8: exact in bf16, f16, e4m3 and e5m2; products are
 * multiples of 1/16 below 4, so 128-term fp32 dot products are exact. */
double grid(void) { return (double)(rndn(17) - 8) / 4.0; }

