/* CPU reference: cache inserts by slot mapping (SPEC section 2).
 * Token i goes to page slot/128, offset slot%128; negative slots skip the
 * token. Tokens are written in row order, so a repeated slot keeps the last. */
#include "common.h"

m3s_status m3s_cpu_cache_insert(m3s_context *ctx, const m3s_tensor *k, const m3s_tensor *v,
                                const m3s_tensor *slot_mapping, m3s_tensor *kv_cache,
                                const m3s_kv_scales *scales, const m3s_exec *exec) {
  (void)ctx, (void)exec; /* the CPU backend keeps no state and has no stream */
  const m3s_tensor *ks = scales ? &scales->k_scale : NULL;
  const m3s_tensor *vs = scales ? &scales->v_scale : NULL;
  int64_t hkv = kv_cache->shape[1];
  float row[M3S_HEAD_DIM];
  for (int64_t i = 0; i < k->shape[0]; i++) {
    int64_t slot = cpu_slot_at(slot_mapping, i);
    if (slot < 0)
      continue;
    int64_t page = slot / M3S_BLOCK_SIZE, off = slot % M3S_BLOCK_SIZE;
    for (int64_t h = 0; h < hkv; h++) {
      int64_t dst =
          page * kv_cache->stride[0] + h * kv_cache->stride[1] + off * kv_cache->stride[2];
      cpu_load_f32(k->data, k->dtype, i * k->stride[0] + h * k->stride[1], M3S_HEAD_DIM, 1.0f, row);
      cpu_store(kv_cache->data, kv_cache->dtype, dst, M3S_HEAD_DIM, cpu_scale_at(ks, h, slot), row);
      cpu_load_f32(v->data, v->dtype, i * v->stride[0] + h * v->stride[1], M3S_HEAD_DIM, 1.0f, row);
      cpu_store(kv_cache->data, kv_cache->dtype, dst + M3S_HEAD_DIM, M3S_HEAD_DIM,
                cpu_scale_at(vs, h, slot), row);
    }
  }
  return M3S_OK;
}

m3s_status m3s_cpu_index_cache_insert(m3s_context *ctx, const m3s_tensor *ik,
                                      const m3s_tensor *slot_mapping, m3s_tensor *index_cache,
                                      const m3s_exec *exec) {
  (void)ctx, (void)exec; /* the CPU backend keeps no state and has no stream */
  float row[M3S_INDEX_DIM];
  for (int64_t i = 0; i < ik->shape[0]; i++) {
    int64_t slot = cpu_slot_at(slot_mapping, i);
    if (slot < 0)
      continue;
    cpu_load_f32(ik->data, ik->dtype, i * ik->stride[0], M3S_INDEX_DIM, 1.0f, row);
    /* e4m3 index keys have no scale: a saturating cast (clamp to +-448). */
    cpu_store(index_cache->data, index_cache->dtype, slot * M3S_INDEX_DIM, M3S_INDEX_DIM, 1.0f,
              row);
  }
  return M3S_OK;
}
