/* Bad input for every public function of include/m3sparse.h.
 *
 * For every rejected call three things are checked:
 *   1. the exact status code;
 *   2. m3s_last_error() is non-empty and names the offending argument (the
 *      names as the files of src/core spell them: "'q'", "cfg.topk", "batch.seq_lens",
 *      "slot_mapping[" ...);
 *   3. nothing was written: every output buffer (and every input buffer the
 *      call can see) is poisoned / snapshotted before the call and compared
 *      byte for byte afterwards.
 * Each group ends with a valid call right after an error: it must succeed
 * and leave m3s_last_error() == "".
 *
 * Most cases are generated from one valid call ("base") by changing one thing:
 *   tensor_cases()  per tensor argument: NULL, ndim -1/+1, an invalid view
 *                   from m3s_tensor_narrow, wrong and non-enum dtype, device 0
 *                   on the CPU context, innermost stride 2 (skipped where the
 *                   innermost size is 1: that stride addresses nothing and the
 *                   library ignores it), negative stride, a stride whose
 *                   offsets overflow int64, data NULL, negative size, each
 *                   constrained dimension - 1 (smaller, so a missed check
 *                   cannot read out of bounds), and for outputs
 *                   stride[0] = 0 / stride[1] = 1 (self overlap);
 *   config_cases()  every config rule (head/index dim, block size, Hq, Hkv,
 *                   Hq % Hkv, topk 0 / > M3S_MAX_TOPK, init/local, scale 0,
 *                   -0, negative, NaN, +-inf);
 *   batch_cases()   negative counts, query_start_loc decreasing / negative /
 *                   total != num_tokens, max_q_len too small, uniform
 *                   inconsistencies, seq_len < query length / > max_seq_len /
 *                   negative, block-table entries >= P or < 0, too few columns;
 *   topk_value_cases() out-of-range (>= nb, < -1) and duplicate entries.
 * Workspace: the CPU backend reports 0 bytes (m3s_workspace_size), so a short
 * workspace cannot be provoked there; exec_cases() then checks that NULL exec,
 * {NULL, 0} and {buf, 0} are accepted (and would check M3S_ERR_WORKSPACE for
 * a missing / one-byte-short workspace if the reported size were > 0).
 * CUDA: m3s_context_create(0) must fail cleanly without CUDA or without a
 * device; where a device exists, test_gpu_context() checks M3S_ERR_DEVICE for
 * host tensors and for tensors of another ordinal.
 * Scales passed with a bf16 cache must be ignored; the cases that pass the
 * scales of a smaller cache only show a violation (an out-of-bounds read) in
 * a sanitizer build (-DM3S_SANITIZE=ON).
 *
 * Fixtures (ref.h): F = 2 ragged requests (query lengths 2 and 41, sequence
 * lengths 300 and 600), Hq 4, Hkv 2, K 4, bf16 everywhere; F8 = 1 uniform
 * decode request over an e4m3 cache with per-(head, slot) scales. */
#include "core/internal.h" /* struct m3s_context: set_logging must not write on error */
#include "gpu_probe.h"
#include "m3sparse.h"
#include "ref.h"
#include "test_util.h"

#include <limits.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------
 * Globals
 * ---------------------------------------------------------------------- */
static m3s_context *g_ctx;     /* CPU context */
static m3s_context *g_gpu_ctx; /* only when a CUDA device exists */
static fixture F, F8;
static int32_t *g_tk, *g_tk8; /* valid top-k of F / F8 ([T, Hkv, K], contiguous) */
enum { NT = 5 };              /* tokens of the insert tests */
static const char *g_group = "";
static long g_pass0, g_fail0;

/* ------------------------------------------------------------------------
 * Watched buffers: outputs are poisoned, everything is snapshotted; after a
 * rejected call all of them must be byte-identical.
 * ---------------------------------------------------------------------- */
#define MAX_WATCH 32
typedef struct {
  void *p;
  size_t n;
  int poison;
  unsigned char *copy;
  const char *name;
} watch_t;
static watch_t g_w[MAX_WATCH];
static int g_nw;

static void watch(const char *name, void *p, size_t n, int poison) {
  if (!p || !n || g_nw == MAX_WATCH)
    return;
  g_w[g_nw].name = name;
  g_w[g_nw].p = p;
  g_w[g_nw].n = n;
  g_w[g_nw].poison = poison;
  g_w[g_nw].copy = malloc(n);
  g_nw++;
}

static void watch_clear(void) {
  for (int i = 0; i < g_nw; i++)
    free(g_w[i].copy);
  g_nw = 0;
}

static void arm(void) {
  for (int i = 0; i < g_nw; i++) {
    unsigned char *b = g_w[i].p;
    if (g_w[i].poison)
      for (size_t j = 0; j < g_w[i].n; j++)
        b[j] = (unsigned char)(0xA5u ^ (unsigned)(j * 29u));
    memcpy(g_w[i].copy, b, g_w[i].n);
  }
}

static const char *first_changed(void) {
  for (int i = 0; i < g_nw; i++)
    if (memcmp(g_w[i].copy, g_w[i].p, g_w[i].n) != 0)
      return g_w[i].name;
  return NULL;
}

enum { W_KV = 1, W_IC = 2, W_TOPK = 4, W_OUT = 8, W_LSE = 16 };

static void watch_fixture(fixture *f, unsigned poison) {
  int64_t P = f->num_pages, T = f->T, Hq = f->cfg.num_q_heads, Hkv = f->cfg.num_kv_heads;
  int64_t K = f->cfg.topk, R = f->sp.num_reqs;
  watch("fixture kv_cache", f->kv_mem,
        (size_t)(P * Hkv * 128 * 256) * m3s_dtype_size(f->sp.kv_dtype), !!(poison & W_KV));
  watch("fixture index_cache", f->ic_mem, (size_t)(P * 128 * 128) * m3s_dtype_size(f->sp.idx_dtype),
        !!(poison & W_IC));
  watch("fixture topk", f->topk_mem, (size_t)(T * Hkv * K) * 4, !!(poison & W_TOPK));
  watch("fixture out", f->out_mem, (size_t)(T * Hq * 128) * 2, !!(poison & W_OUT));
  watch("fixture lse", f->lse_mem, (size_t)(T * Hq) * 4, !!(poison & W_LSE));
  watch("fixture q", f->q_mem, (size_t)(T * Hq * 128) * 2, 0);
  watch("fixture iq", f->iq_mem, (size_t)(T * Hkv * 128) * 2, 0);
  watch("fixture block_table", f->bt, (size_t)(R * (f->max_pages + 3)) * 4, 0);
  watch("fixture index_block_table", f->ibt, (size_t)(R * (f->max_pages + 3)) * 4, 0);
  watch("fixture seq_lens", f->seqlens, (size_t)R * 4, 0);
  watch("fixture query_start_loc", f->qsl, (size_t)(R + 1) * 4, 0);
  if (f->sp.scale_mode == 2) {
    watch("fixture k_scale", f->ks_mem, (size_t)(Hkv * P * 128) * 4, 0);
    watch("fixture v_scale", f->vs_mem, (size_t)(Hkv * P * 128) * 4, 0);
  }
}

/* ------------------------------------------------------------------------
 * Checks
 * ---------------------------------------------------------------------- */
static const char *st_name(m3s_status s) {
  static const char *n[] = {"M3S_OK",        "M3S_ERR_NULL",        "M3S_ERR_INVALID",
                            "M3S_ERR_SHAPE", "M3S_ERR_DTYPE",       "M3S_ERR_LAYOUT",
                            "M3S_ERR_RANGE", "M3S_ERR_DEVICE",      "M3S_ERR_WORKSPACE",
                            "M3S_ERR_BATCH", "M3S_ERR_UNSUPPORTED", "M3S_ERR_NO_MEMORY",
                            "M3S_ERR_CUDA",  "M3S_ERR_INTERNAL"};
  return (unsigned)s < sizeof n / sizeof n[0] ? n[s] : "(not a status)";
}

/* names: substrings separated by '&'; all must occur in msg */
static int has_names(const char *msg, const char *names) {
  char buf[256];
  snprintf(buf, sizeof buf, "%s", names);
  for (char *tok = strtok(buf, "&"); tok; tok = strtok(NULL, "&"))
    if (!strstr(msg, tok))
      return 0;
  return 1;
}

static void expect_err(m3s_status got, m3s_status want, const char *names, const char *what) {
  const char *e = m3s_last_error();
  const char *changed = first_changed();
  char ctx[1024];
  snprintf(ctx, sizeof ctx, "[%s] %s: got %s, want %s; last_error=\"%s\"", g_group, what,
           st_name(got), st_name(want), e ? e : "(NULL)");
  CHECK(got == want, ctx);
  CHECK(e != NULL && e[0] != '\0', ctx);
  if (!CHECK(e != NULL && has_names(e, names), ctx))
    fprintf(stderr, "     (the message should name: %s)\n", names);
  if (!CHECK(changed == NULL, ctx))
    fprintf(stderr, "     (written although the call failed: %s)\n", changed);
}

static void expect_ok(m3s_status got, const char *what) {
  const char *e = m3s_last_error();
  char ctx[1024];
  snprintf(ctx, sizeof ctx, "[%s] %s: got %s, want M3S_OK; last_error=\"%s\"", g_group, what,
           st_name(got), e ? e : "(NULL)");
  CHECK(got == M3S_OK, ctx);
  CHECK(e != NULL && e[0] == '\0', ctx);
}

static void group_begin(const char *name) {
  g_group = name;
  g_pass0 = g_tc.passed;
  g_fail0 = g_tc.failed;
}

static void group_end(void) {
  printf("%-26s %5ld checks, %ld failed\n", g_group,
         (g_tc.passed - g_pass0) + (g_tc.failed - g_fail0), g_tc.failed - g_fail0);
  fflush(stdout);
  watch_clear();
}

/* ------------------------------------------------------------------------
 * Generic case machinery. Every argument struct starts with `unsigned null`:
 * bit set = pass NULL for that pointer argument.
 * ---------------------------------------------------------------------- */
#define A_CTX (1u << 0)
#define A_CFG (1u << 1)
#define A_BATCH (1u << 2)
#define A_EXEC (1u << 3)
#define A_SCALES (1u << 4)
#define A_T(i) (1u << (8 + (i)))
#define NUL(a, bit, x) (((a)->null & (bit)) ? NULL : (x))

typedef m3s_status (*call_fn)(void *args);
typedef struct {
  const void *base;
  size_t size;
  call_fn call;
} op_t;

static void op_run(const op_t *op, void *a, m3s_status want, const char *names, const char *what) {
  arm();
  m3s_status st = op->call(a);
  expect_err(st, want, names, what);
}

static void op_ok(const op_t *op, void *a, const char *what) {
  m3s_status st = op->call(a);
  expect_ok(st, what);
}

/* A valid call must pass; after a failing call (NULL ctx), a valid call must
 * succeed and clear m3s_last_error(). */
static void base_ok(const op_t *op) {
  unsigned char *a = malloc(op->size);
  memcpy(a, op->base, op->size);
  op_ok(op, a, "the unmodified (base) call");
  free(a);
}

static void recover(const op_t *op) {
  unsigned char *a = malloc(op->size);
  memcpy(a, op->base, op->size);
  *(unsigned *)a |= A_CTX;
  arm();
  m3s_status st = op->call(a);
  CHECK(st == M3S_ERR_NULL && m3s_last_error()[0] != '\0', "setup of the recovery check");
  memcpy(a, op->base, op->size);
  op_ok(op, a, "a valid call right after an error (must succeed and clear the error text)");
  free(a);
}

static int is_contiguous(const m3s_tensor *t) {
  int64_t want = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    if (t->shape[i] > 1 && t->stride[i] != want)
      return 0;
    want *= t->shape[i];
  }
  return 1;
}

static void make_contiguous(m3s_tensor *t) {
  int64_t s = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    t->stride[i] = s;
    s *= t->shape[i];
  }
}

typedef struct {
  const char *name;    /* the argument as quoted in messages, e.g. "'q'" */
  size_t off;          /* offset of the m3s_tensor in the argument struct */
  unsigned nullbit;    /* 0: passed by value (inside a batch) or optional */
  m3s_dtype bad_dtype; /* a dtype this operand does not accept */
  unsigned dims;       /* dimensions whose size is fixed by other arguments */
  int output;          /* must not overlap itself */
} tspec;

/* Elements of a view, for case labels (the library's m3s_numel is internal). */
static long long elem_count(const m3s_tensor *t) {
  long long n = 1;
  for (int i = 0; i < t->ndim; i++)
    n *= t->shape[i];
  return n;
}

static void tensor_cases(const op_t *op, const tspec *s) {
  unsigned char *a = malloc(op->size);
  m3s_tensor *t = (m3s_tensor *)(a + s->off);
  char what[256];
#define TC_RESET() memcpy(a, op->base, op->size)
#define TC_RUN(want, ...)                                                                          \
  do {                                                                                             \
    int n_ = snprintf(what, sizeof what, "%s: ", s->name);                                         \
    snprintf(what + n_, sizeof what - (size_t)n_, __VA_ARGS__);                                    \
    op_run(op, a, want, s->name, what);                                                            \
  } while (0)
  if (s->nullbit) {
    TC_RESET();
    *(unsigned *)a |= s->nullbit;
    TC_RUN(M3S_ERR_NULL, "NULL pointer");
  }
  TC_RESET();
  int nd = t->ndim;
  t->ndim = nd - 1;
  TC_RUN(M3S_ERR_SHAPE, "ndim %d instead of %d", nd - 1, nd);
  if (nd < M3S_MAX_DIMS) {
    TC_RESET();
    t->shape[nd] = 1;
    t->stride[nd] = 1;
    t->ndim = nd + 1;
    TC_RUN(M3S_ERR_SHAPE, "ndim %d instead of %d", nd + 1, nd);
  }
  TC_RESET();
  *t = m3s_tensor_narrow(t, 0, t->shape[0] + 1);
  TC_RUN(M3S_ERR_SHAPE, "the invalid view of an out-of-range m3s_tensor_narrow");
  TC_RESET();
  t->dtype = s->bad_dtype;
  TC_RUN(M3S_ERR_DTYPE, "dtype %s", m3s_dtype_name(s->bad_dtype));
  TC_RESET();
  t->dtype = (m3s_dtype)77;
  TC_RUN(M3S_ERR_DTYPE, "dtype 77 (not an enum value)");
  TC_RESET();
  t->device = 0;
  TC_RUN(M3S_ERR_DEVICE, "device 0 (CUDA) given to the CPU context");
  TC_RESET();
  if (t->shape[nd - 1] > 1) { /* the stride of a 1-element dimension addresses nothing */
    t->stride[nd - 1] = 2;
    TC_RUN(M3S_ERR_LAYOUT, "innermost stride 2");
  }
  TC_RESET();
  t->stride[0] = -t->stride[0];
  TC_RUN(M3S_ERR_LAYOUT, "negative stride[0]");
  if (nd >= 2) {
    TC_RESET();
    t->stride[nd - 2] = -t->stride[nd - 2];
    TC_RUN(M3S_ERR_LAYOUT, "negative stride[%d]", nd - 2);
  }
  if (t->shape[0] > 1) {
    TC_RESET();
    t->stride[0] = INT64_MAX / 4;
    TC_RUN(M3S_ERR_LAYOUT, "stride[0] = INT64_MAX/4 (offsets beyond the 64-bit range)");
  }
  TC_RESET();
  t->data = NULL;
  TC_RUN(M3S_ERR_NULL, "data NULL with %lld elements", elem_count(t));
  TC_RESET();
  t->shape[0] = -1;
  TC_RUN(M3S_ERR_SHAPE, "shape[0] = -1");
  for (int d = 0; d < nd; d++) {
    if (!(s->dims & (1u << d)))
      continue;
    TC_RESET();
    int contiguous = is_contiguous(t);
    int64_t was = t->shape[d];
    t->shape[d] = was - 1; /* smaller: stays inside the allocation */
    if (contiguous)
      make_contiguous(t);
    TC_RUN(M3S_ERR_SHAPE, "shape[%d] = %lld instead of %lld", d, (long long)(was - 1),
           (long long)was);
  }
  if (s->output) {
    TC_RESET();
    t->stride[0] = 0;
    TC_RUN(M3S_ERR_LAYOUT, "output with stride[0] = 0 (overlaps itself)");
    if (nd >= 3) {
      TC_RESET();
      t->stride[1] = 1;
      TC_RUN(M3S_ERR_LAYOUT, "output with stride[1] = 1 (overlaps itself)");
    }
  }
#undef TC_RESET
#undef TC_RUN
  free(a);
}

static void null_case(const op_t *op, unsigned bit, const char *names, const char *what) {
  unsigned char *a = malloc(op->size);
  memcpy(a, op->base, op->size);
  *(unsigned *)a |= bit;
  op_run(op, a, M3S_ERR_NULL, names, what);
  free(a);
}

/* Every rule of m3s_layer_config, from a valid config. */
#define MAX_BADCFG 40
static int make_bad_configs(const m3s_layer_config *g, m3s_layer_config *out, const char **names,
                            const char **whats) {
  int n = 0;
#define BADCFG(stmt, nm)                                                                           \
  do {                                                                                             \
    m3s_layer_config c_ = *g;                                                                      \
    stmt;                                                                                          \
    out[n] = c_;                                                                                   \
    names[n] = nm;                                                                                 \
    whats[n] = #stmt;                                                                              \
    n++;                                                                                           \
  } while (0)
  BADCFG(c_.head_dim = 64, "cfg.head_dim");
  BADCFG(c_.head_dim = 0, "cfg.head_dim");
  BADCFG(c_.index_dim = 256, "cfg.index_dim");
  BADCFG(c_.index_dim = 64, "cfg.index_dim");
  BADCFG(c_.block_size = 64, "cfg.block_size");
  BADCFG(c_.block_size = 256, "cfg.block_size");
  BADCFG(c_.num_kv_heads = 0, "cfg.num_kv_heads");
  BADCFG(c_.num_kv_heads = -2, "cfg.num_kv_heads");
  BADCFG(c_.num_q_heads = 0, "cfg.num_q_heads");
  BADCFG(c_.num_q_heads = -4, "cfg.num_q_heads");
  BADCFG(c_.num_q_heads = M3S_MAX_HEADS + 2, "cfg.num_q_heads");
  BADCFG(c_.num_q_heads = 3 /* Hq % Hkv != 0 */, "cfg.num_q_heads&cfg.num_kv_heads");
  BADCFG(c_.num_q_heads = 4; c_.num_kv_heads = 3 /* Hq % Hkv != 0 */, "cfg.num_q_heads");
  BADCFG(c_.num_kv_heads = 8 /* > Hq */, "cfg.num_q_heads");
  BADCFG(c_.topk = 0, "cfg.topk");
  BADCFG(c_.topk = -1, "cfg.topk");
  BADCFG(c_.topk = M3S_MAX_TOPK + 1, "cfg.topk");
  BADCFG(c_.topk = INT_MAX, "cfg.topk");
  BADCFG(c_.init_blocks = -1, "cfg.init_blocks");
  BADCFG(c_.local_blocks = -1, "cfg.local_blocks");
  BADCFG(c_.init_blocks = 2; c_.local_blocks = 3 /* init+local > topk 4 */,
                             "cfg.init_blocks&cfg.local_blocks&cfg.topk");
  BADCFG(c_.init_blocks = 0; c_.local_blocks = 5 /* local > topk */, "cfg.local_blocks");
  BADCFG(c_.init_blocks = INT_MAX; c_.local_blocks = 1, "cfg.init_blocks");
  BADCFG(c_.softmax_scale = 0.0f, "cfg.softmax_scale");
  BADCFG(c_.softmax_scale = -0.0f, "cfg.softmax_scale");
  BADCFG(c_.softmax_scale = -0.088f, "cfg.softmax_scale");
  BADCFG(c_.softmax_scale = NAN, "cfg.softmax_scale");
  BADCFG(c_.softmax_scale = INFINITY, "cfg.softmax_scale");
  BADCFG(c_.softmax_scale = -INFINITY, "cfg.softmax_scale");
  BADCFG(c_ = m3s_config_minimax_m3(3) /* documented: num_q_heads 0 */, "cfg.");
#undef BADCFG
  return n;
}

static void config_cases(const op_t *op, size_t cfg_off) {
  m3s_layer_config bad[MAX_BADCFG];
  const char *names[MAX_BADCFG], *whats[MAX_BADCFG];
  int n = make_bad_configs((const m3s_layer_config *)((const unsigned char *)op->base + cfg_off),
                           bad, names, whats);
  unsigned char *a = malloc(op->size);
  for (int i = 0; i < n; i++) {
    memcpy(a, op->base, op->size);
    memcpy(a + cfg_off, &bad[i], sizeof bad[i]);
    op_run(op, a, M3S_ERR_INVALID, names[i], whats[i]);
  }
  free(a);
}

/* NULL ctx, NULL cfg + every config rule, NULL batch. */
static void common_cases(const op_t *op, size_t cfg_off, int has_batch) {
  null_case(op, A_CTX, "'ctx'", "ctx NULL");
  if (cfg_off != (size_t)-1) {
    null_case(op, A_CFG, "'cfg'", "cfg NULL");
    config_cases(op, cfg_off);
  }
  if (has_batch)
    null_case(op, A_BATCH, "'batch'", "batch NULL");
}

/* Workspace: where m3s_workspace_size reports 0 (the CPU backend), check that
 * NULL exec, {NULL, 0} and {buf, 0} are accepted; otherwise that a missing or
 * one-byte-short workspace is M3S_ERR_WORKSPACE. tokens < 0: the operation
 * takes no workspace. */
static void exec_cases(const op_t *op, size_t exec_off, const m3s_layer_config *cfg, int64_t tokens,
                       int64_t max_seq) {
  size_t need = 0;
  if (tokens >= 0) {
    need = 12345;
    CHECK(m3s_workspace_size(g_ctx, cfg, tokens, max_seq, &need) == M3S_OK, "workspace size");
  }
  unsigned char *a = malloc(op->size);
  m3s_exec *e = (m3s_exec *)(a + exec_off);
  static unsigned char wbuf[64];
  if (need == 0) {
    memcpy(a, op->base, op->size);
    *(unsigned *)a |= A_EXEC;
    op_ok(op, a, "exec NULL (no workspace needed)");
    memcpy(a, op->base, op->size);
    e->workspace = NULL, e->workspace_bytes = 0, e->stream = NULL;
    op_ok(op, a, "exec {NULL, 0 bytes} (m3s_workspace_size == 0)");
    memcpy(a, op->base, op->size);
    e->workspace = wbuf, e->workspace_bytes = 0, e->stream = (void *)wbuf;
    op_ok(op, a, "exec {buf, 0 bytes, stream ignored on the CPU} (m3s_workspace_size == 0)");
  } else {
    unsigned char *buf = malloc(need);
    memcpy(a, op->base, op->size);
    *(unsigned *)a |= A_EXEC;
    op_run(op, a, M3S_ERR_WORKSPACE, "workspace", "exec NULL but a workspace is needed");
    memcpy(a, op->base, op->size);
    e->workspace = NULL, e->workspace_bytes = need;
    op_run(op, a, M3S_ERR_WORKSPACE, "workspace", "workspace NULL with its size given");
    memcpy(a, op->base, op->size);
    e->workspace = buf, e->workspace_bytes = need - 1;
    op_run(op, a, M3S_ERR_WORKSPACE, "workspace", "workspace one byte short");
    memcpy(a, op->base, op->size);
    e->workspace = buf, e->workspace_bytes = need;
    op_ok(op, a, "workspace of exactly the reported size");
    free(buf);
  }
  free(a);
}

/* ---- batch values ---- */
#define AT1(t, i) (((int32_t *)(t)->data)[(i) * (t)->stride[0]])
#define AT2(t, r, c) (((int32_t *)(t)->data)[(r) * (t)->stride[0] + (c) * (t)->stride[1]])

/* Points t at a private copy of its elements (same strides); returns it. */
static int32_t *dup_i32(m3s_tensor *t) {
  int64_t ext = 1;
  for (int i = 0; i < t->ndim; i++)
    ext += (t->shape[i] - 1) * t->stride[i];
  int32_t *c = malloc(sizeof(int32_t) * (size_t)ext);
  memcpy(c, t->data, sizeof(int32_t) * (size_t)ext);
  t->data = c;
  return c;
}

static int64_t qlen_of(const m3s_batch *b, int r) {
  return b->uniform_q_len > 0
             ? b->uniform_q_len
             : (int64_t)AT1(&b->query_start_loc, r + 1) - AT1(&b->query_start_loc, r);
}

/* pfx: "" or "decode" / "prefill" (step_forward: the message must also name
 * the part). tables: bit 0 main block table read, bit 1 index block table. */
static void batch_cases(const op_t *op, size_t boff, const char *pfx, int64_t num_pages,
                        unsigned tables) {
  unsigned char *a = malloc(op->size);
  const m3s_batch *b0 = (const m3s_batch *)((const unsigned char *)op->base + boff);
  m3s_batch *b = (m3s_batch *)(a + boff);
  int R = b0->num_reqs, rmax = 0, rpages = 0;
  int64_t maxpages = 0;
  for (int r = 0; r < R; r++) {
    if (qlen_of(b0, r) > qlen_of(b0, rmax))
      rmax = r;
    int64_t pg = (AT1(&b0->seq_lens, r) + 127) / 128;
    if (pg > maxpages)
      maxpages = pg, rpages = r;
  }
  void *tmp = NULL;
  char nm[256], what[256];
#define BC_RESET() (free(tmp), tmp = NULL, memcpy(a, op->base, op->size))
#define BC_RUN(want, names, desc)                                                                  \
  do {                                                                                             \
    snprintf(nm, sizeof nm, "%s%s%s", pfx, *pfx ? "&" : "", names);                                \
    snprintf(what, sizeof what, "%s%s%s", pfx, *pfx ? " part: " : "", desc);                       \
    op_run(op, a, want, nm, what);                                                                 \
  } while (0)
  BC_RESET();
  b->num_reqs = -1;
  BC_RUN(M3S_ERR_BATCH, "num_reqs", "num_reqs = -1");
  BC_RESET();
  b->num_tokens = -1;
  BC_RUN(M3S_ERR_BATCH, "num_tokens", "num_tokens = -1");
  BC_RESET();
  b->uniform_q_len = -1;
  BC_RUN(M3S_ERR_BATCH, "uniform_q_len", "uniform_q_len = -1");
  BC_RESET();
  b->max_q_len = -1;
  BC_RUN(M3S_ERR_BATCH, "max_q_len", "max_q_len = -1");
  BC_RESET();
  b->max_seq_len = -1;
  BC_RUN(M3S_ERR_BATCH, "max_seq_len", "max_seq_len = -1");
  BC_RESET();
  b->max_seq_len = ((int64_t)1 << 30) + 1;
  BC_RUN(M3S_ERR_BATCH, "max_seq_len", "max_seq_len = 2^30 + 1");
  BC_RESET();
  b->cp.cp_size = -1;
  BC_RUN(M3S_ERR_INVALID, "cp.cp_size", "cp.cp_size = -1");
  BC_RESET();
  b->cp = (m3s_cp){2, 2, 1};
  BC_RUN(M3S_ERR_INVALID, "cp.cp_rank", "cp.cp_rank == cp.cp_size");
  BC_RESET();
  b->cp = (m3s_cp){2, 0, 0};
  BC_RUN(M3S_ERR_INVALID, "cp.blocks_per_interleave", "cp.blocks_per_interleave = 0");
  if (b0->uniform_q_len > 0) {
    BC_RESET();
    b->uniform_q_len += 1;
    b->max_q_len += 1;
    BC_RUN(M3S_ERR_BATCH, "num_tokens",
           "uniform batch with num_tokens != num_reqs * uniform_q_len");
    BC_RESET();
    b->max_q_len -= 1;
    BC_RUN(M3S_ERR_BATCH, "max_q_len", "uniform batch with max_q_len < uniform_q_len");
  } else {
    m3s_tensor *q = &b->query_start_loc;
    BC_RESET();
    tmp = dup_i32(q);
    AT1(q, 1) = AT1(q, 0) - 1;
    BC_RUN(M3S_ERR_BATCH, "query_start_loc", "query_start_loc decreasing");
    BC_RESET();
    tmp = dup_i32(q);
    AT1(q, R) -= 1;
    BC_RUN(M3S_ERR_BATCH, "query_start_loc&num_tokens", "query_start_loc total != num_tokens");
    BC_RESET();
    tmp = dup_i32(q);
    AT1(q, R) += 1;
    b->max_q_len += 1;
    BC_RUN(M3S_ERR_BATCH, "query_start_loc&num_tokens", "query_start_loc total = num_tokens + 1");
    BC_RESET();
    tmp = dup_i32(q);
    {
      int32_t shift = AT1(q, 0) + 1;
      for (int r = 0; r <= R; r++)
        AT1(q, r) -= shift;
    }
    BC_RUN(M3S_ERR_BATCH, "query_start_loc", "query_start_loc[0] = -1");
    BC_RESET();
    b->max_q_len = (int)qlen_of(b0, rmax) - 1;
    BC_RUN(M3S_ERR_BATCH, "max_q_len", "max_q_len smaller than the longest request");
  }
  m3s_tensor *sl = &b->seq_lens;
  if (qlen_of(b0, rmax) >= 2) {
    BC_RESET();
    tmp = dup_i32(sl);
    AT1(sl, rmax) = (int32_t)qlen_of(b0, rmax) - 1;
    BC_RUN(M3S_ERR_BATCH, "seq_lens", "seq_len < query length");
  }
  BC_RESET();
  tmp = dup_i32(sl);
  AT1(sl, 0) = (int32_t)b0->max_seq_len + 1;
  BC_RUN(M3S_ERR_BATCH, "seq_lens&max_seq_len", "seq_len > max_seq_len");
  BC_RESET();
  tmp = dup_i32(sl);
  AT1(sl, 0) = -1;
  BC_RUN(M3S_ERR_BATCH, "seq_lens", "seq_len = -1");
  for (int ti = 0; ti < 2; ti++) {
    if (!(tables & (1u << ti)))
      continue;
    const char *tn = ti == 0 ? "batch.block_table" : "batch.index_block_table";
    size_t toff =
        ti == 0 ? offsetof(m3s_batch, block_table) : offsetof(m3s_batch, index_block_table);
    m3s_tensor *t = (m3s_tensor *)((unsigned char *)b + toff);
    char d[128];
    BC_RESET();
    tmp = dup_i32(t);
    AT2(t, rpages, maxpages - 1) = (int32_t)num_pages;
    snprintf(d, sizeof d, "%s entry == num_pages (%lld)", tn, (long long)num_pages);
    BC_RUN(M3S_ERR_RANGE, tn, d);
    BC_RESET();
    tmp = dup_i32(t);
    AT2(t, rpages, 0) = -1;
    snprintf(d, sizeof d, "%s entry -1", tn);
    BC_RUN(M3S_ERR_RANGE, tn, d);
    BC_RESET();
    tmp = dup_i32(t);
    AT2(t, rpages, maxpages - 1) = INT32_MIN;
    snprintf(d, sizeof d, "%s entry INT32_MIN", tn);
    BC_RUN(M3S_ERR_RANGE, tn, d);
    BC_RESET();
    t->shape[1] = maxpages - 1;
    snprintf(d, sizeof d, "%s with %lld columns, %lld pages needed", tn, (long long)(maxpages - 1),
             (long long)maxpages);
    BC_RUN(M3S_ERR_RANGE, tn, d);
  }
  BC_RESET();
#undef BC_RESET
#undef BC_RUN
  free(a);
}

/* Top-k entries as attention / the CSR builder read them. Rows of F: row 0 is
 * request 0 at pos 298 (nb 3: entries 0..2 read), row T-1 is pos 599 (nb 5,
 * all K = 4 entries read). */
static void topk_value_cases(const op_t *op, size_t topk_off) {
  unsigned char *a = malloc(op->size);
  m3s_tensor *t = (m3s_tensor *)(a + topk_off);
  int last = F.T - 1;
  int32_t *tmp;
#define TK(r, g, k) (((int32_t *)t->data)[(r)*t->stride[0] + (g)*t->stride[1] + (k)*t->stride[2]])
#define TV_SETUP() (memcpy(a, op->base, op->size), tmp = dup_i32(t))
  TV_SETUP();
  TK(last, 1, 2) = 5;
  op_run(op, a, M3S_ERR_RANGE, "topk[", "top-k entry == nb (block not visible)");
  free(tmp);
  TV_SETUP();
  TK(last, 0, 3) = 1 << 20;
  op_run(op, a, M3S_ERR_RANGE, "topk[", "top-k entry far beyond nb");
  free(tmp);
  TV_SETUP();
  TK(last, 0, 0) = -2;
  op_run(op, a, M3S_ERR_RANGE, "topk[", "top-k entry -2 (< -1)");
  free(tmp);
  TV_SETUP();
  TK(0, 1, 2) = INT32_MIN;
  op_run(op, a, M3S_ERR_RANGE, "topk[", "top-k entry INT32_MIN");
  free(tmp);
  TV_SETUP();
  TK(last, 1, 3) = TK(last, 1, 0);
  op_run(op, a, M3S_ERR_RANGE, "topk[", "duplicate top-k entry");
  free(tmp);
  TV_SETUP();
  TK(1, 0, 1) = TK(1, 0, 2);
  op_run(op, a, M3S_ERR_RANGE, "topk[", "duplicate top-k entry (adjacent slots)");
  free(tmp);
  /* accepted: -1 ("no block", also repeated) and anything in the unread tail */
  TV_SETUP();
  TK(last, 0, 1) = -1;
  TK(last, 0, 2) = -1;
  op_ok(op, a, "repeated -1 entries are accepted");
  free(tmp);
  TV_SETUP();
  TK(0, 0, 3) = 77;
  TK(1, 1, 3) = -5;
  op_ok(op, a, "entries beyond min(K, nb) are not read");
  free(tmp);
#undef TK
#undef TV_SETUP
  free(a);
}

/* fp8 scales (cache dtype e4m3, per-(head, slot) scales in the base call). */
static void scale_cases(const op_t *op, size_t sc_off) {
  unsigned char *a = malloc(op->size);
  m3s_kv_scales *s = (m3s_kv_scales *)(a + sc_off);
  static float one = 1.0f, two[2] = {1.0f, 1.0f};
  static int32_t ione = 1;
#define SC_RESET() memcpy(a, op->base, op->size)
  SC_RESET();
  s->k_scale.ndim = 3, s->k_scale.shape[2] = 1, s->k_scale.stride[2] = 1;
  op_run(op, a, M3S_ERR_SHAPE, "scales.k_scale", "k_scale with 3 dimensions");
  SC_RESET();
  s->k_scale.shape[0] -= 1;
  op_run(op, a, M3S_ERR_SHAPE, "scales.k_scale", "k_scale.shape[0] != Hkv");
  SC_RESET();
  s->k_scale.shape[1] -= 1;
  op_run(op, a, M3S_ERR_SHAPE, "scales.k_scale", "k_scale.shape[1] != P*128");
  SC_RESET();
  s->v_scale.shape[1] -= 128;
  op_run(op, a, M3S_ERR_SHAPE, "scales.v_scale", "v_scale.shape[1] != P*128");
  SC_RESET();
  s->v_scale.dtype = M3S_BF16;
  op_run(op, a, M3S_ERR_DTYPE, "scales.v_scale", "v_scale dtype bf16");
  SC_RESET();
  s->k_scale.device = 0;
  op_run(op, a, M3S_ERR_DEVICE, "scales.k_scale", "k_scale on device 0");
  SC_RESET();
  s->k_scale.stride[1] = 2;
  op_run(op, a, M3S_ERR_LAYOUT, "scales.k_scale", "k_scale innermost stride 2");
  SC_RESET();
  s->v_scale.stride[0] = -s->v_scale.stride[0];
  op_run(op, a, M3S_ERR_LAYOUT, "scales.v_scale", "v_scale negative stride");
  SC_RESET();
  s->k_scale = m3s_tensor_make(two, M3S_F32, 1, (int64_t[]){2}, M3S_HOST);
  op_run(op, a, M3S_ERR_SHAPE, "scales.k_scale",
         "k_scale of shape [2] (neither scalar nor [Hkv, P*128])");
  SC_RESET();
  s->v_scale = m3s_tensor_make(&ione, M3S_I32, 0, NULL, M3S_HOST);
  op_run(op, a, M3S_ERR_DTYPE, "scales.v_scale", "scalar v_scale of dtype i32");
  SC_RESET();
  s->k_scale = m3s_tensor_narrow(&s->k_scale, 0, s->k_scale.shape[0] + 1);
  op_run(op, a, M3S_ERR_SHAPE, "scales.k_scale",
         "k_scale = the invalid view of an out-of-range m3s_tensor_narrow (header: every function "
         "rejects it)");
  /* accepted */
  SC_RESET();
  *(unsigned *)a |= A_SCALES;
  op_ok(op, a, "scales NULL (scale 1.0)");
  SC_RESET();
  s->k_scale = m3s_tensor_make(&one, M3S_F32, 0, NULL, M3S_HOST);
  s->v_scale = m3s_tensor_make(&one, M3S_F32, 1, (int64_t[]){1}, M3S_HOST);
  op_ok(op, a, "scalar scales (ndim 0 and shape [1])");
  SC_RESET();
  memset(&s->k_scale, 0, sizeof s->k_scale);
  memset(&s->v_scale, 0, sizeof s->v_scale);
  op_ok(op, a, "scale tensors with data NULL (scale 1.0)");
#undef SC_RESET
  free(a);
}

/* Scales given for a bf16 cache are ignored, whatever they contain (header:
 * "Scales given for a bf16/f16 cache are ignored (vLLM always passes them)").
 * The second case passes the per-slot scales of F8's 3-page cache with F's
 * 9-page bf16 cache: a backend that still reads them reads past their end,
 * which only a sanitizer build (-DM3S_SANITIZE=ON) reports.
 * slot_off: the slot mapping of an insert ((size_t)-1: none). */
static void ignored_scale_case(const op_t *op, size_t sc_off, size_t slot_off) {
  unsigned char *a = malloc(op->size);
  memcpy(a, op->base, op->size);
  m3s_kv_scales *s = (m3s_kv_scales *)(a + sc_off);
  *(unsigned *)a &= ~A_SCALES;
  s->k_scale = m3s_tensor_narrow(NULL, 0, 0);
  s->k_scale.data = (void *)s; /* garbage view with data != NULL */
  s->k_scale.ndim = 3;
  s->v_scale.dtype = (m3s_dtype)99;
  op_ok(op, a, "scales are ignored for a bf16 cache (garbage views)");
  memcpy(a, op->base, op->size);
  *(unsigned *)a &= ~A_SCALES;
  *s = F8.scales; /* [2, 384]: far fewer slots than F's 9 x 128 */
  int64_t s64[NT] = {0, 129, 1000, 1151, -1};
  if (slot_off != (size_t)-1)
    ((m3s_tensor *)(a + slot_off))->data = s64;
  op_ok(op, a, "scales are ignored for a bf16 cache (scales of a smaller cache: never read)");
  free(a);
}

/* ------------------------------------------------------------------------
 * m3s_context_create / m3s_context_set_logging
 * ---------------------------------------------------------------------- */
static void test_bad_context_create(void) {
  group_begin("m3s_context_create");
  m3s_status st = m3s_context_create(-1, NULL);
  expect_err(st, M3S_ERR_NULL, "out_ctx", "out_ctx NULL (CPU)");
  st = m3s_context_create(0, NULL);
  expect_err(st, M3S_ERR_NULL, "out_ctx", "out_ctx NULL (device 0)");

  m3s_context *const sentinel = (m3s_context *)(uintptr_t)0x5A5A5A50u;
  m3s_context *c = sentinel;
  st = m3s_context_create(0, &c);
  if (st == M3S_OK) {
    printf("  (a CUDA device exists: CUDA-context checks run in m3s_gpu_context)\n");
    CHECK(c != sentinel && c != NULL && m3s_context_device(c) == 0, "CUDA context on device 0");
    CHECK(m3s_last_error()[0] == '\0', "last_error empty after success");
    g_gpu_ctx = c;
  } else {
    const char *e = m3s_last_error();
    char msg[700];
    snprintf(msg, sizeof msg, "m3s_context_create(0): %s, \"%s\"", st_name(st), e);
    printf("  m3s_context_create(0) on this machine: %s: %s\n", st_name(st), e);
    CHECK(c == sentinel, "out_ctx untouched on failure");
    CHECK(e[0] != '\0', msg);
    if (st == M3S_ERR_UNSUPPORTED)
      CHECK(strstr(e, "CUDA") != NULL, msg); /* a build without CUDA */
    else /* CUDA built in, no usable device: an error status, not a crash */
      CHECK(st == M3S_ERR_CUDA || st == M3S_ERR_INVALID || st == M3S_ERR_DEVICE, msg);
    /* ... and only on a machine without a GPU: with a driver and devices
     * present (tests/gpu_probe.h), a CUDA build must create the context */
    if (st != M3S_ERR_UNSUPPORTED) {
      int gpu = gpu_probe();
      snprintf(msg, sizeof msg, "CUDA build: m3s_context_create(0) fails only without a GPU (%s)",
               gpu_probe_why());
      CHECK(gpu == 0, msg);
    }
  }
  c = sentinel;
  st = m3s_context_create(1 << 20, &c);
  {
    char msg[700];
    snprintf(msg, sizeof msg, "m3s_context_create(2^20): %s, \"%s\"", st_name(st),
             m3s_last_error());
    CHECK(st != M3S_OK && c == sentinel, msg);
    CHECK(m3s_last_error()[0] != '\0', msg);
  }
  /* valid right after an error; any negative device is the CPU */
  c = NULL;
  expect_ok(m3s_context_create(-7, &c), "m3s_context_create(-7) right after an error");
  CHECK(c != NULL && m3s_context_device(c) < 0, "negative device -> CPU context");
  m3s_context_destroy(c);
  m3s_context_destroy(NULL);
  CHECK(m3s_context_device(NULL) == -2, "m3s_context_device(NULL) == -2");
  group_end();
}

static int g_log_calls;
static void log_cb(int level, const char *msg, void *user) {
  (void)level, (void)msg, (void)user;
  g_log_calls++;
}

static void test_bad_context_set_logging(void) {
  group_begin("m3s_context_set_logging");
  m3s_context *c = NULL;
  CHECK(m3s_context_create(-1, &c) == M3S_OK, "setup");
  int user = 0;
  CHECK(m3s_context_set_logging(c, 2, log_cb, &user) == M3S_OK, "setup");
  m3s_context saved = *c;
  const int levels[] = {-1, 4, INT_MIN, INT_MAX};
  for (int i = 0; i < 4; i++) {
    char what[64];
    snprintf(what, sizeof what, "level %d", levels[i]);
    expect_err(m3s_context_set_logging(c, levels[i], NULL, NULL), M3S_ERR_INVALID, "level", what);
    CHECK(memcmp(&saved, c, sizeof saved) == 0, "context untouched by a failed set_logging");
  }
  expect_err(m3s_context_set_logging(NULL, 1, log_cb, &user), M3S_ERR_NULL, "'ctx'", "ctx NULL");
  expect_ok(m3s_context_set_logging(c, 0, NULL, NULL), "valid call right after an error");
  CHECK(g_log_calls == 0, "nothing logged");
  m3s_context_destroy(c);
  group_end();
}

static void test_bad_context_option(void) {
  group_begin("m3s_context_set_option / m3s_context_get_option");
  m3s_context *c = NULL;
  CHECK(m3s_context_create(-1, &c) == M3S_OK, "setup");
  int64_t v = -7;
  expect_ok(m3s_context_get_option(c, M3S_OPT_BATCH_INVARIANT, &v), "get default");
  CHECK(v == 0, "batch invariance is off by default");
  expect_ok(m3s_context_set_option(c, M3S_OPT_BATCH_INVARIANT, 1), "set 1");
  m3s_context saved = *c;
  const int64_t values[] = {-1, 2, INT64_MIN, INT64_MAX, (int64_t)1 << 32};
  for (int i = 0; i < 5; i++) {
    char what[64];
    snprintf(what, sizeof what, "value %lld", (long long)values[i]);
    expect_err(m3s_context_set_option(c, M3S_OPT_BATCH_INVARIANT, values[i]), M3S_ERR_INVALID,
               "0 or 1", what);
    CHECK(memcmp(&saved, c, sizeof saved) == 0, "context untouched by a failed set_option");
  }
  const int opts[] = {0, 2, -1, INT_MAX};
  for (int i = 0; i < 4; i++) {
    char what[64];
    snprintf(what, sizeof what, "option %d", opts[i]);
    expect_err(m3s_context_set_option(c, (m3s_option)opts[i], 0), M3S_ERR_INVALID, "'opt'", what);
    v = -7;
    expect_err(m3s_context_get_option(c, (m3s_option)opts[i], &v), M3S_ERR_INVALID, "'opt'", what);
    CHECK(v == -7, "out_value untouched on error");
  }
  expect_err(m3s_context_set_option(NULL, M3S_OPT_BATCH_INVARIANT, 1), M3S_ERR_NULL, "'ctx'",
             "ctx NULL");
  expect_err(m3s_context_get_option(NULL, M3S_OPT_BATCH_INVARIANT, &v), M3S_ERR_NULL, "'ctx'",
             "ctx NULL");
  expect_err(m3s_context_get_option(c, M3S_OPT_BATCH_INVARIANT, NULL), M3S_ERR_NULL, "'out_value'",
             "out_value NULL");
  expect_ok(m3s_context_get_option(c, M3S_OPT_BATCH_INVARIANT, &v), "valid call after an error");
  CHECK(v == 1, "the value set is read back");
  m3s_context_destroy(c);
  group_end();
}

/* ------------------------------------------------------------------------
 * m3s_plan_step / m3s_workspace_size
 * ---------------------------------------------------------------------- */
static m3s_step_plan g_plan;
typedef struct {
  unsigned null;
  m3s_context *ctx;
  m3s_layer_config cfg;
  int num_reqs, spec;
  int32_t ql[4], sl[4];
} plan_args;
#define P_DESC A_T(0)
#define P_QL A_T(1)
#define P_SL A_T(2)
#define P_OUT A_T(3)

static m3s_status call_plan(void *p) {
  plan_args *a = p;
  m3s_step_desc d;
  d.num_reqs = a->num_reqs;
  d.query_lens = NUL(a, P_QL, a->ql);
  d.seq_lens = NUL(a, P_SL, a->sl);
  d.num_spec_tokens = a->spec;
  return m3s_plan_step(NUL(a, A_CTX, a->ctx), NUL(a, A_CFG, &a->cfg), NUL(a, P_DESC, &d),
                       NUL(a, P_OUT, &g_plan));
}

static void test_bad_plan_step(void) {
  group_begin("m3s_plan_step");
  plan_args base;
  memset(&base, 0, sizeof base);
  base.ctx = g_ctx;
  base.cfg = F.cfg;
  base.num_reqs = 3, base.spec = 1;
  base.ql[0] = 2, base.ql[1] = 2, base.ql[2] = 41;
  base.sl[0] = 300, base.sl[1] = 0 + 128, base.sl[2] = 600;
  op_t op = {&base, sizeof base, call_plan};
  watch("plan", &g_plan, sizeof g_plan, 1);
  base_ok(&op);
  CHECK(g_plan.num_decodes == 2 && g_plan.num_prefills == 1 && g_plan.num_tokens == 45,
        "base plan: 2 decodes + 1 prefill, 45 tokens");
  common_cases(&op, offsetof(plan_args, cfg), 0);
  null_case(&op, P_DESC, "'desc'", "desc NULL");
  null_case(&op, P_OUT, "'out_plan'", "out_plan NULL");
  null_case(&op, P_QL, "desc.query_lens", "desc.query_lens NULL with num_reqs > 0");
  null_case(&op, P_SL, "desc.seq_lens", "desc.seq_lens NULL with num_reqs > 0");
  plan_args a;
#define PL_CASE(stmt, want, names)                                                                 \
  do {                                                                                             \
    a = base;                                                                                      \
    stmt;                                                                                          \
    op_run(&op, &a, want, names, #stmt);                                                           \
  } while (0)
  PL_CASE(a.num_reqs = -1, M3S_ERR_BATCH, "desc.num_reqs");
  PL_CASE(a.ql[2] = -1, M3S_ERR_BATCH, "desc.query_lens");
  PL_CASE(a.ql[0] = INT32_MIN, M3S_ERR_BATCH, "desc.query_lens");
  PL_CASE(a.sl[2] = 40 /* < query_len 41 */, M3S_ERR_BATCH, "desc.seq_lens");
  PL_CASE(a.sl[0] = 1 /* < query_len 2 */, M3S_ERR_BATCH, "desc.seq_lens");
  PL_CASE(a.ql[1] = 0 /* no tokens but seq_len 128 */, M3S_ERR_BATCH, "desc.query_lens");
  PL_CASE(a.sl[1] = -1, M3S_ERR_BATCH, "desc.seq_lens");
  PL_CASE(a.sl[2] = (1 << 30) + 1, M3S_ERR_BATCH, "desc.seq_lens");
  PL_CASE(a.spec = -1, M3S_ERR_BATCH, "desc.num_spec_tokens");
  PL_CASE(a.spec = INT_MIN, M3S_ERR_BATCH, "desc.num_spec_tokens");
  PL_CASE(a.spec = 1025, M3S_ERR_BATCH, "desc.num_spec_tokens");
#undef PL_CASE
  /* accepted: padded requests, empty step, NULL arrays with num_reqs 0 */
  a = base;
  a.ql[1] = 0, a.sl[1] = 0;
  op_ok(&op, &a, "padded request (query_len 0, seq_len 0)");
  a = base;
  a.num_reqs = 0;
  a.null |= P_QL | P_SL;
  op_ok(&op, &a, "num_reqs 0 with NULL arrays");
  recover(&op);
  group_end();
}

static size_t g_ws;
typedef struct {
  unsigned null;
  m3s_context *ctx;
  m3s_layer_config cfg;
  int64_t tokens, seq;
} ws_args;

static m3s_status call_ws(void *p) {
  ws_args *a = p;
  return m3s_workspace_size(NUL(a, A_CTX, a->ctx), NUL(a, A_CFG, &a->cfg), a->tokens, a->seq,
                            NUL(a, A_T(0), &g_ws));
}

static void test_bad_workspace_size(void) {
  group_begin("m3s_workspace_size");
  ws_args base;
  memset(&base, 0, sizeof base);
  base.ctx = g_ctx, base.cfg = F.cfg, base.tokens = 43, base.seq = 600;
  op_t op = {&base, sizeof base, call_ws};
  watch("out_bytes", &g_ws, sizeof g_ws, 1);
  base_ok(&op);
  common_cases(&op, offsetof(ws_args, cfg), 0);
  null_case(&op, A_T(0), "'out_bytes'", "out_bytes NULL");
  ws_args a = base;
  a.tokens = -1;
  op_run(&op, &a, M3S_ERR_INVALID, "max_tokens", "max_tokens = -1");
  a = base;
  a.seq = -1;
  op_run(&op, &a, M3S_ERR_INVALID, "max_seq_len", "max_seq_len = -1");
  a = base;
  a.tokens = INT64_MIN;
  op_run(&op, &a, M3S_ERR_INVALID, "max_tokens", "max_tokens = INT64_MIN");
  a = base;
  a.tokens = 0, a.seq = 0;
  op_ok(&op, &a, "0 tokens, 0 keys");
  recover(&op);
  group_end();
}

/* ------------------------------------------------------------------------
 * m3s_index_topk
 * ---------------------------------------------------------------------- */
typedef struct {
  unsigned null;
  m3s_context *ctx;
  m3s_layer_config cfg;
  m3s_batch batch;
  m3s_tensor iq, ic, topk;
  m3s_exec exec;
} topk_args;

static m3s_status call_topk(void *p) {
  topk_args *a = p;
  return m3s_index_topk(NUL(a, A_CTX, a->ctx), NUL(a, A_CFG, &a->cfg), NUL(a, A_BATCH, &a->batch),
                        NUL(a, A_T(0), &a->iq), NUL(a, A_T(1), &a->ic), NUL(a, A_T(2), &a->topk),
                        NUL(a, A_EXEC, &a->exec));
}

#define BOFF(type, bfield, tfield) (offsetof(type, bfield) + offsetof(m3s_batch, tfield))

static void test_bad_index_topk(void) {
  group_begin("m3s_index_topk");
  topk_args base;
  memset(&base, 0, sizeof base);
  base.ctx = g_ctx, base.cfg = F.cfg, base.batch = F.batch;
  base.iq = F.iq, base.ic = F.ic, base.topk = F.topk;
  op_t op = {&base, sizeof base, call_topk};
  watch_fixture(&F, W_TOPK);
  base_ok(&op);
  common_cases(&op, offsetof(topk_args, cfg), 1);
  const tspec specs[] = {
      {"'iq'", offsetof(topk_args, iq), A_T(0), M3S_F32, 0x7, 0},
      {"'index_cache'", offsetof(topk_args, ic), A_T(1), M3S_F16, 0x6, 0},
      {"'topk'", offsetof(topk_args, topk), A_T(2), M3S_I64, 0x7, 1},
      {"'batch.seq_lens'", BOFF(topk_args, batch, seq_lens), 0, M3S_I64, 0x1, 0},
      {"'batch.query_start_loc'", BOFF(topk_args, batch, query_start_loc), 0, M3S_I64, 0x1, 0},
      {"'batch.index_block_table'", BOFF(topk_args, batch, index_block_table), 0, M3S_I64, 0x1, 0},
  };
  for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++)
    tensor_cases(&op, &specs[i]);
  batch_cases(&op, offsetof(topk_args, batch), "", F.num_pages, 2);

  topk_args a;
  /* Hi != Hkv: an iq with 3 index heads for a config with 2 KV heads */
  int64_t T = F.T;
  uint16_t *iq3 = calloc((size_t)(T * 3 * 128), 2);
  a = base;
  a.iq = m3s_tensor_make(iq3, M3S_BF16, 3, (int64_t[]){T, 3, 128}, M3S_HOST);
  op_run(&op, &a, M3S_ERR_SHAPE, "'iq'&cfg.num_kv_heads",
         "Hi (iq.shape[1] = 3) != cfg.num_kv_heads (2)");
  a = base;
  a.cfg.num_q_heads = 4, a.cfg.num_kv_heads = 4;
  op_run(&op, &a, M3S_ERR_SHAPE, "'iq'", "cfg.num_kv_heads 4 but iq has 2 index heads");
  free(iq3);
  /* index cache must be contiguous */
  a = base;
  a.ic.shape[0] = F.num_pages / 2, a.ic.stride[0] *= 2;
  op_run(&op, &a, M3S_ERR_LAYOUT, "'index_cache'",
         "index_cache not contiguous (page stride doubled)");
  a = base;
  a.ic.shape[0] = 1;
  op_run(&op, &a, M3S_ERR_RANGE, "batch.index_block_table",
         "index_block_table entries >= index_cache.shape[0]");
  /* accepted: a head-major [Hkv, T, K] top-k buffer passed as a permuted view */
  int32_t *hm = malloc(sizeof(int32_t) * (size_t)(T * 2 * 4));
  a = base;
  a.topk =
      m3s_tensor_strided(hm, M3S_I32, 3, (int64_t[]){T, 2, 4}, (int64_t[]){4, T * 4, 1}, M3S_HOST);
  op_ok(&op, &a, "head-major top-k view");
  free(hm);
  exec_cases(&op, offsetof(topk_args, exec), &F.cfg, F.T, F.batch.max_seq_len);
  recover(&op);
  group_end();
}

/* ------------------------------------------------------------------------
 * m3s_sparse_attention
 * ---------------------------------------------------------------------- */
typedef struct {
  unsigned null;
  m3s_context *ctx;
  m3s_layer_config cfg;
  m3s_batch batch;
  m3s_tensor q, kv, topk, out, lse;
  m3s_kv_scales scales;
  m3s_exec exec;
} attn_args;

static m3s_status call_attn(void *p) {
  attn_args *a = p;
  return m3s_sparse_attention(NUL(a, A_CTX, a->ctx), NUL(a, A_CFG, &a->cfg),
                              NUL(a, A_BATCH, &a->batch), NUL(a, A_T(0), &a->q),
                              NUL(a, A_T(1), &a->kv), NUL(a, A_SCALES, &a->scales),
                              NUL(a, A_T(2), &a->topk), NUL(a, A_T(3), &a->out),
                              NUL(a, A_T(4), &a->lse), NUL(a, A_EXEC, &a->exec));
}

static void test_bad_sparse_attention(void) {
  group_begin("m3s_sparse_attention");
  int64_t T = F.T;
  attn_args base;
  memset(&base, 0, sizeof base);
  base.null = A_SCALES; /* bf16 cache: no scales */
  base.ctx = g_ctx, base.cfg = F.cfg, base.batch = F.batch;
  base.q = F.q, base.kv = F.kv, base.out = F.out, base.lse = F.lse;
  base.topk = m3s_tensor_make(g_tk, M3S_I32, 3, (int64_t[]){T, 2, 4}, M3S_HOST);
  op_t op = {&base, sizeof base, call_attn};
  watch_fixture(&F, W_OUT | W_LSE);
  watch("top-k input", g_tk, sizeof(int32_t) * (size_t)(T * 2 * 4), 0);
  base_ok(&op);
  common_cases(&op, offsetof(attn_args, cfg), 1);
  const tspec specs[] = {
      {"'q'", offsetof(attn_args, q), A_T(0), M3S_F32, 0x7, 0},
      {"'kv_cache'", offsetof(attn_args, kv), A_T(1), M3S_I32, 0xE, 0},
      {"'topk'", offsetof(attn_args, topk), A_T(2), M3S_I64, 0x7, 0},
      {"'out'", offsetof(attn_args, out), A_T(3), M3S_F16 /* != q's bf16 */, 0x7, 1},
      {"'lse'", offsetof(attn_args, lse), 0, M3S_BF16, 0x3, 1},
      {"'batch.seq_lens'", BOFF(attn_args, batch, seq_lens), 0, M3S_I64, 0x1, 0},
      {"'batch.query_start_loc'", BOFF(attn_args, batch, query_start_loc), 0, M3S_I64, 0x1, 0},
      {"'batch.block_table'", BOFF(attn_args, batch, block_table), 0, M3S_I64, 0x1, 0},
  };
  for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++)
    tensor_cases(&op, &specs[i]);
  batch_cases(&op, offsetof(attn_args, batch), "", F.num_pages, 1);
  topk_value_cases(&op, offsetof(attn_args, topk));
  attn_args a = base;
  a.kv.shape[0] = 2;
  op_run(&op, &a, M3S_ERR_RANGE, "batch.block_table", "block_table entries >= kv_cache.shape[0]");
  a = base;
  a.null |= A_T(4);
  op_ok(&op, &a, "lse NULL");
  ignored_scale_case(&op, offsetof(attn_args, scales), (size_t)-1);
  exec_cases(&op, offsetof(attn_args, exec), &F.cfg, F.T, F.batch.max_seq_len);
  recover(&op);
  watch_clear();

  /* fp8 cache with per-(head, slot) scales */
  int64_t T8 = F8.T;
  attn_args b8;
  memset(&b8, 0, sizeof b8);
  b8.ctx = g_ctx, b8.cfg = F8.cfg, b8.batch = F8.batch;
  b8.q = F8.q, b8.kv = F8.kv, b8.out = F8.out, b8.lse = F8.lse, b8.scales = F8.scales;
  b8.topk = m3s_tensor_make(g_tk8, M3S_I32, 3, (int64_t[]){T8, 2, 4}, M3S_HOST);
  op_t op8 = {&b8, sizeof b8, call_attn};
  watch_fixture(&F8, W_OUT | W_LSE);
  base_ok(&op8);
  scale_cases(&op8, offsetof(attn_args, scales));
  group_end();
}

/* ------------------------------------------------------------------------
 * m3s_step_forward: decode part = request 0 of F (uniform, q_len 2),
 * prefill part = request 1 (ragged, query_start_loc slice {2, 43}).
 * ---------------------------------------------------------------------- */
typedef struct {
  unsigned null;
  m3s_context *ctx;
  m3s_layer_config cfg;
  m3s_step step;
  m3s_tensor q, iq, kv, ic, topk, out, lse;
  m3s_kv_scales scales;
  m3s_exec exec;
} step_args;
#define S_STEP A_BATCH

static m3s_status call_step(void *p) {
  step_args *a = p;
  return m3s_step_forward(NUL(a, A_CTX, a->ctx), NUL(a, A_CFG, &a->cfg), NUL(a, S_STEP, &a->step),
                          NUL(a, A_T(0), &a->q), NUL(a, A_T(1), &a->iq), NUL(a, A_T(2), &a->kv),
                          NUL(a, A_SCALES, &a->scales), NUL(a, A_T(3), &a->ic),
                          NUL(a, A_T(4), &a->topk), NUL(a, A_T(5), &a->out),
                          NUL(a, A_T(6), &a->lse), NUL(a, A_EXEC, &a->exec));
}

static void test_bad_step_forward(void) {
  group_begin("m3s_step_forward");
  step_args base;
  memset(&base, 0, sizeof base);
  base.null = A_SCALES;
  base.ctx = g_ctx, base.cfg = F.cfg;
  m3s_batch *d = &base.step.decode, *pf = &base.step.prefill;
  d->num_reqs = 1, d->num_tokens = 2, d->uniform_q_len = 2, d->max_q_len = 2, d->max_seq_len = 300;
  d->seq_lens = m3s_tensor_narrow(&F.batch.seq_lens, 0, 1);
  d->block_table = m3s_tensor_narrow(&F.batch.block_table, 0, 1);
  d->index_block_table = m3s_tensor_narrow(&F.batch.index_block_table, 0, 1);
  /* d->query_start_loc stays zeroed: unused by a uniform batch */
  pf->num_reqs = 1, pf->num_tokens = F.T - 2, pf->uniform_q_len = 0, pf->max_q_len = F.T - 2;
  pf->max_seq_len = 600;
  pf->query_start_loc = m3s_tensor_narrow(&F.batch.query_start_loc, 1, 2);
  pf->seq_lens = m3s_tensor_narrow(&F.batch.seq_lens, 1, 1);
  pf->block_table = m3s_tensor_narrow(&F.batch.block_table, 1, 1);
  pf->index_block_table = m3s_tensor_narrow(&F.batch.index_block_table, 1, 1);
  base.q = F.q, base.iq = F.iq, base.kv = F.kv, base.ic = F.ic;
  base.topk = F.topk, base.out = F.out, base.lse = F.lse;
  op_t op = {&base, sizeof base, call_step};
  base_ok(&op);
  CHECK(memcmp(F.topk_mem, g_tk, sizeof(int32_t) * (size_t)(F.T * 2 * 4)) == 0,
        "step_forward top-k == m3s_index_topk over the whole batch");
  watch_fixture(&F, W_TOPK | W_OUT | W_LSE);
  common_cases(&op, offsetof(step_args, cfg), 0);
  null_case(&op, S_STEP, "'step'", "step NULL");
  const tspec specs[] = {
      {"'q'", offsetof(step_args, q), A_T(0), M3S_F32, 0x7, 0},
      {"'iq'", offsetof(step_args, iq), A_T(1), M3S_F32, 0x7, 0},
      {"'kv_cache'", offsetof(step_args, kv), A_T(2), M3S_I32, 0xE, 0},
      {"'index_cache'", offsetof(step_args, ic), A_T(3), M3S_E5M2, 0x6, 0},
      {"'topk'", offsetof(step_args, topk), A_T(4), M3S_I64, 0x7, 1},
      {"'out'", offsetof(step_args, out), A_T(5), M3S_F16, 0x7, 1},
      {"'lse'", offsetof(step_args, lse), 0, M3S_F16, 0x3, 1},
      {"'batch.seq_lens'",
       offsetof(step_args, step) + offsetof(m3s_step, decode) + offsetof(m3s_batch, seq_lens), 0,
       M3S_I64, 0x1, 0},
      {"'batch.block_table'",
       offsetof(step_args, step) + offsetof(m3s_step, decode) + offsetof(m3s_batch, block_table), 0,
       M3S_I64, 0x1, 0},
      {"'batch.query_start_loc'",
       offsetof(step_args, step) + offsetof(m3s_step, prefill) +
           offsetof(m3s_batch, query_start_loc),
       0, M3S_I64, 0x1, 0},
      {"'batch.index_block_table'",
       offsetof(step_args, step) + offsetof(m3s_step, prefill) +
           offsetof(m3s_batch, index_block_table),
       0, M3S_I64, 0x1, 0},
  };
  for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++)
    tensor_cases(&op, &specs[i]);
  batch_cases(&op, offsetof(step_args, step) + offsetof(m3s_step, decode), "decode", F.num_pages,
              3);
  batch_cases(&op, offsetof(step_args, step) + offsetof(m3s_step, prefill), "prefill", F.num_pages,
              3);
  step_args a = base;
  a.step.decode.num_tokens = 4, a.step.decode.uniform_q_len = 4, a.step.decode.max_q_len = 4;
  op_run(&op, &a, M3S_ERR_SHAPE, "'q'", "decode + prefill tokens (45) != q rows (43)");
  a = base;
  a.step.prefill.num_tokens = -1;
  op_run(&op, &a, M3S_ERR_BATCH, "prefill.num_tokens", "prefill.num_tokens = -1");
  a = base;
  a.null &= ~A_SCALES;
  a.scales = F8.scales; /* ignored for the bf16 cache; must not be read (sanitizer build) */
  op_ok(&op, &a, "scales given for a bf16 cache are ignored (scales of a smaller cache)");
  a = base;
  a.null |= A_T(6);
  op_ok(&op, &a, "lse NULL");
  /* a decode-only step whose (empty) prefill part is left zero-initialised */
  a = base;
  memset(&a.step.prefill, 0, sizeof a.step.prefill);
  a.q = m3s_tensor_narrow(&F.q, 0, 2), a.iq = m3s_tensor_narrow(&F.iq, 0, 2);
  a.topk = m3s_tensor_narrow(&F.topk, 0, 2), a.out = m3s_tensor_narrow(&F.out, 0, 2);
  a.lse = m3s_tensor_narrow(&F.lse, 0, 2);
  op_ok(&op, &a,
        "decode-only step, prefill part zero-initialised (an empty part needs no tensors)");
  /* a prefill-only step whose (empty) decode part is left zero-initialised */
  a = base;
  memset(&a.step.decode, 0, sizeof a.step.decode);
  a.q = m3s_tensor_narrow(&F.q, 2, F.T - 2), a.iq = m3s_tensor_narrow(&F.iq, 2, F.T - 2);
  a.topk = m3s_tensor_narrow(&F.topk, 2, F.T - 2), a.out = m3s_tensor_narrow(&F.out, 2, F.T - 2);
  a.lse = m3s_tensor_narrow(&F.lse, 2, F.T - 2);
  op_ok(&op, &a, "prefill-only step, decode part zero-initialised");
  /* an empty step: no rows at all */
  a = base;
  memset(&a.step, 0, sizeof a.step);
  a.q = m3s_tensor_narrow(&F.q, 0, 0), a.iq = m3s_tensor_narrow(&F.iq, 0, 0);
  a.topk = m3s_tensor_narrow(&F.topk, 0, 0), a.out = m3s_tensor_narrow(&F.out, 0, 0);
  a.lse = m3s_tensor_narrow(&F.lse, 0, 0);
  arm();
  op_ok(&op, &a, "empty step (0 tokens)");
  CHECK(first_changed() == NULL, "an empty step writes nothing");
  exec_cases(&op, offsetof(step_args, exec), &F.cfg, F.T, 600);
  recover(&op);
  group_end();
}

/* ------------------------------------------------------------------------
 * K2Q: m3s_k2q_csr_rows, m3s_build_k2q_csr, m3s_k2q_attention,
 * m3s_combine_partials
 * ---------------------------------------------------------------------- */
#define CSR_ROWS 8                         /* ceil(300/128) + ceil(600/128) */
static int32_t *g_rp, *g_qi, *g_qs, *g_qc; /* valid CSR of F over g_tk */
static float *g_po, *g_pl;                 /* valid partials */

static int64_t g_rows;
typedef struct {
  unsigned null;
  m3s_context *ctx;
  m3s_batch batch;
} rows_args;

static m3s_status call_rows(void *p) {
  rows_args *a = p;
  return m3s_k2q_csr_rows(NUL(a, A_CTX, a->ctx), NUL(a, A_BATCH, &a->batch),
                          NUL(a, A_T(0), &g_rows));
}

static void test_bad_k2q_csr_rows(void) {
  group_begin("m3s_k2q_csr_rows");
  rows_args base;
  memset(&base, 0, sizeof base);
  base.ctx = g_ctx, base.batch = F.batch;
  op_t op = {&base, sizeof base, call_rows};
  watch_fixture(&F, 0);
  watch("out_rows", &g_rows, sizeof g_rows, 1);
  base_ok(&op);
  CHECK(g_rows == CSR_ROWS, "rows of the base batch");
  common_cases(&op, (size_t)-1, 1);
  null_case(&op, A_T(0), "'out_rows'", "out_rows NULL");
  const tspec specs[] = {
      {"'batch.seq_lens'", BOFF(rows_args, batch, seq_lens), 0, M3S_I64, 0x1, 0},
      {"'batch.query_start_loc'", BOFF(rows_args, batch, query_start_loc), 0, M3S_F32, 0x1, 0},
  };
  for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++)
    tensor_cases(&op, &specs[i]);
  batch_cases(&op, offsetof(rows_args, batch), "", F.num_pages, 0);
  recover(&op);
  group_end();
}

typedef struct {
  unsigned null;
  m3s_context *ctx;
  m3s_layer_config cfg;
  m3s_batch batch;
  m3s_tensor topk, rp, qi, qs, qc;
  m3s_exec exec;
} csr_args;

static m3s_status call_csr(void *p) {
  csr_args *a = p;
  return m3s_build_k2q_csr(NUL(a, A_CTX, a->ctx), NUL(a, A_CFG, &a->cfg),
                           NUL(a, A_BATCH, &a->batch), NUL(a, A_T(0), &a->topk),
                           NUL(a, A_T(1), &a->rp), NUL(a, A_T(2), &a->qi), NUL(a, A_T(3), &a->qs),
                           NUL(a, A_T(4), &a->qc), NUL(a, A_EXEC, &a->exec));
}

static void test_bad_build_k2q_csr(void) {
  group_begin("m3s_build_k2q_csr");
  int64_t T = F.T, TK = T * 4;
  int32_t *rp = malloc(sizeof(int32_t) * 2 * (CSR_ROWS + 1)),
          *qi = malloc(sizeof(int32_t) * (size_t)(2 * TK));
  int32_t *qs = malloc(sizeof(int32_t) * (size_t)(2 * TK)),
          *qc = malloc(sizeof(int32_t) * (size_t)(T * 2));
  csr_args base;
  memset(&base, 0, sizeof base);
  base.ctx = g_ctx, base.cfg = F.cfg, base.batch = F.batch;
  base.topk = m3s_tensor_make(g_tk, M3S_I32, 3, (int64_t[]){T, 2, 4}, M3S_HOST);
  base.rp = m3s_tensor_make(rp, M3S_I32, 2, (int64_t[]){2, CSR_ROWS + 1}, M3S_HOST);
  base.qi = m3s_tensor_make(qi, M3S_I32, 2, (int64_t[]){2, TK}, M3S_HOST);
  base.qs = m3s_tensor_make(qs, M3S_I32, 2, (int64_t[]){2, TK}, M3S_HOST);
  base.qc = m3s_tensor_make(qc, M3S_I32, 2, (int64_t[]){T, 2}, M3S_HOST);
  op_t op = {&base, sizeof base, call_csr};
  watch_fixture(&F, 0);
  watch("top-k input", g_tk, sizeof(int32_t) * (size_t)(T * 8), 0);
  watch("row_ptr", rp, sizeof(int32_t) * 2 * (CSR_ROWS + 1), 1);
  watch("q_indices", qi, sizeof(int32_t) * (size_t)(2 * TK), 1);
  watch("q_slot", qs, sizeof(int32_t) * (size_t)(2 * TK), 1);
  watch("q_count", qc, sizeof(int32_t) * (size_t)(T * 2), 1);
  base_ok(&op);
  common_cases(&op, offsetof(csr_args, cfg), 1);
  const tspec specs[] = {
      {"'topk'", offsetof(csr_args, topk), A_T(0), M3S_I64, 0x7, 0},
      {"'row_ptr'", offsetof(csr_args, rp), A_T(1), M3S_I64, 0x3, 1},
      {"'q_indices'", offsetof(csr_args, qi), A_T(2), M3S_I64, 0x3, 1},
      {"'q_slot'", offsetof(csr_args, qs), A_T(3), M3S_F32, 0x3, 1},
      {"'q_count'", offsetof(csr_args, qc), A_T(4), M3S_I64, 0x3, 1},
      {"'batch.seq_lens'", BOFF(csr_args, batch, seq_lens), 0, M3S_I64, 0x1, 0},
      {"'batch.query_start_loc'", BOFF(csr_args, batch, query_start_loc), 0, M3S_I64, 0x1, 0},
  };
  for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++)
    tensor_cases(&op, &specs[i]);
  batch_cases(&op, offsetof(csr_args, batch), "", F.num_pages, 0);
  topk_value_cases(&op, offsetof(csr_args, topk));
  csr_args a = base;
  a.rp.shape[1] = 0;
  op_run(&op, &a, M3S_ERR_SHAPE, "'row_ptr'", "row_ptr.shape[1] = 0");
  a = base;
  a.qi.shape[1] = TK / 2, a.qi.stride[0] = TK; /* half the columns, row stride kept */
  op_run(&op, &a, M3S_ERR_SHAPE, "'q_indices'", "q_indices.shape[1] = T*K/2");
  a = base;
  a.qs.shape[1] = TK - 4, a.qs.stride[0] = TK;
  op_run(&op, &a, M3S_ERR_SHAPE, "'q_slot'", "q_slot.shape[1] = T*K - 4 (row stride kept)");
  exec_cases(&op, offsetof(csr_args, exec), &F.cfg, -1, 0);
  recover(&op);
  group_end();
  free(rp), free(qi), free(qs), free(qc);
}

typedef struct {
  unsigned null;
  m3s_context *ctx;
  m3s_layer_config cfg;
  m3s_batch batch;
  m3s_tensor q, kv, rp, qi, qs, po, pl;
  m3s_kv_scales scales;
  m3s_exec exec;
} k2q_args;

static m3s_status call_k2q(void *p) {
  k2q_args *a = p;
  return m3s_k2q_attention(
      NUL(a, A_CTX, a->ctx), NUL(a, A_CFG, &a->cfg), NUL(a, A_BATCH, &a->batch),
      NUL(a, A_T(0), &a->q), NUL(a, A_T(1), &a->kv), NUL(a, A_SCALES, &a->scales),
      NUL(a, A_T(2), &a->rp), NUL(a, A_T(3), &a->qi), NUL(a, A_T(4), &a->qs),
      NUL(a, A_T(5), &a->po), NUL(a, A_T(6), &a->pl), NUL(a, A_EXEC, &a->exec));
}

static void test_bad_k2q_attention(void) {
  group_begin("m3s_k2q_attention");
  int64_t T = F.T, TK = T * 4;
  float *po = malloc(sizeof(float) * (size_t)(T * 4 * 4 * 128)),
        *pl = malloc(sizeof(float) * (size_t)(T * 16));
  k2q_args base;
  memset(&base, 0, sizeof base);
  base.null = A_SCALES;
  base.ctx = g_ctx, base.cfg = F.cfg, base.batch = F.batch, base.q = F.q, base.kv = F.kv;
  base.rp = m3s_tensor_make(g_rp, M3S_I32, 2, (int64_t[]){2, CSR_ROWS + 1}, M3S_HOST);
  base.qi = m3s_tensor_make(g_qi, M3S_I32, 2, (int64_t[]){2, TK}, M3S_HOST);
  base.qs = m3s_tensor_make(g_qs, M3S_I32, 2, (int64_t[]){2, TK}, M3S_HOST);
  base.po = m3s_tensor_make(po, M3S_F32, 4, (int64_t[]){T, 4, 4, 128}, M3S_HOST);
  base.pl = m3s_tensor_make(pl, M3S_F32, 3, (int64_t[]){T, 4, 4}, M3S_HOST);
  op_t op = {&base, sizeof base, call_k2q};
  watch_fixture(&F, 0);
  watch("row_ptr", g_rp, sizeof(int32_t) * 2 * (CSR_ROWS + 1), 0);
  watch("q_indices", g_qi, sizeof(int32_t) * (size_t)(2 * TK), 0);
  watch("q_slot", g_qs, sizeof(int32_t) * (size_t)(2 * TK), 0);
  watch("part_out", po, sizeof(float) * (size_t)(T * 4 * 4 * 128), 1);
  watch("part_lse", pl, sizeof(float) * (size_t)(T * 16), 1);
  base_ok(&op);
  common_cases(&op, offsetof(k2q_args, cfg), 1);
  const tspec specs[] = {
      {"'q'", offsetof(k2q_args, q), A_T(0), M3S_E4M3, 0x7, 0},
      {"'kv_cache'", offsetof(k2q_args, kv), A_T(1), M3S_F32, 0xE, 0},
      {"'row_ptr'", offsetof(k2q_args, rp), A_T(2), M3S_I64, 0x3, 0},
      {"'q_indices'", offsetof(k2q_args, qi), A_T(3), M3S_I64, 0x3, 0},
      {"'q_slot'", offsetof(k2q_args, qs), A_T(4), M3S_F32, 0x3, 0},
      {"'part_out'", offsetof(k2q_args, po), A_T(5), M3S_BF16, 0xF, 1},
      {"'part_lse'", offsetof(k2q_args, pl), A_T(6), M3S_BF16, 0x7, 1},
      {"'batch.seq_lens'", BOFF(k2q_args, batch, seq_lens), 0, M3S_I64, 0x1, 0},
      {"'batch.query_start_loc'", BOFF(k2q_args, batch, query_start_loc), 0, M3S_I64, 0x1, 0},
      {"'batch.block_table'", BOFF(k2q_args, batch, block_table), 0, M3S_I64, 0x1, 0},
  };
  for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++)
    tensor_cases(&op, &specs[i]);
  batch_cases(&op, offsetof(k2q_args, batch), "", F.num_pages, 1);
  /* CSR values */
  k2q_args a;
  int32_t *c;
  int64_t R1 = CSR_ROWS + 1;
#define CSR_CASE(field, stmt, want, names, what)                                                   \
  do {                                                                                             \
    a = base;                                                                                      \
    c = dup_i32(&a.field);                                                                         \
    stmt;                                                                                          \
    op_run(&op, &a, want, names, what);                                                            \
    free(c);                                                                                       \
  } while (0)
  CSR_CASE(rp, c[0] = 1, M3S_ERR_RANGE, "row_ptr", "row_ptr[0][0] = 1");
  CSR_CASE(rp, c[R1] = -1, M3S_ERR_RANGE, "row_ptr", "row_ptr[1][0] = -1");
  CSR_CASE(rp, c[1] = -1, M3S_ERR_RANGE, "row_ptr", "row_ptr[0] decreasing");
  /* rows 3..7 are request 1's blocks: stretching row 4 over row 5 stays inside request 1 */
  CSR_CASE(rp, c[R1 + 5] = c[R1 + 6] + 1, M3S_ERR_RANGE, "row_ptr",
           "row_ptr[1] decreasing (rows 5/6)");
  CSR_CASE(rp, c[R1 - 1] = (int32_t)TK + 1, M3S_ERR_RANGE, "row_ptr", "row_ptr[0][R] > T*K");
  CSR_CASE(qi, c[0] = (int32_t)T - 1 /* row 0 is request 0's block 0 */, M3S_ERR_RANGE, "q_indices",
           "q_indices entry of another request");
  CSR_CASE(qi, c[TK] = -1, M3S_ERR_RANGE, "q_indices", "q_indices entry -1");
  CSR_CASE(qi, c[g_rp[R1 - 1] - 1] = (int32_t)T, M3S_ERR_RANGE, "q_indices",
           "q_indices entry == T");
  CSR_CASE(qs, c[1] = 4, M3S_ERR_RANGE, "q_slot", "q_slot entry == K");
  CSR_CASE(qs, c[TK + 2] = -1, M3S_ERR_RANGE, "q_slot", "q_slot entry -1");
#undef CSR_CASE
  /* accepted: garbage beyond row_ptr[g][R] */
  a = base;
  c = dup_i32(&a.qi);
  for (int64_t e = g_rp[R1 - 1]; e < TK; e++)
    c[e] = -12345;
  op_ok(&op, &a, "q_indices entries past row_ptr[g][R] are not read");
  free(c);
  exec_cases(&op, offsetof(k2q_args, exec), &F.cfg, -1, 0);
  recover(&op);
  group_end();
  free(po), free(pl);
}

typedef struct {
  unsigned null;
  m3s_context *ctx;
  m3s_layer_config cfg;
  m3s_tensor po, pl, qc, out, lse;
  m3s_exec exec;
} comb_args;

static m3s_status call_comb(void *p) {
  comb_args *a = p;
  return m3s_combine_partials(NUL(a, A_CTX, a->ctx), NUL(a, A_CFG, &a->cfg), NUL(a, A_T(0), &a->po),
                              NUL(a, A_T(1), &a->pl), NUL(a, A_T(2), &a->qc),
                              NUL(a, A_T(3), &a->out), NUL(a, A_T(4), &a->lse),
                              NUL(a, A_EXEC, &a->exec));
}

static void test_bad_combine_partials(void) {
  group_begin("m3s_combine_partials");
  int64_t T = F.T;
  comb_args base;
  memset(&base, 0, sizeof base);
  base.ctx = g_ctx, base.cfg = F.cfg;
  base.po = m3s_tensor_make(g_po, M3S_F32, 4, (int64_t[]){T, 4, 4, 128}, M3S_HOST);
  base.pl = m3s_tensor_make(g_pl, M3S_F32, 3, (int64_t[]){T, 4, 4}, M3S_HOST);
  base.qc = m3s_tensor_make(g_qc, M3S_I32, 2, (int64_t[]){T, 2}, M3S_HOST);
  base.out = F.out, base.lse = F.lse;
  op_t op = {&base, sizeof base, call_comb};
  watch_fixture(&F, W_OUT | W_LSE);
  watch("part_out", g_po, sizeof(float) * (size_t)(T * 4 * 4 * 128), 0);
  watch("part_lse", g_pl, sizeof(float) * (size_t)(T * 16), 0);
  watch("q_count", g_qc, sizeof(int32_t) * (size_t)(T * 2), 0);
  base_ok(&op);
  common_cases(&op, offsetof(comb_args, cfg), 0);
  const tspec specs[] = {
      {"'part_out'", offsetof(comb_args, po), A_T(0), M3S_BF16, 0xE, 0},
      {"'part_lse'", offsetof(comb_args, pl), A_T(1), M3S_I32, 0x7, 0},
      {"'q_count'", offsetof(comb_args, qc), A_T(2), M3S_I64, 0x3, 0},
      {"'out'", offsetof(comb_args, out), A_T(3), M3S_F32, 0x7, 1},
      {"'lse'", offsetof(comb_args, lse), 0, M3S_F16, 0x3, 1},
  };
  for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++)
    tensor_cases(&op, &specs[i]);
  comb_args a = base;
  a.po.shape[0] = T - 1;
  op_run(&op, &a, M3S_ERR_SHAPE, "'part_lse'", "part_out has T-1 rows (T is taken from part_out)");
  int32_t *c;
  a = base;
  c = dup_i32(&a.qc);
  c[5] = -1;
  op_run(&op, &a, M3S_ERR_RANGE, "q_count", "q_count entry -1");
  free(c);
  a = base;
  c = dup_i32(&a.qc);
  c[2 * T - 1] = 5;
  op_run(&op, &a, M3S_ERR_RANGE, "q_count", "q_count entry K + 1");
  free(c);
  a = base;
  a.null |= A_T(4);
  op_ok(&op, &a, "lse NULL");
  exec_cases(&op, offsetof(comb_args, exec), &F.cfg, -1, 0);
  recover(&op);
  group_end();
}

/* ------------------------------------------------------------------------
 * m3s_merge_attn_states
 * ---------------------------------------------------------------------- */
typedef struct {
  unsigned null;
  m3s_context *ctx;
  m3s_tensor oa, la, ob, lb, out, lse;
  m3s_exec exec;
} merge_args;

static m3s_status call_merge(void *p) {
  merge_args *a = p;
  return m3s_merge_attn_states(NUL(a, A_CTX, a->ctx), NUL(a, A_T(0), &a->oa),
                               NUL(a, A_T(1), &a->la), NUL(a, A_T(2), &a->ob),
                               NUL(a, A_T(3), &a->lb), NUL(a, A_T(4), &a->out),
                               NUL(a, A_T(5), &a->lse), NUL(a, A_EXEC, &a->exec));
}

static void test_bad_merge_attn_states(void) {
  group_begin("m3s_merge_attn_states");
  enum { MT = 5, MH = 4 };
  static float oa[MT * MH * 128], ob[MT * MH * 128], la[MT * MH], lb[MT * MH], lse[MT * MH];
  static uint16_t out[MT * MH * 128];
  uint64_t rng = 99;
  for (int i = 0; i < MT * MH * 128; i++)
    oa[i] = rng_normal(&rng), ob[i] = rng_normal(&rng);
  for (int i = 0; i < MT * MH; i++)
    la[i] = rng_normal(&rng), lb[i] = rng_normal(&rng);
  merge_args base;
  memset(&base, 0, sizeof base);
  base.ctx = g_ctx;
  int64_t s3[3] = {MT, MH, 128}, s2[2] = {MT, MH};
  base.oa = m3s_tensor_make(oa, M3S_F32, 3, s3, M3S_HOST);
  base.ob = m3s_tensor_make(ob, M3S_F32, 3, s3, M3S_HOST);
  base.la = m3s_tensor_make(la, M3S_F32, 2, s2, M3S_HOST);
  base.lb = m3s_tensor_make(lb, M3S_F32, 2, s2, M3S_HOST);
  base.out = m3s_tensor_make(out, M3S_BF16, 3, s3, M3S_HOST);
  base.lse = m3s_tensor_make(lse, M3S_F32, 2, s2, M3S_HOST);
  op_t op = {&base, sizeof base, call_merge};
  watch("out_a", oa, sizeof oa, 0);
  watch("out_b", ob, sizeof ob, 0);
  watch("lse_a", la, sizeof la, 0);
  watch("lse_b", lb, sizeof lb, 0);
  watch("out", out, sizeof out, 1);
  watch("lse", lse, sizeof lse, 1);
  base_ok(&op);
  common_cases(&op, (size_t)-1, 0);
  const tspec specs[] = {
      {"'out_a'", offsetof(merge_args, oa), A_T(0), M3S_I32, 0x4, 0},
      {"'lse_a'", offsetof(merge_args, la), A_T(1), M3S_BF16, 0x3, 0},
      {"'out_b'", offsetof(merge_args, ob), A_T(2), M3S_E4M3, 0x7, 0},
      {"'lse_b'", offsetof(merge_args, lb), A_T(3), M3S_F16, 0x3, 0},
      {"'out'", offsetof(merge_args, out), A_T(4), M3S_E5M2, 0x7, 1},
      {"'lse'", offsetof(merge_args, lse), 0, M3S_I32, 0x3, 1},
  };
  for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++)
    tensor_cases(&op, &specs[i]);
  merge_args a = base;
  a.oa.shape[0] = MT - 1;
  op_run(&op, &a, M3S_ERR_SHAPE, "'lse_a'", "out_a has T-1 rows (T, H are taken from out_a)");
  a = base;
  a.oa.shape[1] = MH - 1;
  op_run(&op, &a, M3S_ERR_SHAPE, "'lse_a'", "out_a has H-1 heads");
  a = base;
  a.null |= A_T(5);
  op_ok(&op, &a, "lse NULL");
  a = base;
  a.out = a.oa;
  watch_clear(); /* out_a is written by this call */
  op_ok(&op, &a, "out aliasing out_a exactly");
  exec_cases(&op, offsetof(merge_args, exec), NULL, -1, 0);
  recover(&op);
  group_end();
}

/* ------------------------------------------------------------------------
 * m3s_query_support / m3s_config_validate
 * ---------------------------------------------------------------------- */
static m3s_support_info g_info;
typedef struct {
  unsigned null;
  m3s_context *ctx;
  m3s_layer_config cfg;
  m3s_support_query q;
} qs_args;

static m3s_status call_qs(void *p) {
  qs_args *a = p;
  return m3s_query_support(NUL(a, A_CTX, a->ctx), NUL(a, A_CFG, &a->cfg), NUL(a, A_T(0), &a->q),
                           NUL(a, A_T(1), &g_info));
}

static void test_bad_query_support(void) {
  group_begin("m3s_query_support");
  qs_args base;
  memset(&base, 0, sizeof base);
  base.ctx = g_ctx, base.cfg = F.cfg;
  base.q.op = M3S_OP_ATTENTION_DECODE, base.q.act_dtype = M3S_BF16, base.q.kv_dtype = M3S_E4M3;
  base.q.index_dtype = M3S_BF16, base.q.per_slot_scales = 1, base.q.layout = M3S_LAYOUT_TOKEN_MAJOR;
  op_t op = {&base, sizeof base, call_qs};
  watch("info", &g_info, sizeof g_info, 1);
  base_ok(&op);
  CHECK(g_info.supported == 1 && g_info.kernel[0] && !g_info.reason[0],
        "base query supported on the CPU");
  common_cases(&op, offsetof(qs_args, cfg), 0);
  null_case(&op, A_T(0), "'query'", "query NULL");
  null_case(&op, A_T(1), "'info'", "info NULL");
  qs_args a = base;
  a.q.op = (m3s_op)99;
  op_run(&op, &a, M3S_ERR_INVALID, "query.op", "query.op = 99");
  a = base;
  a.q.op = (m3s_op)-1;
  op_run(&op, &a, M3S_ERR_INVALID, "query.op", "query.op = -1");
  a = base;
  a.q.layout = (m3s_cache_layout)3;
  op_run(&op, &a, M3S_ERR_INVALID, "query.layout", "query.layout = 3");
  /* an unsupported combination is not an error */
  a = base;
  a.q.act_dtype = M3S_F32;
  op_ok(&op, &a, "act_dtype f32: M3S_OK with supported == 0");
  CHECK(g_info.supported == 0 && g_info.reason[0] != '\0', "f32 activations reported unsupported");
  a = base;
  a.q.kv_dtype = M3S_I32;
  op_ok(&op, &a, "kv_dtype i32: M3S_OK with supported == 0");
  CHECK(g_info.supported == 0 && g_info.reason[0] != '\0', "i32 cache reported unsupported");
  a = base;
  a.q.index_dtype = (m3s_dtype)40;
  op_ok(&op, &a, "index_dtype 40 (not an enum value): M3S_OK with supported == 0");
  CHECK(g_info.supported == 0 && g_info.reason[0] != '\0', "dtype 40 reported unsupported");
  recover(&op);
  group_end();
}

static void test_bad_config_validate(void) {
  group_begin("m3s_config_validate");
  expect_err(m3s_config_validate(NULL), M3S_ERR_NULL, "'cfg'", "cfg NULL");
  m3s_layer_config bad[MAX_BADCFG];
  const char *names[MAX_BADCFG], *whats[MAX_BADCFG];
  int n = make_bad_configs(&F.cfg, bad, names, whats);
  for (int i = 0; i < n; i++) {
    m3s_layer_config c = bad[i];
    expect_err(m3s_config_validate(&c), M3S_ERR_INVALID, names[i], whats[i]);
    CHECK(memcmp(&c, &bad[i], sizeof c) == 0, "config untouched");
  }
  const int tps[] = {1, 2, 4, 8};
  for (int i = 0; i < 4; i++) {
    m3s_layer_config c = m3s_config_minimax_m3(tps[i]);
    expect_ok(m3s_config_validate(&c), "m3s_config_minimax_m3(1/2/4/8)");
  }
  m3s_layer_config c = F.cfg;
  c.topk = M3S_MAX_TOPK, c.init_blocks = 3, c.local_blocks = M3S_MAX_TOPK - 3;
  expect_ok(m3s_config_validate(&c), "topk = M3S_MAX_TOPK, init + local == topk");
  c = F.cfg;
  c.num_q_heads = M3S_MAX_HEADS, c.num_kv_heads = 1;
  expect_ok(m3s_config_validate(&c), "num_q_heads = M3S_MAX_HEADS");
  group_end();
}

/* ------------------------------------------------------------------------
 * m3s_cache_insert / m3s_index_cache_insert
 * ---------------------------------------------------------------------- */
static uint16_t g_k[NT * 2 * 128], g_v[NT * 2 * 128], g_ik[NT * 128];
static int64_t g_slots[NT];
static int32_t g_slots32[NT];

typedef struct {
  unsigned null;
  m3s_context *ctx;
  m3s_tensor k, v, slots, kv;
  m3s_kv_scales scales;
  m3s_exec exec;
} ins_args;

static m3s_status call_ins(void *p) {
  ins_args *a = p;
  return m3s_cache_insert(NUL(a, A_CTX, a->ctx), NUL(a, A_T(0), &a->k), NUL(a, A_T(1), &a->v),
                          NUL(a, A_T(2), &a->slots), NUL(a, A_T(3), &a->kv),
                          NUL(a, A_SCALES, &a->scales), NUL(a, A_EXEC, &a->exec));
}

static void fill_insert_inputs(void) {
  uint64_t rng = 5;
  for (int i = 0; i < NT * 2 * 128; i++)
    store_elem(g_k, M3S_BF16, i, rng_normal(&rng)), store_elem(g_v, M3S_BF16, i, rng_normal(&rng));
  for (int i = 0; i < NT * 128; i++)
    store_elem(g_ik, M3S_BF16, i, rng_normal(&rng));
  const int64_t s[NT] = {0, 129, 300, 7, -1};
  for (int i = 0; i < NT; i++)
    g_slots[i] = s[i], g_slots32[i] = (int32_t)s[i];
}

/* slot-value cases shared by both inserts (slot_off: the slot tensor) */
static void slot_value_cases(const op_t *op, size_t slot_off, int64_t num_pages) {
  unsigned char *a = malloc(op->size);
  m3s_tensor *t = (m3s_tensor *)(a + slot_off);
  int64_t lim = num_pages * 128;
  int64_t s64[NT];
  int32_t s32[NT];
  char what[128];
  memcpy(a, op->base, op->size);
  memcpy(s64, g_slots, sizeof s64);
  s64[2] = lim;
  t->data = s64;
  snprintf(what, sizeof what, "i64 slot == P*128 (%lld)", (long long)lim);
  op_run(op, a, M3S_ERR_RANGE, "slot_mapping[", what);
  s64[2] = INT64_MAX;
  op_run(op, a, M3S_ERR_RANGE, "slot_mapping[", "i64 slot INT64_MAX");
  memcpy(a, op->base, op->size);
  for (int i = 0; i < NT; i++)
    s32[i] = g_slots32[i];
  s32[4] = (int32_t)lim;
  *t = m3s_tensor_make(s32, M3S_I32, 1, (int64_t[]){NT}, M3S_HOST);
  op_run(op, a, M3S_ERR_RANGE, "slot_mapping[", "i32 slot == P*128");
  s32[4] = INT32_MAX;
  op_run(op, a, M3S_ERR_RANGE, "slot_mapping[", "i32 slot INT32_MAX");
  /* accepted: the last slot, and negative slots (skipped: nothing written) */
  memcpy(a, op->base, op->size);
  memcpy(s64, g_slots, sizeof s64);
  s64[2] = lim - 1;
  t->data = s64;
  op_ok(op, a, "slot == P*128 - 1");
  const int64_t negs[NT] = {-1, -2, -128, INT64_MIN, -lim};
  memcpy(a, op->base, op->size);
  memcpy(s64, negs, sizeof s64);
  t->data = s64;
  arm();
  op_ok(op, a, "negative slots are accepted");
  CHECK(first_changed() == NULL, "negative slots are skipped: the cache is unchanged");
  memcpy(a, op->base, op->size);
  for (int i = 0; i < NT; i++)
    s32[i] = i == 2 ? INT32_MIN : -1 - i;
  *t = m3s_tensor_make(s32, M3S_I32, 1, (int64_t[]){NT}, M3S_HOST);
  arm();
  op_ok(op, a, "negative i32 slots are accepted");
  CHECK(first_changed() == NULL, "negative i32 slots are skipped: the cache is unchanged");
  free(a);
}

static void test_bad_cache_insert(void) {
  group_begin("m3s_cache_insert");
  int64_t s3[3] = {NT, 2, 128};
  ins_args base;
  memset(&base, 0, sizeof base);
  base.null = A_SCALES;
  base.ctx = g_ctx;
  base.k = m3s_tensor_make(g_k, M3S_BF16, 3, s3, M3S_HOST);
  base.v = m3s_tensor_make(g_v, M3S_BF16, 3, s3, M3S_HOST);
  base.slots = m3s_tensor_make(g_slots, M3S_I64, 1, (int64_t[]){NT}, M3S_HOST);
  base.kv = F.kv;
  op_t op = {&base, sizeof base, call_ins};
  watch_fixture(&F, W_KV);
  watch("k", g_k, sizeof g_k, 0);
  watch("v", g_v, sizeof g_v, 0);
  watch("slot_mapping", g_slots, sizeof g_slots, 0);
  base_ok(&op);
  common_cases(&op, (size_t)-1, 0);
  const tspec specs[] = {
      {"'k'", offsetof(ins_args, k), A_T(0), M3S_F32, 0x6, 0},
      {"'v'", offsetof(ins_args, v), A_T(1), M3S_F16 /* != k's bf16 */, 0x7, 0},
      {"'slot_mapping'", offsetof(ins_args, slots), A_T(2), M3S_F32, 0x1, 0},
      {"'kv_cache'", offsetof(ins_args, kv), A_T(3), M3S_I32, 0xC, 1},
  };
  for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++)
    tensor_cases(&op, &specs[i]);
  ins_args a = base;
  a.kv.shape[1] = 1;
  op_run(&op, &a, M3S_ERR_SHAPE, "'k'", "kv_cache.shape[1] (Hkv) = 1, k has 2 heads");
  a = base;
  a.k.shape[0] = NT - 1;
  op_run(&op, &a, M3S_ERR_SHAPE, "'v'", "k has T-1 rows (T is taken from k)");
  a = base;
  a.kv.stride[1] = 128; /* head stride smaller than the 128 x 256 slots of a head */
  op_run(&op, &a, M3S_ERR_LAYOUT, "'kv_cache'", "kv_cache heads overlapping (stride[1] = 128)");
  slot_value_cases(&op, offsetof(ins_args, slots), F.num_pages);
  ignored_scale_case(&op, offsetof(ins_args, scales), offsetof(ins_args, slots));
  /* token-major cache view accepted */
  a = base;
  a.kv.stride[1] = 256, a.kv.stride[2] = 2 * 256;
  op_ok(&op, &a, "token-major [P, 128, Hkv, 256] cache passed as a permuted view");
  exec_cases(&op, offsetof(ins_args, exec), NULL, -1, 0);
  recover(&op);
  watch_clear();

  /* fp8 cache with per-(head, slot) scales */
  ins_args b8 = base;
  b8.null = 0;
  b8.kv = F8.kv, b8.scales = F8.scales;
  op_t op8 = {&b8, sizeof b8, call_ins};
  watch_fixture(&F8, W_KV);
  base_ok(&op8);
  scale_cases(&op8, offsetof(ins_args, scales));
  slot_value_cases(&op8, offsetof(ins_args, slots), F8.num_pages);
  group_end();
}

typedef struct {
  unsigned null;
  m3s_context *ctx;
  m3s_tensor ik, slots, ic;
  m3s_exec exec;
} iins_args;

static m3s_status call_iins(void *p) {
  iins_args *a = p;
  return m3s_index_cache_insert(NUL(a, A_CTX, a->ctx), NUL(a, A_T(0), &a->ik),
                                NUL(a, A_T(1), &a->slots), NUL(a, A_T(2), &a->ic),
                                NUL(a, A_EXEC, &a->exec));
}

static void test_bad_index_cache_insert(void) {
  group_begin("m3s_index_cache_insert");
  iins_args base;
  memset(&base, 0, sizeof base);
  base.ctx = g_ctx;
  base.ik = m3s_tensor_make(g_ik, M3S_BF16, 2, (int64_t[]){NT, 128}, M3S_HOST);
  base.slots = m3s_tensor_make(g_slots, M3S_I64, 1, (int64_t[]){NT}, M3S_HOST);
  base.ic = F.ic;
  op_t op = {&base, sizeof base, call_iins};
  watch_fixture(&F, W_IC);
  watch("ik", g_ik, sizeof g_ik, 0);
  watch("slot_mapping", g_slots, sizeof g_slots, 0);
  base_ok(&op);
  common_cases(&op, (size_t)-1, 0);
  const tspec specs[] = {
      {"'ik'", offsetof(iins_args, ik), A_T(0), M3S_E4M3, 0x2, 0},
      {"'slot_mapping'", offsetof(iins_args, slots), A_T(1), M3S_F16, 0x1, 0},
      {"'index_cache'", offsetof(iins_args, ic), A_T(2), M3S_F32, 0x6, 1},
  };
  for (size_t i = 0; i < sizeof specs / sizeof specs[0]; i++)
    tensor_cases(&op, &specs[i]);
  iins_args a = base;
  a.ik.shape[0] = NT - 1;
  op_run(&op, &a, M3S_ERR_SHAPE, "'slot_mapping'", "ik has T-1 rows (T is taken from ik)");
  a = base;
  a.ic.shape[0] = F.num_pages / 2, a.ic.stride[0] *= 2;
  op_run(&op, &a, M3S_ERR_LAYOUT, "'index_cache'", "index_cache not contiguous");
  slot_value_cases(&op, offsetof(iins_args, slots), F.num_pages);
  exec_cases(&op, offsetof(iins_args, exec), NULL, -1, 0);
  recover(&op);
  group_end();
}

/* ------------------------------------------------------------------------
 * m3s_tensor_narrow, status strings, versions
 * ---------------------------------------------------------------------- */
static void test_bad_tensor_narrow(void) {
  group_begin("m3s_tensor_narrow");
  static uint16_t buf[6 * 4 * 128];
  m3s_tensor t = m3s_tensor_make(buf, M3S_BF16, 3, (int64_t[]){6, 4, 128}, M3S_HOST);
  m3s_tensor saved = t;
  struct {
    const m3s_tensor *t;
    int64_t start, len;
    const char *what;
  } bad[] = {
      {NULL, 0, 1, "NULL tensor"},
      {&t, -1, 2, "start -1"},
      {&t, 0, -1, "len -1"},
      {&t, 5, 2, "start + len > shape[0]"},
      {&t, 7, 0, "start > shape[0]"},
      {&t, 0, 7, "len > shape[0]"},
      {&t, INT64_MAX, 1, "start INT64_MAX"},
      {&t, 1, INT64_MAX, "len INT64_MAX (start + len overflows)"},
      {&t, INT64_MIN, 2, "start INT64_MIN"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    m3s_tensor v = m3s_tensor_narrow(bad[i].t, bad[i].start, bad[i].len);
    char msg[128];
    snprintf(msg, sizeof msg, "[m3s_tensor_narrow] %s -> data NULL, ndim -1", bad[i].what);
    CHECK(v.data == NULL && v.ndim == -1, msg);
  }
  m3s_tensor s0 = m3s_tensor_make(buf, M3S_BF16, 0, NULL, M3S_HOST);
  m3s_tensor v = m3s_tensor_narrow(&s0, 0, 1);
  CHECK(v.data == NULL && v.ndim == -1, "[m3s_tensor_narrow] a scalar cannot be narrowed");
  m3s_tensor inv = m3s_tensor_narrow(NULL, 0, 0);
  v = m3s_tensor_narrow(&inv, 0, 0);
  CHECK(v.data == NULL && v.ndim == -1, "[m3s_tensor_narrow] narrowing an invalid view");
  m3s_tensor t5 = t;
  t5.ndim = M3S_MAX_DIMS + 1;
  v = m3s_tensor_narrow(&t5, 0, 1);
  CHECK(v.data == NULL && v.ndim == -1, "[m3s_tensor_narrow] ndim > M3S_MAX_DIMS");
  CHECK(memcmp(&saved, &t, sizeof t) == 0, "[m3s_tensor_narrow] the input view is untouched");
  /* valid */
  v = m3s_tensor_narrow(&t, 2, 3);
  CHECK(v.data == (void *)(buf + 2 * 4 * 128) && v.ndim == 3 && v.shape[0] == 3 &&
            v.shape[1] == 4 && v.stride[0] == 512 && v.dtype == M3S_BF16 && v.device == M3S_HOST,
        "[m3s_tensor_narrow] rows [2, 5)");
  v = m3s_tensor_narrow(&t, 6, 0);
  CHECK(v.ndim == 3 && v.shape[0] == 0, "[m3s_tensor_narrow] empty view at the end");
  /* that every operation rejects such a view is checked per tensor argument
   * by tensor_cases ("the invalid view of an out-of-range m3s_tensor_narrow") */
  group_end();
}

static void test_status_strings_and_version(void) {
  group_begin("m3s_status_string/version");
  static const char *names[] = {"M3S_OK",        "M3S_ERR_NULL",        "M3S_ERR_INVALID",
                                "M3S_ERR_SHAPE", "M3S_ERR_DTYPE",       "M3S_ERR_LAYOUT",
                                "M3S_ERR_RANGE", "M3S_ERR_DEVICE",      "M3S_ERR_WORKSPACE",
                                "M3S_ERR_BATCH", "M3S_ERR_UNSUPPORTED", "M3S_ERR_NO_MEMORY",
                                "M3S_ERR_CUDA",  "M3S_ERR_INTERNAL"};
  const int N = (int)(sizeof names / sizeof names[0]);
  CHECK(N == M3S_ERR_INTERNAL + 1, "all statuses listed");
  for (int i = 0; i < N; i++) {
    const char *s = m3s_status_string((m3s_status)i);
    char msg[128];
    snprintf(msg, sizeof msg, "m3s_status_string(%s) non-NULL, starts with its name", names[i]);
    CHECK(s != NULL && strncmp(s, names[i], strlen(names[i])) == 0 &&
              (s[strlen(names[i])] == ':' || s[strlen(names[i])] == '\0'),
          msg);
    for (int j = 0; j < i; j++)
      CHECK(s && m3s_status_string((m3s_status)j) &&
                strcmp(s, m3s_status_string((m3s_status)j)) != 0,
            "status strings are distinct");
  }
  CHECK(m3s_status_string((m3s_status)99) != NULL, "m3s_status_string(99) not NULL");
  CHECK(m3s_status_string((m3s_status)-1) != NULL, "m3s_status_string(-1) not NULL");
  CHECK(m3s_last_error() != NULL, "m3s_last_error() never NULL");
  CHECK(strcmp(m3s_version(), M3S_VERSION) == 0, "m3s_version() == M3S_VERSION");
  CHECK(m3s_version_number() == M3S_VERSION_NUMBER, "m3s_version_number() == M3S_VERSION_NUMBER");
  CHECK(M3S_VERSION_NUMBER ==
            M3S_VERSION_MAJOR * 1000000 + M3S_VERSION_MINOR * 1000 + M3S_VERSION_PATCH,
        "M3S_VERSION_NUMBER == MAJOR*1000000 + MINOR*1000 + PATCH");
  char vs[32];
  snprintf(vs, sizeof vs, "%d.%d.%d", M3S_VERSION_MAJOR, M3S_VERSION_MINOR, M3S_VERSION_PATCH);
  CHECK(strcmp(vs, M3S_VERSION) == 0, "M3S_VERSION == \"MAJOR.MINOR.PATCH\"");
  CHECK(m3s_dtype_size((m3s_dtype)77) == 0 && strcmp(m3s_dtype_name((m3s_dtype)77), "?") == 0,
        "unknown dtype: size 0, name \"?\"");
  group_end();
}

/* ------------------------------------------------------------------------
 * A CUDA context (only where a device exists): host tensors are
 * M3S_ERR_DEVICE, and so are tensors on another device ordinal.
 * ---------------------------------------------------------------------- */
static void test_gpu_context(void) {
  if (!g_gpu_ctx) {
    printf("%-26s skipped (no CUDA context: a build without CUDA or a machine without a GPU)\n",
           "m3s_gpu_context");
    g_tc.skipped++;
    return;
  }
  group_begin("m3s_gpu_context");
  topk_args a;
  memset(&a, 0, sizeof a);
  a.ctx = g_gpu_ctx, a.cfg = F.cfg, a.batch = F.batch, a.iq = F.iq, a.ic = F.ic, a.topk = F.topk;
  watch_fixture(&F, W_TOPK);
  arm();
  expect_err(call_topk(&a), M3S_ERR_DEVICE, "'index_cache'&cuda:0",
             "host tensors on a CUDA context");
  iins_args b;
  memset(&b, 0, sizeof b);
  b.ctx = g_gpu_ctx;
  b.ik = m3s_tensor_make(g_ik, M3S_BF16, 2, (int64_t[]){NT, 128}, 1);
  b.slots = m3s_tensor_make(g_slots, M3S_I64, 1, (int64_t[]){NT}, 1);
  b.ic = F.ic;
  b.ic.device = 1;
  arm();
  expect_err(call_iins(&b), M3S_ERR_DEVICE, "'index_cache'&cuda:1",
             "tensors on device 1 given to a device-0 context");
  rows_args r;
  memset(&r, 0, sizeof r);
  r.ctx = g_gpu_ctx, r.batch = F.batch;
  arm();
  expect_err(call_rows(&r), M3S_ERR_DEVICE, "batch.", "host batch on a CUDA context");
  size_t ws = 1;
  expect_ok(m3s_workspace_size(g_gpu_ctx, &F.cfg, 43, 600, &ws), "workspace size on CUDA");
  m3s_context_destroy(g_gpu_ctx);
  g_gpu_ctx = NULL;
  group_end();
}

/* ------------------------------------------------------------------------
 * Setup: fixtures and valid intermediate results.
 * ---------------------------------------------------------------------- */
static void setup(void) {
  CHECK(m3s_context_create(-1, &g_ctx) == M3S_OK, "CPU context");
  m3s_layer_config cfg = m3s_config_minimax_m3(1);
  cfg.num_q_heads = 4, cfg.num_kv_heads = 2, cfg.topk = 4;
  static const int32_t ql[2] = {2, 41}, sl[2] = {300, 600};
  fx_spec sp;
  memset(&sp, 0, sizeof sp);
  sp.cfg = cfg, sp.num_reqs = 2, sp.qlens = ql, sp.seqlens = sl, sp.uniform = 0;
  sp.act_dtype = M3S_BF16, sp.kv_dtype = M3S_BF16, sp.idx_dtype = M3S_BF16, sp.seed = 11;
  fx_init(&F, &sp);
  static const int32_t ql8[1] = {1}, sl8[1] = {130};
  fx_spec s8 = sp;
  s8.num_reqs = 1, s8.qlens = ql8, s8.seqlens = sl8, s8.uniform = 1;
  s8.kv_dtype = M3S_E4M3, s8.idx_dtype = M3S_E4M3, s8.scale_mode = 2, s8.seed = 8;
  fx_init(&F8, &s8);

  int64_t T = F.T, TK = T * 4;
  CHECK(m3s_index_topk(g_ctx, &F.cfg, &F.batch, &F.iq, &F.ic, &F.topk, NULL) == M3S_OK,
        "setup: top-k");
  g_tk = malloc(sizeof(int32_t) * (size_t)(T * 8));
  memcpy(g_tk, F.topk_mem, sizeof(int32_t) * (size_t)(T * 8));
  CHECK(m3s_index_topk(g_ctx, &F8.cfg, &F8.batch, &F8.iq, &F8.ic, &F8.topk, NULL) == M3S_OK,
        "setup: fp8 top-k");
  g_tk8 = malloc(sizeof(int32_t) * (size_t)(F8.T * 8));
  memcpy(g_tk8, F8.topk_mem, sizeof(int32_t) * (size_t)(F8.T * 8));

  g_rp = calloc(2 * (CSR_ROWS + 1), sizeof(int32_t));
  g_qi = calloc((size_t)(2 * TK), sizeof(int32_t));
  g_qs = calloc((size_t)(2 * TK), sizeof(int32_t));
  g_qc = calloc((size_t)(T * 2), sizeof(int32_t));
  m3s_tensor tk = m3s_tensor_make(g_tk, M3S_I32, 3, (int64_t[]){T, 2, 4}, M3S_HOST);
  m3s_tensor rp = m3s_tensor_make(g_rp, M3S_I32, 2, (int64_t[]){2, CSR_ROWS + 1}, M3S_HOST);
  m3s_tensor qi = m3s_tensor_make(g_qi, M3S_I32, 2, (int64_t[]){2, TK}, M3S_HOST);
  m3s_tensor qs = m3s_tensor_make(g_qs, M3S_I32, 2, (int64_t[]){2, TK}, M3S_HOST);
  m3s_tensor qc = m3s_tensor_make(g_qc, M3S_I32, 2, (int64_t[]){T, 2}, M3S_HOST);
  CHECK(m3s_build_k2q_csr(g_ctx, &F.cfg, &F.batch, &tk, &rp, &qi, &qs, &qc, NULL) == M3S_OK,
        "setup: CSR");
  g_po = calloc((size_t)(T * 4 * 4 * 128), sizeof(float));
  g_pl = calloc((size_t)(T * 16), sizeof(float));
  m3s_tensor po = m3s_tensor_make(g_po, M3S_F32, 4, (int64_t[]){T, 4, 4, 128}, M3S_HOST);
  m3s_tensor pl = m3s_tensor_make(g_pl, M3S_F32, 3, (int64_t[]){T, 4, 4}, M3S_HOST);
  CHECK(m3s_k2q_attention(g_ctx, &F.cfg, &F.batch, &F.q, &F.kv, NULL, &rp, &qi, &qs, &po, &pl,
                          NULL) == M3S_OK,
        "setup: k2q partials");
  fill_insert_inputs();
  if (g_tc.failed)
    fprintf(stderr, "setup failed: %s\n", m3s_last_error());
}

static void teardown(void) {
  fx_free(&F);
  fx_free(&F8);
  free(g_tk), free(g_tk8), free(g_rp), free(g_qi), free(g_qs), free(g_qc), free(g_po), free(g_pl);
  m3s_context_destroy(g_ctx);
}

int main(void) {
  setup();
  test_status_strings_and_version();
  test_bad_tensor_narrow();
  test_bad_config_validate();
  test_bad_context_create();
  test_bad_context_set_logging();
  test_bad_context_option();
  test_bad_plan_step();
  test_bad_workspace_size();
  test_bad_query_support();
  test_bad_index_topk();
  test_bad_sparse_attention();
  test_bad_step_forward();
  test_bad_k2q_csr_rows();
  test_bad_build_k2q_csr();
  test_bad_k2q_attention();
  test_bad_combine_partials();
  test_bad_merge_attn_states();
  test_bad_cache_insert(); /* writes the fixture caches: keep these last */
  test_bad_index_cache_insert();
  test_gpu_context();
  teardown();
  return TEST_FINISH();
}
