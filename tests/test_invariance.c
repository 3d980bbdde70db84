/* Bit-exact invariances of the whole layer step (index top-k + attention):
 *   - head-major cache == token-major cache
 *   - physical pages shuffled (caches and block tables permuted) == original
 *   - a decode token == the same token as a 1-token prefill
 *   - spec decode with q_len 4 == the 4 positions done as separate decodes,
 *     under M3S_OPT_BATCH_INVARIANT (CUDA: the default mode is reported)
 *   - chunked prefill (prefix, then chunk) == one-shot prefill
 *   - a request alone == the same request inside a larger batch (different
 *     num_tokens and max_seq_len), under M3S_OPT_BATCH_INVARIANT; on CUDA
 *     the test also reports whether the default mode differs (not promised)
 * Each compares top-k, output and lse bytes. Built twice: test_invariance
 * (CPU context) and, with M3S_INVARIANCE_GPU, test_gpu_invariance (CUDA
 * context; tests/CMakeLists.txt). */
#include "ref.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static m3s_context *g_ctx;

typedef struct {
  void *out;
  float *lse;
  int32_t *topk;
  size_t out_bytes, lse_bytes, topk_bytes;
} result;

static fx_spec spec(int tp, int nreq, const int32_t *ql, const int32_t *sl) {
  fx_spec s = fx_spec_default(m3s_config_minimax_m3(tp), nreq, ql, sl, 4242);
  s.extra_pages = 2;
  return s;
}

#ifdef M3S_INVARIANCE_GPU
/* The same invariances on a CUDA context: every run uploads the fixture and
 * the batch, runs on the device, and copies the rows it wrote back. */
#include "gpu_util.h"

static m3s_tensor dev_copy(const m3s_tensor *h, void **mem) {
  int64_t span = 1;
  for (int i = 0; i < h->ndim; i++)
    span += (h->shape[i] - 1) * h->stride[i];
  m3s_tensor d = *h;
  *mem = NULL;
  if (h->ndim < 0 || !h->data)
    return d;
  *mem = gpu_dup(h->data, (size_t)span * m3s_dtype_size(h->dtype));
  d.data = *mem;
  d.device = 0;
  return d;
}

static m3s_status run_rows_once(fixture *f, const m3s_batch *b, int row0, int decode) {
  gpu_fx g;
  m3s_status st = M3S_ERR_CUDA;
  void *mem[4] = {NULL, NULL, NULL, NULL};
  /* the device outputs start as the host's (poison, and the rows of earlier
   * chunks), so rows the step fails to write read back as poison, not as a
   * freed buffer's stale result of the run this one is compared with */
  if (!gpu_fx_upload(&g, f, g_ctx) || !gpu_fx_put_outputs(&g, f))
    goto done;
  m3s_batch db = *b;
  db.query_start_loc = dev_copy(&b->query_start_loc, &mem[0]);
  db.seq_lens = dev_copy(&b->seq_lens, &mem[1]);
  db.block_table = dev_copy(&b->block_table, &mem[2]);
  db.index_block_table = dev_copy(&b->index_block_table, &mem[3]);
  m3s_step step;
  memset(&step, 0, sizeof step);
  if (decode)
    step.decode = db;
  else
    step.prefill = db;
  int n = b->num_tokens;
  m3s_tensor q = m3s_tensor_narrow(&g.q_t, row0, n), iq = m3s_tensor_narrow(&g.iq_t, row0, n);
  m3s_tensor tk = m3s_tensor_narrow(&g.topk_t, row0, n), out = m3s_tensor_narrow(&g.out_t, row0, n);
  m3s_tensor lse = m3s_tensor_narrow(&g.lse_t, row0, n);
  st = m3s_step_forward(g_ctx, &f->cfg, &step, &q, &iq, &g.kv_t, &g.scales, &g.ic_t, &tk, &out,
                        &lse, &g.exec);
  if (st) {
    fprintf(stderr, "step: %s\n", m3s_last_error());
    goto done;
  }
  size_t orow = (size_t)f->cfg.num_q_heads * 128 * 2, lrow = (size_t)f->cfg.num_q_heads * 4;
  size_t trow = (size_t)f->cfg.num_kv_heads * f->cfg.topk * 4;
  if (!gpu_sync() ||
      !gpu_get((char *)f->out_mem + row0 * orow, (char *)g.out + row0 * orow, n * orow) ||
      !gpu_get((char *)f->lse_mem + row0 * lrow, (char *)g.lse + row0 * lrow, n * lrow) ||
      !gpu_get((char *)f->topk_mem + row0 * trow, (char *)g.topk + row0 * trow, n * trow))
    st = M3S_ERR_CUDA;
done:
  for (int i = 0; i < 4; i++)
    gpu_free(mem[i]);
  gpu_fx_free(&g);
  return st;
}
#else
/* Runs one step where batch `b` covers rows [row0, row0 + b.num_tokens) of the
 * fixture's tensors as a decode (decode != 0) or prefill part. */
static m3s_status run_rows_once(fixture *f, const m3s_batch *b, int row0, int decode) {
  m3s_step step;
  memset(&step, 0, sizeof step); /* the other part stays empty */
  if (decode)
    step.decode = *b;
  else
    step.prefill = *b;
  int n = b->num_tokens;
  m3s_tensor q = m3s_tensor_narrow(&f->q, row0, n), iq = m3s_tensor_narrow(&f->iq, row0, n);
  m3s_tensor tk = m3s_tensor_narrow(&f->topk, row0, n), out = m3s_tensor_narrow(&f->out, row0, n);
  m3s_tensor lse = m3s_tensor_narrow(&f->lse, row0, n);
  m3s_status st = m3s_step_forward(g_ctx, &f->cfg, &step, &q, &iq, &f->kv, &f->scales, &f->ic, &tk,
                                   &out, &lse, NULL);
  if (st)
    fprintf(stderr, "step: %s\n", m3s_last_error());
  return st;
}
#endif

/* One step over rows [row0, row0 + b.num_tokens), checked to have written
 * every element of them: two runs that both wrote nothing would otherwise
 * compare equal (poison against poison). */
static m3s_status run_rows(fixture *f, const m3s_batch *b, int row0, int decode) {
  m3s_status st = run_rows_once(f, b, row0, decode);
  if (st == M3S_OK)
    CHECK(fx_rows_written(f, row0, b->num_tokens), "the step wrote every element of its rows");
  return st;
}

static void save(const fixture *f, result *r) {
  r->out_bytes = (size_t)f->T * f->cfg.num_q_heads * 128 * 2;
  r->lse_bytes = (size_t)f->T * f->cfg.num_q_heads * 4;
  r->topk_bytes = (size_t)f->T * f->cfg.num_kv_heads * f->cfg.topk * 4;
  r->out = malloc(r->out_bytes);
  r->lse = malloc(r->lse_bytes);
  r->topk = malloc(r->topk_bytes);
  memcpy(r->out, f->out_mem, r->out_bytes);
  memcpy(r->lse, f->lse_mem, r->lse_bytes);
  memcpy(r->topk, f->topk_mem, r->topk_bytes);
}

static int same(const fixture *f, const result *r) {
  return memcmp(r->out, f->out_mem, r->out_bytes) == 0 &&
         memcmp(r->lse, f->lse_mem, r->lse_bytes) == 0 &&
         memcmp(r->topk, f->topk_mem, r->topk_bytes) == 0;
}

/* Rows [row0, row0 + n) of the fixture's outputs equal those rows of r. */
static int same_rows(const fixture *f, const result *r, int row0, int n) {
  size_t orow = r->out_bytes / (size_t)f->T, lrow = r->lse_bytes / (size_t)f->T;
  size_t trow = r->topk_bytes / (size_t)f->T;
  return memcmp((char *)r->out + row0 * orow, (char *)f->out_mem + row0 * orow, n * orow) == 0 &&
         memcmp((char *)r->lse + row0 * lrow, (char *)f->lse_mem + row0 * lrow, n * lrow) == 0 &&
         memcmp((char *)r->topk + row0 * trow, (char *)f->topk_mem + row0 * trow, n * trow) == 0;
}

static void drop(result *r) {
  free(r->out);
  free(r->lse);
  free(r->topk);
}

static void test_invariance_head_major_equals_token_major(void) {
  int32_t ql[] = {1, 1, 70};
  int32_t sl[] = {3100, 2200, 2500};
  fixture a, b;
  fx_spec s = spec(2, 3, ql, sl);
  fx_init(&a, &s);
  s.token_major = 1;
  fx_init(&b, &s);
  fx_poison(&a);
  fx_poison(&b);
  a.batch.uniform_q_len = 0;
  b.batch.uniform_q_len = 0;
  int ok = run_rows(&a, &a.batch, 0, 0) == M3S_OK && run_rows(&b, &b.batch, 0, 0) == M3S_OK;
  result ra;
  save(&a, &ra);
  CHECK(ok && same(&b, &ra), "invariance_head_major_cache_equals_token_major_cache");
  drop(&ra);
  fx_free(&a);
  fx_free(&b);
}

static void test_invariance_shuffled_pages(void) {
  int32_t ql[] = {1, 50};
  int32_t sl[] = {2900, 2400};
  fixture f;
  fx_spec s = spec(4, 2, ql, sl);
  fx_init(&f, &s);
  fx_poison(&f);
  int ok = run_rows(&f, &f.batch, 0, 0) == M3S_OK;
  result r0;
  save(&f, &r0);
  /* permute physical pages of both caches, rewrite the block tables */
  int64_t P = f.num_pages;
  int32_t *perm = malloc(sizeof(int32_t) * (size_t)P);
  for (int64_t p = 0; p < P; p++)
    perm[p] = (int32_t)((p * 7 + 3) % P);
  if (P % 7 == 0)
    for (int64_t p = 0; p < P; p++)
      perm[p] = (int32_t)(P - 1 - p);
  size_t kvp = (size_t)f.kv.stride[0] * 2, icp = 128 * 128 * 2;
  char *kv2 = malloc(kvp * (size_t)P), *ic2 = malloc(icp * (size_t)P);
  for (int64_t p = 0; p < P; p++) {
    memcpy(kv2 + kvp * (size_t)perm[p], (char *)f.kv_mem + kvp * (size_t)p, kvp);
    memcpy(ic2 + icp * (size_t)perm[p], (char *)f.ic_mem + icp * (size_t)p, icp);
  }
  memcpy(f.kv_mem, kv2, kvp * (size_t)P);
  memcpy(f.ic_mem, ic2, icp * (size_t)P);
  int64_t rs = f.batch.block_table.stride[0];
  for (int r = 0; r < 2; r++)
    for (int c = 0; c < f.max_pages; c++)
      if (f.bt[r * rs + c] >= 0) {
        f.bt[r * rs + c] = perm[f.bt[r * rs + c]];
        f.ibt[r * rs + c] = perm[f.ibt[r * rs + c]];
      }
  fx_poison(&f);
  ok = ok && run_rows(&f, &f.batch, 0, 0) == M3S_OK;
  CHECK(ok && same(&f, &r0), "invariance_shuffled_physical_pages_equal_original");
  drop(&r0);
  free(perm);
  free(kv2);
  free(ic2);
  fx_free(&f);
}

static void test_invariance_decode_equals_one_token_prefill(void) {
  int32_t ql[] = {1, 1, 1, 1};
  int32_t sl[] = {4097, 128, 129, 2000};
  fixture f;
  fx_spec s = spec(1, 4, ql, sl);
  s.uniform = 1;
  fx_init(&f, &s);
  fx_poison(&f);
  int ok = run_rows(&f, &f.batch, 0, 1) == M3S_OK;
  result r0;
  save(&f, &r0);
  m3s_batch pre = f.batch;
  pre.uniform_q_len = 0; /* the same requests through query_start_loc */
  fx_poison(&f);
  ok = ok && run_rows(&f, &pre, 0, 0) == M3S_OK;
  CHECK(ok && same(&f, &r0), "invariance_decode_token_equals_one_token_prefill");
  drop(&r0);
  fx_free(&f);
}

/* Spec decode with q_len 4 against the 4 positions as separate 1-token
 * decode requests. The two batches differ in max_q_len, a host bound: under
 * M3S_OPT_BATCH_INVARIANT the rows must keep their bits; in the default
 * mode CUDA may pick another attention kernel by max_q_len (the sm_90 TMA
 * kernel runs max_q_len 1 batches), so there it is reported, not checked
 * (the CPU keeps the bits in both modes). */
static int spec_vs_separate(int invariant, int *differs) {
  int32_t ql[] = {4};
  int32_t sl[] = {16 * 128 + 2}; /* the 4 positions straddle a block boundary */
  fixture f;
  fx_spec s = spec(2, 1, ql, sl);
  s.uniform = 1;
  fx_init(&f, &s);
  fx_poison(&f);
  int ok = m3s_context_set_option(g_ctx, M3S_OPT_BATCH_INVARIANT, invariant) == M3S_OK;
  ok = ok && run_rows(&f, &f.batch, 0, 1) == M3S_OK;
  result r0;
  save(&f, &r0);
  /* 4 single-token decode requests at positions s-4..s-1, sharing the table */
  int32_t seq4[4] = {sl[0] - 3, sl[0] - 2, sl[0] - 1, sl[0]};
  m3s_batch b = f.batch;
  int64_t four = 4;
  b.num_reqs = 4;
  b.uniform_q_len = 1;
  b.max_q_len = 1;
  b.seq_lens = m3s_tensor_make(seq4, M3S_I32, 1, &four, M3S_HOST);
  b.block_table.shape[0] = 4;
  b.block_table.stride[0] = 0;
  b.index_block_table.shape[0] = 4;
  b.index_block_table.stride[0] = 0;
  fx_poison(&f);
  ok = ok && run_rows(&f, &b, 0, 1) == M3S_OK;
  *differs = ok && !same(&f, &r0);
  ok = m3s_context_set_option(g_ctx, M3S_OPT_BATCH_INVARIANT, 0) == M3S_OK && ok;
  drop(&r0);
  fx_free(&f);
  return ok;
}

static void test_invariance_spec_decode_equals_separate_positions(void) {
  int differs = 1;
  int ok = spec_vs_separate(1, &differs);
  CHECK(ok && !differs,
        "invariance_spec_decode_qlen4_equals_four_separate_positions_when_batch_invariant");
  ok = spec_vs_separate(0, &differs);
  CHECK(ok, "spec_decode_default_mode_runs");
#ifndef M3S_INVARIANCE_GPU
  CHECK(!differs, "cpu_spec_decode_equals_separate_positions_in_default_mode");
#else
  if (ok && differs)
    printf("note: default mode, spec decode vs separate positions: last bits differ (another "
           "kernel for max_q_len 1; not promised)\n");
#endif
}

static void test_invariance_chunked_prefill_equals_one_shot(void) {
  int32_t N = 2600, N1 = 1000, N2 = 1900;
  int32_t ql[] = {N};
  int32_t sl[] = {N};
  fixture f;
  fx_spec s = spec(4, 1, ql, sl);
  fx_init(&f, &s);
  fx_poison(&f);
  int ok = run_rows(&f, &f.batch, 0, 0) == M3S_OK;
  result r0;
  save(&f, &r0);
  fx_poison(&f);
  /* three chunks: [0, N1), [N1, N2), [N2, N); later chunks pass a slice of
   * query_start_loc whose first entry is not 0 */
  int32_t bounds[4] = {0, N1, N2, N};
  for (int c = 0; c < 3 && ok; c++) {
    int32_t qsl[2] = {bounds[c], bounds[c + 1]};
    int32_t seq = bounds[c + 1];
    int64_t two = 2, one = 1;
    m3s_batch b = f.batch;
    b.num_tokens = bounds[c + 1] - bounds[c];
    b.max_q_len = b.num_tokens;
    b.query_start_loc = m3s_tensor_make(qsl, M3S_I32, 1, &two, M3S_HOST);
    b.seq_lens = m3s_tensor_make(&seq, M3S_I32, 1, &one, M3S_HOST);
    ok = run_rows(&f, &b, bounds[c], 0) == M3S_OK;
  }
  CHECK(ok && same(&f, &r0), "invariance_chunked_prefill_equals_one_shot_prefill");
  drop(&r0);
  fx_free(&f);
}

/* Same inputs, same bits, run after run (fixed reduction orders). */
static void test_invariance_repeatable(void) {
  int32_t ql[] = {1, 300};
  int32_t sl[] = {5000, 3000};
  fixture f;
  fx_spec s = spec(1, 2, ql, sl);
  fx_init(&f, &s);
  fx_poison(&f);
  int ok = run_rows(&f, &f.batch, 0, 0) == M3S_OK;
  result r0;
  save(&f, &r0);
  for (int i = 0; i < 2 && ok; i++) {
    fx_poison(&f);
    ok = run_rows(&f, &f.batch, 0, 0) == M3S_OK && same(&f, &r0);
  }
  CHECK(ok, "invariance_repeated_runs_bit_identical");
  drop(&r0);
  fx_free(&f);
}

/* Request 0 (decode, 5000 tokens) alone, then inside a batch with a
 * 400-token prefill request: its row must keep its bits. With batch
 * invariance off, CUDA splits the lone row's blocks (few CTAs) and not the
 * big batch's, so the bits may differ; that is reported, not checked. */
static int batch_alone_vs_mixed(int invariant, int *differs) {
  int32_t ql[] = {1, 400};
  int32_t sl[] = {5000, 7000};
  fixture f;
  fx_spec s = spec(2, 2, ql, sl);
  fx_init(&f, &s);
  fx_poison(&f);
  int ok = m3s_context_set_option(g_ctx, M3S_OPT_BATCH_INVARIANT, invariant) == M3S_OK;
  ok = ok && run_rows(&f, &f.batch, 0, 0) == M3S_OK;
  result mixed;
  save(&f, &mixed);
  m3s_batch alone = f.batch;
  alone.num_reqs = 1;
  alone.num_tokens = 1;
  alone.max_q_len = 1;
  alone.max_seq_len = sl[0];
  alone.query_start_loc.shape[0] = 2;
  alone.seq_lens.shape[0] = 1;
  alone.block_table.shape[0] = 1;
  alone.index_block_table.shape[0] = 1;
  fx_poison(&f);
  ok = ok && run_rows(&f, &alone, 0, 0) == M3S_OK;
  *differs = ok && !same_rows(&f, &mixed, 0, 1);
  /* reset even after a failure, so later tests run in the default mode */
  ok = m3s_context_set_option(g_ctx, M3S_OPT_BATCH_INVARIANT, 0) == M3S_OK && ok;
  drop(&mixed);
  fx_free(&f);
  return ok;
}

static void test_invariance_request_alone_equals_in_batch(void) {
  int differs = 1;
  int ok = batch_alone_vs_mixed(1, &differs);
  CHECK(ok && !differs, "invariance_request_alone_equals_request_in_batch_when_batch_invariant");
  ok = batch_alone_vs_mixed(0, &differs);
  CHECK(ok, "batch_composition_default_mode_runs");
#ifndef M3S_INVARIANCE_GPU
  CHECK(!differs, "cpu_request_alone_equals_request_in_batch_in_default_mode");
#endif
  printf("note: default mode, request alone vs in a batch: %s\n",
         differs ? "last bits differ (split-K chosen per launch; not promised)" : "bit-identical");
}

/* Runs one test when M3S_TEST_FILTER selects its name. */
static void run_test(const char *name, void (*fn)(void)) {
  if (test_selected(name))
    fn();
}

int main(void) {
#ifdef M3S_INVARIANCE_GPU
  if (!(g_ctx = gpu_context_or_null()))
    return gpu_skip("test_gpu_invariance", "no CUDA device");
#else
  if (m3s_context_create(-1, &g_ctx) != M3S_OK) {
    fprintf(stderr, "context: %s\n", m3s_last_error());
    return 1;
  }
#endif
  run_test("head_major_equals_token_major", test_invariance_head_major_equals_token_major);
  run_test("shuffled_pages", test_invariance_shuffled_pages);
  run_test("decode_equals_one_token_prefill", test_invariance_decode_equals_one_token_prefill);
  run_test("spec_decode_equals_separate_positions",
           test_invariance_spec_decode_equals_separate_positions);
  run_test("chunked_prefill_equals_one_shot", test_invariance_chunked_prefill_equals_one_shot);
  run_test("repeatable", test_invariance_repeatable);
  run_test("request_alone_equals_in_batch", test_invariance_request_alone_equals_in_batch);
  m3s_context_destroy(g_ctx);
  return TEST_FINISH();
}
