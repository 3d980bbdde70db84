/* ops_topk_attn.c -- operations: index top-k, sparse attention, the whole
 * step. */
#include "fuzz.h"

/* operations                                                               */
/* ======================================================================== */

/* sizes that are safe for allocation even when the config is invalid */
void safe_dims(const m3s_layer_config *c, int *hq, int *hkv, int *K) {
  *hkv = c->num_kv_heads >= 1 && c->num_kv_heads <= 16 ? c->num_kv_heads : 1;
  *hq = c->num_q_heads >= 1 && c->num_q_heads <= 64 ? c->num_q_heads : *hkv;
  *K = c->topk >= 1 && c->topk <= M3S_MAX_TOPK ? c->topk : 4;
}

m3s_tensor tnarrow(const targ *a, int64_t start, int64_t len) {
  m3s_tensor r = m3s_tensor_narrow(&a->t, start, len);
  if (r.ndim < 0)
    die("harness: m3s_tensor_narrow(%s, %lld, %lld) failed", a->name, (long long)start,
        (long long)len);
  return r;
}

/* A fresh, valid output tensor (no mutation). */
void mk_out(targ *a, const char *name, m3s_dtype dt, int nd, int64_t s0, int64_t s1,
                   int64_t s2, int64_t s3) {
  int ex = 0;
  tspec sp = {name, dt, MASK(dt), nd, {s0, s1, s2, s3}, 1, 0, 0, 1, 0, NULL, 0};
  mk(a, &sp, &ex);
}

void cmp_bits(const targ *a, int64_t ra, const targ *b, int64_t rb_, int64_t rows,
                     const char *what) {
  int64_t sh[4] = {1, 1, 1, 1};
  for (int d = 1; d < a->ndim; d++)
    sh[d] = a->t.shape[d];
  size_t es = esz(a->t.dtype);
  for (int64_t i = 0; i < rows; i++)
    for (int64_t x = 0; x < sh[1]; x++)
      for (int64_t y = 0; y < sh[2]; y++)
        for (int64_t z = 0; z < sh[3]; z++) {
          void *pa = tptr(a, I4(ra + i, x, y, z)), *pb = tptr(b, I4(rb_ + i, x, y, z));
          if (pa && pb && memcmp(pa, pb, es) != 0)
            die("%s: row %lld [%lld][%lld][%lld] differs bitwise from row %lld of the other call",
                what, (long long)(ra + i), (long long)x, (long long)y, (long long)z,
                (long long)(rb_ + i));
        }
}

/* The batch made of request r alone, through narrowed views. */
void narrow_or_keep(m3s_tensor *t, int64_t start, int64_t len) {
  int64_t x;
  if (AVOID(6) && t->ndim >= 1 && t->ndim <= 4 && t->data &&
      (__builtin_mul_overflow(start, t->stride[0], &x) ||
       __builtin_mul_overflow(x, (int64_t)m3s_dtype_size(t->dtype), &x)))
    return; /* known bug 6 (an unused, dishonest view) */
  m3s_tensor n = m3s_tensor_narrow(t, start, len);
  if (n.ndim >= 0) /* (tensors the operation does not read may be anything) */
    *t = n;
}
m3s_batch sub_batch(const bat *B, int r) {
  m3s_batch sb = B->b;
  sb.num_reqs = 1;
  sb.num_tokens = B->n[r];
  sb.seq_lens = tnarrow(&B->ts, r, 1);
  if (!B->uniform)
    sb.query_start_loc = tnarrow(&B->tq, r, 2);
  narrow_or_keep(&sb.block_table, r, 1);
  narrow_or_keep(&sb.index_block_table, r, 1);
  return sb;
}
int pick_req(const bat *B) {
  int r0 = -1;
  for (int r = 0; r < B->num_reqs; r++)
    if (B->n[r] > 0 && (r0 < 0 || rndn(2)))
      r0 = r;
  return r0;
}

/* ---------------------------------------------------------------- top-k */
void op_index_topk(void) {
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
  B.cp_pol = CP_REFUSE; /* a rank's table is not the whole cache */
  mk_batch(&B, 0, 1, 1, &ex);
  tspec siq = {"iq", adt, ACT, 3, {B.T, hkv, D}, 0, 0, 0, 1, 8, NULL, 0};
  tspec sic = {"index_cache", idt, IDX_MASK, 3, {B.Pi, BS, D}, 0, 1, 1u, 1, 8, NULL, 0};
  tspec stk = {"topk", M3S_I32, MASK(M3S_I32), 3, {B.T, hkv, K}, 1, 0, 0, 1, 8, PERM_HM, 0};
  targ iq, ic, tk;
  mk(&iq, &siq, &ex);
  mk(&ic, &sic, &ex);
  mk(&tk, &stk, &ex);
  fill_act(&iq, nice, inject);
  fill_ic(&B, &ic, nice, inject, 1);
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip)
    return;
  OUTPUTS(&tk);
  m3s_status st =
      CALL("m3s_index_topk", ex | cp_ex(&B), m3s_index_topk(ctx, C.p, B.p, iq.p, ic.p, tk.p, e));
  cp_check(&B, ex, st);
  if (st)
    return;
  allow_view(&tk);
  check_allowed();
  if (ex)
    return;
  check_topk_rows(&C.c, &B, &iq, &ic, &tk, 0, nice && !g_alias_in);
  int r = pick_req(&B);
  if (r >= 0 && B.num_reqs > 1 && rndn(5) < 2) { /* the request alone gives the same rows */
    S.indep++;
    m3s_batch sb = sub_batch(&B, r);
    m3s_tensor iq2 = tnarrow(&iq, B.row0[r], B.n[r]);
    targ tk2;
    mk_out(&tk2, "topk(alone)", M3S_I32, 3, B.n[r], hkv, K, 0);
    if (g_skip)
      return;
    OUTPUTS(&tk2);
    CALL("m3s_index_topk(alone)", 0, m3s_index_topk(g_ctx, &C.c, &sb, &iq2, &ic.t, &tk2.t, NULL));
    allow_view(&tk2);
    check_allowed();
    cmp_bits(&tk2, 0, &tk, B.row0[r], B.n[r], "index_topk: request alone vs in its batch");
  }
}

/* ------------------------------------------------------------ attention */

/* q, kv (+ scales) for batches sharing one page pool */
void mk_q_kv(attn_fx *F, int64_t T, int64_t P, int *ex) {
  F->adt = rchance(30) ? M3S_F16 : M3S_BF16;
  F->kdt = KV_DT[rpick(4)];
  tspec sq = {"q", F->adt, ACT, 3, {T, F->hq, D}, 0, 0, 0, 1, 8, NULL, 0};
  tspec skv = {"kv_cache", F->kdt, KV_MASK, 4, {P, F->hkv, BS, 2 * D}, 0, 0, 1u, 1, 8, PERM_TM, 0};
  mk(&F->q, &sq, ex);
  mk(&F->kv, &skv, ex);
  gen_scales(&F->sc, F->kdt, F->hkv, P, F->nice, ex);
  int fp8 = F->kdt == M3S_E4M3 || F->kdt == M3S_E5M2;
  if (F->kv.mut == M_HUGE && fp8 && F->sc.p) {
    if (AVOID(1) && F->kv.t.shape[0] >= ((int64_t)1 << 55))
      F->kv.t.shape[0] = ((int64_t)1 << 55) - 1; /* known bug 1: P * 128 overflows */
    if (F->sc.mode[0] == 2 || F->sc.mode[1] == 2)
      *ex |= EX_FAIL; /* the per-slot scales no longer match P * 128 */
  }
  fill_act(&F->q, F->nice, 0);
}

void mk_out_lse(attn_fx *F, int64_t T, int *ex) {
  tspec so = {"out", F->adt, MASK(F->adt), 3, {T, F->hq, D}, 1, 0, 0, 1, 8, NULL, 0};
  tspec sl = {"lse", M3S_F32, MASK(M3S_F32), 2, {T, F->hq}, 1, 0, 0, 1, 8, NULL, 1};
  mk(&F->out, &so, ex);
  if (rchance(30))
    memset(&F->lse, 0, sizeof F->lse); /* no lse (p == NULL) */
  else
    mk(&F->lse, &sl, ex);
}

/* Config, one batch (pages assigned, tensors made) and q / kv for the
 * attention-shaped operations; input bytes are read in this fixed order. */
void attn_one_batch(attn_fx *F, bat *B, int *ex, int cp_pol) {
  memset(F, 0, sizeof *F);
  gen_cfg(&F->C, ex);
  safe_dims(&F->C.c, &F->hq, &F->hkv, &F->K);
  gen_batch_desc(B, 0, F->hq, F->hkv, F->K);
  bat *L[1] = {B};
  assign_pages(L, 1);
  F->nice = !rchance(20);
  B->cp_pol = cp_pol;
  mk_batch(B, 1, 0, 1, ex);
  mk_q_kv(F, B->T, B->P, ex);
}

void op_attention(void) {
  int ex = 0;
  attn_fx F;
  bat B;
  attn_one_batch(&F, &B, &ex, CP_RANK);
  tspec stk = {"topk", M3S_I32, MASK(M3S_I32), 3, {B.T, F.hkv, F.K}, 0, 0, 0, 1, 8, PERM_HM, 0};
  mk(&F.tk, &stk, &ex);
  mk_out_lse(&F, B.T, &ex);
  fill_kv(&B, &F.kv, F.hkv, F.nice, 1);
  if (F.nice) /* a rank reads only its own blocks */
    poison_unowned(&B, &F.kv, F.hkv, 0);
  fill_topk_input(F.hkv, F.K, &B, &F.tk, 0, &ex);
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip)
    return;
  OUTPUTS(&F.out, &F.lse);
  m3s_status st = CALL(
      "m3s_sparse_attention", ex | cp_ex(&B),
      m3s_sparse_attention(ctx, F.C.p, B.p, F.q.p, F.kv.p, F.sc.p, F.tk.p, F.out.p, F.lse.p, e));
  cp_check(&B, ex, st);
  if (st)
    return;
  allow_view(&F.out);
  allow_view(F.lse.p ? &F.lse : NULL);
  check_allowed();
  if (ex)
    return;
  /* under cp: the rank's partial result, over the selected blocks it owns */
  attn_in A = {&F.C.c, &B, &F.q, &F.kv, &F.tk, &F.sc, 0, NULL, &B.b.cp};
  check_attn_rows(&A, &F.out, &F.lse, F.nice && F.C.nice && F.sc.nice && !g_alias_in);
  int r = pick_req(&B);
  if (r >= 0 && B.num_reqs > 1 && rndn(5) < 2) {
    S.indep++;
    m3s_batch sb = sub_batch(&B, r);
    m3s_tensor q2 = tnarrow(&F.q, B.row0[r], B.n[r]);
    m3s_tensor tk2 = tnarrow(&F.tk, B.row0[r], B.n[r]);
    targ o2, l2;
    mk_out(&o2, "out(alone)", F.adt, 3, B.n[r], F.hq, D, 0);
    mk_out(&l2, "lse(alone)", M3S_F32, 2, B.n[r], F.hq, 0, 0);
    if (g_skip)
      return;
    OUTPUTS(&o2, &l2);
    CALL("m3s_sparse_attention(alone)", 0,
         m3s_sparse_attention(g_ctx, &F.C.c, &sb, &q2, &F.kv.t, F.sc.p, &tk2, &o2.t, &l2.t, NULL));
    allow_view(&o2);
    allow_view(&l2);
    check_allowed();
    cmp_bits(&o2, 0, &F.out, B.row0[r], B.n[r], "sparse_attention out: request alone vs batch");
    if (F.lse.p)
      cmp_bits(&l2, 0, &F.lse, B.row0[r], B.n[r], "sparse_attention lse: request alone vs batch");
  }
}

/* ----------------------------------------------------------------- step */
void op_step(void) {
  int ex = 0;
  attn_fx F;
  memset(&F, 0, sizeof F);
  gen_cfg(&F.C, &ex);
  safe_dims(&F.C.c, &F.hq, &F.hkv, &F.K);
  bat Dc, Pf;
  g_budget = WORK_BUDGET / 2;
  gen_batch_desc(&Dc, rchance(20) ? 0 : 1, F.hq, F.hkv, F.K);
  gen_batch_desc(&Pf, rchance(20) ? 0 : 2, F.hq, F.hkv, F.K);
  g_budget = WORK_BUDGET;
  bat *L[2] = {&Dc, &Pf};
  assign_pages(L, 2);
  F.nice = !rchance(20);
  int inject = F.nice && rchance(20);
  Dc.cp_pol = Pf.cp_pol = CP_REFUSE;
  mk_batch(&Dc, 1, 1, 0, &ex);
  mk_batch(&Pf, 1, 1, 0, &ex);
  int64_t T = Dc.T + Pf.T;
  mk_q_kv(&F, T, Dc.P, &ex);
  m3s_dtype idt = rchance(30) ? M3S_E4M3 : M3S_BF16;
  tspec siq = {"iq", F.adt, ACT, 3, {T, F.hkv, D}, 0, 0, 0, 1, 6, NULL, 0};
  tspec sic = {"index_cache", idt, IDX_MASK, 3, {Dc.Pi, BS, D}, 0, 1, 1u, 1, 6, NULL, 0};
  tspec stk = {"topk", M3S_I32, MASK(M3S_I32), 3, {T, F.hkv, F.K}, 1, 0, 0, 1, 6, PERM_HM, 0};
  targ iq, ic;
  mk(&iq, &siq, &ex);
  mk(&ic, &sic, &ex);
  mk(&F.tk, &stk, &ex);
  mk_out_lse(&F, T, &ex);
  fill_act(&iq, F.nice, inject);
  fill_kv(&Dc, &F.kv, F.hkv, F.nice, 1);
  fill_kv(&Pf, &F.kv, F.hkv, F.nice, 0);
  fill_ic(&Dc, &ic, F.nice, 0, 1);
  fill_ic(&Pf, &ic, F.nice, inject, 0);
  m3s_step step = {Dc.b, Pf.b};
  const m3s_step *sp = &step;
  if (rchance(3))
    sp = NULL, ex |= EX_FAIL;
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip)
    return;
  OUTPUTS(&F.tk, &F.out, &F.lse);
  m3s_status st = CALL("m3s_step_forward", ex | cp_ex(&Dc) | cp_ex(&Pf),
                       m3s_step_forward(ctx, F.C.p, sp, F.q.p, iq.p, F.kv.p, F.sc.p, ic.p, F.tk.p,
                                        F.out.p, F.lse.p, e));
  cp_check(&Dc, ex, st); /* (both parts' cp statuses are M3S_ERR_INVALID) */
  cp_check(&Pf, ex, st);
  if (st)
    return;
  allow_view(&F.tk);
  allow_view(&F.out);
  allow_view(F.lse.p ? &F.lse : NULL);
  check_allowed();
  if (ex)
    return;
  int exact = F.nice && !g_alias_in;
  int numeric = exact && F.C.nice && F.sc.nice;
  bat *parts[2] = {&Dc, &Pf};
  int64_t base[2] = {0, Dc.T};
  for (int k = 0; k < 2; k++) {
    check_topk_rows(&F.C.c, parts[k], &iq, &ic, &F.tk, base[k], exact);
    attn_in A = {&F.C.c, parts[k], &F.q, &F.kv, &F.tk, &F.sc, base[k], NULL, NULL};
    check_attn_rows(&A, &F.out, &F.lse, numeric);
  }
  if (rndn(5) < 2) { /* equals separate calls on the two parts, bit for bit */
    S.indep++;
    for (int k = 0; k < 2; k++) {
      bat *B = parts[k];
      if (B->T == 0)
        continue;
      m3s_tensor iq2 = tnarrow(&iq, base[k], B->T), q2 = tnarrow(&F.q, base[k], B->T);
      targ t2, o2, l2;
      mk_out(&t2, "topk(part)", M3S_I32, 3, B->T, F.hkv, F.K, 0);
      mk_out(&o2, "out(part)", F.adt, 3, B->T, F.hq, D, 0);
      mk_out(&l2, "lse(part)", M3S_F32, 2, B->T, F.hq, 0, 0);
      if (g_skip)
        return;
      OUTPUTS(&t2);
      CALL("m3s_index_topk(part)", 0,
           m3s_index_topk(g_ctx, &F.C.c, &B->b, &iq2, &ic.t, &t2.t, NULL));
      allow_view(&t2);
      check_allowed();
      cmp_bits(&t2, 0, &F.tk, base[k], B->T, "step_forward top-k vs m3s_index_topk");
      OUTPUTS(&o2, &l2);
      CALL("m3s_sparse_attention(part)", 0,
           m3s_sparse_attention(g_ctx, &F.C.c, &B->b, &q2, &F.kv.t, F.sc.p, &t2.t, &o2.t, &l2.t,
                                NULL));
      allow_view(&o2);
      allow_view(&l2);
      check_allowed();
      cmp_bits(&o2, 0, &F.out, base[k], B->T, "step_forward out vs m3s_sparse_attention");
      if (F.lse.p)
        cmp_bits(&l2, 0, &F.lse, base[k], B->T, "step_forward lse vs m3s_sparse_attention");
    }
  }
}

/* -------------------------------------------------------------- inserts */
/* slot values: valid ones in [-3, P*128) (negative = skip), extremes, and one
 * beyond the cache (must be rejected) as a mutation */
void fill_slots(const targ *sl, int64_t T, int64_t P, int64_t *slots, int *ex) {
  for (int64_t i = 0; i < T; i++) {
    int64_t v = rndn(6) == 0 ? -1 - rndn(3) : rndn((int)(P * BS > 0 ? P * BS : 1));
    if (P == 0)
      v = -1;
    if (rndn(20) == 0)
      v = sl->t.dtype == M3S_I64 ? INT64_MIN + rndn(3) : INT32_MIN;
    slots[i] = v;
  }
  if (T > 0 && rchance(10)) {
    int64_t i = rpick((int)T);
    int64_t lim = P * BS;
    slots[i] = rchance(30) && sl->t.dtype == M3S_I64 ? INT64_MAX - rpick(3) : lim + rpick(1000);
    *ex |= EX_FAIL;
  }
  for (int64_t i = 0; i < T; i++)
    tseti(sl, I4(i, 0, 0, 0), slots[i]);
}

/* The token count T is a dimension every per-token operand of an insert
 * shares (ik / k / v dim 0, the slot mapping). A shape mutation of one of
 * them is a mismatch the API must reject, but when every one of them got the
 * same mutation of that dimension and nothing else, the operands agree again:
 * the call is a valid insert of the new count (an empty insert when it is 0)
 * and must succeed. Returns the count the call really has and, in that case,
 * clears the failure bits those shape mutations set (*ex[i] holds only what
 * mk set for a[i]); otherwise returns T and leaves them. */
int64_t agreed_token_count(const targ *const *a, int *const *ex, int n, int64_t T) {
  int64_t t2 = a[0]->t.shape[0];
  for (int i = 0; i < n; i++) {
    if (a[i]->mut != M_SHAPE || a[i]->t.ndim != a[i]->ndim || a[i]->t.shape[0] != t2)
      return T;
    for (int d = 1; d < a[i]->ndim; d++)
      if (a[i]->t.shape[d] != a[i]->shape[d])
        return T; /* another dimension was mutated: still a mismatch */
  }
  for (int i = 0; i < n; i++)
    *ex[i] = 0;
  return t2;
}

