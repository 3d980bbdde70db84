/* Context-parallel fixtures (SPEC section 10): what each rank of a cp group
 * holds, cut from a whole-cache fixture of ref.h, and the buffers the engine
 * all-gathers.
 *
 * A rank gets fresh caches holding only the pages of the blocks it owns
 * (owner(b) = (b / I) % cp_size), at shuffled page ids, plus junk pages of
 * random bytes that no correct lookup reads; its block tables list the owned
 * blocks in order (the column of block b is the number of blocks before b
 * with the same owner: counted here, not taken from the header's formula),
 * with -7 in every other entry. Per-slot fp8 scales are carried to the rank's
 * slots; a scalar scale is shared. The rank's batch is the fixture's with its
 * own tables and cp = {cp_size, rank, I}. */
#ifndef M3S_TEST_CP_FIXTURE_H
#define M3S_TEST_CP_FIXTURE_H

#include "ref.h"

typedef struct {
  int64_t num_pages;
  int cols;
  int32_t *bt, *ibt; /* [R, cols] with row stride cols + 1 */
  void *kv_mem, *ic_mem;
  float *ks_mem, *vs_mem;
  m3s_tensor kv, ic;
  m3s_kv_scales scales;
  m3s_batch batch;
} cp_rank;

/* Owner rank of logical block b. */
int cp_owner(int cp_size, int interleave, int64_t b);
void cp_rank_init(cp_rank *rk, const fixture *f, int cp_size, int rank, int interleave,
                  uint64_t seed);
void cp_rank_free(cp_rank *rk);

/* The all-gathered buffers of a step on n ranks, host memory:
 *   ids, scores  [n, T, Hkv, K] i32 / f32 -- packed: both are views of one
 *                int32 buffer [n, T, Hkv, 2, K] (ids then scores per row),
 *                the single all-gather docs/integration.md describes;
 *                otherwise two contiguous buffers
 *   outs, lses   [n, T, Hq, 128] in f's activation dtype / [n, T, Hq] f32 */
typedef struct {
  int n;
  void *cand_mem, *score_mem, *outs_mem;
  float *lses_mem;
  size_t cand_bytes, score_bytes, outs_bytes, lses_bytes;
  m3s_tensor ids, scores, outs, lses;
} cp_exchange;

/* The batches both context-parallel tests run. A mixed step: a decode row deep
 * in a 40-block context, a 37-token prefill chunk behind a 3063-token prefix,
 * a padded request, a 2-block request with 3 new tokens (shorter than cp
 * blocks for cp >= 3) and a 1-token request. Speculative decode, q_len 4, with
 * a padded request. */
extern const int32_t CP_MIX_QL[5], CP_MIX_SL[5], CP_SPEC_QL[4], CP_SPEC_SL[4];

void cp_exchange_init(cp_exchange *x, const fixture *f, int n, int packed);
void cp_exchange_free(cp_exchange *x);
/* Fills every byte of the exchange buffers with a NaN / 0x7fffffff pattern. */
void cp_exchange_poison(cp_exchange *x);
/* Entry [i] of dimension 0 as a view with one dimension less. */
m3s_tensor cp_slice(const m3s_tensor *t, int64_t i);

/* One context-parallel step on ctx, every view on ctx's side (f: q, iq and
 * the config; rk[n]: rank n's caches and batch; x: the gathered buffers): the
 * candidates of every rank into its slice of x, then for each rank the merge
 * into topk and its attention into its slice of x.outs / x.lses, then the
 * N-way merge into out / lse. The first failing status, with the rank, is
 * printed. */
m3s_status cp_chain(m3s_context *ctx, const fixture *f, const cp_rank *rk, cp_exchange *x,
                    m3s_tensor *topk, m3s_tensor *out, m3s_tensor *lse, const m3s_exec *e);

#endif
