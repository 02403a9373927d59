"""Test-wide set-up: eight simulated CPU devices for the sharding tests, quiet TensorFlow, and one
compilation cache for the whole session."""

import os
import tempfile

# Must be set before jax is imported anywhere in the test process.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same tiny train and eval steps, in this process and in the `kdjax`
# subprocesses they start (which inherit the variable); JAX's persistent cache compiles each once.
# A fresh directory per session, so no test reads a program compiled by an older checkout.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="kdjax-tests-xla-"))


def pytest_collection_modifyitems(items):
    """The end-to-end trainer tests first (stable otherwise): they take minutes each, so started
    early they run beside the short tests on the other workers instead of after them."""
    items.sort(key=lambda item: not item.nodeid.startswith("tests/trainer/"))
