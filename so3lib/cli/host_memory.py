"""The host allocator of a so3lib process (set once by the command's entry point, never on import).

XLA's CPU runtime allocates every temporary buffer of a compiled step with malloc and frees it when the step
ends; its temporaries are one block of tens of MiB, above glibc's largest mmap threshold (32 MiB), so glibc maps
it afresh for every step and unmaps it after, and each step faults the same pages in again: measured on 2 cores,
about 40 % of a SchNet train step's CPU time was system time (``benchmarks/cpu_runtime.py``). With ``mallopt``
this process allocates from its heap only (no mmap) and never trims the heap top, so freed memory is reused; the
resident memory then stays at the run's peak instead of shrinking between steps.

Skipped where the C library is not glibc, where the user already set glibc's malloc tunables
(``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``GLIBC_TUNABLES``), and with ``SO3LIB_MALLOC=system``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # <malloc.h>
TRIM_THRESHOLD_BYTES = 2**31 - 1  # mallopt takes an int: never trim the heap top
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")


def keep_freed_memory(environ: dict[str, str] | None = None) -> bool:
    """No mmap-backed blocks and no heap trimming for this process's allocations (see the module); True where
    glibc took both settings."""
    env = os.environ if environ is None else environ
    if env.get("SO3LIB_MALLOC", "").lower() == "system" or any(k in env for k in USER_SETTINGS):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt  # glibc (and musl, which lacks these parameters: mallopt returns 0 there)
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)) and bool(mallopt(M_MMAP_MAX, 0))
