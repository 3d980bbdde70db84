/*
 * main.c -- m3s-demo: one MiniMax-M3 sparse-attention layer served through
 * a realistic engine trace, on synthetic activations (no model weights).
 *
 * THE LAYER. The heads of one tensor-parallel rank (--tp 8, the default: 8 query
 * heads / 1 KV head; --tp 1: the full 64/4), a lightning indexer that picks the
 * top-16 128-token blocks per (token, KV head), the token's own block always
 * among them (local 1), then block-sparse GQA attention over those blocks only.
 * bf16 activations, bf16 paged K/V cache and bf16 index cache.
 *
 * THE TRACE (what an engine such as vLLM sends one sparse layer):
 *  - --requests prompts of random length in [--prompt-min, --prompt-max]. All
 *    but the last arrive at once and are prefilled in chunks: a step has a token
 *    budget of --chunk tokens, taken first by the running decode requests, then
 *    by the prefill requests in arrival order. So later chunks are chunked
 *    prefill (ctx > 0), a step can hold chunks of two prompts, and a request
 *    whose prompt is done decodes while the next one still prefills (mixed
 *    decode+prefill steps, decode requests first).
 *  - The last request arrives once the others have decoded two steps: more
 *    mixed steps while it is prefilled.
 *  - Then --decode-steps pure decode steps: the first half with q_len 1, the
 *    rest speculative with q_len 1 + --spec-tokens (a random number of drafts is
 *    accepted, the rejected positions are rewritten by the next step). A pure
 *    decode batch is padded up to a CUDA-graph size (4, 8, 16, 24, ... requests)
 *    with filler requests (seq_len 0, slot -1), which must come out as output 0,
 *    lse -inf and top-k rows of -1.
 *  Each step: the host step description goes through m3s_plan_step (the
 *  decode/prefill split); the new tokens' K/V and index keys are written with
 *  m3s_cache_insert / m3s_index_cache_insert through slot mappings (pages are
 *  handed out from shuffled free lists, one per cache, so the two block tables
 *  differ and are far from the identity); then ONE m3s_step_forward runs the
 *  indexer and the attention of the decode part (uniform q_len) and of the
 *  prefill part (query_start_loc, a slice of the step's) on whole-step tensors.
 *
 * THE NEEDLES. Background activations are N(0,1) per dimension (norm ~11).
 * Each request hides --needles needles early in its prompt (in its first 40%):
 * a 16-token passage inside a block, with a random unit index direction u_n and,
 * per KV head, a unit key direction k_n and a value vector v_n (N(0,1)). The
 * passage's tokens get +16 u_n on their index keys, +8 k_n on their keys and
 * v_n (+ a little noise) as values. Later tokens that "ask" for needle n -- two
 * in three decode tokens (with 2 needles), and about 1% of the prefill tokens
 * at least a block past the needles -- get +16 u_n on their index queries and
 * +32 k_n on their queries. The indexer must find the needle block among the
 * many blocks it skips (needle recall: the asking (token, KV head) pairs whose
 * top-k row holds the needle's block; reported separately for rows with more
 * than 16 visible blocks, where it had to choose), and the attention output must
 * then carry v_n: cosine ~1 for asking tokens, small for the others (not zero:
 * a random query still attends the needle block now and then).
 *
 * THE CHECKS (exit status 1 if any fails, 2 on bad flags or a library error):
 *  - every top-k row: min(16, nb) block ids, ascending, in [0, nb), the local
 *    block nb-1 included, -1 after them; padded rows all -1 with output 0 and
 *    lse -inf;
 *  - --check-rows rows of every step, every head, against the fp64 reference
 *    of the tests (tests/ref.c): the block scores and the top-k choice recomputed from the
 *    index cache, and causal softmax attention over the keys of the selected
 *    blocks read from the K/V cache through the block table (relative L2 error
 *    of the output < 1e-2, lse within 1e-3).
 */
/* This file: the command line, the header and summary, main. The other
 * files of examples/demo/: see demo.h. */
#include "demo.h"

static void usage(FILE *f) {
  fprintf(f,
          "usage: m3s-demo [options]\n"
          "\n"
          "Runs one MiniMax-M3 sparse-attention layer (lightning indexer + block-sparse GQA\n"
          "attention, top-16 of 128-token blocks, local block forced) through a serving\n"
          "trace on synthetic activations: chunked prefill, decode, speculative decode,\n"
          "mixed decode+prefill steps and CUDA-graph padding, with planted \"needle\" blocks\n"
          "the indexer must find. Every step is checked against an fp64 reference; exit\n"
          "status 0 = all checks passed, 1 = a check failed, 2 = bad flag or library error.\n"
          "\n"
          "  --tp N            tensor-parallel size; the layer is one rank's heads:\n"
          "                    1 = 64 query / 4 KV heads (the full layer), 2 = 32/2,\n"
          "                    4 = 16/1, 8 = 8/1 (default 8)\n"
          "  --requests N      requests in the trace, 1..%d (default 3); the last one\n"
          "                    arrives late, while the others decode\n"
          "  --prompt-min N    shortest prompt in tokens (default 4096)\n"
          "  --prompt-max N    longest prompt in tokens (default 16384); prompt lengths\n"
          "                    are drawn uniformly from [min, max]\n"
          "  --chunk N         token budget of one step = chunked-prefill size; decode\n"
          "                    tokens count in it; >= 128 (default 2048)\n"
          "  --decode-steps N  pure decode steps once every prompt is in: the first half\n"
          "                    with q_len 1, the rest speculative (default 8)\n"
          "  --spec-tokens N   draft tokens of a speculative step (q_len = 1 + N), 0..%d\n"
          "                    (default 3)\n"
          "  --needles N       needle blocks planted per request, 0..%d (default 2)\n"
          "  --check-rows N    query rows per step compared with the fp64 reference,\n"
          "                    every head (default 4)\n"
          "  --layout L        K/V cache layout: head = [pages, Hkv, 128, 256] (default)\n"
          "                    or token = [pages, 128, Hkv, 256], passed as a permuted view\n"
          "  --seed N          random seed of prompts, activations and page order\n"
          "                    (default 1)\n"
          "  --device D        cpu (default) or cuda (CUDA device 0; needs a build with\n"
          "                    the CUDA backend)\n"
          "  -h, --help        print this text and exit\n",
          MAX_REQUESTS, MAX_SPEC, MAX_NEEDLES);
}

static int parse_int(const char *flag, const char *s, long lo, long hi, int *out) {
  char *end = NULL;
  long x = strtol(s, &end, 10);
  if (!*s || *end || x < lo || x > hi) {
    fprintf(stderr, "m3s-demo: %s wants an integer in [%ld, %ld], got '%s'\n", flag, lo, hi, s);
    return -1;
  }
  *out = (int)x;
  return 0;
}

/* 0: run, 1: --help printed, -1: bad flags. */
static int parse_options(int argc, char **argv, options *o) {
  enum {
    O_TP = 256,
    O_REQ,
    O_PMIN,
    O_PMAX,
    O_CHUNK,
    O_DEC,
    O_SPEC,
    O_NEEDLES,
    O_ROWS,
    O_LAYOUT,
    O_SEED,
    O_DEVICE
  };
  static const struct option longopts[] = {{"tp", required_argument, NULL, O_TP},
                                           {"requests", required_argument, NULL, O_REQ},
                                           {"prompt-min", required_argument, NULL, O_PMIN},
                                           {"prompt-max", required_argument, NULL, O_PMAX},
                                           {"chunk", required_argument, NULL, O_CHUNK},
                                           {"decode-steps", required_argument, NULL, O_DEC},
                                           {"spec-tokens", required_argument, NULL, O_SPEC},
                                           {"needles", required_argument, NULL, O_NEEDLES},
                                           {"check-rows", required_argument, NULL, O_ROWS},
                                           {"layout", required_argument, NULL, O_LAYOUT},
                                           {"seed", required_argument, NULL, O_SEED},
                                           {"device", required_argument, NULL, O_DEVICE},
                                           {"help", no_argument, NULL, 'h'},
                                           {NULL, 0, NULL, 0}};
  *o = (options){.tp = 8,
                 .requests = 3,
                 .prompt_min = 4096,
                 .prompt_max = 16384,
                 .chunk = 2048,
                 .decode_steps = 8,
                 .spec_tokens = 3,
                 .needles = 2,
                 .check_rows = 4,
                 .seed = 1};
  int c, rc = 0;
  opterr = 1;
  while (rc == 0 && (c = getopt_long(argc, argv, "h", longopts, NULL)) != -1) {
    switch (c) {
    case O_TP:
      rc = parse_int("--tp", optarg, 1, 8, &o->tp);
      if (rc == 0 && o->tp != 1 && o->tp != 2 && o->tp != 4 && o->tp != 8) {
        fprintf(stderr, "m3s-demo: --tp must be 1, 2, 4 or 8, got %d\n", o->tp);
        rc = -1;
      }
      break;
    case O_REQ: rc = parse_int("--requests", optarg, 1, MAX_REQUESTS, &o->requests); break;
    case O_PMIN: rc = parse_int("--prompt-min", optarg, 1, 1 << 20, &o->prompt_min); break;
    case O_PMAX: rc = parse_int("--prompt-max", optarg, 1, 1 << 20, &o->prompt_max); break;
    case O_CHUNK: rc = parse_int("--chunk", optarg, 128, 1 << 16, &o->chunk); break;
    case O_DEC: rc = parse_int("--decode-steps", optarg, 0, 10000, &o->decode_steps); break;
    case O_SPEC: rc = parse_int("--spec-tokens", optarg, 0, MAX_SPEC, &o->spec_tokens); break;
    case O_NEEDLES: rc = parse_int("--needles", optarg, 0, MAX_NEEDLES, &o->needles); break;
    case O_ROWS: rc = parse_int("--check-rows", optarg, 0, 1 << 20, &o->check_rows); break;
    case O_SEED: {
      char *end = NULL;
      o->seed = strtoull(optarg, &end, 10);
      if (!*optarg || *end) {
        fprintf(stderr, "m3s-demo: --seed wants a non-negative integer, got '%s'\n", optarg);
        rc = -1;
      }
      break;
    }
    case O_LAYOUT:
      if (!strcmp(optarg, "head") || !strcmp(optarg, "token")) {
        o->token_major = !strcmp(optarg, "token");
      } else {
        fprintf(stderr, "m3s-demo: --layout must be 'head' or 'token', got '%s'\n", optarg);
        rc = -1;
      }
      break;
    case O_DEVICE:
      if (!strcmp(optarg, "cpu") || !strcmp(optarg, "cuda")) {
        o->cuda = !strcmp(optarg, "cuda");
      } else {
        fprintf(stderr, "m3s-demo: --device must be 'cpu' or 'cuda', got '%s'\n", optarg);
        rc = -1;
      }
      break;
    case 'h': usage(stdout); return 1;
    default: rc = -1; break;
    }
  }
  if (rc == 0 && optind < argc) {
    fprintf(stderr, "m3s-demo: unexpected argument '%s'\n", argv[optind]);
    rc = -1;
  }
  if (rc == 0 && o->prompt_max < o->prompt_min) {
    fprintf(stderr, "m3s-demo: --prompt-max (%d) is smaller than --prompt-min (%d)\n",
            o->prompt_max, o->prompt_min);
    rc = -1;
  }
  if (rc)
    fprintf(stderr, "(m3s-demo --help lists the flags)\n");
  return rc;
}

static void print_header(const demo *dm) {
  const options *o = &dm->opt;
  double kv_mib = (double)dm->kv.bytes / (1 << 20), ic_mib = (double)dm->ic.bytes / (1 << 20);
  printf("m3s-demo (m3sparse %s): MiniMax-M3 sparse layer, %s: %d q heads / %d KV head%s "
         "(G = %d), top-%d of %d-token blocks, local %d\n",
         m3s_version(), o->tp == 1 ? "all heads (TP1)" : "one TP rank", dm->hq, dm->hkv,
         dm->hkv > 1 ? "s" : "", dm->grp, dm->topk, M3S_BLOCK_SIZE, dm->cfg.local_blocks);
  printf("  caches: bf16 K/V %lld pages %s (%.1f MiB) + bf16 index (%.1f MiB), pages handed "
         "out in shuffled order\n",
         (long long)dm->num_pages, o->token_major ? "token-major" : "head-major", kv_mib, ic_mib);
  char spec[48] = "";
  if (o->spec_tokens && o->decode_steps > 1)
    snprintf(spec, sizeof spec, ", then speculative q_len %d", 1 + o->spec_tokens);
  printf("  trace: %d request%s, chunk %d tokens, %d decode steps at the end (q_len 1%s), "
         "seed %llu\n",
         dm->nreq, dm->nreq > 1 ? "s" : "", o->chunk, o->decode_steps, spec, o->seed);
  for (int r = 0; r < dm->nreq; r++) {
    const request *rq = &dm->req[r];
    char nb[96] = "";
    size_t len = 0;
    for (int i = 0; i < rq->nneedles; i++)
      len += (size_t)snprintf(nb + len, sizeof nb - len, "%s%d", i ? ", " : "", rq->nd[i].block);
    printf("  r%d: prompt %d tokens (%d blocks)%s, needle blocks: %s\n", r, rq->prompt_len,
           (rq->prompt_len + M3S_BLOCK_SIZE - 1) / M3S_BLOCK_SIZE,
           r == dm->late ? ", arrives late" : "", rq->nneedles ? nb : "none");
  }
}

/* Kernel names from m3s_query_support (SPEC section 8). */
static int print_support(const demo *dm) {
  static const struct {
    m3s_op op;
    const char *name;
  } ops[] = {{M3S_OP_INDEX_TOPK, "topk"},
             {M3S_OP_ATTENTION_DECODE, "decode"},
             {M3S_OP_ATTENTION_PREFILL, "prefill"}};
  char line[512];
  size_t len = 0;
  for (size_t i = 0; i < sizeof ops / sizeof ops[0]; i++) {
    m3s_support_query qy = {
        ops[i].op, M3S_BF16, M3S_BF16,
        M3S_BF16,  0,        dm->opt.token_major ? M3S_LAYOUT_TOKEN_MAJOR : M3S_LAYOUT_HEAD_MAJOR};
    m3s_support_info info;
    TRY("m3s_query_support", m3s_query_support(dm->ctx, &dm->cfg, &qy, &info));
    if (!info.supported) { /* the first library call will fail and say why */
      printf("  device %s: UNSUPPORTED (%s: %s)\n", dm->opt.cuda ? "cuda:0" : "cpu", ops[i].name,
             info.reason);
      return 0;
    }
    len += (size_t)snprintf(line + len, sizeof line - len, "%s%s %s", i ? ", " : "", ops[i].name,
                            info.kernel);
  }
  printf("  device %s, kernels: %s\n", dm->opt.cuda ? "cuda:0" : "cpu", line);
  return 0;
}

static void print_summary(const demo *dm, double wall) {
  const stats *t = &dm->total;
  long long tokens = t->pf_tokens + t->dec_tokens;
  printf("\nsummary: %lld steps, %lld tokens (%lld prefill, %lld decode), library time %.2f s "
         "(%.0f tokens/s), wall %.1f s\n",
         t->steps, tokens, t->pf_tokens, t->dec_tokens, t->ms * 1e-3, tokens / (t->ms * 1e-3),
         wall);
  if (t->dec_steps)
    printf("  pure decode steps: %lld, %.1f ms per step on average\n", t->dec_steps,
           t->dec_ms / (double)t->dec_steps);
  printf("  keys attended / keys visible: prefill rows %.1f%%, decode rows %.1f%% "
         "(at most %d x %d = %d keys per row and KV head)\n",
         t->n_att_pf ? 100.0 * t->att_pf / (double)t->n_att_pf : 0.0,
         t->n_att_dec ? 100.0 * t->att_dec / (double)t->n_att_dec : 0.0, dm->topk, M3S_BLOCK_SIZE,
         dm->topk * M3S_BLOCK_SIZE);
  if (t->ask_pairs) {
    printf("  needle recall: %lld/%lld asking (token, KV head) pairs = %.1f%%", t->ask_hits,
           t->ask_pairs, 100.0 * (double)t->ask_hits / (double)t->ask_pairs);
    if (t->ask_pairs_sparse)
      printf(" (%lld/%lld = %.1f%% with > %d blocks visible)", t->ask_hits_sparse,
             t->ask_pairs_sparse, 100.0 * (double)t->ask_hits_sparse / (double)t->ask_pairs_sparse,
             dm->topk);
    printf("\n  cos(attention output, needle value): asking tokens %.3f, other tokens %.3f\n",
           t->n_cos_ask ? t->cos_ask / (double)t->n_cos_ask : 0.0,
           t->n_cos_bg ? t->cos_bg / (double)t->n_cos_bg : 0.0);
  } else
    printf("  needle recall: no token asked for a needle (prompts too short or --needles 0)\n");
  printf("  reference: %lld rows x %d heads, max relative L2 error %.2e (limit %.0e), max |lse "
         "error| %.1e; padded rows checked: %lld\n",
         t->ref_rows, dm->hq, t->max_err, REF_TOL, t->max_lse_err, t->pad_rows);
  printf("%s (%lld failed check%s)\n", t->failures ? "FAIL" : "PASS", t->failures,
         t->failures == 1 ? "" : "s");
}

int main(int argc, char **argv) {
  demo dm;
  memset(&dm, 0, sizeof dm);
  int rc = parse_options(argc, argv, &dm.opt);
  if (rc)
    return rc > 0 ? 0 : EXIT_ERROR;
  int status = EXIT_ERROR;
  double t0 = now_s();
  if (demo_init(&dm) == 0) {
    print_header(&dm);
    if (print_support(&dm) == 0) {
      printf("\n%4s  %-7s %-11s %-27s %6s %9s %9s %8s %8s %9s\n", "step", "kind", "decode",
             "prefill (req ctx+new)", "tokens", "ms", "tok/s", "attended", "ref err", "needles");
      printf("(needles: needle recall, the share of (token, KV head) pairs asking for a "
             "planted needle whose top-k kept the needle's block)\n");
      fflush(stdout);
      sched_step s;
      int step_no = 0, ok = 1;
      while (ok && schedule_step(&dm, &s))
        ok = run_step(&dm, ++step_no, &s) == 0;
      if (ok) {
        print_summary(&dm, now_s() - t0);
        status = dm.total.failures ? EXIT_CHECK : 0;
      }
    }
  }
  if (status == EXIT_ERROR) {
    fflush(stdout);
    fprintf(stderr, "m3s-demo: stopped by the error above\n");
  }
  demo_free(&dm);
  return status;
}
