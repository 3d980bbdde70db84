/* CUDA backend: lightning-indexer block scores and top-k block selection
 * (SPEC section 3). The result equals the CPU backend's (src/cpu/topk.c)
 * bit for bit, for every input: each dot product is m3s_dot128_fixed (the
 * CPU's order, no FMA) on fp32 values converted exactly as the CPU does
 * (bf16/f16 widening, e4m3 via the hardware/cuda_fp8.h conversion, exact);
 * block maxima ignore NaN unless every visible dot is NaN (fmaxf, as the CPU's
 * "isnan(best) || d > best"); selection uses the CPU's strict total order
 * "higher score first, NaN last, equal scores (-0 == +0) by lower block id".
 *
 * Work is cut into (row, head) pairs, p = t * Hkv + g, in chunks of at most
 * chunk_pairs pairs (so the workspace stays bounded at long contexts); per
 * chunk two launches on exec->stream:
 *  1. score_kernel   grid (ceil(n / PAIR_TILE), gy), SCORE_THREADS = 128.
 *     A CTA owns PAIR_TILE consecutive pairs (consecutive rows, all heads;
 *     rows may belong to different requests, e.g. decode) and the blocks
 *     b = blockIdx.y, blockIdx.y + gy, ... < max_nb (gy: score_grid_y). It
 *     stages its pairs' index queries in shared memory as fp32, then for each
 *     block and each run of pairs of one request: thread j holds key j of the
 *     block's page in registers (fp32) and computes dot(q, k_j) for every pair
 *     of the run that needs the block; a warp fmaxf-reduction plus a 4-warp combine gives
 *     S(b), written to the workspace. Pairs need block b when the row is
 *     valid, nb > K and b is not forced (init <= b < nb - local): exactly the
 *     entries the selection reads. A page id outside [0, P) gives S = NaN.
 *     Skipped entirely when max_nb <= K (then no row has anything to score).
 *  2. select_kernel  grid min(n, 2^31-1), SEL_THREADS = 256, a CTA per pair
 *     (grid-stride). nb <= K: ids 0..nb-1 then -1; padded/invalid rows: all
 *     -1. Otherwise the forced blocks, then the best want = K - init - local
 *     of the candidates [init, nb - local) under the total order encoded as
 *     one 64-bit key (ordered score bits << 32 | ~id, NaN -> 0): each warp
 *     takes the best want of its own candidates (want rounds of a warp
 *     maximum over keys its lanes keep in registers), then warp 0 the best
 *     want of those (select_row). The K ids are written in ascending order
 *     by rank.
 * Uniform decode batches whose pairs fit one chunk go to the streaming decode
 * score kernel of topk_decode.cu instead of score_kernel (same S entries, same
 * bits; it declines the shapes it does not cover), then select_kernel.
 * Launch count, grids and workspace depend only on host bounds
 * (batch->num_tokens, batch->max_seq_len, batch->uniform_q_len, cfg, the SM
 * count and the score kernel's occupancy): graph-safe. The score grid's
 * height gy comes from score_grid_y.
 *
 * Workspace (m3s_cuda_topk_workspace): f32 S[chunk_pairs][max_nb], max_nb =
 * ceil(max_seq_len / 128), entry (p - pair0) * max_nb + b; chunk_pairs =
 * min(T * Hkv, max(1, TOPK_WS_BUDGET / (4 * max_nb))) rounded down to a
 * multiple of PAIR_TILE when that is >= PAIR_TILE; 0 bytes when max_nb <= K.
 *
 * Guards (device data is not validated): rows whose request is padded or
 * inconsistent (m3s_row_lookup) get -1 rows; page ids out of range give NaN
 * block scores; every read and write is in bounds for any table contents.
 *
 * measured (H100, 2026-11-27, docs/perf-notes.md): decode top-k at 128 requests,
 * 128K context, TP1 bf16: 2074 us, 68% of the copy ceiling; latency-bound
 * (161 registers, 3 CTAs per SM). */
#include "common.cuh"
#include "sm90/topk_tc.h"
#include "topk_decode.cuh"

#include <stdint.h>

#define FULL_MASK 0xffffffffu
#define SCORE_THREADS 128 /* one thread per key slot of a block */
#define SCORE_WARPS (SCORE_THREADS / 32)
#define PAIR_TILE 64 /* (row, head) pairs per score CTA */
#define SEL_THREADS 256
#define SEL_WARPS (SEL_THREADS / 32)
#define GRID_Y_MAX 65535
#define TOPK_WS_BUDGET ((int64_t)128 << 20) /* bytes of S per chunk (soft cap) */

/* ---------------------------------------------------------------------------
 * Host planning (shared by the workspace query and the launch)
 * ------------------------------------------------------------------------- */

typedef struct {
  int64_t pairs;       /* T * Hkv */
  int64_t max_nb;      /* ceil(max_seq_len / 128) */
  int64_t chunk_pairs; /* pairs per (score, select) launch pair */
  int score;           /* 0: no row can have nb > K, nothing to score */
} topk_plan;

static topk_plan plan_of(const m3s_layer_config *cfg, int64_t tokens, int64_t max_seq_len) {
  topk_plan p;
  p.pairs = tokens > 0 ? tokens * cfg->num_kv_heads : 0;
  p.max_nb = max_seq_len > 0 ? (max_seq_len + M3S_BLOCK_SIZE - 1) / M3S_BLOCK_SIZE : 0;
  p.score = p.pairs > 0 && p.max_nb > cfg->topk;
  p.chunk_pairs = p.pairs;
  if (p.score) {
    int64_t c = TOPK_WS_BUDGET / (p.max_nb * (int64_t)sizeof(float));
    if (c >= PAIR_TILE)
      c -= c % PAIR_TILE;
    if (c < 1)
      c = 1;
    p.chunk_pairs = c < p.pairs ? c : p.pairs;
  }
  if (p.chunk_pairs < 1)
    p.chunk_pairs = 1;
  return p;
}

static size_t plan_bytes(const topk_plan *p) {
  if (!p->score)
    return 0;
  size_t n = (size_t)p->chunk_pairs * (size_t)p->max_nb * sizeof(float);
  return (n + 255) & ~(size_t)255;
}

/* What the size query reports: min(all pairs' scores, the budget). It is an
 * upper bound of plan_bytes() for the same bounds (the chunk never exceeds
 * the budget nor the pairs) and, unlike plan_bytes(), never decreases when
 * max_tokens or max_seq_len grow, so a workspace sized for the largest
 * bounds serves every smaller batch. */
static size_t reported_bytes(const topk_plan *p) {
  if (!p->score)
    return 0;
  size_t all = (size_t)p->pairs * (size_t)p->max_nb * sizeof(float);
  size_t n = all < (size_t)TOPK_WS_BUDGET ? all : (size_t)TOPK_WS_BUDGET;
  return (n + 255) & ~(size_t)255;
}

extern "C" size_t m3s_cuda_topk_workspace(const m3s_context *ctx, const m3s_layer_config *cfg,
                                          int64_t max_tokens, int64_t max_seq_len) {
  (void)ctx;
  topk_plan p = plan_of(cfg, max_tokens, max_seq_len);
  /* either path may run (sm90/topk_tc.cu: the certified one) */
  size_t exact = reported_bytes(&p), tc = m3s_topk_tc_workspace(cfg, max_tokens, max_seq_len);
  return exact > tc ? exact : tc;
}

/* ---------------------------------------------------------------------------
 * Shared device helpers
 * ------------------------------------------------------------------------- */

/* Blocks of a row at position pos: nb = pos / 128 + 1. */
static __device__ __forceinline__ int64_t blocks_of(int64_t pos) {
  return pos / M3S_BLOCK_SIZE + 1;
}

/* Block b is scored for a row with nb blocks (nb > K): not forced. */
static __device__ __forceinline__ int is_candidate(int64_t b, int64_t nb, int init, int local) {
  return b >= init && b < nb - local;
}

/* ---------------------------------------------------------------------------
 * Kernel 1: block scores
 * ------------------------------------------------------------------------- */

typedef struct {
  const void *iq;
  m3s_dtype iq_dt;
  int64_t iq_s0, iq_s1;
  const void *ic;
  m3s_dtype ic_dt;
  int ic_vec; /* index cache 16-byte aligned: vector key loads */
  int64_t num_pages;
  float *ws;
  int64_t max_nb;        /* blocks covered, also the row stride of S */
  int64_t pair0, npairs; /* this chunk: pairs [pair0, pair0 + npairs) */
  int hkv, topk, init, local;
} score_args;

/* Key `slot` of index-cache page `page` as 128 fp32 values in registers. */
static __device__ __forceinline__ void load_key(const score_args &a, int64_t page, int slot,
                                                float *k) {
  int64_t off = (page * M3S_BLOCK_SIZE + slot) * M3S_INDEX_DIM;
  if (a.ic_dt == M3S_BF16) {
    if (a.ic_vec) {
      const uint4 *src = (const uint4 *)((const uint16_t *)a.ic + off);
#pragma unroll
      for (int v = 0; v < M3S_INDEX_DIM / 8; v++) {
        uint4 w = __ldg(src + v);
        uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int e = 0; e < 4; e++) {
          k[v * 8 + 2 * e] = __uint_as_float(u[e] << 16);
          k[v * 8 + 2 * e + 1] = __uint_as_float(u[e] & 0xffff0000u);
        }
      }
    } else {
      const uint16_t *src = (const uint16_t *)a.ic + off;
#pragma unroll
      for (int d = 0; d < M3S_INDEX_DIM; d++)
        k[d] = __uint_as_float((uint32_t)src[d] << 16);
    }
  } else { /* M3S_E4M3: exact through fp16 */
    if (a.ic_vec) {
      const uint4 *src = (const uint4 *)((const uint8_t *)a.ic + off);
#pragma unroll
      for (int v = 0; v < M3S_INDEX_DIM / 16; v++) {
        uint4 w = __ldg(src + v);
        uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int e = 0; e < 8; e++) {
          __nv_fp8x2_storage_t pair = (__nv_fp8x2_storage_t)(u[e / 2] >> (16 * (e % 2)));
          float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
          k[v * 16 + 2 * e] = f.x;
          k[v * 16 + 2 * e + 1] = f.y;
        }
      }
    } else {
      const __nv_fp8_storage_t *src = (const __nv_fp8_storage_t *)a.ic + off;
#pragma unroll
      for (int d = 0; d < M3S_INDEX_DIM; d++)
        k[d] = __half2float(__half(__nv_cvt_fp8_to_halfraw(src[d], __NV_E4M3)));
    }
  }
}

static __device__ __forceinline__ float warp_fmax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}

typedef struct {
  float q[PAIR_TILE][M3S_INDEX_DIM]; /* fp32 index queries of the tile's pairs */
  int64_t pos[PAIR_TILE];    /* position of the pair's row */
  int req[PAIR_TILE];        /* request, or -1: the pair scores nothing */
  int run_end[PAIR_TILE];    /* end of the run of equal req[] starting here */
  float red[SCORE_WARPS][PAIR_TILE];
} score_smem;

/* Phase 1 of score_kernel: which pairs score (valid row, nb > K), their
 * requests, positions and runs, and their fp32 queries. */
static __device__ void stage_tile(const m3s_cuda_batch &b, const score_args &a, int64_t tile0,
                                  int n, score_smem *s) {
  int tid = threadIdx.x;
  if (tid < PAIR_TILE) {
    int req = -1;
    int64_t pos = 0;
    if (tid < n) {
      int64_t t = (a.pair0 + tile0 + tid) / a.hkv;
      m3s_row_info ri = m3s_row_lookup(b, t);
      if (ri.valid && blocks_of(ri.pos) > a.topk) {
        req = ri.r;
        pos = ri.pos;
      }
    }
    s->req[tid] = req;
    s->pos[tid] = pos;
  }
  __syncthreads();
  if (tid < n) {
    int e = tid + 1;
    while (e < n && s->req[e] == s->req[tid])
      e++;
    s->run_end[tid] = e;
  }
  for (int e = tid; e < n * M3S_INDEX_DIM; e += SCORE_THREADS) {
    int p = e / M3S_INDEX_DIM, d = e % M3S_INDEX_DIM;
    if (s->req[p] < 0)
      continue;
    int64_t gp = a.pair0 + tile0 + p;
    int64_t t = gp / a.hkv, g = gp % a.hkv;
    s->q[p][d] = m3s_ld(a.iq, a.iq_dt, t * a.iq_s0 + g * a.iq_s1 + d);
  }
  __syncthreads();
}

/* Phase 2 of score_kernel: block blk for the pairs [p0, p1) of request r.
 * Every thread of the CTA calls it with the same arguments. */
static __device__ void score_run(const m3s_cuda_batch &b, const score_args &a, int64_t tile0,
                                 int p0, int p1, int64_t blk, score_smem *s) {
  int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  int r = s->req[p0];
  /* nb grows along the run, so the last pair needs the block if any does;
   * a context-parallel rank scores only its own blocks */
  if (!is_candidate(blk, blocks_of(s->pos[p1 - 1]), a.init, a.local) ||
      m3s_cp_owner(&b.cp, blk) != b.cp.cp_rank)
    return;
  int64_t page = m3s_cp_page(b, b.ibt, b.ibt_s0, b.ibt_s1, b.ibt_cols, r, blk, a.num_pages);
  float *S = a.ws + (tile0 + p0) * a.max_nb + blk;
  int np = p1 - p0;
  if (page < 0) {
    /* no keys: the block scores NaN for every pair that needs it */
    if (tid < np && is_candidate(blk, blocks_of(s->pos[p0 + tid]), a.init, a.local))
      S[tid * a.max_nb] = NAN;
    return;
  }
  float k[M3S_INDEX_DIM];
  load_key(a, page, tid, k);
  int64_t key_pos = blk * M3S_BLOCK_SIZE + tid;
  for (int p = p0; p < p1; p++) {
    if (!is_candidate(blk, blocks_of(s->pos[p]), a.init, a.local))
      continue; /* uniform over the CTA */
    float d = key_pos <= s->pos[p] ? m3s_dot128_fixed(s->q[p], k) : NAN;
    d = warp_fmax(d);
    if (lane == 0)
      s->red[warp][p] = d;
  }
  __syncthreads();
  if (tid < np && is_candidate(blk, blocks_of(s->pos[p0 + tid]), a.init, a.local)) {
    float m = s->red[0][p0 + tid];
#pragma unroll
    for (int w = 1; w < SCORE_WARPS; w++)
      m = fmaxf(m, s->red[w][p0 + tid]);
    S[tid * a.max_nb] = m;
  }
  __syncthreads();
}

static __global__ void __launch_bounds__(SCORE_THREADS)
    score_kernel(m3s_cuda_batch b, score_args a) {
  __shared__ __align__(16) score_smem s;
  int64_t tile0 = (int64_t)blockIdx.x * PAIR_TILE;
  if (tile0 >= a.npairs)
    return;
  int n = (int)(a.npairs - tile0 < PAIR_TILE ? a.npairs - tile0 : PAIR_TILE);
  /* Phase 1: the tile's pairs and queries */
  stage_tile(b, a, tile0, n, &s);
  /* Phase 2: blocks of this CTA, runs of one request each */
  for (int64_t blk = blockIdx.y; blk < a.max_nb; blk += gridDim.y)
    for (int p0 = 0; p0 < n; p0 = s.run_end[p0])
      if (s.req[p0] >= 0)
        score_run(b, a, tile0, p0, s.run_end[p0], blk, &s);
}

/* ---------------------------------------------------------------------------
 * Kernel 2: selection
 * ------------------------------------------------------------------------- */

typedef struct {
  const float *ws;
  int64_t max_nb;
  int32_t *out;
  int64_t o_s0, o_s1, o_s2;
  float *score;                /* candidates: their scores; NULL for the selection */
  int64_t s_s0, s_s1, s_s2;
  int64_t pair0, npairs;
  int hkv, topk, init, local;
} select_args;

/* The rank of (score, id) as one integer: larger = ranks first. Ordered
 * float bits (NaN -> 0, the lowest; -0 as +0) above the inverted id. */
static __device__ __forceinline__ unsigned long long rank_key(float s, int64_t id) {
  uint32_t u = 0;
  if (!isnan(s)) {
    uint32_t bits = __float_as_uint(s == 0.0f ? 0.0f : s);
    u = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  }
  return ((unsigned long long)u << 32) | (0xffffffffu - (uint32_t)id);
}

static __device__ __forceinline__ int32_t id_of(unsigned long long key) {
  return (int32_t)(0xffffffffu - (uint32_t)(key & 0xffffffffu));
}

/* Best key below `limit` among this thread's candidates
 * b = lo + tid, lo + tid + SEL_THREADS, ... < hi that cp's rank owns (all
 * without context parallel); 0 when none. */
static __device__ unsigned long long best_below(const float *S, int64_t lo, int64_t hi,
                                         unsigned long long limit, const m3s_cp &cp) {
  unsigned long long best = 0;
  for (int64_t bk = lo + threadIdx.x; bk < hi; bk += SEL_THREADS) {
    if (m3s_cp_owner(&cp, bk) != cp.cp_rank)
      continue;
    unsigned long long key = rank_key(S[bk], bk);
    if (key < limit && key > best)
      best = key;
  }
  return best;
}

/* CTA-wide max; every thread gets it. */
static __device__ unsigned long long cta_max_key(unsigned long long v, unsigned long long *red,
                                          unsigned long long *res) {
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    unsigned long long n = __shfl_xor_sync(FULL_MASK, v, o);
    v = n > v ? n : v;
  }
  if (lane == 0)
    red[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long m = red[0];
    for (int w = 1; w < SEL_WARPS; w++)
      m = red[w] > m ? red[w] : m;
    *res = m;
  }
  __syncthreads();
  return *res;
}

#define SEL_CACHE 4 /* keys each thread keeps between rescans */

/* The SEL_CACHE best keys below `limit` of this thread's candidates
 * b = lo + tid, lo + tid + SEL_THREADS, ... < hi, descending, 0 for none;
 * returns 1 when it left some out (a later rescan can find more). */
static __device__ int scores_below(const float *S, int64_t lo, int64_t hi,
                                   unsigned long long limit, unsigned long long (&c)[SEL_CACHE]) {
#pragma unroll
  for (int i = 0; i < SEL_CACHE; i++)
    c[i] = 0;
  int more = 0;
  for (int64_t bk = lo + threadIdx.x; bk < hi; bk += SEL_THREADS) {
    unsigned long long key = rank_key(S[bk], bk);
    if (key < limit)
      more |= m3s_keylist_insert(key, c);
  }
  return more;
}

/* The same among keys[lane + 32 i] < limit, i < n / 32 (0 keys are none). */
static __device__ int keys_below(const unsigned long long *keys, int n, unsigned long long limit,
                                 unsigned long long (&c)[SEL_CACHE]) {
#pragma unroll
  for (int i = 0; i < SEL_CACHE; i++)
    c[i] = 0;
  int more = 0;
  for (int j = threadIdx.x & 31; j < n; j += 32)
    if (keys[j] != 0 && keys[j] < limit)
      more |= m3s_keylist_insert(keys[j], c);
  return more;
}

/* One pair with nb > K: forced blocks plus the best want candidates, written
 * in ascending order. Every thread of the CTA calls it. Each warp first
 * takes the best want of its own candidates (want rounds of a warp maximum
 * over keys the lanes keep in registers, a lane rescanning its candidates
 * only after it has given all it kept), then warp 0 takes the best want of
 * those. The keys are distinct, so this is the reference selection. Before,
 * want rounds of a CTA-wide maximum (two CTA barriers each) took ~11 us for
 * one request of 128K context (ncu, H200, 2026-12-03). */
static __device__ void select_row(const select_args &a, const float *S, int64_t nb, int32_t *out) {
  __shared__ unsigned long long wkeys[SEL_WARPS * M3S_MAX_TOPK];
  __shared__ int32_t sel[M3S_MAX_TOPK];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int want = a.topk - a.init - a.local;
  /* Phase 1: forced blocks (disjoint: init + local <= K < nb) */
  if (tid < a.init)
    sel[tid] = tid;
  else if (tid < a.init + a.local)
    sel[tid] = (int32_t)(nb - a.local + (tid - a.init));
  /* Phase 2: each warp's best want of its candidates in [init, nb - local) */
  const int64_t lo = a.init, hi = nb - a.local;
  unsigned long long c[SEL_CACHE];
  int more = scores_below(S, lo, hi, ~0ull, c);
  for (int k = 0; k < want; k++) {
    const unsigned long long w = m3s_warp_max_u64(c[0]);
    if (lane == 0)
      wkeys[warp * want + k] = w;
    if (m3s_keylist_pop(w, c) && more) /* a rescan is a round trip to global memory */
      more = scores_below(S, lo, hi, w, c);
  }
  __syncthreads();
  /* Phase 3: warp 0, the best want of the warps' winners */
  if (warp == 0) {
    more = keys_below(wkeys, SEL_WARPS * want, ~0ull, c);
    for (int k = 0; k < want; k++) {
      const unsigned long long w = m3s_warp_max_u64(c[0]);
      if (lane == 0)
        sel[a.init + a.local + k] = id_of(w);
      if (m3s_keylist_pop(w, c) && more)
        more = keys_below(wkeys, SEL_WARPS * want, w, c);
    }
  }
  __syncthreads();
  /* Phase 4: ascending order by rank (ids are distinct) */
  if (tid < a.topk) {
    int32_t id = sel[tid];
    int rank = 0;
    for (int i = 0; i < a.topk; i++)
      rank += sel[i] < id;
    out[rank * a.o_s2] = id;
  }
  __syncthreads();
}

static __global__ void __launch_bounds__(SEL_THREADS)
    select_kernel(m3s_cuda_batch b, select_args a) {
  for (int64_t lp = blockIdx.x; lp < a.npairs; lp += gridDim.x) {
    int64_t gp = a.pair0 + lp, t = gp / a.hkv, g = gp % a.hkv;
    int32_t *out = a.out + t * a.o_s0 + g * a.o_s1;
    m3s_row_info ri = m3s_row_lookup(b, t);
    int64_t nb = ri.valid ? blocks_of(ri.pos) : 0;
    if (nb <= a.topk) {
      /* every visible block (none for padded or invalid rows), then -1 */
      for (int k = threadIdx.x; k < a.topk; k += SEL_THREADS)
        out[k * a.o_s2] = k < nb ? k : -1;
      continue;
    }
    select_row(a, a.ws + lp * a.max_nb, nb, out);
  }
}

/* A candidate's score as every backend writes it: NaN as the quiet NaN
 * 0x7fc00000, -0 as +0 (the block maxima may differ there, not the rank). */
static __device__ __forceinline__ float canonical(float s) {
  return isnan(s) ? __int_as_float(0x7fc00000) : __fadd_rn(s, 0.0f);
}

/* Writes the owned blocks of [lo, hi) at entries n, n + 1, ... with score
 * +inf; returns the next entry. */
static __device__ int emit_owned(const m3s_cuda_batch &b, const select_args &a, int64_t lo,
                                 int64_t hi, int n, int32_t *ids, float *sc) {
  for (int64_t bk = lo; bk < hi; bk++)
    if (m3s_cp_owner(&b.cp, bk) == b.cp.cp_rank) {
      ids[n * a.o_s2] = (int32_t)bk;
      sc[n++ * a.s_s2] = INFINITY;
    }
  return n;
}

/* Context parallel: the candidates of the batch's rank for one pair (nb
 * visible blocks, nb >= 1): the owned blocks selected whatever the scores
 * (score +inf), then when nb > K the best want owned non-forced blocks,
 * best first, with their scores, then -1 / -inf. Every thread of the CTA
 * calls it. */
static __device__ void candidate_row(const m3s_cuda_batch &b, const select_args &a,
                                     const float *S, int64_t nb, int32_t *ids, float *sc) {
  __shared__ unsigned long long red[SEL_WARPS], res;
  __shared__ int fixed;
  int tid = threadIdx.x;
  if (tid == 0) {
    /* every block when nb <= K, else the init blocks then the local ones
     * (disjoint: init + local <= K < nb) */
    int n = 0;
    n = emit_owned(b, a, 0, nb <= a.topk ? nb : a.init, n, ids, sc);
    n = emit_owned(b, a, nb <= a.topk ? nb : nb - a.local, nb, n, ids, sc);
    fixed = n;
  }
  __syncthreads();
  int n = fixed;
  if (nb > a.topk) {
    int64_t lo = a.init, hi = nb - a.local;
    unsigned long long mine = best_below(S, lo, hi, ~0ull, b.cp);
    for (int want = a.topk - a.init - a.local; want > 0; want--) {
      unsigned long long w = cta_max_key(mine, red, &res);
      if (w == 0)
        break; /* the rank owns no more candidates (uniform over the CTA) */
      if (tid == 0) {
        ids[n * a.o_s2] = id_of(w);
        sc[n * a.s_s2] = canonical(S[id_of(w)]);
      }
      n++;
      if (mine == w)
        mine = best_below(S, lo, hi, w, b.cp);
    }
  }
  for (int k = n + tid; k < a.topk; k += SEL_THREADS) {
    ids[k * a.o_s2] = -1;
    sc[k * a.s_s2] = -INFINITY;
  }
  __syncthreads();
}

static __global__ void __launch_bounds__(SEL_THREADS)
    candidate_kernel(m3s_cuda_batch b, select_args a) {
  for (int64_t lp = blockIdx.x; lp < a.npairs; lp += gridDim.x) {
    int64_t gp = a.pair0 + lp, t = gp / a.hkv, g = gp % a.hkv;
    int32_t *ids = a.out + t * a.o_s0 + g * a.o_s1;
    float *sc = a.score + t * a.s_s0 + g * a.s_s1;
    m3s_row_info ri = m3s_row_lookup(b, t);
    if (!ri.valid) {
      for (int k = threadIdx.x; k < a.topk; k += SEL_THREADS) {
        ids[k * a.o_s2] = -1;
        sc[k * a.s_s2] = -INFINITY;
      }
      continue;
    }
    candidate_row(b, a, a.ws ? a.ws + lp * a.max_nb : NULL, blocks_of(ri.pos), ids, sc);
  }
}

/* ---------------------------------------------------------------------------
 * Context parallel: merge of the ranks' candidates
 * ------------------------------------------------------------------------- */

typedef struct {
  const int32_t *ids;
  int64_t i_s0, i_s1, i_s2, i_s3;
  const float *sc;
  int64_t c_s0, c_s1, c_s2, c_s3;
  int64_t ranks;
  int32_t *out;
  int64_t o_s0, o_s1, o_s2;
  int64_t npairs;
  int hkv, topk, init, local;
} merge_cand_args;

/* Best key below `limit` among this thread's entries e = tid, tid +
 * SEL_THREADS, ... < ranks * K of pair (t, g): non-forced ids in [0, nb)
 * owned by the rank that sent them (others are skipped: device data is not
 * validated); 0 when none. */
static __device__ unsigned long long cand_best_below(const m3s_cuda_batch &b,
                                                     const merge_cand_args &a, int64_t t, int g,
                                                     int64_t nb, unsigned long long limit) {
  unsigned long long best = 0;
  for (int64_t e = threadIdx.x; e < a.ranks * a.topk; e += SEL_THREADS) {
    int64_t n = e / a.topk, k = e % a.topk;
    int32_t id = a.ids[n * a.i_s0 + t * a.i_s1 + g * a.i_s2 + k * a.i_s3];
    if (id < 0 || id >= nb || !is_candidate(id, nb, a.init, a.local) ||
        m3s_cp_owner(&b.cp, id) != n)
      continue;
    unsigned long long key = rank_key(a.sc[n * a.c_s0 + t * a.c_s1 + g * a.c_s2 + k * a.c_s3], id);
    if (key < limit && key > best)
      best = key;
  }
  return best;
}

/* One pair with nb > K: forced blocks plus want rounds of argmax over every
 * rank's candidates, written as select_row writes (a round that finds none,
 * possible only for candidates that break the contract, gives -1, placed
 * after the ids). Every thread of the CTA calls it. */
static __device__ void merge_cand_row(const m3s_cuda_batch &b, const merge_cand_args &a,
                                      int64_t t, int g, int64_t nb, int32_t *out) {
  __shared__ unsigned long long red[SEL_WARPS], res;
  __shared__ int32_t sel[M3S_MAX_TOPK];
  int tid = threadIdx.x, want = a.topk - a.init - a.local;
  if (tid < a.init)
    sel[tid] = tid;
  else if (tid < a.init + a.local)
    sel[tid] = (int32_t)(nb - a.local + (tid - a.init));
  unsigned long long mine = cand_best_below(b, a, t, g, nb, ~0ull);
  for (int k = 0; k < want; k++) {
    unsigned long long w = cta_max_key(mine, red, &res);
    if (tid == 0)
      sel[a.init + a.local + k] = w ? id_of(w) : -1;
    if (w && mine == w)
      mine = cand_best_below(b, a, t, g, nb, w);
  }
  __syncthreads();
  if (tid < a.topk) {
    int32_t id = sel[tid];
    int slot = 0;
    if (id >= 0) {
      /* a repeated id (possible only for candidates that break the
       * contract) still gets a slot of its own */
      for (int i = 0; i < a.topk; i++)
        slot += sel[i] >= 0 && (sel[i] < id || (sel[i] == id && i < tid));
    } else {
      for (int i = 0; i < a.topk; i++)
        slot += sel[i] >= 0 || (sel[i] < 0 && i < tid);
    }
    out[slot * a.o_s2] = id;
  }
  __syncthreads();
}

static __global__ void __launch_bounds__(SEL_THREADS)
    merge_cand_kernel(m3s_cuda_batch b, merge_cand_args a) {
  for (int64_t p = blockIdx.x; p < a.npairs; p += gridDim.x) {
    int64_t t = p / a.hkv;
    int g = (int)(p % a.hkv);
    int32_t *out = a.out + t * a.o_s0 + g * a.o_s1;
    m3s_row_info ri = m3s_row_lookup(b, t);
    int64_t nb = ri.valid ? blocks_of(ri.pos) : 0;
    if (nb <= a.topk) {
      for (int k = threadIdx.x; k < a.topk; k += SEL_THREADS)
        out[k * a.o_s2] = k < nb ? k : -1;
      continue;
    }
    merge_cand_row(b, a, t, g, nb, out);
  }
}

/* ---------------------------------------------------------------------------
 * Host entry
 * ------------------------------------------------------------------------- */

static unsigned cap_u(int64_t n, int64_t cap) { return (unsigned)(n < cap ? n : cap); }

/* Height gy of the score grid: CTA (x, y) scores blocks y, y + gy, ... of
 * tile x. Measured on an H100 (docs/perf-notes.md, 2026-11-27): the kernel
 * is latency-bound at 3 CTAs per SM.
 *  - Uniform decode batches (uniform_q_len <= 128, so the rows of one request
 *    span at most two blocks): every tile needs about every block, so the time
 *    follows waves x (blocks per CTA + 1), waves counted over the slots (CTAs
 *    resident per SM x SMs) and the 1 standing for the CTA's staging of its
 *    queries; gy minimises that, and among equal costs takes the fewest CTAs.
 *    u blocks per CTA means gy = ceil(max_nb / u); past u = best cost nothing
 *    can match it. 1-21% faster than the rule below at 32-128 requests of
 *    equal context (unmeasured: very unequal contexts in one batch).
 *  - Otherwise (prefill, mixed, ragged): causal rows make late tiles need
 *    many more blocks than early ones, and many short CTAs balance that
 *    better: gy = max(16, 8 x SMs / tiles) (the cost model was 21-40% slower
 *    on 4096-token prefill chunks). */
static int64_t score_grid_y(int64_t tiles, int64_t max_nb, int64_t sms, int64_t per_sm,
                            int uniform) {
  int64_t gy = (8 * sms + tiles - 1) / tiles;
  gy = gy < 16 ? 16 : gy;
  gy = gy < max_nb ? gy : max_nb;
  if (!uniform)
    return gy < GRID_Y_MAX ? gy : GRID_Y_MAX;
  int64_t slots = sms * per_sm, best_cost = INT64_MAX;
  int64_t best_gy = gy < GRID_Y_MAX ? gy : GRID_Y_MAX;
  for (int64_t u = 1; u <= max_nb && u <= best_cost; u++) {
    int64_t g = (max_nb + u - 1) / u;
    if (g > GRID_Y_MAX)
      continue;
    int64_t cost = (tiles * g + slots - 1) / slots * ((max_nb + g - 1) / g + 1);
    if (cost <= best_cost) {
      best_cost = cost;
      best_gy = g;
    }
  }
  return best_gy;
}

/* The exact path (score_kernel, then select_kernel or, for the candidates
 * of a context-parallel rank, candidate_kernel), chunk by chunk. cand_scores
 * NULL: the selection into out; otherwise the candidates into out and
 * cand_scores. */
static m3s_status exact_topk(const char *fn, m3s_context *ctx, const m3s_layer_config *cfg,
                             const m3s_batch *batch, const m3s_tensor *iq,
                             const m3s_tensor *index_cache, m3s_tensor *out,
                             m3s_tensor *cand_scores, const m3s_exec *exec) {
  topk_plan plan = plan_of(cfg, batch->num_tokens, batch->max_seq_len);
  if (plan.pairs == 0)
    return M3S_OK;
  size_t need = plan_bytes(&plan);
  if (need && (!exec || !exec->workspace || exec->workspace_bytes < need))
    return m3s_fail(M3S_ERR_WORKSPACE, fn, "the CUDA top-k needs %zu bytes of workspace", need);
  cudaStream_t stream = m3s_cuda_stream(exec);
  m3s_cuda_batch cb = m3s_cuda_batch_of(batch);

  score_args sa;
  sa.iq = iq->data;
  sa.iq_dt = iq->dtype;
  sa.iq_s0 = iq->stride[0];
  sa.iq_s1 = iq->stride[1];
  sa.ic = index_cache->data;
  sa.ic_dt = index_cache->dtype;
  sa.ic_vec = ((uintptr_t)index_cache->data & 15) == 0;
  sa.num_pages = index_cache->shape[0];
  sa.ws = need ? (float *)exec->workspace : NULL;
  sa.max_nb = plan.max_nb;
  sa.hkv = cfg->num_kv_heads;
  sa.topk = cfg->topk;
  sa.init = cfg->init_blocks;
  sa.local = cfg->local_blocks;

  select_args se;
  se.ws = sa.ws;
  se.max_nb = plan.max_nb;
  se.out = (int32_t *)out->data;
  se.o_s0 = out->stride[0];
  se.o_s1 = out->stride[1];
  se.o_s2 = out->stride[2];
  se.score = cand_scores ? (float *)cand_scores->data : NULL;
  se.s_s0 = cand_scores ? cand_scores->stride[0] : 0;
  se.s_s1 = cand_scores ? cand_scores->stride[1] : 0;
  se.s_s2 = cand_scores ? cand_scores->stride[2] : 0;
  se.hkv = sa.hkv;
  se.topk = sa.topk;
  se.init = sa.init;
  se.local = sa.local;

  int64_t sms = m3s_cuda_num_sms(ctx);
  int per_sm = 1, uniform = batch->uniform_q_len > 0 && batch->uniform_q_len <= M3S_BLOCK_SIZE;
  if (plan.score && uniform) {
    cudaError_t err =
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, score_kernel, SCORE_THREADS, 0);
    if (err != cudaSuccess)
      return m3s_fail(M3S_ERR_CUDA, fn, "cudaOccupancyMaxActiveBlocksPerMultiprocessor: %s",
                      cudaGetErrorString(err));
    per_sm = per_sm > 0 ? per_sm : 1; /* current device == the context's (checked) */
  }
  int streamed = 0; /* scores written by the decode kernel (topk_decode.cu) */
  if (plan.score && plan.chunk_pairs >= plan.pairs && !cand_scores) {
    m3s_status st = m3s_cuda_topk_decode_scores(ctx, cfg, batch, iq, index_cache, sa.ws,
                                                plan.max_nb, stream, &streamed);
    if (st)
      return st;
  }
  for (int64_t pair0 = 0; pair0 < plan.pairs; pair0 += plan.chunk_pairs) {
    int64_t n = plan.pairs - pair0 < plan.chunk_pairs ? plan.pairs - pair0 : plan.chunk_pairs;
    sa.pair0 = se.pair0 = pair0;
    sa.npairs = se.npairs = n;
    if (plan.score && !streamed) {
      /* Phase 1: block scores of the chunk */
      int64_t tiles = (n + PAIR_TILE - 1) / PAIR_TILE;
      if (tiles > INT32_MAX)
        return m3s_fail(M3S_ERR_UNSUPPORTED, fn, "%lld pair tiles exceed the grid limit",
                        (long long)tiles);
      int64_t gy = score_grid_y(tiles, plan.max_nb, sms, per_sm, uniform);
      dim3 grid((unsigned)tiles, (unsigned)gy);
      score_kernel<<<grid, SCORE_THREADS, 0, stream>>>(cb, sa);
      m3s_status st = m3s_cuda_check_launch(fn, "score_kernel");
      if (st)
        return st;
    }
    /* Phase 2: selection (or candidates) and output rows */
    if (cand_scores)
      candidate_kernel<<<cap_u(n, INT32_MAX), SEL_THREADS, 0, stream>>>(cb, se);
    else
      select_kernel<<<cap_u(n, INT32_MAX), SEL_THREADS, 0, stream>>>(cb, se);
    m3s_status st =
        m3s_cuda_check_launch(fn, cand_scores ? "candidate_kernel" : "select_kernel");
    if (st)
      return st;
  }
  return M3S_OK;
}

extern "C" m3s_status m3s_cuda_index_topk(m3s_context *ctx, const m3s_layer_config *cfg,
                                          const m3s_batch *batch, const m3s_tensor *iq,
                                          const m3s_tensor *index_cache, m3s_tensor *topk,
                                          const m3s_exec *exec) {
  /* prefill / ragged batches: certified re-scoring on tensor cores */
  if (batch->num_tokens > 0 && m3s_topk_tc_eligible(ctx, cfg, batch, iq, index_cache))
    return m3s_topk_tc_run(ctx, cfg, batch, iq, index_cache, topk, exec);
  return exact_topk("m3s_index_topk", ctx, cfg, batch, iq, index_cache, topk, NULL, exec);
}

/* Context parallel: the reference scores come from score_kernel (the CPU's
 * order, bit for bit); the certified tensor-core path and the streaming
 * decode kernel are not used, since they do not produce the scores of every
 * candidate they rank. */
extern "C" m3s_status m3s_cuda_index_topk_candidates(m3s_context *ctx,
                                                     const m3s_layer_config *cfg,
                                                     const m3s_batch *batch, const m3s_tensor *iq,
                                                     const m3s_tensor *index_cache,
                                                     m3s_tensor *cand_ids, m3s_tensor *cand_scores,
                                                     const m3s_exec *exec) {
  return exact_topk("m3s_index_topk_candidates", ctx, cfg, batch, iq, index_cache, cand_ids,
                    cand_scores, exec);
}

extern "C" m3s_status m3s_cuda_merge_topk_candidates(m3s_context *ctx,
                                                     const m3s_layer_config *cfg,
                                                     const m3s_batch *batch,
                                                     const m3s_tensor *cand_ids,
                                                     const m3s_tensor *cand_scores,
                                                     m3s_tensor *topk, const m3s_exec *exec) {
  (void)ctx;
  merge_cand_args a;
  a.ids = (const int32_t *)cand_ids->data;
  a.i_s0 = cand_ids->stride[0];
  a.i_s1 = cand_ids->stride[1];
  a.i_s2 = cand_ids->stride[2];
  a.i_s3 = cand_ids->stride[3];
  a.sc = (const float *)cand_scores->data;
  a.c_s0 = cand_scores->stride[0];
  a.c_s1 = cand_scores->stride[1];
  a.c_s2 = cand_scores->stride[2];
  a.c_s3 = cand_scores->stride[3];
  a.ranks = cand_ids->shape[0];
  a.out = (int32_t *)topk->data;
  a.o_s0 = topk->stride[0];
  a.o_s1 = topk->stride[1];
  a.o_s2 = topk->stride[2];
  a.npairs = (int64_t)batch->num_tokens * cfg->num_kv_heads;
  a.hkv = cfg->num_kv_heads;
  a.topk = cfg->topk;
  a.init = cfg->init_blocks;
  a.local = cfg->local_blocks;
  if (a.npairs == 0)
    return M3S_OK;
  merge_cand_kernel<<<cap_u(a.npairs, INT32_MAX), SEL_THREADS, 0, m3s_cuda_stream(exec)>>>(
      m3s_cuda_batch_of(batch), a);
  return m3s_cuda_check_launch("m3s_merge_topk_candidates", "merge_cand_kernel");
}
