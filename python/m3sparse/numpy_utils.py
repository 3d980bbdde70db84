"""numpy helpers for the dtypes numpy lacks: bf16 as uint16 bits, fp8 (OCP
e4m3fn / e5m2) as uint8 bytes. Pure numpy, independent of the C library."""

import numpy as np

__all__ = ["bf16_bits", "bf16_to_f32", "f16_bits", "fp8_table", "fp8_bits", "fp8_to_f32"]


def bf16_bits(x):
    """float -> bf16 bits (uint16), round to nearest even; NaN stays NaN."""
    f = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    u = f.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(f)
    if nan.any():
        r = np.where(nan, ((u >> 16) | 0x40).astype(np.uint16), r)
    return r


def bf16_to_f32(bits):
    """bf16 bits (uint16 array) -> float32."""
    b = np.ascontiguousarray(np.asarray(bits, dtype=np.uint16))
    return (b.astype(np.uint32) << 16).view(np.float32)


def f16_bits(x):
    """float -> IEEE half bits (uint16)."""
    return np.asarray(x, dtype=np.float16).view(np.uint16)


def fp8_table(kind="e4m3"):
    """float32[256]: the value of each fp8 byte (NaN for NaN codes)."""
    code = np.arange(256, dtype=np.int64)
    sign = np.where(code & 0x80, -1.0, 1.0)
    if kind == "e4m3":
        e, m, bias, mbits = (code >> 3) & 0xF, code & 0x7, 7, 3
    elif kind == "e5m2":
        e, m, bias, mbits = (code >> 2) & 0x1F, code & 0x3, 15, 2
    else:
        raise ValueError("kind must be e4m3 or e5m2")
    val = np.where(e == 0, m / float(1 << mbits) * 2.0 ** (1 - bias),
                   (1.0 + m / float(1 << mbits)) * 2.0 ** (e - bias))
    val = sign * val
    if kind == "e4m3":
        val = np.where((code & 0x7F) == 0x7F, np.nan, val)
    else:
        val = np.where((code & 0x7F) == 0x7C, sign * np.inf, val)
        val = np.where((code & 0x7F) > 0x7C, np.nan, val)
    return val.astype(np.float32)


def fp8_to_f32(b, kind="e4m3"):
    return fp8_table(kind)[np.asarray(b, dtype=np.uint8)]


def fp8_bits(x, kind="e4m3"):
    """float -> fp8 byte: round to nearest even, saturating to +-max (448 for
    e4m3, 57344 for e5m2); NaN -> the NaN code."""
    x = np.asarray(x, dtype=np.float64)
    last = 0x7E if kind == "e4m3" else 0x7B   # largest finite positive code
    vals = fp8_table(kind)[: last + 1].astype(np.float64)  # increasing
    a = np.abs(x)
    a_c = np.where(np.isnan(a), 0.0, np.minimum(a, vals[-1]))
    hi = np.clip(np.searchsorted(vals, a_c, side="left"), 0, last)
    lo = np.clip(hi - 1, 0, last)
    dhi, dlo = vals[hi] - a_c, a_c - vals[lo]
    pick_lo = (dlo < dhi) | ((dlo == dhi) & (lo % 2 == 0))
    code = np.where(pick_lo, lo, hi).astype(np.uint8)
    code = np.where(np.signbit(x), code | 0x80, code).astype(np.uint8)
    return np.where(np.isnan(x), np.uint8(0x7F), code).astype(np.uint8)
