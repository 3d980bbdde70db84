/* Argument validation shared by every public operation.
 *
 * Rules (all checked before anything is written):
 *  - tensors: non-NULL view, exact ndim, accepted dtype, memory on the
 *    context's device, strides >= 0 with the innermost == 1, the largest
 *    element offset representable in bytes in int64, data != NULL unless empty;
 *  - outputs: no two indices map to the same element;
 *  - configs: the numbers of SPEC section 1 (D = Di = B = 128, Hq % Hkv == 0,
 *    1 <= K <= M3S_MAX_TOPK, init/local >= 0, scale finite and > 0);
 *  - batches: shapes, the context-parallel fields and, when the context is
 *    the CPU (host data), every value (monotone query_start_loc, 0 <= seq_len
 *    <= max_seq_len, seq_len >= n_r unless padded, pages covered by the block
 *    tables -- the rank's own under context parallel -- page ids < P). */
#include "internal.h"

#include <math.h>
#include <stdio.h>

/* Element count, saturated at INT64_MAX: stride-0 views may have shapes whose
 * product does not fit. 0 when any dimension is 0. */
int64_t m3s_numel(const m3s_tensor *t) {
  int64_t n = 1;
  for (int i = 0; i < t->ndim; i++)
    if (t->shape[i] == 0)
      return 0;
  for (int i = 0; i < t->ndim; i++)
    if (__builtin_mul_overflow(n, t->shape[i], &n))
      return INT64_MAX;
  return n;
}

static const char *dev_name(int dev, char *buf, size_t n) {
  if (dev < 0)
    snprintf(buf, n, "host");
  else
    snprintf(buf, n, "cuda:%d", dev);
  return buf;
}

m3s_status m3s_check_tensor(const m3s_vctx *v, const char *name, const m3s_tensor *t, int ndim,
                            unsigned dtype_mask) {
  if (!t)
    return m3s_vfail(v, M3S_ERR_NULL, "argument '%s' is NULL", name);
  if (t->ndim != ndim)
    return m3s_vfail(v, M3S_ERR_SHAPE, "argument '%s' must have %d dimensions, got %d", name,
                    ndim, t->ndim);
  if ((unsigned)t->dtype > (unsigned)M3S_I64 || !(dtype_mask & M3S_MASK(t->dtype))) {
    char list[96] = "";
    size_t len = 0;
    for (int d = 0; d <= (int)M3S_I64; d++)
      if (dtype_mask & M3S_MASK(d))
        len += (size_t)snprintf(list + len, sizeof list - len, "%s%s", len ? "/" : "",
                                m3s_dtype_name((m3s_dtype)d));
    return m3s_vfail(v, M3S_ERR_DTYPE, "argument '%s' must have dtype %s, got %s (%d)", name,
                    list, m3s_dtype_name(t->dtype), (int)t->dtype);
  }
  bool same_side = (t->device < 0) == (v->device < 0) && (v->device < 0 || t->device == v->device);
  if (!same_side) {
    char a[24], b[24];
    return m3s_vfail(v, M3S_ERR_DEVICE,
                    "argument '%s' lives on %s but the context runs on %s", name,
                    dev_name(t->device, a, sizeof a), dev_name(v->device, b, sizeof b));
  }
  int64_t esize = (int64_t)m3s_dtype_size(t->dtype);
  int64_t max_off = 0;
  bool empty = false;
  for (int i = 0; i < ndim; i++) {
    if (t->shape[i] < 0)
      return m3s_vfail(v, M3S_ERR_SHAPE, "argument '%s': shape[%d] must be >= 0, got %lld",
                      name, i, (long long)t->shape[i]);
    if (t->stride[i] < 0)
      return m3s_vfail(v, M3S_ERR_LAYOUT, "argument '%s': stride[%d] must be >= 0, got %lld",
                      name, i, (long long)t->stride[i]);
    if (t->shape[i] == 0)
      empty = true;
  }
  if (ndim > 0 && t->stride[ndim - 1] != 1 && t->shape[ndim - 1] > 1)
    return m3s_vfail(v, M3S_ERR_LAYOUT,
                    "argument '%s': innermost stride must be 1, got %lld", name,
                    (long long)t->stride[ndim - 1]);
  if (empty)
    return M3S_OK;
  for (int i = 0; i < ndim; i++) {
    int64_t ext = t->shape[i] - 1;
    if (ext > 0 && t->stride[i] > (INT64_MAX / esize - max_off) / ext)
      return m3s_vfail(v, M3S_ERR_LAYOUT,
                      "argument '%s': shape x strides exceed the 64-bit address range", name);
    max_off += ext * t->stride[i];
  }
  if (!t->data)
    return m3s_vfail(v, M3S_ERR_NULL, "argument '%s' has data == NULL but %lld elements",
                    name, (long long)m3s_numel(t));
  return M3S_OK;
}

m3s_status m3s_check_dim(const m3s_vctx *v, const char *name, const m3s_tensor *t, int dim,
                         int64_t want, const char *what) {
  if (t->shape[dim] == want)
    return M3S_OK;
  return m3s_vfail(v, M3S_ERR_SHAPE, "argument '%s': shape[%d] must equal %s (%lld), got %lld",
                  name, dim, what, (long long)want, (long long)t->shape[dim]);
}

m3s_status m3s_check_no_self_overlap(const m3s_vctx *v, const char *name, const m3s_tensor *t) {
  /* Sort dimensions by stride; each stride must step over the whole extent of
   * the dimensions inside it. Sufficient (not necessary) for no overlap, and
   * exact for every permutation of a contiguous layout. An empty view has no
   * elements to overlap, whatever its strides (torch.empty((2, 0)) has
   * strides (1, 1)). */
  if (m3s_numel(t) == 0)
    return M3S_OK;
  int order[M3S_MAX_DIMS];
  int n = 0;
  for (int i = 0; i < t->ndim; i++)
    if (t->shape[i] > 1)
      order[n++] = i;
  for (int i = 1; i < n; i++)
    for (int j = i; j > 0 && t->stride[order[j]] < t->stride[order[j - 1]]; j--) {
      int tmp = order[j];
      order[j] = order[j - 1];
      order[j - 1] = tmp;
    }
  int64_t span = 1;
  for (int i = 0; i < n; i++) {
    int d = order[i];
    if (t->stride[d] < span)
      return m3s_vfail(v, M3S_ERR_LAYOUT,
                      "output '%s' overlaps itself: stride[%d] = %lld is smaller than the %lld "
                      "elements spanned by the inner dimensions",
                      name, d, (long long)t->stride[d], (long long)span);
    /* saturate: an outer dimension can never step over more than INT64_MAX */
    if (__builtin_mul_overflow(t->stride[d], t->shape[d], &span))
      span = INT64_MAX;
  }
  return M3S_OK;
}

m3s_status m3s_check_contiguous(const m3s_vctx *v, const char *name, const m3s_tensor *t) {
  if (m3s_numel(t) == 0) /* no elements: any strides describe the same (empty) memory */
    return M3S_OK;
  int64_t want = 1;
  for (int i = t->ndim - 1; i >= 0; i--) {
    if (t->shape[i] > 1 && t->stride[i] != want)
      return m3s_vfail(v, M3S_ERR_LAYOUT,
                      "argument '%s' must be contiguous: stride[%d] must be %lld, got %lld", name,
                      i, (long long)want, (long long)t->stride[i]);
    want *= t->shape[i];
  }
  return M3S_OK;
}

m3s_status m3s_check_ctx(const char *fn, const m3s_context *ctx) {
  if (!ctx)
    return m3s_fail(M3S_ERR_NULL, fn, "argument 'ctx' is NULL");
  return M3S_OK;
}

m3s_status m3s_check_config(const char *fn, const m3s_layer_config *c) {
  if (!c)
    return m3s_fail(M3S_ERR_NULL, fn, "argument 'cfg' is NULL");
  /* What m3s_config_minimax_m3 returns for a tp_size it does not know: name
   * that cause rather than the first zero field. */
  if (c->num_q_heads == 0 && c->num_kv_heads == 0)
    return m3s_fail(M3S_ERR_INVALID, fn,
                    "cfg.num_q_heads and cfg.num_kv_heads are 0: an unsupported tensor-parallel "
                    "size (m3s_config_minimax_m3 takes tp_size 1, 2, 4 or 8), or a config "
                    "never filled in");
  if (c->head_dim != M3S_HEAD_DIM)
    return m3s_fail(M3S_ERR_INVALID, fn, "cfg.head_dim must be 128, got %d", c->head_dim);
  if (c->index_dim != M3S_INDEX_DIM)
    return m3s_fail(M3S_ERR_INVALID, fn, "cfg.index_dim must be 128, got %d", c->index_dim);
  if (c->block_size != M3S_BLOCK_SIZE)
    return m3s_fail(M3S_ERR_INVALID, fn, "cfg.block_size must be 128, got %d", c->block_size);
  if (c->num_kv_heads < 1)
    return m3s_fail(M3S_ERR_INVALID, fn, "cfg.num_kv_heads must be >= 1, got %d",
                    c->num_kv_heads);
  if (c->num_q_heads < 1 || c->num_q_heads > M3S_MAX_HEADS)
    return m3s_fail(M3S_ERR_INVALID, fn, "cfg.num_q_heads must be in [1, %d], got %d",
                    M3S_MAX_HEADS, c->num_q_heads);
  if (c->num_q_heads % c->num_kv_heads != 0)
    return m3s_fail(M3S_ERR_INVALID, fn,
                    "cfg.num_q_heads (%d) must be a multiple of cfg.num_kv_heads (%d)",
                    c->num_q_heads, c->num_kv_heads);
  if (c->topk < 1 || c->topk > M3S_MAX_TOPK)
    return m3s_fail(M3S_ERR_INVALID, fn, "cfg.topk must be in [1, %d], got %d", M3S_MAX_TOPK,
                    c->topk);
  if (c->init_blocks < 0)
    return m3s_fail(M3S_ERR_INVALID, fn, "cfg.init_blocks must be >= 0, got %d",
                    c->init_blocks);
  if (c->local_blocks < 0)
    return m3s_fail(M3S_ERR_INVALID, fn, "cfg.local_blocks must be >= 0, got %d",
                    c->local_blocks);
  if (c->init_blocks > c->topk - c->local_blocks)
    return m3s_fail(M3S_ERR_INVALID, fn,
                    "cfg.init_blocks + cfg.local_blocks (%d + %d) must be <= cfg.topk (%d): "
                    "forced blocks count inside the budget",
                    c->init_blocks, c->local_blocks, c->topk);
  if (!(c->softmax_scale > 0.0f) || !isfinite(c->softmax_scale))
    return m3s_fail(M3S_ERR_INVALID, fn, "cfg.softmax_scale must be finite and > 0, got %g",
                    (double)c->softmax_scale);
  return M3S_OK;
}

static int32_t read_i32(const m3s_tensor *t, int64_t i) {
  return ((const int32_t *)t->data)[i * (t->ndim ? t->stride[0] : 0)];
}

static m3s_status check_table(const m3s_vctx *v, const char *name, const m3s_tensor *tab,
                              const m3s_batch *b, int64_t num_pages) {
  m3s_status st = m3s_check_tensor(v, name, tab, 2, M3S_MASK(M3S_I32));
  if (st)
    return st;
  if ((st = m3s_check_dim(v, name, tab, 0, b->num_reqs, "batch.num_reqs")))
    return st;
  if (!v->host_values)
    return M3S_OK;
  for (int r = 0; r < b->num_reqs; r++) {
    int64_t pages = m3s_cp_columns(&b->cp, m3s_ceil_div(m3s_batch_seqlen(b, r), M3S_BLOCK_SIZE));
    if (pages > tab->shape[1])
      return m3s_vfail(v, M3S_ERR_RANGE,
                      "'%s': request %d needs %lld pages (seq_len %lld%s) but the table has %lld "
                      "columns",
                      name, r, (long long)pages, (long long)m3s_batch_seqlen(b, r),
                      m3s_cp_active(&b->cp) ? ", the blocks this context-parallel rank owns" : "",
                      (long long)tab->shape[1]);
    if (num_pages < 0)
      continue;
    for (int64_t p = 0; p < pages; p++) {
      int32_t page = m3s_batch_page(tab, r, p);
      if (page < 0 || page >= num_pages)
        return m3s_vfail(v, M3S_ERR_RANGE,
                        "'%s'[%d][%lld] = %d is not a page of the cache (0 <= page < %lld)", name,
                        r, (long long)p, page, (long long)num_pages);
    }
  }
  return M3S_OK;
}

static m3s_status check_batch_values(const m3s_vctx *v, const char *name, const m3s_batch *b) {
  if (b->uniform_q_len == 0) {
    int32_t q0 = read_i32(&b->query_start_loc, 0);
    if (q0 < 0)
      return m3s_vfail(v, M3S_ERR_BATCH, "%s.query_start_loc[0] must be >= 0, got %d", name,
                      q0);
    for (int r = 0; r < b->num_reqs; r++) {
      int32_t a = read_i32(&b->query_start_loc, r), c = read_i32(&b->query_start_loc, r + 1);
      if (c < a)
        return m3s_vfail(v, M3S_ERR_BATCH,
                        "%s.query_start_loc must be non-decreasing: [%d] = %d > [%d] = %d", name,
                        r, a, r + 1, c);
      if (c - a > b->max_q_len)
        return m3s_vfail(v, M3S_ERR_BATCH,
                        "%s: request %d has %d query tokens, more than max_q_len = %d", name, r,
                        c - a, b->max_q_len);
    }
    int64_t total = (int64_t)read_i32(&b->query_start_loc, b->num_reqs) - q0;
    if (total != b->num_tokens)
      return m3s_vfail(v, M3S_ERR_BATCH,
                      "%s: query_start_loc spans %lld tokens but num_tokens = %d", name,
                      (long long)total, b->num_tokens);
  }
  for (int r = 0; r < b->num_reqs; r++) {
    int32_t s = read_i32(&b->seq_lens, r);
    int64_t n = m3s_batch_qlen(b, r);
    if (s < 0 || s > b->max_seq_len)
      return m3s_vfail(v, M3S_ERR_BATCH,
                      "%s.seq_lens[%d] = %d must be in [0, max_seq_len = %lld]", name, r, s,
                      (long long)b->max_seq_len);
    if (s != 0 && s < n)
      return m3s_vfail(v, M3S_ERR_BATCH,
                      "%s.seq_lens[%d] = %d is smaller than the request's %lld query tokens "
                      "(seq_len counts cached + new tokens; 0 marks a padded request)",
                      name, r, s, (long long)n);
  }
  return M3S_OK;
}

m3s_status m3s_check_cp(const m3s_vctx *v, const char *name, const m3s_cp *cp) {
  if (cp->cp_size < 0 || cp->cp_size > M3S_MAX_CP_SIZE)
    return m3s_vfail(v, M3S_ERR_INVALID,
                     "%s.cp_size must be in [0, %d] (0: no context parallel), got %d", name,
                     M3S_MAX_CP_SIZE, cp->cp_size);
  int ranks = cp->cp_size > 1 ? cp->cp_size : 1;
  if (cp->cp_rank < 0 || cp->cp_rank >= ranks)
    return m3s_vfail(v, M3S_ERR_INVALID, "%s.cp_rank must be in [0, %d) (cp_size %d), got %d",
                     name, ranks, cp->cp_size, cp->cp_rank);
  if (cp->blocks_per_interleave < (cp->cp_size > 0 ? 1 : 0))
    return m3s_vfail(v, M3S_ERR_INVALID,
                     "%s.blocks_per_interleave must be >= 1 (0 only with cp_size 0), got %d "
                     "(cp_size %d)",
                     name, cp->blocks_per_interleave, cp->cp_size);
  return M3S_OK;
}

m3s_status m3s_check_batch(const m3s_vctx *v, const char *name, const m3s_batch *b,
                           int64_t num_pages_main, int64_t num_pages_index) {
  m3s_status st;
  char cp_name[64];
  if (!b)
    return m3s_vfail(v, M3S_ERR_NULL, "argument '%s' is NULL", name);
  snprintf(cp_name, sizeof cp_name, "%s.cp", name);
  if ((st = m3s_check_cp(v, cp_name, &b->cp)))
    return st;
  if (b->num_reqs < 0 || b->num_tokens < 0 || b->uniform_q_len < 0 || b->max_q_len < 0 ||
      b->max_seq_len < 0)
    return m3s_vfail(v, M3S_ERR_BATCH,
                    "%s: num_reqs (%d), num_tokens (%d), uniform_q_len (%d), max_q_len (%d) and "
                    "max_seq_len (%lld) must be >= 0",
                    name, b->num_reqs, b->num_tokens, b->uniform_q_len, b->max_q_len,
                    (long long)b->max_seq_len);
  /* An empty part (e.g. no decode requests this step) needs no tensors. */
  if (b->num_reqs == 0 && b->num_tokens == 0)
    return M3S_OK;
  if (b->max_seq_len > ((int64_t)1 << 30))
    return m3s_vfail(v, M3S_ERR_BATCH, "%s.max_seq_len = %lld exceeds 2^30 tokens", name,
                    (long long)b->max_seq_len);
  if (b->uniform_q_len > 0) {
    if ((int64_t)b->num_reqs * b->uniform_q_len != b->num_tokens)
      return m3s_vfail(v, M3S_ERR_BATCH,
                      "%s: uniform batch needs num_tokens == num_reqs * uniform_q_len (%d * %d), "
                      "got %d",
                      name, b->num_reqs, b->uniform_q_len, b->num_tokens);
    if (b->max_q_len != b->uniform_q_len)
      return m3s_vfail(v, M3S_ERR_BATCH,
                      "%s: uniform batch needs max_q_len == uniform_q_len (%d), got %d", name,
                      b->uniform_q_len, b->max_q_len);
  } else {
    if ((st = m3s_check_tensor(v, "batch.query_start_loc", &b->query_start_loc, 1,
                               M3S_MASK(M3S_I32))))
      return st;
    if ((st = m3s_check_dim(v, "batch.query_start_loc", &b->query_start_loc, 0,
                            (int64_t)b->num_reqs + 1, "batch.num_reqs + 1")))
      return st;
  }
  if ((st = m3s_check_tensor(v, "batch.seq_lens", &b->seq_lens, 1, M3S_MASK(M3S_I32))))
    return st;
  if ((st = m3s_check_dim(v, "batch.seq_lens", &b->seq_lens, 0, b->num_reqs, "batch.num_reqs")))
    return st;
  if (v->host_values && (st = check_batch_values(v, name, b)))
    return st;
  if (num_pages_main != -2 &&
      (st = check_table(v, "batch.block_table", &b->block_table, b, num_pages_main)))
    return st;
  if (num_pages_index != -2 &&
      (st = check_table(v, "batch.index_block_table", &b->index_block_table, b, num_pages_index)))
    return st;
  return M3S_OK;
}

static m3s_status check_one_scale(const m3s_vctx *v, const char *name, const m3s_tensor *s,
                                  int64_t num_slots, int num_kv_heads) {
  if (s->ndim < 0 || s->ndim > M3S_MAX_DIMS)
    return m3s_vfail(v, M3S_ERR_SHAPE, "scale '%s' is not a valid view (ndim %d)", name,
                    s->ndim);
  if (!s->data)
    return M3S_OK;
  if (s->ndim == 0 || (s->ndim == 1 && s->shape[0] == 1))
    return m3s_check_tensor(v, name, s, s->ndim, M3S_MASK(M3S_F32));
  m3s_status st = m3s_check_tensor(v, name, s, 2, M3S_MASK(M3S_F32));
  if (st)
    return m3s_vfail(v, st,
                    "scale '%s' must be a scalar (ndim 0 or shape [1]) or [Hkv, P*128] f32; "
                    "got ndim %d",
                    name, s->ndim);
  if ((st = m3s_check_dim(v, name, s, 0, num_kv_heads, "cfg.num_kv_heads")))
    return st;
  return m3s_check_dim(v, name, s, 1, num_slots, "num_pages * 128");
}

m3s_status m3s_check_scales(const m3s_vctx *v, const m3s_kv_scales *s, const m3s_tensor *cache,
                            int num_kv_heads) {
  if (!s || (cache->dtype != M3S_E4M3 && cache->dtype != M3S_E5M2))
    return M3S_OK;
  int64_t slots;
  if (__builtin_mul_overflow(cache->shape[0], (int64_t)M3S_BLOCK_SIZE, &slots))
    slots = INT64_MAX; /* a per-slot scale tensor can never match: rejected below */
  m3s_status st = check_one_scale(v, "scales.k_scale", &s->k_scale, slots, num_kv_heads);
  if (st)
    return st;
  return check_one_scale(v, "scales.v_scale", &s->v_scale, slots, num_kv_heads);
}

m3s_status m3s_check_exec(const m3s_vctx *v, const m3s_exec *e, size_t need) {
  size_t have = e ? e->workspace_bytes : 0;
  if (need == 0)
    return M3S_OK;
  if (!e || !e->workspace || have < need)
    return m3s_vfail(v, M3S_ERR_WORKSPACE,
                    "workspace of %zu bytes is needed, got %zu bytes at %p", need, have,
                    e ? e->workspace : NULL);
  if (!v->host_values && ((uintptr_t)e->workspace & 255u) != 0)
    return m3s_vfail(v, M3S_ERR_LAYOUT, "workspace %p must be 256-byte aligned", e->workspace);
  return M3S_OK;
}
