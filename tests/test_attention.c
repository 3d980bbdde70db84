/* SPEC section 4 (block-sparse GQA attention) and section 2 (caches and
 * inserts), against the fp64 reference of tests/ref.c: relative L2 error below
 * 1e-2, lse within 1e-3, padded rows exactly 0 / -inf, every output element
 * overwritten (outputs are poisoned with NaN before each run). */
#include "ref.h"

#include "cpu/convert.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static m3s_context *g_ctx;

static fx_spec base_spec(int tp, int nreq, const int32_t *ql, const int32_t *sl) {
  fx_spec s = fx_spec_default(m3s_config_minimax_m3(tp), nreq, ql, sl, 99);
  s.extra_pages = 3;
  return s;
}

/* Index top-k then attention on a fresh fixture; compares with the reference. */
static void attn_case(const char *name, fx_spec s, int masked) {
  fixture f;
  fx_init(&f, &s);
  fx_poison(&f);
  m3s_status st = m3s_index_topk(g_ctx, &f.cfg, &f.batch, &f.iq, &f.ic, &f.topk, NULL);
  if (st == M3S_OK)
    st = m3s_sparse_attention(g_ctx, &f.cfg, &f.batch, &f.q, &f.kv, &f.scales, &f.topk, &f.out,
                              &f.lse, NULL);
  if (!CHECK(st == M3S_OK, name))
    fprintf(stderr, "  %s\n", m3s_last_error());
  else
    check_attention_vs_ref(&f, masked, name);
  fx_free(&f);
}

static void test_spec4_tp_shapes_and_layouts(void) {
  int32_t ql[] = {1, 1, 96};
  int32_t sl[] = {3000, 2100, 2500};
  int tps[] = {1, 2, 4, 8};
  for (int i = 0; i < 4; i++)
    for (int tm = 0; tm < 2; tm++) {
      fx_spec s = base_spec(tps[i], 3, ql, sl);
      s.token_major = tm;
      char name[96];
      snprintf(name, sizeof name, "spec4_attention_tp%d_%s", tps[i],
               tm ? "token_major" : "head_major");
      attn_case(name, s, 1);
    }
}

/* The largest supported head count (M3S_MAX_HEADS = 256) and top-k (64). */
static void test_spec4_largest_heads_and_topk(void) {
  int32_t ql[] = {1, 20};
  int32_t sl[] = {9000, 2500};
  struct {
    int hq, hkv, k;
    const char *name;
  } c[] = {{256, 1, 64, "spec4_hq256_hkv1_k64"}, {256, 4, 16, "spec4_hq256_hkv4_k16"}};
  for (int i = 0; i < 2; i++) {
    m3s_layer_config cfg = m3s_config_minimax_m3(1);
    cfg.num_q_heads = c[i].hq;
    cfg.num_kv_heads = c[i].hkv;
    cfg.topk = c[i].k;
    fx_spec s = fx_spec_default(cfg, 2, ql, sl, 77);
    s.token_major = i;
    attn_case(c[i].name, s, 1);
  }
}

static void test_spec4_dtypes(void) {
  int32_t ql[] = {1, 40};
  int32_t sl[] = {2600, 2200};
  struct {
    m3s_dtype act, kv;
    int scale;
    const char *name;
  } c[] = {{M3S_F16, M3S_F16, 0, "spec4_f16_activations_f16_cache"},
           {M3S_BF16, M3S_F16, 0, "spec4_bf16_activations_f16_cache"},
           {M3S_BF16, M3S_E4M3, 0, "spec4_e4m3_cache_no_scale"},
           {M3S_BF16, M3S_E4M3, 1, "spec4_e4m3_cache_scalar_scales"},
           {M3S_BF16, M3S_E4M3, 2, "spec4_e4m3_cache_per_head_slot_scales"},
           {M3S_BF16, M3S_E5M2, 1, "spec4_e5m2_cache_scalar_scales"},
           {M3S_F16, M3S_E5M2, 2, "spec4_e5m2_cache_per_head_slot_scales"}};
  for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
    fx_spec s = base_spec(2, 2, ql, sl);
    s.act_dtype = c[i].act;
    s.kv_dtype = c[i].kv;
    s.scale_mode = c[i].scale;
    s.token_major = (int)(i & 1);
    attn_case(c[i].name, s, 1);
  }
}

static void test_spec4_nb_le_K_is_dense_causal(void) {
  int32_t ql[] = {1, 1, 300};
  int32_t sl[] = {1, 16 * 128, 300};
  attn_case("spec4_nb_le_K_equals_dense_causal_attention", base_spec(4, 3, ql, sl), 0);
}

static void test_spec4_spec_decode_and_padding(void) {
  int32_t ql[] = {4, 4, 4, 4};
  int32_t sl[] = {2051, 0, 130, 4};
  fx_spec s = base_spec(2, 4, ql, sl);
  s.uniform = 1;
  attn_case("spec4_spec_decode_qlen4_with_padded_request", s, 1);
  int32_t rql[] = {3, 0, 1, 2};
  int32_t rsl[] = {900, 0, 0, 2};
  fx_spec r = base_spec(8, 4, rql, rsl);
  r.qsl_base = 5;
  attn_case("spec4_ragged_decode_with_empty_and_padded_requests", r, 1);
}

/* More than 96 rows, so the fp64 comparison samples every 3rd row: the
 * padded request's row (t = 200) is not among the sampled ones, and only the
 * every-row check of padding (out exactly 0, lse -inf) sees it. */
static void test_spec4_padding_checked_on_every_row(void) {
  int32_t ql[] = {200, 1, 150};
  int32_t sl[] = {2000, 0, 1500};
  attn_case("spec4_padded_row_outside_the_sampled_rows", base_spec(8, 3, ql, sl), 1);
}

/* -1 entries inside the first min(K, nb) slots and score-ordered (descending)
 * rows: attention must skip -1 and not depend on the order of the ids. */
static void test_spec4_topk_row_forms(void) {
  int32_t ql[] = {1, 1};
  int32_t sl[] = {3000, 2600};
  fx_spec s = base_spec(4, 2, ql, sl);
  fixture f;
  fx_init(&f, &s);
  fx_poison(&f);
  int ok = m3s_index_topk(g_ctx, &f.cfg, &f.batch, &f.iq, &f.ic, &f.topk, NULL) == M3S_OK &&
           m3s_sparse_attention(g_ctx, &f.cfg, &f.batch, &f.q, &f.kv, &f.scales, &f.topk, &f.out,
                                &f.lse, NULL) == M3S_OK;
  CHECK(ok, "topk row forms: first run");
  size_t obytes = (size_t)f.T * 16 * 128 * 2;
  void *first = malloc(obytes);
  memcpy(first, f.out_mem, obytes);
  /* the same selections in another order (as a score-ordered producer would
   * give them): the same output bits. Both rows have nb > 16, so all 16
   * entries are read. */
  int32_t rev[2][16];
  for (int t = 0; t < f.T; t++)
    for (int k = 0; k < 16; k++)
      rev[t][k] = *fx_topk_at(&f, t, 0, 15 - k);
  fx_poison(&f);
  for (int t = 0; t < f.T; t++)
    for (int k = 0; k < 16; k++)
      *fx_topk_at(&f, t, 0, k) = rev[t][k];
  ok = m3s_sparse_attention(g_ctx, &f.cfg, &f.batch, &f.q, &f.kv, &f.scales, &f.topk, &f.out,
                            &f.lse, NULL) == M3S_OK;
  CHECK(ok && memcmp(first, f.out_mem, obytes) == 0,
        "spec4_reordered_topk_row_gives_same_output_bits");
  fx_poison(&f);
  for (int t = 0; t < f.T; t++)
    for (int k = 0; k < 16; k++)
      *fx_topk_at(&f, t, 0, k) = 15 - k + (t == 0 ? 3 : 1); /* descending, distinct */
  ok = m3s_sparse_attention(g_ctx, &f.cfg, &f.batch, &f.q, &f.kv, &f.scales, &f.topk, &f.out,
                            &f.lse, NULL) == M3S_OK;
  CHECK(ok, "spec4_descending_topk_row_accepted");
  check_attention_vs_ref(&f, 1, "spec4_descending_topk_row_vs_ref");
  /* -1 holes */
  fx_poison(&f);
  for (int t = 0; t < f.T; t++)
    for (int k = 0; k < 16; k++)
      *fx_topk_at(&f, t, 0, k) = (k % 3 == 1) ? -1 : k;
  ok = m3s_sparse_attention(g_ctx, &f.cfg, &f.batch, &f.q, &f.kv, &f.scales, &f.topk, &f.out,
                            &f.lse, NULL) == M3S_OK;
  CHECK(ok, "spec4_minus_one_holes_accepted");
  check_attention_vs_ref(&f, 1, "spec4_minus_one_holes_skipped_vs_ref");
  /* all -1: no visible key, output 0 and lse -inf */
  fx_poison(&f);
  for (int t = 0; t < f.T; t++)
    for (int k = 0; k < 16; k++)
      *fx_topk_at(&f, t, 0, k) = -1;
  ok = m3s_sparse_attention(g_ctx, &f.cfg, &f.batch, &f.q, &f.kv, &f.scales, &f.topk, &f.out,
                            &f.lse, NULL) == M3S_OK;
  int zero = ok;
  for (size_t i = 0; i < obytes / 2; i++)
    zero &= ((uint16_t *)f.out_mem)[i] == 0;
  for (int i = 0; i < f.T * 16; i++)
    zero &= isinf(f.lse_mem[i]) && f.lse_mem[i] < 0;
  CHECK(zero, "spec4_row_without_keys_gives_zero_and_minus_inf");
  free(first);
  fx_free(&f);
}

static void test_spec4_lse_optional_same_bits(void) {
  int32_t ql[] = {1, 33};
  int32_t sl[] = {2800, 2000};
  fx_spec s = base_spec(2, 2, ql, sl);
  fixture f;
  fx_init(&f, &s);
  fx_poison(&f);
  int ok = m3s_index_topk(g_ctx, &f.cfg, &f.batch, &f.iq, &f.ic, &f.topk, NULL) == M3S_OK &&
           m3s_sparse_attention(g_ctx, &f.cfg, &f.batch, &f.q, &f.kv, &f.scales, &f.topk, &f.out,
                                &f.lse, NULL) == M3S_OK;
  size_t obytes = (size_t)f.T * 32 * 128 * 2;
  void *with = malloc(obytes);
  memcpy(with, f.out_mem, obytes);
  memset(f.out_mem, 0xFF, obytes);
  ok = ok && m3s_sparse_attention(g_ctx, &f.cfg, &f.batch, &f.q, &f.kv, &f.scales, &f.topk, &f.out,
                                  NULL, NULL) == M3S_OK;
  CHECK(ok && memcmp(with, f.out_mem, obytes) == 0, "spec4_lse_null_gives_same_output_bits");
  free(with);
  fx_free(&f);
}

/* ---- large logits ---------------------------------------------------------
 * Every other case draws q and K from N(0, 1), so with scale 1/sqrt(128) the
 * logits stay within a few units and a softmax without its max-subtraction
 * passes. Here |q.k * scale| reaches the hundreds and beyond (fx_large_logits:
 * widely spread, one dominant key, all equal and large, all equal and very
 * negative, fp8 extremes), and out and lse are checked against fp64 -- for
 * sparse attention and for the k2q chain (CSR, partials, combine), whose
 * combine merges partial lse values of that size. */
static void large_logits_case(const char *name, fx_spec s, int mode) {
  fixture f;
  fx_init(&f, &s);
  fx_large_logits(&f, mode);
  fx_poison(&f);
  m3s_status st = m3s_index_topk(g_ctx, &f.cfg, &f.batch, &f.iq, &f.ic, &f.topk, NULL);
  if (st == M3S_OK)
    st = m3s_sparse_attention(g_ctx, &f.cfg, &f.batch, &f.q, &f.kv, &f.scales, &f.topk, &f.out,
                              &f.lse, NULL);
  if (!CHECK(st == M3S_OK, name)) {
    fprintf(stderr, "  %s\n", m3s_last_error());
    fx_free(&f);
    return;
  }
  check_attention_vs_ref(&f, 1, name);
  float lo = INFINITY, hi = -INFINITY;
  for (int64_t i = 0; i < (int64_t)f.T * f.cfg.num_q_heads; i++)
    if (isfinite(f.lse_mem[i]))
      lo = fminf(lo, f.lse_mem[i]), hi = fmaxf(hi, f.lse_mem[i]);
  printf("  %-52s lse from %.1f to %.1f\n", name, lo, hi);
  /* the k2q chain on the same selection, combined into poisoned out / lse */
  size_t tb = sizeof(int32_t) * (size_t)f.T * f.cfg.num_kv_heads * f.cfg.topk;
  int32_t *topk = malloc(tb + 4);
  memcpy(topk, f.topk_mem, tb);
  fx_poison(&f);
  memcpy(f.topk_mem, topk, tb);
  k2q_shapes sh;
  m3s_tensor t[K2Q_NBUF];
  void *mem[K2Q_NBUF] = {NULL};
  int ok = fx_k2q_shapes(g_ctx, &f, &sh);
  for (int i = 0; ok && i < K2Q_NBUF; i++) {
    t[i] = fx_k2q_view(&sh, i, NULL, M3S_HOST);
    t[i].data = mem[i] = malloc(tensor_bytes(&t[i]) + 4);
  }
  for (int step = 2; ok && step < FX_CHAIN_STEPS; step++)
    ok = fx_chain_step(g_ctx, &f, t, &f.out, &f.lse, NULL, step) == M3S_OK;
  char k2q_name[128];
  snprintf(k2q_name, sizeof k2q_name, "%s_k2q_chain", name);
  if (CHECK(ok, k2q_name))
    check_attention_vs_ref(&f, 1, k2q_name);
  else
    fprintf(stderr, "  %s\n", m3s_last_error());
  for (int i = 0; i < K2Q_NBUF; i++)
    free(mem[i]);
  free(topk);
  fx_free(&f);
}

static void test_spec4_large_logits(void) {
  int32_t ql[] = {1, 1, 24};
  int32_t sl[] = {3000, 0, 1500};
  struct {
    int tp, mode;
    m3s_dtype act, kv;
    int scale, token_major;
    const char *name;
  } c[] = {
      {2, FX_LOGITS_SPREAD, M3S_BF16, M3S_BF16, 0, 0, "large_logits_spread_tp2_bf16"},
      {1, FX_LOGITS_DOMINANT, M3S_BF16, M3S_BF16, 0, 1, "large_logits_one_dominant_key_tp1"},
      {8, FX_LOGITS_EQUAL_POS, M3S_BF16, M3S_F16, 0, 0, "large_logits_all_equal_plus181_tp8"},
      {8, FX_LOGITS_EQUAL_NEG, M3S_F16, M3S_BF16, 0, 1, "large_logits_all_equal_minus362_tp8"},
      {2, FX_LOGITS_SPREAD, M3S_BF16, M3S_E4M3, 1, 1, "large_logits_spread_tp2_e4m3_scalar"},
      {4, FX_LOGITS_FP8_MAX, M3S_BF16, M3S_E4M3, 0, 0, "large_logits_e4m3_extremes_tp4"},
      {2, FX_LOGITS_FP8_MAX, M3S_BF16, M3S_E4M3, 1, 1, "large_logits_e4m3_extremes_scalar_tp2"},
      {2, FX_LOGITS_FP8_MAX, M3S_F16, M3S_E5M2, 0, 0, "large_logits_e5m2_extremes_tp2"},
      {8, FX_LOGITS_FP8_MAX, M3S_BF16, M3S_E5M2, 2, 1, "large_logits_e5m2_extremes_per_slot_tp8"},
  };
  for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
    fx_spec s = base_spec(c[i].tp, 3, ql, sl);
    s.act_dtype = c[i].act;
    s.kv_dtype = c[i].kv;
    s.scale_mode = c[i].scale;
    s.token_major = c[i].token_major;
    large_logits_case(c[i].name, s, c[i].mode);
  }
}

/* ---- SPEC section 2: inserts ---- */

static void test_spec2_cache_insert(m3s_dtype kv_dtype, int scale_mode, int token_major,
                                    m3s_dtype slot_dtype, const char *name) {
  int32_t ql[] = {1};
  int32_t sl[] = {600};
  fx_spec s = base_spec(2, 1, ql, sl);
  s.kv_dtype = kv_dtype;
  s.scale_mode = scale_mode;
  s.token_major = token_major;
  fixture f;
  fx_init(&f, &s);
  int T = 37, Hkv = 2;
  uint64_t rng = 5;
  uint16_t *k = malloc(sizeof(uint16_t) * T * Hkv * 128);
  uint16_t *v = malloc(sizeof(uint16_t) * T * Hkv * 128);
  int64_t slots64[37];
  int32_t slots32[37];
  for (int i = 0; i < T * Hkv * 128; i++) {
    k[i] = m3s_f32_to_bf16(rng_normal(&rng) * 3.0f);
    v[i] = m3s_f32_to_bf16(rng_normal(&rng) * 3.0f);
  }
  int64_t P = f.num_pages;
  for (int i = 0; i < T; i++) {
    slots64[i] = i % 5 == 3 ? -1 : (int64_t)((i * 977) % (P * 128));
    slots32[i] = (int32_t)slots64[i];
  }
  size_t kv_bytes = (size_t)(P * Hkv * 128 * 256) * m3s_dtype_size(kv_dtype);
  void *before = malloc(kv_bytes);
  memcpy(before, f.kv_mem, kv_bytes);
  int64_t sh[3] = {T, Hkv, 128}, tt = T;
  m3s_tensor kt = m3s_tensor_make(k, M3S_BF16, 3, sh, M3S_HOST);
  m3s_tensor vt = m3s_tensor_make(v, M3S_BF16, 3, sh, M3S_HOST);
  m3s_tensor st = m3s_tensor_make(slot_dtype == M3S_I64 ? (void *)slots64 : (void *)slots32,
                                  slot_dtype, 1, &tt, M3S_HOST);
  m3s_status rc = m3s_cache_insert(g_ctx, &kt, &vt, &st, &f.kv, &f.scales, NULL);
  int bad = rc != M3S_OK;
  /* expected: each written element equals the saturating cast of value/scale */
  for (int i = 0; i < T && !bad; i++) {
    if (slots64[i] < 0)
      continue;
    int64_t page = slots64[i] / 128, off = slots64[i] % 128;
    for (int g = 0; g < Hkv; g++)
      for (int d = 0; d < 256; d++) {
        float val = m3s_bf16_to_f32(d < 128 ? k[(i * Hkv + g) * 128 + d]
                                            : v[(i * Hkv + g) * 128 + d - 128]);
        float scale = 1.0f;
        if (scale_mode == 1)
          scale = d < 128 ? f.ks_mem[0] : f.vs_mem[0];
        else if (scale_mode == 2)
          scale = (d < 128 ? f.ks_mem : f.vs_mem)[g * P * 128 + slots64[i]];
        int64_t e = page * f.kv.stride[0] + g * f.kv.stride[1] + off * f.kv.stride[2] + d;
        uint32_t want, got;
        if (kv_dtype == M3S_E4M3)
          want = m3s_f32_to_e4m3(val / scale), got = ((uint8_t *)f.kv_mem)[e];
        else if (kv_dtype == M3S_E5M2)
          want = m3s_f32_to_e5m2(val / scale), got = ((uint8_t *)f.kv_mem)[e];
        else if (kv_dtype == M3S_F16)
          want = m3s_f32_to_f16(val), got = ((uint16_t *)f.kv_mem)[e];
        else
          want = m3s_f32_to_bf16(val), got = ((uint16_t *)f.kv_mem)[e];
        bad += want != got;
        /* mark as checked so the untouched-elsewhere check can skip it */
        memcpy((char *)before + e * m3s_dtype_size(kv_dtype),
               (char *)f.kv_mem + e * m3s_dtype_size(kv_dtype), m3s_dtype_size(kv_dtype));
      }
  }
  CHECK(!bad, name);
  CHECK(memcmp(before, f.kv_mem, kv_bytes) == 0, "spec2_insert_writes_only_mapped_slots");
  free(before);
  free(k);
  free(v);
  fx_free(&f);
}

static void test_spec2_index_insert(m3s_dtype idx, m3s_dtype act, const char *name) {
  int32_t ql[] = {1};
  int32_t sl[] = {300};
  fx_spec s = base_spec(8, 1, ql, sl);
  s.idx_dtype = idx;
  fixture f;
  fx_init(&f, &s);
  int T = 20;
  uint64_t rng = 11;
  uint16_t *ik = malloc(sizeof(uint16_t) * T * 128);
  int64_t slots[20];
  for (int i = 0; i < T * 128; i++) {
    float x = rng_normal(&rng) * 200.0f; /* beyond +-448 sometimes: saturation */
    ik[i] = act == M3S_F16 ? m3s_f32_to_f16(x) : m3s_f32_to_bf16(x);
  }
  for (int i = 0; i < T; i++)
    slots[i] = i == 7 ? -5 : (int64_t)((i * 131) % (f.num_pages * 128));
  size_t es = m3s_dtype_size(idx), bytes = (size_t)(f.num_pages * 128 * 128) * es;
  void *before = malloc(bytes);
  memcpy(before, f.ic_mem, bytes);
  int64_t sh[2] = {T, 128}, tt = T;
  m3s_tensor it = m3s_tensor_make(ik, act, 2, sh, M3S_HOST);
  m3s_tensor st = m3s_tensor_make(slots, M3S_I64, 1, &tt, M3S_HOST);
  int bad = m3s_index_cache_insert(g_ctx, &it, &st, &f.ic, NULL) != M3S_OK;
  for (int i = 0; i < T && !bad; i++) {
    if (slots[i] < 0)
      continue;
    for (int d = 0; d < 128; d++) {
      float x = act == M3S_F16 ? m3s_f16_to_f32(ik[i * 128 + d]) : m3s_bf16_to_f32(ik[i * 128 + d]);
      int64_t e = slots[i] * 128 + d;
      if (idx == M3S_E4M3) {
        uint8_t got = ((uint8_t *)f.ic_mem)[e];
        bad += got != m3s_f32_to_e4m3(x) || fabsf(m3s_e4m3_to_f32(got)) > 448.0f;
      } else {
        bad += ((uint16_t *)f.ic_mem)[e] != m3s_f32_to_bf16(x);
      }
      memcpy((char *)before + e * es, (char *)f.ic_mem + e * es, es);
    }
  }
  CHECK(!bad, name);
  CHECK(memcmp(before, f.ic_mem, bytes) == 0, "spec2_index_insert_writes_only_mapped_slots");
  free(before);
  free(ik);
  fx_free(&f);
}

int main(void) {
  if (m3s_context_create(-1, &g_ctx) != M3S_OK) {
    fprintf(stderr, "context: %s\n", m3s_last_error());
    return 1;
  }
  test_spec4_tp_shapes_and_layouts();
  test_spec4_dtypes();
  test_spec4_largest_heads_and_topk();
  test_spec4_nb_le_K_is_dense_causal();
  test_spec4_spec_decode_and_padding();
  test_spec4_padding_checked_on_every_row();
  test_spec4_topk_row_forms();
  test_spec4_lse_optional_same_bits();
  test_spec4_large_logits();
  test_spec2_cache_insert(M3S_BF16, 0, 0, M3S_I64, "spec2_cache_insert_bf16_head_major_i64_slots");
  test_spec2_cache_insert(M3S_F16, 0, 1, M3S_I32, "spec2_cache_insert_f16_token_major_i32_slots");
  test_spec2_cache_insert(M3S_E4M3, 0, 0, M3S_I64, "spec2_cache_insert_e4m3_no_scale");
  test_spec2_cache_insert(M3S_E4M3, 1, 1, M3S_I64, "spec2_cache_insert_e4m3_scalar_scales");
  test_spec2_cache_insert(M3S_E4M3, 2, 0, M3S_I32, "spec2_cache_insert_e4m3_per_slot_scales");
  test_spec2_cache_insert(M3S_E5M2, 2, 1, M3S_I64, "spec2_cache_insert_e5m2_per_slot_scales");
  test_spec2_index_insert(M3S_BF16, M3S_BF16, "spec2_index_insert_bf16");
  test_spec2_index_insert(M3S_E4M3, M3S_BF16, "spec2_index_insert_e4m3_saturating");
  test_spec2_index_insert(M3S_E4M3, M3S_F16, "spec2_index_insert_e4m3_from_f16");
  m3s_context_destroy(g_ctx);
  return TEST_FINISH();
}
