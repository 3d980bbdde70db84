/* Pieces of the sm_90a attention kernels (attention_tma.cu,
 * attention_union.cu): a row's selection, read and sorted by one warp (both
 * kernels); for the persistent kernel, an fp8 unit of 16 keys, as TMA lands
 * it (128-byte swizzle), converted into a warp's own 16-bit tile for
 * attend_unit (../attention.cuh), and the bf16 -> f16 Q test that lets
 * S = Q K^T of an fp8 cache run in f16; and the host's choice of a kernel
 * instantiation by q's dtype and the cache mode (both). */
#ifndef M3S_CUDA_SM90_ATTENTION_FP8_CUH
#define M3S_CUDA_SM90_ATTENTION_FP8_CUH

#include "../attention.cuh"

#define AT_UNIT_BYTES 2048                    /* 16 keys x 128 bytes of one box */
#define AT_TILE_BYTES (4 * AT_UNIT_BYTES)     /* 16 keys x (K | V), 16-bit */
/* the unit's per-slot k scales go behind the tile */
#define AT_KSCALE_OFF AT_TILE_BYTES

/* ---- a row's selection ---------------------------------------------------- */

/* The top-k entries e = lane and lane + 32 of (t, g) (K <= 64), read
 * before the row's lookup so that the two loads overlap. */
static __device__ __forceinline__ void at_topk_ids(const attn_params &p, int64_t t, int g,
                                                   int lane, int (&ids)[2]) {
  static_assert(M3S_MAX_TOPK <= 64, "two entries per lane");
#pragma unroll
  for (int j = 0; j < 2; j++) {
    const int e = lane + 32 * j;
    ids[j] = e < p.topk_k ? p.topk[t * p.tk_s0 + g * p.tk_s1 + e * p.tk_s2] : -1;
  }
}

/* Sorted valid selection of (t, g) into s.id / s.page from its entries ids
 * (at_topk_ids): what the generic kernel drops is dropped (-1, ids outside
 * [0, nb), blocks another context-parallel rank owns, page ids out of
 * range), the rest ascending by id, duplicates kept; returns its size.
 * Every lane of one warp calls it. */
template <class S>
static __device__ int at_select(const attn_params &p, const m3s_row_info &ri, const int (&ids)[2],
                                S &s, int lane) {
  int kk = 0;
  int64_t nb = 0;
  if (ri.valid) {
    nb = ri.pos / M3S_BLOCK_SIZE + 1;
    kk = (int)(nb < p.topk_k ? nb : p.topk_k);
  }
#pragma unroll
  for (int j = 0; j < 2; j++) {
    const int e = lane + 32 * j;
    if (e >= kk)
      continue;
    const int id = ids[j];
    int64_t page = -1;
    if (id >= 0 && id < nb)
      page = m3s_cp_page(p.b, p.b.bt, p.b.bt_s0, p.b.bt_s1, p.b.bt_cols, ri.r, id, p.num_pages);
    s.raw_id[e] = page >= 0 ? id : -1;
    s.raw_page[e] = page;
  }
  __syncwarp();
  int n = 0;
  for (int e = lane; e < kk; e += 32) {
    const int id = s.raw_id[e];
    if (id < 0)
      continue;
    int rank = 0;
    for (int j = 0; j < kk; j++) {
      int o = s.raw_id[j];
      rank += o >= 0 && (o < id || (o == id && j < e));
    }
    s.id[rank] = id;
    s.page[rank] = s.raw_page[e];
  }
  for (int base = 0; base < kk; base += 32)
    n += __popc(__ballot_sync(0xffffffffu, base + lane < kk && s.raw_id[base + lane] >= 0));
  __syncwarp();
  return n;
}

/* ---- fp8 units -------------------------------------------------------------- */

/* An fp8 unit (16 key rows of the K box and of the V box, SS bytes apart,
 * 128-byte swizzle) into the warp's 16-bit tile (unit_chunk<128,
 * AT_UNIT_BYTES>); without KPART only V (and the k scales), for K taken
 * straight into registers (at_k_frags). K exact in the mma dtype (its scale
 * multiplies the fp32 score). V: with VF16, exact in f16 and unscaled (a
 * scalar v scale multiplies the output); otherwise times its per-slot scale,
 * rounded to the mma dtype (RNE), as the generic kernel's dequant_fp8. V
 * rows of keys nv..15 (past pos: the cache there may hold anything) are
 * zeros. The per-slot k scales go behind the tile. Four passes over K, then
 * four over V (lanes never diverge on the part); in pass i, lane l takes
 * chunk c = l & 7 of key 4 i + kofs, kofs = (ph & 2) + ((ph ^ c / 4) & 1)
 * for ph = l / 8: the 8 lanes of an LDS.128 / STS.128 phase are chunks 0-3
 * of one key and 4-7 of its neighbour of the other parity, so they read 8
 * distinct chunks of the slot and, as the tile's 16-bit chunks 2c, 2c + 1 of
 * the two keys fall on even and odd swizzled positions, write 8 distinct
 * ones (the same key for all 8 lanes put chunks c and c + 4 on one bank
 * group: 2-way conflicts on every store). */
template <bool F16, int SS, int MODE, bool VF16, bool KPART = true>
static __device__ __forceinline__ void at_dequant(const attn_params &p, const unsigned char *unit,
                                                  const float *ksc, const float *vsc,
                                                  unsigned char *tile, int nv, int lane) {
  if (p.sc.k_per_slot && lane < 16)
    ((float *)(tile + AT_KSCALE_OFF))[lane] = ksc[lane];
  const int cc = lane & 7, ph = lane >> 3;
  const int kofs = (ph & 2) + ((ph ^ (cc >> 2)) & 1);
#pragma unroll
  for (int part = KPART ? 0 : 1; part < 2; part++)
#pragma unroll 4
    for (int i = 0; i < 4; i++) {
      const int kr = 4 * i + kofs;
      uint4 raw = *(const uint4 *)(unit + part * SS + kr * 128 + ((cc ^ (kr & 7)) << 4));
      uint32_t o[8];
      if (part == 0) {
        fp8_chunk_exact<F16, MODE>(raw, o);
      } else {
        if (kr >= nv)
          raw = make_uint4(0, 0, 0, 0);
        if (VF16)
          fp8_chunk_exact<true, MODE>(raw, o);
        else
          fp8_chunk_to16<F16>(raw, MODE, kr >= nv ? 0.0f : vsc[kr], o);
      }
      const int q = 16 * part + 2 * cc;
      *(uint4 *)(tile + unit_chunk<128, AT_UNIT_BYTES>(kr, q)) =
          make_uint4(o[0], o[1], o[2], o[3]);
      *(uint4 *)(tile + unit_chunk<128, AT_UNIT_BYTES>(kr, q + 1)) =
          make_uint4(o[4], o[5], o[6], o[7]);
    }
}

/* K of an fp8 unit straight into the B fragments of S = Q K^T in f16
 * (attend_unit's KREG form), no tile. Any permutation of the 128 dims
 * applied to Q and K alike leaves S unchanged; this one makes each fragment
 * a lane's own bytes: lane (g, t4) holds, of key 8 j + g of the unit, dims
 * 32 t4 .. 32 t4 + 31 (the key's 16-byte chunks 2 t4 and 2 t4 + 1, at (c ^
 * (key & 7)) in TMA's 128-byte swizzle: the 8 lanes of each LDS.128 phase
 * hit 8 distinct chunks), and k-step ks takes dims 32 t4 + 4 ks + {0, 1}
 * (k slots 2 t4, + 1: b0) and + {2, 3} (k slots 2 t4 + 8, + 9: b1).
 * at_load_q_perm gives Q the same order. Keys past pos give garbage here;
 * attend_unit masks their scores. */
template <int MODE>
static __device__ __forceinline__ void at_k_frags(const unsigned char *unit,
                                                  uint32_t (&kb)[2][8][2], int lane) {
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int j = 0; j < 2; j++)
#pragma unroll
    for (int a = 0; a < 2; a++) {
      const uint4 v =
          *(const uint4 *)(unit + (8 * j + g) * 128 + (((2 * t4 + a) ^ g) << 4));
      const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int i = 0; i < 4; i++)
        fp8x4_to_f16x4<MODE == KV_E5M2>(w[i], kb[j][4 * a + i][0], kb[j][4 * a + i][1]);
    }
}

/* The Q tile (two boxes of 16 heads x 64 dims, 128-byte swizzle) as the A
 * fragments of the 8 k-steps in at_k_frags' order of the dims: a0 / a2 of
 * k-step ks are dims 32 t4 + 4 ks + {0, 1} / {2, 3} of head g, a1 / a3 the
 * same of head g + 8. */
static __device__ __forceinline__ void at_load_q_perm(uint32_t (&qa)[8][4],
                                                      const unsigned char *tile, int lane) {
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int hh = 0; hh < 2; hh++)
#pragma unroll
    for (int q = 0; q < 4; q++) {
      const uint4 v = *(const uint4 *)(tile + unit_chunk<128, AT_UNIT_BYTES>(g + 8 * hh, 4 * t4 + q));
      qa[2 * q][hh] = v.x;
      qa[2 * q][2 + hh] = v.y;
      qa[2 * q + 1][hh] = v.z;
      qa[2 * q + 1][2 + hh] = v.w;
    }
}

/* bf16 Q fragments to f16 when every value of the warp's Q tile converts
 * exactly; returns whether it did (warp-uniform). S = Q K^T of an fp8 cache then runs in f16,
 * where K needs one unpack per pair instead of four instructions through
 * fp32; the products are the same numbers (exact in fp32 in both forms).
 * The choice depends only on the tile's values, so it is the same wherever
 * the tile is computed. */
static __device__ __forceinline__ bool at_q_to_f16(uint32_t (&qa)[8][4]) {
  uint32_t qh[8][4];
  bool exact = true;
#pragma unroll
  for (int ks = 0; ks < 8; ks++)
#pragma unroll
    for (int r = 0; r < 4; r++) {
      const float2 f = __bfloat1622float2(*(const __nv_bfloat162 *)&qa[ks][r]);
      const __half2 h = __float22half2_rn(f);
      const float2 b = __half22float2(h);
      exact &= b.x == f.x && b.y == f.y; /* NaN: not exact */
      qh[ks][r] = *(const uint32_t *)&h;
    }
  if (!__all_sync(0xffffffffu, exact))
    return false;
#pragma unroll
  for (int ks = 0; ks < 8; ks++)
#pragma unroll
    for (int r = 0; r < 4; r++)
      qa[ks][r] = qh[ks][r];
  return true;
}

/* ---- host: one instantiation per (q dtype, cache mode) ------------------- */

/* The cache mode of a call whose 16-bit cache is q's dtype (the TMA
 * kernels' condition): KV_DIRECT, KV_E4M3 or KV_E5M2. */
static inline int at_kv_mode(const attn_params &p) {
  return p.kv_esize == 1 ? p.kv_mode : KV_DIRECT;
}

/* K<F16, KVM>::run(a...) for f16 (q is f16, else bf16) and the call's cache
 * mode: the kernels unpack one fp8 format each, a template parameter. */
template <template <bool, int> class K, class... A>
static void at_run_mode(bool f16, const attn_params &p, A... a) {
  const int kvm = at_kv_mode(p);
  if (kvm == KV_E4M3)
    f16 ? K<true, KV_E4M3>::run(p, a...) : K<false, KV_E4M3>::run(p, a...);
  else if (kvm == KV_E5M2)
    f16 ? K<true, KV_E5M2>::run(p, a...) : K<false, KV_E5M2>::run(p, a...);
  else
    f16 ? K<true, KV_DIRECT>::run(p, a...) : K<false, KV_DIRECT>::run(p, a...);
}

/* K<F16, KVM>::prepare() (the shared-memory limit of one instantiation) for
 * all six; the first error. */
template <template <bool, int> class K>
static cudaError_t at_prepare_modes(void) {
  const cudaError_t err[6] = {K<true, KV_DIRECT>::prepare(), K<false, KV_DIRECT>::prepare(),
                              K<true, KV_E4M3>::prepare(),   K<false, KV_E4M3>::prepare(),
                              K<true, KV_E5M2>::prepare(),   K<false, KV_E5M2>::prepare()};
  for (int i = 0; i < 6; i++)
    if (err[i] != cudaSuccess)
      return err[i];
  return cudaSuccess;
}

#endif
