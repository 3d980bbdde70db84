/* ops_cp.c -- operations of context parallel (SPEC section 10): the column
 * helper m3s_cp_local_block, one rank's m3s_index_topk_candidates, the
 * selection from every rank's candidates (m3s_merge_topk_candidates, against
 * m3s_index_topk on the whole cache) and the N-way merge of partial results
 * m3s_merge_attn_states_n. batch.cp on the other batch operations is made by
 * mk_batch (gen.c). */
#include "fuzz.h"

#include "ref_core.h"

/* Entry [i] of dimension 0 of t, as a view with one dimension less. */
m3s_tensor tslice(const m3s_tensor *t, int64_t i) {
  m3s_tensor s;
  memset(&s, 0, sizeof s);
  s.data = (unsigned char *)t->data + i * t->stride[0] * (int64_t)esz(t->dtype);
  s.dtype = t->dtype;
  s.ndim = t->ndim - 1;
  s.device = t->device;
  for (int d = 1; d < t->ndim; d++) {
    s.shape[d - 1] = t->shape[d];
    s.stride[d - 1] = t->stride[d];
  }
  return s;
}

/* The same slice as a harness argument (same buffer, honest). */
static void targ_slice(targ *dst, const targ *a, int64_t i, const char *name) {
  memset(dst, 0, sizeof *dst);
  dst->t = tslice(&a->t, i);
  dst->p = &dst->t;
  dst->b = a->b;
  dst->ndim = a->ndim - 1;
  for (int d = 1; d < a->ndim; d++)
    dst->shape[d - 1] = a->shape[d];
  dst->name = name;
}

static uint32_t fbits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}
/* The bits every backend writes for a candidate score: NaN as 0x7fc00000,
 * -0 as +0. */
static uint32_t canon_bits(float f) {
  if (isnan(f))
    return 0x7fc00000u;
  return fbits(f + 0.0f);
}
static float tgetf32(const targ *a, const int64_t *idx) {
  float f = NAN;
  void *p = tptr(a, idx);
  if (p)
    memcpy(&f, p, 4);
  return f;
}

/* ------------------------------------------------------ m3s_cp_local_block */
void op_cp_local(void) {
  int ex = 0;
  m3s_cp c;
  int valid = gen_cp(&c, 85);
  int64_t block = rchance(25) ? pick_i64() : rpick(200);
  buf_t *cb = balloc("cp", sizeof c), *ob = balloc("out_column", sizeof(int64_t));
  if (g_skip)
    return;
  memcpy(cb->data, &c, sizeof c);
  const m3s_cp *cpp = (const m3s_cp *)cb->data;
  int64_t *op = (int64_t *)ob->data;
  if (rchance(4))
    cpp = NULL;
  if (rchance(4))
    op = NULL;
  m3s_status want = !cpp || !op ? M3S_ERR_NULL : !valid || block < 0 ? M3S_ERR_INVALID : M3S_OK;
  ex = want ? EX_FAIL : 0;
  for (int i = 0; i < g_nb; i++)
    g_b[i].out = &g_b[i] == ob;
  m3s_status st = CALL("m3s_cp_local_block", ex, m3s_cp_local_block(cpp, block, op));
  if (st != want)
    die("m3s_cp_local_block(cp %s{%d, %d, %d}, block %lld, out %s): status %d, want %d",
        cpp ? "" : "NULL ", c.cp_size, c.cp_rank, c.blocks_per_interleave, (long long)block,
        op ? "set" : "NULL", (int)st, (int)want);
  if (st)
    return;
  memset(ob->allow = (unsigned char *)calloc(ob->bytes, 1), 1, ob->bytes);
  check_allowed();
  /* the header's formulas, and for small blocks the column counted */
  int64_t col = -1;
  if (cp_owns(&c, block)) {
    if (c.cp_size <= 1) {
      col = block;
    } else {
      int64_t il = c.blocks_per_interleave, span = il * c.cp_size;
      col = block / span * il + block % il;
    }
    if (block < 4096 && col != cp_owned_count(&c, block))
      die("harness: column formula %lld vs %lld owned blocks before block %lld", (long long)col,
          (long long)cp_owned_count(&c, block), (long long)block);
  }
  if (*op != col)
    die("m3s_cp_local_block({%d, %d, %d}, block %lld) = %lld, want %lld", c.cp_size, c.cp_rank,
        c.blocks_per_interleave, (long long)block, (long long)*op, (long long)col);
}

/* -------------------------------------------------------------- candidates */

/* Checks one rank's candidate rows (rows row_base + ... of ids / scores, the
 * rank being cp->cp_rank) against the header: (1) the owned blocks selected
 * whatever the scores, ascending, +inf; (2) when nb > K, the best `want`
 * owned non-forced blocks in rank order -- exactly the fp64 reference's ids
 * and scores when exact, else owned, distinct, non-forced, ordered by the
 * scores written, as many as the rank owns up to `want`; (3) -1 / -inf.
 * Padded rows all -1 / -inf. NaN scores 0x7fc00000, no -0. */
static void check_cand_rows(const m3s_layer_config *c, const bat *B, const m3s_cp *cp,
                            const targ *iq, const double *icd, const targ *ids,
                            const targ *sc, int exact) {
  int K = c->topk;
  for (int r = 0; r < B->num_reqs; r++)
    for (int64_t i = 0; i < B->n[r]; i++) {
      int64_t t = B->row0[r] + i, pos = bpos(B, r, i);
      for (int g = 0; g < c->num_kv_heads; g++) {
        int32_t id[M3S_MAX_TOPK];
        float s[M3S_MAX_TOPK];
        for (int k = 0; k < K; k++) {
          id[k] = (int32_t)tgeti(ids, I4(t, g, k, 0));
          s[k] = tgetf32(sc, I4(t, g, k, 0));
          if (isnan(s[k]) && fbits(s[k]) != 0x7fc00000u)
            die("candidates row %lld head %d entry %d: NaN score with bits 0x%08x, want "
                "0x7fc00000",
                (long long)t, g, k, fbits(s[k]));
          if (fbits(s[k]) == 0x80000000u)
            die("candidates row %lld head %d entry %d: score -0, want +0", (long long)t, g, k);
        }
        int k = 0;
        if (pos >= 0) {
          int64_t nb = pos / BS + 1, forced = 0;
          for (int64_t b = 0; b < nb; b++)
            forced += ref_forced(c, b, nb);
          int64_t want = nb <= K ? 0 : K - forced;
          for (int64_t b = 0; b < nb; b++)
            if ((nb <= K || ref_forced(c, b, nb)) && cp_owns(cp, b)) {
              if (k >= K || id[k] != b || !(s[k] == INFINITY))
                die("candidates row %lld (pos %lld, nb %lld) head %d entry %d: id %d score %g, "
                    "want owned selected block %lld with +inf (rank %d of %d, interleave %d)",
                    (long long)t, (long long)pos, (long long)nb, g, k, k < K ? id[k] : -9,
                    k < K ? (double)s[k] : 0.0, (long long)b, cp->cp_rank, cp->cp_size,
                    cp->blocks_per_interleave);
              k++;
            }
          if (want > 0) {
            int64_t nfree = 0;
            int32_t fr[MAX_COLS];
            double fs[MAX_COLS];
            double q[D];
            if (exact)
              row_get(iq, I4(t, g, 0, 0), D, q);
            for (int64_t b = 0; b < nb; b++)
              if (!ref_forced(c, b, nb) && cp_owns(cp, b)) {
                fr[nfree] = (int32_t)b;
                fs[nfree++] = exact ? ref_block_max(q, icd + (int64_t)B->ibt[r][b] * BS * D,
                                                    ref_block_keys(b, pos))
                                    : 0;
              }
            int64_t n2 = nfree < want ? nfree : want;
            if (exact) { /* selection sort of the owned free blocks in rank order */
              for (int64_t a = 0; a < n2; a++) {
                int64_t best = a;
                for (int64_t x = a + 1; x < nfree; x++)
                  if (ref_ranks_before(fs[x], fr[x], fs[best], fr[best]))
                    best = x;
                int32_t ti = fr[a];
                double ts = fs[a];
                fr[a] = fr[best], fs[a] = fs[best];
                fr[best] = ti, fs[best] = ts;
                S.ref_rows++;
                if (id[k + a] != fr[a] || fbits(s[k + a]) != canon_bits((float)fs[a]))
                  die("candidates row %lld (pos %lld) head %d entry %lld: id %d score %.9g, fp64 "
                      "reference id %d score %.9g (rank %d of %d, interleave %d)",
                      (long long)t, (long long)pos, g, (long long)(k + a), id[k + a],
                      (double)s[k + a], fr[a], fs[a], cp->cp_rank, cp->cp_size,
                      cp->blocks_per_interleave);
              }
            } else {
              for (int64_t a = 0; a < n2; a++) {
                int32_t x = id[k + a];
                if (x < 0 || x >= nb || ref_forced(c, x, nb) || !cp_owns(cp, x))
                  die("candidates row %lld (nb %lld) head %d entry %lld: id %d is not an owned "
                      "non-forced visible block",
                      (long long)t, (long long)nb, g, (long long)(k + a), x);
                if (a > 0 && !ref_ranks_before(s[k + a - 1], id[k + a - 1], s[k + a], x))
                  die("candidates row %lld head %d entries %lld, %lld: (%d, %g) before (%d, %g) "
                      "breaks the rank order",
                      (long long)t, g, (long long)(k + a - 1), (long long)(k + a), id[k + a - 1],
                      (double)s[k + a - 1], x, (double)s[k + a]);
              }
            }
            k += (int)n2;
          }
        }
        for (; k < K; k++)
          if (id[k] != -1 || !(s[k] == -INFINITY))
            die("candidates row %lld (pos %lld) head %d entry %d: id %d score %g, want -1 / -inf",
                (long long)t, (long long)pos, g, k, id[k], (double)s[k]);
      }
    }
}

/* The iq / index-cache / top-k-shaped operands of a candidates call. */
static void mk_cand_outs(targ *ci, targ *cs, int64_t T, int hkv, int K, int mut, int *ex) {
  if (rchance(20)) { /* ids and scores as views of one [T, Hkv, 2, K] buffer */
    targ w;
    mk_out(&w, "candidates(packed)", M3S_I32, 3, T, hkv, 2 * K, 0);
    *ci = w;
    ci->t.shape[2] = ci->shape[2] = K;
    ci->name = "cand_ids";
    *cs = *ci;
    cs->t.dtype = M3S_F32;
    cs->t.data = (int32_t *)w.t.data + K;
    cs->name = "cand_scores";
    cs->p = &cs->t;
    ci->p = &ci->t;
    return;
  }
  tspec si = {"cand_ids", M3S_I32, MASK(M3S_I32), 3, {T, hkv, K}, 1, 0, 0, 1, mut, PERM_HM, 0};
  tspec ss = {"cand_scores", M3S_F32, MASK(M3S_F32), 3, {T, hkv, K}, 1, 0, 0, 1, mut, PERM_HM, 0};
  mk(ci, &si, ex);
  mk(cs, &ss, ex);
}

void op_candidates(void) {
  int ex = 0, hq, hkv, K;
  cfg_t C;
  gen_cfg(&C, &ex);
  safe_dims(&C.c, &hq, &hkv, &K);
  bat B;
  gen_batch_desc(&B, 0, hq, hkv, K);
  bat *L[1] = {&B};
  assign_pages(L, 1);
  int nice = !rchance(20), inject = nice && rchance(25);
  m3s_dtype adt = rchance(30) ? M3S_F16 : M3S_BF16, idt = rchance(30) ? M3S_E4M3 : M3S_BF16;
  B.cp_pol = CP_RANK;
  B.cp_pct = 70;
  mk_batch(&B, 0, 1, 1, &ex);
  tspec siq = {"iq", adt, ACT, 3, {B.T, hkv, D}, 0, 0, 0, 1, 8, NULL, 0};
  tspec sic = {"index_cache", idt, IDX_MASK, 3, {B.Pi, BS, D}, 0, 1, 1u, 1, 8, NULL, 0};
  targ iq, ic, ci, cs;
  mk(&iq, &siq, &ex);
  mk(&ic, &sic, &ex);
  mk_cand_outs(&ci, &cs, B.T, hkv, K, 8, &ex);
  fill_act(&iq, nice, inject);
  fill_ic(&B, &ic, nice, inject, 1);
  if (nice)
    poison_unowned(&B, &ic, hkv, 1);
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip)
    return;
  OUTPUTS(&ci, &cs);
  m3s_status st = CALL("m3s_index_topk_candidates", ex | cp_ex(&B),
                       m3s_index_topk_candidates(ctx, C.p, B.p, iq.p, ic.p, ci.p, cs.p, e));
  cp_check(&B, ex, st);
  if (st)
    return;
  allow_view(&ci);
  allow_view(&cs);
  check_allowed();
  if (ex)
    return;
  int exact = nice && !g_alias_in;
  double *icd = exact ? decode_ic(&ic, B.Pi) : NULL;
  check_cand_rows(&C.c, &B, &B.b.cp, &iq, icd, &ci, &cs, exact);
  free(icd);
}

/* ------------------------------------------------------------ candidates merge */

/* The merge of SPEC 10 step 3 over the harness's values: rows as
 * m3s_index_topk writes them, the non-forced part chosen among the
 * candidates (any order, -1 holes) by the SPEC 3 rank order. */
static void ref_merge_row(const m3s_layer_config *c, int64_t nb, int nrk, const targ *ci,
                          const targ *cs, int64_t t, int g, int32_t *out) {
  int K = c->topk, n = 0;
  for (int k = 0; k < K; k++)
    out[k] = -1;
  if (nb <= K) {
    for (int64_t b = 0; b < nb; b++)
      out[n++] = (int32_t)b;
    return;
  }
  int32_t sel[M3S_MAX_TOPK];
  int nf = 0;
  for (int64_t b = 0; b < nb; b++)
    if (ref_forced(c, b, nb))
      sel[nf++] = (int32_t)b;
  int want = K - nf, ncand = 0;
  int32_t *cid = malloc(sizeof(int32_t) * (size_t)(nrk * K + 1));
  double *csc = malloc(sizeof(double) * (size_t)(nrk * K + 1));
  for (int rk = 0; rk < nrk; rk++)
    for (int k = 0; k < K; k++) {
      int32_t id = (int32_t)tgeti(ci, I4(rk, t, g, k));
      if (id < 0 || ref_forced(c, id, nb))
        continue;
      cid[ncand] = id;
      csc[ncand++] = tgetf32(cs, I4(rk, t, g, k));
    }
  for (int a = 0; a < want && a < ncand; a++) {
    int best = a;
    for (int x = a + 1; x < ncand; x++)
      if (ref_ranks_before(csc[x], cid[x], csc[best], cid[best]))
        best = x;
    int32_t ti = cid[a];
    double ts = csc[a];
    cid[a] = cid[best], csc[a] = csc[best];
    cid[best] = ti, csc[best] = ts;
    sel[nf++] = cid[a];
  }
  free(cid);
  free(csc);
  for (int a = 1; a < nf; a++) /* ascending */
    for (int x = a; x > 0 && sel[x - 1] > sel[x]; x--) {
      int32_t tmp = sel[x];
      sel[x] = sel[x - 1];
      sel[x - 1] = tmp;
    }
  for (int a = 0; a < nf; a++)
    out[a] = sel[a];
}

/* A row of the batch whose candidates the merge reads (nb > K): request,
 * index; -1 when none. */
static int pick_scored_row(const bat *B, int K, int64_t *t_out, int64_t *nb_out) {
  int64_t cand[MAX_T], nbs[MAX_T];
  int n = 0;
  for (int r = 0; r < B->num_reqs; r++)
    for (int64_t i = 0; i < B->n[r]; i++) {
      int64_t pos = bpos(B, r, i);
      if (pos >= 0 && pos / BS + 1 > K && n < MAX_T) {
        cand[n] = B->row0[r] + i;
        nbs[n++] = pos / BS + 1;
      }
    }
  if (n == 0)
    return -1;
  int x = rpick(n);
  *t_out = cand[x];
  *nb_out = nbs[x];
  return 0;
}

/* m3s_index_topk_candidates for every rank of a simulated cp group (each with
 * its rank-local index table cut from the fuzz batch's), the all-gather as
 * views, then m3s_merge_topk_candidates (with mutations of its arguments and
 * of the gathered values), checked against the harness's merge of the values
 * it got and, when they are the ranks' own, bit for bit against
 * m3s_index_topk on the whole cache (and the fp64 selection on nice data). */
void op_merge_candidates(void) {
  int ex = 0, e0 = 0, hq, hkv, K;
  cfg_t C;
  gen_cfg(&C, &ex);
  int cfg_bad = ex != 0;
  safe_dims(&C.c, &hq, &hkv, &K);
  bat B;
  g_budget = WORK_BUDGET / 2;
  gen_batch_desc(&B, 0, hq, hkv, K);
  g_budget = WORK_BUDGET;
  bat *L[1] = {&B};
  assign_pages(L, 1);
  /* the group */
  m3s_cp cp;
  memset(&cp, 0, sizeof cp);
  if (rchance(25)) {
    cp.cp_size = rpick(2); /* one rank, spelled 0 or 1 */
    cp.blocks_per_interleave = cp.cp_size + rpick(3);
  } else {
    cp.cp_size = rchance(10) ? 5 + rpick(4) : 2 + rpick(3);
    cp.blocks_per_interleave = rchance(10) ? INT_MAX - rpick(2) : 1 + rpick(3);
  }
  int nrk = cp.cp_size > 1 ? cp.cp_size : 1;
  int nice = !rchance(20), inject = nice && rchance(20);
  m3s_dtype adt = rchance(30) ? M3S_F16 : M3S_BF16, idt = rchance(30) ? M3S_E4M3 : M3S_BF16;
  bat Bm = B; /* the merge call's batch: same requests, its own tensors and mutations */
  /* the ranks' side: nominal batch tensors, iq and index cache without mutations */
  size_t save = g_in_n;
  g_in_n = g_in_i;
  mk_batch(&B, 0, 1, 0, &e0);
  g_in_n = save;
  tspec siq = {"iq", adt, ACT, 3, {B.T, hkv, D}, 0, 0, 0, 1, 0, NULL, 0};
  tspec sic = {"index_cache", idt, IDX_MASK, 3, {B.Pi, BS, D}, 0, 1, 1u, 1, 0, NULL, 0};
  targ iq, ic;
  mk(&iq, &siq, &e0);
  g_in_n = g_in_i; /* the index cache must be contiguous: no padded layout */
  mk(&ic, &sic, &e0);
  g_in_n = save;
  fill_act(&iq, nice, inject);
  fill_ic(&B, &ic, nice, inject, 1);
  /* the all-gathered candidates, [N, T, Hkv, K] each (packed: one buffer) */
  targ gi, gs;
  int packed = rchance(30);
  if (packed) {
    targ w;
    mk_out(&w, "gathered(packed)", M3S_I32, 4, nrk, B.T, hkv, 2 * K);
    gi = w;
    gi.t.shape[3] = gi.shape[3] = K;
    gi.name = "gathered cand_ids";
    gs = gi;
    gs.t.dtype = M3S_F32;
    gs.t.data = (int32_t *)w.t.data + K;
    gs.name = "gathered cand_scores";
  } else {
    mk_out(&gi, "gathered cand_ids", M3S_I32, 4, nrk, B.T, hkv, K);
    mk_out(&gs, "gathered cand_scores", M3S_F32, 4, nrk, B.T, hkv, K);
  }
  gi.p = &gi.t;
  gs.p = &gs.t;
  if (g_skip || e0)
    return;
  double *icd = nice && !cfg_bad ? decode_ic(&ic, B.Pi) : NULL;
  for (int rk = 0; rk < nrk && !cfg_bad; rk++) {
    bat R = B; /* the rank's view of the batch: its own index table */
    R.cp = cp;
    R.cp.cp_rank = rk;
    int64_t mp = 0;
    for (int r = 0; r < B.num_reqs; r++) {
      int64_t n = 0;
      for (int64_t b = 0; b < need_pages(B.s[r]); b++)
        if (cp_owns(&R.cp, b))
          R.libt[r][n++] = B.ibt[r][b];
      for (int64_t c = n; c < MAX_COLS; c++)
        R.libt[r][c] = -7;
      mp = n > mp ? n : mp;
    }
    targ lt, si, ss;
    mk_out(&lt, "rank index_block_table", M3S_I32, 2, B.num_reqs, mp, 0, 0);
    for (int r = 0; r < B.num_reqs; r++)
      for (int64_t c = 0; c < mp; c++)
        tseti(&lt, I4(r, c, 0, 0), R.libt[r][c]);
    if (g_skip)
      break;
    m3s_batch rb = B.b;
    rb.cp = R.cp;
    rb.block_table = rb.index_block_table = lt.t;
    targ_slice(&si, &gi, rk, "gathered cand_ids[rank]");
    targ_slice(&ss, &gs, rk, "gathered cand_scores[rank]");
    OUTPUTS(&gi, &gs);
    CALL("m3s_index_topk_candidates(rank)", 0,
         m3s_index_topk_candidates(g_ctx, &C.c, &rb, &iq.t, &ic.t, &si.t, &ss.t, NULL));
    allow_view(&si);
    allow_view(&ss);
    check_allowed();
    S.cp_active_ok += R.cp.cp_size > 1;
    check_cand_rows(&C.c, &B, &R.cp, &iq, icd, &si, &ss, icd && !g_alias_in);
  }
  free(icd);
  if (g_skip)
    return;
  /* the merge's arguments */
  Bm.cp_pol = CP_NONE;
  mk_batch(&Bm, 0, 0, 1, &ex);
  Bm.b.cp = cp;
  Bm.b.cp.cp_rank = nrk > 1 ? rpick(nrk) : 0; /* any rank's batch */
  if (rchance(6)) { /* a cp the header rules out */
    if (gen_cp(&Bm.b.cp, 100)) /* (a valid draw: make it invalid) */
      Bm.b.cp.cp_size = M3S_MAX_CP_SIZE + 1;
    ex |= EX_FAIL;
  } else if (rchance(5) && cp.cp_size > 1) { /* the gather of another group size */
    Bm.b.cp.cp_size = cp.cp_size + (rchance(50) || cp.cp_size == 2 ? 1 : -1);
    Bm.b.cp.cp_rank = 0;
    ex |= EX_FAIL;
  }
  targ mi, ms;
  int direct = rchance(50); /* the gathered views themselves */
  if (direct) {
    mi = gi;
    ms = gs;
    mi.p = &mi.t;
    ms.p = &ms.t;
  } else {
    tspec smi = {"cand_ids", M3S_I32, MASK(M3S_I32), 4, {nrk, B.T, hkv, K}, 0, 0, 0, 1, 8, NULL, 0};
    tspec sms = {"cand_scores", M3S_F32, MASK(M3S_F32), 4, {nrk, B.T, hkv, K}, 0, 0, 0, 1, 8,
                 NULL,          0};
    mk(&mi, &smi, &ex);
    mk(&ms, &sms, &ex);
    if (!mi.broken && !ms.broken && mi.t.ndim == 4 && ms.t.ndim == 4)
      for (int rk = 0; rk < nrk; rk++)
        for (int64_t t = 0; t < B.T; t++)
          for (int g = 0; g < hkv; g++)
            for (int k = 0; k < K; k++) {
              tseti(&mi, I4(rk, t, g, k), tgeti(&gi, I4(rk, t, g, k)));
              void *p = tptr(&ms, I4(rk, t, g, k)), *q = tptr(&gs, I4(rk, t, g, k));
              if (p && q)
                memcpy(p, q, 4);
            }
  }
  /* the gathered values: kept, changed validly, or made invalid */
  int changed = 0;
  int64_t vt, vnb;
  if (!cfg_bad && !mi.broken && !ms.broken && rchance(20) &&
      pick_scored_row(&B, K, &vt, &vnb) == 0) {
    int rk = rpick(nrk), g = rpick(hkv), k = rpick(K), kind = rpick(8);
    int64_t at[4] = {rk, vt, g, k};
    int32_t cur = (int32_t)tgeti(&mi, at);
    switch (kind) {
    case 0: tseti(&mi, at, vnb + rpick(5)); ex |= EX_FAIL; break;              /* >= nb */
    case 1: tseti(&mi, at, rchance(50) ? -2 - rpick(5) : INT32_MIN); ex |= EX_FAIL; break;
    case 2: { /* a block of another rank */
      m3s_cp o = cp;
      o.cp_rank = rk;
      int64_t b0 = rpick((int)vnb);
      for (int64_t x = 0; x < vnb; x++)
        if (!cp_owns(&o, (b0 + x) % vnb)) {
          tseti(&mi, at, (b0 + x) % vnb);
          ex |= EX_FAIL;
          break;
        }
      break;
    }
    case 3: { /* a block twice in the rank's row */
      int k2 = K > 1 ? (k + 1 + rpick(K - 1)) % K : k;
      int32_t id = (int32_t)tgeti(&mi, I4(rk, vt, g, k2));
      if (k2 != k && id >= 0) {
        tseti(&mi, at, id);
        ex |= EX_FAIL;
      }
      break;
    }
    case 4: /* a hole */
      tseti(&mi, at, -1);
      changed = 1;
      break;
    case 5: { /* any score, NaN and infinities included */
      static const float sp[6] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 1e30f};
      float f = rchance(50) ? sp[rpick(6)] : (float)(rpick(64) - 32) / 4.0f;
      void *p = tptr(&ms, at);
      if (p)
        memcpy(p, &f, 4);
      changed = cur >= 0;
      break;
    }
    case 6: { /* the rank's row in another order */
      for (int a = K - 1; a > 0; a--) {
        int b = rndn(a + 1);
        int32_t ia = (int32_t)tgeti(&mi, I4(rk, vt, g, a)), ib = (int32_t)tgeti(&mi, I4(rk, vt, g, b));
        float fa = tgetf32(&ms, I4(rk, vt, g, a)), fb = tgetf32(&ms, I4(rk, vt, g, b));
        tseti(&mi, I4(rk, vt, g, a), ib);
        tseti(&mi, I4(rk, vt, g, b), ia);
        void *pa = tptr(&ms, I4(rk, vt, g, a)), *pb = tptr(&ms, I4(rk, vt, g, b));
        if (pa && pb)
          memcpy(pa, &fb, 4), memcpy(pb, &fa, 4);
      }
      break; /* the same set: the same selection */
    }
    default: /* chaos */
      ex |= EX_ANY;
      for (int x = 0, n = 1 + rpick(4); x < n; x++)
        tseti(&mi, I4(rpick(nrk), rpick((int)B.T), rpick(hkv), rpick(K)),
              rchance(50) ? (int32_t)rnd() : rpick(40) - 2);
      break;
    }
  }
  tspec stk = {"topk", M3S_I32, MASK(M3S_I32), 3, {B.T, hkv, K}, 1, 0, 0, 1, 8, PERM_HM, 0};
  targ tk;
  mk(&tk, &stk, &ex);
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip)
    return;
  OUTPUTS(&tk);
  m3s_status st = CALL("m3s_merge_topk_candidates", ex,
                       m3s_merge_topk_candidates(ctx, C.p, Bm.p, mi.p, ms.p, tk.p, e));
  if (st)
    return;
  allow_view(&tk);
  check_allowed();
  if (ex)
    return;
  if (cfg_bad)
    die("harness: a merge of junk candidates under an invalid config was accepted");
  /* the harness's merge of the values the call got */
  for (int r = 0; r < B.num_reqs; r++)
    for (int64_t i = 0; i < B.n[r]; i++) {
      int64_t t = B.row0[r] + i, pos = bpos(&B, r, i);
      for (int g = 0; g < hkv; g++) {
        int32_t want[M3S_MAX_TOPK];
        if (pos < 0)
          for (int k = 0; k < K; k++)
            want[k] = -1;
        else
          ref_merge_row(&C.c, pos / BS + 1, nrk, &mi, &ms, t, g, want);
        for (int k = 0; k < K; k++)
          if (tgeti(&tk, I4(t, g, k, 0)) != want[k])
            die("merge_topk_candidates row %lld (pos %lld) head %d entry %d: %d, the merge of "
                "the %d ranks' candidates gives %d",
                (long long)t, (long long)pos, g, k, (int)tgeti(&tk, I4(t, g, k, 0)), nrk,
                want[k]);
      }
    }
  if (changed || g_alias_in)
    return;
  /* the ranks' own candidates: the whole cache's selection, bit for bit */
  S.indep++;
  targ tw;
  mk_out(&tw, "topk(whole cache)", M3S_I32, 3, B.T, hkv, K, 0);
  if (g_skip)
    return;
  OUTPUTS(&tw);
  CALL("m3s_index_topk(whole cache)", 0,
       m3s_index_topk(g_ctx, &C.c, &B.b, &iq.t, &ic.t, &tw.t, NULL));
  allow_view(&tw);
  check_allowed();
  cmp_bits(&tk, 0, &tw, 0, B.T, "merge_topk_candidates vs m3s_index_topk on the whole cache");
  check_topk_rows(&C.c, &B, &iq, &ic, &tk, 0, nice);
}

/* ------------------------------------------------------ merge_attn_states_n */
void op_merge_n(void) {
  int ex = 0;
  int N = 1 + rpick(4);
  if (rchance(10))
    N = rchance(50) ? 0 : M3S_MAX_CP_SIZE + 1 + rpick(2);
  else if (rchance(10))
    N = 1 + rpick(M3S_MAX_CP_SIZE);
  int T = rpick(12), H = 1 + rpick(16), nice = !rchance(20);
  if (N > 8)
    T = rpick(4), H = 1 + rpick(4);
  if (N < 1 || N > M3S_MAX_CP_SIZE)
    ex |= EX_FAIL; /* outs.shape[0] outside [1, 64] */
  static const m3s_dtype dts[3] = {M3S_BF16, M3S_F16, M3S_F32};
  m3s_dtype din = dts[rpick(3)], dout = dts[rpick(3)];
  unsigned st_mask = ACT | MASK(M3S_F32);
  int alias = N >= 1 && N <= M3S_MAX_CP_SIZE && rchance(20); /* out is outs[an] */
  int an = alias ? rpick(N) : 0;
  tspec so = {"outs", din, st_mask, 4, {N, T, H, D}, alias, 0, 0, 1, alias ? 0 : 6, NULL, 0};
  tspec sl = {"lses", M3S_F32, MASK(M3S_F32), 3, {N, T, H}, 0, 0, 0, 1, 6, NULL, 0};
  tspec sout = {"out", dout, st_mask, 3, {T, H, D}, 1, 0, 0, 1, 6, NULL, 0};
  tspec slse = {"lse", M3S_F32, MASK(M3S_F32), 2, {T, H}, 1, 0, 0, 1, 6, NULL, 1};
  targ outs, lses, out, lse;
  mk(&outs, &so, &ex);
  mk(&lses, &sl, &ex);
  if (alias)
    targ_slice(&out, &outs, an, "out (= outs[n])");
  else
    mk(&out, &sout, &ex);
  if (rchance(30))
    memset(&lse, 0, sizeof lse);
  else
    mk(&lse, &slse, &ex);
  if (nice) {
    fill_nice(&outs);
    fill_lse_vals(&lses, 1);
    for (int x = 0; T > 0 && x < 2 && rchance(30); x++) { /* a row no rank has mass for */
      int t = rpick(T), h = rpick(H);
      for (int n = 0; n < N; n++)
        tsetf(&lses, I4(n, t, h, 0), -INFINITY);
    }
  }
  /* expected values, before the call (out may alias an input) */
  int numeric = nice && !g_alias_in && !ex && !outs.broken && !lses.broken;
  double *ref = (double *)malloc(sizeof(double) * (size_t)(T * H * (D + 1) + 1));
  double *o = (double *)malloc(sizeof(double) * (size_t)(N > 0 ? N : 1) * D), *l = NULL;
  const double **op = (const double **)malloc(sizeof(double *) * (size_t)(N > 0 ? N : 1));
  l = (double *)malloc(sizeof(double) * (size_t)(N > 0 ? N : 1));
  for (int t = 0; t < T && numeric; t++)
    for (int h = 0; h < H; h++) {
      for (int n = 0; n < N; n++) {
        row_get(&outs, I4(n, t, h, 0), D, o + n * D);
        l[n] = tgetf(&lses, I4(n, t, h, 0));
        op[n] = o + n * D;
      }
      double *r = ref + (t * H + h) * (D + 1);
      ref_merge(N, op, l, r, r + D);
    }
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (!g_skip) {
    OUTPUTS(&out, &lse);
    m3s_status st = CALL("m3s_merge_attn_states_n", ex,
                         m3s_merge_attn_states_n(ctx, outs.p, lses.p, out.p, lse.p, e));
    if (st == M3S_OK) {
      allow_view(&out);
      allow_view(lse.p ? &lse : NULL);
      check_allowed();
      for (int t = 0; t < T && numeric && !ex; t++)
        for (int h = 0; h < H; h++) {
          double *r = ref + (t * H + h) * (D + 1);
          check_state_row("merge_attn_states_n", &out, &lse, t, h, r, r[D], 1);
        }
    }
  }
  free(ref);
  free(o);
  free(l);
  free(op);
}
