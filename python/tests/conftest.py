"""Test setup: import the m3sparse package from this checkout (python/), so
the tests run from the repository root without installing anything:

    python3 -m pip install numpy pytest
    M3SPARSE_LIB=$PWD/build/libm3sparse.so python3 -m pytest -q python/tests

Without M3SPARSE_LIB the package finds build/ or build-gpu/ of the checkout.
torch-dependent tests skip themselves when torch is absent, GPU tests when
CUDA is."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PKG_ROOT = os.path.dirname(HERE)
if PKG_ROOT not in sys.path:
    sys.path.insert(0, PKG_ROOT)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

REPO_ROOT = os.path.dirname(PKG_ROOT)
HEADER = os.path.join(REPO_ROOT, "include", "m3sparse.h")


def pytest_report_header(config):
    try:
        import m3sparse
        return "m3sparse %s, library %s, torch integration %s" % (
            m3sparse.version(), m3sparse.library_path(),
            "on" if m3sparse.HAS_TORCH else "off")
    except Exception as e:  # reported, the tests then fail with the details
        return "m3sparse: library not loaded (%s)" % (e,)
