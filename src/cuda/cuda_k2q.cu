/* CUDA backend: inserts, k2q CSR, combine, merge. PLACEHOLDER: being written. */
#include "cuda_common.cuh"

#define M3S_TODO(fn) return m3s_fail(M3S_ERR_UNSUPPORTED, fn, "not implemented on CUDA yet")

extern "C" m3s_status m3s_cuda_cache_insert(m3s_context *, const m3s_tensor *, const m3s_tensor *,
                                            const m3s_tensor *, m3s_tensor *,
                                            const m3s_kv_scales *, const m3s_exec *) {
  M3S_TODO("m3s_cache_insert");
}
extern "C" m3s_status m3s_cuda_index_cache_insert(m3s_context *, const m3s_tensor *,
                                                  const m3s_tensor *, m3s_tensor *,
                                                  const m3s_exec *) {
  M3S_TODO("m3s_index_cache_insert");
}
extern "C" m3s_status m3s_cuda_build_k2q_csr(m3s_context *, const m3s_layer_config *,
                                             const m3s_batch *, const m3s_tensor *, m3s_tensor *,
                                             m3s_tensor *, m3s_tensor *, m3s_tensor *,
                                             const m3s_exec *) {
  M3S_TODO("m3s_build_k2q_csr");
}
extern "C" m3s_status m3s_cuda_k2q_attention(m3s_context *, const m3s_layer_config *,
                                             const m3s_batch *, const m3s_tensor *,
                                             const m3s_tensor *, const m3s_kv_scales *,
                                             const m3s_tensor *, const m3s_tensor *,
                                             const m3s_tensor *, m3s_tensor *, m3s_tensor *,
                                             const m3s_exec *) {
  M3S_TODO("m3s_k2q_attention");
}
extern "C" m3s_status m3s_cuda_combine_partials(m3s_context *, const m3s_layer_config *,
                                                const m3s_tensor *, const m3s_tensor *,
                                                const m3s_tensor *, m3s_tensor *, m3s_tensor *,
                                                const m3s_exec *) {
  M3S_TODO("m3s_combine_partials");
}
extern "C" m3s_status m3s_cuda_merge_attn_states(m3s_context *, const m3s_tensor *,
                                                 const m3s_tensor *, const m3s_tensor *,
                                                 const m3s_tensor *, m3s_tensor *, m3s_tensor *,
                                                 const m3s_exec *) {
  M3S_TODO("m3s_merge_attn_states");
}
