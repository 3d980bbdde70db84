/* ops_misc.c -- operations: tensor views (narrow), misc API calls, plan_step,
 * the k2q chain. */
#include "fuzz.h"

void op_narrow(void) {
  static unsigned char mem[256];
  m3s_tensor t;
  memset(&t, 0, sizeof t);
  t.ndim = rpick(8) - 2;
  t.dtype = (m3s_dtype)(rpick(9) - 1);
  t.data = rchance(50) ? mem : NULL;
  for (int i = 0; i < 4; i++) {
    t.shape[i] = rchance(30) ? pick_i64() : rpick(10);
    t.stride[i] = rchance(30) ? pick_i64() : rpick(10);
  }
  int64_t start = rchance(30) ? pick_i64() : rpick(12), len = rchance(30) ? pick_i64() : rpick(12);
  int null_t = rchance(3);
  if (AVOID(6)) { /* known bug 6: signed overflow inside m3s_tensor_narrow */
    if (t.shape[0] < 0)
      t.shape[0] = 0;
    if (t.data && (t.stride[0] > 64 || t.stride[0] < -64))
      t.stride[0] = 1;
    if (t.data && t.shape[0] > ((int64_t)1 << 40))
      t.shape[0] = (int64_t)1 << 40;
  }
  if (rchance(30)) { /* m3s_tensor_make: contiguous strides of any shape */
    int nd = t.ndim;
    int64_t sh[4];
    for (int i = 0; i < 4; i++) {
      sh[i] = t.shape[i];
      if (AVOID(6) && (sh[i] > 4096 || sh[i] < 0))
        sh[i] = 4096;
    }
    g_fn = "m3s_tensor_make";
    S.calls++;
    S.op_calls[g_opi]++;
    m3s_tensor m = m3s_tensor_make(t.data, t.dtype, nd, rchance(5) ? NULL : sh, M3S_HOST);
    if (nd < 0 || nd > M3S_MAX_DIMS) {
      if (m.ndim != -1 || m.data)
        die("m3s_tensor_make(ndim %d) did not give the invalid view", nd);
    } else if (m.ndim == nd) {
      __int128 want = 1;
      for (int i = nd - 1; i >= 0; i--) {
        if (m.stride[i] != (int64_t)want && want <= INT64_MAX && want >= INT64_MIN)
          die("m3s_tensor_make: stride[%d] = %lld, want %lld", i, (long long)m.stride[i],
              (long long)want);
        want *= sh[i];
        if (want > INT64_MAX || want < INT64_MIN)
          break;
      }
    }
    return;
  }
  int ndim_ok = t.ndim >= 1 && t.ndim <= M3S_MAX_DIMS;
  /* the byte offset of the new first row must be representable: a view whose
   * pointer would overflow is refused (the invalid view), never wrapped */
  int64_t byte_off;
  int off_ok = !__builtin_mul_overflow(start, t.stride[0], &byte_off) &&
               !__builtin_mul_overflow(byte_off, (int64_t)m3s_dtype_size(t.dtype), &byte_off);
  int valid =
      !null_t && ndim_ok && start >= 0 && len >= 0 && (__int128)start + len <= t.shape[0] && off_ok;
  g_fn = "m3s_tensor_narrow";
  S.calls++;
  S.op_calls[g_opi]++;
  m3s_tensor r = m3s_tensor_narrow(null_t ? NULL : &t, start, len);
  if (g_trace)
    fprintf(stderr, "[m3s-fuzz] %-18s %-24s expect %-4s -> %2d (view ndim %d)\n", g_op, g_fn,
            valid ? "OK" : "FAIL", r.ndim < 0 ? (int)M3S_ERR_INVALID : 0, r.ndim);
  if (!valid) {
    S.rejected++;
    S.op_rej[g_opi]++;
    S.must_fail++;
    if (r.ndim != -1 || r.data)
      die("m3s_tensor_narrow(ndim %d, shape[0] %lld, start %lld, len %lld): invalid arguments "
          "gave ndim %d data %p, want the invalid view",
          t.ndim, (long long)t.shape[0], (long long)start, (long long)len, r.ndim, r.data);
    return;
  }
  S.ok++;
  S.must_ok++;
  if (r.ndim != t.ndim || r.shape[0] != len || r.dtype != t.dtype || r.device != t.device)
    die("m3s_tensor_narrow: wrong view (ndim %d shape[0] %lld)", r.ndim, (long long)r.shape[0]);
  for (int i = 1; i < t.ndim; i++)
    if (r.shape[i] != t.shape[i] || r.stride[i] != t.stride[i])
      die("m3s_tensor_narrow changed dimension %d", i);
  if (!t.data) {
    if (r.data)
      die("m3s_tensor_narrow of a NULL view gave data %p", r.data);
    return;
  }
  __int128 off = (__int128)start * t.stride[0] * (__int128)m3s_dtype_size(t.dtype);
  __int128 got = (__int128)((intptr_t)r.data - (intptr_t)t.data);
  if (off == got)
    return;
  die("m3s_tensor_narrow: data moved by %lld bytes, want %lld", (long long)got, (long long)off);
}

/* ----------------------------------------------------------------- misc */
int g_log_calls;
void log_cb(int level, const char *msg, void *user) {
  (void)level;
  (void)user;
  if (!msg)
    die("log callback got a NULL message");
  g_log_calls++;
}

void op_misc(void) {
  int ex = 0;
  switch (rpick(7)) {
  case 0: { /* m3s_query_support */
    cfg_t C;
    gen_cfg(&C, &ex);
    m3s_support_query q;
    memset(&q, 0, sizeof q);
    q.op = (m3s_op)(!rchance(20) ? rpick(M3S_OP_MERGE_N + 1) : (int)rb32());
    q.act_dtype = (m3s_dtype)(!rchance(20) ? rpick(7) : (int)rb32());
    q.kv_dtype = (m3s_dtype)(!rchance(20) ? rpick(7) : (int)rb32());
    q.index_dtype = (m3s_dtype)(!rchance(20) ? rpick(7) : (int)rb32());
    q.per_slot_scales = (int)rb32();
    q.layout = (m3s_cache_layout)(!rchance(20) ? rpick(3) : (int)rb32());
    buf_t *qb = balloc("query", sizeof q), *ib = balloc("info", sizeof(m3s_support_info));
    if (g_skip)
      return;
    memcpy(qb->data, &q, sizeof q);
    m3s_support_query *qp = (m3s_support_query *)qb->data;
    m3s_support_info *ip = (m3s_support_info *)ib->data;
    if (rchance(5))
      qp = NULL, ex |= EX_FAIL;
    if (rchance(5))
      ip = NULL, ex |= EX_FAIL;
    if ((unsigned)q.op > (unsigned)M3S_OP_MERGE_N || (unsigned)q.layout > 2u)
      ex |= EX_FAIL;
    m3s_context *ctx = pick_ctx(&ex);
    for (int i = 0; i < g_nb; i++)
      g_b[i].out = &g_b[i] == ib;
    m3s_status st = CALL("m3s_query_support", ex, m3s_query_support(ctx, C.p, qp, ip));
    if (st)
      return;
    allow_elem(&(targ){.t = {.data = ib->data, .dtype = M3S_E4M3}, .b = ib}, 0);
    memset(ib->allow, 1, ib->bytes);
    check_allowed();
    m3s_support_info *inf = ip;
    if (!memchr(inf->kernel, 0, sizeof inf->kernel) || !memchr(inf->reason, 0, sizeof inf->reason))
      die("query_support: kernel or reason is not NUL-terminated");
    int sup = (unsigned)q.act_dtype <= 6u && (ACT & MASK(q.act_dtype)) &&
              (unsigned)q.kv_dtype <= 6u && (KV_MASK & MASK(q.kv_dtype)) &&
              (unsigned)q.index_dtype <= 6u && (IDX_MASK & MASK(q.index_dtype));
    if (inf->supported != sup || (sup && !inf->kernel[0]) || (!sup && !inf->reason[0]) ||
        (sup && inf->reason[0]))
      die("query_support(act %d kv %d idx %d): supported %d kernel \"%s\" reason \"%s\", want "
          "supported %d",
          (int)q.act_dtype, (int)q.kv_dtype, (int)q.index_dtype, inf->supported, inf->kernel,
          inf->reason, sup);
    break;
  }
  case 1: { /* m3s_config_validate */
    cfg_t C;
    gen_cfg(&C, &ex);
    CALL("m3s_config_validate", ex, m3s_config_validate(C.p));
    break;
  }
  case 2: { /* m3s_workspace_size */
    cfg_t C;
    gen_cfg(&C, &ex);
    int64_t mt = rchance(20) ? pick_i64() : rpick(1000),
            ms = rchance(20) ? pick_i64() : rpick(5000);
    if (mt < 0 || ms < 0)
      ex |= EX_FAIL;
    buf_t *ob = balloc("out_bytes", sizeof(size_t));
    size_t *op = (size_t *)ob->data;
    if (rchance(5))
      op = NULL, ex |= EX_FAIL;
    m3s_context *ctx = pick_ctx(&ex);
    ob->out = 1;
    m3s_status st = CALL("m3s_workspace_size", ex, m3s_workspace_size(ctx, C.p, mt, ms, op));
    if (st == M3S_OK) {
      memset(ob->allow = (unsigned char *)calloc(ob->bytes, 1), 1, ob->bytes);
      check_allowed();
      if (*op != 0)
        die("m3s_workspace_size on the CPU: %zu bytes, want 0", *op);
    }
    break;
  }
  case 3: { /* m3s_k2q_csr_rows */
    bat B;
    gen_batch_desc(&B, 0, 4, 1, 4);
    bat *L[1] = {&B};
    assign_pages(L, 1);
    B.cp_pol = CP_ANY; /* rows are global under cp too */
    mk_batch(&B, 0, 0, 1, &ex);
    buf_t *ob = balloc("out_rows", sizeof(int64_t));
    int64_t *op = (int64_t *)ob->data;
    if (rchance(5))
      op = NULL, ex |= EX_FAIL;
    m3s_context *ctx = pick_ctx(&ex);
    if (g_skip)
      return;
    for (int i = 0; i < g_nb; i++)
      g_b[i].out = &g_b[i] == ob;
    m3s_status st = CALL("m3s_k2q_csr_rows", ex | cp_ex(&B), m3s_k2q_csr_rows(ctx, B.p, op));
    cp_check(&B, ex, st);
    if (st == M3S_OK) {
      memset(ob->allow = (unsigned char *)calloc(ob->bytes, 1), 1, ob->bytes);
      check_allowed();
      int64_t R = 0;
      for (int r = 0; r < B.num_reqs; r++)
        R += need_pages(B.s[r]);
      if (!ex && *op != R)
        die("m3s_k2q_csr_rows = %lld, want %lld", (long long)*op, (long long)R);
    }
    break;
  }
  case 4: { /* strings, sizes, presets: never NULL, never crash */
    int v = rchance(50) ? (int)rb32() : rpick(20) - 3;
    const char *s1 = m3s_status_string((m3s_status)v);
    const char *s2 = m3s_dtype_name((m3s_dtype)v);
    if (!s1 || !s1[0] || !s2 || !s2[0])
      die("m3s_status_string / m3s_dtype_name(%d) returned NULL or \"\"", v);
    size_t z = m3s_dtype_size((m3s_dtype)v);
    if ((v < 0 || v > 6) ? z != 0 : z == 0)
      die("m3s_dtype_size(%d) = %zu", v, z);
    m3s_layer_config c = m3s_config_minimax_m3(v);
    int good = v == 1 || v == 2 || v == 4 || v == 8;
    m3s_status st = m3s_config_validate(&c);
    if ((st == M3S_OK) != good)
      die("m3s_config_minimax_m3(%d) validates as %d", v, (int)st);
    if (strcmp(m3s_version(), M3S_VERSION) || m3s_version_number() != M3S_VERSION_NUMBER)
      die("version mismatch");
    if (m3s_context_device(g_ctx) >= 0 || m3s_context_device(NULL) != -2)
      die("m3s_context_device");
    break;
  }
  case 5: { /* logging on the CPU context: set, use, reset */
    int level = rchance(30) ? (int)rb32() : rpick(6) - 1;
    ex = (level < 0 || level > 3) ? EX_FAIL : 0;
    m3s_context *ctx = pick_ctx(&ex);
    CALL("m3s_context_set_logging", ex,
         m3s_context_set_logging(ctx, level, rchance(50) ? log_cb : NULL, NULL));
    m3s_context_set_logging(g_ctx, 0, NULL, NULL);
    /* context options: set, read back, reset (no effect on the CPU) */
    int opt = rchance(20) ? (int)rb32() : (int)M3S_OPT_BATCH_INVARIANT;
    int64_t val = rchance(30) ? (int64_t)(int32_t)rb32() : (int64_t)rpick(3);
    ex = (opt != (int)M3S_OPT_BATCH_INVARIANT || (val != 0 && val != 1)) ? EX_FAIL : 0;
    ctx = pick_ctx(&ex);
    CALL("m3s_context_set_option", ex, m3s_context_set_option(ctx, (m3s_option)opt, val));
    int64_t got = -1;
    if (ex == 0 &&
        (m3s_context_get_option(g_ctx, M3S_OPT_BATCH_INVARIANT, &got) != M3S_OK || got != val))
      die("m3s_context_get_option read %lld after setting %lld", (long long)got, (long long)val);
    m3s_context_set_option(g_ctx, M3S_OPT_BATCH_INVARIANT, 0);
    break;
  }
  case 6: { /* contexts: CUDA ordinals fail cleanly in this build; create/destroy */
    int dev = rchance(50) ? rpick(4) : -1 - rpick(3);
    buf_t *ob = balloc("out_ctx", sizeof(m3s_context *));
    m3s_context **op = (m3s_context **)ob->data;
    if (rchance(10))
      op = NULL;
    ex = (dev >= 0 || !op) ? EX_FAIL : 0;
    ob->out = 1;
    m3s_status st = CALL("m3s_context_create", ex, m3s_context_create(dev, op));
    if (st == M3S_OK) {
      memset(ob->allow = (unsigned char *)calloc(ob->bytes, 1), 1, ob->bytes);
      check_allowed();
      m3s_context *c2 = *op;
      if (m3s_context_device(c2) >= 0)
        die("a CPU context reports device %d", m3s_context_device(c2));
      m3s_context_destroy(c2);
    } else if (dev >= 0 && op && st != M3S_ERR_UNSUPPORTED) {
      die("m3s_context_create(%d) without CUDA returned %d, want M3S_ERR_UNSUPPORTED", dev,
          (int)st);
    }
    m3s_context_destroy(NULL);
    break;
  }
  default: break;
  }
}

/* ------------------------------------------------------------ plan_step */
int ref_count_decodes(int n, const int32_t *ql, int spec) {
  int thr = 1 + spec;
  if (n == 0 || ql[0] > thr)
    return 0;
  int all = 1;
  for (int r = 0; r < n; r++)
    all &= ql[r] == ql[0] || ql[r] == 0;
  if (all)
    return n;
  int r = 0;
  while (r < n && ql[r] == ql[0])
    r++;
  return r;
}

void op_plan(void) {
  int ex = 0;
  cfg_t C;
  gen_cfg(&C, &ex);
  int bulk = rchance(4); /* very many requests: 32-bit token counts */
  int n = bulk ? (int)(rb32() % 4200000u) : rpick(10);
  int spec = !rchance(20) ? rpick(4) : rchance(50) ? 1024 - rpick(3) : (int)rb16() - 100;
  if (bulk && AVOID(2) && (int64_t)n * (1 + (spec > 0 ? spec : 0)) > ((int64_t)1 << 30))
    n = (int)(((int64_t)1 << 30) / (1 + (spec > 0 ? spec : 0))); /* known bug 2 */
  buf_t *qb = balloc("desc.query_lens", sizeof(int32_t) * (size_t)n);
  buf_t *sb = balloc("desc.seq_lens", sizeof(int32_t) * (size_t)n);
  buf_t *pb = balloc("plan", sizeof(m3s_step_plan));
  if (g_skip)
    return;
  int32_t *ql = (int32_t *)qb->data, *sl = (int32_t *)sb->data;
  if (bulk) {
    int32_t q0 = (int32_t)(rchance(50) ? 1 + spec : rpick(3000));
    int32_t s0 = q0 + (int32_t)rpick(5000);
    for (int r = 0; r < n; r++)
      ql[r] = q0, sl[r] = s0;
    if (n > 0 && rchance(50))
      ql[n - 1] = 2 + spec + rpick(5), sl[n - 1] = ql[n - 1] + 7;
  } else {
    for (int r = 0; r < n; r++) {
      int kind = rpick(4);
      ql[r] = kind == 0 ? 1 + spec : kind == 1 ? rpick(3000) : kind == 2 ? 0 : 1 + rpick(4);
      sl[r] = ql[r] == 0 ? 0 : ql[r] + rpick(5000);
      if (rchance(5))
        sl[r] = rchance(50) ? 0 : ql[r] - 1;
      if (rchance(3))
        ql[r] = -1 - rpick(3);
      if (rchance(3))
        sl[r] = rchance(50) ? -1 : (1 << 30) + 1 + rpick(10);
    }
  }
  m3s_step_desc d = {n, ql, sl, spec};
  if (rchance(3))
    d.num_reqs = -1 - rpick(3);
  if (rchance(3) && n > 0)
    rchance(50) ? (d.query_lens = NULL) : (d.seq_lens = NULL);
  /* expected validity (plan.c's rules, from the header and SPEC 5) */
  int valid = d.num_reqs >= 0 && spec >= 0 && spec <= 1024 &&
              (d.num_reqs == 0 || (d.query_lens && d.seq_lens));
  int64_t tp = 0;
  for (int r = 0; valid && r < n; r++) {
    if (ql[r] < 0 || sl[r] < 0 || sl[r] > (1 << 30) || (sl[r] != 0 && sl[r] < ql[r]) ||
        (ql[r] == 0 && sl[r] != 0))
      valid = 0;
  }
  int nd = valid ? ref_count_decodes(n, ql, spec) : 0;
  int dq = valid && nd > 0 && ql[0] > 0 ? ql[0] : 1 + spec;
  for (int r = nd; valid && r < n; r++)
    tp += ql[r];
  if (valid && tp + (int64_t)nd * dq > ((int64_t)1 << 30))
    valid = 0;
  ex |= valid ? 0 : EX_FAIL;
  m3s_step_plan *pp = (m3s_step_plan *)pb->data;
  if (rchance(3))
    pp = NULL, ex |= EX_FAIL;
  m3s_context *ctx = pick_ctx(&ex);
  for (int i = 0; i < g_nb; i++)
    g_b[i].out = &g_b[i] == pb;
  m3s_status st = CALL("m3s_plan_step", ex, m3s_plan_step(ctx, C.p, &d, pp));
  if (st)
    return;
  memset(pb->allow = (unsigned char *)calloc(pb->bytes, 1), 1, pb->bytes);
  check_allowed();
  if (ex)
    return;
  m3s_step_plan p = *pp;
  int64_t ms = 0, rows = 0, mpq = 0;
  for (int r = 0; r < n; r++)
    ms = sl[r] > ms ? sl[r] : ms;
  for (int r = nd; r < n; r++) {
    rows += need_pages(sl[r]);
    mpq = ql[r] > mpq ? ql[r] : mpq;
  }
  if (p.num_decodes != nd || p.num_prefills != n - nd || p.decode_q_len != dq ||
      p.num_decode_tokens != (int64_t)nd * dq || p.num_prefill_tokens != tp ||
      p.num_tokens != (int64_t)nd * dq + tp || p.max_prefill_q_len != mpq || p.max_seq_len != ms ||
      p.csr_rows != rows || p.workspace_bytes != 0)
    die("plan_step(%d requests, spec %d): decodes %d/%d q_len %d/%d dtok %d ptok %d/%lld "
        "max_seq %lld/%lld rows %lld/%lld",
        n, spec, p.num_decodes, nd, p.decode_q_len, dq, p.num_decode_tokens, p.num_prefill_tokens,
        (long long)tp, (long long)p.max_seq_len, (long long)ms, (long long)p.csr_rows,
        (long long)rows);
}

/* ------------------------------------------------------ k2q chain (SPEC 7) */
/* sparse attention vs CSR + k2q partials + combine on the same valid input */
void op_chain(void) {
  int ex = 0;
  attn_fx F;
  memset(&F, 0, sizeof F);
  gen_cfg(&F.C, &ex);
  if (ex)
    return;
  safe_dims(&F.C.c, &F.hq, &F.hkv, &F.K);
  bat B;
  gen_batch_desc(&B, 0, F.hq, F.hkv, F.K);
  bat *L[1] = {&B};
  assign_pages(L, 1);
  F.nice = 1;
  int e0 = 0;
  /* no mutations: everything below must be accepted */
  size_t save = g_in_n;
  g_in_n = g_in_i; /* the rest of the decoding reads zeros: nominal, valid */
  mk_batch(&B, 1, 0, 0, &e0);
  mk_q_kv(&F, B.T, B.P, &e0);
  tspec stk = {"topk", M3S_I32, MASK(M3S_I32), 3, {B.T, F.hkv, F.K}, 0, 0, 0, 1, 0, NULL, 0};
  mk(&F.tk, &stk, &e0);
  mk_out_lse(&F, B.T, &e0);
  g_in_n = save;
  fill_kv(&B, &F.kv, F.hkv, 1, 1);
  fill_topk_input(F.hkv, F.K, &B, &F.tk, 0, &e0);
  int hkv = F.hkv, K = F.K, hq = F.hq, T = B.T;
  int64_t R = 0;
  for (int r = 0; r < B.num_reqs; r++)
    R += need_pages(B.s[r]);
  targ rp, qi, qs, qc, po, pl, o2, l2;
  mk_out(&rp, "row_ptr", M3S_I32, 2, hkv, R + 1, 0, 0);
  mk_out(&qi, "q_indices", M3S_I32, 2, hkv, (int64_t)T * K, 0, 0);
  mk_out(&qs, "q_slot", M3S_I32, 2, hkv, (int64_t)T * K, 0, 0);
  mk_out(&qc, "q_count", M3S_I32, 2, T, hkv, 0, 0);
  mk_out(&po, "part_out", M3S_F32, 4, T, hq, K, D);
  mk_out(&pl, "part_lse", M3S_F32, 3, T, hq, K, 0);
  mk_out(&o2, "out(k2q)", F.adt, 3, T, hq, D, 0);
  mk_out(&l2, "lse(k2q)", M3S_F32, 2, T, hq, 0, 0);
  if (g_skip || e0 || T == 0)
    return;
  for (targ *a = &qi; a; a = a == &qi ? &qs : NULL) /* the library's strides for [Hkv, 0] */
    if (a->t.shape[1] == 0)
      a->t.stride[0] = 0;
  OUTPUTS(&F.out, &F.lse);
  CALL("m3s_sparse_attention", 0,
       m3s_sparse_attention(g_ctx, &F.C.c, &B.b, &F.q.t, &F.kv.t, F.sc.p, &F.tk.t, &F.out.t,
                            &F.lse.t, NULL));
  OUTPUTS(&rp, &qi, &qs, &qc);
  CALL("m3s_build_k2q_csr", 0,
       m3s_build_k2q_csr(g_ctx, &F.C.c, &B.b, &F.tk.t, &rp.t, &qi.t, &qs.t, &qc.t, NULL));
  OUTPUTS(&po, &pl);
  CALL("m3s_k2q_attention", 0,
       m3s_k2q_attention(g_ctx, &F.C.c, &B.b, &F.q.t, &F.kv.t, F.sc.p, &rp.t, &qi.t, &qs.t, &po.t,
                         &pl.t, NULL));
  OUTPUTS(&o2, &l2);
  CALL("m3s_combine_partials", 0,
       m3s_combine_partials(g_ctx, &F.C.c, &po.t, &pl.t, &qc.t, &o2.t, &l2.t, NULL));
  if (!F.C.nice || !F.sc.nice || g_alias_in)
    return;
  double e2 = 0, r2 = 0;
  for (int t = 0; t < T; t++)
    for (int h = 0; h < hq; h++) {
      double l1 = tgetf(&F.lse, I4(t, h, 0, 0)), lk = tgetf(&l2, I4(t, h, 0, 0));
      if (!(l1 == lk || fabs(l1 - lk) <= 1e-4 * (1 + fabs(l1))))
        die("k2q chain: row %d head %d: lse %.9g (k2q + combine) vs %.9g (sparse_attention)", t, h,
            lk, l1);
      for (int d = 0; d < D; d++) {
        double a = tgetf(&F.out, I4(t, h, d, 0)), b = tgetf(&o2, I4(t, h, d, 0));
        e2 += (a - b) * (a - b);
        r2 += a * a;
      }
    }
  S.ref_rows += (unsigned long long)T;
  if (!(e2 <= 1e-4 * r2 + 1e-8))
    die("k2q chain: k2q + combine differ from sparse_attention: rel L2 %.3g",
        sqrt(e2 / (r2 + 1e-300)));
}
