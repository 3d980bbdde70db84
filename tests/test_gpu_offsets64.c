/* GPU test: element and byte offsets beyond 2^31 and 2^32 in every CUDA op
 * that addresses a cache (issue 5, "all index arithmetic that can exceed 2^31
 * done in 64 bits").
 *
 * A normal fixture (TP1: Hq 64, Hkv 4, K 16; a decode request and a 200-row
 * prefill chunk) runs index top-k, attention, and the k2q path (CSR, k2q
 * attention, combine) on the GPU with its small caches. Then every cache page
 * p is copied to a far page of large caches:
 *   main cache  page 16384 + p (even p) and 32768 + p (odd p): with Hkv 4 a
 *               page is 2^17 elements, so offsets start at 2^31 and 2^32
 *               elements (2^32 / 2^33 bytes for bf16);
 *   index cache page 131072 + p: offsets from 2^31 elements.
 * Pages [0, P) of the large caches hold 0x7F bytes (bf16 3.4e38, e4m3 NaN),
 * so an offset wrapped modulo 2^32 reads garbage instead of the data. With the block tables
 * remapped, every output must be bit-identical to the small run, and top-k
 * must equal the CPU backend's. Inserts (i64 slots into the main cache, i32
 * slots into the index cache) write tokens to far pages; the written pages
 * must equal the same inserts into the small caches.
 * Variants: bf16 head-major main cache + bf16 index (8 GiB + 4 GiB), e4m3
 * token-major main cache with a scalar scale + e4m3 index (4 GiB + 2 GiB).
 * Exit 77 (skip) without a GPU, or when the device has too little memory. */
#include "gpu_util.h"

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define KV_FAR_EVEN 16384
#define KV_FAR_ODD 32768
#define IC_FAR 131072
#define INSERT_T 16

static m3s_context *g_gpu, *g_cpu;

static int64_t far_kv(int64_t p) { return (p & 1) ? KV_FAR_ODD + p : KV_FAR_EVEN + p; }
static int64_t far_ic(int64_t p) { return IC_FAR + p; }

typedef struct {
  void *topk, *out, *lse, *out_k2q;
  size_t topk_bytes, out_bytes, lse_bytes;
} results;

static void results_alloc(results *r, const fixture *f) {
  r->topk_bytes = sizeof(int32_t) * (size_t)f->T * f->cfg.num_kv_heads * f->cfg.topk;
  r->out_bytes = (size_t)f->T * f->cfg.num_q_heads * 128 * 2;
  r->lse_bytes = sizeof(float) * (size_t)f->T * f->cfg.num_q_heads;
  r->topk = malloc(r->topk_bytes);
  r->out = malloc(r->out_bytes);
  r->lse = malloc(r->lse_bytes);
  r->out_k2q = malloc(r->out_bytes);
}

static void results_free(results *r) {
  free(r->topk);
  free(r->out);
  free(r->lse);
  free(r->out_k2q);
}

/* Device buffers of the k2q path: CSR arrays and per-slot partials. */
typedef struct {
  void *rp, *qi, *qs, *qc, *po, *pl;
  m3s_tensor rp_t, qi_t, qs_t, qc_t, po_t, pl_t;
} k2q_bufs;

static m3s_tensor dev_tensor(void *d, m3s_dtype dt, int nd, const int64_t *shape) {
  return m3s_tensor_make(d, dt, nd, shape, 0);
}

static int k2q_alloc(k2q_bufs *k, const fixture *f) {
  k2q_shapes s;
  memset(k, 0, sizeof *k);
  /* the row count comes from the host copy of the batch */
  if (!fx_k2q_shapes(g_cpu, f, &s))
    return 0;
  k->rp = gpu_dup(NULL, sizeof(int32_t) * (size_t)shape_elems(2, s.row_ptr));
  k->qi = gpu_dup(NULL, sizeof(int32_t) * (size_t)shape_elems(2, s.q_idx));
  k->qs = gpu_dup(NULL, sizeof(int32_t) * (size_t)shape_elems(2, s.q_idx));
  k->qc = gpu_dup(NULL, sizeof(int32_t) * (size_t)shape_elems(2, s.q_cnt));
  k->po = gpu_dup(NULL, sizeof(float) * (size_t)shape_elems(4, s.part_out));
  k->pl = gpu_dup(NULL, sizeof(float) * (size_t)shape_elems(3, s.part_lse));
  k->rp_t = dev_tensor(k->rp, M3S_I32, 2, s.row_ptr);
  k->qi_t = dev_tensor(k->qi, M3S_I32, 2, s.q_idx);
  k->qs_t = dev_tensor(k->qs, M3S_I32, 2, s.q_idx);
  k->qc_t = dev_tensor(k->qc, M3S_I32, 2, s.q_cnt);
  k->po_t = dev_tensor(k->po, M3S_F32, 4, s.part_out);
  k->pl_t = dev_tensor(k->pl, M3S_F32, 3, s.part_lse);
  /* NaN partials: a slot below q_counts (the slots the combine reads) that the
   * k2q kernel leaves unwritten poisons the result */
  return k->rp && k->qi && k->qs && k->qc && k->po && k->pl &&
         cudaMemset(k->po, 0xFF, sizeof(float) * (size_t)shape_elems(4, s.part_out)) ==
             cudaSuccess &&
         cudaMemset(k->pl, 0xFF, sizeof(float) * (size_t)shape_elems(3, s.part_lse)) == cudaSuccess;
}

static void k2q_free(k2q_bufs *k) {
  gpu_free(k->rp);
  gpu_free(k->qi);
  gpu_free(k->qs);
  gpu_free(k->qc);
  gpu_free(k->po);
  gpu_free(k->pl);
}

/* Prints the library's error text when st is not M3S_OK. */
static int ok_or_say(m3s_status st, const char *what) {
  if (st != M3S_OK)
    fprintf(stderr, "%s: %s\n", what, m3s_last_error());
  return st == M3S_OK;
}

/* Top-k, attention and the k2q path on the device caches kv / ic; results
 * downloaded into r. Outputs are poisoned before the run. */
static int run_ops(fixture *f, gpu_fx *g, const m3s_tensor *kv, const m3s_tensor *ic, results *r) {
  k2q_bufs k;
  int ok = gpu_fx_poison(g, f) && k2q_alloc(&k, f);
  ok =
      ok && ok_or_say(m3s_index_topk(g_gpu, &f->cfg, &g->batch, &g->iq_t, ic, &g->topk_t, &g->exec),
                      "m3s_index_topk");
  ok = ok && ok_or_say(m3s_sparse_attention(g_gpu, &f->cfg, &g->batch, &g->q_t, kv, &g->scales,
                                            &g->topk_t, &g->out_t, &g->lse_t, &g->exec),
                       "m3s_sparse_attention");
  ok = ok && gpu_fx_download(g, f);
  if (ok) {
    memcpy(r->topk, f->topk_mem, r->topk_bytes);
    memcpy(r->out, f->out_mem, r->out_bytes);
    memcpy(r->lse, f->lse_mem, r->lse_bytes);
  }
  /* out holds the attention's result: NaN again (0xFFFF in bf16), so the k2q
   * path's out is the combine's and not the attention's left over */
  ok = ok && cudaMemset(g->out, 0xFF, r->out_bytes) == cudaSuccess;
  ok = ok && ok_or_say(m3s_build_k2q_csr(g_gpu, &f->cfg, &g->batch, &g->topk_t, &k.rp_t, &k.qi_t,
                                         &k.qs_t, &k.qc_t, &g->exec),
                       "m3s_build_k2q_csr");
  ok = ok && ok_or_say(m3s_k2q_attention(g_gpu, &f->cfg, &g->batch, &g->q_t, kv, &g->scales,
                                         &k.rp_t, &k.qi_t, &k.qs_t, &k.po_t, &k.pl_t, &g->exec),
                       "m3s_k2q_attention");
  ok = ok && ok_or_say(m3s_combine_partials(g_gpu, &f->cfg, &k.po_t, &k.pl_t, &k.qc_t, &g->out_t,
                                            NULL, &g->exec),
                       "m3s_combine_partials");
  ok = ok && gpu_sync() && gpu_guards_check() && gpu_get(r->out_k2q, g->out, r->out_bytes);
  k2q_free(&k);
  return ok;
}

static size_t kv_page_bytes(const fixture *f) {
  return (size_t)f->kv.stride[0] * m3s_dtype_size(f->kv.dtype);
}
static size_t ic_page_bytes(const fixture *f) {
  return (size_t)f->ic.stride[0] * m3s_dtype_size(f->ic.dtype);
}

/* A large cache: pages [0, P) 0x7F bytes, page p of the small cache copied to
 * far(p). Returns the device view (the small view with the new page count). */
static void *make_far_cache(const m3s_tensor *small_host, const m3s_tensor *small_dev, int64_t P,
                            int64_t pages, size_t page_bytes, int64_t (*far)(int64_t),
                            m3s_tensor *out_view) {
  void *d = gpu_dup(NULL, (size_t)pages * page_bytes);
  if (!d)
    return NULL;
  int ok = cudaMemset(d, 0x7F, (size_t)P * page_bytes) == cudaSuccess;
  for (int64_t p = 0; ok && p < P; p++)
    ok = gpu_put((char *)d + (size_t)far(p) * page_bytes,
                 (const char *)small_host->data + (size_t)p * page_bytes, page_bytes);
  if (!ok) {
    gpu_free(d);
    return NULL;
  }
  *out_view = *small_dev;
  out_view->data = d;
  out_view->shape[0] = pages;
  return d;
}

/* Block tables with every page id sent through far(). */
static int upload_far_tables(const fixture *f, gpu_fx *g) {
  size_t n = (size_t)(f->sp.num_reqs * f->batch.block_table.stride[0]);
  int32_t *bt = malloc(sizeof(int32_t) * n), *ibt = malloc(sizeof(int32_t) * n);
  for (size_t i = 0; i < n; i++) {
    bt[i] = f->bt[i] >= 0 ? (int32_t)far_kv(f->bt[i]) : f->bt[i];
    ibt[i] = f->ibt[i] >= 0 ? (int32_t)far_ic(f->ibt[i]) : f->ibt[i];
  }
  int ok = gpu_put(g->bt, bt, sizeof(int32_t) * n) && gpu_put(g->ibt, ibt, sizeof(int32_t) * n);
  free(bt);
  free(ibt);
  return ok;
}

/* INSERT_T tokens into pages of the fixture's first request, into the small
 * caches (slots p*128+o) and the large ones (far(p)*128+o); the touched pages
 * must be byte-identical afterwards. */
static void check_inserts(const fixture *f, gpu_fx *g, m3s_tensor *big_kv, m3s_tensor *big_ic,
                          const char *name) {
  int hkv = f->cfg.num_kv_heads;
  uint64_t rng = 99;
  size_t kn = (size_t)INSERT_T * hkv * 128;
  uint16_t *k = malloc(2 * kn), *v = malloc(2 * kn), *ik = malloc(2 * (size_t)INSERT_T * 128);
  for (size_t i = 0; i < kn; i++) {
    store_elem(k, M3S_BF16, (int64_t)i, rng_normal(&rng) * 2.0f);
    store_elem(v, M3S_BF16, (int64_t)i, rng_normal(&rng) * 2.0f);
  }
  for (size_t i = 0; i < (size_t)INSERT_T * 128; i++)
    store_elem(ik, M3S_BF16, (int64_t)i, rng_normal(&rng));
  int64_t small_kv[INSERT_T], big_kv_s[INSERT_T], page[INSERT_T];
  int32_t small_ic[INSERT_T], big_ic_s[INSERT_T];
  for (int i = 0; i < INSERT_T; i++) {
    page[i] = f->bt[i % 8];
    int64_t o = (37 * i + 5) % 128;
    small_kv[i] = page[i] * 128 + o;
    big_kv_s[i] = far_kv(page[i]) * 128 + o;
    small_ic[i] = (int32_t)(f->ibt[i % 8] * 128 + o);
    big_ic_s[i] = (int32_t)(far_ic(f->ibt[i % 8]) * 128 + o);
  }
  int64_t ksh[3] = {INSERT_T, hkv, 128}, ish[2] = {INSERT_T, 128}, tsh[1] = {INSERT_T};
  void *dk = gpu_dup(k, 2 * kn), *dv = gpu_dup(v, 2 * kn), *dik = gpu_dup(ik, 2 * INSERT_T * 128);
  void *dsk = gpu_dup(small_kv, sizeof small_kv), *dbk = gpu_dup(big_kv_s, sizeof big_kv_s);
  void *dsi = gpu_dup(small_ic, sizeof small_ic), *dbi = gpu_dup(big_ic_s, sizeof big_ic_s);
  int ok = dk && dv && dik && dsk && dbk && dsi && dbi;
  m3s_tensor kt = dev_tensor(dk, M3S_BF16, 3, ksh), vt = dev_tensor(dv, M3S_BF16, 3, ksh);
  m3s_tensor ikt = dev_tensor(dik, M3S_BF16, 2, ish);
  m3s_tensor sk = dev_tensor(dsk, M3S_I64, 1, tsh), bk = dev_tensor(dbk, M3S_I64, 1, tsh);
  m3s_tensor si = dev_tensor(dsi, M3S_I32, 1, tsh), bi = dev_tensor(dbi, M3S_I32, 1, tsh);
  ok = ok && m3s_cache_insert(g_gpu, &kt, &vt, &sk, &g->kv_t, &g->scales, &g->exec) == M3S_OK &&
       m3s_cache_insert(g_gpu, &kt, &vt, &bk, big_kv, &g->scales, &g->exec) == M3S_OK &&
       m3s_index_cache_insert(g_gpu, &ikt, &si, &g->ic_t, &g->exec) == M3S_OK &&
       m3s_index_cache_insert(g_gpu, &ikt, &bi, big_ic, &g->exec) == M3S_OK && gpu_sync() &&
       gpu_guards_check();
  if (!ok)
    fprintf(stderr, "%s: inserts: %s\n", name, m3s_last_error());
  size_t kp = kv_page_bytes(f), ip = ic_page_bytes(f);
  char *a = malloc(kp), *b = malloc(kp);
  /* equal pages, and the inserts landed: each touched small page differs
   * from the fixture's original (so two skipped inserts cannot pass) */
  int same_kv = ok, same_ic = ok;
  for (int i = 0; ok && i < INSERT_T; i++) {
    same_kv &= gpu_get(a, (char *)g->kv + (size_t)page[i] * kp, kp) &&
               memcmp(a, (const char *)f->kv_mem + (size_t)page[i] * kp, kp) != 0 &&
               gpu_get(b, (char *)big_kv->data + (size_t)far_kv(page[i]) * kp, kp) &&
               memcmp(a, b, kp) == 0;
    int64_t ipg = f->ibt[i % 8];
    same_ic &= gpu_get(a, (char *)g->ic + (size_t)ipg * ip, ip) &&
               memcmp(a, (const char *)f->ic_mem + (size_t)ipg * ip, ip) != 0 &&
               gpu_get(b, (char *)big_ic->data + (size_t)far_ic(ipg) * ip, ip) &&
               memcmp(a, b, ip) == 0;
  }
  char msg[160];
  snprintf(msg, sizeof msg, "%s: cache_insert (i64 slots from 2^21) landed, pages equal", name);
  CHECK(same_kv, msg);
  snprintf(msg, sizeof msg, "%s: index_cache_insert (i32 slots from 2^24) landed, pages equal",
           name);
  CHECK(same_ic, msg);
  free(a);
  free(b);
  free(k);
  free(v);
  free(ik);
  gpu_free(dk);
  gpu_free(dv);
  gpu_free(dik);
  gpu_free(dsk);
  gpu_free(dbk);
  gpu_free(dsi);
  gpu_free(dbi);
}

static void run_variant(const char *name, m3s_dtype kv_dt, m3s_dtype idx_dt, int token_major) {
  if (!test_selected(name)) /* M3S_TEST_FILTER: one variant per racecheck run */
    return;
  static const int32_t ql[] = {1, 200};
  static const int32_t sl[] = {3000, 2300};
  fx_spec s = fx_spec_default(m3s_config_minimax_m3(1), 2, ql, sl, 6464);
  s.kv_dtype = kv_dt;
  s.idx_dtype = idx_dt;
  s.token_major = token_major;
  s.scale_mode = kv_dt == M3S_BF16 ? 0 : 1;
  fixture f;
  fx_init(&f, &s);
  fx_poison(&f);
  char msg[200];
  /* the CPU backend's top-k and attention: the reference of the small run */
  int ok = ok_or_say(m3s_index_topk(g_cpu, &f.cfg, &f.batch, &f.iq, &f.ic, &f.topk, NULL),
                     "cpu m3s_index_topk") &&
           ok_or_say(m3s_sparse_attention(g_cpu, &f.cfg, &f.batch, &f.q, &f.kv, &f.scales, &f.topk,
                                          &f.out, &f.lse, NULL),
                     "cpu m3s_sparse_attention");
  results cpu, small, big;
  results_alloc(&cpu, &f);
  results_alloc(&small, &f);
  results_alloc(&big, &f);
  memcpy(cpu.topk, f.topk_mem, cpu.topk_bytes);
  memcpy(cpu.out, f.out_mem, cpu.out_bytes);
  gpu_fx g;
  memset(&g, 0, sizeof g);
  ok = ok && gpu_fx_upload(&g, &f, g_gpu);
  ok = ok && run_ops(&f, &g, &g.kv_t, &g.ic_t, &small);
  snprintf(msg, sizeof msg, "%s: small caches run", name);
  if (!CHECK(ok, msg))
    goto done;
  int64_t n_out = (int64_t)f.T * f.cfg.num_q_heads * 128;
  double e1 = rel_l2(small.out, M3S_BF16, cpu.out, M3S_BF16, n_out),
         e2 = rel_l2(small.out_k2q, M3S_BF16, cpu.out, M3S_BF16, n_out);
  snprintf(msg, sizeof msg,
           "%s: small run: top-k == CPU, attention and k2q vs CPU rel L2 %.2e %.2e", name, e1, e2);
  CHECK(memcmp(small.topk, cpu.topk, cpu.topk_bytes) == 0 && e1 < 1e-2 && e2 < 1e-2, msg);

  m3s_tensor big_kv, big_ic;
  int64_t P = f.num_pages;
  void *dkv = make_far_cache(&f.kv, &g.kv_t, P, KV_FAR_ODD + P, kv_page_bytes(&f), far_kv, &big_kv);
  void *dic = make_far_cache(&f.ic, &g.ic_t, P, IC_FAR + P, ic_page_bytes(&f), far_ic, &big_ic);
  ok = dkv && dic && upload_far_tables(&f, &g);
  snprintf(msg, sizeof msg, "%s: large caches (%.2f + %.2f GiB) allocated and filled", name,
           (double)(KV_FAR_ODD + P) * (double)kv_page_bytes(&f) / (1 << 30),
           (double)(IC_FAR + P) * (double)ic_page_bytes(&f) / (1 << 30));
  if (CHECK(ok, msg)) {
    ok = run_ops(&f, &g, &big_kv, &big_ic, &big);
    snprintf(msg, sizeof msg, "%s: far pages: top-k bytes equal", name);
    CHECK(ok && memcmp(big.topk, small.topk, small.topk_bytes) == 0, msg);
    snprintf(msg, sizeof msg, "%s: far pages: attention out and lse bytes equal", name);
    CHECK(ok && memcmp(big.out, small.out, small.out_bytes) == 0 &&
              memcmp(big.lse, small.lse, small.lse_bytes) == 0,
          msg);
    snprintf(msg, sizeof msg, "%s: far pages: k2q path out bytes equal", name);
    CHECK(ok && memcmp(big.out_k2q, small.out_k2q, small.out_bytes) == 0, msg);
    check_inserts(&f, &g, &big_kv, &big_ic, name);
  }
  printf("  %-40s P %lld, main cache pages to %lld, index pages to %lld\n", name, (long long)P,
         (long long)(KV_FAR_ODD + P - 1), (long long)(IC_FAR + P - 1));
  gpu_free(dkv);
  gpu_free(dic);
done:
  gpu_fx_free(&g);
  results_free(&cpu);
  results_free(&small);
  results_free(&big);
  fx_free(&f);
}

int main(void) {
  g_gpu = gpu_context_or_null();
  if (!g_gpu)
    return gpu_skip("test_gpu_offsets64", "no CUDA device");
  size_t free_b = 0, total_b = 0;
  cudaMemGetInfo(&free_b, &total_b);
  if (free_b < ((size_t)14 << 30)) {
    m3s_context_destroy(g_gpu);
    return gpu_skip("test_gpu_offsets64", "needs 14 GiB of free device memory");
  }
  if (m3s_context_create(-1, &g_cpu) != M3S_OK) {
    fprintf(stderr, "cpu context: %s\n", m3s_last_error());
    m3s_context_destroy(g_gpu);
    return 1;
  }
  run_variant("bf16_head_major_bf16_index", M3S_BF16, M3S_BF16, 0);
  run_variant("e4m3_token_major_e4m3_index", M3S_E4M3, M3S_E4M3, 1);
  m3s_context_destroy(g_cpu);
  m3s_context_destroy(g_gpu);
  return TEST_FINISH();
}
