/*
 * vllm_metadata.c -- m3s-vllm-metadata: one mixed step of a sparse MiniMax-M3
 * layer (TP2: 32 query heads, 2 KV heads, top-16) on a CPU context, driven by
 * metadata shaped as vLLM's attention backend holds it (docs/integration.md):
 *   request 0  decode, 1 + 2 speculative tokens, seq_len 8001 (63 blocks)
 *   request 1  decode, 1 + 2 speculative tokens, seq_len 400
 *   request 2  chunked prefill: 6016 cached + 40 new tokens, seq_len 6056
 *   request 3  CUDA-graph padding: seq_len 0, owns the 2 rows padding the
 *              step's 46 tokens to 48; slot mapping -1
 * query_start_loc [0,3,6,46,48], seq_lens and the two block tables (main and
 * index cache groups: rows of persistent [max_num_reqs, max_pages] buffers) are
 * int32; the main slot mapping is int64 (as vLLM's), the index one int32 (both
 * work). m3s_plan_step splits the step (decode first); m3s_tensor_narrow cuts
 * the decode and prefill slices (prefill query_start_loc [6,46,48]). The main
 * cache is token-major [P, 128, Hkv, 256], passed as a permuted view.
 * Requests 0 and 2 hide a needle (positions 700 and 1000: blocks 5 and 7):
 * its index key and key point where the request's queries look, its value is
 * 0.5. Checks (exit 1 on failure): the plan; every top-k row well formed
 * (min(16, nb) ascending ids, the local block nb-1 among them, then -1); the
 * needle block selected in every row of requests 0 and 2 and their output
 * ~0.5 (so both block tables were followed); finite outputs; padded rows give
 * top-k -1, output 0 and lse -inf.
 */
#include <m3sparse.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NREQ 4        /* requests in the step (the padded one included) */
#define MAX_REQS 8    /* vLLM's max_num_reqs: rows of the persistent buffers */
#define MAX_PAGES 64  /* vLLM's max_num_blocks_per_req: block table columns */
#define NUM_PAGES 128 /* pages of each cache group */
#define SPEC 2        /* num_speculative_tokens */

#define TRY(call)                                                                                  \
  do {                                                                                             \
    m3s_status st_ = (call);                                                                       \
    if (st_ != M3S_OK) {                                                                           \
      fprintf(stderr, "m3s-vllm-metadata: %s failed: %s\n  %s\n", #call, m3s_status_string(st_),   \
              m3s_last_error());                                                                   \
      return 1;                                                                                    \
    }                                                                                              \
  } while (0)

static int failures = 0;
#define EXPECT(cond, ...)                                                                          \
  do {                                                                                             \
    if (!(cond) && failures++ < 10) {                                                              \
      fprintf(stderr, "m3s-vllm-metadata: FAILED: " __VA_ARGS__);                                  \
      fputc('\n', stderr);                                                                         \
    }                                                                                              \
  } while (0)

static uint16_t bf16(float f) { /* round to nearest even; no NaN here */
  uint32_t u;
  memcpy(&u, &f, 4);
  return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
static float f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  return memcpy(&f, &u, 4), f;
}
/* Deterministic U(-1, 1) noise for (request, position, what, index). */
static float noise(int r, int pos, int what, int i) {
  uint64_t z = ((uint64_t)r << 48) ^ ((uint64_t)pos << 20) ^ ((uint64_t)what << 16) ^ (uint64_t)i;
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (float)((double)(z >> 11) / (double)(1ull << 52) - 1.0);
}

static int32_t bt[MAX_REQS][MAX_PAGES], ibt[MAX_REQS][MAX_PAGES]; /* the two block tables */
static const int needle_pos[4] = {700, -1, 1000, -1};             /* per request, -1: none */

/* The K/V (Hkv heads) and index key of token (r, pos), written at row t. */
static void gen_kv(int r, int pos, int t, int hkv, uint16_t *k, uint16_t *v, uint16_t *ik) {
  int needle = pos == needle_pos[r];
  for (int i = 0; i < hkv * M3S_HEAD_DIM; i++) {
    k[(size_t)t * hkv * M3S_HEAD_DIM + i] =
        bf16(needle ? (i % M3S_HEAD_DIM == 0 ? 16.0f : 0.0f) : noise(r, pos, 1, i));
    v[(size_t)t * hkv * M3S_HEAD_DIM + i] = bf16(needle ? 0.5f : noise(r, pos, 2, i));
  }
  for (int i = 0; i < M3S_HEAD_DIM; i++)
    ik[(size_t)t * M3S_HEAD_DIM + i] = bf16(needle ? (i == 0 ? 16.0f : 0.0f) : noise(r, pos, 3, i));
}

int main(void) {
  m3s_context *ctx = NULL;
  TRY(m3s_context_create(-1, &ctx)); /* CPU backend; a CUDA engine passes its device */
  const m3s_layer_config cfg = m3s_config_minimax_m3(2);
  const int hq = cfg.num_q_heads, hkv = cfg.num_kv_heads, K = cfg.topk;

  /* ---- the scheduler's view of the step (host) ---------------------------- */
  const int32_t query_lens[NREQ] = {1 + SPEC, 1 + SPEC, 40, 2};
  const int32_t seq_lens_h[NREQ] = {8001, 400, 6056, 0};
  m3s_step_desc desc = {NREQ, query_lens, seq_lens_h, SPEC};
  m3s_step_plan p;
  TRY(m3s_plan_step(ctx, &cfg, &desc, &p));
  printf("plan: %d decode requests x q_len %d (%d rows) + %d prefill requests (%d rows), "
         "max_seq_len %lld, workspace %zu B\n",
         p.num_decodes, p.decode_q_len, p.num_decode_tokens, p.num_prefills, p.num_prefill_tokens,
         (long long)p.max_seq_len, p.workspace_bytes);
  EXPECT(p.num_decodes == 2 && p.decode_q_len == 3 && p.num_decode_tokens == 6 &&
             p.num_prefills == 2 && p.num_tokens == 48,
         "unexpected plan");
  const int T = p.num_tokens;

  /* ---- vLLM's int32 metadata buffers ----------------------------------------- */
  int32_t qsl_buf[MAX_REQS + 1] = {0}, sl_buf[MAX_REQS] = {0};
  for (int r = 0; r < NREQ; r++) {
    qsl_buf[r + 1] = qsl_buf[r] + query_lens[r];
    sl_buf[r] = seq_lens_h[r];
  }
  /* Pages of the two cache groups, handed out in two different orders. */
  for (int r = 0, k = 0; r < NREQ; r++)
    for (int pg = 0; pg < (seq_lens_h[r] + 127) / 128; pg++, k++) {
      bt[r][pg] = (7 * k + 3) % NUM_PAGES;
      ibt[r][pg] = (13 * k + 5) % NUM_PAGES;
    }

  /* ---- caches: main token-major [P, 128, Hkv, 256], index [P, 128, 128] ------ */
  uint16_t *kv_mem = calloc((size_t)NUM_PAGES * 128 * hkv * 2 * M3S_HEAD_DIM, 2);
  uint16_t *ic_mem = calloc((size_t)NUM_PAGES * 128 * M3S_HEAD_DIM, 2);
  int64_t kv_shape[4] = {NUM_PAGES, hkv, 128, 2 * M3S_HEAD_DIM};
  int64_t kv_stride[4] = {(int64_t)128 * hkv * 2 * M3S_HEAD_DIM, 2 * M3S_HEAD_DIM,
                          (int64_t)hkv * 2 * M3S_HEAD_DIM, 1};
  m3s_tensor kv = m3s_tensor_strided(kv_mem, M3S_BF16, 4, kv_shape, kv_stride, M3S_HOST);
  m3s_tensor ic =
      m3s_tensor_make(ic_mem, M3S_BF16, 3, (int64_t[]){NUM_PAGES, 128, M3S_HEAD_DIM}, M3S_HOST);

  /* ---- inserts: the cached context (earlier steps), then this step's tokens --- */
  int hist = 0;
  for (int r = 0; r < NREQ; r++)
    hist += seq_lens_h[r] ? seq_lens_h[r] - query_lens[r] : 0;
  int rows = hist > T ? hist : T;
  uint16_t *k = calloc((size_t)rows * hkv * M3S_HEAD_DIM, 2),
           *v = calloc((size_t)rows * hkv * M3S_HEAD_DIM, 2);
  uint16_t *ik = calloc((size_t)rows * M3S_HEAD_DIM, 2);
  int64_t *slot = malloc((size_t)rows * sizeof *slot);   /* main group: int64 (vLLM) */
  int32_t *islot = malloc((size_t)rows * sizeof *islot); /* index group: int32 works too */
  uint16_t *q = calloc((size_t)T * hq * M3S_HEAD_DIM, 2),
           *iq = calloc((size_t)T * hkv * M3S_HEAD_DIM, 2);
  uint16_t *out = malloc((size_t)T * hq * M3S_HEAD_DIM * 2);
  float *lse = malloc((size_t)T * hq * sizeof *lse);
  int32_t *topk = malloc((size_t)T * hkv * K * sizeof *topk);
  if (!kv_mem || !ic_mem || !k || !v || !ik || !slot || !islot || !q || !iq || !out || !lse ||
      !topk)
    return fprintf(stderr, "m3s-vllm-metadata: out of memory\n"), 1;
  for (int pass = 0; pass < 2; pass++) { /* 0: history, 1: this step */
    int t = 0;
    for (int r = 0; r < NREQ; r++) {
      int first = seq_lens_h[r] ? seq_lens_h[r] - query_lens[r] : 0;
      int from = pass ? first : 0, to = pass ? first + query_lens[r] : first;
      for (int pos = from; pos < to; pos++, t++) {
        if (!seq_lens_h[r]) { /* padding row: skipped by the insert */
          slot[t] = islot[t] = -1;
          continue;
        }
        gen_kv(r, pos, t, hkv, k, v, ik);
        slot[t] = (int64_t)bt[r][pos / 128] * 128 + pos % 128;
        islot[t] = ibt[r][pos / 128] * 128 + pos % 128;
        int ask = needle_pos[r] >= 0; /* requests 0 and 2 look for their needle */
        for (int i = 0; pass && i < hq * M3S_HEAD_DIM; i++)
          q[(size_t)t * hq * M3S_HEAD_DIM + i] =
              bf16(ask && i % M3S_HEAD_DIM == 0 ? 16.0f : noise(r, pos, 4, i));
        for (int i = 0; pass && i < hkv * M3S_HEAD_DIM; i++)
          iq[(size_t)t * hkv * M3S_HEAD_DIM + i] =
              bf16(ask ? (i % M3S_HEAD_DIM == 0 ? 2.0f : 0.5f * noise(r, pos, 5, i))
                       : noise(r, pos, 5, i));
      }
    }
    int64_t n = t;
    m3s_tensor kt = m3s_tensor_make(k, M3S_BF16, 3, (int64_t[]){n, hkv, M3S_HEAD_DIM}, M3S_HOST);
    m3s_tensor vt = m3s_tensor_make(v, M3S_BF16, 3, (int64_t[]){n, hkv, M3S_HEAD_DIM}, M3S_HOST);
    m3s_tensor ikt = m3s_tensor_make(ik, M3S_BF16, 2, (int64_t[]){n, M3S_HEAD_DIM}, M3S_HOST);
    m3s_tensor st = m3s_tensor_make(slot, M3S_I64, 1, &n, M3S_HOST);
    m3s_tensor ist = m3s_tensor_make(islot, M3S_I32, 1, &n, M3S_HOST);
    TRY(m3s_cache_insert(ctx, &kt, &vt, &st, &kv, NULL, NULL));
    TRY(m3s_index_cache_insert(ctx, &ikt, &ist, &ic, NULL));
  }

  /* ---- the decode and prefill slices of the step's metadata ------------------ */
  m3s_tensor qsl = m3s_tensor_make(qsl_buf, M3S_I32, 1, (int64_t[]){NREQ + 1}, M3S_HOST);
  m3s_tensor sl = m3s_tensor_make(sl_buf, M3S_I32, 1, (int64_t[]){NREQ}, M3S_HOST);
  m3s_tensor btt = m3s_tensor_make(bt, M3S_I32, 2, (int64_t[]){MAX_REQS, MAX_PAGES}, M3S_HOST);
  m3s_tensor ibtt = m3s_tensor_make(ibt, M3S_I32, 2, (int64_t[]){MAX_REQS, MAX_PAGES}, M3S_HOST);
  const int nd = p.num_decodes, np = p.num_prefills;
  m3s_step step;
  memset(&step, 0, sizeof step);
  step.decode = (m3s_batch){.num_reqs = nd,
                            .num_tokens = p.num_decode_tokens,
                            .uniform_q_len = p.decode_q_len,
                            .max_q_len = p.decode_q_len,
                            .max_seq_len = p.max_seq_len,
                            .seq_lens = m3s_tensor_narrow(&sl, 0, nd),
                            .block_table = m3s_tensor_narrow(&btt, 0, nd),
                            .index_block_table = m3s_tensor_narrow(&ibtt, 0, nd)};
  step.prefill = (m3s_batch){.num_reqs = np,
                             .num_tokens = p.num_prefill_tokens,
                             .max_q_len = p.max_prefill_q_len,
                             .max_seq_len = p.max_seq_len,
                             .query_start_loc = m3s_tensor_narrow(&qsl, nd, np + 1),
                             .seq_lens = m3s_tensor_narrow(&sl, nd, np),
                             .block_table = m3s_tensor_narrow(&btt, nd, np),
                             .index_block_table = m3s_tensor_narrow(&ibtt, nd, np)};
  const int32_t *pq = step.prefill.query_start_loc.data; /* = qsl_buf + nd */
  printf("prefill query_start_loc slice: [%d, %d, %d]\n", pq[0], pq[1], pq[2]);
  EXPECT(pq[0] == p.num_decode_tokens, "prefill slice starts at %d", pq[0]);

  /* ---- workspace from host upper bounds (what a graph capture would size) ---- */
  size_t ws_bytes = 0;
  TRY(m3s_workspace_size(ctx, &cfg, T, 8192, &ws_bytes)); /* max_model_len 8192 */
  EXPECT(ws_bytes >= p.workspace_bytes, "workspace bound %zu < plan %zu", ws_bytes,
         p.workspace_bytes);
  void *ws = ws_bytes ? malloc(ws_bytes) : NULL;
  m3s_exec ex = {ws, ws_bytes, NULL};

  /* ---- the layer: indexer top-k + sparse attention, decode then prefill ----- */
  m3s_tensor qt = m3s_tensor_make(q, M3S_BF16, 3, (int64_t[]){T, hq, M3S_HEAD_DIM}, M3S_HOST);
  m3s_tensor iqt = m3s_tensor_make(iq, M3S_BF16, 3, (int64_t[]){T, hkv, M3S_HEAD_DIM}, M3S_HOST);
  m3s_tensor tkt = m3s_tensor_make(topk, M3S_I32, 3, (int64_t[]){T, hkv, K}, M3S_HOST);
  m3s_tensor ot = m3s_tensor_make(out, M3S_BF16, 3, (int64_t[]){T, hq, M3S_HEAD_DIM}, M3S_HOST);
  m3s_tensor lt = m3s_tensor_make(lse, M3S_F32, 2, (int64_t[]){T, hq}, M3S_HOST);
  memset(topk, 0x5A, (size_t)T * hkv * K * sizeof *topk); /* garbage: must be overwritten */
  memset(out, 0x5A, (size_t)T * hq * M3S_HEAD_DIM * 2);
  TRY(m3s_step_forward(ctx, &cfg, &step, &qt, &iqt, &kv, NULL, &ic, &tkt, &ot, &lt, &ex));

  /* ---- print and check ------------------------------------------------------ */
  for (int r = 0, t = 0; r < NREQ; r++)
    for (int i = 0; i < query_lens[r]; i++, t++) {
      int pad = seq_lens_h[r] == 0, pos = seq_lens_h[r] - query_lens[r] + i;
      int nb = pad ? 0 : pos / 128 + 1, n = nb < K ? nb : K;
      int show = t == 0 || t == 5 || t == 6 || t == T - 3 || t == T - 1;
      for (int g = 0; g < hkv; g++) {
        const int32_t *row = topk + ((size_t)t * hkv + g) * K;
        int ok = 1, needle = 0, local = pad;
        for (int j = 0; j < K; j++) {
          if (j >= n)
            ok &= row[j] == -1;
          else
            ok &= row[j] >= 0 && row[j] < nb && (j == 0 || row[j] > row[j - 1]);
          needle |= j < n && row[j] == needle_pos[r] / 128;
          local |= j < n && row[j] == nb - 1;
        }
        EXPECT(ok && local, "row %d head %d: malformed top-k row", t, g);
        EXPECT(needle_pos[r] < 0 || needle, "row %d head %d: the needle block is not selected", t,
               g);
        if (show && (g == 0 || t == 0)) {
          static const char *kind[3] = {"decode", "prefill", "padding"};
          printf("row %2d (req %d, %s, pos %d, %2d blocks) head %d top-k:", t, r,
                 kind[pad ? 2 : r >= nd], pad ? -1 : pos, nb, g);
          for (int j = 0; j < K; j++)
            printf(" %d", row[j]);
          printf("\n");
        }
      }
      for (int h = 0; h < hq; h++) {
        float l = lse[(size_t)t * hq + h];
        EXPECT(pad ? (isinf(l) && l < 0) : isfinite(l), "row %d head %d: lse %g", t, h, l);
        for (int d = 0; d < M3S_HEAD_DIM; d++) {
          uint16_t o = out[((size_t)t * hq + h) * M3S_HEAD_DIM + d];
          EXPECT(!pad || o == 0, "padded row %d head %d: output not 0", t, h);
          EXPECT(pad || isfinite(f32(o)), "row %d head %d: output not finite", t, h);
          EXPECT(needle_pos[r] < 0 || fabsf(f32(o) - 0.5f) < 0.05f,
                 "row %d head %d dim %d: output %g, expected the needle's value 0.5", t, h, d,
                 f32(o));
        }
      }
    }
  printf("requests 0 and 2 read their needles: out[0][0][0] = %.3f, out[45][31][127] = %.3f "
         "(value 0.5)\n",
         f32(out[0]), f32(out[(size_t)46 * hq * M3S_HEAD_DIM - 1]));

  free(ws), free(kv_mem), free(ic_mem), free(k), free(v), free(ik), free(slot), free(islot);
  free(q), free(iq), free(out), free(lse), free(topk);
  m3s_context_destroy(ctx);
  if (failures)
    return fprintf(stderr, "m3s-vllm-metadata: %d check(s) FAILED\n", failures), 1;
  return printf("m3s-vllm-metadata: OK\n"), 0;
}
