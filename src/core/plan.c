/* Step planning (SPEC section 5): the decode/prefill split of a host-side
 * step description, the sizes each part needs, and the workspace size. */
#include "internal.h"

static m3s_status check_desc(const char *fn, const m3s_step_desc *d) {
  if (!d)
    return m3s_fail(M3S_ERR_NULL, fn, "argument 'desc' is NULL");
  if (d->num_reqs < 0)
    return m3s_fail(M3S_ERR_BATCH, fn, "desc.num_reqs must be >= 0, got %d", d->num_reqs);
  if (d->num_spec_tokens < 0 || d->num_spec_tokens > 1024)
    return m3s_fail(M3S_ERR_BATCH, fn, "desc.num_spec_tokens must be in [0, 1024], got %d",
                    d->num_spec_tokens);
  if (d->num_reqs > 0 && (!d->query_lens || !d->seq_lens))
    return m3s_fail(M3S_ERR_NULL, fn, "desc.query_lens and desc.seq_lens must not be NULL");
  for (int r = 0; r < d->num_reqs; r++) {
    int32_t n = d->query_lens[r], s = d->seq_lens[r];
    if (n < 0)
      return m3s_fail(M3S_ERR_BATCH, fn, "desc.query_lens[%d] = %d must be >= 0", r, n);
    if (s < 0 || s > (1 << 30))
      return m3s_fail(M3S_ERR_BATCH, fn, "desc.seq_lens[%d] = %d must be in [0, 2^30]", r, s);
    if (s != 0 && s < n)
      return m3s_fail(M3S_ERR_BATCH, fn,
                      "desc.seq_lens[%d] = %d is smaller than query_lens[%d] = %d", r, s, r, n);
    if (n == 0 && s != 0)
      return m3s_fail(M3S_ERR_BATCH, fn,
                      "desc.query_lens[%d] = 0 with seq_lens[%d] = %d: a request with no "
                      "tokens this step must be padding (seq_len 0)",
                      r, r, s);
  }
  return M3S_OK;
}

/* Number of leading decode requests (vLLM split_decodes_and_prefills with
 * require_uniform; SPEC section 5): the "first length > threshold" test comes
 * before the "all equal" test, as in vLLM, so a batch of equal-length prompts
 * is all prefill, not decode. */
static int count_decodes(const m3s_step_desc *d) {
  int threshold = 1 + d->num_spec_tokens;
  if (d->num_reqs == 0)
    return 0;
  int32_t first = d->query_lens[0];
  if (first > threshold)
    return 0;
  int r = 0;
  while (r < d->num_reqs && (d->query_lens[r] == first || d->query_lens[r] == 0))
    r++;
  if (r == d->num_reqs)
    return r;
  r = 0;
  while (r < d->num_reqs && d->query_lens[r] == first)
    r++;
  return r;
}

m3s_status m3s_plan_step(const m3s_context *ctx, const m3s_layer_config *cfg,
                         const m3s_step_desc *desc, m3s_step_plan *out) {
  const char *fn = "m3s_plan_step";
  m3s_status st;
  m3s_clear_error();
  if ((st = m3s_check_ctx(fn, ctx)) || (st = m3s_check_config(fn, cfg)) ||
      (st = check_desc(fn, desc)))
    return st;
  if (!out)
    return m3s_fail(M3S_ERR_NULL, fn, "argument 'out_plan' is NULL");
  m3s_step_plan p = {0};
  p.num_decodes = count_decodes(desc);
  p.num_prefills = desc->num_reqs - p.num_decodes;
  int32_t first = desc->num_reqs ? desc->query_lens[0] : 0;
  p.decode_q_len = p.num_decodes > 0 && first > 0 ? first : 1 + desc->num_spec_tokens;
  for (int r = 0; r < p.num_decodes; r++) {
    if (desc->seq_lens[r] > p.max_seq_len)
      p.max_seq_len = desc->seq_lens[r];
  }
  int64_t td = (int64_t)p.num_decodes * p.decode_q_len; /* both < 2^31: no overflow in 64 bits */
  int64_t tp = 0;
  for (int r = p.num_decodes; r < desc->num_reqs; r++) {
    tp += desc->query_lens[r];
    if (desc->query_lens[r] > p.max_prefill_q_len)
      p.max_prefill_q_len = desc->query_lens[r];
    if (desc->seq_lens[r] > p.max_seq_len)
      p.max_seq_len = desc->seq_lens[r];
    p.csr_rows += m3s_ceil_div(desc->seq_lens[r], M3S_BLOCK_SIZE);
  }
  if (tp + td > (int64_t)1 << 30)
    return m3s_fail(M3S_ERR_BATCH, fn, "the step has %lld tokens, more than 2^30",
                    (long long)(tp + td));
  p.num_decode_tokens = (int)td;
  p.num_prefill_tokens = (int)tp;
  p.num_tokens = p.num_decode_tokens + p.num_prefill_tokens;
  if ((st = m3s_workspace_size(ctx, cfg, p.num_tokens, p.max_seq_len, &p.workspace_bytes)))
    return st;
  *out = p;
  return M3S_OK;
}

m3s_status m3s_workspace_size(const m3s_context *ctx, const m3s_layer_config *cfg,
                              int64_t max_tokens, int64_t max_seq_len, size_t *out_bytes) {
  const char *fn = "m3s_workspace_size";
  m3s_status st;
  m3s_clear_error();
  if ((st = m3s_check_ctx(fn, ctx)) || (st = m3s_check_config(fn, cfg)))
    return st;
  if (!out_bytes)
    return m3s_fail(M3S_ERR_NULL, fn, "argument 'out_bytes' is NULL");
  if (max_tokens < 0 || max_seq_len < 0)
    return m3s_fail(M3S_ERR_INVALID, fn,
                    "max_tokens (%lld) and max_seq_len (%lld) must be >= 0",
                    (long long)max_tokens, (long long)max_seq_len);
  *out_bytes = ctx->ops->workspace(ctx, cfg, max_tokens, max_seq_len);
  return M3S_OK;
}
