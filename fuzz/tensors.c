/* tensors.c -- guarded buffers (64 pattern bytes on each side, snapshots,
 * allowed-write maps) and tensor arguments (layouts, strides, the invalid-view
 * mutations). */
#include "fuzz.h"

/* ======================================================================== */
/* guarded buffers                                                          */
/* ======================================================================== */
buf_t g_b[MAX_BUFS];
int g_nb, g_skip;
size_t g_total;
unsigned char g_dummy[GUARD * 2 + 16];

unsigned char pat(size_t i) { return (unsigned char)(0xC3u ^ (unsigned)(i * 37u)); }

buf_t *balloc(const char *name, size_t bytes) {
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

void bfree_all(void) {
  for (int i = 0; i < g_nb; i++) {
    free(g_b[i].mem);
    free(g_b[i].snap);
    free(g_b[i].allow);
  }
  g_nb = 0;
  g_total = 0;
}

void check_guards(void) {
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

int g_alias_in; /* an input view aliases itself (stride 0): skip numeric checks */

void strides_for(int nd, const int64_t *shape, const int *order, const int *pad,
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

int64_t numel_of(const m3s_tensor *t, int nd) {
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
int is_contig(const m3s_tensor *t, int nd) {
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
int64_t extent_of(const m3s_tensor *t, int nd) {
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

void mk(targ *a, const tspec *s, int *ex) {
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
int64_t toff(const targ *a, const int64_t *idx) {
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
void *tptr(const targ *a, const int64_t *idx) {
  int64_t o = toff(a, idx);
  return o < 0 ? NULL : (unsigned char *)a->t.data + o * (int64_t)esz(a->t.dtype);
}
void tsetf(const targ *a, const int64_t *idx, double v) {
  void *p = tptr(a, idx);
  if (p)
    enc(p, a->t.dtype, v);
}
double tgetf(const targ *a, const int64_t *idx) {
  void *p = tptr(a, idx);
  return p ? dec(p, a->t.dtype) : NAN;
}
void tseti(const targ *a, const int64_t *idx, int64_t v) {
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
int64_t tgeti(const targ *a, const int64_t *idx) {
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

/* n consecutive innermost elements starting at idx (stride 1, in bounds), or NULL */
unsigned char *trow(const targ *a, const int64_t *idx, int64_t n) {
  unsigned char *p = (unsigned char *)tptr(a, idx);
  if (!p || a->t.stride[a->ndim - 1] != 1 || idx[a->ndim - 1] + n > a->t.shape[a->ndim - 1])
    return NULL;
  return p;
}
void row_get(const targ *a, const int64_t *idx, int n, double *dst) {
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
void row_set_grid(const targ *a, const int64_t *idx, int n) {
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
void fill_nice(const targ *a) {
  if (!a->b || a->broken)
    return;
  size_t es = esz(a->t.dtype);
  if (a->t.dtype > M3S_I64 || (int)a->t.dtype < 0)
    return;
  for (size_t i = 0; i + es <= a->b->bytes; i += es)
    enc(a->b->data + i, a->t.dtype, grid());
}
void fill_nan(const targ *a) {
  if (!a->b || a->broken)
    return;
  size_t es = esz(a->t.dtype);
  if (a->t.dtype > M3S_I64 || (int)a->t.dtype < 0)
    return;
  for (size_t i = 0; i + es <= a->b->bytes; i += es)
    put_nan(a->b->data + i, a->t.dtype);
}

/* ---- allowed-write maps ---- */
void allow_elem(const targ *a, int64_t off) {
  size_t es = esz(a->t.dtype);
  buf_t *b = a->b;
  if (!b->allow)
    b->allow = (unsigned char *)calloc(b->bytes + 1, 1);
  int64_t byte = (int64_t)((unsigned char *)a->t.data - b->data) + off * (int64_t)es;
  if (byte < 0 || (size_t)byte + es > b->bytes)
    die("harness: allowed element of '%s' outside its buffer", a->name);
  memset(b->allow + byte, 1, es);
}
void allow_idx(const targ *a, const int64_t *idx) {
  int64_t o = toff(a, idx);
  if (o >= 0)
    allow_elem(a, o);
}
void allow_view(const targ *a) {
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
void check_allowed(void) {
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

