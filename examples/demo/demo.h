/* demo.h -- the shared declarations of m3s-demo (examples/demo/): constants,
 * the demo's state, and the functions each file offers the others:
 *   main.c     command line, header and summary, main (the demo's description)
 *   trace.c    setup, page pools and the scheduler of the serving trace
 *   needles.c  needles and the activations of a step
 *   step.c     one step through the library
 *   check.c    the checks, against the tests' fp64 reference (tests/ref.c)
 *   buf.c      host/device buffers
 *   util.c     random numbers, time, errors, bf16
 * Of the library only include/m3sparse.h is used; check.c also uses the
 * fp64 reference of the tests (tests/ref.h, the m3s_ref target). */
#ifndef M3S_DEMO_H
#define M3S_DEMO_H

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

/* ------------------------------------------------------------------------
 * Small utilities: random numbers, time, errors
 * ---------------------------------------------------------------------- */
typedef struct {
  uint64_t s;
} rng;

/* Evaluates a library call; on failure prints its error and returns -1. */
#define TRY(what, call)                                                                            \
  do {                                                                                             \
    m3s_status st_ = (call);                                                                       \
    if (st_ != M3S_OK)                                                                             \
      return lib_error(what, st_);                                                                 \
  } while (0)

/* ------------------------------------------------------------------------
 * Buffers: a host copy and, on a CUDA context, a device copy (on the CPU the
 * library works on the host copy itself and uploads/downloads do nothing).
 * ---------------------------------------------------------------------- */
typedef struct {
  void *h, *d;
  size_t bytes;
} buf;

/* ------------------------------------------------------------------------
 * Requests, needles, page pools
 * ---------------------------------------------------------------------- */
enum { REQ_WAITING, REQ_PREFILL, REQ_DECODE };

typedef struct {
  int block;   /* logical block of the needle in its request */
  int off;     /* its passage: tokens [off, off + NEEDLE_TOKENS) of the block */
  float u[M3S_HEAD_DIM]; /* unit index direction */
  float *kdir; /* [Hkv][M3S_HEAD_DIM] unit key directions */
  float *val;  /* [Hkv][M3S_HEAD_DIM] value vectors */
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
  /* reference block scores of one (row, KV head), max_blocks of them */
  double *ref_s;
  int max_blocks;
  rng act, sched, samp;
  int fail_msgs;
  stats total;
} demo;

/* ---- util.c ---- */
int lib_error(const char *what, m3s_status st); /* prints the error; returns -1 (TRY) */
uint64_t hash3(uint64_t a, uint64_t b, uint64_t c);
int rng_int(rng *r, int n);
float rng_gauss(rng *r);
void rng_unit(rng *r, float *v, int n);
double now_s(void);
int out_of_memory(size_t bytes);
void *xcalloc(size_t n, size_t size);
float bf(uint16_t h);
uint16_t to_bf16(float f);

/* ---- buf.c ---- */
int buf_alloc(buf *b, size_t bytes);
int buf_upload(buf *b, size_t bytes);
int buf_download(buf *b, size_t bytes);
int dev_sync(void);
void buf_free(buf *b);
m3s_tensor view(const buf *b, m3s_dtype dt, int ndim, int64_t d0, int64_t d1, int64_t d2);
void buf_set_device(int cuda); /* 1: tensors on CUDA device 0 */
int buf_device(void);         /* m3s_tensor.device of the demo's tensors */

/* ---- trace.c ---- */
int ensure_pages(demo *dm, request *rq, int upto);
int demo_init(demo *dm);
void demo_free(demo *dm);
int schedule_step(demo *dm, sched_step *s);
void advance(demo *dm, const sched_step *s);

/* ---- needles.c ---- */
int plant_needles(demo *dm, request *rq);
void gen_step(demo *dm, const sched_step *s);

/* ---- check.c ---- */
void check_step(demo *dm, const sched_step *s, int step_no, stats *st);

/* ---- step.c ---- */
int run_step(demo *dm, int step_no, const sched_step *s);

#endif
