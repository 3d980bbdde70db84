/* protocol.c -- the call protocol: which outputs a call may write, the
 * expectation (must succeed, must fail, either) checked against the status and
 * the error text. */
#include "fuzz.h"

/* ======================================================================== */
/* the call protocol                                                        */
/* ======================================================================== */
int g_opi;

void outputs(const targ *const *list, int n) {
  for (int i = 0; i < g_nb; i++)
    g_b[i].out = 0;
  for (int i = 0; i < n; i++)
    if (list[i] && list[i]->b)
      list[i]->b->out = 1;
}

clock_t g_t0;
void pre_call(const char *fn) {
  g_fn = fn;
  g_t0 = clock();
  check_guards();
  for (int i = 0; i < g_nb; i++)
    memcpy(g_b[i].snap, g_b[i].data, g_b[i].bytes);
}

void post_call(m3s_status st, int ex) {
  g_st = st;
  S.calls++;
  S.op_calls[g_opi]++;
  const char *err = m3s_last_error();
  if (g_trace)
    fprintf(stderr, "[m3s-fuzz] %-18s %-24s expect %-4s -> %2d (%.3f s) %s\n", g_op, g_fn,
            (ex & EX_FAIL)  ? "FAIL"
            : (ex & EX_ANY) ? "ANY"
                            : "OK",
            (int)st, (double)(clock() - g_t0) / CLOCKS_PER_SEC, err ? err : "(null)");
  if (!err)
    die("m3s_last_error() returned NULL");
  check_guards();
  for (int i = 0; i < g_nb; i++) {
    buf_t *b = &g_b[i];
    if ((st != M3S_OK || !b->out) && memcmp(b->snap, b->data, b->bytes) != 0) {
      size_t j = 0;
      while (b->snap[j] == b->data[j])
        j++;
      die("%s call modified %s '%s' at byte %zu", st != M3S_OK ? "rejected" : "accepted",
          b->out ? "output" : "input", b->name, j);
    }
  }
  if (st != M3S_OK) {
    S.rejected++;
    S.op_rej[g_opi]++;
    if (!err[0])
      die("call failed with status %d but m3s_last_error() is empty", (int)st);
    if (strncmp(err, "m3s_", 4) != 0)
      die("error text does not name the function");
    if ((int)st < 1 || (int)st > 13)
      die("status %d is not an m3s_status value", (int)st);
  } else {
    S.ok++;
    if (err[0])
      die("call succeeded but m3s_last_error() is \"%s\"", err);
  }
  if (ex & EX_FAIL) {
    S.must_fail++;
    if (st == M3S_OK)
      die("the input holds a mutation the API must reject, but the call returned M3S_OK");
  } else if (ex & EX_ANY) {
    S.any++;
  } else {
    S.must_ok++;
    if (st != M3S_OK)
      die("a valid call was rejected");
  }
}


m3s_context *g_ctx;
m3s_context *pick_ctx(int *ex) {
  if (rchance(2)) {
    *ex |= EX_FAIL;
    return NULL;
  }
  return g_ctx;
}
unsigned char g_ws[512];
m3s_exec g_exec;
const m3s_exec *pick_exec(void) {
  switch (rpick(4)) {
  case 1: g_exec = (m3s_exec){NULL, 0, NULL}; return &g_exec;
  case 2: g_exec = (m3s_exec){g_ws, sizeof g_ws, (void *)(uintptr_t)0x1}; return &g_exec;
  case 3: g_exec = (m3s_exec){NULL, 12345, (void *)(uintptr_t)0xdeadbeef}; return &g_exec;
  default: return NULL;
  }
}

