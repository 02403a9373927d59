"""The C allocator setting that kdjax's commands make before JAX starts: freed host memory is kept
for reuse instead of being handed back to the kernel.

An XLA CPU program allocates its temporaries and outputs afresh on every call, gigabytes per
train step. glibc serves a large block with a fresh ``mmap`` and unmaps it when it is freed; a
worker thread's arena grows in 64 MB heaps and falls back to ``mmap`` above that whatever the
thresholds say. So every 4 KB page of those buffers faults and is zeroed by the kernel again on
every step, a large share of the step on a small CPU (``benchmarks/NOTES.md`` item 51). With one
arena, no ``mmap`` for allocations
and no trimming, the step's buffers come from one heap that is reused from the second step on,
and the faults stop. The input pipeline's tf.data threads, which then share that arena, delivered
the same images/s.

The price: the process keeps the peak of its heap until it exits, which for a training process
is what it needs again at the next step. The setting is glibc's (``mallopt``); elsewhere, or when
the user has chosen an allocator setting of their own through ``GLIBC_TUNABLES`` or a
``MALLOC_*`` variable, nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

# mallopt parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

# (parameter, value): every thread allocates from the main arena, which grows by brk and reuses
# its free blocks; no block is served by mmap; freed memory at the top is never returned (-1 is
# "no trimming" in mallopt(3)).
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))

USER_SETTING_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                          "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def users_own_setting(environ: Mapping[str, str]) -> bool:
    """Whether the environment chooses glibc's allocator settings itself."""
    return ("glibc.malloc." in environ.get("GLIBC_TUNABLES", "")
            or any(name in environ for name in USER_SETTING_VARIABLES))


def _glibc():
    """The process's own symbols when its C library is glibc (which has ``mallopt``), else None.
    Read from the running process rather than looked up by name, which would start ``ldconfig``."""
    try:
        process = ctypes.CDLL(None)
        process.gnu_get_libc_version  # noqa: B018 (present in glibc only)
        return process
    except (OSError, AttributeError):
        return None


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> bool:
    """Has glibc keep freed memory for reuse (see the module docstring); returns whether it did.

    Call it before JAX starts its CPU backend: threads that already hold an arena keep it. Not
    applied on a C library other than glibc or when ``environ`` has an allocator setting of the
    user's own (:func:`users_own_setting`).
    """
    if users_own_setting(environ):
        return False
    libc = _glibc()
    if libc is None:
        return False
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in SETTINGS)
