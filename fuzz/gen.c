/* gen.c -- decoded arguments: layer configs, batches (requests, lengths, block
 * tables, page pools), fp8 scales. */
#include "fuzz.h"

/* ======================================================================== */
/* layer config                                                             */
/* ======================================================================== */

void gen_cfg(cfg_t *C, int *ex) {
  m3s_layer_config *c = &C->c;
  memset(c, 0, sizeof *c);
  C->p = c;
  C->nice = 1;
  if (rchance(8)) {
    static const int tps[6] = {4, 8, 2, 1, 3, 0};
    int tp = tps[rpick(6)];
    if (tp == 1 ||
        tp == 2) /* 64 / 32 heads: over the size budget, keep them for the config check */
      tp = 4;
    *c = m3s_config_minimax_m3(tp);
    if (c->num_q_heads == 0) {
      *ex |= EX_FAIL;
      c->num_q_heads = 0;
    }
    return;
  }
  static const int hkvs[4] = {1, 2, 4, 1};
  int hkv = hkvs[rpick(4)];
  static const int gs[6] = {1, 2, 4, 8, 16, 3};
  int g = gs[rpick(6)];
  while (hkv * g > 16)
    g /= 2;
  c->num_kv_heads = hkv;
  c->num_q_heads = hkv * (g < 1 ? 1 : g);
  c->topk = 1 + rpick(16);
  if (rchance(5))
    c->topk = 17 + rpick(48);
  c->local_blocks = rpick(3);
  c->init_blocks = rpick(3);
  if (c->local_blocks > c->topk)
    c->local_blocks = c->topk;
  if (c->init_blocks > c->topk - c->local_blocks)
    c->init_blocks = c->topk - c->local_blocks;
  static const float scales[4] = {0.08838834764831845f, 0.125f, 0.05f, 1.0f};
  c->softmax_scale = scales[rpick(4)];
  c->head_dim = c->index_dim = c->block_size = 128;
  if (rchance(6)) { /* any float: valid if finite and > 0 */
    uint32_t u = rb32();
    memcpy(&c->softmax_scale, &u, 4);
    C->nice = c->softmax_scale >= 1e-3f && c->softmax_scale <= 1.0f;
    if (!(c->softmax_scale > 0) || isinf(c->softmax_scale))
      *ex |= EX_FAIL;
  }
  if (rchance(6)) {
    *ex |= EX_FAIL;
    switch (rpick(14)) {
    case 0: c->head_dim = rchance(50) ? 64 : 129; break;
    case 1: c->index_dim = 0; break;
    case 2: c->block_size = 64; break;
    case 3: c->num_kv_heads = -rpick(3); break;
    case 4: c->num_q_heads = 0; break;
    case 5: c->num_q_heads = 257 + rpick(100); break;
    case 6:
      if (c->num_kv_heads == 1)
        c->num_kv_heads = 2, c->num_q_heads = 3;
      else
        c->num_q_heads = c->num_kv_heads + 1;
      break;
    case 7: c->topk = 0; break;
    case 8: c->topk = 65 + rpick(1000); break;
    case 9: c->init_blocks = -1 - rpick(5); break;
    case 10: c->local_blocks = -1 - rpick(5); break;
    case 11: c->init_blocks = c->topk - c->local_blocks + 1 + rpick(3); break;
    case 12: {
      static const float bad[5] = {0.0f, -0.0f, -1.0f, INFINITY, NAN};
      c->softmax_scale = bad[rpick(5)];
      break;
    }
    default: C->p = NULL; break;
    }
  }
}

/* ======================================================================== */
/* batches                                                                  */
/* ======================================================================== */

int64_t g_budget = WORK_BUDGET;

int64_t need_pages(int s) { return s > 0 ? ((int64_t)s + BS - 1) / BS : 0; }

/* kind: 0 any, 1 uniform decode, 2 ragged */
void gen_batch_desc(bat *B, int kind, int hq, int hkv, int topk) {
  memset(B, 0, sizeof *B);
  B->num_reqs = rchance(8) ? 0 : 1 + rpick(4);
  if (rchance(10))
    B->num_reqs = 1 + rpick(MAX_REQS);
  B->uniform = kind == 1 || (kind == 0 && rchance(40));
  B->q_len = 1 + rpick(4);
  if (B->uniform && rchance(10))
    B->q_len = 5 + rpick(12);
  int ctx_total = 0;
  for (int r = 0; r < B->num_reqs; r++) {
    int n = B->uniform ? B->q_len : rchance(50) ? 1 + rpick(4) : rpick(25);
    if (!B->uniform && rchance(5))
      n = 0;
    int padded = rchance(10);
    int ctx = !rchance(30) ? rpick(400) : rpick(3000);
    if (rchance(10))
      ctx = 128 * (1 + rpick(20)) - n + rpick(3) - 1; /* near block boundaries */
    if (ctx < 0)
      ctx = 0;
    if (ctx_total + ctx + n > MAX_CTX_TOTAL)
      ctx = MAX_CTX_TOTAL - ctx_total - n > 0 ? MAX_CTX_TOTAL - ctx_total - n : 0;
    B->n[r] = n;
    B->s[r] = padded ? 0 : ctx + n;
    if (!padded && B->s[r] == 0 && n == 0 && rchance(50))
      B->s[r] = 1 + rpick(300); /* a request with no new tokens */
    ctx_total += B->s[r];
  }
  /* size budget: tokens and work */
  for (;;) {
    int64_t T = 0, work = 0;
    for (int r = 0; r < B->num_reqs; r++) {
      T += B->n[r];
      for (int i = 0; i < B->n[r] && B->s[r] > 0; i++) {
        int64_t pos = B->s[r] - B->n[r] + i, keys = pos + 1;
        if (keys > (int64_t)topk * BS)
          keys = (int64_t)topk * BS;
        work += keys * hq + (pos + 1) * hkv / 2;
      }
    }
    if (T <= MAX_T && work <= g_budget)
      break;
    int big = 0;
    for (int r = 1; r < B->num_reqs; r++)
      if (B->s[r] + B->n[r] * 64 > B->s[big] + B->n[big] * 64)
        big = r;
    if (T > MAX_T || B->s[big] <= B->n[big]) {
      if (B->uniform) {
        B->num_reqs--;
      } else if (B->n[big] > 0) {
        B->n[big] /= 2;
        if (B->s[big] > 0 && B->s[big] < B->n[big])
          B->s[big] = B->n[big];
      } else {
        B->num_reqs--;
      }
    } else {
      int ctx = B->s[big] - B->n[big];
      B->s[big] = ctx / 2 + B->n[big];
    }
  }
  int T = 0, mq = 0, ms = 0;
  B->qsl_base = rchance(30) ? rpick(100) : 0;
  B->qsl[0] = B->qsl_base;
  for (int r = 0; r < B->num_reqs; r++) {
    B->row0[r] = T;
    T += B->n[r];
    B->qsl[r + 1] = B->qsl[r] + B->n[r];
    mq = B->n[r] > mq ? B->n[r] : mq;
    ms = B->s[r] > ms ? B->s[r] : ms;
  }
  B->T = T;
  B->max_q_len = B->uniform ? B->q_len : mq + (rchance(20) ? rpick(5) : 0);
  B->max_seq_len = ms + (rchance(20) ? rpick(5000) : 0);
  if (rchance(4))
    B->max_seq_len = (int64_t)1 << 30;
  int64_t mp = 0;
  for (int r = 0; r < B->num_reqs; r++)
    mp = need_pages(B->s[r]) > mp ? need_pages(B->s[r]) : mp;
  B->cols = (int)mp + (rchance(30) ? rpick(3) : 0);
  B->icols = (int)mp + (rchance(30) ? rpick(3) : 0);
  B->same_table = rchance(30);
  if (B->same_table)
    B->icols = B->cols;
  if (B->cols == 0 && rchance(50))
    B->cols = B->icols = 1;
}

/* Assigns distinct pages from shared pools to the requests of several batches. */
void assign_pages(bat **list, int n) {
  int64_t need = 0;
  for (int k = 1; k < n; k++) {
    list[k]->same_table = list[0]->same_table;
    if (list[k]->same_table)
      list[k]->icols = list[k]->cols;
  }
  for (int k = 0; k < n; k++)
    for (int r = 0; r < list[k]->num_reqs; r++)
      need += need_pages(list[k]->s[r]);
  int64_t P = need + (rchance(50) ? rpick(3) : 0), Pi = need + (rchance(50) ? rpick(3) : 0);
  if (P == 0 && rchance(50))
    P = Pi = 1;
  int32_t *perm = (int32_t *)malloc(sizeof(int32_t) * (size_t)(P + 1));
  int32_t *iperm = (int32_t *)malloc(sizeof(int32_t) * (size_t)(Pi + 1));
  for (int64_t i = 0; i < P; i++)
    perm[i] = (int32_t)i;
  for (int64_t i = 0; i < Pi; i++)
    iperm[i] = (int32_t)i;
  for (int64_t i = P - 1; i > 0; i--) {
    int64_t j = rndn((int)i + 1);
    int32_t t = perm[i];
    perm[i] = perm[j];
    perm[j] = t;
  }
  for (int64_t i = Pi - 1; i > 0; i--) {
    int64_t j = rndn((int)i + 1);
    int32_t t = iperm[i];
    iperm[i] = iperm[j];
    iperm[j] = t;
  }
  int64_t used = 0;
  for (int k = 0; k < n; k++) {
    bat *B = list[k];
    B->P = P;
    B->Pi = B->same_table ? P : Pi;
    for (int r = 0; r < B->num_reqs; r++) {
      int64_t np = need_pages(B->s[r]);
      for (int c = 0; c < MAX_COLS; c++) {
        /* entries beyond the sequence are never read: junk, even out of range */
        int32_t junk = rndn(4) == 0 ? -1 : rndn(2) ? (int32_t)(rnd() | 0x40000000u) : rndn(1000);
        B->bt[r][c] = c < np ? perm[used + c] : junk;
        B->ibt[r][c] = B->same_table ? B->bt[r][c] : c < np ? iperm[used + c] : junk;
      }
      used += np;
    }
  }
  free(perm);
  free(iperm);
}

/* ======================================================================== */
/* context parallel (SPEC section 10)                                       */
/* ======================================================================== */

/* A batch.cp: zero with probability 1 - pct %; otherwise one rank spelled
 * {1, 0, I} / {0, 0, I}, 2..64 ranks (small interleaves, or huge ones), or
 * a value the header rules out (cp_size outside [0, 64], cp_rank outside
 * [0, max(cp_size, 1)), blocks_per_interleave < 1, or 0 with cp_size > 0).
 * Returns 1 when the API must accept it. */
int gen_cp(m3s_cp *cp, int pct) {
  memset(cp, 0, sizeof *cp);
  if (!rchance(pct))
    return 1;
  int kind = rpick(12);
  switch (kind) {
  case 0: *cp = (m3s_cp){1, 0, 1 + rpick(4)}; return 1;
  case 1: *cp = (m3s_cp){0, 0, rchance(30) ? INT_MAX : rpick(3)}; return 1;
  case 2:
  case 3:
  case 4:
  case 5:
  case 6: {
    int n = kind == 6 ? 2 + rpick(M3S_MAX_CP_SIZE - 1) : 2 + rpick(3);
    int il = 1 + rpick(3);
    if (rchance(10))
      il = rchance(50) ? INT_MAX - rpick(3) : 1 << (4 + rpick(26));
    *cp = (m3s_cp){n, rpick(n), il};
    return 1;
  }
  case 7: /* cp_size out of range */
    cp->cp_size = rchance(50)   ? M3S_MAX_CP_SIZE + 1 + rpick(2)
                  : rchance(50) ? -1 - rpick(3)
                  : rchance(50) ? INT_MIN
                                : INT_MAX;
    cp->blocks_per_interleave = 1 + rpick(2);
    return 0;
  case 8:
  case 9: { /* cp_rank out of range */
    int n = rpick(6);
    cp->cp_size = n;
    cp->blocks_per_interleave = 1 + rpick(2);
    cp->cp_rank = rchance(50) ? (n > 1 ? n : 1) + rpick(3) : rchance(80) ? -1 - rpick(3) : INT_MIN;
    return 0;
  }
  case 10: /* interleave 0 or negative with ranks */
    cp->cp_size = 1 + rpick(4);
    cp->cp_rank = rpick(cp->cp_size);
    cp->blocks_per_interleave = rchance(50) ? 0 : rchance(80) ? -1 - rpick(3) : INT_MIN;
    return 0;
  default: /* negative interleave without ranks */
    cp->cp_size = 0;
    cp->blocks_per_interleave = -1 - rpick(3);
    return 0;
  }
}

/* The harness's own ownership rule, from the header: block b belongs to rank
 * (b / I) % cp_size; cp_size 0 and 1 mean one rank owning every block. */
int cp_owns(const m3s_cp *cp, int64_t b) {
  if (cp->cp_size <= 1)
    return 1;
  return (b / cp->blocks_per_interleave) % cp->cp_size == cp->cp_rank;
}

/* Blocks of [0, nb) the rank owns, counted (not from the column formula). */
int64_t cp_owned_count(const m3s_cp *cp, int64_t nb) {
  int64_t n = 0;
  for (int64_t b = 0; b < nb; b++)
    n += cp_owns(cp, b);
  return n;
}

/* The failure bit a batch's cp adds to the expectation. */
int cp_ex(const bat *B) { return B->cp_status ? EX_FAIL : 0; }

/* With nothing else wrong with the call (ex == 0), a cp the header rules out
 * or an operation that refuses an active cp must give the documented status. */
void cp_check(const bat *B, int ex, m3s_status st) {
  if (st == M3S_OK && B->cp_on && !ex)
    S.cp_active_ok++;
  if (!ex && B->cp_status && st != B->cp_status)
    die("batch.cp {cp_size %d, cp_rank %d, blocks_per_interleave %d}: status %d, the header "
        "prescribes %d (%s)",
        B->cp.cp_size, B->cp.cp_rank, B->cp.blocks_per_interleave, (int)st, (int)B->cp_status,
        m3s_status_string(B->cp_status));
}

/* NaN in every page of a block the rank does not own (pages of the batch's
 * requests only): a read of one shows in the fp64 comparison. */
void poison_unowned(const bat *B, const targ *cache, int hkv, int is_index) {
  if (!B->cp_on || !cache->b || cache->broken || cache->t.ndim != cache->ndim)
    return;
  size_t es = esz(cache->t.dtype);
  for (int r = 0; r < B->num_reqs; r++)
    for (int64_t b = 0; b < need_pages(B->s[r]); b++) {
      if (cp_owns(&B->cp, b))
        continue;
      int64_t page = is_index ? B->ibt[r][b] : B->bt[r][b];
      for (int g = 0; g < (is_index ? 1 : hkv); g++)
        for (int j = 0; j < BS; j++) {
          unsigned char *p = is_index ? trow(cache, I4(page, j, 0, 0), D)
                                      : trow(cache, I4(page, g, j, 0), 2 * D);
          for (int d = 0; p && d < (is_index ? D : 2 * D); d++)
            put_nan(p + (size_t)d * es, cache->t.dtype);
        }
    }
}

/* batch.cp from the policy; with a valid cp_size > 1 the rank-local tables:
 * owned block b of request r at the column counted over the owned blocks
 * before it, junk (-7, or anything) in every other column. */
static void mk_batch_cp(bat *B) {
  B->cp_on = 0;
  B->cp_status = M3S_OK;
  memset(&B->cp, 0, sizeof B->cp);
  if (B->cp_pol == CP_NONE)
    return;
  if (!gen_cp(&B->cp, B->cp_pct ? B->cp_pct : 20)) {
    B->cp_status = M3S_ERR_INVALID;
    return;
  }
  if (B->cp.cp_size <= 1)
    return;
  B->cp_on = 1;
  if (B->cp_pol == CP_REFUSE)
    B->cp_status = M3S_ERR_INVALID;
  else if (B->cp_pol == CP_UNSUP)
    B->cp_status = M3S_ERR_UNSUPPORTED;
  int64_t mp = 0;
  for (int r = 0; r < B->num_reqs; r++) {
    int64_t n = 0;
    for (int64_t b = 0; b < need_pages(B->s[r]); b++)
      if (cp_owns(&B->cp, b)) {
        B->lbt[r][n] = B->bt[r][b];
        B->libt[r][n++] = B->ibt[r][b];
      }
    mp = n > mp ? n : mp;
    for (int64_t c = n; c < MAX_COLS; c++) {
      int32_t junk = rndn(2) ? -7 : (int32_t)rnd();
      B->lbt[r][c] = junk;
      B->libt[r][c] = B->same_table ? junk : rndn(2) ? -7 : (int32_t)rnd();
    }
  }
  B->lcols = (int)mp + (rchance(30) ? rpick(3) : 0);
  B->licols = B->same_table ? B->lcols : (int)mp + (rchance(30) ? rpick(3) : 0);
}

/* Tensors of a batch, mutations of its counts and values. */
void mk_batch(bat *B, int uses_main, int uses_idx, int allow_null, int *ex) {
  int nonempty = B->num_reqs > 0 || B->T > 0;
  mk_batch_cp(B);
  /* the tables passed: the whole request's, or the rank's under cp */
  int32_t(*tb)[MAX_COLS] = B->cp_on ? B->lbt : B->bt;
  int32_t(*itb)[MAX_COLS] = B->cp_on ? B->libt : B->ibt;
  int *cols = B->cp_on ? &B->lcols : &B->cols, *icols = B->cp_on ? &B->licols : &B->icols;
  int mutate = rchance(12);
  int kind = mutate ? rpick(16) : -1;
  if (kind == 15)
    B->chaos = 1;
  int nr = B->num_reqs;
  /* count and value mutations that the API must reject */
  int maxn = 0, maxs = 0, rn2 = -1, rpage = -1;
  int64_t ncols[MAX_REQS], maxc = 0; /* table columns each request needs */
  for (int r = 0; r < nr; r++) {
    maxn = B->n[r] > maxn ? B->n[r] : maxn;
    maxs = B->s[r] > maxs ? B->s[r] : maxs;
    ncols[r] = B->cp_on ? cp_owned_count(&B->cp, need_pages(B->s[r])) : need_pages(B->s[r]);
    maxc = ncols[r] > maxc ? ncols[r] : maxc;
    if (B->n[r] >= 2 && B->s[r] > 0)
      rn2 = r;
    if (ncols[r] > 0)
      rpage = r;
  }
  int neg_count = 0;
  switch (kind) {
  case 0: neg_count = 1; break;
  case 1:
    if (nonempty) {
      B->max_seq_len = ((int64_t)1 << 30) + 1 + rpick(1000);
      *ex |= EX_FAIL;
    }
    break;
  case 2:
    if (B->uniform) {
      B->T += 1 + rpick(3); /* num_tokens != num_reqs * q_len */
      *ex |= EX_FAIL;
    } else if (nr > 0) {
      int r = rpick(nr);
      B->qsl[r + 1] = B->qsl[r] - 1 - rpick(5);
      *ex |= EX_FAIL;
    }
    break;
  case 3:
    if (!B->uniform && nonempty) {
      B->qsl[0] = -1 - rpick(50);
      *ex |= EX_FAIL;
    } else if (B->uniform && nonempty) {
      B->max_q_len = B->q_len + 1;
      *ex |= EX_FAIL;
    }
    break;
  case 4:
    if (maxn >= 1 && !B->uniform) {
      B->max_q_len = maxn - 1;
      *ex |= EX_FAIL;
    }
    break;
  case 5:
    if (maxs >= 1) {
      B->max_seq_len = maxs - 1;
      *ex |= EX_FAIL;
    }
    break;
  case 6:
    if (rn2 >= 0) {
      B->s[rn2] = 1 + rpick(B->n[rn2] - 1);
      *ex |= EX_FAIL;
    }
    break;
  case 7:
    if (nr > 0) {
      B->s[rpick(nr)] = -1 - rpick(1000);
      *ex |= EX_FAIL;
    }
    break;
  case 8:
  case 9:
    if (rpage >= 0 && (kind == 8 ? uses_main : uses_idx)) {
      int c = rpick((int)ncols[rpage]);
      int64_t bad = rchance(50) ? -1 - rpick(10) : (kind == 8 ? B->P : B->Pi) + rpick(10);
      if (kind == 8 || B->same_table)
        tb[rpage][c] = (int32_t)bad;
      if (kind == 9 || B->same_table)
        itb[rpage][c] = (int32_t)bad;
      *ex |= EX_FAIL;
    }
    break;
  case 10:
  case 11:
    if (maxc >= 1 && (kind == 10 ? uses_main : uses_idx)) {
      if (kind == 10 || B->same_table)
        *cols = (int)maxc - 1;
      if (kind == 11 || B->same_table)
        *icols = (int)maxc - 1;
      *ex |= EX_FAIL;
    }
    break;
  case 12: neg_count = 2; break;
  case 13: neg_count = 3; break;
  case 14: neg_count = 4; break;
  default: break;
  }
  /* tensors */
  int mp = 12, ragged = !B->uniform;
  tspec sq = {"batch.query_start_loc", M3S_I32, MASK(M3S_I32), 1, {nr + 1}, 0, 0, 0,
              nonempty && ragged,      mp,      NULL,          0};
  tspec ss = {"batch.seq_lens", M3S_I32, MASK(M3S_I32), 1, {nr}, 0, 0, 0, nonempty, mp, NULL, 0};
  tspec st = {"batch.block_table",
              M3S_I32,
              MASK(M3S_I32),
              2,
              {nr, *cols},
              0,
              0,
              2u,
              nonempty && (uses_main || (B->same_table && uses_idx)),
              mp,
              NULL,
              0};
  tspec sit = {"batch.index_block_table", M3S_I32, MASK(M3S_I32), 2, {nr, *icols}, 0, 0, 2u,
               nonempty && uses_idx,      mp,      NULL,          0};
  mk(&B->tq, &sq, ex);
  mk(&B->ts, &ss, ex);
  mk(&B->tt, &st, ex);
  if (B->same_table)
    B->tit = B->tt;
  else
    mk(&B->tit, &sit, ex);
  for (int r = 0; r <= nr; r++)
    tseti(&B->tq, I4(r, 0, 0, 0), B->qsl[r]);
  for (int r = 0; r < nr; r++) {
    tseti(&B->ts, I4(r, 0, 0, 0), B->s[r]);
    for (int c = 0; c < *cols; c++)
      tseti(&B->tt, I4(r, c, 0, 0), tb[r][c]);
    if (!B->same_table)
      for (int c = 0; c < *icols; c++)
        tseti(&B->tit, I4(r, c, 0, 0), itb[r][c]);
  }
  if (B->chaos) { /* random values in the batch's index tensors: any status */
    *ex |= EX_ANY;
    targ *ts[4] = {&B->tq, &B->ts, &B->tt, &B->tit};
    for (int k = 0, n = 1 + rpick(4); k < n; k++) {
      targ *a = ts[rpick(4)];
      if (a->b && a->b->bytes >= 4 && !a->broken) {
        size_t at = (size_t)rndn((int)(a->b->bytes / 4)) * 4;
        int32_t v = rchance(50) ? (int32_t)rnd() : rpick(300) - 20;
        memcpy(a->b->data + at, &v, 4);
      }
    }
  }
  m3s_batch *b = &B->b;
  memset(b, 0, sizeof *b);
  b->num_reqs = nr;
  b->num_tokens = B->T;
  b->uniform_q_len = B->uniform ? B->q_len : 0;
  b->max_q_len = B->max_q_len;
  b->max_seq_len = B->max_seq_len;
  b->cp = B->cp;
  if (B->tq.p)
    b->query_start_loc = B->tq.t;
  if (B->ts.p)
    b->seq_lens = B->ts.t;
  if (B->tt.p)
    b->block_table = B->tt.t;
  if (B->tit.p)
    b->index_block_table = B->tit.t;
  /* a NULL tensor pointer cannot be expressed inside a batch: a zeroed view
   * (ndim 0, data NULL) stands for it; it is rejected (wrong ndim) when used */
  if (neg_count) {
    *ex |= EX_FAIL;
    switch (neg_count) {
    case 1: b->num_reqs = -1 - rpick(3); break;
    case 2: b->num_tokens = -1 - rpick(3); break;
    case 3: b->max_q_len = -1 - rpick(3); break;
    default: b->max_seq_len = -1 - rpick(3); break;
    }
  }
  B->p = allow_null && rchance(3) ? (*ex |= EX_FAIL, (const m3s_batch *)NULL) : b;
}

/* position of row i of request r; -1 when padded or inconsistent */
int64_t bpos(const bat *B, int r, int64_t i) {
  if (B->s[r] <= 0 || B->s[r] < B->n[r])
    return -1;
  return B->s[r] - B->n[r] + i;
}

/* ======================================================================== */
/* fp8 scales                                                               */
/* ======================================================================== */

void gen_scales(scl_t *S_, m3s_dtype cdt, int hkv, int64_t P, int nice, int *ex) {
  memset(S_, 0, sizeof *S_);
  int fp8 = cdt == M3S_E4M3 || cdt == M3S_E5M2;
  S_->nice = 1;
  S_->fp8 = fp8;
  if (rchance(25)) {
    S_->p = NULL;
    return;
  }
  S_->p = &S_->s;
  targ *side[2] = {&S_->k, &S_->v};
  m3s_tensor *dst[2] = {&S_->s.k_scale, &S_->s.v_scale};
  for (int k = 0; k < 2; k++) {
    int mode = rpick(4); /* 0 zeroed view, 1 scalar ndim 0, 2 scalar [1], 3 per slot */
    tspec sp = {k ? "scales.v_scale" : "scales.k_scale",
                M3S_F32,
                MASK(M3S_F32),
                0,
                {0},
                0,
                0,
                0,
                0,
                0,
                NULL,
                0};
    if (mode == 2)
      sp.ndim = 1, sp.shape[0] = 1;
    if (mode == 3)
      sp.ndim = 2, sp.shape[0] = hkv, sp.shape[1] = P * BS;
    if (mode == 0) {
      memset(side[k], 0, sizeof(targ));
      S_->mode[k] = 0;
      if (rchance(20)) {
        dst[k]->ndim = rchance(50) ? -1 : 5; /* not a view at all */
        if (fp8)
          *ex |= EX_FAIL;
      } else if (rchance(20)) {
        dst[k]->ndim = rpick(5); /* any rank, data NULL: scale 1 */
      }
      continue;
    }
    mk(side[k], &sp, ex);
    targ *a = side[k];
    S_->mode[k] = mode == 3 ? 2 : 1;
    /* values */
    if (a->b && !a->broken) {
      for (size_t i = 0; i + 4 <= a->b->bytes; i += 4) {
        float f;
        if (nice) {
          static const float pw[5] = {0.25f, 0.5f, 1.0f, 2.0f, 4.0f};
          f = pw[rndn(5)];
        } else {
          uint32_t u = (uint32_t)rnd();
          memcpy(&f, &u, 4);
        }
        memcpy(a->b->data + i, &f, 4);
      }
    }
    if (!nice && fp8)
      S_->nice = 0;
    *dst[k] = a->t;
    if (!a->p) /* NULL mutation: a zeroed view, data NULL = scale 1 */
      memset(dst[k], 0, sizeof(m3s_tensor)), S_->mode[k] = 0;
    /* mutations of scale views */
    if (rchance(10)) {
      switch (rpick(6)) {
      case 0: dst[k]->dtype = M3S_BF16; break;
      case 1: dst[k]->ndim = 3; break;
      case 2:
        if (mode == 3)
          dst[k]->shape[1] += 1;
        else
          dst[k]->ndim = 1, dst[k]->shape[0] = 2, dst[k]->stride[0] = 1;
        break;
      case 3:
        if (mode == 3)
          dst[k]->shape[0] += 1;
        else
          dst[k]->device = 0;
        break;
      case 4: dst[k]->device = 1; break;
      default:
        dst[k]->stride[0] = -1;
        if (dst[k]->ndim == 0)
          dst[k]->ndim = 1, dst[k]->shape[0] = 1;
        break;
      }
      if (dst[k]->data && fp8)
        *ex |= EX_FAIL;
      if (!dst[k]->data)
        S_->mode[k] = 0;
      /* (the mutated view is dishonest only in ways that are rejected) */
    }
  }
  if (!fp8) { /* ignored for 16-bit caches: scramble them completely */
    if (rchance(30)) {
      S_->s.k_scale.ndim = 77;
      S_->s.v_scale.dtype = (m3s_dtype)99;
    }
  }
}

double scale_at(const scl_t *S_, int is_v, int64_t g, int64_t slot) {
  if (!S_->p || !S_->fp8)
    return 1.0;
  const m3s_tensor *t = is_v ? &S_->s.v_scale : &S_->s.k_scale;
  int mode = S_->mode[is_v];
  if (mode == 0 || !t->data)
    return 1.0;
  const targ *a = is_v ? &S_->v : &S_->k;
  if (mode == 1)
    return *(const float *)t->data;
  return tgetf(a, I4(g, slot, 0, 0));
}

/* ======================================================================== */
