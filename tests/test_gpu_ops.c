/* GPU tests of src/cuda/k2q.cu: cache inserts, the k2q CSR build, k2q
 * attention + combine, and the merge of two attention states. Every case runs
 * the CUDA context and the CPU context on the same fresh random inputs:
 *   - inserts: whole caches byte-identical (every cache dtype, scalar and
 *     per-slot scales, both cache orders, i32/i64 slots, strided k/v/ik,
 *     negative slots; slots beyond the cache are skipped on the GPU where the
 *     CPU, which rejects them, gets -1);
 *   - CSR: row_ptr, q_indices, q_slot and q_count identical, entries past
 *     row_ptr[g][R] untouched;
 *   - k2q attention: the partials written are the CPU's (fp32 tolerance on
 *     the SIMT kernel, rel L2 1e-2 on the tensor-core one, which runs for
 *     16-bit caches of q's dtype; such cases run on both) and exactly the
 *     slots the CPU writes (the others keep their poison);
 *     combine equals the CPU's direct attention (rel L2 < 1e-2, lse 1e-3);
 *   - merge: two halves merged equal the whole; in place (out aliases out_a)
 *     gives the same bits; both sides empty give 0 / -inf.
 * Outputs are poisoned before each GPU run. Exit 77 (skip) without a GPU. */
#include "cuda/k2q.h"
#include "gpu_util.h"

#include "cpu/convert.h"

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define POISON_I32 0x5A5A5A5A
#define POISON_F32_BITS 0x7FC17FC1u /* NaN as f32, and each half NaN as bf16/f16 */

static m3s_context *g_gpu, *g_cpu;
static cudaStream_t g_stream;
static m3s_exec g_exec; /* stream only, no workspace */
static int g_verbose;   /* M3S_TEST_VERBOSE: print every check, time the k2q pipeline */
static int g_tc_cases;  /* k2q cases the tensor-core kernel ran */

/* CHECK that also prints the message (with its numbers) in verbose mode. */
static int check_msg(int ok, const char *msg) {
  if (g_verbose)
    printf("  %s%s\n", ok ? "" : "FAILED: ", msg);
  return CHECK(ok, msg);
}

/* ---- small helpers ---- */

static m3s_tensor dev_view(m3s_tensor t, void *d) {
  t.data = d;
  t.device = 0;
  return t;
}

/* Alternate between the legacy stream (exec NULL) and a non-blocking stream. */
static const m3s_exec *exec_for(int i) { return (i & 1) ? &g_exec : NULL; }

static int gpu_done(void) {
  return cudaStreamSynchronize(g_stream) == cudaSuccess && gpu_sync() && gpu_guards_check();
}

static void fill_u32(void *p, size_t words, uint32_t v) {
  for (size_t i = 0; i < words; i++)
    ((uint32_t *)p)[i] = v;
}

static int is_poison_f32(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u == POISON_F32_BITS;
}

static fx_spec spec(int tp, int nreq, const int32_t *ql, const int32_t *sl) {
  fx_spec s = fx_spec_default(m3s_config_minimax_m3(tp), nreq, ql, sl, 4242);
  s.extra_pages = 2;
  return s;
}

static size_t kv_bytes(const fixture *f) {
  return (size_t)(f->num_pages * f->cfg.num_kv_heads * 128 * 256) * m3s_dtype_size(f->sp.kv_dtype);
}

/* Random activation value with specials now and then (saturation, fp8
 * subnormals, RNE ties, infinities, signed zero). */
static float act_value(int64_t i, uint64_t *rng, float sigma) {
  static const float sp[] = {0.0f,   -0.0f,         1e5f,          -1e5f,    1e-6f,    -3e-5f,
                             464.0f, -480.0f,       57344.0f,      61440.0f, INFINITY, -INFINITY,
                             448.0f, 0.0087890625f, -0.001953125f, 240.0f};
  if (i % 23 == 5)
    return sp[(i / 23) % (int64_t)(sizeof sp / sizeof sp[0])];
  return rng_normal(rng) * sigma;
}

/* Distinct random slots; every 7th token (i % 7 == 3) skipped: -1 for the CPU,
 * and for the GPU alternately a negative slot or one beyond the cache. */
static void make_slots(int T, int64_t nslots, uint64_t *rng, int64_t *cpu, int64_t *gpu, int wide) {
  int64_t *perm = malloc(sizeof(int64_t) * (size_t)nslots);
  for (int64_t i = 0; i < nslots; i++)
    perm[i] = i;
  for (int64_t i = nslots - 1; i > 0; i--) {
    int64_t j = (int64_t)(rng_next(rng) % (uint64_t)(i + 1)), x = perm[i];
    perm[i] = perm[j];
    perm[j] = x;
  }
  for (int i = 0; i < T; i++) {
    cpu[i] = gpu[i] = perm[i];
    if (i % 7 == 3) {
      cpu[i] = -1;
      gpu[i] = (i % 14 == 3) ? -100 - i : nslots + 17 * i + (wide ? ((int64_t)1 << 40) : 0);
    }
  }
  free(perm);
}

static m3s_tensor slot_tensor(void *mem, m3s_dtype dt, const int64_t *vals, int T) {
  for (int i = 0; i < T; i++) {
    if (dt == M3S_I64)
      ((int64_t *)mem)[i] = vals[i];
    else
      ((int32_t *)mem)[i] = (int32_t)(vals[i] > INT32_MAX ? INT32_MAX : vals[i]);
  }
  int64_t t = T;
  return m3s_tensor_make(mem, dt, 1, &t, M3S_HOST);
}

/* ---------------------------------------------------------------------------
 * Inserts
 * ------------------------------------------------------------------------- */

static void insert_case(int tp, m3s_dtype act, m3s_dtype kv_dt, int scale_mode, int token_major,
                        m3s_dtype slot_dt, int run, const char *name) {
  if (!test_selected(name))
    return;
  int32_t ql[] = {1}, sl[] = {700};
  fx_spec s = spec(tp, 1, ql, sl);
  s.kv_dtype = kv_dt;
  s.scale_mode = scale_mode;
  s.token_major = token_major;
  s.seed = 100 + (uint64_t)run;
  fixture f;
  fx_init(&f, &s);
  int Hkv = f.cfg.num_kv_heads, T = 53;
  int64_t nslots = f.num_pages * 128;
  uint64_t rng = 7 + (uint64_t)run;
  /* k: [T, Hkv, 128] inside rows of 160 (NaN padding); v: memory [Hkv][T][128] */
  uint16_t *kb = malloc(sizeof(uint16_t) * (size_t)T * Hkv * 160);
  uint16_t *vb = malloc(sizeof(uint16_t) * (size_t)T * Hkv * 128);
  for (int64_t i = 0; i < (int64_t)T * Hkv * 160; i++)
    kb[i] = 0x7FC1;
  for (int t = 0; t < T; t++)
    for (int h = 0; h < Hkv; h++)
      for (int d = 0; d < 128; d++) {
        int64_t i = ((int64_t)t * Hkv + h) * 128 + d;
        store_elem(kb, act, ((int64_t)t * Hkv + h) * 160 + d, act_value(i, &rng, 3.0f));
        store_elem(vb, act, ((int64_t)h * T + t) * 128 + d, act_value(i + 11, &rng, 3.0f));
      }
  int64_t sh[3] = {T, Hkv, 128}, kst[3] = {(int64_t)Hkv * 160, 160, 1};
  int64_t vst[3] = {128, (int64_t)T * 128, 1};
  m3s_tensor kt = m3s_tensor_strided(kb, act, 3, sh, kst, M3S_HOST);
  m3s_tensor vt = m3s_tensor_strided(vb, act, 3, sh, vst, M3S_HOST);
  int64_t cpu_slots[64], gpu_slots[64];
  make_slots(T, nslots, &rng, cpu_slots, gpu_slots, slot_dt == M3S_I64);
  int64_t smem_c[64], smem_g[64];
  m3s_tensor sc = slot_tensor(smem_c, slot_dt, cpu_slots, T);
  m3s_tensor sg = slot_tensor(smem_g, slot_dt, gpu_slots, T);
  /* device copies of the untouched cache and the inputs */
  size_t kvb = kv_bytes(&f);
  gpu_fx g;
  int ok = gpu_fx_upload(&g, &f, g_gpu);
  void *dk = gpu_dup(kb, sizeof(uint16_t) * (size_t)T * Hkv * 160);
  void *dv = gpu_dup(vb, sizeof(uint16_t) * (size_t)T * Hkv * 128);
  void *ds = gpu_dup(smem_g, sizeof smem_g);
  ok = ok && dk && dv && ds;
  m3s_tensor dkt = dev_view(kt, dk), dvt = dev_view(vt, dv), dst = dev_view(sg, ds);
  m3s_status st_c = m3s_cache_insert(g_cpu, &kt, &vt, &sc, &f.kv, &f.scales, NULL);
  m3s_status st_g =
      ok ? m3s_cache_insert(g_gpu, &dkt, &dvt, &dst, &g.kv_t, &g.scales, exec_for(run))
         : M3S_ERR_INTERNAL;
  void *got = malloc(kvb);
  ok = ok && st_c == M3S_OK && st_g == M3S_OK && gpu_done() && gpu_get(got, g.kv, kvb);
  if (st_g != M3S_OK)
    fprintf(stderr, "  %s: %s\n", name, m3s_last_error());
  size_t diff = 0, first = 0;
  for (size_t i = 0; ok && i < kvb; i++)
    if (((uint8_t *)got)[i] != ((uint8_t *)f.kv_mem)[i] && diff++ == 0)
      first = i;
  char msg[200];
  snprintf(msg, sizeof msg, "%s: whole cache equals the CPU's (%zu bytes differ, first at %zu)",
           name, diff, first);
  check_msg(ok && diff == 0, msg);
  free(got);
  gpu_free(dk);
  gpu_free(dv);
  gpu_free(ds);
  gpu_fx_free(&g);
  free(kb);
  free(vb);
  fx_free(&f);
}

static void test_cache_insert(void) {
  insert_case(2, M3S_BF16, M3S_BF16, 0, 0, M3S_I64, 0, "insert_bf16_head_major_i64");
  insert_case(1, M3S_F16, M3S_F16, 0, 1, M3S_I32, 1, "insert_f16_token_major_i32");
  insert_case(2, M3S_F16, M3S_BF16, 0, 1, M3S_I64, 2, "insert_bf16_cache_from_f16_token_major");
  insert_case(8, M3S_BF16, M3S_E4M3, 0, 0, M3S_I64, 3, "insert_e4m3_no_scale");
  insert_case(2, M3S_BF16, M3S_E4M3, 1, 1, M3S_I32, 4, "insert_e4m3_scalar_scales_token_major");
  insert_case(1, M3S_BF16, M3S_E4M3, 2, 0, M3S_I32, 5, "insert_e4m3_per_slot_scales");
  insert_case(2, M3S_BF16, M3S_E5M2, 1, 0, M3S_I64, 6, "insert_e5m2_scalar_scales");
  insert_case(2, M3S_F16, M3S_E5M2, 2, 1, M3S_I64, 7, "insert_e5m2_per_slot_scales_f16_act");
}

static void index_insert_case(m3s_dtype idx, m3s_dtype act, m3s_dtype slot_dt, int run,
                              const char *name) {
  if (!test_selected(name))
    return;
  int32_t ql[] = {1}, sl[] = {500};
  fx_spec s = spec(8, 1, ql, sl);
  s.idx_dtype = idx;
  s.seed = 300 + (uint64_t)run;
  fixture f;
  fx_init(&f, &s);
  int T = 41;
  int64_t nslots = f.num_pages * 128;
  uint64_t rng = 77 + (uint64_t)run;
  uint16_t *ik = malloc(sizeof(uint16_t) * (size_t)T * 200);
  for (int64_t i = 0; i < (int64_t)T * 200; i++)
    store_elem(ik, act, i, (i % 200) < 128 ? act_value(i, &rng, 200.0f) : NAN);
  int64_t sh[2] = {T, 128}, st2[2] = {200, 1};
  m3s_tensor it = m3s_tensor_strided(ik, act, 2, sh, st2, M3S_HOST);
  int64_t cpu_slots[64], gpu_slots[64], smem_c[64], smem_g[64];
  make_slots(T, nslots, &rng, cpu_slots, gpu_slots, slot_dt == M3S_I64);
  m3s_tensor sc = slot_tensor(smem_c, slot_dt, cpu_slots, T);
  m3s_tensor sg = slot_tensor(smem_g, slot_dt, gpu_slots, T);
  size_t bytes = (size_t)(f.num_pages * 128 * 128) * m3s_dtype_size(idx);
  gpu_fx g;
  int ok = gpu_fx_upload(&g, &f, g_gpu);
  void *dik = gpu_dup(ik, sizeof(uint16_t) * (size_t)T * 200), *ds = gpu_dup(smem_g, sizeof smem_g);
  ok = ok && dik && ds;
  m3s_tensor dit = dev_view(it, dik), dst = dev_view(sg, ds);
  m3s_status st_c = m3s_index_cache_insert(g_cpu, &it, &sc, &f.ic, NULL);
  m3s_status st_g =
      ok ? m3s_index_cache_insert(g_gpu, &dit, &dst, &g.ic_t, exec_for(run)) : M3S_ERR_INTERNAL;
  void *got = malloc(bytes);
  ok = ok && st_c == M3S_OK && st_g == M3S_OK && gpu_done() && gpu_get(got, g.ic, bytes);
  if (st_g != M3S_OK)
    fprintf(stderr, "  %s: %s\n", name, m3s_last_error());
  check_msg(ok && memcmp(got, f.ic_mem, bytes) == 0, name);
  free(got);
  gpu_free(dik);
  gpu_free(ds);
  gpu_fx_free(&g);
  free(ik);
  fx_free(&f);
}

static void test_index_insert(void) {
  index_insert_case(M3S_BF16, M3S_BF16, M3S_I64, 0, "index_insert_bf16_i64_strided");
  index_insert_case(M3S_BF16, M3S_F16, M3S_I32, 1, "index_insert_bf16_from_f16_i32");
  index_insert_case(M3S_E4M3, M3S_BF16, M3S_I32, 2, "index_insert_e4m3_saturating_i32");
  index_insert_case(M3S_E4M3, M3S_F16, M3S_I64, 3, "index_insert_e4m3_from_f16_i64");
}

/* ---------------------------------------------------------------------------
 * CSR, k2q attention, combine
 * ------------------------------------------------------------------------- */

typedef struct {
  k2q_shapes sh; /* every k2q buffer's shape */
  int64_t rows, tk;
  int hkv, T;
  int32_t *h_rp, *h_qi, *h_qs, *h_qc; /* CPU results */
  int32_t *g_rp, *g_qi, *g_qs, *g_qc; /* GPU results (downloaded) */
  void *d_rp, *d_qi, *d_qs, *d_qc;
  m3s_tensor rp, qi, qs, qc;     /* host views */
  m3s_tensor drp, dqi, dqs, dqc; /* device views */
} csr_set;

static int csr_alloc(csr_set *c, const fixture *f) {
  memset(c, 0, sizeof *c);
  if (!fx_k2q_shapes(g_cpu, f, &c->sh))
    return 0;
  const k2q_shapes s = c->sh;
  c->rows = s.rows;
  c->hkv = f->cfg.num_kv_heads;
  c->T = f->T;
  c->tk = s.q_idx[1];
  size_t nrp = (size_t)shape_elems(2, s.row_ptr), nq = (size_t)shape_elems(2, s.q_idx) + 1;
  size_t nc = (size_t)shape_elems(2, s.q_cnt) + 1;
  c->h_rp = malloc(nrp * 4);
  c->g_rp = malloc(nrp * 4);
  c->h_qi = malloc(nq * 4);
  c->g_qi = malloc(nq * 4);
  c->h_qs = malloc(nq * 4);
  c->g_qs = malloc(nq * 4);
  c->h_qc = malloc(nc * 4);
  c->g_qc = malloc(nc * 4);
  fill_u32(c->g_rp, nrp, POISON_I32);
  fill_u32(c->g_qi, nq, POISON_I32);
  fill_u32(c->g_qs, nq, POISON_I32);
  fill_u32(c->g_qc, nc, POISON_I32);
  c->d_rp = gpu_dup(c->g_rp, nrp * 4);
  c->d_qi = gpu_dup(c->g_qi, nq * 4);
  c->d_qs = gpu_dup(c->g_qs, nq * 4);
  c->d_qc = gpu_dup(c->g_qc, nc * 4);
  c->rp = m3s_tensor_make(c->h_rp, M3S_I32, 2, s.row_ptr, M3S_HOST);
  c->qi = m3s_tensor_make(c->h_qi, M3S_I32, 2, s.q_idx, M3S_HOST);
  c->qs = m3s_tensor_make(c->h_qs, M3S_I32, 2, s.q_idx, M3S_HOST);
  c->qc = m3s_tensor_make(c->h_qc, M3S_I32, 2, s.q_cnt, M3S_HOST);
  c->drp = dev_view(c->rp, c->d_rp);
  c->dqi = dev_view(c->qi, c->d_qi);
  c->dqs = dev_view(c->qs, c->d_qs);
  c->dqc = dev_view(c->qc, c->d_qc);
  return c->d_rp && c->d_qi && c->d_qs && c->d_qc;
}

static void csr_free(csr_set *c) {
  free(c->h_rp);
  free(c->g_rp);
  free(c->h_qi);
  free(c->g_qi);
  free(c->h_qs);
  free(c->g_qs);
  free(c->h_qc);
  free(c->g_qc);
  gpu_free(c->d_rp);
  gpu_free(c->d_qi);
  gpu_free(c->d_qs);
  gpu_free(c->d_qc);
  memset(c, 0, sizeof *c);
}

/* Builds the CSR on both contexts and compares everything. */
static int csr_compare(csr_set *c, const fixture *f, gpu_fx *g, int run, const char *name) {
  size_t nrp = (size_t)(c->hkv * (c->rows + 1)), nq = (size_t)(c->hkv * c->tk) + 1;
  size_t nc = (size_t)c->T * c->hkv + 1;
  m3s_status sc =
      m3s_build_k2q_csr(g_cpu, &f->cfg, &f->batch, &f->topk, &c->rp, &c->qi, &c->qs, &c->qc, NULL);
  m3s_status sg = m3s_build_k2q_csr(g_gpu, &f->cfg, &g->batch, &g->topk_t, &c->drp, &c->dqi,
                                    &c->dqs, &c->dqc, exec_for(run));
  if (sc != M3S_OK || sg != M3S_OK)
    fprintf(stderr, "  %s: %s\n", name, m3s_last_error());
  int ok = sc == M3S_OK && sg == M3S_OK && gpu_done() && gpu_get(c->g_rp, c->d_rp, nrp * 4) &&
           gpu_get(c->g_qi, c->d_qi, nq * 4) && gpu_get(c->g_qs, c->d_qs, nq * 4) &&
           gpu_get(c->g_qc, c->d_qc, nc * 4);
  int64_t bad_rp = 0, bad_q = 0, bad_tail = 0, bad_qc = 0, entries = 0;
  for (int g0 = 0; ok && g0 < c->hkv; g0++) {
    const int32_t *hr = c->h_rp + g0 * (c->rows + 1), *gr = c->g_rp + g0 * (c->rows + 1);
    for (int64_t x = 0; x <= c->rows; x++)
      bad_rp += hr[x] != gr[x];
    int64_t total = hr[c->rows];
    entries += total;
    for (int64_t e = 0; e < c->tk; e++) {
      int64_t i = g0 * c->tk + e;
      if (e < total)
        bad_q += c->h_qi[i] != c->g_qi[i] || c->h_qs[i] != c->g_qs[i];
      else
        bad_tail += c->g_qi[i] != POISON_I32 || c->g_qs[i] != POISON_I32;
    }
  }
  for (size_t i = 0; ok && i + 1 < nc; i++)
    bad_qc += c->h_qc[i] != c->g_qc[i];
  char msg[256];
  snprintf(msg, sizeof msg,
           "%s: CSR equals the CPU's (%lld rows, %lld entries; bad row_ptr %lld, entries %lld, "
           "q_count %lld, touched tail %lld)",
           name, (long long)c->rows, (long long)entries, (long long)bad_rp, (long long)bad_q,
           (long long)bad_qc, (long long)bad_tail);
  return check_msg(ok && bad_rp == 0 && bad_q == 0 && bad_qc == 0 && bad_tail == 0, msg);
}

/* k2q attention on both contexts: the GPU writes exactly the partial slots
 * the CPU writes, with the CPU's values: rel L2 < 1e-4 on the SIMT fp32
 * kernel, < 1e-2 on the tensor-core one (P in the mma dtype; SPEC section
 * 7: the results equal section 4's), which the library reports it takes
 * (m3s_k2q_tc_takes); lse within 1e-4 either way. *tc: which ran. */
static int partials_compare(const csr_set *c, const fixture *f, gpu_fx *g, int run, void **d_po_out,
                            void **d_pl_out, const char *name, int *tc) {
  int T = f->T, Hq = f->cfg.num_q_heads, K = f->cfg.topk;
  size_t npl = (size_t)T * Hq * K + 1, npo = npl * 128;
  float *hpo = malloc(npo * 4), *hpl = malloc(npl * 4), *gpo = malloc(npo * 4),
        *gpl = malloc(npl * 4);
  fill_u32(hpo, npo, POISON_F32_BITS);
  fill_u32(hpl, npl, POISON_F32_BITS);
  void *dpo = gpu_dup(hpo, npo * 4), *dpl = gpu_dup(hpl, npl * 4);
  m3s_tensor tpo = m3s_tensor_make(hpo, M3S_F32, 4, c->sh.part_out, M3S_HOST);
  m3s_tensor tpl = m3s_tensor_make(hpl, M3S_F32, 3, c->sh.part_lse, M3S_HOST);
  m3s_tensor dtpo = dev_view(tpo, dpo), dtpl = dev_view(tpl, dpl);
  *tc = m3s_k2q_tc_takes(g_gpu, &g->q_t, &g->kv_t, &dtpo, &dtpl);
  m3s_status sc = m3s_k2q_attention(g_cpu, &f->cfg, &f->batch, &f->q, &f->kv, &f->scales, &c->rp,
                                    &c->qi, &c->qs, &tpo, &tpl, NULL);
  m3s_status sg = (dpo && dpl)
                      ? m3s_k2q_attention(g_gpu, &f->cfg, &g->batch, &g->q_t, &g->kv_t, &g->scales,
                                          &c->drp, &c->dqi, &c->dqs, &dtpo, &dtpl, exec_for(run))
                      : M3S_ERR_INTERNAL;
  if (sc != M3S_OK || sg != M3S_OK)
    fprintf(stderr, "  %s: %s\n", name, m3s_last_error());
  int ok = sc == M3S_OK && sg == M3S_OK && gpu_done() && gpu_get(gpo, dpo, npo * 4) &&
           gpu_get(gpl, dpl, npl * 4);
  int64_t written = 0, bad_set = 0, bad_lse = 0;
  double e2 = 0, r2 = 0;
  for (size_t i = 0; ok && i + 1 < npl; i++) {
    int hw = !is_poison_f32(hpl[i]), gw = !is_poison_f32(gpl[i]);
    if (hw != gw) {
      bad_set++;
      continue;
    }
    if (!hw) {
      for (int d = 0; d < 128; d++)
        bad_set += !is_poison_f32(gpo[i * 128 + d]);
      continue;
    }
    written++;
    if (isinf(hpl[i]) ? !(isinf(gpl[i]) && gpl[i] < 0)
                      : !(fabs(hpl[i] - gpl[i]) <= 1e-4 * fmax(1.0, fabs(hpl[i]))))
      bad_lse++;
    for (int d = 0; d < 128; d++) {
      double x = gpo[i * 128 + d], y = hpo[i * 128 + d];
      e2 += (x - y) * (x - y);
      r2 += y * y;
      bad_set += isnan(x);
    }
  }
  double rel = r2 > 0 ? sqrt(e2 / r2) : sqrt(e2);
  char msg[256];
  snprintf(msg, sizeof msg,
           "%s [%s]: k2q partials equal the CPU's (%lld slots written, rel L2 %.3g, bad lse %lld, "
           "slots written differently %lld)",
           name, *tc ? "tensor cores" : "simt", (long long)written, rel, (long long)bad_lse,
           (long long)bad_set);
  int pass = check_msg(ok && written > 0 && rel < (*tc ? 1e-2 : 1e-4) && bad_lse == 0 &&
                           bad_set == 0,
                       msg);
  free(hpo);
  free(hpl);
  free(gpo);
  free(gpl);
  *d_po_out = dpo;
  *d_pl_out = dpl;
  return pass;
}

/* Combine of the GPU partials vs the CPU's direct attention (fixture out/lse
 * must already hold it). */
static void combine_compare(const csr_set *c, fixture *f, gpu_fx *g, void *dpo, void *dpl, int run,
                            const char *name) {
  int T = f->T, Hq = f->cfg.num_q_heads;
  size_t ob = (size_t)T * Hq * 128 * 2, lb = sizeof(float) * (size_t)T * Hq;
  void *ref = malloc(ob), *with = malloc(ob);
  float *ref_lse = malloc(lb);
  memcpy(ref, f->out_mem, ob);
  memcpy(ref_lse, f->lse_mem, lb);
  m3s_tensor tpo = m3s_tensor_make(dpo, M3S_F32, 4, c->sh.part_out, 0);
  m3s_tensor tpl = m3s_tensor_make(dpl, M3S_F32, 3, c->sh.part_lse, 0);
  int ok = gpu_fx_poison(g, f);
  ok = ok && m3s_combine_partials(g_gpu, &f->cfg, &tpo, &tpl, &c->dqc, &g->out_t, &g->lse_t,
                                  exec_for(run)) == M3S_OK;
  ok = ok && gpu_fx_download(g, f);
  if (!ok)
    fprintf(stderr, "  %s: %s\n", name, m3s_last_error());
  double e2 = 0, r2 = 0, lerr = 0;
  int64_t unwritten = 0, bad_inf = 0, bad_pad = 0;
  for (int t = 0; ok && t < T; t++) {
    int padded = fx_pos(f, t) < 0;
    for (int h = 0; h < Hq; h++) {
      int64_t i = (int64_t)t * Hq + h;
      for (int d = 0; d < 128; d++) {
        double x = load_elem(f->out_mem, f->sp.act_dtype, i * 128 + d);
        double y = load_elem(ref, f->sp.act_dtype, i * 128 + d);
        unwritten += isnan(x);
        bad_pad += padded && x != 0.0;
        e2 += (x - y) * (x - y);
        r2 += y * y;
      }
      float gl = f->lse_mem[i], wl = ref_lse[i];
      unwritten += isnan(gl);
      if (isinf(wl) || isinf(gl))
        bad_inf += !(isinf(wl) && isinf(gl) && wl < 0 && gl < 0);
      else
        lerr = fmax(lerr, fabs(gl - wl));
    }
  }
  double rel = r2 > 0 ? sqrt(e2 / r2) : sqrt(e2);
  char msg[256];
  snprintf(msg, sizeof msg,
           "%s: combine equals direct attention (rel L2 %.3g, lse %.3g, unwritten %lld, bad -inf "
           "%lld, bad padded %lld)",
           name, rel, lerr, (long long)unwritten, (long long)bad_inf, (long long)bad_pad);
  check_msg(ok && rel < 1e-2 && lerr < 1e-3 && unwritten == 0 && bad_inf == 0 && bad_pad == 0, msg);
  /* lse NULL: same output bits */
  memcpy(with, f->out_mem, ob);
  ok = ok && gpu_fx_poison(g, f) &&
       m3s_combine_partials(g_gpu, &f->cfg, &tpo, &tpl, &c->dqc, &g->out_t, NULL,
                            exec_for(run + 1)) == M3S_OK &&
       gpu_fx_download(g, f);
  snprintf(msg, sizeof msg, "%s: combine with lse NULL gives the same bits", name);
  check_msg(ok && memcmp(with, f->out_mem, ob) == 0, msg);
  free(ref);
  free(with);
  free(ref_lse);
}

typedef struct {
  int tp, nreq;
  const int32_t *ql, *sl;
  int uniform, qsl_base, topk_head_major, token_major, scale_mode, holes, sink;
  m3s_dtype kv;
  const char *name;
  int logits; /* 0, or an FX_LOGITS_* mode of fx_large_logits (tests/ref.h) */
} k2q_case;

/* What a case changes beyond k2q_case: f16 q (with an f16 cache in kv), and
 * the heads (hq 0: the TP config's). */
typedef struct {
  int f16, hq, hkv;
} k2q_shape;

/* Verbose mode: times CSR build, k2q attention and combine on the GPU (the
 * CSR buffers and partials are rewritten with the same values). topk: the
 * case's top-k rows (the comparisons poisoned the buffers since). */
static void time_pipeline(csr_set *c, fixture *f, gpu_fx *g, void *dpo, void *dpl,
                          const int32_t *topk, const char *name) {
  int T = f->T, Hq = f->cfg.num_q_heads, K = f->cfg.topk;
  memcpy(f->topk_mem, topk, sizeof(int32_t) * (size_t)T * f->cfg.num_kv_heads * K);
  if (!gpu_fx_upload_topk(g, f))
    return;
  m3s_tensor tpo = m3s_tensor_make(dpo, M3S_F32, 4, c->sh.part_out, 0);
  m3s_tensor tpl = m3s_tensor_make(dpl, M3S_F32, 3, c->sh.part_lse, 0);
  cudaEvent_t ev[4];
  for (int i = 0; i < 4; i++)
    cudaEventCreate(&ev[i]);
  float ms[3] = {0, 0, 0};
  int ok = 1;
  for (int rep = 0; rep < 3; rep++) {
    cudaEventRecord(ev[0], g_stream);
    ok &= m3s_build_k2q_csr(g_gpu, &f->cfg, &g->batch, &g->topk_t, &c->drp, &c->dqi, &c->dqs,
                            &c->dqc, &g_exec) == M3S_OK;
    cudaEventRecord(ev[1], g_stream);
    ok &= m3s_k2q_attention(g_gpu, &f->cfg, &g->batch, &g->q_t, &g->kv_t, &g->scales, &c->drp,
                            &c->dqi, &c->dqs, &tpo, &tpl, &g_exec) == M3S_OK;
    cudaEventRecord(ev[2], g_stream);
    ok &= m3s_combine_partials(g_gpu, &f->cfg, &tpo, &tpl, &c->dqc, &g->out_t, &g->lse_t,
                               &g_exec) == M3S_OK;
    cudaEventRecord(ev[3], g_stream);
    cudaEventSynchronize(ev[3]);
    for (int i = 0; i < 3 && rep > 0; i++) { /* rep 0 warms up */
      float x = 0;
      cudaEventElapsedTime(&x, ev[i], ev[i + 1]);
      ms[i] += x / 2;
    }
  }
  printf("  %s: T %d, %lld rows, Hq %d: csr %.3f ms, k2q attention %.3f ms, combine %.3f ms%s\n",
         name, T, (long long)c->rows, Hq, ms[0], ms[1], ms[2], ok ? "" : " (A CALL FAILED)");
  for (int i = 0; i < 4; i++)
    cudaEventDestroy(ev[i]);
}

/* "Attention sink" rows: blocks 0 .. min(K, nb)-2 and the local block, so the
 * first rows of a long prompt are selected by every query (rows longer than
 * the GPU's in-shared-memory sort). */
static void make_sink_topk(fixture *f) {
  for (int t = 0; t < f->T; t++) {
    int64_t pos = fx_pos(f, t), nb = pos < 0 ? 0 : pos / 128 + 1;
    int64_t kk = nb < f->cfg.topk ? nb : f->cfg.topk;
    for (int g0 = 0; g0 < f->cfg.num_kv_heads; g0++)
      for (int k = 0; k < f->cfg.topk; k++)
        *fx_topk_at(f, t, g0, k) = k >= kk ? -1 : (int32_t)(k == kk - 1 ? nb - 1 : k);
  }
}

/* Top-k on the CPU; CSR on both; partials on both; combine on the GPU vs the
 * CPU's direct attention. */
/* The tensor-core partials (P in the mma dtype) and the SIMT ones (fp32)
 * differ in their last bits on random inputs: equal bits would mean the
 * dispatch ran the SIMT kernel both times. NaN poison (unwritten slots) is
 * skipped; the two runs wrote the same slots (partials_compare). */
static void tc_differs(const void *d_tc, const void *d_simt, size_t n, const char *name) {
  float *a = malloc(n * 4 + 4), *b = malloc(n * 4 + 4);
  int ok = a && b && gpu_get(a, d_tc, n * 4) && gpu_get(b, d_simt, n * 4);
  size_t differ = 0, written = 0;
  for (size_t i = 0; ok && i < n; i++) {
    if (isnan(a[i]) || isnan(b[i]))
      continue;
    written++;
    differ += a[i] != b[i];
  }
  char msg[200];
  snprintf(msg, sizeof msg,
           "%s: the tensor-core kernel ran (%zu of %zu partial values differ from the SIMT "
           "kernel's)",
           name, differ, written);
  check_msg(ok && written > 0 && differ > 0, msg);
  free(a);
  free(b);
}

static void run_k2q_shape(const k2q_case *kc, const k2q_shape *ks, int run) {
  if (!test_selected(kc->name))
    return;
  fx_spec s = spec(kc->tp, kc->nreq, kc->ql, kc->sl);
  if (ks->hq) {
    s.cfg.num_q_heads = ks->hq;
    s.cfg.num_kv_heads = ks->hkv;
  }
  if (ks->f16)
    s.act_dtype = M3S_F16;
  s.uniform = kc->uniform;
  s.qsl_base = kc->qsl_base;
  s.topk_head_major = kc->topk_head_major;
  s.token_major = kc->token_major;
  s.scale_mode = kc->scale_mode;
  s.kv_dtype = kc->kv;
  s.seed = 900 + (uint64_t)run;
  fixture f;
  fx_init(&f, &s);
  if (kc->logits)
    fx_large_logits(&f, kc->logits);
  fx_poison(&f);
  int ok = m3s_index_topk(g_cpu, &f.cfg, &f.batch, &f.iq, &f.ic, &f.topk, NULL) == M3S_OK;
  if (kc->sink)
    make_sink_topk(&f);
  if (kc->holes)
    for (int t = 0; t < f.T; t++)
      for (int g0 = 0; g0 < f.cfg.num_kv_heads; g0++)
        for (int k = 0; k < f.cfg.topk; k++)
          if ((t + 3 * k + g0) % 5 == 1)
            *fx_topk_at(&f, t, g0, k) = -1;
  int32_t *keep = malloc(sizeof(int32_t) * ((size_t)f.T * f.cfg.num_kv_heads * f.cfg.topk + 1));
  memcpy(keep, f.topk_mem, sizeof(int32_t) * (size_t)f.T * f.cfg.num_kv_heads * f.cfg.topk);
  if (!kc->holes)
    ok = ok && m3s_sparse_attention(g_cpu, &f.cfg, &f.batch, &f.q, &f.kv, &f.scales, &f.topk,
                                    &f.out, &f.lse, NULL) == M3S_OK;
  if (!CHECK(ok, kc->name))
    fprintf(stderr, "  %s\n", m3s_last_error());
  gpu_fx g;
  csr_set c;
  ok = ok && gpu_fx_upload(&g, &f, g_gpu) && gpu_fx_upload_topk(&g, &f) && csr_alloc(&c, &f);
  if (!CHECK(ok, "k2q case: device buffers")) {
    free(keep);
    fx_free(&f);
    return;
  }
  void *dpo = NULL, *dpl = NULL;
  int tc = 0;
  if (csr_compare(&c, &f, &g, run, kc->name) &&
      partials_compare(&c, &f, &g, run + 1, &dpo, &dpl, kc->name, &tc) && !kc->holes) {
    combine_compare(&c, &f, &g, dpo, dpl, run, kc->name);
    if (g_verbose)
      time_pipeline(&c, &f, &g, dpo, dpl, keep, kc->name);
  }
  g_tc_cases += tc;
  if (tc && dpo) { /* the same partials on the SIMT kernel, at its tolerance */
    void *spo = NULL, *spl = NULL;
    int tc2 = 1;
    m3s_k2q_set_simt(g_gpu, 1);
    partials_compare(&c, &f, &g, run + 2, &spo, &spl, kc->name, &tc2);
    m3s_k2q_set_simt(g_gpu, 0);
    CHECK(!tc2, "the SIMT switch keeps k2q attention off the tensor-core kernel");
    tc_differs(dpo, spo, (size_t)f.T * f.cfg.num_q_heads * f.cfg.topk * 128, kc->name);
    gpu_free(spo);
    gpu_free(spl);
  }
  free(keep);
  gpu_free(dpo);
  gpu_free(dpl);
  csr_free(&c);
  gpu_fx_free(&g);
  fx_free(&f);
}

static void run_k2q_case(const k2q_case *kc, int run) {
  const k2q_shape plain = {0, 0, 0};
  run_k2q_shape(kc, &plain, run);
}

static void test_k2q(void) {
  /* several prefill requests, a long prefix, a padded request, a short one */
  static const int32_t ql1[] = {300, 64, 200, 7, 50}, sl1[] = {2500, 9000, 200, 0, 50};
  static const int32_t ql2[] = {129, 1, 90}, sl2[] = {1500, 4000, 3000};
  static const int32_t ql3[] = {2, 2, 2, 2, 2}, sl3[] = {3000, 0, 130, 2, 20000};
  static const int32_t ql4[] = {129, 1}, sl4[] = {3000, 4100};
  static const int32_t ql5[] = {3000, 5000}, sl5[] = {3000, 5000};
  static const int32_t ql6[] = {3, 1}, sl6[] = {300, 130};
  k2q_case cases[] = {
      {2, 5, ql1, sl1, 0, 0, 0, 0, 0, 0, 0, M3S_BF16, "k2q_tp2_prefill_bf16", 0},
      {8, 3, ql2, sl2, 0, 5, 1, 1, 2, 0, 0, M3S_E4M3, "k2q_tp8_e4m3_per_slot_headmajor_topk", 0},
      {8, 3, ql2, sl2, 0, 5, 1, 0, 0, 1, 0, M3S_BF16, "k2q_tp8_csr_with_minus_one_holes", 0},
      {1, 5, ql3, sl3, 1, 0, 0, 1, 0, 0, 0, M3S_BF16, "k2q_tp1_uniform_decode_qlen2", 0},
      {2, 2, ql4, sl4, 0, 0, 0, 1, 1, 0, 0, M3S_E4M3, "k2q_tp2_e4m3_scalar_token_major", 0},
      {8, 2, ql5, sl5, 0, 0, 0, 0, 0, 0, 1, M3S_BF16, "k2q_tp8_sink_rows_of_3000_and_5000", 0},
      {8, 2, ql6, sl6, 0, 0, 0, 1, 2, 0, 0, M3S_E5M2, "k2q_tp8_tiny_e5m2", 0}, /* racecheck-sized */
      {8, 2, ql6, sl6, 0, 0, 0, 0, 0, 0, 0, M3S_BF16, "k2q_tp8_tiny_bf16", 0}, /* racecheck-sized */
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
    run_k2q_case(&cases[i], (int)i);
  /* the tensor-core kernel's other forms: f16 q and cache; 32 and 24 query
   * heads per KV head (two chunks of 16 heads, a partial last one) */
  static const k2q_case tcc[] = {
      {2, 5, ql1, sl1, 0, 0, 0, 0, 0, 0, 0, M3S_F16, "k2q_tp2_prefill_f16", 0},
      {2, 3, ql2, sl2, 0, 5, 0, 1, 0, 0, 0, M3S_BF16, "k2q_g32_hkv2_bf16", 0},
      {2, 2, ql4, sl4, 0, 0, 0, 0, 0, 0, 0, M3S_F16, "k2q_g24_hkv2_f16", 0},
  };
  static const k2q_shape tcs[] = {{1, 0, 0}, {0, 64, 2}, {1, 48, 2}};
  for (size_t i = 0; i < sizeof tcc / sizeof tcc[0]; i++)
    run_k2q_shape(&tcc[i], &tcs[i], 20 + (int)i);
  /* many requests (more than any CTA's width), zero-length ones among them:
   * exercises the chunked request scans of the row-base lookups */
  enum { NR = 700 };
  static int32_t qlm[NR], slm[NR];
  uint64_t rng = 5150;
  for (int r = 0; r < NR; r++) {
    qlm[r] = r % 3 == 0 ? 0 : 1 + (int)(rng_next(&rng) % 3);
    slm[r] = r % 11 == 4 ? 0 : qlm[r] + (int)(rng_next(&rng) % (r % 50 == 7 ? 600 : 120));
  }
  k2q_case many = {8, NR, qlm, slm, 0, 3, 0, 1, 2, 0, 0, M3S_E4M3, "k2q_tp8_700_requests_e4m3", 0};
  run_k2q_case(&many, 9);
  /* large logits (|q.k * scale| in the hundreds: fx_large_logits) through
   * the k2q partials and the combine: the modes whose logits fp32 holds to
   * the partials' 1e-4 comparison (one dominant key, all equal, e4m3
   * extremes under a scale) */
  k2q_case large[] = {
      {1, 5, ql3, sl3, 1, 0, 0, 1, 0, 0, 0, M3S_BF16, "k2q_large_logits_dominant_key_tp1",
       FX_LOGITS_DOMINANT},
      {8, 3, ql2, sl2, 0, 5, 0, 0, 0, 0, 0, M3S_BF16, "k2q_large_logits_all_equal_minus362_tp8",
       FX_LOGITS_EQUAL_NEG},
      {2, 2, ql4, sl4, 0, 0, 0, 1, 0, 0, 0, M3S_BF16, "k2q_large_logits_all_equal_plus181_tp2",
       FX_LOGITS_EQUAL_POS},
      {2, 2, ql4, sl4, 0, 0, 0, 0, 1, 0, 0, M3S_E4M3, "k2q_large_logits_e4m3_extremes_tp2",
       FX_LOGITS_FP8_MAX},
  };
  for (size_t i = 0; i < sizeof large / sizeof large[0]; i++)
    run_k2q_case(&large[i], 10 + (int)i);
}

/* ---------------------------------------------------------------------------
 * Merge
 * ------------------------------------------------------------------------- */

static void test_merge(void) {
  if (!test_selected("merge"))
    return;
  int32_t ql[] = {1, 1, 120};
  int32_t sl[] = {4000, 60, 2300};
  fx_spec s = spec(1, 3, ql, sl);
  fixture f;
  fx_init(&f, &s);
  fx_poison(&f);
  const m3s_layer_config *c = &f.cfg;
  int T = f.T, K = c->topk, Hkv = c->num_kv_heads, Hq = c->num_q_heads;
  int ok = m3s_index_topk(g_cpu, c, &f.batch, &f.iq, &f.ic, &f.topk, NULL) == M3S_OK &&
           m3s_sparse_attention(g_cpu, c, &f.batch, &f.q, &f.kv, &f.scales, &f.topk, &f.out, &f.lse,
                                NULL) == M3S_OK;
  int64_t n = (int64_t)T * Hq * 128;
  size_t ob = (size_t)n * 2, ob32 = (size_t)n * 4, lb = sizeof(float) * (size_t)T * Hq;
  size_t tb = sizeof(int32_t) * (size_t)T * Hkv * K;
  void *whole = malloc(ob), *oa = malloc(ob), *ob_ = malloc(ob), *got = malloc(ob);
  float *wl = malloc(lb), *la = malloc(lb), *lbv = malloc(lb), *gl = malloc(lb);
  float *got32 = malloc(ob32), *cpu32 = malloc(ob32), *cl = malloc(lb);
  int32_t *full = malloc(tb);
  memcpy(whole, f.out_mem, ob);
  memcpy(wl, f.lse_mem, lb);
  memcpy(full, f.topk_mem, tb);
  /* even slots and odd slots: disjoint key sets */
  for (int half = 0; half < 2 && ok; half++) {
    for (int64_t i = 0; i < (int64_t)T * Hkv * K; i++)
      ((int32_t *)f.topk_mem)[i] = (i % K) % 2 == half ? full[i] : -1;
    ok = m3s_sparse_attention(g_cpu, c, &f.batch, &f.q, &f.kv, &f.scales, &f.topk, &f.out, &f.lse,
                              NULL) == M3S_OK;
    memcpy(half ? ob_ : oa, f.out_mem, ob);
    memcpy(half ? lbv : la, f.lse_mem, lb);
  }
  int64_t sh[3] = {T, Hq, 128}, lsh[2] = {T, Hq};
  void *d_oa = gpu_dup(oa, ob), *d_ob = gpu_dup(ob_, ob), *d_la = gpu_dup(la, lb);
  void *d_lb = gpu_dup(lbv, lb), *d_out = gpu_dup(NULL, ob32), *d_lse = gpu_dup(NULL, lb);
  ok = ok && d_oa && d_ob && d_la && d_lb && d_out && d_lse;
  m3s_tensor ta = m3s_tensor_make(d_oa, M3S_BF16, 3, sh, 0);
  m3s_tensor tb_ = m3s_tensor_make(d_ob, M3S_BF16, 3, sh, 0);
  m3s_tensor tla = m3s_tensor_make(d_la, M3S_F32, 2, lsh, 0);
  m3s_tensor tlb = m3s_tensor_make(d_lb, M3S_F32, 2, lsh, 0);
  m3s_tensor tout = m3s_tensor_make(d_out, M3S_BF16, 3, sh, 0);
  m3s_tensor tout32 = m3s_tensor_make(d_out, M3S_F32, 3, sh, 0);
  m3s_tensor tlse = m3s_tensor_make(d_lse, M3S_F32, 2, lsh, 0);
  /* halves merged = whole, and close to the CPU's merge */
  fill_u32(got32, (size_t)n, POISON_F32_BITS);
  fill_u32(gl, (size_t)T * Hq, POISON_F32_BITS);
  ok = ok && gpu_put(d_out, got32, ob32) && gpu_put(d_lse, gl, lb) &&
       m3s_merge_attn_states(g_gpu, &ta, &tla, &tb_, &tlb, &tout, &tlse, exec_for(1)) == M3S_OK &&
       gpu_done() && gpu_get(got, d_out, ob) && gpu_get(gl, d_lse, lb);
  double lerr = 0;
  int unwritten = 0;
  for (int i = 0; i < T * Hq; i++) {
    lerr = fmax(lerr, fabs(gl[i] - wl[i]));
    unwritten += isnan(gl[i]);
  }
  for (int64_t i = 0; i < n; i++)
    unwritten += isnan(load_elem(got, M3S_BF16, i));
  double rel = rel_l2(got, M3S_BF16, whole, M3S_BF16, n);
  char msg[200];
  snprintf(msg, sizeof msg, "merge_two_halves_equals_whole (rel L2 %.3g, lse %.3g, unwritten %d)",
           rel, lerr, unwritten);
  check_msg(ok && rel < 1e-2 && lerr < 1e-3 && unwritten == 0, msg);
  /* f32 output vs the CPU's f32 merge */
  int64_t ssh[3] = {T, Hq, 128};
  m3s_tensor ha = m3s_tensor_make(oa, M3S_BF16, 3, ssh, M3S_HOST);
  m3s_tensor hb = m3s_tensor_make(ob_, M3S_BF16, 3, ssh, M3S_HOST);
  m3s_tensor hla = m3s_tensor_make(la, M3S_F32, 2, lsh, M3S_HOST);
  m3s_tensor hlb = m3s_tensor_make(lbv, M3S_F32, 2, lsh, M3S_HOST);
  m3s_tensor hout = m3s_tensor_make(cpu32, M3S_F32, 3, ssh, M3S_HOST);
  m3s_tensor hl = m3s_tensor_make(cl, M3S_F32, 2, lsh, M3S_HOST);
  ok = ok && m3s_merge_attn_states(g_cpu, &ha, &hla, &hb, &hlb, &hout, &hl, NULL) == M3S_OK;
  ok = ok && gpu_put(d_out, got32, ob32) &&
       m3s_merge_attn_states(g_gpu, &ta, &tla, &tb_, &tlb, &tout32, NULL, exec_for(0)) == M3S_OK &&
       gpu_done() && gpu_get(got32, d_out, ob32);
  rel = rel_l2(got32, M3S_F32, cpu32, M3S_F32, n);
  snprintf(msg, sizeof msg, "merge_f32_output_lse_null_equals_cpu_merge (rel L2 %.3g)", rel);
  check_msg(ok && rel < 1e-5, msg);
  /* in place: out aliases out_a, lse aliases lse_a; same bits as out of place */
  ok = ok &&
       m3s_merge_attn_states(g_gpu, &ta, &tla, &tb_, &tlb, &ta, &tla, exec_for(1)) == M3S_OK &&
       gpu_done();
  void *inplace = malloc(ob);
  float *inplace_l = malloc(lb);
  ok = ok && gpu_get(inplace, d_oa, ob) && gpu_get(inplace_l, d_la, lb);
  CHECK(ok && memcmp(inplace, got, ob) == 0 && memcmp(inplace_l, gl, lb) == 0,
        "merge_in_place_into_out_a_same_bits");
  /* both sides empty: 0 and -inf */
  for (int i = 0; i < T * Hq; i++)
    la[i] = lbv[i] = -INFINITY;
  fill_u32(got32, (size_t)n, POISON_F32_BITS);
  fill_u32(gl, (size_t)T * Hq, POISON_F32_BITS);
  ok = ok && gpu_put(d_la, la, lb) && gpu_put(d_lb, lbv, lb) && gpu_put(d_out, got32, ob32) &&
       gpu_put(d_lse, gl, lb) &&
       m3s_merge_attn_states(g_gpu, &ta, &tla, &tb_, &tlb, &tout, &tlse, NULL) == M3S_OK &&
       gpu_done() && gpu_get(got, d_out, ob) && gpu_get(gl, d_lse, lb);
  int empty_ok = ok;
  for (int64_t i = 0; i < n; i++)
    empty_ok &= ((uint16_t *)got)[i] == 0;
  for (int i = 0; i < T * Hq; i++)
    empty_ok &= isinf(gl[i]) && gl[i] < 0;
  CHECK(empty_ok, "merge_both_sides_empty_gives_zero_and_minus_inf");
  free(inplace);
  free(inplace_l);
  gpu_free(d_oa);
  gpu_free(d_ob);
  gpu_free(d_la);
  gpu_free(d_lb);
  gpu_free(d_out);
  gpu_free(d_lse);
  free(whole);
  free(oa);
  free(ob_);
  free(got);
  free(wl);
  free(la);
  free(lbv);
  free(gl);
  free(got32);
  free(cpu32);
  free(cl);
  free(full);
  fx_free(&f);
}

int main(void) {
  if (!(g_gpu = gpu_context_or_null()))
    return gpu_skip("test_gpu_ops", "no CUDA device");
  if (m3s_context_create(-1, &g_cpu) != M3S_OK) {
    fprintf(stderr, "cpu context: %s\n", m3s_last_error());
    return 1;
  }
  if (cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking) != cudaSuccess) {
    fprintf(stderr, "cudaStreamCreateWithFlags failed\n");
    return 1;
  }
  g_exec.stream = g_stream;
  g_verbose = getenv("M3S_TEST_VERBOSE") != NULL;
  test_cache_insert();
  test_index_insert();
  test_k2q();
  if (test_unfiltered())
    CHECK(g_tc_cases > 0, "the tensor-core k2q kernel ran on some case");
  test_merge();
  cudaStreamDestroy(g_stream);
  m3s_context_destroy(g_cpu);
  m3s_context_destroy(g_gpu);
  return TEST_FINISH();
}
