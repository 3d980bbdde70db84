/* CUDA backend: block-sparse GQA attention (SPEC section 4) on tensor cores.
 *
 * What the kernels do
 *  - attn_kernel<F16>: F16 picks the mma dtype: f16 when q or a 16-bit cache
 *    is f16 (bf16 converts to f16 exactly within f16's range, not the other
 *    way round, so K keeps every bit and the fp32 scores and lse stay
 *    accurate), else bf16; an fp8 cache keeps q's dtype. One CTA (4 warps,
 *    128 threads) per (query row t, KV
 *    head g, chunk c of 16 query heads of g, split s). The G heads of g form
 *    the M = 16 dimension of mma.sync m16n8k16 (rows >= G are zero padding;
 *    G > 16 takes ceil(G/16) chunks, each its own CTA), so a CTA reads each
 *    selected K/V block once for all its heads.
 *      1. Selection: the first min(K, nb) top-k entries of (t, g) are read;
 *         -1, ids outside [0, nb), blocks another context-parallel rank owns
 *         (batch.cp: the others are read at their rank-local columns) and
 *         blocks whose page id is out of range are dropped; the rest are
 *         sorted ascending (rank sort), so the result does not depend on the
 *         order of the ids in the row.
 *      2. Split s takes sorted positions [s*per, (s+1)*per) with
 *         per = ceil(n / nsplit) (n valid blocks).
 *      3. Streaming: warp w owns keys [32w, 32w+32) of every block, in two
 *         "units" of 16 keys. Units beyond pos are skipped. Each warp runs
 *         its own two-stage cp.async pipeline over its units (no CTA-wide
 *         barrier in the loop): the unit's 16 K/V rows (256 elements each)
 *         land in a per-warp stage of shared memory (XOR-swizzled 16-byte
 *         chunks, conflict-free ldmatrix); keys after pos are zero-filled.
 *         fp8 caches land as bytes and are converted in place: K to the
 *         mma dtype unscaled (exact), V times its scalar or per-(head, slot)
 *         scale (RNE); a bf16 cache under f16 q is converted to f16 in place
 *         (bf16 q under an f16 cache is converted once, in registers).
 *         S = Q K^T (ldmatrix, 16 mma) in fp32, times the k scale (scalar,
 *         or per key from the stage), masked, online softmax in fp32
 *         registers (exp2 domain), P packed to bf16/f16, O += P V
 *         (ldmatrix.trans, 16 mma). Accumulation is fp32 throughout.
 *      4. The four warp states (m, l, acc) are merged in fixed order 0..3
 *         through shared memory; nsplit == 1 writes out (q's dtype, RNE) and
 *         lse (natural log); nsplit > 1 writes the partial (m, l, acc) to
 *         the workspace.
 *  - merge_kernel: one warp per (t, h); merges the nsplit partials in split
 *    order 0..nsplit-1 (deterministic; no atomics anywhere).
 *  Rows with no key (padded requests, empty selections) give out = 0 and
 *  lse = -inf, never NaN.
 *
 * Launch shapes
 *  - attn_kernel: grid (T * Hkv * ceil(G/16), nsplit), 128 threads, x taken
 *    head-major (x = (g * T + t) * chunks + chunk): the CTAs in flight then
 *    read one KV head's blocks, so a long prompt's working set stays in L2
 *    (token-major, a 64K prompt's four heads are 128 MiB: ncu, H200, L2 hit
 *    rate 50% -> 96%, DRAM reads 101 -> 6 GB; m3s-bench 40.7 -> 36.3 ms). Dynamic
 *    shared memory 4 warps x 2 stages x (8 KiB tile + 128 B scales) = 65 KiB
 *    (limit raised once per context, at creation), plus ~1.5 KiB static.
 *  - merge_kernel (only when nsplit > 1): grid ceil(T * Hq / 4), 128 threads.
 *  nsplit comes from host bounds only (batch->num_tokens, cfg, the SM count,
 *  min(K, ceil(max_seq_len / 128))): when T * Hkv * chunks < 2 * SMs, the
 *  selected blocks are split so that about 2 * SMs CTAs run. Under
 *  M3S_OPT_BATCH_INVARIANT nsplit is always 1.
 *
 * Workspace (only when nsplit > 1), 256-byte aligned parts:
 *   part_o  f32 [T][Hq][nsplit][128]  unnormalised acc, relative to m
 *   part_ml f32 [T][Hq][nsplit][2]    (m in log2 units, l)
 *  m3s_cuda_attention_workspace reports the largest need of any batch of at
 *  most max_tokens rows (the need is not monotonic in T).
 *
 * Which kernel (m3s_attention_tma_plan): on an sm_90 device, batches with
 * one query row per request (max_q_len 1) and a cache of q's dtype or fp8 go
 * to the persistent TMA kernel (sm90/attention_tma.cu: same items, same
 * merge kernel and workspace layout, its own split plan plan_split_tma; for
 * batches whose items take at most half the SMs, plan_split_cluster instead:
 * the splits of an item run as one thread-block cluster and merge there, no
 * merge kernel, no workspace);
 * batches with several rows per request, a cache of q's dtype or fp8 (up to
 * 32K / 16K of context) and enough rows go to the union kernel (sm90/attention_union.cu: no split, no
 * workspace); everything else, and every batch under
 * M3S_OPT_BATCH_INVARIANT, runs attn_kernel here.
 *
 * Graph-safe: no allocation, no synchronisation, no host read of device data,
 * launches only on exec->stream (stream 0 when exec is NULL).
 *
 * Measured (H200, ncu, 2001c4d, 128 decode requests x 32K, TP1 bf16): 151.6
 * us at 72% of DRAM bandwidth; 48% of the warp stalls wait on the next
 * unit's cp.async, and the 512 CTAs fill 1.29 waves of 396 slots
 * (docs/perf-notes.md, "Decode attention: where the generic kernel loses"). */
#include "attention.cuh"
#include "launch.h"
#include "sm90/attention_tma.h"

#include <string.h>

#define ATT_WARPS 4
#define ATT_THREADS (ATT_WARPS * 32)
#define UNIT_KEYS 16                          /* keys per pipeline unit */
#define ROW_BYTES 512                         /* 256 16-bit elements: K | V */
#define TILE_BYTES (UNIT_KEYS * ROW_BYTES)    /* 8 KiB */
#define FP8_RAW_OFF (TILE_BYTES / 2)          /* fp8 bytes land in the upper half */
#define SCALE_BYTES 128                       /* 16 k scales, 16 v scales */
#define STAGE_BYTES (TILE_BYTES + SCALE_BYTES)
#define WARP_BYTES (2 * STAGE_BYTES)
#define ATT_SMEM (ATT_WARPS * WARP_BYTES)     /* 66560 */
typedef struct {
  int raw_id[M3S_MAX_TOPK];
  int id[M3S_MAX_TOPK];
  int64_t raw_page[M3S_MAX_TOPK];
  int64_t page[M3S_MAX_TOPK];
  int n;
} cta_selection;

/* ---- PTX wrappers ------------------------------------------------------ */

static __device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

static __device__ __forceinline__ void cp_async4(uint32_t dst, const void *src, int src_bytes) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes)
               : "memory");
}

static __device__ __forceinline__ void cp_async_commit(void) {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

static __device__ __forceinline__ void cp_async_wait_prev(void) {
  asm volatile("cp.async.wait_group 1;\n" ::: "memory");
}

static __device__ __forceinline__ void cp_async_wait_all(void) {
  asm volatile("cp.async.wait_all;\n" ::: "memory");
}

/* ---- phase 1: selection --------------------------------------------------- */

/* Fills sel with the valid selected blocks of (t, g), ascending; returns n.
 * Contains two __syncthreads (every thread of the CTA calls it). */
static __device__ int select_blocks(const attn_params &p, const m3s_row_info &ri, int64_t t, int g,
                             cta_selection *sel) {
  int tid = threadIdx.x, kk = 0;
  int64_t nb = 0;
  if (ri.valid) {
    nb = ri.pos / M3S_BLOCK_SIZE + 1;
    kk = (int)(nb < p.topk_k ? nb : p.topk_k);
  }
  if (tid < kk) {
    int id = p.topk[t * p.tk_s0 + g * p.tk_s1 + tid * p.tk_s2];
    int64_t page = -1;
    if (id >= 0 && id < nb)
      page = m3s_cp_page(p.b, p.b.bt, p.b.bt_s0, p.b.bt_s1, p.b.bt_cols, ri.r, id, p.num_pages);
    sel->raw_id[tid] = page >= 0 ? id : -1;
    sel->raw_page[tid] = page;
  }
  __syncthreads();
  if (tid < kk && sel->raw_id[tid] >= 0) {
    int id = sel->raw_id[tid], rank = 0;
    for (int j = 0; j < kk; j++) {
      int o = sel->raw_id[j];
      rank += o >= 0 && (o < id || (o == id && j < tid));
    }
    sel->id[rank] = id;
    sel->page[rank] = sel->raw_page[tid];
  }
  if (tid == 0) {
    int n = 0;
    for (int j = 0; j < kk; j++)
      n += sel->raw_id[j] >= 0;
    sel->n = n;
  }
  __syncthreads();
  return sel->n;
}

/* ---- phase 3: per-warp K/V staging ---------------------------------------- */

/* Issues the loads of one unit: keys [kbase, kbase + 16) of page `page`, KV
 * head g, into `stage`; rows kr >= nvis (keys after pos) are zero-filled. */
static __device__ __forceinline__ void issue_unit(const attn_params &p, unsigned char *stage,
                                           int64_t page, int g, int kbase, int nvis,
                                           int lane) {
  const int64_t row0 = page * p.kv_s0 + (int64_t)g * p.kv_s1 + (int64_t)kbase * p.kv_s2;
  const uint32_t st = smem_addr(stage);
  const bool fp8 = p.kv_esize == 1;
  if (p.vec16 && !fp8) {
#pragma unroll 4
    for (int kr = 0; kr < UNIT_KEYS; kr++) {
      const unsigned char *src = p.kv + (row0 + kr * p.kv_s2 + lane * 8) * 2;
      uint32_t dst = st + kr * ROW_BYTES + ((lane ^ (kr & 7)) << 4);
      cp_async16(dst, kr < nvis ? src : p.kv, kr < nvis ? 16 : 0);
    }
  } else if (p.vec16) {
#pragma unroll 4
    for (int i = 0; i < UNIT_KEYS / 2; i++) {
      int kr = 2 * i + (lane >> 4), rc = lane & 15;
      const unsigned char *src = p.kv + row0 + kr * p.kv_s2 + rc * 16;
      uint32_t dst = st + FP8_RAW_OFF + kr * 256 + rc * 16;
      cp_async16(dst, kr < nvis ? src : p.kv, kr < nvis ? 16 : 0);
    }
  } else {
    /* Unaligned view: element loads, written synchronously. */
    for (int i = 0; i < UNIT_KEYS * 256 / 32; i++) {
      int e = i * 32 + lane, kr = e >> 8, col = e & 255;
      if (fp8) {
        unsigned char v = kr < nvis ? p.kv[row0 + kr * p.kv_s2 + col] : 0;
        stage[FP8_RAW_OFF + kr * 256 + col] = v;
      } else {
        uint16_t v = kr < nvis ? ((const uint16_t *)p.kv)[row0 + kr * p.kv_s2 + col] : 0;
        *(uint16_t *)(stage + kr * ROW_BYTES + (((col >> 3) ^ (kr & 7)) << 4) + (col & 7) * 2) =
            v;
      }
    }
  }
  if (fp8) {
    /* per-(head, slot) scales of the unit's keys: lanes 0-15 k, 16-31 v */
    int kr = lane & 15;
    const float *base = lane < 16 ? p.sc.k : p.sc.v;
    int per_slot = lane < 16 ? p.sc.k_per_slot : p.sc.v_per_slot;
    if (per_slot) {
      int64_t slot = page * M3S_BLOCK_SIZE + kbase + kr;
      int64_t off = lane < 16 ? g * p.sc.k_s0 + slot * p.sc.k_s1 : g * p.sc.v_s0 + slot * p.sc.v_s1;
      cp_async4(st + TILE_BYTES + lane * 4,
                kr < nvis ? (const void *)(base + off) : (const void *)base, kr < nvis ? 4 : 0);
    }
  }
}

/* fp8 bytes in the upper half of the stage -> 16-bit tile, in place. K stays
 * unscaled (every fp8 value is exact in bf16 and f16; the k scale multiplies
 * the fp32 score instead), V is dequantised (times its scale, RNE). Round i reads chunks [32i,
 * 32i+32) before any lane writes (the
 * __syncwarp); writes of round i ([1 KiB * i, +1 KiB)) never reach input
 * bytes of a later round (4 KiB + 512 B * i'). */
template <bool F16>
static __device__ __forceinline__ void dequant_fp8(unsigned char *stage, int mode, float vs,
                                            int v_per_slot, int lane) {
  const float *sc = (const float *)(stage + TILE_BYTES);
#pragma unroll 1
  for (int i = 0; i < UNIT_KEYS / 2; i++) {
    int kr = 2 * i + (lane >> 4), rc = lane & 15, part = rc >> 3;
    uint4 raw = *(const uint4 *)(stage + FP8_RAW_OFF + kr * 256 + rc * 16);
    float s = part ? (v_per_slot ? sc[16 + kr] : vs) : 1.0f;
    __syncwarp();
    uint32_t o[8];
    fp8_chunk_to16<F16>(raw, mode, s, o);
    unsigned char *row = stage + kr * ROW_BYTES;
    *(uint4 *)(row + (((2 * rc) ^ (kr & 7)) << 4)) = make_uint4(o[0], o[1], o[2], o[3]);
    *(uint4 *)(row + (((2 * rc + 1) ^ (kr & 7)) << 4)) = make_uint4(o[4], o[5], o[6], o[7]);
  }
}

/* The other 16-bit dtype -> the activation dtype, chunk by chunk in place. */
template <bool F16>
static __device__ __forceinline__ void convert16(unsigned char *stage, int lane) {
#pragma unroll 2
  for (int i = 0; i < TILE_BYTES / 16 / 32; i++) {
    uint4 *c = (uint4 *)(stage + (i * 32 + lane) * 16);
    uint4 v = *c;
    uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; j++) {
      float2 f = unpack_other<F16>(w[j]);
      w[j] = pack2<F16>(f.x, f.y);
    }
    *c = make_uint4(w[0], w[1], w[2], w[3]);
  }
}

/* ---- phase 3: the warp's stream (load_q, attend_unit: attention.cuh) ------- */

/* Visible keys of sorted position bi: min(128, pos + 1 - 128 * id). */
static __device__ __forceinline__ int block_keys(const cta_selection *sel, int bi, int64_t pos) {
  int64_t nk = pos + 1 - (int64_t)sel->id[bi] * M3S_BLOCK_SIZE;
  return nk > M3S_BLOCK_SIZE ? M3S_BLOCK_SIZE : (int)nk;
}

/* Next unit u' >= u (unit u = block b0 + u/2, keys 32*warp + 16*(u%2)) with
 * at least one visible key; nu when none. */
static __device__ __forceinline__ int next_unit(const cta_selection *sel, int b0, int nu, int u,
                                         int warp, int64_t pos) {
  for (; u < nu; u++)
    if (32 * warp + 16 * (u & 1) < block_keys(sel, b0 + (u >> 1), pos))
      break;
  return u;
}

template <bool F16>
static __device__ void warp_stream(const attn_params &p, const cta_selection *sel, int b0, int b1,
                            int64_t pos, int g, float sl2, float vs, const uint32_t (&qa)[8][4],
                            unsigned char *wbuf, warp_state &ws, int warp, int lane) {
  const int nu = 2 * (b1 - b0);
  int u = next_unit(sel, b0, nu, 0, warp, pos), stage = 0;
  if (u < nu) {
    int kbase = 32 * warp + 16 * (u & 1);
    issue_unit(p, wbuf, sel->page[b0 + (u >> 1)], g, kbase,
               block_keys(sel, b0 + (u >> 1), pos) - kbase, lane);
  }
  cp_async_commit();
  while (u < nu) {
    int un = next_unit(sel, b0, nu, u + 1, warp, pos);
    if (un < nu) {
      int kbase = 32 * warp + 16 * (un & 1);
      issue_unit(p, wbuf + (stage ^ 1) * STAGE_BYTES, sel->page[b0 + (un >> 1)], g, kbase,
                 block_keys(sel, b0 + (un >> 1), pos) - kbase, lane);
    }
    cp_async_commit();
    cp_async_wait_prev();
    __syncwarp();
    unsigned char *cur = wbuf + stage * STAGE_BYTES;
    if (p.kv_mode == KV_E4M3 || p.kv_mode == KV_E5M2) {
      dequant_fp8<F16>(cur, p.kv_mode, vs, p.sc.v_per_slot, lane);
      __syncwarp();
    } else if (p.kv_mode == KV_CONVERT16) {
      convert16<F16>(cur, lane);
      __syncwarp();
    }
    int kbase = 32 * warp + 16 * (u & 1);
    const float *kscale = p.sc.k_per_slot ? (const float *)(cur + TILE_BYTES) : NULL;
    attend_unit<F16, ROW_BYTES, 128>(smem_addr(cur), qa,
                                     block_keys(sel, b0 + (u >> 1), pos) - kbase, kscale, sl2, ws,
                                     lane);
    __syncwarp(); /* every lane is done with `cur` before it is refilled */
    stage ^= 1;
    u = un;
  }
  cp_async_wait_all();
}

/* ---- phase 4: merge of the warp states, output ------------------------------ */

static __device__ __forceinline__ float *warp_acc(unsigned char *smem, int w) {
  return (float *)(smem + w * WARP_BYTES);
}
static __device__ __forceinline__ float *warp_ml(unsigned char *smem, int w) {
  return (float *)(smem + w * WARP_BYTES) + HEADS_PER_CTA * ACC_STRIDE;
}

static __device__ void store_rows(const attn_params &p, unsigned char *smem, int64_t t, int h0,
                                  int nh, int split) {
  const int tid = threadIdx.x;
#pragma unroll 1
  for (int i = 0; i < HEADS_PER_CTA * 64 / ATT_THREADS; i++) {
    int pidx = i * ATT_THREADS + tid, r = pidx >> 6, d = (pidx & 63) * 2;
    if (r < nh)
      store_merged_pair<ATT_WARPS>(p, warp_acc(smem, 0), WARP_BYTES / 4, t, h0 + r, r, d, split);
  }
}

template <bool F16>
static __global__ void __launch_bounds__(ATT_THREADS) attn_kernel(const attn_params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ cta_selection sel;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int chunk = (int)(blockIdx.x % p.nchunk);
  const int64_t tg = blockIdx.x / p.nchunk;
  const int g = (int)(tg / p.b.num_tokens);
  const int64_t t = tg % p.b.num_tokens;
  const int split = blockIdx.y;
  const int h0 = g * p.group + chunk * HEADS_PER_CTA;
  const int nh = min(HEADS_PER_CTA, p.group - chunk * HEADS_PER_CTA);

  /* phase 1: where the row belongs, its valid selected blocks (sorted) */
  m3s_row_info ri = m3s_row_lookup(p.b, t);
  int n = select_blocks(p, ri, t, g, &sel);

  /* phase 2: this split's blocks */
  int per = (n + p.nsplit - 1) / p.nsplit;
  int b0 = min(n, split * per), b1 = min(n, b0 + per);

  /* phase 3: stream the units of this warp */
  warp_state ws;
  warp_state_init(ws);
  unsigned char *wbuf = smem + warp * WARP_BYTES;
  if (b0 < b1) {
    uint32_t qa[8][4];
    load_q<F16>(p, t, h0, nh, qa, lane);
    float ks = p.sc.k && !p.sc.k_per_slot ? p.sc.k[0] : 1.0f;
    float vs = p.sc.v && !p.sc.v_per_slot ? p.sc.v[0] : 1.0f;
    warp_stream<F16>(p, &sel, b0, b1, ri.pos, g, p.scale_log2 * ks, vs, qa, wbuf, ws, warp, lane);
  }
  __syncwarp();

  /* phase 4: merge the 4 warp states in fixed order, write */
  stash_state(ws, warp_acc(smem, warp), warp_ml(smem, warp), lane);
  __syncthreads();
  store_rows(p, smem, t, h0, nh, split);
}

/* Merge of the nsplit partials of (t, h), split order 0..nsplit-1. The
 * maxima are read by all lanes at once and each group of 8 partials is
 * loaded before it is summed: with one dependent load per split, 16 splits
 * took ~9 us at batch 1 (ncu, H200, 2026-12-03), the attention itself 9.4. */
static __global__ void __launch_bounds__(128) merge_kernel(const attn_params p, int64_t rows) {
  const int64_t wid = (int64_t)blockIdx.x * 4 + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  m3s_pdl_wait(); /* the partials come from the kernel before (launch.h) */
  if (wid >= rows)
    return;
  const int64_t t = wid / p.hq, h = wid % p.hq;
  const float2 *ml = (const float2 *)(p.ws_ml + wid * p.nsplit * 2);
  const float4 *po = (const float4 *)(p.ws_o + wid * p.nsplit * M3S_HEAD_DIM) + lane;
  float mx = neg_inf();
  for (int s = lane; s < p.nsplit; s += 32)
    mx = fmaxf(mx, ml[s].x);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1)
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  float l = 0.0f;
  float4 o = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (mx != neg_inf()) {
    for (int s0 = 0; s0 < p.nsplit; s0 += 8) {
      float2 w[8];
      float4 v[8];
#pragma unroll
      for (int i = 0; i < 8; i++)
        if (s0 + i < p.nsplit) {
          w[i] = ml[s0 + i];
          v[i] = po[(s0 + i) * (M3S_HEAD_DIM / 4)];
        }
#pragma unroll
      for (int i = 0; i < 8; i++)
        if (s0 + i < p.nsplit) {
          float a = exp2f(w[i].x - mx);
          l += w[i].y * a;
          o.x += v[i].x * a;
          o.y += v[i].y * a;
          o.z += v[i].z * a;
          o.w += v[i].w * a;
        }
    }
  }
  float inv_ok = l > 0.0f ? 1.0f : 0.0f, den = l > 0.0f ? l : 1.0f;
  int64_t off = t * p.out_s0 + h * p.out_s1 + 4 * lane;
  m3s_st(p.out, p.act, off + 0, inv_ok * (o.x / den));
  m3s_st(p.out, p.act, off + 1, inv_ok * (o.y / den));
  m3s_st(p.out, p.act, off + 2, inv_ok * (o.z / den));
  m3s_st(p.out, p.act, off + 3, inv_ok * (o.w / den));
  if (lane == 0 && p.lse)
    p.lse[t * p.lse_s0 + h * p.lse_s1] = l > 0.0f ? (mx + log2f(l)) * LN2 : neg_inf();
}

/* ---- host --------------------------------------------------------------------- */

static size_t align256(size_t x) { return (x + 255) & ~(size_t)255; }

static int head_chunks(const m3s_layer_config *cfg) {
  int G = cfg->num_q_heads / cfg->num_kv_heads;
  return (G + HEADS_PER_CTA - 1) / HEADS_PER_CTA;
}

/* Split factor of a batch of T rows with sequences <= max_seq_len (host
 * bounds only), so that about `target` work items run. Always 1 under
 * M3S_OPT_BATCH_INVARIANT: a split merges partials in another association,
 * so the bits would depend on the batch. */
static int plan_split_to(const m3s_context *ctx, const m3s_layer_config *cfg, int64_t T,
                         int64_t max_seq_len, int64_t target) {
  if (ctx->batch_invariant)
    return 1;
  int64_t items = T * cfg->num_kv_heads * head_chunks(cfg);
  int64_t kmax = m3s_ceil_div(max_seq_len, M3S_BLOCK_SIZE);
  if (kmax > cfg->topk)
    kmax = cfg->topk;
  if (items <= 0 || kmax <= 1 || items >= target)
    return 1;
  int64_t s = m3s_ceil_div(target, items);
  if (s > kmax)
    s = kmax;
  int64_t per = m3s_ceil_div(kmax, s);
  return (int)m3s_ceil_div(kmax, per);
}

/* The generic kernel: about 2 CTAs per SM (3 fit). */
static int plan_split(const m3s_context *ctx, const m3s_layer_config *cfg, int64_t T,
                      int64_t max_seq_len) {
  return plan_split_to(ctx, cfg, T, max_seq_len, 2 * (int64_t)m3s_cuda_num_sms(ctx));
}

/* The persistent TMA kernel (one CTA per SM walking items): items are
 * balanced over the SMs already when there are at least as many as SMs, so
 * only fewer rows split, to about one item per SM. Never more than
 * plan_split's (the workspace query sizes for that; the factor grows with
 * the target). */
static int plan_split_tma(const m3s_context *ctx, const m3s_layer_config *cfg, int64_t T,
                          int64_t max_seq_len) {
  return plan_split_to(ctx, cfg, T, max_seq_len, m3s_cuda_num_sms(ctx));
}

/* The persistent TMA kernel with the splits of an item merged inside a
 * thread-block cluster (sm90/attention_tma.cu, at_cluster_merge): the
 * largest cluster size c of 8, 4, 2 with c splits per item (row, KV head,
 * head chunk) that runs in one wave, i.e. items x c <= SMs and items <= the
 * clusters of c the device holds at once (m3s_cuda_attention_clusters: a
 * cluster lives inside one GPC, and GPCs differ in their SM counts, so 8 x
 * 16 CTAs may not fit 128 SMs), and c <= the blocks a row can select; else
 * 1 (plan_split_tma and the merge kernel). Needs no workspace. */
static int plan_split_cluster(const m3s_context *ctx, const m3s_layer_config *cfg, int64_t T,
                              int64_t max_seq_len) {
  const int64_t items = T * cfg->num_kv_heads * head_chunks(cfg);
  int64_t kmax = m3s_ceil_div(max_seq_len, M3S_BLOCK_SIZE);
  if (kmax > cfg->topk)
    kmax = cfg->topk;
  if (items <= 0)
    return 1;
  for (int c = 8; c >= 2; c /= 2)
    if (c <= kmax && items * c <= m3s_cuda_num_sms(ctx) &&
        items <= m3s_cuda_attention_clusters(ctx, c))
      return c;
  return 1;
}

extern "C" int m3s_attention_cluster_splits(const m3s_context *ctx, const m3s_layer_config *cfg,
                                            const m3s_batch *batch) {
  return plan_split_cluster(ctx, cfg, batch->num_tokens, batch->max_seq_len);
}

static size_t split_bytes(const m3s_layer_config *cfg, int64_t T, int nsplit) {
  if (nsplit <= 1)
    return 0;
  size_t units = (size_t)T * (size_t)cfg->num_q_heads * (size_t)nsplit;
  return align256(units * M3S_HEAD_DIM * sizeof(float)) + align256(units * 2 * sizeof(float));
}

extern "C" size_t m3s_cuda_attention_workspace(const m3s_context *ctx,
                                               const m3s_layer_config *cfg, int64_t max_tokens,
                                               int64_t max_seq_len) {
  /* Largest need over every T <= max_tokens: beyond 2*SMs/(Hkv*chunks) rows
   * nothing splits, so the scan is short. */
  int64_t per_row = (int64_t)cfg->num_kv_heads * head_chunks(cfg);
  int64_t limit = m3s_ceil_div(2 * (int64_t)m3s_cuda_num_sms(ctx), per_row);
  if (limit > max_tokens)
    limit = max_tokens;
  size_t best = 0;
  for (int64_t T = 1; T <= limit; T++) {
    size_t b = split_bytes(cfg, T, plan_split(ctx, cfg, T, max_seq_len));
    best = b > best ? b : best;
  }
  return best;
}

/* The mma dtype: f16 when q or a 16-bit cache is f16 (bf16 values convert to
 * f16 exactly within its range, not the other way round), else bf16; an fp8
 * cache keeps q's dtype (fp8 values are exact in both). */
static bool mma_f16(m3s_dtype act, m3s_dtype kv) { return act == M3S_F16 || kv == M3S_F16; }

static int kv_mode_of(m3s_dtype act, m3s_dtype kv) {
  if (kv == M3S_E4M3)
    return KV_E4M3;
  if (kv == M3S_E5M2)
    return KV_E5M2;
  return (kv == M3S_F16) == mma_f16(act, kv) ? KV_DIRECT : KV_CONVERT16;
}

static attn_params make_params(const m3s_layer_config *cfg, const m3s_batch *batch,
                               const m3s_tensor *q, const m3s_tensor *kv,
                               const m3s_kv_scales *scales, const m3s_tensor *topk,
                               m3s_tensor *out, m3s_tensor *lse) {
  attn_params p;
  memset(&p, 0, sizeof p);
  p.b = m3s_cuda_batch_of(batch);
  p.q = q->data;
  p.q_s0 = q->stride[0];
  p.q_s1 = q->stride[1];
  p.out = out->data;
  p.out_s0 = out->stride[0];
  p.out_s1 = out->stride[1];
  p.lse = lse ? (float *)lse->data : NULL;
  p.lse_s0 = lse ? lse->stride[0] : 0;
  p.lse_s1 = lse ? lse->stride[1] : 0;
  p.act = q->dtype;
  p.q_convert = q->dtype == M3S_BF16 && mma_f16(q->dtype, kv->dtype);
  p.kv = (const unsigned char *)kv->data;
  p.kv_s0 = kv->stride[0];
  p.kv_s1 = kv->stride[1];
  p.kv_s2 = kv->stride[2];
  p.num_pages = kv->shape[0];
  p.kv_mode = kv_mode_of(q->dtype, kv->dtype);
  p.kv_esize = (int)m3s_dtype_size(kv->dtype);
  /* cp.async needs 16-byte aligned chunks: base and row strides */
  int64_t vec = 16 / p.kv_esize;
  p.vec16 = ((uintptr_t)kv->data % 16 == 0) && p.kv_s0 % vec == 0 && p.kv_s1 % vec == 0 &&
            p.kv_s2 % vec == 0;
  p.sc = m3s_cuda_scales_of(scales, kv->dtype);
  p.sc.k_per_slot = p.sc.k && p.sc.k_per_slot;
  p.sc.v_per_slot = p.sc.v && p.sc.v_per_slot;
  p.topk = (const int32_t *)topk->data;
  p.tk_s0 = topk->stride[0];
  p.tk_s1 = topk->stride[1];
  p.tk_s2 = topk->stride[2];
  p.hq = cfg->num_q_heads;
  p.hkv = cfg->num_kv_heads;
  p.group = cfg->num_q_heads / cfg->num_kv_heads;
  p.topk_k = cfg->topk;
  p.nchunk = head_chunks(cfg);
  p.nsplit = 1;
  p.scale_log2 = cfg->softmax_scale * LOG2E;
  return p;
}

extern "C" cudaError_t m3s_cuda_attention_prepare(void) {
  cudaError_t err = cudaFuncSetAttribute(attn_kernel<true>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, ATT_SMEM);
  if (err != cudaSuccess)
    return err;
  return cudaFuncSetAttribute(attn_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              ATT_SMEM);
}

/* The shared-memory limit was raised at context creation (context.cu). */
template <bool F16>
static m3s_status launch_attn(const attn_params &p, dim3 grid, cudaStream_t stream) {
  attn_kernel<F16><<<grid, ATT_THREADS, ATT_SMEM, stream>>>(p);
  return m3s_cuda_check_launch("m3s_sparse_attention", "attn_kernel");
}

extern "C" m3s_status m3s_cuda_sparse_attention(m3s_context *ctx, const m3s_layer_config *cfg,
                                                const m3s_batch *batch, const m3s_tensor *q,
                                                const m3s_tensor *kv_cache,
                                                const m3s_kv_scales *scales,
                                                const m3s_tensor *topk, m3s_tensor *out,
                                                m3s_tensor *lse, const m3s_exec *exec) {
  const char *fn = "m3s_sparse_attention";
  int64_t T = batch->num_tokens;
  if (T <= 0)
    return M3S_OK;
  attn_params p = make_params(cfg, batch, q, kv_cache, scales, topk, out, lse);
  cudaStream_t stream = m3s_cuda_stream(exec);

  /* split factor from host bounds; the core checked the workspace against
   * m3s_cuda_attention_workspace for these bounds (fallback: no split) */
  m3s_attn_tma_maps maps;
  const int kind = m3s_attention_tma_plan(ctx, batch, q, kv_cache, scales, &maps);
  if (kind == M3S_ATTN_UNION)
    return m3s_attention_union_launch(p, maps, q->dtype == M3S_F16,
                                      m3s_attention_union_wg(ctx, batch, kv_cache->dtype), stream,
                                      fn);
  const int tma = kind == M3S_ATTN_PERSISTENT;
  if (tma) {
    const int cl = plan_split_cluster(ctx, cfg, T, batch->max_seq_len);
    if (cl > 1) {
      p.nsplit = cl;
      p.cmerge = 1;
      return m3s_attention_tma_launch(ctx, p, maps, q->dtype == M3S_F16, stream, fn);
    }
  }
  int nsplit = tma ? plan_split_tma(ctx, cfg, T, batch->max_seq_len)
                   : plan_split(ctx, cfg, T, batch->max_seq_len);
  size_t need = split_bytes(cfg, T, nsplit);
  if (nsplit > 1 && (!exec || !exec->workspace || exec->workspace_bytes < need))
    nsplit = 1;
  p.nsplit = nsplit;
  if (nsplit > 1) {
    size_t units = (size_t)T * (size_t)cfg->num_q_heads * (size_t)nsplit;
    p.ws_o = (float *)exec->workspace;
    p.ws_ml = (float *)((char *)exec->workspace + align256(units * M3S_HEAD_DIM * sizeof(float)));
  }

  if (tma) {
    m3s_status st = m3s_attention_tma_launch(ctx, p, maps, q->dtype == M3S_F16, stream, fn);
    if (st != M3S_OK || nsplit == 1)
      return st;
    return m3s_cuda_attention_merge(p, m3s_cuda_pdl(ctx, p.b.num_reqs), stream, fn);
  }
  int64_t ctas = T * p.hkv * p.nchunk;
  if (ctas > 0x7fffffff)
    return m3s_fail(M3S_ERR_UNSUPPORTED, fn, "%lld rows x %d KV heads exceed one CUDA grid",
                    (long long)T, p.hkv);
  dim3 grid((unsigned)ctas, (unsigned)nsplit);
  m3s_status st = mma_f16(q->dtype, kv_cache->dtype) ? launch_attn<true>(p, grid, stream)
                                                     : launch_attn<false>(p, grid, stream);
  if (st != M3S_OK || nsplit == 1)
    return st;
  return m3s_cuda_attention_merge(p, 0, stream, fn);
}

/* nsplit > 1 only when the rows give fewer CTAs than the GPU holds, so this
 * grid is small */
m3s_status m3s_cuda_attention_merge(const attn_params &p, int pdl, cudaStream_t stream,
                                    const char *fn) {
  int64_t rows = p.b.num_tokens * p.hq;
  if (m3s_ceil_div(rows, 4) > INT32_MAX)
    return m3s_fail(M3S_ERR_INTERNAL, fn, "merge grid of %lld rows exceeds one CUDA grid",
                    (long long)rows);
  return m3s_launch(pdl, merge_kernel, dim3((unsigned)m3s_ceil_div(rows, 4)), dim3(128), 0, stream,
                    fn, "merge_kernel", p, rows);
}
