/* SPEC section 7 (key-centric CSR schedule) and the lse merge:
 *   - m3s_build_k2q_csr equals a straightforward inversion of the top-k rows;
 *   - k2q attention per (block, query) + combine of the per-slot partials
 *     equals direct attention (and the fp64 reference);
 *   - merging the results over two disjoint halves of the selected keys
 *     equals attention over all of them; empty sides give 0 / -inf. */
#include "ref.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static m3s_context *g_ctx;

static fx_spec spec(int tp, int nreq, const int32_t *ql, const int32_t *sl) {
  return fx_spec_default(m3s_config_minimax_m3(tp), nreq, ql, sl, 31337);
}

static void test_spec7_csr_and_combine(int holes) {
  int32_t ql[] = {300, 1, 200, 7};
  int32_t sl[] = {2500, 2000, 200, 0};
  fixture f;
  fx_spec s = spec(2, 4, ql, sl);
  s.token_major = 1;
  fx_init(&f, &s);
  fx_poison(&f);
  const m3s_layer_config *c = &f.cfg;
  int T = f.T, K = c->topk, Hkv = c->num_kv_heads, Hq = c->num_q_heads;
  int ok = m3s_index_topk(g_ctx, c, &f.batch, &f.iq, &f.ic, &f.topk, NULL) == M3S_OK;
  /* -1 holes inside the read part of the rows (another producer's top-k) */
  for (int t = 0; holes && t < T; t++)
    for (int g = 0; g < Hkv; g++)
      if (t % 3 != 2)
        *fx_topk_at(&f, t, g, 1 + t % 2) = -1;
  ok = ok && m3s_sparse_attention(g_ctx, c, &f.batch, &f.q, &f.kv, &f.scales, &f.topk, &f.out,
                                  &f.lse, NULL) == M3S_OK;
  CHECK(ok, "k2q: direct attention runs");
  k2q_shapes sh;
  ok = fx_k2q_shapes(g_ctx, &f, &sh) && sh.rows == 20 + 16 + 2 + 0;
  CHECK(ok, "spec7_csr_rows_is_sum_of_request_blocks");
  int64_t rows = sh.rows, TK = (int64_t)T * K;
  int32_t *rp = malloc(sizeof(int32_t) * (size_t)shape_elems(2, sh.row_ptr));
  int32_t *qi = malloc(sizeof(int32_t) * (size_t)shape_elems(2, sh.q_idx));
  int32_t *qs = malloc(sizeof(int32_t) * (size_t)shape_elems(2, sh.q_idx));
  int32_t *qc = malloc(sizeof(int32_t) * (size_t)shape_elems(2, sh.q_cnt));
  m3s_tensor trp = m3s_tensor_make(rp, M3S_I32, 2, sh.row_ptr, M3S_HOST);
  m3s_tensor tqi = m3s_tensor_make(qi, M3S_I32, 2, sh.q_idx, M3S_HOST);
  m3s_tensor tqs = m3s_tensor_make(qs, M3S_I32, 2, sh.q_idx, M3S_HOST);
  m3s_tensor tqc = m3s_tensor_make(qc, M3S_I32, 2, sh.q_cnt, M3S_HOST);
  ok = m3s_build_k2q_csr(g_ctx, c, &f.batch, &f.topk, &trp, &tqi, &tqs, &tqc, NULL) == M3S_OK;
  if (!CHECK(ok, "spec7_build_k2q_csr_runs"))
    fprintf(stderr, "  %s\n", m3s_last_error());
  /* straightforward inversion: for each row (request, block), scan that
   * request's queries in ascending order and their slots */
  int bad = 0;
  for (int g = 0; g < Hkv && ok; g++) {
    int64_t row = 0, e = 0;
    for (int r = 0; r < 4; r++) {
      int64_t nbr = (sl[r] + 127) / 128;
      for (int64_t b = 0; b < nbr; b++, row++) {
        bad += rp[g * (rows + 1) + row] != e;
        for (int t = 0; t < T; t++) {
          int i, rr = fx_request_of_row(&f, t, &i);
          if (rr != r)
            continue;
          int64_t pos = fx_pos(&f, t), nb = pos < 0 ? 0 : pos / 128 + 1;
          for (int k = 0, rank = 0; k < K && k < nb; k++) {
            int32_t id = *fx_topk_at(&f, t, g, k);
            if (id == b) {
              bad += qi[g * TK + e] != t || qs[g * TK + e] != rank;
              e++;
            }
            rank += id >= 0;
          }
        }
      }
    }
    bad += rp[g * (rows + 1) + rows] != e;
    for (int t = 0; t < T; t++) {
      int64_t pos = fx_pos(&f, t), nb = pos < 0 ? 0 : pos / 128 + 1;
      int valid = 0;
      for (int k = 0; k < K && k < nb; k++)
        valid += *fx_topk_at(&f, t, g, k) >= 0;
      bad += qc[t * Hkv + g] != valid;
    }
  }
  CHECK(ok && bad == 0, holes ? "spec7_csr_with_minus_one_holes_equals_inversion"
                              : "spec7_csr_equals_straightforward_inversion_and_counts");
  /* partials + combine */
  float *po = malloc(sizeof(float) * (size_t)shape_elems(4, sh.part_out));
  float *pl = malloc(sizeof(float) * (size_t)shape_elems(3, sh.part_lse));
  m3s_tensor tpo = m3s_tensor_make(po, M3S_F32, 4, sh.part_out, M3S_HOST);
  m3s_tensor tpl = m3s_tensor_make(pl, M3S_F32, 3, sh.part_lse, M3S_HOST);
  size_t obytes = (size_t)T * Hq * 128 * 2;
  void *direct = malloc(obytes);
  memcpy(direct, f.out_mem, obytes);
  float *direct_lse = malloc(sizeof(float) * (size_t)T * Hq);
  memcpy(direct_lse, f.lse_mem, sizeof(float) * (size_t)T * Hq);
  int32_t *keep = malloc(sizeof(int32_t) * (size_t)T * Hkv * K);
  memcpy(keep, f.topk_mem, sizeof(int32_t) * (size_t)T * Hkv * K);
  fx_poison(&f); /* poisons out, lse and top-k; the reference needs the top-k back */
  memcpy(f.topk_mem, keep, sizeof(int32_t) * (size_t)T * Hkv * K);
  free(keep);
  ok = ok &&
       m3s_k2q_attention(g_ctx, c, &f.batch, &f.q, &f.kv, &f.scales, &trp, &tqi, &tqs, &tpo, &tpl,
                         NULL) == M3S_OK &&
       m3s_combine_partials(g_ctx, c, &tpo, &tpl, &tqc, &f.out, &f.lse, NULL) == M3S_OK;
  if (!CHECK(ok, "spec7_k2q_attention_and_combine_run"))
    fprintf(stderr, "  %s\n", m3s_last_error());
  double rel = rel_l2(f.out_mem, M3S_BF16, direct, M3S_BF16, (int64_t)T * Hq * 128);
  double lse_err = lse_max_diff(f.lse_mem, direct_lse, (int64_t)T * Hq);
  char msg[160];
  snprintf(msg, sizeof msg,
           "spec7_combined_partials_equal_direct_attention%s (rel L2 %.3g, lse %.3g)",
           holes ? "_with_holes" : "", rel, lse_err);
  CHECK(ok && rel < 1e-2 && lse_err < 1e-3, msg);
  check_attention_vs_ref(&f, 1, "spec7_combined_partials_vs_fp64_reference");
  free(direct);
  free(direct_lse);
  free(po);
  free(pl);
  free(rp);
  free(qi);
  free(qs);
  free(qc);
  fx_free(&f);
}

/* Attention over the even slots and over the odd slots, merged, equals
 * attention over all slots (disjoint key sets, as two ranks would hold). */
static void test_merge_two_halves_equals_whole(void) {
  int32_t ql[] = {1, 1, 120};
  int32_t sl[] = {4000, 60, 2300};
  fixture f;
  fx_spec s = spec(1, 3, ql, sl);
  fx_init(&f, &s);
  fx_poison(&f);
  const m3s_layer_config *c = &f.cfg;
  int T = f.T, K = c->topk, Hkv = c->num_kv_heads, Hq = c->num_q_heads;
  int ok = m3s_index_topk(g_ctx, c, &f.batch, &f.iq, &f.ic, &f.topk, NULL) == M3S_OK &&
           m3s_sparse_attention(g_ctx, c, &f.batch, &f.q, &f.kv, &f.scales, &f.topk, &f.out, &f.lse,
                                NULL) == M3S_OK;
  size_t obytes = (size_t)T * Hq * 128 * 2, lbytes = sizeof(float) * (size_t)T * Hq;
  size_t tbytes = sizeof(int32_t) * (size_t)T * Hkv * K;
  void *whole = malloc(obytes), *oa = malloc(obytes), *ob = malloc(obytes);
  float *wl = malloc(lbytes), *la = malloc(lbytes), *lb = malloc(lbytes);
  int32_t *full = malloc(tbytes);
  memcpy(whole, f.out_mem, obytes);
  memcpy(wl, f.lse_mem, lbytes);
  memcpy(full, f.topk_mem, tbytes);
  for (int half = 0; half < 2 && ok; half++) {
    fx_poison(&f);
    for (int64_t i = 0; i < (int64_t)T * Hkv * K; i++)
      ((int32_t *)f.topk_mem)[i] = (i % K) % 2 == half ? full[i] : -1;
    ok = m3s_sparse_attention(g_ctx, c, &f.batch, &f.q, &f.kv, &f.scales, &f.topk, &f.out, &f.lse,
                              NULL) == M3S_OK;
    memcpy(half ? ob : oa, f.out_mem, obytes);
    memcpy(half ? lb : la, f.lse_mem, lbytes);
  }
  int64_t sh[3] = {T, Hq, 128}, lsh[2] = {T, Hq};
  m3s_tensor ta = m3s_tensor_make(oa, M3S_BF16, 3, sh, M3S_HOST);
  m3s_tensor tb = m3s_tensor_make(ob, M3S_BF16, 3, sh, M3S_HOST);
  m3s_tensor tla = m3s_tensor_make(la, M3S_F32, 2, lsh, M3S_HOST);
  m3s_tensor tlb = m3s_tensor_make(lb, M3S_F32, 2, lsh, M3S_HOST);
  fx_poison(&f);
  ok = ok && m3s_merge_attn_states(g_ctx, &ta, &tla, &tb, &tlb, &f.out, &f.lse, NULL) == M3S_OK;
  double rel = rel_l2(f.out_mem, M3S_BF16, whole, M3S_BF16, (int64_t)T * Hq * 128);
  double lerr = lse_max_diff(f.lse_mem, wl, (int64_t)T * Hq);
  char msg[160];
  snprintf(msg, sizeof msg, "lse_merge_of_two_halves_equals_whole (rel L2 %.3g, lse %.3g)", rel,
           lerr);
  CHECK(ok && rel < 1e-2 && lerr < 1e-3, msg);
  /* in place: out aliases out_a */
  ok = ok && m3s_merge_attn_states(g_ctx, &ta, &tla, &tb, &tlb, &ta, &tla, NULL) == M3S_OK;
  CHECK(ok && memcmp(oa, f.out_mem, obytes) == 0, "lse_merge_in_place_into_out_a_same_bits");
  /* both sides empty: 0 and -inf */
  for (int i = 0; i < T * Hq; i++)
    la[i] = lb[i] = -INFINITY;
  fx_poison(&f);
  ok = ok && m3s_merge_attn_states(g_ctx, &ta, &tla, &tb, &tlb, &f.out, &f.lse, NULL) == M3S_OK;
  int empty_ok = ok;
  for (size_t i = 0; i < obytes / 2; i++)
    empty_ok &= ((uint16_t *)f.out_mem)[i] == 0;
  for (int i = 0; i < T * Hq; i++)
    empty_ok &= isinf(f.lse_mem[i]) && f.lse_mem[i] < 0;
  CHECK(empty_ok, "lse_merge_both_sides_empty_gives_zero_and_minus_inf");
  free(whole);
  free(oa);
  free(ob);
  free(wl);
  free(la);
  free(lb);
  free(full);
  fx_free(&f);
}

int main(void) {
  if (m3s_context_create(-1, &g_ctx) != M3S_OK) {
    fprintf(stderr, "context: %s\n", m3s_last_error());
    return 1;
  }
  test_spec7_csr_and_combine(0);
  test_spec7_csr_and_combine(1);
  test_merge_two_halves_equals_whole();
  m3s_context_destroy(g_ctx);
  return TEST_FINISH();
}
