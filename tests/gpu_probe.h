/* Does this machine have a GPU? Asked of the NVIDIA driver itself (libcuda,
 * loaded with dlopen), not of the CUDA runtime or the library, so that a
 * broken runtime or context on a GPU machine is a test FAILURE, never a skip.
 *
 *   gpu_probe() == 0   no GPU: no driver library to load (CI, this kind of
 *                      machine), the CUDA stub library instead of a driver,
 *                      or a driver that reports zero devices. GPU tests skip.
 *   gpu_probe() == 1   a driver with >= 1 device. Any later failure of the
 *                      CUDA runtime or of m3s_context_create(0) fails.
 *   gpu_probe() == -1  a driver is present but cuInit / cuDeviceGetCount
 *                      fail for another reason (driver/kernel-module mismatch,
 *                      ...): a failure.
 * gpu_probe_why() says which, for the skip or failure line.
 * Header-only (no CUDA headers; link ${CMAKE_DL_LIBS}), so CPU tests such as
 * test_api can ask too. */
#ifndef M3S_TEST_GPU_PROBE_H
#define M3S_TEST_GPU_PROBE_H

#include <dlfcn.h>
#include <stdio.h>

static char g_gpu_probe_why[256];

static inline const char *gpu_probe_why(void) { return g_gpu_probe_why; }

static inline int gpu_probe(void) {
  enum { CUDA_SUCCESS = 0, CUDA_ERROR_STUB_LIBRARY = 34, CUDA_ERROR_NO_DEVICE = 100 };
  void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) {
    snprintf(g_gpu_probe_why, sizeof g_gpu_probe_why, "no GPU: no NVIDIA driver (%s)", dlerror());
    return 0;
  }
  int (*cu_init)(unsigned) = (int (*)(unsigned))dlsym(lib, "cuInit");
  int (*cu_count)(int *) = (int (*)(int *))dlsym(lib, "cuDeviceGetCount");
  if (!cu_init || !cu_count) {
    snprintf(g_gpu_probe_why, sizeof g_gpu_probe_why,
             "libcuda.so.1 loads but lacks cuInit/cuDeviceGetCount");
    return -1; /* not closed: the CUDA runtime may use the same library */
  }
  int rc = cu_init(0), n = 0;
  if (rc == CUDA_ERROR_STUB_LIBRARY || rc == CUDA_ERROR_NO_DEVICE) {
    snprintf(g_gpu_probe_why, sizeof g_gpu_probe_why, "no GPU: cuInit returned %d (%s)", rc,
             rc == CUDA_ERROR_STUB_LIBRARY ? "the CUDA stub library, no driver" : "no device");
    return 0;
  }
  if (rc != CUDA_SUCCESS) {
    snprintf(g_gpu_probe_why, sizeof g_gpu_probe_why,
             "an NVIDIA driver is present but cuInit(0) failed with CUresult %d", rc);
    return -1;
  }
  rc = cu_count(&n);
  if (rc != CUDA_SUCCESS) {
    snprintf(g_gpu_probe_why, sizeof g_gpu_probe_why,
             "an NVIDIA driver is present but cuDeviceGetCount failed with CUresult %d", rc);
    return -1;
  }
  if (n == 0) {
    snprintf(g_gpu_probe_why, sizeof g_gpu_probe_why, "no GPU: the driver reports 0 devices");
    return 0;
  }
  snprintf(g_gpu_probe_why, sizeof g_gpu_probe_why, "the driver reports %d device(s)", n);
  return 1;
}

#endif
