/* The bit-exact invariances of tests/test_invariance.c, run on a CUDA
 * context (head-major == token-major, shuffled pages, decode == 1-token
 * prefill, spec decode == separate positions, chunked == one-shot prefill,
 * repeated runs). */
#define M3S_INVARIANCE_GPU 1
#include "test_invariance.c"
