/* fuzz_api.c -- libFuzzer harness over the public C API of m3sparse, CPU
 * backend (issue 5). Build: fuzz/CMakeLists.txt (clang only); run: fuzz/run.sh.
 *
 * The input is a byte stream that this file decodes, in order, into one
 * operation and all of its arguments: a layer config, a batch description
 * (number of requests, query and sequence lengths, uniform or ragged, a
 * query_start_loc base, block tables, page pools), dtypes, layouts (contiguous,
 * permuted, padded strides), top-k rows, slot mappings, CSR arrays, fp8 scales,
 * and mutations that make the call invalid (NULL pointers, wrong ndim / dtype /
 * device / shape, negative or overflowing strides, overlapping outputs, NULL
 * data, bad config fields, inconsistent batch counts, out-of-range values read
 * from index tensors). Bulk data (activations, caches) comes from a PRNG seeded
 * by the input. Bytes past the end of the input read as 0, and 0 always means
 * "no mutation", so a short input is a small valid call.
 *
 * Invariants (a violation prints what broke and calls __builtin_trap(), which
 * libFuzzer reports as a crash):
 *   1. no crash, no ASan / UBSan report (the build aborts on the first one);
 *   2. every buffer the library sees lies inside a larger allocation with 64
 *      guard bytes of a pattern before and after; they are intact after every
 *      call (also catches writes ASan cannot see, inside the allocation);
 *   3. inputs are never modified;
 *   4. a rejected call (status != M3S_OK) leaves every output byte untouched,
 *      and m3s_last_error() is non-empty and names the function; an accepted
 *      call leaves m3s_last_error() == "";
 *   5. an accepted call writes only the elements it documents (output views;
 *      not the padding between rows of a strided view, not the q_indices tail
 *      past row_ptr[g][R], not the partial slots no CSR entry names, only the
 *      slots a cache insert maps);
 *   6. the harness knows, for each input, whether the call MUST succeed (no
 *      mutation: a nominal valid call), MUST fail (a mutation the header or
 *      validate.c says is rejected) or may do either ("chaos" mutations of
 *      index values); status must agree;
 *   7. accepted calls on small "nice" data (values k/4, |k| <= 8, so every fp32
 *      dot product of the indexer is exact) agree with an fp64 reference in this
 *      file: index top-k exactly (also with NaN / +-inf keys and queries),
 *      attention / k2q partials / combine / merge to rel L2 < 1e-2 (k2q 1e-3),
 *      cache inserts exactly; rows without visible keys give out 0, lse -inf;
 *      every top-k row has the SPEC 3 structure on any data;
 *   8. determinism and batch independence on the CPU: a request's rows from a
 *      batch call equal (bit for bit) the rows of a call with that request
 *      alone (through m3s_tensor_narrow views, which also exercises
 *      query_start_loc[0] != 0), and m3s_step_forward equals separate
 *      m3s_index_topk + m3s_sparse_attention calls on its two parts bit for bit.
 *   9. context parallel (ops_cp.c; batch.cp from gen.c): candidate rows of
 *      m3s_index_topk_candidates have the header's form (exact against fp64 on
 *      nice data); m3s_merge_topk_candidates of every simulated rank's
 *      candidates equals m3s_index_topk on the whole cache bit for bit;
 *      m3s_merge_attn_states_n agrees with an fp64 N-way merge; a rank's
 *      m3s_sparse_attention attends only its own blocks; the whole-cache ops
 *      refuse cp_size > 1 with the documented status.
 *
 * Sizes stay tiny (T <= 64, Hq <= 16, contexts <= 3000 tokens, a work budget)
 * so one execution takes milliseconds.
 *
 * Environment: M3S_FUZZ_TRACE=1 prints one line per API call (op, expectation,
 * status, error text); M3S_FUZZ_STATS=file rewrites call statistics to file
 * every 4096 inputs, on a violation and at exit; M3S_FUZZ_AVOID_KNOWN=1 steers
 * the decoder away from the input classes of the open library bugs listed in
 * docs/reliability.md section 4 (so a long run can look for new ones while
 * those are open); M3S_FUZZ_AVOID_KNOWN=0x.. avoids only the bugs of a mask
 * (bit n-1 = bug n; see the AVOID(n) branches).
 *
 * Files (fuzz.h declares what they share): fuzz_api.c the entry points;
 * report.c violations and statistics; input.c the input reader, PRNG and an
 * fp64 number codec; tensors.c guarded buffers and tensor arguments;
 * protocol.c the call protocol (invariants 2-6); gen.c configs, batches and
 * fp8 scales; reference.c the fp64 references (invariant 7); ops_*.c one
 * decoder per operation (ops_cp.c: context parallel). */
#include "fuzz.h"

/* ======================================================================== */
/* entry points                                                             */
/* ======================================================================== */
void at_exit(void) { write_stats(); }

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  g_trace = getenv("M3S_FUZZ_TRACE") && atoi(getenv("M3S_FUZZ_TRACE")) > 0;
  const char *av = getenv("M3S_FUZZ_AVOID_KNOWN"); /* "1": all known bugs; "0x..": a mask */
  if (av && !strncmp(av, "0x", 2))
    g_avoid = (unsigned)strtoul(av, NULL, 16);
  else if (av && atoi(av) > 0)
    g_avoid = ~0u;
  g_stats_path = getenv("M3S_FUZZ_STATS");
  if (m3s_context_create(-1, &g_ctx) != M3S_OK) {
    fprintf(stderr, "m3s-fuzz: cannot create a CPU context: %s\n", m3s_last_error());
    abort();
  }
  atexit(at_exit);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  g_in = data;
  g_in_n = size;
  g_in_i = 0;
  g_skip = 0;
  g_alias_in = 0;
  g_st = M3S_OK;
  S.inputs++;
  g_opi = (int)(rb() % NOPS);
  g_op = k_opname[g_opi];
  g_rng = rb32() ^ 0x5DEECE66Dull;
  clock_t t0 = clock();
  switch (g_opi) {
  case OP_PLAN: op_plan(); break;
  case OP_INSERT: op_cache_insert(); break;
  case OP_IINSERT: op_index_insert(); break;
  case OP_TOPK: op_index_topk(); break;
  case OP_ATTN: op_attention(); break;
  case OP_STEP: op_step(); break;
  case OP_CSR: op_csr(); break;
  case OP_K2Q: op_k2q_attention(); break;
  case OP_COMBINE: op_combine(); break;
  case OP_MERGE: op_merge(); break;
  case OP_NARROW: op_narrow(); break;
  case OP_MISC: op_misc(); break;
  case OP_CP_LOCAL: op_cp_local(); break;
  case OP_CANDS: op_candidates(); break;
  case OP_MERGE_CANDS: op_merge_candidates(); break;
  case OP_MERGE_N: op_merge_n(); break;
  default: op_chain(); break;
  }
  if (g_skip)
    S.skipped++;
  check_guards();
  bfree_all();
  S.op_sec[g_opi] += (double)(clock() - t0) / CLOCKS_PER_SEC;
  if ((S.inputs & 4095) == 0)
    write_stats();
  return 0;
}
