/* CPU reference: the key-centric k2q schedule (SPEC section 7): the CSR of
 * (query, slot) entries per (KV head, key block), and attention over it, one
 * block tile per CSR row, giving one partial state per (query, head, slot)
 * (merge.c combines them). */
#include "tile.h"

m3s_status m3s_cpu_build_k2q_csr(m3s_context *ctx, const m3s_layer_config *cfg,
                                 const m3s_batch *batch, const m3s_tensor *topk,
                                 m3s_tensor *row_ptr, m3s_tensor *q_indices, m3s_tensor *q_slot,
                                 m3s_tensor *q_count, const m3s_exec *exec) {
  (void)ctx, (void)exec; /* the CPU backend keeps no state and has no stream */
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
          int64_t nb = s > 0 ? (s - n + i) / M3S_BLOCK_SIZE + 1 : 0;
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
        base += m3s_ceil_div(s, M3S_BLOCK_SIZE);
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
    int64_t nbr = m3s_ceil_div(m3s_batch_seqlen(b, r), M3S_BLOCK_SIZE);
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

m3s_status m3s_cpu_k2q_attention(m3s_context *ctx, const m3s_layer_config *cfg,
                                 const m3s_batch *batch, const m3s_tensor *q,
                                 const m3s_tensor *kv_cache, const m3s_kv_scales *scales,
                                 const m3s_tensor *row_ptr, const m3s_tensor *q_indices,
                                 const m3s_tensor *q_slot, m3s_tensor *part_out,
                                 m3s_tensor *part_lse, const m3s_exec *exec) {
  (void)ctx, (void)exec; /* the CPU backend keeps no state and has no stream */
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
    int64_t in_block =
        s - blk * M3S_BLOCK_SIZE < M3S_BLOCK_SIZE ? s - blk * M3S_BLOCK_SIZE : M3S_BLOCK_SIZE;
    load_tile(kv_cache, scales, batch, r, g, blk, (int)in_block, &tile);
    for (int32_t e = rp[row]; e < rp[row + 1]; e++) {
      int64_t t = qi[e], pos = s - n + (t - row0);
      int64_t nk = pos + 1 - blk * M3S_BLOCK_SIZE;
      nk = nk > M3S_BLOCK_SIZE ? M3S_BLOCK_SIZE : nk;
      for (int h0 = 0; h0 < G; h0 += HCHUNK) {
        int nh = G - h0 < HCHUNK ? G - h0 : HCHUNK;
        attn_state st;
        float qf[HCHUNK][M3S_HEAD_DIM];
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
