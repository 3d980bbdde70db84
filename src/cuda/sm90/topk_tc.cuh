/* Device pieces of the certified top-k's score kernels: the error bound E of
 * docs/perf-notes.md ("Certified re-scoring: the bound"), which the prefill
 * tile kernel (topk_tc.cu) and the streaming decode kernel
 * (../topk_decode.cu) share; rounded-up norms and the exact e4m3 widening
 * of the prefill kernel. */
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

#endif
