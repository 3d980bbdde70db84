/* The public operations: validate every argument (structure on every
 * backend; the values of index tensors too when they live on the host), then
 * dispatch to the context's backend. Nothing is written before validation has
 * passed, so a failing call leaves every output untouched. */
#include "internal.h"

#include <stdio.h>
#include <string.h>

#define NO_TABLE (-2)  /* m3s_check_batch: this block table is not used */

static m3s_status begin(const char *fn, const m3s_context *ctx, const m3s_layer_config *cfg,
                        m3s_vctx *v) {
  m3s_status st;
  m3s_clear_error();
  if ((st = m3s_check_ctx(fn, ctx)))
    return st;
  if (cfg && (st = m3s_check_config(fn, cfg)))
    return st;
  v->fn = fn;
  v->part = NULL;
  v->device = ctx->device;
  v->host_values = ctx->ops->host_values;
  return ctx->ops->check_device ? ctx->ops->check_device(ctx, fn) : M3S_OK;
}

static m3s_status begin_cfg(const char *fn, const m3s_context *ctx, const m3s_layer_config *cfg,
                            m3s_vctx *v) {
  if (!cfg) {
    m3s_clear_error();
    return m3s_fail(M3S_ERR_NULL, fn, "argument 'cfg' is NULL");
  }
  return begin(fn, ctx, cfg, v);
}

/* A context-parallel operation the context's backend does not implement. */
static m3s_status not_implemented(const m3s_vctx *v, const m3s_context *ctx, const char *what) {
  return m3s_vfail(v, M3S_ERR_UNSUPPORTED,
                   "context parallel (%s) is not implemented by the %s backend yet "
                   "(m3s_query_support reports it); the CPU backend has it",
                   what, ctx->device < 0 ? "CPU" : "CUDA");
}

static m3s_status check_workspace(const m3s_vctx *v, const m3s_context *ctx,
                                  const m3s_layer_config *cfg, const m3s_batch *b,
                                  const m3s_exec *e) {
  size_t need = 0;
  m3s_status st = m3s_workspace_size(ctx, cfg, b->num_tokens, b->max_seq_len, &need);
  if (st)
    return st;
  return m3s_check_exec(v, e, need);
}

/* Scales only apply to fp8 caches; the header promises they are ignored
 * otherwise, so backends never see them. */
static const m3s_kv_scales *fp8_scales(const m3s_kv_scales *s, const m3s_tensor *cache) {
  return cache->dtype == M3S_E4M3 || cache->dtype == M3S_E5M2 ? s : NULL;
}

/* Values of the slot mapping (host data only): slot < P*128 or negative. */
static m3s_status check_slots(const m3s_vctx *v, const m3s_tensor *slots, int64_t num_pages) {
  if (!v->host_values)
    return M3S_OK;
  int64_t limit = num_pages * M3S_BLOCK_SIZE;
  for (int64_t i = 0; i < slots->shape[0]; i++) {
    int64_t s = slots->dtype == M3S_I64
                    ? ((const int64_t *)slots->data)[i * slots->stride[0]]
                    : ((const int32_t *)slots->data)[i * slots->stride[0]];
    if (s >= limit)
      return m3s_vfail(v, M3S_ERR_RANGE,
                      "slot_mapping[%lld] = %lld is beyond the cache (%lld pages x 128 = %lld "
                      "slots; negative slots skip a token)",
                      (long long)i, (long long)s, (long long)num_pages, (long long)limit);
  }
  return M3S_OK;
}

/* ------------------------------------------------------------------------ */

m3s_status m3s_cache_insert(m3s_context *ctx, const m3s_tensor *k, const m3s_tensor *v_,
                            const m3s_tensor *slot_mapping, m3s_tensor *kv_cache,
                            const m3s_kv_scales *scales, const m3s_exec *exec) {
  m3s_vctx v;
  m3s_status st;
  if ((st = begin("m3s_cache_insert", ctx, NULL, &v)))
    return st;
  if ((st = m3s_check_tensor(&v, "kv_cache", kv_cache, 4, M3S_KV_MASK)) ||
      (st = m3s_check_dim(&v, "kv_cache", kv_cache, 2, M3S_BLOCK_SIZE, "the block size")) ||
      (st = m3s_check_dim(&v, "kv_cache", kv_cache, 3, 2 * M3S_HEAD_DIM, "2 * head_dim")) ||
      (st = m3s_check_no_self_overlap(&v, "kv_cache", kv_cache)))
    return st;
  int64_t hkv = kv_cache->shape[1];
  if ((st = m3s_check_tensor(&v, "k", k, 3, M3S_ACT_MASK)) ||
      (st = m3s_check_dim(&v, "k", k, 1, hkv, "kv_cache.shape[1] (Hkv)")) ||
      (st = m3s_check_dim(&v, "k", k, 2, M3S_HEAD_DIM, "head_dim")))
    return st;
  int64_t t = k->shape[0];
  if ((st = m3s_check_tensor(&v, "v", v_, 3, M3S_MASK(k->dtype))) ||
      (st = m3s_check_dim(&v, "v", v_, 0, t, "k.shape[0] (T)")) ||
      (st = m3s_check_dim(&v, "v", v_, 1, hkv, "kv_cache.shape[1] (Hkv)")) ||
      (st = m3s_check_dim(&v, "v", v_, 2, M3S_HEAD_DIM, "head_dim")))
    return st;
  if ((st = m3s_check_tensor(&v, "slot_mapping", slot_mapping, 1, M3S_SLOT_MASK)) ||
      (st = m3s_check_dim(&v, "slot_mapping", slot_mapping, 0, t, "k.shape[0] (T)")))
    return st;
  if ((st = m3s_check_scales(&v, scales, kv_cache, (int)hkv)) ||
      (st = check_slots(&v, slot_mapping, kv_cache->shape[0])) ||
      (st = m3s_check_exec(&v, exec, 0)))
    return st;
  scales = fp8_scales(scales, kv_cache);
  return ctx->ops->cache_insert(ctx, k, v_, slot_mapping, kv_cache, scales, exec);
}

static m3s_status check_index_cache(const m3s_vctx *v, const m3s_tensor *ic) {
  m3s_status st;
  if ((st = m3s_check_tensor(v, "index_cache", ic, 3, M3S_IDX_MASK)) ||
      (st = m3s_check_dim(v, "index_cache", ic, 1, M3S_BLOCK_SIZE, "the block size")) ||
      (st = m3s_check_dim(v, "index_cache", ic, 2, M3S_INDEX_DIM, "index_dim")))
    return st;
  return m3s_check_contiguous(v, "index_cache", ic);
}

m3s_status m3s_index_cache_insert(m3s_context *ctx, const m3s_tensor *ik,
                                  const m3s_tensor *slot_mapping, m3s_tensor *index_cache,
                                  const m3s_exec *exec) {
  m3s_vctx v;
  m3s_status st;
  if ((st = begin("m3s_index_cache_insert", ctx, NULL, &v)))
    return st;
  if ((st = check_index_cache(&v, index_cache)) ||
      (st = m3s_check_tensor(&v, "ik", ik, 2, M3S_ACT_MASK)) ||
      (st = m3s_check_dim(&v, "ik", ik, 1, M3S_INDEX_DIM, "index_dim")) ||
      (st = m3s_check_tensor(&v, "slot_mapping", slot_mapping, 1, M3S_SLOT_MASK)) ||
      (st = m3s_check_dim(&v, "slot_mapping", slot_mapping, 0, ik->shape[0], "ik.shape[0] (T)")) ||
      (st = check_slots(&v, slot_mapping, index_cache->shape[0])) ||
      (st = m3s_check_exec(&v, exec, 0)))
    return st;
  return ctx->ops->index_cache_insert(ctx, ik, slot_mapping, index_cache, exec);
}

/* ------------------------------------------------------------------------ */

/* A [T, Hkv, K] tensor of the given dtype: top-k rows or candidate rows. */
static m3s_status check_rows_tkk(const m3s_vctx *v, const char *name, const m3s_tensor *t,
                                 m3s_dtype dt, const m3s_layer_config *cfg, int64_t rows,
                                 bool output) {
  m3s_status st;
  if ((st = m3s_check_tensor(v, name, t, 3, M3S_MASK(dt))) ||
      (st = m3s_check_dim(v, name, t, 0, rows, "batch.num_tokens")) ||
      (st = m3s_check_dim(v, name, t, 1, cfg->num_kv_heads, "cfg.num_kv_heads")) ||
      (st = m3s_check_dim(v, name, t, 2, cfg->topk, "cfg.topk")))
    return st;
  return output ? m3s_check_no_self_overlap(v, name, t) : M3S_OK;
}

static m3s_status check_topk_shape(const m3s_vctx *v, const char *name, const m3s_tensor *topk,
                                   const m3s_layer_config *cfg, int64_t t, bool output) {
  return check_rows_tkk(v, name, topk, M3S_I32, cfg, t, output);
}

/* The index cache, the batch (its index table) and iq of a scoring call. */
static m3s_status validate_scoring(const m3s_vctx *v, const m3s_layer_config *cfg,
                                   const m3s_batch *b, const m3s_tensor *iq,
                                   const m3s_tensor *ic) {
  m3s_status st;
  if ((st = check_index_cache(v, ic)) ||
      (st = m3s_check_batch(v, "batch", b, NO_TABLE, ic->shape[0])))
    return st;
  if ((st = m3s_check_tensor(v, "iq", iq, 3, M3S_ACT_MASK)) ||
      (st = m3s_check_dim(v, "iq", iq, 0, b->num_tokens, "batch.num_tokens")) ||
      (st = m3s_check_dim(v, "iq", iq, 1, cfg->num_kv_heads, "cfg.num_kv_heads (index heads)")) ||
      (st = m3s_check_dim(v, "iq", iq, 2, M3S_INDEX_DIM, "index_dim")))
    return st;
  return M3S_OK;
}

/* The whole-cache selection cannot run on a context-parallel rank, whose
 * index table lists only its own blocks. */
static m3s_status refuse_cp(const m3s_vctx *v, const m3s_batch *b) {
  if (!m3s_cp_active(&b->cp))
    return M3S_OK;
  return m3s_vfail(v, M3S_ERR_INVALID,
                   "batch.cp.cp_size = %d: the top-k selection needs the whole index cache; a "
                   "context-parallel rank runs m3s_index_topk_candidates, all-gathers the "
                   "candidates and selects with m3s_merge_topk_candidates",
                   b->cp.cp_size);
}

static m3s_status validate_topk(const m3s_vctx *v, const m3s_layer_config *cfg,
                                const m3s_batch *b, const m3s_tensor *iq, const m3s_tensor *ic,
                                const m3s_tensor *topk) {
  m3s_status st;
  if ((st = validate_scoring(v, cfg, b, iq, ic)) ||
      (st = check_topk_shape(v, "topk", topk, cfg, b->num_tokens, true)))
    return st;
  return refuse_cp(v, b);
}

m3s_status m3s_index_topk(m3s_context *ctx, const m3s_layer_config *cfg, const m3s_batch *batch,
                          const m3s_tensor *iq, const m3s_tensor *index_cache, m3s_tensor *topk,
                          const m3s_exec *exec) {
  m3s_vctx v;
  m3s_status st;
  if ((st = begin_cfg("m3s_index_topk", ctx, cfg, &v)) ||
      (st = validate_topk(&v, cfg, batch, iq, index_cache, topk)) ||
      (st = check_workspace(&v, ctx, cfg, batch, exec)))
    return st;
  return ctx->ops->index_topk(ctx, cfg, batch, iq, index_cache, topk, exec);
}

/* Host values of a top-k buffer as attention reads them: the first
 * min(K, nb(t)) entries of each non-padded row are -1 or distinct ids < nb(t). */
static m3s_status check_topk_values(const m3s_vctx *v, const m3s_layer_config *cfg,
                                    const m3s_batch *b, const m3s_tensor *topk) {
  if (!v->host_values)
    return M3S_OK;
  const int32_t *base = (const int32_t *)topk->data;
  for (int r = 0; r < b->num_reqs; r++) {
    int64_t s = m3s_batch_seqlen(b, r), n = m3s_batch_qlen(b, r), row0 = m3s_batch_row0(b, r);
    if (s == 0)
      continue;
    for (int64_t i = 0; i < n; i++) {
      int64_t pos = s - n + i, nb = pos / M3S_BLOCK_SIZE + 1;
      int64_t kk = nb < cfg->topk ? nb : cfg->topk;
      for (int g = 0; g < cfg->num_kv_heads; g++) {
        const int32_t *row = base + (row0 + i) * topk->stride[0] + g * topk->stride[1];
        for (int64_t a = 0; a < kk; a++) {
          int32_t id = row[a * topk->stride[2]];
          if (id == -1)
            continue;
          if (id < 0 || id >= nb)
            return m3s_vfail(v, M3S_ERR_RANGE,
                            "topk[%lld][%d][%lld] = %d is not a visible block (-1 or 0 <= id < "
                            "nb = %lld)",
                            (long long)(row0 + i), g, (long long)a, id, (long long)nb);
          for (int64_t c = 0; c < a; c++)
            if (row[c * topk->stride[2]] == id)
              return m3s_vfail(v, M3S_ERR_RANGE,
                              "topk[%lld][%d] selects block %d twice (slots %lld and %lld)",
                              (long long)(row0 + i), g, id, (long long)c, (long long)a);
        }
      }
    }
  }
  return M3S_OK;
}

static m3s_status check_kv_cache(const m3s_vctx *v, const m3s_layer_config *cfg,
                                 const m3s_tensor *kv, const m3s_kv_scales *scales) {
  m3s_status st;
  if ((st = m3s_check_tensor(v, "kv_cache", kv, 4, M3S_KV_MASK)) ||
      (st = m3s_check_dim(v, "kv_cache", kv, 1, cfg->num_kv_heads, "cfg.num_kv_heads")) ||
      (st = m3s_check_dim(v, "kv_cache", kv, 2, M3S_BLOCK_SIZE, "the block size")) ||
      (st = m3s_check_dim(v, "kv_cache", kv, 3, 2 * M3S_HEAD_DIM, "2 * head_dim")))
    return st;
  return m3s_check_scales(v, scales, kv, cfg->num_kv_heads);
}

static m3s_status check_out_lse(const m3s_vctx *v, const m3s_tensor *out, const m3s_tensor *lse,
                                int64_t t, int64_t h, unsigned out_mask, const char *t_what) {
  m3s_status st;
  if ((st = m3s_check_tensor(v, "out", out, 3, out_mask)) ||
      (st = m3s_check_dim(v, "out", out, 0, t, t_what)) ||
      (st = m3s_check_dim(v, "out", out, 1, h, "the number of heads")) ||
      (st = m3s_check_dim(v, "out", out, 2, M3S_HEAD_DIM, "head_dim")) ||
      (st = m3s_check_no_self_overlap(v, "out", out)))
    return st;
  if (!lse)
    return M3S_OK;
  if ((st = m3s_check_tensor(v, "lse", lse, 2, M3S_MASK(M3S_F32))) ||
      (st = m3s_check_dim(v, "lse", lse, 0, t, t_what)) ||
      (st = m3s_check_dim(v, "lse", lse, 1, h, "the number of heads")))
    return st;
  return m3s_check_no_self_overlap(v, "lse", lse);
}

static m3s_status validate_attn(const m3s_vctx *v, const m3s_layer_config *cfg,
                                const m3s_batch *b, const m3s_tensor *q, const m3s_tensor *kv,
                                const m3s_kv_scales *scales, const m3s_tensor *topk,
                                const m3s_tensor *out, const m3s_tensor *lse, bool topk_values) {
  m3s_status st;
  if ((st = check_kv_cache(v, cfg, kv, scales)) ||
      (st = m3s_check_batch(v, "batch", b, kv->shape[0], NO_TABLE)))
    return st;
  if ((st = m3s_check_tensor(v, "q", q, 3, M3S_ACT_MASK)) ||
      (st = m3s_check_dim(v, "q", q, 0, b->num_tokens, "batch.num_tokens")) ||
      (st = m3s_check_dim(v, "q", q, 1, cfg->num_q_heads, "cfg.num_q_heads")) ||
      (st = m3s_check_dim(v, "q", q, 2, M3S_HEAD_DIM, "head_dim")) ||
      (st = check_topk_shape(v, "topk", topk, cfg, b->num_tokens, false)) ||
      (st = check_out_lse(v, out, lse, b->num_tokens, cfg->num_q_heads, M3S_MASK(q->dtype),
                          "batch.num_tokens")))
    return st;
  return topk_values ? check_topk_values(v, cfg, b, topk) : M3S_OK;
}

m3s_status m3s_sparse_attention(m3s_context *ctx, const m3s_layer_config *cfg,
                                const m3s_batch *batch, const m3s_tensor *q,
                                const m3s_tensor *kv_cache, const m3s_kv_scales *scales,
                                const m3s_tensor *topk, m3s_tensor *out, m3s_tensor *lse,
                                const m3s_exec *exec) {
  m3s_vctx v;
  m3s_status st;
  if ((st = begin_cfg("m3s_sparse_attention", ctx, cfg, &v)) ||
      (st = validate_attn(&v, cfg, batch, q, kv_cache, scales, topk, out, lse, true)) ||
      (st = check_workspace(&v, ctx, cfg, batch, exec)))
    return st;
  if (m3s_cp_active(&batch->cp) && !ctx->ops->cp_attention)
    return not_implemented(&v, ctx, "m3s_sparse_attention with batch.cp.cp_size > 1");
  scales = fp8_scales(scales, kv_cache);
  return ctx->ops->sparse_attention(ctx, cfg, batch, q, kv_cache, scales, topk, out, lse, exec);
}

/* ------------------------------------------------------------------------ */

typedef struct {
  m3s_tensor q, iq, topk, out, lse;
} step_part;

/* Rows [row0, row0 + rows) of the whole-step tensors, whose dimension 0 the
 * step has checked against decode.num_tokens + prefill.num_tokens. */
static void cut_part(int64_t row0, int64_t rows, const m3s_tensor *q, const m3s_tensor *iq,
                     const m3s_tensor *topk, const m3s_tensor *out, const m3s_tensor *lse,
                     step_part *p) {
  p->q = m3s_tensor_narrow(q, row0, rows);
  p->iq = m3s_tensor_narrow(iq, row0, rows);
  p->topk = m3s_tensor_narrow(topk, row0, rows);
  p->out = m3s_tensor_narrow(out, row0, rows);
  if (lse)
    p->lse = m3s_tensor_narrow(lse, row0, rows);
}

/* The whole-step tensors and the caches both parts share, checked before the
 * parts, so that an error names a part only for what is the part's own: its
 * batch and its workspace. */
static m3s_status validate_step_tensors(const m3s_vctx *v, const m3s_layer_config *cfg, int64_t t,
                                        const m3s_tensor *q, const m3s_tensor *iq,
                                        const m3s_tensor *kv, const m3s_kv_scales *scales,
                                        const m3s_tensor *ic, const m3s_tensor *topk,
                                        const m3s_tensor *out, const m3s_tensor *lse) {
  const char *rows = "decode.num_tokens + prefill.num_tokens";
  m3s_status st;
  if ((st = m3s_check_tensor(v, "q", q, 3, M3S_ACT_MASK)) ||
      (st = m3s_check_dim(v, "q", q, 0, t, rows)) ||
      (st = m3s_check_dim(v, "q", q, 1, cfg->num_q_heads, "cfg.num_q_heads")) ||
      (st = m3s_check_dim(v, "q", q, 2, M3S_HEAD_DIM, "head_dim")) ||
      (st = m3s_check_tensor(v, "iq", iq, 3, M3S_ACT_MASK)) ||
      (st = m3s_check_dim(v, "iq", iq, 0, t, rows)) ||
      (st = m3s_check_dim(v, "iq", iq, 1, cfg->num_kv_heads, "cfg.num_kv_heads (index heads)")) ||
      (st = m3s_check_dim(v, "iq", iq, 2, M3S_INDEX_DIM, "index_dim")) ||
      (st = check_topk_shape(v, "topk", topk, cfg, t, true)) ||
      (st = check_out_lse(v, out, lse, t, cfg->num_q_heads, M3S_MASK(q->dtype), rows)))
    return st;
  if ((st = check_index_cache(v, ic)))
    return st;
  return check_kv_cache(v, cfg, kv, scales);
}

m3s_status m3s_step_forward(m3s_context *ctx, const m3s_layer_config *cfg, const m3s_step *step,
                            const m3s_tensor *q, const m3s_tensor *iq,
                            const m3s_tensor *kv_cache, const m3s_kv_scales *scales,
                            const m3s_tensor *index_cache, m3s_tensor *topk, m3s_tensor *out,
                            m3s_tensor *lse, const m3s_exec *exec) {
  m3s_vctx v;
  m3s_status st;
  if ((st = begin_cfg("m3s_step_forward", ctx, cfg, &v)))
    return st;
  if (!step)
    return m3s_vfail(&v, M3S_ERR_NULL, "argument 'step' is NULL");
  const m3s_batch *parts[2] = {&step->decode, &step->prefill};
  const char *names[2] = {"decode", "prefill"};
  int64_t td = step->decode.num_tokens, tp = step->prefill.num_tokens;
  if (td < 0 || tp < 0)
    return m3s_vfail(&v, M3S_ERR_BATCH,
                     "decode.num_tokens (%lld) and prefill.num_tokens (%lld) must be >= 0",
                     (long long)td, (long long)tp);
  if ((st = validate_step_tensors(&v, cfg, td + tp, q, iq, kv_cache, scales, index_cache, topk,
                                  out, lse)))
    return st;
  step_part pp[2];
  for (int i = 0; i < 2; i++) {
    v.part = names[i];
    cut_part(i == 0 ? 0 : td, i == 0 ? td : tp, q, iq, topk, out, lse, &pp[i]);
    if ((st = validate_topk(&v, cfg, parts[i], &pp[i].iq, index_cache, &pp[i].topk)) ||
        (st = validate_attn(&v, cfg, parts[i], &pp[i].q, kv_cache, scales, &pp[i].topk,
                            &pp[i].out, lse ? &pp[i].lse : NULL, false)) ||
        (st = check_workspace(&v, ctx, cfg, parts[i], exec)))
      return st;
  }
  /* The parts run one after the other on the same stream, so they share the
   * workspace. */
  scales = fp8_scales(scales, kv_cache);
  for (int i = 0; i < 2; i++) {
    if (parts[i]->num_tokens == 0)
      continue;
    if ((st = ctx->ops->index_topk(ctx, cfg, parts[i], &pp[i].iq, index_cache, &pp[i].topk,
                                   exec)) ||
        (st = ctx->ops->sparse_attention(ctx, cfg, parts[i], &pp[i].q, kv_cache, scales,
                                         &pp[i].topk, &pp[i].out, lse ? &pp[i].lse : NULL,
                                         exec)))
      return st;
  }
  return M3S_OK;
}

/* ------------------------------------------------------------------------ */

static int64_t host_csr_rows(const m3s_batch *b) {
  int64_t rows = 0;
  for (int r = 0; r < b->num_reqs; r++)
    rows += m3s_ceil_div(m3s_batch_seqlen(b, r), M3S_BLOCK_SIZE);
  return rows;
}

m3s_status m3s_k2q_csr_rows(const m3s_context *ctx, const m3s_batch *batch, int64_t *out_rows) {
  m3s_vctx v;
  m3s_status st;
  if ((st = begin("m3s_k2q_csr_rows", ctx, NULL, &v)) ||
      (st = m3s_check_batch(&v, "batch", batch, NO_TABLE, NO_TABLE)))
    return st;
  if (!out_rows)
    return m3s_vfail(&v, M3S_ERR_NULL, "argument 'out_rows' is NULL");
  if (!v.host_values)
    return m3s_vfail(&v, M3S_ERR_UNSUPPORTED,
                    "the batch lives on the device; take the row count from the host "
                    "(m3s_step_plan.csr_rows)");
  *out_rows = host_csr_rows(batch);
  return M3S_OK;
}

static m3s_status check_i32_2d(const m3s_vctx *v, const char *name, const m3s_tensor *t,
                               int64_t d0, const char *w0, int64_t d1, const char *w1,
                               bool output) {
  m3s_status st;
  if ((st = m3s_check_tensor(v, name, t, 2, M3S_MASK(M3S_I32))) ||
      (st = m3s_check_dim(v, name, t, 0, d0, w0)) || (st = m3s_check_dim(v, name, t, 1, d1, w1)))
    return st;
  return output ? m3s_check_contiguous(v, name, t) : M3S_OK;
}

/* Host batches only (the row count of a device batch is the caller's to
 * give): row_ptr holds one entry per CSR row plus one. */
static m3s_status check_csr_row_count(const m3s_vctx *v, const m3s_batch *b,
                                      const m3s_tensor *row_ptr) {
  if (!v->host_values)
    return M3S_OK;
  int64_t rows = host_csr_rows(b);
  if (rows == row_ptr->shape[1] - 1)
    return M3S_OK;
  return m3s_vfail(v, M3S_ERR_SHAPE,
                   "argument 'row_ptr': shape[1] must be rows + 1 = %lld (sum of ceil(seq_len "
                   "/ 128)), got %lld",
                   (long long)(rows + 1), (long long)row_ptr->shape[1]);
}

m3s_status m3s_build_k2q_csr(m3s_context *ctx, const m3s_layer_config *cfg,
                             const m3s_batch *batch, const m3s_tensor *topk, m3s_tensor *row_ptr,
                             m3s_tensor *q_indices, m3s_tensor *q_slot, m3s_tensor *q_count,
                             const m3s_exec *exec) {
  m3s_vctx v;
  m3s_status st;
  if ((st = begin_cfg("m3s_build_k2q_csr", ctx, cfg, &v)) ||
      (st = m3s_check_batch(&v, "batch", batch, NO_TABLE, NO_TABLE)) ||
      (st = check_topk_shape(&v, "topk", topk, cfg, batch->num_tokens, false)))
    return st;
  int64_t hkv = cfg->num_kv_heads, tk = (int64_t)batch->num_tokens * cfg->topk;
  if ((st = m3s_check_tensor(&v, "row_ptr", row_ptr, 2, M3S_MASK(M3S_I32))) ||
      (st = m3s_check_dim(&v, "row_ptr", row_ptr, 0, hkv, "cfg.num_kv_heads")))
    return st;
  if (row_ptr->shape[1] < 1)
    return m3s_vfail(&v, M3S_ERR_SHAPE, "argument 'row_ptr': shape[1] must be rows + 1 >= 1");
  if ((st = check_i32_2d(&v, "row_ptr", row_ptr, hkv, "cfg.num_kv_heads", row_ptr->shape[1],
                         "rows + 1", true)) ||
      (st = check_i32_2d(&v, "q_indices", q_indices, hkv, "cfg.num_kv_heads", tk,
                         "num_tokens * topk", true)) ||
      (st = check_i32_2d(&v, "q_slot", q_slot, hkv, "cfg.num_kv_heads", tk, "num_tokens * topk",
                         true)) ||
      (st = check_i32_2d(&v, "q_count", q_count, batch->num_tokens, "batch.num_tokens", hkv,
                         "cfg.num_kv_heads", true)) ||
      (st = m3s_check_exec(&v, exec, 0)))
    return st;
  if (tk > INT32_MAX)
    return m3s_vfail(&v, M3S_ERR_SHAPE, "num_tokens * topk = %lld exceeds int32 indices",
                    (long long)tk);
  if ((st = check_csr_row_count(&v, batch, row_ptr)) ||
      (st = check_topk_values(&v, cfg, batch, topk)))
    return st;
  return ctx->ops->build_k2q_csr(ctx, cfg, batch, topk, row_ptr, q_indices, q_slot, q_count, exec);
}

/* Host values of a CSR: monotone row_ptr within T*K; every entry names a query
 * of the row's own request and a slot < K. */
static m3s_status check_csr_values(const m3s_vctx *v, const m3s_layer_config *cfg,
                                   const m3s_batch *b, const m3s_tensor *row_ptr,
                                   const m3s_tensor *qi, const m3s_tensor *qs) {
  if (!v->host_values)
    return M3S_OK;
  int64_t rows = row_ptr->shape[1] - 1, cap = qi->shape[1];
  if (rows != host_csr_rows(b))
    return m3s_vfail(v, M3S_ERR_SHAPE,
                    "argument 'row_ptr': shape[1] must be rows + 1 = %lld, got %lld",
                    (long long)(host_csr_rows(b) + 1), (long long)row_ptr->shape[1]);
  for (int g = 0; g < cfg->num_kv_heads; g++) {
    const int32_t *rp = (const int32_t *)row_ptr->data + g * row_ptr->stride[0];
    /* empty q_indices/q_slot (T == 0): never dereferenced, and their strides
     * may be anything, so no pointer arithmetic on them */
    const int32_t *qq = m3s_numel(qi) ? (const int32_t *)qi->data + g * qi->stride[0] : NULL;
    const int32_t *ss = m3s_numel(qs) ? (const int32_t *)qs->data + g * qs->stride[0] : NULL;
    if (rp[0] != 0)
      return m3s_vfail(v, M3S_ERR_RANGE, "row_ptr[%d][0] must be 0, got %d", g, rp[0]);
    int64_t row = 0;
    for (int r = 0; r < b->num_reqs; r++) {
      int64_t nbr = m3s_ceil_div(m3s_batch_seqlen(b, r), M3S_BLOCK_SIZE);
      int64_t lo = m3s_batch_row0(b, r), hi = lo + m3s_batch_qlen(b, r);
      for (int64_t blk = 0; blk < nbr; blk++, row++) {
        if (rp[row + 1] < rp[row] || rp[row + 1] > cap)
          return m3s_vfail(v, M3S_ERR_RANGE,
                          "row_ptr[%d][%lld] = %d must be in [row_ptr[%d][%lld] = %d, %lld]", g,
                          (long long)(row + 1), rp[row + 1], g, (long long)row, rp[row],
                          (long long)cap);
        for (int64_t e = rp[row]; e < rp[row + 1]; e++)
          if (qq[e] < lo || qq[e] >= hi || ss[e] < 0 || ss[e] >= cfg->topk)
            return m3s_vfail(v, M3S_ERR_RANGE,
                            "q_indices/q_slot[%d][%lld] = (query %d, slot %d): the query must "
                            "belong to request %d (rows [%lld, %lld)) and the slot be < %d",
                            g, (long long)e, qq[e], ss[e], r, (long long)lo, (long long)hi,
                            cfg->topk);
      }
    }
  }
  return M3S_OK;
}

m3s_status m3s_k2q_attention(m3s_context *ctx, const m3s_layer_config *cfg,
                             const m3s_batch *batch, const m3s_tensor *q,
                             const m3s_tensor *kv_cache, const m3s_kv_scales *scales,
                             const m3s_tensor *row_ptr, const m3s_tensor *q_indices,
                             const m3s_tensor *q_slot, m3s_tensor *part_out,
                             m3s_tensor *part_lse, const m3s_exec *exec) {
  m3s_vctx v;
  m3s_status st;
  if ((st = begin_cfg("m3s_k2q_attention", ctx, cfg, &v)) ||
      (st = check_kv_cache(&v, cfg, kv_cache, scales)) ||
      (st = m3s_check_batch(&v, "batch", batch, kv_cache->shape[0], NO_TABLE)))
    return st;
  int64_t t = batch->num_tokens, hq = cfg->num_q_heads, hkv = cfg->num_kv_heads, k = cfg->topk;
  if ((st = m3s_check_tensor(&v, "q", q, 3, M3S_ACT_MASK)) ||
      (st = m3s_check_dim(&v, "q", q, 0, t, "batch.num_tokens")) ||
      (st = m3s_check_dim(&v, "q", q, 1, hq, "cfg.num_q_heads")) ||
      (st = m3s_check_dim(&v, "q", q, 2, M3S_HEAD_DIM, "head_dim")) ||
      (st = m3s_check_tensor(&v, "row_ptr", row_ptr, 2, M3S_MASK(M3S_I32))) ||
      (st = m3s_check_dim(&v, "row_ptr", row_ptr, 0, hkv, "cfg.num_kv_heads")) ||
      (st = check_i32_2d(&v, "q_indices", q_indices, hkv, "cfg.num_kv_heads", t * k,
                         "num_tokens * topk", false)) ||
      (st = check_i32_2d(&v, "q_slot", q_slot, hkv, "cfg.num_kv_heads", t * k,
                         "num_tokens * topk", false)) ||
      (st = m3s_check_tensor(&v, "part_out", part_out, 4, M3S_MASK(M3S_F32))) ||
      (st = m3s_check_dim(&v, "part_out", part_out, 0, t, "batch.num_tokens")) ||
      (st = m3s_check_dim(&v, "part_out", part_out, 1, hq, "cfg.num_q_heads")) ||
      (st = m3s_check_dim(&v, "part_out", part_out, 2, k, "cfg.topk")) ||
      (st = m3s_check_dim(&v, "part_out", part_out, 3, M3S_HEAD_DIM, "head_dim")) ||
      (st = m3s_check_no_self_overlap(&v, "part_out", part_out)) ||
      (st = m3s_check_tensor(&v, "part_lse", part_lse, 3, M3S_MASK(M3S_F32))) ||
      (st = m3s_check_dim(&v, "part_lse", part_lse, 0, t, "batch.num_tokens")) ||
      (st = m3s_check_dim(&v, "part_lse", part_lse, 1, hq, "cfg.num_q_heads")) ||
      (st = m3s_check_dim(&v, "part_lse", part_lse, 2, k, "cfg.topk")) ||
      (st = m3s_check_no_self_overlap(&v, "part_lse", part_lse)) ||
      (st = m3s_check_exec(&v, exec, 0)))
    return st;
  if (row_ptr->shape[1] < 1)
    return m3s_vfail(&v, M3S_ERR_SHAPE, "argument 'row_ptr': shape[1] must be rows + 1 >= 1");
  if (m3s_cp_active(&batch->cp))
    return m3s_vfail(&v, M3S_ERR_UNSUPPORTED,
                     "batch.cp.cp_size = %d: the k2q path does not take context-parallel "
                     "batches; use m3s_sparse_attention",
                     batch->cp.cp_size);
  scales = fp8_scales(scales, kv_cache);
  if ((st = check_csr_values(&v, cfg, batch, row_ptr, q_indices, q_slot)))
    return st;
  return ctx->ops->k2q_attention(ctx, cfg, batch, q, kv_cache, scales, row_ptr, q_indices, q_slot,
                                 part_out, part_lse, exec);
}

/* Host values of q_count: each a slot count in [0, K]. */
static m3s_status check_q_count_values(const m3s_vctx *v, const m3s_layer_config *cfg,
                                       const m3s_tensor *q_count) {
  if (!v->host_values)
    return M3S_OK;
  for (int64_t i = 0; i < q_count->shape[0]; i++)
    for (int g = 0; g < cfg->num_kv_heads; g++) {
      int32_t c = ((const int32_t *)q_count->data)[i * q_count->stride[0] + g];
      if (c < 0 || c > cfg->topk)
        return m3s_vfail(v, M3S_ERR_RANGE, "q_count[%lld][%d] = %d must be in [0, %d]",
                         (long long)i, g, c, cfg->topk);
    }
  return M3S_OK;
}

m3s_status m3s_combine_partials(m3s_context *ctx, const m3s_layer_config *cfg,
                                const m3s_tensor *part_out, const m3s_tensor *part_lse,
                                const m3s_tensor *q_count, m3s_tensor *out, m3s_tensor *lse,
                                const m3s_exec *exec) {
  m3s_vctx v;
  m3s_status st;
  if ((st = begin_cfg("m3s_combine_partials", ctx, cfg, &v)) ||
      (st = m3s_check_tensor(&v, "part_out", part_out, 4, M3S_MASK(M3S_F32))))
    return st;
  int64_t t = part_out->shape[0], hq = cfg->num_q_heads, k = cfg->topk;
  if ((st = m3s_check_dim(&v, "part_out", part_out, 1, hq, "cfg.num_q_heads")) ||
      (st = m3s_check_dim(&v, "part_out", part_out, 2, k, "cfg.topk")) ||
      (st = m3s_check_dim(&v, "part_out", part_out, 3, M3S_HEAD_DIM, "head_dim")) ||
      (st = m3s_check_tensor(&v, "part_lse", part_lse, 3, M3S_MASK(M3S_F32))) ||
      (st = m3s_check_dim(&v, "part_lse", part_lse, 0, t, "part_out.shape[0] (T)")) ||
      (st = m3s_check_dim(&v, "part_lse", part_lse, 1, hq, "cfg.num_q_heads")) ||
      (st = m3s_check_dim(&v, "part_lse", part_lse, 2, k, "cfg.topk")) ||
      (st = check_i32_2d(&v, "q_count", q_count, t, "part_out.shape[0] (T)", cfg->num_kv_heads,
                         "cfg.num_kv_heads", false)) ||
      (st = check_out_lse(&v, out, lse, t, hq, M3S_ACT_MASK, "part_out.shape[0] (T)")) ||
      (st = m3s_check_exec(&v, exec, 0)))
    return st;
  if ((st = check_q_count_values(&v, cfg, q_count)))
    return st;
  return ctx->ops->combine_partials(ctx, cfg, part_out, part_lse, q_count, out, lse, exec);
}

/* ------------------------------------------------------------------------ */

static m3s_status check_state(const m3s_vctx *v, const char *on, const char *ln,
                              const m3s_tensor *o, const m3s_tensor *l, int64_t t, int64_t h) {
  m3s_status st;
  unsigned mask = M3S_ACT_MASK | M3S_MASK(M3S_F32);
  if ((st = m3s_check_tensor(v, on, o, 3, mask)) || (st = m3s_check_dim(v, on, o, 0, t, "T")) ||
      (st = m3s_check_dim(v, on, o, 1, h, "H")) ||
      (st = m3s_check_dim(v, on, o, 2, M3S_HEAD_DIM, "head_dim")) ||
      (st = m3s_check_tensor(v, ln, l, 2, M3S_MASK(M3S_F32))) ||
      (st = m3s_check_dim(v, ln, l, 0, t, "T")) || (st = m3s_check_dim(v, ln, l, 1, h, "H")))
    return st;
  return M3S_OK;
}

m3s_status m3s_merge_attn_states(m3s_context *ctx, const m3s_tensor *out_a,
                                 const m3s_tensor *lse_a, const m3s_tensor *out_b,
                                 const m3s_tensor *lse_b, m3s_tensor *out, m3s_tensor *lse,
                                 const m3s_exec *exec) {
  m3s_vctx v;
  m3s_status st;
  if ((st = begin("m3s_merge_attn_states", ctx, NULL, &v)) ||
      (st = m3s_check_tensor(&v, "out_a", out_a, 3, M3S_ACT_MASK | M3S_MASK(M3S_F32))))
    return st;
  int64_t t = out_a->shape[0], h = out_a->shape[1];
  if ((st = check_state(&v, "out_a", "lse_a", out_a, lse_a, t, h)) ||
      (st = check_state(&v, "out_b", "lse_b", out_b, lse_b, t, h)) ||
      (st = check_out_lse(&v, out, lse, t, h, M3S_ACT_MASK | M3S_MASK(M3S_F32), "T")) ||
      (st = m3s_check_exec(&v, exec, 0)))
    return st;
  return ctx->ops->merge_attn_states(ctx, out_a, lse_a, out_b, lse_b, out, lse, exec);
}

/* ------------------------------------------------------------------------
 * Context parallel (SPEC section 10)
 * ---------------------------------------------------------------------- */

m3s_status m3s_cp_local_block(const m3s_cp *cp, int64_t block, int64_t *out_column) {
  m3s_vctx v = {"m3s_cp_local_block", NULL, M3S_HOST, 1};
  m3s_status st;
  m3s_clear_error();
  if (!cp || !out_column)
    return m3s_vfail(&v, M3S_ERR_NULL, "argument '%s' is NULL", cp ? "out_column" : "cp");
  if ((st = m3s_check_cp(&v, "cp", cp)))
    return st;
  if (block < 0)
    return m3s_vfail(&v, M3S_ERR_INVALID, "block must be >= 0, got %lld", (long long)block);
  *out_column = m3s_cp_owner(cp, block) == cp->cp_rank ? m3s_cp_column(cp, block) : -1;
  return M3S_OK;
}

m3s_status m3s_index_topk_candidates(m3s_context *ctx, const m3s_layer_config *cfg,
                                     const m3s_batch *batch, const m3s_tensor *iq,
                                     const m3s_tensor *index_cache, m3s_tensor *cand_ids,
                                     m3s_tensor *cand_scores, const m3s_exec *exec) {
  m3s_vctx v;
  m3s_status st;
  if ((st = begin_cfg("m3s_index_topk_candidates", ctx, cfg, &v)) ||
      (st = validate_scoring(&v, cfg, batch, iq, index_cache)) ||
      (st = check_rows_tkk(&v, "cand_ids", cand_ids, M3S_I32, cfg, batch->num_tokens, true)) ||
      (st = check_rows_tkk(&v, "cand_scores", cand_scores, M3S_F32, cfg, batch->num_tokens,
                           true)) ||
      (st = check_workspace(&v, ctx, cfg, batch, exec)))
    return st;
  if (!ctx->ops->index_topk_candidates)
    return not_implemented(&v, ctx, "m3s_index_topk_candidates");
  return ctx->ops->index_topk_candidates(ctx, cfg, batch, iq, index_cache, cand_ids, cand_scores,
                                         exec);
}

/* [N, T, Hkv, K] candidates of the N ranks. */
static m3s_status check_candidates(const m3s_vctx *v, const char *name, const m3s_tensor *t,
                                   m3s_dtype dt, const m3s_layer_config *cfg,
                                   const m3s_batch *b) {
  int64_t ranks = b->cp.cp_size > 1 ? b->cp.cp_size : 1;
  m3s_status st;
  if ((st = m3s_check_tensor(v, name, t, 4, M3S_MASK(dt))) ||
      (st = m3s_check_dim(v, name, t, 0, ranks, "max(batch.cp.cp_size, 1), the number of ranks")) ||
      (st = m3s_check_dim(v, name, t, 1, b->num_tokens, "batch.num_tokens")) ||
      (st = m3s_check_dim(v, name, t, 2, cfg->num_kv_heads, "cfg.num_kv_heads")))
    return st;
  return m3s_check_dim(v, name, t, 3, cfg->topk, "cfg.topk");
}

/* Host values of the candidates the merge reads (rows with nb > K): -1 or a
 * visible block owned by the sending rank, at most once per row. */
static m3s_status check_candidate_values(const m3s_vctx *v, const m3s_layer_config *cfg,
                                         const m3s_batch *b, const m3s_tensor *ids) {
  if (!v->host_values)
    return M3S_OK;
  const int32_t *base = (const int32_t *)ids->data;
  for (int r = 0; r < b->num_reqs; r++) {
    int64_t s = m3s_batch_seqlen(b, r), n = m3s_batch_qlen(b, r), row0 = m3s_batch_row0(b, r);
    for (int64_t i = 0; i < n && s > 0; i++) {
      int64_t t = row0 + i, nb = (s - n + i) / M3S_BLOCK_SIZE + 1;
      if (nb <= cfg->topk)
        continue;
      for (int64_t rank = 0; rank < ids->shape[0]; rank++)
        for (int g = 0; g < cfg->num_kv_heads; g++) {
          const int32_t *row =
              base + rank * ids->stride[0] + t * ids->stride[1] + g * ids->stride[2];
          for (int a = 0; a < cfg->topk; a++) {
            int32_t id = row[a * ids->stride[3]];
            if (id == -1)
              continue;
            if (id < 0 || id >= nb)
              return m3s_vfail(v, M3S_ERR_RANGE,
                               "cand_ids[%lld][%lld][%d][%d] = %d is not a visible block (-1 or "
                               "0 <= id < nb = %lld)",
                               (long long)rank, (long long)t, g, a, id, (long long)nb);
            if (m3s_cp_owner(&b->cp, id) != rank)
              return m3s_vfail(v, M3S_ERR_RANGE,
                               "cand_ids[%lld][%lld][%d][%d] = %d: block %d belongs to rank %d "
                               "(batch.cp: cp_size %d, blocks_per_interleave %d), not to the "
                               "rank %lld that sent it",
                               (long long)rank, (long long)t, g, a, id, id,
                               m3s_cp_owner(&b->cp, id), b->cp.cp_size,
                               b->cp.blocks_per_interleave, (long long)rank);
            for (int c = 0; c < a; c++)
              if (row[c * ids->stride[3]] == id)
                return m3s_vfail(v, M3S_ERR_RANGE,
                                 "cand_ids[%lld][%lld][%d] holds block %d twice (entries %d and "
                                 "%d)",
                                 (long long)rank, (long long)t, g, id, c, a);
          }
        }
    }
  }
  return M3S_OK;
}

m3s_status m3s_merge_topk_candidates(m3s_context *ctx, const m3s_layer_config *cfg,
                                     const m3s_batch *batch, const m3s_tensor *cand_ids,
                                     const m3s_tensor *cand_scores, m3s_tensor *topk,
                                     const m3s_exec *exec) {
  m3s_vctx v;
  m3s_status st;
  if ((st = begin_cfg("m3s_merge_topk_candidates", ctx, cfg, &v)) ||
      (st = m3s_check_batch(&v, "batch", batch, NO_TABLE, NO_TABLE)) ||
      (st = check_candidates(&v, "cand_ids", cand_ids, M3S_I32, cfg, batch)) ||
      (st = check_candidates(&v, "cand_scores", cand_scores, M3S_F32, cfg, batch)) ||
      (st = check_topk_shape(&v, "topk", topk, cfg, batch->num_tokens, true)) ||
      (st = m3s_check_exec(&v, exec, 0)) ||
      (st = check_candidate_values(&v, cfg, batch, cand_ids)))
    return st;
  if (!ctx->ops->merge_topk_candidates)
    return not_implemented(&v, ctx, "m3s_merge_topk_candidates");
  return ctx->ops->merge_topk_candidates(ctx, cfg, batch, cand_ids, cand_scores, topk, exec);
}

m3s_status m3s_merge_attn_states_n(m3s_context *ctx, const m3s_tensor *outs,
                                   const m3s_tensor *lses, m3s_tensor *out, m3s_tensor *lse,
                                   const m3s_exec *exec) {
  m3s_vctx v;
  m3s_status st;
  unsigned mask = M3S_ACT_MASK | M3S_MASK(M3S_F32);
  if ((st = begin("m3s_merge_attn_states_n", ctx, NULL, &v)) ||
      (st = m3s_check_tensor(&v, "outs", outs, 4, mask)))
    return st;
  int64_t n = outs->shape[0], t = outs->shape[1], h = outs->shape[2];
  if (n < 1 || n > M3S_MAX_CP_SIZE)
    return m3s_vfail(&v, M3S_ERR_SHAPE,
                     "argument 'outs': shape[0] (the number of partial results) must be in "
                     "[1, %d], got %lld",
                     M3S_MAX_CP_SIZE, (long long)n);
  if ((st = m3s_check_dim(&v, "outs", outs, 3, M3S_HEAD_DIM, "head_dim")) ||
      (st = m3s_check_tensor(&v, "lses", lses, 3, M3S_MASK(M3S_F32))) ||
      (st = m3s_check_dim(&v, "lses", lses, 0, n, "outs.shape[0] (N)")) ||
      (st = m3s_check_dim(&v, "lses", lses, 1, t, "outs.shape[1] (T)")) ||
      (st = m3s_check_dim(&v, "lses", lses, 2, h, "outs.shape[2] (H)")) ||
      (st = check_out_lse(&v, out, lse, t, h, mask, "outs.shape[1] (T)")) ||
      (st = m3s_check_exec(&v, exec, 0)))
    return st;
  if (!ctx->ops->merge_attn_states_n)
    return not_implemented(&v, ctx, "m3s_merge_attn_states_n");
  return ctx->ops->merge_attn_states_n(ctx, outs, lses, out, lse, exec);
}

/* ------------------------------------------------------------------------ */

/* Why the context's backend cannot run op (NULL: it can). */
static const char *missing_op(const m3s_backend_ops *ops, m3s_op op) {
  switch (op) {
  case M3S_OP_INDEX_TOPK_CANDIDATES:
    return ops->index_topk_candidates ? NULL : "m3s_index_topk_candidates";
  case M3S_OP_MERGE_TOPK_CANDIDATES:
    return ops->merge_topk_candidates ? NULL : "m3s_merge_topk_candidates";
  case M3S_OP_ATTENTION_CP:
    return ops->cp_attention ? NULL : "m3s_sparse_attention with batch.cp.cp_size > 1";
  case M3S_OP_MERGE_N: return ops->merge_attn_states_n ? NULL : "m3s_merge_attn_states_n";
  default: return NULL;
  }
}

m3s_status m3s_query_support(const m3s_context *ctx, const m3s_layer_config *cfg,
                             const m3s_support_query *query, m3s_support_info *info) {
  m3s_vctx v;
  m3s_status st;
  if ((st = begin_cfg("m3s_query_support", ctx, cfg, &v)))
    return st;
  if (!query || !info)
    return m3s_vfail(&v, M3S_ERR_NULL, "argument '%s' is NULL", query ? "info" : "query");
  if ((unsigned)query->op > (unsigned)M3S_OP_MERGE_N ||
      (unsigned)query->layout > (unsigned)M3S_LAYOUT_STRIDED)
    return m3s_vfail(&v, M3S_ERR_INVALID, "query.op (%d) or query.layout (%d) is not an enum value",
                    (int)query->op, (int)query->layout);
  memset(info, 0, sizeof *info);
  const char *why = NULL;
  if ((unsigned)query->act_dtype > M3S_I64 || !(M3S_ACT_MASK & M3S_MASK(query->act_dtype)))
    why = "act_dtype must be bf16 or f16";
  else if ((unsigned)query->kv_dtype > M3S_I64 || !(M3S_KV_MASK & M3S_MASK(query->kv_dtype)))
    why = "kv_dtype must be bf16, f16, e4m3 or e5m2";
  else if ((unsigned)query->index_dtype > M3S_I64 ||
           !(M3S_IDX_MASK & M3S_MASK(query->index_dtype)))
    why = "index_dtype must be bf16 or e4m3";
  if (why) {
    snprintf(info->reason, sizeof info->reason, "%s", why);
    return M3S_OK;
  }
  const char *missing = missing_op(ctx->ops, query->op);
  if (missing) {
    snprintf(info->reason, sizeof info->reason,
             "context parallel (%s) is not implemented by the %s backend yet", missing,
             ctx->device < 0 ? "CPU" : "CUDA");
    return M3S_OK;
  }
  info->supported = 1;
  snprintf(info->kernel, sizeof info->kernel, "%s", ctx->ops->kernel(ctx, query->op));
  return M3S_OK;
}
