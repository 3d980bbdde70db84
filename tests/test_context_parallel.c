/* SPEC section 10 (context parallel) on the CPU backend: cp ranks simulated in
 * one process, each with only its own blocks of the caches and rank-local
 * block tables (tests/cp_fixture.h), run the per-rank operations and the
 * exchanges an engine does between them:
 *   candidates per rank -> all-gather -> merge on every rank -> attention per
 *   rank -> all-gather -> N-way merge on every rank.
 * The merged top-k must be bit-identical (memcmp) to m3s_index_topk on the
 * whole cache, on every rank; the merged attention must be identical on every
 * rank, within rel L2 1e-2 of the fp64 reference (lse within 1e-3) and close
 * to the unsplit m3s_sparse_attention. Each rank's candidates are checked
 * against the contract of the header, every scored candidate against the
 * fp64 block score, and every partial row that owns none of its blocks for
 * out 0 / lse -inf. cp = 2, 3, 4 and 8, blocks_per_interleave 1 and 2 (and 3
 * for one case), with ragged prefill/decode batches, padded requests,
 * speculative decode (q_len 4), contexts shorter than cp blocks (ranks that
 * own nothing), forced init and local blocks, NaN / equal / signed-zero
 * scores, fp8 caches with per-slot scales, token-major caches and head-major
 * top-k views. Bad input: status, the message names the argument, and no
 * output is written (outputs poisoned before, compared after). */
#include "cp_fixture.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static m3s_context *g_ctx;


enum { TIES_NONE, TIES_NAN, TIES_EQUAL, TIES_SIGNED_ZERO, TIES_GRID };

typedef struct {
  const char *name;
  m3s_layer_config cfg;
  int uniform; /* the SPEC_ batch (uniform decode) instead of MIX_ */
  int ties;
  m3s_dtype kv_dtype, idx_dtype;
  int scale_mode, token_major, topk_head_major, packed;
} cp_case;

static fixture make_fixture(const cp_case *c, uint64_t seed) {
  fx_spec s = c->uniform ? fx_spec_default(c->cfg, 4, CP_SPEC_QL, CP_SPEC_SL, seed)
                         : fx_spec_default(c->cfg, 5, CP_MIX_QL, CP_MIX_SL, seed);
  s.uniform = c->uniform;
  s.qsl_base = c->uniform ? 0 : 3;
  s.extra_pages = 2;
  s.kv_dtype = c->kv_dtype ? c->kv_dtype : M3S_BF16;
  s.idx_dtype = c->idx_dtype ? c->idx_dtype : M3S_BF16;
  s.scale_mode = c->scale_mode;
  s.token_major = c->token_major;
  s.topk_head_major = c->topk_head_major;
  s.grid = c->ties == TIES_GRID;
  fixture f;
  fx_init(&f, &s);
  if (c->ties == TIES_NAN)
    fx_nan_index_keys(&f);
  else if (c->ties == TIES_EQUAL)
    fx_equal_index_keys(&f);
  else if (c->ties == TIES_SIGNED_ZERO)
    fx_signed_zero_index_keys(&f);
  return f;
}

static int is_forced(const m3s_layer_config *c, int64_t b, int64_t nb) {
  return b < c->init_blocks || b >= nb - c->local_blocks;
}

/* a before b in the SPEC 3 rank order (the scores are distinct blocks') */
static int ranks_before(float sa, int32_t a, float sb, int32_t b) {
  if (isnan(sa) != isnan(sb))
    return isnan(sb);
  if (!isnan(sa) && sa != sb)
    return sa > sb;
  return a < b;
}

/* One rank's candidate rows against the header's contract; a sample of the
 * scored ones against the fp64 block scores. Returns the number of bad rows. */
static int check_candidates(const fixture *f, const cp_exchange *x, int n, int cp_size, int il,
                            char *msg, size_t msz) {
  const m3s_layer_config *c = &f->cfg;
  m3s_tensor ids = cp_slice(&x->ids, n), sc = cp_slice(&x->scores, n);
  int K = c->topk, bad = 0, sampled = 0;
  for (int t = 0; t < f->T; t++) {
    int64_t pos = fx_pos(f, t), nb = pos < 0 ? 0 : pos / 128 + 1;
    int64_t forced = 0;
    for (int64_t b = 0; b < nb; b++)
      forced += is_forced(c, b, nb);
    int64_t want = nb <= K ? 0 : K - forced;
    for (int g = 0; g < c->num_kv_heads; g++) {
      const int32_t *id = (const int32_t *)ids.data + t * ids.stride[0] + g * ids.stride[1];
      const float *s = (const float *)sc.data + t * sc.stride[0] + g * sc.stride[1];
      int k = 0, ok = 1;
      /* 1. the owned blocks selected whatever the scores, ascending, +inf */
      for (int64_t b = 0; b < nb; b++)
        if ((nb <= K || is_forced(c, b, nb)) && cp_owner(cp_size, il, b) == n) {
          ok &= k < K && id[k] == b && s[k] == INFINITY;
          k++;
        }
      k = k < K ? k : K;
      /* 2. owned, non-forced, in rank order, at most want of them */
      int first = k;
      for (; k < K && id[k] != -1; k++) {
        ok &= k - first < want && id[k] >= 0 && id[k] < nb && !is_forced(c, id[k], nb) &&
              cp_owner(cp_size, il, id[k]) == n && !isinf(s[k]);
        if (k > first)
          ok &= ranks_before(s[k - 1], id[k - 1], s[k], id[k]);
      }
      /* ... and exactly want of them unless the rank owns fewer */
      int64_t owned_free = 0;
      for (int64_t b = 0; b < nb && nb > K; b++)
        owned_free += !is_forced(c, b, nb) && cp_owner(cp_size, il, b) == n;
      ok &= k - first == (owned_free < want ? owned_free : want);
      /* 3. holes */
      for (; k < K; k++)
        ok &= id[k] == -1 && s[k] == -INFINITY;
      /* scores: fp32 against fp64 on a sample of rows */
      if (ok && first < K && id[first] >= 0 && (t % 7 == 0 || t == f->T - 1) && sampled < 24) {
        int32_t sel[M3S_MAX_TOPK];
        double *all = malloc(sizeof(double) * (size_t)nb);
        ref_select(f, t, g, sel, all);
        for (int j = first; j < K && id[j] >= 0; j++) {
          double w = all[id[j]];
          ok &= isnan(w) ? isnan(s[j]) : fabs(s[j] - w) <= 1e-3 * (1 + fabs(w));
        }
        free(all);
        sampled++;
      }
      if (!ok && !bad++)
        snprintf(msg, msz, "rank %d row %d head %d (nb %lld, want %lld): first ids %d %d %d", n, t,
                 g, (long long)nb, (long long)want, id[0], K > 1 ? id[1] : 0, K > 2 ? id[2] : 0);
    }
  }
  return bad;
}

/* Partial rows of rank n whose selection holds no block n owns: out exactly
 * 0, lse -inf (the other rows are checked through the merge). */
static int check_empty_partials(const fixture *f, const cp_exchange *x, int n, int cp_size,
                                int il) {
  const m3s_layer_config *c = &f->cfg;
  int G = c->num_q_heads / c->num_kv_heads, bad = 0;
  m3s_tensor o = cp_slice(&x->outs, n), l = cp_slice(&x->lses, n);
  for (int t = 0; t < f->T; t++) {
    int64_t pos = fx_pos(f, t), nb = pos < 0 ? 0 : pos / 128 + 1;
    int64_t kk = nb < c->topk ? nb : c->topk;
    for (int g = 0; g < c->num_kv_heads; g++) {
      int owns = 0;
      for (int64_t k = 0; k < kk; k++) {
        int32_t id = *fx_topk_at(f, t, g, (int)k);
        owns |= id >= 0 && cp_owner(cp_size, il, id) == n;
      }
      if (owns)
        continue;
      for (int h = g * G; h < (g + 1) * G; h++) {
        float lv = ((const float *)l.data)[t * l.stride[0] + h];
        bad += !(isinf(lv) && lv < 0);
        for (int d = 0; d < 128; d++)
          bad += load_elem(o.data, o.dtype, t * o.stride[0] + h * o.stride[1] + d) != 0.0;
      }
    }
  }
  return bad;
}

/* One cp step of case c on cp_size ranks, interleave il. */
static void run_cp_case(const cp_case *c, int cp_size, int il) {
  char name[160], msg[320];
  snprintf(name, sizeof name, "%s_cp%d_il%d", c->name, cp_size, il);
  fixture f = make_fixture(c, 1000 + (uint64_t)cp_size * 10 + (uint64_t)il);
  int64_t T = f.T, Hq = f.cfg.num_q_heads, Hkv = f.cfg.num_kv_heads, K = f.cfg.topk;
  size_t tk_bytes = sizeof(int32_t) * (size_t)(T * Hkv * K);
  size_t out_bytes = (size_t)(T * Hq * 128) * m3s_dtype_size(f.sp.act_dtype);
  size_t lse_bytes = sizeof(float) * (size_t)(T * Hq);
  /* the single-GPU layer on the whole cache */
  fx_poison(&f);
  m3s_status st = m3s_index_topk(g_ctx, &f.cfg, &f.batch, &f.iq, &f.ic, &f.topk, NULL);
  if (st == M3S_OK)
    st = m3s_sparse_attention(g_ctx, &f.cfg, &f.batch, &f.q, &f.kv, &f.scales, &f.topk, &f.out,
                              &f.lse, NULL);
  if (!CHECK(st == M3S_OK, name)) {
    fprintf(stderr, "  whole cache: %s\n", m3s_last_error());
    fx_free(&f);
    return;
  }
  int32_t *want_tk = malloc(tk_bytes);
  void *want_out = malloc(out_bytes), *rank0_out = malloc(out_bytes);
  float *want_lse = malloc(lse_bytes), *rank0_lse = malloc(lse_bytes);
  memcpy(want_tk, f.topk_mem, tk_bytes); /* head-major or token-major: the same buffer shape */
  memcpy(want_out, f.out_mem, out_bytes);
  memcpy(want_lse, f.lse_mem, lse_bytes);

  cp_rank *rk = malloc(sizeof(cp_rank) * (size_t)cp_size);
  for (int n = 0; n < cp_size; n++)
    cp_rank_init(&rk[n], &f, cp_size, n, il, (uint64_t)cp_size * 100 + (uint64_t)il);
  cp_exchange x;
  cp_exchange_init(&x, &f, cp_size, c->packed);
  cp_exchange_poison(&x);
  /* 1. candidates of each rank, straight into its slice of the gathered
   *    buffer (what an in-place all-gather leaves there) */
  int ok = 1;
  for (int n = 0; n < cp_size && ok; n++) {
    m3s_tensor ids = cp_slice(&x.ids, n), sc = cp_slice(&x.scores, n);
    st = m3s_index_topk_candidates(g_ctx, &f.cfg, &rk[n].batch, &f.iq, &rk[n].ic, &ids, &sc, NULL);
    ok = CHECK(st == M3S_OK, name);
    if (!ok)
      fprintf(stderr, "  rank %d candidates: %s\n", n, m3s_last_error());
  }
  for (int n = 0; n < cp_size && ok; n++) {
    msg[0] = '\0';
    int bad = check_candidates(&f, &x, n, cp_size, il, msg, sizeof msg);
    if (!CHECK(bad == 0, name))
      fprintf(stderr, "  candidates: %d bad rows; %s\n", bad, msg);
  }
  /* 3. the merge on every rank: bit-identical to the whole-cache top-k */
  for (int n = 0; n < cp_size && ok; n++) {
    fx_poison(&f);
    st = m3s_merge_topk_candidates(g_ctx, &f.cfg, &rk[n].batch, &x.ids, &x.scores, &f.topk, NULL);
    ok = CHECK(st == M3S_OK, name);
    if (!ok)
      fprintf(stderr, "  rank %d merge: %s\n", n, m3s_last_error());
    else if (!CHECK(memcmp(f.topk_mem, want_tk, tk_bytes) == 0, name))
      fprintf(stderr, "  rank %d: merged top-k differs from m3s_index_topk on the whole cache\n",
              n);
  }
  /* 4. attention of each rank over its blocks, into its slice */
  for (int n = 0; n < cp_size && ok; n++) {
    m3s_tensor o = cp_slice(&x.outs, n), l = cp_slice(&x.lses, n);
    st = m3s_sparse_attention(g_ctx, &f.cfg, &rk[n].batch, &f.q, &rk[n].kv, &rk[n].scales, &f.topk,
                              &o, &l, NULL);
    ok = CHECK(st == M3S_OK, name);
    if (!ok)
      fprintf(stderr, "  rank %d attention: %s\n", n, m3s_last_error());
    else if (!CHECK(check_empty_partials(&f, &x, n, cp_size, il) == 0, name))
      fprintf(stderr, "  rank %d: a row owning none of its blocks is not 0 / -inf\n", n);
  }
  /* 5. the N-way merge on every rank: identical everywhere, = the layer */
  for (int n = 0; n < cp_size && ok; n++) {
    fx_poison(&f);
    memcpy(f.topk_mem, want_tk, tk_bytes);
    st = m3s_merge_attn_states_n(g_ctx, &x.outs, &x.lses, &f.out, &f.lse, NULL);
    ok = CHECK(st == M3S_OK, name);
    if (!ok) {
      fprintf(stderr, "  rank %d merge_n: %s\n", n, m3s_last_error());
    } else if (n == 0) {
      memcpy(rank0_out, f.out_mem, out_bytes);
      memcpy(rank0_lse, f.lse_mem, lse_bytes);
    } else {
      CHECK(memcmp(rank0_out, f.out_mem, out_bytes) == 0 &&
                memcmp(rank0_lse, f.lse_mem, lse_bytes) == 0,
            name);
    }
  }
  if (ok) {
    check_attention_vs_ref(&f, 1, name);
    double rel = rel_l2(f.out_mem, f.sp.act_dtype, want_out, f.sp.act_dtype, T * Hq * 128);
    double dl = lse_max_diff(f.lse_mem, want_lse, T * Hq);
    snprintf(msg, sizeof msg, "%s: vs the unsplit attention rel L2 %.3g, lse diff %.3g", name, rel,
             dl);
    CHECK(rel < 5e-3 && dl < 1e-3, msg);
    if (getenv("M3S_TEST_VERBOSE"))
      printf("  %s\n", msg);
  }
  cp_exchange_free(&x);
  for (int n = 0; n < cp_size; n++)
    cp_rank_free(&rk[n]);
  free(rk);
  free(want_tk);
  free(want_out);
  free(rank0_out);
  free(want_lse);
  free(rank0_lse);
  fx_free(&f);
}

static void test_cp_splits(void) {
  const int sizes[] = {2, 3, 4, 8};
  cp_case cases[] = {
      {.name = "m3_tp8_mixed", .cfg = m3s_config_minimax_m3(8)},
      {.name = "hkv2_k6_init1_local2_mixed_packed", .cfg = fx_cfg(8, 2, 6, 1, 2), .packed = 1},
      {.name = "m3_tp2_spec_decode_q4", .cfg = m3s_config_minimax_m3(2), .uniform = 1},
  };
  for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++)
    for (int s = 0; s < 4; s++)
      for (int il = 1; il <= 2; il++)
        if (test_selected(cases[c].name))
          run_cp_case(&cases[c], sizes[s], il);
}

static void test_cp_ties_and_formats(void) {
  struct {
    cp_case c;
    int cp, il;
  } cases[] = {
      {{.name = "nan_scores", .cfg = fx_cfg(8, 2, 16, 0, 1), .ties = TIES_NAN}, 3, 2},
      {{.name = "nan_scores_init2", .cfg = fx_cfg(4, 1, 8, 2, 1), .ties = TIES_NAN, .packed = 1},
       4,
       1},
      {{.name = "equal_scores", .cfg = fx_cfg(8, 2, 16, 0, 1), .ties = TIES_EQUAL}, 4, 1},
      {{.name = "equal_scores_k5", .cfg = fx_cfg(4, 2, 5, 1, 1), .ties = TIES_EQUAL}, 8, 2},
      {{.name = "signed_zero_scores", .cfg = fx_cfg(4, 1, 6, 0, 2), .ties = TIES_SIGNED_ZERO},
       3,
       1},
      {{.name = "grid_scores", .cfg = fx_cfg(8, 1, 4, 0, 1), .ties = TIES_GRID}, 2, 3},
      {{.name = "e4m3_caches_per_slot_scales_token_major",
        .cfg = m3s_config_minimax_m3(4),
        .kv_dtype = M3S_E4M3,
        .idx_dtype = M3S_E4M3,
        .scale_mode = 2,
        .token_major = 1,
        .topk_head_major = 1,
        .packed = 1},
       4,
       2},
      {{.name = "e5m2_cache_scalar_scales_spec_decode",
        .cfg = m3s_config_minimax_m3(8),
        .uniform = 1,
        .kv_dtype = M3S_E5M2,
        .scale_mode = 1},
       3,
       1},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
    if (test_selected(cases[i].c.name))
      run_cp_case(&cases[i].c, cases[i].cp, cases[i].il);
}

/* Without context parallel the chain is candidates of the whole cache then a
 * one-way merge: the same top-k, and a one-way N merge is the identity up to
 * the output rounding. */
static void test_cp_one_rank(void) {
  cp_case c = {.name = "one_rank", .cfg = fx_cfg(8, 2, 6, 1, 1)};
  fixture f = make_fixture(&c, 5);
  size_t tk_bytes = sizeof(int32_t) * (size_t)(f.T * 2 * 6);
  int32_t *want = malloc(tk_bytes);
  fx_poison(&f);
  int ok = m3s_index_topk(g_ctx, &f.cfg, &f.batch, &f.iq, &f.ic, &f.topk, NULL) == M3S_OK;
  memcpy(want, f.topk_mem, tk_bytes);
  for (int mode = 0; mode < 2 && ok; mode++) {
    /* mode 0: a zero cp; mode 1: cp_size 1 with an interleave of 5 */
    f.batch.cp = mode ? (m3s_cp){1, 0, 5} : (m3s_cp){0, 0, 0};
    cp_exchange x;
    cp_exchange_init(&x, &f, 1, mode);
    cp_exchange_poison(&x);
    m3s_tensor ids = cp_slice(&x.ids, 0), sc = cp_slice(&x.scores, 0);
    fx_poison(&f);
    ok = CHECK(m3s_index_topk_candidates(g_ctx, &f.cfg, &f.batch, &f.iq, &f.ic, &ids, &sc, NULL) ==
                       M3S_OK &&
                   m3s_merge_topk_candidates(g_ctx, &f.cfg, &f.batch, &x.ids, &x.scores, &f.topk,
                                             NULL) == M3S_OK,
               mode ? "cp_size 1: candidates + merge run" : "zero cp: candidates + merge run");
    CHECK(ok && memcmp(want, f.topk_mem, tk_bytes) == 0,
          mode ? "cp_size 1: merged top-k == m3s_index_topk" : "zero cp: merged == index_topk");
    if (ok && mode == 0) {
      /* also accepted by the whole-cache operations */
      ok = CHECK(m3s_sparse_attention(g_ctx, &f.cfg, &f.batch, &f.q, &f.kv, NULL, &f.topk, &f.out,
                                      &f.lse, NULL) == M3S_OK,
                 "zero cp: attention runs");
    }
    cp_exchange_free(&x);
  }
  f.batch.cp = (m3s_cp){1, 0, 1};
  CHECK(m3s_index_topk(g_ctx, &f.cfg, &f.batch, &f.iq, &f.ic, &f.topk, NULL) == M3S_OK &&
            memcmp(want, f.topk_mem, tk_bytes) == 0,
        "cp_size 1: m3s_index_topk accepts it and selects the same");
  free(want);
  fx_free(&f);
}

/* The column formula of the header against counting, and the helper. */
static void test_cp_local_block(void) {
  int bad = 0;
  for (int cp = 1; cp <= 8; cp++)
    for (int il = 1; il <= 3; il++)
      for (int rank = 0; rank < cp; rank++) {
        m3s_cp c = {cp, rank, il};
        int64_t count = 0;
        for (int64_t b = 0; b < 200; b++) {
          int64_t col = -2;
          int owned = cp_owner(cp, il, b) == rank;
          bad += m3s_cp_local_block(&c, b, &col) != M3S_OK || col != (owned ? count : -1);
          count += owned;
        }
      }
  CHECK(bad == 0, "m3s_cp_local_block == the count of the rank's earlier blocks, -1 elsewhere");
  int64_t col = -2;
  CHECK(m3s_cp_local_block(&(m3s_cp){0, 0, 0}, 77, &col) == M3S_OK && col == 77,
        "zero cp: the block is its own column");
}

/* ------------------------------------------------------------------------
 * The N-way merge: conventions of m3s_merge_attn_states
 * ---------------------------------------------------------------------- */
static void test_merge_n_conventions(void) {
  enum { N = 5, T = 3, H = 4 };
  static float outs[N][T][H][128], lses[N][T][H], out[T][H][128], lse[T][H];
  static float out2[T][H][128], lse2[T][H];
  uint64_t rng = 42;
  for (int n = 0; n < N; n++)
    for (int t = 0; t < T; t++)
      for (int h = 0; h < H; h++) {
        for (int d = 0; d < 128; d++)
          outs[n][t][h][d] = rng_normal(&rng);
        lses[n][t][h] = 3.0f * rng_normal(&rng);
      }
  /* row (0, 0): every side -inf; row (0, 1): one side finite; row (1, 2):
   * lse +-large */
  for (int n = 0; n < N; n++)
    lses[n][0][0] = -INFINITY, lses[n][0][1] = n == 3 ? 1.5f : -INFINITY;
  lses[0][1][2] = 80.0f, lses[4][1][2] = -80.0f;
  m3s_tensor to = m3s_tensor_make(outs, M3S_F32, 4, (int64_t[]){N, T, H, 128}, M3S_HOST);
  m3s_tensor tl = m3s_tensor_make(lses, M3S_F32, 3, (int64_t[]){N, T, H}, M3S_HOST);
  m3s_tensor o = m3s_tensor_make(out, M3S_F32, 3, (int64_t[]){T, H, 128}, M3S_HOST);
  m3s_tensor l = m3s_tensor_make(lse, M3S_F32, 2, (int64_t[]){T, H}, M3S_HOST);
  memset(out, 0x7f, sizeof out);
  int ok = CHECK(m3s_merge_attn_states_n(g_ctx, &to, &tl, &o, &l, NULL) == M3S_OK, "merge_n");
  int zero = ok && isinf(lse[0][0]) && lse[0][0] < 0;
  for (int d = 0; d < 128; d++)
    zero &= out[0][0][d] == 0.0f;
  CHECK(zero, "merge_n: every side -inf gives out 0, lse -inf");
  CHECK(ok && lse[0][1] == 1.5f && memcmp(out[0][1], outs[3][0][1], sizeof out[0][1]) == 0,
        "merge_n: one finite side is copied exactly");
  /* fp64 reference */
  double err = 0, nrm = 0, lerr = 0;
  for (int t = 0; t < T; t++)
    for (int h = 0; h < H; h++) {
      double mx = -INFINITY, sum = 0;
      for (int n = 0; n < N; n++)
        mx = lses[n][t][h] > mx ? lses[n][t][h] : mx;
      if (isinf(mx))
        continue;
      for (int n = 0; n < N; n++)
        sum += exp(lses[n][t][h] - mx);
      double wl = mx + log(sum);
      lerr = fmax(lerr, fabs(wl - lse[t][h]));
      for (int d = 0; d < 128; d++) {
        double w = 0;
        for (int n = 0; n < N; n++)
          w += exp(lses[n][t][h] - wl) * outs[n][t][h][d];
        err += (w - out[t][h][d]) * (w - out[t][h][d]);
        nrm += w * w;
      }
    }
  CHECK(ok && sqrt(err / nrm) < 1e-5 && lerr < 1e-4, "merge_n: vs fp64 (f32 output)");
  /* N = 2 gives the bits of m3s_merge_attn_states */
  m3s_tensor two = to, twol = tl;
  two.shape[0] = 2, twol.shape[0] = 2;
  m3s_tensor oa = cp_slice(&to, 0), ob = cp_slice(&to, 1), la = cp_slice(&tl, 0),
             lb = cp_slice(&tl, 1);
  m3s_tensor o2 = m3s_tensor_make(out2, M3S_F32, 3, (int64_t[]){T, H, 128}, M3S_HOST);
  m3s_tensor l2 = m3s_tensor_make(lse2, M3S_F32, 2, (int64_t[]){T, H}, M3S_HOST);
  ok = m3s_merge_attn_states_n(g_ctx, &two, &twol, &o, &l, NULL) == M3S_OK &&
       m3s_merge_attn_states(g_ctx, &oa, &la, &ob, &lb, &o2, &l2, NULL) == M3S_OK;
  CHECK(ok && memcmp(out, out2, sizeof out) == 0 && memcmp(lse, lse2, sizeof lse) == 0,
        "merge_n with N = 2: the bits of m3s_merge_attn_states");
  /* bf16 output aliasing no input; lse optional; out aliasing outs[2] */
  static uint16_t ob16[T][H][128];
  m3s_tensor o16 = m3s_tensor_make(ob16, M3S_BF16, 3, (int64_t[]){T, H, 128}, M3S_HOST);
  CHECK(m3s_merge_attn_states_n(g_ctx, &to, &tl, &o16, NULL, NULL) == M3S_OK,
        "merge_n: bf16 output, lse NULL");
  ok = m3s_merge_attn_states_n(g_ctx, &to, &tl, &o, &l, NULL) == M3S_OK;
  memcpy(out2, out, sizeof out);
  m3s_tensor alias = cp_slice(&to, 2);
  ok = ok && m3s_merge_attn_states_n(g_ctx, &to, &tl, &alias, NULL, NULL) == M3S_OK;
  CHECK(ok && memcmp(outs[2], out2, sizeof out2) == 0, "merge_n: out may alias outs[2] exactly");
}

/* ------------------------------------------------------------------------
 * Bad input: status, message, nothing written
 * ---------------------------------------------------------------------- */
typedef struct {
  void *p;
  size_t n;
  unsigned char *copy;
} watched;
static watched g_w[8];
static int g_nw;

static void watch(void *p, size_t n) {
  g_w[g_nw].p = p;
  g_w[g_nw].n = n;
  g_w[g_nw].copy = malloc(n);
  g_nw++;
}

static void unwatch(void) {
  for (int i = 0; i < g_nw; i++)
    free(g_w[i].copy);
  g_nw = 0;
}

static void arm(void) {
  for (int i = 0; i < g_nw; i++) {
    for (size_t j = 0; j < g_w[i].n; j++)
      ((unsigned char *)g_w[i].p)[j] = (unsigned char)(0x5Au ^ (unsigned)(j * 13u));
    memcpy(g_w[i].copy, g_w[i].p, g_w[i].n);
  }
}

/* names: '&'-separated substrings the message must contain */
static void expect(m3s_status got, m3s_status want, const char *names, const char *what) {
  const char *e = m3s_last_error();
  int named = 1, untouched = 1;
  char buf[256];
  snprintf(buf, sizeof buf, "%s", names);
  for (char *tok = strtok(buf, "&"); tok; tok = strtok(NULL, "&"))
    named &= strstr(e, tok) != NULL;
  for (int i = 0; i < g_nw; i++)
    untouched &= memcmp(g_w[i].copy, g_w[i].p, g_w[i].n) == 0;
  char msg[640];
  snprintf(msg, sizeof msg, "%s: status %d (want %d), message \"%s\" (must name %s)%s", what,
           (int)got, (int)want, e, names, untouched ? "" : ", an output was written");
  CHECK(got == want && named && untouched, msg);
}

typedef struct {
  fixture f;
  cp_rank rk[2];
  cp_exchange x;
} bad_env;

static void bad_env_init(bad_env *e) {
  cp_case c = {.name = "bad", .cfg = fx_cfg(4, 2, 4, 0, 1)};
  e->f = make_fixture(&c, 77);
  for (int n = 0; n < 2; n++)
    cp_rank_init(&e->rk[n], &e->f, 2, n, 1, 3);
  cp_exchange_init(&e->x, &e->f, 2, 0);
}

static void bad_env_free(bad_env *e) {
  cp_exchange_free(&e->x);
  for (int n = 0; n < 2; n++)
    cp_rank_free(&e->rk[n]);
  fx_free(&e->f);
}

static m3s_status cands(bad_env *e, const m3s_batch *b, int n, m3s_tensor *ids, m3s_tensor *sc) {
  return m3s_index_topk_candidates(g_ctx, &e->f.cfg, b, &e->f.iq, &e->rk[n].ic, ids, sc, NULL);
}

static void test_bad_cp_fields(bad_env *e) {
  m3s_tensor ids = cp_slice(&e->x.ids, 0), sc = cp_slice(&e->x.scores, 0);
  watch(e->x.cand_mem, e->x.cand_bytes);
  watch(e->x.score_mem, e->x.score_bytes);
  struct {
    m3s_cp cp;
    const char *names, *what;
  } c[] = {
      {{-1, 0, 1}, "batch.cp.cp_size&-1", "cp_size -1"},
      {{M3S_MAX_CP_SIZE + 1, 0, 1}, "batch.cp.cp_size&65", "cp_size 65"},
      {{2, 2, 1}, "batch.cp.cp_rank&[0, 2)&got 2", "cp_rank == cp_size"},
      {{2, -1, 1}, "batch.cp.cp_rank&-1", "cp_rank -1"},
      {{0, 1, 0}, "batch.cp.cp_rank&cp_size 0", "cp_rank 1 without context parallel"},
      {{2, 0, 0}, "batch.cp.blocks_per_interleave&got 0", "interleave 0 with cp_size 2"},
      {{1, 0, 0}, "batch.cp.blocks_per_interleave", "interleave 0 with cp_size 1"},
      {{0, 0, -1}, "batch.cp.blocks_per_interleave&-1", "interleave -1"},
  };
  for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
    m3s_batch b = e->rk[0].batch;
    b.cp = c[i].cp;
    arm();
    expect(cands(e, &b, 0, &ids, &sc), M3S_ERR_INVALID, c[i].names, c[i].what);
  }
  /* the same rules for every operation that takes a batch */
  m3s_batch b = e->rk[0].batch;
  b.cp.cp_rank = 5;
  arm();
  expect(m3s_merge_topk_candidates(g_ctx, &e->f.cfg, &b, &e->x.ids, &e->x.scores, &e->f.topk, NULL),
         M3S_ERR_INVALID, "m3s_merge_topk_candidates&batch.cp.cp_rank", "merge: cp_rank 5");
  unwatch();
  watch(e->f.out_mem, (size_t)e->f.T * 4 * 128 * 2);
  arm();
  expect(m3s_sparse_attention(g_ctx, &e->f.cfg, &b, &e->f.q, &e->rk[0].kv, NULL, &e->f.topk,
                              &e->f.out, NULL, NULL),
         M3S_ERR_INVALID, "m3s_sparse_attention&batch.cp.cp_rank", "attention: cp_rank 5");
  unwatch();
  int64_t col = 9;
  expect(m3s_cp_local_block(NULL, 0, &col), M3S_ERR_NULL, "'cp'", "local_block: cp NULL");
  expect(m3s_cp_local_block(&(m3s_cp){2, 0, 1}, 0, NULL), M3S_ERR_NULL, "'out_column'",
         "local_block: out NULL");
  expect(m3s_cp_local_block(&(m3s_cp){2, 0, 1}, -1, &col), M3S_ERR_INVALID, "block&-1",
         "local_block: block -1");
  expect(m3s_cp_local_block(&(m3s_cp){3, 3, 1}, 0, &col), M3S_ERR_INVALID, "cp.cp_rank",
         "local_block: rank 3 of 3");
  CHECK(col == 9, "local_block: out_column untouched on failure");
}

static void test_bad_candidates(bad_env *e) {
  m3s_tensor ids = cp_slice(&e->x.ids, 0), sc = cp_slice(&e->x.scores, 0);
  const m3s_batch *b = &e->rk[0].batch;
  watch(e->x.cand_mem, e->x.cand_bytes);
  watch(e->x.score_mem, e->x.score_bytes);
  m3s_tensor t = ids;
  t.dtype = M3S_F32;
  arm();
  expect(cands(e, b, 0, &t, &sc), M3S_ERR_DTYPE, "'cand_ids'&i32", "cand_ids f32");
  t = sc;
  t.dtype = M3S_I32;
  arm();
  expect(cands(e, b, 0, &ids, &t), M3S_ERR_DTYPE, "'cand_scores'&f32", "cand_scores i32");
  t = sc;
  t.shape[2] -= 1;
  arm();
  expect(cands(e, b, 0, &ids, &t), M3S_ERR_SHAPE, "'cand_scores'&cfg.topk", "cand_scores K-1");
  t = ids;
  t.shape[0] -= 1;
  arm();
  expect(cands(e, b, 0, &t, &sc), M3S_ERR_SHAPE, "'cand_ids'&batch.num_tokens", "cand_ids T-1");
  t = ids;
  t.stride[0] = 0;
  arm();
  expect(cands(e, b, 0, &t, &sc), M3S_ERR_LAYOUT, "'cand_ids'&overlaps", "cand_ids overlapping");
  arm();
  expect(cands(e, b, 0, NULL, &sc), M3S_ERR_NULL, "'cand_ids'", "cand_ids NULL");
  arm();
  expect(cands(e, b, 0, &ids, NULL), M3S_ERR_NULL, "'cand_scores'", "cand_scores NULL");
  /* the rank's index table: too few columns for the blocks it owns, a page
   * beyond its cache */
  m3s_batch bb = *b;
  bb.index_block_table.shape[1] -= 1;
  arm();
  expect(cands(e, &bb, 0, &ids, &sc), M3S_ERR_RANGE,
         "batch.index_block_table&context-parallel rank", "index table one column short");
  m3s_tensor small = e->rk[0].ic;
  small.shape[0] = 1;
  arm();
  expect(m3s_index_topk_candidates(g_ctx, &e->f.cfg, b, &e->f.iq, &small, &ids, &sc, NULL),
         M3S_ERR_RANGE, "batch.index_block_table", "index page beyond the rank's cache");
  m3s_tensor iq = e->f.iq;
  iq.shape[1] = 1;
  arm();
  expect(m3s_index_topk_candidates(g_ctx, &e->f.cfg, b, &iq, &e->rk[0].ic, &ids, &sc, NULL),
         M3S_ERR_SHAPE, "'iq'", "iq with one index head");
  unwatch();
}

static void test_bad_merge(bad_env *e) {
  bad_env *v = e;
  /* valid candidates first, then break one thing at a time */
  for (int n = 0; n < 2; n++) {
    m3s_tensor ids = cp_slice(&v->x.ids, n), sc = cp_slice(&v->x.scores, n);
    CHECK(cands(v, &v->rk[n].batch, n, &ids, &sc) == M3S_OK, "bad-input setup: candidates");
  }
  const m3s_batch *b = &v->rk[1].batch;
  m3s_layer_config *cfg = &v->f.cfg;
  size_t tk = sizeof(int32_t) * (size_t)(v->f.T * 2 * 4);
  watch(v->f.topk_mem, tk);
  CHECK(m3s_merge_topk_candidates(g_ctx, cfg, b, &v->x.ids, &v->x.scores, &v->f.topk, NULL) ==
            M3S_OK,
        "bad-input setup: merge");
  m3s_tensor t = v->x.ids;
  t.shape[0] = 1;
  arm();
  expect(m3s_merge_topk_candidates(g_ctx, cfg, b, &t, &v->x.scores, &v->f.topk, NULL),
         M3S_ERR_SHAPE, "'cand_ids'&cp_size&got 1", "cand_ids from 1 rank for cp_size 2");
  t = v->x.scores;
  t.shape[0] = 3;
  arm();
  expect(m3s_merge_topk_candidates(g_ctx, cfg, b, &v->x.ids, &t, &v->f.topk, NULL), M3S_ERR_SHAPE,
         "'cand_scores'&cp_size&got 3", "cand_scores from 3 ranks");
  m3s_tensor three = cp_slice(&v->x.ids, 0);
  arm();
  expect(m3s_merge_topk_candidates(g_ctx, cfg, b, &three, &v->x.scores, &v->f.topk, NULL),
         M3S_ERR_SHAPE, "'cand_ids'&4 dimensions", "cand_ids 3-D");
  t = v->x.scores;
  t.dtype = M3S_BF16;
  arm();
  expect(m3s_merge_topk_candidates(g_ctx, cfg, b, &v->x.ids, &t, &v->f.topk, NULL), M3S_ERR_DTYPE,
         "'cand_scores'", "cand_scores bf16");
  t = v->f.topk;
  t.shape[2] = 3;
  arm();
  expect(m3s_merge_topk_candidates(g_ctx, cfg, b, &v->x.ids, &v->x.scores, &t, NULL), M3S_ERR_SHAPE,
         "'topk'&cfg.topk", "topk K-1");
  m3s_batch plain = *b;
  plain.cp = (m3s_cp){0, 0, 0};
  arm();
  expect(m3s_merge_topk_candidates(g_ctx, cfg, &plain, &v->x.ids, &v->x.scores, &v->f.topk, NULL),
         M3S_ERR_SHAPE, "'cand_ids'&cp_size", "two ranks' candidates for a batch without cp");
  /* values: the last row of request 0 (40 blocks, K 4) of rank 0 */
  int t0 = 0; /* request 0 has one row, at pos 4999 */
  int32_t *row = (int32_t *)v->x.ids.data + t0 * v->x.ids.stride[1];
  int32_t keep[4];
  memcpy(keep, row, sizeof keep);
  struct {
    int32_t id;
    int slot;
    const char *names, *what;
  } c[] = {
      {1, 0, "cand_ids[0][0][0][0] = 1&rank 1", "a block of rank 1 sent by rank 0"},
      {40, 0, "cand_ids[0][0][0][0] = 40&nb = 40", "id == nb"},
      {-2, 1, "cand_ids[0][0][0][1] = -2", "id -2"},
      {-1, -1, "twice", "a duplicate id"},
  };
  for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
    memcpy(row, keep, sizeof keep);
    if (c[i].slot >= 0)
      row[c[i].slot] = c[i].id;
    else
      row[1] = row[0] = 2; /* rank 0 owns block 2 */
    arm();
    expect(m3s_merge_topk_candidates(g_ctx, cfg, b, &v->x.ids, &v->x.scores, &v->f.topk, NULL),
           M3S_ERR_RANGE, c[i].names, c[i].what);
  }
  memcpy(row, keep, sizeof keep);
  unwatch();
}

static void test_bad_merge_n(bad_env *e) {
  cp_exchange *x = &e->x;
  int64_t T = e->f.T;
  watch(e->f.out_mem, (size_t)T * 4 * 128 * 2);
  watch(e->f.lse_mem, (size_t)T * 4 * 4);
  m3s_tensor *o = &e->f.out, *l = &e->f.lse;
  for (size_t i = 0; i < x->outs_bytes / 2; i++)
    ((uint16_t *)x->outs_mem)[i] = 0x3f80;
  for (size_t i = 0; i < x->lses_bytes / 4; i++)
    x->lses_mem[i] = 1.0f;
  CHECK(m3s_merge_attn_states_n(g_ctx, &x->outs, &x->lses, o, l, NULL) == M3S_OK,
        "bad-input setup: merge_n");
  m3s_tensor t = x->outs;
  t.shape[0] = 0;
  arm();
  expect(m3s_merge_attn_states_n(g_ctx, &t, &x->lses, o, l, NULL), M3S_ERR_SHAPE,
         "'outs'&[1, 64]&got 0", "no partial results");
  t = x->outs;
  t.shape[0] = M3S_MAX_CP_SIZE + 1, t.stride[0] = 0;
  arm();
  expect(m3s_merge_attn_states_n(g_ctx, &t, &x->lses, o, l, NULL), M3S_ERR_SHAPE, "'outs'&got 65",
         "65 partial results");
  t = x->lses;
  t.shape[0] = 1;
  arm();
  expect(m3s_merge_attn_states_n(g_ctx, &x->outs, &t, o, l, NULL), M3S_ERR_SHAPE,
         "'lses'&outs.shape[0]", "lses from one rank, outs from two");
  t = x->lses;
  t.shape[1] -= 1;
  arm();
  expect(m3s_merge_attn_states_n(g_ctx, &x->outs, &t, o, l, NULL), M3S_ERR_SHAPE,
         "'lses'&outs.shape[1]", "lses T-1");
  t = *o;
  t.shape[1] = 3;
  arm();
  expect(m3s_merge_attn_states_n(g_ctx, &x->outs, &x->lses, &t, l, NULL), M3S_ERR_SHAPE, "'out'",
         "out with 3 heads");
  t = *o;
  t.dtype = M3S_E4M3;
  arm();
  expect(m3s_merge_attn_states_n(g_ctx, &x->outs, &x->lses, &t, l, NULL), M3S_ERR_DTYPE, "'out'",
         "out e4m3");
  t = *l;
  t.dtype = M3S_BF16;
  arm();
  expect(m3s_merge_attn_states_n(g_ctx, &x->outs, &x->lses, o, &t, NULL), M3S_ERR_DTYPE, "'lse'",
         "lse bf16");
  t = x->outs;
  t.dtype = M3S_I32;
  arm();
  expect(m3s_merge_attn_states_n(g_ctx, &t, &x->lses, o, l, NULL), M3S_ERR_DTYPE, "'outs'",
         "outs i32");
  t = x->outs;
  t.shape[3] = 64;
  arm();
  expect(m3s_merge_attn_states_n(g_ctx, &t, &x->lses, o, l, NULL), M3S_ERR_SHAPE, "'outs'&head_dim",
         "outs with 64-element rows");
  arm();
  expect(m3s_merge_attn_states_n(g_ctx, NULL, &x->lses, o, l, NULL), M3S_ERR_NULL, "'outs'",
         "outs NULL");
  arm();
  expect(m3s_merge_attn_states_n(g_ctx, &x->outs, &x->lses, NULL, l, NULL), M3S_ERR_NULL, "'out'",
         "out NULL");
  arm();
  expect(m3s_merge_attn_states_n(NULL, &x->outs, &x->lses, o, l, NULL), M3S_ERR_NULL, "'ctx'",
         "ctx NULL");
  unwatch();
}

/* Operations that need the whole cache refuse a cp batch; attention checks
 * the rank's own table. */
static void test_bad_whole_cache_ops(bad_env *e) {
  fixture *f = &e->f;
  const m3s_batch *b = &e->rk[1].batch;
  watch(f->topk_mem, sizeof(int32_t) * (size_t)(f->T * 2 * 4));
  arm();
  expect(m3s_index_topk(g_ctx, &f->cfg, b, &f->iq, &e->rk[1].ic, &f->topk, NULL), M3S_ERR_INVALID,
         "m3s_index_topk&batch.cp.cp_size = 2&m3s_index_topk_candidates",
         "index_topk on a cp rank");
  unwatch();
  CHECK(m3s_index_topk(g_ctx, &f->cfg, &f->batch, &f->iq, &f->ic, &f->topk, NULL) == M3S_OK,
        "bad-input setup: whole-cache top-k");
  watch(f->out_mem, (size_t)f->T * 4 * 128 * 2);
  watch(f->lse_mem, (size_t)f->T * 4 * 4);
  m3s_step step;
  memset(&step, 0, sizeof step);
  step.prefill = *b;
  arm();
  expect(m3s_step_forward(g_ctx, &f->cfg, &step, &f->q, &f->iq, &e->rk[1].kv, NULL, &e->rk[1].ic,
                          &f->topk, &f->out, &f->lse, NULL),
         M3S_ERR_INVALID, "prefill&batch.cp.cp_size", "step_forward with a cp part");
  m3s_batch bb = *b;
  bb.block_table.shape[1] -= 1;
  arm();
  expect(m3s_sparse_attention(g_ctx, &f->cfg, &bb, &f->q, &e->rk[1].kv, NULL, &f->topk, &f->out,
                              &f->lse, NULL),
         M3S_ERR_RANGE, "batch.block_table&context-parallel rank", "main table one column short");
  m3s_tensor small = e->rk[1].kv;
  small.shape[0] = 1;
  arm();
  expect(m3s_sparse_attention(g_ctx, &f->cfg, b, &f->q, &small, NULL, &f->topk, &f->out, &f->lse,
                              NULL),
         M3S_ERR_RANGE, "batch.block_table", "main page beyond the rank's cache");
  unwatch();
  /* k2q: valid CSR of the whole batch, then the rank's batch */
  k2q_shapes ks;
  if (!CHECK(fx_k2q_shapes(g_ctx, f, &ks), "bad-input setup: k2q shapes"))
    return;
  void *mem[K2Q_NBUF];
  m3s_tensor k2q[K2Q_NBUF];
  for (int i = 0; i < K2Q_NBUF; i++) {
    k2q[i] = fx_k2q_view(&ks, i, NULL, M3S_HOST);
    mem[i] = malloc(tensor_bytes(&k2q[i]) + 4);
    k2q[i].data = mem[i];
  }
  CHECK(m3s_build_k2q_csr(g_ctx, &f->cfg, &f->batch, &f->topk, &k2q[0], &k2q[1], &k2q[2], &k2q[3],
                          NULL) == M3S_OK,
        "bad-input setup: k2q CSR");
  watch(mem[4], tensor_bytes(&k2q[4]));
  watch(mem[5], tensor_bytes(&k2q[5]));
  arm();
  expect(m3s_k2q_attention(g_ctx, &f->cfg, b, &f->q, &e->rk[1].kv, NULL, &k2q[0], &k2q[1], &k2q[2],
                           &k2q[4], &k2q[5], NULL),
         M3S_ERR_UNSUPPORTED, "k2q&m3s_sparse_attention", "k2q attention on a cp rank");
  unwatch();
  for (int i = 0; i < K2Q_NBUF; i++)
    free(mem[i]);
}

static void test_query_support(void) {
  m3s_layer_config cfg = m3s_config_minimax_m3(1);
  const m3s_op ops[] = {M3S_OP_INDEX_TOPK_CANDIDATES, M3S_OP_MERGE_TOPK_CANDIDATES,
                        M3S_OP_ATTENTION_CP, M3S_OP_MERGE_N};
  for (int i = 0; i < 4; i++) {
    m3s_support_query q = {ops[i], M3S_BF16, M3S_BF16, M3S_BF16, 0, M3S_LAYOUT_HEAD_MAJOR};
    m3s_support_info info;
    CHECK(m3s_query_support(g_ctx, &cfg, &q, &info) == M3S_OK && info.supported && info.kernel[0] &&
              !info.reason[0],
          "the CPU backend supports every context-parallel operation");
  }
  m3s_support_query q = {(m3s_op)(M3S_OP_MERGE_N + 1), M3S_BF16, M3S_BF16, M3S_BF16, 0, 0};
  m3s_support_info info;
  CHECK(m3s_query_support(g_ctx, &cfg, &q, &info) == M3S_ERR_INVALID, "op past M3S_OP_MERGE_N");
}

static void test_bad_input(void) {
  bad_env e;
  bad_env_init(&e);
  test_bad_cp_fields(&e);
  test_bad_candidates(&e);
  test_bad_merge(&e);
  test_bad_merge_n(&e);
  test_bad_whole_cache_ops(&e);
  bad_env_free(&e);
}

int main(void) {
  if (m3s_context_create(-1, &g_ctx) != M3S_OK) {
    fprintf(stderr, "context: %s\n", m3s_last_error());
    return 1;
  }
  test_cp_local_block();
  test_cp_one_rank();
  test_merge_n_conventions();
  test_query_support();
  test_bad_input();
  test_cp_ties_and_formats();
  test_cp_splits();
  m3s_context_destroy(g_ctx);
  return TEST_FINISH();
}
