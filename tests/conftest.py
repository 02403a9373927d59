"""Test-wide set-up: eight simulated CPU devices for the sharding tests (skipped where an
accelerator has fewer), float32 matrix products on accelerators, quiet TensorFlow, and one
compilation cache for the whole session."""

import os

import jax
import pytest

from kdjax.runtime.compilation import CACHE_DIR_ENV, default_cache_dir, use_persistent_cache
from kdjax.runtime.cpu_flags import add_cpu_flags
from tests.devices import skip_unless_devices

# Must be set before jax is imported anywhere in the test process. The tests' programs are tiny
# and run for milliseconds, while XLA's backend optimisation (LLVM codegen) of each takes seconds:
# at level 0 the same HLO programs compile faster and tests/losses with test_convolution.py ran
# in 277 s against 361 s. Benchmarks and training runs keep the default level.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                                   "--xla_backend_optimization_level=0")
# The `kdjax` command's own CPU flags too: the tests then compile the programs that training
# compiles, and the `kdjax` subprocesses they start (which would add the flags themselves) share
# the compilation cache with them.
add_cpu_flags(os.environ)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# On a GPU, float32 matrix products and convolutions run in TF32 unless asked otherwise (relative
# errors near 1e-3); the tests hold float32 formulas to float64 and PyTorch CPU references, so
# they ask for float32 (JAX_DEFAULT_MATMUL_PRECISION, where set, decides instead).
if os.environ["JAX_PLATFORMS"] != "cpu" and "JAX_DEFAULT_MATMUL_PRECISION" not in os.environ:
    jax.config.update("jax_default_matmul_precision", "highest")
# Many tests compile the same tiny train and eval steps, in this process and in the `kdjax`
# subprocesses they start (which inherit the variable); JAX's persistent cache compiles each once,
# in the same user cache directory as the `kdjax` command's (its keys tell programs apart). JAX is
# imported already and read no variable: the cache is turned on in this process explicitly.
os.environ.setdefault(CACHE_DIR_ENV, str(default_cache_dir()))
use_persistent_cache()


@pytest.fixture
def eight_devices():
    """Skips the test where fewer than eight devices exist (tests.devices)."""
    skip_unless_devices(8)


def pytest_collection_modifyitems(items):
    """The end-to-end trainer tests first (stable otherwise): they take minutes each, so started
    early they run beside the short tests on the other workers instead of after them."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/training/"))
