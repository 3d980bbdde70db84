"""ctypes mirror of include/m3sparse.h: constants, structures, the shared library
loader and the function prototypes.

Every ``ctypes.Structure`` below copies its C struct field by field, in order,
with the same C types (enums are ``int``; ``size_t`` is ``c_size_t``), so the
native alignment rules of ctypes give the same layout as the C compiler.
``python/tests/test_structs.py`` checks sizes and offsets against the header
(compiled with the system C compiler when one is available) and through real
calls that return or fill these structures.
"""

import ctypes
import glob
import os
import sys
import threading
import warnings

# ---------------------------------------------------------------------------
# Constants (header values)
# ---------------------------------------------------------------------------
M3S_VERSION_NUMBER = 2000  # the header this binding mirrors (0.2.0)

M3S_OK = 0
M3S_ERR_NULL = 1
M3S_ERR_INVALID = 2
M3S_ERR_SHAPE = 3
M3S_ERR_DTYPE = 4
M3S_ERR_LAYOUT = 5
M3S_ERR_RANGE = 6
M3S_ERR_DEVICE = 7
M3S_ERR_WORKSPACE = 8
M3S_ERR_BATCH = 9
M3S_ERR_UNSUPPORTED = 10
M3S_ERR_NO_MEMORY = 11
M3S_ERR_CUDA = 12
M3S_ERR_INTERNAL = 13

STATUS_NAMES = {
    0: "M3S_OK", 1: "M3S_ERR_NULL", 2: "M3S_ERR_INVALID", 3: "M3S_ERR_SHAPE",
    4: "M3S_ERR_DTYPE", 5: "M3S_ERR_LAYOUT", 6: "M3S_ERR_RANGE", 7: "M3S_ERR_DEVICE",
    8: "M3S_ERR_WORKSPACE", 9: "M3S_ERR_BATCH", 10: "M3S_ERR_UNSUPPORTED",
    11: "M3S_ERR_NO_MEMORY", 12: "M3S_ERR_CUDA", 13: "M3S_ERR_INTERNAL",
}

M3S_OPT_BATCH_INVARIANT = 1  # m3s_option

M3S_BF16 = 0
M3S_F16 = 1
M3S_F32 = 2
M3S_E4M3 = 3
M3S_E5M2 = 4
M3S_I32 = 5
M3S_I64 = 6

DTYPE_SIZES = {M3S_BF16: 2, M3S_F16: 2, M3S_F32: 4, M3S_E4M3: 1, M3S_E5M2: 1,
               M3S_I32: 4, M3S_I64: 8}
DTYPE_NAMES = {M3S_BF16: "bf16", M3S_F16: "f16", M3S_F32: "f32", M3S_E4M3: "e4m3",
               M3S_E5M2: "e5m2", M3S_I32: "i32", M3S_I64: "i64"}

M3S_MAX_DIMS = 4
M3S_HOST = -1

M3S_HEAD_DIM = 128
M3S_INDEX_DIM = 128
M3S_BLOCK_SIZE = 128
M3S_MAX_TOPK = 64
M3S_MAX_HEADS = 256

M3S_OP_CACHE_INSERT = 0
M3S_OP_INDEX_INSERT = 1
M3S_OP_INDEX_TOPK = 2
M3S_OP_ATTENTION_DECODE = 3
M3S_OP_ATTENTION_PREFILL = 4
M3S_OP_K2Q = 5
M3S_OP_MERGE = 6
M3S_OP_INDEX_TOPK_CANDIDATES = 7
M3S_OP_MERGE_TOPK_CANDIDATES = 8
M3S_OP_ATTENTION_CP = 9
M3S_OP_MERGE_N = 10

M3S_LAYOUT_HEAD_MAJOR = 0
M3S_LAYOUT_TOKEN_MAJOR = 1
M3S_LAYOUT_STRIDED = 2

# ---------------------------------------------------------------------------
# Structures
# ---------------------------------------------------------------------------
_i64x4 = ctypes.c_int64 * M3S_MAX_DIMS


class m3s_tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int),     # m3s_dtype
        ("ndim", ctypes.c_int),
        ("shape", _i64x4),
        ("stride", _i64x4),
        ("device", ctypes.c_int),
    ]

    def __repr__(self):
        n = max(0, min(self.ndim, M3S_MAX_DIMS))
        return "m3s_tensor(data=0x%x, dtype=%s, shape=%s, stride=%s, device=%d)" % (
            self.data or 0, DTYPE_NAMES.get(self.dtype, "?"), list(self.shape[:n]),
            list(self.stride[:n]), self.device)


class m3s_layer_config(ctypes.Structure):
    _fields_ = [
        ("num_q_heads", ctypes.c_int),
        ("num_kv_heads", ctypes.c_int),
        ("topk", ctypes.c_int),
        ("init_blocks", ctypes.c_int),
        ("local_blocks", ctypes.c_int),
        ("softmax_scale", ctypes.c_float),
        ("head_dim", ctypes.c_int),
        ("index_dim", ctypes.c_int),
        ("block_size", ctypes.c_int),
    ]

    def __repr__(self):
        return ("LayerConfig(num_q_heads=%d, num_kv_heads=%d, topk=%d, init_blocks=%d, "
                "local_blocks=%d, softmax_scale=%g)" % (
                    self.num_q_heads, self.num_kv_heads, self.topk, self.init_blocks,
                    self.local_blocks, self.softmax_scale))


class m3s_exec(ctypes.Structure):
    _fields_ = [
        ("workspace", ctypes.c_void_p),
        ("workspace_bytes", ctypes.c_size_t),
        ("stream", ctypes.c_void_p),
    ]


class m3s_cp(ctypes.Structure):
    _fields_ = [
        ("cp_size", ctypes.c_int),
        ("cp_rank", ctypes.c_int),
        ("blocks_per_interleave", ctypes.c_int),
    ]


class m3s_batch(ctypes.Structure):
    _fields_ = [
        ("num_reqs", ctypes.c_int),
        ("num_tokens", ctypes.c_int),
        ("uniform_q_len", ctypes.c_int),
        ("max_q_len", ctypes.c_int),
        ("max_seq_len", ctypes.c_int64),
        ("query_start_loc", m3s_tensor),
        ("seq_lens", m3s_tensor),
        ("block_table", m3s_tensor),
        ("index_block_table", m3s_tensor),
        ("cp", m3s_cp),
    ]


class m3s_step(ctypes.Structure):
    _fields_ = [
        ("decode", m3s_batch),
        ("prefill", m3s_batch),
    ]


class m3s_step_desc(ctypes.Structure):
    _fields_ = [
        ("num_reqs", ctypes.c_int),
        ("query_lens", ctypes.POINTER(ctypes.c_int32)),
        ("seq_lens", ctypes.POINTER(ctypes.c_int32)),
        ("num_spec_tokens", ctypes.c_int),
    ]


class m3s_step_plan(ctypes.Structure):
    _fields_ = [
        ("num_decodes", ctypes.c_int),
        ("num_prefills", ctypes.c_int),
        ("decode_q_len", ctypes.c_int),
        ("num_decode_tokens", ctypes.c_int),
        ("num_prefill_tokens", ctypes.c_int),
        ("num_tokens", ctypes.c_int),
        ("max_prefill_q_len", ctypes.c_int),
        ("max_seq_len", ctypes.c_int64),
        ("csr_rows", ctypes.c_int64),
        ("workspace_bytes", ctypes.c_size_t),
    ]

    def as_dict(self):
        return {name: getattr(self, name) for name, _ in self._fields_}

    def __repr__(self):
        return "StepPlan(%s)" % ", ".join("%s=%d" % kv for kv in self.as_dict().items())


class m3s_kv_scales(ctypes.Structure):
    _fields_ = [
        ("k_scale", m3s_tensor),
        ("v_scale", m3s_tensor),
    ]


class m3s_support_query(ctypes.Structure):
    _fields_ = [
        ("op", ctypes.c_int),           # m3s_op
        ("act_dtype", ctypes.c_int),    # m3s_dtype
        ("kv_dtype", ctypes.c_int),
        ("index_dtype", ctypes.c_int),
        ("per_slot_scales", ctypes.c_int),
        ("layout", ctypes.c_int),       # m3s_cache_layout
    ]


class m3s_support_info(ctypes.Structure):
    _fields_ = [
        ("supported", ctypes.c_int),
        ("kernel", ctypes.c_char * 64),
        ("reason", ctypes.c_char * 160),
    ]


# The structures the tests check, by C name.
STRUCTS = {
    "m3s_tensor": m3s_tensor,
    "m3s_layer_config": m3s_layer_config,
    "m3s_exec": m3s_exec,
    "m3s_cp": m3s_cp,
    "m3s_batch": m3s_batch,
    "m3s_step": m3s_step,
    "m3s_step_desc": m3s_step_desc,
    "m3s_step_plan": m3s_step_plan,
    "m3s_kv_scales": m3s_kv_scales,
    "m3s_support_query": m3s_support_query,
    "m3s_support_info": m3s_support_info,
}

m3s_log_fn = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

# ---------------------------------------------------------------------------
# Loading the shared library
# ---------------------------------------------------------------------------
_LIB_NAMES = ("libm3sparse.so", "libm3sparse.so.0", "libm3sparse.dylib", "m3sparse.dll")
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def candidate_paths():
    """Where the library is looked for, in order:

    1. ``$M3SPARSE_LIB``: the library file itself, or a directory holding it.
       When set, it is the only place looked at (no silent fallback to
       another build);
    2. a copy inside the package (``m3sparse/libm3sparse.so``, e.g. copied
       there before ``pip install``);
    3. from a source checkout (``python/m3sparse`` inside the repository):
       ``build/libm3sparse.so``, ``build-gpu/libm3sparse.so``, then any other
       ``build*/libm3sparse.so`` of the repository root, in name order.
    """
    out = []
    env = os.environ.get("M3SPARSE_LIB")
    if env:
        if os.path.isdir(env):
            return [os.path.join(env, n) for n in _LIB_NAMES]
        return [env]
    out.extend(os.path.join(_PKG_DIR, n) for n in _LIB_NAMES)
    root = os.path.dirname(os.path.dirname(_PKG_DIR))  # repo root when run from python/
    if os.path.isfile(os.path.join(root, "include", "m3sparse.h")):
        named = [os.path.join(root, d) for d in ("build", "build-gpu")]
        others = sorted(p for p in glob.glob(os.path.join(root, "build*"))
                        if os.path.isdir(p) and p not in named)
        for d in named + others:
            out.append(os.path.join(d, "libm3sparse.so"))
    return out


_lib = None
_lib_path = None
_lib_lock = threading.Lock()


class LibraryNotFound(OSError):
    pass


def _declare(lib):
    c = ctypes
    T = c.POINTER(m3s_tensor)
    CFG = c.POINTER(m3s_layer_config)
    B = c.POINTER(m3s_batch)
    EX = c.POINTER(m3s_exec)
    SC = c.POINTER(m3s_kv_scales)
    CTX = c.c_void_p
    protos = {
        "m3s_version": (c.c_char_p, []),
        "m3s_version_number": (c.c_int, []),
        "m3s_status_string": (c.c_char_p, [c.c_int]),
        "m3s_last_error": (c.c_char_p, []),
        "m3s_dtype_size": (c.c_size_t, [c.c_int]),
        "m3s_dtype_name": (c.c_char_p, [c.c_int]),
        "m3s_tensor_make": (m3s_tensor, [c.c_void_p, c.c_int, c.c_int,
                                         c.POINTER(c.c_int64), c.c_int]),
        "m3s_tensor_strided": (m3s_tensor, [c.c_void_p, c.c_int, c.c_int,
                                            c.POINTER(c.c_int64), c.POINTER(c.c_int64),
                                            c.c_int]),
        "m3s_tensor_narrow": (m3s_tensor, [T, c.c_int64, c.c_int64]),
        "m3s_config_minimax_m3": (m3s_layer_config, [c.c_int]),
        "m3s_config_validate": (c.c_int, [CFG]),
        "m3s_context_create": (c.c_int, [c.c_int, c.POINTER(c.c_void_p)]),
        "m3s_context_destroy": (None, [CTX]),
        "m3s_context_device": (c.c_int, [CTX]),
        "m3s_context_set_logging": (c.c_int, [CTX, c.c_int, m3s_log_fn, c.c_void_p]),
        "m3s_context_set_option": (c.c_int, [CTX, c.c_int, c.c_int64]),
        "m3s_context_get_option": (c.c_int, [CTX, c.c_int, c.POINTER(c.c_int64)]),
        "m3s_plan_step": (c.c_int, [CTX, CFG, c.POINTER(m3s_step_desc),
                                    c.POINTER(m3s_step_plan)]),
        "m3s_workspace_size": (c.c_int, [CTX, CFG, c.c_int64, c.c_int64,
                                         c.POINTER(c.c_size_t)]),
        "m3s_cache_insert": (c.c_int, [CTX, T, T, T, T, SC, EX]),
        "m3s_index_cache_insert": (c.c_int, [CTX, T, T, T, EX]),
        "m3s_index_topk": (c.c_int, [CTX, CFG, B, T, T, T, EX]),
        "m3s_sparse_attention": (c.c_int, [CTX, CFG, B, T, T, SC, T, T, T, EX]),
        "m3s_step_forward": (c.c_int, [CTX, CFG, c.POINTER(m3s_step), T, T, T, SC, T, T, T,
                                       T, EX]),
        "m3s_k2q_csr_rows": (c.c_int, [CTX, B, c.POINTER(c.c_int64)]),
        "m3s_build_k2q_csr": (c.c_int, [CTX, CFG, B, T, T, T, T, T, EX]),
        "m3s_k2q_attention": (c.c_int, [CTX, CFG, B, T, T, SC, T, T, T, T, T, EX]),
        "m3s_combine_partials": (c.c_int, [CTX, CFG, T, T, T, T, T, EX]),
        "m3s_merge_attn_states": (c.c_int, [CTX, T, T, T, T, T, T, EX]),
        "m3s_cp_local_block": (c.c_int, [c.POINTER(m3s_cp), c.c_int64, c.POINTER(c.c_int64)]),
        "m3s_index_topk_candidates": (c.c_int, [CTX, CFG, B, T, T, T, T, EX]),
        "m3s_merge_topk_candidates": (c.c_int, [CTX, CFG, B, T, T, T, EX]),
        "m3s_merge_attn_states_n": (c.c_int, [CTX, T, T, T, T, EX]),
        "m3s_query_support": (c.c_int, [CTX, CFG, c.POINTER(m3s_support_query),
                                        c.POINTER(m3s_support_info)]),
    }
    for name, (res, args) in protos.items():
        f = getattr(lib, name)
        f.restype = res
        f.argtypes = args
    return lib


def _warn_if_shadowing(loaded):
    """A copy inside the package (left by an earlier ``pip install``, also via
    setuptools' ``python/build``) is tried before the repository's builds:
    say so when one of those is newer than the copy that was loaded."""
    if os.environ.get("M3SPARSE_LIB") or os.path.dirname(loaded) != _PKG_DIR:
        return
    newer = [p for p in candidate_paths()
             if os.path.dirname(p) != _PKG_DIR and os.path.isfile(p)
             and os.path.getmtime(p) > os.path.getmtime(loaded)]
    if newer:
        warnings.warn(
            "m3sparse: loaded the package's copy %s, but %s is newer: the copy may be stale "
            "(remove it, and python/build, before `pip install ./python` again, or set "
            "M3SPARSE_LIB)" % (loaded, newer[0]), RuntimeWarning, stacklevel=3)


def load_library(path=None):
    """Load (once) and return the ctypes handle of libm3sparse. ``path``
    overrides the search (see ``candidate_paths``)."""
    global _lib, _lib_path
    with _lib_lock:
        if _lib is not None and path is None:
            return _lib
        tried = []
        for p in ([path] if path else candidate_paths()):
            if not os.path.exists(p):
                tried.append(p + " (absent)")
                continue
            try:
                lib = ctypes.CDLL(os.path.abspath(p))
            except OSError as e:
                tried.append("%s (%s)" % (p, e))
                continue
            _declare(lib)
            _lib, _lib_path = lib, os.path.abspath(p)
            if not path:
                _warn_if_shadowing(_lib_path)
            return lib
        raise LibraryNotFound(
            "m3sparse: could not load libm3sparse. Build it (cmake -S . -B build && cmake "
            "--build build), then set M3SPARSE_LIB=/path/to/libm3sparse.so or copy the "
            "library into the m3sparse package directory (%s). Tried:\n  %s"
            % (_PKG_DIR, "\n  ".join(tried) or "(nothing)"))


def lib():
    return _lib if _lib is not None else load_library()


def library_path():
    """Absolute path of the loaded library (loads it if needed)."""
    lib()
    return _lib_path


__all__ = [n for n in dir(sys.modules[__name__]) if n.startswith(("m3s_", "M3S_"))]
