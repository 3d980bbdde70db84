/* Exhaustive tests of src/cpu/convert.c against references written here from
 * the format definitions alone:
 *  - decoders: every code of e4m3, e5m2 (256 each), bf16 and f16 (65536 each)
 *    against an ldexp decoder built from the bit fields;
 *  - encoders: round trip of every non-NaN code, then a sweep of f32 inputs
 *    (every 257th bit pattern, all midpoints between adjacent representable
 *    values and their f32 neighbours, every representable value and its
 *    neighbours, saturation/overflow boundaries, inf, NaNs, f32 subnormals)
 *    against a brute-force encoder: the nearest value in the sorted list of all
 *    codes of the format (ties to the even code), saturating for FP8,
 *    overflowing to inf for bf16/f16.
 * NaN conventions checked are CUDA's (see convert.h). Failures print the input
 * and the got/expected bits; after MAX_PRINTED failures they are only counted. */
#include "../src/cpu/convert.h"
#include "test_util.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_PRINTED 50
static long g_printed;

/* Counts one check; on failure prints the caller's line and a formatted message. */
static void check_at(int ok, int line, const char *fmt, ...) {
  char buf[256];
  va_list ap;
  if (ok) {
    test_check_(1, "", __FILE__, line, NULL);
    return;
  }
  if (g_printed++ >= MAX_PRINTED) {
    g_tc.failed++;
    return;
  }
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  test_check_(0, "mismatch", __FILE__, line, buf);
}
#define CHECKF(ok, ...) check_at((ok), __LINE__, __VA_ARGS__)

static uint32_t fbits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}
static float bitsf(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* ---- formats, described only by their fields ---- */
typedef struct {
  const char *name;
  int bits;       /* total width: 8 or 16 */
  int ebits;      /* exponent bits */
  int mbits;      /* mantissa bits */
  int bias;
  int fn;         /* 1: E4M3 style: no inf, only all-ones exponent+mantissa is NaN */
  int saturate;   /* 1: out-of-range finite and inf -> +-max (FP8 SATFINITE) */
  uint32_t nan_code;    /* encoder output for NaN input */
  int nan_keeps_bits;   /* decoder returns code << 16 for NaN (bf16), else 0x7FFFFFFF */
} fmt_t;

static const fmt_t F_BF16 = {"bf16", 16, 8, 7, 127, 0, 0, 0x7FFF, 1};
static const fmt_t F_F16 = {"f16", 16, 5, 10, 15, 0, 0, 0x7FFF, 0};
static const fmt_t F_E4M3 = {"e4m3", 8, 4, 3, 7, 1, 1, 0x7F, 0};
static const fmt_t F_E5M2 = {"e5m2", 8, 5, 2, 15, 0, 1, 0x7F, 0};

typedef enum { K_FINITE, K_INF, K_NAN } kind_t;

/* Independent decoder: value of a code as a double via ldexp. */
static double ref_decode(const fmt_t *F, uint32_t code, kind_t *kind) {
  uint32_t s = (code >> (F->bits - 1)) & 1u;
  uint32_t e = (code >> F->mbits) & ((1u << F->ebits) - 1u);
  uint32_t m = code & ((1u << F->mbits) - 1u);
  uint32_t emax = (1u << F->ebits) - 1u;
  double v;
  *kind = K_FINITE;
  if (F->fn) {
    if (e == emax && m == (1u << F->mbits) - 1u) {
      *kind = K_NAN;
      return NAN;
    }
  } else if (e == emax) {
    *kind = m ? K_NAN : K_INF;
    if (m) return NAN;
    return s ? -INFINITY : INFINITY;
  }
  if (e == 0)
    v = ldexp((double)m, 1 - F->bias - F->mbits);
  else
    v = ldexp((double)((1u << F->mbits) + m), (int)e - F->bias - F->mbits);
  return s ? -v : v;
}

static float lib_decode(const fmt_t *F, uint32_t code) {
  if (F == &F_BF16) return m3s_bf16_to_f32((uint16_t)code);
  if (F == &F_F16) return m3s_f16_to_f32((uint16_t)code);
  if (F == &F_E4M3) return m3s_e4m3_to_f32((uint8_t)code);
  return m3s_e5m2_to_f32((uint8_t)code);
}

static uint32_t lib_encode(const fmt_t *F, float f) {
  if (F == &F_BF16) return m3s_f32_to_bf16(f);
  if (F == &F_F16) return m3s_f32_to_f16(f);
  if (F == &F_E4M3) return m3s_f32_to_e4m3(f);
  return m3s_f32_to_e5m2(f);
}

/* ---- brute-force reference encoder ----
 * vals[i], codes[i]: every non-negative finite code in increasing value order
 * (all of them, found by scanning the whole code space), plus for non-saturating
 * formats the "overflow" entry 2^(emax+1) with the inf code, which is where RNE
 * sends values from max + ulp/2 up. */
typedef struct {
  const fmt_t *F;
  int n;
  double vals[1u << 16];
  uint32_t codes[1u << 16];
} reflist_t;

static int cmp_double(const double *a, const double *b) { return (*a > *b) - (*a < *b); }

static void ref_build(reflist_t *R, const fmt_t *F) {
  uint32_t ncodes = 1u << F->bits, c;
  int i;
  R->F = F;
  R->n = 0;
  for (c = 0; c < ncodes; c++) {
    kind_t k;
    double v = ref_decode(F, c, &k);
    if (k != K_FINITE || signbit(v)) continue;
    R->vals[R->n] = v;
    R->codes[R->n] = c;
    R->n++;
  }
  /* Verify the list is strictly increasing (sorted by search, not assumed). */
  for (i = 1; i < R->n; i++) {
    if (cmp_double(&R->vals[i - 1], &R->vals[i]) >= 0) {
      CHECKF(0, "%s: reference list not increasing at %d", F->name, i);
      break;
    }
  }
  if (!F->saturate) {
    double top = R->vals[R->n - 1];
    kind_t k;
    uint32_t inf_code = ((1u << F->ebits) - 1u) << F->mbits;
    /* next power of two above max is the value the inf code "stands for" */
    R->vals[R->n] = ldexp(1.0, ilogb(top) + 1);
    R->codes[R->n] = inf_code;
    ref_decode(F, inf_code, &k);
    CHECKF(k == K_INF, "%s: inf code 0x%X", F->name, inf_code);
    R->n++;
  }
}

static uint32_t ref_encode(const reflist_t *R, float f) {
  const fmt_t *F = R->F;
  uint32_t sign = signbit(f) ? 1u << (F->bits - 1) : 0u;
  double a = fabs((double)f);
  int lo, hi;
  if (isnan(f)) return F->nan_code;
  if (a >= R->vals[R->n - 1]) return sign | R->codes[R->n - 1]; /* saturate / inf */
  /* binary search: vals[lo] <= a < vals[hi], hi = lo + 1 */
  lo = 0;
  hi = R->n - 1;
  while (hi - lo > 1) {
    int mid = lo + (hi - lo) / 2;
    if (R->vals[mid] <= a)
      lo = mid;
    else
      hi = mid;
  }
  {
    /* the midpoint of two adjacent codes has at most mbits+2 significant bits:
     * exact in double, so the comparison is exact. */
    double midv = (R->vals[lo] + R->vals[hi]) * 0.5;
    uint32_t c;
    if (a < midv)
      c = R->codes[lo];
    else if (a > midv)
      c = R->codes[hi];
    else
      c = (R->codes[lo] & 1u) ? R->codes[hi] : R->codes[lo];
    return sign | c;
  }
}

static reflist_t g_ref[4];
static const fmt_t *const g_fmts[4] = {&F_BF16, &F_F16, &F_E4M3, &F_E5M2};

/* ---- decoder tests ---- */
static void test_decode(const fmt_t *F) {
  uint32_t ncodes = 1u << F->bits, c;
  for (c = 0; c < ncodes; c++) {
    kind_t k;
    double want = ref_decode(F, c, &k);
    float got = lib_decode(F, c);
    uint32_t gb = fbits(got);
    if (k == K_NAN) {
      uint32_t wb = F->nan_keeps_bits ? (c << 16) : 0x7FFFFFFFu;
      CHECKF(isnan(got) && gb == wb, "%s decode 0x%X: got bits 0x%08X, want NaN 0x%08X", F->name,
             c, gb, wb);
    } else {
      /* == on doubles, plus the sign bit (so -0 != +0). want is exact in f32. */
      CHECKF((double)got == want && !signbit(got) == !signbit(want) && (float)want == got,
             "%s decode 0x%X: got %a (0x%08X), want %a", F->name, c, (double)got, gb, want);
    }
  }
}

static void test_tables(void) {
  const float *t4 = m3s_e4m3_table(), *t5 = m3s_e5m2_table();
  int i;
  for (i = 0; i < 256; i++) {
    uint32_t a = fbits(t4[i]), b = fbits(m3s_e4m3_to_f32((uint8_t)i));
    uint32_t c = fbits(t5[i]), d = fbits(m3s_e5m2_to_f32((uint8_t)i));
    CHECKF(a == b, "e4m3 table[0x%02X] = 0x%08X, function 0x%08X", i, a, b);
    CHECKF(c == d, "e5m2 table[0x%02X] = 0x%08X, function 0x%08X", i, c, d);
    /* e5m2 is the top byte of f16 */
    CHECKF(d == fbits(m3s_f16_to_f32((uint16_t)(i << 8))), "e5m2 0x%02X != f16 0x%02X00", i, i);
  }
}

static void test_inline(void) {
  uint32_t c;
  for (c = 0; c < 65536; c++) {
    uint32_t a = fbits(m3s_bf16_to_f32_inline((uint16_t)c)), b = fbits(m3s_bf16_to_f32((uint16_t)c));
    CHECKF(a == b, "bf16 inline decode 0x%04X: 0x%08X vs 0x%08X", c, a, b);
  }
}

/* ---- encoder tests ---- */
static void test_roundtrip(const fmt_t *F) {
  uint32_t ncodes = 1u << F->bits, c;
  for (c = 0; c < ncodes; c++) {
    kind_t k;
    uint32_t want, got;
    ref_decode(F, c, &k);
    if (k == K_NAN) {
      want = F->nan_code;
    } else if (k == K_INF && F->saturate) {
      /* e5m2 inf saturates to +-max */
      want = (c & 0x80u) | 0x7Bu;
    } else {
      want = c;
    }
    got = lib_encode(F, lib_decode(F, c));
    CHECKF(got == want, "%s round trip 0x%X: got 0x%X want 0x%X", F->name, c, got, want);
  }
}

/* Encodes f with the library and the reference for every format. */
static void check_all_formats(float f) {
  int i;
  for (i = 0; i < 4; i++) {
    uint32_t got = lib_encode(g_fmts[i], f);
    uint32_t want = ref_encode(&g_ref[i], f);
    CHECKF(got == want, "%s encode %a (f32 0x%08X): got 0x%X want 0x%X", g_fmts[i]->name,
           (double)f, fbits(f), got, want);
  }
  {
    uint32_t a = m3s_f32_to_bf16_inline(f), b = m3s_f32_to_bf16(f);
    CHECKF(a == b, "bf16 inline encode 0x%08X: 0x%X vs 0x%X", fbits(f), a, b);
  }
}

static void check_with_neighbours(float f) {
  check_all_formats(f);
  check_all_formats(nextafterf(f, INFINITY));
  check_all_formats(nextafterf(f, -INFINITY));
  check_all_formats(-f);
  check_all_formats(-nextafterf(f, INFINITY));
  check_all_formats(-nextafterf(f, -INFINITY));
}

static void test_sweep(void) {
  uint64_t u;
  /* every 257th f32 bit pattern: all exponents, varied low bits (~16.7M inputs) */
  for (u = 0; u <= 0xFFFFFFFFull; u += 257) check_all_formats(bitsf((uint32_t)u));
  check_all_formats(bitsf(0xFFFFFFFFu));
}

static void test_midpoints(void) {
  int i, j;
  for (i = 0; i < 4; i++) {
    const reflist_t *R = &g_ref[i];
    for (j = 0; j < R->n; j++) {
      /* each value (including the overflow entry 2^(emax+1), when it fits f32) */
      if (R->vals[j] <= (double)FLT_MAX) check_with_neighbours((float)R->vals[j]);
      if (j + 1 < R->n) {
        double midv = (R->vals[j] + R->vals[j + 1]) * 0.5;
        float mf = (float)midv;
        if ((double)mf != midv) {
          CHECKF(0, "%s midpoint %a not exact in f32", R->F->name, midv);
          continue;
        }
        check_with_neighbours(mf);
      }
    }
  }
}

static void test_specials(void) {
  static const uint32_t nans[] = {0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFF800001u,
                                  0x7FFFFFFFu, 0xFFFFFFFFu, 0x7FA00000u, 0x7F812345u};
  static const float vals[] = {
      0.0f, 1.0f, -1.0f, 0.5f, 448.0f, 464.0f, 480.0f, 500.0f, 512.0f, 57344.0f, 61440.0f,
      65504.0f, 65520.0f, 65536.0f, 0x1p-6f, 0x1p-9f, 0x1p-10f, 0x3p-11f, 0x1p-14f,
      0x1p-16f, 0x1p-17f, 0x3p-18f, 0x1p-24f, 0x1p-25f, 0x3p-26f, 0x1p-126f, 0x1p-133f,
      0x1p-134f, 0x1p-149f, 0x1.fffffcp-127f, FLT_MAX, 0x1.fep127f, 0x1.ffp127f, 1e30f};
  size_t i;
  for (i = 0; i < sizeof vals / sizeof vals[0]; i++) check_with_neighbours(vals[i]);
  check_all_formats(-0.0f);
  check_all_formats(INFINITY);
  check_all_formats(-INFINITY);
  for (i = 0; i < sizeof nans / sizeof nans[0]; i++) check_all_formats(bitsf(nans[i]));

  /* The contract stated in convert.h, spelled out once. */
  CHECKF(m3s_f32_to_e4m3(INFINITY) == 0x7E && m3s_f32_to_e4m3(-INFINITY) == 0xFE, "e4m3 inf");
  CHECKF(m3s_f32_to_e5m2(INFINITY) == 0x7B && m3s_f32_to_e5m2(-INFINITY) == 0xFB, "e5m2 inf");
  CHECKF(m3s_f32_to_e4m3(1e30f) == 0x7E && m3s_f32_to_e4m3(-464.0f) == 0xFE &&
             m3s_f32_to_e4m3(nextafterf(464.0f, 0.0f)) == 0x7E,
         "e4m3 saturation");
  CHECKF(m3s_f32_to_e5m2(61440.0f) == 0x7B && m3s_f32_to_e5m2(-1e30f) == 0xFB, "e5m2 sat");
  CHECKF(m3s_f32_to_e4m3(-NAN) == 0x7F && m3s_f32_to_e5m2(-NAN) == 0x7F, "fp8 NaN");
  CHECKF(m3s_f32_to_f16(-NAN) == 0x7FFF && m3s_f32_to_bf16(-NAN) == 0x7FFF, "16-bit NaN");
  CHECKF(m3s_f32_to_f16(65520.0f) == 0x7C00 && m3s_f32_to_f16(nextafterf(65520.0f, 0)) == 0x7BFF,
         "f16 overflow");
  CHECKF(m3s_f32_to_bf16(FLT_MAX) == 0x7F80, "bf16 FLT_MAX rounds to inf");
  CHECKF(m3s_f32_to_e4m3(-0x1p-10f) == 0x80 && m3s_f32_to_e4m3(0x1p-10f) == 0x00 &&
             m3s_f32_to_e4m3(0x3p-10f) == 0x02 && m3s_f32_to_e4m3(0x3p-11f) == 0x01,
         "e4m3 subnormal ties");
  CHECKF(m3s_f32_to_f16(0x1p-25f) == 0 && m3s_f32_to_f16(nextafterf(0x1p-25f, 1)) == 1,
         "f16 smallest subnormal tie");
}

int main(void) {
  int i;
  for (i = 0; i < 4; i++) ref_build(&g_ref[i], g_fmts[i]);
  for (i = 0; i < 4; i++) test_decode(g_fmts[i]);
  test_tables();
  test_inline();
  for (i = 0; i < 4; i++) test_roundtrip(g_fmts[i]);
  test_specials();
  test_midpoints();
  test_sweep();
  if (g_printed > MAX_PRINTED)
    fprintf(stderr, "(%ld further failures not printed)\n", g_printed - MAX_PRINTED);
  return TEST_FINISH();
}
