"""Programs that run once per experiment (building parameters and variables), compiled without
XLA's backend optimisation.

Initialising a model is a long straight-line program (a random draw per parameter) that runs
once, in milliseconds. On CPU, compiling the tiny test experiment's initial state took 13.1 s at
the default optimisation level and 2.8 s at level 0, and ran in 0.02 and 0.04 s. The draws'
float transforms may round differently at the two levels (34 of that state's 268 arrays differ,
by at most 2.4e-7); every run compiles with the same options, so a seed still gives the same
state each time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

UNOPTIMIZED = {"xla_backend_optimization_level": 0}


def compile_unoptimized(fn: Callable[[], Any], *, out_shardings: Any = None) -> jax.stages.Compiled:
    """``jax.jit(fn, out_shardings=...)`` for a function of no arguments, compiled with
    ``UNOPTIMIZED``; call the result to run it."""
    jitted = jax.jit(fn) if out_shardings is None else jax.jit(fn, out_shardings=out_shardings)
    return jitted.lower().compile(UNOPTIMIZED)
