"""Host memory under glibc: keeping a streaming conversion's resident memory at about one
tensor, and handing the compiler's working memory back after compiling the train step.

The converter allocates and frees one tensor after another (tens of MB to ~1 GB each at 65B).
glibc's default malloc raises its mmap threshold to the size of the last large block freed,
after which such tensors come from the heap arenas and their pages stay resident when freed:
RSS creeps up tensor by tensor. `bound_heap()` fixes the threshold (blocks of 1 MB and more are
mapped and unmapped on their own), `return_freed_memory()` trims what the arenas hold. The
train step's compilation leaves its working memory in those arenas too, which
`backend.compile_step` trims the same way. All are no-ops where glibc is not the allocator.
"""

import ctypes

_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD = 1 << 20


def libc():
    """glibc, or None where it is not the C library."""
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def bound_heap() -> bool:
    """Serve every allocation of MMAP_THRESHOLD bytes or more by its own mapping, returned to the
    OS on free (process-wide; costs a page fault per page of each new big array)."""
    c = libc()
    try:
        return bool(c and c.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except AttributeError:
        return False


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps per-thread arenas otherwise)."""
    c = libc()
    try:
        if c:
            c.malloc_trim(0)
    except AttributeError:
        pass
