/* SPEC section 3 on the CUDA backend: m3s_index_topk on a CUDA context must
 * EQUAL the CPU backend's result exactly, entry for entry, for every input
 * (both compute each score with the same fixed-order fp32 dot product on the
 * same exactly converted inputs, and select under the same total order), so
 * continuous random values are compared exactly too, not only grid values.
 *
 * Each case builds a fixture (tests/ref.h) with fresh random inputs, runs the
 * CPU context, then the CUDA context on device copies with poisoned outputs,
 * and compares every top-k entry; the CPU result itself is first checked
 * against the fp64 brute force of tests/ref.c (check_topk_vs_fp64_rows: up to
 * 48 rows per case, exact on grid data). Cases cover the TP shapes, decode rows at
 * block boundaries up to 128K (and one 1M-token row), a long prefill behind a
 * cached prefix, bf16/e4m3 index caches, f16 queries, uniform (q_len 1, 4) and
 * ragged batches (query_start_loc[0] != 0), padded requests, a head-major
 * top-k view, init/local/K variants, NaN keys, and the device-side guards
 * (page ids out of range, bad seq_lens) that the CPU rejects up front.
 *
 * M3S_TEST_QUICK=1 skips the large cases (for compute-sanitizer runs);
 * M3S_TEST_FILTER (comma-separated substrings of case names) runs some. */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */
#include "gpu_util.h"

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static m3s_context *g_cpu, *g_gpu;
static int g_quick;
static uint64_t g_seed = 20261101;

static m3s_layer_config tp_cfg(int tp) {
  m3s_layer_config c = m3s_config_minimax_m3(tp);
  return c;
}

static fx_spec spec_of(m3s_layer_config c, int nreq, const int32_t *ql, const int32_t *sl) {
  fx_spec s = fx_spec_default(c, nreq, ql, sl, g_seed++);
  s.kv_dtype = M3S_E4M3; /* unused by the indexer: the smallest main cache */
  s.grid = 1;
  return s;
}

/* Changes applied to a case: on the host fixture before anything runs, and
 * on the device copy (GPU-only bad data) with the CPU's expected result
 * adjusted to match. */
typedef struct {
  void (*host)(fixture *f);
  int (*device)(fixture *f, gpu_fx *g, int32_t *expect);
  int no_exec; /* exec == NULL when the context reports 0 workspace bytes */
} case_mods;

static size_t topk_count(const fixture *f) {
  return (size_t)f->T * (size_t)f->cfg.num_kv_heads * (size_t)f->cfg.topk;
}

static size_t topk_off(const fixture *f, int t, int g, int k) {
  return (size_t)(fx_topk_at(f, t, g, k) - (int32_t *)f->topk_mem);
}

/* Compares every entry; prints the first mismatch. Returns mismatches. */
static long compare_topk(const fixture *f, const int32_t *expect, const char *name) {
  long bad = 0;
  for (int t = 0; t < f->T; t++)
    for (int g = 0; g < f->cfg.num_kv_heads; g++)
      for (int k = 0; k < f->cfg.topk; k++) {
        size_t o = topk_off(f, t, g, k);
        int32_t want = expect[o], got = ((const int32_t *)f->topk_mem)[o];
        if (want == got)
          continue;
        if (bad++ == 0)
          fprintf(stderr,
                  "%s: first mismatch at row %d (pos %lld) head %d slot %d: cpu %d, cuda %d\n",
                  name, t, (long long)fx_pos(f, t), g, k, want, got);
      }
  if (bad)
    fprintf(stderr, "%s: %ld of %zu entries differ\n", name, bad, topk_count(f));
  return bad;
}

static void run_case(const char *name, fx_spec s, const case_mods *mods) {
  if (!test_selected(name))
    return;
  fixture f;
  gpu_fx g;
  double t0 = gpu_now_ms();
  fx_init(&f, &s);
  if (mods && mods->host)
    mods->host(&f);
  /* CPU reference */
  fx_poison(&f);
  double t1 = gpu_now_ms();
  m3s_status st = m3s_index_topk(g_cpu, &f.cfg, &f.batch, &f.iq, &f.ic, &f.topk, NULL);
  double t2 = gpu_now_ms();
  if (!CHECK(st == M3S_OK, name)) {
    fprintf(stderr, "%s: cpu m3s_index_topk: %s\n", name, m3s_last_error());
    fx_free(&f);
    return;
  }
  /* the CPU result itself against the fp64 brute force (every row of small
   * cases, 48 sampled rows of the large ones, 8 at 1M tokens): the GPU is compared with the
   * CPU below, so a CPU mistake on a shape only this test runs (K = 64 with
   * a large init, 1M-token rows, signed-zero ties, e4m3 NaN keys) would
   * otherwise pass unseen */
  check_topk_vs_fp64_rows(&f, name, f.batch.max_seq_len > 200000 ? 8 : 48);
  size_t n = topk_count(&f);
  int32_t *expect = malloc(sizeof(int32_t) * (n + 1));
  memcpy(expect, f.topk_mem, sizeof(int32_t) * n);
  /* CUDA */
  int ok = gpu_fx_upload(&g, &f, g_gpu) && gpu_fx_poison(&g, &f);
  if (ok && mods && mods->device)
    ok = mods->device(&f, &g, expect);
  if (!CHECK(ok, name)) {
    fprintf(stderr, "%s: device setup failed\n", name);
  } else {
    double t3 = gpu_now_ms();
    /* exec == NULL is only valid when the context needs no workspace at all
     * (m3s_workspace_size is the max over top-k and attention) */
    int null_exec = mods && mods->no_exec && g.ws_bytes == 0;
    if (mods && mods->no_exec && !null_exec) {
      /* the context reports workspace at these bounds (the attention's
       * share): a NULL exec must be refused with the workspace error */
      char what[160];
      snprintf(what, sizeof what, "%s: exec NULL refused (context workspace %zu B)", name,
               g.ws_bytes);
      CHECK(m3s_index_topk(g_gpu, &f.cfg, &g.batch, &g.iq_t, &g.ic_t, &g.topk_t, NULL) ==
                M3S_ERR_WORKSPACE,
            what);
    }
    st = m3s_index_topk(g_gpu, &f.cfg, &g.batch, &g.iq_t, &g.ic_t, &g.topk_t,
                        null_exec ? NULL : &g.exec);
    int synced = gpu_sync();
    double t4 = gpu_now_ms();
    if (st != M3S_OK)
      fprintf(stderr, "%s: cuda m3s_index_topk: %s\n", name, m3s_last_error());
    if (CHECK(st == M3S_OK && synced && gpu_fx_download(&g, &f), name)) {
      long bad = compare_topk(&f, expect, name);
      CHECK(bad == 0, name);
      printf("  %-44s T %5d  ws %9zu B%s  cpu %7.1f ms  cuda %6.2f ms  (total %.0f ms)%s\n", name,
             f.T, g.ws_bytes, null_exec ? " (exec NULL)" : "", t2 - t1, t4 - t3, gpu_now_ms() - t0,
             bad ? "  MISMATCH" : "");
    }
  }
  gpu_fx_free(&g);
  free(expect);
  fx_free(&f);
}

/* ---- host mutations ---------------------------------------------------- */

/* Host mutations: tests/ref.c (fx_nan_index_keys, fx_equal_index_keys,
 * fx_signed_zero_index_keys) and the NaN pages of the guard case. */
static int32_t ibt_at(const fixture *f, int r, int64_t b) {
  return f->ibt[r * f->batch.index_block_table.stride[0] + b];
}

static void poison_page(fixture *f, int32_t page) {
  for (int64_t i = 0; i < 128 * 128; i++) {
    if (f->sp.idx_dtype == M3S_BF16)
      ((uint16_t *)f->ic_mem)[(int64_t)page * 128 * 128 + i] = 0x7FC0;
    else
      ((uint8_t *)f->ic_mem)[(int64_t)page * 128 * 128 + i] = 0x7F;
  }
}

static void nan_keys(fixture *f) { fx_nan_index_keys(f); }
static void all_ties(fixture *f) { fx_equal_index_keys(f); }
static void signed_zero_ties(fixture *f) { fx_signed_zero_index_keys(f); }

/* ---- device mutations (GPU-only bad data) -------------------------------- */

/* Request 0's index-table entries of blocks 5 and 7 point outside the cache
 * on the device. The CUDA backend scores those blocks NaN; the CPU sees the
 * same when those pages' keys are NaN, which guard_pages_host arranges. */
static void guard_pages_host(fixture *f) {
  poison_page(f, ibt_at(f, 0, 5));
  poison_page(f, ibt_at(f, 0, 7));
}

static int guard_pages_device(fixture *f, gpu_fx *g, int32_t *expect) {
  (void)expect;
  int64_t s0 = f->batch.index_block_table.stride[0];
  size_t bytes = sizeof(int32_t) * (size_t)(f->sp.num_reqs * s0 + 1);
  int32_t *tab = malloc(bytes);
  memcpy(tab, f->ibt, bytes);
  tab[5] = (int32_t)f->num_pages + 1000;
  tab[7] = -3;
  int ok = gpu_put(g->ibt, tab, bytes);
  free(tab);
  return ok;
}

/* Request 1 gets seq_len > max_seq_len and request 2 seq_len < q_len on the
 * device: their rows must come out all -1. */
static int guard_seqlens_device(fixture *f, gpu_fx *g, int32_t *expect) {
  int32_t *sl = malloc(sizeof(int32_t) * (size_t)(f->sp.num_reqs + 1));
  memcpy(sl, f->seqlens, sizeof(int32_t) * (size_t)(f->sp.num_reqs + 1));
  sl[1] = (int32_t)f->batch.max_seq_len + 1;
  sl[2] = f->qlens[2] - 1;
  int ok = gpu_put(g->seq, sl, sizeof(int32_t) * (size_t)(f->sp.num_reqs + 1));
  free(sl);
  for (int t = 0; t < f->T; t++) {
    int i, r = fx_request_of_row(f, t, &i);
    if (r == 1 || r == 2)
      for (int gg = 0; gg < f->cfg.num_kv_heads; gg++)
        for (int k = 0; k < f->cfg.topk; k++)
          expect[topk_off(f, t, gg, k)] = -1;
  }
  return ok;
}

/* ---- cases ------------------------------------------------------------- */

static void test_tp_shapes_decode(void) {
  static const int32_t sl[] = {1, 127, 128, 129, 2048, 2049, 5000, 0, 16 * 128, 16 * 128 + 1};
  static const int32_t ql[] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  for (int tp = 1; tp <= 8; tp *= 2) {
    for (int grid = 1; grid >= 0; grid--) {
      fx_spec s = spec_of(tp_cfg(tp), 10, ql, sl);
      s.uniform = 1;
      s.grid = grid;
      char name[96];
      snprintf(name, sizeof name, "decode_boundaries_tp%d_%s", tp, grid ? "grid" : "continuous");
      run_case(name, s, NULL);
    }
  }
}

static void test_long_decode(void) {
  if (g_quick)
    return;
  static const int32_t sl[] = {131072, 2049, 0, 131072 - 77};
  static const int32_t ql[] = {1, 1, 1, 1};
  fx_spec s = spec_of(tp_cfg(4), 4, ql, sl);
  s.uniform = 1;
  s.grid = 0;
  run_case("decode_128k_tp4_continuous", s, NULL);
}

static void test_prefill_long_prefix(void) {
  static const int32_t ql_q[] = {1, 1, 300, 37};
  static const int32_t sl_q[] = {129, 9000, 4000, 37};
  fx_spec q = spec_of(tp_cfg(2), 4, ql_q, sl_q);
  q.qsl_base = 5;
  run_case("ragged_decode_and_prefill_tp2_qsl_base5", q, NULL);
  if (g_quick)
    return;
  static const int32_t ql[] = {1, 1, 2000};
  static const int32_t sl[] = {129, 9000, 40000};
  fx_spec s = spec_of(tp_cfg(2), 3, ql, sl);
  s.qsl_base = 11;
  run_case("prefill_2000_behind_38000_tp2_grid", s, NULL);
  static const int32_t ql1[] = {1000};
  static const int32_t sl1[] = {21000};
  fx_spec c = spec_of(tp_cfg(1), 1, ql1, sl1);
  c.grid = 0;
  run_case("prefill_1000_behind_20000_tp1_continuous", c, NULL);
}

static void test_index_dtypes(void) {
  static const int32_t ql[] = {1, 64, 1};
  static const int32_t sl[] = {4000, 3100, 129};
  for (int v = 0; v < 4; v++) {
    fx_spec s = spec_of(tp_cfg(1), 3, ql, sl);
    s.idx_dtype = M3S_E4M3;
    s.act_dtype = (v & 1) ? M3S_F16 : M3S_BF16;
    s.grid = v < 2;
    char name[96];
    snprintf(name, sizeof name, "e4m3_index_%s_queries_%s", (v & 1) ? "f16" : "bf16",
             s.grid ? "grid" : "continuous");
    run_case(name, s, NULL);
  }
  fx_spec s = spec_of(tp_cfg(4), 3, ql, sl);
  s.act_dtype = M3S_F16;
  s.grid = 0;
  run_case("bf16_index_f16_queries_tp4_continuous", s, NULL);
}

static void test_spec_decode_uniform(void) {
  static const int32_t ql[] = {4, 4, 4, 4, 4};
  static const int32_t sl[] = {3000, 0, 700, 129, 4};
  for (int grid = 1; grid >= 0; grid--) {
    fx_spec s = spec_of(tp_cfg(1), 5, ql, sl);
    s.uniform = 1;
    s.grid = grid;
    run_case(grid ? "uniform_qlen4_padded_tp1_grid" : "uniform_qlen4_padded_tp1_continuous", s,
             NULL);
  }
}

static void test_head_major(void) {
  static const int32_t ql[] = {1, 200, 0, 3};
  static const int32_t sl[] = {5000, 2500, 0, 2100};
  fx_spec s = spec_of(tp_cfg(2), 4, ql, sl);
  s.topk_head_major = 1;
  s.qsl_base = 17;
  s.grid = 0;
  run_case("head_major_topk_ragged_padded_tp2", s, NULL);
}

static void test_forced_and_k(void) {
  static const int32_t ql[] = {40, 1, 1};
  static const int32_t sl[] = {3000, 9000, 1300};
  struct {
    int k, init, local;
  } v[] = {{16, 2, 1}, {16, 0, 3}, {8, 3, 4},  {16, 0, 0},  {1, 0, 1},
           {1, 0, 0},  {64, 0, 1}, {64, 4, 2}, {64, 60, 4}, {5, 5, 0}};
  for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
    fx_spec s = spec_of(fx_cfg(32, 2, v[i].k, v[i].init, v[i].local), 3, ql, sl);
    s.grid = (int)(i & 1);
    char name[96];
    snprintf(name, sizeof name, "forced_k%d_init%d_local%d_%s", v[i].k, v[i].init, v[i].local,
             s.grid ? "grid" : "continuous");
    run_case(name, s, NULL);
  }
}

static void test_nan_and_ties(void) {
  static const int32_t ql[] = {1, 1, 30};
  static const int32_t sl[] = {30 * 128, 40 * 128 + 5, 3000};
  case_mods nan = {nan_keys, NULL, 0};
  for (int e4 = 0; e4 < 2; e4++) {
    fx_spec s = spec_of(tp_cfg(1), 3, ql, sl);
    s.idx_dtype = e4 ? M3S_E4M3 : M3S_BF16;
    s.grid = 0;
    run_case(e4 ? "nan_keys_e4m3" : "nan_keys_bf16", s, &nan);
  }
  case_mods ties = {all_ties, NULL, 0};
  fx_spec t = spec_of(tp_cfg(2), 3, ql, sl);
  run_case("all_scores_tie", t, &ties);
  case_mods zeros = {signed_zero_ties, NULL, 0};
  run_case("zero_scores_tie_k64", spec_of(fx_cfg(8, 1, 64, 0, 1), 3, ql, sl), &zeros);
}

static void test_short_contexts_no_workspace(void) {
  /* every nb <= K: the top-k needs no workspace and scores nothing; exec is
   * NULL when the whole context reports 0 workspace bytes, else a NULL exec
   * is checked to be refused first */
  static const int32_t ql[] = {1, 1, 100, 0, 5};
  static const int32_t sl[] = {1, 16 * 128, 100, 0, 2048};
  case_mods m = {NULL, NULL, 1};
  fx_spec s = spec_of(tp_cfg(1), 5, ql, sl);
  s.qsl_base = 3;
  run_case("short_contexts_no_scoring", s, &m);
}

static void test_guards(void) {
  static const int32_t ql[] = {3, 2, 4, 1};
  static const int32_t sl[] = {3000, 2500, 2200, 2600};
  case_mods pages = {guard_pages_host, guard_pages_device, 0};
  fx_spec s = spec_of(tp_cfg(2), 4, ql, sl);
  s.grid = 0;
  run_case("guard_page_ids_out_of_range_score_nan", s, &pages);
  case_mods seqs = {NULL, guard_seqlens_device, 0};
  fx_spec s2 = spec_of(tp_cfg(2), 4, ql, sl);
  s2.qsl_base = 2;
  run_case("guard_bad_seq_lens_give_minus_one_rows", s2, &seqs);
}

static void test_one_million(void) {
  if (g_quick)
    return;
  static const int32_t ql[] = {4};
  static const int32_t sl[] = {1048576};
  fx_spec s = spec_of(fx_cfg(8, 1, 64, 0, 1), 1, ql, sl);
  s.uniform = 1;
  s.grid = 0;
  run_case("decode_1M_tp8_qlen4_k64_continuous", s, NULL);
  /* a long prefill chunk (4096 tokens, an engine's usual chunk size) at the
   * end of a 1M context (partial last block), batched with a 1M decode
   * request: 8192 blocks per row, ~2^32 index scores in all */
  static const int32_t ql2[] = {1, 4096};
  static const int32_t sl2[] = {1048576, 1048576 - 77};
  fx_spec s2 = spec_of(tp_cfg(8), 2, ql2, sl2);
  s2.grid = 1;
  run_case("prefill_chunk_4096_at_1M_plus_decode_1M_tp8", s2, NULL);
}

int main(void) {
  g_quick = gpu_env_flag("M3S_TEST_QUICK");
  g_gpu = gpu_context_or_null();
  if (!g_gpu)
    return gpu_skip("test_gpu_topk", "no CUDA device");
  if (m3s_context_create(-1, &g_cpu) != M3S_OK) {
    fprintf(stderr, "cpu context: %s\n", m3s_last_error());
    m3s_context_destroy(g_gpu);
    return 1;
  }
  double t0 = gpu_now_ms();
  test_tp_shapes_decode();
  test_spec_decode_uniform();
  test_index_dtypes();
  test_head_major();
  test_forced_and_k();
  test_nan_and_ties();
  test_short_contexts_no_workspace();
  test_guards();
  test_prefill_long_prefix();
  test_long_decode();
  test_one_million();
  printf("test_gpu_topk: %.1f s%s\n", (gpu_now_ms() - t0) * 1e-3, g_quick ? " (quick)" : "");
  m3s_context_destroy(g_cpu);
  m3s_context_destroy(g_gpu);
  return TEST_FINISH();
}
