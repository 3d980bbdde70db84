/*
 * m3s_demo.c -- m3s-demo: one MiniMax-M3 sparse-attention layer served through
 * a realistic engine trace, on synthetic activations (no model weights).
 *
 * THE LAYER. The heads of one tensor-parallel rank (--tp 8, the default: 8 query
 * heads / 1 KV head; --tp 1: the full 64/4), a lightning indexer that picks the
 * top-16 128-token blocks per (token, KV head), the token's own block always
 * among them (local 1), then block-sparse GQA attention over those blocks only.
 * bf16 activations, bf16 paged K/V cache and bf16 index cache.
 *
 * THE TRACE (what an engine such as vLLM sends one sparse layer):
 *  - --requests prompts of random length in [--prompt-min, --prompt-max]. All
 *    but the last arrive at once and are prefilled in chunks: a step has a token
 *    budget of --chunk tokens, taken first by the running decode requests, then
 *    by the prefill requests in arrival order. So later chunks are chunked
 *    prefill (ctx > 0), a step can hold chunks of two prompts, and a request
 *    whose prompt is done decodes while the next one still prefills (mixed
 *    decode+prefill steps, decode requests first).
 *  - The last request arrives once the others have decoded two steps: more
 *    mixed steps while it is prefilled.
 *  - Then --decode-steps pure decode steps: the first half with q_len 1, the
 *    rest speculative with q_len 1 + --spec-tokens (a random number of drafts is
 *    accepted, the rejected positions are rewritten by the next step). A pure
 *    decode batch is padded up to a CUDA-graph size (4, 8, 16, 24, ... requests)
 *    with filler requests (seq_len 0, slot -1), which must come out as output 0,
 *    lse -inf and top-k rows of -1.
 *  Each step: the host step description goes through m3s_plan_step (the
 *  decode/prefill split); the new tokens' K/V and index keys are written with
 *  m3s_cache_insert / m3s_index_cache_insert through slot mappings (pages are
 *  handed out from shuffled free lists, one per cache, so the two block tables
 *  differ and are far from the identity); then ONE m3s_step_forward runs the
 *  indexer and the attention of the decode part (uniform q_len) and of the
 *  prefill part (query_start_loc, a slice of the step's) on whole-step tensors.
 *
 * THE NEEDLES. Background activations are N(0,1) per dimension (norm ~11).
 * Each request hides --needles needles early in its prompt (in its first 40%):
 * a 16-token passage inside a block, with a random unit index direction u_n and,
 * per KV head, a unit key direction k_n and a value vector v_n (N(0,1)). The
 * passage's tokens get +16 u_n on their index keys, +8 k_n on their keys and
 * v_n (+ a little noise) as values. Later tokens that "ask" for needle n -- two
 * in three decode tokens (with 2 needles), and about 1% of the prefill tokens
 * at least a block past the needles -- get +16 u_n on their index queries and
 * +32 k_n on their queries. The indexer must find the needle block among the
 * many blocks it skips (needle recall: the asking (token, KV head) pairs whose
 * top-k row holds the needle's block; reported separately for rows with more
 * than 16 visible blocks, where it had to choose), and the attention output must
 * then carry v_n: cosine ~1 for asking tokens, small for the others (not zero:
 * a random query still attends the needle block now and then).
 *
 * THE CHECKS (exit status 1 if any fails, 2 on bad flags or a library error):
 *  - every top-k row: min(16, nb) block ids, ascending, in [0, nb), the local
 *    block nb-1 included, -1 after them; padded rows all -1 with output 0 and
 *    lse -inf;
 *  - --check-rows rows of every step, every head, against an fp64 reference
 *    written here: the block scores and the top-k choice recomputed from the
 *    index cache, and causal softmax attention over the keys of the selected
 *    blocks read from the K/V cache through the block table (relative L2 error
 *    of the output < 1e-2, lse within 1e-3).
 */
#define _POSIX_C_SOURCE 200809L

#include <getopt.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "m3sparse.h"

#ifdef M3S_DEMO_CUDA
#include <cuda_runtime_api.h>
#endif

#define HD 128  /* head dim == index dim */
#define BLK 128 /* block size == page size */
#define MAX_REQUESTS 64
#define MAX_ENTRIES 80 /* requests in one step, padding included */
#define MAX_NEEDLES 4
#define MAX_SPEC 7

#define NEEDLE_TOKENS 16   /* a needle: a 16-token passage inside its block */
#define NEEDLE_INDEX 16.0f /* index key and index query component along u_n */
#define NEEDLE_KEY 8.0f    /* key component along k_n */
#define NEEDLE_QUERY 32.0f /* query component along k_n */
#define NEEDLE_VNOISE 0.25f
#define ASK_PREFILL_PER_256 3 /* prefill tokens past the needles that ask: 3 in 256 */
#define NO_ASK (-1)

#define REF_TOL 1e-2 /* relative L2 error of a checked row (all its heads) */
#define LSE_TOL 1e-3
#define SEL_TOL 1e-2 /* score slack when recomputing the top-k choice */

enum { EXIT_CHECK = 1, EXIT_ERROR = 2 };

/* ------------------------------------------------------------------------
 * Options
 * ---------------------------------------------------------------------- */
typedef struct {
  int tp, requests, prompt_min, prompt_max, chunk, decode_steps, spec_tokens, needles;
  int check_rows, token_major, cuda;
  unsigned long long seed;
} options;

static void usage(FILE *f) {
  fprintf(f,
          "usage: m3s-demo [options]\n"
          "\n"
          "Runs one MiniMax-M3 sparse-attention layer (lightning indexer + block-sparse GQA\n"
          "attention, top-16 of 128-token blocks, local block forced) through a serving\n"
          "trace on synthetic activations: chunked prefill, decode, speculative decode,\n"
          "mixed decode+prefill steps and CUDA-graph padding, with planted \"needle\" blocks\n"
          "the indexer must find. Every step is checked against an fp64 reference; exit\n"
          "status 0 = all checks passed, 1 = a check failed, 2 = bad flag or library error.\n"
          "\n"
          "  --tp N            tensor-parallel size; the layer is one rank's heads:\n"
          "                    1 = 64 query / 4 KV heads (the full layer), 2 = 32/2,\n"
          "                    4 = 16/1, 8 = 8/1 (default 8)\n"
          "  --requests N      requests in the trace, 1..%d (default 3); the last one\n"
          "                    arrives late, while the others decode\n"
          "  --prompt-min N    shortest prompt in tokens (default 4096)\n"
          "  --prompt-max N    longest prompt in tokens (default 16384); prompt lengths\n"
          "                    are drawn uniformly from [min, max]\n"
          "  --chunk N         token budget of one step = chunked-prefill size; decode\n"
          "                    tokens count in it; >= 128 (default 2048)\n"
          "  --decode-steps N  pure decode steps once every prompt is in: the first half\n"
          "                    with q_len 1, the rest speculative (default 8)\n"
          "  --spec-tokens N   draft tokens of a speculative step (q_len = 1 + N), 0..%d\n"
          "                    (default 3)\n"
          "  --needles N       needle blocks planted per request, 0..%d (default 2)\n"
          "  --check-rows N    query rows per step compared with the fp64 reference,\n"
          "                    every head (default 4)\n"
          "  --layout L        K/V cache layout: head = [pages, Hkv, 128, 256] (default)\n"
          "                    or token = [pages, 128, Hkv, 256], passed as a permuted view\n"
          "  --seed N          random seed of prompts, activations and page order\n"
          "                    (default 1)\n"
          "  --device D        cpu (default) or cuda (CUDA device 0; needs a build with\n"
          "                    the CUDA backend)\n"
          "  -h, --help        print this text and exit\n",
          MAX_REQUESTS, MAX_SPEC, MAX_NEEDLES);
}

static int parse_int(const char *flag, const char *s, long lo, long hi, int *out) {
  char *end = NULL;
  long x = strtol(s, &end, 10);
  if (!*s || *end || x < lo || x > hi) {
    fprintf(stderr, "m3s-demo: %s wants an integer in [%ld, %ld], got '%s'\n", flag, lo, hi, s);
    return -1;
  }
  *out = (int)x;
  return 0;
}

/* 0: run, 1: --help printed, -1: bad flags. */
static int parse_options(int argc, char **argv, options *o) {
  enum {
    O_TP = 256,
    O_REQ,
    O_PMIN,
    O_PMAX,
    O_CHUNK,
    O_DEC,
    O_SPEC,
    O_NEEDLES,
    O_ROWS,
    O_LAYOUT,
    O_SEED,
    O_DEVICE
  };
  static const struct option longopts[] = {{"tp", required_argument, NULL, O_TP},
                                           {"requests", required_argument, NULL, O_REQ},
                                           {"prompt-min", required_argument, NULL, O_PMIN},
                                           {"prompt-max", required_argument, NULL, O_PMAX},
                                           {"chunk", required_argument, NULL, O_CHUNK},
                                           {"decode-steps", required_argument, NULL, O_DEC},
                                           {"spec-tokens", required_argument, NULL, O_SPEC},
                                           {"needles", required_argument, NULL, O_NEEDLES},
                                           {"check-rows", required_argument, NULL, O_ROWS},
                                           {"layout", required_argument, NULL, O_LAYOUT},
                                           {"seed", required_argument, NULL, O_SEED},
                                           {"device", required_argument, NULL, O_DEVICE},
                                           {"help", no_argument, NULL, 'h'},
                                           {NULL, 0, NULL, 0}};
  *o = (options){.tp = 8,
                 .requests = 3,
                 .prompt_min = 4096,
                 .prompt_max = 16384,
                 .chunk = 2048,
                 .decode_steps = 8,
                 .spec_tokens = 3,
                 .needles = 2,
                 .check_rows = 4,
                 .seed = 1};
  int c, rc = 0;
  opterr = 1;
  while (rc == 0 && (c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
    switch (c) {
    case O_TP:
      rc = parse_int("--tp", optarg, 1, 8, &o->tp);
      if (rc == 0 && o->tp != 1 && o->tp != 2 && o->tp != 4 && o->tp != 8) {
        fprintf(stderr, "m3s-demo: --tp must be 1, 2, 4 or 8, got %d\n", o->tp);
        rc = -1;
      }
      break;
    case O_REQ: rc = parse_int("--requests", optarg, 1, MAX_REQUESTS, &o->requests); break;
    case O_PMIN: rc = parse_int("--prompt-min", optarg, 1, 1 << 20, &o->prompt_min); break;
    case O_PMAX: rc = parse_int("--prompt-max", optarg, 1, 1 << 20, &o->prompt_max); break;
    case O_CHUNK: rc = parse_int("--chunk", optarg, 128, 1 << 16, &o->chunk); break;
    case O_DEC: rc = parse_int("--decode-steps", optarg, 0, 10000, &o->decode_steps); break;
    case O_SPEC: rc = parse_int("--spec-tokens", optarg, 0, MAX_SPEC, &o->spec_tokens); break;
    case O_NEEDLES: rc = parse_int("--needles", optarg, 0, MAX_NEEDLES, &o->needles); break;
    case O_ROWS: rc = parse_int("--check-rows", optarg, 0, 1 << 20, &o->check_rows); break;
    case O_SEED: {
      char *end = NULL;
      o->seed = strtoull(optarg, &end, 10);
      if (!*optarg || *end) {
        fprintf(stderr, "m3s-demo: --seed wants a non-negative integer, got '%s'\n", optarg);
        rc = -1;
      }
      break;
    }
    case O_LAYOUT:
      if (!strcmp(optarg, "head") || !strcmp(optarg, "token")) {
        o->token_major = !strcmp(optarg, "token");
      } else {
        fprintf(stderr, "m3s-demo: --layout must be 'head' or 'token', got '%s'\n", optarg);
        rc = -1;
      }
      break;
    case O_DEVICE:
      if (!strcmp(optarg, "cpu") || !strcmp(optarg, "cuda")) {
        o->cuda = !strcmp(optarg, "cuda");
      } else {
        fprintf(stderr, "m3s-demo: --device must be 'cpu' or 'cuda', got '%s'\n", optarg);
        rc = -1;
      }
      break;
    case 'h': usage(stdout); return 1;
    default: rc = -1; break;
    }
  }
  if (rc == 0 && optind < argc) {
    fprintf(stderr, "m3s-demo: unexpected argument '%s'\n", argv[optind]);
    rc = -1;
  }
  if (rc == 0 && o->prompt_max < o->prompt_min) {
    fprintf(stderr, "m3s-demo: --prompt-max (%d) is smaller than --prompt-min (%d)\n",
            o->prompt_max, o->prompt_min);
    rc = -1;
  }
  if (rc)
    fprintf(stderr, "(m3s-demo --help lists the flags)\n");
  return rc;
}

/* ------------------------------------------------------------------------
 * Small utilities: random numbers, time, errors
 * ---------------------------------------------------------------------- */
typedef struct {
  uint64_t s;
} rng;

static uint64_t splitmix(uint64_t *s) {
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static uint64_t hash3(uint64_t a, uint64_t b, uint64_t c) {
  uint64_t s = a ^ (b * 0xD1B54A32D192ED03ull) ^ (c * 0x8CB92BA72F3D8DD7ull);
  return splitmix(&s);
}

static uint64_t rng_next(rng *r) { return splitmix(&r->s); }
static int rng_int(rng *r, int n) { return (int)(rng_next(r) % (uint64_t)n); }

/* Approximately N(0,1): sum of four 16-bit uniforms (Irwin-Hall), one draw. */
static float rng_normal(rng *r) {
  uint64_t x = rng_next(r);
  float s = (float)(x & 0xFFFF) + (float)((x >> 16) & 0xFFFF) + (float)((x >> 32) & 0xFFFF) +
            (float)(x >> 48);
  return (s * (1.0f / 65536.0f) - 2.0f) * 1.7320508f;
}

static void rng_unit(rng *r, float *v, int n) {
  double ss = 0;
  for (int i = 0; i < n; i++) {
    v[i] = rng_normal(r);
    ss += (double)v[i] * v[i];
  }
  float inv = (float)(1.0 / sqrt(ss));
  for (int i = 0; i < n; i++)
    v[i] *= inv;
}

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int lib_error(const char *what, m3s_status st) {
  fflush(stdout);
  fprintf(stderr, "m3s-demo: %s failed: %s\n  %s\n", what, m3s_status_string(st), m3s_last_error());
  return -1;
}

/* Evaluates a library call; on failure prints its error and returns -1. */
#define TRY(what, call)                                                                            \
  do {                                                                                             \
    m3s_status st_ = (call);                                                                       \
    if (st_ != M3S_OK)                                                                             \
      return lib_error(what, st_);                                                                 \
  } while (0)

static int out_of_memory(size_t bytes) {
  fflush(stdout);
  fprintf(stderr, "m3s-demo: out of memory (%zu bytes)\n", bytes);
  return -1;
}

static void *xcalloc(size_t n, size_t size) {
  void *p = calloc(n ? n : 1, size ? size : 1);
  if (!p)
    out_of_memory(n * size);
  return p;
}

/* bf16 is the upper half of an fp32: widening is exact, narrowing rounds to
 * nearest even (NaN kept quiet). The demo needs no more than the public header. */
static float bf(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

static uint16_t to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u)
    return (uint16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

/* ------------------------------------------------------------------------
 * Buffers: a host copy and, on a CUDA context, a device copy (on the CPU the
 * library works on the host copy itself and uploads/downloads do nothing).
 * ---------------------------------------------------------------------- */
typedef struct {
  void *h, *d;
  size_t bytes;
} buf;

static int g_on_device = 0;   /* tensors live on CUDA device 0 */
static int g_tdev = M3S_HOST; /* m3s_tensor.device of every tensor */

#ifdef M3S_DEMO_CUDA
static int cuda_ok(cudaError_t e, const char *what) {
  if (e == cudaSuccess)
    return 0;
  fflush(stdout);
  fprintf(stderr, "m3s-demo: %s failed: %s\n", what, cudaGetErrorString(e));
  return -1;
}
#endif

static int buf_alloc(buf *b, size_t bytes) {
  b->bytes = bytes;
  b->h = calloc(1, bytes ? bytes : 1);
  b->d = b->h;
  if (!b->h)
    return out_of_memory(bytes);
#ifdef M3S_DEMO_CUDA
  if (g_on_device) {
    b->d = NULL;
    if (cuda_ok(cudaMalloc(&b->d, bytes ? bytes : 1), "cudaMalloc") ||
        cuda_ok(cudaMemset(b->d, 0, bytes), "cudaMemset"))
      return -1;
  }
#endif
  return 0;
}

static int buf_upload(buf *b, size_t bytes) {
#ifdef M3S_DEMO_CUDA
  if (b->d != b->h)
    return cuda_ok(cudaMemcpy(b->d, b->h, bytes, cudaMemcpyHostToDevice), "cudaMemcpy (upload)");
#endif
  (void)b;
  (void)bytes;
  return 0;
}

static int buf_download(buf *b, size_t bytes) {
#ifdef M3S_DEMO_CUDA
  if (b->d != b->h)
    return cuda_ok(cudaMemcpy(b->h, b->d, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy (download)");
#endif
  (void)b;
  (void)bytes;
  return 0;
}

static int dev_sync(void) {
#ifdef M3S_DEMO_CUDA
  if (g_on_device)
    return cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
#endif
  return 0;
}

static void buf_free(buf *b) {
#ifdef M3S_DEMO_CUDA
  if (b->d && b->d != b->h)
    cudaFree(b->d);
#endif
  free(b->h);
  b->h = b->d = NULL;
  b->bytes = 0;
}

static m3s_tensor view(const buf *b, m3s_dtype dt, int ndim, int64_t d0, int64_t d1, int64_t d2) {
  int64_t shape[3] = {d0, d1, d2};
  return m3s_tensor_make(b->d, dt, ndim, shape, g_tdev);
}

/* ------------------------------------------------------------------------
 * Requests, needles, page pools
 * ---------------------------------------------------------------------- */
enum { REQ_WAITING, REQ_PREFILL, REQ_DECODE };

typedef struct {
  int block;   /* logical block of the needle in its request */
  int off;     /* its passage: tokens [off, off + NEEDLE_TOKENS) of the block */
  float u[HD]; /* unit index direction */
  float *kdir; /* [Hkv][HD] unit key directions */
  float *val;  /* [Hkv][HD] value vectors */
} needle;

typedef struct {
  int prompt_len, state, prefilled, len, decodes;
  int32_t *pages, *ipages; /* K/V-cache and index-cache page of each logical block */
  int npages, cap_pages;
  int nneedles, ask_from; /* prefill tokens at pos >= ask_from may ask */
  needle nd[MAX_NEEDLES];
} request;

typedef struct {
  int32_t *ids;
  int n;
} page_pool;

/* ------------------------------------------------------------------------
 * A step as scheduled: entries in engine order (decode requests, padding,
 * then prefill chunks). Entry i owns rows [row0, row0 + rows).
 * ---------------------------------------------------------------------- */
typedef struct {
  int req;   /* request index, -1 for a padded (filler) request */
  int n;     /* new tokens (0 for padding) */
  int start; /* position of the first new token (= cached tokens, ctx) */
  int rows;  /* rows it owns: n, or the decode q_len for padding */
  int row0;
  int decode; /* scheduled as a decode request */
} entry;

typedef struct {
  int nent, ndec, npad, q_len, spec, rows, real_tokens;
  entry e[MAX_ENTRIES];
} sched_step;

/* Statistics and check results, per step and for the whole run. */
typedef struct {
  long long steps, pf_tokens, dec_tokens, pad_rows, ref_rows, failures;
  double max_err, max_lse_err, ms, dec_ms;
  long long dec_steps;
  long long ask_pairs, ask_hits, n_cos_ask, n_cos_bg;
  long long ask_pairs_sparse, ask_hits_sparse; /* rows with nb > K: the indexer chose */
  double cos_ask, cos_bg;
  double att_pf, att_dec;
  long long n_att_pf, n_att_dec;
} stats;

typedef struct {
  options opt;
  m3s_layer_config cfg;
  m3s_context *ctx;
  int hq, hkv, grp, topk;
  /* caches */
  int64_t num_pages, kv_stride[4];
  buf kv, ic;
  page_pool main_pool, index_pool;
  /* requests */
  int nreq, late, pure_done;
  request *req;
  /* whole-step buffers, capacity tcap rows, ecap requests x ccap table columns */
  int tcap, ecap, ccap;
  buf q, iq, k, v, ik, slots, islots, topk_b, out, lse;
  buf seq_lens, qsl, table, itable, ws;
  int32_t *row_req, *row_pos, *row_ask, *row_dec;
  /* reference scratch */
  double *ref_k, *ref_v, *ref_p, *ref_s;
  int max_blocks;
  rng act, sched, samp;
  int fail_msgs;
  stats total;
} demo;

static void fail(demo *dm, stats *st, const char *fmt, ...) {
  st->failures++;
  if (dm->fail_msgs++ >= 10)
    return;
  va_list ap;
  va_start(ap, fmt);
  printf("    FAIL: ");
  vprintf(fmt, ap);
  printf("\n");
  va_end(ap);
}

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
static int ensure_pages(demo *dm, request *rq, int upto) {
  while ((int64_t)rq->npages * BLK < upto) {
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

/* Needle blocks: distinct random blocks in the first 40% of the prompt. */
static int plant_needles(demo *dm, request *rq) {
  int full = rq->prompt_len / BLK, cand = (full * 2) / 5;
  int want = dm->opt.needles < cand ? dm->opt.needles : cand;
  if (full < 4)
    want = 0;
  rq->nneedles = 0;
  int last = -1;
  while (rq->nneedles < want) {
    int b = rng_int(&dm->sched, cand), dup = 0;
    for (int i = 0; i < rq->nneedles; i++)
      dup |= rq->nd[i].block == b;
    if (dup)
      continue;
    needle *nd = &rq->nd[rq->nneedles++];
    nd->block = b;
    nd->off = rng_int(&dm->sched, BLK - NEEDLE_TOKENS + 1);
    last = b > last ? b : last;
    rng_unit(&dm->act, nd->u, HD);
    nd->kdir = (float *)xcalloc((size_t)dm->hkv * HD, sizeof(float));
    nd->val = (float *)xcalloc((size_t)dm->hkv * HD, sizeof(float));
    if (!nd->kdir || !nd->val)
      return -1;
    for (int g = 0; g < dm->hkv; g++) {
      rng_unit(&dm->act, nd->kdir + g * HD, HD);
      for (int d = 0; d < HD; d++)
        nd->val[g * HD + d] = rng_normal(&dm->act);
    }
  }
  /* Askers sit at least one whole block past the last needle. */
  rq->ask_from = (last + 2) * BLK;
  return 0;
}

/* ------------------------------------------------------------------------
 * Setup
 * ---------------------------------------------------------------------- */
static int graph_size(int n) { return n <= 4 ? 4 : n <= 8 ? 8 : (n + 7) / 8 * 8; }

static int demo_init(demo *dm) {
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

  g_on_device = o->cuda;
  g_tdev = o->cuda ? 0 : M3S_HOST;
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
    rq->cap_pages = (int)((rq->prompt_len + extra + BLK - 1) / BLK);
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
    int64_t s[4] = {BLK * H * 2 * HD, 2 * HD, H * 2 * HD, 1};
    memcpy(dm->kv_stride, s, sizeof s);
  } else {
    int64_t s[4] = {H * BLK * 2 * HD, BLK * 2 * HD, 2 * HD, 1};
    memcpy(dm->kv_stride, s, sizeof s);
  }
  if (buf_alloc(&dm->kv, (size_t)(P * H * BLK * 2 * HD) * 2) ||
      buf_alloc(&dm->ic, (size_t)(P * BLK * HD) * 2) || pool_init(&dm->main_pool, P, &dm->sched) ||
      pool_init(&dm->index_pool, P, &dm->sched))
    return -1;

  /* Whole-step buffers. */
  dm->ecap = graph_size(dm->nreq) > dm->nreq ? graph_size(dm->nreq) : dm->nreq;
  int dec_rows = dm->ecap * (1 + o->spec_tokens);
  dm->tcap = o->chunk > dec_rows ? o->chunk : dec_rows;
  size_t T = (size_t)dm->tcap, E = (size_t)dm->ecap;
  if (buf_alloc(&dm->q, T * dm->hq * HD * 2) || buf_alloc(&dm->iq, T * dm->hkv * HD * 2) ||
      buf_alloc(&dm->k, T * dm->hkv * HD * 2) || buf_alloc(&dm->v, T * dm->hkv * HD * 2) ||
      buf_alloc(&dm->ik, T * HD * 2) || buf_alloc(&dm->slots, T * 8) ||
      buf_alloc(&dm->islots, T * 8) || buf_alloc(&dm->topk_b, T * dm->hkv * dm->topk * 4) ||
      buf_alloc(&dm->out, T * dm->hq * HD * 2) || buf_alloc(&dm->lse, T * dm->hq * 4) ||
      buf_alloc(&dm->seq_lens, E * 4) || buf_alloc(&dm->qsl, (E + 1) * 4) ||
      buf_alloc(&dm->table, E * dm->ccap * 4) || buf_alloc(&dm->itable, E * dm->ccap * 4))
    return -1;
  dm->row_req = (int32_t *)xcalloc(T, sizeof(int32_t));
  dm->row_pos = (int32_t *)xcalloc(T, sizeof(int32_t));
  dm->row_ask = (int32_t *)xcalloc(T, sizeof(int32_t));
  dm->row_dec = (int32_t *)xcalloc(T, sizeof(int32_t));
  size_t maxkeys = (size_t)dm->topk * BLK;
  dm->ref_k = (double *)xcalloc(maxkeys * HD, sizeof(double));
  dm->ref_v = (double *)xcalloc(maxkeys * HD, sizeof(double));
  dm->ref_p = (double *)xcalloc(maxkeys, sizeof(double));
  dm->ref_s = (double *)xcalloc((size_t)dm->max_blocks, sizeof(double));
  if (!dm->row_req || !dm->row_pos || !dm->row_ask || !dm->row_dec || !dm->ref_k || !dm->ref_v ||
      !dm->ref_p || !dm->ref_s)
    return -1;
  return 0;
}

static void demo_free(demo *dm) {
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
  free(dm->ref_k);
  free(dm->ref_v);
  free(dm->ref_p);
  free(dm->ref_s);
  m3s_context_destroy(dm->ctx);
}

static void print_header(const demo *dm) {
  const options *o = &dm->opt;
  double kv_mib = (double)dm->kv.bytes / (1 << 20), ic_mib = (double)dm->ic.bytes / (1 << 20);
  printf("m3s-demo (m3sparse %s): MiniMax-M3 sparse layer, %s: %d q heads / %d KV head%s "
         "(G = %d), top-%d of %d-token blocks, local %d\n",
         m3s_version(), o->tp == 1 ? "all heads (TP1)" : "one TP rank", dm->hq, dm->hkv,
         dm->hkv > 1 ? "s" : "", dm->grp, dm->topk, BLK, dm->cfg.local_blocks);
  printf("  caches: bf16 K/V %lld pages %s (%.1f MiB) + bf16 index (%.1f MiB), pages handed "
         "out in shuffled order\n",
         (long long)dm->num_pages, o->token_major ? "token-major" : "head-major", kv_mib, ic_mib);
  char spec[48] = "";
  if (o->spec_tokens && o->decode_steps > 1)
    snprintf(spec, sizeof spec, ", then speculative q_len %d", 1 + o->spec_tokens);
  printf("  trace: %d request%s, chunk %d tokens, %d decode steps at the end (q_len 1%s), "
         "seed %llu\n",
         dm->nreq, dm->nreq > 1 ? "s" : "", o->chunk, o->decode_steps, spec, o->seed);
  for (int r = 0; r < dm->nreq; r++) {
    const request *rq = &dm->req[r];
    char nb[96] = "";
    size_t len = 0;
    for (int i = 0; i < rq->nneedles; i++)
      len += (size_t)snprintf(nb + len, sizeof nb - len, "%s%d", i ? ", " : "", rq->nd[i].block);
    printf("  r%d: prompt %d tokens (%d blocks)%s, needle blocks: %s\n", r, rq->prompt_len,
           (rq->prompt_len + BLK - 1) / BLK, r == dm->late ? ", arrives late" : "",
           rq->nneedles ? nb : "none");
  }
}

/* Kernel names from m3s_query_support (SPEC section 8). */
static int print_support(const demo *dm) {
  static const struct {
    m3s_op op;
    const char *name;
  } ops[] = {{M3S_OP_INDEX_TOPK, "topk"},
             {M3S_OP_ATTENTION_DECODE, "decode"},
             {M3S_OP_ATTENTION_PREFILL, "prefill"}};
  char line[512];
  size_t len = 0;
  for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++) {
    m3s_support_query qy = {
        ops[i].op, M3S_BF16, M3S_BF16,
        M3S_BF16,  0,        dm->opt.token_major ? M3S_LAYOUT_TOKEN_MAJOR : M3S_LAYOUT_HEAD_MAJOR};
    m3s_support_info info;
    TRY("m3s_query_support", m3s_query_support(dm->ctx, &dm->cfg, &qy, &info));
    if (!info.supported) { /* the first library call will fail and say why */
      printf("  device %s: UNSUPPORTED (%s: %s)\n", dm->opt.cuda ? "cuda:0" : "cpu", ops[i].name,
             info.reason);
      return 0;
    }
    len += (size_t)snprintf(line + len, sizeof line - len, "%s%s %s", i ? ", " : "", ops[i].name,
                            info.kernel);
  }
  printf("  device %s, kernels: %s\n", dm->opt.cuda ? "cuda:0" : "cpu", line);
  return 0;
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
static int schedule_step(demo *dm, sched_step *s) {
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
static void advance(demo *dm, const sched_step *s) {
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

/* ------------------------------------------------------------------------
 * Activations of a step
 * ---------------------------------------------------------------------- */
/* Which needle token (pos) of request r asks for, or NO_ASK. */
static int asks_for(const demo *dm, int r, int pos, int decode) {
  const request *rq = &dm->req[r];
  if (rq->nneedles == 0 || pos < rq->ask_from)
    return NO_ASK;
  if (decode) { /* two decode tokens in three ask (with 2 needles) */
    int k = pos % (rq->nneedles + 1);
    return k < rq->nneedles ? k : NO_ASK;
  }
  uint64_t h = hash3(dm->opt.seed, (uint64_t)r, (uint64_t)pos);
  if ((int)(h & 255) >= ASK_PREFILL_PER_256)
    return NO_ASK;
  return (int)((h >> 8) % (uint64_t)rq->nneedles);
}

static int needle_at(const request *rq, int pos) {
  for (int i = 0; i < rq->nneedles; i++)
    if (pos >= rq->nd[i].block * BLK + rq->nd[i].off &&
        pos < rq->nd[i].block * BLK + rq->nd[i].off + NEEDLE_TOKENS && pos < rq->prompt_len)
      return i;
  return -1;
}

static void fill_bf16(rng *r, uint16_t *dst, int n, const float *dir, float amount) {
  for (int d = 0; d < n; d++) {
    float x = rng_normal(r);
    if (dir)
      x += amount * dir[d];
    dst[d] = to_bf16(x);
  }
}

/* One row: q, iq, k, v, ik of token pos of request r (r < 0: filler garbage). */
static void gen_row(demo *dm, int row, int r, int pos, int decode) {
  uint16_t *q = (uint16_t *)dm->q.h + (size_t)row * dm->hq * HD;
  uint16_t *iq = (uint16_t *)dm->iq.h + (size_t)row * dm->hkv * HD;
  uint16_t *k = (uint16_t *)dm->k.h + (size_t)row * dm->hkv * HD;
  uint16_t *v = (uint16_t *)dm->v.h + (size_t)row * dm->hkv * HD;
  uint16_t *ik = (uint16_t *)dm->ik.h + (size_t)row * HD;
  int ask = r >= 0 ? asks_for(dm, r, pos, decode) : NO_ASK;
  int nd = r >= 0 ? needle_at(&dm->req[r], pos) : -1;
  const needle *an = ask != NO_ASK ? &dm->req[r].nd[ask] : NULL;
  const needle *nn = nd >= 0 ? &dm->req[r].nd[nd] : NULL;
  dm->row_req[row] = r;
  dm->row_pos[row] = pos;
  dm->row_ask[row] = ask;
  dm->row_dec[row] = decode;
  for (int h = 0; h < dm->hq; h++)
    fill_bf16(&dm->act, q + h * HD, HD, an ? an->kdir + (h / dm->grp) * HD : NULL, NEEDLE_QUERY);
  for (int g = 0; g < dm->hkv; g++) {
    fill_bf16(&dm->act, iq + g * HD, HD, an ? an->u : NULL, NEEDLE_INDEX);
    fill_bf16(&dm->act, k + g * HD, HD, nn ? nn->kdir + g * HD : NULL, NEEDLE_KEY);
    if (nn) {
      for (int d = 0; d < HD; d++)
        v[g * HD + d] = to_bf16(nn->val[g * HD + d] + NEEDLE_VNOISE * rng_normal(&dm->act));
    } else {
      fill_bf16(&dm->act, v + g * HD, HD, NULL, 0.0f);
    }
  }
  fill_bf16(&dm->act, ik, HD, nn ? nn->u : NULL, NEEDLE_INDEX);
}

static void gen_step(demo *dm, const sched_step *s) {
  int64_t *slots = (int64_t *)dm->slots.h, *islots = (int64_t *)dm->islots.h;
  for (int i = 0; i < s->nent; i++) {
    const entry *e = &s->e[i];
    for (int t = 0; t < e->rows; t++) {
      int row = e->row0 + t;
      if (e->req < 0) {
        gen_row(dm, row, -1, 0, 1);
        slots[row] = islots[row] = -1; /* padding: not written to the caches */
        continue;
      }
      const request *rq = &dm->req[e->req];
      int pos = e->start + t;
      gen_row(dm, row, e->req, pos, e->decode);
      slots[row] = (int64_t)rq->pages[pos / BLK] * BLK + pos % BLK;
      islots[row] = (int64_t)rq->ipages[pos / BLK] * BLK + pos % BLK;
    }
  }
}

/* ------------------------------------------------------------------------
 * Checks
 * ---------------------------------------------------------------------- */
static int64_t kv_elem(const demo *dm, int page, int g, int off) {
  return page * dm->kv_stride[0] + g * dm->kv_stride[1] + off * dm->kv_stride[2];
}

static const int32_t *topk_row(const demo *dm, int row, int g) {
  return (const int32_t *)dm->topk_b.h + ((size_t)row * dm->hkv + g) * dm->topk;
}

static int is_forced(const demo *dm, int b, int nb) {
  return b < dm->cfg.init_blocks || b >= nb - dm->cfg.local_blocks;
}

/* Top-k row layout: min(K, nb) ascending ids in [0, nb), forced blocks in, -1 after. */
static void check_topk_row(demo *dm, stats *st, int step_no, int row, int g) {
  const int32_t *ids = topk_row(dm, row, g);
  int pos = dm->row_pos[row], nb = pos / BLK + 1, kk = nb < dm->topk ? nb : dm->topk;
  const char *bad = NULL;
  for (int a = 0; a < dm->topk && !bad; a++) {
    if (a >= kk)
      bad = ids[a] != -1 ? "entries after min(K, nb) must be -1" : NULL;
    else if (ids[a] < 0 || ids[a] >= nb)
      bad = "a selected block is outside [0, nb)";
    else if (a > 0 && ids[a] <= ids[a - 1])
      bad = "block ids are not strictly ascending";
  }
  int forced = 0, found = 0;
  for (int b = 0; b < nb && !bad; b++)
    if (is_forced(dm, b, nb)) {
      forced++;
      for (int a = 0; a < kk; a++)
        found += ids[a] == b;
    }
  if (!bad && found != forced)
    bad = "a forced (local) block is missing";
  if (bad) {
    char txt[160];
    size_t len = 0;
    for (int a = 0; a < dm->topk && len < sizeof txt - 12; a++)
      len += (size_t)snprintf(txt + len, sizeof txt - len, "%s%d", a ? " " : "", ids[a]);
    fail(dm, st, "step %d row %d (r%d pos %d, nb %d) KV head %d: %s: [%s]", step_no, row,
         dm->row_req[row], pos, nb, g, bad, txt);
  }
}

static void check_padded_row(demo *dm, stats *st, int step_no, int row) {
  for (int g = 0; g < dm->hkv; g++)
    for (int a = 0; a < dm->topk; a++)
      if (topk_row(dm, row, g)[a] != -1) {
        fail(dm, st, "step %d padded row %d: top-k entry %d of KV head %d is %d, not -1", step_no,
             row, a, g, topk_row(dm, row, g)[a]);
        return;
      }
  const uint16_t *o = (const uint16_t *)dm->out.h + (size_t)row * dm->hq * HD;
  const float *l = (const float *)dm->lse.h + (size_t)row * dm->hq;
  for (int h = 0; h < dm->hq; h++) {
    if (!(isinf(l[h]) && l[h] < 0)) {
      fail(dm, st, "step %d padded row %d: lse of head %d is %g, not -inf", step_no, row, h,
           (double)l[h]);
      return;
    }
    for (int d = 0; d < HD; d++)
      if (o[h * HD + d] != 0) {
        fail(dm, st, "step %d padded row %d: output of head %d is not 0", step_no, row, h);
        return;
      }
  }
}

static double cosine(const uint16_t *o, const float *v) {
  double dot = 0, a = 0, b = 0;
  for (int d = 0; d < HD; d++) {
    double x = bf(o[d]);
    dot += x * v[d];
    a += x * x;
    b += (double)v[d] * v[d];
  }
  return a > 0 && b > 0 ? dot / sqrt(a * b) : 0.0;
}

/* Keys attended / keys visible, needle recall and cosines, for one real row. */
static void row_statistics(demo *dm, stats *st, int row) {
  int r = dm->row_req[row], pos = dm->row_pos[row], nb = pos / BLK + 1;
  int kk = nb < dm->topk ? nb : dm->topk, ask = dm->row_ask[row];
  const request *rq = &dm->req[r];
  for (int g = 0; g < dm->hkv; g++) {
    const int32_t *ids = topk_row(dm, row, g);
    long attended = 0;
    int hit = 0;
    for (int a = 0; a < kk; a++) {
      int id = ids[a];
      if (id < 0 || id >= nb)
        continue;
      attended += pos - id * BLK + 1 < BLK ? pos - id * BLK + 1 : BLK;
      hit |= ask != NO_ASK && id == rq->nd[ask].block;
    }
    double frac = (double)attended / (pos + 1);
    if (dm->row_dec[row]) {
      st->att_dec += frac;
      st->n_att_dec++;
    } else {
      st->att_pf += frac;
      st->n_att_pf++;
    }
    if (ask != NO_ASK) {
      st->ask_pairs++;
      st->ask_hits += hit;
      if (nb > dm->topk) {
        st->ask_pairs_sparse++;
        st->ask_hits_sparse += hit;
      }
    }
    /* Cosine of each head's output with the needle's values: the asked one, or
     * for a token that does not ask, the needle it would ask by its position. */
    int which = ask != NO_ASK ? ask : rq->nneedles ? pos % rq->nneedles : -1;
    if (which < 0 || pos < (rq->nd[which].block + 2) * BLK)
      continue;
    for (int h = g * dm->grp; h < (g + 1) * dm->grp; h++) {
      double c = cosine((const uint16_t *)dm->out.h + ((size_t)row * dm->hq + h) * HD,
                        rq->nd[which].val + g * HD);
      if (ask != NO_ASK) {
        st->cos_ask += c;
        st->n_cos_ask++;
      } else {
        st->cos_bg += c;
        st->n_cos_bg++;
      }
    }
  }
}

/* Recompute the block scores of (row, g) in fp64 from the index cache and
 * check the library's choice is the top-k (up to SEL_TOL on near ties). */
static void check_selection(demo *dm, stats *st, int step_no, int row, int g) {
  const request *rq = &dm->req[dm->row_req[row]];
  int pos = dm->row_pos[row], nb = pos / BLK + 1;
  if (nb <= dm->topk)
    return; /* everything is selected; check_topk_row covered it */
  const uint16_t *iq = (const uint16_t *)dm->iq.h + ((size_t)row * dm->hkv + g) * HD;
  const uint16_t *ic = (const uint16_t *)dm->ic.h;
  double qv[HD];
  for (int d = 0; d < HD; d++)
    qv[d] = bf(iq[d]);
  for (int b = 0; b < nb; b++) {
    double best = -INFINITY;
    int last = pos - b * BLK + 1 < BLK ? pos - b * BLK + 1 : BLK;
    for (int off = 0; off < last; off++) {
      const uint16_t *key = ic + ((size_t)rq->ipages[b] * BLK + off) * HD;
      double s = 0;
      for (int d = 0; d < HD; d++)
        s += qv[d] * bf(key[d]);
      best = s > best ? s : best;
    }
    dm->ref_s[b] = best;
  }
  const int32_t *ids = topk_row(dm, row, g);
  double worst_in = INFINITY, best_out = -INFINITY;
  int worst_id = -1, best_id = -1;
  for (int b = 0; b < nb; b++) {
    int in = 0;
    for (int a = 0; a < dm->topk; a++)
      in |= ids[a] == b;
    if (is_forced(dm, b, nb))
      continue;
    if (in && dm->ref_s[b] < worst_in)
      worst_in = dm->ref_s[b], worst_id = b;
    if (!in && dm->ref_s[b] > best_out)
      best_out = dm->ref_s[b], best_id = b;
  }
  if (worst_id >= 0 && best_id >= 0 && worst_in < best_out - SEL_TOL)
    fail(dm, st,
         "step %d row %d KV head %d: not the top-%d: block %d (score %.4f) selected but "
         "block %d (score %.4f) not",
         step_no, row, g, dm->topk, worst_id, worst_in, best_id, best_out);
}

/* fp64 causal attention over the keys of the selected blocks of (row, every
 * head), read through the block table; returns the relative L2 error. */
static double check_attention(demo *dm, stats *st, int step_no, int row) {
  const request *rq = &dm->req[dm->row_req[row]];
  int pos = dm->row_pos[row], nb = pos / BLK + 1, kk = nb < dm->topk ? nb : dm->topk;
  const uint16_t *kv = (const uint16_t *)dm->kv.h;
  double num = 0, den = 0, scale = dm->cfg.softmax_scale;
  for (int g = 0; g < dm->hkv; g++) {
    const int32_t *ids = topk_row(dm, row, g);
    int nk = 0;
    for (int a = 0; a < kk; a++) {
      int id = ids[a];
      if (id < 0 || id >= nb)
        continue;
      int last = pos - id * BLK + 1 < BLK ? pos - id * BLK + 1 : BLK;
      for (int off = 0; off < last; off++, nk++) {
        const uint16_t *e = kv + kv_elem(dm, rq->pages[id], g, off);
        for (int d = 0; d < HD; d++) {
          dm->ref_k[(size_t)nk * HD + d] = bf(e[d]);
          dm->ref_v[(size_t)nk * HD + d] = bf(e[HD + d]);
        }
      }
    }
    for (int h = g * dm->grp; h < (g + 1) * dm->grp; h++) {
      const uint16_t *q = (const uint16_t *)dm->q.h + ((size_t)row * dm->hq + h) * HD;
      const uint16_t *o = (const uint16_t *)dm->out.h + ((size_t)row * dm->hq + h) * HD;
      double qv[HD], ref[HD] = {0}, m = -INFINITY, sum = 0;
      for (int d = 0; d < HD; d++)
        qv[d] = bf(q[d]);
      for (int j = 0; j < nk; j++) {
        double s = 0;
        for (int d = 0; d < HD; d++)
          s += qv[d] * dm->ref_k[(size_t)j * HD + d];
        dm->ref_p[j] = s * scale;
        m = dm->ref_p[j] > m ? dm->ref_p[j] : m;
      }
      for (int j = 0; j < nk; j++) {
        double p = exp(dm->ref_p[j] - m);
        sum += p;
        for (int d = 0; d < HD; d++)
          ref[d] += p * dm->ref_v[(size_t)j * HD + d];
      }
      for (int d = 0; d < HD; d++) {
        ref[d] /= sum;
        double diff = bf(o[d]) - ref[d];
        num += diff * diff;
        den += ref[d] * ref[d];
      }
      double lse_ref = m + log(sum);
      double lerr = fabs((double)((const float *)dm->lse.h)[(size_t)row * dm->hq + h] - lse_ref);
      if (!(lerr <= LSE_TOL))
        fail(dm, st, "step %d row %d head %d: lse %.6f, reference %.6f", step_no, row, h,
             (double)((const float *)dm->lse.h)[(size_t)row * dm->hq + h], lse_ref);
      if (!(lerr <= st->max_lse_err))
        st->max_lse_err = lerr;
    }
    check_selection(dm, st, step_no, row, g);
  }
  double err = den > 0 ? sqrt(num / den) : (num > 0 ? INFINITY : 0.0);
  if (!(err < REF_TOL))
    fail(dm, st, "step %d row %d (r%d pos %d): relative L2 error %.3e >= %.0e", step_no, row,
         dm->row_req[row], pos, err, REF_TOL);
  return err;
}

/* The rows of a step checked against the reference: the first and the last
 * real row, an asking row if there is one, the rest at random. */
static int pick_rows(demo *dm, const sched_step *s, int *rows, int want) {
  int n = 0, first = -1, last = -1, nask = 0, nreal = 0;
  for (int t = 0; t < s->rows; t++)
    if (dm->row_req[t] >= 0) {
      first = first < 0 ? t : first;
      last = t;
      nreal++;
      nask += dm->row_ask[t] != NO_ASK;
    }
  if (nreal == 0 || want == 0)
    return 0;
  want = want < nreal ? want : nreal;
  int cand[3] = {first, last, -1};
  if (nask) {
    int pick = rng_int(&dm->samp, nask);
    for (int t = 0; t < s->rows; t++)
      if (dm->row_req[t] >= 0 && dm->row_ask[t] != NO_ASK && pick-- == 0)
        cand[2] = t;
  }
  for (int tries = 0; n < want && tries < 64 * want + 3; tries++) {
    int t = tries < 3 ? cand[tries] : rng_int(&dm->samp, s->rows);
    if (t < 0 || dm->row_req[t] < 0)
      continue;
    int dup = 0;
    for (int i = 0; i < n; i++)
      dup |= rows[i] == t;
    if (!dup)
      rows[n++] = t;
  }
  return n;
}

static void check_step(demo *dm, const sched_step *s, int step_no, stats *st) {
  for (int t = 0; t < s->rows; t++) {
    if (dm->row_req[t] < 0) {
      st->pad_rows++;
      check_padded_row(dm, st, step_no, t);
      continue;
    }
    for (int g = 0; g < dm->hkv; g++)
      check_topk_row(dm, st, step_no, t, g);
    row_statistics(dm, st, t);
  }
  int rows[64], want = dm->opt.check_rows < 64 ? dm->opt.check_rows : 64;
  int n = pick_rows(dm, s, rows, want);
  for (int i = 0; i < n; i++) {
    double err = check_attention(dm, st, step_no, rows[i]);
    st->ref_rows++;
    if (!(err <= st->max_err))
      st->max_err = err;
  }
}

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
  return buf_upload(&dm->q, t * dm->hq * HD * 2) || buf_upload(&dm->iq, t * dm->hkv * HD * 2) ||
                 buf_upload(&dm->k, t * dm->hkv * HD * 2) ||
                 buf_upload(&dm->v, t * dm->hkv * HD * 2) || buf_upload(&dm->ik, t * HD * 2) ||
                 buf_upload(&dm->slots, t * 8) || buf_upload(&dm->islots, t * 8)
             ? -1
             : 0;
}

static int download_results(demo *dm, int T, int caches) {
  size_t t = (size_t)T;
  if (buf_download(&dm->topk_b, t * dm->hkv * dm->topk * 4) ||
      buf_download(&dm->out, t * dm->hq * HD * 2) || buf_download(&dm->lse, t * dm->hq * 4))
    return -1;
  if (caches && (buf_download(&dm->kv, dm->kv.bytes) || buf_download(&dm->ic, dm->ic.bytes)))
    return -1;
  return 0;
}

/* Insert + forward through the library; *ms is their wall time. */
static int layer_step(demo *dm, const m3s_step_plan *p, const m3s_step *step, double *ms) {
  int64_t T = p->num_tokens, H = dm->hkv;
  int64_t kvshape[4] = {dm->num_pages, H, BLK, 2 * HD};
  m3s_tensor kv = m3s_tensor_strided(dm->kv.d, M3S_BF16, 4, kvshape, dm->kv_stride, g_tdev);
  m3s_tensor ic = view(&dm->ic, M3S_BF16, 3, dm->num_pages, BLK, HD);
  m3s_tensor q = view(&dm->q, M3S_BF16, 3, T, dm->hq, HD);
  m3s_tensor iq = view(&dm->iq, M3S_BF16, 3, T, H, HD);
  m3s_tensor k = view(&dm->k, M3S_BF16, 3, T, H, HD);
  m3s_tensor v = view(&dm->v, M3S_BF16, 3, T, H, HD);
  m3s_tensor ik = view(&dm->ik, M3S_BF16, 2, T, HD, 0);
  m3s_tensor slots = view(&dm->slots, M3S_I64, 1, T, 0, 0);
  m3s_tensor islots = view(&dm->islots, M3S_I64, 1, T, 0, 0);
  m3s_tensor topk = view(&dm->topk_b, M3S_I32, 3, T, H, dm->topk);
  m3s_tensor out = view(&dm->out, M3S_BF16, 3, T, dm->hq, HD);
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

static int run_step(demo *dm, int step_no, const sched_step *s) {
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

static void print_summary(const demo *dm, double wall) {
  const stats *t = &dm->total;
  long long tokens = t->pf_tokens + t->dec_tokens;
  printf("\nsummary: %lld steps, %lld tokens (%lld prefill, %lld decode), library time %.2f s "
         "(%.0f tokens/s), wall %.1f s\n",
         t->steps, tokens, t->pf_tokens, t->dec_tokens, t->ms * 1e-3, tokens / (t->ms * 1e-3),
         wall);
  if (t->dec_steps)
    printf("  pure decode steps: %lld, %.1f ms per step on average\n", t->dec_steps,
           t->dec_ms / (double)t->dec_steps);
  printf("  keys attended / keys visible: prefill rows %.1f%%, decode rows %.1f%% "
         "(at most %d x %d = %d keys per row and KV head)\n",
         t->n_att_pf ? 100.0 * t->att_pf / (double)t->n_att_pf : 0.0,
         t->n_att_dec ? 100.0 * t->att_dec / (double)t->n_att_dec : 0.0, dm->topk, BLK,
         dm->topk * BLK);
  if (t->ask_pairs) {
    printf("  needle recall: %lld/%lld asking (token, KV head) pairs = %.1f%%", t->ask_hits,
           t->ask_pairs, 100.0 * (double)t->ask_hits / (double)t->ask_pairs);
    if (t->ask_pairs_sparse)
      printf(" (%lld/%lld = %.1f%% with > %d blocks visible)", t->ask_hits_sparse,
             t->ask_pairs_sparse, 100.0 * (double)t->ask_hits_sparse / (double)t->ask_pairs_sparse,
             dm->topk);
    printf("\n  cos(attention output, needle value): asking tokens %.3f, other tokens %.3f\n",
           t->n_cos_ask ? t->cos_ask / (double)t->n_cos_ask : 0.0,
           t->n_cos_bg ? t->cos_bg / (double)t->n_cos_bg : 0.0);
  } else
    printf("  needle recall: no token asked for a needle (prompts too short or --needles 0)\n");
  printf("  reference: %lld rows x %d heads, max relative L2 error %.2e (limit %.0e), max |lse "
         "error| %.1e; padded rows checked: %lld\n",
         t->ref_rows, dm->hq, t->max_err, REF_TOL, t->max_lse_err, t->pad_rows);
  printf("%s (%lld failed check%s)\n", t->failures ? "FAIL" : "PASS", t->failures,
         t->failures == 1 ? "" : "s");
}

int main(int argc, char **argv) {
  demo dm;
  memset(&dm, 0, sizeof dm);
  int rc = parse_options(argc, argv, &dm.opt);
  if (rc)
    return rc > 0 ? 0 : EXIT_ERROR;
  int status = EXIT_ERROR;
  double t0 = now_s();
  if (demo_init(&dm) == 0) {
    print_header(&dm);
    if (print_support(&dm) == 0) {
      printf("\n%4s  %-7s %-11s %-27s %6s %9s %9s %8s %8s %9s\n", "step", "kind", "decode",
             "prefill (req ctx+new)", "tokens", "ms", "tok/s", "attended", "ref err", "needles");
      printf("(needles: needle recall, the share of (token, KV head) pairs asking for a "
             "planted needle whose top-k kept the needle's block)\n");
      fflush(stdout);
      sched_step s;
      int step_no = 0, ok = 1;
      while (ok && schedule_step(&dm, &s))
        ok = run_step(&dm, ++step_no, &s) == 0;
      if (ok) {
        print_summary(&dm, now_s() - t0);
        status = dm.total.failures ? EXIT_CHECK : 0;
      }
    }
  }
  if (status == EXIT_ERROR) {
    fflush(stdout);
    fprintf(stderr, "m3s-demo: stopped by the error above\n");
  }
  demo_free(&dm);
  return status;
}
