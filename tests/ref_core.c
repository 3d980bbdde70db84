/* The fp64 mathematics of SPEC sections 3-4 (see ref_core.h). */
#include "ref_core.h"

#include <math.h>
#include <stdlib.h>

#define BLK M3S_BLOCK_SIZE
#define DIM M3S_HEAD_DIM

int ref_ranks_before(double sa, int64_t a, double sb, int64_t b) {
  if (isnan(sa) != isnan(sb))
    return isnan(sb);
  if (!isnan(sa) && sa != sb)
    return sa > sb;
  return a < b;
}

int ref_forced(const m3s_layer_config *c, int64_t b, int64_t nb) {
  return b < c->init_blocks || b >= nb - c->local_blocks;
}

int ref_competes(const m3s_layer_config *c, int64_t b, int64_t nb) {
  return nb > c->topk && !ref_forced(c, b, nb);
}

int ref_block_keys(int64_t b, int64_t pos) {
  int64_t n = pos + 1 - b * BLK;
  return n <= 0 ? 0 : n >= BLK ? BLK : (int)n;
}

double ref_dot(const double *a, const double *b) {
  double s = 0;
  for (int d = 0; d < DIM; d++)
    s += a[d] * b[d];
  return s;
}

double ref_block_max(const double *q, const double *keys, int n) {
  double best = NAN;
  for (int j = 0; j < n; j++) {
    double s = ref_dot(q, keys + (int64_t)j * DIM);
    if (!isnan(s) && (isnan(best) || s > best))
      best = s;
  }
  return best;
}

/* The best-ranked competing block that ranks after block prev (prev < 0: the
 * best of all); ranks are a strict total order, so taking this from the
 * previous pick on enumerates the blocks in rank order without sorting. */
static int64_t next_in_rank(const m3s_layer_config *c, int64_t nb, const double *scores,
                            int64_t prev) {
  int64_t best = -1;
  for (int64_t b = 0; b < nb; b++) {
    if (!ref_competes(c, b, nb) ||
        (prev >= 0 && !ref_ranks_before(scores[prev], prev, scores[b], b)))
      continue;
    if (best < 0 || ref_ranks_before(scores[b], b, scores[best], best))
      best = b;
  }
  return best;
}

int ref_select_blocks(const m3s_layer_config *c, int64_t nb, const double *scores, int32_t *ids) {
  int n = 0;
  for (int64_t b = 0; b < nb; b++)
    if (nb <= c->topk || ref_forced(c, b, nb))
      ids[n++] = (int32_t)b;
  int64_t prev = -1;
  while (n < c->topk && n < nb) {
    prev = next_in_rank(c, nb, scores, prev);
    ids[n++] = (int32_t)prev;
  }
  for (int x = 1; x < n; x++)
    for (int y = x; y > 0 && ids[y] < ids[y - 1]; y--) {
      int32_t t = ids[y];
      ids[y] = ids[y - 1];
      ids[y - 1] = t;
    }
  for (int k = n; k < c->topk; k++)
    ids[k] = -1;
  return n;
}

/* The smallest listed block above prev (ids NULL: prev + 1), -1 when none:
 * the blocks ascending, each once. */
static int64_t next_block(const int32_t *ids, int n, int64_t prev) {
  if (!ids)
    return prev + 1;
  int64_t next = -1;
  for (int k = 0; k < n; k++)
    if (ids[k] > prev && (next < 0 || ids[k] < next))
      next = ids[k];
  return next;
}

/* The attended key after position j (j < 0: the first), -1 after the last:
 * the keys <= pos of the listed blocks in position order. */
static int64_t next_key(const int32_t *ids, int n, int64_t pos, int64_t j) {
  if (j >= 0 && (j + 1) % BLK != 0 && j < pos)
    return j + 1;
  int64_t b = next_block(ids, n, j < 0 ? -1 : j / BLK);
  return b >= 0 && b * BLK <= pos ? b * BLK : -1;
}

int64_t ref_attend_blocks(const double *q, int nq, double scale, int64_t pos, const int32_t *ids,
                          int n, ref_kv_row_fn row, void *user, double *out, double *lse) {
  int64_t nk = 0, x;
  for (int64_t j = next_key(ids, n, pos, -1); j >= 0; j = next_key(ids, n, pos, j))
    nk++;
  /* per query: its logits [nk], then the largest and the sum of exponentials */
  double *s = malloc(sizeof(double) * (size_t)(nq * (nk + 2))), *mx = s + nq * nk, *sum = mx + nq;
  double kv[DIM];
  for (int h = 0; h < nq; h++) {
    mx[h] = -INFINITY, sum[h] = 0, lse[h] = -INFINITY;
    for (int d = 0; d < DIM; d++)
      out[h * DIM + d] = 0;
  }
  x = 0;
  for (int64_t j = next_key(ids, n, pos, -1); j >= 0; j = next_key(ids, n, pos, j), x++) {
    row(user, j, 0, kv);
    for (int h = 0; h < nq; h++) {
      double l = ref_dot(q + h * DIM, kv) * scale;
      s[h * nk + x] = l;
      mx[h] = l > mx[h] ? l : mx[h];
    }
  }
  x = 0;
  for (int64_t j = next_key(ids, n, pos, -1); j >= 0; j = next_key(ids, n, pos, j), x++) {
    row(user, j, 1, kv);
    for (int h = 0; h < nq; h++) {
      if (mx[h] == -INFINITY)
        continue;
      double p = exp(s[h * nk + x] - mx[h]);
      sum[h] += p;
      for (int d = 0; d < DIM; d++)
        out[h * DIM + d] += p * kv[d];
    }
  }
  for (int h = 0; h < nq; h++) {
    if (mx[h] == -INFINITY)
      continue;
    for (int d = 0; d < DIM; d++)
      out[h * DIM + d] /= sum[h];
    lse[h] = mx[h] + log(sum[h]);
  }
  free(s);
  return nk;
}
