/* CUDA backend: block scores of the lightning indexer for uniform decode
 * batches (SPEC section 3), streamed at memory speed and bit-identical to the
 * CPU backend by construction.
 *
 * What: S(t, g, b) = max over the visible keys j of block b of
 * m3s_dot128_fixed(iq[t, g], ik[j]), written into the workspace layout that
 * topk.cu's select_kernel reads (entry (t * Hkv + g) * max_nb + b, every pair
 * in one chunk), for the candidate blocks only (init <= b < nb(t) - local of
 * rows with nb(t) > K); select_kernel then picks the top-k unchanged.
 *
 * Covered (m3s_cuda_topk_decode_scores sets *ran = 0 otherwise, and topk.cu
 * runs its general score kernel): uniform_q_len 1..DEC_MAX_QLEN, Hkv x q_len
 * <= DEC_MAX_PAIRS, bf16 or e4m3 index cache at a 16-byte aligned address, a
 * device with the shared memory of one CTA.
 *
 * How launched: one kernel, decode_score_kernel<E4, NP>, DEC_THREADS = 256,
 * a persistent grid of min(R x max candidate blocks, resident CTAs) (host
 * bounds: R, max_seq_len, the SM count and the kernel's occupancy). Request
 * r's candidate blocks are [init, nb_last - local) (nb_last: the blocks of
 * its last token, which has the most); the batch's candidate blocks, in
 * request order, are cut on the device into one equal range per CTA
 * (cursor_start: one pass over the sequence lengths), so every CTA streams
 * the same number of blocks whatever the lengths, and one long request among
 * short ones spreads over the whole grid. Graph-safe.
 * (Until 2026-12-05 the work was items (request, split of U blocks) dealt
 * round-robin to the CTAs from host bounds: one 128K request among 63 of 4K
 * left 95 of 264 CTAs busy with 32-step chains, some CTAs two of them;
 * the score kernel took 91.7 us of the 97 us top-k, ncu, H200.)
 * Each CTA streams the index-cache pages of its range's blocks through a
 * DEC_STAGES-deep ring of cp.async 16-byte copies (the prefetch runs across
 * request boundaries; rows padded to 272 B bf16 / 144 B e4m3 so the shared reads
 * below are free of bank conflicts). Two threads per key slot: thread h (0, 1)
 * of slot j keeps the partial sums l = 4h..4h+3 of m3s_dot128_fixed, i.e. the
 * dims d with d % 8 in [4h, 4h + 4), in the CPU's order (d ascending, fp32
 * __fmul_rn then __fadd_rn, no contraction); one shuffle brings the other four and
 * both threads add the eight in the fixed tree ((a0+a4)+(a1+a5)) +
 * ((a2+a6)+(a3+a7)) (fp32 addition is commutative, so either thread gets the
 * same bits). Keys are widened exactly (bf16: bits << 16; e4m3: through
 * fp16, as the CPU) once per 32-dim chunk and used for NP (token, head) pairs
 * at a time; the request's queries are fp32 in shared memory (broadcast
 * reads). With e4m3 keys and bf16/f16 queries inside a range checked per
 * request, every product is exact in fp32 and __fmaf_rn gives the same bits
 * as __fmul_rn + __fadd_rn with half the instructions (exact_products).
 * Keys after the token's position count as NaN; the block maximum is fmaxf
 * (a warp butterfly, then the 8 warps), so it is NaN only when every visible
 * dot is NaN, as the CPU's. A page id outside [0, num_pages) is never
 * dereferenced: its block scores NaN for every pair that needs it (the same
 * rule as topk.cu's score kernel).
 *
 * Guards: requests whose seq_len is outside [q_len, max_seq_len] (padded: 0)
 * have no candidate blocks (select_kernel writes their -1 rows); every read and write is
 * in bounds for any table contents.
 *
 * Certified variant (decode_tc_kernel<E4, NT, TMA>, below): the same ranges and grid,
 * a ring of steps of tcd_fmt::nb blocks (e4m3 2, bf16 1), one CTA barrier
 * per step (a step's results are written by a few threads after the next
 * step's barrier, while the other warps score: tcd_small), for uniform
 * decode batches with bf16 queries and q_len x Hkv <= 16;
 * tensor-core scores S~ as S^T = K Q^T (mma.sync m16n8k16, a warp's 16 keys
 * as the rows, the request's pairs as one or two n8 tiles of columns), key
 * norms from the diagonal of m16n8k8 Gram tiles whose operands are runs of
 * the same key registers (no operand moves), (S~, E) for the certified
 * selection of sm90/topk_tc.cu, which dispatches to it. bf16 cache: bf16 mma, E =
 * tc_bound (docs/perf-notes.md, "Certified re-scoring: the bound").
 *
 * e4m3 cache on sm_90: the TMA form. Thread 0 alone reads the page ids and
 * copies each page with one tensor copy (16 KB, 128-byte swizzle) that
 * completes on its ring slot's mbarrier; the other threads wait on it
 * before the step's barrier. The cp.async form (every thread computing the
 * page ids and issuing 4 copies of 16 bytes per page) spent ~20% of warps
 * 1-7's instructions there (SASS, 2026-12-05). The swizzle puts the 16-byte
 * chunk u of key n at u ^ (n & 7); the mma rows g, g + 8 of a warp then
 * hold keys 16 w + 2 g, + 1 (not g, g + 8), so that the four keys of a
 * 16-lane phase differ in n & 6 and its 8-byte loads meet no bank twice.
 *
 * e4m3 cache: fp16 mma. Every e4m3 code is exactly an fp16 value (4
 * significant bits, exponents 2^-9 .. 2^8), so a key pair widens with one
 * cvt.rn.f16x2.e4m3x2 (the bf16 operands took e4m3 -> fp16 -> fp32 -> bf16,
 * four instructions per pair: the per-block work this kernel was bound by).
 * The bf16 query row q is scaled by 2^s, s from its largest |q_d| (that
 * element into [2^14, 2^15), below fp16's 65504; s <= 126), exactly, and
 * rounded to fp16, q': exact from fp16's smallest normal 2^-14 up, below it
 * off by at most 2^-25 (fp16 subnormal) and by less than 2^-14 even if
 * something flushes it, which is the figure used. Products q'_d k_d are
 * exact in fp32 (11 x 4 significant bits) and the mma accumulates in fp32
 * in 8 k-steps of 16, the tensor-core model of the bound; S~ = acc 2^-s.
 * In scaled units (nq' >= |q'|, nk >= |k|, A = sum |q_d k_d|, S the
 * reference dot, s the exact one):
 *   |acc - q'.k| <= tc_bound(nq', nk) (the bound's points 3, 5 on q');
 *   |q'.k - 2^s s| < 2^-14 sum |k_d| <= 2^-14 sqrt(128) nk;
 *   2^s |s - S| <= 20 u 2^s A + 2^s 2^-143, with 2^s A <= (nq' + 2^-14
 *   sqrt(128)) nk: the C = 600 u of tc_bound covers 20 u nq' nk next to
 *   the tensor cores' 2 x 288 u, the rest is below 2^-17 of the term above.
 * So E = (tc_bound(nq', nk) + 12 * 2^-14 nk) 2^-s + 2^-118, every operation
 * rounded up (tc_bound_f16; the 2^-118 unscaled covers the reference's
 * subnormal products, 2^-143, and the rounding of a subnormal S~, 2^-150),
 * infinite unless 2^-s nq' nk <= 2^125: then |q| |k| < 2^126 (|q| <= 2^-s
 * (nq' + 2^-14 sqrt(128)), and nq' >= 2^14 unless s = 126) and, as in
 * tc_bound, no partial sum of either order and no S~ overflows. The scaled
 * side never overflows (|q'| < 2^15 sqrt(128), e4m3 below 2^9). An Inf or
 * NaN query element makes nq' infinite or NaN, so E = inf (whole line, as
 * for bf16); an e4m3 NaN code widens to an fp16 NaN, so nk = inf.
 *
 * Measured (NVIDIA H200, docs/perf-notes.md, "Decode indexer: ..."): the
 * exact kernel 1.89 ms at 128 requests x 128K (2.3 TB/s, arithmetic-bound);
 * the certified one 1.03 ms there (m3s-bench, 88c5726; 4.17 TB/s, the copy
 * ceiling; the whole top-k 1.006 ms against vLLM's 1.032 in the peer run
 * at f34ec66), 3.2x faster than the exact one at q_len 4 (before this
 * layout), not faster for one request; with an e4m3 cache 0.71 ms (0.96
 * with the pairs as the mma rows, whose Gram operands took ~88 register
 * moves per block; 0.599 ms against vLLM's 0.679 at f34ec66, and on an H100
 * at 97% of its copy ceiling, perf-notes session 37). ncu, e4m3, before the
 * copy issue was trimmed (e3a7075): 61% of DRAM
 * bandwidth, 0.53 issued warps per scheduler at 16 warps per SM, ~333 warp
 * instructions per warp and block, ~40% of them outside the scoring (cursor,
 * page table, cp.async issue, barriers, writes). */
#include "launch.h"
#include "mma.cuh"
#include "topk_decode.cuh"
#include "sm90/tma.cuh"
#include "sm90/topk_tc.cuh"

#include <cudaTypedefs.h>
#include <stdint.h>
#include <type_traits>

#define FULL_MASK 0xffffffffu
#define DEC_THREADS 256 /* two threads per key slot of a block */
#define DEC_WARPS (DEC_THREADS / 32)
#define DEC_STAGES 3      /* pages in the cp.async ring */
#define DEC_MAX_QLEN 8    /* tokens per request */
#define DEC_MAX_PAIRS 32  /* (token, head) pairs per request */
#define DEC_CHUNK_DIMS 32 /* dims widened at a time */

/* Shared-memory geometry of one page per index-cache format. */
template <bool E4> struct dec_fmt {
  static constexpr int key_bytes = E4 ? 128 : 256; /* one key row */
  static constexpr int row = key_bytes + 16;       /* padded row */
  static constexpr int stage = M3S_BLOCK_SIZE * row;
  static constexpr int row_pieces = key_bytes / 16;
  static constexpr int pieces = M3S_BLOCK_SIZE * row_pieces / DEC_THREADS; /* per thread */
};

static_assert(M3S_INDEX_DIM == 128 && M3S_BLOCK_SIZE == 128,
              "the kernel maps two threads to each of 128 key slots of 128 dims");

template <bool E4> static constexpr size_t dec_smem_bytes(int pairs) {
  return (size_t)DEC_STAGES * dec_fmt<E4>::stage + (size_t)pairs * M3S_INDEX_DIM * sizeof(float);
}

typedef struct {
  m3s_cuda_batch b;
  const void *iq;
  m3s_dtype iq_dt;
  int64_t iq_s0, iq_s1;
  const unsigned char *ic; /* [num_pages, 128, 128] bf16 or e4m3, 16-byte aligned */
  int64_t num_pages;
  float *ws;
  int64_t max_nb; /* row stride of S */
  int qlen, hkv, pairs, topk, init, local;
  int short_q; /* queries bf16 or f16: at most 11 significant bits */
} dec_params;

typedef struct {
  float red[DEC_WARPS][DEC_MAX_PAIRS]; /* per-warp block maxima */
  int64_t pos[DEC_MAX_QLEN];           /* position of each token */
  int64_t nb[DEC_MAX_QLEN];            /* its blocks, 0 when it scores nothing */
  int page[DEC_STAGES];                /* page of each ring slot, -1: none */
  unsigned qmin, qmax;                 /* smallest nonzero and largest |query| as fp32 bits */
} dec_small;

/* ---------------------------------------------------------------------------
 * Work: each CTA's range of the batch's candidate blocks
 * ------------------------------------------------------------------------- */

typedef struct {
  int64_t blk, end; /* the current segment: blocks blk .. end - 1 of request r */
  int64_t rest;     /* blocks of the CTA's range after the segment */
  int r;            /* < 0: done */
} dec_cursor;

/* End of request r's candidate blocks (those of its last token), or -1 when
 * the request scores nothing (padded or inconsistent, or nb <= K). The same
 * validity as m3s_row_lookup for the rows of a uniform batch (num_tokens ==
 * num_reqs * q_len, checked on the host). */
template <class P> static __device__ __forceinline__ int64_t request_end(const P &p, int r) {
  int64_t seq = p.b.seq_lens[r * p.b.seq_stride];
  if (seq <= 0 || seq < p.qlen || seq > p.b.max_seq_len)
    return -1;
  int64_t nb = (seq - 1) / M3S_BLOCK_SIZE + 1;
  return nb > p.topk ? nb - p.local : -1;
}

/* Request r's candidate blocks: init .. request_end - 1, or none. */
template <class P> static __device__ __forceinline__ int64_t request_cand(const P &p, int r) {
  const int64_t e = request_end(p, r);
  return e > p.init ? e - p.init : 0;
}

/* cursor_start's shared memory (static, in every kernel that calls it; the
 * fit checks count it): the per-warp sums, then the request and offset of
 * the range's first block. */
typedef struct {
  int64_t sh[DEC_WARPS];
  int64_t at[2];
} dec_cursor_smem;

/* Exclusive prefix sum of x over the CTA's threads (thread order), and the
 * CTA's total; sh: DEC_WARPS entries. Every thread calls it. */
static __device__ int64_t cta_excl_sum(int64_t x, int64_t *total, int64_t *sh) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  int64_t inc = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int64_t y = __shfl_up_sync(0xffffffffu, inc, o);
    inc += lane >= o ? y : 0;
  }
  if (lane == 31)
    sh[w] = inc;
  __syncthreads();
  int64_t off = 0, tot = 0;
#pragma unroll
  for (int v = 0; v < DEC_WARPS; v++) {
    off += v < w ? sh[v] : 0;
    tot += sh[v];
  }
  __syncthreads(); /* sh is rewritten by the next call */
  *total = tot;
  return off + inc - x;
}

/* c at the segment of request r that starts at block blk and holds at most
 * `left` blocks of the range; requests without candidates are skipped (the
 * range's blocks all lie in requests that have some). */
template <class P>
static __device__ __forceinline__ void cursor_enter(const P &p, dec_cursor &c, int r, int64_t blk,
                                                    int64_t left) {
  int64_t cand = request_cand(p, r);
  while (cand == 0 && left > 0 && r + 1 < p.b.num_reqs) {
    r++;
    blk = p.init;
    cand = request_cand(p, r);
  }
  const int64_t room = p.init + cand - blk;
  const int64_t n = left < room ? left : room;
  c.r = n > 0 ? r : -1;
  c.blk = blk;
  c.end = blk + (n > 0 ? n : 0);
  c.rest = left - n;
}

/* This CTA's range of the batch's candidate blocks, as a cursor. The blocks
 * of all requests, in request order, are cut into gridDim.x equal ranges
 * (they differ by at most one block), CTA c taking range c: every CTA streams
 * the same number of blocks whatever the requests' lengths (one long request
 * among short ones spreads over the whole grid) and crosses few request
 * boundaries. From the sequence lengths on the device (graph-safe), in one
 * pass: thread t sums the candidates of a contiguous run of requests, one
 * CTA scan of those sums gives the total and each run's first block, and the
 * thread whose run holds the range's first block finds its request by
 * walking the run again (its own loads, from L1). Every thread calls it. */
template <class P> static __device__ dec_cursor cursor_start(const P &p) {
  __shared__ dec_cursor_smem cm;
  const int R = p.b.num_reqs;
  const int per = (R + DEC_THREADS - 1) / DEC_THREADS;
  const int r0 = (int)threadIdx.x * per, r1 = min(R, r0 + per);
  int64_t mine = 0, total = 0;
  for (int r = r0; r < r1; r++)
    mine += request_cand(p, r);
  const int64_t before = cta_excl_sum(mine, &total, cm.sh);
  const int64_t lo = total * blockIdx.x / gridDim.x, hi = total * (blockIdx.x + 1) / gridDim.x;
  dec_cursor c;
  c.r = -1;
  if (lo >= hi)
    return c;
  if (before <= lo && lo < before + mine) {
    int64_t b = before;
    int r = r0;
    for (int64_t x = request_cand(p, r); b + x <= lo; x = request_cand(p, ++r))
      b += x;
    cm.at[0] = r;
    cm.at[1] = lo - b;
  }
  __syncthreads();
  cursor_enter(p, c, (int)cm.at[0], p.init + cm.at[1], hi - lo);
  return c;
}

/* c advanced by n blocks: within its segment, or to the range's next
 * segment (the next request with candidates). */
template <class P>
static __device__ __forceinline__ void cursor_advance(const P &p, dec_cursor &c, int n) {
  if (c.r < 0)
    return;
  c.blk += n;
  if (c.blk < c.end)
    return;
  if (c.rest <= 0 || c.r + 1 >= p.b.num_reqs) {
    c.r = -1;
    return;
  }
  cursor_enter(p, c, c.r + 1, p.init, c.rest);
}

/* ---------------------------------------------------------------------------
 * Page ring
 * ------------------------------------------------------------------------- */

static __device__ __forceinline__ void cp_async16(void *smem, const void *gmem) {
  unsigned s = (unsigned)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem) : "memory");
}

static __device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N> static __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* Every thread: its pieces of the page of cursor c into ring slot `stage`,
 * one commit group (empty when c is done or the page id is out of range). */
template <bool E4>
static __device__ void issue_page(const dec_params &p, const dec_cursor &c, unsigned char *stage,
                                  int *page_slot) {
  typedef dec_fmt<E4> F;
  if (c.r >= 0) {
    int64_t page = m3s_page(p.b.ibt, p.b.ibt_s0, p.b.ibt_s1, p.b.ibt_cols, c.r, c.blk, p.num_pages);
    if (threadIdx.x == 0)
      *page_slot = page >= 0 ? 0 : -1;
    if (page >= 0) {
      const unsigned char *src = p.ic + page * (int64_t)(M3S_BLOCK_SIZE * F::key_bytes);
#pragma unroll
      for (int m = 0; m < F::pieces; m++) {
        int piece = threadIdx.x + m * DEC_THREADS;
        int row = piece / F::row_pieces, col = piece % F::row_pieces;
        cp_async16(stage + row * F::row + col * 16, src + (int64_t)piece * 16);
      }
    }
  }
  cp_async_commit();
}

/* ---------------------------------------------------------------------------
 * Scoring
 * ------------------------------------------------------------------------- */

/* Every thread: request r's token positions and fp32 queries (pair pp =
 * token * Hkv + head at q[pp * 128]). */
static __device__ void stage_request(const dec_params &p, int r, dec_small &s, float *q) {
  int tid = threadIdx.x;
  if (tid == 0) {
    s.qmin = 0xffffffffu;
    s.qmax = 0;
  }
  __syncthreads();
  if (tid < p.qlen) {
    m3s_row_info ri = m3s_row_lookup(p.b, (int64_t)r * p.qlen + tid);
    int64_t nb = ri.valid ? ri.pos / M3S_BLOCK_SIZE + 1 : 0;
    s.pos[tid] = ri.pos;
    s.nb[tid] = nb > p.topk ? nb : 0;
  }
  unsigned lo = 0xffffffffu, hi = 0;
  for (int e = tid; e < p.pairs * M3S_INDEX_DIM; e += DEC_THREADS) {
    int pp = e / M3S_INDEX_DIM, d = e % M3S_INDEX_DIM;
    int64_t t = (int64_t)r * p.qlen + pp / p.hkv;
    float v = m3s_ld(p.iq, p.iq_dt, t * p.iq_s0 + (pp % p.hkv) * p.iq_s1 + d);
    q[e] = v;
    unsigned m = __float_as_uint(v) & 0x7fffffffu;
    hi = m > hi ? m : hi;
    lo = m != 0 && m < lo ? m : lo;
  }
  lo = __reduce_min_sync(FULL_MASK, lo);
  hi = __reduce_max_sync(FULL_MASK, hi);
  if ((tid & 31) == 0) {
    atomicMin(&s.qmin, lo);
    atomicMax(&s.qmax, hi);
  }
}

/* e4m3 keys: every product q * k of the request is exact in fp32, so
 * __fmaf_rn(q, k, acc) == __fadd_rn(acc, __fmul_rn(q, k)) bit for bit (one
 * rounding of the same exact value; signed zeros, infinities and NaN alike).
 * Exact because q has at most 11 significant bits (bf16/f16), k at most 4
 * (e4m3, subnormals 3), so q * k fits fp32's 24, and its magnitude stays
 * normal: nonzero finite |k| in [2^-9, 448], so nonzero |q| in [2^-117,
 * 2^119) keeps nonzero |q * k| in [2^-126, 2^128). A NaN or infinite query
 * fails the range (a NaN key gives NaN either way). */
static __device__ __forceinline__ int exact_products(const dec_params &p, const dec_small &s) {
  return p.short_q && s.qmin >= (127u - 117u) << 23 && s.qmax < (127u + 119u) << 23;
}

/* Block blk is a candidate of pair pp (token pp / Hkv). */
template <class P, class S>
static __device__ __forceinline__ int pair_needs(const P &p, const S &s, int pp, int64_t blk) {
  int64_t nb = s.nb[pp / p.hkv];
  return nb > 0 && blk >= p.init && blk < nb - p.local;
}

/* Four e4m3 codes (low byte first) as fp32, exactly: through fp16. */
static __device__ __forceinline__ void widen_e4m3x4(uint32_t u, float (&k)[4]) {
  float2 lo = __half22float2(
      __half2(__nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(u & 0xffffu), __NV_E4M3)));
  float2 hi = __half22float2(
      __half2(__nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(u >> 16), __NV_E4M3)));
  k[0] = lo.x;
  k[1] = lo.y;
  k[2] = hi.x;
  k[3] = hi.y;
}

/* This thread's 4 dims of each of the 4 groups of 8 dims of chunk ch, as
 * fp32: k[i][l] = key[8 * (4 * ch + i) + 4 * h + l]. */
template <bool E4>
static __device__ __forceinline__ void load_chunk(const unsigned char *row, int ch, int h,
                                                  float (&k)[4][4]) {
  if (!E4) {
#pragma unroll
    for (int i = 0; i < 4; i++) {
      uint2 w = *(const uint2 *)(row + (4 * ch + i) * 16 + h * 8);
      k[i][0] = __uint_as_float(w.x << 16);
      k[i][1] = __uint_as_float(w.x & 0xffff0000u);
      k[i][2] = __uint_as_float(w.y << 16);
      k[i][3] = __uint_as_float(w.y & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int m = 0; m < 2; m++) {
      /* groups 4ch + 2m and 4ch + 2m + 1, both halves; keep word h and 2 + h */
      uint4 v = *(const uint4 *)(row + (4 * ch + 2 * m) * 8);
      widen_e4m3x4(h ? v.y : v.x, k[2 * m]);
      widen_e4m3x4(h ? v.w : v.z, k[2 * m + 1]);
    }
  }
}

/* acc + q * k in m3s_dot128_fixed's rounding (FMA only where exact_products
 * holds, with the same bits). */
template <bool FMA> static __device__ __forceinline__ float mac(float acc, float q, float k) {
  return FMA ? __fmaf_rn(q, k, acc) : __fadd_rn(acc, __fmul_rn(q, k));
}

/* This thread's partial sums (its four of the eight, dims d ascending) of the
 * dots of its key half with the NP queries at q. */
template <bool E4, int NP, bool FMA>
static __device__ __forceinline__ void accumulate(const unsigned char *row, int h, const float *q,
                                                  float (&acc)[NP][4]) {
#pragma unroll
  for (int j = 0; j < NP; j++)
#pragma unroll
    for (int l = 0; l < 4; l++)
      acc[j][l] = 0.0f;
#pragma unroll
  for (int ch = 0; ch < M3S_INDEX_DIM / DEC_CHUNK_DIMS; ch++) {
    float k[4][4];
    load_chunk<E4>(row, ch, h, k);
#pragma unroll
    for (int j = 0; j < NP; j++) {
      const float *qp = q + j * M3S_INDEX_DIM + 4 * h;
#pragma unroll
      for (int i = 0; i < 4; i++) {
        float4 qv = *(const float4 *)(qp + (4 * ch + i) * 8);
        acc[j][0] = mac<FMA>(acc[j][0], qv.x, k[i][0]);
        acc[j][1] = mac<FMA>(acc[j][1], qv.y, k[i][1]);
        acc[j][2] = mac<FMA>(acc[j][2], qv.z, k[i][2]);
        acc[j][3] = mac<FMA>(acc[j][3], qv.w, k[i][3]);
      }
    }
  }
}

/* Every thread: S of block c.blk (keys in ring slot `page`) for each pair of
 * request c.r that needs it. */
template <bool E4, int NP>
static __device__ void score_block(const dec_params &p, const dec_cursor &c,
                                   const unsigned char *page, const float *q, dec_small &s) {
  int tid = threadIdx.x, h = tid & 1, lane = tid & 31, warp = tid >> 5;
  int slot = tid >> 1;
  const unsigned char *row = page + slot * dec_fmt<E4>::row;
  int64_t key_pos = c.blk * M3S_BLOCK_SIZE + slot;
  int fma = E4 && exact_products(p, s); /* uniform over the CTA */
#pragma unroll 1
  for (int p0 = 0; p0 < p.pairs; p0 += NP) {
    float acc[NP][4];
    if constexpr (E4) {
      if (fma)
        accumulate<E4, NP, true>(row, h, q + p0 * M3S_INDEX_DIM, acc);
      else
        accumulate<E4, NP, false>(row, h, q + p0 * M3S_INDEX_DIM, acc);
    } else {
      accumulate<E4, NP, false>(row, h, q + p0 * M3S_INDEX_DIM, acc);
    }
#pragma unroll
    for (int j = 0; j < NP; j++) {
      float o[4];
#pragma unroll
      for (int l = 0; l < 4; l++)
        o[l] = __shfl_xor_sync(FULL_MASK, acc[j][l], 1);
      /* ((a0+a4)+(a1+a5)) + ((a2+a6)+(a3+a7)), a = thread 0's sums then thread 1's */
      float d = __fadd_rn(__fadd_rn(__fadd_rn(acc[j][0], o[0]), __fadd_rn(acc[j][1], o[1])),
                          __fadd_rn(__fadd_rn(acc[j][2], o[2]), __fadd_rn(acc[j][3], o[3])));
      d = key_pos <= s.pos[(p0 + j) / p.hkv] ? d : NAN;
#pragma unroll
      for (int x = 16; x > 1; x >>= 1) /* lanes 2j and 2j+1 hold the same dot */
        d = fmaxf(d, __shfl_xor_sync(FULL_MASK, d, x));
      if (lane == 0)
        s.red[warp][p0 + j] = d;
    }
  }
  __syncthreads();
  if (tid < p.pairs && pair_needs(p, s, tid, c.blk)) {
    float m = s.red[0][tid];
#pragma unroll
    for (int w = 1; w < DEC_WARPS; w++)
      m = fmaxf(m, s.red[w][tid]);
    p.ws[((int64_t)c.r * p.pairs + tid) * p.max_nb + c.blk] = m;
  }
}

/* CTAs per SM for the register cap: what the shared memory allows (bf16 2,
 * e4m3 3), lowered to 2 where ptxas (nvcc 13.0) would spill under the cap
 * of 3 (e4m3 NP 4 and 8). */
template <bool E4, int NP> static constexpr int dec_min_ctas() { return E4 && NP <= 2 ? 3 : 2; }

template <bool E4, int NP>
static __global__ void __launch_bounds__(DEC_THREADS, dec_min_ctas<E4, NP>())
    decode_score_kernel(dec_params p) {
  typedef dec_fmt<E4> F;
  extern __shared__ __align__(16) unsigned char dsm[];
  __shared__ dec_small s;
  float *q = (float *)(dsm + DEC_STAGES * F::stage);
  dec_cursor pf = cursor_start(p), cs = pf;
  /* Prologue: the first DEC_STAGES - 1 pages */
#pragma unroll 1
  for (int st = 0; st < DEC_STAGES - 1; st++) {
    issue_page<E4>(p, pf, dsm + st * F::stage, &s.page[st]);
    cursor_advance(p, pf, 1);
  }
  int staged = -1, stage = 0;
  while (cs.r >= 0) {
    /* the slot scored one step ago is free (the barrier closing that step) */
    int ahead = (stage + DEC_STAGES - 1) % DEC_STAGES;
    issue_page<E4>(p, pf, dsm + ahead * F::stage, &s.page[ahead]);
    cursor_advance(p, pf, 1);
    if (cs.r != staged) {
      stage_request(p, cs.r, s, q);
      staged = cs.r;
    }
    cp_async_wait<DEC_STAGES - 1>();
    __syncthreads();
    if (s.page[stage] >= 0) {
      score_block<E4, NP>(p, cs, dsm + stage * F::stage, q, s);
    } else if (threadIdx.x < p.pairs && pair_needs(p, s, threadIdx.x, cs.blk)) {
      /* page id out of range: no keys, the block scores NaN */
      p.ws[((int64_t)cs.r * p.pairs + threadIdx.x) * p.max_nb + cs.blk] = NAN;
    }
    __syncthreads();
    cursor_advance(p, cs, 1);
    stage = (stage + 1) % DEC_STAGES;
  }
  cp_async_wait<0>();
}

/* ---------------------------------------------------------------------------
 * Certified variant: (S~, E) on tensor cores
 * ------------------------------------------------------------------------- */

/* Shared-memory page of the certified kernel: key rows unpadded (bf16 256 B,
 * e4m3 128 B), 16-byte pieces XOR-swizzled by the key's low bits so that the
 * fragment loads below are free of bank conflicts. bf16: warp w reads its 16
 * keys with ldmatrix, eight key rows of one 16-byte piece per 8x8 matrix;
 * piece x of key n sits at x ^ (n & 7), so the eight rows fall in eight
 * distinct 16-byte bank groups. e4m3: lane (g, c) reads, for k32 chunk s,
 * the 8 bytes of dims 32 s + 8 c .. + 7 of its key; 8-byte unit 4 s + c of
 * key n sits at unit (4 s + c) ^ 4 (n & 3) (the four keys of a 16-lane phase
 * use four 32-byte quarters). */
/* blocks per step; -D overrides are for A/B builds (perf-notes) */
#ifndef TCD_STEP_E4
#define TCD_STEP_E4 2
#endif
#ifndef TCD_STEP_BF16
#define TCD_STEP_BF16 1
#endif
template <bool E4> struct tcd_fmt {
  static constexpr int key_bytes = E4 ? 128 : 256;
  static constexpr int page = M3S_BLOCK_SIZE * key_bytes;
  static constexpr int row_pieces = key_bytes / 16;
  static constexpr int pieces = M3S_BLOCK_SIZE * row_pieces / DEC_THREADS; /* per thread */
  /* A step is nb consecutive blocks of one request, scored behind one CTA
   * barrier: the per-step cost (barriers, reductions, the exposed latency of
   * 16 warps per SM) is what bound the kernel, not the bytes (e4m3 took the
   * bf16 time for half the bytes with one block per step). */
  static constexpr int nb = E4 ? TCD_STEP_E4 : TCD_STEP_BF16;
  static constexpr int stage = nb * page;
  /* ring depth: 96 KB of pages per CTA (two CTAs per SM), at least two
   * steps */
  static constexpr int stages = 96 * 1024 / stage > 2 ? 96 * 1024 / stage : 2;
};
#define TCD_MAX_SLOTS 8 /* ring slots x blocks per step, largest tcd_fmt */
#define TCD_MAX_NB 4    /* blocks per step, largest tcd_fmt */
static_assert(tcd_fmt<true>::stages * tcd_fmt<true>::nb <= TCD_MAX_SLOTS &&
                  tcd_fmt<false>::stages * tcd_fmt<false>::nb <= TCD_MAX_SLOTS &&
                  tcd_fmt<true>::nb <= TCD_MAX_NB && tcd_fmt<false>::nb <= TCD_MAX_NB,
              "tcd_small holds one page entry per ring block and one reduction per step block");

template <bool E4> static constexpr size_t tcd_smem_bytes() {
  return (size_t)tcd_fmt<E4>::stages * tcd_fmt<E4>::stage;
}

/* The TMA form's ring starts at a 1024-byte boundary (the 128-byte swizzle
 * repeats every 8 rows of 128 bytes), which the dynamic shared memory does
 * not promise: 1 KB more. */
#define TCD_TMA_ALIGN 1024

/* Byte offset of 16-byte piece `piece` of key n in a page. */
template <bool E4> static __device__ __forceinline__ int tcd_piece_off(int n, int piece) {
  return E4 ? n * 128 + (piece ^ ((n & 3) << 1)) * 16 : n * 256 + (piece ^ (n & 7)) * 16;
}

typedef struct {
  m3s_cuda_batch b;
  const uint16_t *iq; /* bf16 [T, Hkv, 128] with strides iq_s0, iq_s1, 1 */
  int64_t iq_s0, iq_s1;
  const unsigned char *ic; /* [num_pages, 128, 128] bf16 or e4m3, 16-byte aligned */
  int64_t num_pages;
  float2 *ws;     /* (S~, E) [num_reqs * pairs][max_nb] */
  int64_t max_nb; /* row stride of ws */
  int qlen, hkv, pairs, topk, init, local;
  int pdl; /* launched with programmatic dependent launch: trigger the next (launch.h) */
  /* e4m3 cache on sm_90 (tcd_tma_map): the cache as [num_pages][128 keys][128
   * bytes], boxes of one page, 128-byte swizzle; the TMA kernels read it */
  CUtensorMap imap;
  m3s_topk_tc_stats *stats; /* test hook (topk_tc.h) or NULL */
} tcd_params;

/* The staged request: its tokens' blocks, its pairs' query norms (upper
 * bounds) and positions (-1 past the pairs) */
typedef struct {
  float qn[16];
  int64_t ppos[16];
  int64_t pmin; /* the least of the pairs' positions: every pair sees the keys up to it */
  int64_t nb[DEC_MAX_QLEN]; /* 0 when the token scores nothing */
} tcd_req;

/* e4m3: also each pair's 2^-s, which undoes the scaling of its fp16 query */
struct tcd_req_e4 : tcd_req {
  float qs[16];
};
template <bool E4> using tcd_req_of = typename std::conditional<E4, tcd_req_e4, tcd_req>::type;

/* One CTA barrier per step, (1): step i's pages and staged request are
 * visible, every warp's partials of step i - 1 are complete, and the ring
 * slot step i - 1 read is free (it is refilled after (1)). The partials go
 * to red / wnk of parity i & 1; the writers (tcd_writer) emit step i - 1's
 * results after (1) of step i, from the other parity and from what they
 * captured of step i - 1 in registers (tcd_pending), while the other warps
 * score step i. Parity i & 1 is rewritten only after (1) of step i + 2,
 * which the writers reach after emitting; a new request is staged into the
 * other request buffer, which no warp reads any more once it has passed (1)
 * of the step before. */
template <bool E4> struct tcd_small {
  float red[2][TCD_MAX_NB][DEC_WARPS][16]; /* per parity, step block, warp: maxima S~ per pair */
  float wnk[2][TCD_MAX_NB][DEC_WARPS];     /* per parity, step block, warp: largest G (tcd_key_norm) */
  tcd_req_of<E4> req[2];
  int page[TCD_MAX_SLOTS]; /* per ring block: 0 loaded, -1 page id out of range */
  unsigned long long full[TCD_MAX_SLOTS]; /* TMA form: per ring slot, its step's bytes landed */
};

/* The page ids of the step at c (blocks c.blk .. + nb - 1 of the segment, -1
 * past c.end, past the range or out of range). Loaded one step before
 * tcd_issue_step uses them, so the block-table load's latency hides behind
 * a step of scoring (waiting on it was the largest stall of the copy issue,
 * ncu, H200, 2026-12-03). */
template <bool E4>
static __device__ __forceinline__ void tcd_pages(const tcd_params &p, const dec_cursor &c,
                                                 int64_t (&pg)[tcd_fmt<E4>::nb]) {
#pragma unroll
  for (int j = 0; j < tcd_fmt<E4>::nb; j++)
    pg[j] = c.r >= 0 && c.blk + j < c.end
                ? m3s_page(p.b.ibt, p.b.ibt_s0, p.b.ibt_s1, p.b.ibt_cols, c.r, c.blk + j,
                           p.num_pages)
                : -1;
}

/* Every thread: its pieces of the step's pages pg (tcd_pages) into ring slot
 * `stage`, one commit group; thread 0 marks each block loaded (0) or not
 * (-1). Thread t copies pieces t + DEC_THREADS m of a page: key rows
 * DEC_THREADS / row_pieces apart, a multiple of 8, so the swizzle is the same
 * for all m and both offsets step by constants. */
template <bool E4>
static __device__ void tcd_issue_step(const int64_t (&pg)[tcd_fmt<E4>::nb], const tcd_params &p,
                                      unsigned char *stage, int *page_slot) {
  typedef tcd_fmt<E4> F;
  static_assert((DEC_THREADS / F::row_pieces) % 8 == 0, "one swizzle for all of a thread's pieces");
  const int t = threadIdx.x;
  const int dst0 = tcd_piece_off<E4>(t / F::row_pieces, t % F::row_pieces);
#pragma unroll
  for (int j = 0; j < F::nb; j++) {
    if (t == 0)
      page_slot[j] = pg[j] >= 0 ? 0 : -1;
    if (pg[j] >= 0) {
      const unsigned char *src = p.ic + pg[j] * (int64_t)F::page + 16 * t;
      unsigned char *dst = stage + j * F::page + dst0;
#pragma unroll
      for (int m = 0; m < F::pieces; m++)
        cp_async16(dst + m * (DEC_THREADS / F::row_pieces) * F::key_bytes,
                   src + m * DEC_THREADS * 16);
    }
  }
  cp_async_commit();
}

/* The TMA form of tcd_issue_step (e4m3 cache, sm_90), thread 0 only: marks
 * the step's blocks, arrives on the slot's barrier expecting the bytes of
 * the loaded ones (none: the arrival alone completes the phase, so every
 * step's phase completes) and copies each loaded page whole, one tensor copy
 * of 16 KB, swizzled (tcd_lane_offsets). The other threads issue nothing
 * and never touch the page ids: the copy issue was ~20% of their
 * instructions (SASS, 2026-12-05). */
static __device__ void tcd_issue_step_tma(const int64_t (&pg)[tcd_fmt<true>::nb],
                                          const tcd_params &p, unsigned char *stage,
                                          int *page_slot, unsigned long long *full) {
  typedef tcd_fmt<true> F;
  unsigned bytes = 0;
#pragma unroll
  for (int j = 0; j < F::nb; j++) {
    page_slot[j] = pg[j] >= 0 ? 0 : -1;
    bytes += pg[j] >= 0 ? (unsigned)F::page : 0u;
  }
  sm90_bar_arrive_tx(full, bytes);
#pragma unroll
  for (int j = 0; j < F::nb; j++)
    if (pg[j] >= 0)
      sm90_tma_load_3d(stage + j * F::page, &p.imap, 0, 0, (int)pg[j], full);
}

/* The dims that lane c's words hold in k16 step x of both mma operands:
 * word hh (k slots 2c, 2c + 1, plus 8 for hh = 1) holds dims tcd_dim(x, hh, c)
 * and + 1. Keys and queries use the same permutation of k, which leaves
 * every dot unchanged. bf16: ldmatrix's order, 16 consecutive dims per
 * step; e4m3: the 8 bytes of dims 32 s + 8 c .. + 7 that one load gives a
 * lane serve steps 2 s and 2 s + 1. */
template <bool E4> static __device__ __forceinline__ int tcd_dim(int x, int hh, int c) {
  return E4 ? 32 * (x >> 1) + 8 * c + 4 * (x & 1) + 2 * hh : 16 * x + 8 * hh + 2 * c;
}

/* Pair i of request r as lane c's B words (bf16 pairs, zero when i >=
 * pairs): w[x][hh] holds dims tcd_dim(x, hh, c) and + 1. */
template <bool E4>
static __device__ __forceinline__ void tcd_query_row(const tcd_params &p, int r, int i, int c,
                                                     uint32_t (&w)[8][2]) {
#pragma unroll
  for (int x = 0; x < 8; x++)
    w[x][0] = w[x][1] = 0;
  if (i >= p.pairs)
    return;
  const uint16_t *q =
      p.iq + ((int64_t)r * p.qlen + i / p.hkv) * p.iq_s0 + (int64_t)(i % p.hkv) * p.iq_s1;
#pragma unroll
  for (int x = 0; x < 8; x++)
#pragma unroll
    for (int hh = 0; hh < 2; hh++) {
      int d = tcd_dim<E4>(x, hh, c);
      w[x][hh] = (uint32_t)q[d] | ((uint32_t)q[d + 1] << 16);
    }
}

/* e4m3 cache: fp16 operands. Every e4m3 code is exactly an fp16 value, so a
 * key pair widens with one cvt.rn.f16x2.e4m3x2 and the mma runs on fp16; the
 * bf16 query is scaled by 2^s into fp16's range (tcd_stage_request) and S~, E
 * scaled back (tcd_emit), with the helpers of sm90/topk_tc.cuh that the
 * prefill score kernel's e4m3 form shares. Why this is exact up to E:
 * file-top comment. */

/* Every thread: request r's token blocks and pair positions into s, warp 0 its
 * pairs' query norms; every warp: its B fragments bq[n8 tile][k16 step][2],
 * tile nt holding pairs 8 nt .. 8 nt + 7 as its columns (lane (g, c): pair
 * 8 nt + g, the dims of tcd_dim). e4m3: the fragments are the rows scaled
 * by 2^s as fp16, their norms those of the fp16 rows, and warp 0 writes each
 * pair's 2^-s. */
template <bool E4, int NT, class S>
static __device__ void tcd_stage_request(const tcd_params &p, int r, S &s,
                                         uint32_t (&bq)[NT][8][2]) {
  const int tid = threadIdx.x, lane = tid & 31, g = lane >> 2, c = lane & 3;
  if (tid < p.qlen) {
    m3s_row_info ri = m3s_row_lookup(p.b, (int64_t)r * p.qlen + tid);
    int64_t nb = ri.valid ? ri.pos / M3S_BLOCK_SIZE + 1 : 0;
    s.nb[tid] = nb > p.topk ? nb : 0;
  }
  if (tid >= 32 && tid < 64) { /* warp 1 */
    const int i = tid - 32;
    const int64_t pos =
        i < p.pairs ? m3s_row_lookup(p.b, (int64_t)r * p.qlen + i / p.hkv).pos : INT64_MAX;
    if (i < 16)
      s.ppos[i] = i < p.pairs ? pos : -1;
    int64_t mn = pos;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1)
      mn = min(mn, (int64_t)__shfl_xor_sync(FULL_MASK, (long long)mn, o));
    if (i == 0)
      s.pmin = mn < 0 ? -1 : mn;
  }
#pragma unroll
  for (int nt = 0; nt < NT; nt++) {
    const int i = 8 * nt + g;
    uint32_t(&w)[8][2] = bq[nt];
    tcd_query_row<E4>(p, r, i, c, w);
    if constexpr (E4) {
      /* the row's largest |q_d| (the quad's maximum: a lane holds 32 dims
       * of pair i), its shift s, the row times 2^s as fp16 */
      uint32_t m = 0;
#pragma unroll
      for (int x = 0; x < 8; x++)
#pragma unroll
        for (int hh = 0; hh < 2; hh++)
          m = max(m, max(w[x][hh] & 0x7fffu, w[x][hh] >> 16 & 0x7fffu));
#pragma unroll
      for (int o = 1; o < 4; o <<= 1)
        m = max(m, __shfl_xor_sync(FULL_MASK, m, o));
      const int sh = tc_f16_shift(m);
      const float f = tc_pow2(sh);
#pragma unroll
      for (int x = 0; x < 8; x++)
#pragma unroll
        for (int hh = 0; hh < 2; hh++)
          w[x][hh] = tc_bf16x2_to_f16x2(w[x][hh], f);
      if (tid < 32 && c == 0)
        s.qs[i] = tc_pow2(-sh);
    }
    /* the norm from the same registers (the 4 lanes of a quad hold the
     * whole row), every operation rounded up */
    float sq = 0.0f;
#pragma unroll
    for (int x = 0; x < 8; x++)
#pragma unroll
      for (int hh = 0; hh < 2; hh++)
        sq = tc_sumsq2_ru<E4>(w[x][hh], sq);
#pragma unroll
    for (int o = 1; o < 4; o <<= 1)
      sq = __fadd_ru(sq, __shfl_xor_sync(FULL_MASK, sq, o));
    if (tid < 32 && c == 0) {
      float n = __fsqrt_ru(sq);
      s.qn[i] = isnan(n) ? INFINITY : n;
    }
  }
}

/* Lane offsets of the key fragment loads in a page (tcd_piece_off). bf16:
 * the row that lane l gives ldmatrix for k16 step x = 4 a + b is at ko[b] +
 * 128 a (matrix l / 8: keys + 8 for odd, dims + 8 for the upper two; row
 * l % 8). e4m3: the 8 bytes of k32 chunk s of key 16 w + g at ko[s], of key
 * 16 w + 8 + g at ko[s] + 1024; TMA form: of keys 16 w + 2 g and + 1 (the
 * mma rows g and g + 8) at ko[s] and (ko[s] ^ 16) + 128. */
template <bool E4, bool TMA>
static __device__ __forceinline__ void tcd_lane_offsets(uint32_t (&ko)[4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < 4; i++) {
    if (TMA) {
      /* the TMA form: 16-byte chunk u of key n at chunk u ^ (n & 7) (the
       * 128-byte swizzle); mma rows g, g + 8 hold keys 16 w + 2 g, + 1, so
       * that a 16-lane phase's four rows differ in n & 6 and its 8-byte
       * loads cover all 32 banks; the odd key's offset is (ko ^ 16) + 128 */
      const int n = 16 * warp + 2 * (lane >> 2), u = 4 * i + (lane & 3);
      ko[i] = n * 128 + (((u >> 1) ^ (n & 7)) << 4) + ((u & 1) << 3);
    } else if (E4) {
      const int n = 16 * warp + (lane >> 2);
      ko[i] = n * 128 + (((4 * i + (lane & 3)) ^ ((n & 3) << 2)) * 8);
    } else {
      const int m = lane >> 3, n = 16 * warp + 8 * (m & 1) + (lane & 7);
      ko[i] = tcd_piece_off<false>(n, 2 * i + (m >> 1));
    }
  }
}

/* The A fragment of k16 step x of the warp's 16 keys (rows g, g + 8 = keys
 * 16 w + g, 16 w + 8 + g; a[0], a[1] at dims tcd_dim(x, 0, c), a[2], a[3] at
 * tcd_dim(x, 1, c)). bf16: one ldmatrix.x4. e4m3: the chunk's two 8-byte
 * loads and four cvt per even step, kept in k[2][4] for the odd one; each
 * cvt writes its word where the fragment needs it, so no operand moves. */
template <bool E4, bool TMA>
static __device__ __forceinline__ void tcd_key_quad(const unsigned char *page,
                                                    const uint32_t (&ko)[4], int x,
                                                    uint32_t (&k)[2][4], uint32_t (&a)[4]) {
  if constexpr (E4) {
    if ((x & 1) == 0) {
      const uint32_t o = ko[x >> 1];
      uint2 v0 = *(const uint2 *)(page + o);
      uint2 v1 = *(const uint2 *)(page + (TMA ? (o ^ 16) + 128 : o + 1024));
      fp8x4_to_f16x4<false>(v0.x, k[0][0], k[0][1]);
      fp8x4_to_f16x4<false>(v0.y, k[0][2], k[0][3]);
      fp8x4_to_f16x4<false>(v1.x, k[1][0], k[1][1]);
      fp8x4_to_f16x4<false>(v1.y, k[1][2], k[1][3]);
    }
    const int h = x & 1;
    a[0] = k[0][2 * h];
    a[1] = k[1][2 * h];
    a[2] = k[0][2 * h + 1];
    a[3] = k[1][2 * h + 1];
  } else {
    ldsm_x4(a, smem_addr(page) + ko[x & 3] + 128 * (x >> 2));
  }
}

/* The block's key norm bound from its largest rounded-up Gram diagonal sum
 * G (tcd_block_partial): sqrt(G (1 + 2^-10) + 2^-119), rounded up. Both
 * steps are monotonic, so taking it once after the CTA's maximum gives
 * the bits that the warps' own roots' maximum gave (until 2026-12-05 every
 * warp took it for its 16 keys). */
static __device__ __forceinline__ float tcd_key_norm(float g) {
  return __fsqrt_ru(__fmaf_ru(g, 1.0f + 0x1p-10f, 0x1p-119f));
}

/* Every warp: its partial (S~ maxima, key norm) of block blk (keys in
 * `page`) into s.red[par][b][warp], s.wnk[par][b][warp]. Keys are the rows: S^T = K
 * Q^T with warp w's keys 16 w .. 16 w + 15 as the m16 A operand and the
 * pairs as NT n8 tiles of B. A page that was not loaded gives garbage here,
 * which tcd_capture marks. */
template <bool E4, int NT, bool TMA, class S, class R>
static __device__ __forceinline__ void tcd_block_partial(int64_t blk, int b, int par,
                                                         const unsigned char *page,
                                                         const uint32_t (&ko)[4],
                                                         const uint32_t (&bq)[NT][8][2],
                                                         const R &rq, S &s) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, cq = lane & 3;
  /* Scores, and the key norms on the tensor cores too: m16n8k8 Gram tiles
   * with A = {a0, a1} or {a2, a3} (keys g, g + 8 at the same dims) and B
   * one of those words: gram[hh][j] is the Gram block of the 16 keys against
   * tile j's 8 (keys 8 j .. 8 j + 7), over the dims of word hh, whose
   * diagonal is a partial squared norm of each key. Every operand is a run
   * of the quad a, so no register moves (the m16n8k16 Gram of the previous
   * layout needed ~88 per block). */
  float acc[NT][4], gram[2][2][4];
#pragma unroll
  for (int e = 0; e < 4; e++) {
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
      acc[nt][e] = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; j++)
      gram[j >> 1][j & 1][e] = 0.0f;
  }
  uint32_t k[2][4];
#pragma unroll
  for (int x = 0; x < 8; x++) {
    uint32_t a[4];
    tcd_key_quad<E4, TMA>(page, ko, x, k, a);
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
      mma16816<E4>(acc[nt], a, bq[nt][x][0], bq[nt][x][1]);
    mma1688<E4>(gram[0][0], a[0], a[1], a[0]);
    mma1688<E4>(gram[0][1], a[0], a[1], a[1]);
    mma1688<E4>(gram[1][0], a[2], a[3], a[2]);
    mma1688<E4>(gram[1][1], a[2], a[3], a[3]);
  }
  /* Largest key norm of the warp's 16 keys, an upper bound: key g of tile j
   * sits on the diagonal in lane (g, g / 2), element 2 j + (g & 1). The
   * products k_d^2 are exact (bf16, or e4m3 as fp16); on the tensor-core
   * model of the bound each half's fp32 sum of 64 positive terms in 8 k8
   * steps is >= (1 - 160 u) of its exact sum (docs/perf-notes.md, the k8
   * model), so their sum G, rounded up, has sum k_d^2 <= G (1 + 2^-10);
   * 2^-119 covers products that a flushing tensor core drops (128 below
   * 2^-126; an e4m3 square is at least 2^-18). NaN -> inf. The warp maximum
   * of these non-negative floats is that of their bits. */
  float nk = 0.0f;
  if (cq == (g >> 1)) {
#pragma unroll
    for (int j = 0; j < 2; j++) {
      float d = (g & 1) ? __fadd_ru(gram[0][j][2 * j + 1], gram[1][j][2 * j + 1])
                        : __fadd_ru(gram[0][j][2 * j], gram[1][j][2 * j]);
      nk = fmaxf(nk, isnan(d) ? INFINITY : d);
    }
  }
  /* the square root waits for the CTA's maximum (tcd_key_norm, in tcd_emit) */
  nk = __uint_as_float(__reduce_max_sync(FULL_MASK, __float_as_uint(nk)));
  /* Causal mask and column (pair) maxima over the visible keys; NaN dots are
   * ignored (their key norm is NaN, so E is infinite). Lane (g, c) holds
   * keys g, g + 8 of pairs 8 nt + 2 c, + 1 (elements e, 2 + e). Where every
   * pair sees the warp's 16 keys (every block of a request but its tokens'
   * last) the mask's 64-bit compares are skipped; fmaxf(.., -inf) keeps
   * the masked form's result when both dots are NaN. */
  const int64_t base = blk * M3S_BLOCK_SIZE + 16 * warp;
  float m[NT][2];
  if (base + 15 <= rq.pmin) { /* warp-uniform */
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
      for (int e = 0; e < 2; e++)
        m[nt][e] = fmaxf(fmaxf(acc[nt][e], acc[nt][2 + e]), -INFINITY);
  } else {
#pragma unroll
    for (int nt = 0; nt < NT; nt++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        const int64_t lim = rq.ppos[8 * nt + 2 * cq + e] - base; /* visible: key <= lim */
        const int k0 = TMA ? 2 * g : g, k1 = TMA ? 2 * g + 1 : g + 8; /* rows g, g + 8 */
        m[nt][e] = -INFINITY;
        if (k0 <= lim)
          m[nt][e] = fmaxf(m[nt][e], acc[nt][e]);
        if (k1 <= lim)
          m[nt][e] = fmaxf(m[nt][e], acc[nt][2 + e]);
      }
  }
#pragma unroll
  for (int nt = 0; nt < NT; nt++) {
#pragma unroll
    for (int o = 4; o < 32; o <<= 1)
#pragma unroll
      for (int e = 0; e < 2; e++)
        m[nt][e] = fmaxf(m[nt][e], __shfl_xor_sync(FULL_MASK, m[nt][e], o));
    if (g == 0) {
      s.red[par][b][warp][8 * nt + 2 * cq] = m[nt][0];
      s.red[par][b][warp][8 * nt + 2 * cq + 1] = m[nt][1];
    }
  }
  if (lane == 0)
    s.wnk[par][b][warp] = nk;
}

/* Thread b * pairs + i's role in writing a step's results: step block b, pair i and
 * its token (b = -1: no role). Fixed for the kernel, so the divisions run
 * once. */
typedef struct {
  int b, i, tok;
} tcd_writer;

template <bool E4> static __device__ tcd_writer tcd_writer_of(const tcd_params &p) {
  tcd_writer w = {-1, 0, 0};
  if ((int)threadIdx.x < tcd_fmt<E4>::nb * p.pairs) {
    w.b = threadIdx.x / p.pairs;
    w.i = threadIdx.x - w.b * p.pairs;
    w.tok = w.i / p.hkv;
  }
  return w;
}

/* What writer w needs of its step, captured after the step's barrier (1)
 * (the request buffer and page flag may be reused before it emits): where
 * (S~, E) of block w.b for pair w.i goes, whether the block is the segment's
 * and the pair needs it, whether its page was loaded, and the pair's query
 * norm (and 2^-s, e4m3). */
typedef struct {
  int64_t at;  /* entry of ws; -1: nothing to write */
  int page_ok; /* < 0: the block's page id was out of range */
  float qn, qs;
} tcd_pending;

template <bool E4, class R>
static __device__ __forceinline__ tcd_pending tcd_capture(const tcd_params &p, const dec_cursor &c,
                                                          const tcd_writer &w, int page_ok,
                                                          const R &rq) {
  tcd_pending d = {-1, page_ok, 0.0f, 1.0f};
  if (w.b < 0)
    return d;
  const int64_t blk = c.blk + w.b, nb = rq.nb[w.tok];
  if (blk >= c.end || nb <= 0 || blk < p.init || blk >= nb - p.local)
    return d;
  d.at = ((int64_t)c.r * p.pairs + w.i) * p.max_nb + blk;
  d.qn = rq.qn[w.i];
  if constexpr (E4)
    d.qs = rq.qs[w.i];
  return d;
}

/* Writer w emits its captured step from the warps' partials of parity par:
 * (S~, E), or (NaN, inf) for a page id out of range, as the prefill
 * kernel. */
template <bool E4, class S>
static __device__ __forceinline__ void tcd_emit(const tcd_params &p, const tcd_writer &w,
                                                const tcd_pending &d, const S &s, int par) {
  if (w.b < 0 || d.at < 0)
    return;
  float2 out = make_float2(NAN, INFINITY);
  if (d.page_ok >= 0) {
    float m = s.red[par][w.b][0][w.i], k = s.wnk[par][w.b][0];
#pragma unroll
    for (int v = 1; v < DEC_WARPS; v++) {
      m = fmaxf(m, s.red[par][w.b][v][w.i]);
      k = fmaxf(k, s.wnk[par][w.b][v]);
    }
    k = tcd_key_norm(k);
    if constexpr (E4) { /* back to unscaled units; S~ exact unless subnormal (then within 2^-150) */
      out = make_float2(__fmul_rn(m, d.qs), tc_bound_f16(d.qn, k, d.qs));
    } else {
      out = make_float2(m, tc_bound(d.qn, k));
    }
  }
  p.ws[d.at] = out;
}

/* The issuing thread(s): ring slot `slot` filled with the step of page ids
 * pg (either form), then pf advanced a step and the next step's page ids
 * loaded into pg, one step before they are issued (tcd_pages). */
template <bool E4, bool TMA, class S>
static __device__ __forceinline__ void tcd_refill(const tcd_params &p, dec_cursor &pf,
                                                  int64_t (&pg)[tcd_fmt<E4>::nb],
                                                  unsigned char *tsm, int slot, S &s) {
  typedef tcd_fmt<E4> F;
  if constexpr (TMA)
    tcd_issue_step_tma(pg, p, tsm + slot * F::stage, &s.page[slot * F::nb], &s.full[slot]);
  else
    tcd_issue_step<E4>(pg, p, tsm + slot * F::stage, &s.page[slot * F::nb]);
  cursor_advance(p, pf, F::nb);
  tcd_pages<E4>(p, pf, pg);
}

/* Persistent streaming kernel of the certified path: the ranges and cursor of
 * decode_score_kernel, tensor-core scores instead of the reference dots,
 * steps of tcd_fmt::nb blocks through a ring of tcd_fmt::stages steps. At
 * most 8 NT pairs per request (NT n8 tiles). TMA (e4m3 cache, sm_90): thread
 * 0 alone reads the page ids and copies each page by one tensor copy that
 * completes on the slot's mbarrier (tcd_issue_step_tma), instead of every
 * thread issuing its share of 16-byte cp.async. */
template <bool E4, int NT, bool TMA>
static __global__ void __launch_bounds__(DEC_THREADS, 2)
    decode_tc_kernel(const __grid_constant__ tcd_params p) {
  static_assert(!TMA || E4, "the TMA form reads an e4m3 cache");
  typedef tcd_fmt<E4> F;
  extern __shared__ __align__(128) unsigned char tsm_raw[];
  __shared__ tcd_small<E4> s;
  unsigned char *tsm = tsm_raw;
  const bool issuer = !TMA || threadIdx.x == 0; /* reads page ids, issues copies */
  if (TMA) {
    tsm += (TCD_TMA_ALIGN - (sm90_smem(tsm_raw) & (TCD_TMA_ALIGN - 1))) & (TCD_TMA_ALIGN - 1);
    if (threadIdx.x == 0) {
      if (p.stats)
        atomicAdd(&p.stats->tma_ctas, 1u);
#pragma unroll 1
      for (int st = 0; st < F::stages; st++)
        sm90_bar_init(&s.full[st], 1);
      sm90_fence_barrier_init();
    }
  }
  /* PDL (launch.h): everything below may read what earlier kernels wrote;
   * the grid is one resident wave, so the selection may start behind it */
  m3s_pdl_wait();
  if (p.pdl)
    m3s_pdl_trigger();
  dec_cursor pf = cursor_start(p), cs = pf; /* a CTA barrier: the mbarriers are initialised */
  int64_t pg[F::nb];
  if (issuer) {
    tcd_pages<E4>(p, pf, pg);
#pragma unroll 1
    for (int st = 0; st < F::stages - 1; st++)
      tcd_refill<E4, TMA>(p, pf, pg, tsm, st, s);
  }
  uint32_t ko[4], bq[NT][8][2];
  tcd_lane_offsets<E4, TMA>(ko);
  const tcd_writer wr = tcd_writer_of<E4>(p);
  tcd_pending pend = {-1, 0, 0.0f, 1.0f};
  int staged = -1, stage = 0, rb = 1, par = 0;
  unsigned phase = 0; /* TMA: the parity of this step's fill of its slot */
  while (cs.r >= 0) {
    if (cs.r != staged) {
      rb ^= 1;
      tcd_stage_request<E4, NT>(p, cs.r, s.req[rb], bq);
      staged = cs.r;
    }
    /* cp.async: committed steps 0 .. this + stages - 2, so leaving stages - 2
     * pending completes this step */
    if constexpr (TMA)
      sm90_bar_wait(&s.full[stage], phase);
    else
      cp_async_wait<F::stages - 2>();
    __syncthreads(); /* (1) */
    tcd_emit<E4>(p, wr, pend, s, par ^ 1);
    /* refill the slot of the step before, which every warp has left */
    if (issuer)
      tcd_refill<E4, TMA>(p, pf, pg, tsm, (stage + F::stages - 1) % F::stages, s);
    pend = tcd_capture<E4>(p, cs, wr, wr.b >= 0 ? s.page[stage * F::nb + wr.b] : -1, s.req[rb]);
#pragma unroll
    for (int b = 0; b < F::nb; b++)
      tcd_block_partial<E4, NT, TMA>(cs.blk + b, b, par, tsm + stage * F::stage + b * F::page, ko,
                                     bq, s.req[rb], s);
    cursor_advance(p, cs, F::nb);
    stage = (stage + 1) % F::stages;
    phase ^= stage == 0;
    par ^= 1;
  }
  __syncthreads();
  tcd_emit<E4>(p, wr, pend, s, par ^ 1);
  /* TMA: every copy issued was of a block of the range, whose step the loop
   * waited for, so none is in flight here */
  if (!TMA)
    cp_async_wait<0>();
}

/* ---------------------------------------------------------------------------
 * Host
 * ------------------------------------------------------------------------- */

typedef void (*dec_kernel_fn)(dec_params);

static dec_kernel_fn kernel_of(int e4, int np) {
  switch (np) {
  case 8: return e4 ? decode_score_kernel<true, 8> : decode_score_kernel<false, 8>;
  case 4: return e4 ? decode_score_kernel<true, 4> : decode_score_kernel<false, 4>;
  case 2: return e4 ? decode_score_kernel<true, 2> : decode_score_kernel<false, 2>;
  default: return e4 ? decode_score_kernel<true, 1> : decode_score_kernel<false, 1>;
  }
}

/* `need` bytes of shared memory (dynamic + static) fit the current device's
 * per-block opt-in limit. */
static cudaError_t device_fits(size_t need, int *fits) {
  int dev = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess)
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  *fits = err == cudaSuccess && (size_t)optin >= need;
  return err;
}

/* The exact kernel for the largest request of format e4. */
static cudaError_t dec_device_fits(int e4, int *fits) {
  return device_fits((e4 ? dec_smem_bytes<true>(DEC_MAX_PAIRS) : dec_smem_bytes<false>(DEC_MAX_PAIRS)) +
                         sizeof(dec_small) + sizeof(dec_cursor_smem),
                     fits);
}

/* The certified kernel of format e4 for up to 8 nt pairs (tma: its TMA
 * form, e4m3 only). */
static void (*tcd_kernel_of(int e4, int nt, int tma))(tcd_params) {
  if (tma)
    return nt == 1 ? decode_tc_kernel<true, 1, true> : decode_tc_kernel<true, 2, true>;
  if (e4)
    return nt == 1 ? decode_tc_kernel<true, 1, false> : decode_tc_kernel<true, 2, false>;
  return nt == 1 ? decode_tc_kernel<false, 1, false> : decode_tc_kernel<false, 2, false>;
}

/* Dynamic shared memory of the certified kernel of format e4 (and form). */
static size_t tcd_dyn_smem(int e4, int tma) {
  return (e4 ? tcd_smem_bytes<true>() : tcd_smem_bytes<false>()) + (tma ? TCD_TMA_ALIGN : 0);
}

/* The certified kernel of format e4 (its TMA form's 1 KB more included for
 * e4m3, so that either form may run where this says it fits). */
static cudaError_t tcd_device_fits(int e4, int *fits) {
  return device_fits(tcd_dyn_smem(e4, e4) +
                         (e4 ? sizeof(tcd_small<true>) : sizeof(tcd_small<false>)) +
                         sizeof(dec_cursor_smem),
                     fits);
}

extern "C" cudaError_t m3s_cuda_topk_decode_prepare(void) {
  static const int nps[4] = {1, 2, 4, 8};
  for (int e4 = 0; e4 < 2; e4++) {
    int fits = 0;
    cudaError_t err = tcd_device_fits(e4, &fits);
    if (err != cudaSuccess)
      return err;
    for (int f = 0; fits && f < (e4 ? 4 : 2) && err == cudaSuccess; f++)
      err = cudaFuncSetAttribute(tcd_kernel_of(e4, 1 + (f & 1), f >> 1),
                                 cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 (int)tcd_dyn_smem(e4, f >> 1));
    if (err != cudaSuccess)
      return err;
  }
  for (int e4 = 0; e4 < 2; e4++) {
    int fits = 0;
    cudaError_t err = dec_device_fits(e4, &fits);
    if (err != cudaSuccess)
      return err;
    if (!fits)
      continue; /* m3s_cuda_topk_decode_scores leaves such batches to topk.cu */
    int smem =
        (int)(e4 ? dec_smem_bytes<true>(DEC_MAX_PAIRS) : dec_smem_bytes<false>(DEC_MAX_PAIRS));
    for (int i = 0; i < 4; i++) {
      err = cudaFuncSetAttribute(kernel_of(e4, nps[i]), cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 smem);
      if (err != cudaSuccess)
        return err;
    }
  }
  return cudaSuccess;
}

/* The grid: a CTA per resident slot, fewer when the batch's host bound
 * (reqs x cand candidate blocks) has fewer blocks. */
static int64_t plan_grid(int64_t reqs, int64_t cand, int64_t slots) {
  const int64_t bound = reqs * (cand > 1 ? cand : 1);
  return bound < slots ? bound : slots;
}

m3s_status m3s_cuda_topk_decode_scores(m3s_context *ctx, const m3s_layer_config *cfg,
                                       const m3s_batch *batch, const m3s_tensor *iq,
                                       const m3s_tensor *index_cache, float *ws, int64_t max_nb,
                                       cudaStream_t stream, int *ran) {
  const char *fn = "m3s_index_topk";
  *ran = 0;
  int qlen = batch->uniform_q_len, hkv = cfg->num_kv_heads;
  m3s_dtype dt = index_cache->dtype;
  if (qlen < 1 || qlen > DEC_MAX_QLEN || hkv < 1 || hkv * qlen > DEC_MAX_PAIRS ||
      (dt != M3S_BF16 && dt != M3S_E4M3) || ((uintptr_t)index_cache->data & 15) != 0 ||
      (int64_t)batch->num_reqs * qlen != batch->num_tokens || batch->num_reqs < 1 || !ws ||
      max_nb <= cfg->init_blocks)
    return M3S_OK;
  int e4 = dt == M3S_E4M3, fits = 0;
  cudaError_t err = dec_device_fits(e4, &fits);
  if (err != cudaSuccess)
    return m3s_fail(M3S_ERR_CUDA, fn, "cudaDeviceGetAttribute: %s", cudaGetErrorString(err));
  if (!fits)
    return M3S_OK;
  int pairs = hkv * qlen;
  int np = pairs % 8 == 0 ? 8 : pairs % 4 == 0 ? 4 : pairs % 2 == 0 ? 2 : 1;
  dec_kernel_fn kern = kernel_of(e4, np);
  size_t smem = e4 ? dec_smem_bytes<true>(pairs) : dec_smem_bytes<false>(pairs);
  int per_sm = 0;
  err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, DEC_THREADS, smem);
  if (err != cudaSuccess)
    return m3s_fail(M3S_ERR_CUDA, fn, "cudaOccupancyMaxActiveBlocksPerMultiprocessor: %s",
                    cudaGetErrorString(err));
  if (per_sm < 1)
    return M3S_OK;

  dec_params p;
  p.b = m3s_cuda_batch_of(batch);
  p.iq = iq->data;
  p.iq_dt = iq->dtype;
  p.iq_s0 = iq->stride[0];
  p.iq_s1 = iq->stride[1];
  p.ic = (const unsigned char *)index_cache->data;
  p.num_pages = index_cache->shape[0];
  p.ws = ws;
  p.max_nb = max_nb;
  p.qlen = qlen;
  p.hkv = hkv;
  p.pairs = pairs;
  p.topk = cfg->topk;
  p.init = cfg->init_blocks;
  p.local = cfg->local_blocks;
  p.short_q = iq->dtype == M3S_BF16 || iq->dtype == M3S_F16;
  const int64_t grid = plan_grid(batch->num_reqs, max_nb - cfg->init_blocks,
                                 (int64_t)per_sm * m3s_cuda_num_sms(ctx));
  kern<<<m3s_grid_cap(grid, INT32_MAX), DEC_THREADS, smem, stream>>>(p);
  m3s_status st = m3s_cuda_check_launch(fn, "decode_score_kernel");
  if (st == M3S_OK)
    *ran = 1;
  return st;
}

/* ---------------------------------------------------------------------------
 * Host: the certified variant
 * ------------------------------------------------------------------------- */

extern "C" int m3s_cuda_topk_decode_tc_covers(const m3s_layer_config *cfg, const m3s_batch *batch,
                                              const m3s_tensor *iq,
                                              const m3s_tensor *index_cache) {
  int qlen = batch->uniform_q_len, hkv = cfg->num_kv_heads;
  m3s_dtype dt = index_cache->dtype;
  if (qlen < 1 || qlen > DEC_MAX_QLEN || hkv < 1 || hkv * qlen > 16 || iq->dtype != M3S_BF16 ||
      (dt != M3S_BF16 && dt != M3S_E4M3) || ((uintptr_t)index_cache->data & 15) != 0 ||
      (int64_t)batch->num_reqs * qlen != batch->num_tokens || batch->num_reqs < 1)
    return 0;
  int fits = 0;
  return tcd_device_fits(dt == M3S_E4M3, &fits) == cudaSuccess && fits;
}

/* The tensor map of an e4m3 index cache for the TMA form: [P][128 keys][128
 * bytes], boxes of one page, 128-byte swizzle. 0 when the form does not
 * apply (not an sm_90 device, no encoder, the no_tma hook, page ids beyond
 * the int32 coordinates). */
static int tcd_tma_map(const m3s_context *ctx, const m3s_tensor *index_cache, int no_tma,
                       CUtensorMap *map) {
  PFN_cuTensorMapEncodeTiled_v12000 enc =
      (PFN_cuTensorMapEncodeTiled_v12000)m3s_cuda_tmap_encoder(ctx);
  if (no_tma || !enc || m3s_cuda_sm_major(ctx) != 9 || index_cache->dtype != M3S_E4M3 ||
      index_cache->shape[0] > INT32_MAX)
    return 0;
  cuuint64_t dims[3] = {M3S_INDEX_DIM, M3S_BLOCK_SIZE, (cuuint64_t)index_cache->shape[0]};
  cuuint64_t strides[2] = {M3S_INDEX_DIM, (cuuint64_t)M3S_BLOCK_SIZE * M3S_INDEX_DIM};
  cuuint32_t box[3] = {M3S_INDEX_DIM, M3S_BLOCK_SIZE, 1}, step[3] = {1, 1, 1};
  return enc(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 3, index_cache->data, dims, strides, box, step,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

extern "C" m3s_status m3s_cuda_topk_decode_tc_scores(m3s_context *ctx, const m3s_layer_config *cfg,
                                                     const m3s_batch *batch, const m3s_tensor *iq,
                                                     const m3s_tensor *index_cache, float2 *ws,
                                                     int64_t max_nb, int no_tma,
                                                     m3s_topk_tc_stats *stats, cudaStream_t stream) {
  const char *fn = "m3s_index_topk";
  const int e4 = index_cache->dtype == M3S_E4M3;
  tcd_params p = {};
  const int tma = tcd_tma_map(ctx, index_cache, no_tma, &p.imap);
  void (*kern)(tcd_params) =
      tcd_kernel_of(e4, batch->uniform_q_len * cfg->num_kv_heads <= 8 ? 1 : 2, tma);
  size_t smem = tcd_dyn_smem(e4, tma);
  int per_sm = 0;
  cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, DEC_THREADS, smem);
  if (err != cudaSuccess)
    return m3s_fail(M3S_ERR_CUDA, fn, "cudaOccupancyMaxActiveBlocksPerMultiprocessor: %s",
                    cudaGetErrorString(err));
  per_sm = per_sm > 0 ? per_sm : 1;
  p.stats = stats;
  p.b = m3s_cuda_batch_of(batch);
  p.iq = (const uint16_t *)iq->data;
  p.iq_s0 = iq->stride[0];
  p.iq_s1 = iq->stride[1];
  p.ic = (const unsigned char *)index_cache->data;
  p.num_pages = index_cache->shape[0];
  p.ws = ws;
  p.max_nb = max_nb;
  p.qlen = batch->uniform_q_len;
  p.hkv = cfg->num_kv_heads;
  p.pairs = p.qlen * p.hkv;
  p.topk = cfg->topk;
  p.init = cfg->init_blocks;
  p.local = cfg->local_blocks;
  const int64_t grid = plan_grid(batch->num_reqs, max_nb - cfg->init_blocks,
                                 (int64_t)per_sm * m3s_cuda_num_sms(ctx));
  p.pdl = m3s_cuda_pdl(ctx, batch->num_reqs);
  return m3s_launch(p.pdl, kern, dim3(m3s_grid_cap(grid, INT32_MAX)), dim3(DEC_THREADS), smem,
                    stream, fn, "decode_tc_kernel", p);
}
