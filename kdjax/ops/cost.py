"""XLA's count of the floating-point operations of a lowered or compiled program."""

from __future__ import annotations

import jax


def counted_flops(program: jax.stages.Lowered | jax.stages.Compiled) -> float | None:
    """The FLOPs XLA's cost analysis counts for ``program``; None where the backend counts none.

    The analysis is a dict in current JAX releases and a list of one dict per program in older
    ones; both are read here.
    """
    analysis = program.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get("flops")
    return float(flops) if flops and flops > 0 else None
