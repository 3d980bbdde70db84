/* Device pieces shared by the two sparse-attention kernels of the CUDA
 * backend: the generic one (attention.cu, sm_80 and up, cp.async) and the
 * Hopper one (sm90/attention_tma.cu, TMA, persistent): the parameter block,
 * a packing helper and one unit of 16 keys on tensor cores
 * (S = Q K^T, online softmax in the exp2 domain, O += P V), whose tile
 * layout is a template parameter. */
#ifndef M3S_CUDA_ATTENTION_CUH
#define M3S_CUDA_ATTENTION_CUH

#include "common.cuh"
#include "mma.cuh"

#include <cuda.h> /* CUtensorMap (types only) */

#include <stdint.h>

#define ACC_STRIDE 136                        /* floats per row of the merge scratch */
#define HEADS_PER_CTA 16
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

enum { KV_DIRECT = 0, KV_CONVERT16 = 1, KV_E4M3 = 2, KV_E5M2 = 3 };

typedef struct {
  m3s_cuda_batch b;
  const void *q;
  int64_t q_s0, q_s1;
  void *out;
  int64_t out_s0, out_s1;
  float *lse;
  int64_t lse_s0, lse_s1;
  m3s_dtype act;  /* q / out dtype */
  int q_convert;  /* q is bf16 but the mma runs in f16 (f16 cache) */
  const unsigned char *kv;
  int64_t kv_s0, kv_s1, kv_s2; /* in elements */
  int64_t num_pages;
  int kv_mode, kv_esize, vec16;
  m3s_cuda_scales sc;
  const int32_t *topk;
  int64_t tk_s0, tk_s1, tk_s2;
  int hq, hkv, group, topk_k, nchunk, nsplit;
  float scale_log2; /* softmax_scale * log2(e) */
  float *ws_o, *ws_ml;
  int pdl; /* launched with programmatic dependent launch: trigger the next (launch.h) */
  int cmerge; /* persistent kernel: the nsplit CTAs of an item are one cluster and merge
               * their partials there (sm90/attention_tma.cu), not through ws_o / ws_ml */
} attn_params;

/* ---- packing ------------------------------------------------------------ */

/* Two floats -> packed 16-bit pair (RNE), low half = lo. f16 saturates to
 * +-65504 so a large dequantised value cannot become inf. */
template <bool F16>
static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if (F16) {
    lo = fminf(fmaxf(lo, -65504.0f), 65504.0f);
    hi = fminf(fmaxf(hi, -65504.0f), 65504.0f);
    __half2 h = __floats2half2_rn(lo, hi);
    return *(uint32_t *)&h;
  }
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *(uint32_t *)&v;
}

static __device__ __forceinline__ float neg_inf(void) { return -INFINITY; }

/* Two fp8 values (KV_E4M3 or KV_E5M2) -> f16 pair, exact. */
static __device__ __forceinline__ __half2 fp8x2_to_half2(uint16_t x, int mode) {
  __half2_raw r = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)x,
                                             mode == KV_E4M3 ? __NV_E4M3 : __NV_E5M2);
  return *(__half2 *)&r;
}

static __device__ __forceinline__ float2 fp8x2_to_float2(uint16_t x, int mode) {
  return __half22float2(fp8x2_to_half2(x, mode));
}

/* 16 fp8 values (one 16-byte chunk), unscaled -> 16 values of the mma
 * dtype, exactly (every fp8 value is a bf16 and an f16); f16 straight from
 * the hardware unpack. o[0..3] the first 8, o[4..7] the last 8. */
template <bool F16, int MODE>
static __device__ __forceinline__ void fp8_chunk_exact(uint4 raw, uint32_t (&o)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int j = 0; j < 4; j++)
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
      const __half2 h = fp8x2_to_half2((uint16_t)(w[j] >> (16 * hf)), MODE);
      if (F16) {
        o[2 * j + hf] = *(const uint32_t *)&h;
      } else {
        const float2 f = __half22float2(h);
        o[2 * j + hf] = pack2<false>(f.x, f.y);
      }
    }
}

/* 16 fp8 values (one 16-byte chunk) times s -> 16 values of the mma dtype
 * (RNE), o[0..3] the first 8 and o[4..7] the last 8. With s = 1 (K) the
 * values are exact: every fp8 value is a bf16 and an f16. */
template <bool F16>
static __device__ __forceinline__ void fp8_chunk_to16(uint4 raw, int mode, float s,
                                                      uint32_t (&o)[8]) {
  const uint32_t w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int j = 0; j < 4; j++) {
    float2 a = fp8x2_to_float2((uint16_t)(w[j] & 0xffff), mode);
    float2 b = fp8x2_to_float2((uint16_t)(w[j] >> 16), mode);
    o[2 * j] = pack2<F16>(a.x * s, a.y * s);
    o[2 * j + 1] = pack2<F16>(b.x * s, b.y * s);
  }
}


/* ---- q -------------------------------------------------------------------- */

/* Packed pair of the OTHER 16-bit dtype -> two floats. */
template <bool F16>
static __device__ __forceinline__ float2 unpack_other(uint32_t x) {
  if (F16) { /* other = bf16 */
    __nv_bfloat162 v = *(__nv_bfloat162 *)&x;
    return __bfloat1622float2(v);
  }
  __half2 h = *(__half2 *)&x;
  return __half22float2(h);
}

static __device__ __forceinline__ uint32_t ld_act_pair(const void *base, int64_t off) {
  const uint16_t *p = (const uint16_t *)base + off;
  return (uint32_t)p[0] | ((uint32_t)p[1] << 16);
}

/* Q rows h0 + lane/4 (+8) of row t of q (element strides q_s0, q_s1; the
 * last dimension contiguous) as A fragments of the 8 k-steps (zero padding
 * for rows >= nh); bf16 q is converted when the mma runs in f16 (convert). */
template <bool F16>
static __device__ __forceinline__ void load_q_rows(const void *q, int64_t q_s0, int64_t q_s1,
                                                   int convert, int64_t t, int h0, int nh,
                                                   uint32_t (&qa)[8][4], int lane) {
  int g4 = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int hi = 0; hi < 2; hi++) {
    int r = g4 + 8 * hi;
    int64_t base = t * q_s0 + (int64_t)(h0 + r) * q_s1;
#pragma unroll
    for (int ks = 0; ks < 8; ks++) {
      int k = 16 * ks + 2 * t4;
      qa[ks][hi] = r < nh ? ld_act_pair(q, base + k) : 0u;
      qa[ks][2 + hi] = r < nh ? ld_act_pair(q, base + k + 8) : 0u;
    }
  }
  if (F16 && convert)
#pragma unroll
    for (int ks = 0; ks < 8; ks++)
#pragma unroll
      for (int i = 0; i < 4; i++) {
        float2 f = unpack_other<F16>(qa[ks][i]);
        qa[ks][i] = pack2<F16>(f.x, f.y);
      }
}

/* load_q_rows of the call's q (attn_params). */
template <bool F16>
static __device__ __forceinline__ void load_q(const attn_params &p, int64_t t, int h0, int nh,
                                              uint32_t (&qa)[8][4], int lane) {
  load_q_rows<F16>(p.q, p.q_s0, p.q_s1, p.q_convert, t, h0, nh, qa, lane);
}

/* ---- one unit of 16 keys on tensor cores ----------------------------------- */

typedef struct {
  float m[2];   /* running max (log2 units) of rows lane/4 and lane/4 + 8 */
  float l[2];   /* this thread's part of the running sum */
  float acc[16][4];
} warp_state;

/* Empty state: m = -inf, l = 0, acc = 0. */
static __device__ __forceinline__ void warp_state_init(warp_state &ws) {
  ws.m[0] = ws.m[1] = neg_inf();
  ws.l[0] = ws.l[1] = 0.0f;
#pragma unroll
  for (int dt = 0; dt < 16; dt++)
    ws.acc[dt][0] = ws.acc[dt][1] = ws.acc[dt][2] = ws.acc[dt][3] = 0.0f;
}

/* acc of the lane's two rows times their softmax step's alpha. */
static __device__ __forceinline__ void rescale_rows(warp_state &ws, const float (&alpha)[2]) {
#pragma unroll
  for (int dt = 0; dt < 16; dt++) {
    ws.acc[dt][0] *= alpha[0];
    ws.acc[dt][1] *= alpha[0];
    ws.acc[dt][2] *= alpha[1];
    ws.acc[dt][3] *= alpha[1];
  }
}

/* Byte offset of 16-byte chunk c (0..31: K in 0..15, V in 16..31) of key
 * row kr in a unit tile whose key rows are RS bytes apart and whose 128-byte
 * segments (chunks 8s..8s+7) are SS bytes apart; chunks are XOR-swizzled by
 * kr & 7 inside their segment, so the 8 rows an ldmatrix reads hit 8
 * different bank groups. The generic kernel's rows are whole 512-byte rows
 * (RS 512, SS 128); the TMA kernel's segments are separate 128-byte-row
 * boxes (RS 128, SS 2048), the layout of the TMA's 128-byte swizzle. */
template <int RS, int SS>
static __device__ __forceinline__ uint32_t unit_chunk(int kr, int c) {
  return (uint32_t)(kr * RS + (c >> 3) * SS + (((c & 7) ^ (kr & 7)) << 4));
}

/* How attend_unit treats keys >= nvis: MASK_S sets their scores to -inf
 * (the caller zeroed their V rows in the tile); MASK_SV also takes their V
 * values as zero in registers (a tile shared with warps that see them
 * cannot be zeroed, and P = 0 times a NaN the cache holds past pos would be
 * NaN); MASK_NONE: every key is visible. */
enum { MASK_NONE = 0, MASK_S = 1, MASK_SV = 2 };

/* NG groups of 16 keys (one unit: NG = 1) against the 16 query rows of qa:
 * one online-softmax step into ws. kscale: per-key k scales of the unit
 * (fp8 per-slot) or NULL; scale_log2 already holds a scalar k scale. RS,
 * SS: the tile layout (unit_chunk). F16V: the dtype of V and P in O += P V
 * (f16 for an fp8 cache's unscaled V, whose values are all f16; P in [0, 1]
 * keeps 11 bits there), by default the mma dtype of S. Several groups per
 * step give the S phase 2 NG independent accumulator chains, for kernels
 * with few warps per SM sub-partition (sm90/attention_union.cu). KREG (NG =
 * 1): K is not read from the tile but given as B fragments kb[n8 tile of 8
 * keys][k-step] (sm90/attention_fp8.cuh, at_k_frags), in the order of the
 * dims that qa holds; the tile then holds only V. */
template <bool F16, int RS, int SS, bool F16V = F16, int NG = 1, int MASK = MASK_S,
          bool KREG = false>
static __device__ __forceinline__ void attend_unit(uint32_t tile, const uint32_t (&qa)[8][4],
                                                   int nvis, const float *kscale, float scale_log2,
                                                   warp_state &ws, int lane,
                                                   const uint32_t (*kb)[8][2] = nullptr) {
  const int row = lane & 7, mi = lane >> 3, t4 = lane & 3;
  float s[2 * NG][4];
#pragma unroll
  for (int nt = 0; nt < 2 * NG; nt++)
#pragma unroll
    for (int e = 0; e < 4; e++)
      s[nt][e] = 0.0f;
  /* S = Q K^T: matrices (keys 16j + 0-7 | 8-15) x (dims lo | hi) of k-step
   * ks */
  if constexpr (KREG) {
    /* K already in B fragments (NG = 1): kb[n8 tile][k-step] */
#pragma unroll
    for (int ks = 0; ks < 8; ks++) {
      mma16816<F16>(s[0], qa[ks], kb[0][ks][0], kb[0][ks][1]);
      mma16816<F16>(s[1], qa[ks], kb[1][ks][0], kb[1][ks][1]);
    }
  } else {
#pragma unroll
    for (int ks = 0; ks < 8; ks++)
#pragma unroll
      for (int j = 0; j < NG; j++) {
        uint32_t b[4];
        ldsm_x4(b, tile + unit_chunk<RS, SS>(16 * j + (mi >> 1) * 8 + row, 2 * ks + (mi & 1)));
        mma16816<F16>(s[2 * j], qa[ks], b[0], b[1]);
        mma16816<F16>(s[2 * j + 1], qa[ks], b[2], b[3]);
      }
  }
  /* mask keys after pos, scale, row max over the quad */
  float mx[2] = {neg_inf(), neg_inf()};
#pragma unroll
  for (int nt = 0; nt < 2 * NG; nt++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      int col = nt * 8 + 2 * t4 + (e & 1);
      float x = kscale ? s[nt][e] * kscale[col] : s[nt][e];
      s[nt][e] = MASK == MASK_NONE || col < nvis ? x * scale_log2 : neg_inf();
      mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
    }
  float alpha[2];
#pragma unroll
  for (int r = 0; r < 2; r++) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
    float m_new = fmaxf(ws.m[r], mx[r]); /* finite: key kbase is visible */
    alpha[r] = exp2f(ws.m[r] - m_new);
    ws.m[r] = m_new;
    ws.l[r] *= alpha[r];
  }
#pragma unroll
  for (int nt = 0; nt < 2 * NG; nt++)
#pragma unroll
    for (int e = 0; e < 4; e++) {
      s[nt][e] = exp2f(s[nt][e] - ws.m[e >> 1]);
      ws.l[e >> 1] += s[nt][e];
    }
  rescale_rows(ws, alpha);
  /* O += P V: P's C layout is the A layout of a 16x16 operand per group;
   * V's B fragments b[0], b[2] hold keys 2 t4, 2 t4 + 1 of the group, b[1],
   * b[3] keys 8 + 2 t4, 9 + 2 t4 (low half first) */
  uint32_t pa[NG][4];
#pragma unroll
  for (int j = 0; j < NG; j++) {
    pa[j][0] = pack2<F16V>(s[2 * j][0], s[2 * j][1]);
    pa[j][1] = pack2<F16V>(s[2 * j][2], s[2 * j][3]);
    pa[j][2] = pack2<F16V>(s[2 * j + 1][0], s[2 * j + 1][1]);
    pa[j][3] = pack2<F16V>(s[2 * j + 1][2], s[2 * j + 1][3]);
  }
#pragma unroll
  for (int dp = 0; dp < 8; dp++)
#pragma unroll
    for (int j = 0; j < NG; j++) {
      uint32_t b[4];
      ldsm_x4_trans(b, tile + unit_chunk<RS, SS>(16 * j + (mi & 1) * 8 + row,
                                                 16 + 2 * dp + (mi >> 1)));
      if (MASK == MASK_SV) {
        const int k0 = 16 * j + 2 * t4;
        const uint32_t m0 = (k0 < nvis ? 0x0000ffffu : 0u) | (k0 + 1 < nvis ? 0xffff0000u : 0u);
        const uint32_t m1 = (k0 + 8 < nvis ? 0x0000ffffu : 0u) | (k0 + 9 < nvis ? 0xffff0000u : 0u);
        b[0] &= m0;
        b[1] &= m1;
        b[2] &= m0;
        b[3] &= m1;
      }
      mma16816<F16V>(ws.acc[2 * dp], pa[j], b[0], b[1]);
      mma16816<F16V>(ws.acc[2 * dp + 1], pa[j], b[2], b[3]);
    }
}

/* l of the lane's two rows summed over its quad (each lane holds the part
 * of its own columns until the end). */
static __device__ __forceinline__ void quad_sum_l(warp_state &ws) {
#pragma unroll
  for (int r = 0; r < 2; r++) {
    ws.l[r] += __shfl_xor_sync(0xffffffffu, ws.l[r], 1);
    ws.l[r] += __shfl_xor_sync(0xffffffffu, ws.l[r], 2);
  }
}

/* acc times v: a scalar v scale of an fp8 cache, left out of V when it is
 * dequantised (sm90/attention_fp8.cuh, at_dequant). */
static __device__ __forceinline__ void scale_acc(warp_state &ws, float v) {
#pragma unroll
  for (int dt = 0; dt < 16; dt++)
#pragma unroll
    for (int e = 0; e < 4; e++)
      ws.acc[dt][e] *= v;
}

/* A warp's state into its region of shared memory: acc [16][ACC_STRIDE],
 * then m of rows 0..15 and l of rows 0..15 (l summed over the quad). */
static __device__ __forceinline__ void stash_state(warp_state &ws, float *acc_s, float *ml_s,
                                                   int lane) {
  int g4 = lane >> 2, t4 = lane & 3;
  quad_sum_l(ws);
#pragma unroll
  for (int dt = 0; dt < 16; dt++) {
    *(float2 *)&acc_s[g4 * ACC_STRIDE + dt * 8 + 2 * t4] =
        make_float2(ws.acc[dt][0], ws.acc[dt][1]);
    *(float2 *)&acc_s[(g4 + 8) * ACC_STRIDE + dt * 8 + 2 * t4] =
        make_float2(ws.acc[dt][2], ws.acc[dt][3]);
  }
  if (t4 == 0) {
    ml_s[g4] = ws.m[0];
    ml_s[8 + g4] = ws.m[1];
    ml_s[16 + g4] = ws.l[0];
    ml_s[24 + g4] = ws.l[1];
  }
}

/* Dims d, d + 1 of row r of the CTA's 16 heads from NW warp states stashed
 * by stash_state at base + w * stride floats, merged in warp order
 * 0..NW-1: the unnormalised acc (o0, o1), the maximum mx and the sum l. */
template <int NW>
static __device__ __forceinline__ void merge_warp_pair(const float *base, int stride, int r, int d,
                                                       float &mx, float &l, float &o0,
                                                       float &o1) {
  const float *ml = base + HEADS_PER_CTA * ACC_STRIDE;
  float mw[NW];
  mx = neg_inf();
#pragma unroll
  for (int w = 0; w < NW; w++) {
    mw[w] = ml[w * stride + r];
    mx = fmaxf(mx, mw[w]);
  }
  l = 0.0f, o0 = 0.0f, o1 = 0.0f;
  if (mx != neg_inf()) {
#pragma unroll
    for (int w = 0; w < NW; w++) {
      float a = exp2f(mw[w] - mx);
      const float *acc = base + w * stride + r * ACC_STRIDE + d;
      l += ml[w * stride + 16 + r] * a;
      o0 += acc[0] * a;
      o1 += acc[1] * a;
    }
  }
}

/* Dims d, d + 1 of out (t, h) (q's dtype, RNE) and, for d == 0, its lse,
 * from a merged state (maximum mx, sum l, unnormalised acc o0, o1); 0 and
 * -inf when nothing was visible (l == 0). */
static __device__ __forceinline__ void store_out_pair(const attn_params &p, int64_t t, int64_t h,
                                                      int d, float mx, float l, float o0,
                                                      float o1) {
  const float v0 = l > 0.0f ? o0 / l : 0.0f, v1 = l > 0.0f ? o1 / l : 0.0f;
  const int64_t off = t * p.out_s0 + h * p.out_s1 + d;
  m3s_st(p.out, p.act, off, v0);
  m3s_st(p.out, p.act, off + 1, v1);
  if (d == 0 && p.lse)
    p.lse[t * p.lse_s0 + h * p.lse_s1] = l > 0.0f ? (mx + log2f(l)) * LN2 : neg_inf();
}

/* Output dims d, d + 1 of head h (row r of the CTA's 16) from NW warp
 * states (merge_warp_pair), written as out (q's dtype, RNE) and lse when
 * p.nsplit == 1, else as split's partial (unnormalised acc, (m, l)) for the
 * merge kernel. */
template <int NW>
static __device__ __forceinline__ void store_merged_pair(const attn_params &p, const float *base,
                                                         int stride, int64_t t, int64_t h, int r,
                                                         int d, int split) {
  float mx, l, o0, o1;
  merge_warp_pair<NW>(base, stride, r, d, mx, l, o0, o1);
  if (p.nsplit == 1) {
    store_out_pair(p, t, h, d, mx, l, o0, o1);
  } else {
    int64_t idx = (t * p.hq + h) * p.nsplit + split;
    *(float2 *)&p.ws_o[idx * M3S_HEAD_DIM + d] = make_float2(o0, o1);
    if (d == 0)
      *(float2 *)&p.ws_ml[idx * 2] = make_float2(l > 0.0f ? mx : neg_inf(), l);
  }
}

/* Host side of attention.cu that the TMA path shares: the merge of nsplit
 * partials (launched when p.nsplit > 1; with programmatic dependent launch
 * when pdl != 0, launch.h). */
m3s_status m3s_cuda_attention_merge(const attn_params &p, int pdl, cudaStream_t stream,
                                    const char *fn);

/* sm90/attention_tma.cu. The tensor maps of one call's K/V cache and q,
 * encoded on the host (kernel parameters). */
typedef struct {
  CUtensorMap kv, q;
  int qbox; /* query heads per Q box */
} m3s_attn_tma_maps;

/* The kernel that runs this call (M3S_ATTN_*: the conditions of
 * m3s_attention_tma_eligible, which wraps it); for the TMA kernels, maps
 * then holds their tensor maps, encoded once here. */
int m3s_attention_tma_plan(const m3s_context *ctx, const m3s_batch *batch, const m3s_tensor *q,
                           const m3s_tensor *kv, const m3s_kv_scales *scales,
                           m3s_attn_tma_maps *maps);
/* The persistent kernel over p (p.nsplit and the workspace already set)
 * with the maps of m3s_attention_tma_plan; f16: q is f16 (else bf16; the
 * cache is q's dtype or fp8, p.kv_esize == 1). The caller launches the
 * merge after it. */
m3s_status m3s_attention_tma_launch(const m3s_context *ctx, const attn_params &p,
                                    const m3s_attn_tma_maps &maps, bool f16, cudaStream_t stream,
                                    const char *fn);
/* The union kernel (sm90/attention_union.cu) over p (p.nsplit == 1: it
 * writes out and lse itself) with the K/V map of m3s_attention_tma_plan;
 * f16: q and the cache are f16 (else bf16); wgmma: the rows on warpgroup
 * consumers (m3s_attention_set_union_wgmma). */
m3s_status m3s_attention_union_launch(const attn_params &p, const m3s_attn_tma_maps &maps,
                                      bool f16, bool wgmma, cudaStream_t stream,
                                      const char *fn);

#endif
