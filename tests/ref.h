/* Test fixtures and the independent fp64 reference of SPEC sections 3-4.
 *
 * A fixture owns random caches (every page filled, so stray reads of wrong
 * pages or future keys change results), shuffled block tables, a batch and
 * random activations. The reference functions re-derive everything from the
 * SPEC text with a different code path from the backend: the stored codes
 * decoded from the format definitions, then the fp64 mathematics of
 * ref_core.h (shared with the fuzzer): fp64 sums, every block scored, the
 * selection by rank over all of them. */
#ifndef M3S_TEST_REF_H
#define M3S_TEST_REF_H

#include "m3sparse.h"
#include "test_util.h"

#include <stdbool.h>
#include <stdint.h>

typedef struct {
  m3s_layer_config cfg;
  int num_reqs;
  const int32_t *qlens;   /* [num_reqs] */
  const int32_t *seqlens; /* [num_reqs]; 0 = padded */
  int uniform;            /* 1: uniform decode batch (all qlens equal) */
  m3s_dtype act_dtype;    /* q, iq */
  m3s_dtype kv_dtype;
  m3s_dtype idx_dtype;
  int token_major;     /* main cache physical order [P, 128, Hkv, 256] */
  int scale_mode;      /* 0 none, 1 scalar, 2 per (head, slot) */
  int grid;            /* index values on a k/4 grid: fp32 scores exact */
  int qsl_base;        /* query_start_loc[0] (vLLM slices) */
  int extra_pages;     /* unused random pages in the caches */
  int topk_head_major; /* top-k buffer stored [Hkv, T, K] */
  uint64_t seed;
} fx_spec;

typedef struct {
  fx_spec sp;
  m3s_layer_config cfg;
  int T, max_pages;
  int64_t num_pages;
  int32_t *qlens, *seqlens, *qsl, *bt, *ibt;
  void *kv_mem, *ic_mem, *q_mem, *iq_mem, *out_mem, *topk_mem;
  float *ks_mem, *vs_mem, *lse_mem;
  m3s_tensor kv, ic, q, iq, out, lse, topk;
  m3s_kv_scales scales;
  m3s_batch batch;
} fixture;

uint64_t rng_next(uint64_t *s);
double rng_uniform(uint64_t *s); /* [0, 1) */
float rng_normal(uint64_t *s);

/* A spec with bf16 activations and caches, head-major cache, no scales and
 * continuous values; tests override the fields they vary. */
/* The TP1 MiniMax-M3 config with the given heads, top-k and forced blocks. */
m3s_layer_config fx_cfg(int hq, int hkv, int k, int init, int local);
fx_spec fx_spec_default(m3s_layer_config cfg, int nreq, const int32_t *ql, const int32_t *sl,
                        uint64_t seed);
void fx_init(fixture *f, const fx_spec *sp);
void fx_free(fixture *f);
/* Fill out/lse/topk with poison (NaN / 0x7fffffff). */
void fx_poison(fixture *f);
/* 1 when rows [row0, row0 + n) of out, lse and topk hold no poison, i.e. a
 * call wrote every element of them (rows without blocks get 0, -inf, -1). */
int fx_rows_written(const fixture *f, int row0, int n);
/* Position of row t (request r and index i inside it); -1 when padded. */
int fx_request_of_row(const fixture *f, int t, int *i_out);
int64_t fx_pos(const fixture *f, int t);

/* Large and widely spread attention logits (|q.k * scale| in the hundreds
 * and beyond), written over a fixture's q and the K half of its main cache
 * after fx_init; V, the index data and the tables are left as they are.
 * Values are integers or fp8 extremes, so every fp32 dot product is exact:
 *   FX_LOGITS_SPREAD     q, K integers in [-32, 32]: logits spread +-1000
 *   FX_LOGITS_DOMINANT   q = 4u (u a fixed +-1 pattern); in each block one
 *                        key (3 + block) * u, the rest small integers: one
 *                        key per row dominates the next by ~45, the others
 *                        by hundreds
 *   FX_LOGITS_EQUAL_POS  every key 4u: every logit +181
 *   FX_LOGITS_EQUAL_NEG  every key -8u: every logit -362
 *   FX_LOGITS_FP8_MAX    fp8 caches only: K bytes at the dtype's largest
 *                        magnitude (448 e4m3, 57344 e5m2, times the scale),
 *                        every 5th its smallest subnormal; q on the k/4 grid
 * With the default scale 1/sqrt(128). A softmax without its max-subtraction
 * overflows (or underflows) on each of them. */
enum {
  FX_LOGITS_SPREAD = 1,
  FX_LOGITS_DOMINANT,
  FX_LOGITS_EQUAL_POS,
  FX_LOGITS_EQUAL_NEG,
  FX_LOGITS_FP8_MAX
};
void fx_large_logits(fixture *f, int mode);

/* Store a float into an activation/cache tensor element (bf16/f16/f32/fp8). */
void store_elem(void *base, m3s_dtype dt, int64_t off, float v);
double load_elem(const void *base, m3s_dtype dt, int64_t off);
/* ||got - want|| / ||want|| over n elements (||got - want|| when want is 0);
 * NaN when either holds a NaN, so a poisoned element fails any bound. */
double rel_l2(const void *got, m3s_dtype got_dt, const void *want, m3s_dtype want_dt, int64_t n);

/* Largest |a - b| over n lse values; infinite when at one index either side
 * is infinite or NaN and the two differ (padded rows hold -inf on both). */
double lse_max_diff(const float *a, const float *b, int64_t n);

/* fp64 reference selection for row t, head g: ids ascending, then -1.
 * Returns the number of selected ids. scores_out (may be NULL) gets S(b). */
int ref_select(const fixture *f, int t, int g, int32_t *ids, double *scores_out);
/* fp64 reference attention for row t, head h over the blocks listed in sel
 * (n entries, -1 skipped); masked = 0 ignores sel (plain dense causal). */
void ref_attention(const fixture *f, int t, int h, const int32_t *sel, int n, int masked,
                   double *out, double *lse);
/* Key/value element d of KV head g at position p of request r (dequantised). */
double ref_kv(const fixture *f, int r, int64_t p, int g, int d, int is_v);

/* Shapes of the k2q chain's buffers for fixture f (SPEC section 7):
 * row_ptr [Hkv, rows+1], q_indices and q_slots [Hkv, T*K], q_counts
 * [T, Hkv] (int32); partial out [T, Hq, K, 128] and partial lse [T, Hq, K]
 * (fp32). rows comes from m3s_k2q_csr_rows on ctx with the fixture's host
 * batch. Returns 0, with the library's error text printed, on failure. */
typedef struct {
  int64_t rows;
  int64_t row_ptr[2], q_idx[2], q_cnt[2], part_out[4], part_lse[3];
} k2q_shapes;
int fx_k2q_shapes(m3s_context *ctx, const fixture *f, k2q_shapes *s);
/* Buffer i (0..K2Q_NBUF-1: row_ptr, q_indices, q_slots, q_counts, partial
 * out, partial lse) of the k2q chain as a contiguous view of data (NULL to
 * size it first) on device (M3S_HOST or a CUDA ordinal). */
enum { K2Q_NBUF = 6 };
m3s_tensor fx_k2q_view(const k2q_shapes *s, int i, void *data, int device);
/* Product of shape[0..nd). */
int64_t shape_elems(int nd, const int64_t *shape);
/* Bytes of a contiguous view. */
size_t tensor_bytes(const m3s_tensor *t);

/* The layer on f's views (host or device), one call per step: 0 index
 * top-k, 1 sparse attention (into f's out and lse), 2 k2q CSR, 3 k2q
 * attention, 4 combine of the partials into (out, lse); k2q: the K2Q_NBUF
 * views of fx_k2q_view. The thread, fault and GPU tests run it whole
 * (fx_run_chain: 1 when every step returned M3S_OK) or step by step. */
enum { FX_CHAIN_STEPS = 5 };
m3s_status fx_chain_step(m3s_context *ctx, fixture *f, m3s_tensor *k2q, m3s_tensor *out,
                         m3s_tensor *lse, const m3s_exec *e, int step);
int fx_run_chain(m3s_context *ctx, fixture *f, m3s_tensor *k2q, m3s_tensor *out, m3s_tensor *lse,
                 const m3s_exec *e);

/* Top-k entry (t, g, k) of the fixture's buffer. */
int32_t *fx_topk_at(const fixture *f, int t, int g, int k);

/* Compare the fixture's out/lse (after m3s_sparse_attention) with the fp64
 * reference over the fixture's own top-k rows. Counts checks; returns the
 * global relative L2 error. masked = 0 compares with dense causal attention. */
double check_attention_vs_ref(const fixture *f, int masked, const char *name);
/* Compare the fixture's top-k with ref_select, exactly. Returns mismatches. */
int check_topk_vs_ref(const fixture *f, const char *name);

/* The fixture's top-k (any backend's, already computed) against the fp64
 * brute force (ref_select) on at most max_rows rows (all when T <= max_rows;
 * else an even sample with the first and last rows), for shapes where the
 * brute force over every row is too slow (1M-token contexts). Grid data
 * (sp.grid: every fp32 score exact) must match exactly; continuous data must
 * be a valid selection within rounding: the right count, every forced block,
 * ascending ids then -1, no NaN-scored block chosen over a real score, no
 * unselected block scoring above a selected one by more than 1e-3 (1 + |s|),
 * and among NaN-scored blocks the lowest ids. Counts one check. Returns the
 * number of bad rows. */
int check_topk_vs_fp64_rows(const fixture *f, const char *name, int max_rows);

/* Index-cache contents for the selection edge cases (shared by the CPU and
 * GPU top-k tests). fx_nan_index_keys: request 0's blocks 0..9 all NaN (odd
 * ones negative NaN), one all-NaN key in block 12, one NaN element in block
 * 14; every block of request 1 NaN (needs >= 2 requests, request 0 with >= 15
 * blocks). fx_signed_zero_index_keys: every key element +0 or -0 (every score
 * exactly 0). fx_equal_index_keys: every key identical (every score ties). */
void fx_nan_index_keys(fixture *f);
void fx_signed_zero_index_keys(fixture *f);
void fx_equal_index_keys(fixture *f);

#endif
