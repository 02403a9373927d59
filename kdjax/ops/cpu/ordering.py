"""Data dependencies that order XLA's CPU schedule, where optimisation barriers do not.

XLA's CPU pipeline removes ``optimization_barrier`` before it schedules, without adding any
ordering in its place. Two things then cost memory in a train step:

- it takes a value that the backward pass computes again (a convolution's transformed input, say)
  for the forward pass's identical one, and keeps that alive from the forward pass to the backward;
- it delays a parameter's gradient (a convolution's kernel gradient, batch-norm's Σ g·x̂) to the
  end of the backward pass, where the optimiser reads it, and keeps the operands alive until then.

:func:`after` makes a value depend on another array, so that neither can happen
(``benchmarks/memory.py --train_step``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def after(value: Array, marker: Array) -> Array:
    """``value`` unchanged, but computed from ``marker``, a slice of another array that broadcasts
    to it: XLA then neither takes ``value`` for an equal value computed earlier nor runs its
    consumers before the marker's array exists. The marker is made finite and multiplied by zero,
    which XLA does not fold for floating point. Slice the marker along the batch axis, or from a
    replicated array, so that it adds no transfer between devices."""
    return value + 0.0 * jnp.where(jnp.isfinite(marker), marker, 0.0).astype(value.dtype)
