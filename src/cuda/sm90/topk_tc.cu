/* CUDA backend: lightning-indexer top-k by certified re-scoring (SPEC
 * section 3, "reference scores and exact selection"). The selection equals the
 * CPU backend's (src/cpu/topk.c) bit for bit; only the way to get there
 * differs from the exact CUDA-core path of src/cuda/topk.cu.
 *
 * Per chunk of rows [row0, row0 + nrows) two launches on exec->stream:
 *  1. tc_score_kernel<E4M3>  grid (ceil(nrows / 128), Hkv, gy), 256
 *     threads, TC_SMEM_BYTES dynamic shared memory. A CTA owns 128
 *     consecutive rows (tile x counted from the end, so the causal-heavy
 *     tiles start first) and one index head g; for each run of rows of one
 *     request that needs scores (valid row, nb > K, the request has >=
 *     TC_MIN_ROWS query rows) it walks the candidate blocks b = init + z,
 *     init + z + gy, ... below the run's last nb - local. The 128 index keys
 *     of a block come from the paged index cache through the index block
 *     table with cp.async into shared memory, double-buffered; e4m3 keys are
 *     widened to bf16 on chip (exact). Warp w multiplies its 16 query rows
 *     (bf16 A fragments held in registers for the whole kernel) by the 128
 *     keys with mma.sync.m16n8k16 (key rows padded to 272 bytes: ldmatrix is
 *     conflict-free). bf16 -> fp32; keys after pos(t) are masked and the
 *     row's block max is S~. The block's largest key norm (fp32, rounded up)
 *     and the row's query norm give the bound E of docs/perf-notes.md
 *     ("Certified re-scoring: the bound"); (S~, E) goes to the workspace. A
 *     page id outside [0, P) gives (NaN, inf).
 *     On sm_90 (bf16 or e4m3 index cache), tc_norm_kernel first writes
 *     each candidate block's largest key norm to a table, then
 *     tc_score_ws_kernel does the same work with TMA and wgmma in a
 *     warp-specialised pipeline (its own comment below); the hook mma_sync
 *     forces this kernel there, as does a workspace without room for the
 *     table.
 *  2. tc_select_kernel  a warp per (row, head) pair, 4 warps per CTA: forced
 *     blocks, then the certified selection of select_pair (the proof is
 *     there): intervals [S~ - E, S~ + E], blocks surely in, surely out, and
 *     the uncertain ones re-scored with the reference dot order
 *     (m3s_dot128_fixed, streamed; the CTA's warps share its pairs'
 *     re-scores, a quarter block each), then the tie rule on reference
 *     scores.
 *     Calls of no more pairs than SMs, and decode batches of at most two
 *     pairs per SM or of >= 512 candidates per pair at up to four, take
 *     tc_select_wide_kernel instead: a CTA of 8 warps per pair, the same
 *     proof (its comment below).
 *     Rows of requests with fewer than TC_MIN_ROWS query rows (decode rows in
 *     a ragged batch) have every candidate scored that way instead.
 *     Prefill chunks whose pairs have at most 512 candidates (contexts up to
 *     64K) run it in two launches instead: tc_select_reg_kernel<R> keeps a
 *     pair's entries in registers, takes the thresholds from a filter
 *     where a lane holds 4 or more slots (tc_filter_ranks: the values at or
 *     above the need-th largest of the lanes' maxima, sorted once), else
 *     from one bitonic sort (up to 128 candidates) or tc_ranked_pair (more),
 *     and decides every pair with no uncertain block (in chunks of more
 *     than 32 candidates per pair by one compaction of those not surely
 *     out, tc_reg_few, where it applies; at least ~88% of a random 8K
 *     prompt's pairs: 2946 blocks re-scored over 24576 scored pairs in
 *     test_gpu_topk_certified);
 *     tc_select_deferred_kernel takes the rest, listed in the
 *     workspace: the same register path with the exact re-scores (a CTA's
 *     warps sharing its pairs' re-scores), or the per-pair code above (more
 *     than 32 uncertain blocks, short requests).
 * Grids and workspace come from host bounds only (num_tokens, max_seq_len,
 * Hkv, K, the SM count): graph-safe; no allocation, no synchronisation (the
 * deferred-pair count is zeroed by the chunk's score kernel, which ends
 * before the selection starts).
 *
 * Workspace: float2 (S~, E) [chunk_rows * Hkv][max_nb], entry
 * ((t - row0) * Hkv + g) * max_nb + b; chunk_rows = the most rows whose
 * entries fit TC_WS_BUDGET (a multiple of 128 when >= 128); then the
 * deferred-pair list (int32 count + chunk_rows * Hkv indices). The selection
 * overwrites the entries it re-scores with (S, -1) when more than 32 of a
 * pair's blocks are uncertain (else their scores stay in registers).
 *
 * Eligible calls (m3s_topk_tc_eligible): query-start-loc batches (prefill,
 * ragged, max_q_len >= TC_MIN_ROWS), bf16 index queries, bf16 or e4m3 index
 * cache 16-byte aligned, max_nb > K, a chunk that fits the budget; and
 * uniform decode batches that ../topk_decode.cu's certified streaming kernel
 * covers (q_len <= 8, q_len x Hkv <= 16, every row in one chunk) in a batch
 * tc_decode_pays accepts: that kernel writes
 * (S~, E) in place of phase 1, then the same selection runs with
 * all_scored = 1.
 *
 * Registers / spills (ptxas, sm_90a): the mma.sync score kernel 128
 * registers, tc_score_ws_kernel<false> and <true> 168 at launch (56 / 224
 * by setmaxnreg), no spills; tc_select_kernel 128 with 84 bytes of spill stores,
 * tc_select_wide_kernel<1> 151 and <2> 126, no spills. Measured (H200, fresh 64K prompt,
 * docs/perf-notes.md): scores ~9.5 ms with mma.sync, ~6.4 ms with TMA +
 * wgmma (b10fcd5, before the norm pre-pass); the selection 1.78 ms over the
 * 8 chunks (ncu, 369d402, the selection code of 5ef0622); the whole top-k
 * 7.70 ms at 5ef0622 against vLLM's 6.77 (peer run; 4.80 ms against 6.76 at
 * f34ec66). The register selection
 * (2026-12-04): selection of the 8K prompt 142 -> 29 + 56 us, top-k 298 ->
 * 250 us (m3s-bench). The score tile's prologue with 16-byte query loads and
 * the runs from ballots, the per-block loads ahead of the matrix work and the
 * m64n64 halves (2026-12-04): score kernel of the 8K prompt 158 -> 98 us,
 * top-k 4K / 8K / 16K / 64K 116 / 249 / 730 / 7521 -> 78 / 194 / 607 /
 * 6552 us, 4K behind 60K 973 -> 769 us (m3s-bench). The warp-specialised
 * score kernel (2026-12-06, H100): top-k 8K / 16K / 64K 160.6 / 529.4 /
 * 6327 -> 148.8 / 415.3 / 5289 us, 4K behind 60K 749 -> 602 us. The
 * filter ranking (2026-12-06, H100): top-k 16K 392.9 -> 368.4 us, 32K / 64K
 * / 4K behind 60K -2%, 8K unchanged. The decision by one compaction
 * (tc_reg_few, 2026-12-06, H100): top-k 32K 1278 -> 1238 us, 64K 4986 ->
 * 4859 us, ragged 8 x 2K 628 -> 605 us; 8K, 16K and 4K behind 60K within
 * 1%. tc_score_ws_kernel's lean epilogue (2026-12-07, H100): top-k 8K /
 * 16K / 32K / 64K -8 / -11 / -14 / -15%, 4K behind 60K -16%, ragged 8 x 2K
 * -13%. */
#include "../common.cuh"
#include "../launch.h"
#include "../mma.cuh"
#include "topk_tc.cuh"
#include "topk_tc.h"
#include "topk_select.cuh"
#include "tma.cuh"
#include "wgmma.cuh"
#include "../topk_decode.cuh"

#include <cuda.h> /* CUtensorMap (types only: the encoder comes from the runtime) */
#include <cudaTypedefs.h>

#include <limits.h>
#include <stdint.h>
#include <string.h>

#define TC_ROWS 128    /* query rows per score CTA */
#define TC_THREADS 256 /* 8 warps x 16 rows */
#define TC_PAD 136     /* bf16 elements per shared row (272 bytes) */
#define TC_TILE_BYTES (TC_ROWS * TC_PAD * 2)
#define TC_SMEM_BYTES (3 * TC_TILE_BYTES) /* query tile + two key buffers */
#define TC_SEL_CTAS_PER_SM 4 /* resident per-pair selection CTAs per SM (launch bounds: 128 registers) */
#define TC_REG_CTAS_PER_SM 8 /* the same for tc_select_reg_kernel (64 registers) */
/* tc_select_reg_kernel<R>'s resident CTAs per SM: R >= 8 (256 or 512
 * candidates, 2R + R + R registers of entries, keys and classes) at 128
 * registers */
#define TC_REG_CTAS(R) ((R) >= 8 ? TC_SEL_CTAS_PER_SM : TC_REG_CTAS_PER_SM)
/* Decode batches with fewer (token, KV head) pairs than this keep the exact
 * streaming kernel: below it the fixed-order scores of a few pairs cost less
 * than the certified kernel's score + selection chain (m3s-bench, H200,
 * docs/perf-notes.md "Small decode batches: measured"). Long contexts cross
 * over earlier, and since the CTA-wide selection (tc_select_wide_kernel)
 * requests of TC_DEC_REQ_PAIRS pairs or more (Hkv x q_len) from one request
 * (session 12: one TP1 request at 32K and 128K); requests of one pair still
 * lose at 4 of them (TP8, 128K: 50.1 -> 53.5 us). */
#define TC_DEC_MIN_PAIRS 32
#define TC_DEC_MIN_PAIRS_LONG 16
#define TC_DEC_LONG_CTX 65536
#define TC_DEC_REQ_PAIRS 4
/* (S~, E) entries per chunk: 512 MiB holds a 64K prompt's at TP1 in two
 * chunks (128 MiB: eight; H200, f34ec66: 64K top-k 4773 -> 4582 us, 32K 1233
 * -> 1175, ~33 us per chunk the chain of score, register and deferred
 * kernels costs); vLLM's own fp32 score tensor for that call is 512 MiB */
#define TC_WS_BUDGET ((int64_t)512 << 20)
#define TC_NORM_BUDGET ((int64_t)64 << 20) /* key norms of the TMA kernel, beyond: mma.sync */
#define TC_NORM_WARPS (M3S_BLOCK_SIZE / 32)             /* warps per block in tc_norm_kernel */
#define TC_NORM_BLOCKS (TC_THREADS / 32 / TC_NORM_WARPS) /* blocks per tc_norm_kernel CTA */



/* ---------------------------------------------------------------------------
 * Host planning
 * ------------------------------------------------------------------------- */

typedef struct {
  int64_t rows, max_nb, chunk_rows;
  int ok;
} tc_plan;

static tc_plan tc_plan_of(const m3s_layer_config *cfg, int64_t tokens, int64_t max_seq_len) {
  tc_plan p;
  p.rows = tokens > 0 ? tokens : 0;
  p.max_nb = max_seq_len > 0 ? (max_seq_len + M3S_BLOCK_SIZE - 1) / M3S_BLOCK_SIZE : 0;
  p.chunk_rows = 0;
  p.ok = p.rows > 0 && p.max_nb > cfg->topk;
  if (p.ok) {
    int64_t c = TC_WS_BUDGET / (p.max_nb * cfg->num_kv_heads * (int64_t)sizeof(float2));
    if (c >= TC_ROWS)
      c -= c % TC_ROWS;
    p.chunk_rows = c < p.rows ? c : p.rows;
    p.ok = p.chunk_rows >= 1;
  }
  return p;
}

/* The deferred-pair list of tc_select_reg_kernel: a count, then up to one
 * pair index per (row, head) of a chunk. */
static size_t tc_list_bytes(int64_t chunk_rows, int hkv) {
  size_t n = ((size_t)chunk_rows * (size_t)hkv + 1) * sizeof(int32_t);
  return (n + 255) & ~(size_t)255;
}

/* The (S~, E) entries of a chunk, then its deferred-pair list. */
static size_t tc_plan_bytes(const tc_plan *p, int hkv) {
  size_t n = (size_t)p->chunk_rows * (size_t)hkv * (size_t)p->max_nb * sizeof(float2);
  return ((n + 255) & ~(size_t)255) + tc_list_bytes(p->chunk_rows, hkv);
}

/* The key-norm table of tc_norm_kernel: a slot of max_nb floats per request
 * with >= TC_MIN_ROWS query rows, at slot = (its first row) / TC_MIN_ROWS
 * (such requests start at least TC_MIN_ROWS rows apart, so slots are
 * distinct): ceil(rows / TC_MIN_ROWS) x max_nb. */
static size_t tc_norm_bytes(const tc_plan *p) {
  size_t n = (size_t)((p->rows + TC_MIN_ROWS - 1) / TC_MIN_ROWS) * (size_t)p->max_nb * sizeof(float);
  return (n + 255) & ~(size_t)255;
}

/* min(all entries, budget), a deferred-pair list for every (row, head) of
 * max_tokens (a call's chunk may hold more rows than the bounds' own chunk:
 * a shorter max_seq_len gives longer chunks), plus the norm table when it
 * fits its budget: an upper bound of what a call with these bounds uses,
 * never decreasing when the bounds grow (a call given less than its norm
 * table falls back to the mma.sync score kernel). */
extern "C" size_t m3s_topk_tc_workspace(const m3s_layer_config *cfg, int64_t max_tokens,
                                        int64_t max_seq_len) {
  tc_plan p = tc_plan_of(cfg, max_tokens, max_seq_len);
  if (!p.ok)
    return 0;
  size_t all = (size_t)p.rows * (size_t)cfg->num_kv_heads * (size_t)p.max_nb * sizeof(float2);
  size_t n = all < (size_t)TC_WS_BUDGET ? all : (size_t)TC_WS_BUDGET;
  size_t norms = tc_norm_bytes(&p);
  return ((n + 255) & ~(size_t)255) + tc_list_bytes(p.rows, cfg->num_kv_heads) +
         (norms < (size_t)TC_NORM_BUDGET ? norms : (size_t)TC_NORM_BUDGET);
}

static int tc_decode_pays(const m3s_layer_config *cfg, const m3s_batch *batch) {
  const int64_t pairs = (int64_t)batch->num_reqs * cfg->num_kv_heads * batch->uniform_q_len;
  return cfg->num_kv_heads * batch->uniform_q_len >= TC_DEC_REQ_PAIRS ||
         pairs >= (batch->max_seq_len >= TC_DEC_LONG_CTX ? TC_DEC_MIN_PAIRS_LONG : TC_DEC_MIN_PAIRS);
}

extern "C" int m3s_topk_tc_eligible(const m3s_context *ctx, const m3s_layer_config *cfg,
                                    const m3s_batch *batch, const m3s_tensor *iq,
                                    const m3s_tensor *index_cache) {
  const m3s_topk_tc_hooks hooks = m3s_cuda_topk_hooks(ctx);
  if (hooks.exact_only)
    return 0;
  if (batch->uniform_q_len > 0) {
    /* decode: the streaming certified kernel, every row in one chunk; the
     * batches the exact streaming kernel does faster stay there */
    if (!hooks.decode_any && !tc_decode_pays(cfg, batch))
      return 0;
    tc_plan p = tc_plan_of(cfg, batch->num_tokens, batch->max_seq_len);
    return p.ok && p.chunk_rows >= p.rows &&
           m3s_cuda_topk_decode_tc_covers(cfg, batch, iq, index_cache);
  }
  if (batch->max_q_len < TC_MIN_ROWS)
    return 0;
  if (iq->dtype != M3S_BF16 || (index_cache->dtype != M3S_BF16 && index_cache->dtype != M3S_E4M3))
    return 0;
  if (((uintptr_t)index_cache->data & 15) != 0)
    return 0;
  tc_plan p = tc_plan_of(cfg, batch->num_tokens, batch->max_seq_len);
  return p.ok;
}


/* ---------------------------------------------------------------------------
 * Device helpers of the score kernels (the shared ones in topk_select.cuh)
 * ------------------------------------------------------------------------- */

static __device__ __forceinline__ int tc_is_candidate(int64_t b, int64_t nb, int init, int local) {
  return b >= init && b < nb - local;
}

static __device__ __forceinline__ void tc_ldmatrix_x4(uint32_t addr, uint32_t &r0, uint32_t &r1,
                                                      uint32_t &r2, uint32_t &r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

/* ---------------------------------------------------------------------------
 * Kernel 1: approximate block scores S~ and bounds E on tensor cores
 * ------------------------------------------------------------------------- */

typedef struct {
  const uint16_t *iq;
  int64_t iq_s0, iq_s1;
  const void *ic;
  int64_t num_pages;
  float2 *ws;
  int64_t max_nb;
  int64_t row0, nrows; /* this chunk's rows */
  int hkv, topk, init, local;
  /* tc_score_ws_kernel: the largest key norm of block b of request r at
   * norms[slot(r) * max_nb + b] (tc_norm_kernel); NULL for tc_score_kernel */
  float *norms;
  int gz; /* tc_score_ws_kernel: an item's candidate-block stride (the others: gridDim.z) */
  /* the chunk's deferred-pair count (tc_select_args.list), zeroed here for
   * the selection that follows: one memset node less per chunk */
  int32_t *count;
  /* the test hook's chunk counters (m3s_topk_tc_stats.chunks, .ws_chunks),
   * or NULL */
  unsigned int *chunks, *ws_chunks;
  /* tc_norm_kernel: the first chunk's tc_score_ws_kernel follows under PDL
   * (its producer waits before the first norm it reads; its other roles'
   * set-up and first item overlap the norm pass) */
  int pdl;
} tc_score_args;

/* The deferred-pair count zeroed by the grid's first thread (the score
 * kernels are launched plainly, after the previous chunk's selection); the
 * chunk counted when the test hook asks. */
__device__ __forceinline__ void tc_zero_count(const tc_score_args &a) {
  if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0) {
    *a.count = 0;
    if (a.chunks)
      atomicAdd(a.chunks, 1u);
    if (a.ws_chunks)
      atomicAdd(a.ws_chunks, 1u);
  }
}

typedef struct {
  int64_t pos[TC_ROWS];
  int req[TC_ROWS]; /* request, or -1: the row needs no scores */
  int run_end[TC_ROWS];
  uint32_t starts[TC_ROWS / 32]; /* rows that start a run, one bit each */
  float qn[TC_ROWS];             /* query norms (upper bounds; inf for non-finite) */
  float wnk[2][TC_THREADS / 32]; /* per warp: largest key norm of its 16 keys */
} tc_score_smem;

/* Issues the cp.async copies of block page `page` into `dst`: raw e4m3
 * [128][128]; bf16 rows padded to TC_PAD elements. */
template <bool E4M3>
__device__ __forceinline__ void tc_issue_block(const tc_score_args &a, int64_t page, void *dst) {
  if (E4M3) {
    const uint8_t *src = (const uint8_t *)a.ic + page * M3S_BLOCK_SIZE * M3S_INDEX_DIM;
    uint8_t *d = (uint8_t *)dst;
    for (int c = threadIdx.x; c < M3S_BLOCK_SIZE * M3S_INDEX_DIM / 16; c += TC_THREADS)
      tc_cp_async16(d + c * 16, src + c * 16);
  } else {
    const uint16_t *src = (const uint16_t *)a.ic + page * M3S_BLOCK_SIZE * M3S_INDEX_DIM;
    uint16_t *d = (uint16_t *)dst;
    for (int c = threadIdx.x; c < M3S_BLOCK_SIZE * M3S_INDEX_DIM / 8; c += TC_THREADS) {
      int key = c >> 4, ch = c & 15;
      tc_cp_async16(d + key * TC_PAD + ch * 8, src + key * M3S_INDEX_DIM + ch * 8);
    }
  }
}

/* Row maxima of a warp's 16 x 8J score fragment (the m16n8k16 / wgmma
 * accumulator layout: acc[j][0..1] row lo, acc[j][2..3] row hi, keys key0 +
 * 8j + 2 (lane & 3) + {0, 1} of block b) over the keys visible to rows at
 * pos_lo / pos_hi, folded into m_lo / m_hi (this lane's keys only: the
 * quad's maxima come from tc_quad_max). NaN dots are ignored (E is infinite
 * then). */
template <int J>
__device__ __forceinline__ void tc_row_fold(const float (&acc)[J][4], int64_t pos_lo,
                                            int64_t pos_hi, int64_t b, int key0, int lane,
                                            float &m_lo, float &m_hi) {
  /* last visible key slot of each row, clamped to [-1, 8J - 1] */
  const int last = 8 * J - 1;
  int64_t l64_lo = pos_lo - b * M3S_BLOCK_SIZE - key0, l64_hi = pos_hi - b * M3S_BLOCK_SIZE - key0;
  const int lim_lo = (int)(l64_lo < -1 ? -1 : (l64_lo > last ? last : l64_lo));
  const int lim_hi = (int)(l64_hi < -1 ? -1 : (l64_hi > last ? last : l64_hi));
  if (lim_lo == last && lim_hi == last) {
#pragma unroll
    for (int j = 0; j < J; j++) {
      m_lo = fmaxf(m_lo, fmaxf(acc[j][0], acc[j][1]));
      m_hi = fmaxf(m_hi, fmaxf(acc[j][2], acc[j][3]));
    }
  } else {
#pragma unroll
    for (int j = 0; j < J; j++)
#pragma unroll
      for (int e = 0; e < 2; e++) {
        int key = 8 * j + (lane & 3) * 2 + e;
        if (key <= lim_lo)
          m_lo = fmaxf(m_lo, acc[j][e]);
        if (key <= lim_hi)
          m_hi = fmaxf(m_hi, acc[j][2 + e]);
      }
  }
}

/* The maxima of the quad's lanes, in every lane of the quad. */
__device__ __forceinline__ void tc_quad_max(float &m_lo, float &m_hi) {
  m_lo = fmaxf(m_lo, __shfl_xor_sync(TC_FULL, m_lo, 1));
  m_lo = fmaxf(m_lo, __shfl_xor_sync(TC_FULL, m_lo, 2));
  m_hi = fmaxf(m_hi, __shfl_xor_sync(TC_FULL, m_hi, 1));
  m_hi = fmaxf(m_hi, __shfl_xor_sync(TC_FULL, m_hi, 2));
}

/* Row i of the tile at tile0: its request and position where it needs
 * scores (i < n, a request of at least TC_MIN_ROWS rows, more blocks than
 * K), else request -1 (its products are never stored). */
__device__ __forceinline__ void tc_tile_row(const m3s_cuda_batch &bt, const tc_score_args &a,
                                            int64_t tile0, int i, int n, int &req, int64_t &pos) {
  req = -1;
  pos = 0;
  if (i < n) {
    m3s_row_info ri = m3s_row_lookup(bt, a.row0 + tile0 + i);
    if (ri.valid && ri.n >= TC_MIN_ROWS && tc_blocks_of(ri.pos) > a.topk) {
      req = ri.r;
      pos = ri.pos;
    }
  }
}

/* Whether row i starts a run: its request differs from the previous row's;
 * rows past n count as starts so that every run ends by n. */
__device__ __forceinline__ bool tc_run_starts(const int *req, int i, int n) {
  return i >= n || i == 0 || req[i] != req[i - 1];
}

/* The end of row i's run (the next start after it, at most n), from the
 * start bits (row w * 32 + l at bit l of starts[w]). */
__device__ __forceinline__ int tc_run_end(const uint32_t *starts, int i, int n) {
  const int iw = i / 32, il = i % 32;
  int e = TC_ROWS;
  for (int w = iw; w < TC_ROWS / 32; w++) {
    /* starts after row i: in its own word, the bits above it */
    const uint32_t m = starts[w] & (w == iw ? (TC_FULL << il) << 1 : TC_FULL);
    if (m) {
      e = w * 32 + __ffs(m) - 1;
      break;
    }
  }
  return e < n ? e : n;
}

/* The calling warp's A fragments: its 16 rows of the staged query tile
 * (rows of TC_PAD elements), all 128 dims. */
__device__ __forceinline__ void tc_load_afrag(const uint16_t *qs, uint32_t (&af)[8][4]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int ks = 0; ks < 8; ks++) {
    const int row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, col = ks * 16 + (lane >> 4) * 8;
    tc_ldmatrix_x4(tc_smem_addr(qs + row * TC_PAD + col), af[ks][0], af[ks][1], af[ks][2],
                   af[ks][3]);
  }
}

/* Phase 1 of tc_score_kernel (tc_score_ws_kernel's preparers, ts_prepare,
 * do the same work through the helpers above, and for an e4m3 cache scale
 * the rows into fp16): the 128 rows of the tile
 * (request, or -1 when the row needs no scores; position; the end of its run
 * of rows of one request), the bf16 queries into qs (rows of TC_PAD elements; every row of
 * the chunk is loaded, also those that need no scores: their products are
 * never stored; rows past the chunk are zero), their norms (upper bounds, inf
 * for non-finite) and this warp's A fragments (its 16 rows, all 128 dims).
 * The query loads are issued before the row lookup's dependent round trips
 * and, when the layout allows, 16 bytes at a time: the element-wise loads
 * and the O(rows) run scan were ~30% of the 8K prompt's stall samples
 * (ncu, docs/perf-notes.md). The caller synchronises before qs is reused or
 * run_end / qn are read. */
__device__ __forceinline__ void tc_tile_prologue(const m3s_cuda_batch &bt, const tc_score_args &a,
                                                 tc_score_smem &s, uint16_t *qs, int64_t tile0, int n,
                                                 int g, uint32_t (&af)[8][4]) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint16_t *const q0 = a.iq + (a.row0 + tile0) * a.iq_s0 + g * a.iq_s1;
  const int vec = ((uintptr_t)a.iq & 15) == 0 && (a.iq_s0 & 7) == 0 && (a.iq_s1 & 7) == 0;
  constexpr int QV = TC_ROWS * (M3S_INDEX_DIM / 8) / TC_THREADS; /* 16-byte pieces per thread */
  uint4 qv[QV];
#pragma unroll
  for (int k = 0; k < QV; k++) {
    const int c = tid + k * TC_THREADS, i = c / (M3S_INDEX_DIM / 8), d = (c % (M3S_INDEX_DIM / 8)) * 8;
    qv[k] = make_uint4(0, 0, 0, 0);
    if (vec && i < n)
      qv[k] = *(const uint4 *)(q0 + i * a.iq_s0 + d);
  }
  if (tid < TC_ROWS)
    tc_tile_row(bt, a, tile0, tid, n, s.req[tid], s.pos[tid]);
  if (vec) {
#pragma unroll
    for (int k = 0; k < QV; k++) {
      const int c = tid + k * TC_THREADS, i = c / (M3S_INDEX_DIM / 8), d = (c % (M3S_INDEX_DIM / 8)) * 8;
      *(uint4 *)(qs + i * TC_PAD + d) = qv[k];
    }
  } else {
    for (int e = tid; e < TC_ROWS * (M3S_INDEX_DIM / 2); e += TC_THREADS) {
      const int i = e / (M3S_INDEX_DIM / 2), d = 2 * (e % (M3S_INDEX_DIM / 2));
      uint32_t w = 0;
      if (i < n) {
        const uint16_t *q = q0 + i * a.iq_s0 + d;
        w = (uint32_t)q[0] | ((uint32_t)q[1] << 16);
      }
      *(uint32_t *)(qs + i * TC_PAD + d) = w;
    }
  }
  __syncthreads();
  /* runs */
  if (tid < TC_ROWS) {
    const uint32_t m = __ballot_sync(TC_FULL, tc_run_starts(s.req, tid, n));
    if (lane == 0)
      s.starts[warp] = m;
  }
  __syncthreads();
  if (tid < TC_ROWS)
    s.run_end[tid] = tc_run_end(s.starts, tid, n);
  {
    /* two threads per row, 64 elements each */
    int i = tid >> 1, h = tid & 1;
    float sq = 0.0f;
#pragma unroll
    for (int v = 0; v < 8; v++)
      sq = tc_sumsq8_ru(*(const uint4 *)(qs + i * TC_PAD + h * 64 + v * 8), sq);
    sq = __fadd_ru(sq, __shfl_xor_sync(TC_FULL, sq, 1));
    float nq = __fsqrt_ru(sq);
    if (h == 0)
      s.qn[i] = isnan(nq) ? INFINITY : nq;
  }
  tc_load_afrag(qs, af);
}

/* (S~, E) of block b for the quad's two rows r_lo and r_lo + 8 (where they
 * belong to the run and b is one of their candidates); (NaN, inf) for a page
 * id out of range. Lanes with (lane & 3) == 0 call it. */
template <class Smem>
__device__ __forceinline__ void tc_store_rows(const tc_score_args &a, const Smem &s,
                                              int64_t tile0, int g, int r_lo, int in_lo,
                                              int in_hi, int64_t b, int bad, float m_lo,
                                              float m_hi, float nk) {
  int rows[2] = {r_lo, r_lo + 8}, in[2] = {in_lo, in_hi};
  float m[2] = {m_lo, m_hi};
#pragma unroll
  for (int h = 0; h < 2; h++)
    if (in[h] && tc_is_candidate(b, tc_blocks_of(s.pos[rows[h]]), a.init, a.local)) {
      float2 v = bad ? make_float2(NAN, INFINITY) : make_float2(m[h], tc_bound(s.qn[rows[h]], nk));
      a.ws[((tile0 + rows[h]) * a.hkv + g) * a.max_nb + b] = v;
    }
}

template <bool E4M3>
static __global__ void __launch_bounds__(TC_THREADS, 2)
    tc_score_kernel(m3s_cuda_batch bt, tc_score_args a) {
  extern __shared__ __align__(16) unsigned char tc_dyn[];
  __shared__ tc_score_smem s;
  uint16_t *qs = (uint16_t *)tc_dyn;
  /* bf16: two padded key tiles; e4m3: two raw 16 KiB blocks, then the
   * widened tile kt */
  unsigned char *const buf0 = tc_dyn + TC_TILE_BYTES;
  const int buf_step = E4M3 ? M3S_BLOCK_SIZE * M3S_INDEX_DIM : TC_TILE_BYTES; /* buffer i at buf0 + i * step */
  uint16_t *kt = (uint16_t *)(tc_dyn + TC_TILE_BYTES + 2 * M3S_BLOCK_SIZE * M3S_INDEX_DIM);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  tc_zero_count(a);
  const int64_t tiles = (a.nrows + TC_ROWS - 1) / TC_ROWS;
  const int64_t tile0 = (tiles - 1 - (int64_t)blockIdx.x) * TC_ROWS; /* heavy tiles first */
  const int g = blockIdx.y;
  const int n = (int)(a.nrows - tile0 < TC_ROWS ? a.nrows - tile0 : TC_ROWS);

  /* Phase 1: rows, runs, queries and their norms, the A fragments */
  uint32_t af[8][4];
  tc_tile_prologue(bt, a, s, qs, tile0, n, g, af);
  __syncthreads();

  /* Phase 2: runs of one request; per run the candidate blocks of this CTA */
  const int r_lo = warp * 16 + (lane >> 2), r_hi = r_lo + 8;
  for (int p0 = 0; p0 < n; p0 = s.run_end[p0]) {
    const int p1 = s.run_end[p0], r = s.req[p0];
    if (r < 0)
      continue;
    const int64_t hi = tc_blocks_of(s.pos[p1 - 1]) - a.local;
    int64_t b = a.init + blockIdx.z;
    if (b >= hi)
      continue;
    const int in_lo = r_lo >= p0 && r_lo < p1, in_hi = r_hi >= p0 && r_hi < p1;
    int64_t page = m3s_page(bt.ibt, bt.ibt_s0, bt.ibt_s1, bt.ibt_cols, r, b, a.num_pages);
    if (page >= 0)
      tc_issue_block<E4M3>(a, page, buf0);
    tc_cp_commit();
    /* results of the previous block, written after the next barrier */
    int64_t prev_b = -1;
    int prev_bad = 0;
    float pm_lo = 0.0f, pm_hi = 0.0f;
    int it = 0;
    for (; b < hi; b += gridDim.z, it++) {
      tc_cp_wait_all();
      __syncthreads(); /* block b landed; every warp is done with block b - gz */
      if (prev_b >= 0 && (lane & 3) == 0) {
        float nk = 0.0f;
#pragma unroll
        for (int w = 0; w < TC_THREADS / 32; w++)
          nk = fmaxf(nk, s.wnk[(it - 1) & 1][w]);
        tc_store_rows(a, s, tile0, g, r_lo, in_lo, in_hi, prev_b, prev_bad, pm_lo, pm_hi, nk);
      }
      const int64_t bn = b + gridDim.z;
      int64_t next_page = -1;
      if (bn < hi) {
        next_page = m3s_page(bt.ibt, bt.ibt_s0, bt.ibt_s1, bt.ibt_cols, r, bn, a.num_pages);
        if (next_page >= 0)
          tc_issue_block<E4M3>(a, next_page, buf0 + ((it + 1) & 1) * buf_step);
      }
      tc_cp_commit();
      const int bad = page < 0; /* uniform over the CTA */
      const uint16_t *tile = (const uint16_t *)(buf0 + (it & 1) * buf_step);
      if (E4M3 && !bad) {
        /* widen the raw codes into kt: 16 codes per step */
        const uint8_t *raw = buf0 + (it & 1) * buf_step;
        for (int c = tid; c < M3S_BLOCK_SIZE * M3S_INDEX_DIM / 16; c += TC_THREADS) {
          uint32_t o[8];
          tc_e4m3x16_to_bf16(*(const uint4 *)(raw + c * 16), o);
          int key = c >> 3, k0 = (c & 7) * 16;
          uint16_t *dst = kt + key * TC_PAD + k0;
          *(uint4 *)dst = make_uint4(o[0], o[1], o[2], o[3]);
          *(uint4 *)(dst + 8) = make_uint4(o[4], o[5], o[6], o[7]);
        }
        __syncthreads();
        tile = kt;
      }
      float m_lo = -INFINITY, m_hi = -INFINITY;
      if (!bad) {
        /* largest key norm: two threads per key */
        {
          int key = tid >> 1, h = tid & 1;
          float sq = 0.0f;
#pragma unroll
          for (int v = 0; v < 8; v++)
            sq = tc_sumsq8_ru(*(const uint4 *)(tile + key * TC_PAD + h * 64 + v * 8), sq);
          sq = __fadd_ru(sq, __shfl_xor_sync(TC_FULL, sq, 1));
          float nk = __fsqrt_ru(sq);
          nk = isnan(nk) ? INFINITY : nk;
#pragma unroll
          for (int o = 16; o > 0; o >>= 1)
            nk = fmaxf(nk, __shfl_xor_sync(TC_FULL, nk, o));
          if (lane == 0)
            s.wnk[it & 1][warp] = nk;
        }
        /* S~: 16 rows x 128 keys per warp */
        float acc[16][4];
#pragma unroll
        for (int j = 0; j < 16; j++)
          acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < 8; ks++) {
#pragma unroll
          for (int j = 0; j < 8; j++) {
            int key = 16 * j + (lane & 7) + ((lane >> 4) & 1) * 8;
            int col = ks * 16 + ((lane >> 3) & 1) * 8;
            uint32_t b0, b1, b2, b3;
            tc_ldmatrix_x4(tc_smem_addr(tile + key * TC_PAD + col), b0, b1, b2, b3);
            mma16816<false>(acc[2 * j], af[ks], b0, b1);
            mma16816<false>(acc[2 * j + 1], af[ks], b2, b3);
          }
        }
        tc_row_fold(acc, s.pos[r_lo], s.pos[r_hi], b, 0, lane, m_lo, m_hi);
        tc_quad_max(m_lo, m_hi);
      }
      prev_b = b;
      prev_bad = bad;
      pm_lo = m_lo;
      pm_hi = m_hi;
      page = next_page;
    }
    tc_cp_wait_all();
    __syncthreads();
    if (prev_b >= 0 && (lane & 3) == 0) {
      float nk = 0.0f;
#pragma unroll
      for (int w = 0; w < TC_THREADS / 32; w++)
        nk = fmaxf(nk, s.wnk[(it - 1) & 1][w]);
      tc_store_rows(a, s, tile0, g, r_lo, in_lo, in_hi, prev_b, prev_bad, pm_lo, pm_hi, nk);
    }
    __syncthreads(); /* the next run reuses the buffers and wnk */
  }
}

/* ---------------------------------------------------------------------------
 * Kernel 0 (with tc_score_ws_kernel): the largest key norm of every
 * candidate block of every request the score kernels cover, once per block
 * (the score kernel visits a block once per row tile and head).
 *
 * Grid (num_reqs, ceil(max_nb / TC_NORM_BLOCKS)), 256 threads: the warps
 * 4j .. 4j + 3 of CTA (r, y) take block b = TC_NORM_BLOCKS y + j of request r
 * when r has >= TC_MIN_ROWS query rows and b is a candidate of its last row,
 * a warp's 32 keys (bf16: 8 KB in 16 loads of 512 contiguous bytes, a key
 * over 16 lanes; e4m3: 4 KB in 8 loads, a key over 8 lanes, its codes
 * widened exactly), all in flight (one round trip per block; a warp per
 * block with four keys per lane in turn took ~13 us for the 8K prompt's 64
 * blocks; one key per lane, each load 32 rows apart, ran at ~1.5 TB/s on
 * the ragged batch, H100), each key's sum of squares rounded up over its
 * lanes (tc_sumsq8_ru and __fadd_ru: an upper bound, like the in-kernel
 * norms), NaN -> inf; the
 * four warps' maxima meet in shared memory. Written at norms[tc_norm_slot(r) * max_nb +
 * b]; a page id outside [0, P) is left alone (the score kernel writes (NaN,
 * inf) for it).
 * ------------------------------------------------------------------------- */

/* The norm-table slot of request r (query-start-loc batches): its first row
 * over TC_MIN_ROWS. */
__device__ __forceinline__ int64_t tc_norm_slot(const m3s_cuda_batch &bt, int r) {
  return ((int64_t)bt.qsl[(int64_t)r * bt.qsl_stride] - bt.qsl[0]) / TC_MIN_ROWS;
}

/* Each key's V partial sums of squares (lane bits below log2(V) index the
 * part, the lane's values index keys) added up, rounded up (an upper bound
 * in any order): at the exchange across lane bit h a lane keeps the upper
 * or lower half of its values by that bit and adds its partner's, so that
 * p[0] ends as one key's whole sum. */
template <int V> __device__ __forceinline__ float tc_norm_fold(float (&p)[V], int lane) {
#pragma unroll
  for (int h = V / 2; h > 0; h >>= 1) {
    const bool up = lane & h;
#pragma unroll
    for (int c = 0; c < V / 2; c++)
      if (c < h) {
        const float give = up ? p[c] : p[c + h], keep = up ? p[c + h] : p[c];
        p[c] = __fadd_ru(keep, __shfl_xor_sync(TC_FULL, give, h));
      }
  }
  return p[0];
}

template <bool E4M3>
static __global__ void __launch_bounds__(TC_THREADS) tc_norm_kernel(m3s_cuda_batch bt,
                                                                    tc_score_args a) {
  __shared__ float part[TC_THREADS / 32];
  /* the score kernel may launch now: it waits for this grid's end before
   * it reads a norm, and it cannot hold SMs this grid still needs, since a
   * dependent launches only once every CTA here has started */
  if (a.pdl)
    m3s_pdl_trigger();
  const int r = blockIdx.x, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t b = (int64_t)blockIdx.y * TC_NORM_BLOCKS + warp / TC_NORM_WARPS;
  const int key0 = (warp % TC_NORM_WARPS) * 32; /* the warp's 32 keys, contiguous */
  const int64_t t0 = (int64_t)bt.qsl[(int64_t)r * bt.qsl_stride] - bt.qsl[0];
  const int64_t n = (int64_t)bt.qsl[(int64_t)(r + 1) * bt.qsl_stride] - bt.qsl[(int64_t)r * bt.qsl_stride];
  const int64_t seq = bt.seq_lens[(int64_t)r * bt.seq_stride];
  int64_t page = -1;
  if (n >= TC_MIN_ROWS && seq > 0 && t0 >= 0 && t0 < bt.num_tokens && b < a.max_nb) {
    const int64_t nb = tc_blocks_of(seq - 1);
    if (nb > a.topk && tc_is_candidate(b, nb, a.init, a.local))
      page = m3s_page(bt.ibt, bt.ibt_s0, bt.ibt_s1, bt.ibt_cols, r, b, a.num_pages);
  }
  float nk = 0.0f;
  if (page >= 0) {
    /* load c of the warp: 512 contiguous bytes, 16 a lane; bf16: keys key0
     * + 2c (lanes 0-15) and + 1 (lanes 16-31); e4m3: key key0 + 4c + (lane
     * >> 3), its codes widened exactly */
    constexpr int V = E4M3 ? 8 : 16, ELEM = E4M3 ? 1 : 2;
    const uint4 *base = (const uint4 *)((const unsigned char *)a.ic +
                                        (page * M3S_BLOCK_SIZE + key0) * M3S_INDEX_DIM * ELEM);
    uint4 w[V];
#pragma unroll
    for (int c = 0; c < V; c++)
      w[c] = __ldg(base + 32 * c + lane);
    float p[V];
#pragma unroll
    for (int c = 0; c < V; c++) {
      if (E4M3) {
        uint32_t o[8];
        tc_e4m3x16_to_bf16(w[c], o);
        p[c] = tc_sumsq8_ru(make_uint4(o[4], o[5], o[6], o[7]),
                            tc_sumsq8_ru(make_uint4(o[0], o[1], o[2], o[3]), 0.0f));
      } else {
        p[c] = tc_sumsq8_ru(w[c], 0.0f);
      }
    }
    const float k = __fsqrt_ru(tc_norm_fold(p, lane));
    nk = isnan(k) ? INFINITY : k;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    nk = fmaxf(nk, __shfl_xor_sync(TC_FULL, nk, o));
  if (lane == 0)
    part[warp] = nk;
  __syncthreads();
  if (page >= 0 && warp % TC_NORM_WARPS == 0 && lane == 0) {
#pragma unroll
    for (int w = 1; w < TC_NORM_WARPS; w++)
      nk = fmaxf(nk, part[warp + w]);
    a.norms[tc_norm_slot(bt, r) * a.max_nb + b] = nk;
  }
}

/* ---------------------------------------------------------------------------
 * Kernel 1, sm_90a variant: tc_score_ws_kernel<E4M3>, TMA and wgmma in a
 * warp-specialised, persistent pipeline.
 *
 * The work of tc_score_kernel (tiles, runs, outputs) cut into items (row
 * tile, head g, z: every gz-th candidate block from init + z; gz for about
 * TS_WAVES items per SM in all), heavy tiles first; a grid of one CTA per SM
 * (at most one per item), CTA c taking items c, 2G - 1 - c, 2G + c, ...
 * (a snake over the heavy-first order, so the CTAs' sums even out).
 * TS_THREADS = 384 threads, TS_SMEM_BYTES dynamic shared memory.
 *  - Warps 0-7, the consumers (TS_CONSUMER_REGS registers by setmaxnreg):
 *    two warpgroups of 64 rows. Per item, the A fragments (bf16; fp16 for
 *    an e4m3 cache, see E4M3 below) from the
 *    staged query tile into registers, then each block as one m64n128 wgmma
 *    group (B straight from the swizzled stage) into one of two
 *    accumulators in turn, the previous block's accumulator folded while
 *    the group runs (wg_wait<1>), so the tensor work does not stop for the
 *    epilogue; (S~, E) stored by lanes 0 and 1 of each quad, a row each.
 *    The epilogue bound this kernel, not the tensor cores (H100, ragged 8 x
 *    2K batch: ncu's active cycles put a block step at ~1,500 cycles
 *    against ~1,024 of wgmma at peak; ~100 more instructions per block made
 *    it 77% slower), so per run each thread keeps its row's entry pointer,
 *    candidate end and query norm and the blocks that need masks, and a
 *    block costs a tree of 64 FMNMX, two exchanges and one store (~95
 *    instructions per warp in the SASS, from ~250): top-k -8..-16%.
 *  - Warp 8, the producer: the page ids and key norms (the table
 *    tc_norm_kernel fills first) of the item's blocks, 32 at a time, a
 *    block per lane; its lane 0 fills a TS_STAGES-deep ring of 32 KB stages
 *    by TMA (a 2-D tensor map over the cache as [P * 128 keys][128 dims],
 *    two boxes of 64 dims x 128 keys per page, 128-byte swizzle; mbarriers
 *    full: the bytes landed, empty: every consumer thread is done), writing
 *    each stage's page check and norm beside it. It runs into the next item
 *    as soon as that item's rows are known, so the ring is full when the
 *    consumers get there.
 *  - Warps 9-11, the preparers: the next item's rows, runs, query tile and
 *    query norms (tc_tile_prologue's work) into one of two row tables and
 *    the query buffer, while the consumers work on the current item.
 *  - E4M3 (an e4m3 index cache): the producer's TMA brings a page's codes
 *    (16 KB, one box) into one of TS_RAW_STAGES raw stages; the consumers
 *    widen each into one of TS_E4_STAGES fp16 stages of their own one
 *    block ahead of the one they issue (ts_widen_e4), then issue as above
 *    on fp16 operands: every e4m3 code is exactly an fp16 value, so a pair
 *    of codes takes one cvt.rn.f16x2.e4m3x2, and the preparers scale each
 *    query row by 2^s into fp16 (S~ and E scaled back: tc_bound_f16, the
 *    decode kernel's argument). The bf16 widening that came first (PRMT,
 *    LOP3 and a bf16 multiply, ~230 instructions per thread and block)
 *    set the pace.
 *    The bf16 widening against the mma.sync kernel it replaced: e4m3
 *    top-k 8K 243 -> 140 us, 64K 10.45 -> 5.47 ms, ragged 8 x 2K 1531 ->
 *    744 us, 4K behind 60K 1391 -> 700 us (H100, 2026-12-07, separate A/B
 *    calls; the preparer warps widening first got 0.71-0.79), the
 *    widening still the pace, not the tensor cores (64K second chunk 3.62
 *    ms at 48% of the tensor pipe; bf16 2.22 ms at 90%; without the
 *    widening, timing only, 86%). fp16 operands then took the e4m3 top-k
 *    64K 5.46 -> 5.02 ms (second chunk's scores 3.62 -> 3.26 ms), and
 *    widening one block ahead 5.02 -> 4.64 ms (2.86 ms; ragged 8 x 2K
 *    687 -> 639 us; H100, 2026-12-07, docs/perf-notes.md session 38).
 * Warps 8-11 run at TS_PRODUCER_REGS registers. The kernel before this one
 * (one item per CTA, the consumers doing the prologue, the ring's first
 * copies behind it) took the 8K prompt's scores 99.6 -> 84 us and 4K
 * behind 60K 604 -> 459 us against the first TMA kernel (H100,
 * docs/perf-notes.md), where thread 0 filled the ring and four warpgroups
 * per SM each waited for their m64n64 halves before folding them (~40-56%
 * of the bf16 ceiling). Against the kernel before, this one took the whole
 * top-k of the 8K prompt 149.5 -> 137.8 us and of 4K behind 60K 602 ->
 * 581 us; the 4K prompt 60.9 -> 62.5 us (H100, 4a87b97). sm_90a only.
 * ------------------------------------------------------------------------- */
#define TS_STAGES 5    /* bf16 stages of a bf16 cache's kernel */
#define TS_E4_STAGES 4  /* an e4m3 cache's: fp16 stages the consumers widen into */
#define TS_RAW_STAGES 3 /* from these raw ones (the codes as TMA brings them) */
#define TS_HALF_BYTES (M3S_BLOCK_SIZE * 64 * 2) /* one box: 128 keys x 64 dims */
#define TS_STAGE_BYTES (2 * TS_HALF_BYTES)
#define TS_RAW_BYTES (M3S_BLOCK_SIZE * M3S_INDEX_DIM) /* one e4m3 page, one box */
#define TS_QS_BYTES (TC_ROWS * TC_PAD * 2) /* the staged query tile */
#define TS_CONSUMERS (TC_THREADS / 32)     /* consumer warps */
#define TS_THREADS (TC_THREADS + 128)      /* + the producer warpgroup */
#define TS_PREP0 (TC_THREADS + 32)         /* the first preparer thread */
#define TS_PREP_THREADS 96
#define TS_PRODUCER_REGS 56 /* 128 x 56 + 256 x 224 = 384 x 168: the CTA's launch allocation */
#define TS_CONSUMER_REGS 224
/* setmaxnreg.inc waits until the CTA's pool has the registers: the roles'
 * sum must not exceed what the launch gives each of TS_THREADS threads
 * (65536 / TS_THREADS rounded down to 8: 168, ptxas's count with
 * setmaxnreg in the kernel; m3s_topk_tc_ws_fits checks the build's count
 * once per context) */
static_assert(4 * 32 * TS_PRODUCER_REGS + TC_THREADS * TS_CONSUMER_REGS <=
                  TS_THREADS * ((65536 / TS_THREADS) & ~7),
              "the consumers' registers must come from the producer warpgroup's");
/* the 16-bit stages (then the raw ones), the query tile, 1024-byte alignment */
#define TS_SMEM_BYTES(E4M3)                                                                        \
  ((E4M3) ? TS_E4_STAGES * TS_STAGE_BYTES + TS_RAW_STAGES * TS_RAW_BYTES + TS_QS_BYTES + 1024      \
          : TS_STAGES * TS_STAGE_BYTES + TS_QS_BYTES + 1024)
#define TS_WAVES 1 /* items per SM the grid aims at (H100, 6a66432 and 3d24ad3: 1 beats 2 and 3 at the 8K prompt and 4K behind 60K) */

/* An item's rows (request or -1, position, run ends, run starts) and query
 * norms. */
typedef struct {
  int64_t pos[TC_ROWS];
  int req[TC_ROWS];
  int run_end[TC_ROWS];
  uint32_t starts[TC_ROWS / 32];
  float qn[TC_ROWS];
  float qsc[TC_ROWS]; /* e4m3: 2^-s of the row's fp16 scaling (tc_f16_shift) */
} ts_rows;

typedef struct {
  unsigned long long full[TS_STAGES], empty[TS_STAGES];
  unsigned long long ready[2]; /* rows[i] and the query buffer prepared (96 arrivals) */
  unsigned long long done[2];  /* rows[i] no longer read (every consumer and producer thread) */
  unsigned long long qs_free;  /* the consumers hold the item's A fragments (every thread) */
  float nk[TS_STAGES];         /* the stage's largest key norm */
  int bad[TS_STAGES];          /* its page id is out of range (nothing loaded) */
  /* e4m3: the raw stages' barriers (full: the codes landed; empty: every
   * consumer thread has widened them), page checks and norms */
  unsigned long long raw_full[TS_RAW_STAGES], raw_empty[TS_RAW_STAGES];
  unsigned long long wide[TS_E4_STAGES]; /* e4m3: the fp16 stage written (every consumer thread) */
  float raw_nk[TS_RAW_STAGES];
  int raw_bad[TS_RAW_STAGES];
  ts_rows rows[2];
} ts_smem;

typedef struct {
  int64_t tile0;
  int n; /* rows of the tile; 0: no such item */
  int g, z;
} ts_item;

/* The CTA's k-th item: position c, 2G - 1 - c, 2G + c, ... of the list of
 * tiles x Hkv x gz items that starts with the last (heaviest) tile. */
__device__ __forceinline__ ts_item ts_item_of(const tc_score_args &a, int k) {
  const int64_t G = gridDim.x, c = blockIdx.x, per = (int64_t)a.hkv * a.gz;
  const int64_t tiles = (a.nrows + TC_ROWS - 1) / TC_ROWS;
  const int64_t idx = (int64_t)k * G + ((k & 1) ? G - 1 - c : c);
  ts_item it = {0, 0, 0, 0};
  if (idx >= tiles * per)
    return it;
  it.tile0 = (tiles - 1 - idx / per) * TC_ROWS;
  it.g = (int)(idx % per / a.gz);
  it.z = (int)(idx % a.gz);
  it.n = (int)(a.nrows - it.tile0 < TC_ROWS ? a.nrows - it.tile0 : TC_ROWS);
  return it;
}

/* The registers of the calling warpgroup (every thread of it calls). */
template <int N>
__device__ __forceinline__ void ts_set_regs(bool inc) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if (inc)
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
  else
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#else
  (void)inc;
#endif
}

__device__ __forceinline__ void ts_prep_sync() {
  asm volatile("bar.sync 1, %0;\n" ::"n"(TS_PREP_THREADS) : "memory");
}

/* Warps 9-11: item it's rows, runs, query tile (into qs, rows of TC_PAD
 * elements, zero past the chunk) and query norms (upper bounds, inf for
 * non-finite), as tc_tile_prologue computes them. E4M3: the keys are fp16
 * operands, so each row of qs becomes the row times 2^s in fp16, its norm
 * that of the fp16 row and qsc its 2^-s, as the decode kernel stages its
 * query rows (../topk_decode.cu, tcd_stage_request). */
template <bool E4M3>
__device__ void ts_prepare(const m3s_cuda_batch &bt, const tc_score_args &a, ts_rows &r,
                           uint16_t *qs, const ts_item &it) {
  const int p = threadIdx.x - TS_PREP0, lane = p & 31, w = p >> 5;
  const uint16_t *const q0 = a.iq + (a.row0 + it.tile0) * a.iq_s0 + it.g * a.iq_s1;
  const int vec = ((uintptr_t)a.iq & 15) == 0 && (a.iq_s0 & 7) == 0 && (a.iq_s1 & 7) == 0;
  constexpr int PIECES = TC_ROWS * (M3S_INDEX_DIM / 8), BATCH = 8 * TS_PREP_THREADS;
  for (int i = p; i < TC_ROWS; i += TS_PREP_THREADS)
    tc_tile_row(bt, a, it.tile0, i, it.n, r.req[i], r.pos[i]);
  /* the query tile 16 bytes at a time, 8 pieces in flight per thread */
  for (int c0 = p; c0 < PIECES; c0 += BATCH) {
    uint4 v[8];
#pragma unroll
    for (int u = 0; u < 8; u++) {
      const int c = c0 + u * TS_PREP_THREADS, i = c / (M3S_INDEX_DIM / 8);
      v[u] = make_uint4(0, 0, 0, 0);
      if (vec && c < PIECES && i < it.n)
        v[u] = *(const uint4 *)(q0 + i * a.iq_s0 + (c % (M3S_INDEX_DIM / 8)) * 8);
    }
    if (vec)
#pragma unroll
      for (int u = 0; u < 8; u++) {
        const int c = c0 + u * TS_PREP_THREADS, i = c / (M3S_INDEX_DIM / 8);
        if (c < PIECES)
          *(uint4 *)(qs + i * TC_PAD + (c % (M3S_INDEX_DIM / 8)) * 8) = v[u];
      }
  }
  if (!vec)
    for (int e = p; e < TC_ROWS * (M3S_INDEX_DIM / 2); e += TS_PREP_THREADS) {
      const int i = e / (M3S_INDEX_DIM / 2), d = 2 * (e % (M3S_INDEX_DIM / 2));
      uint32_t x = 0;
      if (i < it.n) {
        const uint16_t *q = q0 + i * a.iq_s0 + d;
        x = (uint32_t)q[0] | ((uint32_t)q[1] << 16);
      }
      *(uint32_t *)(qs + i * TC_PAD + d) = x;
    }
  ts_prep_sync();
  /* runs */
  for (int wd = w; wd < TC_ROWS / 32; wd += TS_PREP_THREADS / 32) {
    const uint32_t m = __ballot_sync(TC_FULL, tc_run_starts(r.req, wd * 32 + lane, it.n));
    if (lane == 0)
      r.starts[wd] = m;
  }
  ts_prep_sync();
  for (int i = p; i < TC_ROWS; i += TS_PREP_THREADS) {
    r.run_end[i] = tc_run_end(r.starts, i, it.n);
    if (E4M3) {
      /* 16 bytes at a time: rows TC_PAD elements apart meet no bank twice
       * in a quarter warp */
      uint4 *const row = (uint4 *)(qs + i * TC_PAD);
      uint32_t m = 0; /* the largest |q_d|'s bits (Inf, NaN above every finite) */
      for (int v = 0; v < M3S_INDEX_DIM / 8; v++) {
        const uint4 w = row[v];
        const uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int e = 0; e < 4; e++)
          m = max(m, max(u[e] & 0x7fffu, u[e] >> 16 & 0x7fffu));
      }
      const int sh = tc_f16_shift(m);
      const float f = tc_pow2(sh);
      float sq = 0.0f;
      for (int v = 0; v < M3S_INDEX_DIM / 8; v++) {
        const uint4 w = row[v];
        uint32_t u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
        for (int e = 0; e < 4; e++) {
          u[e] = tc_bf16x2_to_f16x2(u[e], f);
          sq = tc_sumsq2_ru<true>(u[e], sq);
        }
        row[v] = make_uint4(u[0], u[1], u[2], u[3]);
      }
      const float nq = __fsqrt_ru(sq);
      r.qn[i] = isnan(nq) ? INFINITY : nq;
      r.qsc[i] = tc_pow2(-sh);
      continue;
    }
    /* the norm: each half's sum of squares rounded up, then their sum */
    float sq[2] = {0.0f, 0.0f};
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
      for (int v = 0; v < 8; v++)
        sq[h] = tc_sumsq8_ru(*(const uint4 *)(qs + i * TC_PAD + h * 64 + v * 8), sq[h]);
    const float nq = __fsqrt_ru(__fadd_ru(sq[0], sq[1]));
    r.qn[i] = isnan(nq) ? INFINITY : nq;
  }
}

/* Item it's candidate blocks in the run of rows that starts at row p0:
 * request *req, blocks b0 + j gz for j below the result (0: the run needs
 * no scores or the item has none of its blocks). The producer and the
 * consumers both walk the runs through it, so their block sequences agree.
 * Block ids fit 32 bits: positions come from int32 seq_lens. */
__device__ __forceinline__ int ts_run_blocks(const tc_score_args &a, const ts_rows &r,
                                             const ts_item &it, int p0, int &req, int &b0) {
  req = r.req[p0];
  b0 = a.init + it.z;
  if (req < 0)
    return 0;
  const int hi = (int)(tc_blocks_of(r.pos[r.run_end[p0] - 1]) - a.local);
  return b0 < hi ? (hi - b0 + a.gz - 1) / a.gz : 0;
}

/* Warp 8: the stages of item it's blocks, in the consumers' order (runs,
 * then init + z + j gz); i counts the CTA's blocks over all items. Lane l
 * looks up block j0 + l of each 32; lane 0 waits for each stage's release,
 * writes its page check and norm, and arms it (a page out of range: a
 * plain arrive, nothing loaded). E4M3: the raw stages at dst (one box of
 * 128 keys x 128 codes), which the consumers widen into their own stages. */
template <bool E4M3>
__device__ __forceinline__ void ts_produce(const m3s_cuda_batch &bt, const tc_score_args &a,
                                           const CUtensorMap *map, ts_smem &s, const ts_rows &r,
                                           unsigned char *dst0, const ts_item &it, uint32_t &i) {
  constexpr uint32_t NS = E4M3 ? TS_RAW_STAGES : TS_STAGES;
  unsigned long long *const full = E4M3 ? s.raw_full : s.full;
  unsigned long long *const empty = E4M3 ? s.raw_empty : s.empty;
  float *const nks = E4M3 ? s.raw_nk : s.nk;
  int *const bads = E4M3 ? s.raw_bad : s.bad;
  const int lane = threadIdx.x & 31;
  for (int p0 = 0; p0 < it.n; p0 = r.run_end[p0]) {
    int req, b0;
    const int nblk = ts_run_blocks(a, r, it, p0, req, b0);
    if (nblk == 0)
      continue;
    const float *nrow = a.norms + tc_norm_slot(bt, req) * a.max_nb;
    for (int j0 = 0; j0 < nblk; j0 += 32) {
      const int b = b0 + (j0 + lane) * a.gz;
      int64_t page = -1;
      float nk = INFINITY;
      if (j0 + lane < nblk) {
        page = m3s_page(bt.ibt, bt.ibt_s0, bt.ibt_s1, bt.ibt_cols, req, b, a.num_pages);
        nk = b < a.max_nb ? nrow[b] : INFINITY;
      }
      const int m = nblk - j0 < 32 ? nblk - j0 : 32;
      for (int l = 0; l < m; l++, i++) {
        const int64_t pg = __shfl_sync(TC_FULL, page, l);
        const float k = __shfl_sync(TC_FULL, nk, l);
        if (lane == 0) {
          const uint32_t st = i % NS, use = i / NS;
          if (use > 0)
            sm90_bar_wait(&empty[st], (use - 1) & 1);
          nks[st] = k;
          bads[st] = pg < 0;
          if (pg < 0) {
            sm90_bar_arrive(&full[st]);
          } else if (E4M3) {
            sm90_bar_arrive_tx(&full[st], TS_RAW_BYTES);
            sm90_tma_load_2d(dst0 + st * TS_RAW_BYTES, map, 0, (int)(pg * M3S_BLOCK_SIZE), &full[st]);
          } else {
            unsigned char *dst = dst0 + st * TS_STAGE_BYTES;
            sm90_bar_arrive_tx(&full[st], TS_STAGE_BYTES);
            sm90_tma_load_2d(dst, map, 0, (int)(pg * M3S_BLOCK_SIZE), &full[st]);
            sm90_tma_load_2d(dst + TS_HALF_BYTES, map, 64, (int)(pg * M3S_BLOCK_SIZE), &full[st]);
          }
        }
        __syncwarp();
      }
    }
  }
}

/* 8 wgmma k-steps of the warpgroup's 64 rows x a stage's 128 keys into
 * acc, committed, not waited for. F16: fp16 operands (the e4m3 form), else
 * bf16. */
template <bool F16>
__device__ __forceinline__ void ts_mma_stage(const unsigned char *stage,
                                             const uint32_t (&af)[8][4], float (&acc)[16][4]) {
  const uint32_t tile = tc_smem_addr(stage);
  wg_pin(acc);
  wg_fence();
#pragma unroll
  for (int ks = 0; ks < 8; ks++)
    wg_mma_n128<F16>(acc, af[ks], wg_desc_k_sw128(tile + (ks >> 2) * TS_HALF_BYTES + (ks & 3) * 32),
                       ks > 0);
  wg_commit();
}

/* A consumer warpgroup's group for the CTA's i-th block once its stage has
 * landed. */
template <uint32_t NS>
__device__ __forceinline__ void ts_issue(ts_smem &s, const unsigned char *ring,
                                         const uint32_t (&af)[8][4], float (&acc)[16][4],
                                         uint32_t i) {
  const uint32_t st = i % NS;
  sm90_bar_wait(&s.full[st], (i / NS) & 1);
  ts_mma_stage<false>(ring + st * TS_STAGE_BYTES, af, acc);
}

/* A consumer thread's constants for one run of rows, so that a block's
 * epilogue does no 64-bit position or address arithmetic. After the quad's
 * maxima (ts_quad_rows) lane 0 of a quad holds row r_lo's, lane 1 row
 * r_hi's: row is that lane's row of entries, lim its candidates' end (b <
 * lim; INT_MIN for lanes 2 and 3 and rows outside the run; b >= init holds
 * for every block of a run), qn its query norm. d_lo / d_hi: the block of
 * row r_lo / r_hi that is a candidate and only partly visible to it (its
 * diagonal block where local is 0 and pos + 1 is not a multiple of 128),
 * else -1: every other block's maximum (of a candidate, the only ones
 * stored) takes all 128 keys. qs (e4m3): the row's 2^-s (ts_prepare). */
typedef struct {
  float2 *row;
  int lim;
  float qn, qs;
  int d_lo, d_hi;
} ts_run;

__device__ __forceinline__ int ts_partial_block(const tc_score_args &a, int64_t pos, int in) {
  const int64_t d = pos / M3S_BLOCK_SIZE;
  return in && (pos % M3S_BLOCK_SIZE) != M3S_BLOCK_SIZE - 1 && d < tc_blocks_of(pos) - a.local
             ? (int)d
             : -1;
}

template <bool E4M3>
__device__ __forceinline__ ts_run ts_run_of(const tc_score_args &a, const ts_rows &r,
                                            const ts_item &it, int r_lo, int in_lo, int in_hi) {
  const int q = threadIdx.x & 3;
  const int mine = q == 0 ? r_lo : r_lo + 8, in = q == 0 ? in_lo : q == 1 ? in_hi : 0;
  ts_run run;
  run.row = a.ws;
  run.lim = INT_MIN;
  run.qn = 0.0f;
  run.qs = 1.0f;
  if (in) {
    run.lim = (int)(tc_blocks_of(r.pos[mine]) - a.local);
    run.row = a.ws + ((it.tile0 + mine) * a.hkv + it.g) * a.max_nb;
    run.qn = r.qn[mine];
    if (E4M3)
      run.qs = r.qsc[mine];
  }
  run.d_lo = ts_partial_block(a, r.pos[r_lo], in_lo);
  run.d_hi = ts_partial_block(a, r.pos[r_lo + 8], in_hi);
  return run;
}

/* The row maxima of a whole block from the accumulator: each row's 32
 * values of this lane reduced as a tree (depth 5, not a chain of 32). */
__device__ __forceinline__ void ts_fold_full(const float (&acc)[16][4], float &m_lo, float &m_hi) {
  float lo[16], hi[16];
#pragma unroll
  for (int j = 0; j < 16; j++) {
    lo[j] = fmaxf(acc[j][0], acc[j][1]);
    hi[j] = fmaxf(acc[j][2], acc[j][3]);
  }
#pragma unroll
  for (int d = 0; d < 4; d++) {
    const int w = 8 >> d;
#pragma unroll
    for (int j = 0; j < 8; j++)
      if (j < w) {
        lo[j] = fmaxf(lo[j], lo[j + w]);
        hi[j] = fmaxf(hi[j], hi[j + w]);
      }
  }
  m_lo = lo[0];
  m_hi = hi[0];
}

/* The quad's maxima of its two rows in two exchanges instead of four: each
 * lane passes its partner the row it does not keep, so that even lanes end
 * with row lo's maximum and odd lanes with row hi's. */
__device__ __forceinline__ float ts_quad_rows(float m_lo, float m_hi) {
  const bool odd = threadIdx.x & 1;
  float keep = odd ? m_hi : m_lo;
  keep = fmaxf(keep, __shfl_xor_sync(TC_FULL, odd ? m_lo : m_hi, 1));
  return fmaxf(keep, __shfl_xor_sync(TC_FULL, keep, 2));
}

/* Block b's row maxima folded from acc and (S~, E) stored by lanes 0 and 1
 * of each quad, one row each (bad: its page id was out of range; nk: its
 * largest key norm). NaN dots are ignored by fmaxf; a maximum over none is
 * -inf, as tc_row_fold's. E4M3: acc is the fp16-scaled dot, S~ and E are
 * scaled back by 2^-s (tc_bound_f16). */
template <bool E4M3>
__device__ __forceinline__ void ts_store_block(const ts_rows &r, const float (&acc)[16][4], int b,
                                               const ts_run &run, int bad, float nk) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float m_lo = -INFINITY, m_hi = -INFINITY;
  if (b == run.d_lo || b == run.d_hi) {
    const int r_lo = warp * 16 + (lane >> 2);
    tc_row_fold(acc, r.pos[r_lo], r.pos[r_lo + 8], b, 0, lane, m_lo, m_hi);
  } else {
    ts_fold_full(acc, m_lo, m_hi);
  }
  const float m = fmaxf(ts_quad_rows(m_lo, m_hi), -INFINITY);
  /* a bad page's maxima are never stored: (NaN, inf) instead */
  if (b < run.lim)
    run.row[b] = bad    ? make_float2(NAN, INFINITY)
                 : E4M3 ? make_float2(__fmul_rn(m, run.qs), tc_bound_f16(run.qn, nk, run.qs))
                        : make_float2(m, tc_bound(run.qn, nk));
}

/* The CTA's i-th block (block b of a run) once at most PENDING groups are
 * left: the stage released (its page check and norm read first: the
 * producer rewrites them), then ts_store_block. */
template <int PENDING, uint32_t NS>
__device__ __forceinline__ void ts_finish(ts_smem &s, const ts_rows &r, float (&acc)[16][4],
                                          uint32_t i, int b, const ts_run &run) {
  const uint32_t st = i % NS;
  wg_wait<PENDING>();
  wg_pin(acc);
  const int bad = s.bad[st];
  const float nk = s.nk[st];
  /* this thread's reads of the page check and norm come before the
   * producer's rewrite (generic proxy on both sides: the barrier orders
   * them; the stage itself is read by wgmma and refilled by TMA, both in
   * the async proxy, and its reads completed in wg_wait); every thread
   * arrives (racecheck credits an arrival with the arriving thread's own
   * reads only: a lane-0 arrival after __syncwarp left 16 WAR reports on
   * nk / bad) */
  sm90_bar_arrive(&s.empty[st]);
  ts_store_block<false>(r, acc, b, run, bad, nk);
}

/* E4M3: a block's page check and largest key norm, taken from its raw
 * stage when it is widened (the producer rewrites them once the stage is
 * released) and kept until its epilogue. */
typedef struct {
  float nk;
  int bad;
} ts_blk;

/* E4M3: the consumers widen the CTA's i-th block. Its raw stage (the codes
 * as the 128-byte swizzle stores them: 16-byte chunk c of key n at c ^ (n &
 * 7)) is widened by the 256 consumer threads, 4 units of 16 codes each (8
 * cvt), into fp16 stage i % TS_E4_STAGES in the layout the bf16 kernel's two
 * TMA boxes leave (chunk u of a 64-dim half at u ^ (n & 7)); the 8 lanes of a
 * quarter warp take 8 keys of one c, so that their loads and stores each
 * cover all 32 banks. The generic writes are fenced for wgmma (async proxy),
 * then the raw stage is released and the fp16 one announced (wide[]).
 * ts_consume widens one block ahead of the one it issues, while up to two
 * groups are in the tensor pipe (a run's first block is widened just before
 * its own issue, its second with one group in flight), so that neither the
 * widening nor a barrier of the 256 threads lies between a group's end and
 * the next issue (they did when each block was widened just before its own
 * issue: H100, e4m3 score kernel 3.26 ms against bf16's 2.17 at the 64K
 * prompt, 2026-12-07; 2.86 ms widened ahead). Stage reuse:
 * this thread widens block i after its wait for group i - 3 and after
 * wide[] of block i - 1 is complete, i.e. after every consumer widened
 * block i - 1, which each did after its own wait for group i - 4, the
 * stage's last reader (at a run's start every group of the run before is
 * done by then). */
__device__ __forceinline__ ts_blk ts_widen_e4(ts_smem &s, const unsigned char *raw,
                                              unsigned char *ring, uint32_t i) {
  const uint32_t rs = i % TS_RAW_STAGES;
  sm90_bar_wait(&s.raw_full[rs], (i / TS_RAW_STAGES) & 1);
  const ts_blk k = {s.raw_nk[rs], s.raw_bad[rs]};
  unsigned char *const stage = ring + (i % TS_E4_STAGES) * TS_STAGE_BYTES;
  if (!k.bad) {
    const unsigned char *src = raw + rs * TS_RAW_BYTES;
    constexpr int U = TS_RAW_BYTES / 16 / TC_THREADS; /* units per thread */
    uint4 w[U];
#pragma unroll
    for (int t = 0; t < U; t++) {
      const int j = threadIdx.x + t * TC_THREADS, kk = j & 7, c = (j >> 3) & 7;
      w[t] = *(const uint4 *)(src + (((j >> 6) << 3) | kk) * M3S_INDEX_DIM + ((c ^ kk) << 4));
    }
#pragma unroll
    for (int t = 0; t < U; t++) {
      const int j = threadIdx.x + t * TC_THREADS, kk = j & 7, c = (j >> 3) & 7;
      uint4 o0, o1;
      fp8x4_to_f16x4<false>(w[t].x, o0.x, o0.y);
      fp8x4_to_f16x4<false>(w[t].y, o0.z, o0.w);
      fp8x4_to_f16x4<false>(w[t].z, o1.x, o1.y);
      fp8x4_to_f16x4<false>(w[t].w, o1.z, o1.w);
      const int u0 = (c & 3) * 2;
      unsigned char *row = stage + (c >> 2) * TS_HALF_BYTES + (((j >> 6) << 3) | kk) * 128;
      *(uint4 *)(row + ((u0 ^ kk) << 4)) = o0;
      *(uint4 *)(row + (((u0 + 1) ^ kk) << 4)) = o1;
    }
    sm90_fence_proxy_async();
  }
  /* every thread arrives: an arrival orders its own reads and writes */
  sm90_bar_arrive(&s.raw_empty[rs]);
  sm90_bar_arrive(&s.wide[i % TS_E4_STAGES]);
  return k;
}

/* E4M3: block i's group, once every consumer has widened it. */
__device__ __forceinline__ void ts_issue_wide(ts_smem &s, unsigned char *ring,
                                              const uint32_t (&af)[8][4], float (&acc)[16][4],
                                              uint32_t i) {
  sm90_bar_wait(&s.wide[i % TS_E4_STAGES], (i / TS_E4_STAGES) & 1);
  ts_mma_stage<true>(ring + (i % TS_E4_STAGES) * TS_STAGE_BYTES, af, acc);
}

template <int PENDING>
__device__ __forceinline__ void ts_finish_e4(const ts_rows &r, float (&acc)[16][4], int b,
                                             const ts_run &run, ts_blk k) {
  wg_wait<PENDING>();
  wg_pin(acc);
  ts_store_block<true>(r, acc, b, run, k.bad, k.nk);
}

/* Warps 0-7: item it's blocks through the ring (i counts the CTA's blocks
 * over all items), two accumulators in turn: block j's group is issued
 * before block j - 1 is folded. */
template <bool E4M3, uint32_t NS>
__device__ __forceinline__ void ts_consume(const tc_score_args &a, ts_smem &s, const ts_rows &r,
                                           const unsigned char *raw, unsigned char *ring,
                                           const uint32_t (&af)[8][4],
                                           float (&acc0)[16][4], float (&acc1)[16][4],
                                           const ts_item &it, uint32_t &i) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int r_lo = warp * 16 + (lane >> 2), r_hi = r_lo + 8;
  for (int p0 = 0; p0 < it.n; p0 = r.run_end[p0]) {
    int req, b0;
    const int nblk = ts_run_blocks(a, r, it, p0, req, b0), gz = a.gz;
    if (nblk == 0)
      continue;
    const int p1 = r.run_end[p0];
    const ts_run run = ts_run_of<E4M3>(a, r, it, r_lo, r_lo >= p0 && r_lo < p1, r_hi >= p0 && r_hi < p1);
    /* one group in flight at the loop head (acc0's, block j - 1), none
     * after the run: the same on every path, which ptxas needs to keep the
     * groups asynchronous */
    if (E4M3) {
      /* block j + 1 widened after block j's issue, before block j - 1's fold
       * (block 0 before its own issue) */
      ts_blk k0 = ts_widen_e4(s, raw, ring, i), k1 = k0;
      ts_issue_wide(s, ring, af, acc0, i);
      if (nblk > 1)
        k1 = ts_widen_e4(s, raw, ring, i + 1);
      int j = 1;
      for (; j + 1 < nblk; j += 2) {
        ts_issue_wide(s, ring, af, acc1, i + j);
        const ts_blk k2 = ts_widen_e4(s, raw, ring, i + j + 1);
        ts_finish_e4<1>(r, acc0, b0 + (j - 1) * gz, run, k0);
        k0 = k2;
        ts_issue_wide(s, ring, af, acc0, i + j + 1);
        const ts_blk k3 = j + 2 < nblk ? ts_widen_e4(s, raw, ring, i + j + 2) : k2;
        ts_finish_e4<1>(r, acc1, b0 + j * gz, run, k1);
        k1 = k3;
      }
      if (j < nblk) {
        ts_issue_wide(s, ring, af, acc1, i + j);
        ts_finish_e4<1>(r, acc0, b0 + (j - 1) * gz, run, k0);
        ts_finish_e4<0>(r, acc1, b0 + j * gz, run, k1);
      } else {
        ts_finish_e4<0>(r, acc0, b0 + (j - 1) * gz, run, k0);
      }
      i += (uint32_t)nblk;
      continue;
    }
    ts_issue<NS>(s, ring, af, acc0, i);
    int j = 1;
    for (; j + 1 < nblk; j += 2) {
      ts_issue<NS>(s, ring, af, acc1, i + j);
      ts_finish<1, NS>(s, r, acc0, i + j - 1, b0 + (j - 1) * gz, run);
      ts_issue<NS>(s, ring, af, acc0, i + j + 1);
      ts_finish<1, NS>(s, r, acc1, i + j, b0 + j * gz, run);
    }
    if (j < nblk) {
      ts_issue<NS>(s, ring, af, acc1, i + j);
      ts_finish<1, NS>(s, r, acc0, i + j - 1, b0 + (j - 1) * gz, run);
      ts_finish<0, NS>(s, r, acc1, i + j, b0 + j * gz, run);
    } else {
      ts_finish<0, NS>(s, r, acc0, i + j - 1, b0 + (j - 1) * gz, run);
    }
    i += (uint32_t)nblk;
  }
}

template <bool E4M3>
static __global__ void __launch_bounds__(TS_THREADS, 1)
    tc_score_ws_kernel(m3s_cuda_batch bt, tc_score_args a, const __grid_constant__ CUtensorMap map) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap(); /* launched on sm_90 devices only */
#else
  extern __shared__ __align__(16) unsigned char tc_dyn[];
  __shared__ ts_smem s;
  const uint32_t base = tc_smem_addr(tc_dyn);
  constexpr uint32_t NS = E4M3 ? TS_E4_STAGES : TS_STAGES;
  unsigned char *const ring = tc_dyn + ((1024u - (base & 1023u)) & 1023u);
  unsigned char *const raw = ring + NS * TS_STAGE_BYTES; /* e4m3 only */
  uint16_t *const qs = (uint16_t *)(raw + (E4M3 ? TS_RAW_STAGES * TS_RAW_BYTES : 0));
  const int tid = threadIdx.x, warp = tid >> 5;
  tc_zero_count(a);
  if (tid == 0) {
    for (int i = 0; i < (int)NS; i++) {
      sm90_bar_init(&s.full[i], 1); /* bf16 only: e4m3 stages are the consumers' */
      sm90_bar_init(&s.empty[i], TC_THREADS);
    }
    for (int i = 0; E4M3 && i < TS_RAW_STAGES; i++) {
      sm90_bar_init(&s.raw_full[i], 1);
      sm90_bar_init(&s.raw_empty[i], TC_THREADS); /* the consumers widen it */
    }
    for (int i = 0; E4M3 && i < TS_E4_STAGES; i++)
      sm90_bar_init(&s.wide[i], TC_THREADS);
    for (int i = 0; i < 2; i++) {
      sm90_bar_init(&s.ready[i], TS_PREP_THREADS);
      sm90_bar_init(&s.done[i], TC_THREADS + 32);
    }
    sm90_bar_init(&s.qs_free, TC_THREADS);
    sm90_fence_barrier_init();
  }
  __syncthreads();

  /* the roles, uniform over each warp for the compiler too (a divergent
   * branch around wgmma makes ptxas serialise it); the producer warpgroup
   * gives its registers up before the consumers take theirs */
  if (__shfl_sync(TC_FULL, warp / 4, 0) == TS_CONSUMERS / 4) {
    /* under PDL (the first chunk, behind tc_norm_kernel) the norms are
     * complete only after the producer's wait; the preparers read the
     * caller's inputs, so their first item overlaps the norm pass. The wait
     * comes before the register hand-off (after it, ptxas spilled): the
     * consumers' registers, and so their start, wait for it too, but they
     * would wait for the first item and its stages anyway */
    if (warp == TS_CONSUMERS)
      m3s_pdl_wait();
    ts_set_regs<TS_PRODUCER_REGS>(false);
    if (warp == TS_CONSUMERS) {
      uint32_t i = 0;
      for (int k = 0;; k++) {
        const ts_item it = ts_item_of(a, k);
        if (it.n == 0)
          break;
        sm90_bar_wait(&s.ready[k & 1], (k >> 1) & 1);
        ts_produce<E4M3>(bt, a, &map, s, s.rows[k & 1], E4M3 ? raw : ring, it, i);
        /* every thread that read the table arrives: an arrival orders its
         * own reads only */
        sm90_bar_arrive(&s.done[k & 1]);
      }
    } else {
      for (int k = 0;; k++) {
        const ts_item it = ts_item_of(a, k);
        if (it.n == 0)
          break;
        /* the row table two items back, and the query buffer, let go */
        if (k >= 2)
          sm90_bar_wait(&s.done[k & 1], ((k - 2) >> 1) & 1);
        if (k >= 1)
          sm90_bar_wait(&s.qs_free, (k - 1) & 1);
        ts_prepare<E4M3>(bt, a, s.rows[k & 1], qs, it);
        sm90_bar_arrive(&s.ready[k & 1]);
      }
    }
    return;
  }
  ts_set_regs<TS_CONSUMER_REGS>(true);

  float acc0[16][4], acc1[16][4];
#pragma unroll
  for (int j = 0; j < 16; j++)
#pragma unroll
    for (int e = 0; e < 4; e++)
      acc0[j][e] = acc1[j][e] = 0.0f;
  uint32_t i = 0;
  for (int k = 0;; k++) {
    const ts_item it = ts_item_of(a, k);
    if (it.n == 0)
      break;
    sm90_bar_wait(&s.ready[k & 1], (k >> 1) & 1);
    /* the A fragments, then the buffer is the preparers' again */
    uint32_t af[8][4];
    tc_load_afrag(qs, af);
    sm90_bar_arrive(&s.qs_free);
    ts_consume<E4M3, NS>(a, s, s.rows[k & 1], raw, ring, af, acc0, acc1, it, i);
    sm90_bar_arrive(&s.done[k & 1]);
  }
#endif
}

/* ---------------------------------------------------------------------------
 * Kernel 2: certified selection (the per-pair code in topk_select.cuh)
 * ------------------------------------------------------------------------- */

/* One pair per warp, TC_SEL_WARPS pairs per CTA (batches with many pairs):
 * each warp stages and classifies its pair (tc_select_classify), the CTA
 * shares the re-scores (tc_cta_rescore), then each warp finishes its pair. */
static __global__ void __launch_bounds__(TC_SEL_WARPS * 32, TC_SEL_CTAS_PER_SM)
    tc_select_kernel(m3s_cuda_batch bt, tc_select_args a) {
  __shared__ tc_warp_shared sh[TC_SEL_WARPS];
  __shared__ tc_pair_shared ps[TC_SEL_WARPS];
  /* a warp's entries, then its staged keys in the shared re-scores */
  __shared__ __align__(16) float2 wsh[TC_SEL_WARPS][TC_SEL_CACHE];
  static_assert(TC_SEL_CACHE * sizeof(float2) >= TC_STAGE_CHUNKS * sizeof(uint4), "staging room");
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  tc_warp_shared &sm = sh[warp];
  /* CTA-uniform trips: the barriers below need every warp */
  for (int64_t base = (int64_t)blockIdx.x * TC_SEL_WARPS; base < a.npairs;
       base += (int64_t)gridDim.x * TC_SEL_WARPS) {
    const int64_t lp = base + warp;
    tc_sel_state st = {0, 0, 0, 1};
    m3s_row_info ri;
    int32_t *out = NULL;
    int64_t nb = 0;
    float2 *W = NULL;
    if (lp < a.npairs)
      nb = tc_pair_row(bt, a, lp, ri, out);
    if (lp < a.npairs && nb <= a.topk) {
      tc_write_all(a, nb, out);
    } else if (lp < a.npairs) {
      st = tc_stage_classify(bt, a, lp, ri, nb, sm, wsh[warp], W);
      /* the pages of the uncertain blocks start towards L2 before the barrier */
      if (!st.done && lane < st.nq && !a.no_rescore)
        tc_prefetch_block(bt, a, ri.r, sm.qlist[lane]);
    }
    tc_cta_share(bt, a, sh, ps, st, ri, W, (uint4 *)wsh[warp]);
    if (out && nb > a.topk)
      tc_select_finish(a, st, sm.sel, sm.qlist, sm.qsc, out);
    /* not needed for order (the next trip's first barrier follows every
     * cross-warp read), but it ends the trip's live ranges: without it
     * ptxas spills 100 bytes instead of 84 */
    __syncthreads();
  }
}

/* Phase 2 for chunks whose pairs have at most 32 R candidates (contexts up
 * to 32 R + init + local blocks), a warp per pair: each lane keeps its R
 * entries in registers (shared memory: tc_filter_ranks' 32 words per warp,
 * and tc_reg_few's room). It decides the pairs with no
 * uncertain block; the others (an uncertain or whole-line block, short
 * requests scored exactly, the measure hook, no candidate slots) are
 * appended to the deferred list (a.list: count, then pair indices; the
 * count zeroed by the chunk's score kernel) for tc_select_deferred_kernel,
 * so this kernel carries neither the exact re-scoring nor the per-pair
 * code, and fits TC_REG_CTAS(R) CTAs per SM. With a.pdl it lets the
 * deferred kernel launch at once (allowed: its whole grid is resident).
 * For R >= 8 (129-512 candidates) a pair's entries are read after its row
 * lookup, only its own candidates, and ranked on the fewest slots that hold
 * them (tc_reg_classify_n): at the 64K prompt a pair has 0-512 candidates,
 * and reading and ranking all 512 slots measured 3% slower (H100). FEW
 * (R >= 2): 1 pairs by tc_reg_few first (one compaction of the candidates
 * not surely out instead of a class and output pass over every slot: H100
 * top-k 32K / 64K / ragged 8 x 2K -3.1 / -2.5 / -3.7%), the slot path for
 * what it declines; 2 (with stats: tests) also decides each pair
 * tc_reg_few took by the slot path and counts where the two disagree
 * (reg_few_wrong). */
template <int R, int FEW = 0>
static __global__ void __launch_bounds__(TC_SEL_WARPS * 32, TC_REG_CTAS(R))
    tc_select_reg_kernel(m3s_cuda_batch bt, tc_select_args a) {
  __shared__ uint32_t room[TC_SEL_WARPS][32]; /* tc_filter_ranks' values */
  __shared__ tc_few_room few_room[TC_SEL_WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (a.pdl)
    m3s_pdl_trigger();
  for (int64_t lp = (int64_t)blockIdx.x * TC_SEL_WARPS + warp; lp < a.npairs;
       lp += (int64_t)gridDim.x * TC_SEL_WARPS) {
    float2 e[R];
    /* R >= 8: only the pair's own candidates, known after the lookup */
    if constexpr (R < 8)
      tc_reg_load<R>(a, lp, a.max_nb - a.init, e);
    m3s_row_info ri;
    int32_t *out;
    const int64_t nb = tc_pair_row(bt, a, lp, ri, out);
    if (nb <= a.topk) {
      tc_write_all(a, nb, out);
      continue;
    }
    const int n = (int)(nb - a.local - a.init);
    if constexpr (R >= 8)
      tc_reg_load<R>(a, lp, n, e);
    const bool covers = tc_reg_covers<R>(a, ri, nb);
    /* tc_reg_few: 0 decided, 1 deferred, -1 the slot path below */
    int few = -1;
    if constexpr (FEW > 0)
      if (covers)
        few = tc_reg_few_n<R>(a, nb, n, e, few_room[warp], out);
    int cls[R], n_in;
    if constexpr (FEW == 2)
      if (few >= 0 && (tc_reg_classify_n<R>(a, n, e, cls, n_in, room[warp]) == 0) != (few == 0) &&
          lane == 0)
        atomicAdd(&a.stats->reg_few_wrong, 1u);
    if (few == 0)
      continue;
    if (few < 0 && covers && tc_reg_classify_n<R>(a, n, e, cls, n_in, room[warp]) == 0)
      tc_reg_write<R>(a, nb, n, 0, cls, NULL, out);
    else if (lane == 0)
      a.list[1 + atomicAdd(a.list, 1)] = (int32_t)lp;
  }
}

/* The pairs tc_select_reg_kernel deferred (at most ~12% of a random 8K
 * prompt's pairs, mostly with two uncertain blocks), a warp per pair in the
 * register path, or by tc_select_one (more than 32 uncertain blocks, short
 * requests scored exactly, the measure hook). List entry k goes to CTA k %
 * grid, warp k / grid, so a list no longer than the grid puts one pair on
 * each CTA, and the CTA's warps share its pairs' re-scores a quarter block
 * each (tc_cta_rescore, as in tc_select_kernel): a pair's two or so
 * uncertain blocks take about two memory round trips instead of eight on
 * its own warp. */
template <int R>
static __global__ void __launch_bounds__(TC_SEL_WARPS * 32, TC_SEL_CTAS_PER_SM)
    tc_select_deferred_kernel(m3s_cuda_batch bt, tc_select_args a) {
  __shared__ tc_warp_shared sh[TC_SEL_WARPS];
  __shared__ tc_pair_shared ps[TC_SEL_WARPS];
  __shared__ unsigned char chsh[TC_SEL_WARPS][32 * R];
  /* a warp's entries in tc_select_one, or its keys staged in the shared
   * re-scores, never both at once */
  __shared__ union {
    float2 w[32 * R];
    uint4 keys[TC_STAGE_CHUNKS];
  } scr[TC_SEL_WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  tc_warp_shared &sm = sh[warp];
  /* launched under PDL: resident while the register kernel runs; the list
   * is complete once its grid has ended */
  m3s_pdl_wait();
  const int count = __ldcg(a.list);
  /* CTA-uniform trips: the barriers below need every warp */
  for (int base = 0; base < count; base += (int)gridDim.x * TC_SEL_WARPS) {
    const int k = base + warp * (int)gridDim.x + (int)blockIdx.x;
    tc_sel_state st = {0, 0, 0, 1};
    int64_t lp = 0, nb = 0;
    m3s_row_info ri;
    int32_t *out = NULL;
    int n = 0, cls[R], n_in = 0, nq = 33;
    if (k < count) {
      lp = __ldcg(a.list + 1 + k);
      /* the entries and the query first, as in tc_select_reg_kernel */
      float2 e[R];
      uint16_t qv[4];
      tc_reg_load<R>(a, lp, a.max_nb - a.init, e);
      static_assert(M3S_INDEX_DIM == 4 * 32, "four query elements per lane");
      const uint16_t *iq = tc_query_of(a, lp);
#pragma unroll
      for (int m = 0; m < 4; m++)
        qv[m] = iq[lane + 32 * m];
      nb = tc_pair_row(bt, a, lp, ri, out);
      n = (int)(nb - a.local - a.init);
      if (tc_reg_covers<R>(a, ri, nb))
        nq = tc_reg_classify<R>(a, n, e, cls, n_in, NULL);
      if (nq > 32) {
        tc_select_one(bt, a, lp, ri, nb, out, sm, nb - a.local <= 32 * R ? scr[warp].w : NULL);
      } else if (nq > 0) {
        tc_reg_list<R>(a, cls, qv, sm);
        __syncwarp(); /* the list */
        /* the pages of the uncertain blocks start towards L2 before the barrier */
        if (lane < nq && !a.no_rescore)
          tc_prefetch_block(bt, a, ri.r, sm.qlist[lane]);
        st.nq = nq;
        st.done = 0;
      }
    }
    tc_cta_share(bt, a, sh, ps, st, ri, a.ws + lp * a.max_nb, scr[warp].keys);
    if (k < count && nq <= 32) {
      if (nq > 0)
        tc_reg_choose(a, nq, n_in, sm, chsh[warp]);
      tc_reg_write<R>(a, nb, n, nq, cls, chsh[warp], out);
    }
    /* the next trip's first writes to sh / ps follow every read of this one */
    __syncthreads();
  }
}

/* MINB: CTAs per SM the registers must allow (1: batches of at most one
 * pair per SM, 151 registers; 2: the decode batches of more pairs that
 * tc_launch_select gives it, 126 registers, no spills; 3 or 4 spilled 848 or 2564 bytes) */
template <int MINB>
static __global__ void __launch_bounds__(TC_WIDE_THREADS, MINB)
    tc_select_wide_kernel(m3s_cuda_batch bt, tc_select_args a) {
  __shared__ tc_wide_shared sm;
  __shared__ float2 wsh[TC_SEL_CACHE];
  const int tid = threadIdx.x, warp = tid >> 5;
  /* The first pair's row and query are the caller's inputs: read before the
   * grid-dependency wait. With PDL this grid starts early only behind the
   * decode score kernel of the same call (m3s_topk_tc, all_scored), which
   * let it start after its own wait, when every earlier kernel had ended
   * (launch.h); without PDL the wait is a no-op. The (S~, E) entries and the
   * writes of out come after the wait. With one CTA per SM the attention
   * may start behind this grid; either way it waits for this grid's end. */
  int64_t lp = blockIdx.x;
  m3s_row_info ri;
  int32_t *out = NULL;
  int64_t nb = lp < a.npairs ? tc_pair_row(bt, a, lp, ri, out) : 0;
  if (lp < a.npairs && nb > a.topk)
    tc_stage_query(a, lp, sm.q, tid, TC_WIDE_THREADS);
  m3s_pdl_wait();
  if (a.pdl)
    m3s_pdl_trigger();
  for (; lp < a.npairs; lp += gridDim.x) {
    if (lp != (int64_t)blockIdx.x) {
      nb = tc_pair_row(bt, a, lp, ri, out);
      if (nb > a.topk)
        tc_stage_query(a, lp, sm.q, tid, TC_WIDE_THREADS);
    }
    if (nb <= a.topk) { /* uniform over the CTA */
      if (warp == 0)
        tc_write_all(a, nb, out);
      continue;
    }
    const int exact = !a.all_scored && ri.n < TC_MIN_ROWS;
    const float2 *W = a.ws + lp * a.max_nb;
    if (nb - a.local <= TC_SEL_CACHE && !exact) {
      tc_copy_entries(a, W, nb, wsh, tid, TC_WIDE_THREADS);
      W = wsh;
    }
    for (int k = tid; k < a.init; k += TC_WIDE_THREADS)
      sm.sel[k] = k;
    for (int k = tid; k < a.local; k += TC_WIDE_THREADS)
      sm.sel[a.init + k] = (int32_t)(nb - a.local + k);
    if (tid == 0) {
      sm.cnt[0] = sm.cnt[1] = 0;
      sm.n_inf = 0;
      sm.e_max = 0;
    }
    __syncthreads(); /* q, the entries, the forced blocks and the counters */
    const int per_warp = exact || a.measure || a.topk - a.init - a.local <= 0;
    tc_sel_state st = {0, 0, 0, -1};
    if (!per_warp)
      st = tc_wide_classify_rescore(bt, a, W, ri, nb, sm);
    if (st.done < 0) {
      /* the per-warp phases: warp 0 classifies (and finishes more than 32
       * uncertain blocks itself), the warps share the re-scores */
      if (warp == 0) {
        st = tc_select_classify(bt, a, (float2 *)W, ri.r, ri.pos, nb, exact, sm.q, sm.sel,
                                sm.qlist, sm.cnt);
        if ((tid & 31) == 0)
          sm.st = st;
      }
      __syncthreads(); /* the state and the list */
      st = sm.st;
      if (!st.done)
        tc_select_rescore(bt, a, W, ri.r, ri.pos, sm.q, sm.qlist, st.nq, warp, TC_WIDE_WARPS,
                          sm.qsc);
      __syncthreads(); /* the scores */
    }
    if (warp == 0)
      tc_select_finish(a, st, sm.sel, sm.qlist, sm.qsc, out);
    __syncthreads(); /* the shared arrays are reused by the next pair */
  }
}

/* ---------------------------------------------------------------------------
 * Host entry
 * ------------------------------------------------------------------------- */

/* Raises the dynamic shared-memory limit of the score kernels; called once
 * per context by context.cu (cudaFuncSetAttribute allocates host memory
 * inside the CUDA runtime, and run calls allocate nothing). */
extern "C" cudaError_t m3s_topk_tc_prepare(void) {
  void (*k[2])(m3s_cuda_batch, tc_score_args) = {tc_score_kernel<false>, tc_score_kernel<true>};
  for (int i = 0; i < 2; i++) {
    cudaError_t err =
        cudaFuncSetAttribute(k[i], cudaFuncAttributeMaxDynamicSharedMemorySize, TC_SMEM_BYTES);
    if (err != cudaSuccess)
      return err;
  }
  cudaError_t err = cudaFuncSetAttribute(tc_score_ws_kernel<false>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         TS_SMEM_BYTES(false));
  if (err != cudaSuccess)
    return err;
  return cudaFuncSetAttribute(tc_score_ws_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              TS_SMEM_BYTES(true));
}

extern "C" int m3s_topk_tc_ws_fits(void) {
  cudaFuncAttributes fa[2];
  return cudaFuncGetAttributes(&fa[0], tc_score_ws_kernel<false>) == cudaSuccess &&
         cudaFuncGetAttributes(&fa[1], tc_score_ws_kernel<true>) == cudaSuccess &&
         fa[0].numRegs * TS_THREADS >= 4 * 32 * TS_PRODUCER_REGS + TC_THREADS * TS_CONSUMER_REGS &&
         fa[1].numRegs * TS_THREADS >= 4 * 32 * TS_PRODUCER_REGS + TC_THREADS * TS_CONSUMER_REGS;
}

/* The tensor map of the index cache for tc_score_ws_kernel: the cache as
 * [P * 128 keys][128 dims], 128-byte swizzle, boxes of 64 dims x 128 keys
 * (bf16) or of 128 codes x 128 keys (e4m3: one box per page). 0 when the
 * TMA kernel does not apply (not an sm_90 device, no encoder, the mma_sync
 * hook, key rows beyond the int32 coordinates, a build whose kernels lack
 * the registers of their hand-off: m3s_topk_tc_ws_fits). */
static int tc_tma_map(const m3s_context *ctx, const m3s_tensor *index_cache,
                      const m3s_topk_tc_hooks &hooks, CUtensorMap *map) {
  PFN_cuTensorMapEncodeTiled_v12000 enc =
      (PFN_cuTensorMapEncodeTiled_v12000)m3s_cuda_tmap_encoder(ctx);
  const int64_t keys = index_cache->shape[0] * M3S_BLOCK_SIZE;
  const int e4m3 = index_cache->dtype == M3S_E4M3;
  if (hooks.mma_sync || !enc || m3s_cuda_sm_major(ctx) != 9 || !m3s_cuda_score_ws(ctx) ||
      (index_cache->dtype != M3S_BF16 && !e4m3) || keys > INT32_MAX)
    return 0;
  cuuint64_t dims[2] = {M3S_INDEX_DIM, (cuuint64_t)keys};
  cuuint64_t strides[1] = {M3S_INDEX_DIM * (e4m3 ? 1u : 2u)};
  cuuint32_t box[2] = {e4m3 ? 128u : 64u, M3S_BLOCK_SIZE}, step[2] = {1, 1};
  return enc(map, e4m3 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2,
             index_cache->data, dims, strides, box, step,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

/* The register selection of a chunk (at most 32 R candidates per pair; the
 * deferred count zeroed by the score kernel before it):
 * tc_select_reg_kernel<R> in one resident wave, then
 * tc_select_deferred_kernel<R> in one over what it listed, under PDL where
 * pdl says: its launch no longer waits for the register kernel's end, only
 * its CTAs do (in griddepcontrol.wait), taking SMs as register CTAs retire
 * (a full wave of reg<2> or reg<4> leaves no room beside it). */
template <int R>
static m3s_status tc_launch_reg(int64_t sms, const m3s_cuda_batch &cb, const tc_select_args &se,
                                int pdl, cudaStream_t stream, const char *fn) {
  const int64_t ctas = (se.npairs + TC_SEL_WARPS - 1) / TC_SEL_WARPS,
                wave = sms * TC_REG_CTAS(R);
  tc_select_args sr = se;
  sr.pdl = pdl;
  /* tc_reg_few from R 2 on (its checking form under stats), only the
   * forms launched instantiated */
  void (*reg)(m3s_cuda_batch, tc_select_args);
  if constexpr (R < 2)
    reg = tc_select_reg_kernel<R>;
  else
    reg = se.stats ? tc_select_reg_kernel<R, 2> : tc_select_reg_kernel<R, 1>;
  reg<<<(unsigned)(ctas < wave ? ctas : wave), TC_SEL_WARPS * 32, 0, stream>>>(cb, sr);
  m3s_status st = m3s_cuda_check_launch(fn, "tc_select_reg_kernel");
  if (st)
    return st;
  return m3s_launch(pdl, tc_select_deferred_kernel<R>, dim3((unsigned)(sms * TC_SEL_CTAS_PER_SM)),
                    dim3(TC_SEL_WARPS * 32), 0, stream, fn, "tc_select_deferred_kernel", cb, se);
}

/* Phase 2 over se.npairs (row, head) pairs from se.row0: a CTA per pair when
 * there are no more pairs than SMs, or for decode batches of at most two pairs
 * per SM or of many candidates at up to four (host bounds only); else a warp
 * per pair. rounds: the rounds kernel wherever the register selection would
 * run. */
static m3s_status tc_launch_select(const m3s_context *ctx, const m3s_cuda_batch &cb,
                                   const tc_select_args &se, int rounds, cudaStream_t stream,
                                   const char *fn) {
  const int64_t sms = m3s_cuda_num_sms(ctx);
  /* candidates per pair at most: the blocks of max_seq_len less the forced */
  const int64_t cand = se.max_nb - se.init - se.local;
  /* a CTA per pair: at one CTA per SM for no more pairs than SMs; at two for
   * decode pairs of many candidates or few enough pairs for one wave, where
   * it ranks faster than a warp per pair (H100: 128 x 128K e4m3, ncu 35 ->
   * 21 us; 64 x 32K top-k 198.6 -> 192.0 us); more pairs of fewer candidates
   * keep the warp per pair, all resident in one wave (128 x 32K q_len 4: the
   * CTA-wide kernel 4% slower). The candidate bound is max_seq_len's, so a
   * skewed batch (one long request among short ones) takes the CTA-wide
   * kernel for every pair; at up to four pairs per SM that still won (H100,
   * 64 / 128 requests x 128K skewed 32x, q_len 1: 0.83 / 0.88), at 16 it lost
   * (128 requests q_len 4: 1.15), so the rule stops at four. */
  const bool one = se.npairs <= sms;
  const bool two = !one && se.all_scored && se.npairs <= INT32_MAX &&
                   ((cand >= TC_WIDE_MANY_CAND && se.npairs <= TC_WIDE_MANY_PER_SM * sms) ||
                    se.npairs <= 2 * sms);
  if (one || two) {
    tc_select_args sw = se;
    /* PDL here is for the decode chain (launch.h); a prefill chunk's
     * selection follows a plainly launched score kernel */
    sw.pdl = se.all_scored ? m3s_cuda_pdl(ctx, cb.num_reqs) : 0;
    return m3s_launch(sw.pdl, one ? tc_select_wide_kernel<1> : tc_select_wide_kernel<2>,
                      dim3((unsigned)se.npairs), dim3(TC_WIDE_THREADS), 0, stream, fn,
                      "tc_select_wide_kernel", cb, sw);
  }
  /* decode batches (every row scored) keep the rounds kernel (the register
   * selection and its deferred kernel measured 2-4% slower on them, H100:
   * 64 x 32K q_len 4, 128 x 32K q_len 1 and 4, PDL off by the context's
   * rule); prefill chunks of up to 512 candidates per pair (64K of context)
   * take the register selection, its two kernels chained under PDL where the
   * context's rule says. Beyond 128 (R 8, 16) its thresholds come from tc_ranked_pair, not
   * a sort of the warp's 32 R values; the rounds kernel it replaces there
   * read a pair's entries three times or more from memory and ranked them
   * by W + 1 rounds of a 64-bit warp maximum */
  const int pdl = m3s_cuda_pdl(ctx, cb.num_reqs);
  const int r = rounds || se.all_scored ? 0
                : cand <= 32                ? 1
                : cand <= 64                ? 2
                : cand <= 128               ? 4
                : cand <= 256               ? 8
                : cand <= 512               ? 16
                                            : 0;
  switch (r) {
  case 1: return tc_launch_reg<1>(sms, cb, se, pdl, stream, fn);
  case 2: return tc_launch_reg<2>(sms, cb, se, pdl, stream, fn);
  case 4: return tc_launch_reg<4>(sms, cb, se, pdl, stream, fn);
  case 8: return tc_launch_reg<8>(sms, cb, se, pdl, stream, fn);
  case 16: return tc_launch_reg<16>(sms, cb, se, pdl, stream, fn);
  default: break;
  }
  /* a CTA per 4 pairs (one resident wave looping measured 1-4% slower
   * here: 8K 297 -> 309 us, 32K 2259 -> 2285) */
  const int64_t ctas = (se.npairs + TC_SEL_WARPS - 1) / TC_SEL_WARPS;
  tc_select_kernel<<<(unsigned)(ctas < INT32_MAX ? ctas : INT32_MAX), TC_SEL_WARPS * 32, 0,
                     stream>>>(cb, se);
  return m3s_cuda_check_launch(fn, "tc_select_kernel");
}

extern "C" m3s_status m3s_topk_tc_run(m3s_context *ctx, const m3s_layer_config *cfg,
                                      const m3s_batch *batch, const m3s_tensor *iq,
                                      const m3s_tensor *index_cache, m3s_tensor *topk,
                                      const m3s_exec *exec) {
  const char *fn = "m3s_index_topk";
  tc_plan plan = tc_plan_of(cfg, batch->num_tokens, batch->max_seq_len);
  const m3s_topk_tc_hooks hooks = m3s_cuda_topk_hooks(ctx);
  /* shorter chunks by the hook (a decode batch is one chunk: its deferred
   * list holds every pair) */
  if (batch->uniform_q_len == 0 && hooks.chunk_rows > 0 && hooks.chunk_rows < plan.chunk_rows)
    plan.chunk_rows = hooks.chunk_rows;
  const int hkv = cfg->num_kv_heads;
  size_t need = tc_plan_bytes(&plan, hkv);
  if (!exec || !exec->workspace || exec->workspace_bytes < need)
    return m3s_fail(M3S_ERR_WORKSPACE, fn, "the CUDA top-k needs %zu bytes of workspace", need);
  cudaStream_t stream = (cudaStream_t)exec->stream;
  m3s_cuda_batch cb = m3s_cuda_batch_of(batch);
  const int e4m3 = index_cache->dtype == M3S_E4M3;
  void (*score)(m3s_cuda_batch, tc_score_args) =
      e4m3 ? tc_score_kernel<true> : tc_score_kernel<false>;
  tc_score_args sa;
  sa.iq = (const uint16_t *)iq->data;
  sa.iq_s0 = iq->stride[0];
  sa.iq_s1 = iq->stride[1];
  sa.ic = index_cache->data;
  sa.num_pages = index_cache->shape[0];
  sa.ws = (float2 *)exec->workspace;
  sa.max_nb = plan.max_nb;
  sa.hkv = hkv;
  sa.topk = cfg->topk;
  sa.init = cfg->init_blocks;
  sa.local = cfg->local_blocks;
  sa.norms = NULL;
  sa.gz = 1;
  sa.pdl = 0;

  tc_select_args se;
  se.ws = sa.ws;
  se.max_nb = plan.max_nb;
  se.iq = sa.iq;
  se.iq_s0 = sa.iq_s0;
  se.iq_s1 = sa.iq_s1;
  se.ic = sa.ic;
  se.e4m3 = e4m3;
  se.num_pages = sa.num_pages;
  se.out = (int32_t *)topk->data;
  se.o_s0 = topk->stride[0];
  se.o_s1 = topk->stride[1];
  se.o_s2 = topk->stride[2];
  se.hkv = hkv;
  se.topk = cfg->topk;
  se.init = cfg->init_blocks;
  se.local = cfg->local_blocks;
  se.no_rescore = hooks.no_rescore;
  se.measure = hooks.measure;
  se.stats = hooks.stats;
  se.all_scored = 0;
  se.min_rows = TC_MIN_ROWS;
  se.pdl = 0; /* set for the launches that take it (tc_launch_select) */
  se.list = (int32_t *)((unsigned char *)exec->workspace + need - tc_list_bytes(plan.chunk_rows, hkv));
  sa.count = se.list;
  sa.chunks = hooks.stats ? &hooks.stats->chunks : NULL;
  sa.ws_chunks = NULL; /* set with the norm table: tc_score_ws_kernel's chunks only */

  if (batch->uniform_q_len > 0) {
    /* Decode (one chunk, m3s_topk_tc_eligible): (S~, E) streamed by the
     * certified kernel of topk_decode.cu, then the same selection. */
    m3s_status st = m3s_cuda_topk_decode_tc_scores(ctx, cfg, batch, iq, index_cache, sa.ws,
                                                   plan.max_nb, hooks.mma_sync, hooks.stats,
                                                   stream);
    if (st)
      return st;
    se.row0 = 0;
    se.npairs = plan.rows * hkv;
    se.all_scored = 1;
    return tc_launch_select(ctx, cb, se, hooks.rounds_select, stream, fn);
  }

  const int64_t sms = m3s_cuda_num_sms(ctx);
  /* the TMA kernel reads its key norms from a table after the (S~, E)
   * entries: only with room for it in the budget and the workspace given,
   * and a grid for the pre-pass; else the mma.sync kernel */
  CUtensorMap map;
  const size_t norm_bytes = tc_norm_bytes(&plan);
  const int64_t norm_gy = (plan.max_nb + TC_NORM_BLOCKS - 1) / TC_NORM_BLOCKS;
  const int tma = norm_bytes <= (size_t)TC_NORM_BUDGET && exec->workspace_bytes >= need + norm_bytes &&
                  norm_gy <= 65535 && batch->num_reqs > 0 &&
                  tc_tma_map(ctx, index_cache, hooks, &map);
  const int pdl = m3s_cuda_pdl(ctx, batch->num_reqs);
  if (tma) {
    sa.norms = (float *)((unsigned char *)exec->workspace + need);
    sa.ws_chunks = hooks.stats ? &hooks.stats->ws_chunks : NULL;
    sa.pdl = pdl;
    const dim3 ngrid((unsigned)batch->num_reqs, (unsigned)norm_gy);
    if (e4m3)
      tc_norm_kernel<true><<<ngrid, TC_THREADS, 0, stream>>>(cb, sa);
    else
      tc_norm_kernel<false><<<ngrid, TC_THREADS, 0, stream>>>(cb, sa);
    m3s_status st = m3s_cuda_check_launch(fn, "tc_norm_kernel");
    if (st)
      return st;
  }
  for (int64_t row0 = 0; row0 < plan.rows; row0 += plan.chunk_rows) {
    int64_t n = plan.rows - row0 < plan.chunk_rows ? plan.rows - row0 : plan.chunk_rows;
    sa.row0 = se.row0 = row0;
    sa.nrows = n;
    se.npairs = n * hkv;
    /* Phase 1: (S~, E) of the chunk. About 4 CTAs per SM in all (2
     * resident) for the mma.sync kernel, each taking every gy-th candidate
     * block of its tile; for the warp-specialised one about TS_WAVES items
     * (tile, head, every gy-th block) per SM, run by one CTA per SM. */
    int64_t tiles = (n + TC_ROWS - 1) / TC_ROWS;
    const int64_t waves = !tma ? 4 : hooks.score_waves > 0 ? hooks.score_waves : TS_WAVES;
    int64_t gy = (waves * sms + tiles * hkv - 1) / (tiles * hkv);
    gy = gy < 1 ? 1 : gy;
    gy = gy < plan.max_nb ? gy : plan.max_nb;
    gy = gy < 65535 ? gy : 65535;
    if (tiles > INT32_MAX || hkv > 65535)
      return m3s_fail(M3S_ERR_UNSUPPORTED, fn, "%lld row tiles x %d heads exceed the grid limit",
                      (long long)tiles, hkv);
    dim3 grid((unsigned)tiles, (unsigned)hkv, (unsigned)gy);
    sa.gz = (int)gy;
    /* the persistent kernel: one CTA per SM, at most one per item */
    const int64_t items = tiles * hkv * gy;
    m3s_status st;
    if (tma) {
      /* the first chunk's under PDL behind the norm pass; later chunks'
       * follow the previous selection plainly */
      st = m3s_launch(pdl && row0 == 0, e4m3 ? tc_score_ws_kernel<true> : tc_score_ws_kernel<false>,
                      dim3((unsigned)(items < sms ? items : sms)), dim3(TS_THREADS),
                      TS_SMEM_BYTES(e4m3), stream, fn, "tc_score_ws_kernel", cb, sa, map);
    } else {
      score<<<grid, TC_THREADS, TC_SMEM_BYTES, stream>>>(cb, sa);
      st = m3s_cuda_check_launch(fn, "tc_score_kernel");
    }
    if (st)
      return st;
    /* Phase 2: certified selection and output rows */
    st = tc_launch_select(ctx, cb, se, hooks.rounds_select, stream, fn);
    if (st)
      return st;
  }
  return M3S_OK;
}
