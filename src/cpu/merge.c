/* CPU reference: merges of attention states by their lse: the combine of the
 * k2q path's per-slot partials and the merges of two or N partial results. */
#include "common.h"

/* Merges n states (row pointers to fp32 outputs and their lse) into out/lse,
 * in index order: weights e^(lse_i - max) over their sum. */
static void merge_states(int n, const float *const *outs, const float *lses, float *dst,
                         float *lse_out) {
  float mx = -INFINITY;
  for (int i = 0; i < n; i++)
    mx = lses[i] > mx ? lses[i] : mx;
  memset(dst, 0, M3S_HEAD_DIM * sizeof *dst);
  if (mx == -INFINITY) {
    *lse_out = -INFINITY;
    return;
  }
  float sum = 0.0f;
  for (int i = 0; i < n; i++) {
    float w = expf(lses[i] - mx);
    sum += w;
    for (int d = 0; d < M3S_HEAD_DIM; d++)
      dst[d] += w * outs[i][d];
  }
  for (int d = 0; d < M3S_HEAD_DIM; d++)
    dst[d] /= sum;
  *lse_out = mx + logf(sum);
}

m3s_status m3s_cpu_combine_partials(m3s_context *ctx, const m3s_layer_config *cfg,
                                    const m3s_tensor *part_out, const m3s_tensor *part_lse,
                                    const m3s_tensor *q_count, m3s_tensor *out, m3s_tensor *lse,
                                    const m3s_exec *exec) {
  (void)ctx, (void)exec; /* the CPU backend keeps no state and has no stream */
  int64_t T = part_out->shape[0];
  int Hq = cfg->num_q_heads, G = Hq / cfg->num_kv_heads;
#pragma omp parallel for schedule(static)
  for (int64_t it = 0; it < T * Hq; it++) {
    int64_t t = it / Hq;
    int h = (int)(it % Hq);
    int n = ((const int32_t *)q_count->data)[t * q_count->stride[0] + h / G];
    float slots[M3S_MAX_TOPK][M3S_HEAD_DIM], lses[M3S_MAX_TOPK], row[M3S_HEAD_DIM], l;
    const float *ptrs[M3S_MAX_TOPK];
    for (int k = 0; k < n; k++) {
      int64_t o = t * part_out->stride[0] + h * part_out->stride[1] + k * part_out->stride[2];
      cpu_load_f32(part_out->data, M3S_F32, o, M3S_HEAD_DIM, 1.0f, slots[k]);
      ptrs[k] = slots[k];
      lses[k] = ((const float *)part_lse->data)[t * part_lse->stride[0] +
                                                  h * part_lse->stride[1] +
                                                  k * part_lse->stride[2]];
    }
    merge_states(n, ptrs, lses, row, &l);
    cpu_store(out->data, out->dtype, t * out->stride[0] + h * out->stride[1], M3S_HEAD_DIM, 1.0f,
              row);
    if (lse)
      ((float *)lse->data)[t * lse->stride[0] + h * lse->stride[1]] = l;
  }
  return M3S_OK;
}

m3s_status m3s_cpu_merge_attn_states(m3s_context *ctx, const m3s_tensor *out_a,
                                     const m3s_tensor *lse_a, const m3s_tensor *out_b,
                                     const m3s_tensor *lse_b, m3s_tensor *out, m3s_tensor *lse,
                                     const m3s_exec *exec) {
  (void)ctx, (void)exec; /* the CPU backend keeps no state and has no stream */
  int64_t T = out_a->shape[0], H = out_a->shape[1];
#pragma omp parallel for schedule(static)
  for (int64_t it = 0; it < T * H; it++) {
    int64_t t = it / H, h = it % H;
    float a[M3S_HEAD_DIM], b[M3S_HEAD_DIM], row[M3S_HEAD_DIM], l, lses[2];
    cpu_load_f32(out_a->data, out_a->dtype, t * out_a->stride[0] + h * out_a->stride[1],
                 M3S_HEAD_DIM, 1.0f, a);
    cpu_load_f32(out_b->data, out_b->dtype, t * out_b->stride[0] + h * out_b->stride[1],
                 M3S_HEAD_DIM, 1.0f, b);
    lses[0] = ((const float *)lse_a->data)[t * lse_a->stride[0] + h * lse_a->stride[1]];
    lses[1] = ((const float *)lse_b->data)[t * lse_b->stride[0] + h * lse_b->stride[1]];
    const float *ptrs[2] = {a, b};
    merge_states(2, ptrs, lses, row, &l);
    cpu_store(out->data, out->dtype, t * out->stride[0] + h * out->stride[1], M3S_HEAD_DIM, 1.0f,
              row);
    if (lse)
      ((float *)lse->data)[t * lse->stride[0] + h * lse->stride[1]] = l;
  }
  return M3S_OK;
}

m3s_status m3s_cpu_merge_attn_states_n(m3s_context *ctx, const m3s_tensor *outs,
                                       const m3s_tensor *lses, m3s_tensor *out, m3s_tensor *lse,
                                       const m3s_exec *exec) {
  (void)ctx, (void)exec; /* the CPU backend keeps no state and has no stream */
  int n = (int)outs->shape[0];
  int64_t T = outs->shape[1], H = outs->shape[2];
#pragma omp parallel for schedule(static)
  for (int64_t it = 0; it < T * H; it++) {
    int64_t t = it / H, h = it % H;
    float parts[M3S_MAX_CP_SIZE][M3S_HEAD_DIM], ls[M3S_MAX_CP_SIZE], row[M3S_HEAD_DIM], l;
    const float *ptrs[M3S_MAX_CP_SIZE];
    /* every input is read before out is written: out may alias one outs[i] */
    for (int i = 0; i < n; i++) {
      cpu_load_f32(outs->data, outs->dtype,
                   i * outs->stride[0] + t * outs->stride[1] + h * outs->stride[2], M3S_HEAD_DIM,
                   1.0f, parts[i]);
      ptrs[i] = parts[i];
      ls[i] = ((const float *)lses->data)[i * lses->stride[0] + t * lses->stride[1] +
                                          h * lses->stride[2]];
    }
    merge_states(n, ptrs, ls, row, &l);
    cpu_store(out->data, out->dtype, t * out->stride[0] + h * out->stride[1], M3S_HEAD_DIM, 1.0f,
              row);
    if (lse)
      ((float *)lse->data)[t * lse->stride[0] + h * lse->stride[1]] = l;
  }
  return M3S_OK;
}
