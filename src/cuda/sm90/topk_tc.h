/* Certified re-scoring top-k of the CUDA backend (src/cuda/sm90/topk_tc.cu):
 * the host entry points that src/cuda/topk.cu dispatches to, and a
 * test-only hook (tests/test_gpu_topk_certified.c) that switches the path or
 * its re-scoring and collects counters in a caller-owned device buffer.
 * Plain C, included by C tests and by the CUDA sources. */
#ifndef M3S_CUDA_TOPK_TC_H
#define M3S_CUDA_TOPK_TC_H

#include "m3sparse.h"

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Counters the selection kernel adds to when the hook names a device buffer
 * (zero it before the call; read it after a sync). max_ratio_bits is the fp32
 * bit pattern of the largest |S~ - S| / E seen (measure mode only). */
typedef struct {
  unsigned long long pairs;      /* (row, head) pairs that selected by score */
  unsigned long long candidates; /* candidate blocks of those pairs */
  unsigned long long rescored;   /* candidates re-scored in the reference order */
  unsigned long long violations; /* measure mode: |S~ - S| > E (must stay 0) */
  unsigned int max_ratio_bits;
  unsigned int reg_pairs;    /* pairs decided by the register selection (tc_reg_write_forced) */
  unsigned int few_pairs;    /* CTA-wide selection: thresholds by tournament (tc_wide_few) */
  unsigned int radix_pairs;  /* CTA-wide selection: thresholds by radix select (tc_wide_ranks) */
  unsigned int tma_ctas;     /* CTAs of the decode score kernel's TMA form (topk_decode.cu) */
  unsigned int filter_pairs; /* register selection: thresholds by tc_filter_ranks */
  unsigned int filter_falls; /* ... where it declined (ties, whole lines, K - init - local >= 32) */
  unsigned int reg_few_decided;  /* register selection: pairs tc_reg_few decided, */
  unsigned int reg_few_deferred; /* ... deferred, */
  unsigned int reg_few_falls;    /* ... left to the slot path, */
  unsigned int reg_few_wrong;    /* ... and decided or deferred where the slot path would not */
  unsigned int chunks;           /* prefill calls: chunks scored (score-kernel launches) */
  unsigned int ws_chunks;        /* ... of them by tc_score_ws_kernel (TMA + wgmma, sm_90) */
} m3s_topk_tc_stats;

/* Switches for tests, per CUDA context; all zero = the library's default. Not
 * for concurrent use with other calls on the context (set between calls, like
 * a context option).
 *  exact_only: every batch takes the exact CUDA-core path (topk.cu).
 *  no_rescore: uncertain blocks are decided by S~ instead of their reference
 *              score (breaks exactness: the test proves re-scoring matters).
 *  measure:    re-score every candidate and record |S~ - S| / E (slow).
 *  stats:      device pointer, or NULL.
 *  mma_sync:   prefill scores with the mma.sync kernel also where the
 *              default is the sm_90a TMA + wgmma kernel (an sm_90 device,
 *              bf16 or e4m3 index cache), and the decode score kernel's page
 *              copies by cp.async where the default is its TMA form (e4m3
 *              index cache on an sm_90 device), so the tests cover both.
 *  decode_any: uniform decode batches take the certified streaming kernel
 *              whenever it covers them, also below the batch size and pair
 *              count from which it is the default (the tests' small
 *              fixtures).
 *  rounds_select: the prefill selection by rounds of a warp maximum with the
 *              entries in shared memory (tc_select_kernel) also where the
 *              register selection (tc_select_reg_kernel, at most 512
 *              candidates per pair) is the default: for A/B timings.
 *  score_waves: > 0: tc_score_ws_kernel's work is cut into about this
 *              many items per SM instead of TS_WAVES (tuning).
 *  chunk_rows: > 0: prefill and ragged calls run in chunks of at most this
 *              many rows (any count, not only multiples of 128) where the
 *              entries' budget would allow more: the tests' way to run the
 *              multi-chunk loop at their sizes (the budget splits only
 *              calls of more than ~46K fresh tokens at TP1), and a tuning
 *              knob. Decode batches stay one chunk. */
typedef struct {
  int exact_only;
  int no_rescore;
  int measure;
  m3s_topk_tc_stats *stats;
  int mma_sync;
  int decode_any;
  int rounds_select;
  int score_waves;
  int chunk_rows;
} m3s_topk_tc_hooks;

/* NULL restores the defaults; a CPU context ignores the call. Internal (not
 * exported): tests and m3s-bench link m3sparse_internal. Defined in
 * src/cuda/context.cu, which keeps the hooks in the context's CUDA state. */
void m3s_topk_tc_set_hooks(m3s_context *ctx, const m3s_topk_tc_hooks *hooks);
/* The context's hooks (all zero for a context without CUDA state). */
m3s_topk_tc_hooks m3s_cuda_topk_hooks(const m3s_context *ctx);

/* Backend internals (called from topk.cu; the prepare call from
 * context.cu, once per context). */
size_t m3s_topk_tc_workspace(const m3s_layer_config *cfg, int64_t max_tokens, int64_t max_seq_len);
/* 1 when this call takes the certified path (host-only facts: the batch
 * form, dtypes, alignment, bounds and the hooks). */
int m3s_topk_tc_eligible(const m3s_context *ctx, const m3s_layer_config *cfg,
                         const m3s_batch *batch, const m3s_tensor *iq,
                         const m3s_tensor *index_cache);
#ifdef __CUDACC__
cudaError_t m3s_topk_tc_prepare(void);
#endif
/* 1 when tc_score_ws_kernel, as compiled, launches with the registers its
 * warpgroups hand each other (setmaxnreg: a shortfall would hang it); the
 * context's device current. */
int m3s_topk_tc_ws_fits(void);
m3s_status m3s_topk_tc_run(m3s_context *ctx, const m3s_layer_config *cfg, const m3s_batch *batch,
                           const m3s_tensor *iq, const m3s_tensor *index_cache, m3s_tensor *topk,
                           const m3s_exec *exec);

#ifdef __cplusplus
}
#endif

#endif
