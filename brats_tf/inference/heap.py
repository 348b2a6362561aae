"""Keep freed memory for reuse while whole-volume inference runs (issue 14).

Layer-wise inference allocates and frees arrays of 40 MB to 2 GB over and over: every
layer's output, every block's input tensor. glibc serves each allocation above 32 MB with a
fresh mmap and returns it to the kernel when freed, so every one of them is page-faulted in
again. On this machine a fresh page costs ~1 s per GB: profiled, model A at paper widths took
79 s, and 54 s with glibc told to keep freed memory (BUILD_NOTES, issue 14). Inside `reused_heap()` glibc serves
large allocations from its heap and keeps what is freed for the next one; on leaving, the
settings are restored and `malloc_trim` hands the free pages back to the kernel.

Only where the C library is glibc (Linux); elsewhere it does nothing.
"""

import contextlib
import ctypes
import ctypes.util

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# glibc's defaults, restored on leaving (glibc's dynamic mmap threshold stays off once set)
DEFAULT_TRIM_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536
# While inside: free memory at the heap's top is kept up to this much (bytes, mallopt's int
# maximum) instead of trimmed.
KEPT_BYTES = 2 ** 31 - 1


def _glibc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()
_depth = 0   # nested `reused_heap` scopes (the ensemble's models inside a segment run)


@contextlib.contextmanager
def reused_heap():
    """Large allocations come from glibc's heap and stay there when freed, until the
    outermost scope ends (then the free pages go back to the kernel)."""
    global _depth
    if _LIBC is None:
        yield
        return
    if _depth == 0:
        _LIBC.mallopt(M_MMAP_MAX, 0)
        _LIBC.mallopt(M_TRIM_THRESHOLD, KEPT_BYTES)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _LIBC.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            _LIBC.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            _LIBC.malloc_trim(0)
