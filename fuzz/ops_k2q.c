/* ops_k2q.c -- operations: k2q CSR, k2q attention, combine, lse merge. */
#include "fuzz.h"

void op_csr(void) {
  int ex = 0, hq, hkv, K;
  cfg_t C;
  gen_cfg(&C, &ex);
  safe_dims(&C.c, &hq, &hkv, &K);
  bat B;
  gen_batch_desc(&B, 0, hq, hkv, K);
  bat *L[1] = {&B};
  assign_pages(L, 1);
  B.cp_pol = CP_ANY; /* the CSR does not read the block tables */
  mk_batch(&B, 0, 0, 1, &ex);
  int64_t R = 0;
  for (int r = 0; r < B.num_reqs; r++)
    R += need_pages(B.s[r]);
  tspec stk = {"topk", M3S_I32, MASK(M3S_I32), 3, {B.T, hkv, K}, 0, 0, 0, 1, 8, PERM_HM, 0};
  tspec srp = {"row_ptr", M3S_I32, MASK(M3S_I32), 2, {hkv, R + 1}, 1, 1, 0, 1, 6, NULL, 0};
  tspec sqi = {"q_indices", M3S_I32, MASK(M3S_I32), 2, {hkv, (int64_t)B.T * K}, 1, 1, 0,
               1,           6,       NULL,          0};
  tspec sqs = {"q_slot", M3S_I32, MASK(M3S_I32), 2, {hkv, (int64_t)B.T * K}, 1, 1, 0,
               1,        6,       NULL,          0};
  tspec sqc = {"q_count", M3S_I32, MASK(M3S_I32), 2, {B.T, hkv}, 1, 1, 0, 1, 6, NULL, 0};
  targ tk, rp, qi, qs, qc;
  mk(&tk, &stk, &ex);
  mk(&rp, &srp, &ex);
  mk(&qi, &sqi, &ex);
  mk(&qs, &sqs, &ex);
  mk(&qc, &sqc, &ex);
  fill_topk_input(hkv, K, &B, &tk, 0, &ex);
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip)
    return;
  OUTPUTS(&rp, &qi, &qs, &qc);
  m3s_status st = CALL("m3s_build_k2q_csr", ex | cp_ex(&B),
                       m3s_build_k2q_csr(ctx, C.p, B.p, tk.p, rp.p, qi.p, qs.p, qc.p, e));
  cp_check(&B, ex, st);
  if (st)
    return;
  if (ex) {
    allow_view(&rp);
    allow_view(&qi);
    allow_view(&qs);
    allow_view(&qc);
    check_allowed();
    return;
  }
  csr_t E;
  csr_build(&E, hkv, K, &B, &tk, NULL);
  allow_view(&rp);
  allow_view(&qc);
  for (int g = 0; g < hkv; g++)
    for (int64_t x = 0; x < E.rp[g * (R + 1) + R]; x++) {
      allow_idx(&qi, I4(g, x, 0, 0));
      allow_idx(&qs, I4(g, x, 0, 0));
    }
  check_allowed();
  for (int g = 0; g < hkv; g++) {
    for (int64_t x = 0; x <= R; x++)
      if (tgeti(&rp, I4(g, x, 0, 0)) != E.rp[g * (R + 1) + x])
        die("build_k2q_csr: row_ptr[%d][%lld] = %lld, want %d", g, (long long)x,
            (long long)tgeti(&rp, I4(g, x, 0, 0)), E.rp[g * (R + 1) + x]);
    for (int64_t x = 0; x < E.rp[g * (R + 1) + R]; x++)
      if (tgeti(&qi, I4(g, x, 0, 0)) != E.qi[g * E.cap + x] ||
          tgeti(&qs, I4(g, x, 0, 0)) != E.qs[g * E.cap + x])
        die("build_k2q_csr: entry [%d][%lld] = (query %lld, slot %lld), want (%d, %d)", g,
            (long long)x, (long long)tgeti(&qi, I4(g, x, 0, 0)),
            (long long)tgeti(&qs, I4(g, x, 0, 0)), E.qi[g * E.cap + x], E.qs[g * E.cap + x]);
  }
  for (int64_t t = 0; t < B.T; t++)
    for (int g = 0; g < hkv; g++)
      if (tgeti(&qc, I4(t, g, 0, 0)) != E.qc[t * hkv + g])
        die("build_k2q_csr: q_count[%lld][%d] = %lld, want %d", (long long)t, g,
            (long long)tgeti(&qc, I4(t, g, 0, 0)), E.qc[t * hkv + g]);
  S.ref_rows += (unsigned long long)B.T;
  csr_free(&E);
}

void op_k2q_attention(void) {
  int ex = 0;
  attn_fx F;
  bat B;
  attn_one_batch(&F, &B, &ex, CP_UNSUP);
  fill_kv(&B, &F.kv, F.hkv, F.nice, 1);
  int hkv = F.hkv, K = F.K, hq = F.hq, G = hq / hkv;
  /* host selections: distinct ids < nb(t) (or, "odd", any block of the request) */
  int odd = rchance(20);
  int32_t *sel = (int32_t *)malloc(sizeof(int32_t) * (size_t)(B.T * hkv * K + 1));
  for (int r = 0; r < B.num_reqs; r++)
    for (int64_t i = 0; i < B.n[r]; i++) {
      int64_t t = B.row0[r] + i, pos = bpos(&B, r, i);
      int64_t lim = pos < 0 ? 0 : odd ? need_pages(B.s[r]) : pos / BS + 1;
      for (int g = 0; g < hkv; g++) {
        int32_t pool[MAX_COLS];
        for (int b = 0; b < lim; b++)
          pool[b] = b;
        for (int64_t b = lim - 1; b > 0; b--) {
          int j = rndn((int)b + 1);
          int32_t x = pool[b];
          pool[b] = pool[j];
          pool[j] = x;
        }
        int m = rndn(K + 1);
        for (int k = 0; k < K; k++)
          sel[(t * hkv + g) * K + k] = k < m && k < lim ? pool[k] : -1;
      }
    }
  csr_t E;
  csr_build(&E, F.hkv, F.K, &B, NULL, sel);
  int64_t R = E.R, cap = E.cap;
  tspec srp = {"row_ptr", M3S_I32, MASK(M3S_I32), 2, {hkv, R + 1}, 0, 0, 0, 1, 6, NULL, 0};
  tspec sqi = {"q_indices", M3S_I32, MASK(M3S_I32), 2, {hkv, cap}, 0, 0, 0, 1, 6, NULL, 0};
  tspec sqs = {"q_slot", M3S_I32, MASK(M3S_I32), 2, {hkv, cap}, 0, 0, 0, 1, 6, NULL, 0};
  tspec spo = {"part_out", M3S_F32, MASK(M3S_F32), 4, {B.T, hq, K, D}, 1, 0, 0, 1, 6, NULL, 0};
  tspec spl = {"part_lse", M3S_F32, MASK(M3S_F32), 3, {B.T, hq, K}, 1, 0, 0, 1, 6, NULL, 0};
  targ rp, qi, qs, po, pl;
  mk(&rp, &srp, &ex);
  mk(&qi, &sqi, &ex);
  mk(&qs, &sqs, &ex);
  mk(&po, &spo, &ex);
  mk(&pl, &spl, &ex);
  for (int g = 0; g < hkv; g++) {
    for (int64_t x = 0; x <= R; x++)
      tseti(&rp, I4(g, x, 0, 0), E.rp[g * (R + 1) + x]);
    for (int64_t x = 0; x < E.rp[g * (R + 1) + R]; x++) {
      tseti(&qi, I4(g, x, 0, 0), E.qi[g * cap + x]);
      tseti(&qs, I4(g, x, 0, 0), E.qs[g * cap + x]);
    }
  }
  if (rchance(12)) { /* CSR values the API must reject, or chaos */
    int g = rpick(hkv), kind = rpick(6);
    int32_t *grp = E.rp + g * (R + 1);
    int64_t tot = grp[R];
    if (kind == 0) {
      tseti(&rp, I4(g, 0, 0, 0), 1 + rpick(5));
      ex |= EX_FAIL;
    } else if (kind == 1 && R > 0) {
      int64_t x = rpick((int)R);
      tseti(&rp, I4(g, x + 1, 0, 0), grp[x] - 1 - rpick(3));
      ex |= EX_FAIL;
    } else if (kind == 2 && R > 0) {
      tseti(&rp, I4(g, R, 0, 0), cap + 1 + rpick(3));
      ex |= EX_FAIL;
    } else if ((kind == 3 || kind == 4) && tot > 0) {
      int64_t x = rpick((int)tot), row = 0;
      while (grp[row + 1] <= x)
        row++;
      int r = (int)E.row_req[row];
      int64_t lo = B.row0[r], hi = lo + B.n[r];
      if (kind == 3)
        tseti(&qi, I4(g, x, 0, 0), rchance(50) ? lo - 1 - rpick(3) : hi + rpick(3));
      else
        tseti(&qs, I4(g, x, 0, 0), rchance(50) ? -1 - rpick(3) : K + rpick(3));
      ex |= EX_FAIL;
    } else if (kind == 5) {
      ex |= EX_ANY;
      targ *ts[3] = {&rp, &qi, &qs};
      for (int k = 0, n = 1 + rpick(4); k < n; k++) {
        targ *a = ts[rpick(3)];
        if (a->b->bytes >= 4 && !a->broken) {
          size_t at = (size_t)rndn((int)(a->b->bytes / 4)) * 4;
          int32_t v = rchance(50) ? (int32_t)rnd() : rpick(80) - 3;
          memcpy(a->b->data + at, &v, 4);
        }
      }
    }
  }
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip) {
    csr_free(&E);
    free(sel);
    return;
  }
  OUTPUTS(&po, &pl);
  m3s_status st = CALL(
      "m3s_k2q_attention", ex | cp_ex(&B),
      m3s_k2q_attention(ctx, F.C.p, B.p, F.q.p, F.kv.p, F.sc.p, rp.p, qi.p, qs.p, po.p, pl.p, e));
  cp_check(&B, ex, st);
  if (st == M3S_OK) {
    if (ex) {
      allow_view(&po);
      allow_view(&pl);
      check_allowed();
    } else {
      attn_in A = {&F.C.c, &B, &F.q, &F.kv, NULL, &F.sc, 0, NULL, NULL};
      int numeric = F.nice && F.C.nice && F.sc.nice && !g_alias_in;
      attn_decode(&A);
      double *ref_o = (double *)malloc(sizeof(double) * (size_t)G * (D + 1)),
             *ref_l = ref_o + G * D;
      for (int g = 0; g < hkv; g++)
        for (int64_t row = 0; row < R; row++)
          for (int64_t x = E.rp[g * (R + 1) + row]; x < E.rp[g * (R + 1) + row + 1]; x++) {
            int64_t t = E.qi[g * cap + x], slot = E.qs[g * cap + x];
            int r = (int)E.row_req[row];
            int32_t id = (int32_t)E.row_blk[row];
            int64_t pos = bpos(&B, r, t - B.row0[r]);
            int64_t nk = ref_attend(&A, r, pos, t, g * G, G, &id, 1, ref_o, ref_l);
            for (int h = g * G; h < (g + 1) * G; h++) {
              for (int d = 0; d < D; d++)
                allow_idx(&po, I4(t, h, slot, d));
              allow_idx(&pl, I4(t, h, slot, 0));
              const double *ro = ref_o + (h - g * G) * D;
              double rl = ref_l[h - g * G], gl = tgetf(&pl, I4(t, h, slot, 0)), e2 = 0, r2 = 0;
              for (int d = 0; d < D; d++) {
                double dd = tgetf(&po, I4(t, h, slot, d)) - ro[d];
                e2 += dd * dd;
                r2 += ro[d] * ro[d];
                if (nk == 0 && tgetf(&po, I4(t, h, slot, d)) != 0)
                  die("k2q_attention: (t %lld, h %d, slot %lld) sees no key of block %d but "
                      "part_out[%d] = %g",
                      (long long)t, h, (long long)slot, id, d, tgetf(&po, I4(t, h, slot, d)));
              }
              if (nk == 0 && !(gl == -INFINITY))
                die("k2q_attention: (t %lld, h %d, slot %lld) sees no key but part_lse = %g",
                    (long long)t, h, (long long)slot, gl);
              if (numeric && nk > 0) {
                S.ref_rows++;
                if (!(e2 <= 1e-6 * r2 + 1e-8) || !(fabs(gl - rl) <= 1e-3 * (1 + fabs(rl))))
                  die("k2q_attention: (t %lld, h %d, slot %lld, block %d): rel L2 %.3g, lse %.9g "
                      "vs fp64 %.9g",
                      (long long)t, h, (long long)slot, id, sqrt(e2 / (r2 + 1e-300)), gl, rl);
              }
            }
          }
      check_allowed();
      free(ref_o);
      free(A.kvd);
    }
  }
  csr_free(&E);
  free(sel);
}

/* -------------------------------------------------------- combine, merge */
void fill_lse_vals(const targ *a, int nice) {
  if (!a->b || a->broken || !nice)
    return;
  for (size_t i = 0; i + 4 <= a->b->bytes; i += 4) {
    float f = rndn(6) == 0 ? -INFINITY : (float)(rndn(161) - 80) / 8.0f;
    memcpy(a->b->data + i, &f, 4);
  }
}

/* fp64 merge of n states */
void ref_merge(int n, const double *const *o, const double *l, double *out, double *lse) {
  double m = -INFINITY;
  for (int i = 0; i < n; i++)
    m = l[i] > m ? l[i] : m;
  for (int d = 0; d < D; d++)
    out[d] = 0;
  if (m == -INFINITY) {
    *lse = -INFINITY;
    return;
  }
  double s = 0;
  for (int i = 0; i < n; i++) {
    double w = exp(l[i] - m);
    s += w;
    for (int d = 0; d < D; d++)
      out[d] += w * o[i][d];
  }
  for (int d = 0; d < D; d++)
    out[d] /= s;
  *lse = m + log(s);
}

void check_state_row(const char *what, const targ *out, const targ *lse, int64_t t,
                            int64_t h, const double *ro, double rl, int numeric) {
  if (rl == -INFINITY) {
    for (int d = 0; d < D; d++)
      if (tgetf(out, I4(t, h, d, 0)) != 0)
        die("%s: row %lld head %lld has no mass but out[%d] = %g", what, (long long)t, (long long)h,
            d, tgetf(out, I4(t, h, d, 0)));
    if (lse && lse->p && !(tgetf(lse, I4(t, h, 0, 0)) == -INFINITY))
      die("%s: row %lld head %lld has no mass but lse = %g", what, (long long)t, (long long)h,
          tgetf(lse, I4(t, h, 0, 0)));
    return;
  }
  if (!numeric)
    return;
  S.ref_rows++;
  double e2 = 0, r2 = 0;
  for (int d = 0; d < D; d++) {
    double e = tgetf(out, I4(t, h, d, 0)) - ro[d];
    e2 += e * e;
    r2 += ro[d] * ro[d];
  }
  if (!(e2 <= 1e-4 * r2 + 1e-6 * D))
    die("%s: row %lld head %lld: rel L2 error %.3g vs the fp64 reference", what, (long long)t,
        (long long)h, sqrt(e2 / (r2 + 1e-300)));
  if (lse && lse->p) {
    double gl = tgetf(lse, I4(t, h, 0, 0));
    if (!(fabs(gl - rl) <= 1e-4 * (1 + fabs(rl))))
      die("%s: row %lld head %lld: lse %.9g vs fp64 %.9g", what, (long long)t, (long long)h, gl,
          rl);
  }
}

void op_combine(void) {
  int ex = 0, hq, hkv, K;
  cfg_t C;
  gen_cfg(&C, &ex);
  safe_dims(&C.c, &hq, &hkv, &K);
  int T = rpick(12), nice = !rchance(20);
  m3s_dtype odt = rchance(30) ? M3S_F16 : M3S_BF16;
  tspec spo = {"part_out", M3S_F32, MASK(M3S_F32), 4, {T, hq, K, D}, 0, 0, 0, 1, 6, NULL, 0};
  tspec spl = {"part_lse", M3S_F32, MASK(M3S_F32), 3, {T, hq, K}, 0, 0, 0, 1, 6, NULL, 0};
  tspec sqc = {"q_count", M3S_I32, MASK(M3S_I32), 2, {T, hkv}, 0, 0, 0, 1, 6, NULL, 0};
  tspec so = {"out", odt, ACT, 3, {T, hq, D}, 1, 0, 0, 1, 6, NULL, 0};
  tspec sl = {"lse", M3S_F32, MASK(M3S_F32), 2, {T, hq}, 1, 0, 0, 1, 6, NULL, 1};
  targ po, pl, qc, out, lse;
  mk(&po, &spo, &ex);
  mk(&pl, &spl, &ex);
  mk(&qc, &sqc, &ex);
  mk(&out, &so, &ex);
  if (rchance(30))
    memset(&lse, 0, sizeof lse);
  else
    mk(&lse, &sl, &ex);
  int32_t cnt[MAX_T][16];
  if (nice) {
    fill_nice(&po);
    fill_lse_vals(&pl, 1);
  }
  for (int t = 0; t < T; t++)
    for (int g = 0; g < hkv; g++) {
      cnt[t][g] = rpick(K + 1);
      tseti(&qc, I4(t, g, 0, 0), cnt[t][g]);
      if (nice) /* slots past the count must not be read */
        for (int h = g * (hq / hkv); h < (g + 1) * (hq / hkv); h++)
          for (int k = cnt[t][g]; k < K; k++) {
            tsetf(&pl, I4(t, h, k, 0), NAN);
            tsetf(&po, I4(t, h, k, rndn(D)), NAN);
          }
    }
  if (T > 0 && rchance(10)) {
    int t = rpick(T), g = rpick(hkv);
    tseti(&qc, I4(t, g, 0, 0), rchance(50) ? -1 - rpick(5) : K + 1 + rpick(5));
    ex |= EX_FAIL;
  }
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip)
    return;
  OUTPUTS(&out, &lse);
  m3s_status st = CALL("m3s_combine_partials", ex,
                       m3s_combine_partials(ctx, C.p, po.p, pl.p, qc.p, out.p, lse.p, e));
  if (st)
    return;
  allow_view(&out);
  allow_view(lse.p ? &lse : NULL);
  check_allowed();
  if (ex || !nice || g_alias_in)
    return;
  for (int t = 0; t < T; t++)
    for (int h = 0; h < hq; h++) {
      int n = cnt[t][h / (hq / hkv)];
      double o[M3S_MAX_TOPK][D], l[M3S_MAX_TOPK], ro[D], rl;
      const double *op[M3S_MAX_TOPK];
      for (int k = 0; k < n; k++) {
        for (int d = 0; d < D; d++)
          o[k][d] = tgetf(&po, I4(t, h, k, d));
        l[k] = tgetf(&pl, I4(t, h, k, 0));
        op[k] = o[k];
      }
      ref_merge(n, op, l, ro, &rl);
      check_state_row("combine_partials", &out, &lse, t, h, ro, rl, 1);
    }
}

void op_merge(void) {
  int ex = 0;
  int T = rpick(12), H = 1 + rpick(16), nice = !rchance(20);
  static const m3s_dtype dts[3] = {M3S_BF16, M3S_F16, M3S_F32};
  m3s_dtype da = dts[rpick(3)], db = dts[rpick(3)], dout = dts[rpick(3)];
  unsigned st_mask = ACT | MASK(M3S_F32);
  int alias = rpick(4); /* 1: out is out_a, 2: out is out_b */
  tspec sa = {"out_a", da, st_mask, 3, {T, H, D}, alias == 1, 0, 0, 1, 6, NULL, 0};
  tspec sla = {"lse_a", M3S_F32, MASK(M3S_F32), 2, {T, H}, 0, 0, 0, 1, 6, NULL, 0};
  tspec sb = {"out_b", db, st_mask, 3, {T, H, D}, alias == 2, 0, 0, 1, 6, NULL, 0};
  tspec slb = {"lse_b", M3S_F32, MASK(M3S_F32), 2, {T, H}, 0, 0, 0, 1, 6, NULL, 0};
  tspec so = {"out", dout, st_mask, 3, {T, H, D}, 1, 0, 0, 1, 6, NULL, 0};
  tspec sl = {"lse", M3S_F32, MASK(M3S_F32), 2, {T, H}, 1, 0, 0, 1, 6, NULL, 1};
  targ a, la, b, lb, out, lse;
  mk(&a, &sa, &ex);
  mk(&la, &sla, &ex);
  mk(&b, &sb, &ex);
  mk(&lb, &slb, &ex);
  if (alias == 1 || alias == 2) {
    out = alias == 1 ? a : b;
  } else {
    mk(&out, &so, &ex);
  }
  if (rchance(30))
    memset(&lse, 0, sizeof lse);
  else
    mk(&lse, &sl, &ex);
  if (nice) {
    fill_nice(&a);
    fill_nice(&b);
    fill_lse_vals(&la, 1);
    fill_lse_vals(&lb, 1);
  }
  /* expected values, computed before the call (out may alias an input) */
  int numeric = nice && !g_alias_in && !ex;
  double *ref = (double *)malloc(sizeof(double) * (size_t)(T * H * (D + 1) + 1));
  for (int t = 0; t < T && numeric; t++)
    for (int h = 0; h < H; h++) {
      double oa[D], ob[D], l[2] = {tgetf(&la, I4(t, h, 0, 0)), tgetf(&lb, I4(t, h, 0, 0))};
      for (int d = 0; d < D; d++)
        oa[d] = tgetf(&a, I4(t, h, d, 0)), ob[d] = tgetf(&b, I4(t, h, d, 0));
      const double *op[2] = {oa, ob};
      double *r = ref + (t * H + h) * (D + 1);
      ref_merge(2, op, l, r, r + D);
    }
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (!g_skip) {
    OUTPUTS(&out, &lse);
    m3s_status st = CALL("m3s_merge_attn_states", ex,
                         m3s_merge_attn_states(ctx, a.p, la.p, b.p, lb.p, out.p, lse.p, e));
    if (st == M3S_OK) {
      allow_view(&out);
      allow_view(lse.p ? &lse : NULL);
      check_allowed();
      for (int t = 0; t < T && numeric && !ex; t++)
        for (int h = 0; h < H; h++) {
          double *r = ref + (t * H + h) * (D + 1);
          check_state_row("merge_attn_states", &out, &lse, t, h, r, r[D], 1);
        }
    }
  }
  free(ref);
}

/* --------------------------------------------------------------- narrow */
int64_t pick_i64(void) {
  switch (rpick(8)) {
  case 0: return INT64_MIN + rpick(3);
  case 1: return INT64_MAX - rpick(3);
  case 2: return -1 - rpick(4);
  case 3: return (int64_t)rb64();
  case 4: return ((int64_t)1 << (rpick(62) + 1)) + rpick(3) - 1;
  default: return rpick(12);
  }
}

