"""kdjax.runtime.host_memory: with freed memory kept, a worker thread's large blocks are reused instead of
faulting their pages in afresh; a user's own allocator setting wins; the `kdjax` command applies
it. (The effect on a compiled train step is measured by benchmarks/step.py.)"""

import sys

import pytest

from kdjax.runtime.host_memory import keep_freed_memory, users_own_setting
from tests.python_process import run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# A worker thread (as XLA's, which allocate a compiled program's buffers) allocates, touches and
# frees a 256 MB block four times: the share of the block's pages that fault on the last touch.
# Plain C calls, so nothing else allocates in between and the count does not depend on timing.
FAULTED_SHARE = """
import ctypes, resource, threading
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size, shares = 256 << 20, []

def allocate_touch_free():
    for _ in range(4):
        block = libc.malloc(size)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        libc.memset(block, 1, size)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        shares.append(faults * resource.getpagesize() / size)
        libc.free(block)

worker = threading.Thread(target=allocate_touch_free)
worker.start()
worker.join()
print(shares[-1])
"""


def faulted_share(keep: bool) -> float:
    setup = "from kdjax.runtime.host_memory import keep_freed_memory\nassert keep_freed_memory()\n"
    return float(run_python((setup if keep else "") + FAULTED_SHARE).split()[-1])


def test_kept_memory_stops_the_page_faults_of_fresh_blocks():
    assert faulted_share(keep=False) > 0.9   # glibc's default: a fresh mmap per block
    assert faulted_share(keep=True) < 0.01


@pytest.mark.parametrize("environ", [{"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
                                     {"MALLOC_ARENA_MAX": "4"}, {"MALLOC_TRIM_THRESHOLD_": "0"}])
def test_a_users_own_setting_wins(environ):
    assert users_own_setting(environ)
    assert not keep_freed_memory(environ)


def test_other_tunables_are_not_an_allocator_setting():
    assert not users_own_setting({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F", "PATH": "/bin"})


def test_the_kdjax_command_applies_it():
    # A command that fails at once (no such config): the setting is made first, whatever follows.
    stdout = run_python("from unittest import mock\n"
                        "from kdjax.commands import main as cli\n"
                        "from kdjax.runtime import platform\n"
                        "with mock.patch.object(platform, 'keep_freed_memory') as keep:\n"
                        "    cli.main(['train', '--config=/nonexistent/config.py', "
                        "'--workdir=/nonexistent'])\n"
                        "print(keep.call_count)\n")
    assert stdout.split()[-1] == "1"
