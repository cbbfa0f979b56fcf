"""Keep freed memory in the process for reuse (glibc malloc), instead of returning it to the OS.

PyTorch's CPU tensors come straight from ``malloc``. glibc serves a block of more than
``M_MMAP_THRESHOLD`` bytes (128 KiB, raised as large blocks are freed) with a fresh ``mmap``
and unmaps it on free, and returns the top of the heap to the OS beyond ``M_TRIM_THRESHOLD``: a
training step that allocates and frees megabytes of activations many times over then faults in
fresh zeroed pages again and again: a ``shapes`` training step (``bench/train.py``, 2 cores)
faulted in 31,000-60,000 pages per step with the defaults and 0-2 with the settings here. What
that costs varied between runs on the same machine: from about 20% of the step (ours 646 vs
511 ms, OPT 729 vs 576 ms, two runs minutes apart) to within noise later (ours 463 vs 448 ms, OPT
557 vs 552 ms, back to back).

The settings are glibc's own knobs (``mallopt``), the ones its ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` environment variables set; blocks of up to 32 MiB (glibc's maximum)
come from the heap, and freed memory stays mapped. A process's resident memory then stays at its
peak instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit machines
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: 2 GiB


def keep_freed_memory() -> bool:
    """Apply the settings (module doc); False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if not ok:
        log.warning("mallopt refused the settings; malloc keeps its defaults")
    return ok
