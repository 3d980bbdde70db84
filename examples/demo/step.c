/* m3s-demo: one step through the library: plan, batches, inserts, the layer
 * (m3s_step_forward), the download and the step's line of output. */
#include "demo.h"

/* ------------------------------------------------------------------------
 * One step through the library
 * ---------------------------------------------------------------------- */
/* Host step description -> m3s_plan_step, and a check that its split agrees
 * with the rows the scheduler laid out. */
static int plan(demo *dm, const sched_step *s, m3s_step_plan *p) {
  int32_t qlens[MAX_ENTRIES], slens[MAX_ENTRIES];
  for (int i = 0; i < s->nent; i++) {
    qlens[i] = s->e[i].n;
    slens[i] = s->e[i].req < 0 ? 0 : s->e[i].start + s->e[i].n;
  }
  m3s_step_desc desc = {s->nent, qlens, slens, s->spec};
  TRY("m3s_plan_step", m3s_plan_step(dm->ctx, &dm->cfg, &desc, p));
  int drows = 0;
  for (int i = 0; i < p->num_decodes; i++)
    drows += s->e[i].rows;
  if (p->num_tokens != s->rows || p->num_decode_tokens != drows ||
      (p->num_decodes && p->decode_q_len != s->e[0].rows)) {
    fflush(stdout);
    fprintf(stderr,
            "m3s-demo: m3s_plan_step split the step into %d decode requests (q_len %d, %d "
            "rows) + %d prefill requests (%d rows); the scheduler laid out %d rows\n",
            p->num_decodes, p->decode_q_len, p->num_decode_tokens, p->num_prefills,
            p->num_prefill_tokens, s->rows);
    return -1;
  }
  return 0;
}

/* Step-level batch tensors (seq_lens, query_start_loc, block tables), uploaded,
 * and the decode/prefill m3s_batch views of them. */
static int build_batches(demo *dm, const sched_step *s, const m3s_step_plan *p, m3s_step *step) {
  int32_t *sl = (int32_t *)dm->seq_lens.h, *qsl = (int32_t *)dm->qsl.h;
  int32_t *tab = (int32_t *)dm->table.h, *itab = (int32_t *)dm->itable.h;
  int cols = 1;
  for (int i = 0; i < s->nent; i++)
    if (s->e[i].req >= 0 && dm->req[s->e[i].req].npages > cols)
      cols = dm->req[s->e[i].req].npages;
  qsl[0] = 0;
  for (int i = 0; i < s->nent; i++) {
    const entry *e = &s->e[i];
    const request *rq = e->req >= 0 ? &dm->req[e->req] : NULL;
    sl[i] = rq ? e->start + e->n : 0;
    qsl[i + 1] = qsl[i] + e->rows;
    for (int c = 0; c < cols; c++) { /* -1 beyond the sequence: never read */
      tab[i * cols + c] = rq && c < rq->npages ? rq->pages[c] : -1;
      itab[i * cols + c] = rq && c < rq->npages ? rq->ipages[c] : -1;
    }
  }
  size_t ne = (size_t)s->nent;
  if (buf_upload(&dm->seq_lens, ne * 4) || buf_upload(&dm->qsl, (ne + 1) * 4) ||
      buf_upload(&dm->table, ne * cols * 4) || buf_upload(&dm->itable, ne * cols * 4))
    return -1;
  m3s_tensor slt = view(&dm->seq_lens, M3S_I32, 1, s->nent, 0, 0);
  m3s_tensor qslt = view(&dm->qsl, M3S_I32, 1, s->nent + 1, 0, 0);
  m3s_tensor tabt = view(&dm->table, M3S_I32, 2, s->nent, cols, 0);
  m3s_tensor itabt = view(&dm->itable, M3S_I32, 2, s->nent, cols, 0);
  int nd = p->num_decodes, np = p->num_prefills;
  m3s_batch *d = &step->decode, *f = &step->prefill;
  memset(step, 0, sizeof *step);
  d->num_reqs = nd;
  d->num_tokens = p->num_decode_tokens;
  d->uniform_q_len = d->max_q_len = nd ? p->decode_q_len : 0;
  d->max_seq_len = p->max_seq_len;
  d->query_start_loc = m3s_tensor_narrow(&qslt, 0, nd + 1);
  d->seq_lens = m3s_tensor_narrow(&slt, 0, nd);
  d->block_table = m3s_tensor_narrow(&tabt, 0, nd);
  d->index_block_table = m3s_tensor_narrow(&itabt, 0, nd);
  f->num_reqs = np;
  f->num_tokens = p->num_prefill_tokens;
  f->uniform_q_len = 0;
  f->max_q_len = p->max_prefill_q_len;
  f->max_seq_len = p->max_seq_len;
  /* vLLM-style slice: query_start_loc[0] of the prefill part is num_decode_tokens */
  f->query_start_loc = m3s_tensor_narrow(&qslt, nd, np + 1);
  f->seq_lens = m3s_tensor_narrow(&slt, nd, np);
  f->block_table = m3s_tensor_narrow(&tabt, nd, np);
  f->index_block_table = m3s_tensor_narrow(&itabt, nd, np);
  return 0;
}

static int upload_activations(demo *dm, int T) {
  size_t t = (size_t)T;
  return buf_upload(&dm->q, t * dm->hq * M3S_HEAD_DIM * 2) ||
                 buf_upload(&dm->iq, t * dm->hkv * M3S_HEAD_DIM * 2) ||
                 buf_upload(&dm->k, t * dm->hkv * M3S_HEAD_DIM * 2) ||
                 buf_upload(&dm->v, t * dm->hkv * M3S_HEAD_DIM * 2) ||
                 buf_upload(&dm->ik, t * M3S_HEAD_DIM * 2) || buf_upload(&dm->slots, t * 8) ||
                 buf_upload(&dm->islots, t * 8)
             ? -1
             : 0;
}

static int download_results(demo *dm, int T, int caches) {
  size_t t = (size_t)T;
  if (buf_download(&dm->topk_b, t * dm->hkv * dm->topk * 4) ||
      buf_download(&dm->out, t * dm->hq * M3S_HEAD_DIM * 2) ||
      buf_download(&dm->lse, t * dm->hq * 4))
    return -1;
  if (caches && (buf_download(&dm->kv, dm->kv.bytes) || buf_download(&dm->ic, dm->ic.bytes)))
    return -1;
  return 0;
}

/* Insert + forward through the library; *ms is their wall time. */
static int layer_step(demo *dm, const m3s_step_plan *p, const m3s_step *step, double *ms) {
  int64_t T = p->num_tokens, H = dm->hkv;
  int64_t kvshape[4] = {dm->num_pages, H, M3S_BLOCK_SIZE, 2 * M3S_HEAD_DIM};
  m3s_tensor kv = m3s_tensor_strided(dm->kv.d, M3S_BF16, 4, kvshape, dm->kv_stride, buf_device());
  m3s_tensor ic = view(&dm->ic, M3S_BF16, 3, dm->num_pages, M3S_BLOCK_SIZE, M3S_HEAD_DIM);
  m3s_tensor q = view(&dm->q, M3S_BF16, 3, T, dm->hq, M3S_HEAD_DIM);
  m3s_tensor iq = view(&dm->iq, M3S_BF16, 3, T, H, M3S_HEAD_DIM);
  m3s_tensor k = view(&dm->k, M3S_BF16, 3, T, H, M3S_HEAD_DIM);
  m3s_tensor v = view(&dm->v, M3S_BF16, 3, T, H, M3S_HEAD_DIM);
  m3s_tensor ik = view(&dm->ik, M3S_BF16, 2, T, M3S_HEAD_DIM, 0);
  m3s_tensor slots = view(&dm->slots, M3S_I64, 1, T, 0, 0);
  m3s_tensor islots = view(&dm->islots, M3S_I64, 1, T, 0, 0);
  m3s_tensor topk = view(&dm->topk_b, M3S_I32, 3, T, H, dm->topk);
  m3s_tensor out = view(&dm->out, M3S_BF16, 3, T, dm->hq, M3S_HEAD_DIM);
  m3s_tensor lse = view(&dm->lse, M3S_F32, 2, T, dm->hq, 0);
  if (p->workspace_bytes > dm->ws.bytes) {
    buf_free(&dm->ws);
    if (buf_alloc(&dm->ws, p->workspace_bytes))
      return -1;
  }
  m3s_exec ex = {dm->ws.d, dm->ws.bytes, NULL};
  double t0 = now_s();
  TRY("m3s_cache_insert", m3s_cache_insert(dm->ctx, &k, &v, &slots, &kv, NULL, &ex));
  TRY("m3s_index_cache_insert", m3s_index_cache_insert(dm->ctx, &ik, &islots, &ic, &ex));
  TRY("m3s_step_forward",
      m3s_step_forward(dm->ctx, &dm->cfg, step, &q, &iq, &kv, NULL, &ic, &topk, &out, &lse, &ex));
  if (dev_sync())
    return -1;
  *ms = 1e3 * (now_s() - t0);
  return 0;
}

/* The step's kind and its decode / prefill parts as the plan split them. */
static void describe(const sched_step *s, const m3s_step_plan *p, char *kind, char *dec, char *pf) {
  strcpy(kind, p->num_prefills == 0  ? (p->decode_q_len > 1 ? "spec" : "decode")
               : p->num_decodes == 0 ? "prefill"
                                     : "mixed");
  int nreal = 0;
  for (int i = 0; i < p->num_decodes; i++)
    nreal += s->e[i].req >= 0;
  if (p->num_decodes == 0)
    strcpy(dec, "-");
  else if (s->npad)
    sprintf(dec, "%dx%d+%dpad", nreal, p->decode_q_len, p->num_decodes - nreal);
  else
    sprintf(dec, "%dx%d", nreal, p->decode_q_len);
  size_t len = 0;
  pf[0] = '\0';
  int shown = 0;
  for (int i = p->num_decodes; i < s->nent; i++) {
    if (shown == 2) {
      len += (size_t)sprintf(pf + len, " +%d", s->nent - i);
      break;
    }
    len += (size_t)sprintf(pf + len, "%sr%d %d+%d", shown ? ", " : "", s->e[i].req, s->e[i].start,
                           s->e[i].n);
    shown++;
  }
  if (!shown)
    strcpy(pf, "-");
}

static void stats_add(stats *a, const stats *b) {
  a->steps += b->steps;
  a->pf_tokens += b->pf_tokens;
  a->dec_tokens += b->dec_tokens;
  a->pad_rows += b->pad_rows;
  a->ref_rows += b->ref_rows;
  a->failures += b->failures;
  a->max_err = b->max_err > a->max_err ? b->max_err : a->max_err;
  a->max_lse_err = b->max_lse_err > a->max_lse_err ? b->max_lse_err : a->max_lse_err;
  a->ms += b->ms;
  a->dec_ms += b->dec_ms;
  a->dec_steps += b->dec_steps;
  a->ask_pairs += b->ask_pairs;
  a->ask_hits += b->ask_hits;
  a->ask_pairs_sparse += b->ask_pairs_sparse;
  a->ask_hits_sparse += b->ask_hits_sparse;
  a->cos_ask += b->cos_ask;
  a->n_cos_ask += b->n_cos_ask;
  a->cos_bg += b->cos_bg;
  a->n_cos_bg += b->n_cos_bg;
  a->att_pf += b->att_pf;
  a->n_att_pf += b->n_att_pf;
  a->att_dec += b->att_dec;
  a->n_att_dec += b->n_att_dec;
}

int run_step(demo *dm, int step_no, const sched_step *s) {
  for (int i = 0; i < s->nent; i++)
    if (s->e[i].req >= 0 && ensure_pages(dm, &dm->req[s->e[i].req], s->e[i].start + s->e[i].n))
      return -1;
  m3s_step_plan p;
  m3s_step step;
  double ms = 0;
  if (plan(dm, s, &p))
    return -1;
  gen_step(dm, s);
  if (upload_activations(dm, s->rows) || build_batches(dm, s, &p, &step) ||
      layer_step(dm, &p, &step, &ms) || download_results(dm, s->rows, dm->opt.check_rows > 0))
    return -1;

  stats st;
  memset(&st, 0, sizeof st);
  st.steps = 1;
  st.ms = ms;
  for (int i = 0; i < s->nent; i++)
    if (s->e[i].decode)
      st.dec_tokens += s->e[i].n;
    else
      st.pf_tokens += s->e[i].n;
  if (p.num_prefills == 0) {
    st.dec_steps = 1;
    st.dec_ms = ms;
  }
  check_step(dm, s, step_no, &st);

  char kind[16], dec[32], pf[96], nd[32] = "-", err[16] = "-";
  describe(s, &p, kind, dec, pf);
  if (st.ask_pairs)
    sprintf(nd, "%lld/%lld", st.ask_hits, st.ask_pairs);
  if (st.ref_rows)
    sprintf(err, "%.1e", st.max_err);
  double att = (st.att_pf + st.att_dec) / (double)(st.n_att_pf + st.n_att_dec);
  printf("%4d  %-7s %-11s %-27s %6d %9.1f %9.0f %7.1f%% %8s %9s\n", step_no, kind, dec, pf,
         s->real_tokens, ms, s->real_tokens / (ms * 1e-3), 100.0 * att, err, nd);
  fflush(stdout); /* a step's line shows as it finishes, also when piped */
  stats_add(&dm->total, &st);
  advance(dm, s);
  return 0;
}
