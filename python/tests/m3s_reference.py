"""Test cases and an independent numpy fp64 implementation of SPEC sections
3-4 (index scoring / block selection, block-sparse GQA attention).

A Case owns logical per-request data (index keys and K/V by position), places
them in paged caches through shuffled block tables (every page of the caches
filled, so a read of a wrong page or a future key changes the result), and
random activations. The reference works on the logical data only: no pages,
fp64 sums, sorting instead of a streaming selection.
"""

import math

import numpy as np

from m3sparse.numpy_utils import bf16_bits, bf16_to_f32, fp8_bits, fp8_table

B = 128
D = 128
GARBAGE_PAGE = 1 << 30  # block-table entries past a request's pages: never read


def grid(rng, shape):
    """Values k/4, |k| <= 4: bf16-exact, and dot products of 128 of them are
    exact in fp32 (multiples of 1/16 below 2^11)."""
    return rng.integers(-4, 5, size=shape).astype(np.float64) / 4.0


class Case:
    """reqs: list of (q_len, seq_len); seq_len 0 = padded request.

    uniform: uniform decode batch (all q_len equal); otherwise ragged with
    query_start_loc starting at qsl_base. act / kv / idx: activation, main
    cache and index cache dtypes ("bf16", "f16"; kv also "e4m3", "e5m2"; idx
    also "e4m3"). scale_mode: 0 none, 1 scalar (k 0.5, v 2.0), 2 per (head,
    slot). token_major: main cache stored [P, 128, Hkv, 256] and passed as a
    permuted view. topk_head_major: the top-k buffer stored [Hkv, T, K]."""

    def __init__(self, hq, hkv, topk, init, local, reqs, *, seed=0, uniform=False,
                 qsl_base=0, act="bf16", kv="bf16", idx="bf16", scale_mode=0,
                 token_major=False, topk_head_major=False, extra_pages=2,
                 same_tables=False, softmax_scale=None, tie_keys=False):
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.hq, self.hkv, self.K, self.init, self.local = hq, hkv, topk, init, local
        self.scale = 1.0 / math.sqrt(128.0) if softmax_scale is None else softmax_scale
        self.reqs = list(reqs)
        self.uniform = uniform
        self.act, self.kvdt, self.idxdt = act, kv, idx
        self.scale_mode = scale_mode
        self.token_major = token_major
        R = len(reqs)
        self.R = R
        qlens = [q for q, _ in reqs]
        self.seq_lens = np.array([s for _, s in reqs], dtype=np.int32)
        self.T = sum(qlens)
        if uniform:
            assert len(set(qlens)) <= 1
            self.q_len = qlens[0] if qlens else 1
            self.row0 = [r * self.q_len for r in range(R)]
            self.qsl = None
        else:
            self.q_len = 0
            self.qsl = np.array([qsl_base] + list(qsl_base + np.cumsum(qlens)), dtype=np.int32)
            self.row0 = [int(self.qsl[r] - qsl_base) for r in range(R)]
        # positions of rows (-1 for padded requests)
        self.row_req = np.full(self.T, -1, dtype=np.int64)
        self.row_pos = np.full(self.T, -1, dtype=np.int64)
        for r, (n, s) in enumerate(reqs):
            for i in range(n):
                self.row_req[self.row0[r] + i] = r
                self.row_pos[self.row0[r] + i] = (s - n + i) if s > 0 else -1

        # pages
        npages = [-(-s // B) for _, s in reqs]
        self.max_pages = max([1] + npages) + 1
        P = sum(npages) + extra_pages
        self.P = P

        def table(perm_seed):
            perm = np.random.default_rng(perm_seed).permutation(P).astype(np.int32)
            bt = np.full((R, self.max_pages), GARBAGE_PAGE, dtype=np.int32)
            k = 0
            for r in range(R):
                bt[r, : npages[r]] = perm[k:k + npages[r]]
                k += npages[r]
            return bt

        self.block_table = table(seed + 101)
        self.index_block_table = self.block_table if same_tables else table(seed + 202)

        # logical data
        self.ik_log = []   # per request [seq, 128] (values the cache holds, decoded)
        self.kv_log = []   # per request [seq, Hkv, 256]
        # index cache, filled with random grid values everywhere
        ic_val = grid(rng, (P, B, D))
        kv_val = rng.standard_normal((P, hkv, B, 2 * D))
        for r, (_, s) in enumerate(reqs):
            if tie_keys:
                ik = np.full((s, D), 0.25)
            else:
                ik = grid(rng, (s, D))
            kvr = rng.standard_normal((s, hkv, 2 * D))
            for p in range(s):
                ic_val[self.index_block_table[r, p // B], p % B] = ik[p]
                kv_val[self.block_table[r, p // B], :, p % B] = kvr[p]
        # index cache storage
        if idx == "bf16":
            self.index_cache = bf16_bits(ic_val)
            ic_dec = bf16_to_f32(self.index_cache).astype(np.float64)
        elif idx == "e4m3":
            self.index_cache = fp8_bits(ic_val, "e4m3")
            ic_dec = fp8_table("e4m3")[self.index_cache].astype(np.float64)
        else:
            raise ValueError(idx)
        # main cache storage ([P, Hkv, 128, 256] logical values)
        self.k_scale = self.v_scale = None
        if kv in ("e4m3", "e5m2"):
            kvv = kv_val * 4.0
            if scale_mode == 1:
                self.k_scale = np.array(0.5, dtype=np.float32)
                self.v_scale = np.array(2.0, dtype=np.float32)
                ks = np.float64(0.5)
                vs = np.float64(2.0)
                sc = np.concatenate([np.full(D, ks), np.full(D, vs)])[None, None, None, :]
            elif scale_mode == 2:
                self.k_scale = (2.0 ** rng.integers(-2, 3, size=(hkv, P * B))).astype(np.float32)
                self.v_scale = (2.0 ** rng.integers(-2, 3, size=(hkv, P * B))).astype(np.float32)
                ksl = self.k_scale.reshape(hkv, P, B).transpose(1, 0, 2)[..., None]
                vsl = self.v_scale.reshape(hkv, P, B).transpose(1, 0, 2)[..., None]
                sc = np.concatenate([np.broadcast_to(ksl, (P, hkv, B, D)),
                                     np.broadcast_to(vsl, (P, hkv, B, D))], axis=-1)
            else:
                sc = np.ones((1, 1, 1, 1))
            bytes_ = fp8_bits(kvv / sc, kv)
            kv_dec = fp8_table(kv)[bytes_].astype(np.float64) * sc
            store = bytes_
        elif kv == "bf16":
            store = bf16_bits(kv_val)
            kv_dec = bf16_to_f32(store).astype(np.float64)
        elif kv == "f16":
            store = kv_val.astype(np.float16)
            kv_dec = store.astype(np.float64)
        else:
            raise ValueError(kv)
        if token_major:
            phys = np.ascontiguousarray(store.transpose(0, 2, 1, 3))   # [P, 128, Hkv, 256]
            self.kv_phys = phys
            self.kv_cache = phys.transpose(0, 2, 1, 3)                 # logical view
        else:
            self.kv_phys = store
            self.kv_cache = store
        # decoded logical data for the reference
        for r, (_, s) in enumerate(reqs):
            p = np.arange(s)
            self.ik_log.append(ic_dec[self.index_block_table[r, p // B], p % B])
            self.kv_log.append(kv_dec[self.block_table[r, p // B], :, p % B])
        # activations
        iq_val = grid(rng, (self.T, hkv, D))
        q_val = rng.standard_normal((self.T, hq, D))
        self.iq, self.iq_val = self._act(iq_val)
        self.q, self.q_val = self._act(q_val)
        # outputs
        if topk_head_major:
            self.topk_buf = np.full((hkv, self.T, topk), 0x7FFFFFFF, dtype=np.int32)
            self.topk = self.topk_buf.transpose(1, 0, 2)
        else:
            self.topk_buf = np.full((self.T, hkv, topk), 0x7FFFFFFF, dtype=np.int32)
            self.topk = self.topk_buf
        self.out = self.new_out()
        self.lse = np.full((self.T, hq), np.nan, dtype=np.float32)

    def _act(self, val):
        if self.act == "bf16":
            bits = bf16_bits(val)
            return bits, bf16_to_f32(bits).astype(np.float64)
        if self.act == "f16":
            h = val.astype(np.float16)
            return h, h.astype(np.float64)
        raise ValueError(self.act)

    def new_out(self):
        if self.act == "bf16":
            return np.full((self.T, self.hq, D), 0x7FC0, dtype=np.uint16)  # NaN poison
        return np.full((self.T, self.hq, D), np.nan, dtype=np.float16)

    def out_f64(self, out=None):
        out = self.out if out is None else out
        if self.act == "bf16":
            return bf16_to_f32(out).astype(np.float64)
        return out.astype(np.float64)

    @property
    def max_seq_len(self):
        return int(self.seq_lens.max()) if self.R else 0

    def scales(self):
        if self.k_scale is None:
            return None
        return (self.k_scale, self.v_scale)

    def batch(self, m3s):
        if self.uniform:
            return m3s.Batch(self.seq_lens, self.block_table, self.index_block_table,
                             uniform_q_len=self.q_len)
        return m3s.Batch(self.seq_lens, self.block_table, self.index_block_table,
                         query_start_loc=self.qsl)

    def kw(self):
        """dtype keywords of the binding for this case's raw containers."""
        return {"act_dtype": self.act, "kv_dtype": self.kvdt}


# ---------------------------------------------------------------------------
# SPEC section 3
# ---------------------------------------------------------------------------
def ref_select(case, t, g):
    """fp64 selection for row t, KV/index head g: ids ascending, then -1."""
    K = case.K
    row = np.full(K, -1, dtype=np.int32)
    r, pos = case.row_req[t], case.row_pos[t]
    if r < 0 or pos < 0:
        return row
    L = pos + 1
    nb = pos // B + 1
    s = case.ik_log[r][:L] @ case.iq_val[t, g]          # fp64, exact on the grid
    S = np.full(nb, -np.inf)
    for b in range(nb):
        S[b] = s[b * B: min((b + 1) * B, L)].max()
    budget = min(K, nb)
    forced = set(range(min(case.init, nb))) | set(range(max(0, nb - case.local), nb))
    rest = sorted((b for b in range(nb) if b not in forced), key=lambda b: (-S[b], b))
    chosen = sorted(list(forced) + rest[: budget - len(forced)])
    row[: len(chosen)] = chosen
    return row


def ref_topk(case):
    out = np.full((case.T, case.hkv, case.K), -1, dtype=np.int32)
    for t in range(case.T):
        for g in range(case.hkv):
            out[t, g] = ref_select(case, t, g)
    return out


# ---------------------------------------------------------------------------
# SPEC section 4
# ---------------------------------------------------------------------------
def ref_attention(case, topk):
    """fp64 out [T, Hq, 128] and lse [T, Hq] over the blocks of topk (first
    min(K, nb) entries of each row, -1 skipped)."""
    T, hq, hkv = case.T, case.hq, case.hkv
    G = hq // hkv
    out = np.zeros((T, hq, D))
    lse = np.full((T, hq), -np.inf)
    for t in range(T):
        r, pos = case.row_req[t], case.row_pos[t]
        if r < 0 or pos < 0:
            continue
        nb = pos // B + 1
        for g in range(hkv):
            ids = [int(b) for b in topk[t, g, : min(case.K, nb)] if b >= 0]
            keys = np.concatenate([np.arange(b * B, min((b + 1) * B, pos + 1)) for b in ids]) \
                if ids else np.zeros(0, dtype=np.int64)
            if keys.size == 0:
                continue
            kv = case.kv_log[r][keys, g]                      # [n, 256]
            qh = case.q_val[t, g * G:(g + 1) * G]             # [G, 128]
            s = qh @ kv[:, :D].T * case.scale                 # [G, n]
            m = s.max(axis=1, keepdims=True)
            p = np.exp(s - m)
            z = p.sum(axis=1, keepdims=True)
            out[t, g * G:(g + 1) * G] = (p / z) @ kv[:, D:]
            lse[t, g * G:(g + 1) * G] = (m + np.log(z))[:, 0]
    return out, lse


def rel_l2(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    den = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / (den if den > 0 else 1.0))


def check_attention(case, out, lse, ref_out, ref_lse, tol=1e-2):
    """rel L2 < tol over the whole output AND for every (row, head) on its
    own (one wrong row among many barely moves the global error), lse within
    1e-3 where finite, padded/empty rows 0 / -inf."""
    o = np.asarray(out, dtype=np.float64)
    assert np.isfinite(o).all(), "non-finite output"
    err = rel_l2(o, ref_out)
    assert err < tol, "rel L2 %.3g" % err
    r = np.asarray(ref_out, dtype=np.float64).reshape(o.shape)
    den = np.linalg.norm(r, axis=-1)
    row_err = np.linalg.norm(o - r, axis=-1) / np.where(den > 0, den, 1.0)
    if row_err.size:
        worst = np.unravel_index(np.argmax(row_err), row_err.shape)
        assert row_err.max() < tol, "row %s: rel L2 %.3g (global %.3g)" % (
            tuple(int(i) for i in worst), row_err.max(), err)
    if lse is not None:
        lse = np.asarray(lse, dtype=np.float64)
        fin = np.isfinite(ref_lse)
        assert (np.isneginf(lse) == ~fin).all(), "lse -inf pattern differs"
        assert np.abs(lse[fin] - ref_lse[fin]).max(initial=0.0) < 1e-3
    empty = ~np.isfinite(ref_lse)
    assert (o[empty] == 0).all(), "rows without keys must be exactly 0"
    return err
