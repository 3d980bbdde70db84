/* The decode index top-k of the CUDA backend (src/cuda/topk_decode.cu: the
 * certified tensor-core streaming kernel and the exact streaming kernel)
 * against the CPU backend: m3s_index_topk on a CUDA context must give the
 * CPU's top-k bytes, entry for entry, on fresh random continuous inputs.
 *
 * Inputs are lean (no main cache, unlike tests/ref.h's fixtures, so 128
 * requests of up to 32K tokens stay cheap): one shared random index cache per
 * format, bf16 and e4m3, whose first pages hold NaN and +-Inf keys (page 0
 * all NaN), and per case random block tables over it, random queries and a
 * uniform decode batch. Each case runs the CPU (its result checked against
 * the fp64 brute force of tests/ref.c on 16 sampled rows, except where the
 * queries overflow fp32 or are all tiny), then the CUDA context three
 * ways with poisoned top-k rows and workspace, all of which must equal the
 * CPU: on the 16-byte aligned cache with the test hook decode_any
 * (src/cuda/sm90/topk_tc.h: the certified streaming kernel + certified
 * selection wherever they cover the case, q_len x Hkv <= 16, also below the
 * batch size where they are the default; the exact streaming kernel
 * otherwise; the certified pair count is printed and must be > 0 when the
 * certified path covers the case), the exact streaming kernel forced
 * through the hook (exact_only), and a copy of the
 * cache one element off 16-byte alignment (topk.cu's general score kernel,
 * which both streaming kernels decline there). Guard zones around every
 * device buffer catch stray writes.
 *
 * Cases: TP1 q_len 1 at 128 requests of 4K..32K with ragged seq_lens, one
 * 128K request, one of 200K (more candidates than the selection caches), a
 * skewed batch (one 128K request among 4K ones), q_len 2..8
 * at Hkv 1, 2, 4 (every pair-group width of the kernel), e4m3 caches, padded
 * requests, rows with nb <= K next to scored ones, a batch with nothing to
 * score, a max_seq_len bound above the batch, K = 64 and forced-block
 * variants, NaN/Inf keys, queries at the edges of the exact e4m3 range, over
 * a wide exponent range (with a zero row and a huge one) and all tiny (the
 * certified e4m3 kernel's fp16 scaling), and page ids out of range on the
 * device (the CPU sees NaN pages there, which score as the GPU's out-of-range
 * blocks do).
 *
 * M3S_TEST_QUICK=1 skips the large cases. */
#define _POSIX_C_SOURCE 199309L
#include "cuda/sm90/topk_tc.h"
#include "gpu_util.h"

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NAN_PAGE 0      /* every element NaN */
#define SPECIAL_PAGES 6 /* pages 0..5 hold NaN / Inf keys */

static m3s_context *g_cpu, *g_gpu;
static int g_quick;
static m3s_topk_tc_stats *g_stats; /* device counters of the certified selection */
/* pairs whose CTA-wide selection ranked by tournament / by radix select
 * (certified runs): both forms must have run */
static unsigned long long g_few_pairs, g_radix_pairs;
static unsigned long long g_tma_ctas; /* CTAs of the score kernel's TMA form (e4m3, sm_90) */
static uint64_t g_rng = 0x9e3779b97f4a7c15ull;

static uint64_t next_u64(void) {
  g_rng ^= g_rng >> 12;
  g_rng ^= g_rng << 25;
  g_rng ^= g_rng >> 27;
  return g_rng * 0x2545f4914f6cdd1dull;
}

/* A random continuous value in about (-2, 2) as bf16 bits (never NaN/Inf). */
static uint16_t rand_bf16(uint32_t x) {
  float f = (float)(int32_t)x * (1.0f / 1073741824.0f);
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return (uint16_t)(u >> 16);
}

/* +-2^e (1 + m / 128) as bf16 bits, e uniform in [e0, e1] (below 2^-126 a
 * subnormal, low bits cut). */
static uint16_t wide_bf16(int e0, int e1) {
  uint64_t x = next_u64();
  int e = e0 + (int)(x % (uint64_t)(e1 - e0 + 1));
  float f = ldexpf(1.0f + (float)((x >> 16) % 128) / 128.0f, e);
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return (uint16_t)((u >> 16) | (x >> 40 & 1 ? 0x8000u : 0u));
}

/* ---- the shared index caches ------------------------------------------- */

typedef struct {
  m3s_dtype dt;
  int64_t pages;
  size_t bytes;
  unsigned char *host;
  unsigned char *dev;     /* 16-byte aligned */
  unsigned char *dev_odd; /* buffer whose element 1 starts the misaligned copy */
} icache;

static icache g_bf16, g_e4m3;

static void put_elem(icache *c, int64_t page, int slot, int d, uint16_t bits) {
  int64_t i = (page * 128 + slot) * 128 + d;
  if (c->dt == M3S_BF16)
    ((uint16_t *)c->host)[i] = bits;
  else
    c->host[i] = (uint8_t)bits;
}

/* Pages 0..5: 0 all NaN; 1 key 3 all NaN, key 9 one NaN element; 2 +Inf
 * (bf16) / 448 (e4m3) in keys 0..5; 3 -Inf / -448 in every key's dim 7;
 * 4 +Inf and -Inf in one key (a NaN dot); 5 keys 100..127 NaN. */
static void special_pages(icache *c) {
  int bf = c->dt == M3S_BF16;
  uint16_t nan = bf ? 0x7FC0 : 0x7F, nnan = bf ? 0xFFC0 : 0xFF;
  uint16_t pinf = bf ? 0x7F80 : 0x7E, ninf = bf ? 0xFF80 : 0xFE;
  for (int j = 0; j < 128; j++)
    for (int d = 0; d < 128; d++)
      put_elem(c, NAN_PAGE, j, d, (j + d) & 1 ? nan : nnan);
  for (int d = 0; d < 128; d++)
    put_elem(c, 1, 3, d, nan);
  put_elem(c, 1, 9, 77, nnan);
  for (int j = 0; j < 6; j++)
    put_elem(c, 2, j, 5 * j + 1, pinf);
  for (int j = 0; j < 128; j++)
    put_elem(c, 3, j, 7, ninf);
  put_elem(c, 4, 50, 10, pinf);
  put_elem(c, 4, 50, 90, ninf);
  for (int j = 100; j < 128; j++)
    for (int d = 0; d < 128; d++)
      put_elem(c, 5, j, d, nan);
}

static int icache_init(icache *c, m3s_dtype dt, int64_t pages) {
  c->dt = dt;
  c->pages = pages;
  size_t es = dt == M3S_BF16 ? 2 : 1;
  c->bytes = (size_t)pages * 128 * 128 * es;
  c->host = malloc(c->bytes);
  if (!c->host)
    return 0;
  size_t n = c->bytes / es;
  if (dt == M3S_BF16) {
    uint16_t *h = (uint16_t *)c->host;
    for (size_t i = 0; i < n; i += 2) {
      uint64_t x = next_u64();
      h[i] = rand_bf16((uint32_t)x);
      h[i + 1] = rand_bf16((uint32_t)(x >> 32));
    }
  } else {
    for (size_t i = 0; i < n; i += 8) {
      uint64_t x = next_u64();
      for (int k = 0; k < 8; k++) {
        uint8_t b = (uint8_t)(x >> (8 * k));
        c->host[i + k] = (b & 0x7F) == 0x7F ? 0x00 : b; /* no NaN codes */
      }
    }
  }
  special_pages(c);
  c->dev = gpu_dup(c->host, c->bytes);
  c->dev_odd = gpu_dup(NULL, c->bytes + 16);
  return c->dev && c->dev_odd && gpu_put(c->dev_odd + es, c->host, c->bytes);
}

static void icache_free(icache *c) {
  gpu_free(c->dev);
  gpu_free(c->dev_odd);
  free(c->host);
}

/* ---- one case ------------------------------------------------------------ */

typedef struct {
  const char *name;
  m3s_layer_config cfg;
  int R, qlen;
  const int32_t *seq;    /* [R]; 0 = padded */
  int64_t max_seq_bound; /* batch max_seq_len (>= every seq); 0: the largest seq */
  icache *ic;
  int mods; /* MOD_* */
} dcase;

enum {
  MOD_OOR_PAGES = 1,  /* request 0's blocks 5 and 7 out of range on the device */
  MOD_NAN_TABLES = 2, /* every request's blocks 1..6 on the special pages */
  MOD_Q_EDGES = 4,    /* one query element of requests 1..6 at the edges of the
                         range where e4m3 products are exact (topk_decode.cu) */
  MOD_Q_WIDE = 8,     /* queries +-2^[-110, 13]; request 1's first row all zero,
                         request 2's with the largest finite bf16 */
  MOD_Q_TINY = 16     /* queries of odd requests bf16 subnormals, the others
                         about 1e-30 (the certified e4m3 kernel scales rows by
                         2^s into fp16's range: subnormals, flushes, s = 126) */
};

static int64_t blocks_of_seq(int32_t s) { return (s + 127) / 128; }

static long compare(const int32_t *want, const int32_t *got, size_t n, const char *what,
                    const char *name, int hkv, int k) {
  long bad = 0;
  for (size_t i = 0; i < n; i++)
    if (want[i] != got[i] && bad++ == 0)
      fprintf(stderr, "%s (%s): first mismatch at row %zu head %zu slot %zu: cpu %d, cuda %d\n",
              name, what, i / ((size_t)hkv * k), i / k % hkv, i % k, want[i], got[i]);
  if (bad)
    fprintf(stderr, "%s (%s): %ld of %zu entries differ\n", name, what, bad, n);
  return bad;
}

/* One CUDA run on the cache view `ic_view` (exact: the exact_only hook);
 * 1 when it ran and downloaded, with the certified path's counters in *st. */
static int run_gpu(const dcase *c, m3s_batch *db, const m3s_tensor *diq, const m3s_tensor *ic_view,
                   m3s_tensor *dtk, void *ws, size_t ws_bytes, int32_t *got, size_t n, int exact,
                   m3s_topk_tc_stats *st) {
  m3s_exec ex = {ws, ws_bytes, NULL};
  memset(st, 0, sizeof *st);
  int ok = cudaMemset(dtk->data, 0x7f, n * sizeof(int32_t)) == cudaSuccess &&
           (!ws || cudaMemset(ws, 0x7f, ws_bytes) == cudaSuccess) && /* S poison: 3.4e38 */
           gpu_put(g_stats, st, sizeof *st);
  if (!CHECK(ok, c->name))
    return 0;
  m3s_topk_tc_hooks h;
  memset(&h, 0, sizeof h);
  h.exact_only = exact;
  h.decode_any = !exact; /* the certified kernel wherever it covers the case */
  h.stats = g_stats;
  m3s_topk_tc_set_hooks(g_gpu, &h);
  m3s_status s = m3s_index_topk(g_gpu, &c->cfg, db, diq, ic_view, dtk, &ex);
  m3s_topk_tc_set_hooks(g_gpu, NULL);
  if (s != M3S_OK)
    fprintf(stderr, "%s: cuda m3s_index_topk: %s\n", c->name, m3s_last_error());
  ok = CHECK(s == M3S_OK, c->name) && CHECK(gpu_sync(), c->name) &&
       CHECK(gpu_get(got, dtk->data, n * sizeof(int32_t)), c->name) &&
       CHECK(gpu_get(st, g_stats, sizeof *st), c->name);
  return ok && gpu_guards_check();
}

/* The CPU expectation against the fp64 brute force of tests/ref.c on `rows`
 * sampled rows, through a fixture view of this test's lean inputs (the
 * reference reads the config, the rows' requests and positions, the index
 * block table, the index cache, the queries and the top-k). The caller
 * leaves out MOD_Q_WIDE (a row at the largest bf16 overflows fp32: no fp64
 * answer to within rounding) and MOD_Q_TINY (scores ~1e-28, under the
 * check's absolute tolerance: it could not fail). */
static void check_cpu_vs_fp64(const dcase *c, const m3s_batch *hb, uint16_t *iq, int32_t *seq,
                              int32_t *qsl, int32_t *tab, const m3s_tensor *htk, int rows) {
  fixture v;
  memset(&v, 0, sizeof v);
  int32_t *ql = malloc(sizeof(int32_t) * (size_t)c->R);
  if (!ql) {
    CHECK(0, "fp64 check: host memory");
    return;
  }
  for (int r = 0; r < c->R; r++)
    ql[r] = c->qlen;
  v.cfg = c->cfg;
  v.T = c->R * c->qlen;
  v.sp.num_reqs = c->R;
  v.sp.act_dtype = M3S_BF16;
  v.sp.idx_dtype = c->ic->dt;
  v.qlens = ql;
  v.seqlens = seq;
  v.qsl = qsl;
  v.ibt = tab;
  v.batch = *hb;
  v.ic_mem = c->ic->host;
  v.iq_mem = iq;
  v.topk = *htk;
  char name[160];
  snprintf(name, sizeof name, "%s: the CPU top-k vs fp64", c->name);
  check_topk_vs_fp64_rows(&v, name, rows);
  free(ql);
}

static void run_case(const dcase *c) {
  if (!test_selected(c->name))
    return;
  double t0 = gpu_now_ms();
  const m3s_layer_config *cfg = &c->cfg;
  int R = c->R, q = c->qlen, hkv = cfg->num_kv_heads, K = cfg->topk;
  int T = R * q;
  int64_t cols = 1, max_seq = 0;
  for (int r = 0; r < R; r++) {
    cols = blocks_of_seq(c->seq[r]) > cols ? blocks_of_seq(c->seq[r]) : cols;
    max_seq = c->seq[r] > max_seq ? c->seq[r] : max_seq;
  }
  if (c->max_seq_bound > max_seq)
    max_seq = c->max_seq_bound;
  int64_t stride = cols + 3;
  size_t n = (size_t)T * hkv * K;
  int32_t *seq = malloc(sizeof(int32_t) * (size_t)R), *qsl = malloc(sizeof(int32_t) * (R + 1));
  int32_t *tab = malloc(sizeof(int32_t) * (size_t)(R * stride));
  uint16_t *iq = malloc(sizeof(uint16_t) * (size_t)T * hkv * 128);
  int32_t *want = malloc(sizeof(int32_t) * n), *got = malloc(sizeof(int32_t) * n);
  for (int r = 0; r < R; r++) {
    seq[r] = c->seq[r];
    qsl[r] = r * q;
    for (int64_t b = 0; b < stride; b++) {
      int32_t page = (int32_t)(next_u64() % (uint64_t)c->ic->pages);
      if ((c->mods & MOD_NAN_TABLES) && b >= 1 && b <= SPECIAL_PAGES)
        page = (int32_t)(b - 1);
      tab[r * stride + b] = b < blocks_of_seq(seq[r]) ? page : -7;
    }
  }
  qsl[R] = R * q;
  if (c->mods & MOD_OOR_PAGES) /* the CPU reads NaN pages where the device finds ids out of range */
    tab[5] = tab[7] = NAN_PAGE;
  for (size_t i = 0; i < (size_t)T * hkv * 128; i++)
    iq[i] = rand_bf16((uint32_t)next_u64());
  if (c->mods & MOD_Q_EDGES) {
    /* bf16 bits: 2^119 and 2^-118 (outside: plain products), 2^-117 and
     * (2 - 2^-7) 2^118 (inside: FMA), NaN, the smallest subnormal */
    static const uint16_t edge[6] = {0x7B00, 0x0480, 0x0500, 0x7AFF, 0x7FC0, 0x0001};
    for (int r = 1; r <= 6 && r < R; r++)
      iq[(size_t)r * q * hkv * 128 + 37] = edge[r - 1];
  }
  if (c->mods & (MOD_Q_WIDE | MOD_Q_TINY)) {
    size_t per_req = (size_t)q * hkv * 128;
    for (size_t i = 0; i < (size_t)T * hkv * 128; i++) {
      if (c->mods & MOD_Q_WIDE)
        iq[i] = wide_bf16(-110, 13);
      else
        iq[i] = i / per_req & 1 ? wide_bf16(-133, -127) : wide_bf16(-105, -95);
    }
    if ((c->mods & MOD_Q_WIDE) && R > 2) {
      memset(iq + per_req, 0, 128 * sizeof(uint16_t));
      iq[2 * per_req + 50] = 0x7F7F;
    }
  }

  /* host views */
  int64_t rr = R, r1 = R + 1, tsh[2] = {R, cols}, tst[2] = {stride, 1};
  int64_t iqsh[3] = {T, hkv, 128}, icsh[3] = {c->ic->pages, 128, 128}, tks[3] = {T, hkv, K};
  m3s_batch hb;
  memset(&hb, 0, sizeof hb);
  hb.num_reqs = R;
  hb.num_tokens = T;
  hb.uniform_q_len = q;
  hb.max_q_len = q;
  hb.max_seq_len = max_seq;
  hb.query_start_loc = m3s_tensor_make(qsl, M3S_I32, 1, &r1, M3S_HOST);
  hb.seq_lens = m3s_tensor_make(seq, M3S_I32, 1, &rr, M3S_HOST);
  hb.block_table = m3s_tensor_strided(tab, M3S_I32, 2, tsh, tst, M3S_HOST);
  hb.index_block_table = hb.block_table;
  m3s_tensor hiq = m3s_tensor_make(iq, M3S_BF16, 3, iqsh, M3S_HOST);
  m3s_tensor hic = m3s_tensor_make(c->ic->host, c->ic->dt, 3, icsh, M3S_HOST);
  m3s_tensor htk = m3s_tensor_make(want, M3S_I32, 3, tks, M3S_HOST);
  memset(want, 0x7f, sizeof(int32_t) * n);
  double t1 = gpu_now_ms();
  m3s_status st = m3s_index_topk(g_cpu, cfg, &hb, &hiq, &hic, &htk, NULL);
  double t2 = gpu_now_ms();
  if (st != M3S_OK)
    fprintf(stderr, "%s: cpu m3s_index_topk: %s\n", c->name, m3s_last_error());
  CHECK(st == M3S_OK, c->name);
  if (st == M3S_OK && !(c->mods & (MOD_Q_WIDE | MOD_Q_TINY)))
    check_cpu_vs_fp64(c, &hb, iq, seq, qsl, tab, &htk, 16);

  /* device copies; the device table may hold ids out of range */
  if (c->mods & MOD_OOR_PAGES) {
    tab[5] = (int32_t)c->ic->pages + 1000;
    tab[7] = -3;
  }
  size_t ws_bytes = 0;
  CHECK(m3s_workspace_size(g_gpu, cfg, T, max_seq, &ws_bytes) == M3S_OK, c->name);
  int32_t *dseq = gpu_dup(seq, sizeof(int32_t) * (size_t)R);
  int32_t *dqsl = gpu_dup(qsl, sizeof(int32_t) * (size_t)(R + 1));
  int32_t *dtab = gpu_dup(tab, sizeof(int32_t) * (size_t)(R * stride));
  void *diqm = gpu_dup(iq, sizeof(uint16_t) * (size_t)T * hkv * 128);
  int32_t *dtkm = gpu_dup(NULL, sizeof(int32_t) * n);
  void *ws = ws_bytes ? gpu_dup(NULL, ws_bytes) : NULL;
  long bad_new = -1, bad_exact = -1, bad_old = -1;
  m3s_topk_tc_stats cs, xs, os_;
  memset(&cs, 0, sizeof cs);
  double t3 = 0, t4 = 0;
  /* the certified path covers q_len x Hkv <= 16 (bf16 queries, aligned cache)
   * and counts the pairs it selected for, those with nb > K */
  int covered = q * hkv <= 16, scored = 0;
  for (int r = 0; r < R; r++)
    scored |= c->seq[r] >= q && blocks_of_seq(c->seq[r]) > K;
  if (CHECK(st == M3S_OK && dseq && dqsl && dtab && diqm && dtkm && (ws || !ws_bytes), c->name)) {
    m3s_batch db = hb;
    db.query_start_loc = m3s_tensor_make(dqsl, M3S_I32, 1, &r1, 0);
    db.seq_lens = m3s_tensor_make(dseq, M3S_I32, 1, &rr, 0);
    db.block_table = m3s_tensor_strided(dtab, M3S_I32, 2, tsh, tst, 0);
    db.index_block_table = db.block_table;
    m3s_tensor diq = m3s_tensor_make(diqm, M3S_BF16, 3, iqsh, 0);
    m3s_tensor dtk = m3s_tensor_make(dtkm, M3S_I32, 3, tks, 0);
    m3s_tensor dic = m3s_tensor_make(c->ic->dev, c->ic->dt, 3, icsh, 0);
    m3s_tensor dodd =
        m3s_tensor_make(c->ic->dev_odd + (c->ic->dt == M3S_BF16 ? 2 : 1), c->ic->dt, 3, icsh, 0);
    t3 = gpu_now_ms();
    if (run_gpu(c, &db, &diq, &dic, &dtk, ws, ws_bytes, got, n, 0, &cs)) {
      t4 = gpu_now_ms();
      bad_new = compare(want, got, n, covered ? "certified streaming" : "exact streaming",
                        c->name, hkv, K);
      CHECK(bad_new == 0, c->name);
      if (covered && scored)
        CHECK(cs.pairs > 0, "the certified decode path ran");
      g_few_pairs += cs.few_pairs;
      g_radix_pairs += cs.radix_pairs;
      g_tma_ctas += cs.tma_ctas;
      if (c->ic->dt != M3S_E4M3)
        CHECK(cs.tma_ctas == 0, "a bf16 index cache: the score kernel's cp.async form ran");
      if (!covered)
        CHECK(cs.pairs == 0, "q_len x Hkv > 16: the exact path ran");
    }
    if (run_gpu(c, &db, &diq, &dic, &dtk, ws, ws_bytes, got, n, 1, &xs)) {
      bad_exact = compare(want, got, n, "exact streaming (hook)", c->name, hkv, K);
      CHECK(bad_exact == 0 && xs.pairs == 0, c->name);
    }
    if (run_gpu(c, &db, &diq, &dodd, &dtk, ws, ws_bytes, got, n, 0, &os_)) {
      bad_old = compare(want, got, n, "general score kernel", c->name, hkv, K);
      CHECK(bad_old == 0 && os_.pairs == 0, c->name);
    }
  }
  printf("  %-46s T %6d  ws %10zu B  cpu %8.1f ms  cuda %7.2f ms  certified pairs %6llu "
         "re-scored %7llu / %9llu  ranks few %u radix %u  (total %.0f ms)%s\n",
         c->name, T, ws_bytes, t2 - t1, t4 - t3, cs.pairs, cs.rescored, cs.candidates,
         cs.few_pairs, cs.radix_pairs, gpu_now_ms() - t0,
         bad_new || bad_exact || bad_old ? "  MISMATCH" : "");
  gpu_free(dseq);
  gpu_free(dqsl);
  gpu_free(dtab);
  gpu_free(diqm);
  gpu_free(dtkm);
  if (ws)
    gpu_free(ws);
  free(seq);
  free(qsl);
  free(tab);
  free(iq);
  free(want);
  free(got);
}

/* ---- cases ----------------------------------------------------------------- */

static m3s_layer_config cfg_k(int tp, int k, int init, int local) {
  m3s_layer_config c = m3s_config_minimax_m3(tp);
  c.topk = k;
  c.init_blocks = init;
  c.local_blocks = local;
  return c;
}

static int32_t g_seq[640];

/* seq_len of request b: from lo to hi by request, minus 37 b mod 128. */
static const int32_t *ragged(int R, int32_t lo, int32_t hi) {
  for (int b = 0; b < R; b++)
    g_seq[b] = lo + (int32_t)((int64_t)(hi - lo) * b / (R > 1 ? R - 1 : 1)) - (37 * b) % 128;
  return g_seq;
}

static void test_large(void) {
  if (g_quick)
    return;
  dcase c = {"tp1_q1_128_requests_4k_to_32k_ragged",
             m3s_config_minimax_m3(1),
             128,
             1,
             ragged(128, 4096, 32768),
             0,
             &g_bf16,
             0};
  run_case(&c);
  static const int32_t one[] = {131072};
  dcase c1 = {"tp1_q1_one_request_128k", m3s_config_minimax_m3(1), 1, 1, one, 0, &g_bf16, 0};
  run_case(&c1);
  /* more candidates than the CTA-wide selection caches in shared memory
   * (TC_SEL_CACHE 1024): its ranks and classes read the workspace */
  static const int32_t one200[] = {200000};
  dcase c1b = {"tp1_q1_one_request_200k", m3s_config_minimax_m3(1), 1, 1, one200, 0, &g_bf16, 0};
  run_case(&c1b);
  static const int32_t one77[] = {131072 - 77};
  dcase c2 = {
      "tp8_q1_one_request_128k_minus_77", m3s_config_minimax_m3(8), 1, 1, one77, 0, &g_bf16, 0};
  run_case(&c2);
  int32_t *s = (int32_t *)ragged(64, 4096, 4096);
  s[5] = 131072;
  dcase c3 = {
      "skewed_one_128k_among_63_of_4k_tp1", m3s_config_minimax_m3(1), 64, 1, s, 0, &g_bf16, 0};
  run_case(&c3);
  /* long pairs among short ones: q_len 4 with a ragged spread, e4m3 with two
   * long requests, every pair long with more pairs than SMs, one long request
   * among 127 (q_len 1 and 4). A batch whose longest context gives >= 512
   * candidates per pair (about 64K and up: the host bound from max_seq_len)
   * at up to four pairs per SM, or of at most two pairs per SM, takes the
   * CTA-wide selection at two CTAs per SM, as most of these do; the q_len 4
   * batch of 128 (2048 pairs at TP1) takes a warp per pair with its long
   * pairs' 1022 candidates, and test_gpu_topk_certified's ..._q5 case checks
   * that path's re-scores */
  dcase c5 = {"tp1_q4_12_requests_2k_to_70k", m3s_config_minimax_m3(1), 12, 4,
              ragged(12, 2048, 70000), 0, &g_bf16, 0};
  run_case(&c5);
  int32_t *s6 = (int32_t *)ragged(64, 4096, 4096);
  s6[9] = 90000;
  s6[40] = 60001;
  dcase c6 = {"e4m3_two_long_among_64_tp1", m3s_config_minimax_m3(1), 64, 1, s6, 0, &g_e4m3, 0};
  run_case(&c6);
  dcase c7 = {"tp1_q1_64_requests_40k_to_70k", m3s_config_minimax_m3(1), 64, 1,
              ragged(64, 40000, 70000), 0, &g_bf16, 0};
  run_case(&c7);
  int32_t *s8 = (int32_t *)ragged(128, 4096, 4096);
  s8[77] = 131072;
  dcase c8 = {"skewed_one_128k_among_127_of_4k_tp1", m3s_config_minimax_m3(1), 128, 1, s8, 0,
              &g_bf16, 0};
  run_case(&c8);
  dcase c9 = {"skewed_one_128k_among_127_of_4k_tp1_q4", m3s_config_minimax_m3(1), 128, 4, s8, 0,
              &g_bf16, 0};
  run_case(&c9);
  dcase c4 = {"e4m3_tp1_q1_64_requests_4k_to_32k",
              m3s_config_minimax_m3(1),
              64,
              1,
              ragged(64, 4096, 32768),
              0,
              &g_e4m3,
              0};
  run_case(&c4);
}

static void test_qlen_and_heads(void) {
  static const struct {
    int tp, q;
    m3s_dtype dt;
  } v[] = {{1, 4, M3S_BF16}, {1, 8, M3S_BF16}, {2, 1, M3S_BF16}, {2, 3, M3S_BF16},
           {8, 1, M3S_BF16}, {8, 2, M3S_BF16}, {8, 5, M3S_BF16}, {4, 8, M3S_BF16},
           {1, 4, M3S_E4M3}, {2, 2, M3S_E4M3}, {8, 1, M3S_E4M3}, {1, 1, M3S_E4M3}};
  for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
    char name[80];
    int R = g_quick ? 6 : 24;
    snprintf(name, sizeof name, "tp%d_q%d_%s_%d_requests_ragged_with_padding", v[i].tp, v[i].q,
             v[i].dt == M3S_BF16 ? "bf16" : "e4m3", R);
    int32_t *s = (int32_t *)ragged(R, 2100, g_quick ? 9000 : 20000);
    s[2] = 0; /* padded */
    s[R - 1] = 0;
    dcase c = {name, m3s_config_minimax_m3(v[i].tp),          R, v[i].q, s,
               0,    v[i].dt == M3S_BF16 ? &g_bf16 : &g_e4m3, 0};
    run_case(&c);
  }
}

static void test_short_and_bounds(void) {
  /* nb <= K rows (K = 16: seq <= 2048) next to scored ones, q_len 4 rows
   * straddling block boundaries, a padded request */
  static const int32_t mix[] = {4, 5, 127, 128, 129, 2047, 2048, 2049, 2052, 0, 2176, 5000};
  dcase c = {
      "nb_le_k_rows_beside_scored_rows_q4", m3s_config_minimax_m3(1), 12, 4, mix, 0, &g_bf16, 0};
  run_case(&c);
  dcase c1 = {"nb_le_k_rows_beside_scored_rows_q1_e4m3",
              m3s_config_minimax_m3(2),
              12,
              1,
              mix,
              0,
              &g_e4m3,
              0};
  run_case(&c1);
  static const int32_t few[] = {5, 2048, 0, 1000};
  dcase c2 = {"nothing_to_score_all_nb_le_k", m3s_config_minimax_m3(1), 4, 1, few, 0, &g_bf16, 0};
  run_case(&c2);
  /* more requests than the score kernels' CTA (256 threads) scans at a
   * time when they cut the batch's blocks into one range per CTA, with
   * padded requests and (up to request 548) nb <= K ones, which have no
   * candidate blocks, between scored ones */
  for (int r = 0; r < 600; r++)
    g_seq[r] = r % 5 == 0 ? 0 : r % 5 == 1 ? 1500 + r : 2100 + (r * 97) % 6000;
  dcase c4 = {"600_requests_padded_and_nb_le_k_between_scored_tp1", m3s_config_minimax_m3(1),
              600, 1, g_seq, 0, &g_bf16, 0};
  run_case(&c4);
  /* the same with forced leading blocks: candidates start at init, so each
   * range start is an offset past them */
  dcase c4i = {"600_requests_padded_and_nb_le_k_between_scored_init2_local1_tp1",
               cfg_k(1, 16, 2, 1), 600, 1, g_seq, 0, &g_bf16, 0};
  run_case(&c4i);
  for (int r = 0; r < 300; r++)
    g_seq[r] = r % 7 == 3 ? 0 : 2050 + (r * 131) % 9000;
  dcase c5 = {"300_requests_some_padded_e4m3_tp2_q2", m3s_config_minimax_m3(2), 300, 2, g_seq, 0,
              &g_e4m3, 0};
  run_case(&c5);
  static const int32_t small[] = {3000, 9000, 0, 2100};
  dcase c3 = {
      "max_seq_len_bound_64k_above_9000", m3s_config_minimax_m3(1), 4, 2, small, 65536, &g_bf16, 0};
  run_case(&c3);
}

static void test_k_and_forced(void) {
  static const struct {
    int k, init, local;
  } v[] = {{64, 0, 1}, {64, 4, 2}, {32, 2, 3}, {16, 0, 0}, {1, 0, 0}, {8, 3, 5}};
  int32_t *s = (int32_t *)ragged(16, 9000, g_quick ? 12000 : 40000);
  s[3] = 0;
  for (size_t i = 0; i < sizeof v / sizeof v[0]; i++) {
    char name[80];
    snprintf(name, sizeof name, "k%d_init%d_local%d_tp2_q2", v[i].k, v[i].init, v[i].local);
    dcase c = {name, cfg_k(2, v[i].k, v[i].init, v[i].local), 16, 2, s, 0, &g_bf16, 0};
    run_case(&c);
  }
}

/* The case on the bf16 and on the e4m3 index cache: "<stem>_bf16<tail>"
 * and "<stem>_e4m3<tail>". */
static void run_both_formats(const char *stem, const char *tail, m3s_layer_config cfg, int R,
                             int qlen, const int32_t *seq, int mods) {
  for (int e4 = 0; e4 < 2; e4++) {
    char name[96];
    snprintf(name, sizeof name, "%s_%s%s", stem, e4 ? "e4m3" : "bf16", tail);
    dcase c = {name, cfg, R, qlen, seq, 0, e4 ? &g_e4m3 : &g_bf16, mods};
    run_case(&c);
  }
}

static void test_nan_inf_and_guards(void) {
  int32_t *s = (int32_t *)ragged(8, 1500, 6000);
  run_both_formats("nan_inf_keys", "_tp1_q3", cfg_k(1, 4, 0, 1), 8, 3, s, MOD_NAN_TABLES);
  dcase k1 = {
      "nan_inf_keys_k1_no_forced_tp8_q1", cfg_k(8, 1, 0, 0), 8, 1, s, 0, &g_bf16, MOD_NAN_TABLES};
  run_case(&k1);
  run_both_formats("query_range_edges", "_tp1_q2", m3s_config_minimax_m3(1), 8, 2, s, MOD_Q_EDGES);
  run_both_formats("wide_exponent_queries", "_tp2_q2", m3s_config_minimax_m3(2), 8, 2, s,
                   MOD_Q_WIDE);
  run_both_formats("tiny_queries", "_tp1_q1", m3s_config_minimax_m3(1), 8, 1, s, MOD_Q_TINY);
  s = (int32_t *)ragged(8, 6000, 1500); /* request 0 (the bad ids) has 47 blocks */
  run_both_formats("page_ids_out_of_range_score_nan", "", m3s_config_minimax_m3(1), 8, 2, s,
                   MOD_OOR_PAGES);
}

int main(void) {
  g_quick = gpu_env_flag("M3S_TEST_QUICK");
  /* the probe tells a machine without a GPU (skip) from a broken one (fail) */
  g_gpu = gpu_context_or_null();
  if (!g_gpu)
    return gpu_skip("test_gpu_topk_decode", "no CUDA device");
  if (m3s_context_create(-1, &g_cpu) != M3S_OK) {
    fprintf(stderr, "cpu context: %s\n", m3s_last_error());
    m3s_context_destroy(g_gpu);
    return 1;
  }
  g_stats = gpu_dup(NULL, sizeof *g_stats);
  double t0 = gpu_now_ms();
  /* 4096 pages each (128 MiB bf16): block tables draw pages at random, with
   * repeats, so the cache need not hold every request's pages */
  int64_t pages = g_quick ? 512 : 4096;
  int ok = CHECK(g_stats != NULL, "stats buffer") &&
           CHECK(icache_init(&g_bf16, M3S_BF16, pages), "bf16 index cache") &&
           CHECK(icache_init(&g_e4m3, M3S_E4M3, pages), "e4m3 index cache");
  printf("  caches ready in %.0f ms\n", gpu_now_ms() - t0);
  if (ok) {
    test_short_and_bounds();
    test_nan_inf_and_guards();
    test_k_and_forced();
    test_qlen_and_heads();
    test_large();
  }
  icache_free(&g_bf16);
  icache_free(&g_e4m3);
  gpu_free(g_stats);
  /* the K = 16 / 32 cases rank by tournament, the K = 64 ones (and the 200K
   * request, full mode) by radix select; a filtered run may take neither */
  if (ok && test_unfiltered()) {
    CHECK(g_few_pairs > 0, "the CTA-wide selection ranked pairs by tournament (tc_wide_few)");
    CHECK(g_radix_pairs > 0, "the CTA-wide selection ranked pairs by radix select (tc_wide_ranks)");
    if (gpu_sm_major() == 9)
      CHECK(g_tma_ctas > 0, "the e4m3 cases took the decode score kernel's TMA form (sm_90)");
  }
  printf("test_gpu_topk_decode: CTA-wide selection ranks: %llu pairs by tournament, %llu by radix "
         "select; %llu CTAs of the score kernel's TMA form\n",
         g_few_pairs, g_radix_pairs, g_tma_ctas);
  printf("test_gpu_topk_decode: %.1f s%s\n", (gpu_now_ms() - t0) * 1e-3, g_quick ? " (quick)" : "");
  m3s_context_destroy(g_cpu);
  m3s_context_destroy(g_gpu);
  return TEST_FINISH();
}
