/*
 * m3sparse.h -- the public C API of m3sparse.
 *
 * m3sparse serves the sparse-attention layers of MiniMax-M3-class models: a
 * lightning indexer scores 128-token key/value blocks and picks the top-K
 * blocks per query token and KV head; block-sparse GQA attention then reads only
 * those blocks from a paged KV cache. Prefill, decode and speculative decode.
 * The exact semantics are defined by SPEC.md (shipped in docs/SPEC.md); this
 * header states the layouts and rules an engine needs to call it.
 *
 * Conventions used by every function below:
 *  - Tensors are passed as m3s_tensor views: data pointer, dtype, shape and
 *    strides IN ELEMENTS (not bytes), and where the memory lives (host or a CUDA
 *    device). Strides must be >= 0 and the innermost (last) stride must be 1.
 *    Views never own memory.
 *  - Every function returns an m3s_status. On failure nothing has been written to
 *    any output, and m3s_last_error() describes the argument, the rule broken and
 *    the value seen (thread-local text, valid until the next m3s_ call on the same
 *    thread).
 *  - "run" operations (insert, top-k, attention, step, csr, combine, merge)
 *    allocate nothing (no device memory, no host memory), never synchronise
 *    and take the caller's stream and workspace through m3s_exec; the CPU
 *    backend ignores the stream. Kernel attributes that make the CUDA runtime
 *    allocate are set once, by m3s_context_create (tests/test_faults.c).
 *  - Notation: T tokens, Hq query heads, Hkv KV heads (== index heads),
 *    G = Hq/Hkv, D = Di = B = 128 (head dim, index dim, block size == page
 *    size), K = top-k blocks, P = pages in a cache.
 *  - The library never prints unless logging is enabled on the context, and
 *    never calls exit or abort.
 *  - Threads: run operations and queries only read the context, so several
 *    threads may call them on one context at once (tests/test_threads.c,
 *    tests/test_gpu_threads.c);
 *    m3s_context_set_option, m3s_context_set_logging and m3s_context_destroy
 *    must not overlap any other call on that context. The error text is per
 *    thread; a logging callback may be called from several threads at once.
 *    Calls in flight at the same time need their own outputs and workspace.
 *    On CUDA each calling thread must have the context's device current
 *    (cudaSetDevice).
 */
#ifndef M3SPARSE_H
#define M3SPARSE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Every function of this header is exported from the shared library and
 * nothing else is (the library is built with hidden visibility by default;
 * the test abi_exports compares `nm -D` with this header). */
#if defined(_WIN32)
#define M3S_API
#elif defined(__GNUC__)
#define M3S_API __attribute__((visibility("default")))
#else
#define M3S_API
#endif

/* ---------------------------------------------------------------------------
 * Versioning (as in sqlite3.h: a string, a number, and functions returning the
 * values of the library actually linked, to detect header/library mismatch).
 * Before 1.0 a minor version may change struct layouts: 0.2.0 added the
 * trailing m3s_batch.cp (context parallel), so code built against 0.1 must
 * be rebuilt.
 * ------------------------------------------------------------------------- */
#define M3S_VERSION_MAJOR 0
#define M3S_VERSION_MINOR 2
#define M3S_VERSION_PATCH 0
#define M3S_VERSION "0.2.0"
/* MAJOR*1000000 + MINOR*1000 + PATCH */
#define M3S_VERSION_NUMBER 2000

M3S_API const char *m3s_version(void); /* == M3S_VERSION of the linked library */
M3S_API int m3s_version_number(void);  /* == M3S_VERSION_NUMBER of the linked library */

/* ---------------------------------------------------------------------------
 * Status codes and errors
 * ------------------------------------------------------------------------- */
typedef enum m3s_status {
  M3S_OK = 0,
  M3S_ERR_NULL = 1,         /* a required pointer argument is NULL */
  M3S_ERR_INVALID = 2,      /* a scalar argument or config value is out of its domain */
  M3S_ERR_SHAPE = 3,        /* wrong ndim or a dimension disagrees with the others */
  M3S_ERR_DTYPE = 4,        /* dtype not accepted for this operand */
  M3S_ERR_LAYOUT = 5,       /* bad strides (innermost != 1, negative, overlapping outputs,
                               an operand that must be contiguous and is not) or a CUDA
                               workspace that is not 256-byte aligned */
  M3S_ERR_RANGE = 6,        /* a value read from an index tensor is out of range (slot,
                               page id, block-table width, top-k or candidate id, q_count,
                               CSR entry) */
  M3S_ERR_DEVICE = 7,       /* tensor memory, or the calling thread's current CUDA device,
                               is not where the context runs */
  M3S_ERR_WORKSPACE = 8,    /* workspace missing or smaller than required */
  M3S_ERR_BATCH = 9,        /* inconsistent batch description (counts, query_start_loc,
                               seq_lens) */
  M3S_ERR_UNSUPPORTED = 10, /* valid, but not supported by this backend/build */
  M3S_ERR_NO_MEMORY = 11,   /* context creation could not allocate host memory */
  M3S_ERR_CUDA = 12,        /* a CUDA runtime call failed */
  M3S_ERR_INTERNAL = 13
} m3s_status;

/* Short constant English text for a status ("M3S_ERR_SHAPE: ..."). Never NULL. */
M3S_API const char *m3s_status_string(m3s_status s);

/* Detailed text of the last failure on the calling thread: names the argument,
 * the rule and the value seen. "" when the last call succeeded. Never NULL. */
M3S_API const char *m3s_last_error(void);

/* ---------------------------------------------------------------------------
 * Tensor views
 * ------------------------------------------------------------------------- */
typedef enum m3s_dtype {
  M3S_BF16 = 0,
  M3S_F16 = 1,
  M3S_F32 = 2,
  M3S_E4M3 = 3, /* OCP fp8 e4m3fn, stored as bytes, max 448, no inf */
  M3S_E5M2 = 4, /* OCP fp8 e5m2, stored as bytes, max 57344 */
  M3S_I32 = 5,
  M3S_I64 = 6
} m3s_dtype;

#define M3S_MAX_DIMS 4
#define M3S_HOST (-1) /* m3s_tensor.device for host memory */

typedef struct m3s_tensor {
  void *data; /* element [0,...,0]; may be NULL only if numel == 0 */
  m3s_dtype dtype;
  int ndim; /* 0..M3S_MAX_DIMS; 0 = scalar */
  int64_t shape[M3S_MAX_DIMS];
  int64_t stride[M3S_MAX_DIMS]; /* in elements; the last must be 1 */
  int device;                   /* M3S_HOST or a CUDA device ordinal */
} m3s_tensor;

/* Size in bytes of one element of dtype (0 for an unknown value). */
M3S_API size_t m3s_dtype_size(m3s_dtype dt);
/* Name such as "bf16" ("?" for an unknown value). */
M3S_API const char *m3s_dtype_name(m3s_dtype dt);

/* A contiguous (row-major) view. ndim <= M3S_MAX_DIMS. */
M3S_API m3s_tensor m3s_tensor_make(void *data, m3s_dtype dt, int ndim, const int64_t *shape,
                                   int device);
/* A view with explicit strides (in elements). */
M3S_API m3s_tensor m3s_tensor_strided(void *data, m3s_dtype dt, int ndim, const int64_t *shape,
                                      const int64_t *stride, int device);
/* Rows [start, start+len) of dimension 0 of t (no copy). Used to cut the decode
 * and prefill parts out of whole-step tensors. Out-of-range arguments give a
 * view with data == NULL and ndim == -1, which every function rejects. */
M3S_API m3s_tensor m3s_tensor_narrow(const m3s_tensor *t, int64_t start, int64_t len);

/* ---------------------------------------------------------------------------
 * Layer configuration
 * ------------------------------------------------------------------------- */
#define M3S_HEAD_DIM 128
#define M3S_INDEX_DIM 128
#define M3S_BLOCK_SIZE 128
#define M3S_MAX_TOPK 64   /* largest supported top-k */
#define M3S_MAX_HEADS 256 /* largest supported Hq */

typedef struct m3s_layer_config {
  int num_q_heads;     /* Hq, 1..M3S_MAX_HEADS, multiple of num_kv_heads */
  int num_kv_heads;    /* Hkv == number of index heads, >= 1 */
  int topk;            /* K, 1..M3S_MAX_TOPK (M3: 16) */
  int init_blocks;     /* forced leading blocks, >= 0, counted inside K (M3: 0) */
  int local_blocks;    /* forced trailing blocks, >= 0, counted inside K (M3: 1) */
  float softmax_scale; /* > 0 and finite (M3: 1/sqrt(128)) */
  int head_dim;        /* must be 128 */
  int index_dim;       /* must be 128 */
  int block_size;      /* must be 128 */
} m3s_layer_config;

/* The MiniMax-M3 layer for one tensor-parallel rank: tp_size 1, 2, 4 or 8
 * gives Hq/Hkv = 64/4, 32/2, 16/1, 8/1; K 16, init 0, local 1, scale
 * 1/sqrt(128). Any other tp_size gives a config with no heads (num_q_heads ==
 * num_kv_heads == 0), which every function rejects naming the tp_size rule. */
M3S_API m3s_layer_config m3s_config_minimax_m3(int tp_size);

/* ---------------------------------------------------------------------------
 * Context (one per device; all state of the library lives here)
 * ------------------------------------------------------------------------- */
typedef struct m3s_context m3s_context;

/* device < 0: the CPU reference backend (needs no CUDA at all).
 * device >= 0: the CUDA backend on that device ordinal (M3S_ERR_UNSUPPORTED in
 * builds without CUDA; M3S_ERR_CUDA "no CUDA device" on a machine without a
 * usable GPU, or when the kernels' launch attributes cannot be set on it;
 * M3S_ERR_INVALID for an ordinal >= the device count; M3S_ERR_NO_MEMORY when
 * host or CUDA-runtime memory runs out).
 * Creation is where the library allocates (host memory; on CUDA also inside
 * the runtime): run calls do not. */
M3S_API m3s_status m3s_context_create(int device, m3s_context **out_ctx);
/* NULL is a no-op. */
M3S_API void m3s_context_destroy(m3s_context *ctx);
/* The device of the context (< 0 for the CPU). -2 for NULL. */
M3S_API int m3s_context_device(const m3s_context *ctx);

/* Logging: off by default. level 0 = off, 1 = errors, 2 = info, 3 = debug.
 * Messages go to the callback (or stderr when it is NULL). */
typedef void (*m3s_log_fn)(int level, const char *msg, void *user);
M3S_API m3s_status m3s_context_set_logging(m3s_context *ctx, int level, m3s_log_fn fn, void *user);

/* Context options (m3s_context_set_option / m3s_context_get_option).
 *
 * M3S_OPT_BATCH_INVARIANT (value 0 or 1, default 0): 1 promises that every
 *   output row of m3s_sparse_attention / m3s_step_forward depends only on its
 *   own request (query rows, seq_len, block-table rows, caches, config), never
 *   on the other requests of the batch or on the host bounds num_tokens,
 *   max_q_len and max_seq_len. The CPU backend always keeps this promise, so
 *   the option changes nothing there. On CUDA attention then always runs the
 *   generic kernel (on sm_90 not the TMA or union kernels) and never splits a
 *   row's blocks across CTAs (split-K is chosen per launch from the host
 *   bounds, which makes the last bits depend on the batch): small decode
 *   batches and prefill / speculative batches run slower, and no workspace is
 *   needed for the split. Top-k, inserts and the k2q path are batch-independent in both
 *   modes. Set it before m3s_workspace_size / m3s_plan_step; not while
 *   another thread runs calls on the context. */
typedef enum {
  M3S_OPT_BATCH_INVARIANT = 1,
} m3s_option;

/* M3S_ERR_INVALID for an unknown option or a value outside its range (the
 * option keeps its value). */
M3S_API m3s_status m3s_context_set_option(m3s_context *ctx, m3s_option opt, int64_t value);
/* *out_value = the option's current value. */
M3S_API m3s_status m3s_context_get_option(const m3s_context *ctx, m3s_option opt,
                                          int64_t *out_value);

/* Execution resources of one call: the caller's stream (a cudaStream_t; NULL
 * = legacy default stream; ignored on the CPU) and workspace (device memory on a
 * CUDA context, host memory on the CPU), at least as large as the size
 * reported by m3s_workspace_size / m3s_plan_step; on CUDA 256-byte aligned
 * (else M3S_ERR_LAYOUT). A NULL m3s_exec pointer is the same as
 * {NULL, 0, NULL}. */
typedef struct m3s_exec {
  void *workspace;
  size_t workspace_bytes;
  void *stream;
} m3s_exec;

/* ---------------------------------------------------------------------------
 * Batches
 *
 * A batch is a set of requests whose query tokens occupy consecutive rows of
 * the query tensors. Token i of request r (0 <= i < n_r) sits at row
 *     uniform_q_len > 0:  r * uniform_q_len + i          (n_r = uniform_q_len)
 *     uniform_q_len == 0: query_start_loc[r] - query_start_loc[0] + i
 *                         (n_r = query_start_loc[r+1] - query_start_loc[r])
 * and has absolute position pos = seq_lens[r] - n_r + i, so it sees
 * L = pos + 1 keys and nb = pos/128 + 1 blocks (SPEC sections 3 and 5).
 *   - uniform decode (q_len = 1 + num_spec_tokens): uniform_q_len = q_len.
 *   - ragged decode / prefill / chunked prefill: query_start_loc (vLLM's
 *     query_start_loc or a slice of it: query_start_loc[0] need not be 0).
 *   - a batch with num_reqs == 0 and num_tokens == 0 is empty and needs no
 *     tensors (the decode or prefill part of a step that has none).
 *   - seq_lens[r] == 0 marks a padded request (CUDA-graph filler): its rows get
 *     output 0, lse -inf and top-k rows of -1. Otherwise seq_lens[r] >= n_r.
 *   - block_table[r][p] is the physical page of request r's logical page p of
 *     the main K/V cache; index_block_table the same for the index cache (it may
 *     be the same tensor). Both i32 [num_reqs, max_pages], any row stride;
 *     entries for pages beyond the sequence are never read. Under context
 *     parallel (cp below) both list only the rank's own pages.
 * All tensors of a batch live where the context runs; their contents are read
 * on the device (graph-safe). num_tokens, max_q_len and max_seq_len are host
 * upper bounds used for grid sizes and workspace; the CPU checks them against
 * the data, the CUDA backend trusts them (it clamps, never reads out of
 * bounds).
 * ------------------------------------------------------------------------- */
#define M3S_MAX_CP_SIZE 64 /* largest supported number of context-parallel ranks */

/* Context parallel (SPEC section 10): a long context split over cp_size
 * ranks. The 128-token blocks of every request are owned round-robin, in
 * groups of I = blocks_per_interleave consecutive blocks:
 *     owner(b)  = (b / I) % cp_size
 *     column(b) = (b / (I * cp_size)) * I + b % I      (on the owner)
 * Rank cp_rank holds only its own blocks, in both caches, and the batch's
 * block tables list only them: block_table[r][column(b)] is the page of
 * request r's logical block b on its owner (index_block_table likewise). A
 * request of n blocks needs ceil(n / (I * cp_size)) * I columns at most
 * (m3s_cp_local_block computes column(b)). Everything else of the batch is
 * the same on every rank: query rows, query_start_loc and seq_lens stay the
 * GLOBAL ones (positions, causality and forced blocks are global), and so do
 * the queries; top-k ids are always global logical block numbers.
 *
 * A zero-initialised m3s_cp means no context parallel and behaves as one rank
 * ({1, 0, I}: column(b) = b for any I), so existing callers that zero the
 * batch or use designated initialisers keep their meaning. It is a member of
 * the batch, not an argument of the operations, because it says how the
 * batch's block tables are read: it travels with them, every operation that
 * takes a batch validates it, and the operations that need the whole cache
 * (m3s_index_topk, m3s_step_forward, m3s_k2q_attention) refuse cp_size > 1
 * instead of reading a rank's tables as if they were whole. */
typedef struct m3s_cp {
  int cp_size;               /* ranks, 0..M3S_MAX_CP_SIZE (0: no context parallel) */
  int cp_rank;               /* this rank, 0 <= cp_rank < max(cp_size, 1) */
  int blocks_per_interleave; /* I >= 1 (0 is accepted only with cp_size == 0) */
} m3s_cp;

typedef struct m3s_batch {
  int num_reqs;                 /* >= 0 */
  int num_tokens;               /* rows of the query tensors of this batch */
  int uniform_q_len;            /* > 0: uniform decode; 0: use query_start_loc */
  int max_q_len;                /* host bound on n_r (uniform: = uniform_q_len) */
  int64_t max_seq_len;          /* host bound on seq_lens[r] */
  m3s_tensor query_start_loc;   /* i32 [num_reqs + 1], non-decreasing; unused if uniform */
  m3s_tensor seq_lens;          /* i32 [num_reqs] */
  m3s_tensor block_table;       /* i32 [num_reqs, max_pages] for the main K/V cache */
  m3s_tensor index_block_table; /* i32 [num_reqs, max_pages'] for the index cache */
  m3s_cp cp;                    /* context parallel; zero: none */
} m3s_batch;

/* A forward step in engine order: decode requests first (rows [0, Td)), then
 * prefill requests (rows [Td, Td + Tp)). Either part may have num_reqs == 0. */
typedef struct m3s_step {
  m3s_batch decode;
  m3s_batch prefill;
} m3s_step;

/* Host-side description of a step, as an engine's scheduler knows it. */
typedef struct m3s_step_desc {
  int num_reqs;
  const int32_t *query_lens; /* [num_reqs] new tokens per request this step (host) */
  const int32_t *seq_lens;   /* [num_reqs] cached + new tokens; 0 = padded (host) */
  int num_spec_tokens;       /* speculative tokens per decode request, 0..1024 */
} m3s_step_desc;

/* The split of SPEC section 5 (vLLM split_decodes_and_prefills with
 * require_uniform, threshold 1 + num_spec_tokens):
 *   1. if query_lens[0] > threshold: no decodes, every request is prefill;
 *   2. else if every query length equals query_lens[0] or is 0: all decode;
 *   3. else decodes are the leading requests whose query length equals
 *      query_lens[0]; the rest are prefills.
 * The decode part is uniform with q_len = query_lens[0] (a decode request with
 * query length 0 must be padded, seq_len 0, and still owns q_len rows, so
 * num_decode_tokens = num_decodes * decode_q_len). If query_lens[0] == 0 every
 * leading zero-length request is a padded decode with q_len 1 + num_spec_tokens;
 * with no decodes, decode_q_len is 1 + num_spec_tokens.
 * The order is SPEC section 5's and vLLM's: "first length > threshold" is
 * tested before "all equal", so a batch of equal-length prompts is all
 * prefill. */
typedef struct m3s_step_plan {
  int num_decodes;
  int num_prefills;
  int decode_q_len;
  int num_decode_tokens;  /* rows [0, num_decode_tokens) */
  int num_prefill_tokens; /* rows [num_decode_tokens, num_tokens) */
  int num_tokens;
  int max_prefill_q_len;
  int64_t max_seq_len;
  int64_t csr_rows;       /* KV-block rows of the prefill part (SPEC section 7) */
  size_t workspace_bytes; /* for m3s_step_forward on this context */
} m3s_step_plan;

M3S_API m3s_status m3s_plan_step(const m3s_context *ctx, const m3s_layer_config *cfg,
                                 const m3s_step_desc *desc, m3s_step_plan *out_plan);

/* Workspace needed by m3s_index_topk / m3s_sparse_attention / m3s_step_forward
 * for batches of at most max_tokens rows and sequences of at most max_seq_len
 * tokens on this context (0 is a valid answer). */
M3S_API m3s_status m3s_workspace_size(const m3s_context *ctx, const m3s_layer_config *cfg,
                                      int64_t max_tokens, int64_t max_seq_len, size_t *out_bytes);

/* ---------------------------------------------------------------------------
 * Caches
 *
 * Main K/V cache: logical [P, Hkv, 128, 256]: page, KV head, token slot, and a
 * row of 256 elements with K in [0,128) and V in [128,256). All four strides
 * are the caller's (innermost 1), so vLLM's head-major [P, Hkv, 128, 256] and
 * token-major [P, 128, Hkv, 256] (pass the permuted view) both work.
 * dtype bf16, f16, e4m3 or e5m2.
 *
 * fp8 scales (m3s_kv_scales): f32, each of k_scale and v_scale either a scalar
 * (ndim 0, or ndim 1 with shape [1]) or per (KV head, slot) [Hkv, P*128]
 * (slot = page*128 + offset). Reading: value = fp8_to_float(byte) * scale.
 * Writing: byte = saturating_round_to_fp8(value / scale). A NULL scales
 * pointer, or (valid, e.g. zero-initialised) tensors with data == NULL, mean
 * scale 1.0. Scales given for a
 * bf16/f16 cache are ignored (vLLM always passes them).
 *
 * Index cache: [P, 128, 128] contiguous, one index key per token, bf16 or e4m3
 * (no scale: written by a saturating cast to +-448).
 * ------------------------------------------------------------------------- */
typedef struct m3s_kv_scales {
  m3s_tensor k_scale;
  m3s_tensor v_scale;
} m3s_kv_scales;

/* Insert new tokens' keys and values into the main cache.
 *   k, v:          [T, Hkv, 128] bf16 or f16 (any strides, innermost 1)
 *   slot_mapping:  [T] i64 or i32; slot = page*128 + offset; slot < 0 skips the
 *                  token (padding); slot >= P*128 is M3S_ERR_RANGE (CPU; the
 *                  CUDA backend skips such tokens).
 *   kv_cache:      [P, Hkv, 128, 256] (see above), written at the slots.
 *   scales:        see above (only for fp8 caches).
 * Two tokens mapping to the same slot: the later row wins (CPU); undefined
 * order on CUDA -- engines never do this. */
M3S_API m3s_status m3s_cache_insert(m3s_context *ctx, const m3s_tensor *k, const m3s_tensor *v,
                                    const m3s_tensor *slot_mapping, m3s_tensor *kv_cache,
                                    const m3s_kv_scales *scales, const m3s_exec *exec);

/* Insert index keys.
 *   ik:            [T, 128] bf16 or f16
 *   slot_mapping:  [T] i64 or i32, as above
 *   index_cache:   [P, 128, 128] bf16 or e4m3, contiguous */
M3S_API m3s_status m3s_index_cache_insert(m3s_context *ctx, const m3s_tensor *ik,
                                          const m3s_tensor *slot_mapping, m3s_tensor *index_cache,
                                          const m3s_exec *exec);

/* ---------------------------------------------------------------------------
 * Index scoring and block selection (SPEC section 3)
 *
 *   iq:           [T, Hkv, 128] bf16 or f16 (one index query per index head)
 *   index_cache:  [P, 128, 128] bf16 or e4m3
 *   topk (out):   [T, Hkv, K] i32, any strides with innermost 1 (so a
 *                 head-major [Hkv, T, K] buffer is passed as a permuted view)
 * For each row t and index head r: block score S(b) = max over visible keys j
 * of block b of dot(iq[t,r], ik[j]) (fp32); forced init/local blocks, then the
 * highest S (ties: lower block id); the min(K, nb) ids in ascending order, then
 * -1. NaN scores rank below every real score. Padded requests: all -1.
 * The selection needs the whole index cache: a batch with batch.cp.cp_size > 1
 * is M3S_ERR_INVALID (a rank runs m3s_index_topk_candidates instead).
 * ------------------------------------------------------------------------- */
M3S_API m3s_status m3s_index_topk(m3s_context *ctx, const m3s_layer_config *cfg,
                                  const m3s_batch *batch, const m3s_tensor *iq,
                                  const m3s_tensor *index_cache, m3s_tensor *topk,
                                  const m3s_exec *exec);

/* ---------------------------------------------------------------------------
 * Block-sparse GQA attention (SPEC section 4)
 *
 *   q:         [T, Hq, 128] bf16 or f16
 *   kv_cache:  [P, Hkv, 128, 256] bf16/f16/e4m3/e5m2 (+ scales)
 *   topk:      [T, Hkv, K] i32 (strided). Only the first min(K, nb) entries of a
 *              row are read; -1 among them means "no block"; any other value
 *              outside [0, nb) or a repeated id is M3S_ERR_RANGE on the CPU (the
 *              CUDA backend skips such entries).
 *   out:       [T, Hq, 128], same dtype as q
 *   lse:       NULL or [T, Hq] f32 (natural log); a row with no visible key
 *              gets out = 0 and lse = -inf.
 * Query head h uses KV head h / G. Keys: j in a selected block, j <= pos.
 * Context parallel (batch.cp.cp_size > 1): the top-k holds the global
 * selection (m3s_merge_topk_candidates); only the selected blocks that
 * cp_rank owns are read, at their rank-local columns, the others are skipped.
 * out and lse are then the rank's partial result (a row that owns none of its
 * blocks: out 0, lse -inf), to be combined by m3s_merge_attn_states_n. */
M3S_API m3s_status m3s_sparse_attention(m3s_context *ctx, const m3s_layer_config *cfg,
                                        const m3s_batch *batch, const m3s_tensor *q,
                                        const m3s_tensor *kv_cache, const m3s_kv_scales *scales,
                                        const m3s_tensor *topk, m3s_tensor *out, m3s_tensor *lse,
                                        const m3s_exec *exec);

/* ---------------------------------------------------------------------------
 * One layer step: index top-k, then attention, for the decode part and the
 * prefill part of a step. Whole-step tensors: q [T, Hq, 128], iq [T, Hkv, 128],
 * topk [T, Hkv, K] (written), out [T, Hq, 128], lse NULL or [T, Hq], with
 * T = decode.num_tokens + prefill.num_tokens (decode rows first). Cache insert
 * is separate (engines insert before attention). A part with cp.cp_size > 1 is
 * M3S_ERR_INVALID: under context parallel the ranks exchange candidates
 * between top-k and attention (section "Context parallel" below).
 * ------------------------------------------------------------------------- */
M3S_API m3s_status m3s_step_forward(m3s_context *ctx, const m3s_layer_config *cfg,
                                    const m3s_step *step, const m3s_tensor *q, const m3s_tensor *iq,
                                    const m3s_tensor *kv_cache, const m3s_kv_scales *scales,
                                    const m3s_tensor *index_cache, m3s_tensor *topk,
                                    m3s_tensor *out, m3s_tensor *lse, const m3s_exec *exec);

/* ---------------------------------------------------------------------------
 * Key-centric (KV-outer) schedule, SPEC section 7.
 *
 * Rows: for KV head g, row (base_r + b) is logical block b of request r of the
 * batch, base_r = sum over r' < r of ceil(seq_lens[r'] / 128); R = total rows
 * (m3s_k2q_csr_rows, or m3s_step_plan.csr_rows).
 *   topk:       [T, Hkv, K] i32 (the batch's selections)
 *   row_ptr:    out, i32 [Hkv, R + 1], contiguous; row_ptr[g][0] = 0
 *   q_indices:  out, i32 [Hkv, T*K], contiguous: for each row, the query
 *               rows t that selected the block, ascending; entries past
 *               row_ptr[g][R] are left untouched
 *   q_slot:     out, i32 [Hkv, T*K], contiguous, parallel to q_indices: the
 *               slot of the selection = its rank among the valid entries of
 *               its top-k row (the row's columns in order, -1 holes skipped),
 *               so the slots of (t, g) are exactly 0 .. q_count[t][g]-1
 *   q_count:    out, i32 [T, Hkv], contiguous: valid selections of (t, g)
 *               (ids in [0, nb) among the first min(K, nb(t)) entries), 0 for
 *               padded rows
 * ------------------------------------------------------------------------- */
M3S_API m3s_status m3s_k2q_csr_rows(const m3s_context *ctx, const m3s_batch *batch,
                                    int64_t *out_rows);

M3S_API m3s_status m3s_build_k2q_csr(m3s_context *ctx, const m3s_layer_config *cfg,
                                     const m3s_batch *batch, const m3s_tensor *topk,
                                     m3s_tensor *row_ptr, m3s_tensor *q_indices, m3s_tensor *q_slot,
                                     m3s_tensor *q_count, const m3s_exec *exec);

/* Attention of every (block, query) pair of the CSR: for each query row t, head
 * h and slot k < q_count[t][h/G], the partial result over the keys of that one
 * block:
 *   part_out:  out, f32 [T, Hq, K, 128]  (normalised within the block)
 *   part_lse:  out, f32 [T, Hq, K]       (-inf when the block has no visible key)
 * Slots k >= q_count are left untouched. Context-parallel batches
 * (batch.cp.cp_size > 1) are M3S_ERR_UNSUPPORTED: use m3s_sparse_attention. */
M3S_API m3s_status m3s_k2q_attention(m3s_context *ctx, const m3s_layer_config *cfg,
                                     const m3s_batch *batch, const m3s_tensor *q,
                                     const m3s_tensor *kv_cache, const m3s_kv_scales *scales,
                                     const m3s_tensor *row_ptr, const m3s_tensor *q_indices,
                                     const m3s_tensor *q_slot, m3s_tensor *part_out,
                                     m3s_tensor *part_lse, const m3s_exec *exec);

/* Combine per-slot partials into the attention result:
 *   part_out [T, Hq, K, 128] f32, part_lse [T, Hq, K] f32, q_count [T, Hkv] i32
 *   out [T, Hq, 128] bf16/f16, lse NULL or [T, Hq] f32.
 * The partials are merged in slot order 0..q_count-1 (deterministic). */
M3S_API m3s_status m3s_combine_partials(m3s_context *ctx, const m3s_layer_config *cfg,
                                        const m3s_tensor *part_out, const m3s_tensor *part_lse,
                                        const m3s_tensor *q_count, m3s_tensor *out, m3s_tensor *lse,
                                        const m3s_exec *exec);

/* ---------------------------------------------------------------------------
 * Merge of two partial attention results over disjoint key sets (e.g. two
 * ranks holding two halves of a context; vLLM's merge_attn_states):
 *   out_a, out_b: [T, H, 128] bf16/f16/f32; lse_a, lse_b: [T, H] f32
 *   out: [T, H, 128] bf16/f16/f32; lse: NULL or [T, H] f32.
 *   lse = log(exp(lse_a) + exp(lse_b)); out = weights of each side.
 * Both sides -inf: out 0, lse -inf. out may alias out_a or out_b exactly.
 * ------------------------------------------------------------------------- */
M3S_API m3s_status m3s_merge_attn_states(m3s_context *ctx, const m3s_tensor *out_a,
                                         const m3s_tensor *lse_a, const m3s_tensor *out_b,
                                         const m3s_tensor *lse_b, m3s_tensor *out, m3s_tensor *lse,
                                         const m3s_exec *exec);

/* ---------------------------------------------------------------------------
 * Context parallel (SPEC section 10; the layout rules are those of m3s_cp)
 *
 * One step of a sparse layer on cp ranks. Each rank has its own context,
 * caches and batch (batch.cp = {cp_size, its rank, I}, its block tables) and
 * the same q, iq, seq_lens and query_start_loc as every other rank:
 *   1. m3s_index_topk_candidates: the rank's K candidates per (token, KV head)
 *      with their scores;
 *   2. the engine all-gathers ids and scores along a new leading dimension
 *      ([cp, T, Hkv, K] each; one all-gather when both are views of one
 *      buffer, see docs/integration.md);
 *   3. m3s_merge_topk_candidates on every rank: the global selection,
 *      bit-identical to m3s_index_topk on the whole cache;
 *   4. m3s_sparse_attention with the rank's batch: the rank's partial out/lse;
 *   5. the engine all-gathers out and lse ([cp, T, Hq, 128], [cp, T, Hq]);
 *      m3s_merge_attn_states_n gives the layer's output (equal to the
 *      single-GPU attention within rounding).
 * All five are graph-safe like the rest of the API: the exchanged sizes
 * depend only on T, Hkv, Hq, K and cp_size.
 * ------------------------------------------------------------------------- */

/* *out_column = column(block) of m3s_cp in the block tables of rank
 * cp->cp_rank, or -1 when another rank owns the block. A host helper for
 * building rank-local block tables and slot mappings (slot = page * 128 +
 * offset of the page at that column); M3S_ERR_INVALID for a bad cp or a
 * negative block. */
M3S_API m3s_status m3s_cp_local_block(const m3s_cp *cp, int64_t block, int64_t *out_column);

/* Step 1: the candidates of one rank for the global top-k.
 *   iq:                 [T, Hkv, 128] bf16 or f16 (every rank the same)
 *   index_cache:        [P, 128, 128] bf16 or e4m3: the rank's pages, listed by
 *                       batch.index_block_table at the columns of m3s_cp
 *   cand_ids (out):     [T, Hkv, K] i32, any strides with innermost 1
 *   cand_scores (out):  [T, Hkv, K] f32, any strides with innermost 1
 * Row (t, r), with nb visible blocks (global), forced blocks F (SPEC 3:
 * b < init or b >= nb - local) and want = min(K, nb) - |F|, holds in order:
 *   1. the owned blocks selected whatever the scores, ascending, score +inf:
 *      the owned forced blocks, or every owned visible block when nb <= K
 *      (nothing is scored then);
 *   2. when nb > K, the best `want` owned non-forced blocks, best first, in
 *      the SPEC 3 rank order (higher score, NaN below every real score, equal
 *      scores: lower id), with their reference scores S(b) (fp32; NaN written
 *      as the quiet NaN 0x7fc00000 and -0 as +0, so every backend writes the
 *      same bits);
 *   3. id -1 with score -inf in the remaining entries.
 * Padded requests: every entry -1 / -inf. Each of the global best `want`
 * non-forced blocks is among its owner's best `want`, so the cp x K
 * candidates contain the selection; a block's score is the fp32 value that
 * m3s_index_topk ranks on the whole cache. batch.cp may be zero (one rank).
 * Workspace: as m3s_index_topk. */
M3S_API m3s_status m3s_index_topk_candidates(m3s_context *ctx, const m3s_layer_config *cfg,
                                             const m3s_batch *batch, const m3s_tensor *iq,
                                             const m3s_tensor *index_cache, m3s_tensor *cand_ids,
                                             m3s_tensor *cand_scores, const m3s_exec *exec);

/* Step 3: the global top-k from the all-gathered candidates.
 *   batch:        any rank's batch (its query_start_loc, seq_lens and cp are
 *                 read; not its block tables)
 *   cand_ids:     [N, T, Hkv, K] i32 with N = max(batch.cp.cp_size, 1): rank
 *                 n's cand_ids at [n] (any strides, innermost 1)
 *   cand_scores:  [N, T, Hkv, K] f32, rank n's cand_scores at [n]
 *   topk (out):   [T, Hkv, K] i32, any strides with innermost 1
 * Every row as m3s_index_topk writes it on the whole cache: the forced blocks
 * (all of them, known from nb: the forced entries of the candidates are not
 * needed and are skipped), then the best min(K, nb) - |F| other candidates in
 * the SPEC 3 rank order; when nb <= K every visible block (the candidates are
 * not read); the ids ascending, then -1. Padded rows: all -1. Candidates with
 * id -1 are holes. Other ids must be < nb, owned by the rank that sent them
 * and not repeated in its row: the CPU backend checks this (M3S_ERR_RANGE
 * naming the entry), the CUDA backend skips ids outside [0, nb) or of another
 * rank. The order of the candidates inside a row does not matter (the merge
 * ranks them by score and id), so an engine may reorder or compact them.
 * No workspace. */
M3S_API m3s_status m3s_merge_topk_candidates(m3s_context *ctx, const m3s_layer_config *cfg,
                                             const m3s_batch *batch, const m3s_tensor *cand_ids,
                                             const m3s_tensor *cand_scores, m3s_tensor *topk,
                                             const m3s_exec *exec);

/* Step 5: merge of N partial attention results over disjoint key sets
 * (m3s_merge_attn_states for N ranks, with the same conventions):
 *   outs:  [N, T, H, 128] bf16/f16/f32, 1 <= N <= M3S_MAX_CP_SIZE
 *   lses:  [N, T, H] f32
 *   out:   [T, H, 128] bf16/f16/f32; lse: NULL or [T, H] f32.
 *   lse = log(sum_n exp(lses[n])); out = sum_n exp(lses[n] - lse) * outs[n],
 *   summed in the order n = 0..N-1 (deterministic). Every lses[n] -inf:
 *   out 0, lse -inf. out may alias one outs[n] exactly. No workspace. */
M3S_API m3s_status m3s_merge_attn_states_n(m3s_context *ctx, const m3s_tensor *outs,
                                           const m3s_tensor *lses, m3s_tensor *out,
                                           m3s_tensor *lse, const m3s_exec *exec);

/* ---------------------------------------------------------------------------
 * Support query (SPEC section 8)
 * ------------------------------------------------------------------------- */
typedef enum m3s_op {
  M3S_OP_CACHE_INSERT = 0,
  M3S_OP_INDEX_INSERT = 1,
  M3S_OP_INDEX_TOPK = 2,
  M3S_OP_ATTENTION_DECODE = 3,
  M3S_OP_ATTENTION_PREFILL = 4,
  M3S_OP_K2Q = 5,
  M3S_OP_MERGE = 6,
  M3S_OP_INDEX_TOPK_CANDIDATES = 7,  /* m3s_index_topk_candidates */
  M3S_OP_MERGE_TOPK_CANDIDATES = 8,  /* m3s_merge_topk_candidates */
  M3S_OP_ATTENTION_CP = 9,           /* m3s_sparse_attention with batch.cp.cp_size > 1 */
  M3S_OP_MERGE_N = 10                /* m3s_merge_attn_states_n */
} m3s_op;

typedef enum m3s_cache_layout {
  M3S_LAYOUT_HEAD_MAJOR = 0,  /* [P, Hkv, 128, 256] contiguous */
  M3S_LAYOUT_TOKEN_MAJOR = 1, /* [P, 128, Hkv, 256] contiguous, passed permuted */
  M3S_LAYOUT_STRIDED = 2      /* any other strides */
} m3s_cache_layout;

typedef struct m3s_support_query {
  m3s_op op;
  m3s_dtype act_dtype;   /* q / k / v / iq dtype */
  m3s_dtype kv_dtype;    /* main cache dtype */
  m3s_dtype index_dtype; /* index cache dtype */
  int per_slot_scales;   /* 1: fp8 scales per (head, slot) */
  m3s_cache_layout layout;
} m3s_support_query;

typedef struct m3s_support_info {
  int supported;    /* 1 or 0 */
  char kernel[64];  /* the kernels this op may run on this context, '|'-separated (the
                       choice is made per call from the batch's host bounds and the
                       options); "" if none */
  char reason[160]; /* why not, "" if supported */
} m3s_support_info;

/* Fills *info; returns M3S_OK whenever the arguments themselves are valid
 * (an unsupported combination is reported through info->supported == 0, as is
 * an operation the context's backend does not implement, with the reason:
 * the operations that answer M3S_ERR_UNSUPPORTED when called). */
M3S_API m3s_status m3s_query_support(const m3s_context *ctx, const m3s_layer_config *cfg,
                                     const m3s_support_query *query, m3s_support_info *info);

/* Validates a layer config alone (same checks every operation makes). */
M3S_API m3s_status m3s_config_validate(const m3s_layer_config *cfg);

#ifdef __cplusplus
}
#endif
#endif /* M3SPARSE_H */
