/* m3s-bench: per-case geometry, host only: request lengths, random top-k, the
 * bytes and flops a call moves, how many input sets fit. */
#include "bench.h"

void geom_free(geom *g) {
  free(g->n);
  free(g->seq);
  free(g->qsl);
  memset(g, 0, sizeof *g);
}

int geom_init(geom *g, const case_spec *c) {
  memset(g, 0, sizeof *g);
  g->c = *c;
  g->cfg = m3s_config_minimax_m3(c->tp);
  if (g->cfg.num_q_heads == 0)
    return 0;
  g->Hq = g->cfg.num_q_heads;
  g->Hkv = g->cfg.num_kv_heads;
  g->K = g->cfg.topk;
  g->G = g->Hq / g->Hkv;
  g->R = c->bs;
  g->n = malloc(sizeof(int) * (size_t)g->R);
  g->seq = malloc(sizeof(int32_t) * (size_t)g->R);
  g->qsl = malloc(sizeof(int32_t) * (size_t)(g->R + 1));
  if (!g->n || !g->seq || !g->qsl)
    return 0;
  g->qsl[0] = 0;
  for (int r = 0; r < g->R; r++) {
    int64_t s;
    if (op_prefill(c->op)) {
      s = (c->bs > 1 ? c->ctx * r / (c->bs - 1) : c->ctx) + c->qlen;
    } else {
      /* request 0 has the full context; the others lose a jitter < 128
       * (and, with --skew N, have ctx / N: one long request among short) */
      int64_t jitter = r ? (int64_t)((r * 2654435761u) % 128u) : 0;
      s = (r && c->skew > 1 ? c->ctx / c->skew : c->ctx) - jitter;
      if (s < c->qlen)
        s = c->qlen;
    }
    if (s > ((int64_t)1 << 30))
      return 0;
    g->n[r] = c->qlen;
    g->seq[r] = (int32_t)s;
    g->qsl[r + 1] = g->qsl[r] + c->qlen;
    if (s > g->max_seq)
      g->max_seq = s;
    g->pps += ceil_div(s, 128);
  }
  g->T = g->qsl[g->R];
  g->maxp = (int)ceil_div(g->max_seq, 128);
  if (c->kv_dt >= 0) {
    g->kvrow = 256 * m3s_dtype_size((m3s_dtype)c->kv_dt);
    g->kvpage = (size_t)g->Hkv * 128 * g->kvrow;
  }
  if (c->idx_dt >= 0) {
    g->idxrow = 128 * m3s_dtype_size((m3s_dtype)c->idx_dt);
    g->idxpage = 128 * g->idxrow;
  }
  /* top-k: each request's index keys once, its block table, iq and scores of
   * the tokens that must choose (nb > K; the others take every block), and
   * the top-k output of every token */
  for (int r = 0; r < g->R; r++) {
    if ((g->seq[r] - 1) / 128 + 1 > g->K)
      g->topk_bytes += (double)g->seq[r] * (double)g->idxrow + (double)ceil_div(g->seq[r], 128) * 4;
    for (int i = 0; i < g->n[r]; i++) {
      int64_t pos = g->seq[r] - g->n[r] + i;
      if (pos / 128 + 1 <= g->K)
        continue;
      g->topk_flops += 2.0 * 128 * g->Hkv * (double)(pos + 1);
      g->topk_bytes += (double)g->Hkv * 128 * 2;
    }
  }
  g->topk_bytes += (double)g->T * g->Hkv * g->K * 4;
  double attn_est = 0;
  for (int r = 0; r < g->R; r++) {
    int64_t nb = ceil_div(g->seq[r], 128);
    attn_est += (double)g->Hkv * (double)(nb < g->K ? nb : g->K) * 128 * (double)g->kvrow;
  }
  attn_est += (double)g->T * g->Hq * 128 * 2 * 2;
  g->est_bytes = (op_uses_idx(c->op) ? g->topk_bytes : 0) + (op_uses_kv(c->op) ? attn_est : 0);
  return 1;
}

/* Bytes of cache the case needs for s sets (kv region, aligned, then index). */
size_t cache_bytes(const geom *g, int s) {
  return align_up((size_t)s * (size_t)g->pps * g->kvpage, 4096) + (size_t)s * (size_t)g->pps * g->idxpage;
}

int sets_wanted(const geom *g, const options *o, double l2) {
  if (o->sets_force > 0)
    return o->sets_force;
  if (g->est_bytes >= 2 * l2)
    return 1;
  int s = 1 + (int)ceil(2 * l2 / (g->est_bytes > 1 ? g->est_bytes : 1));
  return s > o->max_sets ? o->max_sets : s;
}

/* Top-k rows of the attention cases: the token's own block plus K-1 distinct
 * random earlier blocks, ascending; tokens of one query block share one draw
 * unless sel_token. Rows with nb <= K take every block. */
void gen_topk(const geom *g, uint64_t seed, int sel_token, int32_t *tk) {
  uint64_t rng = seed;
  int K = g->K, Hkv = g->Hkv;
  int32_t cand[M3S_MAX_TOPK];
  for (int r = 0; r < g->R; r++)
    for (int h = 0; h < Hkv; h++) {
      int64_t group = -1;
      for (int i = 0; i < g->n[r]; i++) {
        int64_t t = g->qsl[r] + i, pos = g->seq[r] - g->n[r] + i, nb = pos / 128 + 1;
        int32_t *row = tk + (t * Hkv + h) * K;
        if (nb <= K) {
          for (int k = 0; k < K; k++)
            row[k] = k < nb ? k : -1;
          continue;
        }
        if (sel_token || pos / 128 != group) { /* new draw from [0, nb-1) */
          group = pos / 128;
          for (int k = 0; k < K - 1; k++) {
            int32_t x;
            int dup;
            do {
              x = (int32_t)(splitmix(&rng) % (uint64_t)(nb - 1));
              dup = 0;
              for (int j = 0; j < k; j++)
                dup |= cand[j] == x;
            } while (dup);
            cand[k] = x;
          }
        }
        for (int k = 0; k < K - 1; k++)
          row[k] = cand[k];
        row[K - 1] = (int32_t)(nb - 1);
        for (int a = 1; a < K; a++) /* insertion sort */
          for (int b = a; b > 0 && row[b - 1] > row[b]; b--) {
            int32_t x = row[b];
            row[b] = row[b - 1];
            row[b - 1] = x;
          }
      }
    }
}

/* Distinct visible keys per (request, KV head) over the selections of its
 * tokens (bytes the attention must read) and keys attended per (token, KV
 * head). Entries outside [0, nb) and repeats are ignored, as the kernels do. */
void attn_account(const geom *g, const int32_t *tk, double *uniq_keys, double *attended) {
  int K = g->K, Hkv = g->Hkv;
  int32_t *vis = calloc((size_t)g->maxp + 1, sizeof(int32_t));
  int64_t *stamp = calloc((size_t)g->maxp + 1, sizeof(int64_t));
  *uniq_keys = 0;
  *attended = 0;
  if (!vis || !stamp) {
    free(vis);
    free(stamp);
    return;
  }
  int64_t mark = 0;
  for (int r = 0; r < g->R; r++)
    for (int h = 0; h < Hkv; h++) {
      memset(vis, 0, sizeof(int32_t) * (size_t)g->maxp);
      for (int i = 0; i < g->n[r]; i++) {
        int64_t t = g->qsl[r] + i, pos = g->seq[r] - g->n[r] + i, nb = pos / 128 + 1;
        int64_t cnt = nb < K ? nb : K;
        const int32_t *row = tk + (t * Hkv + h) * K;
        mark++;
        for (int64_t k = 0; k < cnt; k++) {
          int32_t b = row[k];
          if (b < 0 || b >= nb || b >= g->maxp || stamp[b] == mark)
            continue;
          stamp[b] = mark;
          int64_t keys = pos - 128 * (int64_t)b + 1;
          if (keys > 128)
            keys = 128;
          *attended += (double)keys;
          if (keys > vis[b])
            vis[b] = (int32_t)keys;
        }
      }
      for (int b = 0; b < g->maxp; b++)
        *uniq_keys += vis[b];
    }
  free(vis);
  free(stamp);
}

/* Bytes and flops of one call from the mean distinct visible keys per call
 * (uniq, summed over (request, KV head)) and keys attended per call (summed
 * over (token, KV head)). The step leaves out its top-k intermediate. */
void count_work(const geom *g, double uniq, double attended, int lse, double *bytes,
                double *flops) {
  double tk = (double)g->T * g->Hkv * g->K * 4;
  double attn_b = uniq * (double)g->kvrow + (double)g->T * g->Hq * 128 * 2 * 2 +
                  (lse ? (double)g->T * g->Hq * 4 : 0);
  double attn_f = 4.0 * 128 * g->G * attended;
  switch (g->c.op) {
  case OP_ATTN:
  case OP_PATTN:
    *bytes = attn_b + tk;
    *flops = attn_f;
    break;
  case OP_STEP:
  case OP_PSTEP:
    *bytes = g->topk_bytes - tk + attn_b;
    *flops = g->topk_flops + attn_f;
    break;
  default:
    *bytes = g->topk_bytes;
    *flops = g->topk_flops;
  }
}
