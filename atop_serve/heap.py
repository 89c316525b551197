"""Give freed memory back to the operating system after a large image (glibc's ``malloc_trim``). No torch.

Decoding a 49-megapixel upload takes hundreds of MB (a transparent PNG: about 0.75 GB) for a moment. glibc serves
blocks of that size from its heaps once its adaptive mmap threshold has grown, and keeps them after they are freed:
measured here, six such requests left each of the two service workers at 0.7-1.0 GB (from 0.17), and a container
with a memory limit would see that as the worker's size until it is killed. ``trim()`` returns the free pages.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from functools import lru_cache

TRIM_PIXELS = 4_000_000  # images above this many pixels are followed by a trim (a 2,000 x 2,000 RGBA: 64 MB)


@lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's malloc_trim, or None (musl, macOS, Windows: nothing to do or nothing to call)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def trim() -> bool:
    """Return free heap memory to the OS; False where the C library has no malloc_trim."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True
