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
 * Context parallel (SPEC section 10): the candidates of one rank are the same
 * streaming selection over the blocks the rank owns (read at their rank-local
 * columns), written with their scores instead of as a sorted row; the merge
 * offers every rank's non-forced candidates to the same selection, so both
 * rank by the same function and the merged row equals the whole-cache one.
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

static void row_init(const m3s_layer_config *cfg, row_state *s, int64_t pos) {
  s->len = pos + 1;
  s->nb = pos / M3S_BLOCK_SIZE + 1;
  s->want = s->nb <= cfg->topk ? 0 : (int)(cfg->topk - forced_count(cfg, s->nb));
  s->have = 0;
}

/* The candidates of one rank for a row: the owned blocks selected whatever
 * the scores (+inf), the owned best by score, then -1 / -inf. */
static void write_candidates(const m3s_layer_config *cfg, const m3s_cp *cp, const row_state *s,
                             int32_t *ids, int64_t ids_stride, float *scores,
                             int64_t scores_stride) {
  int n = 0;
  for (int64_t b = 0; b < s->nb; b++)
    if ((s->nb <= cfg->topk || is_forced(cfg, b, s->nb)) && m3s_cp_owner(cp, b) == cp->cp_rank) {
      ids[n * ids_stride] = (int32_t)b;
      scores[n++ * scores_stride] = INFINITY;
    }
  /* NaN as the quiet NaN 0x7fc00000 and -0 as +0, as every backend writes
   * them (block maxima may differ there, never in rank) */
  for (int i = 0; i < s->have; i++) {
    ids[n * ids_stride] = s->best[i].id;
    scores[n++ * scores_stride] = isnan(s->best[i].score) ? NAN : s->best[i].score + 0.0f;
  }
  for (; n < cfg->topk; n++) {
    ids[n * ids_stride] = -1;
    scores[n * scores_stride] = -INFINITY;
  }
}

/* Where topk_chunk writes: the selection (scores NULL) or candidates. */
typedef struct {
  m3s_tensor *ids;
  m3s_tensor *scores;
} topk_dst;

/* Scores and selects for rows [t0, t0+nt) of request r, index head g, over
 * the blocks this rank owns (every block without context parallel). */
static void topk_chunk(const m3s_layer_config *cfg, const m3s_batch *b, int r, int64_t t0,
                       int nt, int g, const m3s_tensor *iq, const m3s_tensor *ic,
                       const topk_dst *dst) {
  int64_t n = m3s_batch_qlen(b, r), s = m3s_batch_seqlen(b, r), row0 = m3s_batch_row0(b, r);
  row_state st[TOPK_CHUNK];
  float q[TOPK_CHUNK][M3S_INDEX_DIM];
  float keys[M3S_BLOCK_SIZE][M3S_INDEX_DIM];
  int64_t max_nb = 0;
  for (int i = 0; i < nt; i++) {
    row_init(cfg, &st[i], s - n + t0 + i);
    if (st[i].want > 0 && st[i].nb > max_nb)
      max_nb = st[i].nb;
    cpu_load_f32(iq->data, iq->dtype, (row0 + t0 + i) * iq->stride[0] + g * iq->stride[1],
                 M3S_INDEX_DIM, 1.0f, q[i]);
  }
  for (int64_t blk = 0; blk < max_nb; blk++) {
    if (m3s_cp_owner(&b->cp, blk) != b->cp.cp_rank)
      continue;
    int32_t page = m3s_batch_page(&b->index_block_table, r, m3s_cp_column(&b->cp, blk));
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
    int64_t t = row0 + t0 + i;
    int32_t *ids = (int32_t *)dst->ids->data + t * dst->ids->stride[0] + g * dst->ids->stride[1];
    if (!dst->scores) {
      write_row(cfg, &st[i], ids, dst->ids->stride[2]);
      continue;
    }
    float *sc = (float *)dst->scores->data + t * dst->scores->stride[0] +
                g * dst->scores->stride[1];
    write_candidates(cfg, &b->cp, &st[i], ids, dst->ids->stride[2], sc, dst->scores->stride[2]);
  }
}

/* Rows [row0, row0 + n) of a padded request: ids -1 (scores -inf). */
static void fill_padded(const m3s_layer_config *cfg, const topk_dst *dst, int64_t row0,
                        int64_t n) {
  const m3s_tensor *ids = dst->ids, *sc = dst->scores;
  for (int64_t t = row0; t < row0 + n; t++)
    for (int g = 0; g < cfg->num_kv_heads; g++)
      for (int k = 0; k < cfg->topk; k++) {
        ((int32_t *)ids->data)[t * ids->stride[0] + g * ids->stride[1] + k * ids->stride[2]] = -1;
        if (sc)
          ((float *)sc->data)[t * sc->stride[0] + g * sc->stride[1] + k * sc->stride[2]] =
              -INFINITY;
      }
}

static void run_topk(const m3s_layer_config *cfg, const m3s_batch *batch, const m3s_tensor *iq,
                     const m3s_tensor *index_cache, const topk_dst *dst) {
  for (int r = 0; r < batch->num_reqs; r++)
    if (m3s_batch_seqlen(batch, r) == 0)
      fill_padded(cfg, dst, m3s_batch_row0(batch, r), m3s_batch_qlen(batch, r));
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
      topk_chunk(cfg, batch, r, t0, nt, g, iq, index_cache, dst);
    }
  }
}

m3s_status m3s_cpu_index_topk(m3s_context *ctx, const m3s_layer_config *cfg, const m3s_batch *batch,
                              const m3s_tensor *iq, const m3s_tensor *index_cache, m3s_tensor *topk,
                              const m3s_exec *exec) {
  (void)ctx, (void)exec; /* the CPU backend keeps no state and has no stream */
  topk_dst dst = {topk, NULL};
  run_topk(cfg, batch, iq, index_cache, &dst);
  return M3S_OK;
}

m3s_status m3s_cpu_index_topk_candidates(m3s_context *ctx, const m3s_layer_config *cfg,
                                         const m3s_batch *batch, const m3s_tensor *iq,
                                         const m3s_tensor *index_cache, m3s_tensor *cand_ids,
                                         m3s_tensor *cand_scores, const m3s_exec *exec) {
  (void)ctx, (void)exec; /* the CPU backend keeps no state and has no stream */
  topk_dst dst = {cand_ids, cand_scores};
  run_topk(cfg, batch, iq, index_cache, &dst);
  return M3S_OK;
}

/* Row t, head g of the merge: the non-forced candidates of every rank offered
 * to one selection (forced blocks come from nb itself). */
static void merge_row(const m3s_layer_config *cfg, const m3s_tensor *ids, const m3s_tensor *sc,
                      int64_t t, int g, int64_t pos, int32_t *out, int64_t out_stride) {
  row_state st;
  row_init(cfg, &st, pos);
  for (int64_t n = 0; n < ids->shape[0] && st.want > 0; n++) {
    const int32_t *id = (const int32_t *)ids->data + n * ids->stride[0] + t * ids->stride[1] +
                        g * ids->stride[2];
    const float *score = (const float *)sc->data + n * sc->stride[0] + t * sc->stride[1] +
                         g * sc->stride[2];
    for (int k = 0; k < cfg->topk; k++)
      if (id[k * ids->stride[3]] >= 0 && !is_forced(cfg, id[k * ids->stride[3]], st.nb))
        offer(&st, score[k * sc->stride[3]], id[k * ids->stride[3]]);
  }
  write_row(cfg, &st, out, out_stride);
}

m3s_status m3s_cpu_merge_topk_candidates(m3s_context *ctx, const m3s_layer_config *cfg,
                                         const m3s_batch *batch, const m3s_tensor *cand_ids,
                                         const m3s_tensor *cand_scores, m3s_tensor *topk,
                                         const m3s_exec *exec) {
  (void)ctx, (void)exec; /* the CPU backend keeps no state and has no stream */
  topk_dst dst = {topk, NULL};
  for (int r = 0; r < batch->num_reqs; r++)
    if (m3s_batch_seqlen(batch, r) == 0)
      fill_padded(cfg, &dst, m3s_batch_row0(batch, r), m3s_batch_qlen(batch, r));
#pragma omp parallel
  for (int r = 0; r < batch->num_reqs; r++) {
    int64_t s = m3s_batch_seqlen(batch, r), n = m3s_batch_qlen(batch, r);
    int64_t row0 = m3s_batch_row0(batch, r), items = s > 0 ? n * cfg->num_kv_heads : 0;
#pragma omp for schedule(static) nowait
    for (int64_t it = 0; it < items; it++) {
      int64_t i = it / cfg->num_kv_heads;
      int g = (int)(it % cfg->num_kv_heads);
      int32_t *out =
          (int32_t *)topk->data + (row0 + i) * topk->stride[0] + g * topk->stride[1];
      merge_row(cfg, cand_ids, cand_scores, row0 + i, g, s - n + i, out, topk->stride[2]);
    }
  }
  return M3S_OK;
}
