/* Scalar number-format conversions (see convert.h for the formats, the
 * rounding rule and the NaN conventions, all chosen to match CUDA bit for bit).
 *
 * Encoders work on the f32 bit pattern with integers only, so the result does
 * not depend on the FPU rounding mode, FTZ/DAZ or FMA contraction. Rounding to
 * nearest-even of an integer significand m by s bits is
 *     (m + 2^(s-1) - 1 + ((m >> s) & 1)) >> s
 * (add just under half an ulp, plus one more when the kept LSB is odd, so that
 * exact ties go to the even neighbour). A carry out of the mantissa field into
 * the exponent field is the correct next value in every format used here. */
#include "convert.h"

/* The decode tables below hold f32 bit patterns (they were generated from the
 * bit-field definitions; tests/test_convert.c re-derives every entry with an
 * independent ldexp decoder). A union lets them be written as exact bits,
 * including the canonical NaN 0x7FFFFFFF, which no C float literal spells. */
typedef union {
  uint32_t u[256];
  float f[256];
} m3s_fp8_table;

/* E4M3: code = S.EEEE.MMM, bias 7; E=0: M * 2^-9; else (8+M) * 2^(E-10);
 * S.1111.111 is NaN (decoded as 0x7FFFFFFF like CUDA); no infinities. */
static const m3s_fp8_table k_e4m3 = {{
    /* 0x00 */ 0x00000000u, 0x3B000000u, 0x3B800000u, 0x3BC00000u, 0x3C000000u, 0x3C200000u, 0x3C400000u, 0x3C600000u,
    /* 0x08 */ 0x3C800000u, 0x3C900000u, 0x3CA00000u, 0x3CB00000u, 0x3CC00000u, 0x3CD00000u, 0x3CE00000u, 0x3CF00000u,
    /* 0x10 */ 0x3D000000u, 0x3D100000u, 0x3D200000u, 0x3D300000u, 0x3D400000u, 0x3D500000u, 0x3D600000u, 0x3D700000u,
    /* 0x18 */ 0x3D800000u, 0x3D900000u, 0x3DA00000u, 0x3DB00000u, 0x3DC00000u, 0x3DD00000u, 0x3DE00000u, 0x3DF00000u,
    /* 0x20 */ 0x3E000000u, 0x3E100000u, 0x3E200000u, 0x3E300000u, 0x3E400000u, 0x3E500000u, 0x3E600000u, 0x3E700000u,
    /* 0x28 */ 0x3E800000u, 0x3E900000u, 0x3EA00000u, 0x3EB00000u, 0x3EC00000u, 0x3ED00000u, 0x3EE00000u, 0x3EF00000u,
    /* 0x30 */ 0x3F000000u, 0x3F100000u, 0x3F200000u, 0x3F300000u, 0x3F400000u, 0x3F500000u, 0x3F600000u, 0x3F700000u,
    /* 0x38 */ 0x3F800000u, 0x3F900000u, 0x3FA00000u, 0x3FB00000u, 0x3FC00000u, 0x3FD00000u, 0x3FE00000u, 0x3FF00000u,
    /* 0x40 */ 0x40000000u, 0x40100000u, 0x40200000u, 0x40300000u, 0x40400000u, 0x40500000u, 0x40600000u, 0x40700000u,
    /* 0x48 */ 0x40800000u, 0x40900000u, 0x40A00000u, 0x40B00000u, 0x40C00000u, 0x40D00000u, 0x40E00000u, 0x40F00000u,
    /* 0x50 */ 0x41000000u, 0x41100000u, 0x41200000u, 0x41300000u, 0x41400000u, 0x41500000u, 0x41600000u, 0x41700000u,
    /* 0x58 */ 0x41800000u, 0x41900000u, 0x41A00000u, 0x41B00000u, 0x41C00000u, 0x41D00000u, 0x41E00000u, 0x41F00000u,
    /* 0x60 */ 0x42000000u, 0x42100000u, 0x42200000u, 0x42300000u, 0x42400000u, 0x42500000u, 0x42600000u, 0x42700000u,
    /* 0x68 */ 0x42800000u, 0x42900000u, 0x42A00000u, 0x42B00000u, 0x42C00000u, 0x42D00000u, 0x42E00000u, 0x42F00000u,
    /* 0x70 */ 0x43000000u, 0x43100000u, 0x43200000u, 0x43300000u, 0x43400000u, 0x43500000u, 0x43600000u, 0x43700000u,
    /* 0x78 */ 0x43800000u, 0x43900000u, 0x43A00000u, 0x43B00000u, 0x43C00000u, 0x43D00000u, 0x43E00000u, 0x7FFFFFFFu,
    /* 0x80 */ 0x80000000u, 0xBB000000u, 0xBB800000u, 0xBBC00000u, 0xBC000000u, 0xBC200000u, 0xBC400000u, 0xBC600000u,
    /* 0x88 */ 0xBC800000u, 0xBC900000u, 0xBCA00000u, 0xBCB00000u, 0xBCC00000u, 0xBCD00000u, 0xBCE00000u, 0xBCF00000u,
    /* 0x90 */ 0xBD000000u, 0xBD100000u, 0xBD200000u, 0xBD300000u, 0xBD400000u, 0xBD500000u, 0xBD600000u, 0xBD700000u,
    /* 0x98 */ 0xBD800000u, 0xBD900000u, 0xBDA00000u, 0xBDB00000u, 0xBDC00000u, 0xBDD00000u, 0xBDE00000u, 0xBDF00000u,
    /* 0xA0 */ 0xBE000000u, 0xBE100000u, 0xBE200000u, 0xBE300000u, 0xBE400000u, 0xBE500000u, 0xBE600000u, 0xBE700000u,
    /* 0xA8 */ 0xBE800000u, 0xBE900000u, 0xBEA00000u, 0xBEB00000u, 0xBEC00000u, 0xBED00000u, 0xBEE00000u, 0xBEF00000u,
    /* 0xB0 */ 0xBF000000u, 0xBF100000u, 0xBF200000u, 0xBF300000u, 0xBF400000u, 0xBF500000u, 0xBF600000u, 0xBF700000u,
    /* 0xB8 */ 0xBF800000u, 0xBF900000u, 0xBFA00000u, 0xBFB00000u, 0xBFC00000u, 0xBFD00000u, 0xBFE00000u, 0xBFF00000u,
    /* 0xC0 */ 0xC0000000u, 0xC0100000u, 0xC0200000u, 0xC0300000u, 0xC0400000u, 0xC0500000u, 0xC0600000u, 0xC0700000u,
    /* 0xC8 */ 0xC0800000u, 0xC0900000u, 0xC0A00000u, 0xC0B00000u, 0xC0C00000u, 0xC0D00000u, 0xC0E00000u, 0xC0F00000u,
    /* 0xD0 */ 0xC1000000u, 0xC1100000u, 0xC1200000u, 0xC1300000u, 0xC1400000u, 0xC1500000u, 0xC1600000u, 0xC1700000u,
    /* 0xD8 */ 0xC1800000u, 0xC1900000u, 0xC1A00000u, 0xC1B00000u, 0xC1C00000u, 0xC1D00000u, 0xC1E00000u, 0xC1F00000u,
    /* 0xE0 */ 0xC2000000u, 0xC2100000u, 0xC2200000u, 0xC2300000u, 0xC2400000u, 0xC2500000u, 0xC2600000u, 0xC2700000u,
    /* 0xE8 */ 0xC2800000u, 0xC2900000u, 0xC2A00000u, 0xC2B00000u, 0xC2C00000u, 0xC2D00000u, 0xC2E00000u, 0xC2F00000u,
    /* 0xF0 */ 0xC3000000u, 0xC3100000u, 0xC3200000u, 0xC3300000u, 0xC3400000u, 0xC3500000u, 0xC3600000u, 0xC3700000u,
    /* 0xF8 */ 0xC3800000u, 0xC3900000u, 0xC3A00000u, 0xC3B00000u, 0xC3C00000u, 0xC3D00000u, 0xC3E00000u, 0x7FFFFFFFu,
}};

/* E5M2: code = S.EEEEE.MM, bias 15; E=0: M * 2^-16; else (4+M) * 2^(E-17);
 * E=31: M=0 is +-inf, M!=0 is NaN (decoded as 0x7FFFFFFF like CUDA). */
static const m3s_fp8_table k_e5m2 = {{
    /* 0x00 */ 0x00000000u, 0x37800000u, 0x38000000u, 0x38400000u, 0x38800000u, 0x38A00000u, 0x38C00000u, 0x38E00000u,
    /* 0x08 */ 0x39000000u, 0x39200000u, 0x39400000u, 0x39600000u, 0x39800000u, 0x39A00000u, 0x39C00000u, 0x39E00000u,
    /* 0x10 */ 0x3A000000u, 0x3A200000u, 0x3A400000u, 0x3A600000u, 0x3A800000u, 0x3AA00000u, 0x3AC00000u, 0x3AE00000u,
    /* 0x18 */ 0x3B000000u, 0x3B200000u, 0x3B400000u, 0x3B600000u, 0x3B800000u, 0x3BA00000u, 0x3BC00000u, 0x3BE00000u,
    /* 0x20 */ 0x3C000000u, 0x3C200000u, 0x3C400000u, 0x3C600000u, 0x3C800000u, 0x3CA00000u, 0x3CC00000u, 0x3CE00000u,
    /* 0x28 */ 0x3D000000u, 0x3D200000u, 0x3D400000u, 0x3D600000u, 0x3D800000u, 0x3DA00000u, 0x3DC00000u, 0x3DE00000u,
    /* 0x30 */ 0x3E000000u, 0x3E200000u, 0x3E400000u, 0x3E600000u, 0x3E800000u, 0x3EA00000u, 0x3EC00000u, 0x3EE00000u,
    /* 0x38 */ 0x3F000000u, 0x3F200000u, 0x3F400000u, 0x3F600000u, 0x3F800000u, 0x3FA00000u, 0x3FC00000u, 0x3FE00000u,
    /* 0x40 */ 0x40000000u, 0x40200000u, 0x40400000u, 0x40600000u, 0x40800000u, 0x40A00000u, 0x40C00000u, 0x40E00000u,
    /* 0x48 */ 0x41000000u, 0x41200000u, 0x41400000u, 0x41600000u, 0x41800000u, 0x41A00000u, 0x41C00000u, 0x41E00000u,
    /* 0x50 */ 0x42000000u, 0x42200000u, 0x42400000u, 0x42600000u, 0x42800000u, 0x42A00000u, 0x42C00000u, 0x42E00000u,
    /* 0x58 */ 0x43000000u, 0x43200000u, 0x43400000u, 0x43600000u, 0x43800000u, 0x43A00000u, 0x43C00000u, 0x43E00000u,
    /* 0x60 */ 0x44000000u, 0x44200000u, 0x44400000u, 0x44600000u, 0x44800000u, 0x44A00000u, 0x44C00000u, 0x44E00000u,
    /* 0x68 */ 0x45000000u, 0x45200000u, 0x45400000u, 0x45600000u, 0x45800000u, 0x45A00000u, 0x45C00000u, 0x45E00000u,
    /* 0x70 */ 0x46000000u, 0x46200000u, 0x46400000u, 0x46600000u, 0x46800000u, 0x46A00000u, 0x46C00000u, 0x46E00000u,
    /* 0x78 */ 0x47000000u, 0x47200000u, 0x47400000u, 0x47600000u, 0x7F800000u, 0x7FFFFFFFu, 0x7FFFFFFFu, 0x7FFFFFFFu,
    /* 0x80 */ 0x80000000u, 0xB7800000u, 0xB8000000u, 0xB8400000u, 0xB8800000u, 0xB8A00000u, 0xB8C00000u, 0xB8E00000u,
    /* 0x88 */ 0xB9000000u, 0xB9200000u, 0xB9400000u, 0xB9600000u, 0xB9800000u, 0xB9A00000u, 0xB9C00000u, 0xB9E00000u,
    /* 0x90 */ 0xBA000000u, 0xBA200000u, 0xBA400000u, 0xBA600000u, 0xBA800000u, 0xBAA00000u, 0xBAC00000u, 0xBAE00000u,
    /* 0x98 */ 0xBB000000u, 0xBB200000u, 0xBB400000u, 0xBB600000u, 0xBB800000u, 0xBBA00000u, 0xBBC00000u, 0xBBE00000u,
    /* 0xA0 */ 0xBC000000u, 0xBC200000u, 0xBC400000u, 0xBC600000u, 0xBC800000u, 0xBCA00000u, 0xBCC00000u, 0xBCE00000u,
    /* 0xA8 */ 0xBD000000u, 0xBD200000u, 0xBD400000u, 0xBD600000u, 0xBD800000u, 0xBDA00000u, 0xBDC00000u, 0xBDE00000u,
    /* 0xB0 */ 0xBE000000u, 0xBE200000u, 0xBE400000u, 0xBE600000u, 0xBE800000u, 0xBEA00000u, 0xBEC00000u, 0xBEE00000u,
    /* 0xB8 */ 0xBF000000u, 0xBF200000u, 0xBF400000u, 0xBF600000u, 0xBF800000u, 0xBFA00000u, 0xBFC00000u, 0xBFE00000u,
    /* 0xC0 */ 0xC0000000u, 0xC0200000u, 0xC0400000u, 0xC0600000u, 0xC0800000u, 0xC0A00000u, 0xC0C00000u, 0xC0E00000u,
    /* 0xC8 */ 0xC1000000u, 0xC1200000u, 0xC1400000u, 0xC1600000u, 0xC1800000u, 0xC1A00000u, 0xC1C00000u, 0xC1E00000u,
    /* 0xD0 */ 0xC2000000u, 0xC2200000u, 0xC2400000u, 0xC2600000u, 0xC2800000u, 0xC2A00000u, 0xC2C00000u, 0xC2E00000u,
    /* 0xD8 */ 0xC3000000u, 0xC3200000u, 0xC3400000u, 0xC3600000u, 0xC3800000u, 0xC3A00000u, 0xC3C00000u, 0xC3E00000u,
    /* 0xE0 */ 0xC4000000u, 0xC4200000u, 0xC4400000u, 0xC4600000u, 0xC4800000u, 0xC4A00000u, 0xC4C00000u, 0xC4E00000u,
    /* 0xE8 */ 0xC5000000u, 0xC5200000u, 0xC5400000u, 0xC5600000u, 0xC5800000u, 0xC5A00000u, 0xC5C00000u, 0xC5E00000u,
    /* 0xF0 */ 0xC6000000u, 0xC6200000u, 0xC6400000u, 0xC6600000u, 0xC6800000u, 0xC6A00000u, 0xC6C00000u, 0xC6E00000u,
    /* 0xF8 */ 0xC7000000u, 0xC7200000u, 0xC7400000u, 0xC7600000u, 0xFF800000u, 0x7FFFFFFFu, 0x7FFFFFFFu, 0x7FFFFFFFu,
}};

const float *m3s_e4m3_table(void) { return k_e4m3.f; }
const float *m3s_e5m2_table(void) { return k_e5m2.f; }

float m3s_e4m3_to_f32(uint8_t b) { return k_e4m3.f[b]; }
float m3s_e5m2_to_f32(uint8_t b) { return k_e5m2.f[b]; }

static uint32_t f32_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

static float f32_from_bits(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

/* RNE of m >> s for 1 <= s <= 31 (see the file-top comment). */
static uint32_t rne_shift(uint32_t m, unsigned s) {
  return (m + ((1u << (s - 1u)) - 1u) + ((m >> s) & 1u)) >> s;
}

/* ---- bf16 ---- */

float m3s_bf16_to_f32(uint16_t h) { return m3s_bf16_to_f32_inline(h); }

uint16_t m3s_f32_to_bf16(float f) { return m3s_f32_to_bf16_inline(f); }

/* ---- f16 ---- */

float m3s_f16_to_f32(uint16_t h) {
  uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
  uint32_t e = ((uint32_t)h >> 10) & 0x1Fu;
  uint32_t m = (uint32_t)h & 0x3FFu;
  if (e == 0x1Fu) return f32_from_bits(m ? 0x7FFFFFFFu : (sign | 0x7F800000u));
  if (e == 0u) {
    /* zero or subnormal: m * 2^-24; exact in f32 (m < 2^10, result normal). */
    float v = (float)m * 0x1p-24f;
    return sign ? -v : v;
  }
  /* normal: rebias the exponent by 127 - 15 = 112, widen the mantissa. */
  return f32_from_bits(sign | ((e + 112u) << 23) | (m << 13));
}

uint16_t m3s_f32_to_f16(float f) {
  uint32_t x = f32_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t a = x & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return (uint16_t)0x7FFFu;           /* NaN (CUDA: sign dropped) */
  if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u); /* >= 65520 = 65504 + ulp/2,
                                                              a tie that goes to the even
                                                              0x7C00: inf; also inf itself */
  if (a >= 0x38800000u) {                                  /* >= 2^-14: normal result */
    /* subtract (127 - 15) << 23 to rebias, then drop 13 mantissa bits. */
    return (uint16_t)(sign | rne_shift(a - 0x38000000u, 13u));
  }
  /* subnormal result, unit 2^-24. |f| = m * 2^(e - 150) with the implicit bit,
   * so the code is m * 2^(e - 126) = m >> (126 - e). Shifts above 24 leave
   * less than half a unit: zero. (Also covers f32 zeros and subnormals, e=0.) */
  {
    uint32_t e = a >> 23;
    if (e < 102u) return (uint16_t)sign;
    return (uint16_t)(sign | rne_shift((a & 0x7FFFFFu) | 0x800000u, 126u - e));
  }
}

/* ---- FP8 (saturating) ----
 * mbits mantissa bits, exponent bias, max_bits = f32 bits of the largest finite
 * value and max_code its code. Codes of non-negative values are ordered like
 * their values, so RNE on the rebiased f32 significand gives the code. */
static uint8_t f32_to_fp8_sat(float f, unsigned mbits, unsigned bias, uint32_t max_bits,
                              uint8_t max_code) {
  uint32_t x = f32_bits(f);
  uint8_t sign = (uint8_t)((x >> 24) & 0x80u);
  uint32_t a = x & 0x7FFFFFFFu;
  uint32_t min_norm_bits = (127u + 1u - bias) << 23; /* 2^(1 - bias) */
  if (a > 0x7F800000u) return (uint8_t)0x7Fu;        /* NaN (CUDA: sign dropped) */
  /* Saturate: everything from the max up (including +-inf) gives +-max. Values
   * just below the max round to it or below, never past it, so this is the
   * only place overflow can occur. */
  if (a >= max_bits) return (uint8_t)(sign | max_code);
  if (a >= min_norm_bits) {
    /* rebias the exponent from 127 to bias, drop 23 - mbits mantissa bits. */
    return (uint8_t)(sign | rne_shift(a - ((127u - bias) << 23), 23u - mbits));
  }
  /* subnormal result, unit 2^(1 - bias - mbits): the code is m * 2^(e - 150)
   * / 2^(1 - bias - mbits) = m >> (151 - bias - mbits - e), m with the
   * implicit bit. A shift over 24 leaves less than half a unit: zero (this also
   * catches f32 zeros and subnormals). Signed zero keeps the sign, as in CUDA. */
  {
    uint32_t e = a >> 23;
    uint32_t s = 151u - bias - mbits - e; /* >= 24 - mbits since a < 2^(1-bias) */
    if (s > 24u) return sign;
    return (uint8_t)(sign | rne_shift((a & 0x7FFFFFu) | 0x800000u, s));
  }
}

uint8_t m3s_f32_to_e4m3(float f) {
  /* max 448 = 1.75 * 2^8 = 0x43E00000 -> code 0x7E (0x7F is NaN). */
  return f32_to_fp8_sat(f, 3u, 7u, 0x43E00000u, (uint8_t)0x7Eu);
}

uint8_t m3s_f32_to_e5m2(float f) {
  /* max 57344 = 1.75 * 2^15 = 0x47600000 -> code 0x7B (0x7C is inf). */
  return f32_to_fp8_sat(f, 2u, 15u, 0x47600000u, (uint8_t)0x7Bu);
}
