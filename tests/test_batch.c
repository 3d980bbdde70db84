/* SPEC section 5: the decode/prefill split rule (m3s_plan_step) and whole
 * steps with decode-first rows, speculative decode and padded requests
 * (output exactly 0, lse -inf, top-k all -1). */
#include "ref.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static m3s_context *g_ctx;

typedef struct {
  const char *name;
  int nreq;
  int32_t ql[6], sl[6];
  int spec;
  int want_dec, want_qlen, want_dtok, want_ptok, want_maxq;
  int64_t want_rows;
} split_case;

static void test_spec5_split_rule(void) {
  m3s_layer_config cfg = m3s_config_minimax_m3(4);
  split_case cs[] = {
      {"spec5_split_all_decode_qlen1", 3, {1, 1, 1}, {10, 300, 5000}, 0, 3, 1, 3, 0, 0, 0},
      {"spec5_split_first_exceeds_threshold_no_decodes", 3, {100, 1, 1}, {100, 9, 9}, 0, 0, 1, 0,
       102, 100, 3},
      {"spec5_split_leading_equal_lengths_are_decodes", 4, {1, 1, 50, 1}, {7, 8, 300, 129}, 0, 2,
       1, 2, 51, 50, 5},
      {"spec5_split_spec_decode_qlen4", 4, {4, 4, 4, 200}, {100, 200, 300, 456}, 3, 3, 4, 12, 200,
       200, 4},
      {"spec5_split_padded_uniform_batch_all_decode", 4, {4, 0, 4, 0}, {100, 0, 200, 0}, 3, 4, 4,
       16, 0, 0, 0},
      {"spec5_split_first_below_threshold", 3, {2, 2, 7}, {20, 30, 40}, 3, 2, 2, 4, 7, 7, 1},
      {"spec5_split_nonuniform_small_lengths", 2, {3, 5}, {30, 50}, 3, 1, 3, 3, 5, 5, 1},
      {"spec5_split_equal_prompts_are_prefill", 2, {100, 100}, {100, 300}, 0, 0, 1, 0, 200, 100,
       4},
      {"spec5_split_all_padded", 2, {0, 0}, {0, 0}, 2, 2, 3, 6, 0, 0, 0},
      {"spec5_split_empty_step", 0, {0}, {0}, 0, 0, 1, 0, 0, 0, 0},
  };
  for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) {
    m3s_step_desc d = {cs[i].nreq, cs[i].ql, cs[i].sl, cs[i].spec};
    m3s_step_plan p;
    m3s_status st = m3s_plan_step(g_ctx, &cfg, &d, &p);
    char msg[256];
    snprintf(msg, sizeof msg,
             "%s: got st %d decodes %d qlen %d dtok %d ptok %d maxq %d rows %lld (%s)", cs[i].name,
             st, p.num_decodes, p.decode_q_len, p.num_decode_tokens, p.num_prefill_tokens,
             p.max_prefill_q_len, (long long)p.csr_rows, m3s_last_error());
    CHECK(st == M3S_OK && p.num_decodes == cs[i].want_dec &&
              p.num_prefills == cs[i].nreq - cs[i].want_dec && p.decode_q_len == cs[i].want_qlen &&
              p.num_decode_tokens == cs[i].want_dtok && p.num_prefill_tokens == cs[i].want_ptok &&
              p.num_tokens == cs[i].want_dtok + cs[i].want_ptok &&
              p.max_prefill_q_len == cs[i].want_maxq && p.csr_rows == cs[i].want_rows,
          msg);
  }
}

/* A whole step: 3 uniform spec-decode requests (one padded) then 2 prefill
 * requests (one chunked with a cached prefix, one padded), cut from one
 * ragged fixture the way an engine's metadata would be. */
static void test_spec5_mixed_step_with_padding(void) {
  m3s_layer_config cfg = m3s_config_minimax_m3(2);
  int32_t ql[] = {4, 4, 4, 300, 5};
  int32_t sl[] = {3000, 0, 131, 2900, 0};
  fx_spec s = fx_spec_default(cfg, 5, ql, sl, 77);
  s.kv_dtype = M3S_E4M3;
  s.scale_mode = 2;
  s.idx_dtype = M3S_E4M3;
  s.grid = 1;
  fixture f;
  fx_init(&f, &s);
  fx_poison(&f);
  /* plan from the host description, as an engine would */
  m3s_step_desc d = {5, ql, sl, 3};
  m3s_step_plan p;
  int ok = m3s_plan_step(g_ctx, &cfg, &d, &p) == M3S_OK && p.num_decodes == 3 &&
           p.num_decode_tokens == 12 && p.num_prefill_tokens == 305;
  CHECK(ok, "spec5_plan_of_mixed_step");
  m3s_step step;
  m3s_batch *dec = &step.decode, *pre = &step.prefill;
  *dec = f.batch;
  dec->num_reqs = 3;
  dec->num_tokens = 12;
  dec->uniform_q_len = 4;
  dec->max_q_len = 4;
  dec->seq_lens = m3s_tensor_narrow(&f.batch.seq_lens, 0, 3);
  dec->block_table = m3s_tensor_narrow(&f.batch.block_table, 0, 3);
  dec->index_block_table = m3s_tensor_narrow(&f.batch.index_block_table, 0, 3);
  *pre = f.batch;
  pre->num_reqs = 2;
  pre->num_tokens = 305;
  pre->max_q_len = 300;
  pre->query_start_loc = m3s_tensor_narrow(&f.batch.query_start_loc, 3, 3);
  pre->seq_lens = m3s_tensor_narrow(&f.batch.seq_lens, 3, 2);
  pre->block_table = m3s_tensor_narrow(&f.batch.block_table, 3, 2);
  pre->index_block_table = m3s_tensor_narrow(&f.batch.index_block_table, 3, 2);
  m3s_status st = m3s_step_forward(g_ctx, &cfg, &step, &f.q, &f.iq, &f.kv, &f.scales, &f.ic,
                                   &f.topk, &f.out, &f.lse, NULL);
  if (!CHECK(st == M3S_OK, "spec5_mixed_step_runs")) {
    fprintf(stderr, "  %s\n", m3s_last_error());
    fx_free(&f);
    return;
  }
  int pad_ok = 1;
  int pad_rows[] = {4, 5, 6, 7, 312, 313, 314, 315, 316};
  for (size_t i = 0; i < sizeof pad_rows / sizeof pad_rows[0]; i++) {
    int t = pad_rows[i];
    for (int g = 0; g < 2; g++)
      for (int k = 0; k < 16; k++)
        pad_ok &= *fx_topk_at(&f, t, g, k) == -1;
    for (int h = 0; h < 32; h++) {
      pad_ok &= isinf(f.lse_mem[t * 32 + h]) && f.lse_mem[t * 32 + h] < 0;
      for (int e = 0; e < 128; e++)
        pad_ok &= ((uint8_t *)f.out_mem)[((int64_t)t * 32 * 128 + h * 128 + e) * 2] == 0 &&
                  ((uint8_t *)f.out_mem)[((int64_t)t * 32 * 128 + h * 128 + e) * 2 + 1] == 0;
    }
  }
  CHECK(pad_ok, "spec5_padded_requests_give_zero_output_minus_inf_lse_and_minus_one_topk");
  check_topk_vs_ref(&f, "spec5_mixed_step_topk_vs_ref");
  check_attention_vs_ref(&f, 1, "spec5_mixed_step_attention_vs_ref");
  fx_free(&f);
}

int main(void) {
  if (m3s_context_create(-1, &g_ctx) != M3S_OK) {
    fprintf(stderr, "context: %s\n", m3s_last_error());
    return 1;
  }
  test_spec5_split_rule();
  test_spec5_mixed_step_with_padding();
  m3s_context_destroy(g_ctx);
  return TEST_FINISH();
}
