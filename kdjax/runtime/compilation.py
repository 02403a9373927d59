"""Compilation: JAX's persistent cache in the user's cache directory, and programs that run once
per experiment (building parameters and variables, the overlays' predictions), compiled without
XLA's backend optimisation.

Every run of a config compiles the same train and eval programs (the seeds of a comparison, a
resumed run, the demo run twice), and most of a short run's time is compilation; the persistent
cache compiles each program once per machine. Its key holds the program, the JAX version and the
compiler flags, so a cached program is never used for another.

Initialising a model is a long straight-line program (a random draw per parameter) that runs
once, in milliseconds: at level 0 it compiles several times faster and runs as fast
(``benchmarks/NOTES.md`` item 51). The draws' float transforms may round differently at the two
levels (a few arrays differ in their last bits); every run compiles with the same options, so a
seed still gives the same state each time.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax

CACHE_DIR_ENV = "JAX_COMPILATION_CACHE_DIR"

UNOPTIMIZED = {"xla_backend_optimization_level": 0}


def compile_unoptimized(fn: Callable[[], Any], *, out_shardings: Any = None) -> jax.stages.Compiled:
    """``jax.jit(fn, out_shardings=...)`` for a function of no arguments, compiled with
    ``UNOPTIMIZED``; call the result to run it."""
    jitted = jax.jit(fn) if out_shardings is None else jax.jit(fn, out_shardings=out_shardings)
    return jitted.lower().compile(UNOPTIMIZED)


def release_compiled_programs() -> None:
    """Drops every program JAX holds in memory (``jax.clear_caches``); the persistent cache keeps
    them on disk, so a later run that needs one reads it back instead of compiling it.

    Call it between the runs of one process (``kdjax compare``). Each run jits new closures, and
    JAX's in-memory caches keep their executables alive after the run: on CPU each holds its
    machine code in memory mappings of its own, about 1,800 per run of the tiny test experiment,
    and a CamVid comparison ran out of the kernel's 65,530 mappings per process (LLVM: "Cannot
    allocate memory") after 17 runs.
    """
    jax.clear_caches()


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> pathlib.Path:
    """``$XDG_CACHE_HOME/kdjax/xla``, by default ``~/.cache/kdjax/xla``: local by nature."""
    root = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(root) / "kdjax" / "xla"


def use_persistent_cache() -> None:
    """Turns on JAX's persistent compilation cache, unless a cache is configured already
    (``jax_compilation_cache_dir``): in ``JAX_COMPILATION_CACHE_DIR`` if that is set (also when it
    was set after JAX was imported), else in :func:`default_cache_dir`. Call it before the first
    compilation of the process.

    Programs of any compile time are kept (JAX's default keeps those over 1 s): a run compiles
    dozens of small ones (evaluation, prediction, initial values), and reading one back is faster
    than compiling it again."""
    if jax.config.jax_compilation_cache_dir is None:
        jax.config.update("jax_compilation_cache_dir",
                          os.environ.get(CACHE_DIR_ENV) or str(default_cache_dir()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
