/* Device pieces of the certified top-k's score kernels: the error bound E of
 * docs/perf-notes.md ("Certified re-scoring: the bound"), which the prefill
 * tile kernel (topk_tc.cu) and the streaming decode kernel
 * (../topk_decode.cu) share; rounded-up norms; the exact e4m3 widening to
 * bf16 of the prefill mma.sync kernel; the fp16 query scaling and its
 * bound, which both kernels' e4m3 forms on fp16 operands use. */
#ifndef M3S_CUDA_TOPK_TC_CUH
#define M3S_CUDA_TOPK_TC_CUH

#include "../common.cuh"

#include <stdint.h>

/* E = TC_C * |q| * |k| + TC_ABS * (|q| + |k| + 1), see docs/perf-notes.md:
 * gamma_19 < 20 u for the reference order (19 additions per product), twice
 * the 288 u of the tensor cores' truncation model, u = 2^-24: 596 u, rounded
 * up to 600 u (the largest error measured on the H200 is ~4.3 u). */
#define TC_C (600.0f * 0x1p-24f)
#define TC_ABS 0x1p-118f

/* The bound E for a row of query norm nq and a block of largest key norm nk
 * (both upper bounds, never NaN); infinite when the product is not safely
 * below the fp32 range (this also covers NaN and Inf inputs). */
static __device__ __forceinline__ float tc_bound(float nq, float nk) {
  float p = __fmul_ru(nq, nk);
  if (!(p <= 0x1p126f))
    return INFINITY;
  return __fadd_ru(__fmul_ru(TC_C, p), __fmul_ru(TC_ABS, __fadd_ru(__fadd_ru(nq, nk), 1.0f)));
}

/* Sum of squares of 8 bf16 (packed in a uint4), rounded up, added to s. */
static __device__ __forceinline__ float tc_sumsq8_ru(uint4 w, float s) {
  uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int e = 0; e < 4; e++) {
    float lo = __uint_as_float(u[e] << 16), hi = __uint_as_float(u[e] & 0xffff0000u);
    s = __fmaf_ru(lo, lo, s);
    s = __fmaf_ru(hi, hi, s);
  }
  return s;
}

/* Two e4m3 codes (low byte first) as two bf16 in one word, exactly (through
 * fp16, as the exact path widens them; NaN stays NaN). */
static __device__ __forceinline__ uint32_t tc_e4m3x2_to_bf16x2(uint16_t pair) {
  float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
  __nv_bfloat162 h = __floats2bfloat162_rn(f.x, f.y);
  return *(uint32_t *)&h;
}

/* 16 e4m3 codes (the bytes of w, low first) as 16 bf16 in o[0..7], exactly
 * (NaN stays NaN). */
static __device__ __forceinline__ void tc_e4m3x16_to_bf16(uint4 w, uint32_t (&o)[8]) {
  const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int e = 0; e < 8; e++)
    o[e] = tc_e4m3x2_to_bf16x2((uint16_t)(u[e / 2] >> (16 * (e % 2))));
}

/* e4m3 keys on fp16 operands (the decode kernel, ../topk_decode.cu, and the
 * prefill score kernel's e4m3 form, topk_tc.cu): every e4m3 code is exactly
 * an fp16 value; the bf16 query row is scaled by 2^s into fp16's range, and
 * S~ and E are scaled back by 2^-s. */

/* 2^e as a float, for e in [-126, 127]. */
static __device__ __forceinline__ float tc_pow2(int e) { return __int_as_float((127 + e) << 23); }

/* The scale exponent s of a query row whose largest |q_d| has bf16 bits m
 * (sign cleared; Inf and NaN compare above every finite value): its largest
 * element times 2^s lies in [2^14, 2^15), below fp16's largest finite 65504.
 * s <= 126 keeps 2^s and 2^-s normal floats (rows below 2^-112 are scaled
 * less than that, still in range). */
static __device__ __forceinline__ int tc_f16_shift(uint32_t m) {
  return min(141 - (int)(m >> 7), 126);
}

/* A pair of bf16 (one word) times `scale` = 2^s, rounded to fp16. The
 * product is exact in fp32 down to 2^-126, and 8 significant bits fit fp16's
 * 11, so the result is exact from fp16's smallest normal 2^-14 up; below it
 * (an fp16 subnormal, or 0) it is off by at most 2^-25, and by less than 2^-14
 * even where a subnormal is flushed. */
static __device__ __forceinline__ uint32_t tc_bf16x2_to_f16x2(uint32_t w, float scale) {
  __half2_raw h = __floats2half2_rn(__fmul_rn(__uint_as_float(w << 16), scale),
                                    __fmul_rn(__uint_as_float(w & 0xffff0000u), scale));
  return (uint32_t)h.x | (uint32_t)h.y << 16;
}

/* The squares of a word's two values (bf16, or fp16 for F16; exact in
 * fp32) added to s, rounded up. */
template <bool F16> static __device__ __forceinline__ float tc_sumsq2_ru(uint32_t w, float s) {
  float lo, hi;
  if (F16) {
    __half2_raw r;
    r.x = (unsigned short)(w & 0xffffu);
    r.y = (unsigned short)(w >> 16);
    float2 f = __half22float2(__half2(r));
    lo = f.x;
    hi = f.y;
  } else {
    lo = __uint_as_float(w << 16);
    hi = __uint_as_float(w & 0xffff0000u);
  }
  return __fmaf_ru(hi, hi, __fmaf_ru(lo, lo, s));
}

/* E of a row or pair against an e4m3 block scored on fp16 operands
 * (derivation: ../topk_decode.cu's file-top comment): nq bounds the norm of
 * the scaled fp16 query, nk the block's key norms, unscale
 * = 2^-s. Scaled: tc_bound(nq, nk) for the tensor-core dot of the fp16 query,
 * plus 12 * 2^-14 nk (>= 2^-14 sqrt(128) |k| (1 + 2^-17)) for the query's
 * rounding to fp16; then times 2^-s, plus 2^-118 unscaled. Infinite unless
 * 2^-s nq nk <= 2^125. */
static __device__ __forceinline__ float tc_bound_f16(float nq, float nk, float unscale) {
  if (!(__fmul_ru(__fmul_ru(nq, nk), unscale) <= 0x1p125f))
    return INFINITY;
  float e = __fadd_ru(tc_bound(nq, nk), __fmul_ru(0x1.8p-11f, nk));
  return __fadd_ru(__fmul_ru(e, unscale), 0x1p-118f);
}

#endif
