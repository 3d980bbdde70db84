/* m3s-bench: the case lists (--all, --full, --ops over the shape lists) and the
 * parsing of their flags. */
#include "bench.h"

void case_shape(const case_spec *c, const options *o, char *buf, size_t n) {
  char ctx[32], extra[64] = "";
  fmt_ctx(ctx, sizeof ctx, c->ctx);
  size_t e = 0;
  if (c->kv_dt >= 0 && c->kv_dt != M3S_BF16)
    e += (size_t)snprintf(extra + e, sizeof extra - e, " kv:%s", m3s_dtype_name((m3s_dtype)c->kv_dt));
  if (c->idx_dt >= 0 && c->idx_dt != M3S_BF16)
    e += (size_t)snprintf(extra + e, sizeof extra - e, " idx:%s",
                          m3s_dtype_name((m3s_dtype)c->idx_dt));
  if (c->skew > 1)
    e += (size_t)snprintf(extra + e, sizeof extra - e, " skew%d", c->skew);
  if (c->kv_dt >= 0 && o->token_major)
    snprintf(extra + e, sizeof extra - e, " tm");
  if (op_prefill(c->op) && c->bs > 1)
    snprintf(buf, n, "TP%d %dx%d new @ctx0..%s%s", c->tp, c->bs, c->qlen, ctx, extra);
  else if (op_prefill(c->op))
    snprintf(buf, n, "TP%d %d new @ctx%s%s", c->tp, c->qlen, ctx, extra);
  else
    snprintf(buf, n, "TP%d bs%d q%d ctx%s%s", c->tp, c->bs, c->qlen, ctx, extra);
}

/* "8K" -> 8192, "1M" -> 1048576, "4096" -> 4096; -1 on error. */
int64_t parse_size(const char *s) {
  char *end = NULL;
  long long v = strtoll(s, &end, 10);
  if (end == s || v < 0)
    return -1;
  if (*end == 'k' || *end == 'K')
    v *= 1024, end++;
  else if (*end == 'm' || *end == 'M')
    v *= 1048576, end++;
  return *end ? -1 : v;
}

int parse_list64(const char *arg, int64_t *out, int *count, const char *flag) {
  char buf[512];
  snprintf(buf, sizeof buf, "%s", arg);
  *count = 0;
  for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
    int64_t v = parse_size(tok);
    if (v < 0 || *count >= MAX_LIST) {
      fprintf(stderr, "m3s-bench: bad value '%s' for %s\n", tok, flag);
      return 0;
    }
    out[(*count)++] = v;
  }
  if (*count == 0) {
    fprintf(stderr, "m3s-bench: empty list for %s\n", flag);
    return 0;
  }
  return 1;
}

int parse_list_int(const char *arg, int *out, int *count, const char *flag, int64_t lo,
                   int64_t hi) {
  int64_t tmp[MAX_LIST];
  if (!parse_list64(arg, tmp, count, flag))
    return 0;
  for (int i = 0; i < *count; i++) {
    if (tmp[i] < lo || tmp[i] > hi) {
      fprintf(stderr, "m3s-bench: %s value %lld outside [%lld, %lld]\n", flag, (long long)tmp[i],
              (long long)lo, (long long)hi);
      return 0;
    }
    out[i] = (int)tmp[i];
  }
  return 1;
}

int parse_dtypes(const char *arg, int *out, int *count, const char *flag) {
  char buf[256];
  snprintf(buf, sizeof buf, "%s", arg);
  *count = 0;
  for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
    int dt = !strcmp(tok, "bf16") ? M3S_BF16 : !strcmp(tok, "e4m3") ? M3S_E4M3 : -1;
    if (dt < 0 || *count >= MAX_LIST) {
      fprintf(stderr, "m3s-bench: %s takes bf16 and/or e4m3, got '%s'\n", flag, tok);
      return 0;
    }
    out[(*count)++] = dt;
  }
  return *count > 0;
}

int parse_ops(const char *arg, unsigned *mask) {
  char buf[256];
  snprintf(buf, sizeof buf, "%s", arg);
  *mask = 0;
  for (char *tok = strtok(buf, ","); tok; tok = strtok(NULL, ",")) {
    int found = 0;
    for (int i = 0; i < OP_COUNT; i++)
      if (!strcmp(tok, k_op_key[i]))
        *mask |= 1u << i, found = 1;
    if (!strcmp(tok, "decode"))
      *mask |= 7u, found = 1;
    if (!strcmp(tok, "prefill"))
      *mask |= 7u << 3, found = 1;
    if (!found) {
      fprintf(stderr,
              "m3s-bench: unknown op '%s' (topk, attn, step, ptopk, pattn, pstep, decode, "
              "prefill)\n",
              tok);
      return 0;
    }
  }
  return *mask != 0;
}

/* The selected cases and their results (main.c fills, run.c and report.c read). */
int g_ncases;

case_result g_res[MAX_CASES];

static void add_case(int op, int tp, int bs, int qlen, int64_t ctx, int kv, int idx, int skew) {
  case_spec c;
  memset(&c, 0, sizeof c); /* padding too: cases are compared with memcmp */
  c.op = op, c.tp = tp, c.bs = bs, c.qlen = qlen, c.ctx = ctx;
  c.kv_dt = op_uses_kv(op) ? kv : -1;
  c.idx_dt = op_uses_idx(op) ? idx : -1;
  c.skew = op_prefill(op) || bs < 2 ? 1 : skew;
  for (int i = 0; i < g_ncases; i++)
    if (!memcmp(&g_res[i].c, &c, sizeof c))
      return;
  if (g_ncases >= MAX_CASES)
    return;
  memset(&g_res[g_ncases], 0, sizeof g_res[g_ncases]);
  g_res[g_ncases++].c = c;
}

/* The default set (--all): 24 rows, chosen to fit a short table. */
void build_all(const options *o) {
  static const struct {
    int op, tp, bs, qlen;
    int64_t ctx;
  } k[] = {
      {OP_TOPK, 1, 1, 1, 32768},   {OP_TOPK, 1, 32, 1, 32768},   {OP_TOPK, 1, 128, 1, 32768},
      {OP_TOPK, 1, 128, 1, 131072}, {OP_ATTN, 1, 1, 1, 32768},   {OP_ATTN, 1, 32, 1, 32768},
      {OP_ATTN, 1, 128, 1, 32768}, {OP_STEP, 1, 1, 1, 32768},    {OP_STEP, 1, 32, 1, 8192},
      {OP_STEP, 1, 32, 1, 32768},  {OP_STEP, 1, 32, 1, 131072},  {OP_STEP, 1, 128, 1, 32768},
      {OP_STEP, 1, 128, 1, 131072}, {OP_TOPK, 1, 32, 4, 32768},  {OP_ATTN, 1, 32, 4, 32768},
      {OP_STEP, 1, 32, 4, 32768},  {OP_TOPK, 8, 128, 1, 32768},  {OP_ATTN, 8, 128, 1, 32768},
      {OP_STEP, 8, 128, 1, 32768}, {OP_STEP, 8, 32, 4, 32768},
  };
  int chunk = o->nchunk ? o->chunks[0] : 4096;
  for (int kv = 0; kv < o->nkv; kv++)
    for (int ix = 0; ix < o->nidx; ix++) {
      for (size_t i = 0; i < sizeof k / sizeof k[0]; i++)
        add_case(k[i].op, k[i].tp, k[i].bs, k[i].qlen, k[i].ctx, o->kvs[kv], o->idxs[ix],
                 o->skew);
      add_case(OP_PTOPK, 1, 1, chunk, 0, o->kvs[kv], o->idxs[ix], 1);
      add_case(OP_PTOPK, 1, 1, chunk, 32768, o->kvs[kv], o->idxs[ix], 1);
      add_case(OP_PATTN, 1, 1, chunk, 0, o->kvs[kv], o->idxs[ix], 1);
      add_case(OP_PATTN, 1, 1, chunk, 32768, o->kvs[kv], o->idxs[ix], 1);
    }
}

/* The product of the flag lists for the selected ops. */
void build_matrix(const options *o) {
  for (int op = 0; op < OP_COUNT; op++) {
    if (!(o->ops & (1u << op)))
      continue;
    for (int kv = 0; kv < o->nkv; kv++)
      for (int ix = 0; ix < o->nidx; ix++)
        for (int t = 0; t < o->ntp; t++) {
          if (op_prefill(op)) {
            for (int p = 0; p < o->npctx; p++)
              for (int ch = 0; ch < o->nchunk; ch++)
                add_case(op, o->tps[t], o->prefill_reqs, o->chunks[ch], o->pctxs[p], o->kvs[kv],
                         o->idxs[ix], 1);
            continue;
          }
          for (int b = 0; b < o->nbs; b++)
            for (int q = 0; q < o->nq; q++)
              for (int x = 0; x < o->nctx; x++)
                add_case(op, o->tps[t], o->bss[b], o->qlens[q], o->ctxs[x], o->kvs[kv],
                         o->idxs[ix], o->skew);
        }
  }
}
