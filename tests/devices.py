"""The tests' devices: the CPU run simulates eight devices (tests/conftest.py); a machine of fewer
real ones (the accelerator check's single GPU) skips the tests that need more, and an accelerator
skips the tests of what XLA's CPU compiler does (its buffer assignment, its cost analysis)."""

import jax
import pytest


def skip_unless_devices(count: int) -> None:
    if jax.device_count() < count:
        pytest.skip(f"needs {count} devices; {jax.device_count()} {jax.default_backend()} "
                    "device(s) here")


def skip_unless_cpu(what: str) -> None:
    """Skips a test of ``what``, a property of XLA's CPU compiler, on other platforms."""
    if jax.default_backend() != "cpu":
        pytest.skip(f"{what}: XLA's CPU compiler; {jax.default_backend()} here")
