/* CPU reference: block-sparse GQA attention (SPEC section 4), the key-centric
 * CSR schedule (section 7), the combine of per-slot partials and the lse merge
 * of two partial results.
 *
 * Attention for (query row t, KV head g): the selected blocks are visited in
 * ascending block id (so a score-ordered top-k row gives the same bits as an
 * ascending one); each block's visible keys (j <= pos) are converted to fp32
 * once per head chunk and consumed with an online softmax in fp32:
 *   m' = max(m, max_j s_j);  l' = l e^(m-m') + sum_j e^(s_j-m');
 *   acc' = acc e^(m-m') + sum_j e^(s_j-m') v_j;   out = acc/l, lse = m + log l.
 * A row with no visible key gives out = 0 and lse = -inf. The query heads of a
 * KV head are processed in chunks of up to HCHUNK, sharing each tile. */
#include "cpu_common.h"

#define HCHUNK 16

typedef struct {
  int nh;
  float m[HCHUNK];
  float l[HCHUNK];
  float acc[HCHUNK][CPU_D];
} attn_state;

typedef struct {
  float k[CPU_B][CPU_D];
  float v[CPU_B][CPU_D];
} kv_tile;

static void state_init(attn_state *s, int nh) {
  s->nh = nh;
  for (int h = 0; h < nh; h++) {
    s->m[h] = -INFINITY;
    s->l[h] = 0.0f;
    memset(s->acc[h], 0, sizeof s->acc[h]);
  }
}

/* Keys [0, nk) of logical block blk of request r, KV head g. */
static void load_tile(const m3s_tensor *kv, const m3s_kv_scales *sc, const m3s_batch *b, int r,
                      int g, int64_t blk, int nk, kv_tile *tile) {
  int64_t page = m3s_batch_page(&b->block_table, r, blk);
  const m3s_tensor *ks = sc ? &sc->k_scale : NULL, *vs = sc ? &sc->v_scale : NULL;
  for (int j = 0; j < nk; j++) {
    int64_t off = page * kv->stride[0] + g * kv->stride[1] + j * kv->stride[2];
    int64_t slot = page * CPU_B + j;
    cpu_load_f32(kv->data, kv->dtype, off, CPU_D, cpu_scale_at(ks, g, slot), tile->k[j]);
    cpu_load_f32(kv->data, kv->dtype, off + CPU_D, CPU_D, cpu_scale_at(vs, g, slot), tile->v[j]);
  }
}

static void attend_tile(attn_state *s, float (*q)[CPU_D], const kv_tile *tile, int nk,
                        float scale) {
  float sc[CPU_B];
  for (int h = 0; h < s->nh; h++) {
    float mx = -INFINITY;
    for (int j = 0; j < nk; j++) {
      sc[j] = cpu_dot128(q[h], tile->k[j]) * scale;
      mx = sc[j] > mx ? sc[j] : mx;
    }
    float m_new = mx > s->m[h] ? mx : s->m[h];
    if (m_new == -INFINITY)
      continue;
    float alpha = expf(s->m[h] - m_new);
    float *acc = s->acc[h];
    float l = s->l[h] * alpha;
    for (int d = 0; d < CPU_D; d++)
      acc[d] *= alpha;
    for (int j = 0; j < nk; j++) {
      float p = expf(sc[j] - m_new);
      l += p;
      for (int d = 0; d < CPU_D; d++)
        acc[d] += p * tile->v[j][d];
    }
    s->l[h] = l;
    s->m[h] = m_new;
  }
}

/* Writes head h of the state as out (dtype of out) and lse (may be NULL). */
static void state_store(const attn_state *s, int h, void *out, m3s_dtype dt, int64_t out_off,
                        float *lse_p) {
  float row[CPU_D];
  if (s->l[h] > 0.0f) {
    float inv = 1.0f / s->l[h];
    for (int d = 0; d < CPU_D; d++)
      row[d] = s->acc[h][d] * inv;
  } else {
    memset(row, 0, sizeof row);
  }
  cpu_store(out, dt, out_off, CPU_D, 1.0f, row);
  if (lse_p)
    *lse_p = s->l[h] > 0.0f ? s->m[h] + logf(s->l[h]) : -INFINITY;
}

static void load_q(const m3s_tensor *q, int64_t t, int h0, int nh, float (*dst)[CPU_D]) {
  for (int h = 0; h < nh; h++)
    cpu_load_f32(q->data, q->dtype, t * q->stride[0] + (h0 + h) * q->stride[1], CPU_D, 1.0f,
                 dst[h]);
}

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
  float q[HCHUNK][CPU_D];
  state_init(&st, nh);
  if (s > 0) {
    int64_t pos = s - n + i, nb = pos / CPU_B + 1;
    int32_t ids[M3S_MAX_TOPK];
    int nsel = selected_blocks(cfg, a->topk, t, g, nb, ids);
    load_q(a->q, t, hq0, nh, q);
    for (int k = 0; k < nsel; k++) {
      int64_t nk = pos + 1 - (int64_t)ids[k] * CPU_B;
      nk = nk > CPU_B ? CPU_B : nk;
      load_tile(a->kv, a->sc, a->b, r, g, ids[k], (int)nk, &tile);
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

m3s_status m3s_cpu_sparse_attention(const m3s_layer_config *cfg, const m3s_batch *batch,
                                    const m3s_tensor *q, const m3s_tensor *kv_cache,
                                    const m3s_kv_scales *scales, const m3s_tensor *topk,
                                    m3s_tensor *out, m3s_tensor *lse) {
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

/* ------------------------------------------------------------------------ */

m3s_status m3s_cpu_build_k2q_csr(const m3s_layer_config *cfg, const m3s_batch *batch,
                                 const m3s_tensor *topk, m3s_tensor *row_ptr,
                                 m3s_tensor *q_indices, m3s_tensor *q_slot, m3s_tensor *q_count) {
  /* Counting sort by row: pass 1 counts entries per row into row_ptr[row+1],
   * a prefix sum turns counts into starts, pass 2 places entries. Query rows
   * are visited in ascending order, so each row's list comes out ascending. */
  int64_t rows = row_ptr->shape[1] - 1;
  for (int g = 0; g < cfg->num_kv_heads; g++) {
    int32_t *rp = (int32_t *)row_ptr->data + g * row_ptr->stride[0];
    /* empty when T == 0: then data may be NULL and nothing is placed */
    int32_t *qi = m3s_numel(q_indices) ? (int32_t *)q_indices->data + g * q_indices->stride[0]
                                       : NULL;
    int32_t *qs = m3s_numel(q_slot) ? (int32_t *)q_slot->data + g * q_slot->stride[0] : NULL;
    for (int pass = 0; pass < 2; pass++) {
      if (pass == 0)
        memset(rp, 0, (size_t)(rows + 1) * sizeof *rp);
      int64_t base = 0;
      for (int r = 0; r < batch->num_reqs; r++) {
        int64_t s = m3s_batch_seqlen(batch, r), n = m3s_batch_qlen(batch, r);
        int64_t row0 = m3s_batch_row0(batch, r);
        for (int64_t i = 0; i < n; i++) {
          int64_t t = row0 + i;
          int64_t nb = s > 0 ? (s - n + i) / CPU_B + 1 : 0;
          int64_t kk = nb < cfg->topk ? nb : cfg->topk;
          const int32_t *row =
              (const int32_t *)topk->data + t * topk->stride[0] + g * topk->stride[1];
          int count = 0;
          for (int64_t k = 0; k < kk; k++) {
            int32_t id = row[k * topk->stride[2]];
            if (id < 0)
              continue;
            count++;
            if (pass == 0) {
              rp[base + id + 1]++;
            } else {
              int32_t at = rp[base + id]++;
              qi[at] = (int32_t)t;
              qs[at] = count - 1; /* rank among the valid entries: holes compacted */
            }
          }
          if (pass == 1)
            ((int32_t *)q_count->data)[t * q_count->stride[0] + g] = count;
        }
        base += m3s_ceil_div(s, CPU_B);
      }
      if (pass == 0)
        for (int64_t x = 0; x < rows; x++)
          rp[x + 1] += rp[x];
    }
    /* Pass 2 advanced each start to the next row's start: shift back. */
    for (int64_t x = rows; x > 0; x--)
      rp[x] = rp[x - 1];
    rp[0] = 0;
  }
  return M3S_OK;
}

/* Request and logical block of CSR row `row` (rows of request r are
 * consecutive, ceil(seq_len / 128) of them). */
static void row_owner(const m3s_batch *b, int64_t row, int *r_out, int64_t *blk_out) {
  int64_t base = 0;
  for (int r = 0; r < b->num_reqs; r++) {
    int64_t nbr = m3s_ceil_div(m3s_batch_seqlen(b, r), CPU_B);
    if (row < base + nbr) {
      *r_out = r;
      *blk_out = row - base;
      return;
    }
    base += nbr;
  }
  *r_out = -1;
  *blk_out = -1;
}

m3s_status m3s_cpu_k2q_attention(const m3s_layer_config *cfg, const m3s_batch *batch,
                                 const m3s_tensor *q, const m3s_tensor *kv_cache,
                                 const m3s_kv_scales *scales, const m3s_tensor *row_ptr,
                                 const m3s_tensor *q_indices, const m3s_tensor *q_slot,
                                 m3s_tensor *part_out, m3s_tensor *part_lse) {
  int64_t rows = row_ptr->shape[1] - 1, items = rows * cfg->num_kv_heads;
  int G = cfg->num_q_heads / cfg->num_kv_heads;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t it = 0; it < items; it++) {
    static _Thread_local kv_tile tile;
    int g = (int)(it / rows);
    int64_t row = it % rows, blk;
    int r;
    row_owner(batch, row, &r, &blk);
    const int32_t *rp = (const int32_t *)row_ptr->data + g * row_ptr->stride[0];
    /* empty CSR arrays (T == 0) have no entries: rp[row] == rp[row + 1] */
    const int32_t *qi =
        m3s_numel(q_indices) ? (const int32_t *)q_indices->data + g * q_indices->stride[0] : NULL;
    const int32_t *qs =
        m3s_numel(q_slot) ? (const int32_t *)q_slot->data + g * q_slot->stride[0] : NULL;
    if (rp[row] == rp[row + 1] || r < 0)
      continue;
    int64_t s = m3s_batch_seqlen(batch, r), n = m3s_batch_qlen(batch, r);
    int64_t row0 = m3s_batch_row0(batch, r);
    int64_t in_block = s - blk * CPU_B < CPU_B ? s - blk * CPU_B : CPU_B;
    load_tile(kv_cache, scales, batch, r, g, blk, (int)in_block, &tile);
    for (int32_t e = rp[row]; e < rp[row + 1]; e++) {
      int64_t t = qi[e], pos = s - n + (t - row0);
      int64_t nk = pos + 1 - blk * CPU_B;
      nk = nk > CPU_B ? CPU_B : nk;
      for (int h0 = 0; h0 < G; h0 += HCHUNK) {
        int nh = G - h0 < HCHUNK ? G - h0 : HCHUNK;
        attn_state st;
        float qf[HCHUNK][CPU_D];
        state_init(&st, nh);
        load_q(q, t, g * G + h0, nh, qf);
        if (nk > 0)
          attend_tile(&st, qf, &tile, (int)nk, cfg->softmax_scale);
        for (int h = 0; h < nh; h++) {
          int64_t hq = g * G + h0 + h;
          float *lse_p = (float *)part_lse->data + t * part_lse->stride[0] +
                         hq * part_lse->stride[1] + qs[e] * part_lse->stride[2];
          state_store(&st, h, part_out->data, M3S_F32,
                      t * part_out->stride[0] + hq * part_out->stride[1] +
                          qs[e] * part_out->stride[2],
                      lse_p);
        }
      }
    }
  }
  return M3S_OK;
}

/* ------------------------------------------------------------------------ */

/* Merges n states (row pointers to fp32 outputs and their lse) into out/lse,
 * in index order: weights e^(lse_i - max) over their sum. */
static void merge_states(int n, const float *const *outs, const float *lses, float *dst,
                         float *lse_out) {
  float mx = -INFINITY;
  for (int i = 0; i < n; i++)
    mx = lses[i] > mx ? lses[i] : mx;
  memset(dst, 0, CPU_D * sizeof *dst);
  if (mx == -INFINITY) {
    *lse_out = -INFINITY;
    return;
  }
  float sum = 0.0f;
  for (int i = 0; i < n; i++) {
    float w = expf(lses[i] - mx);
    sum += w;
    for (int d = 0; d < CPU_D; d++)
      dst[d] += w * outs[i][d];
  }
  for (int d = 0; d < CPU_D; d++)
    dst[d] /= sum;
  *lse_out = mx + logf(sum);
}

m3s_status m3s_cpu_combine_partials(const m3s_layer_config *cfg, const m3s_tensor *part_out,
                                    const m3s_tensor *part_lse, const m3s_tensor *q_count,
                                    m3s_tensor *out, m3s_tensor *lse) {
  int64_t T = part_out->shape[0];
  int Hq = cfg->num_q_heads, G = Hq / cfg->num_kv_heads;
#pragma omp parallel for schedule(static)
  for (int64_t it = 0; it < T * Hq; it++) {
    int64_t t = it / Hq;
    int h = (int)(it % Hq);
    int n = ((const int32_t *)q_count->data)[t * q_count->stride[0] + h / G];
    float slots[M3S_MAX_TOPK][CPU_D], lses[M3S_MAX_TOPK], row[CPU_D], l;
    const float *ptrs[M3S_MAX_TOPK];
    for (int k = 0; k < n; k++) {
      int64_t o = t * part_out->stride[0] + h * part_out->stride[1] + k * part_out->stride[2];
      cpu_load_f32(part_out->data, M3S_F32, o, CPU_D, 1.0f, slots[k]);
      ptrs[k] = slots[k];
      lses[k] = ((const float *)part_lse->data)[t * part_lse->stride[0] +
                                                  h * part_lse->stride[1] +
                                                  k * part_lse->stride[2]];
    }
    merge_states(n, ptrs, lses, row, &l);
    cpu_store(out->data, out->dtype, t * out->stride[0] + h * out->stride[1], CPU_D, 1.0f, row);
    if (lse)
      ((float *)lse->data)[t * lse->stride[0] + h * lse->stride[1]] = l;
  }
  return M3S_OK;
}

m3s_status m3s_cpu_merge_attn_states(const m3s_tensor *out_a, const m3s_tensor *lse_a,
                                     const m3s_tensor *out_b, const m3s_tensor *lse_b,
                                     m3s_tensor *out, m3s_tensor *lse) {
  int64_t T = out_a->shape[0], H = out_a->shape[1];
#pragma omp parallel for schedule(static)
  for (int64_t it = 0; it < T * H; it++) {
    int64_t t = it / H, h = it % H;
    float a[CPU_D], b[CPU_D], row[CPU_D], l, lses[2];
    cpu_load_f32(out_a->data, out_a->dtype, t * out_a->stride[0] + h * out_a->stride[1], CPU_D,
                 1.0f, a);
    cpu_load_f32(out_b->data, out_b->dtype, t * out_b->stride[0] + h * out_b->stride[1], CPU_D,
                 1.0f, b);
    lses[0] = ((const float *)lse_a->data)[t * lse_a->stride[0] + h * lse_a->stride[1]];
    lses[1] = ((const float *)lse_b->data)[t * lse_b->stride[0] + h * lse_b->stride[1]];
    const float *ptrs[2] = {a, b};
    merge_states(2, ptrs, lses, row, &l);
    cpu_store(out->data, out->dtype, t * out->stride[0] + h * out->stride[1], CPU_D, 1.0f, row);
    if (lse)
      ((float *)lse->data)[t * lse->stride[0] + h * lse->stride[1]] = l;
  }
  return M3S_OK;
}
