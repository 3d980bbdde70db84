/* Context-parallel fixtures (see cp_fixture.h). */
#include "cp_fixture.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const int32_t CP_MIX_QL[5] = {1, 37, 1, 3, 1};
const int32_t CP_MIX_SL[5] = {5000, 3100, 0, 200, 1};
const int32_t CP_SPEC_QL[4] = {4, 4, 4, 4};
const int32_t CP_SPEC_SL[4] = {2600, 0, 700, 4100};

#define B 128
#define D 128

int cp_owner(int cp_size, int interleave, int64_t b) { return (int)((b / interleave) % cp_size); }

static int64_t blocks_of(const fixture *f, int r) { return (f->seqlens[r] + B - 1) / B; }

/* Columns of the owned blocks of request r (-1: not owned), counted. */
static void owned_columns(const fixture *f, int r, int cp_size, int rank, int interleave,
                          int64_t *col) {
  int64_t n = 0;
  for (int64_t b = 0; b < blocks_of(f, r); b++)
    col[b] = cp_owner(cp_size, interleave, b) == rank ? n++ : -1;
}

static void fill_random_bytes(void *p, size_t n, uint64_t *rng) {
  for (size_t i = 0; i < n; i++)
    ((unsigned char *)p)[i] = (unsigned char)rng_next(rng);
}

/* Copies page `from` of f's main cache (rows through the strides of both
 * views, per-slot scales with them) into page `to` of the rank's. */
static void copy_main_page(cp_rank *rk, const fixture *f, int64_t from, int64_t to) {
  size_t es = m3s_dtype_size(f->sp.kv_dtype);
  int64_t fs = f->num_pages * B, rs = rk->num_pages * B;
  for (int g = 0; g < f->cfg.num_kv_heads; g++)
    for (int j = 0; j < B; j++) {
      int64_t src = from * f->kv.stride[0] + g * f->kv.stride[1] + j * f->kv.stride[2];
      int64_t dst = to * rk->kv.stride[0] + g * rk->kv.stride[1] + j * rk->kv.stride[2];
      memcpy((char *)rk->kv_mem + dst * es, (const char *)f->kv_mem + src * es, 2 * D * es);
      if (rk->ks_mem) {
        rk->ks_mem[g * rs + to * B + j] = f->ks_mem[g * fs + from * B + j];
        rk->vs_mem[g * rs + to * B + j] = f->vs_mem[g * fs + from * B + j];
      }
    }
}

static void copy_index_page(cp_rank *rk, const fixture *f, int64_t from, int64_t to) {
  size_t es = m3s_dtype_size(f->sp.idx_dtype);
  memcpy((char *)rk->ic_mem + to * B * D * es, (const char *)f->ic_mem + from * B * D * es,
         (size_t)B * D * es);
}

static void shuffle64(int64_t *a, int64_t n, uint64_t *rng) {
  for (int64_t i = n - 1; i > 0; i--) {
    int64_t j = (int64_t)(rng_next(rng) % (uint64_t)(i + 1)), t = a[i];
    a[i] = a[j];
    a[j] = t;
  }
}

void cp_rank_init(cp_rank *rk, const fixture *f, int cp_size, int rank, int interleave,
                  uint64_t seed) {
  memset(rk, 0, sizeof *rk);
  uint64_t rng = seed * 7919 + (uint64_t)rank;
  int R = f->sp.num_reqs, Hkv = f->cfg.num_kv_heads;
  int64_t owned = 0, *col = malloc(sizeof(int64_t) * (size_t)(f->max_pages + 1));
  for (int r = 0; r < R; r++) {
    owned_columns(f, r, cp_size, rank, interleave, col);
    int64_t n = 0;
    for (int64_t b = 0; b < blocks_of(f, r); b++)
      n += col[b] >= 0;
    owned += n;
    rk->cols = n > rk->cols ? (int)n : rk->cols;
  }
  rk->num_pages = owned + 2; /* two junk pages */
  int64_t P = rk->num_pages, stride = rk->cols + 1;
  rk->bt = malloc(sizeof(int32_t) * (size_t)(R * stride + 1));
  rk->ibt = malloc(sizeof(int32_t) * (size_t)(R * stride + 1));
  for (int64_t i = 0; i < R * stride + 1; i++)
    rk->bt[i] = rk->ibt[i] = -7;
  /* caches in the fixture's layout, every byte random before the copies */
  size_t es = m3s_dtype_size(f->sp.kv_dtype), ies = m3s_dtype_size(f->sp.idx_dtype);
  int64_t shape4[4] = {P, Hkv, B, 2 * D}, st4[4];
  if (f->sp.token_major)
    st4[0] = (int64_t)B * Hkv * 2 * D, st4[1] = 2 * D, st4[2] = (int64_t)Hkv * 2 * D, st4[3] = 1;
  else
    st4[0] = (int64_t)Hkv * B * 2 * D, st4[1] = (int64_t)B * 2 * D, st4[2] = 2 * D, st4[3] = 1;
  rk->kv_mem = malloc((size_t)(P * Hkv * B * 2 * D) * es);
  rk->ic_mem = malloc((size_t)(P * B * D) * ies);
  fill_random_bytes(rk->kv_mem, (size_t)(P * Hkv * B * 2 * D) * es, &rng);
  fill_random_bytes(rk->ic_mem, (size_t)(P * B * D) * ies, &rng);
  rk->kv = m3s_tensor_strided(rk->kv_mem, f->sp.kv_dtype, 4, shape4, st4, M3S_HOST);
  rk->ic = m3s_tensor_make(rk->ic_mem, f->sp.idx_dtype, 3, (int64_t[]){P, B, D}, M3S_HOST);
  rk->scales = f->scales;
  if (f->sp.scale_mode == 2 && (f->sp.kv_dtype == M3S_E4M3 || f->sp.kv_dtype == M3S_E5M2)) {
    rk->ks_mem = malloc(sizeof(float) * (size_t)(Hkv * P * B));
    rk->vs_mem = malloc(sizeof(float) * (size_t)(Hkv * P * B));
    for (int64_t i = 0; i < Hkv * P * B; i++)
      rk->ks_mem[i] = rk->vs_mem[i] = (float)(0.5 + rng_uniform(&rng));
    int64_t sh[2] = {Hkv, P * B};
    rk->scales.k_scale = m3s_tensor_make(rk->ks_mem, M3S_F32, 2, sh, M3S_HOST);
    rk->scales.v_scale = m3s_tensor_make(rk->vs_mem, M3S_F32, 2, sh, M3S_HOST);
  }
  /* owned pages at shuffled local ids, separately for the two caches; the
   * junk pages are the last two ids of each permutation */
  int64_t *perm = malloc(sizeof(int64_t) * (size_t)P), *iperm = malloc(sizeof(int64_t) * (size_t)P);
  for (int64_t p = 0; p < P; p++)
    perm[p] = iperm[p] = p;
  shuffle64(perm, P, &rng);
  shuffle64(iperm, P, &rng);
  int64_t used = 0, fst = f->batch.block_table.stride[0];
  for (int r = 0; r < R; r++) {
    owned_columns(f, r, cp_size, rank, interleave, col);
    for (int64_t b = 0; b < blocks_of(f, r); b++) {
      if (col[b] < 0)
        continue;
      rk->bt[r * stride + col[b]] = (int32_t)perm[used];
      rk->ibt[r * stride + col[b]] = (int32_t)iperm[used];
      copy_main_page(rk, f, f->bt[r * fst + b], perm[used]);
      copy_index_page(rk, f, f->ibt[r * fst + b], iperm[used]);
      used++;
    }
  }
  free(perm);
  free(iperm);
  free(col);
  rk->batch = f->batch;
  int64_t btsh[2] = {R, rk->cols}, btst[2] = {stride, 1};
  rk->batch.block_table = m3s_tensor_strided(rk->bt, M3S_I32, 2, btsh, btst, M3S_HOST);
  rk->batch.index_block_table = m3s_tensor_strided(rk->ibt, M3S_I32, 2, btsh, btst, M3S_HOST);
  rk->batch.cp = (m3s_cp){cp_size, rank, interleave};
}

void cp_rank_free(cp_rank *rk) {
  free(rk->bt);
  free(rk->ibt);
  free(rk->kv_mem);
  free(rk->ic_mem);
  free(rk->ks_mem);
  free(rk->vs_mem);
  memset(rk, 0, sizeof *rk);
}

void cp_exchange_init(cp_exchange *x, const fixture *f, int n, int packed) {
  memset(x, 0, sizeof *x);
  x->n = n;
  int64_t T = f->T, Hq = f->cfg.num_q_heads, Hkv = f->cfg.num_kv_heads, K = f->cfg.topk;
  int64_t cand[4] = {n, T, Hkv, K};
  if (packed) {
    int64_t st[4] = {T * Hkv * 2 * K, Hkv * 2 * K, 2 * K, 1};
    x->cand_bytes = sizeof(int32_t) * (size_t)(n * T * Hkv * 2 * K) + 4;
    x->cand_mem = malloc(x->cand_bytes);
    x->ids = m3s_tensor_strided(x->cand_mem, M3S_I32, 4, cand, st, M3S_HOST);
    x->scores = m3s_tensor_strided((int32_t *)x->cand_mem + K, M3S_F32, 4, cand, st, M3S_HOST);
  } else {
    x->cand_bytes = sizeof(int32_t) * (size_t)(n * T * Hkv * K) + 4;
    x->score_bytes = x->cand_bytes;
    x->cand_mem = malloc(x->cand_bytes);
    x->score_mem = malloc(x->score_bytes);
    x->ids = m3s_tensor_make(x->cand_mem, M3S_I32, 4, cand, M3S_HOST);
    x->scores = m3s_tensor_make(x->score_mem, M3S_F32, 4, cand, M3S_HOST);
  }
  int64_t outs[4] = {n, T, Hq, D}, lses[3] = {n, T, Hq};
  x->outs_bytes = (size_t)(n * T * Hq * D) * m3s_dtype_size(f->sp.act_dtype) + 4;
  x->lses_bytes = sizeof(float) * (size_t)(n * T * Hq) + 4;
  x->outs_mem = malloc(x->outs_bytes);
  x->lses_mem = malloc(x->lses_bytes);
  x->outs = m3s_tensor_make(x->outs_mem, f->sp.act_dtype, 4, outs, M3S_HOST);
  x->lses = m3s_tensor_make(x->lses_mem, M3S_F32, 3, lses, M3S_HOST);
}

void cp_exchange_free(cp_exchange *x) {
  free(x->cand_mem);
  free(x->score_mem);
  free(x->outs_mem);
  free(x->lses_mem);
  memset(x, 0, sizeof *x);
}

static void fill_u32(void *p, size_t bytes, uint32_t v) {
  for (size_t i = 0; i < bytes / 4; i++)
    ((uint32_t *)p)[i] = v;
}

void cp_exchange_poison(cp_exchange *x) {
  fill_u32(x->cand_mem, x->cand_bytes, 0x7fffffffu); /* id 2^31-1; as f32: NaN */
  if (x->score_mem)
    fill_u32(x->score_mem, x->score_bytes, 0x7fffffffu);
  fill_u32(x->outs_mem, x->outs_bytes, 0x7FC17FC1u); /* NaN in bf16, f16 and f32 */
  fill_u32(x->lses_mem, x->lses_bytes, 0x7fc00001u);
}

m3s_tensor cp_slice(const m3s_tensor *t, int64_t i) {
  m3s_tensor s;
  memset(&s, 0, sizeof s);
  s.data = (char *)t->data + i * t->stride[0] * (int64_t)m3s_dtype_size(t->dtype);
  s.dtype = t->dtype;
  s.ndim = t->ndim - 1;
  for (int d = 1; d < t->ndim; d++) {
    s.shape[d - 1] = t->shape[d];
    s.stride[d - 1] = t->stride[d];
  }
  s.device = t->device;
  return s;
}

static m3s_status report(m3s_status st, const char *what, int rank) {
  if (st != M3S_OK)
    fprintf(stderr, "  %s (rank %d): %s\n", what, rank, m3s_last_error());
  return st;
}

m3s_status cp_chain(m3s_context *ctx, const fixture *f, const cp_rank *rk, cp_exchange *x,
                    m3s_tensor *topk, m3s_tensor *out, m3s_tensor *lse, const m3s_exec *e) {
  m3s_status st = M3S_OK;
  for (int n = 0; n < x->n && !st; n++) {
    m3s_tensor ids = cp_slice(&x->ids, n), sc = cp_slice(&x->scores, n);
    st = report(
        m3s_index_topk_candidates(ctx, &f->cfg, &rk[n].batch, &f->iq, &rk[n].ic, &ids, &sc, e),
        "m3s_index_topk_candidates", n);
  }
  for (int n = 0; n < x->n && !st; n++) {
    m3s_tensor o = cp_slice(&x->outs, n), l = cp_slice(&x->lses, n);
    st = report(m3s_merge_topk_candidates(ctx, &f->cfg, &rk[n].batch, &x->ids, &x->scores, topk, e),
                "m3s_merge_topk_candidates", n);
    if (!st)
      st = report(m3s_sparse_attention(ctx, &f->cfg, &rk[n].batch, &f->q, &rk[n].kv, &rk[n].scales,
                                       topk, &o, &l, e),
                  "m3s_sparse_attention", n);
  }
  if (!st)
    st = report(m3s_merge_attn_states_n(ctx, &x->outs, &x->lses, out, lse, e),
                "m3s_merge_attn_states_n", 0);
  return st;
}
