/* CUDA backend: index scoring and top-k selection. PLACEHOLDER: being written. */
#include "cuda_common.cuh"

extern "C" size_t m3s_cuda_topk_workspace(const m3s_context *, const m3s_layer_config *, int64_t,
                                          int64_t) {
  return 0;
}

extern "C" m3s_status m3s_cuda_index_topk(m3s_context *, const m3s_layer_config *,
                                          const m3s_batch *, const m3s_tensor *,
                                          const m3s_tensor *, m3s_tensor *, const m3s_exec *) {
  return m3s_fail(M3S_ERR_UNSUPPORTED, "m3s_index_topk", "not implemented on CUDA yet");
}
