/* Status strings, the thread-local last-error text and opt-in logging. The
 * only per-thread state of the library is the error text; everything else
 * lives in a context. */
#include "internal.h"

#include <stdio.h>
#include <string.h>

#define M3S_ERRBUF 512

static _Thread_local char tl_error[M3S_ERRBUF];

const char *m3s_status_string(m3s_status s) {
  switch (s) {
  case M3S_OK: return "M3S_OK: success";
  case M3S_ERR_NULL: return "M3S_ERR_NULL: a required pointer is NULL";
  case M3S_ERR_INVALID: return "M3S_ERR_INVALID: an argument is out of its domain";
  case M3S_ERR_SHAPE: return "M3S_ERR_SHAPE: wrong number of dimensions or size";
  case M3S_ERR_DTYPE: return "M3S_ERR_DTYPE: dtype not accepted";
  case M3S_ERR_LAYOUT: return "M3S_ERR_LAYOUT: strides not accepted";
  case M3S_ERR_RANGE: return "M3S_ERR_RANGE: an index value is out of range";
  case M3S_ERR_DEVICE: return "M3S_ERR_DEVICE: memory is not where the context runs";
  case M3S_ERR_WORKSPACE: return "M3S_ERR_WORKSPACE: workspace too small";
  case M3S_ERR_BATCH: return "M3S_ERR_BATCH: inconsistent batch description";
  case M3S_ERR_UNSUPPORTED: return "M3S_ERR_UNSUPPORTED: not supported by this backend";
  case M3S_ERR_NO_MEMORY: return "M3S_ERR_NO_MEMORY: out of host memory";
  case M3S_ERR_CUDA: return "M3S_ERR_CUDA: a CUDA call failed";
  case M3S_ERR_INTERNAL: return "M3S_ERR_INTERNAL: internal error";
  }
  return "M3S_ERR_?: unknown status";
}

const char *m3s_last_error(void) { return tl_error; }

void m3s_clear_error(void) { tl_error[0] = '\0'; }

m3s_status m3s_fail(m3s_status st, const char *fn, const char *fmt, ...) {
  int n = snprintf(tl_error, sizeof tl_error, "%s: ", fn ? fn : "m3s");
  if (n < 0 || n >= (int)sizeof tl_error)
    return st;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(tl_error + n, sizeof tl_error - (size_t)n, fmt, ap);
  va_end(ap);
  return st;
}

m3s_status m3s_vfail(const m3s_vctx *v, m3s_status st, const char *fmt, ...) {
  int n = v->part ? snprintf(tl_error, sizeof tl_error, "%s: %s part: ", v->fn, v->part)
                  : snprintf(tl_error, sizeof tl_error, "%s: ", v->fn);
  if (n < 0 || n >= (int)sizeof tl_error)
    return st;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(tl_error + n, sizeof tl_error - (size_t)n, fmt, ap);
  va_end(ap);
  return st;
}

void m3s_log(const m3s_context *ctx, int level, const char *fmt, ...) {
  if (!ctx || level > ctx->log_level || level <= 0)
    return;
  char msg[M3S_ERRBUF];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (ctx->log_fn)
    ctx->log_fn(level, msg, ctx->log_user);
  else
    fprintf(stderr, "[m3sparse] %s\n", msg);
}
