"""Helpers of the torch tests (imported only after pytest.importorskip("torch")):
numpy Case data as torch tensors, and a plain-torch fp64 implementation of
SPEC sections 3-4 that reads the paged caches through the block tables (a code
path independent of the library and of m3s_reference's logical arrays)."""
import math

import numpy as np
import torch

B = 128


def from_np(a, device="cpu", dtype=None):
    """numpy -> torch (a copy on `device`); uint16 -> bf16/f16 bits, uint8 -> fp8
    bytes when dtype says so."""
    a = np.ascontiguousarray(a)
    if a.dtype == np.uint16:
        t = torch.from_numpy(a.view(np.int16)).view(dtype or torch.bfloat16)
    elif a.dtype == np.uint8 and dtype is not None:
        t = torch.from_numpy(a).view(dtype)
    else:
        t = torch.from_numpy(a)
        if dtype is not None:
            t = t.to(dtype)
    return t.to(device)


TORCH_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16,
                "e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


class TorchCase:
    """A Case's tensors on a torch device. kv_cache is the logical view
    (token-major cases: a permuted view of the physical [P, 128, Hkv, 256])."""

    def __init__(self, case, device):
        self.case = case
        self.device = device
        act = TORCH_DTYPES[case.act]
        self.q = from_np(case.q, device, act)
        self.iq = from_np(case.iq, device, act)
        kvdt = TORCH_DTYPES[case.kvdt]
        phys = from_np(case.kv_phys, device, kvdt)
        self.kv_phys = phys
        self.kv_cache = phys.permute(0, 2, 1, 3) if case.token_major else phys
        self.index_cache = from_np(case.index_cache, device, TORCH_DTYPES[case.idxdt])
        self.seq_lens = from_np(case.seq_lens, device)
        self.block_table = from_np(case.block_table, device)
        self.index_block_table = from_np(case.index_block_table, device)
        qsl = case.qsl if case.qsl is not None else np.arange(case.R + 1, dtype=np.int32) * \
            case.q_len
        self.query_start_loc = from_np(qsl, device)
        self.k_scale = from_np(case.k_scale, device) if case.k_scale is not None else None
        self.v_scale = from_np(case.v_scale, device) if case.v_scale is not None else None

    def rows(self):
        c = self.case
        return [(c.row0[r], c.reqs[r][0]) for r in range(c.R)]


def torch_reference(q, iq, kv_cache, index_cache, block_table, index_block_table, seq_lens,
                    rows, hkv, topk, init_blocks, local_blocks, softmax_scale,
                    k_scale=None, v_scale=None):
    """SPEC sections 3-4 in plain torch (fp64), from the paged caches.

    rows: per request (first row, number of rows); seq_lens, block tables:
    host lists / CPU tensors. Returns (topk [T, Hkv, K] i32, out [T, Hq, 128]
    f64, lse [T, Hq] f64) on q's device."""
    dev = q.device
    T, hq = q.shape[0], q.shape[1]
    G = hq // hkv
    K = topk
    sel = torch.full((T, hkv, K), -1, dtype=torch.int32, device=dev)
    out = torch.zeros((T, hq, 128), dtype=torch.float64, device=dev)
    lse = torch.full((T, hq), -math.inf, dtype=torch.float64, device=dev)
    kv_all = kv_cache.to(torch.float32).double()       # fp8 -> f32 -> f64, then gather
    ic_all = index_cache.to(torch.float32).double()
    bt = torch.as_tensor(block_table).cpu()
    ibt = torch.as_tensor(index_block_table).cpu()
    for r, (row0, n) in enumerate(rows):
        s = int(seq_lens[r])
        if s == 0 or n == 0:
            continue
        npg = -(-s // B)
        ik = ic_all[ibt[r, :npg].long().to(dev)].reshape(-1, 128)[:s]
        kv = kv_all[bt[r, :npg].long().to(dev)]                    # [npg, Hkv, 128, 256]
        kv = kv.permute(0, 2, 1, 3).reshape(-1, hkv, 256)[:s]
        if k_scale is not None:
            slots = (bt[r, :npg].long()[:, None] * B + torch.arange(B)).reshape(-1)[:s].to(dev)
            ks = k_scale.double().reshape(-1) if k_scale.numel() == 1 else \
                k_scale.double()[:, slots].T                          # [s, Hkv]
            vs = v_scale.double().reshape(-1) if v_scale.numel() == 1 else \
                v_scale.double()[:, slots].T
            kv = torch.cat([kv[..., :128] * (ks if ks.dim() == 1 else ks[..., None]),
                            kv[..., 128:] * (vs if vs.dim() == 1 else vs[..., None])], dim=-1)
        for i in range(n):
            t = row0 + i
            pos = s - n + i
            L, nb = pos + 1, pos // B + 1
            sc = ik[:L] @ iq[t].double().T                               # [L, Hkv]
            pad = torch.full((nb * B, hkv), -math.inf, dtype=torch.float64, device=dev)
            pad[:L] = sc
            S = pad.view(nb, B, hkv).amax(dim=1)                         # [nb, Hkv]
            budget = min(K, nb)
            forced = sorted(set(range(min(init_blocks, nb))) |
                            set(range(max(0, nb - local_blocks), nb)))
            for g in range(hkv):
                order = torch.sort(-S[:, g], stable=True).indices.tolist()  # ties: lower id
                rest = [b for b in order if b not in forced]
                chosen = sorted(forced + rest[: budget - len(forced)])
                sel[t, g, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
                keys = torch.cat([torch.arange(b * B, min((b + 1) * B, L)) for b in chosen])
                keys = keys.to(dev)
                Kg, Vg = kv[keys, g, :128], kv[keys, g, 128:]
                qh = q[t, g * G:(g + 1) * G].double()
                logits = qh @ Kg.T * softmax_scale
                lse[t, g * G:(g + 1) * G] = torch.logsumexp(logits, dim=-1)
                out[t, g * G:(g + 1) * G] = torch.softmax(logits, dim=-1) @ Vg
    return sel, out, lse


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


# ---------------------------------------------------------------------------
# context parallel (SPEC section 10)
# ---------------------------------------------------------------------------
def cp_owner(b, cp_size, interleave):
    return (b // interleave) % cp_size


def cp_column(b, cp_size, interleave):
    return (b // (interleave * cp_size)) * interleave + b % interleave


def _take_pages(cache, pages):
    """cache[pages] (contiguous); fp8 caches are gathered as bytes."""
    if cache.element_size() == 1:
        return cache.view(torch.uint8)[pages].contiguous().view(cache.dtype)
    return cache[pages].contiguous()


class RankCaches:
    """One context-parallel rank's share of a TorchCase: caches holding only
    the pages of the blocks the rank owns (copied from the whole caches, in a
    shuffled order, plus a garbage page), and block tables listing them at
    their rank-local columns (other entries: a page id that is never read).
    Everything else (queries, seq_lens, query_start_loc) stays global."""

    def __init__(self, tc, cp_size, rank, interleave=1, seed=0):
        case = tc.case
        dev = tc.device
        self.cp = (cp_size, rank, interleave)
        owned = []                                  # (request, block)
        for r, s in enumerate(case.seq_lens.tolist()):
            for b in range(-(-int(s) // B)):
                if cp_owner(b, cp_size, interleave) == rank:
                    owned.append((r, b))
        npg = len(owned) + 1                        # + one garbage page
        perm = torch.randperm(npg, generator=torch.Generator().manual_seed(seed)).tolist()
        cols = max([1] + [cp_column(b, cp_size, interleave) + 1 for _, b in owned])
        never = 1 << 30
        bt = torch.full((case.R, cols), never, dtype=torch.int32)
        ibt = torch.full((case.R, cols), never, dtype=torch.int32)
        kv_src, ic_src = [], []
        for i, (r, b) in enumerate(owned):
            local = perm[i]
            bt[r, cp_column(b, cp_size, interleave)] = local
            ibt[r, cp_column(b, cp_size, interleave)] = local
        order = [None] * npg                        # local page -> (whole kv page, index page)
        for i, (r, b) in enumerate(owned):
            order[perm[i]] = (int(case.block_table[r, b]), int(case.index_block_table[r, b]))
        order[perm[-1]] = (0, 0)                    # garbage: some other request's page
        kv_src = torch.tensor([o[0] for o in order], device=dev)
        ic_src = torch.tensor([o[1] for o in order], device=dev)
        self.kv_cache = _take_pages(tc.kv_cache, kv_src)       # [npg, Hkv, 128, 256]
        self.index_cache = _take_pages(tc.index_cache, ic_src)   # [npg, 128, 128]
        self.k_scale = self.v_scale = None
        if tc.k_scale is not None:
            if tc.k_scale.numel() == 1:
                self.k_scale, self.v_scale = tc.k_scale, tc.v_scale
            else:                                   # per-slot [Hkv, P*128]: cut the pages
                hkv = tc.k_scale.shape[0]
                self.k_scale, self.v_scale = (
                    s.view(hkv, -1, B)[:, kv_src].reshape(hkv, -1).contiguous()
                    for s in (tc.k_scale, tc.v_scale))
        self.block_table = bt.to(dev)
        self.index_block_table = ibt.to(dev)


ops = torch.ops.m3sparse  # resolved at call time (`import m3sparse` registers the ops)


def batch_meta(case, tc):
    """(query_start_loc or None, uniform_q_len) of the case's batch."""
    if case.uniform:
        return None, case.q_len
    return tc.query_start_loc, 0


def whole_layer(case, tc):
    """index_topk + sparse_attention on the whole cache: (topk, out, lse)."""
    qsl, uq = batch_meta(case, tc)
    tk = ops.index_topk(tc.iq, tc.index_cache, tc.seq_lens, tc.index_block_table, qsl, uq, 0,
                        case.max_seq_len, case.K, case.init, case.local)
    out, lse = ops.sparse_attention(tc.q, tc.kv_cache, tk, tc.seq_lens, tc.block_table, qsl,
                                    tc.k_scale, tc.v_scale, uq, 0, case.max_seq_len, case.scale)
    return tk, out, lse


def cp_chain(case, tc, ranks, interleave):
    """The SPEC 10 chain over simulated ranks (RankCaches), torch.stack standing
    in for the all-gathers; returns (the merged topk of each rank, out, lse)."""
    qsl, uq = batch_meta(case, tc)
    msl = case.max_seq_len
    cp = len(ranks)
    # 1. candidates: each rank scores only its own blocks
    cands = [ops.index_topk_candidates(tc.iq, rk.index_cache, tc.seq_lens, rk.index_block_table,
                                       qsl, uq, 0, msl, cp, n, interleave, case.K, case.init,
                                       case.local)
             for n, rk in enumerate(ranks)]
    # 2. "all-gather": [cp, T, Hkv, K]
    all_ids = torch.stack([c[0] for c in cands])
    all_scores = torch.stack([c[1] for c in cands])
    # 3. merge on every rank, 4. partial attention on every rank
    topks, outs, lses = [], [], []
    for n, rk in enumerate(ranks):
        tk = ops.merge_topk_candidates(all_ids, all_scores, tc.seq_lens, qsl, uq, 0, msl,
                                       interleave, case.init, case.local)
        o, lse = ops.sparse_attention_cp(tc.q, rk.kv_cache, tk, tc.seq_lens, rk.block_table,
                                         qsl, rk.k_scale, rk.v_scale, uq, 0, msl, cp, n,
                                         interleave, case.scale)
        topks.append(tk)
        outs.append(o)
        lses.append(lse)
    # 5. "all-gather" of the partials, N-way merge
    out, lse = ops.merge_attn_states_n(torch.stack(outs), torch.stack(lses))
    return topks, out, lse
