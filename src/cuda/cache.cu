/* CUDA backend: cache inserts (SPEC section 2). The bytes written equal the
 * CPU reference's (src/cpu/cache.c) for every dtype and scale.
 *
 * Every launch goes to exec->stream (legacy stream 0 when exec is NULL); no
 * allocation, no synchronisation, no host read of device data, no workspace.
 *
 * Kernels and launch shapes:
 *  - insert_kv_kernel     grid (min(T, 2^31-1), min(Hkv, 65535)), 128 threads:
 *                         thread d converts K[d] and V[d] of one (token, head).
 *  - insert_index_kernel  grid min(T, 2^31-1), 128 threads.
 *
 * Guard (device data is not validated by the core): slots outside the cache
 * skip the token. */
#include "common.cuh"

#define INSERT_THREADS 128

/* ---------------------------------------------------------------------------
 * Inserts
 * ------------------------------------------------------------------------- */

typedef struct {
  const void *k, *v;
  m3s_dtype k_dt, v_dt;
  int64_t k_s0, k_s1, v_s0, v_s1;
  const void *slots;
  int slots_i64;
  int64_t slot_s0;
  void *cache;
  m3s_dtype c_dt;
  int64_t c_s0, c_s1, c_s2;
  int64_t num_slots; /* P * 128 */
  int64_t tokens, heads;
  m3s_cuda_scales sc;
} insert_args;

static __device__ __forceinline__ int64_t slot_at(const void *slots, int is_i64, int64_t s0,
                                                  int64_t i) {
  return is_i64 ? ((const int64_t *)slots)[i * s0] : (int64_t)((const int32_t *)slots)[i * s0];
}

/* Cache byte(s) of one value: RNE for bf16/f16; value / scale (IEEE division,
 * as the CPU) then the saturating fp8 cast. */
static __device__ __forceinline__ void store_scaled(void *base, m3s_dtype dt, int64_t off, float x,
                                             float scale) {
  if (dt == M3S_E4M3 || dt == M3S_E5M2)
    x = __fdiv_rn(x, scale);
  m3s_st(base, dt, off, x);
}

static __global__ void insert_kv_kernel(insert_args a) {
  int d = threadIdx.x;
  for (int64_t i = blockIdx.x; i < a.tokens; i += gridDim.x) {
    int64_t slot = slot_at(a.slots, a.slots_i64, a.slot_s0, i);
    if (slot < 0 || slot >= a.num_slots)
      continue;
    int64_t page = slot / M3S_BLOCK_SIZE, off = slot % M3S_BLOCK_SIZE;
    for (int64_t h = blockIdx.y; h < a.heads; h += gridDim.y) {
      int64_t dst = page * a.c_s0 + h * a.c_s1 + off * a.c_s2;
      float kx = m3s_ld(a.k, a.k_dt, i * a.k_s0 + h * a.k_s1 + d);
      float vx = m3s_ld(a.v, a.v_dt, i * a.v_s0 + h * a.v_s1 + d);
      store_scaled(a.cache, a.c_dt, dst + d, kx, m3s_scale_k(a.sc, h, slot));
      store_scaled(a.cache, a.c_dt, dst + M3S_HEAD_DIM + d, vx, m3s_scale_v(a.sc, h, slot));
    }
  }
}

extern "C" m3s_status m3s_cuda_cache_insert(m3s_context *ctx, const m3s_tensor *k,
                                            const m3s_tensor *v, const m3s_tensor *slot_mapping,
                                            m3s_tensor *kv_cache, const m3s_kv_scales *scales,
                                            const m3s_exec *exec) {
  (void)ctx;
  insert_args a;
  a.k = k->data;
  a.v = v->data;
  a.k_dt = k->dtype;
  a.v_dt = v->dtype;
  a.k_s0 = k->stride[0];
  a.k_s1 = k->stride[1];
  a.v_s0 = v->stride[0];
  a.v_s1 = v->stride[1];
  a.slots = slot_mapping->data;
  a.slots_i64 = slot_mapping->dtype == M3S_I64;
  a.slot_s0 = slot_mapping->stride[0];
  a.cache = kv_cache->data;
  a.c_dt = kv_cache->dtype;
  a.c_s0 = kv_cache->stride[0];
  a.c_s1 = kv_cache->stride[1];
  a.c_s2 = kv_cache->stride[2];
  a.num_slots = kv_cache->shape[0] * M3S_BLOCK_SIZE;
  a.tokens = k->shape[0];
  a.heads = kv_cache->shape[1];
  a.sc = m3s_cuda_scales_of(scales, kv_cache->dtype);
  if (a.tokens == 0 || a.heads == 0 || a.num_slots == 0)
    return M3S_OK;
  dim3 grid(m3s_grid_cap(a.tokens, INT32_MAX), m3s_grid_cap(a.heads, 65535));
  insert_kv_kernel<<<grid, INSERT_THREADS, 0, m3s_cuda_stream(exec)>>>(a);
  return m3s_cuda_check_launch("m3s_cache_insert", "insert_kv_kernel");
}

typedef struct {
  const void *ik;
  m3s_dtype ik_dt;
  int64_t ik_s0;
  const void *slots;
  int slots_i64;
  int64_t slot_s0;
  void *cache;
  m3s_dtype c_dt;
  int64_t num_slots; /* P * 128 */
  int64_t tokens;
} index_insert_args;

static __global__ void insert_index_kernel(index_insert_args a) {
  int d = threadIdx.x;
  for (int64_t i = blockIdx.x; i < a.tokens; i += gridDim.x) {
    int64_t slot = slot_at(a.slots, a.slots_i64, a.slot_s0, i);
    if (slot < 0 || slot >= a.num_slots)
      continue;
    /* e4m3 index keys have no scale: a saturating cast */
    m3s_st(a.cache, a.c_dt, slot * M3S_INDEX_DIM + d, m3s_ld(a.ik, a.ik_dt, i * a.ik_s0 + d));
  }
}

extern "C" m3s_status m3s_cuda_index_cache_insert(m3s_context *ctx, const m3s_tensor *ik,
                                                  const m3s_tensor *slot_mapping,
                                                  m3s_tensor *index_cache, const m3s_exec *exec) {
  (void)ctx;
  index_insert_args a;
  a.ik = ik->data;
  a.ik_dt = ik->dtype;
  a.ik_s0 = ik->stride[0];
  a.slots = slot_mapping->data;
  a.slots_i64 = slot_mapping->dtype == M3S_I64;
  a.slot_s0 = slot_mapping->stride[0];
  a.cache = index_cache->data;
  a.c_dt = index_cache->dtype;
  a.num_slots = index_cache->shape[0] * M3S_BLOCK_SIZE;
  a.tokens = ik->shape[0];
  if (a.tokens == 0 || a.num_slots == 0)
    return M3S_OK;
  insert_index_kernel<<<m3s_grid_cap(a.tokens, INT32_MAX), INSERT_THREADS, 0,
                        m3s_cuda_stream(exec)>>>(a);
  return m3s_cuda_check_launch("m3s_index_cache_insert", "insert_index_kernel");
}
