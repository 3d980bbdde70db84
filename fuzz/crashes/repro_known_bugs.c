/* repro_known_bugs.c -- the library bugs found by fuzz/fuzz_api.c, as direct
 * calls of the public API on the CPU backend (details: docs/reliability.md,
 * "Bugs found by fuzzing").
 *
 * Build: the m3s-fuzz-repro target of fuzz/CMakeLists.txt (ASan + UBSan with
 * recoverable reports, so every case runs), or
 *   clang -std=c11 -g -fsanitize=address,undefined -Iinclude -Isrc \
 *     fuzz/crashes/repro_known_bugs.c src/core/[*].c src/cpu/[*].c -lm -o repro
 *   (the brackets only keep this comment well-formed; type src/core/ *.c)
 * Run:   ./repro [bug number]   (no argument: all)
 * A case prints "BUG n: ..." when a wrong result is visible through the API,
 * "ok  n: ..." otherwise; undefined behaviour shows as "runtime error:" lines
 * of UBSan printed just before the case's own lines (a case whose only symptom
 * is UB says so). Exit status: the number of wrong results (UBSan reports are
 * not counted: read them, or set UBSAN_OPTIONS=halt_on_error=1 to abort on the
 * first). When every bug is fixed there is no "BUG" and no "runtime error"
 * line, and the status is 0. */
#include "m3sparse.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static m3s_context *ctx;
static int wrong;

static void report(int bug, int bad, const char *what) {
  printf("%s %d: %s\n", bad ? "BUG" : "ok ", bug, what);
  wrong += bad;
}
static void ub_only(int bug, const char *where) {
  printf("ub  %d: a \"runtime error\" line just above = undefined behaviour still in %s\n", bug,
         where);
}

static m3s_layer_config small_cfg(int hq, int hkv, int k) {
  m3s_layer_config c = m3s_config_minimax_m3(8);
  c.num_q_heads = hq;
  c.num_kv_heads = hkv;
  c.topk = k;
  c.local_blocks = 1;
  c.init_blocks = 0;
  return c;
}

/* Bug 1: m3s_check_scales computes cache->shape[0] * 128 in int64 without a
 * check. A K/V cache view with a huge page count and stride[0] == 0 is a valid
 * input view (strides >= 0, every offset fits); with an fp8 dtype and scales
 * given, validation overflows. Reached from m3s_sparse_attention,
 * m3s_k2q_attention and m3s_step_forward. */
static void bug1(void) {
  m3s_layer_config cfg = small_cfg(8, 1, 4);
  static uint8_t kv_mem[128 * 256];
  float ks = 1.0f;
  int64_t shape[4] = {(int64_t)1 << 57, 1, 128, 256}, stride[4] = {0, 128 * 256, 256, 1};
  m3s_tensor kv = m3s_tensor_strided(kv_mem, M3S_E4M3, 4, shape, stride, M3S_HOST);
  m3s_kv_scales sc;
  memset(&sc, 0, sizeof sc);
  sc.k_scale = m3s_tensor_make(&ks, M3S_F32, 0, NULL, M3S_HOST);
  m3s_batch b;
  memset(&b, 0, sizeof b); /* an empty batch: the call is valid */
  m3s_tensor q, tk, out;
  int64_t qs[3] = {0, 8, 128}, ts[3] = {0, 1, 4};
  q = m3s_tensor_make(NULL, M3S_BF16, 3, qs, M3S_HOST);
  tk = m3s_tensor_make(NULL, M3S_I32, 3, ts, M3S_HOST);
  out = m3s_tensor_make(NULL, M3S_BF16, 3, qs, M3S_HOST);
  m3s_status st = m3s_sparse_attention(ctx, &cfg, &b, &q, &kv, &sc, &tk, &out, NULL, NULL);
  printf("       m3s_sparse_attention(kv [2^57 (stride 0), 1, 128, 256] e4m3, scalar k_scale) "
         "= %d %s\n",
         (int)st, m3s_last_error());
  ub_only(1, "m3s_check_scales (src/core/validate.c)");
}

/* Bug 2: m3s_plan_step computes num_decodes * decode_q_len in int: with
 * 2,100,000 decode requests of query length 1025 (num_spec_tokens 1024) the
 * product wraps before the "more than 2^30 tokens" check; the wrapped negative
 * count then fails inside m3s_workspace_size, so the call returns
 * M3S_ERR_INVALID with a message about m3s_workspace_size's max_tokens
 * instead of M3S_ERR_BATCH (other request counts can wrap to a positive
 * count and give M3S_OK with a wrong plan). */
static void bug2(void) {
  m3s_layer_config cfg = small_cfg(8, 1, 16);
  int n = 2100000;
  int32_t *ql = malloc(sizeof(int32_t) * (size_t)n), *sl = malloc(sizeof(int32_t) * (size_t)n);
  for (int r = 0; r < n; r++)
    ql[r] = 1025, sl[r] = 2000;
  m3s_step_desc d = {n, ql, sl, 1024};
  m3s_step_plan p;
  memset(&p, 0, sizeof p);
  m3s_status st = m3s_plan_step(ctx, &cfg, &d, &p);
  printf("       m3s_plan_step(2.1M requests x 1025 tokens) = %d, num_decode_tokens %d, "
         "num_tokens %d  %s\n",
         (int)st, p.num_decode_tokens, p.num_tokens, m3s_last_error());
  report(2, st != M3S_ERR_BATCH || strncmp(m3s_last_error(), "m3s_plan_step", 13) != 0,
         "want M3S_ERR_BATCH from m3s_plan_step (\"more than 2^30 tokens\")");
  free(ql);
  free(sl);
}

/* Bug 3: m3s_check_contiguous (and m3s_check_no_self_overlap) judge the
 * strides of an EMPTY tensor: an output [Hkv, 0] with PyTorch's strides (1, 1)
 * -- torch.empty((2, 0), dtype=torch.int32).stride() -- is "not contiguous"
 * because the check wants stride[0] == 0 (m3s_tensor_make's convention). A
 * tensor without elements is contiguous (and cannot overlap itself) under any
 * strides. Seen through m3s_build_k2q_csr of an empty batch. */
static void bug3(void) {
  m3s_layer_config cfg = small_cfg(4, 2, 4);
  m3s_batch b;
  memset(&b, 0, sizeof b);
  int32_t rp[2];
  int64_t ts[3] = {0, 2, 4}, rs[2] = {2, 1}, qs[2] = {2, 0}, torch_st[2] = {1, 1}, cs[2] = {0, 2};
  m3s_tensor tk = m3s_tensor_make(NULL, M3S_I32, 3, ts, M3S_HOST);
  m3s_tensor row_ptr = m3s_tensor_make(rp, M3S_I32, 2, rs, M3S_HOST);
  int32_t dummy[1];
  m3s_tensor qi = m3s_tensor_strided(dummy, M3S_I32, 2, qs, torch_st, M3S_HOST);
  m3s_tensor qsl = m3s_tensor_strided(dummy, M3S_I32, 2, qs, torch_st, M3S_HOST);
  m3s_tensor qc = m3s_tensor_make(NULL, M3S_I32, 2, cs, M3S_HOST);
  m3s_status st = m3s_build_k2q_csr(ctx, &cfg, &b, &tk, &row_ptr, &qi, &qsl, &qc, NULL);
  printf("       m3s_build_k2q_csr(empty batch, q_indices [2, 0] strides (1, 1)) = %d %s\n",
         (int)st, m3s_last_error());
  report(3, st != M3S_OK, "empty output rejected as not contiguous (want M3S_OK)");
  /* the overlap rule: an empty out [0, 2, 128] stored head-outer with a zero
   * stride (m3s_tensor_make's convention for the dims outside a 0) */
  float o[1], l[1];
  int64_t os[3] = {0, 2, 128}, ost[3] = {128, 0, 1}, ls[2] = {0, 2};
  m3s_tensor a = m3s_tensor_make(o, M3S_F32, 3, os, M3S_HOST);
  m3s_tensor la = m3s_tensor_make(l, M3S_F32, 2, ls, M3S_HOST);
  m3s_tensor out = m3s_tensor_strided(o, M3S_F32, 3, os, ost, M3S_HOST);
  st = m3s_merge_attn_states(ctx, &a, &la, &a, &la, &out, NULL, NULL);
  printf("       m3s_merge_attn_states(out [0, 2, 128] strides (128, 0, 1)) = %d %s\n", (int)st,
         m3s_last_error());
  report(3, st != M3S_OK, "empty output rejected as overlapping itself (want M3S_OK)");
}

/* Bug 4: stride arithmetic that m3s_check_tensor's offset-range check does not
 * cover. m3s_check_tensor returns early for an EMPTY tensor (a dimension of
 * size 0), before that check, and later code still computes with the
 * strides: (a) m3s_check_no_self_overlap: span = stride[d] * shape[d] of an
 * empty output with a huge stride; (b) the same product for a non-empty
 * 1-byte (fp8) K/V cache whose offsets fit in int64 but stride[0] * P does
 * not; (c) check_csr_values (api.c, m3s_k2q_attention): q_slot->data +
 * g * stride[0] for an empty q_slot [Hkv, 0] with a huge stride[0]. */
static void bug4(void) {
  float o[1], l[1];
  int64_t os[3] = {0, 4, 128}, big[3] = {1, (int64_t)1 << 62, 1}, ls[2] = {0, 4};
  m3s_tensor a = m3s_tensor_make(o, M3S_F32, 3, os, M3S_HOST);
  m3s_tensor la = m3s_tensor_make(l, M3S_F32, 2, ls, M3S_HOST);
  m3s_tensor out = m3s_tensor_strided(o, M3S_F32, 3, os, big, M3S_HOST);
  m3s_status st = m3s_merge_attn_states(ctx, &a, &la, &a, &la, &out, NULL, NULL);
  printf("       (a) m3s_merge_attn_states(out [0, 4, 128] stride[1] = 2^62) = %d %s\n", (int)st,
         m3s_last_error());
  static uint8_t kv[128 * 256];
  int64_t ks[4] = {2, 1, 128, 256}, kst[4] = {(int64_t)1 << 62, 128 * 256, 256, 1};
  m3s_tensor kvt = m3s_tensor_strided(kv, M3S_E4M3, 4, ks, kst, M3S_HOST);
  int64_t kvs[3] = {0, 1, 128}, sls[1] = {0};
  m3s_tensor k = m3s_tensor_make(NULL, M3S_BF16, 3, kvs, M3S_HOST);
  m3s_tensor sm = m3s_tensor_make(NULL, M3S_I64, 1, sls, M3S_HOST);
  st = m3s_cache_insert(ctx, &k, &k, &sm, &kvt, NULL, NULL);
  printf("       (b) m3s_cache_insert(kv_cache [2, 1, 128, 256] e4m3, stride[0] = 2^62) = %d %s\n",
         (int)st, m3s_last_error());
  m3s_layer_config cfg = small_cfg(4, 2, 4);
  m3s_batch b;
  memset(&b, 0, sizeof b);
  static uint8_t kv1[2 * 128 * 256];
  int32_t rp[2] = {0, 0}, dummy[1];
  float f1[1];
  int64_t qsh[3] = {0, 4, 128}, kvsh[4] = {1, 2, 128, 256}, rps[2] = {2, 1}, qis[2] = {2, 0},
          qist[2] = {(int64_t)1 << 62, 1}, pos_[4] = {0, 4, 4, 128}, pls[3] = {0, 4, 4};
  m3s_tensor q = m3s_tensor_make(NULL, M3S_BF16, 3, qsh, M3S_HOST);
  m3s_tensor kvc = m3s_tensor_make(kv1, M3S_BF16, 4, kvsh, M3S_HOST);
  m3s_tensor row_ptr = m3s_tensor_make(rp, M3S_I32, 2, rps, M3S_HOST);
  m3s_tensor qi = m3s_tensor_make(dummy, M3S_I32, 2, qis, M3S_HOST);
  m3s_tensor qslot = m3s_tensor_strided(dummy, M3S_I32, 2, qis, qist, M3S_HOST);
  m3s_tensor po = m3s_tensor_make(f1, M3S_F32, 4, pos_, M3S_HOST);
  m3s_tensor pl = m3s_tensor_make(f1, M3S_F32, 3, pls, M3S_HOST);
  st = m3s_k2q_attention(ctx, &cfg, &b, &q, &kvc, NULL, &row_ptr, &qi, &qslot, &po, &pl, NULL);
  printf("       (c) m3s_k2q_attention(empty batch, q_slot [2, 0] stride[0] = 2^62) = %d %s\n",
         (int)st, m3s_last_error());
  ub_only(4, "m3s_check_no_self_overlap (validate.c) / check_csr_values (api.c)");
}

/* Bug 5: m3s_cpu_build_k2q_csr forms q_indices->data + g * stride[0] even when
 * the tensor is empty and data == NULL (which the header allows): NULL + 0 is
 * undefined in C (UBSan: "applying zero offset to null pointer"). */
static void bug5(void) {
  m3s_layer_config cfg = small_cfg(4, 1, 4);
  m3s_batch b;
  memset(&b, 0, sizeof b);
  int32_t rp[1];
  int64_t ts[3] = {0, 1, 4}, rs[2] = {1, 1}, qs[2] = {1, 0}, cs[2] = {0, 1};
  m3s_tensor tk = m3s_tensor_make(NULL, M3S_I32, 3, ts, M3S_HOST);
  m3s_tensor row_ptr = m3s_tensor_make(rp, M3S_I32, 2, rs, M3S_HOST);
  m3s_tensor qi = m3s_tensor_make(NULL, M3S_I32, 2, qs, M3S_HOST);
  m3s_tensor qc = m3s_tensor_make(NULL, M3S_I32, 2, cs, M3S_HOST);
  m3s_status st = m3s_build_k2q_csr(ctx, &cfg, &b, &tk, &row_ptr, &qi, &qi, &qc, NULL);
  printf("       m3s_build_k2q_csr(empty batch, q_indices [1, 0] data NULL) = %d %s\n", (int)st,
         m3s_last_error());
  report(5, st != M3S_OK, "the empty call itself is accepted");
  ub_only(5, "m3s_cpu_build_k2q_csr (src/cpu/k2q.c)");
}

/* Bug 6: the view constructors do unchecked int64 arithmetic on the caller's
 * numbers: m3s_tensor_narrow evaluates t->shape[0] - len (overflows for a
 * negative shape[0]) and start * stride[0] * esize (overflows for large
 * strides) instead of returning the invalid view; m3s_tensor_make multiplies
 * the shape into the strides (overflows for huge shapes). */
static void bug6(void) {
  static float mem[4];
  int64_t shape[1] = {INT64_MIN + 1}, stride[1] = {1};
  m3s_tensor t = m3s_tensor_strided(mem, M3S_F32, 1, shape, stride, M3S_HOST);
  m3s_tensor r = m3s_tensor_narrow(&t, 0, 5);
  printf("       (a) narrow(shape[0] = INT64_MIN + 1, start 0, len 5): ndim %d\n", r.ndim);
  int bad = r.ndim != -1;
  int64_t shape2[1] = {4}, stride2[1] = {(int64_t)1 << 62};
  t = m3s_tensor_strided(mem, M3S_F32, 1, shape2, stride2, M3S_HOST);
  r = m3s_tensor_narrow(&t, 2, 1);
  printf("       (b) narrow(shape[0] 4, stride[0] 2^62 f32, start 2, len 1): ndim %d data %p\n",
         r.ndim, r.data);
  int64_t shape3[2] = {(int64_t)1 << 62, 4};
  r = m3s_tensor_make(mem, M3S_F32, 2, shape3, M3S_HOST);
  printf("       (c) m3s_tensor_make(shape [2^62, 4]): ndim %d\n", r.ndim);
  report(6, bad,
         "(a) must be the invalid view (ndim -1): a 5-row view of a tensor with a "
         "negative size was returned");
  ub_only(6, "m3s_tensor_narrow / m3s_tensor_make (src/core/tensor.c)");
}

int main(int argc, char **argv) {
  int only = argc > 1 ? atoi(argv[1]) : 0;
  if (m3s_context_create(-1, &ctx) != M3S_OK)
    return 100;
  void (*cases[6])(void) = {bug1, bug2, bug3, bug4, bug5, bug6};
  for (int i = 0; i < 6; i++)
    if (!only || only == i + 1) {
      fflush(stdout);
      cases[i]();
      fflush(stdout);
    }
  m3s_context_destroy(ctx);
  return wrong;
}
