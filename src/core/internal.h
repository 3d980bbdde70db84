/* Internal declarations shared by the core (validation, planning, errors,
 * logging) and the backends. Nothing here is public API. */
#ifndef M3S_INTERNAL_H
#define M3S_INTERNAL_H

#include "m3sparse.h"

#include <stdarg.h>
#include <stdbool.h>

#ifdef __cplusplus
extern "C" {
#endif

struct m3s_context {
  int device;           /* < 0: CPU backend; >= 0: CUDA ordinal */
  const struct m3s_backend_ops *ops; /* chosen once by m3s_context_create */
  int log_level;
  m3s_log_fn log_fn;
  void *log_user;
  void *backend_state;  /* owned by the backend (CUDA: device properties) */
  int batch_invariant;  /* M3S_OPT_BATCH_INVARIANT */
};

/* ---- errors (error.c) ---- */
/* Records "fn: message" as the thread's last error and returns st. */
m3s_status m3s_fail(m3s_status st, const char *fn, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
void m3s_clear_error(void);
void m3s_log(const m3s_context *ctx, int level, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

/* ---- tensor rules (validate.c) ----
 * Each returns M3S_OK or records an error naming fn and the argument. */
typedef struct {
  const char *fn;   /* public function name, for messages */
  const char *part; /* m3s_step_forward: "decode" or "prefill" while a part's
                     * own arguments are checked; NULL otherwise */
  int device;       /* where every tensor must live */
  int host_values;  /* the backend reads host memory: check index values too */
} m3s_vctx;

/* m3s_fail for a validation context: "fn: [part part: ]message". */
m3s_status m3s_vfail(const m3s_vctx *v, m3s_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;

int64_t m3s_numel(const m3s_tensor *t);
/* Checks pointer, ndim, dtype (one of the mask bits 1u << dtype), device,
 * strides (>= 0, innermost 1, offsets fit in int64), data != NULL when numel>0. */
m3s_status m3s_check_tensor(const m3s_vctx *v, const char *name, const m3s_tensor *t, int ndim,
                            unsigned dtype_mask);
/* shape[dim] == want */
m3s_status m3s_check_dim(const m3s_vctx *v, const char *name, const m3s_tensor *t, int dim,
                         int64_t want, const char *what);
/* An output view must not map two indices to the same element. */
m3s_status m3s_check_no_self_overlap(const m3s_vctx *v, const char *name, const m3s_tensor *t);
/* Contiguous row-major. */
m3s_status m3s_check_contiguous(const m3s_vctx *v, const char *name, const m3s_tensor *t);
m3s_status m3s_check_config(const char *fn, const m3s_layer_config *cfg);
m3s_status m3s_check_ctx(const char *fn, const m3s_context *ctx);
/* Structural batch checks (both backends); value checks on host data when
 * the context is the CPU. num_pages_main/num_pages_index: the page count of
 * the cache that table addresses; -1 skips the page-id range check, -2 skips
 * the table altogether (the operation does not read it). */
m3s_status m3s_check_batch(const m3s_vctx *v, const char *name, const m3s_batch *b,
                           int64_t num_pages_main, int64_t num_pages_index);
/* The rules of m3s_cp; name is how messages call it ("batch.cp", "cp"). */
m3s_status m3s_check_cp(const m3s_vctx *v, const char *name, const m3s_cp *cp);
m3s_status m3s_check_scales(const m3s_vctx *v, const m3s_kv_scales *s, const m3s_tensor *cache,
                            int num_kv_heads);
m3s_status m3s_check_exec(const m3s_vctx *v, const m3s_exec *e, size_t need);

#define M3S_MASK(dt) (1u << (unsigned)(dt))
#define M3S_ACT_MASK (M3S_MASK(M3S_BF16) | M3S_MASK(M3S_F16))
#define M3S_KV_MASK (M3S_ACT_MASK | M3S_MASK(M3S_E4M3) | M3S_MASK(M3S_E5M2))
#define M3S_IDX_MASK (M3S_MASK(M3S_BF16) | M3S_MASK(M3S_E4M3))
#define M3S_SLOT_MASK (M3S_MASK(M3S_I32) | M3S_MASK(M3S_I64))

/* ---- batch helpers (batch.c) ---- */
/* Host-side per-request view of a batch, for backends that run on the host. */
int64_t m3s_batch_row0(const m3s_batch *b, int r);  /* first row of request r */
int64_t m3s_batch_qlen(const m3s_batch *b, int r);  /* n_r */
int64_t m3s_batch_seqlen(const m3s_batch *b, int r);
int32_t m3s_batch_page(const m3s_tensor *table, int r, int64_t logical_page);

static inline int64_t m3s_ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

/* ---- context parallel (SPEC section 10; formulas of m3s_cp) ----
 * For a validated m3s_cp. cp_size 0 and 1 both mean one rank owning every
 * block at its own column. The CUDA kernels use the same functions (M3S_HD). */
#ifdef __CUDACC__
#define M3S_HD __host__ __device__
#else
#define M3S_HD
#endif
static inline bool m3s_cp_active(const m3s_cp *cp) { return cp->cp_size > 1; }
static inline M3S_HD int m3s_cp_owner(const m3s_cp *cp, int64_t b) {
  return cp->cp_size > 1 ? (int)((b / cp->blocks_per_interleave) % cp->cp_size) : 0;
}
static inline M3S_HD int64_t m3s_cp_column(const m3s_cp *cp, int64_t b) {
  if (cp->cp_size <= 1)
    return b;
  int64_t i = cp->blocks_per_interleave;
  return b / (i * cp->cp_size) * i + b % i;
}
/* Blocks among [0, nblocks) that rank cp->cp_rank owns: the block-table
 * columns a request of nblocks blocks uses on that rank. */
static inline int64_t m3s_cp_columns(const m3s_cp *cp, int64_t nblocks) {
  if (cp->cp_size <= 1)
    return nblocks;
  int64_t i = cp->blocks_per_interleave, span = i * cp->cp_size;
  int64_t rest = nblocks % span - (int64_t)cp->cp_rank * i;
  return nblocks / span * i + (rest < 0 ? 0 : rest > i ? i : rest);
}

/* ---- backends ---- */
#include "backend.h"

#ifdef __cplusplus
}
#endif
#endif
