/* The fp64 mathematics of SPEC sections 3-4, written once for every fp64
 * reference of the project: the tests' (ref.c, over fixtures; the demo checks
 * through it) and the fuzzer's (fuzz/reference.c, over its own strided
 * views). Nothing here knows how a tensor is stored: callers decode queries
 * and keys into fp64 rows of 128 elements, and hand the attention a loader for
 * the K/V rows of the keys it reaches. */
#ifndef M3S_TEST_REF_CORE_H
#define M3S_TEST_REF_CORE_H

#include "m3sparse.h"

#include <stdint.h>

/* SPEC 3 rank order: 1 when block a (score sa) ranks before block b (score
 * sb): the higher score first, NaN below every real score, equal scores (two
 * NaNs too) by the lower block id. */
int ref_ranks_before(double sa, int64_t a, double sb, int64_t b);

/* 1 when block b of nb visible blocks is forced: an init block (b < init) or
 * a local one (b >= nb - local). */
int ref_forced(const m3s_layer_config *c, int64_t b, int64_t nb);

/* 1 when ref_select_blocks reads the score of block b: more blocks than the
 * budget are visible and b is not forced. */
int ref_competes(const m3s_layer_config *c, int64_t b, int64_t nb);

/* Keys of block b a query at position pos sees (causal, also inside its own
 * partial block): 0..128. */
int ref_block_keys(int64_t b, int64_t pos);

/* fp64 dot product of two 128-element rows, summed in element order. */
double ref_dot(const double *a, const double *b);

/* SPEC 3 block score: the largest ref_dot of q with the n keys of keys
 * ([n][128]); NaN dots are ignored, NaN when every dot is NaN. */
double ref_block_max(const double *q, const double *keys, int n);

/* SPEC 3 selection among nb >= 1 visible blocks: every block when nb <= topk;
 * else the forced blocks and the rest of the topk budget in rank order of
 * scores[nb] (only the entries ref_competes names are read). Writes
 * ids[topk]: the min(topk, nb) selected ids ascending, then -1; returns
 * their count. Needs init_blocks + local_blocks <= topk (what the library
 * accepts). */
int ref_select_blocks(const m3s_layer_config *c, int64_t nb, const double *scores, int32_t *ids);

/* Writes the K (is_v 0) or V (is_v 1) row of key position j, dequantised,
 * into row[128]. */
typedef void (*ref_kv_row_fn)(void *user, int64_t j, int is_v, double *row);

/* SPEC 4 fp64 attention of the nq query rows q[nq][128] of one KV head over
 * the keys j <= pos of the blocks listed in ids[n] (negative ids skipped,
 * each block once whatever the list's order; ids NULL: every visible block,
 * dense causal attention): per query out[128] = softmax(q.k * scale) V and
 * lse = log sum exp(q.k * scale), natural log, keys summed in position order
 * (out [nq][128], lse [nq]). A query with no key, or no logit above -inf,
 * gets out 0 and lse -inf, as from the library. Returns the number of keys. */
int64_t ref_attend_blocks(const double *q, int nq, double scale, int64_t pos, const int32_t *ids,
                          int n, ref_kv_row_fn row, void *user, double *out, double *lse);

#endif
