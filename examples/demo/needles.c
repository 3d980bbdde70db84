/* m3s-demo: the needles planted in each prompt and the activations of a step
 * (background noise plus the needle components of the tokens that ask). */
#include "demo.h"

/* Needle blocks: distinct random blocks in the first 40% of the prompt. */
int plant_needles(demo *dm, request *rq) {
  int full = rq->prompt_len / M3S_BLOCK_SIZE, cand = (full * 2) / 5;
  int want = dm->opt.needles < cand ? dm->opt.needles : cand;
  if (full < 4)
    want = 0;
  rq->nneedles = 0;
  int last = -1;
  while (rq->nneedles < want) {
    int b = rng_int(&dm->sched, cand), dup = 0;
    for (int i = 0; i < rq->nneedles; i++)
      dup |= rq->nd[i].block == b;
    if (dup)
      continue;
    needle *nd = &rq->nd[rq->nneedles++];
    nd->block = b;
    nd->off = rng_int(&dm->sched, M3S_BLOCK_SIZE - NEEDLE_TOKENS + 1);
    last = b > last ? b : last;
    rng_unit(&dm->act, nd->u, M3S_HEAD_DIM);
    nd->kdir = (float *)xcalloc((size_t)dm->hkv * M3S_HEAD_DIM, sizeof(float));
    nd->val = (float *)xcalloc((size_t)dm->hkv * M3S_HEAD_DIM, sizeof(float));
    if (!nd->kdir || !nd->val)
      return -1;
    for (int g = 0; g < dm->hkv; g++) {
      rng_unit(&dm->act, nd->kdir + g * M3S_HEAD_DIM, M3S_HEAD_DIM);
      for (int d = 0; d < M3S_HEAD_DIM; d++)
        nd->val[g * M3S_HEAD_DIM + d] = rng_gauss(&dm->act);
    }
  }
  /* Askers sit at least one whole block past the last needle. */
  rq->ask_from = (last + 2) * M3S_BLOCK_SIZE;
  return 0;
}

/* ------------------------------------------------------------------------
 * Activations of a step
 * ---------------------------------------------------------------------- */
/* Which needle token (pos) of request r asks for, or NO_ASK. */
static int asks_for(const demo *dm, int r, int pos, int decode) {
  const request *rq = &dm->req[r];
  if (rq->nneedles == 0 || pos < rq->ask_from)
    return NO_ASK;
  if (decode) { /* two decode tokens in three ask (with 2 needles) */
    int k = pos % (rq->nneedles + 1);
    return k < rq->nneedles ? k : NO_ASK;
  }
  uint64_t h = hash3(dm->opt.seed, (uint64_t)r, (uint64_t)pos);
  if ((int)(h & 255) >= ASK_PREFILL_PER_256)
    return NO_ASK;
  return (int)((h >> 8) % (uint64_t)rq->nneedles);
}

static int needle_at(const request *rq, int pos) {
  for (int i = 0; i < rq->nneedles; i++)
    if (pos >= rq->nd[i].block * M3S_BLOCK_SIZE + rq->nd[i].off &&
        pos < rq->nd[i].block * M3S_BLOCK_SIZE + rq->nd[i].off + NEEDLE_TOKENS &&
        pos < rq->prompt_len)
      return i;
  return -1;
}

static void fill_bf16(rng *r, uint16_t *dst, int n, const float *dir, float amount) {
  for (int d = 0; d < n; d++) {
    float x = rng_gauss(r);
    if (dir)
      x += amount * dir[d];
    dst[d] = to_bf16(x);
  }
}

/* One row: q, iq, k, v, ik of token pos of request r (r < 0: filler garbage). */
static void gen_row(demo *dm, int row, int r, int pos, int decode) {
  uint16_t *q = (uint16_t *)dm->q.h + (size_t)row * dm->hq * M3S_HEAD_DIM;
  uint16_t *iq = (uint16_t *)dm->iq.h + (size_t)row * dm->hkv * M3S_HEAD_DIM;
  uint16_t *k = (uint16_t *)dm->k.h + (size_t)row * dm->hkv * M3S_HEAD_DIM;
  uint16_t *v = (uint16_t *)dm->v.h + (size_t)row * dm->hkv * M3S_HEAD_DIM;
  uint16_t *ik = (uint16_t *)dm->ik.h + (size_t)row * M3S_HEAD_DIM;
  int ask = r >= 0 ? asks_for(dm, r, pos, decode) : NO_ASK;
  int nd = r >= 0 ? needle_at(&dm->req[r], pos) : -1;
  const needle *an = ask != NO_ASK ? &dm->req[r].nd[ask] : NULL;
  const needle *nn = nd >= 0 ? &dm->req[r].nd[nd] : NULL;
  dm->row_req[row] = r;
  dm->row_pos[row] = pos;
  dm->row_ask[row] = ask;
  dm->row_dec[row] = decode;
  for (int h = 0; h < dm->hq; h++)
    fill_bf16(&dm->act, q + h * M3S_HEAD_DIM, M3S_HEAD_DIM,
              an ? an->kdir + (h / dm->grp) * M3S_HEAD_DIM : NULL, NEEDLE_QUERY);
  for (int g = 0; g < dm->hkv; g++) {
    fill_bf16(&dm->act, iq + g * M3S_HEAD_DIM, M3S_HEAD_DIM, an ? an->u : NULL, NEEDLE_INDEX);
    fill_bf16(&dm->act, k + g * M3S_HEAD_DIM, M3S_HEAD_DIM, nn ? nn->kdir + g * M3S_HEAD_DIM : NULL,
              NEEDLE_KEY);
    if (nn) {
      for (int d = 0; d < M3S_HEAD_DIM; d++)
        v[g * M3S_HEAD_DIM + d] =
            to_bf16(nn->val[g * M3S_HEAD_DIM + d] + NEEDLE_VNOISE * rng_gauss(&dm->act));
    } else {
      fill_bf16(&dm->act, v + g * M3S_HEAD_DIM, M3S_HEAD_DIM, NULL, 0.0f);
    }
  }
  fill_bf16(&dm->act, ik, M3S_HEAD_DIM, nn ? nn->u : NULL, NEEDLE_INDEX);
}

void gen_step(demo *dm, const sched_step *s) {
  int64_t *slots = (int64_t *)dm->slots.h, *islots = (int64_t *)dm->islots.h;
  for (int i = 0; i < s->nent; i++) {
    const entry *e = &s->e[i];
    for (int t = 0; t < e->rows; t++) {
      int row = e->row0 + t;
      if (e->req < 0) {
        gen_row(dm, row, -1, 0, 1);
        slots[row] = islots[row] = -1; /* padding: not written to the caches */
        continue;
      }
      const request *rq = &dm->req[e->req];
      int pos = e->start + t;
      gen_row(dm, row, e->req, pos, e->decode);
      slots[row] = (int64_t)rq->pages[pos / M3S_BLOCK_SIZE] * M3S_BLOCK_SIZE + pos % M3S_BLOCK_SIZE;
      islots[row] =
          (int64_t)rq->ipages[pos / M3S_BLOCK_SIZE] * M3S_BLOCK_SIZE + pos % M3S_BLOCK_SIZE;
    }
  }
}
