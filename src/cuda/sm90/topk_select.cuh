/* Device helpers of the certified top-k selection (SPEC section 3, the
 * certified re-scoring of docs/perf-notes.md): the selection's arguments
 * (tc_select_args), a pair's row and output (tc_pair_row, tc_write_all), the
 * warp path by rounds over entries in memory (tc_select_classify / _rescore /
 * _finish, tc_select_one) and its CTA-shared re-scores (tc_cta_rescore,
 * tc_cta_share: TC_SEL_WARPS warps per CTA), the register path of a pair per
 * warp (tc_reg_*: the candidates in registers, thresholds by tc_filter_ranks,
 * tc_ranked_pair or one compaction, tc_reg_few), and the CTA-wide path of a
 * pair per CTA of TC_WIDE_THREADS threads (tc_wide_*). The kernels that run
 * them are in topk_tc.cu; this header lets another kernel (the decode score
 * kernel of topk_decode.cu) call the same per-pair code. No helper declares
 * shared memory: the caller passes it (the register path: 32 words and a
 * tc_few_room per warp; the wide path: a tc_wide_shared and TC_SEL_CACHE
 * entries). The entries are read with __ldcg (L2): a caller in the kernel
 * that wrote them must order those writes before its reads (a fence and a
 * flag), as the split kernels' grid boundary does. Moved out of topk_tc.cu
 * (2026-12-06) with no change but `static` and clang-format's line breaks:
 * the sm_90a SASS of topk_tc.cu identical before and after (cuobjdump). */
#ifndef M3S_CUDA_SM90_TOPK_SELECT_CUH
#define M3S_CUDA_SM90_TOPK_SELECT_CUH

#include "../common.cuh"
#include "topk_tc.h"

#include <stdint.h>

#define TC_SEL_WARPS 4
#define TC_SEL_CACHE 1024 /* candidate entries a selection warp copies into shared memory */
#define TC_MIN_ROWS 8     /* requests with fewer query rows are scored exactly */
#define TC_FULL 0xffffffffu

/* ---------------------------------------------------------------------------
 * Device helpers (shared with topk_tc.cu's score kernels)
 * ------------------------------------------------------------------------- */

static __device__ __forceinline__ int64_t tc_blocks_of(int64_t pos) {
  return pos / M3S_BLOCK_SIZE + 1;
}

static __device__ __forceinline__ uint32_t tc_smem_addr(const void *p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

static __device__ __forceinline__ void tc_cp_async16(void *dst, const void *src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(tc_smem_addr(dst)), "l"(src)
               : "memory");
}

static __device__ __forceinline__ void tc_cp_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

static __device__ __forceinline__ void tc_cp_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}

/* ---------------------------------------------------------------------------
 * The certified selection's per-pair code (topk_tc.cu's Kernel 2)
 * ------------------------------------------------------------------------- */

typedef struct {
  float2 *ws;
  int64_t max_nb;
  const uint16_t *iq;
  int64_t iq_s0, iq_s1;
  const void *ic;
  int e4m3;
  int64_t num_pages;
  int32_t *out;
  int64_t o_s0, o_s1, o_s2;
  int64_t row0, npairs;
  int hkv, topk, init, local;
  int no_rescore, measure;
  int all_scored; /* decode: every row has (S~, E) entries, whatever its request's length */
  int32_t *list;  /* tc_select_reg_kernel's deferred pairs: count, then indices */
  m3s_topk_tc_stats *stats;
  int pdl; /* launched with programmatic dependent launch: trigger the next (launch.h) */
  /* TC_MIN_ROWS, the rows a request needs for entries, as a field: compared
   * against a constant in tc_reg_covers, ptxas 13.0 spills 20 bytes in
   * tc_select_reg_kernel<4, 1> */
  int64_t min_rows;
} tc_select_args;

/* The rank of (score, id) as one integer, larger = ranks first: ordered
 * float bits (NaN -> 0, the lowest; -0 as +0) above the inverted id. 0 is
 * below every key of a real block. */
static __device__ __forceinline__ uint32_t tc_ord(float s) {
  if (isnan(s))
    return 0;
  uint32_t bits = __float_as_uint(s == 0.0f ? 0.0f : s);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

static __device__ __forceinline__ unsigned long long tc_key(uint32_t ord, int64_t id) {
  return ((unsigned long long)ord << 32) | (0xffffffffu - (uint32_t)id);
}

static __device__ __forceinline__ int32_t tc_id_of(unsigned long long key) {
  return (int32_t)(0xffffffffu - (uint32_t)(key & 0xffffffffu));
}

/* The interval of an entry: [L, U] contains the reference score S, or the
 * whole line when E is infinite or S~ NaN. Rounded outwards. */
static __device__ __forceinline__ void tc_interval(float2 e, float &lo, float &up) {
  if (isnan(e.x) || !(e.y < INFINITY)) {
    lo = -INFINITY;
    up = INFINITY;
  } else {
    lo = __fsub_rd(e.x, e.y);
    up = __fadd_ru(e.x, e.y);
  }
}

/* What a candidate entry ranks by, per query kind: the approximate score S~
 * of an entry with a finite interval (0, below everything, for a whole-line
 * one), or the reference score S of a re-scored entry (0 for the others). */
enum { TC_BY_CENTRE = 0, TC_BY_EXACT = 1 };

static __device__ __forceinline__ int tc_whole_line(float2 e) {
  return isnan(e.x) || !(e.y < INFINITY);
}

/* Where an entry's interval puts its block against the thresholds u', l' of
 * tc_select_classify: surely in, uncertain (Q), or surely out. Plain float
 * compares stand for the rank order: the bounds are never NaN and -0 ranks
 * as +0 in both. */
enum { TC_OUT = 0, TC_IN = 1, TC_UNSURE = 2 };

static __device__ __forceinline__ int tc_class(float2 e, float u_p, float l_p) {
  float l, u;
  tc_interval(e, l, u);
  return l > u_p ? TC_IN : (u < l_p ? TC_OUT : TC_UNSURE);
}

static __device__ __forceinline__ unsigned long long tc_entry_key(const float2 *W, int64_t b,
                                                                  int kind) {
  float2 e = W[b];
  if (kind == TC_BY_EXACT)
    return e.y < 0.0f ? tc_key(tc_ord(e.x), b) : 0ull;
  return tc_whole_line(e) ? 0ull : tc_key(tc_ord(e.x), b);
}

/* The float whose tc_ord is ord (ord != 0). */
static __device__ __forceinline__ float tc_unord(uint32_t ord) {
  return __uint_as_float((ord & 0x80000000u) ? (ord & 0x7fffffffu) : ~ord);
}

/* The thresholds u' and l' of tc_select_classify: the ordered S~ of ranks
 * need_u (k_u) and need_l (k_l) widened outwards by the largest finite E;
 * a rank of 0 (k = 0) leaves its side open. */
static __device__ __forceinline__ void tc_widen(uint32_t k_l, uint32_t k_u, float e_max, float &l_p,
                                                float &u_p) {
  u_p = k_u ? __fadd_ru(tc_unord(k_u), e_max) : INFINITY;
  l_p = k_l ? __fsub_rd(tc_unord(k_l), e_max) : -INFINITY;
}

#define TC_CACHE 4 /* keys each lane keeps between rescans */

/* The TC_CACHE best keys below `limit` of this lane's candidates
 * b = lo + lane + 32 i < hi, descending, 0 for none. */
static __device__ __forceinline__ void tc_best_below(const float2 *W, int64_t lo, int64_t hi,
                                                     int kind, unsigned long long limit,
                                                     unsigned long long (&c)[TC_CACHE]) {
#pragma unroll
  for (int i = 0; i < TC_CACHE; i++)
    c[i] = 0;
  for (int64_t b = lo + (threadIdx.x & 31); b < hi; b += 32) {
    const unsigned long long k = tc_entry_key(W, b, kind);
    if (k < limit)
      m3s_keylist_insert(k, c);
  }
}

/* The n-th largest key (n >= 1) over the candidates (0 when n == 0 or
 * fewer exist); every lane gets it, and the m1-th and m2-th largest in *k1
 * and *k2 where those are not NULL (1 <= m <= n). With emit != NULL, lane 0 stores the ids of the
 * first n keys at emit[0..n). A lane rescans its candidates only when it has
 * supplied TC_CACHE winners since its last scan. */
static __device__ unsigned long long tc_nth_key(const float2 *W, int64_t lo, int64_t hi, int kind,
                                                int n, int32_t *emit, int m1 = 0,
                                                unsigned long long *k1 = NULL, int m2 = 0,
                                                unsigned long long *k2 = NULL) {
  unsigned long long c[TC_CACHE], w = 0;
  if (n <= 0)
    return 0;
  tc_best_below(W, lo, hi, kind, ~0ull, c);
  for (int k = 0; k < n; k++) {
    w = m3s_warp_max_u64(c[0]);
    if (emit && (threadIdx.x & 31) == 0)
      emit[k] = tc_id_of(w);
    if (k1 && k + 1 == m1)
      *k1 = w;
    if (k2 && k + 1 == m2)
      *k2 = w;
    if (m3s_keylist_pop(w, c))
      tc_best_below(W, lo, hi, kind, w, c);
  }
  return w;
}

/* Eight key values of a reference re-score, exactly: e4m3 (the 8 bytes lo,
 * hi) through fp16, which holds every e4m3 value; bf16 (a uint4) by shifts. */
static __device__ __forceinline__ void tc_keys8_e4m3(uint32_t lo, uint32_t hi, float (&k)[8]) {
  const uint32_t u[2] = {lo, hi};
#pragma unroll
  for (int e = 0; e < 4; e++) {
    __nv_fp8x2_storage_t pr = (__nv_fp8x2_storage_t)(u[e / 2] >> (16 * (e % 2)));
    float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pr, __NV_E4M3)));
    k[2 * e] = f.x;
    k[2 * e + 1] = f.y;
  }
}

static __device__ __forceinline__ void tc_keys8_bf16(uint4 w, float (&k)[8]) {
  const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int e = 0; e < 4; e++) {
    k[2 * e] = __uint_as_float(u[e] << 16);
    k[2 * e + 1] = __uint_as_float(u[e] & 0xffff0000u);
  }
}

/* One step of m3s_dot128_fixed: acc[l] += q[l] k[l], no FMA. */
static __device__ __forceinline__ void tc_mac8(float (&acc)[8], const float *q,
                                               const float (&k)[8]) {
#pragma unroll
  for (int l = 0; l < 8; l++)
    acc[l] = __fadd_rn(acc[l], __fmul_rn(q[l], k[l]));
}

/* The reference dot m3s_dot128_fixed(q, k) of one key row held in w (16
 * bf16 or 8 e4m3 chunks of 16 bytes, in order): 8 elements at a time
 * (tc_keys8_*, tc_mac8, m3s_fold8). */
static __device__ __forceinline__ float tc_row_dot(const tc_select_args &a, const uint4 (&w)[16],
                                                   const float *q) {
  float acc[8];
#pragma unroll
  for (int l = 0; l < 8; l++)
    acc[l] = 0.0f;
#pragma unroll
  for (int i = 0; i < M3S_INDEX_DIM / 8; i++) {
    float k[8];
    if (a.e4m3) {
      const uint4 v = w[i >> 1];
      tc_keys8_e4m3((i & 1) ? v.z : v.x, (i & 1) ? v.w : v.y, k);
    } else {
      tc_keys8_bf16(w[i], k);
    }
    tc_mac8(acc, q + 8 * i, k);
  }
  return m3s_fold8(acc);
}

/* The warp's maximum of this lane's dot d of key 32 s + lane of block b over
 * its visible keys (key <= pos), NaN dots ignored unless all are NaN. */
static __device__ __forceinline__ float tc_visible_max(float d, int64_t b, int s, int64_t pos) {
  const int key = 32 * s + (int)(threadIdx.x & 31);
  float best = b * M3S_BLOCK_SIZE + key <= pos ? d : NAN;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    best = fmaxf(best, __shfl_xor_sync(TC_FULL, best, o));
  return best;
}

/* The reference dot m3s_dot128_fixed(q, k) of this lane's key 32 s + lane
 * of block b, whose keys are index-cache page `page` (a valid id), the
 * whole key row loaded by the lane itself (16 bf16 or 8 e4m3 loads of 16
 * bytes in flight); the warp's maximum over its visible keys
 * (tc_visible_max). Each load touches 32 rows, 32 L1 wavefronts: the warp
 * paths that re-score rarely take it, the shared re-scores take
 * tc_exact_keys_staged. Every lane calls it and gets the result. */
static __device__ __forceinline__ float tc_exact_keys(const tc_select_args &a, int64_t page,
                                                      int64_t b, int s, int64_t pos,
                                                      const float *q) {
  const int lane = threadIdx.x & 31, key = 32 * s + lane;
  const int64_t off = (page * M3S_BLOCK_SIZE + key) * M3S_INDEX_DIM;
  uint4 w[16];
  if (a.e4m3) {
#pragma unroll
    for (int i = 0; i < 8; i++)
      w[i] = __ldg((const uint4 *)((const uint8_t *)a.ic + off) + i);
  } else {
#pragma unroll
    for (int i = 0; i < 16; i++)
      w[i] = __ldg((const uint4 *)((const uint16_t *)a.ic + off) + i);
  }
  return tc_visible_max(tc_row_dot(a, w, q), b, s, pos);
}

/* 16-byte chunks of a quarter block's keys (32 rows of 256 bf16 bytes), a
 * warp's staging room in tc_exact_keys_staged */
#define TC_STAGE_CHUNKS (32 * M3S_INDEX_DIM * 2 / 16)

/* The warp's 32 key rows of C chunks from src into stage (swizzled, see
 * tc_exact_keys_staged), then this lane's row (lane) into w[0, C). */
template <int C>
static __device__ __forceinline__ void tc_stage_rows(const void *src, uint4 *stage,
                                                     uint4 (&w)[16]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < C; j++) {
    const int g = 32 * j + lane, k = g / C, c = g % C;
    tc_cp_async16(stage + k * C + (c ^ (k & 7)), (const uint4 *)src + g);
  }
  tc_cp_commit();
  tc_cp_wait_all();
  __syncwarp(); /* every lane's copies are visible to the warp */
#pragma unroll
  for (int i = 0; i < C; i++)
    w[i] = stage[lane * C + (i ^ (lane & 7))];
}

/* tc_exact_keys with the quarter's keys staged through shared memory: the
 * warp copies the 8 KB (4 KB e4m3) contiguously (cp.async, each instruction
 * 512 bytes of whole lines), chunk c of row k at c ^ (k & 7) so that the
 * rows' reads below, 8 lanes per wavefront, hit 8 bank groups; then each
 * lane reads its row. Where each lane loads its own row, every load
 * instruction touches 32 lines (32 L1 wavefronts for 512 bytes): the
 * re-scores of an 8K prompt (~1,500 blocks, 48 MB) took ~25 us of the
 * deferred kernel at that rate (~16 bytes per SM cycle) on the H100.
 * stage: this warp's TC_STAGE_CHUNKS, 16-byte aligned, free on entry;
 * every lane calls it and gets the result. */
static __device__ __forceinline__ float tc_exact_keys_staged(const tc_select_args &a, int64_t page,
                                                             int64_t b, int s, int64_t pos,
                                                             const float *q, uint4 *stage) {
  const int64_t row0 = page * M3S_BLOCK_SIZE + 32 * s;
  uint4 w[16];
  __syncwarp(); /* the previous call's reads of stage are done */
  if (a.e4m3)
    tc_stage_rows<M3S_INDEX_DIM / 16>((const uint8_t *)a.ic + row0 * M3S_INDEX_DIM, stage, w);
  else
    tc_stage_rows<M3S_INDEX_DIM / 8>((const uint16_t *)a.ic + row0 * M3S_INDEX_DIM, stage, w);
  return tc_visible_max(tc_row_dot(a, w, q), b, s, pos);
}

/* Reference score of block b for a row at position pos: the max over the
 * visible keys of m3s_dot128_fixed(q, k), NaN dots ignored unless all are
 * NaN; NaN for a page id out of range. A quarter of the keys at a time, one
 * key per lane (tc_exact_keys): four memory round trips per block, where
 * four keys per lane streamed 8 loads at a time took eight. The maximum of
 * the quarters' maxima is that of all keys (no dot is -0: the sums start at
 * +0). Every lane calls it and gets the result. */
static __device__ __forceinline__ float tc_exact_block(const m3s_cuda_batch &bt,
                                                       const tc_select_args &a, int r, int64_t b,
                                                       int64_t pos, const float *q) {
  const int64_t page = m3s_page(bt.ibt, bt.ibt_s0, bt.ibt_s1, bt.ibt_cols, r, b, a.num_pages);
  if (page < 0)
    return NAN;
  float best = NAN;
#pragma unroll 1
  for (int s = 0; s < M3S_BLOCK_SIZE / 32; s++)
    best = fmaxf(best, tc_exact_keys(a, page, b, s, pos, q));
  return best;
}

/* The reference dot of this lane's key 32 s + lane of block b against q,
 * the warp's maximum over its visible keys; NaN for a page id out of range.
 * stage: this warp's TC_STAGE_CHUNKS of shared memory (tc_exact_keys_staged)
 * or NULL (tc_exact_keys). Every lane calls it and gets the result. */
static __device__ __forceinline__ float tc_exact_slice(const m3s_cuda_batch &bt,
                                                       const tc_select_args &a, int r, int64_t b,
                                                       int s, int64_t pos, const float *q,
                                                       uint4 *stage) {
  const int64_t page = m3s_page(bt.ibt, bt.ibt_s0, bt.ibt_s1, bt.ibt_cols, r, b, a.num_pages);
  if (page < 0)
    return NAN;
  return stage ? tc_exact_keys_staged(a, page, b, s, pos, q, stage)
               : tc_exact_keys(a, page, b, s, pos, q);
}

/* Starts loading block b's index-key page into L2 (sm_90: one bulk
 * prefetch), so that a later tc_exact_block of it waits on L2, not DRAM: a
 * re-score streams its 16 or 32 KB with 8 loads in flight per lane, about 8
 * DRAM round trips, which made it half of a small decode batch's selection
 * time (ncu, 16 x 32K, H200, 2026-12-03). */
static __device__ __forceinline__ void
tc_prefetch_block(const m3s_cuda_batch &bt, const tc_select_args &a, int r, int64_t b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int64_t page = m3s_page(bt.ibt, bt.ibt_s0, bt.ibt_s1, bt.ibt_cols, r, b, a.num_pages);
  if (page < 0)
    return;
  const unsigned bytes = M3S_BLOCK_SIZE * M3S_INDEX_DIM * (a.e4m3 ? 1 : 2);
  const char *src = (const char *)a.ic + page * (int64_t)bytes;
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(src), "r"(bytes) : "memory");
#else
  (void)bt, (void)a, (void)r, (void)b;
#endif
}

/* The certified selection of one pair with nb > K, in three phases
 * (tc_select_classify, tc_select_rescore, tc_select_finish; the two kernels
 * below run them by one warp, or the re-scores by the CTA's warps). sel: K
 * slots; qlist: 32 slots for the uncertain blocks, qsc their reference
 * scores.
 *
 * Why this is the reference selection. Let C = [init, nb - local) be the
 * candidates, W = K - init - local the slots they fill (|C| > W since nb > K),
 * and rank blocks by the reference order (S higher first, NaN last, equal S
 * by lower id). Every candidate has an interval [L_b, U_b] that contains S_b
 * (a NaN S only when the interval is the whole line). Let u* be the
 * (W+1)-th largest U and l* the W-th largest L over C (with multiplicity).
 *  - In = {b : L_b > u*}. At most W candidates have U > u*, and each c != b
 *    outside them has S_c <= U_c <= u* < L_b <= S_b, so fewer than W blocks
 *    can rank before b: b is in the reference top W. Also |In| <= W.
 *  - Out = {b : U_b < l*}. At least W candidates have L >= l* > U_b >= S_b
 *    (S_b not NaN: U_b is finite), so they all rank before b: b is not in
 *    the top W. Every b outside Out has U_b >= l*, and at least W blocks have
 *    U >= L >= l*, so |C \ Out| >= W.
 *  - The top W is In plus the best W - |In| of Q = C \ (In u Out) in the
 *    reference order (the order restricted to Q is the same total order),
 *    and Q is ranked on reference scores S, computed here exactly.
 * (u* and l* are taken over all of C, not "the others": for the tests above
 * that is the same, because L_b > u* puts U_b above u* and U_b < l* puts
 * L_b below l*.) The counting uses only L <= U, so the slots never overflow,
 * whatever the hardware did; exactness needs S_b in [L_b, U_b].
 * Any u' >= u* and l' <= l* keep all of this true (In and Out only shrink,
 * Q grows), and such a pair costs one ranking instead of two: with E' the
 * largest E of the finite intervals, f of them and n_inf whole-line ones,
 * U'_b = S~_b + E' (rounded up) >= U_b, so the (W+1)-th largest U' is >= u*:
 * +inf when n_inf > W, else S~ of rank W+1-n_inf among the finite ones, plus
 * E' (rounded up); likewise l' = S~ of rank W among the finite ones minus E'
 * (rounded down), or -inf when f < W. Both ranks come from one pass over S~.
 * Rows of short requests (exact != 0, fewer than TC_MIN_ROWS query rows: the
 * score kernel skips them, a 128-row tensor-core tile would be mostly idle)
 * score every candidate here in the reference order and select on those
 * scores directly. */

/* Where a pair's selection stands between its phases (tc_select_classify,
 * tc_select_rescore, tc_select_finish). */
typedef struct {
  int nsel; /* forced blocks, at sel[0, nsel) */
  int n_in; /* surely in, at sel[nsel, nsel + n_in) */
  int nq;   /* uncertain; listed in qlist[0, nq) when nq <= 32 */
  int done; /* sel[] complete (nothing to choose, exact rows, more than 32 uncertain);
             * -1 from tc_wide_classify_rescore: left to tc_select_classify */
} tc_sel_state;

/* The test hook's counts of one pair (lane 0). */
static __device__ void tc_add_stats(const tc_select_args &a, unsigned long long cand,
                                    unsigned long long resc, unsigned long long viol,
                                    uint32_t max_ratio) {
  if (!a.stats || (threadIdx.x & 31) != 0)
    return;
  atomicAdd(&a.stats->pairs, 1ull);
  atomicAdd(&a.stats->candidates, cand);
  atomicAdd(&a.stats->rescored, resc);
  if (viol)
    atomicAdd(&a.stats->violations, viol);
  if (max_ratio)
    atomicMax(&a.stats->max_ratio_bits, max_ratio);
}

/* Phase 1 of one pair (the whole warp calls it): forced blocks, then either
 * the whole exact selection (rows of short requests), or the thresholds, In
 * and the uncertain list Q; more than 32 uncertain blocks are re-scored and
 * ranked here too. The pair's stats are counted here. */
static __device__ __forceinline__ tc_sel_state
tc_select_classify(const m3s_cuda_batch &bt, const tc_select_args &a, float2 *W, int r, int64_t pos,
                   int64_t nb, int exact, const float *q, int32_t *sel, int32_t *qlist, int *cnt) {
  const int lane = threadIdx.x & 31;
  const int want = a.topk - a.init - a.local;
  const int64_t lo = a.init, hi = nb - a.local;
  tc_sel_state st = {a.init + a.local, 0, 0, 1};
  unsigned long long cand = 0, resc = 0, viol = 0;
  uint32_t max_ratio = 0;
  for (int k = lane; k < a.init; k += 32)
    sel[k] = k;
  for (int k = lane; k < a.local; k += 32)
    sel[a.init + k] = (int32_t)(nb - a.local + k);
  if (want > 0 && exact) {
    for (int64_t b = lo; b < hi; b++) {
      float sx = tc_exact_block(bt, a, r, b, pos, q);
      if (lane == 0)
        W[b] = make_float2(sx, -1.0f);
    }
    cand = resc = (unsigned long long)(hi - lo);
    __syncwarp(); /* the entries are visible to the warp */
    tc_nth_key(W, lo, hi, TC_BY_EXACT, want, sel + st.nsel);
  } else if (want > 0) {
    /* thresholds u' and l' (see the proof above) from one ranking
     * of S~ */
    int n_inf = 0;
    float e_max = 0.0f;
    for (int64_t b = lo + lane; b < hi; b += 32) {
      float2 e = W[b];
      if (tc_whole_line(e))
        n_inf++;
      else
        e_max = fmaxf(e_max, e.y);
    }
    n_inf = __reduce_add_sync(TC_FULL, n_inf);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1)
      e_max = fmaxf(e_max, __shfl_xor_sync(TC_FULL, e_max, o));
    const int f = (int)(hi - lo) - n_inf;
    const int need_l = f >= want ? want : 0, need_u = n_inf > want ? 0 : want + 1 - n_inf;
    unsigned long long k_l = 0, k_u = 0;
    tc_nth_key(W, lo, hi, TC_BY_CENTRE, need_l > need_u ? need_l : need_u, NULL, need_l, &k_l,
               need_u, &k_u);
    /* (k == 0 cannot happen, since need <= f; the fallbacks keep the slots
     * from overflowing whatever the entries hold) */
    float u_p, l_p;
    tc_widen((uint32_t)(k_l >> 32), (uint32_t)(k_u >> 32), e_max, l_p, u_p);
    /* test hook: every candidate's bound against its reference score,
     * before any entry is rewritten */
    for (int64_t b = lo; a.measure && b < hi; b++) {
      float2 e = W[b];
      float sx = tc_exact_block(bt, a, r, b, pos, q);
      if (e.y < INFINITY && !isnan(e.x)) {
        float diff = fabsf(e.x - sx);
        if (!(diff <= e.y))
          viol++;
        else if (e.y > 0.0f)
          max_ratio = max(max_ratio, __float_as_uint(diff / e.y));
      }
    }
    /* In and Q, each lane on its own entries: both are short (In <= W), so
     * a shared counter bumped per member is cheaper than ballots per 32
     * entries */
    if (lane == 0)
      cnt[0] = cnt[1] = 0;
    __syncwarp();
    for (int64_t b = lo + lane; b < hi; b += 32) {
      const int c = tc_class(W[b], u_p, l_p);
      if (c == TC_IN) {
        sel[st.nsel + atomicAdd(&cnt[0], 1)] = (int32_t)b;
      } else if (c == TC_UNSURE) {
        int j = atomicAdd(&cnt[1], 1);
        if (j < 32)
          qlist[j] = (int32_t)b;
      }
    }
    __syncwarp(); /* sel[], qlist[] and the counts are visible to the warp */
    st.n_in = cnt[0];
    st.nq = cnt[1];
    cand = (unsigned long long)(hi - lo);
    resc = (unsigned long long)st.nq;
    st.done = st.nq > 32;
    if (st.done) {
      /* more than 32 uncertain blocks (adversarial ties): re-score each in
       * place as (S, -1), then rank the re-scored ones */
      for (int64_t base = lo; base < hi; base += 32) {
        const int is_q = base + lane < hi && tc_class(W[base + lane], u_p, l_p) == TC_UNSURE;
        if (is_q && !a.no_rescore)
          tc_prefetch_block(bt, a, r, base + lane);
        for (uint32_t m = __ballot_sync(TC_FULL, is_q); m; m &= m - 1) {
          const int64_t bj = base + __ffs(m) - 1;
          float sx = a.no_rescore ? W[bj].x : tc_exact_block(bt, a, r, bj, pos, q);
          __syncwarp();
          if (lane == 0)
            W[bj] = make_float2(sx, -1.0f);
        }
      }
      __syncwarp();
      tc_nth_key(W, lo, hi, TC_BY_EXACT, want - st.n_in, sel + st.nsel + st.n_in);
    }
  }
  tc_add_stats(a, cand, resc, viol, max_ratio);
  return st;
}

/* Phase 2 (a warp): the reference scores of the listed uncertain blocks
 * j = j0, j0 + step, ... < nq into qsc[j] (their pages first prefetched
 * into L2, all at once). */
static __device__ __forceinline__ void tc_select_rescore(const m3s_cuda_batch &bt,
                                                         const tc_select_args &a, const float2 *W,
                                                         int r, int64_t pos, const float *q,
                                                         const int32_t *qlist, int nq, int j0,
                                                         int step, float *qsc) {
  const int lane = threadIdx.x & 31;
  const int jl = j0 + lane * step;
  if (jl < nq && !a.no_rescore)
    tc_prefetch_block(bt, a, r, qlist[jl]);
  for (int j = j0; j < nq; j += step) {
    const int32_t bj = qlist[j];
    float sx = a.no_rescore ? W[bj].x : tc_exact_block(bt, a, r, bj, pos, q);
    if (lane == 0)
      qsc[j] = sx;
  }
}

/* Phase 3 (the whole warp, qsc visible to it): the best of Q fill the
 * remaining slots unless phase 1 finished, then the K ids in ascending
 * order. */
static __device__ __forceinline__ void tc_select_finish(const tc_select_args &a,
                                                        const tc_sel_state &st, int32_t *sel,
                                                        const int32_t *qlist, const float *qsc,
                                                        int32_t *out) {
  const int lane = threadIdx.x & 31;
  if (!st.done) {
    /* lane j keeps the key of qlist[j], then each lane ranks its own among
     * them and the best `rest` fill the slots */
    const int rest = a.topk - st.nsel - st.n_in;
    const int32_t id = lane < st.nq ? qlist[lane] : -1;
    const unsigned long long k = lane < st.nq ? tc_key(tc_ord(qsc[lane]), id) : 0ull;
    int rank = 0;
    for (int j = 0; j < st.nq; j++)
      rank += __shfl_sync(TC_FULL, k, j) > k;
    if (lane < st.nq && rank < rest)
      sel[st.nsel + st.n_in + rank] = id;
  }
  __syncwarp();
  /* ascending order by rank (ids are distinct) */
  for (int k = lane; k < a.topk; k += 32) {
    int32_t id = sel[k];
    int rank = 0;
    for (int i = 0; i < a.topk; i++)
      rank += sel[i] < id;
    out[rank * a.o_s2] = id;
  }
  __syncwarp(); /* sel[] is reused by the warp's next pair */
}

/* A pair's row: its request and position, its output row, its blocks nb
 * (0 for padded and invalid rows). */
static __device__ int64_t tc_pair_row(const m3s_cuda_batch &bt, const tc_select_args &a, int64_t lp,
                                      m3s_row_info &ri, int32_t *&out) {
  const int64_t t = a.row0 + lp / a.hkv, g = lp % a.hkv;
  out = a.out + t * a.o_s0 + g * a.o_s1;
  ri = m3s_row_lookup(bt, t);
  return ri.valid ? tc_blocks_of(ri.pos) : 0;
}

/* The answer when nb <= K (a warp): every visible block, then -1. */
static __device__ void tc_write_all(const tc_select_args &a, int64_t nb, int32_t *out) {
  for (int k = threadIdx.x & 31; k < a.topk; k += 32)
    out[k * a.o_s2] = k < nb ? k : -1;
}

/* The pair's bf16 query row. */
static __device__ __forceinline__ const uint16_t *tc_query_of(const tc_select_args &a, int64_t lp) {
  const int64_t t = a.row0 + lp / a.hkv, g = lp % a.hkv;
  return a.iq + t * a.iq_s0 + g * a.iq_s1;
}

/* The pair's query as fp32 into q (threads i of n). */
static __device__ void tc_stage_query(const tc_select_args &a, int64_t lp, float *q, int i, int n) {
  const uint16_t *iq = tc_query_of(a, lp);
  for (int d = i; d < M3S_INDEX_DIM; d += n)
    q[d] = __uint_as_float((uint32_t)iq[d] << 16);
}

/* The pair's entries W[init, nb - local) copied to c by threads i of n, 8
 * loads in flight per thread (every ranking pass then reads shared memory;
 * the passes are latency-bound). */
static __device__ void tc_copy_entries(const tc_select_args &a, const float2 *W, int64_t nb,
                                       float2 *c, int i, int n) {
  const int64_t lo = a.init, hi = nb - a.local;
  for (int64_t b0 = lo; b0 < hi; b0 += (int64_t)n * 8) {
    float2 v[8];
#pragma unroll
    for (int u = 0; u < 8; u++)
      if (b0 + i + n * u < hi)
        v[u] = __ldcg(W + b0 + i + n * u);
#pragma unroll
    for (int u = 0; u < 8; u++)
      if (b0 + i + n * u < hi)
        c[b0 + i + n * u] = v[u];
  }
}

/* Shared memory of one selection warp for the per-pair code below. */
typedef struct {
  float q[M3S_INDEX_DIM];
  int32_t sel[M3S_MAX_TOPK];
  int32_t qlist[32];
  float qsc[32];
  int cnt[2];
} tc_warp_shared;

/* Phase 1 of one pair with nb > K by one warp: its query staged, its
 * entries copied to wcache (room for TC_SEL_CACHE entries; NULL: they are
 * read from the workspace), then tc_select_classify; *W is where the
 * entries were read. */
static __device__ __forceinline__ tc_sel_state tc_stage_classify(const m3s_cuda_batch &bt,
                                                                 const tc_select_args &a,
                                                                 int64_t lp, const m3s_row_info &ri,
                                                                 int64_t nb, tc_warp_shared &sm,
                                                                 float2 *wcache, float2 *&W) {
  const int lane = threadIdx.x & 31;
  tc_stage_query(a, lp, sm.q, lane, 32);
  const int exact = !a.all_scored && ri.n < TC_MIN_ROWS;
  W = a.ws + lp * a.max_nb;
  if (wcache && nb - a.local <= TC_SEL_CACHE && !exact) {
    tc_copy_entries(a, W, nb, wcache, lane, 32);
    W = wcache;
  }
  __syncwarp();
  return tc_select_classify(bt, a, W, ri.r, ri.pos, nb, exact, sm.q, sm.sel, sm.qlist, sm.cnt);
}

/* One pair with nb > K by one warp, the three phases in turn; wcache (room
 * for TC_SEL_CACHE entries) or NULL: the entries are read from the
 * workspace. */
static __device__ __forceinline__ void
tc_select_one(const m3s_cuda_batch &bt, const tc_select_args &a, int64_t lp, const m3s_row_info &ri,
              int64_t nb, int32_t *out, tc_warp_shared &sm, float2 *wcache) {
  float2 *W;
  tc_sel_state st = tc_stage_classify(bt, a, lp, ri, nb, sm, wcache, W);
  if (!st.done)
    tc_select_rescore(bt, a, W, ri.r, ri.pos, sm.q, sm.qlist, st.nq, 0, 1, sm.qsc);
  __syncwarp();
  tc_select_finish(a, st, sm.sel, sm.qlist, sm.qsc, out);
}

/* A selection warp's pair between tc_select_kernel's phases: what the CTA's
 * shared re-scores need (the state, the row) and the quarters' maxima. */
typedef struct {
  tc_sel_state st;
  int64_t pos;
  int r;
  float part[32][4]; /* per uncertain block, per quarter of its keys */
} tc_pair_shared;

/* The re-scores of the CTA's pairs (every thread calls it, the states in ps
 * visible): each uncertain block of a pair that is not done is four items,
 * one per quarter of its keys (tc_exact_slice), and the CTA's warps take the
 * items in turn, so a pair's re-scores no longer run one block after another
 * on its own warp while the others idle (at q_len 4, 64 x 32K on the H100
 * the few re-scores, 0.04% of the candidates, were 18 of the top-k's 223
 * us). */
static __device__ void tc_cta_rescore(const m3s_cuda_batch &bt, const tc_select_args &a,
                                      const tc_warp_shared *sh, tc_pair_shared *ps, uint4 *stage) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int n[TC_SEL_WARPS], total = 0;
#pragma unroll
  for (int w = 0; w < TC_SEL_WARPS; w++) {
    n[w] = ps[w].st.done ? 0 : 4 * ps[w].st.nq;
    total += n[w];
  }
  for (int u = warp; u < total; u += TC_SEL_WARPS) {
    int w = 0, v = u;
    while (v >= n[w])
      v -= n[w++];
    const float x =
        tc_exact_slice(bt, a, ps[w].r, sh[w].qlist[v >> 2], v & 3, ps[w].pos, sh[w].q, stage);
    if (lane == 0)
      ps[w].part[v >> 2][v & 3] = x;
  }
}

/* The CTA's shared re-scores (every thread calls it): this warp's pair
 * state st published (and its row, for a pair not done), the CTA's
 * re-scores (tc_cta_rescore) between two barriers, then this warp's
 * reference scores of its listed blocks in sm.qsc, visible to the warp
 * (W: the pair's entries, whose S~ stand in under the no_rescore hook;
 * stage: this warp's staging room for the re-scores, which may alias W: the
 * re-scores run only without the hook, and W is not read after them). */
static __device__ __forceinline__ void tc_cta_share(const m3s_cuda_batch &bt,
                                                    const tc_select_args &a, tc_warp_shared *sh,
                                                    tc_pair_shared *ps, const tc_sel_state &st,
                                                    const m3s_row_info &ri, const float2 *W,
                                                    uint4 *stage) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0)
    ps[warp].st = st;
  if (lane == 0 && !st.done) {
    ps[warp].pos = ri.pos;
    ps[warp].r = ri.r;
  }
  __syncthreads(); /* the states, lists and queries of the CTA's pairs */
  if (!a.no_rescore)
    tc_cta_rescore(bt, a, sh, ps, stage);
  __syncthreads(); /* the quarters' maxima */
  if (!st.done && lane < st.nq)
    sh[warp].qsc[lane] = a.no_rescore
                             ? W[sh[warp].qlist[lane]].x
                             : fmaxf(fmaxf(ps[warp].part[lane][0], ps[warp].part[lane][1]),
                                     fmaxf(ps[warp].part[lane][2], ps[warp].part[lane][3]));
  __syncwarp(); /* the reference scores */
}

/* The selection with a pair's candidates in registers (tc_select_reg_kernel,
 * tc_select_deferred_kernel): candidate j = lane + 32 i of [init, nb -
 * local) in slot i of this lane, R slots (32 R >= candidates). It is the
 * selection of tc_select_classify / _rescore / _finish (the same thresholds
 * u', l', sets and tie rule, so the same answer), with the two order
 * statistics of S~ from one sort of the warp's values (up to 128) or from
 * tc_ranked_pair (more) instead of W + 1 rounds of a 64-bit warp maximum
 * over entries in memory, In and Q by ballots, and the K ids written in ascending order by prefix
 * counts over the candidates' order (lane + 32 i ascends with i, then
 * lane). */

/* Sorts the warp's 32 R values descending, position lane * R + i in v[i]:
 * a bitonic network, shuffles for the stages whose partner is in another
 * lane. Every lane calls it. */
template <int R> static __device__ __forceinline__ void tc_sort_desc(uint32_t (&v)[R]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int k = 2; k <= 32 * R; k <<= 1) {
#pragma unroll
    for (int j = k >> 1; j > 0; j >>= 1) {
      uint32_t t[R];
#pragma unroll
      for (int i = 0; i < R; i++) {
        const int x = lane * R + i;
        const uint32_t p = j >= R ? __shfl_xor_sync(TC_FULL, v[i], j / R) : v[i ^ (j % R)];
        /* the lower position of a pair keeps the larger value in the blocks
         * that end up descending ((x & k) == 0), the smaller in the others */
        const bool keep_max = ((x & j) == 0) == ((x & k) == 0);
        t[i] = keep_max ? max(v[i], p) : min(v[i], p);
      }
#pragma unroll
      for (int i = 0; i < R; i++)
        v[i] = t[i];
    }
  }
}

/* Position p of the sorted values (every lane calls it, p uniform). */
template <int R>
static __device__ __forceinline__ uint32_t tc_sorted_at(const uint32_t (&v)[R], int p) {
  uint32_t mine = v[0];
#pragma unroll
  for (int i = 1; i < R; i++)
    mine = p % R == i ? v[i] : mine;
  return __shfl_sync(TC_FULL, mine, p / R);
}

/* The need_l-th and need_u-th largest of the warp's 32 R values (ranks from
 * 1; 0 for a rank of 0), what tc_sort_desc + tc_sorted_at give, for large R
 * and few ranks: each lane sorts its own R values in registers (a bitonic
 * network with constant indices), then each round takes the warp maximum of
 * the lanes' heads; the lanes holding it drop their head, and the count of
 * values taken passes each rank in the round that takes its value. At most
 * max(need_l, need_u) rounds (K - init - local + 1 here), each taking at
 * least one value. At R = 16 about a fifth of tc_sort_desc's instructions
 * (~80 exchanges + ~25 per round against 45 stages of 16). Every lane calls
 * it; v is consumed. */
template <int R>
static __device__ __forceinline__ void tc_ranked_pair(uint32_t (&v)[R], int need_l, int need_u,
                                                      uint32_t &k_l, uint32_t &k_u) {
#pragma unroll
  for (int k = 2; k <= R; k <<= 1)
#pragma unroll
    for (int j = k >> 1; j > 0; j >>= 1)
#pragma unroll
      for (int i = 0; i < R; i++) {
        const int l = i ^ j;
        if (l > i) {
          /* descending where (i & k) == 0: at k = R, everywhere */
          const uint32_t hi = max(v[i], v[l]), lo = min(v[i], v[l]);
          v[i] = (i & k) == 0 ? hi : lo;
          v[l] = (i & k) == 0 ? lo : hi;
        }
      }
  k_l = k_u = 0u;
  const int need = need_l > need_u ? need_l : need_u;
  for (int taken = 0; taken < need;) {
    const uint32_t m = __reduce_max_sync(TC_FULL, v[0]);
    const bool mine = v[0] == m;
    const int after = taken + __popc(__ballot_sync(TC_FULL, mine));
    k_l = need_l > taken && need_l <= after ? m : k_l;
    k_u = need_u > taken && need_u <= after ? m : k_u;
    taken = after;
    if (mine) {
#pragma unroll
      for (int i = 0; i + 1 < R; i++)
        v[i] = v[i + 1];
      v[R - 1] = 0u;
    }
  }
}

/* tc_ranked_pair's need_l-th and need_u-th largest (ranks from 1; 0 for a
 * rank of 0) by a filter, for S >= 4 slots: the need-th largest of the 32
 * lanes' maxima, T (need = the larger rank), sits at or below the need-th
 * largest value, since the need lanes whose maxima reach T hold need values
 * >= T; so the values >= T hold every rank up to need. They are few on
 * ordinary inputs (~20 of 512 at K = 16), so they go through room (32 words
 * of shared memory, the warp's) and one 32-value sort. ~7 S + 150
 * instructions against tc_ranked_pair's ~10 S log S + 25 per rank (~600 at S
 * = 16). Returns false, with k_l, k_u unset, where it does not apply (need >
 * 32, T = 0: fewer than need lanes hold a value; more than 32 values >= T:
 * ties); the caller ranks as before. v is left as it was; every lane calls
 * it, the ranks uniform. */
template <int S>
static __device__ __forceinline__ bool tc_filter_ranks(const uint32_t (&v)[S], int need_l,
                                                       int need_u, uint32_t *room, uint32_t &k_l,
                                                       uint32_t &k_u) {
  const int lane = threadIdx.x & 31;
  const int need = need_l > need_u ? need_l : need_u;
  if (need < 1 || need > 32)
    return false;
  uint32_t m[1] = {v[0]};
#pragma unroll
  for (int i = 1; i < S; i++)
    m[0] = max(m[0], v[i]);
  tc_sort_desc<1>(m);
  const uint32_t t = tc_sorted_at<1>(m, need - 1);
  if (t == 0u)
    return false;
  int c = 0;
#pragma unroll
  for (int i = 0; i < S; i++)
    c += v[i] >= t;
  int end = c; /* inclusive prefix of the lanes' counts */
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int y = __shfl_up_sync(TC_FULL, end, d);
    end += lane >= d ? y : 0;
  }
  const int total = __shfl_sync(TC_FULL, end, 31);
  if (total > 32)
    return false;
  int p = end - c;
#pragma unroll
  for (int i = 0; i < S; i++)
    if (v[i] >= t)
      room[p++] = v[i];
  __syncwarp(); /* the values */
  uint32_t x[1] = {lane < total ? room[lane] : 0u};
  __syncwarp(); /* room free for the caller's next use */
  tc_sort_desc<1>(x);
  const uint32_t a_l = tc_sorted_at<1>(x, need_l > 0 ? need_l - 1 : 0);
  const uint32_t a_u = tc_sorted_at<1>(x, need_u > 0 ? need_u - 1 : 0);
  k_l = need_l > 0 ? a_l : 0u;
  k_u = need_u > 0 ? a_u : 0u;
  return true;
}

/* A pair's entries (candidate slots of its workspace row; the host picked
 * 32 R >= max_nb - init - local) into this lane's R slots, the first lim
 * (0 past them). With lim = max_nb - init they do not depend on the row
 * lookup's dependent loads, so the kernels issue them first (entries past
 * the pair's candidates are in its row and ignored); with lim = the pair's
 * own candidate count (tc_select_reg_kernel for R >= 8) they read only what
 * the pair uses, after the lookup. */
template <int R>
static __device__ __forceinline__ void tc_reg_load(const tc_select_args &a, int64_t lp, int64_t lim,
                                                   float2 (&e)[R]) {
  const int lane = threadIdx.x & 31;
  const float2 *W = a.ws + lp * a.max_nb + a.init;
#pragma unroll
  for (int i = 0; i < R; i++) {
    const int j = lane + 32 * i;
    e[i] = j < lim ? __ldcg(W + j) : make_float2(0.0f, 0.0f);
  }
}

/* Whether the register selection applies to a pair with nb > K: its row
 * has entries (its request has a.min_rows rows or more) and at most 32 R
 * candidates. */
template <int R>
static __device__ __forceinline__ bool tc_reg_covers(const tc_select_args &a,
                                                     const m3s_row_info &ri, int64_t nb) {
  return !a.measure && ri.n >= a.min_rows && a.topk > a.init + a.local &&
         nb - a.local - a.init <= 32 * R;
}

/* The first pass over a covered pair's n candidates in S slots: each
 * slot's ordered S~ (0 for a whole-line or missing entry) into key, the
 * bits of the largest finite E into e_bits (non-negative floats order as
 * their bits); returns this lane's whole-line entries. */
template <int R, int S>
static __device__ __forceinline__ int tc_reg_keys(int n, const float2 (&e)[R], uint32_t (&key)[S],
                                                  uint32_t &e_bits) {
  const int lane = threadIdx.x & 31;
  int lane_inf = 0;
  e_bits = 0;
#pragma unroll
  for (int i = 0; i < S; i++) {
    const int j = lane + 32 * i;
    const bool whole = j < n && tc_whole_line(e[i]);
    const bool finite = j < n && !whole;
    lane_inf += whole;
    key[i] = finite ? tc_ord(e[i].x) : 0u;
    e_bits = finite && e[i].y > 0.0f ? max(e_bits, __float_as_uint(e[i].y)) : e_bits;
  }
  return lane_inf;
}

/* The classes of a covered pair's n candidates (entries e) against the
 * thresholds u' and l' of tc_select_classify: the need_l-th and need_u-th
 * largest S~ among the finite entries (whole-line and missing entries sort
 * last, as 0) widened by the largest finite E. Counts In into n_in; returns
 * the number of uncertain blocks (every whole-line entry is one). Only the
 * first S slots are read (32 S >= n); the classes above them are out. room:
 * the warp's 32 words of shared memory for tc_filter_ranks, or NULL to rank
 * without it (the deferred kernel: its few pairs do not pay the registers). */
template <int R, int S = R>
static __device__ __forceinline__ int tc_reg_classify(const tc_select_args &a, int n,
                                                      const float2 (&e)[R], int (&cls)[R],
                                                      int &n_in, uint32_t *room) {
  const int lane = threadIdx.x & 31;
  const int want = a.topk - a.init - a.local;
  static_assert(S <= R, "the slots in use are R's first");
  uint32_t key[S], e_bits;
  /* counts per lane, summed once (not a ballot per slot) */
  const int lane_inf = tc_reg_keys<R, S>(n, e, key, e_bits);
  const int n_inf = (int)__reduce_add_sync(TC_FULL, (unsigned)lane_inf);
  const float e_max = __uint_as_float(__reduce_max_sync(TC_FULL, e_bits));
  const int f = n - n_inf;
  const int need_l = f >= want ? want : 0, need_u = n_inf > want ? 0 : want + 1 - n_inf;
  uint32_t k_l, k_u;
  bool ranked = false;
  if constexpr (S >= 4) {
    if (room) {
      ranked = tc_filter_ranks<S>(key, need_l, need_u, room, k_l, k_u);
      if (a.stats && lane == 0)
        atomicAdd(ranked ? &a.stats->filter_pairs : &a.stats->filter_falls, 1u);
    }
  }
  if (!ranked) {
    if constexpr (S >= 8) {
      tc_ranked_pair<S>(key, need_l, need_u, k_l, k_u);
    } else {
      tc_sort_desc<S>(key);
      k_l = need_l ? tc_sorted_at<S>(key, need_l - 1) : 0u;
      k_u = need_u ? tc_sorted_at<S>(key, need_u - 1) : 0u;
    }
  }
  float u_p, l_p;
  tc_widen(k_l, k_u, e_max, l_p, u_p);
  int lane_in = 0, lane_q = 0;
#pragma unroll
  for (int i = 0; i < S; i++) {
    cls[i] = lane + 32 * i < n ? tc_class(e[i], u_p, l_p) : TC_OUT;
    lane_in += cls[i] == TC_IN;
    lane_q += cls[i] == TC_UNSURE;
  }
#pragma unroll
  for (int i = S; i < R; i++)
    cls[i] = TC_OUT;
  n_in = (int)__reduce_add_sync(TC_FULL, (unsigned)lane_in);
  return (int)__reduce_add_sync(TC_FULL, (unsigned)lane_q);
}

/* tc_reg_classify of a pair of n candidates in R slots; for R >= 8 on the
 * fewest slots that hold them (R / 4, R / 2 or R: ranking and classes cost
 * what the pair's own length needs, not the chunk's longest). */
template <int R>
static __device__ __forceinline__ int tc_reg_classify_n(const tc_select_args &a, int n,
                                                        const float2 (&e)[R], int (&cls)[R],
                                                        int &n_in, uint32_t *room) {
  if constexpr (R >= 8) {
    if (n <= 32 * (R / 4))
      return tc_reg_classify<R, R / 4>(a, n, e, cls, n_in, room);
    if (n <= 32 * (R / 2))
      return tc_reg_classify<R, R / 2>(a, n, e, cls, n_in, room);
  }
  return tc_reg_classify<R>(a, n, e, cls, n_in, room);
}

/* The uncertain blocks of a classified pair listed in sm.qlist in the
 * candidates' order, and its query (elements lane + 32 m in qv) staged as
 * fp32 in sm.q, for the re-scores (the warp's own or the CTA's). */
template <int R>
static __device__ __forceinline__ void tc_reg_list(const tc_select_args &a, const int (&cls)[R],
                                                   const uint16_t (&qv)[4], tc_warp_shared &sm) {
  const int lane = threadIdx.x & 31;
  const uint32_t lt = (1u << lane) - 1u;
  /* Q listed in the candidates' order */
  int base = 0;
#pragma unroll
  for (int i = 0; i < R; i++) {
    const uint32_t m = __ballot_sync(TC_FULL, cls[i] == TC_UNSURE);
    if (cls[i] == TC_UNSURE)
      sm.qlist[base + __popc(m & lt)] = a.init + lane + 32 * i;
    base += __popc(m);
  }
#pragma unroll
  for (int m = 0; m < 4; m++)
    sm.q[lane + 32 * m] = __uint_as_float((uint32_t)qv[m] << 16);
}

/* Ranks the nq listed blocks on their reference scores (sm.qsc, visible to
 * the warp): chosen[j] (j = candidate index) says whether each is among the
 * best want - n_in. */
static __device__ __forceinline__ void tc_reg_choose(const tc_select_args &a, int nq, int n_in,
                                                     const tc_warp_shared &sm,
                                                     unsigned char *chosen) {
  const int lane = threadIdx.x & 31;
  const int want = a.topk - a.init - a.local;
  const int32_t id = lane < nq ? sm.qlist[lane] : -1;
  const unsigned long long k = lane < nq ? tc_key(tc_ord(sm.qsc[lane]), id) : 0ull;
  int rank = 0;
  for (int j = 0; j < nq; j++)
    rank += __shfl_sync(TC_FULL, k, j) > k;
  if (lane < nq)
    chosen[id - a.init] = rank < want - n_in;
  __syncwarp(); /* the choices */
}

/* A decided pair's forced blocks into its K ids, and its stats. */
static __device__ __forceinline__ void tc_reg_write_forced(const tc_select_args &a, int64_t nb,
                                                           int n, int nq, int32_t *out) {
  const int lane = threadIdx.x & 31;
  tc_add_stats(a, (unsigned long long)n, (unsigned long long)nq, 0, 0);
  if (a.stats && lane == 0)
    atomicAdd(&a.stats->reg_pairs, 1u);
  for (int k = lane; k < a.init; k += 32)
    out[k * a.o_s2] = k;
  for (int k = lane; k < a.local; k += 32)
    out[(a.topk - a.local + k) * a.o_s2] = (int32_t)(nb - a.local + k);
}

/* The K ids of a decided pair in ascending order: the forced blocks, then
 * In and the chosen uncertain blocks (chosen, read only for those) by
 * prefix counts; the pair's stats counted. */
template <int R>
static __device__ __forceinline__ void tc_reg_write(const tc_select_args &a, int64_t nb, int n,
                                                    int nq, const int (&cls)[R],
                                                    const unsigned char *chosen, int32_t *out) {
  const int lane = threadIdx.x & 31;
  const uint32_t lt = (1u << lane) - 1u;
  tc_reg_write_forced(a, nb, n, nq, out);
  int pos = a.init;
#pragma unroll
  for (int i = 0; i < R; i++) {
    const bool in = cls[i] == TC_IN || (cls[i] == TC_UNSURE && chosen[lane + 32 * i]);
    const uint32_t m = __ballot_sync(TC_FULL, in);
    if (in)
      out[(pos + __popc(m & lt)) * a.o_s2] = a.init + lane + 32 * i;
    pos += __popc(m);
  }
}

/* A register-selection warp's candidates kept by tc_reg_few, in candidate
 * order: entry and candidate index. */
typedef struct {
  float2 e[32];
  int32_t j[32];
} tc_few_room;

/* tc_reg_classify and tc_reg_write of a covered pair in one compaction,
 * with no class or output pass over the S slots. T, the need-th largest of
 * the lanes' maxima (need = need_u here), is at most the need-th largest S~
 * (tc_filter_ranks), so T <= k_u <= k_l and l_T = T - e_max rounded down
 * is at most l'. Every candidate whose upper bound U reaches l_T goes to
 * room, one per lane, in candidate order: they hold the values >= T (U >=
 * S~), hence every rank up to need, and every candidate that is not surely
 * out. The others are out by tc_class: U < l_T <= l', and not In, as L <=
 * S~ <= U < l_T <= T <= k_u <= u' (In needs L > u'; E >= 0, tc_bound's). The ranks, classes and K
 * ids then come from room, the same as the slot path's. A covered pair has more candidates than K -
 * init - local (nb > K), so with no whole line need_l is that and T is a real value. Returns 0
 * (decided, ids written), 1 (a whole-line or uncertain block: the caller defers the pair) or -1
 * (declined: K - init - local >= 32, more than 32 candidates kept; the
 * caller takes the slot path). Every lane calls it. */
template <int R, int S>
static __device__ __forceinline__ int tc_reg_few(const tc_select_args &a, int64_t nb, int n,
                                                 const float2 (&e)[R], tc_few_room &room,
                                                 int32_t *out) {
  const int lane = threadIdx.x & 31;
  const uint32_t lt = (1u << lane) - 1u;
  const int want = a.topk - a.init - a.local;
  uint32_t key[S], e_bits;
  const int lane_inf = tc_reg_keys<R, S>(n, e, key, e_bits);
  uint32_t top[1] = {key[0]};
#pragma unroll
  for (int i = 1; i < S; i++)
    top[0] = max(top[0], key[i]);
  /* a whole-line block is uncertain whatever the thresholds */
  if (__reduce_add_sync(TC_FULL, (unsigned)lane_inf) > 0)
    return 1;
  const float e_max = __uint_as_float(__reduce_max_sync(TC_FULL, e_bits));
  const int need_l = want, need_u = want + 1;
  if (need_u > 32 || n <= want)
    return -1;
  tc_sort_desc<1>(top);
  const uint32_t t = tc_sorted_at<1>(top, need_u - 1);
  const float l_t = __fsub_rd(tc_unord(t), e_max);
  int kept = 0;
#pragma unroll
  for (int i = 0; i < S; i++) {
    const int j = lane + 32 * i;
    const bool keep = j < n && !(__fadd_ru(e[i].x, e[i].y) < l_t);
    const uint32_t m = __ballot_sync(TC_FULL, keep);
    const int p = kept + __popc(m & lt);
    if (keep && p < 32) {
      room.e[p] = e[i];
      room.j[p] = j;
    }
    kept += __popc(m);
  }
  __syncwarp(); /* the kept candidates */
  const bool mine = lane < kept && kept <= 32;
  const float2 me = mine ? room.e[lane] : make_float2(0.0f, 0.0f);
  const int32_t mj = mine ? room.j[lane] : 0;
  __syncwarp(); /* room free for the next pair */
  if (kept > 32)
    return -1;
  uint32_t x[1] = {mine ? tc_ord(me.x) : 0u};
  tc_sort_desc<1>(x);
  const uint32_t k_l = tc_sorted_at<1>(x, need_l - 1), k_u = tc_sorted_at<1>(x, need_u - 1);
  float u_p, l_p;
  tc_widen(k_l, k_u, e_max, l_p, u_p);
  const int cls = mine ? tc_class(me, u_p, l_p) : TC_OUT;
  if (__reduce_add_sync(TC_FULL, (unsigned)(cls == TC_UNSURE)) > 0)
    return 1;
  tc_reg_write_forced(a, nb, n, 0, out);
  const uint32_t m = __ballot_sync(TC_FULL, cls == TC_IN);
  if (cls == TC_IN)
    out[(a.init + __popc(m & lt)) * a.o_s2] = a.init + mj;
  return 0;
}

/* tc_reg_few on the fewest slots that hold a pair's n candidates (as
 * tc_reg_classify_n), its answers counted in the stats. */
template <int R>
static __device__ __forceinline__ int tc_reg_few_n(const tc_select_args &a, int64_t nb, int n,
                                                   const float2 (&e)[R], tc_few_room &room,
                                                   int32_t *out) {
  int r;
  static_assert(R >= 2, "R 1 keeps the slot path");
  if (R >= 8 && n <= 32 * (R / 4))
    r = tc_reg_few<R, (R >= 8 ? R / 4 : R)>(a, nb, n, e, room, out);
  else if (R >= 8 && n <= 32 * (R / 2))
    r = tc_reg_few<R, (R >= 8 ? R / 2 : R)>(a, nb, n, e, room, out);
  else
    r = tc_reg_few<R, R>(a, nb, n, e, room, out);
  if (a.stats && (threadIdx.x & 31) == 0)
    atomicAdd(r == 0   ? &a.stats->reg_few_decided
              : r == 1 ? &a.stats->reg_few_deferred
                       : &a.stats->reg_few_falls,
              1u);
  return r;
}

/* One pair per CTA (batches with few pairs, where the pairs alone would
 * leave most SMs idle; at one 128K decode request the selection was the
 * step's longest kernel, 19 us under ncu, its warps mostly waiting at the CTA
 * barrier for warp 0's ranking). Every phase is spread over the CTA's
 * TC_WIDE_WARPS warps: the thresholds u', l' of tc_select_classify come from a
 * tournament over the candidates' S~ (tc_wide_few; a radix select,
 * tc_wide_ranks, beyond 1024 candidates or from K - init - local = 32), the
 * classification is one pass of all threads, and each uncertain block is
 * re-scored by four warps, one key per lane (tc_exact_slice), so the
 * re-scores of a pair take about one memory round trip. The same sets In, Q
 * and the same reference scores as tc_select_classify / _rescore, so the
 * same result; rows of short
 * requests, pairs with nothing to choose, the test hook's measure mode and
 * more than 32 uncertain blocks take those functions on warp 0 instead.
 * Batches of no more pairs than SMs run it at one CTA per SM (registers not
 * capped for occupancy), decode batches of more pairs, of many candidates or
 * at most two per SM, at two (MINB below). */
#define TC_WIDE_WARPS 8
#define TC_WIDE_THREADS (TC_WIDE_WARPS * 32)
/* decode batches of more pairs than SMs take the CTA-wide selection (two
 * CTAs per SM, <= 128 registers) from this many candidates per pair (host
 * bound: max_seq_len's blocks less the forced) up to TC_WIDE_MANY_PER_SM
 * pairs per SM, or at any count when there are at most two pairs per SM */
#define TC_WIDE_MANY_CAND 512
#define TC_WIDE_MANY_PER_SM 4 /* ... up to this many pairs per SM */

typedef struct {
  float q[M3S_INDEX_DIM];
  int32_t sel[M3S_MAX_TOPK];
  int32_t qlist[32];
  float qsc[32];
  float part[32][4];               /* per uncertain block, per quarter of its keys */
  uint32_t hist[2][2][256];        /* per pass parity (a pass clears the other), per rank */
  uint32_t top[TC_WIDE_WARPS][32]; /* tc_wide_few: each warp's largest, descending */
  uint32_t pre[2];                 /* per rank: the value's digits found so far */
  uint32_t left[2]; /* per rank: its rank among the values with that prefix, 0 = none */
  int cnt[2];
  int n_inf;
  uint32_t e_max; /* bits of the largest finite E (non-negative) */
  tc_sel_state st;
} tc_wide_shared;

/* The ordered S~ of an entry: 0 (below every real value) for a whole-line
 * one. */
static __device__ __forceinline__ uint32_t tc_centre_ord(float2 e) {
  return tc_whole_line(e) ? 0u : tc_ord(e.x);
}

/* Counts digit d in histogram h where `on`, one shared atomic per distinct
 * digit of the warp: the lanes that hold the same digit add through their
 * first lane. Block maxima of one pair mostly share their exponent, so in
 * the first radix pass every lane's digit is the same, and per-lane atomics
 * on one word are serialised (1023 of them per rank at a 128K context).
 * Every lane of the warp calls it. */
static __device__ __forceinline__ void tc_hist_add(uint32_t *h, bool on, uint32_t d, int lane) {
  const unsigned peers = __match_any_sync(TC_FULL, on ? d : 256u);
  if (on && lane == __ffs(peers) - 1)
    atomicAdd(&h[d], (uint32_t)__popc(peers));
}

/* The whole-line entry count and largest finite E over W[lo, hi) (as
 * tc_select_classify) go into sm.n_inf, sm.e_max (zeroed by the caller):
 * each thread counts its entries (tc_wide_count), then each warp adds its
 * sums (tc_wide_add_counts); tc_wide_counts does both over W, tc_wide_few on
 * its own load. E >= 2^-118 in every finite entry (nothing rewrote them
 * yet), so their bits order as the values. */
static __device__ __forceinline__ void tc_wide_count(float2 e, int &n_inf, uint32_t &e_max) {
  if (tc_whole_line(e))
    n_inf++;
  else
    e_max = max(e_max, __float_as_uint(e.y));
}

static __device__ __forceinline__ void tc_wide_add_counts(int n_inf, uint32_t e_max,
                                                          tc_wide_shared &sm) {
  n_inf = __reduce_add_sync(TC_FULL, n_inf);
  e_max = __reduce_max_sync(TC_FULL, e_max);
  if ((threadIdx.x & 31) == 0) {
    atomicAdd(&sm.n_inf, n_inf);
    atomicMax(&sm.e_max, e_max);
  }
}

static __device__ void tc_wide_counts(const float2 *W, int64_t lo, int64_t hi, tc_wide_shared &sm) {
  int n_inf = 0;
  uint32_t e_max = 0;
  for (int64_t b = lo + threadIdx.x; b < hi; b += TC_WIDE_THREADS)
    tc_wide_count(W[b], n_inf, e_max);
  tc_wide_add_counts(n_inf, e_max, sm);
}

/* The ranks the thresholds take among the finite S~ (0: none, an infinite
 * threshold), from the free slots `want`, the candidates and the whole-line
 * count: n[0] = W for l', n[1] = W + 1 - n_inf for u'. */
static __device__ __forceinline__ void tc_wide_wanted(int want, int cand, int n_inf, uint32_t *n) {
  n[0] = cand - n_inf >= want ? want : 0;
  n[1] = n_inf > want ? 0 : want + 1 - n_inf;
}

/* The CTA's radix select: the left[r]-th largest tc_centre_ord over the
 * candidates W[lo, hi) for both ranks r at once, four 8-bit digits from the
 * top, into pre[r]; 0 where left[r] == 0 (not wanted) or the rank falls on a
 * whole-line entry or past the candidates (tc_nth_key's 0 key: an infinite
 * threshold). Every thread calls it, with pre = 0 and left set. */
static __device__ void tc_wide_ranks(const float2 *W, int64_t lo, int64_t hi, tc_wide_shared &sm) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
#pragma unroll 1
  for (int pass = 0; pass < 4; pass++) {
    const int shift = 24 - 8 * pass;
    const uint32_t top = pass ? 0xffffffffu << (shift + 8) : 0u;
    uint32_t(&hist)[2][256] = sm.hist[pass & 1];
    for (int i = tid; i < 512; i += TC_WIDE_THREADS)
      (&hist[0][0])[i] = 0;
    __syncthreads(); /* the histograms are clear (the last pass read the other
                      * pair), pre / left of the last pass visible */
    const uint32_t p0 = sm.pre[0], p1 = sm.pre[1];
    const int a0 = sm.left[0] != 0, a1 = sm.left[1] != 0;
    /* whole warps in every step (tc_hist_add) */
    for (int64_t b0 = lo; b0 < hi; b0 += TC_WIDE_THREADS) {
      const int64_t b = b0 + tid;
      const bool in = b < hi;
      const uint32_t k = in ? tc_centre_ord(W[b]) : 0u, d = (k >> shift) & 255u;
      tc_hist_add(hist[0], in && a0 && (k & top) == p0, d, lane);
      tc_hist_add(hist[1], in && a1 && (k & top) == p1, d, lane);
    }
    __syncthreads(); /* the histograms are complete */
    if (warp < 2 && sm.left[warp] != 0) {
      /* warp r: the digit where the count from the top reaches left[r];
       * lane l holds bins 8 l .. 8 l + 7 */
      uint32_t c[8], mine = 0;
#pragma unroll
      for (int j = 0; j < 8; j++) {
        c[j] = hist[warp][8 * lane + j];
        mine += c[j];
      }
      uint32_t above = mine; /* then: the count of the lanes above */
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const uint32_t v = __shfl_down_sync(TC_FULL, above, o);
        if (lane + o < 32)
          above += v;
      }
      above -= mine;
      const uint32_t n = sm.left[warp];
      int dig = -1;
      uint32_t rest = 0, run = above;
#pragma unroll
      for (int j = 7; j >= 0; j--) {
        if (dig < 0 && run < n && n <= run + c[j]) {
          dig = 8 * lane + j;
          rest = n - run;
        }
        run += c[j];
      }
      const unsigned found = __ballot_sync(TC_FULL, dig >= 0);
      if (dig >= 0) {
        sm.pre[warp] |= (uint32_t)dig << shift;
        sm.left[warp] = rest;
      } else if (!found && lane == 0) {
        sm.pre[warp] = 0;
        sm.left[warp] = 0;
      }
    }
  }
  __syncthreads(); /* pre is final */
}

/* tc_wide_few's limits: candidates per thread, and its ranks (a warp's run
 * is one word per lane). */
#define TC_FEW_PER 4
#define TC_FEW_RANKS 32

/* a, b in descending order. */
static __device__ __forceinline__ void tc_order2(uint32_t &a, uint32_t &b) {
  const uint32_t h = max(a, b);
  b = min(a, b);
  a = h;
}

/* The 32 largest of two descending lane-ordered runs a, b (lane l holds
 * a_l, b_l), descending: max(a_l, b_31-l) is bitonic and holds them (the
 * first step of Batcher's merge), then five half-cleaner steps sort it.
 * Multisets: equal values are kept as often as they occur. */
static __device__ __forceinline__ uint32_t tc_merge32(uint32_t a, uint32_t b, int lane) {
  uint32_t c = max(a, __shfl_sync(TC_FULL, b, 31 - lane));
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const uint32_t y = __shfl_xor_sync(TC_FULL, c, o);
    c = (lane & o) ? min(c, y) : max(c, y);
  }
  return c;
}

/* The counts and ranks of tc_wide_counts / tc_wide_ranks in one pass, for
 * at most TC_FEW_PER x TC_WIDE_THREADS candidates and want < TC_FEW_RANKS
 * (both ranks are then at most want + 1 <= 32): the same n_inf, e_max and
 * pre[], as a tournament instead of the radix select's four passes of two
 * CTA barriers each (the one-request selection was that serial chain: 13.3
 * us under ncu on the H200, 0.16 instructions issued per cycle per
 * scheduler; with the tournament 9.5-9.7 us against 13.8-14.6 on an H100,
 * one 128K request, docs/perf-notes.md session 19). Each thread sorts its
 * (up to) four tc_centre_ord keys; each warp takes its want + 1 largest one
 * at a time (a warp maximum, the lowest
 * lane holding it pops one copy, so equal values count as often as they
 * occur, as in the radix histograms); warp 0 merges the eight warps' runs
 * pairwise (tc_merge32) and reads the two ranks off the merged run. Missing
 * candidates are 0, below every real key: a rank past the candidates or on
 * a whole-line entry gives 0, as tc_wide_ranks. Every thread calls it; it
 * ends with a CTA barrier. */
static __device__ void tc_wide_few(const float2 *W, int64_t lo, int64_t hi, int want,
                                   tc_wide_shared &sm) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  static_assert(TC_FEW_PER == 4, "the 4-sorter below");
  uint32_t k[TC_FEW_PER];
  int n_inf = 0;
  uint32_t e_max = 0;
#pragma unroll
  for (int u = 0; u < TC_FEW_PER; u++) {
    const int64_t b = lo + tid + (int64_t)u * TC_WIDE_THREADS;
    k[u] = 0u;
    if (b < hi) {
      const float2 e = W[b];
      tc_wide_count(e, n_inf, e_max);
      k[u] = tc_centre_ord(e);
    }
  }
  tc_wide_add_counts(n_inf, e_max, sm);
  /* descending: the five comparators of a 4-sorter */
  tc_order2(k[0], k[1]);
  tc_order2(k[2], k[3]);
  tc_order2(k[0], k[2]);
  tc_order2(k[1], k[3]);
  tc_order2(k[1], k[2]);
  uint32_t mine = 0; /* lane i: the warp's (i + 1)-th largest */
  for (int i = 0; i <= want; i++) {
    const uint32_t m = __reduce_max_sync(TC_FULL, k[0]);
    const unsigned at = __ballot_sync(TC_FULL, k[0] == m);
    if (lane == __ffs(at) - 1) {
#pragma unroll
      for (int u = 0; u + 1 < TC_FEW_PER; u++)
        k[u] = k[u + 1];
      k[TC_FEW_PER - 1] = 0u;
    }
    if (lane == i)
      mine = m;
  }
  sm.top[warp][lane] = mine;
  __syncthreads(); /* every warp's run, the counts */
  if (warp == 0) {
    uint32_t v[TC_WIDE_WARPS];
#pragma unroll
    for (int w = 0; w < TC_WIDE_WARPS; w++)
      v[w] = sm.top[w][lane];
#pragma unroll
    for (int span = 1; span < TC_WIDE_WARPS; span <<= 1)
#pragma unroll
      for (int w = 0; w + span < TC_WIDE_WARPS; w += 2 * span)
        v[w] = tc_merge32(v[w], v[w + span], lane);
    uint32_t n[2];
    tc_wide_wanted(want, (int)(hi - lo), sm.n_inf, n);
    const uint32_t r0 = __shfl_sync(TC_FULL, v[0], n[0] > 0 ? n[0] - 1 : 0),
                   r1 = __shfl_sync(TC_FULL, v[0], n[1] > 0 ? n[1] - 1 : 0);
    if (lane == 0) {
      sm.pre[0] = n[0] > 0 ? r0 : 0u;
      sm.pre[1] = n[1] > 0 ? r1 : 0u;
    }
  }
  __syncthreads(); /* pre is final */
}

/* Phases 1 and 2 of a pair with nb > K and a finite selection to make
 * (want > 0), by the whole CTA; sm.q and the entries W are staged, the
 * forced blocks in sm.sel, sm.cnt zeroed. Returns the state for
 * tc_select_finish, or done = -1 when more than 32 blocks are uncertain (the
 * caller then runs tc_select_classify, which handles that). */
static __device__ tc_sel_state tc_wide_classify_rescore(const m3s_cuda_batch &bt,
                                                        const tc_select_args &a, const float2 *W,
                                                        const m3s_row_info &ri, int64_t nb,
                                                        tc_wide_shared &sm) {
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int want = a.topk - a.init - a.local;
  const int64_t lo = a.init, hi = nb - a.local;
  tc_sel_state st = {a.init + a.local, 0, 0, 0};
  const bool few = hi - lo <= (int64_t)TC_FEW_PER * TC_WIDE_THREADS && want < TC_FEW_RANKS;
  if (a.stats && tid == 0)
    atomicAdd(few ? &a.stats->few_pairs : &a.stats->radix_pairs, 1u);
  if (few) {
    tc_wide_few(W, lo, hi, want, sm);
  } else {
    tc_wide_counts(W, lo, hi, sm);
    __syncthreads(); /* the counts */
    if (tid == 0) {
      tc_wide_wanted(want, (int)(hi - lo), sm.n_inf, sm.left);
      sm.pre[0] = sm.pre[1] = 0;
    }
    tc_wide_ranks(W, lo, hi, sm);
  }
  const float ef = __uint_as_float(sm.e_max);
  float u_p, l_p;
  tc_widen(sm.pre[0], sm.pre[1], ef, l_p, u_p);
  for (int64_t b = lo + tid; b < hi; b += TC_WIDE_THREADS) {
    const int c = tc_class(W[b], u_p, l_p);
    if (c == TC_IN) {
      sm.sel[st.nsel + atomicAdd(&sm.cnt[0], 1)] = (int32_t)b;
    } else if (c == TC_UNSURE) {
      const int j = atomicAdd(&sm.cnt[1], 1);
      if (j < 32)
        sm.qlist[j] = (int32_t)b;
    }
  }
  __syncthreads(); /* In, Q and their counts */
  st.n_in = sm.cnt[0];
  st.nq = sm.cnt[1];
  if (st.nq > 32) {
    __syncthreads(); /* every thread has read the counts, which the caller's
                      * tc_select_classify rewrites */
    st.done = -1;
    return st;
  }
  if (!a.no_rescore)
    for (int u = warp; u < 4 * st.nq; u += TC_WIDE_WARPS) {
      const float v = tc_exact_slice(bt, a, ri.r, sm.qlist[u >> 2], u & 3, ri.pos, sm.q, NULL);
      if (lane == 0)
        sm.part[u >> 2][u & 3] = v;
    }
  __syncthreads(); /* the quarters' maxima */
  if (tid < st.nq)
    sm.qsc[tid] = a.no_rescore ? W[sm.qlist[tid]].x
                               : fmaxf(fmaxf(sm.part[tid][0], sm.part[tid][1]),
                                       fmaxf(sm.part[tid][2], sm.part[tid][3]));
  if (warp == 0)
    tc_add_stats(a, (unsigned long long)(hi - lo), (unsigned long long)st.nq, 0, 0);
  __syncthreads(); /* the scores */
  return st;
}

#endif
