"""The Python face of the C API: errors, tensor views, contexts, batches and one
wrapper per operation.

Arrays are passed without copies: numpy arrays (host memory) and torch tensors
(CPU or CUDA) become ``m3s_tensor`` views of their memory (data pointer, shape,
strides in elements, dtype, device). numpy has no bfloat16 or fp8 types: pass
``uint16`` arrays for bf16 and ``uint8`` arrays for e4m3/e5m2 together with an
explicit dtype (``view(a, "bf16")`` or the ``act_dtype`` / ``kv_dtype`` /
``index_dtype`` keywords of the operations), or use ml_dtypes' ``bfloat16``,
``float8_e4m3fn`` and ``float8_e5m2`` arrays when ml_dtypes is installed.

The library validates every argument; a failing call raises ``M3SError`` whose
``status`` is the ``m3s_status`` and whose message is ``m3s_last_error()`` (it
names the argument, the rule broken and the value seen).
"""

import ctypes
import math
import sys
import threading

from . import _capi as C
from ._capi import lib

__all__ = [
    "M3SError", "TensorView", "view", "dtype_code", "Context", "get_context", "Batch",
    "Step", "make_step", "config_minimax_m3", "layer_config", "LayerConfig", "StepPlan",
    "SupportInfo", "version", "version_number", "status_string", "dtype_size",
]

LayerConfig = C.m3s_layer_config
StepPlan = C.m3s_step_plan


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
class M3SError(RuntimeError):
    """A library call returned a status other than M3S_OK.

    ``status``: the m3s_status value (int); ``status_name``: e.g. "M3S_ERR_SHAPE";
    ``message``: m3s_last_error() of the failing call; ``function``: the C
    function called."""

    def __init__(self, status, message, function=None):
        self.status = int(status)
        self.status_name = C.STATUS_NAMES.get(self.status, "M3S_ERR_?")
        self.message = message
        self.function = function
        super().__init__("%s: %s" % (self.status_name, message or status_string(status)))


def status_string(status):
    s = lib().m3s_status_string(int(status))
    return s.decode() if s else ""


def last_error():
    s = lib().m3s_last_error()
    return s.decode(errors="replace") if s else ""


def _check(st, fn=None):
    if st != C.M3S_OK:
        # read the thread-local text right away, on the calling thread
        raise M3SError(st, last_error(), fn)


def version():
    return lib().m3s_version().decode()


def version_number():
    return lib().m3s_version_number()


def dtype_size(dt):
    return lib().m3s_dtype_size(dtype_code(dt))


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------
_NAME_TO_CODE = {
    "bf16": C.M3S_BF16, "bfloat16": C.M3S_BF16,
    "f16": C.M3S_F16, "fp16": C.M3S_F16, "float16": C.M3S_F16, "half": C.M3S_F16,
    "f32": C.M3S_F32, "fp32": C.M3S_F32, "float32": C.M3S_F32, "float": C.M3S_F32,
    "e4m3": C.M3S_E4M3, "fp8": C.M3S_E4M3, "fp8_e4m3": C.M3S_E4M3, "float8_e4m3fn": C.M3S_E4M3,
    "e5m2": C.M3S_E5M2, "fp8_e5m2": C.M3S_E5M2, "float8_e5m2": C.M3S_E5M2,
    "i32": C.M3S_I32, "int32": C.M3S_I32,
    "i64": C.M3S_I64, "int64": C.M3S_I64,
}
# containers that carry another dtype's bits only with an explicit dtype
_RAW_CONTAINERS = {"uint8": 1, "int8": 1, "uint16": 2, "int16": 2}


def dtype_code(dt):
    """m3s_dtype value of ``dt``: an int code, a name ("bf16", "e4m3", "fp8_e5m2",
    "float16", ...), a torch dtype or a numpy dtype with a native meaning."""
    if isinstance(dt, bool):
        raise TypeError("not a dtype: %r" % (dt,))
    if isinstance(dt, int):
        if dt in C.DTYPE_SIZES:
            return dt
        raise ValueError("unknown m3s dtype code %d" % dt)
    name = dt if isinstance(dt, str) else _foreign_dtype_name(dt)
    code = _NAME_TO_CODE.get(name.lower()) if name else None
    if code is None:
        raise TypeError("dtype %r has no m3sparse equivalent (one of %s)"
                        % (dt, ", ".join(sorted(set(C.DTYPE_NAMES.values())))))
    return code


def _foreign_dtype_name(dt):
    s = str(dt)
    if s.startswith("torch."):
        return s[len("torch."):]
    name = getattr(dt, "name", None)  # numpy / ml_dtypes dtype
    return name if isinstance(name, str) else s


class TensorView:
    """An m3s_tensor view of an array's memory; keeps the array alive.

    ``c`` is the ctypes ``m3s_tensor``; ``obj`` the array viewed."""

    __slots__ = ("c", "obj")

    def __init__(self, c, obj):
        self.c = c
        self.obj = obj

    @property
    def dtype(self):
        return self.c.dtype

    @property
    def device(self):
        return self.c.device

    @property
    def shape(self):
        return tuple(self.c.shape[: self.c.ndim])

    @property
    def stride(self):
        return tuple(self.c.stride[: self.c.ndim])

    def __repr__(self):
        return "TensorView(%r)" % (self.c,)


def _is_torch(x):
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _is_numpy(x):
    np = sys.modules.get("numpy")
    return np is not None and isinstance(x, np.ndarray)


def _resolve_dtype(native_name, itemsize, explicit, what):
    native_name = native_name.lower()
    code = _NAME_TO_CODE.get(native_name)
    if explicit is None:
        if code is None:
            if native_name in _RAW_CONTAINERS:
                raise TypeError(
                    "%s: a %s array needs an explicit dtype (%s): numpy has no bf16/fp8 types"
                    % (what, native_name, "bf16 or f16" if itemsize == 2 else "e4m3 or e5m2"))
            raise TypeError("%s: dtype %s has no m3sparse equivalent" % (what, native_name))
        return code
    want = dtype_code(explicit)
    if code == want:
        return want
    if native_name in _RAW_CONTAINERS and C.DTYPE_SIZES[want] == itemsize:
        return want
    raise TypeError("%s: cannot view a %s array as %s" % (what, native_name,
                                                          C.DTYPE_NAMES[want]))


# Descriptors of torch tensors already viewed, by everything they hold
# (pointer, shape, strides, dtype and the dtype asked for, device): engines
# pass the same caches, block tables and metadata buffers on every call, and
# building an m3s_tensor field by field led a cProfile of the eager index
# top-k on the H200 machine (six per call, ~6.7 us each under the profiler;
# docs/perf-notes.md, session 12). A hit returns a copy, so callers never
# share one. Cleared when full.
_TORCH_VIEWS = {}
_TORCH_VIEWS_MAX = 1024


def view(x, dtype=None, *, name="tensor"):
    """A TensorView of a numpy array or a torch tensor (no copy).

    dtype: needed for raw containers (uint16 -> "bf16"/"f16", uint8 ->
    "e4m3"/"e5m2", e.g. vLLM's uint8 fp8 caches); otherwise it must agree with
    the array's own dtype. Strides are converted to elements."""
    if isinstance(x, TensorView):
        if dtype is not None and dtype_code(dtype) != x.c.dtype:
            raise TypeError("%s: view is %s, not %s" % (name, C.DTYPE_NAMES.get(x.c.dtype),
                                                        C.DTYPE_NAMES[dtype_code(dtype)]))
        return x
    if _is_torch(x):
        key = (x.data_ptr(), x.shape, x.stride(), x.dtype, dtype, x.get_device())
        try:
            c = _TORCH_VIEWS.get(key)
        except TypeError:  # an unhashable dtype argument: no cache
            key, c = None, None
        if c is None:
            c = _view_new(x, dtype, name).c
            if key is not None:
                if len(_TORCH_VIEWS) >= _TORCH_VIEWS_MAX:
                    _TORCH_VIEWS.clear()
                _TORCH_VIEWS[key] = c
        return TensorView(C.m3s_tensor.from_buffer_copy(c), x)
    return _view_new(x, dtype, name)


def _view_new(x, dtype, name):
    """view() without the cache."""
    if _is_torch(x):
        native = str(x.dtype)[len("torch."):]
        itemsize = x.element_size()
        code = _resolve_dtype(native, itemsize, dtype, name)
        dev = x.device
        if dev.type == "cpu":
            device = C.M3S_HOST
        elif dev.type == "cuda":
            device = dev.index if dev.index is not None else 0
        else:
            raise ValueError("%s: tensors on %s are not supported (cpu or cuda)" % (name, dev))
        shape, strides, ptr = tuple(x.shape), tuple(x.stride()), x.data_ptr()
    elif _is_numpy(x):
        itemsize = x.dtype.itemsize
        code = _resolve_dtype(x.dtype.name, itemsize, dtype, name)
        device = C.M3S_HOST
        shape = x.shape
        strides = []
        for s in x.strides:
            if s % itemsize:
                raise ValueError("%s: byte stride %d is not a multiple of the item size %d"
                                 % (name, s, itemsize))
            strides.append(s // itemsize)
        ptr = x.ctypes.data
    else:
        raise TypeError("%s: expected a numpy array, a torch tensor or a TensorView, got %s"
                        % (name, type(x).__name__))
    if len(shape) > C.M3S_MAX_DIMS:
        raise ValueError("%s: %d dimensions, at most %d" % (name, len(shape), C.M3S_MAX_DIMS))
    t = C.m3s_tensor()
    t.data = ptr or None
    t.dtype = code
    t.ndim = len(shape)
    for i, (n, s) in enumerate(zip(shape, strides)):
        t.shape[i] = int(n)
        t.stride[i] = int(s)
    t.device = device
    return TensorView(t, x)


def _opt(x, name, dtype=None):
    """View for an operand; ``dtype`` is a hint applied to raw containers only."""
    if x is None:
        return None
    if isinstance(x, TensorView):
        return x
    if dtype is not None:
        native = (str(x.dtype)[len("torch."):] if _is_torch(x)
                  else getattr(getattr(x, "dtype", None), "name", ""))
        if native.lower() not in _RAW_CONTAINERS:
            dtype = None
    return view(x, dtype, name=name)


def _ptr(v):
    return ctypes.byref(v.c) if v is not None else None


def _host_ints(x):
    """Host values of a small int array (list/tuple, numpy, CPU torch); None if
    the data lives on a device."""
    if isinstance(x, TensorView):
        x = x.obj
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [int(a) for a in x]
    if _is_torch(x):
        return x.tolist() if x.device.type == "cpu" else None
    if _is_numpy(x):
        return x.tolist()
    return [int(a) for a in x]


# ---------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------
def config_minimax_m3(tp_size=1):
    """The MiniMax-M3 layer of one tensor-parallel rank (tp 1, 2, 4, 8)."""
    cfg = lib().m3s_config_minimax_m3(int(tp_size))
    if cfg.num_q_heads == 0:
        raise ValueError("config_minimax_m3: tp_size must be 1, 2, 4 or 8, got %r" % (tp_size,))
    return cfg


def layer_config(num_q_heads, num_kv_heads, topk=16, init_blocks=0, local_blocks=1,
                 softmax_scale=None, validate=True):
    """A layer config with run-time head counts and selection parameters
    (D = Di = B = 128). Validated by the library unless validate=False."""
    cfg = C.m3s_layer_config(
        int(num_q_heads), int(num_kv_heads), int(topk), int(init_blocks), int(local_blocks),
        float(1.0 / math.sqrt(128.0) if softmax_scale is None else softmax_scale),
        C.M3S_HEAD_DIM, C.M3S_INDEX_DIM, C.M3S_BLOCK_SIZE)
    if validate:
        _check(lib().m3s_config_validate(ctypes.byref(cfg)), "m3s_config_validate")
    return cfg


# ---------------------------------------------------------------------------
# Batches and steps
# ---------------------------------------------------------------------------
class Batch:
    """A set of requests (m3s_batch). See the header's "Batches" section.

    seq_lens:          i32 [num_reqs] (0 = padded request)
    block_table:       i32 [num_reqs, max_pages] (main K/V cache; None if the
                       operation does not read it, e.g. index_topk)
    index_block_table: i32 [num_reqs, max_pages'] (defaults to block_table)
    query_start_loc:   i32 [num_reqs + 1] for ragged batches (uniform_q_len=0)
    uniform_q_len:     > 0 for a uniform decode batch
    num_tokens, max_q_len, max_seq_len: host bounds; derived from host data
                       when the metadata lives on the host, required (except
                       max_q_len, which defaults to num_tokens) on a device.
    cp:                context parallel (m3s_cp): None, or (cp_size, cp_rank,
                       blocks_per_interleave); the block tables then list
                       only this rank's blocks (SPEC section 10)
    """

    def __init__(self, seq_lens, block_table=None, index_block_table=None, *,
                 query_start_loc=None, uniform_q_len=0, num_tokens=None, max_q_len=None,
                 max_seq_len=None, num_reqs=None, cp=None):
        self.cp = tuple(int(x) for x in cp) if cp is not None else (0, 0, 0)
        self.seq_lens = seq_lens
        self.block_table = block_table
        self.index_block_table = index_block_table if index_block_table is not None \
            else block_table
        self.query_start_loc = query_start_loc
        self.uniform_q_len = int(uniform_q_len)
        if num_reqs is None:
            num_reqs = _shape0(seq_lens)
        self.num_reqs = int(num_reqs)
        if self.uniform_q_len > 0:
            if num_tokens is None:
                num_tokens = self.num_reqs * self.uniform_q_len
            if max_q_len is None:
                max_q_len = self.uniform_q_len
        else:
            if query_start_loc is None and self.num_reqs > 0:
                raise ValueError("Batch: a ragged batch (uniform_q_len == 0) needs "
                                 "query_start_loc")
            qsl = None
            if (num_tokens is None or max_q_len is None) and query_start_loc is not None:
                qsl = _host_ints(query_start_loc)
            if num_tokens is None:
                if qsl is None and self.num_reqs:
                    raise ValueError("Batch: num_tokens is required when query_start_loc "
                                     "lives on a device")
                num_tokens = qsl[self.num_reqs] - qsl[0] if self.num_reqs else 0
            if max_q_len is None:
                if qsl is not None and self.num_reqs:
                    max_q_len = max(qsl[r + 1] - qsl[r] for r in range(self.num_reqs))
                else:
                    max_q_len = num_tokens
        if max_seq_len is None:
            sl = _host_ints(seq_lens) if seq_lens is not None else []
            if sl is None:
                raise ValueError("Batch: max_seq_len is required when seq_lens lives on a "
                                 "device (an upper bound, e.g. max_model_len)")
            max_seq_len = max(sl[: self.num_reqs]) if self.num_reqs and sl else 0
        self.num_tokens = int(num_tokens)
        self.max_q_len = int(max_q_len)
        self.max_seq_len = int(max_seq_len)

    @classmethod
    def empty(cls):
        """The empty part of a step (no requests, no tokens, no tensors)."""
        return cls(None, num_reqs=0, num_tokens=0, max_q_len=0, max_seq_len=0,
                   uniform_q_len=0)

    def _c(self, keep):
        b = C.m3s_batch()
        b.num_reqs = self.num_reqs
        b.num_tokens = self.num_tokens
        b.uniform_q_len = self.uniform_q_len
        b.max_q_len = self.max_q_len
        b.max_seq_len = self.max_seq_len
        b.cp = C.m3s_cp(*self.cp)
        for field in ("query_start_loc", "seq_lens", "block_table", "index_block_table"):
            x = getattr(self, field)
            if x is None:
                continue
            v = _opt(x, "batch." + field)
            keep.append(v)
            setattr(b, field, v.c)
        return b

    def __repr__(self):
        return ("Batch(num_reqs=%d, num_tokens=%d, uniform_q_len=%d, max_q_len=%d, "
                "max_seq_len=%d)" % (self.num_reqs, self.num_tokens, self.uniform_q_len,
                                     self.max_q_len, self.max_seq_len))


def _shape0(x):
    if x is None:
        return 0
    if isinstance(x, TensorView):
        return x.c.shape[0]
    if isinstance(x, (list, tuple)):
        return len(x)
    return int(x.shape[0])


class Step:
    """A forward step (m3s_step): the decode part (rows [0, Td)) then the
    prefill part (rows [Td, Td + Tp)). Either may be None (empty)."""

    def __init__(self, decode=None, prefill=None):
        self.decode = decode if decode is not None else Batch.empty()
        self.prefill = prefill if prefill is not None else Batch.empty()

    @property
    def num_tokens(self):
        return self.decode.num_tokens + self.prefill.num_tokens

    def _c(self, keep):
        s = C.m3s_step()
        s.decode = self.decode._c(keep)
        s.prefill = self.prefill._c(keep)
        return s

    def __repr__(self):
        return "Step(decode=%r, prefill=%r)" % (self.decode, self.prefill)


def make_step(plan, query_start_loc, seq_lens, block_table, index_block_table=None,
              max_seq_len=None):
    """The Step of a plan (``Context.plan_step``) over whole-step metadata
    (numpy arrays or torch tensors, host or device): decode requests are rows
    [0, num_decodes) of seq_lens / the block tables (uniform, q_len =
    plan.decode_q_len); prefill requests the following num_prefills rows, with
    query_start_loc[num_decodes : num_reqs + 1] (its first entry is the first
    prefill row; no copy). max_seq_len overrides plan.max_seq_len (e.g.
    max_model_len for a CUDA-graph capture)."""
    nd, npf = plan.num_decodes, plan.num_prefills
    msl = plan.max_seq_len if max_seq_len is None else int(max_seq_len)
    ibt = index_block_table if index_block_table is not None else block_table
    decode = prefill = None
    if nd:
        decode = Batch(seq_lens[:nd], block_table[:nd], ibt[:nd], uniform_q_len=plan.decode_q_len,
                       num_tokens=plan.num_decode_tokens, max_q_len=plan.decode_q_len,
                       max_seq_len=msl, num_reqs=nd)
    if npf:
        prefill = Batch(seq_lens[nd:nd + npf], block_table[nd:nd + npf], ibt[nd:nd + npf],
                        query_start_loc=query_start_loc[nd:nd + npf + 1],
                        num_tokens=plan.num_prefill_tokens, max_q_len=plan.max_prefill_q_len,
                        max_seq_len=msl, num_reqs=npf)
    return Step(decode, prefill)


# ---------------------------------------------------------------------------
# Contexts
# ---------------------------------------------------------------------------
class SupportInfo(tuple):
    """(supported, kernel, reason) of m3s_query_support."""

    __slots__ = ()

    def __new__(cls, supported, kernel, reason):
        return tuple.__new__(cls, (supported, kernel, reason))

    supported = property(lambda self: self[0])
    kernel = property(lambda self: self[1])
    reason = property(lambda self: self[2])

    def __repr__(self):
        return "SupportInfo(supported=%r, kernel=%r, reason=%r)" % tuple(self)


_OPS = {"cache_insert": C.M3S_OP_CACHE_INSERT, "index_insert": C.M3S_OP_INDEX_INSERT,
        "index_cache_insert": C.M3S_OP_INDEX_INSERT, "index_topk": C.M3S_OP_INDEX_TOPK,
        "attention_decode": C.M3S_OP_ATTENTION_DECODE,
        "attention_prefill": C.M3S_OP_ATTENTION_PREFILL, "k2q": C.M3S_OP_K2Q,
        "merge": C.M3S_OP_MERGE, "index_topk_candidates": C.M3S_OP_INDEX_TOPK_CANDIDATES,
        "merge_topk_candidates": C.M3S_OP_MERGE_TOPK_CANDIDATES,
        "attention_cp": C.M3S_OP_ATTENTION_CP, "merge_n": C.M3S_OP_MERGE_N}
_LAYOUTS = {"head_major": C.M3S_LAYOUT_HEAD_MAJOR, "token_major": C.M3S_LAYOUT_TOKEN_MAJOR,
            "strided": C.M3S_LAYOUT_STRIDED}


def _device_index(device):
    """-1 for the CPU, the ordinal for CUDA; accepts ints, "cpu", "cuda", "cuda:1"
    and torch.device."""
    if device is None:
        return C.M3S_HOST
    if isinstance(device, int):
        return device if device >= 0 else C.M3S_HOST
    s = str(device)
    if s == "cpu":
        return C.M3S_HOST
    if s.startswith("cuda"):
        if ":" in s:
            return int(s.split(":", 1)[1])
        torch = sys.modules.get("torch")
        return torch.cuda.current_device() if torch is not None else 0
    raise ValueError("unknown device %r" % (device,))


class Context:
    """An m3s_context: device < 0 (or "cpu") is the CPU reference backend,
    device >= 0 (or "cuda:N") the CUDA backend on that ordinal.

    Operations take numpy arrays / torch tensors / TensorViews, and the
    keywords ``workspace`` (uint8 array/tensor on the context's device; when
    omitted on a CUDA context it is allocated with torch, sized by
    m3s_workspace_size) and ``stream`` (a cudaStream_t as int, a
    torch.cuda.Stream, or None for torch's current stream of the device when
    torch is loaded, else the legacy default stream)."""

    def __init__(self, device=-1):
        self._ptr = None
        self._log_cb = None
        dev = _device_index(device)
        p = ctypes.c_void_p()
        _check(lib().m3s_context_create(dev, ctypes.byref(p)), "m3s_context_create")
        self._ptr = p
        self.device = lib().m3s_context_device(p)

    # -- lifetime --
    def close(self):
        if self._ptr is not None and self._ptr.value:
            lib().m3s_context_destroy(self._ptr)
        self._ptr = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    @property
    def handle(self):
        if self._ptr is None:
            raise ValueError("the context is closed")
        return self._ptr

    @property
    def is_cuda(self):
        return self.device >= 0

    def __repr__(self):
        return "Context(device=%d)" % self.device

    def set_logging(self, level, callback=None):
        """level 0..3; callback(level:int, msg:str) or None for stderr."""
        if callback is None:
            cb = ctypes.cast(None, C.m3s_log_fn)
        else:
            cb = C.m3s_log_fn(lambda lvl, msg, user: callback(lvl, msg.decode(errors="replace")))
        self._log_cb = cb  # keep the trampoline alive
        _check(lib().m3s_context_set_logging(self.handle, int(level), cb, None),
               "m3s_context_set_logging")

    @property
    def batch_invariant(self):
        """M3S_OPT_BATCH_INVARIANT: when True, every output row depends only on
        its own request, never on the rest of the batch or its host bounds
        (CUDA then never splits a row's attention across CTAs)."""
        v = ctypes.c_int64()
        _check(lib().m3s_context_get_option(self.handle, C.M3S_OPT_BATCH_INVARIANT,
                                            ctypes.byref(v)), "m3s_context_get_option")
        return bool(v.value)

    @batch_invariant.setter
    def batch_invariant(self, on):
        _check(lib().m3s_context_set_option(self.handle, C.M3S_OPT_BATCH_INVARIANT,
                                            1 if on else 0), "m3s_context_set_option")

    # -- sizes, planning, support --
    def workspace_size(self, cfg, max_tokens, max_seq_len):
        out = ctypes.c_size_t()
        _check(lib().m3s_workspace_size(self.handle, ctypes.byref(cfg), int(max_tokens),
                                        int(max_seq_len), ctypes.byref(out)),
               "m3s_workspace_size")
        return out.value

    def alloc_workspace(self, nbytes):
        """A uint8 buffer of nbytes on the context's device (None for 0 bytes).
        CUDA: a torch tensor from the caching allocator (256-byte aligned)."""
        nbytes = int(nbytes)
        if nbytes <= 0:
            return None
        if self.device >= 0:
            torch = _need_torch("a CUDA workspace")
            ws = torch.empty(nbytes, dtype=torch.uint8, device="cuda:%d" % self.device)
            if ws.data_ptr() % 256:
                raise RuntimeError("workspace from torch is not 256-byte aligned")
            return ws
        np = sys.modules.get("numpy")
        if np is not None:
            return np.empty(nbytes, dtype=np.uint8)
        return (ctypes.c_uint8 * nbytes)()

    def plan_step(self, cfg, query_lens, seq_lens, num_spec_tokens=0):
        """m3s_plan_step on host query lengths and seq_lens (sequences, numpy or
        CPU torch). Returns an m3s_step_plan (fields as attributes, as_dict())."""
        ql = _host_ints(query_lens)
        sl = _host_ints(seq_lens)
        if ql is None or sl is None:
            raise ValueError("plan_step needs host copies of query_lens and seq_lens")
        if len(ql) != len(sl):
            raise ValueError("plan_step: %d query lengths but %d seq_lens" % (len(ql), len(sl)))
        n = len(ql)
        qa = (ctypes.c_int32 * max(n, 1))(*ql)
        sa = (ctypes.c_int32 * max(n, 1))(*sl)
        desc = C.m3s_step_desc(n, qa, sa, int(num_spec_tokens))
        plan = C.m3s_step_plan()
        _check(lib().m3s_plan_step(self.handle, ctypes.byref(cfg), ctypes.byref(desc),
                                   ctypes.byref(plan)), "m3s_plan_step")
        return plan

    def query_support(self, cfg, op, act_dtype="bf16", kv_dtype="bf16", index_dtype="bf16",
                      per_slot_scales=False, layout="head_major"):
        q = C.m3s_support_query(
            _OPS[op] if isinstance(op, str) else int(op), dtype_code(act_dtype),
            dtype_code(kv_dtype), dtype_code(index_dtype), 1 if per_slot_scales else 0,
            _LAYOUTS[layout] if isinstance(layout, str) else int(layout))
        info = C.m3s_support_info()
        _check(lib().m3s_query_support(self.handle, ctypes.byref(cfg), ctypes.byref(q),
                                       ctypes.byref(info)), "m3s_query_support")
        return SupportInfo(bool(info.supported), info.kernel.decode(), info.reason.decode())

    def k2q_csr_rows(self, batch):
        keep = []
        b = batch._c(keep)
        out = ctypes.c_int64()
        _check(lib().m3s_k2q_csr_rows(self.handle, ctypes.byref(b), ctypes.byref(out)),
               "m3s_k2q_csr_rows")
        return out.value

    # -- execution resources --
    def _exec(self, workspace, stream, keep, need=None):
        """need: callable giving the workspace bytes (used when workspace is None)."""
        ex = C.m3s_exec()
        if workspace is None and need is not None and self.device >= 0:
            workspace = self.alloc_workspace(need())
        if workspace is not None:
            if isinstance(workspace, tuple):
                ptr, nbytes = workspace
            elif _is_torch(workspace):
                ptr, nbytes = workspace.data_ptr(), workspace.numel() * workspace.element_size()
            elif _is_numpy(workspace):
                ptr, nbytes = workspace.ctypes.data, workspace.nbytes
            else:  # a ctypes buffer
                ptr, nbytes = ctypes.addressof(workspace), ctypes.sizeof(workspace)
            keep.append(workspace)
            ex.workspace = ptr or None
            ex.workspace_bytes = int(nbytes)
        ex.stream = _stream_handle(stream, self.device)
        return ex

    def _scales(self, scales, keep):
        if scales is None:
            return None
        if isinstance(scales, dict):
            ks, vs = scales.get("k_scale"), scales.get("v_scale")
        else:
            ks, vs = scales
        s = C.m3s_kv_scales()
        for field, x in (("k_scale", ks), ("v_scale", vs)):
            if x is None:
                continue  # data == NULL: scale 1.0
            if isinstance(x, (int, float)):
                x = self._scalar_f32(float(x), keep)
            v = _opt(x, "scales." + field)
            keep.append(v)
            setattr(s, field, v.c)
        return s

    def _scalar_f32(self, value, keep):
        if self.device >= 0:
            torch = _need_torch("a CUDA scale")
            return torch.full((), value, dtype=torch.float32, device="cuda:%d" % self.device)
        cell = ctypes.c_float(value)
        keep.append(cell)
        t = C.m3s_tensor()
        t.data = ctypes.addressof(cell)
        t.dtype = C.M3S_F32
        t.ndim = 0
        t.device = C.M3S_HOST
        return TensorView(t, cell)

    def _need(self, cfg, *batches):
        def f():
            return max([0] + [self.workspace_size(cfg, b.num_tokens, b.max_seq_len)
                              for b in batches if b.num_reqs or b.num_tokens])
        return f

    # -- operations --
    def cache_insert(self, k, v, slot_mapping, kv_cache, scales=None, *, act_dtype=None,
                     kv_dtype=None, workspace=None, stream=None):
        """Write k, v [T, Hkv, 128] into kv_cache [P, Hkv, 128, 256] at the slots
        (slot < 0 skips). scales: None or (k_scale, v_scale) for fp8 caches,
        each None (1.0), a float or an f32 scalar / [Hkv, P*128] array."""
        keep = []
        a = [_opt(k, "k", act_dtype), _opt(v, "v", act_dtype), _opt(slot_mapping, "slot_mapping"),
             _opt(kv_cache, "kv_cache", kv_dtype)]
        sc = self._scales(scales, keep)
        ex = self._exec(workspace, stream, keep)
        _check(lib().m3s_cache_insert(self.handle, *map(_ptr, a),
                                      ctypes.byref(sc) if sc is not None else None,
                                      ctypes.byref(ex)), "m3s_cache_insert")
        return kv_cache

    def index_cache_insert(self, ik, slot_mapping, index_cache, *, act_dtype=None,
                           index_dtype=None, workspace=None, stream=None):
        """Write index keys ik [T, 128] into index_cache [P, 128, 128]."""
        keep = []
        a = [_opt(ik, "ik", act_dtype), _opt(slot_mapping, "slot_mapping"),
             _opt(index_cache, "index_cache", index_dtype)]
        ex = self._exec(workspace, stream, keep)
        _check(lib().m3s_index_cache_insert(self.handle, *map(_ptr, a), ctypes.byref(ex)),
               "m3s_index_cache_insert")
        return index_cache

    def index_topk(self, cfg, batch, iq, index_cache, topk, *, act_dtype=None,
                   index_dtype=None, workspace=None, stream=None):
        """SPEC section 3: topk [T, Hkv, K] i32 (any strides) from iq [T, Hkv, 128]."""
        keep = []
        b = batch._c(keep)
        a = [_opt(iq, "iq", act_dtype), _opt(index_cache, "index_cache", index_dtype),
             _opt(topk, "topk")]
        ex = self._exec(workspace, stream, keep, self._need(cfg, batch))
        _check(lib().m3s_index_topk(self.handle, ctypes.byref(cfg), ctypes.byref(b),
                                    *map(_ptr, a), ctypes.byref(ex)), "m3s_index_topk")
        return topk

    def sparse_attention(self, cfg, batch, q, kv_cache, topk, out, lse=None, scales=None, *,
                         act_dtype=None, kv_dtype=None, workspace=None, stream=None):
        """SPEC section 4: out [T, Hq, 128] (q's dtype), lse [T, Hq] f32 or None."""
        keep = []
        b = batch._c(keep)
        qv, kvv = _opt(q, "q", act_dtype), _opt(kv_cache, "kv_cache", kv_dtype)
        tv, ov, lv = _opt(topk, "topk"), _opt(out, "out", act_dtype), _opt(lse, "lse")
        sc = self._scales(scales, keep)
        ex = self._exec(workspace, stream, keep, self._need(cfg, batch))
        _check(lib().m3s_sparse_attention(
            self.handle, ctypes.byref(cfg), ctypes.byref(b), _ptr(qv), _ptr(kvv),
            ctypes.byref(sc) if sc is not None else None, _ptr(tv), _ptr(ov), _ptr(lv),
            ctypes.byref(ex)), "m3s_sparse_attention")
        return out, lse

    def step_forward(self, cfg, step, q, iq, kv_cache, index_cache, topk, out, lse=None,
                     scales=None, *, act_dtype=None, kv_dtype=None, index_dtype=None,
                     workspace=None, stream=None):
        """Index top-k then attention for the decode and prefill parts of a
        Step; whole-step tensors (decode rows first)."""
        keep = []
        s = step._c(keep)
        qv, iqv = _opt(q, "q", act_dtype), _opt(iq, "iq", act_dtype)
        kvv, icv = _opt(kv_cache, "kv_cache", kv_dtype), _opt(index_cache, "index_cache",
                                                              index_dtype)
        tv, ov, lv = _opt(topk, "topk"), _opt(out, "out", act_dtype), _opt(lse, "lse")
        sc = self._scales(scales, keep)
        ex = self._exec(workspace, stream, keep, self._need(cfg, step.decode, step.prefill))
        _check(lib().m3s_step_forward(
            self.handle, ctypes.byref(cfg), ctypes.byref(s), _ptr(qv), _ptr(iqv), _ptr(kvv),
            ctypes.byref(sc) if sc is not None else None, _ptr(icv), _ptr(tv), _ptr(ov),
            _ptr(lv), ctypes.byref(ex)), "m3s_step_forward")
        return topk, out, lse

    def build_k2q_csr(self, cfg, batch, topk, row_ptr, q_indices, q_slot, q_count, *,
                      workspace=None, stream=None):
        """SPEC section 7: row_ptr [Hkv, R+1], q_indices/q_slot [Hkv, T*K],
        q_count [T, Hkv] (i32, contiguous outputs)."""
        keep = []
        b = batch._c(keep)
        a = [_opt(topk, "topk"), _opt(row_ptr, "row_ptr"), _opt(q_indices, "q_indices"),
             _opt(q_slot, "q_slot"), _opt(q_count, "q_count")]
        ex = self._exec(workspace, stream, keep)
        _check(lib().m3s_build_k2q_csr(self.handle, ctypes.byref(cfg), ctypes.byref(b),
                                       *map(_ptr, a), ctypes.byref(ex)), "m3s_build_k2q_csr")
        return row_ptr, q_indices, q_slot, q_count

    def k2q_attention(self, cfg, batch, q, kv_cache, row_ptr, q_indices, q_slot, part_out,
                      part_lse, scales=None, *, act_dtype=None, kv_dtype=None, workspace=None,
                      stream=None):
        """Per-(block, query) partials: part_out [T, Hq, K, 128] f32,
        part_lse [T, Hq, K] f32."""
        keep = []
        b = batch._c(keep)
        qv, kvv = _opt(q, "q", act_dtype), _opt(kv_cache, "kv_cache", kv_dtype)
        rest = [_opt(row_ptr, "row_ptr"), _opt(q_indices, "q_indices"), _opt(q_slot, "q_slot"),
                _opt(part_out, "part_out"), _opt(part_lse, "part_lse")]
        sc = self._scales(scales, keep)
        ex = self._exec(workspace, stream, keep)
        _check(lib().m3s_k2q_attention(
            self.handle, ctypes.byref(cfg), ctypes.byref(b), _ptr(qv), _ptr(kvv),
            ctypes.byref(sc) if sc is not None else None, *map(_ptr, rest), ctypes.byref(ex)),
            "m3s_k2q_attention")
        return part_out, part_lse

    def combine_partials(self, cfg, part_out, part_lse, q_count, out, lse=None, *,
                         act_dtype=None, workspace=None, stream=None):
        keep = []
        a = [_opt(part_out, "part_out"), _opt(part_lse, "part_lse"), _opt(q_count, "q_count"),
             _opt(out, "out", act_dtype), _opt(lse, "lse")]
        ex = self._exec(workspace, stream, keep)
        _check(lib().m3s_combine_partials(self.handle, ctypes.byref(cfg), *map(_ptr, a),
                                          ctypes.byref(ex)), "m3s_combine_partials")
        return out, lse

    def merge_attn_states(self, out_a, lse_a, out_b, lse_b, out, lse=None, *, act_dtype=None,
                          workspace=None, stream=None):
        """vLLM's merge_attn_states: out/lse of the union of two disjoint key sets."""
        keep = []
        a = [_opt(out_a, "out_a", act_dtype), _opt(lse_a, "lse_a"),
             _opt(out_b, "out_b", act_dtype), _opt(lse_b, "lse_b"),
             _opt(out, "out", act_dtype), _opt(lse, "lse")]
        ex = self._exec(workspace, stream, keep)
        _check(lib().m3s_merge_attn_states(self.handle, *map(_ptr, a), ctypes.byref(ex)),
               "m3s_merge_attn_states")
        return out, lse

    # -- context parallel (SPEC section 10) --
    def index_topk_candidates(self, cfg, batch, iq, index_cache, cand_ids, cand_scores, *,
                              act_dtype=None, index_dtype=None, workspace=None, stream=None):
        """This rank's candidates: cand_ids [T, Hkv, K] i32, cand_scores [T, Hkv, K] f32."""
        keep = []
        b = batch._c(keep)
        a = [_opt(iq, "iq", act_dtype), _opt(index_cache, "index_cache", index_dtype),
             _opt(cand_ids, "cand_ids"), _opt(cand_scores, "cand_scores")]
        ex = self._exec(workspace, stream, keep, self._need(cfg, batch))
        _check(lib().m3s_index_topk_candidates(self.handle, ctypes.byref(cfg), ctypes.byref(b),
                                               *map(_ptr, a), ctypes.byref(ex)),
               "m3s_index_topk_candidates")
        return cand_ids, cand_scores

    def merge_topk_candidates(self, cfg, batch, cand_ids, cand_scores, topk, *, workspace=None,
                              stream=None):
        """The global top-k from the all-gathered [cp, T, Hkv, K] candidates."""
        keep = []
        b = batch._c(keep)
        a = [_opt(cand_ids, "cand_ids"), _opt(cand_scores, "cand_scores"), _opt(topk, "topk")]
        ex = self._exec(workspace, stream, keep)
        _check(lib().m3s_merge_topk_candidates(self.handle, ctypes.byref(cfg), ctypes.byref(b),
                                               *map(_ptr, a), ctypes.byref(ex)),
               "m3s_merge_topk_candidates")
        return topk

    def merge_attn_states_n(self, outs, lses, out, lse=None, *, act_dtype=None, workspace=None,
                            stream=None):
        """out/lse of N partial results outs [N, T, H, 128], lses [N, T, H]."""
        keep = []
        a = [_opt(outs, "outs", act_dtype), _opt(lses, "lses"), _opt(out, "out", act_dtype),
             _opt(lse, "lse")]
        ex = self._exec(workspace, stream, keep)
        _check(lib().m3s_merge_attn_states_n(self.handle, *map(_ptr, a), ctypes.byref(ex)),
               "m3s_merge_attn_states_n")
        return out, lse


def _need_torch(what):
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch  # noqa: F811
        except ImportError:
            raise RuntimeError("m3sparse: %s needs torch" % what) from None
    return torch


def _stream_handle(stream, device):
    if stream is None:
        torch = sys.modules.get("torch")
        if device >= 0 and torch is not None:
            return torch.cuda.current_stream(device).cuda_stream or None
        return None
    if isinstance(stream, int):
        return stream or None
    h = getattr(stream, "cuda_stream", None)
    if h is None:
        raise TypeError("stream must be an int (cudaStream_t), a torch.cuda.Stream or None")
    return h or None


_contexts = {}
_contexts_lock = threading.Lock()


def get_context(device=-1):
    """The shared Context of a device (created on first use, kept for the
    life of the process): -1/"cpu" for the CPU, N/"cuda:N" for CUDA."""
    dev = _device_index(device)
    with _contexts_lock:
        ctx = _contexts.get(dev)
        if ctx is None:
            ctx = _contexts[dev] = Context(dev)
        return ctx
