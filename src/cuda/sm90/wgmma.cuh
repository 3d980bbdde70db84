/* wgmma (sm_90a) helpers of the CUDA backend: shared-memory matrix
 * descriptors of the 128-byte swizzle that TMA writes, and warpgroup MMAs
 * with A from registers (the mma.m16n8k16 A layout per warp: warp w of the
 * warpgroup holds rows 16 w .. 16 w + 15), fp32 accumulators in the m16n8
 * C layout repeated over N / 8 tiles: d[j][0..1] row lane / 4, d[j][2..3]
 * row lane / 4 + 8, columns 8 j + 2 (lane & 3) + {0, 1}. The caller fences
 * (wg_fence) after touching the accumulators, commits and waits
 * (wg_commit_wait) before reading them. sm_90a only (a trap elsewhere).
 * Used by sm90/topk_tc.cu (scores) and sm90/attention_union.cu. */
#ifndef M3S_CUDA_SM90_WGMMA_CUH
#define M3S_CUDA_SM90_WGMMA_CUH

#include <stdint.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define M3S_WGMMA 1
#else
#define M3S_WGMMA 0
#endif

/* Descriptor of a K-major operand (rows of 128 B along K, 16-byte pieces
 * XOR-ed with the row's low 3 bits, 1024-byte atoms of 8 rows): leading
 * offset unused (1), stride offset 1024 B between 8-row groups, SWIZZLE_128B;
 * a k-step of 16 two-byte elements inside the atom is the start plus 32 B. */
static __device__ __forceinline__ unsigned long long wg_desc_k_sw128(uint32_t saddr) {
  return (unsigned long long)((saddr & 0x3FFFF) >> 4) | (1ull << 16) |
         ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}

/* Descriptor of an MN-major operand in the same swizzle (rows of 128 B
 * along MN: 64 two-byte elements of one k; 8 k-rows per 1024-byte atom):
 * leading offset `mn_stride` between atoms along MN (the next 64 elements),
 * stride offset 1024 B between atoms along K (the next 8 k). */
static __device__ __forceinline__ unsigned long long wg_desc_mn_sw128(uint32_t saddr,
                                                                      uint32_t mn_stride) {
  return (unsigned long long)((saddr & 0x3FFFF) >> 4) |
         ((unsigned long long)((mn_stride & 0x3FFFF) >> 4) << 16) |
         ((unsigned long long)(1024 >> 4) << 32) | (1ull << 62);
}

static __device__ __forceinline__ void wg_fence() {
#if M3S_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

/* The commit and the wait as two steps: wg_wait<N> returns once at most N
 * of the warpgroup's committed groups are pending (groups complete in
 * order), so a warpgroup can read one accumulator while the next group
 * still runs. */
static __device__ __forceinline__ void wg_commit() {
#if M3S_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

template <int N>
static __device__ __forceinline__ void wg_wait() {
#if M3S_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

static __device__ __forceinline__ void wg_commit_wait() {
  wg_commit();
  wg_wait<0>();
}

/* Pins accumulator registers in place for the compiler: no access to them
 * moves across this point (an empty asm that reads and writes each). Around
 * a wgmma chain (before it, and after its wait) the accumulators' plain
 * uses cannot then be scheduled between the asynchronous mma and the wait
 * (CUTLASS's warpgroup_fence_operand does the same). */
template <int N>
static __device__ __forceinline__ void wg_pin(float (&d)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; j++)
#pragma unroll
    for (int e = 0; e < 4; e++)
      asm volatile("" : "+f"(d[j][e])::"memory");
}

/* The same for A fragments in registers (16-bit pairs): computed before
 * the fence, and live until the wait, as the ISA asks of the registers an
 * asynchronous mma reads (CUTLASS fences register A operands alike). */
template <int N>
static __device__ __forceinline__ void wg_pin(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; j++)
#pragma unroll
    for (int e = 0; e < 4; e++)
      asm volatile("" : "+r"(a[j][e])::"memory");
}

/* The accumulator operands of an m64n64 (32 floats) or m64n128 (64 floats)
 * wgmma: the register list of the instruction and the asm outputs that bind
 * it to d[tile][4], shared by the f16 and bf16 forms below (tiles 8-15 of
 * the m64n128 form are the m64n64 list of d + 8). */
#define WG_D32 "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define WG_D32_OUT(d) \
  "+f"((d)[0][0]), "+f"((d)[0][1]), "+f"((d)[0][2]), "+f"((d)[0][3]), \
  "+f"((d)[1][0]), "+f"((d)[1][1]), "+f"((d)[1][2]), "+f"((d)[1][3]), \
  "+f"((d)[2][0]), "+f"((d)[2][1]), "+f"((d)[2][2]), "+f"((d)[2][3]), \
  "+f"((d)[3][0]), "+f"((d)[3][1]), "+f"((d)[3][2]), "+f"((d)[3][3]), \
  "+f"((d)[4][0]), "+f"((d)[4][1]), "+f"((d)[4][2]), "+f"((d)[4][3]), \
  "+f"((d)[5][0]), "+f"((d)[5][1]), "+f"((d)[5][2]), "+f"((d)[5][3]), \
  "+f"((d)[6][0]), "+f"((d)[6][1]), "+f"((d)[6][2]), "+f"((d)[6][3]), \
  "+f"((d)[7][0]), "+f"((d)[7][1]), "+f"((d)[7][2]), "+f"((d)[7][3])
#define WG_D64 "{" \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define WG_D64_OUT(d) WG_D32_OUT(d), WG_D32_OUT((d) + 8)

/* d (m64n64, 8 tiles) += A (16-bit, registers) x B (K-major at desc: 64
 * columns x 16 k). F16: f16 operands, else bf16. */
template <bool F16>
static __device__ __forceinline__ void wg_mma_n64(float (&d)[8][4], const uint32_t (&a)[4],
                                                  unsigned long long desc) {
#if M3S_WGMMA
  if (F16)
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
                 WG_D32 ", {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
                 : WG_D32_OUT(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1));
  else
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
                 WG_D32 ", {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
                 : WG_D32_OUT(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1));
#else
  (void)d, (void)a, (void)desc;
  __trap();
#endif
}

/* d (m64n128, 16 tiles) = A (16-bit, registers) x B (K-major at desc: 128
 * columns x 16 k), plus d unless accumulate is 0 (the first k-step of a
 * tile: no zeroing pass). F16: f16 operands, else bf16. */
template <bool F16>
static __device__ __forceinline__ void wg_mma_n128(float (&d)[16][4], const uint32_t (&a)[4],
                                                  unsigned long long desc, int accumulate) {
#if M3S_WGMMA
  if (F16)
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
                 WG_D64 ", {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
                 : WG_D64_OUT(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
  else
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
                 WG_D64 ", {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
                 : WG_D64_OUT(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
#else
  (void)d, (void)a, (void)desc, (void)accumulate;
  __trap();
#endif
}

/* d (m64n128, 16 tiles) += A (16-bit, registers) x B (MN-major at desc:
 * 16 k x 128 columns, the transposed-B form). F16: f16 operands, else
 * bf16. */
template <bool F16>
static __device__ __forceinline__ void wg_mma_n128_mn(float (&d)[16][4], const uint32_t (&a)[4],
                                                      unsigned long long desc) {
#if M3S_WGMMA
  if (F16)
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
                 WG_D64 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : WG_D64_OUT(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1));
  else
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
                 WG_D64 ", {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : WG_D64_OUT(d)
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(1));
#else
  (void)d, (void)a, (void)desc;
  __trap();
#endif
}

#endif
