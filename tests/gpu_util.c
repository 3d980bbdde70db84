/* GPU test support (see gpu_util.h). */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */
#include "gpu_util.h"
#include "gpu_probe.h"
#include "test_util.h"

#include <stdlib.h>
#include <time.h>

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <string.h>

double gpu_now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

int gpu_sm_major(void) {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return 0;
  return major;
}

int gpu_programmatic_edges(struct CUgraph_st *graph) {
  size_t n = 0;
  if (cudaGraphGetEdges(graph, NULL, NULL, NULL, &n) != cudaSuccess)
    return -1;
  cudaGraphNode_t *from = (cudaGraphNode_t *)calloc(n + 1, sizeof *from);
  cudaGraphNode_t *to = (cudaGraphNode_t *)calloc(n + 1, sizeof *to);
  cudaGraphEdgeData *ed = (cudaGraphEdgeData *)calloc(n + 1, sizeof *ed);
  int count = -1;
  if (from && to && ed && cudaGraphGetEdges(graph, from, to, ed, &n) == cudaSuccess) {
    count = 0;
    for (size_t i = 0; i < n; i++)
      count += ed[i].type == cudaGraphDependencyTypeProgrammatic;
  }
  free(from);
  free(to);
  free(ed);
  return count;
}

int gpu_env_flag(const char *name) {
  const char *v = getenv(name);
  return v && v[0] && strcmp(v, "0") != 0;
}

/* Guard zones: every device buffer a GPU test allocates through gpu_dup sits
 * between two GUARD_BYTES zones filled with GUARD_BYTE. gpu_guards_check()
 * (called after every downloaded run) and gpu_free() read the zones back and
 * count one failed check per corrupted zone, so a kernel that writes past
 * either end of a cache, an output or the workspace fails the test even when
 * the write lands in memory the CUDA allocator considers valid. A fixed
 * table (test code only) remembers the live allocations. */
enum { GUARD_BYTES = 4096, GUARD_BYTE = 0xC3, GUARD_MAX = 1024 };
typedef struct {
  unsigned char *base; /* cudaMalloc result; user pointer = base + GUARD_BYTES */
  size_t n;            /* user bytes */
} guard_entry;
static guard_entry g_guards[GUARD_MAX];

static int guard_intact(const guard_entry *e) {
  unsigned char zone[GUARD_BYTES];
  const unsigned char *where[2] = {e->base, e->base + GUARD_BYTES + e->n};
  for (int z = 0; z < 2; ++z) {
    if (cudaMemcpy(zone, where[z], GUARD_BYTES, cudaMemcpyDeviceToHost) != cudaSuccess)
      return 0;
    for (int i = 0; i < GUARD_BYTES; ++i)
      if (zone[i] != GUARD_BYTE) {
        fprintf(stderr, "guard zone %s buffer %p (%zu bytes) corrupted at byte %d: 0x%02x\n",
                z ? "after" : "before", (void *)(e->base + GUARD_BYTES), e->n, i, zone[i]);
        return 0;
      }
  }
  return 1;
}

int gpu_guards_check(void) {
  int ok = 1;
  for (int i = 0; i < GUARD_MAX; ++i)
    if (g_guards[i].base)
      ok &= CHECK(guard_intact(&g_guards[i]), "guard zones around a device buffer intact");
  return ok;
}

void *gpu_dup(const void *host, size_t n) {
  int slot = 0;
  while (slot < GUARD_MAX && g_guards[slot].base)
    ++slot;
  if (slot == GUARD_MAX) {
    fprintf(stderr, "gpu_dup: more than %d live device buffers\n", GUARD_MAX);
    return NULL;
  }
  unsigned char *base = NULL;
  if (cudaMalloc((void **)&base, n + 2 * (size_t)GUARD_BYTES) != cudaSuccess)
    return NULL;
  unsigned char *d = base + GUARD_BYTES;
  if (cudaMemset(base, GUARD_BYTE, GUARD_BYTES) != cudaSuccess ||
      cudaMemset(d + n, GUARD_BYTE, GUARD_BYTES) != cudaSuccess ||
      (host && n && cudaMemcpy(d, host, n, cudaMemcpyHostToDevice) != cudaSuccess)) {
    cudaFree(base);
    return NULL;
  }
  g_guards[slot].base = base;
  g_guards[slot].n = n;
  return d;
}

int gpu_get(void *host, const void *dev, size_t n) {
  return cudaMemcpy(host, dev, n, cudaMemcpyDeviceToHost) == cudaSuccess;
}

int gpu_put(void *dev, const void *host, size_t n) {
  return cudaMemcpy(dev, host, n, cudaMemcpyHostToDevice) == cudaSuccess;
}

void gpu_free(void *p) {
  if (!p)
    return;
  for (int i = 0; i < GUARD_MAX; ++i)
    if (g_guards[i].base && g_guards[i].base + GUARD_BYTES == (unsigned char *)p) {
      CHECK(guard_intact(&g_guards[i]), "guard zones intact when the buffer is freed");
      cudaFree(g_guards[i].base);
      g_guards[i].base = NULL;
      return;
    }
  fprintf(stderr, "gpu_free: %p was not allocated by gpu_dup\n", p);
  CHECK(0, "gpu_free of a buffer gpu_dup allocated");
}

int gpu_sync(void) {
  cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess)
    fprintf(stderr, "cudaDeviceSynchronize: %s\n", cudaGetErrorString(e));
  return e == cudaSuccess;
}

/* A machine without a GPU skips (gpu_probe() == 0: no driver, the stub
 * library, zero devices). On a machine with a GPU, every later failure is a
 * failure, never a skip: a runtime that cannot see the driver's devices
 * (driver/runtime mismatch), a failing m3s_context_create(0). */
static char g_skip_why[300] = "no CUDA device";

static void gpu_broken(const char *what) {
  fprintf(stderr, "FAIL: a GPU is present but %s\n", what);
  CHECK(0, "GPU machine: CUDA runtime and m3s_context_create(0) work");
  test_finish_(); /* prints the summary with the failed check */
  exit(1);
}

m3s_context *gpu_context_or_null(void) {
  int probe = gpu_probe();
  if (probe == 0) {
    snprintf(g_skip_why, sizeof g_skip_why, "%s", gpu_probe_why());
    return NULL;
  }
  char what[600];
  if (probe < 0)
    gpu_broken(gpu_probe_why());
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess || n == 0) {
    snprintf(what, sizeof what, "cudaGetDeviceCount gives %s, %d device(s) (%s)",
             e == cudaSuccess ? "success" : cudaGetErrorString(e), n, gpu_probe_why());
    gpu_broken(what);
  }
  m3s_context *ctx = NULL;
  if (m3s_context_create(0, &ctx) != M3S_OK) {
    snprintf(what, sizeof what, "m3s_context_create(0) failed: %s", m3s_last_error());
    gpu_broken(what);
  }
  return ctx;
}

int gpu_skip(const char *test_name, const char *why) {
  if (why && strcmp(why, "no CUDA device") == 0)
    why = g_skip_why; /* the probe's reason */
  printf("%s: skipped (%s)\n", test_name, why);
  printf("0 passed, 0 failed, 1 skipped\n");
  return GPU_SKIP;
}

/* Sizes of the fixture's buffers, in bytes. */
static size_t kv_bytes(const fixture *f) {
  return (size_t)(f->num_pages * f->cfg.num_kv_heads * 128 * 256) * m3s_dtype_size(f->sp.kv_dtype);
}
static size_t ic_bytes(const fixture *f) {
  return (size_t)(f->num_pages * 128 * 128) * m3s_dtype_size(f->sp.idx_dtype);
}
static size_t q_bytes(const fixture *f) { return (size_t)f->T * f->cfg.num_q_heads * 128 * 2 + 2; }
static size_t iq_bytes(const fixture *f) {
  return (size_t)f->T * f->cfg.num_kv_heads * 128 * 2 + 2;
}
static size_t lse_bytes(const fixture *f) {
  return sizeof(float) * ((size_t)f->T * f->cfg.num_q_heads + 1);
}
static size_t topk_bytes(const fixture *f) {
  return sizeof(int32_t) * ((size_t)f->T * f->cfg.num_kv_heads * f->cfg.topk + 1);
}
static size_t table_bytes(const fixture *f) {
  return sizeof(int32_t) * (size_t)(f->sp.num_reqs * f->batch.block_table.stride[0] + 1);
}
static size_t scale_bytes(const fixture *f) {
  if (!f->ks_mem)
    return 0;
  return f->sp.scale_mode == 1 ? sizeof(float)
                               : sizeof(float) * (size_t)(f->cfg.num_kv_heads * f->num_pages * 128);
}

static m3s_tensor on_device(m3s_tensor t, void *data) {
  t.data = data;
  t.device = 0;
  return t;
}

int gpu_fx_upload(gpu_fx *g, const fixture *f, m3s_context *ctx) {
  memset(g, 0, sizeof *g);
  g->kv = gpu_dup(f->kv_mem, kv_bytes(f));
  g->ic = gpu_dup(f->ic_mem, ic_bytes(f));
  g->q = gpu_dup(f->q_mem, q_bytes(f));
  g->iq = gpu_dup(f->iq_mem, iq_bytes(f));
  g->out = gpu_dup(NULL, q_bytes(f));
  g->lse = gpu_dup(NULL, lse_bytes(f));
  g->topk = gpu_dup(NULL, topk_bytes(f));
  g->qsl = gpu_dup(f->qsl, sizeof(int32_t) * (size_t)(f->sp.num_reqs + 1));
  g->seq = gpu_dup(f->seqlens, sizeof(int32_t) * (size_t)(f->sp.num_reqs + 1));
  g->bt = gpu_dup(f->bt, table_bytes(f));
  g->ibt = gpu_dup(f->ibt, table_bytes(f));
  if (f->ks_mem) {
    g->ks = gpu_dup(f->ks_mem, scale_bytes(f));
    g->vs = gpu_dup(f->vs_mem, scale_bytes(f));
  }
  if (!g->kv || !g->ic || !g->q || !g->iq || !g->out || !g->lse || !g->topk || !g->qsl || !g->seq ||
      !g->bt || !g->ibt || (f->ks_mem && (!g->ks || !g->vs)))
    return 0;
  g->kv_t = on_device(f->kv, g->kv);
  g->ic_t = on_device(f->ic, g->ic);
  g->q_t = on_device(f->q, g->q);
  g->iq_t = on_device(f->iq, g->iq);
  g->out_t = on_device(f->out, g->out);
  g->lse_t = on_device(f->lse, g->lse);
  g->topk_t = on_device(f->topk, g->topk);
  g->scales = f->scales;
  if (f->ks_mem) {
    g->scales.k_scale = on_device(f->scales.k_scale, g->ks);
    g->scales.v_scale = on_device(f->scales.v_scale, g->vs);
  }
  g->batch = f->batch;
  g->batch.query_start_loc = on_device(f->batch.query_start_loc, g->qsl);
  g->batch.seq_lens = on_device(f->batch.seq_lens, g->seq);
  g->batch.block_table = on_device(f->batch.block_table, g->bt);
  g->batch.index_block_table = on_device(f->batch.index_block_table, g->ibt);
  if (m3s_workspace_size(ctx, &f->cfg, f->T, f->batch.max_seq_len, &g->ws_bytes) != M3S_OK)
    return 0;
  if (g->ws_bytes && !(g->ws = gpu_dup(NULL, g->ws_bytes)))
    return 0;
  g->exec.workspace = g->ws;
  g->exec.workspace_bytes = g->ws_bytes;
  g->exec.stream = NULL;
  return 1;
}

fixture gpu_fx_views(const fixture *f, const gpu_fx *g) {
  fixture d = *f;
  d.batch = g->batch;
  d.kv = g->kv_t, d.ic = g->ic_t, d.q = g->q_t, d.iq = g->iq_t;
  d.out = g->out_t, d.lse = g->lse_t, d.topk = g->topk_t;
  d.scales = g->scales;
  return d;
}

int gpu_fx_reupload_inputs(gpu_fx *g, const fixture *f) {
  return gpu_put(g->kv, f->kv_mem, kv_bytes(f)) && gpu_put(g->ic, f->ic_mem, ic_bytes(f)) &&
         gpu_put(g->q, f->q_mem, q_bytes(f)) && gpu_put(g->iq, f->iq_mem, iq_bytes(f)) &&
         gpu_put(g->qsl, f->qsl, sizeof(int32_t) * (size_t)(f->sp.num_reqs + 1)) &&
         gpu_put(g->seq, f->seqlens, sizeof(int32_t) * (size_t)(f->sp.num_reqs + 1)) &&
         gpu_put(g->bt, f->bt, table_bytes(f)) && gpu_put(g->ibt, f->ibt, table_bytes(f)) &&
         (!f->ks_mem ||
          (gpu_put(g->ks, f->ks_mem, scale_bytes(f)) && gpu_put(g->vs, f->vs_mem, scale_bytes(f))));
}

int gpu_fx_poison(gpu_fx *g, fixture *f) {
  fx_poison(f);
  return gpu_fx_put_outputs(g, f);
}

int gpu_fx_put_outputs(gpu_fx *g, const fixture *f) {
  return gpu_put(g->out, f->out_mem, q_bytes(f)) && gpu_put(g->lse, f->lse_mem, lse_bytes(f)) &&
         gpu_put(g->topk, f->topk_mem, topk_bytes(f));
}

int gpu_fx_download(gpu_fx *g, fixture *f) {
  return gpu_sync() && gpu_guards_check() && gpu_get(f->out_mem, g->out, q_bytes(f)) &&
         gpu_get(f->lse_mem, g->lse, lse_bytes(f)) && gpu_get(f->topk_mem, g->topk, topk_bytes(f));
}

int gpu_fx_upload_topk(gpu_fx *g, const fixture *f) {
  return gpu_put(g->topk, f->topk_mem, topk_bytes(f));
}

void gpu_fx_free(gpu_fx *g) {
  gpu_free(g->kv);
  gpu_free(g->ic);
  gpu_free(g->q);
  gpu_free(g->iq);
  gpu_free(g->out);
  gpu_free(g->lse);
  gpu_free(g->topk);
  gpu_free(g->ks);
  gpu_free(g->vs);
  gpu_free(g->qsl);
  gpu_free(g->seq);
  gpu_free(g->bt);
  gpu_free(g->ibt);
  gpu_free(g->ws);
  memset(g, 0, sizeof *g);
}
