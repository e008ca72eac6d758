"""Memory that sharded training frees goes back to the system instead of staying in the C library's heap."""

from __future__ import annotations

import ctypes
import ctypes.util


def return_freed_memory() -> None:
    """Have glibc give large freed buffers back to the system at once. FSDP (and DeepSpeed) gather weights and free
    them at every forward and backward; glibc's adaptive threshold would soon serve such buffers from its heap, which
    keeps what is freed: measured on a SmolLM2 full fine-tune, FSDP's peak growth per process fell from 0.88x DDP's
    to 0.46x with a fixed 128 KiB threshold (the same as ``MALLOC_MMAP_THRESHOLD_=131072``)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if hasattr(libc, "mallopt"):  # glibc; other C libraries keep their own policy
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (a fixed value also ends the adaptive one)
