"""Keep the memory freed by one CPU training step for the next (glibc's ``M_TOP_PAD``).

A CPU step allocates and frees a few hundred megabytes of particle x cell x gene tensors (at batch 512, 5
particles, two response patterns and 2,000 genes each is ~40 MB). glibc returns freed memory at the top of its heap
to the system and serves the next step's tensors from fresh pages, each of which the kernel faults in and zeroes:
~84,000 page faults per step, about a third of the step (``benchmarks/NOTES.md``). Asking glibc to keep a pad of
free memory at the top of the heap makes the next step reuse the same, already-mapped pages. PyTorch's CPU
allocator has no cache of its own (its CUDA allocator does the same thing for the GPU).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_M_TOP_PAD = -2  # mallopt parameter number, <malloc.h>
_GLIBC_DEFAULT_TOP_PAD = 128 * 1024  # mallopt(3)
HEAP_PAD_BYTES = 1 << 30


def _glibc():
    """The C library if it is glibc (``mallopt`` is glibc's), else ``None`` (macOS, Windows, musl)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@contextmanager
def reuse_freed_memory(enabled: bool = True, pad_bytes: int = HEAP_PAD_BYTES) -> Iterator[bool]:
    """Within the block, glibc keeps up to ``pad_bytes`` of freed heap memory mapped for reuse.

    Memory that a step touched stays with the process until the block ends, so the peak resident memory is the
    same (the step needed it anyway) but later steps do not fault it in again. Afterwards the pad returns to
    glibc's default (128 KiB). Yields whether the setting was applied (only on Linux with glibc).
    """
    libc = _glibc() if enabled else None
    applied = bool(libc is not None and libc.mallopt(_M_TOP_PAD, int(pad_bytes)) == 1)
    try:
        yield applied
    finally:
        if applied:
            libc.mallopt(_M_TOP_PAD, _GLIBC_DEFAULT_TOP_PAD)


def _flushing_denormals() -> bool:
    """Whether this thread's CPU flushes float denormals to zero (a float32 denormal times one reads as zero)."""
    return torch.tensor([1e-40], dtype=torch.float32).mul(1.0).item() == 0.0


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Within the block, the CPU flushes float denormals to zero; the caller's setting returns afterwards.

    Adam's weight decay drives weights on all-zero inputs (genes never expressed) into float32 denormals, which
    CPUs compute ~5x slower; flushing them changes no result measurably. The setting is process-wide (every float
    computation of this thread, the user's own numpy and Python arithmetic included), so it is restored on exit.
    """
    before = _flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)
