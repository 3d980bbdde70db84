/* m3s-bench: the device state of a case and its timing: inputs, batches, one
 * call of the case's operation, CUDA-graph capture and replays (run_case). */
#include "bench.h"
#include "cuda/sm90/topk_tc.h"

int set_cuda_err(case_result *res, cudaError_t e, const char *what, int line) {
  if (e == cudaSuccess)
    return 1;
  res->status = RES_ERROR;
  snprintf(res->note, sizeof res->note, "%s (line %d): %s", what, line, cudaGetErrorString(e));
  return 0;
}

static int fill_dt(void *p, size_t n, int dt, uint64_t seed, void *stream) {
  return dt == M3S_E4M3 ? m3sb_fill_e4m3(p, n, seed, 1.0f, stream)
                        : m3sb_fill_bf16(p, n, seed, 1.0f, stream);
}

static m3s_tensor dev_tensor(const bench *B, void *p, m3s_dtype dt, int ndim, int64_t d0,
                             int64_t d1, int64_t d2) {
  int64_t shape[3] = {d0, d1, d2};
  return m3s_tensor_make(p, dt, ndim, shape, B->device);
}

static m3s_batch make_batch(const bench *B, const case_state *cs, int s) {
  const geom *g = &cs->g;
  m3s_batch b;
  memset(&b, 0, sizeof b);
  b.num_reqs = g->R;
  b.num_tokens = g->T;
  b.uniform_q_len = op_prefill(g->c.op) ? 0 : g->c.qlen;
  b.max_q_len = g->c.qlen;
  b.max_seq_len = g->max_seq;
  b.query_start_loc = dev_tensor(B, cs->d_qsl, M3S_I32, 1, g->R + 1, 0, 0);
  b.seq_lens = dev_tensor(B, cs->d_seq, M3S_I32, 1, g->R, 0, 0);
  b.block_table = dev_tensor(B, cs->d_bt[s], M3S_I32, 2, g->R, g->maxp, 0);
  b.index_block_table = b.block_table;
  return b;
}

/* Prefill attention by the key-centric schedule (--attn-path k2q): the CSR
 * of the batch's selections, the per-slot partials, their combine. */
static m3s_status run_k2q(const bench *B, case_state *cs, const m3s_batch *b, const m3s_tensor *q,
                          const m3s_kv_scales *sc, const m3s_tensor *tkin, m3s_tensor *out,
                          m3s_tensor *lse, const m3s_exec *ex) {
  const geom *g = &cs->g;
  const int64_t tk = (int64_t)g->T * g->K;
  const int64_t rp_shape[2] = {g->Hkv, cs->csr_rows + 1}, qi_shape[2] = {g->Hkv, tk};
  const int64_t qc_shape[2] = {g->T, g->Hkv};
  const int64_t po_shape[4] = {g->T, g->Hq, g->K, 128}, pl_shape[3] = {g->T, g->Hq, g->K};
  m3s_tensor rp = m3s_tensor_make(cs->d_rp, M3S_I32, 2, rp_shape, B->device);
  m3s_tensor qi = m3s_tensor_make(cs->d_qi, M3S_I32, 2, qi_shape, B->device);
  m3s_tensor qs = m3s_tensor_make(cs->d_qs, M3S_I32, 2, qi_shape, B->device);
  m3s_tensor qc = m3s_tensor_make(cs->d_qc, M3S_I32, 2, qc_shape, B->device);
  m3s_tensor po = m3s_tensor_make(cs->d_po, M3S_F32, 4, po_shape, B->device);
  m3s_tensor pl = m3s_tensor_make(cs->d_pl, M3S_F32, 3, pl_shape, B->device);
  m3s_status st = m3s_build_k2q_csr(B->ctx, &g->cfg, b, tkin, &rp, &qi, &qs, &qc, ex);
  if (st == M3S_OK)
    st = m3s_k2q_attention(B->ctx, &g->cfg, b, q, &cs->kv_t, sc, &rp, &qi, &qs, &po, &pl, ex);
  if (st == M3S_OK)
    st = m3s_combine_partials(B->ctx, &g->cfg, &po, &pl, &qc, out, lse, ex);
  return st;
}

/* One call of the case's operation on set s, on the bench stream. */
static m3s_status run_op(const bench *B, case_state *cs, int s) {
  const geom *g = &cs->g;
  m3s_batch b = make_batch(B, cs, s);
  m3s_tensor q = dev_tensor(B, cs->d_q[s], M3S_BF16, 3, g->T, g->Hq, 128);
  m3s_tensor iq = dev_tensor(B, cs->d_iq[s], M3S_BF16, 3, g->T, g->Hkv, 128);
  m3s_tensor out = dev_tensor(B, cs->d_out, M3S_BF16, 3, g->T, g->Hq, 128);
  m3s_tensor lse = dev_tensor(B, cs->d_lse, M3S_F32, 2, g->T, g->Hq, 0);
  m3s_tensor tkout = dev_tensor(B, cs->d_tkout, M3S_I32, 3, g->T, g->Hkv, g->K);
  m3s_exec ex = {cs->d_ws, cs->ws_bytes, (void *)B->stream};
  m3s_tensor *lsep = cs->d_lse ? &lse : NULL;
  const m3s_kv_scales *sc = cs->d_scale ? &cs->scales : NULL;
  switch (g->c.op) {
  case OP_TOPK:
  case OP_PTOPK:
    return m3s_index_topk(B->ctx, &g->cfg, &b, &iq, &cs->idx_t, &tkout, &ex);
  case OP_ATTN:
  case OP_PATTN: {
    m3s_tensor tkin = dev_tensor(B, cs->d_tkin[s], M3S_I32, 3, g->T, g->Hkv, g->K);
    if (cs->d_po)
      return run_k2q(B, cs, &b, &q, sc, &tkin, &out, lsep, &ex);
    return m3s_sparse_attention(B->ctx, &g->cfg, &b, &q, &cs->kv_t, sc, &tkin, &out, lsep, &ex);
  }
  default: {
    m3s_step st;
    memset(&st, 0, sizeof st);
    if (g->c.op == OP_STEP)
      st.decode = b;
    else
      st.prefill = b;
    return m3s_step_forward(B->ctx, &g->cfg, &st, &q, &iq, &cs->kv_t, sc, &cs->idx_t, &tkout, &out,
                            lsep, &ex);
  }
  }
}

/* The kernel(s) the library says it would run ("topk+attention" for a step). */
static void kernel_names(const bench *B, const geom *g, char *buf, size_t n) {
  int ops[2], nops = 0;
  int prefill = op_prefill(g->c.op);
  if (op_uses_idx(g->c.op))
    ops[nops++] = M3S_OP_INDEX_TOPK;
  if (op_uses_kv(g->c.op))
    ops[nops++] = prefill ? M3S_OP_ATTENTION_PREFILL : M3S_OP_ATTENTION_DECODE;
  buf[0] = 0;
  for (int i = 0; i < nops; i++) {
    m3s_support_query q;
    m3s_support_info info;
    memset(&q, 0, sizeof q);
    memset(&info, 0, sizeof info);
    q.op = (m3s_op)ops[i];
    q.act_dtype = M3S_BF16;
    q.kv_dtype = g->c.kv_dt >= 0 ? (m3s_dtype)g->c.kv_dt : M3S_BF16;
    q.index_dtype = g->c.idx_dt >= 0 ? (m3s_dtype)g->c.idx_dt : M3S_BF16;
    q.layout = B->o.token_major ? M3S_LAYOUT_TOKEN_MAJOR : M3S_LAYOUT_HEAD_MAJOR;
    const char *name = "?";
    if (m3s_query_support(B->ctx, &g->cfg, &q, &info) == M3S_OK)
      name = info.supported && info.kernel[0] ? info.kernel : "none";
    size_t len = strlen(buf);
    snprintf(buf + len, n - len, "%s%.60s", i ? "+" : "", name);
  }
}

static void case_state_free(case_state *cs) {
  for (int s = 0; s < cs->S; s++) {
    if (cs->execs && cs->execs[s])
      cudaGraphExecDestroy(cs->execs[s]);
    if (cs->graphs && cs->graphs[s])
      cudaGraphDestroy(cs->graphs[s]);
    if (cs->d_bt && cs->d_bt[s])
      cudaFree(cs->d_bt[s]);
    if (cs->d_tkin && cs->d_tkin[s])
      cudaFree(cs->d_tkin[s]);
    if (cs->d_q && cs->d_q[s])
      cudaFree(cs->d_q[s]);
    if (cs->d_iq && cs->d_iq[s])
      cudaFree(cs->d_iq[s]);
  }
  for (int i = 0; i < cs->nev; i++)
    if (cs->ev[i])
      cudaEventDestroy(cs->ev[i]);
  free(cs->ev);
  free(cs->execs);
  free(cs->graphs);
  free(cs->d_bt);
  free(cs->d_tkin);
  free(cs->d_q);
  free(cs->d_iq);
  cudaFree(cs->d_seq);
  cudaFree(cs->d_qsl);
  cudaFree(cs->d_tkout);
  cudaFree(cs->d_out);
  cudaFree(cs->d_ws);
  cudaFree(cs->d_lse);
  cudaFree(cs->d_scale);
  cudaFree(cs->d_rp);
  cudaFree(cs->d_qi);
  cudaFree(cs->d_qs);
  cudaFree(cs->d_qc);
  cudaFree(cs->d_po);
  cudaFree(cs->d_pl);
  geom_free(&cs->g);
  memset(cs, 0, sizeof *cs);
}

/* Leaves the stream out of capture mode after a failed capture. */
static void abort_capture(cudaStream_t st) {
  enum cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(st, &cap) == cudaSuccess && cap != cudaStreamCaptureStatusNone) {
    cudaGraph_t junk = NULL;
    cudaStreamEndCapture(st, &junk);
    if (junk)
      cudaGraphDestroy(junk);
  }
  cudaGetLastError();
}

void run_case(bench *B, case_result *res) {
  const options *o = &B->o;
  case_state cs;
  memset(&cs, 0, sizeof cs);
  int32_t *h_bt = NULL, *h_tk = NULL, *perm = NULL;
  double *times = NULL;
  double remaining = o->budget_s - (now_s() - B->t0);
  double cb = o->case_budget_s < remaining ? o->case_budget_s : remaining;
  geom *g = &cs.g;
  if (!geom_init(g, &res->c)) {
    res->status = RES_ERROR;
    snprintf(res->note, sizeof res->note, "bad case geometry (out of memory or seq_len > 2^30)");
    goto done;
  }
  kernel_names(B, g, res->kernel, sizeof res->kernel);
  if (o->attn_k2q && g->c.op == OP_PATTN)
    snprintf(res->kernel, sizeof res->kernel, "k2q path: csr + k2q attention + combine");
  cudaGetLastError(); /* nothing left over from an earlier case */
  /* number of sets: wanted, then what the pool holds */
  int S = sets_wanted(g, o, B->l2);
  while (S > 1 && cache_bytes(g, S) > B->pool_bytes)
    S--;
  if (cache_bytes(g, 1) > B->pool_bytes) {
    res->status = RES_SKIPPED;
    snprintf(res->note, sizeof res->note, "needs %.1f GiB of cache, the pool has %.1f GiB",
             (double)cache_bytes(g, 1) / GIB, (double)B->pool_bytes / GIB);
    goto done;
  }
  cs.S = S;
  res->sets = S;
  const int T = g->T, R = g->R, Hq = g->Hq, Hkv = g->Hkv, K = g->K;
  const size_t qbytes = (size_t)T * Hq * 128 * 2, iqbytes = (size_t)T * Hkv * 128 * 2;
  const size_t tkbytes = (size_t)T * Hkv * K * 4, btbytes = (size_t)R * g->maxp * 4;
  const int is_attn = g->c.op == OP_ATTN || g->c.op == OP_PATTN;
  const int is_step = g->c.op == OP_STEP || g->c.op == OP_PSTEP;
  uint64_t seed = 0x6d3573ull * (uint64_t)(res - g_res + 1);

  cs.d_bt = calloc((size_t)S, sizeof *cs.d_bt);
  cs.d_tkin = calloc((size_t)S, sizeof *cs.d_tkin);
  cs.d_q = calloc((size_t)S, sizeof *cs.d_q);
  cs.d_iq = calloc((size_t)S, sizeof *cs.d_iq);
  cs.graphs = calloc((size_t)S, sizeof *cs.graphs);
  cs.execs = calloc((size_t)S, sizeof *cs.execs);
  h_bt = malloc(btbytes + 4);
  h_tk = malloc(tkbytes + 4);
  perm = malloc(sizeof(int32_t) * (size_t)g->pps);
  if (!cs.d_bt || !cs.d_tkin || !cs.d_q || !cs.d_iq || !cs.graphs || !cs.execs || !h_bt || !h_tk ||
      !perm) {
    res->status = RES_ERROR;
    snprintf(res->note, sizeof res->note, "host out of memory");
    goto done;
  }

  /* device buffers */
  CU(cudaMalloc((void **)&cs.d_seq, sizeof(int32_t) * (size_t)R));
  CU(cudaMalloc((void **)&cs.d_qsl, sizeof(int32_t) * (size_t)(R + 1)));
  CU(cudaMemcpy(cs.d_seq, g->seq, sizeof(int32_t) * (size_t)R, cudaMemcpyHostToDevice));
  CU(cudaMemcpy(cs.d_qsl, g->qsl, sizeof(int32_t) * (size_t)(R + 1), cudaMemcpyHostToDevice));
  CU(cudaMalloc((void **)&cs.d_tkout, tkbytes));
  CU(cudaMalloc(&cs.d_out, qbytes));
  if (o->lse && op_uses_kv(g->c.op))
    CU(cudaMalloc((void **)&cs.d_lse, sizeof(float) * (size_t)T * Hq));
  CU(cudaMemset(cs.d_tkout, 0xff, tkbytes));
  CU(cudaMemset(cs.d_out, 0xff, qbytes));
  if (m3s_workspace_size(B->ctx, &g->cfg, T, g->max_seq, &cs.ws_bytes) != M3S_OK) {
    res->status = RES_ERROR;
    snprintf(res->note, sizeof res->note, "m3s_workspace_size: %s", m3s_last_error());
    goto done;
  }
  if (cs.ws_bytes)
    CU(cudaMalloc(&cs.d_ws, cs.ws_bytes));
  if (o->attn_k2q && g->c.op == OP_PATTN) {
    /* the key-centric path's CSR and partials */
    for (int r = 0; r < R; r++)
      cs.csr_rows += ceil_div(g->seq[r], 128);
    const size_t tk = (size_t)T * K;
    CU(cudaMalloc((void **)&cs.d_rp, sizeof(int32_t) * (size_t)Hkv * (size_t)(cs.csr_rows + 1)));
    CU(cudaMalloc((void **)&cs.d_qi, sizeof(int32_t) * (size_t)Hkv * tk));
    CU(cudaMalloc((void **)&cs.d_qs, sizeof(int32_t) * (size_t)Hkv * tk));
    CU(cudaMalloc((void **)&cs.d_qc, sizeof(int32_t) * (size_t)T * Hkv));
    CU(cudaMalloc((void **)&cs.d_po, sizeof(float) * (size_t)Hq * tk * 128));
    CU(cudaMalloc((void **)&cs.d_pl, sizeof(float) * (size_t)Hq * tk));
  }

  /* caches: the first S * pps pages of the pool */
  int64_t P = (int64_t)S * g->pps;
  char *kv_base = (char *)B->pool;
  char *idx_base = kv_base + align_up((size_t)P * g->kvpage, 4096);
  if (g->kvpage) {
    size_t es = m3s_dtype_size((m3s_dtype)g->c.kv_dt);
    FILL(fill_dt(kv_base, (size_t)P * g->kvpage / es, g->c.kv_dt, seed ^ 0x1, B->stream));
    int64_t shape[4] = {P, Hkv, 128, 256};
    int64_t hm[4] = {(int64_t)Hkv * 128 * 256, 128 * 256, 256, 1};
    int64_t tm[4] = {(int64_t)Hkv * 128 * 256, 256, (int64_t)Hkv * 256, 1};
    cs.kv_t = m3s_tensor_strided(kv_base, (m3s_dtype)g->c.kv_dt, 4, shape, o->token_major ? tm : hm,
                                 B->device);
    if (g->c.kv_dt == M3S_E4M3) { /* scalar scales: k 0.75, v 1.25 */
      float sc[2] = {0.75f, 1.25f};
      CU(cudaMalloc((void **)&cs.d_scale, sizeof sc));
      CU(cudaMemcpy(cs.d_scale, sc, sizeof sc, cudaMemcpyHostToDevice));
      cs.scales.k_scale = m3s_tensor_make(cs.d_scale, M3S_F32, 0, NULL, B->device);
      cs.scales.v_scale = m3s_tensor_make(cs.d_scale + 1, M3S_F32, 0, NULL, B->device);
    }
  }
  if (g->idxpage) {
    size_t es = m3s_dtype_size((m3s_dtype)g->c.idx_dt);
    FILL(fill_dt(idx_base, (size_t)P * g->idxpage / es, g->c.idx_dt, seed ^ 0x2, B->stream));
    int64_t shape[3] = {P, 128, 128};
    cs.idx_t = m3s_tensor_make(idx_base, (m3s_dtype)g->c.idx_dt, 3, shape, B->device);
  }

  /* per set: block table over pages [s*pps, (s+1)*pps) shuffled, q, iq, top-k */
  double uniq = 0, attended = 0;
  int nacc = 0;
  for (int s = 0; s < S; s++) {
    uint64_t rng = seed ^ (0x9999ull * (uint64_t)(s + 1));
    for (int64_t i = 0; i < g->pps; i++)
      perm[i] = (int32_t)((int64_t)s * g->pps + i);
    for (int64_t i = g->pps - 1; i > 0; i--) {
      int64_t j = (int64_t)(splitmix(&rng) % (uint64_t)(i + 1));
      int32_t x = perm[i];
      perm[i] = perm[j];
      perm[j] = x;
    }
    int64_t next = 0;
    for (int r = 0; r < R; r++) {
      int64_t np = ceil_div(g->seq[r], 128);
      for (int64_t p = 0; p < g->maxp; p++)
        h_bt[(int64_t)r * g->maxp + p] = p < np ? perm[next + p] : perm[0];
      next += np;
    }
    CU(cudaMalloc((void **)&cs.d_bt[s], btbytes));
    CU(cudaMemcpy(cs.d_bt[s], h_bt, btbytes, cudaMemcpyHostToDevice));
    CU(cudaMalloc(&cs.d_q[s], qbytes));
    CU(cudaMalloc(&cs.d_iq[s], iqbytes));
    FILL(m3sb_fill_bf16(cs.d_q[s], qbytes / 2, seed ^ (0x100ull + (uint64_t)s), 1.0f, B->stream));
    FILL(m3sb_fill_bf16(cs.d_iq[s], iqbytes / 2, seed ^ (0x200ull + (uint64_t)s), 1.0f, B->stream));
    if (is_attn) {
      gen_topk(g, rng, o->sel_token, h_tk);
      double u, a;
      attn_account(g, h_tk, &u, &a);
      uniq += u;
      attended += a;
      nacc++;
      CU(cudaMalloc((void **)&cs.d_tkin[s], tkbytes));
      CU(cudaMemcpy(cs.d_tkin[s], h_tk, tkbytes, cudaMemcpyHostToDevice));
    }
  }
  /* the fills ran on the bench stream, the uploads on the legacy stream */
  CU(cudaDeviceSynchronize());

  /* first call (set 0): status; then a second one timed, for the budget */
  cs.nev = 2 * (o->reps > 2 ? o->reps : 2);
  cs.ev = calloc((size_t)cs.nev, sizeof *cs.ev);
  times = malloc(sizeof(double) * (size_t)cs.nev);
  if (!cs.ev || !times) {
    res->status = RES_ERROR;
    snprintf(res->note, sizeof res->note, "host out of memory");
    goto done;
  }
  for (int i = 0; i < cs.nev; i++)
    CU(cudaEventCreate(&cs.ev[i]));
  {
    /* the first call counts what the certified top-k re-scored (test hook,
     * the context's path kept); the timed calls run without counters */
    m3s_topk_tc_stats ts;
    memset(&ts, 0, sizeof ts);
    int counted = B->tc_stats && op_uses_idx(g->c.op) &&
                  cudaMemcpy(B->tc_stats, &ts, sizeof ts, cudaMemcpyHostToDevice) == cudaSuccess;
    m3s_topk_tc_hooks h = m3s_cuda_topk_hooks(B->ctx);
    if (counted) {
      h.stats = (m3s_topk_tc_stats *)B->tc_stats;
      m3s_topk_tc_set_hooks(B->ctx, &h);
    }
    m3s_status st = run_op(B, &cs, 0);
    if (counted) {
      h.stats = NULL;
      m3s_topk_tc_set_hooks(B->ctx, &h);
      /* the call ran on the bench's non-blocking stream, which a plain
       * cudaMemcpy does not wait for: without this the counts were read
       * while the selection still ran (2026-12-06: 954,216 of an 8K
       * prompt's 970,752 candidates) */
      if (st == M3S_OK && cudaStreamSynchronize(B->stream) == cudaSuccess &&
          cudaMemcpy(&ts, B->tc_stats, sizeof ts, cudaMemcpyDeviceToHost) == cudaSuccess &&
          ts.candidates > 0)
        snprintf(res->note, sizeof res->note, "re-scored %llu of %llu candidate blocks (%.3f%%)",
                 ts.rescored, ts.candidates, 100.0 * (double)ts.rescored / (double)ts.candidates);
    }
    if (st == M3S_ERR_UNSUPPORTED) {
      res->status = RES_UNSUPPORTED;
      snprintf(res->note, sizeof res->note, "%s", m3s_last_error());
      goto done;
    }
    if (st != M3S_OK) {
      res->status = RES_ERROR;
      snprintf(res->note, sizeof res->note, "%s: %s", m3s_status_string(st), m3s_last_error());
      goto done;
    }
    CU(cudaGetLastError());
    CU(cudaStreamSynchronize(B->stream));
  }
  CU(cudaEventRecord(cs.ev[0], B->stream));
  if (run_op(B, &cs, 0) != M3S_OK) {
    res->status = RES_ERROR;
    snprintf(res->note, sizeof res->note, "second call failed: %s", m3s_last_error());
    goto done;
  }
  CU(cudaEventRecord(cs.ev[1], B->stream));
  CU(cudaEventSynchronize(cs.ev[1]));
  CU(cudaGetLastError());
  float est_ms = 0;
  CU(cudaEventElapsedTime(&est_ms, cs.ev[0], cs.ev[1]));
  int reps = o->reps;
  double est_s = est_ms * 1e-3;
  if (est_s * (reps + S * (2 + o->warmup)) > cb) {
    int s2 = (int)(cb / (6 * est_s));
    if (s2 < S) {
      S = s2 < 1 ? 1 : s2; /* keep the first S sets */
      res->sets = S;
    }
    int r2 = (int)(cb / est_s) - S * (2 + o->warmup);
    reps = r2 < 3 ? 3 : r2 < reps ? r2 : reps;
    note_add(res, "slow (%.1f ms per call): %d reps, %d sets", est_ms, reps, S);
  }
  res->reps = reps;

  /* one eager call on every other set (step: read each set's top-k back) */
  for (int s = 0; s < S; s++) {
    if (s > 0) {
      m3s_status st = run_op(B, &cs, s);
      if (st != M3S_OK) {
        res->status = RES_ERROR;
        snprintf(res->note, sizeof res->note, "set %d: %s: %s", s, m3s_status_string(st),
                 m3s_last_error());
        goto done;
      }
      CU(cudaGetLastError());
      CU(cudaStreamSynchronize(B->stream));
    }
    if (is_step) {
      CU(cudaMemcpy(h_tk, cs.d_tkout, tkbytes, cudaMemcpyDeviceToHost));
      double u, a;
      attn_account(g, h_tk, &u, &a);
      uniq += u;
      attended += a;
      nacc++;
    }
  }
  count_work(g, nacc ? uniq / nacc : 0, nacc ? attended / nacc : 0, cs.d_lse != NULL, &res->bytes,
             &res->flops);

  /* capture one graph per set */
  res->eager = o->no_graph;
  for (int s = 0; s < S && !res->eager; s++) {
    cudaError_t e = cudaStreamBeginCapture(B->stream, cudaStreamCaptureModeGlobal);
    m3s_status st = e == cudaSuccess ? run_op(B, &cs, s) : M3S_ERR_CUDA;
    char msg[160] = "";
    if (st != M3S_OK)
      snprintf(msg, sizeof msg, "%s", e != cudaSuccess ? cudaGetErrorString(e) : m3s_last_error());
    if (e == cudaSuccess) {
      e = cudaStreamEndCapture(B->stream, &cs.graphs[s]);
      if (e != cudaSuccess && !msg[0])
        snprintf(msg, sizeof msg, "cudaStreamEndCapture: %s", cudaGetErrorString(e));
    }
    if (st == M3S_OK && e == cudaSuccess) {
      e = cudaGraphInstantiate(&cs.execs[s], cs.graphs[s], 0);
      if (e != cudaSuccess)
        snprintf(msg, sizeof msg, "cudaGraphInstantiate: %s", cudaGetErrorString(e));
    }
    if (st != M3S_OK || e != cudaSuccess) {
      abort_capture(B->stream);
      res->eager = 1;
      note_add(res, "graph capture failed, timed eager: %s", msg);
      for (int k = 0; k <= s; k++) {
        if (cs.execs[k])
          cudaGraphExecDestroy(cs.execs[k]);
        if (cs.graphs[k])
          cudaGraphDestroy(cs.graphs[k]);
        cs.execs[k] = NULL;
        cs.graphs[k] = NULL;
      }
      /* a capture failure may leave a sticky error: check the device */
      CU(cudaDeviceSynchronize());
    }
  }
  /* warm replays */
  for (int w = 0; w < o->warmup; w++)
    for (int s = 0; s < S; s++) {
      if (res->eager) {
        if (run_op(B, &cs, s) != M3S_OK) {
          res->status = RES_ERROR;
          snprintf(res->note, sizeof res->note, "warm-up call failed: %s", m3s_last_error());
          goto done;
        }
      } else {
        CU(cudaGraphLaunch(cs.execs[s], B->stream));
      }
    }
  CU(cudaStreamSynchronize(B->stream));
  CU(cudaGetLastError());

  /* timed: hold the stream, enqueue every replay, release */
  for (int done_reps = 0; done_reps < reps;) {
    int chunk = reps - done_reps;
    if (chunk > cs.nev / 2)
      chunk = cs.nev / 2;
    double hold_us = 1000.0 + 40.0 * chunk;
    if (hold_us > 50000.0)
      hold_us = 50000.0;
    FILL(m3sb_spin((unsigned long long)(hold_us * 1000.0), B->stream));
    for (int i = 0; i < chunk; i++) {
      int s = (done_reps + i) % S;
      CU(cudaEventRecord(cs.ev[2 * i], B->stream));
      if (res->eager) {
        if (run_op(B, &cs, s) != M3S_OK) {
          res->status = RES_ERROR;
          snprintf(res->note, sizeof res->note, "timed call failed: %s", m3s_last_error());
          goto done;
        }
      } else {
        CU(cudaGraphLaunch(cs.execs[s], B->stream));
      }
      CU(cudaEventRecord(cs.ev[2 * i + 1], B->stream));
    }
    CU(cudaStreamSynchronize(B->stream));
    CU(cudaGetLastError());
    for (int i = 0; i < chunk; i++) {
      float ms = 0;
      CU(cudaEventElapsedTime(&ms, cs.ev[2 * i], cs.ev[2 * i + 1]));
      times[done_reps + i] = ms * 1e3;
    }
    done_reps += chunk;
  }
  qsort(times, (size_t)reps, sizeof(double), cmp_double);
  res->med_us = reps % 2 ? times[reps / 2] : 0.5 * (times[reps / 2 - 1] + times[reps / 2]);
  res->min_us = times[0];
  res->max_us = times[reps - 1];
  res->p90_us = times[(int)(0.9 * (reps - 1) + 0.5)];
  res->status = RES_OK;

done:
  if (res->status == RES_ERROR) {
    abort_capture(B->stream);
    if (cudaDeviceSynchronize() != cudaSuccess) {
      B->dead = 1; /* sticky: the context is gone */
      cudaGetLastError();
    }
  }
  free(h_bt);
  free(h_tk);
  free(perm);
  free(times);
  case_state_free(&cs);
}
