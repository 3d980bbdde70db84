/*
 * m3s_bench.c -- m3s-bench: timings of the m3sparse CUDA backend through the
 * public API, against ceilings measured on the same card.
 *
 * CASES (one table row each):
 *   decode topk   m3s_index_topk, uniform decode batch
 *   decode attn   m3s_sparse_attention, uniform decode batch, host-made top-k
 *   decode step   m3s_step_forward with only a decode part (top-k + attention)
 *   prefill topk / attn / step: one request, a chunk of new tokens behind a
 *                 cached context (query_start_loc batch)
 * Shapes: MiniMax-M3 per TP rank (m3s_config_minimax_m3: TP1 64/4, TP8 8/1,
 * K 16, local 1), batch size, q_len (1 + speculative tokens), context; bf16
 * activations; bf16 or e4m3 main K/V cache (scalar scales), bf16 or e4m3 index
 * cache; head-major or token-major cache layout.
 *
 * INPUTS. Caches, queries and index queries are N(0,1) values written on the
 * device by a hash-based fill (bench/fill.cu), never zeros. Each request's
 * pages are a shuffled run of one large page pool. Decode sequence lengths are
 * the context minus a small per-request jitter (partial last blocks differ).
 * Top-k input of the attention cases is made on the host: the query's own
 * block plus distinct random earlier blocks, ascending; tokens of one 128-token
 * query block share one random candidate order (--sel token: independent).
 *
 * METHOD (.library/device/METHOD.md): every case holds S "sets" (block tables
 * over disjoint page ranges of the pool, own q / iq / top-k input), with S
 * chosen so that the bytes of the other S-1 sets exceed 2x the L2 between two
 * uses of one set. Each set runs once eagerly (status checked; UNSUPPORTED is
 * reported and the case skipped), is captured into a CUDA graph (one per set)
 * and replayed --warmup times; then a spin kernel holds the stream while the host
 * enqueues N replays cycling through the sets, each bracketed by CUDA events;
 * the median and the minimum of the N event times are reported. If capture
 * fails the case is timed with eager calls the same way and marked '*'.
 *
 * BYTES AND FLOPS (the least a kernel must move / compute):
 *   top-k:     index keys of each request once (seq_len x 256 B bf16, 128 B
 *              e4m3), iq, top-k output, block table; 2*128 flops per scored
 *              (token, index head, visible key). Tokens with nb <= K take every
 *              block and need no scores (nor their request's keys, if all do).
 *   attention: K and V rows (256 x elem bytes) of every distinct visible key
 *              of the selected blocks per (request, KV head), q, out (+lse),
 *              top-k; 4*128 flops per attended (token, q head, key)
 *   step:      both, without the top-k intermediate; its attention part counts
 *              the blocks the library's own top-k chose (read back after the
 *              warm-up call of each set).
 * Ceilings measured at start: HBM copy (cudaMemcpy device to device, read +
 * write bytes / time, median) and bf16 GEMM (cublasGemmEx 8192^3, fp32
 * compute, median). %HBM and %GEMM are fractions of those.
 */
#define _POSIX_C_SOURCE 200809L
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "m3sparse.h"

/* bench/fill.cu */
int m3sb_fill_bf16(void *p, size_t n, uint64_t seed, float scale, void *stream);
int m3sb_fill_e4m3(void *p, size_t n, uint64_t seed, float scale, void *stream);
int m3sb_spin(unsigned long long ns, void *stream);

#define EXIT_NO_GPU 77
#define GIB (1024.0 * 1024.0 * 1024.0)
#define MAX_LIST 16
#define MAX_CASES 4096

/* ------------------------------------------------------------------------ */
/* cases                                                                     */

enum { OP_TOPK, OP_ATTN, OP_STEP, OP_PTOPK, OP_PATTN, OP_PSTEP, OP_COUNT };
static const char *const k_op_key[OP_COUNT] = {"topk", "attn", "step", "ptopk", "pattn", "pstep"};
static const char *const k_op_name[OP_COUNT] = {"decode topk",  "decode attn",  "decode step",
                                                "prefill topk", "prefill attn", "prefill step"};

static int op_prefill(int op) { return op >= OP_PTOPK; }
static int op_uses_idx(int op) { return op != OP_ATTN && op != OP_PATTN; }
static int op_uses_kv(int op) { return op != OP_TOPK && op != OP_PTOPK; }

typedef struct {
  int op, tp, bs, qlen; /* prefill: bs 1, qlen = chunk of new tokens */
  int64_t ctx;          /* decode: context (max seq_len); prefill: cached tokens */
  int kv_dt, idx_dt;    /* m3s_dtype, or -1 where the op does not read that cache */
  int skew;             /* decode: requests 1.. get ctx / skew (1: all about ctx) */
} case_spec;

enum { RES_PENDING, RES_OK, RES_UNSUPPORTED, RES_ERROR, RES_SKIPPED };

typedef struct {
  case_spec c;
  int status;
  int eager;          /* timed without a graph (capture failed or --no-graph) */
  int sets, reps;
  double med_us, min_us, p90_us, max_us;
  double bytes, flops;
  char kernel[96]; /* m3s_query_support's kernel name(s) */
  char note[256];
} case_result;

static void note_add(case_result *r, const char *fmt, ...) {
  size_t len = strlen(r->note);
  if (len + 3 >= sizeof r->note)
    return;
  if (len)
    len += (size_t)snprintf(r->note + len, sizeof r->note - len, "; ");
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(r->note + len, sizeof r->note - len, fmt, ap);
  va_end(ap);
}

typedef struct {
  int all, full, list;
  unsigned ops;
  int tps[MAX_LIST], ntp;
  int bss[MAX_LIST], nbs;
  int qlens[MAX_LIST], nq;
  int64_t ctxs[MAX_LIST];
  int nctx;
  int64_t pctxs[MAX_LIST];
  int npctx;
  int chunks[MAX_LIST], nchunk;
  int kvs[MAX_LIST], nkv;
  int idxs[MAX_LIST], nidx;
  int skew;
  int token_major, lse, sel_token, no_graph, no_ceilings, batch_invariant;
  int reps, warmup, max_sets, sets_force, device, gemm_n;
  double budget_s, case_budget_s, mem_gb, hbm_override, gemm_override;
  const char *csv;
} options;

/* ------------------------------------------------------------------------ */
/* small helpers                                                             */

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t splitmix(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
static size_t align_up(size_t x, size_t a) { return (x + a - 1) / a * a; }

static void fmt_ctx(char *buf, size_t n, int64_t v) {
  if (v >= 1048576 && v % 1048576 == 0)
    snprintf(buf, n, "%lldM", (long long)(v / 1048576));
  else if (v >= 1024 && v % 1024 == 0)
    snprintf(buf, n, "%lldK", (long long)(v / 1024));
  else
    snprintf(buf, n, "%lld", (long long)v);
}

static void case_shape(const case_spec *c, const options *o, char *buf, size_t n) {
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
  if (op_prefill(c->op))
    snprintf(buf, n, "TP%d %d new @ctx%s%s", c->tp, c->qlen, ctx, extra);
  else
    snprintf(buf, n, "TP%d bs%d q%d ctx%s%s", c->tp, c->bs, c->qlen, ctx, extra);
}

/* "8K" -> 8192, "1M" -> 1048576, "4096" -> 4096; -1 on error. */
static int64_t parse_size(const char *s) {
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

static int parse_list64(const char *arg, int64_t *out, int *count, const char *flag) {
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

static int parse_list_int(const char *arg, int *out, int *count, const char *flag, int64_t lo,
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

static int parse_dtypes(const char *arg, int *out, int *count, const char *flag) {
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

static int parse_ops(const char *arg, unsigned *mask) {
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

/* ------------------------------------------------------------------------ */
/* case lists                                                                */

static int g_ncases;
static case_result g_res[MAX_CASES];

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
static void build_all(const options *o) {
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
static void build_matrix(const options *o) {
  for (int op = 0; op < OP_COUNT; op++) {
    if (!(o->ops & (1u << op)))
      continue;
    for (int kv = 0; kv < o->nkv; kv++)
      for (int ix = 0; ix < o->nidx; ix++)
        for (int t = 0; t < o->ntp; t++) {
          if (op_prefill(op)) {
            for (int p = 0; p < o->npctx; p++)
              for (int ch = 0; ch < o->nchunk; ch++)
                add_case(op, o->tps[t], 1, o->chunks[ch], o->pctxs[p], o->kvs[kv], o->idxs[ix],
                         1);
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

/* ------------------------------------------------------------------------ */
/* per-case geometry (host only)                                             */

typedef struct {
  case_spec c;
  m3s_layer_config cfg;
  int Hq, Hkv, K, G;
  int R, T, maxp;
  int64_t pps, max_seq; /* pages of one set; largest seq_len */
  int *n;               /* new tokens per request */
  int32_t *seq, *qsl;
  size_t kvrow, kvpage, idxrow, idxpage; /* bytes (0 when the op does not read it) */
  double est_bytes;                      /* analytic bytes per call, for the set count */
  /* analytic top-k part */
  double topk_bytes, topk_flops;
} geom;

static void geom_free(geom *g) {
  free(g->n);
  free(g->seq);
  free(g->qsl);
  memset(g, 0, sizeof *g);
}

static int geom_init(geom *g, const case_spec *c) {
  memset(g, 0, sizeof *g);
  g->c = *c;
  g->cfg = m3s_config_minimax_m3(c->tp);
  if (g->cfg.num_q_heads == 0)
    return 0;
  g->Hq = g->cfg.num_q_heads;
  g->Hkv = g->cfg.num_kv_heads;
  g->K = g->cfg.topk;
  g->G = g->Hq / g->Hkv;
  g->R = c->bs;
  g->n = malloc(sizeof(int) * (size_t)g->R);
  g->seq = malloc(sizeof(int32_t) * (size_t)g->R);
  g->qsl = malloc(sizeof(int32_t) * (size_t)(g->R + 1));
  if (!g->n || !g->seq || !g->qsl)
    return 0;
  g->qsl[0] = 0;
  for (int r = 0; r < g->R; r++) {
    int64_t s;
    if (op_prefill(c->op)) {
      s = c->ctx + c->qlen;
    } else {
      /* request 0 has the full context; the others lose a jitter < 128
       * (and, with --skew N, have ctx / N: one long request among short) */
      int64_t jitter = r ? (int64_t)((r * 2654435761u) % 128u) : 0;
      s = (r && c->skew > 1 ? c->ctx / c->skew : c->ctx) - jitter;
      if (s < c->qlen)
        s = c->qlen;
    }
    if (s > ((int64_t)1 << 30))
      return 0;
    g->n[r] = c->qlen;
    g->seq[r] = (int32_t)s;
    g->qsl[r + 1] = g->qsl[r] + c->qlen;
    if (s > g->max_seq)
      g->max_seq = s;
    g->pps += ceil_div(s, 128);
  }
  g->T = g->qsl[g->R];
  g->maxp = (int)ceil_div(g->max_seq, 128);
  if (c->kv_dt >= 0) {
    g->kvrow = 256 * m3s_dtype_size((m3s_dtype)c->kv_dt);
    g->kvpage = (size_t)g->Hkv * 128 * g->kvrow;
  }
  if (c->idx_dt >= 0) {
    g->idxrow = 128 * m3s_dtype_size((m3s_dtype)c->idx_dt);
    g->idxpage = 128 * g->idxrow;
  }
  /* top-k: each request's index keys once, its block table, iq and scores of
   * the tokens that must choose (nb > K; the others take every block), and
   * the top-k output of every token */
  for (int r = 0; r < g->R; r++) {
    if ((g->seq[r] - 1) / 128 + 1 > g->K)
      g->topk_bytes += (double)g->seq[r] * (double)g->idxrow + (double)ceil_div(g->seq[r], 128) * 4;
    for (int i = 0; i < g->n[r]; i++) {
      int64_t pos = g->seq[r] - g->n[r] + i;
      if (pos / 128 + 1 <= g->K)
        continue;
      g->topk_flops += 2.0 * 128 * g->Hkv * (double)(pos + 1);
      g->topk_bytes += (double)g->Hkv * 128 * 2;
    }
  }
  g->topk_bytes += (double)g->T * g->Hkv * g->K * 4;
  double attn_est = 0;
  for (int r = 0; r < g->R; r++) {
    int64_t nb = ceil_div(g->seq[r], 128);
    attn_est += (double)g->Hkv * (double)(nb < g->K ? nb : g->K) * 128 * (double)g->kvrow;
  }
  attn_est += (double)g->T * g->Hq * 128 * 2 * 2;
  g->est_bytes = (op_uses_idx(c->op) ? g->topk_bytes : 0) + (op_uses_kv(c->op) ? attn_est : 0);
  return 1;
}

/* Bytes of cache the case needs for s sets (kv region, aligned, then index). */
static size_t cache_bytes(const geom *g, int s) {
  return align_up((size_t)s * (size_t)g->pps * g->kvpage, 4096) + (size_t)s * (size_t)g->pps * g->idxpage;
}

static int sets_wanted(const geom *g, const options *o, double l2) {
  if (o->sets_force > 0)
    return o->sets_force;
  if (g->est_bytes >= 2 * l2)
    return 1;
  int s = 1 + (int)ceil(2 * l2 / (g->est_bytes > 1 ? g->est_bytes : 1));
  return s > o->max_sets ? o->max_sets : s;
}

/* Top-k rows of the attention cases: the token's own block plus K-1 distinct
 * random earlier blocks, ascending; tokens of one query block share one draw
 * unless sel_token. Rows with nb <= K take every block. */
static void gen_topk(const geom *g, uint64_t seed, int sel_token, int32_t *tk) {
  uint64_t rng = seed;
  int K = g->K, Hkv = g->Hkv;
  int32_t cand[M3S_MAX_TOPK];
  for (int r = 0; r < g->R; r++)
    for (int h = 0; h < Hkv; h++) {
      int64_t group = -1;
      for (int i = 0; i < g->n[r]; i++) {
        int64_t t = g->qsl[r] + i, pos = g->seq[r] - g->n[r] + i, nb = pos / 128 + 1;
        int32_t *row = tk + (t * Hkv + h) * K;
        if (nb <= K) {
          for (int k = 0; k < K; k++)
            row[k] = k < nb ? k : -1;
          continue;
        }
        if (sel_token || pos / 128 != group) { /* new draw from [0, nb-1) */
          group = pos / 128;
          for (int k = 0; k < K - 1; k++) {
            int32_t x;
            int dup;
            do {
              x = (int32_t)(splitmix(&rng) % (uint64_t)(nb - 1));
              dup = 0;
              for (int j = 0; j < k; j++)
                dup |= cand[j] == x;
            } while (dup);
            cand[k] = x;
          }
        }
        for (int k = 0; k < K - 1; k++)
          row[k] = cand[k];
        row[K - 1] = (int32_t)(nb - 1);
        for (int a = 1; a < K; a++) /* insertion sort */
          for (int b = a; b > 0 && row[b - 1] > row[b]; b--) {
            int32_t x = row[b];
            row[b] = row[b - 1];
            row[b - 1] = x;
          }
      }
    }
}

/* Distinct visible keys per (request, KV head) over the selections of its
 * tokens (bytes the attention must read) and keys attended per (token, KV
 * head). Entries outside [0, nb) and repeats are ignored, as the kernels do. */
static void attn_account(const geom *g, const int32_t *tk, double *uniq_keys, double *attended) {
  int K = g->K, Hkv = g->Hkv;
  int32_t *vis = calloc((size_t)g->maxp + 1, sizeof(int32_t));
  int64_t *stamp = calloc((size_t)g->maxp + 1, sizeof(int64_t));
  *uniq_keys = 0;
  *attended = 0;
  if (!vis || !stamp) {
    free(vis);
    free(stamp);
    return;
  }
  int64_t mark = 0;
  for (int r = 0; r < g->R; r++)
    for (int h = 0; h < Hkv; h++) {
      memset(vis, 0, sizeof(int32_t) * (size_t)g->maxp);
      for (int i = 0; i < g->n[r]; i++) {
        int64_t t = g->qsl[r] + i, pos = g->seq[r] - g->n[r] + i, nb = pos / 128 + 1;
        int64_t cnt = nb < K ? nb : K;
        const int32_t *row = tk + (t * Hkv + h) * K;
        mark++;
        for (int64_t k = 0; k < cnt; k++) {
          int32_t b = row[k];
          if (b < 0 || b >= nb || b >= g->maxp || stamp[b] == mark)
            continue;
          stamp[b] = mark;
          int64_t keys = pos - 128 * (int64_t)b + 1;
          if (keys > 128)
            keys = 128;
          *attended += (double)keys;
          if (keys > vis[b])
            vis[b] = (int32_t)keys;
        }
      }
      for (int b = 0; b < g->maxp; b++)
        *uniq_keys += vis[b];
    }
  free(vis);
  free(stamp);
}

/* Bytes and flops of one call from the mean distinct visible keys per call
 * (uniq, summed over (request, KV head)) and keys attended per call (summed
 * over (token, KV head)). The step leaves out its top-k intermediate. */
static void count_work(const geom *g, double uniq, double attended, int lse, double *bytes,
                       double *flops) {
  double tk = (double)g->T * g->Hkv * g->K * 4;
  double attn_b = uniq * (double)g->kvrow + (double)g->T * g->Hq * 128 * 2 * 2 +
                  (lse ? (double)g->T * g->Hq * 4 : 0);
  double attn_f = 4.0 * 128 * g->G * attended;
  switch (g->c.op) {
  case OP_ATTN:
  case OP_PATTN:
    *bytes = attn_b + tk;
    *flops = attn_f;
    break;
  case OP_STEP:
  case OP_PSTEP:
    *bytes = g->topk_bytes - tk + attn_b;
    *flops = g->topk_flops + attn_f;
    break;
  default:
    *bytes = g->topk_bytes;
    *flops = g->topk_flops;
  }
}

/* ------------------------------------------------------------------------ */
/* the device state                                                          */

typedef struct {
  options o;
  m3s_context *ctx;
  cudaStream_t stream;
  int device;
  char card[288];
  double l2;
  double hbm_gbps, gemm_tflops; /* 0 if not measured */
  void *pool;
  size_t pool_bytes;
  int dead; /* a sticky CUDA error: no further case can run */
  double t0;
} bench;

static int set_cuda_err(case_result *res, cudaError_t e, const char *what, int line) {
  if (e == cudaSuccess)
    return 1;
  res->status = RES_ERROR;
  snprintf(res->note, sizeof res->note, "%s (line %d): %s", what, line, cudaGetErrorString(e));
  return 0;
}
#define CU(call)                                                                                  \
  do {                                                                                            \
    if (!set_cuda_err(res, (call), #call, __LINE__))                                              \
      goto done;                                                                                  \
  } while (0)
#define FILL(rc)                                                                                  \
  do {                                                                                            \
    if (!set_cuda_err(res, (cudaError_t)(rc), "fill kernel", __LINE__))                           \
      goto done;                                                                                  \
  } while (0)

static int fill_dt(void *p, size_t n, int dt, uint64_t seed, void *stream) {
  return dt == M3S_E4M3 ? m3sb_fill_e4m3(p, n, seed, 1.0f, stream)
                        : m3sb_fill_bf16(p, n, seed, 1.0f, stream);
}

static m3s_tensor dev_tensor(const bench *B, void *p, m3s_dtype dt, int ndim, int64_t d0,
                             int64_t d1, int64_t d2) {
  int64_t shape[3] = {d0, d1, d2};
  return m3s_tensor_make(p, dt, ndim, shape, B->device);
}

typedef struct {
  geom g;
  int S;
  int32_t *d_seq, *d_qsl, *d_tkout;
  int32_t **d_bt, **d_tkin;
  void **d_q, **d_iq;
  void *d_out, *d_ws;
  float *d_lse, *d_scale;
  size_t ws_bytes;
  m3s_tensor kv_t, idx_t;
  m3s_kv_scales scales;
  cudaGraph_t *graphs;
  cudaGraphExec_t *execs;
  cudaEvent_t *ev;
  int nev;
} case_state;

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
  geom_free(&cs->g);
  memset(cs, 0, sizeof *cs);
}

static int cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
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

static void run_case(bench *B, case_result *res) {
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
    m3s_status st = run_op(B, &cs, 0);
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

/* ------------------------------------------------------------------------ */
/* ceilings                                                                  */

static int cublas_ok(cublasStatus_t s, const char *what) {
  if (s == CUBLAS_STATUS_SUCCESS)
    return 1;
  fprintf(stderr, "m3s-bench: %s: %s\n", what, cublasGetStatusString(s));
  return 0;
}

static int cuda_ok(cudaError_t e, const char *what) {
  if (e == cudaSuccess)
    return 1;
  fprintf(stderr, "m3s-bench: %s: %s\n", what, cudaGetErrorString(e));
  return 0;
}

static double median_of(double *v, int n) {
  qsort(v, (size_t)n, sizeof(double), cmp_double);
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

#define CEIL_REPS 20
/* HBM copy: read + write bytes over the median time of a large D2D copy. */
static double measure_copy(bench *B) {
  size_t freeb = 0, total = 0;
  if (!cuda_ok(cudaMemGetInfo(&freeb, &total), "cudaMemGetInfo"))
    return 0;
  size_t n = (size_t)2 << 30;
  while (n > ((size_t)64 << 20) && 2 * n + ((size_t)1 << 30) > freeb)
    n /= 2;
  void *src = NULL, *dst = NULL;
  cudaEvent_t ev[2 * CEIL_REPS] = {0};
  double t[CEIL_REPS], gbps = 0;
  int ok = cuda_ok(cudaMalloc(&src, n), "cudaMalloc (copy src)") &&
           cuda_ok(cudaMalloc(&dst, n), "cudaMalloc (copy dst)") &&
           cuda_ok((cudaError_t)m3sb_fill_bf16(src, n / 2, 77, 1.0f, B->stream), "fill") &&
           cuda_ok((cudaError_t)m3sb_fill_bf16(dst, n / 2, 78, 1.0f, B->stream), "fill");
  for (int i = 0; ok && i < 2 * CEIL_REPS; i++)
    ok = cuda_ok(cudaEventCreate(&ev[i]), "cudaEventCreate");
  for (int i = 0; ok && i < 3; i++)
    ok = cuda_ok(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, B->stream), "copy");
  for (int i = 0; ok && i < CEIL_REPS; i++)
    ok = cuda_ok(cudaEventRecord(ev[2 * i], B->stream), "cudaEventRecord") &&
         cuda_ok(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, B->stream), "copy") &&
         cuda_ok(cudaEventRecord(ev[2 * i + 1], B->stream), "cudaEventRecord");
  ok = ok && cuda_ok(cudaStreamSynchronize(B->stream), "copy sync");
  for (int i = 0; ok && i < CEIL_REPS; i++) {
    float ms = 0;
    ok = cuda_ok(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]), "cudaEventElapsedTime");
    t[i] = ms * 1e-3;
  }
  if (ok)
    gbps = 2.0 * (double)n / median_of(t, CEIL_REPS) / 1e9;
  for (int i = 0; i < 2 * CEIL_REPS; i++)
    if (ev[i])
      cudaEventDestroy(ev[i]);
  cudaFree(src);
  cudaFree(dst);
  if (ok)
    printf("ceiling: HBM copy %.0f GB/s (cudaMemcpy D2D of %.2f GiB, read+write, median of %d)\n",
           gbps, (double)n / GIB, CEIL_REPS);
  return gbps;
}

/* bf16 GEMM: cublasGemmEx n^3, bf16 in/out, fp32 compute, median. */
static double measure_gemm(bench *B) {
  int n = B->o.gemm_n;
  size_t bytes = (size_t)n * n * 2;
  void *a = NULL, *b = NULL, *c = NULL;
  cublasHandle_t h = NULL;
  cudaEvent_t ev[2 * CEIL_REPS] = {0};
  double t[CEIL_REPS], tf = 0;
  float alpha = 1.0f, beta = 0.0f;
  int ok = cuda_ok(cudaMalloc(&a, bytes), "cudaMalloc (gemm A)") &&
           cuda_ok(cudaMalloc(&b, bytes), "cudaMalloc (gemm B)") &&
           cuda_ok(cudaMalloc(&c, bytes), "cudaMalloc (gemm C)") &&
           cuda_ok((cudaError_t)m3sb_fill_bf16(a, bytes / 2, 91, 1.0f, B->stream), "fill") &&
           cuda_ok((cudaError_t)m3sb_fill_bf16(b, bytes / 2, 92, 1.0f, B->stream), "fill") &&
           cuda_ok((cudaError_t)m3sb_fill_bf16(c, bytes / 2, 93, 1.0f, B->stream), "fill") &&
           cublas_ok(cublasCreate(&h), "cublasCreate") &&
           cublas_ok(cublasSetStream(h, B->stream), "cublasSetStream");
  for (int i = 0; ok && i < 2 * CEIL_REPS; i++)
    ok = cuda_ok(cudaEventCreate(&ev[i]), "cudaEventCreate");
  for (int i = 0; ok && i < 3 + CEIL_REPS; i++) {
    int timed = i >= 3, k = i - 3;
    if (timed)
      ok = cuda_ok(cudaEventRecord(ev[2 * k], B->stream), "cudaEventRecord");
    ok = ok && cublas_ok(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a, CUDA_R_16BF,
                                      n, b, CUDA_R_16BF, n, &beta, c, CUDA_R_16BF, n,
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                         "cublasGemmEx");
    if (ok && timed)
      ok = cuda_ok(cudaEventRecord(ev[2 * k + 1], B->stream), "cudaEventRecord");
  }
  ok = ok && cuda_ok(cudaStreamSynchronize(B->stream), "gemm sync");
  for (int i = 0; ok && i < CEIL_REPS; i++) {
    float ms = 0;
    ok = cuda_ok(cudaEventElapsedTime(&ms, ev[2 * i], ev[2 * i + 1]), "cudaEventElapsedTime");
    t[i] = ms * 1e-3;
  }
  if (ok)
    tf = 2.0 * (double)n * n * n / median_of(t, CEIL_REPS) / 1e12;
  for (int i = 0; i < 2 * CEIL_REPS; i++)
    if (ev[i])
      cudaEventDestroy(ev[i]);
  if (h)
    cublasDestroy(h);
  cudaFree(a);
  cudaFree(b);
  cudaFree(c);
  if (ok)
    printf("ceiling: bf16 GEMM %.0f TFLOP/s (cublasGemmEx %d^3, fp32 compute, median of %d)\n", tf,
           n, CEIL_REPS);
  return tf;
}

/* ------------------------------------------------------------------------ */
/* output                                                                    */

static void print_case_line(const bench *B, int i, const case_result *r) {
  char shape[96];
  case_shape(&r->c, &B->o, shape, sizeof shape);
  printf("[%3d/%d] %-12s %-28s ", i + 1, g_ncases, k_op_name[r->c.op], shape);
  switch (r->status) {
  case RES_OK: {
    double gbps = r->bytes / (r->med_us * 1e-6) / 1e9, tf = r->flops / (r->med_us * 1e-6) / 1e12;
    printf("median %9.1f us  min %9.1f  p90 %9.1f | %6.0f GB/s", r->med_us, r->min_us, r->p90_us,
           gbps);
    if (B->hbm_gbps > 0)
      printf(" %5.1f%% HBM", 100 * gbps / B->hbm_gbps);
    printf(" | %7.2f TFLOP/s", tf);
    if (B->gemm_tflops > 0)
      printf(" %5.1f%% GEMM", 100 * tf / B->gemm_tflops);
    printf(" | %.4g MB, %.4g GFLOP, %d sets, %d reps, %s, kernel %s", r->bytes / 1e6,
           r->flops / 1e9, r->sets, r->reps, r->eager ? "eager" : "graph", r->kernel);
    if (r->note[0])
      printf(" [%s]", r->note);
    printf("\n");
    break;
  }
  case RES_UNSUPPORTED:
    printf("unsupported: %s\n", r->note);
    break;
  case RES_SKIPPED:
    printf("skipped: %s\n", r->note);
    break;
  default:
    printf("ERROR: %s\n", r->note);
    break;
  }
  fflush(stdout);
}

static void print_table(const bench *B, double wall) {
  int nok = 0, nun = 0, nerr = 0, nskip = 0, neager = 0;
  printf("\n## m3s-bench: %s; ceilings HBM copy ", B->card);
  if (B->hbm_gbps > 0)
    printf("%.0f GB/s", B->hbm_gbps);
  else
    printf("n/a");
  printf(", bf16 GEMM ");
  if (B->gemm_tflops > 0)
    printf("%.0f TFLOP/s\n", B->gemm_tflops);
  else
    printf("n/a\n");
  printf("| case | shape | median us | GB/s | %%HBM | TFLOP/s | %%GEMM |\n");
  printf("|---|---|---:|---:|---:|---:|---:|\n");
  for (int i = 0; i < g_ncases; i++) {
    const case_result *r = &g_res[i];
    char shape[96];
    case_shape(&r->c, &B->o, shape, sizeof shape);
    printf("| %s | %s | ", k_op_name[r->c.op], shape);
    if (r->status == RES_OK) {
      double gbps = r->bytes / (r->med_us * 1e-6) / 1e9, tf = r->flops / (r->med_us * 1e-6) / 1e12;
      char ph[16] = "-", pg[16] = "-";
      if (B->hbm_gbps > 0)
        snprintf(ph, sizeof ph, "%.1f", 100 * gbps / B->hbm_gbps);
      if (B->gemm_tflops > 0)
        snprintf(pg, sizeof pg, "%.1f", 100 * tf / B->gemm_tflops);
      printf("%.*f%s | %.0f | %s | %.*f | %s |\n", r->med_us < 1000 ? 1 : 0, r->med_us,
             r->eager ? "*" : "", gbps, ph, tf < 10 ? 2 : 1, tf, pg);
      nok++;
      neager += r->eager;
    } else {
      const char *w = r->status == RES_UNSUPPORTED ? "unsupported"
                      : r->status == RES_SKIPPED   ? "skipped"
                      : r->status == RES_PENDING   ? "not run"
                                                   : "ERROR";
      printf("%s | - | - | - | - |\n", w);
      nun += r->status == RES_UNSUPPORTED;
      nskip += r->status == RES_SKIPPED || r->status == RES_PENDING;
      nerr += r->status == RES_ERROR;
    }
  }
  printf("%d cases: %d timed, %d unsupported, %d failed, %d skipped; %.0f s%s\n", g_ncases, nok,
         nun, nerr, nskip, wall,
         !neager ? "" : B->o.no_graph ? "; * = eager calls (--no-graph)"
                                      : "; * = eager calls (graph capture failed)");
}

static int write_csv(const bench *B, const char *path) {
  FILE *f = fopen(path, "w");
  if (!f) {
    fprintf(stderr, "m3s-bench: cannot write %s\n", path);
    return 0;
  }
  fprintf(f, "case,shape,op,tp,hq,hkv,bs,q_len,ctx,kv_dtype,idx_dtype,layout,status,mode,sets,reps,"
             "median_us,min_us,p90_us,max_us,bytes,flops,gbps,pct_hbm,tflops,pct_gemm,"
             "hbm_ceiling_gbps,gemm_ceiling_tflops,card,kernel,note\n");
  for (int i = 0; i < g_ncases; i++) {
    const case_result *r = &g_res[i];
    m3s_layer_config cfg = m3s_config_minimax_m3(r->c.tp);
    char shape[96], note[256];
    case_shape(&r->c, &B->o, shape, sizeof shape);
    snprintf(note, sizeof note, "%s", r->note);
    for (char *p = note; *p; p++)
      if (*p == '"')
        *p = '\'';
    static const char *const st[] = {"not_run", "ok", "unsupported", "error", "skipped"};
    fprintf(f, "%s,%s,%s,%d,%d,%d,%d,%d,%lld,%s,%s,%s,%s,%s,%d,%d,", k_op_name[r->c.op], shape,
            k_op_key[r->c.op], r->c.tp, cfg.num_q_heads, cfg.num_kv_heads, r->c.bs, r->c.qlen,
            (long long)r->c.ctx, r->c.kv_dt >= 0 ? m3s_dtype_name((m3s_dtype)r->c.kv_dt) : "",
            r->c.idx_dt >= 0 ? m3s_dtype_name((m3s_dtype)r->c.idx_dt) : "",
            r->c.kv_dt >= 0 ? (B->o.token_major ? "token_major" : "head_major") : "",
            st[r->status], r->status == RES_OK ? (r->eager ? "eager" : "graph") : "", r->sets,
            r->reps);
    if (r->status == RES_OK) {
      double gbps = r->bytes / (r->med_us * 1e-6) / 1e9, tf = r->flops / (r->med_us * 1e-6) / 1e12;
      fprintf(f, "%.3f,%.3f,%.3f,%.3f,%.0f,%.0f,%.1f,%.2f,%.3f,%.2f,", r->med_us, r->min_us,
              r->p90_us, r->max_us, r->bytes, r->flops, gbps,
              B->hbm_gbps > 0 ? 100 * gbps / B->hbm_gbps : 0.0, tf,
              B->gemm_tflops > 0 ? 100 * tf / B->gemm_tflops : 0.0);
    } else {
      fprintf(f, ",,,,,,,,,,");
    }
    fprintf(f, "%.1f,%.1f,\"%s\",\"%s\",\"%s\"\n", B->hbm_gbps, B->gemm_tflops, B->card,
            r->kernel, note);
  }
  int ok = fclose(f) == 0;
  if (ok)
    printf("csv: %s\n", path);
  return ok;
}

/* ------------------------------------------------------------------------ */
/* main                                                                      */

static void usage(FILE *f) {
  fprintf(f,
"usage: m3s-bench [--all | --full | --ops LIST] [options]   (no selection: --all)\n"
"Times the m3sparse CUDA backend (device 0 by default) through the public API:\n"
"CUDA-graph replays rotated over several input sets, CUDA-event timing, median;\n"
"achieved GB/s and TFLOP/s against an HBM-copy and a bf16-GEMM ceiling measured\n"
"at start. Prints one line per case, then a markdown table.\n"
"\n"
"case selection:\n"
"  --all             the default set (24 cases, also with no selection): decode topk/attn/step, TP1 and\n"
"                    TP8, bs 1/32/128, q_len 1/4, ctx 8K/32K/128K (a selection),\n"
"                    and TP1 prefill topk/attn of one --chunk behind ctx 0 and 32K;\n"
"                    --kv/--idx lists multiply it; other shape flags are ignored\n"
"  --full            every op over the shape lists below (120 cases by default)\n"
"  --ops LIST        ops over the shape lists: topk, attn, step (decode), ptopk,\n"
"                    pattn, pstep (prefill); 'decode' / 'prefill' = all three\n"
"                    (with --all: its cases, then these)\n"
"  --tp LIST         tensor-parallel ranks' shapes: 1 (64/4), 2, 4, 8 (8/1)   [1,8]\n"
"  --bs LIST         decode requests                                   [1,32,128]\n"
"  --qlen LIST       decode tokens per request (1 + spec tokens)             [1,4]\n"
"  --ctx LIST        decode context (K = 1024, M = 1048576)       [8K,32K,128K]\n"
"  --prefill-ctx LIST  cached tokens before the prefill chunk              [0,32K]\n"
"  --chunk LIST      new tokens of the prefill chunk                        [4096]\n"
"  --kv LIST         main K/V cache dtype: bf16, e4m3 (scalar scales)      [bf16]\n"
"  --idx LIST        index cache dtype: bf16, e4m3                         [bf16]\n"
"  --skew N          decode cases: requests after the first get ctx / N, one\n"
"                    long request among short ones                            [1]\n"
"  --list            print the selected cases and their cache needs; no GPU used\n"
"\n"
"inputs and timing:\n"
"  --token-major     pass the K/V cache as token-major [P,128,Hkv,256] (permuted)\n"
"  --lse             attention also writes lse (default: lse = NULL)\n"
"  --sel token       attn cases: every token draws its own blocks (default 'block':\n"
"                    the tokens of one 128-token query block share the draw)\n"
"  --reps N          timed replays per case                                   [50]\n"
"  --warmup N        untimed graph replays per set before timing               [1]\n"
"  --max-sets N      most input sets rotated per case                         [64]\n"
"  --sets N          force N input sets per case\n"
"  --no-graph        time eager calls instead of graph replays\n"
"  --batch-invariant set M3S_OPT_BATCH_INVARIANT on the context (no split-K)\n"
"  --budget SEC      stop starting cases after SEC seconds                   [420]\n"
"  --case-budget SEC fewer reps/sets when a case would take longer          [20]\n"
"  --mem-gb G        cap of the cache pool (default: free memory less buffers)\n"
"  --device N        CUDA device                                               [0]\n"
"  --no-ceilings     skip the copy and GEMM ceilings (or give --hbm GBPS and\n"
"                    --gemm TFLOPS to use known values)\n"
"  --gemm-n N        GEMM size of the ceiling                               [8192]\n"
"  --csv FILE        also write every case, full numbers, as CSV\n"
"  -h, --help        this text\n"
"\n"
"Exit status: 0 when every selected case ran or was reported unsupported or\n"
"skipped, 1 when a case failed (an m3s error other than UNSUPPORTED or a CUDA\n"
"error), 2 on bad flags, 77 when no CUDA device is present.\n");
}

static int parse_args(int argc, char **argv, options *o) {
  enum {
    O_ALL = 256, O_FULL, O_OPS, O_TP, O_BS, O_QLEN, O_CTX, O_PCTX, O_CHUNK, O_KV, O_IDX, O_LIST,
    O_TM, O_LSE, O_SEL, O_REPS, O_WARM, O_MAXSETS, O_SETS, O_NOGRAPH, O_BUDGET, O_CBUDGET,
    O_MEM, O_DEV, O_NOCEIL, O_HBM, O_GEMM, O_GEMMN, O_CSV, O_BINV, O_SKEW
  };
  static const struct option lo[] = {
      {"all", no_argument, 0, O_ALL},           {"full", no_argument, 0, O_FULL},
      {"ops", required_argument, 0, O_OPS},     {"tp", required_argument, 0, O_TP},
      {"bs", required_argument, 0, O_BS},       {"qlen", required_argument, 0, O_QLEN},
      {"ctx", required_argument, 0, O_CTX},     {"prefill-ctx", required_argument, 0, O_PCTX},
      {"chunk", required_argument, 0, O_CHUNK}, {"kv", required_argument, 0, O_KV},
      {"idx", required_argument, 0, O_IDX},     {"list", no_argument, 0, O_LIST},
      {"token-major", no_argument, 0, O_TM},    {"lse", no_argument, 0, O_LSE},
      {"sel", required_argument, 0, O_SEL},     {"reps", required_argument, 0, O_REPS},
      {"warmup", required_argument, 0, O_WARM}, {"max-sets", required_argument, 0, O_MAXSETS},
      {"sets", required_argument, 0, O_SETS},   {"no-graph", no_argument, 0, O_NOGRAPH},
      {"budget", required_argument, 0, O_BUDGET}, {"case-budget", required_argument, 0, O_CBUDGET},
      {"mem-gb", required_argument, 0, O_MEM},  {"device", required_argument, 0, O_DEV},
      {"no-ceilings", no_argument, 0, O_NOCEIL}, {"hbm", required_argument, 0, O_HBM},
      {"gemm", required_argument, 0, O_GEMM},   {"gemm-n", required_argument, 0, O_GEMMN},
      {"csv", required_argument, 0, O_CSV},     {"help", no_argument, 0, 'h'},
      {"batch-invariant", no_argument, 0, O_BINV}, {"skew", required_argument, 0, O_SKEW},
      {0, 0, 0, 0}};
  memset(o, 0, sizeof *o);
  o->tps[0] = 1, o->tps[1] = 8, o->ntp = 2;
  o->bss[0] = 1, o->bss[1] = 32, o->bss[2] = 128, o->nbs = 3;
  o->qlens[0] = 1, o->qlens[1] = 4, o->nq = 2;
  o->ctxs[0] = 8192, o->ctxs[1] = 32768, o->ctxs[2] = 131072, o->nctx = 3;
  o->pctxs[0] = 0, o->pctxs[1] = 32768, o->npctx = 2;
  o->chunks[0] = 4096, o->nchunk = 1;
  o->kvs[0] = M3S_BF16, o->nkv = 1;
  o->idxs[0] = M3S_BF16, o->nidx = 1;
  o->skew = 1;
  o->reps = 50, o->warmup = 1, o->max_sets = 64, o->gemm_n = 8192;
  o->budget_s = 420, o->case_budget_s = 20;
  int c;
  int64_t v;
  while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
    switch (c) {
    case 'h':
      usage(stdout);
      exit(0);
    case O_ALL: o->all = 1; break;
    case O_FULL: o->full = 1; break;
    case O_OPS: if (!parse_ops(optarg, &o->ops)) return 0; break;
    case O_TP:
      if (!parse_list_int(optarg, o->tps, &o->ntp, "--tp", 1, 8)) return 0;
      for (int i = 0; i < o->ntp; i++)
        if (m3s_config_minimax_m3(o->tps[i]).num_q_heads == 0) {
          fprintf(stderr, "m3s-bench: --tp takes 1, 2, 4 or 8\n");
          return 0;
        }
      break;
    case O_BS: if (!parse_list_int(optarg, o->bss, &o->nbs, "--bs", 1, 65536)) return 0; break;
    case O_QLEN: if (!parse_list_int(optarg, o->qlens, &o->nq, "--qlen", 1, 64)) return 0; break;
    case O_CTX:
      if (!parse_list64(optarg, o->ctxs, &o->nctx, "--ctx")) return 0;
      for (int i = 0; i < o->nctx; i++)
        if (o->ctxs[i] < 1 || o->ctxs[i] > ((int64_t)1 << 30)) {
          fprintf(stderr, "m3s-bench: --ctx values must be in [1, 1G]\n");
          return 0;
        }
      break;
    case O_PCTX:
      if (!parse_list64(optarg, o->pctxs, &o->npctx, "--prefill-ctx")) return 0;
      for (int i = 0; i < o->npctx; i++)
        if (o->pctxs[i] > ((int64_t)1 << 29)) {
          fprintf(stderr, "m3s-bench: --prefill-ctx values must be <= 512M\n");
          return 0;
        }
      break;
    case O_CHUNK:
      if (!parse_list_int(optarg, o->chunks, &o->nchunk, "--chunk", 1, 1 << 20)) return 0;
      break;
    case O_KV: if (!parse_dtypes(optarg, o->kvs, &o->nkv, "--kv")) return 0; break;
    case O_IDX: if (!parse_dtypes(optarg, o->idxs, &o->nidx, "--idx")) return 0; break;
    case O_LIST: o->list = 1; break;
    case O_TM: o->token_major = 1; break;
    case O_LSE: o->lse = 1; break;
    case O_SEL:
      if (!strcmp(optarg, "token")) o->sel_token = 1;
      else if (!strcmp(optarg, "block")) o->sel_token = 0;
      else { fprintf(stderr, "m3s-bench: --sel takes block or token\n"); return 0; }
      break;
    case O_REPS:
    case O_WARM:
    case O_MAXSETS:
    case O_SETS:
    case O_DEV:
    case O_GEMMN:
    case O_SKEW:
      v = parse_size(optarg);
      if (v < (c == O_WARM || c == O_DEV ? 0 : 1) || v > 100000) {
        fprintf(stderr, "m3s-bench: bad number '%s'\n", optarg);
        return 0;
      }
      if (c == O_REPS) o->reps = (int)v;
      if (c == O_WARM) o->warmup = (int)v;
      if (c == O_MAXSETS) o->max_sets = (int)v;
      if (c == O_SETS) o->sets_force = (int)v;
      if (c == O_DEV) o->device = (int)v;
      if (c == O_GEMMN) o->gemm_n = (int)v;
      if (c == O_SKEW) o->skew = (int)v;
      break;
    case O_NOGRAPH: o->no_graph = 1; break;
    case O_BUDGET:
    case O_CBUDGET:
    case O_MEM:
    case O_HBM:
    case O_GEMM: {
      char *end = NULL;
      double d = strtod(optarg, &end);
      if (end == optarg || *end || !(d > 0)) {
        fprintf(stderr, "m3s-bench: bad number '%s'\n", optarg);
        return 0;
      }
      if (c == O_BUDGET) o->budget_s = d;
      if (c == O_CBUDGET) o->case_budget_s = d;
      if (c == O_MEM) o->mem_gb = d;
      if (c == O_HBM) o->hbm_override = d;
      if (c == O_GEMM) o->gemm_override = d;
      break;
    }
    case O_NOCEIL: o->no_ceilings = 1; break;
    case O_BINV: o->batch_invariant = 1; break;
    case O_CSV: o->csv = optarg; break;
    default:
      fprintf(stderr, "m3s-bench: see --help\n");
      return 0;
    }
  }
  if (optind < argc) {
    fprintf(stderr, "m3s-bench: unexpected argument '%s' (see --help)\n", argv[optind]);
    return 0;
  }
  if (o->full)
    o->ops = (1u << OP_COUNT) - 1;
  if (!o->all && !o->ops)
    o->all = 1; /* no selection: the default set, as --help says (also for --list alone) */
  return 1;
}

int main(int argc, char **argv) {
  bench B;
  memset(&B, 0, sizeof B);
  B.t0 = now_s();
  if (!parse_args(argc, argv, &B.o))
    return 2;
  options *o = &B.o;
  if (o->all)
    build_all(o);
  if (o->ops)
    build_matrix(o);
  B.l2 = 50.0 * 1024 * 1024; /* replaced by the card's value below */

  if (o->list) {
    printf("%d cases (bytes and flops per call; step cases use the attention cases' random\n"
           "top-k as a proxy; sets and cache sizes assume a 50 MiB L2):\n",
           g_ncases);
    for (int i = 0; i < g_ncases; i++) {
      geom g;
      char shape[96];
      case_shape(&g_res[i].c, o, shape, sizeof shape);
      if (!geom_init(&g, &g_res[i].c)) {
        printf("[%3d] %-12s %-28s bad geometry\n", i + 1, k_op_name[g_res[i].c.op], shape);
        geom_free(&g);
        continue;
      }
      int s = sets_wanted(&g, o, B.l2);
      double u = 0, a = 0, bytes = 0, flops = 0;
      int32_t *tk = malloc(sizeof(int32_t) * ((size_t)g.T * g.Hkv * g.K + 1));
      if (tk && op_uses_kv(g.c.op)) { /* the attention cases' host top-k (step: a proxy) */
        gen_topk(&g, 12345, o->sel_token, tk);
        attn_account(&g, tk, &u, &a);
      }
      free(tk);
      count_work(&g, u, a, o->lse, &bytes, &flops);
      printf("[%3d] %-12s %-28s T %5d %9.1f MB %9.2f GFLOP  %2d sets  cache %6.2f GiB\n", i + 1,
             k_op_name[g_res[i].c.op], shape, g.T, bytes / 1e6, flops / 1e9, s,
             (double)cache_bytes(&g, s) / GIB);
      geom_free(&g);
    }
    return 0;
  }

  /* the device */
  int ndev = 0;
  cudaError_t e = cudaGetDeviceCount(&ndev);
  if (e != cudaSuccess || ndev == 0) {
    fprintf(stderr, "m3s-bench: no CUDA device available (%s); nothing was timed\n",
            e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    printf("m3s-bench: no CUDA device, skipped\n");
    return EXIT_NO_GPU;
  }
  if (o->device >= ndev) {
    fprintf(stderr, "m3s-bench: --device %d but %d CUDA device(s)\n", o->device, ndev);
    return 2;
  }
  B.device = o->device;
  struct cudaDeviceProp prop;
  if (!cuda_ok(cudaSetDevice(B.device), "cudaSetDevice") ||
      !cuda_ok(cudaGetDeviceProperties(&prop, B.device), "cudaGetDeviceProperties") ||
      !cuda_ok(cudaStreamCreateWithFlags(&B.stream, cudaStreamNonBlocking), "cudaStreamCreate"))
    return 1;
  B.l2 = prop.l2CacheSize > 0 ? (double)prop.l2CacheSize : B.l2;
  int drv = 0, rt = 0;
  cudaDriverGetVersion(&drv);
  cudaRuntimeGetVersion(&rt);
  snprintf(B.card, sizeof B.card, "%.200s (sm_%d%d, %d SMs)", prop.name, prop.major, prop.minor,
           prop.multiProcessorCount);
  printf("m3s-bench: m3sparse %s, device %d: %s, %.1f GiB, L2 %.0f MiB, driver %d.%d, runtime "
         "%d.%d\n",
         m3s_version(), B.device, B.card, (double)prop.totalGlobalMem / GIB, B.l2 / 1048576.0,
         drv / 1000, drv % 1000 / 10, rt / 1000, rt % 1000 / 10);
  m3s_status st = m3s_context_create(B.device, &B.ctx);
  if (st != M3S_OK) {
    fprintf(stderr, "m3s-bench: m3s_context_create(%d): %s\n", B.device, m3s_last_error());
    return st == M3S_ERR_UNSUPPORTED ? EXIT_NO_GPU : 1;
  }
  if (o->batch_invariant) {
    if (m3s_context_set_option(B.ctx, M3S_OPT_BATCH_INVARIANT, 1) != M3S_OK) {
      fprintf(stderr, "m3s-bench: m3s_context_set_option: %s\n", m3s_last_error());
      m3s_context_destroy(B.ctx);
      return 1;
    }
    printf("m3s-bench: M3S_OPT_BATCH_INVARIANT on (attention never splits a row)\n");
  }
  int failed = 0;

  /* ceilings */
  if (o->hbm_override > 0)
    B.hbm_gbps = o->hbm_override;
  else if (!o->no_ceilings && (B.hbm_gbps = measure_copy(&B)) <= 0)
    failed = 1;
  if (o->gemm_override > 0)
    B.gemm_tflops = o->gemm_override;
  else if (!o->no_ceilings && (B.gemm_tflops = measure_gemm(&B)) <= 0)
    failed = 1;

  /* the cache pool: large enough for the biggest case at its wanted set count
   * (as far as memory goes), shared by all cases */
  size_t need = 0, need_min = (size_t)-1, extra = 0;
  for (int i = 0; i < g_ncases; i++) {
    geom g;
    if (!geom_init(&g, &g_res[i].c)) {
      geom_free(&g);
      continue;
    }
    int s = sets_wanted(&g, o, B.l2);
    size_t cb = cache_bytes(&g, s), c1 = cache_bytes(&g, 1), ws = 0;
    if (m3s_workspace_size(B.ctx, &g.cfg, g.T, g.max_seq, &ws) != M3S_OK)
      ws = 0;
    size_t x = (size_t)s * ((size_t)g.T * (g.Hq + g.Hkv) * 256 + (size_t)g.T * g.Hkv * g.K * 4 +
                            (size_t)g.R * g.maxp * 4) +
               (size_t)g.T * g.Hq * 260 + ws;
    need = cb > need ? cb : need;
    need_min = c1 < need_min ? c1 : need_min;
    extra = x > extra ? x : extra;
    geom_free(&g);
  }
  size_t freeb = 0, total = 0;
  if (!cuda_ok(cudaMemGetInfo(&freeb, &total), "cudaMemGetInfo"))
    return 1;
  size_t reserve = extra + ((size_t)3 << 29); /* + 1.5 GiB for the runtime, graphs, ... */
  size_t avail = freeb > reserve ? freeb - reserve : 0;
  if (o->mem_gb > 0 && (double)avail > o->mem_gb * GIB)
    avail = (size_t)(o->mem_gb * GIB);
  size_t want = need < avail ? need : avail;
  want = align_up(want, (size_t)2 << 20);
  while (want >= need_min && want > 0) {
    if (cudaMalloc(&B.pool, want) == cudaSuccess)
      break;
    cudaGetLastError();
    B.pool = NULL;
    want = align_up((size_t)((double)want * 0.85), (size_t)2 << 20);
  }
  B.pool_bytes = B.pool ? want : 0;
  printf("cache pool: %.2f GiB (largest case wants %.2f GiB; %.1f GiB free)\n",
         (double)B.pool_bytes / GIB, (double)need / GIB, (double)freeb / GIB);
  printf("%d cases, %d timed replays each (median of CUDA-event times), budget %.0f s\n", g_ncases,
         o->reps, o->budget_s);
  fflush(stdout);

  for (int i = 0; i < g_ncases; i++) {
    case_result *r = &g_res[i];
    if (B.dead) {
      r->status = RES_SKIPPED;
      snprintf(r->note, sizeof r->note, "not run: an earlier CUDA error left the context unusable");
    } else if (now_s() - B.t0 > o->budget_s) {
      r->status = RES_SKIPPED;
      snprintf(r->note, sizeof r->note, "not run: time budget (%.0f s) spent", o->budget_s);
    } else {
      run_case(&B, r);
    }
    failed |= r->status == RES_ERROR;
    print_case_line(&B, i, r);
  }

  if (o->csv && !write_csv(&B, o->csv))
    failed = 1;
  print_table(&B, now_s() - B.t0);
  if (B.pool)
    cudaFree(B.pool);
  cudaStreamDestroy(B.stream);
  m3s_context_destroy(B.ctx);
  return failed ? 1 : 0;
}
