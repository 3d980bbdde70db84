/* reference.c -- the fp64 references of SPEC 3-4 over the harness's own tensor
 * views: index top-k and attention, the mathematics from tests/ref_core.c (the
 * tests' reference uses the same), the rows from the views. */
#include "fuzz.h"

#include "ref_core.h"

/* fp64 references                                                          */
/* ======================================================================== */
/* The index cache decoded once, [P][128][128] (pages of the nominal pool). */
double *decode_ic(const targ *ic, int64_t P) {
  double *v = (double *)malloc(sizeof(double) * (size_t)(P * BS * D + 1));
  for (int64_t p = 0; p < P; p++)
    for (int j = 0; j < BS; j++)
      row_get(ic, I4(p, j, 0, 0), D, v + (p * BS + j) * D);
  return v;
}

/* Reference selection of row (request r, index i), index head g: only the
 * blocks that compete for the budget are scored. */
int ref_topk(const m3s_layer_config *c, const bat *B, const targ *iq, const double *ic,
             int64_t row_base, int r, int64_t i, int g, int32_t *ids) {
  int64_t pos = bpos(B, r, i);
  if (pos < 0)
    return 0;
  int64_t nb = pos / BS + 1;
  double q[D], sc[MAX_COLS];
  row_get(iq, I4(row_base + B->row0[r] + i, g, 0, 0), D, q);
  for (int64_t b = 0; b < nb; b++)
    sc[b] = ref_competes(c, b, nb)
                ? ref_block_max(q, ic + (int64_t)B->ibt[r][b] * BS * D, ref_block_keys(b, pos))
                : NAN;
  return ref_select_blocks(c, nb, sc, ids);
}

/* Checks the top-k rows of a batch (rows row_base + ...) : the SPEC 3 format
 * always, the exact reference when exact != 0. */
void check_topk_rows(const m3s_layer_config *c, const bat *B, const targ *iq, const targ *ic,
                            const targ *tk, int64_t row_base, int exact) {
  int K = c->topk;
  double *icd = exact ? decode_ic(ic, B->Pi) : NULL;
  for (int r = 0; r < B->num_reqs; r++)
    for (int64_t i = 0; i < B->n[r]; i++) {
      int64_t t = row_base + B->row0[r] + i, pos = bpos(B, r, i);
      for (int g = 0; g < c->num_kv_heads; g++) {
        int32_t got[M3S_MAX_TOPK], want[M3S_MAX_TOPK];
        for (int k = 0; k < K; k++)
          got[k] = (int32_t)tgeti(tk, I4(t, g, k, 0));
        if (pos < 0) {
          for (int k = 0; k < K; k++)
            if (got[k] != -1)
              die("top-k row %lld head %d of a padded request: entry %d = %d, want -1",
                  (long long)t, g, k, got[k]);
          continue;
        }
        int64_t nb = pos / BS + 1, kk = nb < K ? nb : K;
        for (int k = 0; k < K; k++) {
          if (k >= kk) {
            if (got[k] != -1)
              die("top-k row %lld head %d: entry %d = %d past min(K, nb) = %lld, want -1",
                  (long long)t, g, k, got[k], (long long)kk);
          } else if (got[k] < 0 || got[k] >= nb || (k > 0 && got[k] <= got[k - 1])) {
            die("top-k row %lld head %d: entry %d = %d is not an ascending id < nb = %lld",
                (long long)t, g, k, got[k], (long long)nb);
          }
        }
        for (int64_t b = 0; b < nb; b++)
          if (ref_forced(c, b, nb)) {
            int found = 0;
            for (int k = 0; k < kk; k++)
              found |= got[k] == b;
            if (!found)
              die("top-k row %lld head %d misses forced block %lld (nb %lld)", (long long)t, g,
                  (long long)b, (long long)nb);
          }
        if (exact) {
          int n = ref_topk(c, B, iq, icd, row_base, r, i, g, want);
          S.ref_rows++;
          if (n != kk)
            die("harness: reference selected %d blocks, want %lld", n, (long long)kk);
          for (int k = 0; k < n; k++)
            if (got[k] != want[k])
              die("top-k row %lld (request %d, pos %lld) head %d entry %d: got %d, fp64 "
                  "reference %d",
                  (long long)t, r, (long long)pos, g, k, got[k], want[k]);
        }
      }
    }
  free(icd);
}


void attn_decode(attn_in *A) {
  int64_t P = A->B->P;
  int hkv = A->c->num_kv_heads;
  A->kvd = (float *)malloc(sizeof(float) * (size_t)(P * hkv * BS * 2 * D + 1));
  const bat *B = A->B;
  double tmp[2 * D];
  for (int r = 0; r < B->num_reqs; r++) /* only keys that exist: positions < seq_len */
    for (int64_t pos = 0; pos < B->s[r]; pos++) {
      int64_t p = B->bt[r][pos / BS], j = pos % BS;
      if (p < 0 || p >= P)
        continue;
      for (int g = 0; g < hkv; g++) {
        double ks = scale_at(A->sc, 0, g, p * BS + j), vs = scale_at(A->sc, 1, g, p * BS + j);
        float *row = A->kvd + ((p * hkv + g) * BS + j) * 2 * D;
        row_get(A->kv, I4(p, g, j, 0), 2 * D, tmp);
        for (int d = 0; d < 2 * D; d++)
          row[d] = (float)(tmp[d] * (d < D ? ks : vs));
      }
    }
}

/* The decoded K/V rows of request r, KV head g, for ref_attend_blocks. */
typedef struct {
  const attn_in *A;
  int r, g;
} kvd_rows;

static void kvd_row(void *user, int64_t j, int is_v, double *row) {
  const kvd_rows *k = user;
  int64_t page = k->A->B->bt[k->r][j / BS], hkv = k->A->c->num_kv_heads;
  const float *src = k->A->kvd + ((page * hkv + k->g) * BS + j % BS) * 2 * D + (is_v ? D : 0);
  for (int d = 0; d < D; d++)
    row[d] = src[d];
}

/* fp64 attention of the query heads [h0, h0 + nh) of row t (one KV head's)
 * over the keys j <= pos of the blocks in ids[0..n), after attn_decode:
 * out [nh][D], lse [nh]. Returns the number of keys. */
int64_t ref_attend(const attn_in *A, int r, int64_t pos, int64_t t, int h0, int nh,
                   const int32_t *ids, int n, double *out, double *lse) {
  kvd_rows k = {A, r, h0 / (A->c->num_q_heads / A->c->num_kv_heads)};
  double *q = malloc(sizeof(double) * (size_t)nh * D);
  for (int h = 0; h < nh; h++)
    row_get(A->q, I4(t, h0 + h, 0, 0), D, q + h * D);
  int64_t nk = ref_attend_blocks(q, nh, A->c->softmax_scale, pos, ids, n, kvd_row, &k, out, lse);
  free(q);
  return nk;
}

/* Checks out/lse rows of an attention call over the batch's top-k rows. */
void check_attn_rows(attn_in *A, const targ *out, const targ *lse, int numeric) {
  if (numeric)
    attn_decode(A);
  const m3s_layer_config *c = A->c;
  const bat *B = A->B;
  int K = c->topk, G = c->num_q_heads / c->num_kv_heads;
  double err2 = 0, ref2 = 0, *ref_o = malloc(sizeof(double) * (size_t)G * (D + 1)),
         *ref_l = ref_o + G * D;
  for (int r = 0; r < B->num_reqs; r++)
    for (int64_t i = 0; i < B->n[r]; i++) {
      int64_t t = A->row_base + B->row0[r] + i, pos = bpos(B, r, i);
      for (int g = 0; g < c->num_kv_heads; g++) {
        int32_t ids[M3S_MAX_TOPK];
        int n = 0, empty = 1;
        if (pos >= 0) {
          int64_t nb = pos / BS + 1, kk = nb < K ? nb : K;
          for (int k = 0; k < kk; k++)
            ids[n++] = (int32_t)tgeti(A->tk, I4(t, g, k, 0));
        }
        if (A->cp) /* a context-parallel rank attends only the selected blocks it owns */
          for (int k = 0; k < n; k++)
            if (ids[k] >= 0 && !cp_owns(A->cp, ids[k]))
              ids[k] = -1;
        for (int k = 0; k < n; k++)
          empty &= ids[k] < 0;
        if (!empty && numeric) /* the KV head's query heads in one pass over the keys */
          ref_attend(A, r, pos, t, g * G, G, ids, n, ref_o, ref_l);
        for (int h = g * G; h < (g + 1) * G; h++) {
          if (empty) {
            for (int d = 0; d < D; d++)
              if (tgetf(out, I4(t, h, d, 0)) != 0)
                die("attention row %lld head %d has no visible key but out[%d] = %g", (long long)t,
                    h, d, tgetf(out, I4(t, h, d, 0)));
            if (lse && lse->p && !(tgetf(lse, I4(t, h, 0, 0)) == -INFINITY))
              die("attention row %lld head %d has no visible key but lse = %g", (long long)t, h,
                  tgetf(lse, I4(t, h, 0, 0)));
            continue;
          }
          if (!numeric)
            continue;
          const double *ro = ref_o + (h - g * G) * D;
          double rl = ref_l[h - g * G];
          S.ref_rows++;
          double re2 = 0, rr2 = 0, go[D];
          row_get(out, I4(t, h, 0, 0), D, go);
          for (int d = 0; d < D; d++) {
            double e = go[d] - ro[d];
            re2 += e * e;
            rr2 += ro[d] * ro[d];
          }
          err2 += re2;
          ref2 += rr2;
          if (!(re2 <= 2.5e-3 * rr2 + 1e-6 * D))
            die("attention row %lld (request %d, pos %lld) head %d: rel L2 error %.3g vs fp64 "
                "(abs %.3g)",
                (long long)t, r, (long long)pos, h, sqrt(re2 / (rr2 + 1e-300)), sqrt(re2));
          if (lse && lse->p) {
            double gl = tgetf(lse, I4(t, h, 0, 0));
            if (!(fabs(gl - rl) <= 1e-3 * (1 + fabs(rl))))
              die("attention row %lld (request %d, pos %lld) head %d: lse %.9g, fp64 reference "
                  "%.9g",
                  (long long)t, r, (long long)pos, h, gl, rl);
          }
        }
      }
    }
  if (!(err2 <= 1e-4 * ref2 + 1e-10))
    die("attention: global rel L2 error %.3g vs the fp64 reference (limit 1e-2)",
        sqrt(err2 / (ref2 + 1e-300)));
  free(ref_o);
  free(A->kvd);
  A->kvd = NULL;
}

/* Random valid top-k rows (distinct ids < nb and -1 holes among the first
 * min(K, nb) entries, in random order; junk after), plus mutations. */
void fill_topk_input(int hkv, int K, const bat *B, const targ *tk, int64_t row_base,
                            int *ex) {
  if (!tk->b || tk->broken)
    return;
  for (size_t i = 0; i + 4 <= tk->b->bytes; i += 4) {
    int32_t v = rndn(3) == 0 ? (int32_t)rnd() : rndn(40) - 2;
    memcpy(tk->b->data + i, &v, 4);
  }
  int holes = rchance(30);
  for (int r = 0; r < B->num_reqs; r++)
    for (int64_t i = 0; i < B->n[r]; i++) {
      int64_t pos = bpos(B, r, i), t = row_base + B->row0[r] + i;
      if (pos < 0)
        continue;
      int64_t nb = pos / BS + 1, kk = nb < K ? nb : K;
      for (int g = 0; g < hkv; g++) {
        int32_t pool[MAX_COLS];
        for (int b = 0; b < nb && b < MAX_COLS; b++)
          pool[b] = b;
        for (int64_t b = nb - 1; b > 0; b--) {
          int j = rndn((int)b + 1);
          int32_t x = pool[b];
          pool[b] = pool[j];
          pool[j] = x;
        }
        for (int k = 0; k < kk; k++)
          tseti(tk, I4(t, g, k, 0), holes && rndn(4) == 0 ? -1 : pool[k]);
      }
    }
  if (rchance(10)) { /* a value the API must reject, or chaos */
    int which = rpick(5);
    int r0 = -1;
    for (int r = 0; r < B->num_reqs; r++)
      if (bpos(B, r, 0) >= 0 && B->n[r] > 0 && (r0 < 0 || rchance(50)))
        r0 = r;
    if (which == 4) {
      *ex |= EX_ANY;
      for (int k = 0, n = 1 + rpick(6); k < n && tk->b->bytes >= 4; k++) {
        int32_t v = rchance(50) ? (int32_t)rnd() : rpick(40) - 3;
        size_t at = (size_t)rndn((int)(tk->b->bytes / 4)) * 4;
        memcpy(tk->b->data + at, &v, 4);
      }
    } else if (r0 >= 0) {
      int64_t i = rpick(B->n[r0]), t = row_base + B->row0[r0] + i, pos = bpos(B, r0, i);
      int64_t nb = pos / BS + 1, kk = nb < K ? nb : K;
      int g = rpick(hkv), k = rpick((int)kk);
      int32_t bad;
      if (which == 0)
        bad = (int32_t)nb + rpick(5);
      else if (which == 1)
        bad = -2 - rpick(5);
      else if (which == 2)
        bad = INT32_MIN + rpick(3);
      else {
        bad = -5;
        if (kk >= 2) { /* a duplicate */
          int k2 = (k + 1 + rpick((int)kk - 1)) % (int)kk;
          int32_t id = (int32_t)tgeti(tk, I4(t, g, k2, 0));
          if (id < 0) {
            id = (int32_t)rpick((int)nb);
            tseti(tk, I4(t, g, k2, 0), id);
          }
          bad = id;
        }
      }
      tseti(tk, I4(t, g, k, 0), bad);
      *ex |= EX_FAIL;
    }
  }
}

/* Caches: every element NaN, then nice (or raw) values at the positions < s
 * of every request; keys after a query's position stay finite but must be
 * masked; pages outside the tables stay NaN. */
void fill_kv(const bat *B, const targ *kv, int hkv, int nice, int poison) {
  if (!kv->b || kv->broken)
    return;
  if (!nice)
    return; /* raw random bytes from balloc */
  if (poison)
    fill_nan(kv);
  for (int r = 0; r < B->num_reqs; r++)
    for (int64_t p = 0; p < B->s[r]; p++) {
      int64_t page = B->bt[r][p / BS];
      for (int g = 0; g < hkv; g++)
        row_set_grid(kv, I4(page, g, p % BS, 0), 2 * D);
    }
}
void fill_ic(const bat *B, const targ *ic, int nice, int inject, int poison) {
  if (!ic->b || ic->broken || !nice)
    return;
  if (poison)
    fill_nan(ic);
  for (int r = 0; r < B->num_reqs; r++)
    for (int64_t p = 0; p < B->s[r]; p++) {
      int64_t page = B->ibt[r][p / BS];
      row_set_grid(ic, I4(page, p % BS, 0, 0), D);
    }
  for (int k = 0; inject && k < 1 + rndn(6); k++) { /* NaN / inf keys */
    int r = rndn(B->num_reqs > 0 ? B->num_reqs : 1);
    if (r >= B->num_reqs || B->s[r] <= 0)
      continue;
    int64_t p = rndn(B->s[r]), page = B->ibt[r][p / BS];
    double v = rndn(3) == 0 ? NAN : rndn(2) ? INFINITY : -INFINITY;
    if (ic->t.dtype == M3S_E4M3)
      v = NAN;
    if (rndn(3) == 0) /* the whole key */
      for (int d = 0; d < D; d++)
        tsetf(ic, I4(page, p % BS, d, 0), v);
    else
      tsetf(ic, I4(page, p % BS, rndn(D), 0), v);
  }
}
void fill_act(const targ *a, int nice, int inject) {
  if (!a->b || a->broken || !nice)
    return;
  fill_nice(a);
  size_t es = esz(a->t.dtype);
  for (int k = 0; inject && k < 1 + rndn(4) && a->b->bytes >= es; k++) {
    size_t at = (size_t)rndn((int)(a->b->bytes / es)) * es;
    double v = rndn(3) == 0 ? NAN : rndn(2) ? INFINITY : -INFINITY;
    enc(a->b->data + at, a->t.dtype, v);
  }
}

/* ======================================================================== */
