/* Host-side reads of a batch's per-request values. Only backends whose batch
 * tensors live on the host (the CPU) call these; they assume validated input. */
#include "internal.h"

int64_t m3s_batch_qlen(const m3s_batch *b, int r) {
  if (b->uniform_q_len > 0)
    return b->uniform_q_len;
  const int32_t *q = (const int32_t *)b->query_start_loc.data;
  int64_t s = b->query_start_loc.stride[0];
  return (int64_t)q[(r + 1) * s] - q[r * s];
}

int64_t m3s_batch_row0(const m3s_batch *b, int r) {
  if (b->uniform_q_len > 0)
    return (int64_t)r * b->uniform_q_len;
  const int32_t *q = (const int32_t *)b->query_start_loc.data;
  int64_t s = b->query_start_loc.stride[0];
  return (int64_t)q[r * s] - q[0];
}

int64_t m3s_batch_seqlen(const m3s_batch *b, int r) {
  return ((const int32_t *)b->seq_lens.data)[r * b->seq_lens.stride[0]];
}

int32_t m3s_batch_page(const m3s_tensor *table, int r, int64_t logical_page) {
  return ((const int32_t *)table->data)[r * table->stride[0] + logical_page * table->stride[1]];
}
