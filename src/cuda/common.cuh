/* Device helpers shared by the CUDA kernels of m3sparse.
 *
 *  - m3s_cuda_batch: the raw pointers and strides of an m3s_batch, passed to
 *    kernels by value; row -> (request, index, position) lookups read the
 *    device-side query_start_loc / seq_lens (graph-safe: nothing host-side
 *    depends on their values).
 *  - Guards: the CUDA backend cannot validate device data without a host
 *    read, so kernels treat bad values conservatively and never read out of
 *    bounds: a request whose seq_len is outside [n_r, max_seq_len] (and not 0)
 *    is handled as padded; a page id outside [0, num_pages) contributes no
 *    keys; top-k entries outside [0, nb) are skipped; slots outside the cache
 *    are skipped.
 *  - dot128_fixed: the fp32 dot product in exactly the CPU backend's order
 *    (src/cpu/common.h, cpu_dot128): eight interleaved partial sums, then a
 *    fixed tree, with __fmul_rn/__fadd_rn so nvcc cannot contract to FMA. Index
 *    scores are therefore bit-identical to the CPU backend, and so is the
 *    top-k selection, for every input. */
#ifndef M3S_CUDA_COMMON_CUH
#define M3S_CUDA_COMMON_CUH

#include "../core/internal.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>


/* ---- the operations (one file each; the table in ops.cu). Signatures are
 * those of m3s_backend_ops (src/core/backend.h). ---- */
extern "C" {
m3s_status m3s_cuda_context_init(m3s_context *ctx);
void m3s_cuda_context_fini(m3s_context *ctx);
int m3s_cuda_num_sms(const m3s_context *ctx);
int m3s_cuda_sm_major(const m3s_context *ctx);
/* 1 when the sm_90 prefill score kernel may run (m3s_topk_tc_ws_fits on the
 * context's device). */
int m3s_cuda_score_ws(const m3s_context *ctx);
/* cuTensorMapEncodeTiled from the driver (found once per context through the
 * runtime, so the library does not link libcuda), or NULL. */
void *m3s_cuda_tmap_encoder(const m3s_context *ctx);
m3s_status m3s_cuda_check_device(const m3s_context *ctx, const char *fn);
m3s_status m3s_cuda_cache_insert(m3s_context *ctx, const m3s_tensor *k, const m3s_tensor *v,
                                 const m3s_tensor *slot_mapping, m3s_tensor *kv_cache,
                                 const m3s_kv_scales *scales, const m3s_exec *exec);
m3s_status m3s_cuda_index_cache_insert(m3s_context *ctx, const m3s_tensor *ik,
                                       const m3s_tensor *slot_mapping, m3s_tensor *index_cache,
                                       const m3s_exec *exec);
size_t m3s_cuda_topk_workspace(const m3s_context *ctx, const m3s_layer_config *cfg,
                               int64_t max_tokens, int64_t max_seq_len);
m3s_status m3s_cuda_index_topk(m3s_context *ctx, const m3s_layer_config *cfg,
                               const m3s_batch *batch, const m3s_tensor *iq,
                               const m3s_tensor *index_cache, m3s_tensor *topk,
                               const m3s_exec *exec);
size_t m3s_cuda_attention_workspace(const m3s_context *ctx, const m3s_layer_config *cfg,
                                    int64_t max_tokens, int64_t max_seq_len);
m3s_status m3s_cuda_sparse_attention(m3s_context *ctx, const m3s_layer_config *cfg,
                                     const m3s_batch *batch, const m3s_tensor *q,
                                     const m3s_tensor *kv_cache, const m3s_kv_scales *scales,
                                     const m3s_tensor *topk, m3s_tensor *out, m3s_tensor *lse,
                                     const m3s_exec *exec);
m3s_status m3s_cuda_build_k2q_csr(m3s_context *ctx, const m3s_layer_config *cfg,
                                  const m3s_batch *batch, const m3s_tensor *topk,
                                  m3s_tensor *row_ptr, m3s_tensor *q_indices, m3s_tensor *q_slot,
                                  m3s_tensor *q_count, const m3s_exec *exec);
m3s_status m3s_cuda_k2q_attention(m3s_context *ctx, const m3s_layer_config *cfg,
                                  const m3s_batch *batch, const m3s_tensor *q,
                                  const m3s_tensor *kv_cache, const m3s_kv_scales *scales,
                                  const m3s_tensor *row_ptr, const m3s_tensor *q_indices,
                                  const m3s_tensor *q_slot, m3s_tensor *part_out,
                                  m3s_tensor *part_lse, const m3s_exec *exec);
m3s_status m3s_cuda_combine_partials(m3s_context *ctx, const m3s_layer_config *cfg,
                                     const m3s_tensor *part_out, const m3s_tensor *part_lse,
                                     const m3s_tensor *q_count, m3s_tensor *out, m3s_tensor *lse,
                                     const m3s_exec *exec);
m3s_status m3s_cuda_merge_attn_states(m3s_context *ctx, const m3s_tensor *out_a,
                                      const m3s_tensor *lse_a, const m3s_tensor *out_b,
                                      const m3s_tensor *lse_b, m3s_tensor *out, m3s_tensor *lse,
                                      const m3s_exec *exec);
m3s_status m3s_cuda_index_topk_candidates(m3s_context *ctx, const m3s_layer_config *cfg,
                                          const m3s_batch *batch, const m3s_tensor *iq,
                                          const m3s_tensor *index_cache, m3s_tensor *cand_ids,
                                          m3s_tensor *cand_scores, const m3s_exec *exec);
m3s_status m3s_cuda_merge_topk_candidates(m3s_context *ctx, const m3s_layer_config *cfg,
                                          const m3s_batch *batch, const m3s_tensor *cand_ids,
                                          const m3s_tensor *cand_scores, m3s_tensor *topk,
                                          const m3s_exec *exec);
m3s_status m3s_cuda_merge_attn_states_n(m3s_context *ctx, const m3s_tensor *outs,
                                        const m3s_tensor *lses, m3s_tensor *out, m3s_tensor *lse,
                                        const m3s_exec *exec);
}

typedef struct {
  int num_reqs;
  int num_tokens;
  int uniform_q_len;           /* > 0: uniform rows */
  int max_q_len;
  int64_t max_seq_len;
  const int32_t *qsl;          /* may be NULL when uniform */
  int64_t qsl_stride;
  const int32_t *seq_lens;
  int64_t seq_stride;
  const int32_t *bt;           /* main block table */
  int64_t bt_s0, bt_s1, bt_cols;
  const int32_t *ibt;          /* index block table */
  int64_t ibt_s0, ibt_s1, ibt_cols;
  m3s_cp cp;                   /* context parallel: the tables list cp.cp_rank's blocks */
} m3s_cuda_batch;

/* Host: fills the device-side view of a validated batch. */
static inline m3s_cuda_batch m3s_cuda_batch_of(const m3s_batch *b) {
  m3s_cuda_batch c;
  c.num_reqs = b->num_reqs;
  c.num_tokens = b->num_tokens;
  c.uniform_q_len = b->uniform_q_len;
  c.max_q_len = b->max_q_len;
  c.max_seq_len = b->max_seq_len;
  c.qsl = b->uniform_q_len > 0 ? NULL : (const int32_t *)b->query_start_loc.data;
  c.qsl_stride = b->uniform_q_len > 0 ? 0 : b->query_start_loc.stride[0];
  c.seq_lens = (const int32_t *)b->seq_lens.data;
  c.seq_stride = b->num_reqs ? b->seq_lens.stride[0] : 0;
  c.bt = b->block_table.ndim == 2 ? (const int32_t *)b->block_table.data : NULL;
  c.bt_s0 = c.bt ? b->block_table.stride[0] : 0;
  c.bt_s1 = c.bt ? b->block_table.stride[1] : 0;
  c.bt_cols = c.bt ? b->block_table.shape[1] : 0;
  c.ibt = b->index_block_table.ndim == 2 ? (const int32_t *)b->index_block_table.data : NULL;
  c.ibt_s0 = c.ibt ? b->index_block_table.stride[0] : 0;
  c.ibt_s1 = c.ibt ? b->index_block_table.stride[1] : 0;
  c.ibt_cols = c.ibt ? b->index_block_table.shape[1] : 0;
  c.cp = b->cp;
  return c;
}

/* Where row t of the batch belongs. valid == 0 for padded requests, rows
 * outside any request, or requests with inconsistent lengths. */
typedef struct {
  int r;          /* request */
  int64_t i;      /* index inside the request */
  int64_t n;      /* query tokens of the request */
  int64_t pos;    /* absolute position */
  int64_t seq;    /* seq_len */
  int valid;
} m3s_row_info;

static __device__ __forceinline__ m3s_row_info m3s_row_lookup(const m3s_cuda_batch &b, int64_t t) {
  m3s_row_info ri;
  ri.valid = 0;
  ri.r = -1;
  ri.i = ri.n = ri.pos = ri.seq = 0;
  if (t < 0 || t >= b.num_tokens || b.num_reqs <= 0)
    return ri;
  if (b.uniform_q_len > 0) {
    ri.r = (int)(t / b.uniform_q_len);
    ri.i = t % b.uniform_q_len;
    ri.n = b.uniform_q_len;
    if (ri.r >= b.num_reqs)
      return ri;
  } else {
    int32_t base = b.qsl[0];
    int lo = 0, hi = b.num_reqs - 1;
    /* largest r with qsl[r] - base <= t */
    while (lo < hi) {
      int mid = (lo + hi + 1) >> 1;
      if ((int64_t)b.qsl[mid * b.qsl_stride] - base <= t)
        lo = mid;
      else
        hi = mid - 1;
    }
    ri.r = lo;
    int64_t start = (int64_t)b.qsl[lo * b.qsl_stride] - base;
    ri.n = (int64_t)b.qsl[(lo + 1) * b.qsl_stride] - b.qsl[lo * b.qsl_stride];
    ri.i = t - start;
    if (ri.i < 0 || ri.i >= ri.n)
      return ri;
  }
  ri.seq = b.seq_lens[ri.r * b.seq_stride];
  if (ri.seq <= 0 || ri.seq < ri.n || ri.seq > b.max_seq_len)
    return ri;
  ri.pos = ri.seq - ri.n + ri.i;
  ri.valid = 1;
  return ri;
}

/* Physical page of logical page p of request r, or -1 when out of range. */
static __device__ __forceinline__ int64_t m3s_page(const int32_t *tab, int64_t s0, int64_t s1,
                                            int64_t cols, int r, int64_t p, int64_t num_pages) {
  if (!tab || p < 0 || p >= cols)
    return -1;
  int64_t page = tab[r * s0 + p * s1];
  return (page >= 0 && page < num_pages) ? page : -1;
}

/* Page of logical block blk of request r in a block table of the batch's
 * rank (m3s_cp: the owner's column), or -1 when another rank owns the block
 * or the page id is out of range. */
static __device__ __forceinline__ int64_t m3s_cp_page(const m3s_cuda_batch &b, const int32_t *tab,
                                                      int64_t s0, int64_t s1, int64_t cols, int r,
                                                      int64_t blk, int64_t num_pages) {
  if (m3s_cp_owner(&b.cp, blk) != b.cp.cp_rank)
    return -1;
  return m3s_page(tab, s0, s1, cols, r, m3s_cp_column(&b.cp, blk), num_pages);
}

static __device__ __forceinline__ float m3s_ld(const void *base, m3s_dtype dt, int64_t off) {
  switch (dt) {
  case M3S_BF16: return __bfloat162float(((const __nv_bfloat16 *)base)[off]);
  case M3S_F16: return __half2float(((const __half *)base)[off]);
  case M3S_F32: return ((const float *)base)[off];
  case M3S_E4M3: {
    __nv_fp8_e4m3 v;
    v.__x = ((const __nv_fp8_storage_t *)base)[off];
    return (float)v;
  }
  case M3S_E5M2: {
    __nv_fp8_e5m2 v;
    v.__x = ((const __nv_fp8_storage_t *)base)[off];
    return (float)v;
  }
  default: return 0.0f;
  }
}

/* Round-to-nearest-even store; fp8 saturating (value already divided by the
 * scale by the caller). */
static __device__ __forceinline__ void m3s_st(void *base, m3s_dtype dt, int64_t off, float v) {
  switch (dt) {
  case M3S_BF16: ((__nv_bfloat16 *)base)[off] = __float2bfloat16_rn(v); break;
  case M3S_F16: ((__half *)base)[off] = __float2half_rn(v); break;
  case M3S_F32: ((float *)base)[off] = v; break;
  case M3S_E4M3:
    ((__nv_fp8_storage_t *)base)[off] = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3);
    break;
  case M3S_E5M2:
    ((__nv_fp8_storage_t *)base)[off] = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E5M2);
    break;
  default: break;
  }
}

/* The warp's largest 64-bit value, in every lane: the largest high word,
 * then the largest low word among the lanes that hold it (two redux.sync
 * instead of five rounds of two 32-bit shuffles and a 64-bit compare). The
 * top-k selections rank (score, id) keys with it. */
static __device__ __forceinline__ unsigned long long m3s_warp_max_u64(unsigned long long v) {
  const uint32_t hi = __reduce_max_sync(0xffffffffu, (uint32_t)(v >> 32));
  const uint32_t lo =
      __reduce_max_sync(0xffffffffu, (uint32_t)(v >> 32) == hi ? (uint32_t)v : 0u);
  return ((unsigned long long)hi << 32) | lo;
}

/* Descending lists of the N largest 64-bit keys a lane has kept (0: an
 * empty place), for the selections' rounds of a warp maximum.
 * m3s_keylist_insert adds key k (> 0) and returns 1 when a key fell off the
 * end (k itself or the last one kept); m3s_keylist_pop drops the first key if
 * it is the round's winner w and returns 1 when that emptied the list (the
 * lane then rescans its candidates below w). */
template <int N>
static __device__ __forceinline__ int m3s_keylist_insert(unsigned long long k,
                                                         unsigned long long (&c)[N]) {
  if (k <= c[N - 1])
    return 1;
  const int dropped = c[N - 1] != 0;
#pragma unroll
  for (int i = N - 1; i > 0; i--) {
    if (k > c[i - 1]) {
      c[i] = c[i - 1];
    } else {
      c[i] = k > c[i] ? k : c[i];
      k = 0;
    }
  }
  c[0] = k > c[0] ? k : c[0];
  return dropped;
}

template <int N>
static __device__ __forceinline__ int m3s_keylist_pop(unsigned long long w,
                                                    unsigned long long (&c)[N]) {
  if (c[0] != w || w == 0)
    return 0;
#pragma unroll
  for (int i = 0; i < N - 1; i++)
    c[i] = c[i + 1];
  c[N - 1] = 0;
  return c[0] == 0;
}

/* The fixed tree that ends m3s_dot128_fixed: its eight partial sums into
 * one. */
static __device__ __forceinline__ float m3s_fold8(const float (&acc)[8]) {
  return __fadd_rn(__fadd_rn(__fadd_rn(acc[0], acc[4]), __fadd_rn(acc[1], acc[5])),
                   __fadd_rn(__fadd_rn(acc[2], acc[6]), __fadd_rn(acc[3], acc[7])));
}

/* The CPU backend's dot product, bit for bit (see the file comment). */
static_assert(M3S_HEAD_DIM == 128 && M3S_INDEX_DIM == 128,
              "m3s_dot128_fixed serves attention and index scores alike");
static __device__ __forceinline__ float m3s_dot128_fixed(const float *a, const float *b) {
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int i = 0; i < M3S_HEAD_DIM; i += 8)
#pragma unroll
    for (int l = 0; l < 8; l++)
      acc[l] = __fadd_rn(acc[l], __fmul_rn(a[i + l], b[i + l]));
  return m3s_fold8(acc);
}

/* fp8 scale of (head h, slot) or 1 when absent; scalar when per_slot == 0. */
typedef struct {
  const float *k, *v;
  int64_t k_s0, k_s1, v_s0, v_s1;
  int k_per_slot, v_per_slot;
} m3s_cuda_scales;

static inline m3s_cuda_scales m3s_cuda_scales_of(const m3s_kv_scales *s, m3s_dtype kv_dtype) {
  m3s_cuda_scales c = {NULL, NULL, 0, 0, 0, 0, 0, 0};
  if (!s || (kv_dtype != M3S_E4M3 && kv_dtype != M3S_E5M2))
    return c;
  c.k = (const float *)s->k_scale.data;
  c.v = (const float *)s->v_scale.data;
  c.k_per_slot = s->k_scale.ndim == 2;
  c.v_per_slot = s->v_scale.ndim == 2;
  if (c.k_per_slot)
    c.k_s0 = s->k_scale.stride[0], c.k_s1 = s->k_scale.stride[1];
  if (c.v_per_slot)
    c.v_s0 = s->v_scale.stride[0], c.v_s1 = s->v_scale.stride[1];
  return c;
}

static __device__ __forceinline__ float m3s_scale_k(const m3s_cuda_scales &s, int64_t h,
                                                    int64_t slot) {
  if (!s.k)
    return 1.0f;
  return s.k_per_slot ? s.k[h * s.k_s0 + slot * s.k_s1] : s.k[0];
}

static __device__ __forceinline__ float m3s_scale_v(const m3s_cuda_scales &s, int64_t h,
                                                    int64_t slot) {
  if (!s.v)
    return 1.0f;
  return s.v_per_slot ? s.v[h * s.v_s0 + slot * s.v_s1] : s.v[0];
}

/* Host: the caller's stream (legacy stream 0 when exec is NULL). */
static inline cudaStream_t m3s_cuda_stream(const m3s_exec *e) {
  return e ? (cudaStream_t)e->stream : (cudaStream_t)0;
}

/* Host: a grid dimension of n clamped to the launch limit cap. */
static inline unsigned m3s_grid_cap(int64_t n, int64_t cap) {
  return (unsigned)(n < cap ? n : cap);
}

/* Host, called once per context by context.cu with the context's device
 * current: raise the dynamic shared-memory limits of the kernels that need
 * more than 48 KB (attention.cu, k2q.cu). */
extern "C" cudaError_t m3s_cuda_attention_prepare(void);
extern "C" cudaError_t m3s_cuda_k2q_prepare(void);

/* Host: turns the last launch error into a status. */
static inline m3s_status m3s_cuda_check_launch(const char *fn, const char *kernel) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return m3s_fail(M3S_ERR_CUDA, fn, "launch of %s failed: %s", kernel, cudaGetErrorString(err));
  return M3S_OK;
}

/* ---- programmatic dependent launch (launch.h) ---- */

/* Device: wait until the grids this one depends on have finished and their
 * writes are visible. A kernel launched with m3s_launch(pdl = 1, ...) calls
 * it before its first read of anything an earlier kernel wrote; without PDL
 * (or before sm_90) it returns at once. */
static __device__ __forceinline__ void m3s_pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

/* Device: let the next kernel on the stream, if launched with PDL, start
 * (it still waits for this grid's end in m3s_pdl_wait). Only in kernels
 * whose whole grid is resident at once: a dependent that started early
 * holds SM resources while it waits. */
static __device__ __forceinline__ void m3s_pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

/* Host: the launch attribute of clusters of c CTAs along x. */
static inline cudaLaunchAttribute m3s_cluster_attr(unsigned c) {
  cudaLaunchAttribute at;
  at.id = cudaLaunchAttributeClusterDimension;
  at.val.clusterDim.x = c;
  at.val.clusterDim.y = 1;
  at.val.clusterDim.z = 1;
  return at;
}

/* Host: launches kernel k, with programmatic stream serialisation when pdl
 * != 0 (m3s_cuda_pdl) and as clusters of `cluster` CTAs along x when
 * cluster > 1 (grid.x a multiple of it); the launch's error (also left as
 * the last error, as for <<< >>>). */
template <typename... P, typename... A>
static inline cudaError_t m3s_launch_cl(int pdl, unsigned cluster, void (*k)(P...), dim3 grid,
                                        dim3 block, size_t smem, cudaStream_t stream,
                                        A &&...args) {
  cudaLaunchAttribute at[2];
  unsigned n = 0;
  if (pdl) {
    at[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster > 1)
    at[n++] = m3s_cluster_attr(cluster);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = at;
  cfg.numAttrs = n;
  return cudaLaunchKernelEx(&cfg, k, static_cast<A &&>(args)...);
}

/* Host: m3s_launch_cl without clusters. */
template <typename... P, typename... A>
static inline cudaError_t m3s_launch_ex(int pdl, void (*k)(P...), dim3 grid, dim3 block,
                                        size_t smem, cudaStream_t stream, A &&...args) {
  return m3s_launch_cl(pdl, 1u, k, grid, block, smem, stream, static_cast<A &&>(args)...);
}

/* Host: m3s_launch_ex, then the launch's status. */
template <typename... P, typename... A>
static inline m3s_status m3s_launch(int pdl, void (*k)(P...), dim3 grid, dim3 block, size_t smem,
                                    cudaStream_t stream, const char *fn, const char *kernel,
                                    A &&...args) {
  const cudaError_t err = m3s_launch_ex(pdl, k, grid, block, smem, stream, static_cast<A &&>(args)...);
  if (err != cudaSuccess) {
    (void)cudaGetLastError(); /* reported here; no sticky launch error left behind */
    return m3s_fail(M3S_ERR_CUDA, fn, "launch of %s failed: %s", kernel, cudaGetErrorString(err));
  }
  return m3s_cuda_check_launch(fn, kernel);
}

#endif
