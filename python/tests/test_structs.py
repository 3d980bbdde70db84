"""The ctypes mirrors of the C structs: sizes and offsets (against the layout
the header implies on LP64, and against the header itself compiled with the
system C compiler when there is one), and round trips through real calls that
return or fill them."""
import ctypes
import math
import os
import shutil
import subprocess
import sys

import pytest

import m3sparse as m3s
from m3sparse import _capi as C
from conftest import HEADER

# LP64 layout implied by the header (x86-64 and aarch64 Linux/macOS):
# (size, {field: offset})
EXPECTED = {
    "m3s_tensor": (88, {"data": 0, "dtype": 8, "ndim": 12, "shape": 16, "stride": 48,
                        "device": 80}),
    "m3s_layer_config": (36, {"num_q_heads": 0, "num_kv_heads": 4, "topk": 8,
                              "init_blocks": 12, "local_blocks": 16, "softmax_scale": 20,
                              "head_dim": 24, "index_dim": 28, "block_size": 32}),
    "m3s_exec": (24, {"workspace": 0, "workspace_bytes": 8, "stream": 16}),
    "m3s_cp": (12, {"cp_size": 0, "cp_rank": 4, "blocks_per_interleave": 8}),
    "m3s_batch": (392, {"num_reqs": 0, "num_tokens": 4, "uniform_q_len": 8, "max_q_len": 12,
                        "max_seq_len": 16, "query_start_loc": 24, "seq_lens": 112,
                        "block_table": 200, "index_block_table": 288, "cp": 376}),
    "m3s_step": (784, {"decode": 0, "prefill": 392}),
    "m3s_step_desc": (32, {"num_reqs": 0, "query_lens": 8, "seq_lens": 16,
                           "num_spec_tokens": 24}),
    "m3s_step_plan": (56, {"num_decodes": 0, "num_prefills": 4, "decode_q_len": 8,
                           "num_decode_tokens": 12, "num_prefill_tokens": 16,
                           "num_tokens": 20, "max_prefill_q_len": 24, "max_seq_len": 32,
                           "csr_rows": 40, "workspace_bytes": 48}),
    "m3s_kv_scales": (176, {"k_scale": 0, "v_scale": 88}),
    "m3s_support_query": (24, {"op": 0, "act_dtype": 4, "kv_dtype": 8, "index_dtype": 12,
                               "per_slot_scales": 16, "layout": 20}),
    "m3s_support_info": (228, {"supported": 0, "kernel": 4, "reason": 68}),
}


def test_every_struct_is_mirrored():
    assert set(C.STRUCTS) == set(EXPECTED)


@pytest.mark.skipif(ctypes.sizeof(ctypes.c_void_p) != 8 or sys.platform == "win32",
                    reason="the expected table is for LP64")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_struct_layout_lp64(name):
    cls = C.STRUCTS[name]
    size, offsets = EXPECTED[name]
    assert ctypes.sizeof(cls) == size
    assert [f for f, _ in cls._fields_] == list(offsets)
    for field, off in offsets.items():
        assert getattr(cls, field).offset == off, field


def _compiler():
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


@pytest.mark.skipif(not os.path.isfile(HEADER), reason="not run from a source checkout")
@pytest.mark.skipif(_compiler() is None, reason="no C compiler")
def test_struct_layout_matches_compiled_header(tmp_path):
    lines = ["#include <stdio.h>", "#include <stddef.h>", '#include "m3sparse.h"',
             "int main(void) {"]
    for name, cls in C.STRUCTS.items():
        lines.append('  printf("%s sizeof %%zu\\n", sizeof(%s));' % (name, name))
        for field, _ in cls._fields_:
            lines.append('  printf("%s %s %%zu\\n", offsetof(%s, %s));'
                         % (name, field, name, field))
    lines += ["  return 0;", "}"]
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines) + "\n")
    exe = tmp_path / "layout"
    subprocess.run([_compiler(), "-std=c11", "-I", os.path.dirname(HEADER), str(src), "-o",
                    str(exe)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    seen = 0
    for line in out.splitlines():
        name, field, value = line.split()
        cls = C.STRUCTS[name]
        if field == "sizeof":
            assert ctypes.sizeof(cls) == int(value), name
        else:
            assert getattr(cls, field).offset == int(value), (name, field)
        seen += 1
    assert seen == sum(1 + len(c._fields_) for c in C.STRUCTS.values())


# ---- round trips through the library -------------------------------------
def test_version_matches_header():
    assert m3s.version_number() == C.M3S_VERSION_NUMBER
    assert m3s.version() == "0.2.0"
    assert m3s.dtype_size("bf16") == 2 and m3s.dtype_size("e5m2") == 1
    assert m3s.dtype_size("i64") == 8


def test_tensor_make_strided_narrow_round_trip():
    lib = C.lib()
    buf = (ctypes.c_uint16 * (5 * 3 * 4))()
    shape = (ctypes.c_int64 * 3)(5, 3, 4)
    t = lib.m3s_tensor_make(ctypes.addressof(buf), C.M3S_BF16, 3, shape, -1)
    assert t.data == ctypes.addressof(buf)
    assert (t.dtype, t.ndim, t.device) == (C.M3S_BF16, 3, -1)
    assert list(t.shape[:3]) == [5, 3, 4] and list(t.stride[:3]) == [12, 4, 1]
    stride = (ctypes.c_int64 * 3)(4, 20, 1)
    s = lib.m3s_tensor_strided(ctypes.addressof(buf), C.M3S_F16, 3, shape, stride, 7)
    assert (s.dtype, s.device) == (C.M3S_F16, 7)
    assert list(s.stride[:3]) == [4, 20, 1]
    n = lib.m3s_tensor_narrow(ctypes.byref(t), 2, 3)
    assert n.data == ctypes.addressof(buf) + 2 * 12 * 2
    assert list(n.shape[:3]) == [3, 3, 4]
    bad = lib.m3s_tensor_narrow(ctypes.byref(t), 4, 3)
    assert bad.ndim == -1 and not bad.data


def test_view_matches_tensor_make():
    np = pytest.importorskip("numpy")
    a = np.zeros((6, 2, 128), dtype=np.uint16)
    v = m3s.view(a, "bf16")
    shape = (ctypes.c_int64 * 3)(6, 2, 128)
    t = C.lib().m3s_tensor_make(a.ctypes.data, C.M3S_BF16, 3, shape, -1)
    assert bytes(v.c) == bytes(t)  # identical bytes, padding included (both zeroed)
    tv = m3s.view(a.transpose(1, 0, 2), "bf16")
    assert tv.shape == (2, 6, 128) and tv.stride == (128, 256, 1)


def test_config_round_trip():
    for tp, (hq, hkv) in {1: (64, 4), 2: (32, 2), 4: (16, 1), 8: (8, 1)}.items():
        c = m3s.config_minimax_m3(tp)
        assert (c.num_q_heads, c.num_kv_heads, c.topk, c.init_blocks, c.local_blocks) == \
            (hq, hkv, 16, 0, 1)
        assert math.isclose(c.softmax_scale, 1 / math.sqrt(128), rel_tol=1e-6)
        assert (c.head_dim, c.index_dim, c.block_size) == (128, 128, 128)
        assert C.lib().m3s_config_validate(ctypes.byref(c)) == 0
    with pytest.raises(ValueError):
        m3s.config_minimax_m3(3)
    raw = C.lib().m3s_config_minimax_m3(3)
    assert raw.num_q_heads == 0
    c = m3s.layer_config(12, 3, topk=5, init_blocks=2, local_blocks=1, softmax_scale=0.25)
    assert (c.num_q_heads, c.num_kv_heads, c.topk, c.init_blocks, c.local_blocks) == \
        (12, 3, 5, 2, 1)
    assert c.softmax_scale == 0.25


def test_plan_step_round_trip():
    ctx = m3s.get_context(-1)
    cfg = m3s.config_minimax_m3(2)
    # two decodes with 1 speculative token, then two prefills
    p = ctx.plan_step(cfg, [2, 2, 100, 7], [500, 3000, 300, 7], num_spec_tokens=1)
    assert (p.num_decodes, p.num_prefills, p.decode_q_len) == (2, 2, 2)
    assert (p.num_decode_tokens, p.num_prefill_tokens, p.num_tokens) == (4, 107, 111)
    assert p.max_prefill_q_len == 100 and p.max_seq_len == 3000
    assert p.csr_rows == 3 + 1        # ceil(300/128) + ceil(7/128)
    assert p.workspace_bytes == 0     # the CPU backend needs no scratch
    assert p.as_dict()["num_tokens"] == 111


@pytest.mark.parametrize("qlens,spec,expect", [
    ([1, 1, 5], 0, 2),          # leading decodes
    ([5, 5, 5], 0, 0),          # first length > threshold: all prefill (vLLM order)
    ([2, 2, 0], 1, 3),          # all equal or 0: all decode (the 0 is padded)
    ([1, 3, 1], 0, 1),
    ([0, 0], 0, 2),             # only padding
    ([], 0, 0),
])
def test_plan_step_split_rule(qlens, spec, expect):
    ctx = m3s.get_context(-1)
    cfg = m3s.config_minimax_m3(8)
    seq = [0 if q == 0 else 1000 + q for q in qlens]
    p = ctx.plan_step(cfg, qlens, seq, num_spec_tokens=spec)
    assert p.num_decodes == expect
    assert p.num_prefills == len(qlens) - expect
    assert p.num_decode_tokens == expect * p.decode_q_len


def test_query_support_round_trip():
    ctx = m3s.get_context(-1)
    cfg = m3s.config_minimax_m3(1)
    info = ctx.query_support(cfg, "index_topk")
    assert info.supported and info.kernel == "cpu_index_topk_streaming" and info.reason == ""
    info = ctx.query_support(cfg, "attention_decode", kv_dtype="e4m3",
                             layout="token_major", per_slot_scales=True)
    assert info.supported and info.kernel.startswith("cpu_sparse_attention")
    info = ctx.query_support(cfg, "merge", act_dtype="f32")
    assert not info.supported and "act_dtype" in info.reason and info.kernel == ""
    with pytest.raises(m3s.M3SError) as e:
        ctx.query_support(cfg, 99)
    assert e.value.status == m3s.M3S_ERR_INVALID


def test_batch_layout_through_csr_rows():
    np = pytest.importorskip("numpy")
    ctx = m3s.get_context(-1)
    seq = np.array([129, 0, 1, 512], dtype=np.int32)
    qsl = np.array([3, 4, 4, 5, 9], dtype=np.int32)
    b = m3s.Batch(seq, query_start_loc=qsl)
    assert (b.num_reqs, b.num_tokens, b.max_q_len, b.max_seq_len) == (4, 6, 4, 512)
    assert ctx.k2q_csr_rows(b) == 2 + 0 + 1 + 4
    u = m3s.Batch(seq, uniform_q_len=1, max_seq_len=600)
    assert ctx.k2q_csr_rows(u) == 7
