"""Train-mode batch normalisation in the kernels chosen for the platform."""

from __future__ import annotations

from typing import Any

import jax

from kdjax.ops.cpu.batch_norm import batch_normalize as cpu_batch_normalize
from kdjax.ops.kernels import resolve_kernels
from kdjax.ops.xla import normalize

Array = jax.Array


def batch_normalize(x: Array, scale: Array, bias: Array, *, groups: int, dtype: Any,
                    kernels: str = "auto") -> tuple[Array, Array, Array]:
    """Normalises each of ``groups`` consecutive slices of the batch with its own statistics.

    Args:
      x: (N, H, W, C).
      scale, bias: (C,) in ``dtype``, the statistics' dtype.
      groups: G, dividing N.
      kernels: 'xla', 'cpu', 'gpu' or 'auto' (:func:`kdjax.ops.kernels.resolve_kernels`; 'gpu'
        normalises as 'xla').
    Returns:
      y (N, H, W, C) in ``dtype``; each group's mean and biased variance, (G, C).
    """
    if resolve_kernels(kernels) == "cpu":
        return cpu_batch_normalize(x, scale, bias, groups, dtype)
    return normalize(x, scale, bias, groups, dtype)[:3]
