/* Hopper (sm_90a) building blocks shared by the TMA kernels of the CUDA
 * backend (topk_tc.cu, attention_tma.cu): shared-memory mbarriers, tiled
 * TMA loads and plain bulk copies that complete on them, and the cluster
 * barrier and peer shared-memory loads of a thread-block cluster. Built for
 * sm_90a only; elsewhere the loads trap (the launchers never pick these
 * kernels off sm_90). */
#ifndef M3S_CUDA_SM90_TMA_CUH
#define M3S_CUDA_SM90_TMA_CUH

#include <cuda.h> /* CUtensorMap (types only: the encoder comes from the runtime) */

#include <stdint.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define M3S_SM90_TMA 1
#else
#define M3S_SM90_TMA 0
#endif

static __device__ __forceinline__ uint32_t sm90_smem(const void *p) {
  return (uint32_t)__cvta_generic_to_shared(p);
}

static __device__ __forceinline__ void sm90_bar_init(unsigned long long *bar, unsigned count) {
#if M3S_SM90_TMA
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(sm90_smem(bar)), "r"(count)
               : "memory");
#else
  (void)bar, (void)count;
#endif
}

static __device__ __forceinline__ void sm90_bar_arrive(unsigned long long *bar) {
#if M3S_SM90_TMA
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(sm90_smem(bar)) : "memory");
#else
  (void)bar;
#endif
}

/* n arrivals at once (1 <= n < 2^20): a thread arriving for others. */
static __device__ __forceinline__ void sm90_bar_arrive_n(unsigned long long *bar, unsigned n) {
#if M3S_SM90_TMA
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0], %1;\n" ::"r"(sm90_smem(bar)), "r"(n)
               : "memory");
#else
  (void)bar, (void)n;
#endif
}

/* Arrives and adds `bytes` to the transaction count the phase waits for. */
static __device__ __forceinline__ void sm90_bar_arrive_tx(unsigned long long *bar, unsigned bytes) {
#if M3S_SM90_TMA
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(sm90_smem(bar)),
               "r"(bytes)
               : "memory");
#else
  (void)bar, (void)bytes;
#endif
}

/* Adds `bytes` to the transaction count the current phase waits for,
 * without arriving (the arrival comes later, e.g. once the data it
 * describes is written). */
static __device__ __forceinline__ void sm90_bar_expect_tx(unsigned long long *bar, unsigned bytes) {
#if M3S_SM90_TMA
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(sm90_smem(bar)),
               "r"(bytes)
               : "memory");
#else
  (void)bar, (void)bytes;
#endif
}

/* Waits until the phase of parity `parity` of the barrier has completed (on
 * a fresh barrier, parity 1 counts as completed). */
static __device__ __forceinline__ void sm90_bar_wait(unsigned long long *bar, unsigned parity) {
#if M3S_SM90_TMA
  asm volatile("{\n.reg .pred p;\nSM90_WAIT:\n"
               "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
               "@!p bra SM90_WAIT;\n}\n" ::"r"(sm90_smem(bar)),
               "r"(parity)
               : "memory");
#else
  (void)bar, (void)parity;
#endif
}

/* Makes this thread's mbarrier.init visible to the async proxy (the TMA
 * completing transactions on the barriers) before the next CTA barrier. */
static __device__ __forceinline__ void sm90_fence_barrier_init() {
#if M3S_SM90_TMA
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

/* Orders this thread's generic-proxy shared-memory accesses before later
 * async-proxy ones (wgmma reads, TMA writes) of the same memory. */
static __device__ __forceinline__ void sm90_fence_proxy_async() {
#if M3S_SM90_TMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

static __device__ __forceinline__ void sm90_tma_load_2d(void *dst, const CUtensorMap *map, int c0,
                                                        int c1, unsigned long long *bar) {
#if M3S_SM90_TMA
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes "
               "[%0], [%1, {%2, %3}], [%4];\n" ::"r"(sm90_smem(dst)),
               "l"((unsigned long long)map), "r"(c0), "r"(c1), "r"(sm90_smem(bar))
               : "memory");
#else
  (void)dst, (void)map, (void)c0, (void)c1, (void)bar;
  __trap();
#endif
}

static __device__ __forceinline__ void sm90_tma_load_3d(void *dst, const CUtensorMap *map, int c0,
                                                        int c1, int c2, unsigned long long *bar) {
#if M3S_SM90_TMA
  asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes "
               "[%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(sm90_smem(dst)),
               "l"((unsigned long long)map), "r"(c0), "r"(c1), "r"(c2), "r"(sm90_smem(bar))
               : "memory");
#else
  (void)dst, (void)map, (void)c0, (void)c1, (void)c2, (void)bar;
  __trap();
#endif
}

static __device__ __forceinline__ void sm90_tma_load_4d(void *dst, const CUtensorMap *map, int c0,
                                                        int c1, int c2, int c3,
                                                        unsigned long long *bar) {
#if M3S_SM90_TMA
  asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes "
               "[%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(sm90_smem(dst)),
               "l"((unsigned long long)map), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
               "r"(sm90_smem(bar))
               : "memory");
#else
  (void)dst, (void)map, (void)c0, (void)c1, (void)c2, (void)c3, (void)bar;
  __trap();
#endif
}

/* bytes (a multiple of 16) from global src (16-byte aligned) to dst. */
static __device__ __forceinline__ void sm90_bulk_load(void *dst, const void *src, unsigned bytes,
                                                      unsigned long long *bar) {
#if M3S_SM90_TMA
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes "
               "[%0], [%1], %2, [%3];\n" ::"r"(sm90_smem(dst)),
               "l"((unsigned long long)src), "r"(bytes), "r"(sm90_smem(bar))
               : "memory");
#else
  (void)dst, (void)src, (void)bytes, (void)bar;
  __trap();
#endif
}

/* ---- thread-block clusters ---------------------------------------------- */

/* Every thread of the cluster arrives (release: its earlier shared-memory
 * writes become visible to the cluster's threads) and waits for all
 * non-exited threads of the cluster (acquire). Warp-uniform (.aligned). */
static __device__ __forceinline__ void sm90_cluster_sync() {
#if M3S_SM90_TMA
  asm volatile("barrier.cluster.arrive.release.aligned;\n"
               "barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

/* The same without ordering this thread's memory accesses (arrive.relaxed):
 * only that every thread of the cluster got here. For a CTA's exit after
 * its peers' loads from its shared memory, whose values those peers have
 * already consumed; the release form would also wait for this thread's
 * outstanding global stores. */
static __device__ __forceinline__ void sm90_cluster_sync_relaxed() {
#if M3S_SM90_TMA
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n"
               "barrier.cluster.wait.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}

/* The shared::cluster address of the variable at p (this CTA's shared
 * memory) in the cluster's CTA `rank`: the same offset in its shared
 * memory. */
static __device__ __forceinline__ uint32_t sm90_peer_addr(const void *p, unsigned rank) {
  uint32_t a = 0;
#if M3S_SM90_TMA
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(a) : "r"(sm90_smem(p)), "r"(rank));
#else
  (void)p, (void)rank;
  __trap();
#endif
  return a;
}

/* Loads from a peer CTA's shared memory (an sm90_peer_addr address);
 * volatile, so that they stay after the cluster barrier that published the
 * data. */
static __device__ __forceinline__ float sm90_ld_peer(uint32_t a) {
  float v = 0.0f;
#if M3S_SM90_TMA
  asm volatile("ld.shared::cluster.f32 %0, [%1];\n" : "=f"(v) : "r"(a) : "memory");
#else
  (void)a;
  __trap();
#endif
  return v;
}

static __device__ __forceinline__ float2 sm90_ld_peer2(uint32_t a) {
  float2 v = make_float2(0.0f, 0.0f);
#if M3S_SM90_TMA
  asm volatile("ld.shared::cluster.v2.f32 {%0, %1}, [%2];\n"
               : "=f"(v.x), "=f"(v.y)
               : "r"(a)
               : "memory");
#else
  (void)a;
  __trap();
#endif
  return v;
}

#endif
