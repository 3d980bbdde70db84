/* CUDA backend: the key-centric k2q CSR schedule (SPEC section 7) and the
 * k2q attention over it. Semantics are those of the CPU reference
 * (src/cpu/k2q.c): the CSR gives the CPU's bytes exactly; attention is fp32
 * on the SIMT kernel (not bit-identical to the CPU: expf/logf and summation
 * order differ) and within SPEC section 4's tolerance on the tensor-core one
 * (P in the mma dtype). The per-slot partials are combined by
 * src/cuda/merge.cu.
 *
 * Every launch goes to exec->stream (legacy stream 0 when exec is NULL); no
 * allocation, no synchronisation, no host read of device data, no workspace;
 * grids come from host-known shapes (T, Hkv, Hq, R = row_ptr.shape[1] - 1)
 * and the batch's host bound max_q_len.
 *
 * Kernels and launch shapes:
 *  - CSR build, five stream-ordered steps and no scratch memory beyond the
 *    outputs themselves:
 *      1. cudaMemsetAsync(row_ptr, 0).
 *      2. csr_fill_kernel (count) grid ceil(T*Hkv/256), 256 threads, a thread
 *         per (t, g): q_count[t][g], and atomicAdd(&row_ptr[g][row + 1], 1)
 *         per valid selection (row = base(request) + block).
 *      3. csr_scan_kernel grid Hkv, 1024 threads: exclusive scan of
 *         row_ptr[g][1..R] in place, so row_ptr[g][row + 1] = start of row.
 *      4. csr_fill_kernel (place), same grid: at = atomicAdd(&row_ptr[g][row
 *         + 1], 1) puts key t*K + k at q_indices[g][at]; afterwards
 *         row_ptr[g][row + 1] is the row's end, i.e. row_ptr is final.
 *      5. csr_sort_kernel grid (R, Hkv), 128 threads: sorts each row's keys
 *         (this undoes the order of the atomics: the result is deterministic
 *         and equals the CPU's ascending (t, k) order), then splits them into
 *         q_indices = key / K and q_slot = key % K. Bitonic sort in shared
 *         memory per 2048 keys; longer rows then merge (rank merge, one binary
 *         search per key) ping-ponging between the row's q_indices and q_slot
 *         segments.
 *    Row bases (rows of the requests before r = sum of ceil(seq_len/128)) are
 *    recomputed by each CTA that needs them with a CTA-wide reduction and
 *    scans over seq_lens (cta_request_base, cta_row_owner).
 *  - k2q_attention_kernel grid (R, Hkv, S), 512 threads, ~145 KB dynamic
 *    shared memory, S = clamp(ceil(max_q_len*G/256), 1, 32): the CTAs of (row, g) split
 *    the row's (entry, head) items into S shares of at least 256 (CTAs past
 *    the row's items exit at once); each finds the row's (request, block),
 *    stages the block's K and V as fp32 (fp8 dequantised with its scales),
 *    then each warp takes items of its share: scores, softmax and P.V over
 *    the keys j <= pos(t) in SIMT fp32.
 *  - k2q_tc_kernel<F16> (q and a 16-bit cache of the same dtype, 16-byte
 *    aligned cache rows, contiguous partial rows; tc_takes; the switch of
 *    k2q.h keeps the SIMT kernel): grid (R, Hkv, S), 128 threads, 64 KiB
 *    dynamic shared memory (158 registers, no spills: three CTAs per SM on
 *    H100 / H200, two on A100), S = clamp(ceil(max_q_len * chunks / 32), 1, 64). The block
 *    is staged once as 16-bit K | V rows in the generic attention kernel's
 *    swizzled layout; each warp takes (entry, chunk of 16 heads) items: the
 *    row's 16 heads are one m16 tile of mma.sync, run over the block's keys
 *    16 at a time by attend_unit (../attention.cuh: S = Q K^T, online
 *    softmax in the exp2 domain, O += P V with P in the mma dtype), keys
 *    past pos(t) masked (V in registers, the tile being shared), then the
 *    normalised partial and lse written per head. Within SPEC section 4's
 *    tolerance, not fp32 (P rounded to the mma dtype; the test allows 1e-2
 *    rel L2). Measured (H100, 2026-12-05, ncu, docs/perf-notes.md "Session
 *    18"): 30.8 ms for a fresh 64K TP1 prompt, 59.9 GB of DRAM traffic (the
 *    fp32 partials and each entry's query row), 3.5 ms at 8K.
 *
 * Guards (device data is not validated by the core): requests whose seq_len is outside (0,
 * max_seq_len] own no rows; top-k entries outside [0, nb) are skipped (still not counted); CSR
 * entries whose row is >= R are skipped; row_ptr/q_indices/q_slot/q_count
 * values out of range skip the row or entry; pages out of range give no keys.
 *
 * measured (H100, 2026-11-27, docs/perf-notes.md): SIMT k2q attention 4.2
 * ms for 8000 query rows at TP8 with attention-sink rows of 3000 / 5000
 * queries (24 ms before rows were split across CTAs), 1.2 ms for a 621-row
 * TP2 prefill (not profiled). */
#include "attention.cuh"
#include "k2q.h"

#define FULL_MASK 0xffffffffu
#define CSR_THREADS 256
#define SCAN_THREADS 1024
#define SORT_THREADS 128
#define SORT_CAP 2048
#define ATT_THREADS 512
#define ATT_WARPS (ATT_THREADS / 32)
#define K2Q_MIN_ITEMS 256 /* fewest (entry, head) items worth a CTA's block load */
#define K2Q_MAX_SPLIT 32  /* most CTAs per CSR row */
#define KS_STRIDE (M3S_HEAD_DIM + 1) /* padded K rows: lanes reading 32 keys hit 32 banks */
#define ATT_SMEM_FLOATS                                                                            \
  (M3S_BLOCK_SIZE * KS_STRIDE + M3S_BLOCK_SIZE * M3S_HEAD_DIM + 2 * ATT_WARPS * M3S_HEAD_DIM)
#define ATT_SMEM_BYTES ((size_t)ATT_SMEM_FLOATS * sizeof(float))

/* ---------------------------------------------------------------------------
 * CTA-wide helpers (blockDim.x a multiple of 32, at most 1024; every thread of
 * the CTA must call them).
 * ------------------------------------------------------------------------- */

/* Sum (is_max == 0) or max of v over the CTA; every thread gets the result. */
static __device__ int64_t cta_reduce_i64(int64_t v, int is_max) {
  __shared__ int64_t part[32];
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int o = 16; o > 0; o >>= 1) {
    int64_t n = __shfl_xor_sync(FULL_MASK, v, o);
    v = is_max ? (n > v ? n : v) : v + n;
  }
  if (lane == 0)
    part[warp] = v;
  __syncthreads();
  v = part[0];
  for (int w = 1; w < nw; w++)
    v = is_max ? (part[w] > v ? part[w] : v) : v + part[w];
  __syncthreads();
  return v;
}

/* Inclusive scan of v over the CTA in thread order; *total = the CTA's sum. */
static __device__ int64_t cta_inclusive_scan(int64_t v, int64_t *total) {
  __shared__ int64_t part[32];
  int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int o = 1; o < 32; o <<= 1) {
    int64_t n = __shfl_up_sync(FULL_MASK, v, o);
    if (lane >= o)
      v += n;
  }
  if (lane == 31)
    part[warp] = v;
  __syncthreads();
  int64_t before = 0, all = 0;
  for (int w = 0; w < nw; w++) {
    before += w < warp ? part[w] : 0;
    all += part[w];
  }
  __syncthreads();
  *total = all;
  return v + before;
}

/* ---------------------------------------------------------------------------
 * Requests and CSR rows on the device
 * ------------------------------------------------------------------------- */

/* KV-block rows of request r: ceil(seq_len / 128) for a usable seq_len. */
static __device__ __forceinline__ int64_t req_rows(const m3s_cuda_batch &b, int64_t r) {
  int64_t s = b.seq_lens[r * b.seq_stride];
  return (s > 0 && s <= b.max_seq_len) ? (s + M3S_BLOCK_SIZE - 1) / M3S_BLOCK_SIZE : 0;
}

/* First row and query count of request r (r < num_reqs). */
static __device__ __forceinline__ void req_queries(const m3s_cuda_batch &b, int r, int64_t *row0,
                                            int64_t *n) {
  if (b.uniform_q_len > 0) {
    *row0 = (int64_t)r * b.uniform_q_len;
    *n = b.uniform_q_len;
    return;
  }
  int64_t q0 = b.qsl[0], a = b.qsl[r * b.qsl_stride], c = b.qsl[(r + 1) * b.qsl_stride];
  *row0 = a - q0;
  *n = c - a;
}

/* Rows owned by the requests before my_r, for each thread's own request
 * (my_r < 0: the thread has none and gets 0). The CTA reduces the requests
 * below its smallest request, then scans the range it spans. */
static __device__ int64_t cta_request_base(const m3s_cuda_batch &b, int my_r) {
  __shared__ int64_t excl[1024];
  int64_t hi = cta_reduce_i64(my_r, 1);
  if (hi < 0)
    return 0;
  int64_t lo = -cta_reduce_i64(my_r >= 0 ? -(int64_t)my_r : -(int64_t)INT32_MAX, 1);
  int64_t part = 0, mine = 0;
  for (int64_t r = threadIdx.x; r < lo; r += blockDim.x)
    part += req_rows(b, r);
  int64_t carry = cta_reduce_i64(part, 0);
  for (int64_t c = lo; c <= hi; c += blockDim.x) {
    int64_t r = c + threadIdx.x, v = r <= hi ? req_rows(b, r) : 0, total;
    int64_t incl = cta_inclusive_scan(v, &total);
    excl[threadIdx.x] = carry + incl - v;
    __syncthreads();
    if (my_r >= c && my_r < c + blockDim.x)
      mine = excl[my_r - c];
    __syncthreads();
    carry += total;
  }
  return mine;
}

/* Request owning CSR row `row` and the row's block in it; -1 when none. */
static __device__ int cta_row_owner(const m3s_cuda_batch &b, int64_t row, int64_t *blk) {
  __shared__ int s_r;
  __shared__ int64_t s_blk;
  if (threadIdx.x == 0) {
    s_r = -1;
    s_blk = 0;
  }
  __syncthreads();
  int64_t carry = 0;
  for (int64_t c = 0; c < b.num_reqs; c += blockDim.x) {
    int64_t r = c + threadIdx.x, v = r < b.num_reqs ? req_rows(b, r) : 0, total;
    int64_t incl = cta_inclusive_scan(v, &total);
    if (v > 0 && row >= carry + incl - v && row < carry + incl) {
      s_r = (int)r;
      s_blk = row - (carry + incl - v);
    }
    carry += total;
    __syncthreads();
    if (s_r >= 0 || carry > row)
      break;
  }
  *blk = s_blk;
  return s_r;
}

/* ---------------------------------------------------------------------------
 * k2q CSR build
 * ------------------------------------------------------------------------- */

typedef struct {
  const int32_t *topk;
  int64_t tk_s0, tk_s1, tk_s2;
  int32_t *row_ptr;
  int64_t rp_s0;
  int32_t *qi;
  int64_t qi_s0;
  int32_t *qcount;
  int64_t qc_s0, qc_s1;
  int64_t rows; /* R */
  int64_t cap;  /* T * K: length of a q_indices row */
  int hkv, k;
} csr_args;

/* Phase 2 (place == 0): q_count and per-row counts at row_ptr[g][row + 1].
 * Phase 4 (place == 1): the same selections, each placed at the cursor
 * row_ptr[g][row + 1] as the key t*K + slot (slot = rank of the selection
 * among the row's valid entries). One thread per (t, g). */
static __global__ void __launch_bounds__(CSR_THREADS) csr_fill_kernel(m3s_cuda_batch b, csr_args a,
                                                               int place) {
  int64_t it = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  int64_t t = it / a.hkv;
  int g = (int)(it % a.hkv);
  m3s_row_info ri = m3s_row_lookup(b, t);
  int64_t base = cta_request_base(b, ri.valid ? ri.r : -1);
  if (t >= b.num_tokens)
    return;
  int64_t nb = ri.valid ? ri.pos / M3S_BLOCK_SIZE + 1 : 0, kk = nb < a.k ? nb : a.k;
  const int32_t *sel = a.topk + t * a.tk_s0 + g * a.tk_s1;
  int32_t *rp = a.row_ptr + g * a.rp_s0;
  int count = 0;
  for (int64_t k = 0; k < kk; k++) {
    int32_t id = sel[k * a.tk_s2];
    if (id < 0 || id >= nb)
      continue;
    count++;
    int64_t row = base + id;
    if (row >= a.rows)
      continue;
    int at = atomicAdd(&rp[row + 1], 1);
    /* the slot is the selection's rank among the valid entries of its top-k
     * row (holes of -1 compacted), so slots 0..q_count-1 are all written */
    if (place && at >= 0 && at < a.cap)
      a.qi[g * a.qi_s0 + at] = (int32_t)(t * a.k + (count - 1));
  }
  if (!place)
    a.qcount[t * a.qc_s0 + g * a.qc_s1] = count;
}

/* Phase 3: row_ptr[g][1 + x] = sum of the counts of rows < x (in place). */
static __global__ void __launch_bounds__(SCAN_THREADS)
    csr_scan_kernel(int32_t *row_ptr, int64_t rp_s0, int64_t rows) {
  int32_t *cnt = row_ptr + blockIdx.x * rp_s0 + 1;
  int64_t carry = 0;
  for (int64_t c = 0; c < rows; c += blockDim.x) {
    int64_t x = c + threadIdx.x, v = x < rows ? cnt[x] : 0, total;
    int64_t incl = cta_inclusive_scan(v, &total);
    if (x < rows)
      cnt[x] = (int32_t)(carry + incl - v);
    carry += total;
  }
}

/* Ascending bitonic sort of s[0, n), n a power of two. */
static __device__ void cta_bitonic_sort(int32_t *s, int n) {
  for (int size = 2; size <= n; size <<= 1)
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < n; i += blockDim.x) {
        int j = i ^ stride;
        if (j > i) {
          int32_t x = s[i], y = s[j];
          if ((x > y) == ((i & size) == 0)) {
            s[i] = y;
            s[j] = x;
          }
        }
      }
      __syncthreads();
    }
}

/* Loads src[0, len) (len <= SORT_CAP) into s, padded to a power of two with
 * INT32_MAX, and sorts it. */
static __device__ void sort_chunk_smem(const int32_t *src, int len, int32_t *s) {
  int n = 1;
  while (n < len)
    n <<= 1;
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    s[i] = i < len ? src[i] : INT32_MAX;
  __syncthreads();
  cta_bitonic_sort(s, n);
}

/* Number of elements of the sorted a[0, n) below key. */
static __device__ __forceinline__ int64_t count_below(const int32_t *a, int64_t n, int32_t key) {
  int64_t lo = 0, hi = n;
  while (lo < hi) {
    int64_t mid = (lo + hi) >> 1;
    if (a[mid] < key)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

/* Merges sorted runs of width w pairwise from src into dst (keys distinct:
 * each key's place is its index in its run plus its rank in the other run). */
static __device__ void rank_merge_pass(const int32_t *src, int32_t *dst, int64_t len, int64_t w) {
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    int64_t a0 = i / (2 * w) * (2 * w);
    int64_t a1 = a0 + w < len ? a0 + w : len, a2 = a0 + 2 * w < len ? a0 + 2 * w : len;
    int32_t key = src[i];
    if (i < a1)
      dst[i + count_below(src + a1, a2 - a1, key)] = key;
    else
      dst[a0 + (i - a1) + count_below(src + a0, a1 - a0, key)] = key;
  }
}

/* Phase 5: one CTA per (row, g). */
static __global__ void __launch_bounds__(SORT_THREADS)
    csr_sort_kernel(const int32_t *row_ptr, int64_t rp_s0, int32_t *qi, int64_t qi_s0,
                    int32_t *qs, int64_t qs_s0, int64_t cap, int k) {
  __shared__ int32_t s[SORT_CAP];
  int64_t row = blockIdx.x;
  int g = blockIdx.y;
  int64_t lo = row_ptr[g * rp_s0 + row], hi = row_ptr[g * rp_s0 + row + 1];
  if (lo < 0 || hi > cap || lo >= hi)
    return;
  int32_t *keys = qi + g * qi_s0 + lo, *spare = qs + g * qs_s0 + lo;
  int64_t len = hi - lo;
  if (len <= SORT_CAP) {
    sort_chunk_smem(keys, (int)len, s);
    for (int i = threadIdx.x; i < len; i += blockDim.x) {
      keys[i] = s[i] / k;
      spare[i] = s[i] % k;
    }
    return;
  }
  for (int64_t c = 0; c < len; c += SORT_CAP) {
    int n = (int)(len - c < SORT_CAP ? len - c : SORT_CAP);
    sort_chunk_smem(keys + c, n, s);
    for (int i = threadIdx.x; i < n; i += blockDim.x)
      keys[c + i] = s[i];
    __syncthreads();
  }
  int32_t *src = keys, *dst = spare;
  for (int64_t w = SORT_CAP; w < len; w *= 2) {
    rank_merge_pass(src, dst, len, w);
    __syncthreads();
    int32_t *x = src;
    src = dst;
    dst = x;
  }
  /* split in place: each index is read and written by one thread only */
  for (int64_t i = threadIdx.x; i < len; i += blockDim.x) {
    int32_t key = src[i];
    keys[i] = key / k;
    spare[i] = key % k;
  }
}

extern "C" m3s_status m3s_cuda_build_k2q_csr(m3s_context *ctx, const m3s_layer_config *cfg,
                                             const m3s_batch *batch, const m3s_tensor *topk,
                                             m3s_tensor *row_ptr, m3s_tensor *q_indices,
                                             m3s_tensor *q_slot, m3s_tensor *q_count,
                                             const m3s_exec *exec) {
  (void)ctx;
  const char *fn = "m3s_build_k2q_csr";
  cudaStream_t st = m3s_cuda_stream(exec);
  csr_args a;
  a.topk = (const int32_t *)topk->data;
  a.tk_s0 = topk->stride[0];
  a.tk_s1 = topk->stride[1];
  a.tk_s2 = topk->stride[2];
  a.row_ptr = (int32_t *)row_ptr->data;
  a.rp_s0 = row_ptr->stride[0];
  a.qi = (int32_t *)q_indices->data;
  a.qi_s0 = q_indices->stride[0];
  a.qcount = (int32_t *)q_count->data;
  a.qc_s0 = q_count->stride[0];
  a.qc_s1 = q_count->stride[1];
  a.rows = row_ptr->shape[1] - 1;
  a.cap = q_indices->shape[1];
  a.hkv = cfg->num_kv_heads;
  a.k = cfg->topk;
  int64_t tokens = batch->num_tokens;
  if (a.rows > INT32_MAX)
    return m3s_fail(M3S_ERR_UNSUPPORTED, fn, "%lld CSR rows exceed the grid limit",
                    (long long)a.rows);
  /* 1. zero (row_ptr is contiguous: validated by the core) */
  cudaError_t err = cudaMemsetAsync(row_ptr->data, 0,
                                    sizeof(int32_t) * (size_t)(a.hkv * (a.rows + 1)), st);
  if (err != cudaSuccess)
    return m3s_fail(M3S_ERR_CUDA, fn, "cudaMemsetAsync(row_ptr) failed: %s",
                    cudaGetErrorString(err));
  if (tokens == 0)
    return M3S_OK;
  m3s_cuda_batch b = m3s_cuda_batch_of(batch);
  int64_t fill_blocks = m3s_ceil_div(tokens * a.hkv, CSR_THREADS);
  if (fill_blocks > INT32_MAX)
    return m3s_fail(M3S_ERR_UNSUPPORTED, fn, "%lld rows x %d KV heads exceed one CUDA grid",
                    (long long)tokens, a.hkv);
  unsigned fill_grid = (unsigned)fill_blocks;
  m3s_status s;
  /* 2. count */
  csr_fill_kernel<<<fill_grid, CSR_THREADS, 0, st>>>(b, a, 0);
  if ((s = m3s_cuda_check_launch(fn, "csr_fill_kernel(count)")))
    return s;
  if (a.rows == 0)
    return M3S_OK;
  /* 3. scan */
  csr_scan_kernel<<<(unsigned)a.hkv, SCAN_THREADS, 0, st>>>(a.row_ptr, a.rp_s0, a.rows);
  if ((s = m3s_cuda_check_launch(fn, "csr_scan_kernel")))
    return s;
  /* 4. place */
  csr_fill_kernel<<<fill_grid, CSR_THREADS, 0, st>>>(b, a, 1);
  if ((s = m3s_cuda_check_launch(fn, "csr_fill_kernel(place)")))
    return s;
  /* 5. sort rows, split keys */
  dim3 grid((unsigned)a.rows, (unsigned)a.hkv);
  csr_sort_kernel<<<grid, SORT_THREADS, 0, st>>>(a.row_ptr, a.rp_s0, a.qi, a.qi_s0,
                                                  (int32_t *)q_slot->data, q_slot->stride[0],
                                                  a.cap, a.k);
  return m3s_cuda_check_launch(fn, "csr_sort_kernel");
}

/* ---------------------------------------------------------------------------
 * k2q attention: partial attention of each (block, query) pair
 * ------------------------------------------------------------------------- */

typedef struct {
  const void *q;
  m3s_dtype q_dt;
  int64_t q_s0, q_s1;
  const void *kv;
  m3s_dtype kv_dt;
  int64_t kv_s0, kv_s1, kv_s2, num_pages;
  m3s_cuda_scales sc;
  const int32_t *rp, *qi, *qs;
  int64_t rp_s0, qi_s0, qi_s1, qs_s0, qs_s1, cap;
  float *po, *pl;
  int64_t po_s0, po_s1, po_s2, pl_s0, pl_s1, pl_s2;
  int group, topk;
  float scale;
} k2q_args;

/* Keys [0, nk) of the block (page) of KV head g as fp32 into ks (padded
 * rows) and vs; rows >= nk are zero. */
static __device__ void load_block(const k2q_args &a, int64_t page, int g, int nk, float *ks,
                                  float *vs) {
  for (int idx = threadIdx.x; idx < M3S_BLOCK_SIZE * 2 * M3S_HEAD_DIM; idx += blockDim.x) {
    int j = idx / (2 * M3S_HEAD_DIM), d = idx % (2 * M3S_HEAD_DIM);
    float x = 0.0f;
    if (j < nk) {
      int64_t slot = page * M3S_BLOCK_SIZE + j;
      float sc = d < M3S_HEAD_DIM ? m3s_scale_k(a.sc, g, slot) : m3s_scale_v(a.sc, g, slot);
      x = m3s_ld(a.kv, a.kv_dt, page * a.kv_s0 + g * a.kv_s1 + j * a.kv_s2 + d) * sc;
    }
    if (d < M3S_HEAD_DIM)
      ks[j * KS_STRIDE + d] = x;
    else
      vs[j * M3S_HEAD_DIM + d - M3S_HEAD_DIM] = x;
  }
}

static __device__ __forceinline__ float warp_max_f(float v) {
  for (int o = 16; o > 0; o >>= 1)
    v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}

static __device__ __forceinline__ float warp_sum_f(float v) {
  for (int o = 16; o > 0; o >>= 1)
    v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}

/* A CTA's CSR row (blockIdx.x, KV head blockIdx.y) as both attention
 * kernels take it: its entries from lo; this CTA's share [it0, it1) of the
 * row's (entries x per_entry) items, at least min_items each (a long row,
 * an attention-sink block every query selects, spreads over up to
 * gridDim.z CTAs; short rows stay on one; each item is one warp's whole job
 * either way, so the split does not change any result bit); the row's
 * request block blk, the request's query rows [row0, row0 + n) and length
 * seq, and the block's page and visible keys nk_blk. */
typedef struct {
  int64_t lo, it0, it1, blk, row0, n, seq, page;
  int nk_blk;
} k2q_row;

/* k2q_row of this CTA; false when it has nothing to do (uniform over the
 * CTA). */
static __device__ __forceinline__ bool k2q_row_of(const m3s_cuda_batch &b, const k2q_args &a,
                                                  int64_t per_entry, int64_t min_items,
                                                  k2q_row &w) {
  const int64_t row = blockIdx.x;
  const int g = blockIdx.y;
  const int64_t lo = a.rp[g * a.rp_s0 + row], hi = a.rp[g * a.rp_s0 + row + 1];
  if (lo < 0 || hi > a.cap || lo >= hi)
    return false;
  const int64_t items = (hi - lo) * per_entry;
  int64_t per = (items + gridDim.z - 1) / gridDim.z;
  per = per < min_items ? min_items : per;
  w.lo = lo;
  w.it0 = (int64_t)blockIdx.z * per;
  w.it1 = w.it0 + per < items ? w.it0 + per : items;
  if (w.it0 >= items)
    return false;
  const int r = cta_row_owner(b, row, &w.blk);
  if (r < 0)
    return false;
  w.seq = b.seq_lens[r * b.seq_stride];
  req_queries(b, r, &w.row0, &w.n);
  if (w.n < 0 || w.seq < w.n)
    return false;
  w.page = m3s_page(b.bt, b.bt_s0, b.bt_s1, b.bt_cols, r, w.blk, a.num_pages);
  const int64_t in_blk = w.seq - w.blk * M3S_BLOCK_SIZE;
  w.nk_blk = w.page < 0 ? 0 : (int)(in_blk < M3S_BLOCK_SIZE ? in_blk : M3S_BLOCK_SIZE);
  return true;
}

/* Entry e of the row: its query row t, its slot and the block's keys t
 * sees, nk >= 0 (causal); false for an entry out of range (skipped). */
static __device__ __forceinline__ bool k2q_entry(const m3s_cuda_batch &b, const k2q_args &a,
                                                 int g, const k2q_row &w, int64_t e, int64_t &t,
                                                 int &slot, int &nk) {
  t = a.qi[g * a.qi_s0 + e * a.qi_s1];
  slot = a.qs[g * a.qs_s0 + e * a.qs_s1];
  if (t < w.row0 || t >= w.row0 + w.n || t >= b.num_tokens || slot < 0 || slot >= a.topk)
    return false;
  int64_t k = w.seq - w.n + (t - w.row0) + 1 - w.blk * M3S_BLOCK_SIZE;
  k = k < w.nk_blk ? k : w.nk_blk;
  nk = k > 0 ? (int)k : 0;
  return true;
}

/* One warp: query row t, head h over the block's keys [0, nk); writes the
 * normalised partial output and lse of slot `slot` (0 / -inf when nk == 0).
 * qw, pw: this warp's 128-float staging rows. */
static __device__ void attend_entry(const k2q_args &a, const float *ks, const float *vs, float *qw,
                             float *pw, int64_t t, int64_t h, int slot, int nk) {
  int lane = threadIdx.x & 31;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f}, lse = -INFINITY;
  if (nk > 0) {
    for (int i = 0; i < 4; i++)
      qw[lane + 32 * i] = m3s_ld(a.q, a.q_dt, t * a.q_s0 + h * a.q_s1 + lane + 32 * i);
    __syncwarp();
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int d = 0; d < M3S_HEAD_DIM; d++) {
      float qd = qw[d];
#pragma unroll
      for (int i = 0; i < 4; i++)
        s[i] += qd * ks[(lane + 32 * i) * KS_STRIDE + d];
    }
    float m = -INFINITY;
    for (int i = 0; i < 4; i++) {
      s[i] = lane + 32 * i < nk ? s[i] * a.scale : -INFINITY;
      m = fmaxf(m, s[i]);
    }
    m = warp_max_f(m);
    float l = 0.0f;
    for (int i = 0; i < 4; i++) {
      float p = (lane + 32 * i < nk && m != -INFINITY) ? expf(s[i] - m) : 0.0f;
      pw[lane + 32 * i] = p;
      l += p;
    }
    l = warp_sum_f(l);
    __syncwarp();
    if (l > 0.0f) {
      for (int j = 0; j < nk; j++) {
        float p = pw[j];
#pragma unroll
        for (int i = 0; i < 4; i++)
          acc[i] += p * vs[j * M3S_HEAD_DIM + lane + 32 * i];
      }
      float inv = 1.0f / l;
      for (int i = 0; i < 4; i++)
        acc[i] *= inv;
      lse = m + logf(l);
    }
  }
  float *o = a.po + t * a.po_s0 + h * a.po_s1 + slot * a.po_s2;
  for (int i = 0; i < 4; i++)
    o[lane + 32 * i] = acc[i];
  if (lane == 0)
    a.pl[t * a.pl_s0 + h * a.pl_s1 + slot * a.pl_s2] = lse;
  __syncwarp();
}

static __global__ void __launch_bounds__(ATT_THREADS) k2q_attention_kernel(m3s_cuda_batch b,
                                                                    k2q_args a) {
  extern __shared__ float smem[];
  float *ks = smem, *vs = ks + M3S_BLOCK_SIZE * KS_STRIDE, *qw = vs + M3S_BLOCK_SIZE * M3S_HEAD_DIM;
  float *pw = qw + ATT_WARPS * M3S_HEAD_DIM;
  const int g = blockIdx.y;
  /* Phase 0-1: this CTA's share of the row's (entry, head) items, the
   * request and block (k2q_row_of) */
  k2q_row w;
  if (!k2q_row_of(b, a, a.group, K2Q_MIN_ITEMS, w))
    return;
  /* Phase 2: stage the block once */
  load_block(a, w.page, g, w.nk_blk, ks, vs);
  __syncthreads();
  /* Phase 3: this CTA's (entry, head) items of the row, a warp each */
  const int warp = threadIdx.x >> 5;
  for (int64_t it = w.it0 + warp; it < w.it1; it += ATT_WARPS) {
    const int64_t e = w.lo + it / a.group, h = (int64_t)g * a.group + it % a.group;
    int64_t t;
    int slot, nk;
    if (k2q_entry(b, a, g, w, e, t, slot, nk))
      attend_entry(a, ks, vs, qw + warp * M3S_HEAD_DIM, pw + warp * M3S_HEAD_DIM, t, h, slot, nk);
  }
}

/* ---------------------------------------------------------------------------
 * k2q attention on tensor cores (q and a 16-bit cache of the same dtype)
 * ------------------------------------------------------------------------- */

#define TC_THREADS 128
#define TC_WARPS (TC_THREADS / 32)
#define TC_ROW_BYTES (2 * M3S_HEAD_DIM * 2)              /* a key's K | V, 16-bit */
#define TC_SMEM_BYTES (M3S_BLOCK_SIZE * TC_ROW_BYTES)   /* the block: 64 KiB */
#define TC_MIN_ITEMS 32 /* fewest (entry, head chunk) items worth a CTA's block load */
#define TC_MAX_SPLIT 64 /* most CTAs per CSR row */

/* Keys [0, nk) of the block (page) of KV head g into tile as 16-bit K | V
 * rows of 512 bytes in attend_unit's layout (unit_chunk<512, 128>: 16-byte
 * chunks XOR-swizzled by the key row), rows >= nk zero. The cache rows
 * are 16-byte aligned (m3s_cuda_k2q_attention checks). */
static __device__ void tc_stage(const k2q_args &a, int64_t page, int g, int nk,
                                unsigned char *tile) {
  for (int idx = threadIdx.x; idx < M3S_BLOCK_SIZE * 32; idx += blockDim.x) {
    const int j = idx >> 5, c = idx & 31;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (j < nk)
      v = __ldg((const uint4 *)((const uint16_t *)a.kv + page * a.kv_s0 + g * a.kv_s1 +
                                j * a.kv_s2) +
                c);
    *(uint4 *)(tile + unit_chunk<TC_ROW_BYTES, 128>(j, c)) = v;
  }
}

/* One warp: query row t, heads h0 .. h0 + nh - 1 (an m16 tile) over the
 * staged block's keys [0, nk), 16 at a time (attend_unit: S = Q K^T on
 * mma.sync, online softmax, O += P V with P in the mma dtype); writes each
 * head's normalised partial and lse at slot `slot` (0 / -inf when nk == 0),
 * as attend_entry does. */
template <bool F16>
static __device__ void tc_attend(const k2q_args &a, const unsigned char *tile, int64_t t, int h0,
                                 int nh, int slot, int nk, int lane) {
  warp_state ws;
  warp_state_init(ws);
  if (nk > 0) {
    uint32_t qa[8][4];
    load_q_rows<F16>(a.q, a.q_s0, a.q_s1, 0, t, h0, nh, qa, lane);
    const float sl2 = a.scale * LOG2E;
    const uint32_t base = smem_addr(tile);
    for (int u = 0; 16 * u < nk; u++) {
      const uint32_t unit = base + (uint32_t)(16 * u * TC_ROW_BYTES);
      const int nv = nk - 16 * u;
      if (nv >= 16)
        attend_unit<F16, TC_ROW_BYTES, 128, F16, 1, MASK_NONE>(unit, qa, 16, NULL, sl2, ws, lane);
      else /* keys nv..15 may be visible to other rows: masked in registers */
        attend_unit<F16, TC_ROW_BYTES, 128, F16, 1, MASK_SV>(unit, qa, nv, NULL, sl2, ws, lane);
    }
  }
  quad_sum_l(ws);
  const int g4 = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int hi = 0; hi < 2; hi++) {
    const int r = g4 + 8 * hi;
    if (r >= nh)
      continue;
    const int64_t h = h0 + r;
    const float l = ws.l[hi], inv = l > 0.0f ? 1.0f / l : 0.0f;
    float *o = a.po + t * a.po_s0 + h * a.po_s1 + slot * a.po_s2;
#pragma unroll
    for (int dt = 0; dt < 16; dt++)
      *(float2 *)&o[dt * 8 + 2 * t4] =
          make_float2(ws.acc[dt][2 * hi] * inv, ws.acc[dt][2 * hi + 1] * inv);
    if (t4 == 0)
      a.pl[t * a.pl_s0 + h * a.pl_s1 + slot * a.pl_s2] =
          l > 0.0f ? (ws.m[hi] + log2f(l)) * LN2 : -INFINITY;
  }
}

/* grid (R, Hkv, S), TC_THREADS threads, TC_SMEM_BYTES dynamic shared
 * memory: the CSR row's block staged once as 16-bit tiles, then each warp
 * takes (entry, chunk of 16 heads) items of the CTA's share, as
 * k2q_attention_kernel takes (entry, head) items. */
template <bool F16>
static __global__ void __launch_bounds__(TC_THREADS, 3)
    k2q_tc_kernel(m3s_cuda_batch b, k2q_args a) {
  extern __shared__ __align__(128) unsigned char k2q_tile[];
  const int g = blockIdx.y;
  /* Phase 0-1: this CTA's share of the row's (entry, chunk of 16 heads)
   * items, the request and block (k2q_row_of) */
  const int nchunk = (a.group + HEADS_PER_CTA - 1) / HEADS_PER_CTA;
  k2q_row w;
  if (!k2q_row_of(b, a, nchunk, TC_MIN_ITEMS, w))
    return;
  /* Phase 2: stage the block once */
  tc_stage(a, w.page, g, w.nk_blk, k2q_tile);
  __syncthreads();
  /* Phase 3: the items, a warp each */
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int64_t it = w.it0 + warp; it < w.it1; it += TC_WARPS) {
    const int chunk = (int)(it % nchunk);
    int64_t t;
    int slot, nk;
    if (!k2q_entry(b, a, g, w, w.lo + it / nchunk, t, slot, nk))
      continue;
    const int nh = min(HEADS_PER_CTA, a.group - chunk * HEADS_PER_CTA);
    tc_attend<F16>(a, k2q_tile, t, g * a.group + chunk * HEADS_PER_CTA, nh, slot, nk, lane);
  }
}

extern "C" cudaError_t m3s_cuda_k2q_prepare(void) {
  cudaError_t err = cudaFuncSetAttribute(k2q_attention_kernel,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)ATT_SMEM_BYTES);
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(k2q_tc_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               TC_SMEM_BYTES);
  if (err == cudaSuccess)
    err = cudaFuncSetAttribute(k2q_tc_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               TC_SMEM_BYTES);
  return err;
}

/* The tensor-core kernel takes a call whose cache is 16-bit of q's dtype
 * (so no scales and no conversion), with 16-byte aligned cache rows and
 * contiguous partial rows, unless the context's switch (k2q.h) says SIMT. */
static int tc_takes(const m3s_context *ctx, const m3s_tensor *q, const m3s_tensor *kv,
                    const m3s_tensor *part_out, const m3s_tensor *part_lse) {
  const int q16 = q->dtype == M3S_BF16 || q->dtype == M3S_F16;
  return !m3s_cuda_k2q_simt(ctx) && q16 && kv->dtype == q->dtype &&
         (uintptr_t)kv->data % 16 == 0 && kv->stride[0] % 8 == 0 && kv->stride[1] % 8 == 0 &&
         kv->stride[2] % 8 == 0 && kv->stride[3] == 1 && q->stride[2] == 1 &&
         (uintptr_t)part_out->data % 8 == 0 && part_out->stride[3] == 1 &&
         part_out->stride[0] % 2 == 0 && part_out->stride[1] % 2 == 0 &&
         part_out->stride[2] % 2 == 0 && part_lse->ndim == 3;
}

extern "C" int m3s_k2q_tc_takes(const m3s_context *ctx, const m3s_tensor *q, const m3s_tensor *kv,
                                const m3s_tensor *part_out, const m3s_tensor *part_lse) {
  return ctx && ctx->device >= 0 && tc_takes(ctx, q, kv, part_out, part_lse);
}

/* The shared-memory limit was raised at context creation (context.cu). */
extern "C" m3s_status m3s_cuda_k2q_attention(m3s_context *ctx, const m3s_layer_config *cfg,
                                             const m3s_batch *batch, const m3s_tensor *q,
                                             const m3s_tensor *kv_cache,
                                             const m3s_kv_scales *scales,
                                             const m3s_tensor *row_ptr,
                                             const m3s_tensor *q_indices,
                                             const m3s_tensor *q_slot, m3s_tensor *part_out,
                                             m3s_tensor *part_lse, const m3s_exec *exec) {
  const char *fn = "m3s_k2q_attention";
  int64_t rows = row_ptr->shape[1] - 1;
  if (rows == 0 || batch->num_tokens == 0)
    return M3S_OK;
  if (rows > INT32_MAX)
    return m3s_fail(M3S_ERR_UNSUPPORTED, fn, "%lld CSR rows exceed the grid limit",
                    (long long)rows);
  k2q_args a;
  a.q = q->data;
  a.q_dt = q->dtype;
  a.q_s0 = q->stride[0];
  a.q_s1 = q->stride[1];
  a.kv = kv_cache->data;
  a.kv_dt = kv_cache->dtype;
  a.kv_s0 = kv_cache->stride[0];
  a.kv_s1 = kv_cache->stride[1];
  a.kv_s2 = kv_cache->stride[2];
  a.num_pages = kv_cache->shape[0];
  a.sc = m3s_cuda_scales_of(scales, kv_cache->dtype);
  a.rp = (const int32_t *)row_ptr->data;
  a.rp_s0 = row_ptr->stride[0];
  a.qi = (const int32_t *)q_indices->data;
  a.qi_s0 = q_indices->stride[0];
  a.qi_s1 = q_indices->stride[1];
  a.qs = (const int32_t *)q_slot->data;
  a.qs_s0 = q_slot->stride[0];
  a.qs_s1 = q_slot->stride[1];
  a.cap = q_indices->shape[1];
  a.po = (float *)part_out->data;
  a.po_s0 = part_out->stride[0];
  a.po_s1 = part_out->stride[1];
  a.po_s2 = part_out->stride[2];
  a.pl = (float *)part_lse->data;
  a.pl_s0 = part_lse->stride[0];
  a.pl_s1 = part_lse->stride[1];
  a.pl_s2 = part_lse->stride[2];
  a.group = cfg->num_q_heads / cfg->num_kv_heads;
  a.topk = cfg->topk;
  a.scale = cfg->softmax_scale;
  /* A row belongs to one request and holds one entry per query that selects
   * its block: max_q_len x G items (on tensor cores max_q_len x head chunks)
   * unless top-k rows repeat a block. That host bound sizes the split (only
   * parallelism depends on it: each CTA's share comes from the row's real
   * length); the caps bound idle CTAs, which cost a scheduling slot each (one
   * ~145 KB SIMT CTA per SM). */
  if (tc_takes(ctx, q, kv_cache, part_out, part_lse)) {
    /* items are (entry, chunk of 16 heads), each a warp's m16 tile */
    const int64_t chunks = (a.group + HEADS_PER_CTA - 1) / HEADS_PER_CTA;
    int64_t split = m3s_ceil_div((int64_t)batch->max_q_len * chunks, TC_MIN_ITEMS);
    split = split < 1 ? 1 : split < TC_MAX_SPLIT ? split : TC_MAX_SPLIT;
    dim3 grid((unsigned)rows, (unsigned)cfg->num_kv_heads, (unsigned)split);
    if (q->dtype == M3S_F16)
      k2q_tc_kernel<true><<<grid, TC_THREADS, TC_SMEM_BYTES, m3s_cuda_stream(exec)>>>(
          m3s_cuda_batch_of(batch), a);
    else
      k2q_tc_kernel<false><<<grid, TC_THREADS, TC_SMEM_BYTES, m3s_cuda_stream(exec)>>>(
          m3s_cuda_batch_of(batch), a);
    return m3s_cuda_check_launch(fn, "k2q_tc_kernel");
  }
  int64_t split = m3s_ceil_div((int64_t)batch->max_q_len * a.group, K2Q_MIN_ITEMS);
  split = split < 1 ? 1 : split;
  split = split < K2Q_MAX_SPLIT ? split : K2Q_MAX_SPLIT;
  dim3 grid((unsigned)rows, (unsigned)cfg->num_kv_heads, (unsigned)split);
  k2q_attention_kernel<<<grid, ATT_THREADS, ATT_SMEM_BYTES, m3s_cuda_stream(exec)>>>(
      m3s_cuda_batch_of(batch), a);
  return m3s_cuda_check_launch(fn, "k2q_attention_kernel");
}
