/* Helpers of the CPU reference backend: element loads and stores that turn
 * every supported dtype into fp32 and back, and the fixed-order fp32 dot
 * product that defines the backend's rounding.
 *
 * Assumptions (validated by the core before any backend call): shapes match,
 * innermost strides are 1, host memory, index values in range. */
#ifndef M3S_CPU_COMMON_H
#define M3S_CPU_COMMON_H

#include "../core/internal.h"
#include "convert.h"

#include <math.h>
#include <string.h>


/* The operations (one file each; the table in ops.c). Signatures are those of
 * m3s_backend_ops (src/core/backend.h). */
m3s_status m3s_cpu_cache_insert(m3s_context *ctx, const m3s_tensor *k, const m3s_tensor *v,
                                const m3s_tensor *slot_mapping, m3s_tensor *kv_cache,
                                const m3s_kv_scales *scales, const m3s_exec *exec);
m3s_status m3s_cpu_index_cache_insert(m3s_context *ctx, const m3s_tensor *ik,
                                      const m3s_tensor *slot_mapping, m3s_tensor *index_cache,
                                      const m3s_exec *exec);
m3s_status m3s_cpu_index_topk(m3s_context *ctx, const m3s_layer_config *cfg,
                              const m3s_batch *batch, const m3s_tensor *iq,
                              const m3s_tensor *index_cache, m3s_tensor *topk,
                              const m3s_exec *exec);
m3s_status m3s_cpu_sparse_attention(m3s_context *ctx, const m3s_layer_config *cfg,
                                    const m3s_batch *batch, const m3s_tensor *q,
                                    const m3s_tensor *kv_cache, const m3s_kv_scales *scales,
                                    const m3s_tensor *topk, m3s_tensor *out, m3s_tensor *lse,
                                    const m3s_exec *exec);
m3s_status m3s_cpu_build_k2q_csr(m3s_context *ctx, const m3s_layer_config *cfg,
                                 const m3s_batch *batch, const m3s_tensor *topk,
                                 m3s_tensor *row_ptr, m3s_tensor *q_indices, m3s_tensor *q_slot,
                                 m3s_tensor *q_count, const m3s_exec *exec);
m3s_status m3s_cpu_k2q_attention(m3s_context *ctx, const m3s_layer_config *cfg,
                                 const m3s_batch *batch, const m3s_tensor *q,
                                 const m3s_tensor *kv_cache, const m3s_kv_scales *scales,
                                 const m3s_tensor *row_ptr, const m3s_tensor *q_indices,
                                 const m3s_tensor *q_slot, m3s_tensor *part_out,
                                 m3s_tensor *part_lse, const m3s_exec *exec);
m3s_status m3s_cpu_combine_partials(m3s_context *ctx, const m3s_layer_config *cfg,
                                    const m3s_tensor *part_out, const m3s_tensor *part_lse,
                                    const m3s_tensor *q_count, m3s_tensor *out, m3s_tensor *lse,
                                    const m3s_exec *exec);
m3s_status m3s_cpu_merge_attn_states(m3s_context *ctx, const m3s_tensor *out_a,
                                     const m3s_tensor *lse_a, const m3s_tensor *out_b,
                                     const m3s_tensor *lse_b, m3s_tensor *out, m3s_tensor *lse,
                                     const m3s_exec *exec);
m3s_status m3s_cpu_index_topk_candidates(m3s_context *ctx, const m3s_layer_config *cfg,
                                         const m3s_batch *batch, const m3s_tensor *iq,
                                         const m3s_tensor *index_cache, m3s_tensor *cand_ids,
                                         m3s_tensor *cand_scores, const m3s_exec *exec);
m3s_status m3s_cpu_merge_topk_candidates(m3s_context *ctx, const m3s_layer_config *cfg,
                                         const m3s_batch *batch, const m3s_tensor *cand_ids,
                                         const m3s_tensor *cand_scores, m3s_tensor *topk,
                                         const m3s_exec *exec);
m3s_status m3s_cpu_merge_attn_states_n(m3s_context *ctx, const m3s_tensor *outs,
                                       const m3s_tensor *lses, m3s_tensor *out, m3s_tensor *lse,
                                       const m3s_exec *exec);

/* Converts n contiguous elements of dtype dt at element offset off of base
 * into fp32 (fp8 values multiplied by scale). */
static inline void cpu_load_f32(const void *base, m3s_dtype dt, int64_t off, int n, float scale,
                                float *dst) {
  switch (dt) {
  case M3S_BF16: {
    const uint16_t *p = (const uint16_t *)base + off;
    for (int i = 0; i < n; i++)
      dst[i] = m3s_bf16_to_f32_inline(p[i]);
    break;
  }
  case M3S_F16: {
    const uint16_t *p = (const uint16_t *)base + off;
    for (int i = 0; i < n; i++)
      dst[i] = m3s_f16_to_f32(p[i]);
    break;
  }
  case M3S_F32: memcpy(dst, (const float *)base + off, (size_t)n * sizeof(float)); break;
  case M3S_E4M3: {
    const uint8_t *p = (const uint8_t *)base + off;
    const float *lut = m3s_e4m3_table();
    for (int i = 0; i < n; i++)
      dst[i] = lut[p[i]] * scale;
    break;
  }
  case M3S_E5M2: {
    const uint8_t *p = (const uint8_t *)base + off;
    const float *lut = m3s_e5m2_table();
    for (int i = 0; i < n; i++)
      dst[i] = lut[p[i]] * scale;
    break;
  }
  default: memset(dst, 0, (size_t)n * sizeof(float)); break;
  }
}

/* Stores n fp32 values as dtype dt (round to nearest even; fp8 saturating,
 * after division by scale). */
static inline void cpu_store(void *base, m3s_dtype dt, int64_t off, int n, float scale,
                             const float *src) {
  switch (dt) {
  case M3S_BF16: {
    uint16_t *p = (uint16_t *)base + off;
    for (int i = 0; i < n; i++)
      p[i] = m3s_f32_to_bf16_inline(src[i]);
    break;
  }
  case M3S_F16: {
    uint16_t *p = (uint16_t *)base + off;
    for (int i = 0; i < n; i++)
      p[i] = m3s_f32_to_f16(src[i]);
    break;
  }
  case M3S_F32: memcpy((float *)base + off, src, (size_t)n * sizeof(float)); break;
  case M3S_E4M3: {
    uint8_t *p = (uint8_t *)base + off;
    for (int i = 0; i < n; i++)
      p[i] = m3s_f32_to_e4m3(src[i] / scale);
    break;
  }
  case M3S_E5M2: {
    uint8_t *p = (uint8_t *)base + off;
    for (int i = 0; i < n; i++)
      p[i] = m3s_f32_to_e5m2(src[i] / scale);
    break;
  }
  default: break;
  }
}

/* fp32 dot product of two 128-vectors with a fixed association: eight
 * interleaved partial sums, then a fixed pairwise tree. The order is part of
 * the CPU backend's definition of s(t, r, j); it vectorises without
 * -ffast-math and gives the same bits on every host. */
_Static_assert(M3S_HEAD_DIM == 128 && M3S_INDEX_DIM == 128,
               "cpu_dot128 serves attention and index scores alike");
static inline float cpu_dot128(const float *a, const float *b) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < M3S_HEAD_DIM; i += 8)
    for (int l = 0; l < 8; l++)
      acc[l] += a[i + l] * b[i + l];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* Scale of cache element (head h, slot) for a scale tensor: 1 when absent. */
static inline float cpu_scale_at(const m3s_tensor *s, int64_t h, int64_t slot) {
  if (!s || !s->data)
    return 1.0f;
  const float *p = (const float *)s->data;
  if (s->ndim < 2)
    return p[0];
  return p[h * s->stride[0] + slot * s->stride[1]];
}

static inline int64_t cpu_slot_at(const m3s_tensor *slots, int64_t i) {
  return slots->dtype == M3S_I64 ? ((const int64_t *)slots->data)[i * slots->stride[0]]
                                 : ((const int32_t *)slots->data)[i * slots->stride[0]];
}

#endif
