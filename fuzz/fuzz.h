/* Shared declarations of the fuzz harness's files (fuzz_api.c has the
 * overview): limits, the decoded argument types, the harness state (one input
 * at a time, libFuzzer's single thread), and every function one file calls in
 * another. */
#ifndef M3S_FUZZ_H
#define M3S_FUZZ_H

#include "m3sparse.h"

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define GUARD 64
#define MAX_BUFS 64
#define MAX_BUF_BYTES ((size_t)24 << 20)
#define MAX_TOTAL_BYTES ((size_t)160 << 20)
#define MAX_REQS 8
#define MAX_COLS 48
#define MAX_T 64
#define MAX_CTX_TOTAL 3000
#define WORK_BUDGET 120000 /* sum over rows of heads x keys (attention) */
#define D 128
#define BS 128

enum { EX_FAIL = 1, EX_ANY = 2 };

/* Known library bugs (docs/reliability.md) whose input classes the decoder can
 * avoid, so that a run keeps looking for new ones: bit n-1 = bug n. */
#define AVOID(n) ((g_avoid >> ((n)-1)) & 1u)

enum {
  OP_PLAN,
  OP_INSERT,
  OP_IINSERT,
  OP_TOPK,
  OP_ATTN,
  OP_STEP,
  OP_CSR,
  OP_K2Q,
  OP_COMBINE,
  OP_MERGE,
  OP_NARROW,
  OP_MISC,
  OP_CHAIN,
  OP_CP_LOCAL,    /* m3s_cp_local_block */
  OP_CANDS,       /* m3s_index_topk_candidates */
  OP_MERGE_CANDS, /* ranks' candidates -> m3s_merge_topk_candidates vs m3s_index_topk */
  OP_MERGE_N,     /* m3s_merge_attn_states_n */
  NOPS
};

/* What an active context-parallel batch.cp (cp_size > 1) means for the
 * operation a batch is made for (bat.cp_pol, read by mk_batch). */
enum {
  CP_NONE,   /* batch.cp stays zero */
  CP_REFUSE, /* m3s_index_topk, m3s_step_forward: M3S_ERR_INVALID */
  CP_RANK,   /* honoured: the block tables are the rank's (columns of m3s_cp) */
  CP_UNSUP,  /* m3s_k2q_attention: M3S_ERR_UNSUPPORTED */
  CP_ANY     /* the block tables are not read: accepted, output unchanged */
};
typedef struct {
  unsigned long long inputs, skipped, calls, ok, rejected, must_ok, must_fail, any, ref_rows, indep,
      cp_active_ok, op_calls[NOPS], op_rej[NOPS];
  double op_sec[NOPS];
} fuzz_stats;

typedef struct {
  unsigned char *mem, *data, *snap, *allow;
  size_t bytes;
  int out;
  const char *name;
} buf_t;

typedef struct {
  m3s_tensor t;
  m3s_tensor *p; /* what is passed; NULL for the NULL mutation */
  buf_t *b;
  int ndim;
  int64_t shape[4]; /* nominal */
  int broken;       /* the view is not an honest description of its buffer */
  int mut;
  const char *name;
} targ;

typedef struct {
  const char *name;
  m3s_dtype dt;
  unsigned ok_dtypes; /* dtypes accepted for this operand given the others */
  int ndim;
  int64_t shape[4];
  int out;
  int contig;         /* must be contiguous */
  unsigned free_dims; /* dims not tied to other arguments (only the huge mutation) */
  int checked;        /* the op validates this tensor */
  int mut_pct;
  const int *perm; /* an alternative physical order (outer to inner) */
  int optional;    /* NULL is a valid value */
} tspec;

#define MASK(d) (1u << (unsigned)(d))
#define ACT (MASK(M3S_BF16) | MASK(M3S_F16))

enum {
  M_NONE,
  M_NULL,
  M_NDIM,
  M_DTYPE,
  M_DEVICE,
  M_SHAPE,
  M_NEGSHAPE,
  M_NEGSTRIDE,
  M_INNER,
  M_OVERFLOW,
  M_DATANULL,
  M_ZSTRIDE,
  M_HUGE,
  M_BADVIEW,
  M_COUNT
};

#define I4(a, b, c, d) ((const int64_t[4]){(a), (b), (c), (d)})

#define OUTPUTS(...)                                                                               \
  do {                                                                                             \
    const targ *_l[] = {__VA_ARGS__};                                                              \
    outputs(_l, (int)(sizeof _l / sizeof _l[0]));                                                  \
  } while (0)

#define CALL(fnexpr, ex, expr) (pre_call(fnexpr), g_st = (expr), post_call(g_st, (ex)), g_st)

typedef struct {
  m3s_layer_config c;
  const m3s_layer_config *p;
  int nice; /* softmax scale in a range where fp32 and fp64 agree closely */
} cfg_t;

typedef struct {
  int num_reqs, uniform, q_len, T, max_q_len, qsl_base;
  int64_t max_seq_len;
  int n[MAX_REQS], s[MAX_REQS], row0[MAX_REQS];
  int32_t qsl[MAX_REQS + 1];
  int cols, icols, same_table;
  int32_t bt[MAX_REQS][MAX_COLS], ibt[MAX_REQS][MAX_COLS];
  int64_t P, Pi;
  targ tq, ts, tt, tit;
  m3s_batch b;
  const m3s_batch *p;
  int chaos; /* values changed so that validity is unknown */
  /* context parallel: the policy (CP_*, set before mk_batch), the cp passed,
   * whether it is valid with cp_size > 1 (then the tables passed are the
   * rank's: lbt / libt, lcols / licols columns; bt / ibt stay the whole
   * request's logical -> page maps the references use), and the status the
   * header prescribes for this cp when nothing else is wrong (0: none) */
  int cp_pol, cp_pct, cp_on;
  m3s_status cp_status;
  m3s_cp cp;
  int lcols, licols;
  int32_t lbt[MAX_REQS][MAX_COLS], libt[MAX_REQS][MAX_COLS];
} bat;

typedef struct {
  targ k, v;
  m3s_kv_scales s;
  const m3s_kv_scales *p;
  int mode[2]; /* per side: 0 = scale 1 (no data), 1 = scalar, 2 = per (head, slot) */
  int nice;
  int fp8; /* scales only apply to fp8 caches */
} scl_t;

typedef struct {
  const m3s_layer_config *c;
  const bat *B;
  const targ *q, *kv, *tk;
  const scl_t *sc;
  int64_t row_base;
  float *kvd;       /* decoded cache with scales applied, [P][Hkv][128][256] */
  const m3s_cp *cp; /* NULL or the batch's cp: only owned blocks are attended */
} attn_in;

static const int PERM_HM[4] = {1, 0, 2, 3}; /* top-k stored head-major [Hkv, T, K] */
static const int PERM_TM[4] = {0, 2, 1, 3}; /* K/V cache token-major [P, 128, Hkv, 256] */
static const m3s_dtype KV_DT[4] = {M3S_BF16, M3S_F16, M3S_E4M3, M3S_E5M2};
#define KV_MASK (ACT | MASK(M3S_E4M3) | MASK(M3S_E5M2))
#define IDX_MASK (MASK(M3S_BF16) | MASK(M3S_E4M3))

typedef struct {
  cfg_t C;
  int hq, hkv, K, nice;
  m3s_dtype adt, kdt;
  targ q, kv, tk, out, lse;
  scl_t sc;
} attn_fx;

typedef struct {
  int64_t R, cap;
  int32_t *rp;                /* [hkv][R+1] */
  int32_t *qi, *qs;           /* [hkv][cap] */
  int32_t *qc;                /* [T][hkv] */
  int64_t *row_req, *row_blk; /* owner of each row */
} csr_t;


/* ---- harness state ---- */
extern const char *g_op;
extern const char *g_fn;
extern int g_trace;
extern unsigned g_avoid;
extern m3s_status g_st;
extern const char *k_opname[NOPS];
extern fuzz_stats S;
extern const char *g_stats_path;
extern const uint8_t *g_in;
extern size_t g_in_n, g_in_i;
extern uint64_t g_rng;
extern buf_t g_b[MAX_BUFS];
extern int g_nb, g_skip;
extern size_t g_total;
extern unsigned char g_dummy[GUARD * 2 + 16];
extern int g_alias_in;
extern int g_opi;
extern clock_t g_t0;
extern m3s_context *g_ctx;
extern unsigned char g_ws[512];
extern m3s_exec g_exec;
extern int64_t g_budget;
extern int g_log_calls;

/* ---- functions ---- */
void at_exit(void);
void die(const char *fmt, ...);
void write_stats(void);
unsigned rb(void);
unsigned rb16(void);
uint32_t rb32(void);
uint64_t rb64(void);
int rpick(int n);
int rchance(int pct);
uint64_t rnd(void);
int rndn(int n);
double dec_bf16(uint16_t h);
double dec_f16(uint16_t h);
double dec_e4m3(uint8_t b);
double dec_e5m2(uint8_t b);
size_t esz(m3s_dtype dt);
double dec(const void *p, m3s_dtype dt);
void enc(void *p, m3s_dtype dt, double v);
void put_nan(void *p, m3s_dtype dt);
double grid(void);
unsigned char pat(size_t i);
buf_t *balloc(const char *name, size_t bytes);
void bfree_all(void);
void check_guards(void);
void strides_for(int nd, const int64_t *shape, const int *order, const int *pad,
                        int64_t *stride);
int64_t numel_of(const m3s_tensor *t, int nd);
int is_contig(const m3s_tensor *t, int nd);
int64_t extent_of(const m3s_tensor *t, int nd);
void mk(targ *a, const tspec *s, int *ex);
int64_t toff(const targ *a, const int64_t *idx);
void *tptr(const targ *a, const int64_t *idx);
void tsetf(const targ *a, const int64_t *idx, double v);
double tgetf(const targ *a, const int64_t *idx);
void tseti(const targ *a, const int64_t *idx, int64_t v);
int64_t tgeti(const targ *a, const int64_t *idx);
unsigned char *trow(const targ *a, const int64_t *idx, int64_t n);
void row_get(const targ *a, const int64_t *idx, int n, double *dst);
void row_set_grid(const targ *a, const int64_t *idx, int n);
void fill_nice(const targ *a);
void fill_nan(const targ *a);
void allow_elem(const targ *a, int64_t off);
void allow_idx(const targ *a, const int64_t *idx);
void allow_view(const targ *a);
void check_allowed(void);
void outputs(const targ *const *list, int n);
void pre_call(const char *fn);
void post_call(m3s_status st, int ex);
m3s_context *pick_ctx(int *ex);
const m3s_exec *pick_exec(void);
void gen_cfg(cfg_t *C, int *ex);
int64_t need_pages(int s);
void gen_batch_desc(bat *B, int kind, int hq, int hkv, int topk);
void assign_pages(bat **list, int n);
void mk_batch(bat *B, int uses_main, int uses_idx, int allow_null, int *ex);
int64_t bpos(const bat *B, int r, int64_t i);
void gen_scales(scl_t *S_, m3s_dtype cdt, int hkv, int64_t P, int nice, int *ex);
double scale_at(const scl_t *S_, int is_v, int64_t g, int64_t slot);
double *decode_ic(const targ *ic, int64_t P);
int ref_topk(const m3s_layer_config *c, const bat *B, const targ *iq, const double *ic,
                    int64_t row_base, int r, int64_t i, int g, int32_t *ids);
void check_topk_rows(const m3s_layer_config *c, const bat *B, const targ *iq, const targ *ic,
                            const targ *tk, int64_t row_base, int exact);
void attn_decode(attn_in *A);
int64_t ref_attend(const attn_in *A, int r, int64_t pos, int64_t t, int h0, int nh,
                   const int32_t *ids, int n, double *out, double *lse);
void check_attn_rows(attn_in *A, const targ *out, const targ *lse, int numeric);
void fill_topk_input(int hkv, int K, const bat *B, const targ *tk, int64_t row_base,
                            int *ex);
void fill_kv(const bat *B, const targ *kv, int hkv, int nice, int poison);
void fill_ic(const bat *B, const targ *ic, int nice, int inject, int poison);
void fill_act(const targ *a, int nice, int inject);
void safe_dims(const m3s_layer_config *c, int *hq, int *hkv, int *K);
m3s_tensor tnarrow(const targ *a, int64_t start, int64_t len);
void mk_out(targ *a, const char *name, m3s_dtype dt, int nd, int64_t s0, int64_t s1,
                   int64_t s2, int64_t s3);
void cmp_bits(const targ *a, int64_t ra, const targ *b, int64_t rb_, int64_t rows,
                     const char *what);
void narrow_or_keep(m3s_tensor *t, int64_t start, int64_t len);
m3s_batch sub_batch(const bat *B, int r);
int pick_req(const bat *B);
void op_index_topk(void);
void mk_q_kv(attn_fx *F, int64_t T, int64_t P, int *ex);
void mk_out_lse(attn_fx *F, int64_t T, int *ex);
void attn_one_batch(attn_fx *F, bat *B, int *ex, int cp_pol);
void op_attention(void);
void op_step(void);
void fill_slots(const targ *sl, int64_t T, int64_t P, int64_t *slots, int *ex);
int64_t agreed_token_count(const targ *const *a, int *const *ex, int n, int64_t T);
void op_cache_insert(void);
void op_index_insert(void);
void csr_free(csr_t *c);
void csr_build(csr_t *o, int hkv, int K, const bat *B, const targ *tk, const int32_t *sel);
void op_csr(void);
void op_k2q_attention(void);
void fill_lse_vals(const targ *a, int nice);
void ref_merge(int n, const double *const *o, const double *l, double *out, double *lse);
void check_state_row(const char *what, const targ *out, const targ *lse, int64_t t,
                            int64_t h, const double *ro, double rl, int numeric);
void op_combine(void);
void op_merge(void);
int64_t pick_i64(void);
void op_narrow(void);
void log_cb(int level, const char *msg, void *user);
void op_misc(void);
int ref_count_decodes(int n, const int32_t *ql, int spec);
void op_plan(void);
void op_chain(void);
/* context parallel (gen.c, ops_cp.c) */
int gen_cp(m3s_cp *cp, int pct);
int cp_owns(const m3s_cp *cp, int64_t b);
int64_t cp_owned_count(const m3s_cp *cp, int64_t nb);
int cp_ex(const bat *B);
void cp_check(const bat *B, int ex, m3s_status st);
void poison_unowned(const bat *B, const targ *cache, int hkv, int is_index);
m3s_tensor tslice(const m3s_tensor *t, int64_t i);
void op_cp_local(void);
void op_candidates(void);
void op_merge_candidates(void);
void op_merge_n(void);

#endif
