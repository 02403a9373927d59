"""The tests' device count: the CPU run simulates eight devices (tests/conftest.py); a machine of
fewer real ones (the accelerator check's single GPU) skips the tests that need more."""

import jax
import pytest


def skip_unless_devices(count: int) -> None:
    if jax.device_count() < count:
        pytest.skip(f"needs {count} devices; {jax.device_count()} {jax.default_backend()} "
                    "device(s) here")
