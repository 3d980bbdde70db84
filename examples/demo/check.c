/* m3s-demo: the checks of a step: top-k rows, padded rows, needle statistics,
 * and the selection and attention of some rows against the fp64 reference the
 * tests use (tests/ref.c: ref_select, ref_attention; see main.c). */
#include "demo.h"
#include "ref.h"      /* the fp64 reference of the tests (m3s_ref) */
#include "ref_core.h" /* its SPEC 3 rules: ref_forced */

static void fail(demo *dm, stats *st, const char *fmt, ...) {
  st->failures++;
  if (dm->fail_msgs++ >= 10)
    return;
  va_list ap;
  va_start(ap, fmt);
  printf("    FAIL: ");
  vprintf(fmt, ap);
  printf("\n");
  va_end(ap);
}

/* ------------------------------------------------------------------------
 * Checks
 * ---------------------------------------------------------------------- */
static const int32_t *topk_row(const demo *dm, int row, int g) {
  return (const int32_t *)dm->topk_b.h + ((size_t)row * dm->hkv + g) * dm->topk;
}

/* Top-k row layout: min(K, nb) ascending ids in [0, nb), forced blocks in, -1 after. */
static void check_topk_row(demo *dm, stats *st, int step_no, int row, int g) {
  const int32_t *ids = topk_row(dm, row, g);
  int pos = dm->row_pos[row], nb = pos / M3S_BLOCK_SIZE + 1, kk = nb < dm->topk ? nb : dm->topk;
  const char *bad = NULL;
  for (int a = 0; a < dm->topk && !bad; a++) {
    if (a >= kk)
      bad = ids[a] != -1 ? "entries after min(K, nb) must be -1" : NULL;
    else if (ids[a] < 0 || ids[a] >= nb)
      bad = "a selected block is outside [0, nb)";
    else if (a > 0 && ids[a] <= ids[a - 1])
      bad = "block ids are not strictly ascending";
  }
  int forced = 0, found = 0;
  for (int b = 0; b < nb && !bad; b++)
    if (ref_forced(&dm->cfg, b, nb)) {
      forced++;
      for (int a = 0; a < kk; a++)
        found += ids[a] == b;
    }
  if (!bad && found != forced)
    bad = "a forced (local) block is missing";
  if (bad) {
    char txt[160];
    size_t len = 0;
    for (int a = 0; a < dm->topk && len < sizeof txt - 12; a++)
      len += (size_t)snprintf(txt + len, sizeof txt - len, "%s%d", a ? " " : "", ids[a]);
    fail(dm, st, "step %d row %d (r%d pos %d, nb %d) KV head %d: %s: [%s]", step_no, row,
         dm->row_req[row], pos, nb, g, bad, txt);
  }
}

static void check_padded_row(demo *dm, stats *st, int step_no, int row) {
  for (int g = 0; g < dm->hkv; g++)
    for (int a = 0; a < dm->topk; a++)
      if (topk_row(dm, row, g)[a] != -1) {
        fail(dm, st, "step %d padded row %d: top-k entry %d of KV head %d is %d, not -1", step_no,
             row, a, g, topk_row(dm, row, g)[a]);
        return;
      }
  const uint16_t *o = (const uint16_t *)dm->out.h + (size_t)row * dm->hq * M3S_HEAD_DIM;
  const float *l = (const float *)dm->lse.h + (size_t)row * dm->hq;
  for (int h = 0; h < dm->hq; h++) {
    if (!(isinf(l[h]) && l[h] < 0)) {
      fail(dm, st, "step %d padded row %d: lse of head %d is %g, not -inf", step_no, row, h,
           (double)l[h]);
      return;
    }
    for (int d = 0; d < M3S_HEAD_DIM; d++)
      if (o[h * M3S_HEAD_DIM + d] != 0) {
        fail(dm, st, "step %d padded row %d: output of head %d is not 0", step_no, row, h);
        return;
      }
  }
}

static double cosine(const uint16_t *o, const float *v) {
  double dot = 0, a = 0, b = 0;
  for (int d = 0; d < M3S_HEAD_DIM; d++) {
    double x = bf(o[d]);
    dot += x * v[d];
    a += x * x;
    b += (double)v[d] * v[d];
  }
  return a > 0 && b > 0 ? dot / sqrt(a * b) : 0.0;
}

/* Keys attended / keys visible, needle recall and cosines, for one real row. */
static void row_statistics(demo *dm, stats *st, int row) {
  int r = dm->row_req[row], pos = dm->row_pos[row], nb = pos / M3S_BLOCK_SIZE + 1;
  int kk = nb < dm->topk ? nb : dm->topk, ask = dm->row_ask[row];
  const request *rq = &dm->req[r];
  for (int g = 0; g < dm->hkv; g++) {
    const int32_t *ids = topk_row(dm, row, g);
    long attended = 0;
    int hit = 0;
    for (int a = 0; a < kk; a++) {
      int id = ids[a];
      if (id < 0 || id >= nb)
        continue;
      attended += pos - id * M3S_BLOCK_SIZE + 1 < M3S_BLOCK_SIZE ? pos - id * M3S_BLOCK_SIZE + 1
                                                                 : M3S_BLOCK_SIZE;
      hit |= ask != NO_ASK && id == rq->nd[ask].block;
    }
    double frac = (double)attended / (pos + 1);
    if (dm->row_dec[row]) {
      st->att_dec += frac;
      st->n_att_dec++;
    } else {
      st->att_pf += frac;
      st->n_att_pf++;
    }
    if (ask != NO_ASK) {
      st->ask_pairs++;
      st->ask_hits += hit;
      if (nb > dm->topk) {
        st->ask_pairs_sparse++;
        st->ask_hits_sparse += hit;
      }
    }
    /* Cosine of each head's output with the needle's values: the asked one, or
     * for a token that does not ask, the needle it would ask by its position. */
    int which = ask != NO_ASK ? ask : rq->nneedles ? pos % rq->nneedles : -1;
    if (which < 0 || pos < (rq->nd[which].block + 2) * M3S_BLOCK_SIZE)
      continue;
    for (int h = g * dm->grp; h < (g + 1) * dm->grp; h++) {
      double c = cosine((const uint16_t *)dm->out.h + ((size_t)row * dm->hq + h) * M3S_HEAD_DIM,
                        rq->nd[which].val + g * M3S_HEAD_DIM);
      if (ask != NO_ASK) {
        st->cos_ask += c;
        st->n_cos_ask++;
      } else {
        st->cos_bg += c;
        st->n_cos_bg++;
      }
    }
  }
}

/* Row `row` of the step as a one-request fixture of the shared fp64
 * reference (tests/ref.c, as the tests use it): one query token at the row's
 * position, the request's block tables, the demo's host caches and the row's
 * activations. qsl, qlen and seqlen are the fixture's host arrays. */
static fixture row_fixture(const demo *dm, int row, int32_t *qsl, int32_t *qlen,
                           int32_t *seqlen) {
  const request *rq = &dm->req[dm->row_req[row]];
  fixture f;
  memset(&f, 0, sizeof f);
  f.sp.num_reqs = 1;
  f.sp.act_dtype = f.sp.kv_dtype = f.sp.idx_dtype = M3S_BF16;
  f.cfg = dm->cfg;
  f.T = 1;
  f.num_pages = dm->num_pages;
  qsl[0] = 0, qsl[1] = 1, *qlen = 1, *seqlen = dm->row_pos[row] + 1;
  f.qsl = qsl, f.qlens = qlen, f.seqlens = seqlen;
  f.bt = rq->pages, f.ibt = rq->ipages; /* one request: row strides unused */
  for (int d = 0; d < 3; d++)
    f.kv.stride[d] = dm->kv_stride[d];
  f.kv_mem = dm->kv.h, f.ic_mem = dm->ic.h;
  f.q_mem = (uint16_t *)dm->q.h + (size_t)row * dm->hq * M3S_HEAD_DIM;
  f.iq_mem = (uint16_t *)dm->iq.h + (size_t)row * dm->hkv * M3S_HEAD_DIM;
  return f;
}

/* The library's top-k of (row, KV head g) against the reference block scores:
 * no unselected (unforced) block may score more than SEL_TOL above a selected
 * one (fp32 scores may order near-ties differently from fp64). */
static void check_selection(demo *dm, stats *st, int step_no, const fixture *f, int row, int g) {
  int pos = dm->row_pos[row], nb = pos / M3S_BLOCK_SIZE + 1;
  if (nb <= dm->topk)
    return; /* everything is selected; check_topk_row covered it */
  int32_t want[M3S_MAX_TOPK];
  ref_select(f, 0, g, want, dm->ref_s);
  const int32_t *ids = topk_row(dm, row, g);
  double worst_in = INFINITY, best_out = -INFINITY;
  int worst_id = -1, best_id = -1;
  for (int b = 0; b < nb; b++) {
    int in = 0;
    for (int a = 0; a < dm->topk; a++)
      in |= ids[a] == b;
    if (ref_forced(&dm->cfg, b, nb))
      continue;
    if (in && dm->ref_s[b] < worst_in)
      worst_in = dm->ref_s[b], worst_id = b;
    if (!in && dm->ref_s[b] > best_out)
      best_out = dm->ref_s[b], best_id = b;
  }
  if (worst_id >= 0 && best_id >= 0 && worst_in < best_out - SEL_TOL)
    fail(dm, st,
         "step %d row %d KV head %d: not the top-%d: block %d (score %.4f) selected but "
         "block %d (score %.4f) not",
         step_no, row, g, dm->topk, worst_id, worst_in, best_id, best_out);
}

/* Every head of the row against the reference's causal attention over the
 * keys of the blocks the library selected; returns the relative L2 error. */
static double check_attention(demo *dm, stats *st, int step_no, int row) {
  int pos = dm->row_pos[row], nb = pos / M3S_BLOCK_SIZE + 1, kk = nb < dm->topk ? nb : dm->topk;
  int32_t qsl[2], qlen, seqlen;
  fixture f = row_fixture(dm, row, qsl, &qlen, &seqlen);
  const float *lse = (const float *)dm->lse.h + (size_t)row * dm->hq;
  double num = 0, den = 0;
  for (int g = 0; g < dm->hkv; g++) {
    const int32_t *ids = topk_row(dm, row, g);
    for (int h = g * dm->grp; h < (g + 1) * dm->grp; h++) {
      const uint16_t *o = (const uint16_t *)dm->out.h + ((size_t)row * dm->hq + h) * M3S_HEAD_DIM;
      double ref[M3S_HEAD_DIM], lse_ref;
      ref_attention(&f, 0, h, ids, kk, 1, ref, &lse_ref);
      for (int d = 0; d < M3S_HEAD_DIM; d++) {
        double diff = bf(o[d]) - ref[d];
        num += diff * diff;
        den += ref[d] * ref[d];
      }
      double lerr = fabs((double)lse[h] - lse_ref);
      if (!(lerr <= LSE_TOL))
        fail(dm, st, "step %d row %d head %d: lse %.6f, reference %.6f", step_no, row, h,
             (double)lse[h], lse_ref);
      if (!(lerr <= st->max_lse_err))
        st->max_lse_err = lerr;
    }
    check_selection(dm, st, step_no, &f, row, g);
  }
  double err = den > 0 ? sqrt(num / den) : (num > 0 ? INFINITY : 0.0);
  if (!(err < REF_TOL))
    fail(dm, st, "step %d row %d (r%d pos %d): relative L2 error %.3e >= %.0e", step_no, row,
         dm->row_req[row], pos, err, REF_TOL);
  return err;
}

/* The rows of a step checked against the reference: the first and the last
 * real row, an asking row if there is one, the rest at random. */
static int pick_rows(demo *dm, const sched_step *s, int *rows, int want) {
  int n = 0, first = -1, last = -1, nask = 0, nreal = 0;
  for (int t = 0; t < s->rows; t++)
    if (dm->row_req[t] >= 0) {
      first = first < 0 ? t : first;
      last = t;
      nreal++;
      nask += dm->row_ask[t] != NO_ASK;
    }
  if (nreal == 0 || want == 0)
    return 0;
  want = want < nreal ? want : nreal;
  int cand[3] = {first, last, -1};
  if (nask) {
    int pick = rng_int(&dm->samp, nask);
    for (int t = 0; t < s->rows; t++)
      if (dm->row_req[t] >= 0 && dm->row_ask[t] != NO_ASK && pick-- == 0)
        cand[2] = t;
  }
  for (int tries = 0; n < want && tries < 64 * want + 3; tries++) {
    int t = tries < 3 ? cand[tries] : rng_int(&dm->samp, s->rows);
    if (t < 0 || dm->row_req[t] < 0)
      continue;
    int dup = 0;
    for (int i = 0; i < n; i++)
      dup |= rows[i] == t;
    if (!dup)
      rows[n++] = t;
  }
  return n;
}

void check_step(demo *dm, const sched_step *s, int step_no, stats *st) {
  for (int t = 0; t < s->rows; t++) {
    if (dm->row_req[t] < 0) {
      st->pad_rows++;
      check_padded_row(dm, st, step_no, t);
      continue;
    }
    for (int g = 0; g < dm->hkv; g++)
      check_topk_row(dm, st, step_no, t, g);
    row_statistics(dm, st, t);
  }
  int rows[64], want = dm->opt.check_rows < 64 ? dm->opt.check_rows : 64;
  int n = pick_rows(dm, s, rows, want);
  for (int i = 0; i < n; i++) {
    double err = check_attention(dm, st, step_no, rows[i]);
    st->ref_rows++;
    if (!(err <= st->max_err))
      st->max_err = err;
  }
}
