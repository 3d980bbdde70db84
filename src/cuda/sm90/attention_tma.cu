/* CUDA backend, sm_90a: block-sparse GQA attention (SPEC section 4) as a
 * persistent kernel fed by TMA, for decode batches with one query row per
 * request (max_q_len 1) and a cache of the activation dtype (bf16, f16) or
 * fp8 (e4m3, e5m2; scalar or per-slot scales) (m3s_attention_tma_eligible;
 * ../attention.cu dispatches).
 *
 * Why: the generic kernel (../attention.cu) runs one CTA per (row, KV head,
 * head chunk, split) with a two-stage cp.async pipeline per warp. At 128
 * decode requests it reached 72% of DRAM bandwidth (ncu, H200, 2001c4d):
 * 48% of its warp stalls wait on the cp.async of the next unit, and its 512
 * CTAs fill 1.29 waves of 396 slots, so the last third of the time runs on
 * a partial wave. Here each SM runs one CTA that walks work items with a
 * producer that runs ahead across item boundaries, so no SM idles on a
 * tail and no CTA starts with an empty pipeline.
 *
 * What the kernel does
 *  - Work items are (row t, KV head g, chunk of 16 query heads, split s),
 *    numbered with the split fastest; CTA c takes items c, c + grid,
 *    c + 2 grid, ...: the CTAs work on neighbouring items at the same time,
 *    so blocks that neighbouring rows share are read from L2 once they are
 *    in it (contiguous ranges per CTA measured 1.3x slower at q_len 4 and
 *    1.1x at 8K prefill). One CTA per SM (~210 KiB of shared memory);
 *    grid = min(I, SMs).
 *  - Warp 8 produces. Per item, the warp reads the row's top-k entries,
 *    drops -1, ids outside [0, nb), blocks another context-parallel rank
 *    owns and out-of-range pages (as the generic kernel), sorts the rest
 *    ascending and takes split s's range of them. Lane 0 publishes the item
 *    (row, heads, block count, visible keys of the last block) in one of
 *    two descriptor slots, loads the item's 16 query heads by TMA into the
 *    slot's Q tile, then, block by block, the K/V rows into a ring of 4
 *    slots of 32 KiB: a 16-bit block as two halves of 64 keys (four TMA
 *    boxes of 64 keys x 64 elements each), an fp8 block whole (two boxes of
 *    128 keys x 128 bytes), 128-byte swizzle, through a 4-D tensor map
 *    [pages][Hkv][128 slots][256] with the caller's strides, so head-major
 *    and token-major caches both work; per-slot fp8 scales of the block by
 *    two 512-byte bulk copies on the same barrier. A half past the last
 *    visible key is not loaded.
 *  - Warps 0-7 consume. Warp w takes the item's Q from the descriptor into
 *    mma fragments, releases the descriptor, then runs attend_unit
 *    (../attention.cuh: S = Q K^T on mma.sync, fp32 online softmax, O += P
 *    V) on its unit (keys 16w..16w+15) of each block in block order: in
 *    place for a 16-bit cache, from a 16-bit copy for fp8 (K exact in the
 *    mma dtype; V exact in f16 with P V in f16 and a scalar v scale on the
 *    output, or, with per-slot v scales, times its scale in the mma dtype;
 *    with bf16 q and f16 V, S = Q K^T runs in f16 for every item whose Q
 *    tile is exactly f16, at_q_to_f16; when S runs in f16 with an f16 V,
 *    K goes from the slot straight into the mma's B fragments, in an order
 *    of the dims that Q takes too, at_k_frags, and only V is copied);
 *    keys after pos are masked and their V rows zeroed first (the cache
 *    there may hold anything). The item's eight warp states merge in fixed
 *    order 0..7 through shared memory (two named barriers of the consumers)
 *    and are written: out (q's dtype, RNE) and lse, or the partial of split
 *    s for ../attention.cu's merge kernel. The producer is not held by
 *    this: it fills the next slots meanwhile.
 *  - Cluster merge (p.cmerge; small batches, ../attention.cu
 *    plan_split_cluster): when every CTA has one item, the nsplit CTAs of
 *    an item are launched as one thread-block cluster; each keeps its
 *    merged partial in shared memory and the cluster merges them through
 *    distributed shared memory (at_cluster_merge), so no merge kernel runs
 *    and no workspace holds partials. Until 2026-12-05 one request's 16
 *    splits went through the merge kernel: 13.1 + 4.2 us (ncu, session
 *    12), the second kernel only combining 16 states per head. On an H100
 *    (session 18) one request now takes 12.1-12.4 us as 32 CTAs (clusters
 *    of 8, the portable limit; ncu); against the merge kernel's path the
 *    call is 0.2 us faster at one request, 0.6 at 4, 2.0 at 16 (TP1, 128K,
 *    m3s-bench graph replays, docs/perf-notes.md).
 *  Warp w always handles keys 16w..16w+15 of each block and the merge order
 *  is fixed, so an item's result does not depend on which CTA ran it; the
 *  choice of this kernel follows max_q_len, a host bound, so under
 *  M3S_OPT_BATCH_INVARIANT it is not used.
 *
 * Barriers: full[slot] (1 arrive + 32 KiB of TMA bytes, + the scales),
 * empty[slot] (one arrive per consumer warp of the slot: 4 for a 16-bit
 * half, 8 for an fp8 block; every such warp waits and releases, keys or
 * not), dfull[d] (producer lane 0 + the Q bytes), dempty[d] (one arrive per
 * consumer warp). Phases follow from the block and item counters, which
 * producer and consumers advance alike. Under the cluster merge, two
 * cluster barriers (every thread of the cluster): the partials written,
 * then read.
 *
 * Graph-safe: no allocation, no synchronisation, lengths and selections read
 * on the device; the tensor maps are encoded on the host per call from the
 * tensors' pointers and strides (kernel parameters).
 *
 * Registers: 149 (16-bit), 168 (fp8; 168 is the cap of 9 warps per SM),
 * no spills (ptxas, sm_90a, nvcc 13.0, session 17).
 * Measured (H200, m3s-bench, docs/perf-notes.md "Decode attention: a
 * persistent TMA kernel" and "fp8 caches on the TMA kernel"): 128 requests
 * x 32K TP1 138.2 us bf16 (generic kernel 155.2 in the same run; 87% of the
 * random page-read ceiling) and 119.8 us e4m3 (generic 147.1); peer at
 * 7c155e4: attn 0.149 ms bf16 and 0.125 ms e4m3 against vLLM's 0.147 and
 * 0.188; at f34ec66 0.146 ms bf16 and 0.100 ms e4m3 (K straight into the
 * mma's registers, at_k_frags) against 0.147 and 0.188. Equal to the generic kernel at 1 and 32 bf16 requests; slower
 * where rows share blocks (q_len 4, prefill), hence the dispatch rule. */
#include "../attention.cuh"
#include "../launch.h"
#include "attention_fp8.cuh"
#include "attention_tma.h"
#include "tma.cuh"

#include <cudaTypedefs.h>

/* Consumer warp w takes keys 16w..16w+15 ("its unit") of every block. */
#define AT_CWARPS 8
#define AT_THREADS ((AT_CWARPS + 1) * 32)     /* + one producer warp */
#define AT_QTILE_BYTES (2 * AT_UNIT_BYTES)    /* 16 heads x 128 dims */
#define AT_RING 4                             /* slots of 32 KiB: 128 KiB in flight */
#define AT_DESC 2                             /* items between producer and consumers */
#define AT_ML 32                              /* m, l of 16 rows after each acc */

/* A slot holds the keys of one block (fp8) or half a block (16-bit), as
 * the cache stores them: 128-byte columns of the key rows (K | V), one TMA
 * box each (rows x 128 bytes, 128-byte swizzle), so warp w's unit is the
 * 2 KiB at row 16 (w % warps_per_slot) of every box. Earlier versions used a
 * slot per (warp, unit of 16 keys); a slot per 32 KiB cuts the producer's
 * barrier waits and TMA issues per byte by 4 (16-bit) and 8 (fp8): fp8 ran
 * no faster than 16-bit there, at the same number of units. A 16-bit slot
 * is read in place; the consumer converts its fp8 unit into a 16-bit tile
 * of its own (in its merge scratch, free until the item's end) and
 * releases the slot. */
template <bool FP8>
struct at_geom {
  static constexpr int spb = FP8 ? 1 : 2;                  /* slots per block */
  static constexpr int rows = M3S_BLOCK_SIZE / spb;        /* keys per slot */
  static constexpr int boxes = FP8 ? 2 : 4;                /* 128-byte columns of a row */
  static constexpr int box_elems = FP8 ? 128 : 64;
  static constexpr int box_bytes = rows * 128;
  static constexpr int slot_bytes = boxes * box_bytes;
  static constexpr int warps_per_slot = AT_CWARPS / spb;
};
static_assert(at_geom<true>::slot_bytes == 32768 && at_geom<false>::slot_bytes == 32768,
              "32 KiB slots");
static_assert(AT_RING % 2 == 0, "a 16-bit block's two halves keep their slot parity");
static_assert(AT_CWARPS * 16 == M3S_BLOCK_SIZE, "one unit per warp and block");

typedef struct {
  int64_t t;
  int h0, nh, split;
  int n;         /* blocks of the item's range */
  int nvis_last; /* visible keys of its last block (the others have 128) */
} at_item;

#define AT_SCRATCH_FLOATS (HEADS_PER_CTA * ACC_STRIDE + AT_ML)
/* fp8: the converted tile of warp w lives in scratch[w] (free until the
 * warp's state is stashed after its last unit of the item), with the unit's
 * per-slot k scales behind it */
static_assert(AT_TILE_BYTES + 16 * 4 <= AT_SCRATCH_FLOATS * 4, "fp8 tile fits the scratch");
static_assert(AT_SCRATCH_FLOATS * 4 % 128 == 0, "tiles start on 128-byte rows");

template <bool FP8>
struct at_smem {
  /* first: 1024-byte aligned (the 128-byte swizzle repeats every 1 KiB) */
  unsigned char ring[AT_RING][at_geom<FP8>::slot_bytes];
  unsigned char qtile[AT_DESC][AT_QTILE_BYTES];
  float scratch[AT_CWARPS][AT_SCRATCH_FLOATS];
  float scales[FP8 ? AT_RING : 1][2 * M3S_BLOCK_SIZE]; /* fp8 per-slot: k, then v */
  at_item item[AT_DESC];
  unsigned long long full[AT_RING], empty[AT_RING];
  unsigned long long dfull[AT_DESC], dempty[AT_DESC];
  int raw_id[M3S_MAX_TOPK];
  int id[M3S_MAX_TOPK];
  int64_t raw_page[M3S_MAX_TOPK];
  int64_t page[M3S_MAX_TOPK];
};

/* + the alignment of the base */
template <bool FP8>
static constexpr size_t at_smem_bytes() { return sizeof(at_smem<FP8>) + 1024; }

/* Under p.cmerge the CTA's merged partial of its item lives in ring slot 0,
 * free once every block of the item is consumed (the CTA has one item):
 * acc [16 heads][128] (unnormalised), then m [16] and l [16]. */
#define AT_PART_M (HEADS_PER_CTA * M3S_HEAD_DIM)
#define AT_PART_L (AT_PART_M + HEADS_PER_CTA)
#define AT_MAX_CLUSTER 8 /* portable cluster size: splits merged in a cluster */
static_assert((AT_PART_L + HEADS_PER_CTA) * 4 <= 32768, "the partial fits one slot");

static __device__ __forceinline__ void at_consumer_sync(void) {
  asm volatile("bar.sync 1, %0;\n" ::"n"(AT_CWARPS * 32) : "memory");
}

/* ---- the producer warp ----------------------------------------------------- */

static __device__ __forceinline__ void at_item_of(const attn_params &p, int64_t i, int64_t &t,
                                                  int &g, int &chunk, int &split) {
  split = (int)(i % p.nsplit);
  i /= p.nsplit;
  chunk = (int)(i % p.nchunk);
  i /= p.nchunk;
  g = (int)(i % p.hkv);
  t = i / p.hkv;
}

/* Lane 0 issues everything, in the order the consumers use it (block by
 * block, half by half), so one wait at a time: lanes that each waited on their
 * own warp's slots ran their spin loops one divergent path at a time and
 * kept the ring half empty (ncu: consumers 54% of their stalls on full
 * slots, DRAM at 78%). An item's Q tile is requested before its selection
 * is read (it needs only the item's row and heads), and its top-k entries
 * before the row's lookup: at batch 1, where every CTA has one item, these
 * round trips were in series with the K/V loads. The descriptor's barrier
 * completes on the Q bytes and lane 0's arrival after it wrote the
 * descriptor. */
template <bool FP8>
static __device__ void at_produce(const attn_params &p, const CUtensorMap *kv_map,
                                  const CUtensorMap *q_map, int qbox, at_smem<FP8> &s,
                                  int64_t items, int lane) {
  typedef at_geom<FP8> G;
  const bool kps = FP8 && p.sc.k_per_slot, vps = FP8 && p.sc.v_per_slot;
  const uint32_t tx = G::slot_bytes + 512u * (kps + vps);
  uint32_t nf = 0; /* slots filled so far */
  uint32_t k = 0;
  for (int64_t i = blockIdx.x; i < items; i += gridDim.x, k++) {
    const uint32_t d = k % AT_DESC;
    int64_t t;
    int g, chunk, split;
    at_item_of(p, i, t, g, chunk, split);
    const int h0 = g * p.group + chunk * HEADS_PER_CTA;
    if (lane == 0) {
      sm90_bar_wait(&s.dempty[d], ((k / AT_DESC) & 1) ^ 1);
      sm90_bar_expect_tx(&s.dfull[d], 2u * (uint32_t)qbox * 128u);
      sm90_tma_load_3d(s.qtile[d], q_map, 0, h0, (int)t, &s.dfull[d]);
      sm90_tma_load_3d(s.qtile[d] + AT_UNIT_BYTES, q_map, 64, h0, (int)t, &s.dfull[d]);
    }
    int ids[2];
    at_topk_ids(p, t, g, lane, ids);
    const m3s_row_info ri = m3s_row_lookup(p.b, t);
    const int n = at_select(p, ri, ids, s, lane);
    const int per = (n + p.nsplit - 1) / p.nsplit;
    const int b0 = min(n, split * per), b1 = min(n, b0 + per);
    if (lane == 0) {
      int nvis_last = 0;
      if (b1 > b0) {
        int64_t nk = ri.pos + 1 - (int64_t)s.id[b1 - 1] * M3S_BLOCK_SIZE;
        nvis_last = nk > M3S_BLOCK_SIZE ? M3S_BLOCK_SIZE : (int)nk;
      }
      at_item it = {t, h0, min(HEADS_PER_CTA, p.group - chunk * HEADS_PER_CTA), split, b1 - b0,
                    nvis_last};
      s.item[d] = it;
      sm90_bar_arrive(&s.dfull[d]);
      for (int bi = b0; bi < b1; bi++) {
        const int nv = bi == b1 - 1 ? nvis_last : M3S_BLOCK_SIZE;
        const int page = (int)s.page[bi];
        for (int h = 0; h < G::spb; h++, nf++) {
          const int slot = (int)(nf % AT_RING);
          sm90_bar_wait(&s.empty[slot], ((nf / AT_RING) & 1) ^ 1);
          /* a half past the last visible key is not loaded; its consumers
           * still pass through the slot */
          if (G::rows * h >= nv) {
            sm90_bar_arrive(&s.full[slot]);
            continue;
          }
          sm90_bar_arrive_tx(&s.full[slot], tx);
#pragma unroll
          for (int seg = 0; seg < G::boxes; seg++)
            sm90_tma_load_4d(s.ring[slot] + seg * G::box_bytes, kv_map, seg * G::box_elems,
                             G::rows * h, g, page, &s.full[slot]);
          /* per-slot scales of the block's 128 keys (contiguous slots: see
           * m3s_attention_tma_plan) */
          const int64_t slot0 = (int64_t)page * M3S_BLOCK_SIZE;
          if (kps)
            sm90_bulk_load(s.scales[FP8 ? slot : 0], p.sc.k + g * p.sc.k_s0 + slot0, 512,
                           &s.full[slot]);
          if (vps)
            sm90_bulk_load(s.scales[FP8 ? slot : 0] + M3S_BLOCK_SIZE,
                           p.sc.v + g * p.sc.v_s0 + slot0, 512, &s.full[slot]);
        }
      }
    }
    __syncwarp(); /* s.id / s.page are rewritten by the next item */
  }
}

/* ---- the consumer warps ---------------------------------------------------- */

/* The Q tile (two boxes of 16 heads x 64 dims, 128-byte swizzle) as the A
 * fragments of the 8 k-steps: matrices (rows 0-7 | 8-15) x (k lo | hi). */
static __device__ __forceinline__ void at_load_q(uint32_t (&qa)[8][4], const unsigned char *tile,
                                                 int lane) {
  const int row = (lane & 7) + 8 * ((lane >> 3) & 1);
  const uint32_t base = smem_addr(tile);
#pragma unroll
  for (int ks = 0; ks < 8; ks++)
    ldsm_x4(qa[ks], base + unit_chunk<128, AT_UNIT_BYTES>(row, 2 * ks + (lane >> 4)));
}

/* Zeroes the V rows of keys nv..15 of a unit (the cache past pos may hold
 * NaN, and P = 0 times NaN is NaN); then the rows are visible to the warp
 * and ordered before the next TMA write of the slot. */
template <int SS>
static __device__ __forceinline__ void at_zero_tail(unsigned char *unit, int nv, int lane) {
#pragma unroll
  for (int j = 0; j < 8; j++) {
    const int e = 32 * j + lane, kr = e >> 4, seg = 2 + ((e >> 3) & 1), ch = e & 7;
    if (kr >= nv)
      *(uint4 *)(unit + seg * SS + kr * 128 + ch * 16) = make_uint4(0, 0, 0, 0);
  }
  sm90_fence_proxy_async();
  __syncwarp();
}

/* One fp8 unit: converted, the slot released, attended. */
template <bool F16, int SS, int MODE, bool VF16>
static __device__ __forceinline__ void at_fp8_unit(const attn_params &p, const unsigned char *unit,
                                                   const float *sc, unsigned char *tile,
                                                   unsigned long long *empty,
                                                   const uint32_t (&qa)[8][4], int nv,
                                                   const float *kscale, float sl2, warp_state &ws,
                                                   int lane) {
  at_dequant<F16, SS, MODE, VF16>(p, unit, sc, sc + M3S_BLOCK_SIZE, tile, nv, lane);
  __syncwarp(); /* the slot is read and the tile written by every lane */
  if (lane == 0)
    sm90_bar_arrive(empty);
  attend_unit<F16, 128, AT_UNIT_BYTES, VF16 || F16>(smem_addr(tile), qa, nv, kscale, sl2, ws,
                                                    lane);
  __syncwarp(); /* every lane's ldmatrix of the tile is done */
}

/* One fp8 unit whose S runs in f16 with V unscaled (no per-slot v
 * scales): K straight into registers (at_k_frags, converted before the
 * release so the slot's bytes are in registers), V (and the k scales) into
 * the tile, the slot released, attended; qa in at_load_q_perm's order. */
template <int SS, int MODE>
static __device__ __forceinline__ void at_fp8_unit_kreg(const attn_params &p,
                                                        const unsigned char *unit, const float *sc,
                                                        unsigned char *tile,
                                                        unsigned long long *empty,
                                                        const uint32_t (&qa)[8][4], int nv,
                                                        const float *kscale, float sl2,
                                                        warp_state &ws, int lane) {
  at_dequant<true, SS, MODE, true, false>(p, unit, sc, sc + M3S_BLOCK_SIZE, tile, nv, lane);
  uint32_t kb[2][8][2];
  at_k_frags<MODE>(unit, kb, lane);
  __syncwarp(); /* the slot is read and the tile written by every lane */
  if (lane == 0)
    sm90_bar_arrive(empty);
  attend_unit<true, 128, AT_UNIT_BYTES, true, 1, MASK_S, true>(smem_addr(tile), qa, nv, kscale,
                                                              sl2, ws, lane, kb);
  __syncwarp(); /* every lane's ldmatrix of the tile is done */
}

/* The item's eight warp states, merged in warp order, written out. */
template <class S>
static __device__ void at_store(const attn_params &p, const S &s, const at_item &it) {
  for (int pidx = threadIdx.x; pidx < HEADS_PER_CTA * 64; pidx += AT_CWARPS * 32) {
    const int r = pidx >> 6, d = (pidx & 63) * 2;
    if (r < it.nh)
      store_merged_pair<AT_CWARPS>(p, s.scratch[0], AT_SCRATCH_FLOATS, it.t, it.h0 + r, r, d,
                                   it.split);
  }
}

/* Under p.cmerge, by every thread after its role's loop: the cluster's
 * nsplit CTAs hold one item, split s in the CTA of cluster rank s (items
 * are numbered split fastest, one per CTA, clusters of nsplit along x).
 * The consumers merge their eight warp states (stashed at the item's end)
 * in warp order into the CTA's partial in ring slot 0 (AT_PART_M); once
 * the cluster barrier has published the partials, CTA s merges the s-th
 * nsplit-th of the item's (head, dim pair)s from all of them, read through
 * distributed shared memory, in split order 0..nsplit-1 as the merge kernel
 * does (../attention.cu), and writes out and lse. The second barrier keeps
 * each CTA's shared memory alive until its peers have read it. Outside the
 * consumers' item loop: inside it, the fp8 forms spilled their loop
 * counters (ptxas). */
template <class S>
static __device__ void at_cluster_merge(const attn_params &p, S &s) {
  int64_t t;
  int g, chunk, split;
  at_item_of(p, blockIdx.x, t, g, chunk, split);
  const int h0 = g * p.group + chunk * HEADS_PER_CTA;
  const int nh = min(HEADS_PER_CTA, p.group - chunk * HEADS_PER_CTA);
  float *part = (float *)s.ring[0];
  const int consumer = threadIdx.x < AT_CWARPS * 32;
  for (int pidx = threadIdx.x; consumer && pidx < nh * 64; pidx += AT_CWARPS * 32) {
    const int r = pidx >> 6, d = (pidx & 63) * 2;
    float mx, l, o0, o1;
    merge_warp_pair<AT_CWARPS>(s.scratch[0], AT_SCRATCH_FLOATS, r, d, mx, l, o0, o1);
    *(float2 *)&part[r * M3S_HEAD_DIM + d] = make_float2(o0, o1);
    if (d == 0) {
      part[AT_PART_M + r] = l > 0.0f ? mx : neg_inf();
      part[AT_PART_L + r] = l;
    }
  }
  sm90_cluster_sync(); /* every CTA's partial is in its slot 0 */
  /* CTA s: the s-th of nsplit equal ranges of the (head, dim pair)s (nsplit
   * divides 64), consecutive per thread: each warp reads 256 contiguous
   * bytes of a peer's partial and writes contiguous out */
  const int per = nh * 64 / p.nsplit;
  for (int u = split * per + (int)threadIdx.x; u < (split + 1) * per; u += AT_THREADS) {
    const int r = u >> 6, d = (u & 63) * 2;
    float m[AT_MAX_CLUSTER], lc[AT_MAX_CLUSTER], mx = neg_inf();
    float2 o[AT_MAX_CLUSTER];
#pragma unroll
    for (int c = 0; c < AT_MAX_CLUSTER; c++)
      if (c < p.nsplit) {
        m[c] = sm90_ld_peer(sm90_peer_addr(part + AT_PART_M + r, c));
        lc[c] = sm90_ld_peer(sm90_peer_addr(part + AT_PART_L + r, c));
        o[c] = sm90_ld_peer2(sm90_peer_addr(part + r * M3S_HEAD_DIM + d, c));
        mx = fmaxf(mx, m[c]);
      }
    /* every loaded value is consumed, also when no split saw a key (then
     * every partial is 0 / -inf and a = 0): the relaxed exit barrier below
     * relies on it */
    const bool any = mx != neg_inf();
    float l = 0.0f, o0 = 0.0f, o1 = 0.0f;
#pragma unroll
    for (int c = 0; c < AT_MAX_CLUSTER; c++)
      if (c < p.nsplit) {
        const float a = any ? exp2f(m[c] - mx) : 0.0f;
        l += lc[c] * a;
        o0 += o[c].x * a;
        o1 += o[c].y * a;
      }
    store_out_pair(p, t, h0 + r, d, mx, l, o0, o1);
  }
  /* this CTA's loads of its peers' partials have returned (every value went
   * into the stores above), so a relaxed arrive suffices before the peers
   * may exit, and this CTA's own exit waits for theirs */
  sm90_cluster_sync_relaxed();
}

/* KVM: KV_DIRECT (a cache of q's dtype), KV_E4M3 or KV_E5M2, a template
 * parameter so that the conversion unpacks one fp8 format, not both. */
template <bool F16, int KVM, bool FP8 = KVM != KV_DIRECT>
static __device__ void at_consume(const attn_params &p, at_smem<FP8> &s, int64_t items, int warp,
                                  int lane) {
  typedef at_geom<FP8> G;
  /* scalar fp8 scales: k folds into the score scale, v multiplies the
   * output (V is converted unscaled) */
  const float ks = FP8 && p.sc.k && !p.sc.k_per_slot ? p.sc.k[0] : 1.0f;
  const float vs = FP8 && p.sc.v && !p.sc.v_per_slot ? p.sc.v[0] : 1.0f;
  const float sl2 = p.scale_log2 * ks;
  unsigned char *tile = (unsigned char *)s.scratch[warp];
  const float *kscale = FP8 && p.sc.k_per_slot ? (const float *)(tile + AT_KSCALE_OFF) : NULL;
  /* the warp's slots: half h of every block, its unit at row 16 uw */
  const int h = warp / G::warps_per_slot, uw = warp % G::warps_per_slot;
  uint32_t nb = 0; /* blocks consumed so far */
  uint32_t k = 0;
  for (int64_t i = blockIdx.x; i < items; i += gridDim.x, k++) {
    const uint32_t d = k % AT_DESC;
    sm90_bar_wait(&s.dfull[d], (k / AT_DESC) & 1);
    const at_item it = s.item[d];
    uint32_t qa[8][4];
    /* S in f16 for an fp8 cache whose V is f16 (no per-slot v scales): q
     * already f16, or bf16 values that all are f16s; then K goes straight
     * into registers (at_fp8_unit_kreg) and Q takes its order of the dims */
    const bool kreg = FP8 && !p.sc.v_per_slot;
    bool qk16 = F16;
    if (it.n > 0) {
      if (kreg) {
        at_load_q_perm(qa, s.qtile[d], lane);
        if (!F16)
          qk16 = at_q_to_f16(qa);
        if (!qk16)
          at_load_q(qa, s.qtile[d], lane);
      } else {
        at_load_q(qa, s.qtile[d], lane);
      }
    }
    __syncwarp();
    if (lane == 0)
      sm90_bar_arrive(&s.dempty[d]);

    warp_state ws;
    warp_state_init(ws);
    for (int bi = 0; bi < it.n; bi++, nb++) {
      const int nv = (bi == it.n - 1 ? it.nvis_last : M3S_BLOCK_SIZE) - 16 * warp;
      const uint32_t seq = nb * G::spb + h;
      const int slot = (int)(seq % AT_RING);
      /* every warp of the slot waits and releases, keys or not: a release
       * before the fill would count toward the slot's previous use */
      sm90_bar_wait(&s.full[slot], (seq / AT_RING) & 1);
      unsigned char *unit = s.ring[slot] + uw * AT_UNIT_BYTES;
      if (nv <= 0) {
        __syncwarp();
      } else if (FP8) {
        const float *sc = s.scales[FP8 ? slot : 0] + 16 * uw;
        if (p.sc.v_per_slot)
          at_fp8_unit<F16, G::box_bytes, KVM, false>(p, unit, sc, tile, &s.empty[slot], qa, nv,
                                                     kscale, sl2, ws, lane);
        else if (qk16)
          at_fp8_unit_kreg<G::box_bytes, KVM>(p, unit, sc, tile, &s.empty[slot], qa, nv, kscale,
                                              sl2, ws, lane);
        else
          at_fp8_unit<false, G::box_bytes, KVM, true>(p, unit, sc, tile, &s.empty[slot], qa, nv,
                                                      kscale, sl2, ws, lane);
        continue;
      } else {
        if (nv < 16)
          at_zero_tail<G::box_bytes>(unit, nv, lane);
        attend_unit<F16, 128, G::box_bytes>(smem_addr(unit), qa, nv, NULL, sl2, ws, lane);
        __syncwarp(); /* every lane's ldmatrix of the slot is done */
      }
      if (lane == 0)
        sm90_bar_arrive(&s.empty[slot]);
    }

    if (FP8 && vs != 1.0f)
      scale_acc(ws, vs);
    stash_state(ws, s.scratch[warp], s.scratch[warp] + HEADS_PER_CTA * ACC_STRIDE, lane);
    at_consumer_sync();
    if (p.cmerge)
      continue; /* the CTA's one item: at_cluster_merge takes the states */
    at_store(p, s, it);
    at_consumer_sync(); /* the scratch is rewritten by the next item */
  }
}

template <bool F16, int KVM, bool FP8 = KVM != KV_DIRECT>
static __global__ void __launch_bounds__(AT_THREADS, 1)
    attn_tma_kernel(const attn_params p, const __grid_constant__ CUtensorMap kv_map,
                    const __grid_constant__ CUtensorMap q_map, int64_t items, int qbox) {
  extern __shared__ unsigned char at_raw[];
  /* 1024-byte aligned by an offset from the shared array itself (an integer
   * round trip would make every access through s a generic LD / ST) */
  at_smem<FP8> &s = *(at_smem<FP8> *)(at_raw + ((1024u - (sm90_smem(at_raw) & 1023u)) & 1023u));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
    for (int i = 0; i < AT_RING; i++) {
      sm90_bar_init(&s.full[i], 1);
      sm90_bar_init(&s.empty[i], at_geom<FP8>::warps_per_slot);
    }
    for (int i = 0; i < AT_DESC; i++) {
      sm90_bar_init(&s.dfull[i], 1);
      sm90_bar_init(&s.dempty[i], AT_CWARPS);
    }
    sm90_fence_barrier_init();
  }
  /* rows qbox..15 of the Q tiles are never loaded: zero padding */
  for (int i = threadIdx.x; i < AT_DESC * AT_QTILE_BYTES / 16; i += AT_THREADS)
    ((uint4 *)s.qtile)[i] = make_uint4(0, 0, 0, 0);
  sm90_fence_proxy_async();
  /* PDL (launch.h): the set-up above reads no global memory; the top-k and
   * the rest may come from the kernel before. One CTA per SM at most, so
   * the next kernel (the split merge, when it runs) may start behind this
   * grid. */
  m3s_pdl_wait();
  if (p.pdl)
    m3s_pdl_trigger();
  __syncthreads();

  if (warp == AT_CWARPS)
    at_produce<FP8>(p, &kv_map, &q_map, qbox, s, items, lane);
  else
    at_consume<F16, KVM>(p, s, items, warp, lane);
  if (p.cmerge)
    at_cluster_merge(p, s);
}

/* ---- host ---------------------------------------------------------------------- */

static int aligned16(const void *ptr) { return (uintptr_t)ptr % 16 == 0; }

/* Query heads per Q box: the group, at most one chunk of 16. */
static int at_qbox(int64_t group) { return group < HEADS_PER_CTA ? (int)group : HEADS_PER_CTA; }

/* One instantiation of the kernel, for at_prepare_modes / at_run_mode. */
template <bool F16, int KVM>
struct at_kernel {
  static cudaError_t prepare(void) {
    return cudaFuncSetAttribute(attn_tma_kernel<F16, KVM>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize,
                                (int)at_smem_bytes<KVM != KV_DIRECT>());
  }
  static void run(const attn_params &p, const m3s_attn_tma_maps &maps, unsigned grid,
                  int64_t items, cudaStream_t stream, int pdl) {
    /* its error is left as the last error, read by m3s_cuda_check_launch */
    (void)m3s_launch_cl(pdl, p.cmerge ? (unsigned)p.nsplit : 1u, attn_tma_kernel<F16, KVM>,
                        dim3(grid), dim3(AT_THREADS), at_smem_bytes<KVM != KV_DIRECT>(), stream,
                        p, maps.kv, maps.q, items, maps.qbox);
  }
};

extern "C" cudaError_t m3s_attention_tma_prepare(void) { return at_prepare_modes<at_kernel>(); }

/* How many CTAs of instantiation k (its shared memory, one CTA per SM) the
 * current device runs as a cluster of c at once; 0 on error. */
template <typename K>
static int at_active_clusters(K k, size_t smem, unsigned c) {
  cudaLaunchAttribute at = m3s_cluster_attr(c);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(c);
  cfg.blockDim = dim3(AT_THREADS);
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = &at;
  cfg.numAttrs = 1;
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, k, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

extern "C" int m3s_attention_tma_clusters(int c) {
  if (c < 2 || c > AT_MAX_CLUSTER)
    return 0;
  const int a = at_active_clusters(attn_tma_kernel<false, KV_DIRECT>, at_smem_bytes<false>(), c);
  const int b = at_active_clusters(attn_tma_kernel<false, KV_E4M3>, at_smem_bytes<true>(), c);
  return a < b ? a : b;
}

/* The cache as [pages][Hkv][128 slots][256] with the caller's strides, boxes
 * of 128 bytes (64 16-bit elements or 128 fp8) x at_geom::rows slots; q as
 * [T][Hq][128], boxes of 64 dims x qbox heads (not encoded when q_map is
 * NULL). Both with the 128-byte
 * swizzle of unit_chunk<128, 2048>. */
static int at_maps(const m3s_context *ctx, const m3s_tensor *q, const m3s_tensor *kv, int qbox,
                   CUtensorMap *kv_map, CUtensorMap *q_map) {
  PFN_cuTensorMapEncodeTiled_v12000 enc =
      (PFN_cuTensorMapEncodeTiled_v12000)m3s_cuda_tmap_encoder(ctx);
  const CUtensorMapDataType qdt =
      q->dtype == M3S_F16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const size_t es = m3s_dtype_size(kv->dtype);
  const CUtensorMapDataType kdt = es == 1 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : qdt;
  const cuuint32_t step[4] = {1, 1, 1, 1};
  cuuint64_t kdims[4] = {2 * M3S_HEAD_DIM, M3S_BLOCK_SIZE, (cuuint64_t)kv->shape[1],
                         (cuuint64_t)kv->shape[0]};
  cuuint64_t kstr[3] = {(cuuint64_t)kv->stride[2] * es, (cuuint64_t)kv->stride[1] * es,
                        (cuuint64_t)kv->stride[0] * es};
  cuuint32_t kbox[4] = {(cuuint32_t)(128 / es),
                        (cuuint32_t)(es == 1 ? at_geom<true>::rows : at_geom<false>::rows), 1, 1};
  if (enc(kv_map, kdt, 4, kv->data, kdims, kstr, kbox, step, CU_TENSOR_MAP_INTERLEAVE_NONE,
          CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
          CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
    return 0;
  if (!q_map) /* the union kernel loads q itself */
    return 1;
  cuuint64_t qdims[3] = {M3S_HEAD_DIM, (cuuint64_t)q->shape[1], (cuuint64_t)q->shape[0]};
  cuuint64_t qstr[2] = {(cuuint64_t)q->stride[1] * 2, (cuuint64_t)q->stride[0] * 2};
  cuuint32_t qb[3] = {64, (cuuint32_t)qbox, 1};
  return enc(q_map, qdt, 3, q->data, qdims, qstr, qb, step, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

/* A per-slot scale tensor [Hkv][P * 128] the producer can bulk-copy a
 * block's 128 slots of: contiguous slots, 16-byte aligned base and head
 * stride. */
static int at_scale_ok(const float *base, int per_slot, int64_t s0, int64_t s1) {
  return !base || !per_slot || (aligned16(base) && s1 == 1 && s0 % 4 == 0);
}

/* What both TMA kernels need of the call's tensors: bf16 / f16 q, a cache
 * of q's dtype or e4m3 / e5m2, 16-byte aligned bases and strides, int32
 * coordinates, per-slot scales the producer can bulk-copy. */
static int at_tensors_ok(const m3s_tensor *q, const m3s_tensor *kv, const m3s_kv_scales *scales) {
  const bool fp8 = kv->dtype == M3S_E4M3 || kv->dtype == M3S_E5M2;
  if ((q->dtype != M3S_BF16 && q->dtype != M3S_F16) || (!fp8 && kv->dtype != q->dtype))
    return 0;
  const int64_t kvec = fp8 ? 16 : 8;
  if (!(aligned16(kv->data) && aligned16(q->data) && kv->stride[3] == 1 && q->stride[2] == 1 &&
        kv->stride[0] % kvec == 0 && kv->stride[1] % kvec == 0 && kv->stride[2] % kvec == 0 &&
        q->stride[0] % 8 == 0 && q->stride[1] % 8 == 0 && kv->shape[0] <= INT32_MAX &&
        q->shape[0] <= INT32_MAX && q->shape[1] <= INT32_MAX && kv->shape[1] > 0))
    return 0;
  const m3s_cuda_scales sc = m3s_cuda_scales_of(scales, kv->dtype);
  return at_scale_ok(sc.k, sc.k_per_slot, sc.k_s0, sc.k_s1) &&
         at_scale_ok(sc.v, sc.v_per_slot, sc.v_s0, sc.v_s1);
}

int m3s_attention_tma_plan(const m3s_context *ctx, const m3s_batch *batch, const m3s_tensor *q,
                           const m3s_tensor *kv, const m3s_kv_scales *scales,
                           m3s_attn_tma_maps *maps) {
  /* The choice follows host bounds, so under M3S_OPT_BATCH_INVARIANT every
   * batch takes the generic kernel (a row's bits must not depend on it). */
  if (m3s_cuda_attention_generic(ctx) || ctx->batch_invariant || m3s_cuda_sm_major(ctx) != 9 ||
      !m3s_cuda_tmap_encoder(ctx))
    return M3S_ATTN_GENERIC;
  int kind;
  if (batch->max_q_len == 1) {
    if (!at_tensors_ok(q, kv, scales))
      return M3S_ATTN_GENERIC;
    kind = M3S_ATTN_PERSISTENT;
  } else {
    /* rows that share blocks (prefill, speculative tokens): the union
     * kernel (sm90/attention_union.cu), 16-bit and fp8 caches */
    if (!at_tensors_ok(q, kv, scales) ||
        !m3s_attention_union_pays(ctx, batch, q->shape[1] / kv->shape[1], kv->shape[1], kv->dtype))
      return M3S_ATTN_GENERIC;
    kind = M3S_ATTN_UNION;
  }
  maps->qbox = at_qbox(q->shape[1] / kv->shape[1]);
  return at_maps(ctx, q, kv, maps->qbox, &maps->kv, kind == M3S_ATTN_UNION ? NULL : &maps->q)
             ? kind
             : M3S_ATTN_GENERIC;
}

extern "C" int m3s_attention_tma_eligible(const m3s_context *ctx, const m3s_batch *batch,
                                          const m3s_tensor *q, const m3s_tensor *kv,
                                          const m3s_kv_scales *scales) {
  m3s_attn_tma_maps maps;
  return m3s_attention_tma_plan(ctx, batch, q, kv, scales, &maps);
}

m3s_status m3s_attention_tma_launch(const m3s_context *ctx, const attn_params &p,
                                    const m3s_attn_tma_maps &maps, bool f16, cudaStream_t stream,
                                    const char *fn) {
  const int64_t items = (int64_t)p.b.num_tokens * p.hkv * p.nchunk * p.nsplit;
  const int64_t sms = m3s_cuda_num_sms(ctx);
  const unsigned grid = (unsigned)(items < sms ? items : sms);
  if (grid == 0)
    return M3S_OK;
  /* a cluster merge needs one item per CTA (m3s_cuda_sparse_attention plans
   * it so) */
  if (p.cmerge && ((int64_t)grid != items || p.nsplit < 2 || p.nsplit > AT_MAX_CLUSTER))
    return m3s_fail(M3S_ERR_INTERNAL, fn, "cluster merge planned for %lld items, %d splits",
                    (long long)items, p.nsplit);
  attn_params pp = p;
  pp.pdl = m3s_cuda_pdl(ctx, p.b.num_reqs);
  at_run_mode<at_kernel>(f16, pp, maps, grid, items, stream, pp.pdl);
  return m3s_cuda_check_launch(fn, "attn_tma_kernel");
}
