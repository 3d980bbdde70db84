/* Scalar number-format conversions for the CPU reference backend.
 *
 * Formats (bit layouts, sign in the top bit):
 *   bf16  1.8.7   bias 127  IEEE-like: inf and NaN at exponent 255, subnormals.
 *   f16   1.5.10  bias 15   IEEE binary16.
 *   e4m3  1.4.3   bias 7    OCP FP8 E4M3 ("fn"): NO infinity; the only NaNs are
 *                           S.1111.111 (0x7F, 0xFF); max finite 448 (0x7E);
 *                           subnormals down to 2^-9.
 *   e5m2  1.5.2   bias 15   OCP FP8 E5M2: the top byte of an IEEE binary16, so
 *                           inf at S.11111.00, NaN at S.11111.{01,10,11};
 *                           max finite 57344 (0x7B); subnormals down to 2^-16.
 *
 * Every function here is pure and bit-for-bit equal to the CUDA 13 host
 * conversions of cuda_bf16.h / cuda_fp16.h / cuda_fp8.h (tests/test_convert_cuda.cu
 * checks this), which is what the GPU backend produces:
 *   m3s_f32_to_bf16 == __float2bfloat16_rn      m3s_f32_to_f16 == __float2half_rn
 *   m3s_f32_to_e4m3 == __nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3)
 *   m3s_f32_to_e5m2 == __nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E5M2)
 *   decoders        == __bfloat162float, __half2float, and
 *                      __half2float(__nv_cvt_fp8_to_halfraw(b, fmt))
 * (The device versions, cvt.rn{.satfinite} on sm_90, were also seen to give the
 * same bits on an H100 for every code and every 257th f32 bit pattern.)
 *
 * Encoders round to nearest, ties to even (the IEEE default, and what CUDA's
 * "_rn"/cvt.rn do). bf16 and f16 overflow to +-inf exactly where RNE says
 * (|f| >= max + half an ulp). The FP8 encoders saturate (SATFINITE): every
 * finite value rounding above the max, and +-inf, give +-max.
 *
 * NaN conventions (CUDA's, not IEEE payload propagation):
 *   f32 NaN -> bf16 0x7FFF and f16 0x7FFF (sign dropped), e4m3/e5m2 0x7F.
 *   bf16 -> f32 is bits << 16 (payload and sign kept, also for NaN).
 *   f16, e4m3, e5m2 NaN -> f32 0x7FFFFFFF (sign dropped).
 */
#ifndef M3S_CPU_CONVERT_H
#define M3S_CPU_CONVERT_H

#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

float m3s_bf16_to_f32(uint16_t h);
uint16_t m3s_f32_to_bf16(float f);
float m3s_f16_to_f32(uint16_t h);
uint16_t m3s_f32_to_f16(float f);
float m3s_e4m3_to_f32(uint8_t b);
uint8_t m3s_f32_to_e4m3(float f);
float m3s_e5m2_to_f32(uint8_t b);
uint8_t m3s_f32_to_e5m2(float f);

/* 256-entry decode tables: table[b] has the same bits as m3s_e4m3_to_f32(b) /
 * m3s_e5m2_to_f32(b). Constant, static storage; hoist the pointer out of loops. */
const float *m3s_e4m3_table(void);
const float *m3s_e5m2_table(void);

/* Inline versions for hot loops; same results as the functions above. */
static inline float m3s_bf16_to_f32_inline(uint16_t h) {
  /* bf16 is the top half of an f32: widening is exact. */
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static inline uint16_t m3s_f32_to_bf16_inline(float f) {
  uint32_t x;
  memcpy(&x, &f, sizeof x);
  if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)0x7FFFu; /* NaN */
  /* RNE on the low 16 bits: add just under half, plus 1 if the kept LSB is odd.
   * A carry out of the mantissa bumps the exponent, up to inf: correct RNE. */
  x += 0x7FFFu + ((x >> 16) & 1u);
  return (uint16_t)(x >> 16);
}

#ifdef __cplusplus
}
#endif

#endif /* M3S_CPU_CONVERT_H */
