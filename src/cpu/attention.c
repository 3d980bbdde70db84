/* CPU reference: block-sparse GQA attention (SPEC section 4).
 *
 * Attention for (query row t, KV head g): the selected blocks are visited in
 * ascending block id (so a score-ordered top-k row gives the same bits as an
 * ascending one); each block's visible keys (j <= pos) are converted to fp32
 * once per head chunk and consumed with the online softmax of tile.h.
 * Context parallel (SPEC section 10): only the selected blocks this rank
 * owns are visited, at their rank-local block-table columns; the result is
 * the rank's partial state (a row that owns none stores out 0, lse -inf). */
#include "tile.h"

/* Valid selected ids of a top-k row (first min(K, nb), -1 skipped), ascending. */
static int selected_blocks(const m3s_layer_config *cfg, const m3s_tensor *topk, int64_t t, int g,
                           int64_t nb, int32_t *ids) {
  const int32_t *row = (const int32_t *)topk->data + t * topk->stride[0] + g * topk->stride[1];
  int64_t kk = nb < cfg->topk ? nb : cfg->topk;
  int n = 0;
  for (int64_t i = 0; i < kk; i++) {
    int32_t id = row[i * topk->stride[2]];
    if (id < 0)
      continue;
    int j = n++;
    for (; j > 0 && ids[j - 1] > id; j--)
      ids[j] = ids[j - 1];
    ids[j] = id;
  }
  return n;
}

typedef struct {
  const m3s_layer_config *cfg;
  const m3s_batch *b;
  const m3s_tensor *q, *kv, *topk;
  const m3s_kv_scales *sc;
  m3s_tensor *out, *lse;
} attn_args;

/* Query row i of request r, KV head g, query heads [g*G + h0, +nh). */
static void attend_row(const attn_args *a, int r, int64_t i, int g, int h0, int nh) {
  const m3s_layer_config *cfg = a->cfg;
  int64_t n = m3s_batch_qlen(a->b, r), s = m3s_batch_seqlen(a->b, r);
  int64_t t = m3s_batch_row0(a->b, r) + i;
  int G = cfg->num_q_heads / cfg->num_kv_heads;
  int hq0 = g * G + h0;
  static _Thread_local kv_tile tile;
  attn_state st;
  float q[HCHUNK][M3S_HEAD_DIM];
  state_init(&st, nh);
  if (s > 0) {
    int64_t pos = s - n + i, nb = pos / M3S_BLOCK_SIZE + 1;
    int32_t ids[M3S_MAX_TOPK];
    int nsel = selected_blocks(cfg, a->topk, t, g, nb, ids);
    load_q(a->q, t, hq0, nh, q);
    for (int k = 0; k < nsel; k++) {
      if (m3s_cp_owner(&a->b->cp, ids[k]) != a->b->cp.cp_rank)
        continue;
      int64_t nk = pos + 1 - (int64_t)ids[k] * M3S_BLOCK_SIZE;
      nk = nk > M3S_BLOCK_SIZE ? M3S_BLOCK_SIZE : nk;
      load_tile(a->kv, a->sc, a->b, r, g, m3s_cp_column(&a->b->cp, ids[k]), (int)nk, &tile);
      attend_tile(&st, q, &tile, (int)nk, cfg->softmax_scale);
    }
  }
  for (int h = 0; h < nh; h++) {
    float *lse_p = a->lse ? (float *)a->lse->data + t * a->lse->stride[0] +
                                (hq0 + h) * a->lse->stride[1]
                          : NULL;
    state_store(&st, h, a->out->data, a->out->dtype,
                t * a->out->stride[0] + (hq0 + h) * a->out->stride[1], lse_p);
  }
}

m3s_status m3s_cpu_sparse_attention(m3s_context *ctx, const m3s_layer_config *cfg,
                                    const m3s_batch *batch, const m3s_tensor *q,
                                    const m3s_tensor *kv_cache, const m3s_kv_scales *scales,
                                    const m3s_tensor *topk, m3s_tensor *out, m3s_tensor *lse,
                                    const m3s_exec *exec) {
  (void)ctx, (void)exec; /* the CPU backend keeps no state and has no stream */
  attn_args a = {cfg, batch, q, kv_cache, topk, scales, out, lse};
  int G = cfg->num_q_heads / cfg->num_kv_heads;
  int nchunk = (G + HCHUNK - 1) / HCHUNK;
#pragma omp parallel
  for (int r = 0; r < batch->num_reqs; r++) {
    int64_t items = m3s_batch_qlen(batch, r) * cfg->num_kv_heads * nchunk;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t it = 0; it < items; it++) {
      int c = (int)(it % nchunk);
      int g = (int)((it / nchunk) % cfg->num_kv_heads);
      int64_t i = it / nchunk / cfg->num_kv_heads;
      int h0 = c * HCHUNK, nh = G - h0 < HCHUNK ? G - h0 : HCHUNK;
      attend_row(&a, r, i, g, h0, nh);
    }
  }
  return M3S_OK;
}
