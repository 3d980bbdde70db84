/* CUDA backend: merges of attention states by their lse: the combine of the
 * k2q path's per-slot partials and the merges of two or N attention states
 * (context parallel: one per rank). fp32, as the CPU reference
 * (src/cpu/merge.c), but not bit-identical to it (expf/logf differ).
 *
 * Every launch goes to exec->stream (legacy stream 0 when exec is NULL); no
 * allocation, no synchronisation, no workspace.
 *
 * Kernels and launch shapes: combine_kernel, merge_kernel, merge_n_kernel: a
 * warp per (t, h), 256 threads per CTA. Guard: q_count values outside [0, K]
 * are clamped. */
#include "common.cuh"

#define WARP_THREADS 256

/* ---------------------------------------------------------------------------
 * Combine of per-slot partials, merge of two states
 * ------------------------------------------------------------------------- */

typedef struct {
  const float *po, *pl;
  int64_t po_s0, po_s1, po_s2, pl_s0, pl_s1, pl_s2;
  const int32_t *qc;
  int64_t qc_s0, qc_s1;
  void *out;
  m3s_dtype out_dt;
  int64_t out_s0, out_s1;
  float *lse;
  int64_t lse_s0, lse_s1;
  int64_t tokens;
  int hq, group, topk;
} combine_args;

/* A warp per (t, h): slots 0 .. q_count-1 merged in slot order, weights
 * e^(lse_k - max) over their sum (as the CPU). */
static __global__ void combine_kernel(combine_args a) {
  int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  int lane = threadIdx.x & 31;
  if (w >= a.tokens * a.hq)
    return;
  int64_t t = w / a.hq, h = w % a.hq;
  int n = a.qc[t * a.qc_s0 + (h / a.group) * a.qc_s1];
  n = n < 0 ? 0 : (n > a.topk ? a.topk : n);
  const float *pl = a.pl + t * a.pl_s0 + h * a.pl_s1;
  const float *po = a.po + t * a.po_s0 + h * a.po_s1;
  float mx = -INFINITY, acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, lse = -INFINITY;
  for (int k = 0; k < n; k++)
    mx = pl[k * a.pl_s2] > mx ? pl[k * a.pl_s2] : mx;
  if (mx != -INFINITY) {
    float sum = 0.0f;
    for (int k = 0; k < n; k++) {
      float wk = expf(pl[k * a.pl_s2] - mx);
      sum += wk;
      for (int i = 0; i < 4; i++)
        acc[i] += wk * po[k * a.po_s2 + lane + 32 * i];
    }
    for (int i = 0; i < 4; i++)
      acc[i] /= sum;
    lse = mx + logf(sum);
  }
  for (int i = 0; i < 4; i++)
    m3s_st(a.out, a.out_dt, t * a.out_s0 + h * a.out_s1 + lane + 32 * i, acc[i]);
  if (a.lse && lane == 0)
    a.lse[t * a.lse_s0 + h * a.lse_s1] = lse;
}

extern "C" m3s_status m3s_cuda_combine_partials(m3s_context *ctx, const m3s_layer_config *cfg,
                                                const m3s_tensor *part_out,
                                                const m3s_tensor *part_lse,
                                                const m3s_tensor *q_count, m3s_tensor *out,
                                                m3s_tensor *lse, const m3s_exec *exec) {
  (void)ctx;
  combine_args a;
  a.po = (const float *)part_out->data;
  a.po_s0 = part_out->stride[0];
  a.po_s1 = part_out->stride[1];
  a.po_s2 = part_out->stride[2];
  a.pl = (const float *)part_lse->data;
  a.pl_s0 = part_lse->stride[0];
  a.pl_s1 = part_lse->stride[1];
  a.pl_s2 = part_lse->stride[2];
  a.qc = (const int32_t *)q_count->data;
  a.qc_s0 = q_count->stride[0];
  a.qc_s1 = q_count->stride[1];
  a.out = out->data;
  a.out_dt = out->dtype;
  a.out_s0 = out->stride[0];
  a.out_s1 = out->stride[1];
  a.lse = lse ? (float *)lse->data : NULL;
  a.lse_s0 = lse ? lse->stride[0] : 0;
  a.lse_s1 = lse ? lse->stride[1] : 0;
  a.tokens = part_out->shape[0];
  a.hq = cfg->num_q_heads;
  a.group = cfg->num_q_heads / cfg->num_kv_heads;
  a.topk = cfg->topk;
  int64_t warps = a.tokens * a.hq;
  if (warps == 0)
    return M3S_OK;
  int64_t blocks = (warps * 32 + WARP_THREADS - 1) / WARP_THREADS;
  if (blocks > INT32_MAX)
    return m3s_fail(M3S_ERR_UNSUPPORTED, "m3s_combine_partials", "%lld rows exceed the grid limit",
                    (long long)warps);
  combine_kernel<<<(unsigned)blocks, WARP_THREADS, 0, m3s_cuda_stream(exec)>>>(a);
  return m3s_cuda_check_launch("m3s_combine_partials", "combine_kernel");
}

typedef struct {
  const void *oa, *ob;
  m3s_dtype oa_dt, ob_dt;
  int64_t oa_s0, oa_s1, ob_s0, ob_s1;
  const float *la, *lb;
  int64_t la_s0, la_s1, lb_s0, lb_s1;
  void *out;
  m3s_dtype out_dt;
  int64_t out_s0, out_s1;
  float *lse;
  int64_t lse_s0, lse_s1;
  int64_t tokens, heads;
} merge_args;

/* A warp per (t, h). out may alias out_a or out_b exactly (and lse lse_a or
 * lse_b): every lane reads its elements and both lse values before any
 * write. */
static __global__ void merge_kernel(merge_args a) {
  int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  int lane = threadIdx.x & 31;
  if (w >= a.tokens * a.heads)
    return;
  int64_t t = w / a.heads, h = w % a.heads;
  float xa[4], xb[4], acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int i = 0; i < 4; i++) {
    xa[i] = m3s_ld(a.oa, a.oa_dt, t * a.oa_s0 + h * a.oa_s1 + lane + 32 * i);
    xb[i] = m3s_ld(a.ob, a.ob_dt, t * a.ob_s0 + h * a.ob_s1 + lane + 32 * i);
  }
  float la = a.la[t * a.la_s0 + h * a.la_s1], lb = a.lb[t * a.lb_s0 + h * a.lb_s1];
  float mx = -INFINITY, lse = -INFINITY;
  mx = la > mx ? la : mx;
  mx = lb > mx ? lb : mx;
  if (mx != -INFINITY) {
    float wa = expf(la - mx), wb = expf(lb - mx), sum = wa + wb;
    for (int i = 0; i < 4; i++)
      acc[i] = (wa * xa[i] + wb * xb[i]) / sum;
    lse = mx + logf(sum);
  }
  __syncwarp();
  for (int i = 0; i < 4; i++)
    m3s_st(a.out, a.out_dt, t * a.out_s0 + h * a.out_s1 + lane + 32 * i, acc[i]);
  if (a.lse && lane == 0)
    a.lse[t * a.lse_s0 + h * a.lse_s1] = lse;
}

extern "C" m3s_status m3s_cuda_merge_attn_states(m3s_context *ctx, const m3s_tensor *out_a,
                                                 const m3s_tensor *lse_a,
                                                 const m3s_tensor *out_b,
                                                 const m3s_tensor *lse_b, m3s_tensor *out,
                                                 m3s_tensor *lse, const m3s_exec *exec) {
  (void)ctx;
  merge_args a;
  a.oa = out_a->data;
  a.ob = out_b->data;
  a.oa_dt = out_a->dtype;
  a.ob_dt = out_b->dtype;
  a.oa_s0 = out_a->stride[0];
  a.oa_s1 = out_a->stride[1];
  a.ob_s0 = out_b->stride[0];
  a.ob_s1 = out_b->stride[1];
  a.la = (const float *)lse_a->data;
  a.lb = (const float *)lse_b->data;
  a.la_s0 = lse_a->stride[0];
  a.la_s1 = lse_a->stride[1];
  a.lb_s0 = lse_b->stride[0];
  a.lb_s1 = lse_b->stride[1];
  a.out = out->data;
  a.out_dt = out->dtype;
  a.out_s0 = out->stride[0];
  a.out_s1 = out->stride[1];
  a.lse = lse ? (float *)lse->data : NULL;
  a.lse_s0 = lse ? lse->stride[0] : 0;
  a.lse_s1 = lse ? lse->stride[1] : 0;
  a.tokens = out_a->shape[0];
  a.heads = out_a->shape[1];
  int64_t warps = a.tokens * a.heads;
  if (warps == 0)
    return M3S_OK;
  int64_t blocks = (warps * 32 + WARP_THREADS - 1) / WARP_THREADS;
  if (blocks > INT32_MAX)
    return m3s_fail(M3S_ERR_UNSUPPORTED, "m3s_merge_attn_states",
                    "%lld rows exceed the grid limit", (long long)warps);
  merge_kernel<<<(unsigned)blocks, WARP_THREADS, 0, m3s_cuda_stream(exec)>>>(a);
  return m3s_cuda_check_launch("m3s_merge_attn_states", "merge_kernel");
}

typedef struct {
  const void *outs;
  m3s_dtype outs_dt;
  int64_t o_s0, o_s1, o_s2;
  const float *lses;
  int64_t l_s0, l_s1, l_s2;
  void *out;
  m3s_dtype out_dt;
  int64_t out_s0, out_s1;
  float *lse;
  int64_t lse_s0, lse_s1;
  int64_t n, tokens, heads;
} merge_n_args;

/* A warp per (t, h): the N states merged in order 0..N-1, weights
 * e^(lse_i - max) over their sum (as the CPU). out may alias one outs[i]
 * exactly: each lane reads its own elements of every state before writing
 * them. */
static __global__ void merge_n_kernel(merge_n_args a) {
  int64_t w = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  int lane = threadIdx.x & 31;
  if (w >= a.tokens * a.heads)
    return;
  int64_t t = w / a.heads, h = w % a.heads;
  const float *l = a.lses + t * a.l_s1 + h * a.l_s2;
  int64_t o = t * a.o_s1 + h * a.o_s2 + lane;
  float mx = -INFINITY, acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, lse = -INFINITY;
  for (int64_t i = 0; i < a.n; i++)
    mx = l[i * a.l_s0] > mx ? l[i * a.l_s0] : mx;
  if (mx != -INFINITY) {
    float sum = 0.0f;
    for (int64_t i = 0; i < a.n; i++) {
      float wi = expf(l[i * a.l_s0] - mx);
      sum += wi;
      for (int e = 0; e < 4; e++)
        acc[e] += wi * m3s_ld(a.outs, a.outs_dt, i * a.o_s0 + o + 32 * e);
    }
    for (int e = 0; e < 4; e++)
      acc[e] /= sum;
    lse = mx + logf(sum);
  }
  __syncwarp();
  for (int e = 0; e < 4; e++)
    m3s_st(a.out, a.out_dt, t * a.out_s0 + h * a.out_s1 + lane + 32 * e, acc[e]);
  if (a.lse && lane == 0)
    a.lse[t * a.lse_s0 + h * a.lse_s1] = lse;
}

extern "C" m3s_status m3s_cuda_merge_attn_states_n(m3s_context *ctx, const m3s_tensor *outs,
                                                   const m3s_tensor *lses, m3s_tensor *out,
                                                   m3s_tensor *lse, const m3s_exec *exec) {
  (void)ctx;
  merge_n_args a;
  a.outs = outs->data;
  a.outs_dt = outs->dtype;
  a.o_s0 = outs->stride[0];
  a.o_s1 = outs->stride[1];
  a.o_s2 = outs->stride[2];
  a.lses = (const float *)lses->data;
  a.l_s0 = lses->stride[0];
  a.l_s1 = lses->stride[1];
  a.l_s2 = lses->stride[2];
  a.out = out->data;
  a.out_dt = out->dtype;
  a.out_s0 = out->stride[0];
  a.out_s1 = out->stride[1];
  a.lse = lse ? (float *)lse->data : NULL;
  a.lse_s0 = lse ? lse->stride[0] : 0;
  a.lse_s1 = lse ? lse->stride[1] : 0;
  a.n = outs->shape[0];
  a.tokens = outs->shape[1];
  a.heads = outs->shape[2];
  int64_t warps = a.tokens * a.heads;
  if (warps == 0)
    return M3S_OK;
  int64_t blocks = (warps * 32 + WARP_THREADS - 1) / WARP_THREADS;
  if (blocks > INT32_MAX)
    return m3s_fail(M3S_ERR_UNSUPPORTED, "m3s_merge_attn_states_n",
                    "%lld rows exceed the grid limit", (long long)warps);
  merge_n_kernel<<<(unsigned)blocks, WARP_THREADS, 0, m3s_cuda_stream(exec)>>>(a);
  return m3s_cuda_check_launch("m3s_merge_attn_states_n", "merge_n_kernel");
}
