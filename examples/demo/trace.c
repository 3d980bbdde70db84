/* m3s-demo: the serving trace: setup of the layer, caches and requests, page
 * pools, and the scheduler that cuts the trace into steps (see main.c). */
#include "demo.h"

static int pool_init(page_pool *p, int64_t n, rng *r) {
  p->ids = (int32_t *)xcalloc((size_t)n, sizeof *p->ids);
  if (!p->ids)
    return -1;
  p->n = (int)n;
  for (int i = 0; i < p->n; i++)
    p->ids[i] = i;
  for (int i = p->n - 1; i > 0; i--) { /* Fisher-Yates */
    int j = rng_int(r, i + 1);
    int32_t t = p->ids[i];
    p->ids[i] = p->ids[j];
    p->ids[j] = t;
  }
  return 0;
}

static int pool_take(page_pool *p) { return p->n > 0 ? p->ids[--p->n] : -1; }

/* Make sure request r has pages for positions [0, upto). */
int ensure_pages(demo *dm, request *rq, int upto) {
  while ((int64_t)rq->npages * M3S_BLOCK_SIZE < upto) {
    if (rq->npages == rq->cap_pages) {
      fflush(stdout);
      fprintf(stderr, "m3s-demo: internal error: request outgrew its block table\n");
      return -1;
    }
    int a = pool_take(&dm->main_pool), b = pool_take(&dm->index_pool);
    if (a < 0 || b < 0) {
      fflush(stdout);
      fprintf(stderr, "m3s-demo: internal error: page pool exhausted\n");
      return -1;
    }
    rq->pages[rq->npages] = a;
    rq->ipages[rq->npages] = b;
    rq->npages++;
  }
  return 0;
}

/* ------------------------------------------------------------------------
 * Setup
 * ---------------------------------------------------------------------- */
static int graph_size(int n) { return n <= 4 ? 4 : n <= 8 ? 8 : (n + 7) / 8 * 8; }

int demo_init(demo *dm) {
  const options *o = &dm->opt;
  dm->cfg = m3s_config_minimax_m3(o->tp);
  TRY("m3s_config_validate", m3s_config_validate(&dm->cfg));
  dm->hq = dm->cfg.num_q_heads;
  dm->hkv = dm->cfg.num_kv_heads;
  dm->grp = dm->hq / dm->hkv;
  dm->topk = dm->cfg.topk;
  dm->act.s = o->seed * 3 + 1;
  dm->sched.s = o->seed * 3 + 2;
  dm->samp.s = o->seed * 3 + 3;

  buf_set_device(o->cuda);
  TRY(o->cuda ? "m3s_context_create(device 0)" : "m3s_context_create(cpu)",
      m3s_context_create(o->cuda ? 0 : -1, &dm->ctx));

  /* Requests and a bound on the steps of the trace, to size block tables. */
  dm->nreq = o->requests;
  dm->late = dm->nreq >= 2 ? dm->nreq - 1 : -1;
  dm->req = (request *)xcalloc((size_t)dm->nreq, sizeof *dm->req);
  if (!dm->req)
    return -1;
  int64_t sum_prompts = 0;
  for (int r = 0; r < dm->nreq; r++) {
    request *rq = &dm->req[r];
    rq->prompt_len = o->prompt_min + rng_int(&dm->sched, o->prompt_max - o->prompt_min + 1);
    rq->state = r == dm->late ? REQ_WAITING : REQ_PREFILL;
    sum_prompts += rq->prompt_len;
    if (plant_needles(dm, rq))
      return -1;
  }
  int64_t steps_bound = sum_prompts / (o->chunk - dm->nreq) + 2 * dm->nreq + 8 + o->decode_steps;
  int64_t extra = steps_bound * (1 + o->spec_tokens);
  dm->num_pages = 0;
  dm->ccap = 1;
  for (int r = 0; r < dm->nreq; r++) {
    request *rq = &dm->req[r];
    rq->cap_pages = (int)((rq->prompt_len + extra + M3S_BLOCK_SIZE - 1) / M3S_BLOCK_SIZE);
    dm->ccap = rq->cap_pages > dm->ccap ? rq->cap_pages : dm->ccap;
    dm->num_pages += rq->cap_pages;
    rq->pages = (int32_t *)xcalloc((size_t)rq->cap_pages, sizeof(int32_t));
    rq->ipages = (int32_t *)xcalloc((size_t)rq->cap_pages, sizeof(int32_t));
    if (!rq->pages || !rq->ipages)
      return -1;
  }
  dm->num_pages += dm->num_pages / 4 + 8; /* slack: the pages in use are scattered */
  dm->max_blocks = dm->ccap;

  /* Caches (zeroed) and shuffled free lists. */
  int64_t P = dm->num_pages, H = dm->hkv;
  if (o->token_major) { /* storage [P, 128, Hkv, 256], viewed as [P, Hkv, 128, 256] */
    int64_t s[4] = {M3S_BLOCK_SIZE * H * 2 * M3S_HEAD_DIM, 2 * M3S_HEAD_DIM, H * 2 * M3S_HEAD_DIM,
                    1};
    memcpy(dm->kv_stride, s, sizeof s);
  } else {
    int64_t s[4] = {H * M3S_BLOCK_SIZE * 2 * M3S_HEAD_DIM, M3S_BLOCK_SIZE * 2 * M3S_HEAD_DIM,
                    2 * M3S_HEAD_DIM, 1};
    memcpy(dm->kv_stride, s, sizeof s);
  }
  if (buf_alloc(&dm->kv, (size_t)(P * H * M3S_BLOCK_SIZE * 2 * M3S_HEAD_DIM) * 2) ||
      buf_alloc(&dm->ic, (size_t)(P * M3S_BLOCK_SIZE * M3S_HEAD_DIM) * 2) ||
      pool_init(&dm->main_pool, P, &dm->sched) || pool_init(&dm->index_pool, P, &dm->sched))
    return -1;

  /* Whole-step buffers. */
  dm->ecap = graph_size(dm->nreq) > dm->nreq ? graph_size(dm->nreq) : dm->nreq;
  int dec_rows = dm->ecap * (1 + o->spec_tokens);
  dm->tcap = o->chunk > dec_rows ? o->chunk : dec_rows;
  size_t T = (size_t)dm->tcap, E = (size_t)dm->ecap;
  if (buf_alloc(&dm->q, T * dm->hq * M3S_HEAD_DIM * 2) ||
      buf_alloc(&dm->iq, T * dm->hkv * M3S_HEAD_DIM * 2) ||
      buf_alloc(&dm->k, T * dm->hkv * M3S_HEAD_DIM * 2) ||
      buf_alloc(&dm->v, T * dm->hkv * M3S_HEAD_DIM * 2) ||
      buf_alloc(&dm->ik, T * M3S_HEAD_DIM * 2) || buf_alloc(&dm->slots, T * 8) ||
      buf_alloc(&dm->islots, T * 8) || buf_alloc(&dm->topk_b, T * dm->hkv * dm->topk * 4) ||
      buf_alloc(&dm->out, T * dm->hq * M3S_HEAD_DIM * 2) || buf_alloc(&dm->lse, T * dm->hq * 4) ||
      buf_alloc(&dm->seq_lens, E * 4) || buf_alloc(&dm->qsl, (E + 1) * 4) ||
      buf_alloc(&dm->table, E * dm->ccap * 4) || buf_alloc(&dm->itable, E * dm->ccap * 4))
    return -1;
  dm->row_req = (int32_t *)xcalloc(T, sizeof(int32_t));
  dm->row_pos = (int32_t *)xcalloc(T, sizeof(int32_t));
  dm->row_ask = (int32_t *)xcalloc(T, sizeof(int32_t));
  dm->row_dec = (int32_t *)xcalloc(T, sizeof(int32_t));
  dm->ref_s = (double *)xcalloc((size_t)dm->max_blocks, sizeof(double));
  if (!dm->row_req || !dm->row_pos || !dm->row_ask || !dm->row_dec || !dm->ref_s)
    return -1;
  return 0;
}

void demo_free(demo *dm) {
  if (dm->req)
    for (int r = 0; r < dm->nreq; r++) {
      request *rq = &dm->req[r];
      free(rq->pages);
      free(rq->ipages);
      for (int i = 0; i < rq->nneedles; i++) {
        free(rq->nd[i].kdir);
        free(rq->nd[i].val);
      }
    }
  free(dm->req);
  free(dm->main_pool.ids);
  free(dm->index_pool.ids);
  buf *bufs[] = {&dm->kv,       &dm->ic,    &dm->q,      &dm->iq,     &dm->k,   &dm->v,
                 &dm->ik,       &dm->slots, &dm->islots, &dm->topk_b, &dm->out, &dm->lse,
                 &dm->seq_lens, &dm->qsl,   &dm->table,  &dm->itable, &dm->ws};
  for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++)
    buf_free(bufs[i]);
  free(dm->row_req);
  free(dm->row_pos);
  free(dm->row_ask);
  free(dm->row_dec);
  free(dm->ref_s);
  m3s_context_destroy(dm->ctx);
}

/* ------------------------------------------------------------------------
 * The scheduler
 * ---------------------------------------------------------------------- */
static void arrivals(demo *dm) {
  if (dm->late < 0 || dm->req[dm->late].state != REQ_WAITING)
    return;
  for (int r = 0; r < dm->nreq; r++)
    if (r != dm->late && (dm->req[r].state != REQ_DECODE || dm->req[r].decodes < 2))
      return;
  dm->req[dm->late].state = REQ_PREFILL;
}

/* Fills *s with the next step; returns 0 when the trace is over. */
int schedule_step(demo *dm, sched_step *s) {
  arrivals(dm);
  int prefilling = 0, waiting = 0;
  for (int r = 0; r < dm->nreq; r++) {
    prefilling += dm->req[r].state == REQ_PREFILL;
    waiting += dm->req[r].state == REQ_WAITING;
  }
  memset(s, 0, sizeof *s);
  s->q_len = 1;
  if (!prefilling && !waiting) { /* the final pure decode phase */
    if (dm->pure_done >= dm->opt.decode_steps)
      return 0;
    if (dm->pure_done >= (dm->opt.decode_steps + 1) / 2 && dm->opt.spec_tokens > 0) {
      s->spec = dm->opt.spec_tokens;
      s->q_len = 1 + s->spec;
    }
  }
  for (int r = 0; r < dm->nreq; r++) {
    request *rq = &dm->req[r];
    if (rq->state == REQ_DECODE)
      s->e[s->nent++] = (entry){r, s->q_len, rq->len, s->q_len, 0, 1};
  }
  s->ndec = s->nent;
  int budget = dm->opt.chunk - s->ndec * s->q_len;
  for (int r = 0; r < dm->nreq && budget > 0; r++) {
    request *rq = &dm->req[r];
    if (rq->state != REQ_PREFILL)
      continue;
    int n = rq->prompt_len - rq->prefilled;
    n = n < budget ? n : budget;
    s->e[s->nent++] = (entry){r, n, rq->prefilled, n, 0, 0};
    budget -= n;
  }
  if (s->nent == 0)
    return 0;
  if (s->nent == s->ndec) { /* pure decode: pad to a CUDA-graph batch size */
    s->npad = graph_size(s->ndec) - s->ndec;
    for (int i = 0; i < s->npad; i++)
      s->e[s->nent++] = (entry){-1, 0, 0, s->q_len, 0, 1};
    /* padding goes right after the real decode requests (there is no prefill) */
  }
  for (int i = 0; i < s->nent; i++) {
    s->e[i].row0 = s->rows;
    s->rows += s->e[i].rows;
    s->real_tokens += s->e[i].n;
  }
  return s->nent > 0;
}

/* After the step: commit tokens, accept drafts, finish prompts. */
void advance(demo *dm, const sched_step *s) {
  int pure = 1;
  for (int i = 0; i < s->nent; i++) {
    const entry *e = &s->e[i];
    if (e->req < 0)
      continue;
    request *rq = &dm->req[e->req];
    if (e->decode) {
      rq->len += 1 + (s->spec ? rng_int(&dm->sched, s->spec + 1) : 0);
      rq->decodes++;
    } else {
      pure = 0;
      rq->prefilled += e->n;
      rq->len = rq->prefilled;
      if (rq->prefilled == rq->prompt_len)
        rq->state = REQ_DECODE;
    }
  }
  int all_in = 1;
  for (int r = 0; r < dm->nreq; r++)
    all_in &= dm->req[r].state == REQ_DECODE;
  if (pure && all_in && s->ndec == dm->nreq)
    dm->pure_done++;
}
