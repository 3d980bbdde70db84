/* GPU tests of context parallel (SPEC section 10): the per-rank chain of
 * tests/test_context_parallel.c (cp ranks simulated in one process, each with
 * caches and block tables of its own pages, tests/cp_fixture.h) on a CUDA
 * context and on the CPU context, on the same inputs:
 *   - every rank's candidates (ids and scores) bit-identical to the CPU's;
 *   - the merged top-k bit-identical to the CPU's (which equals
 *     m3s_index_topk on the whole cache: test_context_parallel);
 *   - each rank's partial attention within rel L2 1e-2 of the CPU's, with
 *     the same rows at lse -inf (rows that own none of their blocks);
 *   - the N-way merge within rel L2 1e-2 (lse 1e-3) of the CPU's and of the
 *     fp64 reference;
 *   - a decode step captured in a CUDA graph replays to the eager bits.
 * Cases marked union_any run the GPU chain with the union attention kernel
 * forced past its size rule (src/cuda/sm90/attention_tma.h), so its
 * context-parallel filter (blocks other ranks own dropped, the rank-local
 * columns read) is checked too (on sm_90 the case fails if the kernel does
 * not take it); on other devices the switch changes nothing.
 * Outputs and exchange buffers are poisoned before each run; every device
 * buffer sits between guard zones (gpu_util.h). Exit 77 (skip) without a
 * GPU. */
#include "cp_fixture.h"
#include "cuda/sm90/attention_tma.h"
#include "gpu_util.h"

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static m3s_context *g_gpu, *g_cpu;
static cudaStream_t g_stream;


typedef struct {
  const char *name;
  m3s_layer_config cfg;
  int uniform, nan_keys, equal_keys;
  m3s_dtype kv_dtype, idx_dtype;
  int scale_mode, token_major, topk_head_major, packed;
  int cp, il;
  int union_any; /* the union attention kernel forced (sm_90) */
} gcase;

static fixture make_fixture(const gcase *c, uint64_t seed) {
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
  fixture f;
  fx_init(&f, &s);
  if (c->nan_keys)
    fx_nan_index_keys(&f);
  if (c->equal_keys)
    fx_equal_index_keys(&f);
  return f;
}

/* ---- device copies of a rank and of the exchange buffers ---- */

typedef struct {
  void *kv, *ic, *bt, *ibt, *ks, *vs;
  cp_rank view; /* the host rank's views on these buffers */
} dev_rank;

static m3s_tensor on_dev(m3s_tensor t, void *d) {
  t.data = d;
  t.device = 0;
  return t;
}

static int dev_rank_upload(dev_rank *d, const cp_rank *h, const fixture *f, const gpu_fx *g) {
  memset(d, 0, sizeof *d);
  int64_t P = h->num_pages, Hkv = f->cfg.num_kv_heads, R = f->sp.num_reqs;
  size_t tab = sizeof(int32_t) * (size_t)(R * (h->cols + 1) + 1);
  d->kv = gpu_dup(h->kv_mem, (size_t)(P * Hkv * 128 * 256) * m3s_dtype_size(f->sp.kv_dtype));
  d->ic = gpu_dup(h->ic_mem, (size_t)(P * 128 * 128) * m3s_dtype_size(f->sp.idx_dtype));
  d->bt = gpu_dup(h->bt, tab);
  d->ibt = gpu_dup(h->ibt, tab);
  d->view = *h;
  d->view.scales = g->scales; /* scalar scales (or none): the fixture's */
  if (h->ks_mem) {
    d->ks = gpu_dup(h->ks_mem, sizeof(float) * (size_t)(Hkv * P * 128));
    d->vs = gpu_dup(h->vs_mem, sizeof(float) * (size_t)(Hkv * P * 128));
    if (!d->ks || !d->vs)
      return 0;
    d->view.scales.k_scale = on_dev(h->scales.k_scale, d->ks);
    d->view.scales.v_scale = on_dev(h->scales.v_scale, d->vs);
  }
  if (!d->kv || !d->ic || !d->bt || !d->ibt)
    return 0;
  d->view.kv = on_dev(h->kv, d->kv);
  d->view.ic = on_dev(h->ic, d->ic);
  d->view.batch = g->batch; /* device query_start_loc and seq_lens */
  d->view.batch.block_table = on_dev(h->batch.block_table, d->bt);
  d->view.batch.index_block_table = on_dev(h->batch.index_block_table, d->ibt);
  d->view.batch.cp = h->batch.cp;
  return 1;
}

static void dev_rank_free(dev_rank *d) {
  gpu_free(d->kv);
  gpu_free(d->ic);
  gpu_free(d->bt);
  gpu_free(d->ibt);
  gpu_free(d->ks);
  gpu_free(d->vs);
}

/* A device copy of host exchange h (its current, poisoned contents). */
static int dev_exchange_upload(cp_exchange *d, const cp_exchange *h) {
  *d = *h;
  d->cand_mem = gpu_dup(h->cand_mem, h->cand_bytes);
  d->score_mem = h->score_mem ? gpu_dup(h->score_mem, h->score_bytes) : NULL;
  d->outs_mem = gpu_dup(h->outs_mem, h->outs_bytes);
  d->lses_mem = gpu_dup(h->lses_mem, h->lses_bytes);
  if (!d->cand_mem || (h->score_mem && !d->score_mem) || !d->outs_mem || !d->lses_mem)
    return 0;
  d->ids = on_dev(h->ids, d->cand_mem);
  d->scores = on_dev(h->scores, (char *)d->cand_mem +
                                    ((const char *)h->scores.data - (const char *)h->cand_mem));
  if (h->score_mem)
    d->scores = on_dev(h->scores, d->score_mem);
  d->outs = on_dev(h->outs, d->outs_mem);
  d->lses = on_dev(h->lses, d->lses_mem);
  return 1;
}

static int dev_exchange_download(cp_exchange *h, const cp_exchange *d) {
  return gpu_get(h->cand_mem, d->cand_mem, h->cand_bytes) &&
         (!h->score_mem || gpu_get(h->score_mem, d->score_mem, h->score_bytes)) &&
         gpu_get(h->outs_mem, d->outs_mem, h->outs_bytes) &&
         gpu_get(h->lses_mem, d->lses_mem, h->lses_bytes);
}

static void dev_exchange_free(cp_exchange *d) {
  gpu_free(d->cand_mem);
  gpu_free(d->score_mem);
  gpu_free(d->outs_mem);
  gpu_free(d->lses_mem);
}

/* ---- one case ---- */

typedef struct {
  void *out;
  float *lse;
  int32_t *topk;
} results;

static size_t out_bytes(const fixture *f) {
  return (size_t)f->T * f->cfg.num_q_heads * 128 * m3s_dtype_size(f->sp.act_dtype);
}
static size_t lse_bytes(const fixture *f) {
  return sizeof(float) * (size_t)f->T * f->cfg.num_q_heads;
}
static size_t topk_bytes(const fixture *f) {
  return sizeof(int32_t) * (size_t)f->T * f->cfg.num_kv_heads * f->cfg.topk;
}

static void keep(results *r, const fixture *f) {
  r->out = malloc(out_bytes(f));
  r->lse = malloc(lse_bytes(f));
  r->topk = malloc(topk_bytes(f));
  memcpy(r->out, f->out_mem, out_bytes(f));
  memcpy(r->lse, f->lse_mem, lse_bytes(f));
  memcpy(r->topk, f->topk_mem, topk_bytes(f));
}

static void drop(results *r) {
  free(r->out);
  free(r->lse);
  free(r->topk);
}

/* Captures the chain on g_stream and replays it; the replay must give the
 * eager run's bits (outputs poisoned in between). */
static void graph_replay(const char *name, fixture *f, gpu_fx *g, const cp_rank *dv,
                         cp_exchange *xd, const cp_exchange *xh_poison, m3s_exec *ex) {
  fixture fv = gpu_fx_views(f, g);
  results eager;
  if (!CHECK(gpu_fx_download(g, f), name))
    return;
  keep(&eager, f);
  cudaGraph_t graph = NULL;
  cudaGraphExec_t inst = NULL;
  int ok = cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeGlobal) == cudaSuccess;
  m3s_status st = cp_chain(g_gpu, &fv, dv, xd, &fv.topk, &fv.out, &fv.lse, ex);
  ok = cudaStreamEndCapture(g_stream, &graph) == cudaSuccess && ok && st == M3S_OK;
  ok = ok && cudaGraphInstantiate(&inst, graph, 0) == cudaSuccess;
  /* poison everything the graph writes, then replay */
  ok = ok && gpu_fx_poison(g, f) &&
       gpu_put(xd->cand_mem, xh_poison->cand_mem, xh_poison->cand_bytes) &&
       gpu_put(xd->outs_mem, xh_poison->outs_mem, xh_poison->outs_bytes) &&
       gpu_put(xd->lses_mem, xh_poison->lses_mem, xh_poison->lses_bytes) &&
       (!xd->score_mem || gpu_put(xd->score_mem, xh_poison->score_mem, xh_poison->score_bytes));
  ok = ok && cudaGraphLaunch(inst, g_stream) == cudaSuccess &&
       cudaStreamSynchronize(g_stream) == cudaSuccess && gpu_fx_download(g, f);
  char msg[320];
  snprintf(msg, sizeof msg, "%s: a captured context-parallel step replays to the eager bits", name);
  CHECK(ok && memcmp(eager.out, f->out_mem, out_bytes(f)) == 0 &&
            memcmp(eager.lse, f->lse_mem, lse_bytes(f)) == 0 &&
            memcmp(eager.topk, f->topk_mem, topk_bytes(f)) == 0,
        msg);
  if (inst)
    cudaGraphExecDestroy(inst);
  if (graph)
    cudaGraphDestroy(graph);
  drop(&eager);
}

static void run_case(const gcase *c) {
  char name[160], msg[400];
  snprintf(name, sizeof name, "%s_cp%d_il%d%s", c->name, c->cp, c->il,
           c->union_any ? "_union" : "");
  if (!test_selected(name))
    return;
  fixture f = make_fixture(c, 300 + (uint64_t)c->cp * 10 + (uint64_t)c->il);
  int64_t T = f.T, Hq = f.cfg.num_q_heads;
  cp_rank *rk = malloc(sizeof(cp_rank) * (size_t)c->cp);
  dev_rank *dr = calloc((size_t)c->cp, sizeof(dev_rank));
  cp_rank *dv = malloc(sizeof(cp_rank) * (size_t)c->cp);
  for (int n = 0; n < c->cp; n++)
    cp_rank_init(&rk[n], &f, c->cp, n, c->il, (uint64_t)c->cp * 100 + (uint64_t)c->il);
  /* the CPU chain */
  cp_exchange xc, xg, xpoison, xd;
  cp_exchange_init(&xc, &f, c->cp, c->packed);
  cp_exchange_init(&xg, &f, c->cp, c->packed);
  cp_exchange_init(&xpoison, &f, c->cp, c->packed);
  cp_exchange_poison(&xc);
  cp_exchange_poison(&xpoison);
  fx_poison(&f);
  int ok = CHECK(cp_chain(g_cpu, &f, rk, &xc, &f.topk, &f.out, &f.lse, NULL) == M3S_OK, name);
  results cpu;
  keep(&cpu, &f);
  /* the same on the GPU */
  gpu_fx g;
  ok = ok && CHECK(gpu_fx_upload(&g, &f, g_gpu) && gpu_fx_poison(&g, &f), name);
  for (int n = 0; n < c->cp && ok; n++) {
    ok = CHECK(dev_rank_upload(&dr[n], &rk[n], &f, &g), name);
    dv[n] = dr[n].view;
  }
  ok = ok && CHECK(dev_exchange_upload(&xd, &xpoison), name);
  m3s_exec ex = {g.ws, g.ws_bytes, g_stream};
  fixture fv = gpu_fx_views(&f, &g);
  m3s_attention_set_union_any(g_gpu, c->union_any);
  if (ok && c->union_any && gpu_sm_major() == 9) {
    snprintf(msg, sizeof msg, "%s: the union attention kernel runs the ranks' attention", name);
    CHECK(m3s_attention_tma_eligible(g_gpu, &dv[0].batch, &fv.q, &dv[0].kv, &dv[0].scales) ==
              M3S_ATTN_UNION,
          msg);
  }
  if (ok)
    ok = CHECK(cp_chain(g_gpu, &fv, dv, &xd, &fv.topk, &fv.out, &fv.lse, &ex) == M3S_OK, name);
  ok = ok && CHECK(cudaStreamSynchronize(g_stream) == cudaSuccess && gpu_fx_download(&g, &f) &&
                       dev_exchange_download(&xg, &xd),
                   name);
  if (ok) {
    snprintf(msg, sizeof msg, "%s: every rank's candidates (ids and scores) are the CPU's bits",
             name);
    CHECK(memcmp(xc.cand_mem, xg.cand_mem, xc.cand_bytes) == 0 &&
              (!xc.score_mem || memcmp(xc.score_mem, xg.score_mem, xc.score_bytes) == 0),
          msg);
    snprintf(msg, sizeof msg, "%s: merged top-k == the CPU's", name);
    CHECK(memcmp(cpu.topk, f.topk_mem, topk_bytes(&f)) == 0, msg);
    int64_t np = (int64_t)c->cp * T * Hq;
    double rp = rel_l2(xg.outs_mem, f.sp.act_dtype, xc.outs_mem, f.sp.act_dtype, np * 128);
    double lp = lse_max_diff(xg.lses_mem, xc.lses_mem, np);
    snprintf(msg, sizeof msg, "%s: partials vs the CPU's: rel L2 %.3g, lse diff %.3g", name, rp,
             lp);
    CHECK(rp < 1e-2 && lp < 1e-3, msg);
    double ro = rel_l2(f.out_mem, f.sp.act_dtype, cpu.out, f.sp.act_dtype, T * Hq * 128);
    double lo = lse_max_diff(f.lse_mem, cpu.lse, T * Hq);
    snprintf(msg, sizeof msg, "%s: merged attention vs the CPU's: rel L2 %.3g, lse diff %.3g", name,
             ro, lo);
    CHECK(ro < 1e-2 && lo < 1e-3, msg);
    check_attention_vs_ref(&f, 1, name);
    if (getenv("M3S_TEST_VERBOSE"))
      printf("  %s\n", msg);
    if (c->uniform)
      graph_replay(name, &f, &g, dv, &xd, &xpoison, &ex);
  }
  m3s_attention_set_union_any(g_gpu, 0);
  CHECK(gpu_guards_check(), name);
  drop(&cpu);
  dev_exchange_free(&xd);
  for (int n = 0; n < c->cp; n++) {
    dev_rank_free(&dr[n]);
    cp_rank_free(&rk[n]);
  }
  gpu_fx_free(&g);
  cp_exchange_free(&xc);
  cp_exchange_free(&xg);
  cp_exchange_free(&xpoison);
  free(rk);
  free(dr);
  free(dv);
  fx_free(&f);
}

static void test_cases(void) {
  const m3s_layer_config tp8 = m3s_config_minimax_m3(8), tp2 = m3s_config_minimax_m3(2);
  const m3s_layer_config mixed = fx_cfg(8, 2, 6, 1, 2);
  const gcase cases[] = {
      {.name = "m3_tp8_mixed", .cfg = tp8, .cp = 2, .il = 1},
      {.name = "m3_tp8_mixed", .cfg = tp8, .cp = 3, .il = 2},
      {.name = "m3_tp8_mixed", .cfg = tp8, .cp = 4, .il = 1},
      {.name = "m3_tp8_mixed", .cfg = tp8, .cp = 8, .il = 2},
      {.name = "hkv2_k6_init1_local2_packed", .cfg = mixed, .packed = 1, .cp = 3, .il = 1},
      {.name = "hkv2_k6_init1_local2_packed", .cfg = mixed, .packed = 1, .cp = 8, .il = 1},
      {.name = "m3_tp2_spec_decode_q4", .cfg = tp2, .uniform = 1, .cp = 2, .il = 2},
      {.name = "m3_tp2_spec_decode_q4", .cfg = tp2, .uniform = 1, .cp = 4, .il = 1},
      {.name = "m3_tp8_mixed", .cfg = tp8, .cp = 3, .il = 2, .union_any = 1},
      {.name = "m3_tp2_spec_decode_q4", .cfg = tp2, .uniform = 1, .cp = 2, .il = 2,
       .union_any = 1},
      {.name = "hkv2_k6_init1_local2_packed", .cfg = mixed, .packed = 1, .cp = 3, .il = 1,
       .union_any = 1},
      {.name = "nan_scores", .cfg = fx_cfg(8, 2, 16, 0, 1), .nan_keys = 1, .cp = 3, .il = 2},
      {.name = "equal_scores", .cfg = fx_cfg(4, 2, 5, 1, 1), .equal_keys = 1, .cp = 4, .il = 1},
      {.name = "e4m3_caches_per_slot_scales_token_major",
       .cfg = m3s_config_minimax_m3(4),
       .kv_dtype = M3S_E4M3,
       .idx_dtype = M3S_E4M3,
       .scale_mode = 2,
       .token_major = 1,
       .topk_head_major = 1,
       .packed = 1,
       .cp = 4,
       .il = 2},
      {.name = "e5m2_scalar_scales_spec_decode",
       .cfg = tp8,
       .uniform = 1,
       .kv_dtype = M3S_E5M2,
       .scale_mode = 1,
       .cp = 3,
       .il = 1},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
    run_case(&cases[i]);
}

static void test_query_support(void) {
  m3s_layer_config cfg = m3s_config_minimax_m3(1);
  const m3s_op ops[] = {M3S_OP_INDEX_TOPK_CANDIDATES, M3S_OP_MERGE_TOPK_CANDIDATES,
                        M3S_OP_ATTENTION_CP, M3S_OP_MERGE_N};
  for (int i = 0; i < 4; i++) {
    m3s_support_query q = {ops[i], M3S_BF16, M3S_BF16, M3S_BF16, 0, M3S_LAYOUT_HEAD_MAJOR};
    m3s_support_info info;
    CHECK(m3s_query_support(g_gpu, &cfg, &q, &info) == M3S_OK && info.supported && info.kernel[0] &&
              !info.reason[0],
          "the CUDA backend reports every context-parallel operation");
  }
}

int main(void) {
  if (!(g_gpu = gpu_context_or_null()))
    return gpu_skip("test_gpu_context_parallel", "no CUDA device");
  if (m3s_context_create(-1, &g_cpu) != M3S_OK) {
    fprintf(stderr, "cpu context: %s\n", m3s_last_error());
    return 1;
  }
  if (cudaStreamCreateWithFlags(&g_stream, cudaStreamNonBlocking) != cudaSuccess) {
    fprintf(stderr, "cudaStreamCreateWithFlags failed\n");
    return 1;
  }
  test_query_support();
  test_cases();
  cudaStreamDestroy(g_stream);
  m3s_context_destroy(g_cpu);
  m3s_context_destroy(g_gpu);
  return TEST_FINISH();
}
