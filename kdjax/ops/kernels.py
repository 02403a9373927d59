"""The one place where kdjax chooses platform-specific kernels.

``'xla'`` traces plain XLA convolutions and batch normalisation, differentiable in forward and
reverse mode: what GPUs and TPUs run. ``'cpu'`` uses the forms of :mod:`kdjax.ops.cpu`, written
for XLA's CPU backend (reverse mode only: their gradients are written out). ``'auto'`` is
``'cpu'`` when JAX's default backend is the CPU and ``'xla'`` otherwise.
"""

from __future__ import annotations

import jax

KERNELS = ("auto", "xla", "cpu")


def resolve_kernels(kernels: str) -> str:
    """``'xla'`` or ``'cpu'`` for a ``model.kernels`` setting (see the module docstring).

    Raises:
      ValueError: ``kernels`` is not one of ``KERNELS``.
    """
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}; got {kernels!r}.")
    if kernels == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return kernels
