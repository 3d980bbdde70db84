/*
 * main.c -- m3s-bench: timings of the m3sparse CUDA backend through the
 * public API, against ceilings measured on the same card.
 *
 * CASES (one table row each):
 *   decode topk   m3s_index_topk, uniform decode batch
 *   decode attn   m3s_sparse_attention, uniform decode batch, host-made top-k
 *   decode step   m3s_step_forward with only a decode part (top-k + attention)
 *   prefill topk / attn / step: one request, a chunk of new tokens behind a
 *                 cached context (query_start_loc batch)
 * Shapes: MiniMax-M3 per TP rank (m3s_config_minimax_m3: TP1 64/4, TP8 8/1,
 * K 16, local 1), batch size, q_len (1 + speculative tokens), context; bf16
 * activations; bf16 or e4m3 main K/V cache (scalar scales), bf16 or e4m3 index
 * cache; head-major or token-major cache layout.
 *
 * INPUTS. Caches, queries and index queries are N(0,1) values written on the
 * device by a hash-based fill (bench/fill.cu), never zeros. Each request's
 * pages are a shuffled run of one large page pool. Decode sequence lengths are
 * the context minus a small per-request jitter (partial last blocks differ).
 * Top-k input of the attention cases is made on the host: the query's own
 * block plus distinct random earlier blocks, ascending; tokens of one 128-token
 * query block share one random candidate order (--sel token: independent).
 *
 * Method: every case holds S "sets" (block tables
 * over disjoint page ranges of the pool, own q / iq / top-k input), with S
 * chosen so that the bytes of the other S-1 sets exceed 2x the L2 between two
 * uses of one set. Each set runs once eagerly (status checked; UNSUPPORTED is
 * reported and the case skipped), is captured into a CUDA graph (one per set)
 * and replayed --warmup times; then a spin kernel holds the stream while the host
 * enqueues N replays cycling through the sets, each bracketed by CUDA events;
 * the median and the minimum of the N event times are reported. If capture
 * fails the case is timed with eager calls the same way and marked '*'.
 *
 * BYTES AND FLOPS (the least a kernel must move / compute):
 *   top-k:     index keys of each request once (seq_len x 256 B bf16, 128 B
 *              e4m3), iq, top-k output, block table; 2*128 flops per scored
 *              (token, index head, visible key). Tokens with nb <= K take every
 *              block and need no scores (nor their request's keys, if all do).
 *   attention: K and V rows (256 x elem bytes) of every distinct visible key
 *              of the selected blocks per (request, KV head), q, out (+lse),
 *              top-k; 4*128 flops per attended (token, q head, key)
 *   step:      both, without the top-k intermediate; its attention part counts
 *              the blocks the library's own top-k chose (read back after the
 *              warm-up call of each set).
 * Ceilings measured at start: HBM copy (cudaMemcpy device to device, read +
 * write bytes / time, median) and bf16 GEMM (cublasGemmEx 8192^3, fp32
 * compute, median). %HBM and %GEMM are fractions of those.
 */
/* This file: the command line and main. The other files: see bench.h. */
#include "bench.h"
#include "cuda/launch.h"
#include "cuda/sm90/attention_tma.h"
#include "cuda/sm90/topk_tc.h"

static void usage(FILE *f) {
  fprintf(f,
"usage: m3s-bench [--all | --full | --ops LIST] [options]   (no selection: --all)\n"
"Times the m3sparse CUDA backend (device 0 by default) through the public API:\n"
"CUDA-graph replays rotated over several input sets, CUDA-event timing, median;\n"
"achieved GB/s and TFLOP/s against an HBM-copy and a bf16-GEMM ceiling measured\n"
"at start. Prints one line per case, then a markdown table.\n"
"\n"
"case selection:\n"
"  --all             the default set (24 cases, also with no selection): decode topk/attn/step, TP1 and\n"
"                    TP8, bs 1/32/128, q_len 1/4, ctx 8K/32K/128K (a selection),\n"
"                    and TP1 prefill topk/attn of one --chunk behind ctx 0 and 32K;\n"
"                    --kv/--idx lists multiply it, --skew applies to its decode\n"
"                    cases, --chunk's first value sets its prefill chunk; other\n"
"                    shape flags are ignored\n"
"  --full            every op over the shape lists below (120 cases by default)\n"
"  --ops LIST        ops over the shape lists: topk, attn, step (decode), ptopk,\n"
"                    pattn, pstep (prefill); 'decode' / 'prefill' = all three\n"
"                    (with --all: its cases, then these)\n"
"  --tp LIST         tensor-parallel ranks' shapes: 1 (64/4), 2, 4, 8 (8/1)   [1,8]\n"
"  --bs LIST         decode requests                                   [1,32,128]\n"
"  --qlen LIST       decode tokens per request (1 + spec tokens)             [1,4]\n"
"  --ctx LIST        decode context (K = 1024, M = 1048576)       [8K,32K,128K]\n"
"  --prefill-ctx LIST  cached tokens before the prefill chunk              [0,32K]\n"
"  --chunk LIST      new tokens of the prefill chunk                        [4096]\n"
"  --kv LIST         main K/V cache dtype: bf16, e4m3 (scalar scales)      [bf16]\n"
"  --idx LIST        index cache dtype: bf16, e4m3                         [bf16]\n"
"  --skew N          decode cases: requests after the first get ctx / N, one\n"
"                    long request among short ones                            [1]\n"
"  --prefill-reqs N  prefill cases: a ragged batch of N requests of --chunk new\n"
"                    tokens each, request r behind r/(N-1) of --prefill-ctx\n"
"                    (8 with --chunk 2048 --prefill-ctx 28K: the peer's\n"
"                    prefill-ragged8x2k)                                      [1]\n"
"  --list            print the selected cases and their cache needs; no GPU used\n"
"\n"
"inputs and timing:\n"
"  --token-major     pass the K/V cache as token-major [P,128,Hkv,256] (permuted)\n"
"  --lse             attention also writes lse (default: lse = NULL)\n"
"  --sel token       attn cases: every token draws its own blocks (default 'block':\n"
"                    the tokens of one 128-token query block share the draw)\n"
"  --reps N          timed replays per case                                   [50]\n"
"  --warmup N        untimed graph replays per set before timing               [1]\n"
"  --max-sets N      most input sets rotated per case                         [64]\n"
"  --sets N          force N input sets per case\n"
"  --no-graph        time eager calls instead of graph replays\n"
"  --batch-invariant set M3S_OPT_BATCH_INVARIANT on the context (no split-K)\n"
"  --topk-path P     default (certified re-scoring; prefill scores with TMA +\n"
"                    wgmma on sm_90, bf16 or e4m3 index cache), exact (the CUDA-core\n"
"                    path for every batch), mma (certified, mma.sync scores;\n"
"                    decode with an e4m3 index cache: its pages by cp.async,\n"
"                    not TMA), certified (decode: the certified streaming\n"
"                    kernel also for the small batches the dispatch keeps on\n"
"                    the exact kernel), rounds (certified, the selection by\n"
"                    warp-maximum rounds also where the register selection is\n"
"                    the default) or\n"
"                    no-rescore (certified, uncertain blocks decided by their\n"
"                    tensor-core score: NOT exact, only to time what the\n"
"                    re-scoring costs)\n"
"  --score-waves N   sm_90 prefill: the warp-specialised score kernel's work\n"
"                    is cut into about N items per SM (default 1; one\n"
"                    persistent CTA per SM runs them)\n"
"  --chunk-rows N    prefill top-k: at most N rows per chunk of the certified\n"
"                    path (default: what its 512 MiB entry budget holds)\n"
"  --attn-path P     default (sm_90: the persistent TMA kernel for one row per\n"
"                    request, the union kernel for prefill and speculative\n"
"                    batches, contexts <= 32K (fp8 caches <= 16K) and work for\n"
"                    >= half the SMs, on warpgroup consumers for prefill up to\n"
"                    12K (fp8 16K)), generic (the cp.async kernel always),\n"
"                    union (the union kernel for every batch it can run, on\n"
"                    mma.sync consumers), union-wgmma (the same, on\n"
"                    warpgroup wgmma consumers), merge-kernel (the persistent\n"
"                    kernel's splits through the merge kernel where the default\n"
"                    merges them inside a cluster) or k2q (prefill attention by\n"
"                    the key-centric schedule, SPEC section 7: m3s_build_k2q_csr,\n"
"                    m3s_k2q_attention, m3s_combine_partials; fp32 partials of\n"
"                    T x Hq x K x 516 bytes beside the pool: cap it with --mem-gb)\n"
"  --pdl MODE        programmatic dependent launch (sm_90) of the decode chain\n"
"                    (score, selection, attention and merge kernels) and of\n"
"                    the prefill top-k's first score kernel and deferred\n"
"                    selection kernel: default\n"
"                    (batches of one request), on or off             [default]\n"
"  --budget SEC      stop starting cases after SEC seconds                   [420]\n"
"  --case-budget SEC fewer reps/sets when a case would take longer          [20]\n"
"  --mem-gb G        cap of the cache pool (default: free memory less buffers)\n"
"  --device N        CUDA device                                               [0]\n"
"  --no-ceilings     skip the ceilings (copy, random page reads, GEMM, launch\n"
"                    floor; or give --hbm GBPS and --gemm TFLOPS to use known values)\n"
"  --gemm-n N        GEMM size of the ceiling                               [8192]\n"
"  --csv FILE        also write every case, full numbers, as CSV\n"
"  -h, --help        this text\n"
"\n"
"Exit status: 0 when every selected case ran or was reported unsupported or\n"
"skipped, 1 when a case failed (an m3s error other than UNSUPPORTED or a CUDA\n"
"error), 2 on bad flags, 77 when no CUDA device is present.\n");
}

static int parse_args(int argc, char **argv, options *o) {
  enum {
    O_ALL = 256, O_FULL, O_OPS, O_TP, O_BS, O_QLEN, O_CTX, O_PCTX, O_CHUNK, O_KV, O_IDX, O_LIST,
    O_TM, O_LSE, O_SEL, O_REPS, O_WARM, O_MAXSETS, O_SETS, O_NOGRAPH, O_BUDGET, O_CBUDGET,
    O_MEM, O_DEV, O_NOCEIL, O_HBM, O_GEMM, O_GEMMN, O_CSV, O_BINV, O_SKEW, O_TOPKPATH, O_ATTNPATH,
    O_PDL, O_WAVES, O_PREQS, O_CROWS
  };
  static const struct option lo[] = {
      {"all", no_argument, 0, O_ALL},           {"full", no_argument, 0, O_FULL},
      {"ops", required_argument, 0, O_OPS},     {"tp", required_argument, 0, O_TP},
      {"bs", required_argument, 0, O_BS},       {"qlen", required_argument, 0, O_QLEN},
      {"ctx", required_argument, 0, O_CTX},     {"prefill-ctx", required_argument, 0, O_PCTX},
      {"chunk", required_argument, 0, O_CHUNK}, {"kv", required_argument, 0, O_KV},
      {"idx", required_argument, 0, O_IDX},     {"list", no_argument, 0, O_LIST},
      {"token-major", no_argument, 0, O_TM},    {"lse", no_argument, 0, O_LSE},
      {"sel", required_argument, 0, O_SEL},     {"reps", required_argument, 0, O_REPS},
      {"warmup", required_argument, 0, O_WARM}, {"max-sets", required_argument, 0, O_MAXSETS},
      {"sets", required_argument, 0, O_SETS},   {"no-graph", no_argument, 0, O_NOGRAPH},
      {"budget", required_argument, 0, O_BUDGET}, {"case-budget", required_argument, 0, O_CBUDGET},
      {"mem-gb", required_argument, 0, O_MEM},  {"device", required_argument, 0, O_DEV},
      {"no-ceilings", no_argument, 0, O_NOCEIL}, {"hbm", required_argument, 0, O_HBM},
      {"gemm", required_argument, 0, O_GEMM},   {"gemm-n", required_argument, 0, O_GEMMN},
      {"csv", required_argument, 0, O_CSV},     {"help", no_argument, 0, 'h'},
      {"batch-invariant", no_argument, 0, O_BINV}, {"skew", required_argument, 0, O_SKEW},
      {"topk-path", required_argument, 0, O_TOPKPATH},
      {"attn-path", required_argument, 0, O_ATTNPATH}, {"pdl", required_argument, 0, O_PDL},
      {"score-waves", required_argument, 0, O_WAVES},
      {"prefill-reqs", required_argument, 0, O_PREQS},
      {"chunk-rows", required_argument, 0, O_CROWS},
      {0, 0, 0, 0}};
  memset(o, 0, sizeof *o);
  o->tps[0] = 1, o->tps[1] = 8, o->ntp = 2;
  o->bss[0] = 1, o->bss[1] = 32, o->bss[2] = 128, o->nbs = 3;
  o->qlens[0] = 1, o->qlens[1] = 4, o->nq = 2;
  o->ctxs[0] = 8192, o->ctxs[1] = 32768, o->ctxs[2] = 131072, o->nctx = 3;
  o->pctxs[0] = 0, o->pctxs[1] = 32768, o->npctx = 2;
  o->chunks[0] = 4096, o->nchunk = 1;
  o->kvs[0] = M3S_BF16, o->nkv = 1;
  o->idxs[0] = M3S_BF16, o->nidx = 1;
  o->skew = 1;
  o->prefill_reqs = 1;
  o->reps = 50, o->warmup = 1, o->max_sets = 64, o->gemm_n = 8192;
  o->pdl = -1;
  o->budget_s = 420, o->case_budget_s = 20;
  int c;
  int64_t v;
  while ((c = getopt_long(argc, argv, "h", lo, NULL)) != -1) {
    switch (c) {
    case 'h':
      usage(stdout);
      exit(0);
    case O_ALL: o->all = 1; break;
    case O_FULL: o->full = 1; break;
    case O_OPS: if (!parse_ops(optarg, &o->ops)) return 0; break;
    case O_TP:
      if (!parse_list_int(optarg, o->tps, &o->ntp, "--tp", 1, 8)) return 0;
      for (int i = 0; i < o->ntp; i++)
        if (m3s_config_minimax_m3(o->tps[i]).num_q_heads == 0) {
          fprintf(stderr, "m3s-bench: --tp takes 1, 2, 4 or 8\n");
          return 0;
        }
      break;
    case O_BS: if (!parse_list_int(optarg, o->bss, &o->nbs, "--bs", 1, 65536)) return 0; break;
    case O_QLEN: if (!parse_list_int(optarg, o->qlens, &o->nq, "--qlen", 1, 64)) return 0; break;
    case O_CTX:
      if (!parse_list64(optarg, o->ctxs, &o->nctx, "--ctx")) return 0;
      for (int i = 0; i < o->nctx; i++)
        if (o->ctxs[i] < 1 || o->ctxs[i] > ((int64_t)1 << 30)) {
          fprintf(stderr, "m3s-bench: --ctx values must be in [1, 1G]\n");
          return 0;
        }
      break;
    case O_PCTX:
      if (!parse_list64(optarg, o->pctxs, &o->npctx, "--prefill-ctx")) return 0;
      for (int i = 0; i < o->npctx; i++)
        if (o->pctxs[i] > ((int64_t)1 << 29)) {
          fprintf(stderr, "m3s-bench: --prefill-ctx values must be <= 512M\n");
          return 0;
        }
      break;
    case O_CHUNK:
      if (!parse_list_int(optarg, o->chunks, &o->nchunk, "--chunk", 1, 1 << 20)) return 0;
      break;
    case O_KV: if (!parse_dtypes(optarg, o->kvs, &o->nkv, "--kv")) return 0; break;
    case O_IDX: if (!parse_dtypes(optarg, o->idxs, &o->nidx, "--idx")) return 0; break;
    case O_LIST: o->list = 1; break;
    case O_TM: o->token_major = 1; break;
    case O_LSE: o->lse = 1; break;
    case O_SEL:
      if (!strcmp(optarg, "token")) o->sel_token = 1;
      else if (!strcmp(optarg, "block")) o->sel_token = 0;
      else { fprintf(stderr, "m3s-bench: --sel takes block or token\n"); return 0; }
      break;
    case O_REPS:
    case O_WARM:
    case O_MAXSETS:
    case O_SETS:
    case O_DEV:
    case O_GEMMN:
    case O_SKEW:
    case O_WAVES:
    case O_PREQS:
    case O_CROWS:
      v = parse_size(optarg);
      if (v < (c == O_WARM || c == O_DEV ? 0 : 1) || v > 100000) {
        fprintf(stderr, "m3s-bench: bad number '%s'\n", optarg);
        return 0;
      }
      if (c == O_REPS) o->reps = (int)v;
      if (c == O_WARM) o->warmup = (int)v;
      if (c == O_MAXSETS) o->max_sets = (int)v;
      if (c == O_SETS) o->sets_force = (int)v;
      if (c == O_DEV) o->device = (int)v;
      if (c == O_GEMMN) o->gemm_n = (int)v;
      if (c == O_SKEW) o->skew = (int)v;
      if (c == O_WAVES) o->score_waves = (int)v;
      if (c == O_CROWS) o->chunk_rows = (int)v;
      if (c == O_PREQS) o->prefill_reqs = (int)v;
      break;
    case O_NOGRAPH: o->no_graph = 1; break;
    case O_BUDGET:
    case O_CBUDGET:
    case O_MEM:
    case O_HBM:
    case O_GEMM: {
      char *end = NULL;
      double d = strtod(optarg, &end);
      if (end == optarg || *end || !(d > 0)) {
        fprintf(stderr, "m3s-bench: bad number '%s'\n", optarg);
        return 0;
      }
      if (c == O_BUDGET) o->budget_s = d;
      if (c == O_CBUDGET) o->case_budget_s = d;
      if (c == O_MEM) o->mem_gb = d;
      if (c == O_HBM) o->hbm_override = d;
      if (c == O_GEMM) o->gemm_override = d;
      break;
    }
    case O_NOCEIL: o->no_ceilings = 1; break;
    case O_BINV: o->batch_invariant = 1; break;
    case O_PDL:
      if (strcmp(optarg, "default") == 0 || strcmp(optarg, "on") == 0 ||
          strcmp(optarg, "off") == 0)
        o->pdl = optarg[0] == 'd' ? -1 : optarg[1] == 'n';
      else {
        fprintf(stderr, "m3s-bench: --pdl must be default, on or off\n");
        return 0;
      }
      break;
    case O_TOPKPATH:
      if (strcmp(optarg, "default") == 0)
        o->topk_path = 0;
      else if (strcmp(optarg, "exact") == 0)
        o->topk_path = 1;
      else if (strcmp(optarg, "mma") == 0)
        o->topk_path = 2;
      else if (strcmp(optarg, "certified") == 0)
        o->topk_path = 3;
      else if (strcmp(optarg, "rounds") == 0)
        o->topk_path = 4;
      else if (strcmp(optarg, "no-rescore") == 0)
        o->topk_path = 5;
      else {
        fprintf(stderr, "m3s-bench: --topk-path must be default, exact, mma, certified, rounds "
                        "or no-rescore\n");
        return 0;
      }
      break;
    case O_ATTNPATH:
      if (strcmp(optarg, "default") == 0 || strcmp(optarg, "generic") == 0 ||
          strcmp(optarg, "union") == 0 || strcmp(optarg, "union-wgmma") == 0 ||
          strcmp(optarg, "merge-kernel") == 0 || strcmp(optarg, "k2q") == 0) {
        o->attn_generic = strcmp(optarg, "generic") == 0;
        o->attn_union = strncmp(optarg, "union", 5) == 0;
        o->attn_wgmma = strcmp(optarg, "union-wgmma") == 0;
        o->attn_merge_kernel = strcmp(optarg, "merge-kernel") == 0;
        o->attn_k2q = strcmp(optarg, "k2q") == 0;
      } else {
        fprintf(stderr, "m3s-bench: --attn-path must be default, generic, union, union-wgmma, "
                        "merge-kernel or k2q\n");
        return 0;
      }
      break;
    case O_CSV: o->csv = optarg; break;
    default:
      fprintf(stderr, "m3s-bench: see --help\n");
      return 0;
    }
  }
  if (optind < argc) {
    fprintf(stderr, "m3s-bench: unexpected argument '%s' (see --help)\n", argv[optind]);
    return 0;
  }
  if (o->full)
    o->ops = (1u << OP_COUNT) - 1;
  if (!o->all && !o->ops)
    o->all = 1; /* no selection: the default set, as --help says (also for --list alone) */
  return 1;
}

int main(int argc, char **argv) {
  bench B;
  memset(&B, 0, sizeof B);
  B.t0 = now_s();
  if (!parse_args(argc, argv, &B.o))
    return 2;
  options *o = &B.o;
  if (o->all)
    build_all(o);
  if (o->ops)
    build_matrix(o);
  B.l2 = 50.0 * 1024 * 1024; /* replaced by the card's value below */

  if (o->list) {
    printf("%d cases (bytes and flops per call; step cases use the attention cases' random\n"
           "top-k as a proxy; sets and cache sizes assume a 50 MiB L2):\n",
           g_ncases);
    for (int i = 0; i < g_ncases; i++) {
      geom g;
      char shape[96];
      case_shape(&g_res[i].c, o, shape, sizeof shape);
      if (!geom_init(&g, &g_res[i].c)) {
        printf("[%3d] %-12s %-28s bad geometry\n", i + 1, k_op_name[g_res[i].c.op], shape);
        geom_free(&g);
        continue;
      }
      int s = sets_wanted(&g, o, B.l2);
      double u = 0, a = 0, bytes = 0, flops = 0;
      int32_t *tk = malloc(sizeof(int32_t) * ((size_t)g.T * g.Hkv * g.K + 1));
      if (tk && op_uses_kv(g.c.op)) { /* the attention cases' host top-k (step: a proxy) */
        gen_topk(&g, 12345, o->sel_token, tk);
        attn_account(&g, tk, &u, &a);
      }
      free(tk);
      count_work(&g, u, a, o->lse, &bytes, &flops);
      printf("[%3d] %-12s %-28s T %5d %9.1f MB %9.2f GFLOP  %2d sets  cache %6.2f GiB\n", i + 1,
             k_op_name[g_res[i].c.op], shape, g.T, bytes / 1e6, flops / 1e9, s,
             (double)cache_bytes(&g, s) / GIB);
      geom_free(&g);
    }
    return 0;
  }

  /* the device */
  int ndev = 0;
  cudaError_t e = cudaGetDeviceCount(&ndev);
  if (e != cudaSuccess || ndev == 0) {
    fprintf(stderr, "m3s-bench: no CUDA device available (%s); nothing was timed\n",
            e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    printf("m3s-bench: no CUDA device, skipped\n");
    return EXIT_NO_GPU;
  }
  if (o->device >= ndev) {
    fprintf(stderr, "m3s-bench: --device %d but %d CUDA device(s)\n", o->device, ndev);
    return 2;
  }
  B.device = o->device;
  struct cudaDeviceProp prop;
  if (!cuda_ok(cudaSetDevice(B.device), "cudaSetDevice") ||
      !cuda_ok(cudaGetDeviceProperties(&prop, B.device), "cudaGetDeviceProperties") ||
      !cuda_ok(cudaStreamCreateWithFlags(&B.stream, cudaStreamNonBlocking), "cudaStreamCreate"))
    return 1;
  B.l2 = prop.l2CacheSize > 0 ? (double)prop.l2CacheSize : B.l2;
  int drv = 0, rt = 0;
  cudaDriverGetVersion(&drv);
  cudaRuntimeGetVersion(&rt);
  snprintf(B.card, sizeof B.card, "%.200s (sm_%d%d, %d SMs)", prop.name, prop.major, prop.minor,
           prop.multiProcessorCount);
  printf("m3s-bench: m3sparse %s, device %d: %s, %.1f GiB, L2 %.0f MiB, driver %d.%d, runtime "
         "%d.%d\n",
         m3s_version(), B.device, B.card, (double)prop.totalGlobalMem / GIB, B.l2 / 1048576.0,
         drv / 1000, drv % 1000 / 10, rt / 1000, rt % 1000 / 10);
  m3s_status st = m3s_context_create(B.device, &B.ctx);
  if (st != M3S_OK) {
    fprintf(stderr, "m3s-bench: m3s_context_create(%d): %s\n", B.device, m3s_last_error());
    return st == M3S_ERR_UNSUPPORTED ? EXIT_NO_GPU : 1;
  }
  if (o->batch_invariant) {
    if (m3s_context_set_option(B.ctx, M3S_OPT_BATCH_INVARIANT, 1) != M3S_OK) {
      fprintf(stderr, "m3s-bench: m3s_context_set_option: %s\n", m3s_last_error());
      m3s_context_destroy(B.ctx);
      return 1;
    }
    printf("m3s-bench: M3S_OPT_BATCH_INVARIANT on (attention never splits a row)\n");
  }
  if (o->topk_path || o->score_waves || o->chunk_rows) {
    /* the test hook of src/cuda/sm90/topk_tc.h (per context) */
    m3s_topk_tc_hooks h;
    memset(&h, 0, sizeof h);
    h.exact_only = o->topk_path == 1;
    h.mma_sync = o->topk_path == 2;
    h.decode_any = o->topk_path == 3;
    h.rounds_select = o->topk_path == 4;
    h.no_rescore = o->topk_path == 5;
    h.score_waves = o->score_waves;
    h.chunk_rows = o->chunk_rows;
    m3s_topk_tc_set_hooks(B.ctx, &h);
    printf("m3s-bench: top-k path %s",
           o->topk_path == 0   ? "default"
           : o->topk_path == 1 ? "exact (CUDA cores)"
           : o->topk_path == 2 ? "certified, mma.sync score kernel"
           : o->topk_path == 3 ? "certified, every decode batch on the streaming kernel"
           : o->topk_path == 4 ? "certified, selection by warp-maximum rounds"
                               : "certified WITHOUT re-scoring (not exact: timing only)");
    if (o->score_waves)
      printf(", score kernel at about %d items per SM", o->score_waves);
    if (o->chunk_rows)
      printf(", chunks of at most %d rows", o->chunk_rows);
    printf("\n");
  }
  if (o->attn_generic) {
    /* the path switch of src/cuda/sm90/attention_tma.h (per context) */
    m3s_attention_set_generic(B.ctx, 1);
    printf("m3s-bench: attention on the generic kernel\n");
  }
  if (o->attn_merge_kernel) {
    m3s_attention_set_cluster_merge(B.ctx, 0);
    printf("m3s-bench: persistent-kernel splits through the merge kernel (no cluster merge)\n");
  }
  if (o->attn_k2q)
    printf("m3s-bench: prefill attention by the key-centric path (CSR, k2q attention, combine)\n");
  if (o->attn_union) {
    m3s_attention_set_union_any(B.ctx, 1);
    printf("m3s-bench: attention on the union kernel wherever it can run\n");
  }
  if (o->attn_union) {
    /* union: the mma.sync consumers; union-wgmma: the warpgroups (the
     * default path follows m3s_attention_union_wg's rule) */
    m3s_attention_set_union_wgmma(B.ctx, o->attn_wgmma);
    printf("m3s-bench: the union kernel's %s consumers\n",
           o->attn_wgmma ? "warpgroup (wgmma)" : "mma.sync");
  }
  /* the launch switch of src/cuda/launch.h (per context) */
  m3s_cuda_set_pdl(B.ctx, o->pdl);
  if (o->pdl > 0)
    printf("m3s-bench: programmatic dependent launch %s\n",
           m3s_cuda_pdl(B.ctx, 1) ? "on" : "requested, not available (needs sm_90)");
  else if (o->pdl == 0)
    printf("m3s-bench: programmatic dependent launch off\n");
  if (cudaMalloc(&B.tc_stats, sizeof(m3s_topk_tc_stats)) != cudaSuccess) {
    cudaGetLastError();
    B.tc_stats = NULL; /* no re-scored counts, the timings still run */
  }
  int failed = 0;

  /* ceilings */
  if (o->hbm_override > 0)
    B.hbm_gbps = o->hbm_override;
  else if (!o->no_ceilings && (B.hbm_gbps = measure_copy(&B)) <= 0)
    failed = 1;
  if (o->gemm_override > 0)
    B.gemm_tflops = o->gemm_override;
  else if (!o->no_ceilings && (B.gemm_tflops = measure_gemm(&B)) <= 0)
    failed = 1;
  if (!o->no_ceilings && (B.gather_gbps = measure_gather(&B)) <= 0)
    failed = 1;
  if (!o->no_ceilings && !measure_launch_floor(&B))
    failed = 1;

  /* the cache pool: large enough for the biggest case at its wanted set count
   * (as far as memory goes), shared by all cases */
  size_t need = 0, need_min = (size_t)-1, extra = 0;
  for (int i = 0; i < g_ncases; i++) {
    geom g;
    if (!geom_init(&g, &g_res[i].c)) {
      geom_free(&g);
      continue;
    }
    int s = sets_wanted(&g, o, B.l2);
    size_t cb = cache_bytes(&g, s), c1 = cache_bytes(&g, 1), ws = 0;
    if (m3s_workspace_size(B.ctx, &g.cfg, g.T, g.max_seq, &ws) != M3S_OK)
      ws = 0;
    size_t x = (size_t)s * ((size_t)g.T * (g.Hq + g.Hkv) * 256 + (size_t)g.T * g.Hkv * g.K * 4 +
                            (size_t)g.R * g.maxp * 4) +
               (size_t)g.T * g.Hq * 260 + ws;
    need = cb > need ? cb : need;
    need_min = c1 < need_min ? c1 : need_min;
    extra = x > extra ? x : extra;
    geom_free(&g);
  }
  size_t freeb = 0, total = 0;
  if (!cuda_ok(cudaMemGetInfo(&freeb, &total), "cudaMemGetInfo"))
    return 1;
  size_t reserve = extra + ((size_t)3 << 29); /* + 1.5 GiB for the runtime, graphs, ... */
  size_t avail = freeb > reserve ? freeb - reserve : 0;
  if (o->mem_gb > 0 && (double)avail > o->mem_gb * GIB)
    avail = (size_t)(o->mem_gb * GIB);
  size_t want = need < avail ? need : avail;
  want = align_up(want, (size_t)2 << 20);
  while (want >= need_min && want > 0) {
    if (cudaMalloc(&B.pool, want) == cudaSuccess)
      break;
    cudaGetLastError();
    B.pool = NULL;
    want = align_up((size_t)((double)want * 0.85), (size_t)2 << 20);
  }
  B.pool_bytes = B.pool ? want : 0;
  printf("cache pool: %.2f GiB (largest case wants %.2f GiB; %.1f GiB free)\n",
         (double)B.pool_bytes / GIB, (double)need / GIB, (double)freeb / GIB);
  printf("%d cases, %d timed replays each (median of CUDA-event times), budget %.0f s\n", g_ncases,
         o->reps, o->budget_s);
  fflush(stdout);

  for (int i = 0; i < g_ncases; i++) {
    case_result *r = &g_res[i];
    if (B.dead) {
      r->status = RES_SKIPPED;
      snprintf(r->note, sizeof r->note, "not run: an earlier CUDA error left the context unusable");
    } else if (now_s() - B.t0 > o->budget_s) {
      r->status = RES_SKIPPED;
      snprintf(r->note, sizeof r->note, "not run: time budget (%.0f s) spent", o->budget_s);
    } else {
      run_case(&B, r);
    }
    failed |= r->status == RES_ERROR;
    print_case_line(&B, i, r);
  }

  if (o->csv && !write_csv(&B, o->csv))
    failed = 1;
  print_table(&B, now_s() - B.t0);
  if (B.pool)
    cudaFree(B.pool);
  if (B.tc_stats)
    cudaFree(B.tc_stats);
  cudaStreamDestroy(B.stream);
  m3s_context_destroy(B.ctx);
  return failed ? 1 : 0;
}
