/* Tensor views, dtypes, configs and versions: small constructors with no
 * validation of their own (the operations validate what they are given). */
#include "internal.h"

#include <math.h>
#include <string.h>

const char *m3s_version(void) { return M3S_VERSION; }
int m3s_version_number(void) { return M3S_VERSION_NUMBER; }

size_t m3s_dtype_size(m3s_dtype dt) {
  switch (dt) {
  case M3S_BF16:
  case M3S_F16: return 2;
  case M3S_F32:
  case M3S_I32: return 4;
  case M3S_E4M3:
  case M3S_E5M2: return 1;
  case M3S_I64: return 8;
  }
  return 0;
}

const char *m3s_dtype_name(m3s_dtype dt) {
  switch (dt) {
  case M3S_BF16: return "bf16";
  case M3S_F16: return "f16";
  case M3S_F32: return "f32";
  case M3S_E4M3: return "e4m3";
  case M3S_E5M2: return "e5m2";
  case M3S_I32: return "i32";
  case M3S_I64: return "i64";
  }
  return "?";
}

static m3s_tensor invalid_view(void) {
  m3s_tensor t;
  memset(&t, 0, sizeof t);
  t.ndim = -1;
  t.device = M3S_HOST;
  return t;
}

m3s_tensor m3s_tensor_strided(void *data, m3s_dtype dt, int ndim, const int64_t *shape,
                              const int64_t *stride, int device) {
  if (ndim < 0 || ndim > M3S_MAX_DIMS || (ndim > 0 && (!shape || !stride)))
    return invalid_view();
  m3s_tensor t;
  memset(&t, 0, sizeof t);
  t.data = data;
  t.dtype = dt;
  t.ndim = ndim;
  t.device = device;
  for (int i = 0; i < ndim; i++) {
    t.shape[i] = shape[i];
    t.stride[i] = stride[i];
  }
  return t;
}

m3s_tensor m3s_tensor_make(void *data, m3s_dtype dt, int ndim, const int64_t *shape, int device) {
  int64_t stride[M3S_MAX_DIMS];
  if (ndim < 0 || ndim > M3S_MAX_DIMS || (ndim > 0 && !shape))
    return invalid_view();
  int64_t s = 1;
  for (int i = ndim - 1; i >= 0; i--) {
    stride[i] = s;
    /* a shape whose element count does not fit in int64 has no view */
    if (shape[i] < 0 || (i > 0 && __builtin_mul_overflow(s, shape[i], &s)))
      return invalid_view();
  }
  return m3s_tensor_strided(data, dt, ndim, shape, stride, device);
}

m3s_tensor m3s_tensor_narrow(const m3s_tensor *t, int64_t start, int64_t len) {
  int64_t off;
  if (!t || t->ndim < 1 || t->ndim > M3S_MAX_DIMS || t->shape[0] < 0 || start < 0 || len < 0 ||
      start > t->shape[0] - len)
    return invalid_view();
  if (__builtin_mul_overflow(start, t->stride[0], &off) ||
      __builtin_mul_overflow(off, (int64_t)m3s_dtype_size(t->dtype), &off))
    return invalid_view();
  m3s_tensor r = *t;
  r.shape[0] = len;
  /* integer arithmetic: a device or stride-0 view may point anywhere, and C
   * pointer arithmetic outside an object is undefined */
  if (t->data)
    r.data = (void *)((uintptr_t)t->data + (uintptr_t)off);
  return r;
}

m3s_layer_config m3s_config_minimax_m3(int tp_size) {
  m3s_layer_config c;
  memset(&c, 0, sizeof c);
  switch (tp_size) {
  case 1: c.num_q_heads = 64, c.num_kv_heads = 4; break;
  case 2: c.num_q_heads = 32, c.num_kv_heads = 2; break;
  case 4: c.num_q_heads = 16, c.num_kv_heads = 1; break;
  case 8: c.num_q_heads = 8, c.num_kv_heads = 1; break;
  default: return c;
  }
  c.topk = 16;
  c.init_blocks = 0;
  c.local_blocks = 1;
  c.softmax_scale = (float)(1.0 / sqrt(128.0));
  c.head_dim = M3S_HEAD_DIM;
  c.index_dim = M3S_INDEX_DIM;
  c.block_size = M3S_BLOCK_SIZE;
  return c;
}

m3s_status m3s_config_validate(const m3s_layer_config *cfg) {
  m3s_clear_error();
  return m3s_check_config("m3s_config_validate", cfg);
}
