/* ops_cache.c -- operations: cache inserts (main and index caches). */
#include "fuzz.h"

void op_cache_insert(void) {
  int ex = 0;
  int hkv = 1 + rpick(4), T = rpick(10), P = rpick(5);
  if (P == 0 && !rchance(30))
    P = 1;
  m3s_dtype adt = rchance(30) ? M3S_F16 : M3S_BF16, cdt = KV_DT[rpick(4)];
  m3s_dtype sdt = rchance(30) ? M3S_I32 : M3S_I64;
  int nice = !rchance(25);
  tspec sk = {"k", adt, ACT, 3, {T, hkv, D}, 0, 0, 0, 1, 8, NULL, 0};
  tspec sv = {"v", adt, MASK(adt), 3, {T, hkv, D}, 0, 0, 0, 1, 8, NULL, 0};
  tspec ssl = {"slot_mapping", sdt, MASK(M3S_I32) | MASK(M3S_I64), 1, {T}, 0, 0, 0, 1, 8, NULL, 0};
  tspec skv = {"kv_cache", cdt, KV_MASK, 4, {P, hkv, BS, 2 * D}, 1, 0, 1u, 1, 8, PERM_TM, 0};
  targ k, v, sl, kv;
  int ex_k = 0, ex_v = 0, ex_sl = 0;
  mk(&k, &sk, &ex_k);
  mk(&v, &sv, &ex_v);
  mk(&sl, &ssl, &ex_sl);
  mk(&kv, &skv, &ex);
  {
    const targ *tok[3] = {&k, &v, &sl};
    int *tex[3] = {&ex_k, &ex_v, &ex_sl};
    T = (int)agreed_token_count(tok, tex, 3, T);
    ex |= ex_k | ex_v | ex_sl;
  }
  scl_t sc;
  gen_scales(&sc, cdt, hkv, P, nice, &ex);
  int64_t slots[16];
  fill_slots(&sl, T, P, slots, &ex);
  fill_act(&k, nice, 0);
  fill_act(&v, nice, 0);
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip)
    return;
  OUTPUTS(&kv);
  m3s_status st =
      CALL("m3s_cache_insert", ex, m3s_cache_insert(ctx, k.p, v.p, sl.p, kv.p, sc.p, e));
  if (st)
    return;
  if (ex) {
    allow_view(&kv);
    check_allowed();
    return;
  }
  for (int i = 0; i < T; i++)
    if (slots[i] >= 0)
      for (int h = 0; h < hkv; h++)
        for (int d = 0; d < 2 * D; d++)
          allow_idx(&kv, I4(slots[i] / BS, h, slots[i] % BS, d));
  check_allowed();
  if (!nice || !sc.nice || g_alias_in)
    return;
  for (int i = 0; i < T; i++) {
    if (slots[i] < 0)
      continue;
    int later = 0;
    for (int j = i + 1; j < T; j++)
      later |= slots[j] == slots[i];
    if (later)
      continue; /* the later row wins */
    int64_t page = slots[i] / BS, off = slots[i] % BS;
    for (int h = 0; h < hkv; h++)
      for (int d = 0; d < 2 * D; d++) {
        double want = tgetf(d < D ? &k : &v, I4(i, h, d % D, 0));
        double got = tgetf(&kv, I4(page, h, off, d));
        if (cdt == M3S_E4M3 || cdt == M3S_E5M2)
          got *= scale_at(&sc, d >= D, h, slots[i]);
        if (got != want)
          die("cache_insert: token %d head %d element %d: cache holds %g, want %g", i, h, d, got,
              want);
      }
  }
}

void op_index_insert(void) {
  int ex = 0;
  int T = rpick(10), P = rpick(5);
  if (P == 0 && !rchance(30))
    P = 1;
  m3s_dtype adt = rchance(30) ? M3S_F16 : M3S_BF16, idt = rchance(40) ? M3S_E4M3 : M3S_BF16;
  m3s_dtype sdt = rchance(30) ? M3S_I32 : M3S_I64;
  int nice = !rchance(25);
  tspec sk = {"ik", adt, ACT, 2, {T, D}, 0, 0, 0, 1, 8, NULL, 0};
  tspec ssl = {"slot_mapping", sdt, MASK(M3S_I32) | MASK(M3S_I64), 1, {T}, 0, 0, 0, 1, 8, NULL, 0};
  tspec sic = {"index_cache", idt, IDX_MASK, 3, {P, BS, D}, 1, 1, 1u, 1, 8, NULL, 0};
  targ ik, sl, ic;
  int ex_ik = 0, ex_sl = 0;
  mk(&ik, &sk, &ex_ik);
  mk(&sl, &ssl, &ex_sl);
  mk(&ic, &sic, &ex);
  {
    /* regression seed fuzz/corpus/regress-harness-empty-index-insert: ik
     * and slot_mapping both shrunk from 1 token to 0 (a valid empty insert)
     * was once expected to fail */
    const targ *tok[2] = {&ik, &sl};
    int *tex[2] = {&ex_ik, &ex_sl};
    T = (int)agreed_token_count(tok, tex, 2, T);
    ex |= ex_ik | ex_sl;
  }
  int64_t slots[16];
  fill_slots(&sl, T, P, slots, &ex);
  fill_act(&ik, nice, 0);
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip)
    return;
  OUTPUTS(&ic);
  m3s_status st =
      CALL("m3s_index_cache_insert", ex, m3s_index_cache_insert(ctx, ik.p, sl.p, ic.p, e));
  if (st)
    return;
  if (ex) {
    allow_view(&ic);
    check_allowed();
    return;
  }
  for (int i = 0; i < T; i++)
    if (slots[i] >= 0)
      for (int d = 0; d < D; d++)
        allow_idx(&ic, I4(slots[i] / BS, slots[i] % BS, d, 0));
  check_allowed();
  if (!nice || g_alias_in)
    return;
  for (int i = 0; i < T; i++) {
    if (slots[i] < 0)
      continue;
    int later = 0;
    for (int j = i + 1; j < T; j++)
      later |= slots[j] == slots[i];
    for (int d = 0; d < D && !later; d++) {
      double want = tgetf(&ik, I4(i, d, 0, 0)),
             got = tgetf(&ic, I4(slots[i] / BS, slots[i] % BS, d, 0));
      if (got != want)
        die("index_cache_insert: token %d element %d: cache holds %g, want %g", i, d, got, want);
    }
  }
}

/* ------------------------------------------------------------ k2q (CSR) */

void csr_free(csr_t *c) {
  free(c->rp);
  free(c->qi);
  free(c->qs);
  free(c->qc);
  free(c->row_req);
  free(c->row_blk);
}

/* CSR of the top-k rows read from tk (or of host selections sel when tk is
 * NULL); rows ascending, query rows ascending inside a row. */
void csr_build(csr_t *o, int hkv, int K, const bat *B, const targ *tk, const int32_t *sel) {
  memset(o, 0, sizeof *o);
  int64_t R = 0;
  for (int r = 0; r < B->num_reqs; r++)
    R += need_pages(B->s[r]);
  o->R = R;
  o->cap = (int64_t)B->T * K;
  o->rp = (int32_t *)calloc((size_t)(hkv * (R + 1)), 4);
  o->qi = (int32_t *)calloc((size_t)(hkv * o->cap + 1), 4);
  o->qs = (int32_t *)calloc((size_t)(hkv * o->cap + 1), 4);
  o->qc = (int32_t *)calloc((size_t)(B->T * hkv + 1), 4);
  o->row_req = (int64_t *)calloc((size_t)R + 1, 8);
  o->row_blk = (int64_t *)calloc((size_t)R + 1, 8);
  int64_t row = 0;
  for (int r = 0; r < B->num_reqs; r++)
    for (int64_t b = 0; b < need_pages(B->s[r]); b++, row++)
      o->row_req[row] = r, o->row_blk[row] = b;
  for (int g = 0; g < hkv; g++) {
    int32_t *rp = o->rp + g * (R + 1);
    for (int pass = 0; pass < 2; pass++) {
      int64_t base = 0;
      int32_t *fill = pass ? (int32_t *)calloc((size_t)R + 1, 4) : NULL;
      for (int r = 0; r < B->num_reqs; r++) {
        for (int64_t i = 0; i < B->n[r]; i++) {
          int64_t t = B->row0[r] + i, pos = bpos(B, r, i);
          int64_t nb = pos >= 0 ? pos / BS + 1 : 0, kk = nb < K ? nb : K;
          if (sel)
            kk = pos >= 0 ? K : 0;
          int cnt = 0;
          for (int64_t k = 0; k < kk; k++) {
            int32_t id = sel ? sel[(t * hkv + g) * K + k] : (int32_t)tgeti(tk, I4(t, g, k, 0));
            if (id < 0)
              continue;
            cnt++;
            int64_t rw = base + id;
            if (pass == 0)
              rp[rw + 1]++;
            else {
              int64_t at = rp[rw] + fill[rw]++;
              o->qi[g * o->cap + at] = (int32_t)t;
              o->qs[g * o->cap + at] = cnt - 1;
            }
          }
          if (pass)
            o->qc[t * hkv + g] = cnt;
        }
        base += need_pages(B->s[r]);
      }
      if (pass == 0)
        for (int64_t x = 0; x < R; x++)
          rp[x + 1] += rp[x];
      free(fill);
    }
  }
}

