/* Contexts: one per device, holding all library state (logging settings, the
 * backend's operations table and its own state). The table is chosen here,
 * once: device < 0 selects the CPU reference backend, device >= 0 the CUDA
 * backend in builds that have it. */
#include "internal.h"

#include <stdlib.h>

/* NULL when this build has no backend for the device. */
static const m3s_backend_ops *backend_for(int device) {
  if (device < 0)
    return &m3s_cpu_ops;
#ifdef M3S_WITH_CUDA
  return &m3s_cuda_ops;
#else
  return NULL;
#endif
}

m3s_status m3s_context_create(int device, m3s_context **out_ctx) {
  const char *fn = "m3s_context_create";
  m3s_clear_error();
  if (!out_ctx)
    return m3s_fail(M3S_ERR_NULL, fn, "argument 'out_ctx' is NULL");
  const m3s_backend_ops *ops = backend_for(device);
  if (!ops)
    return m3s_fail(M3S_ERR_UNSUPPORTED, fn,
                    "device %d requested but this build of m3sparse has no CUDA backend "
                    "(rebuild with the CUDA toolkit present)",
                    device);
  m3s_context *ctx = (m3s_context *)calloc(1, sizeof *ctx);
  if (!ctx)
    return m3s_fail(M3S_ERR_NO_MEMORY, fn, "could not allocate %zu bytes", sizeof *ctx);
  ctx->device = device < 0 ? M3S_HOST : device;
  ctx->ops = ops;
  m3s_status st = ops->init ? ops->init(ctx) : M3S_OK;
  if (st) {
    free(ctx);
    return st;
  }
  *out_ctx = ctx;
  return M3S_OK;
}

void m3s_context_destroy(m3s_context *ctx) {
  if (!ctx)
    return;
  if (ctx->ops->fini)
    ctx->ops->fini(ctx);
  free(ctx);
}

int m3s_context_device(const m3s_context *ctx) { return ctx ? ctx->device : -2; }

m3s_status m3s_context_set_logging(m3s_context *ctx, int level, m3s_log_fn fn, void *user) {
  const char *name = "m3s_context_set_logging";
  m3s_clear_error();
  if (!ctx)
    return m3s_fail(M3S_ERR_NULL, name, "argument 'ctx' is NULL");
  if (level < 0 || level > 3)
    return m3s_fail(M3S_ERR_INVALID, name, "level must be in [0, 3], got %d", level);
  ctx->log_level = level;
  ctx->log_fn = fn;
  ctx->log_user = user;
  return M3S_OK;
}

m3s_status m3s_context_set_option(m3s_context *ctx, m3s_option opt, int64_t value) {
  const char *name = "m3s_context_set_option";
  m3s_clear_error();
  if (!ctx)
    return m3s_fail(M3S_ERR_NULL, name, "argument 'ctx' is NULL");
  switch (opt) {
  case M3S_OPT_BATCH_INVARIANT:
    if (value != 0 && value != 1)
      return m3s_fail(M3S_ERR_INVALID, name,
                      "value of M3S_OPT_BATCH_INVARIANT must be 0 or 1, got %lld",
                      (long long)value);
    ctx->batch_invariant = (int)value;
    return M3S_OK;
  }
  return m3s_fail(M3S_ERR_INVALID, name, "argument 'opt' is not an m3s_option: %d", (int)opt);
}

m3s_status m3s_context_get_option(const m3s_context *ctx, m3s_option opt, int64_t *out_value) {
  const char *name = "m3s_context_get_option";
  m3s_clear_error();
  if (!ctx)
    return m3s_fail(M3S_ERR_NULL, name, "argument 'ctx' is NULL");
  if (!out_value)
    return m3s_fail(M3S_ERR_NULL, name, "argument 'out_value' is NULL");
  switch (opt) {
  case M3S_OPT_BATCH_INVARIANT: *out_value = ctx->batch_invariant; return M3S_OK;
  }
  return m3s_fail(M3S_ERR_INVALID, name, "argument 'opt' is not an m3s_option: %d", (int)opt);
}
