/* report.c -- failure reporting (die: the violated invariant, then a trap) and
 * call statistics. */
#include "fuzz.h"

/* ======================================================================== */
/* failure reporting, statistics                                            */
/* ======================================================================== */
const char *g_op = "";
const char *g_fn = "";
int g_trace;
fuzz_stats S;
unsigned g_avoid;
m3s_status g_st;

void die(const char *fmt, ...) {
  va_list ap;
  write_stats();
  fprintf(stderr, "\n==== m3s-fuzz: INVARIANT VIOLATED (op %s, call %s): ", g_op, g_fn);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\n     last status %d (%s)\n     m3s_last_error: \"%s\"\n", (int)g_st,
          m3s_status_string(g_st), m3s_last_error());
  fflush(stderr);
  __builtin_trap();
}

const char *k_opname[NOPS] = {
    "plan_step",     "cache_insert",  "index_cache_insert", "index_topk",       "sparse_attention",
    "step_forward",  "build_k2q_csr", "k2q_attention",      "combine_partials", "merge_attn_states",
    "tensor_narrow", "misc",          "k2q_chain",          "cp_local_block",   "index_topk_candidates",
    "merge_topk_candidates", "merge_attn_states_n"};
const char *g_stats_path;

void write_stats(void) {
  if (!g_stats_path)
    return;
  FILE *f = fopen(g_stats_path, "w");
  if (!f)
    return;
  fprintf(f, "inputs %llu\nskipped_inputs %llu\napi_calls %llu\naccepted %llu\nrejected %llu\n",
          S.inputs, S.skipped, S.calls, S.ok, S.rejected);
  fprintf(f, "expected_ok %llu\nexpected_fail %llu\nexpected_any %llu\n", S.must_ok, S.must_fail,
          S.any);
  fprintf(f, "reference_rows_checked %llu\nbatch_independence_checks %llu\n", S.ref_rows, S.indep);
  fprintf(f, "cp_active_accepted %llu\n", S.cp_active_ok);
  for (int i = 0; i < NOPS; i++)
    fprintf(f, "op %-20s calls %llu rejected %llu seconds %.1f\n", k_opname[i], S.op_calls[i],
            S.op_rej[i], S.op_sec[i]);
  fclose(f);
}

