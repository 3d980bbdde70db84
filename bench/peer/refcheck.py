"""Correctness checks of the peer benchmark, run on every case before it is
timed: the two sides' selections compared as sets over every (head, row), and
ours against an fp64 reference (SPEC sections 3-4, read through the block
tables) on a sample of rows."""
import math

import torch

B = 128
ATTN_TOL = 1e-2          # rel L2 of the sampled rows' outputs against fp64
TIE_TOL = 1e-4           # relative fp64 score gap under which two blocks are a near-tie


def set_agreement(a, b):
    """Fraction of (head, row) pairs whose top-k rows hold the same ids
    (order ignored; head-major [Hkv, T, K] int32 on the GPU)."""
    sa, _ = torch.sort(a, dim=-1)
    sb, _ = torch.sort(b, dim=-1)
    same = (sa == sb).all(dim=-1)
    return float(same.float().mean()) if same.numel() else 1.0


def sample_rows(x, n):
    """Up to n rows spread over every request, its last row always included."""
    rows = []
    per = max(1, n // max(1, len(x.rows)))
    for r, (row0, cnt, seq) in enumerate(x.rows):
        if cnt == 0 or seq == 0:
            continue
        step = max(1, cnt // per)
        picks = set(range(cnt - 1, -1, -step)[:per]) | {cnt - 1}
        rows += [(row0 + i, r, seq - cnt + i) for i in sorted(picks)]
    if len(rows) > n:
        rows = rows[::-(-len(rows) // n)]
    return rows


def _fp64(t):
    return t.to(torch.float32).double()


def ref_row(x, t, r, pos):
    """fp64 block scores S [nb, Hkv] and the tie-rule selection per KV head."""
    s = x.spec
    nb = pos // B + 1
    pages = x.block_table[r, :nb].long()
    ik = _fp64(x.index_cache[pages]).reshape(nb * B, 128)
    dots = ik @ _fp64(x.iq[t]).T                                  # [nb*128, Hkv]
    dots[pos + 1:] = -math.inf
    S = dots.view(nb, B, s.hkv).amax(dim=1)
    sel = []
    for g in range(s.hkv):
        forced = [nb - 1]                                         # M3: init 0, local 1
        order = torch.sort(-S[:, g], stable=True).indices.tolist()
        rest = [b for b in order if b not in forced]
        sel.append(sorted(forced + rest[: min(s.topk, nb) - 1]))
    return S, sel


def ref_attn_row(x, t, r, pos, sel):
    """fp64 attention output [Hq, 128] of row t over the given selection."""
    s = x.spec
    g_size = s.hq // s.hkv
    out = torch.zeros((s.hq, 128), dtype=torch.float64, device=x.q.device)
    for g in range(s.hkv):
        blocks = [b for b in sel[g] if b >= 0]
        if not blocks:
            continue
        pages = x.block_table[r, blocks].long()
        kv = _fp64(x.kv_cache[pages, g])                          # [nsel, 128, 256]
        if x.k_scale is not None:
            kv = torch.cat([kv[..., :128] * float(x.k_scale), kv[..., 128:] * float(x.v_scale)],
                           dim=-1)
        keys = torch.tensor([b * B + j for b in blocks for j in range(B)],
                            device=x.q.device)
        kv = kv.reshape(-1, 256)[keys <= pos]
        qh = _fp64(x.q[t, g * g_size:(g + 1) * g_size])
        p = torch.softmax(qh @ kv[:, :128].T * x.softmax_scale, dim=-1)
        out[g * g_size:(g + 1) * g_size] = p @ kv[:, 128:]
    return out


def check_ours(x, topk, out, n_rows=48):
    """Ours against fp64 on sampled rows. topk: head-major [Hkv, T, K];
    out [T, Hq, 128]. A row whose set differs from fp64's only by blocks
    within TIE_TOL of each other counts as a near-tie, not a failure (the
    contract is the fp32 reference order, not fp64)."""
    rows = sample_rows(x, n_rows)
    exact = near = bad = 0
    num = den = 0.0
    for t, r, pos in rows:
        S, sel = ref_row(x, t, r, pos)
        got = []
        for g in range(x.spec.hkv):
            ids = [int(b) for b in topk[g, t].tolist() if b >= 0]
            got.append(sorted(ids))
            if ids == sel[g]:
                exact += 1
                continue
            extra = set(ids) - set(sel[g])
            miss = set(sel[g]) - set(ids)
            scale = float(S[:, g].abs().max()) or 1.0
            gap = max([abs(float(S[a, g]) - float(S[b, g])) for a in extra for b in miss] or
                      [math.inf])
            if len(ids) == len(sel[g]) and gap <= TIE_TOL * scale:
                near += 1
            else:
                bad += 1
        ref = ref_attn_row(x, t, r, pos, got)
        num += float((out[t].double() - ref).norm() ** 2)
        den += float(ref.norm() ** 2)
    rel = math.sqrt(num / den) if den > 0 else 0.0
    return {"rows": len(rows), "pairs_exact": exact, "pairs_near_tie": near,
            "pairs_wrong": bad, "attn_rel_l2": rel,
            "ok": bad == 0 and rel < ATTN_TOL and math.isfinite(rel)}


def union_per_group(topk, group=8):
    """Mean number of distinct blocks selected by `group` consecutive tokens of
    one KV head (topk head-major [Hkv, T, K]; -1 ignored, groups cut at T). A
    measure of the selections' locality: K when neighbours pick the same
    blocks, up to group * K when they share nothing. Requests are not
    separated (a group may straddle two; noise at the edges only)."""
    hkv, T, K = topk.shape
    n = T // group
    if n == 0:
        return None
    g = topk[:, : n * group, :].reshape(hkv, n, group * K)
    s, _ = torch.sort(g, dim=-1)
    distinct = (s[..., 1:] != s[..., :-1]).sum(dim=-1) + 1 - (s[..., 0] < 0).long()
    return float(distinct.float().mean())
