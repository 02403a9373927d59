"""The platform a process runs on, decided once: the process-wide settings that only the CPU
backend wants, the start-up report, and the warning when an accelerator is present but JAX
cannot use it.

The CPU settings (XLA flags, the allocator) must be made before JAX starts its backends, so the
platform is predicted from the environment (:func:`expected_platform`); after start-up
:func:`report` checks what JAX actually sees.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import shutil
from collections.abc import Mapping

from kdjax.runtime.cpu_flags import add_cpu_flags
from kdjax.runtime.host_memory import keep_freed_memory

log = logging.getLogger(__name__)

# JAX's accelerator plugins, by the platform they serve.
PLUGINS = {"gpu": ("jax_cuda13_plugin", "jax_cuda12_plugin", "jax_rocm7_plugin",
                   "jax_rocm60_plugin"),
           "tpu": ("libtpu",)}
# How to install JAX for each platform (the Makefile's ACCEL option; `make` checks the driver and
# says when cuda13 fits instead).
INSTALL = {"gpu": "make install ACCEL=cuda12", "tpu": "make install ACCEL=tpu"}


def visible_accelerators() -> dict[str, str]:
    """Accelerators this machine shows, whatever JAX can do with them: platform → evidence."""
    found = {}
    if glob.glob("/dev/nvidia[0-9]*") or shutil.which("nvidia-smi"):
        found["gpu"] = "NVIDIA GPU (/dev/nvidia*, nvidia-smi)"
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        found["tpu"] = "TPU chips (/dev/accel*, /dev/vfio)"
    return found


def _has_plugin(platform: str) -> bool:
    return any(importlib.util.find_spec(name) is not None for name in PLUGINS[platform])


def expected_platform(environ: Mapping[str, str] = os.environ) -> str:
    """The platform JAX will choose, predicted without starting it: the first of
    ``JAX_PLATFORMS`` if set, else an accelerator that is both visible and has its JAX plugin
    installed, else 'cpu'."""
    chosen = environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if chosen:
        return {"cuda": "gpu", "rocm": "gpu"}.get(chosen, chosen)
    for platform in visible_accelerators():
        if _has_plugin(platform):
            return platform
    return "cpu"


def configure_process(environ: Mapping[str, str] = os.environ) -> str:
    """Makes the process-wide settings of the expected platform before JAX starts; returns the
    platform. On CPU: XLA's CPU flags (:mod:`kdjax.runtime.cpu_flags`) and freed host memory kept
    for reuse (:mod:`kdjax.runtime.host_memory`); other platforms get none."""
    platform = expected_platform(environ)
    if platform == "cpu":
        add_cpu_flags(environ)
        keep_freed_memory(environ)
    return platform


def devices_in_host_memory() -> bool:
    """Whether JAX's devices keep their arrays in host memory (the CPU backend), so that reading
    a replicated array to the host takes no copy per replica."""
    import jax

    return jax.default_backend() == "cpu"


def report() -> None:
    """Logs the platform, device kind and count, and process count; warns loudly when an
    accelerator is visible but JAX runs on the CPU, and says which install fixes that."""
    import jax

    devices = jax.devices()
    log.info("platform %s: %d × %s (%d local), %d process(es)", jax.default_backend(),
             len(devices), devices[0].device_kind, jax.local_device_count(), jax.process_count())
    if jax.default_backend() != "cpu":
        return
    for platform, evidence in visible_accelerators().items():
        log.warning(
            "\n%s\n%s is present, but JAX runs on the CPU only: this JAX has no %s support. "
            "Install it with `%s` (see the README's 'On a GPU / on a TPU').\n%s",
            "!" * 72, evidence, platform.upper(), INSTALL[platform], "!" * 72)
