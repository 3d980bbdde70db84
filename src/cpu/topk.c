/* CPU reference: lightning-indexer block scores and top-k selection
 * (SPEC section 3).
 *
 * For each (query row t, index head r): S(b) = max over the visible keys j of
 * block b of dot(iq[t,r], ik[j]) in fp32 (cpu_dot128's fixed order). Forced
 * blocks (init, local) are taken first; the rest of the min(K, nb) budget goes
 * to the best scores under the rank "higher score first, NaN last, equal scores
 * by lower block id", kept in a small sorted array while the blocks stream by in
 * ascending id. When nb <= K every visible block is selected and nothing is
 * scored. Output: selected ids ascending, then -1.
 *
 * Work split: OpenMP over (request, chunk of up to TOPK_CHUNK query rows,
 * index head), so each block's keys are converted to fp32 once per chunk. Each work item writes
 * only its own output rows. */
#include "common.h"

#define TOPK_CHUNK 8

typedef struct {
  float score;
  int32_t id;
} scored;

/* True when (sa, a) ranks before (sb, b). */
static inline int ranks_before(float sa, int32_t a, float sb, int32_t b) {
  int na = isnan(sa), nb = isnan(sb);
  if (na != nb)
    return nb;
  if (!na && sa != sb)
    return sa > sb;
  return a < b;
}

typedef struct {
  int64_t nb;       /* visible blocks */
  int64_t len;      /* visible keys */
  int want;         /* min(K, nb) - forced: slots filled by score */
  int have;         /* entries in best[] */
  scored best[M3S_MAX_TOPK];
} row_state;

static inline int is_forced(const m3s_layer_config *cfg, int64_t b, int64_t nb) {
  return b < cfg->init_blocks || b >= nb - cfg->local_blocks;
}

static int64_t forced_count(const m3s_layer_config *cfg, int64_t nb) {
  int64_t n = 0;
  for (int64_t b = 0; b < nb; b++)
    n += is_forced(cfg, b, nb);
  return n;
}

static void offer(row_state *s, float score, int32_t id) {
  if (s->want == 0)
    return;
  if (s->have == s->want && !ranks_before(score, id, s->best[s->have - 1].score,
                                          s->best[s->have - 1].id))
    return;
  int i = s->have < s->want ? s->have++ : s->want - 1;
  while (i > 0 && ranks_before(score, id, s->best[i - 1].score, s->best[i - 1].id)) {
    s->best[i] = s->best[i - 1];
    i--;
  }
  s->best[i].score = score;
  s->best[i].id = id;
}

static void write_row(const m3s_layer_config *cfg, const row_state *s, int32_t *out,
                      int64_t stride) {
  int32_t ids[M3S_MAX_TOPK];
  int n = 0;
  if (s->nb <= cfg->topk) {
    for (int64_t b = 0; b < s->nb; b++)
      ids[n++] = (int32_t)b;
  } else {
    for (int64_t b = 0; b < s->nb; b++)
      if (is_forced(cfg, b, s->nb))
        ids[n++] = (int32_t)b;
    for (int i = 0; i < s->have; i++)
      ids[n++] = s->best[i].id;
    for (int i = 1; i < n; i++)
      for (int j = i; j > 0 && ids[j] < ids[j - 1]; j--) {
        int32_t tmp = ids[j];
        ids[j] = ids[j - 1];
        ids[j - 1] = tmp;
      }
  }
  for (int i = 0; i < cfg->topk; i++)
    out[i * stride] = i < n ? ids[i] : -1;
}

/* Scores and selects for rows [t0, t0+nt) of request r, index head g. */
static void topk_chunk(const m3s_layer_config *cfg, const m3s_batch *b, int r, int64_t t0,
                       int nt, int g, const m3s_tensor *iq, const m3s_tensor *ic,
                       m3s_tensor *topk) {
  int64_t n = m3s_batch_qlen(b, r), s = m3s_batch_seqlen(b, r), row0 = m3s_batch_row0(b, r);
  row_state st[TOPK_CHUNK];
  float q[TOPK_CHUNK][M3S_INDEX_DIM];
  float keys[M3S_BLOCK_SIZE][M3S_INDEX_DIM];
  int64_t max_nb = 0;
  for (int i = 0; i < nt; i++) {
    int64_t pos = s - n + t0 + i;
    st[i].len = pos + 1;
    st[i].nb = pos / M3S_BLOCK_SIZE + 1;
    st[i].want = st[i].nb <= cfg->topk ? 0
                                       : (int)(cfg->topk - forced_count(cfg, st[i].nb));
    st[i].have = 0;
    if (st[i].want > 0 && st[i].nb > max_nb)
      max_nb = st[i].nb;
    cpu_load_f32(iq->data, iq->dtype, (row0 + t0 + i) * iq->stride[0] + g * iq->stride[1],
                 M3S_INDEX_DIM, 1.0f, q[i]);
  }
  for (int64_t blk = 0; blk < max_nb; blk++) {
    int32_t page = m3s_batch_page(&b->index_block_table, r, blk);
    int64_t visible = 0;
    for (int i = 0; i < nt; i++)
      if (st[i].want > 0 && blk < st[i].nb && !is_forced(cfg, blk, st[i].nb)) {
        int64_t v = st[i].len - blk * M3S_BLOCK_SIZE;
        v = v > M3S_BLOCK_SIZE ? M3S_BLOCK_SIZE : v;
        visible = v > visible ? v : visible;
      }
    if (visible == 0)
      continue;
    for (int64_t j = 0; j < visible; j++)
      cpu_load_f32(ic->data, ic->dtype, ((int64_t)page * M3S_BLOCK_SIZE + j) * M3S_INDEX_DIM,
                   M3S_INDEX_DIM, 1.0f, keys[j]);
    for (int i = 0; i < nt; i++) {
      if (st[i].want == 0 || blk >= st[i].nb || is_forced(cfg, blk, st[i].nb))
        continue;
      int64_t v = st[i].len - blk * M3S_BLOCK_SIZE;
      v = v > M3S_BLOCK_SIZE ? M3S_BLOCK_SIZE : v;
      /* NaN ranks below every real score, so the max ignores NaN dots; the
       * block score is NaN only when every visible dot is NaN. */
      float best = NAN;
      for (int64_t j = 0; j < v; j++) {
        float d = cpu_dot128(q[i], keys[j]);
        if (isnan(best) || d > best)
          best = d;
      }
      offer(&st[i], best, (int32_t)blk);
    }
  }
  for (int i = 0; i < nt; i++) {
    int32_t *out = (int32_t *)topk->data + (row0 + t0 + i) * topk->stride[0] + g * topk->stride[1];
    write_row(cfg, &st[i], out, topk->stride[2]);
  }
}

static void fill_minus_one(const m3s_layer_config *cfg, m3s_tensor *topk, int64_t row0,
                           int64_t n) {
  for (int64_t t = row0; t < row0 + n; t++)
    for (int g = 0; g < cfg->num_kv_heads; g++)
      for (int k = 0; k < cfg->topk; k++)
        ((int32_t *)topk->data)[t * topk->stride[0] + g * topk->stride[1] + k * topk->stride[2]] =
            -1;
}

m3s_status m3s_cpu_index_topk(m3s_context *ctx, const m3s_layer_config *cfg, const m3s_batch *batch,
                              const m3s_tensor *iq, const m3s_tensor *index_cache, m3s_tensor *topk,
                              const m3s_exec *exec) {
  (void)ctx, (void)exec; /* the CPU backend keeps no state and has no stream */
  for (int r = 0; r < batch->num_reqs; r++)
    if (m3s_batch_seqlen(batch, r) == 0)
      fill_minus_one(cfg, topk, m3s_batch_row0(batch, r), m3s_batch_qlen(batch, r));
  /* One parallel region; each request's items are shared out without a
   * barrier between requests, so many small decode requests still use every
   * thread. */
#pragma omp parallel
  for (int r = 0; r < batch->num_reqs; r++) {
    if (m3s_batch_seqlen(batch, r) == 0)
      continue;
    int64_t n = m3s_batch_qlen(batch, r);
    int64_t items = m3s_ceil_div(n, TOPK_CHUNK) * cfg->num_kv_heads;
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t it = 0; it < items; it++) {
      int64_t t0 = (it / cfg->num_kv_heads) * TOPK_CHUNK;
      int g = (int)(it % cfg->num_kv_heads);
      int nt = (int)(n - t0 < TOPK_CHUNK ? n - t0 : TOPK_CHUNK);
      topk_chunk(cfg, batch, r, t0, nt, g, iq, index_cache, topk);
    }
  }
  return M3S_OK;
}
