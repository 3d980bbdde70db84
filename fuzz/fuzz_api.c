/* fuzz_api.c -- libFuzzer harness over the public C API of m3sparse, CPU
 * backend (issue 5). Build: fuzz/CMakeLists.txt (clang only); run: fuzz/run.sh.
 *
 * The input is a byte stream that this file decodes, in order, into one
 * operation and all of its arguments: a layer config, a batch description
 * (number of requests, query and sequence lengths, uniform or ragged, a
 * query_start_loc base, block tables, page pools), dtypes, layouts (contiguous,
 * permuted, padded strides), top-k rows, slot mappings, CSR arrays, fp8 scales,
 * and mutations that make the call invalid (NULL pointers, wrong ndim / dtype /
 * device / shape, negative or overflowing strides, overlapping outputs, NULL
 * data, bad config fields, inconsistent batch counts, out-of-range values read
 * from index tensors). Bulk data (activations, caches) comes from a PRNG seeded
 * by the input. Bytes past the end of the input read as 0, and 0 always means
 * "no mutation", so a short input is a small valid call.
 *
 * Invariants (a violation prints what broke and calls __builtin_trap(), which
 * libFuzzer reports as a crash):
 *   1. no crash, no ASan / UBSan report (the build aborts on the first one);
 *   2. every buffer the library sees lies inside a larger allocation with 64
 *      guard bytes of a pattern before and after; they are intact after every
 *      call (also catches writes ASan cannot see, inside the allocation);
 *   3. inputs are never modified;
 *   4. a rejected call (status != M3S_OK) leaves every output byte untouched,
 *      and m3s_last_error() is non-empty and names the function; an accepted
 *      call leaves m3s_last_error() == "";
 *   5. an accepted call writes only the elements it documents (output views;
 *      not the padding between rows of a strided view, not the q_indices tail
 *      past row_ptr[g][R], not the partial slots no CSR entry names, only the
 *      slots a cache insert maps);
 *   6. the harness knows, for each input, whether the call MUST succeed (no
 *      mutation: a nominal valid call), MUST fail (a mutation the header or
 *      validate.c says is rejected) or may do either ("chaos" mutations of
 *      index values); status must agree;
 *   7. accepted calls on small "nice" data (values k/4, |k| <= 8, so every fp32
 *      dot product of the indexer is exact) agree with an fp64 reference in this
 *      file: index top-k exactly (also with NaN / +-inf keys and queries),
 *      attention / k2q partials / combine / merge to rel L2 < 1e-2 (k2q 1e-3),
 *      cache inserts exactly; rows without visible keys give out 0, lse -inf;
 *      every top-k row has the SPEC 3 structure on any data;
 *   8. determinism and batch independence on the CPU: a request's rows from a
 *      batch call equal (bit for bit) the rows of a call with that request
 *      alone (through m3s_tensor_narrow views, which also exercises
 *      query_start_loc[0] != 0), and m3s_step_forward equals separate
 *      m3s_index_topk + m3s_sparse_attention calls on its two parts bit for bit.
 *
 * Sizes stay tiny (T <= 64, Hq <= 16, contexts <= 3000 tokens, a work budget)
 * so one execution takes milliseconds.
 *
 * Environment: M3S_FUZZ_TRACE=1 prints one line per API call (op, expectation,
 * status, error text); M3S_FUZZ_STATS=file rewrites call statistics to file
 * every 4096 inputs, on a violation and at exit; M3S_FUZZ_AVOID_KNOWN=1 steers
 * the decoder away from the input classes of the open library bugs listed in
 * docs/reliability.md section 4 (so a long run can look for new ones while
 * those are open); M3S_FUZZ_AVOID_KNOWN=0x.. avoids only the bugs of a mask
 * (bit n-1 = bug n; see the AVOID(n) branches). */
#include "m3sparse.h"

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

/* ======================================================================== */
/* failure reporting, statistics                                            */
/* ======================================================================== */
static const char *g_op = "";
static const char *g_fn = "";
static int g_trace;
/* Known library bugs (docs/reliability.md) whose input classes the decoder can
 * avoid, so that a run keeps looking for new ones: bit n-1 = bug n. */
static unsigned g_avoid;
#define AVOID(n) ((g_avoid >> ((n)-1)) & 1u)
static m3s_status g_st;

static void write_stats(void);
static void die(const char *fmt, ...) {
  va_list ap;
  write_stats();
  fprintf(stderr, "\n==== m3s-fuzz: INVARIANT VIOLATED (op %s, call %s): ", g_op, g_fn);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\n     last status %d (%s)\n     m3s_last_error: \"%s\"\n", (int)g_st,
          m3s_status_string(g_st), m3s_last_error());
  fflush(stderr);
  __builtin_trap();
}

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
  NOPS
};
static const char *k_opname[NOPS] = {
    "plan_step",     "cache_insert",  "index_cache_insert", "index_topk",       "sparse_attention",
    "step_forward",  "build_k2q_csr", "k2q_attention",      "combine_partials", "merge_attn_states",
    "tensor_narrow", "misc",          "k2q_chain"};
static struct {
  unsigned long long inputs, skipped, calls, ok, rejected, must_ok, must_fail, any, ref_rows, indep,
      op_calls[NOPS], op_rej[NOPS];
  double op_sec[NOPS];
} S;
static const char *g_stats_path;

static void write_stats(void) {
  if (!g_stats_path)
    return;
  FILE *f = fopen(g_stats_path, "w");
  if (!f)
    return;
  fprintf(f, "inputs %llu\nskipped_inputs %llu\napi_calls %llu\naccepted %llu\nrejected %llu\n",
          S.inputs, S.skipped, S.calls, S.ok, S.rejected);
  fprintf(f, "expected_ok %llu\nexpected_fail %llu\nexpected_any %llu\n", S.must_ok, S.must_fail,
          S.any);
  fprintf(f, "reference_rows_checked %llu\nbatch_independence_checks %llu\n", S.ref_rows, S.indep);
  for (int i = 0; i < NOPS; i++)
    fprintf(f, "op %-20s calls %llu rejected %llu seconds %.1f\n", k_opname[i], S.op_calls[i],
            S.op_rej[i], S.op_sec[i]);
  fclose(f);
}

/* ======================================================================== */
/* input reader and PRNG                                                    */
/* ======================================================================== */
static const uint8_t *g_in;
static size_t g_in_n, g_in_i;

static unsigned rb(void) { return g_in_i < g_in_n ? g_in[g_in_i++] : 0u; }
static unsigned rb16(void) {
  unsigned a = rb();
  return a | rb() << 8;
}
static uint32_t rb32(void) {
  uint32_t a = rb16();
  return a | (uint32_t)rb16() << 16;
}
static uint64_t rb64(void) {
  uint64_t a = rb32();
  return a | (uint64_t)rb32() << 32;
}
/* 0 .. n-1 (n <= 65536) */
static int rpick(int n) {
  if (n <= 1)
    return 0;
  return n <= 256 ? (int)(rb() % (unsigned)n) : (int)(rb16() % (unsigned)n);
}
/* true with probability ~pct%; a zero byte is always false */
static int rchance(int pct) { return (int)rb() >= 256 - (pct * 256) / 100; }

static uint64_t g_rng;
static uint64_t rnd(void) {
  uint64_t z = (g_rng += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
static int rndn(int n) { return n <= 1 ? 0 : (int)(rnd() % (uint64_t)n); }

/* ======================================================================== */
/* number formats (independent of src/cpu/convert.c)                        */
/* ======================================================================== */
static double dec_bf16(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static double dec_f16(uint16_t h) {
  int e = (h >> 10) & 31, m = h & 1023;
  double v = e == 31 ? (m ? NAN : INFINITY) : e == 0 ? ldexp(m, -24) : ldexp(1024 + m, e - 25);
  return (h & 0x8000) ? -v : v;
}
static double dec_e4m3(uint8_t b) {
  int e = (b >> 3) & 15, m = b & 7;
  double v = (e == 15 && m == 7) ? NAN : e == 0 ? ldexp(m, -9) : ldexp(8 + m, e - 10);
  return (b & 0x80) ? -v : v;
}
static double dec_e5m2(uint8_t b) {
  int e = (b >> 2) & 31, m = b & 3;
  double v = e == 31 ? (m ? NAN : INFINITY) : e == 0 ? ldexp(m, -16) : ldexp(4 + m, e - 17);
  return (b & 0x80) ? -v : v;
}
/* Element size; an invalid dtype (the harness makes some) sizes as 1 byte. */
static size_t esz(m3s_dtype dt) {
  size_t z = m3s_dtype_size(dt);
  return z ? z : 1;
}
static double dec(const void *p, m3s_dtype dt) {
  uint16_t h;
  float f;
  switch (dt) {
  case M3S_BF16: memcpy(&h, p, 2); return dec_bf16(h);
  case M3S_F16: memcpy(&h, p, 2); return dec_f16(h);
  case M3S_F32: memcpy(&f, p, 4); return f;
  case M3S_E4M3: return dec_e4m3(*(const uint8_t *)p);
  case M3S_E5M2: return dec_e5m2(*(const uint8_t *)p);
  default: return 0;
  }
}
/* Exact encoding of a value known to be representable (the "nice" grid). */
static void enc(void *p, m3s_dtype dt, double v) {
  switch (dt) {
  case M3S_BF16: {
    float f = (float)v;
    uint32_t u;
    memcpy(&u, &f, 4);
    uint16_t h = (uint16_t)(u >> 16);
    if (isnan(v))
      h = 0x7FC0;
    memcpy(p, &h, 2);
    break;
  }
  case M3S_F16: {
    uint16_t h, s = signbit(v) ? 0x8000 : 0;
    double a = fabs(v);
    if (isnan(v))
      h = 0x7E00;
    else if (isinf(v))
      h = s | 0x7C00;
    else if (a == 0)
      h = s;
    else {
      int e;
      double f = frexp(a, &e); /* a = f 2^e, f in [0.5, 1) */
      int E = e + 14;
      if (E >= 1)
        h = (uint16_t)(s | E << 10 | ((int)(f * 2048) - 1024));
      else
        h = (uint16_t)(s | (int)(a * 16777216.0));
    }
    memcpy(p, &h, 2);
    break;
  }
  case M3S_F32: {
    float f = (float)v;
    memcpy(p, &f, 4);
    break;
  }
  case M3S_E4M3:
  case M3S_E5M2: {
    int mb = dt == M3S_E4M3 ? 3 : 2, bias = dt == M3S_E4M3 ? 7 : 15;
    uint8_t s = signbit(v) ? 0x80 : 0, code = 0x7F;
    double a = fabs(v);
    if (!isnan(v) && !isinf(v)) {
      int e;
      double f = frexp(a, &e); /* a = f 2^e, f in [0.5, 1) */
      int E = e - 1 + bias;
      if (a == 0)
        code = s;
      else if (E >= 1)
        code = (uint8_t)(s | E << mb | (int)((2 * f - 1) * (1 << mb)));
      else
        code = (uint8_t)(s | (int)ldexp(a, bias - 1 + mb));
    }
    *(uint8_t *)p = code;
    break;
  }
  default: break;
  }
  if (!isnan(v) && dec(p, dt) != v)
    die("harness: value %g is not exact in dtype %d", v, (int)dt);
}
static void put_nan(void *p, m3s_dtype dt) {
  static const uint16_t bf = 0x7FC0, hf = 0x7E00;
  static const uint32_t ff = 0x7FC00000u;
  switch (dt) {
  case M3S_BF16: memcpy(p, &bf, 2); break;
  case M3S_F16: memcpy(p, &hf, 2); break;
  case M3S_F32: memcpy(p, &ff, 4); break;
  case M3S_E4M3:
  case M3S_E5M2: *(uint8_t *)p = 0x7F; break;
  default: break;
  }
}
/* nice values: k/4, |k| <= 8: exact in bf16, f16, e4m3 and e5m2; products are
 * multiples of 1/16 below 4, so 128-term fp32 dot products are exact. */
static double grid(void) { return (double)(rndn(17) - 8) / 4.0; }

/* ======================================================================== */
/* guarded buffers                                                          */
/* ======================================================================== */
typedef struct {
  unsigned char *mem, *data, *snap, *allow;
  size_t bytes;
  int out;
  const char *name;
} buf_t;
static buf_t g_b[MAX_BUFS];
static int g_nb, g_skip;
static size_t g_total;
static unsigned char g_dummy[GUARD * 2 + 16];

static unsigned char pat(size_t i) { return (unsigned char)(0xC3u ^ (unsigned)(i * 37u)); }

static buf_t *balloc(const char *name, size_t bytes) {
  if (g_nb == MAX_BUFS || bytes > MAX_BUF_BYTES || g_total + bytes > MAX_TOTAL_BYTES) {
    g_skip = 1;
    static buf_t dummy;
    memset(&dummy, 0, sizeof dummy);
    dummy.mem = g_dummy;
    dummy.data = g_dummy + GUARD;
    dummy.name = "dummy";
    return &dummy;
  }
  buf_t *b = &g_b[g_nb++];
  memset(b, 0, sizeof *b);
  b->mem = (unsigned char *)malloc(bytes + 2 * GUARD);
  b->snap = (unsigned char *)malloc(bytes + 1);
  if (!b->mem || !b->snap) {
    fprintf(stderr, "m3s-fuzz: out of memory\n");
    abort();
  }
  b->data = b->mem + GUARD;
  b->bytes = bytes;
  b->name = name;
  g_total += bytes;
  for (size_t i = 0; i < GUARD; i++) {
    b->mem[i] = pat(i);
    b->data[bytes + i] = pat(GUARD + i);
  }
  for (size_t i = 0; i < bytes; i += 8) {
    uint64_t r = rnd();
    memcpy(b->data + i, &r, bytes - i < 8 ? bytes - i : 8);
  }
  return b;
}

static void bfree_all(void) {
  for (int i = 0; i < g_nb; i++) {
    free(g_b[i].mem);
    free(g_b[i].snap);
    free(g_b[i].allow);
  }
  g_nb = 0;
  g_total = 0;
}

static void check_guards(void) {
  for (int i = 0; i < g_nb; i++) {
    buf_t *b = &g_b[i];
    for (size_t j = 0; j < GUARD; j++) {
      if (b->mem[j] != pat(j))
        die("guard zone BEFORE buffer '%s' overwritten at byte -%zu", b->name, GUARD - j);
      if (b->data[b->bytes + j] != pat(GUARD + j))
        die("guard zone AFTER buffer '%s' (%zu bytes) overwritten at byte +%zu", b->name, b->bytes,
            j);
    }
  }
}

/* ======================================================================== */
/* tensor arguments                                                         */
/* ======================================================================== */
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

static int g_alias_in; /* an input view aliases itself (stride 0): skip numeric checks */

static void strides_for(int nd, const int64_t *shape, const int *order, const int *pad,
                        int64_t *stride) {
  int64_t st = 1;
  for (int i = nd - 1; i >= 0; i--) {
    int d = order[i];
    stride[d] = st;
    /* torch-style strides for empty dims (numpy / m3s_tensor_make style when
     * avoiding known bug 3) */
    int64_t s = shape[d] > 0 ? shape[d] : AVOID(3) ? 0 : 1;
    st *= s + pad[i];
  }
}

static int64_t numel_of(const m3s_tensor *t, int nd) {
  int64_t n = 1;
  for (int i = 0; i < nd; i++) {
    if (t->shape[i] == 0)
      return 0;
    if (t->shape[i] < 0 || __builtin_mul_overflow(n, t->shape[i], &n))
      return INT64_MAX;
  }
  return n;
}

/* Contiguous row-major: every dimension of size > 1 steps over the ones inside. */
static int is_contig(const m3s_tensor *t, int nd) {
  if (numel_of(t, nd) == 0 && !AVOID(3)) /* known bug 3: the library disagrees */
    return 1;
  int64_t want = 1;
  for (int i = nd - 1; i >= 0; i--) {
    if (t->shape[i] > 1 && t->stride[i] != want)
      return 0;
    want *= t->shape[i];
  }
  return 1;
}

/* extent in elements of an honest view; -1 on overflow */
static int64_t extent_of(const m3s_tensor *t, int nd) {
  int64_t e = 0;
  for (int i = 0; i < nd; i++) {
    if (t->shape[i] == 0)
      return 0;
    int64_t x;
    if (t->shape[i] < 0 || t->stride[i] < 0 ||
        __builtin_mul_overflow(t->shape[i] - 1, t->stride[i], &x) ||
        __builtin_add_overflow(e, x, &e))
      return -1;
  }
  return e + 1;
}

static void mk(targ *a, const tspec *s, int *ex) {
  memset(a, 0, sizeof *a);
  a->name = s->name;
  a->ndim = s->ndim;
  m3s_tensor *t = &a->t;
  t->dtype = s->dt;
  t->ndim = s->ndim;
  t->device = M3S_HOST;
  for (int i = 0; i < s->ndim; i++)
    a->shape[i] = t->shape[i] = s->shape[i];
  /* layout */
  int order[4] = {0, 1, 2, 3}, pad[4] = {0, 0, 0, 0};
  if (s->perm && rchance(50))
    memcpy(order, s->perm, sizeof order);
  else if (s->ndim >= 3 && rchance(8)) {
    int a0 = rpick(s->ndim - 1), a1 = rpick(s->ndim - 1);
    int tmp = order[a0];
    order[a0] = order[a1];
    order[a1] = tmp;
  }
  if (rchance(25))
    for (int i = 0; i < s->ndim - 1; i++)
      pad[i] = rpick(4);
  if (AVOID(3) && numel_of(t, s->ndim) == 0) /* known bug 3 */
    for (int i = 0; i < 4; i++)
      order[i] = i;
  strides_for(s->ndim, t->shape, order, pad, t->stride);
  int nd = s->ndim, last = nd - 1;
  size_t es = esz(s->dt);
  int mut = rchance(s->mut_pct) ? 1 + rpick(M_COUNT - 1) : M_NONE;
  int fail = 0, dishonest = 0;
  switch (mut) {
  case M_NULL: fail = !s->optional; break;
  case M_NDIM: {
    int v;
    do
      v = rpick(7) - 1;
    while (v == nd);
    t->ndim = v;
    fail = 1;
    break;
  }
  case M_DTYPE: {
    static const int cand[10] = {0, 1, 2, 3, 4, 5, 6, 7, 42, -3};
    int c = cand[rpick(10)];
    if (c >= 0 && c <= 6 && (s->ok_dtypes & MASK(c))) {
      mut = M_NONE;
      break;
    }
    t->dtype = (m3s_dtype)c;
    fail = 1;
    dishonest = 1;
    break;
  }
  case M_DEVICE:
    t->device = rpick(3);
    fail = 1;
    break;
  case M_SHAPE: {
    if (nd == 0) {
      mut = M_NONE;
      break;
    }
    int d = rpick(nd);
    if (s->free_dims & (1u << d)) {
      mut = M_NONE;
      break;
    }
    int64_t v = t->shape[d] + (rchance(50) || t->shape[d] == 0 ? 1 + rpick(3) : -1);
    t->shape[d] = v;
    strides_for(nd, t->shape, order, pad, t->stride);
    fail = 1;
    break;
  }
  case M_NEGSHAPE:
    if (nd == 0) {
      mut = M_NONE;
      break;
    }
    t->shape[rpick(nd)] = -1 - rpick(3);
    fail = 1;
    dishonest = 1;
    break;
  case M_NEGSTRIDE: {
    if (nd == 0) {
      mut = M_NONE;
      break;
    }
    int d = rpick(nd);
    t->stride[d] = -t->stride[d] - 1 - rpick(4);
    fail = 1;
    dishonest = 1;
    break;
  }
  case M_INNER:
    if (nd == 0) {
      mut = M_NONE;
      break;
    }
    t->stride[last] = rchance(50) ? 0 : 2 + rpick(3);
    fail = t->shape[last] > 1;
    if (!fail && t->stride[last] == 0)
      break;
    break;
  case M_OVERFLOW: {
    int d = -1;
    for (int i = 0; i < nd; i++)
      if (t->shape[i] >= 2 && (d < 0 || rchance(50)))
        d = i;
    if (d < 0) {
      mut = M_NONE;
      break;
    }
    int64_t lim = INT64_MAX / (int64_t)es / (t->shape[d] - 1);
    if (lim > INT64_MAX - 1001 ||             /* offsets of this dimension cannot overflow */
        (AVOID(4) && numel_of(t, nd) == 0)) { /* known bug 4 */
      mut = M_NONE;
      break;
    }
    t->stride[d] = lim + 1 + rpick(1000);
    fail = d == last || numel_of(t, nd) != 0; /* the innermost-stride rule comes first */
    dishonest = 1;
    break;
  }
  case M_DATANULL:
    if (AVOID(5) && numel_of(t, nd) == 0 &&
        (!strcmp(s->name, "q_indices") || !strcmp(s->name, "q_slot"))) {
      mut = M_NONE; /* known bug 5: NULL + 0 in m3s_cpu_build_k2q_csr */
      break;
    }
    fail = numel_of(t, nd) != 0;
    break;
  case M_ZSTRIDE: {
    if (nd == 0) {
      mut = M_NONE;
      break;
    }
    int d = rpick(nd);
    if (t->shape[d] <= 1) {
      mut = M_NONE;
      break;
    }
    t->stride[d] = 0;
    fail = s->out || d == last;
    if (numel_of(t, nd) == 0 && d != last) {
      /* an empty view has no elements to overlap (bug 3: the library's
       * overlap rule disagrees, its contiguity rule agrees) */
      fail = 0;
      if (AVOID(3) && s->out)
        *ex |= EX_ANY;
    }
    if (!s->out)
      g_alias_in = 1;
    /* an index tensor read through a zero stride shows other values than
     * the ones the harness wrote (the last row written wins): any status */
    if (!s->out && s->checked && (s->dt == M3S_I32 || s->dt == M3S_I64))
      *ex |= EX_ANY;
    break;
  }
  case M_HUGE:
    if (!(s->free_dims & 1u) || s->out || nd == 0) {
      mut = M_NONE;
      break;
    }
    static const int e2[6] = {33, 40, 48, 56, 60, 62};
    t->shape[0] = ((int64_t)1 << e2[rpick(6)]) + rpick(1000);
    t->stride[0] = 0;
    g_alias_in = 1; /* every page is page 0 */
    break;
  case M_BADVIEW:
    *t = m3s_tensor_narrow(NULL, 0, 0);
    if (t->ndim != -1 || t->data)
      die("m3s_tensor_narrow(NULL) did not return the invalid view");
    fail = 1;
    dishonest = 1;
    break;
  }
  a->mut = mut;
  if (!fail && s->contig && t->ndim == nd && !is_contig(t, nd))
    fail = 1;
  if (fail && s->checked)
    *ex |= EX_FAIL;
  /* allocation: honest views get exactly their extent (plus a little slack) */
  int64_t ext;
  if (dishonest || t->ndim != nd) {
    m3s_tensor n = *t;
    for (int i = 0; i < nd; i++)
      n.shape[i] = a->shape[i];
    strides_for(nd, n.shape, order, pad, n.stride);
    ext = extent_of(&n, nd);
    dishonest = 1;
  } else {
    ext = extent_of(t, nd);
  }
  if (ext < 0 || (uint64_t)ext > MAX_BUF_BYTES) {
    g_skip = 1;
    ext = 0;
  }
  size_t slack = rchance(20) ? (size_t)rpick(4) * es : 0;
  a->b = balloc(s->name, (size_t)ext * es + slack);
  t->data = a->b->data;
  if (mut == M_DATANULL)
    t->data = NULL;
  if (mut == M_BADVIEW)
    t->data = NULL;
  a->p = mut == M_NULL ? NULL : t;
  a->broken = dishonest || mut == M_NULL || mut == M_DATANULL || mut == M_BADVIEW;
}

/* element offset of idx (nominal rank) through the actual view, or -1 */
static int64_t toff(const targ *a, const int64_t *idx) {
  if (g_skip || a->broken || a->t.ndim != a->ndim || !a->t.data)
    return -1;
  int64_t off = 0;
  for (int i = 0; i < a->ndim; i++) {
    if (idx[i] < 0 || idx[i] >= a->t.shape[i])
      return -1;
    off += idx[i] * a->t.stride[i];
  }
  size_t es = esz(a->t.dtype);
  int64_t byte = (int64_t)((unsigned char *)a->t.data - a->b->data) + off * (int64_t)es;
  if (byte < 0 || (size_t)byte + es > a->b->bytes)
    die("harness: element of '%s' outside its buffer", a->name);
  return off;
}
static void *tptr(const targ *a, const int64_t *idx) {
  int64_t o = toff(a, idx);
  return o < 0 ? NULL : (unsigned char *)a->t.data + o * (int64_t)esz(a->t.dtype);
}
static void tsetf(const targ *a, const int64_t *idx, double v) {
  void *p = tptr(a, idx);
  if (p)
    enc(p, a->t.dtype, v);
}
static double tgetf(const targ *a, const int64_t *idx) {
  void *p = tptr(a, idx);
  return p ? dec(p, a->t.dtype) : NAN;
}
static void tseti(const targ *a, const int64_t *idx, int64_t v) {
  void *p = tptr(a, idx);
  if (!p)
    return;
  if (a->t.dtype == M3S_I64)
    memcpy(p, &v, 8);
  else {
    int32_t w = (int32_t)v;
    memcpy(p, &w, 4);
  }
}
static int64_t tgeti(const targ *a, const int64_t *idx) {
  void *p = tptr(a, idx);
  if (!p)
    return INT64_MIN;
  if (a->t.dtype == M3S_I64) {
    int64_t v;
    memcpy(&v, p, 8);
    return v;
  }
  int32_t w;
  memcpy(&w, p, 4);
  return w;
}
#define I4(a, b, c, d) ((const int64_t[4]){(a), (b), (c), (d)})

/* n consecutive innermost elements starting at idx (stride 1, in bounds), or NULL */
static unsigned char *trow(const targ *a, const int64_t *idx, int64_t n) {
  unsigned char *p = (unsigned char *)tptr(a, idx);
  if (!p || a->t.stride[a->ndim - 1] != 1 || idx[a->ndim - 1] + n > a->t.shape[a->ndim - 1])
    return NULL;
  return p;
}
static void row_get(const targ *a, const int64_t *idx, int n, double *dst) {
  unsigned char *p = trow(a, idx, n);
  size_t es = esz(a->t.dtype);
  int64_t j[4] = {idx[0], idx[1], idx[2], idx[3]};
  for (int i = 0; i < n; i++) {
    if (p) {
      dst[i] = dec(p + (size_t)i * es, a->t.dtype);
    } else {
      j[a->ndim - 1] = idx[a->ndim - 1] + i;
      dst[i] = tgetf(a, j);
    }
  }
}
static void row_set_grid(const targ *a, const int64_t *idx, int n) {
  unsigned char *p = trow(a, idx, n);
  size_t es = esz(a->t.dtype);
  int64_t j[4] = {idx[0], idx[1], idx[2], idx[3]};
  for (int i = 0; i < n; i++) {
    if (p) {
      enc(p + (size_t)i * es, a->t.dtype, grid());
    } else {
      j[a->ndim - 1] = idx[a->ndim - 1] + i;
      tsetf(a, j, grid());
    }
  }
}

/* Fill the whole buffer of a float tensor: nice values, NaN poison, or raw bytes. */
static void fill_nice(const targ *a) {
  if (!a->b || a->broken)
    return;
  size_t es = esz(a->t.dtype);
  if (a->t.dtype > M3S_I64 || (int)a->t.dtype < 0)
    return;
  for (size_t i = 0; i + es <= a->b->bytes; i += es)
    enc(a->b->data + i, a->t.dtype, grid());
}
static void fill_nan(const targ *a) {
  if (!a->b || a->broken)
    return;
  size_t es = esz(a->t.dtype);
  if (a->t.dtype > M3S_I64 || (int)a->t.dtype < 0)
    return;
  for (size_t i = 0; i + es <= a->b->bytes; i += es)
    put_nan(a->b->data + i, a->t.dtype);
}

/* ---- allowed-write maps ---- */
static void allow_elem(const targ *a, int64_t off) {
  size_t es = esz(a->t.dtype);
  buf_t *b = a->b;
  if (!b->allow)
    b->allow = (unsigned char *)calloc(b->bytes + 1, 1);
  int64_t byte = (int64_t)((unsigned char *)a->t.data - b->data) + off * (int64_t)es;
  if (byte < 0 || (size_t)byte + es > b->bytes)
    die("harness: allowed element of '%s' outside its buffer", a->name);
  memset(b->allow + byte, 1, es);
}
static void allow_idx(const targ *a, const int64_t *idx) {
  int64_t o = toff(a, idx);
  if (o >= 0)
    allow_elem(a, o);
}
static void allow_view(const targ *a) {
  if (!a || !a->p || a->broken)
    return;
  int64_t sh[4] = {1, 1, 1, 1};
  for (int d = 0; d < a->ndim; d++)
    sh[d] = a->t.shape[d];
  for (int64_t i0 = 0; i0 < sh[0]; i0++)
    for (int64_t i1 = 0; i1 < sh[1]; i1++)
      for (int64_t i2 = 0; i2 < sh[2]; i2++)
        for (int64_t i3 = 0; i3 < sh[3]; i3++)
          allow_idx(a, I4(i0, i1, i2, i3));
}
static void check_allowed(void) {
  for (int i = 0; i < g_nb; i++) {
    buf_t *b = &g_b[i];
    if (!b->out)
      continue;
    for (size_t j = 0; j < b->bytes; j++)
      if (b->data[j] != b->snap[j] && !(b->allow && b->allow[j]))
        die("accepted call wrote byte %zu of output '%s' (%zu bytes), outside what it documents", j,
            b->name, b->bytes);
    free(b->allow);
    b->allow = NULL;
  }
}

/* ======================================================================== */
/* the call protocol                                                        */
/* ======================================================================== */
static int g_opi;

static void outputs(const targ *const *list, int n) {
  for (int i = 0; i < g_nb; i++)
    g_b[i].out = 0;
  for (int i = 0; i < n; i++)
    if (list[i] && list[i]->b)
      list[i]->b->out = 1;
}
#define OUTPUTS(...)                                                                               \
  do {                                                                                             \
    const targ *_l[] = {__VA_ARGS__};                                                              \
    outputs(_l, (int)(sizeof _l / sizeof _l[0]));                                                  \
  } while (0)

static clock_t g_t0;
static void pre_call(const char *fn) {
  g_fn = fn;
  g_t0 = clock();
  check_guards();
  for (int i = 0; i < g_nb; i++)
    memcpy(g_b[i].snap, g_b[i].data, g_b[i].bytes);
}

static void post_call(m3s_status st, int ex) {
  g_st = st;
  S.calls++;
  S.op_calls[g_opi]++;
  const char *err = m3s_last_error();
  if (g_trace)
    fprintf(stderr, "[m3s-fuzz] %-18s %-24s expect %-4s -> %2d (%.3f s) %s\n", g_op, g_fn,
            (ex & EX_FAIL)  ? "FAIL"
            : (ex & EX_ANY) ? "ANY"
                            : "OK",
            (int)st, (double)(clock() - g_t0) / CLOCKS_PER_SEC, err ? err : "(null)");
  if (!err)
    die("m3s_last_error() returned NULL");
  check_guards();
  for (int i = 0; i < g_nb; i++) {
    buf_t *b = &g_b[i];
    if ((st != M3S_OK || !b->out) && memcmp(b->snap, b->data, b->bytes) != 0) {
      size_t j = 0;
      while (b->snap[j] == b->data[j])
        j++;
      die("%s call modified %s '%s' at byte %zu", st != M3S_OK ? "rejected" : "accepted",
          b->out ? "output" : "input", b->name, j);
    }
  }
  if (st != M3S_OK) {
    S.rejected++;
    S.op_rej[g_opi]++;
    if (!err[0])
      die("call failed with status %d but m3s_last_error() is empty", (int)st);
    if (strncmp(err, "m3s_", 4) != 0)
      die("error text does not name the function");
    if ((int)st < 1 || (int)st > 13)
      die("status %d is not an m3s_status value", (int)st);
  } else {
    S.ok++;
    if (err[0])
      die("call succeeded but m3s_last_error() is \"%s\"", err);
  }
  if (ex & EX_FAIL) {
    S.must_fail++;
    if (st == M3S_OK)
      die("the input holds a mutation the API must reject, but the call returned M3S_OK");
  } else if (ex & EX_ANY) {
    S.any++;
  } else {
    S.must_ok++;
    if (st != M3S_OK)
      die("a valid call was rejected");
  }
}

#define CALL(fnexpr, ex, expr) (pre_call(fnexpr), g_st = (expr), post_call(g_st, (ex)), g_st)

static m3s_context *g_ctx;
static m3s_context *pick_ctx(int *ex) {
  if (rchance(2)) {
    *ex |= EX_FAIL;
    return NULL;
  }
  return g_ctx;
}
static unsigned char g_ws[512];
static m3s_exec g_exec;
static const m3s_exec *pick_exec(void) {
  switch (rpick(4)) {
  case 1: g_exec = (m3s_exec){NULL, 0, NULL}; return &g_exec;
  case 2: g_exec = (m3s_exec){g_ws, sizeof g_ws, (void *)(uintptr_t)0x1}; return &g_exec;
  case 3: g_exec = (m3s_exec){NULL, 12345, (void *)(uintptr_t)0xdeadbeef}; return &g_exec;
  default: return NULL;
  }
}

/* ======================================================================== */
/* layer config                                                             */
/* ======================================================================== */
typedef struct {
  m3s_layer_config c;
  const m3s_layer_config *p;
  int nice; /* softmax scale in a range where fp32 and fp64 agree closely */
} cfg_t;

static void gen_cfg(cfg_t *C, int *ex) {
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
} bat;

static int64_t g_budget = WORK_BUDGET;

static int64_t need_pages(int s) { return s > 0 ? ((int64_t)s + BS - 1) / BS : 0; }

/* kind: 0 any, 1 uniform decode, 2 ragged */
static void gen_batch_desc(bat *B, int kind, int hq, int hkv, int topk) {
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
static void assign_pages(bat **list, int n) {
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

/* Tensors of a batch, mutations of its counts and values. */
static void mk_batch(bat *B, int uses_main, int uses_idx, int allow_null, int *ex) {
  int nonempty = B->num_reqs > 0 || B->T > 0;
  int mutate = rchance(12);
  int kind = mutate ? rpick(16) : -1;
  if (kind == 15)
    B->chaos = 1;
  int nr = B->num_reqs;
  /* count and value mutations that the API must reject */
  int maxn = 0, maxs = 0, rn2 = -1, rpage = -1;
  for (int r = 0; r < nr; r++) {
    maxn = B->n[r] > maxn ? B->n[r] : maxn;
    maxs = B->s[r] > maxs ? B->s[r] : maxs;
    if (B->n[r] >= 2 && B->s[r] > 0)
      rn2 = r;
    if (B->s[r] > 0)
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
      int c = rpick((int)need_pages(B->s[rpage]));
      int64_t bad = rchance(50) ? -1 - rpick(10) : (kind == 8 ? B->P : B->Pi) + rpick(10);
      if (kind == 8 || B->same_table)
        B->bt[rpage][c] = (int32_t)bad;
      if (kind == 9 || B->same_table)
        B->ibt[rpage][c] = (int32_t)bad;
      *ex |= EX_FAIL;
    }
    break;
  case 10:
  case 11:
    if (maxs >= 1 && (kind == 10 ? uses_main : uses_idx)) {
      int64_t mp = need_pages(maxs);
      if (kind == 10 || B->same_table)
        B->cols = (int)mp - 1;
      if (kind == 11 || B->same_table)
        B->icols = (int)mp - 1;
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
              {nr, B->cols},
              0,
              0,
              2u,
              nonempty && (uses_main || (B->same_table && uses_idx)),
              mp,
              NULL,
              0};
  tspec sit = {"batch.index_block_table", M3S_I32, MASK(M3S_I32), 2, {nr, B->icols}, 0, 0, 2u,
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
    for (int c = 0; c < B->cols; c++)
      tseti(&B->tt, I4(r, c, 0, 0), B->bt[r][c]);
    if (!B->same_table)
      for (int c = 0; c < B->icols; c++)
        tseti(&B->tit, I4(r, c, 0, 0), B->ibt[r][c]);
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
static int64_t bpos(const bat *B, int r, int64_t i) {
  if (B->s[r] <= 0 || B->s[r] < B->n[r])
    return -1;
  return B->s[r] - B->n[r] + i;
}

/* ======================================================================== */
/* fp8 scales                                                               */
/* ======================================================================== */
typedef struct {
  targ k, v;
  m3s_kv_scales s;
  const m3s_kv_scales *p;
  int mode[2]; /* per side: 0 = scale 1 (no data), 1 = scalar, 2 = per (head, slot) */
  int nice;
  int fp8; /* scales only apply to fp8 caches */
} scl_t;

static void gen_scales(scl_t *S_, m3s_dtype cdt, int hkv, int64_t P, int nice, int *ex) {
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

static double scale_at(const scl_t *S_, int is_v, int64_t g, int64_t slot) {
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
/* fp64 references                                                          */
/* ======================================================================== */
/* rank order of SPEC 3: higher score first, NaN below every real score, equal
 * scores by lower block id */
static int ranks_before(double sa, int a, double sb, int b) {
  if (isnan(sa) != isnan(sb))
    return isnan(sb);
  if (!isnan(sa) && sa != sb)
    return sa > sb;
  return a < b;
}

static int forced(const m3s_layer_config *c, int64_t b, int64_t nb) {
  return b < c->init_blocks || b >= nb - c->local_blocks;
}

/* The index cache decoded once, [P][128][128] (pages of the nominal pool). */
static double *decode_ic(const targ *ic, int64_t P) {
  double *v = (double *)malloc(sizeof(double) * (size_t)(P * BS * D + 1));
  for (int64_t p = 0; p < P; p++)
    for (int j = 0; j < BS; j++)
      row_get(ic, I4(p, j, 0, 0), D, v + (p * BS + j) * D);
  return v;
}

/* Reference selection of row (request r, index i), index head g. */
static int ref_topk(const m3s_layer_config *c, const bat *B, const targ *iq, const double *ic,
                    int64_t row_base, int r, int64_t i, int g, int32_t *ids) {
  int64_t pos = bpos(B, r, i);
  if (pos < 0)
    return 0;
  int64_t nb = pos / BS + 1, L = pos + 1;
  int n = 0;
  if (nb <= c->topk) {
    for (int64_t b = 0; b < nb; b++)
      ids[n++] = (int32_t)b;
    return n;
  }
  static double sc[MAX_COLS];
  static int cand[MAX_COLS];
  int nc = 0;
  int64_t t = row_base + B->row0[r] + i;
  double q[D];
  row_get(iq, I4(t, g, 0, 0), D, q);
  for (int64_t b = 0; b < nb; b++) {
    if (forced(c, b, nb)) {
      ids[n++] = (int32_t)b;
      continue;
    }
    int64_t page = B->ibt[r][b];
    double best = NAN;
    for (int64_t j = b * BS; j < (b + 1) * BS && j < L; j++) {
      double s = 0;
      const double *k = ic + (page * BS + j % BS) * D;
      for (int d = 0; d < D; d++)
        s += q[d] * k[d];
      if (!isnan(s) && (isnan(best) || s > best))
        best = s;
    }
    sc[b] = best;
    cand[nc++] = (int)b;
  }
  /* selection sort of the candidates by rank */
  int want = c->topk - n;
  for (int k = 0; k < want && k < nc; k++) {
    int bi = k;
    for (int x = k + 1; x < nc; x++)
      if (ranks_before(sc[cand[x]], cand[x], sc[cand[bi]], cand[bi]))
        bi = x;
    int tmp = cand[k];
    cand[k] = cand[bi];
    cand[bi] = tmp;
    ids[n++] = cand[k];
  }
  for (int x = 1; x < n; x++)
    for (int y = x; y > 0 && ids[y] < ids[y - 1]; y--) {
      int32_t tmp = ids[y];
      ids[y] = ids[y - 1];
      ids[y - 1] = tmp;
    }
  return n;
}

/* Checks the top-k rows of a batch (rows row_base + ...) : the SPEC 3 format
 * always, the exact reference when exact != 0. */
static void check_topk_rows(const m3s_layer_config *c, const bat *B, const targ *iq, const targ *ic,
                            const targ *tk, int64_t row_base, int exact) {
  int K = c->topk;
  double *icd = exact ? decode_ic(ic, B->Pi) : NULL;
  for (int r = 0; r < B->num_reqs; r++)
    for (int64_t i = 0; i < B->n[r]; i++) {
      int64_t t = row_base + B->row0[r] + i, pos = bpos(B, r, i);
      for (int g = 0; g < c->num_kv_heads; g++) {
        int32_t got[M3S_MAX_TOPK], want[M3S_MAX_TOPK];
        for (int k = 0; k < K; k++)
          got[k] = (int32_t)tgeti(tk, I4(t, g, k, 0));
        if (pos < 0) {
          for (int k = 0; k < K; k++)
            if (got[k] != -1)
              die("top-k row %lld head %d of a padded request: entry %d = %d, want -1",
                  (long long)t, g, k, got[k]);
          continue;
        }
        int64_t nb = pos / BS + 1, kk = nb < K ? nb : K;
        for (int k = 0; k < K; k++) {
          if (k >= kk) {
            if (got[k] != -1)
              die("top-k row %lld head %d: entry %d = %d past min(K, nb) = %lld, want -1",
                  (long long)t, g, k, got[k], (long long)kk);
          } else if (got[k] < 0 || got[k] >= nb || (k > 0 && got[k] <= got[k - 1])) {
            die("top-k row %lld head %d: entry %d = %d is not an ascending id < nb = %lld",
                (long long)t, g, k, got[k], (long long)nb);
          }
        }
        for (int64_t b = 0; b < nb; b++)
          if (forced(c, b, nb)) {
            int found = 0;
            for (int k = 0; k < kk; k++)
              found |= got[k] == b;
            if (!found)
              die("top-k row %lld head %d misses forced block %lld (nb %lld)", (long long)t, g,
                  (long long)b, (long long)nb);
          }
        if (exact) {
          int n = ref_topk(c, B, iq, icd, row_base, r, i, g, want);
          S.ref_rows++;
          if (n != kk)
            die("harness: reference selected %d blocks, want %lld", n, (long long)kk);
          for (int k = 0; k < n; k++)
            if (got[k] != want[k])
              die("top-k row %lld (request %d, pos %lld) head %d entry %d: got %d, fp64 "
                  "reference %d",
                  (long long)t, r, (long long)pos, g, k, got[k], want[k]);
        }
      }
    }
  free(icd);
}

typedef struct {
  const m3s_layer_config *c;
  const bat *B;
  const targ *q, *kv, *tk;
  const scl_t *sc;
  int64_t row_base;
  float *kvd; /* decoded cache with scales applied, [P][Hkv][128][256] */
} attn_in;

static void attn_decode(attn_in *A) {
  int64_t P = A->B->P;
  int hkv = A->c->num_kv_heads;
  A->kvd = (float *)malloc(sizeof(float) * (size_t)(P * hkv * BS * 2 * D + 1));
  const bat *B = A->B;
  double tmp[2 * D];
  for (int r = 0; r < B->num_reqs; r++) /* only keys that exist: positions < seq_len */
    for (int64_t pos = 0; pos < B->s[r]; pos++) {
      int64_t p = B->bt[r][pos / BS], j = pos % BS;
      if (p < 0 || p >= P)
        continue;
      for (int g = 0; g < hkv; g++) {
        double ks = scale_at(A->sc, 0, g, p * BS + j), vs = scale_at(A->sc, 1, g, p * BS + j);
        float *row = A->kvd + ((p * hkv + g) * BS + j) * 2 * D;
        row_get(A->kv, I4(p, g, j, 0), 2 * D, tmp);
        for (int d = 0; d < 2 * D; d++)
          row[d] = (float)(tmp[d] * (d < D ? ks : vs));
      }
    }
}

/* fp64 attention over the keys j <= pos of the blocks in ids[0..n). Returns
 * the number of keys. */
static int64_t ref_attend(const attn_in *A, int r, int64_t pos, int64_t t, int h,
                          const int32_t *ids, int n, double *out, double *lse) {
  int G = A->c->num_q_heads / A->c->num_kv_heads, g = h / G;
  double q[D], m = -INFINITY;
  row_get(A->q, I4(t, h, 0, 0), D, q);
  static double sc[M3S_MAX_TOPK * BS];
  static int64_t slot_of[M3S_MAX_TOPK * BS], page_of[M3S_MAX_TOPK * BS];
  int64_t nk = 0, hkv = A->c->num_kv_heads;
  for (int k = 0; k < n; k++) {
    if (ids[k] < 0)
      continue;
    int64_t page = A->B->bt[r][ids[k]];
    for (int64_t j = (int64_t)ids[k] * BS; j < ((int64_t)ids[k] + 1) * BS && j <= pos; j++) {
      int64_t off = j % BS;
      const float *kr = A->kvd + ((page * hkv + g) * BS + off) * 2 * D;
      double s = 0;
      for (int d = 0; d < D; d++)
        s += q[d] * kr[d];
      s *= (double)A->c->softmax_scale;
      sc[nk] = s;
      slot_of[nk] = off;
      page_of[nk] = page;
      nk++;
      m = s > m ? s : m;
    }
  }
  for (int d = 0; d < D; d++)
    out[d] = 0;
  if (nk == 0) {
    *lse = -INFINITY;
    return 0;
  }
  double l = 0;
  for (int64_t x = 0; x < nk; x++) {
    double p = exp(sc[x] - m);
    l += p;
    const float *vr = A->kvd + ((page_of[x] * hkv + g) * BS + slot_of[x]) * 2 * D + D;
    for (int d = 0; d < D; d++)
      out[d] += p * vr[d];
  }
  for (int d = 0; d < D; d++)
    out[d] /= l;
  *lse = m + log(l);
  return nk;
}

/* Checks out/lse rows of an attention call over the batch's top-k rows. */
static void check_attn_rows(attn_in *A, const targ *out, const targ *lse, int numeric) {
  if (numeric)
    attn_decode(A);
  const m3s_layer_config *c = A->c;
  const bat *B = A->B;
  int K = c->topk, G = c->num_q_heads / c->num_kv_heads;
  double err2 = 0, ref2 = 0;
  for (int r = 0; r < B->num_reqs; r++)
    for (int64_t i = 0; i < B->n[r]; i++) {
      int64_t t = A->row_base + B->row0[r] + i, pos = bpos(B, r, i);
      for (int h = 0; h < c->num_q_heads; h++) {
        int32_t ids[M3S_MAX_TOPK];
        int n = 0;
        if (pos >= 0) {
          int64_t nb = pos / BS + 1, kk = nb < K ? nb : K;
          for (int k = 0; k < kk; k++)
            ids[n++] = (int32_t)tgeti(A->tk, I4(t, h / G, k, 0));
        }
        int empty = 1;
        for (int k = 0; k < n; k++)
          empty &= ids[k] < 0;
        if (empty) {
          for (int d = 0; d < D; d++)
            if (tgetf(out, I4(t, h, d, 0)) != 0)
              die("attention row %lld head %d has no visible key but out[%d] = %g", (long long)t, h,
                  d, tgetf(out, I4(t, h, d, 0)));
          if (lse && lse->p && !(tgetf(lse, I4(t, h, 0, 0)) == -INFINITY))
            die("attention row %lld head %d has no visible key but lse = %g", (long long)t, h,
                tgetf(lse, I4(t, h, 0, 0)));
          continue;
        }
        if (!numeric)
          continue;
        double ro[D], rl;
        ref_attend(A, r, pos, t, h, ids, n, ro, &rl);
        S.ref_rows++;
        double re2 = 0, rr2 = 0, go[D];
        row_get(out, I4(t, h, 0, 0), D, go);
        for (int d = 0; d < D; d++) {
          double e = go[d] - ro[d];
          re2 += e * e;
          rr2 += ro[d] * ro[d];
        }
        err2 += re2;
        ref2 += rr2;
        if (!(re2 <= 2.5e-3 * rr2 + 1e-6 * D))
          die("attention row %lld (request %d, pos %lld) head %d: rel L2 error %.3g vs fp64 "
              "(abs %.3g)",
              (long long)t, r, (long long)pos, h, sqrt(re2 / (rr2 + 1e-300)), sqrt(re2));
        if (lse && lse->p) {
          double gl = tgetf(lse, I4(t, h, 0, 0));
          if (!(fabs(gl - rl) <= 1e-3 * (1 + fabs(rl))))
            die("attention row %lld (request %d, pos %lld) head %d: lse %.9g, fp64 reference "
                "%.9g",
                (long long)t, r, (long long)pos, h, gl, rl);
        }
      }
    }
  if (!(err2 <= 1e-4 * ref2 + 1e-10))
    die("attention: global rel L2 error %.3g vs the fp64 reference (limit 1e-2)",
        sqrt(err2 / (ref2 + 1e-300)));
  free(A->kvd);
  A->kvd = NULL;
}

/* Random valid top-k rows (distinct ids < nb and -1 holes among the first
 * min(K, nb) entries, in random order; junk after), plus mutations. */
static void fill_topk_input(int hkv, int K, const bat *B, const targ *tk, int64_t row_base,
                            int *ex) {
  if (!tk->b || tk->broken)
    return;
  for (size_t i = 0; i + 4 <= tk->b->bytes; i += 4) {
    int32_t v = rndn(3) == 0 ? (int32_t)rnd() : rndn(40) - 2;
    memcpy(tk->b->data + i, &v, 4);
  }
  int holes = rchance(30);
  for (int r = 0; r < B->num_reqs; r++)
    for (int64_t i = 0; i < B->n[r]; i++) {
      int64_t pos = bpos(B, r, i), t = row_base + B->row0[r] + i;
      if (pos < 0)
        continue;
      int64_t nb = pos / BS + 1, kk = nb < K ? nb : K;
      for (int g = 0; g < hkv; g++) {
        int32_t pool[MAX_COLS];
        for (int b = 0; b < nb && b < MAX_COLS; b++)
          pool[b] = b;
        for (int64_t b = nb - 1; b > 0; b--) {
          int j = rndn((int)b + 1);
          int32_t x = pool[b];
          pool[b] = pool[j];
          pool[j] = x;
        }
        for (int k = 0; k < kk; k++)
          tseti(tk, I4(t, g, k, 0), holes && rndn(4) == 0 ? -1 : pool[k]);
      }
    }
  if (rchance(10)) { /* a value the API must reject, or chaos */
    int which = rpick(5);
    int r0 = -1;
    for (int r = 0; r < B->num_reqs; r++)
      if (bpos(B, r, 0) >= 0 && B->n[r] > 0 && (r0 < 0 || rchance(50)))
        r0 = r;
    if (which == 4) {
      *ex |= EX_ANY;
      for (int k = 0, n = 1 + rpick(6); k < n && tk->b->bytes >= 4; k++) {
        int32_t v = rchance(50) ? (int32_t)rnd() : rpick(40) - 3;
        size_t at = (size_t)rndn((int)(tk->b->bytes / 4)) * 4;
        memcpy(tk->b->data + at, &v, 4);
      }
    } else if (r0 >= 0) {
      int64_t i = rpick(B->n[r0]), t = row_base + B->row0[r0] + i, pos = bpos(B, r0, i);
      int64_t nb = pos / BS + 1, kk = nb < K ? nb : K;
      int g = rpick(hkv), k = rpick((int)kk);
      int32_t bad;
      if (which == 0)
        bad = (int32_t)nb + rpick(5);
      else if (which == 1)
        bad = -2 - rpick(5);
      else if (which == 2)
        bad = INT32_MIN + rpick(3);
      else {
        bad = -5;
        if (kk >= 2) { /* a duplicate */
          int k2 = (k + 1 + rpick((int)kk - 1)) % (int)kk;
          int32_t id = (int32_t)tgeti(tk, I4(t, g, k2, 0));
          if (id < 0) {
            id = (int32_t)rpick((int)nb);
            tseti(tk, I4(t, g, k2, 0), id);
          }
          bad = id;
        }
      }
      tseti(tk, I4(t, g, k, 0), bad);
      *ex |= EX_FAIL;
    }
  }
}

/* Caches: every element NaN, then nice (or raw) values at the positions < s
 * of every request; keys after a query's position stay finite but must be
 * masked; pages outside the tables stay NaN. */
static void fill_kv(const bat *B, const targ *kv, int hkv, int nice, int poison) {
  if (!kv->b || kv->broken)
    return;
  if (!nice)
    return; /* raw random bytes from balloc */
  if (poison)
    fill_nan(kv);
  for (int r = 0; r < B->num_reqs; r++)
    for (int64_t p = 0; p < B->s[r]; p++) {
      int64_t page = B->bt[r][p / BS];
      for (int g = 0; g < hkv; g++)
        row_set_grid(kv, I4(page, g, p % BS, 0), 2 * D);
    }
}
static void fill_ic(const bat *B, const targ *ic, int nice, int inject, int poison) {
  if (!ic->b || ic->broken || !nice)
    return;
  if (poison)
    fill_nan(ic);
  for (int r = 0; r < B->num_reqs; r++)
    for (int64_t p = 0; p < B->s[r]; p++) {
      int64_t page = B->ibt[r][p / BS];
      row_set_grid(ic, I4(page, p % BS, 0, 0), D);
    }
  for (int k = 0; inject && k < 1 + rndn(6); k++) { /* NaN / inf keys */
    int r = rndn(B->num_reqs > 0 ? B->num_reqs : 1);
    if (r >= B->num_reqs || B->s[r] <= 0)
      continue;
    int64_t p = rndn(B->s[r]), page = B->ibt[r][p / BS];
    double v = rndn(3) == 0 ? NAN : rndn(2) ? INFINITY : -INFINITY;
    if (ic->t.dtype == M3S_E4M3)
      v = NAN;
    if (rndn(3) == 0) /* the whole key */
      for (int d = 0; d < D; d++)
        tsetf(ic, I4(page, p % BS, d, 0), v);
    else
      tsetf(ic, I4(page, p % BS, rndn(D), 0), v);
  }
}
static void fill_act(const targ *a, int nice, int inject) {
  if (!a->b || a->broken || !nice)
    return;
  fill_nice(a);
  size_t es = esz(a->t.dtype);
  for (int k = 0; inject && k < 1 + rndn(4) && a->b->bytes >= es; k++) {
    size_t at = (size_t)rndn((int)(a->b->bytes / es)) * es;
    double v = rndn(3) == 0 ? NAN : rndn(2) ? INFINITY : -INFINITY;
    enc(a->b->data + at, a->t.dtype, v);
  }
}

/* ======================================================================== */
/* operations                                                               */
/* ======================================================================== */
static const int PERM_HM[4] = {1, 0, 2, 3}; /* top-k stored head-major [Hkv, T, K] */
static const int PERM_TM[4] = {0, 2, 1, 3}; /* K/V cache token-major [P, 128, Hkv, 256] */
static const m3s_dtype KV_DT[4] = {M3S_BF16, M3S_F16, M3S_E4M3, M3S_E5M2};
#define KV_MASK (ACT | MASK(M3S_E4M3) | MASK(M3S_E5M2))
#define IDX_MASK (MASK(M3S_BF16) | MASK(M3S_E4M3))

/* sizes that are safe for allocation even when the config is invalid */
static void safe_dims(const m3s_layer_config *c, int *hq, int *hkv, int *K) {
  *hkv = c->num_kv_heads >= 1 && c->num_kv_heads <= 16 ? c->num_kv_heads : 1;
  *hq = c->num_q_heads >= 1 && c->num_q_heads <= 64 ? c->num_q_heads : *hkv;
  *K = c->topk >= 1 && c->topk <= M3S_MAX_TOPK ? c->topk : 4;
}

static m3s_tensor tnarrow(const targ *a, int64_t start, int64_t len) {
  m3s_tensor r = m3s_tensor_narrow(&a->t, start, len);
  if (r.ndim < 0)
    die("harness: m3s_tensor_narrow(%s, %lld, %lld) failed", a->name, (long long)start,
        (long long)len);
  return r;
}

/* A fresh, valid output tensor (no mutation). */
static void mk_out(targ *a, const char *name, m3s_dtype dt, int nd, int64_t s0, int64_t s1,
                   int64_t s2, int64_t s3) {
  int ex = 0;
  tspec sp = {name, dt, MASK(dt), nd, {s0, s1, s2, s3}, 1, 0, 0, 1, 0, NULL, 0};
  mk(a, &sp, &ex);
}

static void cmp_bits(const targ *a, int64_t ra, const targ *b, int64_t rb_, int64_t rows,
                     const char *what) {
  int64_t sh[4] = {1, 1, 1, 1};
  for (int d = 1; d < a->ndim; d++)
    sh[d] = a->t.shape[d];
  size_t es = esz(a->t.dtype);
  for (int64_t i = 0; i < rows; i++)
    for (int64_t x = 0; x < sh[1]; x++)
      for (int64_t y = 0; y < sh[2]; y++)
        for (int64_t z = 0; z < sh[3]; z++) {
          void *pa = tptr(a, I4(ra + i, x, y, z)), *pb = tptr(b, I4(rb_ + i, x, y, z));
          if (pa && pb && memcmp(pa, pb, es) != 0)
            die("%s: row %lld [%lld][%lld][%lld] differs bitwise from row %lld of the other call",
                what, (long long)(ra + i), (long long)x, (long long)y, (long long)z,
                (long long)(rb_ + i));
        }
}

/* The batch made of request r alone, through narrowed views. */
static void narrow_or_keep(m3s_tensor *t, int64_t start, int64_t len) {
  int64_t x;
  if (AVOID(6) && t->ndim >= 1 && t->ndim <= 4 && t->data &&
      (__builtin_mul_overflow(start, t->stride[0], &x) ||
       __builtin_mul_overflow(x, (int64_t)m3s_dtype_size(t->dtype), &x)))
    return; /* known bug 6 (an unused, dishonest view) */
  m3s_tensor n = m3s_tensor_narrow(t, start, len);
  if (n.ndim >= 0) /* (tensors the operation does not read may be anything) */
    *t = n;
}
static m3s_batch sub_batch(const bat *B, int r) {
  m3s_batch sb = B->b;
  sb.num_reqs = 1;
  sb.num_tokens = B->n[r];
  sb.seq_lens = tnarrow(&B->ts, r, 1);
  if (!B->uniform)
    sb.query_start_loc = tnarrow(&B->tq, r, 2);
  narrow_or_keep(&sb.block_table, r, 1);
  narrow_or_keep(&sb.index_block_table, r, 1);
  return sb;
}
static int pick_req(const bat *B) {
  int r0 = -1;
  for (int r = 0; r < B->num_reqs; r++)
    if (B->n[r] > 0 && (r0 < 0 || rndn(2)))
      r0 = r;
  return r0;
}

/* ---------------------------------------------------------------- top-k */
static void op_index_topk(void) {
  int ex = 0, hq, hkv, K;
  cfg_t C;
  gen_cfg(&C, &ex);
  safe_dims(&C.c, &hq, &hkv, &K);
  bat B;
  gen_batch_desc(&B, 0, hq, hkv, K);
  bat *L[1] = {&B};
  assign_pages(L, 1);
  int nice = !rchance(20), inject = nice && rchance(25);
  m3s_dtype adt = rchance(30) ? M3S_F16 : M3S_BF16, idt = rchance(30) ? M3S_E4M3 : M3S_BF16;
  mk_batch(&B, 0, 1, 1, &ex);
  tspec siq = {"iq", adt, ACT, 3, {B.T, hkv, D}, 0, 0, 0, 1, 8, NULL, 0};
  tspec sic = {"index_cache", idt, IDX_MASK, 3, {B.Pi, BS, D}, 0, 1, 1u, 1, 8, NULL, 0};
  tspec stk = {"topk", M3S_I32, MASK(M3S_I32), 3, {B.T, hkv, K}, 1, 0, 0, 1, 8, PERM_HM, 0};
  targ iq, ic, tk;
  mk(&iq, &siq, &ex);
  mk(&ic, &sic, &ex);
  mk(&tk, &stk, &ex);
  fill_act(&iq, nice, inject);
  fill_ic(&B, &ic, nice, inject, 1);
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip)
    return;
  OUTPUTS(&tk);
  m3s_status st = CALL("m3s_index_topk", ex, m3s_index_topk(ctx, C.p, B.p, iq.p, ic.p, tk.p, e));
  if (st)
    return;
  allow_view(&tk);
  check_allowed();
  if (ex)
    return;
  check_topk_rows(&C.c, &B, &iq, &ic, &tk, 0, nice && !g_alias_in);
  int r = pick_req(&B);
  if (r >= 0 && B.num_reqs > 1 && rndn(5) < 2) { /* the request alone gives the same rows */
    S.indep++;
    m3s_batch sb = sub_batch(&B, r);
    m3s_tensor iq2 = tnarrow(&iq, B.row0[r], B.n[r]);
    targ tk2;
    mk_out(&tk2, "topk(alone)", M3S_I32, 3, B.n[r], hkv, K, 0);
    if (g_skip)
      return;
    OUTPUTS(&tk2);
    CALL("m3s_index_topk(alone)", 0, m3s_index_topk(g_ctx, &C.c, &sb, &iq2, &ic.t, &tk2.t, NULL));
    allow_view(&tk2);
    check_allowed();
    cmp_bits(&tk2, 0, &tk, B.row0[r], B.n[r], "index_topk: request alone vs in its batch");
  }
}

/* ------------------------------------------------------------ attention */
typedef struct {
  cfg_t C;
  int hq, hkv, K, nice;
  m3s_dtype adt, kdt;
  targ q, kv, tk, out, lse;
  scl_t sc;
} attn_fx;

/* q, kv (+ scales) for batches sharing one page pool */
static void mk_q_kv(attn_fx *F, int64_t T, int64_t P, int *ex) {
  F->adt = rchance(30) ? M3S_F16 : M3S_BF16;
  F->kdt = KV_DT[rpick(4)];
  tspec sq = {"q", F->adt, ACT, 3, {T, F->hq, D}, 0, 0, 0, 1, 8, NULL, 0};
  tspec skv = {"kv_cache", F->kdt, KV_MASK, 4, {P, F->hkv, BS, 2 * D}, 0, 0, 1u, 1, 8, PERM_TM, 0};
  mk(&F->q, &sq, ex);
  mk(&F->kv, &skv, ex);
  gen_scales(&F->sc, F->kdt, F->hkv, P, F->nice, ex);
  int fp8 = F->kdt == M3S_E4M3 || F->kdt == M3S_E5M2;
  if (F->kv.mut == M_HUGE && fp8 && F->sc.p) {
    if (AVOID(1) && F->kv.t.shape[0] >= ((int64_t)1 << 55))
      F->kv.t.shape[0] = ((int64_t)1 << 55) - 1; /* known bug 1: P * 128 overflows */
    if (F->sc.mode[0] == 2 || F->sc.mode[1] == 2)
      *ex |= EX_FAIL; /* the per-slot scales no longer match P * 128 */
  }
  fill_act(&F->q, F->nice, 0);
}

static void mk_out_lse(attn_fx *F, int64_t T, int *ex) {
  tspec so = {"out", F->adt, MASK(F->adt), 3, {T, F->hq, D}, 1, 0, 0, 1, 8, NULL, 0};
  tspec sl = {"lse", M3S_F32, MASK(M3S_F32), 2, {T, F->hq}, 1, 0, 0, 1, 8, NULL, 1};
  mk(&F->out, &so, ex);
  if (rchance(30))
    memset(&F->lse, 0, sizeof F->lse); /* no lse (p == NULL) */
  else
    mk(&F->lse, &sl, ex);
}

/* Config, one batch (pages assigned, tensors made) and q / kv for the
 * attention-shaped operations; input bytes are read in this fixed order. */
static void attn_one_batch(attn_fx *F, bat *B, int *ex) {
  memset(F, 0, sizeof *F);
  gen_cfg(&F->C, ex);
  safe_dims(&F->C.c, &F->hq, &F->hkv, &F->K);
  gen_batch_desc(B, 0, F->hq, F->hkv, F->K);
  bat *L[1] = {B};
  assign_pages(L, 1);
  F->nice = !rchance(20);
  mk_batch(B, 1, 0, 1, ex);
  mk_q_kv(F, B->T, B->P, ex);
}

static void op_attention(void) {
  int ex = 0;
  attn_fx F;
  bat B;
  attn_one_batch(&F, &B, &ex);
  tspec stk = {"topk", M3S_I32, MASK(M3S_I32), 3, {B.T, F.hkv, F.K}, 0, 0, 0, 1, 8, PERM_HM, 0};
  mk(&F.tk, &stk, &ex);
  mk_out_lse(&F, B.T, &ex);
  fill_kv(&B, &F.kv, F.hkv, F.nice, 1);
  fill_topk_input(F.hkv, F.K, &B, &F.tk, 0, &ex);
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip)
    return;
  OUTPUTS(&F.out, &F.lse);
  m3s_status st = CALL(
      "m3s_sparse_attention", ex,
      m3s_sparse_attention(ctx, F.C.p, B.p, F.q.p, F.kv.p, F.sc.p, F.tk.p, F.out.p, F.lse.p, e));
  if (st)
    return;
  allow_view(&F.out);
  allow_view(F.lse.p ? &F.lse : NULL);
  check_allowed();
  if (ex)
    return;
  attn_in A = {&F.C.c, &B, &F.q, &F.kv, &F.tk, &F.sc, 0, NULL};
  check_attn_rows(&A, &F.out, &F.lse, F.nice && F.C.nice && F.sc.nice && !g_alias_in);
  int r = pick_req(&B);
  if (r >= 0 && B.num_reqs > 1 && rndn(5) < 2) {
    S.indep++;
    m3s_batch sb = sub_batch(&B, r);
    m3s_tensor q2 = tnarrow(&F.q, B.row0[r], B.n[r]);
    m3s_tensor tk2 = tnarrow(&F.tk, B.row0[r], B.n[r]);
    targ o2, l2;
    mk_out(&o2, "out(alone)", F.adt, 3, B.n[r], F.hq, D, 0);
    mk_out(&l2, "lse(alone)", M3S_F32, 2, B.n[r], F.hq, 0, 0);
    if (g_skip)
      return;
    OUTPUTS(&o2, &l2);
    CALL("m3s_sparse_attention(alone)", 0,
         m3s_sparse_attention(g_ctx, &F.C.c, &sb, &q2, &F.kv.t, F.sc.p, &tk2, &o2.t, &l2.t, NULL));
    allow_view(&o2);
    allow_view(&l2);
    check_allowed();
    cmp_bits(&o2, 0, &F.out, B.row0[r], B.n[r], "sparse_attention out: request alone vs batch");
    if (F.lse.p)
      cmp_bits(&l2, 0, &F.lse, B.row0[r], B.n[r], "sparse_attention lse: request alone vs batch");
  }
}

/* ----------------------------------------------------------------- step */
static void op_step(void) {
  int ex = 0;
  attn_fx F;
  memset(&F, 0, sizeof F);
  gen_cfg(&F.C, &ex);
  safe_dims(&F.C.c, &F.hq, &F.hkv, &F.K);
  bat Dc, Pf;
  g_budget = WORK_BUDGET / 2;
  gen_batch_desc(&Dc, rchance(20) ? 0 : 1, F.hq, F.hkv, F.K);
  gen_batch_desc(&Pf, rchance(20) ? 0 : 2, F.hq, F.hkv, F.K);
  g_budget = WORK_BUDGET;
  bat *L[2] = {&Dc, &Pf};
  assign_pages(L, 2);
  F.nice = !rchance(20);
  int inject = F.nice && rchance(20);
  mk_batch(&Dc, 1, 1, 0, &ex);
  mk_batch(&Pf, 1, 1, 0, &ex);
  int64_t T = Dc.T + Pf.T;
  mk_q_kv(&F, T, Dc.P, &ex);
  m3s_dtype idt = rchance(30) ? M3S_E4M3 : M3S_BF16;
  tspec siq = {"iq", F.adt, ACT, 3, {T, F.hkv, D}, 0, 0, 0, 1, 6, NULL, 0};
  tspec sic = {"index_cache", idt, IDX_MASK, 3, {Dc.Pi, BS, D}, 0, 1, 1u, 1, 6, NULL, 0};
  tspec stk = {"topk", M3S_I32, MASK(M3S_I32), 3, {T, F.hkv, F.K}, 1, 0, 0, 1, 6, PERM_HM, 0};
  targ iq, ic;
  mk(&iq, &siq, &ex);
  mk(&ic, &sic, &ex);
  mk(&F.tk, &stk, &ex);
  mk_out_lse(&F, T, &ex);
  fill_act(&iq, F.nice, inject);
  fill_kv(&Dc, &F.kv, F.hkv, F.nice, 1);
  fill_kv(&Pf, &F.kv, F.hkv, F.nice, 0);
  fill_ic(&Dc, &ic, F.nice, 0, 1);
  fill_ic(&Pf, &ic, F.nice, inject, 0);
  m3s_step step = {Dc.b, Pf.b};
  const m3s_step *sp = &step;
  if (rchance(3))
    sp = NULL, ex |= EX_FAIL;
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip)
    return;
  OUTPUTS(&F.tk, &F.out, &F.lse);
  m3s_status st = CALL("m3s_step_forward", ex,
                       m3s_step_forward(ctx, F.C.p, sp, F.q.p, iq.p, F.kv.p, F.sc.p, ic.p, F.tk.p,
                                        F.out.p, F.lse.p, e));
  if (st)
    return;
  allow_view(&F.tk);
  allow_view(&F.out);
  allow_view(F.lse.p ? &F.lse : NULL);
  check_allowed();
  if (ex)
    return;
  int exact = F.nice && !g_alias_in;
  int numeric = exact && F.C.nice && F.sc.nice;
  bat *parts[2] = {&Dc, &Pf};
  int64_t base[2] = {0, Dc.T};
  for (int k = 0; k < 2; k++) {
    check_topk_rows(&F.C.c, parts[k], &iq, &ic, &F.tk, base[k], exact);
    attn_in A = {&F.C.c, parts[k], &F.q, &F.kv, &F.tk, &F.sc, base[k], NULL};
    check_attn_rows(&A, &F.out, &F.lse, numeric);
  }
  if (rndn(5) < 2) { /* equals separate calls on the two parts, bit for bit */
    S.indep++;
    for (int k = 0; k < 2; k++) {
      bat *B = parts[k];
      if (B->T == 0)
        continue;
      m3s_tensor iq2 = tnarrow(&iq, base[k], B->T), q2 = tnarrow(&F.q, base[k], B->T);
      targ t2, o2, l2;
      mk_out(&t2, "topk(part)", M3S_I32, 3, B->T, F.hkv, F.K, 0);
      mk_out(&o2, "out(part)", F.adt, 3, B->T, F.hq, D, 0);
      mk_out(&l2, "lse(part)", M3S_F32, 2, B->T, F.hq, 0, 0);
      if (g_skip)
        return;
      OUTPUTS(&t2);
      CALL("m3s_index_topk(part)", 0,
           m3s_index_topk(g_ctx, &F.C.c, &B->b, &iq2, &ic.t, &t2.t, NULL));
      allow_view(&t2);
      check_allowed();
      cmp_bits(&t2, 0, &F.tk, base[k], B->T, "step_forward top-k vs m3s_index_topk");
      OUTPUTS(&o2, &l2);
      CALL("m3s_sparse_attention(part)", 0,
           m3s_sparse_attention(g_ctx, &F.C.c, &B->b, &q2, &F.kv.t, F.sc.p, &t2.t, &o2.t, &l2.t,
                                NULL));
      allow_view(&o2);
      allow_view(&l2);
      check_allowed();
      cmp_bits(&o2, 0, &F.out, base[k], B->T, "step_forward out vs m3s_sparse_attention");
      if (F.lse.p)
        cmp_bits(&l2, 0, &F.lse, base[k], B->T, "step_forward lse vs m3s_sparse_attention");
    }
  }
}

/* -------------------------------------------------------------- inserts */
/* slot values: valid ones in [-3, P*128) (negative = skip), extremes, and one
 * beyond the cache (must be rejected) as a mutation */
static void fill_slots(const targ *sl, int64_t T, int64_t P, int64_t *slots, int *ex) {
  for (int64_t i = 0; i < T; i++) {
    int64_t v = rndn(6) == 0 ? -1 - rndn(3) : rndn((int)(P * BS > 0 ? P * BS : 1));
    if (P == 0)
      v = -1;
    if (rndn(20) == 0)
      v = sl->t.dtype == M3S_I64 ? INT64_MIN + rndn(3) : INT32_MIN;
    slots[i] = v;
  }
  if (T > 0 && rchance(10)) {
    int64_t i = rpick((int)T);
    int64_t lim = P * BS;
    slots[i] = rchance(30) && sl->t.dtype == M3S_I64 ? INT64_MAX - rpick(3) : lim + rpick(1000);
    *ex |= EX_FAIL;
  }
  for (int64_t i = 0; i < T; i++)
    tseti(sl, I4(i, 0, 0, 0), slots[i]);
}

/* The token count T is a dimension every per-token operand of an insert
 * shares (ik / k / v dim 0, the slot mapping). A shape mutation of one of
 * them is a mismatch the API must reject, but when every one of them got the
 * same mutation of that dimension and nothing else, the operands agree again:
 * the call is a valid insert of the new count (an empty insert when it is 0)
 * and must succeed. Returns the count the call really has and, in that case,
 * clears the failure bits those shape mutations set (*ex[i] holds only what
 * mk set for a[i]); otherwise returns T and leaves them. */
static int64_t agreed_token_count(const targ *const *a, int *const *ex, int n, int64_t T) {
  int64_t t2 = a[0]->t.shape[0];
  for (int i = 0; i < n; i++) {
    if (a[i]->mut != M_SHAPE || a[i]->t.ndim != a[i]->ndim || a[i]->t.shape[0] != t2)
      return T;
    for (int d = 1; d < a[i]->ndim; d++)
      if (a[i]->t.shape[d] != a[i]->shape[d])
        return T; /* another dimension was mutated: still a mismatch */
  }
  for (int i = 0; i < n; i++)
    *ex[i] = 0;
  return t2;
}

static void op_cache_insert(void) {
  int ex = 0;
  int hkv = 1 + rpick(4), T = rpick(10), P = rpick(5);
  if (P == 0 && !rchance(30))
    P = 1;
  m3s_dtype adt = rchance(30) ? M3S_F16 : M3S_BF16, cdt = KV_DT[rpick(4)];
  m3s_dtype sdt = rchance(30) ? M3S_I32 : M3S_I64;
  int nice = !rchance(25);
  tspec sk = {"k", adt, ACT, 3, {T, hkv, D}, 0, 0, 0, 1, 8, NULL, 0};
  tspec sv = {"v", adt, MASK(adt), 3, {T, hkv, D}, 0, 0, 0, 1, 8, NULL, 0};
  tspec ssl = {"slot_mapping", sdt, MASK(M3S_I32) | MASK(M3S_I64), 1, {T}, 0, 0, 0, 1, 8, NULL, 0};
  tspec skv = {"kv_cache", cdt, KV_MASK, 4, {P, hkv, BS, 2 * D}, 1, 0, 1u, 1, 8, PERM_TM, 0};
  targ k, v, sl, kv;
  int ex_k = 0, ex_v = 0, ex_sl = 0;
  mk(&k, &sk, &ex_k);
  mk(&v, &sv, &ex_v);
  mk(&sl, &ssl, &ex_sl);
  mk(&kv, &skv, &ex);
  {
    const targ *tok[3] = {&k, &v, &sl};
    int *tex[3] = {&ex_k, &ex_v, &ex_sl};
    T = (int)agreed_token_count(tok, tex, 3, T);
    ex |= ex_k | ex_v | ex_sl;
  }
  scl_t sc;
  gen_scales(&sc, cdt, hkv, P, nice, &ex);
  int64_t slots[16];
  fill_slots(&sl, T, P, slots, &ex);
  fill_act(&k, nice, 0);
  fill_act(&v, nice, 0);
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip)
    return;
  OUTPUTS(&kv);
  m3s_status st =
      CALL("m3s_cache_insert", ex, m3s_cache_insert(ctx, k.p, v.p, sl.p, kv.p, sc.p, e));
  if (st)
    return;
  if (ex) {
    allow_view(&kv);
    check_allowed();
    return;
  }
  for (int i = 0; i < T; i++)
    if (slots[i] >= 0)
      for (int h = 0; h < hkv; h++)
        for (int d = 0; d < 2 * D; d++)
          allow_idx(&kv, I4(slots[i] / BS, h, slots[i] % BS, d));
  check_allowed();
  if (!nice || !sc.nice || g_alias_in)
    return;
  for (int i = 0; i < T; i++) {
    if (slots[i] < 0)
      continue;
    int later = 0;
    for (int j = i + 1; j < T; j++)
      later |= slots[j] == slots[i];
    if (later)
      continue; /* the later row wins */
    int64_t page = slots[i] / BS, off = slots[i] % BS;
    for (int h = 0; h < hkv; h++)
      for (int d = 0; d < 2 * D; d++) {
        double want = tgetf(d < D ? &k : &v, I4(i, h, d % D, 0));
        double got = tgetf(&kv, I4(page, h, off, d));
        if (cdt == M3S_E4M3 || cdt == M3S_E5M2)
          got *= scale_at(&sc, d >= D, h, slots[i]);
        if (got != want)
          die("cache_insert: token %d head %d element %d: cache holds %g, want %g", i, h, d, got,
              want);
      }
  }
}

static void op_index_insert(void) {
  int ex = 0;
  int T = rpick(10), P = rpick(5);
  if (P == 0 && !rchance(30))
    P = 1;
  m3s_dtype adt = rchance(30) ? M3S_F16 : M3S_BF16, idt = rchance(40) ? M3S_E4M3 : M3S_BF16;
  m3s_dtype sdt = rchance(30) ? M3S_I32 : M3S_I64;
  int nice = !rchance(25);
  tspec sk = {"ik", adt, ACT, 2, {T, D}, 0, 0, 0, 1, 8, NULL, 0};
  tspec ssl = {"slot_mapping", sdt, MASK(M3S_I32) | MASK(M3S_I64), 1, {T}, 0, 0, 0, 1, 8, NULL, 0};
  tspec sic = {"index_cache", idt, IDX_MASK, 3, {P, BS, D}, 1, 1, 1u, 1, 8, NULL, 0};
  targ ik, sl, ic;
  int ex_ik = 0, ex_sl = 0;
  mk(&ik, &sk, &ex_ik);
  mk(&sl, &ssl, &ex_sl);
  mk(&ic, &sic, &ex);
  {
    /* regression seed fuzz/corpus/regress-harness-empty-index-insert: ik
     * and slot_mapping both shrunk from 1 token to 0 (a valid empty insert)
     * was once expected to fail */
    const targ *tok[2] = {&ik, &sl};
    int *tex[2] = {&ex_ik, &ex_sl};
    T = (int)agreed_token_count(tok, tex, 2, T);
    ex |= ex_ik | ex_sl;
  }
  int64_t slots[16];
  fill_slots(&sl, T, P, slots, &ex);
  fill_act(&ik, nice, 0);
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip)
    return;
  OUTPUTS(&ic);
  m3s_status st =
      CALL("m3s_index_cache_insert", ex, m3s_index_cache_insert(ctx, ik.p, sl.p, ic.p, e));
  if (st)
    return;
  if (ex) {
    allow_view(&ic);
    check_allowed();
    return;
  }
  for (int i = 0; i < T; i++)
    if (slots[i] >= 0)
      for (int d = 0; d < D; d++)
        allow_idx(&ic, I4(slots[i] / BS, slots[i] % BS, d, 0));
  check_allowed();
  if (!nice || g_alias_in)
    return;
  for (int i = 0; i < T; i++) {
    if (slots[i] < 0)
      continue;
    int later = 0;
    for (int j = i + 1; j < T; j++)
      later |= slots[j] == slots[i];
    for (int d = 0; d < D && !later; d++) {
      double want = tgetf(&ik, I4(i, d, 0, 0)),
             got = tgetf(&ic, I4(slots[i] / BS, slots[i] % BS, d, 0));
      if (got != want)
        die("index_cache_insert: token %d element %d: cache holds %g, want %g", i, d, got, want);
    }
  }
}

/* ------------------------------------------------------------ k2q (CSR) */
typedef struct {
  int64_t R, cap;
  int32_t *rp;                /* [hkv][R+1] */
  int32_t *qi, *qs;           /* [hkv][cap] */
  int32_t *qc;                /* [T][hkv] */
  int64_t *row_req, *row_blk; /* owner of each row */
} csr_t;

static void csr_free(csr_t *c) {
  free(c->rp);
  free(c->qi);
  free(c->qs);
  free(c->qc);
  free(c->row_req);
  free(c->row_blk);
}

/* CSR of the top-k rows read from tk (or of host selections sel when tk is
 * NULL); rows ascending, query rows ascending inside a row. */
static void csr_build(csr_t *o, int hkv, int K, const bat *B, const targ *tk, const int32_t *sel) {
  memset(o, 0, sizeof *o);
  int64_t R = 0;
  for (int r = 0; r < B->num_reqs; r++)
    R += need_pages(B->s[r]);
  o->R = R;
  o->cap = (int64_t)B->T * K;
  o->rp = (int32_t *)calloc((size_t)(hkv * (R + 1)), 4);
  o->qi = (int32_t *)calloc((size_t)(hkv * o->cap + 1), 4);
  o->qs = (int32_t *)calloc((size_t)(hkv * o->cap + 1), 4);
  o->qc = (int32_t *)calloc((size_t)(B->T * hkv + 1), 4);
  o->row_req = (int64_t *)calloc((size_t)R + 1, 8);
  o->row_blk = (int64_t *)calloc((size_t)R + 1, 8);
  int64_t row = 0;
  for (int r = 0; r < B->num_reqs; r++)
    for (int64_t b = 0; b < need_pages(B->s[r]); b++, row++)
      o->row_req[row] = r, o->row_blk[row] = b;
  for (int g = 0; g < hkv; g++) {
    int32_t *rp = o->rp + g * (R + 1);
    for (int pass = 0; pass < 2; pass++) {
      int64_t base = 0;
      int32_t *fill = pass ? (int32_t *)calloc((size_t)R + 1, 4) : NULL;
      for (int r = 0; r < B->num_reqs; r++) {
        for (int64_t i = 0; i < B->n[r]; i++) {
          int64_t t = B->row0[r] + i, pos = bpos(B, r, i);
          int64_t nb = pos >= 0 ? pos / BS + 1 : 0, kk = nb < K ? nb : K;
          if (sel)
            kk = pos >= 0 ? K : 0;
          int cnt = 0;
          for (int64_t k = 0; k < kk; k++) {
            int32_t id = sel ? sel[(t * hkv + g) * K + k] : (int32_t)tgeti(tk, I4(t, g, k, 0));
            if (id < 0)
              continue;
            cnt++;
            int64_t rw = base + id;
            if (pass == 0)
              rp[rw + 1]++;
            else {
              int64_t at = rp[rw] + fill[rw]++;
              o->qi[g * o->cap + at] = (int32_t)t;
              o->qs[g * o->cap + at] = cnt - 1;
            }
          }
          if (pass)
            o->qc[t * hkv + g] = cnt;
        }
        base += need_pages(B->s[r]);
      }
      if (pass == 0)
        for (int64_t x = 0; x < R; x++)
          rp[x + 1] += rp[x];
      free(fill);
    }
  }
}

static void op_csr(void) {
  int ex = 0, hq, hkv, K;
  cfg_t C;
  gen_cfg(&C, &ex);
  safe_dims(&C.c, &hq, &hkv, &K);
  bat B;
  gen_batch_desc(&B, 0, hq, hkv, K);
  bat *L[1] = {&B};
  assign_pages(L, 1);
  mk_batch(&B, 0, 0, 1, &ex);
  int64_t R = 0;
  for (int r = 0; r < B.num_reqs; r++)
    R += need_pages(B.s[r]);
  tspec stk = {"topk", M3S_I32, MASK(M3S_I32), 3, {B.T, hkv, K}, 0, 0, 0, 1, 8, PERM_HM, 0};
  tspec srp = {"row_ptr", M3S_I32, MASK(M3S_I32), 2, {hkv, R + 1}, 1, 1, 0, 1, 6, NULL, 0};
  tspec sqi = {"q_indices", M3S_I32, MASK(M3S_I32), 2, {hkv, (int64_t)B.T * K}, 1, 1, 0,
               1,           6,       NULL,          0};
  tspec sqs = {"q_slot", M3S_I32, MASK(M3S_I32), 2, {hkv, (int64_t)B.T * K}, 1, 1, 0,
               1,        6,       NULL,          0};
  tspec sqc = {"q_count", M3S_I32, MASK(M3S_I32), 2, {B.T, hkv}, 1, 1, 0, 1, 6, NULL, 0};
  targ tk, rp, qi, qs, qc;
  mk(&tk, &stk, &ex);
  mk(&rp, &srp, &ex);
  mk(&qi, &sqi, &ex);
  mk(&qs, &sqs, &ex);
  mk(&qc, &sqc, &ex);
  fill_topk_input(hkv, K, &B, &tk, 0, &ex);
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip)
    return;
  OUTPUTS(&rp, &qi, &qs, &qc);
  m3s_status st = CALL("m3s_build_k2q_csr", ex,
                       m3s_build_k2q_csr(ctx, C.p, B.p, tk.p, rp.p, qi.p, qs.p, qc.p, e));
  if (st)
    return;
  if (ex) {
    allow_view(&rp);
    allow_view(&qi);
    allow_view(&qs);
    allow_view(&qc);
    check_allowed();
    return;
  }
  csr_t E;
  csr_build(&E, hkv, K, &B, &tk, NULL);
  allow_view(&rp);
  allow_view(&qc);
  for (int g = 0; g < hkv; g++)
    for (int64_t x = 0; x < E.rp[g * (R + 1) + R]; x++) {
      allow_idx(&qi, I4(g, x, 0, 0));
      allow_idx(&qs, I4(g, x, 0, 0));
    }
  check_allowed();
  for (int g = 0; g < hkv; g++) {
    for (int64_t x = 0; x <= R; x++)
      if (tgeti(&rp, I4(g, x, 0, 0)) != E.rp[g * (R + 1) + x])
        die("build_k2q_csr: row_ptr[%d][%lld] = %lld, want %d", g, (long long)x,
            (long long)tgeti(&rp, I4(g, x, 0, 0)), E.rp[g * (R + 1) + x]);
    for (int64_t x = 0; x < E.rp[g * (R + 1) + R]; x++)
      if (tgeti(&qi, I4(g, x, 0, 0)) != E.qi[g * E.cap + x] ||
          tgeti(&qs, I4(g, x, 0, 0)) != E.qs[g * E.cap + x])
        die("build_k2q_csr: entry [%d][%lld] = (query %lld, slot %lld), want (%d, %d)", g,
            (long long)x, (long long)tgeti(&qi, I4(g, x, 0, 0)),
            (long long)tgeti(&qs, I4(g, x, 0, 0)), E.qi[g * E.cap + x], E.qs[g * E.cap + x]);
  }
  for (int64_t t = 0; t < B.T; t++)
    for (int g = 0; g < hkv; g++)
      if (tgeti(&qc, I4(t, g, 0, 0)) != E.qc[t * hkv + g])
        die("build_k2q_csr: q_count[%lld][%d] = %lld, want %d", (long long)t, g,
            (long long)tgeti(&qc, I4(t, g, 0, 0)), E.qc[t * hkv + g]);
  S.ref_rows += (unsigned long long)B.T;
  csr_free(&E);
}

static void op_k2q_attention(void) {
  int ex = 0;
  attn_fx F;
  bat B;
  attn_one_batch(&F, &B, &ex);
  fill_kv(&B, &F.kv, F.hkv, F.nice, 1);
  int hkv = F.hkv, K = F.K, hq = F.hq, G = hq / hkv;
  /* host selections: distinct ids < nb(t) (or, "odd", any block of the request) */
  int odd = rchance(20);
  int32_t *sel = (int32_t *)malloc(sizeof(int32_t) * (size_t)(B.T * hkv * K + 1));
  for (int r = 0; r < B.num_reqs; r++)
    for (int64_t i = 0; i < B.n[r]; i++) {
      int64_t t = B.row0[r] + i, pos = bpos(&B, r, i);
      int64_t lim = pos < 0 ? 0 : odd ? need_pages(B.s[r]) : pos / BS + 1;
      for (int g = 0; g < hkv; g++) {
        int32_t pool[MAX_COLS];
        for (int b = 0; b < lim; b++)
          pool[b] = b;
        for (int64_t b = lim - 1; b > 0; b--) {
          int j = rndn((int)b + 1);
          int32_t x = pool[b];
          pool[b] = pool[j];
          pool[j] = x;
        }
        int m = rndn(K + 1);
        for (int k = 0; k < K; k++)
          sel[(t * hkv + g) * K + k] = k < m && k < lim ? pool[k] : -1;
      }
    }
  csr_t E;
  csr_build(&E, F.hkv, F.K, &B, NULL, sel);
  int64_t R = E.R, cap = E.cap;
  tspec srp = {"row_ptr", M3S_I32, MASK(M3S_I32), 2, {hkv, R + 1}, 0, 0, 0, 1, 6, NULL, 0};
  tspec sqi = {"q_indices", M3S_I32, MASK(M3S_I32), 2, {hkv, cap}, 0, 0, 0, 1, 6, NULL, 0};
  tspec sqs = {"q_slot", M3S_I32, MASK(M3S_I32), 2, {hkv, cap}, 0, 0, 0, 1, 6, NULL, 0};
  tspec spo = {"part_out", M3S_F32, MASK(M3S_F32), 4, {B.T, hq, K, D}, 1, 0, 0, 1, 6, NULL, 0};
  tspec spl = {"part_lse", M3S_F32, MASK(M3S_F32), 3, {B.T, hq, K}, 1, 0, 0, 1, 6, NULL, 0};
  targ rp, qi, qs, po, pl;
  mk(&rp, &srp, &ex);
  mk(&qi, &sqi, &ex);
  mk(&qs, &sqs, &ex);
  mk(&po, &spo, &ex);
  mk(&pl, &spl, &ex);
  for (int g = 0; g < hkv; g++) {
    for (int64_t x = 0; x <= R; x++)
      tseti(&rp, I4(g, x, 0, 0), E.rp[g * (R + 1) + x]);
    for (int64_t x = 0; x < E.rp[g * (R + 1) + R]; x++) {
      tseti(&qi, I4(g, x, 0, 0), E.qi[g * cap + x]);
      tseti(&qs, I4(g, x, 0, 0), E.qs[g * cap + x]);
    }
  }
  if (rchance(12)) { /* CSR values the API must reject, or chaos */
    int g = rpick(hkv), kind = rpick(6);
    int32_t *grp = E.rp + g * (R + 1);
    int64_t tot = grp[R];
    if (kind == 0) {
      tseti(&rp, I4(g, 0, 0, 0), 1 + rpick(5));
      ex |= EX_FAIL;
    } else if (kind == 1 && R > 0) {
      int64_t x = rpick((int)R);
      tseti(&rp, I4(g, x + 1, 0, 0), grp[x] - 1 - rpick(3));
      ex |= EX_FAIL;
    } else if (kind == 2 && R > 0) {
      tseti(&rp, I4(g, R, 0, 0), cap + 1 + rpick(3));
      ex |= EX_FAIL;
    } else if ((kind == 3 || kind == 4) && tot > 0) {
      int64_t x = rpick((int)tot), row = 0;
      while (grp[row + 1] <= x)
        row++;
      int r = (int)E.row_req[row];
      int64_t lo = B.row0[r], hi = lo + B.n[r];
      if (kind == 3)
        tseti(&qi, I4(g, x, 0, 0), rchance(50) ? lo - 1 - rpick(3) : hi + rpick(3));
      else
        tseti(&qs, I4(g, x, 0, 0), rchance(50) ? -1 - rpick(3) : K + rpick(3));
      ex |= EX_FAIL;
    } else if (kind == 5) {
      ex |= EX_ANY;
      targ *ts[3] = {&rp, &qi, &qs};
      for (int k = 0, n = 1 + rpick(4); k < n; k++) {
        targ *a = ts[rpick(3)];
        if (a->b->bytes >= 4 && !a->broken) {
          size_t at = (size_t)rndn((int)(a->b->bytes / 4)) * 4;
          int32_t v = rchance(50) ? (int32_t)rnd() : rpick(80) - 3;
          memcpy(a->b->data + at, &v, 4);
        }
      }
    }
  }
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip) {
    csr_free(&E);
    free(sel);
    return;
  }
  OUTPUTS(&po, &pl);
  m3s_status st = CALL(
      "m3s_k2q_attention", ex,
      m3s_k2q_attention(ctx, F.C.p, B.p, F.q.p, F.kv.p, F.sc.p, rp.p, qi.p, qs.p, po.p, pl.p, e));
  if (st == M3S_OK) {
    if (ex) {
      allow_view(&po);
      allow_view(&pl);
      check_allowed();
    } else {
      attn_in A = {&F.C.c, &B, &F.q, &F.kv, NULL, &F.sc, 0, NULL};
      int numeric = F.nice && F.C.nice && F.sc.nice && !g_alias_in;
      attn_decode(&A);
      for (int g = 0; g < hkv; g++)
        for (int64_t row = 0; row < R; row++)
          for (int64_t x = E.rp[g * (R + 1) + row]; x < E.rp[g * (R + 1) + row + 1]; x++) {
            int64_t t = E.qi[g * cap + x], slot = E.qs[g * cap + x];
            int r = (int)E.row_req[row];
            int32_t id = (int32_t)E.row_blk[row];
            int64_t pos = bpos(&B, r, t - B.row0[r]);
            for (int h = g * G; h < (g + 1) * G; h++) {
              for (int d = 0; d < D; d++)
                allow_idx(&po, I4(t, h, slot, d));
              allow_idx(&pl, I4(t, h, slot, 0));
              double ro[D], rl;
              int64_t nk = ref_attend(&A, r, pos, t, h, &id, 1, ro, &rl);
              double gl = tgetf(&pl, I4(t, h, slot, 0)), e2 = 0, r2 = 0;
              for (int d = 0; d < D; d++) {
                double dd = tgetf(&po, I4(t, h, slot, d)) - ro[d];
                e2 += dd * dd;
                r2 += ro[d] * ro[d];
                if (nk == 0 && tgetf(&po, I4(t, h, slot, d)) != 0)
                  die("k2q_attention: (t %lld, h %d, slot %lld) sees no key of block %d but "
                      "part_out[%d] = %g",
                      (long long)t, h, (long long)slot, id, d, tgetf(&po, I4(t, h, slot, d)));
              }
              if (nk == 0 && !(gl == -INFINITY))
                die("k2q_attention: (t %lld, h %d, slot %lld) sees no key but part_lse = %g",
                    (long long)t, h, (long long)slot, gl);
              if (numeric && nk > 0) {
                S.ref_rows++;
                if (!(e2 <= 1e-6 * r2 + 1e-8) || !(fabs(gl - rl) <= 1e-3 * (1 + fabs(rl))))
                  die("k2q_attention: (t %lld, h %d, slot %lld, block %d): rel L2 %.3g, lse %.9g "
                      "vs fp64 %.9g",
                      (long long)t, h, (long long)slot, id, sqrt(e2 / (r2 + 1e-300)), gl, rl);
              }
            }
          }
      check_allowed();
      free(A.kvd);
    }
  }
  csr_free(&E);
  free(sel);
}

/* -------------------------------------------------------- combine, merge */
static void fill_lse_vals(const targ *a, int nice) {
  if (!a->b || a->broken || !nice)
    return;
  for (size_t i = 0; i + 4 <= a->b->bytes; i += 4) {
    float f = rndn(6) == 0 ? -INFINITY : (float)(rndn(161) - 80) / 8.0f;
    memcpy(a->b->data + i, &f, 4);
  }
}

/* fp64 merge of n states */
static void ref_merge(int n, const double *const *o, const double *l, double *out, double *lse) {
  double m = -INFINITY;
  for (int i = 0; i < n; i++)
    m = l[i] > m ? l[i] : m;
  for (int d = 0; d < D; d++)
    out[d] = 0;
  if (m == -INFINITY) {
    *lse = -INFINITY;
    return;
  }
  double s = 0;
  for (int i = 0; i < n; i++) {
    double w = exp(l[i] - m);
    s += w;
    for (int d = 0; d < D; d++)
      out[d] += w * o[i][d];
  }
  for (int d = 0; d < D; d++)
    out[d] /= s;
  *lse = m + log(s);
}

static void check_state_row(const char *what, const targ *out, const targ *lse, int64_t t,
                            int64_t h, const double *ro, double rl, int numeric) {
  if (rl == -INFINITY) {
    for (int d = 0; d < D; d++)
      if (tgetf(out, I4(t, h, d, 0)) != 0)
        die("%s: row %lld head %lld has no mass but out[%d] = %g", what, (long long)t, (long long)h,
            d, tgetf(out, I4(t, h, d, 0)));
    if (lse && lse->p && !(tgetf(lse, I4(t, h, 0, 0)) == -INFINITY))
      die("%s: row %lld head %lld has no mass but lse = %g", what, (long long)t, (long long)h,
          tgetf(lse, I4(t, h, 0, 0)));
    return;
  }
  if (!numeric)
    return;
  S.ref_rows++;
  double e2 = 0, r2 = 0;
  for (int d = 0; d < D; d++) {
    double e = tgetf(out, I4(t, h, d, 0)) - ro[d];
    e2 += e * e;
    r2 += ro[d] * ro[d];
  }
  if (!(e2 <= 1e-4 * r2 + 1e-6 * D))
    die("%s: row %lld head %lld: rel L2 error %.3g vs the fp64 reference", what, (long long)t,
        (long long)h, sqrt(e2 / (r2 + 1e-300)));
  if (lse && lse->p) {
    double gl = tgetf(lse, I4(t, h, 0, 0));
    if (!(fabs(gl - rl) <= 1e-4 * (1 + fabs(rl))))
      die("%s: row %lld head %lld: lse %.9g vs fp64 %.9g", what, (long long)t, (long long)h, gl,
          rl);
  }
}

static void op_combine(void) {
  int ex = 0, hq, hkv, K;
  cfg_t C;
  gen_cfg(&C, &ex);
  safe_dims(&C.c, &hq, &hkv, &K);
  int T = rpick(12), nice = !rchance(20);
  m3s_dtype odt = rchance(30) ? M3S_F16 : M3S_BF16;
  tspec spo = {"part_out", M3S_F32, MASK(M3S_F32), 4, {T, hq, K, D}, 0, 0, 0, 1, 6, NULL, 0};
  tspec spl = {"part_lse", M3S_F32, MASK(M3S_F32), 3, {T, hq, K}, 0, 0, 0, 1, 6, NULL, 0};
  tspec sqc = {"q_count", M3S_I32, MASK(M3S_I32), 2, {T, hkv}, 0, 0, 0, 1, 6, NULL, 0};
  tspec so = {"out", odt, ACT, 3, {T, hq, D}, 1, 0, 0, 1, 6, NULL, 0};
  tspec sl = {"lse", M3S_F32, MASK(M3S_F32), 2, {T, hq}, 1, 0, 0, 1, 6, NULL, 1};
  targ po, pl, qc, out, lse;
  mk(&po, &spo, &ex);
  mk(&pl, &spl, &ex);
  mk(&qc, &sqc, &ex);
  mk(&out, &so, &ex);
  if (rchance(30))
    memset(&lse, 0, sizeof lse);
  else
    mk(&lse, &sl, &ex);
  int32_t cnt[MAX_T][16];
  if (nice) {
    fill_nice(&po);
    fill_lse_vals(&pl, 1);
  }
  for (int t = 0; t < T; t++)
    for (int g = 0; g < hkv; g++) {
      cnt[t][g] = rpick(K + 1);
      tseti(&qc, I4(t, g, 0, 0), cnt[t][g]);
      if (nice) /* slots past the count must not be read */
        for (int h = g * (hq / hkv); h < (g + 1) * (hq / hkv); h++)
          for (int k = cnt[t][g]; k < K; k++) {
            tsetf(&pl, I4(t, h, k, 0), NAN);
            tsetf(&po, I4(t, h, k, rndn(D)), NAN);
          }
    }
  if (T > 0 && rchance(10)) {
    int t = rpick(T), g = rpick(hkv);
    tseti(&qc, I4(t, g, 0, 0), rchance(50) ? -1 - rpick(5) : K + 1 + rpick(5));
    ex |= EX_FAIL;
  }
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (g_skip)
    return;
  OUTPUTS(&out, &lse);
  m3s_status st = CALL("m3s_combine_partials", ex,
                       m3s_combine_partials(ctx, C.p, po.p, pl.p, qc.p, out.p, lse.p, e));
  if (st)
    return;
  allow_view(&out);
  allow_view(lse.p ? &lse : NULL);
  check_allowed();
  if (ex || !nice || g_alias_in)
    return;
  for (int t = 0; t < T; t++)
    for (int h = 0; h < hq; h++) {
      int n = cnt[t][h / (hq / hkv)];
      double o[M3S_MAX_TOPK][D], l[M3S_MAX_TOPK], ro[D], rl;
      const double *op[M3S_MAX_TOPK];
      for (int k = 0; k < n; k++) {
        for (int d = 0; d < D; d++)
          o[k][d] = tgetf(&po, I4(t, h, k, d));
        l[k] = tgetf(&pl, I4(t, h, k, 0));
        op[k] = o[k];
      }
      ref_merge(n, op, l, ro, &rl);
      check_state_row("combine_partials", &out, &lse, t, h, ro, rl, 1);
    }
}

static void op_merge(void) {
  int ex = 0;
  int T = rpick(12), H = 1 + rpick(16), nice = !rchance(20);
  static const m3s_dtype dts[3] = {M3S_BF16, M3S_F16, M3S_F32};
  m3s_dtype da = dts[rpick(3)], db = dts[rpick(3)], dout = dts[rpick(3)];
  unsigned st_mask = ACT | MASK(M3S_F32);
  int alias = rpick(4); /* 1: out is out_a, 2: out is out_b */
  tspec sa = {"out_a", da, st_mask, 3, {T, H, D}, alias == 1, 0, 0, 1, 6, NULL, 0};
  tspec sla = {"lse_a", M3S_F32, MASK(M3S_F32), 2, {T, H}, 0, 0, 0, 1, 6, NULL, 0};
  tspec sb = {"out_b", db, st_mask, 3, {T, H, D}, alias == 2, 0, 0, 1, 6, NULL, 0};
  tspec slb = {"lse_b", M3S_F32, MASK(M3S_F32), 2, {T, H}, 0, 0, 0, 1, 6, NULL, 0};
  tspec so = {"out", dout, st_mask, 3, {T, H, D}, 1, 0, 0, 1, 6, NULL, 0};
  tspec sl = {"lse", M3S_F32, MASK(M3S_F32), 2, {T, H}, 1, 0, 0, 1, 6, NULL, 1};
  targ a, la, b, lb, out, lse;
  mk(&a, &sa, &ex);
  mk(&la, &sla, &ex);
  mk(&b, &sb, &ex);
  mk(&lb, &slb, &ex);
  if (alias == 1 || alias == 2) {
    out = alias == 1 ? a : b;
  } else {
    mk(&out, &so, &ex);
  }
  if (rchance(30))
    memset(&lse, 0, sizeof lse);
  else
    mk(&lse, &sl, &ex);
  if (nice) {
    fill_nice(&a);
    fill_nice(&b);
    fill_lse_vals(&la, 1);
    fill_lse_vals(&lb, 1);
  }
  /* expected values, computed before the call (out may alias an input) */
  int numeric = nice && !g_alias_in && !ex;
  double *ref = (double *)malloc(sizeof(double) * (size_t)(T * H * (D + 1) + 1));
  for (int t = 0; t < T && numeric; t++)
    for (int h = 0; h < H; h++) {
      double oa[D], ob[D], l[2] = {tgetf(&la, I4(t, h, 0, 0)), tgetf(&lb, I4(t, h, 0, 0))};
      for (int d = 0; d < D; d++)
        oa[d] = tgetf(&a, I4(t, h, d, 0)), ob[d] = tgetf(&b, I4(t, h, d, 0));
      const double *op[2] = {oa, ob};
      double *r = ref + (t * H + h) * (D + 1);
      ref_merge(2, op, l, r, r + D);
    }
  m3s_context *ctx = pick_ctx(&ex);
  const m3s_exec *e = pick_exec();
  if (!g_skip) {
    OUTPUTS(&out, &lse);
    m3s_status st = CALL("m3s_merge_attn_states", ex,
                         m3s_merge_attn_states(ctx, a.p, la.p, b.p, lb.p, out.p, lse.p, e));
    if (st == M3S_OK) {
      allow_view(&out);
      allow_view(lse.p ? &lse : NULL);
      check_allowed();
      for (int t = 0; t < T && numeric && !ex; t++)
        for (int h = 0; h < H; h++) {
          double *r = ref + (t * H + h) * (D + 1);
          check_state_row("merge_attn_states", &out, &lse, t, h, r, r[D], 1);
        }
    }
  }
  free(ref);
}

/* --------------------------------------------------------------- narrow */
static int64_t pick_i64(void) {
  switch (rpick(8)) {
  case 0: return INT64_MIN + rpick(3);
  case 1: return INT64_MAX - rpick(3);
  case 2: return -1 - rpick(4);
  case 3: return (int64_t)rb64();
  case 4: return ((int64_t)1 << (rpick(62) + 1)) + rpick(3) - 1;
  default: return rpick(12);
  }
}

static void op_narrow(void) {
  static unsigned char mem[256];
  m3s_tensor t;
  memset(&t, 0, sizeof t);
  t.ndim = rpick(8) - 2;
  t.dtype = (m3s_dtype)(rpick(9) - 1);
  t.data = rchance(50) ? mem : NULL;
  for (int i = 0; i < 4; i++) {
    t.shape[i] = rchance(30) ? pick_i64() : rpick(10);
    t.stride[i] = rchance(30) ? pick_i64() : rpick(10);
  }
  int64_t start = rchance(30) ? pick_i64() : rpick(12), len = rchance(30) ? pick_i64() : rpick(12);
  int null_t = rchance(3);
  if (AVOID(6)) { /* known bug 6: signed overflow inside m3s_tensor_narrow */
    if (t.shape[0] < 0)
      t.shape[0] = 0;
    if (t.data && (t.stride[0] > 64 || t.stride[0] < -64))
      t.stride[0] = 1;
    if (t.data && t.shape[0] > ((int64_t)1 << 40))
      t.shape[0] = (int64_t)1 << 40;
  }
  if (rchance(30)) { /* m3s_tensor_make: contiguous strides of any shape */
    int nd = t.ndim;
    int64_t sh[4];
    for (int i = 0; i < 4; i++) {
      sh[i] = t.shape[i];
      if (AVOID(6) && (sh[i] > 4096 || sh[i] < 0))
        sh[i] = 4096;
    }
    g_fn = "m3s_tensor_make";
    S.calls++;
    S.op_calls[g_opi]++;
    m3s_tensor m = m3s_tensor_make(t.data, t.dtype, nd, rchance(5) ? NULL : sh, M3S_HOST);
    if (nd < 0 || nd > M3S_MAX_DIMS) {
      if (m.ndim != -1 || m.data)
        die("m3s_tensor_make(ndim %d) did not give the invalid view", nd);
    } else if (m.ndim == nd) {
      __int128 want = 1;
      for (int i = nd - 1; i >= 0; i--) {
        if (m.stride[i] != (int64_t)want && want <= INT64_MAX && want >= INT64_MIN)
          die("m3s_tensor_make: stride[%d] = %lld, want %lld", i, (long long)m.stride[i],
              (long long)want);
        want *= sh[i];
        if (want > INT64_MAX || want < INT64_MIN)
          break;
      }
    }
    return;
  }
  int ndim_ok = t.ndim >= 1 && t.ndim <= M3S_MAX_DIMS;
  /* the byte offset of the new first row must be representable: a view whose
   * pointer would overflow is refused (the invalid view), never wrapped */
  int64_t byte_off;
  int off_ok = !__builtin_mul_overflow(start, t.stride[0], &byte_off) &&
               !__builtin_mul_overflow(byte_off, (int64_t)m3s_dtype_size(t.dtype), &byte_off);
  int valid =
      !null_t && ndim_ok && start >= 0 && len >= 0 && (__int128)start + len <= t.shape[0] && off_ok;
  g_fn = "m3s_tensor_narrow";
  S.calls++;
  S.op_calls[g_opi]++;
  m3s_tensor r = m3s_tensor_narrow(null_t ? NULL : &t, start, len);
  if (g_trace)
    fprintf(stderr, "[m3s-fuzz] %-18s %-24s expect %-4s -> %2d (view ndim %d)\n", g_op, g_fn,
            valid ? "OK" : "FAIL", r.ndim < 0 ? (int)M3S_ERR_INVALID : 0, r.ndim);
  if (!valid) {
    S.rejected++;
    S.op_rej[g_opi]++;
    S.must_fail++;
    if (r.ndim != -1 || r.data)
      die("m3s_tensor_narrow(ndim %d, shape[0] %lld, start %lld, len %lld): invalid arguments "
          "gave ndim %d data %p, want the invalid view",
          t.ndim, (long long)t.shape[0], (long long)start, (long long)len, r.ndim, r.data);
    return;
  }
  S.ok++;
  S.must_ok++;
  if (r.ndim != t.ndim || r.shape[0] != len || r.dtype != t.dtype || r.device != t.device)
    die("m3s_tensor_narrow: wrong view (ndim %d shape[0] %lld)", r.ndim, (long long)r.shape[0]);
  for (int i = 1; i < t.ndim; i++)
    if (r.shape[i] != t.shape[i] || r.stride[i] != t.stride[i])
      die("m3s_tensor_narrow changed dimension %d", i);
  if (!t.data) {
    if (r.data)
      die("m3s_tensor_narrow of a NULL view gave data %p", r.data);
    return;
  }
  __int128 off = (__int128)start * t.stride[0] * (__int128)m3s_dtype_size(t.dtype);
  __int128 got = (__int128)((intptr_t)r.data - (intptr_t)t.data);
  if (off == got)
    return;
  die("m3s_tensor_narrow: data moved by %lld bytes, want %lld", (long long)got, (long long)off);
}

/* ----------------------------------------------------------------- misc */
static int g_log_calls;
static void log_cb(int level, const char *msg, void *user) {
  (void)level;
  (void)user;
  if (!msg)
    die("log callback got a NULL message");
  g_log_calls++;
}

static void op_misc(void) {
  int ex = 0;
  switch (rpick(7)) {
  case 0: { /* m3s_query_support */
    cfg_t C;
    gen_cfg(&C, &ex);
    m3s_support_query q;
    memset(&q, 0, sizeof q);
    q.op = (m3s_op)(!rchance(20) ? rpick(7) : (int)rb32());
    q.act_dtype = (m3s_dtype)(!rchance(20) ? rpick(7) : (int)rb32());
    q.kv_dtype = (m3s_dtype)(!rchance(20) ? rpick(7) : (int)rb32());
    q.index_dtype = (m3s_dtype)(!rchance(20) ? rpick(7) : (int)rb32());
    q.per_slot_scales = (int)rb32();
    q.layout = (m3s_cache_layout)(!rchance(20) ? rpick(3) : (int)rb32());
    buf_t *qb = balloc("query", sizeof q), *ib = balloc("info", sizeof(m3s_support_info));
    if (g_skip)
      return;
    memcpy(qb->data, &q, sizeof q);
    m3s_support_query *qp = (m3s_support_query *)qb->data;
    m3s_support_info *ip = (m3s_support_info *)ib->data;
    if (rchance(5))
      qp = NULL, ex |= EX_FAIL;
    if (rchance(5))
      ip = NULL, ex |= EX_FAIL;
    if ((unsigned)q.op > 6u || (unsigned)q.layout > 2u)
      ex |= EX_FAIL;
    m3s_context *ctx = pick_ctx(&ex);
    for (int i = 0; i < g_nb; i++)
      g_b[i].out = &g_b[i] == ib;
    m3s_status st = CALL("m3s_query_support", ex, m3s_query_support(ctx, C.p, qp, ip));
    if (st)
      return;
    allow_elem(&(targ){.t = {.data = ib->data, .dtype = M3S_E4M3}, .b = ib}, 0);
    memset(ib->allow, 1, ib->bytes);
    check_allowed();
    m3s_support_info *inf = ip;
    if (!memchr(inf->kernel, 0, sizeof inf->kernel) || !memchr(inf->reason, 0, sizeof inf->reason))
      die("query_support: kernel or reason is not NUL-terminated");
    int sup = (unsigned)q.act_dtype <= 6u && (ACT & MASK(q.act_dtype)) &&
              (unsigned)q.kv_dtype <= 6u && (KV_MASK & MASK(q.kv_dtype)) &&
              (unsigned)q.index_dtype <= 6u && (IDX_MASK & MASK(q.index_dtype));
    if (inf->supported != sup || (sup && !inf->kernel[0]) || (!sup && !inf->reason[0]) ||
        (sup && inf->reason[0]))
      die("query_support(act %d kv %d idx %d): supported %d kernel \"%s\" reason \"%s\", want "
          "supported %d",
          (int)q.act_dtype, (int)q.kv_dtype, (int)q.index_dtype, inf->supported, inf->kernel,
          inf->reason, sup);
    break;
  }
  case 1: { /* m3s_config_validate */
    cfg_t C;
    gen_cfg(&C, &ex);
    CALL("m3s_config_validate", ex, m3s_config_validate(C.p));
    break;
  }
  case 2: { /* m3s_workspace_size */
    cfg_t C;
    gen_cfg(&C, &ex);
    int64_t mt = rchance(20) ? pick_i64() : rpick(1000),
            ms = rchance(20) ? pick_i64() : rpick(5000);
    if (mt < 0 || ms < 0)
      ex |= EX_FAIL;
    buf_t *ob = balloc("out_bytes", sizeof(size_t));
    size_t *op = (size_t *)ob->data;
    if (rchance(5))
      op = NULL, ex |= EX_FAIL;
    m3s_context *ctx = pick_ctx(&ex);
    ob->out = 1;
    m3s_status st = CALL("m3s_workspace_size", ex, m3s_workspace_size(ctx, C.p, mt, ms, op));
    if (st == M3S_OK) {
      memset(ob->allow = (unsigned char *)calloc(ob->bytes, 1), 1, ob->bytes);
      check_allowed();
      if (*op != 0)
        die("m3s_workspace_size on the CPU: %zu bytes, want 0", *op);
    }
    break;
  }
  case 3: { /* m3s_k2q_csr_rows */
    bat B;
    gen_batch_desc(&B, 0, 4, 1, 4);
    bat *L[1] = {&B};
    assign_pages(L, 1);
    mk_batch(&B, 0, 0, 1, &ex);
    buf_t *ob = balloc("out_rows", sizeof(int64_t));
    int64_t *op = (int64_t *)ob->data;
    if (rchance(5))
      op = NULL, ex |= EX_FAIL;
    m3s_context *ctx = pick_ctx(&ex);
    if (g_skip)
      return;
    for (int i = 0; i < g_nb; i++)
      g_b[i].out = &g_b[i] == ob;
    m3s_status st = CALL("m3s_k2q_csr_rows", ex, m3s_k2q_csr_rows(ctx, B.p, op));
    if (st == M3S_OK) {
      memset(ob->allow = (unsigned char *)calloc(ob->bytes, 1), 1, ob->bytes);
      check_allowed();
      int64_t R = 0;
      for (int r = 0; r < B.num_reqs; r++)
        R += need_pages(B.s[r]);
      if (!ex && *op != R)
        die("m3s_k2q_csr_rows = %lld, want %lld", (long long)*op, (long long)R);
    }
    break;
  }
  case 4: { /* strings, sizes, presets: never NULL, never crash */
    int v = rchance(50) ? (int)rb32() : rpick(20) - 3;
    const char *s1 = m3s_status_string((m3s_status)v);
    const char *s2 = m3s_dtype_name((m3s_dtype)v);
    if (!s1 || !s1[0] || !s2 || !s2[0])
      die("m3s_status_string / m3s_dtype_name(%d) returned NULL or \"\"", v);
    size_t z = m3s_dtype_size((m3s_dtype)v);
    if ((v < 0 || v > 6) ? z != 0 : z == 0)
      die("m3s_dtype_size(%d) = %zu", v, z);
    m3s_layer_config c = m3s_config_minimax_m3(v);
    int good = v == 1 || v == 2 || v == 4 || v == 8;
    m3s_status st = m3s_config_validate(&c);
    if ((st == M3S_OK) != good)
      die("m3s_config_minimax_m3(%d) validates as %d", v, (int)st);
    if (strcmp(m3s_version(), M3S_VERSION) || m3s_version_number() != M3S_VERSION_NUMBER)
      die("version mismatch");
    if (m3s_context_device(g_ctx) >= 0 || m3s_context_device(NULL) != -2)
      die("m3s_context_device");
    break;
  }
  case 5: { /* logging on the CPU context: set, use, reset */
    int level = rchance(30) ? (int)rb32() : rpick(6) - 1;
    ex = (level < 0 || level > 3) ? EX_FAIL : 0;
    m3s_context *ctx = pick_ctx(&ex);
    CALL("m3s_context_set_logging", ex,
         m3s_context_set_logging(ctx, level, rchance(50) ? log_cb : NULL, NULL));
    m3s_context_set_logging(g_ctx, 0, NULL, NULL);
    /* context options: set, read back, reset (no effect on the CPU) */
    int opt = rchance(20) ? (int)rb32() : (int)M3S_OPT_BATCH_INVARIANT;
    int64_t val = rchance(30) ? (int64_t)(int32_t)rb32() : (int64_t)rpick(3);
    ex = (opt != (int)M3S_OPT_BATCH_INVARIANT || (val != 0 && val != 1)) ? EX_FAIL : 0;
    ctx = pick_ctx(&ex);
    CALL("m3s_context_set_option", ex, m3s_context_set_option(ctx, (m3s_option)opt, val));
    int64_t got = -1;
    if (ex == 0 &&
        (m3s_context_get_option(g_ctx, M3S_OPT_BATCH_INVARIANT, &got) != M3S_OK || got != val))
      die("m3s_context_get_option read %lld after setting %lld", (long long)got, (long long)val);
    m3s_context_set_option(g_ctx, M3S_OPT_BATCH_INVARIANT, 0);
    break;
  }
  case 6: { /* contexts: CUDA ordinals fail cleanly in this build; create/destroy */
    int dev = rchance(50) ? rpick(4) : -1 - rpick(3);
    buf_t *ob = balloc("out_ctx", sizeof(m3s_context *));
    m3s_context **op = (m3s_context **)ob->data;
    if (rchance(10))
      op = NULL;
    ex = (dev >= 0 || !op) ? EX_FAIL : 0;
    ob->out = 1;
    m3s_status st = CALL("m3s_context_create", ex, m3s_context_create(dev, op));
    if (st == M3S_OK) {
      memset(ob->allow = (unsigned char *)calloc(ob->bytes, 1), 1, ob->bytes);
      check_allowed();
      m3s_context *c2 = *op;
      if (m3s_context_device(c2) >= 0)
        die("a CPU context reports device %d", m3s_context_device(c2));
      m3s_context_destroy(c2);
    } else if (dev >= 0 && op && st != M3S_ERR_UNSUPPORTED) {
      die("m3s_context_create(%d) without CUDA returned %d, want M3S_ERR_UNSUPPORTED", dev,
          (int)st);
    }
    m3s_context_destroy(NULL);
    break;
  }
  default: break;
  }
}

/* ------------------------------------------------------------ plan_step */
static int ref_count_decodes(int n, const int32_t *ql, int spec) {
  int thr = 1 + spec;
  if (n == 0 || ql[0] > thr)
    return 0;
  int all = 1;
  for (int r = 0; r < n; r++)
    all &= ql[r] == ql[0] || ql[r] == 0;
  if (all)
    return n;
  int r = 0;
  while (r < n && ql[r] == ql[0])
    r++;
  return r;
}

static void op_plan(void) {
  int ex = 0;
  cfg_t C;
  gen_cfg(&C, &ex);
  int bulk = rchance(4); /* very many requests: 32-bit token counts */
  int n = bulk ? (int)(rb32() % 4200000u) : rpick(10);
  int spec = !rchance(20) ? rpick(4) : rchance(50) ? 1024 - rpick(3) : (int)rb16() - 100;
  if (bulk && AVOID(2) && (int64_t)n * (1 + (spec > 0 ? spec : 0)) > ((int64_t)1 << 30))
    n = (int)(((int64_t)1 << 30) / (1 + (spec > 0 ? spec : 0))); /* known bug 2 */
  buf_t *qb = balloc("desc.query_lens", sizeof(int32_t) * (size_t)n);
  buf_t *sb = balloc("desc.seq_lens", sizeof(int32_t) * (size_t)n);
  buf_t *pb = balloc("plan", sizeof(m3s_step_plan));
  if (g_skip)
    return;
  int32_t *ql = (int32_t *)qb->data, *sl = (int32_t *)sb->data;
  if (bulk) {
    int32_t q0 = (int32_t)(rchance(50) ? 1 + spec : rpick(3000));
    int32_t s0 = q0 + (int32_t)rpick(5000);
    for (int r = 0; r < n; r++)
      ql[r] = q0, sl[r] = s0;
    if (n > 0 && rchance(50))
      ql[n - 1] = 2 + spec + rpick(5), sl[n - 1] = ql[n - 1] + 7;
  } else {
    for (int r = 0; r < n; r++) {
      int kind = rpick(4);
      ql[r] = kind == 0 ? 1 + spec : kind == 1 ? rpick(3000) : kind == 2 ? 0 : 1 + rpick(4);
      sl[r] = ql[r] == 0 ? 0 : ql[r] + rpick(5000);
      if (rchance(5))
        sl[r] = rchance(50) ? 0 : ql[r] - 1;
      if (rchance(3))
        ql[r] = -1 - rpick(3);
      if (rchance(3))
        sl[r] = rchance(50) ? -1 : (1 << 30) + 1 + rpick(10);
    }
  }
  m3s_step_desc d = {n, ql, sl, spec};
  if (rchance(3))
    d.num_reqs = -1 - rpick(3);
  if (rchance(3) && n > 0)
    rchance(50) ? (d.query_lens = NULL) : (d.seq_lens = NULL);
  /* expected validity (plan.c's rules, from the header and SPEC 5) */
  int valid = d.num_reqs >= 0 && spec >= 0 && spec <= 1024 &&
              (d.num_reqs == 0 || (d.query_lens && d.seq_lens));
  int64_t tp = 0;
  for (int r = 0; valid && r < n; r++) {
    if (ql[r] < 0 || sl[r] < 0 || sl[r] > (1 << 30) || (sl[r] != 0 && sl[r] < ql[r]) ||
        (ql[r] == 0 && sl[r] != 0))
      valid = 0;
  }
  int nd = valid ? ref_count_decodes(n, ql, spec) : 0;
  int dq = valid && nd > 0 && ql[0] > 0 ? ql[0] : 1 + spec;
  for (int r = nd; valid && r < n; r++)
    tp += ql[r];
  if (valid && tp + (int64_t)nd * dq > ((int64_t)1 << 30))
    valid = 0;
  ex |= valid ? 0 : EX_FAIL;
  m3s_step_plan *pp = (m3s_step_plan *)pb->data;
  if (rchance(3))
    pp = NULL, ex |= EX_FAIL;
  m3s_context *ctx = pick_ctx(&ex);
  for (int i = 0; i < g_nb; i++)
    g_b[i].out = &g_b[i] == pb;
  m3s_status st = CALL("m3s_plan_step", ex, m3s_plan_step(ctx, C.p, &d, pp));
  if (st)
    return;
  memset(pb->allow = (unsigned char *)calloc(pb->bytes, 1), 1, pb->bytes);
  check_allowed();
  if (ex)
    return;
  m3s_step_plan p = *pp;
  int64_t ms = 0, rows = 0, mpq = 0;
  for (int r = 0; r < n; r++)
    ms = sl[r] > ms ? sl[r] : ms;
  for (int r = nd; r < n; r++) {
    rows += need_pages(sl[r]);
    mpq = ql[r] > mpq ? ql[r] : mpq;
  }
  if (p.num_decodes != nd || p.num_prefills != n - nd || p.decode_q_len != dq ||
      p.num_decode_tokens != (int64_t)nd * dq || p.num_prefill_tokens != tp ||
      p.num_tokens != (int64_t)nd * dq + tp || p.max_prefill_q_len != mpq || p.max_seq_len != ms ||
      p.csr_rows != rows || p.workspace_bytes != 0)
    die("plan_step(%d requests, spec %d): decodes %d/%d q_len %d/%d dtok %d ptok %d/%lld "
        "max_seq %lld/%lld rows %lld/%lld",
        n, spec, p.num_decodes, nd, p.decode_q_len, dq, p.num_decode_tokens, p.num_prefill_tokens,
        (long long)tp, (long long)p.max_seq_len, (long long)ms, (long long)p.csr_rows,
        (long long)rows);
}

/* ------------------------------------------------------ k2q chain (SPEC 7) */
/* sparse attention vs CSR + k2q partials + combine on the same valid input */
static void op_chain(void) {
  int ex = 0;
  attn_fx F;
  memset(&F, 0, sizeof F);
  gen_cfg(&F.C, &ex);
  if (ex)
    return;
  safe_dims(&F.C.c, &F.hq, &F.hkv, &F.K);
  bat B;
  gen_batch_desc(&B, 0, F.hq, F.hkv, F.K);
  bat *L[1] = {&B};
  assign_pages(L, 1);
  F.nice = 1;
  int e0 = 0;
  /* no mutations: everything below must be accepted */
  size_t save = g_in_n;
  g_in_n = g_in_i; /* the rest of the decoding reads zeros: nominal, valid */
  mk_batch(&B, 1, 0, 0, &e0);
  mk_q_kv(&F, B.T, B.P, &e0);
  tspec stk = {"topk", M3S_I32, MASK(M3S_I32), 3, {B.T, F.hkv, F.K}, 0, 0, 0, 1, 0, NULL, 0};
  mk(&F.tk, &stk, &e0);
  mk_out_lse(&F, B.T, &e0);
  g_in_n = save;
  fill_kv(&B, &F.kv, F.hkv, 1, 1);
  fill_topk_input(F.hkv, F.K, &B, &F.tk, 0, &e0);
  int hkv = F.hkv, K = F.K, hq = F.hq, T = B.T;
  int64_t R = 0;
  for (int r = 0; r < B.num_reqs; r++)
    R += need_pages(B.s[r]);
  targ rp, qi, qs, qc, po, pl, o2, l2;
  mk_out(&rp, "row_ptr", M3S_I32, 2, hkv, R + 1, 0, 0);
  mk_out(&qi, "q_indices", M3S_I32, 2, hkv, (int64_t)T * K, 0, 0);
  mk_out(&qs, "q_slot", M3S_I32, 2, hkv, (int64_t)T * K, 0, 0);
  mk_out(&qc, "q_count", M3S_I32, 2, T, hkv, 0, 0);
  mk_out(&po, "part_out", M3S_F32, 4, T, hq, K, D);
  mk_out(&pl, "part_lse", M3S_F32, 3, T, hq, K, 0);
  mk_out(&o2, "out(k2q)", F.adt, 3, T, hq, D, 0);
  mk_out(&l2, "lse(k2q)", M3S_F32, 2, T, hq, 0, 0);
  if (g_skip || e0 || T == 0)
    return;
  for (targ *a = &qi; a; a = a == &qi ? &qs : NULL) /* the library's strides for [Hkv, 0] */
    if (a->t.shape[1] == 0)
      a->t.stride[0] = 0;
  OUTPUTS(&F.out, &F.lse);
  CALL("m3s_sparse_attention", 0,
       m3s_sparse_attention(g_ctx, &F.C.c, &B.b, &F.q.t, &F.kv.t, F.sc.p, &F.tk.t, &F.out.t,
                            &F.lse.t, NULL));
  OUTPUTS(&rp, &qi, &qs, &qc);
  CALL("m3s_build_k2q_csr", 0,
       m3s_build_k2q_csr(g_ctx, &F.C.c, &B.b, &F.tk.t, &rp.t, &qi.t, &qs.t, &qc.t, NULL));
  OUTPUTS(&po, &pl);
  CALL("m3s_k2q_attention", 0,
       m3s_k2q_attention(g_ctx, &F.C.c, &B.b, &F.q.t, &F.kv.t, F.sc.p, &rp.t, &qi.t, &qs.t, &po.t,
                         &pl.t, NULL));
  OUTPUTS(&o2, &l2);
  CALL("m3s_combine_partials", 0,
       m3s_combine_partials(g_ctx, &F.C.c, &po.t, &pl.t, &qc.t, &o2.t, &l2.t, NULL));
  if (!F.C.nice || !F.sc.nice || g_alias_in)
    return;
  double e2 = 0, r2 = 0;
  for (int t = 0; t < T; t++)
    for (int h = 0; h < hq; h++) {
      double l1 = tgetf(&F.lse, I4(t, h, 0, 0)), lk = tgetf(&l2, I4(t, h, 0, 0));
      if (!(l1 == lk || fabs(l1 - lk) <= 1e-4 * (1 + fabs(l1))))
        die("k2q chain: row %d head %d: lse %.9g (k2q + combine) vs %.9g (sparse_attention)", t, h,
            lk, l1);
      for (int d = 0; d < D; d++) {
        double a = tgetf(&F.out, I4(t, h, d, 0)), b = tgetf(&o2, I4(t, h, d, 0));
        e2 += (a - b) * (a - b);
        r2 += a * a;
      }
    }
  S.ref_rows += (unsigned long long)T;
  if (!(e2 <= 1e-4 * r2 + 1e-8))
    die("k2q chain: k2q + combine differ from sparse_attention: rel L2 %.3g",
        sqrt(e2 / (r2 + 1e-300)));
}

/* ======================================================================== */
/* entry points                                                             */
/* ======================================================================== */
static void at_exit(void) { write_stats(); }

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  g_trace = getenv("M3S_FUZZ_TRACE") && atoi(getenv("M3S_FUZZ_TRACE")) > 0;
  const char *av = getenv("M3S_FUZZ_AVOID_KNOWN"); /* "1": all known bugs; "0x..": a mask */
  if (av && !strncmp(av, "0x", 2))
    g_avoid = (unsigned)strtoul(av, NULL, 16);
  else if (av && atoi(av) > 0)
    g_avoid = ~0u;
  g_stats_path = getenv("M3S_FUZZ_STATS");
  if (m3s_context_create(-1, &g_ctx) != M3S_OK) {
    fprintf(stderr, "m3s-fuzz: cannot create a CPU context: %s\n", m3s_last_error());
    abort();
  }
  atexit(at_exit);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  g_in = data;
  g_in_n = size;
  g_in_i = 0;
  g_skip = 0;
  g_alias_in = 0;
  g_st = M3S_OK;
  S.inputs++;
  g_opi = (int)(rb() % NOPS);
  g_op = k_opname[g_opi];
  g_rng = rb32() ^ 0x5DEECE66Dull;
  clock_t t0 = clock();
  switch (g_opi) {
  case OP_PLAN: op_plan(); break;
  case OP_INSERT: op_cache_insert(); break;
  case OP_IINSERT: op_index_insert(); break;
  case OP_TOPK: op_index_topk(); break;
  case OP_ATTN: op_attention(); break;
  case OP_STEP: op_step(); break;
  case OP_CSR: op_csr(); break;
  case OP_K2Q: op_k2q_attention(); break;
  case OP_COMBINE: op_combine(); break;
  case OP_MERGE: op_merge(); break;
  case OP_NARROW: op_narrow(); break;
  case OP_MISC: op_misc(); break;
  default: op_chain(); break;
  }
  if (g_skip)
    S.skipped++;
  check_guards();
  bfree_all();
  S.op_sec[g_opi] += (double)(clock() - t0) / CLOCKS_PER_SEC;
  if ((S.inputs & 4095) == 0)
    write_stats();
  return 0;
}
