"""glibc malloc settings for training on the CPU.

A training step frees and re-allocates the same large tensors every step: every gradient (the
optimiser zeroes them with `set_to_none=True`), the activations kept for backward, the matmul
outputs. glibc's malloc serves large blocks with their own `mmap` and returns freed ones to the
kernel (`munmap`, heap trimming), so the next step gets them back one zero-filled 4 KiB page
fault at a time. With 20 task experts at ViT-B width the gradients alone are 4.9 GB a step; on
our 2-core machine that was ~200k page faults and 3-4.5 s of kernel time a step against ~0.1 s
once freed memory is kept (`bench/scale.py` records the faults and kernel time of each step).

PyTorch's CUDA caching allocator keeps freed blocks for the same reason; on the CPU torch calls
plain malloc, so the policy is set in glibc itself with `mallopt`. The cost: the process keeps
the memory of its peak step instead of returning it between steps.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_NEVER = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"

_kept = False


def keep_freed_memory() -> bool:
    """Make this process's malloc keep freed memory for reuse: no block gets an mmap of its own
    (M_MMAP_MAX = 0, so large tensors come from the heap and go back to it) and the heap is never
    trimmed back to the kernel (M_TRIM_THRESHOLD = -1; any finite threshold is crossed when a step
    frees several GB at once, as the batched experts' stacked weights are). Process-wide and not undone.
    Returns False, changing nothing, where the C library is not glibc (musl, macOS, Windows)."""
    global _kept
    if _kept:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    # mallopt returns 1 on success; each setting stands on its own
    _kept = bool(libc.mallopt(M_MMAP_MAX, 0)) & bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_NEVER))
    return _kept
