/* SPEC section 6: a decode step (index top-k + attention through
 * m3s_step_forward) is captured once into a CUDA graph and replayed with new
 * contents: new queries, seq_lens (growth across a block boundary, padded
 * rows), block tables and caches. Every replay must give the same bytes as an
 * eager run on the same inputs; the top-k must equal the CPU backend's byte
 * for byte and the attention match the fp64 reference (rel L2 < 1e-2). Capture itself fails if the library
 * allocates, synchronises or reads device data on the host. The _pdl cases
 * run the same with programmatic dependent launch of the decode chain
 * forced on (src/cuda/launch.h; on sm_90 only, where it must be on, and the
 * captured graph must hold programmatic edges), the _default cases one
 * request under the default rule (PDL on sm_90). */
#include "gpu_util.h"
#include "cuda/launch.h"

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static m3s_context *g_gpu, *g_cpu;

static m3s_status step_decode(m3s_context *ctx, const m3s_layer_config *cfg, const m3s_batch *b,
                              m3s_tensor *q, m3s_tensor *iq, m3s_tensor *kv, m3s_kv_scales *sc,
                              m3s_tensor *ic, m3s_tensor *topk, m3s_tensor *out, m3s_tensor *lse,
                              const m3s_exec *ex) {
  m3s_step step;
  memset(&step, 0, sizeof step);
  step.decode = *b;
  return m3s_step_forward(ctx, cfg, &step, q, iq, kv, sc, ic, topk, out, lse, ex);
}

/* New random contents for everything a replay may change. */
static void refresh_inputs(fixture *f, uint64_t *rng, const int32_t *seqs) {
  int Hq = f->cfg.num_q_heads, Hkv = f->cfg.num_kv_heads;
  for (int64_t i = 0; i < (int64_t)f->T * Hq * 128; i++)
    store_elem(f->q_mem, f->sp.act_dtype, i, rng_normal(rng));
  for (int64_t i = 0; i < (int64_t)f->T * Hkv * 128; i++)
    store_elem(f->iq_mem, f->sp.act_dtype, i, rng_normal(rng));
  for (int64_t i = 0; i < f->num_pages * 128 * 128; i++)
    store_elem(f->ic_mem, f->sp.idx_dtype, i, rng_normal(rng));
  int64_t kvn = f->num_pages * Hkv * 128 * 256;
  for (int64_t i = 0; i < kvn; i += 7) /* refresh a strided subset of the main cache */
    store_elem(f->kv_mem, f->sp.kv_dtype, i, rng_normal(rng));
  for (int r = 0; r < f->sp.num_reqs; r++)
    f->seqlens[r] = seqs[r];
  /* reverse the page order of both tables: a new physical placement */
  int64_t rs = f->batch.block_table.stride[0];
  for (int r = 0; r < f->sp.num_reqs; r++)
    for (int c = 0; c < f->max_pages; c++)
      if (f->bt[r * rs + c] >= 0) {
        f->bt[r * rs + c] = (int32_t)(f->num_pages - 1 - f->bt[r * rs + c]);
        f->ibt[r * rs + c] = (int32_t)(f->num_pages - 1 - f->ibt[r * rs + c]);
      }
}

static int bytes_equal(const void *a, const void *b, size_t n) { return memcmp(a, b, n) == 0; }

/* pdl: 1 forced on, 0 forced off, -1 the default rule (launch.h). nreq: 6
 * requests of mixed lengths, or 1 of 40000 tokens (several splits). */
static void graph_case(int tp, int q_len, int pdl, int nreq, const char *name) {
  m3s_cuda_set_pdl(g_gpu, pdl);
  const int sm90 = gpu_sm_major() == 9, pdl_on = m3s_cuda_pdl(g_gpu, nreq);
  if (pdl != 0)
    CHECK(pdl_on == (sm90 && (pdl > 0 || nreq <= M3S_PDL_AUTO_REQS)),
          "graph: PDL on exactly where asked (or by default) on sm_90");
  /* capture-time bounds: the largest lengths any replay uses */
  int32_t maxs[6] = {3000, 2049, 129, 4096, 700, 1};
  int32_t ql[6];
  for (int r = 0; r < 6; r++)
    ql[r] = q_len;
  if (q_len > 1)
    maxs[5] = q_len;
  if (nreq == 1)
    maxs[0] = 40000;
  fx_spec s = fx_spec_default(m3s_config_minimax_m3(tp), nreq, ql, maxs, 2026);
  s.uniform = 1;
  fixture f;
  fx_init(&f, &s);
  gpu_fx g;
  if (!CHECK(gpu_fx_upload(&g, &f, g_gpu), "graph: upload")) {
    fx_free(&f);
    m3s_cuda_set_pdl(g_gpu, -1);
    return;
  }
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  g.exec.stream = stream;
  size_t ob = (size_t)f.T * f.cfg.num_q_heads * 128 * 2, lb = sizeof(float) * f.T * f.cfg.num_q_heads;
  size_t tb = sizeof(int32_t) * (size_t)f.T * f.cfg.num_kv_heads * f.cfg.topk;
  void *eo = malloc(ob), *else_ = malloc(lb), *et = malloc(tb);
  /* capture once */
  cudaGraph_t graph = NULL;
  cudaGraphExec_t gexec = NULL;
  int ok = gpu_fx_poison(&g, &f) && gpu_fx_upload_topk(&g, &f);
  ok = ok && cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal) == cudaSuccess;
  m3s_status st = step_decode(g_gpu, &f.cfg, &g.batch, &g.q_t, &g.iq_t, &g.kv_t, &g.scales,
                              &g.ic_t, &g.topk_t, &g.out_t, &g.lse_t, &g.exec);
  ok = ok && cudaStreamEndCapture(stream, &graph) == cudaSuccess && st == M3S_OK;
  ok = ok && cudaGraphInstantiate(&gexec, graph, 0) == cudaSuccess;
  if (!CHECK(ok, "graph: decode step captured and instantiated"))
    fprintf(stderr, "  status %d: %s\n", st, m3s_last_error());
  if (ok && pdl_on)
    CHECK(gpu_programmatic_edges(graph) > 0, "graph: the PDL launches left programmatic edges");
  /* replays: lengths grow by one token across block boundaries, padded rows */
  int32_t seqs[4][6] = {{2990, 2048, 128, 4000, 0, 1},
                        {2991, 2049, 129, 4001, 700, 0},
                        {3000, 0, 129, 4096, 640, 1},
                        {1, 1, 1, 1, 1, 1}};
  if (nreq == 1)
    for (int k = 0; k < 3; k++)
      seqs[k][0] = 40000 - 10 + 5 * k; /* 39990, 39995, 40000 */
  if (q_len > 1)
    for (int k = 0; k < 4; k++)
      for (int r = 0; r < 6; r++)
        if (seqs[k][r] > 0 && seqs[k][r] < q_len)
          seqs[k][r] = q_len;
  uint64_t rng = 99;
  for (int k = 0; k < 4 && ok; k++) {
    refresh_inputs(&f, &rng, seqs[k]);
    ok = gpu_fx_reupload_inputs(&g, &f) && gpu_fx_poison(&g, &f);
    ok = ok && cudaGraphLaunch(gexec, stream) == cudaSuccess &&
         cudaStreamSynchronize(stream) == cudaSuccess && gpu_fx_download(&g, &f);
    memcpy(eo, f.out_mem, ob);
    memcpy(else_, f.lse_mem, lb);
    memcpy(et, f.topk_mem, tb);
    /* eager run, same inputs */
    ok = ok && gpu_fx_poison(&g, &f);
    ok = ok && step_decode(g_gpu, &f.cfg, &g.batch, &g.q_t, &g.iq_t, &g.kv_t, &g.scales, &g.ic_t,
                           &g.topk_t, &g.out_t, &g.lse_t, &g.exec) == M3S_OK;
    ok = ok && cudaStreamSynchronize(stream) == cudaSuccess && gpu_fx_download(&g, &f);
    char msg[160];
    snprintf(msg, sizeof msg, "%s: replay %d bit-identical to eager run", name, k);
    CHECK(ok && bytes_equal(eo, f.out_mem, ob) && bytes_equal(else_, f.lse_mem, lb) &&
              bytes_equal(et, f.topk_mem, tb),
          msg);
    /* the CPU backend on the host copies: identical top-k bytes */
    snprintf(msg, sizeof msg, "%s: replay %d top-k equals the CPU backend", name, k);
    CHECK(m3s_index_topk(g_cpu, &f.cfg, &f.batch, &f.iq, &f.ic, &f.topk, NULL) == M3S_OK &&
              bytes_equal(et, f.topk_mem, tb),
          msg);
    snprintf(msg, sizeof msg, "%s: replay %d attention vs fp64", name, k);
    check_attention_vs_ref(&f, 1, msg);
  }
  if (gexec)
    cudaGraphExecDestroy(gexec);
  if (graph)
    cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
  free(eo);
  free(else_);
  free(et);
  gpu_fx_free(&g);
  fx_free(&f);
  m3s_cuda_set_pdl(g_gpu, -1);
}

int main(void) {
  g_gpu = gpu_context_or_null();
  if (!g_gpu)
    return gpu_skip("test_gpu_graph", "no CUDA device");
  if (m3s_context_create(-1, &g_cpu) != M3S_OK)
    return 1;
  /* the default rule (launch.h): PDL up to M3S_PDL_AUTO_REQS requests, on sm_90 only */
  CHECK(m3s_cuda_pdl(g_gpu, M3S_PDL_AUTO_REQS) == (gpu_sm_major() == 9) &&
            !m3s_cuda_pdl(g_gpu, M3S_PDL_AUTO_REQS + 1),
        "graph: the default PDL rule");
  graph_case(2, 1, 0, 6, "graph_decode_tp2_qlen1");
  graph_case(8, 4, 0, 6, "graph_spec_decode_tp8_qlen4");
  graph_case(1, 1, 0, 6, "graph_decode_tp1_qlen1");
  graph_case(1, 1, 1, 6, "graph_decode_tp1_qlen1_pdl");
  graph_case(8, 4, 1, 6, "graph_spec_decode_tp8_qlen4_pdl");
  graph_case(1, 1, -1, 1, "graph_decode_one_request_40k_tp1_default");
  graph_case(8, 4, -1, 1, "graph_spec_decode_one_request_40k_tp8_qlen4_default");
  m3s_context_destroy(g_cpu);
  m3s_context_destroy(g_gpu);
  return TEST_FINISH();
}
