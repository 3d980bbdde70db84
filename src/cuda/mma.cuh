/* PTX wrappers for the tensor-core kernels of the CUDA backend (sm_80 and
 * up): the shared-memory address of a pointer, ldmatrix, mma.sync
 * m16n8k16 / m16n8k8 with fp32 accumulation, and fp8 codes widened to f16
 * operands. Used by the attention kernels
 * (attention.cuh) and the certified top-k score kernels (topk_decode.cu,
 * sm90/topk_tc.cu). */
#ifndef M3S_CUDA_MMA_CUH
#define M3S_CUDA_MMA_CUH

#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <stdint.h>

static __device__ __forceinline__ uint32_t smem_addr(const void *p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

static __device__ __forceinline__ void ldsm_x4(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

static __device__ __forceinline__ void ldsm_x4_trans(uint32_t r[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

/* d += a * b, m16n8k16, fp32 accumulate; F16 picks the f16 or bf16 form. */
template <bool F16>
static __device__ __forceinline__ void mma16816(float d[4], const uint32_t a[4], uint32_t b0,
                                         uint32_t b1) {
  if (F16)
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* d += a * b, m16n8k8 (a0: rows 0-7, a1: rows 8-15; b: one word), fp32
 * accumulate; F16 picks the f16 or bf16 form. */
template <bool F16>
static __device__ __forceinline__ void mma1688(float d[4], uint32_t a0, uint32_t a1, uint32_t b) {
  if (F16)
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(b));
  else
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(b));
}

/* Four fp8 codes (low byte first; e5m2 if E5M2, else e4m3) as two words of
 * two f16 each, exactly (every e4m3 and e5m2 value is an f16; NaN stays
 * NaN). sm_89+: one cvt.rn.f16x2 per pair, the high pair read in place (no
 * shift, which __nv_cvt_fp8x2_to_halfraw2 of v >> 16 costs). */
template <bool E5M2>
static __device__ __forceinline__ void fp8x4_to_f16x4(uint32_t v, uint32_t &lo, uint32_t &hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  if (E5M2)
    asm("{\n\t.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\t"
        "cvt.rn.f16x2.e5m2x2 %0, l;\n\tcvt.rn.f16x2.e5m2x2 %1, h;\n\t}"
        : "=r"(lo), "=r"(hi)
        : "r"(v));
  else
    asm("{\n\t.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\t"
        "cvt.rn.f16x2.e4m3x2 %0, l;\n\tcvt.rn.f16x2.e4m3x2 %1, h;\n\t}"
        : "=r"(lo), "=r"(hi)
        : "r"(v));
#else
  const __nv_fp8_interpretation_t k = E5M2 ? __NV_E5M2 : __NV_E4M3;
  const __half2_raw l = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(v & 0xffffu), k);
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(v >> 16), k);
  lo = (uint32_t)l.x | (uint32_t)l.y << 16;
  hi = (uint32_t)h.x | (uint32_t)h.y << 16;
#endif
}

#endif
