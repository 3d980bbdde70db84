/* The online-softmax state over one 128-key tile of the paged KV cache,
 * shared by the query-centric attention (attention.c) and the key-centric k2q
 * attention (k2q.c) so that both consume a tile with the same fp32 rounding:
 *   m' = max(m, max_j s_j);  l' = l e^(m-m') + sum_j e^(s_j-m');
 *   acc' = acc e^(m-m') + sum_j e^(s_j-m') v_j;   out = acc/l, lse = m + log l.
 * A head with no visible key stores out = 0 and lse = -inf. The query heads
 * of a KV head are processed in chunks of up to HCHUNK, sharing each tile. */
#ifndef M3S_CPU_TILE_H
#define M3S_CPU_TILE_H

#include "common.h"

#define HCHUNK 16

typedef struct {
  int nh;
  float m[HCHUNK];
  float l[HCHUNK];
  float acc[HCHUNK][M3S_HEAD_DIM];
} attn_state;

typedef struct {
  float k[M3S_BLOCK_SIZE][M3S_HEAD_DIM];
  float v[M3S_BLOCK_SIZE][M3S_HEAD_DIM];
} kv_tile;

static inline void state_init(attn_state *s, int nh) {
  s->nh = nh;
  for (int h = 0; h < nh; h++) {
    s->m[h] = -INFINITY;
    s->l[h] = 0.0f;
    memset(s->acc[h], 0, sizeof s->acc[h]);
  }
}

/* Keys [0, nk) of the block at column col of request r's block-table row
 * (the logical block itself without context parallel), KV head g. */
static inline void load_tile(const m3s_tensor *kv, const m3s_kv_scales *sc, const m3s_batch *b,
                             int r, int g, int64_t col, int nk, kv_tile *tile) {
  int64_t page = m3s_batch_page(&b->block_table, r, col);
  const m3s_tensor *ks = sc ? &sc->k_scale : NULL, *vs = sc ? &sc->v_scale : NULL;
  for (int j = 0; j < nk; j++) {
    int64_t off = page * kv->stride[0] + g * kv->stride[1] + j * kv->stride[2];
    int64_t slot = page * M3S_BLOCK_SIZE + j;
    cpu_load_f32(kv->data, kv->dtype, off, M3S_HEAD_DIM, cpu_scale_at(ks, g, slot), tile->k[j]);
    cpu_load_f32(kv->data, kv->dtype, off + M3S_HEAD_DIM, M3S_HEAD_DIM, cpu_scale_at(vs, g, slot),
                 tile->v[j]);
  }
}

static inline void attend_tile(attn_state *s, float (*q)[M3S_HEAD_DIM], const kv_tile *tile, int nk,
                        float scale) {
  float sc[M3S_BLOCK_SIZE];
  for (int h = 0; h < s->nh; h++) {
    float mx = -INFINITY;
    for (int j = 0; j < nk; j++) {
      sc[j] = cpu_dot128(q[h], tile->k[j]) * scale;
      mx = sc[j] > mx ? sc[j] : mx;
    }
    float m_new = mx > s->m[h] ? mx : s->m[h];
    if (m_new == -INFINITY)
      continue;
    float alpha = expf(s->m[h] - m_new);
    float *acc = s->acc[h];
    float l = s->l[h] * alpha;
    for (int d = 0; d < M3S_HEAD_DIM; d++)
      acc[d] *= alpha;
    for (int j = 0; j < nk; j++) {
      float p = expf(sc[j] - m_new);
      l += p;
      for (int d = 0; d < M3S_HEAD_DIM; d++)
        acc[d] += p * tile->v[j][d];
    }
    s->l[h] = l;
    s->m[h] = m_new;
  }
}

/* Writes head h of the state as out (dtype of out) and lse (may be NULL). */
static inline void state_store(const attn_state *s, int h, void *out, m3s_dtype dt, int64_t out_off,
                        float *lse_p) {
  float row[M3S_HEAD_DIM];
  if (s->l[h] > 0.0f) {
    float inv = 1.0f / s->l[h];
    for (int d = 0; d < M3S_HEAD_DIM; d++)
      row[d] = s->acc[h][d] * inv;
  } else {
    memset(row, 0, sizeof row);
  }
  cpu_store(out, dt, out_off, M3S_HEAD_DIM, 1.0f, row);
  if (lse_p)
    *lse_p = s->l[h] > 0.0f ? s->m[h] + logf(s->l[h]) : -INFINITY;
}

static inline void load_q(const m3s_tensor *q, int64_t t, int h0, int nh,
                          float (*dst)[M3S_HEAD_DIM]) {
  for (int h = 0; h < nh; h++)
    cpu_load_f32(q->data, q->dtype, t * q->stride[0] + (h0 + h) * q->stride[1], M3S_HEAD_DIM, 1.0f,
                 dst[h]);
}

#endif
