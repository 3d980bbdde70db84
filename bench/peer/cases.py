"""The peer benchmark's cases and their inputs (one M3 sparse layer, torch on
the GPU). Inputs: random bf16 (never zeros); physical pages a random
permutation of one pool; decode seq_len of request b = ctx - (37*b mod 128)
(ragged last pages), ctx per request when the case lists them (a skewed
batch); prefill requests = (prefix, new tokens)."""
from dataclasses import dataclass, field

import torch

B = 128
FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str                      # "decode" or "prefill"
    hq: int = 64
    hkv: int = 4
    topk: int = 16
    bs: int = 1                    # decode: requests
    ctx: int = 0                   # decode: context per request (before the ragged cut)
    ctxs: tuple = ()               # decode: one context per request instead (skewed batches)
    q_len: int = 1                 # decode: query rows per request (1 + speculative)
    reqs: tuple = ()               # prefill: ((prefix, new), ...)
    idx_dtype: str = "bf16"        # index cache: bf16 or e4m3
    kv_dtype: str = "bf16"         # main cache: bf16 or e4m3 (scalar scales)
    required: bool = True          # one of the required cases


K128 = 128 * 1024
CASES = [
    Spec("decode-b1-ctx128k", "decode", bs=1, ctx=K128),
    Spec("decode-b1-ctx32k", "decode", bs=1, ctx=32768, required=False),
    Spec("decode-b16-ctx32k", "decode", bs=16, ctx=32768, required=False),
    Spec("decode-b32-ctx32k", "decode", bs=32, ctx=32768, required=False),
    Spec("decode-b64-ctx32k", "decode", bs=64, ctx=32768, required=False),
    Spec("decode-b128-ctx32k", "decode", bs=128, ctx=32768),
    Spec("decode-b128-ctx128k", "decode", bs=128, ctx=K128),
    Spec("decode-b64-ctx32k-q4", "decode", bs=64, ctx=32768, q_len=4),
    Spec("decode-b128-ctx128k-idxe4m3", "decode", bs=128, ctx=K128, idx_dtype="e4m3"),
    Spec("decode-b128-ctx32k-kve4m3", "decode", bs=128, ctx=32768, kv_dtype="e4m3"),
    Spec("decode-b128-ctx32k-tp8", "decode", hq=8, hkv=1, bs=128, ctx=32768),
    # issue 15's skewed batch: one long request among short ones
    Spec("decode-skew-1x128k-63x4k", "decode", bs=64, ctxs=(K128,) + (4096,) * 63,
         required=False),
    Spec("prefill-4k", "prefill", reqs=((0, 4096),), required=False),
    Spec("prefill-8k", "prefill", reqs=((0, 8192),)),
    Spec("prefill-16k", "prefill", reqs=((0, 16384),), required=False),
    Spec("prefill-32k", "prefill", reqs=((0, 32768),), required=False),
    Spec("prefill-64k", "prefill", reqs=((0, 65536),)),
    Spec("prefill-4k+60k", "prefill", reqs=((61440, 4096),)),
    Spec("prefill-ragged8x2k", "prefill", reqs=tuple((4096 * i, 2048) for i in range(8))),
    # an e4m3 index cache in prefill (engines that keep an fp8 index cache
    # score every prompt from it; vLLM widens the keys to the query's bf16)
    Spec("prefill-8k-idxe4m3", "prefill", reqs=((0, 8192),), idx_dtype="e4m3", required=False),
    Spec("prefill-64k-idxe4m3", "prefill", reqs=((0, 65536),), idx_dtype="e4m3",
         required=False),
]
BY_NAME = {c.name: c for c in CASES}


@dataclass
class Inputs:
    """Everything both sides read, on the GPU."""
    spec: Spec
    q: torch.Tensor                # [T, Hq, 128] bf16
    iq: torch.Tensor               # [T, Hkv, 128] bf16
    kv_cache: torch.Tensor         # [P, Hkv, 128, 256] bf16 / e4m3
    index_cache: torch.Tensor      # [P, 128, 128] bf16 / e4m3
    block_table: torch.Tensor      # [R, max_pages] i32
    seq_lens: torch.Tensor         # [R] i32
    seq_lens_host: list
    k_scale: torch.Tensor = None   # [1] f32 (fp8 cache)
    v_scale: torch.Tensor = None
    # prefill
    cu_seqlens_q: torch.Tensor = None
    prefix_lens: torch.Tensor = None
    max_query_len: int = 0
    rows: list = field(default_factory=list)   # per request: (first row, rows, seq_len)
    max_seq_len: int = 0
    softmax_scale: float = 128 ** -0.5

    @property
    def T(self):
        return self.q.shape[0]


def _randn(shape, dtype, gen, device):
    if dtype == FP8:
        return torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16).to(FP8)
    return torch.randn(shape, generator=gen, device=device, dtype=dtype)


def build(spec, seed=0, device="cuda"):
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    if spec.kind == "decode":
        ctxs = spec.ctxs or (spec.ctx,) * spec.bs
        seq = [ctxs[b] - (37 * b) % 128 for b in range(spec.bs)]
        qlens = [spec.q_len] * spec.bs
    else:
        seq = [p + n for p, n in spec.reqs]
        qlens = [n for _, n in spec.reqs]
    pages = [(s + B - 1) // B for s in seq]
    pool = sum(pages)
    perm = torch.randperm(pool, generator=gen, device=device).to(torch.int32)
    max_pages = max(pages)
    bt = torch.zeros((len(seq), max_pages), dtype=torch.int32, device=device)
    at = 0
    for r, n in enumerate(pages):
        bt[r, :n] = perm[at:at + n]
        at += n
    T = sum(qlens)
    kv_dt = FP8 if spec.kv_dtype == "e4m3" else torch.bfloat16
    ic_dt = FP8 if spec.idx_dtype == "e4m3" else torch.bfloat16
    x = Inputs(
        spec=spec,
        q=_randn((T, spec.hq, 128), torch.bfloat16, gen, device),
        iq=_randn((T, spec.hkv, 128), torch.bfloat16, gen, device),
        kv_cache=_randn((pool, spec.hkv, B, 256), kv_dt, gen, device),
        index_cache=_randn((pool, B, 128), ic_dt, gen, device),
        block_table=bt,
        seq_lens=torch.tensor(seq, dtype=torch.int32, device=device),
        seq_lens_host=seq,
        max_seq_len=max(seq),
    )
    if kv_dt == FP8:
        x.k_scale = torch.tensor([0.5], dtype=torch.float32, device=device)
        x.v_scale = torch.tensor([0.25], dtype=torch.float32, device=device)
    row = 0
    for s, n in zip(seq, qlens):
        x.rows.append((row, n, s))
        row += n
    if spec.kind == "prefill":
        cu = [0]
        for n in qlens:
            cu.append(cu[-1] + n)
        x.cu_seqlens_q = torch.tensor(cu, dtype=torch.int32, device=device)
        x.prefix_lens = torch.tensor([p for p, _ in spec.reqs], dtype=torch.int32,
                                     device=device)
        x.max_query_len = max(qlens)
    return x
