/* Test fixtures and the fp64 reference (see ref.h). */
#include "ref.h"

#include "ref_core.h"

#include "cpu/convert.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define B 128
#define D 128

uint64_t rng_next(uint64_t *s) {
  /* splitmix64: tiny, good enough for test data, reproducible by seed */
  uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

double rng_uniform(uint64_t *s) { return (double)(rng_next(s) >> 11) * (1.0 / 9007199254740992.0); }

float rng_normal(uint64_t *s) {
  double u1 = rng_uniform(s), u2 = rng_uniform(s);
  if (u1 < 1e-300)
    u1 = 1e-300;
  return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

void store_elem(void *base, m3s_dtype dt, int64_t off, float v) {
  switch (dt) {
  case M3S_BF16: ((uint16_t *)base)[off] = m3s_f32_to_bf16(v); break;
  case M3S_F16: ((uint16_t *)base)[off] = m3s_f32_to_f16(v); break;
  case M3S_F32: ((float *)base)[off] = v; break;
  case M3S_E4M3: ((uint8_t *)base)[off] = m3s_f32_to_e4m3(v); break;
  case M3S_E5M2: ((uint8_t *)base)[off] = m3s_f32_to_e5m2(v); break;
  default: break;
  }
}

/* The reference decodes the stored codes itself, from the format
 * definitions, not with the backend's converter (src/cpu/convert.c, whose
 * fp8 tables the CPU backend reads): a wrong decode table in the backend
 * then shows as a reference mismatch in every test that uses the format, not
 * only in test_convert. (Encoding -- store_elem, used to make test data --
 * still goes through the backend's converter: whatever codes it writes, the
 * reference reads them independently.) */
static double dec_sign(unsigned s, double v) { return s ? -v : v; }
static double dec_bf16(uint16_t h) {
  unsigned e = (h >> 7) & 0xFF, m = h & 0x7F;
  if (e == 0xFF)
    return m ? NAN : dec_sign(h >> 15, INFINITY);
  return dec_sign(h >> 15, e ? ldexp(128 + m, (int)e - 134) : ldexp(m, -133));
}
static double dec_f16(uint16_t h) {
  unsigned e = (h >> 10) & 0x1F, m = h & 0x3FF;
  if (e == 0x1F)
    return m ? NAN : dec_sign(h >> 15, INFINITY);
  return dec_sign(h >> 15, e ? ldexp(1024 + m, (int)e - 25) : ldexp(m, -24));
}
static double dec_e4m3(uint8_t b) { /* no infinities; S.1111.111 is NaN */
  unsigned e = (b >> 3) & 0xF, m = b & 7;
  if (e == 0xF && m == 7)
    return NAN;
  return dec_sign(b >> 7, e ? ldexp(8 + m, (int)e - 10) : ldexp(m, -9));
}
static double dec_e5m2(uint8_t b) {
  unsigned e = (b >> 2) & 0x1F, m = b & 3;
  if (e == 0x1F)
    return m ? NAN : dec_sign(b >> 7, INFINITY);
  return dec_sign(b >> 7, e ? ldexp(4 + m, (int)e - 17) : ldexp(m, -16));
}

double load_elem(const void *base, m3s_dtype dt, int64_t off) {
  switch (dt) {
  case M3S_BF16: return dec_bf16(((const uint16_t *)base)[off]);
  case M3S_F16: return dec_f16(((const uint16_t *)base)[off]);
  case M3S_F32: return ((const float *)base)[off];
  case M3S_E4M3: return dec_e4m3(((const uint8_t *)base)[off]);
  case M3S_E5M2: return dec_e5m2(((const uint8_t *)base)[off]);
  default: return 0.0;
  }
}

int fx_k2q_shapes(m3s_context *ctx, const fixture *f, k2q_shapes *s) {
  int64_t T = f->T, hq = f->cfg.num_q_heads, hkv = f->cfg.num_kv_heads, K = f->cfg.topk;
  memset(s, 0, sizeof *s);
  if (m3s_k2q_csr_rows(ctx, &f->batch, &s->rows) != M3S_OK) {
    fprintf(stderr, "m3s_k2q_csr_rows: %s\n", m3s_last_error());
    return 0;
  }
  s->row_ptr[0] = hkv, s->row_ptr[1] = s->rows + 1;
  s->q_idx[0] = hkv, s->q_idx[1] = T * K;
  s->q_cnt[0] = T, s->q_cnt[1] = hkv;
  s->part_out[0] = T, s->part_out[1] = hq, s->part_out[2] = K, s->part_out[3] = 128;
  s->part_lse[0] = T, s->part_lse[1] = hq, s->part_lse[2] = K;
  return 1;
}

int64_t shape_elems(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; i++)
    n *= shape[i];
  return n;
}

double lse_max_diff(const float *a, const float *b, int64_t n) {
  double worst = 0;
  for (int64_t i = 0; i < n; i++) {
    if (isinf(a[i]) || isinf(b[i]) || isnan(a[i]) || isnan(b[i])) {
      if (!(a[i] == b[i]))
        return INFINITY;
      continue;
    }
    double d = fabs((double)a[i] - (double)b[i]);
    worst = d > worst ? d : worst;
  }
  return worst;
}

size_t tensor_bytes(const m3s_tensor *t) {
  return (size_t)shape_elems(t->ndim, t->shape) * m3s_dtype_size(t->dtype);
}

m3s_tensor fx_k2q_view(const k2q_shapes *s, int i, void *data, int device) {
  const int64_t *shape[K2Q_NBUF] = {s->row_ptr, s->q_idx,    s->q_idx,
                                    s->q_cnt,   s->part_out, s->part_lse};
  static const int nd[K2Q_NBUF] = {2, 2, 2, 2, 4, 3};
  return m3s_tensor_make(data, i < 4 ? M3S_I32 : M3S_F32, nd[i], shape[i], device);
}

m3s_status fx_chain_step(m3s_context *ctx, fixture *f, m3s_tensor *k2q, m3s_tensor *out,
                         m3s_tensor *lse, const m3s_exec *e, int step) {
  switch (step) {
  case 0: return m3s_index_topk(ctx, &f->cfg, &f->batch, &f->iq, &f->ic, &f->topk, e);
  case 1:
    return m3s_sparse_attention(ctx, &f->cfg, &f->batch, &f->q, &f->kv, &f->scales, &f->topk,
                                &f->out, &f->lse, e);
  case 2:
    return m3s_build_k2q_csr(ctx, &f->cfg, &f->batch, &f->topk, &k2q[0], &k2q[1], &k2q[2], &k2q[3],
                             e);
  case 3:
    return m3s_k2q_attention(ctx, &f->cfg, &f->batch, &f->q, &f->kv, &f->scales, &k2q[0], &k2q[1],
                             &k2q[2], &k2q[4], &k2q[5], e);
  default: return m3s_combine_partials(ctx, &f->cfg, &k2q[4], &k2q[5], &k2q[3], out, lse, e);
  }
}

int fx_run_chain(m3s_context *ctx, fixture *f, m3s_tensor *k2q, m3s_tensor *out, m3s_tensor *lse,
                 const m3s_exec *e) {
  for (int step = 0; step < FX_CHAIN_STEPS; step++)
    if (fx_chain_step(ctx, f, k2q, out, lse, e, step) != M3S_OK)
      return 0;
  return 1;
}

double rel_l2(const void *got, m3s_dtype got_dt, const void *want, m3s_dtype want_dt, int64_t n) {
  double e = 0, r = 0;
  for (int64_t i = 0; i < n; i++) {
    double x = load_elem(got, got_dt, i), y = load_elem(want, want_dt, i);
    e += (x - y) * (x - y);
    r += y * y;
  }
  return r > 0 ? sqrt(e / r) : sqrt(e);
}

static void shuffle(int32_t *a, int64_t n, uint64_t *rng) {
  for (int64_t i = n - 1; i > 0; i--) {
    int64_t j = (int64_t)(rng_next(rng) % (uint64_t)(i + 1));
    int32_t t = a[i];
    a[i] = a[j];
    a[j] = t;
  }
}

static float grid_value(uint64_t *rng) { return (float)((int)(rng_next(rng) % 9) - 4) / 4.0f; }

m3s_layer_config fx_cfg(int hq, int hkv, int k, int init, int local) {
  m3s_layer_config c = m3s_config_minimax_m3(1);
  c.num_q_heads = hq;
  c.num_kv_heads = hkv;
  c.topk = k;
  c.init_blocks = init;
  c.local_blocks = local;
  return c;
}

fx_spec fx_spec_default(m3s_layer_config cfg, int nreq, const int32_t *ql, const int32_t *sl,
                        uint64_t seed) {
  fx_spec s;
  memset(&s, 0, sizeof s);
  s.cfg = cfg;
  s.num_reqs = nreq;
  s.qlens = ql;
  s.seqlens = sl;
  s.act_dtype = M3S_BF16;
  s.kv_dtype = M3S_BF16;
  s.idx_dtype = M3S_BF16;
  s.seed = seed;
  return s;
}

void fx_init(fixture *f, const fx_spec *sp) {
  memset(f, 0, sizeof *f);
  f->sp = *sp;
  f->cfg = sp->cfg;
  uint64_t rng = sp->seed ? sp->seed : 1;
  int R = sp->num_reqs, Hq = f->cfg.num_q_heads, Hkv = f->cfg.num_kv_heads, K = f->cfg.topk;
  f->qlens = calloc((size_t)R + 1, sizeof(int32_t));
  f->seqlens = calloc((size_t)R + 1, sizeof(int32_t));
  f->qsl = calloc((size_t)R + 1, sizeof(int32_t));
  int64_t need = 0;
  int max_q = 0;
  int64_t max_s = 0;
  f->qsl[0] = sp->qsl_base;
  for (int r = 0; r < R; r++) {
    f->qlens[r] = sp->qlens[r];
    f->seqlens[r] = sp->seqlens[r];
    f->qsl[r + 1] = f->qsl[r] + f->qlens[r];
    int64_t pages = (f->seqlens[r] + B - 1) / B;
    need += pages;
    f->max_pages = pages > f->max_pages ? (int)pages : f->max_pages;
    max_q = f->qlens[r] > max_q ? f->qlens[r] : max_q;
    max_s = f->seqlens[r] > max_s ? f->seqlens[r] : max_s;
  }
  f->T = f->qsl[R] - f->qsl[0];
  f->max_pages += 1;
  f->num_pages = need + sp->extra_pages + 1;
  int64_t P = f->num_pages;
  /* Block tables: distinct random pages per request, separate permutations
   * for the main and index caches, row stride larger than the row. */
  int64_t bt_stride = f->max_pages + 3;
  f->bt = malloc(sizeof(int32_t) * (size_t)(R * bt_stride + 1));
  f->ibt = malloc(sizeof(int32_t) * (size_t)(R * bt_stride + 1));
  int32_t *perm = malloc(sizeof(int32_t) * (size_t)P), *iperm = malloc(sizeof(int32_t) * (size_t)P);
  for (int64_t p = 0; p < P; p++)
    perm[p] = iperm[p] = (int32_t)p;
  shuffle(perm, P, &rng);
  shuffle(iperm, P, &rng);
  int64_t used = 0;
  for (int r = 0; r < R; r++) {
    int64_t pages = (f->seqlens[r] + B - 1) / B;
    for (int64_t c = 0; c < bt_stride; c++) {
      f->bt[r * bt_stride + c] = c < pages ? perm[used + c] : -7;
      f->ibt[r * bt_stride + c] = c < pages ? iperm[used + c] : -7;
    }
    used += pages;
  }
  free(perm);
  free(iperm);
  /* Main cache, every page random. */
  size_t kv_es = m3s_dtype_size(sp->kv_dtype);
  int64_t kv_n = P * Hkv * B * 2 * D;
  f->kv_mem = malloc((size_t)kv_n * kv_es);
  int64_t shape4[4] = {P, Hkv, B, 2 * D};
  int64_t st4[4];
  if (sp->token_major) {
    st4[0] = (int64_t)B * Hkv * 2 * D, st4[1] = 2 * D, st4[2] = (int64_t)Hkv * 2 * D, st4[3] = 1;
  } else {
    st4[0] = (int64_t)Hkv * B * 2 * D, st4[1] = (int64_t)B * 2 * D, st4[2] = 2 * D, st4[3] = 1;
  }
  f->kv = m3s_tensor_strided(f->kv_mem, sp->kv_dtype, 4, shape4, st4, M3S_HOST);
  bool fp8 = sp->kv_dtype == M3S_E4M3 || sp->kv_dtype == M3S_E5M2;
  int64_t slots = P * B;
  if (fp8 && sp->scale_mode == 1) {
    f->ks_mem = malloc(sizeof(float));
    f->vs_mem = malloc(sizeof(float));
    f->ks_mem[0] = 0.0625f;
    f->vs_mem[0] = 0.03125f;
    f->scales.k_scale = m3s_tensor_make(f->ks_mem, M3S_F32, 0, NULL, M3S_HOST);
    int64_t one = 1;
    f->scales.v_scale = m3s_tensor_make(f->vs_mem, M3S_F32, 1, &one, M3S_HOST);
  } else if (fp8 && sp->scale_mode == 2) {
    f->ks_mem = malloc(sizeof(float) * (size_t)(Hkv * slots));
    f->vs_mem = malloc(sizeof(float) * (size_t)(Hkv * slots));
    for (int64_t i = 0; i < Hkv * slots; i++) {
      f->ks_mem[i] = (float)(0.02 + 0.1 * rng_uniform(&rng));
      f->vs_mem[i] = (float)(0.02 + 0.1 * rng_uniform(&rng));
    }
    int64_t sh[2] = {Hkv, slots};
    f->scales.k_scale = m3s_tensor_make(f->ks_mem, M3S_F32, 2, sh, M3S_HOST);
    f->scales.v_scale = m3s_tensor_make(f->vs_mem, M3S_F32, 2, sh, M3S_HOST);
  }
  for (int64_t p = 0; p < P; p++)
    for (int g = 0; g < Hkv; g++)
      for (int j = 0; j < B; j++)
        for (int d = 0; d < 2 * D; d++) {
          float val = rng_normal(&rng);
          float scale = 1.0f;
          if (fp8 && sp->scale_mode) {
            const float *sm = d < D ? f->ks_mem : f->vs_mem;
            scale = sp->scale_mode == 1 ? sm[0] : sm[g * slots + p * B + j];
          }
          store_elem(f->kv_mem, sp->kv_dtype, p * st4[0] + g * st4[1] + j * st4[2] + d,
                     val / scale);
        }
  /* Index cache. */
  f->ic_mem = malloc((size_t)(P * B * D) * m3s_dtype_size(sp->idx_dtype));
  for (int64_t i = 0; i < P * B * D; i++)
    store_elem(f->ic_mem, sp->idx_dtype, i, sp->grid ? grid_value(&rng) : rng_normal(&rng));
  int64_t ish[3] = {P, B, D};
  f->ic = m3s_tensor_make(f->ic_mem, sp->idx_dtype, 3, ish, M3S_HOST);
  /* Activations and outputs. */
  int T = f->T;
  f->q_mem = malloc((size_t)T * Hq * D * 2 + 2);
  f->iq_mem = malloc((size_t)T * Hkv * D * 2 + 2);
  f->out_mem = malloc((size_t)T * Hq * D * 2 + 2);
  f->lse_mem = malloc(sizeof(float) * ((size_t)T * Hq + 1));
  f->topk_mem = malloc(sizeof(int32_t) * ((size_t)T * Hkv * K + 1));
  for (int64_t i = 0; i < (int64_t)T * Hq * D; i++)
    store_elem(f->q_mem, sp->act_dtype, i, rng_normal(&rng));
  for (int64_t i = 0; i < (int64_t)T * Hkv * D; i++)
    store_elem(f->iq_mem, sp->act_dtype, i, sp->grid ? grid_value(&rng) : rng_normal(&rng));
  int64_t qsh[3] = {T, Hq, D}, iqsh[3] = {T, Hkv, D}, lsh[2] = {T, Hq}, tsh[3] = {T, Hkv, K};
  f->q = m3s_tensor_make(f->q_mem, sp->act_dtype, 3, qsh, M3S_HOST);
  f->iq = m3s_tensor_make(f->iq_mem, sp->act_dtype, 3, iqsh, M3S_HOST);
  f->out = m3s_tensor_make(f->out_mem, sp->act_dtype, 3, qsh, M3S_HOST);
  f->lse = m3s_tensor_make(f->lse_mem, M3S_F32, 2, lsh, M3S_HOST);
  if (sp->topk_head_major) {
    int64_t tst[3] = {K, (int64_t)T * K, 1};
    f->topk = m3s_tensor_strided(f->topk_mem, M3S_I32, 3, tsh, tst, M3S_HOST);
  } else {
    f->topk = m3s_tensor_make(f->topk_mem, M3S_I32, 3, tsh, M3S_HOST);
  }
  /* Batch. */
  m3s_batch *b = &f->batch;
  b->num_reqs = R;
  b->num_tokens = T;
  b->uniform_q_len = sp->uniform ? (R ? f->qlens[0] : 1) : 0;
  b->max_q_len = sp->uniform ? b->uniform_q_len : max_q;
  b->max_seq_len = max_s;
  int64_t r1 = R + 1, rr = R, btsh[2] = {R, f->max_pages}, btst[2] = {bt_stride, 1};
  b->query_start_loc = m3s_tensor_make(f->qsl, M3S_I32, 1, &r1, M3S_HOST);
  b->seq_lens = m3s_tensor_make(f->seqlens, M3S_I32, 1, &rr, M3S_HOST);
  b->block_table = m3s_tensor_strided(f->bt, M3S_I32, 2, btsh, btst, M3S_HOST);
  b->index_block_table = m3s_tensor_strided(f->ibt, M3S_I32, 2, btsh, btst, M3S_HOST);
}

void fx_large_logits(fixture *f, int mode) {
  int Hq = f->cfg.num_q_heads, Hkv = f->cfg.num_kv_heads;
  int64_t P = f->num_pages, slots = P * B;
  int fp8 = f->sp.kv_dtype == M3S_E4M3 || f->sp.kv_dtype == M3S_E5M2;
  uint64_t rng = f->sp.seed * 31 + (uint64_t)mode;
  /* logical block of each page (-1: no request maps it) */
  int64_t *blk = malloc(sizeof(int64_t) * (size_t)P);
  for (int64_t p = 0; p < P; p++)
    blk[p] = -1;
  for (int r = 0; r < f->sp.num_reqs; r++)
    for (int64_t c = 0; c < (f->seqlens[r] + B - 1) / B; c++)
      blk[f->bt[r * f->batch.block_table.stride[0] + c]] = c;
  float maxv = f->sp.kv_dtype == M3S_E5M2 ? 57344.0f : 448.0f;
  float tiny = f->sp.kv_dtype == M3S_E5M2 ? 0x1p-16f : 0x1p-9f;
#define U(d) ((d) % 3 == 1 ? -1.0f : 1.0f)
  for (int64_t p = 0; p < P; p++)
    for (int g = 0; g < Hkv; g++)
      for (int j = 0; j < B; j++)
        for (int d = 0; d < D; d++) {
          float v;
          switch (mode) {
          case FX_LOGITS_SPREAD: v = (float)((int)(rng_next(&rng) % 65) - 32); break;
          case FX_LOGITS_DOMINANT:
            v = blk[p] >= 0 && j == (int)((blk[p] * 37 + 11) % B)
                    ? (float)(3 + blk[p]) * U(d)
                    : (float)((int)(rng_next(&rng) % 5) - 2);
            break;
          case FX_LOGITS_EQUAL_POS: v = 4.0f * U(d); break;
          case FX_LOGITS_EQUAL_NEG: v = -8.0f * U(d); break;
          default: /* FX_LOGITS_FP8_MAX: the stored byte itself, scale not divided out */
            v = (d % 5 == 4 ? tiny : maxv) * (rng_next(&rng) & 1 ? -1.0f : 1.0f);
            break;
          }
          float scale = 1.0f;
          if (fp8 && f->sp.scale_mode && mode != FX_LOGITS_FP8_MAX)
            scale = f->sp.scale_mode == 1 ? f->ks_mem[0] : f->ks_mem[g * slots + p * B + j];
          store_elem(f->kv_mem, f->sp.kv_dtype,
                     p * f->kv.stride[0] + g * f->kv.stride[1] + j * f->kv.stride[2] + d,
                     v / scale);
        }
  for (int64_t t = 0; t < f->T; t++)
    for (int h = 0; h < Hq; h++)
      for (int d = 0; d < D; d++) {
        float v = mode == FX_LOGITS_SPREAD    ? (float)((int)(rng_next(&rng) % 65) - 32)
                  : mode == FX_LOGITS_FP8_MAX ? grid_value(&rng)
                                              : 4.0f * U(d);
        store_elem(f->q_mem, f->sp.act_dtype, (t * Hq + h) * D + d, v);
      }
#undef U
  free(blk);
}

void fx_free(fixture *f) {
  free(f->qlens);
  free(f->seqlens);
  free(f->qsl);
  free(f->bt);
  free(f->ibt);
  free(f->kv_mem);
  free(f->ic_mem);
  free(f->q_mem);
  free(f->iq_mem);
  free(f->out_mem);
  free(f->topk_mem);
  free(f->ks_mem);
  free(f->vs_mem);
  free(f->lse_mem);
  memset(f, 0, sizeof *f);
}

#define POISON_OUT 0x7FC1 /* NaN in bf16; NaN in f16 too */
#define POISON_TOPK 0x7fffffff

void fx_poison(fixture *f) {
  int64_t no = (int64_t)f->T * f->cfg.num_q_heads * D;
  for (int64_t i = 0; i < no; i++)
    ((uint16_t *)f->out_mem)[i] = POISON_OUT;
  for (int64_t i = 0; i < (int64_t)f->T * f->cfg.num_q_heads; i++)
    f->lse_mem[i] = NAN;
  for (int64_t i = 0; i < (int64_t)f->T * f->cfg.num_kv_heads * f->cfg.topk; i++)
    ((int32_t *)f->topk_mem)[i] = POISON_TOPK;
}

int fx_rows_written(const fixture *f, int row0, int n) {
  const m3s_layer_config *c = &f->cfg;
  for (int t = row0; t < row0 + n; t++) {
    for (int h = 0; h < c->num_q_heads; h++) {
      const int64_t o = t * f->out.stride[0] + h * f->out.stride[1];
      for (int d = 0; d < D; d++)
        if (((const uint16_t *)f->out_mem)[o + d * f->out.stride[2]] == POISON_OUT)
          return 0;
      if (isnan(f->lse_mem[t * f->lse.stride[0] + h * f->lse.stride[1]]))
        return 0;
    }
    for (int g = 0; g < c->num_kv_heads; g++)
      for (int k = 0; k < c->topk; k++)
        if (*fx_topk_at(f, t, g, k) == POISON_TOPK)
          return 0;
  }
  return 1;
}

int fx_request_of_row(const fixture *f, int t, int *i_out) {
  for (int r = 0; r < f->sp.num_reqs; r++) {
    int lo = f->qsl[r] - f->qsl[0], hi = f->qsl[r + 1] - f->qsl[0];
    if (t >= lo && t < hi) {
      *i_out = t - lo;
      return r;
    }
  }
  *i_out = -1;
  return -1;
}

int64_t fx_pos(const fixture *f, int t) {
  int i, r = fx_request_of_row(f, t, &i);
  if (r < 0 || f->seqlens[r] == 0)
    return -1;
  return (int64_t)f->seqlens[r] - f->qlens[r] + i;
}

int32_t *fx_topk_at(const fixture *f, int t, int g, int k) {
  return (int32_t *)f->topk.data + t * f->topk.stride[0] + g * f->topk.stride[1] +
         k * f->topk.stride[2];
}

static double ref_index_key(const fixture *f, int r, int64_t p, int d) {
  int64_t stride = f->batch.index_block_table.stride[0];
  int32_t page = f->ibt[r * stride + p / B];
  return load_elem(f->ic_mem, f->sp.idx_dtype, ((int64_t)page * B + p % B) * D + d);
}

double ref_kv(const fixture *f, int r, int64_t p, int g, int d, int is_v) {
  int64_t stride = f->batch.block_table.stride[0];
  int32_t page = f->bt[r * stride + p / B];
  int64_t slot = (int64_t)page * B + p % B;
  int64_t off =
      page * f->kv.stride[0] + g * f->kv.stride[1] + (p % B) * f->kv.stride[2] + (is_v ? D : 0) + d;
  double v = load_elem(f->kv_mem, f->sp.kv_dtype, off);
  if ((f->sp.kv_dtype == M3S_E4M3 || f->sp.kv_dtype == M3S_E5M2) && f->sp.scale_mode) {
    const float *sm = is_v ? f->vs_mem : f->ks_mem;
    v *= f->sp.scale_mode == 1 ? sm[0] : sm[g * f->num_pages * B + slot];
  }
  return v;
}

int ref_select(const fixture *f, int t, int g, int32_t *ids, double *scores_out) {
  const m3s_layer_config *c = &f->cfg;
  for (int k = 0; k < c->topk; k++)
    ids[k] = -1;
  int i, r = fx_request_of_row(f, t, &i);
  int64_t pos = fx_pos(f, t);
  if (pos < 0)
    return 0;
  int64_t nb = pos / B + 1;
  double *scores = scores_out ? scores_out : malloc(sizeof(double) * (size_t)nb);
  double *keys = malloc(sizeof(double) * B * D), q[D];
  for (int d = 0; d < D; d++)
    q[d] = load_elem(f->iq_mem, f->sp.act_dtype, ((int64_t)t * c->num_kv_heads + g) * D + d);
  for (int64_t b = 0; b < nb; b++) {
    int n = ref_block_keys(b, pos);
    for (int j = 0; j < n; j++)
      for (int d = 0; d < D; d++)
        keys[j * D + d] = ref_index_key(f, r, b * B + j, d);
    scores[b] = ref_block_max(q, keys, n);
  }
  int m = ref_select_blocks(c, nb, scores, ids);
  free(keys);
  if (!scores_out)
    free(scores);
  return m;
}

/* The K/V rows of request r, KV head g, for ref_attend_blocks. */
typedef struct {
  const fixture *f;
  int r, g;
} kv_rows;

static void kv_row(void *user, int64_t j, int is_v, double *row) {
  const kv_rows *k = user;
  for (int d = 0; d < D; d++)
    row[d] = ref_kv(k->f, k->r, j, k->g, d, is_v);
}

/* The reference for query heads [h0, h0 + nh) of KV head g at row t, sharing
 * the key loads: out[nh][D], lse[nh]. */
static void ref_attention_heads(const fixture *f, int t, int g, int h0, int nh, const int32_t *sel,
                                int n, int masked, double *out, double *lse) {
  const m3s_layer_config *c = &f->cfg;
  int i;
  kv_rows k = {f, fx_request_of_row(f, t, &i), g};
  double *q = malloc(sizeof(double) * (size_t)nh * D);
  for (int h = 0; h < nh; h++)
    for (int d = 0; d < D; d++)
      q[h * D + d] =
          load_elem(f->q_mem, f->sp.act_dtype, ((int64_t)t * c->num_q_heads + h0 + h) * D + d);
  ref_attend_blocks(q, nh, c->softmax_scale, fx_pos(f, t), masked ? sel : NULL, n, kv_row, &k, out,
                    lse);
  free(q);
}

void ref_attention(const fixture *f, int t, int h, const int32_t *sel, int n, int masked,
                   double *out, double *lse) {
  int G = f->cfg.num_q_heads / f->cfg.num_kv_heads;
  ref_attention_heads(f, t, h / G, h, 1, sel, n, masked, out, lse);
}

double check_attention_vs_ref(const fixture *f, int masked, const char *name) {
  const m3s_layer_config *c = &f->cfg;
  int G = c->num_q_heads / c->num_kv_heads, Hq = c->num_q_heads;
  double err2 = 0, ref2 = 0;
  int bad_rows = 0, bad_lse = 0, unwritten = 0, bad_pad = 0, checked = 0;
  char msg[256];
  /* Every element is checked for poison, and every row of a padded request
   * (no position) for exactly 0 and lse -inf; the fp64 comparison (per row:
   * rel L2 < 1e-2 and lse; and over all compared rows) runs on every row when
   * the case is small and on an even sample (with the first and last rows)
   * otherwise. */
  int step = f->T > 96 ? f->T / 96 : 1;
  double *ref = malloc(sizeof(double) * (size_t)G * D), *rl = malloc(sizeof(double) * (size_t)G);
  for (int t = 0; t < f->T; t++) {
    int padded = fx_pos(f, t) < 0;
    for (int64_t e = 0; e < (int64_t)Hq * D; e++) {
      double v = load_elem(f->out_mem, f->sp.act_dtype, (int64_t)t * Hq * D + e);
      unwritten += isnan(v);
      bad_pad += padded && !isnan(v) && v != 0.0; /* every row, not only the sampled ones */
    }
    for (int h = 0; h < Hq; h++) {
      float l = f->lse_mem[(int64_t)t * Hq + h];
      unwritten += isnan(l);
      bad_pad += padded && !isnan(l) && !(isinf(l) && l < 0);
    }
    if (t % step != 0 && t != f->T - 1)
      continue;
    checked++;
    int64_t pos = fx_pos(f, t);
    int64_t nb = pos < 0 ? 0 : pos / B + 1;
    int kk = (int)(nb < c->topk ? nb : c->topk);
    for (int g = 0; g < c->num_kv_heads; g++) {
      int32_t sel[M3S_MAX_TOPK];
      for (int k = 0; k < kk; k++)
        sel[k] = *fx_topk_at(f, t, g, k);
      ref_attention_heads(f, t, g, g * G, G, sel, kk, masked, ref, rl);
      for (int hl = 0; hl < G; hl++) {
        int h = g * G + hl;
        double e2 = 0, r2 = 0;
        for (int d = 0; d < D; d++) {
          double got = load_elem(f->out_mem, f->sp.act_dtype, ((int64_t)t * Hq + h) * D + d);
          double want = ref[hl * D + d];
          e2 += (got - want) * (got - want);
          r2 += want * want;
        }
        err2 += e2;
        ref2 += r2;
        if (r2 > 0 && sqrt(e2 / r2) > 1e-2)
          bad_rows++;
        float gl = f->lse_mem[(int64_t)t * Hq + h];
        double wl = rl[hl];
        if (isinf(wl) ? !(isinf(gl) && gl < 0) : !(fabs(gl - wl) <= 1e-3 * fmax(1.0, fabs(wl))))
          bad_lse++;
      }
    }
  }
  free(ref);
  free(rl);
  double rel = ref2 > 0 ? sqrt(err2 / ref2) : sqrt(err2);
  snprintf(msg, sizeof msg,
           "%s: rel L2 %.3g over %d rows, bad rows %d, bad lse %d, unwritten %d, bad pad %d", name,
           rel, checked, bad_rows, bad_lse, unwritten, bad_pad);
  CHECK(rel < 1e-2 && bad_rows == 0 && bad_lse == 0 && unwritten == 0 && bad_pad == 0, msg);
  if (getenv("M3S_TEST_VERBOSE"))
    printf("  %s\n", msg);
  return rel;
}

int check_topk_vs_ref(const fixture *f, const char *name) {
  int bad = 0;
  char msg[256] = "";
  for (int t = 0; t < f->T; t++)
    for (int g = 0; g < f->cfg.num_kv_heads; g++) {
      int32_t ids[M3S_MAX_TOPK];
      ref_select(f, t, g, ids, NULL);
      for (int k = 0; k < f->cfg.topk; k++)
        if (*fx_topk_at(f, t, g, k) != ids[k]) {
          if (!bad)
            snprintf(msg, sizeof msg, "%s: row %d head %d slot %d: got %d want %d", name, t, g, k,
                     *fx_topk_at(f, t, g, k), ids[k]);
          bad++;
          break;
        }
    }
  CHECK(bad == 0, bad ? msg : name);
  return bad;
}

int check_topk_vs_fp64_rows(const fixture *f, const char *name, int max_rows) {
  const m3s_layer_config *c = &f->cfg;
  int K = c->topk, bad = 0, rows = 0;
  char msg[320] = "";
  int64_t step = f->T > max_rows && max_rows > 1 ? (f->T - 1) / (max_rows - 1) : 1;
  int64_t max_nb = 1;
  for (int t = 0; t < f->T; t++) {
    int64_t pos = fx_pos(f, t);
    max_nb = pos >= 0 && pos / B + 1 > max_nb ? pos / B + 1 : max_nb;
  }
  double *scores = malloc(sizeof(double) * (size_t)max_nb);
  char *sel = malloc((size_t)max_nb);
    for (int t = 0; t < f->T; t++) {
    if (t % step != 0 && t != f->T - 1)
      continue;
    rows++;
    int64_t pos = fx_pos(f, t), nb = pos < 0 ? 0 : pos / B + 1;
    for (int g = 0; g < c->num_kv_heads; g++) {
      int32_t ids[M3S_MAX_TOPK];
      int n = ref_select(f, t, g, ids, scores);
      const char *why = NULL;
      int exact = 1;
      for (int k = 0; k < K; k++)
        exact &= *fx_topk_at(f, t, g, k) == ids[k];
      if (exact)
        continue;
      if (f->sp.grid) {
        why = "differs from the fp64 selection (grid data: exact)";
      } else {
        memset(sel, 0, (size_t)(nb > 0 ? nb : 1));
        int prev = -1;
        for (int k = 0; k < K && !why; k++) {
          int32_t id = *fx_topk_at(f, t, g, k);
          if (k < n) {
            if (id <= prev || id >= nb)
              why = "ids not ascending within [0, nb)";
            else
              sel[id] = 1, prev = id;
          } else if (id != -1) {
            why = "no -1 after the selected ids";
          }
        }
        for (int64_t b = 0; b < nb && !why; b++)
          if (ref_forced(c, b, nb) && !sel[b])
            why = "a forced block is missing";
        for (int64_t b = 0; b < nb && !why; b++) {
          if (!sel[b] || ref_forced(c, b, nb))
            continue;
          for (int64_t u = 0; u < nb && !why; u++) {
            if (sel[u] || ref_forced(c, u, nb))
              continue;
            double sb = scores[b], su = scores[u];
            if (isnan(sb) && !isnan(su))
              why = "a NaN-scored block chosen over a real score";
            else if (isnan(sb) && isnan(su) && u < b)
              why = "among NaN scores, a higher id chosen over a lower one";
            else if (!isnan(sb) && !isnan(su) && su > sb + 1e-3 * (1 + fabs(su)))
              why = "an unselected block scores higher (beyond rounding)";
          }
        }
      }
      if (why) {
        if (!bad)
          snprintf(msg, sizeof msg, "%s: row %d (pos %lld) head %d vs fp64: %s", name, t,
                   (long long)pos, g, why);
        bad++;
      }
    }
  }
  free(scores);
  free(sel);
  char ok_msg[200];
  snprintf(ok_msg, sizeof ok_msg, "%s: top-k vs the fp64 brute force on %d rows", name, rows);
  CHECK(bad == 0, bad ? msg : ok_msg);
  return bad;
}

static void store_index_nan(fixture *f, int64_t i, int negative) {
  if (f->sp.idx_dtype == M3S_BF16)
    ((uint16_t *)f->ic_mem)[i] = negative ? 0xFFC0 : 0x7FC0;
  else
    ((uint8_t *)f->ic_mem)[i] = negative ? 0xFF : 0x7F;
}

static int32_t ibt_at(const fixture *f, int r, int64_t b) {
  return f->ibt[r * f->batch.index_block_table.stride[0] + b];
}

static void poison_index_page(fixture *f, int32_t page, int negative) {
  for (int64_t i = 0; i < B * D; i++)
    store_index_nan(f, (int64_t)page * B * D + i, negative);
}

void fx_nan_index_keys(fixture *f) {
  for (int b = 0; b < 10; b++)
    poison_index_page(f, ibt_at(f, 0, b), b & 1);
  for (int d = 0; d < D; d++)
    store_index_nan(f, ((int64_t)ibt_at(f, 0, 12) * B + 5) * D + d, 0);
  store_index_nan(f, ((int64_t)ibt_at(f, 0, 14) * B + 77) * D + 3, 1);
  int64_t nb1 = (f->seqlens[1] + B - 1) / B;
  for (int64_t b = 0; b < nb1; b++)
    poison_index_page(f, ibt_at(f, 1, b), 0);
}

void fx_signed_zero_index_keys(fixture *f) {
  for (int64_t i = 0; i < f->num_pages * B * D; i++)
    store_elem(f->ic_mem, f->sp.idx_dtype, i, (i / D) % 3 == 0 ? -0.0f : 0.0f);
}

void fx_equal_index_keys(fixture *f) {
  for (int64_t i = 0; i < f->num_pages * B * D; i++)
    store_elem(f->ic_mem, f->sp.idx_dtype, i, (i % D) < 64 ? 0.5f : -0.25f);
}
