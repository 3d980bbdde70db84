/* Host-only check that src/cpu/convert.c equals CUDA's own conversions bit for
 * bit (the host implementations in cuda_bf16.h / cuda_fp16.h / cuda_fp8.h;
 * nothing is launched, no GPU is needed):
 *   m3s_f32_to_bf16 vs __float2bfloat16_rn     m3s_bf16_to_f32 vs __bfloat162float
 *   m3s_f32_to_f16  vs __float2half_rn         m3s_f16_to_f32  vs __half2float
 *   m3s_f32_to_e4m3 / _e5m2 vs __nv_cvt_float_to_fp8(f, __NV_SATFINITE, fmt)
 *   m3s_e4m3_to_f32 / _e5m2 (and the tables) vs
 *       __half2float(__nv_cvt_fp8_to_halfraw(b, fmt))
 * over every code and the f32 sweep of tests/test_convert.c (every 257th bit
 * pattern, all midpoints between adjacent representable values and their
 * neighbours, boundaries, inf, NaNs). */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cfloat>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

extern "C" {
#include "../src/cpu/convert.h"
}
#include "test_util.h"

#define MAX_PRINTED 50
static long g_printed;

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

/* ---- CUDA references (host code paths) ---- */
static uint16_t cu_f32_to_bf16(float f) {
  __nv_bfloat16_raw r = __float2bfloat16_rn(f);
  return r.x;
}
static uint16_t cu_f32_to_f16(float f) {
  __half_raw r = __float2half_rn(f);
  return r.x;
}
static uint8_t cu_f32_to_e4m3(float f) {
  return (uint8_t)__nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3);
}
static uint8_t cu_f32_to_e5m2(float f) {
  return (uint8_t)__nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E5M2);
}
static float cu_bf16_to_f32(uint16_t h) {
  __nv_bfloat16_raw r;
  r.x = h;
  return __bfloat162float(__nv_bfloat16(r));
}
static float cu_f16_to_f32(uint16_t h) {
  __half_raw r;
  r.x = h;
  return __half2float(__half(r));
}
static float cu_fp8_to_f32(uint8_t b, __nv_fp8_interpretation_t fmt) {
  __half_raw r = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)b, fmt);
  return __half2float(__half(r));
}

/* ---- decoders: every code ---- */
static void test_decoders(void) {
  const float *t4 = m3s_e4m3_table(), *t5 = m3s_e5m2_table();
  for (uint32_t c = 0; c < 65536; c++) {
    uint32_t got = fbits(m3s_bf16_to_f32((uint16_t)c)), want = fbits(cu_bf16_to_f32((uint16_t)c));
    CHECKF(got == want, "bf16->f32 0x%04X: got 0x%08X cuda 0x%08X", c, got, want);
    got = fbits(m3s_f16_to_f32((uint16_t)c));
    want = fbits(cu_f16_to_f32((uint16_t)c));
    CHECKF(got == want, "f16->f32 0x%04X: got 0x%08X cuda 0x%08X", c, got, want);
  }
  for (uint32_t c = 0; c < 256; c++) {
    uint32_t want = fbits(cu_fp8_to_f32((uint8_t)c, __NV_E4M3));
    uint32_t got = fbits(m3s_e4m3_to_f32((uint8_t)c));
    CHECKF(got == want, "e4m3->f32 0x%02X: got 0x%08X cuda 0x%08X", c, got, want);
    CHECKF(fbits(t4[c]) == want, "e4m3 table 0x%02X: got 0x%08X cuda 0x%08X", c, fbits(t4[c]),
           want);
    want = fbits(cu_fp8_to_f32((uint8_t)c, __NV_E5M2));
    got = fbits(m3s_e5m2_to_f32((uint8_t)c));
    CHECKF(got == want, "e5m2->f32 0x%02X: got 0x%08X cuda 0x%08X", c, got, want);
    CHECKF(fbits(t5[c]) == want, "e5m2 table 0x%02X: got 0x%08X cuda 0x%08X", c, fbits(t5[c]),
           want);
  }
}

/* ---- encoders ---- */
static void check_encoders(float f) {
  uint32_t x = fbits(f);
  uint32_t g, w;
  g = m3s_f32_to_bf16(f);
  w = cu_f32_to_bf16(f);
  CHECKF(g == w, "f32 0x%08X (%a) -> bf16: got 0x%04X cuda 0x%04X", x, (double)f, g, w);
  g = m3s_f32_to_f16(f);
  w = cu_f32_to_f16(f);
  CHECKF(g == w, "f32 0x%08X (%a) -> f16: got 0x%04X cuda 0x%04X", x, (double)f, g, w);
  g = m3s_f32_to_e4m3(f);
  w = cu_f32_to_e4m3(f);
  CHECKF(g == w, "f32 0x%08X (%a) -> e4m3: got 0x%02X cuda 0x%02X", x, (double)f, g, w);
  g = m3s_f32_to_e5m2(f);
  w = cu_f32_to_e5m2(f);
  CHECKF(g == w, "f32 0x%08X (%a) -> e5m2: got 0x%02X cuda 0x%02X", x, (double)f, g, w);
}

static void check_with_neighbours(float f) {
  const float cand[3] = {f, nextafterf(f, INFINITY), nextafterf(f, -INFINITY)};
  for (int i = 0; i < 3; i++) {
    check_encoders(cand[i]);
    check_encoders(-cand[i]);
  }
}

/* Sorted non-negative finite values of a format, from CUDA's decoder. */
static std::vector<float> values_of(float (*dec)(uint32_t), uint32_t ncodes) {
  std::vector<float> v;
  for (uint32_t c = 0; c < ncodes; c++) {
    float f = dec(c);
    if (std::isfinite(f) && !std::signbit(f)) v.push_back(f);
  }
  return v;
}
static float dec_bf16(uint32_t c) { return cu_bf16_to_f32((uint16_t)c); }
static float dec_f16(uint32_t c) { return cu_f16_to_f32((uint16_t)c); }
static float dec_e4m3(uint32_t c) { return cu_fp8_to_f32((uint8_t)c, __NV_E4M3); }
static float dec_e5m2(uint32_t c) { return cu_fp8_to_f32((uint8_t)c, __NV_E5M2); }

static void test_midpoints(void) {
  float (*decs[4])(uint32_t) = {dec_bf16, dec_f16, dec_e4m3, dec_e5m2};
  const uint32_t ncodes[4] = {65536, 65536, 256, 256};
  /* the value 2^(emax+1) past each format's max, where RNE overflow starts */
  const double past_max[4] = {0x1p128, 0x1p16, 512.0, 65536.0};
  for (int i = 0; i < 4; i++) {
    std::vector<float> v = values_of(decs[i], ncodes[i]);
    for (size_t j = 0; j < v.size(); j++) {
      check_with_neighbours(v[j]);
      double next = j + 1 < v.size() ? (double)v[j + 1] : past_max[i];
      double mid = ((double)v[j] + next) * 0.5;
      CHECKF((double)(float)mid == mid, "midpoint %a not exact in f32", mid);
      check_with_neighbours((float)mid);
    }
  }
}

static void test_specials(void) {
  static const uint32_t nans[] = {0x7FC00000u, 0xFFC00000u, 0x7F800001u, 0xFF800001u,
                                  0x7FFFFFFFu, 0xFFFFFFFFu, 0x7FA00000u, 0x7F812345u};
  static const float vals[] = {0.0f, 448.0f, 464.0f, 480.0f, 57344.0f, 61440.0f, 65504.0f,
                               65520.0f, 0x1p-149f, 0x1.fffffcp-127f, 0x1p-126f, FLT_MAX,
                               1e30f};
  for (float f : vals) check_with_neighbours(f);
  check_encoders(INFINITY);
  check_encoders(-INFINITY);
  for (uint32_t n : nans) check_encoders(bitsf(n));
  /* What this test relies on CUDA doing (documented in convert.h). */
  CHECKF(cu_f32_to_e4m3(INFINITY) == 0x7E && cu_f32_to_e4m3(-INFINITY) == 0xFE,
         "cuda e4m3 SATFINITE inf -> +-448");
  CHECKF(cu_f32_to_e5m2(INFINITY) == 0x7B && cu_f32_to_e5m2(-INFINITY) == 0xFB,
         "cuda e5m2 SATFINITE inf -> +-57344");
  CHECKF(cu_f32_to_e4m3(bitsf(0xFFC00000u)) == 0x7F && cu_f32_to_e5m2(bitsf(0xFFC00000u)) == 0x7F,
         "cuda fp8 NaN -> 0x7F");
  CHECKF(cu_f32_to_bf16(bitsf(0xFFC00000u)) == 0x7FFF && cu_f32_to_f16(bitsf(0xFFC00000u)) == 0x7FFF,
         "cuda 16-bit NaN -> 0x7FFF");
}

static void test_sweep(void) {
  for (uint64_t u = 0; u <= 0xFFFFFFFFull; u += 257) check_encoders(bitsf((uint32_t)u));
  check_encoders(bitsf(0xFFFFFFFFu));
}

/* CUDA's double->fp8 conversion gives the same code for every representable
 * value (its float path widens to double and calls it). */
static void test_double_path(void) {
  for (uint32_t c = 0; c < 256; c++) {
    float f = dec_e4m3(c);
    if (std::isnan(f)) continue;
    uint32_t a = __nv_cvt_double_to_fp8((double)f, __NV_SATFINITE, __NV_E4M3);
    CHECKF(a == m3s_f32_to_e4m3(f), "e4m3 double path 0x%02X", c);
    f = dec_e5m2(c);
    if (std::isnan(f)) continue;
    a = __nv_cvt_double_to_fp8((double)f, __NV_SATFINITE, __NV_E5M2);
    CHECKF(a == m3s_f32_to_e5m2(f), "e5m2 double path 0x%02X", c);
  }
}

int main(void) {
  test_decoders();
  test_specials();
  test_midpoints();
  test_double_path();
  test_sweep();
  if (g_printed > MAX_PRINTED)
    fprintf(stderr, "(%ld further failures not printed)\n", g_printed - MAX_PRINTED);
  return TEST_FINISH();
}
