/* The certified re-scoring top-k of the CUDA backend (src/cuda/sm90/topk_tc.cu,
 * SPEC section 3): on prefill and ragged batches the CUDA top-k scores blocks
 * on tensor cores (S~) with a bound E and re-scores, in the reference order,
 * only the blocks whose interval [S~ - E, S~ + E] may straddle the selection
 * boundary. Its top-k must EQUAL the CPU backend's, entry for entry.
 *
 * Each case builds a fixture (tests/ref.h), runs the CPU context (on random
 * data its result is also checked against the fp64 brute force, 48 sampled
 * rows), then the CUDA context three ways through the test hook of src/cuda/sm90/topk_tc.h:
 *  - default (certified): equal to the CPU, and the certified path must have
 *    run (its pair counter > 0); prints the fraction of candidate blocks
 *    re-scored;
 *  - measure: every candidate is also re-scored to check |S~ - S| <= E (no
 *    violation allowed) and the largest |S~ - S| / E is printed (the
 *    bound's safety factor, measured);
 *  - adversarial cases built to sit on the selection boundary also run with
 *    re-scoring switched off (uncertain blocks decided by S~), which must
 *    produce a mismatch: proof that the re-scoring path decides them.
 * Cases: fresh 8K prompt, a 2K chunk behind a 30K prefix, chunks of 384 and
 * 256 rows behind 20K and 40K (the register selection's 256- and
 * 512-candidate forms, required to run; the last-bit and equal-maxima traps
 * and K = 64 at up to 512 candidates too), a ragged batch
 * with padded requests (head-major top-k), short (decode-like) requests
 * before a prefill chunk, e4m3 index cache (also the prefill shapes' edges
 * again: ragged and padded rows, chunks off the tiles, local 0, K = 64, a
 * long prefix, bad page ids, subnormal codes against large queries), K = 64, TP
 * shapes Hkv 4 / 2 / 1, equal maxima, last-bit differences (one key per
 * block, a permutation of one multiset of wide-exponent values), wide
 * exponent cancellation, subnormal keys against large queries, overflowing
 * products, NaN and Inf keys and queries, page ids out of range; and the
 * certified path captured in a CUDA graph, replayed with new inputs; three
 * of these also in chunks of 100-200 rows (test hook), so the multi-chunk
 * loop that by default only calls of more than ~46K tokens take runs here.
 * Uniform decode batches (q_len 1..4, TP shapes, e4m3, K = 64, the adversarial
 * mutations above, last-bit ties over more pairs than SMs, and queries over
 * a wide exponent range or all tiny, with zero, NaN and huge rows: the e4m3
 * kernel's fp16 scaling) take the certified streaming decode kernel
 * (src/cuda/topk_decode.cu) and the same selection.
 *
 * On an sm_90 device the cases run twice, on the same inputs: first with the
 * default score kernels (prefill: the TMA + wgmma kernel, every chunk
 * required to take it, with an e4m3 index cache too), then with the mma.sync
 * kernel forced (every prefill chunk required to take it) (hook; skipped with
 * M3S_TEST_MMA_SYNC=0), each with its own measured |S~ - S| / E. Elsewhere
 * the default is the mma.sync kernel and one pass runs. In the first pass
 * each certified run is made with programmatic dependent launch forced on
 * and again forced off (src/cuda/launch.h: the default takes it for one
 * request only), and the graph case is captured with it on and must hold
 * programmatic edges on sm_90 (the prefill selection's deferred kernel);
 * the second pass keeps the default rule.
 *
 * M3S_TEST_QUICK=1 skips the large cases. */
#include "cuda/launch.h"
#include "cuda/sm90/topk_tc.h"
#include "gpu_util.h"

#include <cuda_runtime_api.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static m3s_context *g_cpu, *g_gpu;
static int g_quick;
static uint64_t g_seed = 20261202;
static m3s_topk_tc_stats *g_stats; /* device */
static float g_max_ratio[2];
static int g_mma; /* this pass: 0 the default kernels, 1 mma.sync forced (test hook) */
static unsigned long long g_tma_ctas;  /* default pass: CTAs of the decode kernel's TMA form */
static int g_sm90;                     /* the device is sm_90: the TMA score kernels apply */
static unsigned long long g_ws_e4m3;   /* default pass: e4m3 prefill chunks by the TMA kernel */
static unsigned long long g_reg_pairs; /* pairs the register selection decided (certified runs) */
/* register selection pairs ranked by tc_filter_ranks, and where it declined */
static unsigned long long g_filter_pairs, g_filter_falls;
/* certified runs: register selection pairs tc_reg_few decided, deferred, left to the slot
 * path */
static unsigned long long g_few_decided, g_few_deferred, g_few_falls;
static int g_sms; /* the device's SM count */
/* certified runs whose every pair the register selection decided and that
 * re-scored blocks: its re-scoring path ran */
static int g_reg_rescored_runs;
static int g_chunk_rows; /* this case's chunk_rows hook (0: the plan's chunks) */

static fx_spec spec_of(m3s_layer_config c, int nreq, const int32_t *ql, const int32_t *sl) {
  fx_spec s = fx_spec_default(c, nreq, ql, sl, g_seed++);
  s.kv_dtype = M3S_E4M3; /* unused by the indexer: the smallest main cache */
  s.grid = 0;
  return s;
}

enum { PATH_ANY, PATH_WIDE2, PATH_WARP, PATH_REG };

typedef struct {
  void (*host)(fixture *f);
  int (*device)(fixture *f, gpu_fx *g);
  int adversarial; /* re-scoring off must break the selection */
  int exact_too;   /* also run the exact CUDA-core path through the hook */
  int path;        /* decode batch of more pairs than SMs, fewer than 512 candidates per pair:
                      PATH_WIDE2 (<= 2 pairs per SM: the CTA-wide selection) or
                      PATH_WARP (more: a warp per pair), required when the SM count allows;
                      PATH_REG: prefill pairs of 129-512 candidates, more pairs than SMs:
                      the register selection (R 8 or 16) decided pairs and re-scored blocks */
  int chunk_rows;  /* > 0: prefill calls in chunks of at most this many rows (hook) */
} case_mods;

/* The selection path a case must take (tc_launch_select's rule): a
 * many-pair decode case's, checked where the card's SM count puts the case
 * on it (the rule counts every (row, head) pair, cs->pairs those with more
 * blocks than K: the same only for cases without padded or short rows, as
 * these); a long prefill chunk's, the register selection. */
static void check_path(const char *name, int path, const m3s_topk_tc_stats *cs) {
  const int sms = g_sms;
  const unsigned long long wide = cs->few_pairs + cs->radix_pairs;
  if (path == PATH_WIDE2 && cs->pairs > (unsigned long long)sms &&
      cs->pairs <= 2ull * (unsigned long long)sms)
    CHECK(wide > 0 && cs->rescored > 0,
          "at most two pairs per SM: the CTA-wide selection ranked pairs and re-scored blocks");
  else if (path == PATH_WARP && cs->pairs > 2ull * (unsigned long long)sms)
    CHECK(wide == 0 && cs->rescored > 0,
          "more than two pairs per SM: the per-warp selection decided them and re-scored blocks");
  else if (path == PATH_REG && cs->pairs > (unsigned long long)sms)
    CHECK(wide == 0 && cs->reg_pairs > 0 && cs->rescored > 0,
          "129-512 candidates per prefill pair: the register selection decided pairs and "
          "re-scored blocks");
  else
    printf("  %s: %llu pairs on %d SMs: the selection path is not checked\n", name, cs->pairs, sms);
}

static size_t topk_count(const fixture *f) {
  return (size_t)f->T * (size_t)f->cfg.num_kv_heads * (size_t)f->cfg.topk;
}

static long count_mismatches(const fixture *f, const int32_t *expect, const char *name,
                             int report) {
  long bad = 0;
  for (int t = 0; t < f->T; t++)
    for (int g = 0; g < f->cfg.num_kv_heads; g++)
      for (int k = 0; k < f->cfg.topk; k++) {
        size_t o = (size_t)(fx_topk_at(f, t, g, k) - (int32_t *)f->topk_mem);
        int32_t want = expect[o], got = ((const int32_t *)f->topk_mem)[o];
        if (want == got)
          continue;
        if (bad++ == 0 && report)
          fprintf(stderr,
                  "%s: first mismatch at row %d (pos %lld) head %d slot %d: cpu %d, cuda %d\n",
                  name, t, (long long)fx_pos(f, t), g, k, want, got);
      }
  if (bad && report)
    fprintf(stderr, "%s: %ld of %zu entries differ\n", name, bad, topk_count(f));
  return bad;
}

/* RUN_PLAIN: the certified path without stats, i.e. the kernels that ship
 * (with stats the register kernel is its checking form, tc_reg_few and the
 * slot path both) */
enum { RUN_CERTIFIED, RUN_MEASURE, RUN_NO_RESCORE, RUN_EXACT, RUN_PLAIN };

/* One CUDA run with the hook set for mode; returns mismatches against
 * expect (-1 when the run failed), stats in *st. */
static long run_gpu(fixture *f, gpu_fx *g, const int32_t *expect, int mode, int mma_sync,
                    const char *name, m3s_topk_tc_stats *st) {
  memset(st, 0, sizeof *st);
  m3s_topk_tc_hooks h;
  memset(&h, 0, sizeof h);
  h.exact_only = mode == RUN_EXACT;
  h.no_rescore = mode == RUN_NO_RESCORE;
  h.measure = mode == RUN_MEASURE;
  h.stats = mode == RUN_PLAIN ? NULL : g_stats;
  h.mma_sync = mma_sync;
  h.decode_any = 1; /* the decode fixtures are smaller than the default's threshold */
  h.chunk_rows = g_chunk_rows;
  if (!gpu_put(g_stats, st, sizeof *st) || !gpu_fx_poison(g, f))
    return -1;
  m3s_topk_tc_set_hooks(g_gpu, &h);
  m3s_status s =
      m3s_index_topk(g_gpu, &f->cfg, &g->batch, &g->iq_t, &g->ic_t, &g->topk_t, &g->exec);
  m3s_topk_tc_set_hooks(g_gpu, NULL);
  int synced = gpu_sync();
  if (s != M3S_OK)
    fprintf(stderr, "%s: cuda m3s_index_topk: %s\n", name, m3s_last_error());
  if (s != M3S_OK || !synced || !gpu_fx_download(g, f) || !gpu_get(st, g_stats, sizeof *st))
    return -1;
  return count_mismatches(f, expect, name, mode != RUN_NO_RESCORE);
}

static float ratio_of(const m3s_topk_tc_stats *st) {
  float r;
  memcpy(&r, &st->max_ratio_bits, sizeof r);
  return r;
}

static void run_case(const char *name, fx_spec s, const case_mods *mods) {
  if (!test_selected(name))
    return;
  fixture f;
  gpu_fx g;
  g_chunk_rows = mods ? mods->chunk_rows : 0;
  double t0 = gpu_now_ms();
  fx_init(&f, &s);
  if (mods && mods->host)
    mods->host(&f);
  fx_poison(&f);
  m3s_status st = m3s_index_topk(g_cpu, &f.cfg, &f.batch, &f.iq, &f.ic, &f.topk, NULL);
  if (!CHECK(st == M3S_OK, name)) {
    fprintf(stderr, "%s: cpu m3s_index_topk: %s\n", name, m3s_last_error());
    fx_free(&f);
    return;
  }
  /* the expectation itself against the fp64 brute force (48 sampled rows)
   * where the data is random; the built cases (ties, last bits, cancellation,
   * overflow, special pages) have no fp64 answer to within rounding: there
   * the GPU is checked against the CPU backend only */
  if (!mods || !mods->host)
    check_topk_vs_fp64_rows(&f, name, 48);
  double t1 = gpu_now_ms();
  size_t n = topk_count(&f);
  int32_t *expect = malloc(sizeof(int32_t) * (n + 1));
  memcpy(expect, f.topk_mem, sizeof(int32_t) * n);
  int ok = gpu_fx_upload(&g, &f, g_gpu);
  if (ok && mods && mods->device)
    ok = mods->device(&f, &g);
  if (!CHECK(ok, name)) {
    fprintf(stderr, "%s: device setup failed\n", name);
  } else {
    const int mma = g_mma;
    m3s_topk_tc_stats cs, ms, ns;
    /* the default pass's certified run with PDL forced on (every kernel
     * chain the context may launch under PDL, whatever the request count)
     * and again forced off (src/cuda/launch.h; both on sm_90 only) */
    m3s_cuda_set_pdl(g_gpu, mma ? -1 : 1);
    double t2 = gpu_now_ms();
    long bad = run_gpu(&f, &g, expect, RUN_CERTIFIED, mma, name, &cs);
    double t3 = gpu_now_ms();
    CHECK(bad == 0, name);
    if (!mma) {
      m3s_topk_tc_stats os;
      m3s_cuda_set_pdl(g_gpu, 0);
      CHECK(run_gpu(&f, &g, expect, RUN_CERTIFIED, 0, name, &os) == 0,
            "PDL off: equal to the CPU backend");
      CHECK(os.reg_few_wrong == 0, "PDL off: tc_reg_few decided or deferred each pair as the "
                                   "slot path does");
    }
    m3s_cuda_set_pdl(g_gpu, -1);
    CHECK(cs.pairs > 0, "the certified path ran");
    if (mods && mods->chunk_rows > 0)
      CHECK(cs.chunks == (unsigned)((f.T + mods->chunk_rows - 1) / mods->chunk_rows),
            "the chunk_rows hook: one score kernel per chunk of that many rows");
    g_tma_ctas += mma ? 0 : cs.tma_ctas;
    /* prefill on sm_90: every chunk by the TMA + wgmma score kernel (bf16
     * and e4m3 index caches), none under the mma_sync hook */
    if (g_sm90 && !f.sp.uniform)
      CHECK(cs.ws_chunks == (mma ? 0 : cs.chunks),
            mma ? "the mma_sync hook kept the prefill score kernel on mma.sync"
                : "sm_90: every prefill chunk scored by tc_score_ws_kernel");
    if (!mma && f.sp.idx_dtype == M3S_E4M3 && !f.sp.uniform)
      g_ws_e4m3 += cs.ws_chunks;
    if (mma)
      CHECK(cs.tma_ctas == 0, "the mma_sync hook kept the decode score kernel's cp.async form");
    if (mods && mods->path != PATH_ANY)
      check_path(name, mods->path, &cs);
    g_reg_pairs += cs.reg_pairs;
    g_filter_pairs += cs.filter_pairs;
    g_filter_falls += cs.filter_falls;
    /* the register selection by tc_reg_few, checked under stats against
     * the slot path on every pair it took */
    CHECK(cs.reg_few_wrong == 0,
          "reg_few: tc_reg_few decided or deferred each pair as the slot path does");
    g_few_decided += cs.reg_few_decided;
    g_few_deferred += cs.reg_few_deferred;
    g_few_falls += cs.reg_few_falls;
    if (!mma && cs.reg_pairs > 0) {
      m3s_topk_tc_stats ps;
      CHECK(run_gpu(&f, &g, expect, RUN_PLAIN, 0, name, &ps) == 0,
            "the register kernels without stats (their shipped form): equal to the CPU backend");
    }
    g_reg_rescored_runs += cs.reg_pairs == cs.pairs && cs.rescored > 0;
    long mbad = run_gpu(&f, &g, expect, RUN_MEASURE, mma, name, &ms);
    CHECK(mbad == 0, name);
    CHECK(ms.violations == 0, "measure: |S~ - S| <= E for every candidate");
    if (ms.violations)
      fprintf(stderr, "%s: %llu bound violations\n", name, ms.violations);
    float ratio = ratio_of(&ms);
    g_max_ratio[mma] = ratio > g_max_ratio[mma] ? ratio : g_max_ratio[mma];
    long nbad = 0;
    if (mods && mods->adversarial) {
      nbad = run_gpu(&f, &g, expect, RUN_NO_RESCORE, mma, name, &ns);
      CHECK(nbad > 0, "re-scoring off must change the selection of an adversarial case");
    }
    if (mods && mods->exact_too && !mma) {
      m3s_topk_tc_stats es;
      CHECK(run_gpu(&f, &g, expect, RUN_EXACT, 0, name, &es) == 0, name);
      CHECK(es.pairs == 0, "exact_only: the certified path did not run");
    }
    printf("  %-38s %-5s T %5d  pairs %7llu (reg %7u)  re-scored %9llu / %9llu (%.4f)  "
           "max|S~-S|/E %.3g%s  cpu %6.0f ms  cuda %6.2f ms%s\n",
           name, mma ? "mma" : "dflt", f.T, cs.pairs, cs.reg_pairs, cs.rescored, cs.candidates,
           cs.candidates ? (double)cs.rescored / (double)cs.candidates : 0.0, ratio,
           mods && mods->adversarial ? (nbad > 0 ? "  no-rescore breaks" : "  NO-RESCORE EQUAL")
                                     : "",
           t1 - t0, t3 - t2, bad ? "  MISMATCH" : "");
    fflush(stdout);
    CHECK(gpu_guards_check(), name);
  }
  gpu_fx_free(&g);
  free(expect);
  fx_free(&f);
}

/* ---- host mutations ------------------------------------------------------ */

static int32_t ibt_at(const fixture *f, int r, int64_t b) {
  return f->ibt[r * f->batch.index_block_table.stride[0] + b];
}

static int64_t key_off(const fixture *f, int32_t page, int slot) {
  (void)f;
  return ((int64_t)page * 128 + slot) * 128;
}

static int64_t q_off(const fixture *f, int t, int g) {
  return ((int64_t)t * f->cfg.num_kv_heads + g) * 128;
}

static float pow2(int e) { return ldexpf(1.0f, e); }

/* +-2^e (1 + m / 128): a bf16 value with a random exponent in [e0, e1]. */
static float wide_value(uint64_t *rng, int e0, int e1) {
  int e = e0 + (int)(rng_next(rng) % (uint64_t)(e1 - e0 + 1));
  float m = 1.0f + (float)(rng_next(rng) % 128) / 128.0f;
  return (rng_next(rng) & 1) ? -ldexpf(m, e) : ldexpf(m, e);
}

static void fill_all_keys(fixture *f, float v) {
  for (int64_t i = 0; i < f->num_pages * 128 * 128; i++)
    store_elem(f->ic_mem, f->sp.idx_dtype, i, v);
}

/* Every index key identical: every block maximum equal. */
static void equal_maxima(fixture *f) {
  for (int64_t i = 0; i < f->num_pages * 128 * 128; i++)
    store_elem(f->ic_mem, f->sp.idx_dtype, i, (i % 128) < 64 ? 0.5f : -0.25f);
}

/* Queries all 1; every key 0 except one key per block, a permutation of one
 * multiset (per request) of wide-exponent values with a positive sum: the
 * exact block scores of a request are all equal, the fp32 ones differ in the
 * last bits, in an order that depends on the summation order. */
static void last_bit(fixture *f) {
  uint64_t rng = f->sp.seed * 7 + 3;
  for (int t = 0; t < f->T; t++)
    for (int g = 0; g < f->cfg.num_kv_heads; g++)
      for (int d = 0; d < 128; d++)
        store_elem(f->iq_mem, f->sp.act_dtype, q_off(f, t, g) + d, 1.0f);
  fill_all_keys(f, 0.0f);
  for (int r = 0; r < f->sp.num_reqs; r++) {
    float set[128];
    for (int d = 0; d < 127; d++)
      set[d] = wide_value(&rng, -8, 16);
    set[127] = pow2(20);
    int64_t nb = (f->seqlens[r] + 127) / 128;
    for (int64_t b = 0; b < nb; b++) {
      float k[128];
      memcpy(k, set, sizeof k);
      for (int d = 127; d > 0; d--) {
        int j = (int)(rng_next(&rng) % (uint64_t)(d + 1));
        float tmp = k[d];
        k[d] = k[j];
        k[j] = tmp;
      }
      int slot = (int)((b * 37 + 11) % 128);
      if (b * 128 + slot >= f->seqlens[r])
        slot = 0;
      for (int d = 0; d < 128; d++)
        store_elem(f->ic_mem, f->sp.idx_dtype, key_off(f, ibt_at(f, r, b), slot) + d, k[d]);
    }
  }
}

/* Keys and queries +-2^[-40, 40]: products over 160 binades, sums dominated
 * by cancellation. */
static void cancel_wide(fixture *f) {
  uint64_t rng = f->sp.seed * 5 + 1;
  for (int64_t i = 0; i < f->num_pages * 128 * 128; i++)
    store_elem(f->ic_mem, f->sp.idx_dtype, i, wide_value(&rng, -40, 40));
  for (int64_t i = 0; i < (int64_t)f->T * f->cfg.num_kv_heads * 128; i++)
    store_elem(f->iq_mem, f->sp.act_dtype, i, wide_value(&rng, -40, 40));
}

/* Keys of magnitude 2^[c0, c1] with every 17th 2^[r0, r1], queries ~2^100
 * (the subnormal-key cases below). */
static void tiny_keys_huge_queries(fixture *f, uint64_t rng, int c0, int c1, int r0, int r1) {
  for (int64_t i = 0; i < f->num_pages * 128 * 128; i++)
    store_elem(f->ic_mem, f->sp.idx_dtype, i,
               (i % 17) == 0 ? wide_value(&rng, r0, r1) : wide_value(&rng, c0, c1));
  for (int64_t i = 0; i < (int64_t)f->T * f->cfg.num_kv_heads * 128; i++)
    store_elem(f->iq_mem, f->sp.act_dtype, i, wide_value(&rng, 95, 100));
}

/* Keys mostly subnormal bf16 (2^-133 .. 2^-127) with a few tiny normal
 * ones, queries ~2^100: products near 2^-30, where a tensor core that
 * flushes subnormal inputs would err. */
static void subnormal_keys(fixture *f) {
  tiny_keys_huge_queries(f, f->sp.seed * 11 + 5, -133, -127, -126, -120);
}

/* e4m3 keys mostly subnormal codes (2^-9 .. 2^-7) with every 17th normal
 * (2^-6 .. 2^-3), queries ~2^100: a widening that lost subnormal codes (a
 * flushing bf16 multiply, as the e4m3 prefill kernel's first widening had)
 * would err far beyond E; on fp16 operands the queries are scaled by ~2^-86. */
static void e4m3_subnormal_keys(fixture *f) {
  tiny_keys_huge_queries(f, f->sp.seed * 17 + 3, -9, -7, -6, -3);
}

/* Some keys ~2^100 against queries ~2^40: products overflow fp32 (dots of
 * +-inf or NaN); the other keys random normal. */
static void overflow_keys(fixture *f) {
  uint64_t rng = f->sp.seed * 13 + 7;
  for (int64_t i = 0; i < f->num_pages * 128 * 128; i++)
    if ((i / 128) % 29 == 3)
      store_elem(f->ic_mem, f->sp.idx_dtype, i, wide_value(&rng, 95, 100));
  for (int64_t i = 0; i < (int64_t)f->T * f->cfg.num_kv_heads * 128; i++)
    store_elem(f->iq_mem, f->sp.act_dtype, i, wide_value(&rng, 35, 40));
}

/* One NaN (or +-Inf) index element. */
static void store_special(fixture *f, int64_t i, int kind) {
  if (f->sp.idx_dtype == M3S_BF16) {
    static const uint16_t v[4] = {0x7FC0, 0xFFC0, 0x7F80, 0xFF80};
    ((uint16_t *)f->ic_mem)[i] = v[kind];
  } else {
    ((uint8_t *)f->ic_mem)[i] = kind & 1 ? 0xFF : 0x7F; /* e4m3 has no Inf */
  }
}

static void poison_page(fixture *f, int32_t page, int kind) {
  for (int64_t i = 0; i < 128 * 128; i++)
    store_special(f, (int64_t)page * 128 * 128 + i, kind);
}

/* Request 0: blocks 0..9 all NaN, a NaN key in block 12, a NaN element in
 * block 14, +Inf / -Inf elements in blocks 16 and 18; request 1: every block
 * NaN; request 2: a query row with an Inf element. */
static void nan_inf(fixture *f) {
  for (int b = 0; b < 10; b++)
    poison_page(f, ibt_at(f, 0, b), b & 1);
  for (int d = 0; d < 128; d++)
    store_special(f, key_off(f, ibt_at(f, 0, 12), 5) + d, 0);
  store_special(f, key_off(f, ibt_at(f, 0, 14), 77) + 3, 1);
  store_special(f, key_off(f, ibt_at(f, 0, 16), 9) + 100, 2);
  store_special(f, key_off(f, ibt_at(f, 0, 18), 40) + 1, 3);
  int64_t nb1 = (f->seqlens[1] + 127) / 128;
  for (int64_t b = 0; b < nb1; b++)
    poison_page(f, ibt_at(f, 1, b), 0);
  int t2 = f->qsl[2] - f->qsl[0] + 3;
  ((uint16_t *)f->iq_mem)[q_off(f, t2, 0) + 17] = 0x7F80;
}

/* Queries +-2^[-110, 13] (1e-33 .. 1.6e4): the e4m3 decode path scales each
 * row by 2^s from its largest element and rounds it to fp16, where the small
 * elements become subnormals or 0; row 1 head 0 all zero, row 2 head 0 with
 * a NaN element, row 3 head 0 with the largest finite bf16 (overflowing
 * dots). */
static void wide_queries(fixture *f) {
  uint64_t rng = f->sp.seed * 17 + 9;
  for (int64_t i = 0; i < (int64_t)f->T * f->cfg.num_kv_heads * 128; i++)
    store_elem(f->iq_mem, f->sp.act_dtype, i, wide_value(&rng, -110, 13));
  for (int d = 0; d < 128; d++)
    store_elem(f->iq_mem, f->sp.act_dtype, q_off(f, 1, 0) + d, 0.0f);
  ((uint16_t *)f->iq_mem)[q_off(f, 2, 0) + 9] = 0x7FC0;
  ((uint16_t *)f->iq_mem)[q_off(f, 3, 0) + 50] = 0x7F7F;
}

/* Every query element tiny, which the e4m3 decode path scales up (by at most
 * 2^126): rows alternately +-2^[-105, -95] (about 1e-30) and bf16
 * subnormals +-2^[-133, -127]. */
static void tiny_queries(fixture *f) {
  uint64_t rng = f->sp.seed * 19 + 11;
  for (int t = 0; t < f->T; t++)
    for (int g = 0; g < f->cfg.num_kv_heads; g++)
      for (int d = 0; d < 128; d++)
        store_elem(f->iq_mem, f->sp.act_dtype, q_off(f, t, g) + d,
                   t & 1 ? wide_value(&rng, -133, -127) : wide_value(&rng, -105, -95));
}

/* The prefill shape of the two query traps above (every block of the tiny
 * rows is re-scored: 500 rows keep it short). */
static const int32_t g_edge_ql[] = {300, 200};
static const int32_t g_edge_sl[] = {5000, 4000};

/* Request 0's index-table entries of blocks 5 and 7 point outside the cache
 * on the device; the CPU sees NaN keys there instead (the same scores). */
static void guard_pages_host(fixture *f) {
  poison_page(f, ibt_at(f, 0, 5), 0);
  poison_page(f, ibt_at(f, 0, 7), 0);
}

static int guard_pages_device(fixture *f, gpu_fx *g) {
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

/* ---- cases ------------------------------------------------------------- */

static void test_prefill_shapes(void) {
  if (!g_quick) {
    static const int32_t ql[] = {8192};
    static const int32_t sl[] = {8192};
    run_case("fresh_8k_prompt_tp1", spec_of(m3s_config_minimax_m3(1), 1, ql, sl), NULL);
    static const int32_t ql2[] = {2048};
    static const int32_t sl2[] = {30720 + 2048};
    run_case("chunk_2k_behind_30k_tp1", spec_of(m3s_config_minimax_m3(1), 1, ql2, sl2), NULL);
    run_case("chunk_2k_behind_30k_tp4", spec_of(m3s_config_minimax_m3(4), 1, ql2, sl2), NULL);
  }
  static const int32_t ql[] = {1, 300, 0, 700, 5, 0};
  static const int32_t sl[] = {5000, 4000, 0, 9000, 129, 0};
  fx_spec s = spec_of(m3s_config_minimax_m3(2), 6, ql, sl);
  s.qsl_base = 7;
  s.topk_head_major = 1;
  case_mods both = {NULL, NULL, 0, 1, PATH_ANY, 0};
  run_case("ragged_padded_head_major_tp2", s, &both);
  /* chunks behind long prefixes: 129-256 and 257-512 candidates per pair,
   * the register selection's two large forms (R 8 and 16) */
  case_mods reg = {NULL, NULL, 0, 0, PATH_REG, 0};
  static const int32_t q20[] = {384};
  static const int32_t s20[] = {20480 + 384};
  run_case("chunk_384_behind_20k_tp2", spec_of(m3s_config_minimax_m3(2), 1, q20, s20), &reg);
  static const int32_t q40[] = {256};
  static const int32_t s40[] = {40960 + 256};
  run_case("chunk_256_behind_40k_tp1", spec_of(m3s_config_minimax_m3(1), 1, q40, s40), &reg);
  /* calls in several chunks (the budget splits only calls of ~46K tokens; the
   * hook splits these): one request over three chunks of 128 rows; a ragged
   * batch in chunks of 100 rows, which split requests, padded and short
   * ones included, off the 128-row tiles */
  case_mods reg3 = {NULL, NULL, 0, 0, PATH_REG, 128};
  run_case("chunk_384_behind_20k_tp2_in_3_chunks", spec_of(m3s_config_minimax_m3(2), 1, q20, s20),
           &reg3);
  case_mods by100 = {NULL, NULL, 0, 0, PATH_ANY, 100};
  run_case("ragged_padded_head_major_tp2_chunks_of_100", s, &by100);
  /* decode-like requests (< 8 rows: scored exactly in the selection kernel)
   * before a prefill chunk */
  static const int32_t qm[] = {1, 1, 2, 7, 1, 3, 600};
  static const int32_t sm[] = {9000, 4000, 3000, 20000, 129, 5000, 12000};
  fx_spec m = spec_of(m3s_config_minimax_m3(1), 7, qm, sm);
  m.qsl_base = 3;
  run_case("short_requests_then_prefill_tp1", m, NULL);
  static const int32_t ql3[] = {1000, 1};
  static const int32_t sl3[] = {6000, 3000};
  fx_spec e = spec_of(m3s_config_minimax_m3(1), 2, ql3, sl3);
  e.idx_dtype = M3S_E4M3;
  run_case("e4m3_index_tp1", e, NULL);
  fx_spec eg = spec_of(m3s_config_minimax_m3(8), 2, ql3, sl3);
  eg.idx_dtype = M3S_E4M3;
  eg.grid = 1; /* many exact ties */
  run_case("e4m3_index_grid_ties_tp8", eg, NULL);
}

/* An e4m3 index cache in prefill (sm_90: tc_score_ws_kernel widening the
 * codes in shared memory): the prefill shapes' edges again, ragged and
 * padded rows, several runs per tile, chunks off the tiles, a partly
 * visible diagonal block (local 0), K = 64, a long prefix, bad page ids,
 * subnormal codes, queries at the exponent range's edges. Names start with
 * e4pre_ and share no filter substring with the other cases
 * (tools/gpu-check.sh's racecheck groups). */
static void test_e4m3_prefill(void) {
  if (!g_quick) {
    static const int32_t ql[] = {8192};
    static const int32_t sl[] = {8192};
    fx_spec f8 = spec_of(m3s_config_minimax_m3(1), 1, ql, sl);
    f8.idx_dtype = M3S_E4M3;
    run_case("e4pre_fresh_8k_prompt_tp1", f8, NULL);
  }
  static const int32_t ql[] = {1, 300, 0, 700, 5, 0};
  static const int32_t sl[] = {5000, 4000, 0, 9000, 129, 0};
  fx_spec s = spec_of(m3s_config_minimax_m3(2), 6, ql, sl);
  s.qsl_base = 7;
  s.topk_head_major = 1;
  s.idx_dtype = M3S_E4M3;
  case_mods both = {NULL, NULL, 0, 1, PATH_ANY, 0};
  run_case("e4pre_ragged_head_major_tp2", s, &both);
  case_mods by100 = {NULL, NULL, 0, 0, PATH_ANY, 100};
  run_case("e4pre_ragged_tp2_chunks_of_100", s, &by100);
  case_mods reg = {NULL, NULL, 0, 0, PATH_REG, 0};
  static const int32_t q20[] = {384};
  static const int32_t s20[] = {20480 + 384};
  fx_spec c = spec_of(m3s_config_minimax_m3(4), 1, q20, s20);
  c.idx_dtype = M3S_E4M3;
  run_case("e4pre_chunk_384_behind_20k_tp4", c, &reg);
  static const int32_t ql2[] = {700, 300};
  static const int32_t sl2[] = {12000, 9000};
  fx_spec l0 = spec_of(fx_cfg(64, 4, 16, 2, 0), 2, ql2, sl2);
  l0.idx_dtype = M3S_E4M3;
  run_case("e4pre_local0_init2_hkv4", l0, NULL);
  fx_spec k64 = spec_of(fx_cfg(32, 2, 64, 4, 2), 2, ql2, sl2);
  k64.idx_dtype = M3S_E4M3;
  run_case("e4pre_top64_init4_local2_hkv2", k64, NULL);
  static const int32_t qg[] = {30, 20, 40, 10};
  static const int32_t sg[] = {3000, 2500, 2200, 2600};
  fx_spec gs = spec_of(m3s_config_minimax_m3(2), 4, qg, sg);
  gs.idx_dtype = M3S_E4M3;
  case_mods gp = {guard_pages_host, guard_pages_device, 0, 0, PATH_ANY, 0};
  run_case("e4pre_bad_page_ids", gs, &gp);
  static const int32_t qa[] = {512, 512, 512, 512};
  static const int32_t sa[] = {8192, 8192, 6000, 7000};
  fx_spec sn = spec_of(m3s_config_minimax_m3(4), 4, qa, sa);
  sn.idx_dtype = M3S_E4M3;
  case_mods snm = {e4m3_subnormal_keys, NULL, 0, 0, PATH_ANY, 0};
  run_case("e4pre_subnormal_codes_large_queries_tp4", sn, &snm);
  /* queries at the exponent range's edges (wide_queries, tiny_queries) */
  fx_spec w = spec_of(m3s_config_minimax_m3(2), 2, g_edge_ql, g_edge_sl);
  w.idx_dtype = M3S_E4M3;
  case_mods wq = {wide_queries, NULL, 0, 0, PATH_ANY, 0};
  run_case("e4pre_wide_exponent_queries_tp2", w, &wq);
  fx_spec t = spec_of(m3s_config_minimax_m3(1), 2, g_edge_ql, g_edge_sl);
  t.idx_dtype = M3S_E4M3;
  case_mods tq = {tiny_queries, NULL, 0, 0, PATH_ANY, 0};
  run_case("e4pre_tiny_queries_tp1", t, &tq);
}

static void test_k_variants(void) {
  static const int32_t ql[] = {1500};
  static const int32_t sl[] = {20000};
  run_case("k64_tp8", spec_of(fx_cfg(8, 1, 64, 0, 1), 1, ql, sl), NULL);
  static const int32_t ql2[] = {700, 300};
  static const int32_t sl2[] = {12000, 9000};
  run_case("k64_init4_local2_hkv2", spec_of(fx_cfg(32, 2, 64, 4, 2), 2, ql2, sl2), NULL);
  run_case("k16_init2_local0_hkv4", spec_of(fx_cfg(64, 4, 16, 2, 0), 2, ql2, sl2), NULL);
}

static void test_adversarial(void) {
  static const int32_t ql[] = {512, 512, 512, 512};
  static const int32_t sl[] = {8192, 8192, 6000, 7000};
  case_mods lb = {last_bit, NULL, 1, 0, PATH_ANY, 0};
  run_case("last_bit_permuted_multiset_hkv1", spec_of(m3s_config_minimax_m3(4), 4, ql, sl), &lb);
  static const int32_t ql64[] = {256, 256, 256};
  static const int32_t sl64[] = {16384, 12000, 10000}; /* nb > 64 */
  run_case("last_bit_permuted_multiset_k64", spec_of(fx_cfg(8, 1, 64, 0, 1), 3, ql64, sl64), &lb);
  case_mods eq = {equal_maxima, NULL, 0, 0, PATH_ANY, 0};
  run_case("equal_maxima_tp1", spec_of(m3s_config_minimax_m3(1), 4, ql, sl), &eq);
  case_mods cw = {cancel_wide, NULL, 0, 0, PATH_ANY, 0};
  run_case("cancel_wide_exponents_tp2", spec_of(m3s_config_minimax_m3(2), 4, ql, sl), &cw);
  case_mods sn = {subnormal_keys, NULL, 0, 0, PATH_ANY, 0};
  run_case("subnormal_keys_large_queries_tp4", spec_of(m3s_config_minimax_m3(4), 4, ql, sl), &sn);
  case_mods ov = {overflow_keys, NULL, 0, 0, PATH_ANY, 0};
  run_case("overflowing_products_tp4", spec_of(m3s_config_minimax_m3(4), 4, ql, sl), &ov);
  /* queries at the exponent range's edges */
  case_mods wq = {wide_queries, NULL, 0, 0, PATH_ANY, 0};
  run_case("queries_wide_exponents_tp2", spec_of(m3s_config_minimax_m3(2), 2, g_edge_ql, g_edge_sl),
           &wq);
  case_mods tq = {tiny_queries, NULL, 0, 0, PATH_ANY, 0};
  run_case("queries_tiny_tp1", spec_of(m3s_config_minimax_m3(1), 2, g_edge_ql, g_edge_sl), &tq);
  /* the same traps at up to 512 candidates per pair (the register
   * selection's R 16 form, its R / 4 and R / 2 slot forms on the shorter requests),
   * K = 64 there too */
  static const int32_t q16[] = {256, 256, 128, 256};
  static const int32_t s16[] = {40000, 8192, 6000, 20000};
  run_case("last_bit_permuted_multiset_hkv1_r16", spec_of(m3s_config_minimax_m3(4), 4, q16, s16),
           &lb);
  /* the same in chunks of 200 rows: each chunk's deferred list and re-scores */
  case_mods lb200 = {last_bit, NULL, 1, 0, PATH_ANY, 200};
  run_case("last_bit_permuted_multiset_hkv1_r16_chunks_of_200",
           spec_of(m3s_config_minimax_m3(4), 4, q16, s16), &lb200);
  static const int32_t q16b[] = {128, 128, 128, 128};
  run_case("equal_maxima_tp1_r16", spec_of(m3s_config_minimax_m3(1), 4, q16b, s16), &eq);
  static const int32_t s64b[] = {33000, 12000, 4000};
  run_case("last_bit_permuted_multiset_k64_r16", spec_of(fx_cfg(8, 1, 64, 0, 1), 3, ql64, s64b),
           &lb);
  static const int32_t qn[] = {40, 30, 60};
  static const int32_t sn_[] = {30 * 128, 40 * 128 + 5, 5000};
  case_mods ni = {nan_inf, NULL, 0, 0, PATH_ANY, 0};
  for (int e4 = 0; e4 < 2; e4++) {
    fx_spec s = spec_of(m3s_config_minimax_m3(1), 3, qn, sn_);
    s.idx_dtype = e4 ? M3S_E4M3 : M3S_BF16;
    run_case(e4 ? "nan_keys_e4m3" : "nan_inf_keys_and_query_bf16", s, &ni);
  }
  static const int32_t qg[] = {30, 20, 40, 10};
  static const int32_t sg[] = {3000, 2500, 2200, 2600};
  case_mods gp = {guard_pages_host, guard_pages_device, 0, 0, PATH_ANY, 0};
  run_case("guard_page_ids_out_of_range", spec_of(m3s_config_minimax_m3(2), 4, qg, sg), &gp);
}

/* Uniform decode batches: the certified streaming kernel of
 * src/cuda/topk_decode.cu writes (S~, E), the same selection decides. */
static fx_spec decode_spec(m3s_layer_config c, int nreq, int q, const int32_t *sl) {
  static int32_t ql[64];
  for (int r = 0; r < nreq; r++)
    ql[r] = q;
  fx_spec s = spec_of(c, nreq, ql, sl);
  s.uniform = 1;
  return s;
}

static void test_decode(void) {
  static const int32_t sl[] = {3000, 40000, 2100, 17000, 9000, 128 * 40, 2049, 33333};
  case_mods both = {NULL, NULL, 0, 1, PATH_ANY, 0};
  run_case("decode_q1_tp1_ragged", decode_spec(m3s_config_minimax_m3(1), 8, 1, sl), &both);
  fx_spec e = decode_spec(m3s_config_minimax_m3(1), 6, 4, sl);
  e.idx_dtype = M3S_E4M3;
  run_case("decode_q4_tp1_e4m3", e, &both);
  /* 12 pairs: the kernel's second n8 tile of pairs, partly filled */
  for (int e4 = 0; e4 < 2; e4++) {
    fx_spec t = decode_spec(m3s_config_minimax_m3(1), 5, 3, sl + 3);
    t.idx_dtype = e4 ? M3S_E4M3 : M3S_BF16;
    run_case(e4 ? "decode_q3_tp1_e4m3" : "decode_q3_tp1", t, NULL);
  }
  run_case("decode_q2_tp8_k64", decode_spec(fx_cfg(8, 1, 64, 0, 1), 5, 2, sl + 1), NULL);
  /* padded requests (seq_len 0) between scored ones: no candidate blocks,
   * rows of -1 */
  static const int32_t sp[] = {0, 9000, 0, 0, 20000, 2500, 0};
  run_case("decode_q2_tp2_padded", decode_spec(m3s_config_minimax_m3(2), 7, 2, sp), NULL);
  run_case("decode_q3_tp4_init2_local0", decode_spec(fx_cfg(16, 1, 16, 2, 0), 4, 3, sl + 2), NULL);
  static const int32_t sa[] = {8192, 8192, 6000, 7000};
  case_mods lb = {last_bit, NULL, 1, 0, PATH_ANY, 0};
  run_case("decode_last_bit_permuted_multiset_hkv1",
           decode_spec(m3s_config_minimax_m3(4), 4, 2, sa), &lb);
  /* more pairs than SMs, mostly 17-31 candidates per pair (so at most 32
   * uncertain), every seventh request 39-46 (more than 32 uncertain). q_len 3:
   * 189 pairs, at most two per SM on 95-188 SMs, so the CTA-wide selection;
   * q_len 5: 315 pairs, more than two per SM up to 157 SMs, so
   * tc_select_kernel's warp per pair: its CTA's warps share the re-scores
   * (the last CTA partly filled), a warp of more than 32 re-scores alone */
  static int32_t sm_[63];
  for (int r = 0; r < 63; r++)
    sm_[r] = r % 7 == 3 ? 5000 + (r * 131) % 900 : 2200 + (r * 419) % 1900;
  case_mods lbw2 = {last_bit, NULL, 1, 0, PATH_WIDE2, 0};
  run_case("decode_last_bit_more_pairs_than_sms_hkv1_q3",
           decode_spec(m3s_config_minimax_m3(4), 63, 3, sm_), &lbw2);
  case_mods lbw = {last_bit, NULL, 1, 0, PATH_WARP, 0};
  run_case("decode_last_bit_more_pairs_than_sms_hkv1_q5",
           decode_spec(m3s_config_minimax_m3(4), 63, 5, sm_), &lbw);
  case_mods eq = {equal_maxima, NULL, 0, 0, PATH_ANY, 0};
  run_case("decode_equal_maxima_tp1", decode_spec(m3s_config_minimax_m3(1), 4, 1, sa), &eq);
  case_mods cw = {cancel_wide, NULL, 0, 0, PATH_ANY, 0};
  run_case("decode_cancel_wide_exponents_tp2", decode_spec(m3s_config_minimax_m3(2), 4, 4, sa),
           &cw);
  case_mods sn = {subnormal_keys, NULL, 0, 0, PATH_ANY, 0};
  run_case("decode_subnormal_keys_tp4", decode_spec(m3s_config_minimax_m3(4), 4, 1, sa), &sn);
  case_mods ov = {overflow_keys, NULL, 0, 0, PATH_ANY, 0};
  run_case("decode_overflowing_products_tp4", decode_spec(m3s_config_minimax_m3(4), 4, 2, sa), &ov);
  static const int32_t sn_[] = {30 * 128, 40 * 128 + 5, 5000};
  case_mods ni = {nan_inf, NULL, 0, 0, PATH_ANY, 0};
  for (int e4 = 0; e4 < 2; e4++) {
    fx_spec n = decode_spec(m3s_config_minimax_m3(1), 3, 4, sn_);
    n.idx_dtype = e4 ? M3S_E4M3 : M3S_BF16;
    run_case(e4 ? "decode_nan_keys_e4m3_q4" : "decode_nan_inf_keys_and_query_bf16_q4", n, &ni);
  }
  case_mods wq = {wide_queries, NULL, 0, 0, PATH_ANY, 0},
            tq = {tiny_queries, NULL, 0, 0, PATH_ANY, 0};
  for (int e4 = 0; e4 < 2; e4++) {
    fx_spec w = decode_spec(m3s_config_minimax_m3(2), 4, 2, sa);
    w.idx_dtype = e4 ? M3S_E4M3 : M3S_BF16;
    run_case(e4 ? "decode_wide_exponent_queries_e4m3_q2" : "decode_wide_exponent_queries_bf16_q2",
             w, &wq);
    fx_spec t = decode_spec(m3s_config_minimax_m3(1), 4, 2, sa);
    t.idx_dtype = e4 ? M3S_E4M3 : M3S_BF16;
    run_case(e4 ? "decode_tiny_queries_e4m3_q2" : "decode_tiny_queries_bf16_q2", t, &tq);
  }
  static const int32_t sg[] = {3000, 2500, 2200, 2600};
  case_mods gp = {guard_pages_host, guard_pages_device, 0, 0, PATH_ANY, 0};
  run_case("decode_guard_page_ids_out_of_range", decode_spec(m3s_config_minimax_m3(2), 4, 2, sg),
           &gp);
}

/* The certified path captured once in a CUDA graph on a non-default stream,
 * replayed with new queries and keys: equal to the CPU each time. */
static void test_graph(void) {
  const char *name = "graph_capture_ragged_prefill_tp2";
  if (!test_selected(name))
    return;
  static const int32_t ql[] = {1, 600, 0, 300};
  static const int32_t sl[] = {5000, 9000, 0, 3000};
  fixture f;
  gpu_fx g;
  fx_spec s = spec_of(m3s_config_minimax_m3(2), 4, ql, sl);
  fx_init(&f, &s);
  if (!CHECK(gpu_fx_upload(&g, &f, g_gpu), name)) {
    fx_free(&f);
    return;
  }
  size_t n = topk_count(&f);
  int32_t *expect = malloc(sizeof(int32_t) * (n + 1));
  cudaStream_t stream = NULL;
  cudaGraph_t graph = NULL;
  cudaGraphExec_t gexec = NULL;
  m3s_topk_tc_hooks h;
  memset(&h, 0, sizeof h);
  h.stats = g_stats;
  h.mma_sync = g_mma;
  h.decode_any = 1;
  m3s_topk_tc_set_hooks(g_gpu, &h);
  m3s_cuda_set_pdl(g_gpu, g_mma ? -1 : 1);
  const int pdl_on = m3s_cuda_pdl(g_gpu, 4);
  int ok = cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess;
  g.exec.stream = stream;
  ok = ok && cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal) == cudaSuccess;
  m3s_status st = m3s_index_topk(g_gpu, &f.cfg, &g.batch, &g.iq_t, &g.ic_t, &g.topk_t, &g.exec);
  ok = ok && cudaStreamEndCapture(stream, &graph) == cudaSuccess && st == M3S_OK;
  ok = ok && cudaGraphInstantiate(&gexec, graph, 0) == cudaSuccess;
  if (!CHECK(ok, "graph: certified top-k captured and instantiated"))
    fprintf(stderr, "%s: status %d: %s\n", name, st, m3s_last_error());
  /* its 1802 pairs of at most 70 candidates take the register selection,
   * whose deferred kernel follows under PDL */
  if (ok && pdl_on)
    CHECK(gpu_programmatic_edges(graph) > 0,
          "graph: the deferred selection left a programmatic edge");
  uint64_t rng = 4242;
  for (int k = 0; k < 3 && ok; k++) {
    for (int64_t i = 0; i < f.num_pages * 128 * 128; i++)
      store_elem(f.ic_mem, f.sp.idx_dtype, i, rng_normal(&rng));
    for (int64_t i = 0; i < (int64_t)f.T * f.cfg.num_kv_heads * 128; i++)
      store_elem(f.iq_mem, f.sp.act_dtype, i, rng_normal(&rng));
    fx_poison(&f);
    ok = m3s_index_topk(g_cpu, &f.cfg, &f.batch, &f.iq, &f.ic, &f.topk, NULL) == M3S_OK;
    memcpy(expect, f.topk_mem, sizeof(int32_t) * n);
    m3s_topk_tc_stats cs;
    memset(&cs, 0, sizeof cs);
    ok = ok && gpu_fx_reupload_inputs(&g, &f) && gpu_fx_poison(&g, &f) &&
         gpu_put(g_stats, &cs, sizeof cs);
    ok = ok && cudaGraphLaunch(gexec, stream) == cudaSuccess &&
         cudaStreamSynchronize(stream) == cudaSuccess && gpu_fx_download(&g, &f) &&
         gpu_get(&cs, g_stats, sizeof cs);
    char msg[160];
    snprintf(msg, sizeof msg, "%s: replay %d equals the CPU backend", name, k);
    CHECK(ok && count_mismatches(&f, expect, name, 1) == 0, msg);
    CHECK(cs.pairs > 0, "graph: the certified path ran");
  }
  printf("  %-38s %-5s %s%s\n", name, g_mma ? "mma" : "dflt", ok ? "3 replays" : "FAILED",
         pdl_on ? ", PDL" : "");
  m3s_topk_tc_set_hooks(g_gpu, NULL);
  m3s_cuda_set_pdl(g_gpu, -1);
  if (gexec)
    cudaGraphExecDestroy(gexec);
  if (graph)
    cudaGraphDestroy(graph);
  if (stream)
    cudaStreamDestroy(stream);
  free(expect);
  gpu_fx_free(&g);
  fx_free(&f);
}

int main(void) {
  g_quick = gpu_env_flag("M3S_TEST_QUICK");
  g_gpu = gpu_context_or_null();
  if (!g_gpu)
    return gpu_skip("test_gpu_topk_certified", "no CUDA device");
  if (m3s_context_create(-1, &g_cpu) != M3S_OK) {
    fprintf(stderr, "cpu context: %s\n", m3s_last_error());
    m3s_context_destroy(g_gpu);
    return 1;
  }
  g_stats = gpu_dup(NULL, sizeof *g_stats);
  if (!CHECK(g_stats != NULL, "stats buffer")) {
    m3s_context_destroy(g_cpu);
    m3s_context_destroy(g_gpu);
    return TEST_FINISH();
  }
  /* pass 0: the default kernels; pass 1 (sm_90 only, unless
   * M3S_TEST_MMA_SYNC=0): the mma.sync score kernel forced on the same
   * inputs, after every default result is printed. PDL: see run_case and
   * test_graph. */
  int dev = 0, major = 0, passes = 1;
  /* the SM count decides which selection path a case must take (check_path) */
  if (!CHECK(cudaGetDevice(&dev) == cudaSuccess &&
                 cudaDeviceGetAttribute(&g_sms, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess,
             "SM count")) {
    gpu_free(g_stats);
    m3s_context_destroy(g_cpu);
    m3s_context_destroy(g_gpu);
    return TEST_FINISH();
  }
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
      major == 9) {
    g_sm90 = 1;
    const char *env = getenv("M3S_TEST_MMA_SYNC");
    passes = env && strcmp(env, "0") == 0 ? 1 : 2;
  }
  double t0 = gpu_now_ms();
  const uint64_t seed0 = g_seed;
  for (g_mma = 0; g_mma < passes; g_mma++) {
    printf("%s score kernels%s:\n", g_mma ? "mma.sync forced" : "default",
           g_mma ? "" : ", certified runs with PDL forced on and off");
    fflush(stdout);
    g_seed = seed0;
    test_adversarial();
    test_decode();
    test_k_variants();
    test_prefill_shapes();
    test_e4m3_prefill();
    test_graph();
  }
  printf("test_gpu_topk_certified: largest |S~ - S| / E seen: default %.4g, mma.sync %.4g%s "
         "(must be <= 1); %.1f s%s\n",
         g_max_ratio[0], g_max_ratio[1], passes == 2 ? "" : " (not run)",
         (gpu_now_ms() - t0) * 1e-3, g_quick ? " (quick)" : "");
  /* the prefill fixtures with at most 512 candidates per pair and more pairs
   * than SMs take the register selection; a filtered run may select none */
  if (test_unfiltered()) {
    if (major == 9) {
      CHECK(g_tma_ctas > 0, "the e4m3 decode cases took the decode score kernel's TMA form");
      CHECK(g_ws_e4m3 > 0, "the e4m3 prefill cases took tc_score_ws_kernel");
    }
    CHECK(g_reg_pairs > 0, "the register selection (tc_select_reg_kernel) decided pairs");
    CHECK(g_reg_rescored_runs > 0, "the register selection re-scored uncertain blocks");
    CHECK(g_filter_pairs > 0, "the register selection ranked pairs by tc_filter_ranks");
    CHECK(g_filter_falls > 0, "tc_filter_ranks declined pairs (ties, K = 64) to the rounds");
    CHECK(g_few_decided > 0 && g_few_deferred > 0,
          "reg_few: tc_reg_few decided and deferred pairs");
    CHECK(g_few_falls > 0, "reg_few: tc_reg_few left pairs (K = 64, ties) to the slot path");
  }
  printf("test_gpu_topk_certified: %llu pairs decided by the register selection, %d runs "
         "re-scored on it alone; filter ranked %llu, declined %llu; reg_few decided %llu, "
         "deferred %llu, left %llu\n",
         g_reg_pairs, g_reg_rescored_runs, g_filter_pairs, g_filter_falls, g_few_decided,
         g_few_deferred, g_few_falls);
  gpu_free(g_stats);
  m3s_context_destroy(g_cpu);
  m3s_context_destroy(g_gpu);
  return TEST_FINISH();
}
