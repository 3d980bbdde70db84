"""Library errors become M3SError (status + m3s_last_error text naming the
argument); conversion problems are TypeError/ValueError before any call; a
failing call writes nothing."""
import os
import subprocess
import sys

import numpy as np
import pytest

import m3sparse as m3s
from m3sparse import _capi as C
from m3s_reference import Case
from m3sparse.core import _check, lib


@pytest.fixture(scope="module")
def ctx():
    with m3s.Context(-1) as c:
        yield c


@pytest.fixture()
def case():
    return Case(hq=8, hkv=1, topk=16, init=0, local=1, reqs=[(1, 2500), (4, 900)], seed=21)


def cfg_of(case):
    return m3s.layer_config(case.hq, case.hkv, case.K, case.init, case.local)


def attention(ctx, case, **over):
    args = dict(q=case.q, kv_cache=case.kv_cache, topk=np.zeros((case.T, 1, 16), np.int32) - 1,
                out=case.out, lse=case.lse)
    args.update(over)
    batch = over.pop("batch", None) or case.batch(m3s)
    args.pop("batch", None)
    return ctx.sparse_attention(cfg_of(case), batch, args["q"], args["kv_cache"], args["topk"],
                                args["out"], args["lse"], act_dtype="bf16", kv_dtype="bf16")


def expect(excinfo, status, *words):
    e = excinfo.value
    assert e.status == status, (e.status_name, e.message)
    assert e.status_name == C.STATUS_NAMES[status]
    for w in words:
        assert w in e.message, (w, e.message)
    assert e.message in str(e)
    return e


def test_wrong_head_count_names_q(ctx, case):
    q = np.zeros((case.T, 4, 128), np.uint16)     # Hq 4 instead of 8
    with pytest.raises(m3s.M3SError) as ei:
        attention(ctx, case, q=q)
    e = expect(ei, m3s.M3S_ERR_SHAPE, "m3s_sparse_attention", "'q'", "cfg.num_q_heads", "4")
    assert e.function == "m3s_sparse_attention"


def test_wrong_ndim_names_topk(ctx, case):
    with pytest.raises(m3s.M3SError) as ei:
        attention(ctx, case, topk=np.zeros((case.T, 16), np.int32))
    expect(ei, m3s.M3S_ERR_SHAPE, "'topk'", "3 dimensions")


def test_wrong_dtype_names_topk(ctx, case):
    with pytest.raises(m3s.M3SError) as ei:
        attention(ctx, case, topk=np.zeros((case.T, 1, 16), np.int64))
    expect(ei, m3s.M3S_ERR_DTYPE, "'topk'", "i32", "i64")


def test_innermost_stride_names_kv_cache(ctx, case):
    wide = np.zeros(case.kv_cache.shape[:3] + (512,), np.uint16)
    with pytest.raises(m3s.M3SError) as ei:
        attention(ctx, case, kv_cache=wide[..., ::2])
    expect(ei, m3s.M3S_ERR_LAYOUT, "'kv_cache'", "innermost stride")


def test_negative_stride_is_a_layout_error(ctx, case):
    with pytest.raises(m3s.M3SError) as ei:
        attention(ctx, case, q=case.q[::-1])
    expect(ei, m3s.M3S_ERR_LAYOUT, "'q'", "stride[0]")


def test_overlapping_output(ctx, case):
    out = np.zeros((1, 8, 128), np.uint16)
    bad = np.lib.stride_tricks.as_strided(out, (case.T, 8, 128), (0, 256, 2))
    with pytest.raises(m3s.M3SError) as ei:
        attention(ctx, case, out=bad)
    expect(ei, m3s.M3S_ERR_LAYOUT, "'out'", "overlaps")


def test_seq_len_beyond_max_seq_len(ctx, case):
    b = m3s.Batch(case.seq_lens, case.block_table, query_start_loc=case.qsl, max_seq_len=1000)
    with pytest.raises(m3s.M3SError) as ei:
        attention(ctx, case, batch=b)
    expect(ei, m3s.M3S_ERR_BATCH, "seq_lens[0]", "2500", "max_seq_len")


def test_topk_value_out_of_range(ctx, case):
    tk = np.full((case.T, 1, 16), -1, np.int32)
    tk[1, 0, 0] = 50                               # row 1 sees 8 blocks only
    with pytest.raises(m3s.M3SError) as ei:
        attention(ctx, case, topk=tk)
    expect(ei, m3s.M3S_ERR_RANGE, "topk[1][0][0] = 50")


def test_failed_call_writes_nothing(ctx, case):
    out = np.full((case.T, 8, 128), 0x1234, np.uint16)
    lse = np.full((case.T, 8), 7.0, np.float32)
    tk = np.full((case.T, 1, 16), -1, np.int32)
    tk[0, 0, 0] = 99
    with pytest.raises(m3s.M3SError):
        attention(ctx, case, topk=tk, out=out, lse=lse)
    assert (out == 0x1234).all() and (lse == 7.0).all()


def test_slot_beyond_cache_names_slot_mapping(ctx):
    kv = np.zeros((2, 1, 128, 256), np.uint16)
    k = np.zeros((3, 1, 128), np.uint16)
    slots = np.array([0, 256, -1], np.int64)
    with pytest.raises(m3s.M3SError) as ei:
        ctx.cache_insert(k, k, slots, kv, act_dtype="bf16", kv_dtype="bf16")
    expect(ei, m3s.M3S_ERR_RANGE, "slot_mapping[1] = 256")


def test_index_cache_must_be_contiguous(ctx, case):
    ic = np.zeros((case.index_cache.shape[0], 256, 128), np.uint16)[:, ::2]
    tk = np.zeros((case.T, 1, 16), np.int32)
    with pytest.raises(m3s.M3SError) as ei:
        ctx.index_topk(cfg_of(case), case.batch(m3s), case.iq, ic, tk, act_dtype="bf16",
                       index_dtype="bf16")
    expect(ei, m3s.M3S_ERR_LAYOUT, "'index_cache'", "contiguous")


def test_device_mismatch(ctx, case):
    q = m3s.view(case.q, "bf16")
    q.c.device = 0                                   # claim the memory is on cuda:0
    with pytest.raises(m3s.M3SError) as ei:
        attention(ctx, case, q=q)
    expect(ei, m3s.M3S_ERR_DEVICE, "'q'", "cuda:0", "host")


def test_bad_config():
    with pytest.raises(m3s.M3SError) as ei:
        m3s.layer_config(8, 1, topk=0)
    expect(ei, m3s.M3S_ERR_INVALID, "cfg.topk")
    with pytest.raises(m3s.M3SError) as ei:
        m3s.layer_config(6, 4)
    expect(ei, m3s.M3S_ERR_INVALID, "multiple of cfg.num_kv_heads")
    with pytest.raises(m3s.M3SError) as ei:
        m3s.layer_config(8, 1, topk=2, init_blocks=2, local_blocks=1)
    expect(ei, m3s.M3S_ERR_INVALID, "init_blocks")


def test_plan_step_errors(ctx):
    cfg = m3s.config_minimax_m3(1)
    with pytest.raises(m3s.M3SError) as ei:
        ctx.plan_step(cfg, [5], [3])
    expect(ei, m3s.M3S_ERR_BATCH, "desc.seq_lens[0] = 3")
    with pytest.raises(ValueError):
        ctx.plan_step(cfg, [1, 1], [5])


def test_workspace_too_small_on_cuda_is_reported_not_on_cpu(ctx, case):
    # the CPU needs no workspace: any (even empty) workspace is accepted
    attention(ctx, case)
    ws = np.zeros(0, np.uint8)
    ctx.index_topk(cfg_of(case), case.batch(m3s), case.iq, case.index_cache,
                   np.zeros((case.T, 1, 16), np.int32), act_dtype="bf16", index_dtype="bf16",
                   workspace=ws)


def test_last_error_is_cleared_by_success(ctx, case):
    with pytest.raises(m3s.M3SError):
        attention(ctx, case, q=np.zeros((case.T, 4, 128), np.uint16))
    assert "'q'" in m3s.last_error()
    attention(ctx, case)
    assert m3s.last_error() == ""


def test_context_errors():
    # no such CUDA device: M3S_ERR_UNSUPPORTED (CPU-only build), M3S_ERR_CUDA (no
    # GPU/driver) or M3S_ERR_INVALID (ordinal beyond the device count)
    with pytest.raises(m3s.M3SError) as ei:
        m3s.Context(4096)
    assert ei.value.status in (m3s.M3S_ERR_UNSUPPORTED, m3s.M3S_ERR_CUDA, m3s.M3S_ERR_INVALID)
    assert ei.value.message.startswith("m3s_context_create")
    c = m3s.Context("cpu")
    assert c.device == -1 and not c.is_cuda
    c.close()
    with pytest.raises(ValueError):
        c.plan_step(m3s.config_minimax_m3(1), [1], [1])
    c.close()  # idempotent


def test_conversion_errors(ctx, case):
    with pytest.raises(TypeError, match="explicit dtype"):
        m3s.view(np.zeros(4, np.uint16))
    with pytest.raises(TypeError, match="explicit dtype"):
        m3s.view(np.zeros(4, np.uint8))
    with pytest.raises(TypeError, match="cannot view"):
        m3s.view(np.zeros(4, np.float32), "bf16")
    with pytest.raises(ValueError, match="dimensions"):
        m3s.view(np.zeros((1, 1, 1, 1, 1), np.float32))
    with pytest.raises(TypeError):
        m3s.view([1, 2, 3])
    with pytest.raises(TypeError):
        m3s.view(np.zeros(4, np.complex64))
    # a uint16 q without act_dtype
    with pytest.raises(TypeError, match="'q'|q:"):
        ctx.sparse_attention(cfg_of(case), case.batch(m3s), case.q, case.kv_cache,
                             np.zeros((case.T, 1, 16), np.int32), case.out)
    assert m3s.view(np.zeros(3, np.float16)).dtype == m3s.M3S_F16
    assert m3s.view(np.zeros(3, np.uint16), "bf16").dtype == m3s.M3S_BF16
    assert m3s.view(np.zeros(3, np.uint8), "fp8_e5m2").dtype == m3s.M3S_E5M2
    assert m3s.view(np.zeros(3, np.int64)).dtype == m3s.M3S_I64
    assert m3s.dtype_code("float8_e4m3fn") == m3s.M3S_E4M3


def test_status_strings():
    assert m3s.status_string(m3s.M3S_ERR_SHAPE).startswith("M3S_ERR_SHAPE")
    e = m3s.M3SError(m3s.M3S_ERR_RANGE, "")
    assert str(e).startswith("M3S_ERR_RANGE: M3S_ERR_RANGE")


def test_logging_callback(ctx):
    seen = []
    c = m3s.Context(-1)
    c.set_logging(3, lambda lvl, msg: seen.append((lvl, msg)))
    c.set_logging(0)
    c.close()


def test_library_path_and_env_override(tmp_path):
    path = m3s.library_path()
    assert os.path.isfile(path)
    code = ("import m3sparse, sys; sys.stdout.write(m3sparse.library_path())")
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(m3s.__file__)))
    env = dict(os.environ, M3SPARSE_LIB=path, PYTHONPATH=pkg_root, M3SPARSE_NO_TORCH="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, cwd=str(tmp_path), check=True).stdout
    assert os.path.realpath(out) == os.path.realpath(path)
    env["M3SPARSE_LIB"] = os.path.dirname(path)       # a directory works too
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, cwd=str(tmp_path), check=True).stdout
    assert os.path.dirname(os.path.realpath(out)) == os.path.dirname(os.path.realpath(path))
    # when set, M3SPARSE_LIB is authoritative: a wrong path fails, naming it
    env["M3SPARSE_LIB"] = str(tmp_path / "nowhere" / "libm3sparse.so")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=str(tmp_path))
    assert r.returncode != 0 and "nowhere" in r.stderr and "M3SPARSE_LIB" in r.stderr


def test_batch_invariant_option():
    with m3s.Context(-1) as c:
        assert c.batch_invariant is False
        c.batch_invariant = True
        assert c.batch_invariant is True
        with pytest.raises(m3s.M3SError) as ei:  # an unknown option, through the raw call
            _check(lib().m3s_context_set_option(c.handle, 99, 0), "m3s_context_set_option")
        expect(ei, m3s.M3S_ERR_INVALID, "'opt'")
        assert c.batch_invariant is True
