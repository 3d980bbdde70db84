/* m3s-bench: output: a line per case, the markdown table, the CSV file. */
#include "bench.h"

void print_case_line(const bench *B, int i, const case_result *r) {
  char shape[96];
  case_shape(&r->c, &B->o, shape, sizeof shape);
  printf("[%3d/%d] %-12s %-28s ", i + 1, g_ncases, k_op_name[r->c.op], shape);
  switch (r->status) {
  case RES_OK: {
    double gbps = r->bytes / (r->med_us * 1e-6) / 1e9, tf = r->flops / (r->med_us * 1e-6) / 1e12;
    printf("median %9.1f us  min %9.1f  p90 %9.1f | %6.0f GB/s", r->med_us, r->min_us, r->p90_us,
           gbps);
    if (B->hbm_gbps > 0)
      printf(" %5.1f%% HBM", 100 * gbps / B->hbm_gbps);
    printf(" | %7.2f TFLOP/s", tf);
    if (B->gemm_tflops > 0)
      printf(" %5.1f%% GEMM", 100 * tf / B->gemm_tflops);
    printf(" | %.4g MB, %.4g GFLOP, %d sets, %d reps, %s, kernel %s", r->bytes / 1e6,
           r->flops / 1e9, r->sets, r->reps, r->eager ? "eager" : "graph", r->kernel);
    if (r->note[0])
      printf(" [%s]", r->note);
    printf("\n");
    break;
  }
  case RES_UNSUPPORTED:
    printf("unsupported: %s\n", r->note);
    break;
  case RES_SKIPPED:
    printf("skipped: %s\n", r->note);
    break;
  default:
    printf("ERROR: %s\n", r->note);
    break;
  }
  fflush(stdout);
}

void print_table(const bench *B, double wall) {
  int nok = 0, nun = 0, nerr = 0, nskip = 0, neager = 0;
  printf("\n## m3s-bench: %s; ceilings HBM copy ", B->card);
  if (B->hbm_gbps > 0)
    printf("%.0f GB/s", B->hbm_gbps);
  else
    printf("n/a");
  if (B->gather_gbps > 0)
    printf(", random 64 KiB page reads %.0f GB/s", B->gather_gbps);
  printf(", bf16 GEMM ");
  if (B->gemm_tflops > 0)
    printf("%.0f TFLOP/s", B->gemm_tflops);
  else
    printf("n/a");
  if (B->launch_us[0] > 0)
    printf(", launch floor %.2f us (graph of 1 empty kernel)", B->launch_us[0]);
  printf("\n");
  printf("| case | shape | median us | GB/s | %%HBM | TFLOP/s | %%GEMM |\n");
  printf("|---|---|---:|---:|---:|---:|---:|\n");
  for (int i = 0; i < g_ncases; i++) {
    const case_result *r = &g_res[i];
    char shape[96];
    case_shape(&r->c, &B->o, shape, sizeof shape);
    printf("| %s | %s | ", k_op_name[r->c.op], shape);
    if (r->status == RES_OK) {
      double gbps = r->bytes / (r->med_us * 1e-6) / 1e9, tf = r->flops / (r->med_us * 1e-6) / 1e12;
      char ph[16] = "-", pg[16] = "-";
      if (B->hbm_gbps > 0)
        snprintf(ph, sizeof ph, "%.1f", 100 * gbps / B->hbm_gbps);
      if (B->gemm_tflops > 0)
        snprintf(pg, sizeof pg, "%.1f", 100 * tf / B->gemm_tflops);
      printf("%.*f%s | %.0f | %s | %.*f | %s |\n", r->med_us < 1000 ? 1 : 0, r->med_us,
             r->eager ? "*" : "", gbps, ph, tf < 10 ? 2 : 1, tf, pg);
      nok++;
      neager += r->eager;
    } else {
      const char *w = r->status == RES_UNSUPPORTED ? "unsupported"
                      : r->status == RES_SKIPPED   ? "skipped"
                      : r->status == RES_PENDING   ? "not run"
                                                   : "ERROR";
      printf("%s | - | - | - | - |\n", w);
      nun += r->status == RES_UNSUPPORTED;
      nskip += r->status == RES_SKIPPED || r->status == RES_PENDING;
      nerr += r->status == RES_ERROR;
    }
  }
  printf("%d cases: %d timed, %d unsupported, %d failed, %d skipped; %.0f s%s\n", g_ncases, nok,
         nun, nerr, nskip, wall,
         !neager ? "" : B->o.no_graph ? "; * = eager calls (--no-graph)"
                                      : "; * = eager calls (graph capture failed)");
}

int write_csv(const bench *B, const char *path) {
  FILE *f = fopen(path, "w");
  if (!f) {
    fprintf(stderr, "m3s-bench: cannot write %s\n", path);
    return 0;
  }
  fprintf(f, "case,shape,op,tp,hq,hkv,bs,q_len,ctx,kv_dtype,idx_dtype,layout,status,mode,sets,reps,"
             "median_us,min_us,p90_us,max_us,bytes,flops,gbps,pct_hbm,tflops,pct_gemm,"
             "hbm_ceiling_gbps,gemm_ceiling_tflops,card,kernel,note\n");
  for (int i = 0; i < g_ncases; i++) {
    const case_result *r = &g_res[i];
    m3s_layer_config cfg = m3s_config_minimax_m3(r->c.tp);
    char shape[96], note[256];
    case_shape(&r->c, &B->o, shape, sizeof shape);
    snprintf(note, sizeof note, "%s", r->note);
    for (char *p = note; *p; p++)
      if (*p == '"')
        *p = '\'';
    static const char *const st[] = {"not_run", "ok", "unsupported", "error", "skipped"};
    fprintf(f, "%s,%s,%s,%d,%d,%d,%d,%d,%lld,%s,%s,%s,%s,%s,%d,%d,", k_op_name[r->c.op], shape,
            k_op_key[r->c.op], r->c.tp, cfg.num_q_heads, cfg.num_kv_heads, r->c.bs, r->c.qlen,
            (long long)r->c.ctx, r->c.kv_dt >= 0 ? m3s_dtype_name((m3s_dtype)r->c.kv_dt) : "",
            r->c.idx_dt >= 0 ? m3s_dtype_name((m3s_dtype)r->c.idx_dt) : "",
            r->c.kv_dt >= 0 ? (B->o.token_major ? "token_major" : "head_major") : "",
            st[r->status], r->status == RES_OK ? (r->eager ? "eager" : "graph") : "", r->sets,
            r->reps);
    if (r->status == RES_OK) {
      double gbps = r->bytes / (r->med_us * 1e-6) / 1e9, tf = r->flops / (r->med_us * 1e-6) / 1e12;
      fprintf(f, "%.3f,%.3f,%.3f,%.3f,%.0f,%.0f,%.1f,%.2f,%.3f,%.2f,", r->med_us, r->min_us,
              r->p90_us, r->max_us, r->bytes, r->flops, gbps,
              B->hbm_gbps > 0 ? 100 * gbps / B->hbm_gbps : 0.0, tf,
              B->gemm_tflops > 0 ? 100 * tf / B->gemm_tflops : 0.0);
    } else {
      fprintf(f, ",,,,,,,,,,");
    }
    fprintf(f, "%.1f,%.1f,\"%s\",\"%s\",\"%s\"\n", B->hbm_gbps, B->gemm_tflops, B->card,
            r->kernel, note);
  }
  int ok = fclose(f) == 0;
  if (ok)
    printf("csv: %s\n", path);
  return ok;
}
