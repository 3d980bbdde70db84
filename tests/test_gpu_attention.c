/* SPEC section 4 on the CUDA backend: m3s_sparse_attention on a CUDA context
 * against the fp64 reference of tests/ref.c (check_attention_vs_ref: rel L2
 * < 1e-2, lse within 1e-3, padded rows exactly 0 / -inf, every element
 * written) AND against the CPU backend on the same inputs (rel L2 < 1e-2).
 *
 * Each case builds a fixture (tests/ref.h) with fresh random inputs (every
 * cache page filled), computes the top-k on the CPU context, runs CPU
 * attention, then CUDA attention on device copies with poisoned outputs.
 * Every case also checks determinism (a second run gives the same bytes) and
 * that lse == NULL leaves the output bits unchanged.
 *
 * Coverage: TP1/2/4/8 (Hq/Hkv 64/4, 32/2, 16/1, 8/1) and G = 1, 12, 32; both
 * cache orders; bf16/f16 activations; bf16, f16, e4m3 and e5m2 caches (no,
 * scalar and per-(head, slot) scales; mixed 16-bit dtypes); decode rows at
 * 1, 128, 129, 2049, 5000 and 131072 tokens; uniform q_len 1 and 4, ragged
 * decode with query_start_loc[0] != 0, padded requests; prefill chunks (~1000
 * tokens behind a 19000-token prefix); K = 8 and 64; a head-major top-k view;
 * descending and -1-holed top-k rows, all -1 rows; device-side guards (top-k
 * ids outside [0, nb), page ids out of range, bad seq_lens); large logits
 * (|q.k * scale| in the hundreds and beyond: spread, one dominant key, all
 * equal at +181 and -362, e4m3/e5m2 extremes; decode rows too, so the
 * split-K merge sees them).
 *
 * M3S_TEST_QUICK=1 skips the large cases (for compute-sanitizer runs);
 * M3S_TEST_FILTER=text runs only the cases whose name contains text;
 * M3S_TEST_TIME=1 also times each case's CUDA call (cudaEvent, 20 runs) and
 * adds a batch-64 decode case.
 *
 * On an sm_90 device every case a TMA kernel takes (the persistent one,
 * src/cuda/sm90/attention_tma.cu, or the union one, attention_union.cu) also
 * runs on the generic kernel (the path switches of
 * src/cuda/sm90/attention_tma.h), and every case the union kernel can run
 * (max_q_len > 1; fp8 caches included) runs on it too, by default or forced
 * past its size rule, and once more on its warpgroup (wgmma) consumers; an
 * unfiltered run fails if any of them took no case, or if either union form
 * took no fp8 case (its converting producers). Persistent-kernel cases
 * whose splits merge inside a thread-block cluster (of 8, 4 and 2 CTAs)
 * run again with the splits through the merge kernel (the cluster switch
 * off); an unfiltered run fails if no case merged in a cluster on a device
 * that can. */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */
#include "cuda/sm90/attention_tma.h"
#include "gpu_util.h"

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static m3s_context *g_cpu, *g_gpu;
static int g_quick;
static int g_time;
static int g_tma_cases;   /* cases the sm_90 persistent kernel ran (then the generic one too) */
static int g_cluster_cases; /* persistent-kernel cases whose splits merged in a cluster */
static int g_cluster_size_cases[9]; /* the same by cluster size (2, 4, 8) */
static int g_union_cases; /* cases the sm_90 union kernel ran (by default or forced) */
static int g_wgmma_cases; /* cases its warpgroup consumers ran (forced) */
/* the same two on an fp8 cache (the union kernel's converting producers) */
static int g_union_fp8_cases, g_wgmma_fp8_cases;
static uint64_t g_seed = 20261107;

static m3s_layer_config cfg_of(int hq, int hkv, int k) {
  m3s_layer_config c = m3s_config_minimax_m3(1);
  c.num_q_heads = hq;
  c.num_kv_heads = hkv;
  c.topk = k;
  return c;
}

static fx_spec spec_of(m3s_layer_config c, int nreq, const int32_t *ql, const int32_t *sl) {
  fx_spec s = fx_spec_default(c, nreq, ql, sl, g_seed++);
  s.extra_pages = 3;
  return s;
}

static size_t out_bytes(const fixture *f) { return (size_t)f->T * f->cfg.num_q_heads * 128 * 2; }
static size_t lse_count(const fixture *f) { return (size_t)f->T * f->cfg.num_q_heads; }
static size_t topk_bytes(const fixture *f) {
  return sizeof(int32_t) * (size_t)f->T * f->cfg.num_kv_heads * f->cfg.topk;
}

/* Changes applied to a case.
 *  topk_host: rewrites the host top-k (or another host input) after the CPU
 *             computed the top-k (the CPU and the device both get the
 *             result).
 *  device:    GPU-only bad data after the upload; rewrites the host fixture
 *             into what the reference must see (ref_topk: the reference's
 *             top-k, the device keeps its own copy).
 *  no_cpu:    the CPU backend would reject the data: reference only.
 *  all_zero:  every output must be exactly 0 and every lse -inf. */
typedef struct {
  void (*topk_host)(fixture *f);
  int (*device)(fixture *f, gpu_fx *g, int32_t *ref_topk);
  int no_cpu;
  int all_zero;
} case_mods;

static int row_len(const fixture *f, int t);

static double out_rel_l2(const fixture *f, const void *got, const void *want) {
  return rel_l2(got, f->sp.act_dtype, want, f->sp.act_dtype, (int64_t)(out_bytes(f) / 2));
}

/* Mean time of the CUDA call over 20 runs (after 2 warm-up runs), with the
 * keys it attends and the K/V bytes of the blocks it reads. */
static void time_case(fixture *f, gpu_fx *g, const int32_t *dev_topk, const char *name) {
  int64_t keys = 0, blocks = 0;
  for (int t = 0; t < f->T; t++) {
    int64_t pos = fx_pos(f, t);
    for (int gg = 0; gg < f->cfg.num_kv_heads && pos >= 0; gg++)
      for (int k = 0; k < row_len(f, t); k++) {
        int32_t id = *(const int32_t *)((const char *)dev_topk +
                                        ((char *)fx_topk_at(f, t, gg, k) - (char *)f->topk_mem));
        if (id < 0 || id > pos / 128)
          continue;
        blocks++;
        keys += pos + 1 - (int64_t)id * 128 < 128 ? pos + 1 - (int64_t)id * 128 : 128;
      }
  }
  cudaEvent_t a, b;
  float ms = 0;
  int ok = cudaEventCreate(&a) == cudaSuccess && cudaEventCreate(&b) == cudaSuccess;
  for (int i = 0; ok && i < 22; i++) {
    if (i == 2)
      ok = cudaEventRecord(a, NULL) == cudaSuccess;
    ok = ok && m3s_sparse_attention(g_gpu, &f->cfg, &g->batch, &g->q_t, &g->kv_t, &g->scales,
                                    &g->topk_t, &g->out_t, &g->lse_t, &g->exec) == M3S_OK;
  }
  ok = ok && cudaEventRecord(b, NULL) == cudaSuccess && cudaEventSynchronize(b) == cudaSuccess &&
       cudaEventElapsedTime(&ms, a, b) == cudaSuccess;
  if (CHECK(ok, name)) {
    double s = ms / 20 * 1e-3;
    double bytes = (double)blocks * 128 * 256 * (double)m3s_dtype_size(f->sp.kv_dtype);
    double flops = 4.0 * 128 * (f->cfg.num_q_heads / f->cfg.num_kv_heads) * (double)keys;
    printf("    time %-44s %9.1f us  %7.1f GB/s of selected K/V blocks  %6.1f TFLOP/s useful\n",
           name, s * 1e6, bytes / s * 1e-9, flops / s * 1e-12);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
}

/* Poison, upload the device's top-k, run CUDA attention, download. */
static int gpu_run(fixture *f, gpu_fx *g, const int32_t *dev_topk, int with_lse, const char *name) {
  if (!gpu_fx_poison(g, f))
    return 0;
  memcpy(f->topk_mem, dev_topk, topk_bytes(f));
  if (!gpu_fx_upload_topk(g, f))
    return 0;
  m3s_status st =
      m3s_sparse_attention(g_gpu, &f->cfg, &g->batch, &g->q_t, &g->kv_t, &g->scales, &g->topk_t,
                           &g->out_t, with_lse ? &g->lse_t : NULL, &g->exec);
  if (st != M3S_OK) {
    fprintf(stderr, "%s: cuda m3s_sparse_attention: %s\n", name, m3s_last_error());
    return 0;
  }
  return gpu_fx_download(g, f);
}

/* One device path on the case: run, check against the fp64 reference and
 * the CPU output (cpu_out, or NULL), all-zero rows when mods ask, then
 * determinism (same bytes again) and lse == NULL (same output bits). Returns
 * 0 when the device run itself failed. */
static int device_checks(fixture *f, gpu_fx *g, const int32_t *dev_topk, const int32_t *ref_topk,
                         const void *cpu_out, const case_mods *mods, const char *case_name,
                         const char *path, double *ref_err, double *cpu_err) {
  char name[160];
  snprintf(name, sizeof name, "%s [%s]", case_name, path);
  size_t ob = out_bytes(f), ln = lse_count(f), tb = topk_bytes(f);
  void *out1 = malloc(ob + 2);
  float *lse1 = malloc(sizeof(float) * (ln + 1));
  int ok = out1 && lse1 && gpu_run(f, g, dev_topk, 1, name);
  if (!CHECK(ok, name)) {
    fprintf(stderr, "%s: device run failed\n", name);
    free(out1);
    free(lse1);
    return 0;
  }
  memcpy(out1, f->out_mem, ob);
  memcpy(lse1, f->lse_mem, sizeof(float) * ln);
  memcpy(f->topk_mem, ref_topk, tb);
  *ref_err = check_attention_vs_ref(f, 1, name);
  *cpu_err = cpu_out ? out_rel_l2(f, out1, cpu_out) : 0.0;
  if (cpu_out && !CHECK(*cpu_err < 1e-2, name))
    fprintf(stderr, "%s: CUDA vs CPU rel L2 %.3g\n", name, *cpu_err);
  if (mods && mods->all_zero) {
    int zero = 1;
    for (size_t i = 0; i < ob / 2; i++)
      zero &= ((const uint16_t *)out1)[i] == 0;
    for (size_t i = 0; i < ln; i++)
      zero &= isinf(lse1[i]) && lse1[i] < 0;
    CHECK(zero, name);
  }
  ok = gpu_run(f, g, dev_topk, 1, name);
  if (!CHECK(ok && memcmp(out1, f->out_mem, ob) == 0 &&
                 memcmp(lse1, f->lse_mem, sizeof(float) * ln) == 0,
             name))
    fprintf(stderr, "%s: second run differs (determinism)\n", name);
  ok = gpu_run(f, g, dev_topk, 0, name);
  if (!CHECK(ok && memcmp(out1, f->out_mem, ob) == 0, name))
    fprintf(stderr, "%s: output differs when lse is NULL\n", name);
  free(out1);
  free(lse1);
  return 1;
}

/* device_checks on the union kernel forced past its size rule (wgmma: on its
 * warpgroup consumers), where it can run the case; 1 when it ran. */
static int forced_union(fixture *f, gpu_fx *g, const int32_t *dev_topk, const int32_t *ref_topk,
                        const void *cpu_out, const case_mods *mods, const char *name, int wgmma) {
  double ref = 0.0, cpu = 0.0;
  m3s_attention_set_union_any(g_gpu, 1);
  m3s_attention_set_union_wgmma(g_gpu, wgmma);
  const int runs = m3s_attention_tma_eligible(g_gpu, &g->batch, &g->q_t, &g->kv_t, &g->scales) ==
                   M3S_ATTN_UNION;
  if (runs)
    device_checks(f, g, dev_topk, ref_topk, cpu_out, mods, name,
                  wgmma ? "union wgmma (forced)" : "union (forced)", &ref, &cpu);
  m3s_attention_set_union_wgmma(g_gpu, -1);
  m3s_attention_set_union_any(g_gpu, 0);
  return runs;
}

static void run_case(const char *name, fx_spec s, const case_mods *mods) {
  fixture f;
  gpu_fx g;
  if (!test_selected(name))
    return;
  memset(&g, 0, sizeof g);
  double t0 = gpu_now_ms();
  fx_init(&f, &s);
  fx_poison(&f);
  m3s_status st = m3s_index_topk(g_cpu, &f.cfg, &f.batch, &f.iq, &f.ic, &f.topk, NULL);
  if (!CHECK(st == M3S_OK, name)) {
    fprintf(stderr, "%s: cpu m3s_index_topk: %s\n", name, m3s_last_error());
    fx_free(&f);
    return;
  }
  if (mods && mods->topk_host)
    mods->topk_host(&f);
  size_t ob = out_bytes(&f), tb = topk_bytes(&f);
  int32_t *dev_topk = malloc(tb + 4), *ref_topk = malloc(tb + 4);
  void *cpu_out = malloc(ob + 2);
  memcpy(dev_topk, f.topk_mem, tb);
  memcpy(ref_topk, f.topk_mem, tb);
  /* CPU backend */
  int have_cpu = !(mods && mods->no_cpu);
  double t1 = gpu_now_ms();
  if (have_cpu) {
    st = m3s_sparse_attention(g_cpu, &f.cfg, &f.batch, &f.q, &f.kv, &f.scales, &f.topk, &f.out,
                              &f.lse, NULL);
    if (!CHECK(st == M3S_OK, name))
      fprintf(stderr, "%s: cpu m3s_sparse_attention: %s\n", name, m3s_last_error());
    memcpy(cpu_out, f.out_mem, ob);
  }
  double t2 = gpu_now_ms();
  /* CUDA backend: the default path, then the generic kernel */
  int ok = gpu_fx_upload(&g, &f, g_gpu);
  if (ok && mods && mods->device)
    ok = mods->device(&f, &g, ref_topk);
  if (!CHECK(ok, name))
    fprintf(stderr, "%s: device upload failed\n", name);
  double t3 = gpu_now_ms();
  static const char *const kernel_name[] = {"generic", "tma", "union"};
  const int kind =
      ok ? m3s_attention_tma_eligible(g_gpu, &g.batch, &g.q_t, &g.kv_t, &g.scales) : 0;
  g_tma_cases += kind == M3S_ATTN_PERSISTENT;
  g_union_cases += kind == M3S_ATTN_UNION;
  double ref_err = 0.0, cpu_err = 0.0;
  ok = ok && device_checks(&f, &g, dev_topk, ref_topk, have_cpu ? cpu_out : NULL, mods, name,
                           kernel_name[kind], &ref_err, &cpu_err);
  double t4 = gpu_now_ms();
  double ref2 = 0.0, cpu2 = 0.0;
  if (ok && kind != M3S_ATTN_GENERIC) {
    m3s_attention_set_generic(g_gpu, 1);
    device_checks(&f, &g, dev_topk, ref_topk, have_cpu ? cpu_out : NULL, mods, name, "generic",
                  &ref2, &cpu2);
    m3s_attention_set_generic(g_gpu, 0);
  }
  /* splits the default merged in a cluster: again through the merge kernel */
  const int csize = ok && kind == M3S_ATTN_PERSISTENT
                        ? m3s_attention_cluster_splits(g_gpu, &f.cfg, &g.batch)
                        : 1;
  const int cluster = csize > 1;
  g_cluster_cases += cluster;
  if (cluster && csize <= 8)
    g_cluster_size_cases[csize]++;
  if (cluster) {
    m3s_attention_set_cluster_merge(g_gpu, 0);
    device_checks(&f, &g, dev_topk, ref_topk, have_cpu ? cpu_out : NULL, mods, name,
                  "tma, merge kernel", &ref2, &cpu2);
    m3s_attention_set_cluster_merge(g_gpu, 1);
  }
  /* the union kernel on every batch it can run, however small, on each
   * consumer form the default did not run */
  const void *cpu_ref = have_cpu ? cpu_out : NULL;
  const int def_wg =
      kind == M3S_ATTN_UNION && m3s_attention_union_wg(g_gpu, &g.batch, g.kv_t.dtype);
  const int forced = ok && (kind != M3S_ATTN_UNION || def_wg) &&
                     forced_union(&f, &g, dev_topk, ref_topk, cpu_ref, mods, name, 0);
  const int wgmma = ok && (kind != M3S_ATTN_UNION || !def_wg) &&
                    forced_union(&f, &g, dev_topk, ref_topk, cpu_ref, mods, name, 1);
  const int fp8 = g.kv_t.dtype == M3S_E4M3 || g.kv_t.dtype == M3S_E5M2;
  g_union_cases += forced;
  g_wgmma_cases += wgmma || def_wg;
  g_union_fp8_cases += fp8 && ((kind == M3S_ATTN_UNION && !def_wg) || forced);
  g_wgmma_fp8_cases += fp8 && (wgmma || def_wg);
  if (ok && g_time)
    time_case(&f, &g, dev_topk, name);
  char cl[48] = "";
  if (cluster)
    snprintf(cl, sizeof cl, " (cluster merge of %d)+merge kernel", csize);
  printf("  %-50s T %5d  ref %.2e  cpu %.2e  ws %8zu B  cpu %7.1f ms  cuda+copies %6.2f ms  (%.0f "
         "ms)  %s%s%s%s%s\n",
         name, f.T, ref_err, cpu_err, g.ws_bytes, t2 - t1, t4 - t3, gpu_now_ms() - t0,
         kernel_name[kind], cl,
         kind != M3S_ATTN_GENERIC ? "+generic" : "", forced ? "+union" : "",
         wgmma ? "+wgmma" : "");
  gpu_fx_free(&g);
  free(dev_topk);
  free(ref_topk);
  free(cpu_out);
  fx_free(&f);
}

/* ---- top-k row forms ------------------------------------------------------ */

static int row_len(const fixture *f, int t) {
  int64_t pos = fx_pos(f, t);
  int64_t nb = pos < 0 ? 0 : pos / 128 + 1;
  return (int)(nb < f->cfg.topk ? nb : f->cfg.topk);
}

/* Each row's valid prefix reversed (descending ids, as a score-ordered
 * producer writes them). */
static void topk_descending(fixture *f) {
  for (int t = 0; t < f->T; t++)
    for (int g = 0; g < f->cfg.num_kv_heads; g++)
      for (int a = 0, b = row_len(f, t) - 1; a < b; a++, b--) {
        int32_t x = *fx_topk_at(f, t, g, a);
        *fx_topk_at(f, t, g, a) = *fx_topk_at(f, t, g, b);
        *fx_topk_at(f, t, g, b) = x;
      }
}

/* -1 in every third slot of the valid prefix. */
static void topk_holes(fixture *f) {
  for (int t = 0; t < f->T; t++)
    for (int g = 0; g < f->cfg.num_kv_heads; g++)
      for (int k = 0; k < row_len(f, t); k++)
        if (k % 3 == 1)
          *fx_topk_at(f, t, g, k) = -1;
}

static void topk_all_minus_one(fixture *f) {
  for (int t = 0; t < f->T; t++)
    for (int g = 0; g < f->cfg.num_kv_heads; g++)
      for (int k = 0; k < f->cfg.topk; k++)
        *fx_topk_at(f, t, g, k) = -1;
}

/* Ids the CPU rejects and the CUDA backend skips: >= nb, < -1, huge. */
static void topk_out_of_range(fixture *f) {
  for (int t = 0; t < f->T; t++) {
    int64_t pos = fx_pos(f, t);
    int32_t nb = pos < 0 ? 0 : (int32_t)(pos / 128 + 1);
    int n = row_len(f, t);
    for (int g = 0; g < f->cfg.num_kv_heads; g++)
      for (int k = 0; k < n; k++)
        if (k % 4 == 2)
          *fx_topk_at(f, t, g, k) = (k & 4) ? nb + k : (k & 8) ? -5 - k : 0x40000000;
  }
}

/* ---- device guards ------------------------------------------------------- */

/* Request 0 (rows select blocks 0..15) has blocks 5 and 7 mapped outside the
 * cache on the device (they contribute no keys: the reference sees -1);
 * request 1's seq_len > max_seq_len and request 2's < q_len on the device
 * (padded: the reference sees seq_len 0). */
static void guard_rows_host(fixture *f) {
  for (int t = 0; t < f->T; t++) {
    int i;
    if (fx_request_of_row(f, t, &i) == 0)
      for (int g = 0; g < f->cfg.num_kv_heads; g++)
        for (int k = 0; k < f->cfg.topk; k++)
          *fx_topk_at(f, t, g, k) = k;
  }
}

static int guard_device(fixture *f, gpu_fx *g, int32_t *ref_topk) {
  int64_t s0 = f->batch.block_table.stride[0];
  size_t tbytes = sizeof(int32_t) * (size_t)(f->sp.num_reqs * s0 + 1);
  int32_t *tab = malloc(tbytes);
  memcpy(tab, f->bt, tbytes);
  tab[5] = (int32_t)f->num_pages + 1000;
  tab[7] = -3;
  int ok = gpu_put(g->bt, tab, tbytes);
  free(tab);
  int32_t *sl = malloc(sizeof(int32_t) * (size_t)(f->sp.num_reqs + 1));
  memcpy(sl, f->seqlens, sizeof(int32_t) * (size_t)(f->sp.num_reqs + 1));
  sl[1] = (int32_t)f->batch.max_seq_len + 1;
  sl[2] = f->qlens[2] - 1;
  ok = ok && gpu_put(g->seq, sl, sizeof(int32_t) * (size_t)(f->sp.num_reqs + 1));
  free(sl);
  /* what the reference must see */
  for (int t = 0; t < f->T; t++) {
    int i;
    if (fx_request_of_row(f, t, &i) != 0)
      continue;
    for (int gg = 0; gg < f->cfg.num_kv_heads; gg++)
      for (int k = 0; k < f->cfg.topk; k++) {
        int32_t *e =
            (int32_t *)((char *)ref_topk + ((char *)fx_topk_at(f, t, gg, k) - (char *)f->topk_mem));
        if (*e == 5 || *e == 7)
          *e = -1;
      }
  }
  f->seqlens[1] = 0;
  f->seqlens[2] = 0;
  return ok;
}

/* ---- cases --------------------------------------------------------------- */

static void test_tp_decode(void) {
  static const int32_t ql[] = {1, 1, 1, 1, 1, 1};
  static const int32_t sl[] = {1, 128, 129, 2049, 0, 5000};
  for (int tp = 1; tp <= 8; tp *= 2)
    for (int tm = 0; tm < 2; tm++) {
      fx_spec s = spec_of(m3s_config_minimax_m3(tp), 6, ql, sl);
      s.uniform = 1;
      s.token_major = tm;
      char name[96];
      snprintf(name, sizeof name, "decode_tp%d_%s_bf16", tp, tm ? "token_major" : "head_major");
      run_case(name, s, NULL);
    }
}

/* Decode batches whose splits merge in clusters of 2 (on a 132-SM device):
 * 12 requests at TP1 (48 items: 2 splits each fill 96 SMs), with a padded
 * and a one-token request; and one 300-token request (3 blocks), on an
 * e4m3 cache. The cluster sizes 4 and 8 come from test_tp_decode and the
 * one-request cases. */
static void test_cluster_two(void) {
  static const int32_t ql[12] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};
  static const int32_t sl[12] = {2049, 0, 5000, 1, 130, 3000, 4097, 2500, 900, 6001, 2048, 3333};
  fx_spec s = spec_of(m3s_config_minimax_m3(1), 12, ql, sl);
  s.uniform = 1;
  run_case("decode_cluster2_12_requests_tp1_bf16", s, NULL);
  static const int32_t sl1[] = {300};
  fx_spec s1 = spec_of(m3s_config_minimax_m3(1), 1, ql, sl1);
  s1.uniform = 1;
  s1.kv_dtype = M3S_E4M3;
  s1.scale_mode = 1;
  run_case("decode_cluster2_one_request_300_tp1_e4m3", s1, NULL);
}

/* Every activation / cache dtype pair and scale form, as q_len 4 batches
 * (generic kernel) and as one-row decode batches (on sm_90 the TMA kernel,
 * fp8 caches included, and the generic one): 17 blocks with a partial last
 * one, an empty request, 2 and 1 blocks. */
static void test_dtypes(void) {
  static const int32_t ql4[] = {4, 4, 4, 4}, ql1[] = {1, 1, 1, 1};
  static const int32_t sl[] = {2051, 0, 130, 4};
  struct {
    m3s_dtype act, kv;
    int scale;
    const char *name;
  } c[] = {{M3S_F16, M3S_F16, 0, "f16_act_f16_cache"},
           {M3S_BF16, M3S_F16, 0, "bf16_act_f16_cache"},
           {M3S_F16, M3S_BF16, 0, "f16_act_bf16_cache"},
           {M3S_BF16, M3S_E4M3, 0, "e4m3_no_scale"},
           {M3S_BF16, M3S_E4M3, 1, "e4m3_scalar_scales"},
           {M3S_BF16, M3S_E4M3, 2, "e4m3_per_slot_scales"},
           {M3S_F16, M3S_E4M3, 2, "f16_act_e4m3_per_slot_scales"},
           {M3S_BF16, M3S_E5M2, 1, "e5m2_scalar_scales"},
           {M3S_F16, M3S_E5M2, 2, "f16_act_e5m2_per_slot_scales"},
           {M3S_BF16, M3S_E5M2, 0, "e5m2_no_scale"}};
  for (int q1 = 0; q1 < 2; q1++)
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
      int tp = i % 3 == 2 ? 1 : q1 ? 8 : 2;
      fx_spec s = spec_of(m3s_config_minimax_m3(tp), 4, q1 ? ql1 : ql4, sl);
      s.uniform = 1;
      s.act_dtype = c[i].act;
      s.kv_dtype = c[i].kv;
      s.scale_mode = c[i].scale;
      s.token_major = (int)((i + q1) & 1);
      char name[96];
      snprintf(name, sizeof name, "%s_%s_tp%d", q1 ? "decode_q1" : "qlen4", c[i].name, tp);
      run_case(name, s, NULL);
    }
}

/* q rows the TMA kernel's f16 S = Q K^T must not take for bf16 q on an fp8
 * cache (they do not convert to f16 exactly), beside rows that take it:
 * rows 4i + 1 times 2^-20 (bits below f16's subnormals: they run the bf16
 * fallback, though their near-uniform softmax would hide a rounding of q),
 * rows 4i + 2 with dim 0 of every head at +-2^17 (beyond f16's range, a
 * dominant logit: an f16 q there is inf and fails the fp64 check). */
static void q_beyond_f16(fixture *f) {
  const int64_t hq = f->cfg.num_q_heads;
  for (int t = 0; t < f->T; t++)
    for (int64_t h = 0; h < hq; h++)
      for (int d = 0; d < 128; d++) {
        const int64_t off = ((int64_t)t * hq + h) * 128 + d;
        const double v = load_elem(f->q_mem, f->sp.act_dtype, off);
        if (t % 4 == 1)
          store_elem(f->q_mem, f->sp.act_dtype, off, (float)ldexp(v, -20));
        else if (t % 4 == 2 && d == 0)
          store_elem(f->q_mem, f->sp.act_dtype, off, h & 1 ? -131072.0f : 131072.0f);
      }
}

/* One-row decode, bf16 q, fp8 caches without per-slot v scales (the TMA
 * kernel's f16 S form where q allows it): rows on both forms in a batch. */
static void test_q_beyond_f16(void) {
  static const int32_t ql[] = {1, 1, 1, 1, 1, 1, 1, 1};
  static const int32_t sl[] = {2051, 3000, 130, 2600, 4, 1700, 129, 2300};
  struct {
    m3s_dtype kv;
    int scale, tp;
    const char *name;
  } c[] = {{M3S_E4M3, 1, 1, "decode_q1_fp8_q_beyond_f16_e4m3_scalar_tp1"},
           {M3S_E4M3, 0, 8, "decode_q1_fp8_q_beyond_f16_e4m3_no_scale_tp8"},
           {M3S_E5M2, 1, 2, "decode_q1_fp8_q_beyond_f16_e5m2_scalar_tp2"}};
  case_mods m = {q_beyond_f16, NULL, 0, 0};
  for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
    fx_spec s = spec_of(m3s_config_minimax_m3(c[i].tp), 8, ql, sl);
    s.uniform = 1;
    s.kv_dtype = c[i].kv;
    s.scale_mode = c[i].scale;
    s.token_major = (int)(i & 1);
    run_case(c[i].name, s, &m);
  }
}

static void test_spec_decode_and_ragged(void) {
  static const int32_t ql[] = {4, 4, 4, 4, 4};
  static const int32_t sl[] = {3000, 4, 0, 700, 129};
  for (int tp = 1; tp <= 8; tp *= 8) {
    fx_spec s = spec_of(m3s_config_minimax_m3(tp), 5, ql, sl);
    s.uniform = 1;
    run_case(tp == 1 ? "uniform_qlen4_padded_tp1" : "uniform_qlen4_padded_tp8", s, NULL);
  }
  static const int32_t rql[] = {3, 0, 1, 2};
  static const int32_t rsl[] = {900, 0, 0, 2};
  fx_spec r = spec_of(m3s_config_minimax_m3(8), 4, rql, rsl);
  r.qsl_base = 5;
  run_case("ragged_decode_empty_and_padded_tp8_qsl5", r, NULL);
  static const int32_t rql2[] = {2, 1, 5, 1, 3};
  static const int32_t rsl2[] = {4000, 129, 6, 0, 2049};
  fx_spec r2 = spec_of(m3s_config_minimax_m3(1), 5, rql2, rsl2);
  r2.qsl_base = 3;
  r2.kv_dtype = M3S_E4M3;
  r2.scale_mode = 2;
  r2.token_major = 1;
  run_case("ragged_decode_tp1_e4m3_per_slot_token_major", r2, NULL);
}

static void test_prefill(void) {
  static const int32_t ql[] = {1, 1, 300, 77};
  static const int32_t sl[] = {2600, 0, 2200, 77};
  fx_spec s = spec_of(m3s_config_minimax_m3(1), 4, ql, sl);
  s.kv_dtype = M3S_E5M2;
  s.scale_mode = 1;
  s.token_major = 1;
  s.qsl_base = 9;
  run_case("mixed_prefill_tp1_e5m2_scalar_token_major", s, NULL);
  static const int32_t ql2[] = {257};
  static const int32_t sl2[] = {4000};
  fx_spec s2 = spec_of(m3s_config_minimax_m3(8), 1, ql2, sl2);
  s2.act_dtype = M3S_F16;
  s2.kv_dtype = M3S_F16;
  s2.topk_head_major = 1;
  run_case("prefill_257_tp8_f16_head_major_topk", s2, NULL);
  /* many short requests in one group of the union kernel's 8 rows, rows of
   * requests without new tokens between them, prompts shorter than a block */
  static const int32_t qlr[] = {3, 1, 0, 5, 2, 7, 1, 0, 1, 9, 4, 130};
  static const int32_t slr[] = {3, 2900, 0, 1000, 2, 7, 129, 50, 5000, 300, 260, 130};
  fx_spec r = spec_of(m3s_config_minimax_m3(1), 12, qlr, slr);
  r.token_major = 1;
  r.qsl_base = 1;
  run_case("prefill_ragged_short_requests_tp1_bf16_token_major", r, NULL);
  fx_spec r8 = spec_of(m3s_config_minimax_m3(8), 12, qlr, slr);
  r8.act_dtype = M3S_F16;
  r8.kv_dtype = M3S_F16;
  run_case("prefill_ragged_short_requests_tp8_f16", r8, NULL);
  if (g_quick)
    return;
  static const int32_t ql3[] = {1, 1000};
  static const int32_t sl3[] = {3000, 20000};
  fx_spec s3 = spec_of(m3s_config_minimax_m3(4), 2, ql3, sl3);
  s3.qsl_base = 2;
  run_case("prefill_1000_behind_19000_tp4_bf16", s3, NULL);
  fx_spec s4 = spec_of(m3s_config_minimax_m3(2), 2, ql3, sl3);
  s4.kv_dtype = M3S_E4M3;
  s4.scale_mode = 2;
  s4.token_major = 1;
  run_case("prefill_1000_behind_19000_tp2_e4m3_per_slot", s4, NULL);
}

/* NaN (16-bit caches: 0x7FC1; fp8: 0x7F) in every K and V element of the
 * slots past each request's seq_len in its last page: no output may see
 * them. The keys are masked; the V rows there are zeroed in registers by
 * the union kernel's mma.sync consumers and in the slot by its producer for
 * the wgmma ones (0 x NaN is NaN, and the wgmma's P V reads V for every
 * row of a warpgroup). A host change before both backends run. */
static void nan_past_len(fixture *f) {
  const size_t es = m3s_dtype_size(f->sp.kv_dtype);
  const int64_t *st = f->kv.stride, s0 = f->batch.block_table.stride[0];
  for (int r = 0; r < f->sp.num_reqs; r++) {
    const int64_t len = f->seqlens[r];
    if (len <= 0 || len % M3S_BLOCK_SIZE == 0)
      continue;
    const int64_t page = f->bt[r * s0 + (len - 1) / M3S_BLOCK_SIZE];
    for (int64_t j = len % M3S_BLOCK_SIZE; j < M3S_BLOCK_SIZE; j++)
      for (int64_t g = 0; g < f->cfg.num_kv_heads; g++)
        for (int64_t d = 0; d < 256; d++) {
          unsigned char *e =
              (unsigned char *)f->kv_mem + (size_t)(page * st[0] + g * st[1] + j * st[2] + d) * es;
          if (es == 2)
            *(uint16_t *)e = 0x7FC1;
          else
            *e = 0x7F;
        }
  }
}

static void test_nan_past_len(void) {
  case_mods m = {nan_past_len, NULL, 0, 0};
  static const int32_t ql[] = {77, 200, 9};
  static const int32_t sl[] = {77, 2500, 1033};
  fx_spec s = spec_of(m3s_config_minimax_m3(1), 3, ql, sl);
  run_case("nan_past_len_prefill_tp1_bf16", s, &m);
  fx_spec s2 = spec_of(m3s_config_minimax_m3(2), 3, ql, sl);
  s2.act_dtype = M3S_F16;
  s2.kv_dtype = M3S_F16;
  s2.token_major = 1;
  run_case("nan_past_len_prefill_tp2_f16_token_major", s2, &m);
  static const int32_t ql4[] = {4, 4, 4};
  static const int32_t sl4[] = {3001, 130, 4};
  fx_spec s4 = spec_of(m3s_config_minimax_m3(4), 3, ql4, sl4);
  s4.uniform = 1;
  run_case("nan_past_len_qlen4_tp4_bf16", s4, &m);
  fx_spec s5 = spec_of(m3s_config_minimax_m3(1), 3, ql, sl);
  s5.kv_dtype = M3S_E5M2;
  s5.scale_mode = 1;
  run_case("nan_past_len_prefill_tp1_e5m2", s5, &m);
  /* decode rows: the persistent kernel and the generic split-K one */
  static const int32_t ql1[] = {1, 1, 1};
  fx_spec d = spec_of(m3s_config_minimax_m3(1), 3, ql1, sl);
  d.uniform = 1;
  run_case("nan_past_len_decode_tp1_bf16", d, &m);
  fx_spec d8 = spec_of(m3s_config_minimax_m3(8), 3, ql1, sl);
  d8.uniform = 1;
  d8.kv_dtype = M3S_E4M3;
  d8.scale_mode = 2;
  d8.token_major = 1;
  run_case("nan_past_len_decode_tp8_e4m3_per_slot", d8, &m);
}

static void test_long_decode(void) {
  if (g_quick)
    return;
  if (g_time) {
    int32_t ql[64], sl[64];
    for (int r = 0; r < 64; r++)
      ql[r] = 1, sl[r] = 2100 + 7 * r;
    fx_spec b = spec_of(m3s_config_minimax_m3(1), 64, ql, sl);
    b.uniform = 1;
    run_case("time_decode_batch64_tp1_bf16", b, NULL);
  }
  static const int32_t ql[] = {1, 1, 1};
  static const int32_t sl[] = {131072, 1, 131072 - 77};
  fx_spec s = spec_of(m3s_config_minimax_m3(8), 3, ql, sl);
  s.uniform = 1;
  run_case("decode_128k_tp8_bf16", s, NULL);
  /* one request: the default launches the chain (TMA kernel, split merge)
   * with programmatic dependent launch on sm_90 (src/cuda/launch.h) */
  static const int32_t ql1[] = {1};
  static const int32_t sl1[] = {131072 - 5};
  fx_spec s1 = spec_of(m3s_config_minimax_m3(1), 1, ql1, sl1);
  s1.uniform = 1;
  run_case("decode_128k_one_request_tp1_bf16", s1, NULL);
  fx_spec s8 = spec_of(m3s_config_minimax_m3(8), 1, ql1, sl1);
  s8.uniform = 1;
  s8.kv_dtype = M3S_E4M3;
  s8.scale_mode = 1;
  run_case("decode_128k_one_request_tp8_e4m3", s8, NULL);
  static const int32_t ql4[] = {4};
  static const int32_t sl4[] = {131072};
  fx_spec s4 = spec_of(m3s_config_minimax_m3(4), 1, ql4, sl4);
  s4.uniform = 1;
  s4.kv_dtype = M3S_E4M3;
  s4.scale_mode = 2;
  s4.token_major = 1;
  run_case("decode_128k_tp4_qlen4_e4m3_per_slot", s4, NULL);
  /* 1,048,576-token context (8192 blocks): a 4096-token prefill chunk ending
   * inside the last block, and a 1M decode request in the same batch */
  static const int32_t ql1m[] = {1, 4096};
  static const int32_t sl1m[] = {1048576, 1048576 - 77};
  fx_spec m = spec_of(m3s_config_minimax_m3(8), 2, ql1m, sl1m);
  m.kv_dtype = M3S_E4M3;
  m.scale_mode = 2;
  run_case("prefill_chunk_4096_at_1M_plus_decode_1M_tp8_e4m3", m, NULL);
}

static void test_group_and_k(void) {
  static const int32_t ql[] = {1, 40, 1};
  static const int32_t sl[] = {9000, 3000, 129};
  struct {
    int hq, hkv, k;
    const char *name;
  } c[] = {{64, 2, 16, "g32_two_head_chunks"},
           {24, 2, 16, "g12_partial_chunk"},
           {4, 4, 16, "g1_mha"},
           {8, 1, 64, "k64_tp8"},
           {32, 2, 8, "k8_tp2"},
           {256, 1, 64, "hq256_g256_k64"},
           {256, 4, 16, "hq256_hkv4"}};
  for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
    fx_spec s = spec_of(cfg_of(c[i].hq, c[i].hkv, c[i].k), 3, ql, sl);
    s.token_major = (int)(i & 1);
    run_case(c[i].name, s, NULL);
  }
}

/* Each form twice: with a 60-token prefill row (the generic kernel) and as
 * one-row-per-request decode (the sm_90 TMA kernel where it runs). */
static void test_topk_forms(void) {
  static const int32_t ql[2][3] = {{1, 1, 60}, {1, 1, 1}};
  static const int32_t sl[] = {3000, 2600, 2500};
  case_mods desc = {topk_descending, NULL, 0, 0};
  case_mods holes = {topk_holes, NULL, 0, 0};
  case_mods none = {topk_all_minus_one, NULL, 0, 1};
  case_mods oob = {topk_out_of_range, NULL, 1, 0};
  for (int d = 0; d < 2; d++) {
    const char *sfx = d ? "_decode_q1" : "";
    char n[96];
    snprintf(n, sizeof n, "topk_descending_rows_tp4%s", sfx);
    run_case(n, spec_of(m3s_config_minimax_m3(4), 3, ql[d], sl), &desc);
    snprintf(n, sizeof n, "topk_minus_one_holes_tp2%s", sfx);
    run_case(n, spec_of(m3s_config_minimax_m3(2), 3, ql[d], sl), &holes);
    snprintf(n, sizeof n, "topk_all_minus_one_zero_out_tp1%s", sfx);
    run_case(n, spec_of(m3s_config_minimax_m3(1), 3, ql[d], sl), &none);
    snprintf(n, sizeof n, "guard_topk_ids_out_of_range_skipped_tp8%s", sfx);
    run_case(n, spec_of(m3s_config_minimax_m3(8), 3, ql[d], sl), &oob);
    fx_spec hm = spec_of(m3s_config_minimax_m3(2), 3, ql[d], sl);
    hm.topk_head_major = 1;
    snprintf(n, sizeof n, "topk_head_major_view_descending_tp2%s", sfx);
    run_case(n, hm, &desc);
  }
}

/* ---- large logits ---------------------------------------------------------
 * q and K rewritten so |q.k * scale| reaches the hundreds and beyond
 * (fx_large_logits, tests/ref.h): out and lse vs fp64 and vs the CPU, as in
 * every case. A kernel that drops the online softmax's max-subtraction (or
 * keeps it in a way that overflows exp2) fails here and nowhere else. */
static void ll_spread(fixture *f) { fx_large_logits(f, FX_LOGITS_SPREAD); }
static void ll_dominant(fixture *f) { fx_large_logits(f, FX_LOGITS_DOMINANT); }
static void ll_equal_pos(fixture *f) { fx_large_logits(f, FX_LOGITS_EQUAL_POS); }
static void ll_equal_neg(fixture *f) { fx_large_logits(f, FX_LOGITS_EQUAL_NEG); }
static void ll_fp8_max(fixture *f) { fx_large_logits(f, FX_LOGITS_FP8_MAX); }

static void test_large_logits(void) {
  static const int32_t ql[] = {1, 1, 24};
  static const int32_t sl[] = {3000, 0, 1500};
  static const int32_t dql[] = {1, 1, 1, 1};
  static const int32_t dsl[] = {5000, 129, 0, 2049};
  struct {
    void (*mod)(fixture *f);
    int tp, decode;
    m3s_dtype act, kv;
    int scale, token_major;
    const char *name;
  } c[] = {
      {ll_spread, 2, 0, M3S_BF16, M3S_BF16, 0, 0, "large_logits_spread_tp2_bf16"},
      {ll_spread, 1, 1, M3S_BF16, M3S_BF16, 0, 1, "large_logits_spread_decode_tp1_bf16"},
      {ll_dominant, 1, 0, M3S_BF16, M3S_BF16, 0, 1, "large_logits_one_dominant_key_tp1"},
      {ll_dominant, 8, 1, M3S_F16, M3S_F16, 0, 0, "large_logits_one_dominant_key_decode_tp8"},
      {ll_equal_pos, 8, 0, M3S_BF16, M3S_F16, 0, 0, "large_logits_all_equal_plus181_tp8"},
      {ll_equal_neg, 8, 1, M3S_F16, M3S_BF16, 0, 1, "large_logits_all_equal_minus362_decode_tp8"},
      {ll_equal_neg, 2, 0, M3S_BF16, M3S_BF16, 0, 0, "large_logits_all_equal_minus362_tp2"},
      {ll_spread, 2, 0, M3S_BF16, M3S_E4M3, 1, 1, "large_logits_spread_tp2_e4m3_scalar"},
      {ll_fp8_max, 4, 0, M3S_BF16, M3S_E4M3, 0, 0, "large_logits_e4m3_extremes_tp4"},
      {ll_fp8_max, 1, 1, M3S_BF16, M3S_E4M3, 2, 1, "large_logits_e4m3_extremes_decode_tp1"},
      {ll_fp8_max, 2, 0, M3S_F16, M3S_E5M2, 0, 0, "large_logits_e5m2_extremes_tp2"},
      {ll_fp8_max, 8, 1, M3S_BF16, M3S_E5M2, 2, 1, "large_logits_e5m2_extremes_decode_tp8"},
  };
  for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
    fx_spec s = c[i].decode ? spec_of(m3s_config_minimax_m3(c[i].tp), 4, dql, dsl)
                            : spec_of(m3s_config_minimax_m3(c[i].tp), 3, ql, sl);
    s.uniform = c[i].decode;
    s.act_dtype = c[i].act;
    s.kv_dtype = c[i].kv;
    s.scale_mode = c[i].scale;
    s.token_major = c[i].token_major;
    case_mods m = {c[i].mod, NULL, 0, 0};
    run_case(c[i].name, s, &m);
  }
}

static void test_guards(void) {
  static const int32_t ql[] = {3, 2, 4, 1}, ql1[] = {1, 1, 1, 1};
  static const int32_t sl[] = {3000, 2500, 2200, 2600};
  case_mods m = {guard_rows_host, guard_device, 1, 0};
  fx_spec s = spec_of(m3s_config_minimax_m3(2), 4, ql, sl);
  s.qsl_base = 4;
  run_case("guard_bad_pages_and_seq_lens_tp2", s, &m);
  fx_spec d = spec_of(m3s_config_minimax_m3(1), 4, ql1, sl);
  d.qsl_base = 4;
  run_case("guard_bad_pages_and_seq_lens_decode_q1_tp1", d, &m);
}

int main(void) {
  g_quick = gpu_env_flag("M3S_TEST_QUICK");
  g_time = gpu_env_flag("M3S_TEST_TIME");
  g_gpu = gpu_context_or_null();
  if (!g_gpu)
    return gpu_skip("test_gpu_attention", "no CUDA device");
  if (m3s_context_create(-1, &g_cpu) != M3S_OK) {
    fprintf(stderr, "cpu context: %s\n", m3s_last_error());
    m3s_context_destroy(g_gpu);
    return 1;
  }
  double t0 = gpu_now_ms();
  test_tp_decode();
  test_cluster_two();
  test_dtypes();
  test_q_beyond_f16();
  test_spec_decode_and_ragged();
  test_group_and_k();
  test_topk_forms();
  test_guards();
  test_large_logits();
  test_prefill();
  test_nan_past_len();
  test_long_decode();
  /* CUDA-graph capture: covered by tests/test_gpu_graph.c */
  if (gpu_sm_major() == 9 && test_unfiltered()) {
    CHECK(g_tma_cases > 0, "the sm_90 persistent attention kernel ran on some case");
    if (m3s_cuda_attention_clusters(g_gpu, 2) > 0)
      CHECK(g_cluster_cases > 0,
            "the persistent kernel merged its splits in a cluster on some case");
    else
      printf("test_gpu_attention: this device co-schedules no cluster of the persistent kernel: "
             "the cluster merge is not tested\n");
    CHECK(g_union_cases > 0, "the sm_90 union attention kernel ran on some case");
    CHECK(g_wgmma_cases > 0, "the union kernel's warpgroup consumers ran on some case");
    CHECK(g_union_fp8_cases > 0, "the union kernel's mma.sync consumers ran on an fp8 cache");
    CHECK(g_wgmma_fp8_cases > 0, "the union kernel's warpgroup consumers ran on an fp8 cache");
  }
  printf("test_gpu_attention: %d cases on the persistent kernel (%d with the cluster merge: %d "
         "/ %d / %d in clusters of 2 / 4 / 8), %d on the union kernel, %d on its warpgroup "
         "consumers (fp8 caches: %d / %d; and the generic one)\n",
         g_tma_cases, g_cluster_cases, g_cluster_size_cases[2], g_cluster_size_cases[4],
         g_cluster_size_cases[8], g_union_cases, g_wgmma_cases, g_union_fp8_cases,
         g_wgmma_fp8_cases);
  printf("test_gpu_attention: %.1f s%s\n", (gpu_now_ms() - t0) * 1e-3, g_quick ? " (quick)" : "");
  m3s_context_destroy(g_cpu);
  m3s_context_destroy(g_gpu);
  return TEST_FINISH();
}
