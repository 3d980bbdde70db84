/* CUDA backend, sm_90a: block-sparse GQA attention (SPEC section 4) for
 * batches whose rows share blocks (prefill, chunked prefill, speculative
 * decode: max_q_len > 1) on a 16-bit cache of q's dtype or an e4m3 / e5m2
 * cache (scalar or per-slot scales): the union kernel (../attention.cu
 * dispatches through m3s_attention_tma_plan).
 *
 * Why: the generic kernel runs a CTA per (row, KV head), so a block that
 * the 8 neighbouring rows of one KV head all selected (their own local
 * block, at least) is read through L2 8 times. At 64K tokens that is 275 GB
 * of L2 traffic, which binds it (ncu, H200: L2 at 70% of its peak, tensor
 * pipes 18% active; docs/perf-notes.md, "Prefill attention, next"). Here a
 * CTA owns AU_TOKENS consecutive rows of one KV head and reads the union of
 * their selections once; each row still computes only its own blocks.
 *
 * What the kernel does (one CTA per item (KV head g, head chunk, group of
 * AU_TOKENS rows), head-major so that the CTAs in flight read one KV head's
 * blocks; 8 consumer warps + 1 producer warp, 4 for an fp8 cache; one CTA
 * per SM)
 *  1. Selections: consumer warp w reads row t0 + w's selection as the
 *     persistent kernel does (at_select, attention_fp8.cuh: what the
 *     generic kernel drops is dropped, the rest ascending by id, so every
 *     row visits its blocks in ascending id, as the CPU reference does;
 *     duplicate ids stay, visited twice, as there).
 *  2. Producer: merges the 8 sorted lists under key = (first row of the
 *     group with the same request) << 24 | block id, so that rows of one
 *     request list a block under the same key (lane w holds row w's
 *     cursor; a warp minimum per step), and for each key of the union fills
 *     a ring of 16-bit half slots of 32 KiB (au_geom) with the block's
 *     halves of 64 keys that any of its rows sees (a half past every such
 *     row's pos is not filled): for a 16-bit cache by TMA (128-byte
 *     swizzle, the persistent kernel's 4-D map of the cache), 6 slots; for
 *     fp8 the whole block and its per-slot scales land by TMA in one of two
 *     raw slots, one block ahead, and the 4 producer warps (each walking
 *     the same merge) convert the block once for the CTA into the half
 *     slots, 16 keys of a half each (au_convert_half: K exact in q's dtype, V
 *     exact or times its per-slot scale, the same 128-byte swizzle), 4
 *     slots; and queues a descriptor per slot: the rows that selected the
 *     block (a bit each), its id, the half, the slot. A last descriptor
 *     marks the end.
 *  3. Consumers: warp w holds row w's 16 query heads (the m16 rows of
 *     mma.sync; rows >= G are zero padding) as A fragments, reads every
 *     descriptor, and only where its bit is set waits for the slot and
 *     attends to its keys: a 16-bit half in place, in steps of 32 keys
 *     (attend_unit with two key groups: S = Q K^T on mma.sync, fp32 online
 *     softmax in the exp2 domain, O += P V), keys after pos masked and
 *     their V values zeroed in registers (the slot is shared), the same for
 *     both cache kinds (an fp8 cache's per-slot k scales multiply the
 *     scores, a scalar k scale folds into the score scale, a scalar v scale
 *     multiplies the output); the slot released after the last step. Until
 *     2026-12-04 every row's warp converted each fp8 block it read into a
 *     16-bit tile of its own, 16 keys at a time: 6.11 ms for the 8K
 *     prompt's e4m3 cache against 2.84 for bf16. A row's state
 *     is never split or merged: the epilogue writes out (q's dtype, RNE) and
 *     lse from the warp's registers. Rows with no visible key give out = 0,
 *     lse = -inf.
 *  3'. Under the wgmma switch (m3s_attention_set_union_wgmma, not the
 *     default until measured) the 8 consumer warps act as two warpgroups of
 *     4 rows x 16 heads (m64 tiles) and run each half with wgmma for all 4
 *     rows, masking the rows that did not select it (au_consume_wg); the
 *     producers then also zero V past every row's pos in the slot.
 *  A row's result depends on its own selection and the cache only, not on
 *  its neighbours (its blocks in ascending id, 32 or 16 keys at a time); the
 *  kernel's choice follows host bounds, so under M3S_OPT_BATCH_INVARIANT it
 *  is not used.
 *
 * Queues: the descriptors (AU_DESC entries: dfull, the producer's arrive
 * once it wrote one; dempty, one arrive per consumer warp once it read it:
 * every warp reads every descriptor, in order) and the slots (full: the
 * producer's arrive + 32 KiB of TMA bytes; empty: one arrive per consumer
 * warp, each reading warp's once its reads are done and the producer's for
 * the warps that do not read the fill, right after it took the slot (an
 * earlier version counted the readers down with a shared atomicSub and had
 * the last one arrive: compute-sanitizer's racecheck does not follow such a
 * chain and reported the fp8 converters' refills as hazards); an fp8 half
 * slot's full barrier completes on the arrives of all 128 converting
 * threads, each after its own stores; a raw slot's, rfull, on its TMA
 * bytes, and its rempty on the 128 threads' arrives after their reads). A warp waits
 * only on the slots of its own blocks and never holds a slot it does not
 * read (an earlier version had every warp pass every slot; it measured the
 * same, 36.3 against 36.5 ms at 64K: what limits large unions is the ring's
 * residency, below). Slots are filled in order, each once its previous rows
 * are done; a descriptor carries its slot's phase parity (the slot cannot
 * move on before the warp that reads it). Phases follow from the counters,
 * which producer and consumers advance alike.
 *
 * Graph-safe: no allocation, no synchronisation, lengths and selections read
 * on the device; the tensor map is encoded on the host per call (a kernel
 * parameter).
 *
 * Load balance: every row computes exactly its own blocks; a warp may run
 * AU_DESC slots ahead of the slowest one, and 6 16-bit halves or 4 fp8
 * blocks are resident.
 *
 * Registers: 168 (the most 9 warps leave: 3 of them share one SM
 * sub-partition's registers; 12 warps for fp8 leave the same); ptxas
 * (sm_90a, nvcc 13.0, session 13): the mma.sync forms spill 16 bytes
 * (16-bit; 12 before the producer's WG form, 4 in the measured version of
 * session 9) and 32 (f16 q) / 48 bytes (bf16 q: two P V dtypes) for fp8, not
 * yet located; the six wgmma forms do not spill.
 * Measured (H200, m3s-bench, graph replays, bf16, against the generic
 * kernel; docs/perf-notes.md "Measured: the union kernel"): 8K prompt with
 * independent per-row draws 2.77 ms (4.18), 16K 6.90 (8.73), 32K 16.2
 * (17.9), 64K 36.5 (36.4), 4K behind 60K 2.69 (2.33); rows of a query block
 * sharing their draw: 8K 2.24 (4.14), 64K 19.3 (36.3). Where a group's
 * union is large the ring turns over at the pace of L2 latency plus
 * compute with only 192 KiB resident (hence the 32K rule of
 * m3s_attention_union_pays); ncu: ~2 warps per scheduler, 0.3-0.5 issued
 * per cycle, tensor pipe 26%: latency-bound. fp8 (8K prompt, e4m3, per-row
 * draws): with one converting warp 8.07 ms, against 6.59 on the generic
 * kernel and 2.86 for bf16 (docs/perf-notes.md, session 13); hence 4. The
 * fp8 path is reached only through the union switch. */
#include "../attention.cuh"
#include "attention_fp8.cuh"
#include "attention_tma.h"
#include "tma.cuh"
#include "wgmma.cuh"

#define AU_TOKENS 8                           /* rows per CTA = consumer warps */
#define AU_CONV 4                             /* fp8: producer warps that convert */
#define AU_HALF 64                            /* keys per 16-bit slot */
#define AU_SLOT_BYTES 32768                   /* half a 16-bit block, a whole fp8 one */
#define AU_STEP 32                            /* keys per softmax step (16-bit) */
#define AU_GROUPS (AU_STEP / 16)              /* key groups of 16 per step */
#define AU_DESC 32                            /* descriptors in the queue */
#define AU_ID_BITS 24                         /* block ids: pos < 2^31 */
#define AU_END 0x200u                         /* descriptor: no more slots */

/* Threads: the consumer warps and one producer warp, or for an fp8 cache
 * AU_CONV producer warps that convert (one of them also loads). 12 warps
 * leave 168 registers as 9 do (65536 / 384, rounded down to 8). */
template <bool FP8>
static constexpr int au_threads() { return (AU_TOKENS + (FP8 ? AU_CONV : 1)) * 32; }

static_assert(AU_TOKENS <= 8 && (1 << (32 - AU_ID_BITS)) >= AU_TOKENS, "keys fit 32 bits");

/* The consumers read 16-bit halves of blocks (64 keys: four boxes of 64 keys
 * x 128 bytes, the 128-byte swizzle) from a ring of slots. A 16-bit cache's
 * half is such a slot as TMA lands it. An fp8 block lands whole in a raw
 * staging slot (two boxes of 128 keys x 128 bytes, + its per-slot scales),
 * and the producer warp converts it once for the CTA into the half slots
 * (au_convert_half), so the fp8 ring holds four halves and two raw blocks.
 * rows, boxes, box_elems, box_bytes: what one TMA load lands. */
template <bool FP8>
struct au_geom {
  static constexpr int rows = FP8 ? M3S_BLOCK_SIZE : AU_HALF; /* keys per TMA load */
  static constexpr int boxes = FP8 ? 2 : 4;
  static constexpr int box_elems = FP8 ? 128 : 64;
  static constexpr int box_bytes = rows * 128;
  static constexpr int ring = FP8 ? 4 : 6; /* 16-bit half slots */
  static constexpr int raw = FP8 ? 2 : 0;  /* fp8 staging slots */
};
static_assert(au_geom<true>::boxes * au_geom<true>::box_bytes == AU_SLOT_BYTES &&
                  au_geom<false>::boxes * au_geom<false>::box_bytes == AU_SLOT_BYTES,
              "32 KiB slots");

/* One row's selection, at_select's layout. */
typedef struct {
  int raw_id[M3S_MAX_TOPK];
  int id[M3S_MAX_TOPK];
  int64_t raw_page[M3S_MAX_TOPK];
  int64_t page[M3S_MAX_TOPK];
} au_row;

template <bool FP8>
struct au_smem {
  typedef au_geom<FP8> G;
  /* first: 1024-byte aligned (the 128-byte swizzle repeats every 1 KiB) */
  unsigned char ring[G::ring][AU_SLOT_BYTES];
  unsigned char raw[FP8 ? G::raw : 1][FP8 ? AU_SLOT_BYTES : 16];
  float scales[FP8 ? G::raw : 1][FP8 ? 2 * M3S_BLOCK_SIZE : 4]; /* per-slot: k, then v */
  float hks[FP8 ? G::ring : 1][FP8 ? AU_HALF : 4];             /* a half's per-slot k scales */
  au_row row[AU_TOKENS]; /* each row's sorted selection (at_select) */
  int64_t pos[AU_TOKENS];
  int req[AU_TOKENS];
  int n[AU_TOKENS];
  /* descriptor queue, in union order */
  uint32_t dmask[AU_DESC]; /* rows (bits 0..7), half (bit 8), AU_END */
  int32_t did[AU_DESC];    /* block id */
  uint32_t dslot[AU_DESC]; /* slot (bits 0..7), its fill's phase parity (bit 8) */
  unsigned long long full[G::ring], empty[G::ring];
  unsigned long long rfull[FP8 ? G::raw : 1];  /* a raw slot's TMA bytes */
  unsigned long long rempty[FP8 ? G::raw : 1]; /* every converting thread done with it */
  unsigned long long tfull[FP8 ? 1 : G::ring];   /* wgmma consumers: a partial half's TMA bytes */
  unsigned long long dfull[AU_DESC], dempty[AU_DESC];
};

template <bool FP8>
static constexpr size_t au_smem_bytes() { return sizeof(au_smem<FP8>) + 1024; }

/* ---- phase 1: the rows' selections ------------------------------------------ */

/* Row t's sorted selection into s.row[w] (at_select), its size, request
 * and pos. */
template <class S>
static __device__ void au_select(const attn_params &p, int64_t t, int g, S &s, int w, int lane) {
  int ids[2] = {-1, -1};
  if (t < p.b.num_tokens) /* the last group's rows past the batch read nothing */
    at_topk_ids(p, t, g, lane, ids);
  const m3s_row_info ri = m3s_row_lookup(p.b, t);
  const int n = at_select(p, ri, ids, s.row[w], lane);
  if (lane == 0) {
    s.n[w] = n;
    s.req[w] = ri.valid ? ri.r : -1 - w; /* a row without keys matches none */
    s.pos[w] = ri.pos;
  }
}

/* ---- phase 2: the producer warp ------------------------------------------ */

/* Visible keys of block id for a row at pos: min(128, pos + 1 - 128 id). */
static __device__ __forceinline__ int au_visible(int64_t pos, int id) {
  const int64_t nk = pos + 1 - (int64_t)id * M3S_BLOCK_SIZE;
  return nk > M3S_BLOCK_SIZE ? M3S_BLOCK_SIZE : (int)nk;
}

/* The group's first row of row lane's request (lanes >= AU_TOKENS: lane):
 * a row's keys are first << AU_ID_BITS | block id, so that rows of one
 * request list a block under the same key. */
template <class S>
static __device__ __forceinline__ uint32_t au_first(const S &s, int lane) {
  uint32_t first = lane;
  for (int o = 0; o < lane && lane < AU_TOKENS; o++)
    if (s.req[o] == s.req[lane]) {
      first = o;
      break;
    }
  return first;
}

/* One union block: the rows that selected it, its id, the most keys any of
 * them sees, its page. */
typedef struct {
  uint32_t rows;
  int id, nv, page;
} au_blk;

/* One merge step (every lane): the smallest head key of the rows' lists,
 * the rows whose head it is (they advance cur), the most keys any of them
 * sees and the page (the same for all of them: one request, one id); false
 * when every list is done. */
template <class S>
static __device__ __forceinline__ bool au_next(const S &s, int n, int64_t pos, uint32_t first,
                                               int &cur, au_blk &b, int lane) {
  const uint32_t head =
      cur < n ? (first << AU_ID_BITS) | (uint32_t)s.row[lane].id[cur] : 0xffffffffu;
  const uint32_t key = __reduce_min_sync(0xffffffffu, head);
  if (key == 0xffffffffu)
    return false;
  const bool mine = head == key;
  b.rows = __ballot_sync(0xffffffffu, mine);
  b.id = (int)(key & ((1u << AU_ID_BITS) - 1));
  b.nv = __reduce_max_sync(0xffffffffu, mine ? au_visible(pos, b.id) : 0);
  b.page = __shfl_sync(0xffffffffu, mine ? (int)s.row[lane].page[cur] : 0, __ffs(b.rows) - 1);
  cur += mine;
  return true;
}

/* Lane 0: descriptor nd (the rows, the half, the block id, the slot and its
 * fill's phase parity) once the consumers have read its previous use. */
template <class S>
static __device__ __forceinline__ void au_publish(S &s, uint32_t nd, uint32_t rows, int h, int id,
                                                  int slot, uint32_t par) {
  const int d = (int)(nd % AU_DESC);
  sm90_bar_wait(&s.dempty[d], ((nd / AU_DESC) & 1) ^ 1);
  s.dmask[d] = rows | ((uint32_t)h << 8);
  s.did[d] = id;
  s.dslot[d] = (uint32_t)slot | (par << 8);
  sm90_bar_arrive(&s.dfull[d]);
}

/* Lane 0: the last descriptor. */
template <class S>
static __device__ __forceinline__ void au_publish_end(S &s, uint32_t nd) {
  const int d = (int)(nd % AU_DESC);
  sm90_bar_wait(&s.dempty[d], ((nd / AU_DESC) & 1) ^ 1);
  s.dmask[d] = AU_END;
  sm90_bar_arrive(&s.dfull[d]);
}

/* Warpgroups among the rows `rows` (bits 0..7): which of the two read a
 * slot (au_consume_wg). */
static __device__ __forceinline__ int au_groups(uint32_t rows) {
  return ((rows & 0x0fu) != 0) + ((rows & 0xf0u) != 0);
}

/* The producer's arrivals on a fill's empty barrier for the consumer warps
 * that will not read it (rows: bits 0..7): the warps of a warpgroup none of
 * whose rows selected the block (WG), else the rows that did not. */
template <bool WG, class S>
static __device__ __forceinline__ void au_arrive_absent(S &s, int slot, uint32_t rows) {
  const int readers = WG ? 4 * au_groups(rows) : __popc(rows);
  if (readers < AU_TOKENS)
    sm90_bar_arrive_n(&s.empty[slot], AU_TOKENS - readers);
}

/* 16-bit cache: per union block, per half that any of its rows sees, a
 * slot (in fill order, once the rows of its previous fill are done with it),
 * the TMA copies (lane 0), then the descriptor. WG (consumers in
 * warpgroups, au_consume_wg): every lane arrives on the slot's full barrier
 * (count 32; lane 0 adds the TMA bytes), and where the half has keys past
 * every row's position (nv < 64) the copies land on tfull first and the warp
 * zeroes those keys' V rows before it arrives: a warpgroup's P V reads V
 * straight from the slot, for rows whose P is 0 there too, and 0 x a NaN the
 * cache holds past pos is NaN (the mma.sync consumers zero V in registers,
 * MASK_SV). The reading warps (4 per warpgroup, or the rows) release the
 * slot one by one; the producer arrives for the others (au_arrive_absent). */
template <bool WG>
static __device__ void au_produce(const CUtensorMap *kv_map, int g, au_smem<false> &s, int lane) {
  typedef au_geom<false> G;
  const int n = lane < AU_TOKENS ? s.n[lane] : 0;
  const int64_t pos = lane < AU_TOKENS ? s.pos[lane] : 0;
  const uint32_t first = au_first(s, lane);
  int cur = 0;
  uint32_t nf = 0, nd = 0; /* slots filled, descriptors written */
  uint32_t tphase = 0;     /* WG: per slot, the parity of its next tfull phase */
  au_blk b;
  while (au_next(s, n, pos, first, cur, b, lane)) {
    for (int h = 0; h * G::rows < b.nv; h++, nf++, nd++) {
      const int slot = (int)(nf % G::ring);
      const uint32_t par = (nf / G::ring) & 1;
      const int nvh = b.nv - G::rows * h; /* keys of the half some row sees */
      const bool part = WG && nvh < G::rows;
      /* WG: every lane, so that no lane arrives for this fill before the
       * slot's previous fill completed and was released */
      if (WG || lane == 0)
        sm90_bar_wait(&s.empty[slot], par ^ 1);
      if (lane == 0) {
        au_arrive_absent<WG>(s, slot, b.rows);
        unsigned long long *bar = part ? &s.tfull[slot] : &s.full[slot];
        if (WG && !part)
          sm90_bar_expect_tx(bar, AU_SLOT_BYTES);
        else
          sm90_bar_arrive_tx(bar, AU_SLOT_BYTES);
#pragma unroll
        for (int seg = 0; seg < G::boxes; seg++)
          sm90_tma_load_4d(s.ring[slot] + seg * G::box_bytes, kv_map, seg * G::box_elems,
                           G::rows * h, g, b.page, bar);
      }
      if (WG) {
        if (part) {
          sm90_bar_wait(&s.tfull[slot], (tphase >> slot) & 1);
          tphase ^= 1u << slot;
          /* V rows nvh .. 63 of both V boxes (whole 128-byte rows: the
           * swizzle only permutes pieces inside a row) */
          const int pieces = (G::rows - nvh) * 16;
          for (int i = lane; i < pieces; i += 32) {
            const int key = nvh + (i >> 4), box = 2 + ((i >> 3) & 1);
            *(uint4 *)(s.ring[slot] + box * G::box_bytes + key * 128 + (i & 7) * 16) =
                make_uint4(0, 0, 0, 0);
          }
          sm90_fence_proxy_async(); /* the zeros before the wgmma's (async-proxy) reads */
        }
        sm90_bar_arrive(&s.full[slot]);
      }
      if (lane == 0)
        au_publish(s, nd, b.rows, h, b.id, slot, par);
    }
    __syncwarp();
  }
  if (lane == 0)
    au_publish_end(s, nd);
}

/* Half h (keys 64 h .. 64 h + 63) of the fp8 block in raw slot `raw`
 * (scales rsc: k, then v) into the 16-bit half slot dst, as a 16-bit
 * cache's half lands (unit_chunk<128, 8192>): K exact in q's dtype (every
 * fp8 value is a bf16 and an f16), its per-slot k scales to ks (attend_unit
 * multiplies the scores by them); V exact in f16 and unscaled (a scalar v
 * scale multiplies the output; P V then runs in f16, P keeping 11 bits, as
 * in the persistent kernel) or, with per-slot v scales, times its scale in
 * q's dtype (RNE), as the generic kernel's dequant_fp8. Keys past every row's
 * pos are converted too: the consumers mask them in registers (MASK_SV).
 * Converting warp cw (of AU_CONV) takes keys 16 cw .. 16 cw + 15 of the
 * half; a pass: lane l takes chunk l & 7 of key 4 i + kofs (at_dequant's
 * order, attention_fp8.cuh). WG: V rows
 * nvh .. 63 (past every row's pos) are written as zeros. */
template <bool F16, int MODE, bool WG>
static __device__ __forceinline__ void au_convert_half(const attn_params &p,
                                                       const unsigned char *raw, const float *rsc,
                                                       int h, int nvh, unsigned char *dst,
                                                       float *ks, int cw, int lane) {
  typedef au_geom<true> R;
  typedef au_geom<false> H;
  constexpr int keys = AU_HALF / AU_CONV; /* per converting warp */
  if (p.sc.k_per_slot && lane < keys)
    ks[keys * cw + lane] = rsc[AU_HALF * h + keys * cw + lane];
  const bool vps = p.sc.v_per_slot;
  /* at_dequant's lane order: a 128-bit phase converts chunks 0-3 of one key
   * and 4-7 of its other-parity neighbour, so neither its reads nor its
   * stores meet on a bank */
  const int cc = lane & 7, ph = lane >> 3;
  const int kofs = (ph & 2) + ((ph ^ (cc >> 2)) & 1);
#pragma unroll 1
  for (int part = 0; part < 2; part++)
#pragma unroll
    for (int i = keys / 4 * cw; i < keys / 4 * (cw + 1); i++) {
      const int kr = 4 * i + kofs, kb = AU_HALF * h + kr;
      const uint4 w = *(const uint4 *)(raw + part * R::box_bytes + kb * 128 + ((cc ^ (kb & 7)) << 4));
      uint32_t o[8];
      if (part == 0)
        fp8_chunk_exact<F16, MODE>(w, o);
      else if (WG && kr >= nvh) /* V past every row's pos: zero (au_consume_wg) */
        o[0] = o[1] = o[2] = o[3] = o[4] = o[5] = o[6] = o[7] = 0u;
      else if (!vps)
        fp8_chunk_exact<true, MODE>(w, o);
      else
        fp8_chunk_to16<F16>(w, MODE, rsc[M3S_BLOCK_SIZE + kb], o);
      const int q = 16 * part + 2 * cc;
      *(uint4 *)(dst + unit_chunk<128, H::box_bytes>(kr, q)) = make_uint4(o[0], o[1], o[2], o[3]);
      *(uint4 *)(dst + unit_chunk<128, H::box_bytes>(kr, q + 1)) =
          make_uint4(o[4], o[5], o[6], o[7]);
    }
}

/* fp8 block b, landed (or landing) in raw slot nr % 2 as the nr-th raw load:
 * per half that any of its rows sees, a half slot (in fill order, once the
 * rows of its previous fill are done with it), the conversion by the
 * AU_CONV warps (cw: this one), every converting thread's arrival on the
 * slot (each arrives for its own writes), and by warp 0 of them the
 * descriptor. Then every converting thread frees the raw slot for its
 * reload (rempty): the proxy fence orders its reads before the TMA's
 * write. */
template <bool F16, int MODE, bool WG>
static __device__ void au_convert_block(const attn_params &p, au_smem<true> &s, const au_blk &b,
                                        uint32_t nr, uint32_t &nf, uint32_t &nd, int cw,
                                        int lane) {
  typedef au_geom<true> G;
  const int r = (int)(nr % G::raw);
  sm90_bar_wait(&s.rfull[r], (nr / G::raw) & 1);
  for (int h = 0; h * AU_HALF < b.nv; h++, nf++, nd++) {
    const int slot = (int)(nf % G::ring);
    const uint32_t par = (nf / G::ring) & 1;
    sm90_bar_wait(&s.empty[slot], par ^ 1);
    if (cw == 0 && lane == 0)
      au_arrive_absent<WG>(s, slot, b.rows);
    au_convert_half<F16, MODE, WG>(p, s.raw[r], s.scales[r], h, b.nv - AU_HALF * h, s.ring[slot],
                                   s.hks[slot], cw, lane);
    if (WG) /* the stores before the wgmma's (async-proxy) reads */
      sm90_fence_proxy_async();
    sm90_bar_arrive(&s.full[slot]);
    if (cw == 0 && lane == 0)
      au_publish(s, nd, b.rows, h, b.id, slot, par);
  }
  sm90_fence_proxy_async();
  sm90_bar_arrive(&s.rempty[r]);
}

/* fp8 cache: every converting warp cw walks the union (the same merge,
 * from the rows' selections); per union block, lane 0 of warp 0 loads the
 * whole block and its per-slot scales by TMA into the next raw slot once
 * every converting thread is done with its previous load, then the warps
 * convert the block before (so one load is always in flight behind the
 * conversion) into half slots (au_convert_block). */
template <bool F16, int MODE, bool WG>
static __device__ void au_produce8(const attn_params &p, const CUtensorMap *kv_map, int g,
                                   au_smem<true> &s, int cw, int lane) {
  typedef au_geom<true> G;
  const bool kps = p.sc.k_per_slot, vps = p.sc.v_per_slot;
  const uint32_t tx = AU_SLOT_BYTES + 512u * (kps + vps);
  const int n = lane < AU_TOKENS ? s.n[lane] : 0;
  const int64_t pos = lane < AU_TOKENS ? s.pos[lane] : 0;
  const uint32_t first = au_first(s, lane);
  int cur = 0;
  uint32_t nf = 0, nd = 0, nr = 0; /* half slots filled, descriptors, raw loads */
  au_blk prev, b;
  bool more;
  do {
    more = au_next(s, n, pos, first, cur, b, lane);
    if (more && cw == 0 && lane == 0) {
      /* raw slot nr % 2 last held load nr - 2 */
      const int r = (int)(nr % G::raw);
      sm90_bar_wait(&s.rempty[r], ((nr / G::raw) & 1) ^ 1);
      sm90_bar_arrive_tx(&s.rfull[r], tx);
#pragma unroll
      for (int seg = 0; seg < G::boxes; seg++)
        sm90_tma_load_4d(s.raw[r] + seg * G::box_bytes, kv_map, seg * G::box_elems, 0, g, b.page,
                         &s.rfull[r]);
      /* per-slot scales of the block's 128 keys (contiguous slots: see
       * m3s_attention_tma_plan) */
      const int64_t slot0 = (int64_t)b.page * M3S_BLOCK_SIZE;
      if (kps)
        sm90_bulk_load(s.scales[r], p.sc.k + g * p.sc.k_s0 + slot0, 512, &s.rfull[r]);
      if (vps)
        sm90_bulk_load(s.scales[r] + M3S_BLOCK_SIZE, p.sc.v + g * p.sc.v_s0 + slot0, 512,
                       &s.rfull[r]);
    }
    __syncwarp();
    if (nr > 0)
      au_convert_block<F16, MODE, WG>(p, s, prev, nr - 1, nf, nd, cw, lane);
    prev = b;
    nr += more;
  } while (more);
  if (cw == 0 && lane == 0)
    au_publish_end(s, nd);
}

/* ---- phase 3: the consumer warps ------------------------------------------- */

/* out (q's dtype, RNE) and lse of row t, heads h0 .. h0 + nh - 1, from the
 * warp's state. */
template <bool F16>
static __device__ void au_store(const attn_params &p, warp_state &ws, int64_t t, int h0, int nh,
                                int lane) {
  const int g4 = lane >> 2, t4 = lane & 3;
  quad_sum_l(ws);
#pragma unroll
  for (int r = 0; r < 2; r++) {
    const int row = g4 + 8 * r;
    if (row >= nh)
      continue;
    const float l = ws.l[r];
    const int64_t h = h0 + row;
    /* 16-bit stores: the caller's strides need not be even */
    uint16_t *out = (uint16_t *)p.out + t * p.out_s0 + h * p.out_s1 + 2 * t4;
#pragma unroll
    for (int dt = 0; dt < 16; dt++) {
      const float v0 = l > 0.0f ? ws.acc[dt][2 * r] / l : 0.0f;
      const float v1 = l > 0.0f ? ws.acc[dt][2 * r + 1] / l : 0.0f;
      const uint32_t v = pack2<F16>(v0, v1);
      out[dt * 8] = (uint16_t)v;
      out[dt * 8 + 1] = (uint16_t)(v >> 16);
    }
    if (t4 == 0 && p.lse)
      p.lse[t * p.lse_s0 + h * p.lse_s1] = l > 0.0f ? (ws.m[r] + log2f(l)) * LN2 : neg_inf();
  }
}

/* A reading warp frees its share of the slot (lane 0, after the warp's
 * reads of it are done, __syncwarp): the arrive's release orders them before
 * the producer's refill. */
template <class S>
static __device__ __forceinline__ void au_release(S &s, int slot, int lane) {
  if (lane == 0)
    sm90_bar_arrive(&s.empty[slot]);
}

/* A 16-bit half read in place, in softmax steps of AU_STEP keys (the S
 * phase then has 4 independent accumulator chains instead of a unit's 2,
 * for the two or three warps per SM sub-partition: with 16-key units the
 * 64K shared-draw case took ~1100 cycles per unit and warp, and 32-key
 * steps took it from 19.9 to 19.1 ms; 64-key steps needed
 * more than the 168 registers that 9 warps leave, and spilled); nv of its
 * keys visible, the rest masked in registers (MASK_SV: the slot is shared
 * with rows that see them). ks: the half's per-slot k scales (an fp8
 * cache's) or NULL; F16V: the dtype of V and P (attend_unit). */
template <bool F16, bool F16V>
static __device__ __forceinline__ void au_half16(uint32_t half, const uint32_t (&qa)[8][4], int nv,
                                                 const float *ks, float sl2, warp_state &ws,
                                                 int lane) {
  typedef au_geom<false> G;
#pragma unroll 1
  for (int k0 = 0; k0 < AU_HALF && k0 < nv; k0 += AU_STEP) {
    const uint32_t tile = half + k0 * 128;
    const float *kss = ks ? ks + k0 : NULL;
    if (nv - k0 >= AU_STEP)
      attend_unit<F16, 128, G::box_bytes, F16V, AU_GROUPS, MASK_NONE>(tile, qa, AU_STEP, kss, sl2,
                                                                      ws, lane);
    else
      attend_unit<F16, 128, G::box_bytes, F16V, AU_GROUPS, MASK_SV>(tile, qa, nv - k0, kss, sl2,
                                                                    ws, lane);
  }
}

/* Descriptor i of the queue (every consumer warp reads every one, in
 * order): lane 0 reads it and releases the entry once the values are in
 * registers (the shuffles consume them): loads of every lane still in
 * flight at lane 0's arrive raced with the producer's next write of the
 * entry (compute-sanitizer racecheck). */
typedef struct {
  uint32_t mask; /* rows (bits 0..7), half (bit 8), AU_END */
  uint32_t slot; /* slot (bits 0..7), its fill's phase parity (bit 8) */
  int id;        /* block id */
} au_desc;

template <class S>
static __device__ __forceinline__ au_desc au_read_desc(S &s, uint32_t i, int lane) {
  const int d = (int)(i % AU_DESC);
  sm90_bar_wait(&s.dfull[d], (i / AU_DESC) & 1);
  au_desc x = {0u, 0u, 0};
  if (lane == 0) {
    x.mask = s.dmask[d];
    x.slot = s.dslot[d];
    x.id = s.did[d];
  }
  x.mask = __shfl_sync(0xffffffffu, x.mask, 0);
  x.slot = __shfl_sync(0xffffffffu, x.slot, 0);
  x.id = __shfl_sync(0xffffffffu, x.id, 0);
  if (lane == 0)
    sm90_bar_arrive(&s.dempty[d]);
  return x;
}

/* The consumers' scales: a scalar fp8 k scale folds into the score scale
 * (sl2), a scalar v scale multiplies the output (vs; V is converted
 * unscaled), per-slot k scales come with the half; V (and so P) in f16 for
 * bf16 q on an fp8 cache without per-slot v scales (v16, au_convert_half). */
typedef struct {
  float sl2, vs;
  bool v16;
} au_scales;

template <bool F16, bool FP8>
static __device__ __forceinline__ au_scales au_scales_of(const attn_params &p) {
  au_scales c;
  c.sl2 = p.scale_log2 * (FP8 && p.sc.k && !p.sc.k_per_slot ? p.sc.k[0] : 1.0f);
  c.vs = FP8 && p.sc.v && !p.sc.v_per_slot ? p.sc.v[0] : 1.0f;
  c.v16 = FP8 && !F16 && !p.sc.v_per_slot;
  return c;
}

/* KVM: KV_DIRECT (a 16-bit cache of q's dtype), KV_E4M3 or KV_E5M2. */
template <bool F16, int KVM, bool FP8 = KVM != KV_DIRECT>
static __device__ void au_consume(const attn_params &p, au_smem<FP8> &s, int64_t t, int h0,
                                  int nh, int w, int lane) {
  const bool live = t < p.b.num_tokens;
  uint32_t qa[8][4];
  if (live)
    load_q<F16>(p, t, h0, nh, qa, lane);
  const au_scales sc = au_scales_of<F16, FP8>(p);
  const int64_t pos = s.pos[w];
  warp_state ws;
  warp_state_init(ws);
  for (uint32_t i = 0;; i++) {
    const au_desc x = au_read_desc(s, i, lane);
    const uint32_t dm = x.mask, ds = x.slot;
    const int id = x.id;
    if (dm & AU_END)
      break;
    if (!((dm >> w) & 1))
      continue;
    /* the slot cannot be refilled before this row releases it: its phase
     * is the descriptor's */
    const int slot = (int)(ds & 0xff);
    sm90_bar_wait(&s.full[slot], (ds >> 8) & 1);
    const int nv = au_visible(pos, id) - AU_HALF * (int)((dm >> 8) & 1);
    const uint32_t half = smem_addr(s.ring[slot]);
    const float *hk = FP8 && p.sc.k_per_slot ? s.hks[slot] : NULL;
    if (sc.v16)
      au_half16<false, true>(half, qa, min(nv, AU_HALF), hk, sc.sl2, ws, lane);
    else
      au_half16<F16, F16>(half, qa, min(nv, AU_HALF), hk, sc.sl2, ws, lane);
    __syncwarp(); /* every lane's ldmatrix of the slot is done */
    au_release(s, slot, lane);
  }
  if (FP8 && sc.vs != 1.0f)
    scale_acc(ws, sc.vs);
  if (live)
    au_store<F16>(p, ws, t, h0, nh, lane);
}

/* O += P V of one half for a warpgroup (au_consume_wg): P (sc, this
 * warp's 16 rows x 64 keys) in the A layout of k-steps of 16 keys, V's
 * k-step kk the keys 16 kk .. at 16 kk x 128 B in the V boxes (2 and 3:
 * dims 0..63, 64..127, one box apart), an MN-major B. F16V: the dtype of P
 * and V. */
template <bool F16V>
static __device__ __forceinline__ void au_wg_pv(const float (&sc)[8][4], uint32_t half,
                                                warp_state &ws) {
  typedef au_geom<false> G;
  uint32_t pa[4][4];
#pragma unroll
  for (int kk = 0; kk < 4; kk++) {
    pa[kk][0] = pack2<F16V>(sc[2 * kk][0], sc[2 * kk][1]);
    pa[kk][1] = pack2<F16V>(sc[2 * kk][2], sc[2 * kk][3]);
    pa[kk][2] = pack2<F16V>(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
    pa[kk][3] = pack2<F16V>(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
  }
  wg_pin(ws.acc);
  wg_pin(pa);
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < 4; kk++)
    wg_mma_n128_mn<F16V>(ws.acc, pa[kk],
                         wg_desc_mn_sw128(half + 2 * G::box_bytes + kk * 16 * 128, G::box_bytes));
  wg_commit_wait();
  wg_pin(ws.acc);
  wg_pin(pa);
}

/* Consumers in warpgroups (WG), on a 16-bit cache's half slots or fp8
 * blocks converted into the same (au_convert_half, with au_consume's scale
 * conventions): warp w still holds row w's 16 query heads as A fragments,
 * and warps 4 wg .. 4 wg + 3 form warpgroup wg,
 * an m64 tile of 4 rows x 16 heads. A warpgroup reads every descriptor with
 * a bit among its 4 rows, and for the half: S = Q K^T as one m64n64 wgmma
 * chain (8 k-steps, K read from the slot as a K-major B), the rows of a warp
 * whose row did not select the block, and the keys past a row's pos, masked
 * to -inf (so their P is 0 and their state unchanged: alpha is 1 where the
 * maximum stays), one online-softmax step of 64 keys in the exp2 domain,
 * then O += P V as four m64n128 wgmma (V read from the slot as an MN-major
 * B; the producer zeroed V rows past every row's pos). The tensor cores do
 * the half for all 4 rows of the warpgroup even where one row selected it:
 * on per-row draws the useful fraction is the selected blocks over the
 * union of 4 rows' (docs/perf-notes.md, session 13); shared draws waste
 * nothing. A row's result depends on its own selection and the cache only
 * (its blocks in ascending id, 64 keys per step), as long as the cache's V
 * is finite where rows see it: an Inf or NaN V value at a key that a row of
 * the warpgroup sees also reaches the warpgroup's other rows through P = 0
 * (the mma.sync consumers mask per row; one reason this form is behind a
 * switch). Past every row's pos the producer zeroes V, so garbage there is
 * harmless (test_gpu_attention's nan_past_len cases). */
template <bool F16, int KVM, bool FP8 = KVM != KV_DIRECT>
static __device__ void au_consume_wg(const attn_params &p, au_smem<FP8> &s, int64_t t, int h0,
                                     int nh, int w, int lane) {
  typedef au_geom<false> G; /* the half slots' layout, for both cache kinds */
  const int wg = w >> 2, t4 = lane & 3;
  uint32_t qa[8][4];
  if (t < p.b.num_tokens) {
    load_q<F16>(p, t, h0, nh, qa, lane);
  } else {
#pragma unroll
    for (int ks = 0; ks < 8; ks++)
      qa[ks][0] = qa[ks][1] = qa[ks][2] = qa[ks][3] = 0u;
  }
  const au_scales scl = au_scales_of<F16, FP8>(p); /* au_consume's conventions */
  const float sl2 = scl.sl2;
  const int64_t pos = s.pos[w];
  warp_state ws;
  warp_state_init(ws);
  for (uint32_t i = 0;; i++) {
    const au_desc x = au_read_desc(s, i, lane);
    const uint32_t dm = x.mask, ds = x.slot;
    const int id = x.id;
    if (dm & AU_END)
      break;
    if (!((dm >> (4 * wg)) & 0xfu)) /* uniform over the warpgroup */
      continue;
    const int slot = (int)(ds & 0xff);
    sm90_bar_wait(&s.full[slot], (ds >> 8) & 1);
    int nv = ((dm >> w) & 1) ? au_visible(pos, id) - AU_HALF * (int)((dm >> 8) & 1) : 0;
    nv = max(0, min(nv, AU_HALF));
    const uint32_t half = smem_addr(s.ring[slot]);
    /* S = Q K^T: keys 8 j + 2 t4 + {0, 1} of rows lane / 4, + 8 */
    float sc[8][4];
#pragma unroll
    for (int j = 0; j < 8; j++)
      sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
    wg_pin(sc);
    wg_pin(qa);
    wg_fence();
#pragma unroll
    for (int ks = 0; ks < 8; ks++)
      wg_mma_n64<F16>(sc, qa[ks], wg_desc_k_sw128(half + (ks >> 2) * G::box_bytes + (ks & 3) * 32));
    wg_commit_wait();
    wg_pin(sc);
    wg_pin(qa);
    /* mask, scale, row maxima over the quad */
    const float *hk = FP8 && p.sc.k_per_slot ? s.hks[slot] : NULL;
    float mx[2] = {neg_inf(), neg_inf()};
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        const int col = 8 * j + 2 * t4 + (e & 1);
        const float x = hk ? sc[j][e] * hk[col] : sc[j][e];
        sc[j][e] = col < nv ? x * sl2 : neg_inf();
        mx[e >> 1] = fmaxf(mx[e >> 1], sc[j][e]);
      }
    float alpha[2], mref[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(ws.m[r], mx[r]);
      /* nothing visible yet: keep the empty state (exp2(-inf - -inf) is NaN) */
      const bool none = m_new == neg_inf();
      alpha[r] = none ? 1.0f : exp2f(ws.m[r] - m_new);
      mref[r] = none ? 0.0f : m_new;
      ws.m[r] = m_new;
      ws.l[r] *= alpha[r];
    }
#pragma unroll
    for (int j = 0; j < 8; j++)
#pragma unroll
      for (int e = 0; e < 4; e++) {
        sc[j][e] = exp2f(sc[j][e] - mref[e >> 1]);
        ws.l[e >> 1] += sc[j][e];
      }
    rescale_rows(ws, alpha);
    /* O += P V: P's C layout is the A layout of k-step kk (keys 16 kk ..
     * 16 kk + 15); V's k-step kk is keys 16 kk .. at 16 kk x 128 B in the V
     * boxes (2 and 3: dims 0..63, 64..127, one box apart) */
    if (scl.v16)
      au_wg_pv<true>(sc, half, ws);
    else
      au_wg_pv<F16>(sc, half, ws);
    sm90_fence_proxy_async(); /* the wgmma's reads before the slot's refill */
    __syncwarp();
    au_release(s, slot, lane);
  }
  if (FP8 && scl.vs != 1.0f)
    scale_acc(ws, scl.vs);
  if (t < p.b.num_tokens)
    au_store<F16>(p, ws, t, h0, nh, lane);
}

/* WG: warpgroup consumers (au_consume_wg). */
template <bool F16, int KVM, bool WG, bool FP8 = KVM != KV_DIRECT>
static __global__ void __launch_bounds__(au_threads<FP8>(), 1)
    attn_union_kernel(const attn_params p, const __grid_constant__ CUtensorMap kv_map,
                      int64_t groups) {
  extern __shared__ unsigned char au_raw[];
  /* 1024-byte aligned by an offset from the shared array itself (an integer
   * round trip would make every access through s a generic LD / ST) */
  au_smem<FP8> &s = *(au_smem<FP8> *)(au_raw + ((1024u - (sm90_smem(au_raw) & 1023u)) & 1023u));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int64_t x = blockIdx.x;
  const int64_t grp = x % groups;
  x /= groups;
  const int chunk = (int)(x % p.nchunk), g = (int)(x / p.nchunk);
  const int h0 = g * p.group + chunk * HEADS_PER_CTA;
  const int nh = min(HEADS_PER_CTA, p.group - chunk * HEADS_PER_CTA);
  const int64_t t = grp * AU_TOKENS + warp;
  if (threadIdx.x == 0) {
    /* an fp8 half slot: every converting thread arrives for its writes;
     * WG: every producer lane (au_produce) */
    for (int i = 0; i < au_geom<FP8>::ring; i++) {
      sm90_bar_init(&s.full[i], FP8 ? AU_CONV * 32 : WG ? 32 : 1);
      sm90_bar_init(&s.empty[i], AU_TOKENS); /* one per consumer warp */
      if (!FP8)
        sm90_bar_init(&s.tfull[i], 1);
    }
    for (int i = 0; i < AU_DESC; i++) {
      sm90_bar_init(&s.dfull[i], 1);
      sm90_bar_init(&s.dempty[i], AU_TOKENS);
    }
    for (int i = 0; i < au_geom<FP8>::raw; i++) {
      sm90_bar_init(&s.rfull[i], 1);
      sm90_bar_init(&s.rempty[i], AU_CONV * 32);
    }
    sm90_fence_barrier_init();
  }
  if (warp < AU_TOKENS)
    au_select(p, t, g, s, warp, lane);
  __syncthreads();
  if (warp >= AU_TOKENS) {
    if constexpr (FP8)
      au_produce8<F16, KVM, WG>(p, &kv_map, g, s, warp - AU_TOKENS, lane);
    else
      au_produce<WG>(&kv_map, g, s, lane);
  } else if constexpr (WG) {
    au_consume_wg<F16, KVM>(p, s, t, h0, nh, warp, lane);
  } else {
    au_consume<F16, KVM>(p, s, t, h0, nh, warp, lane);
  }
}

/* ---- host ---------------------------------------------------------------------- */

/* One instantiation of the kernel; WG: the warpgroup-consumer form (every
 * cache kind). */
template <bool F16, int KVM, bool WG>
struct au_launch {
  static cudaError_t prepare(void) {
    return cudaFuncSetAttribute(attn_union_kernel<F16, KVM, WG>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize,
                                (int)au_smem_bytes<KVM != KV_DIRECT>());
  }
  static void run(const attn_params &p, const m3s_attn_tma_maps &maps, unsigned grid,
                  int64_t groups, cudaStream_t stream) {
    attn_union_kernel<F16, KVM, WG>
        <<<grid, au_threads<KVM != KV_DIRECT>(), au_smem_bytes<KVM != KV_DIRECT>(), stream>>>(
        p, maps.kv, groups);
  }
};

/* The six forms of each consumer kind, for at_prepare_modes / at_run_mode. */
template <bool F16, int KVM>
using au_kernel = au_launch<F16, KVM, false>;
template <bool F16, int KVM>
using au_kernel_wg = au_launch<F16, KVM, true>;

extern "C" cudaError_t m3s_attention_union_prepare(void) {
  cudaError_t err = at_prepare_modes<au_kernel>();
  if (err == cudaSuccess)
    err = at_prepare_modes<au_kernel_wg>();
  return err;
}

static int64_t au_items(int64_t rows, int64_t group, int64_t hkv) {
  const int64_t chunks = (group + HEADS_PER_CTA - 1) / HEADS_PER_CTA;
  return (rows + AU_TOKENS - 1) / AU_TOKENS * hkv * chunks;
}

/* Measured (H200, m3s-bench, docs/perf-notes.md "the union kernel"): on
 * rows that draw their blocks independently (the peer's inputs), the union
 * kernel beats the generic one up to 32K tokens of context (8K 1.51x, 16K
 * 1.27x, 32K 1.10x), ties at a 64K prompt and loses behind long prefixes
 * (4K new behind 60K: 0.87x), where a row group's union is large and the
 * ring turns over at the pace of L2 latency plus compute; with neighbours
 * sharing their draws it wins everywhere (64K prompt 1.88x). The rule keeps
 * the independent-draw measurements: up to 32K of context. Speculative
 * decode (q_len 4, 64 requests x 32K, 128 items) 1.28x; with a quarter of
 * the SMs busy (32 items) 2.3x slower: at least half the SMs. */
#define AU_MAX_SEQ (32 * 1024)
/* fp8 caches (session 14, H200, e4m3, independent draws, ms, generic /
 * union / union on warpgroups): 4K prompt 2.92 / 1.50 / 1.20, 8K 6.59 /
 * 4.23 / 3.85, 16K 13.94 / 11.65 / 11.47; longer not measured. */
#define AU_MAX_SEQ_FP8 (16 * 1024)
/* The warpgroup consumers (session 14, H200, bf16, ms, mma.sync / wgmma):
 * independent draws 4K 1.12 / 0.91, 8K 2.91 / 2.77, 12K 5.00 / 5.05, 16K
 * 7.23 / 7.54, 32K 17.15 / 18.68, 4K behind 60K 2.32 / 3.19; draws shared
 * by a query block's tokens 8K 2.34 / 1.57, 16K 4.90 / 3.29. They compute
 * a half for all 4 rows of a warpgroup, so they win where the rows' unions
 * stay small; fp8 caches up to AU_MAX_SEQ_FP8, where the conversion binds
 * both forms. */
#define AU_WG_MAX_SEQ (12 * 1024)

static bool au_fp8(m3s_dtype kv_dtype) { return kv_dtype == M3S_E4M3 || kv_dtype == M3S_E5M2; }

extern "C" int m3s_attention_union_pays(const m3s_context *ctx, const m3s_batch *batch,
                                        int64_t group, int64_t hkv, m3s_dtype kv_dtype) {
  const int64_t items = au_items(batch->num_tokens, group, hkv);
  if (items <= 0 || items > INT32_MAX)
    return 0;
  if (m3s_cuda_attention_union_any(ctx))
    return 1;
  /* one CTA per SM and no split */
  return 2 * items >= m3s_cuda_num_sms(ctx) &&
         batch->max_seq_len <= (au_fp8(kv_dtype) ? AU_MAX_SEQ_FP8 : AU_MAX_SEQ);
}

extern "C" int m3s_attention_union_wg(const m3s_context *ctx, const m3s_batch *batch,
                                      m3s_dtype kv_dtype) {
  const int sw = m3s_cuda_attention_union_wgmma(ctx);
  if (sw >= 0)
    return sw;
  /* measured on prefill chunks; speculative decode rows keep mma.sync */
  return batch->max_q_len > AU_TOKENS &&
         batch->max_seq_len <= (au_fp8(kv_dtype) ? AU_MAX_SEQ_FP8 : AU_WG_MAX_SEQ);
}

m3s_status m3s_attention_union_launch(const attn_params &p, const m3s_attn_tma_maps &maps,
                                      bool f16, bool wgmma, cudaStream_t stream,
                                      const char *fn) {
  const int64_t groups = (p.b.num_tokens + AU_TOKENS - 1) / AU_TOKENS;
  const unsigned grid = (unsigned)au_items(p.b.num_tokens, p.group, p.hkv);
  if (wgmma)
    at_run_mode<au_kernel_wg>(f16, p, maps, grid, groups, stream);
  else
    at_run_mode<au_kernel>(f16, p, maps, grid, groups, stream);
  return m3s_cuda_check_launch(fn, "attn_union_kernel");
}
