/* minimal.c -- the smallest complete m3sparse program: one MiniMax-M3 layer
 * (TP8: 8 query heads, 1 KV head, top-16 of 128-token blocks) on the CPU
 * backend. It writes a 300-token prompt's keys into the paged caches, runs one
 * prefill step (indexer top-k + sparse attention) and prints what the last
 * token selected and attended. Everything lives in host memory; with a CUDA
 * context the same calls take device pointers (docs/integration.md).
 *
 * Build against an installed library (README "Link or install"):
 *   cc minimal.c -o minimal $(pkg-config --cflags --libs m3sparse)
 * adding -Wl,-rpath,$(pkg-config --variable=libdir m3sparse) when the prefix
 * is not a system library directory
 * or, in this repository: cmake --build build && ./build/examples/m3s-minimal */
#include <m3sparse.h>

#include <stdio.h>
#include <string.h>

#define TOKENS 300 /* prompt length: 3 pages of 128 tokens */
#define PAGES 3
#define HQ 8
#define HKV 1

/* bf16 is the upper half of an fp32; truncation is enough for test data. */
static uint16_t bf16(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return (uint16_t)(u >> 16);
}

static float f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
}

/* uniform values in [-0.5, 0.5) from a 32-bit LCG */
static void fill(uint16_t *p, size_t n, uint32_t *seed) {
  for (size_t i = 0; i < n; i++) {
    *seed = *seed * 1664525u + 1013904223u;
    p[i] = bf16((float)(*seed >> 8) / 16777216.0f - 0.5f);
  }
}

static int check(m3s_status st, const char *what) {
  if (st == M3S_OK)
    return 1;
  fprintf(stderr, "%s failed: %s\n  %s\n", what, m3s_status_string(st), m3s_last_error());
  return 0;
}

int main(void) {
  static uint16_t kv_mem[PAGES][HKV][M3S_BLOCK_SIZE][2 * M3S_HEAD_DIM];
  static uint16_t ic_mem[PAGES][M3S_BLOCK_SIZE][M3S_INDEX_DIM];
  static uint16_t k[TOKENS][HKV][M3S_HEAD_DIM], v[TOKENS][HKV][M3S_HEAD_DIM],
      ik[TOKENS][M3S_INDEX_DIM];
  static uint16_t q[TOKENS][HQ][M3S_HEAD_DIM], iq[TOKENS][HKV][M3S_INDEX_DIM],
      out[TOKENS][HQ][M3S_HEAD_DIM];
  static float lse[TOKENS][HQ];
  static int32_t topk[TOKENS][HKV][16]; /* cfg.topk = 16 */
  int64_t slots[TOKENS];
  int32_t table[1][PAGES] = {{2, 0, 1}}; /* logical page p of the request -> physical page */
  int32_t qsl[2] = {0, TOKENS}, seq_lens[1] = {TOKENS};
  uint32_t seed = 1;
  fill(&k[0][0][0], sizeof k / 2, &seed);
  fill(&v[0][0][0], sizeof v / 2, &seed);
  fill(&ik[0][0], sizeof ik / 2, &seed);
  fill(&q[0][0][0], sizeof q / 2, &seed);
  fill(&iq[0][0][0], sizeof iq / 2, &seed);
  for (int t = 0; t < TOKENS; t++)
    slots[t] = (int64_t)table[0][t / M3S_BLOCK_SIZE] * M3S_BLOCK_SIZE + t % M3S_BLOCK_SIZE;

  m3s_context *ctx = NULL;
  if (!check(m3s_context_create(-1, &ctx), "m3s_context_create")) /* -1: CPU; 0: CUDA 0 */
    return 1;
  m3s_layer_config cfg = m3s_config_minimax_m3(8);

  /* views: data, dtype, ndim, shape, device (strides default to row-major) */
  /* a page holds 128 tokens x (K, V): K in [0, 128), V in [128, 256) */
  int64_t kv_shape[4] = {PAGES, HKV, M3S_BLOCK_SIZE, 2 * M3S_HEAD_DIM};
  m3s_tensor kv = m3s_tensor_make(kv_mem, M3S_BF16, 4, kv_shape, M3S_HOST);
  m3s_tensor ic = m3s_tensor_make(ic_mem, M3S_BF16, 3,
                                  (int64_t[]){PAGES, M3S_BLOCK_SIZE, M3S_INDEX_DIM}, M3S_HOST);
  m3s_tensor tk = m3s_tensor_make(k, M3S_BF16, 3, (int64_t[]){TOKENS, HKV, M3S_HEAD_DIM}, M3S_HOST);
  m3s_tensor tv = m3s_tensor_make(v, M3S_BF16, 3, (int64_t[]){TOKENS, HKV, M3S_HEAD_DIM}, M3S_HOST);
  m3s_tensor tik = m3s_tensor_make(ik, M3S_BF16, 2, (int64_t[]){TOKENS, M3S_INDEX_DIM}, M3S_HOST);
  m3s_tensor ts = m3s_tensor_make(slots, M3S_I64, 1, (int64_t[]){TOKENS}, M3S_HOST);
  m3s_tensor tq = m3s_tensor_make(q, M3S_BF16, 3, (int64_t[]){TOKENS, HQ, M3S_HEAD_DIM}, M3S_HOST);
  m3s_tensor tiq =
      m3s_tensor_make(iq, M3S_BF16, 3, (int64_t[]){TOKENS, HKV, M3S_INDEX_DIM}, M3S_HOST);
  m3s_tensor tout =
      m3s_tensor_make(out, M3S_BF16, 3, (int64_t[]){TOKENS, HQ, M3S_HEAD_DIM}, M3S_HOST);
  m3s_tensor tlse = m3s_tensor_make(lse, M3S_F32, 2, (int64_t[]){TOKENS, HQ}, M3S_HOST);
  m3s_tensor ttopk = m3s_tensor_make(topk, M3S_I32, 3, (int64_t[]){TOKENS, HKV, 16}, M3S_HOST);

  /* one prefill request: TOKENS new tokens, nothing cached before them */
  m3s_batch b = {.num_reqs = 1, .num_tokens = TOKENS, .max_q_len = TOKENS, .max_seq_len = TOKENS};
  b.query_start_loc = m3s_tensor_make(qsl, M3S_I32, 1, (int64_t[]){2}, M3S_HOST);
  b.seq_lens = m3s_tensor_make(seq_lens, M3S_I32, 1, (int64_t[]){1}, M3S_HOST);
  b.block_table = m3s_tensor_make(table, M3S_I32, 2, (int64_t[]){1, PAGES}, M3S_HOST);
  b.index_block_table = b.block_table; /* both caches use the same pages here */
  m3s_step step = {.prefill = b};        /* no decode requests in this step */

  int ok = check(m3s_cache_insert(ctx, &tk, &tv, &ts, &kv, NULL, NULL), "m3s_cache_insert") &&
           check(m3s_index_cache_insert(ctx, &tik, &ts, &ic, NULL), "m3s_index_cache_insert") &&
           check(m3s_step_forward(ctx, &cfg, &step, &tq, &tiq, &kv, NULL, &ic, &ttopk, &tout,
                                  &tlse, NULL),
                 "m3s_step_forward");
  if (ok) {
    const int t = TOKENS - 1; /* the last token sees all 3 blocks */
    printf("token %d selected blocks:", t);
    for (int j = 0; j < 16 && topk[t][0][j] >= 0; j++)
      printf(" %d", topk[t][0][j]);
    printf("\nhead 0: out[0..3] = %.4f %.4f %.4f %.4f, lse = %.4f\n", f32(out[t][0][0]),
           f32(out[t][0][1]), f32(out[t][0][2]), f32(out[t][0][3]), lse[t][0]);
  }
  m3s_context_destroy(ctx);
  return ok ? 0 : 1;
}
