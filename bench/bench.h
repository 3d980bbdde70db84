/* bench.h -- the shared declarations of m3s-bench (bench/): cases, results,
 * the device state, and the functions each file offers the others:
 *   main.c      command line and main (the benchmark's description)
 *   cases.c     case lists and their flags
 *   geom.c      per-case geometry (host only)
 *   run.c       device state, graph capture and timing of a case
 *   ceilings.c  measured HBM-copy and GEMM ceilings
 *   report.c    per-case lines, table, CSV
 *   util.c      small helpers
 *   fill.cu     device-side random fills and the spin kernel
 * Only include/m3sparse.h of the library is used. */
#ifndef M3S_BENCH_H
#define M3S_BENCH_H

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
int m3sb_empty(void *stream);
int m3sb_gather_pages(const void *pool, uint64_t npages, uint64_t nread, uint64_t seed,
                      void *sink, void *stream);

#define EXIT_NO_GPU 77

#define GIB (1024.0 * 1024.0 * 1024.0)

#define MAX_LIST 16

#define MAX_CASES 4096

enum { OP_TOPK, OP_ATTN, OP_STEP, OP_PTOPK, OP_PATTN, OP_PSTEP, OP_COUNT };
static const char *const k_op_key[OP_COUNT] = {"topk", "attn", "step", "ptopk", "pattn", "pstep"};
static const char *const k_op_name[OP_COUNT] = {"decode topk",  "decode attn",  "decode step",
                                                "prefill topk", "prefill attn", "prefill step"};

static int op_prefill(int op) { return op >= OP_PTOPK; }
static int op_uses_idx(int op) { return op != OP_ATTN && op != OP_PATTN; }
static int op_uses_kv(int op) { return op != OP_TOPK && op != OP_PTOPK; }

typedef struct {
  int op, tp, bs, qlen; /* prefill: bs requests of qlen new tokens each */
  int64_t ctx;          /* decode: context (max seq_len); prefill: cached tokens (request
                           r of bs behind ctx r / (bs - 1)) */
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
  int prefill_reqs; /* prefill cases: requests in the batch (--prefill-reqs) */
  int token_major, lse, sel_token, no_graph, no_ceilings, batch_invariant;
  int score_waves; /* 0: the library's default */
  int chunk_rows;  /* certified prefill top-k: rows per chunk at most (0: the library's) */
  int topk_path; /* 0 default, 1 exact CUDA-core, 2 certified mma.sync, 3 certified decode
                    for any batch, 4 rounds selection, 5 no re-scoring (not exact) */
  int attn_generic; /* 1: attention on the generic kernel (--attn-path generic) */
  int attn_union;   /* 1: the union kernel without its size rule (--attn-path union) */
  int attn_wgmma;   /* 1: and its warpgroup consumers (--attn-path union-wgmma) */
  int attn_merge_kernel; /* 1: persistent-kernel splits through the merge kernel, no cluster */
  int attn_k2q;     /* 1: prefill attention by the key-centric path (--attn-path k2q) */
  int pdl;          /* programmatic dependent launch (--pdl): -1 default, 0 off, 1 on */
  int reps, warmup, max_sets, sets_force, device, gemm_n;
  double budget_s, case_budget_s, mem_gb, hbm_override, gemm_override;
  const char *csv;
} options;

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

typedef struct {
  options o;
  m3s_context *ctx;
  cudaStream_t stream;
  int device;
  char card[288];
  double l2;
  double hbm_gbps, gemm_tflops; /* 0 if not measured */
  double gather_gbps;           /* random 64 KiB page reads, GB/s; 0 if not measured */
  double launch_us[3];          /* graph of 1, 2, 4 empty kernels, us per replay; 0 if not measured */
  void *pool;
  size_t pool_bytes;
  int dead; /* a sticky CUDA error: no further case can run */
  double t0;
  void *tc_stats; /* device m3s_topk_tc_stats: re-scored fraction of the first call */
} bench;

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

typedef struct {
  geom g;
  int S;
  int32_t *d_seq, *d_qsl, *d_tkout;
  int32_t **d_bt, **d_tkin;
  void **d_q, **d_iq;
  void *d_out, *d_ws;
  float *d_lse, *d_scale;
  size_t ws_bytes;
  /* --attn-path k2q: the CSR (R rows) and the per-slot partials */
  int64_t csr_rows;
  int32_t *d_rp, *d_qi, *d_qs, *d_qc;
  float *d_po, *d_pl;
  m3s_tensor kv_t, idx_t;
  m3s_kv_scales scales;
  cudaGraph_t *graphs;
  cudaGraphExec_t *execs;
  cudaEvent_t *ev;
  int nev;
} case_state;

extern int g_ncases;
extern case_result g_res[MAX_CASES];

/* ---- cases.c ---- */
void case_shape(const case_spec *c, const options *o, char *buf, size_t n);
int64_t parse_size(const char *s);
int parse_list64(const char *arg, int64_t *out, int *count, const char *flag);
int parse_list_int(const char *arg, int *out, int *count, const char *flag, int64_t lo,
                   int64_t hi);
int parse_dtypes(const char *arg, int *out, int *count, const char *flag);
int parse_ops(const char *arg, unsigned *mask);
void build_all(const options *o);
void build_matrix(const options *o);

/* ---- util.c ---- */
int cmp_double(const void *a, const void *b); /* qsort order of doubles */
void note_add(case_result *r, const char *fmt, ...);
double now_s(void);
uint64_t splitmix(uint64_t *s);
int64_t ceil_div(int64_t a, int64_t b);
size_t align_up(size_t x, size_t a);
void fmt_ctx(char *buf, size_t n, int64_t v);
double median_of(double *v, int n);

/* ---- geom.c ---- */
void geom_free(geom *g);
int geom_init(geom *g, const case_spec *c);
size_t cache_bytes(const geom *g, int s);
int sets_wanted(const geom *g, const options *o, double l2);
void gen_topk(const geom *g, uint64_t seed, int sel_token, int32_t *tk);
void attn_account(const geom *g, const int32_t *tk, double *uniq_keys, double *attended);
void count_work(const geom *g, double uniq, double attended, int lse, double *bytes,
                double *flops);

/* ---- run.c ---- */
int set_cuda_err(case_result *res, cudaError_t e, const char *what, int line);
void run_case(bench *B, case_result *res);

/* ---- ceilings.c ---- */
int cuda_ok(cudaError_t e, const char *what);
double measure_copy(bench *B);
double measure_gemm(bench *B);
int measure_launch_floor(bench *B);
double measure_gather(bench *B);

/* ---- report.c ---- */
void print_case_line(const bench *B, int i, const case_result *r);
void print_table(const bench *B, double wall);
int write_csv(const bench *B, const char *path);

#endif
