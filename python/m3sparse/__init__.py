"""m3sparse: Python binding (ctypes, no compile step) of the m3sparse C library
-- MiniMax-M3 sparse attention: lightning-indexer top-k and block-sparse GQA
attention over a paged KV cache.

    import m3sparse as m3s
    ctx = m3s.Context(-1)                       # CPU reference backend; 0 = CUDA device 0
    cfg = m3s.config_minimax_m3(tp_size=1)
    ctx.index_topk(cfg, batch, iq, index_cache, topk)

The shared library is found through $M3SPARSE_LIB, a copy inside this package,
or (from a source checkout) build/ and build-gpu/ of the repository; see
``m3sparse._capi.candidate_paths``. When torch is importable, ``import
m3sparse`` also registers the torch.library operators ``torch.ops.m3sparse.*``
and provides ``m3sparse.M3SparseLayer`` (set M3SPARSE_NO_TORCH=1 to skip).
"""

import importlib.util as _ilu
import os as _os

from . import _capi
from ._capi import (  # noqa: F401
    M3S_BF16, M3S_F16, M3S_F32, M3S_E4M3, M3S_E5M2, M3S_I32, M3S_I64, M3S_HOST,
    M3S_HEAD_DIM, M3S_INDEX_DIM, M3S_BLOCK_SIZE, M3S_MAX_TOPK, M3S_MAX_HEADS,
    M3S_OK, M3S_ERR_NULL, M3S_ERR_INVALID, M3S_ERR_SHAPE, M3S_ERR_DTYPE, M3S_ERR_LAYOUT,
    M3S_ERR_RANGE, M3S_ERR_DEVICE, M3S_ERR_WORKSPACE, M3S_ERR_BATCH, M3S_ERR_UNSUPPORTED,
    M3S_ERR_NO_MEMORY, M3S_ERR_CUDA, M3S_ERR_INTERNAL,
    M3S_OP_CACHE_INSERT, M3S_OP_INDEX_INSERT, M3S_OP_INDEX_TOPK, M3S_OP_ATTENTION_DECODE,
    M3S_OP_ATTENTION_PREFILL, M3S_OP_K2Q, M3S_OP_MERGE, M3S_OP_INDEX_TOPK_CANDIDATES,
    M3S_OP_MERGE_TOPK_CANDIDATES, M3S_OP_ATTENTION_CP, M3S_OP_MERGE_N,
    M3S_LAYOUT_HEAD_MAJOR, M3S_LAYOUT_TOKEN_MAJOR, M3S_LAYOUT_STRIDED,
    LibraryNotFound, load_library, library_path,
)
from .core import (  # noqa: F401
    M3SError, TensorView, view, dtype_code, Context, get_context, Batch, Step, make_step,
    config_minimax_m3, layer_config, LayerConfig, StepPlan, SupportInfo, version,
    version_number, status_string, dtype_size, last_error,
)

__version__ = "0.2.0"

HAS_TORCH = False
TORCH_IMPORT_ERROR = None
if not _os.environ.get("M3SPARSE_NO_TORCH") and _ilu.find_spec("torch") is not None:
    try:
        from . import torch_ops  # noqa: F401  (registers torch.ops.m3sparse.*)
        from .torch_ops import M3SparseLayer, StepMeta, kv_cache_view  # noqa: F401
        HAS_TORCH = True
    except Exception as _e:  # e.g. a torch without torch.library.custom_op (< 2.4)
        import warnings as _w
        TORCH_IMPORT_ERROR = _e
        _w.warn("m3sparse: torch integration disabled: %r" % (_e,))
