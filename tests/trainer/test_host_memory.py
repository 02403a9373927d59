"""kdjax.host_memory: with freed memory kept, a compiled program's fresh buffers stop faulting
from the second call on; a user's own allocator setting wins; the `kdjax` command applies it."""

import sys

import pytest

from kdjax.host_memory import keep_freed_memory, users_own_setting
from tests.python_process import run_python

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

# A jitted program whose 64 MB output is allocated afresh by every call: the share of the output's
# pages that fault during the eighth call (with freed memory kept, glibc reuses its blocks once
# the heap has settled, after a few calls).
FAULTED_SHARE = """
import resource
import jax, jax.numpy as jnp
x = jnp.ones((16, 1024, 1024), jnp.float32)
program = jax.jit(lambda x: jnp.cos(x) * 2.0)
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    program(x).block_until_ready()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults * resource.getpagesize() / x.nbytes)
"""


def faulted_share(keep: bool) -> float:
    setup = "from kdjax.host_memory import keep_freed_memory\nassert keep_freed_memory()\n"
    return float(run_python((setup if keep else "") + FAULTED_SHARE).split()[-1])


def test_kept_memory_stops_the_page_faults_of_fresh_buffers():
    assert faulted_share(keep=False) > 0.75   # glibc's default: a fresh mmap per call
    assert faulted_share(keep=True) < 0.1


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
                        "from kdjax import cli\n"
                        "with mock.patch.object(cli, 'keep_freed_memory') as keep:\n"
                        "    cli.main(['train', '--config=/nonexistent/config.py', "
                        "'--workdir=/nonexistent'])\n"
                        "print(keep.call_count)\n")
    assert stdout.split()[-1] == "1"
